//! The response future of [`TimeoutService`](super::TimeoutService).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};

use super::{Deadline, Scoped, Timeout};
use crate::{BoxError, Error};

pin_project! {
    /// The response of a [`TimeoutService`](super::TimeoutService): the inner
    /// response, or a boxed [`Error::Timeout`] when the deadline passes first.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Scoped<F>,
        // Made at the first poll (a timer needs a runtime, and `call` may be made outside
        // one: `block_on(svc.call(req))`); the deadline is fixed at the call.
        #[pin]
        sleep: Option<Sleep>,
        deadline: Instant,
        timeout: Timeout,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: Scoped<F>, deadline: Deadline, timeout: Timeout) -> Self {
        ResponseFuture {
            inner,
            sleep: None,
            deadline: deadline.instant(),
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
        let mut this = self.project();
        // The inner future first: a response that is ready at the deadline wins.
        if let Poll::Ready(r) = this.inner.poll(cx) {
            return Poll::Ready(r.map_err(Into::into));
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(sleep_until(*this.deadline)));
        }
        let Some(sleep) = this.sleep.as_pin_mut() else {
            return Poll::Pending;
        };
        match sleep.poll(cx) {
            Poll::Ready(()) => {
                this.timeout.fired();
                Poll::Ready(Err(Box::new(Error::<BoxError>::Timeout)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
