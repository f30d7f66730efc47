//! One plugin process, kept alive: spawn with a minimal environment, `initialize` with version negotiation, `health`
//! checks, restart with backoff and jitter, and a circuit that stays open after a crash loop (PLUGINS.md §3).

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::capabilities::ProviderStatus;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::Connection;
use crate::error::PluginError;
use crate::manifest::Manifest;
use crate::wire::{self, HealthResult, HealthStatus, HostInfo, InitializeParams, InitializeResult};

/// How long a plugin may take to answer `initialize`.
pub const INITIALIZE_DEADLINE: Duration = Duration::from_secs(15);
/// How long `health` may take before the plugin counts as hung.
const HEALTH_DEADLINE: Duration = Duration::from_secs(10);
/// A stderr line longer than this is cut in berth's log.
const MAX_LOG_LINE: usize = 8 * 1024;
/// The size of a plugin's stdout pipe: 1 MiB, Linux's limit for an unprivileged process.
const STDOUT_PIPE_BYTES: usize = 1024 * 1024;

/// When and how often a plugin is restarted.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    /// The first delay; each crash in a row doubles it (±25 % jitter).
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// This many crashes within `crash_window` open the circuit until the server restarts.
    pub crash_limit: usize,
    pub crash_window: Duration,
    /// Up this long, a plugin's next crash starts again from `initial_backoff`.
    pub stable_after: Duration,
    pub health_interval: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            crash_limit: 10,
            crash_window: Duration::from_secs(600),
            stable_after: Duration::from_secs(60),
            health_interval: Duration::from_secs(10),
        }
    }
}

/// What the host gives every plugin it starts.
#[derive(Clone, Debug)]
pub struct HostSettings {
    /// `<data-dir>/plugin-state`: each plugin's `HOME` is a private directory under it.
    pub state_root: PathBuf,
    pub restart: RestartPolicy,
    /// The `PATH` plugins get.
    pub path: String,
    /// berth's version, sent in `initialize`.
    pub host_version: String,
    pub deadlines: Deadlines,
}

/// How long each kind of call may take (PLUGINS.md §4): past it, the operation fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    pub call: Duration,
    pub probe: Duration,
    /// An execute may take its timeout and this much more.
    pub execute_grace: Duration,
    /// How long a started plugin may take to answer `initialize`.
    pub initialize: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            call: Duration::from_secs(30),
            probe: Duration::from_secs(120),
            execute_grace: Duration::from_secs(30),
            initialize: INITIALIZE_DEADLINE,
        }
    }
}

/// A plugin's state as operations and capabilities see it.
#[derive(Clone, Debug)]
pub enum PluginState {
    Starting,
    Ready(Arc<Live>),
    /// Down for now (crashed, restarting): the reason says when it is tried again.
    Unavailable(String),
    /// Will not be tried again until the server restarts (or, after a bad `initialize`, until its next start).
    Failed(String),
}

impl PluginState {
    /// The capabilities view: status and, unless ready, why.
    pub fn status(&self) -> (ProviderStatus, Option<String>) {
        match self {
            PluginState::Starting => (
                ProviderStatus::Starting,
                Some("the plugin is starting".to_owned()),
            ),
            PluginState::Ready(_) => (ProviderStatus::Ready, None),
            PluginState::Unavailable(reason) => (ProviderStatus::Unavailable, Some(reason.clone())),
            PluginState::Failed(reason) => (ProviderStatus::Failed, Some(reason.clone())),
        }
    }
}

/// A started and initialized plugin process.
#[derive(Debug)]
pub struct Live {
    pub(crate) connection: Connection,
    pub(crate) supported_methods: BTreeSet<String>,
    pub plugin_version: String,
}

impl Live {
    pub(crate) fn supports(&self, method: &str) -> bool {
        self.supported_methods.contains(method)
    }

    /// The methods the plugin listed in `initialize`.
    pub fn supported_methods(&self) -> &BTreeSet<String> {
        &self.supported_methods
    }

    /// The connection itself, for conformance checks (`berth plugin check`) that drive the protocol step by step;
    /// berth's operations go through [`crate::provider`], which adds the checks and masking a run needs.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }
}

/// A supervised plugin. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Plugin {
    manifest: Arc<Manifest>,
    state: watch::Receiver<PluginState>,
}

impl Plugin {
    /// Starts supervising `manifest`'s plugin; it stops (politely, then by force) when `shutdown` is cancelled.
    pub fn start(
        manifest: Manifest,
        settings: HostSettings,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let manifest = Arc::new(manifest);
        let (state_tx, state) = watch::channel(PluginState::Starting);
        let supervisor = Supervisor {
            manifest: manifest.clone(),
            settings,
            state: state_tx,
            shutdown,
            crashes: VecDeque::new(),
            consecutive: 0,
        };
        tasks.spawn(supervisor.run());
        Self { manifest, state }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    pub fn state(&self) -> PluginState {
        self.state.borrow().clone()
    }

    /// The live process, or at once the reason there is none: operations never wait for a plugin to come back.
    pub fn live(&self) -> Result<Arc<Live>, PluginError> {
        match self.state() {
            PluginState::Ready(live) => Ok(live),
            other => Err(PluginError::Unavailable {
                plugin: self.manifest.id.clone(),
                reason: other.status().1.unwrap_or_default(),
            }),
        }
    }

    /// Waits until the plugin is ready or has failed, at most `limit` (start-up, tests, `berth plugin check`).
    pub async fn settle(&self, limit: Duration) -> PluginState {
        let mut state = self.state.clone();
        // Past the limit it is still starting (or restarting): the state read below says so.
        let _elapsed = tokio::time::timeout(limit, async {
            loop {
                if matches!(
                    &*state.borrow_and_update(),
                    PluginState::Ready(_) | PluginState::Failed(_)
                ) {
                    return;
                }
                if state.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.state()
    }
}

struct Supervisor {
    manifest: Arc<Manifest>,
    settings: HostSettings,
    state: watch::Sender<PluginState>,
    shutdown: CancellationToken,
    crashes: VecDeque<Instant>,
    consecutive: u32,
}

/// How one start of the process ended.
enum Ended {
    Shutdown,
    /// It went down by itself or was judged hung: restarted after the backoff.
    Crashed(String),
    /// It answered `initialize` wrongly: shown as `failed` until its next start.
    Refused(String),
}

impl Supervisor {
    async fn run(mut self) {
        let id = self.manifest.id.clone();
        loop {
            self.state.send_replace(PluginState::Starting);
            let started = Instant::now();
            let (reason, failed) = match self.run_once().await {
                Ended::Shutdown => return,
                Ended::Crashed(reason) => (reason, false),
                Ended::Refused(reason) => (reason, true),
            };
            if started.elapsed() >= self.settings.restart.stable_after {
                self.consecutive = 0;
            }
            let now = Instant::now();
            self.crashes.push_back(now);
            while self
                .crashes
                .front()
                .is_some_and(|at| now.duration_since(*at) > self.settings.restart.crash_window)
            {
                self.crashes.pop_front();
            }
            if self.crashes.len() >= self.settings.restart.crash_limit {
                let reason = format!(
                    "{reason}; it went down {} times within {} s, so berth stopped restarting it (restart the server to try again)",
                    self.crashes.len(),
                    self.settings.restart.crash_window.as_secs()
                );
                tracing::error!(plugin.id = %id, %reason, "plugin circuit open");
                self.state.send_replace(PluginState::Failed(reason));
                return;
            }
            let delay = self.backoff();
            self.consecutive = self.consecutive.saturating_add(1);
            let retry = format!("{reason}; restarting in {} ms", delay.as_millis());
            tracing::warn!(plugin.id = %id, reason = %retry, "plugin down");
            metrics::counter!("berth_plugin_restarts_total", "plugin" => id.clone()).increment(1);
            self.state.send_replace(if failed {
                PluginState::Failed(retry)
            } else {
                PluginState::Unavailable(retry)
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    fn backoff(&self) -> Duration {
        let policy = &self.settings.restart;
        let doubled = policy
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(self.consecutive.min(20)));
        let base = doubled.min(policy.max_backoff);
        let jitter = rand::random_range(0.75..=1.25);
        base.mul_f64(jitter).min(policy.max_backoff)
    }

    async fn run_once(&mut self) -> Ended {
        let mut child = match self.spawn() {
            Ok(child) => child,
            Err(reason) => return Ended::Crashed(reason),
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Ended::Crashed("its stdio could not be opened".to_owned());
        };
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(log_stderr(self.manifest.id.clone(), stderr));
        }
        let connection = Connection::start(&self.manifest.id, stdout, stdin);
        let ended = self.serve(&mut child, &connection).await;
        connection.close();
        ended
    }

    /// Initializes the started process, then watches it until it ends or berth shuts down.
    async fn serve(&mut self, child: &mut Child, connection: &Connection) -> Ended {
        let live = tokio::select! {
            live = self.initialize(connection) => live,
            status = child.wait() => {
                return Ended::Crashed(format!("it exited during initialize ({})", describe_exit(status)));
            }
            () = self.shutdown.cancelled() => {
                stop(child, None).await;
                return Ended::Shutdown;
            }
        };
        let live = match live {
            Ok(live) => Arc::new(live),
            Err(reason) => {
                // A process that died on the way is a crash; one that answered wrongly is failed for this start.
                let exited = tokio::time::timeout(Duration::from_millis(200), child.wait())
                    .await
                    .is_ok();
                stop(child, None).await;
                return if exited {
                    Ended::Crashed(reason)
                } else {
                    Ended::Refused(reason)
                };
            }
        };
        tracing::info!(plugin.id = %self.manifest.id, plugin.version = %live.plugin_version, "plugin ready");
        self.state.send_replace(PluginState::Ready(live.clone()));

        let mut health = tokio::time::interval(self.settings.restart.health_interval);
        health.tick().await;
        loop {
            tokio::select! {
                status = child.wait() => {
                    return Ended::Crashed(format!("it exited ({})", describe_exit(status)));
                }
                () = connection.closed() => {
                    let reason = connection
                        .protocol_error()
                        .map_or_else(|| "it closed its stdout".to_owned(), |error| format!("it broke the protocol: {error}"));
                    stop(child, None).await;
                    return Ended::Crashed(reason);
                }
                _ = health.tick() => {
                    match connection.call::<_, HealthResult>(wire::HEALTH, &serde_json::json!({}), HEALTH_DEADLINE).await {
                        Ok(result) if result.status == HealthStatus::Error => {
                            tracing::warn!(plugin.id = %self.manifest.id, message = ?result.message, "plugin reports an error");
                        }
                        Ok(_) => {}
                        Err(error) => {
                            stop(child, None).await;
                            return Ended::Crashed(format!("it stopped answering health ({error})"));
                        }
                    }
                }
                () = self.shutdown.cancelled() => {
                    stop(child, Some(connection)).await;
                    self.state.send_replace(PluginState::Unavailable("berth is shutting down".to_owned()));
                    return Ended::Shutdown;
                }
            }
        }
    }

    fn spawn(&self) -> Result<Child, String> {
        let manifest = &self.manifest;
        let home = self.settings.state_root.join(&manifest.id);
        std::fs::create_dir_all(&home).map_err(|error| {
            format!(
                "cannot create its state directory {}: {error}",
                home.display()
            )
        })?;
        let mut command = Command::new(manifest.program());
        command
            .args(&manifest.command[1..])
            .current_dir(&manifest.dir)
            // Nothing of the server's environment (its admin token, database URL, master key) reaches a plugin.
            .env_clear()
            .env("PATH", &self.settings.path)
            .env("HOME", &home)
            .env("BERTH_PLUGIN_ID", &manifest.id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a terminal's ^C reaches berth, which then shuts plugins down in order.
            .process_group(0);
        for name in &manifest.env {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let child = command
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", manifest.program().display()))?;
        // A bigger stdout pipe, as for commands (`berth_drivers::process`): a plugin streaming output then fills it
        // without waiting on us, and each read takes a whole line of output or more.
        if let Some(stdout) = &child.stdout
            && let Err(error) = rustix::pipe::fcntl_setpipe_size(
                std::os::fd::AsFd::as_fd(stdout),
                STDOUT_PIPE_BYTES,
            )
        {
            tracing::debug!(plugin.id = %manifest.id, %error, "could not enlarge the plugin's stdout pipe");
        }
        Ok(child)
    }

    async fn initialize(&self, connection: &Connection) -> Result<Live, String> {
        let params = InitializeParams {
            protocol_versions: wire::PROTOCOL_VERSIONS.to_vec(),
            host: HostInfo {
                name: "berth".to_owned(),
                version: self.settings.host_version.clone(),
            },
            plugin_id: self.manifest.id.clone(),
            state_dir: self
                .settings
                .state_root
                .join(&self.manifest.id)
                .display()
                .to_string(),
        };
        let result: InitializeResult = connection
            .call(
                wire::INITIALIZE,
                &params,
                self.settings.deadlines.initialize,
            )
            .await
            .map_err(|error| format!("initialize failed: {error}"))?;
        if !wire::PROTOCOL_VERSIONS.contains(&result.protocol_version) {
            return Err(format!(
                "it answered protocol version {}, but berth offered {:?}",
                result.protocol_version,
                wire::PROTOCOL_VERSIONS
            ));
        }
        if result.plugin.id != self.manifest.id {
            return Err(format!(
                "it calls itself {:?}, but its manifest says {:?}",
                result.plugin.id, self.manifest.id
            ));
        }
        Ok(Live {
            connection: connection.clone(),
            supported_methods: result.supported_methods.into_iter().collect(),
            plugin_version: result.plugin.version,
        })
    }
}

/// Asks the plugin to shut down (when it is talking), then kills what is left of its process group.
async fn stop(child: &mut Child, connection: Option<&Connection>) {
    if let Some(connection) = connection {
        let polite = connection
            .call::<_, serde_json::Value>(
                wire::SHUTDOWN,
                &serde_json::json!({}),
                Duration::from_secs(2),
            )
            .await;
        if polite.is_ok()
            && tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .is_ok()
        {
            return;
        }
    }
    if let Some(group) = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        // The whole group: a plugin's own children (a sandbox it started) go with it.
        let _gone = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _reaped = child.kill().await;
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(error) => format!("wait failed: {error}"),
    }
}

/// A plugin's stderr is its log: each line goes to berth's log under the plugin's id, never to an API response.
async fn log_stderr(plugin_id: String, stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut lines)
            .take(MAX_LOG_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::info!(plugin.id = %plugin_id, line = %text.trim_end(), "plugin log");
            }
        }
    }
}
