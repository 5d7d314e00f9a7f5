//! `GET /health` and `GET /api/circuit-breakers`: what the runtime's state looks like from outside.
//!
//! # The aggregate status
//!
//! Each upstream is
//! - `unhealthy` when it cannot take traffic: its breaker is open (or forced open), or none of its
//!   endpoints is usable (usable = healthy, not ejected and not in a quota cooldown);
//! - `degraded` when it takes traffic with less than its full capacity or confidence: its breaker is
//!   half-open, or some (not all) of its endpoints are unusable;
//! - `healthy` otherwise.
//!
//! An upstream in panic mode (`"panic": true`) keeps the status this rule gives it: panic mode
//! sends traffic to unusable endpoints, it does not make them usable.
//!
//! The gateway as a whole is `unhealthy` when some route has no upstream in its chain (primary, then
//! failover) that can take traffic, because that route's clients get only errors (or its fallback);
//! `degraded` when every route can still be served but some upstream is degraded or unhealthy (a
//! failover is carrying the load, or capacity is reduced); `healthy` otherwise. `/health` answers 200
//! for `healthy` and `degraded`, 503 for `unhealthy`, so a load balancer in front of several gateways
//! can use it directly.

use bulwark::events::BreakerState;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::proxy::{BreakerCommand, Gateway, Runtime};
use crate::upstream::{Endpoint, Upstream};

/// What an endpoint looks like to `/health` and `bulwark_endpoint_healthy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EndpointHealth {
    /// Active health checks (if any) consider it healthy.
    pub healthy: bool,
    /// Passive outlier detection has ejected it.
    pub ejected: bool,
    /// A provider quota (429 with `Retry-After`, or another `cooldown.on` status) keeps it out.
    pub cooling_down: bool,
}

impl EndpointHealth {
    /// Whether it may receive traffic.
    pub fn usable(self) -> bool {
        self.healthy && !self.ejected && !self.cooling_down
    }
}

/// The one place endpoint health is read for reporting.
///
/// `healthy` is the active health check's verdict, `ejected` outlier detection's, `cooling_down`
/// the quota cooldown's.
pub fn endpoint_health(ep: &Endpoint) -> EndpointHealth {
    EndpointHealth {
        healthy: ep.is_healthy(),
        ejected: ep.is_ejected(),
        cooling_down: ep.in_cooldown(),
    }
}

/// Health of one upstream, or of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Everything as configured.
    Healthy,
    /// Serving, with reduced capacity or on failover.
    Degraded,
    /// Not serving (see the module docs for the exact rule).
    Unhealthy,
}

/// The breaker state as `/health` names it: `closed`, `open`, `half_open`, `forced_open` or
/// `disabled`. Ramping (after probes passed) reports as `half_open`, metrics-only as `disabled` (it
/// never rejects); an upstream without a breaker reports `disabled`.
pub fn health_breaker_name(state: Option<BreakerState>) -> &'static str {
    match state {
        Some(BreakerState::Closed) => "closed",
        Some(BreakerState::Open) => "open",
        Some(BreakerState::HalfOpen | BreakerState::Ramping) => "half_open",
        Some(BreakerState::ForcedOpen) => "forced_open",
        _ => "disabled",
    }
}

/// One endpoint in `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointReport {
    /// URL from the config.
    pub url: String,
    /// See [`EndpointHealth::healthy`].
    pub healthy: bool,
    /// See [`EndpointHealth::ejected`].
    pub ejected: bool,
    /// See [`EndpointHealth::cooling_down`].
    pub cooling_down: bool,
}

/// One upstream in `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamReport {
    /// This upstream's status.
    pub status: Status,
    /// Breaker state (see [`health_breaker_name`]).
    pub circuit_breaker: &'static str,
    /// Whether the upstream is in panic mode (see [`Upstream::in_panic_mode`]): serving over all
    /// endpoints of the tier in panic, usable or not. Does not change `status`, which still says how
    /// many endpoints are usable.
    pub panic: bool,
    /// Endpoints in priority order.
    pub endpoints: Vec<EndpointReport>,
}

/// The `/health` document.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// The aggregate status.
    pub status: Status,
    /// Upstreams in config order.
    pub upstreams: Ordered<UpstreamReport>,
    /// Routes that no upstream in their chain can serve right now.
    pub unavailable_routes: Vec<String>,
    /// Runtimes installed so far (1 at start, +1 per successful reload).
    pub config_generation: u64,
    /// The operating mode in force (`normal`, `maintenance`, `read_only`, `degraded`). It does not
    /// change `status`, which is about the upstreams.
    pub mode: crate::config::Mode,
}

/// A list of named entries serialised as a JSON object, in list order.
#[derive(Debug, Clone)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T: Serialize> Serialize for Ordered<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// A breaker's state as operators should read it: an open breaker whose open duration has run
/// out lets the next call through as a probe, so it is reported half-open (the library moves it
/// only when that call comes, and without traffic none comes: reported open, a load balancer
/// watching `/health` would keep the gateway out for ever).
pub fn breaker_state(b: &bulwark::breaker::CircuitBreaker) -> BreakerState {
    match b.state() {
        BreakerState::Open if b.snapshot().open_remaining == Some(std::time::Duration::ZERO) => {
            BreakerState::HalfOpen
        }
        s => s,
    }
}

fn upstream_report(up: &Upstream) -> UpstreamReport {
    let breaker = up.policies.breaker().map(breaker_state);
    let endpoints: Vec<(EndpointHealth, &Endpoint)> = up
        .endpoints
        .iter()
        .map(|e| (endpoint_health(e), &**e))
        .collect();
    let usable = endpoints.iter().filter(|(h, _)| h.usable()).count();
    let status = match breaker {
        Some(BreakerState::Open | BreakerState::ForcedOpen) => Status::Unhealthy,
        _ if usable == 0 => Status::Unhealthy,
        Some(BreakerState::HalfOpen | BreakerState::Ramping) => Status::Degraded,
        _ if usable < endpoints.len() => Status::Degraded,
        _ => Status::Healthy,
    };
    UpstreamReport {
        status,
        circuit_breaker: health_breaker_name(breaker),
        panic: up.in_panic_mode(),
        endpoints: endpoints
            .into_iter()
            .map(|(h, e)| EndpointReport {
                url: e.url.clone(),
                healthy: h.healthy,
                ejected: h.ejected,
                cooling_down: h.cooling_down,
            })
            .collect(),
    }
}

/// Builds the `/health` document of `runtime`.
pub fn health(runtime: &Runtime, generation: u64, mode: crate::config::Mode) -> HealthReport {
    let reports: Vec<UpstreamReport> = runtime
        .upstreams
        .iter()
        .map(|u| upstream_report(u))
        .collect();
    let unavailable_routes: Vec<String> = runtime
        .routes
        .iter()
        .filter(|r| {
            r.chain
                .iter()
                .all(|&u| reports[u].status == Status::Unhealthy)
        })
        .map(|r| r.name.to_string())
        .collect();
    let worst = reports
        .iter()
        .map(|r| r.status)
        .max()
        .unwrap_or(Status::Healthy);
    let status = if !unavailable_routes.is_empty() {
        Status::Unhealthy
    } else if worst > Status::Healthy {
        Status::Degraded
    } else {
        Status::Healthy
    };
    HealthReport {
        status,
        upstreams: Ordered(
            runtime
                .upstreams
                .iter()
                .zip(reports)
                .map(|(u, r)| (u.name.to_string(), r))
                .collect(),
        ),
        unavailable_routes,
        config_generation: generation,
        mode,
    }
}

/// A breaker's window in `/api/circuit-breakers`.
#[derive(Debug, Clone, Serialize)]
pub struct WindowReport {
    /// Calls in the window.
    pub calls: u64,
    /// Failed calls in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// Failure rate in percent (`null` with no calls).
    pub failure_rate: Option<f64>,
    /// Slow-call rate in percent (`null` with no calls).
    pub slow_call_rate: Option<f64>,
    /// A closed breaker with this window would open.
    pub would_open: bool,
}

/// One upstream's breaker in `/api/circuit-breakers`.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerReport {
    /// Whether the upstream has a breaker at all.
    pub configured: bool,
    /// The library's state name: `closed`, `open`, `half_open`, `ramping`, `forced_open`, `disabled`,
    /// `metrics_only` (`disabled` when not configured).
    pub state: &'static str,
    /// The admin override in force, if any (`forced_open` or `disabled`); kept across reloads.
    #[serde(rename = "override")]
    pub admin_override: Option<BreakerCommand>,
    /// The window's counts (absent when not configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowReport>,
    /// Consecutive trips since the breaker last closed.
    pub consecutive_trips: u32,
    /// Milliseconds until an open breaker lets a probe through.
    pub open_remaining_ms: Option<u64>,
}

/// The report of upstream `up`'s breaker.
pub fn breaker_report(gateway: &Gateway, up: &Upstream) -> BreakerReport {
    let admin_override = gateway.breaker_override(&up.name);
    match up.policies.breaker() {
        None => BreakerReport {
            configured: false,
            state: "disabled",
            admin_override,
            window: None,
            consecutive_trips: 0,
            open_remaining_ms: None,
        },
        Some(b) => {
            let s = b.snapshot();
            // As `/health` reads it (see [`breaker_state`]): the dashboard shows this one.
            let state = match s.state {
                BreakerState::Open if s.open_remaining == Some(std::time::Duration::ZERO) => {
                    BreakerState::HalfOpen
                }
                st => st,
            };
            BreakerReport {
                configured: true,
                state: state.as_str(),
                admin_override,
                window: Some(WindowReport {
                    calls: s.calls,
                    failures: s.failures,
                    slow_calls: s.slow_calls,
                    failure_rate: s.failure_rate(),
                    slow_call_rate: s.slow_call_rate(),
                    would_open: s.would_open,
                }),
                consecutive_trips: s.consecutive_trips,
                // Rounded up: 0 only once the breaker admits a probe (as `/health` then says
                // `half_open`), never with a fraction of a millisecond still to go.
                open_remaining_ms: s
                    .open_remaining
                    .map(|d| u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)),
            }
        }
    }
}

/// The `/api/circuit-breakers` document: `{"upstreams": {"<name>": BreakerReport}}`.
#[derive(Debug, Clone, Serialize)]
pub struct BreakersReport {
    /// Every upstream, in config order.
    pub upstreams: Ordered<BreakerReport>,
    /// Overrides kept in the store for upstreams that are not in the config (or have no breaker):
    /// applied if a reload brings them back, cleared with `closed`. Absent when there are none.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub kept_overrides: std::collections::BTreeMap<String, BreakerCommand>,
}

/// Builds the `/api/circuit-breakers` document.
pub fn breakers(gateway: &Gateway, runtime: &Runtime) -> BreakersReport {
    BreakersReport {
        upstreams: Ordered(
            runtime
                .upstreams
                .iter()
                .map(|u| (u.name.to_string(), breaker_report(gateway, u)))
                .collect(),
        ),
        kept_overrides: gateway.dormant_overrides(),
    }
}
