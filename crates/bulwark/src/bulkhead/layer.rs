//! `tower` integration: [`BulkheadLayer`] and [`BulkheadService`].

use std::future::Future;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{Bulkhead, BulkheadPermit, ResponseFuture};
use crate::{BoxError, Error};

/// Applies a [`Bulkhead`] to a service.
///
/// Every service built by one layer shares the layer's bulkhead (clone the layer
/// with a new bulkhead for separate limits).
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// A layer sharing `bulkhead` among every service it wraps.
    pub fn new(bulkhead: Bulkhead) -> Self {
        BulkheadLayer { bulkhead }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService::new(inner, self.bulkhead.clone())
    }
}

/// A service whose calls go through a [`Bulkhead`].
///
/// # `poll_ready` and where the permit is taken
///
/// `poll_ready` only forwards to the inner service; the permit is taken in `call`,
/// and a rejection is the response future's error (a boxed
/// [`Error::BulkheadFull`](crate::Error::BulkheadFull)), never a `poll_ready` error.
///
/// Taking the permit in `poll_ready` (as `tower::limit::ConcurrencyLimit` does) would
/// hold a slot for a request that may never come: balancers and `Buffer` ready
/// services speculatively, so idle clones would pin permits the bulkhead means for
/// real calls. It would also turn rejection into back-pressure (`Pending` forever),
/// where a bulkhead must answer "full" in bounded time; and a `poll_ready` error
/// means "this service is dead" to tower, which a full bulkhead is not.
///
/// In `call`: when a permit is free the inner service is called at once (no
/// allocation). When none is and the queue has room, the readied inner service is
/// moved into the response future (a clone takes its place here and will be readied
/// by the next `poll_ready`), the future waits for a permit, then calls it. Hence
/// `S: Clone`, which is cloned only on the queued path.
#[derive(Clone, Debug)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

impl<S> BulkheadService<S> {
    /// Wraps `inner` with `bulkhead`.
    pub fn new(inner: S, bulkhead: Bulkhead) -> Self {
        BulkheadService { inner, bulkhead }
    }

    /// The bulkhead, for its stats.
    pub fn bulkhead(&self) -> &Bulkhead {
        &self.bulkhead
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req> Service<Req> for BulkheadService<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, BulkheadPermit>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // Waiting is first come, first served. Inside a runtime, a request this service queued
        // is the semaphore's waiter from its call (polled once below), and a freed permit goes
        // to waiters first: trying for a free one never overtakes it (and a permit already
        // handed to a waiter that has not run yet is not free). Outside one
        // (`block_on(svc.call(req))`), a queued request waits from its first poll, so no call
        // goes past it while any is queued.
        let in_runtime = tokio::runtime::Handle::try_current().is_ok();
        if in_runtime || self.bulkhead.queued() == 0 {
            if let Some(permit) = self.bulkhead.try_acquire() {
                return ResponseFuture::running(self.inner.call(req), permit, full);
            }
        }
        // The queue slot is taken here, in arrival order, not when the response
        // future is first polled.
        let Some(slot) = self.bulkhead.enter_queue_owned() else {
            // The queue is full, but a permit may be free (outside a runtime, behind queued
            // requests not polled yet): refused only with no permit and no queue slot.
            if let Some(permit) = self.bulkhead.try_acquire() {
                return ResponseFuture::running(self.inner.call(req), permit, full);
            }
            let _ = self.bulkhead.inner.reject();
            return ResponseFuture::rejected(full);
        };
        let mut acquire = Box::pin(Bulkhead::wait_queued(slot));
        // Polled once now, so that the request waits for the semaphore from its arrival: a slot
        // freed before its response future is first polled is its own, not a later caller's of
        // the plain `acquire` (waiting is FIFO). The real waker replaces this one at that poll.
        // Only inside a runtime (the wait's timer needs one): `block_on(svc.call(req))` calls
        // outside it, and then waits from the first poll, as before.
        let polled = if in_runtime {
            acquire
                .as_mut()
                .poll(&mut Context::from_waker(std::task::Waker::noop()))
        } else {
            Poll::Pending
        };
        match polled {
            Poll::Ready(Ok(permit)) => {
                return ResponseFuture::running(self.inner.call(req), permit, full)
            }
            // Rejected (and reported) by the wait.
            Poll::Ready(Err(_)) => return ResponseFuture::rejected(full),
            Poll::Pending => {}
        }
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::queued(acquire, ready, req, full)
    }
}

/// The bulkhead's own refusal.
fn full() -> Error {
    Error::BulkheadFull
}
