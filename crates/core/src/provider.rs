//! The sandbox-provider contract.
//!
//! A sandbox provider turns a `sandbox` environment's config into places to run commands. Providers are chosen at
//! run time, so the trait is object safe: async methods return a boxed future ([`BoxFuture`]). What a provider
//! registers with (its spec and compiled descriptor) and the catalog config validation looks providers up in live in
//! [`crate::catalog`]; they are re-exported here, where providers have always found them.

use std::fmt;

pub use crate::catalog::{ProviderCatalog, ProviderDescriptor, ProviderSpec, is_valid_key};
use crate::config::SandboxConfig;
use crate::driver::{
    CancelSignal, DriverError, ExecOutcome, ExecRequest, LeaseHandle, LeaseRequest, OutputSink,
    RealizedWorkspace, SyncReport, WorkspaceRequest,
};
pub use crate::future::BoxFuture;
use crate::probe::ProbeResult;
use crate::validation::ValidationErrors;

/// A sandbox provider. The `sandbox` driver hosts these: it validates configs against the descriptor's schema, then
/// delegates every lease and run operation here. Leases are [`LeaseHandle`]s whose `provider` is this provider's key.
pub trait SandboxProvider: Send + Sync + fmt::Debug + 'static {
    fn descriptor(&self) -> &ProviderDescriptor;

    /// Whether it can serve leases now, and why not when it cannot (shown in capabilities).
    fn status(&self) -> (crate::capabilities::ProviderStatus, Option<String>) {
        (crate::capabilities::ProviderStatus::Ready, None)
    }

    /// Checks that the provider can serve `config`. Never errs: failures are `ok: false` results.
    fn probe<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult>;

    /// The provider's own judgement of `config` (secrets resolved), beyond its schema: problems with their paths
    /// relative to the provider fields (`apiKey`, `users.0.name`). Empty: accepted. The default accepts everything
    /// the schema accepted.
    fn validate_config<'a>(
        &'a self,
        _config: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<ValidationErrors, DriverError>> {
        Box::pin(async { Ok(ValidationErrors::new()) })
    }

    /// Creates a sandbox for a run.
    fn acquire<'a>(
        &'a self,
        config: &'a SandboxConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>>;

    /// Whether a sandbox kept by an earlier run (`lease`) can serve `config`.
    fn matches_reusable_lease(&self, config: &SandboxConfig, lease: &LeaseHandle) -> bool;

    /// Takes over a kept sandbox. `Ok(None)`: it is gone.
    fn resume<'a>(
        &'a self,
        config: &'a SandboxConfig,
        lease: &'a LeaseHandle,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>>;

    /// Ends a run's use of the sandbox: `keep` leaves it for reuse or inspection, otherwise it is removed.
    /// `config`: the config the lease was acquired with (else the environment's current one), secrets resolved,
    /// when berth has it — what a provider whose calls need credentials reaches the sandbox with.
    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>>;

    /// Removes the sandbox whatever it holds. `config` as for [`release`](Self::release).
    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>>;

    /// Whether the provider moves workspaces in and back itself ([`prepare_workspace`](Self::prepare_workspace)
    /// with a local path, [`sync_back`](Self::sync_back)). When it does not, the sandbox driver does, with `tar`
    /// run through [`execute`](Self::execute) in the sandbox, and asks it only for an empty workspace.
    fn syncs_workspace(&self) -> bool {
        true
    }

    /// Copies the workspace in (or creates an empty one) and returns where commands run.
    fn prepare_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>>;

    /// Runs a command in the sandbox; see [`crate::driver::EnvironmentDriver::execute`].
    fn execute<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
        request: ExecRequest,
        sink: &'a dyn OutputSink,
        cancel: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>>;

    /// Makes `local` (the run's callback bridge on this host's loopback) reachable from inside the sandbox while the
    /// tunnel lives; see [`crate::driver::EnvironmentDriver::open_tunnel`]. `None`: the sandbox shares this host's
    /// loopback.
    fn open_tunnel<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _local: std::net::SocketAddr,
    ) -> BoxFuture<'a, Result<Option<crate::driver::Tunnel>, DriverError>> {
        Box::pin(async { Ok(None) })
    }

    /// Copies what changed in the sandbox's workspace back to the host.
    fn sync_back<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>>;
}
