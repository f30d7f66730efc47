//! The agent API (API.md §6): what a running agent may ask of berth, through its run's bridge.
//!
//! These routes accept only requests the bridge signed: the run's upstream credential (never a run credential, an
//! API key or the admin token) plus signature headers over method, path, query, timestamp, nonce and body, checked
//! against a nonce store shared by replicas. The agent's own credential is useless here directly.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, OriginalUri, Request, State};
use axum::http::{StatusCode, header};
use berth_bridge::signing::{DEFAULT_SIGNATURE_WINDOW, verify};
use berth_core::ErrorKind;
use berth_core::run::Run;
use berth_core::time::Timestamp;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::dto::RunResponse;
use super::error::ApiError;
use super::json::{has_json_content_type, parse_json, read_body};
use crate::bridge::StoreNonces;
use crate::runs::event_data::EventData;
use crate::state::AppState;

/// Longest agent event message, in characters.
const MAX_MESSAGE_CHARS: usize = 4096;

/// A request from a run's bridge, authenticated and its signature checked.
#[derive(Debug)]
pub struct AgentRequest {
    pub run: Run,
    pub body: Bytes,
    pub json_body: bool,
}

impl FromRequest<AppState> for AgentRequest {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let settings = state.bridge().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unavailable,
                "bridge_disabled",
                "the callback bridge is not enabled",
            )
        })?;
        let json_body = has_json_content_type(&request);
        let (parts, body) = request.into_parts();
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                ApiError::unauthenticated("agent routes take the run's bridge credential")
            })?;
        let run_id = settings
            .secrets
            .verify_upstream_token(token.trim())
            .map_err(ApiError::from)?;
        // The bridge names the run beside the credential; a mismatch means something in between rewrote one.
        let named_run = parts
            .headers
            .get(berth_bridge::signing::HEADER_RUN_ID)
            .and_then(|value| value.to_str().ok());
        if named_run.is_some_and(|named| named != run_id.to_string()) {
            return Err(ApiError::unauthenticated(
                "the run id header does not match the credential",
            ));
        }
        let body = read_body(body).await?;
        // The signature covers the path the bridge sent; `nest` strips `/api` from `parts.uri`, so take the original.
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map_or(&parts.uri, |original| &original.0);
        let path_and_query = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        let signing_key = settings.secrets.signing_key(run_id);
        verify(
            &signing_key,
            parts.method.as_str(),
            path_and_query,
            &parts.headers,
            &body,
            Timestamp::now(),
            DEFAULT_SIGNATURE_WINDOW,
            run_id,
            &StoreNonces(state.store().clone()),
        )
        .await
        .map_err(ApiError::from)?;
        let run = state
            .store()
            .get_run(run_id)
            .await?
            .ok_or_else(|| ApiError::unauthenticated("no such run"))?;
        if run.status.is_terminal() {
            return Err(ApiError::new(
                ErrorKind::Unauthenticated,
                "run_ended",
                "the run has ended",
            ));
        }
        Ok(Self {
            run,
            body,
            json_body,
        })
    }
}

/// `GET /api/agent/run`: the run, as the agent sees it.
#[utoipa::path(
    get,
    path = "/api/agent/run",
    tag = "agent",
    security(("runCredential" = [])),
    responses(
        (status = 200, description = "The run this credential belongs to", body = RunResponse),
    )
)]
pub async fn run(request: AgentRequest) -> Json<RunResponse> {
    Json(RunResponse::from(&request.run))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentEventRequest {
    message: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    data: Option<Map<String, Value>>,
}

/// `POST /api/agent/events`: the agent reports progress; it appears in the run's events as `agent`.
#[utoipa::path(
    post,
    path = "/api/agent/events",
    tag = "agent",
    security(("runCredential" = [])),
    request_body = AgentEventRequest,
    responses(
        (status = 202, description = "Recorded as an `agent` event of the run", body = Object),
    )
)]
pub async fn post_event(
    State(state): State<AppState>,
    request: AgentRequest,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !request.json_body {
        return Err(ApiError::new(
            ErrorKind::UnsupportedMediaType,
            "unsupported_media_type",
            "expected a JSON body with Content-Type: application/json",
        ));
    }
    let event: AgentEventRequest = parse_json(&request.body)?;
    if event.message.trim().is_empty() || event.message.chars().count() > MAX_MESSAGE_CHARS {
        return Err(ApiError::validation(
            berth_core::validation::ValidationErrors::single(
                "message",
                format!("must be 1 to {MAX_MESSAGE_CHARS} characters"),
            ),
        ));
    }
    let writer = state.runs().event_writer(request.run.id);
    writer
        .record(EventData::Agent {
            message: &event.message,
            data: event.data.as_ref(),
        })
        .await;
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": true}))))
}
