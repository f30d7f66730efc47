//! The service as the listener runs it: each request counted in flight until its response body is done with, so
//! the connection knows when it is idle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::io::ConnState;

#[derive(Debug)]
pub(crate) struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, state: Arc<ConnState>) -> Self {
        Self { inner, state }
    }
}

/// One request in flight, from the service's call until its response body is dropped (hyper drops it once the
/// body is written, or the connection is gone).
#[derive(Debug)]
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: Arc<ConnState>) -> Self {
        state.request_started();
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = InFlight::start(Arc::clone(&self.state));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody {
                body: Box::pin(body),
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its request counted in flight.
#[derive(Debug)]
pub(crate) struct TrackedBody<B> {
    body: Pin<Box<B>>,
    _guard: InFlight,
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.get_mut().body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
