//! A circuit breaker and a retry around a flaky dependency, in real time.
//!
//! The dependency fails 15% of the time, goes fully down for two seconds, then
//! recovers. Watch the breaker open (callers get a fast `circuit_open` instead of
//! waiting on a dead dependency), probe in half-open, and close again; the retry
//! hides the ordinary 15% of failures from callers.
//!
//! Run: `cargo run --release -p bulwark --example flaky_breaker`
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulwark::breaker::CircuitBreaker;
use bulwark::events::Event;
use bulwark::pipeline::Pipeline;
use bulwark::retry::{Backoff, Jitter, Retry, RetryBudget};
use bulwark::timeout::Timeout;
use tokio::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let start = Instant::now();
    let breaker = CircuitBreaker::builder()
        .name("flaky")
        .count_window(50)
        .minimum_calls(20)
        .failure_rate_threshold(50.0)
        .open_duration(Duration::from_millis(500))
        .half_open_calls(3)
        .listener(move |e: &Event| {
            if let Event::BreakerTransition { name, from, to } = e {
                println!(
                    "{:>6.2}s  breaker `{name}`: {from} -> {to}",
                    start.elapsed().as_secs_f64()
                );
            }
        })
        .build()
        .expect("valid breaker settings");
    let pipeline = Pipeline::builder()
        .total_timeout(Timeout::total(Duration::from_millis(300)))
        .retry(
            Retry::builder()
                .max_attempts(3)
                .backoff(Backoff::exponential(Duration::from_millis(5)).jitter(Jitter::Full))
                .budget(RetryBudget::default())
                .build()
                .expect("valid retry settings"),
        )
        .circuit_breaker(breaker.clone())
        .attempt_timeout(Timeout::attempt(Duration::from_millis(100)))
        .build()
        .expect("valid pipeline");

    let dependency_calls = Arc::new(AtomicU64::new(0));
    let dependency_errors = Arc::new(AtomicU64::new(0));
    let (mut ok, mut failed, mut rejected) = (0u64, 0u64, 0u64);
    fastrand::seed(7);
    println!("  time  event");
    while start.elapsed() < Duration::from_secs(5) {
        // Down between 1.5 s and 3.5 s; otherwise 15% of calls fail.
        let t = start.elapsed();
        let down = t >= Duration::from_millis(1500) && t < Duration::from_millis(3500);
        let fail_rate = if down { 1.0 } else { 0.15 };
        let (calls, errors) = (dependency_calls.clone(), dependency_errors.clone());
        let r = pipeline
            .call(|| {
                let (calls, errors) = (calls.clone(), errors.clone());
                async move {
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    if fastrand::f64() < fail_rate {
                        errors.fetch_add(1, Ordering::Relaxed);
                        Err("dependency error")
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
        match r {
            Ok(()) => ok += 1,
            Err(bulwark::Error::CircuitOpen { .. }) => rejected += 1,
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    println!();
    println!("callers: {ok} ok, {failed} failed, {rejected} rejected fast by the open breaker");
    println!(
        "dependency: {} calls, {} errors; breaker now {}",
        dependency_calls.load(Ordering::Relaxed),
        dependency_errors.load(Ordering::Relaxed),
        breaker.state()
    );
}
