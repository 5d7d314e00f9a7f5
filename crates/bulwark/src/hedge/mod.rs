//! Hedging: when an attempt is slow, start another and take whichever succeeds first.
//!
//! # Why
//!
//! Tail latency is rarely the dependency being slow for everyone; it is one replica
//! (a GC pause, a noisy neighbour, a cold cache) being slow for the request that
//! happened to land on it. Waiting for a timeout and retrying pays the full timeout
//! first. Hedging ("The Tail at Scale", Dean and Barroso) sends a second copy of the
//! request once the first has been outstanding longer than it normally takes, and
//! uses whichever answer arrives first. Hedging at the 95th percentile of observed
//! latency costs about 5% extra load and cuts the tail sharply.
//!
//! Hedging multiplies load when a dependency is slow for everyone, so only hedge
//! idempotent operations, keep [`max_hedges`](HedgeBuilder::max_hedges) small, and
//! give hedges an admission hook ([`admit`](HedgeBuilder::admit)) backed by a retry
//! budget so an outage does not turn every call into several.
//!
//! # How it behaves
//!
//! - The original attempt starts at once; after the hedging delay, if nothing has
//!   succeeded yet, hedge 1 starts, then hedge 2 one delay later, up to
//!   `max_hedges` (default [`DEFAULT_MAX_HEDGES`]).
//! - The first *success* wins and every other attempt is dropped (cancelled) at
//!   that moment. A result the classifier calls [`Outcome::Ignore`](crate::Outcome::Ignore)
//!   is final too, and returned at once, when it is the original attempt's or no other
//!   attempt is running. A hedge's ignored result while another attempt runs is set
//!   aside, and no further hedge starts: it is most likely a local refusal that sent
//!   nothing (an open breaker's, say, while the original is the breaker's half-open
//!   probe), and ending the race on it would cancel an attempt that may yet succeed.
//! - A failed attempt does not end the call while another attempt is running. As
//!   in gRPC's hedging design (A6), a failure starts the next hedge immediately,
//!   without waiting for its delay: the failed attempt freed its slot, and a fast
//!   failure (connection refused) says nothing about how long a healthy replica
//!   takes. When every attempt has failed and no hedge may start, the last failure
//!   is returned.
//! - Before each hedge, the admission hook is asked; `false` means no further
//!   hedges for this call (the running attempts continue).
//! - The delay is fixed ([`delay`](HedgeBuilder::delay)) or a percentile of the
//!   latency of recent successful attempts
//!   ([`delay_percentile`](HedgeBuilder::delay_percentile)), with a fixed delay
//!   until enough samples exist. The default is the 95th percentile
//!   ([`DEFAULT_PERCENTILE`]) after [`DEFAULT_MIN_SAMPLES`] samples,
//!   [`DEFAULT_DELAY`] before.
//! - Every hedge emits [`Event::HedgeStarted`](crate::Event::HedgeStarted).
//!
//! No task is spawned: all attempts are polled inside the call's future, so dropping
//! the call cancels them all.
//!
//! ```
//! use std::time::Duration;
//! use bulwark::hedge::Hedge;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let hedge = Hedge::builder()
//!     .name("replicas")
//!     .delay(Duration::from_millis(20))
//!     .build()
//!     .unwrap();
//!
//! let start = tokio::time::Instant::now();
//! let mut attempt = 0;
//! let r = hedge
//!     .call(|| {
//!         attempt += 1;
//!         // The original lands on a slow replica; the hedge on a fast one.
//!         let latency = if attempt == 1 { 1_000 } else { 5 };
//!         async move {
//!             tokio::time::sleep(Duration::from_millis(latency)).await;
//!             Ok::<_, std::io::Error>(latency)
//!         }
//!     })
//!     .await;
//! assert_eq!(r.unwrap(), 5);
//! assert_eq!(start.elapsed(), Duration::from_millis(25));
//! # }
//! ```
//!
//! [`HedgeLayer`] does the same for a `tower` service whose requests are `Clone`.

mod future;
mod layer;
mod race;

pub use future::ResponseFuture;
pub use layer::{HedgeLayer, HedgeService};

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::{AnyError, Classify};
use crate::events::{Listener, Listeners};
use crate::latency::LatencyWindow;
use crate::{ConfigError, Error};

use race::{FnMaker, Race};

/// The default name of a hedge policy in events.
pub const DEFAULT_NAME: &str = "hedge";

/// One extra attempt by default: most of the tail-latency gain comes from the first
/// hedge, and each further one adds a full copy of the load in the worst case.
pub const DEFAULT_MAX_HEDGES: u32 = 1;

/// The most hedges a builder accepts. gRPC caps hedged attempts at 5 (4 hedges);
/// beyond that, hedging is load amplification, not latency control.
pub const MAX_HEDGES: u32 = 4;

/// By default hedge at the 95th percentile of recent latency: about 5% of calls
/// get a hedge, which is the trade-off "The Tail at Scale" recommends.
pub const DEFAULT_PERCENTILE: f64 = 95.0;

/// Samples needed before the percentile is trusted; fewer give a p95 that is just
/// the slowest call seen.
pub const DEFAULT_MIN_SAMPLES: u64 = 20;

/// The delay used until [`DEFAULT_MIN_SAMPLES`] latencies are known (or as the
/// fixed delay, when the builder is given one): long enough that a healthy call
/// to a nearby service rarely hedges.
pub const DEFAULT_DELAY: Duration = Duration::from_millis(100);

/// An admission hook: asked before each hedge starts; `false` means do not hedge.
pub type Admit = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum DelayKind {
    Fixed(Duration),
    Percentile {
        p: f64,
        min_samples: u64,
        fallback: Duration,
    },
}

/// Settings and state shared by every clone of a [`Hedge`].
pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    pub(crate) max_hedges: u32,
    delay: DelayKind,
    pub(crate) admit: Option<Admit>,
    pub(crate) latency: Arc<LatencyWindow>,
    pub(crate) listeners: Listeners,
}

impl Shared {
    fn current_delay(&self) -> Duration {
        match self.delay {
            DelayKind::Fixed(d) => d,
            DelayKind::Percentile {
                p,
                min_samples,
                fallback,
            } => self.latency.percentile(p, min_samples).unwrap_or(fallback),
        }
    }
}

/// Builds a [`Hedge`]. Start with [`Hedge::builder`].
pub struct HedgeBuilder {
    name: Arc<str>,
    max_hedges: u32,
    delay: DelayKind,
    admit: Option<Admit>,
    latency: Option<Arc<LatencyWindow>>,
    listeners: Listeners,
}

impl fmt::Debug for HedgeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeBuilder")
            .field("name", &self.name)
            .field("max_hedges", &self.max_hedges)
            .field("delay", &self.delay)
            .field("admit", &self.admit.is_some())
            .field("listeners", &self.listeners)
            .finish()
    }
}

impl HedgeBuilder {
    /// The name reported in events (default [`DEFAULT_NAME`]).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// How many extra attempts at most (default [`DEFAULT_MAX_HEDGES`], at most
    /// [`MAX_HEDGES`]). `0` turns hedging off.
    pub fn max_hedges(mut self, n: u32) -> Self {
        self.max_hedges = n;
        self
    }

    /// Hedge after a fixed delay (and again after each further delay).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = DelayKind::Fixed(delay);
        self
    }

    /// Hedge at the `p`-th percentile (0 < p ≤ 100) of the latency of recent
    /// successful attempts, once `min_samples` are recorded; `fallback_delay` until
    /// then.
    pub fn delay_percentile(mut self, p: f64, min_samples: u64, fallback_delay: Duration) -> Self {
        self.delay = DelayKind::Percentile {
            p,
            min_samples,
            fallback: fallback_delay,
        };
        self
    }

    /// Asks `admit` before each hedge; `false` means no further hedges for that call.
    /// Meant for a retry budget, so hedges draw on the same allowance as retries.
    pub fn admit(mut self, admit: Admit) -> Self {
        self.admit = Some(admit);
        self
    }

    /// Records latencies in `window` instead of a window of its own, so it can be
    /// shared (for example with a retry policy's deadline check).
    pub fn latency_window(mut self, window: Arc<LatencyWindow>) -> Self {
        self.latency = Some(window);
        self
    }

    /// Adds a listener for [`Event::HedgeStarted`](crate::Event::HedgeStarted).
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Validates the settings.
    ///
    /// Fails on an empty name, `max_hedges` above [`MAX_HEDGES`], or a percentile
    /// outside `(0, 100]`.
    pub fn build(self) -> Result<Hedge, ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.max_hedges > MAX_HEDGES {
            return Err(ConfigError::new(
                "max_hedges",
                format!("{} is more than {MAX_HEDGES}", self.max_hedges),
            ));
        }
        if let DelayKind::Percentile { p, .. } = self.delay {
            if !(p > 0.0 && p <= 100.0) {
                return Err(ConfigError::new(
                    "delay_percentile",
                    format!("percentile {p} is not in (0, 100]"),
                ));
            }
        }
        Ok(Hedge {
            shared: Arc::new(Shared {
                name: self.name,
                max_hedges: self.max_hedges,
                delay: self.delay,
                admit: self.admit,
                latency: self.latency.unwrap_or_default(),
                listeners: self.listeners,
            }),
        })
    }
}

/// The hedging policy. Cheap to clone (one `Arc`); clones share the latency window.
#[derive(Clone)]
pub struct Hedge {
    shared: Arc<Shared>,
}

impl fmt::Debug for Hedge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("name", &self.shared.name)
            .field("max_hedges", &self.shared.max_hedges)
            .field("delay", &self.shared.delay)
            .field("admit", &self.shared.admit.is_some())
            .finish_non_exhaustive()
    }
}

impl Hedge {
    /// A builder with the defaults (see the module documentation).
    pub fn builder() -> HedgeBuilder {
        HedgeBuilder {
            name: Arc::from(DEFAULT_NAME),
            max_hedges: DEFAULT_MAX_HEDGES,
            delay: DelayKind::Percentile {
                p: DEFAULT_PERCENTILE,
                min_samples: DEFAULT_MIN_SAMPLES,
                fallback: DEFAULT_DELAY,
            },
            admit: None,
            latency: None,
            listeners: Listeners::new(),
        }
    }

    /// The name reported in events.
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// The window of recent successful-attempt latencies.
    pub fn latency(&self) -> &Arc<LatencyWindow> {
        &self.shared.latency
    }

    /// The delay a call starting now would hedge after.
    pub fn current_delay(&self) -> Duration {
        self.shared.current_delay()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs `f()` and hedges it; every `Err` is a failure. See the module docs.
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(&AnyError, f).await
    }

    /// Like [`call`](Self::call), with `classifier` deciding which results are
    /// failures (another attempt keeps the call going) and which are final.
    pub async fn call_with<C, T, E, F, Fut>(&self, classifier: &C, f: F) -> Result<T, Error<E>>
    where
        C: Classify<T, E>,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut make = FnMaker(f);
        let first = (make.0)();
        let classify = |r: &Result<T, E>| classifier.classify(r);
        Race::new(
            first,
            make,
            classify,
            self.shared.clone(),
            self.shared.current_delay(),
        )
        .await
        .map_err(Error::Inner)
    }
}
