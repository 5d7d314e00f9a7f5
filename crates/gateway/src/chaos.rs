//! Fault injection: a route's `fault:` section delays or aborts a share of its requests, so that
//! operators can see how clients, and the gateway's own timeouts and fallbacks, cope with a slow or
//! failing dependency without breaking one. Modelled on Envoy's fault filter: the delay comes first,
//! then the abort, both decided per request at the given percentages, before anything is sent
//! upstream.

use std::time::Duration;

use http::{Response, StatusCode};
use tokio::time::Instant;

use crate::admin::metrics::RouteStats;
use crate::config;
use crate::proxy::body::RespBody;
use crate::proxy::respond::{self, Failure};
use crate::proxy::route::Route;

/// A route's faults at runtime.
#[derive(Debug, Clone)]
pub struct Fault {
    delay: Option<(Duration, f64)>,
    abort: Option<(StatusCode, f64)>,
}

impl Fault {
    /// The kinds of fault it injects: `delay`, `abort` (the `kind` label of `bulwark_faults_total`).
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> {
        let delay = self.delay.is_some().then_some("delay");
        delay
            .into_iter()
            .chain(self.abort.is_some().then_some("abort"))
    }

    /// From a validated section; `None` when it is off or injects nothing.
    pub fn new(c: &config::Fault) -> Option<Fault> {
        let f = Fault {
            delay: c
                .delay
                .as_ref()
                .filter(|d| d.percent > 0.0)
                .map(|d| (d.duration.get(), d.percent)),
            abort: c
                .abort
                .as_ref()
                .filter(|a| a.percent > 0.0)
                .and_then(|a| Some((StatusCode::from_u16(a.status).ok()?, a.percent))),
        };
        (c.enabled && (f.delay.is_some() || f.abort.is_some())).then_some(f)
    }

    /// The delay this request gets, if it is one of the share that gets one.
    pub fn delay(&self) -> Option<Duration> {
        self.delay.filter(|&(_, p)| hit(p)).map(|(d, _)| d)
    }

    /// The status this request is aborted with, if it is one of the share that is.
    pub fn abort(&self) -> Option<StatusCode> {
        self.abort.filter(|&(_, p)| hit(p)).map(|(s, _)| s)
    }
}

/// Whether a request falls in `percent` (0 to 100) of them.
fn hit(percent: f64) -> bool {
    percent >= 100.0 || fastrand::f64() * 100.0 < percent
}

/// Applies `fault` to a request of `route` received at `start`: waits out a delay (within the
/// route's deadline: a delay that reaches it ends as a timeout, 504 or the fallback), then answers
/// an abort. `None`: the request goes on.
pub(crate) async fn inject(
    fault: &Fault,
    route: &Route,
    stats: &RouteStats,
    start: Instant,
) -> Option<Response<RespBody>> {
    if let Some(d) = fault.delay() {
        stats.fault("delay");
        let deadline = start + route.timeout;
        let until = Instant::now() + d;
        if until >= deadline {
            tokio::time::sleep_until(deadline).await;
            route.policies.on_timeout("total");
            return Some(crate::proxy::attempt::answer_unsent(
                route,
                Failure::Timeout,
            ));
        }
        tokio::time::sleep_until(until).await;
    }
    let status = fault.abort()?;
    stats.fault("abort");
    Some(respond::fault_abort(status))
}
