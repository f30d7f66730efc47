//! Run events and their output: seqs, paging, large output (in segment files on SQLite), concurrent appenders.

use serde_json::{Value, json};

use berth_core::ids::RunId;
use berth_core::run::{EventKind, NewRunEvent, RunStatus};
use berth_store::{Backend, Store};

use super::{Raw, as_stored, at, event, ids, insert_runs, new_company, replica, run};
use crate::runs::multibyte_text;
use crate::support::db::TestDb;

both_backends!(
    events_are_listed_after_a_seq,
    large_output_round_trips_and_goes_with_its_run,
    concurrent_appenders_get_dense_seqs,
);

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
