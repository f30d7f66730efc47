//! Migrations: both backends have the same versions, and applying them twice changes nothing.

use std::collections::BTreeSet;
use std::path::Path;

use berth_store::{Backend, Store};

use super::{Raw, new_company};
use crate::support::db::TestDb;

both_backends!(migrations_apply_and_reapply);

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
