//! The plugin side of protocol v1, for plugins written in Rust: [`serve_stdio`] serves any [`SandboxProvider`] on
//! stdin/stdout, streaming output as it comes and cancelling on `environmentCancelExecution`.

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
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::wire::{self, Incoming, Outgoing, Response, RpcError};

/// Lines queued for stdout before senders wait.
const OUTGOING_BUFFER: usize = 256;

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
    serve(provider, identity, tokio::io::stdin(), tokio::io::stdout()).await
}

/// [`serve_stdio`] over any pipe pair.
pub async fn serve(
    provider: Arc<dyn SandboxProvider>,
    identity: PluginIdentity,
    input: impl AsyncRead + Unpin + Send + 'static,
    output: impl AsyncWrite + Unpin + Send + 'static,
) -> std::io::Result<()> {
    let (lines, mut outgoing) = mpsc::channel::<Vec<u8>>(OUTGOING_BUFFER);
    let writer = tokio::spawn(async move {
        let mut output = output;
        while let Some(line) = outgoing.recv().await {
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
        workspaces: Mutex::new(HashMap::new()),
        stop: CancellationToken::new(),
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
            (Some(method), None) => tracing::debug!(method, "ignored a notification"),
            _ => tracing::debug!("ignored a response: this plugin sends no requests"),
        }
    }
    // Let the answers in flight (shutdown's own) reach stdout.
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
        }
    }

    fn lease(&self, lease: &wire::WireLease) -> LeaseHandle {
        LeaseHandle {
            provider: Some(self.key()),
            provider_lease_id: Some(lease.provider_lease_id.clone()),
            metadata: lease.metadata.clone(),
            expires_at: None,
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
                        wire::PROBE,
                        wire::ACQUIRE_LEASE,
                        wire::RESUME_LEASE,
                        wire::RELEASE_LEASE,
                        wire::DESTROY_LEASE,
                        wire::REALIZE_WORKSPACE,
                        wire::EXECUTE,
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
                if method == wire::RELEASE_LEASE {
                    self.provider.release(&lease, true).await.map_err(failed)?;
                } else {
                    self.provider.destroy(&lease).await.map_err(failed)?;
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
        let stdin = params
            .stdin
            .as_deref()
            .map(|stdin| BASE64.decode(stdin))
            .transpose()
            .map_err(invalid)?;
        let mut argv = vec![params.command.clone()];
        argv.extend(params.args.iter().cloned());
        let request = ExecRequest {
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
            let notification = Outgoing {
                jsonrpc: "2.0",
                id: None,
                method: wire::EXECUTE_OUTPUT,
                params: wire::OutputNotification {
                    execution_id: self.execution_id.clone(),
                    stream: wire_stream,
                    offset,
                    data: BASE64.encode(data),
                },
            };
            if let Ok(mut line) = serde_json::to_vec(&notification) {
                line.push(b'\n');
                let _closed = self.lines.send(line).await;
            }
        })
    }
}
