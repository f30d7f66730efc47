//! The activity log, read: what changed in a company, by whom, when — field names, never values.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use berth_core::ids::CompanyId;
use serde::Deserialize;

use super::auth::Principal;
use super::dto::ActivityResponse;
use super::error::ApiError;
use super::support::{load_company, page_limit, parse_path_id, query_or_400};
use crate::state::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct ActivityQuery {
    /// The id of the last entry the reader has; 0 or absent: from the start.
    after: Option<i64>,
    limit: Option<i64>,
}

/// `GET /api/companies/{companyId}/activity?after=&limit=`: entries after the cursor, oldest first. Any key of the
/// company may read it: entries name fields, never values, so readers see nothing their redaction hides.
#[utoipa::path(
    get,
    path = "/api/companies/{company_id}/activity",
    tag = "companies",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
        ("after" = Option<i64>, Query, description = "The id of the last entry already read"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 10000 (default 1000)"),
    ),
    responses(
        (status = 200, description = "Entries after the cursor, oldest first: who changed what, field names only", body = [ActivityResponse<'_>]),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    query: Result<Query<ActivityQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.access(company_id)?;
    load_company(&state, company_id).await?;
    let query = query_or_400(query)?;
    let limit = page_limit(query.limit)?;
    let entries = state
        .store()
        .list_activity_after(company_id, query.after.unwrap_or(0).max(0), limit)
        .await?;
    // Serialized here, while the entries the response borrows from are alive.
    Ok(Json(
        entries
            .iter()
            .map(ActivityResponse::from)
            .collect::<Vec<_>>(),
    )
    .into_response())
}
