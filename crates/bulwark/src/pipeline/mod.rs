//! Composition: every policy around one call, in one documented order.
//!
//! # Why one order
//!
//! Policies interact, and the order decides how. A retry *outside* the breaker sees
//! `circuit_open` and stops instead of hammering; a retry *inside* it would turn every
//! failure into several recorded failures. A total timeout outside the retry bounds
//! the whole call, and puts a [`Deadline`](crate::timeout::Deadline) in scope so the
//! retry never starts an attempt that cannot finish; a per-attempt timeout innermost
//! makes a hung attempt count as one failure for the breaker. The fallback is last
//! to act and sees the final error. [`Pipeline`] fixes that order:
//!
//! ```text
//! fallback → total timeout → retry → hedge → circuit breaker → rate limiter → bulkhead → attempt timeout → operation
//! ```
//!
//! Every stage is optional. The same stack with `tower::ServiceBuilder` (each policy
//! has a layer) is shown in the repository's `README.md` and tested in `tests/pipeline.rs`.
//!
//! # What counts as a failure
//!
//! The classifier sees `Result<T, bulwark::Error<E>>`: the operation's own result, or
//! a rejection from an inner stage. It decides what the breaker records and what the
//! retry and hedge retry. [`DefaultClassifier`] counts every error of the operation and
//! every attempt timeout as a failure, honours a rate limiter's `retry_after`, and does
//! not retry an open breaker (retrying an open breaker only burns the budget). To also
//! count `Ok` values as failures (an HTTP 503), write a classifier that handles `Ok`
//! and calls [`classify_error`] for the rest.
//!
//! # Example: breaker inside retry inside timeout, with a fallback to a cached value
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use bulwark::{breaker::CircuitBreaker, pipeline::Pipeline, retry::{Backoff, Retry}, timeout::Timeout};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let pipeline = Pipeline::builder()
//!     .total_timeout(Timeout::total(Duration::from_secs(2)))
//!     .retry(Retry::builder().max_attempts(3).backoff(Backoff::fixed(Duration::from_millis(10))).build().unwrap())
//!     .circuit_breaker(CircuitBreaker::builder().name("prices").count_window(10).minimum_calls(5).build().unwrap())
//!     .attempt_timeout(Timeout::attempt(Duration::from_millis(500)))
//!     .build()
//!     .unwrap();
//!
//! let calls = AtomicU32::new(0);
//! let cached = 41;
//! let price = pipeline
//!     .call_or_else(
//!         || async {
//!             calls.fetch_add(1, Ordering::Relaxed);
//!             Err::<u32, _>(std::io::Error::other("pricing service down"))
//!         },
//!         |_err| async move { Ok(cached) },
//!     )
//!     .await;
//! assert_eq!(price.unwrap(), 41); // served from the cache
//! assert_eq!(calls.load(Ordering::Relaxed), 3); // after three attempts
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;

use crate::breaker::CircuitBreaker;
use crate::bulkhead::Bulkhead;
use crate::classify::{Classify, Outcome};
use crate::error::{BoxError, ConfigError, Error};
use crate::fallback::Fallback;
use crate::hedge::Hedge;
use crate::rate_limit::RateLimiter;
use crate::retry::Retry;
use crate::timeout::Timeout;

/// How [`DefaultClassifier`] and pipeline stages count one error.
///
/// - the operation's own error ([`Error::Inner`]), an attempt [`Error::Timeout`] and
///   [`Error::BulkheadFull`]: failure (retried, recorded by the breaker);
/// - [`Error::RateLimited`]: failure with its `retry_after` as the retry hint;
/// - [`Error::CircuitOpen`], [`Error::Shed`], [`Error::RetryBudgetExhausted`]: not
///   retried (a retry would only wait for the same refusal).
pub fn classify_error<E>(error: &Error<E>) -> Outcome {
    match error {
        Error::Inner(_) | Error::Timeout | Error::BulkheadFull => Outcome::Failure,
        Error::RateLimited { retry_after } => Outcome::FailureRetryAfter(*retry_after),
        _ => Outcome::Ignore,
    }
}

/// How the hedge stage counts an attempt's result: a refusal by a stage inside the attempt (the
/// breaker, the rate limiter, the bulkhead, a shedder) sent nothing and is no answer, whatever
/// `C` makes of it (the retry stage, outside, still retries a full bulkhead). So a refused hedge
/// neither starts the next one at once (the fast-failure rule is for an attempt that failed and
/// freed its slot; the next would be refused alike) nor replaces an earlier attempt's real
/// failure as the race's answer.
struct HedgeView<'a, C>(&'a C);

impl<T, E, C: Classify<T, Error<E>>> Classify<T, Error<E>> for HedgeView<'_, C> {
    #[inline]
    fn classify(&self, result: &Result<T, Error<E>>) -> Outcome {
        match result {
            Err(
                Error::CircuitOpen { .. }
                | Error::RateLimited { .. }
                | Error::BulkheadFull
                | Error::Shed,
            ) => Outcome::Ignore,
            _ => self.0.classify(result),
        }
    }
}

/// The pipeline's default classifier: `Ok` is a success, errors as [`classify_error`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<T, E> Classify<T, Error<E>> for DefaultClassifier {
    #[inline]
    fn classify(&self, result: &Result<T, Error<E>>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => classify_error(e),
        }
    }
}

/// The same classification for `tower` stacks, whose errors are [`BoxError`]s: a
/// boxed [`bulwark::Error`](Error) from an inner layer is classified by
/// [`classify_error`]; any other error (the service's own) is a failure.
///
/// Give it to [`RetryLayer::classifier`](crate::retry::RetryLayer::classifier) and
/// [`HedgeLayer::classifier`](crate::hedge::HedgeLayer::classifier) when they wrap
/// other bulwark layers, so that an open breaker is not retried.
#[derive(Debug, Clone, Copy, Default)]
pub struct TowerClassifier;

impl<T> Classify<T, BoxError> for TowerClassifier {
    fn classify(&self, result: &Result<T, BoxError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => match e.downcast_ref::<Error>() {
                Some(policy) => classify_error(policy),
                None => Outcome::Failure,
            },
        }
    }
}

/// Policies stacked in the documented order; see the [module docs](self).
///
/// Cheap to clone: every policy inside is a handle to shared state, so clones share
/// breaker windows, budgets and permits.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    fallback: Option<Fallback>,
    total_timeout: Option<Timeout>,
    retry: Option<Retry>,
    hedge: Option<Hedge>,
    breaker: Option<CircuitBreaker>,
    rate_limiter: Option<RateLimiter>,
    bulkhead: Option<Bulkhead>,
    attempt_timeout: Option<Timeout>,
}

/// Builds a [`Pipeline`]; every stage is optional.
#[derive(Debug, Clone, Default)]
pub struct PipelineBuilder {
    inner: Pipeline,
}

impl Pipeline {
    /// A builder with no stage set.
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// The circuit breaker stage, if any.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_ref()
    }

    /// The retry stage, if any.
    pub fn retry(&self) -> Option<&Retry> {
        self.retry.as_ref()
    }

    /// The bulkhead stage, if any.
    pub fn bulkhead(&self) -> Option<&Bulkhead> {
        self.bulkhead.as_ref()
    }

    /// Runs `op` through every stage, counting failures with [`DefaultClassifier`].
    ///
    /// `op` builds one attempt; it is called once per attempt (retries and hedges),
    /// so it is a `Fn`. A configured fallback is not used here; see
    /// [`call_or_else`](Self::call_or_else).
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(&DefaultClassifier, op).await
    }

    /// Like [`call`](Self::call), with a classifier over the pipeline's result type.
    pub async fn call_with<T, E, C, F, Fut>(&self, classify: &C, op: F) -> Result<T, Error<E>>
    where
        C: Classify<T, Error<E>>,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let op = &op;
        let attempt = move || self.attempt(classify, op());
        let hedged = move || async move {
            match &self.hedge {
                Some(h) => h
                    .call_with(&HedgeView(classify), attempt)
                    .await
                    .map_err(Error::flatten),
                None => attempt().await,
            }
        };
        let retried = move || async move {
            match &self.retry {
                Some(r) => r.call_with(classify, hedged).await.map_err(Error::flatten),
                None => hedged().await,
            }
        };
        match &self.total_timeout {
            Some(t) => t.call(retried).await.map_err(Error::flatten),
            None => retried().await,
        }
    }

    /// Runs `op` like [`call`](Self::call); when it fails with an error that triggers
    /// the configured [`Fallback`] (every error when none is configured),
    /// `alternative` receives the error and its result is returned instead.
    pub async fn call_or_else<T, E, F, Fut, A, AFut>(
        &self,
        op: F,
        alternative: A,
    ) -> Result<T, Error<E>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        A: FnOnce(Error<E>) -> AFut,
        AFut: Future<Output = Result<T, Error<E>>>,
    {
        self.call_with_or_else(&DefaultClassifier, op, alternative)
            .await
    }

    /// [`call_or_else`](Self::call_or_else) with a classifier. Only errors reach
    /// `alternative`: a final `Ok` is returned as it is even when the classifier calls
    /// it a failure (an HTTP 503 after the last retry); to fall back on such values, use
    /// [`Fallback::call_with`] around [`call_with`](Self::call_with).
    pub async fn call_with_or_else<T, E, C, F, Fut, A, AFut>(
        &self,
        classify: &C,
        op: F,
        alternative: A,
    ) -> Result<T, Error<E>>
    where
        C: Classify<T, Error<E>>,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        A: FnOnce(Error<E>) -> AFut,
        AFut: Future<Output = Result<T, Error<E>>>,
    {
        match &self.fallback {
            Some(f) => f.call(|| self.call_with(classify, op), alternative).await,
            None => match self.call_with(classify, op).await {
                Ok(v) => Ok(v),
                Err(e) => alternative(e).await,
            },
        }
    }

    /// One attempt: breaker → rate limiter → bulkhead → attempt timeout → `fut`.
    async fn attempt<T, E, C, Fut>(&self, classify: &C, fut: Fut) -> Result<T, Error<E>>
    where
        C: Classify<T, Error<E>>,
        Fut: Future<Output = Result<T, E>>,
    {
        // A rejection after the breaker admitted us drops the permit unrecorded,
        // which the breaker counts as "ignored": local refusals never trip it.
        let mut permit = match &self.breaker {
            Some(b) => Some(b.try_acquire().map_err(never)?),
            None => None,
        };
        if let Some(rl) = &self.rate_limiter {
            rl.check().map_err(never)?;
        }
        let _slot = match &self.bulkhead {
            Some(b) => match b.try_acquire() {
                Some(slot) => Some(slot),
                None => {
                    // The wait in the bulkhead's queue is ours, not the dependency's: the
                    // breaker's permit (whose clock measures slow calls, and which may be one
                    // of few half-open probes) is given back unrecorded meanwhile, and asked
                    // for again once a slot is free.
                    drop(permit.take());
                    let slot = b.acquire().await.map_err(never)?;
                    if let Some(b) = &self.breaker {
                        permit = Some(b.try_acquire().map_err(never)?);
                    }
                    Some(slot)
                }
            },
            None => None,
        };
        let result = match &self.attempt_timeout {
            Some(t) => t.call(|| fut).await,
            None => fut.await.map_err(Error::Inner),
        };
        if let Some(p) = permit {
            p.record(classify.classify(&result));
        }
        result
    }
}

/// Re-types a rejection that cannot carry an inner error.
fn never<E>(e: Error<Infallible>) -> Error<E> {
    e.map_inner(|n| match n {})
}

impl PipelineBuilder {
    /// Outermost: replaces chosen final errors with an alternative (see
    /// [`Pipeline::call_or_else`]).
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.inner.fallback = Some(fallback);
        self
    }

    /// Bounds the whole call, all attempts and backoffs included, and puts its
    /// deadline in scope for the retry.
    pub fn total_timeout(mut self, timeout: Timeout) -> Self {
        self.inner.total_timeout = Some(timeout);
        self
    }

    /// Retries failed attempts (with its backoff and budget).
    pub fn retry(mut self, retry: Retry) -> Self {
        self.inner.retry = Some(retry);
        self
    }

    /// Hedges slow attempts.
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.inner.hedge = Some(hedge);
        self
    }

    /// Records every attempt and rejects while open.
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.inner.breaker = Some(breaker);
        self
    }

    /// Rejects attempts over the rate.
    pub fn rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.inner.rate_limiter = Some(limiter);
        self
    }

    /// Bounds concurrent attempts.
    pub fn bulkhead(mut self, bulkhead: Bulkhead) -> Self {
        self.inner.bulkhead = Some(bulkhead);
        self
    }

    /// Innermost: bounds each attempt.
    pub fn attempt_timeout(mut self, timeout: Timeout) -> Self {
        self.inner.attempt_timeout = Some(timeout);
        self
    }

    /// Checks that the stages make sense together.
    ///
    /// # Errors
    /// An attempt timeout that is not shorter than the total timeout (it could
    /// never fire before the total one, and no retry could follow it).
    pub fn build(self) -> Result<Pipeline, ConfigError> {
        if let (Some(total), Some(attempt)) =
            (&self.inner.total_timeout, &self.inner.attempt_timeout)
        {
            if attempt.duration() >= total.duration() {
                return Err(ConfigError::new(
                    "attempt_timeout",
                    format!(
                        "attempt timeout {:?} must be shorter than the total timeout {:?}",
                        attempt.duration(),
                        total.duration()
                    ),
                ));
            }
        }
        Ok(self.inner)
    }
}
