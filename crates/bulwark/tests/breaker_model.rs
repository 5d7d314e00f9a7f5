//! Property test: random sequences of calls, time steps and manual transitions go
//! through the breaker and through a plain reference model of its documented
//! behaviour; after every step both must agree on the state, on every admission
//! decision and retry-after, and on the window's counts.
//!
//! Sequential semantics: each call is acquired and reported before the next step
//! (a slow call advances time between the two), except `Forget`, which leaks its
//! permit.

use std::collections::VecDeque;
use std::time::Duration;

use bulwark::breaker::CircuitBreaker;
use bulwark::events::BreakerState::{self, *};
use bulwark::{Error, Outcome};
use proptest::prelude::*;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

// The configuration under test (identical for breaker and model).
const COUNT_WINDOW: usize = 5;
const TIME_WINDOW_SECS: u64 = 10; // 10 buckets of 1 s
const MIN_CALLS: u64 = 3;
const FAILURE_PCT: u64 = 50;
const SLOW_PCT: u64 = 60;
const SLOW: u64 = 100 * MS;
const OPEN: u64 = SEC;
const OPEN_MAX: u64 = 4 * SEC; // growth x2
const HALF_OPEN: usize = 2;
const LEASE: u64 = 1_500 * MS;
const RAMP: u64 = 2 * SEC;
const RAMP_START_PCT: u64 = 25;

#[derive(Debug, Clone, Copy)]
enum Op {
    Success,
    Failure,
    SlowSuccess,
    SlowFailure,
    Ignore,
    /// Acquire and leak the permit.
    Forget,
    Advance(u64),
    ForceOpen,
    Disable,
    MetricsOnly,
    Close,
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => Just(Op::Success),
        5 => Just(Op::Failure),
        2 => Just(Op::SlowSuccess),
        1 => Just(Op::SlowFailure),
        1 => Just(Op::Ignore),
        1 => Just(Op::Forget),
        4 => prop_oneof![Just(1), Just(99), Just(500), Just(999), Just(1000), 1u64..2500]
            .prop_map(|ms| Op::Advance(ms * MS)),
        1 => prop_oneof![
            Just(Op::ForceOpen),
            Just(Op::Disable),
            Just(Op::MetricsOnly),
            Just(Op::Close),
            Just(Op::Reset),
        ],
    ]
}

/// One recorded call: (failed, slow).
type Call = (bool, bool);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Free,
    Leased { expires: u64 },
    Done(Call),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Admit {
    Closed,
    Shadow,
    Pass,
    Probe(usize),
    Ramp,
}

/// The reference model: plain data, no atomics, everything recomputed.
struct Model {
    time_window: bool,
    ramp: bool,
    now: u64,
    state: BreakerState,
    /// Count window: the last calls. Time window: (time, call) for every call.
    calls: VecDeque<(u64, Call)>,
    open_until: u64,
    trips: u32,
    probes: Vec<Slot>,
    ramp_start: u64,
    ramp_seq: u64,
    ramp_calls: Vec<Call>,
}

impl Model {
    fn new(time_window: bool, ramp: bool) -> Self {
        Model {
            time_window,
            ramp,
            now: 0,
            state: Closed,
            calls: VecDeque::new(),
            open_until: 0,
            trips: 0,
            probes: vec![Slot::Free; HALF_OPEN],
            ramp_start: 0,
            ramp_seq: 0,
            ramp_calls: Vec::new(),
        }
    }

    /// The calls in the window now.
    fn window(&self) -> Vec<Call> {
        if self.time_window {
            let tick = self.now / SEC;
            self.calls
                .iter()
                .filter(|(t, _)| t / SEC + TIME_WINDOW_SECS > tick)
                .map(|(_, c)| *c)
                .collect()
        } else {
            self.calls.iter().map(|(_, c)| *c).collect()
        }
    }

    fn counts(calls: &[Call]) -> (u64, u64, u64) {
        let n = calls.len() as u64;
        let f = calls.iter().filter(|c| c.0).count() as u64;
        let s = calls.iter().filter(|c| c.1).count() as u64;
        (n, f, s)
    }

    fn crosses(calls: &[Call], min: u64) -> bool {
        let (n, f, s) = Self::counts(calls);
        n > 0 && n >= min && (f * 100 >= FAILURE_PCT * n || s * 100 >= SLOW_PCT * n)
    }

    fn enter(&mut self, to: BreakerState) {
        match to {
            Closed => {
                self.calls.clear();
                self.trips = 0;
            }
            MetricsOnly => self.calls.clear(),
            Open => {
                let d = (OPEN << self.trips.min(10)).min(OPEN_MAX);
                self.open_until = self.now + d;
                self.trips += 1;
            }
            HalfOpen => self.probes = vec![Slot::Free; HALF_OPEN],
            Ramping => {
                self.ramp_start = self.now;
                self.ramp_seq = 0;
                self.ramp_calls.clear();
            }
            _ => {}
        }
        self.state = to;
    }

    fn lease_probe(&mut self) -> Result<Admit, u64> {
        for s in &mut self.probes {
            if matches!(*s, Slot::Leased { expires } if expires <= self.now) {
                *s = Slot::Free;
            }
        }
        if let Some(i) = self.probes.iter().position(|s| *s == Slot::Free) {
            self.probes[i] = Slot::Leased {
                expires: self.now + LEASE,
            };
            return Ok(Admit::Probe(i));
        }
        let earliest = self
            .probes
            .iter()
            .filter_map(|s| match s {
                Slot::Leased { expires } => Some(*expires),
                _ => None,
            })
            .min()
            .unwrap();
        Err((earliest - self.now).min(SEC))
    }

    fn acquire(&mut self) -> Result<Admit, u64> {
        match self.state {
            Closed => Ok(Admit::Closed),
            Disabled => Ok(Admit::Pass),
            MetricsOnly => Ok(Admit::Shadow),
            ForcedOpen => Err(OPEN),
            Open if self.now < self.open_until => Err(self.open_until - self.now),
            Open => {
                self.enter(HalfOpen);
                self.lease_probe()
            }
            HalfOpen => self.lease_probe(),
            Ramping if self.now >= self.ramp_start + RAMP => {
                self.enter(Closed);
                Ok(Admit::Closed)
            }
            Ramping => {
                // Admit call i when ceil((i+1) f) > ceil(i f), f growing linearly.
                let elapsed = self.now - self.ramp_start;
                let start = u128::from(RAMP_START_PCT) * 10_000;
                let f = start + (1_000_000 - start) * u128::from(elapsed) / u128::from(RAMP);
                let i = u128::from(self.ramp_seq);
                self.ramp_seq += 1;
                if ((i + 1) * f).div_ceil(1_000_000) > (i * f).div_ceil(1_000_000) {
                    Ok(Admit::Ramp)
                } else {
                    Err((self.ramp_start + RAMP - self.now).min(SEC))
                }
            }
        }
    }

    fn record(&mut self, admit: Admit, outcome: Option<Call>) {
        let Some(call) = outcome else {
            if let Admit::Probe(i) = admit {
                if self.state == HalfOpen && matches!(self.probes[i], Slot::Leased { .. }) {
                    self.probes[i] = Slot::Free;
                }
            }
            return;
        };
        match admit {
            Admit::Closed | Admit::Shadow => {
                self.calls.push_back((self.now, call));
                if !self.time_window && self.calls.len() > COUNT_WINDOW {
                    self.calls.pop_front();
                }
                let min = if self.time_window {
                    MIN_CALLS
                } else {
                    MIN_CALLS.min(COUNT_WINDOW as u64)
                };
                if admit == Admit::Closed && Self::crosses(&self.window(), min) {
                    self.enter(Open);
                }
            }
            Admit::Probe(i) => {
                if self.state != HalfOpen || !matches!(self.probes[i], Slot::Leased { .. }) {
                    return;
                }
                self.probes[i] = Slot::Done(call);
                let done: Vec<Call> = self
                    .probes
                    .iter()
                    .filter_map(|s| match s {
                        Slot::Done(c) => Some(*c),
                        _ => None,
                    })
                    .collect();
                if done.len() == HALF_OPEN {
                    if Self::crosses(&done, 0) {
                        self.enter(Open);
                    } else if self.ramp {
                        self.enter(Ramping);
                    } else {
                        self.enter(Closed);
                    }
                }
            }
            Admit::Ramp => {
                self.ramp_calls.push(call);
                if Self::crosses(&self.ramp_calls, MIN_CALLS) {
                    self.enter(Open);
                }
            }
            Admit::Pass => {}
        }
    }

    fn manual(&mut self, to: BreakerState) {
        if self.state != to {
            self.enter(to);
        }
    }
}

fn run(time_window: bool, ramp: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut b = CircuitBreaker::builder()
            .minimum_calls(MIN_CALLS as u32)
            .failure_rate_threshold(FAILURE_PCT as f64)
            .slow_call_duration(Duration::from_nanos(SLOW))
            .slow_call_rate_threshold(SLOW_PCT as f64)
            .open_duration(Duration::from_nanos(OPEN))
            .open_duration_growth(2.0, Duration::from_nanos(OPEN_MAX))
            .half_open_calls(HALF_OPEN as u32)
            .probe_lease(Duration::from_nanos(LEASE));
        b = if time_window {
            b.time_window(Duration::from_secs(TIME_WINDOW_SECS))
        } else {
            b.count_window(COUNT_WINDOW)
        };
        if ramp {
            b = b
                .ramp_up(Duration::from_nanos(RAMP))
                .ramp_start_percent(RAMP_START_PCT as f64);
        }
        let b = b.build().unwrap();
        let mut m = Model::new(time_window, ramp);

        for (step, op) in ops.iter().enumerate() {
            let call = match *op {
                Op::Success => Some((Some((false, false)), 0)),
                Op::Failure => Some((Some((true, false)), 0)),
                Op::SlowSuccess => Some((Some((false, true)), SLOW + MS)),
                Op::SlowFailure => Some((Some((true, true)), SLOW + MS)),
                Op::Ignore => Some((None, 0)),
                Op::Forget => None,
                Op::Advance(d) => {
                    tokio::time::advance(Duration::from_nanos(d)).await;
                    m.now += d;
                    None
                }
                Op::ForceOpen => {
                    b.force_open();
                    m.manual(ForcedOpen);
                    None
                }
                Op::Disable => {
                    b.disable();
                    m.manual(Disabled);
                    None
                }
                Op::MetricsOnly => {
                    b.metrics_only();
                    m.manual(MetricsOnly);
                    None
                }
                Op::Close => {
                    b.close();
                    m.manual(Closed);
                    None
                }
                Op::Reset => {
                    b.reset();
                    m.calls.clear();
                    m.trips = 0;
                    m.manual(Closed);
                    None
                }
            };
            if matches!(op, Op::Forget) || call.is_some() {
                let got = b.try_acquire();
                let want = m.acquire();
                match (&got, &want) {
                    (Ok(_), Ok(_)) => {}
                    (Err(Error::CircuitOpen { retry_after, .. }), Err(w)) => {
                        prop_assert_eq!(
                            *retry_after,
                            Duration::from_nanos(*w),
                            "step {} {:?}",
                            step,
                            op
                        );
                    }
                    _ => prop_assert!(false, "step {step} {op:?}: breaker {got:?}, model {want:?}"),
                }
                if let (Ok(permit), Ok(admit)) = (got, want) {
                    prop_assert_eq!(permit.is_probe(), matches!(admit, Admit::Probe(_)));
                    match call {
                        None => std::mem::forget(permit),
                        Some((outcome, took)) => {
                            tokio::time::advance(Duration::from_nanos(took)).await;
                            m.now += took;
                            permit.record(match outcome {
                                None => Outcome::Ignore,
                                Some((true, _)) => Outcome::Failure,
                                Some((false, _)) => Outcome::Success,
                            });
                            m.record(admit, outcome);
                        }
                    }
                }
            }
            prop_assert_eq!(b.state(), m.state, "step {} {:?}", step, op);
            let s = b.snapshot();
            let (n, f, sl) = Model::counts(&m.window());
            prop_assert_eq!(
                (s.calls, s.failures, s.slow_calls),
                (n, f, sl),
                "window at step {} {:?}",
                step,
                op
            );
            prop_assert_eq!(s.consecutive_trips, m.trips, "trips at step {}", step);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn count_window_matches_the_model(ops in proptest::collection::vec(op(), 1..200)) {
        run(false, false, &ops)?;
    }

    #[test]
    fn time_window_matches_the_model(ops in proptest::collection::vec(op(), 1..200)) {
        run(true, false, &ops)?;
    }

    #[test]
    fn ramping_matches_the_model(
        time_window in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        run(time_window, true, &ops)?;
    }
}
