//! `tower` integration: [`RateLimitLayer`] and [`RateLimitService`].

use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{RateLimiter, ResponseFuture};
use crate::BoxError;

/// Applies a [`RateLimiter`] to a service; every service the layer builds shares it.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: RateLimiter,
}

impl RateLimitLayer {
    /// A layer sharing `limiter` among every service it wraps.
    pub fn new(limiter: RateLimiter) -> Self {
        RateLimitLayer { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService::new(inner, self.limiter.clone())
    }
}

/// A service whose calls must conform to a [`RateLimiter`].
///
/// `poll_ready` only forwards to the inner service; the cell is taken in `call`,
/// and a non-conforming call fails at once with a boxed
/// [`Error::RateLimited`](crate::Error::RateLimited) carrying the exact `retry_after`.
/// Unlike `tower::limit::RateLimit`, it rejects rather than waits: a gateway must
/// answer 429 with `Retry-After`, not hold the connection, and taking a cell in
/// `poll_ready` would spend quota on readiness probes that never become requests.
#[derive(Clone, Debug)]
pub struct RateLimitService<S> {
    inner: S,
    limiter: RateLimiter,
}

impl<S> RateLimitService<S> {
    /// Wraps `inner` with `limiter`.
    pub fn new(inner: S, limiter: RateLimiter) -> Self {
        RateLimitService { inner, limiter }
    }

    /// The limiter.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req> Service<Req> for RateLimitService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.limiter.check() {
            Ok(()) => ResponseFuture::called(self.inner.call(req)),
            Err(e) => ResponseFuture::rejected(e.retry_after().unwrap_or_default()),
        }
    }
}
