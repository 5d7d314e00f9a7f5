//! Timeouts and deadlines.
//!
//! # Why
//!
//! A call that never finishes holds a connection, a worker and the caller's patience
//! forever. A [`Timeout`] bounds one call; when it fires the call's future is dropped
//! (cancelled) and the caller gets [`Error::Timeout`].
//!
//! Timeouts alone compose badly: a 30 s request timeout around three retries, each
//! with a 10 s per-try timeout, still lets the third try start at 29 s and be cut
//! off a second later, wasting the upstream's work. A [`Deadline`] fixes that: it is
//! an absolute instant put *in scope* for everything the call does, so a retry (or
//! anything else) nested inside can ask how much time is left and not start work
//! that cannot finish. Every `Timeout` puts its own deadline in scope for the
//! future it runs (nested scopes keep the earlier deadline), so the usual stack
//!
//! ```text
//! Timeout::total(30s) ─► Retry (reads the deadline) ─► Timeout::attempt(10s) ─► call
//! ```
//!
//! needs no wiring: [`Retry`](crate::retry::Retry) reads [`Deadline::current`].
//!
//! # How
//!
//! ```
//! use std::time::Duration;
//! use bulwark::timeout::{Deadline, Timeout, TimeoutKind};
//! use bulwark::Error;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # tokio::time::pause();
//! let timeout = Timeout::builder()
//!     .name("db")
//!     .duration(Duration::from_millis(100))
//!     .kind(TimeoutKind::Total)
//!     .build()
//!     .unwrap();
//!
//! // Fast enough: the value comes through, and the deadline was visible inside.
//! let r = timeout
//!     .call(|| async {
//!         assert!(Deadline::current().is_some());
//!         Ok::<_, std::io::Error>(42)
//!     })
//!     .await;
//! assert_eq!(r.unwrap(), 42);
//!
//! // Too slow: cut off at exactly 100 ms.
//! let r = timeout
//!     .call(|| async {
//!         tokio::time::sleep(Duration::from_secs(1)).await;
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .await;
//! assert!(matches!(r, Err(Error::Timeout)));
//! # }
//! ```
//!
//! As a `tower` layer: [`TimeoutLayer`]; the service's timeout error is a boxed
//! [`bulwark::Error::Timeout`](crate::Error::Timeout).

mod deadline;
mod future;
mod layer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use deadline::saturating_after;
pub use deadline::{Deadline, Scoped};
pub use future::ResponseFuture;
pub use layer::{TimeoutLayer, TimeoutService};

use crate::{ConfigError, Error, Event, Listener, Listeners};

/// Default policy name, used in events when none is given.
pub const DEFAULT_NAME: &str = "timeout";

/// What a timeout bounds; only labels events and metrics (`kind`), the behaviour is
/// the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TimeoutKind {
    /// One attempt (a per-try timeout).
    #[default]
    Attempt,
    /// The whole call, every attempt included.
    Total,
}

impl TimeoutKind {
    /// `attempt` or `total`, as in [`Event::Timeout`].
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::Attempt => "attempt",
            TimeoutKind::Total => "total",
        }
    }
}

/// Bounds the duration of a call. See the [module docs](self).
///
/// Cheap to clone (an `Arc` inside).
#[derive(Debug, Clone)]
pub struct Timeout {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: Arc<str>,
    duration: Duration,
    kind: TimeoutKind,
    listeners: Listeners,
}

impl Timeout {
    /// A builder; [`duration`](TimeoutBuilder::duration) is required.
    pub fn builder() -> TimeoutBuilder {
        TimeoutBuilder::default()
    }

    /// A per-attempt timeout of `d`, unnamed, no listeners.
    ///
    /// # Panics
    /// If `d` is zero.
    pub fn attempt(d: Duration) -> Self {
        Self::plain(d, TimeoutKind::Attempt)
    }

    /// A whole-call timeout of `d`, unnamed, no listeners.
    ///
    /// # Panics
    /// If `d` is zero.
    pub fn total(d: Duration) -> Self {
        Self::plain(d, TimeoutKind::Total)
    }

    fn plain(d: Duration, kind: TimeoutKind) -> Self {
        assert!(!d.is_zero(), "a timeout must be longer than zero");
        Timeout {
            inner: Arc::new(Inner {
                name: DEFAULT_NAME.into(),
                duration: d,
                kind,
                listeners: Listeners::new(),
            }),
        }
    }

    /// The configured duration.
    pub fn duration(&self) -> Duration {
        self.inner.duration
    }

    /// The configured kind.
    pub fn kind(&self) -> TimeoutKind {
        self.inner.kind
    }

    /// The policy's name.
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// Runs `op` with a deadline `duration` from now in scope (see [`Deadline::scope`])
    /// and cuts it off when the duration has passed: `Err(Error::Timeout)`, and
    /// [`Event::Timeout`] to listeners. The operation's own error comes back as
    /// [`Error::Inner`].
    pub async fn call<T, E, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = Deadline::after(self.inner.duration);
        // `op()` runs inside the scope too, for closures that read the deadline
        // before building their future.
        let fut = Deadline::scope(deadline, async move { op().await });
        match tokio::time::timeout_at(deadline.instant(), fut).await {
            Ok(r) => r.map_err(Error::Inner),
            Err(_) => {
                self.fired();
                Err(Error::Timeout)
            }
        }
    }

    fn fired(&self) {
        self.inner.listeners.emit(|| Event::Timeout {
            name: self.inner.name.clone(),
            kind: self.inner.kind.as_str(),
        });
    }
}

/// Builds a [`Timeout`].
#[derive(Debug, Default)]
pub struct TimeoutBuilder {
    name: Option<Arc<str>>,
    duration: Option<Duration>,
    kind: TimeoutKind,
    listeners: Listeners,
}

impl TimeoutBuilder {
    /// The name used in events. Default [`DEFAULT_NAME`].
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How long a call may take. Required, and longer than zero.
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self
    }

    /// What the timeout bounds (labels events). Default [`TimeoutKind::Attempt`].
    pub fn kind(mut self, kind: TimeoutKind) -> Self {
        self.kind = kind;
        self
    }

    /// Adds a listener for [`Event::Timeout`].
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<Timeout, ConfigError> {
        // An empty name is an empty label value in metrics, which Prometheus reads as no label.
        if self.name.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        let duration = self
            .duration
            .ok_or_else(|| ConfigError::new("duration", "is required"))?;
        if duration.is_zero() {
            return Err(ConfigError::new("duration", "must be longer than zero"));
        }
        Ok(Timeout {
            inner: Arc::new(Inner {
                name: self.name.unwrap_or_else(|| DEFAULT_NAME.into()),
                duration,
                kind: self.kind,
                listeners: self.listeners,
            }),
        })
    }
}
