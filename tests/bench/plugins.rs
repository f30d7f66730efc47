//! Provider plugins, measured against the same provider in process, at the driver level (no server, no HTTP):
//!
//! - (a) one execute of `true` on the fake provider in process (`FakeProvider`, the baseline) and on the same fake
//!   out of process (the `berth-fake-provider` binary hosted by `PluginHost`, reached through
//!   `PluginSandboxProvider`), beside a bare spawn of `true` (p50/p99, interleaved, after a warm-up). Target: the
//!   plugin path adds under 2 ms at p50. Both are uncontained (`--uncontained` and the builder's
//!   `Containment::disabled_for_tests`), so the rows differ only by the plugin hop; where bubblewrap works, two
//!   more rows show both contained, as a server runs them.
//! - (b) one execute printing 100 MB to stdout (`head -c … /dev/zero`) through each path into a sink that counts
//!   bytes and chunks, beside a bare spawn whose stdout the bench reads (a default 64 KiB pipe; berth's command pipes
//!   are 1 MiB, so this row is a reference, not a floor). Median of interleaved rounds, with the CPU time of the
//!   bench process (the host side) and of the plugin process per round. Target: the plugin path's throughput at
//!   least half the in-process path's.
//!
//! A missed target is printed, not fatal. Run: `bash scripts/bench.sh plugins`. Knobs: `BERTH_BENCH_RUNS` (default
//! 200), `BERTH_BENCH_WARMUP` (default 20), `BERTH_BENCH_OUTPUT_MB` (default 100), `BERTH_BENCH_OUTPUT_ROUNDS`
//! (default 3), `BERTH_FAKE_PLUGIN_BIN` (else the bench builds `berth-fake-provider` in release).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common.rs"]
#[allow(dead_code, unreachable_pub)]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use berth_core::config::{DriverConfig, SandboxConfig};
use berth_core::driver::{
    ExecRequest, LeaseHandle, LeaseRequest, OutputSink, OutputStream, RealizedWorkspace,
    WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::provider::{BoxFuture, SandboxProvider};
use berth_drivers::contain::{Containment, Hidden};
use berth_drivers::registry::ProviderRegistry;
use berth_fake_provider::FakeProvider;
use berth_isolation::probe::HostSupport;
use berth_plugins::host::PluginHost;
use berth_plugins::supervisor::{Deadlines, HostSettings, PluginState, RestartPolicy};
use common::{env_number, percentile};
use serde_json::json;
use tokio::io::AsyncReadExt;

const P50_TARGET_MS: f64 = 2.0;
const THROUGHPUT_TARGET: f64 = 0.5;

/// The fake provider's plugin binary: `BERTH_FAKE_PLUGIN_BIN`, else built here (release, beside this bench).
fn fake_plugin_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("BERTH_FAKE_PLUGIN_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "berth-fake-provider",
            "--bin",
            "berth-fake-provider",
        ])
        .status()
        .expect("run cargo build for the fake plugin");
    assert!(status.success(), "building the fake plugin failed");
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("berth-fake-provider")
}

/// A plugin directory whose manifest runs the fake plugin as `id`, offering `key`, with `flags`.
fn plugin_dir(parent: &Path, bin: &Path, id: &str, key: &str, flags: &[String]) -> PathBuf {
    let dir = parent.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = vec![bin.display().to_string(), "--id".to_owned(), id.to_owned()];
    command.extend(flags.iter().cloned());
    let manifest = json!({
        "id": id,
        "version": "0.1.0",
        "command": command,
        "environmentDrivers": [{
            "driverKey": key,
            "kind": "sandbox_provider",
            "displayName": "Fake sandboxes (plugin)",
            "supportsReusableLeases": true,
            "configSchema": {
                "type": "object",
                "properties": {"image": {"type": "string", "default": "fake:latest"}},
                "additionalProperties": false
            }
        }]
    });
    std::fs::write(dir.join("berth-plugin.json"), manifest.to_string()).unwrap();
    dir
}

/// Counts the bytes it is given, and the chunks they came in.
#[derive(Debug, Default)]
struct Counter {
    bytes: AtomicU64,
    chunks: AtomicU64,
}

impl Counter {
    /// (bytes, chunks) since the last take.
    fn take(&self) -> (u64, u64) {
        (
            self.bytes.swap(0, Ordering::Relaxed),
            self.chunks.swap(0, Ordering::Relaxed),
        )
    }
}

impl OutputSink for Counter {
    fn output<'a>(&'a self, _stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
        Box::pin(async {})
    }
}

/// One path to a provider: a lease and a prepared workspace on it, ready to execute.
struct Lane {
    provider: Arc<dyn SandboxProvider>,
    lease: LeaseHandle,
    workspace: RealizedWorkspace,
    sink: Counter,
}

impl Lane {
    async fn open(provider: Arc<dyn SandboxProvider>, config: &SandboxConfig) -> Self {
        let request = LeaseRequest {
            company_id: CompanyId::new(),
            environment_id: EnvironmentId::new(),
            run_id: RunId::new(),
        };
        let lease = provider.acquire(config, &request).await.unwrap();
        let workspace = provider
            .prepare_workspace(
                &lease,
                &WorkspaceRequest {
                    run_id: request.run_id,
                    local_path: None,
                },
            )
            .await
            .unwrap();
        Self {
            provider,
            lease,
            workspace,
            sink: Counter::default(),
        }
    }

    /// Executes `argv`: how long it took, and the bytes and chunks of output that reached the sink.
    async fn execute(&self, argv: &[&str]) -> (Duration, (u64, u64)) {
        let request = ExecRequest {
            argv: argv.iter().map(|arg| (*arg).to_owned()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout: Some(Duration::from_secs(600)),
        };
        let started = Instant::now();
        let outcome = self
            .provider
            .execute(
                &self.lease,
                &self.workspace,
                request,
                &self.sink,
                Box::pin(std::future::pending()),
            )
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(outcome.exit_code, Some(0), "{argv:?}: {outcome:?}");
        (elapsed, self.sink.take())
    }

    async fn close(self) {
        self.provider
            .release(&self.lease, false, None)
            .await
            .unwrap();
    }
}

fn in_process(root: &Path, containment: Containment) -> Arc<dyn SandboxProvider> {
    Arc::new(
        FakeProvider::builder()
            .root(root)
            .containment(containment)
            .build()
            .unwrap(),
    )
}

/// Where a plugin process is: the child of this process started with `--id <id>`.
fn plugin_pid(id: &str) -> Option<u32> {
    let me = std::process::id();
    let wanted = format!("--id\0{id}\0");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let ppid: u32 = stat[stat.rfind(')')? + 2..]
                .split(' ')
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (ppid == me && String::from_utf8_lossy(&cmdline).contains(&wanted)).then_some(pid)
        })
}

/// User + system CPU time of a process and its threads so far (`/proc/PID/stat`, in clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn row(label: &str, samples: &mut [Duration]) -> f64 {
    let p50 = percentile(samples, 0.5).as_secs_f64() * 1000.0;
    let p99 = percentile(samples, 0.99).as_secs_f64() * 1000.0;
    println!("{label:<56} {:>8} {p50:>10.2} {p99:>10.2}", samples.len());
    p50
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

async fn bare_true() -> Duration {
    let started = Instant::now();
    let status = tokio::process::Command::new("true").status().await.unwrap();
    assert!(status.success());
    started.elapsed()
}

/// `head -c BYTES /dev/zero` with its stdout (a default pipe) read here in reads of up to 256 KiB and thrown away:
/// how long it took, the bytes and the reads.
async fn bare_output(bytes: usize) -> (Duration, (u64, u64)) {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buffer = vec![0u8; 256 * 1024];
    let (mut read, mut reads) = (0u64, 0u64);
    loop {
        let n = stdout.read(&mut buffer).await.unwrap();
        if n == 0 {
            break;
        }
        read += n as u64;
        reads += 1;
    }
    assert!(child.wait().await.unwrap().success());
    (started.elapsed(), (read, reads))
}

/// (a): `true` through each path, interleaved; `pairs` are (label, in-process, plugin) of one containment each.
async fn overhead(pairs: &[(&str, &Lane, &Lane)], runs: usize, warmup: usize) {
    for _ in 0..warmup {
        bare_true().await;
        for (_, local, plugin) in pairs {
            local.execute(&["true"]).await;
            plugin.execute(&["true"]).await;
        }
    }
    let mut bare = Vec::with_capacity(runs);
    let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> = pairs
        .iter()
        .map(|_| (Vec::with_capacity(runs), Vec::with_capacity(runs)))
        .collect();
    for _ in 0..runs {
        bare.push(bare_true().await);
        for ((_, local, plugin), (local_samples, plugin_samples)) in pairs.iter().zip(&mut samples)
        {
            local_samples.push(local.execute(&["true"]).await.0);
            plugin_samples.push(plugin.execute(&["true"]).await.0);
        }
    }
    println!(
        "\n(a) execute overhead: `true`, sequential, interleaved, after {warmup} warm-up runs of each"
    );
    println!("{:<56} {:>8} {:>10} {:>10}", "", "runs", "p50 ms", "p99 ms");
    row("bare spawn of `true`", &mut bare);
    let mut first = None;
    for ((label, _, _), (local_samples, plugin_samples)) in pairs.iter().zip(&mut samples) {
        let local_p50 = row(
            &format!("fake provider in process, {label} (baseline)"),
            local_samples,
        );
        let plugin_p50 = row(
            &format!("fake provider as a plugin, {label}"),
            plugin_samples,
        );
        first.get_or_insert((*label, plugin_p50 - local_p50));
        println!(
            "{:<56} {:>8} {:>10.2}",
            format!("  plugin p50 - in-process p50, {label}"),
            "",
            plugin_p50 - local_p50
        );
    }
    if let Some((label, added)) = first {
        println!(
            "target: the plugin path adds under {P50_TARGET_MS:.0} ms at p50 ({label}): {added:.2} ms, {}",
            verdict(added < P50_TARGET_MS)
        );
    }
}

/// One round of (b) on one path.
#[derive(Clone, Copy, Debug, Default)]
struct Round {
    wall: Duration,
    /// CPU time of this process (the host side; in process, the whole provider).
    bench_cpu: Duration,
    /// CPU time of the plugin process.
    plugin_cpu: Duration,
    /// How many pieces the output reached the sink in (notifications, on the plugin path).
    chunks: u64,
}

/// (b): `megabytes` MB of stdout through each path, median of `rounds` interleaved rounds.
async fn throughput(local: &Lane, plugin: &Lane, plugin_id: &str, megabytes: usize, rounds: usize) {
    let bytes = megabytes * 1_000_000;
    let count = bytes.to_string();
    let command = ["head", "-c", count.as_str(), "/dev/zero"];
    let me = std::process::id();
    let plugin_process = plugin_pid(plugin_id);
    let plugin_cpu = || plugin_process.map_or(Duration::ZERO, cpu_time);
    let mut bare = Vec::new();
    let mut in_process = Vec::new();
    let mut plugged = Vec::new();
    for _ in 0..rounds {
        let cpu = cpu_time(me);
        let (wall, (read, chunks)) = bare_output(bytes).await;
        assert_eq!(read, bytes as u64, "the bare spawn lost output");
        bare.push(Round {
            wall,
            bench_cpu: cpu_time(me) - cpu,
            plugin_cpu: Duration::ZERO,
            chunks,
        });

        let cpu = cpu_time(me);
        let (wall, (read, chunks)) = local.execute(&command).await;
        assert_eq!(read, bytes as u64, "the in-process path lost output");
        in_process.push(Round {
            wall,
            bench_cpu: cpu_time(me) - cpu,
            plugin_cpu: Duration::ZERO,
            chunks,
        });

        let (cpu, plugin_before) = (cpu_time(me), plugin_cpu());
        let (wall, (read, chunks)) = plugin.execute(&command).await;
        assert_eq!(read, bytes as u64, "the plugin path lost output");
        plugged.push(Round {
            wall,
            bench_cpu: cpu_time(me) - cpu,
            plugin_cpu: plugin_cpu() - plugin_before,
            chunks,
        });
    }
    println!(
        "\n(b) output throughput: {megabytes} MB to stdout (`head -c {bytes} /dev/zero`), median of {rounds} \
         interleaved rounds, uncontained"
    );
    println!(
        "{:<48} {:>8} {:>8} {:>10} {:>10} {:>11} {:>12}",
        "", "seconds", "MB/s", "chunks", "KiB/chunk", "bench CPU-s", "plugin CPU-s"
    );
    let mut rates = Vec::new();
    for (label, rounds) in [
        ("bare spawn, read by the bench (64 KiB pipe)", &bare),
        ("fake provider in process (baseline)", &in_process),
        ("fake provider as a plugin", &plugged),
    ] {
        let median = |pick: fn(&Round) -> Duration| {
            let mut values: Vec<Duration> = rounds.iter().map(pick).collect();
            percentile(&mut values, 0.5)
        };
        let wall = median(|round| round.wall);
        let rate = megabytes as f64 / wall.as_secs_f64();
        let mut chunks: Vec<u64> = rounds.iter().map(|round| round.chunks).collect();
        chunks.sort_unstable();
        let chunks = chunks[chunks.len() / 2];
        let plugin_cpu = median(|round| round.plugin_cpu);
        println!(
            "{label:<48} {:>8.3} {rate:>8.0} {chunks:>10} {:>10.0} {:>11.2} {:>12}",
            wall.as_secs_f64(),
            bytes as f64 / 1024.0 / chunks.max(1) as f64,
            median(|round| round.bench_cpu).as_secs_f64(),
            if plugin_cpu.is_zero() {
                String::new()
            } else {
                format!("{:.2}", plugin_cpu.as_secs_f64())
            }
        );
        rates.push(rate);
    }
    let ratio = rates[2] / rates[1];
    println!(
        "target: plugin throughput at least {THROUGHPUT_TARGET:.1}x in-process: {ratio:.2}x, {}",
        verdict(ratio >= THROUGHPUT_TARGET)
    );
}

#[tokio::main]
async fn main() {
    let runs = env_number("BERTH_BENCH_RUNS", 200);
    let warmup = env_number("BERTH_BENCH_WARMUP", 20);
    let megabytes = env_number("BERTH_BENCH_OUTPUT_MB", 100);
    let rounds = env_number("BERTH_BENCH_OUTPUT_ROUNDS", 3);

    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let bin = fake_plugin_bin();
    let support = HostSupport::detect();
    // Containment is measured like with like: both uncontained (the targets), and both contained where bwrap works.
    let contained = support.namespaces().is_ok();
    let root_flag = |name: &str| ["--root".to_owned(), root.join(name).display().to_string()];
    let mut dirs = vec![plugin_dir(
        &root.join("plugins"),
        &bin,
        "bench.fake",
        "fake-plugin",
        &[
            root_flag("plugin").as_slice(),
            &["--uncontained".to_owned()],
        ]
        .concat(),
    )];
    if contained {
        dirs.push(plugin_dir(
            &root.join("plugins"),
            &bin,
            "bench.fake-contained",
            "fake-plugin-contained",
            &root_flag("plugin-contained"),
        ));
    }
    let settings = HostSettings {
        state_root: root.join("plugin-state"),
        restart: RestartPolicy::default(),
        path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned()),
        host_version: env!("CARGO_PKG_VERSION").to_owned(),
        deadlines: Deadlines::default(),
    };
    let host = PluginHost::start(&dirs, &["fake".to_owned()], &settings);
    assert!(host.problems().is_empty(), "{:?}", host.problems());
    for plugin in host.plugins() {
        let state = plugin.settle(Duration::from_secs(20)).await;
        assert!(
            matches!(state, PluginState::Ready(_)),
            "plugin {} is not ready: {:?}",
            plugin.id(),
            state.status()
        );
    }
    // Configs parse against the providers registered, as a server's do.
    let mut registry = ProviderRegistry::new();
    let local = in_process(&root.join("in-process"), Containment::disabled_for_tests());
    registry.register(local.clone()).unwrap();
    for provider in host.sandbox_providers() {
        let provider = provider.unwrap();
        let plugin_id = provider.plugin().id().to_owned();
        registry.register_plugin(provider, &plugin_id).unwrap();
    }
    let config = |key: &str| match DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": key}),
        &registry,
    )
    .unwrap()
    {
        DriverConfig::Sandbox(sandbox) => sandbox,
        other => panic!("not a sandbox config: {other:?}"),
    };

    println!(
        "berth plugins benchmark (release build): the fake provider in process and as a plugin"
    );
    println!(
        "plugin binary: {}; containment: uncontained on both sides{}",
        bin.display(),
        if contained {
            ", and bubblewrap on both sides in the contained rows"
        } else {
            " (bubblewrap does not work here: no contained rows)"
        }
    );
    let local = Lane::open(local, &config("fake")).await;
    let plugin = Lane::open(registry.get("fake-plugin").unwrap(), &config("fake-plugin")).await;
    let mut contained_pair = None;
    if contained {
        let local = Lane::open(
            in_process(
                &root.join("in-process-contained"),
                Containment::new(&support, Hidden::default(), false),
            ),
            &config("fake"),
        )
        .await;
        let plugin = Lane::open(
            registry.get("fake-plugin-contained").unwrap(),
            &config("fake-plugin-contained"),
        )
        .await;
        contained_pair = Some((local, plugin));
    }

    let mut pairs = vec![("uncontained", &local, &plugin)];
    if let Some((local, plugin)) = &contained_pair {
        pairs.push(("contained (bwrap)", local, plugin));
    }
    overhead(&pairs, runs, warmup).await;
    throughput(&local, &plugin, "bench.fake", megabytes, rounds).await;

    local.close().await;
    plugin.close().await;
    if let Some((local, plugin)) = contained_pair {
        local.close().await;
        plugin.close().await;
    }
    drop(registry);
    host.shutdown(Duration::from_secs(5)).await;
    for id in ["bench.fake", "bench.fake-contained"] {
        if let Some(pid) = plugin_pid(id) {
            eprintln!("warning: plugin {id} (pid {pid}) is still running after shutdown");
        }
    }
}
