//! `berth-fake-provider`: the fake sandbox provider as a protocol-v1 plugin (PLUGINS.md), so the plugin path is
//! tested against the same deterministic provider as the built-in path. Its flags are the fake's fault knobs, plus
//! faults only a separate process can have (a slow start, a crash or a hang in the middle of an execute, garbage on
//! stdout, a protocol version berth did not offer).

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
        self.inner.probe(config)
    }

    fn acquire<'a>(
        &'a self,
        config: &'a SandboxConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        self.inner.acquire(config, request)
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
        self.inner.resume(config, lease, request)
    }

    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        self.inner.release(lease, keep)
    }

    fn destroy<'a>(&'a self, lease: &'a LeaseHandle) -> BoxFuture<'a, Result<(), DriverError>> {
        self.inner.destroy(lease)
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
            if self.garbage {
                println!("this line is not JSON-RPC");
            }
            if self.hang {
                std::future::pending::<()>().await;
            }
            let sink = CrashingSink {
                inner: sink,
                crash: self.crash,
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
