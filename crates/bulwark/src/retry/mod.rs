//! Retries, with backoff, a retry budget and deadline awareness.
//!
//! # Why
//!
//! Many failures are transient (a reset connection, a replica restarting, a 503 under
//! a brief spike) and the cheapest fix is to try again. Retrying naively turns every
//! outage into a multiplied outage, though: with three attempts per call, a failing
//! dependency receives three times its usual load at the moment it can least take
//! it, and each layer of a call graph that retries multiplies it again. So this
//! module bounds retries four ways:
//!
//! * **attempts and elapsed time** ([`RetryBuilder::max_attempts`],
//!   [`RetryBuilder::max_elapsed`]): the per-call bound everyone expects;
//! * **backoff** ([`Backoff`]): spreads retries out in time, with jitter so that
//!   callers that failed together do not retry together;
//! * **a retry budget** ([`RetryBudget`]): *why budgets and not only max attempts?*
//!   Max attempts bound one call; a budget bounds the whole client: retries may be
//!   at most a share of recent calls (20 % by default) plus a small floor. When a
//!   dependency is healthy nobody notices the budget; when it is down, retries stop
//!   adding load after the budget is spent;
//! * **deadlines** ([`Deadline`]): a retry that cannot finish before the caller's
//!   deadline (or this policy's own `max_elapsed`) is not started, because its answer
//!   would arrive after nobody waits for it. "Cannot finish" is judged from the
//!   latency of recent successful attempts, at a percentile
//!   ([`RetryBuilder::deadline_percentile`], p90 by default).
//!
//! # How
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use bulwark::retry::{Backoff, Jitter, Retry};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # tokio::time::pause();
//! let retry = Retry::builder()
//!     .name("inventory")
//!     .max_attempts(4)
//!     .backoff(Backoff::exponential(Duration::from_millis(50)).jitter(Jitter::Full))
//!     .build()
//!     .unwrap();
//!
//! let calls = AtomicU32::new(0);
//! let r = retry
//!     .call(|| async {
//!         // Fails twice, then succeeds.
//!         if calls.fetch_add(1, Ordering::SeqCst) < 2 {
//!             Err("flaky")
//!         } else {
//!             Ok("stock: 7")
//!         }
//!     })
//!     .await;
//! assert_eq!(r, Ok("stock: 7"));
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```
//!
//! [`Retry::call`] retries every `Err`. [`Retry::call_with`] takes a
//! [`Classify`], which sees `Ok` values too (an HTTP 503 that arrived
//! as `Ok` can be retried) and decides per result:
//!
//! | outcome | what the retry does |
//! |---|---|
//! | `Success` | returns it (and records its latency for deadline checks) |
//! | `Ignore` | returns it, no retry |
//! | `Failure` | retries after the next backoff delay |
//! | `FailureRetryAfter(d)` | retries after `max(d, backoff delay)` |
//!
//! When no further attempt is allowed the **last result is returned as it is**: an
//! `Ok` value classified as a failure comes back as `Ok`, an error as
//! [`Error::Inner`]. [`Retry::call_with_report`] additionally says
//! how many attempts were made and *why* retrying stopped ([`Stop`]).
//!
//! # Decisions, and why
//!
//! * **Retry-After.** A server's hint (`FailureRetryAfter(d)`) is a lower bound: the
//!   retry waits `max(d, backoff delay)`. Waiting less would ignore what the server
//!   asked; waiting exactly `d` when the backoff is longer would drop the spreading
//!   the backoff provides. This follows Envoy's rate-limited retry back-off, which
//!   treats the header value as the lower bound of its jittered interval. A hint
//!   longer than [`RetryBuilder::max_retry_after`] (default
//!   [`DEFAULT_MAX_RETRY_AFTER`]) ends the retries with [`Stop::RetryAfterTooLong`]:
//!   the caller is better served by the answer now, and can pass the hint on.
//! * **Budget exhausted.** The caller gets the last result (the dependency's own
//!   error), not [`Error::RetryBudgetExhausted`]:
//!   that error is what a client can act on (a 503 with its headers, say), and the
//!   budget is a local reason not to try again, not a new failure. The reason is
//!   reported through [`Event::RetryBudgetExhausted`](crate::Event) and
//!   [`Stop::BudgetExhausted`] from [`Retry::call_with_report`].
//! * **Token before sleep.** A retry takes its budget token *before* it sleeps its
//!   backoff. Taking it after the sleep would let a burst of failures all enter
//!   backoff on the same balance and then overshoot the budget together (the
//!   problem described in Envoy issue #30205). A caller that drops the call while it
//!   sleeps gets the token back: no retry was sent.
//! * **Deadline.** Before each *retry*, and before sleeping its backoff: if
//!   `now + delay` is at or past the limit (the earlier of the [`Deadline`] in scope
//!   and `start + max_elapsed`), or leaves less than the recent p90 latency of
//!   successful attempts, the retry is not made and the last result is returned
//!   ([`Stop::Deadline`] or [`Stop::MaxElapsed`]). The first attempt is always made,
//!   except when the deadline in scope has already passed when the call starts: then
//!   nothing can be returned but [`Error::Timeout`]. Until
//!   [`RetryBuilder::deadline_min_samples`] successes are recorded the prediction is
//!   zero, i.e. only the deadline itself counts.
//!
//! As a `tower` layer: [`RetryLayer`].

mod backoff;
mod budget;
mod future;
mod layer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use backoff::{Backoff, BackoffIter, Jitter, DEFAULT_FACTOR, DEFAULT_MAX_DELAY};
pub use budget::{
    RetryBudget, RetryBudgetBuilder, Withdrawal, DEFAULT_MIN_RETRIES_PER_SEC,
    DEFAULT_PERCENT_CAN_RETRY, DEFAULT_TTL,
};
pub use future::ResponseFuture;
pub use layer::{RetryLayer, RetryService};

use crate::classify::AnyError;
use crate::latency::LatencyWindow;
use crate::timeout::Deadline;
use crate::{Classify, ConfigError, Error, Event, Listener, Listeners, Outcome};

/// Default total attempts, the first included: one try and two retries, enough to
/// ride out a blip without tripling the load for long.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Default backoff base: the default backoff is exponential from 100 ms, capped at
/// [`DEFAULT_MAX_DELAY`], with full jitter, so the two default retries wait at most
/// 100 ms and 200 ms.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(100);

/// Default latency percentile for the deadline check: p90, so a retry is skipped
/// only when nine in ten recent successes would not have fit.
pub const DEFAULT_DEADLINE_PERCENTILE: f64 = 90.0;

/// Default number of recorded successes before the latency prediction is used; below
/// it a percentile is noise.
pub const DEFAULT_DEADLINE_MIN_SAMPLES: u64 = 10;

/// Default longest Retry-After hint that is waited out (see the module docs).
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Default policy name, used in events when none is given.
pub const DEFAULT_NAME: &str = "retry";

/// Why a [`Retry`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stop {
    /// The last attempt was classified `Success`.
    Success,
    /// The last attempt was classified `Ignore`.
    NotRetryable,
    /// `max_attempts` attempts were made.
    AttemptsExhausted,
    /// Another attempt would start at or after `start + max_elapsed` (or finish after
    /// it, by the latency prediction).
    MaxElapsed,
    /// Another attempt could not finish before the [`Deadline`] in scope; or the
    /// deadline had passed before the first attempt (the result is then
    /// [`Error::Timeout`]).
    Deadline,
    /// The [`RetryBudget`] had no token.
    BudgetExhausted,
    /// The server's Retry-After hint exceeded [`RetryBuilder::max_retry_after`].
    RetryAfterTooLong,
}

/// What [`Retry::call_with_report`] reports besides the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryReport {
    /// Attempts made, the first included (0 only when the deadline had passed).
    pub attempts: u32,
    /// Why the retry returned.
    pub stop: Stop,
}

/// A retry policy. See the [module docs](self).
///
/// Cheap to clone (an `Arc` inside); clones share the budget and the latency record.
#[derive(Debug, Clone)]
pub struct Retry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: Arc<str>,
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    backoff: Backoff,
    budget: Option<RetryBudget>,
    listeners: Listeners,
    deadline_aware: bool,
    percentile: f64,
    min_samples: u64,
    max_retry_after: Duration,
    latency: Arc<LatencyWindow>,
}

impl Retry {
    /// A builder with the documented defaults.
    pub fn builder() -> RetryBuilder {
        RetryBuilder::default()
    }

    /// The policy's name.
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// Total attempts allowed, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// The budget, if one is set.
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.inner.budget.as_ref()
    }

    /// The latencies of recent successful attempts (fed by this policy).
    pub fn latency(&self) -> &Arc<LatencyWindow> {
        &self.inner.latency
    }

    /// Runs `op`, retrying every `Err` (the [`AnyError`] classifier).
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(&AnyError, op).await
    }

    /// Runs `op`, retrying the results `classify` calls a failure.
    pub async fn call_with<T, E, C, F, Fut>(&self, classify: &C, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E> + ?Sized,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with_report(classify, op).await.0
    }

    /// Like [`call_with`](Self::call_with), and also reports the attempts made and why
    /// the retry stopped.
    pub async fn call_with_report<T, E, C, F, Fut>(
        &self,
        classify: &C,
        mut op: F,
    ) -> (Result<T, Error<E>>, RetryReport)
    where
        C: Classify<T, E> + ?Sized,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Some(mut attempts) = Attempts::start(self.clone()) else {
            let report = RetryReport {
                attempts: 0,
                stop: Stop::Deadline,
            };
            return (Err(Error::Timeout), report);
        };
        loop {
            attempts.begin();
            let result = op().await;
            match attempts.decide(classify.classify(&result)) {
                Next::Return(stop) => {
                    let report = RetryReport {
                        attempts: attempts.attempt,
                        stop,
                    };
                    return (result.map_err(Error::Inner), report);
                }
                Next::RetryAfter(delay) => {
                    drop(result);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Return this attempt's result.
    Return(Stop),
    /// Retry after sleeping this long (the budget token is already taken).
    RetryAfter(Duration),
}

/// The state of one call through a [`Retry`]: shared by the async API and the tower
/// service's future, so both decide identically.
#[derive(Debug)]
pub(crate) struct Attempts {
    retry: Retry,
    /// The attempt in progress (or last made), counting from 1.
    attempt: u32,
    backoff: BackoffIter,
    /// The binding limit and which one it is.
    limit: Option<(Instant, Stop)>,
    attempt_start: Instant,
    /// The budget token of a retry decided and not yet started: given back if it never is
    /// ([`give_up`](Self::give_up), or the call dropped during its backoff).
    token: Option<budget::Withdrawal>,
}

impl Drop for Attempts {
    fn drop(&mut self) {
        if let (Some(w), Some(b)) = (self.token.take(), &self.retry.inner.budget) {
            b.refund(w);
        }
    }
}

impl Attempts {
    /// Starts a call: reads the deadline in scope and deposits into the budget.
    /// `None` when the deadline in scope has already passed (nothing is deposited).
    pub(crate) fn start(retry: Retry) -> Option<Self> {
        let now = Instant::now();
        let i = &retry.inner;
        let deadline = if i.deadline_aware {
            Deadline::current().map(Deadline::instant)
        } else {
            None
        };
        if deadline.is_some_and(|d| d <= now) {
            return None;
        }
        let elapsed = i.max_elapsed.and_then(|m| now.checked_add(m));
        let limit = match (deadline, elapsed) {
            (Some(d), Some(e)) if e < d => Some((e, Stop::MaxElapsed)),
            (Some(d), _) => Some((d, Stop::Deadline)),
            (None, Some(e)) => Some((e, Stop::MaxElapsed)),
            (None, None) => None,
        };
        if let Some(b) = &i.budget {
            b.deposit_at(now);
        }
        let backoff = i.backoff.iter();
        Some(Attempts {
            retry,
            attempt: 0,
            backoff,
            limit,
            attempt_start: now,
            token: None,
        })
    }

    /// Marks the start of an attempt.
    /// True once the binding limit (deadline or `max_elapsed`) has passed.
    pub(crate) fn past_limit(&self) -> bool {
        self.limit.is_some_and(|(limit, _)| Instant::now() >= limit)
    }

    /// The retry decided last will not be made (readiness outlasted the limit): its budget
    /// token goes back, and the call ends as retries that stop at a limit do.
    pub(crate) fn give_up(&mut self) {
        if let (Some(w), Some(b)) = (self.token.take(), &self.retry.inner.budget) {
            b.refund(w);
        }
        let i = &self.retry.inner;
        i.listeners.emit(|| Event::RetryExhausted {
            name: i.name.clone(),
            attempts: self.attempt,
        });
    }

    pub(crate) fn begin(&mut self) {
        self.token = None;
        // The first attempt starts when the call does: `start` already read the clock.
        if self.attempt > 0 {
            self.attempt_start = Instant::now();
        }
        self.attempt += 1;
    }

    /// Attempts made so far.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Decides what follows an attempt classified as `outcome`.
    pub(crate) fn decide(&mut self, outcome: Outcome) -> Next {
        let i = &*self.retry.inner;
        let now = Instant::now();
        match outcome {
            Outcome::Success => {
                i.latency
                    .record(now.saturating_duration_since(self.attempt_start));
                return Next::Return(Stop::Success);
            }
            Outcome::Ignore => return Next::Return(Stop::NotRetryable),
            Outcome::Failure | Outcome::FailureRetryAfter(_) => {}
        }
        if self.attempt >= i.max_attempts {
            return self.exhausted(Stop::AttemptsExhausted);
        }
        // The iterator is endless; `unwrap_or_default` is never taken.
        let mut delay = self.backoff.next().unwrap_or_default();
        if let Some(hint) = outcome.retry_after() {
            if hint > i.max_retry_after {
                return self.exhausted(Stop::RetryAfterTooLong);
            }
            delay = delay.max(hint);
        }
        if let Some((limit, why)) = self.limit {
            let predicted = if i.deadline_aware {
                i.latency
                    .percentile(i.percentile, i.min_samples)
                    .unwrap_or_default()
            } else {
                Duration::ZERO
            };
            let fits = now
                .checked_add(delay)
                .is_some_and(|at| at < limit && limit - at >= predicted);
            if !fits {
                return self.exhausted(why);
            }
        }
        if let Some(b) = &i.budget {
            match b.withdraw() {
                Some(w) => self.token = Some(w),
                None => {
                    i.listeners.emit(|| Event::RetryBudgetExhausted {
                        name: i.name.clone(),
                    });
                    return Next::Return(Stop::BudgetExhausted);
                }
            }
        }
        let attempt = self.attempt + 1;
        let reason = if outcome.retry_after().is_some() {
            "retry_after"
        } else {
            "failure"
        };
        i.listeners.emit(|| Event::Retry {
            name: i.name.clone(),
            attempt,
            delay,
            reason,
        });
        Next::RetryAfter(delay)
    }

    fn exhausted(&self, stop: Stop) -> Next {
        let i = &self.retry.inner;
        i.listeners.emit(|| Event::RetryExhausted {
            name: i.name.clone(),
            attempts: self.attempt,
        });
        Next::Return(stop)
    }
}

/// Builds a [`Retry`].
#[derive(Debug)]
pub struct RetryBuilder {
    name: Option<Arc<str>>,
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    backoff: Backoff,
    budget: Option<RetryBudget>,
    listeners: Listeners,
    deadline_aware: bool,
    percentile: f64,
    min_samples: u64,
    max_retry_after: Duration,
    latency: Option<Arc<LatencyWindow>>,
}

impl Default for RetryBuilder {
    fn default() -> Self {
        RetryBuilder {
            name: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_elapsed: None,
            backoff: Backoff::exponential(DEFAULT_BACKOFF_BASE).jitter(backoff::Jitter::Full),
            budget: None,
            listeners: Listeners::new(),
            deadline_aware: true,
            percentile: DEFAULT_DEADLINE_PERCENTILE,
            min_samples: DEFAULT_DEADLINE_MIN_SAMPLES,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            latency: None,
        }
    }
}

impl RetryBuilder {
    /// The name used in events. Default [`DEFAULT_NAME`].
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Total attempts, the first included (1 = no retries). Default
    /// [`DEFAULT_MAX_ATTEMPTS`].
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// No retry starts at or after this long after the call began (the first attempt
    /// is always made). Default: no limit.
    pub fn max_elapsed(mut self, d: Duration) -> Self {
        self.max_elapsed = Some(d);
        self
    }

    /// The delays between attempts. Default: exponential from
    /// [`DEFAULT_BACKOFF_BASE`], capped at [`DEFAULT_MAX_DELAY`], full jitter.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// A budget shared with other calls (and other policies). Default: none.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Adds a listener for [`Event::Retry`], [`Event::RetryExhausted`] and
    /// [`Event::RetryBudgetExhausted`].
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Whether to read the [`Deadline`] in scope and predict attempt latency.
    /// Default `true`. When `false` only `max_attempts`, `max_elapsed` (as a plain
    /// start-time limit) and the budget stop retries.
    pub fn deadline_aware(mut self, on: bool) -> Self {
        self.deadline_aware = on;
        self
    }

    /// The latency percentile (0 to 100) of recent successful attempts that a retry
    /// must fit in before the deadline. Default [`DEFAULT_DEADLINE_PERCENTILE`].
    pub fn deadline_percentile(mut self, p: f64) -> Self {
        self.percentile = p;
        self
    }

    /// Successes to record before the latency prediction is used. Default
    /// [`DEFAULT_DEADLINE_MIN_SAMPLES`].
    pub fn deadline_min_samples(mut self, n: u64) -> Self {
        self.min_samples = n;
        self
    }

    /// The latency record to feed and read; share one with a hedging policy over the
    /// same dependency. Default: a new [`LatencyWindow`].
    pub fn latency_window(mut self, window: Arc<LatencyWindow>) -> Self {
        self.latency = Some(window);
        self
    }

    /// The longest Retry-After hint that is waited out. Default
    /// [`DEFAULT_MAX_RETRY_AFTER`].
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.max_retry_after = d;
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<Retry, ConfigError> {
        // An empty name is an empty label value in metrics, which Prometheus reads as no label.
        if self.name.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "max_attempts",
                "must be at least 1 (the first attempt)",
            ));
        }
        if !(0.0..=100.0).contains(&self.percentile) {
            return Err(ConfigError::new(
                "deadline_percentile",
                format!("must be between 0 and 100, got {}", self.percentile),
            ));
        }
        self.backoff.validate()?;
        Ok(Retry {
            inner: Arc::new(Inner {
                name: self.name.unwrap_or_else(|| DEFAULT_NAME.into()),
                max_attempts: self.max_attempts,
                max_elapsed: self.max_elapsed,
                backoff: self.backoff,
                budget: self.budget,
                listeners: self.listeners,
                deadline_aware: self.deadline_aware,
                percentile: self.percentile,
                min_samples: self.min_samples,
                max_retry_after: self.max_retry_after,
                latency: self.latency.unwrap_or_default(),
            }),
        })
    }
}
