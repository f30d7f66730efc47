//! Throwaway databases for tests: a SQLite file in a temporary directory, or a fresh database on the PostgreSQL server
//! named by `BERTH_TEST_POSTGRES_URL`.
//!
//! PostgreSQL is never skipped silently: without the variable, [`TestDb::postgres`] panics and says how to get one.

#![allow(clippy::expect_used)] // Test fixtures: failing loudly with a message is the point.

use std::fmt;

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tempfile::TempDir;

use berth_store::{Backend, Store};

/// The variable holding a PostgreSQL *server* URL (its database is only used to create and drop test databases).
pub(crate) const POSTGRES_URL_VAR: &str = "BERTH_TEST_POSTGRES_URL";

/// A migrated, empty database and a [`Store`] connected to it. Dropping it removes the database; [`TestDb::cleanup`]
/// does the same without blocking and should end every test that did not panic.
pub(crate) struct TestDb {
    store: Store,
    url: String,
    owner: Owner,
}

/// What has to be removed when the test is over.
enum Owner {
    /// The directory holding the database file, deleted on drop.
    Sqlite { _dir: TempDir },
    Postgres {
        server_url: String,
        database: String,
        dropped: bool,
    },
}

impl TestDb {
    /// A fresh SQLite database file. It sits in a not-yet-existing subdirectory, which also checks that
    /// `Store::connect` creates it.
    pub(crate) async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let path = dir.path().join("data").join("berth.db");
        let url = format!("sqlite://{}", path.display());
        let store = Store::connect(&url)
            .await
            .expect("connect to a fresh SQLite database");
        TestDb {
            store,
            url,
            owner: Owner::Sqlite { _dir: dir },
        }
    }

    /// A fresh database `berth_test_<uuid>` on the server named by `BERTH_TEST_POSTGRES_URL`.
    ///
    /// # Panics
    ///
    /// If the variable is unset (so a missing PostgreSQL fails the suite instead of hiding half of it), or if the
    /// server cannot be reached.
    pub(crate) async fn postgres() -> TestDb {
        let Ok(server_url) = std::env::var(POSTGRES_URL_VAR) else {
            panic!(
                "{POSTGRES_URL_VAR} is not set: run the README test command, which starts PostgreSQL \
                 (or point {POSTGRES_URL_VAR} at a server, e.g. postgres://postgres@127.0.0.1:54329/postgres)"
            );
        };
        let database = format!("berth_test_{}", uuid::Uuid::new_v4().simple());
        admin_execute(&server_url, &format!("CREATE DATABASE {database}")).await;
        let url = with_database(&server_url, &database);
        let store = Store::connect(&url)
            .await
            .expect("connect to a fresh PostgreSQL database");
        TestDb {
            store,
            url,
            owner: Owner::Postgres {
                server_url,
                database,
                dropped: false,
            },
        }
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The database URL, for connecting another `Store` or starting a real `berth serve` against it.
    pub(crate) fn url(&self) -> String {
        self.url.clone()
    }

    pub(crate) fn backend(&self) -> Backend {
        self.store.backend()
    }

    /// Closes the store and removes the database.
    pub(crate) async fn cleanup(mut self) {
        self.store.close().await;
        if let Owner::Postgres {
            server_url,
            database,
            dropped,
        } = &mut self.owner
        {
            admin_execute(server_url, &drop_database_sql(database)).await;
            *dropped = true;
        }
    }
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

impl Drop for TestDb {
    /// Drops a PostgreSQL database that `cleanup` did not (the test panicked). Drop cannot await, so this runs on a
    /// thread with its own runtime; `WITH (FORCE)` disconnects the store's pool, which may still hold connections.
    fn drop(&mut self) {
        if let Owner::Postgres {
            server_url,
            database,
            dropped: false,
        } = &self.owner
        {
            let server_url = server_url.clone();
            let sql = drop_database_sql(database);
            let dropper = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    if let Ok(mut conn) = PgConnection::connect(&server_url).await {
                        let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await;
                        let _ = conn.close().await;
                    }
                });
            });
            // Best effort: a failed drop leaves a database behind on a throwaway server, nothing worse.
            let _ = dropper.join();
        }
    }
}

fn drop_database_sql(database: &str) -> String {
    format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")
}

/// Runs one statement on the server's admin database. `CREATE`/`DROP DATABASE` cannot take bind parameters, so the
/// SQL is built from a name this module generated (`berth_test_` + hex digits).
async fn admin_execute(server_url: &str, sql: &str) {
    let mut conn = PgConnection::connect(server_url)
        .await
        .unwrap_or_else(|err| panic!("connect to {POSTGRES_URL_VAR}: {err}"));
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("`{sql}` failed: {err}"));
    let _ = conn.close().await;
}

/// `server_url` with its database (path) replaced by `database`; any query string is kept.
fn with_database(server_url: &str, database: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server_url, None),
    };
    let authority_start = base.find("://").map_or(0, |at| at + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

#[test]
fn postgres_urls_get_their_database_replaced() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:54329/postgres", "x"),
        "postgres://postgres@127.0.0.1:54329/x"
    );
    assert_eq!(
        with_database("postgresql://u:p@h:1?sslmode=disable", "x"),
        "postgresql://u:p@h:1/x?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://h/db?a=b", "x"),
        "postgres://h/x?a=b"
    );
}
