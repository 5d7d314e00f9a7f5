//! The error every policy returns, and the error every builder returns.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A type-erased error, as `tower` uses between layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a call made through a policy.
///
/// `Inner` carries the protected operation's own error unchanged; every other
/// variant says which policy refused or cut the call short, with what a caller
/// needs to act on it (for example `retry_after`).
///
/// In `tower` services the error type is [`BoxError`]: an inner service's error is
/// passed through as is, and a policy's own rejection is a boxed `Error` (the
/// default type parameter), found with `err.downcast_ref::<bulwark::Error>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E = BoxError> {
    /// The protected operation failed with its own error.
    Inner(E),
    /// The circuit breaker named `name` is open (or forced open, or has no
    /// half-open permit left); try again after `retry_after`.
    CircuitOpen {
        /// The breaker's name.
        name: Arc<str>,
        /// How long until the breaker will admit a probe call.
        retry_after: Duration,
    },
    /// The call (or the whole deadline) ran out of time.
    Timeout,
    /// The bulkhead had no free slot and its wait queue was full or the wait timed out.
    BulkheadFull,
    /// The rate limiter refused the call; the earliest conforming time is `retry_after` away.
    RateLimited {
        /// How long until a call would conform.
        retry_after: Duration,
    },
    /// A load shedder dropped the call.
    Shed,
    /// A retry was wanted but the retry budget had no token left.
    RetryBudgetExhausted,
}

impl<E> Error<E> {
    /// The inner error, if this is [`Error::Inner`].
    pub fn inner(&self) -> Option<&E> {
        match self {
            Error::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// Consumes `self`, returning the inner error if this is [`Error::Inner`].
    pub fn into_inner(self) -> Option<E> {
        match self {
            Error::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// True when a policy (not the protected operation) produced this error.
    pub fn is_rejection(&self) -> bool {
        !matches!(self, Error::Inner(_))
    }

    /// True when a policy refused the call before it was passed on (an open breaker, a rate
    /// limit, a full bulkhead, a shedder): nothing was sent.
    pub fn is_local_refusal(&self) -> bool {
        matches!(
            self,
            Error::RateLimited { .. }
                | Error::BulkheadFull
                | Error::Shed
                | Error::CircuitOpen { .. }
        )
    }

    /// Maps the inner error, keeping every policy variant as it is.
    pub fn map_inner<F, E2>(self, f: F) -> Error<E2>
    where
        F: FnOnce(E) -> E2,
    {
        match self {
            Error::Inner(e) => Error::Inner(f(e)),
            other => other.cast(),
        }
    }

    /// Re-types a policy variant. Panics never: `Inner` is handled by the callers.
    fn cast<E2>(self) -> Error<E2> {
        match self {
            Error::Inner(_) => unreachable!("cast is only called on policy variants"),
            Error::CircuitOpen { name, retry_after } => Error::CircuitOpen { name, retry_after },
            Error::Timeout => Error::Timeout,
            Error::BulkheadFull => Error::BulkheadFull,
            Error::RateLimited { retry_after } => Error::RateLimited { retry_after },
            Error::Shed => Error::Shed,
            Error::RetryBudgetExhausted => Error::RetryBudgetExhausted,
        }
    }

    /// The short, stable name of the variant (`inner`, `circuit_open`, `timeout`,
    /// `bulkhead_full`, `rate_limited`, `shed`, `budget_exhausted`), used in
    /// metrics labels and headers.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Inner(_) => "inner",
            Error::CircuitOpen { .. } => "circuit_open",
            Error::Timeout => "timeout",
            Error::BulkheadFull => "bulkhead_full",
            Error::RateLimited { .. } => "rate_limited",
            Error::Shed => "shed",
            Error::RetryBudgetExhausted => "budget_exhausted",
        }
    }

    /// How long the caller should wait before trying again, when the policy knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::CircuitOpen { retry_after, .. } | Error::RateLimited { retry_after } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }
}

impl<E> Error<Error<E>> {
    /// Collapses a policy error wrapped around another policy error, as happens when
    /// policies are nested (`retry.call(|| breaker.call(..))`).
    pub fn flatten(self) -> Error<E> {
        match self {
            Error::Inner(inner) => inner,
            other => other.cast(),
        }
    }
}

impl<E> From<E> for Error<E> {
    fn from(e: E) -> Self {
        Error::Inner(e)
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Inner(e) => fmt::Display::fmt(e, f),
            Error::CircuitOpen { name, retry_after } => {
                write!(
                    f,
                    "circuit breaker `{name}` is open; retry after {retry_after:?}"
                )
            }
            Error::Timeout => f.write_str("timed out"),
            Error::BulkheadFull => f.write_str("bulkhead full"),
            Error::RateLimited { retry_after } => {
                write!(f, "rate limited; retry after {retry_after:?}")
            }
            Error::Shed => f.write_str("load shed"),
            Error::RetryBudgetExhausted => f.write_str("retry budget exhausted"),
        }
    }
}

/// `source()` is not forwarded: the inner error's message is already this error's
/// `Display`, and a blanket bound on `std::error::Error` would exclude [`BoxError`].
impl<E> std::error::Error for Error<E> where E: fmt::Debug + fmt::Display {}

/// A builder was given a setting it cannot accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    /// A new error for `field` (the builder method's name) saying what is wrong.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }

    /// The setting that was rejected.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_keeps_outer_rejection_and_unwraps_inner() {
        let e: Error<Error<&str>> = Error::Inner(Error::Inner("boom"));
        assert_eq!(e.flatten(), Error::Inner("boom"));
        let e: Error<Error<&str>> = Error::Timeout;
        assert_eq!(e.flatten(), Error::Timeout);
        let e: Error<Error<&str>> = Error::Inner(Error::BulkheadFull);
        assert_eq!(e.flatten(), Error::BulkheadFull);
    }

    #[test]
    fn default_error_is_boxable() {
        let e: BoxError = Box::new(Error::<BoxError>::Timeout);
        assert!(matches!(e.downcast_ref::<Error>(), Some(Error::Timeout)));
    }
}
