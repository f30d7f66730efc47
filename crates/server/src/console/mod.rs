//! The operator console: a small web UI that `berth serve` answers at `/`.
//!
//! The console is three static files embedded in the binary (`crates/server/console/`: the HTML shell, one
//! hand-written JavaScript module, one stylesheet) and a sign-in endpoint. Everything it shows comes from the
//! ordinary `/api` routes, which the script calls with the session cookie set here ([`session`]); no data is
//! rendered on the server, and the script builds the page with DOM APIs and `textContent` only.
//!
//! Every response of these routes carries a strict Content-Security-Policy (scripts and styles from this origin
//! only, no inline code, no framing, nothing fetched from another origin) and the headers that go with it.

pub mod session;

use std::sync::LazyLock;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sha2::{Digest as _, Sha256};

use crate::api::auth::{bearer_token, principal_for_digest};
use crate::api::error::ApiError;
use crate::state::AppState;
use crate::tokens::token_digest;

/// The policy of every console response: this origin's script and style files only — no inline script or style,
/// no `eval`, no plugins, no framing, no form posted elsewhere, no request to another origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes, to be merged into the application beside `/api`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(shell))
        .route("/console/app.js", get(script))
        .route("/console/app.css", get(stylesheet))
        .route("/console/session", post(sign_in).delete(sign_out))
        .layer(middleware::map_response(security_headers))
}

/// A file embedded in the binary, with its validator.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    /// A strong ETag: the SHA-256 of the body, so a new build's file is never mistaken for the old one.
    etag: LazyLock<String>,
}

/// An [`Asset`] of a file in `crates/server/console/`, embedded at build time.
macro_rules! asset {
    ($file:literal, $content_type:literal) => {
        Asset {
            body: include_bytes!(concat!("../../console/", $file)),
            content_type: $content_type,
            etag: LazyLock::new(|| etag_of(include_bytes!(concat!("../../console/", $file)))),
        }
    };
}

impl Asset {
    /// The file, or 304 when the browser's copy is current. `no-cache`: the browser keeps a copy but asks each time,
    /// so an upgraded server's console is picked up at once and the question costs a 304.
    fn respond(&self, request_headers: &HeaderMap) -> Response {
        let etag = self.etag.as_str();
        let fresh = request_headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|candidate| candidate.trim() == etag || candidate.trim() == "*");
        let headers = [
            (header::CACHE_CONTROL, "no-cache"),
            (header::ETAG, etag),
            (header::CONTENT_TYPE, self.content_type),
        ];
        if fresh {
            (StatusCode::NOT_MODIFIED, headers).into_response()
        } else {
            (headers, self.body).into_response()
        }
    }
}

fn etag_of(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!("\"{}\"", hex::encode(&digest[..16]))
}

static SHELL: Asset = asset!("index.html", "text/html; charset=utf-8");
static SCRIPT: Asset = asset!("app.js", "text/javascript; charset=utf-8");
static STYLESHEET: Asset = asset!("app.css", "text/css; charset=utf-8");

async fn shell(headers: HeaderMap) -> Response {
    SHELL.respond(&headers)
}

async fn script(headers: HeaderMap) -> Response {
    SCRIPT.respond(&headers)
}

async fn stylesheet(headers: HeaderMap) -> Response {
    STYLESHEET.respond(&headers)
}

/// `POST /console/session` with `Authorization: Bearer <token>` and `X-Berth-Console: 1`: checks the token exactly
/// as the API does and answers 204 with the session cookie. The token travels once, in a header; it is never put in
/// a URL or a cookie.
async fn sign_in(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, _body) = request.into_parts();
    require_console_header(&parts.headers)?;
    let digest = token_digest(bearer_token(&parts)?);
    principal_for_digest(&state, &digest).await?;
    let sealed = session::seal(state.cipher(), &digest, session::SESSION_LIFETIME)?;
    let cookie = session::set_cookie(&sealed, session::came_over_https(&parts.headers))
        // A sealed session is base64url, always a valid header value.
        .map_err(|error| ApiError::internal(&error))?;
    Ok(no_content_with_cookie(cookie))
}

/// `DELETE /console/session` with `X-Berth-Console: 1`: the browser forgets the session.
async fn sign_out(headers: HeaderMap) -> Result<Response, ApiError> {
    require_console_header(&headers)?;
    Ok(no_content_with_cookie(session::clear_cookie(
        session::came_over_https(&headers),
    )))
}

fn no_content_with_cookie(cookie: HeaderValue) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(header::SET_COOKIE, cookie);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Sign-in and sign-out change what the browser holds, so they too need what only the console's own script can
/// send: a page on another origin cannot sign a browser in (to an account of its choosing) or out.
fn require_console_header(headers: &HeaderMap) -> Result<(), ApiError> {
    if session::has_console_header(headers) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "console sessions are opened and closed by the console itself (X-Berth-Console: 1)",
        ))
    }
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}
