//! The server's side of the callback bridge: the settings every run's bridge is built from, the database-backed
//! nonce store, the run gate, and the audit trail that turns each bridged request into a `bridge` event.
//!
//! The bridge itself (authentication, policy, forwarding with signatures) lives in `berth-bridge`; the server only
//! decides where it forwards to and records what happened.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use berth_bridge::BridgeError;
use berth_bridge::policy::BridgePolicy;
use berth_bridge::service::{AuditEntry, AuditSink, Bridge, BridgeConfig, BridgeListener, RunGate};
use berth_bridge::signing::{BridgeSecrets, NonceStore};
use berth_core::driver::BoxFuture;
use berth_core::ids::RunId;
use berth_core::time::Timestamp;
use secrecy::SecretString;
use tokio::sync::mpsc;

use crate::error_chain::DisplayChain;
use crate::runs::event_data::EventData;
use crate::runs::events::EventWriter;
use berth_store::Store;

/// How long a bridge waits for slow headers before closing the connection (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight bridged requests may finish once the run's command has ended.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What every run's bridge is built from.
#[derive(Debug)]
pub struct BridgeSettings {
    pub secrets: Arc<BridgeSecrets>,
    pub policy: Arc<BridgePolicy>,
    /// Where bridged requests go. Set at start-up: `--bridge-upstream`, else this server's own address once bound.
    pub upstream: OnceLock<http::Uri>,
    /// The credential presented upstream when it is another control plane (`BERTH_BRIDGE_UPSTREAM_TOKEN`); `None`:
    /// the run's own upstream credential for this server.
    pub upstream_token: Option<SecretString>,
}

/// A run's bridge while its command runs. Its `Debug` names the variables but never shows the credential.
pub struct RunningBridge {
    bridge: Bridge,
    listener: BridgeListener,
    /// A Unix socket the environment reaches the bridge through (a sandbox with a network of its own).
    unix: Option<BridgeListener>,
    audit: AuditWriter,
    address: std::net::SocketAddr,
    url_name: String,
    /// Environment variables for the command: the URL, the run credential and the run id, under the policy's names.
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for RunningBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningBridge")
            .field("local_addr", &self.listener.local_addr())
            .field(
                "env",
                &self.env.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RunningBridge {
    /// Starts a bridge for `run_id` on a loopback port.
    pub async fn start(
        settings: &BridgeSettings,
        store: &Store,
        run_id: RunId,
        events: EventWriter,
    ) -> Result<Self, BridgeError> {
        let upstream = settings.upstream.get().cloned().ok_or_else(|| {
            BridgeError::Io(std::io::Error::other(
                "the bridge upstream is not known yet",
            ))
        })?;
        let audit = AuditWriter::start(events);
        let bridge = Bridge::new(BridgeConfig {
            run_id,
            secrets: settings.secrets.clone(),
            upstream,
            upstream_token: settings.upstream_token.clone(),
            policy: settings.policy.clone(),
            gate: Arc::new(LiveRuns {
                store: store.clone(),
            }),
            audit: Arc::new(audit.sink()),
            header_read_timeout: HEADER_READ_TIMEOUT,
        });
        let listener = bridge.listen_tcp(([127, 0, 0, 1], 0).into()).await?;
        let address = listener.local_addr().ok_or_else(|| {
            BridgeError::Io(std::io::Error::other("the bridge has no local address"))
        })?;
        // The credential outlives any sane run by far; it dies with the run anyway (the gate and the listener).
        let credential = settings.secrets.credential_issuer().mint(
            run_id,
            Timestamp::now().saturating_add(Duration::from_secs(7 * 24 * 3600)),
        );
        let names = &settings.policy.env;
        let mut env = vec![
            (names.url.clone(), format!("http://{address}")),
            (
                names.token.clone(),
                secrecy::ExposeSecret::expose_secret(&credential).to_owned(),
            ),
        ];
        if let Some(name) = &names.run_id {
            env.push((name.clone(), run_id.to_string()));
        }
        tracing::debug!(run.id = %run_id, %address, "bridge listening");
        Ok(Self {
            bridge,
            unix: None,
            listener,
            audit,
            address,
            url_name: names.url.clone(),
            env,
        })
    }

    /// Where the bridge listens on this host.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Points the command's URL at `address` (`host:port`), the environment's end of a tunnel to this bridge.
    pub fn reroute(&mut self, address: &str) {
        let url = format!("http://{address}");
        if let Some((_, value)) = self.env.iter_mut().find(|(name, _)| *name == self.url_name) {
            *value = url;
        }
    }

    /// Also serves the bridge on a Unix socket at `path` (which must not exist), until [`stop`](Self::stop).
    pub async fn serve_unix(&mut self, path: &std::path::Path) -> Result<(), BridgeError> {
        self.unix = Some(self.bridge.listen_unix(path).await?);
        Ok(())
    }

    /// Stops accepting, lets in-flight requests finish, and writes their audit events before returning: the run's
    /// final event must come after every bridge event.
    pub async fn stop(self) {
        if let Some(unix) = self.unix {
            unix.shutdown(SHUTDOWN_GRACE).await;
        }
        self.listener.shutdown(SHUTDOWN_GRACE).await;
        self.audit.finish().await;
    }
}

/// Database-backed nonces: shared by replicas.
#[derive(Debug, Clone)]
pub struct StoreNonces(pub Store);

impl NonceStore for StoreNonces {
    fn remember<'a>(
        &'a self,
        run_id: RunId,
        nonce: &'a str,
        expires_at: Timestamp,
    ) -> BoxFuture<'a, Result<bool, BridgeError>> {
        Box::pin(async move {
            self.0.remember_nonce(run_id, nonce, expires_at).await.map_err(|error| {
                tracing::warn!(error = %DisplayChain(&error), "could not record a bridge nonce");
                BridgeError::Io(std::io::Error::other("the nonce store is unavailable"))
            })
        })
    }
}

/// A credential is good only while its run is live.
#[derive(Debug)]
struct LiveRuns {
    store: Store,
}

impl RunGate for LiveRuns {
    fn is_live(&self, run_id: RunId) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            matches!(self.store.get_run(run_id).await, Ok(Some(run)) if !run.status.is_terminal())
        })
    }
}

/// Bridge audit entries become `bridge` events, written in order by one task.
#[derive(Debug)]
struct AuditWriter {
    entries: mpsc::UnboundedSender<AuditEntry>,
    done: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct AuditChannel(mpsc::UnboundedSender<AuditEntry>);

impl AuditSink for AuditChannel {
    fn record(&self, _run_id: RunId, entry: AuditEntry) {
        crate::metrics::bridge_request(entry.status, entry.code, entry.latency);
        // Unbounded is bounded in practice: one entry per request, and requests are limited per run.
        let _ = self.0.send(entry);
    }
}

impl AuditWriter {
    fn start(events: EventWriter) -> Self {
        let (entries, mut received) = mpsc::unbounded_channel::<AuditEntry>();
        let (done, mut finishing) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                let entry = tokio::select! {
                    entry = received.recv() => entry,
                    // The listener has shut down, so every entry that will ever come is queued: drain and stop,
                    // whoever still holds a sender.
                    _ = &mut finishing => {
                        while let Ok(entry) = received.try_recv() {
                            emit(&events, entry).await;
                        }
                        return;
                    }
                };
                let Some(entry) = entry else { return };
                emit(&events, entry).await;
            }
        });
        Self {
            entries,
            done,
            task,
        }
    }

    fn sink(&self) -> AuditChannel {
        AuditChannel(self.entries.clone())
    }

    async fn finish(self) {
        let _ = self.done.send(());
        if let Err(error) = self.task.await {
            tracing::error!(%error, "the bridge audit writer failed");
        }
    }
}

async fn emit(events: &EventWriter, entry: AuditEntry) {
    events
        .record(EventData::Bridge {
            method: &entry.method,
            path: &entry.path,
            status: entry.status,
            latency_ms: entry.latency.as_secs_f64() * 1000.0,
            request_bytes: entry.request_bytes,
            response_bytes: entry.response_bytes,
            code: entry.code,
        })
        .await;
}
