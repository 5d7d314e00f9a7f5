//! Bulkhead behaviour under paused time: exact concurrency, queue bound, queue
//! timeout, cancellation safety, FIFO admission, and the tower layer.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
use bulwark::{BoxError, Error, Event};
use futures_util::FutureExt;
use support::until;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);

fn bulkhead(concurrent: usize, queued: usize, timeout: Duration) -> Bulkhead {
    Bulkhead::builder()
        .name("test")
        .max_concurrent(concurrent)
        .max_queued(queued)
        .queue_timeout(timeout)
        .build()
        .unwrap()
}

fn rejections(b: bulwark::bulkhead::BulkheadBuilder) -> (Bulkhead, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    let b = b
        .listener(move |e: &Event| {
            if let Event::BulkheadRejected { name } = e {
                assert_eq!(&**name, "test");
                seen.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    (b, n)
}

#[tokio::test(start_paused = true)]
async fn exactly_max_concurrent_run_at_once_and_the_rest_wait_in_batches() {
    let b = bulkhead(3, 10, Duration::from_secs(10));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..9 {
        let (b, running, peak) = (b.clone(), running.clone(), peak.clone());
        tasks.push(tokio::spawn(async move {
            b.call(|| async {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(100 * MS).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Instant::now() - start)
            })
            .await
        }));
    }
    until(|| b.in_flight() == 3 && b.queued() == 6).await;
    assert_eq!(b.available(), 0);
    let mut finished = Vec::new();
    for t in tasks {
        finished.push(t.await.unwrap().unwrap());
    }
    assert_eq!(peak.load(Ordering::SeqCst), 3);
    finished.sort();
    let expect: Vec<Duration> = [100, 100, 100, 200, 200, 200, 300, 300, 300]
        .iter()
        .map(|&ms| ms * MS)
        .collect();
    assert_eq!(finished, expect);
    assert_eq!((b.available(), b.in_flight(), b.queued()), (3, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn queue_bound_is_enforced_and_rejection_is_immediate_with_an_event() {
    let (b, rejected) = rejections(
        Bulkhead::builder()
            .name("test")
            .max_concurrent(1)
            .max_queued(2)
            .queue_timeout(Duration::from_secs(1)),
    );
    let held = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_none(), "try_acquire never queues");
    assert_eq!(rejected.load(Ordering::SeqCst), 0, "try_acquire is a probe");

    let w1 = tokio::spawn({
        let b = b.clone();
        async move { b.acquire().await.map(drop) }
    });
    let w2 = tokio::spawn({
        let b = b.clone();
        async move { b.acquire().await.map(drop) }
    });
    until(|| b.queued() == 2).await;

    let start = Instant::now();
    let third = b.acquire().await;
    assert!(matches!(third, Err(Error::BulkheadFull)));
    assert_eq!(
        Instant::now(),
        start,
        "a full queue rejects without waiting"
    );
    assert_eq!(rejected.load(Ordering::SeqCst), 1);
    assert_eq!(b.queued(), 2);

    drop(held);
    assert!(w1.await.unwrap().is_ok());
    assert!(w2.await.unwrap().is_ok());
    assert_eq!((b.available(), b.queued()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn zero_queue_rejects_at_once() {
    let (b, rejected) = rejections(Bulkhead::builder().name("test").max_concurrent(1));
    let _held = b.try_acquire().unwrap();
    let r = b.call(|| async { Ok::<_, Infallible>(()) }).await;
    assert_eq!(r, Err(Error::BulkheadFull));
    assert_eq!(rejected.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_rejects_at_exactly_the_timeout() {
    let (b, rejected) = rejections(
        Bulkhead::builder()
            .name("test")
            .max_concurrent(1)
            .max_queued(1)
            .queue_timeout(100 * MS),
    );
    let _held = b.try_acquire().unwrap();
    let start = Instant::now();
    let r = b.acquire().await;
    assert!(matches!(r, Err(Error::BulkheadFull)));
    assert_eq!(Instant::now() - start, 100 * MS);
    assert_eq!(rejected.load(Ordering::SeqCst), 1);
    assert_eq!(b.queued(), 0, "the timed-out waiter left the queue");
}

#[tokio::test(start_paused = true)]
async fn a_permit_freed_just_before_the_timeout_admits_the_waiter_then() {
    let b = bulkhead(1, 1, 100 * MS);
    let held = b.try_acquire().unwrap();
    let start = Instant::now();
    tokio::spawn(async move {
        // tokio timers tick in whole milliseconds: 99 ms is the last tick before
        // the 100 ms queue timeout.
        tokio::time::sleep(99 * MS).await;
        drop(held);
    });
    let p = b.acquire().await.expect("admitted before the timeout");
    assert_eq!(Instant::now() - start, 99 * MS);
    drop(p);
    assert_eq!(b.available(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_queued_future_frees_its_queue_slot() {
    let b = bulkhead(1, 1, Duration::from_secs(1));
    let held = b.try_acquire().unwrap();

    let mut waiting = Box::pin(b.acquire());
    assert!(waiting.as_mut().now_or_never().is_none());
    assert_eq!(b.queued(), 1);
    // The queue (of 1) is full now.
    assert!(matches!(b.acquire().await, Err(Error::BulkheadFull)));
    drop(waiting);
    assert_eq!(b.queued(), 0);

    // The slot is usable again.
    let mut again = Box::pin(b.acquire());
    assert!(again.as_mut().now_or_never().is_none());
    assert_eq!(b.queued(), 1);
    drop(held);
    let p = again.await.unwrap();
    assert_eq!((b.in_flight(), b.queued()), (1, 0));
    drop(p);
    assert_eq!(b.available(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_after_being_granted_a_permit_does_not_leak_it() {
    let b = bulkhead(1, 1, Duration::from_secs(1));
    let held = b.try_acquire().unwrap();
    let mut waiting = Box::pin(b.acquire());
    assert!(waiting.as_mut().now_or_never().is_none());
    // Releasing hands the permit to the waiter, which is dropped before it is polled.
    drop(held);
    assert_eq!(b.available(), 0);
    drop(waiting);
    assert_eq!((b.available(), b.queued()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_running_call_frees_its_permit() {
    let b = bulkhead(2, 0, Duration::from_secs(1));
    let task = tokio::spawn({
        let b = b.clone();
        async move {
            b.call(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, Infallible>(())
            })
            .await
        }
    });
    until(|| b.in_flight() == 1).await;
    assert_eq!(b.available(), 1);
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!((b.available(), b.in_flight()), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn queued_callers_are_admitted_in_arrival_order() {
    let b = bulkhead(1, 8, Duration::from_secs(10));
    let order = Arc::new(Mutex::new(Vec::new()));
    let held = b.try_acquire().unwrap();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (b2, order) = (b.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            b2.call(|| async {
                order.lock().unwrap().push(i);
                tokio::time::sleep(MS).await;
                Ok::<_, Infallible>(())
            })
            .await
        }));
        until(|| b.queued() == i + 1).await;
    }
    drop(held);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn call_passes_the_inner_error_through() {
    let b = bulkhead(1, 0, Duration::from_secs(1));
    let r = b.call(|| async { Err::<(), _>("boom") }).await;
    assert_eq!(r, Err(Error::Inner("boom")));
    assert_eq!(b.available(), 1);
}

fn slow_service(
    delay: Duration,
) -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone {
    tower::service_fn(move |x: u32| async move {
        tokio::time::sleep(delay).await;
        if x == 0 {
            Err::<u32, BoxError>("zero".into())
        } else {
            Ok(x * 2)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn layer_admits_queues_rejects_and_passes_inner_errors_through() {
    let b = bulkhead(1, 1, 50 * MS);
    let mut svc = BulkheadLayer::new(b.clone()).layer(slow_service(100 * MS));

    // Inner errors pass through unchanged.
    let e = svc.ready().await.unwrap().call(0).await.unwrap_err();
    assert_eq!(e.to_string(), "zero");
    assert!(e.downcast_ref::<Error>().is_none());

    let start = Instant::now();
    let first = svc.ready().await.unwrap().call(1);
    assert_eq!(b.in_flight(), 1, "the permit is taken in call");
    let second = svc.ready().await.unwrap().call(2);
    let third = svc.ready().await.unwrap().call(3);

    let first = tokio::spawn(first);
    let second = tokio::spawn(async move {
        let r = second.await;
        (r, Instant::now() - start)
    });
    // The third call found the queue (of 1) full: rejected without waiting.
    let e = third.await.unwrap_err();
    assert!(matches!(
        e.downcast_ref::<Error>(),
        Some(Error::BulkheadFull)
    ));
    assert_eq!(Instant::now(), start);

    // The second waited 50 ms in the queue, then was rejected.
    let (r, at) = second.await.unwrap();
    assert!(matches!(
        r.unwrap_err().downcast_ref::<Error>(),
        Some(Error::BulkheadFull)
    ));
    assert_eq!(at, 50 * MS);
    assert_eq!(first.await.unwrap().unwrap(), 2);
    assert_eq!((b.available(), b.queued()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn layer_queued_call_runs_once_a_permit_frees() {
    let b = bulkhead(1, 4, Duration::from_secs(1));
    let mut svc = BulkheadLayer::new(b.clone()).layer(slow_service(100 * MS));
    let start = Instant::now();
    let first = tokio::spawn(svc.ready().await.unwrap().call(1));
    let second = svc.ready().await.unwrap().call(2);
    let second = tokio::spawn(async move { (second.await.unwrap(), Instant::now() - start) });
    assert_eq!(first.await.unwrap().unwrap(), 2);
    assert_eq!(second.await.unwrap(), (4, 200 * MS));
    assert_eq!(b.available(), 1);
}

#[tokio::test(start_paused = true)]
async fn layer_dropping_a_queued_response_future_frees_its_queue_slot() {
    let b = bulkhead(1, 1, Duration::from_secs(1));
    let mut svc = BulkheadLayer::new(b.clone()).layer(slow_service(100 * MS));
    let first = svc.ready().await.unwrap().call(1);
    let second = svc.ready().await.unwrap().call(2);
    assert_eq!((b.in_flight(), b.queued()), (1, 1));
    drop(second);
    assert_eq!(b.queued(), 0);
    drop(first);
    assert_eq!(b.available(), 1);
}

/// The tower service queues a request at `call`, in arrival order: a permit freed before its
/// future is first polled is not taken by a later request.
#[tokio::test(start_paused = true)]
async fn a_queued_request_is_not_overtaken_before_its_first_poll() {
    use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
    use tower::{Layer, Service, ServiceExt};
    let bh = Bulkhead::builder()
        .max_concurrent(1)
        .max_queued(1)
        .build()
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let mut svc = BulkheadLayer::new(bh.clone()).layer(tower::service_fn(move |n: u32| {
        let rx = rx.clone();
        async move {
            if n == 0 {
                let r = rx.lock().await.take().unwrap();
                let _ = r.await;
            }
            Ok::<u32, std::convert::Infallible>(n)
        }
    }));
    let a = svc.ready().await.unwrap().call(0);
    let a = tokio::spawn(a);
    tokio::task::yield_now().await; // A holds the only permit
    let b = svc.ready().await.unwrap().call(1); // queued (arrived 2nd)
    tx.send(()).unwrap();
    a.await.unwrap().unwrap(); // permit free again, B not yet polled
                               // The freed permit is B's already (it waits from its arrival).
    assert_eq!(bh.available(), 0, "the permit went to queued B");
    let c = svc.ready().await.unwrap().call(2); // arrived 3rd
    assert!(
        c.await.is_err(),
        "C must not overtake queued B (and the queue is full)"
    );
    assert_eq!(b.await.unwrap(), 1);
}
