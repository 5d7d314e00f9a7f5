//! Passive outlier detection and provider-quota cooldown.
//!
//! # Why
//!
//! A breaker judges the upstream as a whole; one bad replica among ten moves its failure rate by a
//! tenth and never opens it, yet every tenth request fails or crawls. Outlier detection judges each
//! endpoint against itself (consecutive failures) and against its peers (latency), and takes a bad
//! one out of the balancer for a while. Two guards keep it from making things worse:
//!
//! - **Growing, capped ejections.** An endpoint is out for `ejection_time x n` on its n-th ejection in
//!   a run (at most `max_ejection_time`), so a flapping endpoint stays out longer each time; the run
//!   resets once it has stayed in for `max_ejection_time`. The ejection ends by time, checked lazily
//!   when the balancer next looks, so no timer runs.
//! - **`max_ejection_percent`.** At most `floor(endpoints x percent / 100)` endpoints are ejected at
//!   once: when the whole upstream is failing, ejecting everything would turn errors into "no
//!   endpoint", and the breaker is the right tool for that. (So a single-endpoint upstream is never
//!   ejected.)
//!
//! **Latency outliers** (what Envoy users have asked for since 2016): an endpoint whose recent p99
//! exceeds `latency_multiple` times the median of its peers' p99 is ejected the same way. Each
//! endpoint keeps a [`LatencyWindow`] of successful-response latencies; an endpoint is judged every
//! [`REFRESH_EVERY`] samples once it has `latency_min_samples`, against the peers that have as many,
//! and after an ejection only when its window has been refilled with fresh samples.
//!
//! **Cooldown** is not about failure: a provider answering 429 (or 402, ...) with `Retry-After` is
//! healthy but out of quota for this long. The endpoint is skipped until then (at most `max`), with
//! no cap: if every endpoint is out of quota, the client is told when to come back.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use bulwark::latency::{LatencyWindow, REFRESH_EVERY};
use tokio::time::Instant;

use super::Endpoint;
use crate::config;

/// Percentile compared between peers.
const LATENCY_PERCENTILE: f64 = 99.0;

/// Settings of outlier detection for one upstream.
#[derive(Debug)]
pub(crate) struct Outlier {
    consecutive_failures: u32,
    ejection_time: Duration,
    max_ejection_time: Duration,
    max_ejection_percent: u32,
    latency_multiple: Option<f64>,
    latency_min_samples: u64,
    /// Serialises ejection decisions, so two concurrent ejections cannot both pass the cap.
    /// Taken only when an endpoint is about to be ejected.
    lock: Mutex<()>,
}

impl Outlier {
    pub(crate) fn new(c: &config::OutlierDetection) -> Self {
        Outlier {
            consecutive_failures: c.consecutive_failures.max(1),
            ejection_time: c.ejection_time.get(),
            max_ejection_time: c.max_ejection_time.get().max(c.ejection_time.get()),
            max_ejection_percent: c.max_ejection_percent.min(100),
            latency_multiple: c.latency_multiple,
            latency_min_samples: c.latency_min_samples.max(1),
            lock: Mutex::new(()),
        }
    }

    /// A latency window for an endpoint, when latency outlier detection is on.
    pub(crate) fn window(c: Option<&config::OutlierDetection>) -> Option<LatencyWindow> {
        c.filter(|c| c.enabled && c.latency_multiple.is_some())
            .map(|_| LatencyWindow::default())
    }

    /// Records a failed attempt on `eps[i]`.
    pub(crate) fn failure(&self, eps: &[std::sync::Arc<Endpoint>], i: usize, now: Instant) {
        let ep = &eps[i];
        if ep.ejected_at(now) {
            // Requests sent before the ejection, failing now: they do not count toward the next
            // one (which would come at the first failure after this one ends, and twice as long).
            ep.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let n = ep.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.consecutive_failures && self.eject(eps, i, now, "consecutive failures") {
            ep.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records a successful response from `eps[i]` that took `latency`.
    pub(crate) fn success(
        &self,
        eps: &[std::sync::Arc<Endpoint>],
        i: usize,
        latency: Duration,
        now: Instant,
    ) {
        let ep = &eps[i];
        if ep.consecutive_failures.load(Ordering::Relaxed) != 0 {
            ep.consecutive_failures.store(0, Ordering::Relaxed);
        }
        self.judge_latency(eps, i, Some(latency), now);
    }

    /// Records that an attempt on `eps[i]` ran `latency` without an answer before it was dropped
    /// (a hedge that lost): a lower bound of its latency. It is a sample when it is at least the
    /// endpoint's recent p99 (or too few samples give none), so an endpoint whose every attempt
    /// is beaten by a hedge is judged by the time it was given. A shorter one adds no sample (the
    /// window already says as much) but counts toward the endpoint's next judgement: once its
    /// floors stop beating its own p99, an endpoint would otherwise never be judged again, however
    /// much faster its peers have become since.
    pub(crate) fn latency_floor(
        &self,
        eps: &[std::sync::Arc<Endpoint>],
        i: usize,
        latency: Duration,
        now: Instant,
    ) {
        let Some(w) = &eps[i].latency else { return };
        let below = self.p99(w).is_some_and(|p| latency < p);
        self.judge_latency(eps, i, (!below).then_some(latency), now);
    }

    /// Records one latency observation of `eps[i]` (`sample`: what goes into its window, if
    /// anything) and, every [`REFRESH_EVERY`] observations, ejects it if it is a latency outlier.
    fn judge_latency(
        &self,
        eps: &[std::sync::Arc<Endpoint>],
        i: usize,
        sample: Option<Duration>,
        now: Instant,
    ) {
        let ep = &eps[i];
        let (Some(multiple), Some(w)) = (self.latency_multiple, &ep.latency) else {
            return;
        };
        if let Some(latency) = sample {
            w.record(latency);
        }
        let looks = ep.latency_looks.fetch_add(1, Ordering::Relaxed) + 1;
        let recorded = w.recorded();
        if looks % REFRESH_EVERY != 0
            || recorded < self.latency_min_samples
            || recorded < ep.latency_judge_at.load(Ordering::Relaxed)
        {
            return;
        }
        if self.is_latency_outlier(eps, i, multiple) && self.eject(eps, i, now, "latency") {
            // Judge it again only on a window refilled after the ejection.
            ep.latency_judge_at
                .store(recorded + w.capacity() as u64, Ordering::Relaxed);
        }
    }

    fn p99(&self, w: &LatencyWindow) -> Option<Duration> {
        w.percentile_now(LATENCY_PERCENTILE, self.latency_min_samples)
    }

    fn is_latency_outlier(
        &self,
        eps: &[std::sync::Arc<Endpoint>],
        i: usize,
        multiple: f64,
    ) -> bool {
        let Some(own) = eps[i].latency.as_ref().and_then(|w| self.p99(w)) else {
            return false;
        };
        // Its peers: the endpoints taking traffic with it now (same tier, available). One that is
        // down, ejected, in a quota cooldown or in another tier keeps the window of when it last
        // took traffic, which says nothing of now. All computed from the samples now: a cached
        // value would compare this endpoint's fresh window with its peers' older ones, and call a
        // slowdown of all of them an outlier.
        let tier = eps[i].priority;
        let mut peers: Vec<Duration> = eps
            .iter()
            .enumerate()
            .filter(|&(j, e)| j != i && e.priority == tier && e.is_available())
            .filter_map(|(_, e)| e.latency.as_ref().and_then(|w| self.p99(w)))
            .collect();
        if peers.is_empty() {
            return false;
        }
        peers.sort_unstable();
        let mid = peers.len() / 2;
        let median = if peers.len() % 2 == 1 {
            peers[mid]
        } else {
            (peers[mid - 1] + peers[mid]) / 2
        };
        own.as_secs_f64() > median.as_secs_f64() * multiple
    }

    /// Ejects `eps[i]` unless it is already ejected or the cap forbids it; returns whether it did.
    fn eject(&self, eps: &[std::sync::Arc<Endpoint>], i: usize, now: Instant, why: &str) -> bool {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let ep = &eps[i];
        if ep.ejected_at(now) {
            return false;
        }
        let cap = eps.len() * self.max_ejection_percent as usize / 100;
        let ejected = eps.iter().filter(|e| e.ejected_at(now)).count();
        if ejected >= cap {
            tracing::debug!(endpoint = %ep.url, why, ejected, cap, "ejection skipped: max_ejection_percent");
            return false;
        }
        // The multiplier grows with each ejection in a run; a run ends once the endpoint has stayed
        // in for max_ejection_time.
        let fresh_run = ep
            .last_ejection_end()
            .is_none_or(|end| now.saturating_duration_since(end) >= self.max_ejection_time);
        let n = if fresh_run {
            1
        } else {
            ep.ejections.load(Ordering::Relaxed).saturating_add(1)
        };
        ep.ejections.store(n, Ordering::Relaxed);
        let time = self
            .ejection_time
            .saturating_mul(n)
            .min(self.max_ejection_time);
        ep.eject(now, now + time);
        tracing::warn!(endpoint = %ep.url, why, ejections = n, ?time, "endpoint ejected");
        true
    }
}

/// Settings of provider-quota cooldown for one upstream.
#[derive(Debug)]
pub(crate) struct Cooldown {
    on: Vec<u16>,
    max: Duration,
}

impl Cooldown {
    pub(crate) fn new(c: &config::Cooldown) -> Self {
        Cooldown {
            on: c.on.clone(),
            max: c.max.get(),
        }
    }

    /// Whether `status` starts a cooldown (given a `Retry-After`).
    pub(crate) fn applies(&self, status: u16) -> bool {
        self.on.contains(&status)
    }

    /// Puts `ep` in cooldown for `retry_after` (capped) from `now`.
    pub(crate) fn start(&self, ep: &Endpoint, retry_after: Duration, now: Instant) {
        let d = retry_after.min(self.max);
        if d.is_zero() {
            return;
        }
        ep.cool_down_until(now + d);
        tracing::info!(endpoint = %ep.url, cooldown = ?d, "endpoint in cooldown (quota)");
    }
}
