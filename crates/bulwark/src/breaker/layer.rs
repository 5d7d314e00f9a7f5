//! The breaker as `tower` middleware.

use std::task::{Context, Poll};
use std::time::Duration;

use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::CircuitBreaker;
use crate::classify::AnyError;
use crate::{BoxError, Classify};

/// Wraps services in a [`CircuitBreaker`]; every service it makes shares the
/// breaker's state.
///
/// ```
/// use bulwark::breaker::{CircuitBreaker, CircuitBreakerLayer};
/// use bulwark::Outcome;
///
/// let breaker = CircuitBreaker::builder().name("users-db").build().unwrap();
/// // Count a response of 500 or more as a failure, an error as a failure.
/// let layer = CircuitBreakerLayer::new(breaker).classifier(
///     |r: &Result<u16, std::io::Error>| match r {
///         Ok(status) if *status >= 500 => Outcome::Failure,
///         Ok(_) => Outcome::Success,
///         Err(_) => Outcome::Failure,
///     },
/// );
/// # let _ = layer;
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = AnyError> {
    breaker: CircuitBreaker,
    classify: C,
}

impl CircuitBreakerLayer {
    /// A layer over `breaker`, counting every inner `Err` as a failure.
    pub fn new(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer {
            breaker,
            classify: AnyError,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Uses `classify` to decide what each `Result<S::Response, S::Error>` counts
    /// as. It is cloned into every response future, so keep it small (a closure
    /// without captures, or one holding an `Arc`).
    pub fn classifier<C2>(self, classify: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classify,
        }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// A service behind a [`CircuitBreaker`], made by [`CircuitBreakerLayer`].
///
/// (Named `...Service` rather than the usual `Foo<S>` because `CircuitBreaker` is
/// already the breaker itself.)
///
/// The breaker decides in `call`, not in `poll_ready`: readiness stays about the
/// inner service's capacity, and an open breaker fails each request fast with a
/// boxed [`bulwark::Error::CircuitOpen`](crate::Error::CircuitOpen), found with
/// `err.downcast_ref::<bulwark::Error>()`. Inner errors pass through unchanged
/// (boxed).
#[derive(Debug, Clone)]
pub struct CircuitBreakerService<S, C = AnyError> {
    inner: S,
    breaker: CircuitBreaker,
    classify: C,
}

impl<S, C> CircuitBreakerService<S, C> {
    /// The breaker this service reports to.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes `self`, returning the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, Req> Service<Req> for CircuitBreakerService<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.try_acquire() {
            Ok(permit) => {
                ResponseFuture::active(self.inner.call(req), permit, self.classify.clone())
            }
            Err(crate::Error::CircuitOpen { name, retry_after }) => {
                ResponseFuture::rejected(name, retry_after)
            }
            // `try_acquire` only ever rejects with `CircuitOpen`; keep the name so
            // a future variant would still surface as a breaker rejection.
            Err(_) => ResponseFuture::rejected(self.breaker.inner_name(), Duration::ZERO),
        }
    }
}
