//! `tower` integration: [`ShedLayer`] and [`ShedService`].

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::{Priority, ShedPermit, Shedder};
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
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(permit) = self.shedder.try_acquire() {
            return ResponseFuture {
                state: State::Running {
                    fut: self.inner.call(req),
                    permit: Some(permit),
                },
            };
        }
        let priority = (self.priority)(&req);
        let shedder = self.shedder.clone();
        let acquire: Acquire = Box::pin(async move { shedder.acquire(priority).await });
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            state: State::Queued {
                acquire,
                service: Some(ready),
                request: Some(req),
            },
        }
    }
}

/// The wait for a slot (only on the queued path, where the call waits anyway).
type Acquire = Pin<Box<dyn Future<Output = Result<ShedPermit, Error<Infallible>>> + Send>>;

pin_project! {
    /// The response future of [`ShedService`]: holds the slot until the inner call ends.
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
            permit: Option<ShedPermit>,
        },
        Queued {
            acquire: Acquire,
            service: Option<S>,
            request: Option<Req>,
        },
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
                    permit.take();
                    return Poll::Ready(out.map_err(Into::into));
                }
                StateProj::Queued {
                    acquire,
                    service,
                    request,
                } => {
                    let shed = || -> BoxError { Box::new(Error::<BoxError>::Shed) };
                    let Ok(permit) = ready!(acquire.as_mut().poll(cx)) else {
                        return Poll::Ready(Err(shed()));
                    };
                    let (Some(mut svc), Some(req)) = (service.take(), request.take()) else {
                        return Poll::Ready(Err(shed()));
                    };
                    // Readied by the caller's `poll_ready` before it was moved here.
                    let fut = svc.call(req);
                    this.state.set(State::Running {
                        fut,
                        permit: Some(permit),
                    });
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
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
