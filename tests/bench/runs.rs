//! Runs, measured against their baselines in one go:
//!
//! - (a) the overhead of a run of `true` — through the API (POST, then the event stream to its final event) and as
//!   `berth run -- true` from the shell — on the local driver and the fake provider, beside a bare spawn of `true`;
//! - (b) lease acquire + release cycles per second on SQLite and PostgreSQL (the real lease code and local driver);
//! - (c) output throughput of a run writing 100 MB to stdout (stored with nobody following, and stored and followed
//!   over SSE to the final event), beside the same command piped to /dev/null, and two coreutils pipelines that do
//!   berth's work with no server: `cat` into a file (store every byte) and `tee` into a file and on to `cat` (store
//!   every byte and hand it to a consumer). These are the floors under berth's two figures.
//!
//! Run: `bash scripts/bench.sh runs`. Knobs: `BERTH_BENCH_RUNS` (default 200), `BERTH_BENCH_LEASE_CYCLES` (default
//! 2000), `BERTH_BENCH_OUTPUT_MB` (default 100), `BERTH_BENCH_OUTPUT_ROUNDS` (default 5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common.rs"]
#[allow(dead_code, unreachable_pub)]
mod common;

#[path = "../it/support/server.rs"]
#[allow(dead_code, unreachable_pub)]
mod server;

#[path = "../it/support/runs.rs"]
#[allow(dead_code, unreachable_pub)]
mod runs_api;

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
use berth_drivers::contain::Containment;
use berth_drivers::local::LocalDriver;
use berth_drivers::registry::{DriverRegistry, ProviderRegistry};
use berth_server::runs::RunContext;
use berth_server::runs::leases;
use berth_server::secrets::SecretCipher;
use berth_store::Store;
use common::{env_number, percentile};
use runs_api::{all_events, run_to_completion, start_run, text_of};
use serde_json::{Value, json};
use server::TestServer;

fn row(label: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.5).as_secs_f64() * 1000.0;
    let p99 = percentile(samples, 0.99).as_secs_f64() * 1000.0;
    println!("{label:<44} {:>8} {p50:>10.2} {p99:>10.2}", samples.len());
}

/// POSTs a run and polls it until its status is final, without reading its events; returns its id.
async fn run_unfollowed(server: &TestServer, company: &str, body: &Value) -> String {
    let id = start_run(server, company, body.clone()).await;
    loop {
        let (_, run) = server.get(&format!("/api/runs/{id}")).await;
        match run["status"].as_str().unwrap() {
            "queued" | "running" => tokio::time::sleep(Duration::from_millis(2)).await,
            "succeeded" => return id,
            other => panic!("the run ended {other}"),
        }
    }
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
        default_environment_id: None,
    };
    store.insert_company(&company).await.unwrap();
    let environment: Environment = store.ensure_local_environment(company.id).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let drivers = Arc::new(DriverRegistry::new(
        LocalDriver::new(root.path(), Containment::disabled_for_tests()),
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
                    &DriverConfig::local(),
                    RunId::new(),
                    LeasePolicy::Ephemeral,
                )
                .await
                .unwrap();
                leases::release(&context, &held, &DriverConfig::local(), false, None, None)
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

/// One way of moving the producer's output, timed over several rounds.
struct Variant {
    label: &'static str,
    samples: Vec<Duration>,
    /// CPU time the berth server spent per round (berth rows only): steadier than wall time on a shared machine.
    server_cpu: Vec<Duration>,
}

impl Variant {
    fn new(label: &'static str) -> Self {
        Self {
            label,
            samples: Vec::new(),
            server_cpu: Vec::new(),
        }
    }
}

/// User + system CPU time of a process and its threads so far (`/proc/PID/stat`, in clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name in parentheses may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Flushes dirty pages before a timed variant, so none pays for writing back what the one before it stored.
async fn settle() {
    let status = tokio::process::Command::new("sync").status().await.unwrap();
    assert!(status.success());
}

/// Times `producer` piped into `consumer` (a shell pipeline tail) with no berth involved.
async fn time_pipeline(producer: &str, consumer: &str) -> Duration {
    settle().await;
    let started = Instant::now();
    let status = tokio::process::Command::new("sh")
        .args(["-c", &format!("{producer} {consumer}")])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    started.elapsed()
}

async fn throughput(server: &TestServer, megabytes: usize, rounds: usize) {
    let company = server.default_company().await;
    let bytes = megabytes * 1_000_000;
    let producer = format!("head -c {bytes} /dev/zero | tr '\\0' x");
    let run = json!({"command": ["sh", "-c", &producer], "timeoutMs": 600000});
    // Each round stores into new files, as each berth run does, and all are kept until the end, as runs are.
    let scratch = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let pid = server.pid().unwrap();

    let mut bare = Variant::new("piped to /dev/null (baseline)");
    // Reading the pipe and storing every byte with no server at all: the floor under an unfollowed run.
    let mut cat = Variant::new("piped through `cat` into a file");
    // Storing every byte and handing it, as it comes, to one consumer: berth's job done by coreutils (`tee` writes
    // the file, `cat` stands for the follower), with no framing, no database and no network.
    let mut tee = Variant::new("piped through `tee` into a file and `cat`");
    // A run nobody follows: what capturing and storing the output costs on its own (the status turns final only
    // once every byte is stored). Polled every 2 ms.
    let mut unfollowed = Variant::new("through a berth run, nobody following");
    let mut followed = Variant::new("through a berth run, followed over SSE");
    // Interleaved rounds and medians: on a small shared machine single runs swing by a fifth.
    for round in 0..rounds {
        let file = |name: &str| {
            scratch
                .path()
                .join(format!("{name}-{round}"))
                .display()
                .to_string()
        };
        bare.samples
            .push(time_pipeline(&producer, "> /dev/null").await);
        cat.samples
            .push(time_pipeline(&producer, &format!("| cat > '{}'", file("cat"))).await);
        tee.samples.push(
            time_pipeline(
                &producer,
                &format!("| tee '{}' | cat > /dev/null", file("tee")),
            )
            .await,
        );
        settle().await;
        let cpu = cpu_time(pid);
        let started = Instant::now();
        let run_id = run_unfollowed(server, &company, &run).await;
        unfollowed.samples.push(started.elapsed());
        unfollowed.server_cpu.push(cpu_time(pid) - cpu);
        assert_eq!(
            text_of(&all_events(server, &run_id).await, "stdout").len(),
            bytes,
            "the unfollowed run lost output"
        );
        settle().await;
        let cpu = cpu_time(pid);
        let started = Instant::now();
        run_to_completion(&http, server, &company, &run).await;
        followed.samples.push(started.elapsed());
        followed.server_cpu.push(cpu_time(pid) - cpu);
    }
    drop(scratch);

    println!(
        "\n(c) output throughput: {megabytes} MB to stdout, median of {rounds} interleaved rounds"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>12} {:>14}",
        "", "seconds", "MB/s", "of baseline", "server CPU-s"
    );
    let baseline = percentile(&mut bare.samples, 0.5);
    for variant in [
        &mut bare,
        &mut cat,
        &mut tee,
        &mut unfollowed,
        &mut followed,
    ] {
        let median = percentile(&mut variant.samples, 0.5);
        let server_cpu = if variant.server_cpu.is_empty() {
            String::new()
        } else {
            format!(
                "{:.2}",
                percentile(&mut variant.server_cpu, 0.5).as_secs_f64()
            )
        };
        println!(
            "{:<44} {:>10.3} {:>10.1} {:>11.0}% {server_cpu:>14}",
            variant.label,
            median.as_secs_f64(),
            megabytes as f64 / median.as_secs_f64(),
            100.0 * baseline.as_secs_f64() / median.as_secs_f64()
        );
    }
}

#[tokio::main]
async fn main() {
    let runs = env_number("BERTH_BENCH_RUNS", 200);
    let cycles = env_number("BERTH_BENCH_LEASE_CYCLES", 2000);
    let megabytes = env_number("BERTH_BENCH_OUTPUT_MB", 100);
    let rounds = env_number("BERTH_BENCH_OUTPUT_ROUNDS", 5);
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

    throughput(&server, megabytes, rounds).await;
    server.stop().await;
}
