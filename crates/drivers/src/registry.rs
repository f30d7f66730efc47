//! The installed sandbox providers, the drivers, and what this build can do.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_core::capabilities::{
    Capabilities, DriverCapability, ProviderSource, SandboxProviderCapability, SupportStatus,
};
use berth_core::config::DriverConfig;
use berth_core::driver::{DriverError, EnvironmentDriver};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use berth_core::provider::{ProviderCatalog, ProviderDescriptor, SandboxProvider};

use crate::local::LocalDriver;
use crate::sandbox::SandboxDriver;
use crate::unsupported::UnsupportedDriver;

/// Installed sandbox providers by key. Built once at startup and shared read-only; a `BTreeMap` keeps every listing
/// (capabilities, error messages) in a stable order. Starts empty: the built-in fake registers itself
/// (`berth_fake_provider::register_builtin`), so this crate does not depend on any provider.
#[derive(Debug, Default)]
pub struct ProviderRegistry {
    providers: BTreeMap<String, Installed>,
}

#[derive(Debug)]
struct Installed {
    provider: Arc<dyn SandboxProvider>,
    source: ProviderSource,
}

// === impl ProviderRegistry ===

impl ProviderRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a built-in provider. Keys are unique: a second provider with the same key would make configs
    /// ambiguous, so it is refused rather than shadowing the first.
    pub fn register(&mut self, provider: Arc<dyn SandboxProvider>) -> Result<(), DriverError> {
        let key = provider.descriptor().key().to_owned();
        if self.providers.contains_key(&key) {
            return Err(DriverError::DuplicateProvider { key });
        }
        tracing::debug!(provider = %key, "sandbox provider registered");
        self.providers.insert(
            key,
            Installed {
                provider,
                source: ProviderSource::Builtin,
            },
        );
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<Arc<dyn SandboxProvider>> {
        self.providers
            .get(key)
            .map(|installed| Arc::clone(&installed.provider))
    }

    /// What this build supports, driver by driver, and every installed provider.
    pub fn capabilities(&self) -> Capabilities {
        let mut drivers = BTreeMap::new();
        drivers.insert(Driver::Local, supported());
        drivers.insert(Driver::Ssh, supported());
        drivers.insert(Driver::Sandbox, supported());
        drivers.insert(
            Driver::Plugin,
            unsupported("no plugin host in this build yet"),
        );

        let sandbox_providers = self
            .providers
            .iter()
            .map(|(key, installed)| {
                let spec = installed.provider.descriptor().spec();
                let (status, reason) = installed.provider.status();
                let capability = SandboxProviderCapability {
                    status,
                    reason,
                    display_name: spec.display_name.clone(),
                    description: spec.description.clone(),
                    source: installed.source,
                    supports_reusable_leases: spec.supports_reusable_leases,
                    supports_run_execution: spec.supports_run_execution,
                    config_schema: spec.config_schema.clone(),
                };
                (key.clone(), capability)
            })
            .collect();

        Capabilities {
            drivers,
            sandbox_providers,
        }
    }
}

impl ProviderCatalog for ProviderRegistry {
    fn provider(&self, key: &str) -> Option<&ProviderDescriptor> {
        self.providers
            .get(key)
            .map(|installed| installed.provider.descriptor())
    }

    fn provider_keys(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }
}

fn supported() -> DriverCapability {
    DriverCapability {
        status: SupportStatus::Supported,
        supports_saved_probe: true,
        supports_unsaved_probe: true,
        supports_run_execution: true,
        note: None,
    }
}

fn unsupported(note: &'static str) -> DriverCapability {
    DriverCapability {
        status: SupportStatus::Unsupported,
        supports_saved_probe: false,
        supports_unsaved_probe: false,
        supports_run_execution: false,
        note: Some(note),
    }
}

/// One driver per [`Driver`], chosen at run time: the server never matches on drivers itself.
#[derive(Debug, Clone)]
pub struct DriverRegistry {
    local: Arc<LocalDriver>,
    ssh: Arc<crate::ssh::SshDriver>,
    sandbox: Arc<SandboxDriver>,
    plugin: Arc<UnsupportedDriver>,
    providers: Arc<ProviderRegistry>,
}

// === impl DriverRegistry ===

impl DriverRegistry {
    pub fn new(local: LocalDriver, providers: Arc<ProviderRegistry>) -> Self {
        Self {
            local: Arc::new(local),
            ssh: Arc::new(crate::ssh::SshDriver::default()),
            sandbox: Arc::new(SandboxDriver::new(Arc::clone(&providers))),
            plugin: Arc::new(UnsupportedDriver::plugin()),
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

    pub fn providers(&self) -> &ProviderRegistry {
        &self.providers
    }

    pub fn capabilities(&self) -> Capabilities {
        self.providers.capabilities()
    }
}

#[cfg(test)]
mod tests;
