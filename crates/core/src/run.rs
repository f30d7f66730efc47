//! Runs and their events: one command executed in one environment, and everything that happened on the way.

use serde_json::Value;

use crate::company::{UnknownVariant, parse_variant};
use crate::ids::{CompanyId, EnvironmentId, LeaseId, RunId};
use crate::time::Timestamp;

/// Where a run is in its life. `queued` and `running` are live; the rest are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::TimedOut,
        RunStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Final statuses never change again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunStatus {
    type Err = UnknownVariant;

    fn from_str(value: &str) -> Result<Self, UnknownVariant> {
        parse_variant(value, &Self::ALL, RunStatus::as_str)
    }
}

/// A run as stored. The request's `env` and `stdin` are deliberately absent: they may hold secrets, so they live
/// only in the memory of the process executing the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub id: RunId,
    pub company_id: CompanyId,
    pub environment_id: EnvironmentId,
    pub lease_id: Option<LeaseId>,
    pub status: RunStatus,
    pub command: Vec<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub error: Option<String>,
    /// The berth node executing the run; with several replicas, only it writes the run's output.
    pub owner_node: String,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// Refreshed by the owner while the run is live; a stale heartbeat marks an orphan.
    pub heartbeat_at: Timestamp,
    pub cancel_requested: bool,
}

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Status,
    Lease,
    Workspace,
    Stdout,
    Stderr,
    Agent,
    Bridge,
    Error,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::Status,
        EventKind::Lease,
        EventKind::Workspace,
        EventKind::Stdout,
        EventKind::Stderr,
        EventKind::Agent,
        EventKind::Bridge,
        EventKind::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Lease => "lease",
            EventKind::Workspace => "workspace",
            EventKind::Stdout => "stdout",
            EventKind::Stderr => "stderr",
            EventKind::Agent => "agent",
            EventKind::Bridge => "bridge",
            EventKind::Error => "error",
        }
    }
}

impl std::str::FromStr for EventKind {
    type Err = UnknownVariant;

    fn from_str(value: &str) -> Result<Self, UnknownVariant> {
        parse_variant(value, &Self::ALL, EventKind::as_str)
    }
}

/// An event to append; the store assigns its `seq`.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRunEvent {
    pub at: Timestamp,
    pub kind: EventKind,
    pub data: Value,
}

/// An event as stored: `seq` is dense and increasing per run, starting at 1.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEvent {
    pub run_id: RunId,
    pub seq: i64,
    pub at: Timestamp,
    pub kind: EventKind,
    pub data: Value,
}

/// Why an environment-variable name is refused: berth passes env to processes on other hosts, so only names every
/// shell and `execve` treat the same are accepted.
pub fn check_env_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 256 {
        return Err("must be at most 256 bytes");
    }
    if name.contains('=') {
        return Err("must not contain '='");
    }
    if name.contains('\0') {
        return Err("must not contain NUL");
    }
    let mut chars = name.chars();
    let starts_well = chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_');
    if !starts_well || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("must match [A-Za-z_][A-Za-z0-9_]*");
    }
    Ok(())
}

/// Environment values and argv entries may hold anything but NUL, which no process can receive.
pub fn check_no_nul(value: &str) -> Result<(), &'static str> {
    if value.contains('\0') {
        Err("must not contain NUL")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_know_what_is_final() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>().unwrap(), status);
        }
        assert!(!RunStatus::Queued.is_terminal());
        assert!(!RunStatus::Running.is_terminal());
        assert!(RunStatus::TimedOut.is_terminal());
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), kind);
        }
    }

    #[test]
    fn hostile_env_names_are_refused() {
        for bad in ["", "A=B", "A\0B", "1ABC", "WITH SPACE", "ÄÖ", "a-b"] {
            assert!(check_env_name(bad).is_err(), "{bad:?}");
        }
        for good in ["PATH", "_x", "BERTH_API_URL", "a1"] {
            assert!(check_env_name(good).is_ok(), "{good:?}");
        }
        assert!(check_no_nul("a\0").is_err());
        assert!(check_no_nul("ünïcödé = fine").is_ok());
    }
}
