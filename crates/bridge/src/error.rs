//! The errors of the bridge crate.

use berth_core::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The server secret the issuer was built from is too short to key an HMAC safely.
    #[error("the bridge signing secret must be at least {min} bytes long, got {actual}")]
    SecretTooShort { min: usize, actual: usize },

    /// Not a berth run credential at all: wrong prefix, bad encoding, wrong length.
    #[error("the run credential is malformed")]
    CredentialMalformed,

    /// Well formed, but not signed by this server.
    #[error("the run credential is not valid")]
    CredentialInvalid,

    #[error("the run credential has expired")]
    CredentialExpired,
}

// === impl BridgeError ===

impl BridgeError {
    /// The stable, snake_case code of this error: part of the API contract.
    pub fn code(&self) -> &'static str {
        match self {
            BridgeError::SecretTooShort { .. } => "bridge_secret_too_short",
            BridgeError::CredentialMalformed => "credential_malformed",
            BridgeError::CredentialInvalid => "credential_invalid",
            BridgeError::CredentialExpired => "credential_expired",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            // A startup misconfiguration of the server, never the caller's fault.
            BridgeError::SecretTooShort { .. } => ErrorKind::Internal,
            BridgeError::CredentialMalformed
            | BridgeError::CredentialInvalid
            | BridgeError::CredentialExpired => ErrorKind::Unauthenticated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_errors_are_unauthenticated_with_stable_codes() {
        for (error, code) in [
            (BridgeError::CredentialMalformed, "credential_malformed"),
            (BridgeError::CredentialInvalid, "credential_invalid"),
            (BridgeError::CredentialExpired, "credential_expired"),
        ] {
            assert_eq!(error.code(), code);
            assert_eq!(error.kind(), ErrorKind::Unauthenticated);
        }
        let short = BridgeError::SecretTooShort { min: 32, actual: 3 };
        assert_eq!(short.code(), "bridge_secret_too_short");
        assert_eq!(short.kind(), ErrorKind::Internal);
    }
}
