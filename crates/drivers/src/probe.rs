//! Probing an environment config: "could berth run commands there right now?".
//!
//! One entry point for every driver, so the server's probe routes (saved and unsaved configs alike) never match on
//! drivers themselves. Like every probe, it never errs: each failure is a result with `ok: false`.

use std::time::Duration;

use berth_core::config::{DriverConfig, SandboxConfig};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use berth_core::provider::ProviderCatalog;
use serde_json::Value;

use crate::error::installed_list;
use crate::local::LocalDriver;
use crate::registry::ProviderRegistry;

/// How long a sandbox provider may take to answer a probe. Providers talk to outside services; a hung one must not
/// hang the request that asked.
pub const PROVIDER_PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Probes `config` with the driver it names. Details use camelCase keys, as they go to clients as they are.
pub async fn probe(
    config: &DriverConfig,
    local: &LocalDriver,
    providers: &ProviderRegistry,
) -> ProbeResult {
    match config {
        DriverConfig::Local => local.probe().await,
        DriverConfig::Ssh(_) => ProbeResult::failed(
            Driver::Ssh,
            "the ssh driver is not available in this build yet; the config is valid",
        ),
        DriverConfig::Sandbox(sandbox) => probe_sandbox(sandbox, providers).await,
        DriverConfig::Plugin(plugin) => {
            let mut result = ProbeResult::failed(
                Driver::Plugin,
                format!(
                    "no plugin host in this build: plugin `{}` is not installed",
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
    }
}

async fn probe_sandbox(sandbox: &SandboxConfig, providers: &ProviderRegistry) -> ProbeResult {
    let Some(provider) = providers.get(&sandbox.provider) else {
        // Validation normally catches this; a stored config can still outlive the provider it names.
        let installed = providers.provider_keys();
        let mut result = ProbeResult::failed(
            Driver::Sandbox,
            format!(
                "sandbox provider `{}` is not installed (installed: {})",
                sandbox.provider,
                installed_list(&installed)
            ),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use berth_core::provider::{BoxFuture, ProviderDescriptor, ProviderSpec, SandboxProvider};
    use berth_fake_provider::FakeProvider;
    use serde_json::{Map, json};

    use super::*;

    fn parse(driver: Driver, config: Value, providers: &ProviderRegistry) -> DriverConfig {
        DriverConfig::parse(driver, &config, providers).unwrap()
    }

    fn sandbox(provider: &str) -> DriverConfig {
        DriverConfig::Sandbox(SandboxConfig {
            provider: provider.to_owned(),
            reuse_lease: false,
            timeout_ms: None,
            fields: Map::new(),
        })
    }

    #[tokio::test]
    async fn local_configs_probe_the_local_driver() {
        let temp = tempfile::tempdir().unwrap();
        let providers = ProviderRegistry::with_builtins().unwrap();
        let local = LocalDriver::new(temp.path());
        let config = parse(Driver::Local, json!({}), &providers);
        let result = probe(&config, &local, &providers).await;
        assert!(result.ok, "{result:?}");
        assert_eq!(result.driver, Driver::Local);
        assert!(result.details.contains_key("freeDiskBytes"));
    }

    #[tokio::test]
    async fn ssh_configs_are_valid_but_not_probed_yet() {
        let temp = tempfile::tempdir().unwrap();
        let providers = ProviderRegistry::with_builtins().unwrap();
        let config = parse(
            Driver::Ssh,
            json!({"host": "build.example", "username": "ci", "remoteWorkspacePath": "/srv/work"}),
            &providers,
        );
        let result = probe(&config, &LocalDriver::new(temp.path()), &providers).await;
        assert!(!result.ok);
        assert_eq!(result.driver, Driver::Ssh);
        assert_eq!(
            result.summary,
            "the ssh driver is not available in this build yet; the config is valid"
        );
    }

    #[tokio::test]
    async fn sandbox_configs_probe_their_provider() {
        let temp = tempfile::tempdir().unwrap();
        let providers = ProviderRegistry::with_builtins().unwrap();
        let config = parse(
            Driver::Sandbox,
            json!({"provider": "fake", "image": "demo:2"}),
            &providers,
        );
        let result = probe(&config, &LocalDriver::new(temp.path()), &providers).await;
        assert!(result.ok, "{result:?}");
        assert_eq!(result.driver, Driver::Sandbox);
        assert_eq!(result.summary, "fake sandbox provider ready (image demo:2)");
        assert_eq!(result.details["reuseLease"], false);
    }

    #[tokio::test]
    async fn sandbox_probe_faults_surface_as_failed_results() {
        let temp = tempfile::tempdir().unwrap();
        let mut providers = ProviderRegistry::new();
        let faulty = FakeProvider::builder()
            .fail_probe("fake is down")
            .build()
            .unwrap();
        providers.register(Arc::new(faulty)).unwrap();
        let result = probe(&sandbox("fake"), &LocalDriver::new(temp.path()), &providers).await;
        assert!(!result.ok);
        assert_eq!(result.summary, "fake is down");
    }

    #[tokio::test]
    async fn unknown_providers_fail_naming_the_installed_ones() {
        let temp = tempfile::tempdir().unwrap();
        let providers = ProviderRegistry::with_builtins().unwrap();
        let result = probe(&sandbox("e2b"), &LocalDriver::new(temp.path()), &providers).await;
        assert!(!result.ok);
        assert_eq!(result.driver, Driver::Sandbox);
        assert_eq!(
            result.summary,
            "sandbox provider `e2b` is not installed (installed: fake)"
        );
        assert_eq!(
            Value::Object(result.details),
            json!({"provider": "e2b", "installedProviders": ["fake"]})
        );

        let empty = ProviderRegistry::new();
        let result = probe(&sandbox("e2b"), &LocalDriver::new(temp.path()), &empty).await;
        assert!(
            result.summary.ends_with("(installed: none)"),
            "{}",
            result.summary
        );
    }

    #[tokio::test]
    async fn plugin_configs_fail_without_a_plugin_host() {
        let temp = tempfile::tempdir().unwrap();
        let providers = ProviderRegistry::with_builtins().unwrap();
        let config = parse(
            Driver::Plugin,
            json!({"pluginKey": "acme", "driverKey": "vm", "driverConfig": {}}),
            &providers,
        );
        let result = probe(&config, &LocalDriver::new(temp.path()), &providers).await;
        assert!(!result.ok);
        assert_eq!(result.driver, Driver::Plugin);
        assert_eq!(
            result.summary,
            "no plugin host in this build: plugin `acme` is not installed"
        );
        assert_eq!(
            Value::Object(result.details),
            json!({"pluginKey": "acme", "driverKey": "vm"})
        );
    }

    /// A provider whose probe never answers.
    #[derive(Debug)]
    struct Hung(ProviderDescriptor);

    impl SandboxProvider for Hung {
        fn descriptor(&self) -> &ProviderDescriptor {
            &self.0
        }

        fn probe<'a>(&'a self, _config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hung_providers_time_out() {
        let temp = tempfile::tempdir().unwrap();
        let mut providers = ProviderRegistry::new();
        let descriptor = ProviderDescriptor::new(ProviderSpec {
            key: "hung".to_owned(),
            display_name: "Hung".to_owned(),
            description: "Never answers".to_owned(),
            config_schema: json!({"type": "object"}),
            supports_reusable_leases: false,
            supports_run_execution: false,
        })
        .unwrap();
        providers.register(Arc::new(Hung(descriptor))).unwrap();
        let result = probe(&sandbox("hung"), &LocalDriver::new(temp.path()), &providers).await;
        assert!(!result.ok);
        assert_eq!(
            result.summary,
            "sandbox provider `hung` did not answer the probe within 30 seconds"
        );
    }
}
