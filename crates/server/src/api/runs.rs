//! Run routes: start a command, follow its events (JSON or a live SSE stream), cancel it.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_core::ErrorKind;
use berth_core::config::DriverConfig;
use berth_core::driver::ExecRequest;
use berth_core::environment::{Driver, Environment, EnvironmentStatus};
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::lease::LeasePolicy;
use berth_core::run::{EventKind, Run, RunEvent, RunStatus, check_env_name, check_no_nul};
use berth_core::time::Timestamp;
use berth_core::validation::ValidationErrors;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast;

use super::auth::Principal;
use super::dto::{CreateRunRequest, EventResponse, RunResponse};
use super::error::ApiError;
use super::json::ApiJson;
use super::{load_company, parse_path_id, query_or_400};
use crate::host_policy::{HostPolicyError, WorkspaceCaller};
use crate::runs::RunPlan;
use crate::runs::event_data::EventData;
use crate::runs::events::EventWriter;
use crate::state::AppState;

/// Longest accepted run timeout: one day.
const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Variables the callback bridge sets whenever it is on; a request may not set them itself.
const RESERVED_ENV: [&str; 3] = ["BERTH_API_URL", "BERTH_API_TOKEN", "BERTH_RUN_ID"];

/// The bridge's variable names (the default ones, plus the policy's own, e.g. `PAPERCLIP_API_KEY`).
fn reserved_env_names(state: &AppState) -> Vec<String> {
    let mut names: Vec<String> = RESERVED_ENV.iter().map(|name| (*name).to_owned()).collect();
    if let Some(settings) = state.bridge() {
        let policy_names = &settings.policy.env;
        names.extend([policy_names.url.clone(), policy_names.token.clone()]);
        names.extend(policy_names.run_id.clone());
    }
    names
}
const DEFAULT_PAGE: u32 = 1000;
const MAX_PAGE: u32 = 10_000;

pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    ApiJson(request): ApiJson<CreateRunRequest>,
) -> Result<(StatusCode, Json<RunResponse>), ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.manage(company_id)?;
    load_company(&state, company_id).await?;

    let reserved = reserved_env_names(&state);
    let (mut plan, environment_id) = validate(request, &reserved)?;
    // Before anything else happens (even a Local environment being created): the run uses the resolved directory.
    if let Some(requested) = plan.workspace.take() {
        let resolved = state
            .host()
            .confine_workspace(workspace_caller(&principal), &requested)
            .await
            .inspect_err(|error| {
                tracing::warn!(
                    company.id = %company_id,
                    actor = %principal.actor(),
                    path = %requested.display(),
                    code = error.code(),
                    "run refused: workspace.localPath"
                );
            })?;
        plan.workspace = Some(resolved);
    }
    let environment = resolve_environment(&state, company_id, environment_id).await?;
    let mut config = runnable_config(&state, &environment)?;
    // Decrypted for the run's lifetime only (the driver connects with them); never stored, zeroized on drop.
    crate::vault::resolve_secrets(state.store(), state.cipher(), company_id, &mut config).await?;

    let now = Timestamp::now();
    let run = Run {
        id: RunId::new(),
        company_id,
        environment_id: environment.id,
        lease_id: None,
        status: RunStatus::Queued,
        command: plan.exec.argv.clone(),
        exit_code: None,
        signal: None,
        error: None,
        owner_node: state.runs().node_id().to_owned(),
        created_at: now,
        started_at: None,
        finished_at: None,
        heartbeat_at: now,
        cancel_requested: false,
    };
    state.store().insert_run(&run).await?;
    let events = EventWriter::new(state.store().clone(), run.id);
    events.record(EventData::Status(RunStatus::Queued)).await;
    tracing::info!(run.id = %run.id, env.id = %environment.id, "run accepted");
    let response = RunResponse::from(&run);
    state.runs().start(run, environment, config, plan, events);
    Ok((StatusCode::CREATED, Json(response)))
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
}

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
    let limit = query.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let runs = state.store().list_runs(company_id, status, limit).await?;
    Ok(Json(runs.iter().map(RunResponse::from).collect()))
}

pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<RunResponse>, ApiError> {
    let run = load_run(&state, &id).await?;
    principal.access(run.company_id)?;
    Ok(Json(RunResponse::from(&run)))
}

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
    limit: Option<u32>,
}

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
    if wants_event_stream(&headers) {
        let follower = Follower {
            state: state.clone(),
            run_id: run.id,
            after,
            buffer: VecDeque::new(),
            live: state.runs().follow(run.id),
            caught_up: false,
            finished: false,
            last_frame: Instant::now(),
        };
        let stream = futures::stream::unfold(follower, Follower::next);
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
    let limit = query.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
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

/// Events read from the store at once while replaying or catching up.
const STORE_PAGE: u32 = 500;
/// How long a live follower waits for the next event before it looks at the store anyway, in case events came from
/// elsewhere (another replica, a sweep).
const LIVE_IDLE_READ: Duration = Duration::from_secs(1);
/// How long an event stream may stay silent before it gets a keep-alive comment (as axum's SSE default).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Replays a run's events after a seq, then follows new ones until the final status event.
///
/// While this node runs the command, new events come from its writer's channel, as stored ([`EventWriter::subscribe`]),
/// so output is not read back from the store right after it was written. An event is taken from the channel only
/// when it is the very next seq: when the channel has lagged, skips a seq (written by another writer, or inserts
/// finishing out of order) or stays quiet, the store is read from the last seq sent. Either way every event goes out
/// once, in seq order.
struct Follower {
    state: AppState,
    run_id: RunId,
    after: i64,
    buffer: VecDeque<Arc<RunEvent>>,
    /// The local writer's events; `None` when another node runs it (then we poll the database) or it has finished.
    live: Option<broadcast::Receiver<Arc<RunEvent>>>,
    /// The last store read found everything there was: the channel may be relied on for what comes next.
    caught_up: bool,
    finished: bool,
    /// When the last frame went out: an idle stream gets a keep-alive comment every [`KEEP_ALIVE`].
    last_frame: Instant,
}

impl Follower {
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        let mut idle_checks = 0;
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.after = event.seq;
                self.finished = is_final(&event);
                self.last_frame = Instant::now();
                return Some((Ok(sse_frame(&event)), self));
            }
            if self.finished {
                return None;
            }
            // Proxies and clients drop connections that stay silent; the waits below are at most a second or so.
            if self.last_frame.elapsed() >= KEEP_ALIVE {
                self.last_frame = Instant::now();
                return Some((Ok(Bytes::from_static(b":\n\n")), self));
            }
            if self.caught_up
                && let Some(live) = self.live.as_mut()
            {
                match tokio::time::timeout(LIVE_IDLE_READ, live.recv()).await {
                    // Already sent (read from the store meanwhile).
                    Ok(Ok(event)) if event.seq <= self.after => continue,
                    Ok(Ok(event)) if event.seq == self.after + 1 => {
                        self.buffer.push_back(event);
                        continue;
                    }
                    // A gap, or events dropped for falling behind: the store has them all.
                    Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                        tracing::debug!(run.id = %self.run_id, after = self.after, "live follower reads the store to catch up");
                    }
                    // The run's writers are gone: from here on, read until the final event.
                    Ok(Err(broadcast::error::RecvError::Closed)) => self.live = None,
                    Err(_elapsed) => {}
                }
            }
            let batch = match self
                .state
                .store()
                .list_events(self.run_id, self.after, STORE_PAGE)
                .await
            {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(run.id = %self.run_id, error = %crate::error_chain::DisplayChain(&error), "event stream ended");
                    return None;
                }
            };
            self.caught_up = batch.len() < STORE_PAGE as usize;
            if !batch.is_empty() {
                self.buffer.extend(batch.into_iter().map(Arc::new));
                continue;
            }
            // Nothing new. A run whose row is final has written its final event already (it goes out first), so
            // read once more right away — it may have landed between the two queries — and stop if it still is
            // not there (an orphan sweep writes the row first; give it a moment).
            if let Ok(Some(run)) = self.state.store().get_run(self.run_id).await
                && run.status.is_terminal()
            {
                idle_checks += 1;
                if idle_checks > 3 {
                    return None;
                }
                if idle_checks > 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
            // With a live channel, the next turn waits on it; without, poll.
            if self.live.is_none() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

fn is_final(event: &RunEvent) -> bool {
    event.kind == EventKind::Status
        && event
            .data
            .get("status")
            .and_then(Value::as_str)
            .and_then(|status| status.parse::<RunStatus>().ok())
            .is_some_and(RunStatus::is_terminal)
}

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

/// Checks the request field by field, reporting every problem. `workspace.localPath` is checked for its form here;
/// whether the caller may use it is [`HostPolicy::confine_workspace`](crate::host_policy::HostPolicy)'s call.
fn validate(
    request: CreateRunRequest,
    reserved: &[String],
) -> Result<(RunPlan, Option<String>), ApiError> {
    let mut errors = ValidationErrors::new();
    if request.command.is_empty() || request.command[0].is_empty() {
        errors.push(
            "command",
            "must name a program: a non-empty array whose first entry is not empty",
        );
    }
    for (index, argument) in request.command.iter().enumerate() {
        if let Err(message) = check_no_nul(argument) {
            errors.push(format!("command.{index}"), message);
        }
    }
    let env = request.env.unwrap_or_default();
    for (name, value) in &env {
        let path = format!("env.{}", name.escape_debug());
        if let Err(message) = check_env_name(name) {
            errors.push(path.clone(), message);
        } else if reserved.iter().any(|reserved| reserved == name) {
            errors.push(
                path.clone(),
                "is set by the callback bridge and cannot be given",
            );
        }
        if let Err(message) = check_no_nul(value) {
            errors.push(path, format!("value {message}"));
        }
    }
    let cwd = request.cwd.filter(|cwd| !cwd.is_empty());
    if let Some(cwd) = &cwd
        && (cwd.starts_with('/')
            || cwd.split('/').any(|segment| segment == "..")
            || cwd.contains('\0'))
    {
        errors.push(
            "cwd",
            "must be a path inside the workspace: relative, without '..'",
        );
    }
    let timeout = match request.timeout_ms {
        Some(ms) if !(1..=MAX_TIMEOUT_MS).contains(&ms) => {
            errors.push(
                "timeoutMs",
                format!("must be between 1 and {MAX_TIMEOUT_MS}"),
            );
            None
        }
        other => other.map(Duration::from_millis),
    };
    let workspace = request.workspace.and_then(|workspace| {
        let path = PathBuf::from(&workspace.local_path);
        if !path.is_absolute()
            || workspace
                .local_path
                .split('/')
                .any(|segment| segment == "..")
            || workspace.local_path.contains('\0')
        {
            errors.push(
                "workspace.localPath",
                "must be an absolute path without '..'",
            );
            None
        } else {
            Some(path)
        }
    });
    let lease_policy = request.lease_policy.as_deref().and_then(|text| {
        text.parse::<LeasePolicy>()
            .map_err(|error| errors.push("leasePolicy", error.to_string()))
            .ok()
    });
    errors.into_result(()).map_err(ApiError::validation)?;
    let exec = ExecRequest {
        argv: request.command,
        env: env.into_iter().collect::<BTreeMap<_, _>>(),
        cwd,
        stdin: request.stdin.map(String::into_bytes),
        timeout,
    };
    let bridge = request.bridge.unwrap_or(true);
    Ok((
        RunPlan {
            exec,
            workspace,
            lease_policy,
            bridge,
        },
        request.environment_id,
    ))
}

/// The given environment (of this company, active), else the company's Local one — if the company may have one
/// (`--local-environments`).
async fn resolve_environment(
    state: &AppState,
    company_id: CompanyId,
    environment_id: Option<String>,
) -> Result<Environment, ApiError> {
    let environment = match environment_id {
        None if !state.host().may_use_local(company_id) => {
            return Err(HostPolicyError::NoLocalEnvironment.into());
        }
        None => state.store().ensure_local_environment(company_id).await?,
        Some(id) => {
            let not_found = || {
                ApiError::validation(ValidationErrors::single(
                    "environmentId",
                    "no such environment in this company",
                ))
            };
            let id: EnvironmentId = id.parse().map_err(|_| not_found())?;
            let environment = state
                .store()
                .get_environment(id)
                .await?
                .ok_or_else(not_found)?;
            if environment.company_id != company_id {
                return Err(not_found());
            }
            environment
        }
    };
    // A Local environment kept from a time when every company had one does not outlive the policy.
    if environment.driver == Driver::Local {
        state.host().check_local(company_id)?;
    }
    if environment.status == EnvironmentStatus::Archived {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            "environment_archived",
            "the environment is archived",
        ));
    }
    Ok(environment)
}

/// The environment's config, if its driver (and provider) can run commands in this build.
fn runnable_config(state: &AppState, environment: &Environment) -> Result<DriverConfig, ApiError> {
    let config = DriverConfig::parse(
        environment.driver,
        &Value::Object(environment.config.clone()),
        state.drivers().providers(),
    )
    .map_err(|errors| {
        ApiError::new(
            ErrorKind::Conflict,
            "environment_config_invalid",
            format!("the environment's stored config is no longer valid ({errors}); update it"),
        )
    })?;
    let capabilities = state.drivers().capabilities();
    let driver_runs = capabilities
        .drivers
        .get(&environment.driver)
        .is_some_and(|driver| driver.supports_run_execution);
    let provider_runs = match &config {
        DriverConfig::Sandbox(sandbox) => capabilities
            .sandbox_providers
            .get(&sandbox.provider)
            .is_some_and(|provider| provider.supports_run_execution),
        _ => true,
    };
    if !driver_runs || !provider_runs {
        return Err(ApiError::new(
            ErrorKind::Validation,
            "driver_unsupported",
            format!(
                "the {} driver cannot run commands in this build",
                environment.driver
            ),
        ));
    }
    Ok(config)
}
