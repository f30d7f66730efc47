//! Everything a request handler may need, shared by all of them.

use std::fmt;
use std::sync::Arc;

use berth_drivers::registry::DriverRegistry;
use berth_plugins::PluginHost;

use crate::host_policy::HostPolicy;
use crate::metrics::Metrics;
use crate::runs::RunManager;
use crate::secrets::SecretCipher;
use crate::tokens::token_digest;
use berth_store::Store;

/// Cheap to clone: one `Arc` around the shared parts.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    cipher: Arc<SecretCipher>,
    admin_token_digest: [u8; 32],
    drivers: Arc<DriverRegistry>,
    plugins: Arc<PluginHost>,
    runs: RunManager,
    metrics: Metrics,
}

impl AppState {
    pub fn new(
        store: Store,
        cipher: Arc<SecretCipher>,
        admin_token: &str,
        drivers: Arc<DriverRegistry>,
        plugins: Arc<PluginHost>,
        runs: RunManager,
        metrics: Metrics,
    ) -> Self {
        let admin_token_digest = token_digest(admin_token);
        Self {
            inner: Arc::new(Inner {
                store,
                cipher,
                admin_token_digest,
                drivers,
                plugins,
                runs,
                metrics,
            }),
        }
    }

    /// The installed provider plugins.
    pub fn plugins(&self) -> &Arc<PluginHost> {
        &self.inner.plugins
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn cipher(&self) -> &SecretCipher {
        &self.inner.cipher
    }

    /// Every driver, and through it the installed sandbox providers.
    pub fn drivers(&self) -> &DriverRegistry {
        &self.inner.drivers
    }

    /// The callback bridge's settings, when it is enabled.
    pub fn bridge(&self) -> Option<&crate::bridge::BridgeSettings> {
        self.inner.runs.bridge()
    }

    /// This node's runs.
    pub fn runs(&self) -> &RunManager {
        &self.inner.runs
    }

    /// What of this host the companies may use: workspace roots and Local environments.
    pub fn host(&self) -> &HostPolicy {
        // Held by the runs, which check it when they accept one.
        self.inner.runs.host()
    }

    /// The metrics recorder, and whether `/metrics` needs the admin token.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The SHA-256 of the admin token; the token itself is not kept in memory.
    pub fn admin_token_digest(&self) -> &[u8; 32] {
        &self.inner.admin_token_digest
    }
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("backend", &self.inner.store.backend())
            .finish_non_exhaustive()
    }
}
