//! [`KeyedRateLimiter`]: one GCRA state per key, with a bounded number of keys.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Gcra, InsufficientCapacity, RateLimiterBuilder};
use crate::keyed::{Keyed, KeyedBuilder};
use crate::{ConfigError, Error, Event, Listener, Listeners};

/// A rate limit per key (client, tenant, API key), each key with its own GCRA state
/// of one `AtomicU64`, kept in a bounded [`Keyed`] map.
///
/// Keys beyond `max_keys` that find nothing idle to evict share the overflow state:
/// together they get one key's rate. Events ([`Event::RateLimited`]) are named by the
/// key's bounded label (the key if it is among the top N, else `other`).
///
/// An idle key is only evicted once its bucket has refilled (the idle timeout is at
/// least `burst × interval`), so eviction never hands a client a fresh burst early.
///
/// ```
/// use bulwark::rate_limit::KeyedRateLimiter;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// tokio::time::pause();
/// let limiter = KeyedRateLimiter::builder()
///     .per_second(1)
///     .burst(1)
///     .max_keys(10_000)
///     .build()
///     .expect("valid settings");
///
/// assert!(limiter.check(&"alice").is_ok());
/// assert!(limiter.check(&"bob").is_ok(), "keys are independent");
/// let err = limiter.check(&"alice").unwrap_err();
/// assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
/// # }
/// ```
pub struct KeyedRateLimiter<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    keyed: Keyed<K, AtomicU64>,
    gcra: Gcra,
    name: Option<Arc<str>>,
    listeners: Listeners,
}

impl<K> Clone for KeyedRateLimiter<K> {
    fn clone(&self) -> Self {
        KeyedRateLimiter {
            inner: self.inner.clone(),
        }
    }
}

impl KeyedRateLimiter<()> {
    /// A builder; a rate is required, the key-map settings have [`Keyed`]'s defaults.
    pub fn builder() -> KeyedRateLimiterBuilder {
        KeyedRateLimiterBuilder::default()
    }
}

impl<K> KeyedRateLimiter<K>
where
    K: Hash + Eq + Clone + Send + Sync + fmt::Display + 'static,
{
    /// Takes one cell from `key`'s budget, or fails with the exact `retry_after`.
    #[inline]
    pub fn check(&self, key: &K) -> Result<(), Error<Infallible>> {
        self.check_at(key, Instant::now())
    }

    /// [`check`](Self::check) at a time the caller already read.
    #[inline]
    pub fn check_at(&self, key: &K, now: Instant) -> Result<(), Error<Infallible>> {
        self.take(key, now, 1)
    }

    /// Takes `n` cells from `key`'s budget at once (all or none); see
    /// [`RateLimiter::check_n`](super::RateLimiter::check_n).
    pub fn check_n(
        &self,
        key: &K,
        n: u32,
    ) -> Result<Result<(), Error<Infallible>>, InsufficientCapacity> {
        if !self.inner.gcra.needs_take(n)? {
            return Ok(Ok(()));
        }
        Ok(self.take(key, Instant::now(), n))
    }

    /// Runs `f` if `key` has a conforming cell now; otherwise rejects at once with
    /// [`Error::RateLimited`].
    pub async fn call<F, Fut, T, E>(&self, key: &K, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.check(key).map_err(crate::bulkhead::never)?;
        f().await.map_err(Error::Inner)
    }

    /// Cells `key` could take right now (the full burst for a key not in the map).
    pub fn remaining(&self, key: &K) -> u32 {
        let g = &self.inner.gcra;
        match self.inner.keyed.peek(key) {
            Some(cell) => g.remaining(&cell, g.nanos(Instant::now())),
            None => g.burst,
        }
    }

    /// Keys with their own state (never more than `max_keys`).
    pub fn len(&self) -> usize {
        self.inner.keyed.len()
    }

    /// True when no key has its own state.
    pub fn is_empty(&self) -> bool {
        self.inner.keyed.is_empty()
    }

    /// The top keys by checks, highest first; see [`Keyed::top_keys`].
    pub fn top_keys(&self) -> Vec<(K, u64)> {
        self.inner.keyed.top_keys()
    }

    /// The bounded label for `key`; see [`Keyed::label`].
    pub fn label(&self, key: &K) -> Arc<str> {
        self.inner.keyed.label(key)
    }

    /// Checks that went to the shared overflow state.
    pub fn overflow_calls(&self) -> u64 {
        self.inner.keyed.overflow_calls()
    }

    #[inline]
    fn take(&self, key: &K, now: Instant, n: u32) -> Result<(), Error<Infallible>> {
        let g = &self.inner.gcra;
        let cell = self.inner.keyed.get(key);
        match g.take(&cell, g.nanos(now), n) {
            Ok(()) => Ok(()),
            Err(wait) => {
                self.inner.listeners.emit(|| Event::RateLimited {
                    name: crate::keyed::qualified(
                        self.inner.name.as_ref(),
                        cell.label_arc(self.inner.keyed.other_label()),
                    ),
                });
                Err(Error::RateLimited {
                    retry_after: Duration::from_nanos(wait),
                })
            }
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for KeyedRateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field(
                "interval",
                &Duration::from_nanos(self.inner.gcra.interval_ns),
            )
            .field("burst", &self.inner.gcra.burst)
            .field("keys", &self.inner.keyed)
            .finish()
    }
}

/// Builds a [`KeyedRateLimiter`]: the rate settings of [`RateLimiterBuilder`] and the
/// key-map settings of [`KeyedBuilder`].
#[derive(Debug, Clone, Default)]
pub struct KeyedRateLimiterBuilder {
    limiter: RateLimiterBuilder,
    keyed: KeyedBuilder,
    idle_timeout: Option<Duration>,
    name: Option<Arc<str>>,
}

impl KeyedRateLimiterBuilder {
    crate::keyed::keyed_setters!("limiter", "state");

    crate::keyed::forward_setters! { limiter =>
        /// `n` cells per `per` for each key (required, or `per_second`/`per_minute`).
        fn rate(n: u32, per: Duration);
        /// `n` cells per second for each key.
        fn per_second(n: u32);
        /// `n` cells per minute for each key.
        fn per_minute(n: u32);
        /// Most cells one key takes at once (default: the rate's `n`).
        fn burst(b: u32);
        /// Adds a listener for [`Event::RateLimited`] (named by the key's bounded label).
        fn listener(l: impl Listener);
    }

    /// Idle time after which a key may be evicted. Must be at least
    /// `burst × interval` (the time a drained bucket takes to refill), so eviction
    /// never forgets a debt. Default: the larger of that and
    /// [`DEFAULT_IDLE_TIMEOUT`](crate::keyed::DEFAULT_IDLE_TIMEOUT).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = Some(d);
        self
    }

    /// Validates the settings and builds the limiter.
    pub fn build<K>(self) -> Result<KeyedRateLimiter<K>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + fmt::Display + 'static,
    {
        let gcra = self.limiter.gcra()?;
        let refill = Duration::from_nanos(gcra.tau_ns);
        let idle = match self.idle_timeout {
            Some(d) if d < refill => {
                return Err(ConfigError::new(
                    "idle_timeout",
                    format!(
                        "must be at least burst × interval ({refill:?}), or an evicted key \
                         would get a fresh burst before its bucket refilled"
                    ),
                ))
            }
            Some(d) => d,
            None => refill.max(crate::keyed::DEFAULT_IDLE_TIMEOUT),
        };
        // A fresh cell is a full bucket: TAT 0 is at or before any `now`.
        let keyed = self
            .keyed
            .idle_timeout(idle)
            .build(|_: &K| AtomicU64::new(0))?;
        Ok(KeyedRateLimiter {
            inner: Arc::new(Inner {
                keyed,
                gcra,
                name: self.name,
                listeners: self.limiter.listeners,
            }),
        })
    }
}
