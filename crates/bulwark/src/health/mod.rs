//! Health checks: is a dependency (or this process) fit to take traffic?
//!
//! # Why
//!
//! A breaker learns that a dependency is down from the calls that fail on it; a
//! health check learns it without spending user requests, and also tells the
//! outside (a load balancer, an orchestrator, a dashboard) whether *this* service
//! should get traffic. Two things make checks trustworthy rather than noisy:
//!
//! - **Criticality.** A cache being down makes a service slower, not useless. A
//!   failing non-critical component makes the aggregate [`HealthStatus::Degraded`];
//!   only a failing critical one makes it [`HealthStatus::Unhealthy`].
//! - **Thresholds.** One lost probe is not an outage. Like Envoy's active health
//!   checking, the background [`HealthChecker`] needs `unhealthy_threshold`
//!   consecutive failures to mark a component unhealthy and `healthy_threshold`
//!   consecutive passes to bring it back, and a check that does not answer within
//!   its timeout counts as a failure.
//!
//! # How
//!
//! Implement [`HealthCheck`] (or wrap a closure with [`check_fn`]), register checks
//! in a [`HealthRegistry`], and either ask once ([`HealthRegistry::check_all`]) or
//! hand the registry to a [`HealthChecker`] that runs them every interval and keeps
//! the current [`HealthReport`] readable without awaiting. Built-in checks:
//! [`TcpCheck`] (can we connect?) and [`SystemCheck`] (load, memory, disk).
//!
//! ```
//! use bulwark::health::{check_fn, CheckResult, Criticality, HealthRegistry, HealthStatus};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut registry = HealthRegistry::new();
//! registry
//!     .register(check_fn("db", || async { CheckResult::healthy() }), Criticality::Critical)
//!     .unwrap();
//! registry
//!     .register(
//!         check_fn("cache", || async { CheckResult::unhealthy("connection refused") }),
//!         Criticality::NonCritical,
//!     )
//!     .unwrap();
//!
//! let report = registry.check_all().await;
//! // The cache is down, but it is not critical: degraded, not unhealthy.
//! assert_eq!(report.status, HealthStatus::Degraded);
//! assert_eq!(report.components[1].detail.as_deref(), Some("connection refused"));
//! assert!(report.to_json().starts_with(r#"{"status":"degraded","components":[{"name":"db""#));
//! # }
//! ```

mod checker;
mod system;
mod tcp;

pub use checker::{
    HealthChecker, HealthCheckerBuilder, DEFAULT_HEALTHY_THRESHOLD, DEFAULT_INTERVAL,
    DEFAULT_UNHEALTHY_THRESHOLD, MAX_INTERVAL, PENDING_DETAIL,
};
pub use system::{
    SystemCheck, SystemCheckBuilder, DEFAULT_DISK_DEGRADED, DEFAULT_DISK_UNHEALTHY,
    DEFAULT_LOAD_DEGRADED, DEFAULT_LOAD_UNHEALTHY, DEFAULT_MEMORY_DEGRADED,
    DEFAULT_MEMORY_UNHEALTHY, DEFAULT_SYSTEM_CHECK_NAME,
};
pub use tcp::{TcpCheck, DEFAULT_CONNECT_TIMEOUT};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ConfigError;

/// How long [`HealthRegistry::check_all`] lets a check run before counting it as
/// failed: a health endpoint that hangs on one dependency is worse than one that
/// reports it down.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The health of a component or of the whole. Ordered from best to worst, so the
/// aggregate of several is their maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthStatus {
    /// Fit for traffic.
    Healthy,
    /// Working, with reduced capacity or without a non-critical part.
    Degraded,
    /// Not fit for traffic.
    Unhealthy,
}

impl HealthStatus {
    /// Stable lower-case name: `healthy`, `degraded`, `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of running one check once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// What the check found.
    pub status: HealthStatus,
    /// Why, in words for a human (an error message, a measured value).
    pub detail: Option<String>,
}

impl CheckResult {
    /// Healthy, nothing to add.
    pub fn healthy() -> Self {
        CheckResult {
            status: HealthStatus::Healthy,
            detail: None,
        }
    }

    /// Degraded, because of `detail`.
    pub fn degraded(detail: impl Into<String>) -> Self {
        CheckResult {
            status: HealthStatus::Degraded,
            detail: Some(detail.into()),
        }
    }

    /// Unhealthy, because of `detail`.
    pub fn unhealthy(detail: impl Into<String>) -> Self {
        CheckResult {
            status: HealthStatus::Unhealthy,
            detail: Some(detail.into()),
        }
    }

    /// Replaces the detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// The future a [`HealthCheck`] returns. Boxed: checks run every few seconds, not per
/// request, and boxing keeps the trait object-safe without `async-trait`.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = CheckResult> + Send + 'a>>;

/// One thing whose health can be checked.
///
/// `check` should do one cheap probe and return; timeouts and thresholds are applied
/// by whoever runs it ([`HealthRegistry::check_all`], [`HealthChecker`]).
pub trait HealthCheck: Send + Sync {
    /// The component's name, as reported (keep it stable: it is a label).
    fn name(&self) -> &str;
    /// Probes the component once.
    fn check(&self) -> CheckFuture<'_>;
}

/// A [`HealthCheck`] made from a name and an async closure; see [`check_fn`].
pub struct FnCheck<F> {
    name: String,
    f: F,
}

impl<F> fmt::Debug for FnCheck<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCheck")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A check named `name` that runs `f()`.
pub fn check_fn<F, Fut>(name: impl Into<String>, f: F) -> FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = CheckResult> + Send + 'static,
{
    FnCheck {
        name: name.into(),
        f,
    }
}

impl<F, Fut> HealthCheck for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = CheckResult> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin((self.f)())
    }
}

/// Whether a component's failure fails the whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Criticality {
    /// Unhealthy component => unhealthy aggregate.
    Critical,
    /// Unhealthy component => at worst a degraded aggregate.
    NonCritical,
}

#[derive(Clone)]
struct Registered {
    name: Arc<str>,
    check: Arc<dyn HealthCheck>,
    critical: bool,
}

/// A set of named checks, each critical or not. Cheap to clone (the checks are
/// shared).
#[derive(Clone, Default)]
pub struct HealthRegistry {
    checks: Vec<Registered>,
}

impl fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.checks.iter().map(|c| (&*c.name, c.critical)))
            .finish()
    }
}

impl HealthRegistry {
    /// No checks (and a healthy aggregate).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check. Fails when the name is empty or already registered (names are
    /// labels and JSON keys: they must tell components apart).
    pub fn register(
        &mut self,
        check: impl HealthCheck + 'static,
        criticality: Criticality,
    ) -> Result<&mut Self, ConfigError> {
        self.register_arc(Arc::new(check), criticality)
    }

    /// Adds a shared check; see [`register`](Self::register).
    pub fn register_arc(
        &mut self,
        check: Arc<dyn HealthCheck>,
        criticality: Criticality,
    ) -> Result<&mut Self, ConfigError> {
        let name: Arc<str> = Arc::from(check.name());
        if name.is_empty() {
            return Err(ConfigError::new(
                "register",
                "a check's name must not be empty",
            ));
        }
        if self.checks.iter().any(|c| c.name == name) {
            return Err(ConfigError::new(
                "register",
                format!("a check named `{name}` is already registered"),
            ));
        }
        self.checks.push(Registered {
            name,
            check,
            critical: criticality == Criticality::Critical,
        });
        Ok(self)
    }

    /// How many checks are registered.
    pub fn len(&self) -> usize {
        self.checks.len()
    }

    /// True when no check is registered.
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Runs every check once, concurrently, each within [`DEFAULT_TIMEOUT`].
    pub async fn check_all(&self) -> HealthReport {
        self.check_all_within(DEFAULT_TIMEOUT).await
    }

    /// Runs every check once, concurrently; a check still running after `timeout`
    /// is unhealthy. No thresholds apply: this is one look, not a history.
    pub async fn check_all_within(&self, timeout: Duration) -> HealthReport {
        let results = run_all(&self.checks, timeout).await;
        let now = SystemTime::now();
        let components = self
            .checks
            .iter()
            .zip(results)
            .map(|(c, r)| ComponentHealth {
                name: c.name.clone(),
                critical: c.critical,
                status: r.status,
                detail: r.detail,
                since: now,
            })
            .collect();
        HealthReport::from_components(components)
    }
}

/// Runs `checks` concurrently, each within `timeout`. A check that panics is
/// reported unhealthy instead of taking the caller (or the background checker's
/// task) down with it, which would freeze the last report forever.
async fn run_all(checks: &[Registered], timeout: Duration) -> Vec<CheckResult> {
    futures_util::future::join_all(checks.iter().map(|c| run_one(c, timeout))).await
}

/// Runs one check within `timeout`; a panic is reported unhealthy (see [`run_all`]),
/// whether `check()` raises it while making its future or the future does.
async fn run_one(c: &Registered, timeout: Duration) -> CheckResult {
    use futures_util::FutureExt;
    let guarded = std::panic::AssertUnwindSafe(async { c.check.check().await }).catch_unwind();
    match tokio::time::timeout(timeout, guarded).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => CheckResult::unhealthy("check panicked"),
        Err(_) => CheckResult::unhealthy(format!("check timed out after {timeout:?}")),
    }
}

/// The health of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentHealth {
    /// The check's name.
    pub name: Arc<str>,
    /// Whether its failure fails the aggregate.
    pub critical: bool,
    /// Its status (after thresholds, when a [`HealthChecker`] reports it).
    pub status: HealthStatus,
    /// The latest check's detail.
    pub detail: Option<String>,
    /// When it entered `status` (wall-clock time, for humans and dashboards).
    pub since: SystemTime,
}

/// The health of everything registered, and of the whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The aggregate: the worst component status, where a non-critical component
    /// counts as at worst [`HealthStatus::Degraded`].
    pub status: HealthStatus,
    /// Every component, in registration order.
    pub components: Vec<ComponentHealth>,
}

impl HealthReport {
    /// A report of `components` with the aggregate status computed from them.
    pub fn from_components(components: Vec<ComponentHealth>) -> Self {
        let status = components
            .iter()
            .map(|c| match (c.critical, c.status) {
                (false, HealthStatus::Unhealthy) => HealthStatus::Degraded,
                (_, s) => s,
            })
            .max()
            .unwrap_or(HealthStatus::Healthy);
        HealthReport { status, components }
    }

    /// The component named `name`.
    pub fn component(&self, name: &str) -> Option<&ComponentHealth> {
        self.components.iter().find(|c| &*c.name == name)
    }

    /// The report as JSON (written by hand: this crate has no serde), for example
    /// `{"status":"healthy","components":[{"name":"db","status":"healthy",
    /// "critical":true,"detail":null,"since":"2025-01-02T03:04:05.678Z"}]}`.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(64 + 128 * self.components.len());
        out.push_str(r#"{"status":""#);
        out.push_str(self.status.as_str());
        out.push_str(r#"","components":["#);
        for (i, c) in self.components.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(r#"{"name":"#);
            push_json_str(&mut out, &c.name);
            out.push_str(r#","status":""#);
            out.push_str(c.status.as_str());
            out.push_str(r#"","critical":"#);
            out.push_str(if c.critical { "true" } else { "false" });
            out.push_str(r#","detail":"#);
            match &c.detail {
                Some(d) => push_json_str(&mut out, d),
                None => out.push_str("null"),
            }
            out.push_str(r#","since":""#);
            out.push_str(&rfc3339(c.since));
            out.push_str(r#""}"#);
        }
        out.push_str("]}");
        out
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `t` as an RFC 3339 UTC timestamp with milliseconds. Times before 1970 print as
/// the epoch (no health check ran then).
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(name: &str, critical: bool, status: HealthStatus) -> ComponentHealth {
        ComponentHealth {
            name: name.into(),
            critical,
            status,
            detail: None,
            since: UNIX_EPOCH,
        }
    }

    #[test]
    fn aggregate_by_criticality() {
        use HealthStatus::*;
        let agg = |cs: Vec<ComponentHealth>| HealthReport::from_components(cs).status;
        assert_eq!(agg(vec![]), Healthy);
        assert_eq!(agg(vec![comp("a", true, Healthy)]), Healthy);
        assert_eq!(
            agg(vec![comp("a", true, Healthy), comp("b", false, Unhealthy)]),
            Degraded
        );
        assert_eq!(
            agg(vec![comp("a", true, Unhealthy), comp("b", false, Healthy)]),
            Unhealthy
        );
        assert_eq!(
            agg(vec![comp("a", true, Degraded), comp("b", false, Healthy)]),
            Degraded
        );
        assert_eq!(
            agg(vec![
                comp("a", false, Degraded),
                comp("b", false, Unhealthy)
            ]),
            Degraded
        );
        assert!(Healthy < Degraded && Degraded < Unhealthy);
    }

    #[test]
    fn json_escapes_and_formats_time() {
        let mut c = comp("we\"ird\\", false, HealthStatus::Degraded);
        c.detail = Some("line1\nline2\u{1}".into());
        c.since = UNIX_EPOCH + Duration::from_millis(1_735_787_045_678);
        let r = HealthReport::from_components(vec![c, comp("db", true, HealthStatus::Healthy)]);
        assert_eq!(
            r.to_json(),
            concat!(
                r#"{"status":"degraded","components":["#,
                r#"{"name":"we\"ird\\","status":"degraded","critical":false,"#,
                r#""detail":"line1\nline2\u0001","since":"2025-01-02T03:04:05.678Z"},"#,
                r#"{"name":"db","status":"healthy","critical":true,"detail":null,"#,
                r#""since":"1970-01-01T00:00:00.000Z"}]}"#
            )
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
