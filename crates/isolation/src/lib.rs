//! berth's isolation mechanisms, chosen parts rather than home-made ones:
//!
//! - [`bwrap`]: Debian's `bubblewrap` builds the namespaces and the filesystem view. Two views: [`bwrap::HostView`]
//!   (Local and fake-provider runs: the host's files minus berth's own, with the server's processes out of sight) and
//!   [`bwrap::SandboxView`] (the `isolated` provider: system directories read-only, a workspace, a private `/tmp`,
//!   loopback only).
//! - [`cgroup`]: memory, pids and cpu limits, v2 where a delegated subtree exists, v1 where that is what the host
//!   has, and the kill switch for a whole tree.
//! - [`seccomp`]: the documented syscall filter, compiled by `seccompiler` (Firecracker's).
//! - [`init`]: the sandbox's own init, which is berth's binary bind-mounted read-only: it applies Landlock, seccomp
//!   and rlimits to itself, relays the callback bridge from loopback to a Unix socket, starts the command as an
//!   unprivileged user and reports how it ended. [`init::enter_main`] is the step before bubblewrap: it joins the
//!   run's cgroups and then becomes bubblewrap, so no process of the run ever starts outside them.
//! - [`probe`]: which of these the host offers, each with the reason and the fix when it is missing.
//!
//! No `unsafe` anywhere: the crates above carry the system calls.

pub mod bwrap;
pub mod cgroup;
pub mod init;
pub mod probe;
pub mod seccomp;

use std::path::PathBuf;

/// Everything that can go wrong while building or entering an isolation layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host lacks a mechanism the caller requires.
    #[error("{mechanism} is not available: {reason}")]
    Unavailable {
        mechanism: &'static str,
        reason: String,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp filter: {0}")]
    Seccomp(String),
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed sandbox spec: {0}")]
    Spec(String),
}

impl Error {
    /// A stable snake_case code for logs and run errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "isolation_unavailable",
            Self::Cgroup { .. } => "cgroup_failed",
            Self::Seccomp(_) => "seccomp_failed",
            Self::Landlock(_) => "landlock_failed",
            Self::Io { .. } => "isolation_io",
            Self::Spec(_) => "sandbox_spec_invalid",
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}
