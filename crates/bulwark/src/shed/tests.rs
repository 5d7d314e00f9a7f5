use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex as StdMutex;
use std::task::Context;

use proptest::prelude::*;

use super::*;

fn shedder(max_concurrent: usize, max_queued: usize) -> (Shedder, Arc<StdMutex<Vec<Event>>>) {
    let events = Arc::new(StdMutex::new(Vec::new()));
    let e = events.clone();
    let s = Shedder::builder()
        .name("s")
        .max_concurrent(max_concurrent)
        .max_queued(max_queued)
        .queue_timeout(Duration::from_millis(100))
        .listener(move |ev: &Event| e.lock().unwrap().push(ev.clone()))
        .build()
        .unwrap();
    (s, events)
}

/// Lets spawned tasks run until they block (single-threaded runtime).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Spawns a call of `p` that holds its slot until the returned sender fires; the join
/// handle says whether it got a slot.
fn spawn_call(
    s: &Shedder,
    p: Priority,
    order: Arc<StdMutex<Vec<&'static str>>>,
    tag: &'static str,
) -> (tokio::task::JoinHandle<bool>, oneshot::Sender<()>) {
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let s = s.clone();
    let h = tokio::spawn(async move {
        match s.acquire(p).await {
            Ok(permit) => {
                order.lock().unwrap().push(tag);
                let _ = done_rx.await;
                drop(permit);
                true
            }
            Err(_) => false,
        }
    });
    (h, done_tx)
}

#[tokio::test(start_paused = true)]
async fn the_queue_serves_the_most_important_first_then_in_arrival_order() {
    let (s, _) = shedder(1, 10);
    let order = Arc::new(StdMutex::new(Vec::new()));
    let first = s.acquire(Priority::Normal).await.unwrap();
    let mut calls = BTreeMap::new();
    for (p, tag) in [
        (Priority::Low, "low"),
        (Priority::Normal, "normal-1"),
        (Priority::Critical, "critical"),
        (Priority::Normal, "normal-2"),
        (Priority::High, "high"),
    ] {
        calls.insert(tag, spawn_call(&s, p, order.clone(), tag));
        settle().await;
    }
    assert_eq!((s.running(), s.queued()), (1, 5));
    drop(first);
    // Each call served ends, which serves the next.
    for served in 1..=5 {
        settle().await;
        let tag = order.lock().unwrap()[served - 1];
        let (h, done) = calls.remove(tag).unwrap();
        done.send(()).unwrap();
        assert!(h.await.unwrap());
    }
    assert_eq!(
        *order.lock().unwrap(),
        ["critical", "high", "normal-1", "normal-2", "low"]
    );
    assert_eq!((s.running(), s.queued()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds_the_least_important() {
    let (s, events) = shedder(1, 2);
    let order = Arc::new(StdMutex::new(Vec::new()));
    let running = s.acquire(Priority::Normal).await.unwrap();
    let (low_a, _a) = spawn_call(&s, Priority::Low, order.clone(), "low-a");
    settle().await;
    let (low_b, _b) = spawn_call(&s, Priority::Low, order.clone(), "low-b");
    settle().await;
    // Full of lows: a low is refused, a normal displaces the newest low.
    assert!(matches!(s.acquire(Priority::Low).await, Err(Error::Shed)));
    let (normal, done) = spawn_call(&s, Priority::Normal, order.clone(), "normal");
    settle().await;
    assert!(!low_b.await.unwrap(), "displaced");
    assert_eq!(s.queued(), 2);
    drop(running);
    settle().await;
    assert_eq!(*order.lock().unwrap(), ["normal"]);
    done.send(()).unwrap();
    assert!(normal.await.unwrap());
    settle().await;
    assert_eq!(*order.lock().unwrap(), ["normal", "low-a"]);
    drop(_a);
    assert!(low_a.await.unwrap());
    let reasons: Vec<(&str, &str)> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            Event::Shed {
                priority, reason, ..
            } => (*priority, *reason),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(reasons, [("low", "queue_full"), ("low", "displaced")]);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_shed_after_the_queue_timeout_or_its_deadline() {
    let (s, events) = shedder(1, 4);
    let _running = s.acquire(Priority::Normal).await.unwrap();
    let start = Instant::now();
    assert!(matches!(s.acquire(Priority::High).await, Err(Error::Shed)));
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_millis(30);
    assert!(s
        .acquire_until(Priority::High, Some(deadline))
        .await
        .is_err());
    assert_eq!(Instant::now(), deadline);
    assert_eq!(s.queued(), 0, "timed-out waiters leave the queue");
    assert_eq!(events.lock().unwrap().len(), 2);
    // A deadline already past: shed at once, without queueing (or displacing anyone).
    let (s, _) = shedder(1, 1);
    let _running = s.acquire(Priority::Normal).await.unwrap();
    let mut low = Box::pin(s.acquire(Priority::Low));
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    assert!(low.as_mut().poll(&mut cx).is_pending());
    let now = Instant::now();
    assert!(s
        .acquire_until(Priority::Critical, Some(now))
        .await
        .is_err());
    assert_eq!(Instant::now(), now);
    assert_eq!(s.queued(), 1, "the low waiter kept its place");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_the_queue_and_returns_a_slot_it_was_handed() {
    let (s, _) = shedder(1, 4);
    let running = s.acquire(Priority::Normal).await.unwrap();
    // Cancelled while waiting: its place is freed.
    {
        let mut fut = Box::pin(s.acquire(Priority::Low));
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(s.queued(), 1);
    }
    assert_eq!(s.queued(), 0);
    // Cancelled after the slot was handed to it, before it saw it: the slot comes back.
    let mut fut = Box::pin(s.acquire(Priority::Low));
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    drop(running);
    assert_eq!((s.running(), s.queued()), (1, 0), "handed over");
    drop(fut);
    assert_eq!(s.running(), 0);
    assert!(s.try_acquire().is_some());
}

#[test]
fn the_builder_checks_its_settings() {
    let e = Shedder::builder().build().unwrap_err();
    assert_eq!(e.field(), "max_concurrent");
    let e = Shedder::builder().max_concurrent(0).build().unwrap_err();
    assert_eq!(e.field(), "max_concurrent");
    let e = Shedder::builder()
        .max_concurrent(1)
        .queue_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "queue_timeout");
    assert!(Shedder::builder()
        .max_concurrent(1)
        .max_queued(0)
        .build()
        .is_ok());
    assert_eq!(Priority::from_name("HIGH"), Some(Priority::High));
    assert!(Priority::Low < Priority::Critical);
}

#[derive(Debug, Clone)]
enum Op {
    Arrive(Priority),
    /// Ends the running call at this index (modulo how many run).
    Finish(usize),
    /// Lets this many milliseconds pass.
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize).prop_map(|i| Op::Arrive(Priority::ALL[i])),
        3 => (0..8usize).prop_map(Op::Finish),
        1 => (1..150u64).prop_map(Op::Tick),
    ]
}

/// What the shedder must do, step by step.
#[derive(Default)]
struct Model {
    running: Vec<usize>,
    /// (priority, arrival, id, enqueued at ms)
    queue: Vec<(Priority, usize, usize, u64)>,
    granted: BTreeSet<usize>,
    shed: BTreeMap<usize, &'static str>,
    now: u64,
}

impl Model {
    fn serve_next(&mut self) {
        // Highest priority, then earliest arrival.
        let best = (0..self.queue.len()).max_by_key(|&i| {
            let (p, a, _, _) = self.queue[i];
            (p, Reverse(a))
        });
        if let Some(i) = best {
            let (_, _, id, _) = self.queue.remove(i);
            self.granted.insert(id);
            self.running.push(id);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Against a model: who gets a slot, who is shed and why, in every interleaving of
    /// arrivals, ends and time; and never more than `max_concurrent` running or
    /// `max_queued` waiting.
    #[test]
    fn matches_the_model(
        max_concurrent in 1..4usize,
        max_queued in 0..4usize,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let (s, events) = shedder(max_concurrent, max_queued);
            let mut model = Model::default();
            let mut dones: BTreeMap<usize, oneshot::Sender<()>> = BTreeMap::new();
            let (res_tx, mut res_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, bool)>();
            let mut real_granted = BTreeSet::new();
            let mut real_shed = BTreeSet::new();
            for (id, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Arrive(p) => {
                        let (done_tx, done_rx) = oneshot::channel::<()>();
                        dones.insert(id, done_tx);
                        let (s, res_tx) = (s.clone(), res_tx.clone());
                        tokio::spawn(async move {
                            match s.acquire(p).await {
                                Ok(permit) => {
                                    let _ = res_tx.send((id, true));
                                    let _ = done_rx.await;
                                    drop(permit);
                                }
                                Err(_) => { let _ = res_tx.send((id, false)); }
                            }
                        });
                        if model.running.len() < max_concurrent {
                            model.running.push(id);
                            model.granted.insert(id);
                        } else if model.queue.len() < max_queued {
                            model.queue.push((p, id, id, model.now));
                        } else {
                            // The least important, newest waiter.
                            let worst = (0..model.queue.len()).min_by_key(|&i| {
                                let (q, a, _, _) = model.queue[i];
                                (q, Reverse(a))
                            });
                            match worst {
                                Some(i) if model.queue[i].0 < p => {
                                    let (_, _, gone, _) = model.queue.remove(i);
                                    model.shed.insert(gone, "displaced");
                                    model.queue.push((p, id, id, model.now));
                                }
                                _ => { model.shed.insert(id, "queue_full"); }
                            }
                        }
                    }
                    Op::Finish(k) => {
                        if !model.running.is_empty() {
                            let id = model.running.remove(k % model.running.len());
                            settle().await;
                            dones.remove(&id).unwrap().send(()).unwrap();
                            model.serve_next();
                        }
                    }
                    Op::Tick(ms) => {
                        model.now += ms;
                        let now = model.now;
                        let timed_out: Vec<usize> = model.queue.iter().filter(|q| q.3 + 100 <= now).map(|q| q.2).collect();
                        model.queue.retain(|q| q.3 + 100 > now);
                        for id in timed_out { model.shed.insert(id, "timeout"); }
                        settle().await;
                        tokio::time::advance(Duration::from_millis(ms)).await;
                    }
                }
                settle().await;
                while let Ok((id, ok)) = res_rx.try_recv() {
                    if ok { real_granted.insert(id); } else { real_shed.insert(id); }
                }
                prop_assert!(s.running() <= max_concurrent);
                prop_assert!(s.queued() <= max_queued);
                prop_assert!(s.queued() == 0 || s.running() == max_concurrent);
                prop_assert_eq!(&real_granted, &model.granted);
                prop_assert_eq!(&real_shed, &model.shed.keys().copied().collect::<BTreeSet<_>>());
                prop_assert_eq!(s.running(), model.running.len());
                prop_assert_eq!(s.queued(), model.queue.len());
            }
            let mut reasons: Vec<&str> = events.lock().unwrap().iter().map(|e| match e {
                Event::Shed { reason, .. } => *reason,
                _ => "?",
            }).collect();
            reasons.sort_unstable();
            let mut expected: Vec<&str> = model.shed.values().copied().collect();
            expected.sort_unstable();
            prop_assert_eq!(reasons, expected);
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn the_layer_sheds_by_the_request_s_priority() {
    use tower::{Service, ServiceBuilder, ServiceExt};
    let (s, _) = shedder(1, 1);
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let svc = ServiceBuilder::new()
        .layer(ShedLayer::new(s.clone(), |req: &Priority| *req))
        .service_fn(move |p: Priority| {
            let mut rx = release_rx.clone();
            async move {
                let _ = rx.wait_for(|r| *r).await;
                Ok::<_, Infallible>(p)
            }
        });
    let mut a = svc.clone();
    let running =
        tokio::spawn(async move { a.ready().await.unwrap().call(Priority::Normal).await });
    settle().await;
    let mut b = svc.clone();
    let low = tokio::spawn(async move { b.ready().await.unwrap().call(Priority::Low).await });
    settle().await;
    let mut c = svc.clone();
    let high = tokio::spawn(async move { c.ready().await.unwrap().call(Priority::High).await });
    settle().await;
    // The queue of one held the low call; the high one displaced it.
    let err = low.await.unwrap().unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::Shed)),
        "{err}"
    );
    release_tx.send(true).unwrap();
    assert_eq!(running.await.unwrap().unwrap(), Priority::Normal);
    assert_eq!(high.await.unwrap().unwrap(), Priority::High);
    assert_eq!(s.running(), 0);
}
