//! A plugin's `sandbox_provider`, hosted as a [`SandboxProvider`]: every operation is a call to the plugin process,
//! failing fast when the plugin is not ready and never outliving its deadline.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use berth_core::capabilities::ProviderStatus;
use berth_core::config::SandboxConfig;
use berth_core::driver::{
    CancelSignal, DriverError, ExecOutcome, ExecRequest, LeaseHandle, LeaseRequest, OutputSink,
    OutputStream, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::probe::ProbeResult;
use berth_core::provider::{BoxFuture, ProviderDescriptor, ProviderSpec, SandboxProvider};
use berth_core::time::Timestamp;
use berth_core::validation::ValidationErrors;
use serde_json::{Map, Value};

use crate::connection::OutputChunk;
use crate::error::PluginError;
use crate::manifest::DriverEntry;
use crate::supervisor::{Deadlines, Live, Plugin};
use crate::wire::{
    self, CallContext, ExecuteParams, ExecuteResult, LeaseParams, LeaseResult, WireLease,
};

/// An execute without a timeout has no deadline of its own; this only keeps the arithmetic finite.
const NO_DEADLINE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// One `sandbox_provider` (or `environment_driver`) of one plugin. Its `Debug` names it and shows no config.
pub struct PluginSandboxProvider {
    plugin: Plugin,
    descriptor: ProviderDescriptor,
    deadlines: Deadlines,
    /// The config (secrets resolved) each live lease was acquired or resumed with, by provider lease id: what the
    /// calls of its run (realize, execute) carry. In memory only, dropped at release; after a restart, cleanup gets
    /// the config from berth.
    configs: Mutex<HashMap<String, Map<String, Value>>>,
}

impl std::fmt::Debug for PluginSandboxProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSandboxProvider")
            .field("plugin", &self.plugin.id())
            .field("key", &self.descriptor.key())
            .finish_non_exhaustive()
    }
}

impl PluginSandboxProvider {
    pub fn new(
        plugin: Plugin,
        driver: &DriverEntry,
        deadlines: Deadlines,
    ) -> Result<Self, berth_core::Error> {
        let descriptor = ProviderDescriptor::new(ProviderSpec {
            key: driver.driver_key.clone(),
            display_name: driver.display_name.clone(),
            description: driver.description.clone(),
            config_schema: driver.config_schema.clone(),
            supports_reusable_leases: driver.supports_reusable_leases,
            supports_run_execution: true,
        })?;
        Ok(Self {
            plugin,
            descriptor,
            deadlines,
            configs: Mutex::default(),
        })
    }

    /// The plugin this provider lives in.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    fn live(&self) -> Result<std::sync::Arc<Live>, DriverError> {
        Ok(self.plugin.live()?)
    }

    fn require(&self, live: &Live, method: &'static str) -> Result<(), DriverError> {
        if live.supports(method) {
            Ok(())
        } else {
            Err(PluginError::UnsupportedMethod {
                plugin: self.plugin.id().to_owned(),
                method,
            }
            .into())
        }
    }

    fn context(
        &self,
        config: &SandboxConfig,
        company_id: String,
        environment_id: String,
    ) -> CallContext {
        CallContext {
            driver_key: self.descriptor.key().to_owned(),
            company_id,
            environment_id,
            config: config.fields.clone(),
        }
    }

    /// Remembers the config a lease's run calls carry.
    fn remember_config(&self, lease: &LeaseHandle, config: &SandboxConfig) {
        if let (Some(id), Ok(mut configs)) = (&lease.provider_lease_id, self.configs.lock()) {
            configs.insert(id.clone(), config.fields.clone());
        }
    }

    fn remembered_config(&self, lease: &LeaseHandle) -> Option<Map<String, Value>> {
        let id = lease.provider_lease_id.as_ref()?;
        self.configs.lock().ok()?.get(id).cloned()
    }

    fn forget_config(&self, lease: &LeaseHandle) {
        if let (Some(id), Ok(mut configs)) = (&lease.provider_lease_id, self.configs.lock()) {
            configs.remove(id);
        }
    }

    /// The context of a call about an existing lease: whose it is, from what the lease recorded at acquire (never a
    /// secret), and `config` — given, else the one the lease was acquired with, else none.
    fn lease_context(&self, lease: &LeaseHandle, config: Option<&SandboxConfig>) -> CallContext {
        let text = |key: &str| {
            lease
                .metadata
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let config = match config {
            Some(config) => config.fields.clone(),
            None => self.remembered_config(lease).unwrap_or_default(),
        };
        CallContext {
            driver_key: self.descriptor.key().to_owned(),
            company_id: text(COMPANY_KEY),
            environment_id: text(ENVIRONMENT_KEY),
            config,
        }
    }

    /// `error` as a driver error, with every secret of `config` masked out of what the plugin said.
    fn masked(&self, error: PluginError, config: &Map<String, Value>) -> DriverError {
        // Wherever the schema keeps secrets, their resolved values are masked out of what the plugin said.
        let secrets = self.descriptor.secret_paths().values_in(config);
        match error {
            PluginError::Remote {
                plugin,
                code,
                message,
            } => PluginError::Remote {
                plugin,
                code,
                message: mask(message, &secrets),
            }
            .into(),
            other => other.into(),
        }
    }

    async fn lease_call(
        &self,
        method: &'static str,
        lease: &LeaseHandle,
        config: Option<&SandboxConfig>,
    ) -> Result<Value, DriverError> {
        let live = self.live()?;
        self.require(&live, method)?;
        let params = LeaseParams {
            context: self.lease_context(lease, config),
            lease: wire_lease(lease),
        };
        live.connection
            .call(method, &params, self.deadlines.call)
            .await
            .map_err(|error| self.masked(error, &params.context.config))
    }

    /// The lease the plugin made for `request`, with berth's own notes beside the plugin's: whose it is, so later
    /// calls about it can say so.
    fn handle(&self, result: LeaseResult, request: &LeaseRequest) -> LeaseHandle {
        let mut metadata = result.metadata;
        let company = request.company_id.to_string();
        let environment = request.environment_id.to_string();
        metadata.insert(COMPANY_KEY.to_owned(), Value::String(company));
        metadata.insert(ENVIRONMENT_KEY.to_owned(), Value::String(environment));
        metadata.insert(
            PLUGIN_KEY.to_owned(),
            Value::String(self.plugin.id().to_owned()),
        );
        LeaseHandle {
            provider: Some(self.descriptor.key().to_owned()),
            provider_lease_id: Some(result.provider_lease_id),
            metadata,
            expires_at: result.expires_at.as_deref().and_then(parse_rfc3339),
            process: None,
        }
    }

    async fn run(
        &self,
        lease: &LeaseHandle,
        workspace: &RealizedWorkspace,
        request: ExecRequest,
        sink: &dyn OutputSink,
        cancel: CancelSignal,
    ) -> Result<ExecOutcome, DriverError> {
        let live = self.live()?;
        self.require(&live, wire::EXECUTE)?;
        let Some((program, args)) = request.argv.split_first() else {
            return Err(DriverError::failed("an empty command"));
        };
        let execution_id = format!("exec-{:016x}", rand::random::<u64>());
        // Input goes in chunks after the call where the plugin takes it so: one line of a large stdin would pass the
        // protocol's line limit.
        let stream_stdin = request.stdin.is_some() && live.supports(wire::EXECUTE_INPUT);
        let cwd = match &request.cwd {
            Some(relative) => format!("{}/{relative}", workspace.cwd.trim_end_matches('/')),
            None => workspace.cwd.clone(),
        };
        let params = ExecuteParams {
            context: self.lease_context(lease, None),
            lease: wire_lease(lease),
            execution_id: execution_id.clone(),
            command: program.clone(),
            args: args.to_vec(),
            cwd,
            env: request.env.clone(),
            stdin: match (&request.stdin, stream_stdin) {
                (Some(stdin), false) => Some(BASE64.encode(stdin)),
                _ => None,
            },
            stdin_stream: stream_stdin,
            timeout_ms: request
                .timeout
                .map(|timeout| u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        };
        let deadline = request.timeout.map_or(NO_DEADLINE, |timeout| {
            timeout.saturating_add(self.deadlines.execute_grace)
        });
        let mut output = live.connection.subscribe_output(&execution_id);
        let mut offsets = Offsets::default();
        let call = live
            .connection
            .call::<_, ExecuteResult>(wire::EXECUTE, &params, deadline);
        tokio::pin!(call);
        let mut answered = None;
        if let (true, Some(stdin)) = (stream_stdin, &request.stdin) {
            // Polled once, the call has sent its request: the input follows it on the same ordered line queue.
            tokio::select! {
                biased;
                result = &mut call => answered = Some(result),
                () = std::future::ready(()) => self.send_input(&live, &execution_id, stdin).await?,
            }
        }
        let mut cancel = Some(cancel);
        let mut cancelled = false;
        // Closed when the connection is: from then on only the call's own failure is left to wait for.
        let mut output_open = true;
        let result = loop {
            if let Some(result) = answered.take() {
                break result;
            }
            tokio::select! {
                biased;
                chunk = output.chunks.recv(), if output_open => {
                    let Some(chunk) = chunk else {
                        output_open = false;
                        continue;
                    };
                    if let Err(error) = offsets.deliver(chunk, sink).await {
                        self.cancel_execution(&live, &execution_id).await;
                        return Err(self.protocol(error));
                    }
                }
                result = &mut call => break result,
                () = async { if let Some(signal) = cancel.as_mut() { signal.await } else { std::future::pending().await } } => {
                    cancel = None;
                    cancelled = true;
                    self.cancel_execution(&live, &execution_id).await;
                }
            }
        };
        // Every chunk sent before the answer is already queued: take them before the answer's own output.
        while let Ok(chunk) = output.chunks.try_recv() {
            offsets
                .deliver(chunk, sink)
                .await
                .map_err(|error| self.protocol(error))?;
        }
        let result = match result {
            Ok(result) => result,
            Err(error) => {
                if matches!(error, PluginError::Deadline { .. }) {
                    self.cancel_execution(&live, &execution_id).await;
                }
                return Err(self.masked(error, &params.context.config));
            }
        };
        for (stream, data) in [
            (OutputStream::Stdout, &result.stdout),
            (OutputStream::Stderr, &result.stderr),
        ] {
            if let Some(data) = data {
                let bytes = BASE64.decode(data).map_err(|error| {
                    self.protocol(format!(
                        "{} of the result is not base64: {error}",
                        stream.as_str()
                    ))
                })?;
                if !bytes.is_empty() {
                    sink.output(stream, &bytes).await;
                }
            }
        }
        Ok(ExecOutcome {
            exit_code: result.exit_code,
            signal: result.signal,
            timed_out: result.timed_out,
            cancelled: cancelled && !result.timed_out,
            limit_exceeded: None,
        })
    }

    /// Calls `environmentAcquireLease` within the call deadline. A plugin may still finish an acquire berth gave up
    /// on: no lease row records that sandbox, so no sweep could ever find it. The call therefore keeps listening a
    /// while longer in the background, and a late lease is destroyed through the plugin at once.
    async fn acquire_or_undo_late(
        &self,
        live: Arc<Live>,
        params: wire::AcquireParams,
    ) -> Result<LeaseResult, DriverError> {
        let deadline = self.deadlines.call;
        let params = Arc::new(params);
        let mut call = tokio::spawn({
            let (live, params) = (Arc::clone(&live), Arc::clone(&params));
            async move {
                live.connection
                    .call::<_, LeaseResult>(
                        wire::ACQUIRE_LEASE,
                        &*params,
                        deadline.saturating_add(LATE_ACQUIRE_WATCH),
                    )
                    .await
            }
        });
        let answer = match tokio::time::timeout(deadline, &mut call).await {
            Ok(joined) => joined,
            Err(_elapsed) => {
                let plugin = self.plugin.id().to_owned();
                let undo = async move {
                    let Ok(Ok(late)) = call.await else {
                        return;
                    };
                    tracing::warn!(plugin.id = %plugin, lease.id = %late.provider_lease_id, "the plugin finished an acquire after its deadline; destroying that lease");
                    let undo = LeaseParams {
                        context: params.context.clone(),
                        lease: WireLease {
                            provider_lease_id: late.provider_lease_id,
                            metadata: late.metadata,
                        },
                    };
                    if let Err(error) = live
                        .connection
                        .call::<_, Value>(wire::DESTROY_LEASE, &undo, deadline)
                        .await
                    {
                        tracing::warn!(plugin.id = %plugin, %error, "could not destroy a lease acquired after its deadline");
                    }
                };
                tokio::spawn(undo);
                return Err(PluginError::Deadline {
                    plugin: self.plugin.id().to_owned(),
                    method: wire::ACQUIRE_LEASE,
                    deadline,
                }
                .into());
            }
        };
        answer
            .map_err(|error| DriverError::failed(format!("the acquire call failed: {error}")))?
            .map_err(|error| self.masked(error, &params.context.config))
    }

    /// Sends `stdin` as `environmentExecuteInput` notifications, then end of file.
    async fn send_input(
        &self,
        live: &Live,
        execution_id: &str,
        stdin: &[u8],
    ) -> Result<(), DriverError> {
        let mut chunks = stdin.chunks(INPUT_CHUNK).peekable();
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let eof = chunks.peek().is_none();
            let input = wire::InputNotification {
                execution_id: execution_id.to_owned(),
                data: BASE64.encode(chunk),
                eof,
            };
            live.connection.notify(wire::EXECUTE_INPUT, &input).await?;
            if eof {
                return Ok(());
            }
        }
    }

    async fn cancel_execution(&self, live: &Live, execution_id: &str) {
        if !live.supports(wire::CANCEL_EXECUTION) {
            return;
        }
        let params = wire::CancelParams {
            execution_id: execution_id.to_owned(),
        };
        if let Err(error) = live
            .connection
            .call::<_, Value>(wire::CANCEL_EXECUTION, &params, self.deadlines.call)
            .await
        {
            tracing::warn!(plugin.id = %self.plugin.id(), execution.id = execution_id, %error, "cancelling an execution failed");
        }
    }

    fn protocol(&self, message: String) -> DriverError {
        PluginError::Protocol {
            plugin: self.plugin.id().to_owned(),
            message,
        }
        .into()
    }
}

/// `message` with every one of `secrets` replaced by `[secret]`.
fn mask(mut message: String, secrets: &BTreeSet<String>) -> String {
    for secret in secrets.iter().filter(|secret| !secret.is_empty()) {
        message = message.replace(secret.as_str(), "[secret]");
    }
    message
}

/// Bytes of stdin per `environmentExecuteInput` notification.
const INPUT_CHUNK: usize = 256 * 1024;

/// How long past its deadline an acquire is still listened for, so that a late lease can be destroyed.
const LATE_ACQUIRE_WATCH: Duration = Duration::from_secs(600);

/// Lease-metadata keys berth itself sets on plugin leases (never secrets).
const COMPANY_KEY: &str = "berthCompanyId";
const ENVIRONMENT_KEY: &str = "berthEnvironmentId";
const PLUGIN_KEY: &str = "berthPluginId";

fn wire_lease(lease: &LeaseHandle) -> WireLease {
    let mut metadata = lease.metadata.clone();
    for key in [COMPANY_KEY, ENVIRONMENT_KEY, PLUGIN_KEY] {
        metadata.remove(key);
    }
    WireLease {
        provider_lease_id: lease.provider_lease_id.clone().unwrap_or_default(),
        metadata,
    }
}

fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let parsed =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000)
        .ok()
        .map(Timestamp::from_unix_millis)
}

/// Where each stream's next byte is: chunks must continue exactly there (a resent overlap is trimmed, a gap is a
/// protocol error), so output reaches the run in order and byte-exact.
#[derive(Debug, Default)]
struct Offsets {
    stdout: u64,
    stderr: u64,
}

impl Offsets {
    async fn deliver(&mut self, chunk: OutputChunk, sink: &dyn OutputSink) -> Result<(), String> {
        let data = chunk.data;
        let (next, stream) = match chunk.stream {
            wire::Stream::Stdout => (&mut self.stdout, OutputStream::Stdout),
            wire::Stream::Stderr => (&mut self.stderr, OutputStream::Stderr),
        };
        if chunk.offset > *next {
            return Err(format!(
                "{} jumped from byte {} to {}: output was lost",
                stream.as_str(),
                next,
                chunk.offset
            ));
        }
        let already = usize::try_from(*next - chunk.offset).unwrap_or(usize::MAX);
        if already >= data.len() {
            return Ok(());
        }
        let fresh = &data[already..];
        *next += fresh.len() as u64;
        sink.output(stream, fresh).await;
        Ok(())
    }
}

impl SandboxProvider for PluginSandboxProvider {
    fn descriptor(&self) -> &ProviderDescriptor {
        &self.descriptor
    }

    fn status(&self) -> (ProviderStatus, Option<String>) {
        self.plugin.state().status()
    }

    fn probe<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
        Box::pin(async move {
            let failed = |summary: String| ProbeResult::failed(Driver::Sandbox, summary);
            let live = match self.live() {
                Ok(live) => live,
                Err(error) => return failed(error.to_string()),
            };
            if !live.supports(wire::PROBE) {
                return ProbeResult::ok(
                    Driver::Sandbox,
                    format!(
                        "plugin {} is ready (it has no probe of its own)",
                        self.plugin.id()
                    ),
                    Map::new(),
                );
            }
            let context = self.context(config, String::new(), String::new());
            match live
                .connection
                .call::<_, wire::ProbeResultWire>(wire::PROBE, &context, self.deadlines.probe)
                .await
            {
                Ok(result) => ProbeResult {
                    ok: result.ok,
                    driver: Driver::Sandbox,
                    summary: result.summary,
                    details: match result.details {
                        Some(Value::Object(details)) => details,
                        _ => Map::new(),
                    },
                },
                Err(error) => failed(self.masked(error, &context.config).to_string()),
            }
        })
    }

    fn validate_config<'a>(
        &'a self,
        config: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<ValidationErrors, DriverError>> {
        Box::pin(async move {
            let mut problems = ValidationErrors::new();
            let live = self.live()?;
            if !live.supports(wire::VALIDATE_CONFIG) {
                return Ok(problems);
            }
            let context = self.context(config, String::new(), String::new());
            let result: wire::ValidateResult = live
                .connection
                .call(wire::VALIDATE_CONFIG, &context, self.deadlines.call)
                .await
                .map_err(|error| self.masked(error, &context.config))?;
            let secrets = self.descriptor.secret_paths().values_in(&context.config);
            for issue in result.errors {
                problems.push(issue.path, mask(issue.message, &secrets));
            }
            if !result.ok && problems.is_empty() {
                problems.push(
                    "",
                    format!("plugin {} refused the config", self.plugin.id()),
                );
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
            let live = self.live()?;
            self.require(&live, wire::ACQUIRE_LEASE)?;
            let params = wire::AcquireParams {
                context: self.context(
                    config,
                    request.company_id.to_string(),
                    request.environment_id.to_string(),
                ),
                run_id: request.run_id.to_string(),
                reuse: config.reuse_lease,
            };
            let result = self.acquire_or_undo_late(live, params).await?;
            let lease = self.handle(result, request);
            self.remember_config(&lease, config);
            Ok(lease)
        })
    }

    fn matches_reusable_lease(&self, _config: &SandboxConfig, lease: &LeaseHandle) -> bool {
        self.descriptor.spec().supports_reusable_leases
            && lease.provider.as_deref() == Some(self.descriptor.key())
    }

    fn resume<'a>(
        &'a self,
        config: &'a SandboxConfig,
        lease: &'a LeaseHandle,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move {
            let live = self.live()?;
            if !live.supports(wire::RESUME_LEASE) {
                return Ok(None);
            }
            let params = LeaseParams {
                context: self.context(
                    config,
                    request.company_id.to_string(),
                    request.environment_id.to_string(),
                ),
                lease: wire_lease(lease),
            };
            let result: Option<LeaseResult> = live
                .connection
                .call(wire::RESUME_LEASE, &params, self.deadlines.call)
                .await
                .map_err(|error| self.masked(error, &params.context.config))?;
            let resumed = result.map(|result| self.handle(result, request));
            if let Some(lease) = &resumed {
                self.remember_config(lease, config);
            }
            Ok(resumed)
        })
    }

    fn release<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        keep: bool,
        config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let method = if keep {
                wire::RELEASE_LEASE
            } else {
                wire::DESTROY_LEASE
            };
            let released = self.lease_call(method, lease, config).await.map(drop);
            self.forget_config(lease);
            released
        })
    }

    fn destroy<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let destroyed = self
                .lease_call(wire::DESTROY_LEASE, lease, config)
                .await
                .map(drop);
            self.forget_config(lease);
            destroyed
        })
    }

    fn syncs_workspace(&self) -> bool {
        // The protocol has no sync methods yet: berth moves workspaces with `tar` through environmentExecute.
        false
    }

    fn prepare_workspace<'a>(
        &'a self,
        lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async move {
            if request.local_path.is_some() {
                // The sandbox driver syncs the workspace itself (`syncs_workspace` is false) and asks for an empty one.
                return Err(DriverError::failed(format!(
                    "plugin provider {} makes empty workspaces; berth syncs the files in",
                    self.descriptor.key()
                )));
            }
            let result: wire::RealizeResult = serde_json::from_value(
                self.lease_call(wire::REALIZE_WORKSPACE, lease, None)
                    .await?,
            )
            .map_err(|error| {
                self.protocol(format!(
                    "the answer to {} has the wrong shape: {error}",
                    wire::REALIZE_WORKSPACE
                ))
            })?;
            Ok(RealizedWorkspace {
                cwd: result.cwd,
                local_path: None,
                ephemeral: true,
                metadata: result.metadata,
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
        Box::pin(self.run(lease, workspace, request, sink, cancel))
    }

    fn sync_back<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        // The sandbox driver brings the workspace back itself (`syncs_workspace` is false).
        Box::pin(async { Ok(SyncReport::default()) })
    }
}
