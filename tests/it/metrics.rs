//! `GET /metrics` against a real server: who may scrape it, that the exposition is valid Prometheus text, that runs,
//! leases, API requests, the bridge and plugins move the right series with the right labels, and that no label
//! carries an id, a secret or a name a user chose.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::plugins::{ReadyPlugin, ready_with_args, run_on};
use crate::support::runs::{start_run, wait_run, wait_status};
use crate::support::server::TestServer;
use crate::support::sshd::TestSshd;

/// `GET /metrics` with `token`: status, content type and body.
async fn scrape_raw(server: &TestServer, token: Option<&str>) -> (StatusCode, String, String) {
    let mut request = reqwest::Client::new().get(format!("{}/metrics", server.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

/// The exposition as the admin scrapes it, parsed strictly.
async fn scrape(server: &TestServer) -> (String, Exposition) {
    let (status, content_type, body) = scrape_raw(server, Some(&server.admin_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let parsed = Exposition::parse(&body);
    (body, parsed)
}

/// One sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A text exposition, read as Prometheus reads it. (The `prometheus-parse` crate was tried: its sample pattern
/// stops a label set at the first `}`, so it misreads valid values like `route="/api/runs/{id}"`.)
#[derive(Debug)]
struct Exposition {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    is_metric_name(name) && !name.contains(':')
}

fn sample_value(value: &str) -> Option<f64> {
    match value {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => value.parse().ok(),
    }
}

impl Exposition {
    /// The text exposition format, strictly: every line a `# HELP`, a `# TYPE` with a known type, or a sample
    /// `name{label="value",...} value` with valid names, escapes and a number; each metric typed before its samples
    /// (a histogram's `_bucket`, `_sum` and `_count` under its own name). Panics on anything else.
    fn parse(text: &str) -> Self {
        assert!(text.ends_with('\n'), "the exposition ends with a newline");
        let mut exposition = Exposition {
            help: BTreeMap::new(),
            types: BTreeMap::new(),
            samples: Vec::new(),
        };
        for line in text.lines().filter(|line| !line.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                assert!(is_metric_name(name), "bad HELP line: {line}");
                exposition.help.insert(name.to_owned(), help.to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let parts: Vec<&str> = rest.split(' ').collect();
                assert!(
                    parts.len() == 2
                        && is_metric_name(parts[0])
                        && ["counter", "gauge", "histogram", "summary", "untyped"]
                            .contains(&parts[1]),
                    "bad TYPE line: {line}"
                );
                let known = exposition
                    .types
                    .insert(parts[0].to_owned(), parts[1].to_owned());
                assert!(known.is_none(), "typed twice: {line}");
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            assert!(is_metric_name(name), "bad metric name: {line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix).filter(|family| {
                        matches!(
                            exposition.types.get(*family).map(String::as_str),
                            Some("histogram" | "summary")
                        )
                    })
                })
                .unwrap_or(name);
            assert!(
                exposition.types.contains_key(family),
                "a sample before its TYPE line: {line}"
            );
            // Every family is described where berth lists its metrics (`metrics.rs`): a name recorded elsewhere
            // under another spelling would show up here without one.
            assert!(
                exposition.help.contains_key(family),
                "a metric berth does not describe: {line}"
            );
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(label_text) = rest.strip_prefix('{') {
                rest = read_labels(label_text, line, &mut labels);
            }
            let value = rest
                .strip_prefix(' ')
                .and_then(|rest| rest.split(' ').next())
                .and_then(sample_value)
                .unwrap_or_else(|| panic!("bad value: {line}"));
            exposition.samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        assert!(!exposition.samples.is_empty(), "no samples at all");
        exposition
    }
}

/// Reads `name="value",...}` into `labels` and returns what follows the `}`.
fn read_labels<'a>(
    mut text: &'a str,
    line: &str,
    labels: &mut BTreeMap<String, String>,
) -> &'a str {
    loop {
        if let Some(rest) = text.strip_prefix('}') {
            return rest;
        }
        let (name, rest) = text
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label: {line}"));
        assert!(is_label_name(name), "bad label name: {line}");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    _ => panic!("bad escape: {line}"),
                },
                Some((index, '"')) => break index,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value: {line}"),
            }
        };
        assert!(
            labels.insert(name.to_owned(), value).is_none(),
            "label {name} twice: {line}"
        );
        text = &rest[end + 1..];
        text = text.strip_prefix(',').unwrap_or(text);
    }
}

/// The value of the sample `metric` whose labels include `labels` (for a histogram, ask for its `_count` or `_sum`);
/// `None` when there is none.
fn value(exposition: &Exposition, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition
        .samples
        .iter()
        .find(|sample| {
            sample.name == metric
                && labels.iter().all(|(name, wanted)| {
                    sample.labels.get(*name).map(String::as_str) == Some(*wanted)
                })
        })
        .map(|sample| sample.value)
}

/// Like [`value`], but the series must exist.
fn must(exposition: &Exposition, metric: &str, labels: &[(&str, &str)]) -> f64 {
    value(exposition, metric, labels)
        .unwrap_or_else(|| panic!("no {metric} with {labels:?} in the exposition"))
}

/// Every value of `label` on the series of `metric`.
fn label_values(exposition: &Exposition, metric: &str, label: &str) -> Vec<String> {
    exposition
        .samples
        .iter()
        .filter(|sample| sample.name == metric)
        .filter_map(|sample| sample.labels.get(label).cloned())
        .collect()
}

/// Scrapes until `ready` holds (series move as runs end, leases are released, plugins restart), at most 20 s.
async fn scrape_until(
    server: &TestServer,
    what: &str,
    ready: impl Fn(&Exposition) -> bool,
) -> (String, Exposition) {
    let started = Instant::now();
    loop {
        let (body, parsed) = scrape(server).await;
        if ready(&parsed) {
            return (body, parsed);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never saw {what}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_need_the_admin_token_and_are_valid_prometheus_text() {
    let server = TestServer::start().await;
    let company = server.default_company().await;

    let (status, _, body) = scrape_raw(&server, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let error: Value = serde_json::from_str(&body).expect("a JSON error body");
    assert_eq!(error["error"]["code"], "unauthenticated", "{error}");

    let (status, _, body) = scrape_raw(&server, Some("not-a-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    let manager = server.create_key(&company, "manager").await;
    let (status, _, body) = scrape_raw(&server, Some(&manager)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a company key is not the admin: {body}"
    );
    let error: Value = serde_json::from_str(&body).expect("a JSON error body");
    assert_eq!(error["error"]["code"], "forbidden", "{error}");

    let (body, parsed) = scrape(&server).await;
    // Described and present from the start, before anything happened.
    for metric in [
        "berth_sweeps_total",
        "berth_ssh_connections_opened_total",
        "berth_ssh_sessions_opened_total",
        "berth_ssh_connections_open",
    ] {
        assert!(
            parsed.help.contains_key(metric),
            "no HELP for {metric}:\n{body}"
        );
        assert!(
            value(&parsed, metric, &[]).is_some(),
            "no {metric}:\n{body}"
        );
    }
    assert!(
        must(&parsed, "berth_sweeps_total", &[]) >= 1.0,
        "the start-up sweep ran"
    );
    // The refused scrapes above were API requests too, counted under the route template.
    assert!(
        must(
            &parsed,
            "berth_http_requests_total",
            &[("method", "GET"), ("route", "/metrics"), ("status", "401")]
        ) >= 2.0
    );
    assert!(
        must(
            &parsed,
            "berth_http_requests_total",
            &[("method", "GET"), ("route", "/metrics"), ("status", "403")]
        ) >= 1.0
    );
    server.stop().await;
}

/// What the local run's agent does through its bridge: one forwarded call and one the policy refuses.
const AGENT: &str = r#"
set -u
echo hello from the run
curl -fsS -H "Authorization: Bearer $BERTH_API_TOKEN" "$BERTH_API_URL/api/agent/run" > /dev/null
echo "denied: $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $BERTH_API_TOKEN" "$BERTH_API_URL/api/companies")"
"#;

#[tokio::test]
async fn runs_leases_requests_and_the_bridge_move_their_series_and_no_label_names_what_a_user_made()
{
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let reader = server.create_key(&company, "reader").await;

    // A local run that calls back through its bridge.
    let local_run = start_run(&server, &company, json!({"command": ["sh", "-c", AGENT]})).await;
    let finished = wait_run(&server, &local_run, Duration::from_secs(60)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");

    // A fake-provider run that fails, in an environment whose name is the user's.
    let env_name = format!("metrics-env-{}", uuid::Uuid::new_v4());
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": env_name, "driver": "sandbox", "config": {"provider": "fake"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let env_id = env["id"].as_str().unwrap().to_owned();
    let failed_run = start_run(
        &server,
        &company,
        json!({"environmentId": env_id, "command": ["sh", "-c", "echo oops >&2; exit 3"]}),
    )
    .await;
    let failed = wait_run(&server, &failed_run, Duration::from_secs(60)).await;
    assert_eq!(failed["status"], "failed", "{failed}");

    // A fake-provider run that holds its lease while we look.
    let held_run = start_run(
        &server,
        &company,
        json!({"environmentId": env_id, "command": ["sh", "-c", "sleep 1000"]}),
    )
    .await;
    wait_status(&server, &held_run, "running").await;
    let (_, parsed) = scrape(&server).await;
    assert_eq!(
        must(
            &parsed,
            "berth_leases_active",
            &[("driver", "sandbox"), ("provider", "fake")]
        ),
        1.0,
        "the running fake run holds one lease"
    );
    let (status, _) = server
        .post(&format!("/api/runs/{held_run}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let cancelled = wait_run(&server, &held_run, Duration::from_secs(30)).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");

    // A reader's key reading the run by id, and a path no route has: both counted by template, never as sent.
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/runs/{local_run}"),
            &reader,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let stray = format!("/api/no-such-thing/{}", uuid::Uuid::new_v4());
    let (status, _) = server.get(&stray).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (body, parsed) = scrape_until(&server, "the cancelled run's lease given back", |parsed| {
        value(
            parsed,
            "berth_leases_active",
            &[("driver", "sandbox"), ("provider", "fake")],
        ) == Some(0.0)
    })
    .await;

    // Runs, by driver and status.
    assert_eq!(
        must(&parsed, "berth_runs_started_total", &[("driver", "local")]),
        1.0
    );
    assert_eq!(
        must(
            &parsed,
            "berth_runs_started_total",
            &[("driver", "sandbox")]
        ),
        2.0
    );
    let finished = |driver: &str, status: &str| {
        must(
            &parsed,
            "berth_runs_finished_total",
            &[("driver", driver), ("status", status)],
        )
    };
    assert_eq!(finished("local", "succeeded"), 1.0);
    assert_eq!(finished("sandbox", "failed"), 1.0);
    assert_eq!(finished("sandbox", "cancelled"), 1.0);
    assert_eq!(
        must(
            &parsed,
            "berth_run_duration_seconds_count",
            &[("driver", "sandbox"), ("status", "failed")]
        ),
        1.0
    );
    assert!(
        must(
            &parsed,
            "berth_run_duration_seconds_sum",
            &[("driver", "local"), ("status", "succeeded")]
        ) > 0.0
    );
    assert_eq!(
        must(
            &parsed,
            "berth_run_start_latency_seconds_count",
            &[("driver", "sandbox")]
        ),
        2.0,
        "both fake runs started their command"
    );
    assert!(
        body.contains("berth_run_duration_seconds_bucket{"),
        "durations are histograms with buckets:\n{body}"
    );
    // Output: "hello from the run\n", "denied: 403\n" on stdout; "oops\n" on stderr.
    assert!(
        must(
            &parsed,
            "berth_run_output_bytes_total",
            &[("stream", "stdout")]
        ) >= 31.0
    );
    assert!(
        must(
            &parsed,
            "berth_run_output_bytes_total",
            &[("stream", "stderr")]
        ) >= 5.0
    );

    // The bridge: the agent's forwarded call and the refused one, and the forwarded call's arrival at the API.
    assert_eq!(
        must(
            &parsed,
            "berth_bridge_requests_total",
            &[("status", "200"), ("code", "forwarded")]
        ),
        1.0
    );
    assert_eq!(
        must(
            &parsed,
            "berth_bridge_requests_total",
            &[("status", "403"), ("code", "route_not_allowed")]
        ),
        1.0
    );
    assert_eq!(
        must(
            &parsed,
            "berth_bridge_request_duration_seconds_count",
            &[("outcome", "forwarded")]
        ),
        1.0
    );
    assert_eq!(
        must(
            &parsed,
            "berth_http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/api/agent/run"),
                ("status", "200")
            ]
        ),
        1.0
    );

    // API requests by route template.
    assert!(
        must(
            &parsed,
            "berth_http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/api/runs/{id}"),
                ("status", "200")
            ]
        ) >= 3.0
    );
    assert!(
        must(
            &parsed,
            "berth_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/api/companies/{company_id}/runs"),
                ("status", "201")
            ]
        ) >= 3.0
    );
    assert_eq!(
        must(
            &parsed,
            "berth_http_requests_total",
            &[("method", "GET"), ("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    assert!(
        must(
            &parsed,
            "berth_http_request_duration_seconds_count",
            &[("method", "GET"), ("route", "/api/runs/{id}")]
        ) >= 3.0
    );
    // Every route label is a template: literal segments have no digits (ids do), variables are `{name}`.
    for route in label_values(&parsed, "berth_http_requests_total", "route") {
        let template = route.starts_with('/')
            && route.split('/').all(|segment| {
                (segment.starts_with('{') && segment.ends_with('}'))
                    || !segment.chars().any(|c| c.is_ascii_digit())
            });
        assert!(route == "unmatched" || template, "route label {route}");
    }

    // Nothing the test made, and no secret, appears anywhere in the exposition.
    let mut lease_ids = Vec::new();
    for run in [&local_run, &failed_run, &held_run] {
        let (_, run) = server.get(&format!("/api/runs/{run}")).await;
        lease_ids.push(
            run["leaseId"]
                .as_str()
                .expect("every run had a lease")
                .to_owned(),
        );
    }
    let mut forbidden = vec![
        company.clone(),
        env_id.clone(),
        env_name.clone(),
        local_run.clone(),
        failed_run.clone(),
        held_run.clone(),
        server.admin_token.clone(),
        reader.clone(),
        stray.clone(),
        stray.rsplit('/').next().unwrap().to_owned(),
        "hello from the run".to_owned(),
    ];
    forbidden.extend(lease_ids);
    for needle in &forbidden {
        assert!(
            !body.contains(needle.as_str()),
            "the exposition holds `{needle}`:\n{body}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn public_metrics_report_plugins_their_restarts_and_lease_failures() {
    // A fake plugin whose releases fail and whose executes crash when the run asks.
    let ReadyPlugin {
        _plugins,
        server,
        company,
        env,
    } = ready_with_args(
        "metrics.fake",
        "metrics-fake",
        &[
            "--fail-release",
            "releases are off today",
            "--crash-during-execute",
            "--execute-faults-with-env",
            "CRASH_NOW",
        ],
        &["--metrics-public"],
    )
    .await;

    // `--metrics-public`: no token needed.
    let (status, _, body) = scrape_raw(&server, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let parsed = Exposition::parse(&body);
    let plugin_status = |parsed: &Exposition, status: &str| {
        value(
            parsed,
            "berth_plugin_status",
            &[("plugin", "metrics.fake"), ("status", status)],
        )
    };
    assert_eq!(plugin_status(&parsed, "ready"), Some(1.0), "{body}");
    assert_eq!(plugin_status(&parsed, "failed"), Some(0.0), "{body}");

    // A run whose lease release fails: counted under the installed plugin's provider key.
    let (finished, _) = run_on(&server, &company, &env, json!({"command": ["true"]})).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    // A run that crashes the plugin (it exits after the run's first output): it is restarted.
    let (crashed, _) = run_on(
        &server,
        &company,
        &env,
        json!({"command": ["sh", "-c", "echo first; sleep 1; echo second"], "env": {"CRASH_NOW": "1"}}),
    )
    .await;
    assert_eq!(crashed["status"], "failed", "{crashed}");

    let (body, parsed) = scrape_until(&server, "the plugin restarted and ready again", |parsed| {
        value(
            parsed,
            "berth_plugin_restarts_total",
            &[("plugin", "metrics.fake")],
        )
        .is_some_and(|restarts| restarts >= 1.0)
            && plugin_status(parsed, "ready") == Some(1.0)
    })
    .await;
    assert!(
        must(
            &parsed,
            "berth_lease_failures_total",
            &[
                ("operation", "release"),
                ("driver", "sandbox"),
                ("provider", "metrics-fake")
            ]
        ) >= 1.0,
        "{body}"
    );
    assert_eq!(
        must(
            &parsed,
            "berth_runs_finished_total",
            &[("driver", "sandbox"), ("status", "failed")]
        ),
        1.0
    );
    assert!(!body.contains(&env), "no environment id in a label");
    server.stop().await;
}

#[tokio::test]
async fn an_ssh_run_moves_the_pool_series_and_its_target_stays_out_of_labels() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let config = sshd.config();
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": format!("metrics-ssh-{}", uuid::Uuid::new_v4()), "driver": "ssh", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let env_id = env["id"].as_str().unwrap().to_owned();
    let run_id = start_run(
        &server,
        &company,
        json!({"environmentId": env_id, "command": ["sh", "-c", "echo over ssh"]}),
    )
    .await;
    let finished = wait_run(&server, &run_id, Duration::from_secs(60)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");

    let (body, parsed) = scrape(&server).await;
    assert!(must(&parsed, "berth_ssh_connections_opened_total", &[]) >= 1.0);
    assert!(must(&parsed, "berth_ssh_sessions_opened_total", &[]) >= 1.0);
    // The connection stays pooled after the run (closed after minutes unused).
    assert!(must(&parsed, "berth_ssh_connections_open", &[]) >= 1.0);
    assert_eq!(
        must(
            &parsed,
            "berth_runs_finished_total",
            &[("driver", "ssh"), ("status", "succeeded")]
        ),
        1.0
    );
    let username = config["username"].as_str().unwrap();
    let key_line = config["privateKey"]
        .as_str()
        .unwrap()
        .lines()
        .nth(1)
        .unwrap();
    for needle in [env_id.as_str(), run_id.as_str(), username, key_line] {
        assert!(
            !body.contains(needle),
            "the exposition holds `{needle}`:\n{body}"
        );
    }
    server.stop().await;
    sshd.stop();
}
