//! Three `berth serve` replicas on one PostgreSQL, under faults: 300 runs spread across them — Local and fake-provider
//! environments, a third of them reusing their environment's sandbox — while one replica is killed (`kill -9`) and
//! restarted on its own data midway. Then: every run is final; no lease stays active without a live run; no reusable
//! sandbox was ever held by two runs (watched by a query while the runs go, proved by what the runs print, and
//! structurally the database's unique index); every run's events are dense and complete. And a cancel made through
//! another replica than the one running the command takes effect within a second.
//!
//! PostgreSQL comes from `BERTH_TEST_POSTGRES_URL`; like every PostgreSQL test, this one fails without it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use tempfile::TempDir;

use crate::support::db::TestDb;
use crate::support::server::{ServerOptions, TestServer};

const REPLICAS: usize = 3;
const RUNS: usize = 300;
/// Runs in flight at once across the replicas: enough that the reusing environments see concurrent acquisitions and
/// the kill hits runs mid-command, few enough for two cores.
const IN_FLIGHT: usize = 18;
/// The replica that is killed, once this many runs were submitted.
const VICTIM: usize = 1;
const KILL_AFTER: usize = 100;
/// Shared by the replicas, so any of them answers the test's requests.
const ADMIN_TOKEN: &str = "berth_admin_replicas_under_faults";
/// What the restarted replica's sweep says of the runs that died with it.
const ORPHAN_ERROR: &str = "berth stopped while the run was in flight";
const FINAL: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_survive_a_kill_with_runs_in_flight() {
    let db = TestDb::postgres().await;
    let cluster = Arc::new(Cluster::start(db.url()).await);
    let watcher = PgPool::connect(&db.url()).await.unwrap();

    let first = cluster.replica(0).1;
    let company = default_company(&cluster).await;
    let fake = create_environment(&first, &company, json!({"provider": "fake"})).await;
    let reusing = [
        create_environment(
            &first,
            &company,
            json!({"provider": "fake", "reuseLease": true}),
        )
        .await,
        create_environment(
            &first,
            &company,
            json!({"provider": "fake", "reuseLease": true}),
        )
        .await,
    ];
    // Held no longer: every replica's handle must be free to stop it at the end.
    drop(first);
    let jobs: Vec<Job> = (0..RUNS)
        .map(|index| {
            let (environment, shape) = match index % 6 {
                0 => (None, Shape::Lines),
                1 => (None, Shape::Sleeps),
                2 => (Some(fake.clone()), Shape::Lines),
                3 => (Some(fake.clone()), Shape::Sleeps),
                other => (Some(reusing[other % 2].clone()), Shape::Owner),
            };
            Job {
                index,
                environment,
                shape,
            }
        })
        .collect();

    // The invariants that must hold at every instant, checked continuously while the runs go.
    let soak_over = Arc::new(AtomicBool::new(false));
    let invariants = tokio::spawn(watch_invariants(watcher.clone(), soak_over.clone()));

    let started = Instant::now();
    let submitted = Arc::new(AtomicUsize::new(0));
    let killer = tokio::spawn(kill_and_restart(cluster.clone(), submitted.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let cluster = cluster.clone();
            let company = company.clone();
            let slots = slots.clone();
            let submitted = submitted.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.unwrap();
                run_job(&cluster, &company, job, &submitted).await
            })
        })
        .collect();
    let mut records = Vec::new();
    for task in tasks {
        records.push(task.await.unwrap());
    }
    let (killed_node, victim_logs) = killer.await.unwrap();
    let soak_time = started.elapsed();
    soak_over.store(true, Ordering::SeqCst);
    let (samples, violations) = invariants.await.unwrap();
    assert!(violations.is_empty(), "invariants broken: {violations:#?}");
    assert!(
        samples >= 20,
        "the invariants were checked only {samples} times"
    );

    // Every run the database knows is final — those whose creation response was lost in the kill too.
    let stored: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT id, status, owner_node, error FROM runs WHERE company_id = $1 ORDER BY created_at",
    )
    .bind(&company)
    .fetch_all(&watcher)
    .await
    .unwrap();
    assert!(stored.len() >= RUNS, "{} runs stored", stored.len());
    for (id, status, _, _) in &stored {
        assert!(
            FINAL.contains(&status.as_str()),
            "run {id} is still {status}"
        );
    }

    // No lease stays active without a live run: once every run is final, none may be active (the sweep releases a
    // dead run's lease, so allow it a few rounds).
    let settle = Instant::now();
    loop {
        let active: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT id, run_id FROM environment_leases WHERE status = 'active' ORDER BY id",
        )
        .fetch_all(&watcher)
        .await
        .unwrap();
        if active.is_empty() {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(15),
            "leases still active after every run ended: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease_settle_time = settle.elapsed();

    // Each run: the status it should have, dense and complete events, and exactly its command's output.
    let expected: HashMap<&str, &Record> = records
        .iter()
        .map(|record| (record.id.as_str(), record))
        .collect();
    let mut orphaned = 0;
    let mut reuse = ReuseCounts::default();
    for (id, status, owner, error) in &stored {
        let events = all_events(&cluster, id).await;
        if events.is_empty() {
            let logs: Vec<String> = cluster
                .logs()
                .iter()
                .chain([&victim_logs])
                .flat_map(|logs| logs.lines().filter(|line| line.contains(id.as_str())))
                .map(str::to_owned)
                .collect();
            panic!(
                "run {id} ({status}, {error:?}, owner {owner}, victim {killed_node}, recorded: {}) has no events; \
                 replicas logged about it: {logs:#?}",
                expected.contains_key(id.as_str())
            );
        }
        check_events(id, status, &events);
        let record = expected.get(id.as_str());
        if status == "failed" && error.as_deref() == Some(ORPHAN_ERROR) {
            assert_eq!(
                owner, &killed_node,
                "run {id} orphaned on a replica that was not killed"
            );
            orphaned += 1;
            continue;
        }
        let Some(record) = record else {
            // Created by the killed replica, whose answer was lost: it either finished or was orphaned.
            assert_eq!(status, "succeeded", "run {id}: {error:?}");
            continue;
        };
        assert_eq!(
            status, "succeeded",
            "run {id} ({record:?}): {error:?} {events:#?}"
        );
        assert_eq!(
            text_of(&events, "stdout"),
            record.stdout,
            "run {id} ({record:?})"
        );
        assert_eq!(
            text_of(&events, "stderr"),
            record.stderr,
            "run {id} ({record:?})"
        );
        if record.shape == Shape::Owner {
            reuse.count(&events);
        }
    }
    // The kill must have hit runs in flight, and the reusing environments must have seen both outcomes of the race
    // for their sandbox: otherwise this test proved nothing about them.
    assert!(orphaned > 0, "the kill hit no run in flight");
    assert!(
        reuse.fell_back > 0 && reuse.reused > 0,
        "the reusable sandboxes were never contended or never reused: {reuse:?}"
    );
    eprintln!(
        "replicas: {} runs ({} orphaned by the kill) in {soak_time:?}; leases settled {lease_settle_time:?} after; \
         {samples} invariant checks; reusing runs: {reuse:?}",
        stored.len(),
        orphaned
    );

    // A cancel through another replica than the one running the command.
    let mut latencies = Vec::new();
    for owner in 0..2 * REPLICAS {
        let environment = [None, Some(&fake), Some(&reusing[0])][owner % 3];
        latencies.push(cancel_elsewhere(&cluster, &watcher, &company, owner, environment).await);
    }
    eprintln!("replicas: cancel through another replica took {latencies:?}");
    for latency in &latencies {
        assert!(
            *latency < Duration::from_secs(1),
            "a cancel through another replica took {latency:?}"
        );
    }

    // Deleting the environments destroys the sandboxes the reusing ones kept: nothing is left in the fake's root.
    let (_, deleting_on) = cluster.replica(0);
    for environment in [&fake, &reusing[0], &reusing[1]] {
        let (status, answer) = deleting_on
            .delete(&format!("/api/environments/{environment}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    drop(deleting_on);

    for (index, server) in cluster.take_all() {
        let logs = Arc::into_inner(server)
            .expect("no request still holds the replica")
            .stop()
            .await;
        assert!(
            !logs.contains("panicked"),
            "replica {index} panicked:\n{logs}"
        );
    }
    watcher.close().await;
    db.cleanup().await;
}

/// The replicas, by index; a slot is empty while its replica is down.
struct Cluster {
    database_url: String,
    /// Each replica's data dir, kept across a restart: a node knows its own dead runs by the node id stored there.
    homes: Vec<TempDir>,
    slots: Mutex<Vec<Option<Arc<TestServer>>>>,
    http: reqwest::Client,
}

impl Cluster {
    async fn start(database_url: String) -> Cluster {
        let homes: Vec<TempDir> = (0..REPLICAS)
            .map(|_| tempfile::tempdir().unwrap())
            .collect();
        // All at once: concurrent start-ups on one fresh database (migrations, the default company) are part of it.
        let servers = futures::future::join_all(
            homes
                .iter()
                .map(|home| TestServer::start_with(options(&database_url, home.path()))),
        )
        .await;
        Cluster {
            database_url,
            homes,
            slots: Mutex::new(servers.into_iter().map(|s| Some(Arc::new(s))).collect()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    /// A running replica: `preferred` if it runs, else the next one that does.
    fn replica(&self, preferred: usize) -> (usize, Arc<TestServer>) {
        let slots = self.slots.lock().unwrap();
        (0..REPLICAS)
            .map(|offset| (preferred + offset) % REPLICAS)
            .find_map(|index| slots[index].clone().map(|server| (index, server)))
            .expect("a replica is running")
    }

    /// What the running replicas logged so far.
    fn logs(&self) -> Vec<String> {
        let slots = self.slots.lock().unwrap();
        slots.iter().flatten().map(|server| server.logs()).collect()
    }

    fn take_all(&self) -> Vec<(usize, Arc<TestServer>)> {
        let mut slots = self.slots.lock().unwrap();
        slots
            .iter_mut()
            .enumerate()
            .filter_map(|(index, slot)| slot.take().map(|server| (index, server)))
            .collect()
    }

    /// One request to one replica; `Err` when the connection failed (the replica was killed meanwhile).
    async fn send(
        &self,
        server: &TestServer,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), reqwest::Error> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", server.url))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(serde_json::to_vec(body).unwrap());
        }
        let response = request.send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Ok((status, value))
    }

    /// A read through any running replica (they share the database), tried on the next one when one goes away.
    async fn get(&self, preferred: usize, path: &str) -> Value {
        for attempt in 0..20 {
            let (_, server) = self.replica(preferred + attempt);
            match self.send(&server, Method::GET, path, None).await {
                Ok((StatusCode::OK, value)) => return value,
                Ok((status, value)) => panic!("GET {path}: {status} {value}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("GET {path}: no replica answered")
    }
}

fn options(database_url: &str, home: &Path) -> ServerOptions {
    ServerOptions {
        database_url: Some(database_url.to_owned()),
        data_dir: Some(home.join("data")),
        env: vec![
            ("BERTH_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            // Dead runs' leases are released within a fraction of a second of their runs failing.
            ("BERTH_SWEEP_INTERVAL_MS".into(), "500".into()),
        ],
        ..Default::default()
    }
}

/// Once `KILL_AFTER` runs were submitted: `kill -9` the victim, then start it again on the same data dir. Returns the
/// victim's node id and what it logged before it was killed.
async fn kill_and_restart(cluster: Arc<Cluster>, submitted: Arc<AtomicUsize>) -> (String, String) {
    while submitted.load(Ordering::SeqCst) < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let victim = cluster.slots.lock().unwrap()[VICTIM]
        .take()
        .expect("the victim runs");
    let node = std::fs::read_to_string(victim.data_dir.join("node-id"))
        .unwrap()
        .trim()
        .to_owned();
    let pid = victim.pid().expect("the victim's pid");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Requests still holding the old handle see their connections fail and move on to another replica.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let logs = victim.logs();
    drop(victim);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted =
        TestServer::start_with(options(&cluster.database_url, cluster.homes[VICTIM].path())).await;
    cluster.slots.lock().unwrap()[VICTIM] = Some(Arc::new(restarted));
    (node, logs)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Several lines on stdout and one on stderr.
    Lines,
    /// Prints, sleeps a little (so the kill finds it running), prints again.
    Sleeps,
    /// Writes its tag into the sandbox, sleeps, reads it back: another run in the same sandbox meanwhile shows.
    Owner,
}

#[derive(Debug)]
struct Job {
    index: usize,
    /// `None`: the company's Local environment.
    environment: Option<String>,
    shape: Shape,
}

#[derive(Debug)]
struct Record {
    id: String,
    shape: Shape,
    stdout: String,
    stderr: String,
}

/// Submits the job to its replica (another one while that one is down) and waits for the run to end.
async fn run_job(cluster: &Cluster, company: &str, job: Job, submitted: &AtomicUsize) -> Record {
    let tag = format!("job-{}", job.index);
    let (script, stdout, stderr) = match job.shape {
        Shape::Lines => (
            r#"for n in 1 2 3 4 5 6; do echo "$1 line $n"; done; echo "$1 done" >&2"#,
            (1..=6).map(|n| format!("{tag} line {n}\n")).collect(),
            format!("{tag} done\n"),
        ),
        Shape::Sleeps => (
            r#"echo "$1 start"; sleep 0.3; echo "$1 end""#,
            format!("{tag} start\n{tag} end\n"),
            String::new(),
        ),
        Shape::Owner => (
            r#"echo "$1" > owner; echo "$1 start"; sleep 0.2; cat owner"#,
            format!("{tag} start\n{tag}\n"),
            String::new(),
        ),
    };
    let mut body = json!({"command": ["sh", "-c", script, "sh", tag], "bridge": false});
    if let Some(environment) = &job.environment {
        body["environmentId"] = json!(environment);
    }
    let path = format!("/api/companies/{company}/runs");
    let mut id = None;
    for attempt in 0..20 {
        let (_, server) = cluster.replica(job.index + attempt);
        match cluster
            .send(&server, Method::POST, &path, Some(&body))
            .await
        {
            Ok((StatusCode::CREATED, run)) => {
                id = Some(run["id"].as_str().unwrap().to_owned());
                break;
            }
            Ok((status, error)) => panic!("creating {tag}: {status} {error}"),
            // The replica died under the request: the run may exist (the database is checked for those), this job
            // goes to another replica.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let id = id.unwrap_or_else(|| panic!("no replica took {tag}"));
    submitted.fetch_add(1, Ordering::SeqCst);

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let run = cluster.get(job.index, &format!("/api/runs/{id}")).await;
        if FINAL.contains(&run["status"].as_str().unwrap()) {
            break;
        }
        assert!(Instant::now() < deadline, "{tag} ({id}) never ended: {run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Record {
        id,
        shape: job.shape,
        stdout,
        stderr,
    }
}

/// Samples the invariants until `over`; returns how many samples were taken and every violation seen.
async fn watch_invariants(pool: PgPool, over: Arc<AtomicBool>) -> (usize, Vec<String>) {
    // One statement, so one snapshot: environments holding two reusable leases; a sandbox (provider lease id) held by
    // two active leases; a lease held by two live runs.
    const BROKEN: &str = "SELECT \
        (SELECT COUNT(*) FROM (SELECT environment_id FROM environment_leases \
            WHERE lease_policy = 'reuse_by_environment' AND (status = 'active' OR cleanup_status = 'pending') \
            GROUP BY environment_id HAVING COUNT(*) > 1) AS doubled), \
        (SELECT COUNT(*) FROM (SELECT provider_lease_id FROM environment_leases \
            WHERE status = 'active' AND provider_lease_id IS NOT NULL \
            GROUP BY provider, provider_lease_id HAVING COUNT(*) > 1) AS shared_sandboxes), \
        (SELECT COUNT(*) FROM (SELECT lease_id FROM runs \
            WHERE status IN ('queued', 'running') AND lease_id IS NOT NULL \
            GROUP BY lease_id HAVING COUNT(*) > 1) AS shared_leases)";
    let mut samples = 0;
    let mut violations = Vec::new();
    while !over.load(Ordering::SeqCst) {
        let (doubled, shared_sandboxes, shared_leases): (i64, i64, i64) =
            sqlx::query_as(BROKEN).fetch_one(&pool).await.unwrap();
        samples += 1;
        if (doubled, shared_sandboxes, shared_leases) != (0, 0, 0) {
            violations.push(format!(
                "sample {samples}: {doubled} environments with two held reusable leases, {shared_sandboxes} \
                 sandboxes held twice, {shared_leases} leases held by two live runs"
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (samples, violations)
}

/// How the reusing environments' runs got their sandbox.
#[derive(Debug, Default)]
struct ReuseCounts {
    /// Took the environment's reusable sandbox fresh.
    fresh: usize,
    /// Resumed the sandbox an earlier run kept.
    reused: usize,
    /// Found it held by another run and got an ephemeral one.
    fell_back: usize,
}

impl ReuseCounts {
    fn count(&mut self, events: &[Value]) {
        let lease = events
            .iter()
            .find(|event| event["type"] == "lease")
            .expect("a lease event");
        let data = &lease["data"];
        if data["policy"] == "ephemeral" {
            self.fell_back += 1;
        } else if data["resumed"] == true {
            self.reused += 1;
        } else {
            self.fresh += 1;
        }
    }
}

/// Dense (seq 1..n), starting with `queued`, ending with exactly one final status event: the run's.
fn check_events(id: &str, status: &str, events: &[Value]) {
    for (index, event) in events.iter().enumerate() {
        assert_eq!(
            event["seq"].as_i64(),
            Some(index as i64 + 1),
            "run {id}: events not dense: {events:#?}"
        );
    }
    let first = events.first().expect("events");
    assert_eq!(
        (&first["type"], &first["data"]["status"]),
        (&json!("status"), &json!("queued")),
        "run {id}: {events:#?}"
    );
    let finals: Vec<&Value> = events
        .iter()
        .filter(|event| {
            event["type"] == "status"
                && event["data"]["status"]
                    .as_str()
                    .is_some_and(|status| FINAL.contains(&status))
        })
        .collect();
    assert_eq!(finals.len(), 1, "run {id}: one final event: {events:#?}");
    let last = events.last().unwrap();
    assert_eq!(last, finals[0], "run {id}: the final event is the last one");
    assert_eq!(last["data"]["status"], status, "run {id}: {events:#?}");
    if status == "succeeded" {
        assert!(
            events
                .iter()
                .any(|event| event["type"] == "status" && event["data"]["status"] == "running"),
            "run {id}: {events:#?}"
        );
    }
}

fn text_of(events: &[Value], kind: &str) -> String {
    events
        .iter()
        .filter(|event| event["type"] == kind)
        .map(|event| event["data"]["text"].as_str().unwrap())
        .collect()
}

async fn all_events(cluster: &Cluster, run_id: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = cluster
            .get(0, &format!("/api/runs/{run_id}/events?after={after}"))
            .await;
        let page = page.as_array().unwrap().clone();
        let Some(last) = page.last() else {
            return events;
        };
        after = last["seq"].as_i64().unwrap();
        events.extend(page);
    }
}

async fn default_company(cluster: &Cluster) -> String {
    let companies = cluster.get(0, "/api/companies").await;
    companies
        .as_array()
        .unwrap()
        .iter()
        .find(|company| company["name"] == "default")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn create_environment(server: &TestServer, company: &str, config: Value) -> String {
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": format!("sb-{}", uuid::Uuid::new_v4()), "driver": "sandbox", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    env["id"].as_str().unwrap().to_owned()
}

/// Starts a sleeping run on replica `owner`, cancels it through the next replica once it runs, and returns how long
/// the cancel took to end the run, as the cancelling replica reports it.
async fn cancel_elsewhere(
    cluster: &Cluster,
    watcher: &PgPool,
    company: &str,
    owner: usize,
    environment: Option<&String>,
) -> Duration {
    let (owner, running_on) = cluster.replica(owner);
    let (canceller, cancelling_on) = cluster.replica(owner + 1);
    assert_ne!(owner, canceller);
    let mut body = json!({"command": ["sleep", "30"], "bridge": false});
    if let Some(environment) = environment {
        body["environmentId"] = json!(environment);
    }
    let (status, run) = cluster
        .send(
            &running_on,
            Method::POST,
            &format!("/api/companies/{company}/runs"),
            Some(&body),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = cluster.get(owner, &format!("/api/runs/{id}")).await;
        if run["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "never ran: {run}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let owner_node: String = sqlx::query_scalar("SELECT owner_node FROM runs WHERE id = $1")
        .bind(&id)
        .fetch_one(watcher)
        .await
        .unwrap();
    let canceller_node = std::fs::read_to_string(cancelling_on.data_dir.join("node-id")).unwrap();
    assert_ne!(
        owner_node,
        canceller_node.trim(),
        "the run is on the cancelling replica"
    );

    let asked = Instant::now();
    let (status, answer) = cluster
        .send(
            &cancelling_on,
            Method::POST,
            &format!("/api/runs/{id}/cancel"),
            Some(&json!({})),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    loop {
        let (_, run) = cluster
            .send(
                &cancelling_on,
                Method::GET,
                &format!("/api/runs/{id}"),
                None,
            )
            .await
            .unwrap();
        if run["status"] == "cancelled" {
            let took = asked.elapsed();
            if took > Duration::from_millis(400) {
                eprintln!("slow cancel of {id}: {:#?}", all_events(cluster, &id).await);
            }
            return took;
        }
        assert!(FINAL.iter().all(|status| run["status"] != *status), "{run}");
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "the cancel through another replica never took effect: {run}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A node that died between writing a run's final event and saving the run (the kill's narrowest window) leaves a
/// live row whose outcome followers already saw: the sweep of another node settles the row as that event says and
/// writes no second final event. A run that died before its final event is failed as an orphan, and one that died
/// before its first event still gets a log that starts with `queued`.
#[tokio::test]
async fn a_run_whose_node_died_after_its_final_event_keeps_that_outcome() {
    use berth_core::ids::{EnvironmentId, RunId};
    use berth_core::run::{EventKind, NewRunEvent, Run, RunStatus};
    use berth_core::time::Timestamp;

    let server = TestServer::start_with(ServerOptions {
        env: vec![("BERTH_SWEEP_INTERVAL_MS".into(), "100".into())],
        ..Default::default()
    })
    .await;
    let company = server.default_company().await;
    let store = server.open_store().await;
    // Owned by a node that stopped heartbeating a minute ago.
    let stale = Timestamp::from_unix_millis(Timestamp::now().unix_millis() - 60_000);
    let dead_run = || Run {
        id: RunId::new(),
        company_id: company.parse().unwrap(),
        environment_id: EnvironmentId::new(),
        lease_id: None,
        status: RunStatus::Running,
        command: vec!["sh".into(), "-c".into(), "echo out; exit 3".into()],
        exit_code: None,
        signal: None,
        error: None,
        owner_node: "a-node-that-died".into(),
        created_at: stale,
        started_at: Some(stale),
        finished_at: None,
        heartbeat_at: stale,
        cancel_requested: false,
    };
    let event = |kind, data| NewRunEvent {
        at: stale,
        kind,
        data,
    };
    let after_final = dead_run();
    let mid_output = dead_run();
    // Stored, and the node died before the run's first event.
    let never_logged = Run {
        status: RunStatus::Queued,
        started_at: None,
        ..dead_run()
    };
    store.insert_run(&never_logged).await.unwrap();
    for (run, last) in [
        (
            &after_final,
            event(
                EventKind::Status,
                json!({"status": "failed", "exitCode": 3, "signal": null, "error": null}),
            ),
        ),
        (
            &mid_output,
            event(EventKind::Stdout, json!({"text": "out\n"})),
        ),
    ] {
        store.insert_run(run).await.unwrap();
        store
            .append_events(
                run.id,
                vec![
                    event(EventKind::Status, json!({"status": "queued"})),
                    event(EventKind::Status, json!({"status": "running"})),
                    event(EventKind::Stdout, json!({"text": "out\n"})),
                    last,
                ],
            )
            .await
            .unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(15);
    let settled = loop {
        let (_, settled) = server.get(&format!("/api/runs/{}", after_final.id)).await;
        let (_, failed) = server.get(&format!("/api/runs/{}", mid_output.id)).await;
        let (_, unlogged) = server.get(&format!("/api/runs/{}", never_logged.id)).await;
        if settled["status"] != "running"
            && failed["status"] != "running"
            && unlogged["status"] != "queued"
        {
            assert_eq!(failed["status"], "failed", "{failed}");
            assert_eq!(failed["error"], ORPHAN_ERROR, "{failed}");
            break settled;
        }
        assert!(Instant::now() < deadline, "never swept: {settled} {failed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (&settled["status"], &settled["exitCode"], &settled["error"]),
        (&json!("failed"), &json!(3), &Value::Null),
        "{settled}"
    );
    // Nothing was added after the final event; the orphan got its error and final event.
    let events = crate::support::runs::all_events(&server, &after_final.id.to_string()).await;
    assert_eq!(events.len(), 4, "{events:#?}");
    check_events(&after_final.id.to_string(), "failed", &events);
    let events = crate::support::runs::all_events(&server, &mid_output.id.to_string()).await;
    check_events(&mid_output.id.to_string(), "failed", &events);
    assert_eq!(events[events.len() - 2]["type"], "error", "{events:#?}");
    // The run without events gets the log every run has: queued, then the orphan's error and final event.
    let events = crate::support::runs::all_events(&server, &never_logged.id.to_string()).await;
    assert_eq!(events.len(), 3, "{events:#?}");
    check_events(&never_logged.id.to_string(), "failed", &events);
    store.close().await;
    server.stop().await;
}
