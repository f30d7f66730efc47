//! Runs and their events.
//!
//! Several replicas may share one PostgreSQL database, so every state change that two nodes could race on is a single
//! conditional statement (the `WHERE` clause re-checks the state it changes from) or runs under a row lock; nothing
//! relies on in-process locking.

use std::fmt::Write as _;

use sqlx::AssertSqlSafe;

use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::run::{NewRunEvent, Run, RunEvent, RunStatus};
use berth_core::time::Timestamp;

use super::error::StoreError;
use super::rows::{HeartbeatRow, RunEventRow, RunRow, convert_all, flag_value, json_value_text};
use super::{Db, Store};

macro_rules! run_columns {
    () => {
        "id, company_id, environment_id, lease_id, status, command, exit_code, signal, error, owner_node, created_at, \
         started_at, finished_at, heartbeat_at, cancel_requested"
    };
}

/// The SQL condition "the run is still live". Spelled exactly as in the partial indexes of the migrations, which the
/// query planners only use when the query repeats their predicate.
macro_rules! live {
    () => {
        "status IN ('queued', 'running')"
    };
}

const INSERT_RUN: &str = concat!(
    "INSERT INTO runs (",
    run_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
);
const GET_RUN: &str = concat!("SELECT ", run_columns!(), " FROM runs WHERE id = $1");
/// A `NULL` status matches every run.
const LIST_RUNS: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE company_id = $1 AND ($2 IS NULL OR status = $2) \
     ORDER BY created_at DESC, id DESC LIMIT $3"
);
/// Conditional on the stored run being live: a final status never changes, whoever tries.
const UPDATE_RUN: &str = concat!(
    "UPDATE runs SET status = $2, lease_id = $3, exit_code = $4, signal = $5, error = $6, started_at = $7, \
     finished_at = $8 WHERE id = $1 AND ",
    live!()
);
const HEARTBEAT_RUNS: &str = concat!(
    "UPDATE runs SET heartbeat_at = $2 WHERE owner_node = $1 AND ",
    live!(),
    " RETURNING id, cancel_requested"
);
const REQUEST_CANCEL: &str = concat!(
    "UPDATE runs SET cancel_requested = 1 WHERE id = $1 AND ",
    live!(),
    " RETURNING ",
    run_columns!()
);
const ORPHANED_RUNS: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE ",
    live!(),
    " AND (owner_node = $1 OR heartbeat_at < $2) ORDER BY created_at, id"
);
/// The same condition as [`ORPHANED_RUNS`], re-checked by the write itself: of two sweepers (or a sweeper and an owner
/// that came back to life and finished the run), exactly one changes the row.
const FAIL_ORPHANED_RUN: &str = concat!(
    "UPDATE runs SET status = 'failed', error = $4, finished_at = $5 WHERE id = $1 AND ",
    live!(),
    " AND (owner_node = $2 OR heartbeat_at < $3)"
);
const LIVE_RUNS_OF_ENVIRONMENT: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE environment_id = $1 AND ",
    live!(),
    " ORDER BY created_at, id"
);

/// Serializes appenders to one run. SQLite needs no lock: `BEGIN IMMEDIATE` already holds the database's write lock.
const LOCK_RUN_SQLITE: &str = "SELECT id FROM runs WHERE id = $1";
/// Serializes appenders to one run on PostgreSQL, where concurrent transactions would otherwise both read the same
/// `MAX(seq)`. The lock is held until commit, so the next appender sees this one's events.
const LOCK_RUN_POSTGRES: &str = "SELECT id FROM runs WHERE id = $1 FOR UPDATE";
const LAST_EVENT_SEQ: &str = "SELECT COALESCE(MAX(seq), 0) FROM run_events WHERE run_id = $1";
const LIST_EVENTS: &str = "SELECT run_id, seq, at, kind, data FROM run_events \
     WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

/// Rows per multi-row event insert: 5 parameters each stays far below both backends' parameter limits (SQLite 32766,
/// PostgreSQL 65535), while a typical output burst still goes in one statement.
const EVENT_INSERT_CHUNK: usize = 200;

// === impl Store ===

impl Store {
    pub async fn insert_run(&self, run: &Run) -> Result<(), StoreError> {
        let command = json_value_text(&run.command)?;
        on_pool!(&self.db, |pool| {
            sqlx::query(INSERT_RUN)
                .bind(run.id.to_string())
                .bind(run.company_id.to_string())
                .bind(run.environment_id.to_string())
                .bind(run.lease_id.map(|id| id.to_string()))
                .bind(run.status.as_str())
                .bind(&command)
                .bind(run.exit_code.map(i64::from))
                .bind(run.signal.as_deref())
                .bind(run.error.as_deref())
                .bind(&run.owner_node)
                .bind(run.created_at.unix_millis())
                .bind(run.started_at.map(Timestamp::unix_millis))
                .bind(run.finished_at.map(Timestamp::unix_millis))
                .bind(run.heartbeat_at.unix_millis())
                .bind(flag_value(run.cancel_requested))
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let row: Option<RunRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(GET_RUN)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(Run::try_from).transpose()
    }

    /// The company's runs, optionally only those in `status`: newest first (created_at DESC, id DESC), at most
    /// `limit`.
    pub async fn list_runs(
        &self,
        company_id: CompanyId,
        status: Option<RunStatus>,
        limit: u32,
    ) -> Result<Vec<Run>, StoreError> {
        let status = status.map(RunStatus::as_str);
        let rows: Vec<RunRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIST_RUNS)
                .bind(company_id.to_string())
                .bind(status)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// Writes status, lease_id, exit_code, signal, error, started_at and finished_at, only while the stored run is
    /// live: a final status never changes, so a late writer (a cancel racing the process exit, an orphan sweep racing
    /// the owner) cannot overwrite the outcome. Returns whether the row was written.
    pub async fn update_run(&self, run: &Run) -> Result<bool, StoreError> {
        let updated = on_pool!(&self.db, |pool| {
            sqlx::query(UPDATE_RUN)
                .bind(run.id.to_string())
                .bind(run.status.as_str())
                .bind(run.lease_id.map(|id| id.to_string()))
                .bind(run.exit_code.map(i64::from))
                .bind(run.signal.as_deref())
                .bind(run.error.as_deref())
                .bind(run.started_at.map(Timestamp::unix_millis))
                .bind(run.finished_at.map(Timestamp::unix_millis))
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// Sets heartbeat_at = `now` on every live run owned by `owner_node`, and returns the ids of those whose
    /// cancellation was requested: the heartbeat is how a cancel issued on another replica reaches the owner.
    pub async fn heartbeat_runs(
        &self,
        owner_node: &str,
        now: Timestamp,
    ) -> Result<Vec<RunId>, StoreError> {
        let rows: Vec<HeartbeatRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(HEARTBEAT_RUNS)
                .bind(owner_node)
                .bind(now.unix_millis())
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .filter(|row| row.cancel_requested != 0)
            .map(|row| {
                row.id.parse().map_err(|_| StoreError::CorruptRow {
                    table: "runs",
                    column: "id",
                })
            })
            .collect()
    }

    /// Sets cancel_requested on a live run and returns the run as stored after the update; a final run is returned
    /// unchanged, a missing one is `None`. The owner picks the request up with its next heartbeat.
    pub async fn request_cancel(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let row: Option<RunRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(REQUEST_CANCEL)
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        match row {
            Some(row) => Run::try_from(row).map(Some),
            // Not live: final (and so never changing again) or missing.
            None => self.get_run(id).await,
        }
    }

    /// Live runs that nobody is executing: those owned by `owner_node` (called when this node starts, so its earlier
    /// runs died with the previous process) and those whose heartbeat is older than `stale_before` (their owner
    /// stopped). Oldest first.
    pub async fn orphaned_runs(
        &self,
        owner_node: &str,
        stale_before: Timestamp,
    ) -> Result<Vec<Run>, StoreError> {
        let rows: Vec<RunRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(ORPHANED_RUNS)
                .bind(owner_node)
                .bind(stale_before.unix_millis())
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// Marks a live run `failed` with `error` and finished_at = `now`, if it is still an orphan by the rules of
    /// [`Store::orphaned_runs`]. The check and the write are one statement, so of several sweepers (on any replica),
    /// or a sweeper and an owner that recovered, exactly one acts. Returns whether this call did.
    pub async fn fail_orphaned_run(
        &self,
        id: RunId,
        owner_node: &str,
        stale_before: Timestamp,
        error: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let updated = on_pool!(&self.db, |pool| {
            sqlx::query(FAIL_ORPHANED_RUN)
                .bind(id.to_string())
                .bind(owner_node)
                .bind(stale_before.unix_millis())
                .bind(error)
                .bind(now.unix_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// Appends `events` with the next dense seqs (max + 1, max + 2, ...) in one transaction and returns them as
    /// stored.
    ///
    /// Safe with concurrent appenders to the same run, on any replica: the transaction first locks the run's row
    /// (PostgreSQL) or holds the write lock (SQLite, `BEGIN IMMEDIATE`), so reading the last seq and inserting after
    /// it cannot interleave with another appender. Rows go in as multi-row inserts, since this is called for every
    /// chunk of command output. A missing run is a `Database(RowNotFound)` error: events must not be dropped silently.
    pub async fn append_events(
        &self,
        run_id: RunId,
        events: Vec<NewRunEvent>,
    ) -> Result<Vec<RunEvent>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let kinds_and_data = events
            .iter()
            .map(|event| Ok((event.kind.as_str(), json_value_text(&event.data)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let lock_run = match self.db {
            Db::Sqlite(_) => LOCK_RUN_SQLITE,
            Db::Postgres(_) => LOCK_RUN_POSTGRES,
        };
        let run_key = run_id.to_string();
        let last_seq: i64 = in_write_tx!(&self.db, |tx| {
            let locked: Option<String> = sqlx::query_scalar(lock_run)
                .bind(&run_key)
                .fetch_optional(&mut *tx)
                .await?;
            if locked.is_none() {
                return Err(StoreError::Database(sqlx::Error::RowNotFound));
            }
            let last_seq: i64 = sqlx::query_scalar(LAST_EVENT_SEQ)
                .bind(&run_key)
                .fetch_one(&mut *tx)
                .await?;
            let mut seq = last_seq;
            for (chunk, rows) in events
                .chunks(EVENT_INSERT_CHUNK)
                .zip(kinds_and_data.chunks(EVENT_INSERT_CHUNK))
            {
                let mut insert = sqlx::query(AssertSqlSafe(insert_events_sql(chunk.len())));
                for (event, (kind, data)) in chunk.iter().zip(rows) {
                    seq += 1;
                    insert = insert
                        .bind(&run_key)
                        .bind(seq)
                        .bind(event.at.unix_millis())
                        .bind(*kind)
                        .bind(data.as_str());
                }
                insert.execute(&mut *tx).await?;
            }
            last_seq
        });
        // Moved, not cloned: output events are large.
        Ok(events
            .into_iter()
            .zip(last_seq + 1..)
            .map(|(event, seq)| RunEvent {
                run_id,
                seq,
                at: event.at,
                kind: event.kind,
                data: event.data,
            })
            .collect())
    }

    /// The run's events with seq > `after`, in seq order, at most `limit`.
    pub async fn list_events(
        &self,
        run_id: RunId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let rows: Vec<RunEventRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIST_EVENTS)
                .bind(run_id.to_string())
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }

    /// The environment's live runs, oldest first: what has to be stopped before the environment can be deleted.
    pub async fn live_runs_of_environment(
        &self,
        environment_id: EnvironmentId,
    ) -> Result<Vec<Run>, StoreError> {
        let rows: Vec<RunRow> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LIVE_RUNS_OF_ENVIRONMENT)
                .bind(environment_id.to_string())
                .fetch_all(pool)
                .await?
        });
        convert_all(rows)
    }
}

/// `INSERT INTO run_events ... VALUES ($1, ..., $5), ($6, ...)` for `rows` rows, in the `$N` syntax both backends
/// accept. Only the row count varies, so the text never contains a value.
fn insert_events_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT INTO run_events (run_id, seq, at, kind, data) VALUES ");
    for row in 0..rows {
        let first = row * 5 + 1;
        let separator = if row > 0 { ", " } else { "" };
        // Writing to a String cannot fail.
        let _ = write!(
            sql,
            "{separator}(${}, ${}, ${}, ${}, ${})",
            first,
            first + 1,
            first + 2,
            first + 3,
            first + 4
        );
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_inserts_number_their_placeholders_in_order() {
        assert_eq!(
            insert_events_sql(2),
            "INSERT INTO run_events (run_id, seq, at, kind, data) VALUES ($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10)"
        );
    }
}
