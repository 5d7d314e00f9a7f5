//! `tower` integration: [`ShedLayer`] and [`ShedService`].

use std::fmt;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{Entry, Priority, ShedPermit, Shedder};
pub use crate::slot_future::ResponseFuture;
use crate::{BoxError, Error};

/// Applies a [`Shedder`] to a service; `priority` tells each request's [`Priority`]
/// (from a header, a route, a tenant...).
///
/// Every service built by one layer shares the layer's shedder.
#[derive(Clone)]
pub struct ShedLayer<P> {
    shedder: Shedder,
    priority: P,
}

impl<P> ShedLayer<P> {
    /// A layer sharing `shedder`, ranking requests with `priority`.
    pub fn new(shedder: Shedder, priority: P) -> Self {
        ShedLayer { shedder, priority }
    }
}

impl<P> fmt::Debug for ShedLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShedLayer")
            .field("shedder", &self.shedder)
            .finish_non_exhaustive()
    }
}

impl<S, P: Clone> Layer<S> for ShedLayer<P> {
    type Service = ShedService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        ShedService {
            inner,
            shedder: self.shedder.clone(),
            priority: self.priority.clone(),
        }
    }
}

/// A service whose calls go through a [`Shedder`].
///
/// As with [`BulkheadService`](crate::bulkhead::BulkheadService), `poll_ready` only
/// forwards to the inner service and the slot is taken in `call`: a shed request is the
/// response future's error (a boxed [`Error::Shed`]), never a `poll_ready` error. When a
/// slot is free the inner service is called at once; otherwise the readied inner service
/// and the request wait in the response future (hence `S: Clone`).
#[derive(Clone)]
pub struct ShedService<S, P> {
    inner: S,
    shedder: Shedder,
    priority: P,
}

impl<S: fmt::Debug, P> fmt::Debug for ShedService<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShedService")
            .field("inner", &self.inner)
            .field("shedder", &self.shedder)
            .finish_non_exhaustive()
    }
}

impl<S, P, Req> Service<Req> for ShedService<S, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Fn(&Req) -> Priority,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, ShedPermit>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The place in the queue is taken here, in arrival order (and by priority), not when the
        // response future is first polled: a later call cannot take a slot ahead of it.
        let priority = (self.priority)(&req);
        // The deadline in scope where the call is made (a `TimeoutLayer` outside this one
        // puts its own there): a queued call waits no later than that.
        let deadline = crate::timeout::Deadline::current().map(|d| d.instant());
        match self.shedder.enqueue(priority, deadline) {
            Ok(Entry::Granted(permit)) => {
                ResponseFuture::running(self.inner.call(req), permit, shed)
            }
            Ok(Entry::Waiting(w)) => {
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::queued(Box::pin(w.wait()), ready, req, shed)
            }
            Err(_) => ResponseFuture::rejected(shed),
        }
    }
}

/// The shedder's own refusal.
fn shed() -> Error {
    Error::Shed
}
