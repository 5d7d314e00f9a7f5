//! The breaker's shared state and its state machine.
//!
//! Split in two, as linkerd2-proxy splits its breakers: a *gate* that every call
//! reads (one atomic state word) and records into (the lock-free window), and the
//! *decision logic* (a `std::sync::Mutex<Control>`) that is only entered when a
//! threshold check says "maybe trip", on time-driven moves (open -> half-open,
//! end of ramp), for half-open probes and for manual transitions.
//!
//! The state word packs `generation << 8 | state`. Every transition bumps the
//! generation, and a permit remembers the word it was admitted under: an outcome
//! that arrives after the breaker moved on (a closed-state call finishing after
//! the breaker opened, a ramp call finishing after it re-opened) is dropped
//! instead of polluting the next state's window. (The check precedes the lock-free
//! record, so a recorder preempted across a whole open -> half-open -> closed cycle
//! can still add one sample to the fresh window: a bounded, harmless race that a
//! lock on the hot path would be too expensive to close.)

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::window::{CountWindow, Counts, Padded, TimeWindow, CALL, FAIL, SLOW};
use crate::events::{BreakerState, Event, Listeners};
use crate::{Error, Outcome};

pub(crate) const CLOSED: u8 = 0;
pub(crate) const OPEN: u8 = 1;
pub(crate) const HALF_OPEN: u8 = 2;
pub(crate) const RAMPING: u8 = 3;
pub(crate) const FORCED_OPEN: u8 = 4;
pub(crate) const DISABLED: u8 = 5;
pub(crate) const METRICS_ONLY: u8 = 6;

const STATE_MASK: u64 = 0xff;
const PPM: u128 = 1_000_000;

/// Longest retry-after hint given to a caller rejected in half-open (no probe
/// slot free) or during the ramp: probes usually report within one request's
/// time, and a ramp admits more every moment, so "try again in a second" (or
/// sooner, when a lease or the ramp ends first) is the useful answer.
pub(crate) const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

#[inline]
fn st(word: u64) -> u8 {
    (word & STATE_MASK) as u8
}

pub(crate) fn public_state(s: u8) -> BreakerState {
    match s {
        CLOSED => BreakerState::Closed,
        OPEN => BreakerState::Open,
        HALF_OPEN => BreakerState::HalfOpen,
        RAMPING => BreakerState::Ramping,
        FORCED_OPEN => BreakerState::ForcedOpen,
        DISABLED => BreakerState::Disabled,
        _ => BreakerState::MetricsOnly,
    }
}

/// Saturating conversion of a duration to nanoseconds.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The validated settings, in the units the hot path uses.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) minimum_calls: u64,
    /// Thresholds in parts per billion of calls.
    pub(crate) failure_ppb: u64,
    pub(crate) slow_ppb: u64,
    pub(crate) slow_nanos: Option<u64>,
    pub(crate) open_nanos: u64,
    /// (multiplier, cap in nanos)
    pub(crate) growth: Option<(f64, u64)>,
    pub(crate) half_open_calls: usize,
    pub(crate) lease_nanos: u64,
    /// (ramp length in nanos, starting fraction in parts per million)
    pub(crate) ramp: Option<(u64, u64)>,
}

impl Config {
    /// True when `c` crosses a threshold with at least `min` calls.
    #[inline]
    fn trips(&self, c: Counts, min: u64) -> bool {
        if !c.is_sane() || c.calls == 0 || c.calls < min {
            return false;
        }
        let calls = u128::from(c.calls);
        const BILLION: u128 = 1_000_000_000;
        u128::from(c.failures) * BILLION >= u128::from(self.failure_ppb) * calls
            || (self.slow_nanos.is_some()
                && u128::from(c.slow) * BILLION >= u128::from(self.slow_ppb) * calls)
    }

    /// The open duration for the `trips`-th consecutive trip (0 = first).
    fn open_nanos_for(&self, trips: u32) -> u64 {
        match self.growth {
            None => self.open_nanos,
            Some((mult, max)) => {
                let grown = self.open_nanos as f64 * mult.powi(trips.min(1024) as i32);
                if grown >= max as f64 {
                    max
                } else {
                    grown as u64
                }
            }
        }
    }
}

#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    fn reset(&self) {
        match self {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
        }
    }
}

/// One half-open probe slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Free,
    Leased { token: u64, expires: u64 },
    Done { code: u8 },
}

/// What the decision logic owns.
#[derive(Debug)]
struct Control {
    /// Consecutive trips since the breaker last closed (drives growth).
    trips: u32,
    probes: Vec<Probe>,
    next_token: u64,
    /// The first probe token of the current half-open period.
    half_open_from: u64,
    /// Transitions decided and not yet delivered to the listeners, in the order
    /// they were decided (only filled when someone listens).
    outbox: VecDeque<Move>,
    /// True while one caller delivers the outbox (see [`Inner::deliver`]).
    delivering: bool,
}

/// Counters of the calls admitted during a ramp.
#[derive(Debug, Default)]
struct Ramp {
    start: AtomicU64,
    seq: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

/// What a permit was admitted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Closed state, admitted under this state word.
    Closed(u64),
    /// A half-open probe holding `slot` under lease `token`.
    Probe { slot: u32, token: u64 },
    /// Admitted during the ramp under this state word.
    Ramp(u64),
    /// Metrics-only: recorded, never acted on.
    Shadow(u64),
    /// Disabled: nothing to record.
    Pass,
    /// Already recorded or released.
    Done,
}

/// The permit's state, shared by [`Permit`](super::Permit) and the borrowed guard.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) kind: Kind,
    /// Set only when slow-call detection is on.
    pub(crate) start: Option<Instant>,
}

/// A transition to report once the lock is released.
#[derive(Debug, Clone, Copy)]
struct Move {
    from: BreakerState,
    to: BreakerState,
    word: u64,
}

/// The breaker's shared state.
#[derive(Debug)]
pub(crate) struct Inner {
    /// `generation << 8 | state`, on its own cache line.
    state: Padded<AtomicU64>,
    pub(crate) name: Arc<str>,
    /// Nanos since `origin` when the open state ends.
    open_until: AtomicU64,
    pub(crate) cfg: Config,
    pub(crate) window: Window,
    origin: Instant,
    ramp: Ramp,
    control: Mutex<Control>,
    listeners: Listeners,
}

impl Inner {
    pub(crate) fn new(name: Arc<str>, cfg: Config, window: Window, listeners: Listeners) -> Self {
        let probes = vec![Probe::Free; cfg.half_open_calls];
        Inner {
            state: Padded(AtomicU64::new(u64::from(CLOSED))),
            name,
            open_until: AtomicU64::new(0),
            cfg,
            window,
            origin: Instant::now(),
            ramp: Ramp::default(),
            control: Mutex::new(Control {
                trips: 0,
                probes,
                next_token: 1,
                half_open_from: 1,
                outbox: VecDeque::new(),
                delivering: false,
            }),
            listeners,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        // Nothing panics while holding the lock (listeners run after it is
        // released), and Control stays consistent at every await-free step anyway.
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    fn since_origin(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.origin))
    }

    pub(crate) fn state(&self) -> BreakerState {
        public_state(st(self.state.0.load(Ordering::Acquire)))
    }

    /// Delivers the transitions decided so far, after the decision lock is released, in the order
    /// they were decided. One caller at a time delivers: a caller that finds another one at it
    /// leaves its transition to that one, so two transitions decided on two threads never reach a
    /// listener in reverse. A listener that itself moves the breaker finds its own caller
    /// delivering, and its transition follows once it returns (no deadlock). A listener that
    /// panics does not stop the delivery of what others left to this caller: the panic goes on
    /// once the outbox is empty.
    fn emit(&self, m: Option<Move>) {
        if m.is_none() || self.listeners.is_empty() {
            return;
        }
        let mut ctl = self.lock();
        if ctl.delivering {
            return;
        }
        ctl.delivering = true;
        let mut panicked = None;
        while let Some(m) = ctl.outbox.pop_front() {
            drop(ctl);
            let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.listeners.emit(|| Event::BreakerTransition {
                    name: self.name.clone(),
                    from: m.from,
                    to: m.to,
                })
            }));
            if let Err(p) = delivered {
                panicked.get_or_insert(p);
            }
            ctl = self.lock();
        }
        ctl.delivering = false;
        drop(ctl);
        if let Some(p) = panicked {
            std::panic::resume_unwind(p);
        }
    }

    // -----------------------------------------------------------------------
    // Admission
    // -----------------------------------------------------------------------

    /// Admits or rejects one call. Closed state: one atomic load (plus a clock
    /// read when slow-call detection is on).
    #[inline]
    pub(crate) fn acquire(&self) -> Result<Core, Error<Infallible>> {
        let w = self.state.0.load(Ordering::Acquire);
        if st(w) == CLOSED {
            let start = if self.cfg.slow_nanos.is_some() {
                Some(Instant::now())
            } else {
                None
            };
            return Ok(Core {
                kind: Kind::Closed(w),
                start,
            });
        }
        self.acquire_cold(w)
    }

    #[cold]
    fn acquire_cold(&self, w: u64) -> Result<Core, Error<Infallible>> {
        let now = Instant::now();
        let now_ns = self.since_origin(now);
        let decided = match st(w) {
            DISABLED => Ok(Kind::Pass),
            METRICS_ONLY => Ok(Kind::Shadow(w)),
            FORCED_OPEN => Err(self.cfg.open_nanos),
            OPEN => {
                let until = self.open_until.load(Ordering::Acquire);
                if now_ns < until {
                    Err(until - now_ns)
                } else {
                    self.acquire_locked(now_ns)
                }
            }
            RAMPING if now_ns < self.ramp_end() => self.ramp_admit(w, now_ns),
            _ => self.acquire_locked(now_ns),
        };
        match decided {
            Ok(kind) => Ok(Core {
                kind,
                start: self.cfg.slow_nanos.map(|_| now),
            }),
            Err(retry_nanos) => {
                self.listeners.emit(|| Event::BreakerRejected {
                    name: self.name.clone(),
                });
                Err(Error::CircuitOpen {
                    name: self.name.clone(),
                    retry_after: Duration::from_nanos(retry_nanos),
                })
            }
        }
    }

    /// Admission that may transition: under the lock, so exactly one caller moves
    /// open -> half-open (or ends the ramp), and probes are counted exactly.
    fn acquire_locked(&self, now_ns: u64) -> Result<Kind, u64> {
        let mut moved = None;
        let decided = {
            let mut ctl = self.lock();
            let w = self.state.0.load(Ordering::Acquire);
            match st(w) {
                CLOSED => Ok(Kind::Closed(w)),
                DISABLED => Ok(Kind::Pass),
                METRICS_ONLY => Ok(Kind::Shadow(w)),
                FORCED_OPEN => Err(self.cfg.open_nanos),
                OPEN => {
                    let until = self.open_until.load(Ordering::Acquire);
                    if now_ns < until {
                        Err(until - now_ns)
                    } else {
                        moved = Some(self.set_state(&mut ctl, HALF_OPEN, now_ns));
                        self.lease_probe(&mut ctl, now_ns)
                    }
                }
                HALF_OPEN => self.lease_probe(&mut ctl, now_ns),
                _ramping => {
                    if now_ns >= self.ramp_end() {
                        let m = self.set_state(&mut ctl, CLOSED, now_ns);
                        moved = Some(m);
                        Ok(Kind::Closed(m.word))
                    } else {
                        self.ramp_admit(w, now_ns)
                    }
                }
            }
        };
        self.emit(moved);
        decided
    }

    /// Leases a free probe slot, first reclaiming slots whose lease ran out.
    /// Rejected callers are told to come back when the earliest lease ends, or in
    /// [`BUSY_RETRY_AFTER`] if that is sooner. (With no free slot, at least one is
    /// leased: a slot only stays `Done` until all are, and then the breaker moves.)
    fn lease_probe(&self, ctl: &mut Control, now_ns: u64) -> Result<Kind, u64> {
        let mut free = None;
        let mut earliest = u64::MAX;
        for (i, p) in ctl.probes.iter_mut().enumerate() {
            if let Probe::Leased { expires, .. } = *p {
                if expires <= now_ns {
                    *p = Probe::Free;
                } else {
                    earliest = earliest.min(expires);
                }
            }
            if free.is_none() && *p == Probe::Free {
                free = Some(i);
            }
        }
        match free {
            Some(i) => {
                let token = ctl.next_token;
                ctl.next_token += 1;
                ctl.probes[i] = Probe::Leased {
                    token,
                    expires: now_ns.saturating_add(self.cfg.lease_nanos),
                };
                Ok(Kind::Probe {
                    slot: i as u32,
                    token,
                })
            }
            None => Err((earliest - now_ns).min(nanos(BUSY_RETRY_AFTER))),
        }
    }

    fn ramp_end(&self) -> u64 {
        let len = self.cfg.ramp.map_or(0, |(len, _)| len);
        self.ramp.start.load(Ordering::Acquire).saturating_add(len)
    }

    /// Deterministic fractional admission: call number `i` is admitted when
    /// `ceil((i + 1) * f) > ceil(i * f)`, so exactly `f` of any run of calls at a
    /// fixed fraction gets through, the first one included.
    fn ramp_admit(&self, w: u64, now_ns: u64) -> Result<Kind, u64> {
        let (len, start_ppm) = self.cfg.ramp.unwrap_or((1, PPM as u64));
        let start = self.ramp.start.load(Ordering::Acquire);
        let elapsed = u128::from(now_ns.saturating_sub(start).min(len));
        let f = u128::from(start_ppm)
            + (PPM - u128::from(start_ppm)) * elapsed / u128::from(len.max(1));
        let i = u128::from(self.ramp.seq.fetch_add(1, Ordering::Relaxed));
        let ceil = |x: u128| x.div_ceil(PPM);
        if ceil((i + 1) * f) > ceil(i * f) {
            Ok(Kind::Ramp(w))
        } else {
            let left = start.saturating_add(len).saturating_sub(now_ns);
            Err(left.min(nanos(BUSY_RETRY_AFTER)).max(1))
        }
    }

    // -----------------------------------------------------------------------
    // Recording
    // -----------------------------------------------------------------------

    /// Records the outcome of an admitted call. `Ignore` releases the permit.
    #[inline]
    pub(crate) fn record(&self, core: &mut Core, outcome: Outcome) {
        let kind = std::mem::replace(&mut core.kind, Kind::Done);
        let failure = match outcome {
            Outcome::Success => false,
            Outcome::Ignore => return self.release_kind(kind),
            Outcome::Failure | Outcome::FailureRetryAfter(_) => true,
        };
        if matches!(kind, Kind::Pass | Kind::Done) {
            return;
        }
        let needs_clock = core.start.is_some() || matches!(self.window, Window::Time(_));
        let now = if needs_clock {
            Some(Instant::now())
        } else {
            None
        };
        let mut code = CALL;
        if failure {
            code |= FAIL;
        }
        if let (Some(start), Some(now), Some(slow)) = (core.start, now, self.cfg.slow_nanos) {
            if nanos(now.saturating_duration_since(start)) > slow {
                code |= SLOW;
            }
        }
        match kind {
            Kind::Closed(w) => self.record_window(w, code, now, true),
            Kind::Shadow(w) => self.record_window(w, code, now, false),
            Kind::Probe { slot, token } => self.record_probe(slot, token, code),
            Kind::Ramp(w) => self.record_ramp(w, code),
            Kind::Pass | Kind::Done => {}
        }
    }

    #[inline]
    fn record_window(&self, w: u64, code: u8, now: Option<Instant>, act: bool) {
        if self.state.0.load(Ordering::Acquire) != w {
            return;
        }
        let counts = match &self.window {
            Window::Count(cw) => match cw.record(code) {
                Some(c) => c,
                None => return,
            },
            Window::Time(tw) => {
                let now_ns = now.map_or(0, |n| self.since_origin(n));
                tw.record(code, now_ns);
                tw.counts(now_ns)
            }
        };
        if act && self.cfg.trips(counts, self.cfg.minimum_calls) {
            self.trip_closed(w);
        }
    }

    /// The threshold check said "maybe": re-check under the lock and open.
    #[cold]
    fn trip_closed(&self, w: u64) {
        let now_ns = self.since_origin(Instant::now());
        let moved = {
            let mut ctl = self.lock();
            if self.state.0.load(Ordering::Acquire) != w {
                return;
            }
            let counts = match &self.window {
                Window::Count(cw) => cw.counts(),
                Window::Time(tw) => tw.counts(now_ns),
            };
            if !self.cfg.trips(counts, self.cfg.minimum_calls) {
                return;
            }
            self.set_state(&mut ctl, OPEN, now_ns)
        };
        self.emit(Some(moved));
    }

    #[cold]
    fn record_probe(&self, slot: u32, token: u64, code: u8) {
        let now_ns = self.since_origin(Instant::now());
        let moved = 'decided: {
            let mut ctl = self.lock();
            if st(self.state.0.load(Ordering::Acquire)) != HALF_OPEN {
                return;
            }
            let half_open_from = ctl.half_open_from;
            match ctl.probes.get_mut(slot as usize) {
                Some(p) if matches!(*p, Probe::Leased { token: t, .. } if t == token) => {
                    *p = Probe::Done { code };
                }
                // A probe of this half-open period whose lease ran out (its slot went to another
                // caller) and that failed after all: the dependency is still failing, and the
                // breaker opens again (as a late failed test call does in Polly). Otherwise a
                // dependency slower than the lease would never be judged: half-open for good,
                // a new probe sent into it at each lease's end.
                _ if token >= half_open_from && {
                    let mut one = Counts::default();
                    one.add(code);
                    self.cfg.trips(one, 0)
                } =>
                {
                    break 'decided self.set_state(&mut ctl, OPEN, now_ns);
                }
                _ => return,
            }
            let mut counts = Counts::default();
            for p in &ctl.probes {
                match *p {
                    Probe::Done { code } => counts.add(code),
                    _ => return,
                }
            }
            let to = if self.cfg.trips(counts, 0) {
                OPEN
            } else if self.cfg.ramp.is_some() {
                RAMPING
            } else {
                CLOSED
            };
            self.set_state(&mut ctl, to, now_ns)
        };
        self.emit(Some(moved));
    }

    #[cold]
    fn record_ramp(&self, w: u64, code: u8) {
        if self.state.0.load(Ordering::Acquire) != w {
            return;
        }
        let r = &self.ramp;
        let bump = |c: &AtomicU64, yes: bool| {
            if yes {
                c.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                c.load(Ordering::Relaxed)
            }
        };
        let counts = Counts {
            calls: bump(&r.calls, true),
            failures: bump(&r.failures, code & FAIL != 0),
            slow: bump(&r.slow, code & SLOW != 0),
        };
        if !self.cfg.trips(counts, self.cfg.minimum_calls) {
            return;
        }
        let now_ns = self.since_origin(Instant::now());
        let moved = {
            let mut ctl = self.lock();
            if self.state.0.load(Ordering::Acquire) != w {
                return;
            }
            self.set_state(&mut ctl, OPEN, now_ns)
        };
        self.emit(Some(moved));
    }

    /// Frees whatever the permit holds, without counting an outcome.
    #[inline]
    pub(crate) fn release(&self, core: &mut Core) {
        let kind = std::mem::replace(&mut core.kind, Kind::Done);
        self.release_kind(kind);
    }

    #[inline]
    fn release_kind(&self, kind: Kind) {
        if let Kind::Probe { slot, token } = kind {
            self.release_probe(slot, token);
        }
    }

    #[cold]
    fn release_probe(&self, slot: u32, token: u64) {
        let mut ctl = self.lock();
        if st(self.state.0.load(Ordering::Acquire)) != HALF_OPEN {
            return;
        }
        if let Some(p) = ctl.probes.get_mut(slot as usize) {
            if matches!(*p, Probe::Leased { token: t, .. } if t == token) {
                *p = Probe::Free;
            }
        }
    }

    // -----------------------------------------------------------------------
    // Transitions
    // -----------------------------------------------------------------------

    /// Moves to `to`, running its entry actions first and publishing the new
    /// state word last (so a reader that sees the state sees its deadline).
    fn set_state(&self, ctl: &mut Control, to: u8, now_ns: u64) -> Move {
        let old = self.state.0.load(Ordering::Acquire);
        match to {
            CLOSED => {
                self.window.reset();
                ctl.trips = 0;
            }
            METRICS_ONLY => self.window.reset(),
            OPEN => {
                let d = self.cfg.open_nanos_for(ctl.trips);
                ctl.trips = ctl.trips.saturating_add(1);
                self.open_until
                    .store(now_ns.saturating_add(d), Ordering::Release);
            }
            HALF_OPEN => {
                ctl.probes.iter_mut().for_each(|p| *p = Probe::Free);
                ctl.half_open_from = ctl.next_token;
            }
            RAMPING => {
                let r = &self.ramp;
                r.seq.store(0, Ordering::Relaxed);
                r.calls.store(0, Ordering::Relaxed);
                r.failures.store(0, Ordering::Relaxed);
                r.slow.store(0, Ordering::Relaxed);
                r.start.store(now_ns, Ordering::Release);
            }
            _ => {}
        }
        let word = (((old >> 8) + 1) << 8) | u64::from(to);
        self.state.0.store(word, Ordering::Release);
        let m = Move {
            from: public_state(st(old)),
            to: public_state(to),
            word,
        };
        if !self.listeners.is_empty() {
            ctl.outbox.push_back(m);
        }
        m
    }

    /// A manual transition; no-op (and no event) when already in `to`.
    pub(crate) fn manual(&self, to: u8) {
        let now_ns = self.since_origin(Instant::now());
        let moved = {
            let mut ctl = self.lock();
            if st(self.state.0.load(Ordering::Acquire)) == to {
                None
            } else {
                Some(self.set_state(&mut ctl, to, now_ns))
            }
        };
        self.emit(moved);
    }

    /// [`manual`](Self::manual) without the event: the state is set as if the breaker had been
    /// built in it.
    pub(crate) fn manual_quiet(&self, to: u8) {
        let now_ns = self.since_origin(Instant::now());
        let mut ctl = self.lock();
        if st(self.state.0.load(Ordering::Acquire)) != to {
            self.set_state(&mut ctl, to, now_ns);
            // `set_state` queued its move last, under this lock: take it back undelivered.
            if !self.listeners.is_empty() {
                ctl.outbox.pop_back();
            }
        }
    }

    /// Back to a fresh closed breaker: empty window, no trip history.
    pub(crate) fn reset(&self) {
        let now_ns = self.since_origin(Instant::now());
        let moved = {
            let mut ctl = self.lock();
            if st(self.state.0.load(Ordering::Acquire)) == CLOSED {
                self.window.reset();
                ctl.trips = 0;
                None
            } else {
                Some(self.set_state(&mut ctl, CLOSED, now_ns))
            }
        };
        self.emit(moved);
    }

    // -----------------------------------------------------------------------
    // Reading
    // -----------------------------------------------------------------------

    /// The closed (or metrics-only) window's counts now.
    pub(crate) fn window_counts(&self) -> Counts {
        match &self.window {
            Window::Count(w) => w.counts(),
            Window::Time(w) => w.counts(self.since_origin(Instant::now())),
        }
    }

    pub(crate) fn would_trip(&self, c: Counts) -> bool {
        self.cfg.trips(c, self.cfg.minimum_calls)
    }

    /// Consecutive trips since the breaker last closed.
    pub(crate) fn trips(&self) -> u32 {
        self.lock().trips
    }

    /// Remaining open time, when open.
    pub(crate) fn open_remaining(&self) -> Option<Duration> {
        let w = self.state.0.load(Ordering::Acquire);
        (st(w) == OPEN).then(|| {
            let now_ns = self.since_origin(Instant::now());
            Duration::from_nanos(
                self.open_until
                    .load(Ordering::Acquire)
                    .saturating_sub(now_ns),
            )
        })
    }
}
