//! Connection hygiene on both listeners, against the real `berth serve` and a real run's bridge: slow and idle
//! clients are cut at the header-read timeout, connections past the bound get a JSON 503, hyper's own protocol
//! errors carry the JSON error body, a refusal is readable by a client that sends its whole body before reading,
//! and idle connections do not hold up SIGTERM.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::runs::{all_events, start_run, text_of};
use crate::support::server::{ServerOptions, TestServer};

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Writes `request` (a failed write is fine: the server may answer before reading it all) and reads until the
/// server closes. A reset instead of a close fails: the response would be lost.
async fn raw(address: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("the server neither answered nor closed")
        .expect("the connection was reset instead of closed");
    String::from_utf8_lossy(&response).into_owned()
}

/// Status, lowercased head and JSON body of one response.
fn split(response: &str) -> (u16, String, Value) {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let json = serde_json::from_str(body)
        .unwrap_or_else(|err| panic!("not a JSON body ({err}): {response:?}"));
    (status, head.to_ascii_lowercase(), json)
}

/// What Python's http.client does: the whole body written, then the response read.
async fn send_body_first(address: &str, head: String, body_len: usize) -> String {
    let address = address.to_owned();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.set_write_timeout(Some(Duration::from_secs(15)))?;
        stream.write_all(head.as_bytes())?;
        stream.write_all(&vec![b' '; body_len])?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    })
    .await
    .unwrap()
    .expect("the refusal was lost: the connection was reset under a client that sent its whole body first")
}

/// A run that keeps its bridge up for a minute, with the bridge's address and the run's credential (from its
/// output).
async fn live_bridge(server: &TestServer) -> (String, String) {
    let company = server.default_company().await;
    let run_id = start_run(
        server,
        &company,
        json!({"command": ["sh", "-c", "echo \"bridge $BERTH_API_URL $BERTH_API_TOKEN\"; sleep 60"]}),
    )
    .await;
    let started = Instant::now();
    loop {
        let stdout = text_of(&all_events(server, &run_id).await, "stdout");
        if let Some(line) = stdout.lines().find_map(|line| line.strip_prefix("bridge ")) {
            let (url, token) = line.split_once(' ').expect("url and token");
            return (host_port(url), token.trim().to_owned());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the run never printed its bridge: {stdout}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a connection, sends `opening`, optionally trickles one more header byte every 200 ms, and returns how
/// long the server took to close it and what it answered.
async fn closed_after(
    address: String,
    opening: &'static [u8],
    trickle: bool,
) -> (Duration, String) {
    let mut stream = TcpStream::connect(&address).await.unwrap();
    stream.write_all(opening).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let mut response = Vec::new();
    let reading = async {
        tokio::select! {
            _ = reader.read_to_end(&mut response) => {}
            () = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if writer.write_all(b"x").await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }, if trickle => {}
        }
    };
    tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .unwrap_or_else(|_| panic!("{opening:?} to {address}: still open after 30 s"));
    (
        started.elapsed(),
        String::from_utf8_lossy(&response).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_at_the_header_read_timeout() {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--http-header-read-timeout-ms".into(), "1000".into()],
        ..ServerOptions::default()
    })
    .await;
    let api = host_port(&server.url);
    let (bridge, _) = live_bridge(&server).await;
    let (nothing, half_line, trickled, kept_alive, bridge_trickled) = tokio::join!(
        closed_after(api.clone(), b"", false),
        closed_after(api.clone(), b"GET /healthz HT", false),
        closed_after(api.clone(), b"GET /healthz HTTP/1.1\r\nx-slow: ", true),
        closed_after(
            api.clone(),
            b"GET /healthz HTTP/1.1\r\nhost: berth\r\n\r\n",
            false
        ),
        // The bridge's header-read timeout is its fixed 10 s.
        closed_after(bridge, b"GET /api/agent/run HTTP/1.1\r\nx-slow: ", true),
    );
    for (what, (elapsed, _)) in [
        ("nothing sent", &nothing),
        ("half a request line", &half_line),
        ("one header byte every 200 ms", &trickled),
        ("idle after a request", &kept_alive),
    ] {
        assert!(
            *elapsed >= Duration::from_millis(750) && *elapsed < Duration::from_secs(4),
            "API, {what}: closed after {elapsed:?}"
        );
    }
    assert!(kept_alive.1.starts_with("HTTP/1.1 200"), "{}", kept_alive.1);
    let (elapsed, _) = bridge_trickled;
    assert!(
        elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(14),
        "bridge, one header byte every 200 ms: closed after {elapsed:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn protocol_errors_carry_the_json_error_body_on_the_api_and_the_bridge() {
    let server = TestServer::start().await;
    let (bridge, _) = live_bridge(&server).await;
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nhost: berth\r\nx-big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nhost: berth\r\n{}\r\n",
        (0..200)
            .map(|i| format!("x-header-{i}: {}\r\n", "b".repeat(1024)))
            .collect::<String>()
    );
    let cases: [(&str, &[u8], u16, &str); 6] = [
        ("a 1 MB header", big_header.as_bytes(), 431, "headers_too_large"),
        ("200 headers of 1 KB", many_headers.as_bytes(), 431, "headers_too_large"),
        (
            "two Content-Lengths",
            b"POST /api/companies HTTP/1.1\r\nhost: berth\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
            400,
            "malformed_request",
        ),
        ("a NUL in the method", b"G\0T /healthz HTTP/1.1\r\nhost: berth\r\n\r\n", 400, "malformed_request"),
        (
            "a folded header",
            b"GET /healthz HTTP/1.1\r\nhost: berth\r\nx-folded: a\r\n  b\r\n\r\n",
            400,
            "malformed_request",
        ),
        ("a garbage request line", b"\x16\x03\x01 not http at all\r\n\r\n", 400, "malformed_request"),
    ];
    for (listener, address) in [("API", host_port(&server.url)), ("bridge", bridge)] {
        for (what, request, status, code) in cases {
            let response = raw(&address, request).await;
            let (got, head, json) = split(&response);
            assert_eq!(got, status, "{listener}, {what}: {response}");
            assert!(
                head.contains("content-type: application/json"),
                "{listener}, {what}: {head}"
            );
            assert!(
                head.contains("connection: close"),
                "{listener}, {what}: {head}"
            );
            assert_eq!(json["error"]["code"], code, "{listener}, {what}: {json}");
            assert!(
                json["error"]["message"].is_string(),
                "{listener}, {what}: {json}"
            );
        }
    }
    // The listeners are still fine.
    let (status, _) = server.get("/api/companies").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_readable_by_a_client_that_sends_its_whole_body_first() {
    let server = TestServer::start().await;
    let api = host_port(&server.url);
    let (bridge, token) = live_bridge(&server).await;
    for _ in 0..2 {
        // 5 MB without a token: 401 before the body is read.
        let body_len = 5_000_000;
        let response = send_body_first(
            &api,
            format!(
                "POST /api/companies HTTP/1.1\r\nhost: berth\r\ncontent-type: application/json\r\n\
                 content-length: {body_len}\r\n\r\n"
            ),
            body_len,
        )
        .await;
        let (status, _, json) = split(&response);
        assert_eq!(status, 401, "{response}");
        assert_eq!(json["error"]["code"], "unauthenticated", "{json}");

        // 2 MiB to the bridge, over its 1 MiB limit: 413 from the Content-Length alone.
        let body_len = 2 * 1024 * 1024;
        let response = send_body_first(
            &bridge,
            format!(
                "POST /api/agent/events HTTP/1.1\r\nhost: bridge\r\nauthorization: Bearer {token}\r\n\
                 content-type: application/json\r\ncontent-length: {body_len}\r\n\r\n"
            ),
            body_len,
        )
        .await;
        let (status, _, json) = split(&response);
        assert_eq!(status, 413, "{response}");
        assert_eq!(json["error"]["code"], "payload_too_large", "{json}");
    }
    server.stop().await;
}

#[tokio::test]
async fn connections_past_the_bound_get_a_json_503() {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--max-connections".into(), "3".into()],
        ..ServerOptions::default()
    })
    .await;
    let api = host_port(&server.url);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(&api).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = raw(&api, b"GET /healthz HTTP/1.1\r\nhost: berth\r\n\r\n").await;
    let (status, head, json) = split(&response);
    assert_eq!(status, 503, "{response}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(json["error"]["code"], "too_many_connections", "{json}");
    assert!(
        server.logs().contains("connection limit reached"),
        "{}",
        server.logs()
    );

    // One closes: served again.
    held.pop();
    let started = Instant::now();
    loop {
        let response = raw(
            &api,
            b"GET /healthz HTTP/1.1\r\nhost: berth\r\nconnection: close\r\n\r\n",
        )
        .await;
        if response.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{response}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_do_not_delay_sigterm() {
    let server = TestServer::start().await;
    let api = host_port(&server.url);
    let fresh = TcpStream::connect(&api).await.unwrap();
    let mut half_line = TcpStream::connect(&api).await.unwrap();
    half_line.write_all(b"GET /healthz HT").await.unwrap();
    let mut kept_alive = TcpStream::connect(&api).await.unwrap();
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: berth\r\n\r\n")
        .await
        .unwrap();
    let mut status_line = [0u8; 15];
    kept_alive.read_exact(&mut status_line).await.unwrap();
    assert_eq!(&status_line, b"HTTP/1.1 200 OK");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    server.stop().await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(3),
        "SIGTERM took {elapsed:?} with three idle connections open"
    );
    drop((fresh, half_line, kept_alive));
}
