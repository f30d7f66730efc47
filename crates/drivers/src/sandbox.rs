//! The sandbox driver: hosts the installed sandbox providers and delegates every operation to one of them.
//!
//! New leases go to the provider the environment's config names (`config.provider`); everything done with a lease
//! afterwards goes to the provider recorded on the lease (`lease.provider`), which outlives config edits.

use std::sync::Arc;
use std::time::Duration;

use berth_core::config::{DriverConfig, SandboxConfig};
use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, EnvironmentDriver, ExecOutcome, ExecRequest, LeaseHandle,
    LeaseRequest, OutputSink, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use berth_core::provider::{ProviderCatalog, SandboxProvider};
use serde_json::Value;

use crate::provider_registry::ProviderRegistry;

/// How long a sandbox provider may take to answer a probe. Providers talk to outside services; a hung one must not
/// hang the request that asked.
pub const PROVIDER_PROBE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct SandboxDriver {
    providers: Arc<ProviderRegistry>,
}

// === impl SandboxDriver ===

impl SandboxDriver {
    pub fn new(providers: Arc<ProviderRegistry>) -> Self {
        Self { providers }
    }

    pub fn providers(&self) -> &ProviderRegistry {
        &self.providers
    }

    fn not_installed(&self, key: &str) -> DriverError {
        DriverError::ProviderNotInstalled {
            key: key.to_owned(),
            installed: self.providers.provider_keys(),
        }
    }

    /// The provider an environment's config names, for operations that start from the config.
    fn for_config<'c>(
        &self,
        config: &'c DriverConfig,
    ) -> Result<(&'c SandboxConfig, Arc<dyn SandboxProvider>), DriverError> {
        let DriverConfig::Sandbox(sandbox) = config else {
            return Err(DriverError::failed(format!(
                "the sandbox driver cannot use a {} config",
                config.driver()
            )));
        };
        let provider = self
            .providers
            .get(&sandbox.provider)
            .ok_or_else(|| self.not_installed(&sandbox.provider))?;
        Ok((sandbox, provider))
    }

    /// The provider that made `lease`.
    fn for_lease(&self, lease: &LeaseHandle) -> Result<Arc<dyn SandboxProvider>, DriverError> {
        let Some(key) = lease.provider.as_deref() else {
            return Err(DriverError::failed(
                "the sandbox lease does not name its provider",
            ));
        };
        self.providers
            .get(key)
            .ok_or_else(|| self.not_installed(key))
    }

    async fn probe_sandbox(&self, sandbox: &SandboxConfig) -> ProbeResult {
        let Some(provider) = self.providers.get(&sandbox.provider) else {
            // Validation normally catches this; a stored config can still outlive the provider it names.
            let installed = self.providers.provider_keys();
            let mut result = ProbeResult::failed(
                Driver::Sandbox,
                self.not_installed(&sandbox.provider).to_string(),
            );
            result
                .details
                .insert("provider".to_owned(), sandbox.provider.clone().into());
            result.details.insert(
                "installedProviders".to_owned(),
                Value::Array(installed.into_iter().map(Value::from).collect()),
            );
            return result;
        };
        match tokio::time::timeout(PROVIDER_PROBE_TIMEOUT, provider.probe(sandbox)).await {
            Ok(result) => result,
            Err(_elapsed) => {
                tracing::warn!(provider = %sandbox.provider, "sandbox provider probe timed out");
                let mut result = ProbeResult::failed(
                    Driver::Sandbox,
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
        }
    }
}

/// Leases always name the provider that made them, whatever the provider filled in: later operations dispatch on it.
/// They also carry the environment's sync-back bound (`syncBackMaxMb`), a field common to every sandbox config, which
/// providers read back with [`SyncBackLimits::for_lease`](crate::sync::SyncBackLimits::for_lease).
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
        Driver::Sandbox
    }

    fn probe<'a>(&'a self, config: &'a DriverConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move {
            match config {
                DriverConfig::Sandbox(sandbox) => self.probe_sandbox(sandbox).await,
                other => ProbeResult::failed(
                    Driver::Sandbox,
                    format!(
                        "the sandbox driver cannot probe a {} config",
                        other.driver()
                    ),
                ),
            }
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
            let lease = provider.acquire(sandbox, request).await?;
            let lease = stamp(lease, sandbox);
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
            && provider.matches_reusable_lease(sandbox, lease)
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
                // The environment moved to another provider since the lease was kept: it cannot be taken over.
                return Ok(None);
            }
            let resumed = provider.resume(sandbox, lease, request).await?;
            Ok(resumed.map(|lease| stamp(lease, sandbox)))
        })
    }

    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        _config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { self.for_lease(lease)?.release(lease, keep).await })
    }

    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        _config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { self.for_lease(lease)?.destroy(lease).await })
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
            self.for_lease(lease)?
                .prepare_workspace(lease, request)
                .await
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
        Box::pin(async move { self.for_lease(lease)?.sync_back(lease, workspace).await })
    }
}
