//! berth-server: the berth control plane.
//!
//! The REST API ([`api`]), orchestration ([`runs`]), secrets at rest ([`secrets`], [`vault`]), what of the host
//! companies may use ([`host_policy`]), start-up and shutdown ([`serve`]) and the `berth` command line ([`cli`],
//! [`client`]). Persistence is the `berth-store` crate.
//!
//! Architecture invariant: SQL lives only in `berth-store` (this crate does not depend on sqlx), and JSON wire types
//! only in [`api::dto`] (and the CLI's rendering of them).

pub mod api;
pub mod bridge;
pub mod cli;
pub mod client;
pub mod console;
pub mod data_dir;
pub mod error_chain;
pub mod host_policy;
pub mod lab;
pub mod metrics;
pub mod plugin_check;
mod private_file;
pub mod run_command;
pub mod runs;
pub mod secrets;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod tokens;
pub mod vault;
