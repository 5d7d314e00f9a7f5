//! Hedging: exact timings under paused time, cancellation of losers, limits,
//! percentile delay, admission, failure handling, and the tower layer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bulwark::hedge::{Hedge, HedgeLayer};
use bulwark::{BoxError, Error, Event, Outcome};
use tokio::time::{sleep, Instant};
use tower::{Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);

/// Counts attempts that were dropped before they finished.
#[derive(Clone, Default)]
struct Counters {
    started: Arc<AtomicU32>,
    cancelled: Arc<AtomicU32>,
}

struct Guard {
    cancelled: Arc<AtomicU32>,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Counters {
    /// An attempt that takes `latency` and then returns `result`.
    fn attempt<T>(
        &self,
        latency: Duration,
        result: Result<T, &'static str>,
    ) -> impl Future<Output = Result<T, &'static str>> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let guard = Guard {
            cancelled: self.cancelled.clone(),
            done: false,
        };
        async move {
            // Move the whole guard in (not just the field written below).
            let mut guard = guard;
            sleep(latency).await;
            guard.done = true;
            result
        }
    }
    fn started(&self) -> u32 {
        self.started.load(Ordering::SeqCst)
    }
    fn cancelled(&self) -> u32 {
        self.cancelled.load(Ordering::SeqCst)
    }
}

fn hedges_seen() -> (
    Arc<Mutex<Vec<u32>>>,
    impl Fn(&Event) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (seen, move |e: &Event| {
        if let Event::HedgeStarted { hedge, .. } = e {
            s.lock().unwrap().push(*hedge);
        }
    })
}

#[tokio::test(start_paused = true)]
async fn fast_hedge_wins_at_delay_plus_its_latency_and_loser_is_cancelled() {
    let (seen, listener) = hedges_seen();
    let hedge = Hedge::builder()
        .name("h")
        .delay(20 * MS)
        .listener(listener)
        .build()
        .unwrap();
    let c = Counters::default();
    let mut n = 0;
    let start = Instant::now();
    let r = hedge
        .call(|| {
            n += 1;
            if n == 1 {
                c.attempt(1000 * MS, Ok(1))
            } else {
                c.attempt(5 * MS, Ok(2))
            }
        })
        .await;
    assert_eq!(r, Ok(2));
    assert_eq!(start.elapsed(), 25 * MS);
    assert_eq!(c.started(), 2);
    assert_eq!(c.cancelled(), 1, "the slow original was dropped");
    assert_eq!(*seen.lock().unwrap(), [1]);
}

#[tokio::test(start_paused = true)]
async fn no_hedge_when_the_original_succeeds_before_the_delay() {
    let (seen, listener) = hedges_seen();
    let hedge = Hedge::builder()
        .delay(20 * MS)
        .listener(listener)
        .build()
        .unwrap();
    let c = Counters::default();
    let start = Instant::now();
    let r = hedge.call(|| c.attempt(19 * MS, Ok(1))).await;
    assert_eq!(r, Ok(1));
    assert_eq!(start.elapsed(), 19 * MS);
    assert_eq!(c.started(), 1);
    assert_eq!(c.cancelled(), 0);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn max_hedges_is_respected_and_hedges_are_spaced_by_the_delay() {
    let (seen, listener) = hedges_seen();
    let hedge = Hedge::builder()
        .delay(10 * MS)
        .max_hedges(2)
        .listener(listener)
        .build()
        .unwrap();
    let c = Counters::default();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let mut n = 0u32;
    let r = hedge
        .call(|| {
            n += 1;
            starts.lock().unwrap().push(t0.elapsed());
            // Every attempt takes 100ms; the original, started first, wins.
            c.attempt(100 * MS, Ok(n))
        })
        .await;
    assert_eq!(r, Ok(1));
    assert_eq!(t0.elapsed(), 100 * MS);
    assert_eq!(*starts.lock().unwrap(), [Duration::ZERO, 10 * MS, 20 * MS]);
    assert_eq!(c.started(), 3);
    assert_eq!(c.cancelled(), 2);
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn zero_max_hedges_never_hedges() {
    let hedge = Hedge::builder().delay(MS).max_hedges(0).build().unwrap();
    let c = Counters::default();
    let r = hedge.call(|| c.attempt(50 * MS, Ok(()))).await;
    assert_eq!(r, Ok(()));
    assert_eq!(c.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn percentile_delay_is_used_once_enough_samples_exist() {
    let hedge = Hedge::builder()
        .delay_percentile(50.0, 5, 100 * MS)
        .build()
        .unwrap();
    assert_eq!(hedge.current_delay(), 100 * MS, "fallback before samples");

    // Four fast calls: not yet enough samples, the fallback delay still applies.
    let c = Counters::default();
    for _ in 0..4 {
        hedge.call(|| c.attempt(10 * MS, Ok(()))).await.unwrap();
    }
    assert_eq!(hedge.current_delay(), 100 * MS);
    let mut n = 0;
    let t0 = Instant::now();
    let r = hedge
        .call(|| {
            n += 1;
            c.attempt(if n == 1 { 60 * MS } else { MS }, Ok(n))
        })
        .await;
    // No hedge at 10ms: the delay was still 100ms, so the original won at 60ms.
    assert_eq!((r, t0.elapsed()), (Ok(1), 60 * MS));
    assert_eq!(hedge.latency().recorded(), 5);

    // Five samples now (10,10,10,10,60): p50 = 10ms.
    assert_eq!(hedge.current_delay(), 10 * MS);
    let mut n = 0;
    let t0 = Instant::now();
    let r = hedge
        .call(|| {
            n += 1;
            c.attempt(if n == 1 { 1000 * MS } else { 3 * MS }, Ok(n))
        })
        .await;
    assert_eq!((r, t0.elapsed()), (Ok(2), 13 * MS));
}

#[tokio::test(start_paused = true)]
async fn a_winning_hedge_records_the_original_elapsed_time_as_a_lower_bound() {
    let hedge = Hedge::builder().delay(20 * MS).build().unwrap();
    let c = Counters::default();
    let mut n = 0;
    hedge
        .call(|| {
            n += 1;
            c.attempt(if n == 1 { 1000 * MS } else { 5 * MS }, Ok(()))
        })
        .await
        .unwrap();
    // The hedge's 5ms and the original's 25ms so far.
    assert_eq!(hedge.latency().recorded(), 2);
    assert_eq!(hedge.latency().percentile(100.0, 1), Some(25 * MS));
    assert_eq!(hedge.latency().percentile(0.0, 1), Some(5 * MS));
}

#[tokio::test(start_paused = true)]
async fn admit_hook_false_means_no_hedge() {
    let asked = Arc::new(AtomicU32::new(0));
    let a = asked.clone();
    let hedge = Hedge::builder()
        .delay(10 * MS)
        .max_hedges(3)
        .admit(Arc::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
            false
        }))
        .build()
        .unwrap();
    let c = Counters::default();
    let t0 = Instant::now();
    let r = hedge.call(|| c.attempt(100 * MS, Ok(7))).await;
    assert_eq!(r, Ok(7));
    assert_eq!(t0.elapsed(), 100 * MS);
    assert_eq!(c.started(), 1);
    assert_eq!(asked.load(Ordering::SeqCst), 1, "asked once, then no more");
}

#[tokio::test(start_paused = true)]
async fn admit_hook_is_asked_before_each_hedge() {
    let asked = Arc::new(AtomicU32::new(0));
    let a = asked.clone();
    // Admits the first hedge only.
    let hedge = Hedge::builder()
        .delay(10 * MS)
        .max_hedges(3)
        .admit(Arc::new(move || a.fetch_add(1, Ordering::SeqCst) == 0))
        .build()
        .unwrap();
    let c = Counters::default();
    let r = hedge.call(|| c.attempt(100 * MS, Ok(()))).await;
    assert_eq!(r, Ok(()));
    assert_eq!(c.started(), 2);
    assert_eq!(asked.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_fast_failure_starts_the_next_hedge_at_once() {
    let (seen, listener) = hedges_seen();
    let hedge = Hedge::builder()
        .delay(20 * MS)
        .listener(listener)
        .build()
        .unwrap();
    let c = Counters::default();
    let mut n = 0;
    let t0 = Instant::now();
    let r = hedge
        .call(|| {
            n += 1;
            if n == 1 {
                c.attempt(5 * MS, Err("refused"))
            } else {
                c.attempt(10 * MS, Ok(2))
            }
        })
        .await;
    assert_eq!(r, Ok(2));
    assert_eq!(t0.elapsed(), 15 * MS, "hedge started at 5ms, not 20ms");
    assert_eq!(*seen.lock().unwrap(), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_failure_does_not_end_the_call_while_another_attempt_runs() {
    let hedge = Hedge::builder().delay(10 * MS).build().unwrap();
    let c = Counters::default();
    let mut n = 0;
    let t0 = Instant::now();
    let r = hedge
        .call(|| {
            n += 1;
            if n == 1 {
                c.attempt(50 * MS, Ok(1))
            } else {
                c.attempt(2 * MS, Err("hedge failed"))
            }
        })
        .await;
    assert_eq!(r, Ok(1));
    assert_eq!(t0.elapsed(), 50 * MS);
    assert_eq!(c.cancelled(), 0);
}

#[tokio::test(start_paused = true)]
async fn when_all_fail_the_last_failure_is_returned() {
    let hedge = Hedge::builder()
        .delay(10 * MS)
        .max_hedges(1)
        .build()
        .unwrap();
    let c = Counters::default();
    let mut n = 0;
    let t0 = Instant::now();
    let r: Result<(), _> = hedge
        .call(|| {
            n += 1;
            if n == 1 {
                c.attempt(30 * MS, Err("first"))
            } else {
                c.attempt(40 * MS, Err("second"))
            }
        })
        .await;
    assert_eq!(r, Err(Error::Inner("second")));
    assert_eq!(t0.elapsed(), 50 * MS);
    assert_eq!(c.started(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_originals_ignored_result_is_final() {
    let hedge = Hedge::builder().delay(10 * MS).build().unwrap();
    let c = Counters::default();
    let classify = |r: &Result<u32, &'static str>| match r {
        Err("not found") => Outcome::Ignore,
        Err(_) => Outcome::Failure,
        Ok(_) => Outcome::Success,
    };
    let mut n = 0;
    let r = hedge
        .call_with(&classify, || {
            n += 1;
            if n == 1 {
                c.attempt(15 * MS, Err("not found"))
            } else {
                c.attempt(100 * MS, Ok(1))
            }
        })
        .await;
    assert_eq!(r, Err(Error::Inner("not found")));
    assert_eq!(c.cancelled(), 1, "the hedge is cancelled");
    assert_eq!(hedge.latency().recorded(), 0, "only successes are samples");
}

/// A hedge's ignored result (a local refusal, typically) while the original still runs does not
/// end the race: the original's answer does, and no further hedge starts.
#[tokio::test(start_paused = true)]
async fn a_hedges_ignored_result_does_not_cancel_the_original() {
    let hedge = Hedge::builder()
        .delay(10 * MS)
        .max_hedges(3)
        .build()
        .unwrap();
    let c = Counters::default();
    let classify = |r: &Result<u32, &'static str>| match r {
        Err("refused") => Outcome::Ignore,
        Err(_) => Outcome::Failure,
        Ok(_) => Outcome::Success,
    };
    let mut n = 0;
    let r = hedge
        .call_with(&classify, || {
            n += 1;
            if n == 1 {
                c.attempt(100 * MS, Ok(1))
            } else {
                c.attempt(5 * MS, Err("refused"))
            }
        })
        .await;
    assert_eq!(r, Ok(1));
    assert_eq!(c.started(), 2, "no hedge after the refused one");
    assert_eq!(c.cancelled(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_cancels_every_attempt() {
    let hedge = Hedge::builder()
        .delay(10 * MS)
        .max_hedges(2)
        .build()
        .unwrap();
    let c = Counters::default();
    let r = tokio::time::timeout(
        35 * MS,
        hedge.call(|| c.attempt(1000 * MS, Ok::<_, &str>(()))),
    )
    .await;
    assert!(r.is_err());
    assert_eq!(c.started(), 3);
    assert_eq!(c.cancelled(), 3);
}

#[test]
fn builder_validates() {
    assert_eq!(
        Hedge::builder().max_hedges(5).build().unwrap_err().field(),
        "max_hedges"
    );
    assert_eq!(
        Hedge::builder()
            .delay_percentile(0.0, 1, MS)
            .build()
            .unwrap_err()
            .field(),
        "delay_percentile"
    );
    assert_eq!(
        Hedge::builder()
            .delay_percentile(f64::NAN, 1, MS)
            .build()
            .unwrap_err()
            .field(),
        "delay_percentile"
    );
    assert_eq!(
        Hedge::builder().name("").build().unwrap_err().field(),
        "name"
    );
}

/// A service that insists on `poll_ready` before each `call`, and whose readiness
/// takes `ready_after` on a fresh clone (readiness is per clone, not shared).
struct Strict {
    ready: bool,
    ready_after: Duration,
    pending: Option<Pin<Box<tokio::time::Sleep>>>,
    calls: Arc<AtomicU32>,
    readied: Arc<AtomicU32>,
}

impl Clone for Strict {
    /// A clone starts unready, like a clone of a tower `Buffer` or `ConcurrencyLimit`.
    fn clone(&self) -> Self {
        Strict {
            ready: false,
            ready_after: self.ready_after,
            pending: None,
            calls: self.calls.clone(),
            readied: self.readied.clone(),
        }
    }
}

impl Strict {
    fn new(ready_after: Duration) -> Self {
        Strict {
            ready: false,
            ready_after,
            pending: None,
            calls: Arc::default(),
            readied: Arc::default(),
        }
    }
}

impl Service<u32> for Strict {
    type Response = (u32, u32);
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(u32, u32), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.ready {
            return Poll::Ready(Ok(()));
        }
        let after = self.ready_after;
        let sleep = self.pending.get_or_insert_with(|| Box::pin(sleep(after)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.pending = None;
        self.ready = true;
        self.readied.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u32) -> Self::Future {
        assert!(self.ready, "called without poll_ready");
        self.ready = false;
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            // The original attempt is slow, every hedge fast.
            sleep(if n == 1 { 1000 * MS } else { 5 * MS }).await;
            Ok((req, n))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn layer_readies_each_hedge_clone_before_calling_it() {
    let (seen, listener) = hedges_seen();
    let hedge = Hedge::builder()
        .delay(20 * MS)
        .listener(listener)
        .build()
        .unwrap();
    let inner = Strict::new(3 * MS);
    let (calls, readied) = (inner.calls.clone(), inner.readied.clone());
    let mut svc = HedgeLayer::new(hedge).layer(inner);

    let t0 = Instant::now();
    svc.ready().await.unwrap();
    assert_eq!(t0.elapsed(), 3 * MS);
    let t1 = Instant::now();
    let r = svc.call(7).await.unwrap();
    // Hedge at 20ms, its clone ready at 23ms, answer at 28ms.
    assert_eq!(r, (7, 2));
    assert_eq!(t1.elapsed(), 28 * MS);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(readied.load(Ordering::SeqCst), 2);
    assert_eq!(*seen.lock().unwrap(), [1]);
}

#[tokio::test(start_paused = true)]
async fn layer_passes_errors_through_and_classifier_applies() {
    let hedge = Hedge::builder().delay(10 * MS).build().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_: ()| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            sleep(MS).await;
            if n == 0 {
                Ok::<u16, std::io::Error>(503)
            } else {
                Err(std::io::Error::other("down"))
            }
        }
    });
    // With the default classifier a 503 is a success: no hedge.
    let svc = HedgeLayer::new(hedge.clone()).layer(inner.clone());
    assert_eq!(svc.oneshot(()).await.unwrap(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Calling 503 a failure starts a hedge at once; it fails too and its io error
    // comes out as the last failure, boxed unchanged.
    calls.store(0, Ordering::SeqCst);
    let classify = |r: &Result<u16, std::io::Error>| match r {
        Ok(s) if *s >= 500 => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    };
    let svc = HedgeLayer::new(hedge).classifier(classify).layer(inner);
    let err = svc.oneshot(()).await.unwrap_err();
    assert!(err.downcast_ref::<std::io::Error>().is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

fn assert_send<T: Send>(_: &T) {}
fn assert_send_sync<T: Send + Sync>() {}

#[tokio::test]
async fn futures_and_policy_are_send() {
    assert_send_sync::<Hedge>();
    let hedge = Hedge::builder().build().unwrap();
    let fut = hedge.call(|| async { Ok::<_, std::io::Error>(1) });
    assert_send(&fut);
    let svc = HedgeLayer::new(hedge.clone()).layer(tower::service_fn(|x: u8| async move {
        Ok::<_, std::io::Error>(x)
    }));
    let mut svc2 = svc.clone();
    let fut = svc2.call(1);
    assert_send(&fut);
    assert_eq!(fut.await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_huge_delay_hedges_only_on_failure() {
    let hedge = Hedge::builder().delay(Duration::MAX).build().unwrap();
    let c = Counters::default();
    let mut n = 0;
    let t0 = Instant::now();
    let r = hedge
        .call(|| {
            n += 1;
            if n == 1 {
                c.attempt(50 * MS, Err("refused"))
            } else {
                c.attempt(10 * MS, Ok(n))
            }
        })
        .await;
    assert_eq!(r, Ok(2));
    assert_eq!(t0.elapsed(), 60 * MS);
}
