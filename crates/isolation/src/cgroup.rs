//! Resource limits and whole-tree kills through cgroups.
//!
//! Each controller is taken from where the host has it: cgroup v2 when the unified hierarchy holds the controller
//! and berth can delegate a subtree below its own cgroup, cgroup v1 when the controller is mounted on its own (hybrid
//! hosts, this project's CI). Run cgroups nest below berth's own cgroup (`<own>/berth/<name>`), so whatever limits
//! the operator put on berth still cover its runs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::Error;

/// The controllers berth uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Pids => "pids",
            Self::Cpu => "cpu",
        }
    }
}

/// Which cgroup version serves a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Where one controller lives: the directory run cgroups are created under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub version: Version,
    /// `<mount>/<berth's own cgroup>/berth`.
    pub base: PathBuf,
}

/// The host's cgroup layout as berth sees it: for each controller, where it is served, or why it is not.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub memory: Option<Hierarchy>,
    pub pids: Option<Hierarchy>,
    pub cpu: Option<Hierarchy>,
    /// A v2 hierarchy without the controllers, still good for `cgroup.kill` and membership.
    pub unified: Option<PathBuf>,
    /// Why a controller is missing, with the fix, for the probe.
    pub problems: Vec<String>,
}

/// Limits for one run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    pub cpus: Option<f64>,
}

impl Limits {
    /// The controllers these limits need.
    pub fn controllers(&self) -> Vec<Controller> {
        let mut wanted = Vec::new();
        if self.memory_bytes.is_some() {
            wanted.push(Controller::Memory);
        }
        if self.pids.is_some() {
            wanted.push(Controller::Pids);
        }
        if self.cpus.is_some() {
            wanted.push(Controller::Cpu);
        }
        wanted
    }
}

/// What the kernel counted for a run cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Processes the OOM killer ended inside the cgroup.
    pub oom_kills: u64,
    /// Forks refused because the pids limit was reached.
    pub pids_refused: u64,
}

struct Mount {
    fs_type: String,
    point: PathBuf,
    options: Vec<String>,
}

fn mounts() -> Vec<Mount> {
    let Ok(text) = fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let point = fields.next()?.replace("\\040", " ");
            let fs_type = fields.next()?.to_owned();
            let options = fields.next()?.split(',').map(str::to_owned).collect();
            Some(Mount {
                fs_type,
                point: PathBuf::from(point),
                options,
            })
        })
        .collect()
}

/// berth's own cgroup path per hierarchy, from `/proc/self/cgroup`: (`controllers`, path); v2 is the `0::` line.
fn own_cgroups() -> Vec<(String, String)> {
    let Ok(text) = fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            Some((controllers, path))
        })
        .collect()
}

fn join_cgroup(mount: &Path, own: &str) -> PathBuf {
    let relative = own.trim_start_matches('/');
    if relative.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(relative)
    }
}

impl Layout {
    /// Reads the host's layout. Creates nothing except, on v2, berth's delegated `berth` subtree (which needs
    /// writing `cgroup.subtree_control`): a layout is only worth detecting when it will be used.
    pub fn detect() -> Self {
        let mounts = mounts();
        let own = own_cgroups();
        let mut layout = Layout::default();

        if let Some(unified) = mounts.iter().find(|mount| mount.fs_type == "cgroup2") {
            let own_path = own
                .iter()
                .find(|(controllers, _)| controllers.is_empty())
                .map(|(_, path)| path.as_str())
                .unwrap_or("/");
            let own_dir = join_cgroup(&unified.point, own_path);
            layout.unified = Some(own_dir.join("berth"));
            let available =
                fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
            let wanted: Vec<Controller> = Controller::ALL
                .into_iter()
                .filter(|controller| {
                    available
                        .split_whitespace()
                        .any(|name| name == controller.name())
                })
                .collect();
            if !wanted.is_empty() {
                match delegate_v2(&own_dir, &wanted) {
                    Ok(base) => {
                        for controller in wanted {
                            layout.set(
                                controller,
                                Hierarchy {
                                    version: Version::V2,
                                    base: base.clone(),
                                },
                            );
                        }
                    }
                    Err(reason) => layout.problems.push(format!(
                        "cgroup v2 at {} offers {} but berth cannot delegate a subtree there ({reason}); run berth \
                         in a cgroup it may manage (systemd: `Delegate=yes` on its unit)",
                        own_dir.display(),
                        wanted.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "),
                    )),
                }
            }
        }

        for controller in Controller::ALL {
            if layout.get(controller).is_some() {
                continue;
            }
            let v1 = mounts.iter().find(|mount| {
                mount.fs_type == "cgroup"
                    && mount
                        .options
                        .iter()
                        .any(|option| option == controller.name())
            });
            let Some(mount) = v1 else {
                layout.problems.push(format!(
                    "the {} controller is in neither a cgroup v2 subtree berth may use nor a cgroup v1 mount",
                    controller.name()
                ));
                continue;
            };
            let own_path = own
                .iter()
                .find(|(controllers, _)| {
                    controllers.split(',').any(|name| name == controller.name())
                })
                .map(|(_, path)| path.as_str())
                .unwrap_or("/");
            let base = join_cgroup(&mount.point, own_path).join("berth");
            let writable = fs::create_dir_all(&base).and_then(|()| {
                rustix::fs::access(&base, rustix::fs::Access::WRITE_OK).map_err(io::Error::from)
            });
            match writable {
                Ok(()) => layout.set(
                    controller,
                    Hierarchy {
                        version: Version::V1,
                        base,
                    },
                ),
                Err(err) => layout.problems.push(format!(
                    "cannot create {} ({err}); berth needs write access to the {} cgroup (run as root, or \
                     delegate the hierarchy to berth's user)",
                    base.display(),
                    controller.name()
                )),
            }
        }
        layout
    }

    pub fn get(&self, controller: Controller) -> Option<&Hierarchy> {
        match controller {
            Controller::Memory => self.memory.as_ref(),
            Controller::Pids => self.pids.as_ref(),
            Controller::Cpu => self.cpu.as_ref(),
        }
    }

    fn set(&mut self, controller: Controller, hierarchy: Hierarchy) {
        let slot = match controller {
            Controller::Memory => &mut self.memory,
            Controller::Pids => &mut self.pids,
            Controller::Cpu => &mut self.cpu,
        };
        *slot = Some(hierarchy);
    }

    /// The distinct directories a run cgroup named `name` occupies, one per hierarchy of `controllers`; with
    /// `track`, also one that tracks membership even when no controller is wanted (the unified v2 hierarchy where
    /// berth may write it, else any of the others).
    fn dirs_for(
        &self,
        name: &str,
        controllers: &[Controller],
        track: bool,
    ) -> Vec<(Version, PathBuf)> {
        let mut dirs: Vec<(Version, PathBuf)> = Vec::new();
        let hierarchies = controllers
            .iter()
            .filter_map(|controller| self.get(*controller))
            .map(|hierarchy| (hierarchy.version, hierarchy.base.clone()));
        for (version, base) in hierarchies {
            let dir = base.join(name);
            if !dirs.iter().any(|(_, known)| known == &dir) {
                dirs.push((version, dir));
            }
        }
        if track && dirs.is_empty() {
            let unified = self.unified.as_ref().filter(|unified| {
                fs::create_dir_all(unified).is_ok()
                    && rustix::fs::access(*unified, rustix::fs::Access::WRITE_OK).is_ok()
            });
            match unified {
                Some(unified) => dirs.push((Version::V2, unified.join(name))),
                None => {
                    if let Some(hierarchy) = Controller::ALL.into_iter().find_map(|c| self.get(c)) {
                        dirs.push((hierarchy.version, hierarchy.base.join(name)));
                    }
                }
            }
        }
        dirs
    }

    /// Where a command that needs no limits can still get a cgroup of its own, only so that every process it
    /// starts is found and killed whole (one that calls `setsid` leaves its process group, never its cgroup): the
    /// unified v2 hierarchy where berth may write it (membership and `cgroup.kill` need no controller), else the
    /// first v1 hierarchy berth may write. `None`: berth cannot make cgroups here (not root, nothing delegated).
    pub fn tracking(&self) -> Option<Hierarchy> {
        let unified = self.unified.as_ref().filter(|unified| {
            fs::create_dir_all(unified).is_ok()
                && rustix::fs::access(*unified, rustix::fs::Access::WRITE_OK).is_ok()
        });
        match unified {
            Some(unified) => Some(Hierarchy {
                version: Version::V2,
                base: unified.clone(),
            }),
            None => Controller::ALL
                .into_iter()
                .find_map(|controller| self.get(controller))
                .cloned(),
        }
    }

    /// Every directory a run cgroup named `name` could occupy, for cleanup.
    fn all_dirs_for(&self, name: &str) -> Vec<(Version, PathBuf)> {
        let mut dirs = self.dirs_for(name, &Controller::ALL, false);
        if let Some(unified) = &self.unified
            && !dirs.iter().any(|(version, _)| *version == Version::V2)
        {
            dirs.push((Version::V2, unified.join(name)));
        }
        dirs
    }

    /// Creates the run cgroup `name` in the hierarchies `limits` needs (and, with `track`, one that tracks the run's
    /// processes even without limits), with the limits applied. A leftover of the same name (a crashed run) is
    /// killed and replaced. Joining a cgroup costs the kernel an RCU grace period per hierarchy, so a run joins only
    /// those it needs.
    pub fn create(&self, name: &str, limits: Limits, track: bool) -> Result<RunCgroup, Error> {
        let stale = RunCgroup {
            dirs: self.all_dirs_for(name),
        };
        stale.kill_and_remove();
        let cgroup = RunCgroup {
            dirs: self.dirs_for(name, &limits.controllers(), track),
        };
        for (_, dir) in &cgroup.dirs {
            fs::create_dir(dir).map_err(|source| Error::Cgroup {
                path: dir.clone(),
                source,
            })?;
        }
        let result = cgroup.apply(self, limits);
        if result.is_err() {
            cgroup.kill_and_remove();
        }
        result.map(|()| cgroup)
    }

    /// The run cgroup `name`, whether or not it exists: for cleanup after a restart.
    pub fn existing(&self, name: &str) -> RunCgroup {
        RunCgroup {
            dirs: self.all_dirs_for(name),
        }
    }

    /// Every run cgroup whose name starts with `prefix`: a lease's, whatever its commands were called.
    pub fn existing_with_prefix(&self, prefix: &str) -> RunCgroup {
        let mut dirs: Vec<(Version, PathBuf)> = Vec::new();
        for (version, probe) in self.all_dirs_for(prefix) {
            let Some(base) = probe.parent() else { continue };
            let Ok(entries) = fs::read_dir(base) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(prefix)
                    && entry.file_type().is_ok_and(|kind| kind.is_dir())
                {
                    dirs.push((version, entry.path()));
                }
            }
        }
        RunCgroup { dirs }
    }
}

/// Makes `<own>/berth` a v2 subtree with `controllers` enabled for its children. When berth's own cgroup holds
/// processes (v2's no-internal-processes rule), berth first moves itself into the leaf `<own>/berth-server`.
fn delegate_v2(own: &Path, controllers: &[Controller]) -> Result<PathBuf, String> {
    let enable = controllers
        .iter()
        .map(|controller| format!("+{}", controller.name()))
        .collect::<Vec<_>>()
        .join(" ");
    let write_control = |dir: &Path| fs::write(dir.join("cgroup.subtree_control"), &enable);
    if let Err(err) = write_control(own) {
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err.to_string());
        }
        let leaf = own.join("berth-server");
        fs::create_dir_all(&leaf).map_err(|err| err.to_string())?;
        fs::write(leaf.join("cgroup.procs"), "0").map_err(|err| err.to_string())?;
        write_control(own).map_err(|err| err.to_string())?;
    }
    let base = own.join("berth");
    fs::create_dir_all(&base).map_err(|err| err.to_string())?;
    write_control(&base).map_err(|err| err.to_string())?;
    Ok(base)
}

impl Hierarchy {
    /// Creates the cgroup `name` directly below [`Hierarchy::base`], with no limits: a tracking cgroup (see
    /// [`Layout::tracking`]). Fails when it exists already: names are the caller's to keep unique.
    pub fn create_child(&self, name: &str) -> Result<RunCgroup, Error> {
        let dir = self.base.join(name);
        fs::create_dir(&dir).map_err(|source| Error::Cgroup {
            path: dir.clone(),
            source,
        })?;
        Ok(RunCgroup {
            dirs: vec![(self.version, dir)],
        })
    }
}

/// One run's cgroup, present in each hierarchy the layout uses.
#[derive(Debug)]
pub struct RunCgroup {
    dirs: Vec<(Version, PathBuf)>,
}

impl RunCgroup {
    fn apply(&self, layout: &Layout, limits: Limits) -> Result<(), Error> {
        let dir_of = |controller: Controller| {
            layout
                .get(controller)
                .map(|hierarchy| (hierarchy.version, self.dir_in(&hierarchy.base)))
        };
        let write = |dir: &Path, file: &str, value: String| {
            let path = dir.join(file);
            fs::write(&path, value).map_err(|source| Error::Cgroup { path, source })
        };
        if let Some(bytes) = limits.memory_bytes {
            let Some((version, dir)) = dir_of(Controller::Memory) else {
                return Err(unavailable(layout, Controller::Memory));
            };
            match version {
                Version::V2 => {
                    write(&dir, "memory.max", bytes.to_string())?;
                    // No swap: past the limit a run is killed, not slowed to a crawl.
                    let _ = write(&dir, "memory.swap.max", "0".to_owned());
                }
                Version::V1 => {
                    write(&dir, "memory.limit_in_bytes", bytes.to_string())?;
                    let _ = write(&dir, "memory.memsw.limit_in_bytes", bytes.to_string());
                }
            }
        }
        if let Some(pids) = limits.pids {
            let Some((_, dir)) = dir_of(Controller::Pids) else {
                return Err(unavailable(layout, Controller::Pids));
            };
            write(&dir, "pids.max", pids.to_string())?;
        }
        if let Some(cpus) = limits.cpus {
            let Some((version, dir)) = dir_of(Controller::Cpu) else {
                return Err(unavailable(layout, Controller::Cpu));
            };
            let period: u64 = 100_000;
            let quota = ((cpus * period as f64).round() as u64).max(1_000);
            match version {
                Version::V2 => write(&dir, "cpu.max", format!("{quota} {period}"))?,
                Version::V1 => {
                    write(&dir, "cpu.cfs_period_us", period.to_string())?;
                    write(&dir, "cpu.cfs_quota_us", quota.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn dir_in(&self, base: &Path) -> PathBuf {
        self.dirs
            .iter()
            .find(|(_, dir)| dir.parent() == Some(base))
            .map(|(_, dir)| dir.clone())
            .unwrap_or_else(|| base.to_path_buf())
    }

    /// The `cgroup.procs` files a process writes `0` into to join this cgroup everywhere.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, dir)| dir.join("cgroup.procs"))
            .collect()
    }

    /// Its directories, one per hierarchy.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, dir)| dir.as_path())
    }

    /// Whether any of its directories exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|(_, dir)| dir.is_dir())
    }

    /// What the kernel counted: OOM kills and refused forks.
    pub fn events(&self) -> Events {
        let mut events = Events::default();
        for (version, dir) in &self.dirs {
            let counter = |file: &str, key: &str| -> u64 {
                fs::read_to_string(dir.join(file))
                    .ok()
                    .and_then(|text| {
                        text.lines().find_map(|line| {
                            let mut fields = line.split_whitespace();
                            (fields.next() == Some(key))
                                .then(|| fields.next().and_then(|value| value.parse().ok()))
                                .flatten()
                        })
                    })
                    .unwrap_or(0)
            };
            match version {
                Version::V2 => {
                    events.oom_kills += counter("memory.events", "oom_kill");
                    events.pids_refused += counter("pids.events", "max");
                }
                Version::V1 => {
                    events.oom_kills += counter("memory.oom_control", "oom_kill");
                    events.pids_refused += counter("pids.events", "max");
                }
            }
        }
        events
    }

    /// Kills every process in the cgroup and removes it, waiting (at most a few seconds) for killed processes to
    /// leave. Best effort: what cannot be removed is logged and left for the next attempt.
    pub fn kill_and_remove(&self) {
        for (version, dir) in &self.dirs {
            if let Err(err) = kill_and_remove_dir(*version, dir) {
                tracing::warn!(cgroup = %dir.display(), error = %err, "could not remove a run cgroup");
            }
        }
    }
}

fn unavailable(layout: &Layout, controller: Controller) -> Error {
    let reason = layout
        .problems
        .iter()
        .find(|problem| problem.contains(controller.name()))
        .cloned()
        .unwrap_or_else(|| format!("no {} controller is available", controller.name()));
    Error::Unavailable {
        mechanism: match controller {
            Controller::Memory => "the memory cgroup controller (memoryMb)",
            Controller::Pids => "the pids cgroup controller (pids)",
            Controller::Cpu => "the cpu cgroup controller (cpus)",
        },
        reason,
    }
}

fn members(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// Removes one cgroup directory. The common case — the run's processes are gone — is one `rmdir`; otherwise its
/// members are killed (v2: `cgroup.kill`; v1 has none, so each member is signalled, round after round, which the pids
/// limit keeps finite for a fork bomb) and the `rmdir` retried with a short backoff until they have left.
fn kill_and_remove_dir(version: Version, dir: &Path) -> io::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                kill_and_remove_dir(version, &entry.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pause = Duration::from_micros(200);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                let killed_at_once =
                    version == Version::V2 && fs::write(dir.join("cgroup.kill"), "1").is_ok();
                if !killed_at_once {
                    for pid in members(dir) {
                        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                            let _ =
                                rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        }
                    }
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            Err(err) => return Err(err),
        }
    }
}
