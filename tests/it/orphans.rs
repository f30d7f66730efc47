//! What a crash of berth leaves running: a Local run's processes are killed at the next start by the identity of
//! their process group recorded on the lease — wherever the run ran, and nothing else (a user's own processes in an
//! in-place workspace keep running).

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::runs::{start_run, wait_status};
use crate::support::server::{ServerOptions, TestServer};

/// The pids of live processes whose command line is exactly `argv`.
fn live_processes(argv: &[&str]) -> Vec<u32> {
    let wanted = argv.join("\0");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                String::from_utf8_lossy(&cmdline).trim_end_matches('\0') == wanted
            }) && is_alive(*pid)
        })
        .collect()
}

/// Running, not a zombie: a container's pid 1 may never reap the orphans a crash leaves it.
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
    })
}

fn kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Kills, when dropped, whatever still runs of the processes it was given: a failing test leaves nothing behind.
#[derive(Default)]
struct Reaper {
    pids: Vec<u32>,
    children: Vec<Child>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.pids {
            if is_alive(*pid) {
                kill(*pid);
            }
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `sleep` duration no other test uses, so its processes can be told apart in `/proc`.
fn unique_seconds() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}", 300_000 + nanos % 600_000)
}

/// Polls `condition` for up to `limit`.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    condition()
}

/// A run of `sh -c 'sleep A & sleep B'` (in `local_path`, or a run-private workspace), crashed with kill -9 while
/// both sleeps run, then a restart on the same data dir. Returns the restarted server, its data dir's keeper, the
/// run's lease as the API shows it after the restart, and the reaper of the run's processes.
async fn crash_a_run(
    uncontained: bool,
    local_path: Option<&Path>,
) -> (
    TestServer,
    Option<tempfile::TempDir>,
    Value,
    Vec<u32>,
    Reaper,
) {
    let args = if uncontained {
        vec!["--allow-uncontained-local".to_owned()]
    } else {
        Vec::new()
    };
    let server = TestServer::start_with(ServerOptions {
        args: args.clone(),
        ..ServerOptions::default()
    })
    .await;
    let company = server.default_company().await;
    let (first, second) = (unique_seconds(), unique_seconds());
    let script = format!("sleep {first} & sleep {second}");
    let mut body = json!({"command": ["sh", "-c", script]});
    if let Some(path) = local_path {
        body["workspace"] = json!({"localPath": path});
    }
    let run_id = start_run(&server, &company, body).await;
    wait_status(&server, &run_id, "running").await;

    let mut reaper = Reaper::default();
    let shell = ["sh", "-c", script.as_str()];
    let sleeps = [["sleep", first.as_str()], ["sleep", second.as_str()]];
    let found = eventually(Duration::from_secs(10), || {
        sleeps.iter().all(|argv| live_processes(argv).len() == 1)
            && live_processes(&shell).len() == 1
    })
    .await;
    let pids: Vec<u32> = std::iter::once(&shell[..])
        .chain(sleeps.iter().map(|argv| &argv[..]))
        .flat_map(live_processes)
        .collect();
    reaper.pids.extend(&pids);
    assert!(found, "the run's processes never all appeared: {pids:?}");

    // The lease records the command's group before the crash can happen.
    let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
    let lease_id: berth_core::ids::LeaseId = run["leaseId"].as_str().unwrap().parse().unwrap();
    let store = server.open_store().await;
    let mut recorded = None;
    for _ in 0..200 {
        recorded = store.lease_process(lease_id).await.unwrap();
        if recorded.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    store.close().await;
    let recorded = recorded.expect("the command's process group was never recorded");
    assert!(
        pids.contains(&recorded.pgid) || !uncontained,
        "the recorded group {} is not the shell's: {pids:?}",
        recorded.pgid
    );

    let data_dir = server.data_dir.clone();
    let keeper = server.kill_keeping_data().await;
    if uncontained {
        // Nothing but berth ends an uncontained run: whatever is gone after the restart, the restart killed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let survivors: Vec<u32> = pids.iter().copied().filter(|pid| is_alive(*pid)).collect();
        assert_eq!(survivors, pids, "the run's processes died with the server");
    }
    let restarted = TestServer::start_with(ServerOptions {
        data_dir: Some(data_dir),
        args,
        ..ServerOptions::default()
    })
    .await;
    let (status, lease) = restarted
        .get(&format!("/api/environment-leases/{lease_id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{lease}");
    (restarted, keeper, lease, pids, reaper)
}

/// The scenario: uncontained (nothing but berth can end the run's processes once it is gone), in place in
/// a user's directory where the user has a process of their own.
#[tokio::test]
async fn a_crashed_in_place_run_is_killed_by_identity_and_the_users_own_processes_are_spared() {
    let user_dir = tempfile::tempdir().unwrap();
    std::fs::write(user_dir.path().join("notes.txt"), "mine\n").unwrap();
    let mut bystanders = Reaper::default();
    let own_seconds = unique_seconds();
    let users_own = Command::new("sleep")
        .arg(&own_seconds)
        .current_dir(user_dir.path())
        .spawn()
        .unwrap();
    let users_pid = users_own.id();
    bystanders.children.push(users_own);

    let (restarted, keeper, lease, pids, reaper) = crash_a_run(true, Some(user_dir.path())).await;
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "orphaned", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");
    assert!(
        !lease.as_object().unwrap().contains_key("process"),
        "the recorded process group is not the API's: {lease}"
    );
    let gone = eventually(Duration::from_secs(10), || {
        pids.iter().all(|pid| !is_alive(*pid))
    })
    .await;
    let survivors: Vec<u32> = pids.iter().copied().filter(|pid| is_alive(*pid)).collect();
    assert!(
        gone,
        "the crashed run's processes survived the restart: {survivors:?}"
    );
    assert!(
        is_alive(users_pid),
        "the user's own process in the in-place workspace was killed"
    );
    assert_eq!(
        std::fs::read_to_string(user_dir.path().join("notes.txt")).unwrap(),
        "mine\n"
    );
    restarted.stop().await;
    drop(keeper);
    drop(reaper);
    drop(bystanders);
}

/// The same crash with the run in the run-private workspace berth made for it: its processes are killed and the
/// workspace removed.
#[tokio::test]
async fn a_crashed_run_in_its_private_workspace_is_killed_and_removed() {
    let (restarted, keeper, lease, pids, reaper) = crash_a_run(true, None).await;
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "orphaned", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");
    let gone = eventually(Duration::from_secs(10), || {
        pids.iter().all(|pid| !is_alive(*pid))
    })
    .await;
    assert!(gone, "the crashed run's processes survived the restart");
    let workspace = lease["metadata"]["workspaceDir"].as_str().unwrap();
    assert!(
        !Path::new(workspace).exists(),
        "the run-private workspace {workspace} was left behind"
    );
    restarted.stop().await;
    drop(keeper);
    drop(reaper);
}

/// Contained runs (bubblewrap) die with their server; the restart still finds nothing of them and spares the user's
/// process in the in-place workspace.
#[tokio::test]
async fn a_crashed_contained_in_place_run_leaves_nothing_and_spares_the_user() {
    let user_dir = tempfile::tempdir().unwrap();
    let mut bystanders = Reaper::default();
    let users_own = Command::new("sleep")
        .arg(unique_seconds())
        .current_dir(user_dir.path())
        .spawn()
        .unwrap();
    let users_pid = users_own.id();
    bystanders.children.push(users_own);

    let (restarted, keeper, lease, pids, reaper) = crash_a_run(false, Some(user_dir.path())).await;
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "orphaned", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");
    let gone = eventually(Duration::from_secs(10), || {
        pids.iter().all(|pid| !is_alive(*pid))
    })
    .await;
    assert!(gone, "the crashed contained run's processes survived");
    assert!(is_alive(users_pid), "the user's own process was killed");
    restarted.stop().await;
    drop(keeper);
    drop(reaper);
    drop(bystanders);
}

/// While a command runs, its lease records its process group; once it has ended, the record is gone, so nothing is
/// killed later in its name.
#[tokio::test]
async fn a_command_is_recorded_while_it_runs_and_forgotten_when_it_ends() {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--allow-uncontained-local".to_owned()],
        ..ServerOptions::default()
    })
    .await;
    let company = server.default_company().await;
    let run_id = start_run(
        &server,
        &company,
        json!({"command": ["sh", "-c", "echo $$; sleep 2"]}),
    )
    .await;
    wait_status(&server, &run_id, "running").await;
    let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
    let lease_id: berth_core::ids::LeaseId = run["leaseId"].as_str().unwrap().parse().unwrap();
    let store = server.open_store().await;
    let mut recorded = None;
    for _ in 0..60 {
        recorded = store.lease_process(lease_id).await.unwrap();
        if recorded.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let recorded = recorded.expect("the running command's group was never recorded");
    assert_eq!(
        recorded.boot_id,
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap()
            .trim()
    );

    let finished = crate::support::runs::wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let events = crate::support::runs::all_events(&server, &run_id).await;
    let shell: u32 = crate::support::runs::text_of(&events, "stdout")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(recorded.pgid, shell, "the recorded group is the command's");
    assert_eq!(store.lease_process(lease_id).await.unwrap(), None);
    store.close().await;
    server.stop().await;
}

// === Uncontained Local commands in a cgroup of their own: `setsid` no longer escapes ===

/// Whether this host lets berth (the tests' user) make cgroups: then every uncontained Local command gets one.
/// These tests are about cgroups: where berth could not make one they would prove nothing, so they fail rather than
/// skip (the README's test command runs as root, where the cgroup hierarchies are writable).
fn require_cgroups() {
    assert!(
        cgroups_writable(),
        "no writable cgroup hierarchy: run the tests as root (README), where berth can make cgroups"
    );
}

fn cgroups_writable() -> bool {
    [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup",
    ]
    .iter()
    .any(|dir| {
        let probe = Path::new(dir).join(format!("berth-it-probe-{}", std::process::id()));
        std::fs::create_dir(&probe).is_ok() && std::fs::remove_dir(&probe).is_ok()
    })
}

/// The session a live process belongs to.
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// An uncontained server, a run of `setsid sh -c 'sleep N' & <rest>` in it, and, once the daemon is seen: the
/// daemon's pid (in a session of its own, so out of the command's group) and the cgroup the lease recorded.
async fn run_with_a_daemon(
    rest: &str,
    local_path: Option<&Path>,
) -> (
    TestServer,
    String,
    String,
    berth_core::ids::LeaseId,
    u32,
    String,
    Reaper,
) {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--allow-uncontained-local".to_owned()],
        ..ServerOptions::default()
    })
    .await;
    let company = server.default_company().await;
    let (status, probe) = server
        .post(
            &format!("/api/companies/{company}/environments/probe-config"),
            json!({"driver": "local"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    assert!(
        matches!(
            probe["details"]["processTracking"].as_str(),
            Some("cgroup-v1" | "cgroup-v2")
        ),
        "{probe}"
    );
    let seconds = unique_seconds();
    let script = format!("setsid sh -c 'sleep {seconds}' & {rest}");
    let mut body = json!({"command": ["sh", "-c", script]});
    if let Some(path) = local_path {
        body["workspace"] = json!({"localPath": path});
    }
    let run_id = start_run(&server, &company, body).await;
    wait_status(&server, &run_id, "running").await;
    let mut reaper = Reaper::default();
    let sleep = ["sleep", seconds.as_str()];
    let found = eventually(Duration::from_secs(10), || {
        live_processes(&sleep).len() == 1
    })
    .await;
    let daemons = live_processes(&sleep);
    reaper.pids.extend(&daemons);
    assert!(found, "the daemon never appeared");
    let daemon = daemons[0];

    let (_, run) = server.get(&format!("/api/runs/{run_id}")).await;
    let lease_id: berth_core::ids::LeaseId = run["leaseId"].as_str().unwrap().parse().unwrap();
    let store = server.open_store().await;
    let mut recorded = None;
    for _ in 0..200 {
        recorded = store.lease_process(lease_id).await.unwrap();
        if recorded.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    store.close().await;
    let recorded = recorded.expect("the command was never recorded");
    assert_ne!(
        session_of(daemon),
        Some(recorded.session_id),
        "the daemon did not leave the command's session"
    );
    let cgroup = recorded
        .cgroup
        .expect("an uncontained command runs in a cgroup of its own here");
    let members = std::fs::read_to_string(format!("{cgroup}/cgroup.procs")).unwrap();
    assert!(
        members
            .lines()
            .any(|line| line.trim() == daemon.to_string()),
        "the daemon {daemon} is not in the command's cgroup {cgroup}: {members}"
    );
    (server, company, run_id, lease_id, daemon, cgroup, reaper)
}

#[tokio::test]
async fn a_setsid_daemon_dies_when_its_run_ends_and_its_cgroup_goes() {
    require_cgroups();
    let (server, _, run_id, _, daemon, cgroup, reaper) = run_with_a_daemon("sleep 1", None).await;
    let finished = crate::support::runs::wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let gone = eventually(Duration::from_secs(5), || !is_alive(daemon)).await;
    assert!(gone, "the setsid daemon {daemon} outlived its run");
    assert!(
        !Path::new(&cgroup).exists(),
        "the command's cgroup {cgroup} was left behind"
    );
    server.stop().await;
    drop(reaper);
}

#[tokio::test]
async fn a_setsid_daemon_dies_when_its_run_is_cancelled() {
    require_cgroups();
    let (server, _, run_id, _, daemon, cgroup, reaper) =
        run_with_a_daemon("sleep 1000", None).await;
    let (status, body) = server
        .post(&format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert!(status.is_success(), "{status}: {body}");
    let finished = crate::support::runs::wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(finished["status"], "cancelled", "{finished}");
    let gone = eventually(Duration::from_secs(5), || !is_alive(daemon)).await;
    assert!(gone, "the setsid daemon {daemon} outlived the cancel");
    assert!(
        !Path::new(&cgroup).exists(),
        "the command's cgroup {cgroup} was left behind"
    );
    server.stop().await;
    drop(reaper);
}

#[tokio::test]
async fn a_setsid_daemon_of_a_crashed_run_is_killed_at_restart_and_its_cgroup_removed() {
    require_cgroups();
    // In place in a user's directory, which no cleanup scans for processes: only the recorded cgroup finds the
    // daemon, which left the recorded process group and session.
    let user_dir = tempfile::tempdir().unwrap();
    let (server, _, _, lease_id, daemon, cgroup, reaper) =
        run_with_a_daemon("sleep 1000", Some(user_dir.path())).await;
    let data_dir = server.data_dir.clone();
    let keeper = server.kill_keeping_data().await;
    // A cgroup does not kill: what is gone after the restart, the restart's cleanup killed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(is_alive(daemon), "the daemon died with the server");
    let restarted = TestServer::start_with(ServerOptions {
        data_dir: Some(data_dir),
        args: vec!["--allow-uncontained-local".to_owned()],
        ..ServerOptions::default()
    })
    .await;
    let (status, lease) = restarted
        .get(&format!("/api/environment-leases/{lease_id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{lease}");
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "orphaned", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");
    let gone = eventually(Duration::from_secs(10), || !is_alive(daemon)).await;
    assert!(gone, "the setsid daemon {daemon} survived the restart");
    let removed = eventually(Duration::from_secs(10), || !Path::new(&cgroup).exists()).await;
    assert!(
        removed,
        "the crashed command's cgroup {cgroup} was left behind"
    );
    restarted.stop().await;
    drop(keeper);
    drop(reaper);
}
