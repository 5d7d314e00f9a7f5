//! The time-based window under load: a full bucket and a burst of threads after an idle gap
//! (review lib1).

use std::time::Duration;

use bulwark::breaker::CircuitBreaker;
use bulwark::events::BreakerState;

const SEC: Duration = Duration::from_secs(1);

/// A busy dependency (here 650 000 calls in one 10 s bucket of a 10-hour window) that starts
/// failing after 300 000 successes in that bucket is seen failing (a bucket held 2^18 - 1
/// calls and dropped the rest, failures included).
#[tokio::test(start_paused = true)]
async fn a_full_bucket_still_counts_the_failures_that_follow() {
    let b = CircuitBreaker::builder()
        .time_window(Duration::from_secs(10 * 3600))
        .minimum_calls(100)
        .failure_rate_threshold(50.0)
        .build()
        .unwrap();
    for _ in 0..300_000 {
        b.try_acquire().unwrap().success();
    }
    let s = b.snapshot();
    assert!(s.calls > 100_000 && s.failures == 0, "{s:?}");
    let mut failed = 0;
    for _ in 0..350_000 {
        match b.try_acquire() {
            Ok(p) => {
                p.failure();
                failed += 1;
            }
            Err(_) => break,
        }
    }
    assert_eq!(b.state(), BreakerState::Open, "after {failed} failures");
    assert_eq!(failed, 300_000, "opens exactly at 50%");
}

/// After an idle gap, a burst of calls on several threads is counted in full: none finds its
/// bucket still holding the old tick's counts while another thread moves the window.
#[test]
fn a_burst_on_threads_after_an_idle_gap_loses_no_call() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let _g = handle.enter();
    let b = CircuitBreaker::builder()
        .time_window(Duration::from_secs(2 * 3600))
        .minimum_calls(u32::MAX) // never trips: only the counting is under test
        .build()
        .unwrap();
    const THREADS: usize = 4;
    const PER: u64 = 200;
    let mut lossy = Vec::new();
    for _ in 0..30 {
        // An idle gap longer than the window; every thread shares the paused clock. No
        // snapshot before the burst: reading the window would move it on this thread first.
        rt.block_on(tokio::time::advance(3 * 3600 * SEC));
        let barrier = std::sync::Barrier::new(THREADS);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let (b, handle, barrier) = (&b, &handle, &barrier);
                s.spawn(move || {
                    let _g = handle.enter();
                    barrier.wait();
                    for _ in 0..PER {
                        b.try_acquire().unwrap().failure();
                    }
                });
            }
        });
        let s = b.snapshot();
        if s.calls != THREADS as u64 * PER || s.failures != THREADS as u64 * PER {
            lossy.push((s.calls, s.failures));
        }
    }
    assert!(
        lossy.is_empty(),
        "rounds that lost calls, as (calls, failures) of {}: {lossy:?}",
        THREADS as u64 * PER
    );
}

/// The window's failure rate is that of the calls made, however busy each bucket was: 393,216
/// successes in one second of a 10 s window, then failures; a 50% threshold opens once the
/// failures are half the calls, not at 25% (as when the full bucket was halved, review df6).
#[tokio::test(start_paused = true)]
async fn a_busy_bucket_weighs_as_many_calls_as_it_took() {
    let b = CircuitBreaker::builder()
        .time_window(Duration::from_secs(10))
        .minimum_calls(100)
        .failure_rate_threshold(50.0)
        .build()
        .unwrap();
    const SUCCESSES: u64 = 393_216;
    for _ in 0..SUCCESSES {
        b.try_acquire().unwrap().success();
    }
    assert_eq!(b.snapshot().calls, SUCCESSES);
    tokio::time::advance(SEC).await;
    let mut failed: u64 = 0;
    while failed <= SUCCESSES {
        match b.try_acquire() {
            Ok(p) => {
                p.failure();
                failed += 1;
            }
            Err(_) => break,
        }
    }
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(failed, SUCCESSES, "opens exactly at 50%");
}
