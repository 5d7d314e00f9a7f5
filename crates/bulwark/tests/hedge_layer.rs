//! The tower `HedgeLayer` over other bulwark layers, against what the pipeline's hedge stage does:
//! a hedge refused inside the stack (an inner bulkhead or rate limiter) sent nothing, and is no
//! failure of the dependency (found by a review; each test failed before its fix).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
use bulwark::events::Event;
use bulwark::hedge::{Hedge, HedgeLayer};
use bulwark::pipeline::TowerClassifier;
use bulwark::rate_limit::{RateLimitLayer, RateLimiter};
use bulwark::{BoxError, Error};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// When each `HedgeStarted` was emitted, from the listener's creation.
fn hedge_log() -> (
    Arc<Mutex<Vec<Duration>>>,
    impl Fn(&Event) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let t0 = Instant::now();
    (seen, move |e: &Event| {
        if let Event::HedgeStarted { .. } = e {
            s.lock().unwrap().push(t0.elapsed());
        }
    })
}

/// The hedge at 100 ms is refused by the full inner bulkhead (the original holds its only slot):
/// that does not start every remaining hedge at once, each refused alike and each drawing an
/// admission token.
#[tokio::test(start_paused = true)]
async fn a_hedge_refused_by_an_inner_bulkhead_does_not_fire_the_others_at_once() {
    let (hedges, listener) = hedge_log();
    let admitted = Arc::new(AtomicU32::new(0));
    let a = admitted.clone();
    let hedge = Hedge::builder()
        .delay(ms(100))
        .max_hedges(3)
        .admit(Arc::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
            true
        }))
        .listener(listener)
        .build()
        .unwrap();
    let bulkhead = Bulkhead::builder()
        .max_concurrent(1)
        .max_queued(0)
        .build()
        .unwrap();
    let sent = Arc::new(AtomicU32::new(0));
    let s = sent.clone();
    let svc = ServiceBuilder::new()
        .layer(HedgeLayer::new(hedge).classifier(TowerClassifier))
        .layer(BulkheadLayer::new(bulkhead))
        .service(tower::service_fn(move |_: ()| {
            s.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(ms(250)).await;
                Ok::<_, BoxError>("slow but fine")
            }
        }));
    assert_eq!(svc.oneshot(()).await.unwrap(), "slow but fine");
    assert_eq!(sent.load(Ordering::SeqCst), 1);
    assert_eq!(
        *hedges.lock().unwrap(),
        vec![ms(100)],
        "refused hedges fired the others at once"
    );
    assert_eq!(admitted.load(Ordering::SeqCst), 1);
}

/// The original reaches the dependency and fails; the hedge its failure starts at once is refused
/// by the inner rate limiter. The answer is the dependency's own error, not `RateLimited` (which
/// an outer retry would take for the server's `retry_after`, and an outer breaker would not
/// count).
#[tokio::test(start_paused = true)]
async fn a_hedge_refused_locally_does_not_replace_the_dependencys_own_error() {
    let hedge = Hedge::builder()
        .delay(ms(100))
        .max_hedges(1)
        .build()
        .unwrap();
    let limiter = RateLimiter::builder()
        .per_second(1)
        .burst(1)
        .build()
        .unwrap();
    let sent = Arc::new(AtomicU32::new(0));
    let s = sent.clone();
    let svc = ServiceBuilder::new()
        .layer(HedgeLayer::new(hedge).classifier(TowerClassifier))
        .layer(RateLimitLayer::new(limiter))
        .service(tower::service_fn(move |_: ()| {
            s.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(ms(10)).await;
                Err::<u32, BoxError>(Box::new(std::io::Error::other("503 from the dependency")))
            }
        }));
    let err = svc.oneshot(()).await.unwrap_err();
    assert_eq!(sent.load(Ordering::SeqCst), 1, "the hedge was never sent");
    assert!(
        err.downcast_ref::<std::io::Error>().is_some(),
        "the answer is the local refusal {:?}, not the dependency's error",
        err.downcast_ref::<Error>()
    );
}
