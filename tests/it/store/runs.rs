//! Runs: round trips, final states, heartbeats, cancel requests and orphans.

use serde_json::{Value, json};

use berth_core::environment::{Driver, Environment};
use berth_core::ids::{EnvironmentId, LeaseId, RunId};
use berth_core::run::{EventKind, Run, RunStatus};
use berth_store::{ConflictKind, StoreError};

use super::{Raw, assert_conflict, at, environment, event, insert_runs, new_company, replica, run};
use crate::support::db::TestDb;

both_backends!(
    runs_round_trip_and_listing,
    final_runs_never_change,
    heartbeats_refresh_live_runs_of_their_node,
    cancel_requests_mark_live_runs_only,
    orphaned_runs_are_found_by_owner_or_staleness,
    failing_an_orphaned_run_happens_once,
    runs_outlive_their_environment,
    cancel_requests_are_polled_by_their_owner,
    an_orphan_whose_final_event_was_written_is_settled_as_it_says,
);

async fn runs_round_trip_and_listing(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let other = new_company(store, "other").await;

    let full = Run {
        lease_id: Some(LeaseId::new()),
        command: vec![
            "printf".to_owned(),
            "%s\n".to_owned(),
            "ünïcödé ✓".to_owned(),
            String::new(),
            "\"quoted\" \\ 'and' $(not a shell)".to_owned(),
        ],
        exit_code: Some(-2),
        signal: Some("SIGKILL".to_owned()),
        error: Some("killed by the timeout".to_owned()),
        owner_node: "node-b".to_owned(),
        started_at: Some(at(2_100)),
        finished_at: Some(at(2_900)),
        heartbeat_at: at(2_800),
        cancel_requested: true,
        ..run(acme.id, RunStatus::TimedOut, 2_000)
    };
    let queued = run(acme.id, RunStatus::Queued, 3_000);
    let running = Run {
        started_at: Some(at(1_100)),
        ..run(acme.id, RunStatus::Running, 1_000)
    };
    // Same created_at as `running`: ties are broken by id, newest first.
    let running_twin = run(acme.id, RunStatus::Running, 1_000);
    let succeeded = Run {
        exit_code: Some(0),
        ..run(acme.id, RunStatus::Succeeded, 500)
    };
    let elsewhere = run(other.id, RunStatus::Running, 9_000);
    let all = [
        &full,
        &queued,
        &running,
        &running_twin,
        &succeeded,
        &elsewhere,
    ];
    insert_runs(store, &all).await;

    for sent in all {
        assert_eq!(store.get_run(sent.id).await.unwrap().as_ref(), Some(sent));
    }
    assert_eq!(store.get_run(RunId::new()).await.unwrap(), None);

    assert_eq!(
        store.list_runs(acme.id, None, 100).await.unwrap(),
        vec![
            queued.clone(),
            full.clone(),
            running_twin.clone(),
            running.clone(),
            succeeded.clone()
        ]
    );
    assert_eq!(
        store.list_runs(acme.id, None, 2).await.unwrap(),
        vec![queued.clone(), full.clone()]
    );
    assert!(store.list_runs(acme.id, None, 0).await.unwrap().is_empty());
    assert_eq!(
        store
            .list_runs(acme.id, Some(RunStatus::Running), 100)
            .await
            .unwrap(),
        vec![running_twin.clone(), running.clone()]
    );
    assert_eq!(
        store
            .list_runs(acme.id, Some(RunStatus::Running), 1)
            .await
            .unwrap(),
        vec![running_twin.clone()]
    );
    assert_eq!(
        store
            .list_runs(acme.id, Some(RunStatus::TimedOut), 100)
            .await
            .unwrap(),
        vec![full.clone()]
    );
    assert!(
        store
            .list_runs(acme.id, Some(RunStatus::Cancelled), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.list_runs(other.id, None, 100).await.unwrap(),
        vec![elsewhere.clone()]
    );

    // A duplicate id is a conflict.
    assert_conflict(
        store.insert_run(&queued).await,
        ConflictKind::Other,
        "conflict",
    );
    // The command is stored as a JSON array of strings.
    let mut raw = Raw::connect(db).await;
    let stored = raw
        .text(
            "SELECT command FROM runs WHERE id = $1",
            queued.id.to_string(),
        )
        .await;
    raw.close().await;
    assert_eq!(
        serde_json::from_str::<Value>(&stored).unwrap(),
        json!(["sh", "-c", "echo \"$1\"; exit 3"])
    );

    // Anything but an array of strings is a corrupt row, reported by column.
    const BREAK_COMMAND: &str = "UPDATE runs SET command = '{\"argv\": \"rm -rf\"}' WHERE id = $1";
    let mut raw = Raw::connect(db).await;
    assert_eq!(raw.execute(BREAK_COMMAND, queued.id.to_string()).await, 1);
    raw.close().await;
    let err = store.get_run(queued.id).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::CorruptRow {
                table: "runs",
                column: "command"
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains("rm -rf"), "{err}");
}

async fn final_runs_never_change(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let queued = run(acme.id, RunStatus::Queued, 1_000);
    insert_runs(store, &[&queued]).await;

    let lease_id = LeaseId::new();
    let running = Run {
        status: RunStatus::Running,
        lease_id: Some(lease_id),
        started_at: Some(at(1_500)),
        ..queued.clone()
    };
    assert!(store.update_run(&running).await.unwrap());
    assert_eq!(
        store.get_run(queued.id).await.unwrap(),
        Some(running.clone())
    );

    let succeeded = Run {
        status: RunStatus::Succeeded,
        exit_code: Some(0),
        finished_at: Some(at(2_000)),
        // Not written by update_run: owner, command, heartbeat and the cancel flag have their own paths.
        owner_node: "someone-else".to_owned(),
        command: vec!["rm".to_owned()],
        heartbeat_at: at(99_999),
        cancel_requested: true,
        ..running.clone()
    };
    assert!(store.update_run(&succeeded).await.unwrap());
    let expected = Run {
        status: RunStatus::Succeeded,
        exit_code: Some(0),
        finished_at: Some(at(2_000)),
        ..running.clone()
    };
    assert_eq!(
        store.get_run(queued.id).await.unwrap(),
        Some(expected.clone())
    );

    // A final status never changes: not to another final status, not back to a live one.
    for late in [
        Run {
            status: RunStatus::Failed,
            error: Some("too late".to_owned()),
            ..expected.clone()
        },
        Run {
            status: RunStatus::Cancelled,
            signal: Some("SIGTERM".to_owned()),
            ..expected.clone()
        },
        Run {
            status: RunStatus::Running,
            finished_at: None,
            ..expected.clone()
        },
    ] {
        assert!(!store.update_run(&late).await.unwrap());
    }
    assert_eq!(store.get_run(queued.id).await.unwrap(), Some(expected));

    // A missing run is not written either.
    assert!(
        !store
            .update_run(&run(acme.id, RunStatus::Running, 1))
            .await
            .unwrap()
    );
}

async fn heartbeats_refresh_live_runs_of_their_node(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let queued = run(acme.id, RunStatus::Queued, 1_000);
    let running = run(acme.id, RunStatus::Running, 1_100);
    let cancelling = Run {
        cancel_requested: true,
        ..run(acme.id, RunStatus::Running, 1_200)
    };
    let finished = Run {
        cancel_requested: true,
        ..run(acme.id, RunStatus::Cancelled, 1_300)
    };
    let elsewhere = Run {
        owner_node: "node-b".to_owned(),
        cancel_requested: true,
        ..run(acme.id, RunStatus::Running, 1_400)
    };
    insert_runs(
        store,
        &[&queued, &running, &cancelling, &finished, &elsewhere],
    )
    .await;

    assert_eq!(
        store.heartbeat_runs("node-a", at(5_000)).await.unwrap(),
        vec![cancelling.id]
    );
    for (sent, heartbeat) in [
        (&queued, 5_000),
        (&running, 5_000),
        (&cancelling, 5_000),
        (&finished, 1_300),
        (&elsewhere, 1_400),
    ] {
        let stored = store.get_run(sent.id).await.unwrap().unwrap();
        assert_eq!(
            stored,
            Run {
                heartbeat_at: at(heartbeat),
                ..sent.clone()
            }
        );
    }

    assert!(
        store
            .heartbeat_runs("node-z", at(6_000))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.heartbeat_runs("node-b", at(6_000)).await.unwrap(),
        vec![elsewhere.id]
    );
    assert_eq!(
        store
            .get_run(elsewhere.id)
            .await
            .unwrap()
            .unwrap()
            .heartbeat_at,
        at(6_000)
    );
}

async fn cancel_requests_mark_live_runs_only(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let running = run(acme.id, RunStatus::Running, 1_000);
    let queued = run(acme.id, RunStatus::Queued, 1_000);
    let finished = Run {
        exit_code: Some(1),
        ..run(acme.id, RunStatus::Failed, 1_000)
    };
    insert_runs(store, &[&running, &queued, &finished]).await;

    for live in [&running, &queued] {
        let expected = Run {
            cancel_requested: true,
            ..live.clone()
        };
        assert_eq!(
            store.request_cancel(live.id).await.unwrap(),
            Some(expected.clone())
        );
        // Asking again is harmless.
        assert_eq!(
            store.request_cancel(live.id).await.unwrap(),
            Some(expected.clone())
        );
        assert_eq!(store.get_run(live.id).await.unwrap(), Some(expected));
    }

    assert_eq!(
        store.request_cancel(finished.id).await.unwrap(),
        Some(finished.clone())
    );
    assert_eq!(store.get_run(finished.id).await.unwrap(), Some(finished));
    assert_eq!(store.request_cancel(RunId::new()).await.unwrap(), None);

    // The owner learns about both requests with its next heartbeat.
    let mut requested = store.heartbeat_runs("node-a", at(2_000)).await.unwrap();
    requested.sort();
    let mut expected = vec![running.id, queued.id];
    expected.sort();
    assert_eq!(requested, expected);
}

async fn cancel_requests_are_polled_by_their_owner(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let owned_by = |owner: &str, status: RunStatus| Run {
        owner_node: owner.to_owned(),
        ..run(acme.id, status, 1_000)
    };
    let running = owned_by("node-a", RunStatus::Running);
    let queued = owned_by("node-a", RunStatus::Queued);
    let not_asked = owned_by("node-a", RunStatus::Running);
    let elsewhere = owned_by("node-b", RunStatus::Running);
    insert_runs(store, &[&running, &queued, &not_asked, &elsewhere]).await;
    assert_eq!(store.cancel_requested_runs("node-a").await.unwrap(), []);

    // Asked through another replica: the owner's poll finds exactly its own live runs that were asked.
    let other = replica(db).await;
    for asked in [&running, &queued, &elsewhere] {
        other.request_cancel(asked.id).await.unwrap();
    }
    let mut found = store.cancel_requested_runs("node-a").await.unwrap();
    found.sort();
    let mut expected = vec![running.id, queued.id];
    expected.sort();
    assert_eq!(found, expected);
    assert_eq!(
        store.cancel_requested_runs("node-b").await.unwrap(),
        [elsewhere.id]
    );

    // Once final, a run is no longer asked about.
    let cancelled = Run {
        status: RunStatus::Cancelled,
        finished_at: Some(at(2_000)),
        ..running.clone()
    };
    assert!(store.update_run(&cancelled).await.unwrap());
    assert_eq!(
        store.cancel_requested_runs("node-a").await.unwrap(),
        [queued.id]
    );
    other.close().await;
}

async fn an_orphan_whose_final_event_was_written_is_settled_as_it_says(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let died_after_final_event = Run {
        heartbeat_at: at(1_000),
        ..run(acme.id, RunStatus::Running, 1_000)
    };
    let died_mid_output = Run {
        heartbeat_at: at(1_000),
        ..run(acme.id, RunStatus::Running, 1_000)
    };
    insert_runs(store, &[&died_after_final_event, &died_mid_output]).await;
    assert_eq!(
        store
            .last_status_event(died_after_final_event.id)
            .await
            .unwrap(),
        None
    );
    let final_data = json!({"status": "failed", "exitCode": 3, "signal": null, "error": null});
    store
        .append_events(
            died_after_final_event.id,
            vec![
                event(EventKind::Status, json!({"status": "queued"})),
                event(EventKind::Stdout, json!({"text": "out\n"})),
                event(EventKind::Status, final_data.clone()),
            ],
        )
        .await
        .unwrap();
    store
        .append_events(
            died_mid_output.id,
            vec![
                event(EventKind::Status, json!({"status": "running"})),
                event(EventKind::Stdout, json!({"text": "partial"})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .last_status_event(died_after_final_event.id)
            .await
            .unwrap(),
        Some(final_data)
    );
    assert_eq!(
        store.last_status_event(died_mid_output.id).await.unwrap(),
        None
    );

    // Settled once, as the event says, by whichever sweeper gets there first; a final run never changes again.
    let settled = Run {
        status: RunStatus::Failed,
        exit_code: Some(3),
        finished_at: Some(at(9_000)),
        ..died_after_final_event.clone()
    };
    let stale_before = at(5_000);
    assert!(
        store
            .settle_orphaned_run(&settled, "", stale_before)
            .await
            .unwrap()
    );
    assert!(
        !replica(db)
            .await
            .settle_orphaned_run(&settled, "", stale_before)
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_run(died_after_final_event.id).await.unwrap(),
        Some(settled)
    );
    // Not an orphan by the rules (its heartbeat is fresh and its owner is another node): left alone.
    let fresh = Run {
        status: RunStatus::Succeeded,
        ..died_mid_output.clone()
    };
    assert!(
        !store
            .settle_orphaned_run(&fresh, "node-b", at(500))
            .await
            .unwrap()
    );
}

async fn orphaned_runs_are_found_by_owner_or_staleness(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let stale_before = at(8_000);
    let node = |owner: &str, status: RunStatus, created_at: i64, heartbeat: i64| Run {
        owner_node: owner.to_owned(),
        heartbeat_at: at(heartbeat),
        ..run(acme.id, status, created_at)
    };
    // This node restarted: all of its live runs are orphans, fresh heartbeat or not.
    let mine_fresh = node("node-a", RunStatus::Running, 1_000, 9_500);
    let mine_queued = node("node-a", RunStatus::Queued, 3_000, 9_900);
    let mine_finished = node("node-a", RunStatus::Succeeded, 500, 1_000);
    // Other nodes: only a stale heartbeat makes an orphan.
    let others_fresh = node("node-b", RunStatus::Running, 1_500, 9_000);
    let others_at_the_limit = node("node-b", RunStatus::Running, 1_600, 8_000);
    let others_stale = node("node-c", RunStatus::Running, 2_000, 7_999);
    let others_stale_finished = node("node-c", RunStatus::Failed, 100, 10);
    insert_runs(
        store,
        &[
            &mine_fresh,
            &mine_queued,
            &mine_finished,
            &others_fresh,
            &others_at_the_limit,
            &others_stale,
            &others_stale_finished,
        ],
    )
    .await;

    assert_eq!(
        store.orphaned_runs("node-a", stale_before).await.unwrap(),
        vec![
            mine_fresh.clone(),
            others_stale.clone(),
            mine_queued.clone()
        ]
    );
    // Seen from node-b (which did not restart), its own fresh runs are not orphans.
    assert_eq!(
        store.orphaned_runs("node-z", stale_before).await.unwrap(),
        vec![others_stale.clone()]
    );

    // Failing follows the same rules.
    for not_an_orphan in [
        &others_fresh,
        &others_at_the_limit,
        &mine_finished,
        &others_stale_finished,
    ] {
        assert!(
            !store
                .fail_orphaned_run(
                    not_an_orphan.id,
                    "node-a",
                    stale_before,
                    "orphaned",
                    at(10_000)
                )
                .await
                .unwrap()
        );
        assert_eq!(
            store.get_run(not_an_orphan.id).await.unwrap().as_ref(),
            Some(not_an_orphan)
        );
    }
    for orphan in [&mine_fresh, &others_stale] {
        assert!(
            store
                .fail_orphaned_run(
                    orphan.id,
                    "node-a",
                    stale_before,
                    "the node executing it stopped",
                    at(10_000)
                )
                .await
                .unwrap()
        );
        assert_eq!(
            store.get_run(orphan.id).await.unwrap(),
            Some(Run {
                status: RunStatus::Failed,
                error: Some("the node executing it stopped".to_owned()),
                finished_at: Some(at(10_000)),
                ..orphan.clone()
            })
        );
    }
    assert!(
        !store
            .fail_orphaned_run(RunId::new(), "node-a", stale_before, "orphaned", at(10_000))
            .await
            .unwrap()
    );
    assert_eq!(
        store.orphaned_runs("node-a", stale_before).await.unwrap(),
        vec![mine_queued]
    );
}

async fn failing_an_orphaned_run_happens_once(db: &TestDb) {
    let acme = new_company(db.store(), "acme").await;
    let orphan = Run {
        owner_node: "dead-node".to_owned(),
        ..run(acme.id, RunStatus::Running, 1_000)
    };
    insert_runs(db.store(), &[&orphan]).await;

    let replicas = [db.store().clone(), replica(db).await];
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = replicas[i % 2].clone();
            let node = format!("sweeper-{i}");
            tokio::spawn(async move {
                store
                    .fail_orphaned_run(
                        orphan.id,
                        &node,
                        at(5_000),
                        &format!("failed by {node}"),
                        at(6_000),
                    )
                    .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if task.await.unwrap().unwrap() {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");

    let stored = db.store().get_run(orphan.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed);
    assert_eq!(
        stored.error,
        Some(format!("failed by sweeper-{}", winners[0]))
    );
    // The owner coming back cannot overwrite the outcome.
    let recovered = Run {
        status: RunStatus::Succeeded,
        exit_code: Some(0),
        ..orphan.clone()
    };
    assert!(!db.store().update_run(&recovered).await.unwrap());
    assert_eq!(db.store().get_run(orphan.id).await.unwrap(), Some(stored));
    replicas[1].close().await;
}

async fn runs_outlive_their_environment(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "box", Driver::Ssh, 1_000);
    let other_env = environment(acme.id, "other", Driver::Ssh, 1_000);
    store.insert_environment(&env).await.unwrap();
    store.insert_environment(&other_env).await.unwrap();
    let on = |environment: &Environment, status: RunStatus, created_at: i64| Run {
        environment_id: environment.id,
        ..run(acme.id, status, created_at)
    };
    let running = on(&env, RunStatus::Running, 2_000);
    let queued = on(&env, RunStatus::Queued, 1_000);
    let finished = on(&env, RunStatus::Succeeded, 500);
    let elsewhere = on(&other_env, RunStatus::Running, 1_500);
    insert_runs(store, &[&running, &queued, &finished, &elsewhere]).await;

    assert_eq!(
        store.live_runs_of_environment(env.id).await.unwrap(),
        vec![queued.clone(), running.clone()]
    );
    assert_eq!(
        store.live_runs_of_environment(other_env.id).await.unwrap(),
        vec![elsewhere]
    );
    assert!(
        store
            .live_runs_of_environment(EnvironmentId::new())
            .await
            .unwrap()
            .is_empty()
    );

    let events = store
        .append_events(
            finished.id,
            vec![event(EventKind::Status, json!({"status": "succeeded"}))],
        )
        .await
        .unwrap();
    store.delete_environment(env.id).await.unwrap();
    for kept in [&running, &queued, &finished] {
        assert_eq!(store.get_run(kept.id).await.unwrap().as_ref(), Some(kept));
    }
    assert_eq!(store.list_events(finished.id, 0, 10).await.unwrap(), events);
}
