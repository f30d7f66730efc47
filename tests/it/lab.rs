//! `berth lab ssh up | status | down` through the real binary, and the [`TestSshd`] fixture itself.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::support::server::berth_bin;
use crate::support::sshd::{TestSshd, ssh_client_command};

/// `berth ARGS` with a clean environment and `BERTH_DATA_DIR` = `data_dir`.
fn berth(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(berth_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", data_dir)
        .env("BERTH_DATA_DIR", data_dir)
        .output()
        .expect("run berth")
}

fn describe(output: &Output) -> String {
    format!(
        "status: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn json_out(output: &Output) -> Value {
    assert!(output.status.success(), "{}", describe(output));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", describe(output)))
}

/// Runs `berth lab ssh down` when dropped, so no lab sshd outlives its test, pass or fail.
struct LabGuard {
    data_dir: PathBuf,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = berth(&self.data_dir, &["lab", "ssh", "down"]);
    }
}

fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

#[test]
fn lab_ssh_up_serves_a_working_config_and_down_stops_it() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let _guard = LabGuard {
        data_dir: data_dir.clone(),
    };

    let up = berth(&data_dir, &["lab", "ssh", "up"]);
    let config = json_out(&up);
    let stderr = String::from_utf8_lossy(&up.stderr);
    let lab_dir = data_dir.join("lab/ssh");
    let environment_file = lab_dir.join("environment.json");
    assert!(
        stderr.contains(&format!(
            "berth env create --name ssh-lab --driver ssh --config @{}",
            environment_file.display()
        )),
        "{stderr}"
    );

    // Exactly the API.md §4 ssh config shape.
    let mut keys: Vec<&str> = config
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "host",
            "knownHosts",
            "port",
            "privateKey",
            "remoteWorkspacePath",
            "strictHostKeyChecking",
            "username"
        ]
    );
    assert_eq!(config["host"], "127.0.0.1");
    assert_eq!(config["strictHostKeyChecking"], true);
    let port = u16::try_from(config["port"].as_u64().unwrap()).unwrap();
    let user = config["username"].as_str().unwrap().to_owned();
    let known_hosts = config["knownHosts"].as_str().unwrap().to_owned();
    assert!(
        known_hosts.starts_with(&format!("[127.0.0.1]:{port} ssh-ed25519 AAAA")),
        "{known_hosts}"
    );
    let private_key = config["privateKey"].as_str().unwrap();
    assert!(
        private_key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
        "not an OpenSSH key"
    );
    let workspace = PathBuf::from(config["remoteWorkspacePath"].as_str().unwrap());
    assert!(
        workspace.is_absolute() && workspace.is_dir(),
        "{workspace:?}"
    );

    // The environment file holds the same config and a private key: owner-only.
    let mode = std::fs::metadata(&environment_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "environment.json mode {mode:o}");
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(&environment_file).unwrap()).unwrap();
    assert_eq!(saved, config);
    let dir_mode = std::fs::metadata(&lab_dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700, "lab dir mode {dir_mode:o}");

    // The system ssh client, strict host key checking, with only what `up` printed.
    let key_file = temp.path().join("key");
    std::fs::write(&key_file, private_key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let known_hosts_file = temp.path().join("known_hosts");
    std::fs::write(&known_hosts_file, format!("{known_hosts}\n")).unwrap();
    let ssh = ssh_client_command(&key_file, &known_hosts_file, port, &user)
        .arg(format!("cd '{}' && echo ok", workspace.display()))
        .output()
        .unwrap();
    assert!(ssh.status.success(), "ssh failed: {}", describe(&ssh));
    assert_eq!(String::from_utf8_lossy(&ssh.stdout).trim(), "ok");

    // status: running.
    let status = berth(&data_dir, &["lab", "ssh", "status"]);
    assert!(status.status.success(), "{}", describe(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("running"),
        "{}",
        describe(&status)
    );
    let status = json_out(&berth(&data_dir, &["lab", "ssh", "status", "--json"]));
    assert_eq!(status["status"], "running");
    assert_eq!(status["port"], port);
    let pid = status["pid"].as_i64().unwrap();
    assert!(pid > 0);

    // up again: idempotent, same sshd, same host key.
    let again = json_out(&berth(&data_dir, &["lab", "ssh", "up", "--json"]));
    assert_eq!(again["status"], "running");
    assert_eq!(again["pid"], pid);
    assert_eq!(again["port"], port);
    assert_eq!(again["config"]["knownHosts"], known_hosts.as_str());
    assert_eq!(again["config"], config);

    // down stops it; status then says stopped with exit 3; down again is fine.
    let down = berth(&data_dir, &["lab", "ssh", "down"]);
    assert!(down.status.success(), "{}", describe(&down));
    assert!(
        !port_accepts(port),
        "sshd still accepts on {port} after down"
    );
    assert!(!lab_dir.join("sshd.pid").exists(), "pid file left behind");
    let status = berth(&data_dir, &["lab", "ssh", "status"]);
    assert_eq!(status.status.code(), Some(3), "{}", describe(&status));
    let status = berth(&data_dir, &["lab", "ssh", "status", "--json"]);
    assert_eq!(status.status.code(), Some(3), "{}", describe(&status));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["status"], "stopped");
    let down = berth(&data_dir, &["lab", "ssh", "down"]);
    assert_eq!(down.status.code(), Some(0), "{}", describe(&down));

    // The keys survive down: up again serves the same host key.
    let restarted = json_out(&berth(&data_dir, &["lab", "ssh", "up"]));
    let host_key = |line: &str| line.split_whitespace().nth(2).unwrap().to_owned();
    assert_eq!(
        host_key(restarted["knownHosts"].as_str().unwrap()),
        host_key(&known_hosts)
    );
    assert_eq!(restarted["privateKey"], config["privateKey"]);
    let down = berth(&data_dir, &["lab", "ssh", "down"]);
    assert!(down.status.success(), "{}", describe(&down));
}

#[test]
fn lab_ssh_status_and_down_on_a_fresh_data_dir() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let status = berth(&data_dir, &["lab", "ssh", "status"]);
    assert_eq!(status.status.code(), Some(3), "{}", describe(&status));
    let down = berth(&data_dir, &["lab", "ssh", "down"]);
    assert_eq!(down.status.code(), Some(0), "{}", describe(&down));
}

#[test]
fn test_sshd_runs_commands_and_stops() {
    let sshd = TestSshd::start();
    let (code, stdout) = sshd.exec("echo hi");
    assert_eq!(code, 0, "sshd log:\n{}", sshd.logs());
    assert_eq!(stdout.trim(), "hi");
    let (code, _) = sshd.exec("exit 7");
    assert_eq!(code, 7);

    let config = sshd.config();
    assert_eq!(config["port"], sshd.port);
    assert_eq!(config["knownHosts"], sshd.known_hosts.as_str());
    assert!(
        config["privateKey"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
    );
    assert!(sshd.workspace.is_dir());

    let port = sshd.port;
    sshd.stop();
    assert!(
        !port_accepts(port),
        "sshd still accepts on {port} after stop"
    );
}
