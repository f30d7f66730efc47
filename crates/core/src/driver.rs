//! The driver contract: what every environment driver (local, ssh, sandbox, plugin) does for a run.
//!
//! A run goes: [`EnvironmentDriver::acquire`] (or [`resume`](EnvironmentDriver::resume) a kept lease) →
//! [`realize_workspace`](EnvironmentDriver::realize_workspace) → [`execute`](EnvironmentDriver::execute), streaming
//! output into an [`OutputSink`] → [`sync_back`](EnvironmentDriver::sync_back) →
//! [`release`](EnvironmentDriver::release). Drivers are chosen at run time, so the trait is object safe and its async
//! methods return [`BoxFuture`]s.
//!
//! Architecture invariant: drivers never see the database. They get typed configs with secrets resolved, and return
//! typed results; the server persists them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::ErrorKind;
use crate::config::DriverConfig;
use crate::environment::Driver;
pub use crate::future::BoxFuture;
use crate::ids::{CompanyId, EnvironmentId, RunId};
use crate::probe::ProbeResult;
use crate::time::Timestamp;

/// What a run asks of the environment when it takes a lease.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    /// Whose environment it is: a plugin's calls carry it.
    pub company_id: CompanyId,
    pub environment_id: EnvironmentId,
    pub run_id: RunId,
}

/// A lease as a driver sees it: which provider resource it names and what the driver noted about it. The server
/// stores it on the lease row; `metadata` must never hold a secret.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseHandle {
    pub provider: Option<String>,
    pub provider_lease_id: Option<String>,
    pub metadata: Map<String, Value>,
    pub expires_at: Option<Timestamp>,
    /// The command running on the lease when it was last recorded (see [`OutputSink::started`]): what cleanup after
    /// a crash kills, and nothing else. Stored with the lease, never shown by the API.
    pub process: Option<ProcessIdentity>,
}

/// Who a started command is, recorded before it can do anything so that cleanup after a crash of berth kills exactly
/// its processes — wherever they ran, never a process that later got a recycled pid.
///
/// A command runs as the leader of its own process group. The kernel never hands out a pid that is still some
/// group's id, so while any process of the group lives, `pgid` names this group; `boot_id` and `start_ticks` tell it
/// from a later group that reused the number after the whole group had gone.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessIdentity {
    /// The process group (the leader's pid), on the host the command ran on.
    pub pgid: u32,
    /// The session the group belongs to: members left behind by a dead leader still carry it.
    pub session_id: u32,
    /// The leader's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_ticks: u64,
    /// `/proc/sys/kernel/random/boot_id` of that host: after a reboot no recorded process can still run.
    pub boot_id: String,
    /// The cgroup the command was placed in, when the driver made one for it: killing it kills every process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// Where the run's files come from.
#[derive(Clone, Debug)]
pub struct WorkspaceRequest {
    pub run_id: RunId,
    /// A directory on the berth host to run in (local) or to copy in and back (remote drivers). `None`: an empty,
    /// run-private workspace.
    pub local_path: Option<PathBuf>,
}

/// A workspace ready for commands.
#[derive(Clone, Debug, PartialEq)]
pub struct RealizedWorkspace {
    /// The working directory inside the environment.
    pub cwd: String,
    /// The host directory synced in, if any; sync-back writes here.
    pub local_path: Option<PathBuf>,
    /// Whether the driver created the workspace for this run (and removes it at release).
    pub ephemeral: bool,
    /// Driver notes (e.g. the content manifest taken at sync-in). Never a secret.
    pub metadata: Map<String, Value>,
}

/// What sync-back did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub files_written: u64,
    pub files_deleted: u64,
    pub bytes_written: u64,
    /// Paths that changed on both sides during the run: the host's version was kept (and the environment's written
    /// beside it, where the driver says so).
    pub conflicts: Vec<String>,
    /// What the environment sent that was not brought back, and why.
    pub skipped: Vec<SkippedEntry>,
}

/// An entry sync-back left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedEntry {
    /// The path relative to the workspace (`/`-separated).
    pub path: String,
    pub reason: SkipReason,
    /// What went wrong, for [`SkipReason::Failed`] (an error message without secrets); `None` otherwise.
    pub detail: Option<String>,
}

/// Why sync-back left an entry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a regular file, directory or symlink: a device node, FIFO, socket or hard link.
    SpecialFile,
    /// A directory on the way to it on the host is not a real directory (a symlink, a file): nothing is written
    /// through it.
    UnsafeHostPath,
    /// The environment listed it but did not send it (or sent something else in its place).
    NotSent,
    /// Writing it on the host failed (a name the host's filesystem refuses, an I/O error): see the entry's detail.
    Failed,
}

impl SkipReason {
    /// The stable, snake_case name of this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::SpecialFile => "special_file",
            SkipReason::UnsafeHostPath => "unsafe_host_path",
            SkipReason::NotSent => "not_sent",
            SkipReason::Failed => "failed",
        }
    }
}

/// A way from inside a lease's environment back to an address on the berth host (the run's callback bridge), open
/// for as long as this value lives.
pub struct Tunnel {
    /// `host:port` to use from inside the environment instead of the berth host's address.
    pub address: String,
    /// A Unix socket on this host that the bridge must serve: the environment's end of the tunnel reaches the
    /// bridge through it (a sandbox whose network has nothing but loopback).
    pub unix_socket: Option<PathBuf>,
    _guard: Box<dyn Send + Sync>,
}

impl Tunnel {
    /// A tunnel reachable at `address`; dropping it drops `guard`, which closes the tunnel.
    pub fn new(address: String, guard: impl Send + Sync + 'static) -> Self {
        Self {
            address,
            unix_socket: None,
            _guard: Box::new(guard),
        }
    }

    /// A tunnel reachable at `address` inside the environment, which relays to the bridge served at `socket`.
    pub fn through_unix_socket(address: String, socket: PathBuf) -> Self {
        Self {
            address,
            unix_socket: Some(socket),
            _guard: Box::new(()),
        }
    }
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// One command to run. Its `Debug` shows env names and the stdin length, never values: they may be secrets.
#[derive(Clone)]
pub struct ExecRequest {
    /// Program and arguments. Never passed through a shell.
    pub argv: Vec<String>,
    /// The command's environment, complete: the driver adds only defaults for `PATH` and `HOME` when absent, and
    /// never anything of berth's own environment.
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the workspace (`None`: the workspace itself).
    pub cwd: Option<String>,
    /// Bytes written to the command's stdin, which is then closed. `None`: stdin is empty.
    pub stdin: Option<Vec<u8>>,
    /// Kill the whole process tree after this long.
    pub timeout: Option<Duration>,
}

impl fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecRequest")
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("stdin_bytes", &self.stdin.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Which of the command's output streams a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// Receives a command's output as it arrives, in order within each stream. The future completes when the chunk is
/// taken care of; a slow sink slows the command down (backpressure) rather than buffering without bound.
pub trait OutputSink: Send + Sync {
    fn output<'a>(&'a self, stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()>;

    /// The command's process group started: the server records `process` durably (drivers await this as soon as they
    /// know the group), so a crash from then on leaves enough behind to kill exactly these processes.
    fn started<'a>(&'a self, _process: &'a ProcessIdentity) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Resolves when the run is cancelled. Drivers select on it and kill the process tree.
pub type CancelSignal = BoxFuture<'static, ()>;

/// How a command ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    /// The exit code, when the command exited on its own.
    pub exit_code: Option<i32>,
    /// The terminating signal's name (`SIGKILL`), when a signal ended it.
    pub signal: Option<String>,
    /// Killed because the timeout passed.
    pub timed_out: bool,
    /// Killed because the run was cancelled.
    pub cancelled: bool,
    /// The environment ended the command for exceeding one of its limits: which one, for people
    /// (`memoryMb=256: the run used more than its 256 MiB of memory and was killed`).
    pub limit_exceeded: Option<String>,
}

/// An environment driver.
pub trait EnvironmentDriver: Send + Sync + fmt::Debug + 'static {
    fn driver(&self) -> Driver;

    /// Checks that berth can reach and use the environment. Never errs: failures are `ok: false`.
    fn probe<'a>(&'a self, config: &'a DriverConfig) -> BoxFuture<'a, ProbeResult>;

    /// The driver's own judgement of a config that passed validation (secrets resolved): problems with their paths
    /// from the request body (`config.apiKey`). Empty: accepted. Never errs: a driver that cannot judge now accepts.
    fn validate_config<'a>(
        &'a self,
        _config: &'a DriverConfig,
    ) -> BoxFuture<'a, crate::validation::ValidationErrors> {
        Box::pin(async { crate::validation::ValidationErrors::new() })
    }

    /// Takes a fresh lease.
    fn acquire<'a>(
        &'a self,
        config: &'a DriverConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>>;

    /// Whether a lease kept by an earlier run can serve a run with `config` (reuse by environment).
    fn matches_reusable_lease(&self, config: &DriverConfig, lease: &LeaseHandle) -> bool;

    /// Takes over a lease kept by an earlier run. `Ok(None)`: the resource is gone; acquire a fresh one.
    fn resume<'a>(
        &'a self,
        config: &'a DriverConfig,
        lease: &'a LeaseHandle,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>>;

    /// Gives the lease back after a run. `keep`: the resource stays for reuse or inspection; otherwise it is cleaned
    /// up. Dispatched on the driver captured on the lease, which may differ from the environment's current one.
    /// `config`: the environment's config with secrets resolved, when it still uses this driver — what a driver
    /// whose handle alone cannot reach the resource (ssh, after a restart) reconnects with.
    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>>;

    /// Destroys the lease's resource whatever it holds (expired or orphaned kept leases). `config` as for
    /// [`release`](Self::release).
    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>>;

    /// Makes `local`, an address on the berth host's loopback (the run's callback bridge), reachable from inside the
    /// lease's environment while the returned tunnel lives. `None`: the environment shares this host's loopback, so
    /// `local` works as it is.
    fn open_tunnel<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _local: std::net::SocketAddr,
    ) -> BoxFuture<'a, Result<Option<Tunnel>, DriverError>> {
        Box::pin(async { Ok(None) })
    }

    /// Makes the workspace ready: in place (local) or copied in (remote).
    fn realize_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>>;

    /// Runs one command, streaming its output into `sink`, until it exits, times out or `cancel` fires. Timeouts and
    /// cancels kill the whole process tree and keep the output produced so far.
    fn execute<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
        request: ExecRequest,
        sink: &'a dyn OutputSink,
        cancel: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>>;

    /// Copies what the command changed back to `workspace.local_path` (no-op for in-place workspaces).
    fn sync_back<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>>;
}

/// Failures of drivers and providers.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("sandbox provider `{key}` is not installed (installed: {})", list_or_none(.installed))]
    ProviderNotInstalled { key: String, installed: Vec<String> },

    /// The provider exists but cannot serve now (a plugin starting, restarting or failed): fails fast, with why.
    #[error("sandbox provider `{provider}` is unavailable: {reason}")]
    ProviderUnavailable { provider: String, reason: String },

    #[error("a sandbox provider with key `{key}` is already registered")]
    DuplicateProvider { key: String },

    /// A provider's own spec is broken (bad key, schema that does not compile).
    #[error("invalid sandbox provider")]
    InvalidProvider(#[source] crate::Error),

    /// The driver cannot do this (yet): e.g. runs on a driver that only probes.
    #[error("the {driver} driver cannot {operation}")]
    Unsupported {
        driver: Driver,
        operation: &'static str,
    },

    /// The environment or provider refused or failed; the message is for people and holds no secret.
    #[error("{message}")]
    Failed { message: String },

    /// berth cannot contain a command here, and will not run it uncontained: the reason names the fix.
    #[error("{reason}")]
    Uncontained { reason: String },

    /// The command could not be started (missing program, bad cwd).
    #[error("cannot start `{program}`: {message}")]
    Spawn { program: String, message: String },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The environment sent back more file content than its config allows; what was staged is gone.
    #[error(
        "sync-back stopped: the environment sent more than syncBackMaxMb={limit_mb} MiB; raise config.syncBackMaxMb or write less"
    )]
    SyncBackTooLarge { limit_mb: u64 },

    /// The run was cancelled while its workspace was being synced back; what was staged is gone.
    #[error("sync-back stopped: the run was cancelled")]
    SyncBackCancelled,

    /// The environment stopped sending its workspace for too long.
    #[error("sync-back stopped: the environment sent nothing for {idle_secs} s")]
    SyncBackStalled { idle_secs: u64 },
}

impl DriverError {
    /// The stable, snake_case code of this error: part of the API contract.
    pub fn code(&self) -> &'static str {
        match self {
            DriverError::ProviderNotInstalled { .. } => "provider_not_installed",
            DriverError::ProviderUnavailable { .. } => "provider_unavailable",
            DriverError::DuplicateProvider { .. } => "duplicate_provider",
            DriverError::InvalidProvider(_) => "invalid_provider",
            DriverError::Unsupported { .. } => "driver_unsupported",
            DriverError::Failed { .. } => "driver_failed",
            DriverError::Uncontained { .. } => "isolation_unavailable",
            DriverError::Spawn { .. } => "spawn_failed",
            DriverError::Io { .. } => "driver_io_error",
            DriverError::SyncBackTooLarge { .. } => "sync_back_too_large",
            DriverError::SyncBackCancelled => "sync_back_cancelled",
            DriverError::SyncBackStalled { .. } => "sync_back_stalled",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            DriverError::ProviderNotInstalled { .. }
            | DriverError::ProviderUnavailable { .. }
            | DriverError::Failed { .. }
            | DriverError::Uncontained { .. } => ErrorKind::Unavailable,
            DriverError::SyncBackCancelled | DriverError::SyncBackStalled { .. } => {
                ErrorKind::Unavailable
            }
            DriverError::SyncBackTooLarge { .. } => ErrorKind::PayloadTooLarge,
            DriverError::DuplicateProvider { .. } => ErrorKind::Conflict,
            DriverError::Unsupported { .. } | DriverError::Spawn { .. } => ErrorKind::Validation,
            DriverError::InvalidProvider(_) | DriverError::Io { .. } => ErrorKind::Internal,
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        DriverError::Failed {
            message: message.into(),
        }
    }
}

impl From<crate::Error> for DriverError {
    fn from(error: crate::Error) -> Self {
        DriverError::InvalidProvider(error)
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_requests_never_print_env_values_or_stdin() {
        let mut env = BTreeMap::new();
        env.insert("API_KEY".to_owned(), "sk-very-secret".to_owned());
        let request = ExecRequest {
            argv: vec!["true".to_owned()],
            env,
            cwd: None,
            stdin: Some(b"also secret".to_vec()),
            timeout: None,
        };
        let rendered = format!("{request:?}");
        assert!(
            rendered.contains("API_KEY") && rendered.contains("stdin_bytes: Some(11)"),
            "{rendered}"
        );
        assert!(
            !rendered.contains("sk-very-secret") && !rendered.contains("also secret"),
            "{rendered}"
        );
    }
}
