//! Admission: who is asking (the run credential, for this run, while the run is live) and whether the request body
//! is one the policy lets through (JSON, within `maxRequestBytes`). Routes are checked by [`BridgePolicy::check`].
//!
//! [`BridgePolicy::check`]: crate::policy::BridgePolicy::check

use berth_core::ids::RunId;
use berth_core::provider::BoxFuture;
use berth_core::time::Timestamp;
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use subtle::ConstantTimeEq;

use crate::error::BridgeError;
use crate::signing::BridgeSecrets;

/// Says whether a run may still use its bridge. Asked on every request, after the credential checks out.
pub trait RunGate: Send + Sync + 'static {
    fn is_live(&self, run_id: RunId) -> BoxFuture<'_, bool>;
}

// === the run credential ===

/// Checks the request's run credential: genuine (by `secrets`), unexpired, for `run_id`, and the run still live (by
/// `gate`).
pub(super) async fn authenticate(
    secrets: &BridgeSecrets,
    run_id: RunId,
    gate: &dyn RunGate,
    headers: &HeaderMap,
) -> Result<(), BridgeError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(BridgeError::CredentialMissing)?;
    if values.next().is_some() {
        return Err(BridgeError::CredentialMalformed);
    }
    let text = value
        .to_str()
        .map_err(|_| BridgeError::CredentialMalformed)?;
    let (scheme, token) = text
        .split_once(' ')
        .ok_or(BridgeError::CredentialMalformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(BridgeError::CredentialMalformed);
    }
    let credential = secrets
        .credential_issuer()
        .verify(token.trim_matches(' '), Timestamp::now())?;
    let same_run: bool = credential
        .run_id
        .as_uuid()
        .as_bytes()
        .ct_eq(run_id.as_uuid().as_bytes())
        .into();
    if !same_run {
        return Err(BridgeError::CredentialWrongRun);
    }
    if !gate.is_live(run_id).await {
        return Err(BridgeError::RunEnded);
    }
    Ok(())
}

// === requests ===

/// Reads the request body within `limit`. No body at all is fine whatever the content type; a body must be JSON.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limit: u64,
    read: &mut u64,
) -> Result<Bytes, BridgeError> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    if !is_json(headers) {
        return Err(BridgeError::UnsupportedMediaType);
    }
    // A declared length over the limit is refused before reading a byte of it.
    if body.size_hint().lower() > limit {
        return Err(BridgeError::PayloadTooLarge { limit });
    }
    let collected = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
        .map_err(|err| {
            if err.downcast_ref::<LengthLimitError>().is_some() {
                BridgeError::PayloadTooLarge { limit }
            } else {
                BridgeError::RequestBodyUnreadable
            }
        })?;
    let bytes = collected.to_bytes();
    *read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    Ok(bytes)
}

/// `application/json` or `application/<anything>+json`, with any parameters; exactly one `Content-Type`.
fn is_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let Some(subtype) = essence.strip_prefix("application/") else {
        return false;
    };
    let is_token = |text: &str| {
        !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    subtype == "json" || subtype.strip_suffix("+json").is_some_and(is_token)
}
