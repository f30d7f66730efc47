//! The listener against real sockets and hostile clients.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Draining, Limits, Listener, bind_tcp};

/// `/refuse`: 401 with a JSON body, the request body never read. `/bodiless`: 400 with no body (a service's, not
/// hyper's). `/slow/<ms>`: 200 after a while. Anything else: 200 `ok`.
async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let response = if path == "/refuse" {
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"error":{"code":"unauthenticated","message":"no"}}"#,
            )))
    } else if path == "/bodiless" {
        Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::new()))
    } else if let Some(millis) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(millis.parse().unwrap())).await;
        Response::builder().body(Full::new(Bytes::from_static(b"slow")))
    } else {
        let _ = request.into_body().collect().await;
        Response::builder().body(Full::new(Bytes::from_static(b"ok")))
    };
    Ok(response.unwrap())
}

fn start(limits: Limits) -> (Listener, SocketAddr) {
    let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = Listener::tcp(listener, limits, |_: Draining| service_fn(handle)).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Writes `request` (a write error is fine: the server may answer before reading it all), reads to the end.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("the server neither answered nor closed")
        .expect("the connection was reset instead of closed");
    String::from_utf8_lossy(&response).into_owned()
}

/// Status, head and JSON body of a single response.
fn split(response: &str) -> (u16, String, Value) {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let json = serde_json::from_str(body).unwrap_or_else(|err| panic!("{err}: {response:?}"));
    (status, head.to_ascii_lowercase(), json)
}

#[tokio::test]
async fn hyper_s_own_error_answers_carry_the_json_error_body() {
    let (listener, addr) = start(Limits::default());
    let big_header = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nhost: x\r\n{}\r\n",
        (0..200)
            .map(|i| format!("x-h{i}: {}\r\n", "b".repeat(1024)))
            .collect::<String>()
    );
    let long_target = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "t".repeat(70_000));
    let cases: [(&str, &[u8], u16, &str); 7] = [
        (
            "a 70 kB target",
            long_target.as_bytes(),
            414,
            "uri_too_long",
        ),
        (
            "a 1 MB header",
            big_header.as_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "200 headers of 1 KB",
            many_headers.as_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "two Content-Lengths",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
            400,
            "malformed_request",
        ),
        (
            "a NUL in the method",
            b"G\0T / HTTP/1.1\r\nhost: x\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            "a folded header",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n  b\r\n\r\n",
            400,
            "malformed_request",
        ),
        (
            "a garbage request line",
            b"\x01\x02 hello there\r\n\r\n",
            400,
            "malformed_request",
        ),
    ];
    for (what, request, status, code) in cases {
        let response = raw(addr, request).await;
        let (got, head, json) = split(&response);
        assert_eq!(got, status, "{what}: {response}");
        assert!(
            head.contains("content-type: application/json"),
            "{what}: {head}"
        );
        assert!(head.contains("connection: close"), "{what}: {head}");
        assert_eq!(json["error"]["code"], code, "{what}: {json}");
        assert!(json["error"]["message"].is_string(), "{what}: {json}");
    }
    listener.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_service_s_bodiless_error_is_left_alone_and_the_connection_goes_on() {
    let (listener, addr) = start(Limits::default());
    let response = raw(
        addr,
        b"GET /bodiless HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{response}"
    );
    let second = response.find("HTTP/1.1 200 OK").expect(&response);
    assert!(response[..second].ends_with("\r\n\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nok"), "{response}");
    listener.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_response_before_a_protocol_error_on_the_same_connection_is_kept_whole() {
    let (listener, addr) = start(Limits::default());
    let response = raw(
        addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\nG\0T / HTTP/1.1\r\n\r\n",
    )
    .await;
    let error = response.find("HTTP/1.1 400").expect(&response);
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response[..error].ends_with("\r\n\r\nok"), "{response}");
    let (_, _, json) = split(&response[error..]);
    assert_eq!(json["error"]["code"], "malformed_request");
    listener.shutdown(Duration::from_secs(1)).await;
}

/// Like Python's http.client: the whole body is written before anything is read.
fn send_body_first(addr: SocketAddr, path: &str, body_len: usize) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {body_len}\r\n\r\n"
    )?;
    stream.write_all(&vec![b' '; body_len])?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_whole_body_first_reads_the_refusal() {
    let (listener, addr) = start(Limits::default());
    for _ in 0..3 {
        let response =
            tokio::task::spawn_blocking(move || send_body_first(addr, "/refuse", 5_000_000))
                .await
                .unwrap()
                .expect("the refusal was lost to a reset");
        let (status, _, json) = split(&response);
        assert_eq!(status, 401, "{response}");
        assert_eq!(json["error"]["code"], "unauthenticated");
    }
    listener.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn connections_past_the_bound_are_refused_with_a_json_503() {
    let (listener, addr) = start(Limits {
        max_connections: 2,
        ..Limits::default()
    });
    let first = TcpStream::connect(addr).await.unwrap();
    let _second = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let response = raw(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (status, head, json) = split(&response);
    assert_eq!(status, 503, "{response}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(json["error"]["code"], "too_many_connections");

    // A place frees up: served again.
    drop(first);
    let started = Instant::now();
    loop {
        let response = raw(
            addr,
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        if response.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{response}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listener.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_at_the_header_read_timeout() {
    let timeout = Duration::from_millis(400);
    let (listener, addr) = start(Limits {
        header_read_timeout: timeout,
        ..Limits::default()
    });
    let closed_after = |opening: &'static [u8], trickle: bool| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        let started = Instant::now();
        let (mut reader, mut writer) = stream.into_split();
        let mut response = Vec::new();
        let reading = async {
            tokio::select! {
                _ = reader.read_to_end(&mut response) => {}
                // One header byte every 50 ms, for as long as the server lets it.
                () = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if writer.write_all(b"x").await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                }, if trickle => {}
            }
        };
        tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .unwrap_or_else(|_| panic!("{opening:?}: still open"));
        (
            started.elapsed(),
            String::from_utf8_lossy(&response).into_owned(),
        )
    };
    let (nothing, half_line, trickled, kept_alive) = tokio::join!(
        closed_after(b"", false),
        closed_after(b"GET / HT", false),
        closed_after(b"GET / HTTP/1.1\r\nx-slow: ", true),
        closed_after(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", false),
    );
    for (what, (elapsed, _)) in [
        ("nothing", &nothing),
        ("half a request line", &half_line),
        ("a trickled header", &trickled),
        ("kept alive", &kept_alive),
    ] {
        assert!(
            *elapsed >= timeout.mul_f32(0.75),
            "{what}: closed after {elapsed:?}"
        );
        assert!(*elapsed < timeout * 4, "{what}: closed after {elapsed:?}");
    }
    assert!(kept_alive.1.starts_with("HTTP/1.1 200"), "{}", kept_alive.1);
    listener.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_timeout() {
    let (listener, addr) = start(Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get("http://x/")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(3), driver)
        .await
        .expect("the idle HTTP/2 connection is still open");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    listener.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_hold_up_a_shutdown_but_requests_in_flight_finish() {
    let (listener, addr) = start(Limits::default());
    let fresh = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET / HT").await.unwrap();
    let mut kept_alive = TcpStream::connect(addr).await.unwrap();
    kept_alive
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    kept_alive.read_exact(&mut first).await.unwrap();
    let in_flight = tokio::spawn(raw(addr, b"GET /slow/500 HTTP/1.1\r\nhost: x\r\n\r\n"));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    listener.shutdown(Duration::from_secs(8)).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    let response = in_flight.await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("slow"), "{response}");
    drop((fresh, half, kept_alive));
}
