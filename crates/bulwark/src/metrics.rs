//! Prometheus metrics for the policies (feature `prometheus`).
//!
//! Metrics are fed by [events](crate::events): build one [`Metrics`], register it
//! in a `prometheus_client` [`Registry`], and pass [`Metrics::listener`] to every
//! policy builder. Names follow bulwark's stable set:
//!
//! | metric | labels | from |
//! |---|---|---|
//! | `bulwark_circuit_breaker_state` (gauge: 0 closed, 1 half-open, 2 open) | `upstream` | breaker transitions |
//! | `bulwark_circuit_breaker_transitions_total` | `upstream`, `from`, `to` | breaker transitions |
//! | `bulwark_circuit_breaker_rejected_total` | `upstream` | breaker rejections |
//! | `bulwark_retry_attempts_total` | `route`, `reason` | retries |
//! | `bulwark_retry_budget_exhausted_total` | `route` | retry budget |
//! | `bulwark_timeouts_total` | `route`, `kind` | timeouts |
//! | `bulwark_fallback_total` | `route`, `kind` | fallbacks |
//! | `bulwark_bulkhead_rejected_total` | `upstream` | bulkhead |
//! | `bulwark_rate_limited_total` | `name` | rate limiter |
//! | `bulwark_hedges_total` | `route` | hedging |
//! | `bulwark_shed_total` | `reason`, `priority` | load shedding |
//!
//! Label values are policy names (from configuration), never request data, so
//! the number of series stays bounded; keyed policies report their top keys and
//! an `other` bucket (a key that was once among the top keeps its series after
//! it leaves: see the keyed policies in the library guide). The `upstream`/`route`
//! label is the policy's `name`.
//!
//! ```
//! use prometheus_client::registry::Registry;
//! use bulwark::metrics::Metrics;
//!
//! let metrics = Metrics::new();
//! let mut registry = Registry::default();
//! metrics.register(&mut registry);
//! let listener = metrics.listener();
//! listener.on_event(&bulwark::Event::BulkheadRejected { name: "db".into() });
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains(r#"bulwark_bulkhead_rejected_total{upstream="db"} 1"#));
//! # use bulwark::Listener;
//! ```

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::events::{BreakerState, Event, Listener};

type Labels = Vec<(&'static str, String)>;

/// The metric families the library's events feed. Cheap to clone; clones share
/// the same series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `bulwark_circuit_breaker_state{upstream}`.
    pub breaker_state: Family<Labels, Gauge>,
    /// `bulwark_circuit_breaker_transitions_total{upstream,from,to}`.
    pub breaker_transitions: Family<Labels, Counter>,
    /// `bulwark_circuit_breaker_rejected_total{upstream}`.
    pub breaker_rejected: Family<Labels, Counter>,
    /// `bulwark_retry_attempts_total{route,reason}`.
    pub retry_attempts: Family<Labels, Counter>,
    /// `bulwark_retry_budget_exhausted_total{route}`.
    pub retry_budget_exhausted: Family<Labels, Counter>,
    /// `bulwark_timeouts_total{route,kind}`.
    pub timeouts: Family<Labels, Counter>,
    /// `bulwark_fallback_total{route,kind}`.
    pub fallback: Family<Labels, Counter>,
    /// `bulwark_bulkhead_rejected_total{upstream}`.
    pub bulkhead_rejected: Family<Labels, Counter>,
    /// `bulwark_rate_limited_total{name}`.
    pub rate_limited: Family<Labels, Counter>,
    /// `bulwark_hedges_total{route}`.
    pub hedges: Family<Labels, Counter>,
    /// `bulwark_shed_total{reason,priority}`.
    pub shed: Family<Labels, Counter>,
}

impl Metrics {
    /// Empty families, not yet registered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every family in `registry` under its stable name.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bulwark_circuit_breaker_state",
            "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            self.breaker_state.clone(),
        );
        registry.register(
            "bulwark_circuit_breaker_transitions",
            "Circuit breaker state transitions",
            self.breaker_transitions.clone(),
        );
        registry.register(
            "bulwark_circuit_breaker_rejected",
            "Calls rejected by an open circuit breaker",
            self.breaker_rejected.clone(),
        );
        registry.register(
            "bulwark_retry_attempts",
            "Retry attempts (not counting first attempts)",
            self.retry_attempts.clone(),
        );
        registry.register(
            "bulwark_retry_budget_exhausted",
            "Retries refused because the retry budget was empty",
            self.retry_budget_exhausted.clone(),
        );
        registry.register(
            "bulwark_timeouts",
            "Timeouts, by kind (attempt or total)",
            self.timeouts.clone(),
        );
        registry.register(
            "bulwark_fallback",
            "Responses produced by a fallback, by trigger",
            self.fallback.clone(),
        );
        registry.register(
            "bulwark_bulkhead_rejected",
            "Calls rejected by a full bulkhead",
            self.bulkhead_rejected.clone(),
        );
        registry.register(
            "bulwark_rate_limited",
            "Calls rejected by a rate limiter",
            self.rate_limited.clone(),
        );
        registry.register(
            "bulwark_hedges",
            "Hedged attempts started",
            self.hedges.clone(),
        );
        registry.register(
            "bulwark_shed",
            "Calls dropped by a load shedder, by reason and priority",
            self.shed.clone(),
        );
    }

    /// Sets the state gauge of breaker `name` (use at start-up, before any
    /// transition has been reported).
    pub fn set_breaker_state(&self, name: &str, state: BreakerState) {
        self.breaker_state
            .get_or_create(&vec![("upstream", name.to_owned())])
            .set(state.gauge_value());
    }

    /// A listener that turns events into metric updates.
    pub fn listener(&self) -> MetricsListener {
        MetricsListener {
            metrics: Arc::new(self.clone()),
        }
    }

    /// Applies one event.
    pub fn record(&self, event: &Event) {
        if let Event::BreakerTransition { name, to, .. } = event {
            self.breaker_state
                .get_or_create(&vec![("upstream", name.to_string())])
                .set(to.gauge_value());
        }
        if let Some(counter) = self.counter(event) {
            counter.inc();
        }
    }

    /// Creates, at 0, the counter series `event` would count into, without counting it: a
    /// series that exists from the start lets `rate()` and `increase()` see its first event
    /// (Prometheus's advice: export 0 for label values known in advance). Events that feed no
    /// counter are ignored.
    pub fn declare(&self, event: &Event) {
        let _ = self.counter(event);
    }

    /// The counter series `event` counts into (created at 0 if new), if it feeds one.
    fn counter(&self, event: &Event) -> Option<Counter> {
        let one = |name: &str, key: &'static str| vec![(key, name.to_owned())];
        let pair = |name: &str, key: &'static str, value: &str| {
            vec![("route", name.to_owned()), (key, value.to_owned())]
        };
        let counter = match event {
            Event::BreakerTransition { name, from, to } => {
                self.breaker_transitions.get_or_create(&vec![
                    ("upstream", name.to_string()),
                    ("from", from.as_str().to_owned()),
                    ("to", to.as_str().to_owned()),
                ])
            }
            Event::BreakerRejected { name } => {
                self.breaker_rejected.get_or_create(&one(name, "upstream"))
            }
            Event::Retry { name, reason, .. } => self
                .retry_attempts
                .get_or_create(&pair(name, "reason", reason)),
            Event::RetryBudgetExhausted { name } => self
                .retry_budget_exhausted
                .get_or_create(&one(name, "route")),
            Event::Timeout { name, kind } => self.timeouts.get_or_create(&pair(name, "kind", kind)),
            Event::Fallback { name, kind } => {
                self.fallback.get_or_create(&pair(name, "kind", kind))
            }
            Event::BulkheadRejected { name } => {
                self.bulkhead_rejected.get_or_create(&one(name, "upstream"))
            }
            Event::RateLimited { name } => self.rate_limited.get_or_create(&one(name, "name")),
            Event::Shed {
                reason, priority, ..
            } => self.shed.get_or_create(&vec![
                ("reason", (*reason).to_owned()),
                ("priority", (*priority).to_owned()),
            ]),
            Event::HedgeStarted { name, .. } => self.hedges.get_or_create(&one(name, "route")),
            _ => return None,
        };
        Some(counter.clone())
    }
}

/// The [`Listener`] returned by [`Metrics::listener`].
#[derive(Debug, Clone)]
pub struct MetricsListener {
    metrics: Arc<Metrics>,
}

impl Listener for MetricsListener {
    fn on_event(&self, event: &Event) {
        self.metrics.record(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn transitions_set_gauge_and_count() {
        let m = Metrics::new();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let l = m.listener();
        l.on_event(&Event::BreakerTransition {
            name: "primary".into(),
            from: BreakerState::Closed,
            to: BreakerState::Open,
        });
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(r#"bulwark_circuit_breaker_state{upstream="primary"} 2"#),
            "{out}"
        );
        assert!(
            out.contains(r#"bulwark_circuit_breaker_transitions_total{upstream="primary",from="closed",to="open"} 1"#),
            "{out}"
        );
    }

    #[test]
    fn shed_events_count_by_reason_and_priority() {
        let m = Metrics::new();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let l = m.listener();
        for _ in 0..2 {
            l.on_event(&Event::Shed {
                name: "admission".into(),
                priority: "low",
                reason: "queue_full",
            });
        }
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(r#"bulwark_shed_total{reason="queue_full",priority="low"} 2"#),
            "{out}"
        );
    }

    #[test]
    fn declared_series_start_at_zero_and_count_from_there() {
        let m = Metrics::new();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let rejected = Event::BreakerRejected {
            name: "primary".into(),
        };
        m.declare(&rejected);
        m.declare(&Event::Timeout {
            name: "api".into(),
            kind: "total",
        });
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(r#"bulwark_circuit_breaker_rejected_total{upstream="primary"} 0"#),
            "{out}"
        );
        assert!(
            out.contains(r#"bulwark_timeouts_total{route="api",kind="total"} 0"#),
            "{out}"
        );
        m.record(&rejected);
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(r#"bulwark_circuit_breaker_rejected_total{upstream="primary"} 1"#),
            "{out}"
        );
    }
}
