//! The remote runner: a long-lived POSIX `sh` loop on one session channel of a pooled connection that runs every
//! command berth needs on the host — workspace scripts, the run's command, kills, cleanup — without opening a
//! session each.
//!
//! Why: sshd starts every session through the user's login shell (`$SHELL -c …`), and a shell whose rc files do real
//! work (`pyenv init`, nvm, conda) costs that work again for every session. A runner pays it once, when it starts.
//!
//! How (the host needs only `sh`, `setsid`, `head`, `cat`, `mkdir` and a Linux `/proc`):
//!
//! - A runner starts like a per-session command ([`super::exec`]'s fixed bootstrap: `env -i`, then a script read
//!   from stdin), so nothing of it is in any argv. Its script is [`runner_script`]: it checks what it needs, makes a
//!   private (0700) runtime directory, prints a *ready* marker with its boot id, then reads jobs from stdin forever.
//! - A job is a line count and that many lines of shell (env `export`s, `cd`, `exec setsid ARGV` — values quoted,
//!   read into the runner's memory, never in an argv or a file), then the command's stdin in length-prefixed frames
//!   ending with `0`. The runner starts `stdin-decoder | child`: the child reports its own pid and start time from
//!   `/proc/self/stat` (a *started* marker), then `exec setsid`s into the command, which so leads a process group
//!   and session of its own. The command writes straight to the runner's stdout and stderr: the channel carries
//!   its output at full speed. When it exits, the runner kills what is left of its group, then prints an *exit*
//!   marker with the status on stdout and an *end* marker on stderr; everything the group wrote is before them.
//! - Markers are `\x01` + a random per-runner nonce + a letter and fields + `\n`. The command never sees the nonce
//!   (an unexported variable of the runner), so it cannot forge one; the client takes them out of the streams
//!   wherever they land (small writes to a pipe are atomic, so a marker is never split by another writer).
//! - Kills (timeout, cancel) go to the command's process group through another runner, so the runner of a killed
//!   command lives on. One job at a time per runner; concurrent commands take more runners on the connection (each a
//!   session, below `MaxSessions`, kept idle in the pool once started).
//! - A runner that died (killed on the host, its connection lost) is noticed when it is taken from the idle list
//!   (an end-of-channel message is waiting) and replaced; if it dies before a job printed anything, the job is
//!   started on a fresh one.
//! - A host without what the runner needs (no `setsid`, no `/proc`, `/tmp` not writable) answers an *unsupported*
//!   marker: the connection then runs everything one session per command, as before ([`super::exec`]), and the
//!   probe says why.
//!
//! Exit statuses come from `sh`'s `$?`: a command killed by signal N reads as 128+N, which is reported as that
//! signal (a command that exits with 129..=159 on its own is reported as killed by a signal too).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use berth_core::driver::{DriverError, OutputStream};
use russh::ChannelMsg;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::pool::{IdleRunner, Pool, PoolKey, SessionChannel};
use super::target::SshTarget;
use crate::process::DEFAULT_PATH;
use crate::remote_shell::shell_quote;

/// How long a runner may take to start (the login shell's rc files run here, once).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// What a login shell may print before the runner's ready marker before berth gives up on it.
const MAX_START_NOISE: usize = 256 * 1024;
/// Stdin frames are coalesced up to this size: each frame costs the runner a `head` and a `cat`.
const MAX_FRAME: usize = 4 * 1024 * 1024;
/// How long a stdin frame waits for more input before it goes.
const FRAME_LINGER: Duration = Duration::from_millis(2);

/// The runner's shell: see the module docs. `@NONCE@` is replaced by the runner's nonce, `@DIR@` by a name for its
/// private directory.
const RUNNER_SCRIPT: &str = r#"unset berth_s
berth_k='@NONCE@'
berth_m() { printf '\001%s %s\n' "$berth_k" "$*"; }
for berth_c in setsid head cat mkdir; do
  command -v "$berth_c" >/dev/null 2>&1 || { berth_m u "the host has no $berth_c"; exit 0; }
done
[ -r /proc/self/stat ] || { berth_m u "the host has no /proc"; exit 0; }
umask 077
berth_d="${TMPDIR:-/tmp}/berth-runner-$$-@DIR@"
mkdir "$berth_d" 2>/dev/null || { berth_m u "cannot create a private directory in ${TMPDIR:-/tmp}"; exit 0; }
trap 'rm -rf "$berth_d"' EXIT
berth_b=
[ -r /proc/sys/kernel/random/boot_id ] && IFS= read -r berth_b </proc/sys/kernel/random/boot_id
exec 3<&0
berth_in() {
  while IFS= read -r berth_c; do
    [ "$berth_c" -gt 0 ] 2>/dev/null || break
    head -c "$berth_c" >"$berth_d/in"
    cat "$berth_d/in" 2>/dev/null
  done
  : >"$berth_d/in"
}
berth_child() {
  exec 3<&-
  if IFS= read -r berth_l </proc/self/stat; then
    berth_p=${berth_l%% *}
    set -- ${berth_l##*') '}
    printf '%s\n' "$berth_p" >"$berth_d/pid"
    berth_m p "$berth_p ${20}"
  fi
  berth_go
}
berth_run() {
  : >"$berth_d/pid"
  { berth_in <&3 | berth_child 2>&4 4>&-; } 4>&2 2>/dev/null
  berth_x=$?
  berth_p=
  IFS= read -r berth_p <"$berth_d/pid"
  [ -n "$berth_p" ] && kill -KILL -"$berth_p" 2>/dev/null
  berth_m x "$berth_x"
  printf '\001%s e\n' "$berth_k" >&2
}
berth_m r "$$ $berth_b"
while IFS= read -r berth_n; do
  berth_s=
  while [ "$berth_n" -gt 0 ]; do
    IFS= read -r berth_l || exit 0
    berth_s="$berth_s$berth_l
"
    berth_n=$((berth_n - 1))
  done
  eval "$berth_s"
  berth_run
done
"#;

/// The runner's script with its nonce, framed as the bootstrap reads it (a line count, then the lines).
fn runner_script(nonce: &str) -> String {
    // The directory's name is public (`ls /tmp`): another random, not the nonce.
    let script = RUNNER_SCRIPT
        .replace("@NONCE@", nonce)
        .replace("@DIR@", &new_nonce());
    format!("{}\n{script}", script.matches('\n').count())
}

/// A fresh nonce: 128 bits from the process's random hasher keys, a counter and the clock, hashed.
fn new_nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut digest = Sha256::new();
    for _ in 0..2 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        digest.update(hasher.finish().to_le_bytes());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    digest.update(now.as_nanos().to_le_bytes());
    digest.update(std::process::id().to_le_bytes());
    hex::encode(&digest.finalize()[..16])
}

/// Why a runner could not start.
#[derive(Debug)]
pub enum StartError {
    /// The host lacks what the runner needs: use one session per command.
    Unsupported(String),
    Failed(DriverError),
}

/// The job's command as it starts: its process group and its leader's start time (clock ticks since boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Started {
    pub pid: u32,
    pub start_ticks: u64,
}

/// What a job yields, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Started(Started),
    Output(OutputStream, Vec<u8>),
    /// The command exited with this `sh` status, its group is gone, and all its output has arrived.
    Done(u32),
}

/// Why a job's events stopped.
#[derive(Debug)]
pub struct Lost {
    /// Whether the job had printed anything (a started marker or output) before the runner went away.
    pub job_began: bool,
    /// Whether the connection itself is gone (not just the runner).
    pub connection_lost: bool,
    /// Whether some of a streamed stdin was taken (a job that took none can start again elsewhere).
    pub input_taken: bool,
}

/// A started runner taken from (or bound for) its connection's idle list.
pub struct Runner {
    session: SessionChannel,
    nonce: String,
    pub boot_id: String,
    marker: Vec<u8>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    events: VecDeque<Event>,
    exit: Option<u32>,
    stderr_ended: bool,
    job_began: bool,
    input_taken: bool,
    done: bool,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("session", &self.session)
            .field("boot_id", &self.boot_id)
            .finish_non_exhaustive()
    }
}

/// What one chunk of a stream held: output, and the marker lines (without `\x01` and the nonce) in order.
enum Piece {
    Output(Vec<u8>),
    Marker(String),
}

/// Takes output and complete markers off the front of `buf`, leaving only what may be the start of a marker.
fn split_markers(buf: &mut Vec<u8>, marker: &[u8], pieces: &mut Vec<Piece>) {
    loop {
        let mut cut = buf.len();
        let mut marker_at = None;
        let mut from = 0;
        while let Some(offset) = buf[from..].iter().position(|&byte| byte == 0x01) {
            let at = from + offset;
            let rest = &buf[at..];
            if rest.len() >= marker.len() {
                if rest.starts_with(marker) {
                    marker_at = Some(at);
                    cut = at;
                    break;
                }
            } else if marker.starts_with(rest) {
                // Perhaps the start of a marker: wait for more.
                cut = at;
                break;
            }
            from = at + 1;
        }
        if cut > 0 {
            pieces.push(Piece::Output(buf.drain(..cut).collect()));
        }
        if marker_at.is_none() {
            return;
        }
        let Some(end) = buf.iter().position(|&byte| byte == b'\n') else {
            return;
        };
        let line: Vec<u8> = buf.drain(..=end).collect();
        let body = String::from_utf8_lossy(&line[marker.len()..end])
            .trim()
            .to_owned();
        pieces.push(Piece::Marker(body));
    }
}

/// Reads until the runner's ready (or unsupported) marker; whatever the login shell printed before it is dropped.
/// Returns the host's boot id.
async fn await_ready(
    channel: &mut russh::Channel<russh::client::Msg>,
    marker: &[u8],
    target: &str,
) -> Result<String, StartError> {
    let ended = || {
        StartError::Failed(DriverError::failed(format!(
            "the berth runner on {target} ended before it was ready (is the login shell POSIX?)"
        )))
    };
    let mut stdout = Vec::new();
    let mut noise = 0;
    loop {
        let Some(message) = channel.wait().await else {
            return Err(ended());
        };
        match message {
            ChannelMsg::Data { data } => {
                noise += data.len();
                stdout.extend_from_slice(&data);
                let mut pieces = Vec::new();
                split_markers(&mut stdout, marker, &mut pieces);
                for piece in pieces {
                    if let Piece::Marker(body) = piece {
                        if let Some(rest) = body.strip_prefix("r ") {
                            let boot_id = rest.split_once(' ').map(|(_, boot)| boot).unwrap_or("");
                            return Ok(boot_id.trim().to_owned());
                        }
                        if let Some(why) = body.strip_prefix("u ") {
                            return Err(StartError::Unsupported(why.to_owned()));
                        }
                    }
                }
            }
            ChannelMsg::ExtendedData { data, .. } => noise += data.len(),
            ChannelMsg::Eof
            | ChannelMsg::Close
            | ChannelMsg::ExitStatus { .. }
            | ChannelMsg::ExitSignal { .. } => return Err(ended()),
            _ => {}
        }
        if noise > MAX_START_NOISE {
            return Err(StartError::Failed(DriverError::failed(format!(
                "the login shell on {target} printed too much before the berth runner started"
            ))));
        }
    }
}

/// Whether a runner starts on the host of `handle` (the probe's question): `Ok` when it does, else why not. The
/// runner is ended at once.
pub async fn check(
    handle: &russh::client::Handle<super::connect::ClientHandler>,
    target: &str,
) -> Result<(), String> {
    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(|error| format!("cannot open a session: {error}"))?;
    let nonce = new_nonce();
    let marker = format!("\x01{nonce} ").into_bytes();
    let started = async {
        channel
            .exec(true, bootstrap())
            .await
            .map_err(|error| error.to_string())?;
        channel
            .data_bytes(runner_script(&nonce).into_bytes())
            .await
            .map_err(|error| error.to_string())?;
        match tokio::time::timeout(START_TIMEOUT, await_ready(&mut channel, &marker, target)).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(StartError::Unsupported(why))) => Err(why),
            Ok(Err(StartError::Failed(error))) => Err(error.to_string()),
            Err(_) => Err(format!(
                "it did not start within {}s",
                START_TIMEOUT.as_secs()
            )),
        }
    }
    .await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
    started
}

/// Polls `future` once: its value if it is ready now.
fn poll_now<F: Future>(future: F) -> Option<F::Output> {
    let mut context = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut context) {
        Poll::Ready(value) => Some(value),
        Poll::Pending => None,
    }
}

impl Runner {
    /// Starts a runner on `session`: the bootstrap, then the runner's script, then waits for its ready marker.
    pub async fn start(session: SessionChannel) -> Result<Runner, StartError> {
        let nonce = new_nonce();
        let target = session.connection.target().to_owned();
        let failed = |message: String| StartError::Failed(DriverError::failed(message));
        let start = async {
            let lost =
                |error: russh::Error| format!("cannot start the berth runner on {target}: {error}");
            session
                .channel
                .exec(true, bootstrap())
                .await
                .map_err(lost)?;
            session
                .channel
                .data_bytes(runner_script(&nonce).into_bytes())
                .await
                .map_err(lost)?;
            Ok::<(), String>(())
        };
        if let Err(message) = start.await {
            session.close().await;
            return Err(failed(message));
        }
        let mut runner = Runner {
            session,
            marker: format!("\x01{nonce} ").into_bytes(),
            nonce,
            boot_id: String::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            events: VecDeque::new(),
            exit: None,
            stderr_ended: false,
            job_began: false,
            input_taken: false,
            done: true,
        };
        let ready = await_ready(&mut runner.session.channel, &runner.marker, &target);
        match tokio::time::timeout(START_TIMEOUT, ready).await {
            Ok(Ok(boot_id)) => {
                runner.boot_id = boot_id;
                tracing::debug!(target = %target, "remote runner ready");
                Ok(runner)
            }
            Ok(Err(error)) => {
                runner.session.close().await;
                Err(error)
            }
            Err(_) => {
                runner.session.close().await;
                Err(failed(format!(
                    "the berth runner on {target} did not start within {}s",
                    START_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// `user@host:port` of the runner's connection.
    pub fn target(&self) -> &str {
        self.session.connection.target()
    }

    pub fn connection(&self) -> &std::sync::Arc<super::pool::Connection> {
        &self.session.connection
    }

    pub fn connection_is_usable(&self) -> bool {
        self.session.connection.is_usable()
    }

    /// Sessions its connection has free besides this runner's.
    pub fn connection_sessions_free(&self) -> usize {
        self.session.connection.sessions_free()
    }

    /// Starts a job: `body` defines the shell function `berth_go` (which must end by `exec setsid …`), then the
    /// stdin frames from `input`, then the end of stdin.
    pub async fn send_job(&mut self, body: &str, input: JobInput<'_>) -> Result<(), Lost> {
        self.reset();
        let function = format!("berth_go() {{\n{body}\n}}\n");
        let mut head = format!("{}\n{function}", function.matches('\n').count()).into_bytes();
        match input {
            JobInput::Bytes(bytes) => {
                if !bytes.is_empty() {
                    head.extend_from_slice(format!("{}\n", bytes.len()).as_bytes());
                    head.extend_from_slice(&bytes);
                }
                head.extend_from_slice(b"0\n");
                self.write(head).await
            }
            JobInput::Stream(chunks) => {
                self.write(head).await?;
                let mut frame = Vec::new();
                loop {
                    let next = if frame.is_empty() {
                        chunks.recv().await
                    } else {
                        // A producer that is keeping up fills a frame; one that pauses gets what it gave so far.
                        match tokio::time::timeout(FRAME_LINGER, chunks.recv()).await {
                            Ok(next) => next,
                            Err(_) => {
                                self.write_frame(&mut frame).await?;
                                continue;
                            }
                        }
                    };
                    let Some(chunk) = next else { break };
                    self.input_taken = true;
                    frame.extend_from_slice(&chunk);
                    if frame.len() >= MAX_FRAME {
                        self.write_frame(&mut frame).await?;
                    }
                }
                if !frame.is_empty() {
                    self.write_frame(&mut frame).await?;
                }
                self.write(b"0\n".to_vec()).await
            }
        }
    }

    async fn write_frame(&mut self, frame: &mut Vec<u8>) -> Result<(), Lost> {
        let mut bytes = format!("{}\n", frame.len()).into_bytes();
        bytes.append(frame);
        self.write(bytes).await
    }

    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), Lost> {
        match self.session.channel.data_bytes(bytes).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.lost()),
        }
    }

    fn lost(&self) -> Lost {
        Lost {
            job_began: self.job_began,
            connection_lost: !self.session.connection.is_usable(),
            input_taken: self.input_taken,
        }
    }

    fn reset(&mut self) {
        self.stdout.clear();
        self.stderr.clear();
        self.events.clear();
        self.exit = None;
        self.stderr_ended = false;
        self.job_began = false;
        self.input_taken = false;
        self.done = false;
    }

    /// The job's next event. Cancel-safe: it awaits only the channel, and keeps what it parsed in `self`.
    pub async fn next_event(&mut self) -> Result<Event, Lost> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            if self.done {
                return Err(self.lost());
            }
            let Some(message) = self.session.channel.wait().await else {
                return Err(self.lost());
            };
            match message {
                ChannelMsg::Data { data } => self.take(OutputStream::Stdout, &data),
                ChannelMsg::ExtendedData { data, ext: 1 } => self.take(OutputStream::Stderr, &data),
                ChannelMsg::Eof
                | ChannelMsg::Close
                | ChannelMsg::ExitStatus { .. }
                | ChannelMsg::ExitSignal { .. } => {
                    // The runner itself ended; what it had printed is already parsed.
                    self.done = true;
                    if let Some(event) = self.events.pop_front() {
                        return Ok(event);
                    }
                    return Err(self.lost());
                }
                _ => {}
            }
        }
    }

    fn take(&mut self, stream: OutputStream, data: &[u8]) {
        let buf = match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        };
        // The common case, a chunk with no marker byte and nothing held back: no copy through the buffer.
        let mut pieces = Vec::new();
        if buf.is_empty() && !data.contains(&0x01) {
            pieces.push(Piece::Output(data.to_vec()));
        } else {
            buf.extend_from_slice(data);
            split_markers(buf, &self.marker, &mut pieces);
        }
        for piece in pieces {
            match piece {
                Piece::Output(bytes) => {
                    if !bytes.is_empty() {
                        self.job_began = true;
                        self.events.push_back(Event::Output(stream, bytes));
                    }
                }
                Piece::Marker(body) => self.marker_seen(stream, &body),
            }
        }
        if self.exit.is_some() && self.stderr_ended && !self.done {
            // Both streams ended: anything held back as a possible marker start was output after all.
            for stream in [OutputStream::Stdout, OutputStream::Stderr] {
                let held = match stream {
                    OutputStream::Stdout => std::mem::take(&mut self.stdout),
                    OutputStream::Stderr => std::mem::take(&mut self.stderr),
                };
                if !held.is_empty() {
                    self.events.push_back(Event::Output(stream, held));
                }
            }
            self.done = true;
            self.events.push_back(Event::Done(self.exit.unwrap_or(255)));
        }
    }

    fn marker_seen(&mut self, stream: OutputStream, body: &str) {
        let mut fields = body.split(' ');
        match (stream, fields.next()) {
            (OutputStream::Stdout, Some("p")) => {
                let pid = fields.next().and_then(|pid| pid.parse().ok());
                let start_ticks = fields.next().and_then(|ticks| ticks.parse().ok());
                if let Some(pid) = pid {
                    self.job_began = true;
                    self.events.push_back(Event::Started(Started {
                        pid,
                        start_ticks: start_ticks.unwrap_or(0),
                    }));
                }
            }
            (OutputStream::Stdout, Some("x")) => {
                self.exit = Some(fields.next().and_then(|s| s.parse().ok()).unwrap_or(255));
            }
            (OutputStream::Stderr, Some("e")) => self.stderr_ended = true,
            _ => tracing::debug!(marker = body, "unexpected runner marker"),
        }
    }

    /// Whether the job ran to its end (the runner is ready for the next one).
    pub fn is_between_jobs(&self) -> bool {
        self.done && self.exit.is_some() && self.stderr_ended
    }

    /// Back to the idle state the pool keeps.
    pub fn into_idle(self) -> (IdleRunner, std::sync::Arc<super::pool::Connection>) {
        let SessionChannel {
            channel,
            connection,
            permit,
        } = self.session;
        (
            IdleRunner {
                channel,
                permit,
                nonce: self.nonce,
                boot_id: self.boot_id,
            },
            connection,
        )
    }

    /// A runner from the idle list, if it is still alive: an end-of-channel message waiting means it died (killed on
    /// the host, say); output waiting means something it started still writes there, so it is retired.
    pub fn from_idle(
        idle: IdleRunner,
        connection: std::sync::Arc<super::pool::Connection>,
    ) -> Result<Runner, SessionChannel> {
        let IdleRunner {
            mut channel,
            permit,
            nonce,
            boot_id,
        } = idle;
        let mut alive = true;
        while let Some(message) = poll_now(channel.wait()) {
            match message {
                None
                | Some(
                    ChannelMsg::Eof
                    | ChannelMsg::Close
                    | ChannelMsg::ExitStatus { .. }
                    | ChannelMsg::ExitSignal { .. }
                    | ChannelMsg::Data { .. }
                    | ChannelMsg::ExtendedData { .. },
                ) => {
                    alive = false;
                    break;
                }
                Some(_) => {}
            }
        }
        let session = SessionChannel {
            channel,
            connection,
            permit,
        };
        if !alive || !session.connection.is_usable() {
            return Err(session);
        }
        Ok(Runner {
            session,
            marker: format!("\x01{nonce} ").into_bytes(),
            nonce,
            boot_id,
            stdout: Vec::new(),
            stderr: Vec::new(),
            events: VecDeque::new(),
            exit: None,
            stderr_ended: false,
            job_began: false,
            input_taken: false,
            done: true,
        })
    }

    /// Ends the runner (its session closes; its shell reads end of file and exits).
    pub async fn close(self) {
        self.session.close().await;
    }
}

/// A job's stdin.
#[derive(Debug)]
pub enum JobInput<'a> {
    Bytes(Vec<u8>),
    Stream(&'a mut mpsc::Receiver<Vec<u8>>),
}

/// The body of `berth_go` for a berth-written script: run by `/bin/sh` in its own session, in the login directory.
pub fn script_job(script: &str) -> String {
    format!("exec setsid /bin/sh -c {}", shell_quote(script))
}

/// The script that kills a command's process group, or the command itself when it has not yet left the runner's
/// group (a kill that overtook its `setsid`).
pub fn kill_script(pgid: u32) -> String {
    format!("kill -KILL -{pgid} 2>/dev/null || kill -KILL {pgid} 2>/dev/null; true")
}

/// `sh`'s status as an exit code or a signal name.
pub fn status_outcome(status: u32) -> (Option<i32>, Option<String>) {
    match status {
        129..=159 => (None, Some(signal_name(status - 128))),
        _ => (i32::try_from(status).ok(), None),
    }
}

fn signal_name(number: u32) -> String {
    const NAMES: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    usize::try_from(number)
        .ok()
        .and_then(|number| number.checked_sub(1))
        .and_then(|index| NAMES.get(index))
        .map_or_else(|| format!("SIG{number}"), |name| format!("SIG{name}"))
}

/// The string sent as the `exec` request. It must stay free of anything from the request: see the module docs.
pub(super) fn bootstrap() -> String {
    // The inner script reads N, then N lines, and evals them. `read` takes a pipe byte by byte, so nothing after
    // the preamble is consumed: it stays for the command. The pid line carries the start time (field 22 of
    // /proc/PID/stat, after the parenthesised name) and the boot id when the host has a /proc.
    let inner = "berth_t=0; berth_b=; \
                 if { IFS= read -r berth_l </proc/$$/stat; } 2>/dev/null; then set -- ${berth_l##*') '}; berth_t=${20}; fi; \
                 { IFS= read -r berth_b </proc/sys/kernel/random/boot_id; } 2>/dev/null; \
                 printf 'berth-pid %s %s %s\\n' \"$$\" \"$berth_t\" \"$berth_b\"; \
                 unset berth_t berth_b berth_l; set --; \
                 IFS= read -r berth_n || exit 125; berth_s=; \
                 while [ \"$berth_n\" -gt 0 ]; do IFS= read -r berth_l || exit 125; \
                 berth_s=\"$berth_s$berth_l\n\"; berth_n=$((berth_n - 1)); done; \
                 unset berth_n berth_l; eval \"$berth_s\"";
    format!(
        "exec env -i PATH={DEFAULT_PATH} HOME=\"$HOME\" /bin/sh -c {}",
        shell_quote(inner)
    )
}

// === impl Pool ===

// Here rather than in `pool`: the pool holds idle runners as plain data and never needs to know what a runner is.
impl Pool {
    /// A runner on a connection to `target`: an idle one (checked alive), else one started on a new session.
    /// `Ok(None)`: the host cannot have one (see [`Connection::runner_unsupported`]); use a session per command.
    pub async fn runner(&self, target: &SshTarget) -> Result<Option<Runner>, DriverError> {
        let key = PoolKey::of(target);
        let mut failures = 0;
        loop {
            for connection in self.usable(&key) {
                if connection.runner_unsupported().is_some() {
                    return Ok(None);
                }
                loop {
                    let idle = connection
                        .idle_runners
                        .lock()
                        .ok()
                        .and_then(|mut idle| idle.pop());
                    let Some(idle) = idle else { break };
                    match Runner::from_idle(idle, connection.clone()) {
                        Ok(runner) => {
                            connection.touch();
                            return Ok(Some(runner));
                        }
                        Err(dead) => {
                            tracing::debug!(target = %connection.target, "an idle runner died; replacing it");
                            tokio::spawn(dead.close());
                        }
                    }
                }
            }
            let session = self.open_session(target).await?;
            let connection = session.connection.clone();
            if connection.runner_unsupported().is_some() {
                session.close().await;
                return Ok(None);
            }
            match Runner::start(session).await {
                Ok(runner) => return Ok(Some(runner)),
                Err(StartError::Unsupported(why)) => {
                    tracing::info!(target = %connection.target, reason = %why, "no remote runner on this host: one session per command");
                    if let Ok(mut unsupported) = connection.runner_unsupported.lock() {
                        *unsupported = Some(why);
                    }
                    return Ok(None);
                }
                Err(StartError::Failed(error)) => {
                    failures += 1;
                    if failures >= 2 || connection.is_usable() {
                        return Err(error);
                    }
                    // The connection died under the start: once more, on a fresh one.
                    self.forget(target, &connection);
                }
            }
        }
    }

    /// Gives a runner that finished its job back to its connection's idle list; one mid-job is closed instead. So is
    /// one whose connection has no session free: a caller may be waiting for one, and an idle runner would keep
    /// its permit from it.
    pub fn park(&self, runner: Runner) {
        if !runner.is_between_jobs()
            || !runner.connection_is_usable()
            || runner.connection_sessions_free() == 0
        {
            tokio::spawn(runner.close());
            return;
        }
        let (idle, connection) = runner.into_idle();
        connection.touch();
        if let Ok(mut list) = connection.idle_runners.lock() {
            list.push(idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(buf: &mut Vec<u8>, marker: &[u8]) -> Vec<String> {
        let mut pieces = Vec::new();
        split_markers(buf, marker, &mut pieces);
        pieces
            .into_iter()
            .map(|piece| match piece {
                Piece::Output(bytes) => format!("out:{}", String::from_utf8_lossy(&bytes)),
                Piece::Marker(body) => format!("marker:{body}"),
            })
            .collect()
    }

    #[test]
    fn markers_are_taken_out_wherever_they_land() {
        let marker = b"\x01abcd ";
        let mut buf = b"hello\x01abcd x 0\nworld".to_vec();
        assert_eq!(
            split(&mut buf, marker),
            ["out:hello", "marker:x 0", "out:world"]
        );
        assert!(buf.is_empty());
        // A marker split across chunks is held back until it is whole; a lone \x01 is output.
        let mut buf = b"a\x01b\x01ab".to_vec();
        assert_eq!(split(&mut buf, marker), ["out:a\x01b"]);
        assert_eq!(buf, b"\x01ab");
        buf.extend_from_slice(b"cd p 42 7");
        assert_eq!(split(&mut buf, marker), Vec::<String>::new());
        buf.extend_from_slice(b"\nrest");
        assert_eq!(split(&mut buf, marker), ["marker:p 42 7", "out:rest"]);
        // Text that only looks like the start of a marker but is not is output.
        let mut buf = b"\x01abce and more".to_vec();
        assert_eq!(split(&mut buf, marker), ["out:\x01abce and more"]);
    }

    #[test]
    fn statuses_above_128_are_signals() {
        assert_eq!(status_outcome(0), (Some(0), None));
        assert_eq!(status_outcome(7), (Some(7), None));
        assert_eq!(status_outcome(137), (None, Some("SIGKILL".to_owned())));
        assert_eq!(status_outcome(143), (None, Some("SIGTERM".to_owned())));
        assert_eq!(status_outcome(200), (Some(200), None));
    }

    #[test]
    fn the_runner_script_carries_its_nonce_and_its_line_count() {
        let framed = runner_script("n0nce");
        let (count, script) = framed.split_once('\n').unwrap();
        assert_eq!(
            count.parse::<usize>().unwrap(),
            script.matches('\n').count()
        );
        assert!(script.contains("berth_k='n0nce'"));
        assert_ne!(new_nonce(), new_nonce());
        assert_eq!(new_nonce().len(), 32);
    }
}
