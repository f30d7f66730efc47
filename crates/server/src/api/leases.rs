//! Lease routes: managers and admins only (readers get 403).

use axum::Json;
use axum::extract::{Path, Query, State};
use berth_core::lease::LeaseStatus;
use berth_core::validation::ValidationErrors;
use serde::Deserialize;

use super::auth::Principal;
use super::dto::LeaseResponse;
use super::error::ApiError;
use super::support::{load_environment, parse_path_id, query_or_400};
use crate::state::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct LeaseQuery {
    status: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/environments/{id}/leases",
    tag = "leases",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The environment's id"),
        ("status" = Option<String>, Query, description = "active, released, expired, failed or retained"),
    ),
    responses(
        (status = 200, description = "The environment's leases (managers and the admin)", body = [LeaseResponse]),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    query: Result<Query<LeaseQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<LeaseResponse>>, ApiError> {
    let environment = load_environment(&state, &id).await?;
    principal.manage(environment.company_id)?;
    let query = query_or_400(query)?;
    let status = match query
        .status
        .as_deref()
        .map(str::trim)
        .filter(|text| !text.is_empty())
    {
        None => None,
        Some(text) => Some(text.parse::<LeaseStatus>().map_err(|error| {
            ApiError::validation(ValidationErrors::single("status", error.to_string()))
        })?),
    };
    let leases = state.store().list_leases(environment.id, status).await?;
    Ok(Json(leases.iter().map(LeaseResponse::from).collect()))
}

#[utoipa::path(
    get,
    path = "/api/environment-leases/{id}",
    tag = "leases",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The lease's id"),
    ),
    responses(
        (status = 200, description = "The lease (managers and the admin)", body = LeaseResponse),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let id = parse_path_id(&id, "lease")?;
    let lease = state
        .store()
        .get_lease(id)
        .await?
        .ok_or_else(|| ApiError::not_found("lease"))?;
    principal.manage(lease.company_id)?;
    Ok(Json(LeaseResponse::from(&lease)))
}
