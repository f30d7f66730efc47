//! The two steps of an `isolated` command that run berth's own binary (`berth sandbox STEP`), so nothing needs
//! `unsafe` between fork and exec:
//!
//! 1. **enter** (on the host): joins the run's cgroups, then becomes bubblewrap (`exec`). Every process of the run
//!    descends from it, so none starts outside the limits.
//! 2. **init** (inside, as the sandbox's first process after bubblewrap's reaper): reads the [`InitSpec`] framed at
//!    the head of stdin, starts the relay that carries the callback bridge from `127.0.0.1:PORT` to the Unix socket
//!    berth mounted in, applies rlimits, Landlock and the seccomp filter to itself, starts the command as the
//!    unprivileged sandbox user (which inherits all of it, for good), waits, and writes an [`InitReport`] for the
//!    host through a file it opened before Landlock closed the rest.
//!
//! The spec travels on stdin, never in an argv: it holds the command's env values.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::bwrap::SANDBOX_RUN_DIR;

/// The largest spec berth accepts on stdin: argv and env of one command.
pub const MAX_SPEC_BYTES: usize = 8 << 20;
/// The status file, inside [`SANDBOX_RUN_DIR`].
pub const STATUS_FILE: &str = "status.json";
/// Exit codes the init uses for its own failures, as shells do.
const EXIT_CANNOT_RUN: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;

/// What the host tells the init to do.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Absolute, inside the sandbox.
    pub cwd: String,
    /// The uid (and gid) the command runs as; `None`: the init's own (a user-namespace sandbox).
    pub run_as: Option<u32>,
    pub relay: Option<Relay>,
    /// What Landlock lets the command reach.
    pub landlock: LandlockRules,
    /// Where the init writes its [`InitReport`].
    pub status_file: String,
    /// Refuse to run the command unless Landlock is fully enforced: the Landlock tier, where it is the filesystem
    /// and network boundary rather than a second layer.
    pub require_landlock: bool,
    /// Only TCP sockets (and `socketpair`): the Landlock tier, where no network namespace hides the host's Unix
    /// sockets and UDP.
    pub tcp_only: bool,
    /// `RLIMIT_FSIZE`: the largest file the command may write, where no size-bounded `/tmp` exists.
    pub max_file_size: Option<u64>,
    /// `RLIMIT_NOFILE`.
    pub max_open_files: u64,
    /// `RLIMIT_NPROC`, when no pids cgroup bounds the tree.
    pub max_processes: Option<u64>,
    /// `RLIMIT_AS`, when no memory cgroup bounds the tree.
    pub max_address_space: Option<u64>,
    /// A size-bounded directory to report as full when the command has filled it (`diskMb`).
    pub bounded_dir: Option<String>,
}

/// Landlock's rules for the command.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LandlockRules {
    /// Read and execute beneath these.
    pub read: Vec<String>,
    /// Read, write, create and remove beneath these.
    pub write: Vec<String>,
    /// When set, TCP is handled too: connecting only to these loopback ports, binding none.
    pub tcp_connect: Option<Vec<u16>>,
}

/// The bridge relay: connections to `127.0.0.1:port` inside go to `socket`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Relay {
    pub port: u16,
    pub socket: String,
}

/// How the Landlock layer fared.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LandlockState {
    FullyEnforced,
    PartiallyEnforced,
    #[default]
    NotEnforced,
}

/// What the init reports back, in the run directory's status file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InitReport {
    /// The command was started.
    pub started: bool,
    pub exit_code: Option<i32>,
    /// The number of the signal that ended the command.
    pub signal: Option<i32>,
    /// Why the init could not start the command.
    pub error: Option<String>,
    pub landlock: LandlockState,
    /// The Landlock ABI the kernel offers (0: none).
    pub landlock_abi: i32,
    pub seccomp: bool,
    /// The `diskMb`-bounded directory had no space left when the command ended.
    pub bounded_dir_full: bool,
}

/// Frames a spec for the init's stdin: a 4-byte big-endian length, then the JSON.
pub fn encode_spec(spec: &InitSpec) -> Result<Vec<u8>, Error> {
    let json = serde_json::to_vec(spec).map_err(|err| Error::Spec(err.to_string()))?;
    let length = u32::try_from(json.len())
        .ok()
        .filter(|length| (*length as usize) <= MAX_SPEC_BYTES)
        .ok_or_else(|| Error::Spec(format!("the spec is larger than {MAX_SPEC_BYTES} bytes")))?;
    let mut framed = Vec::with_capacity(json.len() + 4);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(&json);
    Ok(framed)
}

/// Reads the framed spec from stdin without reading a byte past it: the rest of stdin is the command's.
fn read_spec() -> Result<InitSpec, Error> {
    let stdin = rustix::stdio::stdin();
    let read_exact = |buf: &mut [u8]| -> Result<(), Error> {
        let mut filled = 0;
        while filled < buf.len() {
            match rustix::io::read(stdin, &mut buf[filled..]) {
                Ok(0) => return Err(Error::Spec("stdin ended inside the spec".to_owned())),
                Ok(read) => filled += read,
                Err(rustix::io::Errno::INTR) => {}
                Err(err) => return Err(Error::io("reading the spec")(err.into())),
            }
        }
        Ok(())
    };
    let mut length = [0u8; 4];
    read_exact(&mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_SPEC_BYTES {
        return Err(Error::Spec(format!(
            "a spec of {length} bytes is too large"
        )));
    }
    let mut json = vec![0u8; length];
    read_exact(&mut json)?;
    serde_json::from_slice(&json).map_err(|err| Error::Spec(err.to_string()))
}

/// Runs `berth sandbox …` when `args` (the whole argv) asks for it; `None` otherwise.
pub fn dispatch(args: &[OsString]) -> Option<ExitCode> {
    if args.get(1).map(OsString::as_os_str) != Some(OsStr::new("sandbox")) {
        return None;
    }
    let step = args.get(2).and_then(|step| step.to_str());
    Some(match step {
        Some("enter") => enter_main(&args[3..]),
        Some("init") => init_main(),
        _ => {
            eprintln!(
                "berth sandbox: internal steps of the isolated provider (enter, init); not for direct use"
            );
            ExitCode::from(2)
        }
    })
}

/// `berth sandbox enter [--cgroup PROCS_FILE]... [--arg0 NAME] -- PROGRAM ARGS...`: join the cgroups, become
/// PROGRAM (with `NAME` as its `argv[0]` when given: an uncontained Local command keeps the name it was asked by).
pub fn enter_main(args: &[OsString]) -> ExitCode {
    let mut rest = args.iter();
    let mut procs_files = Vec::new();
    let mut arg0 = None;
    loop {
        match rest.next().and_then(|arg| arg.to_str()) {
            Some("--cgroup") => match rest.next() {
                Some(path) => procs_files.push(PathBuf::from(path)),
                None => return fail_early("--cgroup needs a path"),
            },
            Some("--arg0") => match rest.next() {
                Some(name) => arg0 = Some(name),
                None => return fail_early("--arg0 needs a name"),
            },
            Some("--") => break,
            _ => {
                return fail_early(
                    "usage: berth sandbox enter [--cgroup FILE]... [--arg0 NAME] -- PROGRAM ARGS...",
                );
            }
        }
    }
    for file in &procs_files {
        // `0` is "the writing process", in v1 and v2 alike.
        if let Err(err) = std::fs::write(file, "0") {
            return fail_early(&format!(
                "cannot join the run's cgroup {}: {err}",
                file.display()
            ));
        }
    }
    let Some(program) = rest.next() else {
        return fail_early("no program to run");
    };
    let mut command = Command::new(program);
    if let Some(name) = arg0 {
        command.arg0(name);
    }
    // `exec` is execvp: a script without `#!` still runs through /bin/sh, as it would have without this step.
    let err = command.args(rest).exec();
    fail_early(&format!(
        "cannot start {}: {err}",
        Path::new(program).display()
    ))
}

fn fail_early(message: &str) -> ExitCode {
    eprintln!("berth sandbox: {message}");
    ExitCode::from(EXIT_CANNOT_RUN)
}

fn write_report(path: &Path, report: &InitReport) {
    let written = serde_json::to_vec(report)
        .map_err(io::Error::other)
        .and_then(|json| std::fs::write(path, json));
    if let Err(err) = written {
        eprintln!("berth sandbox: cannot write the run's status: {err}");
    }
}

/// Step 2.
pub fn init_main() -> ExitCode {
    let mut report = InitReport {
        landlock_abi: landlock_abi(),
        ..InitReport::default()
    };
    let spec = match read_spec() {
        Ok(spec) => spec,
        Err(err) => {
            report.error = Some(err.to_string());
            write_report(&Path::new(SANDBOX_RUN_DIR).join(STATUS_FILE), &report);
            return fail_early(&err.to_string());
        }
    };
    // Opened before Landlock narrows what this process may open; the command never gets it (close-on-exec).
    let status = match std::fs::File::create(&spec.status_file) {
        Ok(file) => file,
        Err(err) => return fail_early(&format!("cannot open the run's status file: {err}")),
    };
    let fail = |mut report: InitReport, message: String| {
        eprintln!("berth sandbox: {message}");
        report.error = Some(message);
        write_report_to(&status, &report);
        ExitCode::from(EXIT_CANNOT_RUN)
    };
    // The relay's threads start before the restrictions below, which bind only the thread that applies them (and
    // what it starts afterwards: the command).
    if let Some(relay) = &spec.relay
        && let Err(err) = start_relay(relay)
    {
        return fail(report, format!("cannot relay the callback bridge: {err}"));
    }
    if let Err(err) = apply_rlimits(&spec) {
        return fail(report, format!("cannot set resource limits: {err}"));
    }
    match restrict_landlock(&spec.landlock) {
        Ok(state) => report.landlock = state,
        Err(err) => return fail(report, format!("cannot apply Landlock: {err}")),
    }
    if spec.require_landlock && report.landlock != LandlockState::FullyEnforced {
        return fail(
            report,
            "Landlock is the boundary here and this kernel does not fully enforce it".to_owned(),
        );
    }
    // The filter is not optional: without it the sandbox is weaker than documented.
    if let Err(err) = crate::seccomp::apply(spec.tcp_only) {
        return fail(report, format!("cannot install the seccomp filter: {err}"));
    }
    report.seccomp = true;

    let Some((program, args)) = spec.argv.split_first() else {
        return fail(report, "the command is empty".to_owned());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .stdin(Stdio::inherit());
    if let Some(uid) = spec.run_as {
        // std also clears the supplementary groups when it changes the uid.
        command.uid(uid).gid(uid);
    }
    let status_of_command = match command.status() {
        Ok(status) => status,
        Err(err) => {
            let code = if err.kind() == io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_RUN
            };
            let message = format!("cannot run `{program}`: {err}");
            eprintln!("berth sandbox: {message}");
            // Like a shell: a command that cannot start is the command's failure, with its exit code.
            report.started = true;
            report.exit_code = Some(i32::from(code));
            write_report_to(&status, &report);
            return ExitCode::from(code);
        }
    };
    report.started = true;
    report.exit_code = status_of_command.code();
    report.signal = status_of_command.signal();
    if let Some(dir) = &spec.bounded_dir {
        report.bounded_dir_full = rustix::fs::statvfs(dir.as_str())
            .is_ok_and(|stats| stats.f_bavail == 0 || stats.f_favail == 0);
    }
    write_report_to(&status, &report);
    match (status_of_command.code(), status_of_command.signal()) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(signal)) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
        _ => ExitCode::FAILURE,
    }
}

fn write_report_to(mut file: &std::fs::File, report: &InitReport) {
    let written = serde_json::to_vec(report)
        .map_err(io::Error::other)
        .and_then(|json| file.write_all(&json));
    if let Err(err) = written {
        eprintln!("berth sandbox: cannot write the run's status: {err}");
    }
}

fn apply_rlimits(spec: &InitSpec) -> Result<(), Error> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let set = |resource: Resource, value: u64, what: &str| {
        setrlimit(
            resource,
            Rlimit {
                current: Some(value),
                maximum: Some(value),
            },
        )
        .map_err(|err| Error::io(format!("setting {what}"))(err.into()))
    };
    // No core dumps: they would land in the workspace and travel back to the host.
    set(Resource::Core, 0, "RLIMIT_CORE")?;
    // Never above the hard limit berth was given: raising it needs a capability the sandbox does not have.
    let open_files = rustix::process::getrlimit(Resource::Nofile)
        .maximum
        .map_or(spec.max_open_files, |hard| hard.min(spec.max_open_files));
    set(Resource::Nofile, open_files, "RLIMIT_NOFILE")?;
    if let Some(processes) = spec.max_processes {
        set(Resource::Nproc, processes, "RLIMIT_NPROC")?;
    }
    if let Some(bytes) = spec.max_address_space {
        set(Resource::As, bytes, "RLIMIT_AS")?;
    }
    if let Some(bytes) = spec.max_file_size {
        set(Resource::Fsize, bytes, "RLIMIT_FSIZE")?;
    }
    Ok(())
}

/// The kernel's Landlock ABI version, 0 when it has none.
pub fn landlock_abi() -> i32 {
    // Creating (and dropping) an empty ruleset for the newest ABI tells whether any is supported; the crate maps the
    // answer to the best ABI it knows.
    for abi in [ABI::V6, ABI::V5, ABI::V4, ABI::V3, ABI::V2, ABI::V1] {
        let created = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(abi))
            .and_then(|ruleset| ruleset.create());
        if created.is_ok() {
            return abi as i32;
        }
    }
    0
}

/// Landlock on the calling thread: read and execute beneath `rules.read`, everything beneath `rules.write`; TCP only
/// to `rules.tcp_connect` when given; no signals to, and no abstract sockets of, processes outside the domain.
fn restrict_landlock(rules: &LandlockRules) -> Result<LandlockState, Error> {
    let abi = ABI::V6;
    let landlock = |err: landlock::RulesetError| Error::Landlock(err.to_string());
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(landlock)?
        .scope(Scope::from_all(abi))
        .map_err(landlock)?;
    if rules.tcp_connect.is_some() {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(landlock)?;
    }
    let mut created = ruleset
        .create()
        .map_err(landlock)?
        .add_rules(path_beneath_rules(&rules.read, AccessFs::from_read(abi)))
        .map_err(landlock)?
        .add_rules(path_beneath_rules(&rules.write, AccessFs::from_all(abi)))
        .map_err(landlock)?;
    for port in rules.tcp_connect.iter().flatten() {
        created = created
            .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
            .map_err(landlock)?;
    }
    let status = created.restrict_self().map_err(landlock)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockState::FullyEnforced,
        RulesetStatus::PartiallyEnforced => LandlockState::PartiallyEnforced,
        RulesetStatus::NotEnforced => LandlockState::NotEnforced,
    })
}

/// Listens on the sandbox's loopback and hands each connection to the bridge's Unix socket, on threads of its own.
fn start_relay(relay: &Relay) -> Result<(), Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, relay.port))
        .map_err(Error::io(format!("listening on 127.0.0.1:{}", relay.port)))?;
    let socket = PathBuf::from(&relay.socket);
    std::thread::spawn(move || {
        for connection in listener.incoming() {
            let Ok(client) = connection else { continue };
            let socket = socket.clone();
            std::thread::spawn(move || relay_connection(client, &socket));
        }
    });
    Ok(())
}

fn relay_connection(client: TcpStream, socket: &Path) {
    let _ = client.set_nodelay(true);
    let Ok(upstream) = UnixStream::connect(socket) else {
        return;
    };
    let (Ok(mut client_reader), Ok(mut upstream_writer)) =
        (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let forward = std::thread::spawn(move || {
        let _ = io::copy(&mut client_reader, &mut upstream_writer);
        let _ = upstream_writer.shutdown(std::net::Shutdown::Write);
    });
    let mut upstream_reader = upstream;
    let mut client_writer = client;
    let _ = io::copy(&mut upstream_reader, &mut client_writer);
    let _ = client_writer.flush();
    let _ = client_writer.shutdown(std::net::Shutdown::Write);
    let _ = forward.join();
}

/// Reads the init's report from the host's side of the run directory.
pub fn read_report(run_dir: &Path) -> Option<InitReport> {
    let path = run_dir.join(STATUS_FILE);
    let mut text = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut text)
        .ok()?;
    serde_json::from_slice(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_frame_and_round_trip() {
        let spec = InitSpec {
            argv: vec!["sh".to_owned()],
            env: BTreeMap::from([("K".to_owned(), "secret".to_owned())]),
            cwd: "/workspace".to_owned(),
            run_as: Some(5),
            relay: Some(Relay {
                port: 7421,
                socket: "/run/berth/bridge.sock".to_owned(),
            }),
            landlock: LandlockRules {
                read: vec!["/".to_owned()],
                write: vec!["/workspace".to_owned()],
                tcp_connect: Some(vec![7421]),
            },
            status_file: "/run/berth/status.json".to_owned(),
            max_open_files: 4096,
            ..InitSpec::default()
        };
        let framed = encode_spec(&spec).unwrap();
        let length = u32::from_be_bytes(framed[..4].try_into().unwrap()) as usize;
        assert_eq!(length, framed.len() - 4);
        let back: InitSpec = serde_json::from_slice(&framed[4..]).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn unknown_spec_fields_are_refused() {
        let valid = r#"{"argv":[],"env":{},"cwd":"/","runAs":null,"relay":null,"landlock":{"read":[],"write":[]},"statusFile":"/s","requireLandlock":false,"tcpOnly":false,"maxOpenFiles":1}"#;
        assert!(serde_json::from_str::<InitSpec>(valid).is_ok());
        let extra = format!(r#"{},"extra":1}}"#, &valid[..valid.len() - 1]);
        assert!(serde_json::from_str::<InitSpec>(&extra).is_err());
    }
}
