//! Waiting in a bulkhead's queue and holding a keyed breaker's permit: what each gives back and
//! keeps (found by a review; each test failed before its fix).

use std::convert::Infallible;
use std::time::Duration;

use bulwark::breaker::KeyedCircuitBreaker;
use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
use bulwark::events::BreakerState;
use bulwark::Error;
use futures_util::FutureExt;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// docs/library.md (keyed policies): "an entry is idle from when its last user gave it back
/// ... a keyed breaker its failure opened lives out its open duration". A permit from
/// `KeyedCircuitBreaker::try_acquire` keeps its key in use until it is recorded, so a call that
/// takes a while and then fails leaves the key's breaker open for its whole open duration.
#[tokio::test(start_paused = true)]
async fn keyed_breaker_opened_through_a_permit_lives_out_its_open_duration() {
    let kb = KeyedCircuitBreaker::builder()
        .breaker(|b| b.count_window(1).minimum_calls(1).open_duration(300 * SEC))
        .max_keys(2)
        .build::<&'static str>()
        .unwrap();
    // A call to "a" taken at t = 0 that reports a failure at t = 10 s: open until t = 310 s.
    let permit = kb.try_acquire(&"a").unwrap();
    assert!(!permit.is_overflow());
    advance(10 * SEC).await;
    permit.failure();
    assert_eq!(kb.state(&"a"), Some(BreakerState::Open));
    advance(295 * SEC).await; // t = 305 s: 5 s of open time left
    kb.call(&"b", || async { Ok::<_, ()>(()) }).await.unwrap(); // a new key sweeps the map
    let r = kb.try_acquire(&"a");
    assert!(
        matches!(r, Err(Error::CircuitOpen { .. })),
        "t = 305 s, the breaker of \"a\" opened at 10 s for 300 s, but a call was admitted \
         (state of \"a\" now {:?})",
        kb.state(&"a")
    );
}

/// docs/library.md (bulkhead): "Waiting is FIFO". A request the tower service queued (its
/// future not polled yet) is not passed by a later plain `acquire` of the same bulkhead.
#[tokio::test(start_paused = true)]
async fn plain_acquire_does_not_overtake_a_request_queued_by_the_tower_service() {
    let bh = Bulkhead::builder()
        .max_concurrent(1)
        .max_queued(2)
        .queue_timeout(SEC)
        .build()
        .unwrap();
    let mut svc = BulkheadLayer::new(bh.clone()).layer(tower::service_fn(|n: u32| async move {
        Ok::<u32, Infallible>(n)
    }));
    let held = bh.try_acquire().unwrap();
    // Arrives first, finds the bulkhead full, is queued.
    let queued = svc.ready().await.unwrap().call(1);
    assert_eq!(bh.queued(), 1);
    drop(held); // the slot frees while the queued request's future has not been polled yet
                // Arrives second.
    let mut later = Box::pin(bh.acquire());
    let overtook = matches!((&mut later).now_or_never(), Some(Ok(_)));
    drop(later);
    assert!(
        !overtook,
        "a later acquire() took the slot ahead of the request queued before it"
    );
    assert!(bh.try_acquire().is_none(), "nor does a later try_acquire()");
    assert_eq!(queued.await.unwrap(), 1);
}

/// docs/library.md (composition): "local rejections (rate limiter, bulkhead) never trip the
/// breaker", and local waiting does not either: time a call spends queued in the pipeline's own
/// bulkhead is not charged to the dependency as a slow call. Two calls of 80 ms each through a
/// one-slot bulkhead: the second waits 80 ms, then runs 80 ms; the breaker (slow above 100 ms,
/// 50 %) stays closed.
#[tokio::test(start_paused = true)]
async fn pipeline_does_not_charge_bulkhead_queueing_to_the_breaker_as_slow_calls() {
    use bulwark::breaker::CircuitBreaker;
    use bulwark::pipeline::Pipeline;
    let breaker = CircuitBreaker::builder()
        .count_window(2)
        .minimum_calls(2)
        .slow_call_duration(100 * MS)
        .slow_call_rate_threshold(50.0)
        .build()
        .unwrap();
    let bulkhead = Bulkhead::builder()
        .max_concurrent(1)
        .max_queued(1)
        .queue_timeout(SEC)
        .build()
        .unwrap();
    let p = Pipeline::builder()
        .circuit_breaker(breaker.clone())
        .bulkhead(bulkhead)
        .build()
        .unwrap();
    let op = || async {
        tokio::time::sleep(80 * MS).await;
        Ok::<_, &str>(())
    };
    let (a, b) = tokio::join!(p.call(op), p.call(op));
    a.unwrap();
    b.unwrap();
    assert_eq!(
        breaker.snapshot().slow_calls,
        0,
        "no call to the dependency took more than 80 ms"
    );
    assert_eq!(breaker.state(), BreakerState::Closed);
}

/// The classic way sync code drives a tower service: `rt.block_on(svc.call(req))`, where the
/// call runs before `block_on` enters the runtime. With the bulkhead full and a queue, `call`
/// returns a future (it does not need a runtime), which then waits in the queue. Found by a
/// review of the queue-from-arrival change.
#[test]
fn a_queued_call_made_outside_the_runtime_does_not_panic() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let b = Bulkhead::builder()
        .max_concurrent(1)
        .max_queued(4)
        .queue_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut svc = BulkheadLayer::new(b.clone()).layer(tower::service_fn(|x: u32| async move {
        Ok::<_, Infallible>(x)
    }));
    // The bulkhead's one slot is taken, so the next call queues.
    let held = b.try_acquire().expect("a free slot");
    let fut = svc.call(7);
    drop(held);
    let r = rt.block_on(fut);
    assert_eq!(r.unwrap(), 7, "the queued call runs once the slot is free");
}
