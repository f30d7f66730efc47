//! The runs this node executes, and the background work that keeps leases and runs honest: heartbeats, cancel
//! requests from other replicas, the orphan sweep and lease expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::environment::Environment;
use berth_core::ids::RunId;
use berth_core::lease::LeaseStatus;
use berth_core::run::{Run, RunEvent, RunStatus};
use berth_core::time::Timestamp;
use berth_drivers::registry::DriverRegistry;
use berth_store::{Backend, ConflictKind, Store, StoreError};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::event_data::EventData;
use super::events::EventWriter;
use super::executor::{self, RunPlan};
use super::leases::{self, CleanupKind};
use crate::bridge::BridgeSettings;
use crate::error_chain::DisplayChain;
use crate::host_policy::HostPolicy;
use crate::metrics::{self, SweepAction, SweepStep};
use crate::secrets::SecretCipher;
use crate::vault::ResolvedConfig;

use super::context::RunContext;

/// How often this node refreshes the heartbeat of its live runs (and picks up cancel requests from other replicas).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// How often a node on PostgreSQL, where other replicas may take a cancel request for its runs, looks for one.
///
/// A poll rather than `LISTEN/NOTIFY`: a listener needs a dedicated connection and reconnect handling, and a poll
/// anyway for notifications sent while it was reconnecting. This query reads only this node's live runs through the
/// partial index `runs_live_owner`, and is skipped while the node runs nothing, so four a second cost next to
/// nothing and bound the delay of a cancel made elsewhere to a quarter of a second plus the kill. On SQLite there is
/// a single node, whose cancel endpoint cancels the run in-process at once: no poll.
pub const CANCEL_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// A live run whose heartbeat is older than this has lost its node.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// A cleanup still pending this long after it started is taken to have died with its node, and is retried.
const STUCK_CLEANUP_AFTER: Duration = Duration::from_secs(120);
/// Orphan and expiry sweep period when `BERTH_SWEEP_INTERVAL_MS` does not say otherwise.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Matches no node: the periodic sweep finds orphans by stale heartbeat only, never by owner.
const NO_NODE: &str = "";

#[derive(Debug)]
struct LiveRun {
    cancel: CancellationToken,
    events: EventWriter,
}

/// Owns this node's live runs.
#[derive(Debug, Clone)]
pub struct RunManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    context: Arc<RunContext>,
    /// What of this host runs may use, checked when a run is accepted.
    host: HostPolicy,
    node_id: String,
    live: Mutex<HashMap<RunId, LiveRun>>,
    tasks: TaskTracker,
    stopping: CancellationToken,
    sweep_interval: Duration,
    /// `berth serve --default-run-timeout`: the timeout of a run that gives none, in an environment that names none.
    /// Set once at start-up.
    default_run_timeout: std::sync::OnceLock<Duration>,
}

impl RunManager {
    pub fn new(
        store: Store,
        drivers: Arc<DriverRegistry>,
        cipher: Arc<SecretCipher>,
        bridge: Option<Arc<BridgeSettings>>,
        host: HostPolicy,
        node_id: String,
        sweep_interval: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                context: Arc::new(RunContext {
                    store,
                    drivers,
                    cipher,
                    bridge,
                }),
                host,
                node_id,
                live: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                stopping: CancellationToken::new(),
                sweep_interval,
                default_run_timeout: std::sync::OnceLock::new(),
            }),
        }
    }

    /// What runs and lease cleanups work with.
    pub fn context(&self) -> &RunContext {
        &self.inner.context
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    pub fn drivers(&self) -> &DriverRegistry {
        &self.inner.context.drivers
    }

    /// What of this host the companies may use: workspace roots and Local environments.
    pub fn host(&self) -> &HostPolicy {
        &self.inner.host
    }

    /// Sets the server-wide default run timeout (`--default-run-timeout`); only the first call counts.
    pub fn set_default_run_timeout(&self, timeout: Duration) {
        let _ = self.inner.default_run_timeout.set(timeout);
    }

    /// The server-wide default run timeout, if the operator set one.
    pub fn default_run_timeout(&self) -> Option<Duration> {
        self.inner.default_run_timeout.get().copied()
    }

    /// Starts executing an accepted (stored, `queued`) run in the background. Only accepting a run starts one.
    pub(super) fn start(
        &self,
        run: Run,
        environment: Environment,
        config: ResolvedConfig,
        plan: RunPlan,
        events: EventWriter,
    ) {
        let cancel = self.inner.stopping.child_token();
        self.live().insert(
            run.id,
            LiveRun {
                cancel: cancel.clone(),
                events: events.clone(),
            },
        );
        let manager = self.clone();
        let run_id = run.id;
        let span = tracing::info_span!("run", run.id = %run_id, env.id = %environment.id, driver = %environment.driver);
        let context = self.inner.context.clone();
        self.inner.tasks.spawn(
            async move {
                executor::execute(context, run, environment, config, plan, cancel, events).await;
                manager.live().remove(&run_id);
            }
            .instrument(span),
        );
    }

    /// Acts on a cancel request another replica recorded for a run this node executes; logged once, however many
    /// polls still see the request before the run ends.
    fn cancel_requested_elsewhere(&self, run_id: RunId) {
        let newly_cancelled = match self.live().get(&run_id) {
            Some(live) if !live.cancel.is_cancelled() => {
                live.cancel.cancel();
                true
            }
            _ => false,
        };
        if newly_cancelled {
            tracing::info!(run.id = %run_id, "cancel requested through another replica");
        }
    }

    /// Cancels a run this node executes. `false`: not here (or already finished).
    pub fn cancel_local(&self, run_id: RunId) -> bool {
        match self.live().get(&run_id) {
            Some(live) => {
                live.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The bridge settings runs are started with.
    pub fn bridge(&self) -> Option<&BridgeSettings> {
        self.inner.context.bridge.as_deref()
    }

    /// The event writer of a run: the live one (which wakes this node's followers) when this node executes it.
    pub fn event_writer(&self, run_id: RunId) -> EventWriter {
        match self.live().get(&run_id) {
            Some(live) => live.events.clone(),
            None => EventWriter::new(self.inner.context.store.clone(), run_id),
        }
    }

    /// The events of a run this node executes, as they are stored from now on (see [`EventWriter::subscribe`]).
    pub(super) fn subscribe(&self, run_id: RunId) -> Option<broadcast::Receiver<Arc<RunEvent>>> {
        self.live().get(&run_id).map(|live| live.events.subscribe())
    }

    /// Before an environment is deleted: cancel its live runs (waiting a little for them to give their leases back),
    /// then release or destroy every lease still active or kept, with provider cleanup. The environment's lease rows
    /// vanish with it, so nothing may be left for a later sweep to find.
    pub async fn retire_environment(&self, environment: &Environment) -> Result<(), StoreError> {
        const WAIT_FOR_RUNS: Duration = Duration::from_secs(5);
        let context = self.context();
        let store = &context.store;
        let live = store.live_runs_of_environment(environment.id).await?;
        for run in &live {
            store.request_cancel(run.id).await?;
            self.cancel_local(run.id);
        }
        if !live.is_empty() {
            let waited = tokio::time::timeout(WAIT_FOR_RUNS, async {
                while !store
                    .live_runs_of_environment(environment.id)
                    .await
                    .unwrap_or_default()
                    .is_empty()
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if waited.is_err() {
                tracing::warn!(env.id = %environment.id, "runs still live while deleting their environment");
            }
        }
        leases::release_all_of_environment(context, environment).await
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, LiveRun>> {
        // A poisoned map only means a panic elsewhere mid-insert; the map itself is still usable.
        self.inner
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops: cancels every live run (each releases its lease) and waits for them, up to `deadline`.
    pub async fn shutdown(&self, deadline: Duration) {
        self.inner.stopping.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(deadline, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "runs still finishing at shutdown; the next start's orphan sweep will finish them"
            );
        }
    }

    /// The periodic work: heartbeats (and remote cancels) every [`HEARTBEAT_INTERVAL`], sweeps every sweep interval,
    /// and on PostgreSQL the cancel poll every [`CANCEL_POLL_INTERVAL`] — in a task of its own, so that a slow sweep
    /// (it cleans up leases through their providers) never delays a cancel.
    pub fn spawn_background(&self) {
        if self.inner.context.store.backend() == Backend::Postgres {
            let manager = self.clone();
            self.inner.tasks.spawn(async move {
                let mut poll = tokio::time::interval(CANCEL_POLL_INTERVAL);
                poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = manager.inner.stopping.cancelled() => break,
                        _ = poll.tick() => manager.pick_up_remote_cancels().await,
                    }
                }
            });
        }
        let manager = self.clone();
        self.inner.tasks.spawn(async move {
            let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
            let mut sweep = tokio::time::interval(manager.inner.sweep_interval);
            loop {
                tokio::select! {
                    () = manager.inner.stopping.cancelled() => break,
                    _ = heartbeat.tick() => manager.heartbeat().await,
                    _ = sweep.tick() => manager.sweep(NO_NODE).await,
                }
            }
        });
    }

    async fn heartbeat(&self) {
        match self
            .inner
            .context
            .store
            .heartbeat_runs(&self.inner.node_id, Timestamp::now())
            .await
        {
            Ok(cancel_requested) => {
                for run_id in cancel_requested {
                    self.cancel_requested_elsewhere(run_id);
                }
            }
            Err(error) => tracing::warn!(error = %DisplayChain(&error), "heartbeat failed"),
        }
    }

    /// Cancels this node's runs whose cancellation was requested through another replica.
    async fn pick_up_remote_cancels(&self) {
        if self.live().is_empty() {
            return;
        }
        match self
            .inner
            .context
            .store
            .cancel_requested_runs(&self.inner.node_id)
            .await
        {
            Ok(cancel_requested) => {
                for run_id in cancel_requested {
                    self.cancel_requested_elsewhere(run_id);
                }
            }
            Err(error) => {
                tracing::warn!(error = %DisplayChain(&error), "looking for cancel requests failed")
            }
        }
    }

    /// Runs the sweep once at start-up, before serving: every live run owned by this node died with the previous
    /// process.
    pub async fn startup_sweep(&self) {
        let node = self.inner.node_id.clone();
        self.sweep(&node).await;
    }

    /// Settles an orphan whose node died after writing its final event and before saving the row, as that event says,
    /// writing nothing more: followers already stopped at it, so a second final event would contradict what they
    /// reported. `false` when the run has no final event: it is failed as an orphan.
    async fn settle_from_final_event(
        &self,
        run: &Run,
        owner_node: &str,
        stale_before: Timestamp,
        now: Timestamp,
    ) -> bool {
        let store = &self.inner.context.store;
        let data = match store.last_status_event(run.id).await {
            Ok(Some(data)) => data,
            Ok(None) => return false,
            Err(error) => {
                // Failing it now could add a second final event; a later sweep tries again.
                tracing::warn!(run.id = %run.id, error = %DisplayChain(&error), "could not read an orphaned run's last event");
                return true;
            }
        };
        let Some(status) = data["status"]
            .as_str()
            .and_then(|status| status.parse::<RunStatus>().ok())
            .filter(|status| status.is_terminal())
        else {
            return false;
        };
        let settled = Run {
            status,
            exit_code: data["exitCode"]
                .as_i64()
                .and_then(|code| i32::try_from(code).ok()),
            signal: data["signal"].as_str().map(str::to_owned),
            error: data["error"].as_str().map(str::to_owned),
            finished_at: Some(now),
            ..run.clone()
        };
        match store
            .settle_orphaned_run(&settled, owner_node, stale_before)
            .await
        {
            Ok(true) => {
                tracing::warn!(run.id = %run.id, status = %status, "settled an orphaned run as its final event says");
                metrics::sweep_action(SweepAction::RunSettled);
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(run.id = %run.id, error = %DisplayChain(&error), "could not settle an orphaned run")
            }
        }
        true
    }

    /// Fails orphaned runs, releases leases nobody holds, expires leases past `expiresAt`.
    pub async fn sweep(&self, owner_node: &str) {
        let context = &*self.inner.context;
        let store = &context.store;
        let now = Timestamp::now();
        let stale_before = Timestamp::from_unix_millis(now.unix_millis() - millis(STALE_AFTER));
        metrics::sweep_started();

        match store.orphaned_runs(owner_node, stale_before).await {
            Ok(orphans) => {
                for run in orphans {
                    if self
                        .settle_from_final_event(&run, owner_node, stale_before, now)
                        .await
                    {
                        continue;
                    }
                    let message = "berth stopped while the run was in flight";
                    match store
                        .fail_orphaned_run(run.id, owner_node, stale_before, message, now)
                        .await
                    {
                        Ok(true) => {
                            tracing::warn!(run.id = %run.id, "failed an orphaned run");
                            metrics::sweep_action(SweepAction::RunFailed);
                            let events = EventWriter::new(store.clone(), run.id);
                            // A run and its first event are stored in one transaction now; this is the fallback for
                            // runs stored by older versions, whose node may have died between the two writes. The run
                            // was queued all the same, and its log starts there like every run's.
                            if matches!(store.list_events(run.id, 0, 1).await, Ok(first) if first.is_empty())
                            {
                                events.record(EventData::Status(RunStatus::Queued)).await;
                            }
                            events.error("orphaned", message).await;
                            events
                                .record(EventData::Final {
                                    status: RunStatus::Failed,
                                    exit_code: None,
                                    signal: None,
                                    error: Some(message),
                                })
                                .await;
                        }
                        Ok(false) => {}
                        Err(error) => {
                            tracing::warn!(run.id = %run.id, error = %DisplayChain(&error), "could not fail an orphaned run")
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %DisplayChain(&error), "orphan sweep failed");
                metrics::sweep_failed(SweepStep::Runs);
            }
        }

        match store.orphaned_leases(100).await {
            Ok(orphans) => {
                for lease in orphans {
                    let (ending, reason) = orphaned_lease_ending(store, &lease).await;
                    let claimed = store
                        .transition_lease(
                            lease.id,
                            LeaseStatus::Active,
                            ending,
                            reason,
                            Some(berth_core::lease::CleanupStatus::Pending),
                            now,
                        )
                        .await;
                    // Destroy, not release: the run died with its node, so its processes may still be running there.
                    if let Ok(Some(released)) = claimed {
                        let status =
                            leases::cleanup(context, &released, CleanupKind::Destroy, None).await;
                        tracing::info!(lease.id = %released.id, cleanup = %status, "released an orphaned lease");
                        metrics::sweep_action(SweepAction::LeaseReleased);
                        let released = berth_core::lease::Lease {
                            cleanup_status: Some(status),
                            ..released
                        };
                        let action = if released.status == LeaseStatus::Failed {
                            "lease.failed"
                        } else {
                            "lease.released"
                        };
                        leases::record_activity(store, &released, action, leases::SWEEPER_ACTOR)
                            .await;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %DisplayChain(&error), "lease sweep failed");
                metrics::sweep_failed(SweepStep::Leases);
            }
        }

        // A node that died between releasing a lease and finishing its cleanup left it `pending`: try again.
        let stuck_before =
            Timestamp::from_unix_millis(now.unix_millis() - millis(STUCK_CLEANUP_AFTER));
        match store.stuck_cleanups(stuck_before, owner_node, 100).await {
            Ok(stuck) => {
                for lease in stuck {
                    if !matches!(store.claim_stuck_cleanup(&lease, now).await, Ok(true)) {
                        continue;
                    }
                    let status = leases::cleanup(context, &lease, CleanupKind::Destroy, None).await;
                    tracing::info!(lease.id = %lease.id, cleanup = %status, "retried an unfinished lease cleanup");
                    metrics::sweep_action(SweepAction::CleanupRetried);
                    let lease = berth_core::lease::Lease {
                        cleanup_status: Some(status),
                        ..lease
                    };
                    leases::record_activity(
                        store,
                        &lease,
                        "lease.cleaned_up",
                        leases::SWEEPER_ACTOR,
                    )
                    .await;
                }
            }
            Err(error) => {
                tracing::warn!(error = %DisplayChain(&error), "cleanup retry sweep failed");
                metrics::sweep_failed(SweepStep::Cleanups);
            }
        }

        if let Err(error) = store.sweep_nonces(now).await {
            tracing::warn!(error = %DisplayChain(&error), "nonce sweep failed");
            metrics::sweep_failed(SweepStep::Nonces);
        }

        match store.expired_leases(now, 100).await {
            Ok(expired) => {
                for lease in expired {
                    let claimed = store
                        .transition_lease(
                            lease.id,
                            lease.status,
                            LeaseStatus::Expired,
                            Some(berth_core::lease::failure::EXPIRED),
                            Some(berth_core::lease::CleanupStatus::Pending),
                            now,
                        )
                        .await;
                    let expired = match claimed {
                        Ok(Some(expired)) => expired,
                        Ok(None) => continue,
                        // A kept reusable lease while a run holds the environment's reusable one: a provider may key
                        // both to one sandbox, so destroying this one now could pull it from under that run. The
                        // database refused; a later sweep expires it once the run has given its lease back.
                        Err(StoreError::Conflict(ConflictKind::ReusableLeaseHeld)) => {
                            tracing::debug!(lease.id = %lease.id, env.id = %lease.environment_id, "expiry deferred: the environment's reusable lease is held");
                            continue;
                        }
                        Err(error) => {
                            tracing::warn!(lease.id = %lease.id, error = %DisplayChain(&error), "could not expire a lease");
                            continue;
                        }
                    };
                    let status =
                        leases::cleanup(context, &expired, CleanupKind::Destroy, None).await;
                    tracing::info!(lease.id = %expired.id, cleanup = %status, "expired a lease");
                    metrics::sweep_action(SweepAction::LeaseExpired);
                    let expired = berth_core::lease::Lease {
                        cleanup_status: Some(status),
                        ..expired
                    };
                    leases::record_activity(
                        store,
                        &expired,
                        "lease.expired",
                        leases::SWEEPER_ACTOR,
                    )
                    .await;
                }
            }
            Err(error) => {
                tracing::warn!(error = %DisplayChain(&error), "expiry sweep failed");
                metrics::sweep_failed(SweepStep::Expiry);
            }
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// How the orphan sweep ends a lease whose run is no longer alive, as that run ended: `released` after a run that
/// succeeded or was cancelled (its node died between the run's end and the lease's), else `failed` — `timed_out` for a
/// run that timed out, `orphaned` for one that failed (most often failed by the sweep itself, its node dead) or that
/// cannot be read.
async fn orphaned_lease_ending(
    store: &Store,
    lease: &berth_core::lease::Lease,
) -> (LeaseStatus, Option<&'static str>) {
    use berth_core::lease::failure;
    let run = match lease.run_id {
        Some(run_id) => store.get_run(run_id).await.ok().flatten(),
        None => None,
    };
    match run.map(|run| run.status) {
        Some(RunStatus::Succeeded | RunStatus::Cancelled) => (LeaseStatus::Released, None),
        Some(RunStatus::TimedOut) => (LeaseStatus::Failed, Some(failure::TIMED_OUT)),
        _ => (LeaseStatus::Failed, Some(failure::ORPHANED)),
    }
}
