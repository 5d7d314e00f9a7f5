//! Load shedding by priority: a concurrency limit whose wait queue serves the most
//! important calls first, and drops the least important ones when it is full.
//!
//! # Why
//!
//! A [`Bulkhead`](crate::bulkhead::Bulkhead) treats every call alike: when it is full, the
//! next call is refused, whether it is a health probe, a checkout or a batch export.
//! Under overload a service should instead keep serving what matters and shed the rest
//! first (Google SRE's "criticality", Kubernetes' API priority and fairness, Netflix's
//! prioritised concurrency limits). [`Shedder`] does that with four [`Priority`] levels:
//!
//! * up to `max_concurrent` calls run at once;
//! * beyond that, calls wait in a queue of at most `max_queued`, served highest priority
//!   first and, within a priority, first come first served;
//! * when the queue is full, a new call **displaces** the least important waiter (the
//!   newest of the lowest priority) if it is more important than it; otherwise the new
//!   call is shed;
//! * a call waits at most `queue_timeout` (or its own deadline, if earlier).
//!
//! A shed call fails with [`Error::Shed`] at once, and emits [`Event::Shed`] with its
//! priority and the reason: `queue_full`, `displaced` or `timeout`.
//!
//! # How
//!
//! One `std::sync::Mutex` guards the count of running calls and the queue (a
//! `BTreeMap` ordered by priority, then arrival); it is never held across an `.await`.
//! A finished call hands its slot straight to the first waiter (through a oneshot
//! channel), so a slot never goes back to the pool while someone waits: the queue is
//! non-empty only while every slot is taken. A waiter that is cancelled (its future
//! dropped) leaves the queue, and gives back a slot it was handed but never saw.
//!
//! ```
//! use bulwark::shed::{Priority, Shedder};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let shedder = Shedder::builder()
//!     .name("api")
//!     .max_concurrent(1)
//!     .max_queued(1)
//!     .queue_timeout(Duration::from_millis(100))
//!     .build()
//!     .expect("valid settings");
//! let running = shedder.acquire(Priority::Normal).await.unwrap();
//! // The one slot is taken: a low-priority call waits in the queue (of one) ...
//! let low = tokio::spawn({
//!     let s = shedder.clone();
//!     async move { s.acquire(Priority::Low).await.map(drop) }
//! });
//! tokio::task::yield_now().await;
//! // ... until a critical call takes its place.
//! let critical = tokio::spawn({
//!     let s = shedder.clone();
//!     async move { s.acquire(Priority::Critical).await.map(drop) }
//! });
//! assert!(matches!(low.await.unwrap(), Err(bulwark::Error::Shed)));
//! drop(running);
//! assert!(critical.await.unwrap().is_ok());
//! # }
//! ```

mod layer;

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

pub use layer::{ResponseFuture, ShedLayer, ShedService};

use crate::{ConfigError, Error, Event, Listener, Listeners};

/// Default longest wait in the queue.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);

/// How important a call is. Ordered: `Low < Normal < High < Critical`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Shed first: batch work, prefetches, analytics.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Served before normal calls.
    High,
    /// Shed last: what must work even under overload (health, payments, control calls).
    Critical,
}

impl Priority {
    /// Every priority, least important first.
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];

    /// `low`, `normal`, `high` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// The priority named `s` (as [`as_str`](Self::as_str) writes it, ASCII case ignored).
    pub fn from_name(s: &str) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// The queue was full of calls at least as important.
    QueueFull,
    /// A more important call took its place in the full queue.
    Displaced,
    /// It waited `queue_timeout` (or until its deadline) without a slot.
    Timeout,
}

impl ShedReason {
    /// Every reason.
    pub const ALL: [ShedReason; 3] = [
        ShedReason::QueueFull,
        ShedReason::Displaced,
        ShedReason::Timeout,
    ];

    /// `queue_full`, `displaced` or `timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::Displaced => "displaced",
            ShedReason::Timeout => "timeout",
        }
    }
}

/// Queue order: highest priority first, then arrival.
type Key = (Reverse<Priority>, u64);

/// A slot handed to a waiter.
struct Grant;

struct State {
    running: usize,
    queue: BTreeMap<Key, oneshot::Sender<Grant>>,
    seq: u64,
}

struct Inner {
    name: Arc<str>,
    max_concurrent: usize,
    max_queued: usize,
    queue_timeout: Duration,
    state: Mutex<State>,
    listeners: Listeners,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent (a count and a map), so a panic
        // elsewhere while holding the lock cannot corrupt it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A running call ended: its slot goes to the first waiter, or back to the pool.
    fn release(&self) {
        let mut st = self.lock();
        while let Some((_, tx)) = st.queue.pop_first() {
            if tx.send(Grant).is_ok() {
                return;
            }
        }
        st.running -= 1;
    }

    fn shed(&self, priority: Priority, reason: ShedReason) -> Error<Infallible> {
        self.listeners.emit(|| Event::Shed {
            name: self.name.clone(),
            priority: priority.as_str(),
            reason: reason.as_str(),
        });
        Error::Shed
    }
}

/// A running call's slot; dropping it ends the call (the slot goes to the next waiter).
#[must_use = "the slot is released when the permit is dropped"]
pub struct ShedPermit {
    inner: Arc<Inner>,
}

impl Drop for ShedPermit {
    fn drop(&mut self) {
        self.inner.release();
    }
}

impl fmt::Debug for ShedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShedPermit")
            .field("shedder", &self.inner.name)
            .finish()
    }
}

/// A waiter's place in the queue; leaving it (cancelled, timed out) removes it, and
/// gives back a slot that was handed over but not yet taken.
struct Queued {
    inner: Arc<Inner>,
    key: Key,
    rx: oneshot::Receiver<Grant>,
    done: bool,
}

impl Queued {
    /// Leaves the queue: `true` when a slot had been handed over meanwhile (the caller
    /// now owns it).
    fn leave(&mut self) -> bool {
        self.done = true;
        let mut st = self.inner.lock();
        if st.queue.remove(&self.key).is_some() {
            return false;
        }
        // Out of the queue already: handed a slot (sent under the lock, so it is in the
        // channel now) or displaced (the sender dropped).
        drop(st);
        self.rx.try_recv().is_ok()
    }
}

/// What [`Shedder::enqueue`] got: a slot, or a place in the queue.
pub(crate) enum Entry {
    Granted(ShedPermit),
    Waiting(Waiting),
}

/// A place in the queue, waited on with [`wait`](Self::wait); dropping it leaves the queue.
pub(crate) struct Waiting {
    queued: Queued,
    priority: Priority,
    until: Instant,
}

impl Waiting {
    /// Waits for a slot until the queue timeout (or the deadline); [`Error::Shed`] when the call
    /// is displaced or times out.
    pub(crate) async fn wait(self) -> Result<ShedPermit, Error<Infallible>> {
        let Waiting {
            mut queued,
            priority,
            until,
        } = self;
        let inner = queued.inner.clone();
        let granted = match tokio::time::timeout_at(until, &mut queued.rx).await {
            Ok(Ok(Grant)) => {
                queued.done = true;
                true
            }
            Ok(Err(_)) => {
                queued.done = true;
                return Err(inner.shed(priority, ShedReason::Displaced));
            }
            // Timed out, unless a slot came in the meantime.
            Err(_) => queued.leave(),
        };
        if granted {
            Ok(ShedPermit { inner })
        } else {
            Err(inner.shed(priority, ShedReason::Timeout))
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if !self.done && self.leave() {
            self.inner.release();
        }
    }
}

/// A concurrency limit with a priority queue that sheds the least important calls
/// first. Cheap to clone; clones share the limit.
#[derive(Clone)]
pub struct Shedder {
    inner: Arc<Inner>,
}

impl fmt::Debug for Shedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shedder")
            .field("name", &self.inner.name)
            .field("max_concurrent", &self.inner.max_concurrent)
            .field("max_queued", &self.inner.max_queued)
            .field("running", &self.running())
            .field("queued", &self.queued())
            .finish()
    }
}

impl Shedder {
    /// A builder; `max_concurrent` is required.
    pub fn builder() -> ShedderBuilder {
        ShedderBuilder::default()
    }

    /// The name events carry.
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// Calls running now.
    pub fn running(&self) -> usize {
        self.inner.lock().running
    }

    /// Calls waiting now.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// A slot if one is free now, without queueing (`None` is not an error and emits
    /// nothing).
    pub fn try_acquire(&self) -> Option<ShedPermit> {
        let mut st = self.inner.lock();
        (st.running < self.inner.max_concurrent).then(|| {
            st.running += 1;
            ShedPermit {
                inner: self.inner.clone(),
            }
        })
    }

    /// A slot for a call of `priority`: at once if one is free, else after waiting in
    /// the queue at most `queue_timeout`. [`Error::Shed`] when the call is shed.
    pub async fn acquire(&self, priority: Priority) -> Result<ShedPermit, Error<Infallible>> {
        self.acquire_until(priority, None).await
    }

    /// As [`acquire`](Self::acquire), waiting no later than `deadline` either.
    pub async fn acquire_until(
        &self,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<ShedPermit, Error<Infallible>> {
        match self.enqueue(priority, deadline)? {
            Entry::Granted(permit) => Ok(permit),
            Entry::Waiting(w) => w.wait().await,
        }
    }

    /// Takes a free slot, or a place in the queue, now (so that the call keeps its place in
    /// arrival order however late its wait is first polled). The queue timeout starts now.
    pub(crate) fn enqueue(
        &self,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<Entry, Error<Infallible>> {
        let inner = &self.inner;
        let mut st = inner.lock();
        if st.running < inner.max_concurrent {
            st.running += 1;
            drop(st);
            return Ok(Entry::Granted(ShedPermit {
                inner: inner.clone(),
            }));
        }
        let now = Instant::now();
        // Out of time already: never take (or displace) a place in the queue.
        if deadline.is_some_and(|d| d <= now) {
            drop(st);
            return Err(inner.shed(priority, ShedReason::Timeout));
        }
        if st.queue.len() >= inner.max_queued {
            // Displace the least important (and newest of those) if it matters less.
            match st.queue.last_key_value().map(|(k, _)| *k) {
                Some(last) if last.0 .0 < priority => {
                    // Its sender is dropped here: the waiter sees that it was displaced.
                    st.queue.remove(&last);
                }
                _ => {
                    drop(st);
                    return Err(inner.shed(priority, ShedReason::QueueFull));
                }
            }
        }
        st.seq += 1;
        let key = (Reverse(priority), st.seq);
        let (tx, rx) = oneshot::channel();
        st.queue.insert(key, tx);
        drop(st);
        // A timeout too long to add to the clock (`Duration::MAX`: wait "forever") saturates.
        let mut until = crate::timeout::saturating_after(now, inner.queue_timeout);
        if let Some(d) = deadline {
            until = until.min(d);
        }
        Ok(Entry::Waiting(Waiting {
            queued: Queued {
                inner: inner.clone(),
                key,
                rx,
                done: false,
            },
            priority,
            until,
        }))
    }

    /// Runs `f` in a slot for a call of `priority`; the slot is held until `f`'s future
    /// completes (or is dropped). It waits in the queue no later than the
    /// [`Deadline`](crate::timeout::Deadline) in scope, if any (shed with reason `timeout`).
    pub async fn call<F, Fut, T, E>(&self, priority: Priority, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = crate::timeout::Deadline::current().map(|d| d.instant());
        let _permit = self
            .acquire_until(priority, deadline)
            .await
            .map_err(|e| e.map_inner(|n| match n {}))?;
        f().await.map_err(Error::Inner)
    }
}

/// Builds a [`Shedder`].
#[derive(Default)]
pub struct ShedderBuilder {
    name: Option<Arc<str>>,
    max_concurrent: Option<usize>,
    max_queued: Option<usize>,
    queue_timeout: Option<Duration>,
    listeners: Listeners,
}

impl fmt::Debug for ShedderBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShedderBuilder")
            .field("name", &self.name)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_queued", &self.max_queued)
            .field("queue_timeout", &self.queue_timeout)
            .finish_non_exhaustive()
    }
}

impl ShedderBuilder {
    /// The name events carry (default `shedder`).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls running at once (required, at least 1).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = Some(n);
        self
    }

    /// Calls waiting at once (default: `max_concurrent`; 0 sheds every call that finds
    /// no free slot).
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = Some(n);
        self
    }

    /// Longest wait in the queue (default [`DEFAULT_QUEUE_TIMEOUT`]; more than zero).
    pub fn queue_timeout(mut self, d: Duration) -> Self {
        self.queue_timeout = Some(d);
        self
    }

    /// Adds a listener for [`Event::Shed`].
    pub fn listener(mut self, l: impl Listener) -> Self {
        self.listeners.push(Arc::new(l));
        self
    }

    /// Validates the settings and builds the shedder.
    pub fn build(self) -> Result<Shedder, ConfigError> {
        // An empty name is an empty label value in metrics, which Prometheus reads as no label.
        if self.name.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        let max_concurrent = match self.max_concurrent {
            None => return Err(ConfigError::new("max_concurrent", "is required")),
            Some(0) => return Err(ConfigError::new("max_concurrent", "must be at least 1")),
            Some(n) => n,
        };
        let queue_timeout = self.queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT);
        if queue_timeout.is_zero() {
            return Err(ConfigError::new("queue_timeout", "must be more than zero"));
        }
        Ok(Shedder {
            inner: Arc::new(Inner {
                name: self.name.unwrap_or_else(|| "shedder".into()),
                max_concurrent,
                max_queued: self.max_queued.unwrap_or(max_concurrent),
                queue_timeout,
                state: Mutex::new(State {
                    running: 0,
                    queue: BTreeMap::new(),
                    seq: 0,
                }),
                listeners: self.listeners,
            }),
        })
    }
}

#[cfg(test)]
mod tests;
