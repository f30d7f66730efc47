//! What a listener allows each client: how long it may take, how many connections, how much is read after the end.

use std::time::Duration;

/// A listener's limits. [`Limits::default`] is what berth serves with; tests shorten the durations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a client may take to send a request head: the first from when the connection is accepted (the
    /// protocol sniff included), each later one from when the previous response was written. So it is also HTTP/1's
    /// keep-alive idle timeout, and it cuts a slowloris that trickles its head. An HTTP/2 connection with no request
    /// in flight for this long is closed too.
    pub header_read_timeout: Duration,
    /// Connections served at once. Past it, a connection is answered `503 too_many_connections` and closed.
    pub max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 keep-alive pings, so a peer that vanished without closing is noticed.
    pub h2_keep_alive_interval: Duration,
    pub h2_keep_alive_timeout: Duration,
    /// Lingering close: after the last response the write side is shut, then what the client still sends (the rest
    /// of a body that was refused unread) is read and discarded for up to this long, or up to `linger_bytes`,
    /// before the socket closes. Closing with unread data would reset the connection and could destroy the
    /// response before the client reads it.
    pub linger_time: Duration,
    pub linger_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            h2_max_concurrent_streams: 200,
            h2_keep_alive_interval: Duration::from_secs(30),
            h2_keep_alive_timeout: Duration::from_secs(10),
            linger_time: Duration::from_secs(5),
            linger_bytes: 64 * 1024 * 1024,
        }
    }
}
