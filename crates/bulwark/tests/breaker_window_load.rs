//! The time-based window under load: a full bucket and a burst of threads after an idle gap
//! (review lib1).

use std::time::Duration;

use bulwark::breaker::CircuitBreaker;
use bulwark::events::BreakerState;

const SEC: Duration = Duration::from_secs(1);

/// A bucket holds 2^18 - 1 calls; a busy dependency (here 650 000 calls in one 10 s bucket of
/// a 10-hour window) that starts failing after its bucket filled up with successes is still
/// seen failing: the full bucket is halved, its rates kept, and the failures count.
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
    // It opened once the failures made up half of what the bucket held, not before.
    assert!(failed > 100_000, "{failed}");
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
