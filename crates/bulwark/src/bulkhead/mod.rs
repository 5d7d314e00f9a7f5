//! Bulkhead: a cap on how many calls to one dependency run at once, with a small,
//! bounded, time-limited wait queue in front of it.
//!
//! # Why
//!
//! When a dependency slows down, every call to it takes longer, so more of them are
//! in flight at once (Little's law: in flight = arrival rate × latency). Without a
//! cap, one slow dependency ends up holding every connection, task and buffer the
//! process has, and calls to healthy dependencies starve with it. A bulkhead (named
//! after the walls that keep one flooded compartment from sinking the ship) caps the
//! calls in flight per dependency, so a slow one can only use its own share.
//!
//! Rejecting at once is usually better than waiting: a queue in front of a saturated
//! dependency only adds latency to every call before anyone is told "no". So the
//! default queue is empty ([`DEFAULT_MAX_QUEUED`] = 0). A small queue with a short
//! [`queue_timeout`](BulkheadBuilder::queue_timeout) is worth it when load is bursty
//! and calls are short: a burst that would clear in a few milliseconds waits instead
//! of failing. Both the queue length and the wait are bounded, so the queue cannot
//! grow without limit and no caller waits forever.
//!
//! # How
//!
//! A [`tokio::sync::Semaphore`] with `max_concurrent` permits holds the concurrency;
//! its `acquire` is FIFO and cancel-safe. The queue bound is an atomic count of the
//! calls running or waiting (at most `max_concurrent + max_queued`), taken with a
//! compare-and-swap and given back by a drop guard, so a caller whose future is
//! dropped while it waits frees its queue slot, and one whose future is dropped while
//! it runs frees its permit ([`BulkheadPermit`] releases on drop). Counting both
//! together (as Polly bounds its bulkhead) keeps a waiter that was just handed a
//! permit, and has not run yet, from holding a queue slot too: the next caller may
//! queue behind it. The fast path (a permit is free) is one `try_acquire` on the
//! semaphore and one atomic add: no allocation, no lock besides the semaphore's own.
//!
//! A call over the queue bound, or still waiting after `queue_timeout`, fails with
//! [`Error::BulkheadFull`] and emits [`Event::BulkheadRejected`].
//!
//! ```
//! use bulwark::bulkhead::Bulkhead;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bulkhead = Bulkhead::builder()
//!     .name("payments")
//!     .max_concurrent(2)
//!     .max_queued(8)
//!     .queue_timeout(Duration::from_millis(50))
//!     .build()
//!     .expect("valid settings");
//!
//! let answer = bulkhead.call(|| async { Ok::<_, std::io::Error>(42) }).await;
//! assert_eq!(answer.unwrap(), 42);
//!
//! // The permit API, for callers that hold the slot across several steps.
//! let permit = bulkhead.try_acquire().expect("a slot is free");
//! assert_eq!(bulkhead.in_flight(), 1);
//! drop(permit);
//! assert_eq!(bulkhead.available(), 2);
//! # }
//! ```

mod keyed;
mod layer;

pub use crate::slot_future::ResponseFuture;
pub use keyed::{KeyedBulkhead, KeyedBulkheadBuilder, KeyedBulkheadPermit};
pub use layer::{BulkheadLayer, BulkheadService};

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::{ConfigError, Error, Event, Listener, Listeners};

/// Default cap on calls in flight: 256.
///
/// By Little's law that is, for example, 500 calls per second at half a second each,
/// with room to spare: high enough that a healthy dependency never notices the
/// bulkhead, low enough that a dependency that hangs cannot take more than a few
/// hundred tasks and sockets with it. Size it for your dependency: its rate times its
/// p99 latency, plus headroom.
pub const DEFAULT_MAX_CONCURRENT: usize = 256;

/// Default wait-queue length: 0, reject at once when every permit is taken.
///
/// A queue in front of a saturated dependency adds latency to every call before it
/// rejects any, and hides overload from the caller's retry and fallback policies.
/// Failing fast lets them act at once. Opt in to a queue for bursty, short calls.
pub const DEFAULT_MAX_QUEUED: usize = 0;

/// Default longest wait in the queue: 1 second (only matters with `max_queued > 0`).
///
/// Long enough to ride out a burst, short enough that a caller with a typical
/// request deadline of a few seconds still has time to retry or fall back.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);

/// Default name used in events and metrics.
pub const DEFAULT_NAME: &str = "bulkhead";

/// Caps the calls in flight, with a bounded, time-limited wait queue.
///
/// Cheap to clone (an `Arc` inside); clones share the same permits.
#[derive(Clone)]
pub struct Bulkhead {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    semaphore: Semaphore,
    max_concurrent: usize,
    max_queued: usize,
    queue_timeout: Duration,
    /// Calls waiting in the queue (reported by [`Bulkhead::queued`]).
    queued: AtomicUsize,
    /// Calls holding a permit or waiting for one, a waiter handed a permit counted
    /// once: the queue's bound is `max_concurrent + max_queued` on this.
    occupied: AtomicUsize,
    listeners: Listeners,
}

/// A slot in a [`Bulkhead`]: the call it admits may run while this is alive.
///
/// Dropping it frees the slot (and admits the oldest waiter, if any).
#[must_use = "the bulkhead slot is released as soon as the permit is dropped"]
pub struct BulkheadPermit {
    inner: Arc<Inner>,
}

impl Drop for BulkheadPermit {
    fn drop(&mut self) {
        // The place first: a caller arriving between the two finds room to wait, and the
        // permit given back next goes to the oldest waiter.
        self.inner.occupied.fetch_sub(1, Ordering::AcqRel);
        self.inner.semaphore.add_permits(1);
    }
}

impl fmt::Debug for BulkheadPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadPermit").finish_non_exhaustive()
    }
}

/// Gives a queue slot back when dropped: on admission (its place passes to the
/// permit), on timeout, and when the waiting future is dropped.
struct QueueSlot<'a> {
    inner: &'a Inner,
    admitted: bool,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.inner.leave_queue(self.admitted);
    }
}

/// A queue slot that owns its bulkhead, for futures that must be `'static`.
pub(crate) struct OwnedQueueSlot {
    bulkhead: Bulkhead,
    /// When the slot was taken: the queue timeout runs from then.
    since: tokio::time::Instant,
    admitted: bool,
}

impl Drop for OwnedQueueSlot {
    fn drop(&mut self) {
        self.bulkhead.inner.leave_queue(self.admitted);
    }
}

impl Bulkhead {
    /// A builder with the documented defaults.
    pub fn builder() -> BulkheadBuilder {
        BulkheadBuilder::default()
    }

    /// Takes a permit if one is free, without waiting and without queueing.
    ///
    /// Does not emit [`Event::BulkheadRejected`] when none is free: it is a probe (a
    /// balancer may try several endpoints). Use [`acquire`](Self::acquire) for the
    /// rejecting path.
    #[inline]
    pub fn try_acquire(&self) -> Option<BulkheadPermit> {
        self.inner.semaphore.try_acquire().ok()?.forget();
        self.inner.occupied.fetch_add(1, Ordering::AcqRel);
        Some(BulkheadPermit {
            inner: self.inner.clone(),
        })
    }

    /// Takes a permit, waiting in the bounded queue for at most `queue_timeout` when
    /// none is free.
    ///
    /// Fails with [`Error::BulkheadFull`] (and emits [`Event::BulkheadRejected`])
    /// when the queue is full or the wait times out. Cancel-safe: dropping the future
    /// gives back its queue slot and never leaks a permit. Waiters are admitted in
    /// FIFO order.
    pub async fn acquire(&self) -> Result<BulkheadPermit, Error<Infallible>> {
        match self.acquire_quiet().await {
            Some(p) => Ok(p),
            None => Err(self.inner.reject()),
        }
    }

    /// Runs `f` when a slot is free (waiting in the queue as [`acquire`](Self::acquire)
    /// does), holding the slot until the operation's future completes or is dropped.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _permit = self.acquire().await.map_err(never)?;
        f().await.map_err(Error::Inner)
    }

    /// Permits free right now.
    pub fn available(&self) -> usize {
        self.inner.semaphore.available_permits()
    }

    /// Calls holding a permit right now.
    pub fn in_flight(&self) -> usize {
        self.inner
            .max_concurrent
            .saturating_sub(self.inner.semaphore.available_permits())
    }

    /// Calls waiting in the queue right now.
    pub fn queued(&self) -> usize {
        self.inner.queued.load(Ordering::Acquire)
    }

    /// The configured cap on calls in flight.
    pub fn max_concurrent(&self) -> usize {
        self.inner.max_concurrent
    }

    /// The configured cap on waiting calls.
    pub fn max_queued(&self) -> usize {
        self.inner.max_queued
    }

    /// The configured longest wait in the queue.
    pub fn queue_timeout(&self) -> Duration {
        self.inner.queue_timeout
    }

    /// The name used in events.
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// A new bulkhead with the same settings and listeners and its own permits
    /// (keyed bulkheads make one per key from a validated prototype).
    pub(crate) fn fresh_copy(&self) -> Bulkhead {
        let i = &*self.inner;
        Bulkhead {
            inner: Arc::new(Inner {
                name: i.name.clone(),
                semaphore: Semaphore::new(i.max_concurrent),
                max_concurrent: i.max_concurrent,
                max_queued: i.max_queued,
                queue_timeout: i.queue_timeout,
                queued: AtomicUsize::new(0),
                occupied: AtomicUsize::new(0),
                listeners: i.listeners.clone(),
            }),
        }
    }

    /// Takes a queue slot now (for the tower service, which must decide in `call`
    /// whether the request is queued or rejected); `None` when the queue is full.
    pub(crate) fn enter_queue_owned(&self) -> Option<OwnedQueueSlot> {
        self.inner.take_queue_slot().then(|| OwnedQueueSlot {
            bulkhead: self.clone(),
            since: tokio::time::Instant::now(),
            admitted: false,
        })
    }

    /// Waits for a permit holding a queue slot taken by
    /// [`enter_queue_owned`](Self::enter_queue_owned); the slot is given back when
    /// this returns or is dropped.
    pub(crate) async fn wait_queued(
        mut slot: OwnedQueueSlot,
    ) -> Result<BulkheadPermit, Error<Infallible>> {
        let inner = &*slot.bulkhead.inner;
        let until = crate::timeout::saturating_after(slot.since, inner.queue_timeout);
        let waited = tokio::time::timeout_at(until, inner.semaphore.acquire()).await;
        match waited {
            Ok(Ok(p)) => {
                p.forget();
                slot.admitted = true;
                Ok(BulkheadPermit {
                    inner: slot.bulkhead.inner.clone(),
                })
            }
            Ok(Err(_)) | Err(_) => Err(inner.reject()),
        }
    }

    /// [`acquire`](Self::acquire) without the rejection event: `None` means rejected.
    /// Keyed bulkheads use it to emit with their bounded label instead.
    pub(crate) async fn acquire_quiet(&self) -> Option<BulkheadPermit> {
        if let Some(p) = self.try_acquire() {
            return Some(p);
        }
        let inner = &*self.inner;
        let mut slot = inner.enter_queue()?;
        let waited = tokio::time::timeout(inner.queue_timeout, inner.semaphore.acquire()).await;
        match waited {
            Ok(Ok(p)) => {
                p.forget();
                slot.admitted = true;
                Some(BulkheadPermit {
                    inner: self.inner.clone(),
                })
            }
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

impl Inner {
    /// Counts one more waiter if the calls running and waiting leave room; the caller
    /// must give the slot back through a drop guard ([`QueueSlot`] or
    /// [`OwnedQueueSlot`]).
    fn take_queue_slot(&self) -> bool {
        let max = self.max_concurrent.saturating_add(self.max_queued);
        let room = self
            .occupied
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                (o < max).then_some(o + 1)
            })
            .is_ok();
        if room {
            self.queued.fetch_add(1, Ordering::AcqRel);
        }
        room
    }

    /// A waiter leaves the queue: with a permit (its place passes to the permit) or
    /// without one.
    fn leave_queue(&self, admitted: bool) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        if !admitted {
            self.occupied.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Takes a queue slot if the queue has room.
    fn enter_queue(&self) -> Option<QueueSlot<'_>> {
        // `then`, not `then_some`: a slot built eagerly would be dropped (and
        // decrement the count) when the queue is full.
        self.take_queue_slot().then(|| QueueSlot {
            inner: self,
            admitted: false,
        })
    }

    #[cold]
    pub(crate) fn reject(&self) -> Error<Infallible> {
        self.listeners.emit(|| Event::BulkheadRejected {
            name: self.name.clone(),
        });
        Error::BulkheadFull
    }
}

/// Re-types a policy error that cannot carry an inner error.
pub(crate) fn never<E>(e: Error<Infallible>) -> Error<E> {
    e.map_inner(|n| match n {})
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("name", &self.inner.name)
            .field("max_concurrent", &self.inner.max_concurrent)
            .field("max_queued", &self.inner.max_queued)
            .field("queue_timeout", &self.inner.queue_timeout)
            .field("available", &self.available())
            .field("queued", &self.queued())
            .finish()
    }
}

/// Builds a [`Bulkhead`]; every setting has a documented default.
#[derive(Clone)]
pub struct BulkheadBuilder {
    name: Arc<str>,
    max_concurrent: usize,
    max_queued: usize,
    queue_timeout: Duration,
    listeners: Listeners,
}

impl Default for BulkheadBuilder {
    fn default() -> Self {
        BulkheadBuilder {
            name: Arc::from(DEFAULT_NAME),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_queued: DEFAULT_MAX_QUEUED,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            listeners: Listeners::new(),
        }
    }
}

impl fmt::Debug for BulkheadBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadBuilder")
            .field("name", &self.name)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_queued", &self.max_queued)
            .field("queue_timeout", &self.queue_timeout)
            .field("listeners", &self.listeners)
            .finish()
    }
}

impl BulkheadBuilder {
    /// The name used in events and metrics (default [`DEFAULT_NAME`]).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Cap on calls in flight, at least 1 (default [`DEFAULT_MAX_CONCURRENT`]).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }

    /// Cap on calls waiting for a permit; 0 rejects at once when all permits are
    /// taken (default [`DEFAULT_MAX_QUEUED`]).
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n;
        self
    }

    /// Longest a call waits in the queue before it is rejected; must be more than
    /// zero when `max_queued > 0` (default [`DEFAULT_QUEUE_TIMEOUT`]).
    pub fn queue_timeout(mut self, d: Duration) -> Self {
        self.queue_timeout = d;
        self
    }

    /// Adds a listener for [`Event::BulkheadRejected`].
    pub fn listener(mut self, l: impl Listener) -> Self {
        self.listeners.push(Arc::new(l));
        self
    }

    /// Validates the settings and builds the bulkhead.
    pub fn build(self) -> Result<Bulkhead, ConfigError> {
        // An empty name is an empty label value in metrics, which Prometheus reads as no label.
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.max_concurrent == 0 {
            return Err(ConfigError::new("max_concurrent", "must be at least 1"));
        }
        if self.max_concurrent > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "max_concurrent",
                format!("must be at most {}", Semaphore::MAX_PERMITS),
            ));
        }
        if self.max_queued > 0 && self.queue_timeout.is_zero() {
            return Err(ConfigError::new(
                "queue_timeout",
                "must be more than zero when max_queued > 0",
            ));
        }
        Ok(Bulkhead {
            inner: Arc::new(Inner {
                name: self.name,
                semaphore: Semaphore::new(self.max_concurrent),
                max_concurrent: self.max_concurrent,
                max_queued: self.max_queued,
                queue_timeout: self.queue_timeout,
                queued: AtomicUsize::new(0),
                occupied: AtomicUsize::new(0),
                listeners: self.listeners,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_validates() {
        assert_eq!(
            Bulkhead::builder()
                .max_concurrent(0)
                .build()
                .unwrap_err()
                .field(),
            "max_concurrent"
        );
        assert_eq!(
            Bulkhead::builder()
                .max_queued(1)
                .queue_timeout(Duration::ZERO)
                .build()
                .unwrap_err()
                .field(),
            "queue_timeout"
        );
        let b = Bulkhead::builder().build().unwrap();
        assert_eq!(b.max_concurrent(), DEFAULT_MAX_CONCURRENT);
        assert_eq!(b.max_queued(), DEFAULT_MAX_QUEUED);
        assert_eq!(b.available(), DEFAULT_MAX_CONCURRENT);
    }

    #[test]
    fn types_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Bulkhead>();
        assert_send_sync::<BulkheadPermit>();
    }
}
