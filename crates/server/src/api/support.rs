//! What the handlers share: ids from the path, query strings, loading the company or environment a route names, and
//! the activity log.
//!
//! Its own module, below the handlers, so a handler module (`companies`, `leases`, ...) never imports the API's root,
//! which imports every handler to route to it.

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use berth_core::company::Company;
use berth_core::environment::Environment;
use berth_core::ids::CompanyId;
use berth_core::validation::ValidationErrors;
use berth_store::NewActivity;
use serde_json::Value;

use super::auth::Principal;
use super::error::ApiError;
use crate::error_chain::DisplayChain;
use crate::state::AppState;

const DEFAULT_PAGE: u32 = 1000;
const MAX_PAGE: u32 = 10_000;

/// The page size a `?limit=` asks for. Out of range is refused rather than clamped, so a client never silently gets
/// fewer rows than it asked for (or one row for `limit=0`). Read as `i64` so a negative limit is a 422 with the bounds,
/// like any other out-of-range value, rather than a query-string parse error.
pub(crate) fn page_limit(limit: Option<i64>) -> Result<u32, ApiError> {
    let Some(limit) = limit else {
        return Ok(DEFAULT_PAGE);
    };
    match u32::try_from(limit) {
        Ok(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
        _ => Err(ApiError::validation(ValidationErrors::single(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ))),
    }
}

/// Parses an id from the path. An id that cannot exist is simply not found: ids are opaque to clients.
pub(crate) fn parse_path_id<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, ApiError> {
    text.parse::<T>().map_err(|_| ApiError::not_found(what))
}

pub(crate) fn query_or_400<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(value)| value).map_err(|rejection| {
        ApiError::bad_request(
            "invalid_query",
            format!("invalid query string: {}", rejection.body_text()),
        )
    })
}

pub(crate) async fn load_company(state: &AppState, id: CompanyId) -> Result<Company, ApiError> {
    state
        .store()
        .get_company(id)
        .await?
        .ok_or_else(|| ApiError::not_found("company"))
}

pub(crate) async fn load_environment(state: &AppState, id: &str) -> Result<Environment, ApiError> {
    let id = parse_path_id(id, "environment")?;
    state
        .store()
        .get_environment(id)
        .await?
        .ok_or_else(|| ApiError::not_found("environment"))
}

/// Appends to the activity log. The change itself already succeeded, so a lost row is logged, not failed.
pub(crate) async fn record_activity(
    state: &AppState,
    principal: &Principal,
    company_id: Option<CompanyId>,
    entity_type: &str,
    entity_id: String,
    action: &str,
    details: Value,
) {
    let entry = NewActivity {
        company_id,
        actor: principal.actor(),
        action: action.to_owned(),
        entity_type: entity_type.to_owned(),
        entity_id,
        details,
    };
    if let Err(error) = state.store().record_activity(&entry).await {
        tracing::warn!(action, error = %DisplayChain(&error), "could not record activity");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_limits_outside_the_bounds_are_refused_not_clamped() {
        assert_eq!(page_limit(None).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_limit(Some(1)).unwrap(), 1);
        assert_eq!(page_limit(Some(10_000)).unwrap(), MAX_PAGE);
        for limit in [0, -1, 10_001, 1_000_000_000, i64::MAX] {
            let error = page_limit(Some(limit)).unwrap_err();
            assert_eq!(error.code(), "validation_failed", "{limit}");
        }
    }
}
