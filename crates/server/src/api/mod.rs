//! The REST API (API.md §2–§4) on axum.
//!
//! Handlers are thin: they authenticate ([`auth::Principal`]), parse strictly ([`json::ApiJson`]), call the store and
//! drivers, and convert to wire types ([`dto`]). Every failure becomes the uniform error body in [`error`].

pub mod activity;
pub mod agent;
pub mod auth;
pub mod companies;
pub mod dto;
pub mod environments;
pub mod error;
pub mod health;
pub mod json;
pub mod leases;
pub mod metrics;
pub mod openapi;
pub mod request_id;
pub mod runs;
mod support;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{delete, get, post};
use berth_core::ErrorKind;
use tower_http::trace::TraceLayer;

use self::error::ApiError;
use crate::state::AppState;

/// The whole HTTP application: health probes, the `/api` routes and the operator console.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/whoami", get(companies::whoami))
        .route("/agent/run", get(agent::run))
        .route("/agent/events", post(agent::post_event))
        .route("/companies", get(companies::list).post(companies::create))
        .route(
            "/companies/{company_id}",
            get(companies::get).patch(companies::patch),
        )
        .route(
            "/companies/{company_id}/api-keys",
            post(companies::create_api_key),
        )
        .route("/api-keys/{id}", delete(companies::delete_api_key))
        .route("/companies/{company_id}/activity", get(activity::list))
        .route(
            "/companies/{company_id}/environments",
            get(environments::list).post(environments::create),
        )
        .route(
            "/companies/{company_id}/environments/probe-config",
            post(environments::probe_config),
        )
        .route(
            "/companies/{company_id}/environments/capabilities",
            get(environments::capabilities),
        )
        .route(
            "/environments/{id}",
            get(environments::get)
                .patch(environments::patch)
                .delete(environments::delete),
        )
        .route("/environments/{id}/probe", post(environments::probe))
        .route("/environments/{id}/leases", get(leases::list))
        .route("/environment-leases/{id}", get(leases::get))
        .route(
            "/companies/{company_id}/runs",
            get(runs::list).post(runs::create),
        )
        .route("/runs/{id}", get(runs::get))
        .route("/runs/{id}/events", get(runs::events))
        .route("/runs/{id}/cancel", post(runs::cancel))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Here too: only inside the nested router is the route template (`/api/runs/{id}`) known.
        .layer(axum::middleware::from_fn(crate::metrics::track_http));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::scrape))
        .nest("/api", api)
        // The operator console at `/`: static files and its sign-in, reading everything through `/api`.
        .merge(crate::console::router())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(json::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        // Outermost: the id exists before the trace span opens, and every answer carries it.
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}

/// The span every log line of a request is in: method, path (never the query, which may hold a cursor or filter a
/// user typed) and the request id.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let request_id = request
        .extensions()
        .get::<request_id::RequestId>()
        .map_or("", request_id::RequestId::as_str);
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id,
    )
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
