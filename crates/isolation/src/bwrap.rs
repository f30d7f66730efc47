//! Command lines for `bwrap` (Debian's `bubblewrap`): the namespaces and filesystem views berth runs commands in.
//!
//! bwrap runs in one of two modes. As root (berth's usual deployment) it is *privileged*: it creates the namespaces
//! itself, with no user namespace, and drops every capability of the command unless told otherwise. As any other
//! user it builds an unprivileged user namespace first; the command then runs as berth's own user, mapped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where berth looks for bubblewrap, in order. A fixed list, not `PATH`: the server's `PATH` is not the sandbox's
/// trust root.
pub const BWRAP_CANDIDATES: [&str; 3] = ["/usr/bin/bwrap", "/usr/local/bin/bwrap", "/bin/bwrap"];

/// The user an `isolated` command runs as when berth is root: a uid no host account has, so no host process can
/// signal or trace it either. Its files in the sandbox workspace belong to this uid on the host.
pub const SANDBOX_UID: u32 = 1_990_000_000;

/// The workspace inside an `isolated` sandbox.
pub const SANDBOX_WORKSPACE: &str = "/workspace";
/// berth's own directory inside the sandbox: the bridge socket, the init's status file.
pub const SANDBOX_RUN_DIR: &str = "/run/berth";
/// berth's binary inside the sandbox, read-only: the sandbox's init.
pub const SANDBOX_INIT: &str = "/run/berth-init";

/// Finds bubblewrap, or says why there is none.
pub fn find() -> Result<PathBuf, String> {
    BWRAP_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "bubblewrap (bwrap) is not installed; install it (Debian/Ubuntu: `apt-get install bubblewrap`)"
                .to_owned()
        })
}

/// How bwrap gets its namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// berth runs as root: bwrap creates the namespaces directly; the command gets no capabilities.
    Root,
    /// berth runs as another user: bwrap creates an unprivileged user namespace first.
    UserNamespace,
}

impl Privilege {
    pub fn of_this_process() -> Self {
        if rustix::process::geteuid().is_root() {
            Self::Root
        } else {
            Self::UserNamespace
        }
    }
}

/// A command line under construction.
#[derive(Debug, Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, flag: &str) -> &mut Self {
        self.0.push(flag.into());
        self
    }

    fn pair(&mut self, flag: &str, value: impl Into<OsString>) -> &mut Self {
        self.0.push(flag.into());
        self.0.push(value.into());
        self
    }

    fn triple(
        &mut self,
        flag: &str,
        first: impl Into<OsString>,
        second: impl Into<OsString>,
    ) -> &mut Self {
        self.0.push(flag.into());
        self.0.push(first.into());
        self.0.push(second.into());
        self
    }
}

/// The view for Local and fake-provider runs: the host filesystem read-only (its tools, its files), minus berth's own
/// directories, with the run's workspace and the host's `/tmp` read-write, the basic devices and a read-only `/proc` of its
/// own PID namespace (the server and every other host process out of sight; no sysctl writes), an IPC namespace of its
/// own, and the network shared. Read-only matters most when berth is root: the command is then uid 0 without
/// capabilities, and the owner's permissions on the host's files would otherwise let it rewrite them.
#[derive(Clone, Debug)]
pub struct HostView {
    pub privilege: Privilege,
    /// Directories hidden behind an empty read-only tmpfs: the data dir, provider roots, workspace roots.
    pub masked_dirs: Vec<PathBuf>,
    /// Files hidden behind `/dev/null`: a database that lives outside the data dir.
    pub masked_files: Vec<PathBuf>,
    /// Directories the run may write, at the same path: its own workspace (possibly inside a masked one).
    pub exposed_dirs: Vec<PathBuf>,
}

impl HostView {
    /// bwrap's arguments, ending with `--` and `argv`.
    pub fn args(&self, argv: &[String]) -> Vec<OsString> {
        let mut args = Args::default();
        args.flag("--die-with-parent")
            .flag("--unshare-pid")
            .flag("--unshare-ipc");
        match self.privilege {
            // As root, bwrap leaves the command every capability unless told otherwise.
            Privilege::Root => args.pair("--cap-drop", "ALL"),
            Privilege::UserNamespace => args.flag("--unshare-user"),
        };
        // `--ro-bind` is recursive: /sys and every other mount come read-only too. /dev is bwrap's minimal one (no
        // disks), /proc the new PID namespace's, made read-only so /proc/sys cannot be written either.
        // /tmp stays the host's, writable: Local runs hand files to and from the host there.
        args.triple("--ro-bind", "/", "/")
            .pair("--dev", "/dev")
            .pair("--proc", "/proc")
            .triple("--bind", "/tmp", "/tmp");
        // Only existing directories: bwrap would create a missing mount point through the host's own `/`.
        let masked: Vec<&PathBuf> = self.masked_dirs.iter().filter(|dir| dir.is_dir()).collect();
        for dir in &masked {
            args.pair("--perms", "0111").pair("--tmpfs", dir);
        }
        for file in &self.masked_files {
            if file.exists() {
                args.triple("--ro-bind", "/dev/null", file);
            }
        }
        // Mount points inside a mask are made while it is still writable, the directories on the way search-only
        // (no listing of what else was there); then the masks turn read-only.
        for dir in &self.exposed_dirs {
            let hiding = masked
                .iter()
                .map(|mask| mask.as_path())
                .find(|mask| dir.starts_with(mask));
            if let Some(mask) = hiding {
                let mut between: Vec<&Path> = dir
                    .ancestors()
                    .skip(1)
                    .take_while(|ancestor| *ancestor != mask)
                    .collect();
                between.reverse();
                for ancestor in between {
                    args.pair("--perms", "0111").pair("--dir", ancestor);
                }
            }
            args.triple("--bind", dir, dir);
        }
        for dir in masked {
            args.pair("--remount-ro", dir);
        }
        args.pair("--remount-ro", "/proc");
        args.flag("--");
        args.0.extend(argv.iter().map(OsString::from));
        args.0
    }
}

/// The view for the `isolated` provider (API.md §8).
#[derive(Clone, Debug)]
pub struct SandboxView {
    pub privilege: Privilege,
    /// The host directory seen read-write at [`SANDBOX_WORKSPACE`].
    pub workspace: PathBuf,
    /// The host directory seen at [`SANDBOX_RUN_DIR`]: the bridge socket, the status file, `passwd` and `group`.
    pub run_dir: PathBuf,
    /// berth's own binary, bind-mounted read-only at [`SANDBOX_INIT`].
    pub init_program: PathBuf,
    /// Host paths the environment grants read-only, at the same path inside.
    pub read_only: Vec<PathBuf>,
    /// The size of the private `/tmp`, from `diskMb`.
    pub tmp_bytes: Option<u64>,
}

/// What of `/etc` a program needs to start and behave: the loader's cache, TLS roots, name-service and time-zone
/// settings, Debian's alternatives (which `/usr/bin` links point through). Not `shadow`, not `ssh`, not the host's
/// accounts: `passwd` and `group` are berth's own, naming only root and the sandbox user.
pub const ETC_ENTRIES: [&str; 14] = [
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "nsswitch.conf",
    "localtime",
    "timezone",
    "host.conf",
    "mime.types",
    "os-release",
    "debian_version",
];

impl SandboxView {
    /// bwrap's arguments, ending with `--` and the init's command line.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = Args::default();
        args.flag("--die-with-parent")
            .flag("--new-session")
            .flag("--unshare-pid")
            .flag("--unshare-net")
            .flag("--unshare-ipc")
            .flag("--unshare-uts")
            .flag("--unshare-cgroup-try")
            .pair("--hostname", "berth-sandbox")
            .flag("--clearenv");
        match self.privilege {
            // The init keeps only what it needs to hand the command its unprivileged user.
            Privilege::Root => {
                args.pair("--cap-drop", "ALL")
                    .pair("--cap-add", "CAP_SETUID")
                    .pair("--cap-add", "CAP_SETGID");
            }
            Privilege::UserNamespace => {
                args.flag("--unshare-user")
                    .flag("--disable-userns")
                    .pair("--uid", "1000")
                    .pair("--gid", "1000");
            }
        }
        args.triple("--ro-bind", "/usr", "/usr");
        for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            let host = Path::new("/").join(top);
            match std::fs::read_link(&host) {
                Ok(target) => {
                    args.triple("--symlink", target, &host);
                }
                Err(_) if host.is_dir() => {
                    args.triple("--ro-bind", &host, &host);
                }
                Err(_) => {}
            }
        }
        for entry in ETC_ENTRIES {
            let host = Path::new("/etc").join(entry);
            args.triple("--ro-bind-try", &host, &host);
        }
        args.triple("--ro-bind", self.run_dir.join("passwd"), "/etc/passwd")
            .triple("--ro-bind", self.run_dir.join("group"), "/etc/group")
            .pair("--proc", "/proc")
            .pair("--dev", "/dev");
        if let Some(bytes) = self.tmp_bytes {
            args.pair("--size", bytes.to_string());
        }
        args.pair("--perms", "1777")
            .pair("--tmpfs", "/tmp")
            // bwrap would make /run 0700 on its own, and the sandbox user must reach the init inside it.
            .pair("--perms", "0755")
            .pair("--dir", "/run")
            .triple("--bind", &self.workspace, SANDBOX_WORKSPACE)
            .triple("--bind", &self.run_dir, SANDBOX_RUN_DIR)
            .triple("--ro-bind", &self.init_program, SANDBOX_INIT);
        for path in &self.read_only {
            args.triple("--ro-bind", path, path);
        }
        args.pair("--remount-ro", "/")
            // The command's own cwd is set by the last step, as the sandbox user: root without capabilities may
            // not enter the workspace.
            .pair("--chdir", "/")
            .flag("--")
            .flag(SANDBOX_INIT)
            .flag("sandbox")
            .flag("init");
        args.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(args: &[OsString]) -> String {
        args.iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_host_view_masks_existing_dirs_and_reexposes_the_workspace() {
        let data = tempfile::tempdir_in("/var/tmp").unwrap();
        let workspace = data.path().join("workspaces/run");
        std::fs::create_dir_all(&workspace).unwrap();
        let view = HostView {
            privilege: Privilege::Root,
            masked_dirs: vec![
                data.path().to_path_buf(),
                PathBuf::from("/nonexistent-berth"),
            ],
            masked_files: vec![],
            exposed_dirs: vec![workspace.clone()],
        };
        let args = text(&view.args(&["sh".to_owned(), "-c".to_owned(), "true".to_owned()]));
        assert!(
            args.contains(&format!("--tmpfs {}", data.path().display())),
            "{args}"
        );
        assert!(!args.contains("nonexistent-berth"), "{args}");
        let tmpfs = args.find("--tmpfs").unwrap();
        let rebind = args
            .find(&format!("--bind {}", workspace.display()))
            .unwrap();
        assert!(
            rebind > tmpfs,
            "the workspace must be mounted over the mask: {args}"
        );
        assert!(args.ends_with("-- sh -c true"), "{args}");
        assert!(!args.contains("--unshare-user"));
    }

    #[test]
    fn the_sandbox_view_shares_no_network_and_mounts_the_init_read_only() {
        let view = SandboxView {
            privilege: Privilege::UserNamespace,
            workspace: PathBuf::from("/data/ws"),
            run_dir: PathBuf::from("/data/run"),
            init_program: PathBuf::from("/usr/local/bin/berth"),
            read_only: vec![PathBuf::from("/opt/tools")],
            tmp_bytes: Some(64 << 20),
        };
        let args = text(&view.args());
        for expected in [
            "--unshare-net",
            "--unshare-pid",
            "--unshare-user",
            "--disable-userns",
            "--ro-bind /usr/local/bin/berth /run/berth-init",
            "--bind /data/ws /workspace",
            "--ro-bind /opt/tools /opt/tools",
            "--size 67108864 --perms 1777 --tmpfs /tmp",
        ] {
            assert!(args.contains(expected), "missing {expected}: {args}");
        }
        assert!(!args.contains("--share-net"));
        assert!(!args.contains("/etc/shadow"));
        assert!(args.ends_with("-- /run/berth-init sandbox init"), "{args}");
    }
}
