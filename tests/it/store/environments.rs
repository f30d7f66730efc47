//! Environments: round trips, the one-Local rule, revisions, cascades, and corrupt rows.

use serde_json::{Map, json};

use berth_core::ErrorKind;
use berth_core::environment::{Driver, Environment, EnvironmentStatus};
use berth_core::ids::{CompanyId, SecretId};
use berth_core::lease::LeaseStatus;
use berth_store::{ConflictKind, EnvironmentFilter, StoreError, StoredSecret};

use super::{Raw, assert_conflict, at, environment, ids, lease, new_company, object};
use crate::support::db::TestDb;

both_backends!(
    environments_round_trip_and_listing,
    a_second_local_environment_conflicts,
    ensure_local_environment_is_safe_under_concurrency,
    updates_check_the_revision,
    missing_environments_are_none,
    deleting_an_environment_cascades_to_its_leases,
    corrupt_rows_are_reported_by_column,
    the_newest_probe_is_kept_beside_its_environment_and_goes_with_it,
);

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

async fn the_newest_probe_is_kept_beside_its_environment_and_goes_with_it(db: &TestDb) {
    use berth_core::probe::ProbeResult;
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let other = new_company(store, "other").await;
    let probed = environment(acme.id, "probed", Driver::Ssh, 1_000);
    let never = environment(acme.id, "never", Driver::Ssh, 1_000);
    let elsewhere = environment(other.id, "elsewhere", Driver::Ssh, 1_000);
    for environment in [&probed, &never, &elsewhere] {
        store.insert_environment(environment).await.unwrap();
    }
    let details = object(json!({"host": "example", "port": 22}));
    let failed = ProbeResult {
        details,
        ..ProbeResult::failed(Driver::Ssh, "connection refused")
    };
    let ok = ProbeResult::ok(Driver::Ssh, "connected", Map::new());

    store
        .record_probe(probed.id, at(2_000), &failed)
        .await
        .unwrap();
    let first = store.last_probe(probed.id).await.unwrap().unwrap();
    assert_eq!((first.environment_id, first.at), (probed.id, at(2_000)));
    assert_eq!(first.result, failed);
    assert_eq!(store.last_probe(never.id).await.unwrap(), None);

    // A newer probe replaces it; an older one finishing late does not.
    store.record_probe(probed.id, at(3_000), &ok).await.unwrap();
    store
        .record_probe(probed.id, at(2_500), &failed)
        .await
        .unwrap();
    let newest = store.last_probe(probed.id).await.unwrap().unwrap();
    assert_eq!((newest.at, &newest.result), (at(3_000), &ok));

    store
        .record_probe(elsewhere.id, at(4_000), &ok)
        .await
        .unwrap();
    let of_acme = store.last_probes_of_company(acme.id).await.unwrap();
    assert_eq!(of_acme.len(), 1, "{of_acme:?}");
    assert_eq!(of_acme[0].environment_id, probed.id);

    // Recording for an environment that is gone fails (the caller logs it); deleting one takes its probe along.
    store.delete_environment(probed.id).await.unwrap();
    assert_eq!(store.last_probe(probed.id).await.unwrap(), None);
    assert!(store.record_probe(probed.id, at(5_000), &ok).await.is_err());
    assert!(
        store
            .last_probes_of_company(acme.id)
            .await
            .unwrap()
            .is_empty()
    );
}
