//! Provider plugins that misbehave, each with a real plugin process (`berth-fake-provider` and its fault flags):
//! calls that outlive their deadlines, an oversized line on stdout, an `initialize` that never comes, and a server
//! killed with SIGKILL while plugin leases are active. Every wait is bounded: a hang is a failure, not a stuck test.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::plugins::{
    ReadyPlugin, capability, error_message, fake_plugin_dir, plugin_env, ready_with_args, run_on,
    server_with_args, wait_capability,
};
use crate::support::runs::{all_events, lease, start_run, text_of, wait_status};
use crate::support::server::TestServer;

/// The variable that switches the fake plugin's execute faults on for one run (`--execute-faults-with-env`).
const FAULT_ENV: &str = "FAKE_PLUGIN_FAULT";

/// The lease of a run (which has one).
async fn lease_of_run(server: &TestServer, run: &Value) -> Value {
    let id = run["leaseId"]
        .as_str()
        .unwrap_or_else(|| panic!("the run has no lease: {run}"));
    lease(server, id).await
}

/// The error event's code.
fn error_code(events: &[Value]) -> String {
    let error = events
        .iter()
        .find(|event| event["type"] == "error")
        .unwrap_or_else(|| panic!("no error event in {events:?}"));
    error["data"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A process as `/proc` shows it: state letter and process group.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`: comm may hold spaces, so read after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether `pid` is running (a zombie waiting to be reaped has ended).
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The running `berth-fake-provider` processes started for plugin `id` by the server on `data_dir` (found by the
/// `HOME` berth gives each plugin, `<data-dir>/plugin-state/<id>`).
fn plugin_pids(data_dir: &Path, id: &str) -> Vec<u32> {
    let home = format!("HOME={}", data_dir.join("plugin-state").join(id).display());
    let plugin_id = format!("BERTH_PLUGIN_ID={id}");
    all_pids()
        .into_iter()
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if !comm.starts_with("berth-fake-prov") || !alive(*pid) {
                return false;
            }
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let environ = String::from_utf8_lossy(&environ);
            let entries: Vec<&str> = environ.split('\0').collect();
            entries.contains(&home.as_str()) && entries.contains(&plugin_id.as_str())
        })
        .collect()
}

/// The one running plugin process for `id` (waits up to 10 s for it to be there alone).
async fn the_plugin_pid(data_dir: &Path, id: &str) -> u32 {
    let started = Instant::now();
    loop {
        let pids = plugin_pids(data_dir, id);
        if let [pid] = pids[..] {
            return pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "expected one process of plugin {id}, found {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Running processes in process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|pid| proc_stat(*pid).is_some_and(|(state, group)| group == pgid && state != 'Z'))
        .collect()
}

/// Running processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|pid| *pid != me && alive(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
        })
        .collect()
}

/// Waits (at most `limit`) until `check` holds; panics with `what` and the last value otherwise.
async fn eventually<T: std::fmt::Debug>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let started = Instant::now();
    loop {
        let value = probe();
        if check(&value) {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "{what} after {limit:?}: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_execute_that_hangs_past_its_deadline_fails_the_run_and_the_plugin_stays_usable() {
    let ReadyPlugin {
        _plugins,
        server,
        company,
        env,
    } = ready_with_args(
        "berth.hang-exec",
        "hang-exec",
        &[
            "--hang-during-execute",
            "--execute-faults-with-env",
            FAULT_ENV,
        ],
        &["--plugin-execute-grace-ms", "1000"],
    )
    .await;

    // timeoutMs 500 + grace 1000: the execute's deadline is 1.5 s after it was sent. The plugin never answers,
    // and ignores the cancel berth sends then.
    let started = Instant::now();
    let (hung, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo never"], "timeoutMs": 500, "env": {FAULT_ENV: "1"}}),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the run took {took:?} to end"
    );
    assert!(
        took >= Duration::from_millis(1400),
        "the run ended before the execute's deadline ({took:?}): {hung}"
    );
    // A call past its deadline fails the operation (PLUGINS.md §4): the run fails, it did not time out by itself.
    assert_eq!(hung["status"], "failed", "{hung}");
    assert!(hung["exitCode"].is_null(), "{hung}");
    let message = error_message(&events);
    assert!(
        message.contains("`berth.hang-exec` did not answer environmentExecute within"),
        "{message}"
    );
    assert_eq!(error_code(&events), "driver_failed", "{events:?}");
    assert_eq!(text_of(&events, "stdout"), "", "nothing ran");
    // Its lease was still cleaned up through the plugin, which is still there.
    let hung_lease = lease_of_run(&server, &hung).await;
    assert_eq!(hung_lease["status"], "failed", "{hung_lease}");
    assert_eq!(hung_lease["failureReason"], "driver_failed", "{hung_lease}");
    assert_eq!(hung_lease["cleanupStatus"], "success", "{hung_lease}");

    // The plugin is still usable: ready, and a run without the fault succeeds through it.
    let ready = capability(&server, &company, "hang-exec").await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let (ok, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo still-here"], "timeoutMs": 10000}),
    )
    .await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(text_of(&events, "stdout"), "still-here\n");
    server.stop().await;
}

#[tokio::test]
async fn lease_calls_that_hang_past_the_call_deadline_fail_with_a_clear_message() {
    let plugins = TempDir::new().unwrap();
    let slow_acquire = fake_plugin_dir(
        plugins.path(),
        "berth.slow-acquire",
        "slow-acquire",
        &["--acquire-delay-ms", "20000"],
    );
    let hung_release = fake_plugin_dir(
        plugins.path(),
        "berth.hang-release",
        "hang-release",
        &["--hang-during-release"],
    );
    let server = server_with_args(
        &[&slow_acquire, &hung_release],
        &["--plugin-call-deadline-ms", "1000"],
        None,
    )
    .await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "slow-acquire", "ready").await;
    wait_capability(&server, &company, "hang-release", "ready").await;

    // An acquire that does not answer within the call deadline fails the run, at the deadline.
    let env = plugin_env(&server, &company, "slow-acquire").await;
    let started = Instant::now();
    let (failed, events) = run_on(&server, &company, &env, json!({"command": ["true"]})).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "the run took {took:?}");
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["leaseId"].is_null(), "no lease was made: {failed}");
    assert_eq!(error_code(&events), "lease_acquire_failed", "{events:?}");
    let message = error_message(&events);
    assert!(
        message.contains("`berth.slow-acquire` did not answer environmentAcquireLease within 1 s"),
        "{message}"
    );
    // The plugin is not judged dead for being slow.
    let slow = capability(&server, &company, "slow-acquire").await;
    assert_eq!(slow["status"], "ready", "{slow}");

    // A release (destroy) that never answers: the command's result stands, the lease ends released with its
    // cleanup failed, and the run is not held up past the deadline.
    let env = plugin_env(&server, &company, "hang-release").await;
    let started = Instant::now();
    let (done, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo done"]}),
    )
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "the run took {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "the run ended before the release's deadline ({took:?})"
    );
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(text_of(&events, "stdout"), "done\n");
    let held = lease_of_run(&server, &done).await;
    assert_eq!(held["status"], "released", "{held}");
    assert_eq!(held["cleanupStatus"], "failed", "{held}");
    let logs = server.stop().await;
    assert!(
        logs.contains("`berth.hang-release` did not answer environmentDestroyLease within 1 s"),
        "the failed cleanup is logged with the reason: {logs}"
    );
    assert!(logs.contains("hanging in a release"), "{logs}");
}

#[tokio::test]
async fn a_lease_acquired_after_its_deadline_is_not_leaked() {
    let plugins = TempDir::new().unwrap();
    let root = TempDir::new().unwrap();
    let root_arg = root.path().display().to_string();
    let dir = fake_plugin_dir(
        plugins.path(),
        "berth.late-acquire",
        "late-acquire",
        &["--acquire-delay-ms", "2000", "--root", &root_arg],
    );
    let server = server_with_args(&[&dir], &["--plugin-call-deadline-ms", "1000"], None).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "late-acquire", "ready").await;
    let env = plugin_env(&server, &company, "late-acquire").await;
    let (failed, events) = run_on(&server, &company, &env, json!({"command": ["true"]})).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        error_message(&events).contains("did not answer environmentAcquireLease"),
        "{events:?}"
    );
    // The plugin finishes the acquire a second later and answers; nobody holds that sandbox, so berth must end it
    // (destroy it through the plugin) rather than leave it behind for ever.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leftovers = || {
        std::fs::read_dir(root.path())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let left = eventually(
        Duration::from_secs(5),
        "a sandbox acquired too late is still there",
        leftovers,
        |left| left.is_empty(),
    )
    .await;
    assert!(left.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_line_on_stdout_fails_the_run_and_restarts_the_plugin() {
    let ReadyPlugin {
        _plugins,
        server,
        company,
        env,
    } = ready_with_args(
        "berth.oversized",
        "oversized",
        &[
            "--oversized-line-during-execute",
            "--execute-faults-with-env",
            FAULT_ENV,
        ],
        &[],
    )
    .await;
    let before = the_plugin_pid(&server.data_dir, "berth.oversized").await;

    let started = Instant::now();
    let (failed, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo never"], "env": {FAULT_ENV: "1"}}),
    )
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "the run took {took:?}");
    assert_eq!(failed["status"], "failed", "{failed}");
    let message = error_message(&events);
    assert!(
        message.contains("`berth.oversized` broke the protocol: a line longer than 16 MiB"),
        "{message}"
    );
    assert!(!message.contains("oversized-line-content"), "{message}");

    // The process that broke the protocol is gone, and another took its place.
    eventually(
        Duration::from_secs(10),
        "the plugin that broke the protocol is still running",
        || alive(before),
        |alive| !alive,
    )
    .await;
    let after = the_plugin_pid(&server.data_dir, "berth.oversized").await;
    assert_ne!(after, before, "the plugin was restarted");
    wait_capability(&server, &company, "oversized", "ready").await;
    let (ok, events) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo fine"]}),
    )
    .await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(text_of(&events, "stdout"), "fine\n");

    let logs = server.stop().await;
    assert!(
        logs.contains("longer than 16 MiB"),
        "the protocol error is logged"
    );
    assert!(
        logs.contains("printing an oversized line"),
        "the fault did happen: {logs}"
    );
    assert!(
        !logs.contains("oversized-line-content"),
        "berth's log quotes the oversized line"
    );
}

#[tokio::test]
async fn a_plugin_too_slow_to_initialize_is_failed_and_its_runs_fail_fast() {
    let plugins = TempDir::new().unwrap();
    let dir = fake_plugin_dir(
        plugins.path(),
        "berth.slow-init",
        "slow-init",
        &["--start-delay-ms", "30000"],
    );
    let server =
        server_with_args(&[&dir], &["--plugin-initialize-deadline-ms", "1000"], None).await;
    let company = server.default_company().await;

    let failed = wait_capability(&server, &company, "slow-init", "failed").await;
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("initialize failed")
            && reason.contains("did not answer initialize within 1 s"),
        "{failed}"
    );
    assert_eq!(failed["source"], "plugin", "{failed}");

    // Each start that did not answer in time was killed: never more than the one starting now.
    let data_dir = server.data_dir.clone();
    for _ in 0..30 {
        let pids = plugin_pids(&data_dir, "berth.slow-init");
        assert!(pids.len() <= 1, "slow plugin processes pile up: {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Runs on it fail at once with the reason, never waiting for it.
    let env = plugin_env(&server, &company, "slow-init").await;
    let started = Instant::now();
    let (run, events) = run_on(&server, &company, &env, json!({"command": ["true"]})).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "failing fast took {took:?}");
    assert_eq!(run["status"], "failed", "{run}");
    let message = error_message(&events);
    assert!(
        message.contains("`berth.slow-init` is unavailable"),
        "{message}"
    );
    assert!(
        run["error"]
            .as_str()
            .is_some_and(|error| error.contains("is unavailable")),
        "{run}"
    );
    let (status, probe) = server
        .post(&format!("/api/environments/{env}/probe"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    assert_eq!(probe["ok"], false, "{probe}");
    server.stop().await;
}

#[tokio::test]
async fn a_server_killed_with_plugin_leases_active_cleans_them_up_through_the_plugin_on_restart() {
    let plugins = TempDir::new().unwrap();
    let root = TempDir::new().unwrap();
    let root_arg = root.path().display().to_string();
    let id = "berth.killed";
    let dir = fake_plugin_dir(plugins.path(), id, "killed", &["--root", &root_arg]);
    let server = server_with_args(&[&dir], &[], None).await;
    let company = server.default_company().await;
    wait_capability(&server, &company, "killed", "ready").await;
    let ephemeral = plugin_env(&server, &company, "killed").await;
    let (status, reusable) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "killed-reuse", "driver": "sandbox",
                   "config": {"provider": "killed", "reuseLease": true}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{reusable}");
    let reusable = reusable["id"].as_str().unwrap().to_owned();

    let marker = format!("berth-plugin-orphan-{}", uuid::Uuid::new_v4().simple());
    let mut runs = Vec::new();
    for env in [&ephemeral, &reusable] {
        let run = start_run(
            &server,
            &company,
            json!({"environmentId": env, "command": ["sh", "-c", format!("sleep 60; echo {marker}")]}),
        )
        .await;
        runs.push(run);
    }
    let mut sandboxes = Vec::new();
    let mut lease_ids = Vec::new();
    for run_id in &runs {
        wait_status(&server, run_id, "running").await;
        let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
        let held = lease_of_run(&server, &run).await;
        assert_eq!(held["status"], "active", "{held}");
        assert_eq!(held["provider"], "killed", "{held}");
        let sandbox = PathBuf::from(held["metadata"]["sandboxDir"].as_str().unwrap());
        assert!(
            sandbox.starts_with(root.path()) && sandbox.is_dir(),
            "the sandbox is under the plugin's root: {held}"
        );
        sandboxes.push(sandbox);
        lease_ids.push(held["id"].as_str().unwrap().to_owned());
    }
    let commands = eventually(
        Duration::from_secs(10),
        "the commands never started",
        || processes_with(&marker),
        |pids| !pids.is_empty(),
    )
    .await;
    let old_plugin = the_plugin_pid(&server.data_dir, id).await;
    assert_eq!(
        proc_stat(old_plugin).map(|(_, group)| group),
        Some(old_plugin),
        "the plugin leads a process group of its own"
    );

    // SIGKILL: no shutdown, no release. The plugin sees its stdin close.
    let data_dir = server.data_dir.clone();
    let keeper = server.kill_keeping_data().await;
    let restarted = server_with_args(&[&dir], &[], Some(data_dir.clone())).await;

    // The start-up sweep failed the runs and destroyed their leases through the (new) plugin.
    for run_id in &runs {
        let (_, run) = restarted.get(&format!("/api/runs/{run_id}")).await;
        assert_eq!(run["status"], "failed", "{run}");
        assert_eq!(
            run["error"], "berth stopped while the run was in flight",
            "{run}"
        );
        let events = all_events(&restarted, run_id).await;
        assert_eq!(error_code(&events), "orphaned", "{events:?}");
        assert_eq!(events.last().unwrap()["data"]["status"], "failed");
    }
    for (lease_id, sandbox) in lease_ids.iter().zip(&sandboxes) {
        let released = lease(&restarted, lease_id).await;
        // Its run was failed as an orphan, so the lease is failed too, with the sweep's reason.
        assert_eq!(released["status"], "failed", "{released}");
        assert_eq!(released["failureReason"], "orphaned", "{released}");
        assert_eq!(released["cleanupStatus"], "success", "{released}");
        assert!(
            !sandbox.exists(),
            "the fake's sandbox {} is still there",
            sandbox.display()
        );
    }
    let new_plugin = the_plugin_pid(&data_dir, id).await;
    assert_ne!(new_plugin, old_plugin);

    // Nothing of the first server's plugin is left: not the process, not its group, not the commands it ran.
    eventually(
        Duration::from_secs(10),
        "the first server's plugin outlived it",
        || alive(old_plugin),
        |alive| !alive,
    )
    .await;
    assert_eq!(group_members(old_plugin), Vec::<u32>::new());
    let left = processes_with(&marker);
    assert!(
        left.is_empty(),
        "commands {commands:?} of the killed server's runs still run: {left:?}"
    );
    restarted.stop().await;
    drop(keeper);
}
