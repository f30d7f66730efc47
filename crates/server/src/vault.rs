//! Secrets referenced from environment configs: sealing inline values, checking references, forgetting.
//!
//! A secret is encrypted with the server's master key, bound to its company and environment through the AEAD's
//! associated data, and stored in the `secrets` table. Configs hold only its id.

use berth_core::config::DriverConfig;
use berth_core::ids::{CompanyId, EnvironmentId, SecretId};
use berth_core::time::Timestamp;
use berth_core::validation::{ValidationErrors, join_path};
use secrecy::ExposeSecret;

use crate::api::error::ApiError;
use crate::state::AppState;
use crate::store::StoredSecret;

/// The associated data that ties a ciphertext to its row: moving it to another secret or company fails decryption.
pub fn secret_aad(company_id: CompanyId, secret_id: SecretId) -> Vec<u8> {
    format!("berth-secret:v1:{company_id}:{secret_id}").into_bytes()
}

/// Encrypts and stores every inline secret of `config`, replacing each with a reference. Returns the new ids so the
/// caller can forget them if persisting the environment then fails.
pub async fn seal_inline_secrets(
    state: &AppState,
    company_id: CompanyId,
    environment_id: EnvironmentId,
    config: &mut DriverConfig,
) -> Result<Vec<SecretId>, ApiError> {
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
            let (nonce, ciphertext) = state
                .cipher()
                .encrypt(&secret_aad(company_id, id), &plaintext)?;
            let secret = StoredSecret {
                id,
                company_id,
                environment_id: Some(environment_id),
                name: format!("environment {environment_id} {}", field.value_key()),
                nonce,
                ciphertext,
                created_at: Timestamp::now(),
            };
            state.store().insert_secret(&secret).await?;
            Ok::<_, ApiError>(())
        }
        .await;
        if let Err(error) = sealed_result {
            forget(state, &sealed).await;
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
    state: &AppState,
    company_id: CompanyId,
    environment_id: Option<EnvironmentId>,
    config: &DriverConfig,
) -> Result<(), ApiError> {
    let mut errors = ValidationErrors::new();
    for (field, id) in config.secret_refs() {
        let usable = state.store().get_secret(id).await?.is_some_and(|secret| {
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
    errors.into_result(()).map_err(ApiError::validation)
}

/// Deletes secrets nothing refers to any more. Best effort: a failure is logged, and the row stays encrypted.
pub async fn forget(state: &AppState, ids: &[SecretId]) {
    for id in ids {
        if let Err(error) = state.store().delete_secret(*id).await {
            tracing::warn!(secret.id = %id, error = %crate::api::error::DisplayChain(&error), "could not delete secret");
        }
    }
}

/// Decrypts every secret `config` references, in place, at the moment of use. The result must never be stored
/// (`DriverConfig::to_stored` refuses it) and is dropped, zeroized, after the driver call.
pub async fn resolve_secrets(
    state: &AppState,
    company_id: CompanyId,
    config: &mut DriverConfig,
) -> Result<(), ApiError> {
    resolve_secrets_with(state.store(), state.cipher(), company_id, config).await
}

/// [`resolve_secrets`] for code that holds the store and the cipher rather than the whole state (the run sweeps).
pub async fn resolve_secrets_with(
    store: &crate::store::Store,
    cipher: &crate::secrets::SecretCipher,
    company_id: CompanyId,
    config: &mut DriverConfig,
) -> Result<(), ApiError> {
    for (field, id) in config.secret_refs() {
        let secret = store
            .get_secret(id)
            .await?
            .filter(|secret| secret.company_id == company_id)
            .ok_or_else(|| {
                ApiError::validation(ValidationErrors::single(
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
            ApiError::validation(ValidationErrors::single(
                join_path(berth_core::config::CONFIG_PATH, field.ref_key()),
                "the secret is not text",
            ))
        })?;
        config.set_resolved_secret(field, secrecy::SecretString::from(text));
    }
    Ok(())
}
