//! Taking and giving back leases around a run, and cleaning up leases nobody holds.
//!
//! Every state change of a lease goes through `Store::transition_lease`, a compare-and-set on its status. That is what
//! keeps several replicas sharing one database from releasing a lease twice or resuming one kept lease for two runs:
//! whoever wins the transition does the provider work; everyone else moves on.

use std::sync::Arc;

use berth_core::config::DriverConfig;
use berth_core::driver::{EnvironmentDriver, LeaseHandle, LeaseRequest, ProcessIdentity};
use berth_core::environment::Driver;
use berth_core::environment::Environment;
use berth_core::ids::{LeaseId, RunId};
use berth_core::lease::{self as lease_model, CleanupStatus, Lease, LeasePolicy, LeaseStatus};
use berth_core::time::Timestamp;

use super::context::RunContext;
use crate::error_chain::DisplayChain;
use crate::metrics::LeaseOperation;
use crate::vault::{self, ResolvedConfig, VaultError};
use berth_store::{ConflictKind, Store, StoreError};

/// A lease a run holds, with the driver's view of it.
#[derive(Debug, Clone)]
pub struct HeldLease {
    pub lease: Lease,
    pub handle: LeaseHandle,
    /// Whether a kept lease was resumed rather than a fresh one acquired.
    pub resumed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("could not acquire a lease: {0}")]
    Driver(#[from] berth_core::driver::DriverError),
    #[error("could not record the lease")]
    Store(#[from] StoreError),
}

/// Appends a lease's life event to the activity log. Losing the row is logged, never fatal: the lease itself is
/// already recorded.
pub async fn record_activity(store: &Store, lease: &Lease, action: &str, actor: &str) {
    let entry = berth_store::NewActivity {
        company_id: Some(lease.company_id),
        actor: actor.to_owned(),
        action: action.to_owned(),
        entity_type: "lease".to_owned(),
        entity_id: lease.id.to_string(),
        details: serde_json::json!({
            "environmentId": lease.environment_id.to_string(),
            "runId": lease.run_id.map(|id| id.to_string()),
            "driver": lease.driver.as_str(),
            "policy": lease.lease_policy.as_str(),
            "provider": lease.provider,
            "status": lease.status.as_str(),
            "failureReason": lease.failure_reason,
            "cleanupStatus": lease.cleanup_status.map(|status| status.as_str()),
        }),
    };
    if let Err(error) = store.record_activity(&entry).await {
        tracing::warn!(lease.id = %lease.id, error = %DisplayChain(&error), "could not record lease activity");
    }
}

/// How runs appear as actors in the activity log.
pub fn run_actor(run_id: RunId) -> String {
    format!("run:{run_id}")
}

/// The actor of the orphan and expiry sweeps.
pub const SWEEPER_ACTOR: &str = "system:sweeper";

fn actor_of(lease: &Lease) -> String {
    lease
        .run_id
        .map_or_else(|| SWEEPER_ACTOR.to_owned(), run_actor)
}

/// The driver's view of a stored lease, without the process group recorded for its command: enough to match and
/// resume it. Cleanup takes [`stored_handle`], which has it.
pub fn handle_of(lease: &Lease) -> LeaseHandle {
    LeaseHandle {
        provider: dispatch_key(lease),
        provider_lease_id: lease.provider_lease_id.clone(),
        metadata: lease.metadata.clone().unwrap_or_default(),
        expires_at: lease.expires_at,
        process: None,
    }
}

/// Where a stored plugin config keeps its driver key (`DriverConfig::to_stored`).
const STORED_DRIVER_KEY: &str = "driverKey";

/// The key the lease's driver finds its provider by. A plugin driver's lease names its plugin as `provider` (what a
/// client wants to see), but the `plugin` driver dispatches on the plugin's driver key, which the config the lease
/// was acquired with records; every other lease dispatches on `provider` itself.
fn dispatch_key(lease: &Lease) -> Option<String> {
    let driver_key = match lease.driver {
        Driver::Plugin => lease
            .acquired_config
            .as_ref()
            .and_then(|config| config.get(STORED_DRIVER_KEY))
            .and_then(serde_json::Value::as_str),
        _ => None,
    };
    driver_key
        .map(str::to_owned)
        .or_else(|| lease.provider.clone())
}

/// [`handle_of`] with the process group recorded for the lease's command, if its command did not end normally (a
/// crash of berth, a run abandoned midway): what release and destroy kill, wherever it ran.
pub async fn stored_handle(store: &Store, lease: &Lease) -> LeaseHandle {
    LeaseHandle {
        process: stored_process(store, lease.id).await,
        ..handle_of(lease)
    }
}

/// The process group recorded for the lease's command. A failed read is logged and cleanup goes on without it: the
/// driver then kills nothing it does not know.
async fn stored_process(store: &Store, lease_id: LeaseId) -> Option<ProcessIdentity> {
    match store.lease_process(lease_id).await {
        Ok(process) => process,
        Err(error) => {
            tracing::warn!(lease.id = %lease_id, error = %DisplayChain(&error), "could not read the process group recorded for the lease; its processes are not killed");
            None
        }
    }
}

/// The policy a run's lease follows: the request's choice, else reuse when the sandbox config asks for it.
pub fn policy_for(config: &DriverConfig, requested: Option<LeasePolicy>) -> LeasePolicy {
    match (requested, config) {
        (Some(policy), _) => policy,
        (None, DriverConfig::Sandbox(sandbox)) if sandbox.reuse_lease => {
            LeasePolicy::ReuseByEnvironment
        }
        (None, _) => LeasePolicy::Ephemeral,
    }
}

/// Resumes a lease an earlier run of this environment kept, when the policy allows and the driver agrees; else takes
/// a fresh one. The lease row is written *before* the provider is asked, so a crash in between leaves a row the
/// orphan sweep can clean up rather than an untracked sandbox.
///
/// Under `ReuseByEnvironment` the row goes in first as the environment's one active reusable lease, which the
/// database allows only once per environment (a partial unique index, not a read-then-write): of concurrent runs, on
/// any replica, exactly one takes the reusable sandbox and the others get sandboxes of their own. Only that holder
/// claims kept leases, so a kept sandbox is resumed for at most one run, and never while another run works in a
/// fresh reusable one.
pub async fn acquire(
    store: &Store,
    driver: &Arc<dyn EnvironmentDriver>,
    environment: &Environment,
    config: &DriverConfig,
    run_id: RunId,
    policy: LeasePolicy,
) -> Result<HeldLease, LeaseError> {
    let request = LeaseRequest {
        company_id: environment.company_id,
        environment_id: environment.id,
        run_id,
    };
    let now = Timestamp::now();
    let provider = lease_model::provider_of(config);
    let mut lease = new_lease(environment, run_id, policy, &provider, now);
    let mut fresh_config = None;
    match store.insert_lease(&lease).await {
        Ok(()) => {}
        // The reusable sandbox is busy with another run of this environment: two runs must never share one
        // workspace, so this run gets a sandbox of its own that is not kept.
        Err(StoreError::Conflict(ConflictKind::ReusableLeaseHeld)) => {
            tracing::info!(env.id = %environment.id, run.id = %run_id, "the reusable lease is held by another run; taking an ephemeral one");
            lease = new_lease(environment, run_id, LeasePolicy::Ephemeral, &provider, now);
            store.insert_lease(&lease).await?;
            fresh_config = not_reusable(config);
        }
        Err(error) => return Err(error.into()),
    }
    if lease.lease_policy == LeasePolicy::ReuseByEnvironment
        && let Some(held) =
            resume_kept(store, driver, environment, config, &request, &mut lease).await?
    {
        return Ok(held);
    }
    let config = fresh_config.as_ref().unwrap_or(config);

    match driver.acquire(config, &request).await {
        Ok(handle) => {
            let expires_at = handle
                .expires_at
                .or_else(|| lifetime(config).map(|ttl| now.saturating_add(ttl)));
            record_handle(store, &mut lease, &handle, expires_at).await?;
            record_activity(store, &lease, "lease.acquired", &run_actor(run_id)).await;
            Ok(HeldLease {
                lease,
                handle: LeaseHandle {
                    expires_at,
                    ..handle
                },
                resumed: false,
            })
        }
        Err(error) => {
            // The code, not the message: the message (which may name hosts and paths) is the run's `error`.
            tracing::info!(lease.id = %lease.id, run.id = %run_id, env.id = %environment.id, error = %DisplayChain(&error), "could not acquire a lease");
            store
                .transition_lease(
                    lease.id,
                    LeaseStatus::Active,
                    LeaseStatus::Failed,
                    Some(lease_model::failure::LEASE_ACQUIRE_FAILED),
                    None,
                    Timestamp::now(),
                )
                .await?;
            Err(error.into())
        }
    }
}

/// Resumes a kept lease of the environment for the run holding `lease`, its active reusable lease, which takes over
/// the kept lease's resource. Runs of the environment cannot race here (only the one holder gets this far); a sweep
/// releasing or expiring the kept lease meanwhile can, which the compare-and-set on its status settles.
async fn resume_kept(
    store: &Store,
    driver: &Arc<dyn EnvironmentDriver>,
    environment: &Environment,
    config: &DriverConfig,
    request: &LeaseRequest,
    lease: &mut Lease,
) -> Result<Option<HeldLease>, LeaseError> {
    let kept = store
        .leases_in_statuses(environment.id, &[LeaseStatus::Retained])
        .await?;
    for candidate in kept {
        let handle = handle_of(&candidate);
        if candidate.driver != environment.driver || !driver.matches_reusable_lease(config, &handle)
        {
            continue;
        }
        // Claim it: only one caller, on any replica, can move it out of `retained`.
        let now = Timestamp::now();
        let Some(_claimed) = store
            .transition_lease(
                candidate.id,
                LeaseStatus::Retained,
                LeaseStatus::Released,
                None,
                None,
                now,
            )
            .await?
        else {
            continue;
        };
        match driver.resume(config, &handle, request).await {
            Ok(Some(resumed)) => {
                let expires_at = resumed
                    .expires_at
                    .or_else(|| lifetime(config).map(|ttl| now.saturating_add(ttl)));
                record_handle(store, lease, &resumed, expires_at).await?;
                record_activity(store, lease, "lease.resumed", &run_actor(request.run_id)).await;
                tracing::info!(lease.id = %lease.id, from = %candidate.id, "resumed a kept lease");
                return Ok(Some(HeldLease {
                    lease: lease.clone(),
                    handle: LeaseHandle {
                        expires_at,
                        ..resumed
                    },
                    resumed: true,
                }));
            }
            Ok(None) => {
                tracing::info!(lease.id = %candidate.id, "kept lease is gone; acquiring a fresh one")
            }
            Err(error) => {
                tracing::warn!(lease.id = %candidate.id, error = %DisplayChain(&error), "could not resume a kept lease")
            }
        }
    }
    Ok(None)
}

/// The same sandbox config without `reuseLease`, for a run that must not take the shared sandbox.
fn not_reusable(config: &DriverConfig) -> Option<DriverConfig> {
    match config {
        DriverConfig::Sandbox(sandbox) => {
            Some(DriverConfig::Sandbox(berth_core::config::SandboxConfig {
                reuse_lease: false,
                ..sandbox.clone()
            }))
        }
        _ => None,
    }
}

fn new_lease(
    environment: &Environment,
    run_id: RunId,
    policy: LeasePolicy,
    provider: &str,
    now: Timestamp,
) -> Lease {
    Lease {
        id: LeaseId::new(),
        company_id: environment.company_id,
        environment_id: environment.id,
        run_id: Some(run_id),
        status: LeaseStatus::Active,
        lease_policy: policy,
        driver: environment.driver,
        provider: Some(provider.to_owned()),
        provider_lease_id: None,
        acquired_at: now,
        last_used_at: now,
        expires_at: None,
        released_at: None,
        failure_reason: None,
        cleanup_status: None,
        metadata: None,
        acquired_config: Some(environment.config.clone()),
    }
}

async fn record_handle(
    store: &Store,
    lease: &mut Lease,
    handle: &LeaseHandle,
    expires_at: Option<Timestamp>,
) -> Result<(), StoreError> {
    let now = Timestamp::now();
    // The provider named when the row went in stays: for a plugin driver the handle names the driver key, which is
    // what the driver dispatches on, not what the lease shows.
    let provider = lease.provider.clone().or_else(|| handle.provider.clone());
    store
        .update_lease_handle(
            lease.id,
            provider.as_deref(),
            handle.provider_lease_id.as_deref(),
            Some(&handle.metadata),
            expires_at,
            now,
        )
        .await?;
    lease.provider = provider;
    lease.provider_lease_id = handle.provider_lease_id.clone();
    lease.metadata = Some(handle.metadata.clone());
    lease.expires_at = expires_at;
    lease.last_used_at = now;
    Ok(())
}

/// How long a sandbox may live, from its config.
fn lifetime(config: &DriverConfig) -> Option<std::time::Duration> {
    match config {
        DriverConfig::Sandbox(sandbox) => sandbox.timeout_ms.map(std::time::Duration::from_millis),
        _ => None,
    }
}

/// Ends a run's hold on its lease: kept (`retained`) per `keep`; else cleaned up and `released`, or `failed` with
/// `failure` as its `failureReason` when the run failed or timed out (a kept lease's status says it is kept, whatever
/// the run did). Release dispatches on the driver captured on the lease. Returns the lease as it ended up, or `None`
/// if someone else already released it.
pub async fn release(
    context: &RunContext,
    held: &HeldLease,
    config: &DriverConfig,
    keep: bool,
    keep_for: Option<std::time::Duration>,
    failure: Option<&str>,
) -> Result<Option<Lease>, StoreError> {
    let store = &context.store;
    let now = Timestamp::now();
    let driver = context.drivers.get(held.lease.driver);
    if keep {
        let Some(mut kept) = store
            .transition_lease(
                held.lease.id,
                LeaseStatus::Active,
                LeaseStatus::Retained,
                None,
                None,
                now,
            )
            .await?
        else {
            return Ok(None);
        };
        let handle = LeaseHandle {
            process: stored_process(store, held.lease.id).await,
            ..held.handle.clone()
        };
        if let Err(error) = driver.release(&handle, true, Some(config)).await {
            tracing::warn!(lease.id = %held.lease.id, error = %DisplayChain(&error), "provider release (keep) failed");
            crate::metrics::lease_failed(
                LeaseOperation::Release,
                held.lease.driver,
                held.lease.provider.as_deref(),
            );
        }
        if let Some(ttl) = keep_for {
            let expires_at = now.saturating_add(ttl);
            store
                .update_lease_handle(
                    kept.id,
                    kept.provider.as_deref(),
                    kept.provider_lease_id.as_deref(),
                    kept.metadata.as_ref(),
                    Some(expires_at),
                    now,
                )
                .await?;
            kept.expires_at = Some(expires_at);
        }
        record_activity(store, &kept, "lease.retained", &actor_of(&kept)).await;
        return Ok(Some(kept));
    }
    // Cleanup is the same either way: a failed lease's resource is released like any other.
    let (to, action) = match failure {
        Some(_) => (LeaseStatus::Failed, "lease.failed"),
        None => (LeaseStatus::Released, "lease.released"),
    };
    let Some(released) = store
        .transition_lease(
            held.lease.id,
            LeaseStatus::Active,
            to,
            failure,
            Some(CleanupStatus::Pending),
            now,
        )
        .await?
    else {
        return Ok(None);
    };
    let cleanup = cleanup(context, &released, CleanupKind::Release, Some(config)).await;
    let released = Lease {
        cleanup_status: Some(cleanup),
        ..released
    };
    record_activity(store, &released, action, &actor_of(&released)).await;
    Ok(Some(released))
}

#[derive(Clone, Copy, Debug)]
pub enum CleanupKind {
    /// A run's lease: the driver releases it.
    Release,
    /// An expired or orphaned kept lease: the driver destroys its resource.
    Destroy,
}

/// Asks the lease's own driver to clean up and records the outcome. `config`: the run's resolved config when the
/// caller has it; otherwise the config the lease was acquired with, else the environment's current one (when it still
/// uses the lease's driver), is opened — a provider whose handle alone cannot reach the resource (ssh or a plugin,
/// after a restart) needs it. Once clean, secrets only this lease still needed are forgotten.
pub async fn cleanup(
    context: &RunContext,
    lease: &Lease,
    kind: CleanupKind,
    config: Option<&DriverConfig>,
) -> CleanupStatus {
    let store = &context.store;
    let driver = context.drivers.get(lease.driver);
    let handle = stored_handle(store, lease).await;
    let loaded = match config {
        Some(_) => None,
        None => match acquired_config(context, lease).await {
            Some(acquired) => Some(acquired),
            None => current_config(context, lease).await,
        },
    };
    let config = config.or(loaded.as_ref().map(ResolvedConfig::as_config));
    let result = match kind {
        CleanupKind::Release => driver.release(&handle, false, config).await,
        CleanupKind::Destroy => driver.destroy(&handle, config).await,
    };
    let status = match result {
        Ok(()) => CleanupStatus::Success,
        Err(error) => {
            tracing::warn!(lease.id = %lease.id, error = %DisplayChain(&error), "lease cleanup failed");
            let operation = match kind {
                CleanupKind::Release => LeaseOperation::Release,
                CleanupKind::Destroy => LeaseOperation::Destroy,
            };
            crate::metrics::lease_failed(operation, lease.driver, lease.provider.as_deref());
            CleanupStatus::Failed
        }
    };
    if let Err(error) = store.set_lease_cleanup_status(lease.id, status).await {
        tracing::warn!(lease.id = %lease.id, error = %DisplayChain(&error), "could not record cleanup status");
    }
    if status == CleanupStatus::Success {
        forget_secrets_left_behind(context, lease).await;
    }
    status
}

/// The secrets the lease's config referenced that the environment dropped meanwhile: the lease was what kept them.
async fn forget_secrets_left_behind(context: &RunContext, lease: &Lease) {
    let Some(acquired) = &lease.acquired_config else {
        return;
    };
    let referenced = berth_core::config::stored_secret_refs(acquired);
    if referenced.is_empty() {
        return;
    }
    match context.store.get_environment(lease.environment_id).await {
        Ok(Some(environment)) => {
            vault::forget_unless_needed(
                &context.store,
                environment.id,
                &referenced,
                &environment.config,
            )
            .await
        }
        // Deleting the environment forgets all of its secrets.
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(lease.id = %lease.id, error = %DisplayChain(&error), "could not load the lease's environment")
        }
    }
}

/// The config the lease was acquired with, secrets resolved, if it can still be opened.
async fn acquired_config(context: &RunContext, lease: &Lease) -> Option<ResolvedConfig> {
    match vault::open_acquired_config(
        &context.store,
        &context.cipher,
        context.drivers.providers(),
        lease,
    )
    .await
    {
        Ok(config) => config,
        Err(error) => {
            tracing::info!(lease.id = %lease.id, code = error.code(), error = %DisplayChain(&error), "the config the lease was acquired with cannot be opened; trying the environment's current one");
            None
        }
    }
}

/// The lease's environment's config with secrets resolved, if the environment still exists with the lease's driver.
async fn current_config(context: &RunContext, lease: &Lease) -> Option<ResolvedConfig> {
    let environment = match context.store.get_environment(lease.environment_id).await {
        Ok(Some(environment)) if environment.driver == lease.driver => environment,
        Ok(_) => return None,
        Err(error) => {
            tracing::warn!(lease.id = %lease.id, error = %DisplayChain(&error), "could not load the lease's environment");
            return None;
        }
    };
    match vault::open_config(
        &context.store,
        &context.cipher,
        context.drivers.providers(),
        &environment,
    )
    .await
    {
        Ok(config) => Some(config),
        // A config that no longer parses is cleaned up without it, as the driver manages.
        Err(VaultError::StoredConfigInvalid(_)) => None,
        Err(error) => {
            tracing::warn!(lease.id = %lease.id, code = error.code(), error = %DisplayChain(&error), "could not open the environment's secrets for cleanup");
            None
        }
    }
}

/// The lease half of retiring an environment (`RunManager::retire_environment`, once its runs are cancelled): release
/// or destroy every lease still active or kept, with provider cleanup. The environment's lease rows vanish with it,
/// so nothing may be left for a later sweep to find.
///
/// Leases can change under this: a cancelled run keeps its reusable lease (`active → retained`) as this reads, a sweep
/// releases an orphan. So it re-reads until nothing is held, and a lease whose compare-and-set lost is looked at again
/// in its new status rather than skipped (skipping lost a lease kept just then). Active leases go first: while an
/// environment's reusable lease is active (a run that outlived the wait for it) or its cleanup is pending, moving a
/// kept reusable one to a pending cleanup breaks the one-held-reusable-lease rule (`ReusableLeaseHeld`).
pub async fn release_all_of_environment(
    context: &RunContext,
    environment: &Environment,
) -> Result<(), StoreError> {
    /// Passes that honour the one-held-reusable-lease rule (about 2 s of waiting, for another node's cleanup).
    const POLITE_PASSES: usize = 20;
    /// After those, a pass ends a blocked lease without marking its cleanup pending (see [`end_for_deletion`]).
    const MAX_PASSES: usize = POLITE_PASSES + 5;
    let store = &context.store;
    let mut settled = false;
    for pass in 0..MAX_PASSES {
        let mut held = store
            .leases_in_statuses(
                environment.id,
                &[LeaseStatus::Active, LeaseStatus::Retained],
            )
            .await?;
        if held.is_empty() {
            settled = true;
            break;
        }
        // Stable: within each status, most recently used first, as read.
        held.sort_by_key(|lease| lease.status != LeaseStatus::Active);
        let mut blocked = false;
        for lease in &held {
            blocked |= !end_for_deletion(context, lease, pass >= POLITE_PASSES).await?;
        }
        if blocked {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    if !settled {
        tracing::warn!(env.id = %environment.id, "leases kept changing while their environment was deleted; what is left goes with it");
    }
    finish_pending_cleanups(context, environment).await
}

/// Retries the cleanups of the environment's ended leases that never finished (a node died mid-cleanup): the sweep
/// that would retry them finds nothing once the environment's rows are gone. Each is claimed first (the sweep's
/// compare-and-set), so a cleanup is never taken from whoever claimed it since this read.
async fn finish_pending_cleanups(
    context: &RunContext,
    environment: &Environment,
) -> Result<(), StoreError> {
    let store = &context.store;
    let ended = store
        .leases_in_statuses(
            environment.id,
            &[
                LeaseStatus::Released,
                LeaseStatus::Failed,
                LeaseStatus::Expired,
            ],
        )
        .await?;
    for lease in ended
        .into_iter()
        .filter(|lease| lease.cleanup_status == Some(CleanupStatus::Pending))
    {
        if !store.claim_stuck_cleanup(&lease, Timestamp::now()).await? {
            continue;
        }
        let status = cleanup(context, &lease, CleanupKind::Destroy, None).await;
        tracing::info!(lease.id = %lease.id, env.id = %environment.id, cleanup = %status, "finished a pending cleanup of a deleted environment's lease");
        let lease = Lease {
            cleanup_status: Some(status),
            ..lease
        };
        record_activity(
            store,
            &lease,
            "lease.cleaned_up",
            "system:environment-deleted",
        )
        .await;
    }
    Ok(())
}

/// Releases one of a deleted environment's leases and destroys its resource. `false` when the one-held-reusable-lease
/// rule refused it (another reusable lease of the environment is held); `true` otherwise, also when the lease changed
/// under this call (the next pass sees its new status).
///
/// With `force`, a refused lease is released without marking its cleanup pending. The rule keeps a run from taking
/// the environment's sandbox while it is destroyed; no run will take this environment's sandbox again (its runs were
/// cancelled and the environment is about to go), so it guards nothing here, and the outcome is still recorded.
async fn end_for_deletion(
    context: &RunContext,
    lease: &Lease,
    force: bool,
) -> Result<bool, StoreError> {
    let store = &context.store;
    let transition = |cleanup_status| {
        store.transition_lease(
            lease.id,
            lease.status,
            LeaseStatus::Released,
            None,
            cleanup_status,
            Timestamp::now(),
        )
    };
    let released = match transition(Some(CleanupStatus::Pending)).await {
        Ok(released) => released,
        Err(StoreError::Conflict(ConflictKind::ReusableLeaseHeld)) if force => {
            tracing::warn!(lease.id = %lease.id, env.id = %lease.environment_id, "another reusable lease of the deleted environment is still held; destroying this one anyway");
            transition(None).await?
        }
        Err(StoreError::Conflict(ConflictKind::ReusableLeaseHeld)) => {
            tracing::debug!(lease.id = %lease.id, env.id = %lease.environment_id, "another reusable lease of the deleted environment is held; retrying");
            return Ok(false);
        }
        Err(error) => return Err(error),
    };
    let Some(released) = released else {
        return Ok(true);
    };
    let status = cleanup(context, &released, CleanupKind::Destroy, None).await;
    let released = Lease {
        cleanup_status: Some(status),
        ..released
    };
    record_activity(
        store,
        &released,
        "lease.released",
        "system:environment-deleted",
    )
    .await;
    Ok(true)
}
