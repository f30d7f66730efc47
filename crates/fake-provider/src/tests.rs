use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_core::config::{DriverConfig, SandboxConfig};
use berth_core::driver::{
    DriverError, LeaseHandle, LeaseRequest, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::ids::{EnvironmentId, RunId};
use berth_core::provider::{ProviderCatalog, ProviderDescriptor, SandboxProvider};
use berth_drivers::contain::Containment;
use berth_drivers::registry::ProviderRegistry;
use serde_json::{Map, Value, json};

use super::*;
use crate::provider::LeaseKey;
use berth_drivers::test_support::{Recorder, exec, lease_request, never};

/// Just enough catalog to parse sandbox configs through the real validation path.
struct OnlyFake(FakeProvider);

impl ProviderCatalog for OnlyFake {
    fn provider(&self, key: &str) -> Option<&ProviderDescriptor> {
        (key == FAKE_PROVIDER_KEY).then(|| self.0.descriptor())
    }

    fn provider_keys(&self) -> Vec<String> {
        vec![FAKE_PROVIDER_KEY.to_owned()]
    }
}

fn sandbox_config(config: Value) -> SandboxConfig {
    let catalog = OnlyFake(FakeProvider::new().unwrap());
    match DriverConfig::parse(Driver::Sandbox, &config, &catalog).unwrap() {
        DriverConfig::Sandbox(sandbox) => sandbox,
        other => panic!("expected a sandbox config, got {other:?}"),
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    // The fake's probe never awaits anything, so a single poll finishes it.
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("the fake's probe should finish in one poll"),
    }
}

#[test]
fn descriptor_describes_the_builtin_fake() {
    let fake = FakeProvider::new().unwrap();
    let spec = fake.descriptor().spec();
    assert_eq!(fake.descriptor().key(), "fake");
    assert_eq!(spec.display_name, "Fake sandbox");
    assert!(spec.description.contains("deterministic"));
    assert!(spec.description.contains("tests and demos"));
    assert!(spec.description.contains("temporary directory"));
    assert!(spec.supports_reusable_leases);
    assert!(spec.supports_run_execution);
    assert_eq!(spec.config_schema["additionalProperties"], false);
    assert_eq!(
        spec.config_schema["properties"]["image"]["default"],
        "fake:latest"
    );
    assert_eq!(spec.config_schema["properties"]["image"]["maxLength"], 200);
    assert_eq!(fake.faults(), &FakeFaults::default());
}

#[test]
fn image_defaults_and_schema_is_strict() {
    let config = sandbox_config(json!({"provider": "fake"}));
    assert_eq!(config.fields["image"], "fake:latest");
    assert!(!config.reuse_lease);

    let catalog = OnlyFake(FakeProvider::new().unwrap());
    for bad in [
        json!({"provider": "fake", "image": ""}),
        json!({"provider": "fake", "image": 7}),
        json!({"provider": "fake", "image": "x".repeat(201)}),
        json!({"provider": "fake", "cpus": 2}),
    ] {
        assert!(
            DriverConfig::parse(Driver::Sandbox, &bad, &catalog).is_err(),
            "{bad} should be rejected"
        );
    }
}

#[test]
fn probe_reports_ready_with_camel_case_details() {
    let fake = FakeProvider::new().unwrap();
    let config = sandbox_config(json!({"provider": "fake", "reuseLease": true}));
    let result = block_on(fake.probe(&config));
    assert!(result.ok, "{result:?}");
    assert_eq!(result.driver, Driver::Sandbox);
    assert_eq!(
        result.summary,
        "fake sandbox provider ready (image fake:latest)"
    );
    assert_eq!(
        Value::Object(result.details),
        json!({"provider": "fake", "image": "fake:latest", "reuseLease": true})
    );

    let custom = sandbox_config(json!({"provider": "fake", "image": "demo:1"}));
    let result = block_on(fake.probe(&custom));
    assert_eq!(result.summary, "fake sandbox provider ready (image demo:1)");
    assert_eq!(result.details["reuseLease"], false);
}

#[test]
fn probe_fault_fails_with_the_given_summary() {
    let fake = FakeProvider::builder()
        .fail_probe("fake outage injected")
        .build()
        .unwrap();
    assert_eq!(
        fake.faults().fail_probe.as_deref(),
        Some("fake outage injected")
    );
    let config = sandbox_config(json!({"provider": "fake"}));
    let result = block_on(fake.probe(&config));
    assert!(!result.ok);
    assert_eq!(result.driver, Driver::Sandbox);
    assert_eq!(result.summary, "fake outage injected");
    assert!(result.details.is_empty());
}

#[test]
fn probe_refuses_configs_for_other_providers() {
    let fake = FakeProvider::new().unwrap();
    let config = SandboxConfig {
        provider: "e2b".to_owned(),
        reuse_lease: false,
        timeout_ms: None,
        sync_back_max_mb: None,
        fields: Map::new(),
        secrets: Default::default(),
    };
    let result = block_on(fake.probe(&config));
    assert!(!result.ok);
    assert!(result.summary.contains("`e2b`"), "{}", result.summary);
}

// --- leases, workspaces and runs: real directories, real processes ---

use std::collections::BTreeMap;
use std::time::Instant;

fn fake_in(root: &Path) -> FakeProvider {
    FakeProvider::builder().root(root).build().unwrap()
}

/// A fresh sandbox with an empty workspace: the setup most command tests share.
async fn empty_sandbox(fake: &FakeProvider) -> (LeaseHandle, RealizedWorkspace) {
    let config = sandbox_config(json!({"provider": "fake"}));
    let request = lease_request();
    let lease = fake.acquire(&config, &request).await.unwrap();
    let workspace = fake
        .prepare_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: None,
            },
        )
        .await
        .unwrap();
    (lease, workspace)
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn sandbox_path(lease: &LeaseHandle) -> PathBuf {
    PathBuf::from(lease.metadata["sandboxDir"].as_str().unwrap())
}

#[tokio::test]
async fn lease_ids_are_deterministic_for_a_seed() {
    let temp = tempfile::tempdir().unwrap();
    let config = sandbox_config(json!({"provider": "fake"}));
    let requests = [lease_request(), lease_request(), lease_request()];
    let mut runs = Vec::new();
    for root in ["a", "b"] {
        let fake = FakeProvider::builder()
            .root(temp.path().join(root))
            .seed(7)
            .build()
            .unwrap();
        let mut ids = Vec::new();
        for request in &requests {
            let lease = fake.acquire(&config, request).await.unwrap();
            ids.push(lease.provider_lease_id.unwrap());
        }
        runs.push(ids);
    }
    assert_eq!(runs[0], runs[1]);
    assert_eq!(
        runs[0],
        [
            format!("sandbox://fake/{}/7", requests[0].run_id),
            format!("sandbox://fake/{}/8", requests[1].run_id),
            format!("sandbox://fake/{}/9", requests[2].run_id),
        ]
    );
    // Without a seed, the counter starts at 0.
    let fake = fake_in(&temp.path().join("c"));
    let lease = fake.acquire(&config, &requests[0]).await.unwrap();
    assert_eq!(
        lease.provider_lease_id.unwrap(),
        format!("sandbox://fake/{}/0", requests[0].run_id)
    );
}

#[tokio::test]
async fn leases_name_a_private_sandbox() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("fake-root");
    let fake = fake_in(&root);
    let config = sandbox_config(json!({"provider": "fake", "image": "demo:3"}));
    let request = lease_request();
    let lease = fake.acquire(&config, &request).await.unwrap();

    let dir = root.join(format!("run-{}-0", request.run_id));
    assert_eq!(lease.provider.as_deref(), Some("fake"));
    assert_eq!(lease.expires_at, None);
    assert_eq!(
        Value::Object(lease.metadata.clone()),
        json!({
            "provider": "fake",
            "image": "demo:3",
            "reuseLease": false,
            "sandboxDir": dir.display().to_string(),
        })
    );
    assert!(dir.is_dir());
    assert_eq!(mode_of(&root), 0o700);
    assert_eq!(mode_of(&dir), 0o700);
    // Not reusable: the config does not reuse, so the lease says so.
    assert!(!fake.matches_reusable_lease(&config, &lease));
}

#[tokio::test]
async fn reusable_leases_are_per_environment_and_survive_keep() {
    let temp = tempfile::tempdir().unwrap();
    let fake = fake_in(temp.path());
    let config = sandbox_config(json!({"provider": "fake", "reuseLease": true}));
    let first = lease_request();
    let lease = fake.acquire(&config, &first).await.unwrap();
    assert_eq!(
        lease.provider_lease_id.as_deref(),
        Some(format!("sandbox://fake/{}", first.environment_id).as_str())
    );
    assert_eq!(lease.metadata["reuseLease"], true);
    let dir = sandbox_path(&lease);
    assert_eq!(
        dir,
        temp.path().join(format!("env-{}", first.environment_id))
    );
    std::fs::write(dir.join("left-by-run-1"), "x").unwrap();

    assert!(fake.matches_reusable_lease(&config, &lease));
    let other_image =
        sandbox_config(json!({"provider": "fake", "reuseLease": true, "image": "other:1"}));
    assert!(!fake.matches_reusable_lease(&other_image, &lease));
    let mut not_reusable = lease.clone();
    not_reusable
        .metadata
        .insert("reuseLease".to_owned(), false.into());
    assert!(!fake.matches_reusable_lease(&config, &not_reusable));
    let mut other_provider = lease.clone();
    other_provider
        .metadata
        .insert("provider".to_owned(), "e2b".into());
    assert!(!fake.matches_reusable_lease(&config, &other_provider));
    let mut no_id = lease.clone();
    no_id.provider_lease_id = Some(String::new());
    assert!(!fake.matches_reusable_lease(&config, &no_id));

    // Kept, then taken over by the environment's next run.
    fake.release(&lease, true, None).await.unwrap();
    assert!(dir.is_dir());
    let second = LeaseRequest {
        company_id: first.company_id,
        environment_id: first.environment_id,
        run_id: RunId::new(),
    };
    let resumed = fake
        .resume(&config, &lease, &second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resumed.provider_lease_id, lease.provider_lease_id);
    assert_eq!(resumed.metadata["resumedLease"], true);
    assert!(dir.join("left-by-run-1").exists());

    // Acquiring the same environment's sandbox again takes it as it is.
    let again = fake.acquire(&config, &second).await.unwrap();
    assert_eq!(again.provider_lease_id, lease.provider_lease_id);
    assert!(dir.join("left-by-run-1").exists());

    // Released without keep: gone, and resume says so.
    fake.release(&resumed, false, None).await.unwrap();
    assert!(!dir.exists());
    assert_eq!(fake.resume(&config, &lease, &second).await.unwrap(), None);
    // Releasing or destroying what is gone is fine.
    fake.release(&lease, false, None).await.unwrap();
    fake.destroy(&lease, None).await.unwrap();
}

#[tokio::test]
async fn destroy_removes_whatever_the_sandbox_holds() {
    let temp = tempfile::tempdir().unwrap();
    let fake = fake_in(temp.path());
    let config = sandbox_config(json!({"provider": "fake", "reuseLease": true}));
    let lease = fake.acquire(&config, &lease_request()).await.unwrap();
    let dir = sandbox_path(&lease);
    std::fs::create_dir_all(dir.join("deep/er")).unwrap();
    std::fs::write(dir.join("deep/er/file"), "x").unwrap();
    fake.destroy(&lease, None).await.unwrap();
    assert!(!dir.exists());
    assert!(temp.path().exists());
}

#[tokio::test]
async fn workspaces_round_trip_through_the_sandbox() {
    let temp = tempfile::tempdir().unwrap();
    let fake = fake_in(&temp.path().join("root"));
    let host = temp.path().join("project");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("in.txt"), "from the host\n").unwrap();
    std::fs::write(host.join("doomed.txt"), "delete me").unwrap();

    let config = sandbox_config(json!({"provider": "fake"}));
    let request = lease_request();
    let lease = fake.acquire(&config, &request).await.unwrap();
    let workspace = fake
        .prepare_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: Some(host.clone()),
            },
        )
        .await
        .unwrap();
    let sandbox_workspace = sandbox_path(&lease).join("workspace");
    assert_eq!(workspace.cwd, sandbox_workspace.display().to_string());
    assert_eq!(workspace.local_path, Some(host.canonicalize().unwrap()));
    assert!(workspace.ephemeral);
    assert_eq!(workspace.metadata["files"], 2);
    assert!(workspace.metadata[MANIFEST_KEY]["in.txt"].is_object());
    assert_eq!(
        std::fs::read_to_string(sandbox_workspace.join("in.txt")).unwrap(),
        "from the host\n"
    );

    let sink = Recorder::default();
    let outcome = fake
        .execute(
            &lease,
            &workspace,
            exec(&["sh", "-c", "echo hi > out.txt; rm doomed.txt; cat in.txt"]),
            &sink,
            never(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(sink.stdout(), "from the host\n");
    // Nothing reached the host yet: the command ran on the copy.
    assert!(!host.join("out.txt").exists());
    assert!(host.join("doomed.txt").exists());

    let report = fake.sync_back(&lease, &workspace).await.unwrap();
    assert_eq!(
        report,
        SyncReport {
            files_written: 1,
            files_deleted: 1,
            bytes_written: 3,
            conflicts: Vec::new(),
            skipped: Vec::new(),
        }
    );
    assert_eq!(
        std::fs::read_to_string(host.join("out.txt")).unwrap(),
        "hi\n"
    );
    assert!(!host.join("doomed.txt").exists());
    assert_eq!(
        std::fs::read_to_string(host.join("in.txt")).unwrap(),
        "from the host\n"
    );

    // A second prepare starts from a fresh copy of the host.
    std::fs::write(sandbox_workspace.join("stale"), "x").unwrap();
    let again = fake
        .prepare_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: Some(host.clone()),
            },
        )
        .await
        .unwrap();
    assert!(!sandbox_workspace.join("stale").exists());
    assert!(sandbox_workspace.join("out.txt").exists());
    assert_eq!(
        fake.sync_back(&lease, &again).await.unwrap(),
        SyncReport::default()
    );

    fake.release(&lease, false, None).await.unwrap();
    assert!(!sandbox_path(&lease).exists());
    assert!(host.join("out.txt").exists());
}

#[tokio::test]
async fn workspaces_without_a_host_path_are_empty_and_sync_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let fake = fake_in(temp.path());
    let (lease, workspace) = empty_sandbox(&fake).await;
    assert_eq!(workspace.local_path, None);
    assert!(Path::new(&workspace.cwd).is_dir());
    assert_eq!(std::fs::read_dir(&workspace.cwd).unwrap().count(), 0);
    let sink = Recorder::default();
    let mut command = exec(&["sh", "-c", "mkdir sub; cd sub; pwd"]);
    command.cwd = Some(".".to_owned());
    fake.execute(&lease, &workspace, command, &sink, never())
        .await
        .unwrap();
    assert_eq!(sink.stdout(), format!("{}/sub\n", workspace.cwd));
    assert_eq!(
        fake.sync_back(&lease, &workspace).await.unwrap(),
        SyncReport::default()
    );

    // Escaping the workspace with the command's cwd is refused.
    let mut command = exec(&["pwd"]);
    command.cwd = Some("../..".to_owned());
    let err = fake
        .execute(&lease, &workspace, command, &Recorder::default(), never())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "spawn_failed");

    // And a workspace that is not this lease's is refused outright.
    let mut elsewhere = workspace.clone();
    elsewhere.cwd = temp.path().display().to_string();
    let err = fake
        .execute(
            &lease,
            &elsewhere,
            exec(&["true"]),
            &Recorder::default(),
            never(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "driver_failed");

    // A sandbox that is gone cannot get a workspace.
    fake.destroy(&lease, None).await.unwrap();
    let err = fake
        .prepare_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: RunId::new(),
                local_path: None,
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is gone"), "{err}");
}

#[tokio::test]
async fn commands_see_only_the_environment_they_were_given() {
    let temp = tempfile::tempdir().unwrap();
    let fake = fake_in(temp.path());
    let (lease, workspace) = empty_sandbox(&fake).await;
    let sink = Recorder::default();
    let mut command = exec(&["/usr/bin/env"]);
    command.env.insert("ONLY_THIS".to_owned(), "yes".to_owned());
    fake.execute(&lease, &workspace, command, &sink, never())
        .await
        .unwrap();
    let env: BTreeMap<String, String> = sink
        .stdout()
        .lines()
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap();
            (key.to_owned(), value.to_owned())
        })
        .collect();
    assert_eq!(
        env.keys().map(String::as_str).collect::<Vec<_>>(),
        ["HOME", "ONLY_THIS", "PATH"]
    );
    assert_eq!(env["HOME"], sandbox_path(&lease).display().to_string());
    assert_eq!(env["PATH"], berth_drivers::process::DEFAULT_PATH);
    assert_eq!(env["ONLY_THIS"], "yes");
}

#[tokio::test]
async fn timeouts_reach_commands_in_the_sandbox() {
    let temp = tempfile::tempdir().unwrap();
    let fake = fake_in(temp.path());
    let (lease, workspace) = empty_sandbox(&fake).await;
    let sink = Recorder::default();
    let mut command = exec(&["sh", "-c", "echo partial; sleep 1000"]);
    command.timeout = Some(Duration::from_millis(300));
    let started = Instant::now();
    let outcome = fake
        .execute(&lease, &workspace, command, &sink, never())
        .await
        .unwrap();
    assert!(outcome.timed_out);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(sink.stdout(), "partial\n");
}

#[tokio::test]
async fn acquire_faults_fail_without_a_sandbox() {
    let temp = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .root(temp.path().join("root"))
        .fail_acquire("no capacity")
        .build()
        .unwrap();
    assert_eq!(fake.faults().fail_acquire.as_deref(), Some("no capacity"));
    let err = fake
        .acquire(
            &sandbox_config(json!({"provider": "fake"})),
            &lease_request(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "driver_failed");
    assert_eq!(err.to_string(), "no capacity");
    assert!(!temp.path().join("root").exists());
}

#[tokio::test]
async fn acquire_delays_hold_the_acquire() {
    let temp = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .root(temp.path())
        .acquire_delay(Duration::from_millis(250))
        .build()
        .unwrap();
    let started = Instant::now();
    fake.acquire(
        &sandbox_config(json!({"provider": "fake"})),
        &lease_request(),
    )
    .await
    .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn release_faults_leave_the_sandbox_in_place() {
    let temp = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .root(temp.path())
        .fail_release("provider API down")
        .build()
        .unwrap();
    let lease = fake
        .acquire(
            &sandbox_config(json!({"provider": "fake"})),
            &lease_request(),
        )
        .await
        .unwrap();
    for keep in [false, true] {
        let err = fake.release(&lease, keep, None).await.unwrap_err();
        assert_eq!(err.to_string(), "provider API down");
    }
    assert_eq!(
        fake.destroy(&lease, None).await.unwrap_err().to_string(),
        "provider API down"
    );
    assert!(sandbox_path(&lease).is_dir());
}

#[tokio::test]
async fn dropped_output_never_reaches_the_sink() {
    let temp = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .root(temp.path())
        .drop_output(true)
        .build()
        .unwrap();
    assert!(fake.faults().drop_output);
    let (lease, workspace) = empty_sandbox(&fake).await;
    let sink = Recorder::default();
    let outcome = fake
        .execute(
            &lease,
            &workspace,
            exec(&["sh", "-c", "echo lost; echo lost too >&2; echo ran > proof"]),
            &sink,
            never(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert!(sink.is_empty());
    // The command did run.
    assert!(Path::new(&workspace.cwd).join("proof").exists());
}

#[tokio::test]
async fn tampered_lease_ids_never_reach_outside_the_root() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let victim = temp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    let fake = fake_in(&root);
    let config = sandbox_config(json!({"provider": "fake"}));
    let lease = fake.acquire(&config, &lease_request()).await.unwrap();
    for bad in [
        "sandbox://fake/../victim".to_owned(),
        "sandbox://fake/../../victim/1".to_owned(),
        format!("sandbox://fake/{}/+1", RunId::new()),
        format!("sandbox://fake/{}/1/2", RunId::new()),
        format!("sandbox://e2b/{}", EnvironmentId::new()),
        String::new(),
    ] {
        let mut tampered = lease.clone();
        tampered.provider_lease_id = Some(bad.clone());
        // The metadata is ignored for paths, whatever it says.
        tampered
            .metadata
            .insert("sandboxDir".to_owned(), victim.display().to_string().into());
        let err = fake.destroy(&tampered, None).await.unwrap_err();
        assert_eq!(err.code(), "driver_failed", "{bad}");
        assert!(
            fake.resume(&config, &tampered, &lease_request())
                .await
                .is_err(),
            "{bad}"
        );
    }
    let mut tampered = lease.clone();
    tampered
        .metadata
        .insert("sandboxDir".to_owned(), victim.display().to_string().into());
    fake.destroy(&tampered, None).await.unwrap();
    assert!(victim.is_dir());
    assert!(!sandbox_path(&lease).exists());
    let mut no_id = lease.clone();
    no_id.provider_lease_id = None;
    assert!(fake.destroy(&no_id, None).await.is_err());
}

#[tokio::test]
async fn a_shared_root_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
    let fake = fake_in(&root);
    fake.acquire(
        &sandbox_config(json!({"provider": "fake"})),
        &lease_request(),
    )
    .await
    .unwrap();
    assert_eq!(mode_of(&root), 0o700);

    // A root that is a symlink is refused.
    let link = temp.path().join("link");
    std::os::unix::fs::symlink(&root, &link).unwrap();
    let err = fake_in(&link)
        .acquire(
            &sandbox_config(json!({"provider": "fake"})),
            &lease_request(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn the_default_root_is_in_the_temp_dir() {
    let fake = FakeProvider::new().unwrap();
    assert_eq!(fake.root(), std::env::temp_dir().join("berth-fake"));
    let mut registry = ProviderRegistry::new();
    register_builtin(&mut registry, Containment::disabled_for_tests()).unwrap();
    assert!(registry.get("fake").is_some());
    assert_eq!(
        register_builtin(&mut registry, Containment::disabled_for_tests())
            .unwrap_err()
            .code(),
        "duplicate_provider"
    );
}

#[test]
fn lease_ids_parse_strictly() {
    let run = RunId::new();
    let environment = EnvironmentId::new();
    for key in [
        LeaseKey::Run(run, 0),
        LeaseKey::Run(run, 42),
        LeaseKey::Environment(environment),
    ] {
        assert_eq!(LeaseKey::parse(&key.id()), Some(key));
    }
    for bad in [
        format!("sandbox://fake/{run}/"),
        format!("sandbox://fake/{run}/-1"),
        format!("sandbox://fake/{run}/1x"),
        format!("sandbox://fake/{run}/01"),
        format!("sandbox://fake/{run}/+1"),
        format!("sandbox://fake/{}", environment.to_string().to_uppercase()),
        format!("sandbox://fake//{run}"),
        format!("sandbox://fake/{environment}/"),
        "sandbox://fake/".to_owned(),
    ] {
        assert_eq!(LeaseKey::parse(&bad), None, "{bad}");
    }
}

/// The fake behind the real sandbox driver, as the server uses it: configs go through the common envelope and
/// leases get the driver's stamp (the sync-back bound among it).
fn sandbox_driver(root: &Path) -> berth_drivers::sandbox::SandboxDriver {
    let mut registry = ProviderRegistry::new();
    registry.register(Arc::new(fake_in(root))).unwrap();
    berth_drivers::sandbox::SandboxDriver::new(Arc::new(registry))
}

/// Acquires through `driver` with `config`, copies `host` in, runs `script` there; returns what sync-back needs.
async fn run_in_sandbox(
    driver: &berth_drivers::sandbox::SandboxDriver,
    config: Value,
    host: &Path,
    script: &str,
) -> (LeaseHandle, RealizedWorkspace) {
    use berth_core::driver::EnvironmentDriver;
    let catalog = OnlyFake(FakeProvider::new().unwrap());
    let config = DriverConfig::parse(Driver::Sandbox, &config, &catalog).unwrap();
    let request = lease_request();
    let lease = driver.acquire(&config, &request).await.unwrap();
    let workspace = driver
        .realize_workspace(
            &lease,
            &WorkspaceRequest {
                run_id: request.run_id,
                local_path: Some(host.to_path_buf()),
            },
        )
        .await
        .unwrap();
    let sink = Recorder::default();
    let outcome = driver
        .execute(
            &lease,
            &workspace,
            exec(&["sh", "-c", script]),
            &sink,
            never(),
        )
        .await
        .unwrap();
    assert_eq!(
        outcome.exit_code,
        Some(0),
        "{:?}",
        sink.chunks.lock().unwrap()
    );
    (lease, workspace)
}

#[tokio::test]
async fn a_sandbox_that_sends_back_too_much_changes_nothing_on_the_host() {
    use berth_core::driver::EnvironmentDriver;
    let temp = tempfile::tempdir().unwrap();
    let driver = sandbox_driver(&temp.path().join("root"));
    let host = temp.path().join("project");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("keep.txt"), "host\n").unwrap();

    let (lease, workspace) = run_in_sandbox(
        &driver,
        json!({"provider": "fake", "syncBackMaxMb": 1}),
        &host,
        "cp /usr/bin/id suid && chmod 4755 suid && truncate -s 2G big && echo changed > keep.txt",
    )
    .await;
    assert_eq!(lease.metadata["syncBackMaxMb"], 1);

    let err = driver.sync_back(&lease, &workspace).await.unwrap_err();
    assert!(
        matches!(err, DriverError::SyncBackTooLarge { limit_mb: 1 }),
        "{err}"
    );
    assert!(
        err.to_string().contains("syncBackMaxMb=1 MiB")
            && err.to_string().contains("config.syncBackMaxMb"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("keep.txt")).unwrap(),
        "host\n"
    );
    assert!(!host.join("suid").exists() && !host.join("big").exists());
    driver.release(&lease, false, None).await.unwrap();
}

#[tokio::test]
async fn what_a_sandbox_sends_back_is_never_setuid_special_or_blocking() {
    use berth_core::driver::{EnvironmentDriver, SkipReason, SkippedEntry};
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().unwrap();
    let driver = sandbox_driver(&temp.path().join("root"));
    let host = temp.path().join("project");
    std::fs::create_dir(&host).unwrap();
    // A FIFO on the host, where the command writes a regular file: it must not be opened (nobody writes to it).
    rustix::fs::mknodat(
        rustix::fs::CWD,
        host.join("pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();

    let (lease, workspace) = run_in_sandbox(
        &driver,
        json!({"provider": "fake"}),
        &host,
        "cp /usr/bin/id suid && chmod 4755 suid && mkfifo fifo && echo data > pipe && ln -s /etc etc",
    )
    .await;
    assert_eq!(lease.metadata["syncBackMaxMb"], 1024, "the default bound");

    let report = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        driver.sync_back(&lease, &workspace),
    )
    .await
    .expect("sync-back blocked")
    .unwrap();
    let suid = std::fs::symlink_metadata(host.join("suid")).unwrap();
    assert_eq!(suid.permissions().mode() & 0o7777, 0o755);
    // The host's FIFO is something berth never synced: it stays (never opened), and the sandbox's file goes beside.
    let pipe = std::fs::symlink_metadata(host.join("pipe")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&pipe.file_type()));
    assert_eq!(
        std::fs::read_to_string(host.join("pipe.berth-conflict")).unwrap(),
        "data\n"
    );
    assert_eq!(report.conflicts, ["pipe"]);
    assert_eq!(
        std::fs::read_link(host.join("etc")).unwrap(),
        Path::new("/etc")
    );
    assert!(std::fs::symlink_metadata(host.join("fifo")).is_err());
    assert_eq!(
        report.skipped,
        [SkippedEntry {
            path: "fifo".to_owned(),
            reason: SkipReason::SpecialFile,
            detail: None,
        }]
    );
    assert_eq!(report.files_written, 3);
    driver.release(&lease, false, None).await.unwrap();
}
