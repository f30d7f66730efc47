//! The callback bridge over SSH: a remote port forward on the remote host's loopback, its connections carried back
//! over the pooled SSH connection and handed to the run's bridge on the berth host. The remote host needs no route
//! to the server, and the bridge listens only on this host's loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use berth_core::driver::{DriverError, Tunnel};
use tokio::sync::mpsc;

use super::pool::{Connection, Pool};
use super::target::SshTarget;

/// Where the forward listens on the remote host.
const REMOTE_LOOPBACK: &str = "127.0.0.1";

/// Asks the remote sshd for a port on its loopback and carries every connection to it to `local`.
pub async fn open(
    pool: &Arc<Pool>,
    target: &SshTarget,
    local: SocketAddr,
) -> Result<Tunnel, DriverError> {
    let connection = pool.connection(target).await?;
    let port = connection
        .handle()
        .tcpip_forward(REMOTE_LOOPBACK, 0)
        .await
        .map_err(|error| {
            DriverError::failed(format!(
                "{} refused a remote port forward for the callback bridge (AllowTcpForwarding?): {error}",
                connection.target()
            ))
        })?;
    let (routed, mut arrivals) = mpsc::unbounded_channel();
    if let Ok(mut routes) = connection.routes().lock() {
        routes.insert(port, routed);
    }
    let accept = tokio::spawn(async move {
        while let Some(channel) = arrivals.recv().await {
            tokio::spawn(async move {
                let mut remote = channel.into_stream();
                match tokio::net::TcpStream::connect(local).await {
                    Ok(mut bridge) => {
                        let _ = bridge.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut remote, &mut bridge).await;
                    }
                    Err(error) => tracing::warn!(%error, "the run's bridge is not accepting"),
                }
            });
        }
    });
    tracing::debug!(target = %connection.target(), port, "bridge forward open");
    Ok(Tunnel::new(
        format!("{REMOTE_LOOPBACK}:{port}"),
        ForwardGuard {
            connection,
            port,
            accept,
        },
    ))
}

/// Closes the forward when the run's command is done.
struct ForwardGuard {
    connection: Arc<Connection>,
    port: u32,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.connection.routes().lock() {
            routes.remove(&self.port);
        }
        self.accept.abort();
        let (connection, port) = (self.connection.clone(), self.port);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = connection
                    .handle()
                    .cancel_tcpip_forward(REMOTE_LOOPBACK, port)
                    .await;
            });
        }
    }
}
