//! Runs: accepting a command, executing it on this node, and everything around it (API.md §5, §7).
//!
//! - [`manager`]: this node's live runs, cancellation, heartbeats and the orphan/expiry sweep.
//! - [`executor`]: one run from lease to final status.
//! - [`leases`]: acquiring, resuming, releasing and cleaning up leases through compare-and-set transitions.
//! - [`events`]: appending events and streaming output into them.
//! - [`event_data`]: every event's payload, typed; the one place their JSON shape is written.

pub mod event_data;
pub mod events;
pub mod executor;
pub mod leases;
pub mod manager;

pub use executor::RunPlan;
pub use manager::RunManager;
