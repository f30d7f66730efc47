//! The built-in `isolated` sandbox provider (API.md §8): a sandbox on this host, with no daemon and no container
//! runtime.
//!
//! A lease is a private directory `<root>/<key>` holding the sandbox's `workspace` (seen inside at `/workspace`) and
//! berth's `run` directory (the bridge socket, the init's status file, the sandbox's `passwd`). A command goes
//! `berth sandbox enter` (joins the run's cgroup) → `bwrap` (namespaces, the filesystem view of
//! [`berth_isolation::bwrap::SandboxView`]) → `berth sandbox init` (bridge relay, rlimits, Landlock, seccomp,
//! report) → the command, as an unprivileged user. Nothing here falls back to running a command unisolated: a host
//! that cannot isolate refuses with the reason and the fix.

mod command;
mod host_fs;
mod lease;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use berth_core::capabilities::ProviderStatus;
use berth_core::config::SandboxConfig;
use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, ExecOutcome, ExecRequest, LeaseHandle, LeaseRequest,
    OutputSink, RealizedWorkspace, SyncReport, Tunnel, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use berth_core::provider::{ProviderDescriptor, ProviderSpec, SandboxProvider};
use berth_isolation::bwrap::{Privilege, SANDBOX_UID, SANDBOX_WORKSPACE};
use berth_isolation::cgroup::Controller;
use berth_isolation::init::{InitReport, read_report};
use berth_isolation::probe::HostSupport;
use serde_json::{Map, Value, json};

use crate::fs::{blocking, create_private_dir, io_error};
use crate::provider_registry::ProviderRegistry;
use crate::sync::{self, Manifest};

pub use self::command::SANDBOX_BRIDGE_PORT;
use self::command::{BRIDGE_SOCKET, KeptOutput, Launcher, Tier, describe_outcome};
use self::host_fs::{chown_tree, ensure_private_dir_tree, readable_by_anyone};
pub use self::lease::{DEFAULT_DISK_MB, LEASE_ID_PREFIX};
use self::lease::{LeaseKey, SandboxLimits};

pub const ISOLATED_PROVIDER_KEY: &str = "isolated";
/// Workspace metadata key: the content manifest taken at sync-in.
const MANIFEST_KEY: &str = "manifest";

/// Registers `isolated` in `registry`, on the host `support` berth read at start-up; see [`IsolatedProvider::new`].
pub fn register_builtin(
    registry: &mut ProviderRegistry,
    root: PathBuf,
    init_program: PathBuf,
    tier: TierChoice,
    support: HostSupport,
) -> Result<(), DriverError> {
    registry.register(Arc::new(IsolatedProvider::with_support(
        root,
        init_program,
        tier,
        support,
    )?))
}

#[derive(Debug)]
pub struct IsolatedProvider {
    descriptor: ProviderDescriptor,
    root: PathBuf,
    /// berth's own binary: the sandbox's init.
    init_program: PathBuf,
    support: HostSupport,
    choice: TierChoice,
    next_lease: AtomicU64,
}

/// Which isolation tier the operator allows (`berth serve --isolation-tier`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TierChoice {
    /// Namespaces where the host allows them, else the Landlock tier where the kernel has it.
    #[default]
    Auto,
    Namespaces,
    Landlock,
}

/// The Landlock ABI the Landlock tier needs: 4 for TCP rules, 6 for signal and abstract-socket scoping.
pub const LANDLOCK_TIER_ABI: i32 = 6;

// === impl IsolatedProvider ===

impl IsolatedProvider {
    /// Sandboxes live under `root` (berth keeps it in its data dir); `init_program` is berth's own binary. The
    /// host's support is read now: a host that cannot isolate still registers the provider, which then refuses every
    /// lease and says why.
    pub fn new(root: PathBuf, init_program: PathBuf) -> Result<Self, DriverError> {
        Self::with_support(root, init_program, TierChoice::Auto, HostSupport::detect())
    }

    /// As [`new`](Self::new), restricted to the tiers `choice` allows, on a host `support` already read.
    pub fn with_support(
        root: PathBuf,
        init_program: PathBuf,
        choice: TierChoice,
        support: HostSupport,
    ) -> Result<Self, DriverError> {
        Ok(Self {
            descriptor: ProviderDescriptor::new(Self::spec())?,
            root,
            init_program,
            support,
            choice,
            next_lease: AtomicU64::new(0),
        })
    }

    /// The tier sandboxes are built with here, or why there is none.
    fn tier(&self) -> Result<Tier, DriverError> {
        let namespaces = self.support.namespaces().cloned();
        let landlock = if self.support.privilege == Privilege::Root {
            // Without a mount namespace the sandbox user could not reach a workspace inside berth's private data
            // dir, and a sandbox never runs as the host's root.
            Err("the Landlock tier runs commands as berth's own user, and berth runs as root here; run berth as an \
                 unprivileged user, or allow it namespaces"
                .to_owned())
        } else if self.support.landlock_abi >= LANDLOCK_TIER_ABI {
            Ok(())
        } else {
            Err(format!(
                "the Landlock tier needs Landlock ABI {LANDLOCK_TIER_ABI} (Linux 6.12+ with landlock in the lsm= \
                 boot list); this kernel offers {}",
                self.support.landlock_abi
            ))
        };
        let refuse = |reason: String| DriverError::Uncontained {
            reason: format!("the isolated provider cannot isolate on this host: {reason}"),
        };
        match (self.choice, namespaces, landlock) {
            (TierChoice::Auto | TierChoice::Namespaces, Ok(bwrap), _) => {
                Ok(Tier::Namespaces(bwrap))
            }
            (TierChoice::Namespaces, Err(reason), _) => Err(refuse(reason)),
            (TierChoice::Auto | TierChoice::Landlock, _, Ok(())) => Ok(Tier::Landlock),
            (TierChoice::Landlock, _, Err(reason)) => Err(refuse(reason)),
            (TierChoice::Auto, Err(namespaces), Err(landlock)) => {
                Err(refuse(format!("{namespaces}; and {landlock}")))
            }
        }
    }

    pub fn spec() -> ProviderSpec {
        ProviderSpec {
            key: ISOLATED_PROVIDER_KEY.to_owned(),
            display_name: "Isolated (built in)".to_owned(),
            description: "A sandbox on this host: its own namespaces, a read-only system, a private /tmp, no \
                          network but the callback bridge, seccomp and Landlock, cgroup limits. No daemon needed."
                .to_owned(),
            config_schema: config_schema(),
            supports_reusable_leases: true,
            supports_run_execution: true,
        }
    }

    pub fn support(&self) -> &HostSupport {
        &self.support
    }

    /// Why this host cannot give `limits` a sandbox, if it cannot.
    fn refusal(&self, limits: &SandboxLimits) -> Option<DriverError> {
        if let Err(refusal) = self.tier() {
            return Some(refusal);
        }
        for controller in limits.controllers() {
            if self.support.cgroups.get(controller).is_none() {
                let field = match controller {
                    Controller::Memory => "memoryMb",
                    Controller::Pids => "pids",
                    Controller::Cpu => "cpus",
                };
                let problem = self
                    .support
                    .cgroups
                    .problems
                    .iter()
                    .find(|problem| problem.contains(controller.name()))
                    .cloned()
                    .unwrap_or_else(|| format!("no {} cgroup controller", controller.name()));
                return Some(DriverError::Uncontained {
                    reason: format!(
                        "the isolated provider cannot enforce {field} on this host: {problem}"
                    ),
                });
            }
        }
        for path in &limits.read_only_paths {
            if !path.is_absolute() || !path.exists() {
                return Some(DriverError::failed(format!(
                    "readOnlyPaths: {} does not exist on this host",
                    path.display()
                )));
            }
            if !readable_by_anyone(path) {
                return Some(DriverError::failed(format!(
                    "readOnlyPaths: {} is not readable by every user of this host; a sandbox may only be shown \
                     what any host account could read",
                    path.display()
                )));
            }
        }
        None
    }

    fn sandbox_dir(&self, lease: &LeaseHandle) -> Result<(LeaseKey, PathBuf), DriverError> {
        let key = lease
            .provider_lease_id
            .as_deref()
            .and_then(LeaseKey::parse)
            .ok_or_else(|| DriverError::failed("the lease does not name an isolated sandbox"))?;
        Ok((key, self.root.join(key.dir_name())))
    }

    fn lease_handle(&self, key: LeaseKey, limits: &SandboxLimits, reuse: bool) -> LeaseHandle {
        let mut metadata = Map::new();
        metadata.insert("provider".to_owned(), ISOLATED_PROVIDER_KEY.into());
        metadata.insert("reuseLease".to_owned(), reuse.into());
        metadata.insert("limits".to_owned(), limits.to_value());
        LeaseHandle {
            provider: Some(ISOLATED_PROVIDER_KEY.to_owned()),
            provider_lease_id: Some(key.id()),
            metadata,
            expires_at: None,
            process: None,
        }
    }

    /// The uid and gid the sandbox user has on the host, which owns the workspace.
    /// One command in the sandbox at `dir`, in the cgroup `cgroup_name` (unique to the command), on the tier this
    /// host allows; see [`Launcher::run_in`].
    async fn run_in(
        &self,
        dir: &Path,
        cgroup_name: &str,
        limits: &SandboxLimits,
        request: ExecRequest,
        sink: &dyn OutputSink,
        cancel: CancelSignal,
    ) -> Result<ExecOutcome, DriverError> {
        let launcher = Launcher {
            tier: self.tier()?,
            init_program: &self.init_program,
            support: &self.support,
            owner: self.sandbox_owner(),
        };
        launcher
            .run_in(dir, cgroup_name, limits, request, sink, cancel)
            .await
    }

    fn sandbox_owner(&self) -> Option<u32> {
        (self.support.privilege == Privilege::Root).then_some(SANDBOX_UID)
    }

    async fn create_sandbox(&self, dir: PathBuf) -> Result<(), DriverError> {
        let root = self.root.clone();
        let owner = self.sandbox_owner();
        blocking("the isolated provider", move || {
            ensure_private_dir_tree(&root)?;
            if !dir.is_dir() {
                create_private_dir(&dir)?;
            }
            let workspace = dir.join("workspace");
            if !workspace.is_dir() {
                create_private_dir(&workspace)?;
            }
            let run = dir.join("run");
            if !run.is_dir() {
                create_private_dir(&run)?;
            }
            let (uid, home) = match owner {
                Some(uid) => (uid, SANDBOX_WORKSPACE),
                None => (1000, SANDBOX_WORKSPACE),
            };
            std::fs::write(
                run.join("passwd"),
                format!(
                    "root:x:0:0:root:/root:/usr/sbin/nologin\nagent:x:{uid}:{uid}:berth sandbox:{home}:/bin/sh\n"
                ),
            )
            .map_err(io_error("writing the sandbox's passwd"))?;
            std::fs::write(run.join("group"), format!("root:x:0:\nagent:x:{uid}:\n"))
                .map_err(io_error("writing the sandbox's group"))?;
            if let Some(uid) = owner {
                chown_tree(&workspace, uid)?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_sandbox(&self, lease: &LeaseHandle, why: &str) -> Result<(), DriverError> {
        let (key, dir) = self.sandbox_dir(lease)?;
        let cgroup = self
            .support
            .cgroups
            .existing_with_prefix(&cgroup_prefix(key));
        blocking("the isolated provider", move || {
            // A run that outlived its server (kill -9) may still have processes here.
            cgroup.kill_and_remove();
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(io_error(format!("removing {}", dir.display()))(err)),
            }
        })
        .await?;
        tracing::debug!(lease.id = %key.id(), why, "isolated sandbox removed");
        Ok(())
    }

    /// Runs `argv` in a throwaway sandbox and returns what the init reported: the probe's proof that isolation
    /// works here, not just that its parts are installed.
    async fn smoke_test(&self) -> Result<InitReport, String> {
        let serial = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join(format!("probe-{}-{serial}", std::process::id()));
        self.create_sandbox(dir.clone())
            .await
            .map_err(|err| err.to_string())?;
        let limits = SandboxLimits {
            disk_mb: 1,
            ..SandboxLimits::default()
        };
        let request = ExecRequest {
            argv: vec!["true".to_owned()],
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout: Some(std::time::Duration::from_secs(10)),
        };
        let sink = KeptOutput::default();
        let name = format!("probe-{}-{serial}", std::process::id());
        let outcome = self
            .run_in(
                &dir,
                &name,
                &limits,
                request,
                &sink,
                Box::pin(std::future::pending()),
            )
            .await;
        let report = read_report(&dir.join("run"));
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        match (outcome, report) {
            (Ok(outcome), Some(report)) if outcome.exit_code == Some(0) => Ok(report),
            (Ok(outcome), report) => Err(format!(
                "a test command in the sandbox did not succeed ({}){}{}",
                describe_outcome(&outcome),
                report
                    .and_then(|report| report.error)
                    .map(|error| format!(": {error}"))
                    .unwrap_or_default(),
                match sink.text() {
                    text if text.is_empty() => String::new(),
                    text => format!("; it said: {text}"),
                }
            )),
            (Err(err), _) => Err(err.to_string()),
        }
    }
}

impl SandboxProvider for IsolatedProvider {
    fn descriptor(&self) -> &ProviderDescriptor {
        &self.descriptor
    }

    fn status(&self) -> (ProviderStatus, Option<String>) {
        match self.tier() {
            Ok(_) => (ProviderStatus::Ready, None),
            Err(refusal) => (ProviderStatus::Unavailable, Some(refusal.to_string())),
        }
    }

    fn probe<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move {
            let limits = SandboxLimits::from_fields(&config.fields);
            // What berth read at start-up, which is what its sandboxes use until it restarts.
            let mut details = self.support.details(&limits.controllers());
            details.insert("limits".to_owned(), limits.to_value());
            details.insert(
                "tier".to_owned(),
                match self.tier() {
                    Ok(Tier::Namespaces(_)) => "namespaces",
                    Ok(Tier::Landlock) => "landlock",
                    Err(_) => "none",
                }
                .into(),
            );
            if let Some(refusal) = self.refusal(&limits) {
                let mut result = ProbeResult::failed(Driver::Sandbox, refusal.to_string());
                result.details = details;
                result
                    .details
                    .insert("provider".to_owned(), ISOLATED_PROVIDER_KEY.into());
                return result;
            }
            let smoke = self.smoke_test().await;
            let (ok, summary) = match &smoke {
                Ok(report) => {
                    details.insert(
                        "smokeTest".to_owned(),
                        json!({
                            "ok": true,
                            "landlock": report.landlock,
                            "landlockAbi": report.landlock_abi,
                            "seccomp": report.seccomp,
                        }),
                    );
                    (
                        true,
                        format!(
                            "isolated sandboxes work here: namespaces, seccomp{}, cgroup limits for {}",
                            if report.landlock_abi > 0 {
                                format!(", Landlock ABI {}", report.landlock_abi)
                            } else {
                                String::new()
                            },
                            [Controller::Memory, Controller::Pids, Controller::Cpu]
                                .into_iter()
                                .filter(|controller| self
                                    .support
                                    .cgroups
                                    .get(*controller)
                                    .is_some())
                                .map(Controller::name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                }
                Err(reason) => {
                    details.insert(
                        "smokeTest".to_owned(),
                        json!({"ok": false, "reason": reason}),
                    );
                    (
                        false,
                        format!("a sandbox could not be started on this host: {reason}"),
                    )
                }
            };
            details.insert("provider".to_owned(), ISOLATED_PROVIDER_KEY.into());
            ProbeResult {
                ok,
                driver: Driver::Sandbox,
                summary,
                details,
            }
        })
    }

    fn acquire<'a>(
        &'a self,
        config: &'a SandboxConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move {
            let limits = SandboxLimits::from_fields(&config.fields);
            if let Some(refusal) = self.refusal(&limits) {
                return Err(refusal);
            }
            let key = if config.reuse_lease {
                LeaseKey::Environment(request.environment_id)
            } else {
                LeaseKey::Run(
                    request.run_id,
                    self.next_lease.fetch_add(1, Ordering::Relaxed),
                )
            };
            self.create_sandbox(self.root.join(key.dir_name())).await?;
            tracing::debug!(run.id = %request.run_id, lease.id = %key.id(), "isolated sandbox acquired");
            Ok(self.lease_handle(key, &limits, config.reuse_lease))
        })
    }

    fn matches_reusable_lease(&self, config: &SandboxConfig, lease: &LeaseHandle) -> bool {
        lease
            .provider_lease_id
            .as_deref()
            .and_then(LeaseKey::parse)
            .is_some_and(|key| matches!(key, LeaseKey::Environment(_)))
            && lease.metadata.get("reuseLease") == Some(&Value::Bool(true))
            && SandboxLimits::from_lease(lease) == SandboxLimits::from_fields(&config.fields)
    }

    fn resume<'a>(
        &'a self,
        config: &'a SandboxConfig,
        lease: &'a LeaseHandle,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move {
            let (key, dir) = self.sandbox_dir(lease)?;
            if !dir.join("workspace").is_dir() {
                return Ok(None);
            }
            let limits = SandboxLimits::from_fields(&config.fields);
            if let Some(refusal) = self.refusal(&limits) {
                return Err(refusal);
            }
            let mut resumed = self.lease_handle(key, &limits, config.reuse_lease);
            resumed
                .metadata
                .insert("resumedLease".to_owned(), true.into());
            tracing::debug!(run.id = %request.run_id, lease.id = %key.id(), "isolated sandbox resumed");
            Ok(Some(resumed))
        })
    }

    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        _config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            if keep {
                let (key, _) = self.sandbox_dir(lease)?;
                // Kept: its files stay for the next run; no process does.
                let cgroup = self
                    .support
                    .cgroups
                    .existing_with_prefix(&cgroup_prefix(key));
                let _ = tokio::task::spawn_blocking(move || cgroup.kill_and_remove()).await;
                return Ok(());
            }
            self.remove_sandbox(lease, "release").await
        })
    }

    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        _config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.remove_sandbox(lease, "destroy"))
    }

    fn prepare_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async move {
            let (key, dir) = self.sandbox_dir(lease)?;
            let workspace = dir.join("workspace");
            let local_path = request.local_path.clone();
            let owner = self.sandbox_owner();
            let fresh = workspace.clone();
            let local_path = blocking("the isolated provider", move || {
                if !dir.is_dir() {
                    return Err(DriverError::failed(format!(
                        "the isolated sandbox {} is gone",
                        key.id()
                    )));
                }
                // With a host workspace, the sandbox mirrors it: a fresh copy each run. Without one, a reused
                // sandbox keeps what earlier runs left.
                let Some(local_path) = local_path else {
                    return Ok(None);
                };
                sync::empty_for_copy(&fresh, &local_path).map(Some)
            })
            .await?;
            let mut metadata = Map::new();
            if let Some(from) = &local_path {
                let manifest = sync::copy_tree(from, &workspace).await?;
                metadata.insert("files".to_owned(), manifest.len().into());
                metadata.insert("bytes".to_owned(), manifest.total_file_bytes().into());
                metadata.insert(MANIFEST_KEY.to_owned(), manifest.to_value());
            }
            if let Some(uid) = owner {
                let tree = workspace.clone();
                blocking("the isolated provider", move || chown_tree(&tree, uid)).await?;
            }
            Ok(RealizedWorkspace {
                cwd: SANDBOX_WORKSPACE.to_owned(),
                local_path,
                ephemeral: true,
                metadata,
            })
        })
    }

    fn open_tunnel<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        _local: std::net::SocketAddr,
    ) -> BoxFuture<'a, Result<Option<Tunnel>, DriverError>> {
        Box::pin(async move {
            // The Landlock tier shares the host's loopback: the bridge's own address works, and only its port.
            if self.tier()? == Tier::Landlock {
                return Ok(None);
            }
            let (_, dir) = self.sandbox_dir(lease)?;
            let path = dir.join("run").join(BRIDGE_SOCKET);
            // A socket a crashed run left behind; the bridge binds a fresh one and removes it when it stops.
            let _ = tokio::fs::remove_file(&path).await;
            Ok(Some(Tunnel::through_unix_socket(
                format!("127.0.0.1:{SANDBOX_BRIDGE_PORT}"),
                path,
            )))
        })
    }

    fn execute<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        _workspace: &'a RealizedWorkspace,
        request: ExecRequest,
        sink: &'a dyn OutputSink,
        cancel: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>> {
        Box::pin(async move {
            let (key, dir) = self.sandbox_dir(lease)?;
            let limits = SandboxLimits::from_lease(lease);
            let serial = self.next_lease.fetch_add(1, Ordering::Relaxed);
            let cgroup = format!("{}{serial}", cgroup_prefix(key));
            self.run_in(&dir, &cgroup, &limits, request, sink, cancel)
                .await
        })
    }

    fn sync_back<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        Box::pin(async move {
            let Some(host_dir) = &workspace.local_path else {
                return Ok(SyncReport::default());
            };
            let (_, dir) = self.sandbox_dir(lease)?;
            let Some(manifest) = workspace.metadata.get(MANIFEST_KEY) else {
                return Err(DriverError::failed(
                    "the workspace has no manifest from its copy-in; cannot tell what changed",
                ));
            };
            let manifest = Manifest::from_value(manifest)?;
            // The sandbox chose what is there: bounded by the environment's syncBackMaxMb, never written through a
            // link it planted.
            let limits = sync::SyncBackLimits::for_lease(lease);
            sync::sync_back_with(&dir.join("workspace"), host_dir, &manifest, &limits).await
        })
    }
}

/// The names of a lease's command cgroups start with this: `<lease dir>.`, then a serial.
fn cgroup_prefix(key: LeaseKey) -> String {
    format!("{}.", key.dir_name())
}

fn config_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "memoryMb": {"type": "integer", "minimum": 16, "maximum": 1_048_576,
                         "description": "Memory for the whole process tree, in MiB; past it the run is killed."},
            "pids": {"type": "integer", "minimum": 8, "maximum": 1_000_000,
                     "description": "Processes and threads the tree may have at once."},
            "cpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 1024,
                     "description": "CPU time as a number of cores (0.5: half of one)."},
            "diskMb": {"type": "integer", "minimum": 1, "maximum": 1_048_576, "default": DEFAULT_DISK_MB,
                       "description": "Size of the private /tmp, in MiB."},
            "readOnlyPaths": {"type": "array", "maxItems": 64,
                              "items": {"type": "string", "pattern": "^/", "maxLength": 4096},
                              "description": "Host paths the sandbox sees read-only, at the same path."},
            "network": {"type": "string", "enum": ["none"], "default": "none",
                        "description": "No network but the callback bridge at BERTH_API_URL."}
        }
    })
}
