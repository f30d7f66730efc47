//! The console's sign-in session: the token's digest, sealed into an `HttpOnly` cookie.
//!
//! The session is stateless: the cookie holds the SHA-256 digest of the token the operator pasted (never the token
//! itself) and an expiry, sealed with XChaCha20-Poly1305 under the master key with an associated data of its own, so
//! it cannot be forged, altered or confused with a stored secret, and every replica sharing the master key accepts
//! it. The digest is looked up again on every request exactly as a bearer token's is, so revoking the key (or
//! changing the admin token) ends every session made with it at once.
//!
//! A cookie is sent by the browser whatever page asked, so it alone must not authenticate a request: the console's
//! script adds [`CONSOLE_HEADER`] to every API call, which a page on another origin cannot do without a CORS
//! preflight that berth never grants. The one exception is the run event stream, which `EventSource` opens without
//! custom headers: a `GET` that changes nothing, whose answer another origin cannot read, and which
//! `SameSite=Strict` keeps from being sent cross-site at all.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::header::InvalidHeaderValue;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::secrets::{NONCE_LEN, SecretCipher, SecretsError};

/// The cookie's name.
pub const COOKIE_NAME: &str = "berth_console";
/// The header the console's script sends with every API call; its value must be `1`.
pub const CONSOLE_HEADER: &str = "x-berth-console";
/// How long a sign-in lasts at most. The cookie itself has no `Max-Age`, so closing the browser ends it sooner.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// Binds a sealed session to its purpose: a stored secret's ciphertext (bound to `berth-secret:v1:…`) does not
/// open as a session, nor a session as a secret.
const SESSION_AAD: &[u8] = b"berth-console-session:v1";
const SESSION_VERSION: u8 = 1;
/// version, expiry (unix seconds, big-endian), token digest.
const PLAINTEXT_LEN: usize = 1 + 8 + 32;
/// Longest cookie value considered: nonce, plaintext and tag, base64url, with room to spare.
const MAX_COOKIE_CHARS: usize = 256;

/// Seals `digest` (a token's SHA-256) into a cookie value that expires `lifetime` from now.
pub fn seal(
    cipher: &SecretCipher,
    digest: &[u8; 32],
    lifetime: Duration,
) -> Result<String, SecretsError> {
    let expires = unix_now().saturating_add(lifetime.as_secs());
    let mut plaintext = Vec::with_capacity(PLAINTEXT_LEN);
    plaintext.push(SESSION_VERSION);
    plaintext.extend_from_slice(&expires.to_be_bytes());
    plaintext.extend_from_slice(digest);
    let (nonce, ciphertext) = cipher.encrypt(SESSION_AAD, &plaintext)?;
    let mut sealed = nonce;
    sealed.extend_from_slice(&ciphertext);
    Ok(URL_SAFE_NO_PAD.encode(sealed))
}

/// The token digest a cookie value was sealed with, unless it is malformed, forged, or expired.
pub fn open(cipher: &SecretCipher, value: &str) -> Option<[u8; 32]> {
    if value.len() > MAX_COOKIE_CHARS {
        return None;
    }
    let sealed = URL_SAFE_NO_PAD.decode(value).ok()?;
    if sealed.len() <= NONCE_LEN {
        return None;
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let plaintext = cipher.decrypt(SESSION_AAD, nonce, ciphertext).ok()?;
    if plaintext.len() != PLAINTEXT_LEN || plaintext[0] != SESSION_VERSION {
        return None;
    }
    let expires = u64::from_be_bytes(plaintext[1..9].try_into().ok()?);
    if expires <= unix_now() {
        return None;
    }
    plaintext[9..].try_into().ok()
}

/// The token digest of the console session a request carries, when the request may be authenticated by it (see the
/// module's documentation): a valid cookie, and either the console header or an event stream `GET`.
pub fn request_digest(parts: &Parts, cipher: &SecretCipher) -> Option<[u8; 32]> {
    if !has_console_header(&parts.headers) && !is_event_stream_get(parts) {
        return None;
    }
    open(cipher, cookie_value(&parts.headers)?)
}

/// Whether the request carries `X-Berth-Console: 1`.
pub fn has_console_header(headers: &HeaderMap) -> bool {
    headers
        .get(CONSOLE_HEADER)
        .is_some_and(|value| value.as_bytes() == b"1")
}

/// `GET …/runs/{id}/events` asking for `text/event-stream`: what `EventSource` sends for a run's live events. (The
/// path is matched by its shape because the `/api` router sees it without its prefix.)
fn is_event_stream_get(parts: &Parts) -> bool {
    let path = parts.uri.path();
    parts.method == Method::GET
        && path.ends_with("/events")
        && path.contains("/runs/")
        && parts
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.contains("text/event-stream"))
}

/// The value of the session cookie, from the `Cookie` headers only (never from the URL).
fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
}

/// The `Set-Cookie` value that stores `sealed` for the browser session. `Secure` when the request came over HTTPS
/// (through a proxy that says so): berth itself serves plain HTTP, and a `Secure` cookie would not be sent back there.
pub fn set_cookie(sealed: &str, secure: bool) -> Result<HeaderValue, InvalidHeaderValue> {
    HeaderValue::from_str(&format!(
        "{COOKIE_NAME}={sealed}; HttpOnly; SameSite=Strict; Path=/{}",
        if secure { "; Secure" } else { "" }
    ))
}

/// The `Set-Cookie` value that makes the browser forget the session.
pub fn clear_cookie(secure: bool) -> HeaderValue {
    if secure {
        HeaderValue::from_static(
            "berth_console=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0; Secure",
        )
    } else {
        HeaderValue::from_static("berth_console=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
    }
}

/// Whether the request reached berth over HTTPS, as a TLS-terminating proxy in front of it reports. Believing a
/// client that claims it is harmless: the only effect is a stricter cookie in that client's own browser.
pub fn came_over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("https"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> SecretCipher {
        SecretCipher::new(&[7; 32])
    }

    #[test]
    fn a_sealed_session_opens_to_its_digest() {
        let sealed = seal(&cipher(), &[9; 32], SESSION_LIFETIME).unwrap();
        assert_eq!(open(&cipher(), &sealed), Some([9; 32]));
        assert!(!sealed.contains(&hex::encode([9u8; 32])));
    }

    #[test]
    fn an_expired_altered_or_foreign_session_does_not_open() {
        let expired = seal(&cipher(), &[9; 32], Duration::ZERO).unwrap();
        assert_eq!(open(&cipher(), &expired), None);
        let sealed = seal(&cipher(), &[9; 32], SESSION_LIFETIME).unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(open(&cipher(), &URL_SAFE_NO_PAD.encode(bytes)), None);
        assert_eq!(open(&SecretCipher::new(&[8; 32]), &sealed), None);
        // A stored secret sealed under the same key is not a session.
        let (nonce, ciphertext) = cipher()
            .encrypt(b"berth-secret:v1:a:b", &[1; PLAINTEXT_LEN])
            .unwrap();
        let secret = URL_SAFE_NO_PAD.encode([nonce, ciphertext].concat());
        assert_eq!(open(&cipher(), &secret), None);
    }
}
