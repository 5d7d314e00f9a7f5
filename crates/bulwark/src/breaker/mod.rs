//! Circuit breaker: stop calling a dependency that is failing or slow, and find
//! out cheaply when it has recovered.
//!
//! # Why
//!
//! When a dependency is down, every call to it costs the caller a connection, a
//! worker and a timeout, and adds load to a service that is trying to recover.
//! Retries make it worse. A breaker watches recent outcomes and, once enough of
//! them are bad, *fails fast* for a while ([`Error::CircuitOpen`], with a
//! `retry_after` the caller can hand on, e.g. as an HTTP `Retry-After`). It then
//! lets a few probe calls through to learn whether the dependency is back, instead
//! of releasing the whole queue of waiting traffic onto it at once.
//!
//! # How
//!
//! ```text
//!            failure or slow-call rate >= threshold (with >= minimum_calls in window)
//!   Closed ────────────────────────────────────────────────────────────────► Open
//!     ▲                                                                      │ open_duration
//!     │ all probes pass                                                       ▼ (lazily, next call)
//!     ├───────────────── HalfOpen: exactly `half_open_calls` probes ◄─────────┘
//!     │  (or Ramping:       │ probes fail ──────────────────────────────► Open (longer, with growth)
//!     │   a growing share   │
//!     └── of traffic) ◄─────┘ with `ramp_up`
//! ```
//!
//! * **Windows.** Outcomes of the closed state go to a sliding window: the last N
//!   calls ([`CircuitBreakerBuilder::count_window`], the default, 100 calls) or the calls of the
//!   last N seconds ([`CircuitBreakerBuilder::time_window`], one bucket per second). The rates
//!   are evaluated only once the window holds [`CircuitBreakerBuilder::minimum_calls`] calls (for
//!   a count window, at most its size), as in resilience4j; a rate *equal to* the
//!   threshold trips.
//! * **Slow calls.** With [`CircuitBreakerBuilder::slow_call_duration`] set, a call that takes
//!   longer than it counts as slow (whether it succeeded or failed), and the breaker
//!   also trips on the slow-call rate. It is **off by default** (resilience4j's
//!   default is 60 s): measuring a duration costs two clock reads per call, which
//!   would triple the cost of a closed call, and a 60 s threshold almost never
//!   fires before the caller's own timeout does. Set it when you want it.
//! * **Half-open.** After `open_duration`, the next call moves the breaker to
//!   half-open (exactly one caller does it, under the decision lock) and becomes a
//!   probe. Exactly `half_open_calls` probes are admitted; everyone else is
//!   rejected and told to come back in a second (or when the earliest probe lease
//!   ends, if sooner): probes normally report within one request's time. When every
//!   probe has reported, the breaker closes if their failure and slow rates are
//!   below the thresholds, and re-opens otherwise.
//! * **Leases.** A probe that never reports (its permit leaked, its task hung)
//!   would hold its slot forever and wedge the breaker in half-open, a failure
//!   mode resilience4j users have hit. Every probe slot is leased for
//!   [`CircuitBreakerBuilder::probe_lease`]; after that, the next caller takes it over. A probe
//!   whose future is dropped (cancelled) frees its slot at once, and counts as
//!   nothing. A probe that fails after its lease ran out, while the breaker is still in the
//!   same half-open period, opens it again.
//! * **Growth.** With [`CircuitBreakerBuilder::open_duration_growth`], each consecutive trip
//!   (half-open -> open) multiplies the open duration, up to a cap; closing resets
//!   it.
//! * **Ramp.** With [`CircuitBreakerBuilder::ramp_up`], passing probes do not close the breaker
//!   at once: it moves to [`BreakerState::Ramping`] and admits a share of calls
//!   that grows linearly from [`CircuitBreakerBuilder::ramp_start_percent`] to 100 % over the
//!   ramp, re-opening if the calls of the ramp cross a threshold (after
//!   `minimum_calls` of them), and closing when the ramp ends. Callers the ramp
//!   turns away are told to retry in a second (or when the ramp ends, if sooner). Admission is a
//!   counter, not a random draw: exactly that share of any run of calls passes.
//! * **Manual states.** [`CircuitBreaker::force_open`] rejects everything until
//!   another manual transition; [`CircuitBreaker::disable`] admits everything and
//!   records nothing; [`CircuitBreaker::metrics_only`] admits everything and
//!   records outcomes into the window, so [`CircuitBreaker::snapshot`] shows the
//!   rates and whether the breaker *would* open, but never acts on them (no shadow
//!   transitions or events: a breaker in that mode is being observed, not
//!   operated). [`CircuitBreaker::close`] and [`CircuitBreaker::reset`] return to
//!   a closed breaker with an empty window.
//!
//! Time-driven moves (open -> half-open, end of ramp) happen on the next call, so
//! there is no background task, and [`CircuitBreaker::state`] keeps reporting
//! `Open` (or `Ramping`) until a call arrives after the deadline.
//!
//! # Cost
//!
//! The closed state's data path is lock-free and allocation-free: admission is one
//! atomic load of the state word; recording into the count window is one
//! `fetch_add`, one `swap`, and, only when the outcome differs from the one it
//! replaces, one `fetch_add` on a packed aggregate. A time window adds a clock
//! read and a compare-and-swap on the current bucket. The decision logic (a
//! `std::sync::Mutex`) is only taken when a threshold check says "maybe trip", on
//! transitions, and in half-open.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bulwark::breaker::CircuitBreaker;
//! use bulwark::events::BreakerState;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let breaker = CircuitBreaker::builder()
//!     .name("payments")
//!     .count_window(10)
//!     .minimum_calls(4)
//!     .failure_rate_threshold(50.0)
//!     .open_duration(Duration::from_secs(5))
//!     .build()
//!     .expect("valid settings");
//!
//! for _ in 0..4 {
//!     let r: Result<(), bulwark::Error<&str>> =
//!         breaker.call(|| async { Err("connection refused") }).await;
//!     assert_eq!(r, Err(bulwark::Error::Inner("connection refused")));
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//!
//! // Open: fails fast without running the operation.
//! let r = breaker.call(|| async { Ok::<_, &str>("never runs") }).await;
//! match r {
//!     Err(bulwark::Error::CircuitOpen { name, retry_after }) => {
//!         assert_eq!(&*name, "payments");
//!         assert!(retry_after <= Duration::from_secs(5));
//!     }
//!     other => panic!("expected CircuitOpen, got {other:?}"),
//! }
//! # }
//! ```
//!
//! For callers that cannot wrap a closure, [`CircuitBreaker::try_acquire`] returns
//! a [`Permit`] to report on; as a `tower` middleware, see [`CircuitBreakerLayer`].

mod core;
mod future;
mod keyed;
mod layer;
mod permit;
mod window;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use self::core::{nanos, Config, Inner, Window, CLOSED, DISABLED, FORCED_OPEN, METRICS_ONLY};
use self::permit::Guard;
use self::window::{CountWindow, TimeWindow, MAX_COUNT_WINDOW};
use crate::classify::AnyError;
use crate::events::{BreakerState, Listener, Listeners};
use crate::{Classify, ConfigError, Error};

pub use self::future::ResponseFuture;
pub use self::keyed::{KeyedCircuitBreaker, KeyedCircuitBreakerBuilder, KeyedPermit};
pub use self::layer::{CircuitBreakerLayer, CircuitBreakerService};
pub use self::permit::Permit;

/// Default name, used in events and errors.
pub const DEFAULT_NAME: &str = "default";

/// Default count window: the last 100 calls, as resilience4j. Large enough that
/// one unlucky burst is a small share, small enough to react within seconds at
/// moderate traffic.
pub const DEFAULT_WINDOW_SIZE: usize = 100;

/// Default minimum number of calls in the window before a rate is evaluated.
/// resilience4j uses 100 (its whole window), which means a low-traffic dependency
/// must fail 50 times before the breaker reacts. 20 calls make a 50 % failure rate
/// meaningful (10 failures, not 1 of 2) while reacting 5x sooner.
pub const DEFAULT_MINIMUM_CALLS: u32 = 20;

/// Default failure-rate threshold, in percent (resilience4j's default).
pub const DEFAULT_FAILURE_RATE_THRESHOLD: f64 = 50.0;

/// Default slow-call-rate threshold, in percent (resilience4j's default): trip only
/// when every call in the window is slow.
pub const DEFAULT_SLOW_CALL_RATE_THRESHOLD: f64 = 100.0;

/// Default slow-call duration: none, slow-call detection is off. resilience4j's
/// default is 60 s; measuring durations costs two clock reads per closed call,
/// and a 60 s threshold rarely fires before the caller's own timeout. Set
/// [`CircuitBreakerBuilder::slow_call_duration`] to turn it on.
pub const DEFAULT_SLOW_CALL_DURATION: Option<Duration> = None;

/// Default time the breaker stays open before probing. resilience4j waits 60 s,
/// Hystrix 5 s; 30 s covers a process restart or a failover, without leaving a
/// recovered dependency unused for a minute.
pub const DEFAULT_OPEN_DURATION: Duration = Duration::from_secs(30);

/// Default number of half-open probe calls. resilience4j permits 10; three calls
/// are enough to tell "still down" from "back" and put far less load on a
/// dependency that may just have restarted.
pub const DEFAULT_HALF_OPEN_CALLS: u32 = 3;

/// Default lease of a half-open probe permit: a probe that has not reported after
/// 30 s is presumed lost, and its slot goes to the next caller. Longer than any
/// sensible request timeout, short enough that a leaked permit cannot stall
/// recovery for long.
pub const DEFAULT_PROBE_LEASE: Duration = Duration::from_secs(30);

/// Default share of traffic admitted when a ramp starts, in percent.
pub const DEFAULT_RAMP_START_PERCENT: f64 = 10.0;

/// Most half-open probe calls a breaker accepts.
pub const MAX_HALF_OPEN_CALLS: u32 = 10_000;

/// Shortest time window (its buckets must stay at least 100 µs wide).
pub const MIN_TIME_WINDOW: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy)]
enum WindowKind {
    Count(usize),
    Time(Duration),
}

/// A circuit breaker. Cheap to clone: clones share state.
///
/// Built with [`CircuitBreaker::builder`]; see the [module docs](self) for the
/// behaviour.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

/// What a breaker's window holds right now, from [`CircuitBreaker::snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The current state.
    pub state: BreakerState,
    /// Calls in the window (closed and metrics-only states record into it).
    pub calls: u64,
    /// Failed calls in the window.
    pub failures: u64,
    /// Slow calls in the window (failed or not).
    pub slow_calls: u64,
    /// True when the window's rates cross a threshold with enough calls, i.e. a
    /// closed breaker would open. Useful in metrics-only mode.
    pub would_open: bool,
    /// Consecutive trips since the breaker last closed (what open-duration growth
    /// is computed from).
    pub consecutive_trips: u32,
    /// Time left in the open state, when open.
    pub open_remaining: Option<Duration>,
}

impl Snapshot {
    /// Failure rate in percent, `None` with no calls in the window.
    pub fn failure_rate(&self) -> Option<f64> {
        (self.calls > 0).then(|| self.failures as f64 * 100.0 / self.calls as f64)
    }

    /// Slow-call rate in percent, `None` with no calls in the window.
    pub fn slow_call_rate(&self) -> Option<f64> {
        (self.calls > 0).then(|| self.slow_calls as f64 * 100.0 / self.calls as f64)
    }
}

impl CircuitBreaker {
    /// A builder with the documented defaults.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::default()
    }

    /// The breaker's name (from [`CircuitBreakerBuilder::name`]).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn inner_name(&self) -> Arc<str> {
        self.inner.name.clone()
    }

    /// The current state. Time-driven moves happen on the next call, so an open
    /// breaker whose open duration has passed still reports `Open` until then.
    pub fn state(&self) -> BreakerState {
        self.inner.state()
    }

    /// The window's counts and the state, for metrics and dashboards.
    pub fn snapshot(&self) -> Snapshot {
        let c = self.inner.window_counts();
        Snapshot {
            state: self.state(),
            calls: c.calls,
            failures: c.failures,
            slow_calls: c.slow,
            would_open: self.inner.would_trip(c),
            consecutive_trips: self.inner.trips(),
            open_remaining: self.inner.open_remaining(),
        }
    }

    /// Asks to make one call. On success, report the outcome on the [`Permit`];
    /// dropping it unreported counts as [`Outcome::Ignore`](crate::Outcome::Ignore).
    ///
    /// # Errors
    ///
    /// [`Error::CircuitOpen`] when the breaker is open or forced open, when no
    /// half-open probe slot is free, or when the ramp does not admit this call;
    /// `retry_after` says when to try again.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit, Error<Infallible>> {
        let core = self.inner.acquire()?;
        Ok(Permit::new(self.inner.clone(), core))
    }

    /// Runs `f` through the breaker, counting every `Err` as a failure.
    ///
    /// # Errors
    ///
    /// [`Error::CircuitOpen`] without running `f` when the breaker rejects the
    /// call; [`Error::Inner`] with `f`'s own error otherwise.
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(&AnyError, f).await
    }

    /// Runs `f` through the breaker, with `classify` deciding what its result
    /// counts as (an `Ok` may be a failure; an error may be ignored).
    ///
    /// If the returned future is dropped before `f` finishes, nothing is recorded
    /// and a half-open probe slot is freed at once.
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call).
    pub async fn call_with<T, E, C, F, Fut>(&self, classify: &C, f: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let core = self
            .inner
            .acquire()
            .map_err(|e| e.map_inner(|never| match never {}))?;
        let guard = Guard {
            inner: &self.inner,
            core,
        };
        let result = f().await;
        guard.record(classify.classify(&result));
        result.map_err(Error::Inner)
    }

    /// Forces the breaker open: every call is rejected (with the base open duration
    /// as `retry_after`) until another manual transition.
    pub fn force_open(&self) {
        self.inner.manual(FORCED_OPEN);
    }

    /// Disables the breaker: every call is admitted and nothing is recorded.
    pub fn disable(&self) {
        self.inner.manual(DISABLED);
    }

    /// Metrics-only mode: every call is admitted and outcomes are recorded into an
    /// emptied window (see [`snapshot`](Self::snapshot)), but never acted on.
    pub fn metrics_only(&self) {
        self.inner.manual(METRICS_ONLY);
    }

    /// Closes the breaker with an empty window and no trip history. No-op when it
    /// is already closed.
    pub fn close(&self) {
        self.inner.manual(CLOSED);
    }

    /// Returns to a fresh breaker: closed, empty window, no trip history, whatever
    /// the state (emits a transition only if the state changes).
    pub fn reset(&self) {
        self.inner.reset();
    }

    /// Puts the breaker into `state` without emitting a transition event, as if it had been
    /// built in that state: for a breaker that stands in for one already in it (the gateway
    /// re-applies an operator's override to a breaker that a config reload rebuilt), so
    /// listeners count no change that did not happen. Only the states a caller can set by hand
    /// are taken: `ForcedOpen`, `Disabled`, `MetricsOnly` and `Closed` (closed as
    /// [`close`](Self::close) does); for any other the breaker is left as it is and `false` is
    /// returned.
    pub fn restore(&self, state: BreakerState) -> bool {
        let to = match state {
            BreakerState::ForcedOpen => FORCED_OPEN,
            BreakerState::Disabled => DISABLED,
            BreakerState::MetricsOnly => METRICS_ONLY,
            BreakerState::Closed => CLOSED,
            _ => return false,
        };
        self.inner.manual_quiet(to);
        true
    }
}

/// Builds a [`CircuitBreaker`]; every setting is checked by [`build`](CircuitBreakerBuilder::build).
#[derive(Debug, Clone)]
pub struct CircuitBreakerBuilder {
    name: Arc<str>,
    window: WindowKind,
    minimum_calls: u32,
    failure_rate_threshold: f64,
    slow_call_duration: Option<Duration>,
    slow_call_rate_threshold: f64,
    open_duration: Duration,
    growth: Option<(f64, Duration)>,
    half_open_calls: u32,
    probe_lease: Duration,
    ramp_up: Option<Duration>,
    ramp_start_percent: f64,
    listeners: Listeners,
}

impl Default for CircuitBreakerBuilder {
    fn default() -> Self {
        CircuitBreakerBuilder {
            name: DEFAULT_NAME.into(),
            window: WindowKind::Count(DEFAULT_WINDOW_SIZE),
            minimum_calls: DEFAULT_MINIMUM_CALLS,
            failure_rate_threshold: DEFAULT_FAILURE_RATE_THRESHOLD,
            slow_call_duration: DEFAULT_SLOW_CALL_DURATION,
            slow_call_rate_threshold: DEFAULT_SLOW_CALL_RATE_THRESHOLD,
            open_duration: DEFAULT_OPEN_DURATION,
            growth: None,
            half_open_calls: DEFAULT_HALF_OPEN_CALLS,
            probe_lease: DEFAULT_PROBE_LEASE,
            ramp_up: None,
            ramp_start_percent: DEFAULT_RAMP_START_PERCENT,
            listeners: Listeners::new(),
        }
    }
}

/// A percentage as parts per billion of calls (1e-7 %: finer than any threshold is written, so
/// "at or above 33.334 %" is exact); at least 1, so a tiny positive threshold stays positive.
fn check_percent(field: &'static str, p: f64) -> Result<u64, ConfigError> {
    if p.is_finite() && p > 0.0 && p <= 100.0 {
        Ok(((p * 1e7).round() as u64).max(1))
    } else {
        Err(ConfigError::new(
            field,
            format!("must be a percentage in (0, 100], got {p}"),
        ))
    }
}

fn check_positive(field: &'static str, d: Duration) -> Result<u64, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::new(field, "must be greater than zero"))
    } else {
        Ok(nanos(d))
    }
}

impl CircuitBreakerBuilder {
    /// The name reported in events and [`Error::CircuitOpen`] (default `"default"`).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Count-based window: the outcomes of the last `calls` calls (1 to 1 000 000;
    /// default [`DEFAULT_WINDOW_SIZE`]).
    pub fn count_window(mut self, calls: usize) -> Self {
        self.window = WindowKind::Count(calls);
        self
    }

    /// Time-based window: the outcomes of the calls of the last `window` (at least
    /// [`MIN_TIME_WINDOW`]). Kept in one-second buckets for windows from 10 s to an
    /// hour, ten buckets for shorter windows, 3600 for longer; a call leaves the
    /// window when its whole bucket does.
    pub fn time_window(mut self, window: Duration) -> Self {
        self.window = WindowKind::Time(window);
        self
    }

    /// Calls the window must hold before a rate is evaluated (at least 1; default
    /// [`DEFAULT_MINIMUM_CALLS`]). With a count window, at most the window size
    /// is used.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.minimum_calls = calls;
        self
    }

    /// The breaker opens when the failure rate is at least this percentage
    /// (0 < p <= 100; default [`DEFAULT_FAILURE_RATE_THRESHOLD`]).
    pub fn failure_rate_threshold(mut self, percent: f64) -> Self {
        self.failure_rate_threshold = percent;
        self
    }

    /// Turns on slow-call detection: a call taking longer than `duration` is slow
    /// (default: off, see [`DEFAULT_SLOW_CALL_DURATION`]).
    pub fn slow_call_duration(mut self, duration: Duration) -> Self {
        self.slow_call_duration = Some(duration);
        self
    }

    /// The breaker opens when the slow-call rate is at least this percentage
    /// (0 < p <= 100; default [`DEFAULT_SLOW_CALL_RATE_THRESHOLD`]). Only used with
    /// [`slow_call_duration`](Self::slow_call_duration).
    pub fn slow_call_rate_threshold(mut self, percent: f64) -> Self {
        self.slow_call_rate_threshold = percent;
        self
    }

    /// How long the breaker stays open before probing (default
    /// [`DEFAULT_OPEN_DURATION`]).
    pub fn open_duration(mut self, duration: Duration) -> Self {
        self.open_duration = duration;
        self
    }

    /// Grows the open duration on consecutive trips: the n-th trip since the
    /// breaker last closed stays open `open_duration * multiplier^(n-1)`, at most
    /// `max`. `multiplier` must be at least 1 and `max` at least `open_duration`.
    pub fn open_duration_growth(mut self, multiplier: f64, max: Duration) -> Self {
        self.growth = Some((multiplier, max));
        self
    }

    /// Number of probe calls admitted in half-open (1 to [`MAX_HALF_OPEN_CALLS`];
    /// default [`DEFAULT_HALF_OPEN_CALLS`]).
    pub fn half_open_calls(mut self, calls: u32) -> Self {
        self.half_open_calls = calls;
        self
    }

    /// How long a half-open probe may hold its slot without reporting before the
    /// slot goes to another caller (default [`DEFAULT_PROBE_LEASE`]).
    pub fn probe_lease(mut self, lease: Duration) -> Self {
        self.probe_lease = lease;
        self
    }

    /// After the probes pass, ramp traffic up over `duration` instead of closing at
    /// once (default: no ramp).
    pub fn ramp_up(mut self, duration: Duration) -> Self {
        self.ramp_up = Some(duration);
        self
    }

    /// Share of calls admitted when a ramp starts, in percent (0 < p <= 100;
    /// default [`DEFAULT_RAMP_START_PERCENT`]).
    pub fn ramp_start_percent(mut self, percent: f64) -> Self {
        self.ramp_start_percent = percent;
        self
    }

    /// Adds a listener for [`Event::BreakerTransition`](crate::Event::BreakerTransition)
    /// and [`Event::BreakerRejected`](crate::Event::BreakerRejected).
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Checks every setting and builds the breaker.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first setting out of range.
    pub fn build(self) -> Result<CircuitBreaker, ConfigError> {
        // An empty name is an empty label value in metrics, which Prometheus reads as no label.
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        let window = match self.window {
            WindowKind::Count(n) if (1..=MAX_COUNT_WINDOW).contains(&n) => {
                Window::Count(CountWindow::new(n))
            }
            WindowKind::Count(n) => {
                return Err(ConfigError::new(
                    "count_window",
                    format!("must be between 1 and {MAX_COUNT_WINDOW} calls, got {n}"),
                ))
            }
            WindowKind::Time(d) if d >= MIN_TIME_WINDOW => Window::Time(TimeWindow::new(nanos(d))),
            WindowKind::Time(d) => {
                return Err(ConfigError::new(
                    "time_window",
                    format!("must be at least {MIN_TIME_WINDOW:?}, got {d:?}"),
                ))
            }
        };
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        let minimum_calls = match &window {
            Window::Count(w) => u64::from(self.minimum_calls).min(w.size() as u64),
            Window::Time(_) => u64::from(self.minimum_calls),
        };
        let failure_ppb = check_percent("failure_rate_threshold", self.failure_rate_threshold)?;
        let slow_ppb = check_percent("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        let slow_nanos = match self.slow_call_duration {
            Some(d) => Some(check_positive("slow_call_duration", d)?),
            None => None,
        };
        let open_nanos = check_positive("open_duration", self.open_duration)?;
        let growth = match self.growth {
            None => None,
            Some((m, _)) if !(m.is_finite() && m >= 1.0) => {
                return Err(ConfigError::new(
                    "open_duration_growth",
                    format!("multiplier must be a finite number >= 1, got {m}"),
                ))
            }
            Some((_, max)) if max < self.open_duration => {
                return Err(ConfigError::new(
                    "open_duration_growth",
                    format!(
                        "max ({max:?}) must be at least open_duration ({:?})",
                        self.open_duration
                    ),
                ))
            }
            Some((m, max)) => Some((m, nanos(max))),
        };
        if !(1..=MAX_HALF_OPEN_CALLS).contains(&self.half_open_calls) {
            return Err(ConfigError::new(
                "half_open_calls",
                format!(
                    "must be between 1 and {MAX_HALF_OPEN_CALLS}, got {}",
                    self.half_open_calls
                ),
            ));
        }
        let lease_nanos = check_positive("probe_lease", self.probe_lease)?;
        let ramp = match self.ramp_up {
            None => None,
            Some(d) => {
                let len = check_positive("ramp_up", d)?;
                let start_ppb = check_percent("ramp_start_percent", self.ramp_start_percent)?;
                Some((len, (start_ppb / 1000).max(1)))
            }
        };
        let cfg = Config {
            minimum_calls,
            failure_ppb,
            slow_ppb,
            slow_nanos,
            open_nanos,
            growth,
            half_open_calls: self.half_open_calls as usize,
            lease_nanos,
            ramp,
        };
        Ok(CircuitBreaker {
            inner: Arc::new(Inner::new(self.name, cfg, window, self.listeners)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_rejects_out_of_range_settings() {
        let field = |b: CircuitBreakerBuilder| b.build().unwrap_err().field();
        let b = CircuitBreaker::builder;
        assert_eq!(field(b().count_window(0)), "count_window");
        assert_eq!(field(b().count_window(1_000_001)), "count_window");
        assert_eq!(
            field(b().time_window(Duration::from_micros(999))),
            "time_window"
        );
        assert_eq!(field(b().minimum_calls(0)), "minimum_calls");
        assert_eq!(
            field(b().failure_rate_threshold(0.0)),
            "failure_rate_threshold"
        );
        assert_eq!(
            field(b().failure_rate_threshold(100.1)),
            "failure_rate_threshold"
        );
        assert_eq!(
            field(b().failure_rate_threshold(f64::NAN)),
            "failure_rate_threshold"
        );
        assert_eq!(
            field(b().slow_call_rate_threshold(-1.0)),
            "slow_call_rate_threshold"
        );
        assert_eq!(
            field(b().slow_call_duration(Duration::ZERO)),
            "slow_call_duration"
        );
        assert_eq!(field(b().open_duration(Duration::ZERO)), "open_duration");
        assert_eq!(
            field(b().open_duration_growth(0.5, Duration::from_secs(60))),
            "open_duration_growth"
        );
        assert_eq!(
            field(b().open_duration_growth(2.0, Duration::from_secs(1))),
            "open_duration_growth"
        );
        assert_eq!(field(b().half_open_calls(0)), "half_open_calls");
        assert_eq!(field(b().probe_lease(Duration::ZERO)), "probe_lease");
        assert_eq!(field(b().ramp_up(Duration::ZERO)), "ramp_up");
        assert_eq!(
            field(b().ramp_up(Duration::from_secs(1)).ramp_start_percent(0.0)),
            "ramp_start_percent"
        );
        assert!(b().build().is_ok());
    }

    #[test]
    fn breaker_is_send_sync_and_cheap_to_clone() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<CircuitBreaker>();
        fn assert_send<T: Send>() {}
        assert_send::<Permit>();
    }
}
