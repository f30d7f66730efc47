//! The errors of the bridge crate.
//!
//! One enum for everything the bridge can refuse or fail at. Each variant has a stable snake_case [`code`] (the
//! wire contract, and what the audit log records), a [`kind`] the server maps onto its own statuses, and a
//! [`status`] the bridge itself uses for the error responses it writes to the agent.
//!
//! Messages never carry a credential, a body, a query string or an upstream's internal error text.
//!
//! [`code`]: BridgeError::code
//! [`kind`]: BridgeError::kind
//! [`status`]: BridgeError::status

use berth_core::ErrorKind;
use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The server secret the bridge keys are derived from is too short to key an HMAC safely.
    #[error("the bridge signing secret must be at least {min} bytes long, got {actual}")]
    SecretTooShort { min: usize, actual: usize },

    // --- The agent's run credential.
    /// No `Authorization: Bearer` header at all.
    #[error("a run credential is required (Authorization: Bearer)")]
    CredentialMissing,

    /// Not a berth run credential at all: wrong prefix, bad encoding, wrong length, not a Bearer token.
    #[error("the run credential is malformed")]
    CredentialMalformed,

    /// Well formed, but not signed by this server.
    #[error("the run credential is not valid")]
    CredentialInvalid,

    #[error("the run credential has expired")]
    CredentialExpired,

    /// A genuine credential, but for another run than the one this bridge serves.
    #[error("the run credential is not valid for this run")]
    CredentialWrongRun,

    /// A genuine credential for this run, but the run is over.
    #[error("the run has ended")]
    RunEnded,

    // --- The run's upstream token (`bru1.`), checked by the server.
    #[error("the upstream token is malformed")]
    UpstreamTokenMalformed,

    #[error("the upstream token is not valid")]
    UpstreamTokenInvalid,

    // --- The agent's request.
    /// The request target is not an origin-form path the bridge is willing to match.
    #[error("the request path was rejected: {reason}")]
    PathRejected { reason: &'static str },

    #[error("route not allowed: {method} {path}")]
    RouteNotAllowed { method: String, path: String },

    /// The run already has as many requests in flight as its policy allows.
    #[error("too many requests in flight for this run")]
    TooManyRequests,

    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },

    #[error("request bodies must be JSON (application/json or application/*+json)")]
    UnsupportedMediaType,

    /// The agent's request body could not be read (the connection broke, a malformed chunk).
    #[error("the request body could not be read")]
    RequestBodyUnreadable,

    /// The listener is shutting down and takes no new requests.
    #[error("the bridge is shutting down")]
    ShuttingDown,

    // --- The upstream API.
    #[error("the upstream API did not answer in time")]
    UpstreamTimeout,

    /// Connection refused, reset, or a malformed response. The detail goes to the log, not to the agent.
    #[error("the upstream API is unavailable")]
    UpstreamUnavailable,

    #[error("the upstream response is larger than {limit} bytes")]
    UpstreamResponseTooLarge { limit: u64 },

    /// The bridge was built with something it cannot use (an upstream that is not an `http://` base URL, a token
    /// that cannot be a header value). A server bug, never the agent's fault.
    #[error("the bridge is misconfigured: {what}")]
    Misconfigured { what: &'static str },

    // --- Request signatures, checked by the server.
    #[error("the request signature header `{header}` is missing")]
    SignatureMissing { header: &'static str },

    #[error("the request signature header `{header}` is malformed")]
    SignatureMalformed { header: &'static str },

    #[error("the request signature timestamp is outside the accepted window")]
    SignatureStale,

    #[error("the request signature is not valid")]
    SignatureInvalid,

    #[error("the request nonce has been used before")]
    NonceReplayed,

    /// The [`NonceStore`](crate::signing::NonceStore) could not answer (its database is down).
    #[error("the nonce store is unavailable: {message}")]
    NonceStoreUnavailable { message: String },

    // --- Configuration and IO.
    #[error("invalid bridge policy: {message}")]
    InvalidPolicy { message: String },

    #[error("bridge IO error: {0}")]
    Io(#[from] std::io::Error),
}

// === impl BridgeError ===

impl BridgeError {
    /// The stable, snake_case code of this error: part of the API contract.
    pub fn code(&self) -> &'static str {
        match self {
            BridgeError::SecretTooShort { .. } => "bridge_secret_too_short",
            BridgeError::CredentialMissing => "credential_missing",
            BridgeError::CredentialMalformed => "credential_malformed",
            BridgeError::CredentialInvalid => "credential_invalid",
            BridgeError::CredentialExpired => "credential_expired",
            BridgeError::CredentialWrongRun => "credential_wrong_run",
            BridgeError::RunEnded => "run_ended",
            BridgeError::UpstreamTokenMalformed => "upstream_token_malformed",
            BridgeError::UpstreamTokenInvalid => "upstream_token_invalid",
            BridgeError::PathRejected { .. } => "path_rejected",
            BridgeError::RouteNotAllowed { .. } => "route_not_allowed",
            BridgeError::TooManyRequests => "too_many_requests",
            BridgeError::PayloadTooLarge { .. } => "payload_too_large",
            BridgeError::UnsupportedMediaType => "unsupported_media_type",
            BridgeError::RequestBodyUnreadable => "request_body_unreadable",
            BridgeError::ShuttingDown => "bridge_shutting_down",
            BridgeError::UpstreamTimeout => "upstream_timeout",
            BridgeError::UpstreamUnavailable => "upstream_unavailable",
            BridgeError::UpstreamResponseTooLarge { .. } => "upstream_response_too_large",
            BridgeError::Misconfigured { .. } => "bridge_misconfigured",
            BridgeError::SignatureMissing { .. } => "signature_missing",
            BridgeError::SignatureMalformed { .. } => "signature_malformed",
            BridgeError::SignatureStale => "signature_stale",
            BridgeError::SignatureInvalid => "signature_invalid",
            BridgeError::NonceReplayed => "nonce_replayed",
            BridgeError::NonceStoreUnavailable { .. } => "nonce_store_unavailable",
            BridgeError::InvalidPolicy { .. } => "invalid_policy",
            BridgeError::Io(_) => "io",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            // Startup misconfigurations and bugs of the server, never the caller's fault.
            BridgeError::SecretTooShort { .. }
            | BridgeError::Misconfigured { .. }
            | BridgeError::Io(_) => ErrorKind::Internal,
            BridgeError::CredentialMissing
            | BridgeError::CredentialMalformed
            | BridgeError::CredentialInvalid
            | BridgeError::CredentialExpired
            | BridgeError::CredentialWrongRun
            | BridgeError::RunEnded
            | BridgeError::UpstreamTokenMalformed
            | BridgeError::UpstreamTokenInvalid
            | BridgeError::SignatureMissing { .. }
            | BridgeError::SignatureMalformed { .. }
            | BridgeError::SignatureStale
            | BridgeError::SignatureInvalid
            | BridgeError::NonceReplayed => ErrorKind::Unauthenticated,
            BridgeError::PathRejected { .. } | BridgeError::RequestBodyUnreadable => {
                ErrorKind::InvalidRequest
            }
            BridgeError::RouteNotAllowed { .. } => ErrorKind::Forbidden,
            BridgeError::PayloadTooLarge { .. } => ErrorKind::PayloadTooLarge,
            BridgeError::UnsupportedMediaType => ErrorKind::UnsupportedMediaType,
            BridgeError::TooManyRequests
            | BridgeError::ShuttingDown
            | BridgeError::UpstreamTimeout
            | BridgeError::UpstreamUnavailable
            | BridgeError::UpstreamResponseTooLarge { .. }
            | BridgeError::NonceStoreUnavailable { .. } => ErrorKind::Unavailable,
            BridgeError::InvalidPolicy { .. } => ErrorKind::Validation,
        }
    }

    /// The HTTP status the bridge answers the agent with: the status of its [`kind`](Self::kind)
    /// ([`ErrorKind::http_status`]), overridden only where a gateway status says more than the kind's 503
    /// (`Unavailable`): an upstream failure is 502, an upstream timeout 504.
    pub fn status(&self) -> StatusCode {
        match self {
            BridgeError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            BridgeError::UpstreamUnavailable | BridgeError::UpstreamResponseTooLarge { .. } => {
                StatusCode::BAD_GATEWAY
            }
            // Everything else: the status of its kind, the same table the server answers with.
            _ => StatusCode::from_u16(self.kind().http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn credential_errors_are_unauthenticated_with_stable_codes() {
        for (error, code) in [
            (BridgeError::CredentialMissing, "credential_missing"),
            (BridgeError::CredentialMalformed, "credential_malformed"),
            (BridgeError::CredentialInvalid, "credential_invalid"),
            (BridgeError::CredentialExpired, "credential_expired"),
            (BridgeError::CredentialWrongRun, "credential_wrong_run"),
            (BridgeError::RunEnded, "run_ended"),
        ] {
            assert_eq!(error.code(), code);
            assert_eq!(error.kind(), ErrorKind::Unauthenticated);
            assert_eq!(error.status(), StatusCode::UNAUTHORIZED);
        }
        let short = BridgeError::SecretTooShort { min: 32, actual: 3 };
        assert_eq!(short.code(), "bridge_secret_too_short");
        assert_eq!(short.kind(), ErrorKind::Internal);
    }

    #[test]
    fn request_errors_have_the_documented_statuses() {
        for (error, code, status) in [
            (
                BridgeError::PathRejected { reason: "x" },
                "path_rejected",
                400,
            ),
            (
                BridgeError::RouteNotAllowed {
                    method: "GET".into(),
                    path: "/x".into(),
                },
                "route_not_allowed",
                403,
            ),
            (BridgeError::TooManyRequests, "too_many_requests", 503),
            (
                BridgeError::PayloadTooLarge { limit: 1 },
                "payload_too_large",
                413,
            ),
            (
                BridgeError::UnsupportedMediaType,
                "unsupported_media_type",
                415,
            ),
            (BridgeError::UpstreamTimeout, "upstream_timeout", 504),
            (
                BridgeError::UpstreamUnavailable,
                "upstream_unavailable",
                502,
            ),
            (
                BridgeError::UpstreamResponseTooLarge { limit: 1 },
                "upstream_response_too_large",
                502,
            ),
            (BridgeError::ShuttingDown, "bridge_shutting_down", 503),
        ] {
            assert_eq!(error.code(), code);
            assert_eq!(error.status().as_u16(), status, "{code}");
        }
    }

    #[test]
    fn signature_errors_have_distinct_codes() {
        let errors = [
            BridgeError::SignatureMissing { header: "h" },
            BridgeError::SignatureMalformed { header: "h" },
            BridgeError::SignatureStale,
            BridgeError::SignatureInvalid,
            BridgeError::NonceReplayed,
        ];
        let codes: HashSet<_> = errors.iter().map(BridgeError::code).collect();
        assert_eq!(codes.len(), errors.len());
        for error in &errors {
            assert_eq!(error.kind(), ErrorKind::Unauthenticated);
        }
    }
}
