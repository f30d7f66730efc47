//! The persistence layer: one [`Store`] over SQLite or PostgreSQL.
//!
//! # Design
//!
//! The backend is chosen at runtime from the database URL and held in a private `enum Db`. Every query is a runtime
//! `sqlx::query*` call on a `&'static str` constant; the SQL text is shared by both backends wherever the dialects
//! agree (SQLite accepts PostgreSQL's `$N` placeholders), and the `on_pool!` and `in_write_tx!` macros run one
//! query body against whichever pool is active, so no method is written twice. `sqlx::Any` is deliberately not used:
//! it cannot decode several types and does not translate SQL.
//!
//! Rows are decoded into `#[derive(sqlx::FromRow)]` structs of plain strings and integers (see `rows`), then converted
//! into `berth_core` types through their `FromStr` impls. A value that does not parse is a [`StoreError::CorruptRow`]
//! naming the column, never the value.
//!
//! Both schemas live in `migrations/{sqlite,postgres}` with identical version numbers, are embedded at compile time
//! and applied by [`Store::connect`].
//!
//! # Concurrency
//!
//! Invariants that concurrent requests could break are enforced by the database: one local environment per company is
//! a partial unique index, "get or create" is `INSERT .. ON CONFLICT DO NOTHING` followed by a `SELECT`, and
//! environment updates are conditional on the stored revision. On SQLite, read-modify-write transactions start with
//! `BEGIN IMMEDIATE` so that they take the write lock up front: a deferred transaction that reads and then writes can
//! fail with `SQLITE_BUSY` without ever waiting on the busy timeout.
//!
//! Several server replicas may share one PostgreSQL database, so nothing relies on in-process locks. Run and lease
//! state changes are single conditional statements (`UPDATE .. WHERE status = <expected>`) that exactly one concurrent
//! caller wins, and appending run events reads the last seq inside the insert statement itself, which on PostgreSQL
//! runs after locking the run's row (`SELECT .. FOR UPDATE`), so seqs stay dense.
//!
//! # Output
//!
//! On a SQLite file, the bytes of stdout/stderr events live in per-run segment files beside the database (see
//! `output`), and their rows point at them; listing events puts the text back, so callers see one event shape on
//! both backends.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use berth_core::environment::{Driver, EnvironmentStatus};
use berth_core::ids::{CompanyId, EnvironmentId, SecretId};
use berth_core::time::Timestamp;

pub use self::error::{ConflictKind, StoreError};
use self::output::OutputSegments;
pub use self::runs::StagedEvents;

/// Runs `$body` with `$pool` bound to the active pool (`&SqlitePool` or `&PgPool`).
///
/// The body is type-checked once per backend, so it must only use what both support; in exchange each query is
/// written once.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::Db::Sqlite($pool) => $body,
            $crate::Db::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` inside a write transaction bound to `$tx`, then commits. `?` inside the body returns early and the
/// dropped transaction rolls back.
///
/// SQLite starts the transaction with `BEGIN IMMEDIATE` (take the write lock now, waiting up to the busy timeout),
/// because a deferred transaction that reads before it writes cannot wait for the lock and fails instead.
macro_rules! in_write_tx {
    ($db:expr, |$tx:ident| $body:expr) => {
        match $db {
            $crate::Db::Sqlite(pool) => {
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let output = $body;
                $tx.commit().await?;
                output
            }
            $crate::Db::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                let output = $body;
                $tx.commit().await?;
                output
            }
        }
    };
}

mod activity;
mod companies;
mod environments;
mod error;
mod leases;
mod nonces;
mod output;
mod rows;
mod runs;
mod secrets;

/// The SQLite schema, embedded at compile time.
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../../migrations/sqlite");
/// The PostgreSQL schema, embedded at compile time. Same version numbers as [`SQLITE_MIGRATOR`].
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");

/// SQLite allows one writer at a time, so a large pool only adds lock contention; a few connections still let reads
/// proceed alongside a write (WAL).
const SQLITE_MAX_CONNECTIONS: u32 = 8;
const POSTGRES_MAX_CONNECTIONS: u32 = 16;
/// How long a writer waits for SQLite's write lock before giving up with `database_unavailable`.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a pooled connection (which includes connecting) before reporting the database unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The berth database: companies, keys, environments, leases, runs and their events, the activity log and encrypted
/// secrets.
///
/// Cheap to clone: clones share one connection pool.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    /// Where output bytes go instead of `run_events.data`: set for a SQLite database file, `None` for PostgreSQL
    /// (replicas must read each other's runs) and in-memory SQLite (nothing to keep them beside).
    output: Option<OutputSegments>,
    /// The SQLite database file, when there is one.
    file: Option<PathBuf>,
}

/// Which database a [`Store`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Narrows [`Store::list_environments`]; `None` fields match everything.
#[derive(Clone, Debug, Default)]
pub struct EnvironmentFilter {
    pub status: Option<EnvironmentStatus>,
    pub driver: Option<Driver>,
}

/// An entry to append to the activity log.
#[derive(Clone, Debug)]
pub struct NewActivity {
    /// `None` for events that belong to no company (such as instance administration).
    pub company_id: Option<CompanyId>,
    pub actor: String,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub details: serde_json::Value,
}

/// An entry of the activity log as stored.
#[derive(Clone, Debug)]
pub struct ActivityEntry {
    /// Increases with every entry: the log's order.
    pub id: i64,
    pub company_id: Option<CompanyId>,
    pub actor: String,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub details: serde_json::Value,
    pub created_at: Timestamp,
}

/// An encrypted secret. The store never sees plaintext: encryption happens before `insert_secret` and decryption
/// after `get_secret`.
#[derive(Clone, Debug)]
pub struct StoredSecret {
    pub id: SecretId,
    pub company_id: CompanyId,
    /// The environment whose config references the secret, if any.
    pub environment_id: Option<EnvironmentId>,
    pub name: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at: Timestamp,
}

/// The active connection pool. Private: callers see [`Backend`] only.
#[derive(Clone, Debug)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

// === impl Store ===

impl Store {
    /// Connects to `url` and applies pending migrations.
    ///
    /// Accepts `sqlite://path` (the file and its parent directory are created if missing), `sqlite::memory:` (one
    /// connection that is never recycled, since every SQLite connection to `:memory:` would otherwise see its own
    /// empty database), and `postgres://…` / `postgresql://…`.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let (db, file) = if url.starts_with("sqlite:") {
            let (pool, file) = connect_sqlite(url).await?;
            (Db::Sqlite(pool), file)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Db::Postgres(connect_postgres(url).await?), None)
        } else {
            // The URL itself stays out of the error: it may carry a password.
            return Err(StoreError::Database(sqlx::Error::Configuration(
                "unsupported database URL scheme: expected sqlite:, postgres: or postgresql:"
                    .into(),
            )));
        };
        let output = file.as_deref().map(OutputSegments::beside);
        let store = Store { db, output, file };
        store.migrate().await?;
        store.open_output().await?;
        Ok(store)
    }

    /// The SQLite database file (its output segments live beside it); `None` for PostgreSQL and in-memory SQLite.
    pub fn database_file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn backend(&self) -> Backend {
        match self.db {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// Checks that the database answers a trivial query (for readiness probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        const PING: &str = "SELECT 1";
        on_pool!(&self.db, |pool| {
            sqlx::query(PING).execute(pool).await?;
        });
        Ok(())
    }

    /// Closes every connection, waiting for checked-out ones to be returned. Later calls fail with
    /// `database_unavailable`.
    pub async fn close(&self) {
        on_pool!(&self.db, |pool| pool.close().await)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(pool) => SQLITE_MIGRATOR.run(pool).await,
            Db::Postgres(pool) => POSTGRES_MIGRATOR.run(pool).await,
        }
        .map_err(StoreError::from_migrate)
    }
}

/// The pool, and the database file (`None` in memory).
async fn connect_sqlite(url: &str) -> Result<(SqlitePool, Option<PathBuf>), StoreError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(StoreError::from)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true)
        // Safe with WAL: a power loss may lose the last commits but never corrupts the database.
        .synchronous(SqliteSynchronous::Normal);

    let pool_options = SqlitePoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
    let (pool_options, file) = if is_sqlite_memory_url(url) {
        // An in-memory database lives as long as its last connection: keep exactly one, forever.
        let pool_options = pool_options
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
        (pool_options, None)
    } else {
        create_parent_dir(options.get_filename()).await?;
        let file = options.get_filename().to_path_buf();
        make_database_files_private(&file).await?;
        (
            pool_options.max_connections(SQLITE_MAX_CONNECTIONS),
            Some(file),
        )
    };
    Ok((pool_options.connect_with(options).await?, file))
}

async fn connect_postgres(url: &str) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(PgPoolOptions::new()
        .max_connections(POSTGRES_MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await?)
}

/// The database holds every company's configs and runs: its file is created (or tightened) to mode 0600 before
/// SQLite opens it, and so are its `-wal` and `-shm` files when they exist. SQLite creates those two with the mode of
/// the database file, so a private database keeps them private.
async fn make_database_files_private(file: &Path) -> Result<(), StoreError> {
    let file = file.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&file)?;
        for suffix in ["", "-wal", "-shm"] {
            let path = PathBuf::from(format!("{}{suffix}", file.display()));
            match std::fs::metadata(&path) {
                Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the database file was readable by others; made it private (0600)");
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                }
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    })
    .await
    .map_err(|error| StoreError::Unavailable(sqlx::Error::Io(std::io::Error::other(error))))?
    .map_err(|error| StoreError::Unavailable(sqlx::Error::Io(error)))
}

/// Whether a SQLite URL names an in-memory database (`sqlite::memory:`, `sqlite://:memory:`, `?mode=memory`).
fn is_sqlite_memory_url(url: &str) -> bool {
    let (database, params) = url.split_once('?').unwrap_or((url, ""));
    database.ends_with(":memory:") || params.split('&').any(|param| param == "mode=memory")
}

/// Creates the directory that will hold the database file, so that a fresh data directory just works.
async fn create_parent_dir(file: &Path) -> Result<(), StoreError> {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => tokio::fs::create_dir_all(parent)
            .await
            .map_err(|err| StoreError::Unavailable(sqlx::Error::Io(err))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_urls_are_recognized() {
        assert!(is_sqlite_memory_url("sqlite::memory:"));
        assert!(is_sqlite_memory_url("sqlite://:memory:"));
        assert!(is_sqlite_memory_url("sqlite://db?mode=memory&cache=shared"));
        assert!(!is_sqlite_memory_url("sqlite:///var/lib/berth/berth.db"));
        assert!(!is_sqlite_memory_url("sqlite://memory.db"));
    }
}
