//! Heap allocations per call on the healthy paths: there must be none.
//!
//! A counting global allocator wraps the system allocator. Counting is switched on
//! per thread (a thread-local flag and a thread-local count), so the other tests of
//! this binary, running on their own threads, neither add to nor read a test's
//! count. Each test warms its path up (first calls may initialise thread-locals),
//! then counts the allocations of [`CALLS`] calls on the test's own thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::noop_waker_ref;
use futures_util::FutureExt;
use tower::{Layer, Service};

use bulwark::breaker::{CircuitBreaker, CircuitBreakerLayer};
use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
use bulwark::rate_limit::{KeyedRateLimiter, RateLimitLayer, RateLimiter};
use bulwark::retry::Retry;
use bulwark::Outcome;

const WARM_UP: usize = 100;
const CALLS: usize = 10_000;

/// Forwards every request to [`System`] unchanged and, when the calling thread
/// has counting on, adds one to that thread's count for each allocation
/// (`alloc`, `alloc_zeroed`, `realloc`; frees are not counted).
struct Counting;

thread_local! {
    // `const` initialisers without destructors: reading them never allocates, so
    // the allocator can use them without recursing into itself.
    static ON: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: during thread teardown the slots may be gone; such an
    // allocation is not one of ours.
    let on = ON.try_with(Cell::get).unwrap_or(false);
    if on {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds
// the `GlobalAlloc` contract; the counting touches only `const`-initialised
// thread-locals (no allocation, no re-entry) and never the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` `WARM_UP` times uncounted, then `CALLS` times counted on this thread;
/// returns the allocations made by the counted calls.
fn allocs_per_calls(mut f: impl FnMut()) -> u64 {
    for _ in 0..WARM_UP {
        f();
    }
    COUNT.with(|c| c.set(0));
    ON.with(|on| on.set(true));
    for _ in 0..CALLS {
        f();
    }
    ON.with(|on| on.set(false));
    COUNT.with(Cell::get)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// An inner service that answers at once.
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

/// `poll_ready`, `call`, one poll; the response must be ready and `Ok`.
fn tower_once<S: Service<u64, Response = u64>>(svc: &mut S)
where
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let r = svc.call(7).now_or_never().expect("ready at once");
    assert_eq!(r.expect("admitted"), 7);
}

#[test]
fn closed_breaker_permit_does_not_allocate() {
    let breaker = CircuitBreaker::builder().build().unwrap();
    let n = allocs_per_calls(|| {
        breaker.try_acquire().unwrap().record(Outcome::Success);
    });
    assert_eq!(n, 0, "allocations in {CALLS} permit calls");
}

#[test]
fn closed_breaker_permit_dropped_unreported_does_not_allocate() {
    let breaker = CircuitBreaker::builder().build().unwrap();
    let n = allocs_per_calls(|| drop(breaker.try_acquire().unwrap()));
    assert_eq!(n, 0, "allocations in {CALLS} acquire+drop calls");
}

#[test]
fn closed_breaker_call_does_not_allocate() {
    let rt = runtime();
    let _e = rt.enter();
    let breaker = CircuitBreaker::builder().build().unwrap();
    let n = allocs_per_calls(|| {
        let r = breaker
            .call(|| async { Ok::<_, ()>(1) })
            .now_or_never()
            .expect("ready at once");
        assert_eq!(r, Ok(1));
    });
    assert_eq!(n, 0, "allocations in {CALLS} breaker calls");
}

#[test]
fn closed_breaker_with_time_window_and_slow_calls_does_not_allocate() {
    let rt = runtime();
    let _e = rt.enter();
    let breaker = CircuitBreaker::builder()
        .time_window(Duration::from_secs(60))
        .slow_call_duration(Duration::from_secs(1))
        .build()
        .unwrap();
    let n = allocs_per_calls(|| {
        breaker.try_acquire().unwrap().record(Outcome::Success);
    });
    assert_eq!(n, 0, "allocations in {CALLS} permit calls");
}

#[test]
fn closed_breaker_service_does_not_allocate() {
    let breaker = CircuitBreaker::builder().build().unwrap();
    let mut svc = CircuitBreakerLayer::new(breaker).layer(Echo);
    let n = allocs_per_calls(|| tower_once(&mut svc));
    assert_eq!(n, 0, "allocations in {CALLS} service calls");
}

#[test]
fn bulkhead_try_acquire_and_drop_does_not_allocate() {
    let bulkhead = Bulkhead::builder().build().unwrap();
    let n = allocs_per_calls(|| drop(bulkhead.try_acquire().unwrap()));
    assert_eq!(n, 0, "allocations in {CALLS} acquire+drop");
    assert_eq!(bulkhead.in_flight(), 0);
}

#[test]
fn bulkhead_call_with_a_free_slot_does_not_allocate() {
    let rt = runtime();
    let _e = rt.enter();
    let bulkhead = Bulkhead::builder().build().unwrap();
    let n = allocs_per_calls(|| {
        let r = bulkhead
            .call(|| async { Ok::<_, ()>(1) })
            .now_or_never()
            .expect("ready at once");
        assert_eq!(r, Ok(1));
    });
    assert_eq!(n, 0, "allocations in {CALLS} bulkhead calls");
}

#[test]
fn bulkhead_service_with_a_free_slot_does_not_allocate() {
    let bulkhead = Bulkhead::builder().build().unwrap();
    let mut svc = BulkheadLayer::new(bulkhead).layer(Echo);
    let n = allocs_per_calls(|| tower_once(&mut svc));
    assert_eq!(n, 0, "allocations in {CALLS} service calls");
}

fn roomy_limiter() -> RateLimiter {
    // A cell per microsecond with a burst larger than the calls made: every check
    // conforms.
    RateLimiter::builder()
        .per_second(1_000_000)
        .burst(1_000_000)
        .build()
        .unwrap()
}

#[test]
fn rate_limiter_check_does_not_allocate() {
    let limiter = roomy_limiter();
    let n = allocs_per_calls(|| limiter.check().unwrap());
    assert_eq!(n, 0, "allocations in {CALLS} checks");
}

#[test]
fn rate_limiter_service_does_not_allocate() {
    let mut svc = RateLimitLayer::new(roomy_limiter()).layer(Echo);
    let n = allocs_per_calls(|| tower_once(&mut svc));
    assert_eq!(n, 0, "allocations in {CALLS} service calls");
}

#[test]
fn keyed_rate_limiter_check_of_a_known_key_does_not_allocate() {
    let limiter = KeyedRateLimiter::builder()
        .per_second(1_000_000)
        .burst(1_000_000)
        // Recomputing the top-N labels allocates; it is due at most this often,
        // and not within this test.
        .label_refresh(Duration::from_secs(3600))
        .build::<u64>()
        .unwrap();
    let n = allocs_per_calls(|| limiter.check(&42).unwrap());
    assert_eq!(n, 0, "allocations in {CALLS} keyed checks");
}

#[test]
fn retry_call_succeeding_at_once_does_not_allocate() {
    let rt = runtime();
    let _e = rt.enter();
    let retry = Retry::builder().build().unwrap();
    let n = allocs_per_calls(|| {
        let r = retry
            .call(|| async { Ok::<_, ()>(1) })
            .now_or_never()
            .expect("ready at once");
        assert_eq!(r, Ok(1));
    });
    assert_eq!(n, 0, "allocations in {CALLS} retry calls");
}

#[test]
fn the_counter_sees_allocations() {
    // The harness itself: a Box made while counting is counted.
    let n = allocs_per_calls(|| drop(std::hint::black_box(Box::new(1u64))));
    assert_eq!(n, CALLS as u64);
}
