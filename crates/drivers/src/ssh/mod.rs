//! The SSH driver, over russh: no `ssh` binary, no key files on disk, no secrets in any argv on either host.
//!
//! - [`connect`]: TCP, host-key pinning (strict by default), key or password authentication.
//! - [`pool`]: pooled keep-alive connections per target, with a session semaphore below sshd's `MaxSessions`, and
//!   each connection's idle runners.
//! - [`runner`]: the remote runner — a long-lived POSIX `sh` loop on one session of a pooled connection that runs
//!   every command a run needs (workspace setup, sync in and back, the command, kills, cleanup), so the login shell's
//!   start-up (rc files: pyenv, nvm, conda) is paid once per runner, not once per step. Its module docs hold the
//!   design; a host without what it needs gets one session per command.
//! - [`exec`]: commands on a runner, or on their own channels; env and stdin framed over the channel, never in a
//!   command line; timeouts and cancels kill the remote process group; the command's identity reported as it
//!   starts, and killed by that identity after a crash of berth.
//! - [`workspace`]: incremental sync in (a content manifest and one tar stream), sync back with conflicts.
//! - [`forward`]: the callback bridge through a remote port forward on the remote loopback.
//! - [`probe`]: "can berth use this host?".
//! - [`target`]: where a connection goes and as whom (`SshTarget`), with the decrypted credential.
//!
//! A lease is a workspace directory on the host: `<remoteWorkspacePath>/runs/<run id>` for `per_run` (removed at
//! release), `<remoteWorkspacePath>/envs/<environment id>` for `persistent` (kept across runs, so the next sync
//! sends only what changed). The driver keeps each live lease's target (with its decrypted credential) in memory
//! only; after a restart, the server hands release and destroy the environment's config again.

pub mod connect;
pub mod exec;
pub mod forward;
pub mod pool;
pub mod probe;
pub mod runner;
pub mod target;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_core::config::{DriverConfig, SshConfig, SyncExclude, WorkspaceMode};
use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, EnvironmentDriver, ExecOutcome, ExecRequest, LeaseHandle,
    LeaseRequest, OutputSink, RealizedWorkspace, SyncReport, Tunnel, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use serde_json::{Map, Value, json};

use crate::remote_workspace::{self as workspace, SyncedIn};
use exec::SshShell;
use pool::Pool;
use target::SshTarget;

use crate::sync::{CancelLatch, HashCache, StopFlag, SyncBackLimits};

/// Lease metadata keys. Lease metadata is returned by the API: it names the host and the directory, never a secret.
const META_KEY: &str = "leaseKey";
const META_DIR: &str = "workspacePath";
const META_MODE: &str = "workspaceMode";

/// The SSH driver.
#[derive(Debug, Default)]
pub struct SshDriver {
    pool: Arc<Pool>,
    leases: Mutex<HashMap<String, Arc<LeaseState>>>,
    /// Hashes of host workspace files, so a persistent workspace's next sync reads only what changed.
    hashes: Arc<HashCache>,
}

/// A live lease: where it is and what its workspace sync recorded.
#[derive(Debug)]
struct LeaseState {
    target: SshTarget,
    dir: String,
    per_run: bool,
    exclude: SyncExclude,
    /// The environment's `syncBackMaxMb`.
    sync_back_max_mb: u64,
    synced: tokio::sync::Mutex<Option<SyncedIn>>,
    /// The run's cancel, kept past `execute` for sync-back.
    cancel: CancelLatch,
}

impl SshDriver {
    fn state(&self, lease: &LeaseHandle) -> Result<Arc<LeaseState>, DriverError> {
        let key = lease_key(lease)?;
        self.leases
            .lock()
            .ok()
            .and_then(|leases| leases.get(&key).cloned())
            .ok_or_else(|| {
                DriverError::failed("this ssh lease is not held by this server (was it restarted?)")
            })
    }

    fn register(&self, key: String, state: LeaseState) {
        if let Ok(mut leases) = self.leases.lock() {
            leases.insert(key, Arc::new(state));
        }
    }

    /// Gives a lease back: removes a per-run workspace unless `keep`; `kill_leftovers` first kills whatever still
    /// runs in the workspace (destroy: the lease's run is gone). A command the server recorded as started and not
    /// ended (`lease.process`: berth crashed under it) is killed by its identity first, wherever it runs. Uses the
    /// live state, else the config.
    async fn give_back(
        &self,
        lease: &LeaseHandle,
        keep: bool,
        config: Option<&DriverConfig>,
        kill_leftovers: bool,
    ) -> Result<(), DriverError> {
        let key = lease_key(lease)?;
        // Kept or not, the decrypted target leaves memory: a resume connects again from the config.
        let live = self
            .leases
            .lock()
            .ok()
            .and_then(|mut leases| leases.remove(&key));
        if keep && lease.process.is_none() {
            return Ok(());
        }
        let (target, dir, per_run) = match live {
            Some(state) => (state.target.clone(), state.dir.clone(), state.per_run),
            None => {
                let Some(DriverConfig::Ssh(config)) = config else {
                    return Err(DriverError::failed(
                        "cannot clean up the ssh workspace: the environment's ssh config is gone",
                    ));
                };
                let dir = lease
                    .metadata
                    .get(META_DIR)
                    .and_then(Value::as_str)
                    .ok_or_else(|| DriverError::failed("the ssh lease names no workspace"))?
                    .to_owned();
                let per_run = lease.metadata.get(META_MODE).and_then(Value::as_str)
                    == Some(WorkspaceMode::PerRun.as_str());
                // The config may have moved on since the lease (another host, another root): clean up only what
                // is certainly this lease's workspace, never a path elsewhere.
                if !names_same_place(config, lease, &dir) {
                    return Err(DriverError::failed(
                        "the environment's ssh config no longer points at this lease's host and workspace root; the old workspace is left as it is",
                    ));
                }
                (SshTarget::from_config(config), dir, per_run)
            }
        };
        let shell = SshShell {
            pool: &self.pool,
            target: &target,
        };
        let mut killed_by_identity = false;
        if let Some(process) = &lease.process
            && let Some(script) = exec::identity_kill_script(process)
        {
            let output = exec::control(&self.pool, &target, &script, None).await?;
            if !output.success() {
                return Err(DriverError::failed(format!(
                    "cannot kill the lease's command on {}: {}",
                    target.display(),
                    output.error_line()
                )));
            }
            tracing::debug!(target = %target.display(), pgid = process.pgid, "killed the lease's recorded command");
            killed_by_identity = true;
        }
        if keep {
            return Ok(());
        }
        if per_run {
            // Kills what still runs there (a command berth never recorded included), then removes it: one script.
            workspace::remove(&shell, &dir).await
        } else if (kill_leftovers || lease.process.is_some()) && !killed_by_identity {
            // No identity to go by (a host without /proc): what still runs in the workspace, as the last resort.
            workspace::kill_processes_in(&shell, &dir).await
        } else {
            Ok(())
        }
    }
}

/// Whether `config` reaches the host of `lease` as the same user, and `dir` is a workspace under its root.
fn names_same_place(config: &SshConfig, lease: &LeaseHandle, dir: &str) -> bool {
    let same = |key: &str, value: Value| lease.metadata.get(key) == Some(&value);
    let root = config.remote_workspace_path.trim_end_matches('/');
    let under_root = ["runs", "envs"].iter().any(|kind| {
        dir.strip_prefix(&format!("{root}/{kind}/"))
            .is_some_and(|name| !name.is_empty() && !name.contains('/') && name != "..")
    });
    same("host", json!(config.host))
        && same("port", json!(config.port))
        && same("username", json!(config.username))
        && under_root
}

/// What [`EnvironmentDriver::validate_config`] finds wrong with the key and the pinned host keys.
fn check_credentials(config: &SshConfig) -> berth_core::validation::ValidationErrors {
    use berth_core::config::SecretSlot;
    use secrecy::ExposeSecret;
    let mut errors = berth_core::validation::ValidationErrors::new();
    let password = match &config.password {
        Some(SecretSlot::Inline(password)) => Some(password.expose_secret()),
        _ => None,
    };
    if let Some(SecretSlot::Inline(key)) = &config.private_key {
        let pem = key.expose_secret();
        match russh::keys::decode_secret_key(pem, None) {
            Ok(_) => {}
            Err(russh::keys::Error::KeyIsEncrypted) => match password {
                None => errors.push(
                    "config.privateKey",
                    "the private key is encrypted: give its passphrase as `password`",
                ),
                Some(passphrase) => {
                    if russh::keys::decode_secret_key(pem, Some(passphrase)).is_err() {
                        errors.push(
                            "config.privateKey",
                            "the private key is encrypted and does not open with `password` as its passphrase",
                        );
                    }
                }
            },
            Err(_) => {
                // A key encrypted in a format that only says so once decrypted also lands here: try the password.
                let opens = password.is_some_and(|passphrase| {
                    russh::keys::decode_secret_key(pem, Some(passphrase)).is_ok()
                });
                if !opens {
                    errors.push(
                        "config.privateKey",
                        "the private key cannot be read: it is not a complete OpenSSH, PEM or PuTTY private key (truncated or damaged?)",
                    );
                }
            }
        }
    }
    if let Some(known_hosts) = &config.known_hosts {
        for (index, line) in known_hosts.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let parses =
                fields.len() >= 3 && russh::keys::parse_public_key_base64(fields[2]).is_ok();
            if !parses {
                errors.push(
                    "config.knownHosts",
                    format!(
                        "line {} is not a known_hosts entry (`host key-type base64-key`) with a key that parses",
                        index + 1
                    ),
                );
            }
        }
    }
    errors
}

fn ssh_config(config: &DriverConfig) -> Result<&SshConfig, DriverError> {
    match config {
        DriverConfig::Ssh(ssh) => Ok(ssh),
        _ => Err(DriverError::failed("not an ssh config")),
    }
}

fn lease_key(lease: &LeaseHandle) -> Result<String, DriverError> {
    lease
        .metadata
        .get(META_KEY)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| DriverError::failed("the lease is not an ssh lease"))
}

/// The workspace directory of a run: per run, or one per environment.
fn workspace_dir(config: &SshConfig, request: &LeaseRequest) -> String {
    let root = config.remote_workspace_path.trim_end_matches('/');
    match config.workspace_mode {
        WorkspaceMode::PerRun => format!("{root}/runs/{}", request.run_id),
        WorkspaceMode::Persistent => format!("{root}/envs/{}", request.environment_id),
    }
}

fn handle_for(config: &SshConfig, request: &LeaseRequest, dir: &str) -> LeaseHandle {
    let mut metadata = Map::new();
    metadata.insert(META_KEY.to_owned(), json!(request.run_id.to_string()));
    metadata.insert("host".to_owned(), json!(config.host));
    metadata.insert("port".to_owned(), json!(config.port));
    metadata.insert("username".to_owned(), json!(config.username));
    metadata.insert(META_DIR.to_owned(), json!(dir));
    metadata.insert(META_MODE.to_owned(), json!(config.workspace_mode.as_str()));
    LeaseHandle {
        provider: Some(Driver::Ssh.as_str().to_owned()),
        provider_lease_id: Some(lease_url(config, dir)),
        metadata,
        expires_at: None,
        process: None,
    }
}

/// The lease's id as a client reads it: `ssh://user@host:port/remote/workspace/dir` (an IPv6 host in brackets). For
/// people and logs only: the driver finds a lease by its metadata, never by parsing this.
fn lease_url(config: &SshConfig, dir: &str) -> String {
    let host = if config.host.contains(':') {
        format!("[{}]", config.host)
    } else {
        config.host.clone()
    };
    format!("ssh://{}@{host}:{}{dir}", config.username, config.port)
}

impl EnvironmentDriver for SshDriver {
    fn driver(&self) -> Driver {
        Driver::Ssh
    }

    fn probe<'a>(&'a self, config: &'a DriverConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move {
            match config {
                DriverConfig::Ssh(ssh) => probe::probe(ssh).await,
                _ => ProbeResult::failed(Driver::Ssh, "not an ssh config"),
            }
        })
    }

    /// The key must decode (with `password` as its passphrase when it is encrypted) and every `knownHosts` line must
    /// hold a key: otherwise only the first probe or run would find out. No message quotes the key.
    fn validate_config<'a>(
        &'a self,
        config: &'a DriverConfig,
    ) -> BoxFuture<'a, berth_core::validation::ValidationErrors> {
        Box::pin(async move {
            match config {
                DriverConfig::Ssh(ssh) => check_credentials(ssh),
                _ => berth_core::validation::ValidationErrors::new(),
            }
        })
    }

    /// Connects (or takes a pooled connection): a dead host or a refused key fails the run before anything starts.
    fn acquire<'a>(
        &'a self,
        config: &'a DriverConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move {
            let config = ssh_config(config)?;
            let target = SshTarget::from_config(config);
            self.pool.connection(&target).await?;
            let dir = workspace_dir(config, request);
            let handle = handle_for(config, request, &dir);
            self.register(
                request.run_id.to_string(),
                LeaseState {
                    target,
                    dir,
                    per_run: config.workspace_mode == WorkspaceMode::PerRun,
                    exclude: config.sync_exclude.clone(),
                    sync_back_max_mb: config.sync_back_limit_mb(),
                    synced: tokio::sync::Mutex::new(None),
                    cancel: CancelLatch::default(),
                },
            );
            tracing::debug!(run.id = %request.run_id, env.id = %request.environment_id, "ssh lease acquired");
            Ok(handle)
        })
    }

    /// A kept lease of a persistent workspace serves the next run of the same environment on the same host.
    fn matches_reusable_lease(&self, config: &DriverConfig, lease: &LeaseHandle) -> bool {
        let DriverConfig::Ssh(config) = config else {
            return false;
        };
        let same = |key: &str, value: Value| lease.metadata.get(key) == Some(&value);
        config.workspace_mode == WorkspaceMode::Persistent
            && same("host", json!(config.host))
            && same("port", json!(config.port))
            && same("username", json!(config.username))
            && same(META_MODE, json!(config.workspace_mode.as_str()))
    }

    fn resume<'a>(
        &'a self,
        config: &'a DriverConfig,
        lease: &'a LeaseHandle,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move {
            if let Ok(old) = lease_key(lease)
                && let Ok(mut leases) = self.leases.lock()
            {
                leases.remove(&old);
            }
            self.acquire(config, request).await.map(Some)
        })
    }

    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.give_back(lease, keep, config, false))
    }

    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.give_back(lease, false, config, true))
    }

    fn realize_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async move {
            let state = self.state(lease)?;
            let mut metadata = Map::new();
            match &request.local_path {
                Some(local) => {
                    let synced = workspace::sync_in(
                        &SshShell {
                            pool: &self.pool,
                            target: &state.target,
                        },
                        local,
                        &state.dir,
                        state.per_run,
                        &state.exclude,
                        &self.hashes,
                    )
                    .await?;
                    metadata.insert("filesSent".to_owned(), json!(synced.files_sent));
                    metadata.insert("bytesSent".to_owned(), json!(synced.bytes_sent));
                    *state.synced.lock().await = Some(synced);
                }
                None => {
                    workspace::create(
                        &SshShell {
                            pool: &self.pool,
                            target: &state.target,
                        },
                        &state.dir,
                    )
                    .await?
                }
            }
            Ok(RealizedWorkspace {
                cwd: state.dir.clone(),
                local_path: request.local_path.clone(),
                ephemeral: state.per_run,
                metadata,
            })
        })
    }

    fn execute<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
        request: ExecRequest,
        sink: &'a dyn OutputSink,
        cancel: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>> {
        Box::pin(async move {
            let state = self.state(lease)?;
            let cancel = state.cancel.hold(cancel).await;
            exec::execute(
                &self.pool,
                &state.target,
                &workspace.cwd,
                request,
                sink,
                cancel,
            )
            .await
        })
    }

    fn sync_back<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        Box::pin(async move {
            let Some(local) = &workspace.local_path else {
                return Ok(SyncReport::default());
            };
            let state = self.state(lease)?;
            let synced = state.synced.lock().await.take();
            let Some(synced) = synced else {
                return Ok(SyncReport::default());
            };
            let stop = StopFlag::default();
            let limits = SyncBackLimits::new(state.sync_back_max_mb).with_stop(stop.clone());
            let shell = SshShell {
                pool: &self.pool,
                target: &state.target,
            };
            let work =
                workspace::sync_back(&shell, &state.dir, local, &synced, &state.exclude, &limits);
            if state.cancel.has_fired() {
                // The command was cancelled: what it did still comes back (within the bounds), as for any run.
                return work.await;
            }
            // A cancel that arrives while the workspace comes back stops it; what was staged is removed.
            tokio::pin!(work);
            let cancelled = state.cancel.cancelled();
            tokio::pin!(cancelled);
            tokio::select! {
                result = &mut work => result,
                () = &mut cancelled => {
                    stop.stop();
                    work.await
                }
            }
        })
    }

    fn open_tunnel<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        local: std::net::SocketAddr,
    ) -> BoxFuture<'a, Result<Option<Tunnel>, DriverError>> {
        Box::pin(async move {
            let state = self.state(lease)?;
            forward::open(&self.pool, &state.target, local)
                .await
                .map(Some)
        })
    }
}

#[cfg(test)]
mod tests {
    use berth_core::ids::{CompanyId, EnvironmentId, RunId};

    use super::*;

    fn config(host: &str, root: &str) -> SshConfig {
        let parsed = DriverConfig::parse(
            Driver::Ssh,
            &json!({"host": host, "username": "agent", "remoteWorkspacePath": root, "password": "x"}),
            &crate::provider_registry::ProviderRegistry::new(),
        )
        .unwrap();
        match parsed {
            DriverConfig::Ssh(ssh) => ssh,
            _ => unreachable!(),
        }
    }

    #[test]
    fn cleanup_after_a_restart_touches_only_the_leases_own_workspace() {
        let original = config("build.internal", "/srv/berth");
        let request = LeaseRequest {
            company_id: CompanyId::new(),
            environment_id: EnvironmentId::new(),
            run_id: RunId::new(),
        };
        let dir = workspace_dir(&original, &request);
        let lease = handle_for(&original, &request, &dir);
        assert!(names_same_place(&original, &lease, &dir));
        // The environment moved to another host or root since: hands off.
        assert!(!names_same_place(
            &config("other.internal", "/srv/berth"),
            &lease,
            &dir
        ));
        assert!(!names_same_place(
            &config("build.internal", "/srv/other"),
            &lease,
            &dir
        ));
        // Metadata that names a path outside the root is refused whatever the config says.
        for bad in [
            "/etc",
            "/srv/berth",
            "/srv/berth/runs/",
            "/srv/berth/runs/../../etc",
            "/srv/berth/runs/a/b",
        ] {
            assert!(!names_same_place(&original, &lease, bad), "{bad}");
        }
    }

    #[test]
    fn a_lease_id_is_an_ssh_url_naming_the_remote_workspace() {
        let request = LeaseRequest {
            company_id: CompanyId::new(),
            environment_id: EnvironmentId::new(),
            run_id: RunId::new(),
        };
        let named = config("build.internal", "/srv/berth/");
        let dir = workspace_dir(&named, &request);
        let lease = handle_for(&named, &request, &dir);
        assert_eq!(
            lease.provider_lease_id.as_deref(),
            Some(
                format!(
                    "ssh://agent@build.internal:22/srv/berth/runs/{}",
                    request.run_id
                )
                .as_str()
            )
        );
        assert_eq!(lease.provider.as_deref(), Some("ssh"));
        let v6 = config("::1", "/w");
        assert_eq!(lease_url(&v6, "/w/envs/e"), "ssh://agent@[::1]:22/w/envs/e");
    }
}
