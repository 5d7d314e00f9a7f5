//! Retry policy: exact timing, stop conditions, classification, events, budget,
//! deadline awareness. All on paused time.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::retry::{Backoff, Retry, RetryBudget, Stop};
use bulwark::timeout::{Deadline, Timeout};
use bulwark::{Error, Event, Outcome};
use tokio::time::{sleep, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Records the instant (relative to `start`) at which each attempt begins.
#[derive(Clone)]
struct Log {
    start: Instant,
    at: Arc<Mutex<Vec<Duration>>>,
}

impl Log {
    fn new() -> Self {
        Log {
            start: Instant::now(),
            at: Arc::default(),
        }
    }
    /// Records an attempt; returns its number (1-based).
    fn hit(&self) -> usize {
        let mut v = self.at.lock().unwrap();
        v.push(self.start.elapsed());
        v.len()
    }
    fn times(&self) -> Vec<Duration> {
        self.at.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.at.lock().unwrap().len()
    }
    /// An operation that records each attempt and returns `result` at once.
    fn answering<'a, T: Clone + 'a>(
        &'a self,
        result: T,
    ) -> impl FnMut() -> std::future::Ready<T> + 'a {
        move || {
            self.hit();
            std::future::ready(result.clone())
        }
    }
    /// An operation that records each attempt, takes `d`, then returns `result`.
    fn answering_after<T: Clone + Send + 'static>(
        &self,
        d: Duration,
        result: T,
    ) -> impl FnMut() -> Pin<Box<dyn Future<Output = T> + Send>> + '_ {
        move || {
            self.hit();
            let r = result.clone();
            Box::pin(async move {
                sleep(d).await;
                r
            })
        }
    }
}

fn events() -> (
    Arc<Mutex<Vec<Event>>>,
    impl Fn(&Event) + Send + Sync + 'static,
) {
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let s = seen.clone();
    (seen, move |e: &Event| s.lock().unwrap().push(e.clone()))
}

#[tokio::test(start_paused = true)]
async fn attempts_start_at_exact_instants() {
    let retry = Retry::builder()
        .max_attempts(4)
        .backoff(Backoff::exponential(ms(100)))
        .build()
        .unwrap();
    let log = Log::new();
    let r: Result<(), Error<&str>> = retry.call(log.answering(Err("down"))).await;
    assert_eq!(r, Err(Error::Inner("down")));
    assert_eq!(log.times(), [ms(0), ms(100), ms(300), ms(700)]);
    // Returned right after the last attempt: no sleep after it.
    assert_eq!(log.start.elapsed(), ms(700));
}

#[tokio::test(start_paused = true)]
async fn attempt_latency_adds_to_the_schedule() {
    // Each attempt takes 50 ms to fail; the backoff starts when it fails.
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::fixed(ms(100)))
        .build()
        .unwrap();
    let log = Log::new();
    let _ = retry
        .call(log.answering_after(ms(50), Err::<(), _>("slow failure")))
        .await;
    assert_eq!(log.times(), [ms(0), ms(150), ms(300)]);
}

#[tokio::test(start_paused = true)]
async fn success_stops_retrying() {
    let retry = Retry::builder()
        .max_attempts(5)
        .backoff(Backoff::fixed(ms(10)))
        .build()
        .unwrap();
    let log = Log::new();
    let (r, report) = retry
        .call_with_report(&bulwark::classify::AnyError, || {
            let n = log.hit();
            async move {
                if n < 3 {
                    Err("flaky")
                } else {
                    Ok(n)
                }
            }
        })
        .await;
    assert_eq!(r, Ok(3));
    assert_eq!(report.attempts, 3);
    assert_eq!(report.stop, Stop::Success);
    assert_eq!(log.times(), [ms(0), ms(10), ms(20)]);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_one_means_no_retry() {
    let retry = Retry::builder().max_attempts(1).build().unwrap();
    let log = Log::new();
    let (r, report) = retry
        .call_with_report(
            &bulwark::classify::AnyError,
            log.answering(Err::<(), _>("x")),
        )
        .await;
    assert_eq!(r, Err(Error::Inner("x")));
    assert_eq!(report.stop, Stop::AttemptsExhausted);
    assert_eq!(log.count(), 1);
    assert!(Retry::builder().max_attempts(0).build().is_err());
}

#[tokio::test(start_paused = true)]
async fn max_elapsed_stops_new_attempts() {
    let retry = Retry::builder()
        .max_attempts(10)
        .max_elapsed(ms(250))
        .backoff(Backoff::fixed(ms(100)))
        .build()
        .unwrap();
    let log = Log::new();
    let (r, report) = retry
        .call_with_report(
            &bulwark::classify::AnyError,
            log.answering(Err::<(), _>("x")),
        )
        .await;
    assert_eq!(r, Err(Error::Inner("x")));
    assert_eq!(report.stop, Stop::MaxElapsed);
    // The attempt due at 300 ms would start past 250 ms: not made, and not slept for.
    assert_eq!(log.times(), [ms(0), ms(100), ms(200)]);
    assert_eq!(log.start.elapsed(), ms(200));
}

#[tokio::test(start_paused = true)]
async fn max_elapsed_is_strict_at_the_limit() {
    // An attempt due exactly at start + max_elapsed does not start.
    let retry = Retry::builder()
        .max_attempts(10)
        .max_elapsed(ms(200))
        .backoff(Backoff::fixed(ms(100)))
        .build()
        .unwrap();
    let log = Log::new();
    let _ = retry.call(log.answering(Err::<(), _>("x"))).await;
    assert_eq!(log.times(), [ms(0), ms(100)]);
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Status(u16);

fn by_status(r: &Result<Status, &'static str>) -> Outcome {
    match r {
        Ok(Status(503)) => Outcome::Failure,
        Ok(Status(429)) => Outcome::FailureRetryAfter(Duration::from_secs(1)),
        Ok(Status(404)) => Outcome::Ignore,
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    }
}

#[tokio::test(start_paused = true)]
async fn ok_values_classified_as_failure_are_retried() {
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::fixed(ms(10)))
        .build()
        .unwrap();
    let log = Log::new();
    let r = retry
        .call_with(&by_status, || {
            let n = log.hit();
            async move { Ok(if n < 3 { Status(503) } else { Status(200) }) }
        })
        .await;
    assert_eq!(r, Ok(Status(200)));
    assert_eq!(log.count(), 3);

    // When attempts run out, the last Ok is returned as it is.
    let log = Log::new();
    let r = retry
        .call_with(&by_status, log.answering(Ok(Status(503))))
        .await;
    assert_eq!(r, Ok(Status(503)));
    assert_eq!(log.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn ignored_results_are_not_retried() {
    let retry = Retry::builder().max_attempts(3).build().unwrap();
    let log = Log::new();
    let (r, report) = retry
        .call_with_report(&by_status, log.answering(Ok(Status(404))))
        .await;
    assert_eq!(r, Ok(Status(404)));
    assert_eq!(report.stop, Stop::NotRetryable);
    assert_eq!(log.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_a_lower_bound_on_the_delay() {
    // Hint 1 s > backoff 100 ms: waits 1 s.
    let retry = Retry::builder()
        .max_attempts(2)
        .backoff(Backoff::fixed(ms(100)))
        .build()
        .unwrap();
    let log = Log::new();
    let _ = retry
        .call_with(&by_status, log.answering(Ok(Status(429))))
        .await;
    assert_eq!(log.times(), [ms(0), ms(1000)]);

    // Hint 1 s < backoff 3 s: waits the backoff.
    let retry = Retry::builder()
        .max_attempts(2)
        .backoff(Backoff::fixed(ms(3000)))
        .build()
        .unwrap();
    let log = Log::new();
    let _ = retry
        .call_with(&by_status, log.answering(Ok(Status(429))))
        .await;
    assert_eq!(log.times(), [ms(0), ms(3000)]);
}

#[tokio::test(start_paused = true)]
async fn too_long_retry_after_ends_retries() {
    let retry = Retry::builder()
        .max_attempts(3)
        .max_retry_after(ms(500))
        .build()
        .unwrap();
    let log = Log::new();
    let (r, report) = retry
        .call_with_report(&by_status, log.answering(Ok(Status(429))))
        .await;
    assert_eq!(r, Ok(Status(429)));
    assert_eq!(report.stop, Stop::RetryAfterTooLong);
    assert_eq!(log.count(), 1);
    assert_eq!(log.start.elapsed(), ms(0));
}

#[tokio::test(start_paused = true)]
async fn events_report_each_retry_and_exhaustion() {
    let (seen, listener) = events();
    let retry = Retry::builder()
        .name("inv")
        .max_attempts(3)
        .backoff(Backoff::exponential(ms(100)))
        .listener(listener)
        .build()
        .unwrap();
    let _ = retry.call(|| async { Err::<(), _>("x") }).await;
    let name: Arc<str> = "inv".into();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            Event::Retry {
                name: name.clone(),
                attempt: 2,
                delay: ms(100),
                reason: "failure",
            },
            Event::Retry {
                name: name.clone(),
                attempt: 3,
                delay: ms(200),
                reason: "failure",
            },
            Event::RetryExhausted { name, attempts: 3 },
        ]
    );

    // A healthy call emits nothing.
    seen.lock().unwrap().clear();
    let _ = retry.call(|| async { Ok::<_, ()>(1) }).await;
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn nested_policy_errors_flatten() {
    let retry = Retry::builder()
        .max_attempts(2)
        .backoff(Backoff::none())
        .build()
        .unwrap();
    let timeout = Timeout::attempt(ms(100));
    let log = Log::new();
    let r = retry
        .call(|| {
            log.hit();
            timeout.call(|| async {
                sleep(ms(500)).await;
                Ok::<_, &str>(())
            })
        })
        .await;
    assert_eq!(r.map_err(Error::flatten), Err(Error::Timeout));
    // Each attempt was cut at 100 ms; no backoff.
    assert_eq!(log.times(), [ms(0), ms(100)]);
}

// ---------------------------------------------------------------- budget

#[tokio::test(start_paused = true)]
async fn budget_arithmetic() {
    let b = RetryBudget::builder()
        .min_retries_per_sec(0)
        .percent_can_retry(0.1)
        .build()
        .unwrap();
    assert_eq!(b.balance(), 0);
    assert!(!b.try_withdraw());
    for _ in 0..25 {
        b.deposit();
    }
    assert_eq!(b.balance(), 2);
    assert!(b.try_withdraw());
    assert!(b.try_withdraw());
    assert!(!b.try_withdraw());
    assert_eq!(b.balance(), 0);
    for _ in 0..5 {
        b.deposit();
    }
    // 30 deposits * 0.1 - 2 withdrawals.
    assert_eq!(b.balance(), 1);

    let floor = RetryBudget::builder()
        .ttl(Duration::from_secs(10))
        .min_retries_per_sec(10)
        .percent_can_retry(0.2)
        .build()
        .unwrap();
    assert_eq!(floor.balance(), 100, "reserve = 10/s * 10 s");
    assert_eq!(RetryBudget::default().balance(), 100);

    assert!(RetryBudget::builder()
        .ttl(Duration::from_millis(500))
        .build()
        .is_err());
    assert!(RetryBudget::builder()
        .ttl(Duration::from_secs(61))
        .build()
        .is_err());
    assert!(RetryBudget::builder()
        .percent_can_retry(-0.1)
        .build()
        .is_err());
    assert!(RetryBudget::builder()
        .percent_can_retry(f64::NAN)
        .build()
        .is_err());
}

#[tokio::test(start_paused = true)]
async fn thousand_failing_calls_retry_at_most_ratio_plus_floor() {
    let ttl = Duration::from_secs(10);
    let (min_per_sec, ratio) = (10, 0.1);
    let floor = 100; // 10/s * 10 s
    let budget = RetryBudget::builder()
        .ttl(ttl)
        .min_retries_per_sec(min_per_sec)
        .percent_can_retry(ratio)
        .build()
        .unwrap();
    let (seen, listener) = events();
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::none())
        .budget(budget.clone())
        .listener(listener)
        .build()
        .unwrap();
    let log = Log::new();
    for _ in 0..1000 {
        let _ = retry.call(log.answering(Err::<(), _>("down"))).await;
    }
    let retries = log.count() - 1000;
    assert!(retries <= 100 + floor, "{retries} retries");
    // Sequential calls use every token: exactly the bound.
    assert_eq!(retries, 100 + floor);
    assert_eq!(budget.balance(), 0);
    let exhausted = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::RetryBudgetExhausted { .. }))
        .count();
    assert!(exhausted > 0);
}

#[tokio::test(start_paused = true)]
async fn deposits_and_withdrawals_expire_after_ttl() {
    let b = RetryBudget::builder()
        .ttl(Duration::from_secs(10))
        .min_retries_per_sec(0)
        .percent_can_retry(1.0)
        .build()
        .unwrap();
    for _ in 0..50 {
        b.deposit();
    }
    assert_eq!(b.balance(), 50);
    tokio::time::advance(Duration::from_secs(10) - ms(1)).await;
    assert_eq!(b.balance(), 50, "still inside the ttl");
    tokio::time::advance(ms(1)).await;
    assert_eq!(b.balance(), 0, "expired at ttl");

    // A deposit made late in a slice expires no earlier than 0.9 * ttl.
    tokio::time::advance(ms(999)).await; // 999 ms into a 1 s slice
    b.deposit();
    tokio::time::advance(ms(8001)).await;
    assert_eq!(b.balance(), 1, "counted for at least 0.9 * ttl");
    tokio::time::advance(ms(1000)).await;
    assert_eq!(b.balance(), 0, "gone within ttl");
}

#[tokio::test(start_paused = true)]
async fn floor_refills_after_ttl() {
    let b = RetryBudget::builder()
        .ttl(Duration::from_secs(2))
        .min_retries_per_sec(5)
        .percent_can_retry(0.0)
        .build()
        .unwrap();
    for _ in 0..10 {
        assert!(b.try_withdraw());
    }
    assert!(!b.try_withdraw());
    assert_eq!(b.balance(), 0);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(b.balance(), 0, "withdrawals still count");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(b.balance(), 10, "refilled once the withdrawals expired");
}

#[tokio::test(start_paused = true)]
async fn burst_of_failures_cannot_overshoot_the_budget() {
    // 100 concurrent calls fail together, then all want a retry with a long backoff.
    // Tokens are reserved before the sleep, so exactly 10 (100 * 0.1) retry.
    let budget = RetryBudget::builder()
        .min_retries_per_sec(0)
        .percent_can_retry(0.1)
        .build()
        .unwrap();
    let (seen, listener) = events();
    let retry = Retry::builder()
        .max_attempts(5)
        .backoff(Backoff::fixed(Duration::from_secs(5)))
        .budget(budget.clone())
        .listener(listener)
        .build()
        .unwrap();
    let log = Log::new();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let retry = retry.clone();
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            retry
                .call(|| {
                    log.hit();
                    async {
                        // Every call deposits before any fails.
                        sleep(ms(1)).await;
                        Err::<(), _>("down")
                    }
                })
                .await
        }));
    }
    // Let every first attempt fail; the retries are now sleeping their backoff.
    sleep(ms(2)).await;
    let sleeping = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::Retry { .. }))
        .count();
    assert_eq!(sleeping, 10, "only 10 retries entered backoff");
    assert_eq!(budget.balance(), 0);
    for t in tasks {
        let _ = t.await.unwrap();
    }
    // 100 first attempts + 10 retries; the second retries found no token.
    assert_eq!(log.count(), 110);
}

// ---------------------------------------------------------------- deadline

/// A retry whose latency window has seen 10 successes of `latency`.
async fn warmed(latency: Duration, retry: Retry) -> Retry {
    for _ in 0..10 {
        let _ = retry
            .call(|| async move {
                sleep(latency).await;
                Ok::<_, ()>(())
            })
            .await;
    }
    retry
}

#[tokio::test(start_paused = true)]
async fn retry_that_cannot_finish_before_the_deadline_is_not_started() {
    let retry = warmed(
        ms(300),
        Retry::builder()
            .max_attempts(5)
            .backoff(Backoff::fixed(ms(100)))
            .build()
            .unwrap(),
    )
    .await;
    let log = Log::new();
    let (r, report) = Deadline::scope(
        Deadline::after(ms(1000)),
        retry.call_with_report(
            &bulwark::classify::AnyError,
            log.answering_after(ms(300), Err::<(), _>("down")),
        ),
    )
    .await;
    // 0-300 fails; 400-700 fails; an attempt at 800 would need 300 ms, 200 remain.
    assert_eq!(log.times(), [ms(0), ms(400)]);
    assert_eq!(r, Err(Error::Inner("down")));
    assert_eq!(report.stop, Stop::Deadline);
    assert_eq!(report.attempts, 2);
    assert_eq!(log.start.elapsed(), ms(700), "returned without sleeping");
}

#[tokio::test(start_paused = true)]
async fn without_latency_samples_only_the_deadline_counts() {
    let retry = Retry::builder()
        .max_attempts(5)
        .backoff(Backoff::fixed(ms(100)))
        .build()
        .unwrap();
    let log = Log::new();
    let _ = Deadline::scope(
        Deadline::after(ms(1000)),
        retry.call(log.answering_after(ms(300), Err::<(), _>("down"))),
    )
    .await;
    // The attempt due at 1200 ms is past the deadline.
    assert_eq!(log.times(), [ms(0), ms(400), ms(800)]);
}

#[tokio::test(start_paused = true)]
async fn backoff_ending_past_the_deadline_is_not_slept() {
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::fixed(Duration::from_secs(2)))
        .build()
        .unwrap();
    let log = Log::new();
    let r = Deadline::scope(
        Deadline::after(Duration::from_secs(1)),
        retry.call(log.answering(Err::<(), _>("down"))),
    )
    .await;
    assert_eq!(r, Err(Error::Inner("down")));
    assert_eq!(log.count(), 1);
    assert_eq!(log.start.elapsed(), ms(0));
}

#[tokio::test(start_paused = true)]
async fn expired_deadline_makes_no_attempt() {
    let budget = RetryBudget::builder()
        .min_retries_per_sec(0)
        .percent_can_retry(1.0)
        .build()
        .unwrap();
    let retry = Retry::builder().budget(budget.clone()).build().unwrap();
    let log = Log::new();
    let (r, report) = Deadline::scope(Deadline::after(Duration::ZERO), async {
        retry
            .call_with_report(&bulwark::classify::AnyError, log.answering(Ok::<_, ()>(())))
            .await
    })
    .await;
    assert_eq!(r, Err(Error::Timeout));
    assert_eq!(report.attempts, 0);
    assert_eq!(log.count(), 0);
    assert_eq!(budget.balance(), 0, "no call, no deposit");
}

#[tokio::test(start_paused = true)]
async fn deadline_awareness_can_be_turned_off() {
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Backoff::fixed(Duration::from_secs(2)))
        .deadline_aware(false)
        .build()
        .unwrap();
    let log = Log::new();
    let _ = Deadline::scope(
        Deadline::after(Duration::from_secs(1)),
        retry.call(log.answering(Err::<(), _>("down"))),
    )
    .await;
    assert_eq!(log.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn total_timeout_puts_its_deadline_in_scope_for_the_retry() {
    let retry = warmed(
        ms(300),
        Retry::builder()
            .max_attempts(5)
            .backoff(Backoff::fixed(ms(100)))
            .build()
            .unwrap(),
    )
    .await;
    let total = Timeout::total(ms(1000));
    let log = Log::new();
    let r = total
        .call(|| retry.call(log.answering_after(ms(300), Err::<(), _>("down"))))
        .await;
    // Same schedule as with an explicit scope; the retry gave up before the timeout
    // could fire, so the caller sees the dependency's error, at 700 ms.
    assert_eq!(log.times(), [ms(0), ms(400)]);
    assert_eq!(r.map_err(Error::flatten), Err(Error::Inner("down")));
    assert_eq!(log.start.elapsed(), ms(700));
}

#[tokio::test(start_paused = true)]
async fn max_elapsed_uses_the_latency_prediction_too() {
    let retry = warmed(
        ms(300),
        Retry::builder()
            .max_attempts(5)
            .max_elapsed(ms(1000))
            .backoff(Backoff::fixed(ms(100)))
            .build()
            .unwrap(),
    )
    .await;
    let log = Log::new();
    let (_, report) = retry
        .call_with_report(
            &bulwark::classify::AnyError,
            log.answering_after(ms(300), Err::<(), _>("down")),
        )
        .await;
    assert_eq!(log.times(), [ms(0), ms(400)]);
    assert_eq!(report.stop, Stop::MaxElapsed);
}

#[test]
fn policies_are_send_sync_and_call_futures_are_send() {
    fn send_sync<T: Send + Sync + Clone>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Retry>();
    send_sync::<RetryBudget>();
    send_sync::<Timeout>();
    send_sync::<Backoff>();
    let retry = Retry::builder().build().unwrap();
    send(&retry.call(|| async { Ok::<_, ()>(()) }));
    let timeout = Timeout::attempt(ms(1));
    send(&timeout.call(|| async { Ok::<_, ()>(()) }));
    send(&Deadline::scope(Deadline::after(ms(1)), async {}));
}
