//! Events: what the policies report to whoever listens.
//!
//! Every policy builder takes listeners (`.listener(..)`); a listener is any
//! `Fn(&Event) + Send + Sync`. Events are emitted on state changes and rejections,
//! never on the success path of a healthy call, so an idle listener list costs one
//! branch per call. The `prometheus` feature's
//! [`metrics`](crate) turn events into metric updates.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The state of a circuit breaker, as events and metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls flow and outcomes are recorded.
    Closed,
    /// Calls are rejected until the open duration has passed.
    Open,
    /// A limited number of probe calls decide between closing and re-opening.
    HalfOpen,
    /// After probes passed: a growing fraction of traffic is admitted.
    Ramping,
    /// Opened by hand: every call is rejected until a manual transition.
    ForcedOpen,
    /// Every call is admitted and nothing is recorded.
    Disabled,
    /// Every call is admitted; outcomes are recorded and reported, never acted on.
    MetricsOnly,
}

impl BreakerState {
    /// Stable lower-case name (`closed`, `open`, `half_open`, `ramping`,
    /// `forced_open`, `disabled`, `metrics_only`).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Ramping => "ramping",
            BreakerState::ForcedOpen => "forced_open",
            BreakerState::Disabled => "disabled",
            BreakerState::MetricsOnly => "metrics_only",
        }
    }

    /// Value of the `bulwark_circuit_breaker_state` gauge: 0 closed (and disabled,
    /// metrics-only), 1 half-open (and ramping), 2 open (and forced open).
    pub fn gauge_value(self) -> i64 {
        match self {
            BreakerState::Closed | BreakerState::Disabled | BreakerState::MetricsOnly => 0,
            BreakerState::HalfOpen | BreakerState::Ramping => 1,
            BreakerState::Open | BreakerState::ForcedOpen => 2,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something a policy did.
///
/// `name` is the policy instance's name from its builder (for keyed policies, the
/// bounded label: the key or `other`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A breaker changed state.
    BreakerTransition {
        /// Breaker name.
        name: Arc<str>,
        /// State before.
        from: BreakerState,
        /// State after.
        to: BreakerState,
    },
    /// A breaker rejected a call.
    BreakerRejected {
        /// Breaker name.
        name: Arc<str>,
    },
    /// A retry is about to sleep `delay` before attempt number `attempt` (2 = first retry).
    Retry {
        /// Retry policy name.
        name: Arc<str>,
        /// The attempt that will follow the delay, counting from 1.
        attempt: u32,
        /// The backoff delay.
        delay: Duration,
        /// Why: `failure`, or `retry_after` when the classifier gave a hint (the
        /// gateway reports `5xx`, `429`, `status`, `timeout`, `upstream_error`,
        /// `failover`).
        reason: &'static str,
    },
    /// A retry was wanted but the budget had no token.
    RetryBudgetExhausted {
        /// Retry policy name.
        name: Arc<str>,
    },
    /// A call gave up after its last allowed attempt (or elapsed-time limit).
    RetryExhausted {
        /// Retry policy name.
        name: Arc<str>,
        /// Attempts made.
        attempts: u32,
    },
    /// A timeout fired.
    Timeout {
        /// Policy name.
        name: Arc<str>,
        /// `attempt` for a per-attempt timeout, `total` for a whole-call deadline.
        kind: &'static str,
    },
    /// A bulkhead rejected a call.
    BulkheadRejected {
        /// Bulkhead name.
        name: Arc<str>,
    },
    /// A rate limiter rejected a call.
    RateLimited {
        /// Limiter name.
        name: Arc<str>,
    },
    /// A fallback produced the result.
    Fallback {
        /// Fallback name.
        name: Arc<str>,
        /// What triggered it: an [`Error::kind`](crate::Error::kind) value.
        kind: &'static str,
    },
    /// A hedged attempt was started.
    HedgeStarted {
        /// Hedge policy name.
        name: Arc<str>,
        /// Which hedge (1 = first extra attempt).
        hedge: u32,
    },
    /// A load shedder dropped a call.
    Shed {
        /// Shedder name.
        name: Arc<str>,
        /// The call's priority: `low`, `normal`, `high` or `critical`.
        priority: &'static str,
        /// Why: `queue_full`, `displaced` or `timeout`.
        reason: &'static str,
    },
    /// A health component changed status.
    HealthChanged {
        /// Component name.
        name: Arc<str>,
        /// New status: `healthy`, `degraded` or `unhealthy`.
        status: &'static str,
    },
}

/// Something that receives events.
pub trait Listener: Send + Sync + 'static {
    /// Called synchronously on the task that caused the event: keep it cheap. (A breaker
    /// transition decided while another caller delivers that breaker's transitions is
    /// delivered by that caller, right after the ones before it, so that they arrive in order.)
    fn on_event(&self, event: &Event);
}

impl<F> Listener for F
where
    F: Fn(&Event) + Send + Sync + 'static,
{
    fn on_event(&self, event: &Event) {
        self(event)
    }
}

/// A list of listeners, cheap to clone and to check for emptiness.
#[derive(Clone, Default)]
pub struct Listeners {
    inner: Option<Arc<[Arc<dyn Listener>]>>,
}

impl Listeners {
    /// No listeners.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a listener (builders call this; not meant for the hot path).
    pub fn push(&mut self, listener: Arc<dyn Listener>) {
        let mut v: Vec<Arc<dyn Listener>> = self.inner.as_deref().unwrap_or(&[]).to_vec();
        v.push(listener);
        self.inner = Some(v.into());
    }

    /// True when nobody listens.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// Sends `event` to every listener. The closure builds the event only when
    /// someone listens.
    #[inline]
    pub fn emit(&self, event: impl FnOnce() -> Event) {
        if let Some(list) = &self.inner {
            let e = event();
            for l in list.iter() {
                l.on_event(&e);
            }
        }
    }
}

impl fmt::Debug for Listeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listeners")
            .field("count", &self.inner.as_ref().map_or(0, |l| l.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn emit_reaches_every_listener_and_skips_work_when_empty() {
        let empty = Listeners::new();
        empty.emit(|| panic!("must not build an event nobody hears"));

        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut l = Listeners::new();
        for _ in 0..2 {
            let seen = seen.clone();
            l.push(Arc::new(move |e: &Event| {
                seen.lock().unwrap().push(e.clone())
            }));
        }
        l.emit(|| Event::BulkheadRejected { name: "b".into() });
        assert_eq!(seen.lock().unwrap().len(), 2);
    }
}
