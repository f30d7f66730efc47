//! End-to-end tests of the bridge: real sockets on 127.0.0.1, a real hyper upstream that records what reached it and
//! checks every request signature, and clients that misbehave on purpose.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use berth_core::provider::BoxFuture;
use berth_core::time::Timestamp;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinSet;

use super::*;
use crate::signing::{
    DEFAULT_SIGNATURE_WINDOW, HEADER_NONCE, HEADER_RUN_ID, HEADER_SIGNATURE, MemoryNonceStore,
    verify,
};

const SECRET: [u8; 32] = [42; 32];
const MIB: usize = 1024 * 1024;

// --- The upstream -----------------------------------------------------------------------------------------------

/// What the upstream received, and whether the request signature verified there.
#[derive(Clone, Debug)]
struct Received {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    signature: Result<(), &'static str>,
}

struct TestUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    tasks: JoinSet<()>,
}

impl TestUpstream {
    /// A hyper HTTP/1 server. Routes: `/api/agent/run` (200 JSON plus headers that must not reach the agent),
    /// `/api/agent/events` (202, echoes the body), `/slow/:ms` (answers after a delay), `/big` (20 MiB with a
    /// Content-Length), `/big-stream` (20 MiB, chunked). Paths may carry a prefix.
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let nonces = Arc::new(MemoryNonceStore::new());
        let secrets = Arc::new(BridgeSecrets::new(&SECRET).unwrap());
        let mut tasks = JoinSet::new();
        let log = Arc::clone(&received);
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (log, nonces, secrets) =
                    (Arc::clone(&log), Arc::clone(&nonces), Arc::clone(&secrets));
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let (log, nonces, secrets) =
                            (Arc::clone(&log), Arc::clone(&nonces), Arc::clone(&secrets));
                        async move { upstream_handle(request, &log, &nonces, &secrets).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            received,
            tasks,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn upstream_handle(
    request: Request<Incoming>,
    log: &Mutex<Vec<Received>>,
    nonces: &MemoryNonceStore,
    secrets: &BridgeSecrets,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    let run_id: Option<RunId> = parts
        .headers
        .get(HEADER_RUN_ID)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok());
    let signature = match run_id {
        None => Err("no run id"),
        Some(run_id) => verify(
            &secrets.signing_key(run_id),
            parts.method.as_str(),
            &path_and_query,
            &parts.headers,
            &body,
            Timestamp::now(),
            DEFAULT_SIGNATURE_WINDOW,
            run_id,
            nonces,
        )
        .await
        .map_err(|err| err.code()),
    };
    log.lock().unwrap().push(Received {
        method: parts.method.clone(),
        path_and_query,
        headers: parts.headers.clone(),
        body: body.clone(),
        signature,
    });

    let path = parts.uri.path();
    let route = path.strip_prefix("/base").unwrap_or(path);
    let full = |status: u16, body: Bytes| {
        let mut response = Response::new(Full::new(body).boxed());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        response
    };
    let response = if let Some(ms) = route.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        full(200, Bytes::from_static(b"{\"slow\":true}"))
    } else if route == "/big" {
        full(200, Bytes::from(vec![b'x'; 20 * MIB]))
    } else if route == "/big-stream" {
        let mut response = Response::new(
            Chunked {
                chunk: Bytes::from(vec![b'x'; 64 * 1024]),
                remaining: 20 * 16,
            }
            .boxed(),
        );
        *response.status_mut() = StatusCode::OK;
        response
    } else if route == "/api/agent/events" {
        full(202, body)
    } else {
        let mut response = full(200, Bytes::from_static(b"{\"run\":\"ok\"}"));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("session=1"));
        headers.insert(header::SERVER, HeaderValue::from_static("upstream"));
        headers.insert("x-internal", HeaderValue::from_static("secret"));
        response
    };
    Ok(response)
}

/// A body of `remaining` copies of `chunk`, with no declared length: sent chunked.
struct Chunked {
    chunk: Bytes,
    remaining: usize,
}

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        this.remaining -= 1;
        Poll::Ready(Some(Ok(Frame::data(this.chunk.clone()))))
    }
}

// --- The bridge under test --------------------------------------------------------------------------------------

#[derive(Default)]
struct Gate {
    ended: AtomicBool,
}

impl RunGate for Gate {
    fn is_live(&self, _run_id: RunId) -> BoxFuture<'_, bool> {
        Box::pin(async move { !self.ended.load(Ordering::SeqCst) })
    }
}

#[derive(Default)]
struct Audit {
    entries: Mutex<Vec<(RunId, AuditEntry)>>,
}

impl AuditSink for Audit {
    fn record(&self, run_id: RunId, entry: AuditEntry) {
        self.entries.lock().unwrap().push((run_id, entry));
    }
}

impl Audit {
    fn entries(&self) -> Vec<AuditEntry> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(|(_, entry)| entry.clone())
            .collect()
    }
}

struct Harness {
    bridge: Bridge,
    listener: Option<BridgeListener>,
    addr: SocketAddr,
    run_id: RunId,
    secrets: Arc<BridgeSecrets>,
    token: String,
    gate: Arc<Gate>,
    audit: Arc<Audit>,
    upstream: TestUpstream,
}

fn test_policy(extra: &str) -> BridgePolicy {
    BridgePolicy::from_json(&format!(
        r#"{{"name":"test","routes":[
            {{"method":"GET","path":"/api/agent/run"}},
            {{"method":"POST","path":"/api/agent/events"}},
            {{"method":"GET","path":"/slow/:ms"}},
            {{"method":"GET","path":"/big"}},
            {{"method":"GET","path":"/big-stream"}}
        ]{extra}}}"#
    ))
    .unwrap()
}

struct Options {
    policy: BridgePolicy,
    header_read_timeout: Duration,
    upstream: Option<Uri>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            policy: test_policy(""),
            header_read_timeout: Duration::from_secs(5),
            upstream: None,
        }
    }
}

impl Harness {
    async fn start() -> Self {
        Self::with(Options::default()).await
    }

    async fn with(options: Options) -> Self {
        let upstream = TestUpstream::start().await;
        let secrets = Arc::new(BridgeSecrets::new(&SECRET).unwrap());
        let run_id = RunId::new();
        let gate = Arc::new(Gate::default());
        let audit = Arc::new(Audit::default());
        let bridge = Bridge::new(BridgeConfig {
            run_id,
            secrets: Arc::clone(&secrets),
            upstream: options
                .upstream
                .unwrap_or_else(|| format!("http://{}", upstream.addr).parse().unwrap()),
            upstream_token: None,
            policy: Arc::new(options.policy),
            gate: Arc::clone(&gate) as Arc<dyn RunGate>,
            audit: Arc::clone(&audit) as Arc<dyn AuditSink>,
            header_read_timeout: options.header_read_timeout,
        });
        let listener = bridge
            .listen_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let token = secrets
            .credential_issuer()
            .mint(
                run_id,
                Timestamp::now().saturating_add(Duration::from_secs(600)),
            )
            .expose_secret()
            .to_owned();
        Self {
            bridge,
            listener: Some(listener),
            addr,
            run_id,
            secrets,
            token,
            gate,
            audit,
            upstream,
        }
    }

    fn get(&self, path: &str) -> Request<Full<Bytes>> {
        self.request(Method::GET, path, None)
    }

    fn request(&self, method: Method, path: &str, json: Option<&str>) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if json.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(Bytes::from(json.unwrap_or_default().to_owned())))
            .unwrap()
    }

    async fn shutdown(mut self) {
        if let Some(listener) = self.listener.take() {
            listener.shutdown(Duration::from_secs(1)).await;
        }
    }
}

// --- Clients ----------------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap().to_owned()
    }
}

/// One request on a fresh HTTP/1.1 connection.
async fn send<B>(addr: SocketAddr, request: Request<B>) -> Result<Reply, hyper::Error>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    send_on(stream, request).await
}

async fn send_on<IO, B>(io: IO, request: Request<B>) -> Result<Reply, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await;
    let reply = match response {
        Ok(response) => {
            let (head, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok(Reply {
                status: head.status,
                headers: head.headers,
                body,
            })
        }
        Err(err) => Err(err),
    };
    driver.abort();
    reply
}

/// Writes raw bytes, reads until the server closes, and returns what came back.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

// --- Forwarding -------------------------------------------------------------------------------------------------

#[tokio::test]
async fn forwards_with_the_upstream_token_a_valid_signature_and_only_allowed_headers() {
    let harness = Harness::start().await;
    let mut request = harness.get("/api/agent/run?since=5&tag=a%20b");
    let headers = request.headers_mut();
    for (name, value) in [
        ("cookie", "session=agent"),
        ("host", "evil.example"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-host", "evil.example"),
        ("forwarded", "for=10.0.0.1"),
        ("x-berth-signature", "v1=forged"),
        ("x-berth-run-id", "someone-else"),
        ("x-berth-nonce", "AAAAAAAAAAAAAAAAAAAAAA"),
        ("x-custom", "dropped"),
        ("accept", "application/json"),
        ("if-none-match", "\"v0\""),
        ("idempotency-key", "k-1"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    let reply = send(harness.addr, request).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(&reply.body[..], b"{\"run\":\"ok\"}");
    // Response headers: only the allowlisted ones.
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(reply.headers[header::ETAG], "\"v1\"");
    for absent in ["set-cookie", "server", "x-internal"] {
        assert!(!reply.headers.contains_key(absent), "{absent} leaked");
    }

    let received = harness.upstream.received();
    assert_eq!(received.len(), 1);
    let got = &received[0];
    assert_eq!(got.method, Method::GET);
    assert_eq!(got.path_and_query, "/api/agent/run?since=5&tag=a%20b");
    assert_eq!(got.signature, Ok(()), "the upstream could not verify");
    let upstream_token = harness.secrets.upstream_token(harness.run_id);
    assert_eq!(
        got.headers[header::AUTHORIZATION],
        format!("Bearer {}", upstream_token.expose_secret()).as_str()
    );
    assert_eq!(
        harness
            .secrets
            .verify_upstream_token(upstream_token.expose_secret())
            .unwrap(),
        harness.run_id
    );
    assert_eq!(
        got.headers[HEADER_RUN_ID],
        harness.run_id.to_string().as_str()
    );
    assert_eq!(got.headers.get_all(HEADER_SIGNATURE).iter().count(), 1);
    assert_ne!(got.headers[HEADER_SIGNATURE], "v1=forged");
    assert_ne!(got.headers[HEADER_NONCE], "AAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(
        got.headers[header::HOST],
        harness.upstream.addr.to_string().as_str()
    );
    assert_eq!(got.headers[header::ACCEPT], "application/json");
    assert_eq!(got.headers[header::IF_NONE_MATCH], "\"v0\"");
    assert_eq!(got.headers["idempotency-key"], "k-1");
    for absent in [
        "cookie",
        "x-forwarded-for",
        "x-forwarded-host",
        "forwarded",
        "x-custom",
    ] {
        assert!(!got.headers.contains_key(absent), "{absent} was forwarded");
    }
    assert!(
        !got.headers[header::AUTHORIZATION]
            .to_str()
            .unwrap()
            .contains(&harness.token),
        "the agent's credential was forwarded"
    );

    // The audit has the path without its query, and nothing else of the request.
    let entries = harness.audit.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].method, "GET");
    assert_eq!(entries[0].path, "/api/agent/run");
    assert_eq!(entries[0].status, 200);
    assert_eq!(entries[0].code, None);
    assert_eq!(entries[0].response_bytes, 12);
    harness.shutdown().await;
}

#[tokio::test]
async fn json_bodies_are_forwarded_and_signed() {
    let harness = Harness::start().await;
    let reply = send(
        harness.addr,
        harness.request(
            Method::POST,
            "/api/agent/events",
            Some(r#"{"message":"hi"}"#),
        ),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(&reply.body[..], br#"{"message":"hi"}"#);

    // Structured JSON types with parameters are JSON too; so is a chunked body.
    let mut request = harness.request(Method::POST, "/api/agent/events", Some("{}"));
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("Application/Problem+JSON; charset=utf-8"),
    );
    assert_eq!(
        send(harness.addr, request).await.unwrap().status,
        StatusCode::ACCEPTED
    );
    let chunked = Request::builder()
        .method(Method::POST)
        .uri("/api/agent/events")
        .header(header::AUTHORIZATION, format!("Bearer {}", harness.token))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Chunked {
            chunk: Bytes::from_static(b"[1,2,3]"),
            remaining: 1,
        })
        .unwrap();
    assert_eq!(
        send(harness.addr, chunked).await.unwrap().status,
        StatusCode::ACCEPTED
    );

    let received = harness.upstream.received();
    assert_eq!(received.len(), 3);
    assert_eq!(&received[0].body[..], br#"{"message":"hi"}"#);
    assert_eq!(&received[2].body[..], b"[1,2,3]");
    assert!(received.iter().all(|got| got.signature == Ok(())));
    assert_eq!(
        received[0].headers[header::CONTENT_TYPE],
        "application/json"
    );
    assert_eq!(harness.audit.entries()[0].request_bytes, 16);
    harness.shutdown().await;
}

#[tokio::test]
async fn an_upstream_path_prefix_is_kept_and_signed() {
    // Point a second bridge for the same run at the harness's upstream, with a prefix.
    let mut harness = Harness::start().await;
    let prefixed: Uri = format!("http://{}/base/", harness.upstream.addr)
        .parse()
        .unwrap();
    harness.bridge = Bridge::new(BridgeConfig {
        run_id: harness.run_id,
        secrets: Arc::clone(&harness.secrets),
        upstream: prefixed,
        upstream_token: Some(SecretString::from("custom-upstream-token")),
        policy: Arc::new(test_policy("")),
        gate: Arc::clone(&harness.gate) as Arc<dyn RunGate>,
        audit: Arc::clone(&harness.audit) as Arc<dyn AuditSink>,
        header_read_timeout: Duration::from_secs(5),
    });
    let (client, server) = tokio::io::duplex(64 * 1024);
    let bridge = harness.bridge.clone();
    let served = tokio::spawn(async move { bridge.serve_connection(server).await });
    let reply = send_on(client, harness.get("/api/agent/run?x=1"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let received = harness.upstream.received();
    assert_eq!(received[0].path_and_query, "/base/api/agent/run?x=1");
    assert_eq!(received[0].signature, Ok(()));
    assert_eq!(
        received[0].headers[header::AUTHORIZATION],
        "Bearer custom-upstream-token"
    );
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .unwrap()
        .unwrap();
    harness.shutdown().await;
}

// --- Authentication ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_credentials_get_401_and_nothing_is_forwarded() {
    let harness = Harness::start().await;
    let now = Timestamp::now();
    let later = now.saturating_add(Duration::from_secs(600));
    let forged = BridgeSecrets::new(&[7u8; 32])
        .unwrap()
        .credential_issuer()
        .mint(harness.run_id, later);
    let expired = harness.secrets.credential_issuer().mint(
        harness.run_id,
        Timestamp::from_unix_millis(now.unix_millis() - 1),
    );
    let other_run = harness
        .secrets
        .credential_issuer()
        .mint(RunId::new(), later);
    let upstream_token = harness.secrets.upstream_token(harness.run_id);

    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "credential_missing"),
        (Some("Bearer".into()), "credential_malformed"),
        (Some("Bearer garbage".into()), "credential_malformed"),
        (
            Some(format!("Basic {}", harness.token)),
            "credential_malformed",
        ),
        (
            Some(format!("Bearer {}", forged.expose_secret())),
            "credential_invalid",
        ),
        (
            Some(format!("Bearer {}", expired.expose_secret())),
            "credential_expired",
        ),
        (
            Some(format!("Bearer {}", other_run.expose_secret())),
            "credential_wrong_run",
        ),
        (
            Some(format!("Bearer {}", upstream_token.expose_secret())),
            "credential_malformed",
        ),
    ];
    for (authorization, code) in cases {
        let mut request = Request::get("/api/agent/run")
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Some(authorization) = &authorization {
            request.headers_mut().insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(authorization).unwrap(),
            );
        }
        let reply = send(harness.addr, request).await.unwrap();
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{authorization:?}");
        assert_eq!(reply.code(), code, "{authorization:?}");
        assert!(reply.headers.contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    }

    // A scheme in another case is still Bearer.
    let mut request = harness.get("/api/agent/run");
    request.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("bearer {}", harness.token)).unwrap(),
    );
    assert_eq!(
        send(harness.addr, request).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(harness.upstream.count(), 1);

    // A genuine credential once the run is over.
    harness.gate.ended.store(true, Ordering::SeqCst);
    let reply = send(harness.addr, harness.get("/api/agent/run"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.code(), "run_ended");

    assert_eq!(
        harness.upstream.count(),
        1,
        "a rejected request was forwarded"
    );
    let entries = harness.audit.entries();
    assert_eq!(entries.len(), 10);
    assert!(
        entries
            .iter()
            .filter(|entry| entry.status == 401)
            .all(|entry| entry.code.is_some())
    );
    harness.shutdown().await;
}

// --- Policy -----------------------------------------------------------------------------------------------------

#[tokio::test]
async fn routes_outside_the_allowlist_get_403() {
    let harness = Harness::start().await;
    for (method, path) in [
        (Method::GET, "/api/admin"),
        (Method::DELETE, "/api/agent/run"),
        (Method::GET, "/api/agent/run/extra"),
        (Method::GET, "/"),
    ] {
        let reply = send(harness.addr, harness.request(method.clone(), path, None))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(reply.code(), "route_not_allowed");
    }
    assert_eq!(harness.upstream.count(), 0);
    harness.shutdown().await;
}

#[tokio::test]
async fn path_tricks_get_400_and_are_never_forwarded() {
    let harness = Harness::start().await;
    let token = &harness.token;
    let tricks: &[&[u8]] = &[
        b"/api/agent/../admin",
        b"/api/agent/./run",
        b"//api/agent/run",
        b"/api//agent/run",
        b"/api/agent/run/",
        b"/api/agent%2frun",
        b"/api/agent%2Frun",
        b"/api/agent/%2e%2e/x",
        b"/api/agent/run%00",
        b"/api/agent%5crun",
        "/api/ågent/run".as_bytes(),
        b"/api/agent\\run",
        b"http://127.0.0.1/api/agent/run",
        b"*",
    ];
    for target in tricks {
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(target);
        request.extend_from_slice(
            format!(
                " HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        let response = raw(harness.addr, &request).await;
        let shown = String::from_utf8_lossy(target);
        assert_eq!(status_of(&response), 400, "{shown}: {response}");
        // hyper itself refuses targets that are not URIs at all (non-ASCII, backslash) with a bare 400; everything
        // it parses reaches the bridge, which says why.
        if response.contains("{\"error\"") {
            assert!(
                response.contains("\"path_rejected\""),
                "{shown}: {response}"
            );
        }
    }
    let mut options = b"OPTIONS * HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer ".to_vec();
    options.extend_from_slice(token.as_bytes());
    options.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&raw(harness.addr, &options).await), 400);
    let connect = format!(
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    assert_eq!(status_of(&raw(harness.addr, connect.as_bytes()).await), 400);
    assert_eq!(harness.upstream.count(), 0, "a path trick was forwarded");
    harness.shutdown().await;
}

// --- Bodies -----------------------------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_and_non_json_bodies_are_refused() {
    let harness = Harness::start().await;

    // A declared 2 MiB body: refused from its Content-Length.
    let big = format!("\"{}\"", "x".repeat(2 * MIB));
    let reply = send(
        harness.addr,
        harness.request(Method::POST, "/api/agent/events", Some(&big)),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.code(), "payload_too_large");

    // A chunked body that only turns out too large while it is read.
    let chunked = Request::builder()
        .method(Method::POST)
        .uri("/api/agent/events")
        .header(header::AUTHORIZATION, format!("Bearer {}", harness.token))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Chunked {
            chunk: Bytes::from(vec![b' '; 64 * 1024]),
            remaining: 32,
        })
        .unwrap();
    let reply = send(harness.addr, chunked).await.unwrap();
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.code(), "payload_too_large");

    // Not JSON, or no content type at all.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonx"),
        Some("application/+json"),
        None,
    ] {
        let mut request = harness.request(Method::POST, "/api/agent/events", Some("{}"));
        match content_type {
            Some(value) => {
                request
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            }
            None => {
                request.headers_mut().remove(header::CONTENT_TYPE);
            }
        }
        let reply = send(harness.addr, request).await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(reply.code(), "unsupported_media_type");
    }
    assert_eq!(harness.upstream.count(), 0);

    // No body needs no content type.
    let reply = send(
        harness.addr,
        harness.request(Method::POST, "/api/agent/events", None),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    harness.shutdown().await;
}

// --- Concurrency ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_in_flight_limit_get_503_with_retry_after() {
    let harness = Harness::start().await;
    let mut requests = JoinSet::new();
    for _ in 0..33 {
        let (addr, request) = (harness.addr, harness.get("/slow/600"));
        requests.spawn(async move { send(addr, request).await.unwrap() });
    }
    let mut ok = 0;
    let mut refused = 0;
    while let Some(reply) = requests.join_next().await {
        let reply = reply.unwrap();
        match reply.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.code(), "too_many_requests");
                assert_eq!(reply.headers[header::RETRY_AFTER], "1");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok + refused, 33);
    assert!(refused >= 1, "nothing was refused");
    assert!(ok <= 32);
    // The slots come back: the next request goes through.
    let reply = send(harness.addr, harness.get("/api/agent/run"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    harness.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_concurrently_not_one_after_another() {
    let harness = Harness::start().await;
    let started = Instant::now();
    let (first, second) = tokio::join!(
        send(harness.addr, harness.get("/slow/500")),
        send(harness.addr, harness.get("/slow/500")),
    );
    let elapsed = started.elapsed();
    assert_eq!(first.unwrap().status, StatusCode::OK);
    assert_eq!(second.unwrap().status, StatusCode::OK);
    assert!(
        elapsed < Duration::from_millis(900),
        "two 500 ms requests took {elapsed:?}"
    );
    harness.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_all_succeed() {
    let harness = Harness::with(Options {
        policy: test_policy(r#","maxInFlight":1000"#),
        ..Options::default()
    })
    .await;
    let mut requests = JoinSet::new();
    for _ in 0..1000 {
        let (addr, request) = (harness.addr, harness.get("/api/agent/run"));
        requests.spawn(async move { send(addr, request).await.map(|reply| reply.status) });
    }
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    let all = async {
        while let Some(status) = requests.join_next().await {
            *statuses
                .entry(status.unwrap().unwrap().as_u16())
                .or_default() += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .unwrap();
    assert_eq!(statuses.get(&200), Some(&1000), "{statuses:?}");
    assert_eq!(harness.upstream.count(), 1000);
    assert!(
        harness
            .upstream
            .received()
            .iter()
            .all(|got| got.signature == Ok(()))
    );
    assert_eq!(harness.audit.entries().len(), 1000);
    harness.shutdown().await;
}

// --- Slow and broken clients ------------------------------------------------------------------------------------

#[tokio::test]
async fn slow_clients_are_disconnected_after_the_header_timeout() {
    let harness = Harness::with(Options {
        header_read_timeout: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    for opening in [
        &b"GET /api/agent/run HT"[..],
        b"",
        b"P",
        b"PRI * HTTP/2.0\r\n",
    ] {
        let mut stream = TcpStream::connect(harness.addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        let started = Instant::now();
        let mut response = Vec::new();
        // The server closes the connection (with or without a 408): reading reaches the end.
        // A reset instead of a clean close is as good: either way the connection is gone.
        let _closed =
            tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut response))
                .await
                .unwrap_or_else(|_| panic!("{opening:?}: connection still open"));
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(150),
            "{opening:?}: {elapsed:?}"
        );
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    assert_eq!(harness.upstream.count(), 0);
    // A prompt client is unaffected.
    let reply = send(harness.addr, harness.get("/api/agent/run"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    harness.shutdown().await;
}

// --- Upstream failures ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let harness = Harness::with(Options {
        upstream: Some(format!("http://{closed}").parse().unwrap()),
        ..Options::default()
    })
    .await;
    let reply = send(harness.addr, harness.get("/api/agent/run"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.code(), "upstream_unavailable");
    assert_eq!(
        harness.audit.entries()[0].code,
        Some("upstream_unavailable")
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn a_slow_upstream_is_504_after_the_policy_timeout() {
    let harness = Harness::with(Options {
        policy: test_policy(r#","upstreamTimeoutMs":200"#),
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let reply = send(harness.addr, harness.get("/slow/2000")).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.code(), "upstream_timeout");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    harness.shutdown().await;
}

#[tokio::test]
async fn an_oversized_upstream_response_is_502_never_truncated() {
    let harness = Harness::start().await;
    for path in ["/big", "/big-stream"] {
        let reply = send(harness.addr, harness.get(path)).await.unwrap();
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(reply.code(), "upstream_response_too_large", "{path}");
        assert!(reply.body.len() < 1024);
    }
    harness.shutdown().await;
}

#[tokio::test]
async fn a_misconfigured_upstream_fails_closed() {
    let harness = Harness::with(Options {
        upstream: Some("https://127.0.0.1:1".parse().unwrap()),
        ..Options::default()
    })
    .await;
    let reply = send(harness.addr, harness.get("/api/agent/run"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.code(), "bridge_misconfigured");
    harness.shutdown().await;
}

// --- Shutdown ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_socket_at_once_and_lets_in_flight_requests_finish() {
    let mut harness = Harness::start().await;
    let addr = harness.addr;

    // A kept-alive connection, idle when the shutdown starts.
    let idle = TcpStream::connect(addr).await.unwrap();
    let (mut idle_sender, idle_connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(idle))
            .await
            .unwrap();
    let idle_driver = tokio::spawn(idle_connection);
    let first = idle_sender
        .send_request(harness.get("/api/agent/run"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    first.into_body().collect().await.unwrap();

    let in_flight = tokio::spawn(send(addr, harness.get("/slow/400")));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let listener = harness.listener.take().unwrap();
    let started = Instant::now();
    let shutdown = tokio::spawn(listener.shutdown(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Nothing listens any more, even while the in-flight request is still running.
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    // The idle kept-alive connection takes no new request: it is closed, or answers 503.
    if let Ok(response) = idle_sender
        .send_request(harness.get("/api/agent/run"))
        .await
    {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    idle_driver.abort();

    let reply = in_flight.await.unwrap();
    match reply {
        Ok(reply) => assert!(
            reply.status == StatusCode::OK || reply.status == StatusCode::SERVICE_UNAVAILABLE,
            "{reply:?}"
        ),
        Err(err) => panic!("the in-flight request was cut: {err}"),
    }
    shutdown.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(TcpStream::connect(addr).await.is_err());
    assert_eq!(harness.upstream.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_requests_that_outlast_the_grace_period() {
    let mut harness = Harness::start().await;
    let in_flight = tokio::spawn(send(harness.addr, harness.get("/slow/5000")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    harness
        .listener
        .take()
        .unwrap()
        .shutdown(Duration::from_millis(100))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let reply = tokio::time::timeout(Duration::from_secs(2), in_flight)
        .await
        .unwrap()
        .unwrap();
    assert!(reply.is_err(), "{reply:?}");
    // The abandoned request is still audited.
    let entries = harness.audit.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].status, 499);
    assert_eq!(entries[0].code, Some("request_cancelled"));
}

// --- Other transports -------------------------------------------------------------------------------------------

#[tokio::test]
async fn serves_http1_and_http2_over_an_in_memory_stream() {
    let harness = Harness::start().await;

    let (client, server) = tokio::io::duplex(64 * 1024);
    let bridge = harness.bridge.clone();
    let served = tokio::spawn(async move { bridge.serve_connection(server).await });
    let reply = send_on(client, harness.get("/api/agent/run"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .unwrap()
        .unwrap();

    let (client, server) = tokio::io::duplex(64 * 1024);
    let bridge = harness.bridge.clone();
    let served = tokio::spawn(async move { bridge.serve_connection(server).await });
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    // Two concurrent streams on one connection.
    let (a, b) = tokio::join!(
        sender.send_request(harness.get("http://bridge/slow/100")),
        sender.clone().send_request(harness.request(
            Method::POST,
            "http://bridge/api/agent/events",
            Some("{}")
        )),
    );
    assert_eq!(a.unwrap().status(), StatusCode::OK);
    assert_eq!(b.unwrap().status(), StatusCode::ACCEPTED);
    let denied = sender
        .send_request(harness.get("http://bridge/api/admin"))
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    // Every stream must be released before the connection can close.
    drop(denied);
    drop(sender);
    driver.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .unwrap()
        .unwrap();

    let received = harness.upstream.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|got| got.signature == Ok(())));
    harness.shutdown().await;
}

#[tokio::test]
async fn serves_a_unix_socket_and_removes_it_on_shutdown() {
    let harness = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.sock");
    let listener = harness.bridge.listen_unix(&path).await.unwrap();
    assert_eq!(listener.local_addr(), None);

    let stream = UnixStream::connect(&path).await.unwrap();
    let reply = send_on(stream, harness.get("/api/agent/run"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);

    listener.shutdown(Duration::from_secs(1)).await;
    assert!(!path.exists());
    assert!(UnixStream::connect(&path).await.is_err());
    harness.shutdown().await;
}

#[tokio::test]
async fn dropping_a_listener_stops_it() {
    let mut harness = Harness::start().await;
    let addr = harness.addr;
    drop(harness.listener.take());
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still listening after the listener was dropped");
}
