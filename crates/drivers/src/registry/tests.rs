use berth_core::ErrorKind;
use berth_core::capabilities::{ProviderSource, SupportStatus};
use berth_core::config::SandboxConfig;
use berth_core::driver::{ExecRequest, LeaseHandle, WorkspaceRequest};
use berth_core::provider::{ProviderCatalog, SandboxProvider};
use serde_json::{Map, Value, json};

use super::*;
use crate::test_support::{Collect, StubProvider as Stub, lease_request, never};

fn with_stub() -> (Arc<Stub>, Arc<ProviderRegistry>) {
    let stub = Arc::new(Stub::new("stub", true));
    let mut registry = ProviderRegistry::new();
    registry
        .register(Arc::clone(&stub) as Arc<dyn SandboxProvider>)
        .unwrap();
    registry
        .register(Arc::new(Stub::new("no-runs", false)))
        .unwrap();
    (stub, Arc::new(registry))
}

fn sandbox(provider: &str) -> DriverConfig {
    DriverConfig::Sandbox(SandboxConfig {
        provider: provider.to_owned(),
        reuse_lease: false,
        timeout_ms: None,
        sync_back_max_mb: None,
        fields: Map::new(),
        secrets: Default::default(),
    })
}

fn parse(driver: Driver, config: Value, providers: &ProviderRegistry) -> DriverConfig {
    DriverConfig::parse(driver, &config, providers).unwrap()
}

fn drivers(temp: &tempfile::TempDir, providers: Arc<ProviderRegistry>) -> DriverRegistry {
    DriverRegistry::new(
        LocalDriver::new(
            temp.path(),
            crate::contain::Containment::disabled_for_tests(),
        ),
        providers,
    )
}

#[test]
fn duplicate_keys_are_rejected_and_the_first_kept() {
    let (stub, providers) = with_stub();
    let mut registry = Arc::try_unwrap(providers).unwrap();
    let err = registry
        .register(Arc::new(Stub::new("stub", false)))
        .unwrap_err();
    assert_eq!(err.code(), "duplicate_provider");
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("`stub`"));
    let kept = registry.get("stub").unwrap();
    assert!(std::ptr::addr_eq(Arc::as_ptr(&kept), Arc::as_ptr(&stub)));
    assert!(registry.get("e2b").is_none());
    assert_eq!(registry.provider("stub").unwrap().key(), "stub");
    assert!(registry.provider("e2b").is_none());
    assert_eq!(registry.provider_keys(), ["no-runs", "stub"]);
}

#[test]
fn registry_serves_as_the_catalog_for_config_validation() {
    let (_, providers) = with_stub();
    let parsed = parse(
        Driver::Sandbox,
        json!({"provider": "stub", "x": 1}),
        &providers,
    );
    assert_eq!(parsed.to_stored().unwrap()["x"], 1);
    let err = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "e2b"}),
        providers.as_ref(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("installed: no-runs, stub"),
        "{err}"
    );
}

#[test]
fn capabilities_describe_drivers_and_providers() {
    let temp = tempfile::tempdir().unwrap();
    let (_, providers) = with_stub();
    let capabilities = drivers(&temp, providers).capabilities();
    assert_eq!(
        capabilities.drivers.keys().copied().collect::<Vec<_>>(),
        Driver::ALL
    );
    for driver in [Driver::Local, Driver::Ssh, Driver::Sandbox, Driver::Plugin] {
        let capability = &capabilities.drivers[&driver];
        assert_eq!(capability.status, SupportStatus::Supported);
        assert!(capability.supports_saved_probe && capability.supports_unsaved_probe);
        assert!(capability.supports_run_execution);
        assert_eq!(capability.note, None);
    }

    assert!(capabilities.plugin_drivers.is_empty());

    assert_eq!(
        capabilities.sandbox_providers.keys().collect::<Vec<_>>(),
        ["no-runs", "stub"]
    );
    let stub = &capabilities.sandbox_providers["stub"];
    assert_eq!(stub.status, berth_core::capabilities::ProviderStatus::Ready);
    assert_eq!(stub.source, ProviderSource::Builtin);
    assert_eq!(stub.display_name, "Stub stub");
    assert!(stub.supports_reusable_leases);
    assert!(stub.supports_run_execution);
    assert!(!capabilities.sandbox_providers["no-runs"].supports_run_execution);
    assert_eq!(stub.config_schema, json!({"type": "object"}));
}

#[test]
fn an_empty_registry_lists_no_providers() {
    let capabilities = ProviderRegistry::new().capabilities();
    assert!(capabilities.sandbox_providers.is_empty());
    assert_eq!(capabilities.drivers.len(), 4);
}

#[test]
fn each_driver_kind_gets_its_driver() {
    let temp = tempfile::tempdir().unwrap();
    let registry = drivers(&temp, Arc::new(ProviderRegistry::new()));
    for driver in Driver::ALL {
        assert_eq!(registry.get(driver).driver(), driver);
    }
    assert_eq!(registry.local().workspace_root(), temp.path());
    assert!(registry.providers().provider_keys().is_empty());
}

#[tokio::test]
async fn local_configs_probe_the_local_driver() {
    let temp = tempfile::tempdir().unwrap();
    let (_, providers) = with_stub();
    let config = parse(Driver::Local, json!({}), &providers);
    let result = drivers(&temp, providers).probe(&config).await;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.driver, Driver::Local);
    assert!(result.details.contains_key("freeDiskBytes"));
}

#[tokio::test]
async fn ssh_leases_on_a_dead_host_fail_with_what_failed() {
    let temp = tempfile::tempdir().unwrap();
    let (_, providers) = with_stub();
    let config = parse(
        Driver::Ssh,
        // Port 1 on loopback: nothing listens, so the probe fails at once, and says so.
        json!({"host": "127.0.0.1", "port": 1, "username": "ci", "remoteWorkspacePath": "/srv/work"}),
        &providers,
    );
    let registry = drivers(&temp, providers);
    let result = registry.probe(&config).await;
    assert!(!result.ok);
    assert_eq!(result.driver, Driver::Ssh);
    assert!(
        result
            .summary
            .starts_with("cannot connect to ci@127.0.0.1:1"),
        "{}",
        result.summary
    );
    let err = registry
        .get(Driver::Ssh)
        .acquire(&config, &lease_request())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "driver_failed");
    assert!(
        err.to_string()
            .starts_with("cannot connect to ci@127.0.0.1:1"),
        "{err}"
    );
}

#[tokio::test]
async fn plugin_environment_drivers_are_hosted_like_providers() {
    let temp = tempfile::tempdir().unwrap();
    let vm = Arc::new(Stub::new("vm", true));
    let (_, providers) = with_stub();
    let mut providers = Arc::try_unwrap(providers).unwrap();
    providers
        .register_plugin_driver(Arc::clone(&vm) as Arc<dyn SandboxProvider>, "acme")
        .unwrap();
    // Driver keys are unique across providers and plugin drivers.
    let clash = providers.register_plugin_driver(Arc::new(Stub::new("stub", true)), "other");
    assert_eq!(clash.unwrap_err().code(), "duplicate_provider");
    assert_eq!(providers.keys(), ["no-runs", "stub", "vm"]);
    let capabilities = providers.capabilities();
    assert_eq!(
        capabilities.drivers[&Driver::Plugin].status,
        SupportStatus::Supported
    );
    assert!(!capabilities.sandbox_providers.contains_key("vm"));
    assert_eq!(
        capabilities.plugin_drivers["vm"].plugin_key.as_deref(),
        Some("acme")
    );
    let providers = Arc::new(providers);

    let config = parse(
        Driver::Plugin,
        json!({"pluginKey": "acme", "driverKey": "vm", "driverConfig": {"size": 2}}),
        &providers,
    );
    let wrong_plugin = DriverConfig::parse(
        Driver::Plugin,
        &json!({"pluginKey": "other", "driverKey": "vm"}),
        &*providers,
    )
    .unwrap_err();
    assert!(
        wrong_plugin.errors()[0]
            .message
            .contains("installed: acme/vm"),
        "{wrong_plugin:?}"
    );
    let registry = drivers(&temp, providers);
    let result = registry.probe(&config).await;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.driver, Driver::Plugin);

    let plugin = registry.get(Driver::Plugin);
    assert_eq!(plugin.driver(), Driver::Plugin);
    let lease = plugin.acquire(&config, &lease_request()).await.unwrap();
    assert_eq!(lease.provider.as_deref(), Some("vm"));
    // The sandbox driver does not serve plugin drivers' leases, nor the plugin driver providers' leases.
    let sandbox = registry.get(Driver::Sandbox);
    assert!(sandbox.release(&lease, false, None).await.is_err());
    plugin.release(&lease, false, Some(&config)).await.unwrap();
    plugin.destroy(&lease, None).await.unwrap();
    assert_eq!(
        vm.calls(),
        ["acquire", "release keep=false with config", "destroy"]
    );
    let stray = LeaseHandle {
        provider: Some("stub".to_owned()),
        ..LeaseHandle::default()
    };
    let err = plugin.release(&stray, false, None).await.unwrap_err();
    assert_eq!(err.code(), "provider_not_installed");
    assert!(err.to_string().contains("acme/vm"), "{err}");
}

#[tokio::test]
async fn sandbox_configs_probe_their_provider() {
    let temp = tempfile::tempdir().unwrap();
    let (_, providers) = with_stub();
    let result = drivers(&temp, providers).probe(&sandbox("stub")).await;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.summary, "stub ready");
}

#[tokio::test]
async fn unknown_providers_fail_naming_the_installed_ones() {
    let temp = tempfile::tempdir().unwrap();
    let (_, providers) = with_stub();
    let registry = drivers(&temp, providers);
    let result = registry.probe(&sandbox("e2b")).await;
    assert!(!result.ok);
    assert_eq!(result.driver, Driver::Sandbox);
    assert_eq!(
        result.summary,
        "sandbox provider `e2b` is not installed (installed: no-runs, stub)"
    );
    assert_eq!(
        Value::Object(result.details),
        json!({"provider": "e2b", "installedProviders": ["no-runs", "stub"]})
    );
    let err = registry
        .get(Driver::Sandbox)
        .acquire(&sandbox("e2b"), &lease_request())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "provider_not_installed");

    let empty = drivers(&temp, Arc::new(ProviderRegistry::new()));
    let result = empty.probe(&sandbox("e2b")).await;
    assert!(
        result.summary.ends_with("(installed: none)"),
        "{}",
        result.summary
    );
}

#[tokio::test(start_paused = true)]
async fn hung_providers_time_out() {
    let temp = tempfile::tempdir().unwrap();
    let mut providers = ProviderRegistry::new();
    providers.register(Arc::new(Stub::hung("hung"))).unwrap();
    let result = drivers(&temp, Arc::new(providers))
        .probe(&sandbox("hung"))
        .await;
    assert!(!result.ok);
    assert_eq!(
        result.summary,
        "sandbox provider `hung` did not answer the probe within 120 seconds"
    );
    assert_eq!(result.details["provider"], "hung");
}

#[tokio::test]
async fn the_sandbox_driver_delegates_to_the_lease_provider() {
    let temp = tempfile::tempdir().unwrap();
    let (stub, providers) = with_stub();
    let registry = drivers(&temp, providers);
    let driver = registry.get(Driver::Sandbox);
    let request = lease_request();

    let lease = driver.acquire(&sandbox("stub"), &request).await.unwrap();
    assert_eq!(lease.provider.as_deref(), Some("stub"));
    assert_eq!(
        lease.provider_lease_id,
        Some(format!("stub://{}", request.run_id))
    );
    let workspace = driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(workspace.cwd, "/stub");
    let sink = Collect::default();
    let command = ExecRequest {
        argv: vec!["echo".to_owned(), "hi".to_owned()],
        env: std::collections::BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout: None,
    };
    let outcome = driver
        .execute(&lease, &workspace, command, &sink, never())
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(sink.0.lock().unwrap().as_slice(), b"stub output");
    assert_eq!(
        driver
            .sync_back(&lease, &workspace)
            .await
            .unwrap()
            .files_written,
        1
    );
    driver.release(&lease, true, None).await.unwrap();
    driver.destroy(&lease, None).await.unwrap();

    // Reuse goes through the provider, and only for leases of the provider the config names.
    let mut kept = lease.clone();
    kept.metadata.insert("reusable".to_owned(), true.into());
    assert!(driver.matches_reusable_lease(&sandbox("stub"), &kept));
    assert!(!driver.matches_reusable_lease(&sandbox("stub"), &lease));
    assert!(!driver.matches_reusable_lease(&sandbox("no-runs"), &kept));
    assert!(!driver.matches_reusable_lease(&DriverConfig::local(), &kept));
    assert_eq!(
        driver
            .resume(&sandbox("stub"), &kept, &request)
            .await
            .unwrap(),
        Some(kept.clone())
    );
    assert_eq!(
        driver
            .resume(&sandbox("no-runs"), &kept, &request)
            .await
            .unwrap(),
        None
    );

    assert_eq!(
        stub.calls(),
        [
            "acquire",
            "prepare",
            "execute echo hi",
            "sync_back",
            "release keep=true",
            "destroy",
            "resume"
        ]
    );

    // Leases of providers that are gone, or that name none, cannot be used.
    let mut orphan = lease.clone();
    orphan.provider = Some("e2b".to_owned());
    let err = driver.release(&orphan, false, None).await.unwrap_err();
    assert_eq!(err.code(), "provider_not_installed");
    orphan.provider = None;
    assert_eq!(
        driver.destroy(&orphan, None).await.unwrap_err().code(),
        "driver_failed"
    );

    // A provider that cannot run commands gets no leases.
    let err = driver
        .acquire(&sandbox("no-runs"), &request)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "sandbox provider `no-runs` cannot run commands"
    );
    assert!(
        driver
            .acquire(&DriverConfig::local(), &request)
            .await
            .is_err()
    );
}
