//! Strict JSON request bodies.
//!
//! [`ApiJson`] insists on a JSON content type (415), a body within the limit (413), well-formed JSON (400) and the
//! exact shape of the request type, unknown fields included (422, with the offending path).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::header;
use berth_core::ErrorKind;
use berth_core::validation::ValidationErrors;
use bytes::BytesMut;
use http_body_util::BodyExt;
use serde::de::{Deserialize, DeserializeOwned, Deserializer};

use super::error::ApiError;

/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A JSON request body of type `T`, rejected with the uniform error body when it is not exactly that.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        if !has_json_content_type(&request) {
            return Err(ApiError::new(
                ErrorKind::UnsupportedMediaType,
                "unsupported_media_type",
                "expected a JSON body with Content-Type: application/json",
            ));
        }
        let bytes = read_body(request.into_body()).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// How much of an oversized body is read and thrown away before answering 413. Reading it (a "lingering close")
/// lets the client finish sending and actually see the 413 instead of a broken pipe; past this much, or past
/// [`DRAIN_DEADLINE`], the connection is simply dropped.
const DRAIN_LIMIT_BYTES: usize = 16 * 1024 * 1024;
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

pub(crate) async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let unreadable =
        || ApiError::bad_request("unreadable_body", "the request body could not be read");
    let mut body = body;
    let mut collected = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| unreadable())?.into_data() else {
            continue;
        };
        total = total.saturating_add(data.len());
        if total > MAX_BODY_BYTES {
            let _ = tokio::time::timeout(DRAIN_DEADLINE, async {
                while total <= DRAIN_LIMIT_BYTES {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            total = total.saturating_add(frame.data_ref().map_or(0, Bytes::len))
                        }
                        _ => break,
                    }
                }
            })
            .await;
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                "payload_too_large",
                format!("the request body exceeds the limit of {MAX_BODY_BYTES} bytes"),
            ));
        }
        collected.extend_from_slice(&data);
    }
    Ok(collected.freeze())
}

/// Parses `bytes` as exactly one `T`. Syntax is checked first, over the whole body, so that malformed JSON is
/// always a 400 and only well-formed JSON of the wrong shape is a 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "malformed_json",
            "the request body is empty; expected a JSON object",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|error| {
        ApiError::bad_request(
            "malformed_json",
            format!("the request body is not valid JSON: {error}"),
        )
    })?;
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let message = data_error_message(error.inner());
        let parent = if path == "." { "" } else { path.as_str() };
        // serde reports a missing field at its parent; point at the field itself.
        let path = match missing_field_name(&message) {
            Some(field) => berth_core::validation::join_path(parent, field),
            None => parent.to_owned(),
        };
        ApiError::validation(ValidationErrors::single(path, message))
    })
}

/// serde's data errors end with " at line L column C"; the path already says where.
fn data_error_message(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message,
    }
}

/// `missing field `name`` → `name`.
fn missing_field_name(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

pub(crate) fn has_json_content_type(request: &Request) -> bool {
    let Some(value) = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A field of a PATCH body: absent (leave as is), `null` (clear) or a value (set).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Patch<T> {
    #[default]
    Missing,
    Null,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Only reached when the key is present (`#[serde(default)]` covers absence).
        Ok(match Option::<T>::deserialize(deserializer)? {
            None => Patch::Null,
            Some(value) => Patch::Value(value),
        })
    }
}

impl<T> Patch<T> {
    pub fn is_missing(&self) -> bool {
        matches!(self, Patch::Missing)
    }
}
