//! Probing an SSH host: connect within the deadline, check the host key against the pinned `knownHosts` (strict by
//! default: an unknown or changed key refuses the connection, and the summary shows the presented fingerprint so the
//! operator can pin it), authenticate with the key or password the server decrypted for this call, then report OS,
//! architecture, shell, `tar`, free disk in the workspace, the workspace path as configured and as the host
//! resolves it (`remoteWorkspacePath`, `remoteWorkingDirectory`), the login directory, round-trip latency, and
//! whether a remote runner starts there (`runner`: without one, every command pays the login shell's start-up). A
//! probe opens a connection of its own (not a pooled one): it answers "can berth connect now?".

use std::time::{Duration, Instant};

use berth_core::config::SshConfig;
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use russh::ChannelMsg;
use russh::client;
use serde_json::{Map, Value, json};

use super::connect::{self, ClientHandler, HostKeyVerdict};
use super::exec::shell_quote;
use super::runner;
use super::target::SshTarget;

/// How long a probe's remote commands may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// Probes an SSH host. Never errs: every failure is an `ok: false` result that says what failed.
pub async fn probe(config: &SshConfig) -> ProbeResult {
    let ssh = SshTarget::from_config(config);
    let target = ssh.display();
    let started = Instant::now();
    let connected = match connect::connect(&ssh).await {
        Ok(connected) => connected,
        Err(error) => return failed(error.message().to_owned()),
    };
    let verdict = connected.verdict.clone();
    let session = connected.handle;
    let fingerprint = verdict
        .as_ref()
        .map(|(_, fingerprint)| fingerprint.clone())
        .unwrap_or_default();
    let handshake = started.elapsed();

    // Lines: OS, arch, shell, tar, the workspace's `df` line, then the login directory and the workspace path with
    // every symlink resolved (where commands really work), both optional.
    let script = format!(
        "berth_login_dir=$(pwd); uname -s; uname -m; printf '%s\\n' \"${{SHELL:-unknown}}\"; \
         if command -v tar >/dev/null 2>&1; then echo yes; else echo no; fi; \
         mkdir -p -- {path} && df -Pk -- {path} | tail -n 1 && printf '%s\\n' \"$berth_login_dir\" && cd -- {path} && pwd -P",
        path = shell_quote(&config.remote_workspace_path)
    );
    let facts = exec(&session, &script).await;
    let round_trip = {
        let timed = Instant::now();
        exec(&session, "true").await.map(|_| timed.elapsed())
    };
    let runner = runner::check(&session, &target).await;
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;

    let (status, output) = match facts {
        Ok(done) => done,
        Err(message) => {
            return failed(format!(
                "connected to {target}, but the probe command failed: {message}"
            ));
        }
    };
    let lines: Vec<&str> = output.lines().collect();
    if status != Some(0) || lines.len() < 5 {
        return failed(format!(
            "connected to {target}, but cannot prepare the workspace {} (exit {})",
            config.remote_workspace_path,
            status.map_or_else(|| "unknown".to_owned(), |code| code.to_string())
        ));
    }
    let free_bytes = lines[4]
        .split_whitespace()
        .nth(3)
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024);
    let mut details = Map::new();
    details.insert("host".to_owned(), json!(config.host));
    details.insert("port".to_owned(), json!(config.port));
    details.insert("username".to_owned(), json!(config.username));
    details.insert("hostKeyFingerprint".to_owned(), json!(fingerprint));
    details.insert(
        "hostKeyPinned".to_owned(),
        json!(matches!(verdict, Some((HostKeyVerdict::Pinned, _)))),
    );
    details.insert("os".to_owned(), json!(lines[0]));
    details.insert("arch".to_owned(), json!(lines[1]));
    details.insert("shell".to_owned(), json!(lines[2]));
    details.insert("tar".to_owned(), json!(lines[3] == "yes"));
    details.insert("workspace".to_owned(), json!(config.remote_workspace_path));
    details.insert(
        "remoteWorkspacePath".to_owned(),
        json!(config.remote_workspace_path),
    );
    details.insert(
        "workspaceMode".to_owned(),
        json!(config.workspace_mode.as_str()),
    );
    // Where runs work: `remoteWorkspacePath` as the host resolves it (a symlinked root shows its target).
    details.insert(
        "remoteWorkingDirectory".to_owned(),
        lines.get(6).map_or(Value::Null, |dir| json!(dir)),
    );
    // Where a login session starts (usually the user's home): what the user sees in an interactive `ssh`.
    details.insert(
        "loginDirectory".to_owned(),
        lines.get(5).map_or(Value::Null, |dir| json!(dir)),
    );
    details.insert(
        "freeDiskBytes".to_owned(),
        free_bytes.map_or(Value::Null, |bytes| json!(bytes)),
    );
    details.insert("connectMs".to_owned(), json!(millis(handshake)));
    if let Ok(round_trip) = round_trip {
        details.insert("roundTripMs".to_owned(), json!(millis(round_trip)));
    }
    // Without a runner every command pays the login shell's start-up: say so, and why.
    details.insert(
        "runner".to_owned(),
        json!(match &runner {
            Ok(()) => "ready".to_owned(),
            Err(why) => format!("unavailable: {why}; one session per command"),
        }),
    );
    let summary = format!(
        "{target} ready: {} {}, {} free in {}",
        lines[0],
        lines[1],
        free_bytes.map_or_else(
            || "unknown space".to_owned(),
            |bytes| format!("{:.1} GiB", bytes as f64 / f64::from(1 << 30))
        ),
        config.remote_workspace_path
    );
    ProbeResult::ok(Driver::Ssh, summary, details)
}

fn failed(summary: String) -> ProbeResult {
    ProbeResult::failed(Driver::Ssh, summary)
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

/// Runs one command on its own channel; returns its exit status and stdout. Waits for the channel to close (exit
/// status can arrive before the last data) and always closes it (an unclosed channel counts against MaxSessions).
async fn exec(
    session: &client::Handle<ClientHandler>,
    command: &str,
) -> Result<(Option<u32>, String), String> {
    let run = async {
        let mut channel = session
            .channel_open_session()
            .await
            .map_err(|error| error.to_string())?;
        channel
            .exec(true, command)
            .await
            .map_err(|error| error.to_string())?;
        let mut stdout = Vec::new();
        let mut status = None;
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = channel.close().await;
        Ok((status, String::from_utf8_lossy(&stdout).into_owned()))
    };
    tokio::time::timeout(COMMAND_TIMEOUT, run)
        .await
        .map_err(|_| "timed out".to_owned())?
}
