//! GCRA rate limiter under paused time: exact burst, exact refill boundaries, exact
//! `retry_after`, `check_n`, waiting, concurrency, and the tower layer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulwark::rate_limit::{InsufficientCapacity, RateLimitLayer, RateLimiter};
use bulwark::{BoxError, Error, Event};
use tokio::time::{advance, Instant};
use tower::{Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);
const NS: Duration = Duration::from_nanos(1);

fn limiter(per_second: u32, burst: u32) -> RateLimiter {
    RateLimiter::builder()
        .name("test")
        .per_second(per_second)
        .burst(burst)
        .build()
        .unwrap()
}

fn retry_after(r: Result<(), Error<std::convert::Infallible>>) -> Duration {
    match r {
        Err(Error::RateLimited { retry_after }) => retry_after,
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn burst_then_one_cell_per_interval_with_exact_boundaries() {
    let l = limiter(10, 3); // T = 100 ms, tau = 300 ms
    for _ in 0..3 {
        l.check().unwrap();
    }
    assert_eq!(retry_after(l.check()), 100 * MS);

    // One nanosecond before the boundary: rejected, 1 ns to go.
    advance(100 * MS - NS).await;
    assert_eq!(retry_after(l.check()), NS);
    // At the boundary: admitted, and exactly one.
    advance(NS).await;
    l.check().unwrap();
    assert_eq!(retry_after(l.check()), 100 * MS);

    // Steady state: exactly one per 100 ms, each boundary exact.
    for _ in 0..20 {
        advance(100 * MS - NS).await;
        assert_eq!(retry_after(l.check()), NS);
        advance(NS).await;
        l.check().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn partial_refill_and_exact_retry_after() {
    let l = limiter(10, 3);
    for _ in 0..3 {
        l.check().unwrap();
    }
    advance(250 * MS).await; // cells at 100 and 200 ms have conformed
    assert_eq!(l.remaining(), 2);
    l.check().unwrap();
    l.check().unwrap();
    assert_eq!(l.remaining(), 0);
    assert_eq!(retry_after(l.check()), 50 * MS);

    // A long idle refills to the burst, never beyond.
    advance(Duration::from_secs(3600)).await;
    assert_eq!(l.remaining(), 3);
    for _ in 0..3 {
        l.check().unwrap();
    }
    assert_eq!(retry_after(l.check()), 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn rejections_do_not_consume_cells() {
    let l = limiter(10, 1);
    l.check().unwrap();
    for _ in 0..100 {
        assert_eq!(retry_after(l.check()), 100 * MS);
    }
    advance(100 * MS).await;
    l.check().unwrap();
}

#[tokio::test(start_paused = true)]
async fn check_n_is_all_or_nothing_and_reports_impossible_requests() {
    let l = limiter(10, 5); // T = 100 ms, tau = 500 ms
    assert_eq!(l.check_n(0), Ok(Ok(())));
    assert_eq!(l.check_n(3), Ok(Ok(())));
    // 3 more would need 100 ms; nothing is taken by the rejection.
    assert_eq!(retry_after(l.check_n(3).unwrap()), 100 * MS);
    assert_eq!(l.remaining(), 2);
    assert_eq!(l.check_n(2), Ok(Ok(())));
    assert_eq!(
        l.check_n(6),
        Err(InsufficientCapacity {
            requested: 6,
            burst: 5
        })
    );
    advance(300 * MS - NS).await;
    assert_eq!(retry_after(l.check_n(3).unwrap()), NS);
    advance(NS).await;
    assert_eq!(l.check_n(3), Ok(Ok(())));
}

#[tokio::test(start_paused = true)]
async fn non_integral_interval_rounds_up_so_the_rate_is_never_exceeded() {
    let l = limiter(3, 1);
    let t = Duration::from_nanos(333_333_334);
    assert_eq!(l.interval(), t);
    l.check().unwrap();
    assert_eq!(retry_after(l.check()), t);
    advance(t - NS).await;
    assert!(l.check().is_err());
    advance(NS).await;
    l.check().unwrap();
}

#[tokio::test(start_paused = true)]
async fn rate_per_period() {
    let l = RateLimiter::builder()
        .rate(2, Duration::from_secs(60))
        .build()
        .unwrap();
    assert_eq!(l.burst(), 2, "burst defaults to one period's worth");
    l.check().unwrap();
    l.check().unwrap();
    assert_eq!(retry_after(l.check()), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn call_rejects_without_waiting_and_emits_an_event() {
    let events = Arc::new(AtomicUsize::new(0));
    let seen = events.clone();
    let l = RateLimiter::builder()
        .name("test")
        .per_second(1)
        .listener(move |e: &Event| {
            if let Event::RateLimited { name } = e {
                assert_eq!(&**name, "test");
                seen.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let start = Instant::now();
    assert_eq!(l.call(|| async { Ok::<_, ()>(1) }).await, Ok(1));
    let ran = AtomicUsize::new(0);
    let r = l
        .call(|| async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(2)
        })
        .await;
    assert_eq!(
        r,
        Err(Error::RateLimited {
            retry_after: Duration::from_secs(1)
        })
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0, "rejected calls never run");
    assert_eq!(Instant::now(), start);
    assert_eq!(events.load(Ordering::SeqCst), 1);
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        l.call(|| async { Err::<(), _>("inner") }).await,
        Err(Error::Inner("inner"))
    );
}

#[tokio::test(start_paused = true)]
async fn until_ready_waits_exactly_until_a_cell_conforms() {
    let l = limiter(10, 1);
    let start = Instant::now();
    l.until_ready().await;
    assert_eq!(Instant::now(), start);
    l.until_ready().await;
    assert_eq!(Instant::now() - start, 100 * MS);
    l.until_ready().await;
    assert_eq!(Instant::now() - start, 200 * MS);
}

#[test]
fn concurrent_checks_admit_exactly_the_burst() {
    // The same instant for every thread: only the CAS loop decides.
    let l = limiter(1, 1000);
    let now = Instant::now();
    let admitted = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (l, admitted) = (l.clone(), admitted.clone());
            std::thread::spawn(move || {
                for _ in 0..500 {
                    if l.check_at(now).is_ok() {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 1000);
}

#[tokio::test(start_paused = true)]
async fn layer_rejects_with_retry_after_and_passes_inner_errors_through() {
    let l = limiter(10, 2);
    let inner = tower::service_fn(|x: u32| async move {
        if x == 0 {
            Err::<u32, BoxError>("zero".into())
        } else {
            Ok(x + 1)
        }
    });
    let mut svc = RateLimitLayer::new(l).layer(inner);
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 2);
    let e = svc.ready().await.unwrap().call(0).await.unwrap_err();
    assert_eq!(e.to_string(), "zero");
    assert!(e.downcast_ref::<Error>().is_none());
    let e = svc.ready().await.unwrap().call(3).await.unwrap_err();
    assert_eq!(
        e.downcast_ref::<Error>().and_then(Error::retry_after),
        Some(100 * MS)
    );
    assert_eq!(e.downcast_ref::<Error>().unwrap().kind(), "rate_limited");
    advance(100 * MS).await;
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), 4);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// For any schedule of checks: (1) no window [s, e] of admitted cells holds
        /// more than `burst + (e - s) / T` of them; (2) every `retry_after` is exact:
        /// 1 ns earlier is still rejected, at it the check conforms.
        #[test]
        fn gcra_is_safe_and_retry_after_is_exact(
            rate in 1u32..50,
            burst in 1u32..8,
            gaps in proptest::collection::vec(0u64..u64::MAX, 1..120),
        ) {
            let l = limiter(rate, burst);
            let t = l.interval().as_nanos() as u64;
            let t0 = Instant::now();
            let check = |ns: u64| l.check_at(t0 + Duration::from_nanos(ns));
            let mut now = 0u64;
            let mut admitted: Vec<u64> = Vec::new();
            for gap in gaps {
                now += gap % (3 * t);
                match check(now) {
                    Ok(()) => admitted.push(now),
                    Err(Error::RateLimited { retry_after }) => {
                        let r = retry_after.as_nanos() as u64;
                        prop_assert!(r > 0 && r <= t);
                        prop_assert!(check(now + r - 1).is_err());
                        now += r;
                        prop_assert!(check(now).is_ok());
                        admitted.push(now);
                    }
                    Err(e) => prop_assert!(false, "unexpected {e:?}"),
                }
            }
            for i in 0..admitted.len() {
                for j in i..admitted.len() {
                    let cells = (j - i + 1) as u64;
                    let window = admitted[j] - admitted[i];
                    prop_assert!(cells <= u64::from(burst) + window / t,
                        "{cells} cells in {window} ns");
                }
            }
        }
    }
}
