//! Rate limiter: the generic cell rate algorithm (GCRA), lock-free.
//!
//! # Why
//!
//! A rate limit keeps a caller inside a quota: a provider's ("500 requests per
//! second"), or one you set to protect a service from a single noisy client. A limiter
//! must allow short bursts (traffic is never smooth) while holding the long-run rate,
//! and it must tell a rejected caller *when* to come back, so that it can send an
//! exact `Retry-After` instead of guessing and hammering.
//!
//! GCRA is the token bucket written as one number: the *theoretical arrival time*
//! (TAT), when the bucket would be full again if no more calls came. A call conforms
//! if taking its cells would not push the TAT more than the burst's worth of time
//! into the future. There is no refill task and no counter to reset; the state is a
//! single `u64`; and the earliest conforming time is exact arithmetic on it, so
//! [`Error::RateLimited`]'s `retry_after` is precise to the nanosecond.
//!
//! # How
//!
//! With `rate` cells per `period`, the emission interval is `T = period / rate`
//! (rounded *up* to whole nanoseconds, so the limiter never admits faster than
//! configured) and the tolerance is `tau = burst × T`. The TAT is an [`AtomicU64`]
//! of nanoseconds since the limiter's base [`tokio::time::Instant`]. A check of `n`
//! cells at `now` computes `new = max(TAT, now) + n × T`; if `new - now > tau` the call
//! is rejected with `retry_after = new - tau - now`, else a compare-and-swap installs
//! `new` (and retries on contention). No lock, no allocation.
//!
//! So a fresh limiter admits exactly `burst` calls at once, then one more every `T`:
//! one nanosecond before the boundary is rejected, the boundary itself is admitted.
//!
//! This is the algorithm the `governor` crate uses; it is written here rather than
//! depended on because `governor` reads its own clock, which
//! `tokio::time::pause()` does not drive, and every bulwark policy is tested on
//! exact paused tokio time. Time here comes only from [`tokio::time::Instant`]
//! (or from the caller, through [`RateLimiter::check_at`]).
//!
//! [`call`](RateLimiter::call) rejects without waiting; [`until_ready`](RateLimiter::until_ready)
//! waits until a cell conforms. For per-client or per-tenant limits with a bounded
//! number of keys, see [`KeyedRateLimiter`].
//!
//! ```
//! use bulwark::rate_limit::RateLimiter;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! tokio::time::pause();
//! let limiter = RateLimiter::builder()
//!     .per_second(10) // one cell every 100 ms
//!     .burst(2)
//!     .build()
//!     .expect("valid settings");
//!
//! assert!(limiter.check().is_ok());
//! assert!(limiter.check().is_ok());
//! let err = limiter.check().unwrap_err();
//! assert_eq!(err.retry_after(), Some(Duration::from_millis(100)));
//!
//! tokio::time::advance(Duration::from_millis(100)).await;
//! let ok = limiter.call(|| async { Ok::<_, std::io::Error>("sent") }).await;
//! assert_eq!(ok.unwrap(), "sent");
//! # }
//! ```

mod error;
mod future;
mod keyed;
mod layer;

pub use error::InsufficientCapacity;
pub use future::ResponseFuture;
pub use keyed::{KeyedRateLimiter, KeyedRateLimiterBuilder};
pub use layer::{RateLimitLayer, RateLimitService};

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::{ConfigError, Error, Event, Listener, Listeners};

/// Default name used in events and metrics.
pub const DEFAULT_NAME: &str = "rate_limit";

/// Largest tolerance (`burst × interval`) accepted: about 146 years, far beyond any
/// useful quota, and small enough that TAT arithmetic never overflows a `u64`.
const MAX_TOLERANCE_NS: u64 = u64::MAX / 4;

/// The GCRA parameters, shared by a limiter and by every key of a keyed limiter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    /// Emission interval `T`, nanoseconds, at least 1.
    interval_ns: u64,
    /// Tolerance `tau = burst × T`, nanoseconds.
    tau_ns: u64,
    burst: u32,
    /// Time zero for the TAT cells.
    base: Instant,
}

impl Gcra {
    /// Whether a take of `n` cells at once has anything to decide: `Err` when `n` exceeds the
    /// burst (it can never conform), `Ok(false)` for `n = 0` (always conforms), `Ok(true)`
    /// otherwise. Shared by the plain and keyed `check_n`.
    pub(crate) fn needs_take(&self, n: u32) -> Result<bool, InsufficientCapacity> {
        if n > self.burst {
            return Err(InsufficientCapacity {
                requested: n,
                burst: self.burst,
            });
        }
        Ok(n > 0)
    }

    /// Nanoseconds since `base` (0 before it, saturating far in the future).
    #[inline]
    pub(crate) fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX / 2)
    }

    /// Takes `n` (1 ≤ n ≤ burst) cells from `cell` at `now_ns`, or says how many
    /// nanoseconds until they would conform.
    #[inline]
    pub(crate) fn take(&self, cell: &AtomicU64, now_ns: u64, n: u32) -> Result<(), u64> {
        let inc = self.interval_ns * u64::from(n);
        // Relaxed is enough: the TAT is the only datum, and the compare-and-swap
        // orders every update to it.
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let new_tat = tat.max(now_ns) + inc;
            let ahead = new_tat - now_ns;
            if ahead > self.tau_ns {
                return Err(ahead - self.tau_ns);
            }
            match cell.compare_exchange_weak(tat, new_tat, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Cells that would conform right now.
    pub(crate) fn remaining(&self, cell: &AtomicU64, now_ns: u64) -> u32 {
        let tat = cell.load(Ordering::Relaxed).max(now_ns);
        let used = tat - now_ns;
        let free = self.tau_ns.saturating_sub(used) / self.interval_ns;
        u32::try_from(free).unwrap_or(self.burst).min(self.burst)
    }
}

/// A GCRA rate limiter. Cheap to clone (an `Arc` inside); clones share one state.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    gcra: Gcra,
    tat: AtomicU64,
    name: Arc<str>,
    listeners: Listeners,
}

impl RateLimiter {
    /// A builder; a rate ([`per_second`](RateLimiterBuilder::per_second) or
    /// [`rate`](RateLimiterBuilder::rate)) is required.
    pub fn builder() -> RateLimiterBuilder {
        RateLimiterBuilder::default()
    }

    /// Takes one cell now, or fails with [`Error::RateLimited`] carrying the exact
    /// time until one conforms (and emits [`Event::RateLimited`]).
    #[inline]
    pub fn check(&self) -> Result<(), Error<Infallible>> {
        self.check_at(Instant::now())
    }

    /// [`check`](Self::check) at a time the caller already read (saves a clock
    /// read when one timestamp serves several policies).
    #[inline]
    pub fn check_at(&self, now: Instant) -> Result<(), Error<Infallible>> {
        let g = &self.inner.gcra;
        match g.take(&self.inner.tat, g.nanos(now), 1) {
            Ok(()) => Ok(()),
            Err(wait) => Err(self.inner.reject(wait)),
        }
    }

    /// Takes `n` cells at once (all or none).
    ///
    /// The outer error says `n` exceeds the burst and can never conform; the inner
    /// result is [`check`](Self::check)'s. `n = 0` always conforms.
    pub fn check_n(&self, n: u32) -> Result<Result<(), Error<Infallible>>, InsufficientCapacity> {
        let g = &self.inner.gcra;
        if !g.needs_take(n)? {
            return Ok(Ok(()));
        }
        Ok(match g.take(&self.inner.tat, g.nanos(Instant::now()), n) {
            Ok(()) => Ok(()),
            Err(wait) => Err(self.inner.reject(wait)),
        })
    }

    /// Runs `f` if a cell conforms now; otherwise rejects at once (never waits) with
    /// [`Error::RateLimited`].
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.check().map_err(crate::bulkhead::never)?;
        f().await.map_err(Error::Inner)
    }

    /// Waits until one cell conforms, then takes it.
    ///
    /// Cancel-safe: nothing is reserved while waiting. Not fair: waiters race for
    /// each cell as it conforms. Sleeps through tokio's timer, whose resolution is a
    /// millisecond, so it may return up to a millisecond after the exact time.
    pub async fn until_ready(&self) {
        let g = &self.inner.gcra;
        loop {
            match g.take(&self.inner.tat, g.nanos(Instant::now()), 1) {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(Duration::from_nanos(wait)).await,
            }
        }
    }

    /// Cells that would conform right now (for `RateLimit-Remaining`-style headers).
    pub fn remaining(&self) -> u32 {
        let g = &self.inner.gcra;
        g.remaining(&self.inner.tat, g.nanos(Instant::now()))
    }

    /// The most cells admitted at once.
    pub fn burst(&self) -> u32 {
        self.inner.gcra.burst
    }

    /// The emission interval: one cell conforms every `interval` in the long run.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.inner.gcra.interval_ns)
    }

    /// The name used in events.
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name
    }
}

impl Inner {
    #[cold]
    fn reject(&self, wait_ns: u64) -> Error<Infallible> {
        self.listeners.emit(|| Event::RateLimited {
            name: self.name.clone(),
        });
        Error::RateLimited {
            retry_after: Duration::from_nanos(wait_ns),
        }
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("name", &self.inner.name)
            .field("interval", &self.interval())
            .field("burst", &self.burst())
            .finish()
    }
}

/// Builds a [`RateLimiter`] (and holds the settings a [`KeyedRateLimiter`] shares).
#[derive(Clone)]
pub struct RateLimiterBuilder {
    rate: Option<(u32, Duration)>,
    burst: Option<u32>,
    name: Arc<str>,
    listeners: Listeners,
}

impl Default for RateLimiterBuilder {
    fn default() -> Self {
        RateLimiterBuilder {
            rate: None,
            burst: None,
            name: Arc::from(DEFAULT_NAME),
            listeners: Listeners::new(),
        }
    }
}

impl fmt::Debug for RateLimiterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiterBuilder")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("name", &self.name)
            .field("listeners", &self.listeners)
            .finish()
    }
}

impl RateLimiterBuilder {
    /// `n` cells per `per` in the long run (required, unless set by
    /// [`per_second`](Self::per_second) or [`per_minute`](Self::per_minute)).
    pub fn rate(mut self, n: u32, per: Duration) -> Self {
        self.rate = Some((n, per));
        self
    }

    /// `n` cells per second.
    pub fn per_second(self, n: u32) -> Self {
        self.rate(n, Duration::from_secs(1))
    }

    /// `n` cells per minute.
    pub fn per_minute(self, n: u32) -> Self {
        self.rate(n, Duration::from_secs(60))
    }

    /// The most cells admitted at once, at least 1.
    ///
    /// Default: the rate's `n`, one period's worth (`per_second(100)` admits 100 at
    /// once), which is what "100 per second" usually means to the quota's owner and
    /// what `governor` does. Set 1 for perfectly even spacing.
    pub fn burst(mut self, b: u32) -> Self {
        self.burst = Some(b);
        self
    }

    /// The name used in events and metrics (default [`DEFAULT_NAME`]).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds a listener for [`Event::RateLimited`].
    pub fn listener(mut self, l: impl Listener) -> Self {
        self.listeners.push(Arc::new(l));
        self
    }

    /// Validates the rate and burst; the base instant is "now".
    pub(crate) fn gcra(&self) -> Result<Gcra, ConfigError> {
        let Some((n, per)) = self.rate else {
            return Err(ConfigError::new(
                "rate",
                "required: set rate(n, per), per_second(n) or per_minute(n)",
            ));
        };
        if n == 0 {
            return Err(ConfigError::new(
                "rate",
                "must admit at least 1 call per period",
            ));
        }
        if per.is_zero() {
            return Err(ConfigError::new(
                "rate",
                "the period must be more than zero",
            ));
        }
        let burst = self.burst.unwrap_or(n);
        if burst == 0 {
            return Err(ConfigError::new("burst", "must be at least 1"));
        }
        let interval_ns = per.as_nanos().div_ceil(u128::from(n));
        let tau_ns = interval_ns * u128::from(burst);
        let too_long = |tau: u128| tau > u128::from(MAX_TOLERANCE_NS);
        if too_long(tau_ns) {
            // Blamed on `rate` when the burst is its default (n) or the period alone is
            // too long: the user never set a burst, or no burst would help.
            return Err(if self.burst.is_none() || too_long(interval_ns) {
                ConfigError::new("rate", "period / rate is too long")
            } else {
                ConfigError::new("burst", "burst × period / rate is too long")
            });
        }
        let tau_ns = tau_ns as u64; // ≤ MAX_TOLERANCE_NS
        Ok(Gcra {
            // Fits: interval ≤ tau ≤ MAX_TOLERANCE_NS.
            interval_ns: interval_ns as u64,
            tau_ns,
            burst,
            base: Instant::now(),
        })
    }

    /// Validates the settings and builds the limiter, with a full burst available.
    pub fn build(self) -> Result<RateLimiter, ConfigError> {
        // An empty name is an empty label value in metrics, which Prometheus reads as no label.
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        let gcra = self.gcra()?;
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                gcra,
                tat: AtomicU64::new(0),
                name: self.name,
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
        let field = |b: RateLimiterBuilder| b.build().unwrap_err().field();
        assert_eq!(field(RateLimiter::builder()), "rate");
        assert_eq!(field(RateLimiter::builder().per_second(0)), "rate");
        assert_eq!(
            field(RateLimiter::builder().rate(1, Duration::ZERO)),
            "rate"
        );
        assert_eq!(
            field(RateLimiter::builder().per_second(1).burst(0)),
            "burst"
        );
        // A period too long whatever the burst is the rate's fault; a burst that makes the
        // tolerance too long, the burst's.
        assert_eq!(
            field(
                RateLimiter::builder()
                    .rate(1, Duration::from_secs(u64::MAX / 2))
                    .burst(u32::MAX)
            ),
            "rate"
        );
        assert_eq!(
            field(
                RateLimiter::builder()
                    .rate(1, Duration::from_secs(365 * 86_400))
                    .burst(u32::MAX)
            ),
            "burst"
        );
    }

    #[test]
    fn interval_rounds_up_and_burst_defaults_to_the_rate() {
        let l = RateLimiter::builder().per_second(3).build().unwrap();
        assert_eq!(l.interval(), Duration::from_nanos(333_333_334));
        assert_eq!(l.burst(), 3);
    }

    #[test]
    fn types_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimiter>();
    }
}
