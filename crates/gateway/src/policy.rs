//! The seam between the gateway and the `bulwark` policy library.
//!
//! Every policy *decision* the attempt loop makes goes through the two types here, and each is a
//! library policy, not a re-implementation:
//!
//! - [`UpstreamPolicies`] (one per upstream): [`UpstreamPolicies::admit`] before each attempt runs the
//!   upstream's [`CircuitBreaker`], [`Bulkhead`] and [`RateLimiter`] in that order (the rate limit
//!   last, so that only an attempt about to be sent spends a token), returning an [`Admission`] or
//!   a [`Reject`]; the attempt's outcome is reported with [`Admission::record`].
//! - [`RoutePolicies`] (one per route): the [`RetryBudget`] ([`RoutePolicies::deposit`],
//!   [`RoutePolicies::try_withdraw`]), the [`Backoff`] schedule ([`RoutePolicies::backoff`]), the
//!   [`Hedge`] ([`RoutePolicies::hedge`], whose hedges draw on the same budget) and the route's
//!   [`LatencyWindow`] of successful attempts, which sets a percentile hedge delay and tells the
//!   attempt loop whether a retry can still finish before the deadline
//!   ([`RoutePolicies::retry_fits`], the library `Retry`'s rule).

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bulwark::breaker::{CircuitBreaker, Permit};
use bulwark::bulkhead::{Bulkhead, BulkheadPermit};
use bulwark::events::{Event, Listener, Listeners};
use bulwark::hedge::Hedge;
use bulwark::latency::LatencyWindow;
use bulwark::rate_limit::RateLimiter;
use bulwark::retry::{
    Backoff, Jitter, RetryBudget, Withdrawal, DEFAULT_DEADLINE_MIN_SAMPLES,
    DEFAULT_DEADLINE_PERCENTILE,
};
use bulwark::{ConfigError, Error, Outcome};
use tokio::time::Instant;

use crate::config;

/// Where policy events go (metrics, logs); `None` when nobody listens.
pub type Events = Option<Arc<dyn Listener>>;

/// Why an upstream refused an attempt before it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The circuit breaker is open; try again after `retry_after`.
    CircuitOpen {
        /// Time until the breaker lets a probe through.
        retry_after: Duration,
    },
    /// The upstream's rate limit is exhausted.
    RateLimited {
        /// Time until a request would be admitted.
        retry_after: Duration,
    },
    /// The bulkhead has no free slot (and its queue is full or the wait ran out).
    BulkheadFull,
    /// The route's deadline passed while waiting in the bulkhead's queue.
    Deadline,
}

fn reject(e: Error<std::convert::Infallible>) -> Reject {
    match e {
        Error::CircuitOpen { retry_after, .. } => Reject::CircuitOpen { retry_after },
        Error::RateLimited { retry_after } => Reject::RateLimited { retry_after },
        _ => Reject::BulkheadFull,
    }
}

/// A setting a library builder refused, named by its config key path (below the upstream, or below
/// the route) so that `bulwark check` reports what `run` would refuse, at the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Config keys, e.g. `["circuit_breaker", "window", "size"]`.
    pub path: Vec<&'static str>,
    /// What is wrong, in the library's words.
    pub reason: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.join("."), self.reason)
    }
}

/// A `burst` setting, or its default: one second's worth of `per_second` (at least one request).
pub(crate) fn burst(burst: Option<u32>, per_second: f64) -> u32 {
    burst.unwrap_or_else(|| per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
}

/// How long a drained bucket of `burst` at `per_second` takes to be full again (burst x interval,
/// the interval rounded up as the library rounds it).
pub(crate) fn refill(burst_setting: Option<u32>, per_second: f64) -> Duration {
    let (n, per) = rate(per_second);
    let interval = per.as_nanos().div_ceil(u128::from(n));
    let ns = interval * u128::from(burst(burst_setting, per_second));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// A `per_second` setting as the library's rate builders take it: a whole rate per second, and a
/// fractional one as one request per its interval (rounded up to a nanosecond, so never faster):
/// 0.025/s is one every 40 s, 2.5/s one every 400 ms.
pub(crate) fn rate(per_second: f64) -> (u32, Duration) {
    if per_second.fract() == 0.0 && per_second >= 1.0 {
        (per_second as u32, Duration::from_secs(1))
    } else {
        (1, Duration::from_nanos((1e9 / per_second).ceil() as u64))
    }
}

/// The config key of the setting a builder of config section `section` refused.
pub(crate) fn refused(section: &[&'static str], e: ConfigError) -> Refused {
    let key = match (section.last().copied(), e.field()) {
        (Some("circuit_breaker"), "count_window" | "time_window") => vec!["window", "size"],
        (Some("rate_limit" | "client_rate_limit"), "rate") => vec!["per_second"],
        (Some("budget"), "ttl") => vec!["window"],
        (Some("budget"), "percent_can_retry") => vec!["ratio"],
        (Some("budget"), "min_retries_per_sec") => vec!["min_per_second"],
        // What the library checks of a backoff is its base (zero for decorrelated jitter, or
        // above the max).
        (Some("backoff"), _) => vec!["base"],
        (Some("hedge"), "delay_percentile") => vec!["delay"],
        // The hedge is named after the route.
        (Some("hedge"), "name") => {
            return Refused {
                path: vec!["name"],
                reason: e.reason().to_owned(),
            }
        }
        (_, field) => vec![field],
    };
    Refused {
        path: [section, &key].concat(),
        reason: e.reason().to_owned(),
    }
}

/// Per-upstream admission: circuit breaker, bulkhead and rate limit, checked in that order.
#[derive(Debug)]
pub struct UpstreamPolicies {
    breaker: Option<CircuitBreaker>,
    rate_limiter: Option<RateLimiter>,
    bulkhead: Option<Bulkhead>,
}

/// Permission to send one attempt; report its outcome with [`Admission::record`]. Dropping it without
/// recording counts as neither success nor failure (e.g. the client went away). The bulkhead slot is
/// held until the admission is dropped (the attempt loop keeps it until the response body ends).
#[derive(Debug)]
pub struct Admission {
    permit: Option<Permit>,
    _slot: Option<BulkheadPermit>,
}

impl Admission {
    /// Reports how the attempt went to the breaker (once; later calls do nothing).
    /// `Outcome::Ignore` for results that say nothing about the upstream's health.
    pub fn record(&mut self, outcome: Outcome) {
        if let Some(p) = self.permit.take() {
            p.record(outcome);
        }
    }

    /// Measures the attempt, for the breaker's slow calls, from `start` when that is later than
    /// its admission (see [`Permit::measure_from`](bulwark::breaker::Permit::measure_from)).
    pub fn measure_from(&mut self, start: Instant) {
        if let Some(p) = &mut self.permit {
            p.measure_from(start);
        }
    }

    /// Frees the bulkhead slot now, before the admission is dropped (record the outcome first). For
    /// a failed response kept only to be passed through: a retry must not wait for its own slot.
    pub fn release_slot(&mut self) {
        self._slot = None;
    }
}

fn listen<B>(builder: B, events: &Events, add: impl FnOnce(B, Arc<dyn Listener>) -> B) -> B {
    match events {
        Some(l) => add(builder, l.clone()),
        None => builder,
    }
}

pub(crate) fn forward(l: Arc<dyn Listener>) -> impl Fn(&Event) + Send + Sync + 'static {
    move |e: &Event| l.on_event(e)
}

impl UpstreamPolicies {
    /// Builds the policies of upstream `name` from its (validated) config.
    pub fn new(name: &str, up: &config::Upstream, events: &Events) -> Result<Self, String> {
        Self::build(name, up, events).map_err(|r| r.to_string())
    }

    /// Builds the library policies of an upstream's config only to check it (no task is started):
    /// the first setting a builder refuses.
    pub fn check(name: &str, up: &config::Upstream) -> Result<(), Refused> {
        Self::build(name, up, &None).map(drop)
    }

    fn build(name: &str, up: &config::Upstream, events: &Events) -> Result<Self, Refused> {
        let breaker = match up.circuit_breaker.as_ref().filter(|c| c.enabled) {
            Some(c) => {
                let mut b = CircuitBreaker::builder()
                    .name(name)
                    .minimum_calls(c.minimum_calls)
                    .failure_rate_threshold(c.failure_rate_threshold)
                    .slow_call_duration(c.slow_call_duration.get())
                    .slow_call_rate_threshold(c.slow_call_rate_threshold)
                    .open_duration(c.open_duration.get())
                    .half_open_calls(c.half_open_calls);
                b = match c.window.size {
                    config::WindowSize::Calls(n) => b.count_window(n as usize),
                    config::WindowSize::Time(d) => b.time_window(d.get()),
                };
                b = listen(b, events, |b, l| b.listener(forward(l)));
                Some(b.build().map_err(|e| refused(&["circuit_breaker"], e))?)
            }
            None => None,
        };
        let rate_limiter = match up.rate_limit.as_ref().filter(|r| r.enabled) {
            Some(r) => {
                let (n, per) = rate(r.per_second);
                let mut b = RateLimiter::builder()
                    .rate(n, per)
                    .burst(burst(r.burst, r.per_second))
                    .name(name);
                b = listen(b, events, |b, l| b.listener(forward(l)));
                Some(b.build().map_err(|e| refused(&["rate_limit"], e))?)
            }
            None => None,
        };
        let bulkhead = match up.bulkhead.as_ref().filter(|b| b.enabled) {
            Some(c) => {
                let mut b = Bulkhead::builder()
                    .name(name)
                    .max_concurrent(c.max_concurrent as usize)
                    .max_queued(c.max_queued as usize)
                    .queue_timeout(c.queue_timeout.get());
                b = listen(b, events, |b, l| b.listener(forward(l)));
                Some(b.build().map_err(|e| refused(&["bulkhead"], e))?)
            }
            None => None,
        };
        Ok(UpstreamPolicies {
            breaker,
            rate_limiter,
            bulkhead,
        })
    }

    /// The upstream's circuit breaker, if it has one (admin API, health).
    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_ref()
    }

    /// The upstream's bulkhead, if it has one.
    pub fn bulkhead(&self) -> Option<&Bulkhead> {
        self.bulkhead.as_ref()
    }

    /// The upstream's rate limit, if it has one.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.rate_limiter.as_ref()
    }

    /// Asks to send one attempt now. Runs on every attempt; with no policy configured it is three
    /// branches. Waits only in the bulkhead's bounded queue, when one is configured and full.
    pub async fn admit(&self) -> Result<Admission, Reject> {
        self.admit_by(None).await
    }

    /// Like [`admit`](Self::admit), but waits in the bulkhead's queue no later than `deadline` (the
    /// route's): [`Reject::Deadline`] when it passes first.
    pub async fn admit_by(&self, deadline: Option<Instant>) -> Result<Admission, Reject> {
        let admission = self.reserve_by(deadline).await?;
        // A refusal gives the slot and the breaker's permit back (dropped, unrecorded).
        self.take_rate_token()?;
        Ok(admission)
    }

    /// The upstream's rate limit for one attempt about to be sent, last of its admission: the
    /// rate limit counts attempts sent, so one that the breaker or the full bulkhead refused, that
    /// waited in the bulkhead's queue until too late, or that then found no endpoint available,
    /// has not spent a token.
    pub fn take_rate_token(&self) -> Result<(), Reject> {
        match &self.rate_limiter {
            Some(rl) => rl.check().map_err(reject),
            None => Ok(()),
        }
    }

    /// [`admit_by`](Self::admit_by) without the rate limit: the breaker and the bulkhead only. The
    /// caller calls [`take_rate_token`](Self::take_rate_token) before it sends (once it has an
    /// endpoint), and drops the admission, unrecorded, if that refuses.
    pub async fn reserve_by(&self, deadline: Option<Instant>) -> Result<Admission, Reject> {
        // A rejection after the breaker admitted us drops its permit unrecorded ("ignored"), so local
        // refusals (rate limit, bulkhead) never count against the upstream's health.
        let mut permit = match &self.breaker {
            Some(b) => Some(b.try_acquire().map_err(reject)?),
            None => None,
        };
        let slot = match &self.bulkhead {
            Some(b) => match b.try_acquire() {
                Some(p) => Some(p),
                None => {
                    // The wait is ours, not the upstream's: the breaker's permit (whose clock
                    // measures slow calls, and which may be one of few half-open probes) is given
                    // back unrecorded, and asked for again once a slot is free.
                    drop(permit.take());
                    let wait = b.acquire();
                    let got = match deadline {
                        Some(d) => tokio::time::timeout_at(d, wait)
                            .await
                            .map_err(|_| Reject::Deadline)?,
                        None => wait.await,
                    };
                    let got = got.map_err(reject)?;
                    if let Some(b) = &self.breaker {
                        permit = Some(b.try_acquire().map_err(reject)?);
                    }
                    Some(got)
                }
            },
            None => None,
        };
        Ok(Admission {
            permit,
            _slot: slot,
        })
    }
}

/// A retry's claim on its route's budget ([`RoutePolicies::withdraw`]); holds nothing when the route
/// has no budget.
#[derive(Debug)]
pub struct RetryToken(Option<Withdrawal>);

/// Per-route retry policy state: budget, backoff, hedging and the latency record.
#[derive(Debug)]
pub struct RoutePolicies {
    budget: Option<RetryBudget>,
    backoff: Backoff,
    hedge: Option<Hedge>,
    latency: Arc<LatencyWindow>,
    /// The route's name, the `route` label of what it reports.
    name: Arc<str>,
    /// Where the attempt loop's decisions (retries, timeouts, fallbacks) are reported.
    events: Listeners,
}

/// Per hedged call: whether its upstream refused a hedge, and the budget token the hedge's admission
/// hook just took (for the attempt it admits, which [`take_hedge_token`] hands it).
#[derive(Default)]
struct HedgeCall {
    stopped: Cell<bool>,
    token: Cell<Option<Withdrawal>>,
}

tokio::task_local! {
    static HEDGE_CALL: HedgeCall;
}

/// Runs one hedged call (a [`Hedge::call_with`]) so that [`stop_hedging`] can end its hedging.
pub async fn hedged<F: Future>(call: F) -> F::Output {
    HEDGE_CALL.scope(HedgeCall::default(), call).await
}

/// Inside [`hedged`], in the factory of a hedge's attempt: the budget token its admission took (the
/// library admits a hedge, then at once asks the factory for it), to give back if the attempt sends
/// nothing. `None` outside [`hedged`] or when the route has no budget.
pub fn take_hedge_token() -> Option<RetryToken> {
    HEDGE_CALL
        .try_with(|c| c.token.take())
        .ok()
        .flatten()
        .map(|w| RetryToken(Some(w)))
}

/// Inside [`hedged`]: no further hedge starts for this call; the attempts running go on. For a hedge
/// its upstream refused (breaker, rate limit, bulkhead, no endpoint): the next would be refused too,
/// and each would spend retry budget. Works through the route hedge's admission hook, which the
/// library asks before each hedge; outside [`hedged`] it does nothing.
pub fn stop_hedging() {
    let _ = HEDGE_CALL.try_with(|c| c.stopped.set(true));
}

fn hedging_stopped() -> bool {
    HEDGE_CALL.try_with(|c| c.stopped.get()).unwrap_or(false)
}

/// The library backoff for a route's `backoff:` section.
pub fn backoff(b: &config::Backoff) -> Backoff {
    let (base, max) = (b.base.get(), b.max.get());
    let schedule = match b.kind {
        config::BackoffKind::Constant => Backoff::fixed(base),
        config::BackoffKind::Linear => Backoff::linear(base, base),
        config::BackoffKind::Exponential => Backoff::exponential(base),
        config::BackoffKind::Fibonacci => Backoff::fibonacci(base),
        config::BackoffKind::DecorrelatedJitter => Backoff::decorrelated_jitter(base, max),
    };
    if b.kind == config::BackoffKind::DecorrelatedJitter {
        // Already random: the library rejects extra jitter on it.
        return schedule.max(max);
    }
    schedule.max(max).jitter(match b.jitter {
        config::Jitter::None => Jitter::None,
        config::Jitter::Full => Jitter::Full,
        config::Jitter::Equal => Jitter::Equal,
    })
}

/// The library retry budget for a route's `budget:` section.
pub fn budget(c: &config::Budget) -> Result<RetryBudget, String> {
    build_budget(c).map_err(|r| r.to_string())
}

fn build_budget(c: &config::Budget) -> Result<RetryBudget, Refused> {
    RetryBudget::builder()
        .ttl(c.window.get())
        .min_retries_per_sec(c.min_per_second)
        .percent_can_retry(c.ratio)
        .build()
        .map_err(|e| refused(&["retry", "budget"], e))
}

/// What a reloaded route carries over from its counterpart in the config before, instead of
/// starting anew.
#[derive(Debug, Default, Clone, Copy)]
pub struct Carried<'a> {
    /// Its retry budget, when the budget's settings did not change: a reload in an outage does
    /// not hand out fresh retry credit.
    pub budget: Option<&'a RetryBudget>,
    /// Its latency window (recent successful attempts), when it still goes to the same
    /// upstreams: a percentile hedge delay, and the check that a retry or hedge fits the
    /// deadline, do not start again from nothing at each reload (a `p95` hedge would fire at its
    /// 100 ms default for the next 20 requests, doubling the load on a slow upstream).
    pub latency: Option<&'a Arc<LatencyWindow>>,
}

impl RoutePolicies {
    /// Builds them from the route's retry config (no retry section: no budget, default backoff).
    pub fn new(retry: Option<&config::Retry>) -> Result<Self, String> {
        Self::with_hedge("route", retry, None, &None)
    }

    /// Builds them from the route's retry and hedge config; `name` names the hedge in events.
    pub fn with_hedge(
        name: &str,
        retry: Option<&config::Retry>,
        hedge: Option<&config::Hedge>,
        events: &Events,
    ) -> Result<Self, String> {
        Self::build(name, retry, hedge, events, Carried::default()).map_err(|r| r.to_string())
    }

    /// [`with_hedge`](Self::with_hedge), keeping what a reloaded route carries over (see
    /// [`Carried`]) instead of starting anew.
    pub fn keeping(
        name: &str,
        retry: Option<&config::Retry>,
        hedge: Option<&config::Hedge>,
        events: &Events,
        carried: Carried<'_>,
    ) -> Result<Self, String> {
        Self::build(name, retry, hedge, events, carried).map_err(|r| r.to_string())
    }

    /// Builds the library policies of a route's config only to check it: the first setting a
    /// builder refuses (the path is below the route).
    pub fn check(
        name: &str,
        retry: Option<&config::Retry>,
        hedge: Option<&config::Hedge>,
    ) -> Result<(), Refused> {
        Self::build(name, retry, hedge, &None, Carried::default()).map(drop)
    }

    fn build(
        name: &str,
        retry: Option<&config::Retry>,
        hedge: Option<&config::Hedge>,
        events: &Events,
        carried: Carried<'_>,
    ) -> Result<Self, Refused> {
        let budget = match retry.and_then(|r| r.budget.as_ref()) {
            Some(b) => {
                let fresh = build_budget(b)?;
                Some(carried.budget.cloned().unwrap_or(fresh))
            }
            None => None,
        };
        let backoff = backoff(&retry.map(|r| r.backoff.clone()).unwrap_or_default());
        backoff
            .validate()
            .map_err(|e| refused(&["retry", "backoff"], e))?;
        let latency = carried
            .latency
            .cloned()
            .unwrap_or_else(|| Arc::new(LatencyWindow::default()));
        let mut listeners = Listeners::new();
        if let Some(e) = events {
            listeners.push(e.clone());
        }
        let name: Arc<str> = name.into();
        let hedge = match hedge.filter(|h| h.enabled) {
            Some(h) => {
                let mut b = Hedge::builder()
                    .name(name.clone())
                    .max_hedges(h.max_hedges)
                    .latency_window(latency.clone());
                b = match h.delay {
                    config::HedgeDelay::Fixed(d) => b.delay(d.get()),
                    config::HedgeDelay::Percentile(p) => b.delay_percentile(
                        p,
                        bulwark::hedge::DEFAULT_MIN_SAMPLES,
                        bulwark::hedge::DEFAULT_DELAY,
                    ),
                };
                // Hedges draw on the route's retry budget (when it has one; a refusal is reported
                // like a retry's), and stop for a call whose upstream refused one ([`stop_hedging`]).
                let (budget, report, route) = (budget.clone(), listeners.clone(), name.clone());
                b = b.admit(Arc::new(move || {
                    if hedging_stopped() {
                        return false;
                    }
                    let ok = match budget.as_ref() {
                        None => true,
                        Some(b) => match b.withdraw() {
                            Some(w) => {
                                // The factory takes it at once (the library calls it right after
                                // this hook); one left over would be a hedge never made: refund it.
                                let left = HEDGE_CALL.try_with(|c| c.token.replace(Some(w)));
                                if let Ok(Some(old)) = left {
                                    b.refund(old);
                                }
                                true
                            }
                            None => false,
                        },
                    };
                    if !ok {
                        report.emit(|| Event::RetryBudgetExhausted {
                            name: route.clone(),
                        });
                    }
                    ok
                }));
                // The library reports a hedge as it asks the factory for it; the factory may find no
                // endpoint to send it to. The gateway reports the hedges it sends instead
                // ([`RoutePolicies::on_hedge`]).
                b = listen(b, events, |b, l| {
                    b.listener(move |e: &Event| {
                        if !matches!(e, Event::HedgeStarted { .. }) {
                            l.on_event(e);
                        }
                    })
                });
                Some(b.build().map_err(|e| refused(&["hedge"], e))?)
            }
            None => None,
        };
        Ok(RoutePolicies {
            budget,
            backoff,
            hedge,
            latency,
            name,
            events: listeners,
        })
    }

    fn emit(&self, event: impl FnOnce(Arc<str>) -> Event) {
        self.events.emit(|| event(self.name.clone()));
    }

    /// Reports a retry (or a failover after a request was sent) about to wait `delay`; `reason`
    /// says what failed (`5xx`, `429`, `status`, `timeout`, `upstream_error`, `failover`).
    pub fn on_retry(&self, reason: &'static str, attempt: u32, delay: Duration) {
        self.emit(|name| Event::Retry {
            name,
            attempt,
            delay,
            reason,
        });
    }

    /// Reports a retry refused by the budget.
    pub fn on_budget_exhausted(&self) {
        self.emit(|name| Event::RetryBudgetExhausted { name });
    }

    /// Reports a timeout: `attempt` (per-try) or `total` (the route's deadline).
    pub fn on_timeout(&self, kind: &'static str) {
        self.emit(|name| Event::Timeout { name, kind });
    }

    /// Reports hedge number `hedge` of a call, which sent its request (`bulwark_hedges_total`).
    pub fn on_hedge(&self, hedge: u32) {
        self.emit(|name| Event::HedgeStarted { name, hedge });
    }

    /// Reports that the route's fallback answered instead of `kind` (an `x-bulwark-reason`).
    pub fn on_fallback(&self, kind: &'static str) {
        self.emit(|name| Event::Fallback { name, kind });
    }

    /// The route's hedging policy, if it hedges.
    pub fn hedge(&self) -> Option<&Hedge> {
        self.hedge.as_ref()
    }

    /// Latencies of the route's recent successful attempts (shared with the hedge).
    pub fn latency(&self) -> &Arc<LatencyWindow> {
        &self.latency
    }

    /// Whether a retry sent after `delay` can still finish by `deadline`, predicting its duration
    /// as the p90 of recent successful attempts (zero until 10 are known): the rule of the
    /// library's deadline-aware `Retry`.
    pub fn retry_fits(&self, delay: Duration, deadline: Instant) -> bool {
        let predicted = self
            .latency
            .percentile(DEFAULT_DEADLINE_PERCENTILE, DEFAULT_DEADLINE_MIN_SAMPLES)
            .unwrap_or_default();
        Instant::now()
            .checked_add(delay)
            .is_some_and(|at| at < deadline && deadline - at >= predicted)
    }

    /// Records a first attempt (earns retry credit).
    pub fn deposit(&self) {
        if let Some(b) = &self.budget {
            b.deposit();
        }
    }

    /// [`deposit`](Self::deposit) with the clock reading the caller has (the request's start).
    pub fn deposit_at(&self, now: Instant) {
        if let Some(b) = &self.budget {
            b.deposit_at(now);
        }
    }

    /// Takes the credit for one retry; `false` when the budget is exhausted. No budget: always `true`.
    /// The attempt loop calls it *before* sleeping in backoff, so retries waiting to be sent are
    /// already counted and a burst of failures cannot overshoot the budget.
    pub fn try_withdraw(&self) -> bool {
        self.budget.as_ref().is_none_or(RetryBudget::try_withdraw)
    }

    /// [`try_withdraw`](Self::try_withdraw), keeping the token: `None` when the budget is
    /// exhausted. A retry that then sends nothing gives it back with [`refund`](Self::refund).
    pub fn withdraw(&self) -> Option<RetryToken> {
        match &self.budget {
            None => Some(RetryToken(None)),
            Some(b) => b.withdraw().map(|w| RetryToken(Some(w))),
        }
    }

    /// Gives back the token of a retry that sent nothing (see [`RetryBudget::refund`]).
    pub fn refund(&self, token: RetryToken) {
        if let (Some(b), Some(w)) = (&self.budget, token.0) {
            b.refund(w);
        }
    }

    /// The retry budget, if the route has one (hedges draw on it too).
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    /// Delay before retry number `retry` (1 for the first retry).
    pub fn backoff(&self, retry: u32) -> Duration {
        self.backoff
            .iter()
            .nth(retry.saturating_sub(1) as usize)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> config::Upstream {
        config::Upstream {
            endpoints: vec![],
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

    #[tokio::test(start_paused = true)]
    async fn bulkhead_cap_without_queue() {
        let mut c = upstream();
        c.bulkhead = Some(config::Bulkhead {
            max_concurrent: 1,
            max_queued: 0,
            ..Default::default()
        });
        let p = UpstreamPolicies::new("u", &c, &None).unwrap();
        let a = p.admit().await.unwrap();
        assert_eq!(p.admit().await.unwrap_err(), Reject::BulkheadFull);
        drop(a);
        let mut a = p.admit().await.unwrap();
        a.release_slot();
        assert!(p.admit().await.is_ok(), "the slot was released early");
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_and_rejects_with_retry_after() {
        let mut c = upstream();
        c.circuit_breaker = Some(config::CircuitBreaker {
            window: config::Window {
                kind: config::WindowKind::Count,
                size: config::WindowSize::Calls(4),
            },
            minimum_calls: 2,
            open_duration: config::Dur::from_secs(5),
            ..Default::default()
        });
        let p = UpstreamPolicies::new("u", &c, &None).unwrap();
        for _ in 0..2 {
            p.admit().await.unwrap().record(Outcome::Failure);
        }
        assert_eq!(
            p.admit().await.unwrap_err(),
            Reject::CircuitOpen {
                retry_after: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn backoff_kinds_map_to_the_library() {
        let b = |kind, jitter| {
            RoutePolicies::new(Some(&config::Retry {
                backoff: config::Backoff {
                    kind,
                    base: config::Dur::from_millis(100),
                    max: config::Dur::from_millis(300),
                    jitter,
                },
                ..Default::default()
            }))
            .unwrap()
        };
        let ms = Duration::from_millis;
        use config::{BackoffKind as K, Jitter as J};
        let seq = |p: RoutePolicies, n: u32| (1..=n).map(|i| p.backoff(i)).collect::<Vec<_>>();
        assert_eq!(
            seq(b(K::Exponential, J::None), 3),
            [ms(100), ms(200), ms(300)]
        );
        assert_eq!(
            seq(b(K::Fibonacci, J::None), 4),
            [ms(100), ms(100), ms(200), ms(300)]
        );
        assert_eq!(seq(b(K::Constant, J::None), 2), [ms(100), ms(100)]);
        assert_eq!(seq(b(K::Linear, J::None), 3), [ms(100), ms(200), ms(300)]);
        // Full jitter: each delay within [0, d].
        let full = seq(b(K::Exponential, J::Full), 3);
        assert!(full
            .iter()
            .zip([ms(100), ms(200), ms(300)])
            .all(|(got, d)| *got <= d));
        // Decorrelated jitter carries its own randomness: a configured jitter is not added.
        let p = b(K::DecorrelatedJitter, J::Full);
        assert!((1..=5).all(|n| (ms(100)..=ms(300)).contains(&p.backoff(n))));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_fits_uses_the_p90_of_recent_attempts() {
        let p = RoutePolicies::new(None).unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        // No history: only the deadline itself counts.
        assert!(p.retry_fits(Duration::from_millis(499), deadline));
        assert!(!p.retry_fits(Duration::from_millis(500), deadline));
        for ms in [100, 100, 100, 100, 100, 100, 100, 100, 100, 300] {
            p.latency().record(Duration::from_millis(ms));
        }
        // p90 of ten samples is the 9th smallest: 100 ms.
        assert!(p.retry_fits(Duration::from_millis(400), deadline));
        assert!(!p.retry_fits(Duration::from_millis(401), deadline));
    }

    #[test]
    fn hedges_draw_on_the_route_budget() {
        let retry = config::Retry {
            budget: Some(config::Budget {
                ratio: 0.0,
                min_per_second: 0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let hedge = config::Hedge {
            delay: config::HedgeDelay::Fixed(config::Dur::from_millis(5)),
            ..Default::default()
        };
        let p = RoutePolicies::with_hedge("r", Some(&retry), Some(&hedge), &None).unwrap();
        let h = p.hedge().unwrap();
        assert_eq!(h.current_delay(), Duration::from_millis(5));
        assert!(std::sync::Arc::ptr_eq(h.latency(), p.latency()));
        assert!(!p.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_hedge_stops_hedging_for_its_call_only() {
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        let retry = config::Retry {
            budget: Some(config::Budget {
                ratio: 0.0,
                min_per_second: 1,
                window: config::Dur::from_secs(10),
            }),
            ..Default::default()
        };
        let hedge = config::Hedge {
            delay: config::HedgeDelay::Fixed(config::Dur::from_millis(10)),
            max_hedges: 3,
            ..Default::default()
        };
        let p = RoutePolicies::with_hedge("r", Some(&retry), Some(&hedge), &None).unwrap();
        let h = p.hedge().unwrap();
        // The hedge is "refused" (an error that stops hedging); the original still wins.
        let classify = |r: &Result<u32, u32>| match r {
            Ok(_) => Outcome::Success,
            Err(_) => {
                stop_hedging();
                Outcome::Failure
            }
        };
        let call = |made: &'static AtomicU32| {
            h.call_with(&classify, move || {
                let i = made.fetch_add(1, SeqCst);
                async move {
                    if i == 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(i)
                    } else {
                        Err(i)
                    }
                }
            })
        };
        static FIRST: AtomicU32 = AtomicU32::new(0);
        assert_eq!(hedged(call(&FIRST)).await.unwrap(), 0);
        assert_eq!(FIRST.load(SeqCst), 2, "one hedge only");
        assert_eq!(p.budget().unwrap().balance(), 9);
        // The next call hedges again.
        static SECOND: AtomicU32 = AtomicU32::new(0);
        assert_eq!(hedged(call(&SECOND)).await.unwrap(), 0);
        assert_eq!(SECOND.load(SeqCst), 2);
        assert_eq!(p.budget().unwrap().balance(), 8);
    }
}
