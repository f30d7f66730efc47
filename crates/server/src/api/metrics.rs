//! `GET /metrics`: the Prometheus text exposition (docs/api.md, "Metrics"), for the admin token unless the operator
//! started the server with `--metrics-public`.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::auth::Principal;
use super::error::ApiError;
use crate::metrics;
use crate::state::AppState;

/// `GET /metrics`. What must be right after a restart or on a replica (leases held, plugin status) is read now;
/// the rest the recorder has counted since this process started.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every metric in the Prometheus text exposition format (version 0.0.4). The \
                                      admin token is needed unless the server runs with `--metrics-public`",
         body = String, content_type = "text/plain; version=0.0.4"),
        (status = 500, description = "The database did not answer", body = crate::api::openapi::ErrorDoc),
    )
)]
pub async fn scrape(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    if !state.metrics().is_public() {
        let (mut parts, _body) = request.into_parts();
        Principal::from_request_parts(&mut parts, &state)
            .await?
            .require_admin()?;
    }
    metrics::set_held_leases(&state.store().count_held_leases().await?);
    metrics::set_plugin_statuses(
        state
            .plugins()
            .plugins()
            .iter()
            .map(|plugin| (plugin.id(), plugin.state().status().0)),
    );
    let body = state.metrics().render();
    Ok((
        [
            (header::CONTENT_TYPE, metrics::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}
