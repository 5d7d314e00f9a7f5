//! The `tower` form of [`Hedge`](super::Hedge).

use std::fmt;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::Hedge;
use crate::classify::{AnyError, Classify};
use crate::BoxError;

/// Hedges calls to a service whose requests are `Clone`.
///
/// The original attempt goes to the service `poll_ready` readied. Each hedge goes to
/// a fresh clone of the service, which is driven to readiness (`poll_ready`) before
/// it is called, so a clone's readiness (a concurrency permit, a buffer slot) is
/// never borrowed from another.
///
/// ```
/// use std::time::Duration;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// use bulwark::hedge::{Hedge, HedgeLayer};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let hedge = Hedge::builder().delay(Duration::from_millis(10)).build().unwrap();
/// let calls = Arc::new(AtomicU32::new(0));
/// let c = calls.clone();
/// let svc = HedgeLayer::new(hedge).layer(service_fn(move |req: &'static str| {
///     let n = c.fetch_add(1, Ordering::SeqCst);
///     async move {
///         // The first replica hangs; the hedge answers.
///         tokio::time::sleep(Duration::from_secs(if n == 0 { 60 } else { 0 })).await;
///         Ok::<_, std::io::Error>(format!("{req} from attempt {}", n + 1))
///     }
/// }));
/// assert_eq!(svc.oneshot("hello").await.unwrap(), "hello from attempt 2");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct HedgeLayer<C = AnyError> {
    hedge: Hedge,
    classifier: C,
}

impl HedgeLayer {
    /// A layer hedging with `hedge`; every `Err` is a failure.
    pub fn new(hedge: Hedge) -> Self {
        HedgeLayer {
            hedge,
            classifier: AnyError,
        }
    }
}

impl<C> HedgeLayer<C> {
    /// Uses `classifier` to tell failures (keep racing) from final results.
    pub fn classifier<C2>(self, classifier: C2) -> HedgeLayer<C2> {
        HedgeLayer {
            hedge: self.hedge,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for HedgeLayer<C> {
    type Service = HedgeService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        HedgeService {
            inner,
            hedge: self.hedge.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// A hedged service; built by [`HedgeLayer`].
///
/// Named `HedgeService` rather than `Hedge` because [`Hedge`] is the policy.
#[derive(Clone)]
pub struct HedgeService<S, C = AnyError> {
    inner: S,
    hedge: Hedge,
    classifier: C,
}

impl<S: fmt::Debug, C> fmt::Debug for HedgeService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeService")
            .field("inner", &self.inner)
            .field("hedge", &self.hedge)
            .finish_non_exhaustive()
    }
}

impl<S, Req, C> Service<Req> for HedgeService<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError> + 'static,
    Req: Clone,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The readied service takes the original attempt; hedges are made from a
        // clone, each readied on its own. (One service clone and one request clone
        // per call; the hedge set itself is allocated only when a hedge starts.)
        let first = self.inner.call(req.clone());
        let template = self.inner.clone();
        ResponseFuture::new(
            first,
            template,
            req,
            self.classifier.clone(),
            self.hedge.shared().clone(),
            self.hedge.current_delay(),
        )
    }
}
