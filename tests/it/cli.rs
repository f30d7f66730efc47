//! The `berth` client subcommands, and the README's quickstart, against a real server.

use std::process::{Output, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::support::server::{ServerOptions, TestServer, berth_bin};

/// Runs `berth ARGS` against `server` with a clean environment; the token comes from the data dir unless given.
async fn berth(server: &TestServer, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    berth_command(server, args, extra_env)
        .output()
        .await
        .expect("run berth")
}

/// Like [`berth`], with `input` piped into its stdin.
async fn berth_with_stdin(server: &TestServer, args: &[&str], input: Vec<u8>) -> Output {
    let mut command = berth_command(server, args, &[]);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn berth");
    let mut stdin = child.stdin.take().expect("stdin");
    // Written beside the wait: berth may refuse the input and exit before reading all of it (a broken pipe here).
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let output = child.wait_with_output().await.expect("run berth");
    writer.await.unwrap();
    output
}

fn berth_command(
    server: &TestServer,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(berth_bin());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &server.data_dir)
        .env("BERTH_URL", &server.url)
        .env("BERTH_DATA_DIR", &server.data_dir);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    command
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json_out(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", stdout(output)))
}

#[tokio::test]
async fn env_subcommands_create_list_get_probe_and_remove() {
    let server = TestServer::start().await;
    let created = berth(
        &server,
        &[
            "env",
            "create",
            "--name",
            "fake box",
            "--driver",
            "sandbox",
            "--config",
            r#"{"provider":"fake"}"#,
        ],
        &[],
    )
    .await;
    assert!(created.status.success(), "{}", stderr(&created));
    let id = stdout(&created).trim().to_owned();
    assert_eq!(id.len(), 36, "{id}");

    let list = berth(&server, &["env", "list"], &[]).await;
    assert!(
        stdout(&list).contains("fake box") && stdout(&list).contains("Local"),
        "{}",
        stdout(&list)
    );
    let listed = json_out(&berth(&server, &["env", "list", "--json"], &[]).await);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let fetched = json_out(&berth(&server, &["env", "get", &id, "--json"], &[]).await);
    assert_eq!(fetched["config"]["image"], "fake:latest");
    let shown = berth(&server, &["env", "get", &id], &[]).await;
    assert!(
        stdout(&shown)
            .lines()
            .any(|line| line.starts_with("name") && line.ends_with("fake box")),
        "{}",
        stdout(&shown)
    );

    let updated = json_out(
        &berth(
            &server,
            &[
                "env",
                "update",
                &id,
                "--name",
                "renamed box",
                "--description",
                "for the CLI test",
                "--config",
                r#"{"image":"fake:2"}"#,
                "--json",
            ],
            &[],
        )
        .await,
    );
    assert_eq!(updated["name"], "renamed box");
    assert_eq!(updated["description"], "for the CLI test");
    // The same driver: the config is merged over the stored one.
    assert_eq!(updated["config"]["provider"], "fake");
    assert_eq!(updated["config"]["image"], "fake:2");
    let cleared = json_out(
        &berth(
            &server,
            &["env", "update", &id, "--description", "", "--json"],
            &[],
        )
        .await,
    );
    assert_eq!(cleared["description"], Value::Null);
    let nothing = berth(&server, &["env", "update", &id], &[]).await;
    assert_eq!(nothing.status.code(), Some(1));
    assert!(
        stderr(&nothing).contains("nothing to change"),
        "{}",
        stderr(&nothing)
    );
    let invalid = berth(
        &server,
        &["env", "update", &id, "--status", "sleeping"],
        &[],
    )
    .await;
    assert_eq!(invalid.status.code(), Some(1));
    assert!(stderr(&invalid).contains("status"), "{}", stderr(&invalid));

    let probe = berth(&server, &["env", "probe", &id], &[]).await;
    assert!(probe.status.success());
    assert!(stdout(&probe).starts_with("ok: "), "{}", stdout(&probe));

    let removed = berth(&server, &["env", "rm", &id, "--json"], &[]).await;
    assert_eq!(json_out(&removed)["id"], id.as_str());
    let gone = berth(&server, &["env", "get", &id], &[]).await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(stderr(&gone).contains("not found"), "{}", stderr(&gone));
    server.stop().await;
}

#[tokio::test]
async fn config_from_a_file_and_clear_errors() {
    let server = TestServer::start().await;
    let file = server.data_dir.join("ssh.json");
    std::fs::write(
        &file,
        r#"{"host": "h", "username": "u", "remoteWorkspacePath": "relative", "port": 0}"#,
    )
    .unwrap();
    let rejected = berth(
        &server,
        &[
            "env",
            "create",
            "--name",
            "x",
            "--driver",
            "ssh",
            "--config",
            &format!("@{}", file.display()),
        ],
        &[],
    )
    .await;
    assert_eq!(rejected.status.code(), Some(1));
    let message = stderr(&rejected);
    assert!(
        message.contains("config.remoteWorkspacePath") && message.contains("config.port"),
        "{message}"
    );

    let bad_json = berth(
        &server,
        &[
            "env", "create", "--name", "x", "--driver", "ssh", "--config", "{nope",
        ],
        &[],
    )
    .await;
    assert_eq!(bad_json.status.code(), Some(1));
    assert!(
        stderr(&bad_json).contains("not valid JSON"),
        "{}",
        stderr(&bad_json)
    );

    // A probe that fails exits 1 with the summary.
    let ssh = berth(
        &server,
        &[
            "env",
            "create",
            "--name",
            "s",
            "--driver",
            "ssh",
            "--config",
            r#"{"host":"h","username":"u","remoteWorkspacePath":"/w"}"#,
        ],
        &[],
    )
    .await;
    let id = stdout(&ssh).trim().to_owned();
    let probe = berth(&server, &["env", "probe", &id], &[]).await;
    assert_eq!(probe.status.code(), Some(1));
    assert!(stdout(&probe).starts_with("failed: "), "{}", stdout(&probe));

    let path_trick = berth(&server, &["env", "get", "../companies"], &[]).await;
    assert_eq!(path_trick.status.code(), Some(1));
    server.stop().await;
}

#[tokio::test]
async fn keys_from_the_environment_act_for_their_own_company() {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--local-environments".into(), "all".into()],
        ..Default::default()
    })
    .await;
    let acme = server.create_company("acme").await;
    let manager = server.create_key(&acme, "manager").await;
    let created = berth(
        &server,
        &[
            "env",
            "create",
            "--name",
            "acme box",
            "--driver",
            "sandbox",
            "--config",
            r#"{"provider":"fake"}"#,
        ],
        &[("BERTH_TOKEN", &manager)],
    )
    .await;
    assert!(created.status.success(), "{}", stderr(&created));
    let (status, list) = server
        .get(&format!("/api/companies/{acme}/environments"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|env| env["name"] == "acme box")
    );

    // The admin picks a company by name.
    let by_name = json_out(
        &berth(
            &server,
            &["env", "list", "--json", "--company", "acme"],
            &[],
        )
        .await,
    );
    assert_eq!(by_name.as_array().unwrap().len(), 2);
    let unknown = berth(&server, &["env", "list", "--company", "nobody"], &[]).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("no company named `nobody`"));
    let forged = berth(&server, &["env", "list"], &[("BERTH_TOKEN", "forged")]).await;
    assert_eq!(forged.status.code(), Some(1));
    assert!(stderr(&forged).contains("401"), "{}", stderr(&forged));
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_named() {
    let server = TestServer::start().await;
    // Nothing listens on the discard port; each part of the error chain is said once (it used to come twice).
    for (args, code) in [(&["env", "list"][..], 1), (&["run", "--", "true"][..], 125)] {
        let output = berth(&server, args, &[("BERTH_URL", "http://127.0.0.1:9")]).await;
        assert_eq!(output.status.code(), Some(code), "{args:?}");
        let message = stderr(&output);
        assert_eq!(message.lines().count(), 1, "{message}");
        for part in [
            "cannot reach berth at http://127.0.0.1:9",
            "is `berth serve` running?",
            "error sending request",
            "Connection refused",
        ] {
            assert_eq!(message.matches(part).count(), 1, "{part}: {message}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn berth_run_sends_piped_stdin() {
    let server = TestServer::start().await;
    let echoed = berth_with_stdin(
        &server,
        &["run", "--", "cat"],
        b"one\ntwo \"quoted\"\n".to_vec(),
    )
    .await;
    assert_eq!(echoed.status.code(), Some(0), "{}", stderr(&echoed));
    assert_eq!(stdout(&echoed), "one\ntwo \"quoted\"\n");
    let ignored = berth_with_stdin(
        &server,
        &["run", "--no-stdin", "--", "cat"],
        b"unread".to_vec(),
    )
    .await;
    assert_eq!(ignored.status.code(), Some(0), "{}", stderr(&ignored));
    assert_eq!(stdout(&ignored), "");

    // Exactly the limit is read but cannot fit in a request with the rest of the body; one byte more is refused
    // while reading; input that JSON escaping doubles past the limit is refused too. None of them starts a run.
    let limit = 1024 * 1024;
    for (input, says) in [
        (
            vec![b'a'; limit + 1],
            "stdin is larger than 1 MiB (1048576 bytes)",
        ),
        (vec![b'a'; limit], "over the API's limit of 1 MiB"),
        (vec![b'"'; limit / 2 + 16], "with stdin is"),
    ] {
        let refused = berth_with_stdin(&server, &["run", "--", "cat"], input).await;
        assert_eq!(refused.status.code(), Some(125), "{}", stderr(&refused));
        assert!(stderr(&refused).contains(says), "{}", stderr(&refused));
        assert_eq!(stdout(&refused), "");
    }
    let not_text = berth_with_stdin(&server, &["run", "--", "cat"], vec![0xff, 0xfe]).await;
    assert_eq!(not_text.status.code(), Some(125));
    assert!(
        stderr(&not_text).contains("not UTF-8"),
        "{}",
        stderr(&not_text)
    );

    let company = server.default_company().await;
    let (_, runs) = server.get(&format!("/api/companies/{company}/runs")).await;
    assert_eq!(runs.as_array().unwrap().len(), 2, "{runs}");
    server.stop().await;
}

#[tokio::test]
async fn berth_run_says_when_it_lost_a_started_run() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let cli = berth_command(&server, &["run", "--", "sleep", "30"], &[])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let run_id = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (_, runs) = server.get(&format!("/api/companies/{company}/runs")).await;
            if let Some(run) = runs
                .as_array()
                .unwrap()
                .iter()
                .find(|run| run["status"] == "running")
            {
                return run["id"].as_str().unwrap().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the run did not start");
    drop(server.kill_keeping_data().await);

    let output = tokio::time::timeout(Duration::from_secs(30), cli.wait_with_output())
        .await
        .expect("berth run did not give up on the lost run")
        .unwrap();
    assert_eq!(output.status.code(), Some(255), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains(&format!("berth: lost run {run_id} after it started"))
            && message.contains("cannot reach berth"),
        "{message}"
    );
}

#[tokio::test]
async fn the_readme_quickstart_works() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- quickstart -->")
        .expect("quickstart marker");
    let end = readme
        .find("<!-- /quickstart -->")
        .expect("quickstart end marker");
    let block = &readme[start..end];
    let script: String = block
        .split("```bash")
        .skip(1)
        .map(|fenced| fenced.split("```").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        script.contains("berth env create") && script.contains("curl"),
        "{script}"
    );

    let server = TestServer::start().await;
    let bin_dir = berth_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env_clear()
        .env("PATH", path)
        .env("HOME", &server.data_dir)
        .env("BERTH_URL", &server.url)
        .env("BERTH_DATA_DIR", &server.data_dir)
        .output()
        .await
        .unwrap();
    // The quickstart's lab sshd must not outlive the test, whichever line failed.
    let _ = tokio::process::Command::new(berth_bin())
        .args(["lab", "ssh", "down"])
        .env("BERTH_DATA_DIR", &server.data_dir)
        .output()
        .await;
    assert!(
        output.status.success(),
        "quickstart failed\nstdout: {}\nstderr: {}",
        stdout(&output),
        stderr(&output)
    );
    let company = server.default_company().await;
    let (_, list) = server
        .get(&format!("/api/companies/{company}/environments"))
        .await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|env| env["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"build-box"), "{names:?}");
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .filter(|env| env["driver"] == json!("local"))
            .count(),
        1
    );
    // Each of its runs did what it says: here, in the sandbox, and over ssh (synced back).
    let printed = stdout(&output);
    for line in ["print me\nmade-in-sandbox", "hi over ssh"] {
        assert!(printed.contains(line), "{printed}");
    }
    assert!(!names.contains(&"ssh-lab"), "{names:?}");
    server.stop().await;
}

#[tokio::test]
async fn berth_run_streams_output_and_exits_with_the_command_code() {
    let server = TestServer::start().await;
    let output = berth(
        &server,
        &[
            "run",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 7",
        ],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(7), "{}", stderr(&output));
    assert_eq!(stdout(&output), "to-out\n");
    assert!(stderr(&output).contains("to-err\n"), "{}", stderr(&output));

    let workspace = tempfile::tempdir().unwrap();
    let ok = berth(
        &server,
        &[
            "run",
            "--workspace",
            workspace.path().to_str().unwrap(),
            "-e",
            "WHO=berth",
            "--",
            "sh",
            "-c",
            "echo hi $WHO > greeting; cat greeting",
        ],
        &[],
    )
    .await;
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert_eq!(stdout(&ok), "hi berth\n");
    assert!(workspace.path().join("greeting").exists());

    let timed_out = berth(
        &server,
        &["run", "--timeout", "0.3", "--", "sleep", "100"],
        &[],
    )
    .await;
    assert_eq!(timed_out.status.code(), Some(124), "{}", stderr(&timed_out));
    assert!(
        stderr(&timed_out).contains("berth: the command timed out after 300 ms\n"),
        "{}",
        stderr(&timed_out)
    );

    let missing = berth(
        &server,
        &[
            "run",
            "--env",
            &uuid::Uuid::now_v7().to_string(),
            "--",
            "true",
        ],
        &[],
    )
    .await;
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        stderr(&missing).contains("environmentId"),
        "{}",
        stderr(&missing)
    );
    let no_program = berth(&server, &["run", "--", "/nonexistent/program"], &[]).await;
    assert_eq!(
        no_program.status.code(),
        Some(125),
        "{}",
        stderr(&no_program)
    );

    // The sandbox too.
    let created = berth(
        &server,
        &[
            "env",
            "create",
            "--name",
            "sb",
            "--driver",
            "sandbox",
            "--config",
            r#"{"provider":"fake"}"#,
        ],
        &[],
    )
    .await;
    let env_id = stdout(&created).trim().to_owned();
    let sandboxed = berth(
        &server,
        &[
            "run",
            "--env",
            &env_id,
            "--json",
            "--",
            "echo",
            "from the sandbox",
        ],
        &[],
    )
    .await;
    assert_eq!(sandboxed.status.code(), Some(0), "{}", stderr(&sandboxed));
    let events: Vec<Value> = stdout(&sandboxed)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(events.iter().any(|event| event["type"] == "stdout" && event["data"]["text"] == "from the sandbox\n"));
    let leases =
        json_out(&berth(&server, &["lease", "list", "--env", &env_id, "--json"], &[]).await);
    assert_eq!(leases.as_array().unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn runs_subcommands_list_show_print_follow_and_cancel() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let finished = crate::support::runs::start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "echo first; echo oops >&2; echo second; exit 3"]}),
    )
    .await;
    crate::support::runs::wait_run(&server, &finished, Duration::from_secs(30)).await;

    let listed = json_out(&berth(&server, &["runs", "list", "--json"], &[]).await);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|run| run["id"] == finished.as_str())
    );
    let failed = json_out(
        &berth(
            &server,
            &["runs", "list", "--status", "failed", "--json"],
            &[],
        )
        .await,
    );
    assert_eq!(failed.as_array().unwrap().len(), 1, "{failed}");
    let table = berth(&server, &["runs", "list"], &[]).await;
    let row = stdout(&table)
        .lines()
        .find(|line| line.starts_with(&finished))
        .map(str::to_owned);
    assert!(
        row.as_deref()
            .is_some_and(|row| row.contains("failed") && row.contains(" 3 ")),
        "{}",
        stdout(&table)
    );

    let run = json_out(&berth(&server, &["runs", "get", &finished, "--json"], &[]).await);
    assert_eq!(run["exitCode"], 3);
    let shown = berth(&server, &["runs", "get", &finished], &[]).await;
    assert!(
        stdout(&shown)
            .lines()
            .any(|line| line.starts_with("status") && line.ends_with("failed"))
    );

    let logs = berth(&server, &["runs", "logs", &finished], &[]).await;
    assert!(logs.status.success(), "{}", stderr(&logs));
    assert_eq!(stdout(&logs), "first\nsecond\n");
    assert!(stderr(&logs).contains("oops\n"), "{}", stderr(&logs));
    let lines = berth(&server, &["runs", "logs", &finished, "--json"], &[]).await;
    let events: Vec<Value> = stdout(&lines)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let seqs: Vec<i64> = events
        .iter()
        .map(|event| event["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "dense, in order"
    );
    // Following a finished run replays it and exits with its code.
    let followed = berth(&server, &["runs", "logs", "-f", &finished], &[]).await;
    assert_eq!(followed.status.code(), Some(3), "{}", stderr(&followed));
    assert_eq!(stdout(&followed), "first\nsecond\n");

    // Following a live run shows output as it comes; cancelling it through the CLI ends the follow.
    let live = crate::support::runs::start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "echo started; sleep 100"]}),
    )
    .await;
    crate::support::runs::wait_status(&server, &live, "running").await;
    let mut follower = berth_command(&server, &["runs", "logs", "--follow", &live], &[]);
    let follower = follower
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cancelled = berth(&server, &["runs", "cancel", &live], &[]).await;
    assert!(cancelled.status.success(), "{}", stderr(&cancelled));
    assert!(
        stdout(&cancelled).starts_with(&live),
        "{}",
        stdout(&cancelled)
    );
    let followed = tokio::time::timeout(Duration::from_secs(20), follower.wait_with_output())
        .await
        .expect("the follow ends with the run")
        .unwrap();
    assert_eq!(followed.status.code(), Some(130), "{}", stderr(&followed));
    assert_eq!(stdout(&followed), "started\n");
    let run = json_out(&berth(&server, &["runs", "get", &live, "--json"], &[]).await);
    assert_eq!(run["status"], "cancelled");

    let leases = json_out(
        &berth(
            &server,
            &[
                "lease",
                "list",
                "--env",
                run["environmentId"].as_str().unwrap(),
                "--json",
            ],
            &[],
        )
        .await,
    );
    let lease_id = leases[0]["id"].as_str().unwrap().to_owned();
    let lease = json_out(&berth(&server, &["lease", "get", &lease_id, "--json"], &[]).await);
    assert_eq!(lease["id"], lease_id.as_str());
    let shown = berth(&server, &["lease", "get", &lease_id], &[]).await;
    assert!(
        stdout(&shown)
            .lines()
            .any(|line| line.starts_with("leasePolicy")),
        "{}",
        stdout(&shown)
    );
    let hostile = berth(&server, &["runs", "get", "../environments"], &[]).await;
    assert_eq!(hostile.status.code(), Some(1));
    assert!(
        stderr(&hostile).contains("not a valid id"),
        "{}",
        stderr(&hostile)
    );
    server.stop().await;
}

#[tokio::test]
async fn company_and_key_subcommands_manage_tenants() {
    let server = TestServer::start().await;
    let created = berth(&server, &["company", "create", "--name", "acme"], &[]).await;
    assert!(created.status.success(), "{}", stderr(&created));
    let acme = stdout(&created).trim().to_owned();
    let companies = json_out(&berth(&server, &["company", "list", "--json"], &[]).await);
    let names: Vec<&str> = companies
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"acme") && names.contains(&"default"),
        "{names:?}"
    );
    let duplicate = berth(&server, &["company", "create", "--name", "acme"], &[]).await;
    assert_eq!(duplicate.status.code(), Some(1));

    let text = berth(
        &server,
        &[
            "key",
            "create",
            "--company",
            "acme",
            "--name",
            "ro",
            "--role",
            "reader",
        ],
        &[],
    )
    .await;
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(
        stderr(&text).contains("shown only this once"),
        "{}",
        stderr(&text)
    );
    let reader_token = stdout(&text).trim().to_owned();

    let key = json_out(
        &berth(
            &server,
            &[
                "key",
                "create",
                "--company",
                &acme,
                "--name",
                "ci",
                "--role",
                "manager",
                "--json",
            ],
            &[],
        )
        .await,
    );
    assert_eq!(key["role"], "manager");
    let token = key["token"].as_str().unwrap().to_owned();
    // The key acts for its own company: what it creates lands there, and the reader sees it redacted.
    let made = berth(
        &server,
        &[
            "env",
            "create",
            "--name",
            "acme box",
            "--driver",
            "sandbox",
            "--config",
            r#"{"provider":"fake"}"#,
        ],
        &[("BERTH_TOKEN", &token)],
    )
    .await;
    assert!(made.status.success(), "{}", stderr(&made));
    let as_key = json_out(
        &berth(
            &server,
            &["env", "list", "--json"],
            &[("BERTH_TOKEN", &token)],
        )
        .await,
    );
    assert_eq!(as_key.as_array().unwrap().len(), 1, "{as_key}");
    assert_eq!(as_key[0]["companyId"], acme.as_str());
    let as_reader = json_out(
        &berth(
            &server,
            &["env", "list", "--json"],
            &[("BERTH_TOKEN", &reader_token)],
        )
        .await,
    );
    assert_eq!(as_reader[0]["configRedacted"], true, "{as_reader}");
    // Only the admin manages tenants.
    let refused = berth(&server, &["company", "list"], &[("BERTH_TOKEN", &token)]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("HTTP 403"),
        "{}",
        stderr(&refused)
    );

    let removed = berth(&server, &["key", "rm", key["id"].as_str().unwrap()], &[]).await;
    assert!(removed.status.success(), "{}", stderr(&removed));
    let gone = berth(&server, &["env", "list"], &[("BERTH_TOKEN", &token)]).await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(stderr(&gone).contains("HTTP 401"), "{}", stderr(&gone));
    server.stop().await;
}
