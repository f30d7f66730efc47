//! One run, start to finish: lease → workspace → execute → sync back → release, every step an event.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_core::config::DriverConfig;
use berth_core::driver::{
    CancelSignal, ExecOutcome, ExecRequest, RealizedWorkspace, WorkspaceRequest,
};
use berth_core::environment::Environment;
use berth_core::lease::{LeasePolicy, failure};
use berth_core::run::{Run, RunStatus};
use berth_core::time::Timestamp;
use tokio_util::sync::CancellationToken;

use super::context::RunContext;
use super::event_data::EventData;
use super::events::{EventWriter, OutputEvents};
use super::leases::{self, HeldLease};
use crate::bridge::RunningBridge;
use crate::error_chain::DisplayChain;
use crate::vault::ResolvedConfig;

/// Everything about a run that is not stored: the parts of the request that may hold secrets, and choices made when
/// it was accepted.
#[derive(Debug)]
pub struct RunPlan {
    pub exec: ExecRequest,
    pub workspace: Option<PathBuf>,
    pub lease_policy: Option<LeasePolicy>,
    /// Start a callback bridge for the command (API.md §6).
    pub bridge: bool,
}

/// Drives `run` to a final status. Never returns an error: every failure becomes the run's status and events.
pub async fn execute(
    context: Arc<RunContext>,
    mut run: Run,
    environment: Environment,
    config: ResolvedConfig,
    plan: RunPlan,
    cancel: CancellationToken,
    events: EventWriter,
) {
    let run_id = run.id;
    // Decrypted for the run's lifetime only (the driver connects with them); dropped, zeroized, when it ends.
    let config = config.as_config();
    let outcome = async {
        let driver = context.drivers.get(environment.driver);
        let policy = leases::policy_for(config, plan.lease_policy);

        // Lease.
        let held = tokio::select! {
            acquired = leases::acquire(&context.store, &driver, &environment, config, run_id, policy) => acquired,
            () = cancel.cancelled() => return Finish::cancelled_before_start(),
        };
        let held = match held {
            Ok(held) => held,
            Err(error) => {
                crate::metrics::lease_acquire_failed(environment.driver, config);
                return Finish::berth_failed(failure::LEASE_ACQUIRE_FAILED, error.to_string());
            }
        };
        // The lease may follow another policy than asked (a busy reusable sandbox yields an ephemeral one).
        let policy = held.lease.lease_policy;
        run.lease_id = Some(held.lease.id);
        save(&context, &run).await;
        events
            .record(EventData::LeaseActive {
                lease_id: held.lease.id,
                policy,
                provider: held.lease.provider.as_deref(),
                provider_lease_id: held.handle.provider_lease_id.as_deref(),
                resumed: held.resumed,
            })
            .await;

        let finish = with_lease(&context, &mut run, &held, &plan, &cancel, &events).await;

        // Release: kept for reuse, or for inspection when the run failed and the policy says so.
        let keep = match policy {
            LeasePolicy::ReuseByEnvironment => true,
            LeasePolicy::RetainOnFailure => finish.status != RunStatus::Succeeded,
            LeasePolicy::Ephemeral => false,
        };
        let keep_for = match config {
            DriverConfig::Sandbox(sandbox) => sandbox.timeout_ms.map(Duration::from_millis),
            _ => None,
        };
        // A kept lease's status says it is kept; any other ends `failed` when the run did.
        let failure = if keep { None } else { finish.lease_failure() };
        match leases::release(&context, &held, config, keep, keep_for, failure).await {
            Ok(Some(lease)) => events.record(EventData::LeaseEnded(&lease)).await,
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(error = %DisplayChain(&error), "could not release the lease; the sweep will");
                events.error("lease_release_failed", "the lease could not be released; it will be cleaned up").await;
            }
        }
        finish
    }
    .await;

    // Final status, last: followers stop at this event.
    run.status = outcome.status;
    run.exit_code = outcome.exit_code;
    run.signal = outcome.signal.clone();
    run.error = outcome.error.clone();
    run.finished_at = Some(Timestamp::now());
    if let Some((code, message)) = &outcome.error_event {
        events.error(code, message).await;
    }
    // The final event goes out before the row turns final, so a follower that sees a final row knows the final
    // event is already there to read.
    events
        .record(EventData::Final {
            status: run.status,
            exit_code: run.exit_code,
            signal: run.signal.as_deref(),
            error: run.error.as_deref(),
        })
        .await;
    save(&context, &run).await;
    crate::metrics::run_finished(environment.driver, &run);
    tracing::info!(run.id = %run_id, status = %run.status, exit_code = ?run.exit_code, "run finished");
}

/// With a lease held: workspace, command, sync back.
async fn with_lease(
    context: &RunContext,
    run: &mut Run,
    held: &HeldLease,
    plan: &RunPlan,
    cancel: &CancellationToken,
    events: &EventWriter,
) -> Finish {
    let driver = context.drivers.get(held.lease.driver);
    let request = WorkspaceRequest {
        run_id: run.id,
        local_path: plan.workspace.clone(),
    };
    let workspace = tokio::select! {
        realized = driver.realize_workspace(&held.handle, &request) => realized,
        () = cancel.cancelled() => return Finish::cancelled_before_start(),
    };
    let workspace: RealizedWorkspace = match workspace {
        Ok(workspace) => workspace,
        Err(error) => {
            return Finish::berth_failed(
                failure::WORKSPACE_REALIZATION_FAILED,
                format!("could not realize the workspace: {error}"),
            );
        }
    };
    // What an incremental sync sent rides along (the rest of the driver's notes can be large: manifests).
    events
        .record(EventData::WorkspaceRealized(&workspace))
        .await;
    if cancel.is_cancelled() {
        return Finish::cancelled_before_start();
    }

    run.status = RunStatus::Running;
    run.started_at = Some(Timestamp::now());
    crate::metrics::run_command_started(held.lease.driver, run);
    save(context, run).await;
    events.record(EventData::Status(RunStatus::Running)).await;

    // The bridge listens before the command starts and stops after it ends: nothing listens outside the run.
    let mut exec = plan.exec.clone();
    let mut tunnel = None;
    let bridge = match (&context.bridge, plan.bridge) {
        (Some(settings), true) => {
            match RunningBridge::start(settings, &context.store, run.id, events.clone()).await {
                Ok(mut bridge) => {
                    // Environments with a loopback of their own (a remote host) reach the bridge through the
                    // driver's tunnel; the agent sees that end's address.
                    match driver.open_tunnel(&held.handle, bridge.local_addr()).await {
                        Ok(Some(opened)) => {
                            if let Some(socket) = &opened.unix_socket
                                && let Err(error) = bridge.serve_unix(socket).await
                            {
                                bridge.stop().await;
                                return Finish::berth_failed(
                                    failure::BRIDGE_FAILED,
                                    format!(
                                        "could not serve the callback bridge on the environment's socket: {error}"
                                    ),
                                );
                            }
                            bridge.reroute(&opened.address);
                            tunnel = Some(opened);
                        }
                        Ok(None) => {}
                        Err(error) => {
                            bridge.stop().await;
                            return Finish::berth_failed(
                                failure::BRIDGE_FAILED,
                                format!(
                                    "could not carry the callback bridge into the environment: {error}"
                                ),
                            );
                        }
                    }
                    exec.env.extend(bridge.env.iter().cloned());
                    Some(bridge)
                }
                Err(error) => {
                    return Finish::berth_failed(
                        failure::BRIDGE_FAILED,
                        format!("could not start the callback bridge: {error}"),
                    );
                }
            }
        }
        _ => None,
    };

    let sink = OutputEvents::start(events.clone()).recording_process_on(held.lease.id);
    let token = cancel.clone();
    let cancel_signal: CancelSignal = Box::pin(async move { token.cancelled_owned().await });
    let executed = driver
        .execute(&held.handle, &workspace, exec, &sink, cancel_signal)
        .await;
    sink.finish().await;
    if let Some(bridge) = bridge {
        bridge.stop().await;
    }
    drop(tunnel);
    let mut finish = match executed {
        Ok(outcome) => Finish::from_outcome(&outcome),
        Err(error) => {
            Finish::berth_failed(error.code(), format!("could not run the command: {error}"))
        }
    };

    // A change the environment made that did not reach the host is never plain success (docs/api.md, "Sync-back").
    let lost = match driver.sync_back(&held.handle, &workspace).await {
        Ok(report) if workspace.local_path.is_some() => {
            events.record(EventData::WorkspaceSynced(&report)).await;
            let lost = berth_drivers::sync::lost_entries(&report);
            (!lost.is_empty()).then(|| lost_changes_message(&lost))
        }
        Ok(_) => None,
        Err(error) => Some(format!("could not sync the workspace back: {error}")),
    };
    if let Some(message) = lost {
        tracing::warn!(run.id = %run.id, lease.id = %held.lease.id, message, "sync-back did not bring back every change");
        events.error(failure::SYNC_BACK_FAILED, &message).await;
        finish.sync_back_failed(message);
    }
    finish
}

/// How many of the environment's changes did not arrive, naming the first few.
fn lost_changes_message(lost: &[&berth_core::driver::SkippedEntry]) -> String {
    const NAMED: usize = 3;
    let named: Vec<String> = lost
        .iter()
        .take(NAMED)
        .map(|entry| match &entry.detail {
            Some(detail) => format!("`{}` ({}: {detail})", entry.path, entry.reason.as_str()),
            None => format!("`{}` ({})", entry.path, entry.reason.as_str()),
        })
        .collect();
    let more = lost.len().saturating_sub(NAMED);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "sync-back did not bring back {} of the environment's changes: {}{more}; the workspace event lists them",
        lost.len(),
        named.join(", ")
    )
}

async fn save(context: &RunContext, run: &Run) {
    if let Err(error) = context.store.update_run(run).await {
        tracing::error!(run.id = %run.id, error = %DisplayChain(&error), "could not save the run");
    }
}

/// How a run ends.
#[derive(Debug)]
struct Finish {
    status: RunStatus,
    exit_code: Option<i32>,
    signal: Option<String>,
    error: Option<String>,
    error_event: Option<(String, String)>,
    /// The code of the step that failed the run, when berth (not the command on its own) failed it.
    failure: Option<String>,
}

impl Finish {
    fn from_outcome(outcome: &ExecOutcome) -> Self {
        let status = if outcome.timed_out {
            RunStatus::TimedOut
        } else if outcome.cancelled {
            RunStatus::Cancelled
        } else if outcome.limit_exceeded.is_some() {
            // Whatever the command's exit code says, the environment ended it.
            RunStatus::Failed
        } else if outcome.exit_code == Some(0) {
            RunStatus::Succeeded
        } else {
            RunStatus::Failed
        };
        Self {
            status,
            exit_code: outcome.exit_code,
            signal: outcome.signal.clone(),
            error: outcome.limit_exceeded.clone(),
            error_event: outcome
                .limit_exceeded
                .clone()
                .map(|message| ("limit_exceeded".to_owned(), message)),
            failure: outcome
                .limit_exceeded
                .as_ref()
                .map(|_| "limit_exceeded".to_owned()),
        }
    }

    fn cancelled_before_start() -> Self {
        Self {
            status: RunStatus::Cancelled,
            exit_code: None,
            signal: None,
            error: None,
            error_event: None,
            failure: None,
        }
    }

    /// Sync-back failed or left changes behind: a run its command made `succeeded` fails with `message` (its exit
    /// code kept); any other outcome stays as the command made it. The `error` event is the caller's.
    fn sync_back_failed(&mut self, message: String) {
        if self.status == RunStatus::Succeeded {
            self.status = RunStatus::Failed;
            self.error = Some(message);
            self.failure = Some(failure::SYNC_BACK_FAILED.to_owned());
        }
    }

    /// The `failureReason` of the run's lease when it is not kept: the failed step's code (`bridge_failed`,
    /// `sync_back_failed`, a driver's `spawn_failed`, ...), `run_failed` for a command that failed on its own,
    /// `timed_out`; none for a run that succeeded or was cancelled (its lease is `released`).
    fn lease_failure(&self) -> Option<&str> {
        match self.status {
            RunStatus::TimedOut => Some(failure::TIMED_OUT),
            RunStatus::Failed => Some(self.failure.as_deref().unwrap_or(failure::RUN_FAILED)),
            _ => None,
        }
    }

    /// berth (not the command) failed: the run fails with a message and an `error` event.
    fn berth_failed(code: &str, message: String) -> Self {
        Self {
            status: RunStatus::Failed,
            exit_code: None,
            signal: None,
            error: Some(message.clone()),
            error_event: Some((code.to_owned(), message)),
            failure: Some(code.to_owned()),
        }
    }
}
