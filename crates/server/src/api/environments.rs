//! Environment routes: CRUD, probes and capabilities.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use berth_core::config::{CONFIG_PATH, DriverConfig, merge_config, stored_secret_refs};
use berth_core::environment::{
    Driver, Environment, EnvironmentStatus, MAX_DESCRIPTION_CHARS, normalize_name,
};
use berth_core::ids::{CompanyId, EnvironmentId};
use berth_core::probe::{LastProbe, ProbeResult};
use berth_core::time::Timestamp;
use berth_core::validation::{ValidationErrors, json_type_name};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::auth::{CompanyAccess, Principal};
use super::dto::{
    CapabilitiesResponse, CreateEnvironmentRequest, EnvironmentResponse, PatchEnvironmentRequest,
    ProbeConfigRequest, ProbeResponse,
};
use super::error::ApiError;
use super::json::{ApiJson, Patch};
use super::support;
use super::support::{load_company, load_environment, parse_path_id, query_or_400};
use crate::state::AppState;
use crate::vault::{self, ResolvedConfig, VaultError};
use berth_store::EnvironmentFilter;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    driver: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/companies/{company_id}/environments",
    tag = "environments",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
        ("status" = Option<String>, Query, description = "active or archived"),
        ("driver" = Option<String>, Query, description = "local, ssh, sandbox or plugin"),
    ),
    responses(
        (status = 200, description = "The company's environments, newest update first", body = [EnvironmentResponse]),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<EnvironmentResponse>>, ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    let access = principal.access(company_id)?;
    let query = query_or_400(query)?;
    load_company(&state, company_id).await?;
    let mut errors = ValidationErrors::new();
    let filter = EnvironmentFilter {
        status: non_empty(query.status.as_deref())
            .and_then(|text| parse_or_record(text, "status", &mut errors)),
        driver: non_empty(query.driver.as_deref())
            .and_then(|text| parse_or_record(text, "driver", &mut errors)),
    };
    errors.into_result(()).map_err(ApiError::validation)?;
    let environments = state.store().list_environments(company_id, &filter).await?;
    let probes: HashMap<EnvironmentId, LastProbe> = state
        .store()
        .last_probes_of_company(company_id)
        .await?
        .into_iter()
        .map(|probe| (probe.environment_id, probe))
        .collect();
    Ok(Json(
        environments
            .iter()
            .map(|environment| {
                view(environment, access).with_last_probe(probes.get(&environment.id))
            })
            .collect(),
    ))
}

#[utoipa::path(
    post,
    path = "/api/companies/{company_id}/environments",
    tag = "environments",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
    ),
    request_body = CreateEnvironmentRequest,
    responses(
        (status = 201, description = "The new environment; secrets come back as references", body = EnvironmentResponse),
        (status = 409, description = "Conflicts with the current state", body = crate::api::openapi::ErrorDoc),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    ApiJson(request): ApiJson<CreateEnvironmentRequest>,
) -> Result<(StatusCode, Json<EnvironmentResponse>), ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.manage(company_id)?;
    load_company(&state, company_id).await?;

    let mut errors = ValidationErrors::new();
    let name = record(normalize_name(&request.name), "name", &mut errors);
    let description = normalize_description(request.description, &mut errors);
    let driver = parse_or_record::<Driver>(&request.driver, "driver", &mut errors);
    if driver == Some(Driver::Local) {
        state.host().check_local(company_id)?;
    }
    let status = match request.status.as_deref() {
        None => Some(EnvironmentStatus::Active),
        Some(text) => parse_or_record(text, "status", &mut errors),
    };
    let metadata = parse_metadata(request.metadata, &mut errors);
    let config_value = request.config.unwrap_or_else(|| json!({}));
    let config = driver.and_then(|driver| parse_config(&state, driver, &config_value, &mut errors));
    let (Some(name), Some(driver), Some(status), Some(mut config), true) =
        (name, driver, status, config, errors.is_empty())
    else {
        return Err(ApiError::validation(errors));
    };
    // A new environment owns no secrets yet, so any reference here names someone else's: refused.
    let id = EnvironmentId::new();
    vault::check_secret_refs(state.store(), company_id, Some(id), &config).await?;
    driver_accepts(&state, company_id, driver, &config_value).await?;
    let sealed =
        vault::seal_inline_secrets(state.store(), state.cipher(), company_id, id, &mut config)
            .await?;
    let now = Timestamp::now();
    let environment = Environment {
        id,
        company_id,
        name,
        description,
        driver,
        status,
        config: stored_shape(&config)?,
        metadata,
        created_at: now,
        updated_at: now,
        revision: 0,
    };
    if let Err(error) = state.store().insert_environment(&environment).await {
        vault::forget(state.store(), &sealed).await;
        return Err(error.into());
    }
    tracing::info!(env.id = %environment.id, driver = %driver, "environment created");
    record_activity(
        &state,
        &principal,
        &environment,
        "environment.created",
        json!({"name": environment.name, "driver": driver.as_str(), "status": status.as_str()}),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(EnvironmentResponse::full(&environment)),
    ))
}

#[utoipa::path(
    get,
    path = "/api/environments/{id}",
    tag = "environments",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The environment's id"),
    ),
    responses(
        (status = 200, description = "The environment, redacted for readers", body = EnvironmentResponse),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<EnvironmentResponse>, ApiError> {
    let environment = load_environment(&state, &id).await?;
    let access = principal.access(environment.company_id)?;
    let probe = state.store().last_probe(environment.id).await?;
    Ok(Json(
        view(&environment, access).with_last_probe(probe.as_ref()),
    ))
}

#[utoipa::path(
    patch,
    path = "/api/environments/{id}",
    tag = "environments",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The environment's id"),
    ),
    request_body = PatchEnvironmentRequest,
    responses(
        (status = 200, description = "The changed environment", body = EnvironmentResponse),
        (status = 409, description = "Conflicts with the current state", body = crate::api::openapi::ErrorDoc),
    )
)]
pub async fn patch(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<PatchEnvironmentRequest>,
) -> Result<Json<EnvironmentResponse>, ApiError> {
    let current = load_environment(&state, &id).await?;
    principal.manage(current.company_id)?;

    let mut errors = ValidationErrors::new();
    let name = match &request.name {
        None => Some(current.name.clone()),
        Some(name) => record(normalize_name(name), "name", &mut errors),
    };
    let description = match request.description {
        Patch::Missing => current.description.clone(),
        Patch::Null => None,
        Patch::Value(text) => normalize_description(Some(text), &mut errors),
    };
    let driver = match request.driver.as_deref() {
        None => Some(current.driver),
        Some(text) => parse_or_record::<Driver>(text, "driver", &mut errors),
    };
    if driver == Some(Driver::Local) && current.driver != Driver::Local {
        state.host().check_local(current.company_id)?;
    }
    let status = match request.status.as_deref() {
        None => Some(current.status),
        Some(text) => parse_or_record(text, "status", &mut errors),
    };
    let metadata = match request.metadata {
        Patch::Missing => current.metadata.clone(),
        Patch::Null => None,
        Patch::Value(value) => parse_metadata(Some(value), &mut errors),
    };
    let config_value = driver.and_then(|driver| {
        // Same driver: the patch is merged over the stored config. A new driver starts from the patch alone, so
        // nothing — above all no secret reference — is inherited from the old driver's config.
        if driver != current.driver {
            Some(request.config.clone().unwrap_or_else(|| json!({})))
        } else {
            match &request.config {
                None => Some(Value::Object(current.config.clone())),
                Some(Value::Object(patch)) => {
                    Some(Value::Object(merge_config(&current.config, patch)))
                }
                Some(other) => {
                    errors.push(
                        CONFIG_PATH,
                        format!("must be an object, not {}", json_type_name(other)),
                    );
                    None
                }
            }
        }
    });
    let config = driver
        .zip(config_value.as_ref())
        .and_then(|(driver, value)| parse_config(&state, driver, value, &mut errors));
    let (Some(name), Some(driver), Some(status), Some(mut config), true) =
        (name, driver, status, config, errors.is_empty())
    else {
        return Err(ApiError::validation(errors));
    };
    vault::check_secret_refs(state.store(), current.company_id, Some(current.id), &config).await?;
    // Only a config that changes is put to the driver: a rename does not call a plugin.
    if let Some(value) = config_value
        .as_ref()
        .filter(|_| request.config.is_some() || driver != current.driver)
    {
        driver_accepts(&state, current.company_id, driver, value).await?;
    }
    // Read from the stored shape, not a parse: the old config's provider may be gone from this build.
    let old_refs = stored_secret_refs(&current.config);

    let sealed = vault::seal_inline_secrets(
        state.store(),
        state.cipher(),
        current.company_id,
        current.id,
        &mut config,
    )
    .await?;
    let updated = Environment {
        name,
        description,
        driver,
        status,
        config: stored_shape(&config)?,
        metadata,
        updated_at: Timestamp::now().max(current.updated_at),
        ..current.clone()
    };
    let stored = match state.store().update_environment(&updated).await {
        Ok(Some(stored)) => stored,
        Ok(None) => {
            vault::forget(state.store(), &sealed).await;
            return Err(ApiError::not_found("environment"));
        }
        Err(error) => {
            vault::forget(state.store(), &sealed).await;
            return Err(error.into());
        }
    };
    // Secrets the new config dropped are forgotten, unless a lease acquired with the old config still needs them
    // for its cleanup (then that cleanup forgets them).
    vault::forget_unless_needed(state.store(), stored.id, &old_refs, &stored.config).await;

    let summary = change_summary(&current, &stored);
    tracing::info!(env.id = %stored.id, "environment updated");
    record_activity(&state, &principal, &stored, "environment.updated", summary).await;
    let probe = state.store().last_probe(stored.id).await?;
    Ok(Json(
        EnvironmentResponse::full(&stored).with_last_probe(probe.as_ref()),
    ))
}

#[utoipa::path(
    delete,
    path = "/api/environments/{id}",
    tag = "environments",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The environment's id"),
    ),
    responses(
        (status = 200, description = "The removed environment; its active leases were released first", body = EnvironmentResponse),
        (status = 409, description = "`environment_is_default`: it is its company's default environment", body = crate::api::openapi::ErrorDoc),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<EnvironmentResponse>, ApiError> {
    let environment = load_environment(&state, &id).await?;
    principal.manage(environment.company_id)?;
    // A company's default environment stays until the default is changed: refused before its runs are stopped.
    super::companies::refuse_deleting_default(&state, &environment).await?;
    state.runs().retire_environment(&environment).await?;
    let removed = state
        .store()
        .delete_environment(environment.id)
        .await?
        .ok_or_else(|| ApiError::not_found("environment"))?;
    if let Err(error) = state
        .store()
        .delete_secrets_of_environment(removed.id)
        .await
    {
        tracing::warn!(env.id = %removed.id, error = %crate::error_chain::DisplayChain(&error), "could not delete secrets");
    }
    tracing::info!(env.id = %removed.id, "environment deleted");
    record_activity(
        &state,
        &principal,
        &removed,
        "environment.deleted",
        json!({"name": removed.name, "driver": removed.driver.as_str()}),
    )
    .await;
    Ok(Json(EnvironmentResponse::full(&removed)))
}

#[utoipa::path(
    post,
    path = "/api/environments/{id}/probe",
    tag = "environments",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The environment's id"),
    ),
    responses(
        (status = 200, description = "What the probe found; a failure is `ok: false`, never an error", body = ProbeResponse),
    )
)]
pub async fn probe(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ProbeResponse>, ApiError> {
    let environment = load_environment(&state, &id).await?;
    principal.manage(environment.company_id)?;
    let opened = vault::open_config(
        state.store(),
        state.cipher(),
        state.drivers().providers(),
        &environment,
    )
    .await;
    let started = Timestamp::now();
    let result = run_probe(&state, environment.company_id, environment.driver, opened).await;
    tracing::info!(env.id = %environment.id, ok = result.ok, "environment probed");
    // The probe's answer stands whether or not it could be kept (the environment may be gone by now).
    if let Err(error) = state
        .store()
        .record_probe(environment.id, started, &result)
        .await
    {
        tracing::warn!(env.id = %environment.id, error = %crate::error_chain::DisplayChain(&error), "could not keep the probe's result");
    }
    record_activity(
        &state,
        &principal,
        &environment,
        "environment.probed",
        json!({"driver": result.driver.as_str(), "ok": result.ok}),
    )
    .await;
    Ok(Json(ProbeResponse::from(&result)))
}

#[utoipa::path(
    post,
    path = "/api/companies/{company_id}/environments/probe-config",
    tag = "environments",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
    ),
    request_body = ProbeConfigRequest,
    responses(
        (status = 200, description = "What a probe of the unsaved config found; nothing is stored", body = ProbeResponse),
    )
)]
pub async fn probe_config(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    ApiJson(request): ApiJson<ProbeConfigRequest>,
) -> Result<Json<ProbeResponse>, ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.manage(company_id)?;
    load_company(&state, company_id).await?;
    let mut errors = ValidationErrors::new();
    if let Some(name) = &request.name {
        record(normalize_name(name), "name", &mut errors);
    }
    normalize_description(request.description, &mut errors);
    parse_metadata(request.metadata, &mut errors);
    let driver = parse_or_record::<Driver>(&request.driver, "driver", &mut errors);
    let config_value = request.config.unwrap_or_else(|| json!({}));
    let config = driver.and_then(|driver| parse_config(&state, driver, &config_value, &mut errors));
    let Some(config) = config.filter(|_| errors.is_empty()) else {
        return Err(ApiError::validation(errors));
    };
    // An unsaved config may use the company's stored secrets, and inline ones in memory only: nothing is persisted.
    vault::check_secret_refs(state.store(), company_id, None, &config).await?;
    let driver = config.driver();
    let opened =
        vault::open_unsaved_config(state.store(), state.cipher(), company_id, config).await;
    let result = run_probe(&state, company_id, driver, opened).await;
    let details = json!({
        "driver": result.driver.as_str(),
        "ok": result.ok,
        "configTopLevelKeyCount": config_value.as_object().map_or(0, Map::len),
    });
    support::record_activity(
        &state,
        &principal,
        Some(company_id),
        "environment",
        "unsaved".to_owned(),
        "environment.probed_unsaved",
        details,
    )
    .await;
    Ok(Json(ProbeResponse::from(&result)))
}

#[utoipa::path(
    get,
    path = "/api/companies/{company_id}/environments/capabilities",
    tag = "environments",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
    ),
    responses(
        (status = 200, description = "Drivers, sandbox providers and plugin drivers with their config schemas", body = CapabilitiesResponse),
    )
)]
pub async fn capabilities(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
) -> Result<Json<CapabilitiesResponse>, ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.access(company_id)?;
    load_company(&state, company_id).await?;
    let mut response = CapabilitiesResponse::from(&state.drivers().capabilities());
    if !state.host().may_use_local(company_id)
        && let Some(local) = response.drivers.get_mut(Driver::Local.as_str())
    {
        local.status = "unavailable";
        local.supports_saved_probe = false;
        local.supports_unsaved_probe = false;
        local.supports_run_execution = false;
        local.note = Some(
            "Local environments belong to the default company only; the operator allows them for every company with `berth serve --local-environments all`",
        );
    }
    Ok(Json(response))
}

// === helpers ===

fn view(environment: &Environment, access: CompanyAccess) -> EnvironmentResponse {
    match access {
        CompanyAccess::Manage => EnvironmentResponse::full(environment),
        CompanyAccess::Read => EnvironmentResponse::redacted(environment),
    }
}

/// Probes a config opened with its secrets decrypted for the moment of the probe. A probe never fails as an error: a
/// stored config that no longer parses, or an unreadable secret, is a failed probe that says so.
async fn run_probe(
    state: &AppState,
    company_id: CompanyId,
    driver: Driver,
    opened: Result<ResolvedConfig, VaultError>,
) -> ProbeResult {
    let opened = match opened {
        Err(VaultError::StoredConfigInvalid(errors)) => {
            return ProbeResult::failed(
                driver,
                format!("the stored config is no longer valid ({errors}); update the environment"),
            );
        }
        other => other,
    };
    // A company without Local environments learns nothing about this host (the local probe names paths on it).
    // (Opening a Local config above decrypted nothing: it has no secrets.)
    if driver == Driver::Local
        && let Err(refused) = state.host().check_local(company_id)
    {
        return ProbeResult::failed(Driver::Local, refused.to_string());
    }
    match opened {
        Ok(config) => state.drivers().probe(config.as_config()).await,
        Err(error) => {
            // Said as the API would say it: an internal cause is logged, never shown.
            let error = ApiError::from(error);
            ProbeResult::failed(
                driver,
                format!("cannot use the environment's secrets: {}", error.message()),
            )
        }
    }
}

fn parse_config(
    state: &AppState,
    driver: Driver,
    value: &Value,
    errors: &mut ValidationErrors,
) -> Option<DriverConfig> {
    DriverConfig::parse(driver, value, state.drivers().providers())
        .map_err(|problems| errors.extend(problems))
        .ok()
}

/// Asks the driver itself (a plugin's `environmentValidateConfig`) whether it takes the config `value`, which passed
/// validation, with its secrets open for the call: 422 with the driver's paths when it does not. A driver that cannot
/// judge now (a plugin that is down) does not block the change.
async fn driver_accepts(
    state: &AppState,
    company_id: CompanyId,
    driver: Driver,
    value: &Value,
) -> Result<(), ApiError> {
    // Sandbox providers, plugin drivers and ssh (whose key must decode, with its passphrase) judge configs beyond
    // validation: for the others, opening the config's secrets would be work (a read and a decryption per secret)
    // for nothing.
    if !matches!(driver, Driver::Sandbox | Driver::Plugin | Driver::Ssh) {
        return Ok(());
    }
    let Ok(config) = DriverConfig::parse(driver, value, state.drivers().providers()) else {
        return Ok(());
    };
    let opened =
        vault::open_unsaved_config(state.store(), state.cipher(), company_id, config).await?;
    let problems = state.drivers().validate(opened.as_config()).await;
    problems.into_result(()).map_err(ApiError::validation)
}

fn stored_shape(config: &DriverConfig) -> Result<Map<String, Value>, ApiError> {
    config.to_stored().ok_or_else(|| {
        // Unreachable by construction: every inline secret was sealed just before. Refuse rather than persist one.
        ApiError::new(
            berth_core::ErrorKind::Internal,
            "internal_error",
            "internal error",
        )
    })
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|text| !text.is_empty())
}

fn parse_or_record<T>(text: &str, path: &str, errors: &mut ValidationErrors) -> Option<T>
where
    T: std::str::FromStr<Err = berth_core::company::UnknownVariant>,
{
    text.parse::<T>()
        .map_err(|error| errors.push(path, error.to_string()))
        .ok()
}

fn record<T>(
    result: Result<T, &'static str>,
    path: &str,
    errors: &mut ValidationErrors,
) -> Option<T> {
    result.map_err(|message| errors.push(path, message)).ok()
}

fn normalize_description(
    description: Option<String>,
    errors: &mut ValidationErrors,
) -> Option<String> {
    let description = description
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty())?;
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        errors.push(
            "description",
            format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
        );
        return None;
    }
    Some(description)
}

/// Metadata is free-form but must be an object (or null); it is bounded by the request size limit.
fn parse_metadata(
    value: Option<Value>,
    errors: &mut ValidationErrors,
) -> Option<Map<String, Value>> {
    match value? {
        Value::Null => None,
        Value::Object(object) => Some(object),
        other => {
            errors.push(
                "metadata",
                format!("must be an object or null, not {}", json_type_name(&other)),
            );
            None
        }
    }
}

/// What changed, without a single config or metadata value: activity rows never hold config.
fn change_summary(before: &Environment, after: &Environment) -> Value {
    let mut changed = Vec::new();
    if before.name != after.name {
        changed.push("name");
    }
    if before.description != after.description {
        changed.push("description");
    }
    if before.driver != after.driver {
        changed.push("driver");
    }
    if before.status != after.status {
        changed.push("status");
    }
    let config_changed = before.config != after.config;
    if config_changed {
        changed.push("config");
    }
    let metadata_changed = before.metadata != after.metadata;
    if metadata_changed {
        changed.push("metadata");
    }
    json!({
        "changedFields": changed,
        "name": after.name,
        "driver": after.driver.as_str(),
        "status": after.status.as_str(),
        "configChanged": config_changed,
        "configTopLevelKeyCount": after.config.len(),
        "metadataChanged": metadata_changed,
        "metadataTopLevelKeyCount": after.metadata.as_ref().map_or(0, Map::len),
    })
}

async fn record_activity(
    state: &AppState,
    principal: &Principal,
    environment: &Environment,
    action: &str,
    details: Value,
) {
    support::record_activity(
        state,
        principal,
        Some(environment.company_id),
        "environment",
        environment.id.to_string(),
        action,
        details,
    )
    .await;
}
