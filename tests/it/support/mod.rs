//! Shared test infrastructure.

pub mod db;
pub mod runs;
pub mod server;
pub mod sshd;
