//! A real OpenSSH `sshd` on 127.0.0.1 for ssh-driver tests: its own temp dir, generated keys, the same config as
//! `berth lab ssh`, and a foreground (`-D`) child this test owns, so the sshd always stops with the test.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_server::lab::{SshdOptions, sshd_config};
use serde_json::{Value, json};
use tempfile::TempDir;

const SSHD: &str = "/usr/sbin/sshd";

#[derive(Debug)]
pub struct TestSshd {
    pub port: u16,
    pub user: String,
    /// The client's private key, OpenSSH PEM text.
    pub user_key: String,
    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA…`
    pub known_hosts: String,
    /// An empty dir meant as the environment's `remoteWorkspacePath`.
    pub workspace: PathBuf,
    /// The private key as a 0600 file, for the `ssh` client.
    pub user_key_file: PathBuf,
    /// `known_hosts` as a file, for the `ssh` client.
    pub known_hosts_file: PathBuf,
    pub log_file: PathBuf,
    child: Option<Child>,
    /// As root, the throwaway user the tests log in as (see [`TestSshd::start`]).
    _login_user: Option<SystemUser>,
    /// Owns the keys, config and log; removed on drop.
    _dir: TempDir,
}

impl TestSshd {
    /// Starts sshd and waits until it accepts connections. Panics when OpenSSH is not installed: these tests never skip.
    ///
    /// Run as root (the README test command), the tests log in as a throwaway user whose login shell is `/bin/sh`
    /// with an empty home: sshd starts every command through the user's login shell, and root's own rc files (a
    /// `pyenv init` in `~/.bashrc`, say) would otherwise cost every session, in the tests and in the benchmarks.
    pub fn start() -> Self {
        Self::start_with_config("", 10)
    }

    /// Starts sshd allowing only `max_sessions` sessions per connection (`MaxSessions`; stock sshd allows 10).
    pub fn start_with_max_sessions(max_sessions: u32) -> Self {
        Self::start_with_config("", max_sessions)
    }

    /// Starts sshd with a throwaway system user that logs in with a password (only that user may); the user is
    /// deleted when the returned [`PasswordUser`] drops. Needs root, as the README test command runs.
    pub fn start_with_password_user() -> (Self, PasswordUser) {
        let user = PasswordUser::create();
        let sshd = Self::start_with_config(
            &format!("Match User {}\n    PasswordAuthentication yes\n", user.name),
            10,
        );
        (sshd, user)
    }

    fn start_with_config(extra: &str, max_sessions: u32) -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "openssh-server is not installed: run the README test command"
        );
        let dir = tempfile::tempdir().expect("temp dir for sshd");
        let root = dir.path().canonicalize().expect("canonical temp dir");
        let workspace = root.join("workspace");
        std::fs::create_dir_all(&workspace).expect("create the sshd workspace");
        let host_key = root.join("host_ed25519_key");
        let user_key_file = root.join("user_ed25519");
        keygen(&host_key);
        keygen(&user_key_file);
        let authorized_keys = root.join("authorized_keys");
        std::fs::copy(user_key_file.with_extension("pub"), &authorized_keys)
            .expect("write authorized_keys");
        let host_public =
            std::fs::read_to_string(host_key.with_extension("pub")).expect("host public key");
        let user_key = std::fs::read_to_string(&user_key_file).expect("user private key");
        let login_user = is_root().then(|| {
            // The user must reach its home and workspace under this root-owned temp dir.
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
                .expect("open the sshd dir to the login user");
            let home = root.join("home");
            std::fs::create_dir(&home).expect("create the login user's home");
            let user = SystemUser::create(&home);
            user.give(&home);
            user.give(&workspace);
            user
        });
        let user = login_user
            .as_ref()
            .map_or_else(current_user, |user| user.name.clone());
        ensure_privsep_dir();

        let config_file = root.join("sshd_config");
        let log_file = root.join("sshd.log");
        let known_hosts_file = root.join("known_hosts");
        // A free port can be taken between probing and sshd's bind: retry a few times.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let pid_file = root.join("sshd.pid");
            std::fs::write(
                &config_file,
                sshd_config(&SshdOptions {
                    max_sessions,
                    extra,
                    ..SshdOptions::new(port, &host_key, &authorized_keys, &pid_file)
                }),
            )
            .expect("write sshd_config");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_file)
                .expect("open the sshd log");
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-f")
                .arg(&config_file)
                .arg("-E")
                .arg(&log_file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn sshd");
            let deadline = Instant::now() + Duration::from_secs(10);
            let ready = loop {
                if let Some(status) = child.try_wait().expect("poll sshd") {
                    break Err(format!("sshd exited with {status}"));
                }
                if TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    Duration::from_millis(500),
                )
                .is_ok()
                {
                    break Ok(());
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err("sshd did not accept connections within 10 s".to_owned());
                }
                std::thread::sleep(Duration::from_millis(25));
            };
            match ready {
                Ok(()) => {
                    let mut fields = host_public.split_whitespace();
                    let known_hosts = format!(
                        "[127.0.0.1]:{port} {} {}",
                        fields.next().expect("host key type"),
                        fields.next().expect("host key")
                    );
                    std::fs::write(&known_hosts_file, format!("{known_hosts}\n"))
                        .expect("write known_hosts");
                    return Self {
                        port,
                        user,
                        user_key,
                        known_hosts,
                        workspace,
                        user_key_file,
                        known_hosts_file,
                        log_file,
                        child: Some(child),
                        _login_user: login_user,
                        _dir: dir,
                    };
                }
                Err(reason) => failures.push(reason),
            }
        }
        panic!(
            "sshd did not start: {failures:?}; log:\n{}",
            std::fs::read_to_string(&log_file).unwrap_or_default()
        );
    }

    /// The berth ssh environment config (API.md §4) for this sshd, like `berth lab ssh up` prints.
    pub fn config(&self) -> Value {
        json!({
            "host": "127.0.0.1",
            "port": self.port,
            "username": self.user,
            "remoteWorkspacePath": self.workspace.to_string_lossy(),
            "privateKey": self.user_key,
            "knownHosts": self.known_hosts,
            "strictHostKeyChecking": true,
        })
    }

    /// What sshd logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Runs `command` on the remote side with the system `ssh` client, host key checked strictly, independently of
    /// berth. Returns the exit code (-1 when killed by a signal) and stdout.
    pub fn exec(&self, command: &str) -> (i32, String) {
        let output = ssh_client_command(
            &self.user_key_file,
            &self.known_hosts_file,
            self.port,
            &self.user,
        )
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }

    /// Makes logging in slow, as on a developer's host whose rc files run `pyenv init` or nvm: the throwaway user's
    /// login shell becomes bash, and its `~/.bashrc` (which bash reads for the commands sshd starts) sleeps `delay`.
    /// Needs the throwaway user (root).
    #[allow(
        dead_code,
        reason = "the ssh bench's slow-login figures; no integration test needs a slow login"
    )]
    pub fn slow_login(&self, delay: Duration) {
        let entry = Command::new("getent")
            .args(["passwd", &self.user])
            .output()
            .expect("run getent");
        let entry = String::from_utf8_lossy(&entry.stdout).trim().to_owned();
        let home = entry.split(':').nth(5).unwrap_or_default().to_owned();
        assert!(
            self._login_user.is_some() && !home.is_empty(),
            "a slow login reshapes the throwaway user, which needs root: {entry}"
        );
        std::fs::write(
            Path::new(&home).join(".bashrc"),
            format!("sleep {:.3}\n", delay.as_secs_f64()),
        )
        .expect("write ~/.bashrc");
        let status = Command::new("usermod")
            .args(["-s", "/bin/bash", &self.user])
            .status()
            .expect("run usermod");
        assert!(status.success(), "usermod failed");
    }

    /// Lets `public_key` (an `authorized_keys` line) log in too.
    pub fn authorize(&self, public_key: &str) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self._dir.path().join("authorized_keys"))
            .expect("open authorized_keys");
        std::io::Write::write_all(&mut file, format!("{}\n", public_key.trim()).as_bytes())
            .expect("append to authorized_keys");
    }

    /// Stops sshd now (dropping does the same).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestSshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway system user with `/bin/sh` as its login shell; its processes are killed and it is deleted on drop.
#[derive(Debug)]
pub struct SystemUser {
    pub name: String,
}

impl SystemUser {
    fn create(home: &Path) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let name = format!("berth{suffix}");
        // Tests start users in parallel, and useradd gives up while another holds the passwd lock: retry.
        retry_locked(|| {
            Command::new("useradd")
                // `*`: no password, but not locked (sshd refuses locked accounts even with a key).
                .args(["-M", "-p", "*", "-s", "/bin/sh", "-d"])
                .arg(home)
                .arg(&name)
                .status()
                .expect("run useradd (the ssh tests need root or a user of their own)")
                .success()
        });
        Self { name }
    }

    fn set_password(&self, password: &str) {
        retry_locked(|| {
            let mut chpasswd = Command::new("chpasswd")
                .stdin(Stdio::piped())
                .spawn()
                .expect("run chpasswd");
            std::io::Write::write_all(
                chpasswd.stdin.as_mut().expect("chpasswd stdin"),
                format!("{}:{password}\n", self.name).as_bytes(),
            )
            .expect("write to chpasswd");
            drop(chpasswd.stdin.take());
            chpasswd.wait().expect("chpasswd").success()
        });
    }

    /// Makes `path` the user's.
    fn give(&self, path: &Path) {
        let status = Command::new("chown")
            .arg(&self.name)
            .arg(path)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown {} failed", path.display());
    }
}

impl Drop for SystemUser {
    fn drop(&mut self) {
        // Its processes first: userdel refuses a user that is logged in.
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .status();
        // What its runners kept in /tmp: a runner killed with KILL cannot clean up, and the next runner that would
        // (one of the same user) never comes.
        let _ = Command::new("find")
            .args([
                "/tmp",
                "-maxdepth",
                "1",
                "-name",
                "berth-runner-*",
                "-user",
                &self.name,
            ])
            .args(["-exec", "rm", "-rf", "{}", "+"])
            .status();
        for _ in 0..50 {
            match Command::new("userdel").arg(&self.name).status() {
                Ok(status) if status.success() => return,
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

fn retry_locked(mut attempt: impl FnMut() -> bool) {
    for _ in 0..50 {
        if attempt() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("a user account command kept failing (is /etc/passwd locked?)");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// A system user with a password, for password authentication; removed on drop.
#[derive(Debug)]
pub struct PasswordUser {
    pub name: String,
    pub password: String,
    /// A directory the user owns, for `remoteWorkspacePath`.
    pub workspace: PathBuf,
    _user: SystemUser,
    _dir: TempDir,
}

impl PasswordUser {
    fn create() -> Self {
        // The user must reach its workspace: a world-traversable parent, a directory of its own inside.
        let dir = tempfile::Builder::new()
            .prefix("berth-pw-")
            .tempdir_in("/tmp")
            .expect("temp dir for the password user");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the password user's dir");
        let workspace = dir.path().join("workspace");
        std::fs::create_dir(&workspace).expect("create the password user's workspace");
        let user = SystemUser::create(Path::new("/nonexistent"));
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        user.set_password(&password);
        user.give(&workspace);
        Self {
            name: user.name.clone(),
            password,
            workspace,
            _user: user,
            _dir: dir,
        }
    }
}

/// An `ssh` client command with only the given key and known_hosts file, strict host key checking and no user
/// config; append the remote command.
pub fn ssh_client_command(key: &Path, known_hosts: &Path, port: u16, user: &str) -> Command {
    assert!(
        Path::new("/usr/bin/ssh").exists() || which("ssh"),
        "openssh-client is not installed: run the README test command"
    );
    let mut command = Command::new("ssh");
    command
        .args(["-F", "/dev/null", "-i"])
        .arg(key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-p",
        ])
        .arg(port.to_string())
        .arg(format!("{user}@127.0.0.1"));
    command
}

fn keygen(path: &Path) {
    let output = Command::new("ssh-keygen")
        .args(["-t", "ed25519", "-N", "", "-C", "berth-test", "-q", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "openssh-client is not installed (ssh-keygen: {err}): run the README test command"
            )
        });
    assert!(
        output.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
}

fn current_user() -> String {
    if let Some(user) = std::env::var("USER").ok().filter(|u| !u.trim().is_empty()) {
        return user;
    }
    Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .filter(|user| !user.is_empty())
        .unwrap_or_else(|| "root".to_owned())
}

fn ensure_privsep_dir() {
    let dir = Path::new("/run/sshd");
    if !dir.is_dir() && std::fs::create_dir_all(dir).is_ok() {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}
