//! The plugin side of protocol v1, for plugins written in Rust: [`serve_stdio`] serves any [`SandboxProvider`] on
//! stdin/stdout, streaming output as it comes, taking stdin whole or streamed (`environmentExecuteInput`) and
//! cancelling on `environmentCancelExecution`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use berth_core::config::SandboxConfig;
use berth_core::driver::{
    ExecRequest, LeaseHandle, LeaseRequest, OutputSink, OutputStream, RealizedWorkspace,
    WorkspaceRequest,
};
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::provider::{BoxFuture, SandboxProvider};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::wire::{self, Incoming, Response, RpcError};

/// Lines queued for stdout before senders wait.
const OUTGOING_BUFFER: usize = 256;

/// The most streamed stdin one execution may gather. The in-process [`SandboxProvider`] takes stdin as one buffer,
/// so it is held in memory until `eof`: this bounds what a host can make the plugin hold. Generous, because berth
/// sends a run's workspace in as a tar archive on stdin, and it holds that archive in memory itself anyway.
pub const MAX_STREAMED_STDIN: usize = 4 * 1024 * 1024 * 1024;

/// Who this plugin says it is in `initialize`.
#[derive(Clone, Debug)]
pub struct PluginIdentity {
    pub id: String,
    pub version: String,
    /// The protocol version it answers with; 1 for a plugin of this build (another value is for fault tests).
    pub protocol_version: u32,
}

/// Serves `provider` on this process's stdin and stdout until stdin closes or `shutdown` is called.
pub async fn serve_stdio(
    provider: Arc<dyn SandboxProvider>,
    identity: PluginIdentity,
) -> std::io::Result<()> {
    serve(provider, identity, detached_stdin(), stdout_writer()).await
}

/// This process's stdout. A pipe (as the host starts every plugin) is written without blocking, straight from each
/// line: `tokio::io::stdout()` copies every line into a buffer of its own and writes it on the blocking pool, which
/// costs a copy and a thread hand-off per output chunk. Anything else (a terminal, a file) takes that path.
fn stdout_writer() -> Box<dyn AsyncWrite + Unpin + Send> {
    match stdout_pipe() {
        Ok(pipe) => Box::new(pipe),
        Err(error) => {
            tracing::debug!(%error, "stdout is not a pipe; writing it through the blocking pool");
            Box::new(tokio::io::stdout())
        }
    }
}

/// The pipe on stdout, opened anew (`/proc/self/fd/1`): an open file description of its own, so that making it
/// non-blocking leaves fd 1 blocking for whatever else writes there (a plugin's `println!`, a blocking writer).
fn stdout_pipe() -> std::io::Result<tokio::net::unix::pipe::Sender> {
    let stat = rustix::fs::fstat(std::io::stdout())?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Fifo {
        return Err(std::io::Error::other("stdout is not a pipe"));
    }
    let pipe = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/fd/1")?;
    tokio::net::unix::pipe::Sender::from_file(pipe)
}

/// This process's stdin, read by a plain thread of its own. `tokio::io::stdin()` reads on the runtime's blocking
/// pool, and a runtime waits for its blocking reads when it shuts down: after `shutdown` the host keeps stdin open,
/// so the plugin would never exit (and be killed instead). A detached thread does not hold the process up.
fn detached_stdin() -> impl AsyncRead + Unpin + Send + 'static {
    let (mut writer, reader) = tokio::io::duplex(64 * 1024);
    let (chunks, mut received) = mpsc::channel::<Vec<u8>>(16);
    let thread = std::thread::Builder::new()
        .name("plugin-stdin".to_owned())
        .spawn(move || {
            use std::io::Read as _;
            let mut stdin = std::io::stdin().lock();
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => return,
                    Ok(read) => {
                        if chunks.blocking_send(buffer[..read].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    if let Err(error) = thread {
        tracing::error!(%error, "cannot start the thread that reads stdin");
    }
    tokio::spawn(async move {
        while let Some(chunk) = received.recv().await {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Dropping the writer is end of input for the reader.
    });
    reader
}

/// [`serve_stdio`] over any pipe pair.
pub async fn serve(
    provider: Arc<dyn SandboxProvider>,
    identity: PluginIdentity,
    input: impl AsyncRead + Unpin + Send + 'static,
    output: impl AsyncWrite + Unpin + Send + 'static,
) -> std::io::Result<()> {
    let (lines, mut outgoing) = mpsc::channel::<Vec<u8>>(OUTGOING_BUFFER);
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let writer = tokio::spawn(async move {
        let mut output = output;
        let mut closing = false;
        loop {
            let line = tokio::select! {
                line = outgoing.recv() => line,
                // Once stopped, what is queued (shutdown's answer) is still written, then the writer ends, even
                // while an execute that ignores its cancel still holds a sender.
                () = stopped.cancelled(), if !closing => {
                    closing = true;
                    outgoing.close();
                    continue;
                }
            };
            let Some(line) = line else { break };
            output.write_all(&line).await?;
            output.flush().await?;
        }
        std::io::Result::Ok(())
    });
    let server = Arc::new(Server {
        provider,
        identity,
        lines,
        executions: Mutex::new(HashMap::new()),
        inputs: Mutex::new(HashMap::new()),
        workspaces: Mutex::new(HashMap::new()),
        stop,
    });
    let mut input = BufReader::new(input);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut input).take(wire::MAX_LINE_BYTES as u64 + 1);
        let read = tokio::select! {
            read = limited.read_until(b'\n', &mut line) => read?,
            () = server.stop.cancelled() => 0,
        };
        if read == 0 {
            break;
        }
        let message: Incoming = match serde_json::from_slice(&line) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "ignored a line that is not JSON-RPC");
                continue;
            }
        };
        let server = server.clone();
        match (message.method, message.id) {
            (Some(method), Some(id)) => {
                // Concurrently: an execute must not hold up its own cancel, nor a health check.
                tokio::spawn(async move {
                    let reply = server
                        .call(&method, message.params.unwrap_or(Value::Null))
                        .await;
                    let (result, error) = match reply {
                        Ok(result) => (Some(result), None),
                        Err(error) => (None, Some(error)),
                    };
                    server
                        .send(&Response {
                            jsonrpc: "2.0",
                            id: &id,
                            result,
                            error,
                        })
                        .await;
                    if method == wire::SHUTDOWN {
                        server.stop.cancel();
                    }
                });
            }
            // In the read loop itself, not spawned: chunks of one execution's stdin are gathered in the order sent,
            // and those that arrive before their execute has been read wait for it.
            (Some(method), None) if method == wire::EXECUTE_INPUT => {
                server.input(message.params.unwrap_or(Value::Null));
            }
            (Some(method), None) => tracing::debug!(method, "ignored a notification"),
            _ => tracing::debug!("ignored a response: this plugin sends no requests"),
        }
    }
    // Commands still running are cancelled: the host is gone or asked us to stop. Then the answers already queued
    // (shutdown's own) reach stdout.
    for token in server
        .executions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
    {
        token.cancel();
    }
    server.stop.cancel();
    drop(server);
    match tokio::time::timeout(Duration::from_secs(5), writer).await {
        Ok(Ok(result)) => result,
        _ => Ok(()),
    }
}

struct Server {
    provider: Arc<dyn SandboxProvider>,
    identity: PluginIdentity,
    lines: mpsc::Sender<Vec<u8>>,
    executions: Mutex<HashMap<String, CancellationToken>>,
    /// Streamed stdin by execution id, created by whichever comes first: the execute or its first input chunk.
    inputs: Mutex<HashMap<String, Arc<Inbox>>>,
    /// Each lease's realized workspace: an execute's `cwd` below it is that workspace plus a relative directory.
    workspaces: Mutex<HashMap<String, String>>,
    stop: CancellationToken,
}

fn invalid(error: impl std::fmt::Display) -> RpcError {
    RpcError {
        code: wire::INVALID_PARAMS,
        message: error.to_string(),
        data: None,
    }
}

fn failed(error: impl std::fmt::Display) -> RpcError {
    RpcError {
        code: wire::INTERNAL_ERROR,
        message: error.to_string(),
        data: None,
    }
}

fn parse<T: DeserializeOwned>(params: Value) -> Result<T, RpcError> {
    serde_json::from_value(params).map_err(invalid)
}

fn to_value(value: impl Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(value).map_err(failed)
}

impl Server {
    async fn send(&self, message: &impl Serialize) {
        match serde_json::to_vec(message) {
            Ok(mut line) => {
                line.push(b'\n');
                let _closed = self.lines.send(line).await;
            }
            Err(error) => tracing::error!(%error, "could not encode a message"),
        }
    }

    /// The wrapped provider's own key: the driver key the host knows it by may differ.
    fn key(&self) -> String {
        self.provider.descriptor().key().to_owned()
    }

    fn sandbox_config(&self, context: &wire::CallContext, reuse: bool) -> SandboxConfig {
        SandboxConfig {
            provider: self.key(),
            reuse_lease: reuse,
            timeout_ms: None,
            sync_back_max_mb: None,
            fields: context.config.clone(),
            // The host resolved every secret before the call: nothing here is a reference.
            secrets: Default::default(),
        }
    }

    fn lease(&self, lease: &wire::WireLease) -> LeaseHandle {
        LeaseHandle {
            provider: Some(self.key()),
            provider_lease_id: Some(lease.provider_lease_id.clone()),
            metadata: lease.metadata.clone(),
            expires_at: None,
            process: None,
        }
    }

    fn lease_request(
        context: &wire::CallContext,
        run_id: Option<&str>,
    ) -> Result<LeaseRequest, RpcError> {
        Ok(LeaseRequest {
            company_id: context.company_id.parse::<CompanyId>().map_err(invalid)?,
            environment_id: context
                .environment_id
                .parse::<EnvironmentId>()
                .map_err(invalid)?,
            run_id: match run_id {
                Some(run_id) => run_id.parse::<RunId>().map_err(invalid)?,
                None => RunId::new(),
            },
        })
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            wire::INITIALIZE => {
                // The host judges the answer: one it did not offer fails the plugin with that reason.
                let _offered: wire::InitializeParams = parse(params)?;
                to_value(wire::InitializeResult {
                    protocol_version: self.identity.protocol_version,
                    plugin: wire::PluginInfo {
                        id: self.identity.id.clone(),
                        version: self.identity.version.clone(),
                    },
                    supported_methods: [
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
                        wire::EXECUTE_INPUT,
                        wire::CANCEL_EXECUTION,
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                })
            }
            wire::HEALTH => to_value(wire::HealthResult {
                status: wire::HealthStatus::Ok,
                message: None,
            }),
            wire::SHUTDOWN => Ok(Value::Object(Map::new())),
            wire::VALIDATE_CONFIG => {
                let context: wire::CallContext = parse(params)?;
                let problems = self
                    .provider
                    .validate_config(&self.sandbox_config(&context, false))
                    .await
                    .map_err(failed)?;
                to_value(wire::ValidateResult {
                    ok: problems.is_empty(),
                    errors: problems
                        .errors()
                        .iter()
                        .map(|problem| wire::ValidationIssue {
                            path: problem.path.clone(),
                            message: problem.message.clone(),
                        })
                        .collect(),
                    normalized_config: None,
                })
            }
            wire::PROBE => {
                let context: wire::CallContext = parse(params)?;
                let result = self
                    .provider
                    .probe(&self.sandbox_config(&context, false))
                    .await;
                to_value(wire::ProbeResultWire {
                    ok: result.ok,
                    summary: result.summary,
                    details: Some(Value::Object(result.details)),
                })
            }
            wire::ACQUIRE_LEASE => {
                let params: wire::AcquireParams = parse(params)?;
                let request = Self::lease_request(&params.context, Some(&params.run_id))?;
                let config = self.sandbox_config(&params.context, params.reuse);
                let lease = self
                    .provider
                    .acquire(&config, &request)
                    .await
                    .map_err(failed)?;
                to_value(lease_result(lease))
            }
            wire::RESUME_LEASE => {
                let params: wire::LeaseParams = parse(params)?;
                let request = Self::lease_request(&params.context, None)?;
                let config = self.sandbox_config(&params.context, true);
                let lease = self.lease(&params.lease);
                match self
                    .provider
                    .resume(&config, &lease, &request)
                    .await
                    .map_err(failed)?
                {
                    Some(lease) => to_value(lease_result(lease)),
                    None => Ok(Value::Null),
                }
            }
            wire::RELEASE_LEASE | wire::DESTROY_LEASE => {
                let params: wire::LeaseParams = parse(params)?;
                let lease = self.lease(&params.lease);
                // The host sends the config the lease was acquired with (else the current one), secrets resolved.
                let config = self.sandbox_config(&params.context, false);
                if method == wire::RELEASE_LEASE {
                    self.provider
                        .release(&lease, true, Some(&config))
                        .await
                        .map_err(failed)?;
                } else {
                    self.provider
                        .destroy(&lease, Some(&config))
                        .await
                        .map_err(failed)?;
                    self.workspaces
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&params.lease.provider_lease_id);
                }
                Ok(Value::Object(Map::new()))
            }
            wire::REALIZE_WORKSPACE => {
                let params: wire::LeaseParams = parse(params)?;
                let lease = self.lease(&params.lease);
                let request = WorkspaceRequest {
                    run_id: RunId::new(),
                    local_path: None,
                };
                let workspace = self
                    .provider
                    .prepare_workspace(&lease, &request)
                    .await
                    .map_err(failed)?;
                self.workspaces
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(
                        params.lease.provider_lease_id.clone(),
                        workspace.cwd.clone(),
                    );
                to_value(wire::RealizeResult {
                    cwd: workspace.cwd,
                    metadata: workspace.metadata,
                })
            }
            wire::EXECUTE => self.execute(parse(params)?).await,
            wire::CANCEL_EXECUTION => {
                let params: wire::CancelParams = parse(params)?;
                let token = self
                    .executions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&params.execution_id)
                    .cloned();
                if let Some(token) = token {
                    token.cancel();
                }
                Ok(Value::Object(Map::new()))
            }
            other => Err(RpcError {
                code: wire::METHOD_NOT_FOUND,
                message: format!("no method {other:?}"),
                data: None,
            }),
        }
    }

    /// The inbox of `execution_id`'s streamed stdin, made by whichever of the execute and its first chunk comes first.
    fn inbox(&self, execution_id: &str) -> Arc<Inbox> {
        self.inputs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(execution_id.to_owned())
            .or_default()
            .clone()
    }

    fn discard_input(&self, execution_id: &str) {
        self.inputs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(execution_id);
    }

    /// An `environmentExecuteInput` notification: its chunk joins the execution's stdin. A notification has no
    /// answer, so a bad one is kept as the reason its execute fails.
    fn input(&self, params: Value) {
        let chunk: wire::InputNotification = match serde_json::from_value(params) {
            Ok(chunk) => chunk,
            Err(error) => {
                tracing::warn!(%error, "ignored an environmentExecuteInput of the wrong shape");
                return;
            }
        };
        let inbox = self.inbox(&chunk.execution_id);
        let mut state = inbox.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.eof {
            tracing::warn!(execution.id = %chunk.execution_id, "ignored stdin after its eof");
            return;
        }
        match BASE64.decode(&chunk.data) {
            Ok(data) if state.data.len() + data.len() > MAX_STREAMED_STDIN => {
                state.problem = Some(format!(
                    "streamed stdin is over {} MiB",
                    MAX_STREAMED_STDIN / (1024 * 1024)
                ));
                state.data = Vec::new();
                state.eof = true;
            }
            Ok(data) => {
                state.data.extend_from_slice(&data);
                state.eof = chunk.eof;
            }
            Err(error) => {
                state.problem = Some(format!("streamed stdin that is not base64: {error}"));
                state.data = Vec::new();
                state.eof = true;
            }
        }
        if state.eof {
            // A permit is kept when the execute is not waiting yet, so this wake-up is never lost.
            inbox.ended.notify_one();
        }
    }

    /// Waits for all of `execution_id`'s streamed stdin (its `eof`), within the execute's timeout and until it is
    /// cancelled. `Err` is the execute's answer when the command never starts.
    async fn streamed_stdin(
        &self,
        execution_id: &str,
        timeout: Option<Duration>,
        cancelled: &CancellationToken,
    ) -> Result<Vec<u8>, Result<Value, RpcError>> {
        let inbox = self.inbox(execution_id);
        let limit = async {
            match timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(limit);
        loop {
            {
                let mut state = inbox.state.lock().unwrap_or_else(PoisonError::into_inner);
                if state.eof {
                    let problem = state.problem.take();
                    let data = std::mem::take(&mut state.data);
                    drop(state);
                    self.discard_input(execution_id);
                    return match problem {
                        Some(problem) => Err(Err(invalid(problem))),
                        None => Ok(data),
                    };
                }
            }
            let ended = |timed_out| {
                self.discard_input(execution_id);
                Err(to_value(wire::ExecuteResult {
                    timed_out,
                    ..wire::ExecuteResult::default()
                }))
            };
            tokio::select! {
                () = inbox.ended.notified() => {}
                () = &mut limit => return ended(true),
                () = cancelled.cancelled() => return ended(false),
            }
        }
    }

    async fn execute(&self, params: wire::ExecuteParams) -> Result<Value, RpcError> {
        let lease = self.lease(&params.lease);
        let realized = self
            .workspaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&params.lease.provider_lease_id)
            .cloned();
        let (root, cwd) = match realized {
            Some(root) if params.cwd == root => (root, None),
            Some(root) => match params.cwd.strip_prefix(&format!("{root}/")) {
                Some(relative) => (root.clone(), Some(relative.to_owned())),
                None => (params.cwd.clone(), None),
            },
            None => (params.cwd.clone(), None),
        };
        let workspace = RealizedWorkspace {
            cwd: root,
            local_path: None,
            ephemeral: false,
            metadata: Map::new(),
        };
        if params.stdin_stream && params.stdin.is_some() {
            self.discard_input(&params.execution_id);
            return Err(invalid("stdin and stdinStream exclude each other"));
        }
        let stdin = params
            .stdin
            .as_deref()
            .map(|stdin| BASE64.decode(stdin))
            .transpose()
            .map_err(invalid)?;
        let mut argv = vec![params.command.clone()];
        argv.extend(params.args.iter().cloned());
        let mut request = ExecRequest {
            argv,
            env: params.env.clone(),
            cwd,
            stdin,
            timeout: params.timeout_ms.map(Duration::from_millis),
        };
        let token = CancellationToken::new();
        self.executions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(params.execution_id.clone(), token.clone());
        // Buffered whole before the command starts: the in-process trait takes stdin as bytes.
        if params.stdin_stream {
            let started = tokio::time::Instant::now();
            let gathered = self
                .streamed_stdin(&params.execution_id, request.timeout, &token)
                .await;
            match gathered {
                Ok(stdin) => {
                    request.stdin = Some(stdin);
                    // The timeout covers the whole execute, the wait for stdin included: the host's deadline does.
                    request.timeout = request
                        .timeout
                        .map(|timeout| timeout.saturating_sub(started.elapsed()));
                }
                Err(answer) => {
                    self.executions
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&params.execution_id);
                    return answer;
                }
            }
        }
        let sink = NotifyingSink {
            execution_id: params.execution_id.clone(),
            lines: self.lines.clone(),
            offsets: Mutex::new([0, 0]),
        };
        let cancel = Box::pin(async move { token.cancelled_owned().await });
        let outcome = self
            .provider
            .execute(&lease, &workspace, request, &sink, cancel)
            .await;
        self.executions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&params.execution_id);
        let outcome = outcome.map_err(failed)?;
        to_value(wire::ExecuteResult {
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            timed_out: outcome.timed_out,
            stdout: None,
            stderr: None,
        })
    }
}

/// One execution's streamed stdin, gathered until `eof`.
#[derive(Debug, Default)]
struct Inbox {
    state: Mutex<InboxState>,
    /// Signalled once `eof` is set.
    ended: Notify,
}

#[derive(Debug, Default)]
struct InboxState {
    data: Vec<u8>,
    eof: bool,
    /// Why the stdin cannot be used (not base64, too large): the execute fails with it.
    problem: Option<String>,
}

fn lease_result(lease: LeaseHandle) -> wire::LeaseResult {
    wire::LeaseResult {
        provider_lease_id: lease.provider_lease_id.unwrap_or_default(),
        metadata: lease.metadata,
        expires_at: lease.expires_at.and_then(|at| {
            let nanos = i128::from(at.unix_millis()) * 1_000_000;
            time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        }),
    }
}

/// Sends each chunk of output as an `environmentExecuteOutput` notification, with its byte offset.
struct NotifyingSink {
    execution_id: String,
    lines: mpsc::Sender<Vec<u8>>,
    offsets: Mutex<[u64; 2]>,
}

impl OutputSink for NotifyingSink {
    fn output<'a>(&'a self, stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (index, wire_stream) = match stream {
                OutputStream::Stdout => (0, wire::Stream::Stdout),
                OutputStream::Stderr => (1, wire::Stream::Stderr),
            };
            let offset = {
                let mut offsets = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
                let offset = offsets[index];
                offsets[index] += data.len() as u64;
                offset
            };
            if let Some(line) = output_line(&self.execution_id, wire_stream, offset, data) {
                let _closed = self.lines.send(line).await;
            }
        })
    }
}

/// The line of one `environmentExecuteOutput` notification, newline included: byte for byte what serde writes for a
/// [`wire::Outgoing`] [`wire::OutputNotification`], but built by hand, because output is most of what a plugin
/// sends. The data is base64-encoded straight into the line (base64 text needs no JSON escaping); only the execution
/// id goes through serde. `None` only if the id cannot be encoded, which a `&str` always can.
fn output_line(
    execution_id: &str,
    stream: wire::Stream,
    offset: u64,
    data: &[u8],
) -> Option<Vec<u8>> {
    const HEAD: &[u8] =
        br#"{"jsonrpc":"2.0","method":"environmentExecuteOutput","params":{"executionId":"#;
    let stream = match stream {
        wire::Stream::Stdout => "stdout",
        wire::Stream::Stderr => "stderr",
    };
    // The id is quoted and escaped, the offset at most 20 digits: 64 bytes cover the rest of the frame.
    let encoded = data.len().div_ceil(3) * 4;
    let mut line = Vec::with_capacity(HEAD.len() + execution_id.len() * 6 + encoded + 64);
    line.extend_from_slice(HEAD);
    if let Err(error) = serde_json::to_writer(&mut line, execution_id) {
        tracing::error!(%error, "could not encode an execution id");
        return None;
    }
    line.extend_from_slice(br#","stream":""#);
    line.extend_from_slice(stream.as_bytes());
    line.extend_from_slice(br#"","offset":"#);
    line.extend_from_slice(offset.to_string().as_bytes());
    line.extend_from_slice(br#","data":""#);
    base64_simd::STANDARD.encode_append(data, &mut line);
    line.extend_from_slice(b"\"}}\n");
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::driver::{CancelSignal, DriverError, ExecOutcome, SyncReport};
    use berth_core::probe::ProbeResult;
    use berth_core::provider::{ProviderDescriptor, ProviderSpec};
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, DuplexStream, duplex};

    /// A provider whose every command echoes its stdin to stdout, or waits to be cancelled when it has none.
    #[derive(Debug)]
    struct Echo(ProviderDescriptor);

    impl Echo {
        fn provider() -> Arc<dyn SandboxProvider> {
            Arc::new(Self(
                ProviderDescriptor::new(ProviderSpec {
                    key: "echo".to_owned(),
                    display_name: "Echo".to_owned(),
                    description: String::new(),
                    config_schema: json!({"type": "object"}),
                    supports_reusable_leases: false,
                    supports_run_execution: true,
                })
                .unwrap(),
            ))
        }
    }

    impl SandboxProvider for Echo {
        fn descriptor(&self) -> &ProviderDescriptor {
            &self.0
        }
        fn probe<'a>(&'a self, _: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
            unimplemented!()
        }
        fn acquire<'a>(
            &'a self,
            _: &'a SandboxConfig,
            _: &'a LeaseRequest,
        ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
            unimplemented!()
        }
        fn matches_reusable_lease(&self, _: &SandboxConfig, _: &LeaseHandle) -> bool {
            false
        }
        fn resume<'a>(
            &'a self,
            _: &'a SandboxConfig,
            _: &'a LeaseHandle,
            _: &'a LeaseRequest,
        ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
            unimplemented!()
        }
        fn release<'a>(
            &'a self,
            _: &'a LeaseHandle,
            _: bool,
            _: Option<&'a SandboxConfig>,
        ) -> BoxFuture<'a, Result<(), DriverError>> {
            unimplemented!()
        }
        fn destroy<'a>(
            &'a self,
            _: &'a LeaseHandle,
            _: Option<&'a SandboxConfig>,
        ) -> BoxFuture<'a, Result<(), DriverError>> {
            unimplemented!()
        }
        fn prepare_workspace<'a>(
            &'a self,
            _: &'a LeaseHandle,
            _: &'a WorkspaceRequest,
        ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
            unimplemented!()
        }
        fn execute<'a>(
            &'a self,
            _: &'a LeaseHandle,
            _: &'a RealizedWorkspace,
            request: ExecRequest,
            sink: &'a dyn OutputSink,
            cancel: CancelSignal,
        ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>> {
            Box::pin(async move {
                match request.stdin {
                    Some(stdin) => sink.output(OutputStream::Stdout, &stdin).await,
                    None => cancel.await,
                }
                Ok(ExecOutcome {
                    exit_code: Some(0),
                    ..ExecOutcome::default()
                })
            })
        }
        fn sync_back<'a>(
            &'a self,
            _: &'a LeaseHandle,
            _: &'a RealizedWorkspace,
        ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
            unimplemented!()
        }
    }

    /// The echo provider served on an in-memory pipe: what the host writes, and what it reads back.
    fn plugin() -> (DuplexStream, tokio::io::Lines<BufReader<DuplexStream>>) {
        let (host_out, plugin_in) = duplex(1 << 20);
        let (plugin_out, host_in) = duplex(1 << 20);
        let identity = PluginIdentity {
            id: "echo".to_owned(),
            version: "1".to_owned(),
            protocol_version: 1,
        };
        tokio::spawn(serve(Echo::provider(), identity, plugin_in, plugin_out));
        (host_out, BufReader::new(host_in).lines())
    }

    async fn send(to: &mut DuplexStream, message: Value) {
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        to.write_all(&line).await.unwrap();
    }

    fn execute(id: u64, execution: &str, extra: Value) -> Value {
        let mut params = json!({
            "driverKey": "echo", "companyId": "c", "environmentId": "e", "config": {},
            "lease": {"providerLeaseId": "l"}, "executionId": execution,
            "command": "cat", "args": [], "cwd": "/w", "env": {}
        });
        for (key, value) in extra.as_object().unwrap() {
            params[key] = value.clone();
        }
        json!({"jsonrpc": "2.0", "id": id, "method": "environmentExecute", "params": params})
    }

    fn input(execution: &str, data: &[u8], eof: bool) -> Value {
        json!({"jsonrpc": "2.0", "method": "environmentExecuteInput",
               "params": {"executionId": execution, "data": BASE64.encode(data), "eof": eof}})
    }

    /// Reads messages until the answer to `id`: that answer and the stdout the notifications carried before it.
    async fn answer_to(
        from: &mut tokio::io::Lines<BufReader<DuplexStream>>,
        id: u64,
    ) -> (Value, Vec<u8>) {
        let mut stdout = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), from.next_line())
                .await
                .expect("an answer within 10 s")
                .unwrap()
                .expect("the plugin answers");
            let message: Value = serde_json::from_str(&line).unwrap();
            if message["id"] == id {
                return (message, stdout);
            }
            if message["method"] == wire::EXECUTE_OUTPUT {
                let offset = message["params"]["offset"].as_u64().unwrap();
                assert_eq!(offset, stdout.len() as u64, "{message}");
                let data = message["params"]["data"].as_str().unwrap();
                stdout.extend(BASE64.decode(data).unwrap());
            }
        }
    }

    #[test]
    fn an_output_line_is_the_one_serde_writes() {
        let ids = [
            "e-1",
            "",
            "with \"quotes\" and a \\ backslash",
            "ünïcödé ✓ 𝄞",
            "control \n\t\u{0} \u{1f} and </script>",
        ];
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for id in ids {
            for stream in [wire::Stream::Stdout, wire::Stream::Stderr] {
                for offset in [0, 7, u64::MAX] {
                    // Every remainder mod 3, so every kind of padding.
                    for len in [0, 1, 2, 3, 4, 5, 1000] {
                        let data = &data[..len];
                        let line = output_line(id, stream, offset, data).unwrap();
                        let mut expected = serde_json::to_vec(&wire::Outgoing {
                            jsonrpc: "2.0",
                            id: None,
                            method: wire::EXECUTE_OUTPUT,
                            params: wire::OutputNotification {
                                execution_id: id.to_owned(),
                                stream,
                                offset,
                                data: BASE64.encode(data),
                            },
                        })
                        .unwrap();
                        expected.push(b'\n');
                        assert_eq!(
                            String::from_utf8(line).unwrap(),
                            String::from_utf8(expected).unwrap()
                        );
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn initialize_lists_streamed_input() {
        let (mut host, mut plugin) = plugin();
        send(&mut host, json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersions": [1], "host": {"name": "berth", "version": "0"}, "pluginId": "echo", "stateDir": "/s"}}))
        .await;
        let (answer, _) = answer_to(&mut plugin, 1).await;
        let methods = answer["result"]["supportedMethods"].as_array().unwrap();
        assert!(methods.contains(&json!(wire::EXECUTE_INPUT)), "{answer}");
    }

    #[tokio::test]
    async fn streamed_stdin_is_gathered_until_eof_whenever_it_arrives() {
        let (mut host, mut plugin) = plugin();
        // The host sends the call, then the chunks at once: here they even arrive first.
        send(&mut host, input("early", b"first ", false)).await;
        send(&mut host, execute(1, "early", json!({"stdinStream": true}))).await;
        send(&mut host, input("early", b"second", true)).await;
        let (answer, stdout) = answer_to(&mut plugin, 1).await;
        assert_eq!(answer["result"]["exitCode"], 0, "{answer}");
        assert_eq!(stdout, b"first second");

        // Chunks that come long after the call: the execute waits for eof.
        send(
            &mut host,
            execute(2, "late", json!({"stdinStream": true, "timeoutMs": 10_000})),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(&mut host, input("late", b"one,", false)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&mut host, input("late", b"two", false)).await;
        send(&mut host, input("late", b"", true)).await;
        let (answer, stdout) = answer_to(&mut plugin, 2).await;
        assert_eq!(answer["result"]["exitCode"], 0, "{answer}");
        assert_eq!(stdout, b"one,two");
    }

    #[tokio::test]
    async fn waiting_for_stdin_ends_with_the_timeout_or_a_cancel() {
        let (mut host, mut plugin) = plugin();
        send(
            &mut host,
            execute(1, "slow", json!({"stdinStream": true, "timeoutMs": 200})),
        )
        .await;
        let (answer, stdout) = answer_to(&mut plugin, 1).await;
        assert_eq!(answer["result"]["timedOut"], true, "{answer}");
        assert!(stdout.is_empty());

        send(
            &mut host,
            execute(2, "cancelled", json!({"stdinStream": true})),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(
            &mut host,
            json!({"jsonrpc": "2.0", "id": 3, "method": "environmentCancelExecution",
                               "params": {"executionId": "cancelled"}}),
        )
        .await;
        let (answer, _) = answer_to(&mut plugin, 2).await;
        assert_eq!(answer["result"]["timedOut"], false, "{answer}");
        assert_eq!(answer["result"]["exitCode"], Value::Null, "{answer}");
    }

    #[tokio::test]
    async fn bad_streamed_stdin_fails_its_execute() {
        let (mut host, mut plugin) = plugin();
        send(
            &mut host,
            execute(1, "both", json!({"stdinStream": true, "stdin": "eA=="})),
        )
        .await;
        let (answer, _) = answer_to(&mut plugin, 1).await;
        assert_eq!(answer["error"]["code"], wire::INVALID_PARAMS, "{answer}");

        send(&mut host, json!({"jsonrpc": "2.0", "method": "environmentExecuteInput",
                               "params": {"executionId": "garbled", "data": "not base64!", "eof": false}}))
        .await;
        send(
            &mut host,
            execute(2, "garbled", json!({"stdinStream": true})),
        )
        .await;
        let (answer, _) = answer_to(&mut plugin, 2).await;
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not base64"),
            "{answer}"
        );
    }
}
