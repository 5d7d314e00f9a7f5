//! The load loop: a fixed number of workers, each on its own keep-alive connection, sending requests
//! back to back until a deadline, then stopping by themselves.
//!
//! Everything a client can observe is counted in [`LoadStats`] (shared atomics, read while the loop
//! runs): responses by class, requests that got no response at all, which provider served each one
//! (`x-demo-provider`), failovers (an `/api/` request answered by `healthy`), what the gateway says it
//! did (`x-bulwark-reason`), and latencies. The display samples it; nothing here knows about terminals.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::client::HttpClient;
use super::config::API_PREFIX;
use super::providers::{Provider, PROVIDER_HEADER};

/// Default number of concurrent workers.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Share of requests sent to the `/slow/` route; the rest go to `/api/`. Small, because each slow
/// request holds a worker for up to a second.
pub const DEFAULT_SLOW_SHARE: f64 = 0.02;
/// A request with no answer after this long counts as a client-visible error. Far above the routes'
/// own timeouts, so it only fires when the gateway itself hangs.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a request that got no response, so a dead target is not hammered in a tight loop.
pub const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Request path for the `/api/` route.
pub const API_PATH: &str = "/api/chat";
/// Request path for the `/slow/` route.
pub const SLOW_PATH: &str = "/slow/report";

/// Header the gateway sets when it acted on a request.
pub const REASON_HEADER: &str = "x-bulwark-reason";

/// The `x-bulwark-reason` values the issue defines, in display order. Anything else counts as `other`.
pub const REASONS: [&str; 8] = [
    "circuit_open",
    "no_healthy_endpoint",
    "timeout",
    "rate_limited",
    "bulkhead_full",
    "budget_exhausted",
    "upstream_error",
    "fallback",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Where to send requests (the gateway's listener, or a provider directly).
    pub target: SocketAddr,
    /// How long to keep sending; no request starts after this, and the loop returns once the last
    /// in-flight one finishes (bounded by [`CLIENT_TIMEOUT`]).
    pub duration: Duration,
    /// Number of workers, each with one connection. At least 1.
    pub concurrency: usize,
    /// Share of requests sent to [`SLOW_PATH`] (0..=1); the rest go to [`API_PATH`].
    pub slow_share: f64,
    /// Seeds each worker's choice of path.
    pub seed: u64,
}

/// Counters shared between the workers and whoever watches them. All monotonic. Each counter is read on
/// its own, so a snapshot taken while requests finish may be off by the few requests in between; after
/// [`run`] returns it is exact.
#[derive(Debug, Default)]
pub struct LoadStats {
    requests: AtomicU64,
    ok: AtomicU64,
    non_2xx: AtomicU64,
    no_response: AtomicU64,
    served_by: [AtomicU64; 3],
    served_by_unknown: AtomicU64,
    failovers: AtomicU64,
    reasons: [AtomicU64; REASONS.len()],
    reasons_other: AtomicU64,
    /// Latencies (µs) since the last [`take_latencies`](LoadStats::take_latencies). A std mutex held for
    /// one push; the demo's request rates are far below where that matters.
    latencies_us: Mutex<Vec<u32>>,
}

/// A copy of [`LoadStats`]' counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// Requests finished (with or without a response).
    pub requests: u64,
    /// Answered with a 2xx.
    pub ok: u64,
    /// Answered with anything else.
    pub non_2xx: u64,
    /// Got no response (connect failure, reset, client timeout).
    pub no_response: u64,
    /// Responses per provider (`x-demo-provider`), in [`Provider::ALL`] order.
    pub served_by: [u64; 3],
    /// Responses without a known `x-demo-provider` (made by the gateway itself).
    pub served_by_unknown: u64,
    /// `/api/` requests answered by `healthy`: the gateway failed over from `flaky`.
    pub failovers: u64,
    /// Responses carrying each `x-bulwark-reason`, in [`REASONS`] order.
    pub reasons: [u64; REASONS.len()],
    /// Responses with some other `x-bulwark-reason`.
    pub reasons_other: u64,
}

impl LoadSnapshot {
    /// Errors a client saw: non-2xx responses plus requests with no response.
    pub fn client_errors(&self) -> u64 {
        self.non_2xx + self.no_response
    }

    /// Responses served by `provider`.
    pub fn served_by(&self, provider: Provider) -> u64 {
        self.served_by[provider as usize]
    }

    /// `(reason, count)` for every reason seen at least once, `other` last.
    pub fn reasons_seen(&self) -> Vec<(&'static str, u64)> {
        let mut seen: Vec<(&'static str, u64)> = REASONS
            .iter()
            .zip(self.reasons)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (*r, n))
            .collect();
        if self.reasons_other > 0 {
            seen.push(("other", self.reasons_other));
        }
        seen
    }
}

impl LoadStats {
    /// Fresh, all zero.
    pub fn new() -> LoadStats {
        LoadStats::default()
    }

    /// Read every counter.
    pub fn snapshot(&self) -> LoadSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoadSnapshot {
            requests: load(&self.requests),
            ok: load(&self.ok),
            non_2xx: load(&self.non_2xx),
            no_response: load(&self.no_response),
            served_by: [
                load(&self.served_by[0]),
                load(&self.served_by[1]),
                load(&self.served_by[2]),
            ],
            served_by_unknown: load(&self.served_by_unknown),
            failovers: load(&self.failovers),
            reasons: std::array::from_fn(|i| load(&self.reasons[i])),
            reasons_other: load(&self.reasons_other),
        }
    }

    /// Take the latencies (in µs) recorded since the last call.
    pub fn take_latencies(&self) -> Vec<u32> {
        let mut guard = self.latencies_us.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *guard)
    }

    fn record_latency(&self, latency: Duration) {
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.latencies_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(us);
    }

    /// Count one finished request. `response` is `None` when there was no response at all.
    fn record(
        &self,
        path: &str,
        latency: Duration,
        response: Option<&super::client::ClientResponse>,
    ) {
        self.record_latency(latency);
        let Some(resp) = response else {
            self.no_response.fetch_add(1, Ordering::Relaxed);
            self.requests.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if resp.status.is_success() {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.non_2xx.fetch_add(1, Ordering::Relaxed);
        }
        let provider = resp
            .headers
            .get(PROVIDER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(Provider::from_name);
        match provider {
            Some(p) => {
                self.served_by[p as usize].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.served_by_unknown.fetch_add(1, Ordering::Relaxed);
            }
        }
        if provider == Some(Provider::Healthy) && path.starts_with(API_PREFIX) {
            self.failovers.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(reason) = resp.headers.get(REASON_HEADER) {
            let reason = reason.to_str().unwrap_or("");
            match REASONS.iter().position(|r| *r == reason) {
                Some(i) => self.reasons[i].fetch_add(1, Ordering::Relaxed),
                None => self.reasons_other.fetch_add(1, Ordering::Relaxed),
            };
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// Run the load described by `config`, counting into `stats`, until `config.duration` has passed.
/// Returns the final counters. Cancel-safe: dropping the future aborts every worker.
pub async fn run(config: LoadConfig, stats: Arc<LoadStats>) -> LoadSnapshot {
    let deadline = Instant::now() + config.duration;
    let mut workers = JoinSet::new();
    for i in 0..config.concurrency.max(1) {
        let stats = Arc::clone(&stats);
        let target = config.target;
        let slow_share = config.slow_share.clamp(0.0, 1.0);
        let seed = config.seed.wrapping_add(i as u64);
        workers.spawn(worker(target, deadline, slow_share, seed, stats));
    }
    while workers.join_next().await.is_some() {}
    stats.snapshot()
}

async fn worker(
    target: SocketAddr,
    deadline: Instant,
    slow_share: f64,
    seed: u64,
    stats: Arc<LoadStats>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut client = HttpClient::new(target);
    while Instant::now() < deadline {
        let path = if rng.f64() < slow_share {
            SLOW_PATH
        } else {
            API_PATH
        };
        let started = Instant::now();
        let result = tokio::time::timeout(CLIENT_TIMEOUT, client.get(path)).await;
        let latency = started.elapsed();
        let response = match result {
            Ok(Ok(resp)) => Some(resp),
            Ok(Err(_)) => None,
            Err(_elapsed) => {
                // Timed out mid-exchange: the connection is in an unknown state, dial a new one.
                client = HttpClient::new(target);
                None
            }
        };
        stats.record(path, latency, response.as_ref());
        if response.is_none() {
            tokio::time::sleep(ERROR_PAUSE).await;
        }
    }
}

/// The `p`-th percentile (0..=100) of `samples` (sorted in place), nearest-rank; `None` when empty.
pub fn percentile(samples: &mut [u32], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * samples.len() as f64).ceil() as usize;
    let idx = rank.saturating_sub(1).min(samples.len() - 1);
    Some(Duration::from_micros(u64::from(samples[idx])))
}
