//! The bulkhead service's response future.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use super::BulkheadPermit;
use crate::{BoxError, Error};

/// The wait for a permit when the call had to queue. `Semaphore::acquire_owned` is an
/// `async fn` whose future cannot be named, so it is boxed; this happens only on the
/// queued (slow) path, where the call is about to wait anyway.
pub(crate) type AcquireFuture =
    Pin<Box<dyn Future<Output = Result<BulkheadPermit, Error<Infallible>>> + Send>>;

pin_project! {
    /// The response future of [`BulkheadService`](super::BulkheadService).
    ///
    /// Holds the bulkhead permit until the inner future completes (or this future is
    /// dropped). For a queued call it owns the readied inner service and the request
    /// until a permit is granted, then calls the service.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future, S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, Req> {
        Running {
            #[pin]
            fut: F,
            permit: Option<BulkheadPermit>,
        },
        Queued {
            acquire: AcquireFuture,
            service: Option<S>,
            request: Option<Req>,
        },
        Rejected,
    }
}

impl<S, Req> ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    pub(crate) fn running(fut: S::Future, permit: BulkheadPermit) -> Self {
        ResponseFuture {
            state: State::Running {
                fut,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn queued(acquire: AcquireFuture, service: S, request: Req) -> Self {
        ResponseFuture {
            state: State::Queued {
                acquire,
                service: Some(service),
                request: Some(request),
            },
        }
    }

    pub(crate) fn rejected() -> Self {
        ResponseFuture {
            state: State::Rejected,
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Running { fut, permit } => {
                    let out = ready!(fut.poll(cx));
                    // Free the slot as soon as the inner call is done.
                    permit.take();
                    return Poll::Ready(out.map_err(Into::into));
                }
                StateProj::Queued {
                    acquire,
                    service,
                    request,
                } => {
                    let permit = match ready!(acquire.as_mut().poll(cx)) {
                        Ok(p) => p,
                        Err(e) => {
                            this.state.set(State::Rejected);
                            let e: Error = super::never(e);
                            return Poll::Ready(Err(Box::new(e)));
                        }
                    };
                    let (Some(mut svc), Some(req)) = (service.take(), request.take()) else {
                        // Only reachable if polled after a panic in `call` below.
                        return Poll::Ready(Err(Box::new(Error::<BoxError>::BulkheadFull)));
                    };
                    // The service was readied by the caller's `poll_ready` before it was
                    // moved here (see `BulkheadService::call`), so it may be called.
                    let fut = svc.call(req);
                    this.state.set(State::Running {
                        fut,
                        permit: Some(permit),
                    });
                }
                StateProj::Rejected => {
                    return Poll::Ready(Err(Box::new(Error::<BoxError>::BulkheadFull)));
                }
            }
        }
    }
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Running { .. } => "running",
            State::Queued { .. } => "queued",
            State::Rejected => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
