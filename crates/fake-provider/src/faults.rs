//! The fault knobs ([`FakeFaults`]) and the [`FakeProviderBuilder`] that sets them.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use berth_core::error::Error;
use berth_core::provider::ProviderDescriptor;
use berth_drivers::contain::Containment;

use crate::FakeProvider;

/// Failures the fake injects on purpose. Every knob defaults to "behave".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeFaults {
    /// Every probe fails with this summary.
    pub fail_probe: Option<String>,
    /// Every acquire fails with this message (after `acquire_delay`).
    pub fail_acquire: Option<String>,
    /// Every release and destroy fails with this message, leaving the sandbox in place.
    pub fail_release: Option<String>,
    /// Every acquire takes at least this long.
    pub acquire_delay: Option<Duration>,
    /// Commands' output is discarded instead of forwarded: a provider that loses output.
    pub drop_output: bool,
}

/// Builds a [`FakeProvider`]: `FakeProvider::builder().root(dir).seed(7).fail_probe("down").build()`.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct FakeProviderBuilder {
    faults: FakeFaults,
    root: Option<PathBuf>,
    seed: u64,
    containment: Option<Containment>,
}

// === impl FakeProviderBuilder ===

impl FakeProviderBuilder {
    /// Where sandboxes live (created with mode 0700 when first needed). Default: [`FakeProvider::default_root`].
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// The first `n` of `sandbox://fake/<runId>/<n>` lease ids. Default 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Makes every probe fail with `summary`.
    pub fn fail_probe(mut self, summary: impl Into<String>) -> Self {
        self.faults.fail_probe = Some(summary.into());
        self
    }

    /// Makes every acquire fail with `message`.
    pub fn fail_acquire(mut self, message: impl Into<String>) -> Self {
        self.faults.fail_acquire = Some(message.into());
        self
    }

    /// Makes every release and destroy fail with `message`.
    pub fn fail_release(mut self, message: impl Into<String>) -> Self {
        self.faults.fail_release = Some(message.into());
        self
    }

    /// Makes every acquire take at least `delay`.
    pub fn acquire_delay(mut self, delay: Duration) -> Self {
        self.faults.acquire_delay = Some(delay);
        self
    }

    /// Discards commands' output instead of forwarding it.
    pub fn drop_output(mut self, drop: bool) -> Self {
        self.faults.drop_output = drop;
        self
    }

    /// How commands are contained. Unset: not at all, which suits only tests of the fake itself; the server
    /// always passes its containment ([`register_builtin`](crate::register_builtin)).
    pub fn containment(mut self, containment: Containment) -> Self {
        self.containment = Some(containment);
        self
    }

    /// See [`FakeProvider::new`] for why this is fallible.
    pub fn build(self) -> Result<FakeProvider, Error> {
        Ok(FakeProvider {
            descriptor: ProviderDescriptor::new(FakeProvider::spec())?,
            faults: self.faults,
            root: self.root.unwrap_or_else(FakeProvider::default_root),
            next_lease: AtomicU64::new(self.seed),
            containment: self
                .containment
                .unwrap_or_else(Containment::disabled_for_tests),
        })
    }
}
