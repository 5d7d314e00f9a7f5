//! Deciding what counts as a failure.
//!
//! Policies never guess: the caller supplies a [`Classify`] that looks at the whole
//! result of a call, `Ok` values included, so an HTTP 503 that arrived as `Ok` can count
//! as a failure, and an expected "not found" error can be ignored.

use std::time::Duration;

/// How a policy should count one finished call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call succeeded.
    Success,
    /// The call failed; a retry may follow.
    Failure,
    /// The call failed and the dependency asked the caller to wait this long before
    /// trying again (an HTTP `Retry-After`). Counts as a failure.
    FailureRetryAfter(Duration),
    /// The call should not be counted at all (neither success nor failure), and is
    /// not retried.
    Ignore,
}

impl Outcome {
    /// True for [`Outcome::Failure`] and [`Outcome::FailureRetryAfter`].
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure | Outcome::FailureRetryAfter(_))
    }

    /// The retry-after hint, if the classifier gave one.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            Outcome::FailureRetryAfter(d) => Some(d),
            _ => None,
        }
    }
}

/// Classifies the result of one call.
///
/// Implemented for every `Fn(&Result<T, E>) -> Outcome`, so a closure will do:
///
/// ```
/// use bulwark::{Classify, Outcome};
/// let classify = |r: &Result<u16, std::io::Error>| match r {
///     Ok(status) if *status >= 500 => Outcome::Failure,
///     Ok(_) => Outcome::Success,
///     Err(_) => Outcome::Failure,
/// };
/// assert_eq!(classify.classify(&Ok(503)), Outcome::Failure);
/// ```
pub trait Classify<T, E> {
    /// How to count `result`.
    fn classify(&self, result: &Result<T, E>) -> Outcome;
}

impl<F, T, E> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome,
{
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}

/// The default classifier: every `Ok` is a success, every `Err` a failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyError;

impl<T, E> Classify<T, E> for AnyError {
    #[inline]
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}
