//! Listening: accept loops on TCP and Unix sockets, serving one connection over any byte stream (HTTP/1.1 or HTTP/2,
//! sniffed under the header-read timeout), and stopping with a grace period.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::Bridge;
use crate::error::BridgeError;

/// A running accept loop. [`shutdown`](Self::shutdown) it; dropping it stops it too, without a grace period.
pub struct BridgeListener {
    local_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<Duration>>,
    task: Option<JoinHandle<()>>,
}

/// A listener's life: connections watch it to stop taking requests, then to stop altogether.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Stopped,
}

const LISTEN_BACKLOG: u32 = 1024;
/// Connections one listener serves at once. Past this, accepting pauses (new clients wait in the kernel's backlog)
/// until one closes: a flood of idle connections costs a bounded number of tasks and descriptors.
const MAX_CONNECTIONS: usize = 4096;
/// HTTP/2 keep-alive pings, so a peer that vanished without closing is noticed.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not about one connection (out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// === impl Bridge ===

impl Bridge {
    /// Serves one connection over any byte stream (TCP, a Unix socket, an SSH forwarded channel) until it closes:
    /// HTTP/1.1, or HTTP/2 when the client opens with the HTTP/2 preface. A client that has not started a request
    /// within `header_read_timeout` is disconnected.
    pub async fn serve_connection<IO>(&self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(io, None).await;
    }

    /// Binds `addr` and serves every connection on it, each on its own task.
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<BridgeListener, BridgeError> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        let local_addr = listener.local_addr()?;
        Ok(self.spawn_listener(Tcp(listener), Some(local_addr)))
    }

    /// Binds a Unix socket at `path` (which must not exist) and serves every connection on it. The socket file is
    /// removed when the listener shuts down.
    pub async fn listen_unix(&self, path: &Path) -> Result<BridgeListener, BridgeError> {
        let listener = UnixListener::bind(path)?;
        Ok(self.spawn_listener(
            Unix {
                listener,
                path: path.to_owned(),
            },
            None,
        ))
    }

    fn spawn_listener<A: Acceptor>(
        &self,
        acceptor: A,
        local_addr: Option<SocketAddr>,
    ) -> BridgeListener {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(self.clone(), acceptor, stopped));
        BridgeListener {
            local_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Serves one connection; `phase` is the listener's, when there is one.
    async fn serve<IO>(&self, mut io: IO, phase: Option<watch::Receiver<Phase>>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = &*self.inner;
        // hyper-util's auto builder would wait for the first bytes without any deadline, so the protocol is sniffed
        // here, under the header timeout, and the builder told which one it is.
        let sniff = tokio::time::timeout(inner.header_read_timeout, sniff_protocol(&mut io));
        let sniffed = match phase.clone() {
            None => sniff.await,
            Some(mut phase) => tokio::select! {
                sniffed = sniff => sniffed,
                () = reached(&mut phase, Phase::Draining) => return,
            },
        };
        let (http2, prefix) = match sniffed {
            Ok(Ok(Some(sniffed))) => sniffed,
            Ok(Ok(None)) => return,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "bridge connection failed before a request");
                return;
            }
            Err(_) => {
                tracing::debug!(run_id = %inner.run_id, "bridge connection sent no request in time; closed");
                return;
            }
        };
        let io = TokioIo::new(Prefixed { prefix, io });

        let mut builder = auto::Builder::new(StreamExecutor {
            stop: phase.clone(),
        });
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(inner.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
            .max_concurrent_streams(inner.policy.max_in_flight.max(1));
        let builder = if http2 {
            builder.http2_only()
        } else {
            builder.http1_only()
        };

        let service = {
            let bridge = self.clone();
            let phase = phase.clone();
            service_fn(move |request| {
                let bridge = bridge.clone();
                let draining = phase
                    .as_ref()
                    .is_some_and(|phase| *phase.borrow() != Phase::Running);
                async move { Ok::<_, Infallible>(bridge.handle(request, draining).await) }
            })
        };
        let mut connection = pin!(builder.serve_connection(io, service));
        let Some(mut phase) = phase else {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "bridge connection ended with an error");
            }
            return;
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "bridge connection ended with an error");
                }
                return;
            }
            () = reached(&mut phase, Phase::Draining) => {}
        }
        // Let the request in progress finish, take no more; stop outright when the grace period is over.
        connection.as_mut().graceful_shutdown();
        tokio::select! {
            _ = connection.as_mut() => {}
            () = reached(&mut phase, Phase::Stopped) => {}
        }
    }
}

// === impl BridgeListener ===

impl BridgeListener {
    /// The bound address, for TCP listeners.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops accepting at once (the listening socket is closed before anything else), lets requests in flight
    /// finish for up to `grace`, then drops whatever is left. Requests that arrive on kept-alive connections after
    /// this started get 503 `bridge_shutting_down`. Returns when every connection is gone.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            // The accept loop only ends once told to, so it is there to hear this.
            let _ = stop.send(grace);
        }
        if let Some(task) = self.task.take()
            && let Err(err) = task.await
        {
            tracing::error!(error = %err, "bridge accept loop failed");
        }
    }
}

impl Drop for BridgeListener {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Duration::ZERO);
        }
    }
}

impl fmt::Debug for BridgeListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeListener")
            .field("local_addr", &self.local_addr)
            .field("running", &self.stop.is_some())
            .finish()
    }
}

// === accepting ===

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
        // Small request/response exchanges: do not wait to coalesce.
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
            tracing::warn!(path = %self.path.display(), error = %err, "could not remove the bridge socket");
        }
    }
}

async fn accept_loop<A: Acceptor>(
    bridge: Bridge,
    mut acceptor: A,
    mut stop: oneshot::Receiver<Duration>,
) {
    let (phase, _) = watch::channel(Phase::Running);
    let mut connections = JoinSet::new();
    let grace = loop {
        tokio::select! {
            grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
            accepted = acceptor.accept(), if connections.len() < MAX_CONNECTIONS => match accepted {
                Ok(io) => {
                    let bridge = bridge.clone();
                    let phase = phase.subscribe();
                    connections.spawn(async move { bridge.serve(io, Some(phase)).await });
                }
                Err(err) if is_per_connection(&err) => {
                    tracing::debug!(error = %err, "bridge accept failed for one connection");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "bridge accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };

    // Nothing listens from here on.
    acceptor.close();
    phase.send_replace(Phase::Draining);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    phase.send_replace(Phase::Stopped);
    if !drained {
        tracing::debug!(
            run_id = %bridge.inner.run_id,
            connections = connections.len(),
            "bridge grace period over; dropping the remaining connections"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
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

/// Resolves once the listener reaches `target` (or is gone).
async fn reached(phase: &mut watch::Receiver<Phase>, target: Phase) {
    let _ = phase.wait_for(|phase| *phase >= target).await;
}

/// Runs HTTP/2 streams on their own tasks, like `TokioExecutor`, but ends them when the listener stops, so nothing
/// outlives a shutdown.
#[derive(Clone)]
struct StreamExecutor {
    stop: Option<watch::Receiver<Phase>>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        match self.stop.clone() {
            None => {
                tokio::spawn(future);
            }
            Some(mut stop) => {
                tokio::spawn(async move {
                    tokio::select! {
                        () = future => {}
                        () = reached(&mut stop, Phase::Stopped) => {}
                    }
                });
            }
        }
    }
}

/// Reads until the bytes either diverge from the HTTP/2 preface (HTTP/1) or complete it (HTTP/2). `None` when the
/// client closed without sending anything.
async fn sniff_protocol<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<Option<(bool, Bytes)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let read = io.read(&mut buf[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            break;
        }
        let fresh = filled..filled + read;
        filled += read;
        if buf[fresh.clone()] != H2_PREFACE[fresh] {
            break;
        }
    }
    let http2 = filled == buf.len() && buf == *H2_PREFACE;
    Ok(Some((http2, Bytes::copy_from_slice(&buf[..filled]))))
}

/// A stream with some bytes already read from it put back in front.
struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let take = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(take));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
