//! The bridge's keys, the run's upstream token, and request signing.
//!
//! Everything is derived from one server secret (32 bytes or more; the server derives it from its master key, so
//! every replica derives the same keys), each key for one purpose only:
//!
//! | key | derivation | used for |
//! |---|---|---|
//! | credential key | `HMAC(secret, "berth bridge credential v1")` | keys the [`CredentialIssuer`] (the agent's `brc1.` credential; it derives its own subkey from this) |
//! | upstream key | `HMAC(secret, "berth bridge upstream token v1")` | the run's upstream token `bru1.<run-id>.<tag>` |
//! | signing root | `HMAC(secret, "berth bridge request signing v1")` | per-run signing keys |
//! | run signing key | `HMAC(signing root, run id as 16 bytes)` | signs each forwarded request |
//!
//! A forwarded request carries [`HEADER_RUN_ID`], [`HEADER_TIMESTAMP`], [`HEADER_NONCE`] and [`HEADER_SIGNATURE`]
//! (`v1=<hex HMAC-SHA256>` over [`canonical_request`]). The server checks them with [`verify`], which also records
//! the nonce in a [`NonceStore`] so a captured request cannot be replayed within the window.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use berth_core::ids::RunId;
use berth_core::provider::BoxFuture;
use berth_core::time::Timestamp;
use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::credential::{CredentialIssuer, MIN_SECRET_LEN};
use crate::error::BridgeError;

pub const HEADER_RUN_ID: &str = "x-berth-run-id";
/// Unix seconds.
pub const HEADER_TIMESTAMP: &str = "x-berth-timestamp";
/// At least 128 random bits, unpadded base64url.
pub const HEADER_NONCE: &str = "x-berth-nonce";
/// `v1=<hex HMAC-SHA256>`.
pub const HEADER_SIGNATURE: &str = "x-berth-signature";
/// How far a signed request's timestamp may be from the verifier's clock, either way.
pub const DEFAULT_SIGNATURE_WINDOW: Duration = Duration::from_secs(300);

const CREDENTIAL_LABEL: &[u8] = b"berth bridge credential v1";
const UPSTREAM_LABEL: &[u8] = b"berth bridge upstream token v1";
const SIGNING_LABEL: &[u8] = b"berth bridge request signing v1";

const UPSTREAM_PREFIX: &str = "bru1.";
/// A hyphenated UUID.
const RUN_ID_TEXT_LEN: usize = 36;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 32;
/// `bru1.` + run id + `.` + 43 characters of unpadded base64url.
const UPSTREAM_TOKEN_LEN: usize = UPSTREAM_PREFIX.len() + RUN_ID_TEXT_LEN + 1 + 43;
const NONCE_BYTES: usize = 16;
/// 16 bytes in unpadded base64url.
const MIN_NONCE_LEN: usize = 22;
const MAX_NONCE_LEN: usize = 128;
const SIGNATURE_PREFIX: &str = "v1=";
/// The block size of SHA-256: HMAC's native key size (see [`keyed`]).
const HMAC_BLOCK_LEN: usize = 64;

type HmacSha256 = Hmac<Sha256>;
type Key = SecretBox<[u8; KEY_LEN]>;

/// The bridge's keys, all derived from one server secret. Every key is zeroized when dropped; `Debug` shows none.
pub struct BridgeSecrets {
    issuer: CredentialIssuer,
    upstream_key: Key,
    signing_root: Key,
}

/// A run's request-signing key. Zeroized on drop; `Debug` is redacted.
#[derive(Clone)]
pub struct SigningKey {
    bytes: [u8; KEY_LEN],
}

/// The signature headers of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureHeaders {
    /// Unix seconds.
    pub timestamp: i64,
    pub nonce: String,
    /// `v1=<hex>`.
    pub signature: String,
}

/// Remembers nonces so a signed request cannot be replayed. The server implements it over its database, which
/// replicas share.
pub trait NonceStore: Send + Sync + 'static {
    /// Records `nonce` for `run_id` until `expires_at`: `Ok(true)` if it was new, `Ok(false)` if it was seen before
    /// (a replay). Must be atomic (insert-if-absent). Entries past `expires_at` may be forgotten: by then
    /// [`verify`] refuses their timestamp anyway.
    fn remember<'a>(
        &'a self,
        run_id: RunId,
        nonce: &'a str,
        expires_at: Timestamp,
    ) -> BoxFuture<'a, Result<bool, BridgeError>>;
}

/// A process-local [`NonceStore`], for tests and single-process deployments. Expired entries are swept as new ones
/// arrive, so its size is bounded by the request rate times the window.
#[derive(Debug, Default)]
pub struct MemoryNonceStore {
    inner: Mutex<MemoryNonces>,
}

#[derive(Debug, Default)]
struct MemoryNonces {
    seen: HashMap<(RunId, String), Timestamp>,
    /// Sweep when the map reaches this size; doubled after each sweep that frees little, so sweeping stays O(1)
    /// amortized.
    sweep_at: usize,
}

// === impl BridgeSecrets ===

impl BridgeSecrets {
    /// Derives every bridge key from `server_secret`, which must hold at least 32 bytes of randomness.
    pub fn new(server_secret: &[u8]) -> Result<Self, BridgeError> {
        if server_secret.len() < MIN_SECRET_LEN {
            return Err(BridgeError::SecretTooShort {
                min: MIN_SECRET_LEN,
                actual: server_secret.len(),
            });
        }
        let credential_key = Zeroizing::new(derive(server_secret, CREDENTIAL_LABEL)?);
        Ok(Self {
            issuer: CredentialIssuer::new(credential_key.as_slice())?,
            upstream_key: Key::new(Box::new(derive(server_secret, UPSTREAM_LABEL)?)),
            signing_root: Key::new(Box::new(derive(server_secret, SIGNING_LABEL)?)),
        })
    }

    /// Mints and checks the agents' run credentials (`BERTH_API_TOKEN`).
    pub fn credential_issuer(&self) -> &CredentialIssuer {
        &self.issuer
    }

    /// The run's own upstream credential for the default upstream (this server): `bru1.<run-id>.<base64url tag>`.
    /// It does not expire by itself: the server accepts it only while the run is live.
    pub fn upstream_token(&self, run_id: RunId) -> SecretString {
        let mut token = String::with_capacity(UPSTREAM_TOKEN_LEN);
        token.push_str(UPSTREAM_PREFIX);
        token.push_str(&run_id.to_string());
        let tag = Zeroizing::new(self.upstream_tag(&token));
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(*tag, &mut token);
        SecretString::from(token)
    }

    /// Checks an upstream token in constant time and returns its run.
    pub fn verify_upstream_token(&self, token: &str) -> Result<RunId, BridgeError> {
        if token.len() != UPSTREAM_TOKEN_LEN {
            return Err(BridgeError::UpstreamTokenMalformed);
        }
        let (signed, tag) = token
            .rsplit_once('.')
            .ok_or(BridgeError::UpstreamTokenMalformed)?;
        let run_id = signed
            .strip_prefix(UPSTREAM_PREFIX)
            .and_then(|run_id| run_id.parse::<RunId>().ok())
            .ok_or(BridgeError::UpstreamTokenMalformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| BridgeError::UpstreamTokenMalformed)?;
        if tag.len() != TAG_LEN {
            return Err(BridgeError::UpstreamTokenMalformed);
        }
        // The tag covers the text as received, so each token has exactly one accepted spelling.
        let mut mac = keyed(self.upstream_key.expose_secret());
        mac.update(signed.as_bytes());
        mac.verify_slice(&tag)
            .map_err(|_| BridgeError::UpstreamTokenInvalid)?;
        Ok(run_id)
    }

    /// The per-run request-signing key: `HMAC(signing root, run id)`.
    pub fn signing_key(&self, run_id: RunId) -> SigningKey {
        let mut mac = keyed(self.signing_root.expose_secret());
        mac.update(run_id.as_uuid().as_bytes());
        let mut tag = mac.finalize().into_bytes();
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(tag.as_slice());
        tag.as_mut_slice().zeroize();
        SigningKey { bytes }
    }

    fn upstream_tag(&self, signed: &str) -> [u8; TAG_LEN] {
        let mut mac = keyed(self.upstream_key.expose_secret());
        mac.update(signed.as_bytes());
        let mut tag = mac.finalize().into_bytes();
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_slice());
        tag.as_mut_slice().zeroize();
        out
    }
}

impl fmt::Debug for BridgeSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BridgeSecrets([REDACTED])")
    }
}

// === impl SigningKey ===

impl SigningKey {
    fn mac(&self) -> HmacSha256 {
        keyed(&self.bytes)
    }
}

impl Drop for SigningKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey([REDACTED])")
    }
}

// === signing ===

/// The text a signature covers: `"v1\n" + METHOD + "\n" + path_and_query + "\n" + timestamp + "\n" + nonce + "\n" +
/// hex(sha256(body))`. Binding the method, path and query means a signature cannot be moved to another route.
pub fn canonical_request(
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body_sha256_hex: &str,
) -> String {
    format!("v1\n{method}\n{path_and_query}\n{timestamp}\n{nonce}\n{body_sha256_hex}")
}

/// Signs one request: a fresh 128-bit nonce, `now` in Unix seconds, and the MAC over [`canonical_request`].
/// `path_and_query` is what the verifier will see: the upstream path (with any prefix) and the raw query.
pub fn sign(
    key: &SigningKey,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now: Timestamp,
) -> SignatureHeaders {
    let timestamp = unix_seconds(now);
    let nonce = URL_SAFE_NO_PAD.encode(rand::random::<[u8; NONCE_BYTES]>());
    let mac = request_mac(key, method, path_and_query, timestamp, &nonce, body);
    let mut signature = String::with_capacity(SIGNATURE_PREFIX.len() + 2 * TAG_LEN);
    signature.push_str(SIGNATURE_PREFIX);
    signature.push_str(&hex::encode(mac.finalize().into_bytes()));
    SignatureHeaders {
        timestamp,
        nonce,
        signature,
    }
}

/// Checks the signature headers of a request the server received from the bridge.
///
/// In this order: parse the headers (missing → [`BridgeError::SignatureMissing`], malformed or repeated →
/// [`BridgeError::SignatureMalformed`]); the timestamp must be within `window` of `now`
/// ([`BridgeError::SignatureStale`]); the MAC is recomputed and compared in constant time
/// ([`BridgeError::SignatureInvalid`]); only then is the nonce recorded, until the timestamp leaves the window
/// ([`BridgeError::NonceReplayed`] when it was seen before). Forged requests therefore never fill the nonce store.
#[allow(clippy::too_many_arguments)] // The signature is fixed by the contract the server codes against.
pub async fn verify(
    key: &SigningKey,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: Timestamp,
    window: Duration,
    run_id: RunId,
    nonces: &dyn NonceStore,
) -> Result<(), BridgeError> {
    let timestamp_text = single_header(headers, HEADER_TIMESTAMP)?;
    let nonce = single_header(headers, HEADER_NONCE)?;
    let signature = single_header(headers, HEADER_SIGNATURE)?;

    let timestamp = parse_timestamp(timestamp_text).ok_or(BridgeError::SignatureMalformed {
        header: HEADER_TIMESTAMP,
    })?;
    if !is_nonce(nonce) {
        return Err(BridgeError::SignatureMalformed {
            header: HEADER_NONCE,
        });
    }
    let mut tag = [0u8; TAG_LEN];
    signature
        .strip_prefix(SIGNATURE_PREFIX)
        .and_then(|hex_tag| hex::decode_to_slice(hex_tag, &mut tag).ok())
        .ok_or(BridgeError::SignatureMalformed {
            header: HEADER_SIGNATURE,
        })?;

    let window_secs = window.as_secs();
    if unix_seconds(now).abs_diff(timestamp) > window_secs {
        return Err(BridgeError::SignatureStale);
    }

    request_mac(key, method, path_and_query, timestamp, nonce, body)
        .verify_slice(&tag)
        .map_err(|_| BridgeError::SignatureInvalid)?;

    // Remember the nonce for as long as its timestamp stays acceptable (plus a second for rounding).
    let until_secs = timestamp
        .saturating_add(i64::try_from(window_secs).unwrap_or(i64::MAX))
        .saturating_add(1);
    let expires_at = Timestamp::from_unix_millis(until_secs.saturating_mul(1000));
    if nonces.remember(run_id, nonce, expires_at).await? {
        Ok(())
    } else {
        Err(BridgeError::NonceReplayed)
    }
}

/// The one value of a signature header; missing is "missing", repeated or not text is "malformed".
fn single_header<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, BridgeError> {
    let mut values = headers.get_all(name).iter();
    let value = values
        .next()
        .ok_or(BridgeError::SignatureMissing { header: name })?;
    if values.next().is_some() {
        return Err(BridgeError::SignatureMalformed { header: name });
    }
    value
        .to_str()
        .map_err(|_| BridgeError::SignatureMalformed { header: name })
}

/// Decimal digits only (no sign, no spaces), at most 18 of them so it always fits.
fn parse_timestamp(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > 18 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn is_nonce(text: &str) -> bool {
    (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn request_mac(
    key: &SigningKey,
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> HmacSha256 {
    let body_hash = hex::encode(Sha256::digest(body));
    let canonical = canonical_request(method, path_and_query, timestamp, nonce, &body_hash);
    let mut mac = key.mac();
    mac.update(canonical.as_bytes());
    mac
}

fn unix_seconds(now: Timestamp) -> i64 {
    now.unix_millis().div_euclid(1000)
}

/// `HMAC(secret, label)`, 32 bytes.
fn derive(secret: &[u8], label: &[u8]) -> Result<[u8; KEY_LEN], BridgeError> {
    // HMAC takes keys of any length, so this cannot fail; map it anyway rather than panic.
    let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| BridgeError::SecretTooShort {
        min: MIN_SECRET_LEN,
        actual: secret.len(),
    })?;
    mac.update(label);
    let mut tag = mac.finalize().into_bytes();
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(tag.as_slice());
    tag.as_mut_slice().zeroize();
    Ok(key)
}

/// An HMAC keyed with a 32-byte key. The key is zero-padded to the block size, which is exactly what HMAC does with
/// a short key (RFC 2104), so the MAC equals that of the bare key; the block-sized array makes keying infallible.
fn keyed(key: &[u8; KEY_LEN]) -> HmacSha256 {
    let mut block = Zeroizing::new([0u8; HMAC_BLOCK_LEN]);
    block[..KEY_LEN].copy_from_slice(key);
    <HmacSha256 as KeyInit>::new((&*block).into())
}

// === impl MemoryNonceStore ===

const MIN_SWEEP_AT: usize = 1024;

impl MemoryNonceStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many nonces are remembered right now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.lock().seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryNonces> {
        // A panic while holding the lock cannot leave the map inconsistent: every update is one insert or retain.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl NonceStore for MemoryNonceStore {
    fn remember<'a>(
        &'a self,
        run_id: RunId,
        nonce: &'a str,
        expires_at: Timestamp,
    ) -> BoxFuture<'a, Result<bool, BridgeError>> {
        Box::pin(async move {
            let now = Timestamp::now();
            let mut nonces = self.lock();
            if nonces.seen.len() >= nonces.sweep_at.max(MIN_SWEEP_AT) {
                nonces.seen.retain(|_, expiry| *expiry > now);
                nonces.sweep_at = (nonces.seen.len() * 2).max(MIN_SWEEP_AT);
            }
            // Present means seen, expired or not: the verifier's clock, not this one, decides what is stale, and
            // expired entries only go in a sweep.
            let key = (run_id, nonce.to_owned());
            if nonces.seen.contains_key(&key) {
                return Ok(false);
            }
            nonces.seen.insert(key, expires_at);
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use uuid::Uuid;

    use super::*;

    const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
    const NOW_MILLIS: i64 = 1_700_000_000_123;

    fn secrets() -> BridgeSecrets {
        BridgeSecrets::new(SECRET).unwrap()
    }

    fn run_id() -> RunId {
        RunId::from_uuid(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001))
    }

    fn now() -> Timestamp {
        Timestamp::from_unix_millis(NOW_MILLIS)
    }

    fn headers_of(signed: &SignatureHeaders) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_TIMESTAMP, HeaderValue::from(signed.timestamp));
        headers.insert(HEADER_NONCE, signed.nonce.parse().unwrap());
        headers.insert(HEADER_SIGNATURE, signed.signature.parse().unwrap());
        headers
    }

    async fn check(
        key: &SigningKey,
        method: &str,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
        now: Timestamp,
        nonces: &MemoryNonceStore,
    ) -> Result<(), BridgeError> {
        verify(
            key,
            method,
            path_and_query,
            headers,
            body,
            now,
            DEFAULT_SIGNATURE_WINDOW,
            run_id(),
            nonces,
        )
        .await
    }

    #[test]
    fn canonical_request_is_the_documented_text() {
        let body_hash = hex::encode(Sha256::digest(b"{}"));
        assert_eq!(
            body_hash,
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(
            canonical_request(
                "POST",
                "/api/agent/events?x=1",
                1_700_000_000,
                "AAAAAAAAAAAAAAAAAAAAAA",
                &body_hash
            ),
            "v1\nPOST\n/api/agent/events?x=1\n1700000000\nAAAAAAAAAAAAAAAAAAAAAA\n\
             44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    /// Known answers computed independently (Python's `hmac`): replicas and future versions must derive the same
    /// keys and signatures from the same secret.
    #[test]
    fn derivations_and_signatures_match_known_answers() {
        let secrets = secrets();
        assert_eq!(
            secrets.upstream_token(run_id()).expose_secret(),
            "bru1.01900000-0000-7000-8000-000000000001.\
             S5eEc0QksnbU4DyMYid0c5SdnLZ-bYC5djuXrjW6mvo"
        );
        let key = secrets.signing_key(run_id());
        assert_eq!(
            hex::encode(key.bytes),
            "86832c17d779cb18d89c275aeedd6b7a3b4f6e392e7ec02542f93066990f2b30"
        );
        let mac = request_mac(
            &key,
            "POST",
            "/api/agent/events?x=1",
            1_700_000_000,
            "AAAAAAAAAAAAAAAAAAAAAA",
            b"{}",
        );
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "4c48505bf4205c2f9545637cff1ac39ac8ee1cdf9c325aa07ad3be4c73b544ba"
        );
    }

    #[tokio::test]
    async fn signed_requests_verify_once() {
        let key = secrets().signing_key(run_id());
        let nonces = MemoryNonceStore::new();
        let signed = sign(&key, "POST", "/api/agent/events?x=1", b"{\"a\":1}", now());
        assert_eq!(signed.timestamp, NOW_MILLIS / 1000);
        assert!(signed.signature.starts_with("v1="));
        assert_eq!(signed.signature.len(), 3 + 64);
        assert!(URL_SAFE_NO_PAD.decode(&signed.nonce).unwrap().len() >= 16);
        let headers = headers_of(&signed);
        check(
            &key,
            "POST",
            "/api/agent/events?x=1",
            &headers,
            b"{\"a\":1}",
            now(),
            &nonces,
        )
        .await
        .unwrap();
        assert_eq!(nonces.len(), 1);

        // The same request again is a replay, even though everything else checks out.
        let err = check(
            &key,
            "POST",
            "/api/agent/events?x=1",
            &headers,
            b"{\"a\":1}",
            now(),
            &nonces,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BridgeError::NonceReplayed), "{err:?}");
        assert_eq!(err.code(), "nonce_replayed");
    }

    #[tokio::test]
    async fn tampering_with_any_part_is_detected() {
        let secrets = secrets();
        let key = secrets.signing_key(run_id());
        let nonces = MemoryNonceStore::new();
        let signed = sign(&key, "POST", "/api/agent/events?x=1", b"{\"a\":1}", now());
        let headers = headers_of(&signed);

        for (method, path_and_query, body) in [
            ("PUT", "/api/agent/events?x=1", &b"{\"a\":1}"[..]),
            ("POST", "/api/agent/run?x=1", &b"{\"a\":1}"[..]),
            ("POST", "/api/agent/events?x=2", &b"{\"a\":1}"[..]),
            ("POST", "/api/agent/events", &b"{\"a\":1}"[..]),
            ("POST", "/api/agent/events?x=1", &b"{\"a\":2}"[..]),
            ("POST", "/api/agent/events?x=1", &b""[..]),
        ] {
            let err = check(&key, method, path_and_query, &headers, body, now(), &nonces)
                .await
                .unwrap_err();
            assert!(
                matches!(err, BridgeError::SignatureInvalid),
                "{method} {path_and_query}: {err:?}"
            );
        }

        // A changed timestamp (still within the window) or nonce breaks the MAC.
        let mut moved = headers.clone();
        moved.insert(HEADER_TIMESTAMP, HeaderValue::from(signed.timestamp + 1));
        let mut renonced = headers.clone();
        renonced.insert(
            HEADER_NONCE,
            HeaderValue::from_static("BBBBBBBBBBBBBBBBBBBBBB"),
        );
        let mut flipped = headers.clone();
        let mut signature = signed.signature.clone().into_bytes();
        let last = signature.len() - 1;
        signature[last] = if signature[last] == b'0' { b'1' } else { b'0' };
        flipped.insert(
            HEADER_SIGNATURE,
            HeaderValue::from_bytes(&signature).unwrap(),
        );
        for tampered in [moved, renonced, flipped] {
            let err = check(
                &key,
                "POST",
                "/api/agent/events?x=1",
                &tampered,
                b"{\"a\":1}",
                now(),
                &nonces,
            )
            .await
            .unwrap_err();
            assert!(matches!(err, BridgeError::SignatureInvalid), "{err:?}");
        }

        // Another run's key does not verify this run's requests.
        let other = secrets.signing_key(RunId::new());
        let err = check(
            &other,
            "POST",
            "/api/agent/events?x=1",
            &headers,
            b"{\"a\":1}",
            now(),
            &nonces,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BridgeError::SignatureInvalid), "{err:?}");

        // Nothing failed verification is remembered: the genuine request still goes through once.
        assert!(nonces.is_empty());
        check(
            &key,
            "POST",
            "/api/agent/events?x=1",
            &headers,
            b"{\"a\":1}",
            now(),
            &nonces,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn stale_timestamps_are_refused_before_the_mac_or_nonce() {
        let key = secrets().signing_key(run_id());
        let nonces = MemoryNonceStore::new();
        let signed = sign(&key, "GET", "/api/agent/run", b"", now());
        let headers = headers_of(&signed);
        let window = DEFAULT_SIGNATURE_WINDOW;
        let edge = now().saturating_add(window);
        for late in [
            edge.saturating_add(Duration::from_secs(1)),
            Timestamp::from_unix_millis(NOW_MILLIS - 301_000),
        ] {
            let err = check(&key, "GET", "/api/agent/run", &headers, b"", late, &nonces)
                .await
                .unwrap_err();
            assert!(matches!(err, BridgeError::SignatureStale), "{err:?}");
            assert_eq!(err.code(), "signature_stale");
        }
        assert!(nonces.is_empty());
        // At the edge of the window it is still accepted.
        check(&key, "GET", "/api/agent/run", &headers, b"", edge, &nonces)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn missing_and_malformed_headers_are_told_apart() {
        let key = secrets().signing_key(run_id());
        let nonces = MemoryNonceStore::new();
        let signed = sign(&key, "GET", "/api/agent/run", b"", now());
        let good = headers_of(&signed);

        for name in [HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE] {
            let mut missing = good.clone();
            missing.remove(name);
            let err = check(&key, "GET", "/api/agent/run", &missing, b"", now(), &nonces)
                .await
                .unwrap_err();
            assert!(
                matches!(err, BridgeError::SignatureMissing { header } if header == name),
                "{err:?}"
            );

            let mut repeated = good.clone();
            let value = good.get(name).unwrap().clone();
            repeated.append(name, value);
            let err = check(
                &key,
                "GET",
                "/api/agent/run",
                &repeated,
                b"",
                now(),
                &nonces,
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err, BridgeError::SignatureMalformed { header } if header == name),
                "{err:?}"
            );
        }

        for (name, bad) in [
            (HEADER_TIMESTAMP, "-1"),
            (HEADER_TIMESTAMP, "+1700000000"),
            (HEADER_TIMESTAMP, "1700000000.5"),
            (HEADER_TIMESTAMP, "99999999999999999999"),
            (HEADER_NONCE, "short"),
            (HEADER_NONCE, "not base64url but long enough!"),
            (HEADER_SIGNATURE, "v2=00"),
            (HEADER_SIGNATURE, "v1=zz"),
            (HEADER_SIGNATURE, "v1=00"),
            (
                HEADER_SIGNATURE,
                "0000000000000000000000000000000000000000000000000000000000000000",
            ),
        ] {
            let mut headers = good.clone();
            headers.insert(name, HeaderValue::from_static(bad));
            let err = check(&key, "GET", "/api/agent/run", &headers, b"", now(), &nonces)
                .await
                .unwrap_err();
            assert!(
                matches!(err, BridgeError::SignatureMalformed { header } if header == name),
                "{name}: {bad}: {err:?}"
            );
            assert_eq!(err.code(), "signature_malformed");
        }
        assert!(nonces.is_empty());
    }

    #[test]
    fn upstream_tokens_round_trip_and_resist_forgery() {
        let secrets = secrets();
        let run = RunId::new();
        let token = secrets.upstream_token(run);
        let token = token.expose_secret();
        assert!(token.starts_with("bru1."));
        assert_eq!(token.len(), UPSTREAM_TOKEN_LEN);
        assert_eq!(secrets.verify_upstream_token(token).unwrap(), run);

        // Another run's id under this tag, or this run under another server's key: invalid.
        let (_, tag) = token.rsplit_once('.').unwrap();
        let moved = format!("bru1.{}.{tag}", RunId::new());
        assert!(matches!(
            secrets.verify_upstream_token(&moved),
            Err(BridgeError::UpstreamTokenInvalid)
        ));
        let other = BridgeSecrets::new(&[9u8; 40]).unwrap().upstream_token(run);
        assert!(matches!(
            secrets.verify_upstream_token(other.expose_secret()),
            Err(BridgeError::UpstreamTokenInvalid)
        ));
        // An uppercase spelling of the same run id is a different text, so its tag does not match.
        let upper = token.replacen(&run.to_string(), &run.to_string().to_uppercase(), 1);
        if upper != token {
            assert!(secrets.verify_upstream_token(&upper).is_err());
        }

        for garbage in [
            "",
            "bru1.",
            "Bearer x",
            &token[..token.len() - 1],
            &format!("{token}A"),
            &token.replacen("bru1.", "bru2.", 1),
            &token.replacen('-', "_", 1),
        ] {
            let err = secrets.verify_upstream_token(garbage).unwrap_err();
            assert!(
                matches!(err, BridgeError::UpstreamTokenMalformed),
                "{garbage}: {err:?}"
            );
        }

        // A run credential is not an upstream token, and the other way round.
        let credential = secrets
            .credential_issuer()
            .mint(run, now().saturating_add(Duration::from_secs(60)));
        assert!(
            secrets
                .verify_upstream_token(credential.expose_secret())
                .is_err()
        );
        assert!(secrets.credential_issuer().verify(token, now()).is_err());
    }

    #[test]
    fn keys_are_per_run_and_per_secret_and_never_printed() {
        let secrets = secrets();
        let a = secrets.signing_key(run_id());
        let b = secrets.signing_key(RunId::new());
        assert_ne!(a.bytes, b.bytes);
        assert_eq!(a.bytes, secrets.signing_key(run_id()).bytes);
        let other = BridgeSecrets::new(&[3u8; 32]).unwrap();
        assert_ne!(a.bytes, other.signing_key(run_id()).bytes);
        assert!(format!("{a:?}").contains("REDACTED"));
        assert!(format!("{secrets:?}").contains("REDACTED"));
        assert!(matches!(
            BridgeSecrets::new(&[1u8; 31]),
            Err(BridgeError::SecretTooShort { .. })
        ));
    }

    #[tokio::test]
    async fn memory_nonces_expire_and_stay_bounded() {
        let store = MemoryNonceStore::new();
        let run = RunId::new();
        let past = Timestamp::from_unix_millis(1);
        for i in 0..5000 {
            assert!(store.remember(run, &format!("n{i}"), past).await.unwrap());
        }
        // Expired entries were swept as new ones arrived.
        assert!(store.len() <= 2 * MIN_SWEEP_AT, "{}", store.len());
        // A nonce still held is a replay, expired or not; a swept one was forgotten.
        assert!(!store.remember(run, "n4999", past).await.unwrap());
        assert!(store.remember(run, "n0", past).await.unwrap());
        let future = Timestamp::now().saturating_add(Duration::from_secs(60));
        assert!(store.remember(run, "fresh", future).await.unwrap());
        assert!(!store.remember(run, "fresh", future).await.unwrap());
        // Nonces are per run.
        assert!(store.remember(RunId::new(), "fresh", future).await.unwrap());
    }
}
