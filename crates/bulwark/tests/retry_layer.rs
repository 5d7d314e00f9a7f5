//! RetryLayer: timing, classification, readiness discipline, request cloning,
//! deadline and budget, on paused time.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bulwark::retry::{Backoff, Retry, RetryBudget, RetryLayer};
use bulwark::timeout::{Deadline, Timeout, TimeoutLayer};
use bulwark::{BoxError, Error, Event, Outcome};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn retry(attempts: u32, backoff: Backoff) -> Retry {
    Retry::builder()
        .max_attempts(attempts)
        .backoff(backoff)
        .build()
        .unwrap()
}

#[derive(Debug)]
struct Down;
impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("down")
    }
}
impl std::error::Error for Down {}

#[tokio::test(start_paused = true)]
async fn retries_errors_at_exact_instants() {
    let start = Instant::now();
    let at: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let a = at.clone();
    let svc = RetryLayer::new(retry(4, Backoff::exponential(ms(100)))).layer(service_fn(
        move |n: u32| {
            let mut v = a.lock().unwrap();
            v.push(start.elapsed());
            let attempt = v.len();
            async move {
                if attempt < 3 {
                    Err(Down)
                } else {
                    Ok(n + attempt as u32)
                }
            }
        },
    ));
    assert_eq!(svc.oneshot(10).await.unwrap(), 13);
    assert_eq!(*at.lock().unwrap(), [ms(0), ms(100), ms(300)]);
}

#[tokio::test(start_paused = true)]
async fn exhausted_returns_the_last_inner_error_unchanged() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = RetryLayer::new(retry(3, Backoff::none())).layer(service_fn(move |()| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(Down) }
    }));
    let err: BoxError = svc.oneshot(()).await.unwrap_err();
    assert!(err.is::<Down>());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn classifier_sees_responses() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let classify = |r: &Result<u16, Infallible>| match r {
        Ok(503) => Outcome::Failure,
        Ok(429) => Outcome::FailureRetryAfter(ms(700)),
        _ => Outcome::Success,
    };
    let start = Instant::now();
    let svc = RetryLayer::new(retry(5, Backoff::fixed(ms(10))))
        .classifier(classify)
        .layer(service_fn(move |()| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<u16, Infallible>([503, 429, 200][n]) }
        }));
    assert_eq!(svc.oneshot(()).await.unwrap(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // 10 ms backoff after the 503, then the 700 ms Retry-After.
    assert_eq!(start.elapsed(), ms(710));
}

/// A service that must be polled ready before every call. A fresh clone is not
/// ready; `poll_ready` returns `Pending` once (waking itself) before it is ready,
/// so the retry's readiness path is exercised.
struct Strict {
    ready: bool,
    pending_once: bool,
    shared: Arc<StrictState>,
}

#[derive(Default)]
struct StrictState {
    calls: AtomicUsize,
    unready_calls: AtomicUsize,
    polls: AtomicUsize,
}

impl Clone for Strict {
    fn clone(&self) -> Self {
        Strict {
            ready: false,
            pending_once: false,
            shared: self.shared.clone(),
        }
    }
}

impl Service<()> for Strict {
    type Response = ();
    type Error = Down;
    type Future = Pin<Box<dyn Future<Output = Result<(), Down>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Down>> {
        self.shared.polls.fetch_add(1, Ordering::SeqCst);
        if !self.pending_once {
            self.pending_once = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        if !self.ready {
            self.shared.unready_calls.fetch_add(1, Ordering::SeqCst);
        }
        self.ready = false;
        self.pending_once = false;
        self.shared.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(Down) })
    }
}

#[tokio::test(start_paused = true)]
async fn never_calls_an_unreadied_service() {
    let shared = Arc::new(StrictState::default());
    let inner = Strict {
        ready: false,
        pending_once: false,
        shared: shared.clone(),
    };
    let mut svc = RetryLayer::new(retry(4, Backoff::fixed(ms(5)))).layer(inner);
    for _ in 0..3 {
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(err.is::<Down>());
    }
    assert_eq!(shared.calls.load(Ordering::SeqCst), 12);
    assert_eq!(shared.unready_calls.load(Ordering::SeqCst), 0);
    // Two polls (Pending, then Ready) per call.
    assert_eq!(shared.polls.load(Ordering::SeqCst), 24);
}

/// A request that counts its clones.
struct Req(Arc<AtomicUsize>);
impl Clone for Req {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Req(self.0.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn the_last_attempt_sends_the_original_request() {
    let clones = Arc::new(AtomicUsize::new(0));
    let svc = RetryLayer::new(retry(3, Backoff::none()))
        .layer(service_fn(|_: Req| async { Err::<(), _>(Down) }));
    let _ = svc.oneshot(Req(clones.clone())).await;
    assert_eq!(clones.load(Ordering::SeqCst), 2, "3 attempts, 2 clones");
}

#[tokio::test(start_paused = true)]
async fn total_timeout_layer_deadline_stops_retries() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let stack = TimeoutLayer::new(Timeout::total(Duration::from_secs(1))).layer(
        RetryLayer::new(retry(5, Backoff::fixed(ms(400)))).layer(service_fn(move |()| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Down) }
        })),
    );
    let start = Instant::now();
    let err = stack.oneshot(()).await.unwrap_err();
    // Attempts at 0, 400, 800; the one due at 1200 is past the deadline and is not
    // waited for: the inner error comes back at 800 ms, before the timeout fires.
    assert!(err.is::<Down>(), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(start.elapsed(), ms(800));
}

#[tokio::test(start_paused = true)]
async fn expired_deadline_is_a_timeout_without_calling() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = RetryLayer::new(retry(3, Backoff::none())).layer(service_fn(move |()| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(()) }
    }));
    let err = Deadline::scope(Deadline::after(Duration::ZERO), svc.oneshot(()))
        .await
        .unwrap_err();
    assert!(matches!(err.downcast_ref::<Error>(), Some(Error::Timeout)));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn budget_applies_to_the_service() {
    let budget = RetryBudget::builder()
        .min_retries_per_sec(0)
        .percent_can_retry(0.5)
        .build()
        .unwrap();
    let policy = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::none())
        .budget(budget.clone())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = RetryLayer::new(policy).layer(service_fn(move |()| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(Down) }
    }));
    for _ in 0..10 {
        let _ = svc.clone().oneshot(()).await;
    }
    // 10 deposits * 0.5 = 5 retries in all.
    assert_eq!(calls.load(Ordering::SeqCst), 15);
    assert_eq!(budget.balance(), 0);
}

#[tokio::test(start_paused = true)]
async fn service_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let mut svc = TimeoutLayer::new(Timeout::total(ms(10))).layer(
        RetryLayer::new(retry(2, Backoff::none()))
            .layer(service_fn(|()| async { Ok::<_, Infallible>(()) })),
    );
    let fut = svc.ready().await.unwrap().call(());
    send(&fut);
    fut.await.unwrap();
}

/// A service that becomes ready only at `ready_at` after its first call, and always fails.
#[derive(Clone)]
struct SlowToReady {
    calls: Arc<AtomicUsize>,
    ready_at: Arc<Mutex<Option<Instant>>>,
    gap: Duration,
}

impl Service<()> for SlowToReady {
    type Response = ();
    type Error = Down;
    type Future = std::future::Ready<Result<(), Down>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Down>> {
        let at = *self.ready_at.lock().unwrap();
        match at {
            Some(at) if Instant::now() < at => {
                let waker = cx.waker().clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    waker.wake();
                });
                Poll::Pending
            }
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, _: ()) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *self.ready_at.lock().unwrap() = Some(Instant::now() + self.gap);
        std::future::ready(Err(Down))
    }
}

#[tokio::test(start_paused = true)]
async fn no_attempt_starts_past_max_elapsed_even_when_readiness_is_slow() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = SlowToReady {
        calls: calls.clone(),
        ready_at: Arc::new(Mutex::new(None)),
        gap: ms(500),
    };
    let retry = Retry::builder()
        .max_attempts(5)
        .max_elapsed(ms(300))
        .backoff(Backoff::fixed(ms(10)))
        .deadline_aware(false)
        .build()
        .unwrap();
    let mut svc = RetryLayer::new(retry).layer(inner);
    let t0 = Instant::now();
    let r = svc.ready().await.unwrap().call(()).await;
    // The retry was decided at 0 ms (10 ms backoff < 300 ms), but the service was
    // ready again only at 500 ms: past the limit, the first failure is returned.
    assert!(r.unwrap_err().downcast_ref::<Down>().is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(t0.elapsed(), ms(500));
}

/// When the retry gives up because readiness outlasted `max_elapsed`, no retry was sent: its
/// budget token must not stay spent, and the give-up must be reported (`RetryExhausted`), as
/// on every other path that stops at a limit. (Its `Retry` event was emitted when it was
/// decided, before the wait, as resilience4j's `onRetry` is.)
#[tokio::test(start_paused = true)]
async fn a_tower_retry_given_up_at_readiness_refunds_its_token_and_reports_the_end() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = SlowToReady {
        calls: calls.clone(),
        ready_at: Arc::new(Mutex::new(None)),
        gap: Duration::from_millis(500),
    };
    let budget = RetryBudget::builder()
        .min_retries_per_sec(0)
        .percent_can_retry(1.0)
        .build()
        .unwrap();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let ev = events.clone();
    let retry = Retry::builder()
        .max_attempts(5)
        .max_elapsed(Duration::from_millis(300))
        .backoff(Backoff::fixed(Duration::from_millis(10)))
        .deadline_aware(false)
        .budget(budget.clone())
        .listener(move |e: &Event| ev.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let mut svc = RetryLayer::new(retry).layer(inner);
    let r = svc.ready().await.unwrap().call(()).await;
    assert!(r.unwrap_err().downcast_ref::<Down>().is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one attempt was sent");
    let events = events.lock().unwrap().clone();
    let retries = events
        .iter()
        .filter(|e| matches!(e, Event::Retry { .. }))
        .count();
    let exhausted = events
        .iter()
        .filter(|e| matches!(e, Event::RetryExhausted { .. }))
        .count();
    assert_eq!(
        (retries, exhausted, budget.balance()),
        (1, 1, 1),
        "(Retry events, RetryExhausted events, budget balance) after one call and no retry sent; events: {events:?}"
    );
}
