//! Containment of commands that run on this host's filesystem: Local runs and the fake provider's.
//!
//! Such a command keeps what makes Local useful — the host's tools, its workspace, the network — but runs in a PID
//! and IPC namespace of its own (berth's server and every other host process are out of sight: no `/proc/PID/environ`,
//! no signals, no ptrace), with no capabilities and no new privileges, and with berth's own directories (the data
//! dir: tokens, master key, database, output, other runs' workspaces; provider roots) hidden behind empty read-only
//! mounts. Its own workspace is mounted back where it was. bubblewrap builds all of it ([`berth_isolation::bwrap`]).
//!
//! Where the host cannot build that (no bubblewrap, user namespaces refused to a non-root berth), commands are
//! refused with the reason and the fix, unless the operator opted in to uncontained runs
//! (`berth serve --allow-uncontained-local`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_core::driver::DriverError;
use berth_isolation::bwrap::{HostView, Privilege};
use berth_isolation::probe::HostSupport;
use serde_json::{Map, Value, json};

use crate::process::{CgroupTracking, DEFAULT_PATH, ProcessSpec, find_in_path};

/// coreutils' `env`, which every Debian system has.
const ENV_PROGRAM: &str = "/usr/bin/env";

/// How host commands are contained. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Containment {
    inner: Arc<Mode>,
    /// Where berth may make cgroups for commands it does not contain, read at start-up; `None`: it may not.
    tracking_hierarchy: Option<berth_isolation::cgroup::Hierarchy>,
    /// Set by [`Containment::track_processes`] when uncontained commands get a cgroup each.
    tracking: Option<CgroupTracking>,
}

#[derive(Debug)]
enum Mode {
    Contained {
        bwrap: PathBuf,
        privilege: Privilege,
        masked_dirs: Vec<PathBuf>,
        masked_files: Vec<PathBuf>,
    },
    /// The operator asked for uncontained runs; `reason` is why containment was not possible (or `None` when it was
    /// and the operator still turned it off).
    Uncontained {
        reason: Option<String>,
    },
    Refused {
        reason: String,
    },
}

/// What berth hides from host commands.
#[derive(Clone, Debug, Default)]
pub struct Hidden {
    /// Directories: the data dir, provider roots.
    pub dirs: Vec<PathBuf>,
    /// Files: a SQLite database outside the data dir, with its `-wal`/`-shm`.
    pub files: Vec<PathBuf>,
}

impl Containment {
    /// Contains host commands when `support` allows it; otherwise refuses them, or (with `allow_uncontained`) runs
    /// them as they are.
    pub fn new(support: &HostSupport, hidden: Hidden, allow_uncontained: bool) -> Self {
        let mode = match support.namespaces() {
            Ok(bwrap) if !allow_uncontained => Mode::Contained {
                bwrap: bwrap.clone(),
                privilege: support.privilege,
                masked_dirs: canonical_all(hidden.dirs),
                masked_files: canonical_all(hidden.files),
            },
            Ok(_) => Mode::Uncontained { reason: None },
            Err(reason) if allow_uncontained => Mode::Uncontained {
                reason: Some(reason),
            },
            Err(reason) => Mode::Refused {
                reason: format!(
                    "this host cannot contain commands that run on it: {reason}. Fix that, or start berth with \
                     --allow-uncontained-local to run Local and fake-provider commands without containment"
                ),
            },
        };
        Self {
            inner: Arc::new(mode),
            tracking_hierarchy: support.cgroups.tracking(),
            tracking: None,
        }
    }

    /// No containment, for unit tests of drivers that do not exercise it.
    pub fn disabled_for_tests() -> Self {
        Self {
            inner: Arc::new(Mode::Uncontained { reason: None }),
            tracking_hierarchy: None,
            tracking: None,
        }
    }

    /// Puts every uncontained command in a cgroup of its own, joined through `trampoline` (berth's own binary, which
    /// serves `berth sandbox enter`; see [`CgroupTracking`]), where this host lets berth make cgroups. Contained
    /// commands need none: their PID namespace dies with bubblewrap. Where no cgroup can be made, says so once: such
    /// commands are tracked by process group only, which a command that calls `setsid` leaves.
    pub fn track_processes(mut self, trampoline: PathBuf) -> Self {
        if !matches!(*self.inner, Mode::Uncontained { .. }) {
            return self;
        }
        let tested = match self.tracking_hierarchy.clone() {
            Some(hierarchy) => {
                let tracking = CgroupTracking::new(trampoline, hierarchy);
                tracking.self_test().map(|()| tracking)
            }
            None => Err("not root, and no cgroup delegated to it".to_owned()),
        };
        match tested {
            Ok(tracking) => {
                tracing::info!(
                    tracking = tracking.describe(),
                    "uncontained Local and fake-provider commands each run in a cgroup of their own"
                );
                self.tracking = Some(tracking);
            }
            Err(reason) => tracing::warn!(
                %reason,
                "berth cannot put commands in cgroups here: uncontained Local and fake-provider commands are tracked \
                 by process group only, so one that calls setsid can outlive its run's timeout, cancel and end, and a \
                 crash of berth"
            ),
        }
        self
    }

    /// The cgroup tracking uncontained commands get, when they get one.
    pub fn tracking(&self) -> Option<&CgroupTracking> {
        self.tracking.as_ref()
    }

    /// How the processes of a command are found and ended, for probe details: `pid-namespace` (contained: bubblewrap's
    /// PID namespace, which dies with it), `cgroup-v2` or `cgroup-v1` (a cgroup per command), `process-group`.
    pub fn process_tracking(&self) -> &'static str {
        match (&*self.inner, &self.tracking) {
            (Mode::Contained { .. }, _) => "pid-namespace",
            (_, Some(tracking)) => tracking.describe(),
            (_, None) => "process-group",
        }
    }

    pub fn is_contained(&self) -> bool {
        matches!(*self.inner, Mode::Contained { .. })
    }

    /// The refusal, when commands cannot run here.
    pub fn refusal(&self) -> Option<DriverError> {
        match &*self.inner {
            Mode::Refused { reason } => Some(DriverError::Uncontained {
                reason: reason.clone(),
            }),
            _ => None,
        }
    }

    /// `spec` as it runs contained: bubblewrap, with `workspace` (a directory that may sit inside a hidden one)
    /// mounted back read-write. The program is looked up first, on the host, so a missing one reads as before.
    pub fn confine(&self, spec: ProcessSpec, workspace: &Path) -> Result<ProcessSpec, DriverError> {
        let (bwrap, privilege, masked_dirs, masked_files) = match &*self.inner {
            Mode::Contained {
                bwrap,
                privilege,
                masked_dirs,
                masked_files,
            } => (bwrap, *privilege, masked_dirs, masked_files),
            Mode::Uncontained { .. } => return Ok(spec),
            Mode::Refused { reason } => {
                return Err(DriverError::Uncontained {
                    reason: reason.clone(),
                });
            }
        };
        let Some(program) = spec.argv.first() else {
            return Err(DriverError::Spawn {
                program: String::new(),
                message: "the command is empty".to_owned(),
            });
        };
        let search = spec.env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        let found = if program.contains('/') {
            spec.cwd.join(program).exists()
        } else {
            find_in_path(program, search, &spec.cwd).is_some()
        };
        if !found {
            return Err(DriverError::Spawn {
                program: program.clone(),
                message: "No such file or directory (os error 2)".to_owned(),
            });
        }
        let workspace =
            std::fs::canonicalize(workspace).unwrap_or_else(|_| workspace.to_path_buf());
        let view = HostView {
            privilege,
            masked_dirs: masked_dirs.clone(),
            masked_files: masked_files.clone(),
            // The host is read-only; the workspace is where the run writes (besides the host's /tmp).
            exposed_dirs: vec![workspace],
        };
        // bwrap exports its own PWD; the contract gives the command exactly the environment the run asked for, so
        // `env` (which then execs the command) puts back what was asked: the run's PWD, or none.
        let mut command = vec![ENV_PROGRAM.to_owned()];
        match spec.env.get("PWD") {
            Some(pwd) => command.push(format!("PWD={pwd}")),
            None => command.extend(["-u".to_owned(), "PWD".to_owned()]),
        }
        command.push("--".to_owned());
        command.extend(spec.argv.iter().cloned());
        let mut argv = Vec::with_capacity(command.len() + 32);
        argv.push(path_text(bwrap)?);
        for arg in view.args(&command) {
            argv.push(arg.into_string().map_err(|arg| {
                DriverError::failed(format!(
                    "cannot contain a command with the non-UTF-8 path {}",
                    Path::new(&arg).display()
                ))
            })?);
        }
        Ok(ProcessSpec { argv, ..spec })
    }

    /// Probe details: how commands on this host are contained.
    pub fn describe(&self) -> Value {
        match &*self.inner {
            Mode::Contained {
                bwrap,
                privilege,
                masked_dirs,
                ..
            } => json!({
                "status": "contained",
                "mechanism": format!(
                    "bubblewrap ({}): own PID and IPC namespaces, no capabilities, no new privileges",
                    bwrap.display()
                ),
                "user": match privilege {
                    Privilege::Root => "the server's user (root) without capabilities",
                    Privilege::UserNamespace => "the server's user, in a user namespace",
                },
                "hidden": masked_dirs.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>(),
            }),
            Mode::Uncontained { reason } => {
                let mut value = Map::new();
                value.insert("status".to_owned(), "uncontained".into());
                value.insert(
                    "detail".to_owned(),
                    "the operator started berth with --allow-uncontained-local: commands run as the server's \
                     user and can reach its data dir and processes"
                        .into(),
                );
                if let Some(reason) = reason {
                    value.insert("reason".to_owned(), reason.clone().into());
                }
                Value::Object(value)
            }
            Mode::Refused { reason } => json!({"status": "refused", "reason": reason}),
        }
    }
}

fn path_text(path: &Path) -> Result<String, DriverError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| DriverError::failed(format!("the path {} is not UTF-8", path.display())))
}

/// Canonical paths, so a mask lands on the real directory; a path that does not resolve is kept as given.
fn canonical_all(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut canonical: Vec<PathBuf> = paths
        .into_iter()
        .map(|path| std::fs::canonicalize(&path).unwrap_or(path))
        .collect();
    canonical.sort();
    canonical.dedup();
    canonical
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use berth_isolation::cgroup::Layout;

    use super::*;

    fn support(
        bwrap: Result<PathBuf, String>,
        privilege: Privilege,
        userns_off: bool,
    ) -> HostSupport {
        HostSupport {
            bwrap,
            privilege,
            user_namespaces: if userns_off {
                Err((
                    "kernel.unprivileged_userns_clone=0".to_owned(),
                    "sysctl -w kernel.unprivileged_userns_clone=1".to_owned(),
                ))
            } else {
                Ok(())
            },
            cgroups: Layout::default(),
            landlock_abi: 0,
        }
    }

    fn spec(cwd: &Path) -> ProcessSpec {
        ProcessSpec {
            argv: vec!["sh".to_owned(), "-c".to_owned(), "true".to_owned()],
            env: BTreeMap::new(),
            cwd: cwd.to_path_buf(),
            stdin: None,
            timeout: None,
        }
    }

    #[test]
    fn a_host_that_cannot_contain_refuses_with_the_reason_and_the_fix() {
        let temp = tempfile::tempdir().unwrap();
        for host in [
            support(
                Err("bubblewrap (bwrap) is not installed".to_owned()),
                Privilege::Root,
                false,
            ),
            support(
                Ok(PathBuf::from("/usr/bin/bwrap")),
                Privilege::UserNamespace,
                true,
            ),
        ] {
            let containment = Containment::new(&host, Hidden::default(), false);
            let err = containment
                .confine(spec(temp.path()), temp.path())
                .unwrap_err();
            assert_eq!(err.code(), "isolation_unavailable");
            let message = err.to_string();
            assert!(message.contains("--allow-uncontained-local"), "{message}");
            assert!(
                message.contains("not installed") || message.contains("sysctl -w"),
                "{message}"
            );
            assert!(containment.refusal().is_some());
            assert_eq!(containment.describe()["status"], "refused");
        }
    }

    #[test]
    fn the_operator_may_opt_in_to_uncontained_runs() {
        let temp = tempfile::tempdir().unwrap();
        let host = support(
            Err("bubblewrap (bwrap) is not installed".to_owned()),
            Privilege::Root,
            false,
        );
        let containment = Containment::new(&host, Hidden::default(), true);
        let confined = containment.confine(spec(temp.path()), temp.path()).unwrap();
        assert_eq!(confined.argv, spec(temp.path()).argv);
        assert_eq!(containment.describe()["status"], "uncontained");
    }

    #[test]
    fn contained_commands_run_under_bwrap_with_the_data_dir_hidden() {
        let data = tempfile::tempdir_in("/var/tmp").unwrap();
        let workspace = data.path().join("workspaces").join("run");
        std::fs::create_dir_all(&workspace).unwrap();
        let host = support(Ok(PathBuf::from("/usr/bin/bwrap")), Privilege::Root, false);
        let hidden = Hidden {
            dirs: vec![data.path().to_path_buf()],
            files: Vec::new(),
        };
        let containment = Containment::new(&host, hidden, false);
        assert!(containment.is_contained());
        let confined = containment.confine(spec(&workspace), &workspace).unwrap();
        assert_eq!(confined.argv[0], "/usr/bin/bwrap");
        let text = confined.argv.join(" ");
        let data = std::fs::canonicalize(data.path()).unwrap();
        assert!(
            text.contains(&format!("--tmpfs {}", data.display())),
            "{text}"
        );
        assert!(text.contains("--cap-drop ALL"), "{text}");
        assert!(
            text.ends_with("-- /usr/bin/env -u PWD -- sh -c true"),
            "{text}"
        );

        let missing = ProcessSpec {
            argv: vec!["no-such-program-berth".to_owned()],
            ..spec(&workspace)
        };
        let err = containment.confine(missing, &workspace).unwrap_err();
        assert_eq!(err.code(), "spawn_failed");
    }
}
