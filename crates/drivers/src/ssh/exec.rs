//! Running commands on the remote host, each on its own session channel.
//!
//! sshd hands the string of an `exec` request to the user's shell as `sh -c STRING`, where every process on the host
//! can read it in `/proc/*/cmdline`. So that string is a fixed bootstrap that holds nothing of the request: it
//! clears the environment (`env -i`), reports its pid, then reads a length-prefixed shell preamble from stdin —
//! the `export`s of the command's environment (values may be secrets), the `cd`, and the `exec` of the argv — and
//! evals it. What follows the preamble on stdin is the command's own stdin. Env values travel only inside the
//! encrypted channel and the shell's memory.
//!
//! sshd makes every session its own process group (it calls `setsid` for the child), and the bootstrap `exec`s down
//! to the command, so the command's pid is its process group id: timeouts and cancels kill the whole group with
//! `kill -KILL -PGID` on a second channel (no `--`: dash's `kill` takes none). So does a command that exits while
//! something it started still holds its output open (the channel would never close). A command that ends cleanly
//! costs one session and no kill; what it left running detached in a per-run workspace is killed when the workspace
//! is removed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_core::driver::{
    CancelSignal, DriverError, ExecOutcome, ExecRequest, OutputSink, OutputStream,
};
use russh::{ChannelMsg, Sig};
use tokio::sync::mpsc;

use crate::remote_shell::{self, RemoteShell};
pub use crate::remote_shell::{CONTROL_TIMEOUT, ScriptOutput, shell_quote};
use berth_core::driver::BoxFuture;

use super::pool::{Pool, SessionChannel};
use super::target::SshTarget;
use crate::process::{DEFAULT_PATH, command_cwd};

/// After a kill, how long to keep reading the output already on its way before giving up on the channel.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(5);
/// After the command exits, how long its output may stay open (a grandchild holding the pipes) before the group is
/// killed: sshd sends the exit status, then closes the channel once the pipes reach end of file.
const LEFTOVER_GRACE: Duration = Duration::from_millis(250);

/// The stdout line the bootstrap writes first: `berth-pid <pid>\n`.
const PID_PREFIX: &[u8] = b"berth-pid ";
/// What a login shell may print before the bootstrap's pid line before berth gives up on it.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The string sent as the `exec` request. It must stay free of anything from the request: see the module docs.
fn bootstrap() -> String {
    // The inner script reads N, then N lines, and evals them. `read` takes a pipe byte by byte, so nothing after
    // the preamble is consumed: it stays for the command.
    let inner = "printf 'berth-pid %s\\n' \"$$\"; \
                 IFS= read -r berth_n || exit 125; berth_s=; \
                 while [ \"$berth_n\" -gt 0 ]; do IFS= read -r berth_l || exit 125; \
                 berth_s=\"$berth_s$berth_l\n\"; berth_n=$((berth_n - 1)); done; \
                 unset berth_n berth_l; eval \"$berth_s\"";
    format!(
        "exec env -i PATH={DEFAULT_PATH} HOME=\"$HOME\" /bin/sh -c {}",
        shell_quote(inner)
    )
}

/// The preamble for one command: environment, working directory, argv; every value single-quoted.
fn preamble(
    env: &BTreeMap<String, String>,
    cwd: &str,
    argv: &[String],
) -> Result<String, DriverError> {
    let program = argv.first().cloned().unwrap_or_default();
    if argv.is_empty() {
        return Err(DriverError::Spawn {
            program,
            message: "the command is empty".to_owned(),
        });
    }
    let mut script = String::from("unset berth_s\n");
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
    script.push_str("exec");
    for arg in argv {
        script.push(' ');
        script.push_str(&shell_quote(arg));
    }
    script.push('\n');
    let lines = script.matches('\n').count();
    Ok(format!("{lines}\n{script}"))
}

fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Runs `request` in `dir` (absolute, on the remote host), streaming its output into `sink`.
pub async fn execute(
    pool: &Arc<Pool>,
    target: &SshTarget,
    dir: &str,
    request: ExecRequest,
    sink: &dyn OutputSink,
    cancel: CancelSignal,
) -> Result<ExecOutcome, DriverError> {
    let cwd = remote_cwd(dir, &request)?;
    let preamble = preamble(&request.env, &cwd, &request.argv)?;
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
                    let Some((pid, rest)) = find_pid_line(&mut header) else {
                        if header.len() > MAX_HEADER_BYTES {
                            return Err(DriverError::failed(
                                "the remote shell did not start the berth bootstrap (is the login shell POSIX?)",
                            ));
                        }
                        continue;
                    };
                    pgid = Some(pid);
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

/// Takes complete lines off the front of `header` until one is the pid line; returns the pid and what follows it.
fn find_pid_line(header: &mut Vec<u8>) -> Option<(u32, Vec<u8>)> {
    while let Some(end) = header.iter().position(|&byte| byte == b'\n') {
        let pid = parse_pid(&header[..end]);
        let rest = header.split_off(end + 1);
        match pid {
            Some(pid) => return Some((pid, rest)),
            None => *header = rest,
        }
    }
    None
}

fn parse_pid(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(PID_PREFIX)?;
    std::str::from_utf8(rest).ok()?.trim().parse().ok()
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

/// Kills the command's process group and waits for the kill to be delivered.
async fn kill_group(pool: &Arc<Pool>, target: &SshTarget, pgid: Option<u32>) {
    let Some(pgid) = pgid else {
        // Before the bootstrap reported its pid: the supervisor kills as soon as the pid arrives.
        return;
    };
    let script = format!("kill -KILL -{pgid} 2>/dev/null; true");
    if let Err(error) = control(pool, target, &script, None).await {
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

/// Runs a berth-written script on its own session with `input`'s chunks as its stdin, its stdout handed to `output`
/// chunk by chunk (backpressure both ways) or else collected, within `limit`. A stopped `output` ends the read
/// early: its side reports why.
async fn run_script(
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
        assert_eq!(parse_pid(b"berth-pid 4242"), Some(4242));
        assert_eq!(parse_pid(b"hello"), None);
    }

    #[test]
    fn what_a_login_shell_prints_before_the_pid_line_is_skipped() {
        let mut header = b"Welcome!\nberth-pid 77\noutput".to_vec();
        assert_eq!(find_pid_line(&mut header), Some((77, b"output".to_vec())));
        let mut partial = b"motd\nberth-pi".to_vec();
        assert_eq!(find_pid_line(&mut partial), None);
        assert_eq!(
            partial,
            b"berth-pi".to_vec(),
            "an incomplete line waits for more"
        );
    }
}
