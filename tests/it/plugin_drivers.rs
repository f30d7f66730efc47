//! Plugins as full environments (PLUGINS.md §4–5), with real plugin processes: secret-ref fields sealed wherever the
//! schema puts them, `driver: "plugin"` environment drivers, and workspaces moved with `tar` through the plugin's
//! execute.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::plugins::{fake_plugin_dir_offering, run_on, server_with, wait_capability};
use crate::support::runs::text_of;
use crate::support::server::TestServer;

/// A schema with a secret-ref field at the top, in a nested object, in array items and under `allOf`.
fn secretive_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "image": {"type": "string", "default": "fake:latest"},
            "apiKey": {"type": "string", "format": "secret-ref", "minLength": 8},
            "auth": {"type": "object", "properties": {"token": {"type": "string", "format": "secret-ref"}}},
            "users": {"type": "array", "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "password": {"type": "string", "format": "secret-ref"}}
            }},
            "extra": {"type": "object", "allOf": [
                {"properties": {"signingKey": {"type": "string", "format": "secret-ref"}}}
            ]}
        },
        "additionalProperties": false
    })
}

/// A plugin directory running the fake plugin, offering `key` as `kind` with the secretive schema.
fn plugin_dir(parent: &Path, id: &str, key: &str, kind: &str, flags: &[&str]) -> PathBuf {
    fake_plugin_dir_offering(parent, id, key, kind, secretive_schema(), flags)
}

async fn create(server: &TestServer, company: &str, body: Value) -> (StatusCode, Value) {
    server
        .post(&format!("/api/companies/{company}/environments"), body)
        .await
}

/// The secret id a stored secret-ref field holds.
fn secret_ref(value: &Value) -> String {
    let id = value["secretRef"]
        .as_str()
        .unwrap_or_else(|| panic!("not a secret ref: {value}"));
    assert_eq!(value.as_object().unwrap().len(), 1, "{value}");
    id.to_owned()
}

const PLAINTEXTS: [&str; 5] = [
    "api-key-0001-plain",
    "token-0002-plain",
    "password-0003-plain",
    "password-0004-plain",
    "signing-0005-plain",
];

fn secretive_config() -> Value {
    json!({
        "apiKey": PLAINTEXTS[0],
        "auth": {"token": PLAINTEXTS[1]},
        "users": [{"name": "ann", "password": PLAINTEXTS[2]}, {"name": "bob", "password": PLAINTEXTS[3]}],
        "extra": {"signingKey": PLAINTEXTS[4]}
    })
}

fn assert_no_plaintext(text: &str) {
    for plain in PLAINTEXTS {
        assert!(!text.contains(plain), "{plain} leaked: {text}");
    }
}

#[tokio::test]
async fn secret_ref_fields_are_sealed_at_any_depth_and_forgotten_when_replaced() {
    let plugins = TempDir::new().unwrap();
    let dir = plugin_dir(
        plugins.path(),
        "berth.sealed",
        "sealed",
        "sandbox_provider",
        &[],
    );
    let server = server_with(&[&dir]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "sealed", "ready").await;

    let mut config = secretive_config();
    config["provider"] = json!("sealed");
    let (status, created) = create(
        &server,
        &company,
        json!({"name": "sealed", "driver": "sandbox", "config": config}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_no_plaintext(&created.to_string());
    let stored = &created["config"];
    let ids = [
        secret_ref(&stored["apiKey"]),
        secret_ref(&stored["auth"]["token"]),
        secret_ref(&stored["users"][0]["password"]),
        secret_ref(&stored["users"][1]["password"]),
        secret_ref(&stored["extra"]["signingKey"]),
    ];
    assert_eq!(stored["users"][1]["name"], "bob", "{stored}");
    assert_eq!(stored["image"], "fake:latest", "defaults still apply");
    let env = created["id"].as_str().unwrap().to_owned();
    let (_, fetched) = server.get(&format!("/api/environments/{env}")).await;
    assert_eq!(fetched["config"], *stored);

    // What is stored: references only, and encrypted secrets bound to this environment.
    let store = server.open_store().await;
    let row = store
        .get_environment(env.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_no_plaintext(&Value::Object(row.config.clone()).to_string());
    for id in &ids {
        let secret = store.get_secret(id.parse().unwrap()).await.unwrap();
        let secret = secret.unwrap_or_else(|| panic!("secret {id} is stored"));
        assert_eq!(secret.environment_id, Some(env.parse().unwrap()));
        assert_no_plaintext(&String::from_utf8_lossy(&secret.ciphertext));
    }

    // A reference kept as it was keeps its secret; a new value replaces and forgets the old one; a dropped field
    // forgets its secret.
    let (status, patched) = server
        .patch(
            &format!("/api/environments/{env}"),
            json!({"config": {"apiKey": "api-key-9999-new", "users": stored["users"], "auth": null}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert!(!patched.to_string().contains("api-key-9999-new"));
    let new_key = secret_ref(&patched["config"]["apiKey"]);
    assert_ne!(new_key, ids[0]);
    assert_eq!(patched["config"]["users"], stored["users"]);
    assert!(patched["config"].get("auth").is_none(), "{patched}");
    let gone = |id: &str| {
        let store = &store;
        let id = id.parse().unwrap();
        async move { store.get_secret(id).await.unwrap().is_none() }
    };
    assert!(gone(&ids[0]).await, "the replaced key is forgotten");
    assert!(gone(&ids[1]).await, "the dropped token is forgotten");
    assert!(!gone(&ids[2]).await && !gone(&ids[3]).await && !gone(&ids[4]).await);
    assert!(!gone(&new_key).await);

    // Bad references and bad values are refused with the field's path, never echoing a value.
    for (body, path) in [
        (
            json!({"config": {"apiKey": {"secretRef": "not-an-id"}}}),
            "config.apiKey.secretRef",
        ),
        (
            json!({"config": {"apiKey": {"secretRef": uuid_like()}}}),
            "config.apiKey",
        ),
        (json!({"config": {"apiKey": "short"}}), "config.apiKey"),
        (
            json!({"config": {"users": [{"password": 7}]}}),
            "config.users",
        ),
    ] {
        let (status, refused) = server
            .patch(&format!("/api/environments/{env}"), body.clone())
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {refused}"
        );
        assert!(refused.to_string().contains(path), "{body}: {refused}");
        assert!(!refused.to_string().contains("short\""), "{refused}");
    }

    // Deleting the environment forgets every secret it had.
    let (status, _) = server.delete(&format!("/api/environments/{env}")).await;
    assert_eq!(status, StatusCode::OK);
    for id in ids.iter().skip(2).chain([&new_key]) {
        assert!(gone(id).await, "{id} is forgotten with its environment");
    }
    store.close().await;
    assert_no_plaintext(&server.stop().await);
}

/// A well-formed secret id that names no secret.
fn uuid_like() -> String {
    "00000000-0000-4000-8000-000000000000".to_owned()
}

#[tokio::test]
async fn plugin_environment_drivers_run_commands_end_to_end() {
    let plugins = TempDir::new().unwrap();
    let dir = plugin_dir(
        plugins.path(),
        "berth.vm",
        "fake-vm",
        "environment_driver",
        &[],
    );
    let server = server_with(&[&dir]).await;
    let company = server.default_company().await;

    // Listed under drivers.plugin, not among sandbox providers.
    let started = std::time::Instant::now();
    let driver = loop {
        let (_, capabilities) = server
            .get(&format!(
                "/api/companies/{company}/environments/capabilities"
            ))
            .await;
        let plugin = &capabilities["drivers"]["plugin"];
        assert_eq!(plugin["status"], "supported", "{capabilities}");
        assert!(capabilities["sandboxProviders"].get("fake-vm").is_none());
        let driver = plugin["environmentDrivers"]["fake-vm"].clone();
        if driver["status"] == "ready" {
            break driver;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{capabilities}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(driver["pluginKey"], "berth.vm", "{driver}");
    assert_eq!(driver["source"], "plugin", "{driver}");
    assert_eq!(driver["configSchema"], secretive_schema());

    let (status, created) = create(
        &server,
        &company,
        json!({"name": "vm", "driver": "plugin", "config": {
            "pluginKey": "berth.vm", "driverKey": "fake-vm", "driverConfig": secretive_config()
        }}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_no_plaintext(&created.to_string());
    secret_ref(&created["config"]["driverConfig"]["apiKey"]);
    secret_ref(&created["config"]["driverConfig"]["users"][1]["password"]);
    let env = created["id"].as_str().unwrap().to_owned();

    // The driver config is checked against the plugin driver's schema; a driver of another plugin is unknown.
    let (status, refused) = create(
        &server,
        &company,
        json!({"name": "bad", "driver": "plugin", "config": {
            "pluginKey": "berth.vm", "driverKey": "fake-vm", "driverConfig": {"bogus": 1}
        }}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert!(
        refused.to_string().contains("config.driverConfig"),
        "{refused}"
    );
    let (status, refused) = create(
        &server,
        &company,
        json!({"name": "bad", "driver": "plugin", "config": {"pluginKey": "other", "driverKey": "fake-vm"}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert!(
        refused.to_string().contains("berth.vm/fake-vm"),
        "installed drivers are named: {refused}"
    );

    let (status, probe) = server
        .post(&format!("/api/environments/{env}/probe"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(probe["ok"], true, "{probe}");
    assert_eq!(probe["driver"], "plugin", "{probe}");

    let (run, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo out; cat; echo err >&2; exit 3"], "stdin": "from stdin\n"}),
    )
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exitCode"], 3, "{run}");
    assert_eq!(text_of(&events, "stdout"), "out\nfrom stdin\n");
    assert_eq!(text_of(&events, "stderr"), "err\n");
    let (_, leases) = server.get(&format!("/api/environments/{env}/leases")).await;
    let lease = &leases.as_array().unwrap()[0];
    assert_eq!(lease["driver"], "plugin", "{lease}");
    // A plugin driver's lease names its plugin; its cleanup still found the driver (by the acquired config's key).
    assert_eq!(lease["provider"], "berth.vm", "{lease}");
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "run_failed", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");
    assert_no_plaintext(&leases.to_string());
    assert_no_plaintext(&events.iter().map(Value::to_string).collect::<String>());
    assert_no_plaintext(&server.stop().await);
}

#[tokio::test]
async fn workspaces_go_in_and_back_through_the_plugins_execute() {
    let plugins = TempDir::new().unwrap();
    let root = TempDir::new().unwrap();
    let root_flag = root.path().display().to_string();
    let dir = plugin_dir(
        plugins.path(),
        "berth.tar",
        "tar-sync",
        "sandbox_provider",
        &["--root", &root_flag],
    );
    let server = server_with(&[&dir]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "tar-sync", "ready").await;
    let (status, created) = create(
        &server,
        &company,
        json!({"name": "tar", "driver": "sandbox", "config": {"provider": "tar-sync"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let env = created["id"].as_str().unwrap().to_owned();

    let workspace = TempDir::new().unwrap();
    std::fs::write(workspace.path().join("in.txt"), "input\n").unwrap();
    std::fs::write(workspace.path().join("gone.txt"), "delete me\n").unwrap();
    std::fs::create_dir(workspace.path().join("keep")).unwrap();
    std::fs::write(workspace.path().join("keep/same.txt"), "unchanged\n").unwrap();
    std::os::unix::fs::symlink("in.txt", workspace.path().join("link")).unwrap();

    let (run, events) = run_on(
        &server,
        &company,
        &env,
        json!({
            "command": ["sh", "-c", "pwd; cat in.txt; readlink link; echo sandboxed > out.txt; rm gone.txt; mkdir -p sub && echo deep > sub/f"],
            "workspace": {"localPath": workspace.path()}
        }),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    let stdout = text_of(&events, "stdout");
    let cwd = stdout.lines().next().unwrap();
    assert!(
        cwd.starts_with(root.path().to_str().unwrap()),
        "the command ran in the plugin's sandbox: {stdout}"
    );
    assert!(stdout.ends_with("input\nin.txt\n"), "{stdout}");
    let read = |path: &str| std::fs::read_to_string(workspace.path().join(path)).unwrap();
    assert_eq!(read("out.txt"), "sandboxed\n");
    assert_eq!(read("sub/f"), "deep\n");
    assert_eq!(read("keep/same.txt"), "unchanged\n");
    assert!(!workspace.path().join("gone.txt").exists());
    let synced = events
        .iter()
        .find(|event| event["type"] == "workspace" && event["data"]["phase"] == "synced")
        .unwrap_or_else(|| panic!("no sync-back event in {events:?}"));
    assert!(synced.to_string().contains("filesWritten"), "{synced}");
    server.stop().await;
}

#[tokio::test]
async fn a_lease_is_cleaned_up_with_the_config_it_was_acquired_with_after_an_edit() {
    let plugins = TempDir::new().unwrap();
    let root = TempDir::new().unwrap();
    let root_flag = root.path().display().to_string();
    let first_key = "first-key-00000001";
    let dir = plugin_dir(
        plugins.path(),
        "berth.keyed",
        "keyed",
        "sandbox_provider",
        &["--root", &root_flag, "--require-api-key", first_key],
    );
    let server = server_with(&[&dir]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "keyed", "ready").await;
    let (status, created) = create(
        &server,
        &company,
        json!({"name": "keyed", "driver": "sandbox",
               "config": {"provider": "keyed", "reuseLease": true, "apiKey": first_key}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let env = created["id"].as_str().unwrap().to_owned();
    let first_ref = secret_ref(&created["config"]["apiKey"]);

    // Every call of the run carried the resolved key (the plugin refuses any other): the lease is kept for reuse.
    let (run, events) = run_on(&server, &company, &env, json!({"command": ["true"]})).await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    let sandboxes = || std::fs::read_dir(root.path()).unwrap().count();
    assert_eq!(sandboxes(), 1, "the kept sandbox");

    // The key is rotated while the lease is kept: the old secret stays, because that lease was made with it.
    let (status, patched) = server
        .patch(
            &format!("/api/environments/{env}"),
            json!({"config": {"apiKey": "second-key-0000002"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    let store = server.open_store().await;
    assert!(
        store
            .get_secret(first_ref.parse().unwrap())
            .await
            .unwrap()
            .is_some(),
        "a kept lease still needs the old key"
    );

    // Deleting the environment destroys the kept sandbox through the plugin with the key it was made with (the
    // environment's current key would be refused), and then nothing of either key is left.
    let (status, _) = server.delete(&format!("/api/environments/{env}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        sandboxes(),
        0,
        "the sandbox was destroyed through the plugin"
    );
    assert!(
        store
            .get_secret(first_ref.parse().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    store.close().await;
    let logs = server.stop().await;
    assert!(!logs.contains("lease cleanup failed"), "{logs}");
    assert!(!logs.contains(first_key), "{logs}");
}

#[tokio::test]
async fn a_workspace_larger_than_a_protocol_line_goes_in_as_streamed_input() {
    let plugins = TempDir::new().unwrap();
    let dir = plugin_dir(plugins.path(), "berth.big", "big", "sandbox_provider", &[]);
    let server = server_with(&[&dir]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "big", "ready").await;
    let (status, created) = create(
        &server,
        &company,
        json!({"name": "big", "driver": "sandbox", "config": {"provider": "big"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let env = created["id"].as_str().unwrap().to_owned();

    // 17 MiB in one file: as one base64 `stdin` the execute would be a 23 MiB line, past the protocol's 16 MiB.
    let workspace = TempDir::new().unwrap();
    let size = 17 * 1024 * 1024;
    let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(workspace.path().join("big.bin"), &content).unwrap();
    let (run, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["wc", "-c", "big.bin"], "workspace": {"localPath": workspace.path()}}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    assert_eq!(text_of(&events, "stdout"), format!("{size} big.bin\n"));
    assert_eq!(
        std::fs::read(workspace.path().join("big.bin")).unwrap(),
        content
    );
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_error_that_echoes_a_secret_is_masked() {
    let secret = "echoed-secret-0000042";
    let plugins = TempDir::new().unwrap();
    let message = format!("the provider refused key {secret}");
    let dir = plugin_dir(
        plugins.path(),
        "berth.echo",
        "echo",
        "sandbox_provider",
        &["--fail-acquire", &message],
    );
    let server = server_with(&[&dir]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "echo", "ready").await;
    let (status, created) = create(
        &server,
        &company,
        json!({"name": "echo", "driver": "sandbox", "config": {"provider": "echo", "auth": {"token": secret}}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let env = created["id"].as_str().unwrap().to_owned();
    let (run, events) = run_on(&server, &company, &env, json!({"command": ["true"]})).await;
    assert_eq!(run["status"], "failed", "{run}");
    let everything = format!("{run} {events:?}");
    assert!(
        everything.contains("the provider refused key [secret]"),
        "{everything}"
    );
    assert!(!everything.contains(secret), "{everything}");
    assert!(!server.stop().await.contains(secret));
}

#[tokio::test]
async fn a_plugin_sandbox_is_reused_by_the_next_run_of_its_environment() {
    let plugins = TempDir::new().unwrap();
    let dir = plugin_dir(
        plugins.path(),
        "berth.reuse",
        "reuse",
        "sandbox_provider",
        &[],
    );
    let server = server_with(&[&dir]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "reuse", "ready").await;
    let (status, created) = create(
        &server,
        &company,
        json!({"name": "reuse", "driver": "sandbox", "config": {"provider": "reuse", "reuseLease": true}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let env = created["id"].as_str().unwrap().to_owned();
    let (first, _) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo kept > state"]}),
    )
    .await;
    assert_eq!(first["status"], "succeeded", "{first}");
    let (second, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["cat", "state"]}),
    )
    .await;
    assert_eq!(second["status"], "succeeded", "{second} {events:?}");
    assert_eq!(
        text_of(&events, "stdout"),
        "kept\n",
        "the second run found the first one's sandbox"
    );
    let lease = |run: &Value| {
        let id = run["leaseId"].as_str().unwrap().to_owned();
        let server = &server;
        async move { server.get(&format!("/api/environment-leases/{id}")).await.1 }
    };
    let (first_lease, second_lease) = (lease(&first).await, lease(&second).await);
    assert_eq!(
        first_lease["providerLeaseId"], second_lease["providerLeaseId"],
        "{first_lease} {second_lease}"
    );
    assert_eq!(second_lease["status"], "retained", "{second_lease}");
    server.stop().await;
}

#[tokio::test]
async fn the_plugin_validates_configs_on_create_and_patch() {
    let plugins = TempDir::new().unwrap();
    let provider = plugin_dir(
        plugins.path(),
        "berth.judge",
        "judge",
        "sandbox_provider",
        &["--refuse-field", "users"],
    );
    let driver = plugin_dir(
        plugins.path(),
        "berth.judge-vm",
        "judge-vm",
        "environment_driver",
        &["--refuse-field", "users"],
    );
    let server = server_with(&[&provider, &driver]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "judge", "ready").await;
    let users = json!([{"name": "ann", "password": "pw-plain-3"}]);

    let (status, refused) = create(
        &server,
        &company,
        json!({"name": "j", "driver": "sandbox", "config": {"provider": "judge", "users": users}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert!(refused.to_string().contains("config.users"), "{refused}");
    assert!(
        refused.to_string().contains("--refuse-field"),
        "the plugin's own message: {refused}"
    );
    assert_no_plaintext(&refused.to_string());
    let (status, created) = create(
        &server,
        &company,
        json!({"name": "j", "driver": "sandbox", "config": {"provider": "judge", "apiKey": "api-key-0001-plain"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let env = created["id"].as_str().unwrap().to_owned();
    let (status, refused) = server
        .patch(
            &format!("/api/environments/{env}"),
            json!({"config": {"users": users}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert!(refused.to_string().contains("config.users"), "{refused}");
    let (status, renamed) = server
        .patch(
            &format!("/api/environments/{env}"),
            json!({"name": "renamed"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{renamed}");

    let started = std::time::Instant::now();
    loop {
        let (status, refused) = create(
            &server,
            &company,
            json!({"name": "vm", "driver": "plugin", "config": {
                "pluginKey": "berth.judge-vm", "driverKey": "judge-vm", "driverConfig": {"users": users}
            }}),
        )
        .await;
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            assert!(
                refused.to_string().contains("config.driverConfig.users"),
                "{refused}"
            );
            break;
        }
        // Created while the plugin was still starting (a driver that cannot judge does not block): try again.
        assert_eq!(status, StatusCode::CREATED, "{refused}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never judged: {refused}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_plaintext(&server.stop().await);
}
