//! The error responses the listener writes itself, in the API's error shape (`{"error": {"code", "message"}}`):
//! the refusal past the connection bound, and the JSON versions of hyper's own bodiless answers to a request head
//! it cannot parse.

use http::StatusCode;

/// The code and message for a status hyper answers a request head with (`400`, `414`, `431`).
pub(crate) fn protocol_error(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            "the request head is too large or has too many header fields",
        ),
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request target is too long"),
        _ => ("malformed_request", "the request is not valid HTTP/1.1"),
    }
}

/// The refusal past the connection bound.
pub(crate) const TOO_MANY_CONNECTIONS: (&str, &str) = (
    "too_many_connections",
    "the server has too many open connections; retry later",
);

/// A complete HTTP/1.1 response with a JSON error body that closes the connection.
pub(crate) fn error_response(
    status: StatusCode,
    (code, message): (&str, &str),
    retry_after: Option<u32>,
) -> Vec<u8> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\n\
         content-length: {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    );
    if let Some(seconds) = retry_after {
        head.push_str(&format!("retry-after: {seconds}\r\n"));
    }
    head.push_str("\r\n");
    let mut response = head.into_bytes();
    response.extend_from_slice(body.as_bytes());
    response
}

/// Where a bodiless error response head (status 400 or more, no body, no content type) begins, when `written` ends
/// with one: the shape of hyper's automatic answer to a request head it cannot parse. Only the tail is searched:
/// such a head is short, and anything before it is the end of an earlier response.
pub(crate) fn trailing_bodiless_error(written: &[u8]) -> Option<usize> {
    const SEARCH: usize = 1024;
    if !written.ends_with(b"\r\n\r\n") {
        return None;
    }
    let from = written.len().saturating_sub(SEARCH);
    let window = &written[from..];
    let mut end = window.len();
    while let Some(at) = rfind(&window[..end], b"HTTP/1.") {
        if bodiless_error_status(&window[at..]).is_some() {
            return Some(from + at);
        }
        end = at;
    }
    None
}

/// The status of `head` when it is exactly one bodiless error response head.
pub(crate) fn bodiless_error_status(head: &[u8]) -> Option<StatusCode> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        _ => return None,
    }
    let status = StatusCode::from_u16(response.code?).ok()?;
    if status.as_u16() < 400 {
        return None;
    }
    for header in response.headers.iter() {
        let bodiless = if header.name.eq_ignore_ascii_case("content-length") {
            header.value == b"0"
        } else {
            !(header.name.eq_ignore_ascii_case("content-type")
                || header.name.eq_ignore_ascii_case("transfer-encoding"))
        };
        if !bodiless {
            return None;
        }
    }
    Some(status)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .rposition(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_431: &[u8] =
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 03:00:00 GMT\r\n\r\n";

    #[test]
    fn finds_hyper_s_automatic_answer_alone_or_after_an_earlier_response() {
        assert_eq!(trailing_bodiless_error(HYPER_431), Some(0));
        let earlier =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let pipelined = [&earlier[..], HYPER_431].concat();
        assert_eq!(trailing_bodiless_error(&pipelined), Some(earlier.len()));
        assert_eq!(
            bodiless_error_status(HYPER_431),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn leaves_responses_with_a_body_or_a_success_status_alone() {
        for written in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"0\r\n\r\n",
            b"",
        ] {
            assert_eq!(
                trailing_bodiless_error(written),
                None,
                "{}",
                String::from_utf8_lossy(written)
            );
        }
    }

    #[test]
    fn error_responses_are_json_and_close_the_connection() {
        let response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            TOO_MANY_CONNECTIONS,
            Some(1),
        );
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(head.contains("retry-after: 1"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }
}
