//! Who is calling, and what they may do.
//!
//! Every `/api` route extracts a [`Principal`] from `Authorization: Bearer <token>` (or, from the operator console,
//! its session cookie: `console::session`). Tokens are looked up by their SHA-256 digest, so the database never holds
//! a usable token; the admin token is compared in constant time.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use berth_core::company::{ApiKey, ApiKeyRole};
use berth_core::ids::CompanyId;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::state::AppState;
use crate::tokens::token_digest;

/// Longest bearer token considered; anything longer is not one of ours.
const MAX_TOKEN_CHARS: usize = 512;

/// The authenticated caller.
#[derive(Clone, Debug)]
pub enum Principal {
    /// The server's admin token: every company.
    Admin,
    /// A company API key.
    ApiKey(ApiKey),
}

/// What the caller may do within one company.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompanyAccess {
    /// Read everything and mutate (admin or manager key).
    Manage,
    /// Read with environment config and metadata redacted; no lease routes.
    Read,
}

impl Principal {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::ApiKey(_) => Err(ApiError::forbidden("this route needs the admin token")),
        }
    }

    /// The caller's access to `company_id`; 403 for another company's resources.
    pub fn access(&self, company_id: CompanyId) -> Result<CompanyAccess, ApiError> {
        match self {
            Principal::Admin => Ok(CompanyAccess::Manage),
            Principal::ApiKey(key) if key.company_id != company_id => Err(ApiError::forbidden(
                "this API key belongs to another company",
            )),
            Principal::ApiKey(key) => Ok(match key.role {
                ApiKeyRole::Manager => CompanyAccess::Manage,
                ApiKeyRole::Reader => CompanyAccess::Read,
            }),
        }
    }

    /// Access that may mutate `company_id`'s resources (and read leases and unredacted config).
    pub fn manage(&self, company_id: CompanyId) -> Result<(), ApiError> {
        match self.access(company_id)? {
            CompanyAccess::Manage => Ok(()),
            CompanyAccess::Read => Err(ApiError::forbidden(
                "a reader key cannot do this; it needs a manager key",
            )),
        }
    }

    /// How the caller appears in the activity log.
    pub fn actor(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::ApiKey(key) => format!("api_key:{}", key.id),
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // A bearer token wins; without one, the console's session cookie, under its CSRF rule (`console::session`).
        let digest = match bearer_token(parts) {
            Ok(token) => token_digest(token),
            Err(missing) if !parts.headers.contains_key(header::AUTHORIZATION) => {
                crate::console::session::request_digest(parts, state.cipher()).ok_or(missing)?
            }
            Err(malformed) => return Err(malformed),
        };
        principal_for_digest(state, &digest).await
    }
}

/// Whose token has this SHA-256 digest: the admin's, a company key's, or nobody's (401).
pub(crate) async fn principal_for_digest(
    state: &AppState,
    digest: &[u8; 32],
) -> Result<Principal, ApiError> {
    if bool::from(digest.ct_eq(state.admin_token_digest())) {
        return Ok(Principal::Admin);
    }
    match state
        .store()
        .api_key_by_token_hash(&hex::encode(digest))
        .await?
    {
        Some(key) => Ok(Principal::ApiKey(key)),
        None => Err(ApiError::unauthenticated("the bearer token is not valid")),
    }
}

pub(crate) fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthenticated("missing Authorization: Bearer <token>"))?;
    let value = header
        .to_str()
        .map_err(|_| ApiError::unauthenticated("the Authorization header is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthenticated("expected Authorization: Bearer <token>"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.len() > MAX_TOKEN_CHARS {
        return Err(ApiError::unauthenticated(
            "expected Authorization: Bearer <token>",
        ));
    }
    Ok(token)
}
