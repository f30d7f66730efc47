//! Environment leases.
//!
//! Several replicas may share one PostgreSQL database and race to release, expire or reclaim the same lease. Every
//! status change therefore goes through [`Store::transition_lease`], a compare-and-set on the stored status: of any
//! number of concurrent callers, exactly one sees the transition succeed and owns the follow-up (provider cleanup,
//! reuse). The sweeper queries below are plain reads; the transition is what decides. Which run takes an environment's
//! reusable lease is decided by a partial unique index (one held `reuse_by_environment` lease per environment), so
//! inserting one is the whole decision too.

use serde_json::{Map, Value};

use berth_core::driver::ProcessIdentity;
use berth_core::environment::Driver;
use berth_core::ids::{EnvironmentId, LeaseId};
use berth_core::lease::{CleanupStatus, Lease, LeaseStatus};
use berth_core::time::Timestamp;

use super::Store;
use super::error::{ConflictKind, StoreError, conflict_as};
use super::rows::{LeaseRow, convert_all, json_object_or_null, json_text_or_null, json_value_text};

macro_rules! lease_columns {
    () => {
        "id, company_id, environment_id, run_id, status, lease_policy, driver, provider, provider_lease_id, \
         acquired_at, last_used_at, expires_at, released_at, failure_reason, cleanup_status, metadata, acquired_config"
    };
}

const INSERT_LEASE: &str = concat!(
    "INSERT INTO environment_leases (",
    lease_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
);
const GET_LEASE: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM environment_leases WHERE id = $1"
);
/// A `NULL` status matches every lease.
const LIST_LEASES: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM environment_leases WHERE environment_id = $1 AND ($2 IS NULL OR status = $2) \
     ORDER BY last_used_at DESC, id DESC"
);
/// One parameter per [`LeaseStatus`] variant, `NULL` for those not asked for (`status IN (.., NULL, ..)` never matches
/// through a `NULL`), so that any subset is one static statement.
const LEASES_IN_STATUSES: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM environment_leases WHERE environment_id = $1 AND status IN ($2, $3, $4, $5, $6) \
     ORDER BY last_used_at DESC, id DESC"
);
const _: () = assert!(
    LeaseStatus::ALL.len() == 5,
    "LEASES_IN_STATUSES takes one parameter per lease status"
);
/// The partial unique index (migration 0007) that lets an environment hold one `reuse_by_environment` lease at a time:
/// active, or ended with its cleanup pending (its sandbox is still being destroyed).
const ONE_HELD_REUSABLE_LEASE: &str = "environment_leases_one_held_reusable";
const UPDATE_LEASE_HANDLE: &str = "UPDATE environment_leases SET provider = $2, provider_lease_id = $3, \
     metadata = $4, expires_at = $5, last_used_at = $6 WHERE id = $1";
/// The compare-and-set behind every lease status change: it only matches while the status is still `$2`. On
/// PostgreSQL a concurrent writer of the same row waits for this one to commit and then re-checks the condition
/// against the new status, so it matches nothing; on SQLite writes are serialized outright.
const TRANSITION_LEASE: &str = concat!(
    "UPDATE environment_leases SET status = $3, released_at = $4, failure_reason = $5, cleanup_status = $6, \
     last_used_at = $7 WHERE id = $1 AND status = $2 RETURNING ",
    lease_columns!()
);
const UNFINISHED_LEASE_CONFIGS: &str = "SELECT acquired_config FROM environment_leases \
     WHERE environment_id = $1 AND acquired_config IS NOT NULL \
     AND (status IN ('active', 'retained') OR cleanup_status = 'pending')";
const SET_LEASE_CLEANUP_STATUS: &str =
    "UPDATE environment_leases SET cleanup_status = $2 WHERE id = $1";
const SET_LEASE_PROCESS: &str = "UPDATE environment_leases SET process = $2 WHERE id = $1";
const GET_LEASE_PROCESS: &str = "SELECT process FROM environment_leases WHERE id = $1";
/// Active leases without a live run: the run id is `NULL`, names no row, or names a run in a final status.
const ORPHANED_LEASES: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM environment_leases WHERE status = 'active' AND NOT EXISTS (SELECT 1 FROM runs \
     WHERE runs.id = environment_leases.run_id AND runs.status IN ('queued', 'running')) \
     ORDER BY acquired_at, id LIMIT $1"
);
/// Released, failed or expired leases whose cleanup was started before `$1`, or by node `$3`'s runs (a node restarting knows
/// its own cleanups died with it), and never finished, and whose run is not alive.
const STUCK_CLEANUPS: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM environment_leases WHERE cleanup_status = 'pending' AND status IN ('released', 'failed', 'expired') \
     AND (released_at < $1 OR EXISTS (SELECT 1 FROM runs WHERE runs.id = environment_leases.run_id \
     AND runs.owner_node = $3)) AND NOT EXISTS (SELECT 1 FROM runs \
     WHERE runs.id = environment_leases.run_id AND runs.status IN ('queued', 'running')) \
     ORDER BY released_at, id LIMIT $2"
);
/// Takes over a stuck cleanup: `released_at` doubles as the claim's version, so one sweeper wins.
const CLAIM_STUCK_CLEANUP: &str = "UPDATE environment_leases SET released_at = $3 \
     WHERE id = $1 AND cleanup_status = 'pending' AND released_at = $2";
const COUNT_HELD_LEASES: &str = "SELECT status, driver, provider, COUNT(*) FROM environment_leases \
     WHERE status IN ('active', 'retained') GROUP BY status, driver, provider";
/// `expires_at < $1` is never true for a `NULL` expiry: leases without one do not expire.
const EXPIRED_LEASES: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM environment_leases WHERE status IN ('active', 'retained') AND expires_at < $1 \
     ORDER BY expires_at, id LIMIT $2"
);

// === impl Store ===

impl Store {
    /// Inserts a lease. An active `reuse_by_environment` lease while the environment already holds one (active, or
    /// with its cleanup pending) is refused with `Conflict(ReusableLeaseHeld)`: the database decides, so of any number
    /// of concurrent inserts (on any replica) exactly one takes the environment's reusable lease.
    pub async fn insert_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let metadata = json_text_or_null(lease.metadata.as_ref())?;
        let acquired_config = json_text_or_null(lease.acquired_config.as_ref())?;
        on_pool!(&self.db, |pool| {
            sqlx::query(INSERT_LEASE)
                .bind(lease.id.to_string())
                .bind(lease.company_id.to_string())
                .bind(lease.environment_id.to_string())
                .bind(lease.run_id.map(|id| id.to_string()))
                .bind(lease.status.as_str())
                .bind(lease.lease_policy.as_str())
                .bind(lease.driver.as_str())
                .bind(lease.provider.as_deref())
                .bind(lease.provider_lease_id.as_deref())
                .bind(lease.acquired_at.unix_millis())
                .bind(lease.last_used_at.unix_millis())
                .bind(lease.expires_at.map(|at| at.unix_millis()))
                .bind(lease.released_at.map(|at| at.unix_millis()))
                .bind(lease.failure_reason.as_deref())
                .bind(lease.cleanup_status.map(|status| status.as_str()))
                .bind(metadata.as_deref())
                .bind(acquired_config.as_deref())
                .execute(pool)
                .await
                .map_err(conflict_as(
                    ONE_HELD_REUSABLE_LEASE,
                    ConflictKind::ReusableLeaseHeld,
                ))?;
        });
        Ok(())
    }

    /// The configs the environment's unfinished leases (active, retained, or cleanup pending) were acquired with:
    /// the secrets they reference must outlive edits of the environment until those leases are cleaned up.
    pub async fn unfinished_lease_configs(
        &self,
        environment_id: EnvironmentId,
    ) -> Result<Vec<Map<String, Value>>, StoreError> {
        let texts: Vec<(Option<String>,)> = on_pool!(&self.db, |pool| {
            sqlx::query_as(UNFINISHED_LEASE_CONFIGS)
                .bind(environment_id.to_string())
                .fetch_all(pool)
                .await?
        });
        texts
            .into_iter()
            .filter_map(|(text,)| {
                json_object_or_null(text.as_deref(), "environment_leases", "acquired_config")
                    .transpose()
            })
            .collect()
    }

    pub async fn get_lease(&self, id: LeaseId) -> Result<Option<Lease>, StoreError> {
        let row: Option<LeaseRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(GET_LEASE)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(Lease::try_from).transpose()
    }

    /// The environment's leases, optionally only those in `status`, most recently used first.
    pub async fn list_leases(
        &self,
        environment_id: EnvironmentId,
        status: Option<LeaseStatus>,
    ) -> Result<Vec<Lease>, StoreError> {
        let status = status.map(|status| status.as_str());
        let rows: Vec<LeaseRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIST_LEASES)
                .bind(environment_id.to_string())
                .bind(status)
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// Records what the driver returned for the lease (the provider, its id for the resource, metadata, expiry) and
    /// touches last_used_at. Not a status change, so no compare-and-set; a missing lease is not an error (its
    /// environment was deleted meanwhile, and the lease with it).
    pub async fn update_lease_handle(
        &self,
        id: LeaseId,
        provider: Option<&str>,
        provider_lease_id: Option<&str>,
        metadata: Option<&Map<String, Value>>,
        expires_at: Option<Timestamp>,
        last_used_at: Timestamp,
    ) -> Result<(), StoreError> {
        let metadata = json_text_or_null(metadata)?;
        on_pool!(&self.db, |pool| {
            sqlx::query(UPDATE_LEASE_HANDLE)
                .bind(id.to_string())
                .bind(provider)
                .bind(provider_lease_id)
                .bind(metadata.as_deref())
                .bind(expires_at.map(Timestamp::unix_millis))
                .bind(last_used_at.unix_millis())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Moves the lease from status `from` to `to`, iff its stored status is still `from`. Sets released_at (`now`
    /// when `to` ends the lease: released, expired or failed; cleared for active and retained), failure_reason and
    /// cleanup_status (both exactly as given, `None` clearing them) and last_used_at = `now`.
    ///
    /// Returns the updated lease if this call made the transition, `None` if the lease is missing or no longer in
    /// `from`. `Conflict(ReusableLeaseHeld)` if the transition would make a second reusable lease of its environment
    /// held (a kept one expiring, with its cleanup pending, while a run holds another). Concurrent callers on any replica cannot both get `Some`: that is what makes release, expiry and
    /// reclaiming a retained lease happen exactly once.
    pub async fn transition_lease(
        &self,
        id: LeaseId,
        from: LeaseStatus,
        to: LeaseStatus,
        failure_reason: Option<&str>,
        cleanup_status: Option<CleanupStatus>,
        now: Timestamp,
    ) -> Result<Option<Lease>, StoreError> {
        let released_at = match to {
            LeaseStatus::Released | LeaseStatus::Expired | LeaseStatus::Failed => Some(now),
            LeaseStatus::Active | LeaseStatus::Retained => None,
        };
        let row: Option<LeaseRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(TRANSITION_LEASE)
                .bind(id.to_string())
                .bind(from.as_str())
                .bind(to.as_str())
                .bind(released_at.map(Timestamp::unix_millis))
                .bind(failure_reason)
                .bind(cleanup_status.map(CleanupStatus::as_str))
                .bind(now.unix_millis())
                .fetch_optional(pool)
                .await
                .map_err(conflict_as(
                    ONE_HELD_REUSABLE_LEASE,
                    ConflictKind::ReusableLeaseHeld,
                ))?
        });
        row.map(Lease::try_from).transpose()
    }

    /// Records the outcome of the provider cleanup that a release started. A missing lease is not an error.
    pub async fn set_lease_cleanup_status(
        &self,
        id: LeaseId,
        cleanup_status: CleanupStatus,
    ) -> Result<(), StoreError> {
        on_pool!(&self.db, |pool| {
            sqlx::query(SET_LEASE_CLEANUP_STATUS)
                .bind(id.to_string())
                .bind(cleanup_status.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Records the process group of the command now running on the lease (`None`: the command ended, forget it):
    /// what cleanup after a crash kills. A missing lease is not an error. Never returned by the API.
    pub async fn set_lease_process(
        &self,
        id: LeaseId,
        process: Option<&ProcessIdentity>,
    ) -> Result<(), StoreError> {
        let text = process.map(json_value_text).transpose()?;
        on_pool!(&self.db, |pool| {
            sqlx::query(SET_LEASE_PROCESS)
                .bind(id.to_string())
                .bind(text.as_deref())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The process group recorded for the lease's command, if one is (see [`Store::set_lease_process`]). `None` too
    /// for a missing lease.
    pub async fn lease_process(&self, id: LeaseId) -> Result<Option<ProcessIdentity>, StoreError> {
        let text: Option<(Option<String>,)> = on_pool!(&self.db, |pool| {
            sqlx::query_as(GET_LEASE_PROCESS)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        let Some((Some(text),)) = text else {
            return Ok(None);
        };
        serde_json::from_str(&text).map_err(|_| StoreError::CorruptRow {
            table: "environment_leases",
            column: "process",
        })
    }

    /// Active leases whose run is missing or final (or that have no run): nobody will release them, so the sweeper
    /// must. Oldest acquisition first, at most `limit`. A plain read: the sweeper then releases each through
    /// [`Store::transition_lease`], which lets exactly one replica win.
    pub async fn orphaned_leases(&self, limit: u32) -> Result<Vec<Lease>, StoreError> {
        let rows: Vec<LeaseRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(ORPHANED_LEASES)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// Leases whose cleanup started before `started_before` (or for a run of `restarted_node`) and is still pending
    /// while their run is gone: the node that was cleaning up died. A plain read; [`Store::claim_stuck_cleanup`]
    /// decides who retries.
    pub async fn stuck_cleanups(
        &self,
        started_before: Timestamp,
        restarted_node: &str,
        limit: u32,
    ) -> Result<Vec<Lease>, StoreError> {
        let rows: Vec<LeaseRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(STUCK_CLEANUPS)
                .bind(started_before.unix_millis())
                .bind(i64::from(limit))
                .bind(restarted_node)
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// Claims `lease`'s stuck cleanup for this caller; `false` when another sweeper got it first.
    pub async fn claim_stuck_cleanup(
        &self,
        lease: &Lease,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let Some(released_at) = lease.released_at else {
            return Ok(false);
        };
        let affected = on_pool!(&self.db, |pool| {
            sqlx::query(CLAIM_STUCK_CLEANUP)
                .bind(lease.id.to_string())
                .bind(released_at.unix_millis())
                .bind(now.unix_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Active or retained leases whose expires_at is before `now`, soonest expiry first, at most `limit`.
    pub async fn expired_leases(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<Lease>, StoreError> {
        let rows: Vec<LeaseRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(EXPIRED_LEASES)
                .bind(now.unix_millis())
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// The environment's leases in any of `statuses`, most recently used first (ties broken by id, newest first).
    pub async fn leases_in_statuses(
        &self,
        environment_id: EnvironmentId,
        statuses: &[LeaseStatus],
    ) -> Result<Vec<Lease>, StoreError> {
        // Positional: parameter $2 + i is variant i of LeaseStatus::ALL, bound only if asked for.
        let wanted: Vec<Option<&str>> = LeaseStatus::ALL
            .iter()
            .map(|status| statuses.contains(status).then_some(status.as_str()))
            .collect();
        if wanted.iter().all(Option::is_none) {
            return Ok(Vec::new());
        }
        let rows: Vec<LeaseRow> = on_pool!(&self.db, |pool| {
            let mut query = sqlx::query_as(LEASES_IN_STATUSES).bind(environment_id.to_string());
            for status in &wanted {
                query = query.bind(*status);
            }
            query.fetch_all(pool).await?
        });
        convert_all(rows)
    }

    /// How many leases are held (`active` or `retained`), by status, driver and provider: what the metrics report
    /// at each scrape, read from the database so it holds across restarts and replicas.
    pub async fn count_held_leases(
        &self,
    ) -> Result<Vec<(LeaseStatus, Driver, Option<String>, u64)>, StoreError> {
        let rows: Vec<(String, String, Option<String>, i64)> = on_pool!(&self.db, |pool| {
            sqlx::query_as(COUNT_HELD_LEASES).fetch_all(pool).await?
        });
        rows.into_iter()
            .map(|(status, driver, provider, count)| {
                let corrupt = |column| StoreError::CorruptRow {
                    table: "environment_leases",
                    column,
                };
                Ok((
                    status.parse().map_err(|_| corrupt("status"))?,
                    driver.parse().map_err(|_| corrupt("driver"))?,
                    provider,
                    u64::try_from(count).unwrap_or_default(),
                ))
            })
            .collect()
    }
}
