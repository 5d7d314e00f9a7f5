//! Builders and public APIs at extreme and odd values (review ev2).

use std::sync::Arc;
use std::time::Duration;

use bulwark::hedge::Hedge;
use bulwark::latency::LatencyWindow;
use bulwark::rate_limit::RateLimiter;
use bulwark::retry::{Backoff, Retry};

const MS: Duration = Duration::from_millis(1);
const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// A rate whose period is too long is a mistake in `rate(..)` (the user never called
/// `burst(..)`): the error names `rate`, not `burst`. An explicit burst that makes the
/// tolerance too long is blamed on `burst`.
#[test]
fn a_too_long_rate_period_is_reported_on_rate() {
    let e = RateLimiter::builder()
        .rate(1, 200 * YEAR)
        .build()
        .expect_err("a 200-year period is refused");
    assert_eq!(e.field(), "rate", "{e}");
    let e = RateLimiter::builder()
        .rate(1, YEAR)
        .burst(1_000)
        .build()
        .expect_err("1000 years of tolerance is refused");
    assert_eq!(e.field(), "burst", "{e}");
}

/// An exponential or Fibonacci backoff from zero never grows (every retry immediate, a hot
/// loop against a failing dependency): refused, as decorrelated jitter from zero is.
#[test]
fn a_zero_base_growing_backoff_is_refused() {
    for b in [
        Backoff::decorrelated_jitter(Duration::ZERO, MS),
        Backoff::exponential(Duration::ZERO),
        Backoff::fibonacci(Duration::ZERO),
    ] {
        assert_eq!(b.validate().unwrap_err().field(), "backoff");
        assert!(Retry::builder().backoff(b).build().is_err());
    }
    assert!(Backoff::none().validate().is_ok());
    assert!(Backoff::fixed(Duration::ZERO).validate().is_ok());
}

/// Percentiles finer than a tenth (p99.95, p99.99) are not rounded to p100, the slowest
/// sample, for a hedge's `delay_percentile` as for a direct query.
#[test]
fn percentiles_finer_than_a_tenth_are_kept() {
    let w = Arc::new(LatencyWindow::new(10_000));
    for i in 1..=10_000u64 {
        w.record(Duration::from_micros(i));
    }
    // Nearest rank: ceil(0.9995 * 10 000) = the 9 995th sample.
    assert_eq!(w.percentile(99.95, 1), Some(Duration::from_micros(9_995)));
    assert_eq!(w.percentile(0.04, 1), Some(Duration::from_micros(4)));
    assert_eq!(w.percentile(99.9, 1), Some(Duration::from_micros(9_990)));
    let hedge = Hedge::builder()
        .delay_percentile(99.99, 1, MS)
        .latency_window(w.clone())
        .build()
        .unwrap();
    assert_eq!(hedge.current_delay(), Duration::from_micros(9_999));
}

/// An empty name (an empty label value in metrics, which Prometheus reads as no label) is
/// refused by every builder, as `Hedge` and `Fallback` refused it already.
#[test]
fn every_builder_refuses_an_empty_name() {
    use bulwark::breaker::CircuitBreaker;
    use bulwark::bulkhead::Bulkhead;
    use bulwark::shed::Shedder;
    use bulwark::timeout::Timeout;
    let fields = [
        CircuitBreaker::builder()
            .name("")
            .build()
            .unwrap_err()
            .field(),
        Bulkhead::builder().name("").build().unwrap_err().field(),
        RateLimiter::builder()
            .per_second(1)
            .name("")
            .build()
            .unwrap_err()
            .field(),
        Retry::builder().name("").build().unwrap_err().field(),
        Shedder::builder()
            .max_concurrent(1)
            .name("")
            .build()
            .unwrap_err()
            .field(),
        Timeout::builder()
            .duration(MS)
            .name("")
            .build()
            .unwrap_err()
            .field(),
    ];
    assert_eq!(fields, ["name"; 6]);
}
