//! Running one command on this host: the only way berth spawns a process (the local driver and the fake provider both
//! come through here), so the guarantees of the API contract hold in one place:
//!
//! - the command gets exactly the environment it is given (plus `PATH`/`HOME` defaults), nothing of berth's own;
//! - it is never run through a shell;
//! - it leads its own process group, so timeouts, cancels and the end of the run reach the whole tree;
//! - with [`CgroupTracking`] (uncontained Local and fake-provider commands, where berth may make cgroups) it also runs
//!   in a cgroup of its own, so what leaves the group (`setsid`) is still found, killed and, after a crash, cleaned
//!   up: the group alone is the fallback;
//! - its output is streamed as it arrives, with the sink's pace as backpressure, and is kept on a timeout or cancel.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_core::driver::{
    CancelSignal, DriverError, ExecOutcome, ExecRequest, OutputSink, OutputStream, ProcessIdentity,
};
use berth_isolation::cgroup::{Hierarchy, RunCgroup, Version};
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

/// `PATH` for commands that bring none: the usual system directories, so `sh`, `env` and friends resolve.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// How long a command may take to exit after SIGTERM (timeout or cancel) before its process group is SIGKILLed.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long output is still read after the command is gone. Everything in its process group is dead by then, so the
/// pipes normally reach EOF at once; only a process that left the group (`setsid`) can hold them open, and it must
/// not hold the run with them.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// How long a command's start waits for the sink to record its process group ([`OutputSink::started`]).
pub const RECORD_DEADLINE: Duration = Duration::from_secs(10);

/// The largest chunk handed to the sink at once.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Capacity asked of the kernel for the command's output pipes (Linux caps unprivileged requests at 1 MiB).
pub const OUTPUT_PIPE_BYTES: usize = 1024 * 1024;

/// One command to run on this host.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    /// Program and arguments; the program is looked up in the command's own `PATH`.
    pub argv: Vec<String>,
    /// The complete environment. `PATH` ([`DEFAULT_PATH`]) and `HOME` (`cwd`) are added only when absent.
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// Written to stdin, which is then closed. `None`: stdin is `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// Kill the process group after this long.
    pub timeout: Option<Duration>,
}

/// Puts each command in a cgroup of its own, below `hierarchy`'s base.
///
/// The command must be in its cgroup before it runs a line of its own: a process it forks first (a `setsid` daemon)
/// would stay outside. berth never forks its server to get there (std spawns with `posix_spawn`, and `pre_exec`
/// would need `unsafe` and a fork of the whole server), so a small trampoline does it: `trampoline` is berth's own
/// binary, started through `posix_spawn` as `berth sandbox enter --cgroup <dir>/cgroup.procs --arg0 NAME -- PROGRAM
/// ARGS`; it writes `0` (itself) into the cgroup and then execs the program in place, keeping its pid, process
/// group and `argv[0]`. Everything the program ever starts descends from a process already inside. (`clone3` with
/// `CLONE_INTO_CGROUP` would need `unsafe` and works on v2 only; this works on v1 and v2 alike.)
#[derive(Clone, Debug)]
pub struct CgroupTracking {
    trampoline: PathBuf,
    hierarchy: Hierarchy,
}

impl CgroupTracking {
    /// Tracking through `trampoline` (a binary that serves `sandbox enter`, as berth's does) in `hierarchy` (see
    /// [`berth_isolation::cgroup::Layout::tracking`]).
    pub fn new(trampoline: PathBuf, hierarchy: Hierarchy) -> Self {
        Self {
            trampoline,
            hierarchy,
        }
    }

    /// `cgroup-v1` or `cgroup-v2`, for probe details.
    pub fn describe(&self) -> &'static str {
        match self.hierarchy.version {
            Version::V1 => "cgroup-v1",
            Version::V2 => "cgroup-v2",
        }
    }

    /// Checks once that commands can join their cgroups here (the trampoline runs `true` in one): a non-root berth may
    /// be able to make a cgroup yet not to move a process into it, and a command must then not fail, only lose its
    /// cgroup. `Err` says why, for the start-up warning.
    pub fn self_test(&self) -> Result<(), String> {
        let cgroup = self.create().map_err(|err| err.to_string())?;
        let procs = cgroup
            .procs_files()
            .into_iter()
            .next()
            .ok_or_else(|| "the test cgroup has no membership file".to_owned())?;
        let truth = find_in_path("true", DEFAULT_PATH, Path::new("/"))
            .ok_or_else(|| format!("no `true` in {DEFAULT_PATH}"))?;
        let ran = std::process::Command::new(&self.trampoline)
            .args(["sandbox", "enter", "--cgroup"])
            .arg(&procs)
            .args(["--arg0", "true", "--"])
            .arg(&truth)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        cgroup.kill_and_remove();
        match ran {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "{} could not join a test cgroup: {}",
                self.trampoline.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(err) => Err(format!("cannot start {}: {err}", self.trampoline.display())),
        }
    }

    /// A new, empty cgroup for one command. Names are unique within this process (a counter) and across restarts
    /// (the pid and the time), so a leftover of a crashed berth is never reused.
    fn create(&self) -> Result<RunCgroup, berth_isolation::Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let name = format!(
            "cmd-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.hierarchy.create_child(&name)
    }
}

/// Why berth ended the command itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Termination {
    TimedOut,
    Cancelled,
}

/// SIGKILLs the process group if the run is abandoned midway (its future dropped): `kill_on_drop` only reaches the
/// direct child, and a run must never leave processes behind. Disarmed once the group has been killed on purpose,
/// because by then its id may be reused.
/// The command's cgroup, when it has one, goes the same way: every member is killed and the cgroup removed.
#[derive(Debug)]
struct GroupGuard {
    pgid: Option<Pid>,
    cgroup: Option<RunCgroup>,
}

impl GroupGuard {
    /// Kills the group and (in the background) empties and removes the cgroup; for the drop path, which cannot wait.
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            signal_group(pgid, Signal::KILL);
        }
        if let Some(cgroup) = self.cgroup.take() {
            signal_cgroup(&cgroup, Signal::KILL);
            // Removal waits for the killed members to exit: not on an async worker.
            let spawned = std::thread::Builder::new()
                .name("berth-cgroup-cleanup".to_owned())
                .spawn(move || cgroup.kill_and_remove());
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "cannot start removing a command's cgroup; it is left behind");
            }
        }
    }

    /// Kills the group and every member of the cgroup, and waits until the cgroup is removed.
    async fn finish(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            signal_group(pgid, Signal::KILL);
        }
        if let Some(cgroup) = self.cgroup.take() {
            let removed = tokio::task::spawn_blocking(move || cgroup.kill_and_remove()).await;
            if let Err(err) = removed {
                tracing::warn!(error = %err, "removing a command's cgroup did not finish");
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `spec` to completion, streaming its output into `sink`.
///
/// Ends when the command exits, its timeout passes or `cancel` resolves. Timeouts and cancels SIGTERM the command's
/// whole process group, then SIGKILL it after [`KILL_GRACE`]. When the command exits by itself, whatever it left
/// running in its group is SIGKILLed too: background processes never outlive the run. Output is then drained to EOF
/// for at most [`DRAIN_DEADLINE`].
///
/// Errors only when the command cannot be started ([`DriverError::Spawn`]) or cannot be waited for.
pub async fn run_process(
    spec: ProcessSpec,
    sink: &dyn OutputSink,
    cancel: CancelSignal,
) -> Result<ExecOutcome, DriverError> {
    run_process_tracked(spec, None, sink, cancel).await
}

/// [`run_process`], with the command in a cgroup of its own when `tracking` is given and a cgroup can be made (else,
/// with a warning, by its process group alone): timeouts and cancels signal every member of the cgroup too, the end
/// of the command kills them all and removes the cgroup, and the identity reported to the sink names it, so that
/// [`kill_recorded`] empties and removes it after a crash.
pub async fn run_process_tracked(
    spec: ProcessSpec,
    tracking: Option<&CgroupTracking>,
    sink: &dyn OutputSink,
    cancel: CancelSignal,
) -> Result<ExecOutcome, DriverError> {
    let ProcessSpec {
        argv,
        mut env,
        cwd,
        stdin,
        timeout,
    } = spec;
    let Some(program) = argv.first().cloned() else {
        return Err(DriverError::Spawn {
            program: String::new(),
            message: "the command is empty".to_owned(),
        });
    };
    // A missing cwd surfaces from spawn as a bare ENOENT, which reads as "no such program"; say what is missing.
    match tokio::fs::metadata(&cwd).await {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(DriverError::Spawn {
                program,
                message: format!("the working directory {} is not a directory", cwd.display()),
            });
        }
        Err(err) => {
            return Err(DriverError::Spawn {
                program,
                message: format!(
                    "the working directory {} is not usable: {err}",
                    cwd.display()
                ),
            });
        }
    }
    env.entry("PATH".to_owned())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    env.entry("HOME".to_owned())
        .or_insert_with(|| cwd.display().to_string());

    // The program is found in the command's own PATH here rather than by std: given a bare name and a PATH of the
    // child's, std must search that PATH after forking, so it forks the whole server (page tables and all, blocking
    // this worker until the exec) instead of using posix_spawn. Not found: std's own lookup reports it as before.
    let resolved = env
        .get("PATH")
        .and_then(|search| find_in_path(&program, search, &cwd));
    let cgroup = match tracking {
        Some(tracking) => {
            // The trampoline always starts; what it would fail to exec must fail here, as a spawn would have.
            runnable(&program, resolved.as_deref(), &cwd)?;
            match tracking.create() {
                Ok(cgroup) => Some((tracking, cgroup)),
                Err(err) => {
                    tracing::warn!(program = %program, error = %err, "cannot make the command a cgroup; it is tracked by its process group only");
                    None
                }
            }
        }
        None => None,
    };
    // With a cgroup, the trampoline joins it and then becomes the program (see [`CgroupTracking`]).
    let trampoline_args = cgroup.as_ref().and_then(|(tracking, cgroup)| {
        let procs = cgroup.procs_files().into_iter().next()?;
        let args: Vec<std::ffi::OsString> = vec![
            "sandbox".into(),
            "enter".into(),
            "--cgroup".into(),
            procs.into(),
            "--arg0".into(),
            program.clone().into(),
            "--".into(),
        ];
        Some((tracking.trampoline.clone(), args))
    });
    let command = |path: &Path| {
        let mut command = match &trampoline_args {
            Some((trampoline, args)) => {
                let mut command = Command::new(trampoline);
                command.args(args).arg(path);
                command
            }
            None => {
                let mut command = Command::new(path);
                command.arg0(&program);
                command
            }
        };
        command
            .args(&argv[1..])
            .env_clear()
            .envs(&env)
            .current_dir(&cwd)
            .process_group(0)
            .kill_on_drop(true)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };
    let spawned = match &resolved {
        // The trampoline's execvp hands a script without `#!` to /bin/sh itself.
        Some(path) if trampoline_args.is_some() => command(path).spawn(),
        Some(path) => match command(path).spawn() {
            // A script without `#!`: posix_spawn refuses it where execvp hands it to /bin/sh, so let execvp have it.
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::NOEXEC.raw_os_error()) => {
                command(Path::new(&program)).spawn()
            }
            spawned => spawned,
        },
        None => command(Path::new(&program)).spawn(),
    };
    let cgroup = cgroup.map(|(_, cgroup)| cgroup);
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            if let Some(cgroup) = cgroup {
                cgroup.kill_and_remove();
            }
            return Err(DriverError::Spawn {
                program: program.clone(),
                message: err.to_string(),
            });
        }
    };
    // `process_group(0)`: the child's pid is its process group id.
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    let cgroup_dir = cgroup
        .as_ref()
        .and_then(|cgroup| cgroup.dirs().next().map(Path::to_path_buf));
    let mut guard = GroupGuard { pgid, cgroup };
    tracing::debug!(program = %program, pid = ?pgid, cgroup = ?cgroup_dir, cwd = %cwd.display(), "command started");
    // Recorded before anything is read from the command: from here on a crash of berth leaves enough behind for the
    // next start to kill exactly this group and cgroup ([`kill_recorded`]), wherever the command runs.
    if let Some(leader) = child.id() {
        match identity_of(leader) {
            Ok(mut identity) => {
                identity.cgroup = cgroup_dir.as_ref().map(|dir| dir.display().to_string());
                // Bounded: a sink that cannot record (its database hung) must not hold the command's supervision.
                if tokio::time::timeout(RECORD_DEADLINE, sink.started(&identity))
                    .await
                    .is_err()
                {
                    tracing::warn!(program = %program, pgid = identity.pgid, "recording the command's process group took too long; going on without waiting");
                }
            }
            Err(err) => {
                tracing::warn!(program = %program, pid = leader, error = %err, "cannot record the command's process group; a crash of berth could leave it running")
            }
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let child_stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    // Bigger pipes: a chatty command then fills them without waiting on us, and each read returns more, so output
    // costs a fraction of the wake-ups and context switches of the default 64 KiB pipe.
    for pipe in [
        stdout.as_ref().map(AsFd::as_fd),
        stderr.as_ref().map(AsFd::as_fd),
    ]
    .into_iter()
    .flatten()
    {
        if let Err(err) = rustix::pipe::fcntl_setpipe_size(pipe, OUTPUT_PIPE_BYTES) {
            tracing::debug!(error = %err, "could not enlarge an output pipe");
        }
    }
    let mut io = pin!(async {
        tokio::join!(
            feed_stdin(child_stdin, stdin, stop_rx.clone()),
            pump(stdout, OutputStream::Stdout, sink, stop_rx.clone()),
            pump(stderr, OutputStream::Stderr, sink, stop_rx.clone()),
        )
    });
    let mut io_done = false;

    let waited = {
        let mut supervised = pin!(supervise(
            &mut child,
            pgid,
            guard.cgroup.as_ref(),
            timeout,
            cancel
        ));
        loop {
            tokio::select! {
                _ = &mut io, if !io_done => io_done = true,
                waited = &mut supervised => break waited,
            }
        }
    };
    // The direct child is gone; nothing else of its group (or cgroup) may stay, and any member still holding the
    // pipes would keep the drain below from ever seeing EOF.
    guard.finish().await;
    let (status, termination) = waited.map_err(|source| DriverError::Io {
        context: format!("waiting for `{program}`"),
        source,
    })?;

    if !io_done {
        let drained = tokio::time::timeout(DRAIN_DEADLINE, &mut io).await;
        if drained.is_err() {
            tracing::warn!(
                program = %program,
                "the command's output was still open {}s after it ended (a process left its group?); stopped reading",
                DRAIN_DEADLINE.as_secs()
            );
            // Readers stop at their next read; a chunk already being delivered is delivered.
            let _ = stop_tx.send(true);
            io.await;
        }
    }

    let outcome = ExecOutcome {
        exit_code: status.code(),
        signal: status.signal().map(signal_name),
        timed_out: termination == Some(Termination::TimedOut),
        cancelled: termination == Some(Termination::Cancelled),
        limit_exceeded: None,
    };
    tracing::debug!(program = %program, ?outcome, "command finished");
    Ok(outcome)
}

/// Where `execvp` would find `program` with `search` as PATH: the first executable regular file among the
/// directories, relative ones (and empty entries, meaning `.`) taken from `cwd`. `None` for a name with a slash, which
/// is not looked up, and for a name found nowhere.
pub(crate) fn find_in_path(program: &str, search: &str, cwd: &Path) -> Option<PathBuf> {
    if program.is_empty() || program.contains('/') {
        return None;
    }
    search.split(':').find_map(|dir| {
        let candidate = cwd
            .join(if dir.is_empty() { "." } else { dir })
            .join(program);
        let executable = std::fs::metadata(&candidate).is_ok_and(|meta| meta.is_file())
            && rustix::fs::access(&candidate, rustix::fs::Access::EXEC_OK).is_ok();
        executable.then_some(candidate)
    })
}

/// The command's working directory: the workspace, or `request.cwd` inside it. Absolute paths and `..` segments are
/// refused, so the run names a place inside its workspace.
pub fn command_cwd(workspace: &Path, request: &ExecRequest) -> Result<PathBuf, DriverError> {
    let Some(relative) = request.cwd.as_deref() else {
        return Ok(workspace.to_path_buf());
    };
    let relative_path = Path::new(relative);
    let clean = relative_path
        .components()
        .all(|component| matches!(component, Component::Normal(_) | Component::CurDir));
    if !clean {
        return Err(DriverError::Spawn {
            program: request.argv.first().cloned().unwrap_or_default(),
            message: format!(
                "the working directory `{relative}` must be a relative path inside the workspace, without `..`"
            ),
        });
    }
    Ok(workspace.join(relative_path))
}

/// Whether `program` (found at `resolved` in its PATH) is something exec could start: the checks a spawn makes, for
/// the trampoline path where the spawn is the trampoline's. Errors as the spawn would have.
fn runnable(program: &str, resolved: Option<&Path>, cwd: &Path) -> Result<(), DriverError> {
    let refused = |errno: rustix::io::Errno| DriverError::Spawn {
        program: program.to_owned(),
        message: io::Error::from_raw_os_error(errno.raw_os_error()).to_string(),
    };
    let path = match resolved {
        Some(path) => path.to_path_buf(),
        None if program.contains('/') => cwd.join(program),
        None => return Err(refused(rustix::io::Errno::NOENT)),
    };
    match std::fs::metadata(&path) {
        Err(_) => Err(refused(rustix::io::Errno::NOENT)),
        Ok(meta) if meta.is_dir() => Err(refused(rustix::io::Errno::ACCESS)),
        Ok(_) => rustix::fs::access(&path, rustix::fs::Access::EXEC_OK).map_err(refused),
    }
}

/// Waits for the direct child, ending its process group (and cgroup) on timeout or cancel.
async fn supervise(
    child: &mut Child,
    pgid: Option<Pid>,
    cgroup: Option<&RunCgroup>,
    timeout: Option<Duration>,
    cancel: CancelSignal,
) -> io::Result<(ExitStatus, Option<Termination>)> {
    let deadline = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    let termination = tokio::select! {
        status = child.wait() => return Ok((status?, None)),
        () = deadline => Termination::TimedOut,
        () = cancel => Termination::Cancelled,
    };
    tracing::debug!(pid = ?pgid, ?termination, "ending the command's process group");
    if let Some(pgid) = pgid {
        signal_group(pgid, Signal::TERM);
    }
    if let Some(cgroup) = cgroup {
        signal_cgroup(cgroup, Signal::TERM);
    }
    let status = match tokio::time::timeout(KILL_GRACE, child.wait()).await {
        Ok(status) => status?,
        Err(_elapsed) => {
            if let Some(pgid) = pgid {
                signal_group(pgid, Signal::KILL);
            }
            if let Some(cgroup) = cgroup {
                signal_cgroup(cgroup, Signal::KILL);
            }
            // The group kill reached the child unless it is already gone; make sure either way.
            let _ = child.start_kill();
            child.wait().await?
        }
    };
    Ok((status, Some(termination)))
}

/// Writes `input` to the command's stdin, then closes it. A command that exits without reading it all is not an
/// error (broken pipe): reading stdin is up to the command.
async fn feed_stdin(
    stdin: Option<ChildStdin>,
    input: Option<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) {
    let (Some(mut stdin), Some(input)) = (stdin, input) else {
        return;
    };
    tokio::select! {
        biased;
        _ = stop.wait_for(|stop| *stop) => {}
        written = stdin.write_all(&input) => {
            if let Err(err) = written {
                tracing::debug!(error = %err, "the command did not take all of its stdin");
            }
        }
    }
    drop(stdin);
}

/// Reads one output stream to EOF (or until told to stop), handing each chunk to the sink as it arrives.
async fn pump<R: AsyncRead + Unpin>(
    reader: Option<R>,
    stream: OutputStream,
    sink: &dyn OutputSink,
    mut stop: watch::Receiver<bool>,
) {
    let Some(mut reader) = reader else {
        return;
    };
    let mut buffer = vec![0_u8; CHUNK_SIZE];
    loop {
        let read = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            read = reader.read(&mut buffer) => read,
        };
        match read {
            Ok(0) => return,
            Ok(n) => sink.output(stream, &buffer[..n]).await,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::warn!(stream = stream.as_str(), error = %err, "reading the command's output failed");
                return;
            }
        }
    }
}

/// Signals every process in the group. ESRCH (the group is already empty) is the normal case at the end of a run.
fn signal_group(pgid: Pid, signal: Signal) {
    if let Err(err) = rustix::process::kill_process_group(pgid, signal)
        && err != rustix::io::Errno::SRCH
    {
        tracing::warn!(pgid = pgid.as_raw_nonzero().get(), error = %err, "cannot signal the command's process group");
    }
}

/// Signals every process in the command's cgroup, once: the end of the run kills what is left and removes it
/// ([`RunCgroup::kill_and_remove`]). berth is never in a command's cgroup, and is skipped all the same.
fn signal_cgroup(cgroup: &RunCgroup, signal: Signal) {
    let own_pid = std::process::id();
    for procs in cgroup.procs_files() {
        let Ok(text) = std::fs::read_to_string(&procs) else {
            continue;
        };
        for pid in text
            .lines()
            .filter_map(|line| line.trim().parse::<u32>().ok())
        {
            if pid == own_pid {
                continue;
            }
            if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }
}

/// SIGKILLs every process whose working directory is `dir` or lies below it, and returns how many.
///
/// A workspace outlives the berth process that started commands in it when that process crashes; the orphan sweep
/// then removes the workspace, and the commands still running there must go too. Nothing else records them after a
/// crash, but the kernel still knows their working directory. Processes whose `cwd` cannot be read (another
/// user's, or already gone) are skipped, and berth never kills itself.
pub fn kill_processes_in(dir: &Path) -> usize {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let own_pid = std::process::id();
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(raw_pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(raw_pid).is_ok_and(|pid| pid == own_pid) {
            continue;
        }
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        if cwd.starts_with(&dir)
            && let Some(pid) = Pid::from_raw(raw_pid)
            && rustix::process::kill_process(pid, Signal::KILL).is_ok()
        {
            killed += 1;
        }
    }
    if killed > 0 {
        tracing::info!(dir = %dir.display(), killed, "killed processes left in a workspace");
    }
    killed
}

/// Where the kernel says which boot this is: a random id, new at every boot.
const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// Where cgroups are mounted; a recorded cgroup anywhere else is refused.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long [`kill_recorded`] waits for a recorded cgroup's killed members to leave it, so it can be removed.
const CGROUP_REMOVAL_WAIT: Duration = Duration::from_secs(5);

/// How many times [`kill_recorded`] looks again for members forked while it was killing: each pass kills every member
/// it sees, so only a process forked during a pass survives it, and its forker is dead by the next one.
const KILL_PASSES: usize = 64;

/// What `/proc/<pid>/stat` tells about a process that identity checks need (see proc(5)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, ...; `Z` and `X`: dead already, nothing to kill.
    pub state: char,
    /// Field 5: the process group.
    pub pgrp: u32,
    /// Field 6: the session.
    pub session: u32,
    /// Field 22: when the process started, in clock ticks since boot.
    pub start_ticks: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself hold spaces and
/// parentheses, so the fields are counted from the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // `fields[0]` is field 3 of proc(5): field n is `fields[n - 3]`.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// `/proc/<pid>/stat`, parsed. `Ok(None)`: there is no such process (any more).
fn read_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_proc_stat(&text).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat is not in the expected format"),
            )
        }),
        // ESRCH: the process went away while the file was being read.
        Err(err)
            if err.kind() == io::ErrorKind::NotFound
                || err.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) =>
        {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string(BOOT_ID_FILE)?.trim().to_owned())
}

/// The identity of the process group that `leader` (a command just spawned with `process_group(0)`) leads.
pub fn identity_of(leader: u32) -> io::Result<ProcessIdentity> {
    let Some(stat) = read_stat(leader)? else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {leader} is gone"),
        ));
    };
    if stat.pgrp != leader {
        return Err(io::Error::other(format!(
            "process {leader} does not lead its process group (group {})",
            stat.pgrp
        )));
    }
    Ok(ProcessIdentity {
        pgid: leader,
        session_id: stat.session,
        start_ticks: stat.start_ticks,
        boot_id: boot_id()?,
        cgroup: None,
    })
}

/// SIGKILLs exactly the processes of the recorded command, wherever on this host they run, and returns how many.
///
/// What a crashed berth left behind is found by identity, not by place: nothing is killed for running in a directory
/// (a user's own shells in an in-place workspace are no business of berth's). The rules:
///
/// - a different boot id: the host rebooted since (or the record is another host's), so nothing recorded can run;
/// - a live process with the group's number but another start time: the number was handed out again, which the
///   kernel only does once no process of the recorded group is left, so there is nothing to kill;
/// - otherwise every process in group `pgid` of session `session_id` that started no earlier than the leader — the
///   leader itself, or what it left behind when it died — is killed, each checked through a pidfd so that a pid
///   recycled between the check and the signal is never hit;
/// - and every process of the recorded cgroup, if there is one.
///
/// berth itself is never killed. Errors when `/proc` cannot be read: the caller cannot know what still runs.
pub fn kill_recorded(identity: &ProcessIdentity) -> io::Result<usize> {
    let booted = boot_id()?;
    if booted != identity.boot_id {
        tracing::debug!(
            pgid = identity.pgid,
            "the recorded command ran before the last boot (or elsewhere); nothing to kill"
        );
        return Ok(0);
    }
    let mut killed = 0;
    if let Some(cgroup) = &identity.cgroup {
        killed += kill_cgroup(Path::new(cgroup))?;
    }
    // Group 0 and 1 are not commands' groups; a record naming them was not written by berth.
    if identity.pgid > 1 {
        killed += kill_group_members(identity)?;
    }
    if killed > 0 {
        tracing::info!(
            pgid = identity.pgid,
            killed,
            "killed processes a crashed run left behind"
        );
    }
    Ok(killed)
}

/// The process-group half of [`kill_recorded`].
fn kill_group_members(identity: &ProcessIdentity) -> io::Result<usize> {
    if let Some(leader) = read_stat(identity.pgid)?
        && leader.start_ticks != identity.start_ticks
    {
        tracing::debug!(
            pgid = identity.pgid,
            "the recorded group's number belongs to a later process; nothing to kill"
        );
        return Ok(0);
    }
    let own_pid = std::process::id();
    let belongs = |stat: &ProcStat| {
        stat.pgrp == identity.pgid
            && stat.session == identity.session_id
            && stat.start_ticks >= identity.start_ticks
            && !matches!(stat.state, 'Z' | 'X')
    };
    let mut signalled = std::collections::HashSet::new();
    for _ in 0..KILL_PASSES {
        let mut found_new = false;
        for pid in all_pids()? {
            if pid == own_pid || signalled.contains(&pid) {
                continue;
            }
            let Some(stat) = read_stat(pid)? else {
                continue;
            };
            if belongs(&stat)
                && kill_checked(pid, |pid| Ok(read_stat(pid)?.is_some_and(|s| belongs(&s))))?
            {
                signalled.insert(pid);
                found_new = true;
            }
        }
        if !found_new {
            break;
        }
    }
    Ok(signalled.len())
}

/// The cgroup half of [`kill_recorded`]: every process in `cgroup` (a directory under [`CGROUP_ROOT`]), then the
/// cgroup itself if it is empty.
fn kill_cgroup(cgroup: &Path) -> io::Result<usize> {
    let plain = cgroup
        .components()
        .all(|component| matches!(component, Component::RootDir | Component::Normal(_)));
    if !plain || !cgroup.starts_with(CGROUP_ROOT) || cgroup == Path::new(CGROUP_ROOT) {
        tracing::warn!(cgroup = %cgroup.display(), "refusing a recorded cgroup outside the cgroup mount");
        return Ok(0);
    }
    let procs = cgroup.join("cgroup.procs");
    let members = |path: &Path| -> io::Result<Vec<u32>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(text
                .lines()
                .filter_map(|line| line.trim().parse().ok())
                .collect()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(err) => Err(err),
        }
    };
    let own_pid = std::process::id();
    let mut signalled = std::collections::HashSet::new();
    for _ in 0..KILL_PASSES {
        let mut found_new = false;
        for pid in members(&procs)? {
            if pid == own_pid || signalled.contains(&pid) {
                continue;
            }
            if kill_checked(pid, |pid| Ok(members(&procs)?.contains(&pid)))? {
                signalled.insert(pid);
                found_new = true;
            }
        }
        if !found_new {
            break;
        }
    }
    // Only an empty cgroup can be removed, and killed members take a moment to leave it: retried for a while, so
    // that a crash leaves no cgroup behind. One that stays busy (a member stuck in the kernel) is left and logged.
    let deadline = std::time::Instant::now() + CGROUP_REMOVAL_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => break,
            Err(err) if err.kind() == io::ErrorKind::NotFound => break,
            Err(err)
                if err.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                    && std::time::Instant::now() < deadline
                    && !members(&procs)?.contains(&own_pid) =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(err) => {
                tracing::warn!(cgroup = %cgroup.display(), error = %err, "the recorded cgroup was not removed");
                break;
            }
        }
    }
    Ok(signalled.len())
}

/// SIGKILLs `pid` if `still_matches(pid)` holds once a pidfd pins it: a process that exits and whose pid is handed
/// out again between the check and the signal is then never hit, since the pidfd names the process checked. Returns
/// whether it was signalled. Kernels without pidfds (before 5.3) get a plain kill right after the check.
fn kill_checked(pid: u32, still_matches: impl Fn(u32) -> io::Result<bool>) -> io::Result<bool> {
    let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Ok(false);
    };
    match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
        Ok(pidfd) => {
            if !still_matches(pid)? {
                return Ok(false);
            }
            Ok(rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).is_ok())
        }
        Err(rustix::io::Errno::SRCH) => Ok(false),
        Err(rustix::io::Errno::NOSYS) => {
            Ok(still_matches(pid)? && rustix::process::kill_process(raw, Signal::KILL).is_ok())
        }
        Err(err) => Err(err.into()),
    }
}

/// Every pid in `/proc`.
fn all_pids() -> io::Result<Vec<u32>> {
    Ok(std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok())
        })
        .collect())
}

/// The conventional name of a signal number: `SIGKILL`; `SIG<n>` for those without one here.
pub fn signal_name(number: i32) -> String {
    const NAMES: [(Signal, &str); 22] = [
        (Signal::HUP, "SIGHUP"),
        (Signal::INT, "SIGINT"),
        (Signal::QUIT, "SIGQUIT"),
        (Signal::ILL, "SIGILL"),
        (Signal::TRAP, "SIGTRAP"),
        (Signal::ABORT, "SIGABRT"),
        (Signal::BUS, "SIGBUS"),
        (Signal::FPE, "SIGFPE"),
        (Signal::KILL, "SIGKILL"),
        (Signal::USR1, "SIGUSR1"),
        (Signal::SEGV, "SIGSEGV"),
        (Signal::USR2, "SIGUSR2"),
        (Signal::PIPE, "SIGPIPE"),
        (Signal::ALARM, "SIGALRM"),
        (Signal::TERM, "SIGTERM"),
        (Signal::CHILD, "SIGCHLD"),
        (Signal::CONT, "SIGCONT"),
        (Signal::STOP, "SIGSTOP"),
        (Signal::TSTP, "SIGTSTP"),
        (Signal::XCPU, "SIGXCPU"),
        (Signal::XFSZ, "SIGXFSZ"),
        (Signal::SYS, "SIGSYS"),
    ];
    NAMES
        .iter()
        .find(|(signal, _)| signal.as_raw() == number)
        .map_or_else(|| format!("SIG{number}"), |(_, name)| (*name).to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use berth_core::driver::BoxFuture;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::test_support::{Recorder, never};

    /// Counts and hashes stdout without keeping it.
    #[derive(Debug, Default)]
    struct Hasher {
        state: Mutex<(u64, Sha256, usize)>,
    }

    impl OutputSink for Hasher {
        fn output<'a>(&'a self, _stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                let mut state = self.state.lock().unwrap();
                state.0 += data.len() as u64;
                state.1.update(data);
                state.2 = state.2.max(data.len());
            })
        }
    }

    fn command(cwd: &std::path::Path, argv: &[&str]) -> ProcessSpec {
        ProcessSpec {
            argv: argv.iter().map(|arg| (*arg).to_owned()).collect(),
            env: BTreeMap::new(),
            cwd: cwd.to_path_buf(),
            stdin: None,
            timeout: None,
        }
    }

    fn sh(cwd: &std::path::Path, script: &str) -> ProcessSpec {
        command(cwd, &["/bin/sh", "-c", script])
    }

    /// Whether a process dies within a second: no `/proc` entry, or a zombie nobody has reaped yet (dead all the
    /// same; in a container, pid 1 may not reap orphans). SIGKILL is delivered at once but takes a moment to finish.
    fn is_dead(pid: u32) -> bool {
        let dead_now = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => {
                let after_name = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
                after_name.is_some_and(|rest| rest.starts_with('Z') || rest.starts_with('X'))
            }
        };
        for _ in 0..100 {
            if dead_now() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[tokio::test]
    async fn output_streams_in_order_as_it_arrives() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let started = Instant::now();
        let outcome = run_process(
            sh(
                temp.path(),
                "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; sleep 0.2",
            ),
            &sink,
            never(),
        )
        .await
        .unwrap();
        let finished = Instant::now();
        assert_eq!(
            outcome,
            ExecOutcome {
                exit_code: Some(0),
                ..ExecOutcome::default()
            }
        );

        let chunks = sink.chunks.lock().unwrap();
        let seen: Vec<(OutputStream, &[u8])> = chunks
            .iter()
            .map(|(stream, data, _)| (*stream, data.as_slice()))
            .collect();
        assert_eq!(
            seen,
            [
                (OutputStream::Stdout, &b"one\n"[..]),
                (OutputStream::Stderr, &b"two\n"[..]),
                (OutputStream::Stdout, &b"three\n"[..]),
            ]
        );
        // Streamed, not collected at the end: the first chunk came well before the command finished.
        assert!(finished.duration_since(chunks[0].2) >= Duration::from_millis(400));
        assert!(chunks[0].2.duration_since(started) < Duration::from_millis(400));
    }

    #[tokio::test]
    async fn stdin_is_fed_then_closed() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let mut spec = command(temp.path(), &["cat"]);
        spec.stdin = Some(b"hello\nworld\n".to_vec());
        let outcome = run_process(spec, &sink, never()).await.unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(sink.text(OutputStream::Stdout), "hello\nworld\n");

        // No stdin: the command reads EOF at once instead of hanging.
        let sink = Recorder::default();
        let mut spec = spec_with_timeout(temp.path(), &["cat"], Duration::from_secs(10));
        spec.stdin = None;
        let outcome = run_process(spec, &sink, never()).await.unwrap();
        assert!(!outcome.timed_out);
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(sink.text(OutputStream::Stdout), "");
    }

    fn spec_with_timeout(cwd: &std::path::Path, argv: &[&str], timeout: Duration) -> ProcessSpec {
        let mut spec = command(cwd, argv);
        spec.timeout = Some(timeout);
        spec
    }

    #[tokio::test]
    async fn large_stdin_that_is_never_read_does_not_hang() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let mut spec = sh(temp.path(), "echo ignored-stdin");
        spec.stdin = Some(vec![b'x'; 4 * 1024 * 1024]);
        spec.timeout = Some(Duration::from_secs(20));
        let outcome = run_process(spec, &sink, never()).await.unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        assert!(!outcome.timed_out);
        assert_eq!(sink.text(OutputStream::Stdout), "ignored-stdin\n");
    }

    #[tokio::test]
    async fn env_is_exactly_what_was_given_plus_defaults() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let mut spec = command(temp.path(), &["/usr/bin/env"]);
        spec.env.insert("ALPHA".to_owned(), "1".to_owned());
        spec.env.insert("BETA".to_owned(), "two words".to_owned());
        run_process(spec, &sink, never()).await.unwrap();
        let mut lines: Vec<String> = sink
            .text(OutputStream::Stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "ALPHA=1".to_owned(),
                "BETA=two words".to_owned(),
                format!("HOME={}", temp.path().display()),
                format!("PATH={DEFAULT_PATH}"),
            ]
        );

        // Given PATH and HOME win over the defaults.
        let sink = Recorder::default();
        let mut spec = command(temp.path(), &["/usr/bin/env"]);
        spec.env.insert("PATH".to_owned(), "/bin".to_owned());
        spec.env.insert("HOME".to_owned(), "/nowhere".to_owned());
        run_process(spec, &sink, never()).await.unwrap();
        let mut lines: Vec<String> = sink
            .text(OutputStream::Stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(lines, ["HOME=/nowhere", "PATH=/bin"]);
    }

    #[tokio::test]
    async fn runs_in_the_given_directory_without_a_shell() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        // A shell would expand these; argv passes them through as they are.
        run_process(
            command(temp.path(), &["echo", "$HOME", "*", "a;b"]),
            &sink,
            never(),
        )
        .await
        .unwrap();
        assert_eq!(sink.text(OutputStream::Stdout), "$HOME * a;b\n");

        let sink = Recorder::default();
        run_process(command(temp.path(), &["pwd"]), &sink, never())
            .await
            .unwrap();
        assert_eq!(
            sink.text(OutputStream::Stdout).trim_end(),
            temp.path().canonicalize().unwrap().display().to_string()
        );
    }

    #[tokio::test]
    async fn non_zero_exit_codes_are_reported() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let outcome = run_process(sh(temp.path(), "echo oops >&2; exit 3"), &sink, never())
            .await
            .unwrap();
        assert_eq!(
            outcome,
            ExecOutcome {
                exit_code: Some(3),
                ..ExecOutcome::default()
            }
        );
        assert_eq!(sink.text(OutputStream::Stderr), "oops\n");
    }

    #[tokio::test]
    async fn signals_are_reported_by_name() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let outcome = run_process(sh(temp.path(), "kill -KILL $$"), &sink, never())
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, None);
        assert_eq!(outcome.signal.as_deref(), Some("SIGKILL"));
        assert!(!outcome.timed_out && !outcome.cancelled);

        let outcome = run_process(sh(temp.path(), "kill -SEGV $$"), &sink, never())
            .await
            .unwrap();
        assert_eq!(outcome.signal.as_deref(), Some("SIGSEGV"));

        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(200), "SIG200");
    }

    #[tokio::test]
    async fn missing_programs_and_directories_fail_to_spawn() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let err = run_process(
            command(temp.path(), &["no-such-program-berth"]),
            &sink,
            never(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), "spawn_failed");
        assert!(err.to_string().contains("no-such-program-berth"), "{err}");

        let missing = temp.path().join("missing");
        let err = run_process(command(&missing, &["true"]), &sink, never())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "spawn_failed");
        assert!(err.to_string().contains("working directory"), "{err}");

        let err = run_process(command(temp.path(), &[]), &sink, never())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "spawn_failed");
    }

    fn write_program(path: &std::path::Path, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn programs_are_found_as_execvp_finds_them() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        for dir in ["first", "second", "cwd/rel", "cwd"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        write_program(&root.join("first/tool"), "", 0o644); // not executable: skipped
        std::fs::create_dir(root.join("first/dir-tool")).unwrap(); // a directory: skipped
        write_program(&root.join("second/tool"), "", 0o755);
        write_program(&root.join("second/dir-tool"), "", 0o755);
        write_program(&root.join("cwd/rel/local"), "", 0o755);
        write_program(&root.join("cwd/here"), "", 0o755);
        let search = format!("{0}/first:{0}/second", root.display());
        let cwd = root.join("cwd");
        assert_eq!(
            find_in_path("tool", &search, &cwd),
            Some(root.join("second/tool"))
        );
        assert_eq!(
            find_in_path("dir-tool", &search, &cwd),
            Some(root.join("second/dir-tool"))
        );
        assert_eq!(find_in_path("missing", &search, &cwd), None);
        // Relative entries, and an empty one, are taken from the command's working directory.
        assert_eq!(
            find_in_path("local", "rel", &cwd),
            Some(cwd.join("rel/local"))
        );
        assert_eq!(
            find_in_path("here", "/nowhere::", &cwd),
            Some(cwd.join("./here"))
        );
        // A name with a slash is a path, never looked up.
        assert_eq!(find_in_path("rel/local", &search, &cwd), None);
        assert_eq!(find_in_path("", &search, &cwd), None);
    }

    #[tokio::test]
    async fn found_programs_keep_their_name_and_scripts_without_a_shebang_still_run() {
        let temp = tempfile::tempdir().unwrap();
        let bin = temp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        write_program(&bin.join("shebang-less"), "echo \"ran as $0\"\n", 0o755);
        let mut spec = command(temp.path(), &["shebang-less"]);
        spec.env.insert(
            "PATH".to_owned(),
            format!("{}:/usr/bin:/bin", bin.display()),
        );
        let sink = Recorder::default();
        let outcome = run_process(spec, &sink, never()).await.unwrap();
        assert_eq!(
            outcome.exit_code,
            Some(0),
            "{}",
            sink.text(OutputStream::Stderr)
        );
        assert!(
            sink.text(OutputStream::Stdout).starts_with("ran as "),
            "{}",
            sink.text(OutputStream::Stdout)
        );

        // argv[0] is the name the run gave, not the path it was found at.
        let sink = Recorder::default();
        let mut spec = command(temp.path(), &["sh", "-c", "echo $0"]);
        spec.env
            .insert("PATH".to_owned(), "/usr/bin:/bin".to_owned());
        run_process(spec, &sink, never()).await.unwrap();
        assert_eq!(sink.text(OutputStream::Stdout), "sh\n");
    }

    #[tokio::test]
    async fn timeouts_kill_the_whole_group_and_keep_partial_output() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let started = Instant::now();
        let outcome = run_process(
            spec_with_timeout(
                temp.path(),
                &["/bin/sh", "-c", "sleep 1000 & echo $!; echo started; wait"],
                Duration::from_millis(500),
            ),
            &sink,
            never(),
        )
        .await
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(outcome.timed_out && !outcome.cancelled, "{outcome:?}");
        assert_eq!(outcome.exit_code, None);
        assert_eq!(outcome.signal.as_deref(), Some("SIGTERM"));
        let text = sink.text(OutputStream::Stdout);
        let mut lines = text.lines();
        let sleeper: u32 = lines.next().unwrap().parse().unwrap();
        assert_eq!(lines.next(), Some("started"));
        assert!(
            is_dead(sleeper),
            "the background sleep {sleeper} survived the timeout"
        );
    }

    #[tokio::test]
    async fn commands_that_ignore_sigterm_are_killed_after_the_grace() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let started = Instant::now();
        let outcome = run_process(
            spec_with_timeout(
                temp.path(),
                &[
                    "/bin/sh",
                    "-c",
                    "trap '' TERM; echo armed; while :; do sleep 0.05; done",
                ],
                Duration::from_millis(300),
            ),
            &sink,
            never(),
        )
        .await
        .unwrap();
        let elapsed = started.elapsed();
        assert!(outcome.timed_out);
        assert_eq!(outcome.signal.as_deref(), Some("SIGKILL"));
        assert!(elapsed >= KILL_GRACE, "{elapsed:?}");
        assert!(elapsed < KILL_GRACE + Duration::from_secs(3), "{elapsed:?}");
        assert_eq!(sink.text(OutputStream::Stdout), "armed\n");
    }

    #[tokio::test]
    async fn background_processes_do_not_outlive_the_run_or_hold_its_pipes() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let started = Instant::now();
        let outcome = run_process(sh(temp.path(), "(sleep 1000) & echo hi"), &sink, never())
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            outcome,
            ExecOutcome {
                exit_code: Some(0),
                ..ExecOutcome::default()
            }
        );
        assert_eq!(sink.text(OutputStream::Stdout), "hi\n");

        let sink = Recorder::default();
        run_process(
            sh(temp.path(), "sleep 1000 >/dev/null 2>&1 & echo $!"),
            &sink,
            never(),
        )
        .await
        .unwrap();
        let sleeper: u32 = sink.text(OutputStream::Stdout).trim().parse().unwrap();
        assert!(
            is_dead(sleeper),
            "the background sleep {sleeper} outlived the run"
        );
    }

    #[tokio::test]
    async fn processes_that_leave_the_group_stop_being_read_after_the_deadline() {
        if !std::path::Path::new("/usr/bin/setsid").exists() {
            return;
        }
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let started = Instant::now();
        let outcome = run_process(
            sh(
                temp.path(),
                "setsid sh -c 'echo $$; sleep 1000' & sleep 0.2; echo parent-done",
            ),
            &sink,
            never(),
        )
        .await
        .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(outcome.exit_code, Some(0));
        assert!(elapsed >= DRAIN_DEADLINE, "{elapsed:?}");
        assert!(
            elapsed < DRAIN_DEADLINE + Duration::from_secs(2),
            "{elapsed:?}"
        );
        let text = sink.text(OutputStream::Stdout);
        assert!(text.contains("parent-done"), "{text}");
        // Clean up the escapee ourselves: it leads its own group, outside anything berth controls.
        for pid in text.lines().filter_map(|line| line.parse::<i32>().ok()) {
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            }
        }
    }

    #[tokio::test]
    async fn cancel_kills_the_command_and_keeps_its_output() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let cancel: CancelSignal = Box::pin(async move {
            // Only an explicit send cancels; a dropped sender means "never".
            if rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = tx.send(());
        });
        let started = Instant::now();
        let outcome = run_process(sh(temp.path(), "echo started; sleep 1000"), &sink, cancel)
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(outcome.cancelled && !outcome.timed_out, "{outcome:?}");
        assert_eq!(sink.text(OutputStream::Stdout), "started\n");
    }

    /// A run abandoned midway (its future dropped, e.g. the server shutting down) still takes its tree with it.
    #[tokio::test]
    async fn dropping_a_run_kills_its_process_group() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Recorder::default();
        let abandoned = tokio::time::timeout(
            Duration::from_millis(500),
            run_process(
                sh(temp.path(), "sleep 1000 & echo $!; wait"),
                &sink,
                never(),
            ),
        )
        .await;
        assert!(abandoned.is_err(), "the run should still have been going");
        let sleeper: u32 = sink.text(OutputStream::Stdout).trim().parse().unwrap();
        assert!(
            is_dead(sleeper),
            "the background sleep {sleeper} outlived the dropped run"
        );
    }

    #[tokio::test]
    async fn ten_megabytes_arrive_intact() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("big.bin");
        let mut data = Vec::with_capacity(10_000_000);
        let mut x: u32 = 0x1234_5678;
        while data.len() < 10_000_000 {
            // xorshift: cheap bytes that are not one repeated pattern.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(10_000_000);
        std::fs::write(&path, &data).unwrap();

        let sink = Hasher::default();
        let outcome = run_process(command(temp.path(), &["cat", "big.bin"]), &sink, never())
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        let state = sink.state.lock().unwrap();
        assert_eq!(state.0, 10_000_000);
        assert!(state.2 <= CHUNK_SIZE);
        assert_eq!(state.1.clone().finalize(), Sha256::digest(&data));
    }

    /// A slow sink slows the command rather than letting output pile up; nothing is lost.
    #[tokio::test]
    async fn a_slow_sink_applies_backpressure() {
        #[derive(Debug, Default)]
        struct Slow(Mutex<u64>);

        impl OutputSink for Slow {
            fn output<'a>(&'a self, _stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    *self.0.lock().unwrap() += data.len() as u64;
                })
            }
        }

        let temp = tempfile::tempdir().unwrap();
        let sink = Slow::default();
        let outcome = run_process(sh(temp.path(), "head -c 2000000 /dev/zero"), &sink, never())
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(*sink.0.lock().unwrap(), 2_000_000);
    }
}

#[cfg(test)]
mod kill_in_dir_tests {
    use std::os::unix::process::ExitStatusExt;

    use super::kill_processes_in;

    #[test]
    fn processes_working_in_a_directory_are_killed_and_others_are_not() {
        let inside = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(inside.path().join("deeper")).unwrap();
        let mut doomed = std::process::Command::new("sleep")
            .arg("100")
            .current_dir(inside.path().join("deeper"))
            .spawn()
            .unwrap();
        let mut spared = std::process::Command::new("sleep")
            .arg("100")
            .current_dir(outside.path())
            .spawn()
            .unwrap();
        assert_eq!(kill_processes_in(inside.path()), 1);
        assert_eq!(doomed.wait().unwrap().signal(), Some(9));
        assert!(
            spared.try_wait().unwrap().is_none(),
            "a process elsewhere was killed"
        );
        spared.kill().unwrap();
        spared.wait().unwrap();
    }
}

#[cfg(test)]
mod identity_tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command, Stdio};
    use std::sync::Mutex;
    use std::time::Duration;

    use berth_core::driver::{BoxFuture, OutputSink, OutputStream, ProcessIdentity};

    use super::{ProcStat, boot_id, identity_of, kill_recorded, parse_proc_stat, read_stat};
    use crate::test_support::never;

    /// Whether `pid` is gone or a zombie within a second (a container's pid 1 may never reap orphans).
    fn is_dead(pid: u32) -> bool {
        for _ in 0..100 {
            match read_stat(pid).unwrap() {
                None => return true,
                Some(stat) if matches!(stat.state, 'Z' | 'X') => return true,
                Some(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    }

    /// `sh -c script` leading its own process group, with the first line it prints (a pid it reports).
    fn group_reporting_a_pid(script: &str) -> (Child, u32) {
        let mut child = Command::new("/bin/sh")
            .args(["-c", script])
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        (child, line.trim().parse().unwrap())
    }

    fn kill_pid(pid: u32) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let text = "4242 (we(ird) name) S 1 4240 4239 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_proc_stat(text),
            Some(ProcStat {
                state: 'S',
                pgrp: 4240,
                session: 4239,
                start_ticks: 987_654,
            })
        );
        assert_eq!(parse_proc_stat("4242 (truncated) S 1"), None);
        assert_eq!(parse_proc_stat("no parenthesis"), None);
    }

    #[test]
    fn a_live_group_is_killed_whole() {
        let (mut child, background) = group_reporting_a_pid("sleep 1000 & echo $!; wait");
        let identity = identity_of(child.id()).unwrap();
        assert_eq!(identity.pgid, child.id());
        assert_eq!(identity.boot_id, boot_id().unwrap());
        // Read from /proc rather than getsid(2): under a container whose session leader lives outside
        // the pid namespace, the session reads as 0, which rustix's `getsid` cannot represent.
        let own_session = read_stat(std::process::id()).unwrap().unwrap().session;
        assert_eq!(identity.session_id, own_session);
        assert_eq!(kill_recorded(&identity).unwrap(), 2);
        assert_eq!(child.wait().unwrap().signal(), Some(9));
        assert!(is_dead(background), "the background sleep survived");
        // Nothing of the group is left: a second pass finds nothing.
        assert_eq!(kill_recorded(&identity).unwrap(), 0);
    }

    #[test]
    fn what_a_dead_leader_left_in_its_group_is_killed() {
        let (mut child, background) = group_reporting_a_pid("sleep 1000 & echo $!");
        let identity = identity_of(child.id()).unwrap();
        // The leader exits (and is reaped): only its background sleep still carries the group.
        assert!(child.wait().unwrap().success());
        assert_eq!(read_stat(child.id()).unwrap(), None);
        assert_eq!(kill_recorded(&identity).unwrap(), 1);
        assert!(is_dead(background), "the orphaned member survived");
    }

    #[test]
    fn a_group_that_does_not_match_the_record_is_left_alone() {
        let (mut child, background) = group_reporting_a_pid("sleep 1000 & echo $!; wait");
        let real = identity_of(child.id()).unwrap();
        let impostors = [
            // The number was reused by a later leader.
            ProcessIdentity {
                start_ticks: real.start_ticks + 1,
                ..real.clone()
            },
            ProcessIdentity {
                start_ticks: real.start_ticks.saturating_sub(1),
                ..real.clone()
            },
            // Recorded before a reboot.
            ProcessIdentity {
                boot_id: "00000000-0000-0000-0000-000000000000".to_owned(),
                ..real.clone()
            },
            // Another session's group with this number.
            ProcessIdentity {
                session_id: real.session_id + 1,
                ..real.clone()
            },
            // Groups that are no command's.
            ProcessIdentity {
                pgid: 1,
                ..real.clone()
            },
            ProcessIdentity {
                pgid: 0,
                ..real.clone()
            },
        ];
        for impostor in &impostors {
            assert_eq!(kill_recorded(impostor).unwrap(), 0, "{impostor:?}");
        }
        assert!(child.try_wait().unwrap().is_none(), "the leader was killed");
        assert!(
            read_stat(background)
                .unwrap()
                .is_some_and(|stat| stat.state != 'Z')
        );

        // With the leader gone, members older than the recorded start time are not the recorded group's.
        kill_pid(child.id());
        child.wait().unwrap();
        let later = ProcessIdentity {
            start_ticks: real.start_ticks + 1_000_000,
            ..real.clone()
        };
        assert_eq!(kill_recorded(&later).unwrap(), 0);
        assert!(
            !is_dead(background),
            "a member older than the record was killed"
        );
        assert_eq!(kill_recorded(&real).unwrap(), 1);
        assert!(is_dead(background));
    }

    #[test]
    fn a_recorded_cgroup_is_emptied_and_removed() {
        let pids = std::path::Path::new("/sys/fs/cgroup/pids");
        let cgroup = pids.join(format!("berth-test-{}", uuid_like()));
        if std::fs::create_dir(&cgroup).is_err() {
            eprintln!(
                "no writable cgroup v1 pids hierarchy here; the cgroup path is not exercised"
            );
            return;
        }
        let mut sleeper = Command::new("sleep").arg("1000").spawn().unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
        // This process joins too, standing in for berth: it must come out alive, and goes back where it was.
        let home = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap()
            .lines()
            .find_map(|line| line.split_once(":pids:").map(|(_, path)| path.to_owned()))
            .unwrap();
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        let identity = ProcessIdentity {
            pgid: 0,
            session_id: 0,
            start_ticks: 0,
            boot_id: boot_id().unwrap(),
            cgroup: Some(cgroup.display().to_string()),
        };
        assert_eq!(kill_recorded(&identity).unwrap(), 1);
        assert_eq!(sleeper.wait().unwrap().signal(), Some(9));
        std::fs::write(
            pids.join(home.trim_start_matches('/')).join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .unwrap();
        for _ in 0..100 {
            if !cgroup.exists() {
                break;
            }
            let _ = std::fs::remove_dir(&cgroup);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!cgroup.exists());
        // A path outside the cgroup mount is refused.
        let outside = ProcessIdentity {
            cgroup: Some("/sys/fs/cgroup/../../tmp".to_owned()),
            ..identity
        };
        assert_eq!(kill_recorded(&outside).unwrap(), 0);
    }

    fn uuid_like() -> String {
        format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )
    }

    /// Keeps the identity the command reported and its stdout.
    #[derive(Debug, Default)]
    struct Started {
        identity: Mutex<Option<ProcessIdentity>>,
        stdout: Mutex<Vec<u8>>,
    }

    impl OutputSink for Started {
        fn output<'a>(&'a self, _stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
            Box::pin(async move { self.stdout.lock().unwrap().extend_from_slice(data) })
        }

        fn started<'a>(&'a self, process: &'a ProcessIdentity) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                let mut slot = self.identity.lock().unwrap();
                assert!(slot.is_none(), "started twice");
                *slot = Some(process.clone());
            })
        }
    }

    #[tokio::test]
    async fn commands_report_their_group_before_they_are_read() {
        let temp = tempfile::tempdir().unwrap();
        let sink = Started::default();
        let spec = super::ProcessSpec {
            argv: vec!["/bin/sh".to_owned(), "-c".to_owned(), "echo $$".to_owned()],
            env: std::collections::BTreeMap::new(),
            cwd: temp.path().to_path_buf(),
            stdin: None,
            timeout: None,
        };
        let outcome = super::run_process(spec, &sink, never()).await.unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        let shell: u32 = String::from_utf8(sink.stdout.lock().unwrap().clone())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let identity = sink.identity.lock().unwrap().clone().unwrap();
        assert_eq!(identity.pgid, shell);
        assert_eq!(identity.boot_id, boot_id().unwrap());
        assert!(identity.start_ticks > 0);
        assert_eq!(identity.cgroup, None);
    }
}

#[cfg(test)]
mod cgroup_tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use berth_core::driver::{BoxFuture, OutputSink, OutputStream, ProcessIdentity};
    use berth_isolation::cgroup::{Hierarchy, Layout, Version};

    use super::{
        CgroupTracking, ProcessSpec, kill_recorded, read_stat, run_process, run_process_tracked,
    };
    use crate::test_support::never;

    /// Stands in for `berth sandbox enter` (berth's binary is not built for unit tests): the same argv, the same
    /// steps — join the cgroup, then exec the program. The integration tests run the real one.
    const TRAMPOLINE: &str = "#!/bin/sh\n[ \"$1 $2 $3 $5 $7\" = 'sandbox enter --cgroup --arg0 --' ] || exit 125\necho 0 > \"$4\" || exit 126\nshift 7\nexec \"$@\"\n";

    /// A hierarchy of `version` this test may make cgroups in, below a base of its own (removed by [`Base`]);
    /// `None` where the host has none writable.
    fn hierarchy(version: Version) -> Option<Base> {
        let parent = match version {
            Version::V2 => {
                Layout::detect()
                    .tracking()
                    .filter(|h| h.version == Version::V2)?
                    .base
            }
            Version::V1 => PathBuf::from("/sys/fs/cgroup/pids"),
        };
        let base = parent.join(format!("berth-unit-{}-{}", std::process::id(), nanos()));
        std::fs::create_dir(&base).ok()?;
        Some(Base(Hierarchy { version, base }))
    }

    /// The first writable hierarchy, v2 first. These tests fail rather than skip without one: the README's test
    /// command runs as root, where the hierarchies are writable.
    fn any_hierarchy() -> Base {
        hierarchy(Version::V2)
            .or_else(|| hierarchy(Version::V1))
            .expect("no writable cgroup hierarchy: run the tests as root (README)")
    }

    /// Removes its base cgroup when dropped (it must be empty by then: that is what the tests check).
    struct Base(Hierarchy);

    impl Drop for Base {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0.base);
        }
    }

    fn nanos() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    fn tracking(dir: &Path, base: &Base) -> CgroupTracking {
        use std::os::unix::fs::PermissionsExt;
        let trampoline = dir.join("trampoline");
        std::fs::write(&trampoline, TRAMPOLINE).unwrap();
        std::fs::set_permissions(&trampoline, std::fs::Permissions::from_mode(0o755)).unwrap();
        CgroupTracking::new(trampoline, base.0.clone())
    }

    /// The cgroups left below `base`.
    fn children(base: &Base) -> Vec<String> {
        std::fs::read_dir(&base.0.base)
            .unwrap()
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn alive(pid: u32) -> bool {
        read_stat(pid)
            .unwrap()
            .is_some_and(|stat| !matches!(stat.state, 'Z' | 'X'))
    }

    fn dies(pid: u32) -> bool {
        for _ in 0..200 {
            if !alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn kill(pid: u32) {
        if let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    /// A script that starts a daemon in a session of its own (out of the command's process group), prints the
    /// daemon's pid and then runs `rest`.
    fn escaping(cwd: &Path, rest: &str) -> ProcessSpec {
        ProcessSpec {
            argv: vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                format!("setsid sh -c 'echo $$; exec sleep 300' & sleep 0.3; {rest}"),
            ],
            env: BTreeMap::new(),
            cwd: cwd.to_path_buf(),
            stdin: None,
            timeout: None,
        }
    }

    /// Keeps stdout and the reported identity.
    #[derive(Debug, Default)]
    struct Seen {
        stdout: Mutex<Vec<u8>>,
        identity: Mutex<Option<ProcessIdentity>>,
    }

    impl Seen {
        fn first_pid(&self) -> u32 {
            String::from_utf8(self.stdout.lock().unwrap().clone())
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }
    }

    impl OutputSink for Seen {
        fn output<'a>(&'a self, stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                if stream == OutputStream::Stdout {
                    self.stdout.lock().unwrap().extend_from_slice(data);
                }
            })
        }

        fn started<'a>(&'a self, process: &'a ProcessIdentity) -> BoxFuture<'a, ()> {
            Box::pin(async move { *self.identity.lock().unwrap() = Some(process.clone()) })
        }
    }

    /// Without a cgroup, the daemon outlives its run (the scenario is real); with one, nothing does, and the cgroup
    /// is gone when the run ends.
    async fn a_daemon_that_left_its_group_dies_with_the_run(version: Version) {
        let Some(base) = hierarchy(version) else {
            eprintln!("no writable {version:?} cgroup hierarchy here; not exercised");
            return;
        };
        let temp = tempfile::tempdir().unwrap();

        let untracked = Seen::default();
        let outcome = run_process(escaping(temp.path(), "true"), &untracked, never())
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        let escaped = untracked.first_pid();
        let survived = alive(escaped);
        kill(escaped);
        assert!(
            survived,
            "without a cgroup the setsid daemon should have escaped its group"
        );

        let tracking = tracking(temp.path(), &base);
        let seen = Seen::default();
        let started = Instant::now();
        let outcome = run_process_tracked(
            escaping(temp.path(), "true"),
            Some(&tracking),
            &seen,
            never(),
        )
        .await
        .unwrap();
        assert_eq!(outcome.exit_code, Some(0));
        let daemon = seen.first_pid();
        assert!(dies(daemon), "the setsid daemon {daemon} outlived its run");
        // The daemon held the output pipes: the run did not wait out the drain deadline for them.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let identity = seen.identity.lock().unwrap().clone().unwrap();
        let cgroup = identity
            .cgroup
            .clone()
            .expect("the identity names the cgroup");
        assert!(
            cgroup.starts_with(&*base.0.base.to_string_lossy()),
            "{cgroup}"
        );
        assert!(
            !Path::new(&cgroup).exists(),
            "the command's cgroup {cgroup} was left behind"
        );
        assert_eq!(children(&base), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_daemon_that_left_its_group_dies_with_the_run_v2() {
        a_daemon_that_left_its_group_dies_with_the_run(Version::V2).await;
    }

    #[tokio::test]
    async fn a_daemon_that_left_its_group_dies_with_the_run_v1() {
        a_daemon_that_left_its_group_dies_with_the_run(Version::V1).await;
    }

    #[tokio::test]
    async fn a_timeout_and_a_cancel_reach_a_daemon_that_left_the_group() {
        let base = any_hierarchy();
        let temp = tempfile::tempdir().unwrap();
        let tracking = tracking(temp.path(), &base);

        let seen = Seen::default();
        let mut spec = escaping(temp.path(), "sleep 1000");
        spec.timeout = Some(Duration::from_millis(800));
        let outcome = run_process_tracked(spec, Some(&tracking), &seen, never())
            .await
            .unwrap();
        assert!(outcome.timed_out, "{outcome:?}");
        let daemon = seen.first_pid();
        assert!(
            dies(daemon),
            "the setsid daemon {daemon} outlived the timeout"
        );

        let seen = Seen::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let cancel: berth_core::driver::CancelSignal = Box::pin(async move {
            if rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let _ = tx.send(());
        });
        let outcome = run_process_tracked(
            escaping(temp.path(), "sleep 1000"),
            Some(&tracking),
            &seen,
            cancel,
        )
        .await
        .unwrap();
        assert!(outcome.cancelled, "{outcome:?}");
        let daemon = seen.first_pid();
        assert!(
            dies(daemon),
            "the setsid daemon {daemon} outlived the cancel"
        );
        assert_eq!(children(&base), Vec::<String>::new());
    }

    /// berth gone mid-run (its run forgotten, never dropped: no guard fires): the recorded identity alone finds the
    /// daemon through the cgroup, kills it, and removes the cgroup.
    #[tokio::test]
    async fn after_a_crash_the_recorded_cgroup_is_emptied_and_removed() {
        let base = any_hierarchy();
        let temp = tempfile::tempdir().unwrap();
        let tracking = tracking(temp.path(), &base);
        let seen: &'static Seen = Box::leak(Box::default());
        let tracking: &'static CgroupTracking = Box::leak(Box::new(tracking));
        let mut run = Box::pin(run_process_tracked(
            escaping(temp.path(), "sleep 1000"),
            Some(tracking),
            seen,
            never(),
        ));
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), &mut run)
                .await
                .is_err()
        );
        std::mem::forget(run);
        let daemon = seen.first_pid();
        let identity = seen.identity.lock().unwrap().clone().unwrap();
        let shell = identity.pgid;
        assert!(alive(daemon) && alive(shell));
        // The daemon left the recorded group: only the cgroup still knows it.
        assert_ne!(read_stat(daemon).unwrap().unwrap().pgrp, identity.pgid);
        let killed = kill_recorded(&identity).unwrap();
        assert!(killed >= 2, "{killed}");
        assert!(dies(daemon), "the daemon survived the crash cleanup");
        assert!(dies(shell), "the command survived the crash cleanup");
        assert_eq!(children(&base), Vec::<String>::new());
    }

    /// The start-up check passes where the trampoline joins, fails (and says so) where it cannot, and leaves no
    /// cgroup either way.
    #[test]
    fn the_self_test_tells_a_working_trampoline_from_a_broken_one() {
        let base = any_hierarchy();
        let temp = tempfile::tempdir().unwrap();
        assert_eq!(tracking(temp.path(), &base).self_test(), Ok(()));
        let broken = CgroupTracking::new(PathBuf::from("/bin/false"), base.0.clone());
        let err = broken.self_test().unwrap_err();
        assert!(err.contains("could not join"), "{err}");
        assert_eq!(children(&base), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_spawn_as_before() {
        let base = any_hierarchy();
        let temp = tempfile::tempdir().unwrap();
        let tracking = tracking(temp.path(), &base);
        let spec = ProcessSpec {
            argv: vec!["no-such-program-berth".to_owned()],
            env: BTreeMap::new(),
            cwd: temp.path().to_path_buf(),
            stdin: None,
            timeout: None,
        };
        let err = run_process_tracked(spec, Some(&tracking), &Seen::default(), never())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "spawn_failed");
        assert_eq!(children(&base), Vec::<String>::new());
    }
}
