//! `tower` integration: [`RetryLayer`] and [`RetryService`].

use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{ResponseFuture, Retry};
use crate::classify::AnyError;
use crate::{BoxError, Classify};

/// Retries requests of the wrapped service with a [`Retry`] policy.
///
/// Requests must be `Clone` (each attempt sends a clone; the last allowed attempt
/// sends the original) and the inner service must be `Clone`. The classifier sees
/// `Result<S::Response, S::Error>`; the default, [`AnyError`], retries every error.
///
/// ```
/// use std::convert::Infallible;
/// use bulwark::retry::{Retry, RetryLayer};
/// use bulwark::Outcome;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = RetryLayer::new(Retry::builder().max_attempts(2).build().unwrap())
///     // Retry 5xx responses, which arrive as `Ok`.
///     .classifier(|r: &Result<u16, Infallible>| match r {
///         Ok(status) if *status >= 500 => Outcome::Failure,
///         _ => Outcome::Success,
///     })
///     .layer(service_fn(|()| async { Ok::<u16, Infallible>(200) }));
/// assert_eq!(svc.oneshot(()).await.unwrap(), 200);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RetryLayer<C = AnyError> {
    retry: Retry,
    classify: C,
}

impl RetryLayer {
    /// A layer retrying every error with `retry`.
    pub fn new(retry: Retry) -> Self {
        RetryLayer {
            retry,
            classify: AnyError,
        }
    }
}

impl<C> RetryLayer<C> {
    /// Uses `classify` to decide which results are retried. It is cloned into every
    /// response future, so keep it cheap to clone (a closure over an `Arc`, say).
    pub fn classifier<C2>(self, classify: C2) -> RetryLayer<C2> {
        RetryLayer {
            retry: self.retry,
            classify,
        }
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = RetryService<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            retry: self.retry.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// A service that retries failed requests. See [`RetryLayer`].
///
/// Readiness follows `tower`'s rule: `call` moves the service that `poll_ready`
/// readied into the response future (leaving a fresh clone behind), and before every
/// retry the future polls that service ready again. An un-readied clone is never
/// called.
#[derive(Debug, Clone)]
pub struct RetryService<S, C = AnyError> {
    inner: S,
    retry: Retry,
    classify: C,
}

impl<S> RetryService<S> {
    /// Wraps `inner`, retrying every error.
    pub fn new(inner: S, retry: Retry) -> Self {
        RetryService {
            inner,
            retry,
            classify: AnyError,
        }
    }
}

impl<S, C> RetryService<S, C> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, C, Req> Service<Req> for RetryService<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
    Req: Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fresh = self.inner.clone();
        let readied = std::mem::replace(&mut self.inner, fresh);
        ResponseFuture::new(readied, req, self.retry.clone(), self.classify.clone())
    }
}
