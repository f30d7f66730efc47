//! A small HTTP client for the berth API, used by the CLI subcommands, and the settings every client subcommand
//! shares (`ClientArgs`, opened into a `Session`): the command line (`cli`) and `berth run` (`run_command`) both
//! use them, so they live here rather than in either.

use std::fmt;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::data_dir::default_data_dir;
use crate::serve::ADMIN_TOKEN_FILE;

/// An API call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The cause is left to the `source()` chain, which the CLI renders (`{:#}`): naming it here printed it twice.
    #[error("cannot reach berth at {url} (is `berth serve` running?)")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{message} ({code}, HTTP {status}){}", render_details(.details))]
    Api {
        status: u16,
        code: String,
        message: String,
        details: Vec<(String, String)>,
    },
    #[error("berth answered HTTP {status} with an unexpected body")]
    UnexpectedResponse { status: u16 },
}

fn render_details(details: &[(String, String)]) -> String {
    details
        .iter()
        .map(|(path, message)| format!("\n  {path}: {message}"))
        .collect()
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::UnexpectedResponse { status } => {
                Some(*status)
            }
            ClientError::Unreachable { .. } => None,
        }
    }
}

pub struct ApiClient {
    http: reqwest::Client,
    base_url: String,
    token: Zeroizing<String>,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    pub fn new(base_url: &str, token: Zeroizing<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(Method::DELETE, path, None).await
    }

    /// Opens a live event stream (`text/event-stream`); the caller reads the body as it arrives.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{path}", self.base_url);
        let response = self
            .http
            .get(&url)
            .bearer_auth(self.token.as_str())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base_url.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body: Value = response
            .json()
            .await
            .map_err(|_| ClientError::UnexpectedResponse {
                status: status.as_u16(),
            })?;
        Err(api_error(status, &body))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(self.token.as_str());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base_url.clone(),
                source,
            })?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|_| ClientError::UnexpectedResponse {
                status: status.as_u16(),
            })?;
        if status.is_success() {
            return Ok(body);
        }
        Err(api_error(status, &body))
    }
}

fn api_error(status: StatusCode, body: &Value) -> ClientError {
    let error = &body["error"];
    let (Some(code), Some(message)) = (error["code"].as_str(), error["message"].as_str()) else {
        return ClientError::UnexpectedResponse {
            status: status.as_u16(),
        };
    };
    let details = error["details"]
        .as_array()
        .map(|details| {
            details
                .iter()
                .map(|detail| {
                    (
                        detail["path"].as_str().unwrap_or_default().to_owned(),
                        detail["message"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ClientError::Api {
        status: status.as_u16(),
        code: code.to_owned(),
        message: message.to_owned(),
        details,
    }
}

/// How client subcommands find the server, the token and the company.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Base URL of the berth server.
    #[arg(long, env = "BERTH_URL", default_value = "http://127.0.0.1:7420")]
    pub server: String,
    /// API token [default: the admin token in <data-dir>/admin-token]. Prefer BERTH_TOKEN: argv is visible to others.
    #[arg(long, env = "BERTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Company id or name [default: the company named `default`, or the API key's own company].
    #[arg(long, env = "BERTH_COMPANY")]
    pub company: Option<String>,
    /// Data dir holding the admin token [default: as for `berth serve`].
    #[arg(long, env = "BERTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A connected client plus the company it acts for.
pub(crate) struct Session {
    pub(crate) api: ApiClient,
    pub(crate) company_id: String,
    /// `--json`: print JSON instead of text.
    pub(crate) json: bool,
}

impl Session {
    /// Connects and resolves the company the command acts for.
    pub(crate) async fn open(args: ClientArgs) -> anyhow::Result<Self> {
        let company = args.company.clone();
        let mut session = Self::connect(args)?;
        session.company_id = resolve_company(&session.api, company.as_deref()).await?;
        Ok(session)
    }

    /// Connects without asking which company: for routes that name their resource by id (a run, a lease, a key) or
    /// act above companies. `company_id` stays empty.
    pub(crate) fn connect(args: ClientArgs) -> anyhow::Result<Self> {
        let token = match args.token.filter(|token| !token.trim().is_empty()) {
            Some(token) => Zeroizing::new(token),
            None => {
                let data_dir = match args.data_dir {
                    Some(dir) => dir,
                    None => default_data_dir()?,
                };
                let path = data_dir.join(ADMIN_TOKEN_FILE);
                let contents = std::fs::read_to_string(&path).with_context(|| {
                    format!("no token: set BERTH_TOKEN or --token, or start `berth serve` so that {} exists", path.display())
                })?;
                Zeroizing::new(contents.trim().to_owned())
            }
        };
        Ok(Self {
            api: ApiClient::new(&args.server, token),
            company_id: String::new(),
            json: args.json,
        })
    }
}

/// Finds the company id: given as an id (no request), else in one `whoami` — the API key's own company, or the
/// admin's `default` company — else by name among all companies (admin).
async fn resolve_company(api: &ApiClient, company: Option<&str>) -> anyhow::Result<String> {
    if let Some(id) = company.filter(|text| text.parse::<berth_core::ids::CompanyId>().is_ok()) {
        return Ok(id.to_owned());
    }
    let whoami = api.get("/api/whoami").await?;
    if let Some(key) = whoami.get("apiKey") {
        let own = key["companyId"].as_str().unwrap_or_default().to_owned();
        return Ok(own);
    }
    let name = company.unwrap_or(berth_core::company::DEFAULT_COMPANY_NAME);
    if name == berth_core::company::DEFAULT_COMPANY_NAME
        && let Some(id) = whoami["defaultCompany"]["id"].as_str()
    {
        return Ok(id.to_owned());
    }
    let companies = api.get("/api/companies").await?;
    companies
        .as_array()
        .and_then(|list| list.iter().find(|entry| entry["name"] == name))
        .and_then(|entry| entry["id"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no company named `{name}`"))
}
