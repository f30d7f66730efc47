//! Shared test infrastructure.

pub mod db;
pub mod server;
pub mod sshd;
