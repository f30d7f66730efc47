//! Runs: accepting a command, executing it on this node, following its events, and everything around it (API.md §5,
//! §7).
//!
//! - [`accept`]: [`RunManager::accept`] — a run request checked, its environment chosen and its config opened, the
//!   run stored and started; refusals are [`AcceptError`]s.
//! - [`follow`]: [`RunManager::follow`] — a run's events replayed, then followed live, in seq order, to the final one.
//! - [`manager`]: this node's live runs, cancellation, heartbeats, retiring an environment and the orphan/expiry sweep.
//! - [`executor`]: one run from lease to final status.
//! - [`leases`]: acquiring, resuming, releasing and cleaning up leases through compare-and-set transitions.
//! - [`events`]: appending events and streaming output into them.
//! - [`event_data`]: every event's payload, typed; the one place their JSON shape is written.
//! - [`context`]: what every run task and lease cleanup shares.
//!
//! The modules import each other in one direction only: `context` and `event_data` import no sibling; `events` uses
//! `event_data`; `leases` uses `context`; `executor` uses those; `manager` uses all of them; `accept` and `follow`
//! add methods to the manager and nothing imports them. Below `runs` are `vault`, `secrets` and the store; `runs`
//! never names `api` or the api's state: what it needs it holds (in [`RunContext`] and the manager) or is given.

pub mod accept;
pub mod context;
pub mod event_data;
pub mod events;
pub mod executor;
pub mod follow;
pub mod leases;
pub mod manager;

pub use accept::{AcceptError, AcceptRun};
pub use context::RunContext;
pub use executor::RunPlan;
pub use follow::{Followed, RunFollower};
pub use manager::RunManager;
