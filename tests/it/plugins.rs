//! Provider plugins (PLUGINS.md) with real plugin processes: the fake provider's plugin binary
//! (`berth-fake-provider`) installed through `--plugin-dir`, runs end to end through it, and its faults.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::runs::{all_events, start_run, text_of, wait_run};
use crate::support::server::{ServerOptions, TestServer};

/// The fake provider's plugin binary: `BERTH_FAKE_PLUGIN_BIN`, else built once per test process.
pub(crate) fn fake_plugin_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("BERTH_FAKE_PLUGIN_BIN") {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "berth-fake-provider",
                "--bin",
                "berth-fake-provider",
            ])
            .status()
            .expect("run cargo build for the fake plugin");
        assert!(status.success(), "building the fake plugin failed");
        let exe = std::env::current_exe().expect("current exe");
        exe.parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("berth-fake-provider")
    })
}

/// A plugin directory holding a manifest that runs the fake plugin with `flags`, offering `key` as a sandbox provider.
pub(crate) fn fake_plugin_dir(parent: &Path, id: &str, key: &str, flags: &[&str]) -> PathBuf {
    let schema = json!({
        "type": "object",
        "properties": {
            "image": {"type": "string", "default": "fake:latest"},
            "apiKey": {"type": "string", "format": "secret-ref"}
        },
        "additionalProperties": false
    });
    fake_plugin_dir_offering(parent, id, key, "sandbox_provider", schema, flags)
}

/// A plugin directory holding a manifest that runs the fake plugin with `flags`, offering `key` as `kind`
/// (`sandbox_provider` or `environment_driver`) with `schema`.
pub(crate) fn fake_plugin_dir_offering(
    parent: &Path,
    id: &str,
    key: &str,
    kind: &str,
    schema: Value,
    flags: &[&str],
) -> PathBuf {
    let dir = parent.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = vec![
        fake_plugin_bin().display().to_string(),
        "--id".to_owned(),
        id.to_owned(),
    ];
    command.extend(flags.iter().map(|flag| (*flag).to_owned()));
    let manifest = json!({
        "id": id,
        "version": "0.1.0",
        "command": command,
        "environmentDrivers": [{
            "driverKey": key,
            "kind": kind,
            "displayName": "Fake sandboxes (plugin)",
            "description": "berth's fake provider, out of process",
            "supportsReusableLeases": true,
            "configSchema": schema
        }]
    });
    std::fs::write(dir.join("berth-plugin.json"), manifest.to_string()).unwrap();
    dir
}

/// A server with the given plugin directories, restarting crashed plugins quickly.
pub(crate) async fn server_with(plugins: &[&Path]) -> TestServer {
    server_with_args(plugins, &[], None).await
}

/// A server with `plugins`, quick restarts and the extra `berth serve` flags (hidden deadline knobs), optionally on
/// an existing data dir.
pub(crate) async fn server_with_args(
    plugins: &[&Path],
    extra: &[&str],
    data_dir: Option<PathBuf>,
) -> TestServer {
    let mut args: Vec<String> = [
        "--plugin-restart-initial-ms",
        "50",
        "--plugin-restart-max-ms",
        "200",
    ]
    .iter()
    .chain(extra)
    .map(|arg| (*arg).to_owned())
    .collect();
    for dir in plugins {
        args.extend(["--plugin-dir".to_owned(), dir.display().to_string()]);
    }
    TestServer::start_with(ServerOptions {
        args,
        data_dir,
        ..ServerOptions::default()
    })
    .await
}

pub(crate) async fn capability(server: &TestServer, company: &str, key: &str) -> Value {
    let (status, capabilities) = server
        .get(&format!(
            "/api/companies/{company}/environments/capabilities"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{capabilities}");
    capabilities["sandboxProviders"][key].clone()
}

/// Waits until the provider's status is `wanted` (or panics after 20 s).
pub(crate) async fn wait_capability(
    server: &TestServer,
    company: &str,
    key: &str,
    wanted: &str,
) -> Value {
    let started = Instant::now();
    loop {
        let capability = capability(server, company, key).await;
        if capability["status"] == wanted {
            return capability;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{key} never became {wanted}: {capability}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn plugin_env(server: &TestServer, company: &str, key: &str) -> String {
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": format!("{key}-env"), "driver": "sandbox", "config": {"provider": key}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    env["id"].as_str().unwrap().to_owned()
}

/// A server with one fake plugin (`flags` its faults), ready, and an environment on its provider.
pub(crate) struct ReadyPlugin {
    pub(crate) _plugins: TempDir,
    pub(crate) server: TestServer,
    pub(crate) company: String,
    pub(crate) env: String,
}

pub(crate) async fn ready_plugin(id: &str, key: &str, flags: &[&str]) -> ReadyPlugin {
    ready_with_args(id, key, flags, &[]).await
}

/// One fake plugin (`flags`) on a server with `extra` flags, ready, with an environment on its provider.
pub(crate) async fn ready_with_args(
    id: &str,
    key: &str,
    flags: &[&str],
    extra: &[&str],
) -> ReadyPlugin {
    let plugins = TempDir::new().unwrap();
    let dir = fake_plugin_dir(plugins.path(), id, key, flags);
    let server = server_with_args(&[&dir], extra, None).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, key, "ready").await;
    let env = plugin_env(&server, &company, key).await;
    ReadyPlugin {
        _plugins: plugins,
        server,
        company,
        env,
    }
}

/// Runs `run` (the fields besides `environmentId`) on `env` to its end: the finished run and its events.
pub(crate) async fn run_on(
    server: &TestServer,
    company: &str,
    env: &str,
    mut run: Value,
) -> (Value, Vec<Value>) {
    run["environmentId"] = json!(env);
    let id = start_run(server, company, run).await;
    let finished = wait_run(server, &id, Duration::from_secs(30)).await;
    (finished, all_events(server, &id).await)
}

/// The message of the run's error event.
pub(crate) fn error_message(events: &[Value]) -> String {
    let error = events
        .iter()
        .find(|event| event["type"] == "error")
        .unwrap_or_else(|| panic!("no error event in {events:?}"));
    error["data"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_plugin_provider_runs_commands_end_to_end_with_streamed_output() {
    let ReadyPlugin {
        _plugins,
        server,
        company,
        env,
    } = ready_plugin("berth.fake", "fake-plugin", &[]).await;

    let capability = capability(&server, &company, "fake-plugin").await;
    assert_eq!(capability["status"], "ready", "{capability}");
    assert_eq!(capability["source"], "plugin", "{capability}");
    assert_eq!(capability["pluginKey"], "berth.fake", "{capability}");
    assert!(capability.get("reason").is_none(), "{capability}");
    assert_eq!(
        capability["configSchema"]["properties"]["apiKey"]["format"],
        "secret-ref"
    );

    let (status, probe) = server
        .post(&format!("/api/environments/{env}/probe"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    assert_eq!(probe["ok"], true, "{probe}");

    // Output in several chunks on both streams, stdin, env: all must arrive in order, byte-exact.
    let script = "read line; echo \"in:$line\"; for i in 1 2 3; do echo out-$i; echo err-$i >&2; sleep 0.05; done; \
                  printf 'env:%s' \"$GREETING\"";
    let (finished, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", script], "stdin": "hello\n", "env": {"GREETING": "hi there"}}),
    )
    .await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert_eq!(finished["exitCode"], 0);
    assert_eq!(
        text_of(&events, "stdout"),
        "in:hello\nout-1\nout-2\nout-3\nenv:hi there"
    );
    assert_eq!(text_of(&events, "stderr"), "err-1\nerr-2\nerr-3\n");

    // A non-zero exit and a timeout come back as the plugin reported them.
    let (failing, _) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "exit 3"]}),
    )
    .await;
    assert_eq!(failing["status"], "failed", "{failing}");
    assert_eq!(failing["exitCode"], 3, "{failing}");
    let (slow, _) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sleep", "30"], "timeoutMs": 300}),
    )
    .await;
    assert_eq!(slow["status"], "timed_out", "{slow}");

    // Leases were made and ended through the plugin.
    let (_, leases) = server.get(&format!("/api/environments/{env}/leases")).await;
    let leases = leases.as_array().unwrap();
    assert_eq!(leases.len(), 3, "{leases:?}");
    for lease in leases {
        assert_eq!(lease["provider"], "fake-plugin", "{lease}");
        assert_eq!(lease["cleanupStatus"], "success", "{lease}");
        assert_eq!(lease["metadata"]["berthPluginId"], "berth.fake", "{lease}");
    }
    // The failed and the timed-out runs' leases ended `failed`, with why.
    let mut ends: Vec<(&str, Option<&str>)> = leases
        .iter()
        .map(|lease| {
            (
                lease["status"].as_str().unwrap(),
                lease["failureReason"].as_str(),
            )
        })
        .collect();
    ends.sort();
    assert_eq!(
        ends,
        [
            ("failed", Some("run_failed")),
            ("failed", Some("timed_out")),
            ("released", None)
        ],
        "{leases:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn cancelling_a_run_cancels_the_plugin_execution() {
    let ReadyPlugin {
        _plugins,
        server,
        company,
        env,
    } = ready_plugin("berth.fake", "fake-plugin", &[]).await;

    let run = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", "echo started; sleep 60"]}),
    )
    .await;
    crate::support::runs::wait_status(&server, &run, "running").await;
    let started = Instant::now();
    loop {
        let events = all_events(&server, &run).await;
        if text_of(&events, "stdout").contains("started") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no output: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = server
        .post(&format!("/api/runs/{run}/cancel"), json!({}))
        .await;
    assert!(status.is_success(), "{status}");
    let cancelled = wait_run(&server, &run, Duration::from_secs(15)).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_that_crashes_mid_execute_fails_the_run_and_is_restarted() {
    let ReadyPlugin {
        _plugins,
        server,
        company,
        env,
    } = ready_plugin("berth.crashy", "crashy", &["--crash-during-execute"]).await;

    let (failed, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo before-crash; sleep 5; echo never"]}),
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(
        text_of(&events, "stdout"),
        "before-crash\n",
        "output before the crash is kept"
    );
    let message = error_message(&events);
    assert!(
        message.contains("exited during environmentExecute"),
        "{message}"
    );
    // It comes back by itself.
    wait_capability(&server, &company, "crashy", "ready").await;
    let logs = server.stop().await;
    assert!(
        logs.contains("crashing during an execute"),
        "the plugin's stderr is in berth's log"
    );
}

#[tokio::test]
async fn broken_plugins_are_reported_and_never_hang_a_request() {
    let plugins = TempDir::new().unwrap();
    let unparsable = plugins.path().join("unparsable");
    std::fs::create_dir_all(&unparsable).unwrap();
    std::fs::write(unparsable.join("berth-plugin.json"), "{ not json").unwrap();
    let missing = plugins.path().join("missing");
    std::fs::create_dir_all(&missing).unwrap();
    std::fs::write(
        missing.join("berth-plugin.json"),
        json!({
            "id": "berth.missing", "version": "1", "command": ["bin/not-there"],
            "environmentDrivers": [{"driverKey": "missing", "kind": "sandbox_provider", "displayName": "Missing",
                                    "configSchema": {"type": "object"}}]
        })
        .to_string(),
    )
    .unwrap();
    let wrong_version = fake_plugin_dir(
        plugins.path(),
        "berth.v2",
        "wrong-version",
        &["--protocol-version", "2"],
    );
    let crash_loop = fake_plugin_dir(
        plugins.path(),
        "berth.loop",
        "crash-loop",
        &["--exit-at-start"],
    );
    let clash = fake_plugin_dir(plugins.path(), "berth.clash", "fake", &[]);
    let garbage = fake_plugin_dir(
        plugins.path(),
        "berth.garbage",
        "garbage",
        &["--garbage-during-execute"],
    );
    let server = server_with(&[
        &unparsable,
        &missing,
        &wrong_version,
        &crash_loop,
        &clash,
        &garbage,
    ])
    .await;
    let company = server.default_company().await;

    // The built-in fake keeps its key; the server started despite all of this.
    assert_eq!(
        capability(&server, &company, "fake").await["source"],
        "builtin"
    );
    let logs = server.logs();
    assert!(
        logs.contains("plugin_manifest_invalid") || logs.contains("berth-plugin.json"),
        "{logs}"
    );
    assert!(
        logs.contains("already taken by a built-in provider"),
        "{logs}"
    );

    let wrong = wait_capability(&server, &company, "wrong-version", "failed").await;
    assert!(
        wrong["reason"]
            .as_str()
            .unwrap()
            .contains("protocol version 2"),
        "{wrong}"
    );
    let looping = wait_capability(&server, &company, "crash-loop", "failed").await;
    assert!(
        looping["reason"]
            .as_str()
            .unwrap()
            .contains("stopped restarting it"),
        "the circuit opens: {looping}"
    );
    let missing_status = capability(&server, &company, "missing").await;
    assert_ne!(missing_status["status"], "ready", "{missing_status}");
    assert!(
        missing_status["reason"]
            .as_str()
            .unwrap()
            .contains("cannot start"),
        "{missing_status}"
    );

    // Operations on a plugin that is not ready fail at once with provider_unavailable.
    let env = plugin_env(&server, &company, "crash-loop").await;
    let started = Instant::now();
    let (failed, events) = run_on(&server, &company, &env, json!({"command": ["true"]})).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failing fast took {:?}",
        started.elapsed()
    );
    let message = error_message(&events);
    assert!(message.contains("`berth.loop` is unavailable"), "{message}");
    assert!(message.contains("stopped restarting it"), "{message}");

    // Garbage on stdout during an execute: the run fails with a protocol error, the plugin restarts.
    wait_capability(&server, &company, "garbage", "ready").await;
    let env = plugin_env(&server, &company, "garbage").await;
    let (failed, events) = run_on(&server, &company, &env, json!({"command": ["true"]})).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let message = error_message(&events);
    assert!(message.contains("not JSON-RPC"), "{message}");
    assert!(
        !message.contains("this line"),
        "what the plugin printed is not quoted: {message}"
    );
    wait_capability(&server, &company, "garbage", "ready").await;
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_gets_a_minimal_environment_and_no_server_secrets() {
    let plugins = TempDir::new().unwrap();
    let dir = fake_plugin_dir(plugins.path(), "berth.fake", "fake-plugin", &[]);
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--plugin-dir".to_owned(), dir.display().to_string()],
        env: vec![(
            "BERTH_ADMIN_TOKEN".to_owned(),
            "server-admin-token-never-shown".to_owned(),
        )],
        ..ServerOptions::default()
    })
    .await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "fake-plugin", "ready").await;
    let pid = server.pid().unwrap();
    // The plugin is the server's child (of whichever thread spawned it): read its environment from /proc.
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        children.push_str(&std::fs::read_to_string(task.join("children")).unwrap_or_default());
        children.push(' ');
    }
    let mut seen = false;
    for child in children.split_whitespace() {
        let Ok(environ) = std::fs::read(format!("/proc/{child}/environ")) else {
            continue;
        };
        let environ = String::from_utf8_lossy(&environ);
        if !environ.contains("BERTH_PLUGIN_ID=berth.fake") {
            continue;
        }
        seen = true;
        let names: Vec<&str> = environ
            .split('\0')
            .filter(|entry| !entry.is_empty())
            .map(|entry| entry.split('=').next().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ["BERTH_PLUGIN_ID", "HOME", "PATH"], "{environ}");
        assert!(!environ.contains("server-admin-token-never-shown"));
    }
    assert!(seen, "the plugin process was not found among {children:?}");
    server.stop().await;
}
