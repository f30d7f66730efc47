//! Accept loops on TCP and Unix sockets: a bound on connections with a clear refusal past it, and stopping with a
//! grace period.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::connection::{linger, serve};
use crate::limits::Limits;
use crate::phase::{Draining, Phase};
use crate::response::{TOO_MANY_CONNECTIONS, error_response};

type BoxError = Box<dyn StdError + Send + Sync>;

const LISTEN_BACKLOG: u32 = 1024;
/// Connections being refused at once, past the bound. Past both, accepting pauses and new clients wait in the
/// kernel's backlog: a flood costs a bounded number of tasks and descriptors.
const MAX_REFUSING: usize = 64;
/// How long a refusal may take, its lingering close included.
const REFUSAL_TIME: Duration = Duration::from_secs(2);
/// Pause after an accept error that is not about one connection (out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// A running accept loop. [`shutdown`](Self::shutdown) it; dropping it stops it too, without a grace period.
pub struct Listener {
    local_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<Duration>>,
    task: Option<JoinHandle<usize>>,
}

/// Binds a TCP listener on `addr` the way berth's listeners want it: `SO_REUSEADDR` (a restart does not wait out
/// `TIME_WAIT`) and a backlog of 1024.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Listener {
    /// Serves every connection `listener` accepts, each on its own task with the service `make_service` builds for
    /// it (told whether the listener is draining).
    pub fn tcp<M, S, B>(listener: TcpListener, limits: Limits, make_service: M) -> io::Result<Self>
    where
        M: Fn(Draining) -> S + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let local_addr = listener.local_addr()?;
        Ok(Self::spawn(
            Tcp(listener),
            Some(local_addr),
            limits,
            make_service,
        ))
    }

    /// Like [`tcp`](Self::tcp) on a Unix socket; the socket file at `path` is removed when the listener stops.
    pub fn unix<M, S, B>(
        listener: UnixListener,
        path: PathBuf,
        limits: Limits,
        make_service: M,
    ) -> Self
    where
        M: Fn(Draining) -> S + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Self::spawn(Unix { listener, path }, None, limits, make_service)
    }

    fn spawn<A, M, S, B>(
        acceptor: A,
        local_addr: Option<SocketAddr>,
        limits: Limits,
        make_service: M,
    ) -> Self
    where
        A: Acceptor,
        M: Fn(Draining) -> S + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(acceptor, limits, make_service, stopped));
        Self {
            local_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The bound address, for TCP listeners.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops accepting at once (the listening socket is closed before anything else), closes idle connections,
    /// lets requests in flight finish for up to `grace`, then drops whatever is left. Returns when every
    /// connection is gone, with how many had to be dropped.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        if let Some(stop) = self.stop.take() {
            // The accept loop only ends once told to, so it is there to hear this.
            let _ = stop.send(grace);
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|err| {
                tracing::error!(error = %err, "accept loop failed");
                0
            }),
            None => 0,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Duration::ZERO);
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("local_addr", &self.local_addr)
            .field("running", &self.stop.is_some())
            .finish()
    }
}

/// A listening socket the accept loop can take connections from.
trait Acceptor: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;

    /// Closes the listening socket and cleans up after it.
    fn close(self);
}

struct Tcp(TcpListener);

struct Unix {
    listener: UnixListener,
    path: PathBuf,
}

impl Acceptor for Tcp {
    type Io = TcpStream;

    async fn accept(&mut self) -> io::Result<TcpStream> {
        let (stream, _) = self.0.accept().await?;
        // Small request/response exchanges and event streams: do not wait to coalesce (Nagle plus the client's
        // delayed ACK would hold small writes back for 40 ms).
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn close(self) {}
}

impl Acceptor for Unix {
    type Io = UnixStream;

    async fn accept(&mut self) -> io::Result<UnixStream> {
        let (stream, _) = self.listener.accept().await?;
        Ok(stream)
    }

    fn close(self) {
        drop(self.listener);
        if let Err(err) = std::fs::remove_file(&self.path)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %err, "could not remove the socket file");
        }
    }
}

async fn accept_loop<A, M, S, B>(
    mut acceptor: A,
    limits: Limits,
    make_service: M,
    mut stop: oneshot::Receiver<Duration>,
) -> usize
where
    A: Acceptor,
    M: Fn(Draining) -> S + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (phase, _) = watch::channel(Phase::Running);
    let mut connections = JoinSet::new();
    let mut refusing = JoinSet::new();
    let mut saturated = false;
    let grace = loop {
        let full = connections.len() >= limits.max_connections;
        if full != saturated {
            saturated = full;
            if full {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached; refusing new connections with 503"
                );
            }
        }
        tokio::select! {
            grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
            accepted = acceptor.accept(), if !full || refusing.len() < MAX_REFUSING => match accepted {
                Ok(io) if connections.len() < limits.max_connections => {
                    let draining = Draining::of(phase.subscribe());
                    let service = make_service(draining.clone());
                    let limits = limits.clone();
                    connections.spawn(async move { serve(io, service, &limits, draining).await });
                }
                Ok(io) => {
                    let limits = limits.clone();
                    let draining = Draining::of(phase.subscribe());
                    refusing.spawn(async move {
                        let _ = tokio::time::timeout(REFUSAL_TIME, refuse(io, &limits, draining)).await;
                    });
                }
                Err(err) if is_per_connection(&err) => {
                    tracing::debug!(error = %err, "accept failed for one connection");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            Some(_) = refusing.join_next(), if !refusing.is_empty() => {}
        }
    };

    // Nothing listens from here on.
    acceptor.close();
    refusing.abort_all();
    phase.send_replace(Phase::Draining);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    phase.send_replace(Phase::Stopped);
    let dropped = connections.len();
    if !drained {
        tracing::debug!(
            connections = dropped,
            "grace period over; dropping the remaining connections"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    while refusing.join_next().await.is_some() {}
    dropped
}

/// Past the bound: a 503 with the JSON error body, written before the request is read (HTTP/1.1 allows an early
/// answer), then a lingering close so the client can read it.
async fn refuse<IO>(mut io: IO, limits: &Limits, mut draining: Draining)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        TOO_MANY_CONNECTIONS,
        Some(1),
    );
    if io.write_all(&response).await.is_err() || io.flush().await.is_err() {
        return;
    }
    let limits = Limits {
        linger_time: limits.linger_time.min(REFUSAL_TIME),
        linger_bytes: limits.linger_bytes.min(1024 * 1024),
        ..limits.clone()
    };
    linger(io, &limits, &mut draining).await;
}

fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
