//! Running commands on the remote host: on a [remote runner](super::runner) of a pooled connection when the host
//! can have one, else each on its own session channel (this module's per-session path, also the runner's start).
//!
//! sshd hands the string of an `exec` request to the user's shell as `sh -c STRING`, where every process on the host
//! can read it in `/proc/*/cmdline`. So that string is a fixed bootstrap that holds nothing of the request: it
//! clears the environment (`env -i`), reports its pid (with its start time and the boot id when there is a
//! `/proc`), then reads a length-prefixed shell preamble from stdin — the `export`s of the command's environment
//! (values may be secrets), the `cd`, and the `exec` of the argv — and evals it. What follows the preamble on stdin
//! is the command's own stdin. Env values travel only inside the encrypted channel and the shell's memory. A runner
//! starts with the same bootstrap, its preamble being the runner's loop; its jobs are framed the same way.
//!
//! On the per-session path, sshd makes every session its own process group (it calls `setsid` for the child), and
//! the bootstrap `exec`s down to the command, so the command's pid is its process group id: timeouts and cancels
//! kill the whole group with `kill -KILL -PGID` on a second channel (no `--`: dash's `kill` takes none). So does a
//! command that exits while something it started still holds its output open (the channel would never close). On
//! a runner, the command `setsid`s into a group of its own, and the runner kills what is left of it when it exits;
//! what escaped into a session of its own and keeps the output open gets the runner retired instead of reused (see
//! [`super::runner`]: it can never write into another job's output).
//! Either way the command's identity (group, session, start time, boot id) goes to the sink's `started` before its
//! output, so a crash of berth leaves enough behind to kill exactly its processes later.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_core::driver::{
    CancelSignal, DriverError, ExecOutcome, ExecRequest, OutputSink, OutputStream, ProcessIdentity,
};
use russh::{ChannelMsg, Sig};
use tokio::sync::mpsc;

use crate::remote_shell::{self, RemoteShell};
pub use crate::remote_shell::{CONTROL_TIMEOUT, ScriptOutput, shell_quote};
use berth_core::driver::BoxFuture;

use super::pool::{Pool, SessionChannel};
use super::runner::{self, Event, JobInput, Runner, bootstrap};
use super::target::SshTarget;
use crate::process::command_cwd;

/// After a kill, how long to keep reading the output already on its way before giving up on the channel.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(5);
/// After the command exits, how long its output may stay open (a grandchild holding the pipes) before the group is
/// killed: sshd sends the exit status, then closes the channel once the pipes reach end of file.
const LEFTOVER_GRACE: Duration = Duration::from_millis(250);

/// The stdout line the bootstrap writes first: `berth-pid <pid>\n`.
const PID_PREFIX: &[u8] = b"berth-pid ";
/// What a login shell may print before the bootstrap's pid line before berth gives up on it.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The preamble for one command on its own session: environment, working directory, argv; every value
/// single-quoted; framed as the bootstrap reads it.
fn preamble(
    env: &BTreeMap<String, String>,
    cwd: &str,
    argv: &[String],
) -> Result<String, DriverError> {
    let mut script = String::from("unset berth_s\n");
    script.push_str(&command_body(env, cwd, argv, "exec")?);
    script.push('\n');
    let lines = script.matches('\n').count();
    Ok(format!("{lines}\n{script}"))
}

/// The shell that starts one command: the `export`s, the `cd`, then `exec_prefix` and the argv (no final newline).
fn command_body(
    env: &BTreeMap<String, String>,
    cwd: &str,
    argv: &[String],
    exec_prefix: &str,
) -> Result<String, DriverError> {
    let program = argv.first().cloned().unwrap_or_default();
    if argv.is_empty() {
        return Err(DriverError::Spawn {
            program,
            message: "the command is empty".to_owned(),
        });
    }
    let mut script = String::new();
    for (name, value) in env {
        if !is_shell_name(name) {
            return Err(DriverError::Spawn {
                program,
                message: format!(
                    "the environment variable name `{name}` cannot be set over SSH: names must be letters, digits and `_`, not starting with a digit"
                ),
            });
        }
        script.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    script.push_str(&format!(
        "cd -- {} || {{ echo 'berth: cannot enter the working directory' >&2; exit 126; }}\n",
        shell_quote(cwd)
    ));
    script.push_str(exec_prefix);
    for arg in argv {
        script.push(' ');
        script.push_str(&shell_quote(arg));
    }
    Ok(script)
}

fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Runs `request` in `dir` (absolute, on the remote host), streaming its output into `sink`: on a runner, or on a
/// session of its own when the host cannot have one.
pub async fn execute(
    pool: &Arc<Pool>,
    target: &SshTarget,
    dir: &str,
    request: ExecRequest,
    sink: &dyn OutputSink,
    mut cancel: CancelSignal,
) -> Result<ExecOutcome, DriverError> {
    let cwd = remote_cwd(dir, &request)?;
    let body = command_body(&request.env, &cwd, &request.argv, "exec setsid")?;
    let stdin = request.stdin.clone().unwrap_or_default();
    // A runner that died before the job printed anything (killed on the host while idle) is replaced, once.
    for attempt in 0..2 {
        let Some(mut runner) = pool.runner(target).await? else {
            let preamble = preamble(&request.env, &cwd, &request.argv)?;
            return execute_in_session(pool, target, preamble, request, sink, cancel).await;
        };
        let result = match runner.send_job(&body, JobInput::Bytes(stdin.clone())).await {
            Ok(feed) => {
                let supervised = supervise_runner(
                    pool,
                    target,
                    &mut runner,
                    sink,
                    request.timeout,
                    &mut cancel,
                );
                runner::feeding(feed, supervised).await
            }
            Err(lost) => Supervised::Lost(lost),
        };
        match result {
            Supervised::Finished(outcome) => {
                pool.park(runner);
                return Ok(outcome);
            }
            Supervised::Lost(lost) => {
                let connection = runner.connection().clone();
                let target_name = runner.target().to_owned();
                pool.park(runner);
                if lost.connection_lost {
                    pool.forget(target, &connection);
                }
                if !lost.job_began && attempt == 0 {
                    tracing::debug!(target = %target_name, "the runner went away before the command started; once more on another");
                    continue;
                }
                return Err(DriverError::failed(if lost.connection_lost {
                    format!("lost the connection to {target_name} while the command was running")
                } else {
                    format!("the berth runner on {target_name} died while the command was running")
                }));
            }
        }
    }
    Err(DriverError::failed(format!(
        "no berth runner on {} would take the command",
        target.display()
    )))
}

/// How a job on a runner ended.
enum Supervised {
    Finished(ExecOutcome),
    /// The runner (or its connection) went away; what was started has been killed.
    Lost(runner::Lost),
}

/// Streams a job's events into `sink`, killing its process group on timeout or cancel.
async fn supervise_runner(
    pool: &Arc<Pool>,
    target: &SshTarget,
    runner: &mut Runner,
    sink: &dyn OutputSink,
    timeout: Option<Duration>,
    cancel: &mut CancelSignal,
) -> Supervised {
    let deadline = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut outcome = ExecOutcome::default();
    let mut pgid: Option<u32> = None;
    let mut killed: Option<Kill> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        let drain_limit = async {
            match drain_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let live = killed.is_none();
        let event = tokio::select! {
            event = runner.next_event() => event,
            () = &mut deadline, if live => {
                killed = Some(Kill::Timeout);
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_KILL);
                kill_group(pool, target, pgid).await;
                continue;
            }
            () = &mut *cancel, if live => {
                killed = Some(Kill::Cancel);
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_KILL);
                kill_group(pool, target, pgid).await;
                continue;
            }
            () = drain_limit => {
                tracing::warn!(target = %runner.target(), "the remote command did not end after it was killed");
                break;
            }
        };
        match event {
            Ok(Event::Started(started)) => {
                pgid = Some(started.pid);
                sink.started(&ProcessIdentity {
                    pgid: started.pid,
                    session_id: started.pid,
                    start_ticks: started.start_ticks,
                    boot_id: runner.boot_id.clone(),
                    cgroup: None,
                })
                .await;
                if killed.is_some() {
                    // The kill came before the pid: deliver it now.
                    kill_group(pool, target, pgid).await;
                }
            }
            Ok(Event::Output(stream, data)) => sink.output(stream, &data).await,
            Ok(Event::Done(status)) => {
                (outcome.exit_code, outcome.signal) = runner::status_outcome(status);
                break;
            }
            Err(lost) => {
                // The command may outlive its runner (its own session): kill it through another.
                spawn_kill(pool, target, pgid);
                if killed.is_none() {
                    return Supervised::Lost(lost);
                }
                break;
            }
        }
    }
    match killed {
        Some(Kill::Timeout) => outcome.timed_out = true,
        Some(Kill::Cancel) => outcome.cancelled = true,
        None => {}
    }
    if killed.is_some() {
        outcome.exit_code = None;
        if outcome.signal.is_none() {
            outcome.signal = Some("SIGKILL".to_owned());
        }
    }
    Supervised::Finished(outcome)
}

/// Runs one command on a session of its own (a host without a runner).
async fn execute_in_session(
    pool: &Arc<Pool>,
    target: &SshTarget,
    preamble: String,
    request: ExecRequest,
    sink: &dyn OutputSink,
    cancel: CancelSignal,
) -> Result<ExecOutcome, DriverError> {
    let mut session = pool.open_session(target).await?;
    let started = start(&session, preamble, request.stdin).await;
    if let Err(error) = started {
        pool.forget(target, &session.connection);
        session.close().await;
        return Err(error);
    }
    let result = supervise(pool, target, &mut session, sink, request.timeout, cancel).await;
    session.close().await;
    result
}

async fn start(
    session: &SessionChannel,
    preamble: String,
    stdin: Option<Vec<u8>>,
) -> Result<(), DriverError> {
    let lost = |error: russh::Error| {
        DriverError::failed(format!(
            "cannot start the command on {}: {error}",
            session.connection.target()
        ))
    };
    let channel = &session.channel;
    channel.exec(true, bootstrap()).await.map_err(lost)?;
    channel
        .data_bytes(preamble.into_bytes())
        .await
        .map_err(lost)?;
    if let Some(stdin) = stdin
        && !stdin.is_empty()
    {
        channel.data_bytes(stdin).await.map_err(lost)?;
    }
    channel.eof().await.map_err(lost)
}

/// Why the command is being killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    Timeout,
    Cancel,
}

/// What woke the supervisor.
enum Wake {
    Message(Option<ChannelMsg>),
    Kill(Kill),
    Leftovers,
    DrainLimit,
}

async fn supervise(
    pool: &Arc<Pool>,
    target: &SshTarget,
    session: &mut SessionChannel,
    sink: &dyn OutputSink,
    timeout: Option<Duration>,
    mut cancel: CancelSignal,
) -> Result<ExecOutcome, DriverError> {
    let deadline = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut outcome = ExecOutcome::default();
    let mut header = Vec::new();
    let mut pgid: Option<u32> = None;
    let mut killed: Option<Kill> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    // Set once the command has exited: when its output is still open then, the leftovers are killed.
    let mut leftovers_at: Option<tokio::time::Instant> = None;
    loop {
        let drain_limit = async {
            match drain_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let leftovers = async {
            match leftovers_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let live = killed.is_none() && !has_exited(&outcome);
        let wake = tokio::select! {
            message = session.channel.wait() => Wake::Message(message),
            () = &mut deadline, if live => Wake::Kill(Kill::Timeout),
            () = &mut cancel, if live => Wake::Kill(Kill::Cancel),
            () = leftovers => Wake::Leftovers,
            () = drain_limit => Wake::DrainLimit,
        };
        let message = match wake {
            Wake::Message(message) => message,
            Wake::Leftovers => {
                leftovers_at = None;
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_KILL);
                kill_group(pool, target, pgid).await;
                continue;
            }
            Wake::Kill(kill) => {
                killed = Some(kill);
                drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_KILL);
                kill_group(pool, target, pgid).await;
                continue;
            }
            Wake::DrainLimit => {
                tracing::warn!(target = %session.connection.target(), "the remote command's output did not end after it exited or was killed");
                break;
            }
        };
        let Some(message) = message else {
            if !has_exited(&outcome) && killed.is_none() {
                // The connection went away under the command: it may still run on a healthy host.
                pool.forget(target, &session.connection);
                spawn_kill(pool, target, pgid);
                return Err(DriverError::failed(format!(
                    "lost the connection to {} while the command was running",
                    session.connection.target()
                )));
            }
            break;
        };
        let had_exited = has_exited(&outcome);
        match message {
            ChannelMsg::Data { data } => {
                if pgid.is_none() {
                    header.extend_from_slice(&data);
                    // Login shells may print (a chatty rc file) before the bootstrap: skip whole lines until
                    // the pid line; none of it is the command's output.
                    let Some((identity, rest)) = find_pid_line(&mut header) else {
                        if header.len() > MAX_HEADER_BYTES {
                            return Err(DriverError::failed(
                                "the remote shell did not start the berth bootstrap (is the login shell POSIX?)",
                            ));
                        }
                        continue;
                    };
                    pgid = Some(identity.pgid);
                    sink.started(&identity).await;
                    if killed.is_some() {
                        // The kill came before the pid: deliver it now.
                        kill_group(pool, target, pgid).await;
                    }
                    if !rest.is_empty() {
                        sink.output(OutputStream::Stdout, &rest).await;
                    }
                } else {
                    sink.output(OutputStream::Stdout, &data).await;
                }
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                sink.output(OutputStream::Stderr, &data).await;
            }
            ChannelMsg::ExitStatus { exit_status } => {
                outcome.exit_code = i32::try_from(exit_status).ok();
            }
            ChannelMsg::ExitSignal { signal_name, .. } => {
                outcome.signal = Some(signal_text(&signal_name));
            }
            ChannelMsg::Close => break,
            _ => {}
        }
        if !had_exited && has_exited(&outcome) && killed.is_none() {
            leftovers_at = Some(tokio::time::Instant::now() + LEFTOVER_GRACE);
        }
    }
    match killed {
        Some(Kill::Timeout) => outcome.timed_out = true,
        Some(Kill::Cancel) => outcome.cancelled = true,
        None => {}
    }
    if killed.is_some() && outcome.signal.is_none() && outcome.exit_code.is_none() {
        outcome.signal = Some("SIGKILL".to_owned());
    }
    Ok(outcome)
}

/// The exit status or signal arrived: the command itself is done (its output may still be on its way).
fn has_exited(outcome: &ExecOutcome) -> bool {
    outcome.exit_code.is_some() || outcome.signal.is_some()
}

/// Takes complete lines off the front of `header` until one is the pid line; returns the command's identity and
/// what follows the line.
fn find_pid_line(header: &mut Vec<u8>) -> Option<(ProcessIdentity, Vec<u8>)> {
    while let Some(end) = header.iter().position(|&byte| byte == b'\n') {
        let identity = parse_pid(&header[..end]);
        let rest = header.split_off(end + 1);
        match identity {
            Some(identity) => return Some((identity, rest)),
            None => *header = rest,
        }
    }
    None
}

/// `berth-pid PID [START BOOT]`: the session leader is the command, its pid the group and the session. Without a
/// `/proc` on the host the start time is 0 and the boot id empty.
fn parse_pid(line: &[u8]) -> Option<ProcessIdentity> {
    let rest = line.strip_prefix(PID_PREFIX)?;
    let mut fields = std::str::from_utf8(rest).ok()?.split_whitespace();
    let pgid = fields.next()?.parse().ok()?;
    let start_ticks = fields
        .next()
        .and_then(|ticks| ticks.parse().ok())
        .unwrap_or(0);
    let boot_id = fields.next().unwrap_or_default().to_owned();
    Some(ProcessIdentity {
        pgid,
        session_id: pgid,
        start_ticks,
        boot_id: if start_ticks == 0 {
            String::new()
        } else {
            boot_id
        },
        cgroup: None,
    })
}

fn signal_text(signal: &Sig) -> String {
    match signal {
        Sig::Custom(name) => format!("SIG{name}"),
        named => format!("SIG{named:?}"),
    }
}

/// The command's working directory on the remote host: the workspace, or `request.cwd` inside it, by the same
/// rules as on this host (both are POSIX paths).
fn remote_cwd(dir: &str, request: &ExecRequest) -> Result<String, DriverError> {
    let cwd = command_cwd(Path::new(dir), request)?;
    cwd.to_str()
        .map(str::to_owned)
        .ok_or_else(|| DriverError::Spawn {
            program: request.argv.first().cloned().unwrap_or_default(),
            message: "the working directory is not UTF-8".to_owned(),
        })
}

/// The script that kills a recorded command after a crash of berth, or `None` when the identity cannot be checked
/// (no start time or boot id: a host without `/proc`). It kills only what is certainly that command's: nothing after
/// a reboot; the whole group when its leader still lives with the recorded start time; else the members left of
/// that group that carry the recorded session and started no earlier than the leader — never a process that got a
/// recycled pid.
pub fn identity_kill_script(process: &ProcessIdentity) -> Option<String> {
    if process.start_ticks == 0 || process.boot_id.is_empty() {
        return None;
    }
    let (group, session, start) = (process.pgid, process.session_id, process.start_ticks);
    Some(format!(
        r#"berth_b={boot}
{{ IFS= read -r berth_now </proc/sys/kernel/random/boot_id; }} 2>/dev/null || exit 0
[ "$berth_now" = "$berth_b" ] || exit 0
if {{ IFS= read -r berth_l </proc/{group}/stat; }} 2>/dev/null; then
  set -- ${{berth_l##*') '}}
  [ "${{20}}" = {start} ] && kill -KILL -{group} 2>/dev/null
  exit 0
fi
for berth_f in /proc/[0-9]*/stat; do
  {{ IFS= read -r berth_l <"$berth_f"; }} 2>/dev/null || continue
  set -- ${{berth_l##*') '}}
  [ "$3" = {group} ] && [ "$4" = {session} ] && [ "${{20}}" -ge {start} ] && kill -KILL "${{berth_l%% *}}" 2>/dev/null
done
exit 0"#,
        boot = shell_quote(&process.boot_id),
    ))
}

/// Kills the command's process group and waits for the kill to be delivered.
async fn kill_group(pool: &Arc<Pool>, target: &SshTarget, pgid: Option<u32>) {
    let Some(pgid) = pgid else {
        // Before the bootstrap reported its pid: the supervisor kills as soon as the pid arrives.
        return;
    };
    if let Err(error) = control(pool, target, &runner::kill_script(pgid), None).await {
        tracing::warn!(target = %target.display(), error = %error, "could not kill the remote command");
    }
}

fn spawn_kill(pool: &Arc<Pool>, target: &SshTarget, pgid: Option<u32>) {
    let (pool, target) = (pool.clone(), target.clone());
    tokio::spawn(async move { kill_group(&pool, &target, pgid).await });
}

/// Runs a short berth-written shell script on `target`, feeding `stdin`, and collects its output.
pub async fn control(
    pool: &Arc<Pool>,
    target: &SshTarget,
    script: &str,
    stdin: Option<Vec<u8>>,
) -> Result<ScriptOutput, DriverError> {
    remote_shell::control(&SshShell { pool, target }, script, stdin).await
}

/// An SSH host as a [`RemoteShell`]: every script on a session of its own from the pool.
#[derive(Debug)]
pub struct SshShell<'a> {
    pub pool: &'a Arc<Pool>,
    pub target: &'a SshTarget,
}

impl RemoteShell for SshShell<'_> {
    fn run_script<'a>(
        &'a self,
        script: &'a str,
        input: mpsc::Receiver<Vec<u8>>,
        output: Option<mpsc::Sender<Vec<u8>>>,
        limit: Duration,
    ) -> BoxFuture<'a, Result<ScriptOutput, DriverError>> {
        Box::pin(run_script(
            self.pool,
            self.target,
            script,
            input,
            output,
            limit,
        ))
    }
}

/// Runs a berth-written script with `input`'s chunks as its stdin, its stdout handed to `output` chunk by chunk
/// (backpressure both ways) or else collected, within `limit`: on a runner, or on a session of its own when the host
/// cannot have one. A stopped `output` ends the read early (the script's group is killed): its side reports why.
async fn run_script(
    pool: &Arc<Pool>,
    target: &SshTarget,
    script: &str,
    mut input: mpsc::Receiver<Vec<u8>>,
    output: Option<mpsc::Sender<Vec<u8>>>,
    limit: Duration,
) -> Result<ScriptOutput, DriverError> {
    let body = runner::script_job(script);
    for attempt in 0..2 {
        let Some(mut runner) = pool.runner(target).await? else {
            return run_script_in_session(pool, target, script, input, output, limit).await;
        };
        let mut pgid = None;
        let result = tokio::time::timeout(
            limit,
            run_job(&mut runner, &body, &mut input, output.as_ref(), &mut pgid),
        )
        .await;
        match result {
            Ok(Ok(Some(collected))) => {
                pool.park(runner);
                return Ok(collected);
            }
            Ok(Ok(None)) => {
                // Whoever reads the output stopped: the script's group goes, and so does this runner's job.
                spawn_kill(pool, target, pgid);
                pool.park(runner);
                return Ok(ScriptOutput {
                    status: None,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                });
            }
            Ok(Err(lost)) => {
                spawn_kill(pool, target, pgid);
                let connection = runner.connection().clone();
                let target_name = runner.target().to_owned();
                pool.park(runner);
                if lost.connection_lost {
                    pool.forget(target, &connection);
                }
                if !lost.job_began && !lost.input_taken && attempt == 0 {
                    continue;
                }
                return Err(DriverError::failed(format!(
                    "lost {target_name}: the berth runner ended"
                )));
            }
            Err(_) => {
                spawn_kill(pool, target, pgid);
                pool.park(runner);
                return Err(DriverError::failed(format!(
                    "a command on {} did not finish within {}s",
                    target.display(),
                    limit.as_secs()
                )));
            }
        }
    }
    Err(DriverError::failed(format!(
        "no berth runner on {} would take the command",
        target.display()
    )))
}

/// One script job on `runner`: `Ok(None)` when `output` stopped reading.
async fn run_job(
    runner: &mut Runner,
    body: &str,
    input: &mut mpsc::Receiver<Vec<u8>>,
    output: Option<&mpsc::Sender<Vec<u8>>>,
    pgid: &mut Option<u32>,
) -> Result<Option<ScriptOutput>, runner::Lost> {
    let feed = runner.send_job(body, JobInput::Stream(input)).await?;
    runner::feeding(feed, collect_job(runner, output, pgid)).await
}

/// The events of a script job on `runner` (see [`run_job`]).
async fn collect_job(
    runner: &mut Runner,
    output: Option<&mpsc::Sender<Vec<u8>>>,
    pgid: &mut Option<u32>,
) -> Result<Option<ScriptOutput>, runner::Lost> {
    let mut collected = ScriptOutput {
        status: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    loop {
        match runner.next_event().await? {
            Event::Started(started) => *pgid = Some(started.pid),
            Event::Output(OutputStream::Stdout, data) => match output {
                Some(output) => {
                    if output.send(data).await.is_err() {
                        return Ok(None);
                    }
                }
                None => collected.stdout.extend_from_slice(&data),
            },
            Event::Output(OutputStream::Stderr, data) => collected.stderr.extend_from_slice(&data),
            Event::Done(status) => {
                collected.status = Some(status);
                return Ok(Some(collected));
            }
        }
    }
}

/// Runs a berth-written script on its own session with `input`'s chunks as its stdin, its stdout handed to `output`
/// chunk by chunk (backpressure both ways) or else collected, within `limit`. A stopped `output` ends the read
/// early: its side reports why.
async fn run_script_in_session(
    pool: &Arc<Pool>,
    target: &SshTarget,
    script: &str,
    mut input: mpsc::Receiver<Vec<u8>>,
    output: Option<mpsc::Sender<Vec<u8>>>,
    limit: Duration,
) -> Result<ScriptOutput, DriverError> {
    let mut session = pool.open_session(target).await?;
    let result = tokio::time::timeout(limit, async {
        let lost = |error: russh::Error| {
            DriverError::failed(format!("lost {}: {error}", session.connection.target()))
        };
        session.channel.exec(true, script).await.map_err(lost)?;
        while let Some(chunk) = input.recv().await {
            session.channel.data_bytes(chunk).await.map_err(lost)?;
        }
        session.channel.eof().await.map_err(lost)?;
        let mut collected = ScriptOutput {
            status: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        while let Some(message) = session.channel.wait().await {
            match message {
                ChannelMsg::Data { data } => match &output {
                    Some(output) => {
                        if output.send(data.to_vec()).await.is_err() {
                            break;
                        }
                    }
                    None => collected.stdout.extend_from_slice(&data),
                },
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    collected.stderr.extend_from_slice(&data)
                }
                ChannelMsg::ExitStatus { exit_status } => collected.status = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        Ok(collected)
    })
    .await
    .unwrap_or_else(|_| {
        Err(DriverError::failed(format!(
            "a command on {} did not finish within {}s",
            target.display(),
            limit.as_secs()
        )))
    });
    session.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_holds_nothing_of_the_request() {
        let mut env = BTreeMap::new();
        env.insert("TOKEN".to_owned(), "s3cr3t\nwith 'quotes'".to_owned());
        let preamble = preamble(&env, "/w", &["echo".to_owned(), "hi".to_owned()]).unwrap();
        assert!(!bootstrap().contains("s3cr3t"));
        assert!(preamble.contains("export TOKEN='s3cr3t\nwith '\\''quotes'\\'''"));
        let (count, script) = preamble.split_once('\n').unwrap();
        assert_eq!(
            count.parse::<usize>().unwrap(),
            script.matches('\n').count()
        );
        assert!(script.ends_with("exec 'echo' 'hi'\n"));
    }

    #[test]
    fn names_that_the_shell_cannot_export_are_refused() {
        for bad in ["A-B", "1X", "A B", ""] {
            let mut env = BTreeMap::new();
            env.insert(bad.to_owned(), "v".to_owned());
            assert!(preamble(&env, "/w", &["true".to_owned()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn pid_lines_parse() {
        let bare = parse_pid(b"berth-pid 4242").unwrap();
        assert_eq!(
            (bare.pgid, bare.session_id, bare.start_ticks),
            (4242, 4242, 0)
        );
        assert_eq!(bare.boot_id, "");
        let full = parse_pid(b"berth-pid 4242 987 0f-boot").unwrap();
        assert_eq!((full.start_ticks, full.boot_id.as_str()), (987, "0f-boot"));
        // No /proc: a boot id without a start time is not worth keeping.
        assert_eq!(parse_pid(b"berth-pid 9 0 x").unwrap().boot_id, "");
        assert_eq!(parse_pid(b"hello"), None);
    }

    #[test]
    fn what_a_login_shell_prints_before_the_pid_line_is_skipped() {
        let mut header = b"Welcome!\nberth-pid 77\noutput".to_vec();
        let (identity, rest) = find_pid_line(&mut header).unwrap();
        assert_eq!((identity.pgid, rest), (77, b"output".to_vec()));
        let mut partial = b"motd\nberth-pi".to_vec();
        assert_eq!(find_pid_line(&mut partial), None);
        assert_eq!(
            partial,
            b"berth-pi".to_vec(),
            "an incomplete line waits for more"
        );
    }
}
