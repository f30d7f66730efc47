//! Liveness and readiness probes (no auth).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "The process answers", body = Object),
    )
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "The database answers", body = Object),
        (status = 503, description = "The database does not answer", body = crate::api::openapi::ErrorDoc),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.store().ping().await?;
    Ok(Json(json!({"status": "ready"})))
}
