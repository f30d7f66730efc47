//! Run routes: start a command, follow its events (JSON or a live SSE stream), cancel it.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_core::ids::CompanyId;
use berth_core::run::{Run, RunEvent, RunStatus};
use berth_core::validation::ValidationErrors;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::auth::Principal;
use super::dto::{CreateRunRequest, EventResponse, RunResponse};
use super::error::ApiError;
use super::json::ApiJson;
use super::support::{load_company, page_limit, parse_path_id, query_or_400};
use crate::host_policy::WorkspaceCaller;
use crate::runs::{AcceptRun, Followed};
use crate::state::AppState;

#[utoipa::path(
    post,
    path = "/api/companies/{company_id}/runs",
    tag = "runs",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
    ),
    request_body = CreateRunRequest,
    responses(
        (status = 201, description = "The accepted run", body = RunResponse),
        (status = 409, description = "Conflicts with the current state", body = crate::api::openapi::ErrorDoc),
        (status = 503, description = "The server is shutting down or the environment's driver is unavailable", body = crate::api::openapi::ErrorDoc),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    ApiJson(request): ApiJson<CreateRunRequest>,
) -> Result<(StatusCode, Json<RunResponse>), ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.manage(company_id)?;
    load_company(&state, company_id).await?;

    let CreateRunRequest {
        environment_id,
        command,
        env,
        cwd,
        stdin,
        timeout_ms,
        workspace,
        bridge,
        lease_policy,
    } = request;
    let run = state
        .runs()
        .accept(AcceptRun {
            company_id,
            caller: workspace_caller(&principal),
            actor: principal.actor(),
            environment_id,
            command,
            env: env.unwrap_or_default(),
            cwd,
            stdin,
            timeout_ms,
            workspace_local_path: workspace.map(|workspace| workspace.local_path),
            bridge,
            lease_policy,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(RunResponse::from(&run))))
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/companies/{company_id}/runs",
    tag = "runs",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
        ("status" = Option<String>, Query, description = "queued, running, succeeded, failed, timed_out or cancelled"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 10000 (default 1000)"),
    ),
    responses(
        (status = 200, description = "The company's runs, newest first", body = [RunResponse]),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<RunResponse>>, ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.access(company_id)?;
    let query = query_or_400(query)?;
    load_company(&state, company_id).await?;
    let status = match query
        .status
        .as_deref()
        .map(str::trim)
        .filter(|text| !text.is_empty())
    {
        None => None,
        Some(text) => Some(text.parse::<RunStatus>().map_err(|error| {
            ApiError::validation(ValidationErrors::single("status", error.to_string()))
        })?),
    };
    let limit = page_limit(query.limit)?;
    let runs = state.store().list_runs(company_id, status, limit).await?;
    Ok(Json(runs.iter().map(RunResponse::from).collect()))
}

#[utoipa::path(
    get,
    path = "/api/runs/{id}",
    tag = "runs",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The run's id"),
    ),
    responses(
        (status = 200, description = "The run", body = RunResponse),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunResponse>, ApiError> {
    let run = load_run(&state, &id).await?;
    principal.access(run.company_id)?;
    Ok(Json(RunResponse::from(&run)))
}

#[utoipa::path(
    post,
    path = "/api/runs/{id}/cancel",
    tag = "runs",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The run's id"),
    ),
    responses(
        (status = 200, description = "The run: its process tree is killed, its lease released", body = RunResponse),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunResponse>, ApiError> {
    let run = load_run(&state, &id).await?;
    principal.manage(run.company_id)?;
    if run.status.is_terminal() {
        return Ok(Json(RunResponse::from(&run)));
    }
    // Recorded in the database so the owning node acts on it even when that node is another replica.
    let stored = state
        .store()
        .request_cancel(run.id)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))?;
    if state.runs().cancel_local(run.id) {
        tracing::info!(run.id = %run.id, "run cancelled");
    }
    Ok(Json(RunResponse::from(&stored)))
}

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/runs/{id}/events",
    tag = "runs",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The run's id"),
        ("after" = Option<i64>, Query, description = "Only events with a larger `seq`"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 10000 (default 1000)"),
    ),
    responses(
        (status = 200, description = "The events as JSON; with `Accept: text/event-stream`, a live SSE stream (one event per `data:` frame) that replays from `after` and ends after the final event", content((Vec<EventResponse<'_>> = "application/json"), (String = "text/event-stream"))),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let run = load_run(&state, &id).await?;
    principal.access(run.company_id)?;
    let query = query_or_400(query)?;
    let after = query.after.unwrap_or(0).max(0);
    // Checked before choosing JSON or SSE so a bad limit is refused the same way on both.
    let limit = page_limit(query.limit)?;
    if wants_event_stream(&headers) {
        let follower = state.runs().follow(run.id, after).idle_after(KEEP_ALIVE);
        let stream = futures::stream::unfold(follower, |mut follower| async move {
            let frame = match follower.next().await? {
                Followed::Event(event) => sse_frame(&event),
                Followed::Idle => Bytes::from_static(b":\n\n"),
            };
            Some((Ok::<_, Infallible>(frame), follower))
        });
        // Frames are written by `sse_frame`, not axum's `Event`: its data writer grows its buffer step by step
        // (copying a large output event several times) and scans every byte for line breaks that JSON never has.
        return Ok((
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(stream),
        )
            .into_response());
    }
    let events = state.store().list_events(run.id, after, limit).await?;
    Ok(Json(events.iter().map(EventResponse::from).collect::<Vec<_>>()).into_response())
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| {
            value
                .split(',')
                .any(|part| part.trim().starts_with("text/event-stream"))
        })
}

/// How long an event stream may stay silent before it gets a keep-alive comment (as axum's SSE default).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The SSE frame of an event: `id: <seq>`, `event: <type>`, `data: <the event's JSON>`, a blank line. The JSON is
/// one line (its strings escape line breaks), so it needs no `data:` splitting.
fn sse_frame(event: &RunEvent) -> Bytes {
    let text = event
        .data
        .get("text")
        .and_then(Value::as_str)
        .map_or(0, str::len);
    // Room for the text and everything around it, so a large output event is written in place, without regrowing.
    let mut frame = String::with_capacity(text + 256);
    // Writing to a String cannot fail.
    let _ = write!(
        frame,
        "id: {}\nevent: {}\ndata: ",
        event.seq,
        event.kind.as_str()
    );
    let _ = EventResponse::from(event).write_json(&mut frame);
    frame.push_str("\n\n");
    Bytes::from(frame)
}

async fn load_run(state: &AppState, id: &str) -> Result<Run, ApiError> {
    let id = parse_path_id(id, "run")?;
    state
        .store()
        .get_run(id)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))
}

/// Whose workspace rules apply: the admin token is the host's operator; a key is its company.
fn workspace_caller(principal: &Principal) -> WorkspaceCaller {
    match principal {
        Principal::Admin => WorkspaceCaller::Operator,
        Principal::ApiKey(key) => WorkspaceCaller::Company(key.company_id),
    }
}
