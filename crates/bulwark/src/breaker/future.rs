//! The breaker service's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use super::Permit;
use crate::{BoxError, Classify, Error};

pin_project! {
    /// The response future of [`CircuitBreakerService`](super::CircuitBreakerService):
    /// runs the inner future and reports its classified result on the permit, or
    /// yields the breaker's rejection. Dropping it before completion records
    /// nothing and frees a half-open probe slot.
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        Active {
            #[pin]
            fut: F,
            permit: Option<Permit>,
            classify: C,
        },
        Rejected {
            name: Arc<str>,
            retry_after: Duration,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn active(fut: F, permit: Permit, classify: C) -> Self {
        ResponseFuture {
            state: State::Active {
                fut,
                permit: Some(permit),
                classify,
            },
        }
    }

    pub(crate) fn rejected(name: Arc<str>, retry_after: Duration) -> Self {
        ResponseFuture {
            state: State::Rejected { name, retry_after },
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Active {
                fut,
                permit,
                classify,
            } => {
                let result = ready!(fut.poll(cx));
                let outcome = classify.classify(&result);
                let result = result.map_err(Into::into);
                if let Some(permit) = permit.take() {
                    // A local refusal by a bulwark layer inside (rate limiter, bulkhead, shedder,
                    // another breaker) sent nothing: the permit is dropped unrecorded, as the
                    // pipeline does, so local back-pressure never trips the breaker.
                    if !result.as_ref().err().is_some_and(is_local_refusal) {
                        permit.record(outcome);
                    }
                }
                Poll::Ready(result)
            }
            // The rejection allocates once: `BoxError` is what tower services return.
            StateProj::Rejected { name, retry_after } => {
                Poll::Ready(Err(Box::new(Error::<BoxError>::CircuitOpen {
                    name: name.clone(),
                    retry_after: *retry_after,
                })))
            }
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Active { .. } => "active",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// Whether `e` is a bulwark layer's refusal of a call it never passed on.
fn is_local_refusal(e: &BoxError) -> bool {
    e.downcast_ref::<Error>()
        .is_some_and(Error::is_local_refusal)
}
