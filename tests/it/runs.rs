//! Runs end to end through the real binary: leases and their policies, workspaces, output, timeouts, cancel,
//! orphans after a real `kill -9`, expiry, and many runs at once — on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::db::TestDb;
use crate::support::runs::{
    all_events, create_env, lease, sandbox_dir, start_run, text_of, wait_run, wait_status,
};
use crate::support::server::{ServerOptions, TestServer};

fn assert_dense(events: &[Value]) {
    for (index, event) in events.iter().enumerate() {
        assert_eq!(
            event["seq"].as_i64().unwrap(),
            index as i64 + 1,
            "{events:?}"
        );
    }
}

async fn sandbox_env(server: &TestServer, company: &str, config: Value) -> String {
    create_env(server, company, "sandbox", config).await
}

#[tokio::test]
async fn a_local_run_streams_output_and_reports_the_exit_code() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exitCode"], 3);
    assert!(
        run["startedAt"].is_string() && run["finishedAt"].is_string() && run["leaseId"].is_string()
    );
    let events = all_events(&server, &run_id).await;
    assert_dense(&events);
    assert_eq!(text_of(&events, "stdout"), "out\n");
    assert_eq!(text_of(&events, "stderr"), "err\n");
    let kinds: Vec<&str> = events
        .iter()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"status"));
    assert!(
        kinds.contains(&"lease") && kinds.contains(&"workspace"),
        "{kinds:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last["type"].clone(), last["data"]["status"].clone()),
        (json!("status"), json!("failed"))
    );

    // The local lease of the failed run ended `failed` (docs/api.md, "Leases around a run"), its private workspace
    // removed all the same.
    let lease = lease(&server, run["leaseId"].as_str().unwrap()).await;
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "run_failed", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success");
    assert_eq!(lease["driver"], "local");
    assert_eq!(lease["runId"], run_id.as_str());

    // Lease acquisition and release are in the activity log, attributed to the run.
    let store = server.open_store().await;
    let activity = store.list_activity(company.parse().unwrap()).await.unwrap();
    let lease_actions: Vec<(&str, &str)> = activity
        .iter()
        .filter(|entry| entry.entity_id == lease["id"].as_str().unwrap())
        .map(|entry| (entry.action.as_str(), entry.actor.as_str()))
        .collect();
    let actor = format!("run:{run_id}");
    assert_eq!(
        lease_actions,
        [
            ("lease.acquired", actor.as_str()),
            ("lease.failed", actor.as_str())
        ]
    );
    store.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_command_environment_is_exactly_what_the_contract_allows() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![("SERVER_CANARY".into(), "must-not-leak".into())],
        ..Default::default()
    })
    .await;
    let company = server.default_company().await;
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["/usr/bin/env"], "env": {"GREETING": "hello world", "EMPTY": ""}}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let output = text_of(&all_events(&server, &run_id).await, "stdout");
    let mut names: Vec<&str> = output
        .lines()
        .map(|line| line.split('=').next().unwrap())
        .collect();
    names.sort();
    assert!(output.contains("GREETING=hello world\n"), "{output}");
    assert!(
        !output.contains("must-not-leak") && !output.contains("BERTH_LOG"),
        "{output}"
    );
    for name in &names {
        assert!(
            [
                "BERTH_API_TOKEN",
                "BERTH_API_URL",
                "BERTH_RUN_ID",
                "EMPTY",
                "GREETING",
                "HOME",
                "PATH"
            ]
            .contains(name),
            "unexpected variable {name}: {output}"
        );
    }
    assert!(output.contains(&format!("BERTH_RUN_ID={run_id}")));
    server.stop().await;
}

#[tokio::test]
async fn hostile_requests_are_422_and_start_nothing() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let path = format!("/api/companies/{company}/runs");
    let cases = [
        (json!({"command": ["true"], "env": {"A=B": "x"}}), "env.A=B"),
        (
            json!({"command": ["true"], "env": {"A\u{0}B": "x"}}),
            "env.A\\0B",
        ),
        (json!({"command": ["true"], "env": {"": "x"}}), "env."),
        (
            json!({"command": ["true"], "env": {"OK": "nul\u{0}value"}}),
            "env.OK",
        ),
        (
            json!({"command": ["true"], "env": {"BERTH_API_TOKEN": "forged"}}),
            "env.BERTH_API_TOKEN",
        ),
        (json!({"command": []}), "command"),
        (json!({"command": ["a\u{0}b"]}), "command.0"),
        (json!({"command": ["true"], "cwd": "../escape"}), "cwd"),
        (json!({"command": ["true"], "cwd": "/etc"}), "cwd"),
        (json!({"command": ["true"], "timeoutMs": 0}), "timeoutMs"),
        (
            json!({"command": ["true"], "workspace": {"localPath": "relative"}}),
            "workspace.localPath",
        ),
        (
            json!({"command": ["true"], "workspace": {"localPath": "/does/not/exist"}}),
            "workspace.localPath",
        ),
        (
            json!({"command": ["true"], "leasePolicy": "forever"}),
            "leasePolicy",
        ),
        (
            json!({"command": ["true"], "environmentId": uuid::Uuid::now_v7().to_string()}),
            "environmentId",
        ),
        (json!({"command": ["true"], "shell": true}), "shell"),
    ];
    for (body, expected) in cases {
        let (status, error) = server.post(&path, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {error}"
        );
        let paths: Vec<&str> = error["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&expected), "{body} -> {error}");
    }
    let (_, runs) = server.get(&path).await;
    assert_eq!(runs, json!([]));
    // A reader cannot start runs.
    let reader = server.create_key(&company, "reader").await;
    let (status, _) = server
        .call(
            Method::POST,
            &path,
            &reader,
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    server.stop().await;
}

#[tokio::test]
async fn a_timeout_kills_the_tree_even_when_a_grandchild_holds_the_pipes() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let started = Instant::now();
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "echo before; (sleep 1000; echo never) & sleep 1000"], "timeoutMs": 500}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let events = all_events(&server, &run_id).await;
    assert_eq!(
        text_of(&events, "stdout"),
        "before\n",
        "partial output is kept"
    );
    // Nothing of the tree survives.
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", "sleep 1000; echo never"])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "leftover processes: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );

    // A grandchild that outlives its parent does not hang a run that exits normally.
    let started = Instant::now();
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "(sleep 1000) & echo done"]}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        text_of(&all_events(&server, &run_id).await, "stdout"),
        "done\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_kills_the_command_and_releases_the_lease() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = sandbox_env(&server, &company, json!({"provider": "fake"})).await;
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", "echo started; sleep 1000"]}),
    )
    .await;
    wait_status(&server, &run_id, "running").await;
    let (status, _) = server
        .post(&format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let run = wait_run(&server, &run_id, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    let lease = lease(&server, run["leaseId"].as_str().unwrap()).await;
    assert_eq!(lease["status"], "released", "{lease}");
    assert!(!sandbox_dir(&lease).exists(), "the sandbox was removed");
    // Cancelling a finished run changes nothing.
    let (status, again) = server
        .post(&format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status, again["status"].clone()),
        (StatusCode::OK, json!("cancelled"))
    );
    server.stop().await;
}

#[tokio::test]
async fn workspaces_run_in_place_locally_and_round_trip_through_the_fake_sandbox() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let workspace = tempfile::tempdir().unwrap();
    std::fs::write(workspace.path().join("in.txt"), "input\n").unwrap();
    std::fs::write(workspace.path().join("gone.txt"), "delete me\n").unwrap();

    // Local: in place.
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "cat in.txt; echo local > local.txt"], "workspace": {"localPath": workspace.path()}}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        text_of(&all_events(&server, &run_id).await, "stdout"),
        "input\n"
    );
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("local.txt")).unwrap(),
        "local\n"
    );

    // Fake sandbox: copied in, changes copied back, deletions too.
    let env = sandbox_env(&server, &company, json!({"provider": "fake"})).await;
    let run_id = start_run(
        &server,
        &company,
        json!({
            "environmentId": env,
            "command": ["sh", "-c", "pwd; cat in.txt; echo sandboxed > out.txt; rm gone.txt; mkdir -p sub && echo deep > sub/f"],
            "workspace": {"localPath": workspace.path()}
        }),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let events = all_events(&server, &run_id).await;
    let stdout = text_of(&events, "stdout");
    assert!(
        !stdout.starts_with(workspace.path().to_str().unwrap()),
        "the sandbox runs elsewhere: {stdout}"
    );
    assert!(stdout.ends_with("input\n"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("out.txt")).unwrap(),
        "sandboxed\n"
    );
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("sub/f")).unwrap(),
        "deep\n"
    );
    assert!(!workspace.path().join("gone.txt").exists());
    assert!(
        events
            .iter()
            .any(|event| event["type"] == "workspace" && event["data"]["phase"] == "synced"),
        "{events:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn lease_policies_ephemeral_reuse_and_retain_on_failure() {
    let server = TestServer::start().await;
    let company = server.default_company().await;

    // Ephemeral: released and cleaned up.
    let ephemeral = sandbox_env(&server, &company, json!({"provider": "fake"})).await;
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": ephemeral, "command": ["true"]}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    let first = lease(&server, run["leaseId"].as_str().unwrap()).await;
    assert_eq!(
        (first["status"].clone(), first["leasePolicy"].clone()),
        (json!("released"), json!("ephemeral"))
    );
    assert_eq!(first["cleanupStatus"], "success");
    assert!(!sandbox_dir(&first).exists());

    // Reuse by environment: the second run resumes the first one's sandbox.
    let reusable = sandbox_env(
        &server,
        &company,
        json!({"provider": "fake", "reuseLease": true}),
    )
    .await;
    let first_run = start_run(
        &server,
        &company,
        json!({"environmentId": reusable, "command": ["sh", "-c", "echo kept > marker"]}),
    )
    .await;
    let first_run = wait_run(&server, &first_run, Duration::from_secs(30)).await;
    let kept = lease(&server, first_run["leaseId"].as_str().unwrap()).await;
    assert_eq!(
        (kept["status"].clone(), kept["leasePolicy"].clone()),
        (json!("retained"), json!("reuse_by_environment"))
    );
    assert!(sandbox_dir(&kept).exists());
    let second_run = start_run(
        &server,
        &company,
        json!({"environmentId": reusable, "command": ["cat", "marker"]}),
    )
    .await;
    let second_run = wait_run(&server, &second_run, Duration::from_secs(30)).await;
    assert_eq!(second_run["status"], "succeeded", "{second_run}");
    let events = all_events(&server, second_run["id"].as_str().unwrap()).await;
    let lease_event = events
        .iter()
        .find(|event| event["type"] == "lease")
        .unwrap();
    assert_eq!(lease_event["data"]["resumed"], true, "{lease_event}");
    let resumed = lease(&server, second_run["leaseId"].as_str().unwrap()).await;
    assert_eq!(resumed["providerLeaseId"], kept["providerLeaseId"]);
    assert_eq!(resumed["status"], "retained");
    assert_eq!(
        lease(&server, kept["id"].as_str().unwrap()).await["status"],
        "released",
        "handed over"
    );
    assert_eq!(resumed["metadata"]["resumedLease"], true);

    // Retain on failure: kept when the command fails, released when it succeeds.
    let env = sandbox_env(&server, &company, json!({"provider": "fake"})).await;
    let failing = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["false"], "leasePolicy": "retain_on_failure"}),
    )
    .await;
    let failing = wait_run(&server, &failing, Duration::from_secs(30)).await;
    let retained = lease(&server, failing["leaseId"].as_str().unwrap()).await;
    assert_eq!(retained["status"], "retained", "{retained}");
    assert!(sandbox_dir(&retained).exists(), "kept for inspection");
    let passing = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["true"], "leasePolicy": "retain_on_failure"}),
    )
    .await;
    let passing = wait_run(&server, &passing, Duration::from_secs(30)).await;
    assert_eq!(
        lease(&server, passing["leaseId"].as_str().unwrap()).await["status"],
        "released"
    );

    // Deleting the environment destroys what it kept.
    let (status, _) = server
        .delete(&format!("/api/environments/{reusable}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !sandbox_dir(&resumed).exists(),
        "deleting the environment cleaned up its kept sandbox"
    );
    server.stop().await;
}

#[tokio::test]
async fn release_dispatches_on_the_driver_captured_on_the_lease() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = sandbox_env(
        &server,
        &company,
        json!({"provider": "fake", "reuseLease": true}),
    )
    .await;
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["true"]}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    let kept = lease(&server, run["leaseId"].as_str().unwrap()).await;
    assert!(sandbox_dir(&kept).exists());
    // The environment becomes an SSH one; its kept sandbox lease still belongs to the sandbox driver.
    let (status, _) = server
        .patch(&format!("/api/environments/{env}"), json!({"driver": "ssh", "config": {"host": "h", "username": "u", "remoteWorkspacePath": "/w"}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.delete(&format!("/api/environments/{env}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !sandbox_dir(&kept).exists(),
        "the sandbox driver cleaned up, not the ssh one"
    );
    server.stop().await;
}

#[tokio::test]
async fn kept_leases_expire_and_are_destroyed() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![("BERTH_SWEEP_INTERVAL_MS".into(), "100".into())],
        ..Default::default()
    })
    .await;
    let company = server.default_company().await;
    let env = sandbox_env(
        &server,
        &company,
        json!({"provider": "fake", "reuseLease": true, "timeoutMs": 500}),
    )
    .await;
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["true"]}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    let lease_id = run["leaseId"].as_str().unwrap().to_owned();
    let kept = lease(&server, &lease_id).await;
    assert!(kept["expiresAt"].is_string(), "{kept}");
    let started = Instant::now();
    loop {
        let current = lease(&server, &lease_id).await;
        if current["status"] == "expired" && current["cleanupStatus"] == "success" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never expired: {current}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!sandbox_dir(&kept).exists());
    server.stop().await;
}

#[tokio::test]
async fn ten_megabytes_of_output_arrive_intact() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    // 10 MB of numbered lines: any lost, duplicated or reordered chunk shows.
    let script = "i=0; while [ $i -lt 147059 ]; do printf '%067d\\n' $i; i=$((i+1)); done";
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", script], "timeoutMs": 120000}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let stdout = text_of(&all_events(&server, &run_id).await, "stdout");
    assert_eq!(stdout.len(), 147_059 * 68);
    for (index, line) in stdout.lines().enumerate() {
        assert_eq!(line, format!("{index:067}"));
    }
    server.stop().await;
}

/// Deterministic multi-byte text (1- to 4-byte characters, newlines, NULs) of about `bytes` bytes.
pub(crate) fn multibyte_text(seed: usize, bytes: usize) -> String {
    const PIECES: [&str; 8] = ["a", "é", "€", "😀", "\n", "字", "\u{0}", "\"q\\"];
    let mut text = String::with_capacity(bytes + 4);
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    while text.len() < bytes {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        text.push_str(PIECES[(state >> 33) % PIECES.len()]);
    }
    text
}

/// Opens a run's SSE event stream (its headers are in; the body is not read yet).
async fn open_event_stream(server: &TestServer, run_id: &str) -> reqwest::Response {
    let stream = reqwest::Client::new()
        .get(format!("{}/api/runs/{run_id}/events", server.url))
        .bearer_auth(&server.admin_token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    stream
}

/// The events of an SSE body: the JSON of each `data:` line.
fn sse_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|block| block.lines().find_map(|line| line.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_of_multibyte_output_on_both_streams_replay_byte_exact() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    // 24 pieces of ~420 KB, alternating streams. Characters of up to 4 bytes straddle every pipe read (the driver
    // reads at most 256 KiB, `cat` writes 128 KiB at a time), and both pipes fill while the other is written.
    let pieces_dir = tempfile::tempdir().unwrap();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut script = String::new();
    for index in 0..24 {
        let piece = multibyte_text(index, 420_000 + index * 7);
        let path = pieces_dir.path().join(format!("piece-{index}"));
        std::fs::write(&path, &piece).unwrap();
        let to_stderr = index % 3 == 1;
        script.push_str(&format!(
            "cat '{}'{}\n",
            path.display(),
            if to_stderr { " >&2" } else { "" }
        ));
        if to_stderr { &mut stderr } else { &mut stdout }.push_str(&piece);
    }
    assert!(stdout.len() + stderr.len() > 10_000_000);
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", script], "timeoutMs": 120000}),
    )
    .await;
    // Followed live from the start, so the stream reads while the output is written.
    let stream = open_event_stream(&server, &run_id).await;
    let body = tokio::time::timeout(Duration::from_secs(120), stream.text())
        .await
        .expect("the stream ends after the final event")
        .unwrap();
    let followed = sse_events(&body);
    assert_eq!(
        followed.last().unwrap()["data"]["status"],
        "succeeded",
        "{:?}",
        followed.last()
    );

    let listed = all_events(&server, &run_id).await;
    assert_dense(&listed);
    assert_eq!(text_of(&listed, "stdout"), stdout, "stdout via JSON");
    assert_eq!(text_of(&listed, "stderr"), stderr, "stderr via JSON");
    assert_eq!(followed, listed, "SSE and JSON carry the same events");
    // Replayed after the run, from the middle.
    let middle = listed[listed.len() / 2]["seq"].as_i64().unwrap();
    let replay = reqwest::Client::new()
        .get(format!(
            "{}/api/runs/{run_id}/events?after={middle}",
            server.url
        ))
        .bearer_auth(&server.admin_token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sse_events(&replay), listed[listed.len() / 2 + 1..].to_vec());

    // The bytes went to the run's segment file beside the database, not into its rows.
    let segment = server.data_dir.join("berth.db-output").join(&run_id);
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        (stdout.len() + stderr.len()) as u64
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_follower_that_falls_behind_catches_up_from_the_store_missing_nothing() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![(
            "BERTH_LOG".to_owned(),
            "info,berth_server::runs::follow=debug".to_owned(),
        )],
        ..Default::default()
    })
    .await;
    let company = server.default_company().await;
    // ~32 MB of numbered lines in well over a hundred events: far more than the live channel holds for a follower
    // (64 events) plus what the sockets buffer, so a follower that reads nothing until the end must fall behind.
    let lines = 1_000_000;
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", format!("sleep 0.3; seq -f '%031.0f' 1 {lines}")], "timeoutMs": 120000}),
    )
    .await;
    // Subscribed while the run is live (the command is still asleep), then not read at all until the run is over.
    let stream = open_event_stream(&server, &run_id).await;
    let run = wait_run(&server, &run_id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let body = tokio::time::timeout(Duration::from_secs(120), stream.text())
        .await
        .expect("the stream ends after the final event")
        .unwrap();
    let followed = sse_events(&body);

    let listed = all_events(&server, &run_id).await;
    assert_dense(&listed);
    assert!(
        listed.len() > 100,
        "only {} events: the follower may not have lagged",
        listed.len()
    );
    assert_eq!(
        followed, listed,
        "every event once, in order, the final one last"
    );
    let stdout = text_of(&followed, "stdout");
    assert_eq!(stdout.len(), lines * 32);
    for (index, line) in stdout.lines().enumerate() {
        assert_eq!(line, format!("{:031}", index + 1));
    }
    assert!(
        server
            .logs()
            .contains("live follower reads the store to catch up"),
        "the follower never fell behind, so the fallback went untested"
    );
    server.stop().await;
}

async fn many_concurrent_runs(server: &TestServer, count: usize) {
    let company = server.default_company().await;
    let env = sandbox_env(server, &company, json!({"provider": "fake"})).await;
    let starts = (0..count).map(|index| {
        let company = company.clone();
        let env = env.clone();
        async move {
            let body = json!({"environmentId": env, "command": ["sh", "-c", format!("echo out-{index}; echo err-{index} >&2")]});
            (index, start_run(server, &company, body).await)
        }
    });
    let runs = futures::future::join_all(starts).await;
    for (index, run_id) in runs {
        let run = wait_run(server, &run_id, Duration::from_secs(180)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let events = all_events(server, &run_id).await;
        assert_dense(&events);
        assert_eq!(text_of(&events, "stdout"), format!("out-{index}\n"));
        assert_eq!(text_of(&events, "stderr"), format!("err-{index}\n"));
        assert_eq!(events.last().unwrap()["data"]["status"], "succeeded");
        assert_eq!(
            events
                .iter()
                .filter(|event| event["type"] == "lease")
                .count(),
            2,
            "acquired and released"
        );
    }
    let (_, leases) = server
        .get(&format!("/api/environments/{env}/leases?status=active"))
        .await;
    assert_eq!(leases, json!([]), "no lease left active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_runs_on_sqlite() {
    let server = TestServer::start().await;
    many_concurrent_runs(&server, 200).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_runs_on_postgres() {
    let db = TestDb::postgres().await;
    let server = TestServer::start_with(ServerOptions {
        database_url: Some(db.url()),
        ..Default::default()
    })
    .await;
    many_concurrent_runs(&server, 200).await;
    server.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn the_event_stream_replays_and_follows_to_the_final_event() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "for i in 1 2 3; do echo tick-$i; sleep 0.2; done"]}),
    )
    .await;
    let response = reqwest::Client::new()
        .get(format!("{}/api/runs/{run_id}/events?after=1", server.url))
        .bearer_auth(&server.admin_token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // The stream ends by itself after the final event.
    let body = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("stream ended")
        .unwrap();
    let events: Vec<Value> = body
        .split("\n\n")
        .filter_map(|block| block.lines().find_map(|line| line.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert_eq!(
        events.first().unwrap()["seq"],
        2,
        "replay starts after `after`"
    );
    assert_dense(
        &std::iter::once(json!({"seq": 1}))
            .chain(events.iter().cloned())
            .collect::<Vec<_>>(),
    );
    assert_eq!(text_of(&events, "stdout"), "tick-1\ntick-2\ntick-3\n");
    assert_eq!(events.last().unwrap()["data"]["status"], "succeeded");
    server.stop().await;
}

#[tokio::test]
async fn a_killed_server_leaves_no_active_lease_after_the_next_start() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = sandbox_env(&server, &company, json!({"provider": "fake"})).await;
    let marker = format!("berth-orphan-{}", uuid::Uuid::new_v4().simple());
    let run_id = start_run(&server, &company, json!({"environmentId": env, "command": ["sh", "-c", format!("sleep 1000; echo {marker}")]})).await;
    wait_status(&server, &run_id, "running").await;
    let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
    let held = lease(&server, run["leaseId"].as_str().unwrap()).await;
    assert_eq!(held["status"], "active");
    let data_dir = server.data_dir.clone();
    let keeper = server.kill_keeping_data().await;

    let restarted = TestServer::start_with(ServerOptions {
        data_dir: Some(data_dir),
        ..Default::default()
    })
    .await;
    // Right after the start: the run is failed, its lease released with provider cleanup, its processes gone.
    let (_, run) = restarted.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["status"], "failed", "{run}");
    let released = lease(&restarted, held["id"].as_str().unwrap()).await;
    // Its run was failed as an orphan, so the lease is failed too, with the sweep's reason.
    assert_eq!(released["status"], "failed", "{released}");
    assert_eq!(released["failureReason"], "orphaned", "{released}");
    assert_eq!(released["cleanupStatus"], "success");
    assert!(!sandbox_dir(&released).exists());
    let events = all_events(&restarted, &run_id).await;
    assert_eq!(events.last().unwrap()["data"]["status"], "failed");
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "the orphaned command is still running"
    );
    restarted.stop().await;
    drop(keeper);
}

#[tokio::test]
async fn sigterm_cancels_live_runs_and_releases_their_leases() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = sandbox_env(&server, &company, json!({"provider": "fake"})).await;
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sleep", "1000"]}),
    )
    .await;
    wait_status(&server, &run_id, "running").await;
    let data_dir = server.data_dir.clone();
    let store_url = format!("sqlite://{}", data_dir.join("berth.db").display());
    let keeper = server.stop_keeping_data().await;
    let store = berth_store::Store::connect(&store_url).await.unwrap();
    let run = store
        .get_run(run_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status.as_str(), "cancelled");
    let lease = store
        .get_lease(run.lease_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.status.as_str(), "released");
    store.close().await;
    drop(keeper);
}

#[tokio::test]
async fn runs_list_newest_first_and_filter_by_status() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let ok = start_run(&server, &company, json!({"command": ["true"]})).await;
    wait_run(&server, &ok, Duration::from_secs(30)).await;
    let bad = start_run(&server, &company, json!({"command": ["false"]})).await;
    wait_run(&server, &bad, Duration::from_secs(30)).await;
    let (_, runs) = server.get(&format!("/api/companies/{company}/runs")).await;
    let ids: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [bad.as_str(), ok.as_str()]);
    let (_, failed) = server
        .get(&format!("/api/companies/{company}/runs?status=failed"))
        .await;
    assert_eq!(failed.as_array().unwrap().len(), 1);
    let (status, _) = server
        .get(&format!("/api/companies/{company}/runs?status=bogus"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = server
        .get(&format!("/api/runs/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_runs_of_a_reusing_environment_never_share_a_sandbox() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = sandbox_env(
        &server,
        &company,
        json!({"provider": "fake", "reuseLease": true}),
    )
    .await;
    let holder = start_run(&server, &company, json!({"environmentId": env, "command": ["sh", "-c", "echo mine > owner; sleep 1; cat owner"]})).await;
    wait_status(&server, &holder, "running").await;
    let other = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", "echo theirs > owner; cat owner"]}),
    )
    .await;
    let other = wait_run(&server, &other, Duration::from_secs(30)).await;
    let holder_run = wait_run(&server, &holder, Duration::from_secs(30)).await;
    assert_eq!(
        text_of(&all_events(&server, &holder).await, "stdout"),
        "mine\n",
        "the second run wrote into the first one's sandbox"
    );
    let shared = lease(&server, holder_run["leaseId"].as_str().unwrap()).await;
    let own = lease(&server, other["leaseId"].as_str().unwrap()).await;
    assert_ne!(shared["providerLeaseId"], own["providerLeaseId"]);
    assert_eq!(own["leasePolicy"], "ephemeral");
    assert_eq!(own["status"], "released");
    assert_eq!(shared["status"], "retained");
    server.stop().await;
}

#[tokio::test]
async fn control_characters_in_cwd_are_422_and_not_echoed() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let path = format!("/api/companies/{company}/runs");
    for cwd in ["sub\u{0}dir", "sub\ndir", "sub\u{1b}[2Jdir", "sub\tdir"] {
        let (status, error) = server
            .post(&path, json!({"command": ["true"], "cwd": cwd}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
        let details = error["error"]["details"].as_array().unwrap();
        assert_eq!(details.len(), 1, "{error}");
        assert_eq!(details[0]["path"], "cwd", "{error}");
        assert_eq!(
            details[0]["message"], "must not contain control characters",
            "{error}"
        );
        let escaped = json!(cwd).to_string();
        assert!(
            !error.to_string().contains(escaped.trim_matches('"')),
            "{error}"
        );
    }
    let (_, runs) = server.get(&path).await;
    assert_eq!(runs, json!([]));
    server.stop().await;
}
