//! The store parity suite: every test runs on SQLite and on PostgreSQL, and must behave identically on both.
//!
//! One module per subject; each lists its `async fn(&TestDb)` tests in `both_backends!`, which generates
//! `<name>::sqlite` and `<name>::postgres` tests, each on a fresh database. The fixtures shared between subjects are
//! here.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a failed unwrap is a failed assertion.

use serde_json::{Map, Value, json};
use sqlx::{Connection, PgConnection, SqliteConnection};

use berth_core::ErrorKind;
use berth_core::company::Company;
use berth_core::environment::{Driver, Environment, EnvironmentStatus};
use berth_core::ids::{CompanyId, EnvironmentId, LeaseId, RunId};
use berth_core::lease::{Lease, LeasePolicy, LeaseStatus};
use berth_core::run::{EventKind, NewRunEvent, Run, RunEvent, RunStatus};
use berth_core::time::Timestamp;
use berth_store::{Backend, ConflictKind, Store, StoreError};

use crate::support::db::TestDb;

/// For each named `async fn(&TestDb)`, a module with one test per backend.
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            use crate::support::db::TestDb;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let db = TestDb::sqlite().await;
                super::$name(&db).await;
                db.cleanup().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let db = TestDb::postgres().await;
                super::$name(&db).await;
                db.cleanup().await;
            }
        }
    )+};
}

mod activity;
mod companies;
mod connect;
mod environments;
mod events;
mod leases;
mod migrations;
mod nonces;
mod runs;
mod secrets;

// === fixtures ===

fn at(millis: i64) -> Timestamp {
    Timestamp::from_unix_millis(millis)
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn company(name: &str, created_at: i64) -> Company {
    Company {
        id: CompanyId::new(),
        name: name.to_owned(),
        created_at: at(created_at),
        default_environment_id: None,
    }
}

async fn new_company(store: &Store, name: &str) -> Company {
    let company = company(name, 1_000);
    store.insert_company(&company).await.unwrap();
    company
}

fn environment(company_id: CompanyId, name: &str, driver: Driver, updated_at: i64) -> Environment {
    Environment {
        id: EnvironmentId::new(),
        company_id,
        name: name.to_owned(),
        description: Some(format!("{name} description")),
        driver,
        status: EnvironmentStatus::Active,
        config: object(
            json!({"host": "build.example", "port": 22, "nested": {"list": [1, "two", null]}}),
        ),
        metadata: Some(object(json!({"team": "infra", "unicode": "é ✓"}))),
        created_at: at(500),
        updated_at: at(updated_at),
        revision: 0,
    }
}

fn lease(environment: &Environment, status: LeaseStatus, last_used_at: i64) -> Lease {
    Lease {
        id: LeaseId::new(),
        company_id: environment.company_id,
        environment_id: environment.id,
        run_id: None,
        status,
        lease_policy: LeasePolicy::Ephemeral,
        driver: environment.driver,
        provider: None,
        provider_lease_id: None,
        acquired_at: at(100),
        last_used_at: at(last_used_at),
        expires_at: None,
        released_at: None,
        failure_reason: None,
        cleanup_status: None,
        metadata: None,
        acquired_config: None,
    }
}

fn run(company_id: CompanyId, status: RunStatus, created_at: i64) -> Run {
    Run {
        id: RunId::new(),
        company_id,
        environment_id: EnvironmentId::new(),
        lease_id: None,
        status,
        command: vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "echo \"$1\"; exit 3".to_owned(),
        ],
        exit_code: None,
        signal: None,
        error: None,
        owner_node: "node-a".to_owned(),
        created_at: at(created_at),
        started_at: None,
        finished_at: None,
        heartbeat_at: at(created_at),
        cancel_requested: false,
    }
}

/// Inserts every run.
async fn insert_runs(store: &Store, runs: &[&Run]) {
    for run in runs {
        store.insert_run(run).await.unwrap();
    }
}

fn event(kind: EventKind, data: Value) -> NewRunEvent {
    NewRunEvent {
        at: at(7_000),
        kind,
        data,
    }
}

/// `sent` as the first events of `run_id` are stored: seqs from 1.
fn as_stored(run_id: RunId, sent: &[NewRunEvent]) -> Vec<RunEvent> {
    sent.iter()
        .zip(1..)
        .map(|(sent, seq)| RunEvent {
            run_id,
            seq,
            at: sent.at,
            kind: sent.kind,
            data: sent.data.clone(),
        })
        .collect()
}

/// A second store on the same database: another server replica.
async fn replica(db: &TestDb) -> Store {
    Store::connect(&db.url()).await.unwrap()
}

/// Awaits racing compare-and-set calls: exactly one may have won (answered `Some`). Returns what it answered.
async fn sole_winner<T: std::fmt::Debug + Send + 'static>(
    tasks: Vec<tokio::task::JoinHandle<Result<Option<T>, StoreError>>>,
) -> T {
    let mut winners = Vec::new();
    for task in tasks {
        winners.extend(task.await.unwrap().unwrap());
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    winners.remove(0)
}

fn ids<T, I: PartialEq>(items: &[T], id: impl Fn(&T) -> I) -> Vec<I> {
    items.iter().map(id).collect()
}

#[track_caller]
fn assert_conflict(
    result: Result<impl std::fmt::Debug, StoreError>,
    kind: ConflictKind,
    code: &str,
) {
    match result {
        Err(err @ StoreError::Conflict(found)) => {
            assert_eq!(found, kind);
            assert_eq!(err.code(), code);
            assert_eq!(err.kind(), ErrorKind::Conflict);
        }
        other => panic!("expected Conflict({kind:?}), got {other:?}"),
    }
}

/// A raw connection that bypasses the store, to inspect or damage what it wrote.
enum Raw {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Raw {
    async fn connect(db: &TestDb) -> Raw {
        match db.backend() {
            Backend::Sqlite => Raw::Sqlite(SqliteConnection::connect(&db.url()).await.unwrap()),
            Backend::Postgres => Raw::Postgres(PgConnection::connect(&db.url()).await.unwrap()),
        }
    }

    async fn migration_versions(&mut self) -> Vec<i64> {
        const VERSIONS: &str =
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";
        match self {
            Raw::Sqlite(conn) => sqlx::query_scalar(VERSIONS).fetch_all(conn).await.unwrap(),
            Raw::Postgres(conn) => sqlx::query_scalar(VERSIONS).fetch_all(conn).await.unwrap(),
        }
    }

    async fn close(self) {
        let _ = match self {
            Raw::Sqlite(conn) => conn.close().await,
            Raw::Postgres(conn) => conn.close().await,
        };
    }

    async fn text(&mut self, sql: &'static str, bind: String) -> String {
        match self {
            Raw::Sqlite(conn) => sqlx::query_scalar(sql)
                .bind(bind)
                .fetch_one(conn)
                .await
                .unwrap(),
            Raw::Postgres(conn) => sqlx::query_scalar(sql)
                .bind(bind)
                .fetch_one(conn)
                .await
                .unwrap(),
        }
    }

    async fn execute(&mut self, sql: &'static str, bind: String) -> u64 {
        match self {
            Raw::Sqlite(conn) => sqlx::query(sql)
                .bind(bind)
                .execute(conn)
                .await
                .unwrap()
                .rows_affected(),
            Raw::Postgres(conn) => sqlx::query(sql)
                .bind(bind)
                .execute(conn)
                .await
                .unwrap()
                .rows_affected(),
        }
    }
}
