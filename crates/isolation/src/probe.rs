//! What the host offers for isolation, each mechanism with why it is missing and how to fix that.

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::bwrap::{self, Privilege};
use crate::cgroup::{Controller, Layout};

/// One mechanism's standing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Present and used.
    Used,
    /// Present, not needed by this configuration.
    Available,
    /// Absent: why, and the fix.
    Missing { reason: String, fix: String },
}

impl Standing {
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Missing { .. })
    }

    pub fn to_value(&self, detail: &str) -> Value {
        match self {
            Self::Used => json!({"status": "used", "detail": detail}),
            Self::Available => json!({"status": "available", "detail": detail}),
            Self::Missing { reason, fix } => {
                json!({"status": "missing", "reason": reason, "fix": fix})
            }
        }
    }
}

/// The host's isolation support, read once at start-up (and again by each probe).
#[derive(Clone, Debug)]
pub struct HostSupport {
    pub bwrap: Result<PathBuf, String>,
    pub privilege: Privilege,
    /// For a non-root berth: whether unprivileged user namespaces are allowed, with the fix when not.
    pub user_namespaces: Result<(), (String, String)>,
    pub cgroups: Layout,
    /// The kernel's Landlock ABI (0: none).
    pub landlock_abi: i32,
}

fn read_sysctl(path: &str) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Why unprivileged user namespaces are off, with the fix; `Ok` when nothing says they are.
fn user_namespaces() -> Result<(), (String, String)> {
    if read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Err((
            "kernel.unprivileged_userns_clone=0: the kernel refuses user namespaces to unprivileged users".to_owned(),
            "sysctl -w kernel.unprivileged_userns_clone=1 (persist it in /etc/sysctl.d), or run berth as root".to_owned(),
        ));
    }
    if read_sysctl("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Err((
            "user.max_user_namespaces=0: user namespaces are disabled".to_owned(),
            "sysctl -w user.max_user_namespaces=15000, or run berth as root".to_owned(),
        ));
    }
    if read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return Err((
            "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10 and later)".to_owned(),
            "install an AppArmor profile that allows `userns` for /usr/bin/bwrap (Ubuntu ships \
             bwrap-userns-restrict), or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or run berth as root"
                .to_owned(),
        ));
    }
    Ok(())
}

impl HostSupport {
    pub fn detect() -> Self {
        Self {
            bwrap: bwrap::find(),
            privilege: Privilege::of_this_process(),
            user_namespaces: user_namespaces(),
            cgroups: Layout::detect(),
            landlock_abi: crate::init::landlock_abi(),
        }
    }

    /// Whether bubblewrap can build namespaces here; `Err` says why not and how to fix it.
    pub fn namespaces(&self) -> Result<&PathBuf, String> {
        let bwrap = self.bwrap.as_ref().map_err(Clone::clone)?;
        if self.privilege == Privilege::UserNamespace
            && let Err((reason, fix)) = &self.user_namespaces
        {
            return Err(format!("{reason}; fix: {fix}"));
        }
        Ok(bwrap)
    }

    /// Each mechanism's standing for the `isolated` provider, as probe details.
    pub fn details(&self, wanted: &[Controller]) -> Map<String, Value> {
        let mut details = Map::new();
        let namespaces = match self.namespaces() {
            Ok(path) => Standing::Used.to_value(&format!(
                "bubblewrap at {}; {}",
                path.display(),
                match self.privilege {
                    Privilege::Root => "berth is root: no user namespace needed, commands run as an unprivileged uid",
                    Privilege::UserNamespace => "unprivileged user namespace, commands run as berth's own user",
                }
            )),
            Err(reason) => Standing::Missing {
                fix: if self.bwrap.is_err() {
                    "apt-get install bubblewrap".to_owned()
                } else {
                    "see the reason".to_owned()
                },
                reason,
            }
            .to_value(""),
        };
        details.insert("namespaces".to_owned(), namespaces);
        details.insert(
            "seccomp".to_owned(),
            Standing::Used.to_value(
                "a deny-list filter (docs/isolation.md), installed by the sandbox's init",
            ),
        );
        let landlock = if self.landlock_abi > 0 {
            Standing::Used.to_value(&format!(
                "Landlock ABI {}: writes only beneath the workspace and /tmp, no signals out of the sandbox",
                self.landlock_abi
            ))
        } else {
            Standing::Missing {
                reason: "this kernel has no Landlock (it needs Linux 5.13+ with landlock in the `lsm=` boot list)"
                    .to_owned(),
                fix: "boot with lsm=landlock,... ; the namespaces still contain runs without it".to_owned(),
            }
            .to_value("")
        };
        details.insert("landlock".to_owned(), landlock);
        let mut cgroups = Map::new();
        for controller in Controller::ALL {
            let standing = match self.cgroups.get(controller) {
                Some(hierarchy) => {
                    let detail = format!(
                        "cgroup {} at {}",
                        match hierarchy.version {
                            crate::cgroup::Version::V1 => "v1",
                            crate::cgroup::Version::V2 => "v2",
                        },
                        hierarchy.base.display()
                    );
                    let standing = if wanted.contains(&controller) {
                        Standing::Used
                    } else {
                        Standing::Available
                    };
                    standing.to_value(&detail)
                }
                None => Standing::Missing {
                    reason: self
                        .cgroups
                        .problems
                        .iter()
                        .find(|problem| problem.contains(controller.name()))
                        .cloned()
                        .unwrap_or_else(|| format!("no {} controller", controller.name())),
                    fix: "run berth as root on a host with the controller, or give it a delegated cgroup v2 subtree"
                        .to_owned(),
                }
                .to_value(""),
            };
            cgroups.insert(controller.name().to_owned(), standing);
        }
        details.insert("cgroups".to_owned(), Value::Object(cgroups));
        details.insert(
            "rlimits".to_owned(),
            Standing::Used.to_value("no core dumps, a bounded number of open files"),
        );
        details
    }
}
