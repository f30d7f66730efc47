//! The boxed future object-safe async traits return.
//!
//! Its own module because the driver contract (`driver`), the provider contract (`provider`) and crates outside
//! core (the bridge's nonce store, output sinks) all return it, and none of them should have to import another's
//! contract to name it.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future: the return type of the async methods of object-safe traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
