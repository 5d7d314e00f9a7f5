//! Upstreams: endpoints with their connection pools, a balancer over priority tiers, the upstream's
//! policies (see [`crate::policy`]), active health checks ([`health`]), passive outlier detection
//! and provider-quota cooldown (`outlier`), panic mode (`panic_threshold`, see
//! [`Upstream::in_panic_mode`]: too few available endpoints and the balancer ignores health and
//! ejection), and TLS to `https://` endpoints (`tls`: one client config per upstream, the handshake
//! done by each endpoint's pool at connect).

mod balance;
mod endpoint;
mod h1;
pub mod headers;
pub mod health;
mod outlier;
mod pool;
pub mod retry_after;
pub(crate) mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use balance::{Tried, MAX_ENDPOINTS};
pub use endpoint::Endpoint;
pub use pool::{Conn, FailKind, Pool, SendError, UpstreamBody};

use balance::Tier;
use outlier::{Cooldown, Outlier};
use tokio::time::Instant;

use crate::config::{self, Balance};
use crate::policy::UpstreamPolicies;

/// Whether an upstream's `status` is a server error: a 5xx, or a code above 599, which RFC 9110
/// (section 15) says to handle as one (our clients accept codes up to 999, as hyper's does).
pub fn server_error(status: u16) -> bool {
    status >= 500
}

/// One upstream at runtime.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config (metric label).
    pub name: Arc<str>,
    /// Endpoints sorted by priority tier (stable within a tier).
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Algorithm.
    pub balance: Balance,
    /// Speak HTTP/2 to the endpoints.
    pub http2: bool,
    /// Admission policies.
    pub policies: UpstreamPolicies,
    /// `request_headers`, when the section changes anything.
    pub request_headers: Option<Arc<headers::HeaderRules>>,
    tiers: Vec<Tier>,
    outlier: Option<Outlier>,
    cooldown: Option<Cooldown>,
    /// `panic_threshold` in percent, when panic mode is on (a configured 0 is `None`).
    panic_threshold: Option<f64>,
    /// Whether the last look at the available share found the upstream in panic (for the log
    /// lines on entering and leaving; the state itself is recomputed each time).
    panicking: AtomicBool,
    /// Running health checks; dropped (and stopped) with the upstream.
    health: Option<health::HealthTasks>,
    /// The files of the `tls` section (`ca`, `cert`, `key`) as read when this upstream was built
    /// (a reload that finds one changed rebuilds the upstream even though its section is the same).
    tls_files: Vec<Option<Vec<u8>>>,
}

/// What one attempt on an endpoint showed, for outlier detection and cooldown.
#[derive(Debug, Clone, Copy)]
pub enum Observed {
    /// A response arrived (its head) after `latency`, with its `Retry-After` if any.
    Response {
        /// Status code.
        status: u16,
        /// Time to the response head.
        latency: Duration,
        /// `Retry-After`, when the response carried one.
        retry_after: Option<Duration>,
    },
    /// No response: connect failure, reset or timeout.
    Failed,
    /// The attempt was dropped after `latency` without an answer (a hedge that lost, a client
    /// gone): the endpoint takes at least that long. Neither a success nor a failure.
    Cancelled {
        /// How long it had run.
        latency: Duration,
    },
}

/// The authority sent to an endpoint (`Host`, HTTP/2 `:authority`): as written in its URL, except
/// that an explicit `:443` on an `https://` URL is dropped (the scheme's default; `http://` URLs
/// are sent as written, as before TLS existed).
fn host_authority(url: &config::EndpointUrl) -> http::uri::Authority {
    if url.https && url.authority.port_u16() == Some(443) {
        if let Ok(a) = url.authority.host().parse() {
            return a;
        }
    }
    url.authority.clone()
}

impl Upstream {
    /// Builds an upstream from validated config. With health checks configured this starts them,
    /// so it must run within a Tokio runtime.
    pub fn new(
        name: &str,
        c: &config::Upstream,
        events: &crate::policy::Events,
    ) -> Result<Self, String> {
        let od = c.outlier_detection.as_ref().filter(|o| o.enabled);
        let mut eps: Vec<&config::Endpoint> = c.endpoints.iter().collect();
        eps.sort_by_key(|e| e.priority);
        let mut endpoints = Vec::with_capacity(eps.len());
        // One TLS client config for the whole upstream (roots parsed once), built only when some
        // endpoint is https://.
        let mut tls_config = None;
        for e in &eps {
            let url = config::check_url(&e.url)?;
            let addr = format!("{}:{}", url.authority.host(), url.port());
            let mut pool = Pool::new(
                addr,
                c.http2,
                c.pool.max_idle,
                c.pool.idle_timeout.get(),
                c.connect_timeout.get(),
            )
            .with_pings(c.pool.ping_interval.get(), c.pool.ping_timeout.get())
            .with_h2_windows(
                u32::try_from(c.pool.h2_stream_window.0).unwrap_or(u32::MAX >> 1),
                u32::try_from(c.pool.h2_connection_window.0).unwrap_or(u32::MAX >> 1),
            );
            if url.https {
                let cfg = match &tls_config {
                    Some(cfg) => Arc::clone(cfg),
                    None => {
                        let cfg = tls::client_config(c.tls.as_ref(), c.http2)
                            .map_err(|e| format!("tls.{}: {}", e.key, e.message))?;
                        tls_config = Some(Arc::clone(&cfg));
                        cfg
                    }
                };
                let name = c.tls.as_ref().and_then(|t| t.server_name.as_deref());
                let name = tls::server_name(name.unwrap_or(url.authority.host()))?;
                pool = pool.with_tls(cfg, name);
            }
            endpoints.push(Arc::new(Endpoint::new(
                e.url.clone(),
                host_authority(&url),
                e.priority,
                e.weight,
                pool,
                Outlier::window(od),
            )));
        }
        let mut tiers = Vec::new();
        let mut start = 0;
        while start < eps.len() {
            let p = eps[start].priority;
            let end = start + eps[start..].iter().take_while(|e| e.priority == p).count();
            let weights: Vec<u32> = eps[start..end].iter().map(|e| e.weight).collect();
            tiers.push(Tier::new(start, end, &weights));
            start = end;
        }
        let request_headers = headers::HeaderRules::new(&c.request_headers, headers::process_env)
            .map_err(|r| format!("request_headers.{}: {}", r.entry, r.reason))?
            .map(Arc::new);
        let health = match c.health_check.as_ref().filter(|h| h.enabled) {
            Some(h) => Some(health::start(
                h,
                &endpoints,
                c.http2,
                request_headers.as_ref(),
                od.is_some_and(|o| o.uneject_on_health_check),
            )?),
            None => None,
        };
        Ok(Upstream {
            name: name.into(),
            endpoints,
            balance: c.balance,
            http2: c.http2,
            policies: UpstreamPolicies::new(name, c, events)?,
            request_headers,
            tiers,
            outlier: od.map(Outlier::new),
            cooldown: c.cooldown.as_ref().filter(|c| c.enabled).map(Cooldown::new),
            panic_threshold: c.panic_threshold.filter(|&t| t > 0.0),
            panicking: AtomicBool::new(false),
            health,
            tls_files: tls::file_contents(c.tls.as_ref()),
        })
    }

    /// Whether the files `c`'s `tls` section names (`ca`, `cert`, `key`) still hold what this
    /// upstream was built with (a reload keeps the upstream only then). Reads them: called on
    /// reloads, never per request.
    pub fn same_tls_files(&self, c: &config::Upstream) -> bool {
        tls::file_contents(c.tls.as_ref()) == self.tls_files
    }

    /// The running health checker, when `health_check` is configured (its report names each
    /// endpoint by URL).
    pub fn health_checker(&self) -> Option<&bulwark::health::HealthChecker> {
        self.health.as_ref().map(health::HealthTasks::checker)
    }

    /// Whether a response with `status` may start a cooldown (so its `Retry-After` is worth reading).
    pub fn cools_down_on(&self, status: u16) -> bool {
        self.cooldown.as_ref().is_some_and(|c| c.applies(status))
    }

    /// Whether an answer of `status` with `retry_after` starts a cooldown: a listed status with a
    /// wait (a `Retry-After` of 0, or a date already past, starts none).
    pub fn starts_cooldown(&self, status: u16, retry_after: Option<Duration>) -> bool {
        asks_a_wait(retry_after) && self.cools_down_on(status)
    }

    /// Reports what an attempt on endpoint `i` showed: feeds outlier detection (5xx and failures
    /// without response count as failures; other responses as successes, except those that start a
    /// cooldown or are 429, which say nothing about the endpoint's health) and cooldown.
    pub fn observe(&self, i: usize, what: Observed) {
        match what {
            Observed::Failed => {
                if let Some(o) = &self.outlier {
                    o.failure(&self.endpoints, i, Instant::now());
                }
            }
            Observed::Cancelled { latency } => {
                if let Some(o) = &self.outlier {
                    o.latency_floor(&self.endpoints, i, latency, Instant::now());
                }
            }
            Observed::Response {
                status,
                latency,
                retry_after,
            } => {
                let quota = self.cools_down_on(status);
                if self.outlier.is_none() && !quota {
                    return;
                }
                let now = Instant::now();
                if let (true, Some(c), Some(ra)) = (quota, &self.cooldown, retry_after) {
                    c.start(&self.endpoints[i], ra, now);
                }
                // A response that starts a cooldown, or any 429, says nothing about the endpoint's
                // health; a listed status that starts none (no `Retry-After`, or no wait) counts as
                // a failure when it is a 5xx, and as nothing otherwise.
                let cools = quota && asks_a_wait(retry_after);
                if let Some(o) = self.outlier.as_ref().filter(|_| !cools && status != 429) {
                    if server_error(status) {
                        o.failure(&self.endpoints, i, now);
                    } else if !quota {
                        o.success(&self.endpoints, i, latency, now);
                    }
                }
            }
        }
    }

    /// When no endpoint is available only because every usable one is in cooldown: the time until
    /// the first cooldown ends (the client's `Retry-After`).
    ///
    /// In panic mode every endpoint of the tier in panic counts as usable here, as it does for [`pick`].
    ///
    /// [`pick`]: Upstream::pick
    pub fn cooldown_wait(&self) -> Option<Duration> {
        self.cooldown.as_ref()?;
        let now = Instant::now();
        let panic_tier = self.panic_tier().map_or(0..0, |t| t.start..t.end);
        let mut wait: Option<Duration> = None;
        for (i, e) in self.endpoints.iter().enumerate() {
            if !panic_tier.contains(&i) && !e.usable_ignoring_cooldown(now) {
                continue;
            }
            let r = e.cooldown_remaining()?; // a usable endpoint without cooldown: not this case
            wait = Some(wait.map_or(r, |w| w.min(r)));
        }
        wait
    }

    /// Whether the upstream is in panic mode right now (see [`Upstream::panic_tier`]).
    pub fn in_panic_mode(&self) -> bool {
        self.panic_tier().is_some()
    }

    /// The tier in panic, if any: `panic_threshold` is set, and the share of endpoints that are
    /// healthy and not ejected (a quota cooldown does not count against an endpoint) is below it
    /// in the tier in charge: the first tier with such an endpoint, or the first tier when none
    /// has one. As Envoy judges panic per priority level: a healthy backup tier takes the traffic
    /// of a dead primary one, and a dead backup tier does not put a healthy primary in panic. Logs
    /// the transitions (`warn` on entering, `info` on leaving) the first time it sees them,
    /// whoever asks (a request, `/health`, a metrics scrape).
    ///
    /// Reads one atomic per endpoint at most (and the clock only for endpoints with an ejection
    /// recorded): no lock, no allocation. Without a threshold it is one branch.
    fn panic_tier(&self) -> Option<&Tier> {
        let threshold = self.panic_threshold?;
        let eps = &self.endpoints;
        let mut tier = self.tiers.first()?;
        let mut up = 0;
        for t in &self.tiers {
            let n = (t.start..t.end).filter(|&i| eps[i].is_up()).count();
            if n > 0 {
                (tier, up) = (t, n);
                break;
            }
        }
        let total = tier.end - tier.start;
        let panic = (up as f64) * 100.0 < threshold * (total as f64);
        if self.panicking.load(Ordering::Relaxed) != panic
            && self.panicking.swap(panic, Ordering::Relaxed) != panic
        {
            if panic {
                tracing::warn!(
                    upstream = %self.name,
                    available = up,
                    endpoints = total,
                    threshold,
                    "upstream in panic mode: balancing over all endpoints of the tier, ignoring health checks and ejections"
                );
            } else {
                tracing::info!(
                    upstream = %self.name,
                    available = up,
                    endpoints = total,
                    threshold,
                    "upstream left panic mode"
                );
            }
        }
        panic.then_some(tier)
    }

    /// Picks an endpoint: from the first tier that has an available endpoint this request has not tried
    /// yet (so a retry goes elsewhere whenever it can, spilling to the next tier only when every
    /// available endpoint of the better tiers was tried); if all were tried, from the first tier with an
    /// available endpoint. `None`: no endpoint is available.
    ///
    /// In panic mode ([`Upstream::panic_tier`]) it picks among every endpoint of the tier in panic
    /// that is not in a quota cooldown, healthy or not, ejected or not (an untried one when it can);
    /// only when all of them are in cooldown does it fall back to the normal pick.
    pub fn pick(&self, tried: Tried) -> Option<usize> {
        let eps = &self.endpoints;
        if let Some(tier) = self.panic_tier() {
            let free = |i: usize| !eps[i].cooling_down();
            let picked = balance::pick(self.balance, tier, eps, |i| free(i) && !tried.contains(i))
                .or_else(|| balance::pick(self.balance, tier, eps, free));
            if picked.is_some() {
                return picked;
            }
        }
        let mut fallback_tier = None;
        for tier in &self.tiers {
            if !(tier.start..tier.end).any(|i| eps[i].is_available()) {
                continue;
            }
            fallback_tier.get_or_insert(tier);
            if let Some(i) = balance::pick(self.balance, tier, eps, |i| {
                eps[i].is_available() && !tried.contains(i)
            }) {
                return Some(i);
            }
        }
        balance::pick(self.balance, fallback_tier?, eps, |i| eps[i].is_available())
    }

    /// An endpoint for a hedge of a request that tried `tried`: an available one it has not tried,
    /// in the tier that takes traffic now (the tier in panic, in panic mode). Unlike a retry's
    /// [`pick`](Self::pick), never one of a lower-priority tier: a hedge races an attempt that has
    /// not failed, and a tier takes traffic only when the ones above have no endpoint available.
    pub fn pick_hedge(&self, tried: Tried) -> Option<usize> {
        let eps = &self.endpoints;
        let untried = |i: usize| !tried.contains(i);
        if let Some(tier) = self.panic_tier() {
            let free = |i: usize| !eps[i].cooling_down();
            if (tier.start..tier.end).any(free) {
                return balance::pick(self.balance, tier, eps, |i| free(i) && untried(i));
            }
        }
        let available = |i: usize| eps[i].is_available();
        let tier = self
            .tiers
            .iter()
            .find(|t| (t.start..t.end).any(available))?;
        balance::pick(self.balance, tier, eps, |i| available(i) && untried(i))
    }

    /// Whether a pick for a request that tried `tried` could find an endpoint it has not tried: if
    /// not, its retry goes back to one it tried (perhaps the one that asked it to wait).
    pub fn has_untried(&self, tried: Tried) -> bool {
        let eps = &self.endpoints;
        // As `pick`: in panic mode it stays in the panic tier while that has a free endpoint.
        if let Some(tier) = self.panic_tier() {
            let free = |i: usize| !eps[i].cooling_down();
            if (tier.start..tier.end).any(free) {
                return (tier.start..tier.end).any(|i| free(i) && !tried.contains(i));
            }
        }
        (0..eps.len()).any(|i| eps[i].is_available() && !tried.contains(i))
    }

    /// Drops expired idle connections of every endpoint.
    pub fn reap_idle(&self) {
        for e in &self.endpoints {
            e.pool.reap();
        }
    }

    /// A reload removed or rebuilt this upstream: its health checks stop and its idle connections
    /// close now, not when the last request still holding the old runtime ends (a long request
    /// on any route would otherwise keep every retired upstream probing, and each reload under
    /// such traffic would add one more generation of checkers and connections).
    pub fn retire(&self) {
        if let Some(h) = &self.health {
            h.stop();
        }
        for e in &self.endpoints {
            e.pool.retire();
        }
    }
}

/// Whether a `Retry-After` asks for a wait (what a cooldown needs; 0 or a past date does not).
fn asks_a_wait(retry_after: Option<Duration>) -> bool {
    retry_after.is_some_and(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn upstream(n: usize, od: Option<config::OutlierDetection>, cd: bool) -> Upstream {
        let c = config::Upstream {
            outlier_detection: od,
            cooldown: cd.then(Default::default),
            ..upstream_config(n)
        };
        Upstream::new("u", &c, &None).unwrap()
    }

    fn upstream_config(n: usize) -> config::Upstream {
        config::Upstream {
            endpoints: (0..n)
                .map(|i| config::Endpoint {
                    url: format!("http://127.0.0.1:{}", 1000 + i),
                    weight: 1,
                    priority: 0,
                })
                .collect(),
            balance: config::Balance::RoundRobin,
            http2: false,
            connect_timeout: config::DEFAULT_CONNECT_TIMEOUT,
            pool: Default::default(),
            health_check: None,
            outlier_detection: None,
            cooldown: None,
            panic_threshold: None,
            circuit_breaker: None,
            bulkhead: None,
            rate_limit: None,
            tls: None,
            request_headers: Default::default(),
        }
    }

    fn od() -> config::OutlierDetection {
        config::OutlierDetection {
            consecutive_failures: 3,
            ejection_time: Dur::from_secs(10),
            max_ejection_time: Dur::from_secs(25),
            max_ejection_percent: 50,
            ..Default::default()
        }
    }

    fn fail(u: &Upstream, i: usize, n: usize) {
        for _ in 0..n {
            u.observe(i, Observed::Failed);
        }
    }

    fn ok(u: &Upstream, i: usize, ms: u64) {
        u.observe(
            i,
            Observed::Response {
                status: 200,
                latency: Duration::from_millis(ms),
                retry_after: None,
            },
        );
    }

    /// Every balancer honours weights: with weights 3 and 1 and nothing to tell the endpoints
    /// apart (no load, no latency yet), the heavier one gets three picks in four.
    #[tokio::test]
    async fn every_balancer_draws_in_proportion_to_weights() {
        for balance in [
            config::Balance::RoundRobin,
            config::Balance::Weighted,
            config::Balance::Random,
            config::Balance::LeastRequest,
            config::Balance::PeakEwma,
        ] {
            let mut c = config::Upstream {
                balance,
                ..upstream_config(2)
            };
            c.endpoints[0].weight = 3;
            let u = Upstream::new("u", &c, &None).unwrap();
            let heavy = (0..4000)
                .filter(|_| u.pick(Tried::default()) == Some(0))
                .count();
            // Expected 3000; sigma ~27 for the random draws. `peak_ewma` divides its cost (at
            // least one unit per request) by the weight, as tower's `Weighted` load does: with
            // nothing in flight, the heavier one is cheaper whenever it is a candidate.
            let want = match balance {
                config::Balance::PeakEwma => 2850..=4000,
                _ => 2850..=3150,
            };
            assert!(want.contains(&heavy), "{balance:?}: {heavy}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_growing_capped_times() {
        let u = upstream(2, Some(od()), false);
        let e = &u.endpoints[0];
        fail(&u, 0, 2);
        ok(&u, 0, 1); // a success resets the run of failures
        fail(&u, 0, 2);
        assert!(!e.is_ejected());
        fail(&u, 0, 1);
        assert!(e.is_ejected() && !e.is_available());
        assert_eq!(e.ejection_remaining(), Some(Duration::from_secs(10)));
        assert_eq!(
            u.pick(Tried::default()),
            Some(1),
            "traffic moves to the other"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!e.is_ejected() && e.is_available(), "ejection ends by time");
        fail(&u, 0, 3);
        assert_eq!(e.ejection_remaining(), Some(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(20)).await;
        fail(&u, 0, 3);
        assert_eq!(
            e.ejection_remaining(),
            Some(Duration::from_secs(25)),
            "30 s capped at max_ejection_time"
        );
        assert_eq!(e.ejection_count(), 3);
        // Staying in for max_ejection_time starts a new run.
        tokio::time::advance(Duration::from_secs(25 + 25)).await;
        fail(&u, 0, 3);
        assert_eq!(e.ejection_remaining(), Some(Duration::from_secs(10)));
        assert_eq!(e.ejection_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_caps_ejections() {
        let u = upstream(5, Some(od()), false);
        for i in 0..5 {
            fail(&u, i, 3);
        }
        let ejected = u.endpoints.iter().filter(|e| e.is_ejected()).count();
        assert_eq!(ejected, 2, "floor(5 x 50%)");
        // The capped ones are ejected once a slot frees.
        tokio::time::advance(Duration::from_secs(10)).await;
        fail(&u, 4, 1);
        assert!(u.endpoints[4].is_ejected());
        // A single endpoint is never ejected.
        let one = upstream(1, Some(od()), false);
        fail(&one, 0, 10);
        assert!(!one.endpoints[0].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn status_classes_feed_outlier_detection() {
        let u = upstream(2, Some(od()), true);
        let resp = |status| Observed::Response {
            status,
            latency: Duration::from_millis(1),
            retry_after: None,
        };
        fail(&u, 0, 2);
        u.observe(0, resp(429)); // quota: neither failure nor success
        u.observe(0, resp(404)); // a success for the endpoint's health
        fail(&u, 0, 2);
        assert!(!u.endpoints[0].is_ejected());
        u.observe(0, resp(503));
        assert!(u.endpoints[0].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn latency_outlier_is_ejected_against_peers_median() {
        let mut c = od();
        c.latency_multiple = Some(3.0);
        c.latency_min_samples = 32;
        let u = upstream(4, Some(c), false);
        // Three peers at 10, 12, 14 ms (median p99 12 ms); endpoint 3 at 30 ms: under 3x.
        for _ in 0..32 {
            for (i, ms) in [(0, 10), (1, 12), (2, 14), (3, 30)] {
                ok(&u, i, ms);
            }
        }
        assert!(u.endpoints.iter().all(|e| !e.is_ejected()));
        // Endpoint 3 slows to 40 ms: over 3 x 12 ms once its window's p99 shows it.
        for _ in 0..REFRESH {
            ok(&u, 3, 40);
        }
        assert!(u.endpoints[3].is_ejected());
        assert_eq!(
            u.endpoints[3].ejection_remaining(),
            Some(Duration::from_secs(10))
        );
        assert!(u.endpoints[..3].iter().all(|e| !e.is_ejected()));
    }
    const REFRESH: u64 = bulwark::latency::REFRESH_EVERY;

    /// An endpoint whose every attempt a hedge beats is judged again after a verdict that spared
    /// it, although its later floors (below its own p99) add no sample: its peers got faster.
    #[tokio::test(start_paused = true)]
    async fn hedge_floors_below_the_p99_still_bring_the_next_judgement() {
        let mut c = od();
        c.latency_multiple = Some(3.0);
        c.latency_min_samples = REFRESH;
        let u = upstream(3, Some(c), false);
        let floor = |u: &Upstream, ms| {
            u.observe(
                2,
                Observed::Cancelled {
                    latency: Duration::from_millis(ms),
                },
            )
        };
        // Peers at 20 ms (say, cold connections); endpoint 2's floors at 50 ms: under 3x.
        for _ in 0..REFRESH {
            ok(&u, 0, 20);
            ok(&u, 1, 20);
            floor(&u, 50);
        }
        assert!(!u.endpoints[2].is_ejected());
        // The peers' windows fill with 1 ms answers; endpoint 2's floors stay at 40-49 ms.
        let cap = u.endpoints[0].latency.as_ref().unwrap().capacity();
        for _ in 0..cap {
            ok(&u, 0, 1);
            ok(&u, 1, 1);
        }
        for n in 0..REFRESH {
            floor(&u, 40 + n % 10);
        }
        assert!(
            u.endpoints[2].is_ejected(),
            "a 50 ms endpoint against 1 ms peers"
        );
    }

    #[test]
    fn host_carries_the_port_unless_it_is_https_default() {
        let host = |url: &str| host_authority(&config::check_url(url).unwrap()).to_string();
        assert_eq!(host("https://api.example.com"), "api.example.com");
        assert_eq!(host("https://api.example.com:443"), "api.example.com");
        assert_eq!(host("https://api.example.com:8443"), "api.example.com:8443");
        assert_eq!(host("https://[::1]:443"), "[::1]");
        // http:// URLs are sent as written, as they always were.
        assert_eq!(host("http://127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(host("http://backend"), "backend");
        assert_eq!(config::check_url("https://h").unwrap().port(), 443);
        assert_eq!(config::check_url("http://h").unwrap().port(), 80);
    }

    #[tokio::test]
    async fn health_check_tasks_stop_when_the_upstream_is_dropped() {
        let mut c = config::Upstream {
            health_check: Some(config::HealthCheck {
                interval: Dur::from_millis(10),
                ..Default::default()
            }),
            ..upstream_config(1)
        };
        c.endpoints[0].url = "http://127.0.0.1:1".into();
        let u = Upstream::new("u", &c, &None).unwrap();
        let ep = u.endpoints[0].clone();
        // Nothing listens on port 1: the first probe's failure takes the endpoint out.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ep.is_healthy() {
            assert!(Instant::now() < deadline, "never marked unhealthy");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            Arc::strong_count(&ep) > 2,
            "the check and its applier hold it"
        );
        drop(u);
        // Both tasks are aborted: nothing but this test holds the endpoint any more.
        while Arc::strong_count(&ep) > 1 {
            assert!(Instant::now() < deadline, "health tasks still running");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cooldown_is_separate_and_reports_the_wait() {
        let u = upstream(2, None, true);
        let quota = |ra| Observed::Response {
            status: 429,
            latency: Duration::from_millis(1),
            retry_after: ra,
        };
        u.observe(0, quota(None));
        assert!(!u.endpoints[0].in_cooldown(), "no Retry-After, no cooldown");
        u.observe(0, quota(Some(Duration::from_secs(3))));
        assert!(u.endpoints[0].in_cooldown() && !u.endpoints[0].is_ejected());
        assert_eq!(u.pick(Tried::default()), Some(1));
        assert_eq!(u.cooldown_wait(), None, "endpoint 1 still takes traffic");
        u.observe(1, quota(Some(Duration::from_secs(1_000))));
        assert_eq!(
            u.endpoints[1].cooldown_remaining(),
            Some(config::DEFAULT_COOLDOWN_MAX.get()),
            "capped"
        );
        assert_eq!(u.pick(Tried::default()), None);
        assert_eq!(u.cooldown_wait(), Some(Duration::from_secs(3)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(u.pick(Tried::default()), Some(0));
        // Without a cooldown section, a 429 changes nothing.
        let plain = upstream(1, None, false);
        plain.observe(0, quota(Some(Duration::from_secs(3))));
        assert!(plain.endpoints[0].is_available());
    }

    fn panicky(n: usize, threshold: Option<f64>, od: Option<config::OutlierDetection>) -> Upstream {
        let c = config::Upstream {
            panic_threshold: threshold,
            outlier_detection: od,
            cooldown: Some(Default::default()),
            ..upstream_config(n)
        };
        Upstream::new("u", &c, &None).unwrap()
    }

    /// Endpoints of `n` picks (first attempts), counted per endpoint index.
    fn spread(u: &Upstream, n: usize) -> Vec<usize> {
        let mut hits = vec![0; u.endpoints.len()];
        for _ in 0..n {
            hits[u.pick(Tried::default()).expect("an endpoint")] += 1;
        }
        hits
    }

    #[tokio::test(start_paused = true)]
    async fn panic_mode_is_off_without_a_threshold_or_at_zero() {
        for t in [None, Some(0.0)] {
            let u = panicky(3, t, None);
            for e in &u.endpoints {
                e.set_healthy(false);
            }
            assert!(!u.in_panic_mode());
            assert_eq!(u.pick(Tried::default()), None, "{t:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn panic_mode_spreads_over_all_endpoints_below_the_threshold() {
        let u = panicky(3, Some(50.0), None);
        assert!(!u.in_panic_mode());
        for e in &u.endpoints {
            e.set_healthy(false);
        }
        assert!(u.in_panic_mode());
        assert_eq!(spread(&u, 6), [2, 2, 2]);
        // Health back on two of three (67% >= 50%): normal balancing over those two.
        u.endpoints[0].set_healthy(true);
        u.endpoints[1].set_healthy(true);
        assert!(!u.in_panic_mode());
        let hits = spread(&u, 6);
        assert!(hits[0] > 0 && hits[1] > 0 && hits[2] == 0, "{hits:?}");

        // 1 of 4 available (25%): in panic at 50%, not at 20%.
        for (t, panic, want) in [(50.0, true, [2, 2, 2, 2]), (20.0, false, [0, 0, 0, 8])] {
            let u = panicky(4, Some(t), None);
            for e in &u.endpoints[..3] {
                e.set_healthy(false);
            }
            assert_eq!(u.in_panic_mode(), panic, "{t}");
            assert_eq!(spread(&u, 8), want, "{t}");
        }
        // Exactly at the threshold (2 of 4 = 50%) is not below it.
        let u = panicky(4, Some(50.0), None);
        u.endpoints[0].set_healthy(false);
        u.endpoints[1].set_healthy(false);
        assert!(!u.in_panic_mode());
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoints_count_as_unavailable_for_panic() {
        let u = panicky(
            3,
            Some(50.0),
            Some(config::OutlierDetection {
                max_ejection_percent: 100,
                ..od()
            }),
        );
        fail(&u, 0, 3);
        assert!(!u.in_panic_mode(), "2 of 3 available");
        fail(&u, 1, 3);
        assert!(u.endpoints[0].is_ejected() && u.endpoints[1].is_ejected());
        assert!(u.in_panic_mode(), "1 of 3 available");
        assert_eq!(spread(&u, 6), [2, 2, 2]);
        // The ejections end by time, and panic with them.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!u.in_panic_mode());
    }

    #[tokio::test(start_paused = true)]
    async fn panic_mode_skips_endpoints_in_cooldown_and_prefers_untried_ones() {
        let u = panicky(3, Some(50.0), None);
        for e in &u.endpoints {
            e.set_healthy(false);
        }
        u.observe(
            1,
            Observed::Response {
                status: 429,
                latency: Duration::from_millis(1),
                retry_after: Some(Duration::from_secs(5)),
            },
        );
        assert!(
            u.in_panic_mode(),
            "a cooldown is not overridden, nor counted"
        );
        let hits = spread(&u, 6);
        assert!(hits[0] > 0 && hits[1] == 0 && hits[2] > 0, "{hits:?}");
        let mut tried = Tried::default();
        tried.insert(0);
        for _ in 0..4 {
            assert_eq!(u.pick(tried), Some(2), "a retry goes to the untried one");
        }
        tried.insert(2);
        assert!(
            matches!(u.pick(tried), Some(0 | 2)),
            "all tried: any free one"
        );
        // Every endpoint in cooldown: nothing to pick, and the client is told when to come back.
        for i in [0, 2] {
            u.observe(
                i,
                Observed::Response {
                    status: 429,
                    latency: Duration::from_millis(1),
                    retry_after: Some(Duration::from_secs(3)),
                },
            );
        }
        assert_eq!(u.pick(Tried::default()), None);
        assert_eq!(u.cooldown_wait(), Some(Duration::from_secs(3)));
    }

    /// A listed 5xx whose `Retry-After` asks for no wait starts no cooldown, so it counts as the
    /// failure it is (it counted for nothing, and such an endpoint was never ejected).
    #[tokio::test(start_paused = true)]
    async fn a_listed_5xx_with_a_zero_retry_after_counts_as_a_failure() {
        let c = config::Upstream {
            outlier_detection: Some(od()),
            cooldown: Some(config::Cooldown {
                on: vec![429, 503],
                ..Default::default()
            }),
            ..upstream_config(2)
        };
        let u = Upstream::new("u", &c, &None).unwrap();
        assert!(!u.starts_cooldown(503, Some(Duration::ZERO)));
        assert!(u.starts_cooldown(503, Some(Duration::from_secs(1))));
        for _ in 0..3 {
            u.observe(
                0,
                Observed::Response {
                    status: 503,
                    latency: Duration::from_millis(1),
                    retry_after: Some(Duration::ZERO),
                },
            );
        }
        assert!(!u.endpoints[0].in_cooldown());
        assert!(u.endpoints[0].is_ejected(), "three 503s, three failures");
    }

    /// Panic is judged per tier, over the tier in charge (the first with an available endpoint),
    /// as Envoy judges it per priority level.
    #[tokio::test(start_paused = true)]
    async fn panic_mode_is_judged_in_the_tier_in_charge() {
        let tiers = |n: usize, tier0: usize| {
            let mut c = config::Upstream {
                panic_threshold: Some(50.0),
                ..upstream_config(n)
            };
            for e in &mut c.endpoints[tier0..] {
                e.priority = 1;
            }
            Upstream::new("u", &c, &None).unwrap()
        };
        // A dead primary tier, a healthy backup: the backup takes the traffic, no panic (it was 1
        // of 3 over the whole upstream, and panic sent everything to the dead primaries).
        let u = tiers(3, 2);
        u.endpoints[0].set_healthy(false);
        u.endpoints[1].set_healthy(false);
        assert!(!u.in_panic_mode());
        assert_eq!(spread(&u, 4), [0, 0, 4]);
        // A healthy primary tier (3 of 4) and a dead backup: no panic, and the unhealthy primary
        // gets nothing (it was 3 of 8, and a quarter of the traffic went to it).
        let u = tiers(8, 4);
        u.endpoints[3].set_healthy(false);
        for e in &u.endpoints[4..] {
            e.set_healthy(false);
        }
        assert!(!u.in_panic_mode());
        assert_eq!(spread(&u, 30)[3..], [0; 5]);
        // The tier in charge below the threshold (1 of 4): panic over that tier only.
        for e in &u.endpoints[1..4] {
            e.set_healthy(false);
        }
        assert!(u.in_panic_mode());
        let hits = spread(&u, 40);
        assert!(hits[..4].iter().all(|&h| h > 0), "{hits:?}");
        assert_eq!(hits[4..], [0; 4], "{hits:?}");
        // Nothing available anywhere: panic over the first tier.
        u.endpoints[0].set_healthy(false);
        assert!(u.in_panic_mode());
        assert_eq!(spread(&u, 40)[4..], [0; 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_forgets_an_old_spike() {
        let c = config::Upstream {
            balance: config::Balance::PeakEwma,
            ..upstream_config(2)
        };
        let u = Upstream::new("u", &c, &None).unwrap();
        u.endpoints[0].observe_latency(Duration::from_secs(5), Instant::now());
        u.endpoints[1].observe_latency(Duration::from_millis(10), Instant::now());
        // Right after the spike, the slow endpoint loses every comparison.
        assert_eq!(spread(&u, 100), [0, 100]);
        tokio::time::advance(Duration::from_secs(600)).await;
        u.endpoints[1].observe_latency(Duration::from_millis(10), Instant::now());
        let hits = spread(&u, 1000);
        assert!(hits[0] > 0, "starved by a 10-minute-old sample: {hits:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_passes_over_a_failed_endpoint_for_a_while_doubling_until_a_success() {
        let c = config::Upstream {
            balance: config::Balance::PeakEwma,
            ..upstream_config(2)
        };
        let u = Upstream::new("u", &c, &None).unwrap();
        let (a, b) = (&u.endpoints[0], &u.endpoints[1]);
        b.observe_latency(Duration::from_millis(10), Instant::now());
        // An instant failure of the other endpoint does not make it the cheapest.
        a.observe_failure(Duration::from_micros(50), Instant::now());
        assert_eq!(spread(&u, 100), [0, 100]);
        tokio::time::advance(Duration::from_millis(1001)).await;
        b.observe_latency(Duration::from_millis(10), Instant::now());
        assert_eq!(
            spread(&u, 100),
            [100, 0],
            "taken back after 1 s (the faster)"
        );
        // It answers: the run of failures is over. Then failures in a row: 1 s, then 2 s.
        a.observe_latency(Duration::from_micros(50), Instant::now());
        a.observe_failure(Duration::from_micros(50), Instant::now());
        tokio::time::advance(Duration::from_millis(1001)).await;
        a.observe_failure(Duration::from_micros(50), Instant::now());
        tokio::time::advance(Duration::from_millis(1500)).await;
        b.observe_latency(Duration::from_millis(10), Instant::now());
        assert_eq!(spread(&u, 100), [0, 100], "second failure in a row: 2 s");
        tokio::time::advance(Duration::from_millis(600)).await;
        b.observe_latency(Duration::from_millis(10), Instant::now());
        assert_eq!(spread(&u, 100), [100, 0]);
        // A success ends the run: the next failure passes it over for 1 s again.
        a.observe_latency(Duration::from_micros(50), Instant::now());
        a.observe_failure(Duration::from_micros(50), Instant::now());
        tokio::time::advance(Duration::from_millis(1001)).await;
        b.observe_latency(Duration::from_millis(10), Instant::now());
        assert_eq!(spread(&u, 100), [100, 0]);
        // A failure while passed over (a request that was in flight then) extends nothing.
        a.observe_latency(Duration::from_micros(50), Instant::now());
        a.observe_failure(Duration::from_micros(50), Instant::now());
        tokio::time::advance(Duration::from_millis(500)).await;
        a.observe_failure(Duration::from_micros(50), Instant::now());
        a.observe_failure(Duration::from_micros(50), Instant::now());
        tokio::time::advance(Duration::from_millis(501)).await;
        b.observe_latency(Duration::from_millis(10), Instant::now());
        assert_eq!(spread(&u, 100), [100, 0], "one event: 1 s");
        // A passed-over endpoint costs more than a busy one never measured.
        let c = config::Upstream {
            balance: config::Balance::PeakEwma,
            ..upstream_config(2)
        };
        let u = Upstream::new("u", &c, &None).unwrap();
        let (a, b) = (&u.endpoints[0], &u.endpoints[1]);
        a.observe_failure(Duration::from_micros(50), Instant::now());
        b.inc();
        assert_eq!(spread(&u, 100), [0, 100]);
        b.dec();
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_the_failed_endpoint_at_any_index() {
        let u = upstream(MAX_ENDPOINTS, None, false);
        for (i, e) in u.endpoints.iter().enumerate() {
            e.set_healthy(i == 64 || i == 200 || i == 255);
        }
        for failed in [64, 200, 255] {
            let mut tried = Tried::default();
            tried.insert(failed);
            for _ in 0..10 {
                let got = u.pick(tried).unwrap();
                assert_ne!(got, failed, "a retry landed on the failed endpoint");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_during_an_ejection_do_not_count_toward_the_next() {
        let u = upstream(2, Some(od()), false); // 3 failures eject for 10 s
        fail(&u, 0, 6);
        assert!(u.endpoints[0].is_ejected());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!u.endpoints[0].is_ejected());
        fail(&u, 0, 1);
        assert!(
            !u.endpoints[0].is_ejected(),
            "re-ejected after a single failure"
        );
        fail(&u, 0, 2);
        assert!(u.endpoints[0].is_ejected());
    }
}
