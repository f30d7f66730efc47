//! Leases: round trips, state transitions, handles and cleanup, and the sweeps' queries.

use serde_json::json;

use berth_core::environment::Driver;
use berth_core::ids::{LeaseId, RunId};
use berth_core::lease::{CleanupStatus, Lease, LeasePolicy, LeaseStatus};
use berth_core::run::{Run, RunStatus};

use super::{
    assert_conflict, at, environment, ids, insert_runs, lease, new_company, object, replica, run,
    sole_winner,
};
use crate::support::db::TestDb;

both_backends!(
    leases_round_trip_and_listing,
    lease_transitions_happen_once,
    a_retained_lease_is_claimed_or_released_once,
    an_environment_holds_at_most_one_reusable_lease,
    lease_handles_and_cleanup_are_recorded,
    orphaned_leases_are_active_leases_without_a_live_run,
    expired_leases_are_found,
    leases_are_listed_by_statuses,
    unfinished_leases_keep_the_configs_they_were_acquired_with,
    a_lease_records_the_process_group_of_its_command,
    stuck_cleanups_of_failed_leases_are_found_and_claimed_once,
);

async fn leases_round_trip_and_listing(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    let other_env = environment(acme.id, "other", Driver::Ssh, 1_000);
    store.insert_environment(&env).await.unwrap();
    store.insert_environment(&other_env).await.unwrap();

    let full = Lease {
        run_id: Some(RunId::new()),
        lease_policy: LeasePolicy::RetainOnFailure,
        provider: Some("fake".to_owned()),
        provider_lease_id: Some("sbx-123".to_owned()),
        expires_at: Some(at(9_000)),
        released_at: Some(at(8_000)),
        failure_reason: Some("exit status 3".to_owned()),
        cleanup_status: Some(CleanupStatus::Failed),
        metadata: Some(object(json!({"sandboxUrl": "https://sbx.example/123"}))),
        acquired_config: Some(object(
            json!({"provider": "fake", "apiKey": {"secretRef": "x"}}),
        )),
        ..lease(&env, LeaseStatus::Retained, 300)
    };
    let released = Lease {
        lease_policy: LeasePolicy::ReuseByEnvironment,
        cleanup_status: Some(CleanupStatus::Success),
        ..lease(&env, LeaseStatus::Released, 100)
    };
    let active = lease(&env, LeaseStatus::Active, 200);
    let elsewhere = lease(&other_env, LeaseStatus::Active, 999);
    for lease in [&full, &released, &active, &elsewhere] {
        store.insert_lease(lease).await.unwrap();
    }

    for lease in [&full, &released, &active, &elsewhere] {
        assert_eq!(
            store.get_lease(lease.id).await.unwrap().as_ref(),
            Some(lease)
        );
    }
    assert_eq!(store.get_lease(LeaseId::new()).await.unwrap(), None);

    assert_eq!(
        store.list_leases(env.id, None).await.unwrap(),
        vec![full.clone(), active.clone(), released.clone()]
    );
    assert_eq!(
        store
            .list_leases(env.id, Some(LeaseStatus::Active))
            .await
            .unwrap(),
        vec![active]
    );
    assert_eq!(
        store
            .list_leases(env.id, Some(LeaseStatus::Retained))
            .await
            .unwrap(),
        vec![full]
    );
    assert!(
        store
            .list_leases(env.id, Some(LeaseStatus::Expired))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.list_leases(other_env.id, None).await.unwrap(),
        vec![elsewhere]
    );
}

async fn lease_transitions_happen_once(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let active = Lease {
        run_id: Some(RunId::new()),
        provider: Some("fake".to_owned()),
        provider_lease_id: Some("sbx-1".to_owned()),
        failure_reason: Some("stale".to_owned()),
        ..lease(&env, LeaseStatus::Active, 100)
    };
    store.insert_lease(&active).await.unwrap();

    let replicas = [store.clone(), replica(db).await];
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = replicas[i % 2].clone();
            tokio::spawn(async move {
                store
                    .transition_lease(
                        active.id,
                        LeaseStatus::Active,
                        LeaseStatus::Released,
                        None,
                        Some(CleanupStatus::Pending),
                        at(5_000 + i as i64),
                    )
                    .await
            })
        })
        .collect();
    let released = sole_winner(tasks).await;
    let now = released.last_used_at;
    assert!((5_000..5_016).contains(&now.unix_millis()));
    let expected = Lease {
        status: LeaseStatus::Released,
        released_at: Some(now),
        last_used_at: now,
        failure_reason: None,
        cleanup_status: Some(CleanupStatus::Pending),
        ..active.clone()
    };
    assert_eq!(released, expected);
    assert_eq!(
        store.get_lease(active.id).await.unwrap(),
        Some(expected.clone())
    );

    // Whoever won reports the cleanup outcome.
    store
        .set_lease_cleanup_status(active.id, CleanupStatus::Success)
        .await
        .unwrap();
    let cleaned = Lease {
        cleanup_status: Some(CleanupStatus::Success),
        ..expected
    };
    assert_eq!(
        store.get_lease(active.id).await.unwrap(),
        Some(cleaned.clone())
    );

    // From a status it is no longer in, nothing happens; a missing lease neither.
    assert_eq!(
        store
            .transition_lease(
                active.id,
                LeaseStatus::Active,
                LeaseStatus::Failed,
                Some("x"),
                None,
                at(9_000)
            )
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.get_lease(active.id).await.unwrap(), Some(cleaned));
    assert_eq!(
        store
            .transition_lease(
                LeaseId::new(),
                LeaseStatus::Active,
                LeaseStatus::Released,
                None,
                None,
                at(9_000)
            )
            .await
            .unwrap(),
        None
    );

    // Retaining keeps the lease open (no released_at) and records why; failing closes it.
    let kept = lease(&env, LeaseStatus::Active, 100);
    let failed = lease(&env, LeaseStatus::Active, 100);
    store.insert_lease(&kept).await.unwrap();
    store.insert_lease(&failed).await.unwrap();
    assert_eq!(
        store
            .transition_lease(
                kept.id,
                LeaseStatus::Active,
                LeaseStatus::Retained,
                Some("exit status 3"),
                None,
                at(6_000)
            )
            .await
            .unwrap(),
        Some(Lease {
            status: LeaseStatus::Retained,
            failure_reason: Some("exit status 3".to_owned()),
            last_used_at: at(6_000),
            ..kept.clone()
        })
    );
    assert_eq!(
        store
            .transition_lease(
                failed.id,
                LeaseStatus::Active,
                LeaseStatus::Failed,
                Some("provider refused"),
                Some(CleanupStatus::Failed),
                at(6_500)
            )
            .await
            .unwrap(),
        Some(Lease {
            status: LeaseStatus::Failed,
            released_at: Some(at(6_500)),
            failure_reason: Some("provider refused".to_owned()),
            cleanup_status: Some(CleanupStatus::Failed),
            last_used_at: at(6_500),
            ..failed.clone()
        })
    );
    replicas[1].close().await;
}

async fn a_retained_lease_is_claimed_or_released_once(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let retained = Lease {
        lease_policy: LeasePolicy::ReuseByEnvironment,
        provider_lease_id: Some("sbx-keep".to_owned()),
        failure_reason: Some("exit status 1".to_owned()),
        ..lease(&env, LeaseStatus::Retained, 100)
    };
    store.insert_lease(&retained).await.unwrap();

    // Half the callers are new runs claiming the lease for reuse, half are sweepers releasing it.
    let replicas = [store.clone(), replica(db).await];
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = replicas[i % 2].clone();
            let to = if i % 4 < 2 {
                LeaseStatus::Active
            } else {
                LeaseStatus::Released
            };
            tokio::spawn(async move {
                store
                    .transition_lease(
                        retained.id,
                        LeaseStatus::Retained,
                        to,
                        None,
                        None,
                        at(2_000),
                    )
                    .await
            })
        })
        .collect();
    let winner = sole_winner(tasks).await;
    let released_at = (winner.status == LeaseStatus::Released).then_some(at(2_000));
    assert_eq!(
        winner,
        Lease {
            status: winner.status,
            released_at,
            failure_reason: None,
            last_used_at: at(2_000),
            ..retained.clone()
        }
    );
    assert_eq!(
        store.get_lease(retained.id).await.unwrap(),
        Some(winner.clone())
    );

    // A claimed lease goes back to retained after its run, and can be claimed again.
    if winner.status == LeaseStatus::Active {
        assert!(
            store
                .transition_lease(
                    retained.id,
                    LeaseStatus::Active,
                    LeaseStatus::Retained,
                    None,
                    None,
                    at(3_000)
                )
                .await
                .unwrap()
                .is_some()
        );
        let again = store
            .transition_lease(
                retained.id,
                LeaseStatus::Retained,
                LeaseStatus::Active,
                None,
                None,
                at(4_000),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.status, LeaseStatus::Active);
        assert_eq!(again.released_at, None);
    }
    replicas[1].close().await;
}

async fn an_environment_holds_at_most_one_reusable_lease(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    let other_env = environment(acme.id, "other", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    store.insert_environment(&other_env).await.unwrap();
    let reusable = |env: &berth_core::environment::Environment| Lease {
        run_id: Some(RunId::new()),
        lease_policy: LeasePolicy::ReuseByEnvironment,
        ..lease(env, LeaseStatus::Active, 100)
    };

    // Runs on two replicas race to take the environment's reusable lease: the database lets exactly one in.
    let replicas = [store.clone(), replica(db).await];
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let store = replicas[i % 2].clone();
            let candidate = reusable(&env);
            tokio::spawn(async move { store.insert_lease(&candidate).await.map(|()| candidate) })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(inserted) => winners.push(inserted),
            Err(error) => assert_held(Err::<(), _>(error)),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let holder = winners.remove(0);
    assert_eq!(
        store.list_leases(env.id, None).await.unwrap(),
        vec![holder.clone()]
    );

    // Not covered: ephemeral leases beside it, another environment's, and reusable leases kept or cleaned up.
    let others = [
        lease(&env, LeaseStatus::Active, 100),
        reusable(&other_env),
        Lease {
            status: LeaseStatus::Retained,
            ..reusable(&env)
        },
        Lease {
            status: LeaseStatus::Released,
            cleanup_status: Some(CleanupStatus::Success),
            ..reusable(&env)
        },
    ];
    for other in &others {
        store.insert_lease(other).await.unwrap();
    }
    // A reusable lease whose sandbox is still being destroyed is held too.
    let being_destroyed = Lease {
        status: LeaseStatus::Released,
        cleanup_status: Some(CleanupStatus::Pending),
        ..reusable(&env)
    };
    assert_held(store.insert_lease(&being_destroyed).await);

    // Once the holder's run keeps its lease, the next run takes the reusable lease; the kept one can neither become
    // active beside it nor expire into a pending destruction while it is held.
    store
        .transition_lease(
            holder.id,
            LeaseStatus::Active,
            LeaseStatus::Retained,
            None,
            None,
            at(2_000),
        )
        .await
        .unwrap()
        .unwrap();
    let next = reusable(&env);
    replicas[1].insert_lease(&next).await.unwrap();
    for (to, cleanup) in [
        (LeaseStatus::Active, None),
        (LeaseStatus::Expired, Some(CleanupStatus::Pending)),
    ] {
        assert_held(
            store
                .transition_lease(
                    holder.id,
                    LeaseStatus::Retained,
                    to,
                    None,
                    cleanup,
                    at(3_000),
                )
                .await,
        );
    }
    let held: Vec<LeaseId> = store
        .list_leases(env.id, Some(LeaseStatus::Active))
        .await
        .unwrap()
        .into_iter()
        .filter(|lease| lease.lease_policy == LeasePolicy::ReuseByEnvironment)
        .map(|lease| lease.id)
        .collect();
    assert_eq!(held, vec![next.id]);

    // The next run's lease is released by a sweep: held until its cleanup is over, then free.
    store
        .transition_lease(
            next.id,
            LeaseStatus::Active,
            LeaseStatus::Released,
            None,
            Some(CleanupStatus::Pending),
            at(4_000),
        )
        .await
        .unwrap()
        .unwrap();
    assert_held(store.insert_lease(&reusable(&env)).await);
    store
        .set_lease_cleanup_status(next.id, CleanupStatus::Success)
        .await
        .unwrap();
    store.insert_lease(&reusable(&env)).await.unwrap();
    replicas[1].close().await;
}

#[track_caller]
fn assert_held<T: std::fmt::Debug>(result: Result<T, berth_store::StoreError>) {
    assert_conflict(
        result,
        berth_store::ConflictKind::ReusableLeaseHeld,
        "reusable_lease_held",
    );
}

async fn lease_handles_and_cleanup_are_recorded(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let acquiring = lease(&env, LeaseStatus::Active, 100);
    let untouched = lease(&env, LeaseStatus::Active, 100);
    store.insert_lease(&acquiring).await.unwrap();
    store.insert_lease(&untouched).await.unwrap();

    let metadata = object(json!({"sandboxUrl": "https://sbx.example/1", "n": 1}));
    store
        .update_lease_handle(
            acquiring.id,
            Some("fake"),
            Some("sbx-1"),
            Some(&metadata),
            Some(at(90_000)),
            at(1_500),
        )
        .await
        .unwrap();
    let handled = Lease {
        provider: Some("fake".to_owned()),
        provider_lease_id: Some("sbx-1".to_owned()),
        metadata: Some(metadata),
        expires_at: Some(at(90_000)),
        last_used_at: at(1_500),
        ..acquiring.clone()
    };
    assert_eq!(
        store.get_lease(acquiring.id).await.unwrap(),
        Some(handled.clone())
    );

    // Every field is written as given, NULLs included.
    store
        .update_lease_handle(acquiring.id, None, None, None, None, at(1_600))
        .await
        .unwrap();
    assert_eq!(
        store.get_lease(acquiring.id).await.unwrap(),
        Some(Lease {
            last_used_at: at(1_600),
            ..acquiring.clone()
        })
    );

    store
        .set_lease_cleanup_status(acquiring.id, CleanupStatus::Pending)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_lease(acquiring.id)
            .await
            .unwrap()
            .unwrap()
            .cleanup_status,
        Some(CleanupStatus::Pending)
    );
    assert_eq!(
        store.get_lease(untouched.id).await.unwrap(),
        Some(untouched)
    );

    // A lease that went away with its environment is not an error.
    store
        .update_lease_handle(LeaseId::new(), Some("fake"), None, None, None, at(1))
        .await
        .unwrap();
    store
        .set_lease_cleanup_status(LeaseId::new(), CleanupStatus::Success)
        .await
        .unwrap();
}

async fn orphaned_leases_are_active_leases_without_a_live_run(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let live = run(acme.id, RunStatus::Running, 1_000);
    let queued = run(acme.id, RunStatus::Queued, 1_000);
    let finished = run(acme.id, RunStatus::Succeeded, 1_000);
    insert_runs(store, &[&live, &queued, &finished]).await;

    let held_by = |run_id: Option<RunId>, status: LeaseStatus, acquired_at: i64| Lease {
        run_id,
        acquired_at: at(acquired_at),
        ..lease(&env, status, 100)
    };
    let of_live_run = held_by(Some(live.id), LeaseStatus::Active, 10);
    let of_queued_run = held_by(Some(queued.id), LeaseStatus::Active, 20);
    let of_finished_run = held_by(Some(finished.id), LeaseStatus::Active, 300);
    let without_run = held_by(None, LeaseStatus::Active, 100);
    let of_missing_run = held_by(Some(RunId::new()), LeaseStatus::Active, 200);
    let released = held_by(Some(finished.id), LeaseStatus::Released, 1);
    let retained = held_by(None, LeaseStatus::Retained, 2);
    for lease in [
        &of_live_run,
        &of_queued_run,
        &of_finished_run,
        &without_run,
        &of_missing_run,
        &released,
        &retained,
    ] {
        store.insert_lease(lease).await.unwrap();
    }

    assert_eq!(
        store.orphaned_leases(100).await.unwrap(),
        vec![
            without_run.clone(),
            of_missing_run.clone(),
            of_finished_run.clone()
        ]
    );
    assert_eq!(
        store.orphaned_leases(2).await.unwrap(),
        vec![without_run.clone(), of_missing_run.clone()]
    );

    // Once the live run finishes, its lease is an orphan too.
    let done = Run {
        status: RunStatus::Failed,
        ..live.clone()
    };
    assert!(store.update_run(&done).await.unwrap());
    assert_eq!(
        ids(&store.orphaned_leases(100).await.unwrap(), |lease| lease.id),
        [
            of_live_run.id,
            without_run.id,
            of_missing_run.id,
            of_finished_run.id
        ]
    );
}

async fn expired_leases_are_found(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let expiring = |status: LeaseStatus, expires_at: Option<i64>| Lease {
        expires_at: expires_at.map(at),
        ..lease(&env, status, 100)
    };
    let active_expired = expiring(LeaseStatus::Active, Some(4_000));
    let retained_expired = expiring(LeaseStatus::Retained, Some(3_000));
    let released_expired = expiring(LeaseStatus::Released, Some(1_000));
    let already_expired = expiring(LeaseStatus::Expired, Some(1_000));
    let expires_now = expiring(LeaseStatus::Active, Some(5_000));
    let later = expiring(LeaseStatus::Retained, Some(6_000));
    let never = expiring(LeaseStatus::Active, None);
    for lease in [
        &active_expired,
        &retained_expired,
        &released_expired,
        &already_expired,
        &expires_now,
        &later,
        &never,
    ] {
        store.insert_lease(lease).await.unwrap();
    }

    assert_eq!(
        store.expired_leases(at(5_000), 100).await.unwrap(),
        vec![retained_expired.clone(), active_expired.clone()]
    );
    assert_eq!(
        store.expired_leases(at(5_000), 1).await.unwrap(),
        vec![retained_expired.clone()]
    );
    assert_eq!(
        ids(
            &store.expired_leases(at(100_000), 100).await.unwrap(),
            |lease| lease.id
        ),
        [
            retained_expired.id,
            active_expired.id,
            expires_now.id,
            later.id
        ]
    );
    assert!(
        store
            .expired_leases(at(3_000), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn leases_are_listed_by_statuses(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    let other_env = environment(acme.id, "other", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    store.insert_environment(&other_env).await.unwrap();
    let active = lease(&env, LeaseStatus::Active, 300);
    let retained_old = lease(&env, LeaseStatus::Retained, 100);
    let retained_new = lease(&env, LeaseStatus::Retained, 500);
    let released = lease(&env, LeaseStatus::Released, 400);
    let expired = lease(&env, LeaseStatus::Expired, 200);
    let failed = lease(&env, LeaseStatus::Failed, 600);
    let elsewhere = lease(&other_env, LeaseStatus::Retained, 999);
    for lease in [
        &active,
        &retained_old,
        &retained_new,
        &released,
        &expired,
        &failed,
        &elsewhere,
    ] {
        store.insert_lease(lease).await.unwrap();
    }

    let names = |leases: Vec<Lease>| ids(&leases, |lease| lease.id);
    assert_eq!(
        store
            .leases_in_statuses(env.id, &[LeaseStatus::Retained, LeaseStatus::Active])
            .await
            .unwrap(),
        vec![retained_new.clone(), active.clone(), retained_old.clone()]
    );
    assert_eq!(
        names(
            store
                .leases_in_statuses(env.id, &[LeaseStatus::Released, LeaseStatus::Released])
                .await
                .unwrap()
        ),
        [released.id]
    );
    assert_eq!(
        names(
            store
                .leases_in_statuses(env.id, LeaseStatus::ALL)
                .await
                .unwrap()
        ),
        [
            failed.id,
            retained_new.id,
            released.id,
            active.id,
            expired.id,
            retained_old.id
        ]
    );
    assert!(
        store
            .leases_in_statuses(env.id, &[])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .leases_in_statuses(other_env.id, &[LeaseStatus::Retained])
            .await
            .unwrap(),
        vec![elsewhere]
    );
    assert!(
        store
            .leases_in_statuses(other_env.id, &[LeaseStatus::Active])
            .await
            .unwrap()
            .is_empty()
    );
}

async fn unfinished_leases_keep_the_configs_they_were_acquired_with(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let config = |n: u32| Some(object(json!({"provider": "fake", "n": n})));
    let with = |status, cleanup, n| Lease {
        cleanup_status: cleanup,
        acquired_config: config(n),
        ..lease(&env, status, 100)
    };
    for lease in [
        with(LeaseStatus::Active, None, 1),
        with(LeaseStatus::Retained, None, 2),
        with(LeaseStatus::Released, Some(CleanupStatus::Pending), 3),
        with(LeaseStatus::Released, Some(CleanupStatus::Success), 4),
        with(LeaseStatus::Failed, None, 5),
        lease(&env, LeaseStatus::Active, 100),
    ] {
        store.insert_lease(&lease).await.unwrap();
    }
    let mut found: Vec<u64> = store
        .unfinished_lease_configs(env.id)
        .await
        .unwrap()
        .iter()
        .map(|config| config["n"].as_u64().unwrap())
        .collect();
    found.sort_unstable();
    assert_eq!(
        found,
        [1, 2, 3],
        "active, retained and cleanup-pending leases only"
    );
}

async fn a_lease_records_the_process_group_of_its_command(db: &TestDb) {
    use berth_core::driver::ProcessIdentity;

    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "local", Driver::Local, 1_000);
    store.insert_environment(&env).await.unwrap();
    let running = lease(&env, LeaseStatus::Active, 100);
    let neighbour = lease(&env, LeaseStatus::Active, 200);
    for lease in [&running, &neighbour] {
        store.insert_lease(lease).await.unwrap();
    }
    assert_eq!(store.lease_process(running.id).await.unwrap(), None);

    let identity = ProcessIdentity {
        pgid: 4242,
        session_id: 4200,
        start_ticks: 9_876_543_210,
        boot_id: "ee0713b0-884c-45d0-96f9-9b08de66ebaa".to_owned(),
        cgroup: Some("/sys/fs/cgroup/berth/run-1".to_owned()),
    };
    store
        .set_lease_process(running.id, Some(&identity))
        .await
        .unwrap();
    assert_eq!(
        store.lease_process(running.id).await.unwrap(),
        Some(identity.clone())
    );
    assert_eq!(store.lease_process(neighbour.id).await.unwrap(), None);
    // Recording it changes nothing else of the lease.
    assert_eq!(
        store.get_lease(running.id).await.unwrap().as_ref(),
        Some(&running)
    );

    // A later command replaces it; one that ended clears it.
    let later = ProcessIdentity {
        pgid: 5151,
        cgroup: None,
        ..identity
    };
    store
        .set_lease_process(running.id, Some(&later))
        .await
        .unwrap();
    assert_eq!(store.lease_process(running.id).await.unwrap(), Some(later));
    store.set_lease_process(running.id, None).await.unwrap();
    assert_eq!(store.lease_process(running.id).await.unwrap(), None);

    // A lease that is gone (its environment deleted) has nothing recorded, and recording on it is no error.
    let missing = LeaseId::new();
    store.set_lease_process(missing, None).await.unwrap();
    assert_eq!(store.lease_process(missing).await.unwrap(), None);
}

/// A failed lease's cleanup (its run failed) that a dead node left pending is retried like a released one's.
async fn stuck_cleanups_of_failed_leases_are_found_and_claimed_once(db: &TestDb) {
    let store = db.store();
    let acme = new_company(store, "acme").await;
    let env = environment(acme.id, "sandbox", Driver::Sandbox, 1_000);
    store.insert_environment(&env).await.unwrap();
    let pending = |status: LeaseStatus, released_at: i64| Lease {
        released_at: Some(at(released_at)),
        cleanup_status: Some(CleanupStatus::Pending),
        failure_reason: (status == LeaseStatus::Failed).then(|| "run_failed".to_owned()),
        ..lease(&env, status, 100)
    };
    let failed = pending(LeaseStatus::Failed, 1_000);
    let released = pending(LeaseStatus::Released, 2_000);
    let recent = pending(LeaseStatus::Failed, 9_000);
    let done = Lease {
        cleanup_status: Some(CleanupStatus::Success),
        ..pending(LeaseStatus::Failed, 500)
    };
    for lease in [&failed, &released, &recent, &done] {
        store.insert_lease(lease).await.unwrap();
    }

    let stuck = store
        .stuck_cleanups(at(5_000), "node-x", 100)
        .await
        .unwrap();
    assert_eq!(ids(&stuck, |lease| lease.id), vec![failed.id, released.id]);
    assert_eq!(stuck[0].failure_reason.as_deref(), Some("run_failed"));
    assert!(
        store
            .claim_stuck_cleanup(&stuck[0], at(6_000))
            .await
            .unwrap()
    );
    assert!(
        !store
            .claim_stuck_cleanup(&stuck[0], at(6_001))
            .await
            .unwrap()
    );
}
