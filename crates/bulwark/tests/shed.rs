//! The load shedder from outside: a "wait forever" queue timeout, a granted-then-cancelled waiter,
//! and the tower service keeping queue order for requests whose futures are not polled yet.
use std::sync::Arc;
use std::time::Duration;

use bulwark::shed::{Priority, ShedLayer, Shedder};
use tower::{Layer, Service, ServiceExt};

#[tokio::test(start_paused = true)]
async fn a_queue_timeout_of_duration_max_waits_without_panicking() {
    let s = Shedder::builder()
        .max_concurrent(1)
        .max_queued(1)
        .queue_timeout(Duration::MAX)
        .build()
        .expect("build accepts it");
    let running = s.try_acquire().unwrap();
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.acquire(Priority::Normal).await.map(drop) });
    tokio::task::yield_now().await;
    assert_eq!(s.queued(), 1);
    drop(running);
    assert!(waiter.await.expect("the waiter panicked").is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_cancelled_after_its_grant_gives_the_slot_back() {
    let s = Shedder::builder()
        .max_concurrent(1)
        .max_queued(2)
        .build()
        .unwrap();
    let running = s.try_acquire().unwrap();
    let s2 = s.clone();
    let w = tokio::spawn(async move {
        let _p = s2.acquire(Priority::Low).await;
        std::future::pending::<()>().await
    });
    tokio::task::yield_now().await;
    assert_eq!(s.queued(), 1);
    drop(running); // the grant goes to the waiter
    w.abort();
    let _ = w.await;
    assert_eq!((s.running(), s.queued()), (0, 0));
    assert!(s.try_acquire().is_some());
}

/// A request is queued when `call` returns, by priority, though its future is not polled yet: a
/// slot freed meanwhile goes to it, never to a later, less important request.
#[tokio::test(start_paused = true)]
async fn the_tower_service_queues_at_call_in_priority_order() {
    let s = Shedder::builder()
        .max_concurrent(1)
        .max_queued(4)
        .build()
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let prio = |n: &u32| match n {
        1 => Priority::Critical,
        _ => Priority::Low,
    };
    let mut svc = ShedLayer::new(s.clone(), prio).layer(tower::service_fn(move |n: u32| {
        let rx = rx.clone();
        async move {
            if n == 0 {
                let r = rx.lock().await.take().unwrap();
                let _ = r.await;
            }
            Ok::<u32, std::convert::Infallible>(n)
        }
    }));
    let a = tokio::spawn(svc.ready().await.unwrap().call(0)); // holds the only slot
    tokio::task::yield_now().await;
    let critical = svc.ready().await.unwrap().call(1); // queued, not polled
    assert_eq!(s.queued(), 1);
    tx.send(()).unwrap();
    a.await.unwrap().unwrap();
    // The slot went to the queued request: a later call finds none free, and queues behind it.
    let low = svc.ready().await.unwrap().call(2);
    assert_eq!((s.running(), s.queued()), (1, 1));
    assert_eq!(critical.await.unwrap(), 1);
    assert_eq!(low.await.unwrap(), 2);
}

/// A call queued under a deadline in scope (a `Timeout::total` around it) waits no later than
/// that deadline, and is shed with reason `timeout` at it, as the module doc says ("or its own
/// deadline, if earlier"), not cut by the timeout with no `Shed` event (review dc2).
#[tokio::test(start_paused = true)]
async fn a_queued_call_waits_no_later_than_the_deadline_in_scope() {
    use bulwark::timeout::Deadline;
    use bulwark::{Error, Event};
    let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r2 = reasons.clone();
    let s = Shedder::builder()
        .max_concurrent(1)
        .max_queued(1)
        .queue_timeout(Duration::from_secs(10))
        .listener(move |e: &Event| {
            if let Event::Shed { reason, .. } = e {
                r2.lock().unwrap().push(*reason);
            }
        })
        .build()
        .unwrap();
    let _running = s.try_acquire().unwrap();
    let start = tokio::time::Instant::now();
    let r = Deadline::scope(
        Deadline::after(Duration::from_secs(1)),
        s.call(Priority::Normal, || async { Ok::<_, ()>(()) }),
    )
    .await;
    assert!(matches!(r, Err(Error::Shed)), "{r:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(*reasons.lock().unwrap(), ["timeout"]);
    assert_eq!(s.queued(), 0);
}
