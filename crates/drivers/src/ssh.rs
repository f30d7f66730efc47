//! The SSH driver, over russh: no `ssh` binary, no key files on disk, no secrets in any argv.
//!
//! This build probes: connect within a deadline, check the host key against the pinned `knownHosts` (strict by
//! default: an unknown or changed key refuses the connection, and the summary shows the presented fingerprint so the
//! operator can pin it), authenticate with the key or password from the config (decrypted by the server at the
//! moment of use), then report OS, architecture, shell, `tar`, free disk in the workspace and round-trip latency.
//! Runs over SSH come with the pooled session driver.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_core::config::{DriverConfig, SecretSlot, SshConfig};
use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, EnvironmentDriver, ExecOutcome, ExecRequest, LeaseHandle,
    LeaseRequest, OutputSink, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use russh::ChannelMsg;
use russh::client::{self, AuthResult};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};

/// How long a probe waits for TCP and the SSH handshake before calling the host unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a probe's remote commands may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// The SSH driver.
#[derive(Debug, Default)]
pub struct SshDriver;

impl EnvironmentDriver for SshDriver {
    fn driver(&self) -> Driver {
        Driver::Ssh
    }

    fn probe<'a>(&'a self, config: &'a DriverConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move {
            match config {
                DriverConfig::Ssh(ssh) => probe(ssh).await,
                _ => ProbeResult::failed(Driver::Ssh, "not an ssh config"),
            }
        })
    }

    fn acquire<'a>(
        &'a self,
        _: &'a DriverConfig,
        _: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async { Err(unsupported()) })
    }

    fn matches_reusable_lease(&self, _: &DriverConfig, _: &LeaseHandle) -> bool {
        false
    }

    fn resume<'a>(
        &'a self,
        _: &'a DriverConfig,
        _: &'a LeaseHandle,
        _: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async { Err(unsupported()) })
    }

    fn release<'a>(
        &'a self,
        _: &'a LeaseHandle,
        _: bool,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async { Err(unsupported()) })
    }

    fn destroy<'a>(&'a self, _: &'a LeaseHandle) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async { Err(unsupported()) })
    }

    fn realize_workspace<'a>(
        &'a self,
        _: &'a LeaseHandle,
        _: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async { Err(unsupported()) })
    }

    fn execute<'a>(
        &'a self,
        _: &'a LeaseHandle,
        _: &'a RealizedWorkspace,
        _: ExecRequest,
        _: &'a dyn OutputSink,
        _: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>> {
        Box::pin(async { Err(unsupported()) })
    }

    fn sync_back<'a>(
        &'a self,
        _: &'a LeaseHandle,
        _: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        Box::pin(async { Err(unsupported()) })
    }
}

fn unsupported() -> DriverError {
    DriverError::Unsupported {
        driver: Driver::Ssh,
        operation: "run commands yet (this build probes ssh hosts)",
    }
}

/// What the host-key check saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostKeyVerdict {
    /// The presented key is pinned in `knownHosts`.
    Pinned,
    /// Not pinned, and strict checking is off.
    AcceptedUnpinned,
    /// Not pinned, strict checking on: refused.
    Unknown,
    /// `knownHosts` pins another key for this host: refused.
    Changed,
}

#[derive(Debug)]
struct HostKeyCheck {
    pinned: Vec<PublicKey>,
    host_is_listed: bool,
    strict: bool,
    seen: Arc<Mutex<Option<(HostKeyVerdict, String)>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        presented: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = presented else {
            self.record(
                HostKeyVerdict::Unknown,
                "an SSH certificate (not supported for pinning)".to_owned(),
            );
            return Ok(false);
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let verdict = if self
            .pinned
            .iter()
            .any(|pinned| pinned.key_data() == key.key_data())
        {
            HostKeyVerdict::Pinned
        } else if self.host_is_listed {
            HostKeyVerdict::Changed
        } else if self.strict {
            HostKeyVerdict::Unknown
        } else {
            HostKeyVerdict::AcceptedUnpinned
        };
        let accept = matches!(
            verdict,
            HostKeyVerdict::Pinned | HostKeyVerdict::AcceptedUnpinned
        );
        self.record(verdict, fingerprint);
        Ok(accept)
    }
}

impl HostKeyCheck {
    fn record(&self, verdict: HostKeyVerdict, fingerprint: String) {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some((verdict, fingerprint));
        }
    }
}

/// Probes an SSH host. Never errs: every failure is an `ok: false` result that says what failed.
pub async fn probe(config: &SshConfig) -> ProbeResult {
    let target = format!("{}@{}:{}", config.username, config.host, config.port);
    let (pinned, host_is_listed) = pinned_keys(
        config.known_hosts.as_deref().unwrap_or_default(),
        &config.host,
        config.port,
    );
    let seen = Arc::new(Mutex::new(None));
    let handler = HostKeyCheck {
        pinned,
        host_is_listed,
        strict: config.strict_host_key_checking,
        seen: seen.clone(),
    };
    let client_config = Arc::new(client::Config {
        inactivity_timeout: Some(Duration::from_secs(30)),
        nodelay: true,
        ..Default::default()
    });

    let started = Instant::now();
    let connected = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client::connect(client_config, (config.host.as_str(), config.port), handler),
    )
    .await;
    let verdict = seen.lock().ok().and_then(|seen| seen.clone());
    let mut session = match connected {
        Err(_) => {
            return failed(format!(
                "{target} did not answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(error)) => {
            return failed(match verdict {
                Some((HostKeyVerdict::Changed, fingerprint)) => format!(
                    "host key mismatch for {target}: it presented {fingerprint}, which is not the key pinned in knownHosts; refused"
                ),
                Some((HostKeyVerdict::Unknown, fingerprint)) => format!(
                    "unknown host key for {target}: it presented {fingerprint}; pin it in knownHosts (or turn off strictHostKeyChecking)"
                ),
                _ => format!("cannot connect to {target}: {error}"),
            });
        }
        Ok(Ok(session)) => session,
    };
    let fingerprint = verdict
        .as_ref()
        .map(|(_, fingerprint)| fingerprint.clone())
        .unwrap_or_default();

    if let Err(message) = authenticate(&mut session, config).await {
        return failed(format!("authentication refused for {target}: {message}"));
    }
    let handshake = started.elapsed();

    let script = format!(
        "uname -s; uname -m; printf '%s\\n' \"${{SHELL:-unknown}}\"; if command -v tar >/dev/null 2>&1; then echo yes; else echo no; fi; \
         mkdir -p -- {path} && df -Pk -- {path} | tail -n 1",
        path = shell_quote(&config.remote_workspace_path)
    );
    let facts = exec(&session, &script).await;
    let round_trip = {
        let timed = Instant::now();
        exec(&session, "true").await.map(|_| timed.elapsed())
    };
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
        "freeDiskBytes".to_owned(),
        free_bytes.map_or(Value::Null, |bytes| json!(bytes)),
    );
    details.insert("connectMs".to_owned(), json!(millis(handshake)));
    if let Ok(round_trip) = round_trip {
        details.insert("roundTripMs".to_owned(), json!(millis(round_trip)));
    }
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

async fn authenticate(
    session: &mut client::Handle<HostKeyCheck>,
    config: &SshConfig,
) -> Result<(), String> {
    let mut tried = false;
    if let Some(SecretSlot::Inline(pem)) = &config.private_key {
        tried = true;
        let key = russh::keys::decode_secret_key(pem.expose_secret(), None).map_err(|_| {
            "the private key cannot be read (is it an OpenSSH key without a passphrase?)".to_owned()
        })?;
        let hash = session
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        let result = session
            .authenticate_publickey(
                &config.username,
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            )
            .await
            .map_err(|error| error.to_string())?;
        if matches!(result, AuthResult::Success) {
            return Ok(());
        }
    }
    if let Some(SecretSlot::Inline(password)) = &config.password {
        tried = true;
        let result = session
            .authenticate_password(&config.username, password.expose_secret())
            .await
            .map_err(|error| error.to_string())?;
        if matches!(result, AuthResult::Success) {
            return Ok(());
        }
    }
    Err(if tried {
        "the server did not accept the credentials".to_owned()
    } else {
        "the config has no key or password".to_owned()
    })
}

/// Runs one command on its own channel; returns its exit status and stdout. Waits for the channel to close (exit
/// status can arrive before the last data) and always closes it (an unclosed channel counts against MaxSessions).
async fn exec(
    session: &client::Handle<HostKeyCheck>,
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

/// Single-quotes `text` for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The keys `known_hosts` text pins for `host:port`, and whether the host is listed at all. Entries name hosts as
/// `host` (port 22) or `[host]:port`, comma-separated; hashed entries (`|1|…`) and markers are not supported and are
/// skipped.
fn pinned_keys(known_hosts: &str, host: &str, port: u16) -> (Vec<PublicKey>, bool) {
    let wanted = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let mut keys = Vec::new();
    let mut listed = false;
    for line in known_hosts
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
    {
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(_algorithm), Some(encoded)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !hosts.split(',').any(|entry| entry == wanted) {
            continue;
        }
        listed = true;
        if let Ok(key) = russh::keys::parse_public_key_base64(encoded) {
            keys.push(key);
        }
    }
    (keys, listed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("/srv/it's here"), r"'/srv/it'\''s here'");
    }

    #[test]
    fn known_hosts_entries_match_host_and_port() {
        let key = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let text = format!(
            "# comment\n[127.0.0.1]:2222 ssh-ed25519 {key}\nexample.com,other ssh-ed25519 {key}\n"
        );
        let (keys, listed) = pinned_keys(&text, "127.0.0.1", 2222);
        assert!(listed);
        assert_eq!(keys.len(), 1);
        assert!(pinned_keys(&text, "127.0.0.1", 22).0.is_empty());
        assert!(pinned_keys(&text, "example.com", 22).1);
        assert!(!pinned_keys(&text, "nowhere", 22).1);
    }
}
