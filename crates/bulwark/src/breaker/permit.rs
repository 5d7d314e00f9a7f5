//! Permits: the breaker's admission, for callers that cannot wrap a closure.

use std::fmt;
use std::sync::Arc;

use super::core::{Core, Inner, Kind};
use crate::Outcome;

/// Permission to make one call through a [`CircuitBreaker`](super::CircuitBreaker),
/// from [`try_acquire`](super::CircuitBreaker::try_acquire).
///
/// Report how the call went with [`record`](Permit::record) (or
/// [`success`](Permit::success) / [`failure`](Permit::failure)). The permit
/// measures the call's duration from the moment it was acquired, for slow-call
/// detection.
///
/// Dropping a permit without recording counts as [`Outcome::Ignore`]: nothing is
/// recorded, and a half-open probe permit is handed back at once so another
/// caller can probe. A permit that is leaked (`mem::forget`) or whose owner hangs
/// forever holds a probe slot only until the probe lease runs out
/// ([`CircuitBreakerBuilder::probe_lease`](super::CircuitBreakerBuilder::probe_lease)).
pub struct Permit {
    inner: Arc<Inner>,
    core: Core,
}

impl Permit {
    pub(crate) fn new(inner: Arc<Inner>, core: Core) -> Self {
        Permit { inner, core }
    }

    /// Records the call's outcome.
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.inner.record(&mut self.core, outcome);
    }

    /// Records a success.
    #[inline]
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// Records a failure.
    #[inline]
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }

    /// Measures the call's duration, for slow-call detection, from `start` instead of the
    /// moment the permit was acquired, when `start` is later: for a caller whose call first
    /// waited on something that is not the dependency's work (a proxy streaming its client's
    /// upload: a slow client is not a slow upstream). An earlier `start` is ignored.
    pub fn measure_from(&mut self, start: tokio::time::Instant) {
        if let Some(s) = &mut self.core.start {
            *s = (*s).max(start);
        }
    }

    /// True when this permit is one of the half-open probe calls, whose outcome
    /// decides between closing and re-opening.
    pub fn is_probe(&self) -> bool {
        matches!(self.core.kind, Kind::Probe { .. })
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        self.inner.release(&mut self.core);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &self.inner.name)
            .field("kind", &self.core.kind)
            .finish()
    }
}

/// A permit that borrows its breaker: what `call` / `call_with` use, so the
/// closure API costs no reference-count traffic.
pub(crate) struct Guard<'a> {
    pub(crate) inner: &'a Inner,
    pub(crate) core: Core,
}

impl Guard<'_> {
    #[inline]
    pub(crate) fn record(mut self, outcome: Outcome) {
        self.inner.record(&mut self.core, outcome);
    }
}

impl Drop for Guard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.inner.release(&mut self.core);
    }
}
