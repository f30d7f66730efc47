//! `berth lab ssh up | status | down`: a throwaway OpenSSH `sshd` on 127.0.0.1 for trying the ssh driver (API.md §1).
//!
//! Everything lives in `<data-dir>/lab/ssh/` (mode 0700): generated host and user keys, `authorized_keys`,
//! `sshd_config`, `sshd.pid`, `sshd.log`, `port`, a `workspace/` dir and `environment.json` — the ready-made ssh
//! environment config `up` prints. `down` stops sshd but keeps the keys, so the next `up` serves the same host key.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rustix::process::{Pid, Signal};
use serde_json::{Value, json};

use crate::private_file::{self, IfExists};

/// How long `up` waits for sshd to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long `down` waits after SIGTERM before SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// `status` exit code when the lab is stopped.
const EXIT_STOPPED: u8 = 3;

const HOST_KEY: &str = "host_ed25519_key";
const USER_KEY: &str = "user_ed25519";
const AUTHORIZED_KEYS: &str = "authorized_keys";
const SSHD_CONFIG: &str = "sshd_config";
const PID_FILE: &str = "sshd.pid";
const LOG_FILE: &str = "sshd.log";
const PORT_FILE: &str = "port";
const WORKSPACE_DIR: &str = "workspace";
const ENVIRONMENT_FILE: &str = "environment.json";

/// `berth lab …`: local fixtures for trying drivers.
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// A throwaway OpenSSH sshd on 127.0.0.1 for the ssh driver.
    #[command(subcommand)]
    Ssh(SshLabCommand),
}

#[derive(Debug, Subcommand)]
pub enum SshLabCommand {
    /// Start the lab sshd (or find it running) and print a ready berth ssh environment config.
    Up(LabArgs),
    /// Is the lab sshd running? Exit 0 when it is, 3 when it is stopped.
    Status(LabArgs),
    /// Stop the lab sshd (its keys are kept for the next `up`).
    Down(LabArgs),
}

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Data dir holding the lab state [default: as for `berth serve`].
    #[arg(long, env = "BERTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `berth lab` subcommand.
pub async fn run(command: LabCommand) -> anyhow::Result<ExitCode> {
    match command {
        LabCommand::Ssh(SshLabCommand::Up(args)) => {
            let lab = SshLab::open(&args)?;
            lab.up(args.json)
        }
        LabCommand::Ssh(SshLabCommand::Status(args)) => {
            let lab = SshLab::open(&args)?;
            lab.status(args.json)
        }
        LabCommand::Ssh(SshLabCommand::Down(args)) => {
            let lab = SshLab::open(&args)?;
            lab.down(args.json)
        }
    }
}

/// The lab's state dir and the paths in it.
#[derive(Debug)]
struct SshLab {
    dir: PathBuf,
}

/// A running lab sshd.
#[derive(Debug, Clone, Copy)]
struct Running {
    pid: i32,
    port: u16,
}

impl SshLab {
    fn open(args: &LabArgs) -> anyhow::Result<Self> {
        let data_dir = match &args.data_dir {
            Some(dir) => dir.clone(),
            None => crate::data_dir::default_data_dir()?,
        };
        let data_dir = std::path::absolute(&data_dir)
            .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
        Ok(Self {
            dir: data_dir.join("lab").join("ssh"),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The running sshd, if the pid file names a live process that is this lab's sshd and its port accepts.
    fn running(&self) -> Option<Running> {
        let pid = self.pid()?;
        let port = self.port()?;
        (is_our_sshd(pid, &self.path(SSHD_CONFIG)) && port_accepts(port))
            .then_some(Running { pid, port })
    }

    fn pid(&self) -> Option<i32> {
        fs::read_to_string(self.path(PID_FILE))
            .ok()?
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|pid| *pid > 0)
    }

    fn port(&self) -> Option<u16> {
        fs::read_to_string(self.path(PORT_FILE))
            .ok()?
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|port| *port > 0)
    }

    fn up(&self, json_output: bool) -> anyhow::Result<ExitCode> {
        let running = match self.running() {
            Some(running) => running,
            None => self.start()?,
        };
        let config = self.environment_config(running.port)?;
        let environment_file = self.path(ENVIRONMENT_FILE);
        write_private(&environment_file, &pretty(&config))?;
        if json_output {
            println!(
                "{}",
                pretty(
                    &json!({"status": "running", "pid": running.pid, "port": running.port, "config": config})
                )
            );
        } else {
            println!("{}", pretty(&config));
        }
        eprintln!(
            "berth env create --name ssh-lab --driver ssh --config @{}",
            environment_file.display()
        );
        Ok(ExitCode::SUCCESS)
    }

    fn status(&self, json_output: bool) -> anyhow::Result<ExitCode> {
        let running = self.running();
        if json_output {
            let body = match running {
                Some(running) => {
                    json!({"status": "running", "pid": running.pid, "port": running.port})
                }
                None => json!({"status": "stopped", "pid": null, "port": self.port()}),
            };
            println!("{}", pretty(&body));
        } else {
            match running {
                Some(running) => println!(
                    "running: sshd pid {} on 127.0.0.1:{} ({})",
                    running.pid,
                    running.port,
                    self.dir.display()
                ),
                None => println!("stopped ({})", self.dir.display()),
            }
        }
        Ok(match running {
            Some(_) => ExitCode::SUCCESS,
            None => ExitCode::from(EXIT_STOPPED),
        })
    }

    fn down(&self, json_output: bool) -> anyhow::Result<ExitCode> {
        let config = self.path(SSHD_CONFIG);
        let stopped = match self.pid() {
            Some(pid) if is_our_sshd(pid, &config) => {
                terminate(pid, &config)?;
                Some(pid)
            }
            _ => None,
        };
        match fs::remove_file(self.path(PID_FILE)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).context("cannot remove the sshd pid file"),
        }
        if json_output {
            println!(
                "{}",
                pretty(&json!({"status": "stopped", "stoppedPid": stopped}))
            );
        } else {
            match stopped {
                Some(pid) => println!("stopped sshd pid {pid}"),
                None => println!("already stopped"),
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Prepares the state dir and keys, writes the config and starts a daemonized sshd.
    fn start(&self) -> anyhow::Result<Running> {
        let sshd = find_sshd()?;
        let keygen = find_program("ssh-keygen").context(
            "ssh-keygen not found: install OpenSSH's client tools (Debian: apt-get install openssh-client)",
        )?;
        create_private_dir(&self.dir)?;
        fs::create_dir_all(self.path(WORKSPACE_DIR))
            .with_context(|| format!("cannot create {}", self.path(WORKSPACE_DIR).display()))?;
        ensure_key(&keygen, &self.path(HOST_KEY))?;
        ensure_key(&keygen, &self.path(USER_KEY))?;
        let user_public = fs::read_to_string(self.path(USER_KEY).with_extension("pub"))
            .context("cannot read the lab user's public key")?;
        write_private(&self.path(AUTHORIZED_KEYS), &user_public)?;

        // Reuse the last port when it is still free: the knownHosts line then stays the same too.
        let port = match self.port().filter(|port| port_is_free(*port)) {
            Some(port) => port,
            None => free_port()?,
        };
        fs::write(self.path(PORT_FILE), format!("{port}\n"))
            .context("cannot write the port file")?;
        let config = sshd_config(&SshdOptions::new(
            port,
            &self.path(HOST_KEY),
            &self.path(AUTHORIZED_KEYS),
            &self.path(PID_FILE),
        ));
        fs::write(self.path(SSHD_CONFIG), config).context("cannot write sshd_config")?;
        match fs::remove_file(self.path(PID_FILE)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).context("cannot remove a stale sshd pid file"),
        }
        ensure_privsep_dir();

        let log_path = self.path(LOG_FILE);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let log_start = log.seek(SeekFrom::End(0)).unwrap_or(0);
        let stderr = log.try_clone().context("cannot share the sshd log")?;
        // sshd daemonizes: this process exits once the daemon has forked.
        let status = Command::new(&sshd)
            .arg("-f")
            .arg(self.path(SSHD_CONFIG))
            .arg("-E")
            .arg(&log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
            .with_context(|| format!("cannot run {}", sshd.display()))?;
        drop(log);
        if !status.success() {
            bail!(
                "sshd failed to start ({status}); {}:\n{}",
                log_path.display(),
                log_tail(&log_path, log_start)
            );
        }

        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(running) = self.running() {
                return Ok(running);
            }
            let new_log = read_from(&log_path, log_start);
            if new_log.contains("fatal") || new_log.contains("Cannot bind") {
                bail!(
                    "sshd failed to start; {}:\n{}",
                    log_path.display(),
                    log_tail(&log_path, log_start)
                );
            }
            if Instant::now() >= deadline {
                if let Some(pid) = self.pid() {
                    let _ = terminate(pid, &self.path(SSHD_CONFIG));
                }
                bail!(
                    "sshd did not accept connections on 127.0.0.1:{port} within {} s; {}:\n{}",
                    START_DEADLINE.as_secs(),
                    log_path.display(),
                    log_tail(&log_path, log_start)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The berth ssh environment config (API.md §4) for this lab.
    fn environment_config(&self, port: u16) -> anyhow::Result<Value> {
        let private_key = fs::read_to_string(self.path(USER_KEY))
            .context("cannot read the lab user's private key")?;
        let host_public = fs::read_to_string(self.path(HOST_KEY).with_extension("pub"))
            .context("cannot read the lab host's public key")?;
        let workspace = fs::canonicalize(self.path(WORKSPACE_DIR))
            .with_context(|| format!("cannot resolve {}", self.path(WORKSPACE_DIR).display()))?;
        Ok(json!({
            "host": "127.0.0.1",
            "port": port,
            "username": current_user(),
            "remoteWorkspacePath": workspace.to_string_lossy(),
            "privateKey": private_key,
            "knownHosts": known_hosts_line(port, &host_public)?,
            "strictHostKeyChecking": true,
        }))
    }
}

/// What goes into an sshd_config besides the fixed settings: where sshd listens, its files, and — for tests — the
/// session limit and extra lines.
#[derive(Debug, Clone, Copy)]
pub struct SshdOptions<'a> {
    pub port: u16,
    pub host_key: &'a Path,
    pub authorized_keys: &'a Path,
    pub pid_file: &'a Path,
    /// `MaxSessions`: sessions per connection (10 in the lab, as in stock sshd).
    pub max_sessions: u32,
    /// Lines appended at the end, each ending in a newline.
    pub extra: &'a str,
}

impl<'a> SshdOptions<'a> {
    /// The lab's options: 10 sessions per connection, nothing extra.
    pub fn new(
        port: u16,
        host_key: &'a Path,
        authorized_keys: &'a Path,
        pid_file: &'a Path,
    ) -> Self {
        Self {
            port,
            host_key,
            authorized_keys,
            pid_file,
            max_sessions: 10,
            extra: "",
        }
    }
}

/// The lab's sshd_config (the test suite's too): loopback only, key auth only, paths absolute.
pub fn sshd_config(options: &SshdOptions<'_>) -> String {
    format!(
        "# berth lab ssh: a throwaway sshd on 127.0.0.1. Generated by `berth lab ssh up`.\n\
         ListenAddress 127.0.0.1\n\
         Port {port}\n\
         HostKey {host_key}\n\
         AuthorizedKeysFile {authorized_keys}\n\
         PidFile {pid_file}\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\n\
         UsePAM no\n\
         StrictModes no\n\
         AllowTcpForwarding yes\n\
         MaxSessions {max_sessions}\n\
         LogLevel VERBOSE\n\
         AcceptEnv none\n\
         Subsystem sftp internal-sftp\n\
         {extra}",
        port = options.port,
        host_key = options.host_key.display(),
        authorized_keys = options.authorized_keys.display(),
        pid_file = options.pid_file.display(),
        max_sessions = options.max_sessions,
        extra = options.extra,
    )
}

/// `[127.0.0.1]:PORT ssh-ed25519 AAAA…` from a `.pub` file's `type key comment`.
fn known_hosts_line(port: u16, host_public: &str) -> anyhow::Result<String> {
    let mut fields = host_public.split_whitespace();
    match (fields.next(), fields.next()) {
        (Some(kind), Some(key)) => Ok(format!("[127.0.0.1]:{port} {kind} {key}")),
        _ => bail!("the lab host public key is malformed"),
    }
}

/// The login name: `$USER`, else `id -un`, else `root`.
fn current_user() -> String {
    if let Some(user) = std::env::var("USER")
        .ok()
        .filter(|user| !user.trim().is_empty())
    {
        return user;
    }
    Command::new("id")
        .arg("-un")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .filter(|user| !user.is_empty())
        .unwrap_or_else(|| "root".to_owned())
}

fn find_sshd() -> anyhow::Result<PathBuf> {
    let standard = Path::new("/usr/sbin/sshd");
    if is_executable(standard) {
        return Ok(standard.to_path_buf());
    }
    find_program("sshd").context(
        "sshd not found (looked in /usr/sbin and PATH): install the OpenSSH server (Debian: apt-get install openssh-server)",
    )
}

/// An executable named `name` on PATH, as an absolute path (sshd refuses to re-exec from a relative one).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .and_then(|candidate| std::path::absolute(candidate).ok())
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))
}

/// Generates an ed25519 key pair at `path` (+ `.pub`) unless both halves exist.
fn ensure_key(keygen: &Path, path: &Path) -> anyhow::Result<()> {
    let public = path.with_extension("pub");
    if path.is_file() && public.is_file() {
        return Ok(());
    }
    for stale in [path, public.as_path()] {
        match fs::remove_file(stale) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cannot remove {}", stale.display()));
            }
        }
    }
    let output = Command::new(keygen)
        .args(["-t", "ed25519", "-N", "", "-C", "berth-lab", "-q", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", keygen.display()))?;
    if !output.status.success() {
        bail!(
            "ssh-keygen failed for {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Writes a file only its owner can read (it may hold a private key).
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    private_file::write_private(path, contents.as_bytes(), IfExists::Overwrite)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// sshd (as root) insists on its privilege-separation dir.
fn ensure_privsep_dir() {
    let dir = Path::new("/run/sshd");
    if dir.is_dir() {
        return;
    }
    if let Err(err) = fs::create_dir_all(dir)
        .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o755)))
    {
        tracing::warn!(error = %err, "cannot create /run/sshd; sshd may refuse to start");
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot find a free port on 127.0.0.1")?;
    Ok(listener
        .local_addr()
        .context("cannot read the free port")?
        .port())
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn port_accepts(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok()
}

/// Whether `pid` is alive and is this lab's sshd (its command line names our config), so a reused pid is never
/// signalled. Without /proc, liveness alone decides. A zombie has an empty command line: not running.
fn is_our_sshd(pid: i32, config: &Path) -> bool {
    let Some(raw) = Pid::from_raw(pid) else {
        return false;
    };
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let needle = config.as_os_str().as_encoded_bytes();
            !needle.is_empty() && cmdline.windows(needle.len()).any(|window| window == needle)
        }
        Err(_) if Path::new("/proc/self").exists() => false,
        Err(_) => rustix::process::test_kill_process(raw).is_ok(),
    }
}

/// SIGTERM, wait up to [`STOP_DEADLINE`], then SIGKILL.
fn terminate(pid: i32, config: &Path) -> anyhow::Result<()> {
    let raw = Pid::from_raw(pid).context("invalid pid")?;
    match rustix::process::kill_process(raw, Signal::TERM) {
        Ok(()) => {}
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("cannot signal sshd pid {pid}")),
    }
    let deadline = Instant::now() + STOP_DEADLINE;
    while Instant::now() < deadline {
        if !is_our_sshd(pid, config) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match rustix::process::kill_process(raw, Signal::KILL) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(err) => return Err(err).with_context(|| format!("cannot kill sshd pid {pid}")),
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && is_our_sshd(pid, config) {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The log written since `offset`.
fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_ok() {
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

/// The last lines sshd logged since `offset`.
fn log_tail(path: &Path, offset: u64) -> String {
    let text = read_from(path, offset);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(20);
    if lines.is_empty() {
        return "(the log is empty)".to_owned();
    }
    lines[start..].join("\n")
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_line_drops_the_comment() {
        let line = known_hosts_line(2222, "ssh-ed25519 AAAAC3Nza berth-lab\n").unwrap();
        assert_eq!(line, "[127.0.0.1]:2222 ssh-ed25519 AAAAC3Nza");
        assert!(known_hosts_line(1, "garbage").is_err());
    }

    #[test]
    fn sshd_config_is_loopback_and_key_only() {
        let config = sshd_config(&SshdOptions::new(
            4242,
            Path::new("/lab/hk"),
            Path::new("/lab/ak"),
            Path::new("/lab/pid"),
        ));
        for line in [
            "ListenAddress 127.0.0.1",
            "Port 4242",
            "HostKey /lab/hk",
            "AuthorizedKeysFile /lab/ak",
            "PidFile /lab/pid",
            "PasswordAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
        ] {
            assert!(config.lines().any(|l| l == line), "missing {line}");
        }
    }
}
