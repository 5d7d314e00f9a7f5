//! One endpoint: its address, pool, live load/latency signals and availability.
//!
//! Availability has three independent parts, each with its own read-only accessor for the admin API:
//! the active health check ([`Endpoint::is_healthy`]), outlier ejection ([`Endpoint::is_ejected`]) and
//! provider-quota cooldown ([`Endpoint::in_cooldown`]). [`Endpoint::is_available`] combines them and is
//! what the balancer asks; with no ejection or cooldown recorded it reads three atomics and no clock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bulwark::latency::LatencyWindow;

use http::HeaderValue;
use tokio::time::Instant;

use super::pool::Pool;

/// Peak-EWMA cost of an endpoint with requests in flight and no latency estimate: more than any
/// measured endpoint's (a day, in ns, times a few thousand requests in flight).
const UNMEASURED_BUSY: f64 = 1e18;

/// Peak-EWMA decay time: latency samples older than ~10 s have little weight (linkerd's default).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// How long peak-EWMA passes over an endpoint after a failed attempt: an endpoint that fails fast
/// (a refused connection, an instant 503) must not look like the fastest and draw every request.
/// Doubles with each failure in a row, up to [`PASS_OVER_MAX`]; a success ends it.
const PASS_OVER: Duration = Duration::from_secs(1);

/// The longest pass-over after failures in a row.
const PASS_OVER_MAX: Duration = Duration::from_secs(30);

/// Peak-EWMA cost of an endpoint passed over after a failure: more than any other's, a busy one
/// never measured ([`UNMEASURED_BUSY`] times its load) included (a known failure is worse than an
/// unknown endpoint). Its own cost is added, so passed-over endpoints still compare (by steps of
/// about 2 s of estimate x load, at this magnitude).
const PASSED_OVER: f64 = 1e25;

/// One endpoint of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    /// The URL from the config.
    pub url: String,
    /// `host[:port]` sent as `Host` (and HTTP/2 `:authority`): the URL's, without an explicit
    /// default port on `https://` URLs. The address connected to is the pool's ([`Pool::addr`]).
    pub authority: http::uri::Authority,
    /// `Host` header value.
    pub host_header: HeaderValue,
    /// Priority tier.
    pub priority: u8,
    /// Weight for `weighted`.
    pub weight: u32,
    /// Connection pool.
    pub pool: Pool,
    /// The active health check's verdict (true until a check says otherwise).
    healthy: AtomicBool,
    /// End of the current ejection, as [`Endpoint::stamp`] (0: not ejected); cleared lazily.
    ejected_until: AtomicU64,
    /// End of the last ejection (kept after it ends, for the ejection multiplier's reset).
    last_ejection_end: AtomicU64,
    /// Start of the last ejection, as [`Endpoint::stamp`] (0: never ejected).
    ejected_from: AtomicU64,
    /// When an active health check last passed, as [`Endpoint::stamp`] (0: never).
    probe_passed: AtomicU64,
    /// Ejections in the current run (the ejection time multiplier).
    pub(crate) ejections: AtomicU32,
    /// End of the current cooldown, as [`Endpoint::stamp`] (0: none); cleared lazily.
    cooldown_until: AtomicU64,
    /// Consecutive failed attempts (outlier detection).
    pub(crate) consecutive_failures: AtomicU32,
    /// Recent successful-response latencies, when latency outlier detection is on.
    pub(crate) latency: Option<LatencyWindow>,
    /// Samples the latency window must have recorded before it is judged again.
    pub(crate) latency_judge_at: AtomicU64,
    /// Latency observations (samples, and hedge floors that added none): the cadence of
    /// latency judgements.
    pub(crate) latency_looks: AtomicU64,
    inflight: AtomicUsize,
    /// Peak-EWMA of response latency in nanoseconds (f64 bits) and the time of its last update.
    ewma_ns: AtomicU64,
    ewma_at: AtomicU64,
    /// Peak-EWMA passes over the endpoint until then (ns since the epoch; 0: not passed over),
    /// after failed attempts in a row (`failed_run`).
    passed_over_until: AtomicU64,
    failed_run: AtomicU32,
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
        latency: Option<LatencyWindow>,
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
            healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            last_ejection_end: AtomicU64::new(0),
            ejected_from: AtomicU64::new(0),
            probe_passed: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            cooldown_until: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            latency,
            latency_judge_at: AtomicU64::new(0),
            latency_looks: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            ewma_ns: AtomicU64::new(0f64.to_bits()),
            ewma_at: AtomicU64::new(0),
            passed_over_until: AtomicU64::new(0),
            failed_run: AtomicU32::new(0),
            epoch: Instant::now(),
        }
    }

    /// Whether the endpoint may receive traffic now: healthy, not ejected, not in cooldown.
    #[inline]
    pub fn is_available(&self) -> bool {
        if !self.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let e = self.ejected_until.load(Ordering::Relaxed);
        let c = self.cooldown_until.load(Ordering::Relaxed);
        if e == 0 && c == 0 {
            return true;
        }
        let now = Instant::now();
        !self.is_blocked(&self.ejected_until, now) && !self.is_blocked(&self.cooldown_until, now)
    }

    /// Whether the endpoint counts as available for panic mode's share: healthy and not ejected
    /// (a quota cooldown does not count against it). Reads the clock only while an ejection is
    /// recorded.
    #[inline]
    pub(crate) fn is_up(&self) -> bool {
        self.is_healthy() && !self.blocked_lazily(&self.ejected_until)
    }

    /// Whether the endpoint is in a quota cooldown; reads the clock only while one is recorded.
    #[inline]
    pub(crate) fn cooling_down(&self) -> bool {
        self.blocked_lazily(&self.cooldown_until)
    }

    /// [`Endpoint::is_blocked`] at the current time, without reading the clock when `cell` is clear.
    #[inline]
    fn blocked_lazily(&self, cell: &AtomicU64) -> bool {
        cell.load(Ordering::Relaxed) != 0 && self.is_blocked(cell, Instant::now())
    }

    /// Marks the endpoint healthy or not, as the active health check does (tests use it to stand
    /// in for one). Ejection and cooldown are separate and unaffected.
    pub fn set_available(&self, available: bool) {
        self.set_healthy(available);
    }

    /// The active health check's verdict: `true` without health checks or until a check fails
    /// `unhealthy_threshold` times in a row.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the health check verdict.
    pub fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            tracing::info!(endpoint = %self.url, healthy, "endpoint health changed");
        }
    }

    /// Whether outlier detection has ejected the endpoint right now.
    pub fn is_ejected(&self) -> bool {
        self.is_blocked(&self.ejected_until, Instant::now())
    }

    /// Time left in the current ejection.
    pub fn ejection_remaining(&self) -> Option<Duration> {
        self.remaining(&self.ejected_until, Instant::now())
    }

    /// Ejections in the current run (the multiplier of `ejection_time`).
    pub fn ejection_count(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Whether the endpoint is in a provider-quota cooldown (429 + `Retry-After`) right now.
    pub fn in_cooldown(&self) -> bool {
        self.is_blocked(&self.cooldown_until, Instant::now())
    }

    /// Time left in the current cooldown.
    pub fn cooldown_remaining(&self) -> Option<Duration> {
        self.remaining(&self.cooldown_until, Instant::now())
    }

    /// `t` as a nonzero stamp (nanoseconds since this endpoint's epoch, plus one).
    fn stamp(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn remaining(&self, cell: &AtomicU64, now: Instant) -> Option<Duration> {
        let until = cell.load(Ordering::Relaxed);
        let now = self.stamp(now);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Whether `cell` holds a time after `now`; an expired stamp is cleared so later reads are
    /// clock-free again (a lost race only means one more clock read).
    fn is_blocked(&self, cell: &AtomicU64, now: Instant) -> bool {
        let until = cell.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if until > self.stamp(now) {
            return true;
        }
        let _ = cell.compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// Ejects the endpoint until `until` (the caller holds the upstream's ejection lock).
    pub(crate) fn eject_until(&self, until: Instant) {
        let s = self.stamp(until);
        self.ejected_until.store(s, Ordering::Relaxed);
        self.last_ejection_end.store(s, Ordering::Relaxed);
    }

    /// Ejects the endpoint from `now` to `until`.
    pub(crate) fn eject(&self, now: Instant, until: Instant) {
        self.ejected_from.store(self.stamp(now), Ordering::Relaxed);
        self.eject_until(until);
    }

    /// Records an active health check that passed at `at`.
    pub(crate) fn probe_passed(&self, at: Instant) {
        self.probe_passed.store(self.stamp(at), Ordering::Relaxed);
    }

    /// Whether an active health check passed since the current (or last) ejection started.
    pub(crate) fn probe_passed_since_ejection(&self) -> bool {
        self.probe_passed.load(Ordering::Relaxed) > self.ejected_from.load(Ordering::Relaxed)
    }

    /// Ends the current ejection at `now` (it still counts for the next one's length).
    pub(crate) fn end_ejection(&self, now: Instant) {
        self.eject_until(now);
    }

    /// When the last ejection ended (or ends), if there was one.
    pub(crate) fn last_ejection_end(&self) -> Option<Instant> {
        match self.last_ejection_end.load(Ordering::Relaxed) {
            0 => None,
            s => Some(self.epoch + Duration::from_nanos(s - 1)),
        }
    }

    /// Puts the endpoint in cooldown until `until` (an existing longer cooldown is kept).
    pub(crate) fn cool_down_until(&self, until: Instant) {
        self.cooldown_until
            .fetch_max(self.stamp(until), Ordering::Relaxed);
    }

    /// Whether the ejection bookkeeping sees the endpoint ejected at `now`.
    pub(crate) fn ejected_at(&self, now: Instant) -> bool {
        self.is_blocked(&self.ejected_until, now)
    }

    /// Whether the endpoint is healthy and not ejected, ignoring cooldown.
    pub(crate) fn usable_ignoring_cooldown(&self, now: Instant) -> bool {
        self.is_healthy() && !self.is_blocked(&self.ejected_until, now)
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

    /// Records that an attempt ran `rtt` without an answer before it was dropped (a hedge that
    /// lost): the endpoint takes at least that long. It raises the peak-EWMA estimate when higher
    /// and never lowers it (a lower bound is no sample of the latency), as tower's peak-EWMA
    /// counts a cancelled call's time.
    pub fn observe_latency_floor(&self, rtt: Duration, at: Instant) {
        let sample = rtt.as_nanos() as f64;
        let now = at.saturating_duration_since(self.epoch).as_nanos() as u64;
        if sample > self.estimate_at(now) {
            // Above the estimate as it has decayed by now: the floor is the estimate.
            self.ewma_ns.store(sample.to_bits(), Ordering::Relaxed);
            self.ewma_at.store(now, Ordering::Relaxed);
        }
    }

    /// The latency estimate (ns) as it has decayed by `now` (ns since the epoch).
    fn estimate_at(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.ewma_at.load(Ordering::Relaxed)) as f64;
        ewma * (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()
    }

    /// Records a failed attempt (a 5xx, a connect failure, a reset, a timeout) that took `rtt`, for
    /// peak-EWMA: a latency sample when it is slower than the estimate (a failure is no sign of
    /// speed), and the endpoint is passed over for [`PASS_OVER`] (doubling with each failure in a
    /// row, up to [`PASS_OVER_MAX`]) unless every endpoint compared is.
    ///
    /// A failure while the endpoint is passed over already (another request that was in flight
    /// when it failed: one blip fails them together) is the same event: it extends nothing.
    pub fn observe_failure(&self, rtt: Duration, at: Instant) {
        self.observe_latency_floor(rtt, at);
        let now = at.saturating_duration_since(self.epoch);
        if self.passed_over_until.load(Ordering::Relaxed) > now.as_nanos() as u64 {
            return;
        }
        let run = self.failed_run.fetch_add(1, Ordering::Relaxed).min(16);
        let pass = PASS_OVER.saturating_mul(1 << run).min(PASS_OVER_MAX);
        let until = now.saturating_add(pass);
        self.passed_over_until
            .store(until.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Records a latency sample for peak-EWMA: a slower sample takes over at once (the peak), a faster one
    /// is blended in with a weight that grows with the time since the last sample. `at`: when the
    /// sample was taken (the caller has just read the clock).
    /// It is a success: it ends a pass-over after failures (see [`observe_failure`](Self::observe_failure)).
    pub fn observe_latency(&self, rtt: Duration, at: Instant) {
        if self.failed_run.load(Ordering::Relaxed) != 0 {
            self.failed_run.store(0, Ordering::Relaxed);
            self.passed_over_until.store(0, Ordering::Relaxed);
        }
        let now = at.saturating_duration_since(self.epoch).as_nanos() as u64;
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

    /// Peak-EWMA cost: latency estimate times (in-flight + 1). The estimate decays toward zero with
    /// the time since its last sample (as Finagle's and tower's do): an endpoint that once answered
    /// slowly, and then lost every comparison and so got no new sample, is tried again.
    ///
    /// An endpoint with no estimate (never answered, or silent for hours) and requests in flight
    /// costs [`UNMEASURED_BUSY`] more than any measured one, as in Finagle: a fresh replica, or
    /// one that takes requests and answers none, gets one request at a time until its first
    /// answer (or timeout) gives it a latency, rather than every request while it costs
    /// `1 ns x (in flight + 1)`.
    ///
    /// An endpoint passed over after a failure (see [`observe_failure`](Self::observe_failure))
    /// costs more than any other, a busy one never measured included.
    pub fn ewma_cost(&self) -> f64 {
        let now = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos() as u64;
        let estimate = self.estimate_at(now);
        let pending = self.inflight() as f64;
        let cost = if estimate == 0.0 && pending > 0.0 {
            // Times (in flight + 1), as a measured cost: two unmeasured endpoints still compare
            // by load (1e18 + n would not: f64 steps by 128 there).
            UNMEASURED_BUSY * (pending + 1.0)
        } else {
            estimate.max(1.0) * (pending + 1.0)
        };
        if self.passed_over_until.load(Ordering::Relaxed) > now {
            // After a failure: behind every endpoint that is not, compared by cost with those
            // that are.
            return PASSED_OVER + cost.min(1e24);
        }
        cost
    }
}
