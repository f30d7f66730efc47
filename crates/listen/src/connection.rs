//! Serving one connection: the protocol sniffed under the header-read timeout, HTTP/1.1 or HTTP/2 with hyper, the
//! drain on shutdown (idle connections closed at once), the JSON version of hyper's own error answers, and a
//! lingering close.

use std::error::Error as StdError;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::io::{ConnState, Guarded, Returned};
use crate::limits::Limits;
use crate::phase::{Draining, Phase, StreamExecutor};
use crate::response::{bodiless_error_status, error_response, protocol_error};
use crate::service::Tracked;

type BoxError = Box<dyn StdError + Send + Sync>;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// While draining, how often a connection checks whether it has become idle (and can be closed at once).
const DRAIN_CHECK: Duration = Duration::from_millis(20);
/// While draining, the longest lingering close: the listener is going away, a courtesy must not hold it up.
const DRAIN_LINGER: Duration = Duration::from_millis(200);
/// How long writing the JSON version of hyper's error answer may take.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves one connection over any byte stream (TCP, a Unix socket, an SSH channel) until it closes: HTTP/1.1, or
/// HTTP/2 when the client opens with the HTTP/2 preface. No listener owns it, so it never drains.
pub async fn serve_connection<IO, S, B>(io: IO, service: S, limits: &Limits)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve(io, service, limits, Draining::never()).await;
}

/// How hyper's part ended.
enum Outcome {
    /// hyper finished (or failed): what it wrote last may need a JSON body, the close lingers.
    Finished(Result<(), BoxError>),
    /// Closed by us while idle (draining, or HTTP/2 idle too long): no request was cut.
    ClosedIdle,
    /// The listener stopped: everything is dropped.
    Stopped,
}

pub(crate) async fn serve<IO, S, B>(mut io: IO, service: S, limits: &Limits, mut draining: Draining)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // hyper-util's auto builder would wait for the first bytes without any deadline, so the protocol is sniffed
    // here, under the header timeout, and the builder told which one it is.
    let sniffed = tokio::select! {
        sniffed = tokio::time::timeout(limits.header_read_timeout, sniff_protocol(&mut io)) => sniffed,
        () = draining.reached(Phase::Draining) => return,
    };
    let (http2, prefix) = match sniffed {
        Ok(Ok(Some(sniffed))) => sniffed,
        Ok(Ok(None)) => return,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "connection failed before a request");
            return;
        }
        Err(_) => {
            // Nothing was answered, so nothing needs a lingering close.
            tracing::debug!("connection sent no request in time; closed");
            return;
        }
    };

    let state = Arc::new(ConnState::new());
    let (guarded, returned) = Guarded::new(io, prefix, !http2, Arc::clone(&state));
    let outcome = {
        let mut builder = auto::Builder::new(StreamExecutor {
            draining: draining.clone(),
        });
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.h2_keep_alive_interval)
            .keep_alive_timeout(limits.h2_keep_alive_timeout)
            .max_concurrent_streams(limits.h2_max_concurrent_streams.max(1));
        let builder = if http2 {
            builder.http2_only()
        } else {
            builder.http1_only()
        };
        let mut connection = pin!(builder.serve_connection(
            TokioIo::new(guarded),
            Tracked::new(service, Arc::clone(&state))
        ));
        let ended = tokio::select! {
            result = connection.as_mut() => Some(result),
            () = draining.reached(Phase::Draining) => None,
            // HTTP/1's idle time between requests is hyper's header-read timeout; HTTP/2 has none of its own.
            () = idle_for(&state, limits.header_read_timeout), if http2 => None,
        };
        match ended {
            Some(result) => Outcome::Finished(result),
            None => {
                // Let the request in progress finish, take no more; an idle connection is closed now.
                connection.as_mut().graceful_shutdown();
                loop {
                    tokio::select! {
                        result = connection.as_mut() => break Outcome::Finished(result),
                        () = draining.reached(Phase::Stopped) => break Outcome::Stopped,
                        () = tokio::time::sleep(DRAIN_CHECK) => {}
                    }
                    if state.is_idle() {
                        break Outcome::ClosedIdle;
                    }
                }
            }
        }
        // hyper's end of the stream is dropped here, which hands the stream back.
    };
    let Ok(Returned { mut io, held }) = returned.await else {
        return;
    };
    match outcome {
        Outcome::Stopped | Outcome::ClosedIdle => {}
        Outcome::Finished(result) => {
            if !held.is_empty() {
                let answer = match &result {
                    Err(err) if is_parse_error(&**err) => json_version(&held).unwrap_or(held),
                    _ => held,
                };
                let written = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
                    io.write_all(&answer).await?;
                    io.flush().await
                })
                .await;
                if !matches!(written, Ok(Ok(()))) {
                    return;
                }
            }
            if let Err(err) = &result {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            // After a header-read timeout the last response was long complete: the client is the slow one, and
            // lingering would only give a slowloris more time.
            if state.wrote() && !result.as_ref().is_err_and(|err| is_timeout(&**err)) {
                linger(io, limits, &mut draining).await;
            }
        }
    }
}

/// Whether hyper gave up on a request head it could not parse (and answered it itself).
fn is_parse_error(err: &(dyn StdError + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(err) = err.downcast_ref::<hyper::Error>() {
            return err.is_parse() || err.is_parse_too_large() || err.is_parse_status();
        }
        source = err.source();
    }
    false
}

fn is_timeout(err: &(dyn StdError + 'static)) -> bool {
    err.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
}

/// hyper's bodiless error head as a JSON error response with the same status.
fn json_version(head: &[u8]) -> Option<Vec<u8>> {
    let status: StatusCode = bodiless_error_status(head)?;
    Some(error_response(status, protocol_error(status), None))
}

/// Resolves once the connection has had no request in flight for `timeout`.
async fn idle_for(state: &ConnState, timeout: Duration) {
    loop {
        let idle = state.idle_for();
        if state.in_flight() == 0 && idle >= timeout {
            return;
        }
        tokio::time::sleep(timeout.saturating_sub(idle).max(DRAIN_CHECK)).await;
    }
}

/// Shuts the write side, then reads and discards what the client still sends — up to the limits, or until it
/// closes — before closing: closing with unread data makes the kernel reset the connection, and a client that
/// sends its whole body before reading would lose the response.
pub(crate) async fn linger<IO>(mut io: IO, limits: &Limits, draining: &mut Draining)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    if io.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut drained: u64 = 0;
        while drained < limits.linger_bytes {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(read) => drained += read as u64,
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(limits.linger_time, drain) => {}
        () = async {
            draining.reached(Phase::Draining).await;
            tokio::time::sleep(DRAIN_LINGER).await;
        } => {}
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
