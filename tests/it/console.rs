//! The operator console (`/`): its headers, its sign-in session and CSRF rule over HTTP, and the console itself in a
//! real headless chromium driven over WebDriver (`chromedriver`, Debian's `chromium` and `chromium-driver`, which
//! `scripts/test.sh` installs). A failing browser test leaves a screenshot in `target/console-screenshots/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt as _;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::support::runs::{start_run, wait_run, wait_status};
use crate::support::server::TestServer;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

// --- HTTP ------------------------------------------------------------------------------------------------------

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in with `token` and returns the whole `Set-Cookie` value.
async fn sign_in(server: &TestServer, token: &str, extra: &[(&str, &str)]) -> String {
    let mut request = http()
        .post(format!("{}/console/session", server.url))
        .bearer_auth(token)
        .header("x-berth-console", "1");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.headers()["cache-control"], "no-store");
    response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// `name=value` of a `Set-Cookie` value, as a browser would send it back.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

async fn with_cookie(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
    console_header: bool,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = http()
        .request(method, format!("{}{path}", server.url))
        .header("cookie", cookie);
    if console_header {
        request = request.header("x-berth-console", "1");
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn assert_security_headers(headers: &HeaderMap, what: &str) {
    assert_eq!(headers["content-security-policy"], CSP, "{what}");
    assert_eq!(headers["x-frame-options"], "DENY", "{what}");
    assert_eq!(headers["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(headers["referrer-policy"], "no-referrer", "{what}");
}

#[tokio::test]
async fn the_console_is_served_at_the_root_with_a_strict_policy_and_validators() {
    let server = TestServer::start().await;
    let client = http();
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/app.css", "text/css; charset=utf-8"),
    ] {
        let response = client
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_security_headers(&headers, path);
        assert_eq!(headers["cache-control"], "no-cache", "{path}");
        let etag = headers["etag"].clone();
        let body = response.text().await.unwrap();
        assert!(!body.is_empty(), "{path}");
        if path == "/" {
            // Scripts and styles come from files only: the policy forbids inline ones, and the shell has none.
            assert!(body.contains(r#"<script type="module" src="/console/app.js"></script>"#));
            assert_eq!(body.matches("<script").count(), 1, "{body}");
            assert!(
                !body.contains("<style") && !body.contains("style="),
                "{body}"
            );
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "no third-party origin: {body}"
            );
        }
        if path == "/console/app.js" {
            // The script builds the page with DOM APIs and textContent only: nothing parses HTML.
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
            ] {
                assert!(!body.contains(sink), "app.js uses {sink}");
            }
        }
        let revalidated = client
            .get(format!("{}{path}", server.url))
            .header("if-none-match", etag.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(revalidated.headers()["etag"], etag, "{path}");
        let stale = client
            .get(format!("{}{path}", server.url))
            .header("if-none-match", "\"something-else\"")
            .send()
            .await
            .unwrap();
        assert_eq!(stale.status(), StatusCode::OK, "{path}");
    }
    // The API itself is untouched: JSON 404s off the console's routes, and no token still means 401.
    let (status, _) = server
        .raw(
            reqwest::Method::GET,
            "/console/nothing",
            None,
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn signing_in_sets_an_http_only_strict_session_cookie_and_signing_out_clears_it() {
    let server = TestServer::start().await;
    let set_cookie = sign_in(&server, &server.admin_token, &[]).await;
    let attributes: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    assert!(attributes[0].starts_with("berth_console="), "{set_cookie}");
    for wanted in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(
            attributes.contains(&wanted),
            "{wanted} missing: {set_cookie}"
        );
    }
    // A browser-session cookie: no lifetime of its own, and not Secure over plain HTTP (it would not come back).
    assert!(
        !set_cookie.contains("Max-Age")
            && !set_cookie.contains("Expires")
            && !set_cookie.contains("Secure"),
        "{set_cookie}"
    );
    // The cookie is sealed: neither the token nor its digest is in it.
    assert!(!set_cookie.contains(&server.admin_token), "{set_cookie}");
    let cookie = cookie_pair(&set_cookie);

    let (status, whoami) = with_cookie(
        &server,
        reqwest::Method::GET,
        "/api/whoami",
        &cookie,
        true,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{whoami}");
    assert_eq!(whoami["kind"], "admin");

    // Behind a TLS-terminating proxy the cookie is Secure.
    let secure = sign_in(
        &server,
        &server.admin_token,
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert!(
        secure.split(';').any(|part| part.trim() == "Secure"),
        "{secure}"
    );

    // Sign-out: the browser is told to forget the cookie at once.
    let response = http()
        .delete(format!("{}/console/session", server.url))
        .header("cookie", &cookie)
        .header("x-berth-console", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_security_headers(response.headers(), "sign-out");
    let cleared = response.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with("berth_console=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    assert!(
        cleared.contains("HttpOnly") && cleared.contains("SameSite=Strict"),
        "{cleared}"
    );
    server.stop().await;
}

#[tokio::test]
async fn sign_in_needs_a_valid_token_in_the_header_and_the_console_header() {
    let server = TestServer::start().await;
    let url = format!("{}/console/session", server.url);
    let wrong = http()
        .post(&url)
        .bearer_auth("not-a-token")
        .header("x-berth-console", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get("set-cookie").is_none());
    // Another origin's form cannot add the header: no session is opened for it (login CSRF).
    let cross_site = http()
        .post(&url)
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);
    assert!(cross_site.headers().get("set-cookie").is_none());
    // The token is taken from the Authorization header only, never from a URL or a body.
    let in_url = http()
        .post(format!("{url}?token={}", server.admin_token))
        .header("x-berth-console", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(in_url.status(), StatusCode::UNAUTHORIZED);
    let in_body = http()
        .post(&url)
        .header("x-berth-console", "1")
        .json(&json!({"token": server.admin_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(in_body.status(), StatusCode::UNAUTHORIZED);
    let sign_out_cross_site = http().delete(&url).send().await.unwrap();
    assert_eq!(sign_out_cross_site.status(), StatusCode::FORBIDDEN);
    server.stop().await;
}

#[tokio::test]
async fn the_session_cookie_alone_authenticates_nothing_but_a_run_event_stream() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let cookie = cookie_pair(&sign_in(&server, &server.admin_token, &[]).await);
    let environments = format!("/api/companies/{company}/environments");
    let body = json!({"name": "csrf", "driver": "sandbox", "config": {"provider": "fake"}});

    // What a cross-site form or image could send: the cookie without the console's header.
    let (status, error) = with_cookie(
        &server,
        reqwest::Method::POST,
        &environments,
        &cookie,
        false,
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}");
    assert_eq!(error["error"]["code"], "unauthenticated");
    let (status, _) = with_cookie(
        &server,
        reqwest::Method::GET,
        "/api/whoami",
        &cookie,
        false,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, created) = with_cookie(
        &server,
        reqwest::Method::POST,
        &environments,
        &cookie,
        true,
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let env = created["id"].as_str().unwrap();

    // The session is never taken from a URL, and the cookie's value is no bearer token.
    let value = cookie.strip_prefix("berth_console=").unwrap();
    let (status, _) = server
        .raw(
            reqwest::Method::GET,
            &format!("/api/whoami?berth_console={value}"),
            None,
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server
        .call(reqwest::Method::GET, "/api/whoami", value, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // An Authorization header is the whole answer when present: a bad one is not rescued by the cookie.
    let response = http()
        .get(format!("{}/api/whoami", server.url))
        .header("cookie", &cookie)
        .header("x-berth-console", "1")
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // A forged or altered cookie is nobody's.
    let mut altered = cookie.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    let (status, _) = with_cookie(
        &server,
        reqwest::Method::GET,
        "/api/whoami",
        &altered,
        true,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // EventSource cannot send headers: a run's event stream is the one GET the cookie opens alone.
    let run = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["echo", "streamed"]}),
    )
    .await;
    wait_run(&server, &run, Duration::from_secs(60)).await;
    let stream = http()
        .get(format!("{}/api/runs/{run}/events", server.url))
        .header("cookie", &cookie)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let text = stream.text().await.unwrap();
    assert!(text.contains("streamed"), "{text}");
    // ...but not as JSON, and not as a POST.
    let json_events = http()
        .get(format!("{}/api/runs/{run}/events", server.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(json_events.status(), StatusCode::UNAUTHORIZED);
    let cancel = http()
        .post(format!("{}/api/runs/{run}/cancel", server.url))
        .header("cookie", &cookie)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn a_key_session_has_exactly_the_keys_rights_and_ends_with_the_key() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let other = server.create_company("console-other").await;
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "redacted", "driver": "sandbox", "config": {"provider": "fake"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let env_id = env["id"].as_str().unwrap();

    let reader =
        cookie_pair(&sign_in(&server, &server.create_key(&company, "reader").await, &[]).await);
    let (status, seen) = with_cookie(
        &server,
        reqwest::Method::GET,
        &format!("/api/environments/{env_id}"),
        &reader,
        true,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["config"], json!({}));
    assert_eq!(seen["configRedacted"], true);
    let (status, _) = with_cookie(
        &server,
        reqwest::Method::GET,
        &format!("/api/environments/{env_id}/leases"),
        &reader,
        true,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, key) = server
        .post(
            &format!("/api/companies/{company}/api-keys"),
            json!({"name": "console manager", "role": "manager"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let manager = cookie_pair(&sign_in(&server, key["token"].as_str().unwrap(), &[]).await);
    let (status, _) = with_cookie(
        &server,
        reqwest::Method::GET,
        &format!("/api/companies/{other}/environments"),
        &manager,
        true,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = with_cookie(
        &server,
        reqwest::Method::GET,
        "/api/companies",
        &manager,
        true,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = with_cookie(
        &server,
        reqwest::Method::GET,
        &format!("/api/companies/{company}/environments"),
        &manager,
        true,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // Revoking the key ends its sessions at once: the cookie holds only what identifies the key.
    let (status, _) = server
        .delete(&format!("/api/api-keys/{}", key["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = with_cookie(
        &server,
        reqwest::Method::GET,
        "/api/whoami",
        &manager,
        true,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

// --- the browser -----------------------------------------------------------------------------------------------

/// How long a browser step may take on a slow, loaded machine.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

/// chromedriver (in its own process group, with the chromium it starts) and a WebDriver session on it.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn require_program(path: &str, package: &str) {
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: the console's browser tests need Debian's `{package}` \
         (apt-get install -y chromium chromium-driver; scripts/test.sh installs it)"
    );
}

impl Browser {
    async fn start() -> Self {
        require_program("/usr/bin/chromium", "chromium");
        require_program("/usr/bin/chromedriver", "chromium-driver");
        let mut driver = Command::new("/usr/bin/chromedriver")
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let stdout = driver.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(BROWSER_WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                // "ChromeDriver was started successfully on port N." (an earlier line names the requested port, 0)
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').trim().parse::<u16>().unwrap();
                }
            }
            panic!("chromedriver exited before it listened");
        })
        .await
        .expect("chromedriver did not start within 60 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let profile = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--headless=new".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--window-size=1400,1000".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        // Chromium refuses to run as root with its own sandbox.
        if std::env::var("USER").as_deref() == Ok("root") || is_root() {
            args.push("--no-sandbox".to_owned());
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({"binary": "/usr/bin/chromium", "args": args}),
        );
        let client = tokio::time::timeout(BROWSER_WAIT, async {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
        })
        .await
        .expect("chromium did not start within 60 s")
        .expect("a WebDriver session on chromium");
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Ends the session (chromium quits) and stops chromedriver's whole process group.
    async fn stop(mut self) {
        let _ = tokio::time::timeout(BROWSER_WAIT, self.client.clone().close()).await;
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = self.driver.wait().await;
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(BROWSER_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("no element {css} within 60 s: {error}"))
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        element.clear().await.unwrap();
        element.send_keys(text).await.unwrap();
    }

    async fn eval(&self, script: &str) -> Value {
        self.client.execute(script, Vec::new()).await.unwrap()
    }

    /// Waits until `condition` (a JavaScript expression) is true in the page.
    async fn wait_until(&self, condition: &str, what: &str) {
        let started = Instant::now();
        let script = format!("return Boolean({condition});");
        loop {
            if self.client.execute(&script, Vec::new()).await.unwrap() == Value::Bool(true) {
                return;
            }
            assert!(
                started.elapsed() < BROWSER_WAIT,
                "{what}: still false after 60 s: {condition}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn sign_in(&self, server: &TestServer, token: &str) {
        self.goto(&format!("{}/", server.url)).await;
        self.type_into("#token", token).await;
        self.click("#signin").await;
        self.find("#signout").await;
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .map(|line| line.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn screenshot_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("console-screenshots")
}

/// Runs `test` against `browser`; on failure saves a screenshot beside the test output (and says where). The
/// caller then stops the browser either way and hands the outcome to [`finish`].
async fn screenshot_on_failure(
    name: &str,
    browser: &Browser,
    test: impl Future<Output = ()>,
) -> std::thread::Result<()> {
    let outcome = std::panic::AssertUnwindSafe(test).catch_unwind().await;
    if outcome.is_err() {
        let dir = screenshot_dir();
        let _ = std::fs::create_dir_all(&dir);
        let dir = dir.canonicalize().unwrap_or(dir);
        let path = dir.join(format!("{name}.png"));
        match browser.client.screenshot().await {
            Ok(png) if std::fs::write(&path, &png).is_ok() => {
                eprintln!("screenshot: {}", path.display());
            }
            _ => eprintln!("could not save a screenshot to {}", path.display()),
        }
    }
    outcome
}

/// Lets a browser test's failure through, once its processes are stopped.
fn finish(outcome: std::thread::Result<()>) {
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn browser_signs_in_creates_a_sandbox_environment_from_its_schema_with_a_secret_and_tests_it()
{
    let plugins = tempfile::tempdir().unwrap();
    // A schema with every kind of field the generator draws: defaults, an enum, a bound integer, a required field,
    // secrets at the top level and in a nested object, arrays.
    let schema = json!({
        "type": "object",
        "required": ["image"],
        "additionalProperties": false,
        "properties": {
            "image": {"type": "string", "default": "fake:latest"},
            "apiKey": {"type": "string", "format": "secret-ref"},
            "size": {"type": "string", "enum": ["small", "large"], "default": "small"},
            "replicas": {"type": "integer", "minimum": 1, "default": 2},
            "network": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "token": {"type": "string", "format": "secret-ref"},
                    "ports": {"type": "array", "items": {"type": "integer"}}
                }
            },
            "tags": {"type": "array", "items": {"type": "string"}}
        }
    });
    let dir = crate::plugins::fake_plugin_dir_offering(
        plugins.path(),
        "berth.console",
        "console-fake",
        "sandbox_provider",
        schema,
        &[],
    );
    let server = crate::plugins::server_with(&[&dir]).await;
    let company = server.default_company().await;
    crate::plugins::wait_capability(&server, &company, "console-fake", "ready").await;
    let secret = "console-secret-value-1234";
    let browser = Browser::start().await;
    let outcome = screenshot_on_failure("browser_signs_in_creates_a_sandbox_environment_from_its_schema_with_a_secret_and_tests_it", &browser, async {
        browser.sign_in(&server, &server.admin_token).await;
        // The session cookie is out of the page's reach.
        assert_eq!(browser.eval("return document.cookie.includes('berth_console');").await, json!(false));
        browser.find("#environments").await;
        browser.click("#new-environment").await;
        browser.find("#env-provider").await.select_by_value("console-fake").await.unwrap();
        // The plugin's schema: `image` (default filled in) and `apiKey` (secret-ref: a password input).
        browser.wait_until("document.querySelector('[name=\"config.image\"]')?.value === 'fake:latest'", "default").await;
        let key_type = browser.find("[name=\"config.apiKey\"]").await.attr("type").await.unwrap();
        assert_eq!(key_type.as_deref(), Some("password"));
        assert_eq!(
            browser.eval("return document.querySelectorAll('[data-path=\"config.image\"] .req').length;").await,
            json!(1)
        );
        browser.type_into("#env-name", "from the form").await;
        browser.type_into("[name=\"config.apiKey\"]", secret).await;
        browser.find("[name=\"config.size\"]").await.select_by_value("\"large\"").await.unwrap();
        browser.type_into("[name=\"config.network.token\"]", "nested-secret-5678").await;
        browser.click("[data-path=\"config.network.ports\"] .add-item").await;
        browser.type_into("[name=\"config.network.ports.0\"]", "8080").await;
        browser.click("[data-path=\"config.tags\"] .add-item").await;
        browser.type_into("[name=\"config.tags.0\"]", "blue").await;
        // A value the schema refuses: the server's 422 marks the field.
        browser.type_into("[name=\"config.replicas\"]", "0").await;
        browser.click("#env-save").await;
        browser
            .wait_until("document.querySelector('[data-path=\"config.replicas\"].invalid .field-error')", "the refusal")
            .await;
        browser.type_into("[name=\"config.replicas\"]", "3").await;
        browser.click("#env-test").await;
        browser.wait_until("document.querySelector('#probe-result .summary')?.textContent.length > 0", "probe").await;
        assert_eq!(browser.eval("return document.querySelector('#probe-result .badge').textContent;").await, json!("ok"));
        browser.click("#env-save").await;
        browser.wait_until("location.hash === '#/environments'", "back to the list").await;
        browser.wait_until("[...document.querySelectorAll('.env-name')].some(e => e.textContent === 'from the form')", "listed").await;

        // Stored as a secret, and shown as "stored", never as its value.
        let (_, environments) = server.get(&format!("/api/companies/{company}/environments")).await;
        let created = environments
            .as_array()
            .unwrap()
            .iter()
            .find(|env| env["name"] == "from the form")
            .unwrap()
            .clone();
        assert_eq!(created["config"]["provider"], "console-fake");
        assert_eq!(created["config"]["image"], "fake:latest");
        assert_eq!(created["config"]["size"], "large");
        assert_eq!(created["config"]["replicas"], 3);
        assert_eq!(created["config"]["tags"], json!(["blue"]));
        assert_eq!(created["config"]["network"]["ports"], json!([8080]));
        assert!(created["config"]["apiKey"]["secretRef"].is_string(), "{created}");
        assert!(created["config"]["network"]["token"]["secretRef"].is_string(), "{created}");
        let id = created["id"].as_str().unwrap();
        browser.goto(&format!("{}/#/environments/{id}/edit", server.url)).await;
        browser.wait_until("document.querySelector('[data-path=\"config.apiKey\"] .secret-state')?.textContent === 'stored'", "stored").await;
        assert_eq!(browser.eval("return document.querySelector('[name=\"config.apiKey\"]').value;").await, json!(""));
        assert_eq!(browser.eval(&format!("return document.body.textContent.includes('{secret}');")).await, json!(false));
        // Saving without touching it keeps the secret.
        browser.click("#env-save").await;
        browser.wait_until("location.hash === '#/environments'", "saved").await;
        let (_, kept) = server.get(&format!("/api/environments/{id}")).await;
        assert_eq!(kept["config"], created["config"]);

        // The providers' and plugins' health, from the capabilities.
        browser.click("#nav-providers").await;
        browser
            .wait_until(
                "document.querySelector('#providers tr[data-key=\"console-fake\"] .badge')?.textContent === 'ready' \
                 && document.querySelector('#providers tr[data-key=\"console-fake\"]').textContent.includes('berth.console')",
                "the plugin provider's health",
            )
            .await;

        // Sign-out forgets the session: the page and the API both refuse until the next sign-in.
        browser.click("#signout").await;
        browser.find("#token").await;
        let status = browser
            .eval("return fetch('/api/whoami', {headers: {'X-Berth-Console': '1'}}).then(r => r.status);")
            .await;
        assert_eq!(status, json!(401));
    })
    .await;
    browser.stop().await;
    finish(outcome);
    server.stop().await;
}

#[tokio::test]
async fn browser_streams_a_runs_output_while_it_runs_and_cancels_it() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "console runs", "driver": "sandbox", "config": {"provider": "fake"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let env = env["id"].as_str().unwrap().to_owned();
    let browser = Browser::start().await;
    let outcome = screenshot_on_failure("browser_streams_a_runs_output_while_it_runs_and_cancels_it", &browser, async {
        browser.sign_in(&server, &server.admin_token).await;
        browser.click("#nav-runs").await;
        browser.find("#run-env").await.select_by_value(&env).await.unwrap();
        browser
            .type_into("#run-command", "sh -c 'echo first-line; echo to-stderr >&2; exec sleep 600'")
            .await;
        browser.click("#run-start").await;
        browser.wait_until("location.hash.startsWith('#/runs/')", "the run's page").await;
        // Output arrives while the command still runs.
        browser.wait_until("document.querySelector('#output')?.textContent.includes('first-line')", "live output").await;
        browser.wait_until("document.querySelector('#output .stderr')?.textContent.includes('to-stderr')", "stderr apart").await;
        assert_eq!(browser.eval("return document.querySelector('#run-status').dataset.status;").await, json!("running"));
        browser.wait_until("document.querySelector('#timeline .ev-lease')", "the lease in the timeline").await;
        let run_id = browser
            .eval("return decodeURIComponent(location.hash.slice('#/runs/'.length));")
            .await
            .as_str()
            .unwrap()
            .to_owned();
        // Delete first shows what it would cancel and release; keeping the environment changes nothing.
        browser.click("#nav-environments").await;
        browser.click(&format!("tr[data-env-id=\"{env}\"] .delete")).await;
        browser
            .wait_until(
                &format!(
                    "document.querySelector('#delete-impact')?.textContent.includes('cancel run {run_id}') \
                     && document.querySelector('#delete-impact').textContent.includes('release active lease')"
                ),
                "the deletion's impact",
            )
            .await;
        browser.click("#keep-environment").await;
        browser.goto(&format!("{}/#/runs/{run_id}", server.url)).await;
        browser
            .wait_until(
                "document.querySelector('#output')?.textContent.includes('first-line') \
                 && document.querySelector('#run-status').dataset.status === 'running'",
                "the run again, replayed",
            )
            .await;
        browser.click("#run-cancel").await;
        browser.wait_until("document.querySelector('#run-status').dataset.status === 'cancelled'", "cancelled").await;
        wait_status(&server, &run_id, "cancelled").await;
        browser.wait_until("[...document.querySelectorAll('#timeline .ev-status')].some(e => e.textContent.includes('cancelled'))", "final event").await;

        // The environment's leases: the run's, ended, with why.
        browser.goto(&format!("{}/#/environments/{env}/leases", server.url)).await;
        browser
            .wait_until(
                &format!(
                    "[...document.querySelectorAll('#leases tr[data-lease-id]')].some(row => \
                     row.textContent.includes('{run_id}') && row.querySelector('.badge').textContent === 'released' \
                     && row.querySelector('.lease-ending').textContent.length > 0)"
                ),
                "the released lease",
            )
            .await;

        // Thousands of lines: all arrive, the page stays responsive, and the DOM keeps a bounded tail.
        let many = start_run(&server, &company, json!({"environmentId": env, "command": ["seq", "1", "30000"]})).await;
        browser.goto(&format!("{}/#/runs/{many}", server.url)).await;
        browser.wait_until("document.querySelector('#run-status')?.dataset.status === 'succeeded'", "succeeded").await;
        browser.wait_until("document.querySelector('#output').textContent.includes('\\n30000\\n')", "the last line").await;
        let lines = browser.eval("return document.querySelector('#output').textContent.split('\\n').length;").await;
        assert!(lines.as_u64().unwrap() <= 20_002, "{lines} lines on the page");
        browser.wait_until("document.querySelector('#output .trimmed')?.textContent.includes('earlier lines')", "the note").await;
    })
    .await;
    browser.stop().await;
    finish(outcome);
    server.stop().await;
}

#[tokio::test]
async fn browser_renders_hostile_names_and_output_as_text() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let hostile_name = "<img src=x onerror=\"window.__xss='name'\">";
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": hostile_name, "description": "<script>window.__xss='description'</script>", "driver": "sandbox", "config": {"provider": "fake"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let env = env["id"].as_str().unwrap().to_owned();
    let payload =
        "<script>window.__xss='output'</script><img src=x onerror=\"window.__xss='img'\">";
    let run = start_run(
        &server,
        &company,
        json!({"environmentId": env, "command": ["sh", "-c", "printf '%s\\n' \"$1\"; printf '\\033[31mred-text\\033[0m plain\\n'", "sh", payload]}),
    )
    .await;
    let finished = wait_run(&server, &run, Duration::from_secs(60)).await;
    let reader = server.create_key(&company, "reader").await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let browser = Browser::start().await;
    let outcome = screenshot_on_failure("browser_renders_hostile_names_and_output_as_text", &browser, async {
        browser.sign_in(&server, &server.admin_token).await;
        browser.wait_until("document.querySelector('.env-name')", "the list").await;
        let names = browser.eval("return [...document.querySelectorAll('.env-name')].map(e => e.textContent);").await;
        assert!(names.as_array().unwrap().contains(&json!(hostile_name)), "{names}");
        assert_eq!(browser.eval("return document.querySelectorAll('#environments img, #environments script').length;").await, json!(0));

        browser.goto(&format!("{}/#/runs/{run}", server.url)).await;
        browser.wait_until("document.querySelector('#output')?.textContent.includes('plain')", "the output").await;
        let text = browser.eval("return document.querySelector('#output').textContent;").await;
        assert!(text.as_str().unwrap().contains(payload), "{text}");
        assert_eq!(browser.eval("return document.querySelectorAll('#output img, #output script').length;").await, json!(0));
        // ANSI colours become classes; the escape codes themselves are not shown.
        assert_eq!(browser.eval("return document.querySelector('#output .ansi-fg-31')?.textContent;").await, json!("red-text"));
        assert!(!text.as_str().unwrap().contains('\u{1b}'), "{text}");
        assert_eq!(browser.eval("return typeof window.__xss;").await, json!("undefined"));

        // A reader: redacted configurations, nothing to change, no leases.
        browser.click("#signout").await;
        browser.sign_in(&server, &reader).await;
        browser.wait_until("document.querySelector('#environments .config-redacted')", "redacted").await;
        assert_eq!(
            browser
                .eval("return document.querySelectorAll('#new-environment, #environments .delete, #environments .edit, #environments .leases, #environments details.config').length;")
                .await,
            json!(0)
        );
        browser.goto(&format!("{}/#/environments/{env}/leases", server.url)).await;
        browser.wait_until("document.querySelector('main .error')?.textContent.includes('reader')", "leases refused").await;
    })
    .await;
    browser.stop().await;
    finish(outcome);
    server.stop().await;
}
