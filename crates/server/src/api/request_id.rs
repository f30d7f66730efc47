//! `X-Request-Id`: a client's id is kept when it is a plain token, else one is made (a UUIDv7); either way it is
//! returned on the response and carried by the request's tracing span, so every log line of the request names it.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-chosen id kept: enough for any UUID, ULID or trace id, short enough for a log line.
const MAX_CLIENT_ID_LEN: usize = 128;

/// The request's id, as an extension for handlers and the trace span.
#[derive(Clone, Debug)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        // Only ids that passed `is_plain_token` or were made here get in, and both are ASCII.
        self.0.to_str().unwrap_or_default()
    }
}

/// Middleware: assigns the id before anything else sees the request and puts it on the response.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|value| is_plain_token(value.as_bytes()))
        .cloned()
        .unwrap_or_else(generate);
    request.headers_mut().insert(REQUEST_ID.clone(), id.clone());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID.clone(), id);
    response
}

/// A client's id reaches log lines verbatim, so only a short run of letters, digits and `-_.:/+=` is kept: nothing
/// that could forge a line or a field.
fn is_plain_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len() <= MAX_CLIENT_ID_LEN
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.:/+=".contains(byte))
}

fn generate() -> HeaderValue {
    let id = uuid::Uuid::now_v7().to_string();
    // A hyphenated UUID is always a valid header value.
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tokens_are_kept() {
        assert!(is_plain_token(b"0193a6c2-7d4e-7c3a-9c1e-1f2a3b4c5d6e"));
        assert!(is_plain_token(b"trace:abc/1+x="));
        assert!(!is_plain_token(b""));
        assert!(!is_plain_token(b"a b"));
        assert!(!is_plain_token(b"line\nbreak"));
        assert!(!is_plain_token(b"quote\"d"));
        assert!(!is_plain_token(&[b'a'; MAX_CLIENT_ID_LEN + 1]));
    }
}
