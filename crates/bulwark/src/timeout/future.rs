//! The response future of [`TimeoutService`](super::TimeoutService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Sleep};

use super::{Deadline, Scoped, Timeout};
use crate::{BoxError, Error};

pin_project! {
    /// The response of a [`TimeoutService`](super::TimeoutService): the inner
    /// response, or a boxed [`Error::Timeout`] when the deadline passes first.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Scoped<F>,
        #[pin]
        sleep: Sleep,
        timeout: Timeout,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: Scoped<F>, deadline: Deadline, timeout: Timeout) -> Self {
        ResponseFuture {
            inner,
            sleep: sleep_until(deadline.instant()),
            timeout,
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
        let this = self.project();
        // The inner future first: a response that is ready at the deadline wins.
        if let Poll::Ready(r) = this.inner.poll(cx) {
            return Poll::Ready(r.map_err(Into::into));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => {
                this.timeout.fired();
                Poll::Ready(Err(Box::new(Error::<BoxError>::Timeout)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
