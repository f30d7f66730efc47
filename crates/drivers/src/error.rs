//! The errors of the drivers crate.
//!
//! Probes never use these: a probe's failure is a result (`ok: false`), because "the host is unreachable" is an answer,
//! not an error. These are for the operations that can genuinely fail: registering providers now, and acquiring,
//! running and releasing later.

use std::io;

use berth_core::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("sandbox provider `{key}` is not installed (installed: {})", installed_list(.installed))]
    ProviderNotInstalled { key: String, installed: Vec<String> },

    #[error("a sandbox provider with key `{key}` is already registered")]
    DuplicateProvider { key: String },

    /// A provider's own spec is broken (bad key, schema that does not compile).
    #[error("invalid sandbox provider")]
    InvalidProvider(#[source] berth_core::Error),

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

// === impl DriverError ===

impl DriverError {
    /// The stable, snake_case code of this error: part of the API contract.
    pub fn code(&self) -> &'static str {
        match self {
            DriverError::ProviderNotInstalled { .. } => "provider_not_installed",
            DriverError::DuplicateProvider { .. } => "duplicate_provider",
            DriverError::InvalidProvider(_) => "invalid_provider",
            DriverError::Io { .. } => "driver_io_error",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            // The environment names a provider this build lacks; installing it (or a plugin) would fix that.
            DriverError::ProviderNotInstalled { .. } => ErrorKind::Unavailable,
            DriverError::DuplicateProvider { .. } => ErrorKind::Conflict,
            DriverError::InvalidProvider(_) | DriverError::Io { .. } => ErrorKind::Internal,
        }
    }
}

impl From<berth_core::Error> for DriverError {
    fn from(error: berth_core::Error) -> Self {
        DriverError::InvalidProvider(error)
    }
}

/// Renders installed provider keys for messages; "none" rather than an empty pair of parentheses.
pub(crate) fn installed_list(installed: &[String]) -> String {
    if installed.is_empty() {
        "none".to_owned()
    } else {
        installed.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_kinds_are_stable() {
        let missing = DriverError::ProviderNotInstalled {
            key: "e2b".to_owned(),
            installed: vec!["fake".to_owned()],
        };
        assert_eq!(missing.code(), "provider_not_installed");
        assert_eq!(missing.kind(), ErrorKind::Unavailable);
        assert_eq!(
            missing.to_string(),
            "sandbox provider `e2b` is not installed (installed: fake)"
        );
        let none = DriverError::ProviderNotInstalled {
            key: "e2b".to_owned(),
            installed: Vec::new(),
        };
        assert!(none.to_string().ends_with("(installed: none)"));

        let duplicate = DriverError::DuplicateProvider {
            key: "fake".to_owned(),
        };
        assert_eq!(duplicate.code(), "duplicate_provider");
        assert_eq!(duplicate.kind(), ErrorKind::Conflict);

        let io = DriverError::Io {
            context: "reading the workspace root".to_owned(),
            source: io::Error::other("boom"),
        };
        assert_eq!(io.code(), "driver_io_error");
        assert_eq!(io.kind(), ErrorKind::Internal);
    }
}
