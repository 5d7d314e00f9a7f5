//! One endpoint: its address, pool and live load/latency signals.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::pool::Pool;

/// Peak-EWMA decay time: latency samples older than ~10 s have little weight (linkerd's default).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// One endpoint of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    /// The URL from the config.
    pub url: String,
    /// `host:port` to connect to and to send as `Host`.
    pub authority: http::uri::Authority,
    /// `Host` header value.
    pub host_header: HeaderValue,
    /// Priority tier.
    pub priority: u8,
    /// Weight for `weighted`.
    pub weight: u32,
    /// Connection pool.
    pub pool: Pool,
    /// Whether the endpoint may receive traffic (health checks and outlier detection clear it).
    available: AtomicBool,
    inflight: AtomicUsize,
    /// Peak-EWMA of response latency in nanoseconds (f64 bits) and the time of its last update.
    ewma_ns: AtomicU64,
    ewma_at: AtomicU64,
    epoch: Instant,
}

impl Endpoint {
    /// Builds an endpoint.
    pub(crate) fn new(
        url: String,
        authority: http::uri::Authority,
        priority: u8,
        weight: u32,
        pool: Pool,
    ) -> Self {
        let host_header = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Endpoint {
            url,
            authority,
            host_header,
            priority,
            weight,
            pool,
            available: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
            ewma_ns: AtomicU64::new(0f64.to_bits()),
            ewma_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Whether the endpoint may receive traffic.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    /// Marks the endpoint (un)available; the hook for health checks and outlier detection.
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::Relaxed);
    }

    /// Requests currently in flight to this endpoint.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub(crate) fn inc(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dec(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records a latency sample for peak-EWMA: a slower sample takes over at once (the peak), a faster one
    /// is blended in with a weight that grows with the time since the last sample.
    pub fn observe_latency(&self, rtt: Duration) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.ewma_at.swap(now, Ordering::Relaxed);
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let sample = rtt.as_nanos() as f64;
        let next = if sample > prev {
            sample
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Peak-EWMA cost: latency estimate times (in-flight + 1).
    pub fn ewma_cost(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        (ewma.max(1.0)) * (self.inflight() as f64 + 1.0)
    }
}
