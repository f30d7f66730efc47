//! What every run task and lease cleanup shares. Its own module, so the modules that use it (executor, leases,
//! manager) need not import each other for it.

use std::sync::Arc;

use berth_drivers::registry::DriverRegistry;
use berth_store::Store;

use crate::bridge::BridgeSettings;
use crate::secrets::SecretCipher;

/// What every run task shares.
#[derive(Debug)]
pub struct RunContext {
    pub store: Store,
    pub drivers: Arc<DriverRegistry>,
    /// Opens the secrets of an environment's config when a lease is cleaned up outside its run (sweeps).
    pub cipher: Arc<SecretCipher>,
    /// `None` only when the bridge is switched off for this server.
    pub bridge: Option<Arc<BridgeSettings>>,
}
