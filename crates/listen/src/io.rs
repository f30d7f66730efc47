//! The byte stream under hyper: bytes the protocol sniff already read put back in front, a bodiless error head
//! hyper wrote last held back (so it can be replaced with one that has a JSON body), the close deferred to the
//! connection's owner (for a lingering close), and the stream handed back when hyper lets go of it.
//!
//! Holding a head back: hyper answers a request head it cannot parse (`400`, `414`, `431`) on its own, with no
//! body, writes nothing after it, flushes, shuts the stream and returns a parse error. So a write that ends with a
//! bodiless error head while no request is in the service is kept here, reported written: the next read or write
//! sends it unchanged (hyper carried on, so the head was a service's), and if the connection instead ends with a
//! parse error its owner sends a JSON version in its place.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::response::trailing_bodiless_error;

/// What one connection's service and stream tell its owner: whether a request is being served, whether written
/// bytes still wait for the peer, and since when it has been idle.
#[derive(Debug)]
pub(crate) struct ConnState {
    in_flight: AtomicUsize,
    write_pending: AtomicBool,
    /// Whether anything was ever written: only then is there a response worth a lingering close.
    wrote: AtomicBool,
    born: Instant,
    /// When the last request finished, in milliseconds after `born`.
    idle_since_ms: AtomicU64,
}

impl ConnState {
    pub(crate) fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            write_pending: AtomicBool::new(false),
            wrote: AtomicBool::new(false),
            born: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn request_finished(&self) {
        let millis = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(millis, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// No request in the service and nothing written that the peer has not been handed: closing now loses nothing
    /// but a request head still on its way in.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight() == 0 && !self.write_pending.load(Ordering::Acquire)
    }

    /// How long the connection has had no request in flight (zero while one is).
    pub(crate) fn idle_for(&self) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        self.born.elapsed().saturating_sub(since)
    }

    pub(crate) fn wrote(&self) -> bool {
        self.wrote.load(Ordering::Acquire)
    }

    fn set_write_pending(&self, pending: bool) {
        if pending {
            self.wrote.store(true, Ordering::Release);
        }
        self.write_pending.store(pending, Ordering::Release);
    }
}

/// The stream and a held head, handed back when hyper drops its end.
#[derive(Debug)]
pub(crate) struct Returned<IO> {
    pub(crate) io: IO,
    pub(crate) held: Vec<u8>,
}

pub(crate) struct Guarded<IO> {
    io: Option<IO>,
    prefix: Bytes,
    /// Whether bodiless error heads are held back (HTTP/1: HTTP/2 errors are frames, not heads).
    hold: bool,
    held: Vec<u8>,
    state: Arc<ConnState>,
    back: Option<oneshot::Sender<Returned<IO>>>,
}

impl<IO> Guarded<IO> {
    pub(crate) fn new(
        io: IO,
        prefix: Bytes,
        hold: bool,
        state: Arc<ConnState>,
    ) -> (Self, oneshot::Receiver<Returned<IO>>) {
        let (back, returned) = oneshot::channel();
        let guarded = Self {
            io: Some(io),
            prefix,
            hold,
            held: Vec::new(),
            state,
            back: Some(back),
        };
        (guarded, returned)
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the stream was handed back")
}

impl<IO: AsyncWrite + Unpin> Guarded<IO> {
    /// Sends a held head as it is: hyper went on, so it was a service's response.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        if self.held.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while !self.held.is_empty() {
            let written = ready!(Pin::new(&mut *io).poll_write(cx, &self.held))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..written);
        }
        ready!(Pin::new(io).poll_flush(cx))?;
        self.state.set_write_pending(false);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<IO> {
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
        ready!(this.poll_release(cx))?;
        match this.io.as_mut() {
            Some(io) => Pin::new(io).poll_read(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        let mut end = buf.len();
        if this.hold && this.state.in_flight() == 0 {
            match trailing_bodiless_error(buf) {
                Some(0) => {
                    this.held.extend_from_slice(buf);
                    this.state.set_write_pending(true);
                    return Poll::Ready(Ok(buf.len()));
                }
                // What comes before it first; hyper comes back with the rest.
                Some(start) => end = start,
                None => {}
            }
        }
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        this.state.set_write_pending(true);
        Pin::new(io).poll_write(cx, &buf[..end])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let might_end_with_a_head = this.hold
            && this.state.in_flight() == 0
            && bufs
                .iter()
                .rev()
                .find(|buf| !buf.is_empty())
                .is_some_and(|last| last.ends_with(b"\r\n\r\n"));
        if might_end_with_a_head {
            // One slice at a time, through the check in `poll_write` (a head is never split across slices).
            let first = bufs
                .iter()
                .find(|buf| !buf.is_empty())
                .map_or(&[][..], |buf| &buf[..]);
            return Pin::new(this).poll_write(cx, first);
        }
        ready!(this.poll_release(cx))?;
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        this.state.set_write_pending(true);
        Pin::new(io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        ready!(Pin::new(io).poll_flush(cx))?;
        if this.held.is_empty() {
            this.state.set_write_pending(false);
        }
        Poll::Ready(Ok(()))
    }

    /// Deferred: the connection's owner shuts the stream after the last response and reads what is still coming
    /// (a lingering close).
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl<IO> Drop for Guarded<IO> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
            let held = std::mem::take(&mut self.held);
            // The owner may have stopped waiting (the listener stopped): then the stream just closes.
            let _ = back.send(Returned { io, held });
        }
    }
}
