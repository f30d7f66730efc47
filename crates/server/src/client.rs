//! A small HTTP client for the berth API, used by the CLI subcommands.

use std::fmt;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use zeroize::Zeroizing;

/// An API call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach berth at {url}: is `berth serve` running? ({source})")]
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
