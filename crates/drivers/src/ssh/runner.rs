//! The remote runner: a long-lived POSIX `sh` loop on one session channel of a pooled connection that runs every
//! command berth needs on the host — workspace scripts, the run's command, kills, cleanup — without opening a
//! session each.
//!
//! Why: sshd starts every session through the user's login shell (`$SHELL -c …`), and a shell whose rc files do real
//! work (`pyenv init`, nvm, conda) costs that work again for every session. A runner pays it once, when it starts.
//!
//! How (the host needs only `sh`, `setsid`, `cat`, `mkdir`, `mkfifo`, `dd` with `iflag=fullblock` and a Linux
//! `/proc`):
//!
//! - A runner starts like a per-session command ([`super::exec`]'s fixed bootstrap: `env -i`, then a script read
//!   from stdin), so nothing of it is in any argv. Its script is [`runner_script`]: it checks what it needs, makes a
//!   private (0700) runtime directory with two FIFOs, prints a *ready* marker with its boot id, then reads jobs from
//!   stdin forever.
//! - A job is a line count and that many lines of shell (env `export`s, `cd`, `exec setsid ARGV` — values quoted,
//!   read into the runner's memory, never in an argv or a file), then, when the job has stdin, length-prefixed
//!   frames ending with `0`. The runner starts the command in the background (`exec setsid`, so it leads a process
//!   group and session of its own) and prints a *started* marker with its pid and start time from `/proc`. Its
//!   stdin is a pipe from the frame decoder (`dd`, straight through, never on disk), or `/dev/null` without stdin
//!   (no decoder then).
//! - **Containment.** The command never gets a descriptor of the channel: its stdout and stderr are fresh pipes
//!   (opened through the FIFOs) that a `cat` each forwards onto the channel. When it exits, the runner kills what is
//!   left of its group and prints *exited* (`c`) with the status; once both `cat`s reached end of file (nobody holds
//!   the pipes any more) it prints the *exit* (`x`) marker on stdout and an *end* marker on stderr, everything the
//!   command wrote before them. A descendant that left the group (`setsid`) and kept the output open holds a `cat`
//!   open: after `c`, the client waits for `x` only while output keeps arriving ([`STRAGGLER_QUIET`]), then ends
//!   the job and *retires* the runner — never parked, `TERM` to its group (runner and `cat`s) through sshd and its
//!   channel closed — so what the straggler writes later reaches nothing: not the next job of this connection,
//!   which may be another run's or another company's. This costs two `cat`s per job and no `/proc` scan; a scan of
//!   other processes' descriptors would miss holders the user cannot see (another uid, `hidepid`).
//! - Markers are `\x01` + a random per-runner nonce + a letter and fields + `\n`. The command never sees the nonce
//!   (an unexported variable of the runner), so it cannot forge one; the client takes them out of the streams
//!   wherever they land (small writes to a pipe are atomic, so a marker is never split by another writer).
//! - Kills (timeout, cancel) go to the command's process group through another runner, so the runner of a killed
//!   command lives on. One job at a time per runner; concurrent commands take more runners on the connection (each a
//!   session, below `MaxSessions`, kept idle in the pool once started).
//! - A runner that died (killed on the host, its connection lost) is noticed when it is taken from the idle list
//!   (an end-of-channel message is waiting) and replaced; if it dies before a job printed anything, the job is
//!   started on a fresh one.
//! - A host without what the runner needs (no `setsid`, no `/proc`, `/tmp` not writable, no FIFO) answers an *unsupported*
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
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::pool::{IdleRunner, Pool, PoolKey, SessionChannel};
use super::target::SshTarget;
use crate::process::DEFAULT_PATH;
use crate::remote_shell::shell_quote;

/// How long a runner may take to start (the login shell's rc files run here, once).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// What a login shell may print before the runner's ready marker before berth gives up on it.
const MAX_START_NOISE: usize = 256 * 1024;
/// Stdin frames are coalesced up to this size (and larger stdin split): each frame costs the runner a `dd`, whose
/// block is the frame.
const MAX_FRAME: usize = 4 * 1024 * 1024;
/// How long a stdin frame waits for more input before it goes.
const FRAME_LINGER: Duration = Duration::from_millis(2);
/// After the command exited (`c`), how long its output may stay quiet without reaching its end (`x`) before the
/// runner is retired: a process that left the command's group still holds the output open. The command's own last
/// output is at most a pipe's worth behind `c`, so it arrives well within this.
const STRAGGLER_QUIET: Duration = Duration::from_millis(300);
/// After the command exited, how long output may keep coming before the runner is retired all the same.
const STRAGGLER_LIMIT: Duration = Duration::from_secs(3);

/// The runner's shell: see the module docs. `@NONCE@` is replaced by the runner's nonce, `@DIR@` by a name for its
/// private directory.
///
/// Per job (`berth_run`): the two FIFOs are opened without blocking (read-write first, so the read-only and
/// write-only opens that follow find the other side) into fresh pipes; the command starts first (its output waits
/// in the pipes meanwhile), then a `cat` drains each pipe onto the channel; the command gets only their write ends (and its stdin: the decoder's pipe, or `/dev/null` when the job has none),
/// never a descriptor of the channel. When it exits its group is killed and `c` is printed; the `cat`s end when
/// nobody holds the write ends any more, and only then come `x` and `e`. A process that left the group
/// (`setsid`) and kept its output open holds a `cat` open: the client sees `c` without `x`, retires the runner, and
/// the straggler's writes never reach the framing stream of another job. A FIFO is only reopened after its `cat`
/// saw end of file, so no writer from an earlier job is left on it. A FIFO gone (a `/tmp` cleaner) ends the runner
/// before the job starts (the job goes to a fresh one): `<>` would create a regular file in its place.
///
/// At start, a runner removes this user's runner directories whose runner is dead (killed with `KILL`, which no
/// trap sees): a directory is named after its runner's pid, and only a live runner keeps one.
///
/// The decoder reads each stdin frame with one `dd` block (`iflag=fullblock`): the whole frame is read before any
/// of it is written, so a command that stopped reading (`dd` dies of `SIGPIPE`) cannot leave part of a frame on the
/// channel. Nothing of stdin touches the disk.
const RUNNER_SCRIPT: &str = r#"unset berth_s
berth_k='@NONCE@'
berth_m() { printf '\001%s %s\n' "$berth_k" "$*"; }
for berth_c in setsid cat mkdir mkfifo dd; do
  command -v "$berth_c" >/dev/null 2>&1 || { berth_m u "the host has no $berth_c"; exit 0; }
done
[ -r /proc/self/stat ] || { berth_m u "the host has no /proc"; exit 0; }
[ "$(printf ab | dd bs=1 count=1 iflag=fullblock 2>/dev/null)" = a ] || { berth_m u "the host's dd has no iflag=fullblock"; exit 0; }
umask 077
for berth_o in "${TMPDIR:-/tmp}"/berth-runner-*; do
  [ -d "$berth_o" ] && [ -O "$berth_o" ] || continue
  berth_p=${berth_o##*/berth-runner-}
  berth_p=${berth_p%%-*}
  case $berth_p in ''|*[!0-9]*) continue ;; esac
  kill -0 "$berth_p" 2>/dev/null || rm -rf "$berth_o"
done
berth_d="${TMPDIR:-/tmp}/berth-runner-$$-@DIR@"
mkdir "$berth_d" 2>/dev/null || { berth_m u "cannot create a private directory in ${TMPDIR:-/tmp}"; exit 0; }
trap 'rm -rf "$berth_d"' EXIT
trap 'exit 143' TERM
trap 'exit 129' HUP
mkfifo "$berth_d/o" "$berth_d/e" 2>/dev/null && true 5<>"$berth_d/o" 6<"$berth_d/o" 2>/dev/null ||
  { berth_m u "cannot use a FIFO in ${TMPDIR:-/tmp}"; exit 0; }
hash setsid cat dd 2>/dev/null
berth_b=
[ -r /proc/sys/kernel/random/boot_id ] && IFS= read -r berth_b </proc/sys/kernel/random/boot_id
exec 3<&0
berth_in() {
  while IFS= read -r berth_f; do
    [ "$berth_f" -gt 0 ] 2>/dev/null || break
    dd bs="$berth_f" count=1 iflag=fullblock 2>/dev/null
  done
}
berth_run() {
  [ -p "$berth_d/o" ] && [ -p "$berth_d/e" ] || exit 1
  exec 5<>"$berth_d/o" 6<"$berth_d/o" 7>"$berth_d/o" 5>&- 5<>"$berth_d/e" 8<"$berth_d/e" 9>"$berth_d/e" 5>&-
  if [ -n "$berth_i" ]; then
    berth_in <&3 2>/dev/null 3<&- 6<&- 7>&- 8<&- 9>&- | berth_go >&7 2>&9 3<&- 6<&- 7>&- 8<&- 9>&- &
  else
    berth_go </dev/null >&7 2>&9 3<&- 6<&- 7>&- 8<&- 9>&- &
  fi
  berth_c=$!
  exec 7>&- 9>&-
  cat <&6 2>/dev/null 3<&- 6<&- 8<&- &
  berth_o=$!
  cat <&8 >&2 2>/dev/null 3<&- 6<&- 8<&- &
  berth_e=$!
  exec 6<&- 8<&-
  berth_t=0
  IFS= read -r berth_l </proc/"$berth_c"/stat && set -- ${berth_l##*') '} && berth_t=${20}
  berth_m p "$berth_c $berth_t"
  wait "$berth_c"
  berth_x=$?
  kill -KILL -"$berth_c" 2>/dev/null
  berth_m c "$berth_x"
  wait "$berth_o"
  wait "$berth_e"
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
  berth_i=
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
    /// Output that came before the started marker (the runner prints it while its `cat`s may already forward
    /// output): held so the command's identity always reaches the sink first.
    early_output: Vec<Event>,
    started: bool,
    /// The command's status from the `c` marker (it exited, its group is gone) and when that came.
    exited: Option<(u32, tokio::time::Instant)>,
    /// When output last arrived after `c`.
    quiet_since: Option<tokio::time::Instant>,
    exit: Option<u32>,
    stderr_ended: bool,
    job_began: bool,
    input_taken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Something the command left behind held its output past its end: never give this runner another job.
    retired: bool,
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
    /// A runner on `session` (whose script runs with `nonce`) with no job under way.
    fn between_jobs(session: SessionChannel, nonce: String, boot_id: String) -> Runner {
        Runner {
            session,
            marker: format!("\x01{nonce} ").into_bytes(),
            nonce,
            boot_id,
            stdout: Vec::new(),
            stderr: Vec::new(),
            events: VecDeque::new(),
            early_output: Vec::new(),
            started: false,
            exited: None,
            quiet_since: None,
            exit: None,
            stderr_ended: false,
            job_began: false,
            input_taken: Default::default(),
            retired: false,
            done: true,
        }
    }

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
        let mut runner = Runner::between_jobs(session, nonce, String::new());
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

    /// Starts a job: `body` defines the shell function `berth_go` (which must end by `exec setsid …`). Its stdin, if
    /// it has any, is the returned [`JobFeed`]: run it alongside reading the job's events ([`feeding`]), since a
    /// command that reads its stdin slowly (or never, until it exits) holds the feed back — stdin goes straight
    /// into the command's pipe, never spooled. Without one the command's stdin is `/dev/null`, and the runner
    /// starts no decoder.
    pub async fn send_job<'a>(
        &mut self,
        body: &str,
        input: JobInput<'a>,
    ) -> Result<Option<JobFeed<'a>>, Lost> {
        self.reset();
        let source = match input {
            JobInput::Bytes(bytes) if bytes.is_empty() => None,
            JobInput::Bytes(bytes) => Some(FeedSource::Bytes(bytes)),
            // A producer that already finished without a chunk gives the command no stdin at all.
            JobInput::Stream(chunks) => match chunks.try_recv() {
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => Some(FeedSource::Stream {
                    first: None,
                    chunks,
                }),
                Ok(first) => Some(FeedSource::Stream {
                    first: Some(first),
                    chunks,
                }),
            },
        };
        if matches!(source, Some(FeedSource::Stream { first: Some(_), .. })) {
            self.input_taken
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let function = format!(
            "{}berth_go() {{\n{body}\n}}\n",
            if source.is_some() { "berth_i=1\n" } else { "" }
        );
        let head = format!("{}\n{function}", function.matches('\n').count()).into_bytes();
        if self.session.channel.data_bytes(head).await.is_err() {
            return Err(self.lost());
        }
        Ok(source.map(|source| JobFeed {
            writer: Box::pin(self.session.channel.make_writer()),
            source,
            taken: self.input_taken.clone(),
        }))
    }

    fn lost(&self) -> Lost {
        Lost {
            job_began: self.job_began,
            connection_lost: !self.session.connection.is_usable(),
            input_taken: self.input_taken.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn reset(&mut self) {
        self.stdout.clear();
        self.stderr.clear();
        self.events.clear();
        self.early_output.clear();
        self.started = false;
        self.exited = None;
        self.quiet_since = None;
        self.exit = None;
        self.stderr_ended = false;
        self.job_began = false;
        self.input_taken = Default::default();
        self.done = false;
    }

    /// When the runner is to be retired unless the job's end arrives first: the command exited, and its output has
    /// been quiet (or kept coming) too long since.
    fn straggler_deadline(&self) -> Option<tokio::time::Instant> {
        let (_, exited_at) = self.exited?;
        let quiet_since = self.quiet_since.unwrap_or(exited_at);
        Some((quiet_since + STRAGGLER_QUIET).min(exited_at + STRAGGLER_LIMIT))
    }

    /// Ends the job without its end markers: something the command left behind (outside its group) holds its
    /// output. The runner is never parked again, and what its `cat`s forward later goes nowhere: its channel is
    /// closed, and with it the pipe the straggler writes into.
    fn retire(&mut self) {
        let status = self.exited.map_or(255, |(status, _)| status);
        tracing::warn!(
            target = %self.session.connection.target(),
            "a process the remote command left behind in a session of its own still holds its output: retiring the runner"
        );
        self.retired = true;
        self.finish(status);
    }

    /// The job's end: what was held back as a possible marker start was output after all.
    fn finish(&mut self, status: u32) {
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let held = match stream {
                OutputStream::Stdout => std::mem::take(&mut self.stdout),
                OutputStream::Stderr => std::mem::take(&mut self.stderr),
            };
            if !held.is_empty() {
                self.output_event(stream, held);
            }
        }
        self.events.extend(self.early_output.drain(..));
        self.done = true;
        self.events.push_back(Event::Done(status));
    }

    fn output_event(&mut self, stream: OutputStream, bytes: Vec<u8>) {
        self.job_began = true;
        let event = Event::Output(stream, bytes);
        if self.started {
            self.events.push_back(event);
        } else {
            self.early_output.push(event);
        }
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
            let message = match self.straggler_deadline() {
                None => self.session.channel.wait().await,
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, self.session.channel.wait()).await {
                        Ok(message) => message,
                        Err(_) => {
                            self.retire();
                            continue;
                        }
                    }
                }
            };
            let Some(message) = message else {
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
                        if self.exited.is_some() {
                            self.quiet_since = Some(tokio::time::Instant::now());
                        }
                        self.output_event(stream, bytes);
                    }
                }
                Piece::Marker(body) => self.marker_seen(stream, &body),
            }
        }
        if let Some(status) = self.exit
            && self.stderr_ended
            && !self.done
        {
            // Both streams ended.
            self.finish(status);
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
                    self.started = true;
                    self.events.push_back(Event::Started(Started {
                        pid,
                        start_ticks: start_ticks.unwrap_or(0),
                    }));
                    self.events.extend(self.early_output.drain(..));
                }
            }
            (OutputStream::Stdout, Some("c")) => {
                let status = fields.next().and_then(|s| s.parse().ok()).unwrap_or(255);
                self.exited = Some((status, tokio::time::Instant::now()));
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
        self.done && self.exit.is_some() && self.stderr_ended && !self.retired
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
        Ok(Runner::between_jobs(session, nonce, boot_id))
    }

    /// Ends the runner: `TERM` to its process group through sshd (the runner and its `cat`s; a command is in a
    /// session of its own), so a runner waiting on a straggler's output does not linger; then its session closes
    /// (a runner between jobs reads end of file and exits anyway). An sshd that refuses signals just closes.
    pub async fn close(self) {
        if !self.is_between_jobs() {
            let _ = self.session.channel.signal(russh::Sig::TERM).await;
        }
        self.session.close().await;
    }
}

/// A job's stdin.
#[derive(Debug)]
pub enum JobInput<'a> {
    Bytes(Vec<u8>),
    Stream(&'a mut mpsc::Receiver<Vec<u8>>),
}

enum FeedSource<'a> {
    Bytes(Vec<u8>),
    Stream {
        first: Option<Vec<u8>>,
        chunks: &'a mut mpsc::Receiver<Vec<u8>>,
    },
}

/// A started job's stdin on its way: length-prefixed frames of at most [`MAX_FRAME`], then `0`, written through a
/// writer of its own on the runner's channel (so the job's events are read meanwhile).
pub struct JobFeed<'a> {
    writer: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    source: FeedSource<'a>,
    taken: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for JobFeed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobFeed").finish_non_exhaustive()
    }
}

impl JobFeed<'_> {
    /// Writes every frame and the end of stdin. An error means the channel is gone (the job's events say so).
    pub async fn run(mut self) -> std::io::Result<()> {
        match std::mem::replace(&mut self.source, FeedSource::Bytes(Vec::new())) {
            FeedSource::Bytes(bytes) => {
                for frame in bytes.chunks(MAX_FRAME) {
                    self.write_frame(frame).await?;
                }
            }
            FeedSource::Stream { first, chunks } => {
                let mut frame = first.unwrap_or_default();
                loop {
                    let next = if frame.is_empty() {
                        chunks.recv().await
                    } else {
                        // A producer that is keeping up fills a frame; one that pauses gets what it gave so far.
                        match tokio::time::timeout(FRAME_LINGER, chunks.recv()).await {
                            Ok(next) => next,
                            Err(_) => {
                                self.write_frame(&frame).await?;
                                frame.clear();
                                continue;
                            }
                        }
                    };
                    let Some(chunk) = next else { break };
                    self.taken.store(true, std::sync::atomic::Ordering::Relaxed);
                    frame.extend_from_slice(&chunk);
                    if frame.len() >= MAX_FRAME {
                        self.write_frame(&frame).await?;
                        frame.clear();
                    }
                }
                if !frame.is_empty() {
                    self.write_frame(&frame).await?;
                }
            }
        }
        self.writer.write_all(b"0\n").await
    }

    async fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.writer
            .write_all(format!("{}\n", frame.len()).as_bytes())
            .await?;
        self.writer.write_all(frame).await
    }
}

/// Runs `work` (reading a job's events) while `feed` writes the job's stdin; `work`'s end is the job's. A feed
/// that fails (the channel went away) leaves `work` to find out.
pub async fn feeding<T>(feed: Option<JobFeed<'_>>, work: impl Future<Output = T>) -> T {
    let Some(feed) = feed else {
        return work.await;
    };
    let feed = feed.run();
    tokio::pin!(feed);
    tokio::pin!(work);
    let mut fed = false;
    loop {
        tokio::select! {
            biased;
            value = &mut work => return value,
            _ = &mut feed, if !fed => fed = true,
        }
    }
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

    /// The runner's script under this host's `/bin/sh`, fed and read directly (no sshd): the shell half of the
    /// protocol.
    struct LocalRunner {
        child: std::process::Child,
        stdin: std::process::ChildStdin,
        stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl LocalRunner {
        fn start() -> LocalRunner {
            use std::io::Read;
            use std::process::{Command, Stdio};
            let script = RUNNER_SCRIPT
                .replace("@NONCE@", "NONCE")
                .replace("@DIR@", "TESTDIR");
            let mut child = Command::new("/bin/sh")
                .args(["-c", &script])
                .env_clear()
                .env("PATH", DEFAULT_PATH)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let collect = |mut from: Box<dyn Read + Send>| {
                let into = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
                let sink = into.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
                into
            };
            let stdout = collect(Box::new(child.stdout.take().unwrap()));
            let stderr = collect(Box::new(child.stderr.take().unwrap()));
            let stdin = child.stdin.take().unwrap();
            let runner = LocalRunner {
                child,
                stdin,
                stdout,
                stderr,
            };
            assert!(runner.wait_for(b"\x01NONCE r ", Duration::from_secs(10)));
            runner.stdout.lock().unwrap().clear();
            runner
        }

        fn job(&mut self, body: &str, stdin: Option<&[u8]>) {
            use std::io::Write;
            self.stdout.lock().unwrap().clear();
            self.stderr.lock().unwrap().clear();
            let function = format!(
                "{}berth_go() {{\n{body}\n}}\n",
                if stdin.is_some() { "berth_i=1\n" } else { "" }
            );
            let mut bytes = format!("{}\n{function}", function.matches('\n').count()).into_bytes();
            if let Some(stdin) = stdin {
                for frame in stdin.chunks(1 << 20) {
                    bytes.extend_from_slice(format!("{}\n", frame.len()).as_bytes());
                    bytes.extend_from_slice(frame);
                }
                bytes.extend_from_slice(b"0\n");
            }
            self.stdin.write_all(&bytes).unwrap();
        }

        /// Whether stdout shows `needle` within `limit`.
        fn wait_for(&self, needle: &[u8], limit: Duration) -> bool {
            let deadline = std::time::Instant::now() + limit;
            loop {
                let stdout = self.stdout.lock().unwrap().clone();
                if stdout.windows(needle.len()).any(|window| window == needle) {
                    return true;
                }
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// The job's stdout once it ended, its markers taken out.
        fn output(&self) -> String {
            assert!(self.wait_for(b"\x01NONCE x ", Duration::from_secs(20)));
            let mut buf = self.stdout.lock().unwrap().clone();
            let mut pieces = Vec::new();
            split_markers(&mut buf, b"\x01NONCE ", &mut pieces);
            pieces
                .into_iter()
                .filter_map(|piece| match piece {
                    Piece::Output(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
                    Piece::Marker(_) => None,
                })
                .collect()
        }
    }

    impl Drop for LocalRunner {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn a_job_ends_only_when_nothing_holds_its_output_and_a_straggler_shows_as_exited_without_an_end()
     {
        let mut runner = LocalRunner::start();
        runner.job("exec setsid sh -c 'echo out; echo err >&2; exit 3'", None);
        assert_eq!(runner.output(), "out\n");
        assert!(runner.wait_for(b"\x01NONCE c 3\n", Duration::ZERO));
        assert!(String::from_utf8_lossy(&runner.stderr.lock().unwrap()).starts_with("err\n"));

        // A descendant that left the group holds the output: `c` comes, `x` waits for it.
        let up = std::env::temp_dir().join(format!("berth-runner-test-{}", new_nonce()));
        let up = up.display();
        runner.job(
            &format!(
                "exec setsid sh -c \"setsid sh -c 'touch {up}; sleep 1; echo late' & while [ ! -e {up} ]; do sleep 0.01; done; echo first\""
            ),
            None,
        );
        assert!(runner.wait_for(b"\x01NONCE c 0\n", Duration::from_secs(10)));
        assert!(!runner.wait_for(b"\x01NONCE x ", Duration::from_millis(500)));
        assert_eq!(runner.output(), "first\nlate\n");
        let _ = std::fs::remove_file(up.to_string());
    }

    #[test]
    fn a_starting_runner_removes_the_directories_of_dead_runners_and_only_those() {
        // A pid that is surely dead: a child that was reaped.
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = exited.id();
        exited.wait().unwrap();
        let dead = format!("/tmp/berth-runner-{dead_pid}-{}", new_nonce());
        let live = format!("/tmp/berth-runner-{}-{}", std::process::id(), new_nonce());
        let not_a_runners = format!("/tmp/berth-runner-test-{}", new_nonce());
        for dir in [&dead, &live, &not_a_runners] {
            std::fs::create_dir(dir).unwrap();
        }
        let runner = LocalRunner::start();
        assert!(
            !std::path::Path::new(&dead).exists(),
            "a dead runner's directory was kept"
        );
        assert!(
            std::path::Path::new(&live).exists(),
            "a live runner's directory was removed"
        );
        assert!(std::path::Path::new(&not_a_runners).exists());
        drop(runner);
        for dir in [&live, &not_a_runners] {
            std::fs::remove_dir(dir).unwrap();
        }
    }

    #[test]
    fn stdin_goes_straight_to_the_command_and_what_it_leaves_unread_never_reaches_the_next_job() {
        use std::os::unix::fs::FileTypeExt;
        let mut runner = LocalRunner::start();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        runner.job("exec setsid wc -c", Some(&big));
        let output = runner.output();
        assert!(output.starts_with("3000000\n"), "{output}");
        runner.job("exec setsid head -c 5", Some(&big));
        assert_eq!(runner.output().as_bytes(), &big[..5]);
        runner.job("exec setsid sh -c 'sleep 0.2; echo ignored'", Some(&big));
        assert_eq!(runner.output(), "ignored\n");
        runner.job("exec setsid cat", Some(b"0\n3\nabc"));
        assert_eq!(runner.output(), "0\n3\nabc");
        runner.job("exec setsid cat", None);
        assert_eq!(runner.output(), "");
        // The private directory holds the two FIFOs, nothing else.
        let dir = format!("/tmp/berth-runner-{}-TESTDIR", runner.child.id());
        let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(entries.len(), 2);
        assert!(
            entries
                .iter()
                .all(|entry| entry.file_type().unwrap().is_fifo())
        );
    }
}
