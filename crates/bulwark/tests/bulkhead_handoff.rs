//! A bulkhead's queue at the moment a running call hands its permit to a waiter, and health
//! checks that panic before returning their future (review lib2).
mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
use bulwark::health::{
    check_fn, CheckFuture, CheckResult, Criticality, HealthCheck, HealthChecker, HealthRegistry,
    HealthStatus,
};
use futures_util::FutureExt;
use tower::{Layer, Service, ServiceExt};

const SEC: Duration = Duration::from_secs(1);

/// `max_queued` bounds the calls waiting. When a running call ends, its permit goes to the
/// first waiter, which stops waiting then, before its task runs again: a caller arriving in
/// between (the task that just finished a call and makes its next one) is the only waiter,
/// and queues instead of being refused.
#[tokio::test(start_paused = true)]
async fn a_waiter_handed_the_permit_leaves_its_queue_place_to_the_next_caller() {
    let bh = Bulkhead::builder()
        .max_concurrent(1)
        .max_queued(1)
        .queue_timeout(SEC)
        .build()
        .unwrap();
    let first = bh.acquire().await.unwrap();
    let b = tokio::spawn({
        let bh = bh.clone();
        async move { bh.acquire().await.map(drop) }
    });
    support::until(|| bh.queued() == 1).await;
    drop(first);
    assert_eq!(bh.available(), 0, "the permit was handed to B");
    let mut next = Box::pin(bh.acquire());
    let polled = (&mut next).now_or_never();
    assert!(polled.is_none(), "refused with an empty queue: {polled:?}");
    // A third caller finds the queue full (B runs, `next` waits).
    assert!(bh.acquire().now_or_never().unwrap().is_err());
    b.await.unwrap().unwrap();
    assert!(next.await.is_ok());
    assert_eq!((bh.in_flight(), bh.queued(), bh.available()), (0, 0, 1));
}

/// The same through the tower layer.
#[tokio::test(start_paused = true)]
async fn through_the_layer_too() {
    let bh = Bulkhead::builder()
        .max_concurrent(1)
        .max_queued(1)
        .queue_timeout(SEC)
        .build()
        .unwrap();
    let mut svc = BulkheadLayer::new(bh.clone()).layer(tower::service_fn(|n: u32| async move {
        Ok::<_, std::convert::Infallible>(n)
    }));
    let first = bh.acquire().await.unwrap();
    let b = tokio::spawn(svc.ready().await.unwrap().call(2));
    assert_eq!(bh.queued(), 1);
    drop(first);
    assert_eq!(bh.available(), 0, "the permit was handed to B");
    let mut next = Box::pin(svc.ready().await.unwrap().call(3));
    let polled = (&mut next).now_or_never();
    assert!(
        polled.is_none(),
        "refused with an empty queue: {:?}",
        polled.map(|r| r.map_err(|e| e.to_string()))
    );
    assert_eq!(b.await.unwrap().unwrap(), 2);
    assert_eq!(next.await.unwrap(), 3);
    assert_eq!((bh.in_flight(), bh.queued(), bh.available()), (0, 0, 1));
}

/// A waiter that times out or is dropped gives its place back: the bound stays exact.
#[tokio::test(start_paused = true)]
async fn a_waiter_that_gives_up_frees_its_place() {
    let bh = Bulkhead::builder()
        .max_concurrent(1)
        .max_queued(1)
        .queue_timeout(SEC)
        .build()
        .unwrap();
    let held = bh.acquire().await.unwrap();
    assert!(bh.acquire().await.is_err(), "timed out in the queue");
    let mut dropped = Box::pin(bh.acquire());
    assert!((&mut dropped).now_or_never().is_none());
    assert!(bh.acquire().now_or_never().unwrap().is_err(), "queue full");
    drop(dropped);
    let mut waiting = Box::pin(bh.acquire());
    assert!((&mut waiting).now_or_never().is_none(), "room again");
    drop(held);
    assert!(waiting.await.is_ok());
    assert_eq!((bh.in_flight(), bh.queued(), bh.available()), (0, 0, 1));
}

/// A check whose `check()` panics before it returns its future (a poisoned lock, an `unwrap`
/// on a config value).
struct PanicsWhenCalled;

impl HealthCheck for PanicsWhenCalled {
    fn name(&self) -> &str {
        "broken"
    }
    fn check(&self) -> CheckFuture<'_> {
        panic!("lock poisoned")
    }
}

/// Reported unhealthy, as a panic inside the future is, instead of unwinding into the caller.
#[tokio::test(start_paused = true)]
async fn check_all_survives_a_check_that_panics_when_called() {
    let mut registry = HealthRegistry::new();
    registry
        .register(
            check_fn("db", || async { CheckResult::healthy() }),
            Criticality::Critical,
        )
        .unwrap();
    registry
        .register(PanicsWhenCalled, Criticality::NonCritical)
        .unwrap();
    let report = tokio::spawn(async move { registry.check_all().await })
        .await
        .expect("check_all must not panic when a check panics");
    assert_eq!(
        report.component("db").unwrap().status,
        HealthStatus::Healthy
    );
    assert_eq!(
        report.component("broken").unwrap().status,
        HealthStatus::Unhealthy
    );
    assert_eq!(report.status, HealthStatus::Degraded);
}

/// The background checker keeps checking the others (its task used to die, freezing every
/// component at "not checked yet").
#[tokio::test(start_paused = true)]
async fn the_checker_keeps_checking_when_a_check_panics_when_called() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let mut registry = HealthRegistry::new();
    registry
        .register(PanicsWhenCalled, Criticality::NonCritical)
        .unwrap();
    registry
        .register(
            check_fn("db", move || {
                r.fetch_add(1, Ordering::SeqCst);
                async { CheckResult::healthy() }
            }),
            Criticality::Critical,
        )
        .unwrap();
    let checker = HealthChecker::builder(registry)
        .interval(SEC)
        .timeout(SEC / 2)
        .build()
        .unwrap();
    tokio::time::sleep(3 * SEC + SEC / 2).await;
    let report = checker.report();
    assert_eq!(
        report.component("db").unwrap().status,
        HealthStatus::Healthy,
        "{report:?}"
    );
    assert!(
        runs.load(Ordering::SeqCst) >= 3,
        "db checked every interval"
    );
    assert_eq!(
        report.component("broken").unwrap().status,
        HealthStatus::Unhealthy
    );
    assert_eq!(checker.status(), HealthStatus::Degraded);
}
