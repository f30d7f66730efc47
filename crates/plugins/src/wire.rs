//! Protocol v1 on the wire (PLUGINS.md §2–§4): JSON-RPC 2.0 envelopes and each method's params and result. Shared
//! by the host and by Rust plugins ([`crate::serve`]), so both sides read one definition.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The protocol versions this build speaks.
pub const PROTOCOL_VERSIONS: [u32; 1] = [1];

/// The longest line either side may send: 16 MiB.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

pub const INITIALIZE: &str = "initialize";
pub const HEALTH: &str = "health";
pub const SHUTDOWN: &str = "shutdown";
pub const VALIDATE_CONFIG: &str = "environmentValidateConfig";
pub const PROBE: &str = "environmentProbe";
pub const ACQUIRE_LEASE: &str = "environmentAcquireLease";
pub const RESUME_LEASE: &str = "environmentResumeLease";
pub const RELEASE_LEASE: &str = "environmentReleaseLease";
pub const DESTROY_LEASE: &str = "environmentDestroyLease";
pub const REALIZE_WORKSPACE: &str = "environmentRealizeWorkspace";
pub const EXECUTE: &str = "environmentExecute";
pub const CANCEL_EXECUTION: &str = "environmentCancelExecution";
/// Notification, plugin → host: a chunk of a running execution's output.
pub const EXECUTE_OUTPUT: &str = "environmentExecuteOutput";
/// Notification, host → plugin: a chunk of a running execution's stdin (when it listed this method).
pub const EXECUTE_INPUT: &str = "environmentExecuteInput";

/// JSON-RPC's "method not found".
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC's "invalid params".
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC's "internal error", also used for a provider's own failure.
pub const INTERNAL_ERROR: i64 = -32603;

/// Any message, as read from a line; which one it is follows from the fields present.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incoming {
    pub jsonrpc: String,
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub params: Option<Value>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<RpcError>,
}

/// A JSON-RPC error object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// A request (with an id) or a notification (without one).
#[derive(Debug, Serialize)]
pub struct Outgoing<'a, P: Serialize> {
    pub jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub method: &'a str,
    pub params: P,
}

/// A response to one request.
#[derive(Debug, Serialize)]
pub struct Response<'a> {
    pub jsonrpc: &'static str,
    pub id: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeParams {
    pub protocol_versions: Vec<u32>,
    pub host: HostInfo,
    pub plugin_id: String,
    pub state_dir: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HostInfo {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeResult {
    pub protocol_version: u32,
    pub plugin: PluginInfo,
    #[serde(default)]
    pub supported_methods: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PluginInfo {
    pub id: String,
    pub version: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HealthResult {
    pub status: HealthStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
    Degraded,
    Error,
}

/// What every environment call carries (§4).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallContext {
    pub driver_key: String,
    pub company_id: String,
    pub environment_id: String,
    /// The driver's config with every secret-ref field resolved. Never logged.
    pub config: Map<String, Value>,
}

/// A lease as the plugin made it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireLease {
    pub provider_lease_id: String,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResultWire {
    pub ok: bool,
    pub summary: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidateResult {
    pub ok: bool,
    #[serde(default)]
    pub errors: Vec<ValidationIssue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalized_config: Option<Map<String, Value>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ValidationIssue {
    pub path: String,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcquireParams {
    #[serde(flatten)]
    pub context: CallContext,
    pub run_id: String,
    pub reuse: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseParams {
    #[serde(flatten)]
    pub context: CallContext,
    pub lease: WireLease,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseResult {
    pub provider_lease_id: String,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RealizeResult {
    pub cwd: String,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteParams {
    #[serde(flatten)]
    pub context: CallContext,
    pub lease: WireLease,
    pub execution_id: String,
    pub command: String,
    pub args: Vec<String>,
    pub cwd: String,
    pub env: std::collections::BTreeMap<String, String>,
    /// Base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin_stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteResult {
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    #[serde(default)]
    pub timed_out: bool,
    /// Base64, only from a plugin that does not stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelParams {
    pub execution_id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputNotification {
    pub execution_id: String,
    pub stream: Stream,
    pub offset: u64,
    /// Base64.
    pub data: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InputNotification {
    pub execution_id: String,
    /// Base64.
    pub data: String,
    pub eof: bool,
}
