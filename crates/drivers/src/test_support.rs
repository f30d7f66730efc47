//! Fixtures shared by the drivers' tests, the providers' tests and the integration tests: requests, cancel signals,
//! output sinks and a stub provider. Compiled only for tests and with the `test-support` feature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use berth_core::config::SandboxConfig;
use berth_core::driver::{
    BoxFuture, CancelSignal, DriverError, ExecOutcome, ExecRequest, LeaseHandle, LeaseRequest,
    OutputSink, OutputStream, RealizedWorkspace, SyncReport, WorkspaceRequest,
};
use berth_core::environment::Driver;
use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::probe::ProbeResult;
use berth_core::provider::{ProviderDescriptor, ProviderSpec, SandboxProvider};
use serde_json::{Map, Value, json};

/// A request to run `argv` with no environment, no cwd, no stdin and no timeout.
pub fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|arg| (*arg).to_owned()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        timeout: None,
    }
}

/// A lease request for a fresh environment and run.
pub fn lease_request() -> LeaseRequest {
    LeaseRequest {
        company_id: CompanyId::new(),
        environment_id: EnvironmentId::new(),
        run_id: RunId::new(),
    }
}

/// A cancel signal that never fires.
pub fn never() -> CancelSignal {
    Box::pin(std::future::pending())
}

/// A sink that concatenates every stream into one buffer.
#[derive(Debug, Default)]
pub struct Collect(pub Mutex<Vec<u8>>);

impl OutputSink for Collect {
    fn output<'a>(&'a self, _stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.0.lock().unwrap().extend_from_slice(data) })
    }
}

impl Collect {
    /// Everything written, as UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// A sink that keeps streams apart: every chunk with the stream it came from and when it arrived.
#[derive(Debug, Default)]
pub struct Recorder {
    pub chunks: Mutex<Vec<(OutputStream, Vec<u8>, Instant)>>,
}

impl Recorder {
    /// What `stream` carried, as UTF-8.
    pub fn text(&self, stream: OutputStream) -> String {
        let chunks = self.chunks.lock().unwrap();
        let bytes: Vec<u8> = chunks
            .iter()
            .filter(|(s, _, _)| *s == stream)
            .flat_map(|(_, data, _)| data.clone())
            .collect();
        String::from_utf8(bytes).unwrap()
    }

    /// What stdout carried, as UTF-8.
    pub fn stdout(&self) -> String {
        self.text(OutputStream::Stdout)
    }

    /// Whether no chunk arrived on any stream.
    pub fn is_empty(&self) -> bool {
        self.chunks.lock().unwrap().is_empty()
    }
}

impl OutputSink for Recorder {
    fn output<'a>(&'a self, stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.chunks
                .lock()
                .unwrap()
                .push((stream, data.to_vec(), Instant::now()));
        })
    }
}

/// A provider that records what it is asked and answers canned results; `hang_probe` never answers probes.
#[derive(Debug)]
pub struct StubProvider {
    pub descriptor: ProviderDescriptor,
    pub hang_probe: bool,
    pub calls: Mutex<Vec<String>>,
}

impl StubProvider {
    pub fn new(key: &str, runs: bool) -> Self {
        let descriptor = ProviderDescriptor::new(ProviderSpec {
            key: key.to_owned(),
            display_name: format!("Stub {key}"),
            description: "A stub provider for tests".to_owned(),
            config_schema: json!({"type": "object"}),
            supports_reusable_leases: true,
            supports_run_execution: runs,
        })
        .unwrap();
        Self {
            descriptor,
            hang_probe: false,
            calls: Mutex::new(Vec::new()),
        }
    }

    /// A stub whose probes never answer.
    pub fn hung(key: &str) -> Self {
        Self {
            hang_probe: true,
            ..Self::new(key, true)
        }
    }

    fn record(&self, call: impl Into<String>) {
        self.calls.lock().unwrap().push(call.into());
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl SandboxProvider for StubProvider {
    fn descriptor(&self) -> &ProviderDescriptor {
        &self.descriptor
    }

    fn probe<'a>(&'a self, _config: &'a SandboxConfig) -> BoxFuture<'a, ProbeResult> {
        if self.hang_probe {
            return Box::pin(std::future::pending());
        }
        Box::pin(async move { ProbeResult::ok(Driver::Sandbox, "stub ready", Map::new()) })
    }

    fn acquire<'a>(
        &'a self,
        _config: &'a SandboxConfig,
        request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<LeaseHandle, DriverError>> {
        Box::pin(async move {
            self.record("acquire");
            Ok(LeaseHandle {
                // Left out on purpose: the driver stamps it.
                provider: None,
                provider_lease_id: Some(format!("stub://{}", request.run_id)),
                metadata: Map::new(),
                expires_at: None,
                process: None,
            })
        })
    }

    fn matches_reusable_lease(&self, _config: &SandboxConfig, lease: &LeaseHandle) -> bool {
        lease.metadata.get("reusable") == Some(&Value::Bool(true))
    }

    fn resume<'a>(
        &'a self,
        _config: &'a SandboxConfig,
        lease: &'a LeaseHandle,
        _request: &'a LeaseRequest,
    ) -> BoxFuture<'a, Result<Option<LeaseHandle>, DriverError>> {
        Box::pin(async move {
            self.record("resume");
            Ok(Some(lease.clone()))
        })
    }

    fn release<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        keep: bool,
        config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let with = if config.is_some() { " with config" } else { "" };
            self.record(format!("release keep={keep}{with}"));
            Ok(())
        })
    }

    fn destroy<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _config: Option<&'a SandboxConfig>,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.record("destroy");
            Ok(())
        })
    }

    fn prepare_workspace<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        request: &'a WorkspaceRequest,
    ) -> BoxFuture<'a, Result<RealizedWorkspace, DriverError>> {
        Box::pin(async move {
            self.record("prepare");
            Ok(RealizedWorkspace {
                cwd: "/stub".to_owned(),
                local_path: request.local_path.clone(),
                ephemeral: true,
                metadata: Map::new(),
            })
        })
    }

    fn execute<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _workspace: &'a RealizedWorkspace,
        request: ExecRequest,
        sink: &'a dyn OutputSink,
        _cancel: CancelSignal,
    ) -> BoxFuture<'a, Result<ExecOutcome, DriverError>> {
        Box::pin(async move {
            self.record(format!("execute {}", request.argv.join(" ")));
            sink.output(OutputStream::Stdout, b"stub output").await;
            Ok(ExecOutcome {
                exit_code: Some(0),
                ..ExecOutcome::default()
            })
        })
    }

    fn sync_back<'a>(
        &'a self,
        _lease: &'a LeaseHandle,
        _workspace: &'a RealizedWorkspace,
    ) -> BoxFuture<'a, Result<SyncReport, DriverError>> {
        Box::pin(async move {
            self.record("sync_back");
            Ok(SyncReport {
                files_written: 1,
                ..SyncReport::default()
            })
        })
    }
}
