//! What a lease says about its run (docs/api.md, "Leases around a run"): `failed` with a `failureReason` when the run
//! failed or timed out (unless the lease is kept), the `provider` of every lease whatever its driver, an SSH lease's
//! `ssh://` id and probe details, the error codes that name the step that failed, and deleting an environment while
//! one of its reusable leases is held.

use std::time::{Duration, Instant};

use berth_core::ids::LeaseId;
use berth_core::lease::{CleanupStatus, Lease, LeasePolicy, LeaseStatus};
use berth_core::time::Timestamp;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::plugins::{fake_plugin_dir, fake_plugin_dir_offering, server_with, wait_capability};
use crate::support::runs::{
    all_events, create_env, lease, sandbox_dir, start_run, wait_run, wait_status,
};
use crate::support::server::{ServerOptions, TestServer};
use crate::support::sshd::TestSshd;

/// Runs `body` to its end: the finished run, its events, and its lease.
async fn run_with_lease(
    server: &TestServer,
    company: &str,
    body: Value,
) -> (Value, Vec<Value>, Value) {
    let run_id = start_run(server, company, body).await;
    let run = wait_run(server, &run_id, Duration::from_secs(60)).await;
    let events = all_events(server, &run_id).await;
    let lease_id = run["leaseId"]
        .as_str()
        .unwrap_or_else(|| panic!("the run has no lease: {run}"));
    let lease = lease(server, lease_id).await;
    (run, events, lease)
}

fn error_codes(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|event| event["type"] == "error")
        .map(|event| {
            event["data"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The `lease` events of a run: the active one, then how it ended.
fn lease_events(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|event| event["type"] == "lease")
        .map(|event| &event["data"])
        .collect()
}

#[tokio::test]
async fn a_failing_or_timed_out_run_leaves_its_lease_failed_with_the_reason() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = create_env(&server, &company, "sandbox", json!({"provider": "fake"})).await;

    // The command fails: the lease is `failed`, `run_failed`, and still cleaned up.
    let (run, events, lease) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", "exit 3"]}),
    )
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "run_failed", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");
    assert!(lease["releasedAt"].is_string(), "{lease}");
    assert!(
        !sandbox_dir(&lease).exists(),
        "the failed lease's sandbox was removed"
    );
    let ended = lease_events(&events);
    assert_eq!(ended.len(), 2, "{events:?}");
    assert_eq!(ended[1]["status"], "failed", "{events:?}");
    assert_eq!(ended[1]["failureReason"], "run_failed", "{events:?}");

    // A timeout: `timed_out`.
    let (run, _, lease) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sleep", "30"], "timeoutMs": 300}),
    )
    .await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "timed_out", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");

    // Success and cancel stay `released`, with no reason.
    let (run, _, lease) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": env, "command": ["true"]}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(lease["status"], "released", "{lease}");
    assert!(lease["failureReason"].is_null(), "{lease}");
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sleep", "30"]}),
    )
    .await;
    wait_status(&server, &run_id, "running").await;
    let (status, _) = server
        .post(&format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let run = wait_run(&server, &run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    let (_, lease) = server
        .get(&format!(
            "/api/environment-leases/{}",
            run["leaseId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(lease["status"], "released", "{lease}");
    assert!(lease["failureReason"].is_null(), "{lease}");

    // The list filters on the new status like any other.
    let (status, failed) = server
        .get(&format!("/api/environments/{env}/leases?status=failed"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut reasons: Vec<&str> = failed
        .as_array()
        .unwrap()
        .iter()
        .map(|lease| lease["failureReason"].as_str().unwrap())
        .collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["run_failed", "timed_out"], "{failed}");

    // A local run's lease the same: a timeout on the Local environment.
    let (run, _, lease) = run_with_lease(
        &server,
        &company,
        json!({"command": ["sleep", "30"], "timeoutMs": 300}),
    )
    .await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(
        (
            &lease["status"],
            &lease["failureReason"],
            &lease["provider"]
        ),
        (&json!("failed"), &json!("timed_out"), &json!("local")),
        "{lease}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_kept_lease_stays_retained_whatever_its_run_did() {
    let server = TestServer::start().await;
    let company = server.default_company().await;

    // retain_on_failure keeps the failed run's sandbox for inspection: retained, no failure reason.
    let env = create_env(&server, &company, "sandbox", json!({"provider": "fake"})).await;
    let (run, _, lease) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": env, "command": ["false"], "leasePolicy": "retain_on_failure"}),
    )
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(lease["status"], "retained", "{lease}");
    assert!(lease["failureReason"].is_null(), "{lease}");
    assert!(sandbox_dir(&lease).exists(), "kept for inspection");

    // A reusable sandbox is kept after a timeout too.
    let reusable = create_env(
        &server,
        &company,
        "sandbox",
        json!({"provider": "fake", "reuseLease": true}),
    )
    .await;
    let (run, _, lease) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": reusable, "command": ["sleep", "30"], "timeoutMs": 300}),
    )
    .await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(lease["status"], "retained", "{lease}");
    assert!(lease["failureReason"].is_null(), "{lease}");
    server.stop().await;
}

/// Waits until the plugin environment driver `key` is ready.
async fn wait_plugin_driver(server: &TestServer, company: &str, key: &str) {
    let started = Instant::now();
    loop {
        let (_, capabilities) = server
            .get(&format!(
                "/api/companies/{company}/environments/capabilities"
            ))
            .await;
        let driver = &capabilities["drivers"]["plugin"]["environmentDrivers"][key];
        if driver["status"] == "ready" {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{key} never became ready: {capabilities}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_lease_names_its_provider() {
    let plugins = TempDir::new().unwrap();
    let provider_plugin = fake_plugin_dir(plugins.path(), "berth.sandboxes", "fake-plugin", &[]);
    let driver_plugin = fake_plugin_dir_offering(
        plugins.path(),
        "berth.vm",
        "fake-vm",
        "environment_driver",
        json!({"type": "object", "properties": {"image": {"type": "string", "default": "fake:latest"}}, "additionalProperties": false}),
        &[],
    );
    let server = server_with(&[&provider_plugin, &driver_plugin]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "fake-plugin", "ready").await;
    wait_plugin_driver(&server, &company, "fake-vm").await;

    let fake = create_env(&server, &company, "sandbox", json!({"provider": "fake"})).await;
    let isolated = create_env(
        &server,
        &company,
        "sandbox",
        json!({"provider": "isolated"}),
    )
    .await;
    let sandbox_plugin = create_env(
        &server,
        &company,
        "sandbox",
        json!({"provider": "fake-plugin"}),
    )
    .await;
    let plugin_driver = create_env(
        &server,
        &company,
        "plugin",
        json!({"pluginKey": "berth.vm", "driverKey": "fake-vm", "driverConfig": {}}),
    )
    .await;
    let cases = [
        (None, "local"),
        (Some(&fake), "fake"),
        (Some(&isolated), "isolated"),
        (Some(&sandbox_plugin), "fake-plugin"),
        // A plugin driver's lease names the plugin, not its driver key.
        (Some(&plugin_driver), "berth.vm"),
    ];
    for (env, provider) in cases {
        let mut body = json!({"command": ["true"]});
        if let Some(env) = env {
            body["environmentId"] = json!(env);
        }
        let (run, events, lease) = run_with_lease(&server, &company, body).await;
        assert_eq!(run["status"], "succeeded", "{provider}: {run}");
        assert_eq!(lease["provider"], provider, "{lease}");
        assert_eq!(lease["status"], "released", "{lease}");
        // Released through the lease's own driver: a plugin driver's lease still reaches its driver.
        assert_eq!(lease["cleanupStatus"], "success", "{lease}");
        let active = lease_events(&events)[0];
        assert_eq!(active["provider"], provider, "{events:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_lease_whose_acquisition_failed_is_failed_and_names_its_provider() {
    // An SSH host that refuses connections: acquiring fails.
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let env = create_env(
        &server,
        &company,
        "ssh",
        json!({"host": "127.0.0.1", "port": port, "username": "nobody", "remoteWorkspacePath": "/tmp/berth-nowhere",
               "password": "not-used", "strictHostKeyChecking": false}),
    )
    .await;
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["true"], "bridge": false}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(run["leaseId"].is_null(), "{run}");
    let events = all_events(&server, &run_id).await;
    assert_eq!(error_codes(&events), ["lease_acquire_failed"], "{events:?}");
    let (_, leases) = server.get(&format!("/api/environments/{env}/leases")).await;
    let leases = leases.as_array().unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0]["status"], "failed", "{leases:?}");
    assert_eq!(
        leases[0]["failureReason"], "lease_acquire_failed",
        "{leases:?}"
    );
    assert_eq!(leases[0]["provider"], "ssh", "{leases:?}");
    server.stop().await;
}

#[tokio::test]
async fn ssh_leases_name_their_remote_workspace_and_probes_show_it() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = create_env(&server, &company, "ssh", sshd.config()).await;

    // The probe shows the workspace path as configured and as the host resolves it.
    let (status, probe) = server
        .post(&format!("/api/environments/{env}/probe"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(probe["ok"], true, "{probe}");
    let configured = sshd.workspace.to_str().unwrap();
    assert_eq!(
        probe["details"]["remoteWorkspacePath"], configured,
        "{probe}"
    );
    let resolved = std::fs::canonicalize(&sshd.workspace).unwrap();
    assert_eq!(
        probe["details"]["remoteWorkingDirectory"],
        resolved.to_str().unwrap(),
        "{probe}"
    );
    assert_eq!(probe["details"]["workspaceMode"], "per_run", "{probe}");
    assert!(probe["details"]["loginDirectory"].is_string(), "{probe}");

    // A run's lease: provider `ssh`, id `ssh://user@host:port/<its remote workspace>`.
    let (run, events, lease) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": env, "command": ["pwd"], "bridge": false}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let cwd = events
        .iter()
        .find(|event| event["type"] == "workspace" && event["data"]["phase"] == "realized")
        .unwrap()["data"]["cwd"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        cwd.starts_with(configured) && cwd.contains("/runs/"),
        "{cwd}"
    );
    assert_eq!(lease["provider"], "ssh", "{lease}");
    assert_eq!(
        lease["providerLeaseId"],
        format!("ssh://{}@127.0.0.1:{}{cwd}", sshd.user, sshd.port),
        "{lease}"
    );
    assert_eq!(
        lease_events(&events)[0]["providerLeaseId"],
        lease["providerLeaseId"]
    );

    // A workspace that cannot be made on the host fails the run at that step, named so.
    let mut config = sshd.config();
    config["remoteWorkspacePath"] = json!("/proc/berth-cannot-be-here");
    let unmakeable = create_env(&server, &company, "ssh", config).await;
    let (run, events, lease) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": unmakeable, "command": ["true"], "bridge": false}),
    )
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(
        error_codes(&events),
        ["workspace_realization_failed"],
        "{events:?}"
    );
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .starts_with("could not realize the workspace"),
        "{run}"
    );
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(
        lease["failureReason"], "workspace_realization_failed",
        "{lease}"
    );
    server.stop().await;
    sshd.stop();
}

#[tokio::test]
async fn a_sync_back_that_loses_changes_fails_the_lease_with_that_step() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = create_env(
        &server,
        &company,
        "sandbox",
        json!({"provider": "fake", "syncBackMaxMb": 1}),
    )
    .await;
    let workspace = TempDir::new().unwrap();
    let (run, events, lease) = run_with_lease(
        &server,
        &company,
        json!({
            "environmentId": env,
            "command": ["sh", "-c", "head -c 3000000 /dev/zero > big"],
            "workspace": {"localPath": workspace.path()},
        }),
    )
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exitCode"], 0, "the command itself succeeded: {run}");
    assert_eq!(error_codes(&events), ["sync_back_failed"], "{events:?}");
    assert!(!workspace.path().join("big").exists());
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "sync_back_failed", "{lease}");
    server.stop().await;
}

/// The activity rows of `lease_id`: (action, actor, cleanupStatus).
async fn lease_activity(
    store: &berth_store::Store,
    company: &str,
    lease_id: &str,
) -> Vec<(String, String, Value)> {
    store
        .list_activity(company.parse().unwrap())
        .await
        .unwrap()
        .into_iter()
        .filter(|entry| entry.entity_id == lease_id)
        .map(|entry| {
            (
                entry.action.clone(),
                entry.actor.clone(),
                entry.details["cleanupStatus"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn deleting_an_environment_whose_reusable_lease_is_held_releases_everything() {
    // The environment's reusable lease is held (active) by a run that has not let go of it: one that outlived the
    // wait for its cancel, or whose node died and has not been swept yet.
    delete_with_a_held_reusable_lease(LeaseStatus::Active, None).await;
}

#[tokio::test]
async fn deleting_an_environment_whose_reusable_lease_cleanup_is_stuck_releases_everything() {
    // Another node began destroying the environment's reusable sandbox and died: its cleanup stays pending, which
    // holds the environment's one reusable lease until a sweep retries it.
    let started = Instant::now();
    delete_with_a_held_reusable_lease(LeaseStatus::Released, Some(CleanupStatus::Pending)).await;
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// An environment with a kept reusable sandbox and another reusable lease of it held (`held_status`, `cleanup`), used
/// before the kept one: deleting the environment answers 200 and destroys the kept sandbox.
async fn delete_with_a_held_reusable_lease(
    held_status: LeaseStatus,
    cleanup: Option<CleanupStatus>,
) {
    // No sweep meanwhile: the held lease below must stay as it is until the environment is deleted.
    let server = TestServer::start_with(ServerOptions {
        env: vec![("BERTH_SWEEP_INTERVAL_MS".to_owned(), "600000".to_owned())],
        ..ServerOptions::default()
    })
    .await;
    let company = server.default_company().await;
    let env = create_env(
        &server,
        &company,
        "sandbox",
        json!({"provider": "fake", "reuseLease": true}),
    )
    .await;
    let (run, _, kept) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": env, "command": ["true"]}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(kept["status"], "retained", "{kept}");
    let kept_sandbox = sandbox_dir(&kept);
    assert!(kept_sandbox.is_dir());

    let store = server.open_store().await;
    let kept_row = store
        .get_lease(kept["id"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    let earlier = Timestamp::from_unix_millis(kept_row.last_used_at.unix_millis() - 60_000);
    let held = Lease {
        id: LeaseId::new(),
        status: held_status,
        lease_policy: LeasePolicy::ReuseByEnvironment,
        run_id: None,
        provider_lease_id: None,
        acquired_at: earlier,
        last_used_at: earlier,
        expires_at: None,
        released_at: (held_status != LeaseStatus::Active).then_some(earlier),
        failure_reason: None,
        cleanup_status: cleanup,
        metadata: None,
        ..kept_row.clone()
    };
    store.insert_lease(&held).await.unwrap();

    let (status, removed) = server.delete(&format!("/api/environments/{env}")).await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    assert_eq!(removed["id"], env.as_str());
    let (status, _) = server.get(&format!("/api/environments/{env}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Both leases were released on the way out, and the kept sandbox destroyed: nothing was left behind.
    assert!(!kept_sandbox.exists(), "the kept sandbox was destroyed");
    let kept_activity = lease_activity(&store, &company, kept["id"].as_str().unwrap()).await;
    assert!(
        kept_activity.contains(&(
            "lease.released".to_owned(),
            "system:environment-deleted".to_owned(),
            json!("success")
        )),
        "{kept_activity:?}"
    );
    // The held lease was released, or its stuck cleanup retried: the sweep that would have cannot after this.
    let held_activity = lease_activity(&store, &company, &held.id.to_string()).await;
    let action = match held_status {
        LeaseStatus::Active => "lease.released",
        _ => "lease.cleaned_up",
    };
    assert_eq!(held_activity.len(), 1, "{held_activity:?}");
    assert_eq!(
        (held_activity[0].0.as_str(), held_activity[0].1.as_str()),
        (action, "system:environment-deleted"),
        "{held_activity:?}"
    );
    store.close().await;
    let logs = server.stop().await;
    assert!(!logs.contains("reusable_lease_held"), "{logs}");
}

#[tokio::test]
async fn deleting_an_environment_while_a_run_holds_its_reusable_lease_cancels_and_destroys() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = create_env(
        &server,
        &company,
        "sandbox",
        json!({"provider": "fake", "reuseLease": true}),
    )
    .await;
    // One kept sandbox the next run cannot resume (its image changed since), and a run holding a fresh one.
    let (_, _, kept) = run_with_lease(
        &server,
        &company,
        json!({"environmentId": env, "command": ["true"]}),
    )
    .await;
    assert_eq!(kept["status"], "retained", "{kept}");
    let (status, _) = server
        .patch(
            &format!("/api/environments/{env}"),
            json!({"config": {"image": "fake:other"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sleep", "300"]}),
    )
    .await;
    wait_status(&server, &run_id, "running").await;
    let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
    let (_, holding) = server
        .get(&format!(
            "/api/environment-leases/{}",
            run["leaseId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(holding["status"], "active", "{holding}");
    assert_eq!(holding["leasePolicy"], "reuse_by_environment", "{holding}");

    let (status, removed) = server.delete(&format!("/api/environments/{env}")).await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    let run = wait_run(&server, &run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    for lease in [&kept, &holding] {
        assert!(
            !sandbox_dir(lease).exists(),
            "every sandbox of the environment was destroyed: {lease}"
        );
    }
    server.stop().await;
}
