//! [`KeyedCircuitBreaker`]: one breaker per key, with a bounded number of keys.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use super::{CircuitBreaker, CircuitBreakerBuilder, Permit};
use crate::classify::AnyError;
use crate::events::{BreakerState, Event, Listener, Listeners};
use crate::keyed::{Keyed, KeyedBuilder, KeyedEntry};
use crate::{Classify, ConfigError, Error, Outcome};

/// A circuit breaker per key (upstream host, tenant, API key): one failing host
/// opens its own breaker without refusing calls to the healthy ones. Keys live in a
/// bounded [`Keyed`] map, so a flood of distinct keys cannot exhaust memory: past
/// `max_keys`, idle keys are evicted, and when none is idle the new keys share one
/// overflow breaker.
///
/// Every per-key breaker has the settings of the one [`CircuitBreakerBuilder`]. Events
/// ([`Event::BreakerTransition`], [`Event::BreakerRejected`]) are named by the key's
/// bounded label (the key for the top keys, `other` for the rest), so metrics fed by
/// them never get one series per key.
///
/// ```
/// use bulwark::breaker::KeyedCircuitBreaker;
/// use bulwark::events::BreakerState;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let breakers = KeyedCircuitBreaker::builder()
///     .breaker(|b| b.count_window(4).minimum_calls(2))
///     .max_keys(1000)
///     .build()
///     .unwrap();
///
/// for _ in 0..2 {
///     let _ = breakers.call(&"db-1", || async { Err::<(), _>("down") }).await;
/// }
/// assert_eq!(breakers.state(&"db-1"), Some(BreakerState::Open));
/// // db-2 has its own breaker, still closed.
/// assert_eq!(breakers.call(&"db-2", || async { Ok::<_, ()>(7) }).await.unwrap(), 7);
/// # }
/// ```
pub struct KeyedCircuitBreaker<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    keyed: Keyed<K, CircuitBreaker>,
}

impl<K> Clone for KeyedCircuitBreaker<K> {
    fn clone(&self) -> Self {
        KeyedCircuitBreaker {
            inner: self.inner.clone(),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for KeyedCircuitBreaker<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("keys", &self.inner.keyed)
            .finish()
    }
}

/// A [`Permit`] from one key's breaker, from [`KeyedCircuitBreaker::try_acquire`]. While
/// it is alive the key's breaker is not evicted; the key's idle time starts when the
/// permit is recorded or dropped.
#[must_use = "a permit not recorded counts as an ignored call"]
pub struct KeyedPermit<K> {
    permit: Permit,
    entry: KeyedEntry<K, CircuitBreaker>,
}

impl<K> KeyedPermit<K> {
    /// Records the call's outcome; see [`Permit::record`].
    pub fn record(self, outcome: Outcome) {
        let KeyedPermit { permit, entry } = self;
        permit.record(outcome);
        // The key is in use until the outcome is in its breaker.
        drop(entry);
    }

    /// Records a success.
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// Records a failure.
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }

    /// True when this permit is one of the half-open probe calls; see
    /// [`Permit::is_probe`].
    pub fn is_probe(&self) -> bool {
        self.permit.is_probe()
    }

    /// True if the key did not fit in the map and this permit is the overflow
    /// breaker's.
    pub fn is_overflow(&self) -> bool {
        self.entry.is_overflow()
    }
}

impl<K: fmt::Debug> fmt::Debug for KeyedPermit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPermit")
            .field("key", &self.entry.key())
            .field("permit", &self.permit)
            .finish()
    }
}

impl KeyedCircuitBreaker<()> {
    /// A builder with the [`CircuitBreaker`] and [`Keyed`] defaults.
    pub fn builder() -> KeyedCircuitBreakerBuilder {
        KeyedCircuitBreakerBuilder::default()
    }
}

impl<K> KeyedCircuitBreaker<K>
where
    K: Hash + Eq + Clone + Send + Sync + fmt::Display + 'static,
{
    /// A permit from `key`'s breaker; see [`CircuitBreaker::try_acquire`]. While the
    /// permit is alive the key's breaker is not evicted (a call that takes long and
    /// then opens it leaves it open for its whole open duration, as [`call`](Self::call)
    /// does).
    pub fn try_acquire(&self, key: &K) -> Result<KeyedPermit<K>, Error<Infallible>> {
        let entry = self.inner.keyed.get(key);
        let permit = entry.try_acquire()?;
        Ok(KeyedPermit { permit, entry })
    }

    /// Runs `f` through `key`'s breaker, counting every `Err` as a failure.
    pub async fn call<T, E, F, Fut>(&self, key: &K, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(key, &AnyError, f).await
    }

    /// Runs `f` through `key`'s breaker with a classifier.
    pub async fn call_with<T, E, C, F, Fut>(
        &self,
        key: &K,
        classify: &C,
        f: F,
    ) -> Result<T, Error<E>>
    where
        C: Classify<T, E>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let breaker = self.inner.keyed.get(key).clone();
        breaker.call_with(classify, f).await
    }

    /// The state of `key`'s breaker, if the key has one (`None` for a key not in the
    /// map; the overflow breaker is not reported here).
    pub fn state(&self, key: &K) -> Option<BreakerState> {
        self.inner.keyed.peek(key).map(|b| b.state())
    }

    /// Keys with their own breaker (never more than `max_keys`).
    pub fn len(&self) -> usize {
        self.inner.keyed.len()
    }

    /// True when no key has its own breaker.
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

    /// Calls that went to the shared overflow breaker.
    pub fn overflow_calls(&self) -> u64 {
        self.inner.keyed.overflow_calls()
    }
}

/// Builds a [`KeyedCircuitBreaker`].
#[derive(Debug, Clone)]
pub struct KeyedCircuitBreakerBuilder {
    breaker: CircuitBreakerBuilder,
    keyed: KeyedBuilder,
    idle_timeout: Option<Duration>,
    name: Option<Arc<str>>,
    listeners: Listeners,
}

impl Default for KeyedCircuitBreakerBuilder {
    fn default() -> Self {
        KeyedCircuitBreakerBuilder {
            breaker: CircuitBreaker::builder(),
            keyed: KeyedBuilder::default(),
            idle_timeout: None,
            name: None,
            listeners: Listeners::new(),
        }
    }
}

impl KeyedCircuitBreakerBuilder {
    /// Per-key breaker settings, applied to a [`CircuitBreakerBuilder`] with the defaults
    /// (listeners set on it are dropped: events carry the key's label and go to this
    /// builder's [`listener`](Self::listener)s; a refusal's
    /// [`Error::CircuitOpen`](crate::Error::CircuitOpen) names the breaker by the name
    /// set here).
    pub fn breaker(
        mut self,
        f: impl FnOnce(CircuitBreakerBuilder) -> CircuitBreakerBuilder,
    ) -> Self {
        self.breaker = f(self.breaker);
        self
    }

    crate::keyed::keyed_setters!("breaker", "breaker");

    /// Adds a listener for the per-key breakers' events, named by the key's label.
    pub fn listener(mut self, l: impl Listener) -> Self {
        self.listeners.push(Arc::new(l));
        self
    }

    /// Idle time after which a key's breaker may be evicted (default
    /// [`DEFAULT_IDLE_TIMEOUT`](crate::keyed::DEFAULT_IDLE_TIMEOUT), raised to the
    /// longest open duration when that is longer). Evicting an open breaker closes
    /// it, so it must be at least the longest open duration: shorter is an error.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = Some(d);
        self
    }

    /// Validates the settings and builds the keyed breaker.
    pub fn build<K>(self) -> Result<KeyedCircuitBreaker<K>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + fmt::Display + 'static,
    {
        // Validate once, so the factory below cannot fail.
        self.breaker.clone().build()?;
        // An idle open breaker must not be evicted (and so closed) before its open
        // duration (with growth, the longest one) has run out.
        let longest_open = match self.breaker.growth {
            Some((_, max)) => max.max(self.breaker.open_duration),
            None => self.breaker.open_duration,
        };
        let idle = match self.idle_timeout {
            Some(d) if d < longest_open => {
                return Err(ConfigError::new(
                    "idle_timeout",
                    format!("must be at least the longest open duration ({longest_open:?})"),
                ))
            }
            Some(d) => d,
            None => crate::keyed::DEFAULT_IDLE_TIMEOUT.max(longest_open),
        };
        let keyed_builder = self.keyed.idle_timeout(idle);
        // Per-key breakers relabel their events through the map, which exists only
        // after the factory is given to it: hence a late-bound weak reference (weak,
        // so the map does not keep itself alive through its own factory).
        let this: Arc<OnceLock<Weak<Inner<K>>>> = Arc::new(OnceLock::new());
        let listeners = self.listeners;
        let policy_name = self.name;
        let template = self.breaker;
        let late = this.clone();
        let factory = move |key: &K, overflow: bool| {
            let mut b = template.clone();
            // The template's own listeners would hear every key's events under one name.
            b.listeners = Listeners::new();
            if !listeners.is_empty() {
                let key = key.clone();
                let late = late.clone();
                let listeners = listeners.clone();
                let policy_name = policy_name.clone();
                b = b.listener(move |e: &Event| {
                    // The overflow breaker serves every key that did not fit: never one key's.
                    let label: Arc<str> = match late.get().and_then(Weak::upgrade) {
                        Some(inner) if !overflow => inner.keyed.label(&key),
                        Some(inner) => inner.keyed.other_label().clone(),
                        None => Arc::from(crate::keyed::OTHER),
                    };
                    let label = crate::keyed::qualified(policy_name.as_ref(), label);
                    let renamed = match e {
                        Event::BreakerTransition { from, to, .. } => Event::BreakerTransition {
                            name: label,
                            from: *from,
                            to: *to,
                        },
                        Event::BreakerRejected { .. } => Event::BreakerRejected { name: label },
                        other => other.clone(),
                    };
                    listeners.emit(|| renamed);
                });
            }
            #[allow(clippy::expect_used)]
            b.build()
                .expect("infallible: these settings were validated by build() above")
        };
        let keyed = keyed_builder.build_marked(factory)?;
        let inner = Arc::new(Inner { keyed });
        let _ = this.set(Arc::downgrade(&inner));
        Ok(KeyedCircuitBreaker { inner })
    }
}
