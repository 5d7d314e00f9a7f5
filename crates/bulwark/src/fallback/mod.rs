//! Fallback: answer with something degraded instead of an error.
//!
//! # Why
//!
//! Many failures have a better answer than an error page: a cached value, a default,
//! an empty list, a "try again later" that the client understands. Retrying cannot
//! produce that answer, and when a breaker is open or a rate limit is hit, retrying
//! is exactly the wrong thing to do. A fallback is the last stage of a call: it
//! decides, per error, whether the caller gets the error or the alternative.
//!
//! Choosing *which* errors fall back matters. Falling back on a `circuit_open` or
//! `rate_limited` rejection is usually right (the dependency was not even asked);
//! falling back on a validation error from the dependency usually hides a bug. So a
//! [`Fallback`] triggers on a chosen set of [`Error::kind`] values (default: every
//! error, `inner` included) or on a predicate over the error.
//!
//! # How
//!
//! The primary operation returns `Result<T, bulwark::Error<E>>`, typically because it
//! is another policy's call (`breaker.call(..)`); a plain operation can use `?`, which
//! wraps its error in [`Error::Inner`]. When the primary fails with an error that
//! triggers the fallback, the alternative receives that error and its result becomes
//! the call's result; otherwise the error is returned unchanged. Each fallback emits
//! [`Event::Fallback`] with the triggering error's kind.
//!
//! ```
//! use bulwark::fallback::Fallback;
//! use bulwark::Error;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let fallback = Fallback::builder()
//!     .name("prices")
//!     .on_kinds(["circuit_open", "timeout"])
//!     .build()
//!     .unwrap();
//!
//! // A breaker was open: the cached price is served instead.
//! let price = fallback
//!     .call(
//!         || async {
//!             Err::<u32, Error<std::io::Error>>(Error::CircuitOpen {
//!                 name: "pricing".into(),
//!                 retry_after: std::time::Duration::from_secs(5),
//!             })
//!         },
//!         |err| async move {
//!             assert_eq!(err.kind(), "circuit_open");
//!             Ok(42)
//!         },
//!     )
//!     .await;
//! assert_eq!(price.unwrap(), 42);
//!
//! // The dependency's own error is not in the chosen kinds: it is returned as is.
//! let r = fallback
//!     .call(
//!         || async { Err::<u32, _>(Error::Inner(std::io::Error::other("bad request"))) },
//!         |_| async { Ok(0) },
//!     )
//!     .await;
//! assert_eq!(r.unwrap_err().kind(), "inner");
//! # }
//! ```
//!
//! [`Fallback::call_with`] also falls back on `Ok` values that a [`Classify`] calls a
//! failure (an HTTP 503 that arrived as a response): see [`Classify`]. [`FallbackLayer`] brings the
//! error-triggered fallback to a `tower` service; it does not classify `Ok` responses.

mod future;
mod layer;

pub use future::ResponseFuture;
pub use layer::{FallbackLayer, FallbackService};

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::classify::Classify;
use crate::events::{Event, Listener, Listeners};
use crate::{ConfigError, Error};

/// The default name of a fallback in events.
pub const DEFAULT_NAME: &str = "fallback";

/// Every value [`Error::kind`] can take, in declaration order. [`FallbackBuilder::on_kinds`]
/// accepts exactly these.
pub const KINDS: [&str; 7] = [
    "inner",
    "circuit_open",
    "timeout",
    "bulkhead_full",
    "rate_limited",
    "shed",
    "budget_exhausted",
];

/// Decides whether an error triggers the fallback.
///
/// Implemented by [`OnKinds`] (the builder's default) and by every
/// `Fn(&Error<E>) -> bool` (see [`FallbackBuilder::when`]).
pub trait Trigger<E> {
    /// True when `error` should be answered by the alternative.
    fn triggers(&self, error: &Error<E>) -> bool;
}

impl<E, F> Trigger<E> for F
where
    F: Fn(&Error<E>) -> bool,
{
    fn triggers(&self, error: &Error<E>) -> bool {
        self(error)
    }
}

/// Triggers on a set of [`Error::kind`] values; by default on every error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnKinds {
    // Bit i set = KINDS[i] triggers. `all` also covers kinds added to `Error` later.
    mask: u32,
    all: bool,
}

impl OnKinds {
    /// Triggers on every error, including [`Error::Inner`].
    pub const fn all() -> Self {
        OnKinds {
            mask: (1 << KINDS.len()) - 1,
            all: true,
        }
    }

    /// True when errors of `kind` trigger.
    pub fn contains(&self, kind: &str) -> bool {
        match KINDS.iter().position(|k| *k == kind) {
            Some(i) => self.mask & (1 << i) != 0,
            None => self.all,
        }
    }
}

impl Default for OnKinds {
    fn default() -> Self {
        OnKinds::all()
    }
}

impl<E> Trigger<E> for OnKinds {
    #[inline]
    fn triggers(&self, error: &Error<E>) -> bool {
        self.contains(error.kind())
    }
}

/// Builds a [`Fallback`]. Start with [`Fallback::builder`].
pub struct FallbackBuilder<P = OnKinds> {
    name: Arc<str>,
    trigger: P,
    // A bad `on_kinds` argument, reported by `build` (builders only fail in `build`).
    error: Option<ConfigError>,
    listeners: Listeners,
}

impl<P> fmt::Debug for FallbackBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackBuilder")
            .field("name", &self.name)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl FallbackBuilder<OnKinds> {
    /// Trigger only on errors whose [`Error::kind`] is one of `kinds` (see [`KINDS`]).
    /// Replaces the default (every error). An unknown kind, or none at all, fails
    /// [`build`](Self::build).
    pub fn on_kinds<I>(mut self, kinds: I) -> Self
    where
        I: IntoIterator<Item = &'static str>,
    {
        let mut mask = 0u32;
        for kind in kinds {
            match KINDS.iter().position(|k| *k == kind) {
                Some(i) => mask |= 1 << i,
                None => {
                    self.error = Some(ConfigError::new(
                        "on_kinds",
                        format!("unknown kind `{kind}`; expected one of {KINDS:?}"),
                    ));
                }
            }
        }
        if mask == 0 && self.error.is_none() {
            self.error = Some(ConfigError::new(
                "on_kinds",
                "needs at least one kind (a fallback that never triggers is a mistake)",
            ));
        }
        self.trigger = OnKinds { mask, all: false };
        self
    }

    /// Trigger on errors for which `predicate` returns true, instead of by kind.
    pub fn when<E, F>(self, predicate: F) -> FallbackBuilder<F>
    where
        F: Fn(&Error<E>) -> bool + Send + Sync + 'static,
    {
        FallbackBuilder {
            name: self.name,
            trigger: predicate,
            error: self.error,
            listeners: self.listeners,
        }
    }
}

impl<P> FallbackBuilder<P> {
    /// The name reported in events (default [`DEFAULT_NAME`]).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds a listener for [`Event::Fallback`].
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Validates the settings.
    ///
    /// Fails when the name is empty, or when [`on_kinds`](FallbackBuilder::on_kinds)
    /// was given an unknown kind or none.
    pub fn build(self) -> Result<Fallback<P>, ConfigError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        Ok(Fallback {
            inner: Arc::new(Inner {
                name: self.name,
                trigger: self.trigger,
                listeners: self.listeners,
            }),
        })
    }
}

struct Inner<P> {
    name: Arc<str>,
    trigger: P,
    listeners: Listeners,
}

/// Answers chosen errors with an alternative. Cheap to clone (one `Arc`).
///
/// `P` is the [`Trigger`]: [`OnKinds`] unless the builder was given a predicate with
/// [`FallbackBuilder::when`].
pub struct Fallback<P = OnKinds> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for Fallback<P> {
    fn clone(&self) -> Self {
        Fallback {
            inner: self.inner.clone(),
        }
    }
}

impl<P> fmt::Debug for Fallback<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("name", &self.inner.name)
            .field("listeners", &self.inner.listeners)
            .finish_non_exhaustive()
    }
}

impl Fallback<OnKinds> {
    /// A builder with the defaults: name [`DEFAULT_NAME`], triggers on every error.
    pub fn builder() -> FallbackBuilder<OnKinds> {
        FallbackBuilder {
            name: Arc::from(DEFAULT_NAME),
            trigger: OnKinds::all(),
            error: None,
            listeners: Listeners::new(),
        }
    }
}

impl<P> Fallback<P> {
    /// The name reported in events.
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// True when `error` triggers this fallback.
    pub fn triggers<E>(&self, error: &Error<E>) -> bool
    where
        P: Trigger<E>,
    {
        self.inner.trigger.triggers(error)
    }

    /// Emits the event for a fallback triggered by an error of `kind`.
    pub(crate) fn emit(&self, kind: &'static str) {
        self.inner.listeners.emit(|| Event::Fallback {
            name: self.inner.name.clone(),
            kind,
        });
    }

    /// Runs `primary`; when it fails with an error that triggers this fallback, runs
    /// `alternative` with that error and returns its result instead.
    ///
    /// An error that does not trigger is returned unchanged, and the alternative is
    /// not called. Every `Err` counts as a failure; see [`call_with`](Self::call_with)
    /// to fall back on `Ok` values too.
    pub async fn call<T, E, F, Fut, A, AFut>(
        &self,
        primary: F,
        alternative: A,
    ) -> Result<T, Error<E>>
    where
        P: Trigger<E>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
        A: FnOnce(Error<E>) -> AFut,
        AFut: Future<Output = Result<T, Error<E>>>,
    {
        match primary().await {
            Ok(v) => Ok(v),
            Err(e) if self.triggers(&e) => {
                self.emit(e.kind());
                alternative(e).await
            }
            Err(e) => Err(e),
        }
    }

    /// Like [`call`](Self::call), but `classifier` decides what a failure is, and the
    /// alternative receives the whole failed result.
    ///
    /// - An `Ok` the classifier calls a failure always triggers (choosing the
    ///   classifier was the choice); the event's kind is `inner`, since the
    ///   operation itself answered badly.
    /// - An `Err` the classifier calls a failure triggers when the [`Trigger`] agrees.
    /// - Results classified as [`Outcome::Success`](crate::Outcome::Success) or
    ///   [`Outcome::Ignore`](crate::Outcome::Ignore) are
    ///   returned as they are.
    pub async fn call_with<C, T, E, F, Fut, A, AFut>(
        &self,
        classifier: &C,
        primary: F,
        alternative: A,
    ) -> Result<T, Error<E>>
    where
        P: Trigger<E>,
        C: Classify<T, Error<E>>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
        A: FnOnce(Result<T, Error<E>>) -> AFut,
        AFut: Future<Output = Result<T, Error<E>>>,
    {
        let result = primary().await;
        if !classifier.classify(&result).is_failure() {
            return result;
        }
        let kind = match &result {
            Ok(_) => "inner",
            Err(e) if self.triggers(e) => e.kind(),
            Err(_) => return result,
        };
        self.emit(kind);
        alternative(result).await
    }
}
