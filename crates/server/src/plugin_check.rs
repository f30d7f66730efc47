//! `berth plugin check DIR`: a conformance check for plugin authors (PLUGINS.md). It starts the plugin the way the
//! server does (the supervisor: cleared environment, private `HOME`, `initialize` with version negotiation), then
//! drives protocol v1 step by step over its stdio — probe, a lease, a workspace, executes with streamed output,
//! stdin whole and streamed, a timeout, a cancel, release and destroy, a secret's journey, `shutdown` — and reports
//! one line per check. Every step has a deadline, so a plugin that hangs fails a check instead of hanging the tool.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::task::Poll;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::provider::{ProviderDescriptor, ProviderSpec};
use berth_core::secret_paths::SecretPaths;
use berth_core::validation::ValidationErrors;
use berth_plugins::OutputChunk;
use berth_plugins::PluginError;
use berth_plugins::manifest::{DriverEntry, DriverKind, Manifest};
use berth_plugins::supervisor::{
    Deadlines, HostSettings, Live, Plugin, PluginState, RestartPolicy,
};
use berth_plugins::wire::{self, CallContext, ExecuteParams, ExecuteResult, WireLease};
use clap::Args;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the plugin may take to become ready: `initialize` has 15 s, plus a moment to start.
const START_LIMIT: Duration = Duration::from_secs(20);
/// How long a step waits for a plugin that went down (and is being restarted) to be ready again.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// The longest any one check may take, whatever it waits for.
const CHECK_LIMIT: Duration = Duration::from_secs(60);
/// The deadline of a call that is not an execute.
const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// The deadline (ms) of an execute whose command ends within a second (or is timed out or cancelled within one).
const EXECUTE_DEADLINE_MS: u64 = 10_000;
/// How long a plugin has to exit after answering `shutdown`.
const EXIT_LIMIT: Duration = Duration::from_secs(5);

/// The methods a sandbox provider cannot do without: berth fails operations that need a missing one.
const REQUIRED_METHODS: [&str; 5] = [
    wire::ACQUIRE_LEASE,
    wire::RELEASE_LEASE,
    wire::DESTROY_LEASE,
    wire::REALIZE_WORKSPACE,
    wire::EXECUTE,
];

/// `berth plugin check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The plugin's directory, holding its `berth-plugin.json`.
    pub dir: PathBuf,
    /// Which of its drivers to check [default: its first sandbox_provider, else its first driver].
    #[arg(long)]
    pub driver: Option<String>,
    /// The driver's config as an environment would hold it (without `provider`), as JSON or @FILE. Secret-ref
    /// fields are given in plaintext here, as the plugin receives them.
    #[arg(long)]
    pub config: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// How long each execute may take before it fails its check. For tests.
    #[arg(long, hide = true, default_value_t = EXECUTE_DEADLINE_MS)]
    pub execute_deadline_ms: u64,
}

/// Why the check could not even begin.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read {path}")]
    ConfigFile {
        path: String,
        source: std::io::Error,
    },
    #[error("--config is not a JSON object: {0}")]
    Config(String),
    #[error("cannot create a state directory for the plugin")]
    StateDir(#[source] std::io::Error),
}

/// How one check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub millis: u64,
}

/// Everything `berth plugin check` found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub plugin_dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_key: Option<String>,
    /// No check failed.
    pub passed: bool,
    pub checks: Vec<CheckResult>,
}

impl Report {
    /// One line per check: `PASS name`, `FAIL name: why`, `SKIP name: why`.
    pub fn lines(&self) -> Vec<String> {
        self.checks
            .iter()
            .map(|check| {
                let word = match check.outcome {
                    Outcome::Pass => "PASS",
                    Outcome::Fail => "FAIL",
                    Outcome::Skip => "SKIP",
                };
                match &check.reason {
                    Some(reason) => format!("{word} {}: {reason}", check.name),
                    None => format!("{word} {}", check.name),
                }
            })
            .collect()
    }
}

/// Runs `berth plugin check`: exit 0 only when no check failed.
pub async fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let config = match args.config.as_deref() {
        None => Map::new(),
        Some(text) => parse_config(text)?,
    };
    let execute_deadline = Duration::from_millis(args.execute_deadline_ms.max(1));
    let report = check(&args.dir, args.driver.as_deref(), config, execute_deadline).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in report.lines() {
            println!("{line}");
        }
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn parse_config(text: &str) -> Result<Map<String, Value>, CheckError> {
    let contents = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|source| CheckError::ConfigFile {
            path: path.to_owned(),
            source,
        })?,
        None => text.to_owned(),
    };
    match serde_json::from_str(&contents) {
        Ok(Value::Object(config)) => Ok(config),
        Ok(_) => Err(CheckError::Config("it is not an object".to_owned())),
        Err(error) => Err(CheckError::Config(error.to_string())),
    }
}

/// Checks the plugin in `dir`: its driver `driver` (or its first sandbox provider), with `config` as the driver's
/// config, each execute within `execute_deadline`. The plugin runs with a private state directory that is removed
/// afterwards.
pub async fn check(
    dir: &Path,
    driver: Option<&str>,
    config: Map<String, Value>,
    execute_deadline: Duration,
) -> Result<Report, CheckError> {
    let mut report = Report {
        plugin_dir: dir.display().to_string(),
        plugin_id: None,
        driver_key: None,
        passed: false,
        checks: Vec::new(),
    };
    let started = Instant::now();
    let loaded = load(dir, driver, config);
    let (manifest, entry, descriptor, config) = match loaded {
        Ok(loaded) => loaded,
        Err(reason) => {
            report
                .checks
                .push(result("manifest", started, Verdict::Fail(reason)));
            return Ok(report);
        }
    };
    report
        .checks
        .push(result("manifest", started, Verdict::Pass));
    report.plugin_id = Some(manifest.id.clone());
    report.driver_key = Some(entry.driver_key.clone());

    let state = StateDir::create().map_err(CheckError::StateDir)?;
    let settings = HostSettings {
        state_root: state.0.clone(),
        // Restarted soon after a crash, so one broken step does not fail every later one.
        restart: RestartPolicy {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            ..RestartPolicy::default()
        },
        path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned()),
        host_version: env!("CARGO_PKG_VERSION").to_owned(),
        deadlines: Deadlines::default(),
    };
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let plugin = Plugin::start(manifest, settings, shutdown.clone(), &tasks);
    let mut checker = Checker {
        plugin,
        driver_key: entry.driver_key.clone(),
        secrets: descriptor.secret_paths().clone(),
        schema: entry.config_schema.clone(),
        config,
        company_id: CompanyId::new().to_string(),
        environment_id: EnvironmentId::new().to_string(),
        execute_deadline,
        lease: None,
        cwd: None,
        results: Vec::new(),
    };
    checker.run_all().await;
    report.checks.append(&mut checker.results);

    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(EXIT_LIMIT, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("the plugin's supervisor did not stop in time");
    }
    drop(state);
    report.passed = report
        .checks
        .iter()
        .all(|check| check.outcome != Outcome::Fail);
    Ok(report)
}

/// The manifest, the driver to check, its descriptor (the schema compiled as the server would) and the config with
/// the schema's defaults, or why any of it is wrong.
fn load(
    dir: &Path,
    driver: Option<&str>,
    config: Map<String, Value>,
) -> Result<
    (
        Manifest,
        DriverEntry,
        ProviderDescriptor,
        Map<String, Value>,
    ),
    String,
> {
    let manifest = Manifest::load(dir).map_err(|error| error.to_string())?;
    let entry = match driver {
        Some(key) => manifest
            .drivers
            .iter()
            .find(|entry| entry.driver_key == key)
            .ok_or_else(|| format!("the manifest has no driver {key:?}"))?,
        // A sandbox provider and an environment driver speak the same calls: either can be checked.
        None => manifest
            .drivers
            .iter()
            .find(|entry| entry.kind == DriverKind::SandboxProvider)
            .or_else(|| manifest.drivers.first())
            .ok_or("the manifest has no driver")?,
    }
    .clone();
    let descriptor = ProviderDescriptor::new(ProviderSpec {
        key: entry.driver_key.clone(),
        display_name: entry.display_name.clone(),
        description: entry.description.clone(),
        config_schema: entry.config_schema.clone(),
        supports_reusable_leases: entry.supports_reusable_leases,
        supports_run_execution: true,
    })
    .map_err(|error| error.to_string())?;
    let mut errors = ValidationErrors::new();
    let config = descriptor.validate_fields("config", config, &mut errors);
    if !errors.is_empty() {
        return Err(format!(
            "the config does not match driver {:?}'s configSchema ({errors}); give one that does with --config",
            entry.driver_key
        ));
    }
    Ok((manifest, entry, descriptor, config))
}

/// A private directory for the plugin's state (its `HOME`), removed when dropped.
struct StateDir(PathBuf);

impl StateDir {
    fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(
            "berth-plugin-check-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), %error, "could not remove the plugin's state directory");
        }
    }
}

fn result(name: &'static str, started: Instant, verdict: Verdict) -> CheckResult {
    let (outcome, reason) = match verdict {
        Verdict::Pass => (Outcome::Pass, None),
        Verdict::Fail(reason) => (Outcome::Fail, Some(reason)),
        Verdict::Skip(reason) => (Outcome::Skip, Some(reason)),
    };
    CheckResult {
        name,
        outcome,
        reason,
        millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

enum Verdict {
    Pass,
    Fail(String),
    Skip(String),
}

impl From<Result<(), String>> for Verdict {
    fn from(result: Result<(), String>) -> Self {
        match result {
            Ok(()) => Verdict::Pass,
            Err(reason) => Verdict::Fail(reason),
        }
    }
}

/// What to do while an execute runs, once its first output has arrived.
#[derive(Clone, Copy, PartialEq, Eq)]
enum During<'a> {
    Nothing,
    /// Send `environmentCancelExecution`.
    Cancel,
    /// Look for this canary in the argv and environment of the plugin and every process it started.
    Inspect(&'a str),
}

/// How stdin reaches an execute.
enum Stdin<'a> {
    None,
    Whole(&'a [u8]),
    /// `environmentExecuteInput` notifications, one per chunk, the last with `eof`.
    Streamed(&'a [&'a [u8]]),
}

/// One execute as the plugin answered it.
struct Execution {
    answer: Result<ExecuteResult, PluginError>,
    /// From notifications, then (for a plugin that does not stream) from the result.
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Output that broke the rules: an offset that leaves a gap or overlaps, data that is not base64.
    problems: Vec<String>,
    /// The output came (also) in the result instead of notifications.
    in_result: bool,
    /// How long before the answer the first output notification arrived.
    lead: Option<Duration>,
    /// What [`During`] found or did.
    during: Option<Result<(), String>>,
}

impl Execution {
    /// The answer, with the plugin's failure or broken output as the reason.
    fn result(&self) -> Result<&ExecuteResult, String> {
        let answer = self.answer.as_ref().map_err(ToString::to_string)?;
        if let Some(problem) = self.problems.first() {
            return Err(problem.clone());
        }
        Ok(answer)
    }
}

struct Checker {
    plugin: Plugin,
    driver_key: String,
    secrets: SecretPaths,
    schema: Value,
    config: Map<String, Value>,
    company_id: String,
    environment_id: String,
    execute_deadline: Duration,
    /// The lease the lease checks share, once acquired.
    lease: Option<WireLease>,
    /// Its workspace, once realized.
    cwd: Option<String>,
    results: Vec<CheckResult>,
}

impl Checker {
    async fn run_all(&mut self) {
        let started = Instant::now();
        let handshake = self.handshake().await;
        let ready = matches!(handshake, Verdict::Pass);
        self.results.push(result("handshake", started, handshake));
        let checks: [&'static str; 15] = [
            "health",
            "validate-config",
            "probe",
            "acquire-lease",
            "realize-workspace",
            "execute-streaming",
            "execute-exit-code",
            "stdin",
            "stdin-stream",
            "timeout",
            "cancel",
            "release-lease",
            "destroy-lease",
            "secrets",
            "shutdown",
        ];
        for name in checks {
            let started = Instant::now();
            let verdict = if ready {
                match tokio::time::timeout(CHECK_LIMIT, self.one(name)).await {
                    Ok(verdict) => verdict,
                    Err(_elapsed) => {
                        Verdict::Fail(format!("did not finish within {} s", CHECK_LIMIT.as_secs()))
                    }
                }
            } else {
                Verdict::Skip("the plugin never became ready".to_owned())
            };
            self.results.push(result(name, started, verdict));
        }
    }

    async fn one(&mut self, name: &str) -> Verdict {
        match name {
            "health" => self.health().await,
            "validate-config" => self.validate_config().await,
            "probe" => self.probe().await,
            "acquire-lease" => self.acquire().await,
            "realize-workspace" => self.realize().await,
            "execute-streaming" => self.execute_streaming().await,
            "execute-exit-code" => self.execute_exit_code().await,
            "stdin" => self.stdin().await,
            "stdin-stream" => self.stdin_stream().await,
            "timeout" => self.timeout().await,
            "cancel" => self.cancel().await,
            "release-lease" => self.end_lease(wire::RELEASE_LEASE).await,
            "destroy-lease" => self.end_lease(wire::DESTROY_LEASE).await,
            "secrets" => self.secrets().await,
            "shutdown" => self.shutdown().await,
            other => Verdict::Fail(format!("no check named {other:?}")),
        }
    }

    /// The plugin, ready: waits a little for one that is being restarted after an earlier step broke it (its state
    /// may still say ready, with the closed connection, until the supervisor notices).
    async fn live(&self) -> Result<std::sync::Arc<Live>, String> {
        let started = Instant::now();
        loop {
            let state = self
                .plugin
                .settle(READY_LIMIT.saturating_sub(started.elapsed()))
                .await;
            match state {
                PluginState::Ready(live) if !live.connection().is_closed() => return Ok(live),
                PluginState::Ready(_) if started.elapsed() < READY_LIMIT => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                PluginState::Ready(_) => {
                    return Err("the plugin went down and did not come back".to_owned());
                }
                other => {
                    return Err(format!(
                        "the plugin is not ready: {}",
                        other.status().1.unwrap_or_default()
                    ));
                }
            }
        }
    }

    /// The plugin and whether it lists `method`: a check of a method it does not list is skipped.
    async fn live_with(&self, method: &str) -> Result<std::sync::Arc<Live>, Verdict> {
        let live = self.live().await.map_err(Verdict::Fail)?;
        if live.supported_methods().contains(method) {
            Ok(live)
        } else {
            Err(Verdict::Skip(format!(
                "{method} is not in supportedMethods"
            )))
        }
    }

    fn context(&self, config: &Map<String, Value>) -> CallContext {
        CallContext {
            driver_key: self.driver_key.clone(),
            company_id: self.company_id.clone(),
            environment_id: self.environment_id.clone(),
            config: config.clone(),
        }
    }

    fn lease_params(&self, lease: &WireLease, config: &Map<String, Value>) -> wire::LeaseParams {
        wire::LeaseParams {
            context: self.context(config),
            lease: lease.clone(),
        }
    }

    async fn handshake(&self) -> Verdict {
        let state = self.plugin.settle(START_LIMIT).await;
        let live = match state {
            PluginState::Ready(live) => live,
            other => {
                return Verdict::Fail(format!(
                    "it did not answer initialize with protocol version 1 within {} s: {}",
                    START_LIMIT.as_secs(),
                    other.status().1.unwrap_or_default()
                ));
            }
        };
        let listed = live.supported_methods();
        let missing: Vec<&str> = REQUIRED_METHODS
            .into_iter()
            .filter(|method| !listed.contains(*method))
            .collect();
        if !missing.is_empty() {
            return Verdict::Fail(format!(
                "supportedMethods lacks {}: berth fails every run that needs them",
                missing.join(", ")
            ));
        }
        let known: BTreeSet<&str> = [
            wire::INITIALIZE,
            wire::HEALTH,
            wire::SHUTDOWN,
            wire::VALIDATE_CONFIG,
            wire::PROBE,
            wire::ACQUIRE_LEASE,
            wire::RESUME_LEASE,
            wire::RELEASE_LEASE,
            wire::DESTROY_LEASE,
            wire::REALIZE_WORKSPACE,
            wire::EXECUTE,
            wire::CANCEL_EXECUTION,
            wire::EXECUTE_INPUT,
        ]
        .into();
        let unknown: Vec<&str> = listed
            .iter()
            .map(String::as_str)
            .filter(|method| !known.contains(method))
            .collect();
        if !unknown.is_empty() {
            // Not a failure: a plugin may offer optional methods of a later berth. Said in the log only.
            tracing::info!(methods = ?unknown, "supportedMethods lists methods this berth does not know");
        }
        Verdict::Pass
    }

    async fn health(&self) -> Verdict {
        let live = match self.live_with(wire::HEALTH).await {
            Ok(live) => live,
            Err(verdict) => return verdict,
        };
        let answer = live
            .connection()
            .call::<_, wire::HealthResult>(wire::HEALTH, &json!({}), CALL_DEADLINE)
            .await;
        match answer {
            Ok(health) if health.status == wire::HealthStatus::Error => Verdict::Fail(format!(
                "it reports status error: {}",
                health.message.unwrap_or_default()
            )),
            Ok(_) => Verdict::Pass,
            Err(error) => Verdict::Fail(error.to_string()),
        }
    }

    async fn validate_config(&self) -> Verdict {
        let live = match self.live_with(wire::VALIDATE_CONFIG).await {
            Ok(live) => live,
            Err(verdict) => return verdict,
        };
        validated(&live, &self.context(&self.config))
            .await
            .map(drop)
            .into()
    }

    async fn probe(&self) -> Verdict {
        let live = match self.live_with(wire::PROBE).await {
            Ok(live) => live,
            Err(verdict) => return verdict,
        };
        probed(&live, &self.context(&self.config))
            .await
            .map(drop)
            .into()
    }

    async fn acquire(&mut self) -> Verdict {
        let live = match self.live().await {
            Ok(live) => live,
            Err(reason) => return Verdict::Fail(reason),
        };
        match acquired(&live, self.context(&self.config)).await {
            Ok(lease) => {
                self.lease = Some(lease);
                Verdict::Pass
            }
            Err(reason) => Verdict::Fail(reason),
        }
    }

    fn needs_lease(&self) -> Result<WireLease, Verdict> {
        self.lease.clone().ok_or_else(|| {
            Verdict::Skip("needs a lease, and acquire-lease did not pass".to_owned())
        })
    }

    fn needs_workspace(&self) -> Result<(WireLease, String), Verdict> {
        let lease = self.needs_lease()?;
        let cwd = self.cwd.clone().ok_or_else(|| {
            Verdict::Skip("needs a workspace, and realize-workspace did not pass".to_owned())
        })?;
        Ok((lease, cwd))
    }

    async fn realize(&mut self) -> Verdict {
        let lease = match self.needs_lease() {
            Ok(lease) => lease,
            Err(verdict) => return verdict,
        };
        let live = match self.live().await {
            Ok(live) => live,
            Err(reason) => return Verdict::Fail(reason),
        };
        match realized(&live, &self.lease_params(&lease, &self.config)).await {
            Ok(cwd) => {
                self.cwd = Some(cwd);
                Verdict::Pass
            }
            Err(reason) => Verdict::Fail(reason),
        }
    }

    /// Runs `argv` in the shared workspace.
    async fn run(
        &self,
        argv: &[&str],
        stdin: Stdin<'_>,
        timeout_ms: Option<u64>,
        deadline: Duration,
        during: During<'_>,
    ) -> Result<Execution, Verdict> {
        let (lease, cwd) = self.needs_workspace()?;
        let live = self.live().await.map_err(Verdict::Fail)?;
        let params = self.execute_params(&lease, &cwd, &self.config, argv, &stdin, timeout_ms);
        Ok(self.execute(&live, params, &stdin, deadline, during).await)
    }

    fn execute_params(
        &self,
        lease: &WireLease,
        cwd: &str,
        config: &Map<String, Value>,
        argv: &[&str],
        stdin: &Stdin<'_>,
        timeout_ms: Option<u64>,
    ) -> ExecuteParams {
        let (command, args) = argv.split_first().map_or(("", &[][..]), |(c, a)| (*c, a));
        ExecuteParams {
            context: self.context(config),
            lease: lease.clone(),
            execution_id: format!("check-{:016x}", rand::random::<u64>()),
            command: command.to_owned(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            cwd: cwd.to_owned(),
            env: [("PATH", "/usr/local/bin:/usr/bin:/bin")]
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
            stdin: match stdin {
                Stdin::Whole(bytes) => Some(BASE64.encode(bytes)),
                Stdin::None | Stdin::Streamed(_) => None,
            },
            stdin_stream: matches!(stdin, Stdin::Streamed(_)),
            timeout_ms,
        }
    }

    /// Sends one execute and takes its output as the host does: notifications checked against their offsets, then
    /// the answer (and any output it carries).
    async fn execute(
        &self,
        live: &Live,
        params: ExecuteParams,
        stdin: &Stdin<'_>,
        deadline: Duration,
        during: During<'_>,
    ) -> Execution {
        let connection = live.connection();
        let execution_id = params.execution_id.clone();
        let mut output = connection.subscribe_output(&execution_id);
        let call = connection.call::<_, ExecuteResult>(wire::EXECUTE, &params, deadline);
        tokio::pin!(call);
        let mut execution = Execution {
            answer: Err(PluginError::Protocol {
                plugin: self.plugin.id().to_owned(),
                message: "no answer".to_owned(),
            }),
            stdout: Vec::new(),
            stderr: Vec::new(),
            problems: Vec::new(),
            in_result: false,
            lead: None,
            during: None,
        };
        // The first poll queues the request; the input notifications follow it, as the host sends them.
        let mut early = None;
        if let Poll::Ready(answer) = futures::poll!(&mut call) {
            early = Some(answer);
        }
        if let Stdin::Streamed(chunks) = stdin {
            let last = chunks.len().saturating_sub(1);
            for (index, chunk) in chunks.iter().enumerate() {
                let input = wire::InputNotification {
                    execution_id: execution_id.clone(),
                    data: BASE64.encode(chunk),
                    eof: index == last,
                };
                if let Err(error) = connection.notify(wire::EXECUTE_INPUT, &input).await {
                    execution.problems.push(error.to_string());
                }
            }
        }
        let mut first_output = None;
        let mut open = true;
        let answer = match early {
            Some(answer) => answer,
            None => loop {
                tokio::select! {
                    biased;
                    chunk = output.recv(), if open => {
                        let Some(chunk) = chunk else {
                            open = false;
                            continue;
                        };
                        take(&mut execution, chunk);
                        if first_output.is_none() {
                            first_output = Some(Instant::now());
                            execution.during = self.during(live, &execution_id, during).await;
                        }
                    }
                    answer = &mut call => break answer,
                }
            },
        };
        let answered = Instant::now();
        while let Some(chunk) = output.try_recv() {
            take(&mut execution, chunk);
        }
        execution.lead = first_output.map(|at| answered.saturating_duration_since(at));
        if let Err(PluginError::Deadline { .. }) = &answer
            && live.supported_methods().contains(wire::CANCEL_EXECUTION)
        {
            // As the host does: a call past its deadline is cancelled, so the command does not outlive the check.
            let _ = self.during(live, &execution_id, During::Cancel).await;
        }
        if let Ok(result) = &answer {
            for (data, into) in [
                (&result.stdout, &mut execution.stdout),
                (&result.stderr, &mut execution.stderr),
            ] {
                let Some(data) = data else { continue };
                match BASE64.decode(data) {
                    Ok(bytes) if bytes.is_empty() => {}
                    Ok(bytes) => {
                        execution.in_result = true;
                        into.extend(bytes);
                    }
                    Err(error) => execution
                        .problems
                        .push(format!("output in the result is not base64: {error}")),
                }
            }
        }
        execution.answer = answer;
        execution
    }

    async fn during(
        &self,
        live: &Live,
        execution_id: &str,
        during: During<'_>,
    ) -> Option<Result<(), String>> {
        match during {
            During::Nothing => None,
            During::Cancel => {
                let params = wire::CancelParams {
                    execution_id: execution_id.to_owned(),
                };
                Some(
                    live.connection()
                        .call::<_, Value>(wire::CANCEL_EXECUTION, &params, CALL_DEADLINE)
                        .await
                        .map(drop)
                        .map_err(|error| format!("{} failed: {error}", wire::CANCEL_EXECUTION)),
                )
            }
            During::Inspect(canary) => Some(inspect(self.plugin.id(), canary)),
        }
    }

    async fn execute_streaming(&self) -> Verdict {
        let argv = ["sh", "-c", "echo one; sleep 0.5; echo two"];
        let execution = match self
            .run(
                &argv,
                Stdin::None,
                Some(20_000),
                self.execute_deadline,
                During::Nothing,
            )
            .await
        {
            Ok(execution) => execution,
            Err(verdict) => return verdict,
        };
        let result = match execution.result() {
            Ok(result) => result,
            Err(reason) => return Verdict::Fail(reason),
        };
        if result.exit_code != Some(0) {
            return Verdict::Fail(format!(
                "`sh -c 'echo one; sleep 0.5; echo two'` ended with exit code {:?}, signal {:?}",
                result.exit_code, result.signal
            ));
        }
        if execution.stdout != b"one\ntwo\n" {
            return Verdict::Fail(format!(
                "stdout was {:?}, not \"one\\ntwo\\n\"",
                String::from_utf8_lossy(&execution.stdout)
            ));
        }
        if execution.in_result {
            return Verdict::Fail(format!(
                "the output came in the result: send it as {} notifications while the command runs",
                wire::EXECUTE_OUTPUT
            ));
        }
        // "one" was printed half a second before the command ended: it must not wait for the end.
        match execution.lead {
            Some(lead) if lead >= Duration::from_millis(200) => Verdict::Pass,
            _ => Verdict::Fail(
                "the output arrived only as the command ended: stream it while the command runs"
                    .to_owned(),
            ),
        }
    }

    async fn execute_exit_code(&self) -> Verdict {
        let argv = ["sh", "-c", "echo oops >&2; exit 3"];
        let execution = match self
            .run(
                &argv,
                Stdin::None,
                Some(20_000),
                self.execute_deadline,
                During::Nothing,
            )
            .await
        {
            Ok(execution) => execution,
            Err(verdict) => return verdict,
        };
        let result = match execution.result() {
            Ok(result) => result,
            Err(reason) => return Verdict::Fail(reason),
        };
        if result.exit_code != Some(3) || result.timed_out {
            return Verdict::Fail(format!(
                "`exit 3` came back as exit code {:?}, signal {:?}, timedOut {}",
                result.exit_code, result.signal, result.timed_out
            ));
        }
        if execution.stderr != b"oops\n" {
            return Verdict::Fail(format!(
                "stderr was {:?}, not \"oops\\n\"",
                String::from_utf8_lossy(&execution.stderr)
            ));
        }
        Verdict::Pass
    }

    async fn stdin(&self) -> Verdict {
        let text = b"hello from stdin\n";
        let execution = self
            .run(
                &["cat"],
                Stdin::Whole(text),
                Some(20_000),
                self.execute_deadline,
                During::Nothing,
            )
            .await;
        echoed(execution, text)
    }

    async fn stdin_stream(&self) -> Verdict {
        if let Err(verdict) = self.live_with(wire::EXECUTE_INPUT).await {
            return verdict;
        }
        // The last chunk is empty: eof may come on its own.
        let chunks: [&[u8]; 4] = [b"hello ", b"streamed ", b"stdin\n", b""];
        let execution = self
            .run(
                &["cat"],
                Stdin::Streamed(&chunks),
                Some(20_000),
                self.execute_deadline,
                During::Nothing,
            )
            .await;
        echoed(execution, b"hello streamed stdin\n")
    }

    async fn timeout(&self) -> Verdict {
        let started = Instant::now();
        let execution = match self
            .run(
                &["sleep", "30"],
                Stdin::None,
                Some(500),
                self.execute_deadline,
                During::Nothing,
            )
            .await
        {
            Ok(execution) => execution,
            Err(verdict) => return verdict,
        };
        let result = match execution.result() {
            Ok(result) => result,
            Err(reason) => return Verdict::Fail(reason),
        };
        if !result.timed_out {
            return Verdict::Fail(format!(
                "`sleep 30` with timeoutMs 500 came back without timedOut (exit code {:?}, signal {:?}) after {} ms",
                result.exit_code,
                result.signal,
                started.elapsed().as_millis()
            ));
        }
        Verdict::Pass
    }

    async fn cancel(&self) -> Verdict {
        if let Err(verdict) = self.live_with(wire::CANCEL_EXECUTION).await {
            return verdict;
        }
        let argv = ["sh", "-c", "echo started; exec sleep 30"];
        let execution = match self
            .run(
                &argv,
                Stdin::None,
                None,
                self.execute_deadline,
                During::Cancel,
            )
            .await
        {
            Ok(execution) => execution,
            Err(verdict) => return verdict,
        };
        match &execution.during {
            None => {
                return Verdict::Fail(match execution.result() {
                    Err(reason) => reason,
                    Ok(_) => "no output arrived from `echo started; exec sleep 30`, so nothing was cancelled"
                        .to_owned(),
                });
            }
            Some(Err(reason)) => return Verdict::Fail(reason.clone()),
            Some(Ok(())) => {}
        }
        let result = match execution.result() {
            Ok(result) => result,
            Err(reason) => return Verdict::Fail(reason),
        };
        if result.exit_code == Some(0) || result.timed_out {
            return Verdict::Fail(format!(
                "the cancelled `sleep 30` came back as exit code {:?}, timedOut {}: it was not killed",
                result.exit_code, result.timed_out
            ));
        }
        Verdict::Pass
    }

    async fn end_lease(&mut self, method: &'static str) -> Verdict {
        let lease = match self.needs_lease() {
            Ok(lease) => lease,
            Err(verdict) => return verdict,
        };
        let live = match self.live().await {
            Ok(live) => live,
            Err(reason) => return Verdict::Fail(reason),
        };
        let params = self.lease_params(&lease, &self.config);
        ended(&live, method, &params).await.into()
    }

    /// A config whose every secret-ref field holds a canary: the plugin must accept it where it matters (validate,
    /// probe, acquire) and never let it out — not in an answer, not in the argv or environment of the plugin or of
    /// anything it runs (looked at while a command of a lease made with that config runs).
    async fn secrets(&self) -> Verdict {
        let canary = format!("berth-check-canary-{:016x}", rand::random::<u64>());
        let mut config = self.config.clone();
        plant(&self.schema, &mut config);
        let locations = self.secrets.locations_in(&config);
        if locations.is_empty() {
            return Verdict::Skip("the driver's configSchema has no secret-ref field".to_owned());
        }
        for location in &locations {
            if let Some(value) = location.get_mut(&mut config) {
                *value = Value::String(canary.clone());
            }
        }
        let live = match self.live().await {
            Ok(live) => live,
            Err(reason) => return Verdict::Fail(reason),
        };
        let masked = |reason: String| reason.replace(&canary, "[the secret]");
        match self.secret_journey(&live, &config, &canary).await {
            Ok(answers) => {
                for answer in &answers {
                    if answer.to_string().contains(&canary) {
                        return Verdict::Fail(format!(
                            "an answer quotes the secret it was given: {}",
                            masked(answer.to_string())
                        ));
                    }
                }
                Verdict::Pass
            }
            Err(reason) => Verdict::Fail(masked(reason)),
        }
    }

    /// Validate, probe, acquire, realize and execute with `config` (holding `canary`), looking for the canary in
    /// every process while the command runs; the lease is destroyed again. The answers, to look for it in them.
    async fn secret_journey(
        &self,
        live: &Live,
        config: &Map<String, Value>,
        canary: &str,
    ) -> Result<Vec<Value>, String> {
        let context = self.context(config);
        let mut answers = Vec::new();
        if live.supported_methods().contains(wire::VALIDATE_CONFIG) {
            answers.push(validated(live, &context).await?);
        }
        if live.supported_methods().contains(wire::PROBE) {
            answers.push(probed(live, &context).await?);
        }
        let lease = acquired(live, context).await?;
        answers.push(serde_json::to_value(&lease).map_err(|error| error.to_string())?);
        let params = self.lease_params(&lease, config);
        let inside = async {
            let cwd = realized(live, &params).await?;
            let argv = ["sh", "-c", "echo ready; sleep 1"];
            let stdin = Stdin::None;
            let execute = self.execute_params(&lease, &cwd, config, &argv, &stdin, Some(20_000));
            let execution = self
                .execute(live, execute, &stdin, self.execute_deadline, During::Inspect(canary))
                .await;
            execution.result()?;
            execution.during.unwrap_or_else(|| {
                Err("no output arrived from `echo ready; sleep 1`, so its processes were not looked at".to_owned())
            })
        }
        .await;
        // Destroyed whatever happened inside, so the check leaves nothing behind.
        let destroyed = ended(live, wire::DESTROY_LEASE, &params).await;
        inside.and(destroyed)?;
        Ok(answers)
    }

    /// `shutdown`, then the process must exit by itself.
    async fn shutdown(&self) -> Verdict {
        let live = match self.live_with(wire::SHUTDOWN).await {
            Ok(live) => live,
            Err(verdict) => return verdict,
        };
        let Some(pid) = plugin_pid(self.plugin.id()) else {
            return Verdict::Fail("could not find the plugin's process".to_owned());
        };
        if let Err(error) = live
            .connection()
            .call::<_, Value>(wire::SHUTDOWN, &json!({}), CALL_DEADLINE)
            .await
        {
            return Verdict::Fail(error.to_string());
        }
        let started = Instant::now();
        while started.elapsed() < EXIT_LIMIT {
            if !process_alive(pid) {
                return Verdict::Pass;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Verdict::Fail(format!(
            "it answered shutdown but was still running {} s later",
            EXIT_LIMIT.as_secs()
        ))
    }
}

/// An execute of `cat` must give back exactly what went in.
fn echoed(execution: Result<Execution, Verdict>, expected: &[u8]) -> Verdict {
    let execution = match execution {
        Ok(execution) => execution,
        Err(verdict) => return verdict,
    };
    let result = match execution.result() {
        Ok(result) => result,
        Err(reason) => return Verdict::Fail(reason),
    };
    if result.exit_code != Some(0) {
        return Verdict::Fail(format!(
            "`cat` ended with exit code {:?}, signal {:?}",
            result.exit_code, result.signal
        ));
    }
    if execution.stdout != expected {
        return Verdict::Fail(format!(
            "`cat` gave back {:?}, not {:?}",
            String::from_utf8_lossy(&execution.stdout),
            String::from_utf8_lossy(expected)
        ));
    }
    Verdict::Pass
}

/// One output notification into `execution`, checked against what its stream already has.
fn take(execution: &mut Execution, chunk: OutputChunk) {
    // Data that is not base64 never gets here: the connection takes it for the protocol error it is.
    let data = chunk.data;
    let (name, stream) = match chunk.stream {
        wire::Stream::Stdout => ("stdout", &mut execution.stdout),
        wire::Stream::Stderr => ("stderr", &mut execution.stderr),
    };
    let next = stream.len() as u64;
    if chunk.offset != next {
        execution.problems.push(format!(
            "a {name} chunk at offset {} where byte {next} was next: offsets must be contiguous",
            chunk.offset
        ));
        return;
    }
    stream.extend(data);
}

async fn validated(live: &Live, context: &CallContext) -> Result<Value, String> {
    let answer: Value = live
        .connection()
        .call(wire::VALIDATE_CONFIG, context, CALL_DEADLINE)
        .await
        .map_err(|error| error.to_string())?;
    let result: wire::ValidateResult = serde_json::from_value(answer.clone())
        .map_err(|error| format!("the answer has the wrong shape: {error}"))?;
    if !result.ok {
        let errors: Vec<String> = result
            .errors
            .iter()
            .map(|issue| format!("{}: {}", issue.path, issue.message))
            .collect();
        return Err(format!(
            "it refused the config ({}); give a valid one with --config",
            errors.join("; ")
        ));
    }
    Ok(answer)
}

async fn probed(live: &Live, context: &CallContext) -> Result<Value, String> {
    let answer: Value = live
        .connection()
        .call(wire::PROBE, context, Deadlines::default().probe)
        .await
        .map_err(|error| error.to_string())?;
    let result: wire::ProbeResultWire = serde_json::from_value(answer.clone())
        .map_err(|error| format!("the answer has the wrong shape: {error}"))?;
    if !result.ok {
        return Err(format!("the probe failed: {}", result.summary));
    }
    Ok(answer)
}

async fn acquired(live: &Live, context: CallContext) -> Result<WireLease, String> {
    let params = wire::AcquireParams {
        context,
        run_id: RunId::new().to_string(),
        reuse: false,
    };
    let lease: wire::LeaseResult = live
        .connection()
        .call(wire::ACQUIRE_LEASE, &params, CALL_DEADLINE)
        .await
        .map_err(|error| error.to_string())?;
    if lease.provider_lease_id.is_empty() {
        return Err("it answered an empty providerLeaseId".to_owned());
    }
    Ok(WireLease {
        provider_lease_id: lease.provider_lease_id,
        metadata: lease.metadata,
    })
}

async fn realized(live: &Live, params: &wire::LeaseParams) -> Result<String, String> {
    let workspace: wire::RealizeResult = live
        .connection()
        .call(wire::REALIZE_WORKSPACE, params, CALL_DEADLINE)
        .await
        .map_err(|error| error.to_string())?;
    if !workspace.cwd.starts_with('/') {
        return Err(format!(
            "cwd {:?} is not an absolute path in the sandbox",
            workspace.cwd
        ));
    }
    Ok(workspace.cwd)
}

async fn ended(
    live: &Live,
    method: &'static str,
    params: &wire::LeaseParams,
) -> Result<(), String> {
    live.connection()
        .call::<_, Value>(method, params, CALL_DEADLINE)
        .await
        .map(drop)
        .map_err(|error| error.to_string())
}

/// Fills in, where the schema keeps secrets, the places a config does not have yet (`null`), so that every
/// secret-ref field can be given a value: nested objects are created, an absent array gets one item.
fn plant(schema: &Value, config: &mut Map<String, Value>) {
    let mut branches = vec![schema];
    for combinator in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(more)) = schema.get(combinator) {
            branches.extend(more);
        }
    }
    for branch in branches {
        let Some(Value::Object(properties)) = branch.get("properties") else {
            continue;
        };
        for (name, property) in properties {
            if property.get("format").and_then(Value::as_str) == Some("secret-ref") {
                config.entry(name.clone()).or_insert(Value::Null);
            } else if SecretPaths::of(property).is_empty() {
                continue;
            } else if let Some(items) = property.get("items") {
                let list = config
                    .entry(name.clone())
                    .or_insert_with(|| Value::Array(vec![json!({})]));
                if let Value::Array(list) = list {
                    for item in list.iter_mut() {
                        if let Value::Object(item) = item {
                            plant(items, item);
                        }
                    }
                }
            } else {
                let nested = config.entry(name.clone()).or_insert_with(|| json!({}));
                if let Value::Object(nested) = nested {
                    plant(property, nested);
                }
            }
        }
    }
}

/// Every process descended from this one, by parent links in `/proc`.
fn descendants() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command name, in parentheses that may themselves hold anything: state, then the parent.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if let Some(parent) = parent {
            parents.push((pid, parent));
        }
    }
    let mut found = vec![std::process::id()];
    let mut index = 0;
    while index < found.len() {
        let of = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, parent)| *parent == of)
                .map(|(pid, _)| *pid),
        );
        index += 1;
    }
    found.remove(0);
    found
}

/// The plugin's own process: a descendant whose environment names it.
fn plugin_pid(plugin_id: &str) -> Option<u32> {
    let marker = format!("BERTH_PLUGIN_ID={plugin_id}");
    descendants().into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
            environ
                .split(|byte| *byte == 0)
                .any(|entry| entry == marker.as_bytes())
        })
    })
}

/// Whether `pid` still runs (a zombie has exited).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The canary must not be in the argv or environment of the plugin or of anything it started.
fn inspect(plugin_id: &str, canary: &str) -> Result<(), String> {
    if plugin_pid(plugin_id).is_none() {
        return Err("could not find the plugin's process to inspect".to_owned());
    }
    for pid in descendants() {
        for part in ["cmdline", "environ"] {
            let Ok(bytes) = std::fs::read(format!("/proc/{pid}/{part}")) else {
                continue;
            };
            if bytes
                .windows(canary.len())
                .any(|window| window == canary.as_bytes())
            {
                let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let what = if part == "cmdline" {
                    "command line"
                } else {
                    "environment"
                };
                return Err(format!(
                    "the secret is in the {what} of process {pid} ({})",
                    name.trim()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_planted_wherever_the_schema_keeps_them() {
        let schema = json!({
            "type": "object",
            "properties": {
                "apiKey": {"type": "string", "format": "secret-ref"},
                "auth": {"type": "object", "properties": {"token": {"format": "secret-ref"}, "user": {}}},
                "users": {"type": "array", "items": {"properties": {"password": {"format": "secret-ref"}}}},
                "plain": {"type": "string"}
            },
            "anyOf": [{"properties": {"other": {"format": "secret-ref"}}}]
        });
        let mut config = Map::new();
        config.insert("plain".to_owned(), json!("kept"));
        plant(&schema, &mut config);
        let locations = SecretPaths::of(&schema).locations_in(&config);
        let shown: BTreeSet<String> = locations.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["apiKey", "auth.token", "other", "users[0].password"]
                .map(str::to_owned)
                .into()
        );
        assert_eq!(config["plain"], "kept");
    }

    #[test]
    fn this_process_is_not_its_own_descendant() {
        assert!(!descendants().contains(&std::process::id()));
        assert!(process_alive(std::process::id()));
    }
}
