//! The escape suite: hostile commands on the real kernel, from inside `isolated` sandboxes and contained Local and
//! fake-provider runs, against a real server. Each probe prints `name=result`; the assertions read those lines.
//!
//! Nothing here sends a packet off this machine: the network checks read the sandbox's own namespace
//! (`/proc/net/dev`, `/proc/net/route`) and connect only to the server's loopback port.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::runs::{all_events, start_run, text_of, wait_run};
use crate::support::server::{ServerOptions, TestServer};

/// Starts a run as `token` and returns (final run, its stdout + stderr).
async fn run_as(server: &TestServer, token: &str, company: &str, body: Value) -> (Value, String) {
    let (status, run) = server
        .call(
            Method::POST,
            &format!("/api/companies/{company}/runs"),
            token,
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    let run = wait_run(server, &id, Duration::from_secs(120)).await;
    let events = all_events(server, &id).await;
    let output = format!(
        "{}{}",
        text_of(&events, "stdout"),
        text_of(&events, "stderr")
    );
    (run, output)
}

/// `name=value` lines of a probe script's output.
fn results(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

fn port_of(server: &TestServer) -> String {
    server.url.rsplit(':').next().unwrap().to_owned()
}

/// Probes what a command can reach of the server. Prints `name=reached|blocked` (and a few values).
fn server_probes(server: &TestServer) -> String {
    let data = server.data_dir.display().to_string();
    let pid = server.pid().unwrap();
    format!(
        r#"
try() {{ name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name=reached"; else echo "$name=blocked"; fi; }}
try admin_token cat '{data}/admin-token'
try master_key cat '{data}/master-key'
try database cat '{data}/berth.db'
try node_id cat '{data}/node-id'
try list_workspaces ls '{data}/workspaces'
echo "data_dir_entries=$(ls -A '{data}' 2>/dev/null | wc -l)"
try server_environ cat /proc/{pid}/environ
try server_cmdline cat /proc/{pid}/cmdline
try signal_server kill -0 {pid}
# Every environment and command line the run can see, for the caller to search for the server's secrets.
for p in /proc/[0-9]*; do tr '\0' '\n' < $p/environ; tr '\0' ' ' < $p/cmdline; echo; done 2>/dev/null
echo "ptrace_server=$(perl -e '$r = syscall(101, 16, {pid}, 0, 0); print $r == 0 ? "reached" : "blocked"')"
echo "visible_pids=$(ls /proc | grep -c '^[0-9]')"
"#
    )
}

fn assert_contained(probes: &BTreeMap<String, String>, output: &str, secret: Option<&str>) {
    for name in [
        "admin_token",
        "master_key",
        "database",
        "node_id",
        "list_workspaces",
        "server_environ",
        "server_cmdline",
        "signal_server",
        "ptrace_server",
    ] {
        assert_eq!(
            probes.get(name).map(String::as_str),
            Some("blocked"),
            "{name} must be blocked: {output}"
        );
    }
    assert_eq!(probes["data_dir_entries"], "0", "{output}");
    let visible: u32 = probes["visible_pids"].parse().unwrap();
    assert!(visible < 16, "the run sees {visible} processes: {output}");
    if let Some(secret) = secret {
        assert!(!output.contains(secret), "a server secret leaked: {output}");
    }
}

#[tokio::test]
async fn isolated_runs_cannot_reach_the_server_the_host_or_the_network() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "jail", "driver": "sandbox",
                   "config": {"provider": "isolated", "memoryMb": 256, "pids": 64, "diskMb": 16}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let env_id = env["id"].as_str().unwrap().to_owned();

    let (status, probe) = server
        .post(&format!("/api/environments/{env_id}/probe"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{probe}");
    assert_eq!(probe["ok"], true, "{probe}");
    assert_eq!(probe["details"]["namespaces"]["status"], "used", "{probe}");
    assert_eq!(
        probe["details"]["cgroups"]["memory"]["status"], "used",
        "{probe}"
    );
    assert_eq!(probe["details"]["smokeTest"]["seccomp"], true, "{probe}");

    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("input.txt"), "from the host\n").unwrap();
    let port = port_of(&server);
    let script = format!(
        r#"{probes}
try etc_shadow cat /etc/shadow
try root_home ls /root
try write_usr touch /usr/berth-escape
try write_etc touch /etc/berth-escape
try write_workspace sh -c 'echo made-inside > /workspace/output.txt'
try write_tmp sh -c 'echo x > /tmp/x'
try server_port bash -c 'echo > /dev/tcp/127.0.0.1/{port}'
try mount mount -t tmpfs none /tmp
try user_namespace unshare -U true
try setuid_root perl -e '$< = 0; $> = 0; exit($> == 0 ? 0 : 1)'
echo "uid=$(id -u)"
echo "interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ,)"
echo "routes=$(tail -n +2 /proc/net/route | wc -l)"
echo "input=$(cat input.txt)"
echo "bridge=$(curl -fsS -H "Authorization: Bearer $BERTH_API_TOKEN" "$BERTH_API_URL/api/agent/run" | grep -o "$BERTH_RUN_ID" | head -1)"
echo "api_url=$BERTH_API_URL"
ln -s /etc /workspace/planted
"#,
        probes = server_probes(&server)
    );
    let (run, output) = run_as(
        &server,
        &server.admin_token,
        &company,
        json!({"environmentId": env_id, "command": ["sh", "-c", script],
               "workspace": {"localPath": host.path()}}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {output}");
    let probes = results(&output);
    assert_contained(&probes, &output, None);
    for name in [
        "etc_shadow",
        "root_home",
        "write_usr",
        "write_etc",
        "server_port",
        "mount",
        "user_namespace",
        "setuid_root",
    ] {
        assert_eq!(probes[name], "blocked", "{name} must be blocked: {output}");
    }
    assert_eq!(probes["write_workspace"], "reached", "{output}");
    assert_eq!(probes["write_tmp"], "reached", "{output}");
    assert_ne!(probes["uid"], "0", "{output}");
    assert_eq!(probes["interfaces"], "lo,", "only loopback: {output}");
    assert_eq!(probes["routes"], "0", "{output}");
    assert_eq!(probes["input"], "from the host", "{output}");
    assert_eq!(probes["bridge"], run["id"].as_str().unwrap(), "{output}");
    assert_eq!(probes["api_url"], "http://127.0.0.1:7421", "{output}");
    // Sync-back brought the output home, and the planted link wrote nothing outside the workspace.
    assert_eq!(
        std::fs::read_to_string(host.path().join("output.txt")).unwrap(),
        "made-inside\n"
    );
    assert!(!std::path::Path::new("/etc/berth-escape").exists());
    assert!(!std::path::Path::new("/usr/berth-escape").exists());

    // The command's environment is exactly the contract's: PATH, HOME, the bridge's variables and the request's.
    let (run, output) = run_as(
        &server,
        &server.admin_token,
        &company,
        json!({"environmentId": env_id, "command": ["/usr/bin/env"], "env": {"GREETING": "hi"}}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {output}");
    let mut names: Vec<&str> = output
        .lines()
        .filter_map(|line| line.split('=').next())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "BERTH_API_TOKEN",
            "BERTH_API_URL",
            "BERTH_RUN_ID",
            "GREETING",
            "HOME",
            "PATH"
        ],
        "{output}"
    );
    server.stop().await;
}

#[tokio::test]
async fn isolated_limits_end_runs_with_an_error_naming_the_limit() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": "limited", "driver": "sandbox",
                   "config": {"provider": "isolated", "memoryMb": 128, "pids": 32, "diskMb": 8, "cpus": 0.5}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let env_id = env["id"].as_str().unwrap().to_owned();
    let token = server.admin_token.clone();
    let run = |command: Value| {
        let body = json!({"environmentId": env_id, "command": command, "timeoutMs": 60_000});
        run_as(&server, &token, &company, body)
    };

    // Each ends the run with an error naming its limit; the host stays healthy.
    let exceeding = [
        // 1 GiB against 128 MiB.
        (
            "perl -e 'my $x = \"a\" x (1 << 30); print length $x'",
            "memoryMb=128",
        ),
        // A fork bomb against 32 processes: forks are refused.
        (
            "for i in $(seq 100); do sleep 2 & done; wait; true",
            "pids=32",
        ),
        // Filling /tmp against 8 MiB.
        ("head -c 16777216 /dev/zero > /tmp/fill; true", "diskMb=8"),
    ];
    for (script, limit) in exceeding {
        let (ended, output) = run(json!(["sh", "-c", script])).await;
        assert_eq!(ended["status"], "failed", "{limit}: {ended} {output}");
        let error = ended["error"].as_str().unwrap_or_default();
        assert!(error.contains(limit), "{limit}: {ended}");
    }
    assert_eq!(server.get("/healthz").await.0, StatusCode::OK);

    // Spinning for 2 s on half a core gets about 1 s of CPU.
    let (cpu, output) = run(json!([
        "sh",
        "-c",
        "timeout 2 sh -c 'while :; do :; done'; times"
    ]))
    .await;
    assert_eq!(cpu["status"], "succeeded", "{cpu} {output}");
    let children = output.lines().nth(1).unwrap_or_default();
    let user: f64 = children
        .split_whitespace()
        .next()
        .and_then(|field| field.trim_end_matches('s').split_once('m'))
        .map(|(minutes, seconds)| {
            minutes.parse::<f64>().unwrap() * 60.0 + seconds.parse::<f64>().unwrap()
        })
        .unwrap();
    assert!(
        user < 1.5,
        "spun {user} CPU-s in 2 s with cpus=0.5: {output}"
    );

    // A timeout kills the whole tree, background processes included.
    let body = json!({"environmentId": env_id, "timeoutMs": 1000,
                      "command": ["sh", "-c", "sleep 313 & sleep 313"]});
    let (timed_out, _) = run_as(&server, &token, &company, body).await;
    assert_eq!(timed_out["status"], "timed_out", "{timed_out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", "sleep 313"])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "processes outlived the run: {}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
    server.stop().await;
}

#[tokio::test]
async fn local_and_fake_runs_are_contained_for_every_company() {
    let admin_token = "admin-token-that-must-not-leak-0123456789";
    let master_key = "0".repeat(64);
    let server = TestServer::start_with(ServerOptions {
        env: vec![
            ("BERTH_ADMIN_TOKEN".to_owned(), admin_token.to_owned()),
            ("BERTH_MASTER_KEY".to_owned(), master_key.clone()),
        ],
        args: vec!["--local-environments".to_owned(), "all".to_owned()],
        ..ServerOptions::default()
    })
    .await;
    // The token is the environment's: no file to find, but the server's environ holds it.
    let default_company = server.default_company().await;
    let other = server.create_company("tenant").await;
    let tenant_key = server.create_key(&other, "manager").await;
    let (status, fake) = server
        .call(
            Method::POST,
            &format!("/api/companies/{other}/environments"),
            &tenant_key,
            Some(json!({"name": "fake", "driver": "sandbox", "config": {"provider": "fake"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{fake}");
    let port = port_of(&server);
    let script = format!(
        r#"{probes}
try server_port bash -c 'echo > /dev/tcp/127.0.0.1/{port}'
try host_tools uname -a
try write_etc touch /etc/berth-escape
try write_usr touch /usr/berth-escape
try sysctl sh -c 'echo 1 > /proc/sys/vm/drop_caches'
try block_devices sh -c 'ls /dev/sd* /dev/vd* /dev/nvme* /dev/xvd*'
try write_workspace sh -c 'echo x > made-here.txt'
try write_tmp sh -c 'echo x > /tmp/berth-local-$$ && rm /tmp/berth-local-$$'
"#,
        probes = server_probes(&server)
    );

    let cases = [
        (
            "admin on Local",
            server.admin_token.clone(),
            default_company.clone(),
            json!({}),
        ),
        (
            "tenant on Local",
            tenant_key.clone(),
            other.clone(),
            json!({}),
        ),
        (
            "tenant on fake",
            tenant_key.clone(),
            other.clone(),
            json!({"environmentId": fake["id"]}),
        ),
    ];
    for (label, token, company, mut body) in cases {
        body["command"] = json!(["sh", "-c", script]);
        let (run, output) = run_as(&server, &token, &company, body).await;
        assert_eq!(run["status"], "succeeded", "{label}: {run} {output}");
        let probes = results(&output);
        assert_contained(&probes, &output, Some(admin_token));
        assert!(!output.contains(&master_key), "{label}: {output}");
        // Local keeps what makes it useful: the host's tools, its workspace and the network.
        assert_eq!(probes["host_tools"], "reached", "{label}: {output}");
        assert_eq!(probes["server_port"], "reached", "{label}: {output}");
        assert_eq!(probes["write_workspace"], "reached", "{label}: {output}");
        assert_eq!(probes["write_tmp"], "reached", "{label}: {output}");
        // The host itself is read-only, even to a run that is uid 0 without capabilities.
        for name in ["write_etc", "write_usr", "sysctl", "block_devices"] {
            assert_eq!(probes[name], "blocked", "{label}: {name}: {output}");
        }
    }
    server.stop().await;
}

async fn isolated_env(server: &TestServer, company: &str, config: Value) -> String {
    let (status, env) = server
        .post(
            &format!("/api/companies/{company}/environments"),
            json!({"name": format!("isolated-{}", uuid::Uuid::new_v4()), "driver": "sandbox", "config": config}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    env["id"].as_str().unwrap().to_owned()
}

/// Starts a run of two `sleeping` processes (`sleep N`, one in the background) and waits until they are there.
async fn start_sleeping_tree(
    server: &TestServer,
    company: &str,
    env: &str,
    sleeping: &str,
) -> String {
    let script = format!("{sleeping} & {sleeping}");
    let run_id = start_run(
        server,
        company,
        json!({"environmentId": env, "command": ["sh", "-c", script]}),
    )
    .await;
    crate::support::runs::wait_status(server, &run_id, "running").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pgrep(sleeping).is_empty(), "the command never started");
    run_id
}

fn pgrep(pattern: &str) -> String {
    let output = std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn isolated_leases_are_reused_cancelled_and_cleaned_up_after_a_crash() {
    let server = TestServer::start().await;
    let company = server.default_company().await;
    let token = server.admin_token.clone();

    // reuseLease: the sandbox's workspace persists between runs of the environment.
    let kept = isolated_env(
        &server,
        &company,
        json!({"provider": "isolated", "reuseLease": true}),
    )
    .await;
    let (first, output) = run_as(
        &server,
        &token,
        &company,
        json!({"environmentId": kept, "command": ["sh", "-c", "echo remembered > state.txt"]}),
    )
    .await;
    assert_eq!(first["status"], "succeeded", "{first} {output}");
    let (second, output) = run_as(
        &server,
        &token,
        &company,
        json!({"environmentId": kept, "command": ["cat", "state.txt"]}),
    )
    .await;
    assert_eq!(second["status"], "succeeded", "{second} {output}");
    assert_eq!(output, "remembered\n");
    let provider_lease = |run: &Value| {
        let id = run["leaseId"].as_str().unwrap().to_owned();
        let server = &server;
        async move {
            server.get(&format!("/api/environment-leases/{id}")).await.1["providerLeaseId"].clone()
        }
    };
    let kept_id = provider_lease(&first).await;
    assert!(
        kept_id
            .as_str()
            .unwrap()
            .starts_with("sandbox://isolated/env-"),
        "{kept_id}"
    );
    assert_eq!(
        kept_id,
        provider_lease(&second).await,
        "the kept sandbox is resumed"
    );

    // Cancel kills the whole tree.
    let ephemeral = isolated_env(&server, &company, json!({"provider": "isolated"})).await;
    let run_id = start_sleeping_tree(&server, &company, &ephemeral, "sleep 317").await;
    let (status, _) = server
        .post(&format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let cancelled = wait_run(&server, &run_id, Duration::from_secs(30)).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pgrep("sleep 317"), "", "cancel left processes behind");

    // A kill -9 of the server: the sandbox dies with it, and the restart removes what is left.
    let run_id = start_sleeping_tree(&server, &company, &ephemeral, "sleep 319").await;
    let data_dir = server.data_dir.clone();
    let keeper = server.kill_keeping_data().await;
    let started = std::time::Instant::now();
    while !pgrep("sleep 319").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the sandbox outlived its server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restarted = TestServer::start_with(ServerOptions {
        data_dir: Some(data_dir.clone()),
        ..ServerOptions::default()
    })
    .await;
    let (_, run) = restarted.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(run["status"], "failed", "{run}");
    let (_, lease) = restarted
        .get(&format!(
            "/api/environment-leases/{}",
            run["leaseId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(lease["status"], "failed", "{lease}");
    assert_eq!(lease["failureReason"], "orphaned", "{lease}");
    assert_eq!(lease["cleanupStatus"], "success", "{lease}");
    let left: Vec<_> = std::fs::read_dir(data_dir.join("isolated"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("run-"))
        .collect();
    assert!(left.is_empty(), "sandboxes left after cleanup: {left:?}");
    let (status, _) = restarted.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    restarted.stop().await;
    drop(keeper);
}

/// The tier for hosts that refuse namespaces (containers that block user namespaces): a berth that is not root,
/// Landlock as the boundary. The server runs as `nobody`, so every server file is the command's own by DAC: only
/// Landlock, the seccomp filter and Landlock's scoping keep it out.
#[tokio::test]
async fn the_landlock_tier_contains_runs_where_namespaces_are_refused() {
    let server = TestServer::start_with(ServerOptions {
        user: Some(65534),
        args: vec!["--isolation-tier".to_owned(), "landlock".to_owned()],
        ..ServerOptions::default()
    })
    .await;
    let company = server.default_company().await;
    let (status, capabilities) = server
        .get(&format!(
            "/api/companies/{company}/environments/capabilities"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        capabilities["sandboxProviders"]["isolated"]["status"], "ready",
        "{capabilities}"
    );
    let env_id = isolated_env(
        &server,
        &company,
        json!({"provider": "isolated", "diskMb": 4}),
    )
    .await;
    let (_, probe) = server
        .post(&format!("/api/environments/{env_id}/probe"), json!({}))
        .await;
    assert_eq!(probe["ok"], true, "{probe}");
    assert_eq!(probe["details"]["tier"], "landlock", "{probe}");

    // A limit the host cannot enforce for this berth (no cgroup it may write) is refused, never run without it.
    let limited = isolated_env(
        &server,
        &company,
        json!({"provider": "isolated", "memoryMb": 64}),
    )
    .await;
    let (refused, output) = run_as(
        &server,
        &server.admin_token,
        &company,
        json!({"environmentId": limited, "command": ["true"]}),
    )
    .await;
    assert_eq!(refused["status"], "failed", "{refused} {output}");
    assert!(
        refused["error"].as_str().unwrap().contains("memoryMb"),
        "{refused}"
    );

    let port = port_of(&server);
    let script = format!(
        r#"{probes}
try server_port bash -c 'echo > /dev/tcp/127.0.0.1/{port}'
try udp perl -MSocket -e 'socket(my $s, PF_INET, SOCK_DGRAM, 0) or exit 1'
try unix_socket perl -MSocket -e 'socket(my $s, PF_UNIX, SOCK_STREAM, 0) or exit 1'
try user_namespace unshare -U true
try etc_shadow cat /etc/shadow
try write_outside touch /var/tmp/berth-landlock-escape
try write_workspace sh -c 'echo made-inside > output.txt'
try write_tmp sh -c 'echo x > "$TMPDIR/x"'
echo "bridge=$(curl -fsS -H "Authorization: Bearer $BERTH_API_TOKEN" "$BERTH_API_URL/api/agent/run" | grep -o "$BERTH_RUN_ID" | head -1)"
"#,
        probes = server_probes(&server)
    );
    let host = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(host.path(), Some(65534), Some(65534)).unwrap();
    let (run, output) = run_as(
        &server,
        &server.admin_token,
        &company,
        json!({"environmentId": env_id, "command": ["sh", "-c", script],
               "workspace": {"localPath": host.path()}}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {output}");
    let probes = results(&output);
    for name in [
        "admin_token",
        "master_key",
        "database",
        "node_id",
        "list_workspaces",
        "server_environ",
        "signal_server",
        "ptrace_server",
        "server_port",
        "udp",
        "unix_socket",
        "user_namespace",
        "etc_shadow",
        "write_outside",
    ] {
        assert_eq!(
            probes.get(name).map(String::as_str),
            Some("blocked"),
            "{name}: {output}"
        );
    }
    assert_eq!(probes["write_workspace"], "reached", "{output}");
    assert_eq!(probes["write_tmp"], "reached", "{output}");
    assert_eq!(probes["bridge"], run["id"].as_str().unwrap(), "{output}");
    assert!(!std::path::Path::new("/var/tmp/berth-landlock-escape").exists());
    assert_eq!(
        std::fs::read_to_string(host.path().join("output.txt")).unwrap(),
        "made-inside\n"
    );
    server.stop().await;
}
