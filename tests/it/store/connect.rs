//! Opening a store: unsupported URLs, and in-memory SQLite.

use berth_core::ErrorKind;
use berth_store::{Backend, Store};

use super::company;

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
