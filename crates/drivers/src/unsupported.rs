//! Drivers this build knows but cannot run commands with yet: plugin.
//!
//! Their configs validate and are stored like any other, so environments can be set up ahead of time; probes answer
//! `ok: false` with what is missing, and every run operation fails with [`DriverError::Unsupported`].

use berth_core::config::DriverConfig;
use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, EnvironmentDriver, ExecOutcome, ExecRequest, LeaseHandle,
    LeaseRequest, OutputSink, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;

/// What every run operation of an unsupported driver answers.
const OPERATION: &str = "run commands";

#[derive(Clone, Copy, Debug)]
pub struct UnsupportedDriver {
    driver: Driver,
}

// === impl UnsupportedDriver ===

impl UnsupportedDriver {
    pub fn plugin() -> Self {
        Self {
            driver: Driver::Plugin,
        }
    }

    fn refuse<T>(&self) -> Result<T, DriverError> {
        Err(DriverError::Unsupported {
            driver: self.driver,
            operation: OPERATION,
        })
    }
}

impl EnvironmentDriver for UnsupportedDriver {
    fn driver(&self) -> Driver {
        self.driver
    }

    fn probe<'a>(&'a self, config: &'a DriverConfig) -> BoxFuture<'a, ProbeResult> {
        let result = match config {
            DriverConfig::Plugin(plugin) => {
                let mut result = ProbeResult::failed(
                    Driver::Plugin,
                    format!(
                        "plugin environment drivers are not hosted yet: plugin `{}` cannot back a `plugin` environment",
                        plugin.plugin_key
                    ),
                );
                result
                    .details
                    .insert("pluginKey".to_owned(), plugin.plugin_key.clone().into());
                result
                    .details
                    .insert("driverKey".to_owned(), plugin.driver_key.clone().into());
                result
            }
            other => ProbeResult::failed(
                self.driver,
                format!(
                    "the {} driver cannot probe a {} config",
                    self.driver,
                    other.driver()
                ),
            ),
        };
        Box::pin(async move { result })
    }

    fn acquire<'a>(
        &'a self,
        _config: &'a DriverConfig,
        _request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move { self.refuse() })
    }

    fn matches_reusable_lease(&self, _config: &DriverConfig, _lease: &LeaseHandle) -> bool {
        false
    }

    fn resume<'a>(
        &'a self,
        _config: &'a DriverConfig,
        _lease: &'a LeaseHandle,
        _request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move { self.refuse() })
    }

    /// This build never made such a lease, so it cannot say what cleaning one up takes: refuse rather than report a
    /// cleanup that did not happen.
    fn release<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _keep: bool,
        _config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { self.refuse() })
    }

    fn destroy<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _config: Option<&'a DriverConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move { self.refuse() })
    }

    fn realize_workspace<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async move { self.refuse() })
    }

    fn execute<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _workspace: &'a RealizedWorkspace,
        _request: ExecRequest,
        _sink: &'a dyn OutputSink,
        _cancel: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>> {
        Box::pin(async move { self.refuse() })
    }

    fn sync_back<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        Box::pin(async move { self.refuse() })
    }
}
