//! The fault knobs ([`FakeFaults`]); the [`FakeProviderBuilder`](crate::FakeProviderBuilder) sets them.

use std::time::Duration;

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
