//! The callback bridge's cost: `GET /api/agent/run` sent straight to the server (signed as the bridge would sign it)
//! beside the same request from an agent through its run's bridge — sequential p50/p99, and throughput with 32
//! concurrent clients — in one run. The reference bridge adds at least its 100 ms poll interval per request and
//! serializes requests.
//!
//! Run: `bash scripts/bench.sh bridge`. Knobs: `BERTH_BENCH_REQUESTS` (sequential, default 2000),
//! `BERTH_BENCH_SECONDS` (per throughput phase, default 3).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common.rs"]
#[allow(dead_code, unreachable_pub)]
mod common;

#[path = "../it/support/server.rs"]
#[allow(dead_code, unreachable_pub)]
mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use berth_bridge::signing::{
    BridgeSecrets, HEADER_NONCE, HEADER_RUN_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign,
};
use berth_core::ids::RunId;
use berth_core::time::Timestamp;
use common::env_number;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use server::TestServer;

const PATH: &str = "/api/agent/run";

/// How one request is sent: straight to the server, or through the bridge.
#[derive(Clone)]
enum Route {
    Direct {
        url: String,
        secrets: Arc<BridgeSecrets>,
        run: RunId,
    },
    Bridged {
        url: String,
        credential: String,
    },
}

impl Route {
    async fn send(&self, http: &reqwest::Client) {
        let request = match self {
            Route::Direct { url, secrets, run } => {
                let signed = sign(
                    &secrets.signing_key(*run),
                    "GET",
                    PATH,
                    b"",
                    Timestamp::now(),
                );
                http.get(format!("{url}{PATH}"))
                    .bearer_auth(secrets.upstream_token(*run).expose_secret())
                    .header(HEADER_RUN_ID, run.to_string())
                    .header(HEADER_TIMESTAMP, signed.timestamp.to_string())
                    .header(HEADER_NONCE, signed.nonce)
                    .header(HEADER_SIGNATURE, signed.signature)
            }
            Route::Bridged { url, credential } => {
                http.get(format!("{url}{PATH}")).bearer_auth(credential)
            }
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.bytes().await.unwrap();
    }
}

async fn sequential(route: &Route, requests: usize) -> (Duration, Duration) {
    let http = reqwest::Client::new();
    route.send(&http).await; // connect first
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        route.send(&http).await;
        samples.push(started.elapsed());
    }
    samples.sort();
    let at = |fraction: f64| samples[((samples.len() as f64 - 1.0) * fraction).round() as usize];
    (at(0.5), at(0.99))
}

async fn throughput(route: &Route, clients: usize, seconds: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks = (0..clients).map(|_| {
        let (route, done) = (route.clone(), done.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while Instant::now() < deadline {
                route.send(&http).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    });
    let started = Instant::now();
    futures::future::join_all(tasks).await;
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let requests = env_number("BERTH_BENCH_REQUESTS", 2000);
    let seconds = env_number("BERTH_BENCH_SECONDS", 3) as u64;
    // The bridge's in-flight limit is per run; the policy's default (32) matches the 32 clients below.
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let (status, run) = server
        .post(
            &format!("/api/companies/{company}/runs"),
            json!({"command": ["sh", "-c", "echo \"$BERTH_API_URL $BERTH_API_TOKEN\"; sleep 600"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();
    // The agent's own view: the bridge URL and credential it printed.
    let (bridge_url, credential) = loop {
        let (_, events) = server.get(&format!("/api/runs/{run_id}/events")).await;
        let line: Option<String> = events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "stdout")
            .map(|e| e["data"]["text"].as_str().unwrap().trim().to_owned());
        if let Some(line) = line {
            let (url, token) = line.split_once(' ').unwrap();
            break (url.to_owned(), token.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cipher =
        berth_server::secrets::SecretCipher::load_or_create(&server.data_dir, None).unwrap();
    let direct = Route::Direct {
        url: server.url.clone(),
        secrets: Arc::new(BridgeSecrets::new(cipher.bridge_secret()).unwrap()),
        run: run_id.parse().unwrap(),
    };
    let bridged = Route::Bridged {
        url: bridge_url,
        credential,
    };

    let (direct_p50, direct_p99) = sequential(&direct, requests).await;
    let (bridged_p50, bridged_p99) = sequential(&bridged, requests).await;
    let direct_rate = throughput(&direct, 32, seconds).await;
    let bridged_rate = throughput(&bridged, 32, seconds).await;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("berth bridge benchmark: GET {PATH}, release build, SQLite");
    println!();
    println!(
        "{:<36} {:>10} {:>10} {:>14}",
        "", "p50 ms", "p99 ms", "req/s (32 clients)"
    );
    println!(
        "{:<36} {:>10.3} {:>10.3} {:>14.0}",
        "direct to the server (baseline)",
        ms(direct_p50),
        ms(direct_p99),
        direct_rate
    );
    println!(
        "{:<36} {:>10.3} {:>10.3} {:>14.0}",
        "through the run's bridge",
        ms(bridged_p50),
        ms(bridged_p99),
        bridged_rate
    );
    println!(
        "{:<36} {:>10.3} {:>10} {:>13.0}%",
        "bridge adds / keeps",
        ms(bridged_p50.saturating_sub(direct_p50)),
        "",
        100.0 * bridged_rate / direct_rate
    );

    let (status, _): (StatusCode, Value) = server
        .post(&format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}
