//! Circuit breaker recovery: exactly-N half-open probes under concurrency, probe
//! leases, cancelled probes, and ramping traffic back up.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use bulwark::breaker::{CircuitBreaker, CircuitBreakerBuilder};
use bulwark::events::BreakerState::{self, *};
use bulwark::{Error, Event};
use support::until;
use tokio::sync::Semaphore;
use tokio::time::{advance, timeout, Instant};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn builder() -> CircuitBreakerBuilder {
    CircuitBreaker::builder()
        .name("recovery")
        .count_window(10)
        .minimum_calls(4)
        .failure_rate_threshold(50.0)
        .open_duration(10 * SEC)
}

async fn trip(b: &CircuitBreaker) {
    for _ in 0..4 {
        let r: Result<(), Error<&str>> = b.call(|| async { Err("boom") }).await;
        assert_eq!(r, Err(Error::Inner("boom")));
    }
    assert_eq!(b.state(), Open);
}

fn retry_after(r: Result<bulwark::breaker::Permit, Error<std::convert::Infallible>>) -> Duration {
    match r {
        Err(Error::CircuitOpen { retry_after, .. }) => retry_after,
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_n_of_100_concurrent_callers() {
    let b = builder().half_open_calls(3).build().unwrap();
    trip(&b).await;
    advance(10 * SEC).await;

    let gate = Arc::new(Semaphore::new(0));
    let admitted = Arc::new(AtomicUsize::new(0));
    let rejected = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (b, gate, admitted, rejected) =
                (b.clone(), gate.clone(), admitted.clone(), rejected.clone());
            tokio::spawn(async move {
                let r = b
                    .call(|| async {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        // The probe blocks until every caller has tried.
                        let _permit = gate.acquire().await.unwrap();
                        Ok::<_, &str>(())
                    })
                    .await;
                if let Err(Error::CircuitOpen { retry_after, .. }) = r {
                    // The hint is 1 s (the 30 s default lease ends later).
                    assert_eq!(retry_after, SEC);
                    rejected.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    until(|| admitted.load(Ordering::SeqCst) + rejected.load(Ordering::SeqCst) == 100).await;
    assert_eq!(admitted.load(Ordering::SeqCst), 3);
    assert_eq!(rejected.load(Ordering::SeqCst), 97);
    assert_eq!(b.state(), HalfOpen);

    gate.add_permits(100);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(b.state(), Closed);
}

#[test]
fn half_open_admits_exactly_n_across_threads() {
    // Real threads racing on try_acquire. The open duration is 1 ns so the breaker
    // is ready to probe by the time the threads run (no sleep needed).
    let b = builder()
        .open_duration(Duration::from_nanos(1))
        .half_open_calls(5)
        .build()
        .unwrap();
    for _ in 0..4 {
        b.try_acquire().unwrap().failure();
    }
    assert_eq!(b.state(), Open);
    let start = Arc::new(Barrier::new(64));
    let done = Arc::new(Barrier::new(64));
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (b, start, done) = (b.clone(), start.clone(), done.clone());
            std::thread::spawn(move || {
                start.wait();
                let permit = b.try_acquire();
                // Hold the permit until everyone has tried.
                done.wait();
                permit.is_ok()
            })
        })
        .collect();
    let admitted = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(admitted, 5);
    // Dropped unreported: the slots are free again, still half-open.
    assert_eq!(b.state(), HalfOpen);
    assert!(b.try_acquire().unwrap().is_probe());
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_probe_frees_its_slot_after_the_lease() {
    let b = builder()
        .half_open_calls(1)
        .probe_lease(5 * SEC)
        .build()
        .unwrap();
    trip(&b).await;
    advance(10 * SEC).await;
    let probe = b.try_acquire().unwrap();
    assert!(probe.is_probe());
    std::mem::forget(probe);

    // Told to retry in a second, or when the lease ends if that is sooner.
    assert_eq!(retry_after(b.try_acquire()), SEC);
    advance(4 * SEC + 500 * MS).await;
    assert_eq!(retry_after(b.try_acquire()), 500 * MS);
    advance(500 * MS - MS).await;
    assert_eq!(retry_after(b.try_acquire()), MS);
    assert_eq!(b.state(), HalfOpen);
    advance(MS).await;
    let probe = b.try_acquire().expect("the lease ran out");
    probe.success();
    assert_eq!(b.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn a_probe_succeeding_after_losing_its_lease_is_not_counted() {
    let b = builder()
        .half_open_calls(1)
        .probe_lease(5 * SEC)
        .build()
        .unwrap();
    trip(&b).await;
    advance(10 * SEC).await;
    let hung = b.try_acquire().unwrap();
    advance(5 * SEC).await;
    let fresh = b.try_acquire().unwrap();
    // The hung probe finally succeeds: its slot belongs to `fresh` now, which decides.
    hung.success();
    assert_eq!(b.state(), HalfOpen);
    fresh.failure();
    assert_eq!(b.state(), Open);
}

/// A probe that fails after its lease ran out still says the dependency is failing: the breaker
/// opens again (as a late failed test call does in Polly), instead of staying half-open and
/// sending a new probe into a dependency slower than the lease at each lease's end.
#[tokio::test(start_paused = true)]
async fn a_probe_failing_after_losing_its_lease_opens_the_breaker_again() {
    let b = builder()
        .half_open_calls(1)
        .probe_lease(5 * SEC)
        .build()
        .unwrap();
    trip(&b).await;
    advance(10 * SEC).await;
    let hung = b.try_acquire().unwrap();
    advance(5 * SEC).await;
    let fresh = b.try_acquire().unwrap();
    hung.failure();
    assert_eq!(b.state(), Open);
    // `fresh` belongs to the half-open period that ended: its outcome counts for nothing.
    fresh.success();
    assert_eq!(b.state(), Open);
    // The next half-open period starts afresh.
    advance(60 * SEC).await;
    let next = b.try_acquire().unwrap();
    assert_eq!(b.state(), HalfOpen);
    next.success();
    assert_ne!(b.state(), Open);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_frees_its_slot_at_once() {
    let b = builder().half_open_calls(1).build().unwrap();
    trip(&b).await;
    advance(10 * SEC).await;
    let started = Arc::new(AtomicUsize::new(0));
    let task = {
        let (b, started) = (b.clone(), started.clone());
        tokio::spawn(async move {
            b.call(|| async move {
                started.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<Result<(), &str>>().await
            })
            .await
        })
    };
    until(|| started.load(Ordering::SeqCst) == 1).await;
    let at = Instant::now();
    assert_eq!(retry_after(b.try_acquire()), SEC);
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    // No time passed, and the cancelled call counted as nothing.
    assert_eq!(Instant::now(), at);
    assert_eq!(b.state(), HalfOpen);
    b.try_acquire().expect("slot freed by the drop").success();
    assert_eq!(b.state(), Closed);

    // Same through a timeout dropping the call future.
    trip(&b).await;
    advance(10 * SEC).await;
    let r = timeout(MS, b.call(std::future::pending::<Result<(), &str>>)).await;
    assert!(r.is_err());
    assert_eq!(b.state(), HalfOpen);
    assert!(b.try_acquire().unwrap().is_probe());
}

type Transitions = Arc<Mutex<Vec<(BreakerState, BreakerState)>>>;

fn transition_log(b: CircuitBreakerBuilder) -> (CircuitBreakerBuilder, Transitions) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let b = b.listener(move |e: &Event| {
        if let Event::BreakerTransition { from, to, .. } = e {
            l.lock().unwrap().push((*from, *to));
        }
    });
    (b, log)
}

/// Tries `n` calls that succeed; returns how many were admitted.
fn admitted_of(b: &CircuitBreaker, n: usize) -> usize {
    (0..n)
        .filter(|_| match b.try_acquire() {
            Ok(p) => {
                p.success();
                true
            }
            Err(Error::CircuitOpen { retry_after, .. }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= SEC);
                false
            }
            Err(e) => panic!("{e:?}"),
        })
        .count()
}

#[tokio::test(start_paused = true)]
async fn ramp_admits_a_growing_share_and_closes_at_the_end() {
    let (b, log) = transition_log(
        builder()
            .half_open_calls(1)
            .ramp_up(10 * SEC)
            .ramp_start_percent(10.0),
    );
    let b = b.build().unwrap();
    trip(&b).await;
    advance(10 * SEC).await;
    b.try_acquire().unwrap().success();
    assert_eq!(b.state(), Ramping);

    // Early rejections get the 1 s hint.
    assert!(b.try_acquire().is_ok());
    assert_eq!(retry_after(b.try_acquire()), SEC);
    assert_eq!(admitted_of(&b, 98), 9);
    advance(5 * SEC).await;
    assert_eq!(admitted_of(&b, 100), 55);
    advance(4 * SEC).await;
    assert_eq!(admitted_of(&b, 100), 91);
    assert_eq!(b.state(), Ramping);
    // Rejections near the end are told to come back when the ramp ends.
    advance(SEC / 2).await;
    let r = (0..100).find_map(|_| b.try_acquire().err());
    assert_eq!(r.and_then(|e| e.retry_after()), Some(SEC / 2));
    advance(SEC / 2).await;
    assert_eq!(admitted_of(&b, 100), 100);
    assert_eq!(b.state(), Closed);
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Ramping),
            (Ramping, Closed)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn ramp_reopens_when_its_calls_fail() {
    let (b, log) = transition_log(builder().half_open_calls(1).ramp_up(10 * SEC));
    let b = b.build().unwrap();
    trip(&b).await;
    advance(10 * SEC).await;
    b.try_acquire().unwrap().success();
    assert_eq!(b.state(), Ramping);
    advance(5 * SEC).await;
    // 55 % admitted; fail the admitted ones until minimum_calls (4) is reached.
    let mut failed = 0;
    while b.state() == Ramping {
        if let Ok(p) = b.try_acquire() {
            p.failure();
            failed += 1;
        }
    }
    assert_eq!(failed, 4);
    assert_eq!(b.state(), Open);
    assert_eq!(retry_after(b.try_acquire()), 10 * SEC);
    assert_eq!(log.lock().unwrap().last().copied(), Some((Ramping, Open)));
}

#[tokio::test(start_paused = true)]
async fn ramp_below_threshold_keeps_going() {
    let b = builder()
        .half_open_calls(1)
        .ramp_up(10 * SEC)
        .build()
        .unwrap();
    trip(&b).await;
    advance(10 * SEC).await;
    b.try_acquire().unwrap().success();
    advance(9 * SEC).await;
    // One failure in four admitted calls: 25 %.
    let mut outcomes = [true, true, true, false].into_iter();
    let mut admitted = 0;
    while admitted < 4 {
        if let Ok(p) = b.try_acquire() {
            if outcomes.next().unwrap() {
                p.success();
            } else {
                p.failure();
            }
            admitted += 1;
        }
    }
    assert_eq!(b.state(), Ramping);
    advance(SEC).await;
    b.try_acquire().unwrap().success();
    assert_eq!(b.state(), Closed);
}
