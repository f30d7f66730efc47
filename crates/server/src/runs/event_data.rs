//! Every run event's payload, typed: the one place their JSON shape is written (docs/api.md, "Events").
//!
//! Callers say what happened ([`EventData`]); [`EventData::kind`] and [`EventData::into_value`] turn it into the
//! stored event. Nothing else in the server builds an event's `data` by hand.

use berth_core::driver::{RealizedWorkspace, SyncReport};
use berth_core::ids::LeaseId;
use berth_core::lease::{Lease, LeasePolicy};
use berth_core::run::{EventKind, RunStatus};
use serde_json::{Value, json};

/// What a run event says.
#[derive(Debug)]
pub enum EventData<'a> {
    /// `queued` or `running`.
    Status(RunStatus),
    /// The last event of every run.
    Final {
        status: RunStatus,
        exit_code: Option<i32>,
        signal: Option<&'a str>,
        error: Option<&'a str>,
    },
    LeaseActive {
        lease_id: LeaseId,
        policy: LeasePolicy,
        provider: Option<&'a str>,
        provider_lease_id: Option<&'a str>,
        resumed: bool,
    },
    /// The lease after release: released, retained, or failed (with its `failureReason`).
    LeaseEnded(&'a Lease),
    WorkspaceRealized(&'a RealizedWorkspace),
    WorkspaceSynced(&'a SyncReport),
    /// berth's own failures, with a stable code.
    Error {
        code: &'a str,
        message: &'a str,
    },
    /// A message the agent posted through the bridge.
    Agent {
        message: &'a str,
        data: Option<&'a serde_json::Map<String, Value>>,
    },
    /// One bridged request.
    Bridge {
        method: &'a str,
        path: &'a str,
        status: u16,
        latency_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
        code: Option<&'a str>,
    },
}

impl EventData<'_> {
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Status(_) | Self::Final { .. } => EventKind::Status,
            Self::LeaseActive { .. } | Self::LeaseEnded(_) => EventKind::Lease,
            Self::WorkspaceRealized(_) | Self::WorkspaceSynced(_) => EventKind::Workspace,
            Self::Error { .. } => EventKind::Error,
            Self::Agent { .. } => EventKind::Agent,
            Self::Bridge { .. } => EventKind::Bridge,
        }
    }

    pub fn into_value(self) -> Value {
        match self {
            Self::Status(status) => json!({"status": status.as_str()}),
            Self::Final {
                status,
                exit_code,
                signal,
                error,
            } => {
                json!({"status": status.as_str(), "exitCode": exit_code, "signal": signal, "error": error})
            }
            Self::LeaseActive {
                lease_id,
                policy,
                provider,
                provider_lease_id,
                resumed,
            } => json!({
                "leaseId": lease_id.to_string(),
                "status": "active",
                "policy": policy.as_str(),
                "provider": provider,
                "providerLeaseId": provider_lease_id,
                "resumed": resumed,
            }),
            Self::LeaseEnded(lease) => json!({
                "leaseId": lease.id.to_string(),
                "status": lease.status.as_str(),
                "failureReason": lease.failure_reason,
                "cleanupStatus": lease.cleanup_status.map(|status| status.as_str()),
            }),
            Self::WorkspaceRealized(workspace) => {
                let mut realized = serde_json::Map::new();
                for key in ["filesSent", "bytesSent"] {
                    if let Some(value) = workspace.metadata.get(key) {
                        realized.insert(key.to_owned(), value.clone());
                    }
                }
                realized.insert("phase".to_owned(), json!("realized"));
                realized.insert("cwd".to_owned(), json!(workspace.cwd));
                realized.insert(
                    "inPlace".to_owned(),
                    json!(
                        workspace.local_path.as_deref()
                            == Some(std::path::Path::new(&workspace.cwd))
                    ),
                );
                Value::Object(realized)
            }
            Self::WorkspaceSynced(report) => json!({
                "phase": "synced",
                "filesWritten": report.files_written,
                "filesDeleted": report.files_deleted,
                "bytesWritten": report.bytes_written,
                "conflicts": report.conflicts,
                "skipped": report
                    .skipped
                    .iter()
                    .map(|entry| match &entry.detail {
                        Some(detail) => json!({"path": entry.path, "reason": entry.reason.as_str(), "detail": detail}),
                        None => json!({"path": entry.path, "reason": entry.reason.as_str()}),
                    })
                    .collect::<Vec<_>>(),
                // Whether every change the environment made arrived (special files are no workspace content).
                "complete": berth_drivers::sync::lost_entries(report).is_empty(),
            }),
            Self::Error { code, message } => json!({"code": code, "message": message}),
            Self::Agent { message, data } => json!({"message": message, "data": data}),
            Self::Bridge {
                method,
                path,
                status,
                latency_ms,
                request_bytes,
                response_bytes,
                code,
            } => json!({
                "method": method,
                "path": path,
                "status": status,
                "latencyMs": latency_ms,
                "requestBytes": request_bytes,
                "responseBytes": response_bytes,
                "code": code,
            }),
        }
    }
}

/// A stdout or stderr event's payload.
pub fn output_text(text: &str) -> Value {
    json!({ "text": text })
}
