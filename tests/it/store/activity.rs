//! The activity log.

use serde_json::{Value, json};

use berth_core::ids::CompanyId;
use berth_core::time::Timestamp;
use berth_store::NewActivity;

use super::{ids, new_company};
use crate::support::db::TestDb;

both_backends!(activity_is_recorded_in_order);

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
    // Paged by cursor: after an entry's id, at most `limit`, the other company's entries never among them.
    let first = store.list_activity_after(acme.id, 0, 2).await.unwrap();
    assert_eq!(ids(&first, |entry| entry.id), [log[0].id, log[1].id]);
    let rest = store
        .list_activity_after(acme.id, first[1].id, 2)
        .await
        .unwrap();
    assert_eq!(ids(&rest, |entry| entry.id), [log[2].id]);
    assert!(
        store
            .list_activity_after(acme.id, log[2].id, 10)
            .await
            .unwrap()
            .is_empty()
    );
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
