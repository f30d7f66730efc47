//! Strict JSON request bodies.
//!
//! [`ApiJson`] insists on a JSON content type (415), a body within the limit (413), well-formed JSON (400) and the
//! exact shape of the request type, unknown fields included (422, with the offending path).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::header;
use berth_core::ErrorKind;
use berth_core::validation::{ValidationErrors, json_type_name};
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
    // Every body is an object. serde would read a struct from an array as well, taking fields by position, so
    // `["name", "local"]` could pass; refusing other top-level types first keeps the shape strict.
    if !value.is_object() {
        return Err(ApiError::validation(ValidationErrors::single(
            "",
            format!(
                "the body must be a JSON object, not {}",
                json_type_name(&value)
            ),
        )));
    }
    // Deserialized by reference so the offending value can still be looked up to name its JSON type.
    serde_path_to_error::deserialize(&value).map_err(|error| {
        let found = value_at(&value, error.path());
        let path = error.path().to_string();
        let message = data_error_message(error.inner(), found);
        let parent = if path == "." { "" } else { path.as_str() };
        // serde reports a missing field at its parent; point at the field itself.
        let path = match missing_field_name(&message) {
            Some(field) => berth_core::validation::join_path(parent, field),
            None => parent.to_owned(),
        };
        let message = if path.is_empty() && message.starts_with("must be ") {
            // With no field to name, say which thing is wrong: "must be ..." alone would not.
            format!("the body {message}")
        } else {
            message
        };
        ApiError::validation(ValidationErrors::single(path, message))
    })
}

/// The value at serde's `path` inside `root`, when the path leads to one.
fn value_at<'a>(
    root: &'a serde_json::Value,
    path: &serde_path_to_error::Path,
) -> Option<&'a serde_json::Value> {
    use serde_path_to_error::Segment;
    path.iter().try_fold(root, |value, segment| match segment {
        Segment::Seq { index } => value.get(*index),
        Segment::Map { key } => value.get(key.as_str()),
        Segment::Enum { .. } | Segment::Unknown => None,
    })
}

/// serde's data error as a client should read it. serde words type mismatches in Rust's terms (`invalid type:
/// sequence, expected struct CreateEnvironmentRequest`, `expected u32`) and quotes the offending value; those are
/// rewritten in JSON's terms, naming the JSON type found rather than echoing it. Other messages (missing or unknown
/// fields, unknown variants) are already plain and only lose serde's " at line L column C": the path says where.
fn data_error_message(error: &serde_json::Error, found: Option<&serde_json::Value>) -> String {
    let message = error.to_string();
    let message = match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message,
    };
    let mismatch = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        // serde reads a struct from an array too (fields by position); a nested array of the wrong length lands here.
        .or_else(|| message.strip_prefix("invalid length "));
    let Some((_, expected)) = mismatch.and_then(|rest| rest.rsplit_once(", expected ")) else {
        return message;
    };
    let expected = plain_expectation(expected);
    let same_kind = match found {
        Some(serde_json::Value::Object(_)) => expected == "a JSON object",
        Some(serde_json::Value::Number(_)) => expected.contains("number"),
        Some(other) => json_type_name(other) == expected,
        None => true,
    };
    match found {
        // A value of the right JSON type that still failed (a number out of range, say) is described by what is
        // expected alone: "must be a number, not a number" would say nothing.
        Some(value) if !same_kind => format!("must be {expected}, not {}", json_type_name(value)),
        _ => format!("must be {expected}"),
    }
}

/// serde's description of what it expected (`struct Foo`, `a sequence`, `u32`), in JSON's words.
fn plain_expectation(expected: &str) -> String {
    let expected = expected.trim();
    if expected.starts_with("struct ") || expected.starts_with("map") || expected == "a map" {
        return "a JSON object".to_owned();
    }
    let whole = |min: i128, max: u128| format!("a whole number from {min} to {max}");
    match expected {
        "a sequence" | "sequence" => "an array".to_owned(),
        "a string" | "a borrowed string" | "string" | "a character" | "char" => {
            "a string".to_owned()
        }
        "a boolean" | "bool" => "a boolean".to_owned(),
        "u8" => whole(0, u8::MAX.into()),
        "u16" => whole(0, u16::MAX.into()),
        "u32" => whole(0, u32::MAX.into()),
        "u64" | "usize" => whole(0, u64::MAX.into()),
        "i8" => whole(i8::MIN.into(), i8::MAX.unsigned_abs().into()),
        "i16" => whole(i16::MIN.into(), i16::MAX.unsigned_abs().into()),
        "i32" => whole(i32::MIN.into(), i32::MAX.unsigned_abs().into()),
        "i64" | "isize" => whole(i64::MIN.into(), i64::MAX.unsigned_abs().into()),
        "f32" | "f64" => "a number".to_owned(),
        // A hand-written expectation ("a valid UUID") is already plain; only Rust's own names are hidden.
        other
            if !other.contains("::")
                && !other.starts_with("enum ")
                && !other.starts_with("tuple")
                && !other.starts_with("unit") =>
        {
            other.to_owned()
        }
        _ => "a value of another type".to_owned(),
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

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        tags: Option<Vec<String>>,
        #[serde(default)]
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        flag: bool,
    }

    /// The one problem `body` has, as the error's message: `path: message`, or the message alone at the root.
    fn problem(body: &str) -> String {
        let error = parse_json::<Body>(body.as_bytes()).unwrap_err();
        assert_eq!(error.code(), "validation_failed", "{body}");
        error.message().to_owned()
    }

    #[test]
    fn type_mismatches_are_worded_in_json_terms() {
        let cases = [
            ("[]", "", "the body must be a JSON object, not an array"),
            (
                "\"text\"",
                "",
                "the body must be a JSON object, not a string",
            ),
            ("42", "", "the body must be a JSON object, not a number"),
            ("null", "", "the body must be a JSON object, not null"),
            ("true", "", "the body must be a JSON object, not a boolean"),
            (
                r#"["x"]"#,
                "",
                "the body must be a JSON object, not an array",
            ),
            (r#"{"name": []}"#, "name", "must be a string, not an array"),
            (r#"{"name": 7}"#, "name", "must be a string, not a number"),
            (
                r#"{"name": "x", "count": -1}"#,
                "count",
                "must be a whole number from 0 to 4294967295",
            ),
            (
                r#"{"name": "x", "count": "9"}"#,
                "count",
                "must be a whole number from 0 to 4294967295, not a string",
            ),
            (
                r#"{"name": "x", "tags": {}}"#,
                "tags",
                "must be an array, not an object",
            ),
            (
                r#"{"name": "x", "tags": [1]}"#,
                "tags[0]",
                "must be a string, not a number",
            ),
            (
                r#"{"name": "x", "inner": []}"#,
                "inner",
                "must be a JSON object, not an array",
            ),
            (
                r#"{"name": "x", "inner": {"flag": "yes"}}"#,
                "inner.flag",
                "must be a boolean, not a string",
            ),
        ];
        for (body, path, message) in cases {
            let expected = if path.is_empty() {
                message.to_owned()
            } else {
                format!("{path}: {message}")
            };
            let found = problem(body);
            assert_eq!(found, expected, "{body}");
            assert!(
                !found.contains("::") && !found.contains("Body") && !found.contains("u32"),
                "{found}"
            );
        }
    }

    #[test]
    fn plain_messages_pass_through() {
        assert_eq!(problem("{}"), "name: missing field `name`");
        let message = problem(r#"{"name": "x", "extra": 1}"#);
        assert!(
            message.starts_with("extra: unknown field `extra`"),
            "{message}"
        );
    }
}
