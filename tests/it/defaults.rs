//! Defaults a run falls back on when it names none: the company's default environment (`defaultEnvironmentId`,
//! `PATCH /api/companies/{id}`, `berth company update`), and the command timeout — the run's own, else the
//! environment's `timeoutMs`, else `berth serve --default-run-timeout`. And the store's one-transaction insert of a
//! run with its `queued` event.

use std::process::Output;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqliteConnection};

use berth_core::company::Company;
use berth_core::environment::{Driver, Environment, EnvironmentStatus};
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::run::{EventKind, NewRunEvent, Run, RunStatus};
use berth_core::time::Timestamp;
use berth_store::{Backend, ConflictKind, Store, StoreError};

use crate::support::db::TestDb;
use crate::support::runs::{all_events, create_env, start_run, text_of, wait_run};
use crate::support::server::{ServerOptions, TestServer, berth_bin, serve_refused};

// === helpers ===

async fn local_env(server: &TestServer, company: &str) -> String {
    let (status, envs) = server
        .get(&format!(
            "/api/companies/{company}/environments?driver=local"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{envs}");
    envs[0]["id"].as_str().unwrap().to_owned()
}

async fn set_default(
    server: &TestServer,
    token: &str,
    company: &str,
    default: Value,
) -> (StatusCode, Value) {
    server
        .call(
            Method::PATCH,
            &format!("/api/companies/{company}"),
            token,
            Some(json!({"defaultEnvironmentId": default})),
        )
        .await
}

#[track_caller]
fn assert_invalid_at(status: StatusCode, body: &Value, path: &str) {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "validation_failed", "{body}");
    let paths: Vec<&str> = body["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details: {body}"))
        .iter()
        .map(|detail| detail["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, [path], "{body}");
}

/// Runs `command` with no timeout of its own (unless `timeout_ms`), optionally in `env`; waits for the end.
async fn finished_run(
    server: &TestServer,
    company: &str,
    env: Option<&str>,
    command: &[&str],
    timeout_ms: Option<u64>,
) -> Value {
    let mut body = json!({"command": command});
    if let Some(env) = env {
        body["environmentId"] = json!(env);
    }
    if let Some(ms) = timeout_ms {
        body["timeoutMs"] = json!(ms);
    }
    let run_id = start_run(server, company, body).await;
    wait_run(server, &run_id, Duration::from_secs(60)).await
}

// === the company's default environment ===

#[tokio::test]
async fn admins_and_managers_set_the_default_environment_and_nobody_else() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let sandbox = create_env(&server, &company, "sandbox", json!({"provider": "fake"})).await;
    let other = server.create_company("other").await;
    let foreign = create_env(&server, &other, "sandbox", json!({"provider": "fake"})).await;

    let (status, shown) = server.get(&format!("/api/companies/{company}")).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["defaultEnvironmentId"], Value::Null, "{shown}");

    // Admin sets it; the company JSON shows it everywhere.
    let (status, updated) =
        set_default(&server, &server.admin_token, &company, json!(sandbox)).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["defaultEnvironmentId"], sandbox.as_str());
    assert_eq!(updated["id"], company.as_str());
    assert_eq!(updated["name"], "default");
    let (_, companies) = server.get("/api/companies").await;
    let listed = companies
        .as_array()
        .unwrap()
        .iter()
        .find(|listed| listed["id"] == company.as_str())
        .unwrap();
    assert_eq!(listed["defaultEnvironmentId"], sandbox.as_str());
    assert_eq!(
        companies
            .as_array()
            .unwrap()
            .iter()
            .find(|listed| listed["id"] == other.as_str())
            .unwrap()["defaultEnvironmentId"],
        Value::Null
    );

    // A reader may read the company but not change it; another company's manager may do neither.
    let reader = server.create_key(&company, "reader").await;
    let (status, seen) = server
        .call(
            Method::GET,
            &format!("/api/companies/{company}"),
            &reader,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["defaultEnvironmentId"], sandbox.as_str());
    let (status, refused) = set_default(&server, &reader, &company, Value::Null).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    let outsider = server.create_key(&other, "manager").await;
    let (status, refused) = set_default(&server, &outsider, &company, Value::Null).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/companies/{company}"),
            &outsider,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The company's manager clears it with null.
    let manager = server.create_key(&company, "manager").await;
    let (status, cleared) = set_default(&server, &manager, &company, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{cleared}");
    assert_eq!(cleared["defaultEnvironmentId"], Value::Null, "{cleared}");
    // A manager may set it too, and a body without the field changes nothing.
    let (status, updated) = set_default(&server, &manager, &company, json!(sandbox)).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    let (status, same) = server
        .call(
            Method::PATCH,
            &format!("/api/companies/{company}"),
            &manager,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{same}");
    assert_eq!(same["defaultEnvironmentId"], sandbox.as_str());

    // Another company's environment, an id that names nothing, a malformed one: 422 at the field; nothing changes.
    for bad in [
        json!(foreign),
        json!(uuid::Uuid::new_v4().to_string()),
        json!("not-an-id"),
    ] {
        let (status, body) = set_default(&server, &server.admin_token, &company, bad).await;
        assert_invalid_at(status, &body, "defaultEnvironmentId");
    }
    // An archived environment would refuse every run: refused as a default.
    let archived = create_env(&server, &company, "sandbox", json!({"provider": "fake"})).await;
    let (status, body) = server
        .patch(
            &format!("/api/environments/{archived}"),
            json!({"status": "archived"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = set_default(&server, &server.admin_token, &company, json!(archived)).await;
    assert_invalid_at(status, &body, "defaultEnvironmentId");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("archived"),
        "{body}"
    );
    // Another company may not default to a Local environment it may not use: it has none, so there is no id to
    // give; the wrong type and unknown fields are refused like in every body.
    let (status, body) = set_default(&server, &server.admin_token, &company, json!(5)).await;
    assert_invalid_at(status, &body, "defaultEnvironmentId");
    let (status, body) = server
        .patch(
            &format!("/api/companies/{company}"),
            json!({"name": "renamed"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (_, still) = server.get(&format!("/api/companies/{company}")).await;
    assert_eq!(still["defaultEnvironmentId"], sandbox.as_str(), "{still}");
    assert_eq!(still["name"], "default");
    // An unknown company: 404.
    let (status, _) = server
        .patch(
            &format!("/api/companies/{}", uuid::Uuid::new_v4()),
            json!({"defaultEnvironmentId": null}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Each change is in the activity log, attributed to its actor.
    let (_, activity) = server
        .get(&format!("/api/companies/{company}/activity"))
        .await;
    let updates: Vec<&Value> = activity
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["action"] == "company.updated")
        .collect();
    assert_eq!(updates.len(), 3, "{activity}");
    assert_eq!(updates[0]["actor"], "admin");
    assert!(
        updates[1]["actor"]
            .as_str()
            .unwrap()
            .starts_with("api_key:")
    );
    server.stop().await;
}

#[tokio::test]
async fn runs_without_an_environment_use_the_default_else_local() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let local = local_env(&server, &company).await;
    let sandbox = create_env(&server, &company, "sandbox", json!({"provider": "fake"})).await;

    // No default: the Local environment, as before.
    let run = finished_run(&server, &company, None, &["sh", "-c", "echo here"], None).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["environmentId"], local.as_str());

    // With a default: that environment, through its own driver (a fake sandbox lease).
    let (status, body) = set_default(&server, &server.admin_token, &company, json!(sandbox)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let run = finished_run(
        &server,
        &company,
        None,
        &["sh", "-c", "echo in the sandbox"],
        None,
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["environmentId"], sandbox.as_str());
    let events = all_events(&server, run["id"].as_str().unwrap()).await;
    let lease = events
        .iter()
        .find(|event| event["type"] == "lease")
        .unwrap();
    assert_eq!(lease["data"]["provider"], "fake", "{events:?}");
    assert_eq!(text_of(&events, "stdout"), "in the sandbox\n");
    // A run that names an environment still gets that one.
    let run = finished_run(&server, &company, Some(&local), &["true"], None).await;
    assert_eq!(run["environmentId"], local.as_str());

    // Cleared: back to Local.
    let (status, _) = set_default(&server, &server.admin_token, &company, Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let run = finished_run(&server, &company, None, &["true"], None).await;
    assert_eq!(run["environmentId"], local.as_str());

    // A company that may not use Local (`--local-environments default`): refused without a default, and runs in
    // its default once it has one.
    let other = server.create_company("other").await;
    let (status, body) = server
        .post(
            &format!("/api/companies/{other}/runs"),
            json!({"command": ["true"]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "no_local_environment");
    let theirs = create_env(&server, &other, "sandbox", json!({"provider": "fake"})).await;
    let (status, body) = set_default(&server, &server.admin_token, &other, json!(theirs)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let run = finished_run(&server, &other, None, &["true"], None).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["environmentId"], theirs.as_str());

    // A default archived after it was set refuses runs that rely on it, with the usual 409.
    let (status, _) = server
        .patch(
            &format!("/api/environments/{theirs}"),
            json!({"status": "archived"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .post(
            &format!("/api/companies/{other}/runs"),
            json!({"command": ["true"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "environment_archived");
    server.stop().await;
}

#[tokio::test]
async fn deleting_the_default_environment_is_refused_until_the_default_changes() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let sandbox = create_env(&server, &company, "sandbox", json!({"provider": "fake"})).await;
    let (status, _) = set_default(&server, &server.admin_token, &company, json!(sandbox)).await;
    assert_eq!(status, StatusCode::OK);

    // Refused before anything of it is stopped: a run in it goes on to succeed.
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "sleep 1; echo finished"]}),
    )
    .await;
    let (status, body) = server.delete(&format!("/api/environments/{sandbox}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "environment_is_default", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("defaultEnvironmentId"),
        "the message says how to get past it: {body}"
    );
    let run = wait_run(&server, &run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["environmentId"], sandbox.as_str());
    let (status, _) = server.get(&format!("/api/environments/{sandbox}")).await;
    assert_eq!(status, StatusCode::OK, "the environment is still there");

    // Once the default is cleared, it deletes as any other, and runs go to Local.
    let (status, _) = set_default(&server, &server.admin_token, &company, Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server.delete(&format!("/api/environments/{sandbox}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let local = local_env(&server, &company).await;
    let run = finished_run(&server, &company, None, &["true"], None).await;
    assert_eq!(run["environmentId"], local.as_str());
    server.stop().await;
}

// === default command timeouts ===

#[tokio::test]
async fn an_environments_timeout_times_out_runs_that_give_none() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let local = local_env(&server, &company).await;

    // Local: a patch of its config.
    let (status, env) = server
        .patch(
            &format!("/api/environments/{local}"),
            json!({"config": {"timeoutMs": 500}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{env}");
    assert_eq!(env["config"], json!({"timeoutMs": 500}));
    let started = Instant::now();
    let run = finished_run(
        &server,
        &company,
        None,
        &["sh", "-c", "echo before; sleep 30"],
        None,
    )
    .await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let events = all_events(&server, run["id"].as_str().unwrap()).await;
    assert_eq!(
        text_of(&events, "stdout"),
        "before\n",
        "partial output is kept"
    );
    // The run's own timeout wins over the environment's.
    let run = finished_run(
        &server,
        &company,
        None,
        &["sh", "-c", "sleep 1; echo done"],
        Some(30_000),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // A fake sandbox: `timeoutMs` beside the provider's fields, which its schema (no extra keys) never sees.
    let sandbox = create_env(
        &server,
        &company,
        "sandbox",
        json!({"provider": "fake", "timeoutMs": 500}),
    )
    .await;
    let started = Instant::now();
    let run = finished_run(&server, &company, Some(&sandbox), &["sleep", "30"], None).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let run = finished_run(
        &server,
        &company,
        Some(&sandbox),
        &["sh", "-c", "sleep 1; echo done"],
        Some(30_000),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // Removed with null: no timeout again.
    let (status, env) = server
        .patch(
            &format!("/api/environments/{local}"),
            json!({"config": {"timeoutMs": null}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{env}");
    assert_eq!(env["config"], json!({}));
    let run = finished_run(&server, &company, None, &["sh", "-c", "sleep 1"], None).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    server.stop().await;
}

#[tokio::test]
async fn timeouts_out_of_bounds_are_refused_with_their_path() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let local = local_env(&server, &company).await;
    let path = format!("/api/companies/{company}/environments");
    // (`null` is no value: absent on create, removed on a patch, as above.)
    for bad in [
        json!(0),
        json!(-1),
        json!(86_400_001),
        json!(2.5),
        json!("10s"),
    ] {
        let (status, body) = server
            .post(
                &path,
                json!({"name": "bad", "driver": "sandbox", "config": {"provider": "fake", "timeoutMs": bad}}),
            )
            .await;
        assert_invalid_at(status, &body, "config.timeoutMs");
        let (status, body) = server
            .patch(
                &format!("/api/environments/{local}"),
                json!({"config": {"timeoutMs": bad}}),
            )
            .await;
        assert_invalid_at(status, &body, "config.timeoutMs");
        let (status, body) = server
            .post(
                &format!("/api/companies/{company}/runs"),
                json!({"command": ["true"], "timeoutMs": bad}),
            )
            .await;
        assert_invalid_at(status, &body, "timeoutMs");
    }
    // SSH configs take it at the same place (plugin configs too: see the core config tests).
    let (status, body) = server
        .post(
            &path,
            json!({"name": "ssh", "driver": "ssh", "config": {"host": "h", "username": "u",
                   "remoteWorkspacePath": "/w", "password": "p", "timeoutMs": 0}}),
        )
        .await;
    assert_invalid_at(status, &body, "config.timeoutMs");
    let (status, body) = server
        .post(
            &path,
            json!({"name": "ssh", "driver": "ssh", "config": {"host": "h", "username": "u",
                   "remoteWorkspacePath": "/w", "password": "p", "timeoutMs": 60000}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["config"]["timeoutMs"], 60_000);
    // The bounds are inclusive.
    let (status, body) = server
        .patch(
            &format!("/api/environments/{local}"),
            json!({"config": {"timeoutMs": 86_400_000}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn the_servers_default_run_timeout_comes_last() {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--default-run-timeout".into(), "700ms".into()],
        ..Default::default()
    })
    .await;
    let company = server.default_company().await;

    // Neither the run nor the environment names one: the server's.
    let started = Instant::now();
    let run = finished_run(&server, &company, None, &["sleep", "30"], None).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // The run's own beats it.
    let run = finished_run(
        &server,
        &company,
        None,
        &["sh", "-c", "sleep 1.5; echo done"],
        Some(30_000),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // The environment's beats it.
    let patient = create_env(
        &server,
        &company,
        "sandbox",
        json!({"provider": "fake", "timeoutMs": 30_000}),
    )
    .await;
    let run = finished_run(
        &server,
        &company,
        Some(&patient),
        &["sh", "-c", "sleep 1.5; echo done"],
        None,
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // And the run's beats the environment's.
    let run = finished_run(
        &server,
        &company,
        Some(&patient),
        &["sleep", "30"],
        Some(500),
    )
    .await;
    assert_eq!(run["status"], "timed_out", "{run}");
    server.stop().await;

    // The variable is read like the flag; bad values stop the server with the reason.
    let server = TestServer::start_with(ServerOptions {
        env: vec![("BERTH_DEFAULT_RUN_TIMEOUT".into(), "1s".into())],
        ..Default::default()
    })
    .await;
    let company = server.default_company().await;
    let run = finished_run(&server, &company, None, &["sleep", "30"], None).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    server.stop().await;
    for (args, env) in [
        (vec!["--default-run-timeout", "0"], vec![]),
        (vec!["--default-run-timeout", "25h"], vec![]),
        (vec![], vec![("BERTH_DEFAULT_RUN_TIMEOUT", "soon")]),
    ] {
        let (code, stderr) = serve_refused(ServerOptions {
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            env: env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            ..Default::default()
        })
        .await;
        assert_ne!(code, Some(0), "{stderr}");
        assert!(stderr.contains("--default-run-timeout"), "{stderr}");
    }
}

// === the CLI ===

fn berth_command(
    server: &TestServer,
    args: &[&str],
    token: Option<&str>,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(berth_bin());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &server.data_dir)
        .env("BERTH_URL", &server.url)
        .env("BERTH_DATA_DIR", &server.data_dir);
    if let Some(token) = token {
        command.env("BERTH_TOKEN", token);
    }
    command
}

async fn berth(server: &TestServer, args: &[&str], token: Option<&str>) -> Output {
    berth_command(server, args, token)
        .output()
        .await
        .expect("run berth")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn berth_company_update_sets_and_clears_the_default_environment() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let sandbox = create_env(&server, &company, "sandbox", json!({"provider": "fake"})).await;

    let help = berth(&server, &["company", "update", "--help"], None).await;
    assert!(help.status.success(), "{}", stderr(&help));
    assert!(
        stdout(&help).contains("--default-environment <ENV_ID|none>"),
        "{}",
        stdout(&help)
    );

    let set = berth(
        &server,
        &[
            "company",
            "update",
            &company,
            "--default-environment",
            &sandbox,
            "--json",
        ],
        None,
    )
    .await;
    assert!(set.status.success(), "{}", stderr(&set));
    let shown: Value = serde_json::from_slice(&set.stdout).unwrap();
    assert_eq!(shown["defaultEnvironmentId"], sandbox.as_str(), "{shown}");
    // The API agrees, and `berth run` without --env goes there.
    let (_, company_json) = server.get(&format!("/api/companies/{company}")).await;
    assert_eq!(company_json["defaultEnvironmentId"], sandbox.as_str());
    let run = berth(&server, &["run", "--json", "--", "true"], None).await;
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stdout(&run).contains(r#""provider":"fake""#),
        "the run took a fake sandbox lease: {}",
        stdout(&run)
    );

    // Text output; a manager key works too; `none` clears.
    let manager = server.create_key(&company, "manager").await;
    let cleared = berth(
        &server,
        &[
            "company",
            "update",
            &company,
            "--default-environment",
            "none",
        ],
        Some(&manager),
    )
    .await;
    assert!(cleared.status.success(), "{}", stderr(&cleared));
    assert!(
        stdout(&cleared).contains("default environment: none"),
        "{}",
        stdout(&cleared)
    );
    let get = berth(
        &server,
        &["company", "get", &company, "--json"],
        Some(&manager),
    )
    .await;
    assert!(get.status.success(), "{}", stderr(&get));
    let shown: Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(shown["defaultEnvironmentId"], Value::Null);

    // Refusals come back with the server's reason and a failing exit code.
    let reader = server.create_key(&company, "reader").await;
    let refused = berth(
        &server,
        &[
            "company",
            "update",
            &company,
            "--default-environment",
            &sandbox,
        ],
        Some(&reader),
    )
    .await;
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("manager"), "{}", stderr(&refused));
    let unknown = uuid::Uuid::new_v4().to_string();
    let refused = berth(
        &server,
        &[
            "company",
            "update",
            &company,
            "--default-environment",
            &unknown,
        ],
        None,
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("defaultEnvironmentId"),
        "{}",
        stderr(&refused)
    );
    let nothing = berth(&server, &["company", "update", &company], None).await;
    assert!(!nothing.status.success());
    assert!(
        stderr(&nothing).contains("--default-environment"),
        "{}",
        stderr(&nothing)
    );
    // The list shows the column.
    let list = berth(&server, &["company", "list"], None).await;
    assert!(stdout(&list).contains("DEFAULT ENV"), "{}", stdout(&list));
    server.stop().await;
}

// === the store ===

fn new_run(company_id: CompanyId, environment_id: EnvironmentId) -> Run {
    let now = Timestamp::now();
    Run {
        id: RunId::new(),
        company_id,
        environment_id,
        lease_id: None,
        status: RunStatus::Queued,
        command: vec!["true".to_owned()],
        exit_code: None,
        signal: None,
        error: None,
        owner_node: "node-a".to_owned(),
        created_at: now,
        started_at: None,
        finished_at: None,
        heartbeat_at: now,
        cancel_requested: false,
    }
}

fn queued() -> NewRunEvent {
    NewRunEvent {
        at: Timestamp::now(),
        kind: EventKind::Status,
        data: json!({"status": "queued"}),
    }
}

async fn company_with_env(store: &Store, name: &str) -> (Company, Environment) {
    let company = Company {
        id: CompanyId::new(),
        name: name.to_owned(),
        created_at: Timestamp::now(),
        default_environment_id: None,
    };
    store.insert_company(&company).await.unwrap();
    let environment = Environment {
        id: EnvironmentId::new(),
        company_id: company.id,
        name: format!("{name}-sandbox"),
        description: None,
        driver: Driver::Sandbox,
        status: EnvironmentStatus::Active,
        config: serde_json::Map::new(),
        metadata: None,
        created_at: Timestamp::now(),
        updated_at: Timestamp::now(),
        revision: 0,
    };
    store.insert_environment(&environment).await.unwrap();
    (company, environment)
}

/// Makes every insert into `run_events` fail, as a crash or a lost connection between the two writes would.
async fn break_event_inserts(db: &TestDb) {
    match db.backend() {
        Backend::Sqlite => {
            let mut conn = SqliteConnection::connect(&db.url()).await.unwrap();
            sqlx::raw_sql(
                "CREATE TRIGGER break_events BEFORE INSERT ON run_events \
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
            )
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = PgConnection::connect(&db.url()).await.unwrap();
            sqlx::raw_sql(AssertSqlSafe(
                "CREATE FUNCTION break_events() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
                 CREATE TRIGGER break_events BEFORE INSERT ON run_events \
                 FOR EACH ROW EXECUTE FUNCTION break_events();"
                    .to_owned(),
            ))
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
        }
    }
}

async fn a_run_and_its_queued_event_are_stored_together(db: &TestDb) {
    let store = db.store();
    let (company, environment) = company_with_env(store, "acme").await;

    let run = new_run(company.id, environment.id);
    let stored = store
        .insert_run_with_events(&run, vec![queued()])
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].seq, 1);
    assert_eq!(store.get_run(run.id).await.unwrap().as_ref(), Some(&run));
    let events = store.list_events(run.id, 0, 10).await.unwrap();
    assert_eq!(events, stored);
    assert_eq!(events[0].data, json!({"status": "queued"}));
    // Later events follow densely.
    let next = store.append_events(run.id, vec![queued()]).await.unwrap();
    assert_eq!(next[0].seq, 2);

    // The same id again: the run insert fails, and no event is added to the first run's log.
    let error = store
        .insert_run_with_events(&run, vec![queued()])
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::Conflict(ConflictKind::Other)),
        "{error:?}"
    );
    assert_eq!(store.list_events(run.id, 0, 10).await.unwrap().len(), 2);

    // When the event cannot be written, the run is not stored either; two separate writes would leave the run.
    break_event_inserts(db).await;
    let atomic = new_run(company.id, environment.id);
    assert!(
        store
            .insert_run_with_events(&atomic, vec![queued()])
            .await
            .is_err()
    );
    assert_eq!(store.get_run(atomic.id).await.unwrap(), None, "rolled back");
    let separate = new_run(company.id, environment.id);
    store.insert_run(&separate).await.unwrap();
    assert!(
        store
            .append_events(separate.id, vec![queued()])
            .await
            .is_err()
    );
    assert!(
        store.get_run(separate.id).await.unwrap().is_some(),
        "the two-write path this replaces leaves a run without its first event"
    );
}

async fn a_default_environment_is_one_of_the_companys_and_outlives_no_delete(db: &TestDb) {
    let store = db.store();
    let (acme, sandbox) = company_with_env(store, "acme").await;
    let (_, foreign) = company_with_env(store, "other").await;

    let updated = store
        .set_default_environment(acme.id, Some(sandbox.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.default_environment_id, Some(sandbox.id));
    assert_eq!(
        store.get_company(acme.id).await.unwrap(),
        Some(updated.clone())
    );
    assert_eq!(
        store.list_companies().await.unwrap()[0].default_environment_id,
        Some(sandbox.id)
    );
    // Another company's environment, or none at all: not set, and the default stays.
    assert_eq!(
        store
            .set_default_environment(acme.id, Some(foreign.id))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .set_default_environment(acme.id, Some(EnvironmentId::new()))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .get_company(acme.id)
            .await
            .unwrap()
            .unwrap()
            .default_environment_id,
        Some(sandbox.id)
    );
    // An unknown company.
    assert_eq!(
        store
            .set_default_environment(CompanyId::new(), None)
            .await
            .unwrap(),
        None
    );

    // The database itself refuses to delete a default environment, whatever the API checked before.
    let error = store.delete_environment(sandbox.id).await.unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::Conflict(ConflictKind::EnvironmentIsDefault)
        ),
        "{error:?}"
    );
    assert_eq!(error.code(), "environment_is_default");
    assert!(store.get_environment(sandbox.id).await.unwrap().is_some());
    // Cleared, it deletes; other environments delete regardless.
    assert!(
        store
            .delete_environment(foreign.id)
            .await
            .unwrap()
            .is_some()
    );
    let cleared = store
        .set_default_environment(acme.id, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cleared.default_environment_id, None);
    assert!(
        store
            .delete_environment(sandbox.id)
            .await
            .unwrap()
            .is_some()
    );
    // Setting a deleted environment fails the same way as an unknown one.
    assert_eq!(
        store
            .set_default_environment(acme.id, Some(sandbox.id))
            .await
            .unwrap(),
        None
    );
}

macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            use crate::support::db::TestDb;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = TestDb::sqlite().await;
                super::$name(&db).await;
                db.cleanup().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let db = TestDb::postgres().await;
                super::$name(&db).await;
                db.cleanup().await;
            }
        }
    )+};
}

on_both_backends!(
    a_run_and_its_queued_event_are_stored_together,
    a_default_environment_is_one_of_the_companys_and_outlives_no_delete,
);
