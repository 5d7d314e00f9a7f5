//! The response future of [`FallbackService`](super::FallbackService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::{Fallback, Trigger};
use crate::{BoxError, Error};

pin_project! {
    /// Runs the inner service's future, then, on an error that triggers, the
    /// fallback function's future.
    pub struct ResponseFuture<Fut, P, F, AFut> {
        #[pin]
        state: State<Fut, AFut>,
        fallback: Fallback<P>,
        f: Arc<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<Fut, AFut> {
        Primary { #[pin] fut: Fut },
        Alternative { #[pin] fut: AFut },
    }
}

impl<Fut, P, F, AFut> ResponseFuture<Fut, P, F, AFut> {
    pub(super) fn new(fut: Fut, fallback: Fallback<P>, f: Arc<F>) -> Self {
        ResponseFuture {
            state: State::Primary { fut },
            fallback,
            f,
        }
    }
}

impl<Fut, P, F, AFut> fmt::Debug for ResponseFuture<Fut, P, F, AFut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Primary { .. } => "primary",
            State::Alternative { .. } => "alternative",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<Fut, T, E, P, F, AFut> Future for ResponseFuture<Fut, P, F, AFut>
where
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    P: Trigger<BoxError>,
    F: Fn(Error) -> AFut,
    AFut: Future<Output = Result<T, BoxError>>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Primary { fut } => {
                    let boxed: BoxError = match ready!(fut.poll(cx)) {
                        Ok(v) => return Poll::Ready(Ok(v)),
                        Err(e) => e.into(),
                    };
                    // A policy rejection from further in arrives as a boxed
                    // `bulwark::Error`; anything else is the service's own error.
                    let (err, was_policy) = match boxed.downcast::<Error>() {
                        Ok(policy) => (*policy, true),
                        Err(other) => (Error::Inner(other), false),
                    };
                    if !this.fallback.triggers(&err) {
                        // Hand the error on exactly as it came.
                        return Poll::Ready(Err(match err {
                            Error::Inner(e) if !was_policy => e,
                            other => Box::new(other),
                        }));
                    }
                    this.fallback.emit(err.kind());
                    let fut = (this.f)(err);
                    this.state.set(State::Alternative { fut });
                }
                StateProj::Alternative { fut } => return fut.poll(cx),
            }
        }
    }
}
