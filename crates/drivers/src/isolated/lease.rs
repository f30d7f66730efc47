//! Which sandbox a lease names, and the limits its config asks for (kept in the lease's metadata, which is all
//! `execute` gets).

use std::path::PathBuf;

use berth_core::driver::LeaseHandle;
use berth_core::ids::{EnvironmentId, RunId};
use berth_isolation::cgroup::{Controller, Limits};
use serde_json::{Map, Value, json};

/// Lease ids: `sandbox://isolated/<key>`.
pub const LEASE_ID_PREFIX: &str = "sandbox://isolated/";
/// `diskMb` when the config names none: the private `/tmp` is always bounded.
pub const DEFAULT_DISK_MB: u64 = 512;

/// Which sandbox a lease names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LeaseKey {
    /// Kept between runs of one environment (`reuseLease`).
    Environment(EnvironmentId),
    /// One run's, removed at release.
    Run(RunId, u64),
}

impl LeaseKey {
    pub(super) fn parse(id: &str) -> Option<Self> {
        let name = id.strip_prefix(LEASE_ID_PREFIX)?;
        if let Some(env) = name.strip_prefix("env-") {
            return env.parse().ok().map(Self::Environment);
        }
        let rest = name.strip_prefix("run-")?;
        let (run, counter) = rest.rsplit_once('-')?;
        Some(Self::Run(run.parse().ok()?, counter.parse().ok()?))
    }

    pub(super) fn dir_name(self) -> String {
        match self {
            Self::Environment(env) => format!("env-{env}"),
            Self::Run(run, counter) => format!("run-{run}-{counter}"),
        }
    }

    pub(super) fn id(self) -> String {
        format!("{LEASE_ID_PREFIX}{}", self.dir_name())
    }
}

/// The limits a config asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct SandboxLimits {
    pub(super) memory_mb: Option<u64>,
    pub(super) pids: Option<u64>,
    pub(super) cpus: Option<f64>,
    pub(super) disk_mb: u64,
    pub(super) read_only_paths: Vec<PathBuf>,
}

impl SandboxLimits {
    pub(super) fn from_fields(fields: &Map<String, Value>) -> Self {
        Self {
            memory_mb: fields.get("memoryMb").and_then(Value::as_u64),
            pids: fields.get("pids").and_then(Value::as_u64),
            cpus: fields.get("cpus").and_then(Value::as_f64),
            disk_mb: fields
                .get("diskMb")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_DISK_MB),
            read_only_paths: fields
                .get("readOnlyPaths")
                .and_then(Value::as_array)
                .map(|paths| {
                    paths
                        .iter()
                        .filter_map(Value::as_str)
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub(super) fn to_value(&self) -> Value {
        json!({
            "memoryMb": self.memory_mb,
            "pids": self.pids,
            "cpus": self.cpus,
            "diskMb": self.disk_mb,
            "readOnlyPaths": self.read_only_paths.iter().map(|path| path.display().to_string()).collect::<Vec<_>>(),
        })
    }

    pub(super) fn from_lease(lease: &LeaseHandle) -> Self {
        match lease.metadata.get("limits") {
            Some(Value::Object(fields)) => Self::from_fields(fields),
            _ => Self {
                disk_mb: DEFAULT_DISK_MB,
                ..Self::default()
            },
        }
    }

    pub(super) fn controllers(&self) -> Vec<Controller> {
        self.cgroup_limits().controllers()
    }

    pub(super) fn cgroup_limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory_mb.map(|mb| mb << 20),
            pids: self.pids,
            cpus: self.cpus,
        }
    }
}
