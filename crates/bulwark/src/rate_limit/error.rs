//! The rate limiter's own error: a request for more cells than the burst.

use std::fmt;

/// [`check_n`](super::RateLimiter::check_n) asked for more cells at once than the
/// limiter's burst: that request can never conform, however long the caller waits,
/// so it is reported apart from an ordinary (retryable) rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InsufficientCapacity {
    /// Cells asked for.
    pub requested: u32,
    /// The most cells the limiter ever grants at once.
    pub burst: u32,
}

impl fmt::Display for InsufficientCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "asked for {} cells at once; the burst is {}",
            self.requested, self.burst
        )
    }
}

impl std::error::Error for InsufficientCapacity {}
