//! The installed sandbox providers, what this build can do, and the catalog config validation looks providers up in.
//!
//! Its own module, below the drivers: the sandbox driver dispatches to these providers and the driver registry
//! (`registry`) builds that driver from them, so the providers cannot live in the registry without the sandbox driver
//! importing the module that imports it.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_core::capabilities::{
    Capabilities, DriverCapability, ProviderSource, SandboxProviderCapability, SupportStatus,
};
use berth_core::driver::DriverError;
use berth_core::environment::Driver;
use berth_core::provider::{ProviderCatalog, ProviderDescriptor, SandboxProvider};

/// Installed sandbox providers by key. Built once at startup and shared read-only; a `BTreeMap` keeps every listing
/// (capabilities, error messages) in a stable order. Starts empty: the built-in fake registers itself
/// (`berth_fake_provider::register_builtin`), so this crate does not depend on any provider.
#[derive(Debug, Default)]
pub struct ProviderRegistry {
    providers: BTreeMap<String, Installed>,
    /// Plugins' `environment_driver`s (`driver: "plugin"`), by driver key (unique across everything installed).
    plugin_drivers: BTreeMap<String, Installed>,
    /// Plugin directories that were not loaded, and why: shown in capabilities.
    plugin_problems: Vec<String>,
}

#[derive(Debug)]
struct Installed {
    provider: Arc<dyn SandboxProvider>,
    source: ProviderSource,
    /// The plugin it lives in, for a plugin's provider.
    plugin_key: Option<String>,
}

// === impl ProviderRegistry ===

impl ProviderRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a built-in provider. Keys are unique: a second provider with the same key would make configs
    /// ambiguous, so it is refused rather than shadowing the first.
    pub fn register(&mut self, provider: Arc<dyn SandboxProvider>) -> Result<(), DriverError> {
        self.install(provider, None)
    }

    /// Installs a provider that lives in plugin `plugin_key` (capabilities say `source: plugin`).
    pub fn register_plugin(
        &mut self,
        provider: Arc<dyn SandboxProvider>,
        plugin_key: &str,
    ) -> Result<(), DriverError> {
        self.install(provider, Some(plugin_key.to_owned()))
    }

    fn install(
        &mut self,
        provider: Arc<dyn SandboxProvider>,
        plugin_key: Option<String>,
    ) -> Result<(), DriverError> {
        let key = provider.descriptor().key().to_owned();
        if self.providers.contains_key(&key) {
            return Err(DriverError::DuplicateProvider { key });
        }
        tracing::debug!(provider = %key, plugin.id = ?plugin_key, "sandbox provider registered");
        let source = if plugin_key.is_some() {
            ProviderSource::Plugin
        } else {
            ProviderSource::Builtin
        };
        self.providers.insert(
            key,
            Installed {
                provider,
                source,
                plugin_key,
            },
        );
        Ok(())
    }

    /// Installs plugin `plugin_key`'s environment driver, served like a sandbox provider. Its key must be free among
    /// providers and plugin drivers alike.
    pub fn register_plugin_driver(
        &mut self,
        driver: Arc<dyn SandboxProvider>,
        plugin_key: &str,
    ) -> Result<(), DriverError> {
        let key = driver.descriptor().key().to_owned();
        if self.providers.contains_key(&key) || self.plugin_drivers.contains_key(&key) {
            return Err(DriverError::DuplicateProvider { key });
        }
        tracing::debug!(driver.key = %key, plugin.id = %plugin_key, "plugin environment driver registered");
        self.plugin_drivers.insert(
            key,
            Installed {
                provider: driver,
                source: ProviderSource::Plugin,
                plugin_key: Some(plugin_key.to_owned()),
            },
        );
        Ok(())
    }

    /// Records a plugin that could not be loaded, for capabilities.
    pub fn note_plugin_problem(&mut self, message: String) {
        self.plugin_problems.push(message);
    }

    /// Every installed provider's and plugin driver's key: a plugin may take none of them.
    pub fn keys(&self) -> Vec<String> {
        self.providers
            .keys()
            .chain(self.plugin_drivers.keys())
            .cloned()
            .collect()
    }

    /// The environment driver `driver_key` of plugin `plugin_key`.
    pub fn plugin_driver_provider(
        &self,
        plugin_key: &str,
        driver_key: &str,
    ) -> Option<Arc<dyn SandboxProvider>> {
        self.plugin_drivers
            .get(driver_key)
            .filter(|installed| installed.plugin_key.as_deref() == Some(plugin_key))
            .map(|installed| Arc::clone(&installed.provider))
    }

    /// A plugin environment driver by its key alone (what a lease records).
    pub fn plugin_driver_by_key(&self, driver_key: &str) -> Option<Arc<dyn SandboxProvider>> {
        self.plugin_drivers
            .get(driver_key)
            .map(|installed| Arc::clone(&installed.provider))
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
        drivers.insert(Driver::Plugin, supported());
        Capabilities {
            drivers,
            sandbox_providers: listing(&self.providers),
            plugin_drivers: listing(&self.plugin_drivers),
            plugin_problems: self.plugin_problems.clone(),
        }
    }
}

/// Capabilities of installed providers or plugin drivers, by key.
fn listing(installed: &BTreeMap<String, Installed>) -> BTreeMap<String, SandboxProviderCapability> {
    installed
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
                plugin_key: installed.plugin_key.clone(),
                supports_reusable_leases: spec.supports_reusable_leases,
                supports_run_execution: spec.supports_run_execution,
                config_schema: spec.config_schema.clone(),
            };
            (key.clone(), capability)
        })
        .collect()
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

    fn plugin_driver(&self, plugin_key: &str, driver_key: &str) -> Option<&ProviderDescriptor> {
        self.plugin_drivers
            .get(driver_key)
            .filter(|installed| installed.plugin_key.as_deref() == Some(plugin_key))
            .map(|installed| installed.provider.descriptor())
    }

    fn plugin_driver_keys(&self) -> Vec<String> {
        self.plugin_drivers
            .iter()
            .map(|(key, installed)| {
                format!("{}/{key}", installed.plugin_key.as_deref().unwrap_or("?"))
            })
            .collect()
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
