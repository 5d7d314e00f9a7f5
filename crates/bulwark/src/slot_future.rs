//! The response future of the tower services that take a slot before calling the inner service:
//! [`BulkheadService`](crate::bulkhead::BulkheadService) (a bulkhead permit) and
//! [`ShedService`](crate::shed::ShedService) (a shedder's slot).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::bulkhead::BulkheadPermit;
use crate::{BoxError, Error};

/// The wait for a slot when the call had to queue. The policies' `acquire` methods are
/// `async fn`s whose futures cannot be named, so it is boxed; this happens only on the
/// queued (slow) path, where the call is about to wait anyway.
pub(crate) type AcquireFuture<P> =
    Pin<Box<dyn Future<Output = Result<P, Error<Infallible>>> + Send>>;

pin_project! {
    /// The response future of [`BulkheadService`](crate::bulkhead::BulkheadService) and
    /// [`ShedService`](crate::shed::ShedService); `P` is the slot they hold.
    ///
    /// Holds the slot until the inner future completes (or this future is dropped). For a
    /// queued call it owns the readied inner service and the request until a slot is
    /// granted, then calls the service.
    pub struct ResponseFuture<S, Req, P = BulkheadPermit>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future, S, Req, P>,
        // The policy's own refusal (`BulkheadFull`, `Shed`).
        refused: fn() -> Error,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, Req, P> {
        Running {
            #[pin]
            fut: F,
            permit: Option<P>,
        },
        Queued {
            acquire: AcquireFuture<P>,
            service: Option<S>,
            request: Option<Req>,
        },
        Rejected,
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    pub(crate) fn running(fut: S::Future, permit: P, refused: fn() -> Error) -> Self {
        ResponseFuture {
            state: State::Running {
                fut,
                permit: Some(permit),
            },
            refused,
        }
    }

    pub(crate) fn queued(
        acquire: AcquireFuture<P>,
        service: S,
        request: Req,
        refused: fn() -> Error,
    ) -> Self {
        ResponseFuture {
            state: State::Queued {
                acquire,
                service: Some(service),
                request: Some(request),
            },
            refused,
        }
    }

    pub(crate) fn rejected(refused: fn() -> Error) -> Self {
        ResponseFuture {
            state: State::Rejected,
            refused,
        }
    }
}

impl<S, Req, P> Future for ResponseFuture<S, Req, P>
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
                            let e: Error = crate::bulkhead::never(e);
                            return Poll::Ready(Err(Box::new(e)));
                        }
                    };
                    let (Some(mut svc), Some(req)) = (service.take(), request.take()) else {
                        // Only reachable if polled after a panic in `call` below.
                        return Poll::Ready(Err(Box::new((this.refused)())));
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
                    return Poll::Ready(Err(Box::new((this.refused)())));
                }
            }
        }
    }
}

impl<S, Req, P> fmt::Debug for ResponseFuture<S, Req, P>
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
