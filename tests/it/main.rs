//! berth's integration tests: one binary, real processes, real databases.
//!
//! Store tests run against SQLite and PostgreSQL alike; PostgreSQL comes from `BERTH_TEST_POSTGRES_URL`, which the
//! README's test command sets after starting a throwaway cluster.

// A test binary has no public API: `pub` in support modules means "shared between test modules".
#![allow(unreachable_pub)]
// In tests a panic is a failed assertion: unwrap and expect say exactly what went wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod api;
mod bridge;
mod cli;
mod connections;
mod console;
mod containment;
mod data_dir;
mod defaults;
mod drivers;
mod lab;
mod layering;
mod lease_semantics;
mod metrics;
mod openapi;
mod orphans;
mod plugin_cli;
mod plugin_drivers;
mod plugin_faults;
mod plugins;
mod replicas;
mod runs;
mod ssh;
mod ssh_runs;
mod store;
mod sync_hostile;
mod sync_props;
mod workspace_roots;
