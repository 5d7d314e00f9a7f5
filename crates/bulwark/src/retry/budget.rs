//! The retry budget: [`RetryBudget`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::ConfigError;

/// Default time a deposit (and a withdrawal) counts: Finagle's 10 s. Long enough to
/// smooth bursts, short enough that a past traffic peak does not fund today's
/// retry storm.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Default floor: 10 retries per second, so a client with little traffic can still
/// retry its occasional failure (Finagle's default).
pub const DEFAULT_MIN_RETRIES_PER_SEC: u32 = 10;

/// Default share of calls that may be retried: 20 %, so retries add at most a fifth
/// to the load on a failing dependency (Finagle's default).
pub const DEFAULT_PERCENT_CAN_RETRY: f64 = 0.2;

const SLICES: usize = 10;
// Fixed point for `percent_can_retry`: one token is SCALE units.
const SCALE: i128 = 1_000_000;

/// One token taken from a [`RetryBudget`] by [`RetryBudget::withdraw`].
/// Neither `Clone` nor `Copy`: it can be given back once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a withdrawal not sent is given back with RetryBudget::refund"]
pub struct Withdrawal {
    /// The slice generation it was counted in.
    generation: u32,
}

/// A shared retry budget: retries as a share of recent traffic, with a floor.
///
/// Semantics follow Finagle's `RetryBudget`: every call [`deposit`](RetryBudget::deposit)s,
/// every retry [`try_withdraw`](RetryBudget::try_withdraw)s one token. A deposit is worth
/// `percent_can_retry` tokens, and a reserve of `min_retries_per_sec * ttl` tokens is
/// always added, so a client with little traffic can still retry. Deposits *and*
/// withdrawals expire after `ttl`, so the reserve refills and old traffic stops
/// paying for new retries.
///
/// At any moment: `balance = floor(min_retries_per_sec * ttl + percent_can_retry *
/// deposits_in_window) - withdrawals_in_window`.
///
/// # Implementation
///
/// The window is 10 slices of `ttl / 10` each (as Finagle's windowed adder does): a
/// deposit or withdrawal expires between `0.9 * ttl` and `ttl` after it was made.
/// Each slice is one `AtomicU64` holding the slice's generation (upper 32 bits) and
/// its count (lower 32 bits), so a deposit, which happens on every call, is one clock
/// read and one compare-and-swap. A withdrawal must check the balance and take a
/// token as one step, or a burst of concurrent failures could all see the same last
/// token; withdrawals (one per retry, rare on a healthy path) take a short
/// `std::sync::Mutex` for that.
///
/// Cheap to clone; clones share the same balance.
///
/// ```
/// use bulwark::retry::RetryBudget;
///
/// let budget = RetryBudget::builder()
///     .min_retries_per_sec(0)
///     .percent_can_retry(0.1)
///     .build()
///     .unwrap();
/// for _ in 0..20 {
///     budget.deposit(); // one per call
/// }
/// assert_eq!(budget.balance(), 2);
/// assert!(budget.try_withdraw() && budget.try_withdraw());
/// assert!(!budget.try_withdraw(), "a third retry would exceed 10 %");
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: Instant,
    slice_nanos: u64,
    ttl: Duration,
    min_retries_per_sec: u32,
    percent_can_retry: f64,
    /// Reserve in SCALE units.
    reserve: i128,
    /// Value of one deposit in SCALE units.
    deposit_value: i128,
    deposits: [AtomicU64; SLICES],
    withdrawals: [AtomicU64; SLICES],
    /// Serialises check-and-withdraw; guards nothing but the decision.
    withdraw_lock: Mutex<()>,
}

#[inline]
fn pack(generation: u32, count: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(count)
}

#[inline]
fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

impl RetryBudget {
    /// A builder with Finagle's defaults.
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder::default()
    }

    /// The current slice generation (truncated to 32 bits: with the smallest slice,
    /// 100 ms, it wraps after 13 years, and only a slice untouched for exactly that
    /// long could be misread).
    #[inline]
    fn generation(&self) -> u32 {
        self.generation_at(Instant::now())
    }

    fn generation_at(&self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.inner.epoch);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        (nanos / self.inner.slice_nanos) as u32
    }

    /// Adds one to the slice of generation `now` in `slots`; returns the generation it counted
    /// into (`now`, or a newer one another caller had already moved the slot to).
    #[inline]
    fn add(slots: &[AtomicU64; SLICES], now: u32) -> u32 {
        let slot = &slots[now as usize % SLICES];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (g, c) = unpack(cur);
            let next = if g == now {
                pack(g, c.saturating_add(1))
            } else if now.wrapping_sub(g) < (1 << 31) {
                // The slot holds an expired generation: start it afresh.
                pack(now, 1)
            } else {
                // Another caller already moved the slot past our (slightly older)
                // clock reading; count into the newer generation.
                pack(g, c.saturating_add(1))
            };
            match slot.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return unpack(next).0,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Sum of the counts of slices that are still in the window at generation `now`.
    fn sum(slots: &[AtomicU64; SLICES], now: u32) -> i128 {
        slots
            .iter()
            .map(|s| {
                let (g, c) = unpack(s.load(Ordering::Acquire));
                if now.wrapping_sub(g) < SLICES as u32 {
                    i128::from(c)
                } else {
                    0
                }
            })
            .sum()
    }

    fn balance_units(&self, now: u32) -> i128 {
        let i = &self.inner;
        i.reserve + Self::sum(&i.deposits, now) * i.deposit_value
            - Self::sum(&i.withdrawals, now) * SCALE
    }

    /// Records one call (a first attempt). Lock-free: one clock read and one
    /// compare-and-swap.
    #[inline]
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// [`deposit`](Self::deposit) with a clock reading the caller already has
    /// (saves reading the clock again on a hot path).
    pub fn deposit_at(&self, now: Instant) {
        if self.inner.deposit_value == 0 {
            return;
        }
        Self::add(&self.inner.deposits, self.generation_at(now));
    }

    /// Takes one token for a retry, if there is one. Returns `false` (and takes
    /// nothing) when the budget is exhausted.
    pub fn try_withdraw(&self) -> bool {
        self.withdraw().is_some()
    }

    /// [`try_withdraw`](Self::try_withdraw), returning the token taken: a retry that
    /// ends up not being sent (say the upstream refused it) gives it back with
    /// [`refund`](Self::refund).
    pub fn withdraw(&self) -> Option<Withdrawal> {
        let _guard = self.decision();
        // The clock is read under the lock: a caller that waited for it while the window
        // moved on decides in the window the others now count in (read before, it checked an
        // older window, still holding an expired slice and blind to the newer one's
        // withdrawals, and could overshoot the reserve at every slice boundary).
        let now = self.generation();
        if self.balance_units(now) < SCALE {
            return None;
        }
        Some(Withdrawal {
            generation: Self::add(&self.inner.withdrawals, now),
        })
    }

    /// Gives back the token `w` of a retry that was never sent. Returns `false`,
    /// and changes nothing, when that withdrawal has already expired (it no longer
    /// counts, so there is nothing to give back).
    pub fn refund(&self, w: Withdrawal) -> bool {
        let _guard = self.decision();
        let now = self.generation();
        if now.wrapping_sub(w.generation) >= SLICES as u32 {
            return false;
        }
        let slot = &self.inner.withdrawals[w.generation as usize % SLICES];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (g, c) = unpack(cur);
            if g != w.generation || c == 0 {
                return false;
            }
            match slot.compare_exchange_weak(
                cur,
                pack(g, c - 1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Serialises a withdrawal's (or refund's) check-and-update. The lock only serialises the
    /// decision; a poisoned lock (a panic in the few lines it guards, which do not panic) leaves
    /// no broken state behind.
    fn decision(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .withdraw_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Whole retries the budget would allow right now.
    pub fn balance(&self) -> u64 {
        let units = self.balance_units(self.generation());
        u64::try_from(units.max(0) / SCALE).unwrap_or(u64::MAX)
    }

    /// The window a deposit or withdrawal counts for.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The floor, in retries per second.
    pub fn min_retries_per_sec(&self) -> u32 {
        self.inner.min_retries_per_sec
    }

    /// The share of calls that may be retried.
    pub fn percent_can_retry(&self) -> f64 {
        self.inner.percent_can_retry
    }
}

impl Default for RetryBudget {
    /// A budget with Finagle's defaults (10 s, 10 retries/s, 20 %).
    fn default() -> Self {
        RetryBudgetBuilder::default().make()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.inner.ttl)
            .field("min_retries_per_sec", &self.inner.min_retries_per_sec)
            .field("percent_can_retry", &self.inner.percent_can_retry)
            .field("balance", &self.balance())
            .finish()
    }
}

/// Builds a [`RetryBudget`].
#[derive(Debug, Clone)]
pub struct RetryBudgetBuilder {
    ttl: Duration,
    min_retries_per_sec: u32,
    percent_can_retry: f64,
}

impl Default for RetryBudgetBuilder {
    fn default() -> Self {
        RetryBudgetBuilder {
            ttl: DEFAULT_TTL,
            min_retries_per_sec: DEFAULT_MIN_RETRIES_PER_SEC,
            percent_can_retry: DEFAULT_PERCENT_CAN_RETRY,
        }
    }
}

impl RetryBudgetBuilder {
    /// How long a deposit or withdrawal counts; 1 s to 60 s. Default [`DEFAULT_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The floor: this many retries per second are allowed whatever the traffic
    /// (`min_retries_per_sec * ttl` tokens at any time). 0 for no floor. Default
    /// [`DEFAULT_MIN_RETRIES_PER_SEC`].
    pub fn min_retries_per_sec(mut self, n: u32) -> Self {
        self.min_retries_per_sec = n;
        self
    }

    /// Tokens earned per call: `0.1` allows one retry per ten calls, `2.0` two
    /// retries per call. 0 to 1000. Default [`DEFAULT_PERCENT_CAN_RETRY`].
    pub fn percent_can_retry(mut self, ratio: f64) -> Self {
        self.percent_can_retry = ratio;
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<RetryBudget, ConfigError> {
        if self.ttl < Duration::from_secs(1) || self.ttl > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "ttl",
                format!("must be between 1s and 60s, got {:?}", self.ttl),
            ));
        }
        if !(0.0..=1000.0).contains(&self.percent_can_retry) {
            return Err(ConfigError::new(
                "percent_can_retry",
                format!("must be between 0 and 1000, got {}", self.percent_can_retry),
            ));
        }
        Ok(self.make())
    }

    fn make(self) -> RetryBudget {
        let slice_nanos = u64::try_from(self.ttl.as_nanos() / SLICES as u128)
            .unwrap_or(u64::MAX)
            .max(1);
        // min_per_sec * ttl tokens, computed in SCALE units from the ttl in nanos.
        let reserve = i128::from(self.min_retries_per_sec) * self.ttl.as_nanos() as i128 * SCALE
            / 1_000_000_000;
        let deposit_value = (self.percent_can_retry * SCALE as f64).round() as i128;
        RetryBudget {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                slice_nanos,
                ttl: self.ttl,
                min_retries_per_sec: self.min_retries_per_sec,
                percent_can_retry: self.percent_can_retry,
                reserve,
                deposit_value,
                deposits: Default::default(),
                withdrawals: Default::default(),
                withdraw_lock: Mutex::new(()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real threads hammer one budget. Every deposit must count and no two
    /// withdrawals may take the same token: successes + balance == tokens earned.
    /// (No runtime, so the clock is real; the window is 9+ s and the test takes
    /// milliseconds, so nothing expires.)
    #[test]
    fn concurrent_deposits_and_withdrawals_are_exact() {
        let b = RetryBudget::builder()
            .min_retries_per_sec(0)
            .percent_can_retry(0.1)
            .build()
            .unwrap();
        let taken = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        b.deposit();
                        if b.try_withdraw() {
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let taken = taken.load(Ordering::Relaxed);
        assert!(taken <= 8_000);
        assert_eq!(taken + b.balance(), 8_000);
    }

    /// A refund gives back exactly its own withdrawal, once, and only while that
    /// withdrawal still counts: an expired one cannot be turned into credit.
    #[tokio::test(start_paused = true)]
    async fn refund_gives_back_an_unsent_retry() {
        let b = RetryBudget::builder()
            .ttl(Duration::from_secs(10))
            .min_retries_per_sec(0)
            .percent_can_retry(0.5)
            .build()
            .unwrap();
        for _ in 0..4 {
            b.deposit();
        }
        assert_eq!(b.balance(), 2);
        let first = b.withdraw().unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        let second = b.withdraw().unwrap();
        assert_eq!(b.withdraw(), None);
        assert!(b.refund(first), "the older withdrawal, in an earlier slice");
        assert_eq!(b.balance(), 1);
        assert!(b.refund(second));
        assert_eq!(b.balance(), 2);

        // Two withdrawals in one slice: each refund gives back one.
        let (a, c) = (b.withdraw().unwrap(), b.withdraw().unwrap());
        assert_eq!(b.balance(), 0);
        assert!(b.refund(a));
        assert_eq!(b.balance(), 1);
        assert!(b.refund(c));
        assert_eq!(b.balance(), 2);

        // A withdrawal that has expired is not refundable, even while a newer one
        // (another request's) is still in the window.
        let old = b.withdraw().unwrap();
        tokio::time::advance(Duration::from_secs(8)).await;
        for _ in 0..4 {
            b.deposit();
        }
        let _live = b.withdraw().unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!b.refund(old));
    }
}
