//! Audit: one [`AuditEntry`] per request, handed to the run's [`AuditSink`], whatever became of the request.

use std::time::{Duration, Instant};

use berth_core::ids::RunId;
use http::Method;

/// What the bridge records about one request. Never a body, a query string or a credential.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub method: String,
    /// The path only: a query string may hold secrets.
    pub path: String,
    pub status: u16,
    pub latency: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The rejection code; `None` when the request was forwarded (whatever the upstream answered).
    pub code: Option<&'static str>,
}

/// Receives an [`AuditEntry`] for every request. Called on the request's task: it must not block.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, run_id: RunId, entry: AuditEntry);
}

/// Audit paths are cut to this many bytes.
const MAX_AUDIT_PATH: usize = 512;

/// The audit record of a request in progress. Recorded by [`finish`](Self::finish), or on drop as 499
/// `request_cancelled` when the request was abandoned (the client left, or a shutdown's grace period ran out).
pub(super) struct PendingAudit<'a> {
    sink: &'a dyn AuditSink,
    run_id: RunId,
    pub(super) method: String,
    pub(super) path: String,
    started: Instant,
    pub(super) request_bytes: u64,
    finished: bool,
}

impl<'a> PendingAudit<'a> {
    pub(super) fn new(sink: &'a dyn AuditSink, run_id: RunId, method: &Method, path: &str) -> Self {
        let mut end = path.len().min(MAX_AUDIT_PATH);
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            sink,
            run_id,
            method: method.as_str().to_owned(),
            path: path[..end].to_owned(),
            started: Instant::now(),
            request_bytes: 0,
            finished: false,
        }
    }

    pub(super) fn finish(mut self, status: u16, response_bytes: u64, code: Option<&'static str>) {
        self.finished = true;
        self.record(status, response_bytes, code);
    }

    fn record(&mut self, status: u16, response_bytes: u64, code: Option<&'static str>) {
        self.sink.record(
            self.run_id,
            AuditEntry {
                method: std::mem::take(&mut self.method),
                path: std::mem::take(&mut self.path),
                status,
                latency: self.started.elapsed(),
                request_bytes: self.request_bytes,
                response_bytes,
                code,
            },
        );
    }
}

impl Drop for PendingAudit<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.record(499, 0, Some("request_cancelled"));
        }
    }
}
