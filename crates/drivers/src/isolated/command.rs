//! One command in a sandbox: the init's spec for the tier in use, the cgroup around it, and its outcome from what
//! bubblewrap, the init and the cgroup report.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, ExecOutcome, ExecRequest, OutputSink,
};
use berth_isolation::bwrap::{ETC_ENTRIES, SANDBOX_RUN_DIR, SANDBOX_WORKSPACE, SandboxView};
use berth_isolation::init::{InitReport, InitSpec, LandlockRules, Relay, encode_spec, read_report};
use berth_isolation::probe::HostSupport;

use super::host_fs::chown_tree;
use super::lease::SandboxLimits;
use crate::fs::{blocking, create_private_dir, io_error};
use crate::process::{DEFAULT_PATH, ProcessSpec, command_cwd, run_process, signal_name};

/// Where the callback bridge answers inside a sandbox: `http://127.0.0.1:7421`.
pub const SANDBOX_BRIDGE_PORT: u16 = 7421;
/// The bridge's socket, in the run directory.
pub(super) const BRIDGE_SOCKET: &str = "bridge.sock";
/// Open files per process inside.
const MAX_OPEN_FILES: u64 = 65_536;

/// How a sandbox is built on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Tier {
    /// bubblewrap's namespaces (with the bwrap path), seccomp, Landlock as a second layer, cgroups.
    Namespaces(PathBuf),
    /// For hosts that refuse namespaces (containers that block user namespaces): Landlock is the filesystem,
    /// network, signal and ptrace boundary (ABI 6 or later, fully enforced), with the TCP-only seccomp filter and
    /// cgroups. Paths are the host's; `/tmp` is a per-command directory bounded per file by `diskMb`.
    Landlock,
}

/// What one command needs of the provider: the tier in use, berth's own binary, what the host offers, and the
/// sandbox's owner. The provider builds one per command, so this module never names the provider that runs it.
pub(super) struct Launcher<'a> {
    pub(super) tier: Tier,
    /// berth's own binary: the sandbox's init.
    pub(super) init_program: &'a Path,
    pub(super) support: &'a HostSupport,
    /// The uid the sandbox's files belong to when berth runs as root.
    pub(super) owner: Option<u32>,
}

impl Launcher<'_> {
    /// One command in the sandbox at `dir`, in the cgroup `cgroup_name` (unique to the command).
    pub(super) async fn run_in(
        self,
        dir: &Path,
        cgroup_name: &str,
        limits: &SandboxLimits,
        request: ExecRequest,
        sink: &dyn OutputSink,
        cancel: CancelSignal,
    ) -> Result<ExecOutcome, DriverError> {
        let tier = self.tier;
        let run_dir = dir.join("run");
        let workspace = dir.join("workspace");
        let tmp = dir.join("tmp");
        // Inside a mount namespace the sandbox has its own paths; in the Landlock tier it sees the host's.
        let (workspace_inside, tmp_inside, status_file) = match tier {
            Tier::Namespaces(_) => (
                PathBuf::from(SANDBOX_WORKSPACE),
                "/tmp".to_owned(),
                format!("{SANDBOX_RUN_DIR}/{}", berth_isolation::init::STATUS_FILE),
            ),
            Tier::Landlock => (
                workspace.clone(),
                text(&tmp)?,
                text(&run_dir.join(berth_isolation::init::STATUS_FILE))?,
            ),
        };
        let cwd = text(&command_cwd(&workspace_inside, &request)?)?;
        let mut env = request.env;
        env.entry("PATH".to_owned())
            .or_insert_with(|| DEFAULT_PATH.to_owned());
        env.entry("HOME".to_owned())
            .or_insert_with(|| workspace_inside.display().to_string());
        if tier == Tier::Landlock {
            // No private /tmp here: the per-command directory is the one temporary place the run may write.
            env.entry("TMPDIR".to_owned())
                .or_insert_with(|| tmp_inside.clone());
        }
        let writable = vec![text(&workspace_inside)?, tmp_inside.clone()];
        let (landlock, relay, bounded_dir, max_file_size) = match tier {
            Tier::Namespaces(_) => (
                LandlockRules {
                    read: vec!["/".to_owned()],
                    write: writable.into_iter().chain(["/dev".to_owned()]).collect(),
                    tcp_connect: None,
                },
                run_dir.join(BRIDGE_SOCKET).exists().then(|| Relay {
                    port: SANDBOX_BRIDGE_PORT,
                    socket: format!("{SANDBOX_RUN_DIR}/{BRIDGE_SOCKET}"),
                }),
                Some("/tmp".to_owned()),
                None,
            ),
            Tier::Landlock => (
                LandlockRules {
                    read: landlock_tier_reads(limits),
                    write: writable
                        .into_iter()
                        .chain(["/dev/null".to_owned()])
                        .collect(),
                    // The bridge is on the host's loopback here: its port, and nothing else.
                    tcp_connect: Some(
                        env.get("BERTH_API_URL")
                            .and_then(|url| url_port(url))
                            .into_iter()
                            .collect(),
                    ),
                },
                None,
                None,
                Some(limits.disk_mb << 20),
            ),
        };
        let spec = InitSpec {
            argv: request.argv,
            env,
            cwd,
            run_as: self.owner,
            relay,
            landlock,
            status_file,
            require_landlock: tier == Tier::Landlock,
            tcp_only: tier == Tier::Landlock,
            max_open_files: MAX_OPEN_FILES,
            max_processes: None,
            max_address_space: None,
            max_file_size,
            bounded_dir,
        };
        let mut stdin = encode_spec(&spec).map_err(|err| DriverError::failed(err.to_string()))?;
        stdin.extend_from_slice(request.stdin.as_deref().unwrap_or_default());

        let layout = self.support.cgroups.clone();
        let cgroup_limits = limits.cgroup_limits();
        let name = cgroup_name.to_owned();
        let status_path = run_dir.join(berth_isolation::init::STATUS_FILE);
        let owner = self.owner;
        let fresh_tmp = (tier == Tier::Landlock).then(|| tmp.clone());
        let tier_tracks = tier == Tier::Landlock;
        let cgroup = blocking("the isolated provider", move || {
            let _ = std::fs::remove_file(&status_path);
            if let Some(tmp) = fresh_tmp {
                // Each command gets an empty /tmp, as a tmpfs would give it.
                match std::fs::remove_dir_all(&tmp) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(io_error(format!("clearing {}", tmp.display()))(err)),
                }
                create_private_dir(&tmp)?;
                if let Some(uid) = owner {
                    chown_tree(&tmp, uid)?;
                }
            }
            // Without a PID namespace (the Landlock tier), the cgroup is also how a process that left the command's
            // group is found and killed.
            layout
                .create(&name, cgroup_limits, tier_tracks)
                .map_err(|err| DriverError::Uncontained {
                    reason: format!("the isolated provider cannot set the run's limits: {err}"),
                })
        })
        .await?;

        // With cgroups to join, `enter` joins them and becomes the sandbox; without, the sandbox starts directly.
        let procs_files = cgroup.procs_files();
        let mut argv = Vec::new();
        if !procs_files.is_empty() {
            argv.extend([
                text(self.init_program)?,
                "sandbox".to_owned(),
                "enter".to_owned(),
            ]);
            for file in procs_files {
                argv.push("--cgroup".to_owned());
                argv.push(text(&file)?);
            }
            argv.push("--".to_owned());
        }
        match tier {
            Tier::Namespaces(bwrap) => {
                let view = SandboxView {
                    privilege: self.support.privilege,
                    workspace,
                    run_dir: run_dir.clone(),
                    init_program: self.init_program.to_path_buf(),
                    read_only: limits.read_only_paths.clone(),
                    tmp_bytes: Some(limits.disk_mb << 20),
                };
                argv.push(text(&bwrap)?);
                for arg in view.args() {
                    argv.push(
                        arg.into_string()
                            .map_err(|_| DriverError::failed("a sandbox path is not UTF-8"))?,
                    );
                }
            }
            Tier::Landlock => {
                argv.extend([
                    text(self.init_program)?,
                    "sandbox".to_owned(),
                    "init".to_owned(),
                ]);
            }
        }
        let process = ProcessSpec {
            argv,
            env: BTreeMap::from([("PATH".to_owned(), DEFAULT_PATH.to_owned())]),
            cwd: dir.to_path_buf(),
            stdin: Some(stdin),
            timeout: request.timeout,
        };
        let ran = run_process(process, sink, cancel).await;
        let events = cgroup.events();
        let report = read_report(&run_dir);
        // The sandbox's PID namespace died with it; what is left is removing the cgroup (and, in the Landlock tier,
        // killing a process that left the command's group), which the run need not wait for: each command's cgroup
        // has a name of its own, and the lease's cleanup sweeps whatever a crash leaves.
        drop(tokio::task::spawn_blocking(move || {
            cgroup.kill_and_remove()
        }));
        let outer = ran?;
        Ok(outcome_of(outer, report, events, limits))
    }
}

/// What a command in the Landlock tier may read: the system directories a program needs, the `/etc` entries the
/// namespace tier shows (and the host's `passwd`/`group`, which any user can read), `/dev`, and `readOnlyPaths`.
/// Not `/proc` (other processes' command lines), not home directories, not berth's data dir.
pub(super) fn landlock_tier_reads(limits: &SandboxLimits) -> Vec<String> {
    let mut reads: Vec<String> = [
        "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/dev",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    reads.extend(
        ETC_ENTRIES
            .iter()
            .chain(&["passwd", "group"])
            .map(|entry| format!("/etc/{entry}")),
    );
    reads.extend(
        limits
            .read_only_paths
            .iter()
            .map(|path| path.display().to_string()),
    );
    reads
}

/// The port of an `http://HOST:PORT` URL.
pub(super) fn url_port(url: &str) -> Option<u16> {
    url.strip_prefix("http://")?
        .split('/')
        .next()?
        .rsplit_once(':')?
        .1
        .parse()
        .ok()
}

/// The command's outcome, from what bubblewrap's exit, the init's report and the cgroup's counters say.
pub(super) fn outcome_of(
    outer: ExecOutcome,
    report: Option<InitReport>,
    events: berth_isolation::cgroup::Events,
    limits: &SandboxLimits,
) -> ExecOutcome {
    let mut outcome = ExecOutcome {
        timed_out: outer.timed_out,
        cancelled: outer.cancelled,
        ..ExecOutcome::default()
    };
    match &report {
        Some(report) if report.started => {
            outcome.exit_code = report.exit_code;
            outcome.signal = report.signal.map(signal_name);
        }
        _ => {
            outcome.exit_code = outer.exit_code;
            outcome.signal = outer.signal.clone();
        }
    }
    let mut exceeded = Vec::new();
    if events.oom_kills > 0 {
        let mb = limits.memory_mb.unwrap_or_default();
        exceeded.push(format!(
            "memoryMb={mb}: the run needed more than its {mb} MiB of memory and was killed"
        ));
    }
    if events.pids_refused > 0 {
        let pids = limits.pids.unwrap_or_default();
        exceeded.push(format!(
            "pids={pids}: the run tried to have more than {pids} processes; {} forks were refused",
            events.pids_refused
        ));
    }
    if report
        .as_ref()
        .is_some_and(|report| report.bounded_dir_full)
    {
        exceeded.push(format!(
            "diskMb={}: the run filled its {} MiB /tmp",
            limits.disk_mb, limits.disk_mb
        ));
    }
    if !exceeded.is_empty() {
        outcome.limit_exceeded = Some(format!("the run exceeded a limit: {}", exceeded.join("; ")));
    }
    if let Some(error) = report.and_then(|report| report.error) {
        let message = format!("the sandbox could not start the command: {error}");
        outcome.limit_exceeded = Some(match outcome.limit_exceeded {
            Some(limits) => format!("{limits}; {message}"),
            None => message,
        });
    }
    outcome
}

pub(super) fn describe_outcome(outcome: &ExecOutcome) -> String {
    match (&outcome.exit_code, &outcome.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by {signal}"),
        _ => "no exit status".to_owned(),
    }
}

pub(super) fn text(path: &Path) -> Result<String, DriverError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| DriverError::failed(format!("the path {} is not UTF-8", path.display())))
}

/// The probe's test command's output, kept (bounded) to explain a failure.
#[derive(Default)]
pub(super) struct KeptOutput(std::sync::Mutex<Vec<u8>>);

impl OutputSink for KeptOutput {
    fn output<'a>(
        &'a self,
        _stream: berth_core::driver::OutputStream,
        data: &'a [u8],
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(mut kept) = self.0.lock()
                && kept.len() < 4096
            {
                kept.extend_from_slice(data);
            }
        })
    }
}

impl KeptOutput {
    pub(super) fn text(&self) -> String {
        self.0
            .lock()
            .map(|kept| String::from_utf8_lossy(&kept).trim().to_owned())
            .unwrap_or_default()
    }
}
