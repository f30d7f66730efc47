//! berth-plugins: sandbox providers and environment drivers that live in other processes (PLUGINS.md).
//!
//! - [`manifest`]: `berth-plugin.json`, checked, and where plugins are found.
//! - [`wire`]: protocol v1's messages, shared by both ends.
//! - `connection`: the host's JSON-RPC client over a plugin's stdio.
//! - [`supervisor`]: one plugin process kept alive — minimal environment, `initialize`, `health`, restart with
//!   backoff and jitter, and the circuit that opens after a crash loop.
//! - [`host`]: every installed plugin, loaded once at start-up, and what each offers.
//! - [`provider`]: a plugin's `sandbox_provider` as a [`berth_core::provider::SandboxProvider`].
//! - [`serve`]: the plugin side, for plugins written in Rust (the fake provider's plugin binary uses it).

mod connection;
pub mod error;
pub mod host;
pub mod manifest;
pub mod provider;
pub mod serve;
pub mod supervisor;
pub mod wire;

pub use connection::{Connection, OutputChunk, OutputSubscription};
pub use error::PluginError;
pub use host::PluginHost;
