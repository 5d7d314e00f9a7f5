//! The gateway's metrics: one Prometheus registry per process.
//!
//! Two sources feed it. The library's policies report events (breaker transitions, rejections) to
//! [`bulwark::metrics::Metrics`] through the listener [`Telemetry::events`] hands to every policy. The
//! proxy records each request itself, through a [`RouteStats`] per route that is resolved when the
//! [`Runtime`] is built, so a request costs a few atomic adds and no lock or
//! allocation: the counter for a status code is created once, the first time that code is seen, and
//! kept in a small fixed table; the latency histogram is a set of atomics ([`LatencyHistogram`]),
//! because `prometheus_client`'s own histogram takes a write lock per observation.
//!
//! Gauges that mirror state (`bulwark_endpoint_healthy`, `bulwark_circuit_breaker_state`,
//! `bulwark_upstream_panic`) are set from
//! the runtime when it is installed and refreshed on every scrape ([`Telemetry::refresh`]), so they
//! are exact whoever changed the state (a health check, the admin API, a reload) and cost nothing on
//! the request path.
//!
//! Label values come from config names only (route, upstream, endpoint URL) and the status code, so
//! the number of series is bounded by the config.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bulwark::events::{Event, Listener};
use bulwark::metrics::{Metrics, MetricsListener};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::proxy::Runtime;

/// Labels of `bulwark_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name.
    pub route: String,
    /// The route's primary upstream.
    pub upstream: String,
    /// Status code sent to the client.
    pub code: String,
}

/// Labels of `bulwark_request_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name.
    pub route: String,
    /// The route's primary upstream.
    pub upstream: String,
}

/// Labels of `bulwark_endpoint_healthy`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Upstream name.
    pub upstream: String,
    /// Endpoint URL as written in the config.
    pub endpoint: String,
}

/// Labels of `bulwark_upstream_panic`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Upstream name.
    pub upstream: String,
}

/// Labels of `bulwark_mode_refused_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ModeRefusedLabels {
    /// Route name.
    pub route: String,
    /// The mode that refused the request.
    pub mode: String,
}

/// Labels of `bulwark_faults_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FaultLabels {
    /// Route name.
    pub route: String,
    /// `delay` or `abort`.
    pub kind: String,
}

/// Labels of `bulwark_client_rate_limited_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteOnlyLabels {
    /// Route name.
    pub route: String,
}

/// Labels of `bulwark_config_reloads_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Labels of `bulwark_mode`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ModeLabels {
    /// A mode's name.
    pub mode: String,
}

/// Upper bounds (seconds) of the request-duration buckets: from sub-millisecond proxy answers to the
/// minute-long completions of LLM providers.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

const fn bucket_bounds_ns() -> [u64; 16] {
    let mut out = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = (DURATION_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
}

const BOUNDS_NS: [u64; 16] = bucket_bounds_ns();

#[derive(Debug, Default)]
struct HistogramInner {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; 17],
    sum_ns: AtomicU64,
}

/// A lock-free latency histogram with the fixed [`DURATION_BUCKETS`]: one observation is two relaxed
/// atomic adds. Cheap to clone; clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    inner: Arc<HistogramInner>,
}

impl LatencyHistogram {
    /// Records one duration.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0f64, 0u64); 17];
        for (i, b) in self.inner.buckets.iter().enumerate() {
            let bound = DURATION_BUCKETS.get(i).copied().unwrap_or(f64::MAX);
            buckets[i] = (bound, b.load(Ordering::Relaxed));
        }
        // The count is the buckets' sum, so `_count` always equals the `+Inf` bucket.
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<Vec<(String, String)>>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Status classes 1xx..9xx, each a lazily allocated table of 100 counters.
type StatusTable = [OnceLock<Box<[OnceLock<Counter>; 100]>>; 9];

/// Pre-resolved request metrics of one route: what the proxy touches per request.
#[derive(Debug)]
pub struct RouteStats {
    route: String,
    upstream: String,
    requests: Family<RequestLabels, Counter>,
    by_status: StatusTable,
    duration: LatencyHistogram,
    mode_refused: Family<ModeRefusedLabels, Counter>,
    by_mode: [OnceLock<Counter>; 4],
    faults: Family<FaultLabels, Counter>,
    by_fault: [OnceLock<Counter>; 2],
    client_limited_family: Family<RouteOnlyLabels, Counter>,
    client_limited: OnceLock<Counter>,
}

impl RouteStats {
    /// Records one answered request: its status code and its duration.
    #[inline]
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.counter(status).inc();
        self.duration.observe(elapsed);
    }

    fn counter(&self, status: u16) -> &Counter {
        // hyper's StatusCode is 100..=999; anything else is impossible but lands in 9xx's slot 99.
        let (class, rest) = match status {
            100..=999 => (usize::from(status / 100 - 1), usize::from(status % 100)),
            _ => (8, 99),
        };
        let table = self.by_status[class]
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        resolved(&table[rest], &self.requests, || RequestLabels {
            route: self.route.clone(),
            upstream: self.upstream.clone(),
            code: status.to_string(),
        })
    }

    /// Counts one request the operating mode `mode` refused.
    pub fn refused_by_mode(&self, mode: crate::config::Mode) {
        let labels = || ModeRefusedLabels {
            route: self.route.clone(),
            mode: mode.as_str().to_owned(),
        };
        resolved(&self.by_mode[mode.index()], &self.mode_refused, labels).inc();
    }

    /// Counts one request refused by the route's rate limit per client.
    pub fn client_rate_limited(&self) {
        self.client_limited_counter().inc();
    }

    fn client_limited_counter(&self) -> &Counter {
        let labels = || RouteOnlyLabels {
            route: self.route.clone(),
        };
        resolved(&self.client_limited, &self.client_limited_family, labels)
    }

    /// Counts one injected fault: `delay` or `abort`.
    pub fn fault(&self, kind: &'static str) {
        self.fault_counter(kind).inc();
    }

    fn fault_counter(&self, kind: &'static str) -> &Counter {
        let labels = || FaultLabels {
            route: self.route.clone(),
            kind: kind.to_owned(),
        };
        let cell = &self.by_fault[usize::from(kind == "abort")];
        resolved(cell, &self.faults, labels)
    }

    /// Creates at 0 the series of the route's own counters its config can move: the rate limit per
    /// client's and the fault kinds it injects.
    fn declare(&self, route: &crate::proxy::route::Route) {
        if route.client_limit.is_some() {
            self.client_limited_counter();
        }
        for kind in route.fault.iter().flat_map(|f| f.kinds()) {
            self.fault_counter(kind);
        }
    }

    /// The route name.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The upstream label (the route's primary upstream).
    pub fn upstream(&self) -> &str {
        &self.upstream
    }
}

/// The counter `cell` holds, resolved from `family` with `labels` the first time (so a series exists
/// only once it counted something, and later calls take no lock).
fn resolved<'a, L>(
    cell: &'a OnceLock<Counter>,
    family: &Family<L, Counter>,
    labels: impl FnOnce() -> L,
) -> &'a Counter
where
    L: Clone + std::hash::Hash + Eq,
{
    cell.get_or_init(|| family.get_or_create(&labels()).clone())
}

/// One open WebSocket tunnel in `bulwark_websocket_tunnels`, until dropped (also when the
/// tunnel's task is aborted at the drain timeout).
#[derive(Debug)]
pub struct OpenTunnel(Gauge);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One open client connection in `bulwark_connections_open`, until dropped.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The process's registry, the families it holds, and the event listener for the policies.
pub struct Telemetry {
    registry: Registry,
    library: Metrics,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, LatencyHistogram>,
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    upstream_panic: Family<UpstreamLabels, Gauge>,
    tunnels: Gauge,
    connections_open: Gauge,
    connections_accepted: Counter,
    upstream_pooled: Family<EndpointLabels, Gauge>,
    upstream_opened: Family<EndpointLabels, Counter>,
    mode: Family<ModeLabels, Gauge>,
    mode_refused: Family<ModeRefusedLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    client_limited: Family<RouteOnlyLabels, Counter>,
    admission_running: Gauge,
    admission_queued: Gauge,
    reloads: Family<ReloadLabels, Counter>,
    reload_ok: Gauge,
    listener: Arc<dyn Listener>,
    /// Gauge series set by the last refresh, so series of removed upstreams/endpoints can be dropped.
    live: Mutex<LiveSeries>,
}

#[derive(Debug, Default)]
struct LiveSeries {
    endpoints: HashSet<EndpointLabels>,
    upstreams: HashSet<UpstreamLabels>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// A fresh registry with every gateway and library family registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let library = Metrics::new();
        library.register(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteLabels, LatencyHistogram>::default();
        let endpoint_healthy = Family::<EndpointLabels, Gauge>::default();
        let upstream_panic = Family::<UpstreamLabels, Gauge>::default();
        let tunnels = Gauge::default();
        let connections_open = Gauge::default();
        let connections_accepted = Counter::default();
        let upstream_pooled = Family::<EndpointLabels, Gauge>::default();
        let upstream_opened = Family::<EndpointLabels, Counter>::default();
        let mode = Family::<ModeLabels, Gauge>::default();
        let mode_refused = Family::<ModeRefusedLabels, Counter>::default();
        let faults = Family::<FaultLabels, Counter>::default();
        let client_limited = Family::<RouteOnlyLabels, Counter>::default();
        let (admission_running, admission_queued) = (Gauge::default(), Gauge::default());
        let reloads = Family::<ReloadLabels, Counter>::default();
        let reload_ok = Gauge::default();
        reload_ok.set(1);
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&ReloadLabels { result });
        }
        registry.register(
            "bulwark_config_reloads",
            "Config reloads attempted (SIGHUP, a changed file, a retry of a failed one), by result",
            reloads.clone(),
        );
        registry.register(
            "bulwark_config_last_reload_successful",
            "Whether the last config reload attempted was applied (1) or refused (0); 1 before any",
            reload_ok.clone(),
        );
        registry.register(
            "bulwark_admission_running",
            "Requests holding an admission slot (0 without `admission`)",
            admission_running.clone(),
        );
        registry.register(
            "bulwark_admission_queued",
            "Requests waiting in the admission queue",
            admission_queued.clone(),
        );
        registry.register(
            "bulwark_client_rate_limited",
            "Requests refused by a route's rate limit per client",
            client_limited.clone(),
        );
        registry.register(
            "bulwark_faults",
            "Faults injected by routes' fault sections, by route and kind (delay, abort)",
            faults.clone(),
        );
        registry.register(
            "bulwark_mode",
            "The operating mode in force (1) and the others (0)",
            mode.clone(),
        );
        registry.register(
            "bulwark_mode_refused",
            "Requests the operating mode refused, by route and mode",
            mode_refused.clone(),
        );
        registry.register(
            "bulwark_websocket_tunnels",
            "WebSocket tunnels open (after their 101)",
            tunnels.clone(),
        );
        registry.register(
            "bulwark_connections_open",
            "Client connections open on the proxy listener (a TLS handshake under way included)",
            connections_open.clone(),
        );
        registry.register(
            "bulwark_connections_accepted",
            "Client connections accepted on the proxy listener",
            connections_accepted.clone(),
        );
        registry.register(
            "bulwark_upstream_connections_pooled",
            "Connections an endpoint's pool holds: idle HTTP/1.1 ones, open HTTP/2 ones",
            upstream_pooled.clone(),
        );
        registry.register(
            "bulwark_upstream_connections_opened",
            "Connections opened to an endpoint (from 0 when a reload rebuilds its upstream)",
            upstream_opened.clone(),
        );
        registry.register(
            "bulwark_requests",
            "Requests answered, by route, the route's primary upstream, and status code",
            requests.clone(),
        );
        registry.register(
            "bulwark_request_duration_seconds",
            "Time from receiving a request to sending its response head",
            duration.clone(),
        );
        registry.register(
            "bulwark_endpoint_healthy",
            "Whether an endpoint may receive traffic (1) or not (0)",
            endpoint_healthy.clone(),
        );
        registry.register(
            "bulwark_upstream_panic",
            "Whether an upstream is in panic mode (1: balancing over all its endpoints, ignoring health) or not (0)",
            upstream_panic.clone(),
        );
        let listener: Arc<dyn Listener> = Arc::new(GatewayListener {
            metrics: library.listener(),
        });
        Telemetry {
            registry,
            library,
            requests,
            duration,
            endpoint_healthy,
            upstream_panic,
            tunnels,
            connections_open,
            connections_accepted,
            upstream_pooled,
            upstream_opened,
            mode,
            mode_refused,
            faults,
            client_limited,
            admission_running,
            admission_queued,
            reloads,
            reload_ok,
            listener,
            live: Mutex::new(LiveSeries::default()),
        }
    }

    /// Sets `bulwark_mode`: 1 for `current`, 0 for the other modes.
    pub fn set_mode(&self, current: crate::config::Mode) {
        for m in crate::config::Mode::ALL {
            self.mode
                .get_or_create(&ModeLabels {
                    mode: m.as_str().to_owned(),
                })
                .set(i64::from(m == current));
        }
    }

    /// Counts one config reload attempted, applied (`ok`) or refused.
    pub fn config_reloaded(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
        self.reload_ok.set(i64::from(ok));
    }

    /// WebSocket tunnels open now.
    pub fn tunnels_open(&self) -> i64 {
        self.tunnels.get()
    }

    /// Counts one more open WebSocket tunnel, until the returned guard is dropped.
    pub fn tunnel_opened(&self) -> OpenTunnel {
        self.tunnels.inc();
        OpenTunnel(self.tunnels.clone())
    }

    /// Counts one client connection accepted, open until the returned guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections_accepted.inc();
        self.connections_open.inc();
        OpenConnection(self.connections_open.clone())
    }

    /// The listener every policy reports to (metrics, and a log line per breaker transition).
    pub fn events(&self) -> crate::policy::Events {
        Some(self.listener.clone())
    }

    /// The library's metric families.
    pub fn library(&self) -> &Metrics {
        &self.library
    }

    /// Resolves the per-request handles of one route (done when a runtime is built, never per request).
    pub fn route_stats(&self, route: &str, upstream: &str) -> RouteStats {
        let duration = self
            .duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
                upstream: upstream.to_owned(),
            })
            .clone();
        RouteStats {
            route: route.to_owned(),
            upstream: upstream.to_owned(),
            requests: self.requests.clone(),
            by_status: std::array::from_fn(|_| OnceLock::new()),
            duration,
            mode_refused: self.mode_refused.clone(),
            by_mode: std::array::from_fn(|_| OnceLock::new()),
            faults: self.faults.clone(),
            by_fault: std::array::from_fn(|_| OnceLock::new()),
            client_limited_family: self.client_limited.clone(),
            client_limited: OnceLock::new(),
        }
    }

    /// Creates at 0 the counter series that `runtime`'s config can move, so that each exists from
    /// the start (Prometheus's advice for label values known in advance: `rate()` and
    /// `increase()` then see a series' first event): per upstream, the rejections of the policies
    /// it has; per route, its timeouts, the retry reasons its conditions allow, its failovers, budget
    /// refusals, hedges, client rate limit and faults; the admission queue's sheds. Fallbacks and
    /// status codes are created when first counted.
    pub fn declare(&self, runtime: &Runtime) {
        use bulwark::events::Event;
        let lib = &self.library;
        for up in &runtime.upstreams {
            let name = up.name.clone();
            let p = &up.policies;
            if p.breaker().is_some() {
                lib.declare(&Event::BreakerRejected { name: name.clone() });
            }
            if p.bulkhead().is_some() {
                lib.declare(&Event::BulkheadRejected { name: name.clone() });
            }
            if p.rate_limiter().is_some() {
                lib.declare(&Event::RateLimited { name });
            }
        }
        for (route, stats) in runtime.routes.iter().zip(&runtime.stats) {
            let name = || route.name.clone();
            lib.declare(&Event::Timeout {
                name: name(),
                kind: "total",
            });
            if route.per_try_timeout.is_some() {
                lib.declare(&Event::Timeout {
                    name: name(),
                    kind: "attempt",
                });
            }
            let retries = (route.attempts > 1).then(|| route.retry_on.reasons());
            let failover = (route.chain.len() > 1).then_some("failover");
            for reason in retries.into_iter().flatten().chain(failover) {
                lib.declare(&Event::Retry {
                    name: name(),
                    attempt: 0,
                    delay: Duration::ZERO,
                    reason,
                });
            }
            if route.policies.budget().is_some() {
                lib.declare(&Event::RetryBudgetExhausted { name: name() });
            }
            if route.policies.hedge().is_some() {
                lib.declare(&Event::HedgeStarted {
                    name: name(),
                    hedge: 0,
                });
            }
            stats.declare(route);
        }
        if runtime.admission.is_some() {
            use bulwark::shed::{Priority, ShedReason};
            let name: Arc<str> = "admission".into();
            for reason in ShedReason::ALL {
                for priority in Priority::ALL {
                    lib.declare(&Event::Shed {
                        name: name.clone(),
                        priority: priority.as_str(),
                        reason: reason.as_str(),
                    });
                }
            }
        }
    }

    /// Sets the state gauges (endpoint health, breaker state, panic mode) from `runtime`, and drops the series of
    /// upstreams and endpoints it no longer has. Runs when a runtime is installed and on every scrape.
    pub fn refresh(&self, runtime: &Runtime) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh_locked(runtime, &mut live);
    }

    /// [`refresh`](Self::refresh), with the lock that serialises refreshes (and scrapes) held.
    fn refresh_locked(&self, runtime: &Runtime, live: &mut LiveSeries) {
        let (running, queued) = runtime.admission_counts();
        self.admission_running.set(running as i64);
        self.admission_queued.set(queued as i64);
        let mut endpoints = HashSet::new();
        // Every breaker's series is set again from the runtime below. Cleared first: a breaker of
        // an upstream a reload removed may still move (a request in flight on the old runtime)
        // and its transition event brings its series back; this drops it at the next scrape.
        self.library.breaker_state.clear();
        let mut upstreams = HashSet::new();
        for up in &runtime.upstreams {
            let labels = UpstreamLabels {
                upstream: up.name.to_string(),
            };
            self.upstream_panic
                .get_or_create(&labels)
                .set(i64::from(up.in_panic_mode()));
            upstreams.insert(labels);
            for ep in &up.endpoints {
                let labels = EndpointLabels {
                    upstream: up.name.to_string(),
                    endpoint: ep.url.clone(),
                };
                // As documented: whether it may receive traffic now (a quota cooldown too).
                self.endpoint_healthy
                    .get_or_create(&labels)
                    .set(i64::from(ep.is_available()));
                let pooled = i64::try_from(ep.pool.pooled()).unwrap_or(i64::MAX);
                self.upstream_pooled.get_or_create(&labels).set(pooled);
                self.upstream_opened
                    .get_or_create(&labels)
                    .inner()
                    .store(ep.pool.opened(), Ordering::Relaxed);
                endpoints.insert(labels);
            }
            if let Some(b) = up.policies.breaker() {
                self.library
                    .set_breaker_state(&up.name, super::health::breaker_state(b));
            }
        }
        for gone in live.endpoints.difference(&endpoints) {
            self.endpoint_healthy.remove(gone);
            self.upstream_pooled.remove(gone);
            self.upstream_opened.remove(gone);
        }
        for gone in live.upstreams.difference(&upstreams) {
            self.upstream_panic.remove(gone);
        }
        *live = LiveSeries {
            endpoints,
            upstreams,
        };
    }

    /// The registry in the Prometheus/OpenMetrics text format, state gauges refreshed from `runtime`.
    pub fn encode(&self, runtime: &Runtime) -> String {
        // Held to the end of the encoding, so that another scrape's refresh (which clears the
        // breaker gauges before setting them again) cannot show this one a half-set family.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh_locked(runtime, &mut live);
        let mut out = String::with_capacity(4096);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            out.push_str("# encoding failed\n");
        }
        out
    }
}

/// Feeds the metrics and logs the events an operator wants to see (state changes, not rejections).
struct GatewayListener {
    metrics: MetricsListener,
}

impl Listener for GatewayListener {
    fn on_event(&self, event: &Event) {
        self.metrics.on_event(event);
        match event {
            Event::BreakerTransition { name, from, to } => {
                tracing::warn!(upstream = %name, from = %from, to = %to, "circuit breaker transition");
            }
            Event::HealthChanged { name, status } => {
                tracing::info!(component = %name, status = %status, "health changed");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds_inclusive() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(500)); // exactly the first bound
        h.observe(Duration::from_micros(501));
        h.observe(Duration::from_secs(3600));
        let b = &h.inner.buckets;
        assert_eq!(b[0].load(Ordering::Relaxed), 1);
        assert_eq!(b[1].load(Ordering::Relaxed), 1);
        assert_eq!(b[16].load(Ordering::Relaxed), 1);
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn route_stats_count_per_status_and_encode() {
        let t = Telemetry::new();
        let s = t.route_stats("api", "primary");
        for _ in 0..3 {
            s.record(200, Duration::from_millis(2));
        }
        s.record(503, Duration::from_millis(2));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &t.registry).unwrap();
        assert!(
            out.contains(r#"bulwark_requests_total{route="api",upstream="primary",code="200"} 3"#),
            "{out}"
        );
        assert!(
            out.contains(r#"bulwark_requests_total{route="api",upstream="primary",code="503"} 1"#)
        );
        assert!(out.contains(
            r#"bulwark_request_duration_seconds_bucket{le="0.0025",route="api",upstream="primary"} 4"#
        ) || out.contains(
            r#"bulwark_request_duration_seconds_bucket{route="api",upstream="primary",le="0.0025"} 4"#
        ), "{out}");
        assert!(out.contains(
            r#"bulwark_request_duration_seconds_count{route="api",upstream="primary"} 4"#
        ));
    }
}
