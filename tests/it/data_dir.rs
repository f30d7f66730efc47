//! The data dir and the SQLite database hold every company's secrets and runs: berth keeps them private to its user,
//! also when the operator created them with a wider mode.

use std::os::unix::fs::PermissionsExt;

use crate::support::server::{ServerOptions, TestServer};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_data_dir_and_the_database_files_are_private() {
    // Fresh: created private.
    let server = TestServer::start().await;
    let company = server.default_company().await;
    // A write, so that the WAL and its index exist.
    let (status, _) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            serde_json::json!({"name": "perm", "driver": "sandbox", "config": {"provider": "fake"}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED);
    assert_eq!(mode(&server.data_dir), 0o700);
    for name in [
        "berth.db",
        "berth.db-wal",
        "berth.db-shm",
        "master-key",
        "admin-token",
    ] {
        assert_eq!(mode(&server.data_dir.join(name)), 0o600, "{name}");
    }
    server.stop().await;

    // Made by the operator with wide modes (a shared umask, an old berth): tightened at start-up.
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let database = data_dir.join("berth.db");
    std::fs::write(&database, b"").unwrap();
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = TestServer::start_with(ServerOptions {
        data_dir: Some(data_dir.clone()),
        ..ServerOptions::default()
    })
    .await;
    server.default_company().await;
    assert_eq!(mode(&data_dir), 0o700);
    for name in ["berth.db", "berth.db-wal", "berth.db-shm"] {
        assert_eq!(mode(&data_dir.join(name)), 0o600, "{name}");
    }
    let logs = server.stop().await;
    assert!(logs.contains("made it private (0700)"), "{logs}");
    assert!(logs.contains("made it private (0600)"), "{logs}");
}
