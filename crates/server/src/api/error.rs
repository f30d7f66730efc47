//! The one place where errors become HTTP responses.
//!
//! Every error that can reach a client is classified by an [`ErrorKind`], whose status is
//! [`ErrorKind::http_status`]; [`status_for`] turns it into a `StatusCode`.
//! Internal errors are logged with their full chain and answered with a generic message: no SQL, no paths, no
//! secrets ever reach a response body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_core::ErrorKind;
use berth_core::validation::{FieldError, ValidationErrors};
use serde::Serialize;

use crate::error_chain::DisplayChain;
use crate::host_policy::HostPolicyError;
use crate::runs::AcceptError;
use crate::secrets::SecretsError;
use crate::vault::VaultError;
use berth_store::StoreError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    kind: ErrorKind,
    code: &'static str,
    message: String,
    details: Vec<FieldError>,
}

/// The status for each kind of error. The table itself is [`ErrorKind::http_status`], shared with the bridge; this is
/// only its conversion into axum's type.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    // Every code in the table is a valid status, so the fallback is never taken.
    StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl ApiError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthenticated, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, "forbidden", message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            ErrorKind::NotFound,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, code, message)
    }

    pub fn validation(errors: ValidationErrors) -> Self {
        Self {
            kind: ErrorKind::Validation,
            code: "validation_failed",
            message: errors.to_string(),
            details: errors.errors().to_vec(),
        }
    }

    /// An unexpected failure. The cause is logged here and never sent.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %DisplayChain(cause), "internal error");
        Self::new(ErrorKind::Internal, "internal_error", "internal error")
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The error body of every failed request (API.md §2).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub(crate) struct ErrorBody<'a> {
    error: ErrorPayload<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorPayload)]
pub(crate) struct ErrorPayload<'a> {
    /// A stable snake_case code (`validation_failed`, `not_found`, ...).
    code: &'a str,
    /// What went wrong, for people. Never a secret, an internal detail or SQL.
    message: &'a str,
    /// For `validation_failed`: every problem, each at the path of the field in the request body.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    details: Vec<DetailPayload<'a>>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorDetail)]
pub(crate) struct DetailPayload<'a> {
    /// `config.port`, `command.0`; empty for the body as a whole.
    path: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_for(self.kind);
        let body = ErrorBody {
            error: ErrorPayload {
                code: self.code,
                message: &self.message,
                details: self
                    .details
                    .iter()
                    .map(|detail| DetailPayload {
                        path: &detail.path,
                        message: &detail.message,
                    })
                    .collect(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ValidationErrors> for ApiError {
    fn from(errors: ValidationErrors) -> Self {
        ApiError::validation(errors)
    }
}

impl From<berth_core::Error> for ApiError {
    fn from(error: berth_core::Error) -> Self {
        match error {
            berth_core::Error::Validation(errors) => ApiError::validation(errors),
            other if other.kind() == ErrorKind::Internal => ApiError::internal(&other),
            other => ApiError::new(other.kind(), other.code(), other.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error.kind() {
            ErrorKind::Internal => ApiError::internal(&error),
            ErrorKind::Unavailable => {
                tracing::warn!(error = %DisplayChain(&error), "database unavailable");
                ApiError::new(
                    ErrorKind::Unavailable,
                    error.code(),
                    "the database is unavailable; retry later",
                )
            }
            kind => ApiError::new(kind, error.code(), error.to_string()),
        }
    }
}

impl From<berth_bridge::BridgeError> for ApiError {
    fn from(error: berth_bridge::BridgeError) -> Self {
        match error.kind() {
            ErrorKind::Internal => ApiError::internal(&error),
            kind => ApiError::new(kind, error.code(), error.to_string()),
        }
    }
}

impl From<SecretsError> for ApiError {
    fn from(error: SecretsError) -> Self {
        match error.kind() {
            ErrorKind::Internal => ApiError::internal(&error),
            kind => ApiError::new(kind, error.code(), error.to_string()),
        }
    }
}

impl From<VaultError> for ApiError {
    fn from(error: VaultError) -> Self {
        match error {
            VaultError::Store(error) => error.into(),
            VaultError::Secrets(error) => error.into(),
            VaultError::InvalidReference(errors) => ApiError::validation(errors),
            other @ VaultError::StoredConfigInvalid(_) => {
                ApiError::new(other.kind(), other.code(), other.to_string())
            }
        }
    }
}

impl From<HostPolicyError> for ApiError {
    fn from(error: HostPolicyError) -> Self {
        match error {
            // The request's own field is wrong: the same 422 as every other validation failure.
            HostPolicyError::NotADirectory => ApiError::validation(ValidationErrors::single(
                "workspace.localPath",
                error.to_string(),
            )),
            other => ApiError::new(other.kind(), other.code(), other.to_string()),
        }
    }
}

impl From<AcceptError> for ApiError {
    fn from(error: AcceptError) -> Self {
        match error {
            AcceptError::Invalid(errors) => ApiError::validation(errors),
            AcceptError::HostPolicy(error) => error.into(),
            AcceptError::Store(error) => error.into(),
            AcceptError::Vault(error) => error.into(),
            other @ (AcceptError::EnvironmentArchived | AcceptError::DriverUnsupported { .. }) => {
                ApiError::new(other.kind(), other.code(), other.to_string())
            }
        }
    }
}
