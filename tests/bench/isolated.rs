//! The `isolated` provider, measured against its baselines in one go:
//!
//! - (a) a run of `true` through the API (POST, then the event stream to its final event) on `isolated` and on the
//!   contained Local driver, beside a bare `bwrap … true` with the same namespaces and a bare spawn of `true`
//!   (p50/p99). Target: the isolated run's p50 within 10 ms of the Local run's. A third row runs `isolated` with
//!   `memoryMb` and `pids`, whose cgroups the run must join (each join costs the kernel an RCU grace period).
//! - (b) isolated acquire + release cycles per second, through the provider itself (sandbox directories, passwd,
//!   cleanup), beside the same cycles of the `fake` provider.
//!
//! Run: `bash scripts/bench.sh isolated`. Knobs: `BERTH_BENCH_RUNS` (default 200), `BERTH_BENCH_LEASE_CYCLES`
//! (default 1000).

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

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::config::{DriverConfig, SandboxConfig};
use berth_core::driver::LeaseRequest;
use berth_core::environment::Driver;
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::provider::SandboxProvider;
use berth_drivers::contain::Containment;
use berth_drivers::isolated::IsolatedProvider;
use berth_drivers::registry::ProviderRegistry;
use berth_fake_provider::FakeProvider;
use common::{env_number, percentile};
use runs_api::run_to_completion;
use serde_json::{Value, json};
use server::TestServer;

fn row(label: &str, samples: &mut [Duration]) -> f64 {
    let p50 = percentile(samples, 0.5).as_secs_f64() * 1000.0;
    let p99 = percentile(samples, 0.99).as_secs_f64() * 1000.0;
    println!("{label:<52} {:>8} {p50:>10.2} {p99:>10.2}", samples.len());
    p50
}

/// bubblewrap with the sandbox's namespaces and a minimal view, running `true`: the floor under an isolated run.
fn bare_bwrap() -> std::process::Command {
    let mut command = std::process::Command::new("bwrap");
    command.args([
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--",
        "true",
    ]);
    command
}

async fn overhead(server: &TestServer, runs: usize) {
    let company = server.default_company().await;
    let (status, isolated) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "bench isolated", "driver": "sandbox", "config": {"provider": "isolated"}}),
        )
        .await;
    assert!(status.is_success(), "{isolated}");
    let isolated = isolated["id"].as_str().unwrap().to_owned();
    let (status, limited) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "bench isolated, limited", "driver": "sandbox",
                   "config": {"provider": "isolated", "memoryMb": 256, "pids": 128}}),
        )
        .await;
    assert!(status.is_success(), "{limited}");
    let limited = limited["id"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();

    let mut bare = Vec::with_capacity(runs);
    let mut bwrap = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        assert!(
            tokio::process::Command::new("true")
                .status()
                .await
                .unwrap()
                .success()
        );
        bare.push(started.elapsed());
        let started = Instant::now();
        let mut command = tokio::process::Command::from(bare_bwrap());
        assert!(command.status().await.unwrap().success());
        bwrap.push(started.elapsed());
    }
    // Interleaved, so both see the same machine.
    let mut local = Vec::with_capacity(runs);
    let mut sandboxed = Vec::with_capacity(runs);
    let mut with_limits = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        run_to_completion(&http, server, &company, &json!({"command": ["true"]})).await;
        local.push(started.elapsed());
        let started = Instant::now();
        run_to_completion(
            &http,
            server,
            &company,
            &json!({"command": ["true"], "environmentId": isolated}),
        )
        .await;
        sandboxed.push(started.elapsed());
        let started = Instant::now();
        run_to_completion(
            &http,
            server,
            &company,
            &json!({"command": ["true"], "environmentId": limited}),
        )
        .await;
        with_limits.push(started.elapsed());
    }
    println!("\n(a) run overhead: `true`, sequential");
    println!("{:<52} {:>8} {:>10} {:>10}", "", "runs", "p50 ms", "p99 ms");
    row("bare spawn of `true`", &mut bare);
    row("bare `bwrap … true`, the sandbox's namespaces", &mut bwrap);
    let local_p50 = row("run via API, Local (contained) (baseline)", &mut local);
    let isolated_p50 = row("run via API, isolated sandbox", &mut sandboxed);
    row(
        "run via API, isolated with memoryMb + pids (cgroups)",
        &mut with_limits,
    );
    println!(
        "isolated p50 - Local p50 = {:.2} ms (target: within 10 ms)",
        isolated_p50 - local_p50
    );
}

async fn cycles(
    label: &str,
    provider: &dyn SandboxProvider,
    config: &SandboxConfig,
    cycles: usize,
) -> f64 {
    let started = Instant::now();
    for _ in 0..cycles {
        let request = LeaseRequest {
            company_id: CompanyId::new(),
            environment_id: EnvironmentId::new(),
            run_id: RunId::new(),
        };
        let lease = provider.acquire(config, &request).await.unwrap();
        provider.release(&lease, false, None).await.unwrap();
    }
    let per_second = cycles as f64 / started.elapsed().as_secs_f64();
    println!("{label:<52} {cycles:>8} {per_second:>14.0}");
    per_second
}

async fn lease_cycles(count: usize) {
    let root = tempfile::tempdir().unwrap();
    // The providers measured are the ones registered: the registry is also the catalog their configs parse against.
    let mut registry = ProviderRegistry::new();
    registry
        .register(Arc::new(
            FakeProvider::builder()
                .root(root.path().join("fake"))
                .containment(Containment::disabled_for_tests())
                .build()
                .unwrap(),
        ))
        .unwrap();
    registry
        .register(Arc::new(
            IsolatedProvider::new(
                root.path().join("isolated"),
                server::berth_bin().to_path_buf(),
            )
            .unwrap(),
        ))
        .unwrap();
    let (fake, isolated) = (
        registry.get("fake").unwrap(),
        registry.get("isolated").unwrap(),
    );
    let parse =
        |config: Value| match DriverConfig::parse(Driver::Sandbox, &config, &registry).unwrap() {
            DriverConfig::Sandbox(sandbox) => sandbox,
            other => panic!("not a sandbox config: {other:?}"),
        };
    let isolated_config = parse(json!({"provider": "isolated", "memoryMb": 256, "pids": 128}));
    let fake_config = parse(json!({"provider": "fake"}));
    println!("\n(b) lease acquire + release, sequential");
    println!("{:<52} {:>8} {:>14}", "", "cycles", "per second");
    cycles(
        "fake provider (baseline)",
        fake.as_ref(),
        &fake_config,
        count,
    )
    .await;
    cycles(
        "isolated provider (memoryMb, pids)",
        isolated.as_ref(),
        &isolated_config,
        count,
    )
    .await;
}

#[tokio::main]
async fn main() {
    let runs = env_number("BERTH_BENCH_RUNS", 200);
    let server = TestServer::start().await;
    overhead(&server, runs).await;
    server.stop().await;
    lease_cycles(env_number("BERTH_BENCH_LEASE_CYCLES", 1000)).await;
}
