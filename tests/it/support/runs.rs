//! Runs through the API, as the tests and the benches drive them: start one, wait for it, read its events.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::server::TestServer;

/// Creates an environment of `driver` with `config` under a unique name; its id.
pub async fn create_env(server: &TestServer, company: &str, driver: &str, config: Value) -> String {
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": format!("{driver}-{}", uuid::Uuid::new_v4()), "driver": driver, "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    env["id"].as_str().unwrap().to_owned()
}

/// The lease `lease_id`, which must exist.
pub async fn lease(server: &TestServer, lease_id: &str) -> Value {
    let (status, lease) = server
        .get(&format!("/api/environment-leases/{lease_id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{lease}");
    lease
}

/// The directory a fake-provider lease's sandbox lives in.
pub fn sandbox_dir(lease: &Value) -> PathBuf {
    PathBuf::from(
        lease["metadata"]["sandboxDir"]
            .as_str()
            .unwrap_or_else(|| panic!("no sandboxDir: {lease}")),
    )
}

pub async fn start_run(server: &TestServer, company: &str, body: Value) -> String {
    let (status, run) = server
        .post(&format!("/api/companies/{company}/runs"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    assert_eq!(run["status"], "queued");
    run["id"].as_str().unwrap().to_owned()
}

/// Polls until the run is final (or panics after `limit`).
pub async fn wait_run(server: &TestServer, run_id: &str, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (status, run) = server.get(&format!("/api/runs/{run_id}")).await;
        assert_eq!(status, StatusCode::OK, "{run}");
        if !matches!(run["status"].as_str(), Some("queued" | "running")) {
            return run;
        }
        assert!(
            started.elapsed() < limit,
            "run {run_id} still {} after {limit:?}",
            run["status"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_status(server: &TestServer, run_id: &str, wanted: &str) {
    let started = Instant::now();
    loop {
        let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
        if run["status"] == wanted {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "run never became {wanted}: {run}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event of a run, paging through `after`.
pub async fn all_events(server: &TestServer, run_id: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = server
            .get(&format!("/api/runs/{run_id}/events?after={after}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let page = page.as_array().unwrap().clone();
        if page.is_empty() {
            return events;
        }
        after = page.last().unwrap()["seq"].as_i64().unwrap();
        events.extend(page);
    }
}

pub fn text_of(events: &[Value], kind: &str) -> String {
    events
        .iter()
        .filter(|event| event["type"] == kind)
        .map(|event| event["data"]["text"].as_str().unwrap())
        .collect()
}

/// POSTs a run and reads its event stream to the end (the final event); returns the stream's bytes.
#[allow(dead_code)]
pub async fn run_to_completion(
    http: &reqwest::Client,
    server: &TestServer,
    company: &str,
    body: &Value,
) -> usize {
    let id = start_run(server, company, body.clone()).await;
    let stream = http
        .get(format!("{}/api/runs/{id}/events", server.url))
        .bearer_auth(&server.admin_token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut body = stream.bytes_stream();
    let mut total = 0;
    let mut tail = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        total += chunk.len();
        tail.extend_from_slice(&chunk[chunk.len().saturating_sub(512)..]);
        if tail.len() > 4096 {
            tail.drain(..tail.len() - 1024);
        }
    }
    let tail = String::from_utf8_lossy(&tail);
    assert!(
        tail.contains("\"status\":\"succeeded\""),
        "the run did not succeed: {tail}"
    );
    total
}
