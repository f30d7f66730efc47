//! The drivers, one per driver kind, and what this build can do. The installed sandbox providers are
//! [`crate::provider_registry`]'s.

use std::sync::Arc;

use berth_core::capabilities::Capabilities;
use berth_core::config::DriverConfig;
use berth_core::driver::EnvironmentDriver;
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;

use crate::local::LocalDriver;
/// Re-exported: the registry is where the server and tests have always found the provider registry.
pub use crate::provider_registry::ProviderRegistry;
use crate::sandbox::SandboxDriver;

/// One driver per [`Driver`], chosen at run time: the server never matches on drivers itself.
#[derive(Debug, Clone)]
pub struct DriverRegistry {
    local: Arc<LocalDriver>,
    ssh: Arc<crate::ssh::SshDriver>,
    sandbox: Arc<SandboxDriver>,
    plugin: Arc<SandboxDriver>,
    providers: Arc<ProviderRegistry>,
}

// === impl DriverRegistry ===

impl DriverRegistry {
    pub fn new(local: LocalDriver, providers: Arc<ProviderRegistry>) -> Self {
        Self {
            local: Arc::new(local),
            ssh: Arc::new(crate::ssh::SshDriver::default()),
            sandbox: Arc::new(SandboxDriver::new(Arc::clone(&providers))),
            plugin: Arc::new(SandboxDriver::plugin(Arc::clone(&providers))),
            providers,
        }
    }

    pub fn get(&self, driver: Driver) -> Arc<dyn EnvironmentDriver> {
        match driver {
            Driver::Local => Arc::clone(&self.local) as Arc<dyn EnvironmentDriver>,
            Driver::Ssh => Arc::clone(&self.ssh) as Arc<dyn EnvironmentDriver>,
            Driver::Sandbox => Arc::clone(&self.sandbox) as Arc<dyn EnvironmentDriver>,
            Driver::Plugin => Arc::clone(&self.plugin) as Arc<dyn EnvironmentDriver>,
        }
    }

    /// The local driver itself, for what only it has (its workspace root).
    pub fn local(&self) -> &LocalDriver {
        &self.local
    }

    /// Probes `config` with the driver it names. Never errs: failures are `ok: false`. Sandbox providers get
    /// [`PROVIDER_PROBE_TIMEOUT`](crate::sandbox::PROVIDER_PROBE_TIMEOUT) to answer.
    pub async fn probe(&self, config: &DriverConfig) -> ProbeResult {
        self.get(config.driver()).probe(config).await
    }

    /// Asks `config`'s driver (a plugin's `environmentValidateConfig`) whether it takes the config; see
    /// [`EnvironmentDriver::validate_config`].
    pub async fn validate(
        &self,
        config: &DriverConfig,
    ) -> berth_core::validation::ValidationErrors {
        self.get(config.driver()).validate_config(config).await
    }

    pub fn providers(&self) -> &ProviderRegistry {
        &self.providers
    }

    pub fn capabilities(&self) -> Capabilities {
        self.providers.capabilities()
    }
}

#[cfg(test)]
mod tests;
