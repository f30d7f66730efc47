//! Token digests: how the admin token and company API keys are kept and looked up.
//!
//! Only the SHA-256 of a token is stored (the database never holds a usable token, the server does not keep the
//! admin token in memory). Its own module because the shared state (`state`) digests the admin token at start-up,
//! the API (`api::auth`, `api::companies`) digests presented and issued tokens, and state must not import the API.

use sha2::{Digest, Sha256};

/// SHA-256 of a token: how the admin token is kept in memory and compared (in constant time).
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// SHA-256 of a token, hex encoded: how API keys are stored and looked up.
pub fn token_digest_hex(token: &str) -> String {
    hex::encode(token_digest(token))
}
