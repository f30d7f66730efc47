//! Runs through the API, as the tests and the benches drive them: start one, wait for it, read its events.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use super::server::TestServer;

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
