//! Secrets referenced from environment configs: sealing inline values, checking references, forgetting.
//!
//! A secret is encrypted with the server's master key, bound to its company and environment through the AEAD's
//! associated data, and stored in the `secrets` table. Configs hold only its id.
//!
//! A config reaches a driver with its secrets open only through [`open_config`] (a stored environment's) or
//! [`open_unsaved_config`] (a config probed before it is saved), as a [`ResolvedConfig`]: the type says the secrets
//! are in it, so it is never mistaken for something to store.

use std::fmt;

use berth_core::config::{DriverConfig, stored_secret_refs};
use berth_core::environment::Environment;
use berth_core::ids::{CompanyId, EnvironmentId, SecretId};
use berth_core::lease::Lease;
use berth_core::provider::ProviderCatalog;
use berth_core::time::Timestamp;
use berth_core::validation::{ValidationErrors, join_path};
use secrecy::ExposeSecret;

use berth_core::ErrorKind;

use crate::secrets::{SecretCipher, SecretsError};
use berth_store::{Store, StoreError, StoredSecret};

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
    /// A stored config no longer passes validation (e.g. its sandbox provider is gone from this build).
    #[error("the environment's stored config is no longer valid ({0}); update it")]
    StoredConfigInvalid(ValidationErrors),
}

// === impl VaultError ===

impl VaultError {
    /// The stable, snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            VaultError::Store(error) => error.code(),
            VaultError::Secrets(error) => error.code(),
            VaultError::InvalidReference(_) => "validation_failed",
            VaultError::StoredConfigInvalid(_) => "environment_config_invalid",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            VaultError::Store(error) => error.kind(),
            VaultError::Secrets(error) => error.kind(),
            VaultError::InvalidReference(_) => ErrorKind::Validation,
            // The request is fine; the environment must be updated first.
            VaultError::StoredConfigInvalid(_) => ErrorKind::Conflict,
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
                name: format!("environment {environment_id} {}", field.value_path()),
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
        config.bind_secret(&field, id);
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
                join_path(berth_core::config::CONFIG_PATH, &field.ref_path()),
                format!("unknown secret; {}", field.how_to_replace()),
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

/// Forgets those of `candidates` (secrets of `environment_id`) that neither the environment's `current` stored config
/// nor the config of one of its unfinished leases refers to: a lease acquired before an edit is cleaned up with the
/// credentials it was made with, so they live until it is. Best effort, like [`forget`].
pub async fn forget_unless_needed(
    store: &Store,
    environment_id: EnvironmentId,
    candidates: &[SecretId],
    current: &serde_json::Map<String, serde_json::Value>,
) {
    let mut needed = stored_secret_refs(current);
    if candidates.iter().all(|id| needed.contains(id)) {
        return;
    }
    match store.unfinished_lease_configs(environment_id).await {
        Ok(configs) => {
            for config in &configs {
                needed.extend(stored_secret_refs(config));
            }
        }
        Err(error) => {
            // Unknown which are still needed: keep them all rather than strand a lease's cleanup.
            tracing::warn!(env.id = %environment_id, error = %crate::error_chain::DisplayChain(&error), "could not list the leases that need secrets; none forgotten");
            return;
        }
    }
    let unneeded: Vec<SecretId> = candidates
        .iter()
        .filter(|id| !needed.contains(id))
        .copied()
        .collect();
    forget(store, &unneeded).await;
}

/// A driver config with its secrets decrypted, for the moment of use: never stored (`DriverConfig::to_stored` refuses
/// it), dropped zeroized after the driver call. Only this module makes one.
pub struct ResolvedConfig(DriverConfig);

// === impl ResolvedConfig ===

impl ResolvedConfig {
    /// The config, secrets included, for a driver call.
    pub fn as_config(&self) -> &DriverConfig {
        &self.0
    }
}

impl fmt::Debug for ResolvedConfig {
    // The driver only: what the secrets' own Debug would print is not this type's business to trust.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedConfig")
            .field("driver", &self.0.driver())
            .finish_non_exhaustive()
    }
}

/// Opens a stored environment's config: parses it again (stored configs passed validation when written, but a
/// provider may have left this build since) and decrypts its secrets.
pub async fn open_config(
    store: &Store,
    cipher: &SecretCipher,
    providers: &(dyn ProviderCatalog + Sync),
    environment: &Environment,
) -> Result<ResolvedConfig, VaultError> {
    let config = DriverConfig::parse(
        environment.driver,
        &serde_json::Value::Object(environment.config.clone()),
        providers,
    )
    .map_err(VaultError::StoredConfigInvalid)?;
    open_unsaved_config(store, cipher, environment.company_id, config).await
}

/// Opens the config `lease` was acquired with (stored shape, kept on the lease), secrets decrypted: what cleans up
/// its resource once the environment was edited. `None` when the lease has none (acquired before berth kept them).
pub async fn open_acquired_config(
    store: &Store,
    cipher: &SecretCipher,
    providers: &(dyn ProviderCatalog + Sync),
    lease: &Lease,
) -> Result<Option<ResolvedConfig>, VaultError> {
    let Some(acquired) = &lease.acquired_config else {
        return Ok(None);
    };
    let config = DriverConfig::parse(
        lease.driver,
        &serde_json::Value::Object(acquired.clone()),
        providers,
    )
    .map_err(VaultError::StoredConfigInvalid)?;
    open_unsaved_config(store, cipher, lease.company_id, config)
        .await
        .map(Some)
}

/// Opens a config that is not stored (an unsaved config being probed): decrypts the company's secrets it references.
/// Its inline secrets, if any, are already in it.
pub async fn open_unsaved_config(
    store: &Store,
    cipher: &SecretCipher,
    company_id: CompanyId,
    mut config: DriverConfig,
) -> Result<ResolvedConfig, VaultError> {
    resolve_secrets(store, cipher, company_id, &mut config).await?;
    Ok(ResolvedConfig(config))
}

/// Decrypts every secret `config` references, in place, at the moment of use.
async fn resolve_secrets(
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
                    join_path(berth_core::config::CONFIG_PATH, &field.ref_path()),
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
                join_path(berth_core::config::CONFIG_PATH, &field.ref_path()),
                "the secret is not text",
            ))
        })?;
        config.set_resolved_secret(&field, secrecy::SecretString::from(text));
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

        let stale = VaultError::StoredConfigInvalid(ValidationErrors::single(
            "config.provider",
            "unknown provider",
        ));
        assert_eq!(stale.code(), "environment_config_invalid");
        assert_eq!(stale.kind(), ErrorKind::Conflict);
        assert_eq!(
            stale.to_string(),
            "the environment's stored config is no longer valid (config.provider: unknown provider); update it"
        );

        let sealed = VaultError::from(SecretsError::Decrypt);
        assert_eq!(sealed.code(), "secret_decrypt_failed");
        assert_eq!(sealed.kind(), ErrorKind::Internal);
    }
}
