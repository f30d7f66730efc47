//! What comes back from an environment is untrusted: SSH sync-back against a real OpenSSH sshd, where the remote
//! command tries what a hostile environment would — a setuid copy of a binary, a sparse file larger than the
//! environment's `syncBackMaxMb`, a regular file where the host has a FIFO. Nothing setuid may ever exist in the host
//! workspace or its staging directory, staging is private (0700) while it exists, the bound fails the sync-back with
//! an error that names it, and nothing makes a run hang.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::runs::{all_events, start_run, wait_run};
use crate::support::server::TestServer;
use crate::support::sshd::TestSshd;

/// The prefix of a sync-back staging directory (beside the workspace).
const STAGING_PREFIX: &str = ".berth-sync-";

async fn ssh_env(server: &TestServer, company: &str, sshd: &TestSshd, extra: Value) -> String {
    let mut config = sshd.config();
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": format!("ssh-{}", uuid::Uuid::new_v4()), "driver": "ssh", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    assert_eq!(
        env["config"].get("syncBackMaxMb"),
        extra.get("syncBackMaxMb")
    );
    env["id"].as_str().unwrap().to_owned()
}

/// Runs `script` in `env` on the workspace `local`; returns the finished run, its events and how long it took.
async fn run_script(
    server: &TestServer,
    company: &str,
    env: &str,
    local: &Path,
    script: &str,
) -> (Value, Vec<Value>, Duration) {
    let started = Instant::now();
    let run_id = start_run(
        server,
        company,
        json!({
            "environmentId": env,
            "command": ["sh", "-c", script],
            "workspace": {"localPath": local},
            "bridge": false,
        }),
    )
    .await;
    let run = wait_run(server, &run_id, Duration::from_secs(90)).await;
    let events = all_events(server, &run_id).await;
    (run, events, started.elapsed())
}

fn events_of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|event| event["type"] == kind)
        .collect()
}

fn synced(events: &[Value]) -> Option<&Value> {
    events
        .iter()
        .find(|event| event["type"] == "workspace" && event["data"]["phase"] == "synced")
        .map(|event| &event["data"])
}

/// Every path under `root` (links not followed) with a setuid or setgid bit.
fn setid_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.permissions().mode() & 0o6000 != 0 {
                found.push(path.clone());
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}

/// What a [`StagingWatcher`] saw.
#[derive(Debug, Default)]
struct Seen {
    /// Each staging directory seen, with every mode it was seen with.
    staging: Vec<(PathBuf, u32)>,
    /// Setuid or setgid files seen inside a staging directory.
    setid: Vec<PathBuf>,
}

/// Watches `parent` (the workspace's parent, where SSH sync-back stages) as fast as it can, from a thread of its own.
struct StagingWatcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Seen>,
}

impl StagingWatcher {
    fn start(parent: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (parent, stopping) = (parent.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::default();
            while !stopping.load(Ordering::Relaxed) {
                let Ok(entries) = fs::read_dir(&parent) else {
                    continue;
                };
                for entry in entries.flatten() {
                    if !entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with(STAGING_PREFIX)
                    {
                        continue;
                    }
                    let path = entry.path();
                    if let Ok(meta) = fs::symlink_metadata(&path) {
                        let mode = meta.permissions().mode() & 0o7777;
                        if !seen.staging.contains(&(path.clone(), mode)) {
                            seen.staging.push((path.clone(), mode));
                        }
                    }
                    for setid in setid_files(&path) {
                        if !seen.setid.contains(&setid) {
                            seen.setid.push(setid);
                        }
                    }
                }
            }
            seen
        });
        Self { stop, thread }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[tokio::test]
async fn a_hostile_remote_can_neither_stage_nor_land_a_setuid_file_nor_pass_its_bound() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = ssh_env(&server, &company, &sshd, json!({"syncBackMaxMb": 8})).await;
    let temp = tempfile::tempdir().unwrap();
    let local = temp.path().join("workspace");
    fs::create_dir(&local).unwrap();
    fs::write(local.join("keep.txt"), "host\n").unwrap();
    let watcher = StagingWatcher::start(temp.path());

    // A setuid copy of `id`, and a sparse file past the bound to keep it staged: refused, nothing lands.
    let (run, events, _) = run_script(
        &server,
        &company,
        &env,
        &local,
        "cp /usr/bin/id suid && chmod 4755 suid && truncate -s 2G big && echo changed > keep.txt",
    )
    .await;
    // The command succeeded, but what it did never reached the host: the run fails, its exit code kept.
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exitCode"], 0, "{run}");
    let errors = events_of(&events, "error");
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(errors[0]["data"]["code"], "sync_back_failed");
    let message = errors[0]["data"]["message"].as_str().unwrap();
    assert!(
        message.contains("syncBackMaxMb=8 MiB") && message.contains("raise config.syncBackMaxMb"),
        "{message}"
    );
    assert!(synced(&events).is_none(), "{events:?}");
    assert!(!local.join("suid").exists());
    assert!(!local.join("big").exists());
    assert_eq!(
        fs::read_to_string(local.join("keep.txt")).unwrap(),
        "host\n"
    );

    // Within the bound, the same file comes back, through a private staging directory and without its setuid bit.
    let (run, events, _) = run_script(
        &server,
        &company,
        &env,
        &local,
        "cp /usr/bin/id suid && chmod 4755 suid && head -c 6000000 /dev/urandom > blob",
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(events_of(&events, "error").is_empty(), "{events:?}");
    let data = synced(&events).unwrap_or_else(|| panic!("no synced event: {events:?}"));
    assert_eq!(data["filesWritten"], 2, "{data}");
    let suid = fs::symlink_metadata(local.join("suid")).unwrap();
    assert_eq!(suid.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read(local.join("suid")).unwrap(),
        fs::read("/usr/bin/id").unwrap()
    );
    assert_eq!(fs::metadata(local.join("blob")).unwrap().len(), 6_000_000);

    let seen = watcher.finish();
    assert!(
        !seen.staging.is_empty(),
        "the watcher never saw a staging directory"
    );
    for (path, mode) in &seen.staging {
        assert_eq!(*mode, 0o700, "{} was {mode:o}", path.display());
    }
    assert!(
        seen.setid.is_empty(),
        "setuid files staged: {:?}",
        seen.setid
    );
    assert!(
        setid_files(temp.path()).is_empty(),
        "{:?}",
        setid_files(temp.path())
    );
    // Staging is gone once sync-back is done, whichever way it ended.
    let leftovers: Vec<_> = fs::read_dir(temp.path())
        .unwrap()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
        })
        .map(|entry| entry.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_remote_file_where_the_host_has_a_fifo_does_not_hang_the_run() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = ssh_env(&server, &company, &sshd, json!({})).await;
    let temp = tempfile::tempdir().unwrap();
    let local = temp.path().join("workspace");
    fs::create_dir(&local).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(local.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());

    let (run, events, took) = run_script(&server, &company, &env, &local, "echo data > pipe").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(took < Duration::from_secs(60), "the run took {took:?}");
    assert!(events_of(&events, "error").is_empty(), "{events:?}");
    // The FIFO is something berth never synced: it stays, and the remote's file is kept beside it.
    let data = synced(&events).unwrap_or_else(|| panic!("no synced event: {events:?}"));
    assert_eq!(data["conflicts"], json!(["pipe"]), "{data}");
    assert!(
        fs::symlink_metadata(local.join("pipe"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(
        fs::read_to_string(local.join("pipe.berth-conflict")).unwrap(),
        "data\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_entry_that_cannot_land_fails_the_run_after_the_others_landed() {
    let sshd = TestSshd::start();
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let env = ssh_env(&server, &company, &sshd, json!({})).await;
    let temp = tempfile::tempdir().unwrap();
    let local = temp.path().join("workspace");
    fs::create_dir(&local).unwrap();
    // The remote user (not root) may change the host copy during the run, as another process on the host would.
    fs::set_permissions(&local, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(local.join("a"), "orig\n").unwrap();
    fs::set_permissions(local.join("a"), fs::Permissions::from_mode(0o666)).unwrap();

    // `a` changes on both sides, and a directory stands where its conflict copy must go: that one entry cannot
    // land. Everything else must.
    let script = format!(
        "echo env > a && echo host > {host}/a && mkdir -p {host}/a.berth-conflict/x && echo one > b && mkdir d && echo two > d/c",
        host = local.display()
    );
    let (run, events, _) = run_script(&server, &company, &env, &local, &script).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exitCode"], 0, "the command's exit code is kept: {run}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("did not bring back 1 of") && error.contains("`a`"),
        "{error}"
    );
    let errors = events_of(&events, "error");
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(errors[0]["data"]["code"], "sync_back_failed");
    let data = synced(&events).unwrap_or_else(|| panic!("no synced event: {events:?}"));
    assert_eq!(data["complete"], false, "{data}");
    assert_eq!(data["conflicts"], json!(["a"]), "{data}");
    let skipped = data["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{data}");
    assert_eq!(skipped[0]["path"], "a");
    assert_eq!(skipped[0]["reason"], "failed");
    assert!(skipped[0]["detail"].as_str().is_some(), "{data}");
    // The entries after the one that failed landed.
    assert_eq!(fs::read_to_string(local.join("b")).unwrap(), "one\n");
    assert_eq!(fs::read_to_string(local.join("d/c")).unwrap(), "two\n");
    assert_eq!(fs::read_to_string(local.join("a")).unwrap(), "host\n");
    server.stop().await;
}
