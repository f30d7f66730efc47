//! Error kinds shared by every crate, and the errors of `berth-core` itself.
//!
//! [`ErrorKind`] is the classification every edge turns into an HTTP status, and it carries that status itself
//! ([`ErrorKind::http_status`]): the one table between the domain and HTTP. Each library crate has its own error enum
//! whose variants carry a stable snake_case `code()` (the wire contract) and a `kind()`.

use crate::validation::ValidationErrors;

/// How an error is classified at the edge. Each kind has one HTTP status, [`ErrorKind::http_status`].
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

impl ErrorKind {
    /// The HTTP status code of this kind: the single mapping between the domain and HTTP, used by the server's API
    /// and by the bridge.
    ///
    /// A bare `u16`, so this crate needs no HTTP dependency; the edges convert it (`http::StatusCode::from_u16`).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::Validation => 422,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind with the status it has always had: changing one changes the API.
    const STATUSES: [(ErrorKind, u16); 11] = [
        (ErrorKind::InvalidRequest, 400),
        (ErrorKind::Unauthenticated, 401),
        (ErrorKind::Forbidden, 403),
        (ErrorKind::NotFound, 404),
        (ErrorKind::MethodNotAllowed, 405),
        (ErrorKind::Conflict, 409),
        (ErrorKind::PayloadTooLarge, 413),
        (ErrorKind::UnsupportedMediaType, 415),
        (ErrorKind::Validation, 422),
        (ErrorKind::Unavailable, 503),
        (ErrorKind::Internal, 500),
    ];

    #[test]
    fn every_kind_maps_to_its_http_status() {
        for (kind, status) in STATUSES {
            assert_eq!(kind.http_status(), status, "{kind:?}");
        }
    }

    /// A new kind fails to compile here until it gets a row in `STATUSES`.
    fn row(kind: ErrorKind) -> usize {
        match kind {
            ErrorKind::InvalidRequest => 0,
            ErrorKind::Unauthenticated => 1,
            ErrorKind::Forbidden => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::MethodNotAllowed => 4,
            ErrorKind::Conflict => 5,
            ErrorKind::PayloadTooLarge => 6,
            ErrorKind::UnsupportedMediaType => 7,
            ErrorKind::Validation => 8,
            ErrorKind::Unavailable => 9,
            ErrorKind::Internal => 10,
        }
    }

    #[test]
    fn the_table_lists_every_kind_once() {
        for (index, (kind, _)) in STATUSES.into_iter().enumerate() {
            assert_eq!(row(kind), index, "{kind:?}");
        }
    }
}
