//! berth-drivers: the places runs execute, behind one interface ([`EnvironmentDriver`](berth_core::driver)).
//!
//! - [`local`]: this machine, in run-private directories under a workspace root, or in place.
//! - [`sandbox`]: hosts the sandbox providers and plugins' environment drivers, and delegates to them.
//! - [`ssh`]: hosts reached over SSH (russh).
//! - [`remote_shell`], [`remote_workspace`]: workspace sync through a shell on a remote (an SSH host, or a sandbox
//!   through its provider's execute).
//! - [`fs`]: filesystem helpers shared by the drivers that keep workspaces on this host.
//! - [`provider_registry`]: the installed sandbox providers (also the provider catalog for config validation) and
//!   "what can this build do?".
//! - [`registry`]: one driver per driver kind, and probing.
//! - [`process`]: the one way berth spawns a command on this host.
//! - [`sync`]: copying workspaces into sandboxes and their changes back.
//!
//! This crate depends on no provider: the built-in fake (`berth-fake-provider`) depends on it and registers itself.

pub mod contain;
pub mod fs;
pub mod isolated;
pub mod local;
pub mod process;
pub mod provider_registry;
pub mod registry;
pub mod remote_shell;
pub mod remote_workspace;
pub mod sandbox;
pub mod ssh;
pub mod sync;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

pub use berth_core::driver::DriverError;
