//! Active health checks of an upstream's endpoints, on the library's [`HealthChecker`].
//!
//! One [`HealthCheck`] per endpoint, named by its URL: [`HttpCheck`] (a GET of `path` over the
//! endpoint's own pool, so it uses the same address, protocol and connect timeout as traffic) or
//! the library's [`TcpCheck`]. The library's checker runs them every `interval` with `timeout`
//! and applies the Envoy-style thresholds; a small task copies its verdicts into
//! [`Endpoint::set_healthy`]. Both tasks end when [`HealthTasks`] is dropped (with its upstream,
//! when a runtime is replaced).

use std::sync::Arc;
use std::time::Duration;

use bulwark::health::{
    CheckFuture, CheckResult, Criticality, HealthCheck, HealthChecker, HealthRegistry,
    HealthReport, HealthStatus, TcpCheck, PENDING_DETAIL,
};
use http::{Request, Uri, Version};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::headers::HeaderRules;
use super::Endpoint;
use crate::config::{self, HealthCheckKind, StatusRange};
use crate::proxy::body::ReqBody;

/// Largest health response body read to the end (so the connection can be reused); a larger
/// one is dropped with its connection.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// An HTTP GET of `path` on one endpoint; healthy when the status is in `expected`.
#[derive(Debug)]
pub struct HttpCheck {
    endpoint: Arc<Endpoint>,
    uri: Uri,
    http2: bool,
    expected: StatusRange,
    /// The upstream's `request_headers`, applied to each check as to traffic.
    headers: Option<Arc<HeaderRules>>,
}

impl HttpCheck {
    /// A check of `endpoint` at `path`.
    pub fn new(endpoint: Arc<Endpoint>, path: &str, http2: bool, expected: StatusRange) -> Self {
        let uri = if http2 {
            Uri::builder()
                .scheme(if endpoint.pool.is_tls() {
                    "https"
                } else {
                    "http"
                })
                .authority(endpoint.authority.clone())
                .path_and_query(path)
                .build()
        } else {
            Uri::builder().path_and_query(path).build()
        }
        .unwrap_or_else(|_| Uri::from_static("/"));
        HttpCheck {
            endpoint,
            uri,
            http2,
            expected,
            headers: None,
        }
    }

    /// Applies `headers` (the upstream's `request_headers`) to each check.
    pub fn with_headers(mut self, headers: Option<Arc<HeaderRules>>) -> Self {
        self.headers = headers;
        self
    }

    async fn probe(&self) -> CheckResult {
        let mut req = Request::new(ReqBody::empty());
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = if self.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let h = req.headers_mut();
        h.insert(http::header::HOST, self.endpoint.host_header.clone());
        h.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("bulwark-health-check"),
        );
        if let Some(extra) = &self.headers {
            extra.apply(h);
        }
        let resp = match self.endpoint.pool.send(req, None).await {
            Ok(x) => x,
            Err(e) => return CheckResult::unhealthy(format!("{:?}", e.kind)),
        };
        let status = resp.status().as_u16();
        // Read the (small) body to the end so the connection goes back to the pool.
        let mut body = resp.into_body();
        let mut read = 0;
        let complete = loop {
            match body.frame().await {
                None => break true,
                Some(Ok(f)) => {
                    read += f.data_ref().map_or(0, |d| d.len());
                    if read > MAX_HEALTH_BODY {
                        break false;
                    }
                }
                Some(Err(_)) => break false,
            }
        };
        if complete {
            self.endpoint.pool.reclaim(&mut body);
        }
        if self.expected.contains(status) {
            self.endpoint.probe_passed(tokio::time::Instant::now());
            CheckResult::healthy()
        } else {
            CheckResult::unhealthy(format!("status {status}"))
        }
    }
}

impl HealthCheck for HttpCheck {
    fn name(&self) -> &str {
        &self.endpoint.url
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(self.probe())
    }
}

/// A library check whose passes are stamped on its endpoint (see
/// [`Endpoint::probe_passed_since_ejection`]).
struct Stamped<C> {
    inner: C,
    endpoint: Arc<Endpoint>,
}

impl<C: HealthCheck> HealthCheck for Stamped<C> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            let r = self.inner.check().await;
            if r.status == HealthStatus::Healthy {
                self.endpoint.probe_passed(tokio::time::Instant::now());
            }
            r
        })
    }
}

/// The running checker of one upstream and the task applying its verdicts; dropping it stops both.
#[derive(Debug)]
pub struct HealthTasks {
    checker: HealthChecker,
    apply: JoinHandle<()>,
}

impl HealthTasks {
    /// Stops checking (the upstream was retired by a reload, while requests may still hold it).
    pub(crate) fn stop(&self) {
        self.apply.abort();
        self.checker.stop();
    }

    /// The library checker (its report names each endpoint by URL).
    pub fn checker(&self) -> &HealthChecker {
        &self.checker
    }
}

impl Drop for HealthTasks {
    fn drop(&mut self) {
        self.apply.abort();
        // The checker aborts its own task when dropped.
    }
}

/// Starts checking `endpoints` (must be called within a Tokio runtime).
pub(crate) fn start(
    c: &config::HealthCheck,
    endpoints: &[Arc<Endpoint>],
    http2: bool,
    headers: Option<&Arc<HeaderRules>>,
    uneject: bool,
) -> Result<HealthTasks, String> {
    let mut registry = HealthRegistry::new();
    for ep in endpoints {
        let check: Arc<dyn HealthCheck> = match c.kind {
            HealthCheckKind::Http => Arc::new(
                HttpCheck::new(ep.clone(), &c.path, http2, c.expected_status)
                    .with_headers(headers.cloned()),
            ),
            HealthCheckKind::Tcp => Arc::new(Stamped {
                inner: TcpCheck::new(ep.url.clone(), ep.pool.addr().to_owned())
                    .timeout(c.timeout.get()),
                endpoint: ep.clone(),
            }),
        };
        registry
            .register_arc(check, Criticality::Critical)
            .map_err(|e| format!("health_check: {e}"))?;
    }
    let checker = HealthChecker::builder(registry)
        .interval(c.interval.get())
        .timeout(c.timeout.get())
        .unhealthy_threshold(c.unhealthy_threshold)
        .healthy_threshold(c.healthy_threshold)
        .build()
        .map_err(|e| format!("health_check.{e}"))?;
    let rx = checker.subscribe();
    let apply = tokio::spawn(apply(rx, endpoints.to_vec(), c.interval.get(), uneject));
    Ok(HealthTasks { checker, apply })
}

/// Copies verdicts into the endpoints: at once when a status changes, and every `interval` too,
/// because a first check that fails leaves the status as it started (unhealthy, pending) and so
/// wakes nobody. With `uneject`, an endpoint found healthy, by a probe that passed after its
/// ejection began (the status alone stays healthy through the first failed probes), also ends
/// its outlier ejection, as Envoy's `successful_active_health_check_uneject_host`. Ends when the
/// checker is gone.
async fn apply(
    mut rx: watch::Receiver<HealthReport>,
    eps: Vec<Arc<Endpoint>>,
    interval: Duration,
    uneject: bool,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let report = rx.borrow_and_update();
        for (c, ep) in report.components.iter().zip(&eps) {
            // Until its first check answers, an endpoint keeps taking traffic.
            if c.status == HealthStatus::Unhealthy && c.detail.as_deref() == Some(PENDING_DETAIL) {
                continue;
            }
            ep.set_healthy(c.status != HealthStatus::Unhealthy);
            if uneject
                && c.status == HealthStatus::Healthy
                && ep.is_ejected()
                && ep.probe_passed_since_ejection()
            {
                ep.end_ejection(tokio::time::Instant::now());
                tracing::info!(endpoint = %ep.url, "ejection ended: the health check passes");
            }
        }
    }
}
