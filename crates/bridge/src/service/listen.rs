//! Listening: the bridge's service on `berth-listen`'s accept loops (TCP and Unix sockets) and connections (any
//! byte stream), which bring the header-read timeout, the connection bound, idle closing on shutdown, JSON bodies
//! for protocol errors and the lingering close.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use berth_listen::{Draining, Limits, Listener};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;

use super::Bridge;
use crate::error::BridgeError;

/// A running accept loop. [`shutdown`](Self::shutdown) it; dropping it stops it too, without a grace period.
pub struct BridgeListener(Listener);

/// Connections one listener serves at once. Past this, a connection is answered `503 too_many_connections`: a flood
/// of idle connections costs a bounded number of tasks and descriptors.
const MAX_CONNECTIONS: usize = 4096;

// === impl Bridge ===

impl Bridge {
    /// Serves one connection over any byte stream (TCP, a Unix socket, an SSH forwarded channel) until it closes:
    /// HTTP/1.1, or HTTP/2 when the client opens with the HTTP/2 preface. A client that has not started a request
    /// within `header_read_timeout` is disconnected.
    pub async fn serve_connection<IO>(&self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        berth_listen::serve_connection(
            io,
            service(self.clone(), Draining::never()),
            &self.limits(),
        )
        .await;
    }

    /// Binds `addr` and serves every connection on it, each on its own task.
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<BridgeListener, BridgeError> {
        let listener = berth_listen::bind_tcp(addr)?;
        let bridge = self.clone();
        Ok(BridgeListener(Listener::tcp(
            listener,
            self.limits(),
            move |draining| service(bridge.clone(), draining),
        )?))
    }

    /// Binds a Unix socket at `path` (which must not exist) and serves every connection on it. The socket file is
    /// removed when the listener shuts down.
    pub async fn listen_unix(&self, path: &Path) -> Result<BridgeListener, BridgeError> {
        let listener = UnixListener::bind(path)?;
        let bridge = self.clone();
        Ok(BridgeListener(Listener::unix(
            listener,
            path.to_owned(),
            self.limits(),
            move |draining| service(bridge.clone(), draining),
        )))
    }

    fn limits(&self) -> Limits {
        Limits {
            header_read_timeout: self.inner.header_read_timeout,
            max_connections: MAX_CONNECTIONS,
            h2_max_concurrent_streams: self.inner.policy.max_in_flight.max(1),
            ..Limits::default()
        }
    }
}

/// The service for one connection: requests that arrive once the listener drains get 503 `bridge_shutting_down`.
fn service(
    bridge: Bridge,
    draining: Draining,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
> + Send
+ 'static {
    service_fn(move |request| {
        let bridge = bridge.clone();
        let draining = draining.is_draining();
        async move { Ok::<_, Infallible>(bridge.handle(request, draining).await) }
    })
}

// === impl BridgeListener ===

impl BridgeListener {
    /// The bound address, for TCP listeners.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.0.local_addr()
    }

    /// Stops accepting at once (the listening socket is closed before anything else), closes idle connections, lets
    /// requests in flight finish for up to `grace`, then drops whatever is left. Requests that arrive on kept-alive
    /// connections after this started get 503 `bridge_shutting_down`. Returns when every connection is gone.
    pub async fn shutdown(self, grace: Duration) {
        let _dropped = self.0.shutdown(grace).await;
    }
}

impl fmt::Debug for BridgeListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BridgeListener").field(&self.0).finish()
    }
}
