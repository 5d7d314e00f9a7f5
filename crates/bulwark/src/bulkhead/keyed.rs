//! [`KeyedBulkhead`]: one bulkhead per key, with a bounded number of keys.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use super::{never, Bulkhead, BulkheadBuilder, BulkheadPermit};
use crate::keyed::{Keyed, KeyedBuilder, KeyedEntry};
use crate::{ConfigError, Error, Event, Listener, Listeners};

/// A bulkhead per key (tenant, client, upstream host): each key gets its own
/// `max_concurrent` slots and queue, so one key's slow or heavy calls cannot take
/// another key's share. Keys live in a bounded [`Keyed`] map.
///
/// Keys beyond `max_keys` that find nothing idle to evict share the overflow
/// bulkhead: together they get one key's slots. A key with a call in flight (or a
/// [`KeyedBulkheadPermit`] alive) is never evicted, so a key can never have two
/// bulkheads (and twice its slots) at once. Events ([`Event::BulkheadRejected`]) are
/// named by the key's bounded label.
///
/// ```
/// use bulwark::bulkhead::KeyedBulkhead;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bulkheads = KeyedBulkhead::builder()
///     .max_concurrent(1)
///     .build()
///     .expect("valid settings");
///
/// let alice = bulkheads.try_acquire(&"alice").expect("alice has a free slot");
/// assert!(bulkheads.try_acquire(&"alice").is_none(), "alice's one slot is taken");
/// assert!(bulkheads.try_acquire(&"bob").is_some(), "bob has his own");
/// drop(alice);
/// let r = bulkheads.call(&"alice", || async { Ok::<_, std::io::Error>(1) }).await;
/// assert_eq!(r.unwrap(), 1);
/// # }
/// ```
pub struct KeyedBulkhead<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    keyed: Keyed<K, Bulkhead>,
    name: Option<Arc<str>>,
    listeners: Listeners,
}

impl<K> Clone for KeyedBulkhead<K> {
    fn clone(&self) -> Self {
        KeyedBulkhead {
            inner: self.inner.clone(),
        }
    }
}

/// A slot in one key's bulkhead. Dropping it frees the slot; while it is alive the
/// key's bulkhead is not evicted.
#[must_use = "the bulkhead slot is released as soon as the permit is dropped"]
pub struct KeyedBulkheadPermit<K> {
    _permit: BulkheadPermit,
    entry: KeyedEntry<K, Bulkhead>,
}

impl<K> KeyedBulkheadPermit<K> {
    /// True if the key did not fit in the map and this slot is the overflow
    /// bulkhead's.
    pub fn is_overflow(&self) -> bool {
        self.entry.is_overflow()
    }
}

impl<K: fmt::Debug> fmt::Debug for KeyedBulkheadPermit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBulkheadPermit")
            .field("key", &self.entry.key())
            .finish_non_exhaustive()
    }
}

impl KeyedBulkhead<()> {
    /// A builder with the [`Bulkhead`] and [`Keyed`] defaults.
    pub fn builder() -> KeyedBulkheadBuilder {
        KeyedBulkheadBuilder::default()
    }
}

impl<K> KeyedBulkhead<K>
where
    K: Hash + Eq + Clone + Send + Sync + fmt::Display + 'static,
{
    /// Takes a slot in `key`'s bulkhead if one is free, without waiting (a probe:
    /// no event when none is).
    pub fn try_acquire(&self, key: &K) -> Option<KeyedBulkheadPermit<K>> {
        let entry = self.inner.keyed.get(key);
        let permit = entry.try_acquire()?;
        Some(KeyedBulkheadPermit {
            _permit: permit,
            entry,
        })
    }

    /// Takes a slot in `key`'s bulkhead, waiting in its bounded queue; fails with
    /// [`Error::BulkheadFull`] as [`Bulkhead::acquire`] does.
    pub async fn acquire(&self, key: &K) -> Result<KeyedBulkheadPermit<K>, Error<Infallible>> {
        let entry = self.inner.keyed.get(key);
        match entry.acquire_quiet().await {
            Some(permit) => Ok(KeyedBulkheadPermit {
                _permit: permit,
                entry,
            }),
            None => {
                self.inner.listeners.emit(|| Event::BulkheadRejected {
                    name: crate::keyed::qualified(
                        self.inner.name.as_ref(),
                        entry.label_arc(self.inner.keyed.other_label()),
                    ),
                });
                Err(Error::BulkheadFull)
            }
        }
    }

    /// Runs `f` holding a slot in `key`'s bulkhead.
    pub async fn call<F, Fut, T, E>(&self, key: &K, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _permit = self.acquire(key).await.map_err(never)?;
        f().await.map_err(Error::Inner)
    }

    /// Calls in flight for `key` (0 for a key not in the map).
    pub fn in_flight(&self, key: &K) -> usize {
        self.inner.keyed.peek(key).map_or(0, |b| b.in_flight())
    }

    /// Calls waiting for `key` (0 for a key not in the map).
    pub fn queued(&self, key: &K) -> usize {
        self.inner.keyed.peek(key).map_or(0, |b| b.queued())
    }

    /// Keys with their own bulkhead (never more than `max_keys`).
    pub fn len(&self) -> usize {
        self.inner.keyed.len()
    }

    /// True when no key has its own bulkhead.
    pub fn is_empty(&self) -> bool {
        self.inner.keyed.is_empty()
    }

    /// The top keys by calls, highest first; see [`Keyed::top_keys`].
    pub fn top_keys(&self) -> Vec<(K, u64)> {
        self.inner.keyed.top_keys()
    }

    /// The bounded label for `key`; see [`Keyed::label`].
    pub fn label(&self, key: &K) -> Arc<str> {
        self.inner.keyed.label(key)
    }

    /// Calls that went to the shared overflow bulkhead.
    pub fn overflow_calls(&self) -> u64 {
        self.inner.keyed.overflow_calls()
    }
}

impl<K: fmt::Debug> fmt::Debug for KeyedBulkhead<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBulkhead")
            .field("keys", &self.inner.keyed)
            .finish()
    }
}

/// Builds a [`KeyedBulkhead`]: per-key settings of [`BulkheadBuilder`], key-map
/// settings of [`KeyedBuilder`].
#[derive(Debug, Clone, Default)]
pub struct KeyedBulkheadBuilder {
    bulkhead: BulkheadBuilder,
    keyed: KeyedBuilder,
    name: Option<Arc<str>>,
    listeners: Listeners,
}

impl KeyedBulkheadBuilder {
    crate::keyed::forward_setters! { bulkhead =>
        /// Cap on calls in flight per key (default
        /// [`DEFAULT_MAX_CONCURRENT`](super::DEFAULT_MAX_CONCURRENT)).
        fn max_concurrent(n: usize);
        /// Cap on calls waiting per key (default [`DEFAULT_MAX_QUEUED`](super::DEFAULT_MAX_QUEUED)).
        fn max_queued(n: usize);
        /// Longest wait in a key's queue (default
        /// [`DEFAULT_QUEUE_TIMEOUT`](super::DEFAULT_QUEUE_TIMEOUT)).
        fn queue_timeout(d: Duration);
    }

    crate::keyed::keyed_setters!("bulkhead", "bulkhead");

    crate::keyed::forward_setters! { keyed =>
        /// Idle time after which a key's bulkhead may be evicted (default
        /// [`DEFAULT_IDLE_TIMEOUT`](crate::keyed::DEFAULT_IDLE_TIMEOUT)).
        fn idle_timeout(d: Duration);
    }

    /// Adds a listener for [`Event::BulkheadRejected`] (named by the key's label).
    pub fn listener(mut self, l: impl Listener) -> Self {
        self.listeners.push(Arc::new(l));
        self
    }

    /// Validates the settings and builds the keyed bulkhead.
    pub fn build<K>(self) -> Result<KeyedBulkhead<K>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + fmt::Display + 'static,
    {
        // Validated once here; each key's bulkhead is a fresh copy of this one.
        let prototype = self.bulkhead.build()?;
        let keyed = self.keyed.build(move |_: &K| prototype.fresh_copy())?;
        Ok(KeyedBulkhead {
            inner: Arc::new(Inner {
                keyed,
                name: self.name,
                listeners: self.listeners,
            }),
        })
    }
}
