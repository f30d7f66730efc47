//! Companies and their API keys (admin only; a company's own keys may read it, and its managers set its default
//! environment), and `whoami` (any token).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use berth_core::company::{ApiKey, ApiKeyRole, Company};
use berth_core::environment::{Driver, Environment, EnvironmentStatus, normalize_name};
use berth_core::ids::{ApiKeyId, CompanyId, EnvironmentId};
use berth_core::time::Timestamp;
use berth_core::validation::ValidationErrors;
use serde_json::json;

use super::auth::Principal;
use super::dto::{
    ApiKeyResponse, CompanyResponse, CreateApiKeyRequest, CreateCompanyRequest, DeletedResponse,
    PatchCompanyRequest, WhoAmIResponse,
};
use super::error::ApiError;
use super::json::{ApiJson, Patch};
use super::support::{load_company, parse_path_id, record_activity};
use crate::state::AppState;
use crate::tokens::token_digest_hex;

/// Prefix of company API key tokens, so a leaked one is recognisable (and greppable by secret scanners).
pub const API_KEY_PREFIX: &str = "berth_key_";

#[utoipa::path(
    get,
    path = "/api/companies",
    tag = "companies",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every company (admin)", body = [CompanyResponse]),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<CompanyResponse>>, ApiError> {
    principal.require_admin()?;
    let companies = state.store().list_companies().await?;
    Ok(Json(companies.iter().map(CompanyResponse::from).collect()))
}

#[utoipa::path(
    post,
    path = "/api/companies",
    tag = "companies",
    security(("bearer" = [])),
    request_body = CreateCompanyRequest,
    responses(
        (status = 201, description = "The new company (admin)", body = CompanyResponse),
        (status = 409, description = "Conflicts with the current state", body = crate::api::openapi::ErrorDoc),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateCompanyRequest>,
) -> Result<(StatusCode, Json<CompanyResponse>), ApiError> {
    principal.require_admin()?;
    let name = normalize_name(&request.name)
        .map_err(|message| ApiError::validation(ValidationErrors::single("name", message)))?;
    let company = Company {
        id: CompanyId::new(),
        name,
        created_at: Timestamp::now(),
        default_environment_id: None,
    };
    state.store().insert_company(&company).await?;
    // With `--local-environments all`, every company can run on this machine from the start.
    if state.host().may_use_local(company.id) {
        state.store().ensure_local_environment(company.id).await?;
    }
    tracing::info!(company.id = %company.id, "company created");
    record_activity(
        &state,
        &principal,
        Some(company.id),
        "company",
        company.id.to_string(),
        "company.created",
        json!({"name": company.name}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(CompanyResponse::from(&company))))
}

/// Where `defaultEnvironmentId` errors point.
const DEFAULT_ENVIRONMENT_PATH: &str = "defaultEnvironmentId";

#[utoipa::path(
    get,
    path = "/api/companies/{company_id}",
    tag = "companies",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
    ),
    responses(
        (status = 200, description = "The company (admin, or any key of the company)", body = CompanyResponse),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
) -> Result<Json<CompanyResponse>, ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.access(company_id)?;
    let company = load_company(&state, company_id).await?;
    Ok(Json(CompanyResponse::from(&company)))
}

#[utoipa::path(
    patch,
    path = "/api/companies/{company_id}",
    tag = "companies",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
    ),
    request_body = PatchCompanyRequest,
    responses(
        (status = 200, description = "The updated company (admin, or a manager key of the company)", body = CompanyResponse),
    )
)]
pub async fn patch(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    ApiJson(request): ApiJson<PatchCompanyRequest>,
) -> Result<Json<CompanyResponse>, ApiError> {
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    principal.manage(company_id)?;
    let company = load_company(&state, company_id).await?;
    let (updated, details) = match request.default_environment_id {
        Patch::Missing => return Ok(Json(CompanyResponse::from(&company))),
        Patch::Null => (
            state
                .store()
                .set_default_environment(company_id, None)
                .await?
                .ok_or_else(|| ApiError::not_found("company"))?,
            json!({"changedFields": [DEFAULT_ENVIRONMENT_PATH], "defaultEnvironmentId": null}),
        ),
        Patch::Value(text) => {
            let environment = usable_default(&state, company_id, &text).await?;
            // The write re-checks that the environment is the company's, so a delete racing this one cannot leave
            // the company pointing at nothing.
            let updated = state
                .store()
                .set_default_environment(company_id, Some(environment.id))
                .await?
                .ok_or_else(no_such_environment)?;
            (
                updated,
                json!({
                    "changedFields": [DEFAULT_ENVIRONMENT_PATH],
                    "defaultEnvironmentId": environment.id.to_string(),
                    "driver": environment.driver.as_str(),
                }),
            )
        }
    };
    tracing::info!(
        company.id = %company_id,
        env.id = ?updated.default_environment_id.map(|id| id.to_string()),
        "company default environment changed"
    );
    record_activity(
        &state,
        &principal,
        Some(company_id),
        "company",
        company_id.to_string(),
        "company.updated",
        details,
    )
    .await;
    Ok(Json(CompanyResponse::from(&updated)))
}

fn no_such_environment() -> ApiError {
    ApiError::validation(ValidationErrors::single(
        DEFAULT_ENVIRONMENT_PATH,
        "no such environment in this company",
    ))
}

/// The environment `text` names, if the company can run in it: one of its own, active, and not a Local one the
/// host denies it (`--local-environments`). Anything else is a 422 at `defaultEnvironmentId`, so a default that
/// would refuse every run is never set.
async fn usable_default(
    state: &AppState,
    company_id: CompanyId,
    text: &str,
) -> Result<Environment, ApiError> {
    let id: EnvironmentId = text.parse().map_err(|_| no_such_environment())?;
    let environment = state
        .store()
        .get_environment(id)
        .await?
        .filter(|environment| environment.company_id == company_id)
        .ok_or_else(no_such_environment)?;
    let problem = if environment.status == EnvironmentStatus::Archived {
        Some("is archived: runs cannot use it")
    } else if environment.driver == Driver::Local && !state.host().may_use_local(company_id) {
        Some(
            "is a Local environment, which this company may not use (berth serve --local-environments)",
        )
    } else {
        None
    };
    match problem {
        Some(message) => Err(ApiError::validation(ValidationErrors::single(
            DEFAULT_ENVIRONMENT_PATH,
            message,
        ))),
        None => Ok(environment),
    }
}

/// Refuses to delete an environment that is its company's default (409 `environment_is_default`), before anything
/// of it is stopped or released. The store's foreign key refuses it too, for a PATCH racing the delete.
pub(crate) async fn refuse_deleting_default(
    state: &AppState,
    environment: &Environment,
) -> Result<(), ApiError> {
    let is_default = state
        .store()
        .get_company(environment.company_id)
        .await?
        .is_some_and(|company| company.default_environment_id == Some(environment.id));
    if is_default {
        return Err(berth_store::StoreError::Conflict(
            berth_store::ConflictKind::EnvironmentIsDefault,
        )
        .into());
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/api/companies/{company_id}/api-keys",
    tag = "companies",
    security(("bearer" = [])),
    params(
        ("company_id" = String, Path, description = "The company's id"),
    ),
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, description = "The new key with its token, shown only here (admin)", body = ApiKeyResponse),
    )
)]
pub async fn create_api_key(
    State(state): State<AppState>,
    principal: Principal,
    Path(company_id): Path<String>,
    ApiJson(request): ApiJson<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<ApiKeyResponse>), ApiError> {
    principal.require_admin()?;
    let company_id: CompanyId = parse_path_id(&company_id, "company")?;
    let mut errors = ValidationErrors::new();
    let name = normalize_name(&request.name)
        .map_err(|message| errors.push("name", message))
        .ok();
    let role = request
        .role
        .parse::<ApiKeyRole>()
        .map_err(|error| errors.push("role", error.to_string()))
        .ok();
    let (Some(name), Some(role)) = (name, role) else {
        return Err(ApiError::validation(errors));
    };
    load_company(&state, company_id).await?;

    let token = format!(
        "{API_KEY_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    let key = ApiKey {
        id: ApiKeyId::new(),
        company_id,
        name,
        role,
        created_at: Timestamp::now(),
    };
    state
        .store()
        .insert_api_key(&key, &token_digest_hex(&token))
        .await?;
    tracing::info!(company.id = %company_id, api_key.id = %key.id, role = %role, "api key created");
    record_activity(
        &state,
        &principal,
        Some(company_id),
        "api_key",
        key.id.to_string(),
        "api_key.created",
        json!({"name": key.name, "role": role.as_str()}),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(ApiKeyResponse::new(&key, Some(token))),
    ))
}

#[utoipa::path(
    delete,
    path = "/api/api-keys/{id}",
    tag = "companies",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The API key's id"),
    ),
    responses(
        (status = 200, description = "Deleted: the key stops working at once (admin)", body = DeletedResponse),
    )
)]
pub async fn delete_api_key(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<DeletedResponse>, ApiError> {
    principal.require_admin()?;
    let id: ApiKeyId = parse_path_id(&id, "api key")?;
    if !state.store().delete_api_key(id).await? {
        return Err(ApiError::not_found("api key"));
    }
    tracing::info!(api_key.id = %id, "api key deleted");
    record_activity(
        &state,
        &principal,
        None,
        "api_key",
        id.to_string(),
        "api_key.deleted",
        json!({}),
    )
    .await;
    Ok(Json(DeletedResponse {
        id: id.to_string(),
        deleted: true,
    }))
}

#[utoipa::path(
    get,
    path = "/api/whoami",
    tag = "companies",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Whose token this is", body = WhoAmIResponse),
    )
)]
pub async fn whoami(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<WhoAmIResponse>, ApiError> {
    Ok(Json(match principal {
        Principal::Admin => {
            let default_company = state
                .store()
                .company_by_name(berth_core::company::DEFAULT_COMPANY_NAME)
                .await?;
            WhoAmIResponse {
                kind: "admin",
                api_key: None,
                default_company: default_company.as_ref().map(CompanyResponse::from),
            }
        }
        Principal::ApiKey(key) => WhoAmIResponse {
            kind: "apiKey",
            api_key: Some(ApiKeyResponse::new(&key, None)),
            default_company: None,
        },
    }))
}
