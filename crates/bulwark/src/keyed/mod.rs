//! Keyed policies with bounded cardinality: one policy instance per key (client,
//! tenant, route, host), with a hard cap on how many keys are remembered.
//!
//! # Why
//!
//! A per-key policy ("100 requests per second *per client IP*", "a breaker *per
//! host*") needs one state per key. Keys come from request data, so whoever sends the
//! requests chooses how many there are: a scan from random source addresses, or a bug
//! that puts a request id in the key, creates a new entry per request until memory
//! runs out. That is a known failure of keyed limiters (governor #171, Polly #507),
//! and it has a twin in metrics, where one label value per key makes one time series
//! per key.
//!
//! [`Keyed`] bounds both:
//!
//! * **At most `max_keys` entries.** When the map is full, entries idle for longer
//!   than `idle_timeout` (and not in use right now) are evicted to make room. If none
//!   can be, the new key gets **the overflow instance**: one policy instance shared by
//!   every key that did not fit (the `other` bucket). Under a flood of distinct keys,
//!   the flood shares one limit, one bulkhead, one breaker, instead of each key
//!   getting a fresh one; keys already present keep their own. Memory stays bounded;
//!   the flood is throttled as a group.
//! * **At most `top_n` label values.** [`label`](Keyed::label) gives a key's own name
//!   only if it is among the `top_n` keys by call count, and `"other"` ([`OTHER`])
//!   for every other key, so metrics and events never get one series per key.
//!   [`top_keys`](Keyed::top_keys) reports who those keys are, with their counts.
//!
//! # How
//!
//! The map is split in [`SHARDS`] shards, each a `std::sync::RwLock<HashMap>`. Looking
//! up a key that is present takes one shard's read lock, clones an `Arc` and stores
//! the time of use and a call count in atomics: no allocation, no write lock. A new
//! key builds its policy with the factory (outside any lock), then takes the shard's
//! write lock to insert it. A shared atomic count enforces `max_keys` across shards
//! before an entry is inserted, so the map never holds more.
//!
//! Eviction is amortized, with no background task: inserting a key sweeps the map
//! for idle entries when one may have become idle (the earliest `last use +
//! idle_timeout` seen by the previous sweep, and at least 1/16 of `idle_timeout` after
//! it, so a stream of new keys does not scan the map at every call), so a flood against
//! a full map of live keys goes straight to the overflow instance without scanning. The top-N labels
//! are recomputed at most every `label_refresh` (default 10 s), by the call that
//! finds them due, and on every [`top_keys`](Keyed::top_keys).
//!
//! An entry that is in use (someone holds its [`KeyedEntry`], as a
//! [`KeyedBulkhead`](crate::bulkhead::KeyedBulkhead) call does while it runs) is
//! never evicted, so a key can never have two live instances at once.
//!
//! Built on it: [`KeyedBulkhead`](crate::bulkhead::KeyedBulkhead),
//! [`KeyedRateLimiter`](crate::rate_limit::KeyedRateLimiter) and
//! [`KeyedCircuitBreaker`](crate::breaker::KeyedCircuitBreaker).
//!
//! ```
//! use bulwark::keyed::Keyed;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // One counter per key, at most 2 keys.
//! let counters = Keyed::builder()
//!     .max_keys(2)
//!     .build(|_key: &String| AtomicU64::new(0))
//!     .expect("valid settings");
//!
//! counters.get(&"alice".to_string()).fetch_add(1, Ordering::Relaxed);
//! counters.get(&"bob".to_string()).fetch_add(1, Ordering::Relaxed);
//! let carol = counters.get(&"carol".to_string());
//! assert!(carol.is_overflow(), "the map is full: carol shares the overflow instance");
//! assert_eq!(counters.len(), 2);
//!
//! let top = counters.top_keys();
//! assert_eq!(top.len(), 2);
//! assert_eq!(&*counters.label(&"alice".to_string()), "alice");
//! assert_eq!(&*counters.label(&"carol".to_string()), "other");
//! # }
//! ```

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::ConfigError;

/// Default cap on remembered keys: 10 000.
///
/// A rate-limiter entry is about a hundred bytes, so the map stays around a megabyte;
/// enough for every tenant or active client of a single gateway, small enough that a
/// key flood costs nothing noticeable.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// Default idle time after which a key may be evicted: 5 minutes.
///
/// Long enough that a client pausing between bursts keeps its state (its rate-limit
/// debt, its breaker's window); short enough that a map filled by a passing flood
/// empties within minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Default number of keys that get their own label: 10.
///
/// Each label value is a time series in every metric that carries it; ten per keyed
/// policy is what a dashboard can show, and what a Prometheus server shrugs at.
pub const DEFAULT_TOP_N: usize = 10;

/// Default interval between recomputations of the top-N labels: 10 seconds.
///
/// About one scrape interval: labels follow traffic without churning series, and the
/// scan (one pass over at most `max_keys` entries) is paid rarely.
pub const DEFAULT_LABEL_REFRESH: Duration = Duration::from_secs(10);

/// The label of every key outside the top N, and of the overflow instance.
pub const OTHER: &str = "other";

/// Number of map shards. A power of two; sixteen is enough that writers (new keys)
/// rarely contend on a gateway-sized machine.
pub const SHARDS: usize = 16;

type Map<K, P> = HashMap<K, Arc<Entry<K, P>>>;

/// A map from key to policy instance, with bounded size and bounded labels.
///
/// Cheap to clone (an `Arc` inside); clones share the map.
pub struct Keyed<K, P> {
    shared: Arc<Shared<K, P>>,
}

impl<K, P> Clone for Keyed<K, P> {
    fn clone(&self) -> Self {
        Keyed {
            shared: self.shared.clone(),
        }
    }
}

/// Makes the policy instance for a key; `true`: the shared overflow instance (made once, for the
/// first key that did not fit, but serving every such key).
type Factory<K, P> = Box<dyn Fn(&K, bool) -> P + Send + Sync>;

struct Shared<K, P> {
    shards: Box<[RwLock<Map<K, P>>]>,
    hasher: RandomState,
    factory: Factory<K, P>,
    max_keys: usize,
    idle_ns: u64,
    top_n: usize,
    label_refresh_ns: u64,
    base: Instant,
    /// Entries in the map (or about to be inserted): never more than `max_keys`.
    len: AtomicUsize,
    /// No entry can be idle before this time (ns since `base`); `u64::MAX` while a
    /// sweep runs.
    next_sweep_ns: AtomicU64,
    next_label_ns: AtomicU64,
    overflow: OnceLock<Arc<Entry<K, P>>>,
    /// The current top-N entries (weak: being labelled must not keep one alive).
    top: Mutex<Vec<Weak<Entry<K, P>>>>,
    other: Arc<str>,
}

/// One key's policy instance and its bookkeeping.
pub(crate) struct Entry<K, P> {
    /// `None` for the overflow instance.
    key: Option<K>,
    policy: P,
    /// When it was last taken or given back (`get`, or the drop of a [`KeyedEntry`]), in
    /// nanoseconds since `base`.
    last_used_ns: AtomicU64,
    base: Instant,
    calls: AtomicU64,
    top: AtomicBool,
    label: OnceLock<Arc<str>>,
}

impl<K, P> Entry<K, P> {
    fn new(key: Option<K>, policy: P, base: Instant, now_ns: u64) -> Self {
        Entry {
            key,
            policy,
            last_used_ns: AtomicU64::new(now_ns),
            base,
            calls: AtomicU64::new(0),
            top: AtomicBool::new(false),
            label: OnceLock::new(),
        }
    }

    #[inline]
    fn touch(&self, now_ns: u64) {
        // Relaxed: both are statistics; no other memory is published through them.
        self.last_used_ns.store(now_ns, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// A key's policy instance, as [`Keyed::get`] returns it. Dereferences to the policy.
///
/// While it is alive the entry is not evicted, and its idle time starts when it is dropped: a
/// call longer than `idle_timeout` does not leave its key idle at its end (a breaker that call's
/// failure opened must outlive its open duration).
pub struct KeyedEntry<K, P> {
    entry: Arc<Entry<K, P>>,
    /// Taken for use ([`Keyed::get`]), not only looked at: its drop is the key's last use.
    used: bool,
}

impl<K, P> Drop for KeyedEntry<K, P> {
    fn drop(&mut self) {
        if self.used {
            let e = &*self.entry;
            e.last_used_ns
                .fetch_max(nanos_since(e.base, Instant::now()), Ordering::Relaxed);
        }
    }
}

impl<K, P> Clone for KeyedEntry<K, P> {
    fn clone(&self) -> Self {
        KeyedEntry {
            entry: self.entry.clone(),
            used: self.used,
        }
    }
}

impl<K, P> Deref for KeyedEntry<K, P> {
    type Target = P;

    #[inline]
    fn deref(&self) -> &P {
        &self.entry.policy
    }
}

impl<K, P> KeyedEntry<K, P> {
    /// The policy instance.
    pub fn policy(&self) -> &P {
        &self.entry.policy
    }

    /// True if this is the overflow instance, shared by every key that did not fit.
    pub fn is_overflow(&self) -> bool {
        self.entry.key.is_none()
    }

    /// The key this entry belongs to; `None` for the overflow instance.
    pub fn key(&self) -> Option<&K> {
        self.entry.key.as_ref()
    }

    /// Calls counted for this entry (every [`Keyed::get`] that returned it).
    pub fn calls(&self) -> u64 {
        self.entry.calls.load(Ordering::Relaxed)
    }

    /// True if this key is among the top N at the last label refresh.
    pub fn is_top(&self) -> bool {
        self.entry.top.load(Ordering::Relaxed)
    }
}

impl<K: fmt::Display, P> KeyedEntry<K, P> {
    /// The bounded label: the key's name if it is among the top N keys, else
    /// [`OTHER`].
    pub fn label(&self) -> &str {
        match (&self.entry.key, self.is_top()) {
            (Some(k), true) => self.entry.label.get_or_init(|| k.to_string().into()),
            _ => OTHER,
        }
    }

    /// [`label`](Self::label) as a shared string, for events (`other` is the one
    /// given, so no allocation happens on this path).
    pub(crate) fn label_arc(&self, other: &Arc<str>) -> Arc<str> {
        match (&self.entry.key, self.is_top()) {
            (Some(k), true) => self
                .entry
                .label
                .get_or_init(|| k.to_string().into())
                .clone(),
            _ => other.clone(),
        }
    }
}

impl<K: fmt::Debug, P> fmt::Debug for KeyedEntry<K, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedEntry")
            .field("key", &self.entry.key)
            .field("calls", &self.calls())
            .field("top", &self.is_top())
            .finish_non_exhaustive()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // No code panics while holding these locks (the factory runs outside them), so
    // a poisoned lock still guards a consistent map.
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Keyed<(), ()> {
    /// A builder with the documented defaults; the factory is given to
    /// [`build`](KeyedBuilder::build).
    pub fn builder() -> KeyedBuilder {
        KeyedBuilder::default()
    }
}

impl<K, P> Keyed<K, P>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    P: Send + Sync + 'static,
{
    /// The policy instance for `key`, created by the factory on first use (or the
    /// overflow instance when the map is full and nothing can be evicted). Counts a
    /// call and records the time of use.
    pub fn get(&self, key: &K) -> KeyedEntry<K, P> {
        let s = &*self.shared;
        let now = s.nanos(Instant::now());
        s.maybe_refresh_labels(now);
        let shard = s.shard(key);
        if let Some(e) = read(shard).get(key) {
            e.touch(now);
            return KeyedEntry {
                entry: e.clone(),
                used: true,
            };
        }
        let entry = s.insert(key, shard, now);
        entry.touch(now);
        KeyedEntry { entry, used: true }
    }

    /// The policy instance for `key` if the key is in the map; does not create one,
    /// count a call or touch it.
    pub fn peek<Q>(&self, key: &Q) -> Option<KeyedEntry<K, P>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let s = &*self.shared;
        read(s.shard(key)).get(key).map(|e| KeyedEntry {
            entry: e.clone(),
            used: false,
        })
    }

    /// The overflow instance, if any key has overflowed yet.
    pub fn overflow(&self) -> Option<KeyedEntry<K, P>> {
        self.shared.overflow.get().map(|e| KeyedEntry {
            entry: e.clone(),
            used: false,
        })
    }

    /// Calls that went to the overflow instance.
    pub fn overflow_calls(&self) -> u64 {
        self.shared
            .overflow
            .get()
            .map_or(0, |e| e.calls.load(Ordering::Relaxed))
    }

    /// Removes `key`'s entry; true if it was there. Holders of its [`KeyedEntry`]
    /// keep the old instance; the next `get` creates a fresh one.
    pub fn remove<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let s = &*self.shared;
        let removed = write(s.shard(key)).remove(key).is_some();
        if removed {
            s.len.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// Evicts every entry idle for at least `idle_timeout` and not in use; returns
    /// how many. Happens on its own when keys are inserted; call it to free memory
    /// sooner.
    pub fn evict_idle(&self) -> usize {
        let s = &*self.shared;
        s.sweep(s.nanos(Instant::now()))
    }

    /// Keys in the map (the overflow instance is not counted). Never more than
    /// [`max_keys`](Self::max_keys).
    pub fn len(&self) -> usize {
        self.shared.len.load(Ordering::Acquire)
    }

    /// True when no key is in the map.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured cap on keys.
    pub fn max_keys(&self) -> usize {
        self.shared.max_keys
    }

    /// The top N keys by call count, highest first, recomputed now (which also
    /// updates the labels).
    pub fn top_keys(&self) -> Vec<(K, u64)> {
        self.shared
            .refresh_labels()
            .into_iter()
            .filter_map(|(e, calls)| e.key.clone().map(|k| (k, calls)))
            .collect()
    }

    /// The shared [`OTHER`] label.
    pub(crate) fn other_label(&self) -> &Arc<str> {
        &self.shared.other
    }
}

impl<K, P> Keyed<K, P>
where
    K: Hash + Eq + Clone + Send + Sync + fmt::Display + 'static,
    P: Send + Sync + 'static,
{
    /// The bounded metrics label for `key`: its name if it is among the top N keys
    /// (as of the last refresh), else [`OTHER`]. Does not create an entry or count a
    /// call; allocates only the first time a top key's name is asked for.
    pub fn label(&self, key: &K) -> Arc<str> {
        match self.peek(key) {
            Some(e) => e.label_arc(&self.shared.other),
            None => self.shared.other.clone(),
        }
    }
}

impl<K, P> Shared<K, P>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    P: Send + Sync + 'static,
{
    #[inline]
    fn nanos(&self, now: Instant) -> u64 {
        nanos_since(self.base, now)
    }

    #[inline]
    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> &RwLock<Map<K, P>> {
        let h = self.hasher.hash_one(key);
        // SHARDS is a power of two; the top bits are the best mixed.
        &self.shards[(h >> 32) as usize & (SHARDS - 1)]
    }

    #[cold]
    fn insert(&self, key: &K, shard: &RwLock<Map<K, P>>, now: u64) -> Arc<Entry<K, P>> {
        if now >= self.next_sweep_ns.load(Ordering::Acquire) {
            self.sweep(now);
        }
        if self.len.load(Ordering::Acquire) >= self.max_keys {
            // Full and nothing evictable: no factory call, no write lock. Unless the
            // insert that filled the map was this very key's, racing this caller's first
            // look: a key in the map is served by its own instance, never also by the
            // overflow one (its rate limit would be split in two).
            if let Some(e) = read(shard).get(key) {
                return e.clone();
            }
            return self.overflow_entry(key, now);
        }
        // Build outside the lock: a panicking factory cannot poison the shard, and a
        // slow one does not block readers. A racing insert of the same key wins and
        // this instance is dropped.
        let policy = (self.factory)(key, false);
        let mut map = write(shard);
        if let Some(e) = map.get(key) {
            return e.clone();
        }
        let reserved = self
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_keys).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            drop(map);
            drop(policy);
            return self.overflow_entry(key, now);
        }
        let entry = Arc::new(Entry::new(Some(key.clone()), policy, self.base, now));
        map.insert(key.clone(), entry.clone());
        drop(map);
        // While fewer than `top_n` keys hold a label, a new key takes one at once: a fresh
        // map's keys (or any key joining a map with labels to spare) are named from their
        // first event, not `other` until the next refresh (which then ranks them by calls).
        if self.top_n > 0 {
            let mut top = self.top.lock().unwrap_or_else(PoisonError::into_inner);
            if top.len() >= self.top_n {
                // Labels of evicted keys are free again (only looked at when the list is full).
                top.retain(|w| w.strong_count() > 0);
            }
            // (A refresh between the insert and this lock may have labelled it already.)
            if top.len() < self.top_n && !entry.top.load(Ordering::Relaxed) {
                entry.top.store(true, Ordering::Relaxed);
                top.push(Arc::downgrade(&entry));
            }
        }
        entry
    }

    fn overflow_entry(&self, key: &K, now: u64) -> Arc<Entry<K, P>> {
        self.overflow
            .get_or_init(|| {
                // The overflow instance is built by the factory for the first key that
                // did not fit, marked as the overflow one.
                Arc::new(Entry::new(None, (self.factory)(key, true), self.base, now))
            })
            .clone()
    }

    /// Removes idle, unused entries; records when the next one may become idle.
    fn sweep(&self, now: u64) -> usize {
        let due = self.next_sweep_ns.load(Ordering::Acquire);
        // One sweeper at a time; the others carry on (a full map sends them to the
        // overflow instance meanwhile).
        if due == u64::MAX
            || self
                .next_sweep_ns
                .compare_exchange(due, u64::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return 0;
        }
        let idle = self.idle_ns;
        let mut next = now.saturating_add(idle);
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = write(shard);
            let before = map.len();
            map.retain(|_, e| {
                // Only the map holds it: nobody can take a new reference while we
                // hold the write lock, so the count cannot rise under us.
                let in_use = Arc::strong_count(e) > 1;
                let last = e.last_used_ns.load(Ordering::Relaxed);
                let idle_at = last.saturating_add(idle);
                if !in_use && idle_at <= now {
                    return false;
                }
                // In use now: idle at the earliest a full timeout after now.
                let candidate = if in_use {
                    now.saturating_add(idle)
                } else {
                    idle_at
                };
                next = next.min(candidate);
                true
            });
            removed += before - map.len();
        }
        if removed > 0 {
            self.len.fetch_sub(removed, Ordering::AcqRel);
        }
        // Not sooner than a sixteenth of the idle timeout (at least 10 ms) after this one: with
        // keys arriving all the time, the earliest expiry is always near, and a sweep at each
        // would scan the whole map for every new key (a flood of distinct keys would cost
        // `max_keys` steps per call). Entries may so outlive their timeout by up to 1/16 of it.
        let gap = (idle / 16).max(10_000_000);
        self.next_sweep_ns
            .store(next.max(now.saturating_add(gap)), Ordering::Release);
        removed
    }

    #[inline]
    fn maybe_refresh_labels(&self, now: u64) {
        let due = self.next_label_ns.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now.saturating_add(self.label_refresh_ns);
        if self
            .next_label_ns
            .compare_exchange(due, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.refresh_labels();
        }
    }

    /// Finds the top N entries by calls and moves the labels to them.
    fn refresh_labels(&self) -> Vec<(Arc<Entry<K, P>>, u64)> {
        let n = self.top_n;
        // Sized by the entries there are: `top_n` may be any number, `usize::MAX` included.
        let room = n.min(self.len.load(Ordering::Relaxed)).saturating_add(1);
        let mut best: Vec<(Arc<Entry<K, P>>, u64)> = Vec::with_capacity(room);
        if n > 0 {
            for shard in self.shards.iter() {
                for e in read(shard).values() {
                    let calls = e.calls.load(Ordering::Relaxed);
                    if best.len() == n && best.last().is_some_and(|(_, c)| *c >= calls) {
                        continue;
                    }
                    let at = best.partition_point(|(_, c)| *c >= calls);
                    best.insert(at, (e.clone(), calls));
                    best.truncate(n);
                }
            }
        }
        let mut top = self.top.lock().unwrap_or_else(PoisonError::into_inner);
        for old in top.drain(..) {
            if let Some(e) = old.upgrade() {
                e.top.store(false, Ordering::Relaxed);
            }
        }
        for (e, _) in &best {
            e.top.store(true, Ordering::Relaxed);
            top.push(Arc::downgrade(e));
        }
        best
    }
}

impl<K: fmt::Debug, P> fmt::Debug for Keyed<K, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.shared;
        f.debug_struct("Keyed")
            .field("len", &s.len.load(Ordering::Relaxed))
            .field("max_keys", &s.max_keys)
            .field("idle_timeout", &Duration::from_nanos(s.idle_ns))
            .field("top_n", &s.top_n)
            .finish_non_exhaustive()
    }
}

/// Settings for a [`Keyed`] map; [`build`](Self::build) takes the factory.
#[derive(Debug, Clone)]
pub struct KeyedBuilder {
    max_keys: usize,
    idle_timeout: Duration,
    top_n: usize,
    label_refresh: Duration,
}

impl Default for KeyedBuilder {
    fn default() -> Self {
        KeyedBuilder {
            max_keys: DEFAULT_MAX_KEYS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            top_n: DEFAULT_TOP_N,
            label_refresh: DEFAULT_LABEL_REFRESH,
        }
    }
}

impl KeyedBuilder {
    /// Cap on keys in the map, at least 1 (default [`DEFAULT_MAX_KEYS`]).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// Idle time after which an unused key may be evicted, more than zero (default
    /// [`DEFAULT_IDLE_TIMEOUT`]).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Number of keys that get their own label; 0 labels every key [`OTHER`]
    /// (default [`DEFAULT_TOP_N`]).
    pub fn top_n(mut self, n: usize) -> Self {
        self.top_n = n;
        self
    }

    /// Longest time between recomputations of the top-N labels, more than zero
    /// (default [`DEFAULT_LABEL_REFRESH`]).
    pub fn label_refresh(mut self, d: Duration) -> Self {
        self.label_refresh = d;
        self
    }

    /// Validates the settings and builds the map; `factory` makes the policy instance
    /// for a new key (and, once, the overflow instance: for the first key that did
    /// not fit).
    pub fn build<K, P, F>(self, factory: F) -> Result<Keyed<K, P>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        P: Send + Sync + 'static,
        F: Fn(&K) -> P + Send + Sync + 'static,
    {
        self.build_marked(move |k, _| factory(k))
    }

    /// As [`build`](Self::build), telling `factory` whether it makes the overflow instance
    /// (`true`), for a policy that names its own events (it must not name a key then).
    pub(crate) fn build_marked<K, P, F>(self, factory: F) -> Result<Keyed<K, P>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        P: Send + Sync + 'static,
        F: Fn(&K, bool) -> P + Send + Sync + 'static,
    {
        if self.max_keys == 0 {
            return Err(ConfigError::new("max_keys", "must be at least 1"));
        }
        if self.idle_timeout.is_zero() {
            return Err(ConfigError::new("idle_timeout", "must be more than zero"));
        }
        if self.label_refresh.is_zero() {
            return Err(ConfigError::new("label_refresh", "must be more than zero"));
        }
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2);
        let shards = (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect();
        Ok(Keyed {
            shared: Arc::new(Shared {
                shards,
                hasher: RandomState::new(),
                factory: Box::new(factory),
                max_keys: self.max_keys,
                idle_ns: ns(self.idle_timeout),
                top_n: self.top_n,
                label_refresh_ns: ns(self.label_refresh),
                base: Instant::now(),
                len: AtomicUsize::new(0),
                next_sweep_ns: AtomicU64::new(0),
                next_label_ns: AtomicU64::new(0),
                overflow: OnceLock::new(),
                top: Mutex::new(Vec::new()),
                other: Arc::from(OTHER),
            }),
        })
    }
}

/// The event name of a keyed policy's key: `policy/label` when the policy has a name
/// (so two keyed policies, or a keyed and a plain one, never share a metrics series),
/// the bare label otherwise.
pub(crate) fn qualified(policy: Option<&Arc<str>>, label: Arc<str>) -> Arc<str> {
    match policy {
        Some(p) => format!("{p}/{label}").into(),
        None => label,
    }
}

/// Generates builder setters that forward to the inner builder in field `$field`:
/// `fn max_keys(n: usize);` becomes `pub fn max_keys(mut self, n: usize) -> Self` that sets
/// `self.$field = self.$field.max_keys(n)`. The keyed builders hold their per-key policy's
/// builder and a [`KeyedBuilder`] and expose both sets of settings this way, each setter with
/// its own doc comment (written at the call site).
macro_rules! forward_setters {
    ($field:ident => $( $(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?); )*) => {
        $(
            $(#[$attr])*
            pub fn $name(mut self, $($arg: $ty),*) -> Self {
                self.$field = self.$field.$name($($arg),*);
                self
            }
        )*
    };
}
pub(crate) use forward_setters;

/// The setters every keyed builder shares: `name` (field `name: Option<Arc<str>>`) and the
/// key-map settings `max_keys`, `top_n` and `label_refresh` (forwarded to field
/// `keyed: KeyedBuilder`). `$policy` names the keyed policy in the docs ("breaker"), `$per_key`
/// what each key gets ("breaker", "state"). `idle_timeout` is left to each builder: its bounds
/// depend on the policy.
macro_rules! keyed_setters {
    ($policy:literal, $per_key:literal) => {
        #[doc = concat!(
            "Names the keyed ", $policy, ": events are then named `name/label` instead of the\n",
            "bare key label, so two keyed policies never share a metrics series."
        )]
        pub fn name(mut self, name: impl Into<std::sync::Arc<str>>) -> Self {
            self.name = Some(name.into());
            self
        }

        $crate::keyed::forward_setters! { keyed =>
            #[doc = concat!(
                "Cap on keys with their own ", $per_key, " (default\n",
                "[`DEFAULT_MAX_KEYS`](crate::keyed::DEFAULT_MAX_KEYS))."
            )]
            fn max_keys(n: usize);
            /// Keys that get their own label (default
            /// [`DEFAULT_TOP_N`](crate::keyed::DEFAULT_TOP_N)).
            fn top_n(n: usize);
            /// Longest time between label recomputations (default
            /// [`DEFAULT_LABEL_REFRESH`](crate::keyed::DEFAULT_LABEL_REFRESH)).
            fn label_refresh(d: std::time::Duration);
        }
    };
}
pub(crate) use keyed_setters;

/// Nanoseconds from `base` to `now` (0 before it), kept well clear of overflow when added to.
fn nanos_since(base: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_len<K, P>(k: &Keyed<K, P>) -> usize {
        k.shared.shards.iter().map(|s| read(s).len()).sum()
    }

    #[test]
    fn builder_validates() {
        let f = |_: &u32| ();
        assert_eq!(
            Keyed::builder().max_keys(0).build(f).unwrap_err().field(),
            "max_keys"
        );
        assert_eq!(
            Keyed::builder()
                .idle_timeout(Duration::ZERO)
                .build(f)
                .unwrap_err()
                .field(),
            "idle_timeout"
        );
    }

    /// A stream of new keys against a full map whose entries expire one after another sweeps
    /// at most every sixteenth of the idle timeout, not at every call (each sweep scans the
    /// whole map).
    #[tokio::test(start_paused = true)]
    async fn a_stream_of_new_keys_does_not_sweep_at_every_call() {
        let idle = Duration::from_secs(16);
        let k = Keyed::builder()
            .max_keys(100)
            .idle_timeout(idle)
            .build(|_: &u64| ())
            .unwrap();
        // A new key every 10 ms for 40 s: the map is full after 1 s, and from 16 s on its
        // entries expire one every 10 ms.
        let mut sweeps = 0;
        let mut due = k.shared.next_sweep_ns.load(Ordering::Relaxed);
        for i in 0..4000u64 {
            let _ = k.get(&i);
            let now = k.shared.next_sweep_ns.load(Ordering::Relaxed);
            if now != due {
                sweeps += 1;
                due = now;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // One sweep a second at most (16 s / 16): about 40.
        assert!(sweeps <= 45, "{sweeps} sweeps for 4,000 new keys");
        assert!(real_len(&k) <= 100);
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_never_holds_more_than_max_keys() {
        let k = Keyed::builder().max_keys(64).build(|_: &u64| ()).unwrap();
        for i in 0..10_000u64 {
            let _ = k.get(&i);
            assert!(real_len(&k) <= 64);
        }
        assert_eq!(real_len(&k), 64);
        assert_eq!(k.len(), 64);
    }

    #[test]
    fn types_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Keyed<String, AtomicU64>>();
        assert_send_sync::<KeyedEntry<String, AtomicU64>>();
    }
}
