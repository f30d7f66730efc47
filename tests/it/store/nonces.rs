//! Bridge request nonces.

use berth_core::ids::RunId;

use super::at;
use crate::support::db::TestDb;

both_backends!(nonces_are_accepted_once);

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
