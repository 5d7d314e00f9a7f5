//! The state machine both hedging APIs share: one original attempt, hedges started
//! on a timer (or at once when an attempt fails), first success wins.
//!
//! Everything is polled inside one future, so dropping it drops every attempt; no
//! task is spawned. The original attempt is held inline and the hedges go into a
//! `FuturesUnordered` created only when the first hedge starts, so a call that
//! never hedges allocates nothing here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::Shared;
use crate::classify::{Classify, Outcome};
use crate::events::Event;

/// Makes one more attempt of the same operation.
pub(crate) trait MakeAttempt {
    /// One attempt.
    type Future: Future;
    /// Starts (creates) an attempt.
    fn make(&mut self) -> Self::Future;
}

/// A closure as an attempt factory.
pub(crate) struct FnMaker<F>(pub(crate) F);

impl<F, Fut> MakeAttempt for FnMaker<F>
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    type Future = Fut;

    fn make(&mut self) -> Fut {
        (self.0)()
    }
}

pin_project! {
    /// An attempt and the instant it started.
    pub(crate) struct Timed<F> {
        #[pin]
        fut: F,
        start: Instant,
    }
}

impl<F> Timed<F> {
    fn new(fut: F) -> Self {
        Timed {
            fut,
            start: Instant::now(),
        }
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = (F::Output, Instant);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.fut.poll(cx).map(|out| (out, *this.start))
    }
}

/// The parts of the race that need no pinning.
struct State<M: MakeAttempt, C, O> {
    make: M,
    classify: C,
    policy: Arc<Shared>,
    delay: Duration,
    hedges: Option<FuturesUnordered<Timed<M::Future>>>,
    /// Hedges started so far.
    started: u32,
    /// Attempts still running (original included).
    running: usize,
    /// The admission hook refused a hedge: no more for this call.
    refused: bool,
    /// When the next hedge is due.
    next_at: Instant,
    last_failure: Option<O>,
}

impl<M: MakeAttempt, C, O> State<M, C, O> {
    fn may_hedge(&self) -> bool {
        !self.refused && self.started < self.policy.max_hedges
    }

    /// Starts the next hedge if the admission hook allows; returns whether it did.
    fn start_hedge(&mut self) -> bool {
        if let Some(admit) = &self.policy.admit {
            if !admit() {
                self.refused = true;
                return false;
            }
        }
        self.started += 1;
        self.running += 1;
        let hedge = self.started;
        self.policy.listeners.emit(|| Event::HedgeStarted {
            name: self.policy.name.clone(),
            hedge,
        });
        let attempt = Timed::new(self.make.make());
        self.hedges
            .get_or_insert_with(FuturesUnordered::new)
            .push(attempt);
        self.next_at = after(Instant::now(), self.delay);
        true
    }
}

pin_project! {
    /// Races the original attempt against hedges. Resolves to the first result that
    /// is not a failure, or to the last failure when every attempt failed.
    pub(crate) struct Race<M: MakeAttempt, C, O> {
        #[pin]
        first: Option<Timed<M::Future>>,
        #[pin]
        sleep: Option<Sleep>,
        state: State<M, C, O>,
    }
}

impl<M, C, T, E> Race<M, C, Result<T, E>>
where
    M: MakeAttempt,
    M::Future: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    /// A race whose original attempt is `first` (already started by the caller).
    pub(crate) fn new(
        first: M::Future,
        make: M,
        classify: C,
        policy: Arc<Shared>,
        delay: Duration,
    ) -> Self {
        let first = Timed::new(first);
        let next_at = after(first.start, delay);
        Race {
            first: Some(first),
            sleep: None,
            state: State {
                make,
                classify,
                policy,
                delay,
                hedges: None,
                started: 0,
                running: 1,
                refused: false,
                next_at,
                last_failure: None,
            },
        }
    }
}

/// `from + delay`, saturating: a huge delay (`Duration::MAX` to hedge only on
/// failures) must not overflow the clock.
fn after(from: Instant, delay: Duration) -> Instant {
    crate::timeout::saturating_after(from, delay)
}

/// What to do with one finished attempt.
enum Step<O> {
    Done(O),
    Continue,
}

fn on_result<M, C, T, E>(
    state: &mut State<M, C, Result<T, E>>,
    result: Result<T, E>,
    start: Instant,
    original_start: Option<Instant>,
    hedge: bool,
) -> Step<Result<T, E>>
where
    M: MakeAttempt,
    C: Classify<T, E>,
{
    state.running -= 1;
    match state.classify.classify(&result) {
        Outcome::Success => {
            let now = Instant::now();
            state.policy.latency.record(now - start);
            // The original attempt is about to be cancelled: its latency is at least
            // its elapsed time. Recording that lower bound keeps the window from
            // losing exactly the slow samples hedging cuts off, which would drag a
            // percentile delay down and make hedging ever more frequent.
            if let Some(original) = original_start {
                state.policy.latency.record(now - original);
            }
            Step::Done(result)
        }
        // A hedge's ignored result while another attempt still runs is no answer: it is most
        // likely a local refusal that sent nothing (an open breaker's, say, while the original
        // is the breaker's half-open probe), and ending the race on it would cancel an attempt
        // that may yet succeed. No further hedge is started (it would be refused too).
        Outcome::Ignore if hedge && state.running > 0 => {
            state.refused = true;
            Step::Continue
        }
        // Otherwise an ignored result is final (an earlier attempt's failure, if any, is the
        // answer an attempt got), but it is not a latency sample of a success.
        Outcome::Ignore => Step::Done(match state.last_failure.take() {
            Some(failure) if hedge => failure,
            _ => result,
        }),
        Outcome::Failure | Outcome::FailureRetryAfter(_) => {
            state.last_failure = Some(result);
            // gRPC hedging: a (non-fatal) failure sends the next hedge at once
            // instead of waiting out its delay.
            if state.may_hedge() {
                state.start_hedge();
            }
            Step::Continue
        }
    }
}

impl<M, C, T, E> Future for Race<M, C, Result<T, E>>
where
    M: MakeAttempt,
    M::Future: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let mut progressed = false;

            if let Some(first) = this.first.as_mut().as_pin_mut() {
                if let Poll::Ready((result, start)) = first.poll(cx) {
                    this.first.set(None);
                    if let Step::Done(out) = on_result(this.state, result, start, None, false) {
                        // Cancel the hedges now, not when the caller drops this future.
                        this.state.hedges = None;
                        return Poll::Ready(out);
                    }
                    progressed = true;
                }
            }

            let original_start = this.first.as_ref().as_pin_ref().map(|f| f.start);
            while let Some(hedges) = this.state.hedges.as_mut() {
                match hedges.poll_next_unpin(cx) {
                    Poll::Ready(Some((result, start))) => {
                        if let Step::Done(out) =
                            on_result(this.state, result, start, original_start, true)
                        {
                            // Cancel the losers now, not when the caller drops this future.
                            this.first.set(None);
                            this.state.hedges = None;
                            return Poll::Ready(out);
                        }
                        progressed = true;
                    }
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }

            if this.state.running == 0 {
                // Every attempt failed and no hedge may start (`on_result` starts one
                // whenever it may).
                match this.state.last_failure.take() {
                    Some(out) => return Poll::Ready(out),
                    None => unreachable!("an attempt finished without a result"),
                }
            }

            if this.state.may_hedge() {
                let due = this.state.next_at;
                let fired = if Instant::now() >= due {
                    true
                } else {
                    match this.sleep.as_mut().as_pin_mut() {
                        Some(sleep) if sleep.deadline() == due => {}
                        Some(sleep) => sleep.reset(due),
                        None => this.sleep.set(Some(tokio::time::sleep_until(due))),
                    }
                    match this.sleep.as_mut().as_pin_mut() {
                        Some(sleep) => sleep.poll(cx).is_ready(),
                        None => false,
                    }
                };
                if fired {
                    this.state.start_hedge();
                    progressed = true;
                }
            }

            if !progressed {
                return Poll::Pending;
            }
        }
    }
}
