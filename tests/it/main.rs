//! berth's integration tests: one binary, real processes, real databases.
//!
//! Store tests run against SQLite and PostgreSQL alike; PostgreSQL comes from `BERTH_TEST_POSTGRES_URL`, which the
//! README's test command sets after starting a throwaway cluster.

mod support;

mod api;
mod cli;
mod store;
