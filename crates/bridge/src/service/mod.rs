//! The bridge: an HTTP server for one run's agent that authenticates it, applies the run's [`BridgePolicy`], and
//! forwards allowed requests to the upstream API with the run's own upstream credential and a request signature.
//!
//! Each request is handled on its own, as soon as it arrives: there is no queue and no polling, and a slow upstream
//! call holds up nothing but itself. Concurrency per run is bounded by a semaphore (`maxInFlight`); requests over
//! the bound are refused at once with 503 rather than queued.
//!
//! Request handling, in order; every rejection is a JSON error body `{"error":{"code","message"}}`, is audited, and
//! forwards nothing:
//! 1. the target must be an origin-form path that [`normalize_path`] accepts (400 `path_rejected`);
//! 2. `Authorization: Bearer <run credential>` must be genuine, unexpired, for this run, and the run live (401);
//! 3. the policy must allow the method and path (403 `route_not_allowed`);
//! 4. a slot under `maxInFlight` must be free (503 `too_many_requests`, `Retry-After: 1`);
//! 5. a body must be JSON (415) and within `maxRequestBytes` (413), checked against `Content-Length` first and then
//!    counted as it is read;
//! 6. the request goes upstream with only allowlisted headers, plus the upstream `Authorization`, `x-berth-run-id`
//!    and the signature headers; the whole exchange has `upstreamTimeoutMs` (504), any failure is 502;
//! 7. the response comes back with only allowlisted headers, its body read in full within `maxResponseBytes` first,
//!    so the agent never gets a truncated body that looks complete (502 `upstream_response_too_large`).
//!
//! This module holds the [`Bridge`] and the order above (`process`); the steps live by concern: `listen`
//! ([`BridgeListener`] and serving a connection, on `berth-listen`'s accept loops and timeouts), `auth` (the run credential, the
//! [`RunGate`], the request body's checks), `forward` (the upstream client, the signed forwarded request, the
//! response) and `audit` ([`AuditEntry`], [`AuditSink`]).

mod audit;
mod auth;
mod forward;
mod listen;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use berth_core::ids::RunId;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use secrecy::SecretString;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::error::BridgeError;
use crate::policy::{BridgePolicy, normalize_path};
use crate::signing::BridgeSecrets;

pub use audit::{AuditEntry, AuditSink};
pub use auth::RunGate;
pub use listen::BridgeListener;

use audit::PendingAudit;
use auth::{authenticate, read_body};
use forward::Forwarder;

/// Everything one run's bridge needs.
pub struct BridgeConfig {
    pub run_id: RunId,
    pub secrets: Arc<BridgeSecrets>,
    /// The upstream base URL, e.g. `http://127.0.0.1:7420`. A path prefix is kept: requests go to prefix + path.
    pub upstream: Uri,
    /// The credential presented upstream; `None` means `secrets.upstream_token(run_id)`.
    pub upstream_token: Option<SecretString>,
    pub policy: Arc<BridgePolicy>,
    pub gate: Arc<dyn RunGate>,
    pub audit: Arc<dyn AuditSink>,
    /// How long a client may take to send a request head (and to start a connection): the slowloris guard.
    pub header_read_timeout: Duration,
}

/// One run's bridge. Cheap to clone; every clone shares the in-flight limit and the upstream connection pool.
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

struct Inner {
    run_id: RunId,
    secrets: Arc<BridgeSecrets>,
    policy: Arc<BridgePolicy>,
    gate: Arc<dyn RunGate>,
    audit: Arc<dyn AuditSink>,
    header_read_timeout: Duration,
    in_flight: Arc<Semaphore>,
    forwarder: Forwarder,
}

// === impl Bridge ===

impl Bridge {
    pub fn new(config: BridgeConfig) -> Self {
        let BridgeConfig {
            run_id,
            secrets,
            upstream,
            upstream_token,
            policy,
            gate,
            audit,
            header_read_timeout,
        } = config;
        let token = upstream_token.unwrap_or_else(|| secrets.upstream_token(run_id));
        let forwarder = Forwarder::new(
            run_id,
            secrets.signing_key(run_id),
            &upstream,
            &token,
            &policy,
        );
        let max_in_flight = usize::try_from(policy.max_in_flight).unwrap_or(usize::MAX);
        Self {
            inner: Arc::new(Inner {
                run_id,
                secrets,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                policy,
                gate,
                audit,
                header_read_timeout,
                forwarder,
            }),
        }
    }

    /// Handles one request and audits it, whatever happens (a request dropped half way is audited as 499).
    async fn handle(&self, request: Request<Incoming>, draining: bool) -> Response<Full<Bytes>> {
        let mut audit = PendingAudit::new(
            &*self.inner.audit,
            self.inner.run_id,
            request.method(),
            request.uri().path(),
        );
        let result = if draining {
            Err(BridgeError::ShuttingDown)
        } else {
            self.process(request, &mut audit.request_bytes).await
        };
        let (response, code) = match result {
            Ok(response) => (response, None),
            Err(err) => {
                tracing::debug!(
                    run_id = %self.inner.run_id,
                    method = %audit.method,
                    path = %audit.path,
                    code = err.code(),
                    "bridge request rejected"
                );
                (error_response(&err), Some(err.code()))
            }
        };
        let response_bytes = response.body().size_hint().exact().unwrap_or(0);
        audit.finish(response.status().as_u16(), response_bytes, code);
        response
    }

    async fn process(
        &self,
        request: Request<Incoming>,
        request_bytes: &mut u64,
    ) -> Result<Response<Full<Bytes>>, BridgeError> {
        let inner = &*self.inner;
        let (parts, body) = request.into_parts();

        // 1. An origin-form target (HTTP/2 always carries scheme and authority, which are ignored).
        if parts.version < Version::HTTP_2
            && (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
        {
            return Err(BridgeError::PathRejected {
                reason: "the request target must be a path (origin-form)",
            });
        }
        if parts.method == Method::CONNECT {
            return Err(BridgeError::PathRejected {
                reason: "CONNECT is not accepted",
            });
        }
        let path = normalize_path(parts.uri.path())?;

        // 2. Who is asking.
        authenticate(&inner.secrets, inner.run_id, &*inner.gate, &parts.headers).await?;

        // 3. What they may ask for.
        inner.policy.check(&parts.method, path)?;

        // 4. How much at once. The permit is held until the response is complete.
        let _permit = Arc::clone(&inner.in_flight)
            .try_acquire_owned()
            .map_err(|_| BridgeError::TooManyRequests)?;

        // 5. The body, bounded.
        let body = read_body(
            &parts.headers,
            body,
            inner.policy.max_request_bytes,
            request_bytes,
        )
        .await?;

        // 6 and 7.
        inner.forwarder.forward(&parts, path, body).await
    }
}

impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridge")
            .field("run_id", &self.inner.run_id)
            .field("policy", &self.inner.policy.name)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for BridgeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeConfig")
            .field("run_id", &self.run_id)
            .field("upstream", &self.upstream)
            .field("policy", &self.policy.name)
            .field("header_read_timeout", &self.header_read_timeout)
            .finish_non_exhaustive()
    }
}

// === errors ===

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

fn error_response(err: &BridgeError) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorDetail {
            code: err.code(),
            message: err.to_string(),
        },
    })
    .unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = err.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match err {
        BridgeError::TooManyRequests => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        err if err.status() == http::StatusCode::UNAUTHORIZED => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"berth-bridge\""),
            );
        }
        _ => {}
    }
    response
}

#[cfg(test)]
mod tests;
