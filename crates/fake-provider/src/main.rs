//! `berth-fake-provider`: the fake sandbox provider as a protocol-v1 plugin (PLUGINS.md), so the plugin path is
//! tested against the same deterministic provider as the built-in path. Its flags are the fake's fault knobs, plus
//! faults only a separate process can have (a slow start, a crash or a hang in the middle of an execute, garbage or
//! an oversized line on stdout, a release that never answers, a protocol version berth did not offer).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_core::config::SandboxConfig;
use berth_core::driver::{
    CancelSignal, DriverError, ExecOutcome, ExecRequest, LeaseHandle, LeaseRequest, OutputSink,
    OutputStream, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::probe::ProbeResult;
use berth_core::provider::{BoxFuture, ProviderDescriptor, SandboxProvider};
use berth_core::validation::ValidationErrors;
use berth_drivers::contain::{Containment, Hidden};
use berth_fake_provider::FakeProvider;
use berth_isolation::probe::HostSupport;
use berth_plugins::serve::{PluginIdentity, serve_stdio};
use clap::Parser;

/// The fake sandbox provider, speaking berth's plugin protocol v1 on stdin/stdout.
#[derive(Debug, Parser)]
#[command(name = "berth-fake-provider", version)]
struct Args {
    /// The plugin id to answer `initialize` with (the manifest's `id`).
    #[arg(long, default_value = "berth.fake")]
    id: String,
    /// Where sandboxes live. Default: `$HOME/sandboxes` (HOME is the plugin's private state directory).
    #[arg(long)]
    root: Option<PathBuf>,
    /// A directory the sandboxes' commands must not see (repeatable), e.g. berth's data dir.
    #[arg(long = "hide")]
    hide: Vec<PathBuf>,
    /// Run commands without containment (only where the host cannot contain them and tests say so).
    #[arg(long)]
    uncontained: bool,
    /// Every probe fails with this summary.
    #[arg(long)]
    fail_probe: Option<String>,
    /// Every acquire fails with this message.
    #[arg(long)]
    fail_acquire: Option<String>,
    /// Every release and destroy fails with this message.
    #[arg(long)]
    fail_release: Option<String>,
    /// Every acquire takes at least this long.
    #[arg(long)]
    acquire_delay_ms: Option<u64>,
    /// Wait this long before reading stdin: a plugin slow to initialize.
    #[arg(long)]
    start_delay_ms: Option<u64>,
    /// Answer `initialize` with this protocol version.
    #[arg(long, default_value_t = 1)]
    protocol_version: u32,
    /// Exit (status 70) in the middle of every execute, after its first output.
    #[arg(long)]
    crash_during_execute: bool,
    /// Never answer an execute.
    #[arg(long)]
    hang_during_execute: bool,
    /// Print a line that is not JSON-RPC on stdout during every execute.
    #[arg(long)]
    garbage_during_execute: bool,
    /// Print one line longer than the protocol's 16 MiB on stdout during every execute.
    #[arg(long)]
    oversized_line_during_execute: bool,
    /// Apply the execute faults above only to executes whose environment sets this variable (others run normally).
    #[arg(long, value_name = "NAME")]
    execute_faults_with_env: Option<String>,
    /// Never answer a release or a destroy.
    #[arg(long)]
    hang_during_release: bool,
    /// Refuse every call whose config's `apiKey` is not this value (probe, acquire, resume, release, destroy): proves
    /// that berth sends each call the resolved secret, and which one.
    #[arg(long, value_name = "VALUE")]
    require_api_key: Option<String>,
    /// `environmentValidateConfig` reports a problem at this field of the config whenever the field is set.
    #[arg(long, value_name = "FIELD")]
    refuse_field: Option<String>,
    /// Exit (status 71) right after starting: a crash loop.
    #[arg(long)]
    exit_at_start: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // stderr is the plugin's log, which berth keeps under the plugin's id.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
    if args.exit_at_start {
        eprintln!("exiting at start, as asked (--exit-at-start)");
        return std::process::ExitCode::from(71);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start a runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if let Some(delay) = args.start_delay_ms {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let root = match &args.root {
        Some(root) => root.clone(),
        None => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join("sandboxes"))
            .ok_or("HOME is not set and --root is not given")?,
    };
    let mut builder = FakeProvider::builder()
        .root(&root)
        .containment(Containment::new(
            &HostSupport::detect(),
            Hidden {
                dirs: args.hide.clone(),
                files: Vec::new(),
            },
            args.uncontained,
        ));
    if let Some(summary) = &args.fail_probe {
        builder = builder.fail_probe(summary);
    }
    if let Some(message) = &args.fail_acquire {
        builder = builder.fail_acquire(message);
    }
    if let Some(message) = &args.fail_release {
        builder = builder.fail_release(message);
    }
    if let Some(delay) = args.acquire_delay_ms {
        builder = builder.acquire_delay(Duration::from_millis(delay));
    }
    let fake = builder.build().map_err(|error| error.to_string())?;
    let provider: Arc<dyn SandboxProvider> = Arc::new(Faulty {
        inner: fake,
        crash: args.crash_during_execute,
        hang: args.hang_during_execute,
        garbage: args.garbage_during_execute,
        oversized: args.oversized_line_during_execute,
        only_with_env: args.execute_faults_with_env.clone(),
        hang_release: args.hang_during_release,
        required_api_key: args.require_api_key.clone(),
        refused_field: args.refuse_field.clone(),
    });
    let identity = PluginIdentity {
        id: args.id,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: args.protocol_version,
    };
    serve_stdio(provider, identity)
        .await
        .map_err(|error| format!("stdio: {error}"))
}

/// The fake with the process-level faults around its execute.
#[derive(Debug)]
struct Faulty {
    inner: FakeProvider,
    crash: bool,
    hang: bool,
    garbage: bool,
    oversized: bool,
    /// When set, the execute faults apply only to executes whose environment has this variable.
    only_with_env: Option<String>,
    hang_release: bool,
    required_api_key: Option<String>,
    refused_field: Option<String>,
}

/// The text an oversized line repeats (the test checks that berth's log never quotes it).
const OVERSIZED_LINE_TEXT: &str = "oversized-line-content-";
/// How long the oversized line is: past the protocol's 16 MiB a line.
const OVERSIZED_LINE_BYTES: usize = 17 * 1024 * 1024;

impl Faulty {
    /// Whether the execute faults apply to `request`.
    fn faults_apply(&self, request: &ExecRequest) -> bool {
        self.only_with_env
            .as_deref()
            .is_none_or(|name| request.env.contains_key(name))
    }

    /// Refuses `config` unless it holds the required `apiKey` (when one is required). Never echoes what it got.
    fn check_api_key(&self, config: Option<&SandboxConfig>) -> Result<(), DriverError> {
        let Some(required) = &self.required_api_key else {
            return Ok(());
        };
        let given = config.and_then(|config| config.fields.get("apiKey")?.as_str());
        match given {
            Some(given) if given == required => Ok(()),
            Some(_) => Err(DriverError::failed("the apiKey is wrong")),
            None => Err(DriverError::failed("the call carried no apiKey")),
        }
    }

    /// A release or destroy that never answers, when asked.
    async fn maybe_hang_release(&self) {
        if self.hang_release {
            eprintln!("hanging in a release, as asked (--hang-during-release)");
            std::future::pending::<()>().await;
        }
    }
}

/// Passes output through and, when asked, crashes the process right after the first chunk.
struct CrashingSink<'a> {
    inner: &'a dyn OutputSink,
    crash: bool,
}

impl OutputSink for CrashingSink<'_> {
    fn output<'a>(&'a self, stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.inner.output(stream, data).await;
            if self.crash {
                // Give the notification a moment to reach stdout, then die mid-execute.
                tokio::time::sleep(Duration::from_millis(100)).await;
                eprintln!("crashing during an execute, as asked (--crash-during-execute)");
                std::process::exit(70);
            }
        })
    }
}

impl SandboxProvider for Faulty {
    fn descriptor(&self) -> &ProviderDescriptor {
        self.inner.descriptor()
    }

    fn probe<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
        if let Err(error) = self.check_api_key(Some(config)) {
            return Box::pin(async move {
                ProbeResult::failed(berth_core::environment::Driver::Sandbox, error.to_string())
            });
        }
        self.inner.probe(config)
    }

    fn validate_config<'a>(
        &'a self,
        config: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<ValidationErrors, DriverError>> {
        Box::pin(async move {
            let mut problems = self.inner.validate_config(config).await?;
            if let Some(field) = &self.refused_field
                && config.fields.contains_key(field)
            {
                problems.push(field.clone(), "refused by the plugin (--refuse-field)");
            }
            Ok(problems)
        })
    }

    fn acquire<'a>(
        &'a self,
        config: &'a SandboxConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move {
            self.check_api_key(Some(config))?;
            self.inner.acquire(config, request).await
        })
    }

    fn matches_reusable_lease(&self, config: &SandboxConfig, lease: &LeaseHandle) -> bool {
        self.inner.matches_reusable_lease(config, lease)
    }

    fn resume<'a>(
        &'a self,
        config: &'a SandboxConfig,
        lease: &'a LeaseHandle,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move {
            self.check_api_key(Some(config))?;
            self.inner.resume(config, lease, request).await
        })
    }

    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.maybe_hang_release().await;
            self.check_api_key(config)?;
            self.inner.release(lease, keep, config).await
        })
    }

    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.maybe_hang_release().await;
            self.check_api_key(config)?;
            self.inner.destroy(lease, config).await
        })
    }

    fn prepare_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        self.inner.prepare_workspace(lease, request)
    }

    fn execute<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
        request: ExecRequest,
        sink: &'a dyn OutputSink,
        cancel: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>> {
        Box::pin(async move {
            let faults = self.faults_apply(&request);
            if faults && self.garbage {
                println!("this line is not JSON-RPC");
            }
            if faults && self.oversized {
                eprintln!("printing an oversized line, as asked (--oversized-line-during-execute)");
                let line = OVERSIZED_LINE_TEXT
                    .repeat(OVERSIZED_LINE_BYTES / OVERSIZED_LINE_TEXT.len() + 1);
                // Blocking, like println!: berth stops reading after 16 MiB and kills this process.
                let _written = tokio::task::spawn_blocking(move || {
                    use std::io::Write as _;
                    let mut stdout = std::io::stdout().lock();
                    stdout
                        .write_all(line.as_bytes())
                        .and_then(|()| stdout.write_all(b"\n"))
                        .and_then(|()| stdout.flush())
                })
                .await;
            }
            if faults && self.hang {
                std::future::pending::<()>().await;
            }
            let sink = CrashingSink {
                inner: sink,
                crash: faults && self.crash,
            };
            self.inner
                .execute(lease, workspace, request, &sink, cancel)
                .await
        })
    }

    fn sync_back<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        self.inner.sync_back(lease, workspace)
    }
}
