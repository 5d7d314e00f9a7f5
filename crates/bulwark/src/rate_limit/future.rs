//! The rate-limit service's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use crate::{BoxError, Error};

pin_project! {
    /// The response future of [`RateLimitService`](super::RateLimitService): the inner
    /// service's future, or an immediate [`Error::RateLimited`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            fut: F,
        },
        Rejected {
            retry_after: Duration,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(fut: F) -> Self {
        ResponseFuture {
            state: State::Called { fut },
        }
    }

    pub(crate) fn rejected(retry_after: Duration) -> Self {
        ResponseFuture {
            state: State::Rejected { retry_after },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut } => fut.poll(cx).map_err(Into::into),
            StateProj::Rejected { retry_after } => {
                Poll::Ready(Err(Box::new(Error::<BoxError>::RateLimited {
                    retry_after: *retry_after,
                })))
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            State::Called { .. } => f.write_str("ResponseFuture::Called"),
            State::Rejected { retry_after } => f
                .debug_struct("ResponseFuture::Rejected")
                .field("retry_after", retry_after)
                .finish(),
        }
    }
}
