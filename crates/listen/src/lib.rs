//! berth's HTTP listeners, shared by the API and the callback bridge: one accept loop and one way to serve a
//! connection, whatever the service.
//!
//! What every connection gets:
//! - the protocol sniffed (HTTP/1.1, or HTTP/2 from its preface) under the header-read timeout, which then bounds
//!   each request head and the idle time between requests ([`Limits::header_read_timeout`]);
//! - a bound on connections served at once, past which a client is answered `503 too_many_connections` (JSON,
//!   `Connection: close`) instead of being left waiting ([`Limits::max_connections`]);
//! - on shutdown, idle connections closed at once and requests in flight given the grace period
//!   ([`Listener::shutdown`]);
//! - hyper's own answers to request heads it cannot parse (`400`, `414`, `431`, which hyper writes without a body)
//!   replaced by the same status with the JSON error body (`io` explains how);
//! - a lingering close: the write side shut first, then what the client still sends read and discarded (bounded),
//!   so a client that sends its whole body before reading still reads a refusal instead of a reset.

mod accept;
mod connection;
mod io;
mod limits;
mod phase;
mod response;
mod service;

pub use accept::{Listener, bind_tcp};
pub use connection::serve_connection;
pub use limits::Limits;
pub use phase::Draining;

#[cfg(test)]
mod tests;
