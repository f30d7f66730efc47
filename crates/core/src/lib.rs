//! berth-core: the domain model of berth.
//!
//! Environments, leases, companies and keys; the per-driver configuration types with strict validation that reports
//! every problem with its path; probe results; capabilities; the driver and sandbox-provider contracts; and the stable
//! error kinds every other crate maps onto.
//!
//! Architecture invariant: this crate does no IO and starts no runtime. It knows nothing of HTTP, SQL or JSON wire
//! shapes (configs are JSON *values* by nature, so `serde_json::Value` appears, but no DTO lives here).

pub mod capabilities;
pub mod catalog;
pub mod company;
pub mod config;
pub mod driver;
pub mod environment;
pub mod error;
pub mod future;
pub mod ids;
pub mod lease;
pub mod probe;
pub mod provider;
pub mod run;
pub mod secret_paths;
pub mod time;
pub mod validation;

pub use error::{Error, ErrorKind};
