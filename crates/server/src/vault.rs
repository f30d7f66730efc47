//! Secrets referenced from environment configs: sealing inline values, checking references, forgetting.
//!
//! A secret is encrypted with the server's master key, bound to its company and environment through the AEAD's
//! associated data, and stored in the `secrets` table. Configs hold only its id.

use berth_core::config::DriverConfig;
use berth_core::ids::{CompanyId, EnvironmentId, SecretId};
use berth_core::time::Timestamp;
use berth_core::validation::{ValidationErrors, join_path};
use secrecy::ExposeSecret;

use berth_core::ErrorKind;

use crate::secrets::{SecretCipher, SecretsError};
use crate::store::{Store, StoreError, StoredSecret};

/// Why a secret could not be sealed, checked or opened.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// A config's secret reference cannot be used (unknown, gone, not text); the paths name the fields.
    #[error("{0}")]
    InvalidReference(ValidationErrors),
}

// === impl VaultError ===

impl VaultError {
    /// The stable, snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            VaultError::Store(error) => error.code(),
            VaultError::Secrets(error) => error.code(),
            VaultError::InvalidReference(_) => "validation_failed",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            VaultError::Store(error) => error.kind(),
            VaultError::Secrets(error) => error.kind(),
            VaultError::InvalidReference(_) => ErrorKind::Validation,
        }
    }
}

/// The associated data that ties a ciphertext to its row: moving it to another secret or company fails decryption.
pub fn secret_aad(company_id: CompanyId, secret_id: SecretId) -> Vec<u8> {
    format!("berth-secret:v1:{company_id}:{secret_id}").into_bytes()
}

/// Encrypts and stores every inline secret of `config`, replacing each with a reference. Returns the new ids so the
/// caller can forget them if persisting the environment then fails.
pub async fn seal_inline_secrets(
    store: &Store,
    cipher: &SecretCipher,
    company_id: CompanyId,
    environment_id: EnvironmentId,
    config: &mut DriverConfig,
) -> Result<Vec<SecretId>, VaultError> {
    let mut sealed = Vec::new();
    let inline: Vec<_> = config
        .inline_secrets()
        .into_iter()
        .map(|(field, value)| (field, value.expose_secret().as_bytes().to_vec()))
        .collect();
    for (field, plaintext) in inline {
        let plaintext = zeroize::Zeroizing::new(plaintext);
        let id = SecretId::new();
        let sealed_result = async {
            let (nonce, ciphertext) = cipher.encrypt(&secret_aad(company_id, id), &plaintext)?;
            let secret = StoredSecret {
                id,
                company_id,
                environment_id: Some(environment_id),
                name: format!("environment {environment_id} {}", field.value_key()),
                nonce,
                ciphertext,
                created_at: Timestamp::now(),
            };
            store.insert_secret(&secret).await?;
            Ok::<_, VaultError>(())
        }
        .await;
        if let Err(error) = sealed_result {
            forget(store, &sealed).await;
            return Err(error);
        }
        config.bind_secret(field, id);
        sealed.push(id);
    }
    Ok(sealed)
}

/// Checks that every secret reference in `config` names a secret of `company_id` — and, when `environment_id` is
/// given, one that belongs to that environment (a reference can be kept, never borrowed from elsewhere).
pub async fn check_secret_refs(
    store: &Store,
    company_id: CompanyId,
    environment_id: Option<EnvironmentId>,
    config: &DriverConfig,
) -> Result<(), VaultError> {
    let mut errors = ValidationErrors::new();
    for (field, id) in config.secret_refs() {
        let usable = store.get_secret(id).await?.is_some_and(|secret| {
            secret.company_id == company_id
                && environment_id.is_none_or(|env| secret.environment_id == Some(env))
        });
        if !usable {
            errors.push(
                join_path(berth_core::config::CONFIG_PATH, field.ref_key()),
                format!(
                    "unknown secret; give the value itself as `{}`",
                    field.value_key()
                ),
            );
        }
    }
    errors.into_result(()).map_err(VaultError::InvalidReference)
}

/// Deletes secrets nothing refers to any more. Best effort: a failure is logged, and the row stays encrypted.
pub async fn forget(store: &Store, ids: &[SecretId]) {
    for id in ids {
        if let Err(error) = store.delete_secret(*id).await {
            tracing::warn!(secret.id = %id, error = %crate::error_chain::DisplayChain(&error), "could not delete secret");
        }
    }
}

/// Decrypts every secret `config` references, in place, at the moment of use. The result must never be stored
/// (`DriverConfig::to_stored` refuses it) and is dropped, zeroized, after the driver call.
pub async fn resolve_secrets(
    store: &Store,
    cipher: &SecretCipher,
    company_id: CompanyId,
    config: &mut DriverConfig,
) -> Result<(), VaultError> {
    for (field, id) in config.secret_refs() {
        let secret = store
            .get_secret(id)
            .await?
            .filter(|secret| secret.company_id == company_id)
            .ok_or_else(|| {
                VaultError::InvalidReference(ValidationErrors::single(
                    join_path(berth_core::config::CONFIG_PATH, field.ref_key()),
                    "the referenced secret is gone",
                ))
            })?;
        let plaintext = cipher.decrypt(
            &secret_aad(company_id, id),
            &secret.nonce,
            &secret.ciphertext,
        )?;
        let text = String::from_utf8(plaintext.to_vec()).map_err(|_| {
            VaultError::InvalidReference(ValidationErrors::single(
                join_path(berth_core::config::CONFIG_PATH, field.ref_key()),
                "the secret is not text",
            ))
        })?;
        config.set_resolved_secret(field, secrecy::SecretString::from(text));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_kinds_are_stable() {
        let invalid = VaultError::InvalidReference(ValidationErrors::single(
            "config.passwordRef",
            "the referenced secret is gone",
        ));
        assert_eq!(invalid.code(), "validation_failed");
        assert_eq!(invalid.kind(), ErrorKind::Validation);
        assert_eq!(invalid.kind().http_status(), 422);

        let sealed = VaultError::from(SecretsError::Decrypt);
        assert_eq!(sealed.code(), "secret_decrypt_failed");
        assert_eq!(sealed.kind(), ErrorKind::Internal);
    }
}
