//! `berth-example-dir-sandbox`: a complete berth provider plugin, small enough to read in one sitting.
//!
//! Each sandbox is a private directory under the plugin's state directory (`$HOME`, which berth gives every plugin);
//! a command runs there with `tokio::process`, its output streamed as it comes. It is written against the SDK,
//! [`berth_plugins::serve`]: implement [`SandboxProvider`] and hand it to [`serve_stdio`], which speaks protocol v1
//! on stdin/stdout — `initialize`, `health`, every `environment*` call, output notifications with their byte
//! offsets, stdin whole or streamed, cancellation, `shutdown`.
//!
//! Not a security boundary: commands run as the plugin's user, with the host's filesystem in view. A real provider
//! would create a VM or a container in `acquire` and run commands there.
//!
//! Rules every plugin keeps (PLUGINS.md): stdout carries protocol messages only, so logs go to stderr (berth keeps
//! them under the plugin's id); secret-ref fields of `config` are plaintext in each call and must never be logged,
//! returned or passed to a process's argv or environment.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use berth_core::config::SandboxConfig;
use berth_core::driver::{
    CancelSignal, DriverError, ExecOutcome, ExecRequest, LeaseHandle, LeaseRequest, OutputSink,
    OutputStream, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use berth_core::provider::{BoxFuture, ProviderDescriptor, ProviderSpec, SandboxProvider};
use berth_plugins::serve::{PluginIdentity, serve_stdio};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// The manifest, compiled in: its `configSchema` is the one source of truth for the provider's config.
const MANIFEST: &str = include_str!("../berth-plugin.json");

/// Output is read (and sent to berth) in chunks of at most this size.
const CHUNK: usize = 64 * 1024;

fn main() -> std::process::ExitCode {
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
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let manifest: Value =
        serde_json::from_str(MANIFEST).map_err(|error| format!("the manifest: {error}"))?;
    let driver = &manifest["environmentDrivers"][0];
    let descriptor = ProviderDescriptor::new(ProviderSpec {
        key: text(&driver["driverKey"]),
        display_name: text(&driver["displayName"]),
        description: text(&driver["description"]),
        config_schema: driver["configSchema"].clone(),
        supports_reusable_leases: false,
        supports_run_execution: true,
    })
    .map_err(|error| error.to_string())?;
    // HOME is the plugin's private state directory: berth creates it and gives nobody else access.
    let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
    let root = PathBuf::from(home).join("sandboxes");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(|error| format!("cannot create {}: {error}", root.display()))?;
    eprintln!("serving sandboxes under {}", root.display());
    let provider = Arc::new(DirSandbox { descriptor, root });
    let identity = PluginIdentity {
        // The id berth started us as: it checks that `initialize` answers with the manifest's id.
        id: std::env::var("BERTH_PLUGIN_ID").unwrap_or_else(|_| text(&manifest["id"])),
        version: text(&manifest["version"]),
        protocol_version: 1,
    };
    serve_stdio(provider, identity)
        .await
        .map_err(|error| format!("stdio: {error}"))
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// The provider: sandboxes are directories `<root>/<lease id>`, each with a `workspace` inside.
#[derive(Debug)]
struct DirSandbox {
    descriptor: ProviderDescriptor,
    root: PathBuf,
}

impl DirSandbox {
    /// The directory of a lease. The id comes back from berth, so it is checked to be one this plugin made before it
    /// becomes part of a path.
    fn sandbox(&self, lease: &LeaseHandle) -> Result<PathBuf, DriverError> {
        let id = lease.provider_lease_id.as_deref().unwrap_or_default();
        let ours = id
            .strip_prefix("dir-")
            .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ours {
            return Err(DriverError::failed(format!(
                "{id:?} is not a lease of this plugin"
            )));
        }
        Ok(self.root.join(id))
    }

    async fn remove(&self, lease: &LeaseHandle) -> Result<(), DriverError> {
        let sandbox = self.sandbox(lease)?;
        match tokio::fs::remove_dir_all(&sandbox).await {
            Ok(()) => Ok(()),
            // Already gone: release and destroy may both come, and may be retried.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(DriverError::failed(format!(
                "removing the sandbox: {error}"
            ))),
        }
    }
}

/// The config's `accessToken`: given or not, never its value in anything that leaves the plugin.
fn token_state(config: &SandboxConfig) -> Result<&'static str, DriverError> {
    match config.fields.get("accessToken") {
        None | Some(Value::Null) => Ok("no access token"),
        Some(Value::String(token)) if !token.is_empty() => Ok("access token given"),
        Some(_) => Err(DriverError::failed(
            "accessToken must be a non-empty string",
        )),
    }
}

fn label(config: &SandboxConfig) -> String {
    config
        .fields
        .get("label")
        .and_then(Value::as_str)
        .unwrap_or("scratch")
        .to_owned()
}

impl SandboxProvider for DirSandbox {
    fn descriptor(&self) -> &ProviderDescriptor {
        &self.descriptor
    }

    fn probe<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move {
            let token = match token_state(config) {
                Ok(token) => token,
                Err(error) => return ProbeResult::failed(Driver::Sandbox, error.to_string()),
            };
            let mut details = Map::new();
            details.insert("root".to_owned(), self.root.display().to_string().into());
            details.insert("label".to_owned(), label(config).into());
            ProbeResult::ok(
                Driver::Sandbox,
                format!("directory sandboxes ready ({token})"),
                details,
            )
        })
    }

    fn acquire<'a>(
        &'a self,
        config: &'a SandboxConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move {
            token_state(config)?;
            let id = format!("dir-{:016x}", rand::random::<u64>());
            let sandbox = self.root.join(&id);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&sandbox)
                .map_err(|error| DriverError::failed(format!("creating the sandbox: {error}")))?;
            eprintln!("acquired {id} for run {}", request.run_id);
            // Metadata is stored by berth and shown in the API: never a secret in it.
            let mut metadata = Map::new();
            metadata.insert("label".to_owned(), label(config).into());
            Ok(LeaseHandle {
                provider: Some(self.descriptor.key().to_owned()),
                provider_lease_id: Some(id),
                metadata,
                expires_at: None,
                process: None,
            })
        })
    }

    fn matches_reusable_lease(&self, _config: &SandboxConfig, _lease: &LeaseHandle) -> bool {
        // supportsReusableLeases is false: every run gets a fresh sandbox.
        false
    }

    fn resume<'a>(
        &'a self,
        _config: &'a SandboxConfig,
        lease: &'a LeaseHandle,
        _request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move {
            let exists = self.sandbox(lease)?.is_dir();
            Ok(exists.then(|| lease.clone()))
        })
    }

    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        _config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            if keep {
                // Left for inspection until berth destroys the lease.
                return Ok(());
            }
            self.remove(lease).await
        })
    }

    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        _config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.remove(lease))
    }

    fn syncs_workspace(&self) -> bool {
        // berth moves a run's workspace in and back itself, with `tar` run through `execute`.
        false
    }

    fn prepare_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        _request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async move {
            let workspace = self.sandbox(lease)?.join("workspace");
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&workspace)
                .map_err(|error| DriverError::failed(format!("creating the workspace: {error}")))?;
            let cwd = workspace
                .to_str()
                .ok_or_else(|| DriverError::failed("the sandbox root is not a UTF-8 path"))?
                .to_owned();
            Ok(RealizedWorkspace {
                cwd,
                local_path: None,
                ephemeral: true,
                metadata: Map::new(),
            })
        })
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
            let sandbox = self.sandbox(lease)?;
            let cwd = working_dir(Path::new(&workspace.cwd), request.cwd.as_deref())?;
            execute(&sandbox, &cwd, request, sink, cancel).await
        })
    }

    fn sync_back<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        // Never asked: syncs_workspace is false, so berth syncs through `tar` itself.
        Box::pin(async { Ok(SyncReport::default()) })
    }
}

/// The workspace, or a directory below it: a relative path that never climbs out.
fn working_dir(workspace: &Path, relative: Option<&str>) -> Result<PathBuf, DriverError> {
    let Some(relative) = relative else {
        return Ok(workspace.to_owned());
    };
    let path = Path::new(relative);
    if !path
        .components()
        .all(|component| matches!(component, Component::Normal(_) | Component::CurDir))
    {
        return Err(DriverError::failed(format!(
            "cwd {relative:?} must be a relative path inside the workspace"
        )));
    }
    Ok(workspace.join(path))
}

/// How the wait for the command ended (its status is read after the group is killed).
enum Ended {
    Exited,
    TimedOut,
    Cancelled,
}

/// Runs one command: its own process group (so a timeout or cancel kills everything it started), only the
/// environment berth asked for, stdin written then closed, stdout and stderr streamed to `sink` as they come.
async fn execute(
    sandbox: &Path,
    cwd: &Path,
    request: ExecRequest,
    sink: &dyn OutputSink,
    cancel: CancelSignal,
) -> Result<ExecOutcome, DriverError> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err(DriverError::failed("an empty command"));
    };
    let mut env: BTreeMap<String, String> = request.env;
    env.entry("PATH".to_owned())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
    env.entry("HOME".to_owned())
        .or_insert_with(|| sandbox.display().to_string());
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .envs(&env)
        .stdin(if request.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| DriverError::failed(format!("cannot start {program}: {error}")))?;
    let group = child.id();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let feed = async {
        if let (Some(mut pipe), Some(bytes)) = (stdin, request.stdin) {
            // A command that exits without reading its stdin closes the pipe: not an error of ours.
            let _ = pipe.write_all(&bytes).await;
            // Dropping the pipe closes it: the command sees end of input.
        }
    };
    let wait = async {
        let limit = async {
            match request.timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            status = child.wait() => status.map(|_| Ended::Exited),
            () = limit => Ok(Ended::TimedOut),
            () = cancel => Ok(Ended::Cancelled),
        };
        // The whole group goes, also after a normal exit: a leftover background process would hold the output pipes
        // open, and the execute would never end.
        kill_group(group);
        let status = child.wait().await;
        (ended, status)
    };
    let (_, _, _, (ended, status)) = tokio::join!(
        feed,
        pump(stdout, OutputStream::Stdout, sink),
        pump(stderr, OutputStream::Stderr, sink),
        wait,
    );
    let io =
        |error: std::io::Error| DriverError::failed(format!("waiting for the command: {error}"));
    let (timed_out, cancelled) = match ended.map_err(io)? {
        Ended::Exited => (false, false),
        Ended::TimedOut => (true, false),
        Ended::Cancelled => (false, true),
    };
    let status = status.map_err(io)?;
    Ok(ExecOutcome {
        exit_code: status.code(),
        signal: status.signal().map(signal_name),
        timed_out,
        cancelled,
        limit_exceeded: None,
    })
}

/// Copies one output pipe to the sink, chunk by chunk. The SDK turns each chunk into an `environmentExecuteOutput`
/// notification with its byte offset, and waits while berth is behind: output is never dropped nor buffered whole.
async fn pump(pipe: Option<impl AsyncRead + Unpin>, stream: OutputStream, sink: &dyn OutputSink) {
    let Some(mut pipe) = pipe else { return };
    let mut buffer = vec![0; CHUNK];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => sink.output(stream, &buffer[..read]).await,
        }
    }
}

fn kill_group(group: Option<u32>) {
    if let Some(group) = group
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        // ESRCH (nothing left) is the usual answer after a normal exit.
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
}

fn signal_name(number: i32) -> String {
    match number {
        1 => "SIGHUP".to_owned(),
        2 => "SIGINT".to_owned(),
        6 => "SIGABRT".to_owned(),
        9 => "SIGKILL".to_owned(),
        13 => "SIGPIPE".to_owned(),
        15 => "SIGTERM".to_owned(),
        other => format!("SIG{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_in_manifest_makes_a_descriptor() {
        let manifest: Value = serde_json::from_str(MANIFEST).unwrap();
        let driver = &manifest["environmentDrivers"][0];
        let descriptor = ProviderDescriptor::new(ProviderSpec {
            key: text(&driver["driverKey"]),
            display_name: text(&driver["displayName"]),
            description: text(&driver["description"]),
            config_schema: driver["configSchema"].clone(),
            supports_reusable_leases: false,
            supports_run_execution: true,
        })
        .unwrap();
        assert_eq!(descriptor.key(), "dir-sandbox");
        assert!(!descriptor.secret_paths().is_empty());
    }

    #[test]
    fn working_directories_stay_inside_the_workspace() {
        let workspace = Path::new("/sandboxes/dir-1/workspace");
        assert_eq!(working_dir(workspace, None).unwrap(), workspace);
        assert_eq!(
            working_dir(workspace, Some("src/app")).unwrap(),
            workspace.join("src/app")
        );
        for escape in ["../other", "/etc", "src/../../x"] {
            assert!(working_dir(workspace, Some(escape)).is_err(), "{escape}");
        }
    }
}
