//! Runs on SSH environments, end to end against a real OpenSSH sshd on loopback: exec with stdin and env, secrets
//! kept out of every command line, remote process trees killed on timeout, workspace sync (round trip, incremental,
//! conflicts), the callback bridge through a remote port forward, many runs on one host, and a connection killed
//! mid-run.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::runs::{all_events, start_run, text_of, wait_run};
use crate::support::server::TestServer;
use crate::support::sshd::TestSshd;

async fn ssh_env(server: &TestServer, company: &str, sshd: &TestSshd, extra: Value) -> String {
    let mut config = sshd.config();
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": format!("ssh-{}", uuid::Uuid::new_v4()), "driver": "ssh", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    env["id"].as_str().unwrap().to_owned()
}

/// A real sshd, a real server, and an ssh environment pointing at the one from the other.
struct Lab {
    sshd: TestSshd,
    server: TestServer,
    company: String,
    env: String,
}

/// Starts a [`Lab`] whose environment config is the sshd's plus `extra`.
async fn lab(extra: Value) -> Lab {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = ssh_env(&server, &company, &sshd, extra).await;
    Lab {
        sshd,
        server,
        company,
        env,
    }
}

async fn run_to_end(server: &TestServer, company: &str, body: Value) -> (Value, Vec<Value>) {
    let run_id = start_run(server, company, body).await;
    let run = wait_run(server, &run_id, Duration::from_secs(60)).await;
    let events = all_events(server, &run_id).await;
    (run, events)
}

async fn lease_of(server: &TestServer, run: &Value) -> Value {
    let (status, lease) = server
        .get(&format!(
            "/api/environment-leases/{}",
            run["leaseId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{lease}");
    lease
}

/// Waits until the run's stdout holds `text` (at most 20 s).
async fn wait_for_stdout(server: &TestServer, run_id: &str, text: &str) {
    let started = Instant::now();
    while !text_of(&all_events(server, run_id).await, "stdout").contains(text) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the run never printed {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process whose command line holds `marker` runs on this machine (both hosts).
fn pgrep(marker: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .unwrap()
        .status
        .success()
}

fn workspace_event<'a>(events: &'a [Value], phase: &str) -> &'a Value {
    events
        .iter()
        .find(|event| event["type"] == "workspace" && event["data"]["phase"] == phase)
        .unwrap_or_else(|| panic!("no workspace {phase} event: {events:?}"))
}

#[tokio::test]
async fn a_command_runs_over_ssh_with_stdin_env_and_exactly_its_environment() {
    let Lab {
        sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;

    let (first, events) = run_to_end(
        &server,
        &company,
        json!({
            "environmentId": env,
            "command": ["sh", "-c", "echo \"greeting=$GREETING\"; cat; echo oops >&2; pwd; env | grep -o '^[A-Za-z_][A-Za-z0-9_]*=' | tr -d = | sort | tr '\\n' ' '; exit 7"],
            "env": {"GREETING": "hello 'quoted'\nsecond line"},
            "stdin": "from stdin\n",
            "bridge": false,
        }),
    )
    .await;
    assert_eq!(first["status"], "failed", "{first}");
    assert_eq!(first["exitCode"], 7);
    let stdout = text_of(&events, "stdout");
    assert!(
        stdout.starts_with("greeting=hello 'quoted'\nsecond line\nfrom stdin\n"),
        "{stdout}"
    );
    assert_eq!(text_of(&events, "stderr"), "oops\n");
    let cwd = workspace_event(&events, "realized")["data"]["cwd"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        cwd.starts_with(sshd.workspace.to_str().unwrap()) && cwd.contains("/runs/"),
        "{cwd}"
    );
    assert!(stdout.contains(&format!("{cwd}\n")), "{stdout}");
    // Nothing of sshd's session environment (SSH_CONNECTION, USER, MAIL...) leaks into the command.
    let names: Vec<&str> = stdout.lines().last().unwrap().split_whitespace().collect();
    for name in &names {
        assert!(
            ["GREETING", "HOME", "PATH", "PWD", "SHLVL", "_", "OLDPWD"].contains(name),
            "unexpected variable {name} in {names:?}"
        );
    }

    // Positional arguments after `sh -c SCRIPT` reach the script as they are.
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", "printf '[%s]' \"$0\" \"$@\"", "zero", "one two", "it's"], "bridge": false}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(text_of(&events, "stdout"), "[zero][one two][it's]");
    let run = first;

    // The per-run workspace is gone once the lease is released (`failed`: its run failed).
    let lease = lease_of(&server, &run).await;
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "run_failed", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");
    assert!(!Path::new(&cwd).exists(), "per-run workspace left behind");
    server.stop().await;
}

#[tokio::test]
async fn secret_env_values_never_appear_in_any_command_line_and_nowhere_in_the_api() {
    let Lab {
        sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let secret = format!("sk-live-{}", uuid::Uuid::new_v4().simple());
    let run_id = start_run(
        &server,
        &company,
        json!({
            "environmentId": env,
            "command": ["sh", "-c", "echo started; sleep 3; test -n \"$API_KEY\" && echo has-key"],
            "env": {"API_KEY": secret},
        }),
    )
    .await;
    // While the command sleeps, read every process's command line on this machine: both hosts.
    wait_for_stdout(&server, &run_id, "started").await;
    let mut scanned = 0;
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            scanned += 1;
            assert!(
                !String::from_utf8_lossy(&cmdline).contains(&secret),
                "the secret is in the command line of pid {:?}: {}",
                entry.file_name(),
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            );
        }
    }
    assert!(scanned > 10);
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let events = all_events(&server, &run_id).await;
    assert!(text_of(&events, "stdout").contains("has-key"));

    // Not in the run, its events, its lease, the environment, or the logs.
    let lease = lease_of(&server, &run).await;
    let key_body = sshd.user_key.lines().nth(1).unwrap().to_owned();
    for (what, text) in [
        ("run", run.to_string()),
        ("events", Value::Array(events).to_string()),
        ("lease", lease.to_string()),
        (
            "environment",
            server
                .get(&format!("/api/environments/{env}"))
                .await
                .1
                .to_string(),
        ),
    ] {
        assert!(
            !text.contains(&secret),
            "the secret env value is in the {what}"
        );
        assert!(
            !text.contains(&key_body),
            "the private key is in the {what}"
        );
    }
    let logs = server.stop().await;
    assert!(
        !logs.contains(&secret) && !logs.contains(&key_body),
        "a secret reached the logs"
    );
}

#[tokio::test]
async fn a_timeout_kills_the_remote_process_tree_and_keeps_partial_output() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let marker = format!("berth-grandchild-{}", uuid::Uuid::new_v4().simple());
    let started = Instant::now();
    let watcher = {
        let marker = marker.clone();
        // While the run is live, the grandchild must be seen, or the check below proves nothing.
        tokio::spawn(async move {
            for _ in 0..200 {
                if pgrep(&marker) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        })
    };
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({
            "environmentId": env,
            // The grandchild (a shell whose command line names the marker) holds stdout open and sleeps.
            "command": ["sh", "-c", format!("sh -c 'sleep 300; true {marker}' & echo before; sleep 300")],
            "timeoutMs": 3000,
            "bridge": false,
        }),
    )
    .await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(text_of(&events, "stdout"), "before\n");
    assert!(watcher.await.unwrap(), "the grandchild never ran");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if !pgrep(&marker) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the remote grandchild survived the timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn cancel_kills_the_remote_command() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", "echo up; sleep 300"], "bridge": false}),
    )
    .await;
    wait_for_stdout(&server, &run_id, "up").await;
    let (status, _) = server
        .post(&format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let run = wait_run(&server, &run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    let lease = lease_of(&server, &run).await;
    assert_eq!(lease["status"], "released", "{lease}");
    server.stop().await;
}

/// A workspace of `count` files over a few directories, with modes and symlinks.
fn make_tree(root: &Path, count: usize) {
    for index in 0..count {
        let dir = root.join(format!("dir{}", index % 10));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(format!("file{index}.txt")),
            format!("content {index}\n"),
        )
        .unwrap();
    }
    fs::write(root.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("locked.txt"), "read only\n").unwrap();
    fs::set_permissions(root.join("locked.txt"), fs::Permissions::from_mode(0o444)).unwrap();
    symlink("dir1/file1.txt", root.join("link")).unwrap();
    symlink("/etc/hostname", root.join("escape")).unwrap();
}

#[tokio::test]
async fn a_thousand_files_round_trip_with_modes_and_symlinks() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let local = tempfile::tempdir().unwrap();
    make_tree(local.path(), 1000);

    let script = "test -x run.sh && test \"$(readlink link)\" = dir1/file1.txt && cat link && \
                  echo new > made.txt && mkdir -p out/deep && echo deep > out/deep/x && chmod 600 out/deep/x && \
                  ln -s made.txt made-link && rm dir2/file2.txt && echo changed > dir3/file3.txt && \
                  ls -R | grep -c txt";
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", script], "workspace": {"localPath": local.path()}, "bridge": false}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    let stdout = text_of(&events, "stdout");
    assert!(stdout.starts_with("content 1\n"), "{stdout}");
    let realized = &workspace_event(&events, "realized")["data"];
    assert_eq!(realized["filesSent"], 1004, "{realized}");

    let synced = &workspace_event(&events, "synced")["data"];
    assert_eq!(synced["conflicts"], json!([]), "{synced}");
    let root = local.path();
    assert_eq!(fs::read_to_string(root.join("made.txt")).unwrap(), "new\n");
    assert_eq!(
        fs::read_to_string(root.join("out/deep/x")).unwrap(),
        "deep\n"
    );
    assert_eq!(
        fs::metadata(root.join("out/deep/x"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        fs::read_link(root.join("made-link")).unwrap(),
        Path::new("made.txt")
    );
    assert!(!root.join("dir2/file2.txt").exists());
    assert_eq!(
        fs::read_to_string(root.join("dir3/file3.txt")).unwrap(),
        "changed\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("dir4/file4.txt")).unwrap(),
        "content 4\n"
    );
    assert_eq!(
        fs::metadata(root.join("locked.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o444
    );
    assert_eq!(
        fs::read_link(root.join("escape")).unwrap(),
        Path::new("/etc/hostname")
    );
    server.stop().await;
}

#[tokio::test]
async fn persistent_workspaces_sync_only_what_changed() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({"workspaceMode": "persistent"})).await;
    let local = tempfile::tempdir().unwrap();
    make_tree(local.path(), 200);
    let body = json!({
        "environmentId": env,
        "command": ["sh", "-c", "cat dir5/file5.txt; test -f build-output && echo kept-build-output; touch build-output"],
        "workspace": {"localPath": local.path()},
        "bridge": false,
    });

    let (run, events) = run_to_end(&server, &company, body.clone()).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let first = workspace_event(&events, "realized")["data"].clone();
    assert_eq!(first["filesSent"], 204, "{first}");
    assert_eq!(first["inPlace"], false, "{first}");

    // Change one file (a different size, so the quick check sees it even within the same second).
    fs::write(local.path().join("dir5/file5.txt"), "changed content\n").unwrap();
    let (run, events) = run_to_end(&server, &company, body).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let second = &workspace_event(&events, "realized")["data"];
    assert_eq!(second["cwd"], first["cwd"], "one directory per environment");
    // Only the changed file: `build-output` came back from the remote with its mtime, so the quick check knows the
    // remote already has it.
    assert_eq!(second["filesSent"], 1, "{second}");
    let stdout = text_of(&events, "stdout");
    assert!(
        stdout.starts_with("changed content\nkept-build-output\n"),
        "{stdout}"
    );
    let lease = lease_of(&server, &run).await;
    assert_eq!(lease["status"], "released");
    assert!(
        Path::new(first["cwd"].as_str().unwrap()).is_dir(),
        "persistent workspaces stay"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_file_changed_on_both_sides_is_a_reported_conflict_and_nothing_is_lost() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let local = tempfile::tempdir().unwrap();
    fs::write(local.path().join("shared.txt"), "original\n").unwrap();
    fs::write(local.path().join("only-remote.txt"), "original\n").unwrap();
    let run_id = start_run(
        &server,
        &company,
        json!({
            "environmentId": env,
            "command": ["sh", "-c", "echo ready; sleep 1.5; echo remote > shared.txt; echo remote > only-remote.txt"],
            "workspace": {"localPath": local.path()},
            "bridge": false,
        }),
    )
    .await;
    wait_for_stdout(&server, &run_id, "ready").await;
    // The host edits the same file while the run is live.
    fs::write(local.path().join("shared.txt"), "local edit\n").unwrap();
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let events = all_events(&server, &run_id).await;
    let synced = &workspace_event(&events, "synced")["data"];
    assert_eq!(synced["conflicts"], json!(["shared.txt"]), "{synced}");
    assert_eq!(
        fs::read_to_string(local.path().join("shared.txt")).unwrap(),
        "local edit\n",
        "the host's edit is kept"
    );
    assert_eq!(
        fs::read_to_string(local.path().join("shared.txt.berth-conflict")).unwrap(),
        "remote\n",
        "the remote's version is kept beside it"
    );
    assert_eq!(
        fs::read_to_string(local.path().join("only-remote.txt")).unwrap(),
        "remote\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_agent_on_the_remote_host_calls_back_through_the_forwarded_bridge() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let server_port = server.url.rsplit(':').next().unwrap().to_owned();
    let script = "echo \"url=$BERTH_API_URL\"; \
        curl -fsS -H \"Authorization: Bearer $BERTH_API_TOKEN\" \"$BERTH_API_URL/api/agent/run\"; echo; \
        curl -fsS -X POST -H \"Authorization: Bearer $BERTH_API_TOKEN\" -H 'Content-Type: application/json' \
             -d '{\"message\": \"hello from the remote\"}' \"$BERTH_API_URL/api/agent/events\"; echo";
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", script]}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    let stdout = text_of(&events, "stdout");
    let url = stdout.lines().next().unwrap().strip_prefix("url=").unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(
        !url.ends_with(&format!(":{server_port}")),
        "the agent must not get the server's own address"
    );
    let agent_view: Value = serde_json::from_str(stdout.lines().nth(1).unwrap()).unwrap();
    assert_eq!(agent_view["id"], run["id"]);
    assert!(events.iter().any(
        |event| event["type"] == "agent" && event["data"]["message"] == "hello from the remote"
    ));
    assert!(
        events
            .iter()
            .filter(|event| event["type"] == "bridge")
            .count()
            >= 2
    );
    server.stop().await;
}

/// Starts `count` runs at once that each sleep `sleep` seconds and print their index; checks every one succeeded
/// with its own output and gave its lease back.
async fn concurrent_runs(server: &TestServer, company: &str, env: &str, count: usize, sleep: f64) {
    let mut ids = Vec::new();
    for index in 0..count {
        ids.push(
            start_run(
                server,
                company,
                json!({"environmentId": env, "command": ["sh", "-c", format!("sleep {sleep}; echo run-{index}")], "bridge": false}),
            )
            .await,
        );
    }
    for (index, id) in ids.iter().enumerate() {
        let run = wait_run(server, id, Duration::from_secs(120)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let events = all_events(server, id).await;
        assert_eq!(text_of(&events, "stdout"), format!("run-{index}\n"));
        assert_eq!(lease_of(server, &run).await["status"], "released");
    }
}

#[tokio::test]
async fn fifty_concurrent_runs_share_one_host() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    concurrent_runs(&server, &company, &env, 50, 0.2).await;
    server.stop().await;
}

#[tokio::test]
async fn a_connection_killed_mid_run_fails_the_run_and_releases_its_lease() {
    let Lab {
        sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", "echo up; sleep 300"], "bridge": false}),
    )
    .await;
    wait_for_stdout(&server, &run_id, "up").await;
    // Kill the per-connection sshd processes (the privileged monitor and the user's network child, not the
    // command): the TCP connection drops.
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &format!("^sshd: {}", sshd.user)])
        .status()
        .unwrap();
    assert!(killed.success(), "no connection process to kill");
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap_or_default()
            .contains("lost the connection"),
        "{run}"
    );
    let lease = lease_of(&server, &run).await;
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "driver_failed", "{lease}");

    // The host is still there: the next run reconnects.
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({"environmentId": env, "command": ["echo", "again"], "bridge": false}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(text_of(&events, "stdout"), "again\n");
    server.stop().await;
}

#[tokio::test]
async fn a_killed_server_leaves_no_ssh_lease_workspace_or_process_after_the_next_start() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let marker = format!("berth-ssh-orphan-{}", uuid::Uuid::new_v4().simple());
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", format!("echo up; sh -c 'sleep 1000; true {marker}'")], "bridge": false}),
    )
    .await;
    wait_for_stdout(&server, &run_id, "up").await;
    assert!(pgrep(&marker), "the command is not running");
    let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
    let held = lease_of(&server, &run).await;
    assert_eq!(held["status"], "active");
    let workspace = held["metadata"]["workspacePath"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(Path::new(&workspace).is_dir());
    let data_dir = server.data_dir.clone();
    let keeper = server.kill_keeping_data().await;

    // The restarted server has no connection and no key in memory: it opens the environment's secret again.
    let restarted = TestServer::start_with(crate::support::server::ServerOptions {
        data_dir: Some(data_dir),
        ..Default::default()
    })
    .await;
    let released = lease_of(&restarted, &run).await;
    // Its run was failed as an orphan, so the lease is failed too, with the sweep's reason.
    assert_eq!(released["status"], "failed", "{released}");
    assert_eq!(released["failureReason"], "orphaned", "{released}");
    assert_eq!(
        released["cleanupStatus"],
        "success",
        "{released} {}",
        restarted.logs()
    );
    assert!(
        !Path::new(&workspace).exists(),
        "the orphan's workspace is left"
    );
    assert!(!pgrep(&marker), "the orphaned remote command still runs");
    restarted.stop().await;
    drop(keeper);
}

#[tokio::test]
async fn excluded_paths_are_neither_sent_nor_brought_back() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({"syncExclude": ["node_modules", "*.log"]})).await;
    let local = tempfile::tempdir().unwrap();
    fs::create_dir_all(local.path().join("web/node_modules/dep")).unwrap();
    fs::write(local.path().join("web/node_modules/dep/index.js"), "big").unwrap();
    fs::write(local.path().join("web/app.js"), "app").unwrap();
    fs::write(local.path().join("local.log"), "host log\n").unwrap();
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({
            "environmentId": env,
            "command": ["sh", "-c", "test ! -e web/node_modules && test ! -e local.log && cat web/app.js && echo remote > remote.log && mkdir node_modules && echo x > node_modules/built && echo out > out.txt"],
            "workspace": {"localPath": local.path()},
            "bridge": false,
        }),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    assert_eq!(workspace_event(&events, "realized")["data"]["filesSent"], 1);
    assert_eq!(
        fs::read_to_string(local.path().join("out.txt")).unwrap(),
        "out\n"
    );
    assert!(!local.path().join("remote.log").exists());
    assert!(!local.path().join("node_modules").exists());
    assert_eq!(
        fs::read_to_string(local.path().join("local.log")).unwrap(),
        "host log\n"
    );
    assert!(local.path().join("web/node_modules/dep/index.js").exists());
    server.stop().await;
}

#[tokio::test]
async fn password_authentication_runs_commands_and_a_wrong_password_is_refused() {
    let (sshd, user) = TestSshd::start_with_password_user();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let config = json!({
        "host": "127.0.0.1",
        "port": sshd.port,
        "username": user.name,
        "password": user.password,
        "knownHosts": sshd.known_hosts,
        "remoteWorkspacePath": user.workspace,
    });

    let mut wrong = config.clone();
    wrong["password"] = json!("not-the-password");
    let (_, probe) = server
        .post(
            &format!("/api/companies/{company}/environments/probe-config"),
            json!({"driver": "ssh", "config": wrong}),
        )
        .await;
    assert_eq!(probe["ok"], false, "{probe}");
    assert!(
        probe["summary"]
            .as_str()
            .unwrap()
            .contains("authentication refused"),
        "{probe}"
    );

    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "pw", "driver": "ssh", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    assert!(
        env["config"].get("password").is_none() && env["config"]["passwordSecretRef"].is_string()
    );
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({"environmentId": env["id"], "command": ["id", "-un"], "bridge": false}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    assert_eq!(text_of(&events, "stdout"), format!("{}\n", user.name));
    let logs = server.stop().await;
    assert!(
        !logs.contains(&user.password),
        "the password reached the logs"
    );
}

/// A fresh key pair of `kind` (`ssh-keygen -t`), optionally encrypted: (private PEM, public line).
fn key_pair(kind: &str, passphrase: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", passphrase, "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    (
        fs::read_to_string(&path).unwrap(),
        fs::read_to_string(path.with_extension("pub")).unwrap(),
    )
}

#[tokio::test]
async fn rsa_ecdsa_and_encrypted_keys_authenticate() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    for (kind, passphrase) in [("rsa", ""), ("ecdsa", ""), ("ed25519", "open sesame")] {
        let (private, public) = key_pair(kind, passphrase);
        sshd.authorize(&public);
        let mut extra = json!({"privateKey": private});
        if !passphrase.is_empty() {
            extra["password"] = json!(passphrase);
        }
        let env = ssh_env(&server, &company, &sshd, extra).await;
        let (run, events) = run_to_end(
            &server,
            &company,
            json!({"environmentId": env, "command": ["echo", kind], "bridge": false}),
        )
        .await;
        assert_eq!(run["status"], "succeeded", "{kind}: {run} {events:?}");
        assert_eq!(text_of(&events, "stdout"), format!("{kind}\n"));
    }
    server.stop().await;
}

#[tokio::test]
async fn a_kept_persistent_lease_is_resumed_by_the_next_run() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({"workspaceMode": "persistent"})).await;
    let body = json!({
        "environmentId": env,
        "command": ["sh", "-c", "cat counter 2>/dev/null || echo 0; echo 1 > counter"],
        "leasePolicy": "reuse_by_environment",
        "bridge": false,
    });
    let (first, events) = run_to_end(&server, &company, body.clone()).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(text_of(&events, "stdout"), "0\n");
    assert_eq!(lease_of(&server, &first).await["status"], "retained");

    let (second, events) = run_to_end(&server, &company, body).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(
        text_of(&events, "stdout"),
        "1\n",
        "the same directory, resumed"
    );
    let acquired = events
        .iter()
        .find(|event| event["type"] == "lease" && event["data"]["status"] == "active")
        .unwrap();
    assert_eq!(acquired["data"]["resumed"], true, "{acquired}");
    server.stop().await;
}

#[tokio::test]
async fn a_command_that_exits_with_a_child_holding_its_output_ends_promptly_and_the_child_dies() {
    let Lab {
        sshd: _sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let marker = format!("berth-leftover-{}", uuid::Uuid::new_v4().simple());
    let started = Instant::now();
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({
            "environmentId": env,
            "command": ["sh", "-c", format!("sh -c 'sleep 300; true {marker}' & echo parent-done")],
            "bridge": false,
        }),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["exitCode"], 0);
    assert_eq!(text_of(&events, "stdout"), "parent-done\n");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the held pipes hung the run"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pgrep(&marker) {
        assert!(Instant::now() < deadline, "the leftover child survived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_server_with_few_sessions_per_connection_still_serves_every_run() {
    // Below the pool's 8 sessions per connection: the pool learns the real limit from the refusals.
    let sshd = TestSshd::start_with_max_sessions(2);
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = ssh_env(&server, &company, &sshd, json!({})).await;
    concurrent_runs(&server, &company, &env, 12, 0.3).await;
    let logs = server.stop().await;
    assert!(
        logs.contains("the server refused a session"),
        "the limit was never hit"
    );
    // Refusals shrink a connection's share instead of throwing the connection away and reconnecting.
    let connections = sshd.logs().matches("Accepted publickey").count();
    assert!(
        connections <= 8,
        "{connections} connections for one target: the pool reconnected on refusals\n{logs}"
    );
}

#[tokio::test]
async fn a_run_on_a_dead_host_fails_fast_and_says_why() {
    let Lab {
        sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let port = sshd.port;
    drop(sshd);
    let started = Instant::now();
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({"environmentId": env, "command": ["true"], "bridge": false}),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(12));
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("cannot connect to") && error.contains(&format!(":{port}")),
        "{error}"
    );
    assert!(
        events.iter().any(
            |event| event["type"] == "error" && event["data"]["code"] == "lease_acquire_failed"
        )
    );
    let (_, leases) = server.get(&format!("/api/environments/{env}/leases")).await;
    assert!(
        leases
            .as_array()
            .unwrap()
            .iter()
            .all(|lease| lease["status"] != "active"),
        "{leases}"
    );
    server.stop().await;
}

#[tokio::test]
async fn what_a_chatty_login_shell_prints_never_reaches_the_output() {
    let sshd = TestSshd::start();
    let entry = std::process::Command::new("getent")
        .args(["passwd", &sshd.user])
        .output()
        .unwrap();
    let entry = String::from_utf8_lossy(&entry.stdout).trim().to_owned();
    let home = entry.split(':').nth(5).unwrap().to_owned();
    assert!(
        sshd.user.starts_with("berth") && home.starts_with("/tmp/"),
        "this test reshapes the throwaway user, which needs root: {entry}"
    );
    // bash reads ~/.bashrc for commands sshd starts; this one greets on stdout and stderr.
    fs::write(
        Path::new(&home).join(".bashrc"),
        "echo 'Welcome to the build box'\necho 'motd on stderr' >&2\n",
    )
    .unwrap();
    let status = std::process::Command::new("usermod")
        .args(["-s", "/bin/bash", &sshd.user])
        .status()
        .unwrap();
    assert!(status.success());

    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = ssh_env(&server, &company, &sshd, json!({})).await;
    let (run, events) = run_to_end(
        &server,
        &company,
        json!({"environmentId": env, "command": ["echo", "only this"], "bridge": false}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    assert_eq!(text_of(&events, "stdout"), "only this\n");
    server.stop().await;
}

/// The pids of the berth runners (the bootstrap's `sh` reading its job loop) of `user` on this machine.
fn runner_pids(user: &str) -> Vec<String> {
    let output = std::process::Command::new("pgrep")
        .args(["-u", user, "-f", "read -r berth_n"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn runs_reuse_the_connections_runner_and_a_runner_killed_on_the_host_is_replaced() {
    let Lab {
        sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let run = json!({"environmentId": env, "command": ["sh", "-c", "echo ran; cat", "x"], "stdin": "in\n", "bridge": false});
    let (first, events) = run_to_end(&server, &company, run.clone()).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(text_of(&events, "stdout"), "ran\nin\n");
    let sessions = || sshd.logs().matches("Starting session:").count();
    let before = sessions();
    for _ in 0..3 {
        let (next, events) = run_to_end(&server, &company, run.clone()).await;
        assert_eq!(next["status"], "succeeded", "{next}");
        assert_eq!(text_of(&events, "stdout"), "ran\nin\n");
    }
    // Workspace setup, the command and the cleanup of three runs: all on the runners already started.
    assert_eq!(
        sessions(),
        before,
        "runs opened sessions instead of using the runner"
    );

    let runners = runner_pids(&sshd.user);
    assert!(!runners.is_empty(), "no runner on the host");
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .args(&runners)
        .status()
        .unwrap();
    assert!(status.success());
    let (after, events) = run_to_end(&server, &company, run.clone()).await;
    assert_eq!(after["status"], "succeeded", "{after} {events:?}");
    assert_eq!(text_of(&events, "stdout"), "ran\nin\n");
    let replaced = runner_pids(&sshd.user);
    assert!(
        !replaced.is_empty() && replaced.iter().all(|pid| !runners.contains(pid)),
        "{runners:?} → {replaced:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_killed_server_leaves_no_remote_process_even_outside_the_workspace() {
    // Persistent: the workspace stays, and the command leaves it; only its recorded identity finds it.
    let Lab {
        sshd,
        server,
        company,
        env,
    } = lab(json!({"workspaceMode": "persistent"})).await;
    let marker = format!("berth-ssh-identity-{}", uuid::Uuid::new_v4().simple());
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", format!("cd /; echo up; sh -c 'sleep 1000; true {marker}' & sleep 1000")], "bridge": false}),
    )
    .await;
    wait_for_stdout(&server, &run_id, "up").await;
    assert!(pgrep(&marker), "the command is not running");
    let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
    let data_dir = server.data_dir.clone();
    let keeper = server.kill_keeping_data().await;
    // The server is gone, its connection too: the command runs on, unsupervised.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pgrep(&marker), "the command died with the connection");

    let restarted = TestServer::start_with(crate::support::server::ServerOptions {
        data_dir: Some(data_dir),
        ..Default::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pgrep(&marker) {
        assert!(
            Instant::now() < deadline,
            "the orphaned remote command still runs; lease {}; logs {}",
            lease_of(&restarted, &run).await,
            restarted.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = lease_of(&restarted, &run).await;
    assert_ne!(lease["status"], "active", "{lease}");
    assert!(
        sshd.workspace.join("envs").is_dir(),
        "the persistent workspace was removed"
    );
    restarted.stop().await;
    drop(keeper);
}

/// Whether `path` exists, waiting up to 10 s for it.
async fn appears(path: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(path).exists() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn a_process_that_leaves_the_commands_group_never_writes_into_a_later_job_and_its_runner_is_retired()
 {
    let Lab {
        sshd,
        server,
        company,
        env,
    } = lab(json!({})).await;
    let run = |script: String| json!({"environmentId": env, "command": ["sh", "-c", script], "bridge": false});
    let (warm, _) = run_to_end(&server, &company, run("echo warm".to_owned())).await;
    assert_eq!(warm["status"], "succeeded", "{warm}");
    let sessions = || sshd.logs().matches("Starting session:").count();
    let sessions_before = sessions();
    let runners_before = runner_pids(&sshd.user);
    assert!(!runners_before.is_empty(), "no runner on the host");

    // The straggler `setsid`s into a session of its own before the command exits (it says so through a file), so
    // the kill of the command's group cannot reach it (nor, out of the workspace, its removal); it keeps the command's stdout and stderr and writes a second
    // later, while the next run's command is running.
    let mark = format!("/tmp/berth-straggler-{}", uuid::Uuid::new_v4().simple());
    let straggler = format!(
        "setsid sh -c 'cd /; touch {mark}.up; sleep 1; touch {mark}.woke; echo leak; echo leak >&2' & \
         while [ ! -e {mark}.up ]; do sleep 0.01; done; echo first"
    );
    let (first, events) = run_to_end(&server, &company, run(straggler)).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(text_of(&events, "stdout"), "first\n");
    assert!(!text_of(&events, "stderr").contains("leak"));

    let (second, events) =
        run_to_end(&server, &company, run("sleep 1.5; echo second".to_owned())).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    assert!(
        appears(&format!("{mark}.woke")).await,
        "the straggler did not survive the group kill"
    );
    assert_eq!(text_of(&events, "stdout"), "second\n", "{events:?}");
    assert!(!text_of(&events, "stderr").contains("leak"), "{events:?}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (third, events) = run_to_end(&server, &company, run("echo third".to_owned())).await;
    assert_eq!(third["status"], "succeeded", "{third}");
    assert_eq!(text_of(&events, "stdout"), "third\n", "{events:?}");
    assert!(!text_of(&events, "stderr").contains("leak"), "{events:?}");

    // The straggler's runner was not reused: a new one started in a new session, and the old one is gone.
    assert!(
        sessions() > sessions_before,
        "no runner was started to replace the straggler's"
    );
    let runners_after = runner_pids(&sshd.user);
    assert!(
        runners_before
            .iter()
            .any(|pid| !runners_after.contains(pid)),
        "the straggler's runner still runs: {runners_before:?} → {runners_after:?}"
    );
    for suffix in [".up", ".woke"] {
        let _ = fs::remove_file(format!("{mark}{suffix}"));
    }
    server.stop().await;
}

/// What sits in the private directories (`berth-runner-<pid>-…`) of the runners of `user` alive on this host (the
/// sshd is local), each entry with whether it is a FIFO.
fn runner_dir_entries(user: &str) -> Vec<(String, bool)> {
    use std::os::unix::fs::FileTypeExt;
    let live = runner_pids(user);
    let mut entries = Vec::new();
    for dir in fs::read_dir("/tmp").unwrap().flatten() {
        let name = dir.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("berth-runner-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !live.iter().any(|live| live == pid) {
            continue;
        }
        for entry in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let is_fifo = entry.file_type().is_ok_and(|kind| kind.is_fifo());
            entries.push((entry.path().display().to_string(), is_fifo));
        }
    }
    entries
}

#[tokio::test]
async fn large_and_unread_stdin_goes_straight_to_the_command_and_never_disturbs_the_next_job() {
    use berth_core::config::DriverConfig;
    use berth_core::driver::{EnvironmentDriver, ExecRequest, WorkspaceRequest};
    use berth_core::environment::Driver;
    use berth_drivers::registry::ProviderRegistry;
    use berth_drivers::ssh::SshDriver;
    use berth_drivers::test_support::{Recorder, lease_request, never};

    let sshd = TestSshd::start();
    let driver = SshDriver::default();
    let config =
        DriverConfig::parse(Driver::Ssh, &sshd.config(), &ProviderRegistry::new()).unwrap();
    let request = lease_request();
    let lease = driver.acquire(&config, &request).await.unwrap();
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
    let command = |script: &str, stdin: Option<Vec<u8>>, timeout: u64| ExecRequest {
        argv: vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
        env: Default::default(),
        cwd: None,
        stdin,
        timeout: Some(Duration::from_secs(timeout)),
    };
    // Bytes that look like the framing and the markers: lengths, `0` lines, \x01.
    let big: Vec<u8> = (0..10_000_000u32)
        .map(|i| match i % 7 {
            0 => b'\n',
            1 => b'0',
            2 => 0x01,
            _ => (i.wrapping_mul(2_654_435_761) >> 24) as u8,
        })
        .collect();
    let next_job_is_intact = || async {
        let sink = Recorder::default();
        let outcome = driver
            .execute(
                &lease,
                &workspace,
                command("cat; echo next", Some(b"abc".to_vec()), 30),
                &sink,
                never(),
            )
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
        assert_eq!(sink.stdout(), "abcnext\n");
    };

    // 10 MB through `cat` and back, byte for byte, while the runner's private directory holds only its FIFOs.
    let sink = Recorder::default();
    let echoed = driver.execute(
        &lease,
        &workspace,
        command("sleep 0.5; cat", Some(big.clone()), 60),
        &sink,
        never(),
    );
    let watch = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        runner_dir_entries(&sshd.user)
    };
    let (outcome, entries) = tokio::join!(echoed, watch);
    let outcome = outcome.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    let echoed: Vec<u8> = sink
        .chunks
        .lock()
        .unwrap()
        .iter()
        .filter(|(stream, _, _)| *stream == berth_core::driver::OutputStream::Stdout)
        .flat_map(|(_, data, _)| data.clone())
        .collect();
    assert!(
        echoed == big,
        "stdin came back altered ({} bytes)",
        echoed.len()
    );
    assert!(!entries.is_empty(), "no runner directory seen");
    assert!(
        entries.iter().all(|(_, is_fifo)| *is_fifo),
        "a runner keeps files: {entries:?}"
    );
    next_job_is_intact().await;

    // A command that never reads its stdin: it ends as it would, and the next job's framing is intact.
    let sink = Recorder::default();
    let started = Instant::now();
    let outcome = driver
        .execute(
            &lease,
            &workspace,
            command("sleep 0.3; echo ignored", Some(big.clone()), 30),
            &sink,
            never(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    assert_eq!(sink.stdout(), "ignored\n");
    assert!(started.elapsed() < Duration::from_secs(10));
    next_job_is_intact().await;

    // One that never reads it and never ends: the timeout still fires while its stdin is held back.
    let sink = Recorder::default();
    let started = Instant::now();
    let outcome = driver
        .execute(
            &lease,
            &workspace,
            command("echo up; sleep 60", Some(big.clone()), 1),
            &sink,
            never(),
        )
        .await
        .unwrap();
    assert!(outcome.timed_out, "{outcome:?}");
    assert_eq!(sink.stdout(), "up\n");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the timeout waited for the stdin: {:?}",
        started.elapsed()
    );
    next_job_is_intact().await;
    driver.release(&lease, false, Some(&config)).await.unwrap();
}
