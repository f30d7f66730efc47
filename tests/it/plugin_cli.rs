//! `berth plugin check` and `berth plugin list` with real plugin processes (the fake provider's plugin binary and
//! the example plugin under `examples/dir-sandbox`), and a run through the example plugin.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::plugins::{fake_plugin_dir, run_on, server_with, wait_capability};
use crate::support::runs::text_of;
use crate::support::server::{TestServer, berth_bin};

/// The example plugin's binary: `BERTH_EXAMPLE_PLUGIN_BIN`, else built once per test process.
fn example_plugin_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("BERTH_EXAMPLE_PLUGIN_BIN") {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "berth-example-dir-sandbox"])
            .status()
            .expect("run cargo build for the example plugin");
        assert!(status.success(), "building the example plugin failed");
        let exe = std::env::current_exe().expect("current exe");
        exe.parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("berth-example-dir-sandbox")
    })
}

/// The example's own manifest, copied into `parent` with its command pointing at the built binary (the checked-in
/// one names it relative to the default target directory).
fn example_plugin_dir(parent: &Path) -> PathBuf {
    let source =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/dir-sandbox/berth-plugin.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
    manifest["command"] = json!([example_plugin_bin()]);
    let dir = parent.join("dir-sandbox");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("berth-plugin.json"), manifest.to_string()).unwrap();
    dir
}

/// `berth ARGS` with a clean environment (and `server`'s URL and data dir, when given), at most 3 minutes.
async fn berth(args: &[&str], server: Option<&TestServer>) -> Output {
    let home = TempDir::new().unwrap();
    let mut command = tokio::process::Command::new(berth_bin());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .kill_on_drop(true);
    if let Some(server) = server {
        command
            .env("BERTH_URL", &server.url)
            .env("BERTH_DATA_DIR", &server.data_dir);
    }
    tokio::time::timeout(Duration::from_secs(180), command.output())
        .await
        .expect("berth finished within 3 minutes")
        .expect("run berth")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `berth plugin check DIR --json`: its exit status and report.
async fn check(dir: &Path, extra: &[&str]) -> (bool, Value, Output) {
    let dir = dir.display().to_string();
    let mut args = vec!["plugin", "check", dir.as_str(), "--json"];
    args.extend(extra);
    let output = berth(&args, None).await;
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {}\nstderr: {}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), report, output)
}

fn outcome<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

const ALL_CHECKS: [&str; 17] = [
    "manifest",
    "handshake",
    "health",
    "validate-config",
    "probe",
    "acquire-lease",
    "realize-workspace",
    "execute-streaming",
    "execute-exit-code",
    "stdin",
    "stdin-stream",
    "timeout",
    "cancel",
    "release-lease",
    "destroy-lease",
    "secrets",
    "shutdown",
];

#[tokio::test]
async fn the_fake_plugin_passes_every_check() {
    let plugins = TempDir::new().unwrap();
    let dir = fake_plugin_dir(plugins.path(), "berth.fake", "fake-plugin", &[]);

    let output = berth(&["plugin", "check", &dir.display().to_string()], None).await;
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), ALL_CHECKS.len(), "{text}");
    for (line, name) in lines.iter().zip(ALL_CHECKS) {
        assert_eq!(*line, format!("PASS {name}"), "{text}");
    }

    let (passed, report, _) = check(&dir, &[]).await;
    assert!(passed, "{report}");
    assert_eq!(report["passed"], true);
    assert_eq!(report["pluginId"], "berth.fake");
    assert_eq!(report["driverKey"], "fake-plugin");
    assert_eq!(outcome(&report, "secrets")["outcome"], "pass", "{report}");
    assert_eq!(
        outcome(&report, "stdin-stream")["outcome"],
        "pass",
        "{report}"
    );

    // The same plugin offering an environment driver: checked through the same calls.
    let manifest_path = dir.join("berth-plugin.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["environmentDrivers"][0]["kind"] = json!("environment_driver");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let (passed, report, _) = check(&dir, &["--driver", "fake-plugin"]).await;
    assert!(passed, "{report}");
}

#[tokio::test]
async fn a_broken_plugin_fails_the_checks_it_breaks() {
    let plugins = TempDir::new().unwrap();
    // Garbage on stdout in every execute: each execute check fails; the plugin comes back for the others.
    let garbage = fake_plugin_dir(
        plugins.path(),
        "berth.garbage",
        "garbage",
        &["--garbage-during-execute"],
    );
    let output = berth(&["plugin", "check", &garbage.display().to_string()], None).await;
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("PASS probe\n"), "{text}");
    assert!(text.contains("PASS acquire-lease\n"), "{text}");
    let streaming = text
        .lines()
        .find(|line| line.starts_with("FAIL execute-streaming: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(streaming.contains("not JSON-RPC"), "{streaming}");
    assert!(text.contains("FAIL stdin: "), "{text}");
    assert!(text.contains("PASS destroy-lease\n"), "{text}");

    // No lease: what needs one is skipped, saying why.
    let no_lease = fake_plugin_dir(
        plugins.path(),
        "berth.nolease",
        "no-lease",
        &["--fail-acquire", "out of sandboxes"],
    );
    let (passed, report, _) = check(&no_lease, &[]).await;
    assert!(!passed, "{report}");
    let acquire = outcome(&report, "acquire-lease");
    assert_eq!(acquire["outcome"], "fail", "{report}");
    assert!(
        acquire["reason"]
            .as_str()
            .unwrap()
            .contains("out of sandboxes"),
        "{acquire}"
    );
    let realize = outcome(&report, "realize-workspace");
    assert_eq!(realize["outcome"], "skip", "{report}");
    assert!(
        realize["reason"]
            .as_str()
            .unwrap()
            .contains("acquire-lease"),
        "{realize}"
    );
    assert_eq!(outcome(&report, "shutdown")["outcome"], "pass", "{report}");

    // A wrong protocol version: the handshake fails and nothing else is tried.
    let v2 = fake_plugin_dir(
        plugins.path(),
        "berth.v2",
        "v2",
        &["--protocol-version", "2"],
    );
    let (passed, report, _) = check(&v2, &[]).await;
    assert!(!passed, "{report}");
    let handshake = outcome(&report, "handshake");
    assert_eq!(handshake["outcome"], "fail", "{report}");
    assert!(
        handshake["reason"]
            .as_str()
            .unwrap()
            .contains("protocol version 2"),
        "{handshake}"
    );
    assert_eq!(outcome(&report, "probe")["outcome"], "skip", "{report}");
}

#[tokio::test]
async fn a_hanging_plugin_fails_within_its_deadlines() {
    let plugins = TempDir::new().unwrap();
    let hang = fake_plugin_dir(
        plugins.path(),
        "berth.hang",
        "hang",
        &["--hang-during-execute"],
    );
    let started = std::time::Instant::now();
    let (passed, report, _) = check(&hang, &["--execute-deadline-ms", "1500"]).await;
    assert!(!passed, "{report}");
    let timeout = outcome(&report, "timeout");
    assert_eq!(timeout["outcome"], "fail", "{report}");
    assert!(
        timeout["reason"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{timeout}"
    );
    assert_eq!(outcome(&report, "probe")["outcome"], "pass", "{report}");
    assert!(
        started.elapsed() < Duration::from_secs(170),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_bad_manifest_or_config_fails_the_first_check() {
    let plugins = TempDir::new().unwrap();
    let (passed, report, output) = check(&plugins.path().join("nothing-here"), &[]).await;
    assert!(!passed);
    assert_eq!(output.status.code(), Some(1));
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 1, "{report}");
    assert_eq!(checks[0]["name"], "manifest");
    assert_eq!(checks[0]["outcome"], "fail");

    let dir = fake_plugin_dir(plugins.path(), "berth.fake", "fake-plugin", &[]);
    let (passed, report, _) = check(&dir, &["--config", r#"{"image": 7}"#]).await;
    assert!(!passed, "{report}");
    let manifest = outcome(&report, "manifest");
    assert!(
        manifest["reason"]
            .as_str()
            .unwrap()
            .contains("config.image"),
        "{manifest}"
    );
    let (passed, report, _) = check(&dir, &["--driver", "not-there"]).await;
    assert!(!passed, "{report}");
    assert!(
        outcome(&report, "manifest")["reason"]
            .as_str()
            .unwrap()
            .contains("no driver \"not-there\""),
        "{report}"
    );
}

#[tokio::test]
async fn plugin_list_shows_each_plugin_and_its_status() {
    let plugins = TempDir::new().unwrap();
    let fake = fake_plugin_dir(plugins.path(), "berth.fake", "fake-plugin", &[]);
    let broken = fake_plugin_dir(
        plugins.path(),
        "berth.loop",
        "crash-loop",
        &["--exit-at-start"],
    );
    // The same fake, offered as an environment driver (`driver: "plugin"`).
    let driver = fake_plugin_dir(plugins.path(), "berth.driver", "fake-driver", &[]);
    let manifest_path = driver.join("berth-plugin.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["environmentDrivers"][0]["kind"] = json!("environment_driver");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let unparsable = plugins.path().join("unparsable");
    std::fs::create_dir_all(&unparsable).unwrap();
    std::fs::write(unparsable.join("berth-plugin.json"), "{ not json").unwrap();
    let server = server_with(&[&fake, &broken, &driver, &unparsable]).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "fake-plugin", "ready").await;
    wait_capability(&server, &company, "crash-loop", "failed").await;

    // Until every plugin has settled: the environment driver is ready too.
    let started = std::time::Instant::now();
    let listed = loop {
        let output = berth(&["plugin", "list", "--json"], Some(&server)).await;
        assert!(output.status.success(), "{}", stdout(&output));
        let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
        let ready = listed["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|entry| entry["driverKey"] == "fake-driver" && entry["status"] == "ready");
        if ready {
            break listed;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let entries = listed["plugins"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        3,
        "only plugins, not the built-in providers: {listed}"
    );
    let entry = |key: &str| {
        entries
            .iter()
            .find(|entry| entry["driverKey"] == key)
            .unwrap_or_else(|| panic!("no {key} in {listed}"))
    };
    let fake = entry("fake-plugin");
    assert_eq!(fake["pluginKey"], "berth.fake");
    assert_eq!(fake["status"], "ready");
    assert_eq!(fake["kind"], "sandbox_provider");
    assert_eq!(fake["reason"], Value::Null);
    let failed = entry("crash-loop");
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("stopped restarting it")
    );
    let driver = entry("fake-driver");
    assert_eq!(driver["pluginKey"], "berth.driver");
    assert_eq!(driver["kind"], "environment_driver");
    let problems = listed["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{listed}");
    assert!(
        problems[0].as_str().unwrap().contains("unparsable"),
        "{listed}"
    );

    let output = berth(&["plugin", "list"], Some(&server)).await;
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("PLUGIN"), "{text}");
    assert_eq!(lines.len(), 5, "{text}");
    let line = |key: &str| *lines.iter().find(|line| line.contains(key)).unwrap();
    assert!(
        line("fake-plugin").starts_with("berth.fake") && line("fake-plugin").contains("ready"),
        "{text}"
    );
    assert!(
        line("crash-loop").contains("failed")
            && line("crash-loop").contains("stopped restarting it"),
        "{text}"
    );
    assert!(line("fake-driver").contains("environment_driver"), "{text}");
    assert!(
        lines[4].starts_with("not loaded: ") && lines[4].contains("unparsable"),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_example_plugin_passes_the_check_and_runs_commands() {
    let plugins = TempDir::new().unwrap();
    let dir = example_plugin_dir(plugins.path());

    let output = berth(&["plugin", "check", &dir.display().to_string()], None).await;
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("PASS secrets\n"), "{text}");
    assert!(text.contains("PASS execute-streaming\n"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");

    let server = server_with(&[&dir]).await;
    let company = server.default_company().await;
    let capability = wait_capability(&server, &company, "dir-sandbox", "ready").await;
    assert_eq!(
        capability["pluginKey"], "example.dir-sandbox",
        "{capability}"
    );
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "example", "driver": "sandbox",
                   "config": {"provider": "dir-sandbox", "label": "demo", "accessToken": "tok-never-shown"}}),
        )
        .await;
    assert!(status.is_success(), "{env}");
    let env = env["id"].as_str().unwrap().to_owned();
    let (status, probe) = server
        .post(&format!("/api/environments/{env}/probe"), json!({}))
        .await;
    assert!(status.is_success(), "{probe}");
    assert_eq!(probe["ok"], true, "{probe}");
    assert!(
        probe["summary"]
            .as_str()
            .unwrap()
            .contains("access token given"),
        "{probe}"
    );

    let (finished, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo \"in: $(cat)\"; echo to-stderr >&2; pwd; exit 4"],
               "stdin": "hello"}),
    )
    .await;
    assert_eq!(finished["status"], "failed", "{finished}");
    assert_eq!(finished["exitCode"], 4, "{finished}");
    let out = text_of(&events, "stdout");
    assert!(out.starts_with("in: hello\n"), "{out}");
    assert!(
        out.trim_end().ends_with("/workspace"),
        "runs in the lease's workspace: {out}"
    );
    assert_eq!(text_of(&events, "stderr"), "to-stderr\n");
    // And from the command line, as a user would.
    let cli = berth(
        &[
            "run",
            "--env",
            &env,
            "--",
            "sh",
            "-c",
            "echo from-cli; exit 5",
        ],
        Some(&server),
    )
    .await;
    assert_eq!(cli.status.code(), Some(5), "{}", stdout(&cli));
    assert_eq!(stdout(&cli), "from-cli\n");
    let (timed_out, _) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sleep", "30"], "timeoutMs": 300}),
    )
    .await;
    assert_eq!(timed_out["status"], "timed_out", "{timed_out}");
    let logs = server.stop().await;
    assert!(
        !logs.contains("tok-never-shown"),
        "the secret stays out of berth's log"
    );
}
