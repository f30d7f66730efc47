//! Forwarding upstream: the pooled upstream client, the forwarded request (allowlisted headers, the upstream
//! credential, the run id and the request signature), and the response, read in full within `maxResponseBytes`.

use std::time::Duration;

use berth_core::ids::RunId;
use berth_core::time::Timestamp;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::error::BridgeError;
use crate::policy::BridgePolicy;
use crate::signing::{
    HEADER_NONCE, HEADER_RUN_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, SigningKey, sign,
};

/// The client every request of one bridge goes upstream with.
type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

struct Upstream {
    /// `http://host:port`.
    origin: String,
    /// The base URL's path without its trailing `/`; empty for none.
    prefix: String,
    /// `Bearer <upstream token>`, marked sensitive.
    authorization: HeaderValue,
}

/// Idle pooled upstream connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The upstream client, keeping up to `max_idle_per_host` idle connections.
fn client(max_idle_per_host: usize) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

/// Everything forwarding needs, built once per bridge: the upstream and its client, the headers the policy lets
/// through each way, the run's signing key and the policy's response limits.
pub(super) struct Forwarder {
    run_id: RunId,
    run_id_header: HeaderValue,
    signing_key: SigningKey,
    upstream: Result<Upstream, &'static str>,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
    client: UpstreamClient,
    /// The policy's `maxResponseBytes`.
    max_response_bytes: u64,
    /// The policy's `upstreamTimeoutMs`.
    upstream_timeout: Duration,
}

// === impl Forwarder ===

impl Forwarder {
    /// Forwarding for `run_id` to `upstream` with `token`, under `policy`. A misconfigured upstream is logged here
    /// and makes every request fail.
    pub(super) fn new(
        run_id: RunId,
        signing_key: SigningKey,
        upstream: &Uri,
        token: &SecretString,
        policy: &BridgePolicy,
    ) -> Self {
        let upstream = Upstream::new(upstream, token);
        if let Err(what) = &upstream {
            tracing::error!(%run_id, "bridge misconfigured: {what}; every request will fail");
        }
        let max_in_flight = usize::try_from(policy.max_in_flight).unwrap_or(usize::MAX);
        let run_id_header = HeaderValue::try_from(run_id.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        Self {
            run_id,
            run_id_header,
            signing_key,
            upstream,
            request_headers: policy.request_header_names(),
            response_headers: policy.response_header_names(),
            client: client(max_in_flight),
            max_response_bytes: policy.max_response_bytes,
            upstream_timeout: Duration::from_millis(policy.upstream_timeout_ms),
        }
    }

    pub(super) async fn forward(
        &self,
        parts: &http::request::Parts,
        path: &str,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>, BridgeError> {
        let inner = self;
        let upstream = inner
            .upstream
            .as_ref()
            .map_err(|what| BridgeError::Misconfigured { what })?;

        let query = parts.uri.query();
        let mut path_and_query = String::with_capacity(
            upstream.prefix.len() + path.len() + query.map_or(0, |query| query.len() + 1),
        );
        path_and_query.push_str(&upstream.prefix);
        path_and_query.push_str(path);
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        let uri = Uri::try_from(format!("{}{path_and_query}", upstream.origin)).map_err(|_| {
            BridgeError::Misconfigured {
                what: "the upstream URL cannot be joined with the request path",
            }
        })?;

        let mut headers = HeaderMap::with_capacity(inner.request_headers.len() + 5);
        for name in &inner.request_headers {
            for value in parts.headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(header::AUTHORIZATION, upstream.authorization.clone());
        headers.insert(
            HeaderName::from_static(HEADER_RUN_ID),
            inner.run_id_header.clone(),
        );
        let signed = sign(
            &inner.signing_key,
            parts.method.as_str(),
            &path_and_query,
            &body,
            Timestamp::now(),
        );
        let signature_headers = (
            HeaderValue::try_from(signed.nonce),
            HeaderValue::try_from(signed.signature),
        );
        let (Ok(nonce), Ok(signature)) = signature_headers else {
            return Err(BridgeError::Misconfigured {
                what: "a signature header is not a valid header value",
            });
        };
        headers.insert(
            HeaderName::from_static(HEADER_TIMESTAMP),
            HeaderValue::from(signed.timestamp),
        );
        headers.insert(HeaderName::from_static(HEADER_NONCE), nonce);
        headers.insert(HeaderName::from_static(HEADER_SIGNATURE), signature);

        let mut request = Request::new(Full::new(body));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        let limit = inner.max_response_bytes;
        let exchange = async {
            let response = inner.client.request(request).await.map_err(|err| {
                tracing::warn!(run_id = %inner.run_id, error = ?err, "bridge upstream request failed");
                BridgeError::UpstreamUnavailable
            })?;
            let (head, body) = response.into_parts();
            if head.status.is_informational() {
                tracing::warn!(run_id = %inner.run_id, status = %head.status, "bridge upstream sent no final response");
                return Err(BridgeError::UpstreamUnavailable);
            }
            if content_length(&head.headers).is_some_and(|length| length > limit) {
                return Err(BridgeError::UpstreamResponseTooLarge { limit });
            }
            let body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
                .collect()
                .await
                .map_err(|err| {
                    if err.downcast_ref::<LengthLimitError>().is_some() {
                        BridgeError::UpstreamResponseTooLarge { limit }
                    } else {
                        tracing::warn!(run_id = %inner.run_id, error = %err, "bridge upstream response body failed");
                        BridgeError::UpstreamUnavailable
                    }
                })?
                .to_bytes();
            Ok((head, body))
        };
        let timeout = inner.upstream_timeout;
        let (head, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| BridgeError::UpstreamTimeout)??;

        let mut response = Response::new(Full::new(body));
        *response.status_mut() = head.status;
        for name in &inner.response_headers {
            for value in head.headers.get_all(name) {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }
        Ok(response)
    }
}

// === impl Upstream ===

impl Upstream {
    fn new(base: &Uri, token: &SecretString) -> Result<Self, &'static str> {
        if base.scheme() != Some(&http::uri::Scheme::HTTP) {
            return Err("the upstream must be an http:// URL");
        }
        let authority = base.authority().ok_or("the upstream URL has no host")?;
        if authority.as_str().contains('@') {
            return Err("the upstream URL must not hold user information");
        }
        if base.query().is_some() {
            return Err("the upstream URL must not have a query");
        }
        let bearer = Zeroizing::new(format!("Bearer {}", token.expose_secret()));
        let mut authorization = HeaderValue::from_str(&bearer)
            .map_err(|_| "the upstream token is not a valid header value")?;
        authorization.set_sensitive(true);
        Ok(Self {
            origin: format!("http://{authority}"),
            prefix: base.path().trim_end_matches('/').to_owned(),
            authorization,
        })
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
