//! The sandbox driver: hosts the installed sandbox providers and delegates every operation to one of them.
//!
//! New leases go to the provider the environment's config names (`config.provider`); everything done with a lease
//! afterwards goes to the provider recorded on the lease (`lease.provider`), which outlives config edits. The same
//! driver hosts plugins' environment drivers (`driver: "plugin"`), found by plugin and driver key instead.
//!
//! A provider that does not move workspaces itself ([`SandboxProvider::syncs_workspace`], a plugin) gets the same
//! sync as an SSH host: [`crate::remote_workspace`] through `sh -c` of `find` and `tar` run by the provider's
//! execute in the sandbox, conflicts and bounds included.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::config::{
    CONFIG_PATH, DRIVER_CONFIG_KEY, DriverConfig, SandboxConfig, SyncExclude,
};
use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, EnvironmentDriver, ExecOutcome, ExecRequest, LeaseHandle,
    LeaseRequest, OutputSink, OutputStream, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use berth_core::provider::{ProviderCatalog, SandboxProvider};
use berth_core::validation::{ValidationErrors, join_path};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::provider_registry::ProviderRegistry;
use crate::remote_shell::{RemoteShell, ScriptOutput};
use crate::remote_workspace::{self, SyncedIn};
use crate::sync::{HashCache, SyncBackLimits};

/// How long a sandbox provider may take to answer a probe: the plugin protocol's probe deadline (PLUGINS.md §4),
/// for built-in providers too. Providers talk to outside services; a hung one must not hang the request that asked.
pub const PROVIDER_PROBE_TIMEOUT: Duration = Duration::from_secs(120);

/// The `sandbox` driver (providers by `config.provider`) and the `plugin` driver (plugins' environment drivers by
/// `config.pluginKey`/`config.driverKey`): both delegate to a [`SandboxProvider`], looked up in their own table.
#[derive(Clone, Debug)]
pub struct SandboxDriver {
    kind: Driver,
    providers: Arc<ProviderRegistry>,
    /// Workspaces this driver synced in itself (for providers that do not), until their sync-back.
    synced: Arc<Mutex<HashMap<SyncKey, SyncedIn>>>,
    hashes: Arc<HashCache>,
}

/// A workspace synced in by the driver: the lease's resource and the workspace directory in it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SyncKey {
    provider_lease_id: Option<String>,
    cwd: String,
}

impl SyncKey {
    fn of(lease: &LeaseHandle, workspace: &RealizedWorkspace) -> Self {
        Self {
            provider_lease_id: lease.provider_lease_id.clone(),
            cwd: workspace.cwd.clone(),
        }
    }
}

// === impl SandboxDriver ===

impl SandboxDriver {
    /// The `sandbox` driver.
    pub fn new(providers: Arc<ProviderRegistry>) -> Self {
        Self::hosting(Driver::Sandbox, providers)
    }

    /// The `plugin` driver: plugins' `environment_driver`s.
    pub fn plugin(providers: Arc<ProviderRegistry>) -> Self {
        Self::hosting(Driver::Plugin, providers)
    }

    fn hosting(kind: Driver, providers: Arc<ProviderRegistry>) -> Self {
        Self {
            kind,
            providers,
            synced: Arc::default(),
            hashes: Arc::default(),
        }
    }

    pub fn providers(&self) -> &ProviderRegistry {
        &self.providers
    }

    fn not_installed(&self, key: &str) -> DriverError {
        match self.kind {
            Driver::Plugin => DriverError::ProviderNotInstalled {
                key: key.to_owned(),
                installed: self.providers.plugin_driver_keys(),
            },
            _ => DriverError::ProviderNotInstalled {
                key: key.to_owned(),
                installed: self.providers.provider_keys(),
            },
        }
    }

    /// The provider a config names, and the config as that provider takes it.
    fn for_config<'c>(
        &self,
        config: &'c DriverConfig,
    ) -> Result<(Cow<'c, SandboxConfig>, Arc<dyn SandboxProvider>), DriverError> {
        match (self.kind, config) {
            (Driver::Sandbox, DriverConfig::Sandbox(sandbox)) => {
                let provider = self
                    .providers
                    .get(&sandbox.provider)
                    .ok_or_else(|| self.not_installed(&sandbox.provider))?;
                Ok((Cow::Borrowed(sandbox), provider))
            }
            (Driver::Plugin, DriverConfig::Plugin(plugin)) => {
                let provider = self
                    .providers
                    .plugin_driver_provider(&plugin.plugin_key, &plugin.driver_key)
                    .ok_or_else(|| {
                        self.not_installed(&format!("{}/{}", plugin.plugin_key, plugin.driver_key))
                    })?;
                Ok((
                    Cow::Owned(SandboxConfig {
                        provider: plugin.driver_key.clone(),
                        reuse_lease: false,
                        timeout_ms: None,
                        sync_back_max_mb: None,
                        fields: plugin.driver_config.clone(),
                        secrets: plugin.secrets.clone(),
                    }),
                    provider,
                ))
            }
            (kind, other) => Err(DriverError::failed(format!(
                "the {kind} driver cannot use a {} config",
                other.driver()
            ))),
        }
    }

    fn for_lease(&self, lease: &LeaseHandle) -> Result<Arc<dyn SandboxProvider>, DriverError> {
        let Some(key) = lease.provider.as_deref() else {
            return Err(DriverError::failed(format!(
                "the {} lease does not name its provider",
                self.kind
            )));
        };
        let provider = match self.kind {
            Driver::Plugin => self.providers.plugin_driver_by_key(key),
            _ => self.providers.get(key),
        };
        provider.ok_or_else(|| self.not_installed(key))
    }

    /// `config` as the lease's provider takes it, when it is a config for that provider.
    fn config_for_lease<'c>(
        &self,
        lease: &LeaseHandle,
        config: Option<&'c DriverConfig>,
    ) -> Option<Cow<'c, SandboxConfig>> {
        let (sandbox, _) = self.for_config(config?).ok()?;
        (lease.provider.as_deref() == Some(sandbox.provider.as_str())).then_some(sandbox)
    }

    fn forget_synced(&self, lease: &LeaseHandle) {
        if let Ok(mut synced) = self.synced.lock() {
            synced.retain(|key, _| key.provider_lease_id != lease.provider_lease_id);
        }
    }

    async fn probe_sandbox(&self, config: &DriverConfig) -> ProbeResult {
        let (sandbox, provider) = match self.for_config(config) {
            Ok(found) => found,
            Err(error) => {
                let mut result = ProbeResult::failed(self.kind, error.to_string());
                if let (DriverError::ProviderNotInstalled { key, installed }, Driver::Sandbox) =
                    (&error, self.kind)
                {
                    result
                        .details
                        .insert("provider".to_owned(), key.clone().into());
                    result.details.insert(
                        "installedProviders".to_owned(),
                        Value::Array(installed.iter().cloned().map(Value::from).collect()),
                    );
                }
                return result;
            }
        };
        let mut result = match tokio::time::timeout(
            PROVIDER_PROBE_TIMEOUT,
            provider.probe(&sandbox),
        )
        .await
        {
            Ok(result) => result,
            Err(_elapsed) => {
                tracing::warn!(provider = %sandbox.provider, "sandbox provider probe timed out");
                let mut result = ProbeResult::failed(
                    self.kind,
                    format!(
                        "sandbox provider `{}` did not answer the probe within {} seconds",
                        sandbox.provider,
                        PROVIDER_PROBE_TIMEOUT.as_secs()
                    ),
                );
                result
                    .details
                    .insert("provider".to_owned(), sandbox.provider.clone().into());
                result
            }
        };
        result.driver = self.kind;
        result
    }
}

/// A sandbox as a [`RemoteShell`]: each script is one execute of `sh -c` in the run's workspace, through the
/// provider. What the provider takes as stdin is whole bytes, so a script's input is gathered first.
struct ProviderShell<'a> {
    provider: &'a dyn SandboxProvider,
    lease: &'a LeaseHandle,
    workspace: &'a RealizedWorkspace,
}

impl RemoteShell for ProviderShell<'_> {
    fn run_script<'a>(
        &'a self,
        script: &'a str,
        mut input: mpsc::Receiver<Vec<u8>>,
        output: Option<mpsc::Sender<Vec<u8>>>,
        limit: Duration,
    ) -> BoxFuture<'a, Result<ScriptOutput, DriverError>> {
        Box::pin(async move {
            let mut stdin = Vec::new();
            while let Some(chunk) = input.recv().await {
                stdin.extend_from_slice(&chunk);
            }
            let request = ExecRequest {
                argv: vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
                env: Default::default(),
                cwd: None,
                stdin: (!stdin.is_empty()).then_some(stdin),
                timeout: Some(limit),
            };
            let sink = ScriptSink {
                output,
                collected: Mutex::default(),
            };
            let outcome = self
                .provider
                .execute(
                    self.lease,
                    self.workspace,
                    request,
                    &sink,
                    Box::pin(std::future::pending()),
                )
                .await?;
            if outcome.timed_out {
                return Err(DriverError::failed(format!(
                    "a workspace command in the sandbox did not finish within {}s",
                    limit.as_secs()
                )));
            }
            let (stdout, stderr) = sink.collected.into_inner().unwrap_or_default();
            Ok(ScriptOutput {
                status: outcome
                    .exit_code
                    .map(|code| u32::try_from(code).unwrap_or(u32::MAX)),
                stdout,
                stderr,
            })
        })
    }
}

/// Most stderr a workspace script keeps: its first line is what error messages use.
const MAX_SCRIPT_STDERR: usize = 64 * 1024;

/// Where a workspace script's output goes: stdout to the channel (or collected), stderr collected, bounded.
struct ScriptSink {
    output: Option<mpsc::Sender<Vec<u8>>>,
    collected: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl OutputSink for ScriptSink {
    fn output<'a>(&'a self, stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            match (stream, &self.output) {
                // A receiver that stopped reading has its reason; the rest of the output is not needed.
                (OutputStream::Stdout, Some(output)) => drop(output.send(data.to_vec()).await),
                (OutputStream::Stdout, None) => {
                    if let Ok(mut collected) = self.collected.lock() {
                        collected.0.extend_from_slice(data);
                    }
                }
                (OutputStream::Stderr, _) => {
                    if let Ok(mut collected) = self.collected.lock() {
                        let room = MAX_SCRIPT_STDERR.saturating_sub(collected.1.len());
                        collected.1.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
            }
        })
    }
}

fn stamp(mut lease: LeaseHandle, sandbox: &SandboxConfig) -> LeaseHandle {
    lease.metadata.insert(
        berth_core::config::SYNC_BACK_MAX_MB_KEY.to_owned(),
        sandbox.sync_back_limit_mb().into(),
    );
    let key = sandbox.provider.as_str();
    if lease.provider.as_deref() != Some(key) {
        if lease.provider.is_some() {
            tracing::warn!(provider = %key, named = ?lease.provider, "a provider's lease named another provider");
        }
        lease.provider = Some(key.to_owned());
    }
    lease
}

impl EnvironmentDriver for SandboxDriver {
    fn driver(&self) -> Driver {
        self.kind
    }

    fn probe<'a>(&'a self, config: &'a DriverConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(self.probe_sandbox(config))
    }

    fn validate_config<'a>(&'a self, config: &'a DriverConfig) -> BoxFuture<'a, ValidationErrors> {
        Box::pin(async move {
            let mut problems = ValidationErrors::new();
            let Ok((sandbox, provider)) = self.for_config(config) else {
                return problems;
            };
            let prefix = match self.kind {
                Driver::Plugin => join_path(CONFIG_PATH, DRIVER_CONFIG_KEY),
                _ => CONFIG_PATH.to_owned(),
            };
            match provider.validate_config(&sandbox).await {
                Ok(found) => {
                    for problem in found.errors() {
                        problems.push(join_path(&prefix, &problem.path), problem.message.clone());
                    }
                }
                // The schema was checked; a provider that cannot judge now does not block the change.
                Err(error) => {
                    tracing::warn!(provider = %sandbox.provider, error = %error, "the provider could not validate a config")
                }
            }
            problems
        })
    }

    fn acquire<'a>(
        &'a self,
        config: &'a DriverConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move {
            let (sandbox, provider) = self.for_config(config)?;
            if !provider.descriptor().spec().supports_run_execution {
                return Err(DriverError::failed(format!(
                    "sandbox provider `{}` cannot run commands",
                    sandbox.provider
                )));
            }
            let lease = provider.acquire(&sandbox, request).await?;
            let lease = stamp(lease, &sandbox);
            tracing::debug!(
                run.id = %request.run_id,
                provider = %sandbox.provider,
                lease.id = ?lease.provider_lease_id,
                "sandbox lease acquired"
            );
            Ok(lease)
        })
    }

    fn matches_reusable_lease(&self, config: &DriverConfig, lease: &LeaseHandle) -> bool {
        let Ok((sandbox, provider)) = self.for_config(config) else {
            return false;
        };
        lease.provider.as_deref() == Some(sandbox.provider.as_str())
            && provider.matches_reusable_lease(&sandbox, lease)
    }

    fn resume<'a>(
        &'a self,
        config: &'a DriverConfig,
        lease: &'a LeaseHandle,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move {
            let (sandbox, provider) = self.for_config(config)?;
            if lease.provider.as_deref() != Some(sandbox.provider.as_str()) {
                return Ok(None);
            }
            let resumed = provider.resume(&sandbox, lease, request).await?;
            Ok(resumed.map(|lease| stamp(lease, &sandbox)))
        })
    }

    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.forget_synced(lease);
            let config = self.config_for_lease(lease, config);
            self.for_lease(lease)?
                .release(lease, keep, config.as_deref())
                .await
        })
    }

    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.forget_synced(lease);
            let config = self.config_for_lease(lease, config);
            self.for_lease(lease)?
                .destroy(lease, config.as_deref())
                .await
        })
    }

    fn open_tunnel<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        local: std::net::SocketAddr,
    ) -> BoxFuture<'a, Result<Option<berth_core::driver::Tunnel>, DriverError>> {
        Box::pin(async move { self.for_lease(lease)?.open_tunnel(lease, local).await })
    }

    fn realize_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async move {
            let provider = self.for_lease(lease)?;
            if provider.syncs_workspace() {
                return provider.prepare_workspace(lease, request).await;
            }
            // The provider makes an empty workspace; the driver brings the host's files in through `tar`.
            let empty = WorkspaceRequest {
                local_path: None,
                ..request.clone()
            };
            let mut workspace = provider.prepare_workspace(lease, &empty).await?;
            let Some(local) = &request.local_path else {
                return Ok(workspace);
            };
            let shell = ProviderShell {
                provider: &*provider,
                lease,
                workspace: &workspace,
            };
            let synced = remote_workspace::sync_in(
                &shell,
                local,
                &workspace.cwd,
                false,
                &SyncExclude::default(),
                &self.hashes,
            )
            .await?;
            workspace
                .metadata
                .insert("filesSent".to_owned(), synced.files_sent.into());
            workspace
                .metadata
                .insert("bytesSent".to_owned(), synced.bytes_sent.into());
            workspace.local_path = Some(local.clone());
            if let Ok(mut held) = self.synced.lock() {
                held.insert(SyncKey::of(lease, &workspace), synced);
            }
            tracing::debug!(run.id = %request.run_id, lease.id = ?lease.provider_lease_id, "workspace synced in through the provider's execute");
            Ok(workspace)
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
            self.for_lease(lease)?
                .execute(lease, workspace, request, sink, cancel)
                .await
        })
    }

    fn sync_back<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        Box::pin(async move {
            let provider = self.for_lease(lease)?;
            if provider.syncs_workspace() {
                return provider.sync_back(lease, workspace).await;
            }
            let synced = self
                .synced
                .lock()
                .ok()
                .and_then(|mut held| held.remove(&SyncKey::of(lease, workspace)));
            let (Some(local), Some(synced)) = (&workspace.local_path, synced) else {
                return Ok(SyncReport::default());
            };
            let shell = ProviderShell {
                provider: &*provider,
                lease,
                workspace,
            };
            // What the sandbox holds is the command's doing: bounded by the environment's `syncBackMaxMb` (stamped on
            // the lease), checked like any remote's.
            let limits = SyncBackLimits::for_lease(lease);
            remote_workspace::sync_back(
                &shell,
                &workspace.cwd,
                local,
                &synced,
                &SyncExclude::default(),
                &limits,
            )
            .await
        })
    }
}
