//! Per-call overhead of bulwark's policies next to their peers, in one run.
//!
//! Every benchmark measures the *healthy* path (closed breaker, free bulkhead slot,
//! conforming rate-limit cell, first attempt succeeds) around an operation that is
//! already complete, so what is timed is the policy and nothing else. Futures are
//! polled once with `now_or_never` inside `rt.enter()` (no scheduler round-trip);
//! tower services are driven as a caller would: `poll_ready`, `call`, poll.
//!
//! Groups (the names `bench/library.sh` reads back):
//! `floor`, `clock`, `breaker`, `breaker_2threads`, `breaker_layer`, `retry`,
//! `bulkhead`, `bulkhead_layer`, `rate_limit`, `rate_limit_layer`, `clock_paused`
//! (last on purpose: pausing a clock switches tokio's `Instant::now` to its slow
//! path for the rest of the process).
#![allow(missing_docs)]
// The benchmark harness times wall-clock intervals with `std::time::Instant`, and
// compares it with `tokio::time::Instant`; policy code never does.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::task::noop_waker_ref;
use futures_util::FutureExt;
use tower::{service_fn, Layer, Service};

use bulwark::breaker::{CircuitBreaker, CircuitBreakerLayer};
use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
use bulwark::pipeline::Pipeline;
use bulwark::rate_limit::{KeyedRateLimiter, RateLimitLayer, RateLimiter};
use bulwark::retry::{Retry, RetryBudget};
use bulwark::timeout::Timeout;
use bulwark::Outcome;

/// A current-thread runtime with time enabled (what the policies run in).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Polls `fut` until it completes, spinning on `Pending` (for a contended async
/// mutex, whose holder is another thread that will release it soon).
fn spin_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(noop_waker_ref());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::hint::spin_loop();
    }
}

/// Drives one request through a tower service as a caller would: `poll_ready`,
/// `call`, then polls the response future (ready on first poll here).
#[inline]
fn tower_once<S, Req>(svc: &mut S, req: Req) -> Result<S::Response, S::Error>
where
    S: Service<Req>,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => return Err(e),
        Poll::Pending => panic!("service not ready"),
    }
    let fut = svc.call(req);
    spin_on(fut)
}

/// The inner service every layer wraps: answers at once.
#[derive(Clone, Copy)]
struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u64) -> Self::Future {
        ready(Ok(req))
    }
}

/// A service_fn variant of [`Echo`] (tower-resilience wants `Clone + Send +
/// 'static`, which both are; the function form is what its docs use).
fn echo_fn(
) -> impl Service<u64, Response = u64, Error = Infallible, Future = Ready<Result<u64, Infallible>>>
       + Clone
       + Send
       + 'static {
    service_fn(|req: u64| ready(Ok::<_, Infallible>(req)))
}

/// Runs `per_thread(iters)` on this thread and one other at once; returns the wall
/// time, so criterion's per-iteration figure is the time one call takes as seen by
/// each of the two contending callers.
fn two_threads<F>(iters: u64, work: F) -> Duration
where
    F: Fn(u64) + Send + Sync + Clone + 'static,
{
    let barrier = Arc::new(Barrier::new(2));
    let other = {
        let (b, w) = (barrier.clone(), work.clone());
        std::thread::spawn(move || {
            b.wait();
            w(iters);
        })
    };
    barrier.wait();
    let start = std::time::Instant::now();
    work(iters);
    other.join().expect("worker thread");
    start.elapsed()
}

const MANY: u32 = 1_000_000_000;

fn closed_breaker() -> CircuitBreaker {
    CircuitBreaker::builder().build().expect("valid breaker")
}

fn bench_floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("floor");
    let a = AtomicU64::new(0);
    let b = AtomicU64::new(0);
    g.bench_function("atomic_load_fetch_add", |bn| {
        bn.iter(|| {
            let s = black_box(&a).load(Ordering::Acquire);
            black_box(&b).fetch_add(1, Ordering::Relaxed);
            s
        })
    });
    let sem = tokio::sync::Semaphore::new(1024);
    g.bench_function("tokio_semaphore_try_acquire_drop", |bn| {
        bn.iter(|| drop(black_box(&sem).try_acquire().expect("free permit")))
    });
    g.finish();
}

fn bench_clock(c: &mut Criterion) {
    let mut g = c.benchmark_group("clock");
    g.bench_function("std_instant_now", |b| b.iter(std::time::Instant::now));
    g.bench_function("tokio_instant_now_no_runtime", |b| {
        b.iter(tokio::time::Instant::now)
    });
    let rt = runtime();
    let _e = rt.enter();
    g.bench_function("tokio_instant_now_in_runtime", |b| {
        b.iter(tokio::time::Instant::now)
    });
    g.finish();
}

fn bench_breaker(c: &mut Criterion) {
    let rt = runtime();
    let _e = rt.enter();
    let mut g = c.benchmark_group("breaker");

    let breaker = closed_breaker();
    g.bench_function("bulwark_permit", |b| {
        b.iter(|| {
            let p = black_box(&breaker).try_acquire().expect("closed");
            p.record(Outcome::Success);
        })
    });
    g.bench_function("bulwark_call", |b| {
        b.iter(|| {
            black_box(&breaker)
                .call(|| async { Ok::<_, ()>(black_box(1u64)) })
                .now_or_never()
                .expect("ready")
        })
    });

    // Not the default: a time window reads the clock on every record.
    let timed = CircuitBreaker::builder()
        .time_window(Duration::from_secs(60))
        .build()
        .expect("valid breaker");
    g.bench_function("bulwark_permit_time_window", |b| {
        b.iter(|| {
            let p = black_box(&timed).try_acquire().expect("closed");
            p.record(Outcome::Success);
        })
    });

    let fs = failsafe::Config::new().build();
    g.bench_function("failsafe_call", |b| {
        use failsafe::CircuitBreaker as _;
        b.iter(|| black_box(&fs).call(|| Ok::<_, ()>(())))
    });
    g.finish();

    let mut g = c.benchmark_group("breaker_2threads");
    let br = closed_breaker();
    g.bench_function("bulwark_permit", |b| {
        b.iter_custom(|iters| {
            let br = br.clone();
            two_threads(iters, move |n| {
                for _ in 0..n {
                    let p = black_box(&br).try_acquire().expect("closed");
                    p.record(Outcome::Success);
                }
            })
        })
    });
    let br = closed_breaker();
    g.bench_function("bulwark_call", |b| {
        b.iter_custom(|iters| {
            let br = br.clone();
            two_threads(iters, move |n| {
                for _ in 0..n {
                    let r = black_box(&br)
                        .call(|| async { Ok::<_, ()>(black_box(1u64)) })
                        .now_or_never();
                    black_box(r);
                }
            })
        })
    });
    let fs = failsafe::Config::new().build();
    g.bench_function("failsafe_call", |b| {
        b.iter_custom(|iters| {
            let fs = fs.clone();
            two_threads(iters, move |n| {
                use failsafe::CircuitBreaker as _;
                for _ in 0..n {
                    let _ = black_box(black_box(&fs).call(|| Ok::<_, ()>(())));
                }
            })
        })
    });
    let tr = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .build()
        .expect("valid tower-resilience breaker")
        .layer(echo_fn());
    g.bench_function("tower_resilience_service", |b| {
        b.iter_custom(|iters| {
            let tr = tr.clone();
            two_threads(iters, move |n| {
                let mut svc = tr.clone();
                for _ in 0..n {
                    let _ = black_box(tower_once(&mut svc, black_box(1u64)));
                }
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("breaker_layer");
    let mut svc = CircuitBreakerLayer::new(closed_breaker()).layer(Echo);
    g.bench_function("bulwark_service", |b| {
        b.iter(|| tower_once(&mut svc, black_box(1u64)))
    });
    let mut svc = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .build()
        .expect("valid tower-resilience breaker")
        .layer(echo_fn());
    g.bench_function("tower_resilience_service", |b| {
        b.iter(|| tower_once(&mut svc, black_box(1u64)))
    });
    g.finish();
}

fn bench_retry(c: &mut Criterion) {
    let rt = runtime();
    let _e = rt.enter();
    let mut g = c.benchmark_group("retry");
    let plain = Retry::builder().build().expect("valid retry");
    g.bench_function("bulwark_call", |b| {
        b.iter(|| {
            black_box(&plain)
                .call(|| async { Ok::<_, ()>(black_box(1u64)) })
                .now_or_never()
                .expect("ready")
        })
    });
    let budgeted = Retry::builder()
        .budget(RetryBudget::builder().build().expect("valid budget"))
        .build()
        .expect("valid retry");
    g.bench_function("bulwark_call_budget", |b| {
        b.iter(|| {
            black_box(&budgeted)
                .call(|| async { Ok::<_, ()>(black_box(1u64)) })
                .now_or_never()
                .expect("ready")
        })
    });
    g.finish();
}

fn bench_pipeline(c: &mut Criterion) {
    let rt = runtime();
    let _e = rt.enter();
    let mut g = c.benchmark_group("pipeline");
    // Every stage but hedge and fallback (which add nothing on the healthy path).
    let full = Pipeline::builder()
        .total_timeout(Timeout::total(Duration::from_secs(30)))
        .retry(
            Retry::builder()
                .budget(RetryBudget::builder().build().expect("valid budget"))
                .build()
                .expect("valid retry"),
        )
        .circuit_breaker(CircuitBreaker::builder().build().expect("valid breaker"))
        .rate_limiter(
            RateLimiter::builder()
                .per_second(1_000_000_000)
                .burst(1_000_000)
                .build()
                .expect("valid limiter"),
        )
        .bulkhead(Bulkhead::builder().build().expect("valid bulkhead"))
        .attempt_timeout(Timeout::attempt(Duration::from_secs(10)))
        .build()
        .expect("valid pipeline");
    g.bench_function("bulwark_full", |b| {
        b.iter(|| {
            black_box(&full)
                .call(|| async { Ok::<_, ()>(black_box(1u64)) })
                .now_or_never()
                .expect("ready")
        })
    });
    let lean = Pipeline::builder()
        .retry(Retry::builder().build().expect("valid retry"))
        .circuit_breaker(CircuitBreaker::builder().build().expect("valid breaker"))
        .build()
        .expect("valid pipeline");
    g.bench_function("bulwark_retry_breaker", |b| {
        b.iter(|| {
            black_box(&lean)
                .call(|| async { Ok::<_, ()>(black_box(1u64)) })
                .now_or_never()
                .expect("ready")
        })
    });
    g.finish();
}

fn bench_bulkhead(c: &mut Criterion) {
    let rt = runtime();
    let _e = rt.enter();
    let mut g = c.benchmark_group("bulkhead");
    let bh = Bulkhead::builder().build().expect("valid bulkhead");
    g.bench_function("bulwark_try_acquire_drop", |b| {
        b.iter(|| drop(black_box(&bh).try_acquire().expect("free slot")))
    });
    g.bench_function("bulwark_call", |b| {
        b.iter(|| {
            black_box(&bh)
                .call(|| async { Ok::<_, ()>(black_box(1u64)) })
                .now_or_never()
                .expect("ready")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("bulkhead_layer");
    let mut svc =
        BulkheadLayer::new(Bulkhead::builder().build().expect("valid bulkhead")).layer(Echo);
    g.bench_function("bulwark_service", |b| {
        b.iter(|| tower_once(&mut svc, black_box(1u64)))
    });
    let mut svc = tower_resilience::bulkhead::BulkheadLayer::builder()
        .max_concurrent_calls(256)
        .build()
        .expect("valid tower-resilience bulkhead")
        .layer(echo_fn());
    g.bench_function("tower_resilience_service", |b| {
        b.iter(|| tower_once(&mut svc, black_box(1u64)))
    });
    g.finish();
}

fn bench_rate_limit(c: &mut Criterion) {
    let rt = runtime();
    let _e = rt.enter();
    let mut g = c.benchmark_group("rate_limit");
    // One cell per nanosecond with a large burst: a check never waits or rejects,
    // whatever the machine's speed.
    let rl = RateLimiter::builder()
        .per_second(MANY)
        .burst(MANY)
        .build()
        .expect("valid limiter");
    g.bench_function("bulwark_check", |b| {
        b.iter(|| black_box(&rl).check().expect("conforms"))
    });
    let keyed = KeyedRateLimiter::builder()
        .per_second(MANY)
        .burst(MANY)
        .build::<u64>()
        .expect("valid keyed limiter");
    let key = 42u64;
    keyed.check(&key).expect("conforms");
    g.bench_function("bulwark_keyed_check_warm", |b| {
        b.iter(|| black_box(&keyed).check(black_box(&key)).expect("conforms"))
    });

    let quota = governor::Quota::per_second(NonZeroU32::new(MANY).expect("non-zero"))
        .allow_burst(NonZeroU32::new(MANY).expect("non-zero"));
    let gov = governor::RateLimiter::direct(quota);
    g.bench_function("governor_check", |b| {
        b.iter(|| black_box(&gov).check().expect("conforms"))
    });
    let gov_keyed = governor::RateLimiter::keyed(quota);
    gov_keyed.check_key(&key).expect("conforms");
    g.bench_function("governor_keyed_check_warm", |b| {
        b.iter(|| {
            black_box(&gov_keyed)
                .check_key(black_box(&key))
                .expect("conforms")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("rate_limit_layer");
    let mut svc = RateLimitLayer::new(
        RateLimiter::builder()
            .per_second(MANY)
            .burst(MANY)
            .build()
            .expect("valid limiter"),
    )
    .layer(Echo);
    g.bench_function("bulwark_service", |b| {
        b.iter(|| tower_once(&mut svc, black_box(1u64)))
    });
    let mut svc = tower_resilience::ratelimiter::RateLimiterLayer::builder()
        .limit_for_period(usize::MAX / 2)
        .refresh_period(Duration::from_secs(1))
        .timeout_duration(Duration::ZERO)
        .build()
        .expect("valid tower-resilience rate limiter")
        .layer(echo_fn());
    g.bench_function("tower_resilience_service", |b| {
        b.iter(|| tower_once(&mut svc, black_box(1u64)))
    });
    g.finish();
}

/// Last: what `tokio::time::Instant::now()` costs once any runtime in the process
/// has paused its clock (as every `start_paused` test does): tokio then looks the
/// clock up through the runtime context and locks it on each read.
fn bench_clock_paused(c: &mut Criterion) {
    let mut g = c.benchmark_group("clock_paused");
    let paused = runtime();
    paused.block_on(async { tokio::time::pause() });
    let other = runtime();
    g.bench_function("tokio_instant_now_no_runtime", |b| {
        b.iter(tokio::time::Instant::now)
    });
    {
        let _e = other.enter();
        g.bench_function("tokio_instant_now_in_unpaused_runtime", |b| {
            b.iter(tokio::time::Instant::now)
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_floor,
    bench_clock,
    bench_breaker,
    bench_retry,
    bench_pipeline,
    bench_bulkhead,
    bench_rate_limit,
    bench_clock_paused
);
criterion_main!(benches);
