//! The `tower` form of [`Fallback`](super::Fallback).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::{Fallback, Trigger};
use crate::{BoxError, Error};

/// Wraps a service so that errors chosen by a [`Fallback`]'s trigger are answered by
/// `f(error)`, an async function producing a response (or declining with an error).
///
/// `f` receives a [`bulwark::Error`](crate::Error): a policy rejection from further in
/// (a boxed `bulwark::Error`) as itself, any other error as [`Error::Inner`]. An error
/// that does not trigger is passed on exactly as it came.
///
/// ```
/// use bulwark::fallback::{Fallback, FallbackLayer};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let policy = Fallback::builder().on_kinds(["timeout"]).build().unwrap();
/// let layer = FallbackLayer::new(policy, |err: bulwark::Error| async move {
///     Ok::<_, bulwark::BoxError>(format!("cached ({})", err.kind()))
/// });
/// let svc = layer.layer(service_fn(|_req: ()| async {
///     Err::<String, bulwark::BoxError>(Box::new(bulwark::Error::<bulwark::BoxError>::Timeout))
/// }));
/// assert_eq!(svc.oneshot(()).await.unwrap(), "cached (timeout)");
/// # }
/// ```
pub struct FallbackLayer<P, F> {
    fallback: Fallback<P>,
    f: Arc<F>,
}

impl<P, F> FallbackLayer<P, F> {
    /// A layer that answers errors `fallback` triggers on with `f(error)`.
    pub fn new<Fut, R>(fallback: Fallback<P>, f: F) -> Self
    where
        P: Trigger<BoxError>,
        F: Fn(Error) -> Fut,
        Fut: Future<Output = Result<R, BoxError>>,
    {
        FallbackLayer {
            fallback,
            f: Arc::new(f),
        }
    }
}

impl<P, F> Clone for FallbackLayer<P, F> {
    fn clone(&self) -> Self {
        FallbackLayer {
            fallback: self.fallback.clone(),
            f: self.f.clone(),
        }
    }
}

impl<P, F> fmt::Debug for FallbackLayer<P, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl<S, P, F> Layer<S> for FallbackLayer<P, F> {
    type Service = FallbackService<S, P, F>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackService {
            inner,
            fallback: self.fallback.clone(),
            f: self.f.clone(),
        }
    }
}

/// A service whose chosen errors are answered by a fallback function; built by
/// [`FallbackLayer`].
///
/// Named `FallbackService` rather than `Fallback` because [`Fallback`] is the policy.
pub struct FallbackService<S, P, F> {
    inner: S,
    fallback: Fallback<P>,
    f: Arc<F>,
}

impl<S: Clone, P, F> Clone for FallbackService<S, P, F> {
    fn clone(&self) -> Self {
        FallbackService {
            inner: self.inner.clone(),
            fallback: self.fallback.clone(),
            f: self.f.clone(),
        }
    }
}

impl<S: fmt::Debug, P, F> fmt::Debug for FallbackService<S, P, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackService")
            .field("inner", &self.inner)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl<S, Req, P, F, AFut> Service<Req> for FallbackService<S, P, F>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    P: Trigger<BoxError>,
    F: Fn(Error) -> AFut,
    AFut: Future<Output = Result<S::Response, BoxError>>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, P, F, AFut>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // Two `Arc` clones per request (no allocation): the future must own what it
        // needs in case the call fails.
        ResponseFuture::new(self.inner.call(req), self.fallback.clone(), self.f.clone())
    }
}
