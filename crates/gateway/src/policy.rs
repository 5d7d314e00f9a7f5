//! The seam between the gateway and the `bulwark` policy library.
//!
//! Every policy *decision* the attempt loop makes goes through the two types here:
//!
//! - [`UpstreamPolicies`] (one per upstream): [`UpstreamPolicies::admit`] before each attempt (circuit
//!   breaker, rate limit, bulkhead) returning an [`Admission`] or a [`Reject`]; the attempt's outcome is
//!   reported with [`Admission::record`].
//! - [`RoutePolicies`] (one per route): the retry budget ([`RoutePolicies::deposit`],
//!   [`RoutePolicies::try_withdraw`]) and the backoff schedule ([`RoutePolicies::backoff`]).
//!
//! The implementations below are the simplest correct stand-ins until the library's policies are merged;
//! each is marked with the library type that replaces it. Swapping one in changes only this file:
//! the attempt loop sees the same methods.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulwark::Outcome;
use tokio::time::Instant;

use crate::config;

/// Why an upstream refused an attempt before it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The circuit breaker is open; try again after `retry_after`.
    CircuitOpen {
        /// Time until the breaker lets a probe through.
        retry_after: Duration,
    },
    /// The upstream's rate limit is exhausted.
    RateLimited {
        /// Time until a request would be admitted.
        retry_after: Duration,
    },
    /// The bulkhead has no free slot.
    BulkheadFull,
}

/// Per-upstream admission: circuit breaker, rate limit and bulkhead, checked in that order.
#[derive(Debug)]
pub struct UpstreamPolicies {
    // integrates bulwark::breaker::CircuitBreaker once merged: `try_acquire() -> Result<Permit, _>`,
    // `permit.record(Outcome)`. Until then the breaker is always closed (admits everything).
    breaker: Option<config::CircuitBreaker>,
    // integrates bulwark::rate_limit::RateLimiter once merged: `check() -> Err(RateLimited{retry_after})`.
    // Until then no rate limiting is applied.
    rate_limit: Option<config::RateLimit>,
    // integrates bulwark::bulkhead::Bulkhead once merged (`try_acquire` / `acquire().await` permits,
    // with its queue). Until then: a concurrency cap without a queue.
    bulkhead: Option<Arc<ConcurrencyCap>>,
}

/// Permission to send one attempt; report its outcome with [`Admission::record`]. Dropping it without
/// recording counts as neither success nor failure (e.g. the client went away).
#[derive(Debug)]
pub struct Admission {
    // the breaker permit goes here once bulwark::breaker is merged.
    _slot: Option<Slot>,
    started: Instant,
}

impl Admission {
    /// Reports how the attempt went (to the breaker, once merged). `Outcome::Ignore` for results that say
    /// nothing about the upstream's health.
    pub fn record(&mut self, outcome: Outcome) {
        // integrates bulwark::breaker: `permit.record(outcome)` with `self.started.elapsed()` for slow calls.
        let _ = (outcome, self.started);
    }
}

impl UpstreamPolicies {
    /// Builds the policies of one upstream from its config.
    pub fn new(up: &config::Upstream) -> Self {
        UpstreamPolicies {
            breaker: up.circuit_breaker.clone().filter(|c| c.enabled),
            rate_limit: up.rate_limit.clone().filter(|r| r.enabled),
            bulkhead: up
                .bulkhead
                .as_ref()
                .filter(|b| b.enabled)
                .map(|b| Arc::new(ConcurrencyCap::new(b.max_concurrent))),
        }
    }

    /// Asks to send one attempt now. Runs on every attempt; with no policy configured it is two branches.
    pub fn admit(&self) -> Result<Admission, Reject> {
        let _ = (&self.breaker, &self.rate_limit);
        let slot = match &self.bulkhead {
            Some(cap) => Some(cap.try_acquire().ok_or(Reject::BulkheadFull)?),
            None => None,
        };
        Ok(Admission {
            _slot: slot,
            started: Instant::now(),
        })
    }
}

/// A counter of concurrent calls with a cap (stand-in for `bulwark::bulkhead::Bulkhead`).
#[derive(Debug)]
struct ConcurrencyCap {
    max: u32,
    used: AtomicU32,
}

#[derive(Debug)]
struct Slot(Arc<ConcurrencyCap>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::Release);
    }
}

impl ConcurrencyCap {
    fn new(max: u32) -> Self {
        ConcurrencyCap {
            max,
            used: AtomicU32::new(0),
        }
    }
    fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// Per-route retry policy state: budget and backoff.
#[derive(Debug)]
pub struct RoutePolicies {
    budget: Option<Budget>,
    backoff: config::Backoff,
}

impl RoutePolicies {
    /// Builds them from the route's retry config (no retry section: no budget, default backoff).
    pub fn new(retry: Option<&config::Retry>) -> Self {
        RoutePolicies {
            budget: retry.and_then(|r| r.budget.as_ref()).map(Budget::new),
            backoff: retry.map(|r| r.backoff.clone()).unwrap_or_default(),
        }
    }

    /// Records a first attempt (earns retry credit).
    pub fn deposit(&self) {
        if let Some(b) = &self.budget {
            b.deposit();
        }
    }

    /// Takes the credit for one retry; `false` when the budget is exhausted. No budget: always `true`.
    pub fn try_withdraw(&self) -> bool {
        self.budget.as_ref().is_none_or(Budget::try_withdraw)
    }

    /// Delay before retry number `retry` (1 for the first retry).
    pub fn backoff(&self, retry: u32) -> Duration {
        // integrates bulwark::retry::Backoff once merged.
        let b = &self.backoff;
        let n = retry.saturating_sub(1);
        let base = b.base.get();
        let raw = match b.kind {
            config::BackoffKind::Constant => base,
            config::BackoffKind::Linear => base.saturating_mul(n + 1),
            config::BackoffKind::Exponential => base.saturating_mul(1u32 << n.min(20)),
        };
        let d = raw.min(b.max.get());
        match b.jitter {
            config::Jitter::None => d,
            config::Jitter::Full => d.mul_f64(fastrand::f64()),
            config::Jitter::Equal => d / 2 + (d / 2).mul_f64(fastrand::f64()),
        }
    }
}

/// Retry budget stand-in: retries allowed in the current window are
/// `min_per_second x window + ratio x first attempts`.
// integrates bulwark::retry::RetryBudget once merged (`deposit()`, `try_withdraw()`), which also counts
// retries waiting in backoff and uses a sliding rather than a fixed window.
#[derive(Debug)]
struct Budget {
    ratio: f64,
    floor: f64,
    window: Duration,
    epoch: Instant,
    /// Window number (since `epoch`) the counters below belong to.
    current: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

impl Budget {
    fn new(c: &config::Budget) -> Self {
        Budget {
            ratio: c.ratio,
            floor: f64::from(c.min_per_second) * c.window.get().as_secs_f64(),
            window: c.window.get(),
            epoch: Instant::now(),
            current: AtomicU64::new(0),
            deposits: AtomicU64::new(0),
            withdrawals: AtomicU64::new(0),
        }
    }
    fn roll(&self) {
        let w = (self.epoch.elapsed().as_nanos() / self.window.as_nanos().max(1)) as u64;
        if self.current.load(Ordering::Relaxed) != w && self.current.swap(w, Ordering::AcqRel) != w
        {
            self.deposits.store(0, Ordering::Relaxed);
            self.withdrawals.store(0, Ordering::Relaxed);
        }
    }
    fn deposit(&self) {
        self.roll();
        self.deposits.fetch_add(1, Ordering::Relaxed);
    }
    fn try_withdraw(&self) -> bool {
        self.roll();
        let allowed = self.floor + self.ratio * self.deposits.load(Ordering::Relaxed) as f64;
        self.withdrawals
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                ((w as f64) < allowed).then_some(w + 1)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_per_window() {
        let b = Budget::new(&config::Budget {
            ratio: 0.5,
            min_per_second: 1,
            window: config::Dur::from_secs(2),
        });
        for _ in 0..4 {
            b.deposit();
        }
        // floor 2 + 0.5 x 4 = 4 retries.
        assert_eq!((0..10).filter(|_| b.try_withdraw()).count(), 4);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!((0..10).filter(|_| b.try_withdraw()).count(), 2);
    }

    #[test]
    fn bulkhead_cap() {
        let p = UpstreamPolicies::new(&config::Upstream {
            endpoints: vec![],
            balance: config::Balance::RoundRobin,
            http2: false,
            connect_timeout: config::DEFAULT_CONNECT_TIMEOUT,
            pool: Default::default(),
            health_check: None,
            outlier_detection: None,
            circuit_breaker: None,
            bulkhead: Some(config::Bulkhead {
                max_concurrent: 1,
                ..Default::default()
            }),
            rate_limit: None,
        });
        let a = p.admit().unwrap();
        assert_eq!(p.admit().unwrap_err(), Reject::BulkheadFull);
        drop(a);
        assert!(p.admit().is_ok());
    }

    #[test]
    fn backoff_exponential_capped() {
        let p = RoutePolicies::new(Some(&config::Retry {
            backoff: config::Backoff {
                kind: config::BackoffKind::Exponential,
                base: config::Dur::from_millis(100),
                max: config::Dur::from_millis(300),
                jitter: config::Jitter::None,
            },
            ..Default::default()
        }));
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(300));
    }
}
