//! SSH environments against a real OpenSSH sshd on loopback: probes, host keys, credentials, secrets at the moment
//! of use.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::server::TestServer;
use crate::support::sshd::TestSshd;

/// A second, unrelated key pair, for "wrong key" and "changed host key".
fn other_key_pair() -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let private = std::fs::read_to_string(&path).unwrap();
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (
        private,
        public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

async fn probe_config(server: &TestServer, config: Value) -> Value {
    let company = server.default_company().await;
    let (status, result) = server
        .post(
            &format!("/api/companies/{company}/environments/probe-config"),
            json!({"driver": "ssh", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{result}");
    result
}

#[tokio::test]
async fn a_saved_ssh_environment_probes_with_its_encrypted_key() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let mut config = sshd.config();
    config["remoteWorkspacePath"] = json!(sshd.workspace.join("probe-made-this").to_str().unwrap());
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "lab", "driver": "ssh", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    assert!(env["config"].get("privateKey").is_none());
    let (_, result) = server
        .post(
            &format!("/api/environments/{}/probe", env["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(result["ok"], true, "{result}");
    let details = &result["details"];
    assert_eq!(details["os"], "Linux");
    assert_eq!(details["tar"], true);
    assert_eq!(details["hostKeyPinned"], true);
    assert!(
        details["hostKeyFingerprint"]
            .as_str()
            .unwrap()
            .starts_with("SHA256:")
    );
    assert!(details["freeDiskBytes"].as_u64().unwrap() > 0);
    assert!(details["roundTripMs"].as_f64().is_some());
    assert!(
        sshd.workspace.join("probe-made-this").is_dir(),
        "the probe prepares the workspace"
    );
    let logs = server.stop().await;
    let key_body: String = sshd.user_key.lines().nth(1).unwrap().to_owned();
    assert!(
        !logs.contains(&key_body),
        "the private key reached the logs"
    );
}

#[tokio::test]
async fn host_keys_and_credentials_are_checked_with_clear_summaries() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let (other_private, other_public) = other_key_pair();

    let result = probe_config(&server, sshd.config()).await;
    assert_eq!(result["ok"], true, "{result}");

    let mut wrong_key = sshd.config();
    wrong_key["privateKey"] = json!(other_private);
    let result = probe_config(&server, wrong_key).await;
    assert_eq!(result["ok"], false);
    assert!(
        result["summary"]
            .as_str()
            .unwrap()
            .contains("authentication refused"),
        "{result}"
    );

    let mut changed = sshd.config();
    changed["knownHosts"] = json!(format!("[127.0.0.1]:{} {other_public}", sshd.port));
    let result = probe_config(&server, changed).await;
    assert_eq!(result["ok"], false);
    let summary = result["summary"].as_str().unwrap();
    assert!(
        summary.contains("host key mismatch") && summary.contains("SHA256:"),
        "{summary}"
    );

    let mut unknown = sshd.config();
    unknown.as_object_mut().unwrap().remove("knownHosts");
    let result = probe_config(&server, unknown.clone()).await;
    assert_eq!(result["ok"], false);
    let summary = result["summary"].as_str().unwrap();
    assert!(
        summary.contains("unknown host key") && summary.contains("SHA256:"),
        "{summary}"
    );

    unknown["strictHostKeyChecking"] = json!(false);
    let result = probe_config(&server, unknown).await;
    assert_eq!(
        result["ok"], true,
        "not strict: an unpinned key is accepted: {result}"
    );
    assert_eq!(result["details"]["hostKeyPinned"], false);

    let mut no_credentials = sshd.config();
    no_credentials.as_object_mut().unwrap().remove("privateKey");
    let result = probe_config(&server, no_credentials).await;
    assert_eq!(result["ok"], false);
    server.stop().await;
}

#[tokio::test]
async fn a_dead_port_fails_fast() {
    let sshd = TestSshd::start();
    let port = sshd.port;
    sshd.stop();
    let server = TestServer::start().await;
    let mut config = json!({"host": "127.0.0.1", "port": port, "username": "nobody", "remoteWorkspacePath": "/tmp/x"});
    config["password"] = json!("irrelevant");
    let started = Instant::now();
    let result = probe_config(&server, config).await;
    assert_eq!(result["ok"], false);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        result["summary"]
            .as_str()
            .unwrap()
            .starts_with("cannot connect to nobody@127.0.0.1:"),
        "{result}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_truncated_or_undecodable_key_is_refused_at_create_and_patch_without_quoting_it() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let key_lines: Vec<&str> = sshd.user_key.lines().collect();
    // The first half of a real key: its armour begins well, its body stops short. Its last line is key material of
    // this key (the first body line is a header every ed25519 key shares).
    let truncated = key_lines[..key_lines.len() / 2].join("\n");
    let secret_body = key_lines[key_lines.len() / 2 - 1].to_owned();
    assert!(key_lines.len() / 2 > 2, "{}", key_lines.len());

    let mut config = sshd.config();
    config["privateKey"] = json!(truncated);
    let (status, problem) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "truncated", "driver": "ssh", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    let text = problem.to_string();
    assert!(text.contains("config.privateKey"), "{text}");
    assert!(text.contains("cannot be read"), "{text}");
    assert!(
        !text.contains(&secret_body),
        "the key reached the answer: {text}"
    );

    // A pinned host key that does not parse is named by its line.
    let mut config = sshd.config();
    config["knownHosts"] = json!(format!(
        "{}\n[127.0.0.1]:22 ssh-ed25519 not-base64!",
        sshd.known_hosts
    ));
    let (status, problem) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "bad-pin", "driver": "ssh", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert!(
        problem.to_string().contains("config.knownHosts"),
        "{problem}"
    );
    assert!(problem.to_string().contains("line 2"), "{problem}");

    // A good environment, then a patch that would break its key: refused, and the stored key still works.
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "good", "driver": "ssh", "config": sshd.config()}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let id = env["id"].as_str().unwrap();
    let (status, problem) = server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"config": {"privateKey": truncated}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert!(
        problem.to_string().contains("config.privateKey"),
        "{problem}"
    );
    assert!(!problem.to_string().contains(&secret_body), "{problem}");
    // A patch that leaves the stored key alone is judged with it, opened: accepted.
    let (status, patched) = server
        .patch(
            &format!("/api/environments/{id}"),
            json!({"config": {"strictHostKeyChecking": true}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    let (_, result) = server
        .post(&format!("/api/environments/{id}/probe"), json!({}))
        .await;
    assert_eq!(result["ok"], true, "{result}");
    let logs = server.stop().await;
    assert!(
        !logs.contains(&secret_body),
        "the private key reached the logs"
    );
}
