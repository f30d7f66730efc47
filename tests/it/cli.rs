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
    let fetched = json_out(&berth(&server, &["env", "get", &id], &[]).await);
    assert_eq!(fetched["config"]["image"], "fake:latest");

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
