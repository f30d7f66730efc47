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
use berth_core::time::Timestamp;
use berth_server::store::{
    Backend, ConflictKind, EnvironmentFilter, NewActivity, Store, StoreError, StoredSecret,
};

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
