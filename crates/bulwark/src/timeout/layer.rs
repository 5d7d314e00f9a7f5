//! `tower` integration: [`TimeoutLayer`] and [`TimeoutService`].

use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{Deadline, ResponseFuture, Timeout};
use crate::BoxError;

/// Applies a [`Timeout`] to every request of the wrapped service.
///
/// ```
/// use std::time::Duration;
/// use bulwark::timeout::{Timeout, TimeoutLayer};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # tokio::time::pause();
/// let svc = TimeoutLayer::new(Timeout::attempt(Duration::from_millis(100))).layer(service_fn(
///     |()| async {
///         tokio::time::sleep(Duration::from_secs(1)).await;
///         Ok::<_, std::convert::Infallible>(())
///     },
/// ));
/// let err = svc.oneshot(()).await.unwrap_err();
/// assert!(matches!(err.downcast_ref::<bulwark::Error>(), Some(bulwark::Error::Timeout)));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TimeoutLayer {
    timeout: Timeout,
}

impl TimeoutLayer {
    /// A layer applying `timeout`.
    pub fn new(timeout: Timeout) -> Self {
        TimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;
    fn layer(&self, inner: S) -> TimeoutService<S> {
        TimeoutService {
            inner,
            timeout: self.timeout.clone(),
        }
    }
}

/// A service whose calls are bounded by a [`Timeout`].
///
/// The deadline is in scope both while the inner service's `call` runs (so a
/// nested service can read it synchronously) and while its future is polled. When
/// the timeout fires the error is a boxed [`bulwark::Error::Timeout`](crate::Error);
/// the inner service's own errors pass through unchanged. Readiness is the inner
/// service's: the timeout bounds the response, not the wait for capacity.
#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    timeout: Timeout,
}

impl<S> TimeoutService<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, timeout: Timeout) -> Self {
        TimeoutService { inner, timeout }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req> Service<Req> for TimeoutService<S>
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
        let deadline = Deadline::after(self.timeout.duration());
        let inner = &mut self.inner;
        let fut = Deadline::sync_scope(deadline, || inner.call(req));
        ResponseFuture::new(
            Deadline::scope(deadline, fut),
            deadline,
            self.timeout.clone(),
        )
    }
}
