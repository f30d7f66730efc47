//! What of the berth host a company may use, through the real binary: `workspace.localPath` confined to the
//! workspace roots the operator granted (`--workspace-root`, `BERTH_WORKSPACE_ROOTS`), the data dir refused to
//! everybody, and Local environments for the `default` company only unless `--local-environments all`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::runs::{all_events, text_of, wait_run};
use crate::support::server::{ServerOptions, TestServer, serve_refused};

/// A fake-sandbox environment (it copies the workspace in and syncs changes back).
async fn fake_env(server: &TestServer, company: &str) -> String {
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": format!("fake-{}", uuid::Uuid::new_v4()), "driver": "sandbox", "config": {"provider": "fake"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    env["id"].as_str().unwrap().to_owned()
}

async fn post_run(
    server: &TestServer,
    token: &str,
    company: &str,
    body: Value,
) -> (StatusCode, Value) {
    server
        .call(
            Method::POST,
            &format!("/api/companies/{company}/runs"),
            token,
            Some(body),
        )
        .await
}

/// A run writing `output.txt` in the workspace named `dir`, in the fake sandbox `env`.
fn writing_run(env: &str, dir: &Path, text: &str) -> Value {
    json!({
        "environmentId": env,
        "command": ["sh", "-c", format!("cat in.txt 2>/dev/null; echo {text} > output.txt")],
        "workspace": {"localPath": dir},
        "bridge": false,
    })
}

/// Starts a run with `token` and waits for it to succeed.
async fn run_to_success(server: &TestServer, token: &str, company: &str, body: Value) -> Value {
    let (status, run) = post_run(server, token, company, body).await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run_id = run["id"].as_str().unwrap();
    let run = wait_run(server, run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    run
}

/// Runs [`writing_run`] in `dir` with `token` to success, checks that it wrote there, and returns its stdout.
async fn write_through(
    server: &TestServer,
    token: &str,
    company: &str,
    env: &str,
    dir: &Path,
    text: &str,
) -> String {
    let run = run_to_success(server, token, company, writing_run(env, dir, text)).await;
    assert_eq!(
        std::fs::read_to_string(dir.join("output.txt")).unwrap(),
        format!("{text}\n")
    );
    text_of(
        &all_events(server, run["id"].as_str().unwrap()).await,
        "stdout",
    )
}

fn assert_refused(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
}

async fn run_count(server: &TestServer, company: &str) -> usize {
    let (status, runs) = server.get(&format!("/api/companies/{company}/runs")).await;
    assert_eq!(status, StatusCode::OK, "{runs}");
    runs.as_array().unwrap().len()
}

async fn lease_count(server: &TestServer, env: &str) -> usize {
    let (status, leases) = server.get(&format!("/api/environments/{env}/leases")).await;
    assert_eq!(status, StatusCode::OK, "{leases}");
    leases.as_array().unwrap().len()
}

fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
    let temp = tempfile::tempdir().unwrap();
    let path = std::fs::canonicalize(temp.path()).unwrap();
    (temp, path)
}

fn dir(path: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&path).unwrap();
    path
}

fn all_local_environments() -> ServerOptions {
    ServerOptions {
        args: vec!["--local-environments".into(), "all".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn without_roots_company_keys_cannot_name_a_workspace_and_the_admin_never_the_data_dir() {
    let server = TestServer::start().await;
    let home = server.default_company().await;
    let acme = server.create_company("acme").await;
    let home_key = server.create_key(&home, "manager").await;
    let acme_key = server.create_key(&acme, "manager").await;
    let home_env = fake_env(&server, &home).await;
    let acme_env = fake_env(&server, &acme).await;
    let (_temp, base) = canonical_tempdir();
    let workspace = dir(base.join("work"));
    std::fs::write(workspace.join("in.txt"), "input\n").unwrap();

    // No root granted: every company key is refused, and told how the operator grants one.
    for (key, company, env) in [(&home_key, &home, &home_env), (&acme_key, &acme, &acme_env)] {
        for body in [
            writing_run(env, &workspace, "x"),
            // Without environmentId too: the workspace is checked first, and nothing (no Local) is created.
            json!({"command": ["true"], "workspace": {"localPath": workspace}}),
        ] {
            let (status, error) = post_run(&server, key, company, body).await;
            assert_refused(
                status,
                &error,
                StatusCode::FORBIDDEN,
                "workspace_not_allowed",
            );
            let message = error["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("berth serve --workspace-root"),
                "{message}"
            );
        }
    }
    assert!(!workspace.join("output.txt").exists());

    // The admin is the host's operator: any existing directory ...
    let stdout = write_through(
        &server,
        &server.admin_token,
        &acme,
        &acme_env,
        &workspace,
        "by-admin",
    )
    .await;
    assert_eq!(stdout, "input\n");

    // ... but never the data dir: itself, inside it, a directory containing it, or any way around to it; nor the
    // sandboxes.
    let data_link = base.join("to-data");
    std::os::unix::fs::symlink(&server.data_dir, &data_link).unwrap();
    let data_parent = server.data_dir.parent().unwrap().to_owned();
    let mut via_proc = PathBuf::from("/proc/self/root");
    via_proc.push(server.data_dir.strip_prefix("/").unwrap());
    let inside = dir(server.data_dir.join("inside"));
    for path in [
        server.data_dir.clone(),
        server.data_dir.join("."),
        inside,
        data_parent,
        data_link,
        via_proc,
        // The fake provider's sandboxes (every company's), made by the run above.
        PathBuf::from("/tmp/berth-fake"),
    ] {
        let (status, error) = post_run(
            &server,
            &server.admin_token,
            &home,
            writing_run(&home_env, &path, "pwned"),
        )
        .await;
        assert_refused(
            status,
            &error,
            StatusCode::FORBIDDEN,
            "workspace_not_allowed",
        );
        assert!(!path.join("output.txt").exists(), "{path:?}");
    }
    // A path that is not an existing directory stays a 422.
    for path in [base.join("missing"), workspace.join("in.txt")] {
        let (status, error) = post_run(
            &server,
            &server.admin_token,
            &home,
            writing_run(&home_env, &path, "x"),
        )
        .await;
        assert_refused(
            status,
            &error,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        );
        assert_eq!(error["error"]["details"][0]["path"], "workspace.localPath");
    }

    // Nothing ran but the admin's run: no run rows, no leases, no environment created on the way.
    assert_eq!(run_count(&server, &home).await, 0);
    assert_eq!(run_count(&server, &acme).await, 1);
    assert_eq!(lease_count(&server, &home_env).await, 0);
    assert_eq!(lease_count(&server, &acme_env).await, 1);
    let (_, environments) = server
        .get(&format!("/api/companies/{acme}/environments"))
        .await;
    assert_eq!(environments.as_array().unwrap().len(), 1, "{environments}");
    server.stop().await;
}

#[tokio::test]
async fn company_keys_run_inside_their_own_roots_and_nowhere_else() {
    // The companies exist before the roots can name them: create them, then restart with the roots.
    let server = TestServer::start().await;
    let acme = server.create_company("acme").await;
    let globex = server.create_company("globex").await;
    let acme_key = server.create_key(&acme, "manager").await;
    let globex_key = server.create_key(&globex, "manager").await;
    let acme_env = fake_env(&server, &acme).await;
    let globex_env = fake_env(&server, &globex).await;
    let data_dir = server.data_dir.clone();
    let kept = server.stop_keeping_data().await;

    let (_temp, base) = canonical_tempdir();
    let shared = dir(base.join("shared"));
    let acme_root = dir(base.join("acme"));
    let globex_root = dir(base.join("globex"));
    let work = dir(acme_root.join("work"));
    std::fs::write(work.join("in.txt"), "acme input\n").unwrap();
    let shared_work = dir(shared.join("common"));
    // A root-only directory outside every root, and a way into it from inside a granted root.
    let secret = dir(base.join("secret"));
    std::fs::write(secret.join("secret.txt"), "root only\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&secret, shared.join("escape")).unwrap();
    std::os::unix::fs::symlink(&globex_root, acme_root.join("to-globex")).unwrap();

    let server = TestServer::start_with(ServerOptions {
        data_dir: Some(data_dir.clone()),
        args: vec![
            "--workspace-root".into(),
            shared.display().to_string(),
            "--workspace-root".into(),
            format!("{acme}={}", acme_root.display()),
            "--workspace-root".into(),
            format!("{globex}={}", globex_root.display()),
        ],
        ..Default::default()
    })
    .await;

    // Inside its own root, and inside the root granted to every company: the run works and syncs back.
    let stdout = write_through(&server, &acme_key, &acme, &acme_env, &work, "acme").await;
    assert_eq!(stdout, "acme input\n");
    write_through(&server, &acme_key, &acme, &acme_env, &shared_work, "shared").await;
    write_through(
        &server,
        &globex_key,
        &globex,
        &globex_env,
        &globex_root,
        "globex",
    )
    .await;

    // Another company's root, and every way around the rule.
    let mut via_proc = PathBuf::from("/proc/self/root");
    via_proc.push(globex_root.strip_prefix("/").unwrap());
    let refused = [
        globex_root.clone(),
        acme_root.join("to-globex"),
        shared.join("escape"),
        secret.clone(),
        data_dir.clone(),
        via_proc,
        PathBuf::from("/root"),
        PathBuf::from("/"),
        // Missing, outside the roots: refused the same way as an existing directory (no probing the host).
        base.join("missing"),
    ];
    for path in &refused {
        let (status, error) = post_run(
            &server,
            &acme_key,
            &acme,
            writing_run(&acme_env, path, "pwned"),
        )
        .await;
        assert_refused(
            status,
            &error,
            StatusCode::FORBIDDEN,
            "workspace_not_allowed",
        );
        // The message names the roots this caller may use, and nothing else.
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(shared.to_str().unwrap())
                && message.contains(acme_root.to_str().unwrap()),
            "{path:?}: {message}"
        );
        assert!(
            !message.contains(globex_root.to_str().unwrap()) && !message.contains("root only"),
            "{message}"
        );
    }
    // `..` is refused before anything is resolved; a missing directory inside a root is a plain 422.
    let dotdot = PathBuf::from(format!("{}/../globex", acme_root.display()));
    for path in [dotdot, acme_root.join("missing")] {
        let (status, error) = post_run(
            &server,
            &acme_key,
            &acme,
            writing_run(&acme_env, &path, "pwned"),
        )
        .await;
        assert_refused(
            status,
            &error,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        );
    }

    // Nothing ran but the three runs above; the refused directories are untouched.
    assert_eq!(run_count(&server, &acme).await, 2);
    assert_eq!(lease_count(&server, &acme_env).await, 2);
    assert_eq!(run_count(&server, &globex).await, 1);
    assert_eq!(
        std::fs::read_to_string(globex_root.join("output.txt")).unwrap(),
        "globex\n"
    );
    assert!(!secret.join("output.txt").exists());
    assert!(!data_dir.join("output.txt").exists());
    assert_eq!(
        std::fs::read_dir(&secret).unwrap().count(),
        1,
        "the secret dir holds only its file"
    );
    server.stop().await;
    drop(kept);
}

#[tokio::test]
async fn start_up_refuses_bad_workspace_roots_and_reads_them_from_the_environment() {
    let (_temp, base) = canonical_tempdir();
    let data_dir = base.join("data");
    let file = base.join("file");
    std::fs::write(&file, "x").unwrap();
    let missing = base.join("missing");
    /// Flags, environment, and what stderr must say.
    type Case = (Vec<String>, Vec<(String, String)>, String);
    let cases: Vec<Case> = vec![
        (
            vec!["--workspace-root".into(), missing.display().to_string()],
            vec![],
            format!("--workspace-root {}: no such directory", missing.display()),
        ),
        (
            vec![],
            vec![(
                "BERTH_WORKSPACE_ROOTS".into(),
                missing.display().to_string(),
            )],
            "no such directory".into(),
        ),
        (
            vec!["--workspace-root".into(), file.display().to_string()],
            vec![],
            "not a directory".into(),
        ),
        (
            vec!["--workspace-root".into(), data_dir.display().to_string()],
            vec![],
            "overlaps".into(),
        ),
        (
            vec!["--workspace-root".into(), base.display().to_string()],
            vec![],
            "overlaps".into(),
        ),
        (
            vec!["--workspace-root".into(), "acme=/tmp".into()],
            vec![],
            "`acme` is not a company id".into(),
        ),
        (
            vec!["--workspace-root".into(), "relative/dir".into()],
            vec![],
            "expected an absolute DIR".into(),
        ),
        (
            vec!["--local-environments".into(), "some".into()],
            vec![],
            "--local-environments".into(),
        ),
    ];
    for (args, env, expected) in cases {
        let (code, stderr) = serve_refused(ServerOptions {
            data_dir: Some(data_dir.clone()),
            args: args.clone(),
            env,
            ..Default::default()
        })
        .await;
        assert_ne!(code, Some(0), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&expected),
            "{args:?}: expected `{expected}` in:\n{stderr}"
        );
    }

    // `BERTH_WORKSPACE_ROOTS`: `:`-separated entries, empty ones ignored.
    let first = dir(base.join("first"));
    let second = dir(base.join("second"));
    let server = TestServer::start_with(ServerOptions {
        env: vec![(
            "BERTH_WORKSPACE_ROOTS".into(),
            format!("{}::{}", first.display(), second.display()),
        )],
        ..Default::default()
    })
    .await;
    let home = server.default_company().await;
    let key = server.create_key(&home, "manager").await;
    let env = fake_env(&server, &home).await;
    write_through(&server, &key, &home, &env, &second, "second").await;
    let (status, error) = post_run(&server, &key, &home, writing_run(&env, &base, "x")).await;
    assert_refused(
        status,
        &error,
        StatusCode::FORBIDDEN,
        "workspace_not_allowed",
    );
    server.stop().await;
}

#[tokio::test]
async fn local_environments_belong_to_the_default_company_unless_the_operator_says_all() {
    let server = TestServer::start().await;
    let home = server.default_company().await;
    let acme = server.create_company("acme").await;
    let home_key = server.create_key(&home, "manager").await;
    let acme_key = server.create_key(&acme, "manager").await;

    // The operator's company keeps its Local environment and runs there by default.
    run_to_success(&server, &home_key, &home, json!({"command": ["true"]})).await;

    // Another company has none, cannot run without an environment, and cannot make one.
    let (_, environments) = server
        .get(&format!("/api/companies/{acme}/environments"))
        .await;
    assert_eq!(environments, json!([]));
    let (status, error) = post_run(&server, &acme_key, &acme, json!({"command": ["true"]})).await;
    assert_refused(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no_local_environment",
    );
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("environmentId") && message.contains("--local-environments all"),
        "{message}"
    );
    for token in [&acme_key, &server.admin_token] {
        let (status, error) = server
            .call(
                Method::POST,
                &format!("/api/companies/{acme}/environments"),
                token,
                Some(json!({"name": "mine", "driver": "local"})),
            )
            .await;
        assert_refused(
            status,
            &error,
            StatusCode::FORBIDDEN,
            "local_environment_not_allowed",
        );
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--local-environments all"),
            "{error}"
        );
    }
    let sandbox = fake_env(&server, &acme).await;
    let (status, error) = server
        .call(
            Method::PATCH,
            &format!("/api/environments/{sandbox}"),
            &acme_key,
            Some(json!({"driver": "local", "config": {}})),
        )
        .await;
    assert_refused(
        status,
        &error,
        StatusCode::FORBIDDEN,
        "local_environment_not_allowed",
    );
    // Capabilities say so, and a local probe tells nothing about the host.
    let (_, capabilities) = server
        .call(
            Method::GET,
            &format!("/api/companies/{acme}/environments/capabilities"),
            &acme_key,
            None,
        )
        .await;
    assert_eq!(capabilities["drivers"]["local"]["status"], "unavailable");
    assert_eq!(
        capabilities["drivers"]["local"]["supportsRunExecution"],
        false
    );
    let (_, capabilities) = server
        .get(&format!("/api/companies/{home}/environments/capabilities"))
        .await;
    assert_ne!(capabilities["drivers"]["local"]["status"], "unavailable");
    let (status, probe) = server
        .call(
            Method::POST,
            &format!("/api/companies/{acme}/environments/probe-config"),
            &acme_key,
            Some(json!({"driver": "local", "config": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    assert_eq!(probe["ok"], false, "{probe}");
    assert!(
        probe
            .get("details")
            .is_none_or(|details| details.get("cwd").is_none()),
        "{probe}"
    );
    assert_eq!(run_count(&server, &acme).await, 0);
    let data_dir = server.data_dir.clone();
    let kept = server.stop_keeping_data().await;

    // `--local-environments all`: every company has one (today's behaviour), made on first use.
    let server = TestServer::start_with(ServerOptions {
        data_dir: Some(data_dir.clone()),
        ..all_local_environments()
    })
    .await;
    let run = run_to_success(&server, &acme_key, &acme, json!({"command": ["true"]})).await;
    let local = run["environmentId"].as_str().unwrap().to_owned();
    let (_, environment) = server.get(&format!("/api/environments/{local}")).await;
    assert_eq!(environment["driver"], "local");
    let globex = server.create_company("globex").await;
    let (_, environments) = server
        .get(&format!("/api/companies/{globex}/environments"))
        .await;
    assert_eq!(environments[0]["driver"], "local", "{environments}");
    server.stop_keeping_data().await;

    // Back to the default policy: the Local environment acme kept may not be used any more.
    let server = TestServer::start_with(ServerOptions {
        data_dir: Some(data_dir),
        ..Default::default()
    })
    .await;
    let (status, error) = post_run(&server, &acme_key, &acme, json!({"command": ["true"]})).await;
    assert_refused(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no_local_environment",
    );
    let (status, error) = post_run(
        &server,
        &acme_key,
        &acme,
        json!({"environmentId": local, "command": ["true"]}),
    )
    .await;
    assert_refused(
        status,
        &error,
        StatusCode::FORBIDDEN,
        "local_environment_not_allowed",
    );
    assert_eq!(run_count(&server, &acme).await, 1);
    server.stop().await;
    drop(kept);
}
