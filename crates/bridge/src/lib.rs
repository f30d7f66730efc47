//! berth-bridge: how a running agent reaches the berth API without ever holding a server credential.
//!
//! Each run gets a run-scoped credential ([`credential`]) that the callback bridge checks before forwarding the
//! agent's request upstream with the run's own server credential. The HTTP bridge itself comes later; the credential
//! format is settled here first because runs, the bridge and the server's environment setup all depend on it.

pub mod credential;
pub mod error;

pub use error::BridgeError;
