//! Where the policies meet: local refusals in a tower stack do not trip the breaker, a refused
//! hedge does not cancel the half-open probe, a probe slower than its lease still re-opens the
//! breaker, and keyed breakers outlive their open duration.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::breaker::{CircuitBreaker, KeyedCircuitBreaker};
use bulwark::events::BreakerState;
use bulwark::{Error, Event};
use tokio::time::{advance, sleep, Instant};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// An open per-key breaker must not be evicted (and so closed) before its open duration has run out.
#[tokio::test(start_paused = true)]
async fn keyed_breaker_is_not_evicted_while_open() {
    let kb = KeyedCircuitBreaker::builder()
        .breaker(|b| b.count_window(1).minimum_calls(1).open_duration(300 * SEC))
        .max_keys(2)
        .build::<&'static str>()
        .unwrap();
    // A call to "a" that takes 10 s and fails: the breaker opens at t = 10 s, until t = 310 s.
    let r = kb
        .call(&"a", || async {
            sleep(10 * SEC).await;
            Err::<(), _>("down")
        })
        .await;
    assert_eq!(r, Err(Error::Inner("down")));
    assert_eq!(kb.state(&"a"), Some(BreakerState::Open));
    advance(295 * SEC).await; // t = 305 s: still 5 s of open time left
    kb.call(&"b", || async { Ok::<_, ()>(()) }).await.unwrap(); // a new key sweeps the map
    let ran = AtomicU32::new(0);
    let r = kb
        .call(&"a", || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &str>(())
        })
        .await;
    assert!(
        matches!(r, Err(Error::CircuitOpen { .. })),
        "t = 305 s, the breaker opened at 10 s for 300 s, got {r:?} (ran {} times)",
        ran.load(Ordering::SeqCst)
    );
}

mod keyed_sweep {
    use super::*;
    use bulwark::keyed::Keyed;

    /// "When the map is full, entries idle for longer than idle_timeout (and not in use right
    /// now) are evicted to make room": an entry's idle time starts when its last user gives it
    /// back, so an entry in use at one sweep makes room a full `idle_timeout` after its release,
    /// not before, and not later.
    #[tokio::test(start_paused = true)]
    async fn an_entry_makes_room_idle_timeout_after_its_release() {
        let k = Keyed::builder()
            .max_keys(1)
            .idle_timeout(60 * SEC)
            .build(|_: &u32| ())
            .unwrap();
        let a = k.get(&1); // t = 0: key 1 in use (a long call)
        advance(61 * SEC).await;
        assert!(k.get(&2).is_overflow(), "key 1 is in use: key 2 overflows");
        drop(a); // t = 61 s: the long call ends
        advance(SEC).await;
        assert!(k.get(&2).is_overflow(), "key 1 has been idle 1 s");
        advance(60 * SEC).await; // t = 122 s: idle 61 s
        assert!(
            !k.get(&2).is_overflow(),
            "key 1 has been idle and free for longer than idle_timeout"
        );
    }
}

mod half_open_slow_probes {
    use super::*;

    /// An upstream that hangs until the caller's 45 s timeout. With the default 30 s probe lease,
    /// under steady traffic every failing probe loses its lease before it reports, so its failure
    /// is dropped: the breaker never re-opens and stays in half-open, sending a fresh probe into
    /// the hanging upstream every lease period.
    #[tokio::test(start_paused = true)]
    async fn probes_slower_than_the_lease_never_reopen_the_breaker() {
        let moves: Arc<Mutex<Vec<(BreakerState, BreakerState)>>> = Arc::default();
        let m = moves.clone();
        let b = CircuitBreaker::builder()
            .count_window(2)
            .minimum_calls(2)
            .half_open_calls(1)
            .open_duration(10 * SEC)
            .listener(move |e: &Event| {
                if let Event::BreakerTransition { from, to, .. } = e {
                    m.lock().unwrap().push((*from, *to));
                }
            })
            .build()
            .unwrap();
        for _ in 0..2 {
            let _ = b.call(|| async { Err::<(), _>("down") }).await;
        }
        assert_eq!(b.state(), BreakerState::Open);
        advance(10 * SEC).await;
        // Steady traffic, one caller a second for five minutes; an admitted call hangs 45 s and
        // fails (its timeout).
        let failed = Arc::new(AtomicUsize::new(0));
        for _ in 0..300 {
            let (b, failed) = (b.clone(), failed.clone());
            tokio::spawn(async move {
                let r = b
                    .call(|| async {
                        sleep(45 * SEC).await;
                        Err::<(), _>("timeout")
                    })
                    .await;
                if matches!(r, Err(Error::Inner(_))) {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            });
            sleep(SEC).await;
        }
        let failed = failed.load(Ordering::SeqCst);
        assert!(failed >= 5, "{failed}");
        assert!(
            moves
                .lock()
                .unwrap()
                .contains(&(BreakerState::HalfOpen, BreakerState::Open)),
            "{failed} probes failed in 5 minutes, yet the breaker never re-opened: {:?}, now {:?}",
            moves.lock().unwrap(),
            b.state()
        );
    }
}

mod tower_stack {
    use super::*;
    use bulwark::breaker::CircuitBreakerLayer;
    use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
    use bulwark::pipeline::TowerClassifier;
    use bulwark::rate_limit::{RateLimitLayer, RateLimiter};
    use bulwark::BoxError;
    use tower::{Service, ServiceBuilder, ServiceExt};

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::builder()
            .name("dep")
            .count_window(4)
            .minimum_calls(2)
            .open_duration(10 * SEC)
            .build()
            .unwrap()
    }

    /// docs/library.md: "local rejections (rate limiter, bulkhead) never trip the breaker", and
    /// the tower stack is "the same stack". A healthy upstream behind the documented tower
    /// order (breaker -> rate limiter -> bulkhead) is cut off by the breaker after a burst the
    /// rate limiter turned away, with the default classifier and with `TowerClassifier`.
    #[tokio::test(start_paused = true)]
    async fn rate_limiter_rejections_trip_the_breaker_in_the_tower_stack() {
        let mut states = Vec::new();
        for use_tower_classifier in [false, true] {
            let b = breaker();
            let inner = tower::service_fn(|_: ()| async { Ok::<_, BoxError>("fine") });
            let limiter = RateLimiter::builder()
                .per_second(1)
                .burst(1)
                .build()
                .unwrap();
            let mut svc: tower::util::BoxService<(), &'static str, BoxError> =
                if use_tower_classifier {
                    tower::util::BoxService::new(
                        ServiceBuilder::new()
                            .layer(CircuitBreakerLayer::new(b.clone()).classifier(TowerClassifier))
                            .layer(RateLimitLayer::new(limiter))
                            .service(inner),
                    )
                } else {
                    tower::util::BoxService::new(
                        ServiceBuilder::new()
                            .layer(CircuitBreakerLayer::new(b.clone()))
                            .layer(RateLimitLayer::new(limiter))
                            .service(inner),
                    )
                };
            assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), "fine");
            let e = svc.ready().await.unwrap().call(()).await.unwrap_err();
            assert!(matches!(
                e.downcast_ref::<Error>(),
                Some(Error::RateLimited { .. })
            ));
            states.push(b.state());
        }
        assert_eq!(
            states,
            [BreakerState::Closed, BreakerState::Closed],
            "breaker state after one success and one local rate-limit rejection \
             (default classifier, TowerClassifier)"
        );
    }

    /// The same for a full bulkhead.
    #[tokio::test(start_paused = true)]
    async fn bulkhead_rejections_trip_the_breaker_in_the_tower_stack() {
        let b = breaker();
        let inner = tower::service_fn(|_: ()| async {
            sleep(100 * MS).await;
            Ok::<_, BoxError>("fine")
        });
        let svc = ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(b.clone()).classifier(TowerClassifier))
            .layer(BulkheadLayer::new(
                Bulkhead::builder().max_concurrent(1).build().unwrap(),
            ))
            .service(inner);
        let (mut s1, mut s2) = (svc.clone(), svc.clone());
        let f1 = s1.ready().await.unwrap().call(());
        let f2 = s2.ready().await.unwrap().call(());
        let (r1, r2) = tokio::join!(f1, f2);
        assert_eq!(r1.unwrap(), "fine");
        assert!(matches!(
            r2.unwrap_err().downcast_ref::<Error>(),
            Some(Error::BulkheadFull)
        ));
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a local bulkhead rejection tripped the breaker"
        );
    }
}

mod hedge_and_breaker {
    use super::*;
    use bulwark::hedge::Hedge;
    use bulwark::pipeline::Pipeline;

    /// Pipeline order: hedge -> circuit breaker. In half-open, the original attempt is the probe;
    /// the hedge finds no probe slot and is rejected with `CircuitOpen`, which `DefaultClassifier`
    /// calls `Ignore`, which the hedge treats as a final answer: the healthy probe is cancelled and
    /// the caller gets `CircuitOpen`. Every probe slower than the hedge delay dies this way, so the
    /// breaker cannot close.
    #[tokio::test(start_paused = true)]
    async fn a_rejected_hedge_cancels_the_half_open_probe() {
        let b = CircuitBreaker::builder()
            .count_window(2)
            .minimum_calls(2)
            .half_open_calls(1)
            .open_duration(SEC)
            .build()
            .unwrap();
        let p = Pipeline::builder()
            .hedge(Hedge::builder().delay(10 * MS).build().unwrap())
            .circuit_breaker(b.clone())
            .build()
            .unwrap();
        for _ in 0..2 {
            let _ = p.call(|| async { Err::<(), _>("down") }).await;
        }
        assert_eq!(b.state(), BreakerState::Open);
        advance(SEC).await;
        // The upstream is back and answers in 50 ms.
        let t0 = Instant::now();
        let r = p
            .call(|| async {
                sleep(50 * MS).await;
                Ok::<_, &str>("fresh")
            })
            .await;
        assert_eq!(
            (r, b.state()),
            (Ok("fresh"), BreakerState::Closed),
            "after {:?}",
            t0.elapsed()
        );
    }
}
