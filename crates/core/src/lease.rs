//! Leases: a run's claim on an environment, from acquisition to release.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::company::{UnknownVariant, parse_variant};
use crate::config::DriverConfig;
use crate::environment::Driver;
use crate::ids::{CompanyId, EnvironmentId, LeaseId, RunId};
use crate::time::Timestamp;

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;

            fn from_str(value: &str) -> Result<Self, UnknownVariant> {
                parse_variant(value, Self::ALL, $name::as_str)
            }
        }
    };
}

string_enum!(
    /// Where a lease is in its life.
    LeaseStatus {
        /// Held by a live run.
        Active => "active",
        /// Given back; the provider resource was cleaned up (see `cleanup_status`).
        Released => "released",
        /// Its `expires_at` passed before it was released.
        Expired => "expired",
        /// Acquisition or the run failed and the lease could not be kept.
        Failed => "failed",
        /// Kept after the run for reuse or inspection.
        Retained => "retained",
    }
);

string_enum!(
    /// What happens to the provider resource when the run ends.
    LeasePolicy {
        /// Released and destroyed after the run.
        Ephemeral => "ephemeral",
        /// Kept and resumed by the next run of the same environment.
        ReuseByEnvironment => "reuse_by_environment",
        /// Released on success, kept for inspection on failure.
        RetainOnFailure => "retain_on_failure",
    }
);

string_enum!(
    /// Outcome of the provider cleanup that release triggers.
    CleanupStatus {
        Pending => "pending",
        Success => "success",
        Failed => "failed",
    }
);

/// Why a lease ended `failed` ([`Lease::failure_reason`]): stable codes, one per way a run (or taking its lease) can
/// fail, so a client can tell "the command failed" from "berth could not set the run up" without parsing messages.
pub mod failure {
    /// The driver could not acquire (or resume) the lease.
    pub const LEASE_ACQUIRE_FAILED: &str = "lease_acquire_failed";
    /// The workspace could not be realized in the environment.
    pub const WORKSPACE_REALIZATION_FAILED: &str = "workspace_realization_failed";
    /// The callback bridge could not be started or carried into the environment.
    pub const BRIDGE_FAILED: &str = "bridge_failed";
    /// Sync-back failed or left changes behind, and nothing failed before it.
    pub const SYNC_BACK_FAILED: &str = "sync_back_failed";
    /// The command ran and failed (a non-zero exit, a signal).
    pub const RUN_FAILED: &str = "run_failed";
    /// The command ran past its timeout.
    pub const TIMED_OUT: &str = "timed_out";
    /// The run's node died while the lease was held, and the run did not end well (or never ended): the orphan sweep
    /// failed the lease.
    pub const ORPHANED: &str = "orphaned";
    /// A kept lease outlived its `expiresAt`; the expiry sweep destroyed it.
    pub const EXPIRED: &str = "expired";
}

/// The provider a lease of `config` names: `local`, `ssh`, the sandbox provider's key (`fake`, `isolated`, a
/// plugin's provider), or a plugin driver's plugin key. Known before the driver is asked for anything, so even a lease
/// whose acquisition failed says where it was to be.
pub fn provider_of(config: &DriverConfig) -> String {
    match config {
        DriverConfig::Local(_) => Driver::Local.as_str().to_owned(),
        DriverConfig::Ssh(_) => Driver::Ssh.as_str().to_owned(),
        DriverConfig::Sandbox(sandbox) => sandbox.provider.clone(),
        DriverConfig::Plugin(plugin) => plugin.plugin_key.clone(),
    }
}

/// A lease as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    pub id: LeaseId,
    pub company_id: CompanyId,
    pub environment_id: EnvironmentId,
    pub run_id: Option<RunId>,
    pub status: LeaseStatus,
    pub lease_policy: LeasePolicy,
    /// The driver that acquired the lease. Release dispatches on this, never on the environment's current driver,
    /// which may have been changed since.
    pub driver: Driver,
    /// Where the lease lives, as [`provider_of`] names it. `None` only in rows written before berth recorded it for
    /// every driver (migration 0008 backfills what it can).
    pub provider: Option<String>,
    pub provider_lease_id: Option<String>,
    pub acquired_at: Timestamp,
    pub last_used_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub released_at: Option<Timestamp>,
    pub failure_reason: Option<String>,
    pub cleanup_status: Option<CleanupStatus>,
    /// Never holds a secret.
    pub metadata: Option<Map<String, Value>>,
    /// The environment's config (stored shape: secrets only as references) the lease was acquired with: what cleanup
    /// uses after the environment was edited. Never returned by the API.
    pub acquired_config: Option<Map<String, Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_enums_round_trip() {
        for status in LeaseStatus::ALL {
            assert_eq!(status.as_str().parse::<LeaseStatus>().unwrap(), *status);
        }
        for policy in LeasePolicy::ALL {
            assert_eq!(policy.as_str().parse::<LeasePolicy>().unwrap(), *policy);
        }
        for cleanup in CleanupStatus::ALL {
            assert_eq!(cleanup.as_str().parse::<CleanupStatus>().unwrap(), *cleanup);
        }
        assert!("pending_cleanup".parse::<LeaseStatus>().is_err());
    }
}
