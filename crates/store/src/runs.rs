//! Runs and their events.
//!
//! Several replicas may share one PostgreSQL database, so every state change that two nodes could race on is a single
//! conditional statement (the `WHERE` clause re-checks the state it changes from) or runs under a row lock; nothing
//! relies on in-process locking.

use std::fmt::Write as _;
use std::io;

use serde_json::Value;
use sqlx::AssertSqlSafe;

use berth_core::ids::{CompanyId, EnvironmentId, RunId};
use berth_core::run::{EventKind, NewRunEvent, Run, RunEvent, RunStatus};
use berth_core::time::Timestamp;

use super::error::StoreError;
use super::output::{OutputSegments, Segment};
use super::rows::{HeartbeatRow, RunEventRow, RunRow, convert_all, flag_value, json_value_text};
use super::{Backend, Db, Store};

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
/// Served by the partial index on the live runs' owner (`runs_live_owner`): a handful of rows per node.
const CANCEL_REQUESTED_RUNS: &str = concat!(
    "SELECT id FROM runs WHERE owner_node = $1 AND ",
    live!(),
    " AND cancel_requested = 1"
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
/// Like [`FAIL_ORPHANED_RUN`], with the outcome given: for an orphan whose final event was written before its node
/// died.
const SETTLE_ORPHANED_RUN: &str = concat!(
    "UPDATE runs SET status = $4, exit_code = $5, signal = $6, error = $7, finished_at = $8 WHERE id = $1 AND ",
    live!(),
    " AND (owner_node = $2 OR heartbeat_at < $3)"
);
/// The run's last event, when it is a status event (its data is small JSON, never in a segment file).
const LAST_STATUS_EVENT: &str =
    "SELECT kind, data FROM run_events WHERE run_id = $1 ORDER BY seq DESC LIMIT 1";
const LIVE_RUNS_OF_ENVIRONMENT: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE environment_id = $1 AND ",
    live!(),
    " ORDER BY created_at, id"
);

/// Whether a run still exists (the output sweep).
/// Every run id, to tell which segment files have lost their run: one query at start-up, not one per file.
const ALL_RUN_IDS: &str = "SELECT id FROM runs";
/// Serializes appenders to one run on PostgreSQL, where concurrent transactions would otherwise both read the same
/// `MAX(seq)`. The lock is held until commit, so the next appender's insert sees this one's events.
const LOCK_RUN_POSTGRES: &str = "SELECT id FROM runs WHERE id = $1 FOR UPDATE";
const LIST_EVENTS: &str = "SELECT run_id, seq, at, kind, data, output_offset, output_length FROM run_events \
     WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
/// Parameters of one inserted event row (after the shared `$1`, the run id).
const EVENT_PARAMS: usize = 6;
/// Rows per multi-row event insert: 6 parameters each stays far below both backends' parameter limits (SQLite 32766,
/// PostgreSQL 65535), while a typical output burst still goes in one statement.
const EVENT_INSERT_CHUNK: usize = 200;
/// What `data` holds for an output row whose text is in a segment file: the text is put back as `text` on listing.
const SEGMENT_DATA: &str = "{}";

/// Inserts `$rows` (a slice of [`EventRow`]) after the run's last seq with one statement on `$executor`, and
/// evaluates to the seqs given, or a `RowNotFound` error when the run does not exist.
macro_rules! insert_event_rows {
    ($executor:expr, $run_key:expr, $rows:expr) => {{
        let rows: &[EventRow] = $rows;
        let mut insert = sqlx::query_scalar::<_, i64>(AssertSqlSafe(insert_events_sql(rows.len())))
            .bind($run_key);
        for (position, row) in (1_i64..).zip(rows) {
            insert = insert
                .bind(position)
                .bind(row.at)
                .bind(row.kind)
                .bind(row.data.as_deref().unwrap_or(SEGMENT_DATA))
                .bind(row.offset)
                .bind(row.length);
        }
        let seqs: Vec<i64> = insert.fetch_all($executor).await?;
        if seqs.len() != rows.len() {
            return Err(StoreError::Database(sqlx::Error::RowNotFound));
        }
        seqs
    }};
}

/// The insert of one run, `$run` a `&Run` and `$command` its argv as JSON text, ready to execute on a pool or in a
/// transaction.
macro_rules! insert_run_query {
    ($run:expr, $command:expr) => {{
        let run: &Run = $run;
        sqlx::query(INSERT_RUN)
            .bind(run.id.to_string())
            .bind(run.company_id.to_string())
            .bind(run.environment_id.to_string())
            .bind(run.lease_id.map(|id| id.to_string()))
            .bind(run.status.as_str())
            .bind($command)
            .bind(run.exit_code.map(i64::from))
            .bind(run.signal.as_deref())
            .bind(run.error.as_deref())
            .bind(&run.owner_node)
            .bind(run.created_at.unix_millis())
            .bind(run.started_at.map(Timestamp::unix_millis))
            .bind(run.finished_at.map(Timestamp::unix_millis))
            .bind(run.heartbeat_at.unix_millis())
            .bind(flag_value(run.cancel_requested))
    }};
}

// === impl Store ===

impl Store {
    pub async fn insert_run(&self, run: &Run) -> Result<(), StoreError> {
        let command = json_value_text(&run.command)?;
        on_pool!(&self.db, |pool| {
            insert_run_query!(run, &command).execute(pool).await?;
        });
        Ok(())
    }

    /// Inserts a new run together with its first events (`queued`), in one transaction: a crash can leave neither
    /// or both, never a run whose log does not start where every run's does. The events get seqs 1, 2, ...; their
    /// data is stored inline (never in a segment file: these are status events, not output). Returns them as
    /// stored.
    pub async fn insert_run_with_events(
        &self,
        run: &Run,
        events: Vec<NewRunEvent>,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let command = json_value_text(&run.command)?;
        let rows = events
            .iter()
            .map(|event| EventRow::new(event, None))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let run_key = run.id.to_string();
        let seqs: Vec<i64> = in_write_tx!(&self.db, |tx| {
            insert_run_query!(run, &command).execute(&mut *tx).await?;
            // Nobody else can append to a run before this transaction commits (the row is not visible yet), so
            // no lock is needed for the seqs to be dense.
            let mut seqs = Vec::with_capacity(rows.len());
            for chunk in rows.chunks(EVENT_INSERT_CHUNK) {
                seqs.extend(insert_event_rows!(&mut *tx, &run_key, chunk));
            }
            seqs
        });
        let first = seqs.iter().copied().min().unwrap_or(1);
        Ok(events
            .into_iter()
            .zip(first..)
            .map(|(event, seq)| RunEvent {
                run_id: run.id,
                seq,
                at: event.at,
                kind: event.kind,
                data: event.data,
            })
            .collect())
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

    /// The live runs of `owner_node` whose cancellation was requested: a read only, cheap enough to poll several times
    /// a second, so that a cancel made through another replica reaches the owner well before its next heartbeat.
    pub async fn cancel_requested_runs(&self, owner_node: &str) -> Result<Vec<RunId>, StoreError> {
        let ids: Vec<String> = on_pool!(&self.db, |pool| {
            sqlx::query_scalar(CANCEL_REQUESTED_RUNS)
                .bind(owner_node)
                .fetch_all(pool)
                .await?
        });
        ids.into_iter()
            .map(|id| {
                id.parse().map_err(|_| StoreError::CorruptRow {
                    table: "runs",
                    column: "id",
                })
            })
            .collect()
    }

    /// Sets cancel_requested on a live run and returns the run as stored after the update; a final run is returned
    /// unchanged, a missing one is `None`. The owner picks the request up by polling [`Store::cancel_requested_runs`] (or
    /// with its next heartbeat).
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

    /// Settles a live run that is an orphan by the rules of [`Store::orphaned_runs`] with the outcome `run` carries
    /// (status, exit_code, signal, error, finished_at): for a run whose node died after writing its final event and
    /// before saving the row, so the row says what the event already told followers. One conditional statement, like
    /// [`Store::fail_orphaned_run`]. Returns whether this call changed the row.
    pub async fn settle_orphaned_run(
        &self,
        run: &Run,
        owner_node: &str,
        stale_before: Timestamp,
    ) -> Result<bool, StoreError> {
        let updated = on_pool!(&self.db, |pool| {
            sqlx::query(SETTLE_ORPHANED_RUN)
                .bind(run.id.to_string())
                .bind(owner_node)
                .bind(stale_before.unix_millis())
                .bind(run.status.as_str())
                .bind(run.exit_code.map(i64::from))
                .bind(run.signal.as_deref())
                .bind(run.error.as_deref())
                .bind(run.finished_at.map(Timestamp::unix_millis))
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// The data of the run's last event if that is a `status` event, else `None`: whether a run's final event was
    /// written (it is always the last one).
    pub async fn last_status_event(&self, run_id: RunId) -> Result<Option<Value>, StoreError> {
        let row: Option<(String, String)> = on_pool!(&self.db, |pool| {
            sqlx::query_as(LAST_STATUS_EVENT)
                .bind(run_id.to_string())
                .fetch_optional(pool)
                .await?
        });
        match row {
            Some((kind, data)) if kind == EventKind::Status.as_str() => serde_json::from_str(&data)
                .map(Some)
                .map_err(|_| StoreError::CorruptRow {
                    table: "run_events",
                    column: "data",
                }),
            _ => Ok(None),
        }
    }

    /// Appends `events` with the next dense seqs (max + 1, max + 2, ...) atomically and returns them as stored:
    /// [`Store::stage_events`], then [`Store::insert_staged`].
    pub async fn append_events(
        &self,
        run_id: RunId,
        events: Vec<NewRunEvent>,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let staged = self.stage_events(run_id, events).await?;
        self.insert_staged(staged).await
    }

    /// The first half of appending events: writes the text of output events to the run's segment file, when the
    /// database has one (no JSON escaping, no database pages for the bytes). Their rows are not written yet, so
    /// nothing points at the bytes until [`Store::insert_staged`] succeeds; a caller may stage the next batch while
    /// the previous one is being inserted, so file and database work overlap.
    pub async fn stage_events(
        &self,
        run_id: RunId,
        events: Vec<NewRunEvent>,
    ) -> Result<StagedEvents, StoreError> {
        let (events, segments) = match &self.output {
            Some(output) if events.iter().any(|event| output_text(event).is_some()) => {
                append_output(output.clone(), run_id, events).await?
            }
            _ => {
                let none = vec![None; events.len()];
                (events, none)
            }
        };
        Ok(StagedEvents {
            run_id,
            events,
            segments,
        })
    }

    /// The second half of appending events: inserts staged events with the next dense seqs, atomically, and returns
    /// them as stored.
    ///
    /// Safe with concurrent appenders to the same run, on any replica. Each insert statement reads the last seq and
    /// inserts after it; on SQLite one statement holds the database's write lock throughout (and a batch of several
    /// statements runs under `BEGIN IMMEDIATE`), on PostgreSQL the transaction first locks the run's row. Output is
    /// appended for every chunk a command writes, so a typical batch is a single statement: one round trip to
    /// SQLite's connection thread instead of a transaction's five. A missing run is a `Database(RowNotFound)` error:
    /// events must not be dropped silently.
    pub async fn insert_staged(&self, staged: StagedEvents) -> Result<Vec<RunEvent>, StoreError> {
        let StagedEvents {
            run_id,
            events,
            segments,
        } = staged;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let rows = events
            .iter()
            .zip(&segments)
            .map(|(event, segment)| EventRow::new(event, *segment))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let run_key = run_id.to_string();
        let seqs: Vec<i64> = match &self.db {
            Db::Sqlite(pool) if rows.len() <= EVENT_INSERT_CHUNK => {
                insert_event_rows!(pool, &run_key, &rows)
            }
            _ => in_write_tx!(&self.db, |tx| {
                if self.backend() == Backend::Postgres {
                    let locked: Option<String> = sqlx::query_scalar(LOCK_RUN_POSTGRES)
                        .bind(&run_key)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if locked.is_none() {
                        return Err(StoreError::Database(sqlx::Error::RowNotFound));
                    }
                }
                let mut seqs = Vec::with_capacity(rows.len());
                for chunk in rows.chunks(EVENT_INSERT_CHUNK) {
                    seqs.extend(insert_event_rows!(&mut *tx, &run_key, chunk));
                }
                seqs
            }),
        };
        // The seqs are consecutive: the smallest is the first event's.
        let first = seqs.iter().copied().min().unwrap_or(1);
        // Moved, not cloned: output events are large.
        Ok(events
            .into_iter()
            .zip(first..)
            .map(|(event, seq)| RunEvent {
                run_id,
                seq,
                at: event.at,
                kind: event.kind,
                data: event.data,
            })
            .collect())
    }

    /// The run's events with seq > `after`, in seq order, at most `limit`. Output kept in a segment file is read back
    /// into its event's `{"text": ...}`.
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
        let segments = rows
            .iter()
            .map(RunEventRow::segment)
            .collect::<Result<Vec<_>, StoreError>>()?;
        let wanted: Vec<Segment> = segments.iter().flatten().copied().collect();
        if wanted.is_empty() {
            return rows.into_iter().map(|row| row.into_event(None)).collect();
        }
        // Rows point at segments only where the database has a segment directory; anything else was tampered with.
        let output = self.output.clone().ok_or(StoreError::CorruptRow {
            table: "run_events",
            column: "output_offset",
        })?;
        let read = tokio::task::spawn_blocking(move || output.read(run_id, &wanted))
            .await
            .map_err(io::Error::other)
            .and_then(|read| read)
            .map_err(output_unavailable)?;
        let mut texts = read.into_iter();
        rows.into_iter()
            .zip(segments)
            .map(|(row, segment)| {
                let text = match segment {
                    None => None,
                    Some(segment) => {
                        let bytes = texts.next().unwrap_or_default();
                        if (bytes.len() as u64) < segment.length {
                            tracing::warn!(
                                run.id = %run_id,
                                seq = row.seq(),
                                expected = segment.length,
                                found = bytes.len(),
                                "an output event's bytes are missing from its segment file (lost in a crash?); \
                                 listing what is left"
                            );
                        }
                        // Segments hold whole characters; only a damaged file needs the lossy decode.
                        Some(String::from_utf8(bytes).unwrap_or_else(|error| {
                            String::from_utf8_lossy(error.as_bytes()).into_owned()
                        }))
                    }
                };
                row.into_event(text)
            })
            .collect()
    }

    /// Prepares the output segment directory and removes the segment files of runs whose rows are gone (deleting a
    /// company cascades to its runs and their events): segment files live exactly as long as their run's rows.
    pub(super) async fn open_output(&self) -> Result<(), StoreError> {
        let Some(output) = self.output.clone() else {
            return Ok(());
        };
        let listing = output.clone();
        let runs = tokio::task::spawn_blocking(move || {
            listing.create_dir()?;
            listing.runs()
        })
        .await
        .map_err(io::Error::other)
        .and_then(|runs| runs)
        .map_err(output_unavailable)?;
        if runs.is_empty() {
            return Ok(());
        }
        let known: Vec<String> = on_pool!(&self.db, |pool| {
            sqlx::query_scalar(ALL_RUN_IDS).fetch_all(pool).await?
        });
        let known: std::collections::HashSet<String> = known.into_iter().collect();
        let orphans: Vec<RunId> = runs
            .into_iter()
            .filter(|run_id| !known.contains(&run_id.to_string()))
            .collect();
        if orphans.is_empty() {
            return Ok(());
        }
        let count = orphans.len();
        let dir = output.dir().to_path_buf();
        tokio::task::spawn_blocking(move || orphans.iter().try_for_each(|run| output.remove(*run)))
            .await
            .map_err(io::Error::other)
            .and_then(|removed| removed)
            .map_err(output_unavailable)?;
        tracing::info!(count, dir = %dir.display(), "removed the output of deleted runs");
        Ok(())
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

/// The text of an output event that can live in a segment file: a stdout/stderr event whose data is exactly
/// `{"text": <string>}`, the shape listing puts back.
fn output_text(event: &NewRunEvent) -> Option<&str> {
    if !matches!(event.kind, EventKind::Stdout | EventKind::Stderr) {
        return None;
    }
    match &event.data {
        Value::Object(map) if map.len() == 1 => map.get("text").and_then(Value::as_str),
        _ => None,
    }
}

/// Appends the output texts of `events` to the run's segment file in one write (off the async threads) and returns
/// the events with each one's segment.
async fn append_output(
    output: OutputSegments,
    run_id: RunId,
    events: Vec<NewRunEvent>,
) -> Result<(Vec<NewRunEvent>, Vec<Option<Segment>>), StoreError> {
    let started = std::time::Instant::now();
    let (events, appended) = tokio::task::spawn_blocking(move || {
        let pieces: Vec<&[u8]> = events
            .iter()
            .filter_map(output_text)
            .map(str::as_bytes)
            .collect();
        let appended = output.append(run_id, &pieces);
        (events, appended)
    })
    .await
    .map_err(|error| output_unavailable(io::Error::other(error)))?;
    let mut appended = appended.map_err(output_unavailable)?.into_iter();
    let segments = events
        .iter()
        .map(|event| output_text(event).and_then(|_| appended.next()))
        .collect();
    tracing::trace!(run.id = %run_id, elapsed_us = started.elapsed().as_micros(), "output appended");
    Ok((events, segments))
}

/// Events whose output bytes are in the run's segment file and whose rows are still to be inserted
/// ([`Store::stage_events`]).
#[derive(Debug)]
pub struct StagedEvents {
    run_id: RunId,
    events: Vec<NewRunEvent>,
    /// Where each event's text is, for output kept in a segment file.
    segments: Vec<Option<Segment>>,
}

impl StagedEvents {
    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Adds `later` (staged after these events) to this batch, so both go in with one insert. `later` must be of the
    /// same run; events of another run are given back.
    pub fn absorb(&mut self, later: StagedEvents) -> Result<(), StagedEvents> {
        if later.run_id != self.run_id {
            return Err(later);
        }
        self.events.extend(later.events);
        self.segments.extend(later.segments);
        Ok(())
    }
}

/// One event as its row is inserted.
struct EventRow {
    at: i64,
    kind: &'static str,
    /// The JSON text of `data`; `None` for output in a segment file ([`SEGMENT_DATA`]).
    data: Option<String>,
    offset: Option<i64>,
    length: Option<i64>,
}

impl EventRow {
    fn new(event: &NewRunEvent, segment: Option<Segment>) -> Result<EventRow, StoreError> {
        let too_large =
            || StoreError::Database(sqlx::Error::Encode("output segment too large".into()));
        let (data, offset, length) = match segment {
            None => (Some(json_value_text(&event.data)?), None, None),
            Some(segment) => (
                None,
                Some(i64::try_from(segment.offset).map_err(|_| too_large())?),
                Some(i64::try_from(segment.length).map_err(|_| too_large())?),
            ),
        };
        Ok(EventRow {
            at: event.at.unix_millis(),
            kind: event.kind.as_str(),
            data,
            offset,
            length,
        })
    }
}

/// The segment files are part of the database's storage: failing to use them is the database being unavailable.
fn output_unavailable(error: io::Error) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Io(error))
}

/// The insert of `rows` events after the run's last seq, in the `$N` syntax both backends accept: `$1` is the run id,
/// then each row's position in the batch (1, 2, ...), at, kind, data, output_offset and output_length. The last seq
/// is read by the statement itself, and joining `runs` inserts nothing for a missing run. Only the row count varies,
/// so the text never contains a value.
fn insert_events_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO run_events (run_id, seq, at, kind, data, output_offset, output_length) \
         SELECT runs.id, last.seq + batch.column1, batch.column2, batch.column3, batch.column4, batch.column5, \
         batch.column6 FROM runs, (SELECT COALESCE(MAX(seq), 0) AS seq FROM run_events WHERE run_id = $1) AS last, \
         (VALUES ",
    );
    for row in 0..rows {
        let first = row * EVENT_PARAMS + 2;
        sql.push_str(if row > 0 { ", (" } else { "(" });
        for param in 0..EVENT_PARAMS {
            let separator = if param > 0 { ", " } else { "" };
            // Writing to a String cannot fail.
            let _ = write!(sql, "{separator}${}", first + param);
        }
        sql.push(')');
    }
    sql.push_str(") AS batch WHERE runs.id = $1 RETURNING seq");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_inserts_number_their_placeholders_in_order() {
        let sql = insert_events_sql(2);
        assert!(
            sql.contains(
                "(VALUES ($2, $3, $4, $5, $6, $7), ($8, $9, $10, $11, $12, $13)) AS batch"
            ),
            "{sql}"
        );
        assert!(sql.ends_with("WHERE runs.id = $1 RETURNING seq"), "{sql}");
    }

    #[test]
    fn only_plain_output_text_goes_to_segments() {
        let event = |kind, data| NewRunEvent {
            at: Timestamp::from_unix_millis(0),
            kind,
            data,
        };
        let text = serde_json::json!({"text": "hi"});
        assert_eq!(
            output_text(&event(EventKind::Stdout, text.clone())),
            Some("hi")
        );
        assert_eq!(
            output_text(&event(EventKind::Stderr, text.clone())),
            Some("hi")
        );
        assert_eq!(output_text(&event(EventKind::Agent, text)), None);
        let extra = serde_json::json!({"text": "hi", "more": 1});
        assert_eq!(output_text(&event(EventKind::Stdout, extra)), None);
        let not_text = serde_json::json!({"text": 1});
        assert_eq!(output_text(&event(EventKind::Stdout, not_text)), None);
    }
}
