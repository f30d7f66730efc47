//! The [`FakeProvider`], the [`FakeProviderBuilder`] that makes one, and its [`SandboxProvider`] implementation:
//! leases, workspaces, commands and sync-back.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_core::config::SandboxConfig;
use berth_core::driver::{
    CancelSignal, DriverError, ExecOutcome, ExecRequest, LeaseHandle, LeaseRequest, OutputSink,
    OutputStream, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::error::Error;
use berth_core::ids::{EnvironmentId, RunId};
use berth_core::probe::ProbeResult;
use berth_core::provider::{BoxFuture, ProviderDescriptor, ProviderSpec, SandboxProvider};
use berth_drivers::contain::Containment;
use berth_drivers::fs::{blocking, create_private_dir, io_error};
use berth_drivers::process::{ProcessSpec, command_cwd, run_process_tracked};
use berth_drivers::sync::{self, Manifest};
use serde_json::{Map, Value, json};

use crate::faults::FakeFaults;

/// The value of `config.provider` that selects the fake.
pub const FAKE_PROVIDER_KEY: &str = "fake";

/// The image a fake sandbox reports when the config names none. It is also the schema's default, so stored configs
/// always carry it.
pub const DEFAULT_IMAGE: &str = "fake:latest";

/// Every fake lease id starts with this.
pub const LEASE_ID_PREFIX: &str = "sandbox://fake/";

/// Workspace metadata key of the manifest taken at copy-in, which sync-back diffs against.
pub const MANIFEST_KEY: &str = "manifest";

/// A sandbox provider that needs no outside service: sandboxes are private directories on this machine.
#[derive(Debug)]
pub struct FakeProvider {
    pub(crate) descriptor: ProviderDescriptor,
    pub(crate) faults: FakeFaults,
    pub(crate) root: PathBuf,
    /// The `n` of the next `sandbox://fake/<runId>/<n>` lease id.
    pub(crate) next_lease: AtomicU64,
    pub(crate) containment: Containment,
}

/// Builds a [`FakeProvider`]: `FakeProvider::builder().root(dir).seed(7).fail_probe("down").build()`.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct FakeProviderBuilder {
    faults: FakeFaults,
    root: Option<PathBuf>,
    seed: u64,
    containment: Option<Containment>,
}

// === impl FakeProviderBuilder ===

impl FakeProviderBuilder {
    /// Where sandboxes live (created with mode 0700 when first needed). Default: [`FakeProvider::default_root`].
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// The first `n` of `sandbox://fake/<runId>/<n>` lease ids. Default 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Makes every probe fail with `summary`.
    pub fn fail_probe(mut self, summary: impl Into<String>) -> Self {
        self.faults.fail_probe = Some(summary.into());
        self
    }

    /// Makes every acquire fail with `message`.
    pub fn fail_acquire(mut self, message: impl Into<String>) -> Self {
        self.faults.fail_acquire = Some(message.into());
        self
    }

    /// Makes every release and destroy fail with `message`.
    pub fn fail_release(mut self, message: impl Into<String>) -> Self {
        self.faults.fail_release = Some(message.into());
        self
    }

    /// Makes every acquire take at least `delay`.
    pub fn acquire_delay(mut self, delay: Duration) -> Self {
        self.faults.acquire_delay = Some(delay);
        self
    }

    /// Discards commands' output instead of forwarding it.
    pub fn drop_output(mut self, drop: bool) -> Self {
        self.faults.drop_output = drop;
        self
    }

    /// How commands are contained. Unset: not at all, which suits only tests of the fake itself; the server
    /// always passes its containment ([`register_builtin`](crate::register_builtin)).
    pub fn containment(mut self, containment: Containment) -> Self {
        self.containment = Some(containment);
        self
    }

    /// See [`FakeProvider::new`] for why this is fallible.
    pub fn build(self) -> Result<FakeProvider, Error> {
        Ok(FakeProvider {
            descriptor: ProviderDescriptor::new(FakeProvider::spec())?,
            faults: self.faults,
            root: self.root.unwrap_or_else(FakeProvider::default_root),
            next_lease: AtomicU64::new(self.seed),
            containment: self
                .containment
                .unwrap_or_else(Containment::disabled_for_tests),
        })
    }
}

/// Which sandbox a lease id names. Parsed strictly, so a lease id read back from storage can only ever name a
/// directory directly under the provider's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeaseKey {
    /// `sandbox://fake/<environmentId>`: reusable by the environment's later runs.
    Environment(EnvironmentId),
    /// `sandbox://fake/<runId>/<n>`: one run's.
    Run(RunId, u64),
}

impl LeaseKey {
    pub(crate) fn parse(id: &str) -> Option<Self> {
        let rest = id.strip_prefix(LEASE_ID_PREFIX)?;
        let key = match rest.split_once('/') {
            None => LeaseKey::Environment(rest.parse().ok()?),
            Some((run, n)) => LeaseKey::Run(run.parse().ok()?, n.parse().ok()?),
        };
        // One spelling per id (no `+1`, `01` or upper-case uuids): only what `id` would have made.
        (key.id() == id).then_some(key)
    }

    pub(crate) fn id(self) -> String {
        match self {
            LeaseKey::Environment(environment) => format!("{LEASE_ID_PREFIX}{environment}"),
            LeaseKey::Run(run, n) => format!("{LEASE_ID_PREFIX}{run}/{n}"),
        }
    }

    /// The sandbox directory's name under the root.
    fn dir_name(self) -> String {
        match self {
            LeaseKey::Environment(environment) => format!("env-{environment}"),
            LeaseKey::Run(run, n) => format!("run-{run}-{n}"),
        }
    }
}

/// Discards output: the `drop_output` fault.
#[derive(Debug)]
struct Discard;

impl OutputSink for Discard {
    fn output<'a>(&'a self, _stream: OutputStream, _data: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

// === impl FakeProvider ===

impl FakeProvider {
    /// A well-behaved fake with its sandboxes under `<temp dir>/berth-fake`.
    ///
    /// Fallible only because [`ProviderDescriptor::new`] compiles the config schema; the schema is a constant, so an
    /// error here is a bug in this crate, which the tests catch. Returning it (rather than panicking) lets the
    /// server report it at startup like any other registration failure.
    pub fn new() -> Result<Self, Error> {
        Self::builder().build()
    }

    pub fn builder() -> FakeProviderBuilder {
        FakeProviderBuilder::default()
    }

    pub fn faults(&self) -> &FakeFaults {
        &self.faults
    }

    /// Where the sandboxes live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root used when the builder names none.
    pub fn default_root() -> PathBuf {
        std::env::temp_dir().join("berth-fake")
    }

    /// The registration spec of the fake: key, names and config schema.
    pub fn spec() -> ProviderSpec {
        ProviderSpec {
            key: FAKE_PROVIDER_KEY.to_owned(),
            display_name: "Fake sandbox".to_owned(),
            description: "A deterministic sandbox provider for tests and demos: each sandbox is a private temporary \
                          directory on the berth host, and commands run there."
                .to_owned(),
            config_schema: config_schema(),
            supports_reusable_leases: true,
            supports_run_execution: true,
        }
    }

    fn probe_now(&self, config: &SandboxConfig) -> ProbeResult {
        if let Some(summary) = &self.faults.fail_probe {
            return ProbeResult::failed(Driver::Sandbox, summary.clone());
        }
        if config.provider != FAKE_PROVIDER_KEY {
            // The registry dispatches on the key, so this is a caller bug; say so rather than pretend.
            return ProbeResult::failed(
                Driver::Sandbox,
                format!(
                    "the fake provider was asked to probe a config for provider `{}`",
                    config.provider
                ),
            );
        }
        let image = image_of(config);
        let mut details = Map::new();
        details.insert("provider".to_owned(), FAKE_PROVIDER_KEY.into());
        details.insert("image".to_owned(), image.clone().into());
        details.insert("reuseLease".to_owned(), config.reuse_lease.into());
        ProbeResult::ok(
            Driver::Sandbox,
            format!("fake sandbox provider ready (image {image})"),
            details,
        )
    }

    /// The sandbox directory a lease names, derived from its id (never from metadata, which is only informative):
    /// always directly under the root, whatever was stored.
    fn sandbox_dir(&self, lease: &LeaseHandle) -> Result<(LeaseKey, PathBuf), DriverError> {
        let id = lease.provider_lease_id.as_deref().unwrap_or_default();
        let Some(key) = LeaseKey::parse(id) else {
            tracing::warn!(lease.id = %id, "refusing a lease id the fake provider did not make");
            return Err(DriverError::failed(format!(
                "`{id}` is not a fake sandbox lease id"
            )));
        };
        Ok((key, self.root.join(key.dir_name())))
    }

    /// The workspace directory of `workspace`, checked to be `<sandbox>/workspace` of this lease.
    fn workspace_dir(
        &self,
        lease: &LeaseHandle,
        workspace: &RealizedWorkspace,
    ) -> Result<PathBuf, DriverError> {
        let (_, sandbox) = self.sandbox_dir(lease)?;
        let expected = sandbox.join("workspace");
        if Path::new(&workspace.cwd) != expected {
            return Err(DriverError::failed(format!(
                "the workspace {} is not this fake sandbox's workspace",
                workspace.cwd
            )));
        }
        Ok(expected)
    }

    fn lease_handle(
        &self,
        key: LeaseKey,
        dir: &Path,
        image: String,
        reuse_lease: bool,
    ) -> LeaseHandle {
        let mut metadata = Map::new();
        metadata.insert("provider".to_owned(), FAKE_PROVIDER_KEY.into());
        metadata.insert("image".to_owned(), image.into());
        metadata.insert("reuseLease".to_owned(), reuse_lease.into());
        metadata.insert("sandboxDir".to_owned(), dir.display().to_string().into());
        LeaseHandle {
            provider: Some(FAKE_PROVIDER_KEY.to_owned()),
            provider_lease_id: Some(key.id()),
            metadata,
            expires_at: None,
            process: None,
        }
    }

    async fn remove_sandbox(
        &self,
        lease: &LeaseHandle,
        operation: &'static str,
    ) -> Result<(), DriverError> {
        let (key, dir) = self.sandbox_dir(lease)?;
        if let Some(message) = &self.faults.fail_release {
            tracing::debug!(lease.id = %key.id(), operation, "fake release fault injected");
            return Err(DriverError::failed(message.clone()));
        }
        let recorded = lease.process.clone();
        blocking("the fake provider", move || {
            // What the lease's last command left running, by its recorded identity: a crashed berth's command may
            // have ended up anywhere on this host. A command that ended normally is no longer recorded.
            if let Some(identity) = &recorded {
                berth_drivers::process::kill_recorded(identity).map_err(io_error(format!(
                    "killing what the run's process group {} left running",
                    identity.pgid
                )))?;
            }
            // Destroy is for sandboxes nobody is running in any more (orphans, expiry): processes a crashed berth
            // left there go with it. A run's own release needs no scan, its process tree is already gone. The
            // sandbox directory is the provider's own, so whatever works in it belongs to a run.
            if operation == "destroy" {
                berth_drivers::process::kill_processes_in(&dir);
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::debug!(lease.id = %key.id(), operation, "fake sandbox removed");
                    Ok(())
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(io_error(format!(
                    "removing the fake sandbox {}",
                    dir.display()
                ))(err)),
            }
        })
        .await
    }
}

impl SandboxProvider for FakeProvider {
    fn descriptor(&self) -> &ProviderDescriptor {
        &self.descriptor
    }

    fn probe<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move { self.probe_now(config) })
    }

    fn acquire<'a>(
        &'a self,
        config: &'a SandboxConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move {
            if let Some(delay) = self.faults.acquire_delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(message) = &self.faults.fail_acquire {
                tracing::debug!(run.id = %request.run_id, "fake acquire fault injected");
                return Err(DriverError::failed(message.clone()));
            }
            if config.provider != FAKE_PROVIDER_KEY {
                return Err(DriverError::failed(format!(
                    "the fake provider was asked for a lease for provider `{}`",
                    config.provider
                )));
            }
            let key = if config.reuse_lease {
                LeaseKey::Environment(request.environment_id)
            } else {
                LeaseKey::Run(
                    request.run_id,
                    self.next_lease.fetch_add(1, Ordering::Relaxed),
                )
            };
            let root = self.root.clone();
            let dir = self.root.join(key.dir_name());
            let created = dir.clone();
            blocking("the fake provider", move || {
                ensure_private_root(&root)?;
                // A reusable sandbox that survived an earlier run is taken as it is.
                create_private_dir(&created)
            })
            .await?;
            tracing::debug!(run.id = %request.run_id, lease.id = %key.id(), "fake sandbox acquired");
            Ok(self.lease_handle(key, &dir, image_of(config), config.reuse_lease))
        })
    }

    fn matches_reusable_lease(&self, config: &SandboxConfig, lease: &LeaseHandle) -> bool {
        lease
            .provider_lease_id
            .as_deref()
            .is_some_and(|id| !id.is_empty())
            && lease.metadata.get("provider").and_then(Value::as_str) == Some(FAKE_PROVIDER_KEY)
            && lease.metadata.get("reuseLease") == Some(&Value::Bool(true))
            && lease.metadata.get("image").and_then(Value::as_str)
                == Some(image_of(config).as_str())
    }

    fn resume<'a>(
        &'a self,
        config: &'a SandboxConfig,
        lease: &'a LeaseHandle,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move {
            let (key, dir) = self.sandbox_dir(lease)?;
            let checked = dir.clone();
            let exists = blocking(
                "the fake provider",
                move || match std::fs::symlink_metadata(&checked) {
                    Ok(meta) => Ok(meta.is_dir()),
                    Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(err) => Err(io_error(format!("reading {}", checked.display()))(err)),
                },
            )
            .await?;
            if !exists {
                tracing::debug!(run.id = %request.run_id, lease.id = %key.id(), "kept fake sandbox is gone");
                return Ok(None);
            }
            let mut resumed = self.lease_handle(key, &dir, image_of(config), config.reuse_lease);
            resumed
                .metadata
                .insert("resumedLease".to_owned(), true.into());
            tracing::debug!(run.id = %request.run_id, lease.id = %key.id(), "fake sandbox resumed");
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
                if let Some(message) = &self.faults.fail_release {
                    return Err(DriverError::failed(message.clone()));
                }
                tracing::debug!(lease.id = %key.id(), "fake sandbox kept");
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
            let (key, sandbox) = self.sandbox_dir(lease)?;
            let workspace = sandbox.join("workspace");
            let cwd = workspace.to_str().map(str::to_owned).ok_or_else(|| {
                DriverError::failed("the fake provider's root is not a UTF-8 path")
            })?;
            let local_path = request.local_path.clone();
            let local_path = blocking("the fake provider", move || {
                if !std::fs::symlink_metadata(&sandbox).is_ok_and(|meta| meta.is_dir()) {
                    return Err(DriverError::failed(format!(
                        "the fake sandbox {} is gone",
                        key.id()
                    )));
                }
                // Without a host workspace, a reused sandbox keeps what earlier runs left: that state is what reuse
                // is for. With one, the sandbox mirrors the host: a fresh copy, no stale files from earlier runs.
                let Some(local_path) = local_path else {
                    if !workspace.is_dir() {
                        create_private_dir(&workspace)?;
                    }
                    return Ok(None);
                };
                sync::empty_for_copy(&workspace, &local_path).map(Some)
            })
            .await?;
            let mut metadata = Map::new();
            if let Some(from) = &local_path {
                let manifest = sync::copy_tree(from, Path::new(&cwd)).await?;
                metadata.insert("files".to_owned(), manifest.len().into());
                metadata.insert("bytes".to_owned(), manifest.total_file_bytes().into());
                metadata.insert(MANIFEST_KEY.to_owned(), manifest.to_value());
            }
            tracing::debug!(
                run.id = %request.run_id,
                lease.id = %key.id(),
                workspace.cwd = %cwd,
                copied = local_path.is_some(),
                "fake workspace ready"
            );
            Ok(RealizedWorkspace {
                cwd,
                local_path,
                ephemeral: true,
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
            let (key, sandbox) = self.sandbox_dir(lease)?;
            let workspace_dir = self.workspace_dir(lease, workspace)?;
            let cwd = command_cwd(&workspace_dir, &request)?;
            let mut env = request.env;
            env.entry("HOME".to_owned())
                .or_insert_with(|| sandbox.display().to_string());
            let spec = ProcessSpec {
                argv: request.argv,
                env,
                cwd,
                stdin: request.stdin,
                timeout: request.timeout,
            };
            // The sandbox directory (HOME and workspace) comes back into view over the masked provider root.
            let spec = self.containment.confine(spec, &sandbox)?;
            let sink: &dyn OutputSink = if self.faults.drop_output {
                tracing::debug!(lease.id = %key.id(), "fake drop-output fault injected");
                &Discard
            } else {
                sink
            };
            run_process_tracked(spec, self.containment.tracking(), sink, cancel).await
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
            let workspace_dir = self.workspace_dir(lease, workspace)?;
            let Some(manifest) = workspace.metadata.get(MANIFEST_KEY) else {
                return Err(DriverError::failed(
                    "the workspace has no manifest from its copy-in; cannot tell what changed",
                ));
            };
            let manifest = Manifest::from_value(manifest)?;
            // What the sandbox holds is the command's doing: bounded by the environment's `syncBackMaxMb` (stamped on
            // the lease by the sandbox driver), never setuid, never through a link, special files left out.
            let limits = sync::SyncBackLimits::for_lease(lease);
            let report = sync::sync_back_with(&workspace_dir, host_dir, &manifest, &limits).await?;
            tracing::debug!(
                lease.id = ?lease.provider_lease_id,
                files_written = report.files_written,
                files_deleted = report.files_deleted,
                skipped = report.skipped.len(),
                "fake workspace synced back"
            );
            Ok(report)
        })
    }
}

fn image_of(config: &SandboxConfig) -> String {
    config
        .fields
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_IMAGE)
        .to_owned()
}

/// Creates the root if needed and makes sure only this user can enter it: the default root sits in the shared temp
/// directory, where another user could have made it first, or made it a symlink to somewhere of theirs.
fn ensure_private_root(root: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
    {
        Ok(()) => {}
        Err(err) => {
            return Err(io_error(format!(
                "creating the fake provider root {}",
                root.display()
            ))(err));
        }
    }
    let meta = std::fs::symlink_metadata(root).map_err(io_error(format!(
        "reading the fake provider root {}",
        root.display()
    )))?;
    if !meta.is_dir() {
        return Err(DriverError::failed(format!(
            "the fake provider root {} is not a directory (a symlink?)",
            root.display()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(DriverError::failed(format!(
            "the fake provider root {} belongs to another user",
            root.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(
            io_error(format!(
                "securing the fake provider root {}",
                root.display()
            )),
        )?;
    }
    Ok(())
}

fn config_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "image": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "default": DEFAULT_IMAGE,
                "description": "The image the fake sandbox pretends to run. Only reported back: the fake runs \
                                commands on the berth host, whatever the image."
            }
        }
    })
}
