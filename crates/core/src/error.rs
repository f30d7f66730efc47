//! Error kinds shared by every crate, and the errors of `berth-core` itself.
//!
//! [`ErrorKind`] is the classification the server maps onto HTTP statuses, in exactly one place. Each library crate
//! has its own error enum whose variants carry a stable snake_case `code()` (the wire contract) and a `kind()`.

use crate::validation::ValidationErrors;

/// How an error is classified at the edge. The server maps each kind onto one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed (bad JSON, bad id, bad query).
    InvalidRequest,
    /// No credential, or one that is unknown, revoked or expired.
    Unauthenticated,
    /// A valid credential without the right to do this.
    Forbidden,
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// The request conflicts with the current state (a second local environment, a duplicate name).
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    /// The request is well formed but its content is invalid; carries per-field details.
    Validation,
    /// A dependency (database, provider, host) is unavailable; retrying later may work.
    Unavailable,
    /// A bug or an unexpected failure. Never shown with internal detail.
    Internal,
}

/// Errors raised by the pure domain logic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what} id `{value}`")]
    InvalidId { what: &'static str, value: String },

    #[error("{0}")]
    Validation(ValidationErrors),

    #[error("invalid config schema for sandbox provider `{provider}`: {message}")]
    InvalidProviderSchema { provider: String, message: String },
}

impl Error {
    /// The stable, snake_case code of this error: part of the API contract.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidId { .. } => "invalid_id",
            Error::Validation(_) => "validation_failed",
            Error::InvalidProviderSchema { .. } => "invalid_provider_schema",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidId { .. } => ErrorKind::InvalidRequest,
            Error::Validation(_) => ErrorKind::Validation,
            Error::InvalidProviderSchema { .. } => ErrorKind::Internal,
        }
    }
}

impl From<ValidationErrors> for Error {
    fn from(errors: ValidationErrors) -> Self {
        Error::Validation(errors)
    }
}
