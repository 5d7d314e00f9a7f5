//! # bulwark
//!
//! Resilience policies for async Rust, each usable as a plain async call and as a
//! [`tower::Layer`](tower_layer::Layer):
//!
//! | policy | module | what it protects against |
//! |---|---|---|
//! | circuit breaker | [`breaker`] | hammering a dependency that is already failing or slow |
//! | retry + budget | [`retry`] | transient failures, without multiplying load in an outage |
//! | timeout, deadline | [`timeout`] | calls that never finish; retries that cannot finish in time |
//! | bulkhead | [`bulkhead`] | one slow dependency eating every worker |
//! | rate limiter (GCRA) | [`rate_limit`] | exceeding a quota, yours or a provider's |
//! | fallback | [`fallback`] | showing an error where a degraded answer would do |
//! | hedging | [`hedge`] | tail latency of one slow replica |
//! | load shedding by priority | [`shed`] | overload taking down the calls that matter with the rest |
//! | health checks | [`health`] | sending traffic to a dependency that is down |
//!
//! [`pipeline`] stacks them in one documented order. Every policy is built through a
//! validating builder (`build() -> Result<_, ConfigError>`), reports [`events`] to
//! subscribers and, with the `prometheus` feature, metrics.
//!
//! Time comes from [`tokio::time`], so every delay is exact under
//! `tokio::time::pause()` in tests.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod breaker;
pub mod bulkhead;
pub mod classify;
mod error;
pub mod events;
pub mod fallback;
pub mod health;
pub mod hedge;
pub mod keyed;
pub mod latency;
#[cfg(feature = "prometheus")]
pub mod metrics;
pub mod pipeline;
pub mod rate_limit;
pub mod retry;
pub mod shed;
mod slot_future;
pub mod timeout;

pub use classify::{Classify, Outcome};
pub use error::{BoxError, ConfigError, Error};
pub use events::{Event, Listener, Listeners};
