//! JSON wire types of the REST API, and their conversions from the domain model.
//!
//! Architecture invariant: only this module decides what the API's JSON looks like. Domain types in `berth-core`
//! carry no serde derives for the wire; they are converted here, field by field.

use std::collections::BTreeMap;

use berth_core::capabilities::{Capabilities, DriverCapability, SandboxProviderCapability};
use berth_core::company::{ApiKey, Company};
use berth_core::environment::{Driver, Environment, check_description};
use berth_core::lease::Lease;
use berth_core::probe::{LastProbe, ProbeResult};
use berth_core::time::Timestamp;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::json::Patch;

/// RFC 3339 in UTC with exactly three fractional digits, e.g. `2026-11-22T12:41:36.120Z`. A fixed width keeps the
/// strings sortable as text.
pub fn rfc3339(timestamp: Timestamp) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let nanos = i128::from(timestamp.unix_millis()) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|moment| moment.format(FORMAT).ok())
        .unwrap_or_else(|| timestamp.unix_millis().to_string())
}

// === Companies and keys ===

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateCompanyRequest {
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompanyResponse {
    pub id: String,
    pub name: String,
    pub created_at: String,
    /// Where a run that names no environment runs; `null`: the company's Local environment.
    pub default_environment_id: Option<String>,
}

impl From<&Company> for CompanyResponse {
    fn from(company: &Company) -> Self {
        Self {
            id: company.id.to_string(),
            name: company.name.clone(),
            created_at: rfc3339(company.created_at),
            default_environment_id: company.default_environment_id.map(|id| id.to_string()),
        }
    }
}

/// `PATCH /api/companies/{id}`: fields left out keep their value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PatchCompanyRequest {
    /// One of the company's environments, used by runs that name none; `null` clears it (runs go to the Local
    /// environment again).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub default_environment_id: Patch<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateApiKeyRequest {
    pub name: String,
    pub role: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyResponse {
    pub id: String,
    pub company_id: String,
    pub name: String,
    pub role: &'static str,
    pub created_at: String,
    /// Only in the creation response: the key's secret, shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl ApiKeyResponse {
    pub fn new(key: &ApiKey, token: Option<String>) -> Self {
        Self {
            id: key.id.to_string(),
            company_id: key.company_id.to_string(),
            name: key.name.clone(),
            role: key.role.as_str(),
            created_at: rfc3339(key.created_at),
            token,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletedResponse {
    pub id: String,
    pub deleted: bool,
}

/// `GET /api/whoami`: who the token belongs to, so clients can find their company.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmIResponse {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyResponse>,
    /// For the admin: the company named `default`, which clients use when no company is named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_company: Option<CompanyResponse>,
}

// === Environments ===

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateEnvironmentRequest {
    pub name: String,
    #[serde(default, deserialize_with = "description")]
    pub description: Option<String>,
    pub driver: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub config: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PatchEnvironmentRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "patch_description")]
    #[schema(value_type = Option<String>)]
    pub description: Patch<String>,
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub config: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Patch<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProbeConfigRequest {
    pub driver: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub config: Option<Value>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "description")]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// Checks a description's characters as it is read. The handlers trim and bound it; the character check sits here,
/// at the one place every description enters, so create, patch and probe-config all refuse the same text. The error
/// names no value: the path (`description`) is added by the body extractor.
fn description<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let text = Option::<String>::deserialize(deserializer)?;
    if let Some(text) = &text {
        check_description(text).map_err(D::Error::custom)?;
    }
    Ok(text)
}

/// [`description`] for a PATCH field, where `null` clears it.
fn patch_description<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Patch<String>, D::Error> {
    let patch = Patch::<String>::deserialize(deserializer)?;
    if let Patch::Value(text) = &patch {
        check_description(text).map_err(D::Error::custom)?;
    }
    Ok(patch)
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentResponse {
    pub id: String,
    pub company_id: String,
    pub name: String,
    pub description: Option<String>,
    pub driver: &'static str,
    pub status: &'static str,
    #[schema(value_type = Object)]
    pub config: Map<String, Value>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    pub config_redacted: bool,
    pub metadata_redacted: bool,
    pub created_at: String,
    pub updated_at: String,
    /// The newest probe (`POST /api/environments/{id}/probe`), or `null` if it was never probed.
    pub last_probe: Option<LastProbeResponse>,
}

/// An environment's newest probe. Readers see when and whether it worked; its summary and details, like the config,
/// only managers and the admin.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastProbeResponse {
    /// When the probe started.
    pub at: String,
    pub ok: bool,
    pub driver: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<Map<String, Value>>,
}

impl LastProbeResponse {
    pub fn new(probe: &LastProbe, full: bool) -> Self {
        Self {
            at: rfc3339(probe.at),
            ok: probe.result.ok,
            driver: probe.result.driver.as_str(),
            summary: full.then(|| probe.result.summary.clone()),
            details: full.then(|| probe.result.details.clone()),
        }
    }
}

impl EnvironmentResponse {
    /// This view with the environment's last probe, shown as fully as the view itself.
    pub fn with_last_probe(mut self, probe: Option<&LastProbe>) -> Self {
        let full = !self.config_redacted;
        self.last_probe = probe.map(|probe| LastProbeResponse::new(probe, full));
        self
    }

    /// The full view, for admins and managers.
    pub fn full(environment: &Environment) -> Self {
        Self {
            id: environment.id.to_string(),
            company_id: environment.company_id.to_string(),
            name: environment.name.clone(),
            description: environment.description.clone(),
            driver: environment.driver.as_str(),
            status: environment.status.as_str(),
            config: environment.config.clone(),
            metadata: environment.metadata.clone(),
            config_redacted: false,
            metadata_redacted: false,
            created_at: rfc3339(environment.created_at),
            updated_at: rfc3339(environment.updated_at),
            last_probe: None,
        }
    }

    /// The reader's view: config and metadata withheld.
    pub fn redacted(environment: &Environment) -> Self {
        Self {
            config: Map::new(),
            metadata: None,
            config_redacted: true,
            metadata_redacted: true,
            ..Self::full(environment)
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResponse {
    pub ok: bool,
    pub driver: &'static str,
    pub summary: String,
    #[schema(value_type = Object)]
    pub details: Map<String, Value>,
}

impl From<&ProbeResult> for ProbeResponse {
    fn from(result: &ProbeResult) -> Self {
        Self {
            ok: result.ok,
            driver: result.driver.as_str(),
            summary: result.summary.clone(),
            details: result.details.clone(),
        }
    }
}

// === Capabilities ===

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapabilitiesResponse {
    pub drivers: BTreeMap<&'static str, DriverCapabilityResponse>,
    pub sandbox_providers: BTreeMap<String, SandboxProviderResponse>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriverCapabilityResponse {
    pub status: &'static str,
    pub supports_saved_probe: bool,
    pub supports_unsaved_probe: bool,
    pub supports_run_execution: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
    /// `plugin` only: the installed plugins' environment drivers, described like sandbox providers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment_drivers: Option<BTreeMap<String, SandboxProviderResponse>>,
    /// `plugin` only: plugins that could not be loaded, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxProviderResponse {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub display_name: String,
    pub description: String,
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_key: Option<String>,
    pub supports_reusable_leases: bool,
    pub supports_run_execution: bool,
    #[schema(value_type = Object)]
    pub config_schema: Value,
}

impl From<&Capabilities> for CapabilitiesResponse {
    fn from(capabilities: &Capabilities) -> Self {
        let driver = |capability: &DriverCapability| DriverCapabilityResponse {
            status: capability.status.as_str(),
            supports_saved_probe: capability.supports_saved_probe,
            supports_unsaved_probe: capability.supports_unsaved_probe,
            supports_run_execution: capability.supports_run_execution,
            note: capability.note,
            environment_drivers: None,
            problems: None,
        };
        let provider = |capability: &SandboxProviderCapability| SandboxProviderResponse {
            status: capability.status.as_str(),
            reason: capability.reason.clone(),
            display_name: capability.display_name.clone(),
            description: capability.description.clone(),
            source: capability.source.as_str(),
            plugin_key: capability.plugin_key.clone(),
            supports_reusable_leases: capability.supports_reusable_leases,
            supports_run_execution: capability.supports_run_execution,
            config_schema: capability.config_schema.clone(),
        };
        let mut drivers: BTreeMap<&'static str, DriverCapabilityResponse> = capabilities
            .drivers
            .iter()
            .map(|(kind, capability)| (kind.as_str(), driver(capability)))
            .collect();
        if let Some(plugin) = drivers.get_mut(Driver::Plugin.as_str()) {
            plugin.environment_drivers = Some(
                capabilities
                    .plugin_drivers
                    .iter()
                    .map(|(key, capability)| (key.clone(), provider(capability)))
                    .collect(),
            );
            plugin.problems = Some(capabilities.plugin_problems.clone());
        }
        Self {
            drivers,
            sandbox_providers: capabilities
                .sandbox_providers
                .iter()
                .map(|(key, capability)| (key.clone(), provider(capability)))
                .collect(),
        }
    }
}

// === Leases ===

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaseResponse {
    pub id: String,
    pub company_id: String,
    pub environment_id: String,
    pub run_id: Option<String>,
    /// `active`, `released`, `expired`, `failed` (the run failed or timed out, or the lease could not be taken; see
    /// `failureReason`) or `retained`.
    pub status: &'static str,
    pub lease_policy: &'static str,
    pub driver: &'static str,
    /// Where the lease lives: `local`, `ssh`, the sandbox provider's key (`fake`, `isolated`, a plugin's provider),
    /// or a plugin driver's plugin key. `null` only for leases recorded before berth named it for every driver.
    #[schema(examples("isolated"))]
    pub provider: Option<String>,
    /// The provider's id for the resource. An ssh lease's reads `ssh://user@host:port/<remote workspace path>`.
    pub provider_lease_id: Option<String>,
    pub acquired_at: String,
    pub last_used_at: String,
    pub expires_at: Option<String>,
    pub released_at: Option<String>,
    /// Why the lease is `failed`: `lease_acquire_failed`, `workspace_realization_failed`, `bridge_failed`,
    /// `sync_back_failed`, another code of the error that failed the run (`spawn_failed`, `limit_exceeded`, ...),
    /// `run_failed` (the command failed) or `timed_out`. `null` on a lease its run released or kept; the sweeps note
    /// why they ended a lease here too (`expired`, an orphan's release).
    #[schema(examples("run_failed"))]
    pub failure_reason: Option<String>,
    pub cleanup_status: Option<&'static str>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

impl From<&Lease> for LeaseResponse {
    fn from(lease: &Lease) -> Self {
        Self {
            id: lease.id.to_string(),
            company_id: lease.company_id.to_string(),
            environment_id: lease.environment_id.to_string(),
            run_id: lease.run_id.map(|id| id.to_string()),
            status: lease.status.as_str(),
            lease_policy: lease.lease_policy.as_str(),
            driver: lease.driver.as_str(),
            provider: lease.provider.clone(),
            provider_lease_id: lease.provider_lease_id.clone(),
            acquired_at: rfc3339(lease.acquired_at),
            last_used_at: rfc3339(lease.last_used_at),
            expires_at: lease.expires_at.map(rfc3339),
            released_at: lease.released_at.map(rfc3339),
            failure_reason: lease.failure_reason.clone(),
            cleanup_status: lease.cleanup_status.map(|status| status.as_str()),
            metadata: lease.metadata.clone(),
        }
    }
}

// === Runs ===

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateRunRequest {
    #[serde(default)]
    pub environment_id: Option<String>,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub workspace: Option<RunWorkspaceRequest>,
    #[serde(default)]
    pub bridge: Option<bool>,
    /// Extension: `ephemeral`, `retain_on_failure` or `reuse_by_environment` (default: reuse when the sandbox config
    /// says `reuseLease`, else ephemeral).
    #[serde(default)]
    pub lease_policy: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunWorkspaceRequest {
    pub local_path: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunResponse {
    pub id: String,
    pub company_id: String,
    pub environment_id: String,
    pub lease_id: Option<String>,
    pub status: &'static str,
    pub command: Vec<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl From<&berth_core::run::Run> for RunResponse {
    fn from(run: &berth_core::run::Run) -> Self {
        Self {
            id: run.id.to_string(),
            company_id: run.company_id.to_string(),
            environment_id: run.environment_id.to_string(),
            lease_id: run.lease_id.map(|id| id.to_string()),
            status: run.status.as_str(),
            command: run.command.clone(),
            exit_code: run.exit_code,
            signal: run.signal.clone(),
            error: run.error.clone(),
            created_at: rfc3339(run.created_at),
            started_at: run.started_at.map(rfc3339),
            finished_at: run.finished_at.map(rfc3339),
        }
    }
}

/// An activity log entry: who did what to which entity, and which fields it touched (never their values).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityResponse<'a> {
    /// The entry's place in the log: pass the last one seen as `?after=` to read on.
    pub id: i64,
    pub company_id: Option<String>,
    pub actor: &'a str,
    pub action: &'a str,
    pub entity_type: &'a str,
    pub entity_id: &'a str,
    #[schema(value_type = Object)]
    pub details: &'a Value,
    pub created_at: String,
}

impl<'a> From<&'a berth_store::ActivityEntry> for ActivityResponse<'a> {
    fn from(entry: &'a berth_store::ActivityEntry) -> Self {
        Self {
            id: entry.id,
            company_id: entry.company_id.map(|id| id.to_string()),
            actor: &entry.actor,
            action: &entry.action,
            entity_type: &entry.entity_type,
            entity_id: &entry.entity_id,
            details: &entry.details,
            created_at: rfc3339(entry.created_at),
        }
    }
}

/// Borrows the event's data: output events carry up to hundreds of KiB of text, serialized straight from the store's
/// value.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventResponse<'a> {
    pub seq: i64,
    pub run_id: String,
    pub at: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[schema(value_type = Object)]
    pub data: &'a Value,
}

impl EventResponse<'_> {
    /// The event's JSON text, exactly as `serde_json::to_string` writes it (see [`EventResponse::write_json`]).
    pub fn to_json(&self) -> String {
        let mut json = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_json(&mut json);
        json
    }

    /// Writes the event's JSON text, exactly as `serde_json::to_string` writes it, straight into `out` (an SSE
    /// frame: no intermediate copy of a large output event). Output events (`data` is `{"text": ...}`) take a
    /// faster path: serde_json inspects a string byte by byte, which made escaping the largest cost of streaming a
    /// run's output; [`write_json_str`] skips over eight bytes at a time.
    pub fn write_json<W: std::fmt::Write>(&self, out: &mut W) -> std::fmt::Result {
        let text = match self.data {
            Value::Object(map) if map.len() == 1 => map.get("text").and_then(Value::as_str),
            _ => None,
        };
        let Some(text) = text else {
            // Serializing a JSON value with string keys cannot fail.
            return out.write_str(&serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned()));
        };
        write!(out, "{{\"seq\":{},\"runId\":", self.seq)?;
        write_json_str(out, &self.run_id)?;
        out.write_str(",\"at\":")?;
        write_json_str(out, &self.at)?;
        out.write_str(",\"type\":")?;
        write_json_str(out, self.kind)?;
        out.write_str(",\"data\":{\"text\":")?;
        write_json_str(out, text)?;
        out.write_str("}}")
    }
}

/// Writes `text` as a JSON string literal, escaped as serde_json escapes it: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`,
/// `\t`, other control characters as `\u00xx`, everything else as is. Runs without escapes go out in one write.
fn write_json_str<W: std::fmt::Write>(out: &mut W, text: &str) -> std::fmt::Result {
    out.write_char('"')?;
    let bytes = text.as_bytes();
    // Start of the run of bytes not yet written.
    let mut copied = 0;
    let mut index = 0;
    while index < bytes.len() {
        // Blocks and words without a byte to escape are skipped at once.
        if let Some(block) = bytes.get(index..index + 32)
            && !block.chunks_exact(8).any(word_needs_escape)
        {
            index += 32;
            continue;
        }
        if let Some(word) = bytes.get(index..index + 8)
            && !word_needs_escape(word)
        {
            index += 8;
            continue;
        }
        let byte = bytes[index];
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => {
                index += 1;
                continue;
            }
        };
        // Escaped bytes are ASCII, so `copied..index` ends on a character boundary.
        out.write_str(&text[copied..index])?;
        if escape.is_empty() {
            write!(out, "\\u{byte:04x}")?;
        } else {
            out.write_str(escape)?;
        }
        index += 1;
        copied = index;
    }
    out.write_str(&text[copied..])?;
    out.write_char('"')
}

/// Whether any of eight bytes is a control character, `"` or `\\` (exact, by the "has a byte less than" bit trick).
fn word_needs_escape(word: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut bytes = [0; 8];
    bytes.copy_from_slice(word);
    let word = u64::from_le_bytes(bytes);
    let has_zero = |value: u64| value.wrapping_sub(ONES) & !value & HIGH;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    below_space
        | has_zero(word ^ (ONES * u64::from(b'"')))
        | has_zero(word ^ (ONES * u64::from(b'\\')))
        != 0
}

impl<'a> From<&'a berth_core::run::RunEvent> for EventResponse<'a> {
    fn from(event: &'a berth_core::run::RunEvent) -> Self {
        Self {
            seq: event.seq,
            run_id: event.run_id.to_string(),
            at: rfc3339(event.at),
            kind: event.kind.as_str(),
            data: &event.data,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn event_json_is_what_serde_writes() {
        let mut texts: Vec<String> = vec![
            String::new(),
            "plain".to_owned(),
            "héllo ✓ 😀 字".to_owned(),
            "quote \" backslash \\ slash / del \u{7f}".to_owned(),
        ];
        // Every control character, at every position within a 32-byte block and past it.
        for byte in 0_u8..0x20 {
            for offset in 0..41 {
                let mut text = "x".repeat(offset);
                text.push(char::from(byte));
                text.push_str(
                    "é€ and more text after it, long enough for another whole block of 32 bytes",
                );
                texts.push(text);
            }
        }
        for text in texts {
            for (kind, data) in [
                ("stdout", json!({"text": text})),
                ("agent", json!({"text": text, "other": [1, "\u{1}"]})),
            ] {
                let response = EventResponse {
                    seq: 42,
                    run_id: "01a23309-48a6-72d9-983e-017e4b01b9c7".to_owned(),
                    at: "2026-12-01T18:57:10.139Z".to_owned(),
                    kind,
                    data: &data,
                };
                assert_eq!(
                    response.to_json(),
                    serde_json::to_string(&response).unwrap(),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn timestamps_have_a_fixed_width_utc_form() {
        assert_eq!(
            rfc3339(Timestamp::from_unix_millis(0)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(Timestamp::from_unix_millis(1_795_000_000_120)),
            "2026-11-18T11:06:40.120Z"
        );
    }
}
