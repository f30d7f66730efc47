//! Runs, measured against their baselines in one go:
//!
//! - (a) the overhead of a run of `true` — through the API (POST, then the event stream to its final event) and as
//!   `berth run -- true` from the shell — on the local driver and the fake provider, beside a bare spawn of `true`;
//! - (b) lease acquire + release cycles per second on SQLite and PostgreSQL (the real lease code and local driver);
//! - (c) output throughput of a run writing 100 MB to stdout (stored, and followed over SSE to the final event),
//!   beside the same command piped to /dev/null, and piped through `cat` into a file (reading the pipe and storing
//!   every byte with no server: the floor under berth's figure).
//!
//! Run: `bash scripts/bench.sh runs`. Knobs: `BERTH_BENCH_RUNS` (default 200), `BERTH_BENCH_LEASE_CYCLES` (default
//! 2000), `BERTH_BENCH_OUTPUT_MB` (default 100).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../it/support/server.rs"]
#[allow(dead_code, unreachable_pub)]
mod server;

#[path = "../it/support/db.rs"]
#[allow(dead_code, unreachable_pub)]
mod db;

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::company::Company;
use berth_core::config::DriverConfig;
use berth_core::environment::Environment;
use berth_core::ids::{CompanyId, RunId};
use berth_core::lease::LeasePolicy;
use berth_core::time::Timestamp;
use berth_drivers::local::LocalDriver;
use berth_drivers::registry::{DriverRegistry, ProviderRegistry};
use berth_server::runs::leases;
use berth_server::runs::manager::RunContext;
use berth_server::secrets::SecretCipher;
use berth_server::store::Store;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use server::TestServer;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn percentile(samples: &mut [Duration], fraction: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * fraction).round() as usize]
}

fn row(label: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.5).as_secs_f64() * 1000.0;
    let p99 = percentile(samples, 0.99).as_secs_f64() * 1000.0;
    println!("{label:<44} {:>8} {p50:>10.2} {p99:>10.2}", samples.len());
}

/// POSTs a run and reads its event stream to the end (the final event); returns the stream's bytes.
async fn run_to_completion(
    http: &reqwest::Client,
    server: &TestServer,
    company: &str,
    body: &Value,
) -> usize {
    let response = http
        .post(format!("{}/api/companies/{company}/runs", server.url))
        .bearer_auth(&server.admin_token)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let run: Value = response.json().await.unwrap();
    let stream = http
        .get(format!(
            "{}/api/runs/{}/events",
            server.url,
            run["id"].as_str().unwrap()
        ))
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

async fn overhead(server: &TestServer, runs: usize) {
    let company = server.default_company().await;
    let (_, sandbox) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "bench sandbox", "driver": "sandbox", "config": {"provider": "fake"}}),
        )
        .await;
    let sandbox = sandbox["id"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();

    let mut bare = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let status = tokio::process::Command::new("true").status().await.unwrap();
        assert!(status.success());
        bare.push(started.elapsed());
    }
    let mut api_local = Vec::with_capacity(runs);
    let mut api_fake = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        run_to_completion(&http, server, &company, &json!({"command": ["true"]})).await;
        api_local.push(started.elapsed());
        let started = Instant::now();
        run_to_completion(
            &http,
            server,
            &company,
            &json!({"command": ["true"], "environmentId": sandbox}),
        )
        .await;
        api_fake.push(started.elapsed());
    }
    let mut cli_local = Vec::new();
    for _ in 0..runs.min(50) {
        let started = Instant::now();
        let status = tokio::process::Command::new(server::berth_bin())
            .args(["run", "--", "true"])
            .env("BERTH_URL", &server.url)
            .env("BERTH_TOKEN", &server.admin_token)
            .status()
            .await
            .unwrap();
        assert!(status.success());
        cli_local.push(started.elapsed());
    }
    println!("\n(a) run overhead: `true`, sequential");
    println!("{:<44} {:>8} {:>10} {:>10}", "", "runs", "p50 ms", "p99 ms");
    row("bare spawn of `true` (baseline)", &mut bare);
    row("run via API, local driver", &mut api_local);
    row("run via API, fake sandbox provider", &mut api_fake);
    row("`berth run -- true` (CLI process), local", &mut cli_local);
}

async fn lease_cycles(label: &str, store: Store, cycles: usize) {
    let now = Timestamp::now();
    let company = Company {
        id: CompanyId::new(),
        name: format!("lease-bench-{}", uuid::Uuid::new_v4()),
        created_at: now,
    };
    store.insert_company(&company).await.unwrap();
    let environment: Environment = store.ensure_local_environment(company.id).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let drivers = Arc::new(DriverRegistry::new(
        LocalDriver::new(root.path()),
        Arc::new(ProviderRegistry::new()),
    ));
    let driver = drivers.get(environment.driver);
    let context = Arc::new(RunContext {
        store: store.clone(),
        drivers: drivers.clone(),
        cipher: Arc::new(SecretCipher::new(&[7; 32])),
        bridge: None,
    });
    let workers = 8;
    let started = Instant::now();
    let tasks = (0..workers).map(|_| {
        let (store, context, driver, environment) = (
            store.clone(),
            context.clone(),
            driver.clone(),
            environment.clone(),
        );
        async move {
            for _ in 0..cycles / workers {
                let held = leases::acquire(
                    &store,
                    &driver,
                    &environment,
                    &DriverConfig::Local,
                    RunId::new(),
                    LeasePolicy::Ephemeral,
                )
                .await
                .unwrap();
                leases::release(&context, &held, &DriverConfig::Local, false, None)
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
    });
    futures::future::join_all(tasks).await;
    let elapsed = started.elapsed();
    let done = cycles / workers * workers;
    println!(
        "{label:<44} {done:>8} {:>12.0}",
        done as f64 / elapsed.as_secs_f64()
    );
}

async fn throughput(server: &TestServer, megabytes: usize) {
    let company = server.default_company().await;
    let bytes = megabytes * 1_000_000;
    let producer = format!("head -c {bytes} /dev/zero | tr '\\0' x");

    let started = Instant::now();
    let status = tokio::process::Command::new("sh")
        .args(["-c", &format!("{producer} > /dev/null")])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let bare = started.elapsed();

    // What reading the pipe and storing every byte costs with no server at all: the floor under berth's figure.
    let stored_dir = tempfile::tempdir().unwrap();
    let stored_file = stored_dir.path().join("output");
    let started = Instant::now();
    let status = tokio::process::Command::new("sh")
        .args([
            "-c",
            &format!("{producer} | cat > '{}'", stored_file.display()),
        ])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let stored = started.elapsed();
    drop(stored_dir);

    let http = reqwest::Client::new();
    let started = Instant::now();
    run_to_completion(
        &http,
        server,
        &company,
        &json!({"command": ["sh", "-c", producer], "timeoutMs": 600000}),
    )
    .await;
    let through_berth = started.elapsed();
    let rate = |elapsed: Duration| megabytes as f64 / elapsed.as_secs_f64();
    println!("\n(c) output throughput: {megabytes} MB to stdout");
    println!("{:<44} {:>10} {:>10}", "", "seconds", "MB/s");
    println!(
        "{:<44} {:>10.2} {:>10.1}",
        "piped to /dev/null (baseline)",
        bare.as_secs_f64(),
        rate(bare)
    );
    println!(
        "{:<44} {:>10.2} {:>10.1}",
        "piped through `cat` into a file (reference)",
        stored.as_secs_f64(),
        rate(stored)
    );
    println!(
        "{:<44} {:>10.2} {:>10.1}",
        "through a berth run (stored + streamed)",
        through_berth.as_secs_f64(),
        rate(through_berth)
    );
    println!(
        "{:<44} {:>21.0}%",
        "berth / baseline",
        100.0 * rate(through_berth) / rate(bare)
    );
}

#[tokio::main]
async fn main() {
    let runs = env_number("BERTH_BENCH_RUNS", 200);
    let cycles = env_number("BERTH_BENCH_LEASE_CYCLES", 2000);
    let megabytes = env_number("BERTH_BENCH_OUTPUT_MB", 100);
    println!("berth runs benchmark (release build, SQLite server unless noted)");

    let server = TestServer::start().await;
    overhead(&server, runs).await;

    println!("\n(b) lease acquire + release cycles, 8 concurrent workers, local driver");
    println!("{:<44} {:>8} {:>12}", "", "cycles", "cycles/s");
    let sqlite_dir = tempfile::tempdir().unwrap();
    let sqlite = Store::connect(&format!(
        "sqlite://{}",
        sqlite_dir.path().join("bench.db").display()
    ))
    .await
    .unwrap();
    lease_cycles("sqlite", sqlite.clone(), cycles).await;
    sqlite.close().await;
    if std::env::var_os("BERTH_TEST_POSTGRES_URL").is_some() {
        let database = db::TestDb::postgres().await;
        lease_cycles("postgres", database.store().clone(), cycles).await;
        database.cleanup().await;
    } else {
        println!(
            "(BERTH_TEST_POSTGRES_URL is not set: PostgreSQL skipped; scripts/bench.sh starts one)"
        );
    }

    throughput(&server, megabytes).await;
    server.stop().await;
}
