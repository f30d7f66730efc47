//! The store parity suite: every test runs on SQLite and on PostgreSQL, and must behave identically on both.
//!
//! Each `both_backends!` entry names an `async fn(&TestDb)` below and generates `<name>::sqlite` and
//! `<name>::postgres` tests, each on a fresh database.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a failed unwrap is a failed assertion.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value, json};
use sqlx::{Connection, PgConnection, SqliteConnection};

use berth_core::ErrorKind;
use berth_core::company::{ApiKey, ApiKeyRole, Company};
use berth_core::environment::{Driver, Environment, EnvironmentStatus};
use berth_core::ids::{ApiKeyId, CompanyId, EnvironmentId, LeaseId, RunId, SecretId};
use berth_core::lease::{CleanupStatus, Lease, LeasePolicy, LeaseStatus};
use berth_core::run::{EventKind, NewRunEvent, Run, RunEvent, RunStatus};
use berth_core::time::Timestamp;
use berth_server::store::{
    Backend, ConflictKind, EnvironmentFilter, NewActivity, Store, StoreError, StoredSecret,
};

use crate::runs::multibyte_text;
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

both_backends!(
    migrations_apply_and_reapply,
    companies_round_trip,
    ensure_company_is_safe_under_concurrency,
    api_keys_round_trip,
    environments_round_trip_and_listing,
    a_second_local_environment_conflicts,
    ensure_local_environment_is_safe_under_concurrency,
    updates_check_the_revision,
    missing_environments_are_none,
    deleting_an_environment_cascades_to_its_leases,
    leases_round_trip_and_listing,
    activity_is_recorded_in_order,
    secrets_round_trip,
    corrupt_rows_are_reported_by_column,
    runs_round_trip_and_listing,
    final_runs_never_change,
    heartbeats_refresh_live_runs_of_their_node,
    cancel_requests_mark_live_runs_only,
    orphaned_runs_are_found_by_owner_or_staleness,
    failing_an_orphaned_run_happens_once,
    runs_outlive_their_environment,
    events_are_listed_after_a_seq,
    large_output_round_trips_and_goes_with_its_run,
    concurrent_appenders_get_dense_seqs,
    lease_transitions_happen_once,
    a_retained_lease_is_claimed_or_released_once,
    lease_handles_and_cleanup_are_recorded,
    orphaned_leases_are_active_leases_without_a_live_run,
    expired_leases_are_found,
    leases_are_listed_by_statuses,
    nonces_are_accepted_once,
);

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

/// The version numbers of the migration files in `migrations/<backend>`.
fn migration_file_versions(backend: &str) -> BTreeSet<i64> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(backend);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("read {}: {err}", dir.display()))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".sql"))
        .map(|name| {
            let (version, _) = name
                .split_once('_')
                .unwrap_or_else(|| panic!("migration `{name}` has no version"));
            version
                .parse()
                .unwrap_or_else(|_| panic!("migration `{name}` has a non-numeric version"))
        })
        .collect()
}

// === backend-independent tests ===

#[test]
fn both_migration_folders_list_the_same_versions() {
    let sqlite = migration_file_versions("sqlite");
    let postgres = migration_file_versions("postgres");
    assert!(!sqlite.is_empty(), "no SQLite migrations found");
    assert_eq!(
        sqlite, postgres,
        "migrations/sqlite and migrations/postgres must have the same versions"
    );
}

#[tokio::test]
async fn unsupported_urls_are_rejected_without_echoing_them() {
    let err = Store::connect("mysql://user:hunter2@db/berth")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "database_error");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_in_memory_is_one_shared_database() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.insert_company(&company(&format!("c{i}"), i)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // Every connection would see an empty database if each opened its own `:memory:`.
    assert_eq!(store.list_companies().await.unwrap().len(), 8);
    store.close().await;
}

// === parity tests ===

async fn migrations_apply_and_reapply(db: &TestDb) {
    let store = db.store();
    store.ping().await.unwrap();
    let acme = new_company(store, "acme").await;

    // Connecting again re-runs the migrator, which must find everything applied and leave the data alone.
    let again = Store::connect(&db.url()).await.unwrap();
    assert_eq!(again.backend(), store.backend());
    assert_eq!(again.list_companies().await.unwrap(), vec![acme]);
    again.close().await;

    let folder = match db.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let mut raw = Raw::connect(db).await;
    let applied = raw.migration_versions().await;
    raw.close().await;
    assert_eq!(
        applied,
        migration_file_versions(folder)
            .into_iter()
            .collect::<Vec<_>>()
    );
}

async fn companies_round_trip(db: &TestDb) {
    let store = db.store();
    assert!(store.list_companies().await.unwrap().is_empty());

    let newer = company("newer", 2_000);
    let older = company("older", 1_000);
    store.insert_company(&newer).await.unwrap();
    store.insert_company(&older).await.unwrap();

    assert_eq!(
        store.list_companies().await.unwrap(),
        vec![older.clone(), newer.clone()]
    );
    assert_eq!(
        store.get_company(newer.id).await.unwrap(),
        Some(newer.clone())
    );
    assert_eq!(
        store.company_by_name("older").await.unwrap(),
        Some(older.clone())
    );
    assert_eq!(store.get_company(CompanyId::new()).await.unwrap(), None);
    assert_eq!(store.company_by_name("Older").await.unwrap(), None);

    assert_conflict(
        store.insert_company(&company("newer", 3_000)).await,
        ConflictKind::CompanyNameTaken,
        "company_name_taken",
    );
    // A duplicate id is a conflict too, but not a name conflict.
    let same_id = Company {
        name: "other".to_owned(),
        ..newer.clone()
    };
    assert_conflict(
        store.insert_company(&same_id).await,
        ConflictKind::Other,
        "conflict",
    );
    assert_eq!(
        store.list_companies().await.unwrap(),
        vec![older.clone(), newer.clone()]
    );

    // ensure_company returns an existing company unchanged.
    assert_eq!(store.ensure_company("older").await.unwrap(), older);
}

async fn ensure_company_is_safe_under_concurrency(db: &TestDb) {
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = db.store().clone();
            tokio::spawn(async move { store.ensure_company("acme").await })
        })
        .collect();
    let mut companies = Vec::new();
    for task in tasks {
        companies.push(task.await.unwrap().unwrap());
    }
    let first = companies[0].clone();
    assert_eq!(first.name, "acme");
    assert!(
        companies.iter().all(|company| *company == first),
        "{companies:?}"
    );
    assert_eq!(db.store().list_companies().await.unwrap(), vec![first]);
}

async fn api_keys_round_trip(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let key = ApiKey {
        id: ApiKeyId::new(),
        company_id: acme.id,
        name: "ci".to_owned(),
        role: ApiKeyRole::Reader,
        created_at: at(1_234),
    };
    let manager = ApiKey {
        id: ApiKeyId::new(),
        name: "ops".to_owned(),
        role: ApiKeyRole::Manager,
        ..key.clone()
    };
    store.insert_api_key(&key, "hash-of-ci").await.unwrap();
    store.insert_api_key(&manager, "hash-of-ops").await.unwrap();

    assert_eq!(
        store.api_key_by_token_hash("hash-of-ci").await.unwrap(),
        Some(key.clone())
    );
    assert_eq!(
        store.api_key_by_token_hash("hash-of-ops").await.unwrap(),
        Some(manager.clone())
    );
    assert_eq!(
        store.api_key_by_token_hash("hash-of-nobody").await.unwrap(),
        None
    );

    let reused_hash = ApiKey {
        id: ApiKeyId::new(),
        ..key.clone()
    };
    assert_conflict(
        store.insert_api_key(&reused_hash, "hash-of-ci").await,
        ConflictKind::Other,
        "conflict",
    );

    assert!(store.delete_api_key(key.id).await.unwrap());
    assert_eq!(
        store.api_key_by_token_hash("hash-of-ci").await.unwrap(),
        None
    );
    assert!(!store.delete_api_key(key.id).await.unwrap());
    assert_eq!(
        store.api_key_by_token_hash("hash-of-ops").await.unwrap(),
        Some(manager)
    );
}

async fn environments_round_trip_and_listing(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let other = new_company(store, "other").await;

    let ssh = environment(acme.id, "ssh", Driver::Ssh, 1_000);
    let mut sandbox = environment(acme.id, "sandbox", Driver::Sandbox, 3_000);
    sandbox.status = EnvironmentStatus::Archived;
    sandbox.description = None;
    sandbox.metadata = None;
    let mut plugin = environment(acme.id, "plugin", Driver::Plugin, 2_000);
    plugin.config = Map::new();
    // Same updated_at as `plugin`: ties are broken by id, newest first.
    let plugin_twin = environment(acme.id, "plugin twin", Driver::Plugin, 2_000);
    let elsewhere = environment(other.id, "elsewhere", Driver::Ssh, 9_000);
    for env in [&ssh, &sandbox, &plugin, &plugin_twin, &elsewhere] {
        store.insert_environment(env).await.unwrap();
    }

    for env in [&ssh, &sandbox, &plugin, &plugin_twin, &elsewhere] {
        assert_eq!(
            store.get_environment(env.id).await.unwrap().as_ref(),
            Some(env)
        );
    }

    let list = |filter: EnvironmentFilter| async move {
        let envs = store.list_environments(acme.id, &filter).await.unwrap();
        ids(&envs, |env| env.name.clone())
    };
    assert_eq!(
        list(EnvironmentFilter::default()).await,
        ["sandbox", "plugin twin", "plugin", "ssh"]
    );
    let all = store
        .list_environments(acme.id, &EnvironmentFilter::default())
        .await
        .unwrap();
    assert_eq!(
        all,
        vec![
            sandbox.clone(),
            plugin_twin.clone(),
            plugin.clone(),
            ssh.clone()
        ]
    );

    let active = EnvironmentFilter {
        status: Some(EnvironmentStatus::Active),
        driver: None,
    };
    assert_eq!(list(active).await, ["plugin twin", "plugin", "ssh"]);
    let archived = EnvironmentFilter {
        status: Some(EnvironmentStatus::Archived),
        driver: None,
    };
    assert_eq!(list(archived).await, ["sandbox"]);
    let ssh_only = EnvironmentFilter {
        status: None,
        driver: Some(Driver::Ssh),
    };
    assert_eq!(list(ssh_only).await, ["ssh"]);
    let plugins = EnvironmentFilter {
        status: Some(EnvironmentStatus::Active),
        driver: Some(Driver::Plugin),
    };
    assert_eq!(list(plugins).await, ["plugin twin", "plugin"]);
    let none = EnvironmentFilter {
        status: Some(EnvironmentStatus::Archived),
        driver: Some(Driver::Ssh),
    };
    assert!(list(none).await.is_empty());
    let local = EnvironmentFilter {
        status: None,
        driver: Some(Driver::Local),
    };
    assert!(list(local).await.is_empty());

    let other_envs = store
        .list_environments(other.id, &EnvironmentFilter::default())
        .await
        .unwrap();
    assert_eq!(other_envs, vec![elsewhere]);
    assert!(
        store
            .list_environments(CompanyId::new(), &EnvironmentFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_second_local_environment_conflicts(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let local = Environment::local_for(acme.id, at(1_000));
    store.insert_environment(&local).await.unwrap();

    let second = Environment::local_for(acme.id, at(2_000));
    assert_conflict(
        store.insert_environment(&second).await,
        ConflictKind::LocalEnvironmentExists,
        "local_environment_exists",
    );
    assert_eq!(store.get_environment(second.id).await.unwrap(), None);

    // Turning another environment local is refused the same way, and leaves it untouched.
    let ssh = environment(acme.id, "ssh", Driver::Ssh, 1_000);
    store.insert_environment(&ssh).await.unwrap();
    let made_local = Environment {
        driver: Driver::Local,
        updated_at: at(5_000),
        ..ssh.clone()
    };
    assert_conflict(
        store.update_environment(&made_local).await,
        ConflictKind::LocalEnvironmentExists,
        "local_environment_exists",
    );
    assert_eq!(
        store.get_environment(ssh.id).await.unwrap(),
        Some(ssh.clone())
    );

    // The rule is per company.
    let other = new_company(store, "other").await;
    store
        .insert_environment(&Environment::local_for(other.id, at(1_000)))
        .await
        .unwrap();

    // Once the local environment is gone, another one may become local.
    store.delete_environment(local.id).await.unwrap();
    let updated = store
        .update_environment(&made_local)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.driver, Driver::Local);
}

async fn ensure_local_environment_is_safe_under_concurrency(db: &TestDb) {
    let acme = new_company(db.store(), "acme").await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let store = db.store().clone();
            tokio::spawn(async move { store.ensure_local_environment(acme.id).await })
        })
        .collect();
    let mut environments = Vec::new();
    for task in tasks {
        environments.push(task.await.unwrap().unwrap());
    }
    let first = environments[0].clone();
    assert!(
        environments.iter().all(|env| *env == first),
        "{environments:?}"
    );

    let expected = Environment::local_for(acme.id, first.created_at);
    assert_eq!(
        first,
        Environment {
            id: first.id,
            ..expected
        }
    );
    let local = EnvironmentFilter {
        status: None,
        driver: Some(Driver::Local),
    };
    let locals = db.store().list_environments(acme.id, &local).await.unwrap();
    assert_eq!(locals, vec![first.clone()]);
    assert_eq!(
        db.store().ensure_local_environment(acme.id).await.unwrap(),
        first
    );
}

async fn updates_check_the_revision(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let original = environment(acme.id, "box", Driver::Ssh, 1_000);
    store.insert_environment(&original).await.unwrap();

    let changed = Environment {
        name: "renamed".to_owned(),
        description: None,
        driver: Driver::Sandbox,
        status: EnvironmentStatus::Archived,
        config: object(json!({"provider": "fake", "template": "t"})),
        metadata: None,
        updated_at: at(2_000),
        // Immutable fields are ignored by updates.
        created_at: at(999_999),
        ..original.clone()
    };
    let updated = store.update_environment(&changed).await.unwrap().unwrap();
    let expected = Environment {
        revision: 1,
        created_at: original.created_at,
        ..changed.clone()
    };
    assert_eq!(updated, expected);
    assert_eq!(
        store.get_environment(original.id).await.unwrap(),
        Some(expected.clone())
    );

    // The same revision again is stale now, and changes nothing.
    let stale = Environment {
        name: "lost update".to_owned(),
        ..changed.clone()
    };
    match store.update_environment(&stale).await {
        Err(err @ StoreError::ConcurrentUpdate) => {
            assert_eq!(err.code(), "concurrent_update");
            assert_eq!(err.kind(), ErrorKind::Conflict);
        }
        other => panic!("expected ConcurrentUpdate, got {other:?}"),
    }
    let ahead = Environment {
        revision: 7,
        ..expected.clone()
    };
    assert!(matches!(
        store.update_environment(&ahead).await,
        Err(StoreError::ConcurrentUpdate)
    ));
    assert_eq!(
        store.get_environment(original.id).await.unwrap(),
        Some(expected.clone())
    );

    // From the current revision it goes through, metadata included.
    let next = Environment {
        metadata: Some(object(json!({"k": "v"}))),
        updated_at: at(3_000),
        ..expected.clone()
    };
    let stored = store.update_environment(&next).await.unwrap().unwrap();
    assert_eq!(
        stored,
        Environment {
            revision: 2,
            ..next
        }
    );
    assert_eq!(
        store.get_environment(original.id).await.unwrap(),
        Some(stored)
    );
}

async fn missing_environments_are_none(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let ghost = environment(acme.id, "ghost", Driver::Ssh, 1_000);
    assert_eq!(store.get_environment(ghost.id).await.unwrap(), None);
    assert_eq!(store.update_environment(&ghost).await.unwrap(), None);
    assert_eq!(store.delete_environment(ghost.id).await.unwrap(), None);
    assert_eq!(store.get_environment(ghost.id).await.unwrap(), None);
}

async fn deleting_an_environment_cascades_to_its_leases(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let doomed = environment(acme.id, "doomed", Driver::Ssh, 1_000);
    let kept = environment(acme.id, "kept", Driver::Ssh, 1_000);
    store.insert_environment(&doomed).await.unwrap();
    store.insert_environment(&kept).await.unwrap();
    let doomed_leases = [
        lease(&doomed, LeaseStatus::Active, 10),
        lease(&doomed, LeaseStatus::Released, 20),
    ];
    let kept_lease = lease(&kept, LeaseStatus::Active, 30);
    for lease in doomed_leases.iter().chain([&kept_lease]) {
        store.insert_lease(lease).await.unwrap();
    }
    let secret = StoredSecret {
        id: SecretId::new(),
        company_id: acme.id,
        environment_id: Some(doomed.id),
        name: "privateKey".to_owned(),
        nonce: vec![1; 12],
        ciphertext: vec![2; 40],
        created_at: at(1),
    };
    store.insert_secret(&secret).await.unwrap();

    assert_eq!(
        store.delete_environment(doomed.id).await.unwrap(),
        Some(doomed.clone())
    );
    assert_eq!(store.get_environment(doomed.id).await.unwrap(), None);
    for lease in &doomed_leases {
        assert_eq!(store.get_lease(lease.id).await.unwrap(), None);
    }
    assert!(store.list_leases(doomed.id, None).await.unwrap().is_empty());
    assert_eq!(
        store.list_leases(kept.id, None).await.unwrap(),
        vec![kept_lease.clone()]
    );

    // Secrets are not tied to the row by a foreign key: the caller removes them explicitly.
    assert!(store.get_secret(secret.id).await.unwrap().is_some());
    assert_eq!(
        store
            .delete_secrets_of_environment(doomed.id)
            .await
            .unwrap(),
        1
    );
    assert!(store.get_secret(secret.id).await.unwrap().is_none());
}

async fn leases_round_trip_and_listing(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    let other_env = environment(acme.id, "other", Driver::Ssh, 1_000);
    store.insert_environment(&env).await.unwrap();
    store.insert_environment(&other_env).await.unwrap();

    let full = Lease {
        run_id: Some(RunId::new()),
        lease_policy: LeasePolicy::RetainOnFailure,
        provider: Some("fake".to_owned()),
        provider_lease_id: Some("sbx-123".to_owned()),
        expires_at: Some(at(9_000)),
        released_at: Some(at(8_000)),
        failure_reason: Some("exit status 3".to_owned()),
        cleanup_status: Some(CleanupStatus::Failed),
        metadata: Some(object(json!({"sandboxUrl": "https://sbx.example/123"}))),
        ..lease(&env, LeaseStatus::Retained, 300)
    };
    let released = Lease {
        lease_policy: LeasePolicy::ReuseByEnvironment,
        cleanup_status: Some(CleanupStatus::Success),
        ..lease(&env, LeaseStatus::Released, 100)
    };
    let active = lease(&env, LeaseStatus::Active, 200);
    let elsewhere = lease(&other_env, LeaseStatus::Active, 999);
    for lease in [&full, &released, &active, &elsewhere] {
        store.insert_lease(lease).await.unwrap();
    }

    for lease in [&full, &released, &active, &elsewhere] {
        assert_eq!(
            store.get_lease(lease.id).await.unwrap().as_ref(),
            Some(lease)
        );
    }
    assert_eq!(store.get_lease(LeaseId::new()).await.unwrap(), None);

    assert_eq!(
        store.list_leases(env.id, None).await.unwrap(),
        vec![full.clone(), active.clone(), released.clone()]
    );
    assert_eq!(
        store
            .list_leases(env.id, Some(LeaseStatus::Active))
            .await
            .unwrap(),
        vec![active]
    );
    assert_eq!(
        store
            .list_leases(env.id, Some(LeaseStatus::Retained))
            .await
            .unwrap(),
        vec![full]
    );
    assert!(
        store
            .list_leases(env.id, Some(LeaseStatus::Expired))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.list_leases(other_env.id, None).await.unwrap(),
        vec![elsewhere]
    );
}

async fn activity_is_recorded_in_order(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let other = new_company(store, "other").await;
    let before = Timestamp::now();

    let entry = |company_id: Option<CompanyId>, action: &str, details: Value| NewActivity {
        company_id,
        actor: "key:ci".to_owned(),
        action: action.to_owned(),
        entity_type: "environment".to_owned(),
        entity_id: "env-1".to_owned(),
        details,
    };
    let entries = [
        entry(
            Some(acme.id),
            "environment.created",
            json!({"name": "box", "fields": ["a", "b"]}),
        ),
        entry(Some(other.id), "environment.created", json!({})),
        entry(None, "instance.started", Value::Null),
        entry(
            Some(acme.id),
            "environment.updated",
            json!(["not", "an", "object"]),
        ),
        entry(Some(acme.id), "environment.deleted", json!({"revision": 3})),
    ];
    for entry in &entries {
        store.record_activity(entry).await.unwrap();
    }

    let log = store.list_activity(acme.id).await.unwrap();
    assert_eq!(
        ids(&log, |entry| entry.action.clone()),
        [
            "environment.created",
            "environment.updated",
            "environment.deleted"
        ]
    );
    assert!(
        log.windows(2).all(|pair| pair[0].id < pair[1].id),
        "{log:?}"
    );
    for (stored, sent) in log.iter().zip([&entries[0], &entries[3], &entries[4]]) {
        assert_eq!(stored.company_id, Some(acme.id));
        assert_eq!(stored.actor, sent.actor);
        assert_eq!(stored.entity_type, sent.entity_type);
        assert_eq!(stored.entity_id, sent.entity_id);
        assert_eq!(stored.details, sent.details);
        assert!(stored.created_at >= before && stored.created_at <= Timestamp::now());
    }
    let other_log = store.list_activity(other.id).await.unwrap();
    assert_eq!(ids(&other_log, |entry| entry.details.clone()), [json!({})]);
    assert!(
        store
            .list_activity(CompanyId::new())
            .await
            .unwrap()
            .is_empty()
    );
}

async fn secrets_round_trip(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = EnvironmentId::new();
    let secret = |environment_id: Option<EnvironmentId>, name: &str, fill: u8| StoredSecret {
        id: SecretId::new(),
        company_id: acme.id,
        environment_id,
        name: name.to_owned(),
        nonce: vec![0, fill, 255, 0, 7, 7, 7, 7, 7, 7, 7, 0],
        ciphertext: (0..=255).map(|byte: u8| byte ^ fill).collect(),
        created_at: at(4_242),
    };
    let key = secret(Some(env), "privateKey", 1);
    let password = secret(Some(env), "password", 2);
    let loose = secret(None, "token", 3);
    for secret in [&key, &password, &loose] {
        store.insert_secret(secret).await.unwrap();
    }

    for sent in [&key, &password, &loose] {
        let stored = store.get_secret(sent.id).await.unwrap().unwrap();
        assert_eq!(stored.id, sent.id);
        assert_eq!(stored.company_id, sent.company_id);
        assert_eq!(stored.environment_id, sent.environment_id);
        assert_eq!(stored.name, sent.name);
        assert_eq!(stored.nonce, sent.nonce);
        assert_eq!(stored.ciphertext, sent.ciphertext);
        assert_eq!(stored.created_at, sent.created_at);
    }
    assert!(store.get_secret(SecretId::new()).await.unwrap().is_none());

    assert!(store.delete_secret(key.id).await.unwrap());
    assert!(store.get_secret(key.id).await.unwrap().is_none());
    assert!(!store.delete_secret(key.id).await.unwrap());

    assert_eq!(store.delete_secrets_of_environment(env).await.unwrap(), 1);
    assert!(store.get_secret(password.id).await.unwrap().is_none());
    assert_eq!(store.delete_secrets_of_environment(env).await.unwrap(), 0);
    assert_eq!(
        store.get_secret(loose.id).await.unwrap().unwrap().name,
        "token"
    );
}

async fn corrupt_rows_are_reported_by_column(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "box", Driver::Ssh, 1_000);
    store.insert_environment(&env).await.unwrap();

    const BREAK_CONFIG: &str =
        "UPDATE environments SET config = '[\"not an object\"]' WHERE id = $1";
    let mut raw = Raw::connect(db).await;
    assert_eq!(raw.execute(BREAK_CONFIG, env.id.to_string()).await, 1);
    raw.close().await;

    let err = store.get_environment(env.id).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::CorruptRow {
                table: "environments",
                column: "config"
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), "corrupt_row");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(!err.to_string().contains("not an object"), "{err}");
}

// === runs ===

async fn runs_round_trip_and_listing(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let other = new_company(store, "other").await;

    let full = Run {
        lease_id: Some(LeaseId::new()),
        command: vec![
            "printf".to_owned(),
            "%s\n".to_owned(),
            "ünïcödé ✓".to_owned(),
            String::new(),
            "\"quoted\" \\ 'and' $(not a shell)".to_owned(),
        ],
        exit_code: Some(-2),
        signal: Some("SIGKILL".to_owned()),
        error: Some("killed by the timeout".to_owned()),
        owner_node: "node-b".to_owned(),
        started_at: Some(at(2_100)),
        finished_at: Some(at(2_900)),
        heartbeat_at: at(2_800),
        cancel_requested: true,
        ..run(acme.id, RunStatus::TimedOut, 2_000)
    };
    let queued = run(acme.id, RunStatus::Queued, 3_000);
    let running = Run {
        started_at: Some(at(1_100)),
        ..run(acme.id, RunStatus::Running, 1_000)
    };
    // Same created_at as `running`: ties are broken by id, newest first.
    let running_twin = run(acme.id, RunStatus::Running, 1_000);
    let succeeded = Run {
        exit_code: Some(0),
        ..run(acme.id, RunStatus::Succeeded, 500)
    };
    let elsewhere = run(other.id, RunStatus::Running, 9_000);
    let all = [
        &full,
        &queued,
        &running,
        &running_twin,
        &succeeded,
        &elsewhere,
    ];
    insert_runs(store, &all).await;

    for sent in all {
        assert_eq!(store.get_run(sent.id).await.unwrap().as_ref(), Some(sent));
    }
    assert_eq!(store.get_run(RunId::new()).await.unwrap(), None);

    assert_eq!(
        store.list_runs(acme.id, None, 100).await.unwrap(),
        vec![
            queued.clone(),
            full.clone(),
            running_twin.clone(),
            running.clone(),
            succeeded.clone()
        ]
    );
    assert_eq!(
        store.list_runs(acme.id, None, 2).await.unwrap(),
        vec![queued.clone(), full.clone()]
    );
    assert!(store.list_runs(acme.id, None, 0).await.unwrap().is_empty());
    assert_eq!(
        store
            .list_runs(acme.id, Some(RunStatus::Running), 100)
            .await
            .unwrap(),
        vec![running_twin.clone(), running.clone()]
    );
    assert_eq!(
        store
            .list_runs(acme.id, Some(RunStatus::Running), 1)
            .await
            .unwrap(),
        vec![running_twin.clone()]
    );
    assert_eq!(
        store
            .list_runs(acme.id, Some(RunStatus::TimedOut), 100)
            .await
            .unwrap(),
        vec![full.clone()]
    );
    assert!(
        store
            .list_runs(acme.id, Some(RunStatus::Cancelled), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.list_runs(other.id, None, 100).await.unwrap(),
        vec![elsewhere.clone()]
    );

    // A duplicate id is a conflict.
    assert_conflict(
        store.insert_run(&queued).await,
        ConflictKind::Other,
        "conflict",
    );
    // The command is stored as a JSON array of strings.
    let mut raw = Raw::connect(db).await;
    let stored = raw
        .text(
            "SELECT command FROM runs WHERE id = $1",
            queued.id.to_string(),
        )
        .await;
    raw.close().await;
    assert_eq!(
        serde_json::from_str::<Value>(&stored).unwrap(),
        json!(["sh", "-c", "echo \"$1\"; exit 3"])
    );

    // Anything but an array of strings is a corrupt row, reported by column.
    const BREAK_COMMAND: &str = "UPDATE runs SET command = '{\"argv\": \"rm -rf\"}' WHERE id = $1";
    let mut raw = Raw::connect(db).await;
    assert_eq!(raw.execute(BREAK_COMMAND, queued.id.to_string()).await, 1);
    raw.close().await;
    let err = store.get_run(queued.id).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::CorruptRow {
                table: "runs",
                column: "command"
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains("rm -rf"), "{err}");
}

async fn final_runs_never_change(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let queued = run(acme.id, RunStatus::Queued, 1_000);
    insert_runs(store, &[&queued]).await;

    let lease_id = LeaseId::new();
    let running = Run {
        status: RunStatus::Running,
        lease_id: Some(lease_id),
        started_at: Some(at(1_500)),
        ..queued.clone()
    };
    assert!(store.update_run(&running).await.unwrap());
    assert_eq!(
        store.get_run(queued.id).await.unwrap(),
        Some(running.clone())
    );

    let succeeded = Run {
        status: RunStatus::Succeeded,
        exit_code: Some(0),
        finished_at: Some(at(2_000)),
        // Not written by update_run: owner, command, heartbeat and the cancel flag have their own paths.
        owner_node: "someone-else".to_owned(),
        command: vec!["rm".to_owned()],
        heartbeat_at: at(99_999),
        cancel_requested: true,
        ..running.clone()
    };
    assert!(store.update_run(&succeeded).await.unwrap());
    let expected = Run {
        status: RunStatus::Succeeded,
        exit_code: Some(0),
        finished_at: Some(at(2_000)),
        ..running.clone()
    };
    assert_eq!(
        store.get_run(queued.id).await.unwrap(),
        Some(expected.clone())
    );

    // A final status never changes: not to another final status, not back to a live one.
    for late in [
        Run {
            status: RunStatus::Failed,
            error: Some("too late".to_owned()),
            ..expected.clone()
        },
        Run {
            status: RunStatus::Cancelled,
            signal: Some("SIGTERM".to_owned()),
            ..expected.clone()
        },
        Run {
            status: RunStatus::Running,
            finished_at: None,
            ..expected.clone()
        },
    ] {
        assert!(!store.update_run(&late).await.unwrap());
    }
    assert_eq!(store.get_run(queued.id).await.unwrap(), Some(expected));

    // A missing run is not written either.
    assert!(
        !store
            .update_run(&run(acme.id, RunStatus::Running, 1))
            .await
            .unwrap()
    );
}

async fn heartbeats_refresh_live_runs_of_their_node(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let queued = run(acme.id, RunStatus::Queued, 1_000);
    let running = run(acme.id, RunStatus::Running, 1_100);
    let cancelling = Run {
        cancel_requested: true,
        ..run(acme.id, RunStatus::Running, 1_200)
    };
    let finished = Run {
        cancel_requested: true,
        ..run(acme.id, RunStatus::Cancelled, 1_300)
    };
    let elsewhere = Run {
        owner_node: "node-b".to_owned(),
        cancel_requested: true,
        ..run(acme.id, RunStatus::Running, 1_400)
    };
    insert_runs(
        store,
        &[&queued, &running, &cancelling, &finished, &elsewhere],
    )
    .await;

    assert_eq!(
        store.heartbeat_runs("node-a", at(5_000)).await.unwrap(),
        vec![cancelling.id]
    );
    for (sent, heartbeat) in [
        (&queued, 5_000),
        (&running, 5_000),
        (&cancelling, 5_000),
        (&finished, 1_300),
        (&elsewhere, 1_400),
    ] {
        let stored = store.get_run(sent.id).await.unwrap().unwrap();
        assert_eq!(
            stored,
            Run {
                heartbeat_at: at(heartbeat),
                ..sent.clone()
            }
        );
    }

    assert!(
        store
            .heartbeat_runs("node-z", at(6_000))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.heartbeat_runs("node-b", at(6_000)).await.unwrap(),
        vec![elsewhere.id]
    );
    assert_eq!(
        store
            .get_run(elsewhere.id)
            .await
            .unwrap()
            .unwrap()
            .heartbeat_at,
        at(6_000)
    );
}

async fn cancel_requests_mark_live_runs_only(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let running = run(acme.id, RunStatus::Running, 1_000);
    let queued = run(acme.id, RunStatus::Queued, 1_000);
    let finished = Run {
        exit_code: Some(1),
        ..run(acme.id, RunStatus::Failed, 1_000)
    };
    insert_runs(store, &[&running, &queued, &finished]).await;

    for live in [&running, &queued] {
        let expected = Run {
            cancel_requested: true,
            ..live.clone()
        };
        assert_eq!(
            store.request_cancel(live.id).await.unwrap(),
            Some(expected.clone())
        );
        // Asking again is harmless.
        assert_eq!(
            store.request_cancel(live.id).await.unwrap(),
            Some(expected.clone())
        );
        assert_eq!(store.get_run(live.id).await.unwrap(), Some(expected));
    }

    assert_eq!(
        store.request_cancel(finished.id).await.unwrap(),
        Some(finished.clone())
    );
    assert_eq!(store.get_run(finished.id).await.unwrap(), Some(finished));
    assert_eq!(store.request_cancel(RunId::new()).await.unwrap(), None);

    // The owner learns about both requests with its next heartbeat.
    let mut requested = store.heartbeat_runs("node-a", at(2_000)).await.unwrap();
    requested.sort();
    let mut expected = vec![running.id, queued.id];
    expected.sort();
    assert_eq!(requested, expected);
}

async fn orphaned_runs_are_found_by_owner_or_staleness(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let stale_before = at(8_000);
    let node = |owner: &str, status: RunStatus, created_at: i64, heartbeat: i64| Run {
        owner_node: owner.to_owned(),
        heartbeat_at: at(heartbeat),
        ..run(acme.id, status, created_at)
    };
    // This node restarted: all of its live runs are orphans, fresh heartbeat or not.
    let mine_fresh = node("node-a", RunStatus::Running, 1_000, 9_500);
    let mine_queued = node("node-a", RunStatus::Queued, 3_000, 9_900);
    let mine_finished = node("node-a", RunStatus::Succeeded, 500, 1_000);
    // Other nodes: only a stale heartbeat makes an orphan.
    let others_fresh = node("node-b", RunStatus::Running, 1_500, 9_000);
    let others_at_the_limit = node("node-b", RunStatus::Running, 1_600, 8_000);
    let others_stale = node("node-c", RunStatus::Running, 2_000, 7_999);
    let others_stale_finished = node("node-c", RunStatus::Failed, 100, 10);
    insert_runs(
        store,
        &[
            &mine_fresh,
            &mine_queued,
            &mine_finished,
            &others_fresh,
            &others_at_the_limit,
            &others_stale,
            &others_stale_finished,
        ],
    )
    .await;

    assert_eq!(
        store.orphaned_runs("node-a", stale_before).await.unwrap(),
        vec![
            mine_fresh.clone(),
            others_stale.clone(),
            mine_queued.clone()
        ]
    );
    // Seen from node-b (which did not restart), its own fresh runs are not orphans.
    assert_eq!(
        store.orphaned_runs("node-z", stale_before).await.unwrap(),
        vec![others_stale.clone()]
    );

    // Failing follows the same rules.
    for not_an_orphan in [
        &others_fresh,
        &others_at_the_limit,
        &mine_finished,
        &others_stale_finished,
    ] {
        assert!(
            !store
                .fail_orphaned_run(
                    not_an_orphan.id,
                    "node-a",
                    stale_before,
                    "orphaned",
                    at(10_000)
                )
                .await
                .unwrap()
        );
        assert_eq!(
            store.get_run(not_an_orphan.id).await.unwrap().as_ref(),
            Some(not_an_orphan)
        );
    }
    for orphan in [&mine_fresh, &others_stale] {
        assert!(
            store
                .fail_orphaned_run(
                    orphan.id,
                    "node-a",
                    stale_before,
                    "the node executing it stopped",
                    at(10_000)
                )
                .await
                .unwrap()
        );
        assert_eq!(
            store.get_run(orphan.id).await.unwrap(),
            Some(Run {
                status: RunStatus::Failed,
                error: Some("the node executing it stopped".to_owned()),
                finished_at: Some(at(10_000)),
                ..orphan.clone()
            })
        );
    }
    assert!(
        !store
            .fail_orphaned_run(RunId::new(), "node-a", stale_before, "orphaned", at(10_000))
            .await
            .unwrap()
    );
    assert_eq!(
        store.orphaned_runs("node-a", stale_before).await.unwrap(),
        vec![mine_queued]
    );
}

async fn failing_an_orphaned_run_happens_once(db: &TestDb) {
    let acme = new_company(db.store(), "acme").await;
    let orphan = Run {
        owner_node: "dead-node".to_owned(),
        ..run(acme.id, RunStatus::Running, 1_000)
    };
    insert_runs(db.store(), &[&orphan]).await;

    let replicas = [db.store().clone(), replica(db).await];
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = replicas[i % 2].clone();
            let node = format!("sweeper-{i}");
            tokio::spawn(async move {
                store
                    .fail_orphaned_run(
                        orphan.id,
                        &node,
                        at(5_000),
                        &format!("failed by {node}"),
                        at(6_000),
                    )
                    .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if task.await.unwrap().unwrap() {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");

    let stored = db.store().get_run(orphan.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed);
    assert_eq!(
        stored.error,
        Some(format!("failed by sweeper-{}", winners[0]))
    );
    // The owner coming back cannot overwrite the outcome.
    let recovered = Run {
        status: RunStatus::Succeeded,
        exit_code: Some(0),
        ..orphan.clone()
    };
    assert!(!db.store().update_run(&recovered).await.unwrap());
    assert_eq!(db.store().get_run(orphan.id).await.unwrap(), Some(stored));
    replicas[1].close().await;
}

async fn runs_outlive_their_environment(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "box", Driver::Ssh, 1_000);
    let other_env = environment(acme.id, "other", Driver::Ssh, 1_000);
    store.insert_environment(&env).await.unwrap();
    store.insert_environment(&other_env).await.unwrap();
    let on = |environment: &Environment, status: RunStatus, created_at: i64| Run {
        environment_id: environment.id,
        ..run(acme.id, status, created_at)
    };
    let running = on(&env, RunStatus::Running, 2_000);
    let queued = on(&env, RunStatus::Queued, 1_000);
    let finished = on(&env, RunStatus::Succeeded, 500);
    let elsewhere = on(&other_env, RunStatus::Running, 1_500);
    insert_runs(store, &[&running, &queued, &finished, &elsewhere]).await;

    assert_eq!(
        store.live_runs_of_environment(env.id).await.unwrap(),
        vec![queued.clone(), running.clone()]
    );
    assert_eq!(
        store.live_runs_of_environment(other_env.id).await.unwrap(),
        vec![elsewhere]
    );
    assert!(
        store
            .live_runs_of_environment(EnvironmentId::new())
            .await
            .unwrap()
            .is_empty()
    );

    let events = store
        .append_events(
            finished.id,
            vec![event(EventKind::Status, json!({"status": "succeeded"}))],
        )
        .await
        .unwrap();
    store.delete_environment(env.id).await.unwrap();
    for kept in [&running, &queued, &finished] {
        assert_eq!(store.get_run(kept.id).await.unwrap().as_ref(), Some(kept));
    }
    assert_eq!(store.list_events(finished.id, 0, 10).await.unwrap(), events);
}

// === run events ===

async fn events_are_listed_after_a_seq(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let subject = run(acme.id, RunStatus::Running, 1_000);
    let other = run(acme.id, RunStatus::Running, 1_000);
    insert_runs(store, &[&subject, &other]).await;

    assert!(
        store
            .list_events(subject.id, 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .append_events(subject.id, Vec::new())
            .await
            .unwrap()
            .is_empty()
    );

    let batch = [
        event(EventKind::Status, json!({"status": "running"})),
        event(EventKind::Stdout, json!({"text": "héllo ✓\n"})),
        NewRunEvent {
            at: at(7_001),
            ..event(EventKind::Stderr, json!({"text": "\u{0}\u{1b}[31mred\n"}))
        },
        event(
            EventKind::Agent,
            json!({"message": "hi", "data": [1, null, {"deep": true}]}),
        ),
        event(EventKind::Error, Value::Null),
    ];
    let appended = store
        .append_events(subject.id, batch.to_vec())
        .await
        .unwrap();
    let expected = as_stored(subject.id, &batch);
    assert_eq!(appended, expected);
    assert_eq!(
        store.list_events(subject.id, 0, 100).await.unwrap(),
        expected
    );
    assert_eq!(
        store.list_events(subject.id, 2, 2).await.unwrap(),
        expected[2..4].to_vec()
    );
    assert_eq!(
        store.list_events(subject.id, -1, 1).await.unwrap(),
        expected[..1].to_vec()
    );
    assert!(
        store
            .list_events(subject.id, 5, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .list_events(subject.id, 0, 0)
            .await
            .unwrap()
            .is_empty()
    );

    // Each run counts on its own.
    let theirs = store
        .append_events(
            other.id,
            vec![event(EventKind::Lease, json!({"leaseId": "l"}))],
        )
        .await
        .unwrap();
    assert_eq!(ids(&theirs, |event| event.seq), [1]);

    // A batch larger than one insert statement holds still gets dense seqs.
    let output: Vec<NewRunEvent> = (0..450)
        .map(|i| event(EventKind::Stdout, json!({"text": format!("line {i}\n")})))
        .collect();
    let appended = store
        .append_events(subject.id, output.clone())
        .await
        .unwrap();
    assert_eq!(
        ids(&appended, |event| event.seq),
        (6..=455).collect::<Vec<_>>()
    );
    let listed = store.list_events(subject.id, 5, 1_000).await.unwrap();
    assert_eq!(listed, appended);
    assert_eq!(listed[449].data, json!({"text": "line 449\n"}));
    assert_eq!(
        ids(
            &store.list_events(other.id, 0, 100).await.unwrap(),
            |event| event.seq
        ),
        [1]
    );

    // Events of a run that does not exist are refused, not dropped.
    let err = store
        .append_events(RunId::new(), batch.to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "database_error");
}

/// The SQLite database file behind a test database.
fn sqlite_file(db: &TestDb) -> std::path::PathBuf {
    std::path::PathBuf::from(db.url().strip_prefix("sqlite://").unwrap())
}

async fn large_output_round_trips_and_goes_with_its_run(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let subject = run(acme.id, RunStatus::Running, 1_000);
    insert_runs(store, &[&subject]).await;

    // Output of both streams, interleaved with other events and with output-kind events that are not plain text.
    let mut sent = vec![event(EventKind::Status, json!({"status": "running"}))];
    for index in 0..24 {
        let kind = if index % 3 == 2 {
            EventKind::Stderr
        } else {
            EventKind::Stdout
        };
        sent.push(event(
            kind,
            json!({"text": multibyte_text(index, 200_000 + index)}),
        ));
        if index % 5 == 0 {
            sent.push(event(
                EventKind::Bridge,
                json!({"text": "not output", "status": 200}),
            ));
            sent.push(event(
                EventKind::Stdout,
                json!({"text": "", "note": "kept in data"}),
            ));
            sent.push(event(EventKind::Stderr, json!({"text": ""})));
        }
    }
    sent.push(event(EventKind::Status, json!({"status": "succeeded"})));
    let mut appended = Vec::new();
    for batch in sent.chunks(7) {
        appended.extend(
            store
                .append_events(subject.id, batch.to_vec())
                .await
                .unwrap(),
        );
    }
    let expected = as_stored(subject.id, &sent);
    assert_eq!(appended, expected);

    // Listed whole, paged from any seq, and from another replica: the same events, byte for byte.
    let everything = u32::try_from(expected.len()).unwrap();
    assert_eq!(
        store.list_events(subject.id, 0, everything).await.unwrap(),
        expected
    );
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = store.list_events(subject.id, after, 4).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        paged.extend(page);
    }
    assert_eq!(paged, expected);
    let other = replica(db).await;
    assert_eq!(
        other.list_events(subject.id, 3, 5).await.unwrap(),
        expected[3..8].to_vec()
    );
    other.close().await;

    let output_bytes: usize = sent
        .iter()
        .filter(|event| matches!(event.kind, EventKind::Stdout | EventKind::Stderr))
        .filter(|event| event.data.as_object().unwrap().len() == 1)
        .map(|event| event.data["text"].as_str().unwrap().len())
        .sum();
    let segment_file = || {
        let mut name = sqlite_file(db).into_os_string();
        name.push("-output");
        std::path::PathBuf::from(name).join(subject.id.to_string())
    };
    let mut raw = Raw::connect(db).await;
    const DATA_OF: &str = "SELECT data FROM run_events WHERE run_id = $1 AND seq = 2";
    let stored = raw.text(DATA_OF, subject.id.to_string()).await;
    match db.backend() {
        // The bytes are in the run's segment file; the row only points at them.
        Backend::Sqlite => {
            assert_eq!(stored, "{}");
            let file = std::fs::metadata(segment_file()).unwrap();
            assert_eq!(file.len(), output_bytes as u64);
        }
        // Replicas read each other's runs: the bytes stay in the database.
        Backend::Postgres => assert_eq!(
            serde_json::from_str::<Value>(&stored).unwrap(),
            sent[1].data
        ),
    }

    // Deleting the company cascades to the run and its events; its output goes when the store next opens.
    const DELETE_COMPANY: &str = "DELETE FROM companies WHERE id = $1";
    assert_eq!(raw.execute(DELETE_COMPANY, acme.id.to_string()).await, 1);
    raw.close().await;
    let reopened = replica(db).await;
    assert!(
        reopened
            .list_events(subject.id, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    reopened.close().await;
    if db.backend() == Backend::Sqlite {
        assert!(
            !segment_file().exists(),
            "the segment file of a deleted run is removed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_output_that_did_not_survive_lists_what_is_left() {
    let db = TestDb::sqlite().await;
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let subject = run(acme.id, RunStatus::Running, 1_000);
    insert_runs(store, &[&subject]).await;
    store
        .append_events(
            subject.id,
            vec![
                event(EventKind::Stdout, json!({"text": "first\n"})),
                event(EventKind::Stderr, json!({"text": "second\n"})),
            ],
        )
        .await
        .unwrap();
    // A power loss can lose the newest bytes of a file while the database kept the rows (neither is fsynced).
    let mut name = sqlite_file(&db).into_os_string();
    name.push("-output");
    let file = std::path::PathBuf::from(name).join(subject.id.to_string());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(9)
        .unwrap();
    let listed = store.list_events(subject.id, 0, 10).await.unwrap();
    assert_eq!(
        ids(&listed, |event| event.data.clone()),
        [json!({"text": "first\n"}), json!({"text": "sec"})]
    );
    std::fs::remove_file(&file).unwrap();
    let listed = store.list_events(subject.id, 0, 10).await.unwrap();
    assert_eq!(
        ids(&listed, |event| event.data.clone()),
        [json!({"text": ""}), json!({"text": ""})]
    );
    db.cleanup().await;
}

#[tokio::test]
async fn sqlite_in_memory_keeps_output_in_the_database() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let acme = new_company(&store, "acme").await;
    let subject = run(acme.id, RunStatus::Running, 1_000);
    insert_runs(&store, &[&subject]).await;
    let sent = vec![event(
        EventKind::Stdout,
        json!({"text": multibyte_text(1, 70_000)}),
    )];
    let appended = store.append_events(subject.id, sent.clone()).await.unwrap();
    assert_eq!(appended[0].data, sent[0].data);
    assert_eq!(
        store.list_events(subject.id, 0, 10).await.unwrap(),
        appended
    );
    store.close().await;
}

async fn concurrent_appenders_get_dense_seqs(db: &TestDb) {
    const APPENDERS: usize = 8;
    const BATCHES: usize = 50;
    let acme = new_company(db.store(), "acme").await;
    let subject = run(acme.id, RunStatus::Running, 1_000);
    insert_runs(db.store(), &[&subject]).await;

    let replicas = [db.store().clone(), replica(db).await];
    let tasks: Vec<_> = (0..APPENDERS)
        .map(|appender| {
            let store = replicas[appender % 2].clone();
            tokio::spawn(async move {
                let mut appended = Vec::new();
                for batch in 0..BATCHES {
                    let events: Vec<NewRunEvent> = (0..=batch % 3)
                        .map(|line| {
                            event(
                                EventKind::Stdout,
                                json!({"text": format!("{appender}/{batch}/{line}")}),
                            )
                        })
                        .collect();
                    let stored = store
                        .append_events(subject.id, events.clone())
                        .await
                        .unwrap();
                    // A batch is contiguous: nobody else's events land in the middle of it.
                    let seqs = ids(&stored, |event| event.seq);
                    let first = seqs[0];
                    assert_eq!(seqs, (first..first + seqs.len() as i64).collect::<Vec<_>>());
                    appended.extend(stored);
                }
                appended
            })
        })
        .collect();
    let mut appended = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        // One appender's batches are sequential, so its seqs only grow.
        assert!(mine.windows(2).all(|pair| pair[0].seq < pair[1].seq));
        appended.extend(mine);
    }
    appended.sort_by_key(|event| event.seq);

    let per_appender: usize = (0..BATCHES).map(|batch| batch % 3 + 1).sum();
    let total = APPENDERS * per_appender;
    assert_eq!(
        ids(&appended, |event| event.seq),
        (1..=total as i64).collect::<Vec<_>>()
    );
    let stored = db
        .store()
        .list_events(subject.id, 0, u32::try_from(total + 10).unwrap())
        .await
        .unwrap();
    assert_eq!(stored, appended);
    replicas[1].close().await;
}

// === lease state ===

async fn lease_transitions_happen_once(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let active = Lease {
        run_id: Some(RunId::new()),
        provider: Some("fake".to_owned()),
        provider_lease_id: Some("sbx-1".to_owned()),
        failure_reason: Some("stale".to_owned()),
        ..lease(&env, LeaseStatus::Active, 100)
    };
    store.insert_lease(&active).await.unwrap();

    let replicas = [store.clone(), replica(db).await];
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = replicas[i % 2].clone();
            tokio::spawn(async move {
                store
                    .transition_lease(
                        active.id,
                        LeaseStatus::Active,
                        LeaseStatus::Released,
                        None,
                        Some(CleanupStatus::Pending),
                        at(5_000 + i as i64),
                    )
                    .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        if let Some(lease) = task.await.unwrap().unwrap() {
            winners.push(lease);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let released = winners.remove(0);
    let now = released.last_used_at;
    assert!((5_000..5_016).contains(&now.unix_millis()));
    let expected = Lease {
        status: LeaseStatus::Released,
        released_at: Some(now),
        last_used_at: now,
        failure_reason: None,
        cleanup_status: Some(CleanupStatus::Pending),
        ..active.clone()
    };
    assert_eq!(released, expected);
    assert_eq!(
        store.get_lease(active.id).await.unwrap(),
        Some(expected.clone())
    );

    // Whoever won reports the cleanup outcome.
    store
        .set_lease_cleanup_status(active.id, CleanupStatus::Success)
        .await
        .unwrap();
    let cleaned = Lease {
        cleanup_status: Some(CleanupStatus::Success),
        ..expected
    };
    assert_eq!(
        store.get_lease(active.id).await.unwrap(),
        Some(cleaned.clone())
    );

    // From a status it is no longer in, nothing happens; a missing lease neither.
    assert_eq!(
        store
            .transition_lease(
                active.id,
                LeaseStatus::Active,
                LeaseStatus::Failed,
                Some("x"),
                None,
                at(9_000)
            )
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.get_lease(active.id).await.unwrap(), Some(cleaned));
    assert_eq!(
        store
            .transition_lease(
                LeaseId::new(),
                LeaseStatus::Active,
                LeaseStatus::Released,
                None,
                None,
                at(9_000)
            )
            .await
            .unwrap(),
        None
    );

    // Retaining keeps the lease open (no released_at) and records why; failing closes it.
    let kept = lease(&env, LeaseStatus::Active, 100);
    let failed = lease(&env, LeaseStatus::Active, 100);
    store.insert_lease(&kept).await.unwrap();
    store.insert_lease(&failed).await.unwrap();
    assert_eq!(
        store
            .transition_lease(
                kept.id,
                LeaseStatus::Active,
                LeaseStatus::Retained,
                Some("exit status 3"),
                None,
                at(6_000)
            )
            .await
            .unwrap(),
        Some(Lease {
            status: LeaseStatus::Retained,
            failure_reason: Some("exit status 3".to_owned()),
            last_used_at: at(6_000),
            ..kept.clone()
        })
    );
    assert_eq!(
        store
            .transition_lease(
                failed.id,
                LeaseStatus::Active,
                LeaseStatus::Failed,
                Some("provider refused"),
                Some(CleanupStatus::Failed),
                at(6_500)
            )
            .await
            .unwrap(),
        Some(Lease {
            status: LeaseStatus::Failed,
            released_at: Some(at(6_500)),
            failure_reason: Some("provider refused".to_owned()),
            cleanup_status: Some(CleanupStatus::Failed),
            last_used_at: at(6_500),
            ..failed.clone()
        })
    );
    replicas[1].close().await;
}

async fn a_retained_lease_is_claimed_or_released_once(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let retained = Lease {
        lease_policy: LeasePolicy::ReuseByEnvironment,
        provider_lease_id: Some("sbx-keep".to_owned()),
        failure_reason: Some("exit status 1".to_owned()),
        ..lease(&env, LeaseStatus::Retained, 100)
    };
    store.insert_lease(&retained).await.unwrap();

    // Half the callers are new runs claiming the lease for reuse, half are sweepers releasing it.
    let replicas = [store.clone(), replica(db).await];
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = replicas[i % 2].clone();
            let to = if i % 4 < 2 {
                LeaseStatus::Active
            } else {
                LeaseStatus::Released
            };
            tokio::spawn(async move {
                store
                    .transition_lease(
                        retained.id,
                        LeaseStatus::Retained,
                        to,
                        None,
                        None,
                        at(2_000),
                    )
                    .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        if let Some(lease) = task.await.unwrap().unwrap() {
            winners.push(lease);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let winner = winners.remove(0);
    let released_at = (winner.status == LeaseStatus::Released).then_some(at(2_000));
    assert_eq!(
        winner,
        Lease {
            status: winner.status,
            released_at,
            failure_reason: None,
            last_used_at: at(2_000),
            ..retained.clone()
        }
    );
    assert_eq!(
        store.get_lease(retained.id).await.unwrap(),
        Some(winner.clone())
    );

    // A claimed lease goes back to retained after its run, and can be claimed again.
    if winner.status == LeaseStatus::Active {
        assert!(
            store
                .transition_lease(
                    retained.id,
                    LeaseStatus::Active,
                    LeaseStatus::Retained,
                    None,
                    None,
                    at(3_000)
                )
                .await
                .unwrap()
                .is_some()
        );
        let again = store
            .transition_lease(
                retained.id,
                LeaseStatus::Retained,
                LeaseStatus::Active,
                None,
                None,
                at(4_000),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.status, LeaseStatus::Active);
        assert_eq!(again.released_at, None);
    }
    replicas[1].close().await;
}

async fn lease_handles_and_cleanup_are_recorded(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let acquiring = lease(&env, LeaseStatus::Active, 100);
    let untouched = lease(&env, LeaseStatus::Active, 100);
    store.insert_lease(&acquiring).await.unwrap();
    store.insert_lease(&untouched).await.unwrap();

    let metadata = object(json!({"sandboxUrl": "https://sbx.example/1", "n": 1}));
    store
        .update_lease_handle(
            acquiring.id,
            Some("fake"),
            Some("sbx-1"),
            Some(&metadata),
            Some(at(90_000)),
            at(1_500),
        )
        .await
        .unwrap();
    let handled = Lease {
        provider: Some("fake".to_owned()),
        provider_lease_id: Some("sbx-1".to_owned()),
        metadata: Some(metadata),
        expires_at: Some(at(90_000)),
        last_used_at: at(1_500),
        ..acquiring.clone()
    };
    assert_eq!(
        store.get_lease(acquiring.id).await.unwrap(),
        Some(handled.clone())
    );

    // Every field is written as given, NULLs included.
    store
        .update_lease_handle(acquiring.id, None, None, None, None, at(1_600))
        .await
        .unwrap();
    assert_eq!(
        store.get_lease(acquiring.id).await.unwrap(),
        Some(Lease {
            last_used_at: at(1_600),
            ..acquiring.clone()
        })
    );

    store
        .set_lease_cleanup_status(acquiring.id, CleanupStatus::Pending)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_lease(acquiring.id)
            .await
            .unwrap()
            .unwrap()
            .cleanup_status,
        Some(CleanupStatus::Pending)
    );
    assert_eq!(
        store.get_lease(untouched.id).await.unwrap(),
        Some(untouched)
    );

    // A lease that went away with its environment is not an error.
    store
        .update_lease_handle(LeaseId::new(), Some("fake"), None, None, None, at(1))
        .await
        .unwrap();
    store
        .set_lease_cleanup_status(LeaseId::new(), CleanupStatus::Success)
        .await
        .unwrap();
}

async fn orphaned_leases_are_active_leases_without_a_live_run(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let live = run(acme.id, RunStatus::Running, 1_000);
    let queued = run(acme.id, RunStatus::Queued, 1_000);
    let finished = run(acme.id, RunStatus::Succeeded, 1_000);
    insert_runs(store, &[&live, &queued, &finished]).await;

    let held_by = |run_id: Option<RunId>, status: LeaseStatus, acquired_at: i64| Lease {
        run_id,
        acquired_at: at(acquired_at),
        ..lease(&env, status, 100)
    };
    let of_live_run = held_by(Some(live.id), LeaseStatus::Active, 10);
    let of_queued_run = held_by(Some(queued.id), LeaseStatus::Active, 20);
    let of_finished_run = held_by(Some(finished.id), LeaseStatus::Active, 300);
    let without_run = held_by(None, LeaseStatus::Active, 100);
    let of_missing_run = held_by(Some(RunId::new()), LeaseStatus::Active, 200);
    let released = held_by(Some(finished.id), LeaseStatus::Released, 1);
    let retained = held_by(None, LeaseStatus::Retained, 2);
    for lease in [
        &of_live_run,
        &of_queued_run,
        &of_finished_run,
        &without_run,
        &of_missing_run,
        &released,
        &retained,
    ] {
        store.insert_lease(lease).await.unwrap();
    }

    assert_eq!(
        store.orphaned_leases(100).await.unwrap(),
        vec![
            without_run.clone(),
            of_missing_run.clone(),
            of_finished_run.clone()
        ]
    );
    assert_eq!(
        store.orphaned_leases(2).await.unwrap(),
        vec![without_run.clone(), of_missing_run.clone()]
    );

    // Once the live run finishes, its lease is an orphan too.
    let done = Run {
        status: RunStatus::Failed,
        ..live.clone()
    };
    assert!(store.update_run(&done).await.unwrap());
    assert_eq!(
        ids(&store.orphaned_leases(100).await.unwrap(), |lease| lease.id),
        [
            of_live_run.id,
            without_run.id,
            of_missing_run.id,
            of_finished_run.id
        ]
    );
}

async fn expired_leases_are_found(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let expiring = |status: LeaseStatus, expires_at: Option<i64>| Lease {
        expires_at: expires_at.map(at),
        ..lease(&env, status, 100)
    };
    let active_expired = expiring(LeaseStatus::Active, Some(4_000));
    let retained_expired = expiring(LeaseStatus::Retained, Some(3_000));
    let released_expired = expiring(LeaseStatus::Released, Some(1_000));
    let already_expired = expiring(LeaseStatus::Expired, Some(1_000));
    let expires_now = expiring(LeaseStatus::Active, Some(5_000));
    let later = expiring(LeaseStatus::Retained, Some(6_000));
    let never = expiring(LeaseStatus::Active, None);
    for lease in [
        &active_expired,
        &retained_expired,
        &released_expired,
        &already_expired,
        &expires_now,
        &later,
        &never,
    ] {
        store.insert_lease(lease).await.unwrap();
    }

    assert_eq!(
        store.expired_leases(at(5_000), 100).await.unwrap(),
        vec![retained_expired.clone(), active_expired.clone()]
    );
    assert_eq!(
        store.expired_leases(at(5_000), 1).await.unwrap(),
        vec![retained_expired.clone()]
    );
    assert_eq!(
        ids(
            &store.expired_leases(at(100_000), 100).await.unwrap(),
            |lease| lease.id
        ),
        [
            retained_expired.id,
            active_expired.id,
            expires_now.id,
            later.id
        ]
    );
    assert!(
        store
            .expired_leases(at(3_000), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn leases_are_listed_by_statuses(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    let other_env = environment(acme.id, "other", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    store.insert_environment(&other_env).await.unwrap();
    let active = lease(&env, LeaseStatus::Active, 300);
    let retained_old = lease(&env, LeaseStatus::Retained, 100);
    let retained_new = lease(&env, LeaseStatus::Retained, 500);
    let released = lease(&env, LeaseStatus::Released, 400);
    let expired = lease(&env, LeaseStatus::Expired, 200);
    let failed = lease(&env, LeaseStatus::Failed, 600);
    let elsewhere = lease(&other_env, LeaseStatus::Retained, 999);
    for lease in [
        &active,
        &retained_old,
        &retained_new,
        &released,
        &expired,
        &failed,
        &elsewhere,
    ] {
        store.insert_lease(lease).await.unwrap();
    }

    let names = |leases: Vec<Lease>| ids(&leases, |lease| lease.id);
    assert_eq!(
        store
            .leases_in_statuses(env.id, &[LeaseStatus::Retained, LeaseStatus::Active])
            .await
            .unwrap(),
        vec![retained_new.clone(), active.clone(), retained_old.clone()]
    );
    assert_eq!(
        names(
            store
                .leases_in_statuses(env.id, &[LeaseStatus::Released, LeaseStatus::Released])
                .await
                .unwrap()
        ),
        [released.id]
    );
    assert_eq!(
        names(
            store
                .leases_in_statuses(env.id, LeaseStatus::ALL)
                .await
                .unwrap()
        ),
        [
            failed.id,
            retained_new.id,
            released.id,
            active.id,
            expired.id,
            retained_old.id
        ]
    );
    assert!(
        store
            .leases_in_statuses(env.id, &[])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .leases_in_statuses(other_env.id, &[LeaseStatus::Retained])
            .await
            .unwrap(),
        vec![elsewhere]
    );
    assert!(
        store
            .leases_in_statuses(other_env.id, &[LeaseStatus::Active])
            .await
            .unwrap()
            .is_empty()
    );
}

async fn nonces_are_accepted_once(db: &TestDb) {
    let store = db.store();
    let run = RunId::new();
    assert!(store.remember_nonce(run, "n-1", at(10_000)).await.unwrap());
    assert!(
        !store.remember_nonce(run, "n-1", at(10_000)).await.unwrap(),
        "a replay"
    );
    assert!(
        store
            .remember_nonce(RunId::new(), "n-1", at(10_000))
            .await
            .unwrap(),
        "nonces are per run"
    );

    // Racing replicas: exactly one accepts.
    let racers = (0..16).map(|_| {
        let store = store.clone();
        async move {
            store
                .remember_nonce(run, "raced", at(10_000))
                .await
                .unwrap()
        }
    });
    let accepted = futures::future::join_all(racers).await;
    assert_eq!(accepted.iter().filter(|fresh| **fresh).count(), 1);

    assert!(
        store
            .remember_nonce(run, "later", at(50_000))
            .await
            .unwrap()
    );
    assert_eq!(store.sweep_nonces(at(20_000)).await.unwrap(), 3);
    assert!(
        store.remember_nonce(run, "n-1", at(60_000)).await.unwrap(),
        "expired nonces are forgotten"
    );
    assert!(
        !store
            .remember_nonce(run, "later", at(60_000))
            .await
            .unwrap(),
        "unexpired ones are kept"
    );
}
