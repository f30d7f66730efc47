//! API throughput: environments created and listed per second, with p50/p99 latency, on SQLite and PostgreSQL side by
//! side. Each backend gets a real `berth serve` (release build via `scripts/bench.sh`) driven over HTTP by many
//! concurrent clients, each working in its own company.
//!
//! Run: `bash scripts/bench.sh api`. Knobs: `BERTH_BENCH_CLIENTS` (default 32), `BERTH_BENCH_REQUESTS` per client and
//! operation (default 100).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common.rs"]
#[allow(dead_code, unreachable_pub)]
mod common;

#[path = "../it/support/server.rs"]
#[allow(dead_code, unreachable_pub)]
mod server;

use std::time::{Duration, Instant};

use common::env_number;
use reqwest::{Method, StatusCode};
use serde_json::json;
use server::{ServerOptions, TestServer};

#[path = "../it/support/db.rs"]
#[allow(dead_code, unreachable_pub)]
mod db;

struct Measured {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, fraction: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
        sorted[index]
    }
}

async fn drive(
    server: &TestServer,
    companies: &[(String, String)],
    requests: usize,
    create: bool,
) -> Measured {
    let started = Instant::now();
    let tasks = companies.iter().enumerate().map(|(client, (company, token))| async move {
        let mut latencies = Vec::with_capacity(requests);
        for index in 0..requests {
            let path = format!("/api/companies/{company}/environments");
            let begun = Instant::now();
            let (status, body) = if create {
                let body = json!({"name": format!("bench-{client}-{index}"), "driver": "sandbox", "config": {"provider": "fake"}});
                server.call(Method::POST, &path, token, Some(body)).await
            } else {
                server.call(Method::GET, &path, token, None).await
            };
            latencies.push(begun.elapsed());
            let expected = if create { StatusCode::CREATED } else { StatusCode::OK };
            assert_eq!(status, expected, "{body}");
        }
        latencies
    });
    let latencies = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect();
    Measured {
        latencies,
        elapsed: started.elapsed(),
    }
}

async fn bench_backend(
    name: &str,
    options: ServerOptions,
    clients: usize,
    requests: usize,
) -> Vec<(String, Measured)> {
    let server = TestServer::start_with(options).await;
    let mut companies = Vec::new();
    for index in 0..clients {
        let company = server.create_company(&format!("bench-{index}")).await;
        let token = server.create_key(&company, "manager").await;
        companies.push((company, token));
    }
    let created = drive(&server, &companies, requests, true).await;
    let listed = drive(&server, &companies, requests, false).await;
    server.stop().await;
    vec![
        (format!("{name} create"), created),
        (format!("{name} list ({} envs)", requests + 1), listed),
    ]
}

#[tokio::main]
async fn main() {
    let clients = env_number("BERTH_BENCH_CLIENTS", 32);
    let requests = env_number("BERTH_BENCH_REQUESTS", 100);
    println!(
        "berth API benchmark: {clients} concurrent clients x {requests} requests per operation, one company each"
    );

    let mut rows = bench_backend("sqlite", ServerOptions::default(), clients, requests).await;
    if std::env::var_os("BERTH_TEST_POSTGRES_URL").is_some() {
        let database = db::TestDb::postgres().await;
        let options = ServerOptions {
            database_url: Some(database.url()),
            ..Default::default()
        };
        rows.extend(bench_backend("postgres", options, clients, requests).await);
        database.cleanup().await;
    } else {
        println!(
            "(BERTH_TEST_POSTGRES_URL is not set: PostgreSQL skipped; scripts/bench.sh starts one)"
        );
    }

    println!();
    println!(
        "{:<28} {:>10} {:>12} {:>10} {:>10}",
        "operation", "requests", "req/s", "p50 ms", "p99 ms"
    );
    for (label, measured) in &rows {
        println!(
            "{:<28} {:>10} {:>12.0} {:>10.2} {:>10.2}",
            label,
            measured.latencies.len(),
            measured.per_second(),
            measured.percentile(0.50).as_secs_f64() * 1000.0,
            measured.percentile(0.99).as_secs_f64() * 1000.0,
        );
    }
}
