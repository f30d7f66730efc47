//! Companies and their API keys.

use berth_core::company::{ApiKey, ApiKeyRole, Company};
use berth_core::ids::{ApiKeyId, CompanyId};
use berth_store::ConflictKind;

use super::{assert_conflict, at, company, new_company};
use crate::support::db::TestDb;

both_backends!(
    companies_round_trip,
    ensure_company_is_safe_under_concurrency,
    api_keys_round_trip,
);

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
