//! The background checker: checks on an interval, thresholds, a watch of the report.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{run_one, CheckResult, ComponentHealth, HealthRegistry, HealthReport, HealthStatus};
use crate::events::{Event, Listener, Listeners};
use crate::ConfigError;

/// Time between two checks of a component by default: quick enough to notice an outage
/// within seconds, slow enough that checking is negligible load.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// Consecutive failures before a component is unhealthy (as in Envoy's example
/// configurations): one or two lost probes are noise.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;

/// Consecutive passes before an unhealthy component is healthy again: enough to
/// avoid flapping, few enough to recover within two intervals.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;

/// Longest accepted check interval (a year): longer ones would overflow the timer.
pub const MAX_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The detail of a component that has not been checked yet.
pub const PENDING_DETAIL: &str = "not checked yet";

/// Builds a [`HealthChecker`]. Start with [`HealthChecker::builder`].
pub struct HealthCheckerBuilder {
    registry: HealthRegistry,
    interval: Duration,
    timeout: Duration,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
    listeners: Listeners,
}

impl fmt::Debug for HealthCheckerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheckerBuilder")
            .field("registry", &self.registry)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("unhealthy_threshold", &self.unhealthy_threshold)
            .field("healthy_threshold", &self.healthy_threshold)
            .finish_non_exhaustive()
    }
}

impl HealthCheckerBuilder {
    /// Time between the starts of two checks of one component (default
    /// [`DEFAULT_INTERVAL`]). Each component is checked on its own timer: a check that
    /// takes longer delays that component's next one instead of overlapping it, and no
    /// other component's.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How long one check may take before it counts as a failure (default
    /// [`DEFAULT_TIMEOUT`](super::DEFAULT_TIMEOUT)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Consecutive failures that make a component unhealthy (default
    /// [`DEFAULT_UNHEALTHY_THRESHOLD`]).
    pub fn unhealthy_threshold(mut self, n: u32) -> Self {
        self.unhealthy_threshold = n;
        self
    }

    /// Consecutive passes that make an unhealthy component healthy again (default
    /// [`DEFAULT_HEALTHY_THRESHOLD`]).
    pub fn healthy_threshold(mut self, n: u32) -> Self {
        self.healthy_threshold = n;
        self
    }

    /// Adds a listener for [`Event::HealthChanged`].
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Validates the settings and starts checking on the current Tokio runtime.
    ///
    /// Fails on a zero interval, timeout or threshold, or when called outside a
    /// Tokio runtime.
    pub fn build(self) -> Result<HealthChecker, ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::new("interval", "must be greater than zero"));
        }
        // tokio's interval adds the period to an Instant without saturating: a
        // period near Duration::MAX would panic inside the checker's task.
        if self.interval > MAX_INTERVAL {
            return Err(ConfigError::new("interval", "must be at most a year"));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be greater than zero"));
        }
        if self.unhealthy_threshold == 0 {
            return Err(ConfigError::new(
                "unhealthy_threshold",
                "must be at least 1",
            ));
        }
        if self.healthy_threshold == 0 {
            return Err(ConfigError::new("healthy_threshold", "must be at least 1"));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ConfigError::new("build", "must be called within a Tokio runtime"))?;

        let now = SystemTime::now();
        let components: Vec<Component> = self
            .registry
            .checks
            .iter()
            .map(|c| Component {
                health: ComponentHealth {
                    name: c.name.clone(),
                    critical: c.critical,
                    status: HealthStatus::Unhealthy,
                    detail: Some(PENDING_DETAIL.to_owned()),
                    since: now,
                },
                checked: false,
                failures: 0,
                passes: 0,
            })
            .collect();
        let initial =
            HealthReport::from_components(components.iter().map(|c| c.health.clone()).collect());
        let (tx, rx) = watch::channel(initial);
        let task = Task {
            registry: self.registry,
            interval: self.interval,
            timeout: self.timeout,
            thresholds: Thresholds {
                unhealthy: self.unhealthy_threshold,
                healthy: self.healthy_threshold,
            },
            listeners: self.listeners,
            components,
            tx,
        };
        let handle = runtime.spawn(task.run());
        Ok(HealthChecker {
            rx,
            task: Some(handle),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Thresholds {
    unhealthy: u32,
    healthy: u32,
}

/// One component's status and its run of consecutive results.
struct Component {
    health: ComponentHealth,
    checked: bool,
    failures: u32,
    passes: u32,
}

impl Component {
    /// Applies one result; returns true when the status changed.
    ///
    /// - The first result is taken as it is (Envoy: at startup a single passing
    ///   check is enough), so a component is not reported down for
    ///   `healthy_threshold` intervals after a restart.
    /// - After that, `Unhealthy` results need `unhealthy` in a row to take a
    ///   healthy or degraded component down, and passing (healthy or degraded)
    ///   results need `healthy` in a row to bring an unhealthy one back.
    /// - Between healthy and degraded, the latest result applies at once: both
    ///   take traffic, so there is nothing to debounce.
    fn apply(&mut self, result: CheckResult, t: Thresholds) -> bool {
        let old = self.health.status;
        let first = !self.checked;
        self.checked = true;
        self.health.detail = result.detail;
        let new = if result.status == HealthStatus::Unhealthy {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
            if first || self.failures >= t.unhealthy {
                HealthStatus::Unhealthy
            } else {
                old
            }
        } else {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
            if old != HealthStatus::Unhealthy || first || self.passes >= t.healthy {
                result.status
            } else {
                old
            }
        };
        if new == old {
            return false;
        }
        self.health.status = new;
        self.health.since = SystemTime::now();
        true
    }
}

struct Task {
    registry: HealthRegistry,
    interval: Duration,
    timeout: Duration,
    thresholds: Thresholds,
    listeners: Listeners,
    components: Vec<Component>,
    tx: watch::Sender<HealthReport>,
}

impl Task {
    /// Checks each component on its own timer: one probe every `interval` (from the
    /// start of the last one; at once after a probe that took longer), so a probe that
    /// hangs until its timeout delays no other component's checks or verdicts.
    async fn run(mut self) {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let checks = std::mem::take(&mut self.registry.checks);
        let (interval, timeout) = (self.interval, self.timeout);
        let probe = |i: usize, at: Instant| {
            let c = &checks[i];
            async move {
                tokio::time::sleep_until(at).await;
                let started = Instant::now();
                (i, started, run_one(c, timeout).await)
            }
        };
        let now = Instant::now();
        let mut probes: FuturesUnordered<_> = (0..checks.len()).map(|i| probe(i, now)).collect();
        if probes.is_empty() {
            // Nothing to check: the (healthy) report is final.
            self.publish(true);
            return std::future::pending().await;
        }
        while let Some((i, started, result)) = probes.next().await {
            let c = &mut self.components[i];
            // A component's first result wakes subscribers even when it keeps the status it
            // started with (a failing one stays unhealthy): it is decided now.
            let first = !c.checked;
            let changed = c.apply(result, self.thresholds);
            if changed {
                let (name, status) = (c.health.name.clone(), c.health.status.as_str());
                self.listeners
                    .emit(|| Event::HealthChanged { name, status });
            }
            self.publish(changed || first);
            probes.push(probe(i, (started + interval).max(Instant::now())));
        }
    }

    /// Publishes the current report; subscribers are woken only with `wake` (the value
    /// always carries the latest details).
    fn publish(&self, wake: bool) {
        let report = HealthReport::from_components(
            self.components.iter().map(|c| c.health.clone()).collect(),
        );
        self.tx.send_if_modified(|current| {
            *current = report;
            wake
        });
    }
}

/// Runs a registry's checks in the background and keeps the current report.
///
/// Each component starts [`HealthStatus::Unhealthy`] with detail
/// [`PENDING_DETAIL`] until its first check (run at once) answers; see
/// [`HealthCheckerBuilder`] for the thresholds. The checking task stops when the
/// checker is dropped or [`shut down`](Self::shutdown); subscribers then see the
/// channel closed.
///
/// ```
/// use std::time::Duration;
/// use bulwark::health::{check_fn, CheckResult, Criticality, HealthChecker, HealthRegistry, HealthStatus};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let mut registry = HealthRegistry::new();
/// registry.register(check_fn("db", || async { CheckResult::healthy() }), Criticality::Critical).unwrap();
/// let checker = HealthChecker::builder(registry)
///     .interval(Duration::from_secs(5))
///     .build()
///     .unwrap();
///
/// let mut changes = checker.subscribe();
/// changes.wait_for(|r| r.status == HealthStatus::Healthy).await.unwrap();
/// assert_eq!(checker.status(), HealthStatus::Healthy);
/// checker.shutdown().await;
/// # }
/// ```
pub struct HealthChecker {
    rx: watch::Receiver<HealthReport>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChecker")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl HealthChecker {
    /// A builder that will check `registry`'s checks.
    pub fn builder(registry: HealthRegistry) -> HealthCheckerBuilder {
        HealthCheckerBuilder {
            registry,
            interval: DEFAULT_INTERVAL,
            timeout: super::DEFAULT_TIMEOUT,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            listeners: Listeners::new(),
        }
    }

    /// The current aggregate status (no waiting: reads the latest report).
    pub fn status(&self) -> HealthStatus {
        self.rx.borrow().status
    }

    /// A copy of the current report.
    pub fn report(&self) -> HealthReport {
        self.rx.borrow().clone()
    }

    /// A receiver woken whenever some component's status changes after this call;
    /// its value is always the latest report.
    pub fn subscribe(&self) -> watch::Receiver<HealthReport> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        rx
    }

    /// Stops the checking task without waiting for it (from a shared reference, for an
    /// owner that others may still hold); subscribers then see the channel closed.
    pub fn stop(&self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }

    /// Stops the checking task and waits until it is gone.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // The only error is the cancellation just asked for (or a panic in a
            // check, which has nowhere better to go).
            let _ = task.await;
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component() -> Component {
        Component {
            health: ComponentHealth {
                name: "c".into(),
                critical: true,
                status: HealthStatus::Unhealthy,
                detail: None,
                since: SystemTime::UNIX_EPOCH,
            },
            checked: false,
            failures: 0,
            passes: 0,
        }
    }

    const T: Thresholds = Thresholds {
        unhealthy: 3,
        healthy: 2,
    };

    #[test]
    fn first_result_applies_at_once_then_thresholds() {
        use HealthStatus::*;
        let mut c = component();
        assert!(c.apply(CheckResult::healthy(), T));
        assert_eq!(c.health.status, Healthy);
        for _ in 0..2 {
            assert!(!c.apply(CheckResult::unhealthy("x"), T));
            assert_eq!(c.health.status, Healthy);
        }
        assert!(c.apply(CheckResult::unhealthy("x"), T));
        assert_eq!(c.health.status, Unhealthy);
        assert!(!c.apply(CheckResult::degraded("slow"), T));
        assert!(c.apply(CheckResult::degraded("slow"), T));
        assert_eq!(c.health.status, Degraded);
        assert!(c.apply(CheckResult::healthy(), T));
        assert_eq!(c.health.status, Healthy);
    }

    #[test]
    fn a_pass_resets_the_failure_run() {
        let mut c = component();
        c.apply(CheckResult::healthy(), T);
        c.apply(CheckResult::unhealthy("x"), T);
        c.apply(CheckResult::unhealthy("x"), T);
        c.apply(CheckResult::healthy(), T);
        c.apply(CheckResult::unhealthy("x"), T);
        c.apply(CheckResult::unhealthy("x"), T);
        assert_eq!(c.health.status, HealthStatus::Healthy);
        assert_eq!(c.health.detail.as_deref(), Some("x"), "latest detail shown");
    }

    #[test]
    fn first_failure_keeps_it_unhealthy_without_a_change() {
        let mut c = component();
        assert!(!c.apply(CheckResult::unhealthy("down"), T));
        assert_eq!(c.health.status, HealthStatus::Unhealthy);
        assert!(!c.apply(CheckResult::healthy(), T));
        assert!(c.apply(CheckResult::healthy(), T));
    }
}
