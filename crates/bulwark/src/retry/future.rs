//! The response future of [`RetryService`](super::RetryService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{sleep, Sleep};
use tower_service::Service;

use super::{Attempts, Next, Retry};
use crate::{BoxError, Classify, Error};

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // An attempt is in flight.
        Calling { #[pin] fut: F },
        // Sleeping the backoff before the next attempt.
        Sleeping { #[pin] sleep: Sleep },
        // Waiting for the service to be ready for the next attempt.
        Readying,
        // The deadline in scope had passed before the first attempt.
        Expired,
    }
}

pin_project! {
    /// The response of a [`RetryService`](super::RetryService): the last attempt's
    /// result, the inner error boxed unchanged; a boxed
    /// [`bulwark::Error::Timeout`](crate::Error) only if the deadline in scope had
    /// passed before the first attempt.
    pub struct ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        service: S,
        req: Option<Req>,
        classify: C,
        attempts: Option<Attempts>,
        max_attempts: u32,
        // The failed result a retry is waiting to replace: returned instead if the
        // limit passes while the service is getting ready.
        last: Option<Result<S::Response, S::Error>>,
    }
}

impl<S, Req, C> ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    Req: Clone,
{
    pub(super) fn new(mut service: S, req: Req, retry: Retry, classify: C) -> Self {
        let max_attempts = retry.max_attempts();
        let mut req = Some(req);
        let (state, attempts) = match Attempts::start(retry) {
            None => (State::Expired, None),
            Some(mut attempts) => {
                attempts.begin();
                // `service` was readied by the caller's `poll_ready`.
                match take_or_clone(&mut req, attempts.attempts() >= max_attempts) {
                    Some(r) => (
                        State::Calling {
                            fut: service.call(r),
                        },
                        Some(attempts),
                    ),
                    // `req` was just set: unreachable, but harmless.
                    None => (State::Expired, None),
                }
            }
        };
        ResponseFuture {
            state,
            service,
            req,
            classify,
            attempts,
            max_attempts,
            last: None,
        }
    }
}

/// The request for the next attempt: the original for the last allowed attempt, a
/// clone otherwise.
fn take_or_clone<Req: Clone>(req: &mut Option<Req>, last: bool) -> Option<Req> {
    if last {
        req.take()
    } else {
        req.clone()
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
    Req: Clone,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let Some(attempts) = this.attempts.as_mut() else {
                return Poll::Ready(Err(Box::new(Error::<BoxError>::Timeout)));
            };
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    match attempts.decide(this.classify.classify(&result)) {
                        Next::Return(_) => return Poll::Ready(result.map_err(Into::into)),
                        Next::RetryAfter(delay) if delay.is_zero() => {
                            *this.last = Some(result);
                            this.state.set(State::Readying);
                        }
                        Next::RetryAfter(delay) => {
                            *this.last = Some(result);
                            this.state.set(State::Sleeping {
                                sleep: sleep(delay),
                            });
                        }
                    }
                }
                StateProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    if let Err(e) = ready!(this.service.poll_ready(cx)) {
                        return Poll::Ready(Err(e.into()));
                    }
                    // Readiness can take arbitrarily long (a bulkhead queue, a
                    // `Buffer`): no attempt starts past the limit, as promised.
                    if attempts.past_limit() {
                        if let Some(last) = this.last.take() {
                            attempts.give_up();
                            return Poll::Ready(last.map_err(Into::into));
                        }
                    }
                    *this.last = None;
                    attempts.begin();
                    let last = attempts.attempts() >= *this.max_attempts;
                    let Some(req) = take_or_clone(this.req, last) else {
                        // Only the last attempt takes the request; there is none after it.
                        return Poll::Ready(Err("retry: request already used".into()));
                    };
                    let fut = this.service.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Expired => {
                    return Poll::Ready(Err(Box::new(Error::<BoxError>::Timeout)));
                }
            }
        }
    }
}

impl<S, Req, C> fmt::Debug for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}
