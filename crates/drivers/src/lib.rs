//! berth-drivers: the places runs execute, behind one interface per concern.
//!
//! - [`local`]: this machine, under a workspace root.
//! - [`registry`]: the installed sandbox providers (the fake is built in), which also serves as the provider
//!   catalog for config validation and answers "what can this build do?".
//! - [`probe`]: one entry point that probes any validated config with the right driver.
//!
//! The SSH driver and the plugin host come later; until then their configs validate but probe as unavailable.

pub mod error;
pub mod local;
pub mod probe;
pub mod registry;

pub use error::DriverError;
