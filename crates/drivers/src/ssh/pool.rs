//! Pooled SSH connections: one set of keep-alive connections per (host, port, user, credential, host-key pins),
//! shared by every lease on that host, with a session semaphore per connection kept below sshd's `MaxSessions`.
//!
//! A connection that dies (sshd restarted, network cut) is dropped from the pool the first time it fails and the
//! next caller reconnects; a run whose channel was on it fails, the others are unaffected.
//!
//! Each connection also keeps its idle [remote runners](super::runner): a runner holds one of the connection's
//! sessions while it lives, and is handed to the next command instead of a new session.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use berth_core::driver::DriverError;
use russh::Channel;
use russh::client::{self, Msg};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connect::{self, ClientHandler, ConnectError, ForwardRoutes};
use super::target::SshTarget;

/// Session channels open at once on one connection. Stock sshd refuses the 11th (`MaxSessions 10`); two stay free
/// for the short control commands (kill, cleanup) that must get through while long commands hold the rest.
pub const SESSIONS_PER_CONNECTION: usize = 8;
/// Connections opened to one target before callers queue for a session instead.
pub const CONNECTIONS_PER_TARGET: usize = 8;
/// Session refusals on live connections one open tolerates before it fails, and the pause between them once a
/// connection is down to one session.
const MAX_REFUSALS: usize = 4 * SESSIONS_PER_CONNECTION;
const REFUSAL_BACKOFF: std::time::Duration = std::time::Duration::from_millis(25);
/// A connection nobody used for this long, with no session or forward open, is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct PoolKey {
    host: String,
    port: u16,
    username: String,
    credential: [u8; 32],
}

impl PoolKey {
    /// The pool key: connections are shared only between identical targets. The credential and pins enter as a
    /// digest, so the key itself holds no secret.
    pub(super) fn of(target: &SshTarget) -> Self {
        let mut digest = Sha256::new();
        for part in [
            target.private_key.as_ref().map(ExposeSecret::expose_secret),
            target.password.as_ref().map(ExposeSecret::expose_secret),
            Some(target.known_hosts.as_str()),
        ] {
            let part = part.unwrap_or_default();
            digest.update((part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
        digest.update([u8::from(target.strict)]);
        Self {
            host: target.host.clone(),
            port: target.port,
            username: target.username.clone(),
            credential: digest.finalize().into(),
        }
    }
}

/// One authenticated connection.
pub struct Connection {
    handle: client::Handle<ClientHandler>,
    routes: ForwardRoutes,
    sessions: Arc<Semaphore>,
    pub(super) target: String,
    last_used: Mutex<std::time::Instant>,
    /// Sessions this connection may hold: [`SESSIONS_PER_CONNECTION`], less each one the server refused.
    capacity: AtomicUsize,
    /// Started runners waiting for a command; each holds a session permit.
    pub(super) idle_runners: Mutex<Vec<IdleRunner>>,
    /// Why this host cannot have a runner, once a runner said so: commands then take a session each.
    pub(super) runner_unsupported: Mutex<Option<String>>,
}

/// A runner between jobs: its session channel and permit, without the connection (which owns the idle list).
pub struct IdleRunner {
    pub channel: Channel<Msg>,
    pub permit: OwnedSemaphorePermit,
    pub nonce: String,
    pub boot_id: String,
}

impl fmt::Debug for IdleRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleRunner")
            .field("channel", &self.channel.id())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .field("free_sessions", &self.sessions.available_permits())
            .field("closed", &self.handle.is_closed())
            .finish()
    }
}

/// The connection has closed (the pool dropped it and its last user let go): one fewer open.
impl Drop for Connection {
    fn drop(&mut self) {
        metrics::gauge!("berth_ssh_connections_open").decrement(1.0);
    }
}

impl Connection {
    pub fn handle(&self) -> &client::Handle<ClientHandler> {
        &self.handle
    }

    pub fn routes(&self) -> &ForwardRoutes {
        &self.routes
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn is_usable(&self) -> bool {
        !self.handle.is_closed()
    }

    /// Why a runner cannot start on this connection's host, if one said so.
    pub fn runner_unsupported(&self) -> Option<String> {
        self.runner_unsupported
            .lock()
            .ok()
            .and_then(|unsupported| unsupported.clone())
    }

    pub fn sessions_free(&self) -> usize {
        self.sessions.available_permits()
    }

    fn idle_runner_count(&self) -> usize {
        self.idle_runners.lock().map_or(0, |idle| idle.len())
    }

    pub(super) fn touch(&self) {
        if let Ok(mut last_used) = self.last_used.lock() {
            *last_used = std::time::Instant::now();
        }
    }

    /// Unused for [`IDLE_TIMEOUT`]: no session, no forward, no recent caller.
    fn is_idle(&self) -> bool {
        let quiet = self
            .last_used
            .lock()
            .is_ok_and(|last_used| last_used.elapsed() >= IDLE_TIMEOUT);
        let forwards = self.routes.lock().map_or(1, |routes| routes.len());
        quiet
            && forwards == 0
            && self.sessions.available_permits() + self.idle_runner_count()
                >= self.capacity.load(Ordering::Relaxed)
    }
}

/// A session channel and the permit it holds on its connection. Close it with [`SessionChannel::close`]: a dropped
/// russh channel sends no CHANNEL_CLOSE, and sshd would count it against `MaxSessions` until the connection ends.
pub struct SessionChannel {
    pub channel: Channel<Msg>,
    pub connection: Arc<Connection>,
    pub permit: OwnedSemaphorePermit,
}

impl fmt::Debug for SessionChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionChannel")
            .field("id", &self.channel.id())
            .field("connection", &self.connection)
            .finish()
    }
}

impl SessionChannel {
    pub async fn close(self) {
        let _ = self.channel.close().await;
    }
}

/// The pool.
#[derive(Default)]
pub struct Pool {
    connections: Mutex<HashMap<PoolKey, Vec<Arc<Connection>>>>,
    /// One connect at a time per target: fifty runs starting together must not open fifty connections.
    connecting: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self
            .connections
            .lock()
            .map(|connections| connections.values().map(Vec::len).sum::<usize>())
            .unwrap_or_default();
        f.debug_struct("Pool").field("connections", &count).finish()
    }
}

impl Pool {
    /// Opens a session channel to `target`, on a pooled connection with a free session, on a new connection while
    /// the target has fewer than [`CONNECTIONS_PER_TARGET`], or else waiting for a session to free up. A connection
    /// that fails to open a channel is dropped and the open is tried once more on a fresh one.
    pub async fn open_session(&self, target: &SshTarget) -> Result<SessionChannel, DriverError> {
        let key = PoolKey::of(target);
        let mut reconnected = false;
        let mut refusals = 0;
        loop {
            let (connection, permit) = self.session_slot(&key, target).await?;
            connection.touch();
            let error = match connection.handle.channel_open_session().await {
                Ok(channel) => {
                    metrics::counter!("berth_ssh_sessions_opened_total").increment(1);
                    return Ok(SessionChannel {
                        channel,
                        connection,
                        permit,
                    });
                }
                Err(error) => error,
            };
            if connection.is_usable() && refusals < MAX_REFUSALS {
                // A live connection refused a session: the server allows fewer at once than we assumed (a low
                // `MaxSessions`), or has not yet seen a session we just closed. This connection gets one session
                // less for good, down to one; at one, wait a moment for the server to catch up.
                refusals += 1;
                let shrunk = connection
                    .capacity
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |capacity| {
                        (capacity > 1).then(|| capacity - 1)
                    })
                    .is_ok();
                if shrunk {
                    permit.forget();
                    tracing::warn!(target = %connection.target, %error, "the server refused a session; using fewer per connection");
                } else {
                    drop(permit);
                    tokio::time::sleep(REFUSAL_BACKOFF).await;
                }
                continue;
            }
            self.discard(&key, &connection);
            if reconnected {
                return Err(DriverError::failed(format!(
                    "cannot open a session on {}: {error}",
                    connection.target
                )));
            }
            tracing::debug!(target = %connection.target, %error, "pooled connection failed; reconnecting");
            reconnected = true;
        }
    }

    /// A connection to `target` (pooled or new), without a session: for port forwards.
    pub async fn connection(&self, target: &SshTarget) -> Result<Arc<Connection>, DriverError> {
        let key = PoolKey::of(target);
        if let Some(connection) = self.usable(&key).into_iter().next() {
            connection.touch();
            return Ok(connection);
        }
        self.connect_new(&key, target, true).await
    }

    /// Drops `connection` from the pool (it failed); it closes when its last user lets go.
    pub fn forget(&self, target: &SshTarget, connection: &Arc<Connection>) {
        self.discard(&PoolKey::of(target), connection);
    }

    async fn session_slot(
        &self,
        key: &PoolKey,
        target: &SshTarget,
    ) -> Result<(Arc<Connection>, OwnedSemaphorePermit), DriverError> {
        let usable = self.usable(key);
        for connection in &usable {
            if let Ok(permit) = connection.sessions.clone().try_acquire_owned() {
                return Ok((connection.clone(), permit));
            }
        }
        if usable.len() < CONNECTIONS_PER_TARGET {
            let connection = self.connect_new(key, target, false).await?;
            if let Ok(permit) = connection.sessions.clone().try_acquire_owned() {
                return Ok((connection, permit));
            }
        }
        // Every connection is busy: wait on the one with the fewest waiters we can tell of (any will do).
        let connection = self
            .usable(key)
            .into_iter()
            .max_by_key(|connection| connection.sessions.available_permits())
            .ok_or_else(|| {
                DriverError::failed(format!("lost every connection to {}", target.display()))
            })?;
        let permit = connection
            .sessions
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| DriverError::failed("the SSH session pool is closed"))?;
        Ok((connection, permit))
    }

    /// The live connections to `key`. Closed and idle connections to every target are dropped on the way, so the
    /// pool shrinks back once a host is no longer used.
    pub(super) fn usable(&self, key: &PoolKey) -> Vec<Arc<Connection>> {
        let Ok(mut connections) = self.connections.lock() else {
            return Vec::new();
        };
        for list in connections.values_mut() {
            list.retain(|connection| connection.is_usable() && !connection.is_idle());
        }
        connections.retain(|_, list| !list.is_empty());
        connections.get(key).cloned().unwrap_or_default()
    }

    fn discard(&self, key: &PoolKey, connection: &Arc<Connection>) {
        if let Ok(mut connections) = self.connections.lock()
            && let Some(list) = connections.get_mut(key)
        {
            list.retain(|pooled| !Arc::ptr_eq(pooled, connection));
        }
    }

    /// Connects a new connection to `key`, one connect at a time per target. `reuse`: a connection someone else
    /// opened while this caller waited is good enough; session callers pass `false` only when they saw every
    /// connection busy, and re-check under the lock instead.
    async fn connect_new(
        &self,
        key: &PoolKey,
        target: &SshTarget,
        reuse: bool,
    ) -> Result<Arc<Connection>, DriverError> {
        let gate = {
            let Ok(mut connecting) = self.connecting.lock() else {
                return Err(DriverError::failed("the SSH pool is poisoned"));
            };
            connecting.entry(key.clone()).or_default().clone()
        };
        let _one_at_a_time = gate.lock().await;
        let usable = self.usable(key);
        if reuse && let Some(connection) = usable.first() {
            return Ok(connection.clone());
        }
        if let Some(connection) = usable
            .iter()
            .find(|connection| connection.sessions.available_permits() > 0)
        {
            return Ok(connection.clone());
        }
        if usable.len() >= CONNECTIONS_PER_TARGET
            && let Some(connection) = usable.first()
        {
            return Ok(connection.clone());
        }
        let connected = connect::connect(target).await.map_err(connect_error)?;
        let connection = Arc::new(Connection {
            handle: connected.handle,
            routes: connected.routes,
            sessions: Arc::new(Semaphore::new(SESSIONS_PER_CONNECTION)),
            target: target.display(),
            last_used: Mutex::new(std::time::Instant::now()),
            capacity: AtomicUsize::new(SESSIONS_PER_CONNECTION),
            idle_runners: Mutex::new(Vec::new()),
            runner_unsupported: Mutex::new(None),
        });
        tracing::debug!(target = %connection.target, "new pooled ssh connection");
        metrics::counter!("berth_ssh_connections_opened_total").increment(1);
        metrics::gauge!("berth_ssh_connections_open").increment(1.0);
        if let Ok(mut connections) = self.connections.lock() {
            connections
                .entry(key.clone())
                .or_default()
                .push(connection.clone());
        }
        Ok(connection)
    }
}

fn connect_error(error: ConnectError) -> DriverError {
    DriverError::failed(error.message().to_owned())
}
