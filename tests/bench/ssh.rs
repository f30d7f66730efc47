//! The ssh driver beside the tools it replaces, in one run against the same local OpenSSH sshd on 127.0.0.1:
//!
//! - (a) the round trip of `true`, sequential p50/p99: through berth's pooled connection (`execute`, warm) beside
//!   the `ssh` CLI per command (a fresh process and connection each time: the reference's way) and `ssh` through a
//!   ControlMaster. Targets: pooled p50 under 5 ms, and at least 10× faster than the per-command CLI.
//! - (b) syncing a generated workspace (5,000 files, 50 MB, three levels of directories, varied sizes) into a
//!   persistent workspace, cold (empty remote directory) and after changing one file (median of a few), beside
//!   `rsync -a` over ssh doing the same. Target: the incremental sync no slower than 2× rsync.
//!
//! - (c) a slow login: a second sshd whose user's `~/.bashrc` sleeps 150 ms, as on a developer's host whose rc files
//!   run `pyenv init` or nvm. A whole berth run (acquire → sync in → exec `true` → sync back → release of a small
//!   workspace, on the pooled connection and its runner; the first, cold run apart) beside one `ssh host true`, and
//!   the pooled exec round trip there. Targets: the whole run faster than one CLI connection; pooled exec p50 under
//!   5 ms.
//! - (d) output throughput: one command writing 100 MB to stdout through berth's runner beside
//!   `ssh host head -c …` into /dev/null (medians of three).
//!
//! Nothing here can time a no-op: sshd's log proves which variants opened new connections, and every copy is checked
//! against its source. Run: `bash scripts/bench.sh ssh`. Knobs: `BERTH_BENCH_EXECS` (berth and ControlMaster,
//! default 200), `BERTH_BENCH_CLI_EXECS` (per-command CLI, default 50), `BERTH_BENCH_SYNC_FILES` (default 5000),
//! `BERTH_BENCH_SYNC_MB` (default 50), `BERTH_BENCH_SYNC_REPEATS` (incremental syncs, default 5),
//! `BERTH_BENCH_WHOLE_RUNS` (slow-login whole runs, default 20), `BERTH_BENCH_OUTPUT_MB` (default 100).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../it/support/sshd.rs"]
#[allow(dead_code, unreachable_pub)]
mod sshd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_core::config::DriverConfig;
use berth_core::driver::{
    BoxFuture, EnvironmentDriver, ExecRequest, LeaseHandle, LeaseRequest, OutputSink, OutputStream,
    RealizedWorkspace, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_drivers::registry::ProviderRegistry;
use berth_drivers::ssh::SshDriver;
use serde_json::{Value, json};
use sshd::{TestSshd, ssh_client_command};

/// A knob from the environment; a value that is not a number is a mistake, not a default.
fn knob(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {value:?}")),
        Err(_) => default,
    }
}

/// (p50, p99) in milliseconds.
fn p50_p99_ms(samples: &mut [Duration]) -> (f64, f64) {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_unstable();
    let last = samples.len() - 1;
    let ms = |q: f64| samples[(last as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    (ms(0.5), ms(0.99))
}

fn median_secs(samples: &[Duration]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2].as_secs_f64()
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// Output of `true` is nothing; whatever arrives is dropped.
struct Discard;

impl OutputSink for Discard {
    fn output<'a>(&'a self, _stream: OutputStream, _data: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The sshd's environment config with `workspaceMode`, parsed as the server parses it (the key stays inline).
fn driver_config(sshd: &TestSshd, mode: &str) -> DriverConfig {
    let mut config: Value = sshd.config();
    config["workspaceMode"] = json!(mode);
    DriverConfig::parse(Driver::Ssh, &config, &ProviderRegistry::new())
        .unwrap_or_else(|errors| panic!("the bench's ssh config is invalid: {errors}"))
}

fn ssh_cli(sshd: &TestSshd) -> Command {
    ssh_client_command(
        &sshd.user_key_file,
        &sshd.known_hosts_file,
        sshd.port,
        &sshd.user,
    )
}

/// Runs a CLI command to completion with stderr appended to `log`; returns how long it took, panics if it failed.
async fn time_cli(mut command: Command, log: &Path) -> Duration {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the ssh client log");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let described = format!("{command:?}");
    let mut command = tokio::process::Command::from(command);
    let started = Instant::now();
    let status = command
        .status()
        .await
        .unwrap_or_else(|err| panic!("cannot start {described}: {err}"));
    let elapsed = started.elapsed();
    assert!(
        status.success(),
        "{described} failed ({status}): {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    elapsed
}

fn true_request() -> ExecRequest {
    ExecRequest {
        argv: vec!["true".to_owned()],
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout: Some(Duration::from_secs(30)),
    }
}

async fn time_berth_exec(
    driver: &SshDriver,
    lease: &LeaseHandle,
    workspace: &RealizedWorkspace,
) -> Duration {
    let started = Instant::now();
    let outcome = driver
        .execute(
            lease,
            workspace,
            true_request(),
            &Discard,
            Box::pin(std::future::pending()),
        )
        .await
        .expect("berth runs `true` over ssh");
    let elapsed = started.elapsed();
    assert_eq!(
        outcome.exit_code,
        Some(0),
        "`true` through berth: {outcome:?}"
    );
    elapsed
}

/// What the remote user's login shell costs before any command starts, in every variant alike: sshd runs each
/// command as `$SHELL -c …` with `SSH_CLIENT` set, and bash then reads `~/.bashrc`. The sshd is on this host, so
/// the same start is timed here directly.
async fn login_shell_startup(sshd: &TestSshd, runs: usize) -> (String, Vec<Duration>) {
    let entry = Command::new("getent")
        .args(["passwd", &sshd.user])
        .output()
        .expect("run getent");
    assert!(entry.status.success(), "getent knows no user {}", sshd.user);
    let entry = String::from_utf8_lossy(&entry.stdout).trim().to_owned();
    let fields: Vec<&str> = entry.split(':').collect();
    assert!(fields.len() >= 7, "malformed passwd entry: {entry}");
    let (home, shell) = (fields[5].to_owned(), fields[6].to_owned());
    let log = tempfile::NamedTempFile::new().expect("temp file");
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut command = Command::new("env");
        command
            .arg("-i")
            .arg(format!("HOME={home}"))
            .arg(format!("USER={}", sshd.user))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin")
            .arg("SSH_CLIENT=127.0.0.1 40000 22")
            .args([&shell, "-c", "true"])
            .current_dir(&home);
        samples.push(time_cli(command, log.path()).await);
    }
    (shell, samples)
}

/// A ControlMaster the bench started; `ssh -O exit` stops it, also when the bench panics.
struct ControlMaster {
    exit: Option<Command>,
}

impl ControlMaster {
    async fn stop(mut self, log: &Path) {
        let exit = self.exit.take().expect("the master is running");
        time_cli(exit, log).await;
    }
}

impl Drop for ControlMaster {
    fn drop(&mut self) {
        if let Some(mut exit) = self.exit.take() {
            let _ = exit
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn with_control_path(mut command: Command, control_path: &str, master: &str) -> Command {
    command.args([
        "-o",
        &format!("ControlMaster={master}"),
        "-o",
        &format!("ControlPath={control_path}"),
        "-o",
        "ControlPersist=60",
    ]);
    command
}

/// Counts of what sshd logged so far (`LogLevel VERBOSE`): connections it authenticated, session channels started.
#[derive(Clone, Copy)]
struct SshdCounts {
    connections: usize,
    sessions: usize,
}

impl SshdCounts {
    fn now(sshd: &TestSshd) -> Self {
        let logs = sshd.logs();
        Self {
            connections: logs.matches("Accepted publickey").count(),
            sessions: logs.matches("Starting session:").count(),
        }
    }

    /// (new connections, new sessions) since `self`.
    fn since(self, sshd: &TestSshd) -> (usize, usize) {
        let now = Self::now(sshd);
        (
            now.connections - self.connections,
            now.sessions - self.sessions,
        )
    }
}

/// One row of (a): its samples and the sessions sshd started per command.
struct ExecRow {
    label: &'static str,
    samples: Vec<Duration>,
    sessions_per_command: f64,
}

impl ExecRow {
    fn new(label: &'static str, samples: Vec<Duration>, sessions: usize) -> Self {
        let sessions_per_command = sessions as f64 / samples.len() as f64;
        Self {
            label,
            samples,
            sessions_per_command,
        }
    }
}

/// The figures the targets are checked against.
struct ExecFigures {
    pooled_p50_ms: f64,
    cli_speedup: f64,
    login_shell_p50_ms: f64,
}

async fn exec_round_trips(sshd: &TestSshd, execs: usize, cli_execs: usize) -> ExecFigures {
    let driver = SshDriver::default();
    let config = driver_config(sshd, "per_run");
    let request = LeaseRequest {
        company_id: CompanyId::new(),
        environment_id: EnvironmentId::new(),
        run_id: RunId::new(),
    };
    let lease = driver
        .acquire(&config, &request)
        .await
        .expect("acquire an ssh lease");
    let workspace = driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: None,
            },
        )
        .await
        .expect("create the remote workspace");
    time_berth_exec(&driver, &lease, &workspace).await; // warm-up
    tokio::time::sleep(Duration::from_millis(200)).await; // the warm-up's leftover kill
    let before = SshdCounts::now(sshd);
    let mut berth = Vec::with_capacity(execs);
    for _ in 0..execs {
        berth.push(time_berth_exec(&driver, &lease, &workspace).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (connections, sessions) = before.since(sshd);
    assert_eq!(
        connections, 0,
        "berth opened new ssh connections instead of using its pooled one"
    );
    let berth = ExecRow::new("berth, pooled connection", berth, sessions);
    driver
        .release(&lease, false, Some(&config))
        .await
        .expect("release the ssh lease");
    assert!(
        !Path::new(&workspace.cwd).exists(),
        "the per-run workspace outlived its lease"
    );

    let scratch = tempfile::Builder::new()
        .prefix("berth-bench-ssh")
        .tempdir_in("/tmp") // a ControlPath must stay short: it is a unix socket
        .expect("temp dir");
    let log = scratch.path().join("ssh-client.log");

    let mut cli = Vec::with_capacity(cli_execs);
    let before = SshdCounts::now(sshd);
    for _ in 0..cli_execs {
        let mut command = ssh_cli(sshd);
        command.arg("true");
        cli.push(time_cli(command, &log).await);
    }
    let (connections, sessions) = before.since(sshd);
    assert_eq!(
        (connections, sessions),
        (cli_execs, cli_execs),
        "the per-command CLI should connect and start a session once per command"
    );
    let cli = ExecRow::new("`ssh` CLI per command (baseline)", cli, sessions);

    let control_path = format!("{}/cm-%C", scratch.path().display());
    let mut start = with_control_path(ssh_cli(sshd), &control_path, "yes");
    start.args(["-N", "-f"]);
    time_cli(start, &log).await;
    let mut exit = with_control_path(ssh_cli(sshd), &control_path, "no");
    exit.args(["-O", "exit"]);
    let master = ControlMaster { exit: Some(exit) };
    let mut check = with_control_path(ssh_cli(sshd), &control_path, "no");
    check.args(["-O", "check"]);
    time_cli(check, &log).await;
    let muxed_true = || {
        let mut command = with_control_path(ssh_cli(sshd), &control_path, "auto");
        command.arg("true");
        command
    };
    time_cli(muxed_true(), &log).await; // warm-up
    let before = SshdCounts::now(sshd);
    let mut muxed = Vec::with_capacity(execs);
    for _ in 0..execs {
        muxed.push(time_cli(muxed_true(), &log).await);
    }
    let (connections, sessions) = before.since(sshd);
    assert_eq!(
        connections, 0,
        "the ControlMaster variant opened new connections"
    );
    let muxed = ExecRow::new("`ssh` with ControlMaster (baseline)", muxed, sessions);
    master.stop(&log).await;
    let (shell, mut startup) = login_shell_startup(sshd, cli_execs.max(10)).await;

    println!("\n(a) exec round trip of `true`, sequential");
    println!(
        "{:<44} {:>8} {:>10} {:>10} {:>13} {:>13}",
        "", "runs", "p50 ms", "p99 ms", "sessions/cmd", "berth faster"
    );
    let mut berth_p50 = 0.0;
    let mut cli_p50 = 0.0;
    for mut row in [berth, cli, muxed] {
        let (p50, p99) = p50_p99_ms(&mut row.samples);
        let speedup = if row.label.starts_with("berth") {
            berth_p50 = p50;
            String::new()
        } else {
            format!("{:.1}×", p50 / berth_p50)
        };
        if row.label.contains("per command") {
            cli_p50 = p50;
        }
        println!(
            "{:<44} {:>8} {p50:>10.2} {p99:>10.2} {:>13.1} {speedup:>13}",
            row.label,
            row.samples.len(),
            row.sessions_per_command
        );
    }
    let (shell_p50, shell_p99) = p50_p99_ms(&mut startup);
    println!(
        "{:<44} {:>8} {shell_p50:>10.2} {shell_p99:>10.2}",
        format!("  in every session: login shell ({shell})"),
        startup.len()
    );
    ExecFigures {
        pooled_p50_ms: berth_p50,
        cli_speedup: cli_p50 / berth_p50,
        login_shell_p50_ms: shell_p50,
    }
}

/// xorshift64: reproducible sizes and incompressible content without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Writes `files` files totalling `bytes` under `root` in up to 256 directories three levels deep, sizes from a few
/// bytes to about 3× the mean. Returns the relative paths.
fn generate_tree(root: &Path, files: usize, bytes: u64, rng: &mut Rng) -> Vec<String> {
    assert!(files > 0, "BERTH_BENCH_SYNC_FILES must be at least 1");
    let weights: Vec<u64> = (0..files).map(|_| (rng.next() % 64 + 1).pow(2)).collect();
    let total: u64 = weights.iter().sum();
    let mut sizes: Vec<u64> = weights.iter().map(|w| bytes * w / total).collect();
    let short = bytes - sizes.iter().sum::<u64>();
    sizes[files - 1] += short;
    let mut paths = Vec::with_capacity(files);
    for (index, size) in sizes.into_iter().enumerate() {
        let path = format!(
            "a{}/b{}/c{}/f{index:05}.bin",
            index % 8,
            index / 8 % 8,
            index / 64 % 4
        );
        let file = root.join(&path);
        std::fs::create_dir_all(file.parent().unwrap()).expect("create a workspace directory");
        std::fs::write(&file, rng.bytes(size as usize)).expect("write a workspace file");
        paths.push(path);
    }
    paths
}

/// Relative path → size of every regular file under `root`.
fn file_sizes(root: &Path) -> BTreeMap<String, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                walk(root, &entry.path(), out);
            } else if kind.is_file() {
                let relative = entry.path().strip_prefix(root).unwrap().to_owned();
                out.insert(
                    relative.to_string_lossy().into_owned(),
                    entry.metadata().unwrap().len(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Panics unless `copy` holds the same files with the same sizes as `source`, and the same bytes for `compare`.
fn assert_same_tree<'a>(
    what: &str,
    source: &Path,
    copy: &Path,
    compare: impl IntoIterator<Item = &'a String>,
) {
    let (expected, found) = (file_sizes(source), file_sizes(copy));
    assert_eq!(
        expected.len(),
        found.len(),
        "{what}: the copy holds {} files, the source {}",
        found.len(),
        expected.len()
    );
    assert!(expected == found, "{what}: file names or sizes differ");
    for path in compare {
        assert!(
            std::fs::read(source.join(path)).unwrap() == std::fs::read(copy.join(path)).unwrap(),
            "{what}: {path} differs from the source"
        );
    }
}

/// Takes a lease on the persistent workspace of `environment_id` and syncs `source` in; returns the time of both
/// and what the driver reported (`filesSent`, `bytesSent`), and where the workspace is.
async fn berth_sync(
    driver: &SshDriver,
    config: &DriverConfig,
    environment_id: EnvironmentId,
    source: &Path,
) -> (Duration, u64, u64, PathBuf) {
    let request = LeaseRequest {
        company_id: CompanyId::new(),
        environment_id,
        run_id: RunId::new(),
    };
    let started = Instant::now();
    let lease = driver
        .acquire(config, &request)
        .await
        .expect("acquire the persistent ssh lease");
    let workspace = driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: Some(source.to_path_buf()),
            },
        )
        .await
        .expect("berth syncs the workspace in");
    let elapsed = started.elapsed();
    driver
        .release(&lease, false, Some(config))
        .await
        .expect("release the persistent ssh lease");
    let number = |key: &str| {
        workspace.metadata[key]
            .as_u64()
            .unwrap_or_else(|| panic!("the workspace metadata has no {key}"))
    };
    (
        elapsed,
        number("filesSent"),
        number("bytesSent"),
        PathBuf::from(&workspace.cwd),
    )
}

async fn time_rsync(sshd: &TestSshd, source: &Path, dest: &Path) -> Duration {
    let transport = format!(
        "ssh -F /dev/null -i {} -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null \
         -o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes -o LogLevel=ERROR -p {}",
        sshd.user_key_file.display(),
        sshd.known_hosts_file.display(),
        sshd.port
    );
    assert!(
        !transport.contains("  ")
            && !format!("{}{}", source.display(), dest.display()).contains(' '),
        "rsync's -e splits on spaces: the bench's paths must have none"
    );
    let mut command = tokio::process::Command::new("rsync");
    command
        .arg("-a")
        .arg("-e")
        .arg(&transport)
        .arg(format!("{}/", source.display()))
        .arg(format!("{}@127.0.0.1:{}/", sshd.user, dest.display()))
        .stdin(Stdio::null());
    let started = Instant::now();
    let output = command.output().await.unwrap_or_else(|err| {
        panic!("cannot start rsync ({err}): install it (`apt-get install rsync`, or run scripts/bench.sh as root)")
    });
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "rsync failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

async fn workspace_sync(sshd: &TestSshd, files: usize, megabytes: usize, repeats: usize) -> f64 {
    assert!(repeats > 0, "BERTH_BENCH_SYNC_REPEATS must be at least 1");
    let bytes = megabytes as u64 * 1_000_000;
    let scratch = tempfile::tempdir().expect("temp dir");
    let source = scratch.path().join("source");
    let rsync_dest = sshd.workspace.join("rsync");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let paths = generate_tree(&source, files, bytes, &mut rng);

    let driver = SshDriver::default();
    let config = driver_config(sshd, "persistent");
    let environment_id = EnvironmentId::new();

    let (berth_cold, sent, sent_bytes, berth_dest) =
        berth_sync(&driver, &config, environment_id, &source).await;
    assert_eq!(
        (sent, sent_bytes),
        (files as u64, bytes),
        "the cold sync did not send everything"
    );
    assert_same_tree("berth, cold", &source, &berth_dest, &paths);
    let rsync_cold = time_rsync(sshd, &source, &rsync_dest).await;
    assert_same_tree("rsync, cold", &source, &rsync_dest, &paths);

    let (mut berth_incremental, mut rsync_incremental) = (Vec::new(), Vec::new());
    for repeat in 0..repeats {
        let changed = &paths[(repeat * 997 + 13) % files];
        let file = source.join(changed);
        let size = std::fs::metadata(&file).unwrap().len() as usize + 4096 + repeat;
        std::fs::write(&file, rng.bytes(size)).unwrap();
        let (elapsed, sent, sent_bytes, dest) =
            berth_sync(&driver, &config, environment_id, &source).await;
        assert_eq!(dest, berth_dest, "a persistent workspace moved");
        assert_eq!(
            (sent, sent_bytes),
            (1, size as u64),
            "the incremental sync did not send exactly the changed file"
        );
        assert_same_tree("berth, incremental", &source, &berth_dest, [changed]);
        berth_incremental.push(elapsed);
        rsync_incremental.push(time_rsync(sshd, &source, &rsync_dest).await);
        assert_same_tree("rsync, incremental", &source, &rsync_dest, [changed]);
    }

    // Where berth's incremental time goes: a sync with nothing to send, and the host scan inside it, apart.
    let before = SshdCounts::now(sshd);
    let (unchanged, sent, _, _) = berth_sync(&driver, &config, environment_id, &source).await;
    let (_, sessions) = before.since(sshd);
    assert_eq!(sent, 0, "a sync with nothing changed sent files");
    let started = Instant::now();
    let manifest = berth_drivers::sync::scan_tree(&source).await.unwrap();
    let scan = started.elapsed();
    assert!(manifest.len() >= files, "the host scan missed files");

    let directories = paths
        .iter()
        .filter_map(|path| path.rsplit_once('/').map(|(parent, _)| parent))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let berth_incremental = median_secs(&berth_incremental);
    let rsync_incremental = median_secs(&rsync_incremental);
    println!(
        "\n(b) workspace sync: {files} files, {megabytes} MB, {directories} directories; berth into a persistent \
         workspace"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>12}",
        "", "berth s", "rsync s", "berth/rsync"
    );
    println!(
        "{:<44} {:>10.3} {:>10.3} {:>12.2}",
        "cold: into an empty directory",
        berth_cold.as_secs_f64(),
        rsync_cold.as_secs_f64(),
        berth_cold.as_secs_f64() / rsync_cold.as_secs_f64()
    );
    println!(
        "{:<44} {berth_incremental:>10.3} {rsync_incremental:>10.3} {:>12.2}",
        format!("one file changed (median of {repeats})"),
        berth_incremental / rsync_incremental
    );
    println!(
        "  berth with nothing changed: {:.3} s in {sessions} remote sessions; the host manifest in it (SHA-256 of \
         every file): {:.3} s",
        unchanged.as_secs_f64(),
        scan.as_secs_f64()
    );
    berth_incremental / rsync_incremental
}

/// Counts what arrives.
#[derive(Default)]
struct Count(std::sync::atomic::AtomicU64);

impl OutputSink for Count {
    fn output<'a>(&'a self, _stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
        self.0
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async {})
    }
}

/// One whole run of `true` on a per-run workspace synced from `source`: acquire, sync in, exec, sync back, release.
async fn whole_run(driver: &SshDriver, config: &DriverConfig, source: &Path) -> Duration {
    let request = LeaseRequest {
        company_id: CompanyId::new(),
        environment_id: EnvironmentId::new(),
        run_id: RunId::new(),
    };
    let started = Instant::now();
    let lease = driver
        .acquire(config, &request)
        .await
        .expect("acquire an ssh lease");
    let workspace = driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: Some(source.to_path_buf()),
            },
        )
        .await
        .expect("sync the workspace in");
    let outcome = driver
        .execute(
            &lease,
            &workspace,
            true_request(),
            &Discard,
            Box::pin(std::future::pending()),
        )
        .await
        .expect("run `true`");
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    driver
        .sync_back(&lease, &workspace)
        .await
        .expect("sync the workspace back");
    driver
        .release(&lease, false, Some(config))
        .await
        .expect("release the lease");
    let elapsed = started.elapsed();
    assert!(
        !Path::new(&workspace.cwd).exists(),
        "the per-run workspace outlived its lease"
    );
    elapsed
}

/// The figures of (c).
struct SlowLoginFigures {
    whole_run_p50_ms: f64,
    cli_p50_ms: f64,
    pooled_p50_ms: f64,
}

async fn slow_login(runs: usize, execs: usize, cli_execs: usize) -> SlowLoginFigures {
    let sshd = TestSshd::start();
    sshd.slow_login(Duration::from_millis(150));
    let (shell, mut startup) = login_shell_startup(&sshd, 10).await;
    let (shell_p50, _) = p50_p99_ms(&mut startup);
    assert!(
        shell_p50 >= 140.0,
        "the slow login shell ({shell}) starts in {shell_p50:.1} ms: the sleep in ~/.bashrc is not read"
    );
    let scratch = tempfile::tempdir().expect("temp dir");
    let source = scratch.path().join("source");
    let mut rng = Rng(0x5EED);
    generate_tree(&source, 20, 200_000, &mut rng);
    let log = scratch.path().join("ssh-client.log");

    let mut cli = Vec::with_capacity(cli_execs);
    for _ in 0..cli_execs.clamp(5, 20) {
        let mut command = ssh_cli(&sshd);
        command.arg("true");
        cli.push(time_cli(command, &log).await);
    }

    let driver = SshDriver::default();
    let config = driver_config(&sshd, "per_run");
    let cold = whole_run(&driver, &config, &source).await;
    let before = SshdCounts::now(&sshd);
    let mut warm = Vec::with_capacity(runs);
    for _ in 0..runs {
        warm.push(whole_run(&driver, &config, &source).await);
    }
    let (connections, sessions) = before.since(&sshd);
    assert_eq!(connections, 0, "the warm runs opened new connections");

    // Pooled exec on this host: the runner already started.
    let request = LeaseRequest {
        company_id: CompanyId::new(),
        environment_id: EnvironmentId::new(),
        run_id: RunId::new(),
    };
    let lease = driver.acquire(&config, &request).await.expect("acquire");
    let workspace = driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: None,
            },
        )
        .await
        .expect("workspace");
    time_berth_exec(&driver, &lease, &workspace).await;
    let mut pooled = Vec::with_capacity(execs);
    for _ in 0..execs {
        pooled.push(time_berth_exec(&driver, &lease, &workspace).await);
    }
    driver
        .release(&lease, false, Some(&config))
        .await
        .expect("release");

    let (cli_p50, cli_p99) = p50_p99_ms(&mut cli);
    let (warm_p50, warm_p99) = p50_p99_ms(&mut warm);
    let (pooled_p50, pooled_p99) = p50_p99_ms(&mut pooled);
    println!(
        "\n(c) slow login: {shell} whose ~/.bashrc sleeps 150 ms (measured {shell_p50:.0} ms); a whole run syncs 20 files \
         / 200 kB in and back"
    );
    println!("{:<52} {:>8} {:>10} {:>10}", "", "runs", "p50 ms", "p99 ms");
    println!(
        "{:<52} {:>8} {cli_p50:>10.2} {cli_p99:>10.2}",
        "`ssh host true`, one CLI connection (baseline)",
        cli.len()
    );
    println!(
        "{:<52} {:>8} {:>10.2} {:>10}",
        "berth whole run, cold (connect, start the runner)",
        1,
        cold.as_secs_f64() * 1000.0,
        ""
    );
    println!(
        "{:<52} {:>8} {warm_p50:>10.2} {warm_p99:>10.2}",
        "berth whole run, pooled connection and runner",
        warm.len()
    );
    println!(
        "{:<52} {:>8} {pooled_p50:>10.2} {pooled_p99:>10.2}",
        "berth pooled exec of `true`",
        pooled.len()
    );
    println!(
        "  sessions sshd started during the {} warm runs: {sessions} (each would pay the login shell)",
        warm.len()
    );
    sshd.stop();
    SlowLoginFigures {
        whole_run_p50_ms: warm_p50,
        cli_p50_ms: cli_p50,
        pooled_p50_ms: pooled_p50,
    }
}

/// (d): MB/s of berth (runner) and of the CLI, medians of three.
async fn output_throughput(sshd: &TestSshd, megabytes: usize) -> (f64, f64) {
    let bytes = megabytes as u64 * 1_000_000;
    let driver = SshDriver::default();
    let config = driver_config(sshd, "per_run");
    let request = LeaseRequest {
        company_id: CompanyId::new(),
        environment_id: EnvironmentId::new(),
        run_id: RunId::new(),
    };
    let lease = driver.acquire(&config, &request).await.expect("acquire");
    let workspace = driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: None,
            },
        )
        .await
        .expect("workspace");
    let scratch = tempfile::tempdir().expect("temp dir");
    let log = scratch.path().join("ssh-client.log");
    let (mut berth, mut cli) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let count = Count::default();
        let started = Instant::now();
        let outcome = driver
            .execute(
                &lease,
                &workspace,
                ExecRequest {
                    argv: vec![
                        "head".to_owned(),
                        "-c".to_owned(),
                        bytes.to_string(),
                        "/dev/zero".to_owned(),
                    ],
                    ..true_request()
                },
                &count,
                Box::pin(std::future::pending()),
            )
            .await
            .expect("berth streams output");
        berth.push(started.elapsed());
        assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
        assert_eq!(
            count.0.load(std::sync::atomic::Ordering::Relaxed),
            bytes,
            "berth lost or added output"
        );
        let mut command = ssh_cli(sshd);
        command.arg(format!("head -c {bytes} /dev/zero"));
        cli.push(time_cli(command, &log).await);
    }
    driver
        .release(&lease, false, Some(&config))
        .await
        .expect("release");
    let rate = |samples: &[Duration]| megabytes as f64 / median_secs(samples);
    let (berth, cli) = (rate(&berth), rate(&cli));
    println!("\n(d) one command writing {megabytes} MB to stdout (median of 3)");
    println!("{:<52} {:>10}", "", "MB/s");
    println!(
        "{:<52} {berth:>10.0}",
        "berth, on the pooled connection's runner"
    );
    println!(
        "{:<52} {cli:>10.0}",
        "`ssh host head -c …` > /dev/null (baseline)"
    );
    (berth, cli)
}

#[tokio::main]
async fn main() {
    let execs = knob("BERTH_BENCH_EXECS", 200);
    let cli_execs = knob("BERTH_BENCH_CLI_EXECS", 50);
    let files = knob("BERTH_BENCH_SYNC_FILES", 5000);
    let megabytes = knob("BERTH_BENCH_SYNC_MB", 50);
    let repeats = knob("BERTH_BENCH_SYNC_REPEATS", 5);
    let whole_runs = knob("BERTH_BENCH_WHOLE_RUNS", 20);
    let output_mb = knob("BERTH_BENCH_OUTPUT_MB", 100);
    println!("berth ssh benchmark (release build, one OpenSSH sshd on 127.0.0.1)");

    let sshd = TestSshd::start();
    let exec = exec_round_trips(&sshd, execs, cli_execs).await;
    let ratio = workspace_sync(&sshd, files, megabytes, repeats).await;
    let slow = slow_login(whole_runs, execs, cli_execs).await;
    let (berth_rate, cli_rate) = output_throughput(&sshd, output_mb).await;

    println!("\ntargets");
    println!(
        "  pooled exec p50 under 5 ms: {} ({:.2} ms)",
        verdict(exec.pooled_p50_ms < 5.0),
        exec.pooled_p50_ms
    );
    println!(
        "  pooled exec at least 10× faster than the per-command CLI: {} ({:.1}×)",
        verdict(exec.cli_speedup >= 10.0),
        exec.cli_speedup
    );
    println!(
        "  incremental sync no slower than 2× rsync: {} ({ratio:.2}×)",
        verdict(ratio <= 2.0)
    );
    println!(
        "  slow login: a whole run faster than one `ssh host true`: {} ({:.1} ms against {:.1} ms)",
        verdict(slow.whole_run_p50_ms < slow.cli_p50_ms),
        slow.whole_run_p50_ms,
        slow.cli_p50_ms
    );
    println!(
        "  slow login: pooled exec p50 under 5 ms: {} ({:.2} ms)",
        verdict(slow.pooled_p50_ms < 5.0),
        slow.pooled_p50_ms
    );
    println!(
        "  output through berth at least as fast as the ssh CLI's: {} ({berth_rate:.0} against {cli_rate:.0} MB/s)",
        verdict(berth_rate >= cli_rate * 0.9)
    );
    if exec.login_shell_p50_ms > 10.0 {
        println!(
            "  note: sshd starts every remote command through the user's login shell, and here that alone takes \
             {:.0} ms (rc files: ~/.bashrc is read for ssh commands); every figure above includes it once per \
             session",
            exec.login_shell_p50_ms
        );
    }
    sshd.stop();
}
