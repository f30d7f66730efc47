//! The OpenAPI 3.1 description of this API, generated from the handlers' `#[utoipa::path]` attributes and the wire
//! types' `ToSchema` derives, served at `GET /api/openapi.json`.
//!
//! Every route the router serves is listed in [`ApiDoc`]'s `paths`; `tests/it/openapi.rs` fails when a route is
//! missing here or this names a route the server does not have.

use axum::Json;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::{activity, agent, companies, environments, health, leases, metrics, runs};

/// The error body, as the document names it (`Error`).
pub(crate) type ErrorDoc = ErrorBody<'static>;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "berth",
        description = "Where AI-agent work runs: environments, leases, runs and the callback bridge. Errors always \
                       have the body `{\"error\": {\"code\", \"message\", \"details\"?}}`; unknown fields in a \
                       request body are refused (422).",
    ),
    paths(
        health::healthz,
        health::readyz,
        metrics::scrape,
        openapi_json,
        companies::whoami,
        companies::list,
        companies::create,
        companies::get,
        companies::patch,
        companies::create_api_key,
        companies::delete_api_key,
        activity::list,
        environments::list,
        environments::create,
        environments::get,
        environments::patch,
        environments::delete,
        environments::probe,
        environments::probe_config,
        environments::capabilities,
        leases::list,
        leases::get,
        runs::create,
        runs::list,
        runs::get,
        runs::cancel,
        runs::events,
        agent::run,
        agent::post_event,
    ),
    components(schemas(ErrorDoc)),
    modifiers(&SecuritySchemes, &UniformErrors),
    tags(
        (name = "companies", description = "Companies, API keys, the activity log (API.md §3)"),
        (name = "environments", description = "Where runs execute: local, ssh, sandbox, plugin (API.md §4)"),
        (name = "leases", description = "Leases on environments (API.md §4; docs/api.md, \"Leases around a run\": `provider`, `failureReason`)"),
        (name = "runs", description = "Commands run in an environment, and their events (API.md §5)"),
        (name = "agent", description = "Called by a running agent through its callback bridge (API.md §6)"),
        (name = "health", description = "Liveness and readiness, no token"),
        (name = "metrics", description = "Prometheus metrics (docs/api.md, \"Metrics\"): the admin token unless the server runs with `--metrics-public`"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// The two ways to authenticate: the admin token or a company API key, and a run's own credential (only ever
/// presented through that run's callback bridge, which signs the request on to the API).
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let mut run_credential = Http::new(HttpAuthScheme::Bearer);
        run_credential.description = Some(
            "A run-scoped credential, valid only through that run's callback bridge (BERTH_API_URL and
             BERTH_API_TOKEN inside the run)."
                .to_owned(),
        );
        components.add_security_scheme("runCredential", SecurityScheme::Http(run_credential));
    }
}

/// The errors every route can answer with, added to each operation from what it takes rather than repeated on
/// every handler: a token (401, 403), an id in the path (404), a query string (400, 422), a JSON body (400, 413, 415,
/// 422). Each has the uniform error body.
struct UniformErrors;

impl Modify for UniformErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.put,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                add_uniform_errors(operation);
            }
        }
    }
}

fn add_uniform_errors(operation: &mut Operation) {
    let secured = operation
        .security
        .as_ref()
        .is_some_and(|requirements| !requirements.is_empty());
    let parameters = operation.parameters.as_deref().unwrap_or_default();
    let in_path = parameters
        .iter()
        .any(|parameter| parameter.parameter_in == ParameterIn::Path);
    let in_query = parameters
        .iter()
        .any(|parameter| parameter.parameter_in == ParameterIn::Query);
    let has_body = operation.request_body.is_some();
    let mut errors: Vec<(u16, &str)> = Vec::new();
    if has_body {
        errors.push((400, "Malformed JSON, or an empty body"));
        errors.push((413, "The body is over 1 MiB"));
        errors.push((415, "The body is not `application/json`"));
    } else if in_query {
        errors.push((400, "The query string cannot be read"));
    }
    if secured {
        errors.push((401, "No token, or one berth does not know"));
        errors.push((
            403,
            "The token may not do this: another company's resource, a reader key, or not the admin",
        ));
    }
    if in_path {
        errors.push((404, "Nothing with that id (or the id cannot exist)"));
    }
    if has_body || in_query {
        errors.push((
            422,
            "Validation failed: `details` names every problem at its field's path",
        ));
    }
    for (status, description) in errors {
        let status = status.to_string();
        if operation.responses.responses.contains_key(&status) {
            continue;
        }
        let response = ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Error")))
                    .build(),
            )
            .build();
        operation
            .responses
            .responses
            .insert(status, response.into());
    }
}

/// `GET /api/openapi.json`: this document. No token: it describes the API, it holds nothing of anyone's.
#[utoipa::path(get, path = "/api/openapi.json", tag = "health", responses((status = 200, description = "This OpenAPI 3.1 document", body = Object)))]
pub async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Json(ApiDoc::openapi()),
    )
}
