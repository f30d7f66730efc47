//! The REST API through the real `berth` binary: every route's success and failure paths.

use std::os::unix::fs::PermissionsExt;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::server::{ServerOptions, TestServer};

fn ssh_config() -> Value {
    json!({"host": "build.internal", "username": "agent", "remoteWorkspacePath": "/srv/berth"})
}

/// A freshly generated OpenSSH private key (ssh keys are decoded at create and update, so a made-up one is refused).
fn generated_private_key() -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen (openssh-client)");
    assert!(status.success());
    std::fs::read_to_string(path).unwrap()
}

async fn create_env(server: &TestServer, company: &str, body: Value) -> Value {
    let (status, created) = server
        .post(&format!("/api/companies/{company}/environments"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

async fn environment_count(server: &TestServer, company: &str) -> usize {
    let (status, list) = server
        .get(&format!("/api/companies/{company}/environments"))
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list.as_array().unwrap().len()
}

fn assert_error(status: StatusCode, body: &Value, expected_status: StatusCode, code: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn health_and_readiness_need_no_token() {
    let server = TestServer::start().await;
    let (status, body) = server
        .raw(Method::GET, "/healthz", None, None, Vec::new())
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = server
        .raw(Method::GET, "/readyz", None, None, Vec::new())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn first_start_writes_a_private_admin_token_and_the_default_company() {
    let server = TestServer::start().await;
    let token_file = server.data_dir.join("admin-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let company = server.default_company().await;
    let (status, list) = server
        .get(&format!("/api/companies/{company}/environments"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["driver"], "local");
    assert_eq!(list[0]["name"], "Local");

    // A restart keeps the token and does not add a second company or local environment.
    let data_dir = server.data_dir.clone();
    let token = server.admin_token.clone();
    let temp_keeper = tempfile::tempdir().unwrap();
    let kept = temp_keeper.path().join("data");
    copy_dir(&data_dir, &kept);
    server.stop().await;
    let restarted = TestServer::start_with(ServerOptions {
        data_dir: Some(kept),
        ..Default::default()
    })
    .await;
    assert_eq!(restarted.admin_token, token);
    let (_, companies) = restarted.get("/api/companies").await;
    assert_eq!(companies.as_array().unwrap().len(), 1);
    assert_eq!(environment_count(&restarted, &company).await, 1);
    restarted.stop().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test]
async fn admin_token_from_the_environment_writes_no_file() {
    let token = "berth-test-admin-token-0123456789";
    let server = TestServer::start_with(ServerOptions {
        env: vec![("BERTH_ADMIN_TOKEN".into(), token.into())],
        ..Default::default()
    })
    .await;
    assert!(!server.data_dir.join("admin-token").exists());
    let (status, _) = server
        .call(Method::GET, "/api/companies", token, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn missing_forged_and_malformed_tokens_are_401() {
    let server = TestServer::start().await;
    let (status, body) = server
        .raw(Method::GET, "/api/companies", None, None, Vec::new())
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");
    for token in [
        "forged",
        "berth_key_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &"x".repeat(600),
    ] {
        let (status, body) = server
            .call(Method::GET, "/api/companies", token, None)
            .await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    let response = reqwest::Client::new()
        .get(format!("{}/api/companies", server.url))
        .header("authorization", format!("Basic {}", server.admin_token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    // A forged token on a mutation changes nothing.
    let company = server.default_company().await;
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/companies/{company}/environments"),
            "forged",
            Some(json!({"name": "x", "driver": "ssh", "config": ssh_config()})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(environment_count(&server, &company).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn companies_are_admin_only_unique_and_start_with_a_local_environment() {
    // With `--local-environments all`; the default policy is covered in `workspace_roots`.
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--local-environments".into(), "all".into()],
        ..Default::default()
    })
    .await;
    let acme = server.create_company("acme").await;
    let (status, body) = server.post("/api/companies", json!({"name": "acme"})).await;
    assert_error(status, &body, StatusCode::CONFLICT, "company_name_taken");
    let (status, body) = server.post("/api/companies", json!({"name": "  "})).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(body["error"]["details"][0]["path"], "name");

    let (status, list) = server
        .get(&format!("/api/companies/{acme}/environments"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list[0]["driver"], "local");

    let manager = server.create_key(&acme, "manager").await;
    let (status, body) = server
        .call(Method::GET, "/api/companies", &manager, None)
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, _) = server
        .call(
            Method::POST,
            "/api/companies",
            &manager,
            Some(json!({"name": "evil"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = server
        .post(
            &format!("/api/companies/{acme}/api-keys"),
            json!({"name": "k", "role": "owner"}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(body["error"]["details"][0]["path"], "role");
    let missing = uuid::Uuid::now_v7();
    let (status, _) = server
        .post(
            &format!("/api/companies/{missing}/api-keys"),
            json!({"name": "k", "role": "reader"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn deleted_keys_stop_working_at_once() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let (status, key) = server
        .post(
            &format!("/api/companies/{company}/api-keys"),
            json!({"name": "ci", "role": "manager"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = key["token"].as_str().unwrap();
    assert!(token.starts_with("berth_key_"));
    let (status, me) = server.call(Method::GET, "/api/whoami", token, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["apiKey"]["companyId"], company.as_str());
    assert!(me["apiKey"].get("token").is_none());
    let (_, admin) = server.get("/api/whoami").await;
    assert_eq!(admin["kind"], "admin");
    assert_eq!(admin["defaultCompany"]["id"], company.as_str());

    let (status, _) = server
        .delete(&format!("/api/api-keys/{}", key["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/companies/{company}/environments"),
            token,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server
        .delete(&format!("/api/api-keys/{}", key["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn an_environment_shows_its_last_probe_fully_to_managers_and_only_its_outcome_to_readers() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let reader = server.create_key(&company, "reader").await;
    let env = create_env(
        &server,
        &company,
        json!({"name": "probed", "driver": "sandbox", "config": {"provider": "fake"}}),
    )
    .await;
    let id = env["id"].as_str().unwrap();
    assert_eq!(env["lastProbe"], Value::Null, "{env}");
    let (_, never) = server.get(&format!("/api/environments/{id}")).await;
    assert_eq!(never["lastProbe"], Value::Null, "{never}");

    let (status, probe) = server
        .post(&format!("/api/environments/{id}/probe"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    assert_eq!(probe["ok"], true, "{probe}");

    let (_, seen) = server.get(&format!("/api/environments/{id}")).await;
    let last = &seen["lastProbe"];
    assert_eq!(last["ok"], true, "{seen}");
    assert_eq!(last["driver"], "sandbox");
    assert_eq!(last["summary"], probe["summary"]);
    assert_eq!(last["details"], probe["details"]);
    assert!(last["at"].as_str().unwrap().ends_with('Z'), "{last}");
    let (_, list) = server
        .get(&format!("/api/companies/{company}/environments"))
        .await;
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|environment| environment["id"] == id)
        .unwrap();
    assert_eq!(&listed["lastProbe"], last);

    // A reader learns when and whether, not what the probe found (its summary and details, like the config).
    for route in [
        format!("/api/environments/{id}"),
        format!("/api/companies/{company}/environments"),
    ] {
        let (status, body) = server.call(Method::GET, &route, &reader, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let environment = body.as_array().map_or(&body, |list| {
            list.iter()
                .find(|environment| environment["id"] == id)
                .unwrap()
        });
        let last = environment["lastProbe"].as_object().unwrap();
        let mut keys: Vec<&str> = last.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["at", "driver", "ok"], "{environment}");
    }

    // A failing probe is kept the same way: a host nobody listens on.
    let dead = create_env(
        &server,
        &company,
        json!({"name": "dead", "driver": "ssh", "config": {"host": "127.0.0.1", "port": 1, "username": "agent", "remoteWorkspacePath": "/srv/berth"}}),
    )
    .await;
    let dead_id = dead["id"].as_str().unwrap();
    let (_, failed) = server
        .post(&format!("/api/environments/{dead_id}/probe"), json!({}))
        .await;
    assert_eq!(failed["ok"], false, "{failed}");
    let (_, seen) = server.get(&format!("/api/environments/{dead_id}")).await;
    assert_eq!(seen["lastProbe"]["ok"], false, "{seen}");
    assert_eq!(seen["lastProbe"]["summary"], failed["summary"], "{seen}");
}

#[tokio::test]
async fn readers_see_redacted_config_and_cannot_mutate_or_read_leases() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let reader = server.create_key(&company, "reader").await;
    let env = create_env(&server, &company, json!({"name": "box", "driver": "ssh", "config": ssh_config(), "metadata": {"team": "infra"}})).await;
    let id = env["id"].as_str().unwrap();

    let (status, seen) = server
        .call(
            Method::GET,
            &format!("/api/environments/{id}"),
            &reader,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen["config"], json!({}));
    assert_eq!(seen["metadata"], Value::Null);
    assert_eq!(seen["configRedacted"], true);
    assert_eq!(seen["metadataRedacted"], true);
    let (_, list) = server
        .call(
            Method::GET,
            &format!("/api/companies/{company}/environments"),
            &reader,
            None,
        )
        .await;
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|env| env["config"] == json!({}) && env["configRedacted"] == true)
    );

    let attempts = [
        (
            Method::POST,
            format!("/api/companies/{company}/environments"),
            Some(json!({"name": "r", "driver": "ssh", "config": ssh_config()})),
        ),
        (
            Method::PATCH,
            format!("/api/environments/{id}"),
            Some(json!({"name": "renamed"})),
        ),
        (Method::DELETE, format!("/api/environments/{id}"), None),
        (Method::POST, format!("/api/environments/{id}/probe"), None),
        (
            Method::POST,
            format!("/api/companies/{company}/environments/probe-config"),
            Some(json!({"driver": "local"})),
        ),
        (Method::GET, format!("/api/environments/{id}/leases"), None),
    ];
    for (method, path, body) in attempts {
        let (status, body) = server.call(method.clone(), &path, &reader, body).await;
        assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    }
    let (_, unchanged) = server.get(&format!("/api/environments/{id}")).await;
    assert_eq!(unchanged["name"], "box");
    // Capabilities are readable by readers.
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/companies/{company}/environments/capabilities"),
            &reader,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn keys_are_confined_to_their_company() {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--local-environments".into(), "all".into()],
        ..Default::default()
    })
    .await;
    let home = server.default_company().await;
    let other = server.create_company("other").await;
    let manager = server.create_key(&home, "manager").await;
    let foreign = create_env(
        &server,
        &other,
        json!({"name": "theirs", "driver": "ssh", "config": ssh_config()}),
    )
    .await;
    let foreign_id = foreign["id"].as_str().unwrap();

    let attempts = [
        (
            Method::GET,
            format!("/api/companies/{other}/environments"),
            None,
        ),
        (
            Method::POST,
            format!("/api/companies/{other}/environments"),
            Some(json!({"name": "x", "driver": "ssh", "config": ssh_config()})),
        ),
        (Method::GET, format!("/api/environments/{foreign_id}"), None),
        (
            Method::PATCH,
            format!("/api/environments/{foreign_id}"),
            Some(json!({"name": "mine"})),
        ),
        (
            Method::DELETE,
            format!("/api/environments/{foreign_id}"),
            None,
        ),
        (
            Method::POST,
            format!("/api/environments/{foreign_id}/probe"),
            None,
        ),
        (
            Method::GET,
            format!("/api/environments/{foreign_id}/leases"),
            None,
        ),
        (
            Method::GET,
            format!("/api/companies/{other}/environments/capabilities"),
            None,
        ),
    ];
    for (method, path, body) in attempts {
        let (status, body) = server.call(method.clone(), &path, &manager, body).await;
        assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    }
    assert_eq!(environment_count(&server, &other).await, 2);
    let (_, still) = server.get(&format!("/api/environments/{foreign_id}")).await;
    assert_eq!(still["name"], "theirs");
    server.stop().await;
}

#[tokio::test]
async fn ssh_environments_get_defaults_and_secrets_never_come_back() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let private_key = generated_private_key();
    // The last line of the body: private key material, unlike the first (a header every ed25519 key shares).
    let key_body = private_key.lines().rev().nth(1).unwrap().to_owned();
    let mut config = ssh_config();
    config["privateKey"] = json!(private_key);
    config["password"] = json!("correct-horse-battery-staple");
    let created = create_env(
        &server,
        &company,
        json!({"name": "box", "driver": "ssh", "config": config}),
    )
    .await;
    let stored = &created["config"];
    assert_eq!(stored["port"], 22);
    assert_eq!(stored["strictHostKeyChecking"], true);
    assert_eq!(stored["workspaceMode"], "per_run");
    assert!(
        stored.get("privateKey").is_none() && stored.get("password").is_none(),
        "{stored}"
    );
    assert!(stored["privateKeySecretRef"].is_string());
    assert!(stored["passwordSecretRef"].is_string());

    let id = created["id"].as_str().unwrap();
    let (_, fetched) = server.get(&format!("/api/environments/{id}")).await;
    let (_, listed) = server
        .get(&format!("/api/companies/{company}/environments"))
        .await;
    for body in [&created, &fetched, &listed] {
        let text = body.to_string();
        assert!(
            !text.contains(&key_body) && !text.contains("correct-horse"),
            "{text}"
        );
    }
    // At rest: the database (and its WAL) hold only ciphertext.
    let mut files_checked = 0;
    for entry in std::fs::read_dir(&server.data_dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            let haystack = String::from_utf8_lossy(&bytes);
            assert!(
                !haystack.contains("correct-horse") && !haystack.contains(&key_body),
                "{:?}",
                entry.path()
            );
            files_checked += 1;
        }
    }
    assert!(files_checked >= 2, "expected the database and key files");
    let logs = server.stop().await;
    assert!(!logs.contains("correct-horse") && !logs.contains(&key_body));
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let path = format!("/api/companies/{company}/environments");
    let token = server.admin_token.clone();

    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"name": "x", "driver": "ssh", "config": {"host": "h", "username": "u", "remoteWorkspacePath": "relative"}}),
            "config.remoteWorkspacePath",
        ),
        (
            json!({"name": "x", "driver": "ssh", "config": {"host": "h", "username": "u", "remoteWorkspacePath": "/w", "port": 0}}),
            "config.port",
        ),
        (
            json!({"name": "x", "driver": "ssh", "config": {"host": "h", "username": "u", "remoteWorkspacePath": "/w", "port": 70000}}),
            "config.port",
        ),
        (json!({"name": "", "driver": "local"}), "name"),
        (json!({"name": "x", "driver": "docker"}), "driver"),
        (
            json!({"name": "x", "driver": "sandbox", "config": {"provider": "nope"}}),
            "config.provider",
        ),
        (
            json!({"name": "x", "driver": "sandbox", "config": {"provider": "fake", "image": ""}}),
            "config.image",
        ),
        (
            json!({"name": "x", "driver": "ssh", "config": {"host": "h", "username": "u", "remoteWorkspacePath": "/w", "bogus": 1}}),
            "config.bogus",
        ),
        (
            json!({"name": "x", "driver": "local", "status": "deleted"}),
            "status",
        ),
        (
            json!({"name": "x", "driver": "local", "metadata": [1]}),
            "metadata",
        ),
        (
            json!({"name": "x", "driver": "local", "surprise": true}),
            "surprise",
        ),
        (json!({"name": 12, "driver": "local"}), "name"),
        (json!({"driver": "local"}), "name"),
    ];
    for (body, expected_path) in cases {
        let (status, error) = server
            .call(Method::POST, &path, &token, Some(body.clone()))
            .await;
        assert_error(
            status,
            &error,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        );
        let paths: Vec<&str> = error["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&expected_path), "{body} -> {error}");
    }

    // Every problem is reported at once.
    let (_, error) = server
        .call(Method::POST, &path, &token, Some(json!({"name": " ", "driver": "ssh", "config": {"port": "22", "remoteWorkspacePath": "x"}})))
        .await;
    assert!(
        error["error"]["details"].as_array().unwrap().len() >= 4,
        "{error}"
    );

    let (status, error) = server
        .raw(
            Method::POST,
            &path,
            Some(&token),
            Some("application/json"),
            b"{\"name\": ".to_vec(),
        )
        .await;
    assert_error(status, &error, StatusCode::BAD_REQUEST, "malformed_json");
    let (status, error) = server
        .raw(
            Method::POST,
            &path,
            Some(&token),
            Some("application/json"),
            b"{} {}".to_vec(),
        )
        .await;
    assert_error(status, &error, StatusCode::BAD_REQUEST, "malformed_json");
    let (status, error) = server
        .raw(
            Method::POST,
            &path,
            Some(&token),
            Some("application/json"),
            Vec::new(),
        )
        .await;
    assert_error(status, &error, StatusCode::BAD_REQUEST, "malformed_json");
    let (status, error) = server
        .raw(
            Method::POST,
            &path,
            Some(&token),
            Some("text/plain"),
            b"{}".to_vec(),
        )
        .await;
    assert_error(
        status,
        &error,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (status, error) = server
        .raw(Method::POST, &path, Some(&token), None, b"{}".to_vec())
        .await;
    assert_error(
        status,
        &error,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let huge = json!({"name": "big", "driver": "local", "metadata": {"blob": "x".repeat(2 * 1024 * 1024)}});
    let (status, error) = server
        .raw(
            Method::POST,
            &path,
            Some(&token),
            Some("application/json"),
            serde_json::to_vec(&huge).unwrap(),
        )
        .await;
    assert_error(
        status,
        &error,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    assert_eq!(
        environment_count(&server, &company).await,
        1,
        "nothing was created"
    );
    server.stop().await;
}

#[tokio::test]
async fn ids_that_do_not_exist_or_cannot_exist_are_404() {
    let server = TestServer::start().await;
    let missing = uuid::Uuid::now_v7();
    for path in [
        format!("/api/environments/{missing}"),
        "/api/environments/not-an-id".to_owned(),
        "/api/environments/..%2F..%2Fetc".to_owned(),
        format!("/api/environment-leases/{missing}"),
        format!("/api/environments/{missing}/leases"),
        format!("/api/companies/{missing}/environments"),
        "/api/nothing-here".to_owned(),
    ] {
        let (status, body) = server.get(&path).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    }
    let (status, body) = server
        .patch(
            &format!("/api/environments/{missing}"),
            json!({"name": "x"}),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server.delete(&format!("/api/environments/{missing}")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = server
        .call(
            Method::PUT,
            "/api/companies",
            &server.admin_token,
            Some(json!({})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    server.stop().await;
}

#[tokio::test]
async fn a_second_local_environment_is_a_conflict() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let path = format!("/api/companies/{company}/environments");
    let (status, body) = server
        .post(&path, json!({"name": "Local 2", "driver": "local"}))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::CONFLICT,
        "local_environment_exists",
    );

    // Turning another environment into a local one conflicts too.
    let ssh = create_env(
        &server,
        &company,
        json!({"name": "box", "driver": "ssh", "config": ssh_config()}),
    )
    .await;
    let (status, body) = server
        .patch(
            &format!("/api/environments/{}", ssh["id"].as_str().unwrap()),
            json!({"driver": "local", "config": {}}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::CONFLICT,
        "local_environment_exists",
    );
    assert_eq!(environment_count(&server, &company).await, 2);

    // With the local one deleted, concurrent creates race on the database's unique index: exactly one wins.
    let (_, list) = server.get(&path).await;
    let local = list
        .as_array()
        .unwrap()
        .iter()
        .find(|env| env["driver"] == "local")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = server.delete(&format!("/api/environments/{local}")).await;
    assert_eq!(status, StatusCode::OK);
    let attempts = (0..16).map(|index| {
        let server = &server;
        let path = path.clone();
        async move {
            server
                .post(
                    &path,
                    json!({"name": format!("Local {index}"), "driver": "local"}),
                )
                .await
                .0
        }
    });
    let statuses = futures::future::join_all(attempts).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|status| **status == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|status| *status == StatusCode::CREATED || *status == StatusCode::CONFLICT)
    );
    server.stop().await;
}

#[tokio::test]
async fn patch_merges_same_driver_config_and_replaces_it_on_a_driver_change() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let mut config = ssh_config();
    config["privateKey"] = json!(generated_private_key());
    config["port"] = json!(2222);
    let created = create_env(
        &server,
        &company,
        json!({"name": "box", "driver": "ssh", "config": config, "description": "first"}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let old_secret: berth_core::ids::SecretId = created["config"]["privateKeySecretRef"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let store = server.open_store().await;
    assert!(store.get_secret(old_secret).await.unwrap().is_some());

    // Same driver: merged over the old config; `null` clears a field.
    let (status, patched) = server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"config": {"username": "robot", "knownHosts": null}, "description": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["config"]["username"], "robot");
    assert_eq!(patched["config"]["host"], "build.internal");
    assert_eq!(patched["config"]["port"], 2222);
    assert_eq!(
        patched["config"]["privateKeySecretRef"],
        old_secret.to_string()
    );
    assert_eq!(patched["description"], Value::Null);
    assert!(patched["updatedAt"].as_str().unwrap() >= created["updatedAt"].as_str().unwrap());

    // Invalid patches change nothing.
    let (status, _) = server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"config": {"port": 0}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = server
        .patch(&format!("/api/environments/{id}"), json!({"unknown": 1}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A secret reference cannot be borrowed from elsewhere.
    let (status, body) = server
        .patch(&format!("/api/environments/{id}"), json!({"config": {"privateKeySecretRef": berth_core::ids::SecretId::new().to_string()}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (_, unchanged) = server.get(&format!("/api/environments/{id}")).await;
    assert_eq!(unchanged["config"], patched["config"]);

    // A new inline key replaces the stored one, and the old secret is deleted.
    let (status, rekeyed) = server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"config": {"privateKey": generated_private_key()}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rekeyed}");
    let new_secret: berth_core::ids::SecretId = rekeyed["config"]["privateKeySecretRef"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(new_secret, old_secret);
    assert!(store.get_secret(old_secret).await.unwrap().is_none());

    // Driver changed: the config is replaced, secrets are never inherited, and the old one is deleted.
    let (status, sandbox) = server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"driver": "sandbox", "config": {"provider": "fake"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sandbox}");
    assert_eq!(
        sandbox["config"],
        json!({"provider": "fake", "reuseLease": false, "image": "fake:latest"})
    );
    assert!(store.get_secret(new_secret).await.unwrap().is_none());
    let (status, back) = server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"driver": "ssh", "config": ssh_config()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert!(
        back["config"].get("privateKeySecretRef").is_none(),
        "{back}"
    );
    let (status, _) = server
        .patch(&format!("/api/environments/{id}"), json!({"driver": "ssh"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"driver": "sandbox"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a new driver starts from an empty config: {body}"
    );
    store.close().await;
    server.stop().await;
}

#[tokio::test]
async fn delete_returns_the_environment_and_removes_its_secrets() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let mut config = ssh_config();
    config["password"] = json!("s3cret-password");
    let created = create_env(
        &server,
        &company,
        json!({"name": "doomed", "driver": "ssh", "config": config}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let secret: berth_core::ids::SecretId = created["config"]["passwordSecretRef"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, removed) = server.delete(&format!("/api/environments/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(removed["id"], id);
    assert_eq!(removed["name"], "doomed");
    let (status, _) = server.get(&format!("/api/environments/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let store = server.open_store().await;
    assert!(store.get_secret(secret).await.unwrap().is_none());
    store.close().await;
    server.stop().await;
}

#[tokio::test]
async fn probes_report_real_facts_and_never_throw() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let (_, list) = server
        .get(&format!("/api/companies/{company}/environments"))
        .await;
    let local = list[0]["id"].as_str().unwrap().to_owned();

    let (status, probe) = server
        .post(&format!("/api/environments/{local}/probe"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    assert_eq!(probe["ok"], true, "{probe}");
    assert_eq!(probe["driver"], "local");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(probe["details"]["hostname"], hostname.trim());
    assert!(probe["summary"].as_str().unwrap().contains(hostname.trim()));

    let sandbox = create_env(
        &server,
        &company,
        json!({"name": "fake", "driver": "sandbox", "config": {"provider": "fake"}}),
    )
    .await;
    let (_, probe) = server
        .post(
            &format!(
                "/api/environments/{}/probe",
                sandbox["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(probe["ok"], true, "{probe}");
    assert_eq!(probe["driver"], "sandbox");

    // A plugin driver must be installed to validate its config: refused with what is installed.
    let (status, refused) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "plug", "driver": "plugin", "config": {"pluginKey": "acme", "driverKey": "vm"}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert!(
        refused.to_string().contains("config.driverKey") && refused.to_string().contains("acme"),
        "{refused}"
    );

    // Unsaved configs: probed, nothing persisted, not even an inline secret.
    let store = server.open_store().await;
    let before = environment_count(&server, &company).await;
    let path = format!("/api/companies/{company}/environments/probe-config");
    let (status, probe) = server
        .post(
            &path,
            json!({"driver": "sandbox", "config": {"provider": "fake", "image": "fake:2"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(probe["ok"], true);
    assert_eq!(probe["details"]["image"], "fake:2", "{probe}");
    let mut with_key = ssh_config();
    with_key["password"] = json!("probe-only-password");
    let (status, probe) = server
        .post(
            &path,
            json!({"driver": "ssh", "config": with_key, "name": "draft"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    let (status, body) = server
        .post(&path, json!({"driver": "ssh", "config": {"host": ""}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(environment_count(&server, &company).await, before);
    let activity = store.list_activity(company.parse().unwrap()).await.unwrap();
    assert!(
        activity
            .iter()
            .any(|entry| entry.action == "environment.probed_unsaved")
    );
    assert!(
        activity
            .iter()
            .any(|entry| entry.action == "environment.probed")
    );
    store.close().await;
    let logs = server.stop().await;
    assert!(!logs.contains("probe-only-password"));
}

#[tokio::test]
async fn capabilities_list_drivers_and_providers_with_schemas() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let (status, capabilities) = server
        .get(&format!(
            "/api/companies/{company}/environments/capabilities"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    for driver in ["local", "ssh", "sandbox", "plugin"] {
        assert!(
            capabilities["drivers"][driver]["status"].is_string(),
            "{capabilities}"
        );
    }
    assert_eq!(capabilities["drivers"]["local"]["status"], "supported");
    let fake = &capabilities["sandboxProviders"]["fake"];
    assert_eq!(fake["source"], "builtin");
    assert_eq!(fake["status"], "ready");
    let isolated = &capabilities["sandboxProviders"]["isolated"];
    assert_eq!(isolated["source"], "builtin");
    assert_eq!(isolated["status"], "ready", "{capabilities}");
    assert_eq!(isolated["supportsReusableLeases"], true);
    assert_eq!(
        isolated["configSchema"]["properties"]["network"]["enum"][0],
        "none"
    );
    assert_eq!(fake["supportsReusableLeases"], true);
    assert_eq!(
        fake["configSchema"]["properties"]["image"]["default"],
        "fake:latest"
    );
    server.stop().await;
}

#[tokio::test]
async fn lists_filter_by_status_and_driver_newest_update_first() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let path = format!("/api/companies/{company}/environments");
    let first = create_env(
        &server,
        &company,
        json!({"name": "a", "driver": "ssh", "config": ssh_config()}),
    )
    .await;
    let second = create_env(&server, &company, json!({"name": "b", "driver": "sandbox", "config": {"provider": "fake"}, "status": "archived"})).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let (_, touched) = server
        .patch(
            &format!("/api/environments/{}", first["id"].as_str().unwrap()),
            json!({"name": "a2"}),
        )
        .await;

    let (_, all) = server.get(&path).await;
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|env| env["name"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "a2", "{names:?}");
    assert_eq!(touched["name"], "a2");
    let (_, archived) = server.get(&format!("{path}?status=archived")).await;
    assert_eq!(archived.as_array().unwrap().len(), 1);
    assert_eq!(archived[0]["id"], second["id"]);
    let (_, sandboxes) = server.get(&format!("{path}?driver=sandbox&status=")).await;
    assert_eq!(sandboxes.as_array().unwrap().len(), 1);
    let (status, body) = server.get(&format!("{path}?status=bogus")).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    server.stop().await;
}

#[tokio::test]
async fn lease_routes_answer_before_any_run() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = create_env(
        &server,
        &company,
        json!({"name": "s", "driver": "sandbox", "config": {"provider": "fake"}}),
    )
    .await;
    let (status, leases) = server
        .get(&format!(
            "/api/environments/{}/leases",
            env["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!((status, leases), (StatusCode::OK, json!([])));
    let (status, body) = server
        .get(&format!(
            "/api/environments/{}/leases?status=nope",
            env["id"].as_str().unwrap()
        ))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    server.stop().await;
}

#[tokio::test]
async fn activity_records_changes_without_config_values() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let mut config = ssh_config();
    config["host"] = json!("very-distinctive-host.example");
    let env = create_env(
        &server,
        &company,
        json!({"name": "audited", "driver": "ssh", "config": config}),
    )
    .await;
    let id = env["id"].as_str().unwrap();
    server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"config": {"username": "distinctive-user"}}),
        )
        .await;
    server
        .post(&format!("/api/environments/{id}/probe"), json!({}))
        .await;
    server.delete(&format!("/api/environments/{id}")).await;

    let store = server.open_store().await;
    let activity = store.list_activity(company.parse().unwrap()).await.unwrap();
    let actions: Vec<&str> = activity
        .iter()
        .filter(|entry| entry.entity_id == id)
        .map(|entry| entry.action.as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "environment.created",
            "environment.updated",
            "environment.probed",
            "environment.deleted"
        ]
    );
    let updated = activity
        .iter()
        .find(|entry| entry.action == "environment.updated")
        .unwrap();
    assert_eq!(updated.details["changedFields"], json!(["config"]));
    assert_eq!(updated.actor, "admin");
    let rendered = format!("{activity:?}");
    assert!(
        !rendered.contains("very-distinctive-host") && !rendered.contains("distinctive-user"),
        "{rendered}"
    );

    // The same log through the API: oldest first, paged by the last id seen, readable by the company's keys only.
    let route = format!("/api/companies/{company}/activity");
    let (status, listed) = server.get(&route).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), activity.len());
    let ours: Vec<&Value> = listed
        .iter()
        .filter(|entry| entry["entityId"] == id)
        .collect();
    assert_eq!(ours[1]["action"], "environment.updated");
    assert_eq!(ours[1]["actor"], "admin");
    assert_eq!(ours[1]["entityType"], "environment");
    assert_eq!(ours[1]["details"]["changedFields"], json!(["config"]));
    assert_eq!(ours[1]["companyId"], company.as_str());
    assert!(ours[1]["createdAt"].as_str().unwrap().ends_with('Z'));
    let rendered = Value::Array(listed.clone()).to_string();
    assert!(
        !rendered.contains("very-distinctive-host") && !rendered.contains("distinctive-user"),
        "{rendered}"
    );
    let first_id = listed[0]["id"].as_i64().unwrap();
    let (_, page) = server
        .get(&format!("{route}?after={first_id}&limit=2"))
        .await;
    let page: Vec<i64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        page,
        [
            listed[1]["id"].as_i64().unwrap(),
            listed[2]["id"].as_i64().unwrap()
        ]
    );
    let (status, error) = server.get(&format!("{route}?limit=0")).await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    let reader = server.create_key(&company, "reader").await;
    let (status, as_reader) = server.call(Method::GET, &route, &reader, None).await;
    assert_eq!(status, StatusCode::OK);
    // The reader sees the same log (plus the entry its own creation added).
    assert_eq!(as_reader.as_array().unwrap().len(), listed.len() + 1);
    let other = server.create_company("elsewhere").await;
    let outsider = server.create_key(&other, "manager").await;
    let (status, error) = server.call(Method::GET, &route, &outsider, None).await;
    assert_error(status, &error, StatusCode::FORBIDDEN, "forbidden");
    let (status, theirs) = server
        .call(
            Method::GET,
            &format!("/api/companies/{other}/activity"),
            &outsider,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        theirs
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["companyId"] == other.as_str())
    );
    let (status, error) = server
        .get(&format!("/api/companies/{}/activity", uuid::Uuid::now_v7()))
        .await;
    assert_error(status, &error, StatusCode::NOT_FOUND, "not_found");
    store.close().await;
    server.stop().await;
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let token = std::fs::read_to_string(server.data_dir.join("admin-token")).unwrap();
    let kept = http
        .get(format!("{}/api/whoami", server.url))
        .bearer_auth(token.trim())
        .header("x-request-id", "trace-42:abc")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.headers()["x-request-id"], "trace-42:abc");
    // Errors carry one too, and an id that could forge a log line is replaced.
    for hostile in ["has space", "quote\"", &"x".repeat(129)] {
        let response = http
            .get(format!("{}/api/whoami", server.url))
            .header("x-request-id", hostile)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(id, hostile);
        assert!(id.parse::<uuid::Uuid>().is_ok(), "{id}");
    }
    let made = http
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    let first = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    let again = http
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_ne!(
        again.headers()["x-request-id"].to_str().unwrap(),
        first,
        "a fresh id per request"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_whole_flow_works_on_postgres() {
    let db = crate::support::db::TestDb::postgres().await;
    let server = TestServer::start_with(ServerOptions {
        database_url: Some(db.url()),
        ..Default::default()
    })
    .await;
    let company = server.default_company().await;
    let manager = server.create_key(&company, "manager").await;
    let env = server
        .call(
            Method::POST,
            &format!("/api/companies/{company}/environments"),
            &manager,
            Some(json!({"name": "pg", "driver": "sandbox", "config": {"provider": "fake"}})),
        )
        .await;
    assert_eq!(env.0, StatusCode::CREATED, "{}", env.1);
    let id = env.1["id"].as_str().unwrap();
    let (status, _) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "L", "driver": "local"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, probe) = server
        .call(
            Method::POST,
            &format!("/api/environments/{id}/probe"),
            &manager,
            None,
        )
        .await;
    assert_eq!((status, probe["ok"].clone()), (StatusCode::OK, json!(true)));
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/environments/{id}"),
            &manager,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, ready) = server
        .raw(Method::GET, "/readyz", None, None, Vec::new())
        .await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    server.stop().await;
    db.cleanup().await;
}

/// The one problem of a 422, as `(path, message)`.
fn only_problem(status: StatusCode, error: &Value) -> (String, String) {
    assert_error(
        status,
        error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    let details = error["error"]["details"].as_array().unwrap();
    assert_eq!(details.len(), 1, "{error}");
    (
        details[0]["path"].as_str().unwrap().to_owned(),
        details[0]["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn control_characters_in_text_fields_are_422_and_never_echoed() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let envs = format!("/api/companies/{company}/environments");
    let existing = create_env(
        &server,
        &company,
        json!({"name": "docs box", "driver": "ssh", "config": ssh_config()}),
    )
    .await;
    let existing_path = format!("/api/environments/{}", existing["id"].as_str().unwrap());
    let bad_texts = [
        "nul\u{0}inside",
        "esc\u{1b}[31mred",
        "two\nlines",
        "tab\there",
        "del\u{7f}x",
        "c1\u{85}x",
    ];
    for bad in bad_texts {
        let cases = [
            (
                Method::POST,
                envs.clone(),
                json!({"name": bad, "driver": "ssh", "config": ssh_config()}),
                "name",
            ),
            (
                Method::POST,
                envs.clone(),
                json!({"name": "ok", "description": bad, "driver": "ssh", "config": ssh_config()}),
                "description",
            ),
            (
                Method::PATCH,
                existing_path.clone(),
                json!({"description": bad}),
                "description",
            ),
            (
                Method::PATCH,
                existing_path.clone(),
                json!({"name": bad}),
                "name",
            ),
            (
                Method::POST,
                format!("{envs}/probe-config"),
                json!({"driver": "ssh", "config": ssh_config(), "description": bad}),
                "description",
            ),
            (
                Method::POST,
                "/api/companies".to_owned(),
                json!({"name": bad}),
                "name",
            ),
            (
                Method::POST,
                format!("/api/companies/{company}/api-keys"),
                json!({"name": bad, "role": "reader"}),
                "name",
            ),
        ];
        for (method, path, body, expected_path) in cases {
            let (status, error) = server
                .call(
                    method.clone(),
                    &path,
                    &server.admin_token,
                    Some(body.clone()),
                )
                .await;
            let (found_path, message) = only_problem(status, &error);
            assert_eq!(
                found_path, expected_path,
                "{method} {path} {body} -> {error}"
            );
            assert!(message.contains("control characters"), "{error}");
            // Nothing in the error repeats the value, raw or JSON-escaped.
            let escaped = json!(bad).to_string();
            assert!(!message.contains(bad), "{error}");
            assert!(
                !error.to_string().contains(escaped.trim_matches('"')),
                "{error}"
            );
        }
    }
    // Nothing was created or changed.
    assert_eq!(environment_count(&server, &company).await, 2);
    let (_, stored) = server.get(&existing_path).await;
    assert_eq!(stored["name"], "docs box");
    assert_eq!(stored["description"], Value::Null);

    // Whitespace around a description is trimmed, not refused; ordinary text, accents included, passes.
    let (status, patched) = server
        .patch(
            &existing_path,
            json!({"description": "  builds the docs — vite\n"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["description"], "builds the docs — vite");
    server.stop().await;
}

#[tokio::test]
async fn bodies_of_the_wrong_json_type_are_described_in_json_terms() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let envs = format!("/api/companies/{company}/environments");
    let cases = [
        (
            json!([]),
            "",
            "the body must be a JSON object, not an array",
        ),
        (
            json!(["x", "ssh"]),
            "",
            "the body must be a JSON object, not an array",
        ),
        (
            json!("x"),
            "",
            "the body must be a JSON object, not a string",
        ),
        (json!(1), "", "the body must be a JSON object, not a number"),
        (
            json!(true),
            "",
            "the body must be a JSON object, not a boolean",
        ),
        (Value::Null, "", "the body must be a JSON object, not null"),
        (
            json!({"name": ["x"], "driver": "ssh"}),
            "name",
            "must be a string, not an array",
        ),
        (
            json!({"name": "x", "driver": {"kind": "ssh"}}),
            "driver",
            "must be a string, not an object",
        ),
    ];
    for (body, expected_path, expected_message) in cases {
        let (status, error) = server.post(&envs, body.clone()).await;
        let (path, message) = only_problem(status, &error);
        assert_eq!(
            (path.as_str(), message.as_str()),
            (expected_path, expected_message),
            "{body} -> {error}"
        );
        let text = error["error"]["message"].as_str().unwrap();
        for rust in ["::", "struct", "Request", "sequence", "u32", "u64"] {
            assert!(!text.contains(rust), "{body} -> {error}");
        }
    }
    // The same on the other bodies, nested fields included.
    let runs = format!("/api/companies/{company}/runs");
    let more = [
        ("/api/companies".to_owned(), json!([])),
        (runs.clone(), json!([["true"]])),
        (runs.clone(), json!({"command": ["true"], "timeoutMs": -5})),
        (runs.clone(), json!({"command": ["true"], "timeoutMs": "5"})),
        (runs.clone(), json!({"command": ["true"], "workspace": []})),
        (runs.clone(), json!({"command": "true"})),
    ];
    for (path, body) in more {
        let (status, error) = server.post(&path, body.clone()).await;
        only_problem(status, &error);
        let text = error["error"]["message"].as_str().unwrap();
        assert!(text.contains("must be"), "{body} -> {error}");
        for rust in ["::", "struct", "Request", "sequence", "u32", "u64"] {
            assert!(!text.contains(rust), "{body} -> {error}");
        }
    }
    assert_eq!(environment_count(&server, &company).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn page_limits_outside_one_to_ten_thousand_are_422() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let run =
        crate::support::runs::start_run(&server, &company, json!({"command": ["true"]})).await;
    crate::support::runs::wait_run(&server, &run, std::time::Duration::from_secs(30)).await;
    let lists = [
        format!("/api/companies/{company}/runs"),
        format!("/api/runs/{run}/events"),
    ];
    for list in &lists {
        for limit in ["0", "-1", "10001", "1000000000"] {
            let (status, error) = server.get(&format!("{list}?limit={limit}")).await;
            let (path, message) = only_problem(status, &error);
            assert_eq!(path, "limit", "{list} {limit}: {error}");
            assert_eq!(message, "must be between 1 and 10000", "{list} {limit}");
        }
        // The bounds themselves are fine; a limit of 1 returns exactly one row.
        let (status, page) = server.get(&format!("{list}?limit=1")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page.as_array().unwrap().len(), 1, "{page}");
        let (status, page) = server.get(&format!("{list}?limit=10000")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let (status, page) = server.get(list).await;
        assert_eq!(status, StatusCode::OK, "{page}");
    }
    // The event stream refuses a bad limit the same way rather than ignoring it.
    let response = reqwest::Client::new()
        .get(format!("{}/api/runs/{run}/events?limit=0", server.url))
        .bearer_auth(&server.admin_token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    server.stop().await;
}
