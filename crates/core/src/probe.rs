//! Probe results: "can berth reach and use this environment?". A probe never fails as an error: every failure is a
//! result with `ok: false` and a summary that says what failed.

use serde_json::{Map, Value};

use crate::environment::Driver;
use crate::ids::EnvironmentId;
use crate::time::Timestamp;

#[derive(Clone, Debug, PartialEq)]
pub struct ProbeResult {
    pub ok: bool,
    pub driver: Driver,
    /// One line a person can act on: what worked, or what failed and why.
    pub summary: String,
    /// Structured facts gathered by the probe (hostname, free disk, ...). Never holds a secret.
    pub details: Map<String, Value>,
}

impl ProbeResult {
    pub fn ok(driver: Driver, summary: impl Into<String>, details: Map<String, Value>) -> Self {
        Self {
            ok: true,
            driver,
            summary: summary.into(),
            details,
        }
    }

    pub fn failed(driver: Driver, summary: impl Into<String>) -> Self {
        Self {
            ok: false,
            driver,
            summary: summary.into(),
            details: Map::new(),
        }
    }
}

/// The newest probe of a stored environment, kept beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct LastProbe {
    pub environment_id: EnvironmentId,
    pub at: Timestamp,
    pub result: ProbeResult,
}
