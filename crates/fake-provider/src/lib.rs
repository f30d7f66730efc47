//! berth-fake-provider: a deterministic sandbox provider, built in as `fake`.
//!
//! The fake exists so that every path through berth that involves a sandbox provider (config validation, probes,
//! capabilities, leases, workspace sync and runs) can be exercised in tests and demos without a cloud account.
//!
//! A fake sandbox is a private directory (mode 0700) under the provider's root; its workspace is a copy of the run's
//! host directory at `<sandbox>/workspace`, commands run there through berth's own process runner with only the
//! environment the run asked for, and changes are synced back like a remote sandbox's would be. It is *not*
//! isolation: commands run on the berth host as berth's user.
//!
//! It behaves the same way every time: lease ids come from the environment id (reusable leases) or the run id and a
//! counter that starts at the builder's seed, so a given sequence of calls always yields the same ids. Its
//! [`FakeFaults`] knobs make it fail on purpose, so tests can check how berth treats a misbehaving provider.

mod faults;
mod provider;

use std::sync::Arc;

use berth_core::driver::DriverError;
use berth_drivers::contain::Containment;
use berth_drivers::registry::ProviderRegistry;

pub use faults::FakeFaults;
pub use provider::{
    DEFAULT_IMAGE, FAKE_PROVIDER_KEY, FakeProvider, FakeProviderBuilder, LEASE_ID_PREFIX,
    MANIFEST_KEY,
};

/// Registers the built-in fake (default root, no faults) in `registry`.
/// Registers the fake, its commands run under `containment` like Local's: they run on this host too.
pub fn register_builtin(
    registry: &mut ProviderRegistry,
    containment: Containment,
) -> Result<(), DriverError> {
    registry.register(Arc::new(
        FakeProvider::builder().containment(containment).build()?,
    ))
}

#[cfg(test)]
mod tests;
