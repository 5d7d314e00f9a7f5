//! The response future of [`HedgeService`](super::HedgeService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower_service::Service;

use super::race::{MakeAttempt, Race};
use super::Shared;
use crate::classify::{Classify, Outcome};
use crate::BoxError;
use std::any::Any;

pin_project! {
    /// One attempt on a service: drive it to readiness, then call it.
    #[project = AttemptProj]
    pub(crate) enum Attempt<S, Req>
    where
        S: Service<Req>,
    {
        Readying { svc: S, req: Option<Req> },
        Calling { #[pin] fut: S::Future },
    }
}

impl<S, Req> Future for Attempt<S, Req>
where
    S: Service<Req>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                AttemptProj::Readying { svc, req } => {
                    ready!(svc.poll_ready(cx))?;
                    let Some(req) = req.take() else {
                        unreachable!("the request is taken only when the service is called")
                    };
                    let fut = svc.call(req);
                    self.set(Attempt::Calling { fut });
                }
                AttemptProj::Calling { fut } => return fut.poll(cx),
            }
        }
    }
}

/// Makes hedges: a clone of the service and of the request each.
pub(crate) struct MakeCall<S, Req> {
    svc: S,
    req: Req,
}

impl<S, Req> MakeAttempt for MakeCall<S, Req>
where
    S: Service<Req> + Clone,
    Req: Clone,
{
    type Future = Attempt<S, Req>;

    fn make(&mut self) -> Self::Future {
        Attempt::Readying {
            svc: self.svc.clone(),
            req: Some(self.req.clone()),
        }
    }
}

/// The race's view of a tower hedge's classifier: a bulwark layer's refusal inside an attempt
/// (an inner bulkhead, rate limiter, breaker or shedder: a boxed [`Error`](crate::Error), as
/// those layers answer) sent nothing, so it is no failure of the dependency, whatever the
/// classifier says ([`TowerClassifier`](crate::pipeline::TowerClassifier) calls a full bulkhead
/// a failure, for a retry's sake). A refused hedge then neither starts the next ones at once nor
/// replaces the dependency's own error, as in the pipeline's hedge stage.
#[derive(Debug, Clone)]
pub(crate) struct RefusalsIgnored<C>(C);

impl<T, E: 'static, C: Classify<T, E>> Classify<T, E> for RefusalsIgnored<C> {
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        if let Err(e) = result {
            let e: &dyn Any = e;
            let refused = match e.downcast_ref::<BoxError>() {
                Some(boxed) => boxed.downcast_ref::<crate::Error>(),
                None => e.downcast_ref::<crate::Error>(),
            };
            if refused.is_some_and(crate::Error::is_local_refusal) {
                return Outcome::Ignore;
            }
        }
        self.0.classify(result)
    }
}

pin_project! {
    /// The response future of a hedged service: the original attempt and its hedges,
    /// polled together.
    pub struct ResponseFuture<S, Req, C>
    where
        S: Service<Req>,
        S: Clone,
        Req: Clone,
    {
        #[pin]
        race: Race<MakeCall<S, Req>, RefusalsIgnored<C>, Result<S::Response, S::Error>>,
    }
}

impl<S, Req, C> ResponseFuture<S, Req, C>
where
    S: Service<Req> + Clone,
    S::Error: 'static,
    Req: Clone,
    C: Classify<S::Response, S::Error>,
{
    pub(super) fn new(
        first: S::Future,
        template: S,
        req: Req,
        classifier: C,
        shared: Arc<Shared>,
        delay: Duration,
    ) -> Self {
        ResponseFuture {
            race: Race::new(
                Attempt::Calling { fut: first },
                MakeCall { svc: template, req },
                RefusalsIgnored(classifier),
                shared,
                delay,
            ),
        }
    }
}

impl<S, Req, C> fmt::Debug for ResponseFuture<S, Req, C>
where
    S: Service<Req> + Clone,
    Req: Clone,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError> + 'static,
    Req: Clone,
    C: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().race.poll(cx).map_err(Into::into)
    }
}
