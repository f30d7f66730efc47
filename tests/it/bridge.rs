//! The callback bridge end to end: a real agent inside a real run calls back through `BERTH_API_URL`; what it can and
//! cannot reach; signed forwarding checked by the server; fronting another control plane with a policy profile.

use std::time::Duration;

use axum::routing::any;
use berth_bridge::signing::{
    BridgeSecrets, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign,
};
use berth_core::ids::RunId;
use berth_core::time::Timestamp;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::support::runs::{all_events, start_run, text_of, wait_run, wait_status};
use crate::support::server::{ServerOptions, TestServer};

/// The shell an agent would run: call back, report progress, try what it must not.
const AGENT: &str = r#"
set -u
curl -fsS -H "Authorization: Bearer $BERTH_API_TOKEN" "$BERTH_API_URL/api/agent/run" > run.json
printf 'run: %s\n' "$(cat run.json)"  # not echo: dash's echo would expand the JSON's \n escapes
curl -fsS -X POST -H "Authorization: Bearer $BERTH_API_TOKEN" -H 'Content-Type: application/json' \
  -d '{"message": "halfway there", "data": {"step": 2}}' "$BERTH_API_URL/api/agent/events" > /dev/null
echo "denied: $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $BERTH_API_TOKEN" "$BERTH_API_URL/api/companies")"
echo "forged: $(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer brc1.forged' "$BERTH_API_URL/api/agent/run")"
echo "direct: $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $BERTH_API_TOKEN" "$SERVER_URL/api/companies")"
echo "direct-agent: $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $BERTH_API_TOKEN" "$SERVER_URL/api/agent/run")"
echo "url: $BERTH_API_URL"
"#;

#[tokio::test]
async fn an_agent_in_a_run_calls_back_through_the_bridge() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", AGENT], "env": {"SERVER_URL": server.url}}),
    )
    .await;
    let run = wait_run(&server, &run_id, Duration::from_secs(60)).await;
    let events = all_events(&server, &run_id).await;
    let stdout = text_of(&events, "stdout");
    assert_eq!(
        run["status"],
        "succeeded",
        "{run}\n{stdout}\n{}",
        text_of(&events, "stderr")
    );

    let line = |prefix: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {stdout}"))
            .to_owned()
    };
    let seen: Value = serde_json::from_str(&line("run: ")).unwrap();
    assert_eq!(seen["id"], run_id.as_str());
    assert_eq!(seen["status"], "running");
    assert_eq!(line("denied: "), "403");
    assert_eq!(line("forged: "), "401");
    assert_eq!(
        line("direct: "),
        "401",
        "the run credential is worthless against the server itself"
    );
    assert_eq!(
        line("direct-agent: "),
        "401",
        "agent routes take only signed bridge requests"
    );

    let agent = events
        .iter()
        .find(|event| event["type"] == "agent")
        .expect("an agent event");
    assert_eq!(agent["data"]["message"], "halfway there");
    assert_eq!(agent["data"]["data"]["step"], 2);
    let audited: Vec<(String, String, i64)> = events
        .iter()
        .filter(|event| event["type"] == "bridge")
        .map(|event| {
            (
                event["data"]["method"].as_str().unwrap().to_owned(),
                event["data"]["path"].as_str().unwrap().to_owned(),
                event["data"]["status"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(
        audited.contains(&("GET".into(), "/api/agent/run".into(), 200)),
        "{audited:?}"
    );
    assert!(
        audited.contains(&("POST".into(), "/api/agent/events".into(), 202)),
        "{audited:?}"
    );
    assert!(
        audited.contains(&("GET".into(), "/api/companies".into(), 403)),
        "{audited:?}"
    );
    assert!(
        audited
            .iter()
            .any(|(_, path, status)| path == "/api/agent/run" && *status == 401),
        "{audited:?}"
    );
    // What berth itself wrote (not the agent's own output) never holds a credential.
    let berth_events: Vec<&Value> = events
        .iter()
        .filter(|event| !matches!(event["type"].as_str(), Some("stdout" | "stderr")))
        .collect();
    let rendered = serde_json::to_string(&berth_events).unwrap();
    assert!(
        !rendered.contains("brc1.") && !rendered.contains("bru1."),
        "a credential in berth's events: {rendered}"
    );
    assert_eq!(
        events.last().unwrap()["data"]["status"],
        "succeeded",
        "the final event comes after every bridge event"
    );

    // Nothing listens after the run.
    let url = line("url: ");
    let address = url.trim_start_matches("http://");
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the bridge still listens at {address}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_run_environment_holds_no_server_token() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let run_id = start_run(&server, &company, json!({"command": ["/usr/bin/env"]})).await;
    wait_run(&server, &run_id, Duration::from_secs(30)).await;
    let environment = text_of(&all_events(&server, &run_id).await, "stdout");
    let master_key = std::fs::read_to_string(server.data_dir.join("master-key")).unwrap();
    assert!(!environment.contains(&server.admin_token), "{environment}");
    assert!(!environment.contains(master_key.trim()), "{environment}");
    assert!(
        !environment.contains("bru1."),
        "the upstream credential stays with the bridge"
    );
    let value = |name: &str| {
        environment
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    assert!(
        value("BERTH_API_TOKEN").is_some_and(|token| token.starts_with("brc1.")),
        "{environment}"
    );
    assert!(
        value("BERTH_API_URL").is_some_and(|url| url.starts_with("http://127.0.0.1:")),
        "{environment}"
    );
    assert_eq!(value("BERTH_RUN_ID").as_deref(), Some(run_id.as_str()));

    // `bridge: false`: no bridge variables at all.
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["/usr/bin/env"], "bridge": false}),
    )
    .await;
    wait_run(&server, &run_id, Duration::from_secs(30)).await;
    let environment = text_of(&all_events(&server, &run_id).await, "stdout");
    assert!(!environment.contains("BERTH_"), "{environment}");
    server.stop().await;
}

/// The server's own checks on the agent routes, with requests signed as the bridge would.
#[tokio::test]
async fn the_server_verifies_signatures_and_refuses_replays() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let run_id = start_run(&server, &company, json!({"command": ["sleep", "30"]})).await;
    wait_status(&server, &run_id, "running").await;
    let run: RunId = run_id.parse().unwrap();
    let cipher =
        berth_server::secrets::SecretCipher::load_or_create(&server.data_dir, None).unwrap();
    let secrets = BridgeSecrets::new(cipher.bridge_secret()).unwrap();
    let token = secrets.upstream_token(run);
    let key = secrets.signing_key(run);
    let http = reqwest::Client::new();
    let path = "/api/agent/events";
    let send = |body: &'static str, headers: berth_bridge::signing::SignatureHeaders| {
        http.post(format!("{}{path}", server.url))
            .bearer_auth(token.expose_secret())
            .header("content-type", "application/json")
            .header(HEADER_TIMESTAMP, headers.timestamp.to_string())
            .header(HEADER_NONCE, headers.nonce)
            .header(HEADER_SIGNATURE, headers.signature)
            .body(body)
            .send()
    };
    let body = r#"{"message": "signed"}"#;
    let signed = sign(&key, "POST", path, body.as_bytes(), Timestamp::now());
    let response = send(body, signed.clone()).await.unwrap();
    let status = response.status();
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        response.text().await.unwrap()
    );
    let replay = send(body, signed.clone()).await.unwrap();
    assert_eq!(
        replay.status(),
        StatusCode::UNAUTHORIZED,
        "a replayed nonce is refused"
    );
    let tampered = send(
        r#"{"message": "tampered"}"#,
        sign(&key, "POST", path, body.as_bytes(), Timestamp::now()),
    )
    .await
    .unwrap();
    assert_eq!(
        tampered.status(),
        StatusCode::UNAUTHORIZED,
        "a body that does not match the signature is refused"
    );
    let stale_time = Timestamp::from_unix_millis(Timestamp::now().unix_millis() - 3_600_000);
    let stale = send(body, sign(&key, "POST", path, body.as_bytes(), stale_time))
        .await
        .unwrap();
    assert_eq!(
        stale.status(),
        StatusCode::UNAUTHORIZED,
        "a stale timestamp is refused"
    );
    let other_key = secrets.signing_key(RunId::new());
    let wrong = send(
        body,
        sign(&other_key, "POST", path, body.as_bytes(), Timestamp::now()),
    )
    .await
    .unwrap();
    assert_eq!(
        wrong.status(),
        StatusCode::UNAUTHORIZED,
        "another run's key does not sign for this one"
    );
    let unsigned = http
        .get(format!("{}/api/agent/run", server.url))
        .bearer_auth(token.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);

    let events = all_events(&server, &run_id).await;
    let agent: Vec<&Value> = events
        .iter()
        .filter(|event| event["type"] == "agent")
        .collect();
    assert_eq!(
        agent.len(),
        1,
        "only the one genuine request was accepted: {agent:?}"
    );
    let (status, _) = server
        .post(&format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_run(&server, &run_id, Duration::from_secs(30)).await;
    // The run has ended: even a freshly signed request is refused.
    let late = send(
        body,
        sign(&key, "POST", path, body.as_bytes(), Timestamp::now()),
    )
    .await
    .unwrap();
    assert_eq!(late.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;
}

/// berth fronting another control plane: the paperclip profile, a foreign upstream, its own credential.
#[tokio::test]
async fn the_paperclip_profile_fronts_a_foreign_upstream() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, String, Option<String>, bool)>();
    let upstream = axum::Router::new().fallback(any(move |request: axum::extract::Request| {
        let seen_tx = seen_tx.clone();
        async move {
            let headers = request.headers();
            let authorization = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let signed =
                headers.contains_key(HEADER_SIGNATURE) && headers.contains_key(HEADER_NONCE);
            seen_tx
                .send((
                    request.method().to_string(),
                    request.uri().to_string(),
                    authorization,
                    signed,
                ))
                .unwrap();
            axum::Json(json!({"id": "agent-1", "name": "paperclip agent"}))
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", listener.local_addr().unwrap());
    let upstream_task = tokio::spawn(async move { axum::serve(listener, upstream).await });

    let server = TestServer::start_with(ServerOptions {
        env: vec![
            ("BERTH_BRIDGE_UPSTREAM".into(), upstream_url),
            ("BERTH_BRIDGE_POLICY".into(), "paperclip".into()),
            (
                "BERTH_BRIDGE_UPSTREAM_TOKEN".into(),
                "paperclip-agent-jwt".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let company = server.default_company().await;
    let script = r#"
echo "me: $(curl -fsS -H "Authorization: Bearer $PAPERCLIP_API_KEY" "$PAPERCLIP_API_URL/api/agents/me")"
echo "denied: $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $PAPERCLIP_API_KEY" "$PAPERCLIP_API_URL/api/secrets")"
echo "berth-vars: ${BERTH_API_URL:-none}"
"#;
    let run_id = start_run(&server, &company, json!({"command": ["sh", "-c", script]})).await;
    let run = wait_run(&server, &run_id, Duration::from_secs(60)).await;
    let stdout = text_of(&all_events(&server, &run_id).await, "stdout");
    assert_eq!(run["status"], "succeeded", "{run} {stdout}");
    assert!(
        stdout.contains(r#"me: {"id":"agent-1","name":"paperclip agent"}"#),
        "{stdout}"
    );
    assert!(stdout.contains("denied: 403"), "{stdout}");
    assert!(
        stdout.contains("berth-vars: none"),
        "the paperclip profile names its own variables: {stdout}"
    );
    let (method, uri, authorization, signed) = seen.recv().await.unwrap();
    assert_eq!((method.as_str(), uri.as_str()), ("GET", "/api/agents/me"));
    assert_eq!(
        authorization.as_deref(),
        Some("Bearer paperclip-agent-jwt"),
        "the upstream sees berth's credential, not the agent's"
    );
    assert!(signed);
    assert!(
        seen.try_recv().is_err(),
        "the denied request never reached the upstream"
    );
    server.stop().await;
    upstream_task.abort();
}
