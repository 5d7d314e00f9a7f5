//! An absolute point in time that nested calls can read.

use std::future::Future;
use std::time::Duration;

use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Deadline;
}

/// The future returned by [`Deadline::scope`]: `fut` with a deadline in scope.
pub type Scoped<F> = TaskLocalFuture<Deadline, F>;

/// A point in time (a [`tokio::time::Instant`]) by which work must be done.
///
/// Unlike a timeout, a deadline does not shrink or grow as it is passed down: every
/// nested call sees the same instant, and asks how much time is [`remaining`]. It is
/// propagated through async code with [`Deadline::scope`] and read with
/// [`Deadline::current`]; a nested scope never extends an outer one.
///
/// ```
/// use std::time::Duration;
/// use bulwark::timeout::Deadline;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let outer = Deadline::after(Duration::from_secs(1));
/// Deadline::scope(outer, async {
///     // An inner scope asking for more time gets the outer, earlier deadline.
///     Deadline::scope(Deadline::after(Duration::from_secs(5)), async {
///         assert_eq!(Deadline::current(), Some(outer));
///     })
///     .await;
/// })
/// .await;
/// assert_eq!(Deadline::current(), None);
/// # }
/// ```
///
/// [`remaining`]: Deadline::remaining
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

/// `from + d`, saturating at about 30 years (later than any call lives, like tokio's own far
/// future): a huge `d` (`Duration::MAX` for "wait for ever") must not overflow the clock.
pub(crate) fn saturating_after(from: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    // (`checked_add` can only fail with the clock near its end of range.)
    from.checked_add(d.min(FAR)).unwrap_or(from)
}

impl Deadline {
    /// The deadline `d` from now.
    pub fn after(d: Duration) -> Self {
        // An absurdly long duration means "no practical deadline": clamped rather
        // than a panic on overflow.
        Deadline(saturating_after(Instant::now(), d))
    }

    /// The deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    /// The instant.
    pub fn instant(self) -> Instant {
        self.0
    }

    /// Time left until the deadline; zero once it has passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// True once the deadline has been reached.
    pub fn is_expired(self) -> bool {
        Instant::now() >= self.0
    }

    /// The earlier of the two.
    pub fn min(self, other: Deadline) -> Deadline {
        std::cmp::min(self, other)
    }

    /// The deadline in scope on this task, if any.
    pub fn current() -> Option<Deadline> {
        DEADLINE.try_with(|d| *d).ok()
    }

    /// Runs `fut` with `deadline` in scope, or with the deadline already in scope if
    /// that one is earlier. The outer deadline is read when `scope` is called, so call
    /// it from the task (and scope) that will poll the future.
    pub fn scope<F: Future>(deadline: Deadline, fut: F) -> Scoped<F> {
        DEADLINE.scope(Self::effective(deadline), fut)
    }

    /// Runs the synchronous `f` with `deadline` (or an earlier one in scope) in
    /// scope; for code that builds a future, such as a `tower` service's `call`.
    pub fn sync_scope<R>(deadline: Deadline, f: impl FnOnce() -> R) -> R {
        DEADLINE.sync_scope(Self::effective(deadline), f)
    }

    fn effective(deadline: Deadline) -> Deadline {
        match Self::current() {
            Some(outer) => outer.min(deadline),
            None => deadline,
        }
    }
}
