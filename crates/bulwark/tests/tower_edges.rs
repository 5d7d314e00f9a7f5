//! The tower side of the policies: a bulkhead service refusing with a permit free, a timeout
//! service called outside the runtime (found by a review; each test failed before its fix).

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::bulkhead::{Bulkhead, BulkheadLayer};
use bulwark::timeout::{Timeout, TimeoutLayer};
use bulwark::Error;
use futures_util::FutureExt;
use tower::{Layer, Service, ServiceExt};

/// Calls waiting to be released: their number and their release.
type Waiting = Arc<Mutex<Vec<(u32, tokio::sync::oneshot::Sender<()>)>>>;

/// A service whose call `n` waits until released by `release(n)`.
#[derive(Clone, Default)]
struct Gate {
    waiting: Waiting,
}

impl Gate {
    fn release(&self, n: u32) {
        let mut w = self.waiting.lock().unwrap();
        let i = w
            .iter()
            .position(|(m, _)| *m == n)
            .expect("call is waiting");
        let (_, tx) = w.remove(i);
        let _ = tx.send(());
    }
    fn waiting(&self) -> usize {
        self.waiting.lock().unwrap().len()
    }
}

impl Service<u32> for Gate {
    type Response = u32;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<u32, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, n: u32) -> Self::Future {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().unwrap().push((n, tx));
        Box::pin(async move {
            let _ = rx.await;
            Ok(n)
        })
    }
}

/// A bulkhead with a free permit and nobody waiting for it must admit the next call. Here the
/// queue's one slot is still counted for a request that was queued and has since been granted a
/// permit (its future has not run since it was woken): the next call skips the fast path
/// (`queued() != 0`), finds the queue "full" and is rejected with `BulkheadFull` although a
/// permit is free. The plain API (`Bulkhead::acquire`) takes the free permit.
#[tokio::test(start_paused = true)]
async fn bulkhead_layer_rejects_while_a_permit_is_free() {
    let bh = Bulkhead::builder()
        .max_concurrent(2)
        .max_queued(1)
        .queue_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let gate = Gate::default();
    let mut svc = BulkheadLayer::new(bh.clone()).layer(gate.clone());
    let a = tokio::spawn(svc.ready().await.unwrap().call(1));
    let b = tokio::spawn(svc.ready().await.unwrap().call(2));
    support::until(|| gate.waiting() == 2).await;
    // C queues (both permits taken); its caller polls it once, then is busy elsewhere.
    let mut c = svc.ready().await.unwrap().call(3);
    assert!((&mut c).now_or_never().is_none());
    assert_eq!(bh.queued(), 1);
    // A finishes: its permit goes to C. B finishes: its permit is free.
    gate.release(1);
    assert_eq!(a.await.unwrap().unwrap(), 1);
    gate.release(2);
    assert_eq!(b.await.unwrap().unwrap(), 2);
    assert_eq!(
        bh.available(),
        1,
        "one permit is free and nobody waits for it"
    );
    // D arrives: a permit is free.
    let d = svc.ready().await.unwrap().call(4);
    let d = tokio::spawn(d);
    support::until(|| gate.waiting() >= 1 || d.is_finished()).await;
    if d.is_finished() {
        let e = d.await.unwrap().unwrap_err();
        panic!(
            "D was refused with a permit free: {:?}",
            e.downcast_ref::<Error>()
        );
    }
    gate.release(4);
    assert_eq!(d.await.unwrap().unwrap(), 4);
    // C runs on the permit it was handed.
    let c = tokio::spawn(c);
    support::until(|| gate.waiting() == 1).await;
    gate.release(3);
    assert_eq!(c.await.unwrap().unwrap(), 3);
}

/// `rt.block_on(svc.call(req))`: the call is made outside the runtime (as
/// `a_queued_call_made_outside_the_runtime_does_not_panic` in queue_and_keys.rs holds for the
/// bulkhead). `TimeoutService::call` builds its `Sleep` in `call`, which panics without a
/// runtime ("there is no reactor running").
#[test]
fn timeout_layer_call_made_outside_the_runtime_does_not_panic() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut svc = TimeoutLayer::new(Timeout::attempt(Duration::from_secs(1))).layer(
        tower::service_fn(|x: u32| async move { Ok::<_, Infallible>(x) }),
    );
    let fut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| svc.call(7)));
    let fut = fut.expect("TimeoutService::call panicked outside the runtime");
    assert_eq!(rt.block_on(fut).unwrap(), 7);
}
