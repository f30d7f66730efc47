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

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use berth_core::ids::RunId;
use berth_core::provider::BoxFuture;
use berth_core::time::Timestamp;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use zeroize::Zeroizing;

use crate::error::BridgeError;
use crate::policy::{BridgePolicy, normalize_path};
use crate::signing::{
    BridgeSecrets, HEADER_NONCE, HEADER_RUN_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, SigningKey,
    sign,
};

/// Says whether a run may still use its bridge. Asked on every request, after the credential checks out.
pub trait RunGate: Send + Sync + 'static {
    fn is_live(&self, run_id: RunId) -> BoxFuture<'_, bool>;
}

/// What the bridge records about one request. Never a body, a query string or a credential.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub method: String,
    /// The path only: a query string may hold secrets.
    pub path: String,
    pub status: u16,
    pub latency: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The rejection code; `None` when the request was forwarded (whatever the upstream answered).
    pub code: Option<&'static str>,
}

/// Receives an [`AuditEntry`] for every request. Called on the request's task: it must not block.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, run_id: RunId, entry: AuditEntry);
}

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

/// A running accept loop. [`shutdown`](Self::shutdown) it; dropping it stops it too, without a grace period.
pub struct BridgeListener {
    local_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<Duration>>,
    task: Option<JoinHandle<()>>,
}

struct Inner {
    run_id: RunId,
    run_id_header: HeaderValue,
    secrets: Arc<BridgeSecrets>,
    signing_key: SigningKey,
    upstream: Result<Upstream, &'static str>,
    policy: Arc<BridgePolicy>,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
    gate: Arc<dyn RunGate>,
    audit: Arc<dyn AuditSink>,
    header_read_timeout: Duration,
    in_flight: Arc<Semaphore>,
    client: Client<HttpConnector, Full<Bytes>>,
}

struct Upstream {
    /// `http://host:port`.
    origin: String,
    /// The base URL's path without its trailing `/`; empty for none.
    prefix: String,
    /// `Bearer <upstream token>`, marked sensitive.
    authorization: HeaderValue,
}

/// A listener's life: connections watch it to stop taking requests, then to stop altogether.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Stopped,
}

/// Idle pooled upstream connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const LISTEN_BACKLOG: u32 = 1024;
/// Connections one listener serves at once. Past this, accepting pauses (new clients wait in the kernel's backlog)
/// until one closes: a flood of idle connections costs a bounded number of tasks and descriptors.
const MAX_CONNECTIONS: usize = 4096;
/// HTTP/2 keep-alive pings, so a peer that vanished without closing is noticed.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not about one connection (out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Audit paths are cut to this many bytes.
const MAX_AUDIT_PATH: usize = 512;
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
        let upstream = Upstream::new(&upstream, &token);
        if let Err(what) = &upstream {
            tracing::error!(%run_id, "bridge misconfigured: {what}; every request will fail");
        }

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let max_in_flight = usize::try_from(policy.max_in_flight).unwrap_or(usize::MAX);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(max_in_flight)
            .build(connector);

        let run_id_header = HeaderValue::try_from(run_id.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        Self {
            inner: Arc::new(Inner {
                run_id,
                run_id_header,
                signing_key: secrets.signing_key(run_id),
                secrets,
                upstream,
                request_headers: policy.request_header_names(),
                response_headers: policy.response_header_names(),
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                policy,
                gate,
                audit,
                header_read_timeout,
                client,
            }),
        }
    }

    /// Serves one connection over any byte stream (TCP, a Unix socket, an SSH forwarded channel) until it closes:
    /// HTTP/1.1, or HTTP/2 when the client opens with the HTTP/2 preface. A client that has not started a request
    /// within `header_read_timeout` is disconnected.
    pub async fn serve_connection<IO>(&self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(io, None).await;
    }

    /// Binds `addr` and serves every connection on it, each on its own task.
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<BridgeListener, BridgeError> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        let local_addr = listener.local_addr()?;
        Ok(self.spawn_listener(Tcp(listener), Some(local_addr)))
    }

    /// Binds a Unix socket at `path` (which must not exist) and serves every connection on it. The socket file is
    /// removed when the listener shuts down.
    pub async fn listen_unix(&self, path: &Path) -> Result<BridgeListener, BridgeError> {
        let listener = UnixListener::bind(path)?;
        Ok(self.spawn_listener(
            Unix {
                listener,
                path: path.to_owned(),
            },
            None,
        ))
    }

    fn spawn_listener<A: Acceptor>(
        &self,
        acceptor: A,
        local_addr: Option<SocketAddr>,
    ) -> BridgeListener {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(self.clone(), acceptor, stopped));
        BridgeListener {
            local_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Serves one connection; `phase` is the listener's, when there is one.
    async fn serve<IO>(&self, mut io: IO, phase: Option<watch::Receiver<Phase>>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = &*self.inner;
        // hyper-util's auto builder would wait for the first bytes without any deadline, so the protocol is sniffed
        // here, under the header timeout, and the builder told which one it is.
        let sniff = tokio::time::timeout(inner.header_read_timeout, sniff_protocol(&mut io));
        let sniffed = match phase.clone() {
            None => sniff.await,
            Some(mut phase) => tokio::select! {
                sniffed = sniff => sniffed,
                () = reached(&mut phase, Phase::Draining) => return,
            },
        };
        let (http2, prefix) = match sniffed {
            Ok(Ok(Some(sniffed))) => sniffed,
            Ok(Ok(None)) => return,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "bridge connection failed before a request");
                return;
            }
            Err(_) => {
                tracing::debug!(run_id = %inner.run_id, "bridge connection sent no request in time; closed");
                return;
            }
        };
        let io = TokioIo::new(Prefixed { prefix, io });

        let mut builder = auto::Builder::new(StreamExecutor {
            stop: phase.clone(),
        });
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(inner.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
            .max_concurrent_streams(inner.policy.max_in_flight.max(1));
        let builder = if http2 {
            builder.http2_only()
        } else {
            builder.http1_only()
        };

        let service = {
            let bridge = self.clone();
            let phase = phase.clone();
            service_fn(move |request| {
                let bridge = bridge.clone();
                let draining = phase
                    .as_ref()
                    .is_some_and(|phase| *phase.borrow() != Phase::Running);
                async move { Ok::<_, Infallible>(bridge.handle(request, draining).await) }
            })
        };
        let mut connection = pin!(builder.serve_connection(io, service));
        let Some(mut phase) = phase else {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "bridge connection ended with an error");
            }
            return;
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "bridge connection ended with an error");
                }
                return;
            }
            () = reached(&mut phase, Phase::Draining) => {}
        }
        // Let the request in progress finish, take no more; stop outright when the grace period is over.
        connection.as_mut().graceful_shutdown();
        tokio::select! {
            _ = connection.as_mut() => {}
            () = reached(&mut phase, Phase::Stopped) => {}
        }
    }

    /// Handles one request and audits it, whatever happens (a request dropped half way is audited as 499).
    async fn handle(&self, request: Request<Incoming>, draining: bool) -> Response<Full<Bytes>> {
        let mut audit = PendingAudit::new(&self.inner, request.method(), request.uri().path());
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
        self.authenticate(&parts.headers).await?;

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
        self.forward(&parts, path, body).await
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<(), BridgeError> {
        let inner = &*self.inner;
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values.next().ok_or(BridgeError::CredentialMissing)?;
        if values.next().is_some() {
            return Err(BridgeError::CredentialMalformed);
        }
        let text = value
            .to_str()
            .map_err(|_| BridgeError::CredentialMalformed)?;
        let (scheme, token) = text
            .split_once(' ')
            .ok_or(BridgeError::CredentialMalformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(BridgeError::CredentialMalformed);
        }
        let credential = inner
            .secrets
            .credential_issuer()
            .verify(token.trim_matches(' '), Timestamp::now())?;
        let same_run: bool = credential
            .run_id
            .as_uuid()
            .as_bytes()
            .ct_eq(inner.run_id.as_uuid().as_bytes())
            .into();
        if !same_run {
            return Err(BridgeError::CredentialWrongRun);
        }
        if !inner.gate.is_live(inner.run_id).await {
            return Err(BridgeError::RunEnded);
        }
        Ok(())
    }

    async fn forward(
        &self,
        parts: &http::request::Parts,
        path: &str,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>, BridgeError> {
        let inner = &*self.inner;
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

        let limit = inner.policy.max_response_bytes;
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
        let timeout = Duration::from_millis(inner.policy.upstream_timeout_ms);
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

// === impl BridgeListener ===

impl BridgeListener {
    /// The bound address, for TCP listeners.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops accepting at once (the listening socket is closed before anything else), lets requests in flight
    /// finish for up to `grace`, then drops whatever is left. Requests that arrive on kept-alive connections after
    /// this started get 503 `bridge_shutting_down`. Returns when every connection is gone.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            // The accept loop only ends once told to, so it is there to hear this.
            let _ = stop.send(grace);
        }
        if let Some(task) = self.task.take()
            && let Err(err) = task.await
        {
            tracing::error!(error = %err, "bridge accept loop failed");
        }
    }
}

impl Drop for BridgeListener {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Duration::ZERO);
        }
    }
}

impl fmt::Debug for BridgeListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeListener")
            .field("local_addr", &self.local_addr)
            .field("running", &self.stop.is_some())
            .finish()
    }
}

// === accepting ===

/// A listening socket the accept loop can take connections from.
trait Acceptor: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;

    /// Closes the listening socket and cleans up after it.
    fn close(self);
}

struct Tcp(TcpListener);

struct Unix {
    listener: UnixListener,
    path: PathBuf,
}

impl Acceptor for Tcp {
    type Io = TcpStream;

    async fn accept(&mut self) -> io::Result<TcpStream> {
        let (stream, _) = self.0.accept().await?;
        // Small request/response exchanges: do not wait to coalesce.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn close(self) {}
}

impl Acceptor for Unix {
    type Io = UnixStream;

    async fn accept(&mut self) -> io::Result<UnixStream> {
        let (stream, _) = self.listener.accept().await?;
        Ok(stream)
    }

    fn close(self) {
        drop(self.listener);
        if let Err(err) = std::fs::remove_file(&self.path)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %err, "could not remove the bridge socket");
        }
    }
}

async fn accept_loop<A: Acceptor>(
    bridge: Bridge,
    mut acceptor: A,
    mut stop: oneshot::Receiver<Duration>,
) {
    let (phase, _) = watch::channel(Phase::Running);
    let mut connections = JoinSet::new();
    let grace = loop {
        tokio::select! {
            grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
            accepted = acceptor.accept(), if connections.len() < MAX_CONNECTIONS => match accepted {
                Ok(io) => {
                    let bridge = bridge.clone();
                    let phase = phase.subscribe();
                    connections.spawn(async move { bridge.serve(io, Some(phase)).await });
                }
                Err(err) if is_per_connection(&err) => {
                    tracing::debug!(error = %err, "bridge accept failed for one connection");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "bridge accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };

    // Nothing listens from here on.
    acceptor.close();
    phase.send_replace(Phase::Draining);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    phase.send_replace(Phase::Stopped);
    if !drained {
        tracing::debug!(
            run_id = %bridge.inner.run_id,
            connections = connections.len(),
            "bridge grace period over; dropping the remaining connections"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Resolves once the listener reaches `target` (or is gone).
async fn reached(phase: &mut watch::Receiver<Phase>, target: Phase) {
    let _ = phase.wait_for(|phase| *phase >= target).await;
}

/// Runs HTTP/2 streams on their own tasks, like `TokioExecutor`, but ends them when the listener stops, so nothing
/// outlives a shutdown.
#[derive(Clone)]
struct StreamExecutor {
    stop: Option<watch::Receiver<Phase>>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        match self.stop.clone() {
            None => {
                tokio::spawn(future);
            }
            Some(mut stop) => {
                tokio::spawn(async move {
                    tokio::select! {
                        () = future => {}
                        () = reached(&mut stop, Phase::Stopped) => {}
                    }
                });
            }
        }
    }
}

/// Reads until the bytes either diverge from the HTTP/2 preface (HTTP/1) or complete it (HTTP/2). `None` when the
/// client closed without sending anything.
async fn sniff_protocol<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<Option<(bool, Bytes)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let read = io.read(&mut buf[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            break;
        }
        let fresh = filled..filled + read;
        filled += read;
        if buf[fresh.clone()] != H2_PREFACE[fresh] {
            break;
        }
    }
    let http2 = filled == buf.len() && buf == *H2_PREFACE;
    Ok(Some((http2, Bytes::copy_from_slice(&buf[..filled]))))
}

/// A stream with some bytes already read from it put back in front.
struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let take = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(take));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// === requests ===

/// Reads the request body within `limit`. No body at all is fine whatever the content type; a body must be JSON.
async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limit: u64,
    read: &mut u64,
) -> Result<Bytes, BridgeError> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    if !is_json(headers) {
        return Err(BridgeError::UnsupportedMediaType);
    }
    // A declared length over the limit is refused before reading a byte of it.
    if body.size_hint().lower() > limit {
        return Err(BridgeError::PayloadTooLarge { limit });
    }
    let collected = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
        .map_err(|err| {
            if err.downcast_ref::<LengthLimitError>().is_some() {
                BridgeError::PayloadTooLarge { limit }
            } else {
                BridgeError::RequestBodyUnreadable
            }
        })?;
    let bytes = collected.to_bytes();
    *read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    Ok(bytes)
}

/// `application/json` or `application/<anything>+json`, with any parameters; exactly one `Content-Type`.
fn is_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let Some(subtype) = essence.strip_prefix("application/") else {
        return false;
    };
    let is_token = |text: &str| {
        !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    subtype == "json" || subtype.strip_suffix("+json").is_some_and(is_token)
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

/// The audit record of a request in progress. Recorded by [`finish`](Self::finish), or on drop as 499
/// `request_cancelled` when the request was abandoned (the client left, or a shutdown's grace period ran out).
struct PendingAudit<'a> {
    inner: &'a Inner,
    method: String,
    path: String,
    started: Instant,
    request_bytes: u64,
    finished: bool,
}

impl<'a> PendingAudit<'a> {
    fn new(inner: &'a Inner, method: &Method, path: &str) -> Self {
        let mut end = path.len().min(MAX_AUDIT_PATH);
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            inner,
            method: method.as_str().to_owned(),
            path: path[..end].to_owned(),
            started: Instant::now(),
            request_bytes: 0,
            finished: false,
        }
    }

    fn finish(mut self, status: u16, response_bytes: u64, code: Option<&'static str>) {
        self.finished = true;
        self.record(status, response_bytes, code);
    }

    fn record(&mut self, status: u16, response_bytes: u64, code: Option<&'static str>) {
        self.inner.audit.record(
            self.inner.run_id,
            AuditEntry {
                method: std::mem::take(&mut self.method),
                path: std::mem::take(&mut self.path),
                status,
                latency: self.started.elapsed(),
                request_bytes: self.request_bytes,
                response_bytes,
                code,
            },
        );
    }
}

impl Drop for PendingAudit<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.record(499, 0, Some("request_cancelled"));
        }
    }
}

#[cfg(test)]
mod tests;
