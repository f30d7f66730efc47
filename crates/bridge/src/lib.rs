//! berth-bridge: how a running agent reaches the berth API without ever holding a server credential.
//!
//! A run's agent gets `BERTH_API_URL` (a loopback URL served by a [`Bridge`]), `BERTH_API_TOKEN` (a run credential,
//! [`credential`]) and `BERTH_RUN_ID`. The bridge authenticates the agent, enforces the run's [`BridgePolicy`], and
//! forwards allowed requests upstream with the run's own upstream token and a request signature ([`signing`]), which
//! the server checks with [`signing::verify`].
//!
//! Unlike the reference system's bridge (a file queue polled every 100 ms and drained one request at a time), this
//! one streams: each request is forwarded the moment it arrives, concurrently with the others, over HTTP/1.1 or
//! HTTP/2, on TCP, a Unix socket or any byte stream.

pub mod credential;
pub mod error;
pub mod policy;
pub mod service;
pub mod signing;

pub use credential::{CredentialIssuer, RunCredential};
pub use error::BridgeError;
pub use policy::{BridgePolicy, EnvNames, RouteRule, normalize_path};
pub use service::{AuditEntry, AuditSink, Bridge, BridgeConfig, BridgeListener, RunGate};
pub use signing::{
    BridgeSecrets, DEFAULT_SIGNATURE_WINDOW, HEADER_NONCE, HEADER_RUN_ID, HEADER_SIGNATURE,
    HEADER_TIMESTAMP, MemoryNonceStore, NonceStore, SignatureHeaders, SigningKey,
    canonical_request, sign, verify,
};
