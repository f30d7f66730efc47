//! Prometheus metrics: the process's one recorder, what every metric is called and means, and rendering it in the
//! text exposition format for `GET /metrics` (docs/api.md, "Metrics").
//!
//! Everything records through the `metrics` facade: this module for the server's own metrics (runs, leases, HTTP,
//! the bridge, sweeps), the drivers and plugin crates with the facade's macros under the names described here, so no
//! library depends on the server. What must hold across restarts and replicas (leases held) is not counted in memory
//! but read from the database at scrape time.
//!
//! **Labels are bounded.** No label holds an id, a name a user chose, a path as requested or a secret: only enums
//! (run status, driver, lease operation, stream), status codes, route templates, the bridge's rejection codes, and
//! provider and plugin keys of what the operator installed (a provider key nothing installed is reported as `other`).
//!
//! This module sits in the server's lowest layer: it names no other server module; they call into it.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use berth_core::capabilities::ProviderStatus;
use berth_core::config::DriverConfig;
use berth_core::environment::Driver;
use berth_core::lease::LeaseStatus;
use berth_core::run::Run;
use berth_core::time::Timestamp;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

// Runs (this node's).
pub const RUNS_STARTED: &str = "berth_runs_started_total";
pub const RUNS_FINISHED: &str = "berth_runs_finished_total";
pub const RUN_DURATION: &str = "berth_run_duration_seconds";
pub const RUN_START_LATENCY: &str = "berth_run_start_latency_seconds";
pub const RUN_OUTPUT_BYTES: &str = "berth_run_output_bytes_total";
// Leases.
pub const LEASES_ACTIVE: &str = "berth_leases_active";
pub const LEASES_RETAINED: &str = "berth_leases_retained";
pub const LEASE_FAILURES: &str = "berth_lease_failures_total";
// Sweeps.
pub const SWEEPS: &str = "berth_sweeps_total";
pub const SWEEP_ACTIONS: &str = "berth_sweep_actions_total";
pub const SWEEP_FAILURES: &str = "berth_sweep_failures_total";
// HTTP API.
pub const HTTP_REQUESTS: &str = "berth_http_requests_total";
pub const HTTP_DURATION: &str = "berth_http_request_duration_seconds";
// Callback bridges.
pub const BRIDGE_REQUESTS: &str = "berth_bridge_requests_total";
pub const BRIDGE_DURATION: &str = "berth_bridge_request_duration_seconds";
// Recorded by `berth-drivers` (`ssh::pool`) under these names.
pub const SSH_CONNECTIONS_OPENED: &str = "berth_ssh_connections_opened_total";
pub const SSH_CONNECTIONS_OPEN: &str = "berth_ssh_connections_open";
pub const SSH_SESSIONS_OPENED: &str = "berth_ssh_sessions_opened_total";
// Plugins: status read at scrape time; restarts recorded by `berth-plugins` (`supervisor`) under this name.
pub const PLUGIN_STATUS: &str = "berth_plugin_status";
pub const PLUGIN_RESTARTS: &str = "berth_plugin_restarts_total";

/// The label value for a request no route matched: its path is whatever the client sent, so it is never a label.
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// The provider label of a lease without one (local, ssh).
const NO_PROVIDER: &str = "none";
/// The provider label of a key that is not an installed provider's (a plugin uninstalled since): bounded anyway.
const OTHER_PROVIDER: &str = "other";

/// Bucket bounds, in seconds. Runs last from well under a second to hours; their start is lease plus workspace.
const RUN_DURATION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
];
const START_LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes (they queue until then).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot install the metrics recorder")]
    Install(#[from] BuildError),
}

/// The process's recorder, installed once: the `metrics` facade has one global recorder per process. A lock, not a
/// `OnceLock`: two servers starting in one process (tests) must not both try to install one.
static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
/// The provider keys that may be labels: those installed (built in, or from a plugin the operator installed).
static PROVIDER_KEYS: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());
/// The lease label sets reported at the last scrape, so a set that is gone now reads 0 instead of its old count.
/// Each is (gauge, driver, provider).
static LEASE_SERIES: Mutex<BTreeSet<LeaseSeries>> = Mutex::new(BTreeSet::new());

type LeaseSeries = (&'static str, &'static str, String);

/// Renders the metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    handle: PrometheusHandle,
    public: bool,
}

impl Metrics {
    /// Installs the recorder (once per process; later calls share it), describes every metric, and notes which
    /// provider keys may appear in labels. `public`: `/metrics` needs no token (`--metrics-public`).
    pub fn install(
        provider_keys: impl IntoIterator<Item = String>,
        public: bool,
    ) -> Result<Self, MetricsError> {
        *PROVIDER_KEYS
            .write()
            .unwrap_or_else(PoisonError::into_inner) = provider_keys.into_iter().collect();
        let mut installed = HANDLE.lock().unwrap_or_else(PoisonError::into_inner);
        let handle = match &*installed {
            Some(handle) => handle.clone(),
            None => {
                let handle = PrometheusBuilder::new()
                    .set_buckets_for_metric(
                        Matcher::Full(RUN_DURATION.to_owned()),
                        RUN_DURATION_BUCKETS,
                    )?
                    .set_buckets_for_metric(
                        Matcher::Full(RUN_START_LATENCY.to_owned()),
                        START_LATENCY_BUCKETS,
                    )?
                    .set_buckets_for_metric(
                        Matcher::Full(HTTP_DURATION.to_owned()),
                        REQUEST_BUCKETS,
                    )?
                    .set_buckets_for_metric(
                        Matcher::Full(BRIDGE_DURATION.to_owned()),
                        REQUEST_BUCKETS,
                    )?
                    .install_recorder()?;
                describe();
                installed.insert(handle).clone()
            }
        };
        Ok(Self { handle, public })
    }

    /// Whether `/metrics` is served without the admin token.
    pub fn is_public(&self) -> bool {
        self.public
    }

    /// Folds queued histogram samples into their buckets now and then, until the server stops.
    pub fn spawn_upkeep(&self) -> tokio::task::JoinHandle<()> {
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                interval.tick().await;
                handle.run_upkeep();
            }
        })
    }

    /// Every metric in the text exposition format.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// HELP lines (and units) for every metric, wherever it is recorded.
fn describe() {
    describe_counter!(
        RUNS_STARTED,
        Unit::Count,
        "Runs accepted by this node, by driver."
    );
    describe_counter!(
        RUNS_FINISHED,
        Unit::Count,
        "Runs this node drove to a final status, by driver and status."
    );
    describe_histogram!(
        RUN_DURATION,
        Unit::Seconds,
        "From a run's acceptance to its final status, by driver and status."
    );
    describe_histogram!(
        RUN_START_LATENCY,
        Unit::Seconds,
        "From a run's acceptance to its command starting (lease and workspace ready), by driver."
    );
    describe_counter!(
        RUN_OUTPUT_BYTES,
        Unit::Bytes,
        "Bytes of command output stored as run events, by stream."
    );
    describe_gauge!(
        LEASES_ACTIVE,
        Unit::Count,
        "Leases held by a live run, by driver and provider, from the database at scrape time (every replica \
         reports the same shared count)."
    );
    describe_gauge!(
        LEASES_RETAINED,
        Unit::Count,
        "Leases kept after their run (for reuse or inspection), by driver and provider, from the database at \
         scrape time."
    );
    describe_counter!(
        LEASE_FAILURES,
        Unit::Count,
        "Lease operations that failed, by operation (acquire, release, destroy), driver and provider."
    );
    describe_counter!(
        SWEEPS,
        Unit::Count,
        "Sweeps this node ran (start-up and periodic)."
    );
    describe_counter!(
        SWEEP_ACTIONS,
        Unit::Count,
        "What sweeps did, by action (run_failed, run_settled, lease_released, cleanup_retried, lease_expired)."
    );
    describe_counter!(
        SWEEP_FAILURES,
        Unit::Count,
        "Sweep steps that could not read the database, by step (runs, leases, cleanups, nonces, expiry)."
    );
    describe_counter!(
        HTTP_REQUESTS,
        Unit::Count,
        "API requests, by method, route template and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "API request latency up to the response head (a streamed body is not included), by method and route \
         template."
    );
    describe_counter!(
        BRIDGE_REQUESTS,
        Unit::Count,
        "Requests to runs' callback bridges, by status and rejection code (`forwarded` when passed on)."
    );
    describe_histogram!(
        BRIDGE_DURATION,
        Unit::Seconds,
        "Callback bridge request latency, by outcome (forwarded or rejected)."
    );
    describe_counter!(
        SSH_CONNECTIONS_OPENED,
        Unit::Count,
        "SSH connections the pool opened."
    );
    describe_gauge!(
        SSH_CONNECTIONS_OPEN,
        Unit::Count,
        "SSH connections open now (pooled, or closing once their last user lets go)."
    );
    describe_counter!(
        SSH_SESSIONS_OPENED,
        Unit::Count,
        "SSH session channels opened on pooled connections."
    );
    describe_gauge!(
        PLUGIN_STATUS,
        Unit::Count,
        "1 for each installed plugin's current status (starting, ready, unavailable, failed), 0 for the others."
    );
    describe_counter!(
        PLUGIN_RESTARTS,
        Unit::Count,
        "Times a plugin went down and was scheduled for a restart, by plugin."
    );
    // Series without labels exist from the start, so a dashboard tells "none yet" from "not exported".
    for name in [SWEEPS, SSH_CONNECTIONS_OPENED, SSH_SESSIONS_OPENED] {
        counter!(name).absolute(0);
    }
    gauge!(SSH_CONNECTIONS_OPEN).increment(0.0);
}

/// The provider label: an installed provider's key, `none` without one, `other` for a key nothing installed.
fn provider_label(provider: Option<&str>) -> String {
    let Some(provider) = provider else {
        return NO_PROVIDER.to_owned();
    };
    let known = PROVIDER_KEYS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(provider);
    if known {
        provider.to_owned()
    } else {
        OTHER_PROVIDER.to_owned()
    }
}

/// Seconds from `from` to `to`; 0 when the clock went backwards.
fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    let millis = to.unix_millis().saturating_sub(from.unix_millis()).max(0);
    // Exact for any duration a run can have (below 2^53 ms).
    millis as f64 / 1000.0
}

/// A run was accepted.
pub fn run_accepted(driver: Driver) {
    counter!(RUNS_STARTED, "driver" => driver.as_str()).increment(1);
}

/// A run's command is about to start: its lease and workspace are ready.
pub fn run_command_started(driver: Driver, run: &Run) {
    if let Some(started_at) = run.started_at {
        histogram!(RUN_START_LATENCY, "driver" => driver.as_str())
            .record(seconds_between(run.created_at, started_at));
    }
}

/// A run reached its final status.
pub fn run_finished(driver: Driver, run: &Run) {
    let status = run.status.as_str();
    counter!(RUNS_FINISHED, "driver" => driver.as_str(), "status" => status).increment(1);
    if let Some(finished_at) = run.finished_at {
        histogram!(RUN_DURATION, "driver" => driver.as_str(), "status" => status)
            .record(seconds_between(run.created_at, finished_at));
    }
}

/// `bytes` of output on `stream` (`stdout`, `stderr`) go to the store.
pub fn output_stored(stream: &'static str, bytes: usize) {
    counter!(RUN_OUTPUT_BYTES, "stream" => stream)
        .increment(u64::try_from(bytes).unwrap_or(u64::MAX));
}

/// What a lease operation was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseOperation {
    Acquire,
    Release,
    Destroy,
}

impl LeaseOperation {
    fn as_str(self) -> &'static str {
        match self {
            LeaseOperation::Acquire => "acquire",
            LeaseOperation::Release => "release",
            LeaseOperation::Destroy => "destroy",
        }
    }
}

/// A lease operation failed.
pub fn lease_failed(operation: LeaseOperation, driver: Driver, provider: Option<&str>) {
    counter!(
        LEASE_FAILURES,
        "operation" => operation.as_str(),
        "driver" => driver.as_str(),
        "provider" => provider_label(provider),
    )
    .increment(1);
}

/// A lease could not be acquired for an environment with `config`.
pub fn lease_acquire_failed(driver: Driver, config: &DriverConfig) {
    let provider = match config {
        DriverConfig::Sandbox(sandbox) => Some(sandbox.provider.as_str()),
        DriverConfig::Plugin(plugin) => Some(plugin.driver_key.as_str()),
        _ => None,
    };
    lease_failed(LeaseOperation::Acquire, driver, provider);
}

/// Sets the held-lease gauges from the database's counts (status, driver, provider, count); label sets reported
/// before and absent now are set to 0.
pub fn set_held_leases(counts: &[(LeaseStatus, Driver, Option<String>, u64)]) {
    let mut totals = std::collections::BTreeMap::<LeaseSeries, u64>::new();
    for (status, driver, provider, count) in counts {
        let gauge = match status {
            LeaseStatus::Retained => LEASES_RETAINED,
            _ => LEASES_ACTIVE,
        };
        // Several unknown keys fold into one `other` series: add, do not overwrite.
        *totals
            .entry((gauge, driver.as_str(), provider_label(provider.as_deref())))
            .or_default() += count;
    }
    let mut reported = LEASE_SERIES.lock().unwrap_or_else(PoisonError::into_inner);
    for series in reported.iter() {
        if !totals.contains_key(series) {
            set_lease_gauge(series, 0);
        }
    }
    for (series, count) in &totals {
        set_lease_gauge(series, *count);
    }
    reported.extend(totals.into_keys());
}

fn set_lease_gauge((name, driver, provider): &LeaseSeries, count: u64) {
    // Lease counts are far below 2^53.
    gauge!(*name, "driver" => *driver, "provider" => provider.clone()).set(count as f64);
}

/// Sets the plugin status gauges: one series per installed plugin and status, 1 for the current one.
pub fn set_plugin_statuses<'a>(plugins: impl IntoIterator<Item = (&'a str, ProviderStatus)>) {
    const STATUSES: [ProviderStatus; 4] = [
        ProviderStatus::Starting,
        ProviderStatus::Ready,
        ProviderStatus::Unavailable,
        ProviderStatus::Failed,
    ];
    for (plugin, current) in plugins {
        for status in STATUSES {
            let value = if status == current { 1.0 } else { 0.0 };
            gauge!(PLUGIN_STATUS, "plugin" => plugin.to_owned(), "status" => status.as_str())
                .set(value);
        }
    }
}

/// What a sweep did to one run or lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepAction {
    /// An orphaned run was failed.
    RunFailed,
    /// An orphaned run was settled as its final event said.
    RunSettled,
    /// An active lease without a live run was released.
    LeaseReleased,
    /// A cleanup a dead node left pending was retried.
    CleanupRetried,
    /// A lease past its expiry was expired.
    LeaseExpired,
}

/// The step of a sweep that could not read the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepStep {
    Runs,
    Leases,
    Cleanups,
    Nonces,
    Expiry,
}

/// A sweep began.
pub fn sweep_started() {
    counter!(SWEEPS).increment(1);
}

/// A sweep did `action` to one run or lease.
pub fn sweep_action(action: SweepAction) {
    let action = match action {
        SweepAction::RunFailed => "run_failed",
        SweepAction::RunSettled => "run_settled",
        SweepAction::LeaseReleased => "lease_released",
        SweepAction::CleanupRetried => "cleanup_retried",
        SweepAction::LeaseExpired => "lease_expired",
    };
    counter!(SWEEP_ACTIONS, "action" => action).increment(1);
}

/// A sweep step failed.
pub fn sweep_failed(step: SweepStep) {
    let step = match step {
        SweepStep::Runs => "runs",
        SweepStep::Leases => "leases",
        SweepStep::Cleanups => "cleanups",
        SweepStep::Nonces => "nonces",
        SweepStep::Expiry => "expiry",
    };
    counter!(SWEEP_FAILURES, "step" => step).increment(1);
}

/// A request to a run's bridge ended with `status`; `code` is the bridge's rejection code, `None` when forwarded.
pub fn bridge_request(status: u16, code: Option<&'static str>, latency: Duration) {
    counter!(
        BRIDGE_REQUESTS,
        "status" => status.to_string(),
        "code" => code.unwrap_or("forwarded"),
    )
    .increment(1);
    let outcome = if code.is_some() {
        "rejected"
    } else {
        "forwarded"
    };
    histogram!(BRIDGE_DURATION, "outcome" => outcome).record(latency.as_secs_f64());
}

/// Marks a response whose request was counted, so an outer [`track_http`] leaves it to the inner one.
#[derive(Clone, Copy, Debug)]
struct Counted;

/// The method label: the standard methods by name, anything else a client invents as `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware counting every API request by method, route template and status, with its latency.
///
/// The route is axum's [`MatchedPath`] (`/api/runs/{id}`), never the path as requested. A nested router only knows
/// its routes' templates inside it, so the layer is on both routers: the innermost one that sees a request counts
/// it and marks the response, and an outer one leaves a marked response alone.
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|matched| matched.as_str().to_owned());
    let mut response = next.run(request).await;
    if response.extensions().get::<Counted>().is_some() {
        return response;
    }
    // A nested router's own catch-all (axum's private tail parameter) is no template of ours.
    let route = route
        .filter(|route| !route.contains("__private__"))
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let status = response.status().as_u16().to_string();
    histogram!(HTTP_DURATION, "method" => method, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    counter!(HTTP_REQUESTS, "method" => method, "route" => route, "status" => status).increment(1);
    response.extensions_mut().insert(Counted);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_and_providers_are_folded() {
        assert_eq!(method_label(&Method::GET), "GET");
        let invented = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&invented), "other");
        assert_eq!(provider_label(None), "none");
        assert_eq!(provider_label(Some("a-key-nobody-installed")), "other");
    }

    #[test]
    fn durations_never_go_negative() {
        let later = Timestamp::from_unix_millis(10_500);
        let earlier = Timestamp::from_unix_millis(10_000);
        assert_eq!(seconds_between(earlier, later), 0.5);
        assert_eq!(seconds_between(later, earlier), 0.0);
    }
}
