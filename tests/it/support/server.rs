//! A real `berth serve` process for tests: its own data dir, a free port, captured logs, and a clean stop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `berth` binary under test: `BERTH_BIN`, else built once per test process with the same cargo.
pub fn berth_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("BERTH_BIN") {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "berth-server", "--bin", "berth"])
            .status()
            .expect("run cargo build for the berth binary");
        assert!(status.success(), "building the berth binary failed");
        // This test binary lives in target/<profile>/deps; `berth` is in target/<profile>.
        let exe = std::env::current_exe().expect("current exe");
        exe.parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("berth")
    })
}

#[derive(Debug, Default)]
pub struct ServerOptions {
    pub database_url: Option<String>,
    /// Extra environment for the server process.
    pub env: Vec<(String, String)>,
    /// Reuse this data dir instead of a fresh one (restarts).
    pub data_dir: Option<PathBuf>,
    /// Extra `berth serve` flags, e.g. `--workspace-root DIR`.
    pub args: Vec<String>,
    /// Run the server as this (unprivileged) uid and gid, from a copy of the binary it can reach; its data dir is
    /// made its own.
    pub user: Option<u32>,
}

/// `berth serve` on a free port with `options`, its environment cleared but for PATH and HOME.
fn serve_command(options: &ServerOptions, data_dir: &Path) -> Command {
    let program = match options.user {
        Some(uid) => binary_for(uid, data_dir),
        None => berth_bin().to_path_buf(),
    };
    let mut command = Command::new(program);
    if let Some(uid) = options.user {
        command.uid(uid).gid(uid);
    }
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(&options.args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", data_dir)
        .env("BERTH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(url) = &options.database_url {
        command.arg("--database-url").arg(url);
    }
    for (key, value) in &options.env {
        command.env(key, value);
    }
    command
}

/// A copy of the berth binary beside `data_dir` that `uid` can run (the checkout may sit where it cannot), with
/// `data_dir` created and given to `uid`.
fn binary_for(uid: u32, data_dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let parent = data_dir.parent().expect("data dir has a parent");
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = parent.join("berth");
    if !copy.exists() {
        std::fs::copy(berth_bin(), &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::create_dir_all(data_dir).unwrap();
    std::os::unix::fs::chown(data_dir, Some(uid), Some(uid)).unwrap();
    copy
}

/// Runs `berth serve` with options it must refuse: waits for it to exit (within 60 s) and returns its exit code and
/// everything it wrote to stderr. Panics if it starts listening instead.
#[allow(dead_code)]
pub async fn serve_refused(options: ServerOptions) -> (Option<i32>, String) {
    let temp = tempfile::tempdir().expect("temp dir");
    let data_dir = options
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("data"));
    let child = serve_command(&options, &data_dir)
        .spawn()
        .expect("spawn berth serve");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("berth serve did not exit within 60 s")
        .expect("wait for berth serve");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("berth listening on"),
        "berth started although it should have refused: {stdout}"
    );
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[derive(Debug)]
pub struct TestServer {
    child: Option<Child>,
    pub url: String,
    pub admin_token: String,
    pub data_dir: PathBuf,
    _temp: Option<TempDir>,
    logs: Arc<Mutex<String>>,
    http: reqwest::Client,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> Self {
        let (temp, data_dir) = match options.data_dir.clone() {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::tempdir().expect("temp dir");
                let dir = temp.path().join("data");
                (Some(temp), dir)
            }
        };
        let mut child = serve_command(&options, &data_dir)
            .spawn()
            .expect("spawn berth serve");

        let logs = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 8192];
            while let Ok(read) = stderr.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });

        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix("berth listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!(
                "berth exited before listening; logs:\n{}",
                logs.lock().unwrap()
            );
        })
        .await
        .expect("berth did not start listening within 60 s");
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let admin_token = match options
            .env
            .iter()
            .find(|(key, _)| key == "BERTH_ADMIN_TOKEN")
        {
            Some((_, token)) => token.clone(),
            None => std::fs::read_to_string(data_dir.join("admin-token"))
                .expect("admin token file")
                .trim()
                .to_owned(),
        };
        Self {
            child: Some(child),
            url,
            admin_token,
            data_dir,
            _temp: temp,
            logs,
            http: reqwest::Client::new(),
        }
    }

    /// The server's own SQLite database, opened beside it (WAL lets both read and write).
    pub async fn open_store(&self) -> berth_store::Store {
        let url = format!("sqlite://{}", self.data_dir.join("berth.db").display());
        berth_store::Store::connect(&url)
            .await
            .expect("open the server's database")
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// A raw request: full control over token, content type and body bytes.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.body(body).send().await.expect("send request");
        let status = response.status();
        let bytes = response.bytes().await.expect("read body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (status, value)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        match body {
            Some(body) => {
                self.raw(
                    method,
                    path,
                    Some(token),
                    Some("application/json"),
                    serde_json::to_vec(&body).unwrap(),
                )
                .await
            }
            None => self.raw(method, path, Some(token), None, Vec::new()).await,
        }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, &self.admin_token, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, &self.admin_token, Some(body))
            .await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, &self.admin_token, Some(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, &self.admin_token, None)
            .await
    }

    /// The id of the company named `default`.
    pub async fn default_company(&self) -> String {
        let (status, companies) = self.get("/api/companies").await;
        assert_eq!(status, StatusCode::OK, "{companies}");
        companies
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "default")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn create_company(&self, name: &str) -> String {
        let (status, company) = self.post("/api/companies", json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "{company}");
        company["id"].as_str().unwrap().to_owned()
    }

    /// Creates an API key and returns its token.
    pub async fn create_key(&self, company_id: &str, role: &str) -> String {
        let (status, key) = self
            .post(
                &format!("/api/companies/{company_id}/api-keys"),
                json!({"name": format!("{role} key"), "role": role}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        key["token"].as_str().unwrap().to_owned()
    }

    /// Sends SIGTERM and waits for a clean exit within the contract's 10 s. Returns the logs.
    pub async fn stop(mut self) -> String {
        self.terminate().await;
        self.logs()
    }

    /// Like [`stop`](Self::stop), but hands back the data dir's owner so the caller can restart on it.
    pub async fn stop_keeping_data(mut self) -> Option<TempDir> {
        self.terminate().await;
        self._temp.take()
    }

    /// The server process's id while it runs (the runs bench reads its CPU time).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL — the crash case — keeping the data dir for a restart.
    pub async fn kill_keeping_data(mut self) -> Option<TempDir> {
        let mut child = self.child.take().expect("running");
        child.kill().await.unwrap();
        self._temp.take()
    }

    async fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().expect("pid");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("berth did not exit within 10 s of SIGTERM")
            .unwrap();
        assert!(
            exit.success(),
            "berth exited with {exit}; logs:\n{}",
            self.logs()
        );
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
