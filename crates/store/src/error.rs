//! The store's error type.
//!
//! Messages are safe to show and log: they never contain SQL or stored values (a corrupt row names its column, not
//! its content). The underlying `sqlx` error, when there is one, is kept as the `source` for operators' logs.

use std::fmt;

use berth_core::ErrorKind;
use sqlx::error::DatabaseError;
use sqlx::migrate::MigrateError;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is too busy: connection refused or lost, pool timeout, SQLite lock timeout,
    /// IO failure. Retrying later may work.
    #[error("the database is unavailable")]
    Unavailable(#[source] sqlx::Error),

    /// The write conflicts with a row that already exists.
    #[error("{0}")]
    Conflict(ConflictKind),

    /// An optimistic update lost the race: the stored revision is not the one the caller read.
    #[error("the row was changed concurrently; read it again and retry")]
    ConcurrentUpdate,

    /// A stored row holds a value the domain model rejects (an unknown enum variant, a malformed id or JSON). Only
    /// the location is reported: the value might be sensitive.
    #[error("a stored `{table}` row holds an invalid `{column}` value")]
    CorruptRow {
        table: &'static str,
        column: &'static str,
    },

    /// The embedded migrations could not be applied (a failing statement, or a database whose applied migrations
    /// do not match this binary's).
    #[error("applying the database migrations failed")]
    Migration(#[source] MigrateError),

    /// Any other database failure: most likely a bug.
    #[error("the database reported an error")]
    Database(#[source] sqlx::Error),
}

/// Which uniqueness rule a write ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConflictKind {
    /// A company has at most one environment with the `local` driver.
    LocalEnvironmentExists,
    /// Company names are unique.
    CompanyNameTaken,
    /// An environment holds at most one reusable (`reuse_by_environment`) lease at a time — active, or with its
    /// cleanup pending: another run (or its cleanup) holds it.
    ReusableLeaseHeld,
    /// An environment that is its company's default environment cannot be deleted (the company's foreign key to it).
    EnvironmentIsDefault,
    /// Any other unique constraint (a duplicate id or token hash).
    Other,
}

// === impl StoreError ===

impl StoreError {
    /// The stable, snake_case code of this error: part of the API contract.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "database_unavailable",
            StoreError::Conflict(ConflictKind::LocalEnvironmentExists) => {
                "local_environment_exists"
            }
            StoreError::Conflict(ConflictKind::CompanyNameTaken) => "company_name_taken",
            StoreError::Conflict(ConflictKind::ReusableLeaseHeld) => "reusable_lease_held",
            StoreError::Conflict(ConflictKind::EnvironmentIsDefault) => "environment_is_default",
            StoreError::Conflict(ConflictKind::Other) => "conflict",
            StoreError::ConcurrentUpdate => "concurrent_update",
            StoreError::CorruptRow { .. } => "corrupt_row",
            StoreError::Migration(_) => "migration_failed",
            StoreError::Database(_) => "database_error",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Unavailable(_) => ErrorKind::Unavailable,
            StoreError::Conflict(_) | StoreError::ConcurrentUpdate => ErrorKind::Conflict,
            StoreError::CorruptRow { .. } | StoreError::Migration(_) | StoreError::Database(_) => {
                ErrorKind::Internal
            }
        }
    }

    /// A migration failure, unless the database was simply unreachable while migrating.
    pub(super) fn from_migrate(err: MigrateError) -> Self {
        match err {
            MigrateError::Execute(err) if is_unavailable(&err) => StoreError::Unavailable(err),
            err => StoreError::Migration(err),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    /// Classifies a database error that no call site handled specifically. A unique violation becomes
    /// `Conflict(Other)`; call sites that know which rule they may break use [`conflict_as`] first.
    fn from(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            return StoreError::Unavailable(err);
        }
        if err
            .as_database_error()
            .is_some_and(|db| db.is_unique_violation())
        {
            return StoreError::Conflict(ConflictKind::Other);
        }
        match err {
            sqlx::Error::Migrate(err) => StoreError::from_migrate(*err),
            err => StoreError::Database(err),
        }
    }
}

// === impl ConflictKind ===

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConflictKind::LocalEnvironmentExists => "the company already has a local environment",
            ConflictKind::CompanyNameTaken => "a company with this name already exists",
            ConflictKind::ReusableLeaseHeld => "another run holds the environment's reusable lease",
            ConflictKind::EnvironmentIsDefault => {
                "the environment is its company's default environment: clear or change the company's \
                 defaultEnvironmentId first"
            }
            ConflictKind::Other => "the row conflicts with an existing one",
        })
    }
}

/// Maps a violation of the unique constraint `constraint` to `Conflict(kind)`; any other error goes through the
/// generic classification.
///
/// PostgreSQL names the violated constraint. SQLite does not, but it reports primary-key violations with their own
/// extended code, and each table using this has exactly one unique rule besides its primary key.
pub(super) fn conflict_as(
    constraint: &'static str,
    kind: ConflictKind,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |err| {
        let matches = err.as_database_error().is_some_and(|db| {
            db.is_unique_violation()
                && match db.constraint() {
                    Some(name) => name == constraint,
                    None => db.code().as_deref() != Some(SQLITE_CONSTRAINT_PRIMARYKEY),
                }
        });
        if matches {
            StoreError::Conflict(kind)
        } else {
            StoreError::from(err)
        }
    }
}

/// SQLite's extended result code for a primary-key violation, as `DatabaseError::code` spells it.
const SQLITE_CONSTRAINT_PRIMARYKEY: &str = "1555";

/// Whether `err` means "the database cannot serve us right now" rather than "this request is wrong".
fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => is_unavailable_database_error(db.as_ref()),
        _ => false,
    }
}

fn is_unavailable_database_error(db: &dyn DatabaseError) -> bool {
    let Some(code) = db.code() else {
        return false;
    };
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        // SQLSTATE classes: 08 connection exception, 53 insufficient resources (too many connections, disk full);
        // 57P01..57P03: the server is shutting down, crashed or still starting.
        return code.starts_with("08")
            || code.starts_with("53")
            || matches!(&*code, "57P01" | "57P02" | "57P03");
    }
    // SQLite reports extended result codes; the primary code is the low byte.
    // 5 BUSY and 6 LOCKED (lock not obtained within the busy timeout), 10 IOERR, 13 FULL, 14 CANTOPEN.
    code.parse::<i32>()
        .is_ok_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13 | 14))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_kinds_are_stable() {
        let cases = [
            (
                StoreError::Unavailable(sqlx::Error::PoolTimedOut),
                "database_unavailable",
                ErrorKind::Unavailable,
            ),
            (
                StoreError::Conflict(ConflictKind::LocalEnvironmentExists),
                "local_environment_exists",
                ErrorKind::Conflict,
            ),
            (
                StoreError::Conflict(ConflictKind::CompanyNameTaken),
                "company_name_taken",
                ErrorKind::Conflict,
            ),
            (
                StoreError::Conflict(ConflictKind::ReusableLeaseHeld),
                "reusable_lease_held",
                ErrorKind::Conflict,
            ),
            (
                StoreError::Conflict(ConflictKind::EnvironmentIsDefault),
                "environment_is_default",
                ErrorKind::Conflict,
            ),
            (
                StoreError::Conflict(ConflictKind::Other),
                "conflict",
                ErrorKind::Conflict,
            ),
            (
                StoreError::ConcurrentUpdate,
                "concurrent_update",
                ErrorKind::Conflict,
            ),
            (
                StoreError::CorruptRow {
                    table: "environments",
                    column: "driver",
                },
                "corrupt_row",
                ErrorKind::Internal,
            ),
            (
                StoreError::Database(sqlx::Error::RowNotFound),
                "database_error",
                ErrorKind::Internal,
            ),
        ];
        for (err, code, kind) in cases {
            assert_eq!(err.code(), code);
            assert_eq!(err.kind(), kind);
        }
    }

    #[test]
    fn transport_failures_are_unavailable() {
        let err = StoreError::from(sqlx::Error::PoolTimedOut);
        assert_eq!(err.code(), "database_unavailable");
        let err = StoreError::from(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(err.code(), "database_unavailable");
        let err = StoreError::from(sqlx::Error::RowNotFound);
        assert_eq!(err.code(), "database_error");
    }

    #[test]
    fn corrupt_row_messages_name_the_column_only() {
        let err = StoreError::CorruptRow {
            table: "environments",
            column: "config",
        };
        assert_eq!(
            err.to_string(),
            "a stored `environments` row holds an invalid `config` value"
        );
    }
}
