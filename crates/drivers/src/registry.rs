//! The installed sandbox providers, and what this build can do.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_core::capabilities::{
    Capabilities, DriverCapability, ProviderSource, SandboxProviderCapability, SupportStatus,
};
use berth_core::environment::Driver;
use berth_core::provider::{ProviderCatalog, ProviderDescriptor, SandboxProvider};
use berth_fake_provider::FakeProvider;

use crate::error::DriverError;

/// Why no driver runs commands yet; shown in the capabilities so clients know it is coming, not broken.
const RUNS_LATER_NOTE: &str = "runs arrive with the run orchestrator";

/// Installed sandbox providers by key. Built once at startup and shared read-only; a `BTreeMap` keeps every listing
/// (capabilities, error messages) in a stable order.
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
    /// An empty registry: for tests that want full control over what is installed.
    pub fn new() -> Self {
        Self::default()
    }

    /// The providers compiled into this build: the fake.
    pub fn with_builtins() -> Result<Self, DriverError> {
        let mut registry = Self::new();
        registry.register(Arc::new(FakeProvider::new()?))?;
        Ok(registry)
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
        drivers.insert(
            Driver::Local,
            DriverCapability {
                status: SupportStatus::Supported,
                supports_saved_probe: true,
                supports_unsaved_probe: true,
                supports_run_execution: false,
                note: Some(RUNS_LATER_NOTE),
            },
        );
        drivers.insert(
            Driver::Ssh,
            unsupported("the SSH driver is not in this build yet"),
        );
        drivers.insert(
            Driver::Sandbox,
            DriverCapability {
                status: SupportStatus::Supported,
                supports_saved_probe: true,
                supports_unsaved_probe: true,
                supports_run_execution: false,
                note: Some(RUNS_LATER_NOTE),
            },
        );
        drivers.insert(
            Driver::Plugin,
            unsupported("no plugin host in this build yet"),
        );

        let sandbox_providers = self
            .providers
            .iter()
            .map(|(key, installed)| {
                let spec = installed.provider.descriptor().spec();
                let capability = SandboxProviderCapability {
                    status: SupportStatus::Supported,
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

fn unsupported(note: &'static str) -> DriverCapability {
    DriverCapability {
        status: SupportStatus::Unsupported,
        supports_saved_probe: false,
        supports_unsaved_probe: false,
        supports_run_execution: false,
        note: Some(note),
    }
}

#[cfg(test)]
mod tests {
    use berth_core::ErrorKind;
    use berth_core::config::DriverConfig;
    use serde_json::json;

    use super::*;

    #[test]
    fn builtins_hold_the_fake() {
        let registry = ProviderRegistry::with_builtins().unwrap();
        assert_eq!(registry.provider_keys(), ["fake"]);
        assert!(registry.get("fake").is_some());
        assert!(registry.get("e2b").is_none());
        assert_eq!(registry.provider("fake").unwrap().key(), "fake");
        assert!(registry.provider("e2b").is_none());
    }

    #[test]
    fn duplicate_keys_are_rejected_and_the_first_kept() {
        let mut registry = ProviderRegistry::with_builtins().unwrap();
        let first = registry.get("fake").unwrap();
        let second = FakeProvider::builder()
            .fail_probe("second")
            .build()
            .unwrap();
        let err = registry.register(Arc::new(second)).unwrap_err();
        assert_eq!(err.code(), "duplicate_provider");
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert!(err.to_string().contains("`fake`"));
        assert!(Arc::ptr_eq(&first, &registry.get("fake").unwrap()));
    }

    #[test]
    fn registry_serves_as_the_catalog_for_config_validation() {
        let registry = ProviderRegistry::with_builtins().unwrap();
        let parsed =
            DriverConfig::parse(Driver::Sandbox, &json!({"provider": "fake"}), &registry).unwrap();
        assert_eq!(parsed.to_stored().unwrap()["image"], "fake:latest");
        let err = DriverConfig::parse(Driver::Sandbox, &json!({"provider": "e2b"}), &registry)
            .unwrap_err();
        assert!(err.to_string().contains("installed: fake"), "{err}");
    }

    #[test]
    fn capabilities_describe_drivers_and_providers() {
        let capabilities = ProviderRegistry::with_builtins().unwrap().capabilities();
        assert_eq!(
            capabilities.drivers.keys().copied().collect::<Vec<_>>(),
            Driver::ALL
        );

        let local = &capabilities.drivers[&Driver::Local];
        assert_eq!(local.status, SupportStatus::Supported);
        assert!(local.supports_saved_probe && local.supports_unsaved_probe);
        assert!(!local.supports_run_execution);
        assert_eq!(local.note, Some("runs arrive with the run orchestrator"));

        let sandbox = &capabilities.drivers[&Driver::Sandbox];
        assert_eq!(sandbox.status, SupportStatus::Supported);
        assert!(sandbox.supports_saved_probe && sandbox.supports_unsaved_probe);
        assert!(!sandbox.supports_run_execution);

        let ssh = &capabilities.drivers[&Driver::Ssh];
        assert_eq!(ssh.status, SupportStatus::Unsupported);
        assert!(!ssh.supports_saved_probe && !ssh.supports_unsaved_probe);
        assert!(!ssh.supports_run_execution);
        assert_eq!(ssh.note, Some("the SSH driver is not in this build yet"));

        let plugin = &capabilities.drivers[&Driver::Plugin];
        assert_eq!(plugin.status, SupportStatus::Unsupported);
        assert!(!plugin.supports_saved_probe && !plugin.supports_unsaved_probe);
        assert_eq!(plugin.note, Some("no plugin host in this build yet"));

        assert_eq!(
            capabilities.sandbox_providers.keys().collect::<Vec<_>>(),
            ["fake"]
        );
        let fake = &capabilities.sandbox_providers["fake"];
        assert_eq!(fake.status, SupportStatus::Supported);
        assert_eq!(fake.source, ProviderSource::Builtin);
        assert_eq!(fake.display_name, "Fake sandbox");
        assert!(fake.description.contains("deterministic"));
        assert!(fake.supports_reusable_leases);
        assert!(!fake.supports_run_execution);
        assert_eq!(fake.config_schema, FakeProvider::spec().config_schema);
    }

    #[test]
    fn an_empty_registry_lists_no_providers() {
        let capabilities = ProviderRegistry::new().capabilities();
        assert!(capabilities.sandbox_providers.is_empty());
        assert_eq!(capabilities.drivers.len(), 4);
    }
}
