//! Sealed secrets.

use berth_core::ids::{EnvironmentId, SecretId};
use berth_store::StoredSecret;

use super::{at, new_company};
use crate::support::db::TestDb;

both_backends!(secrets_round_trip);

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
