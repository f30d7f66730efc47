//! The fake behind the real driver stack: `register_builtin` → `DriverRegistry` → the sandbox driver, as the server
//! wires it.

use std::sync::Arc;

use berth_core::capabilities::ProviderStatus;
use berth_core::config::DriverConfig;
use berth_core::driver::WorkspaceRequest;
use berth_core::environment::Driver;
use berth_drivers::contain::Containment;
use berth_drivers::local::LocalDriver;
use berth_drivers::registry::{DriverRegistry, ProviderRegistry};
use berth_drivers::test_support::{Collect, exec, lease_request, never};
use berth_fake_provider::{FakeProvider, register_builtin};
use serde_json::json;

fn registry_with(fake: FakeProvider, temp: &tempfile::TempDir) -> DriverRegistry {
    let mut providers = ProviderRegistry::new();
    providers.register(Arc::new(fake)).unwrap();
    DriverRegistry::new(
        LocalDriver::new(temp.path().join("local"), Containment::disabled_for_tests()),
        Arc::new(providers),
    )
}

#[test]
fn the_builtin_fake_is_installed_and_runs_commands() {
    let mut providers = ProviderRegistry::new();
    register_builtin(&mut providers, Containment::disabled_for_tests()).unwrap();
    let capabilities = providers.capabilities();
    let fake = &capabilities.sandbox_providers["fake"];
    assert_eq!(fake.status, ProviderStatus::Ready);
    assert!(fake.supports_run_execution);
    assert!(fake.supports_reusable_leases);
    assert_eq!(fake.config_schema, FakeProvider::spec().config_schema);
    assert!(capabilities.drivers[&Driver::Sandbox].supports_run_execution);

    let parsed =
        DriverConfig::parse(Driver::Sandbox, &json!({"provider": "fake"}), &providers).unwrap();
    assert_eq!(parsed.to_stored().unwrap()["image"], "fake:latest");
    let err =
        DriverConfig::parse(Driver::Sandbox, &json!({"provider": "e2b"}), &providers).unwrap_err();
    assert!(err.to_string().contains("installed: fake"), "{err}");
}

#[tokio::test]
async fn a_run_through_the_sandbox_driver() {
    let temp = tempfile::tempdir().unwrap();
    let drivers = registry_with(
        FakeProvider::builder()
            .root(temp.path().join("sandboxes"))
            .seed(3)
            .build()
            .unwrap(),
        &temp,
    );
    let config = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "fake", "image": "demo:2"}),
        drivers.providers(),
    )
    .unwrap();

    let probe = drivers.probe(&config).await;
    assert!(probe.ok, "{probe:?}");
    assert_eq!(probe.summary, "fake sandbox provider ready (image demo:2)");

    let host = temp.path().join("project");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("in.txt"), "input\n").unwrap();

    let driver = drivers.get(Driver::Sandbox);
    let request = lease_request();
    let lease = driver.acquire(&config, &request).await.unwrap();
    assert_eq!(lease.provider.as_deref(), Some("fake"));
    assert_eq!(
        lease.provider_lease_id,
        Some(format!("sandbox://fake/{}/3", request.run_id))
    );
    let workspace = driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: Some(host.clone()),
            },
        )
        .await
        .unwrap();
    let sink = Collect::default();
    let outcome = driver
        .execute(
            &lease,
            &workspace,
            exec(&["sh", "-c", "echo hi > out.txt; cat in.txt"]),
            &sink,
            never(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(sink.0.lock().unwrap().as_slice(), b"input\n");
    let report = driver.sync_back(&lease, &workspace).await.unwrap();
    assert_eq!(report.files_written, 1);
    assert_eq!(
        std::fs::read_to_string(host.join("out.txt")).unwrap(),
        "hi\n"
    );
    driver.release(&lease, false, None).await.unwrap();
    assert!(
        !temp
            .path()
            .join("sandboxes")
            .join(format!("run-{}-3", request.run_id))
            .exists()
    );
}

#[tokio::test]
async fn probe_faults_surface_as_failed_results() {
    let temp = tempfile::tempdir().unwrap();
    let drivers = registry_with(
        FakeProvider::builder()
            .fail_probe("fake is down")
            .build()
            .unwrap(),
        &temp,
    );
    let config = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "fake"}),
        drivers.providers(),
    )
    .unwrap();
    let result = drivers.probe(&config).await;
    assert!(!result.ok);
    assert_eq!(result.summary, "fake is down");
}

#[tokio::test]
async fn acquire_faults_surface_through_the_driver() {
    let temp = tempfile::tempdir().unwrap();
    let drivers = registry_with(
        FakeProvider::builder()
            .root(temp.path())
            .fail_acquire("quota exceeded")
            .build()
            .unwrap(),
        &temp,
    );
    let config = DriverConfig::parse(
        Driver::Sandbox,
        &json!({"provider": "fake"}),
        drivers.providers(),
    )
    .unwrap();
    let err = drivers
        .get(Driver::Sandbox)
        .acquire(&config, &lease_request())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "driver_failed");
    assert_eq!(err.to_string(), "quota exceeded");
}
