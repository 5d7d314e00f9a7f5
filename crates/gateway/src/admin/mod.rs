//! The admin listener: health, readiness, metrics, and manual control of circuit breakers.
//!
//! It is a separate listener (`admin.listen`, loopback by default) so that operations traffic never
//! competes with proxied traffic for connection slots, and so it can stay off the public interface.
//! It reads the runtime's state and changes it only through the gateway's own methods
//! ([`Gateway::set_breaker`]).
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /health` | [`health::HealthReport`] as JSON; 200 when healthy or degraded, 503 when unhealthy |
//! | `GET /ready` | 200 while serving, 503 while starting or draining |
//! | `GET /metrics` | Prometheus registry, OpenMetrics text |
//! | `GET /api/circuit-breakers` | every upstream's breaker state, override and window |
//! | `GET /api/circuit-breakers/{upstream}` | one of them |
//! | `PUT /api/circuit-breakers/{upstream}` | `{"state": "forced_open" \| "closed" \| "disabled"}` |
//! | `GET /api/audit?limit=N` | the newest audit entries (admin changes), newest first |
//! | `GET /api/mode` | the operating mode in force, the config's, and the override |
//! | `PUT /api/mode` | `{"mode": "normal" \| "maintenance" \| "read_only" \| "degraded"}`: sets the override |
//! | `DELETE /api/mode` | clears the override: the config's `mode` is in force again |
//! | `GET /dashboard` | the web dashboard (with `/dashboard.js` and `/dashboard.css`): a read-only page that polls the reads above |
//!
//! Mutating calls need `Authorization: Bearer <token>`, the token being the value of the environment
//! variable named by `admin.token_env`, read at start. A missing or wrong token gets 401; when no
//! token is configured (no `token_env`, or the variable is unset or empty) mutating calls get 403:
//! the API is never open by default. Tokens are compared in constant time.
//!
//! With `store:` configured, a breaker change is written to the embedded store (override and audit
//! row, in one transaction, on the blocking pool) before it is applied; a failed write answers 500
//! and changes nothing. `GET /api/audit` is a read like the others (no token): it shows what was
//! changed, when and from which address, nothing that grants access.

pub mod health;
pub mod metrics;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST,
    LOCATION, WWW_AUTHENTICATE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::config::{self, Mode};
use crate::proxy::{BreakerChangeError, BreakerCommand, Gateway, Phase, StartError};
use crate::store;

/// Largest admin request body accepted (the API's bodies are a few bytes).
pub const MAX_ADMIN_BODY: usize = 64 * 1024;
/// Time to read an admin request head or body.
const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(10);
const BREAKERS: &str = "/api/circuit-breakers";
const AUDIT: &str = "/api/audit";
const MODE: &str = "/api/mode";
const CONFIG: &str = "/api/config";
/// The dashboard's files, compiled into the binary.
const DASHBOARD: [(&str, &str, &str); 3] = [
    (
        "/dashboard",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "/dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/dashboard.js"),
    ),
    (
        "/dashboard.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/dashboard.css"),
    ),
];
/// The dashboard loads only its own script and style and talks only to this listener.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const JSON: &str = "application/json";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The admin token from the environment variable `admin.token_env` names; `None` when no variable is
/// named, or it is unset or empty (mutating calls are then refused).
pub fn token_from_env(admin: &config::Admin) -> Option<String> {
    let var = admin.token_env.as_deref()?;
    // Trimmed as the presented token is (ASCII whitespace only: a token ending in another space,
    // U+00A0 say, must still match itself): a secret read from a file often ends with a newline.
    std::env::var(var)
        .ok()
        .map(|t| t.trim_ascii().to_owned())
        .filter(|t| !t.is_empty())
}

/// A bound admin listener, ready to run.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    state: Arc<AdminState>,
}

struct AdminState {
    gateway: Arc<Gateway>,
    token: Option<String>,
    /// Host names answered besides IP literals and `localhost` (`admin.allowed_hosts`; compared
    /// ignoring case).
    allowed_hosts: Vec<String>,
    /// Whether `Host` is checked at all (see [`checks_host`]).
    check_host: bool,
}

/// Whether the admin listener at `addr` checks `Host` against DNS rebinding: always when it is
/// bound to a loopback address (the default; what a browser on the same machine reaches), and on
/// any other address once `admin.allowed_hosts` names the hosts it is reached by. An admin
/// listener exposed on purpose is scraped and browsed by names the gateway cannot know, and
/// refusing them by default would break monitoring on upgrade.
fn checks_host(addr: SocketAddr, allowed_hosts: &[String]) -> bool {
    addr.ip().is_loopback() || !allowed_hosts.is_empty()
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

type Resp = Response<Full<Bytes>>;

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port). `token` authorises mutating calls (`None`: refused).
    pub async fn bind(
        addr: SocketAddr,
        gateway: Arc<Gateway>,
        token: Option<String>,
    ) -> Result<Self, StartError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("admin: cannot listen on {addr}: {e}"))?;
        Ok(AdminServer {
            listener,
            state: Arc::new(AdminState {
                gateway,
                token,
                allowed_hosts: Vec::new(),
                check_host: checks_host(addr, &[]),
            }),
        })
    }

    /// Also answers requests whose `Host` is one of `hosts` (besides IP literals and `localhost`).
    pub fn with_allowed_hosts(mut self, hosts: &[String]) -> Self {
        let addr = self.local_addr();
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.allowed_hosts = hosts.to_vec();
            state.check_host = checks_host(addr, hosts);
        }
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` completes; its connections end then too.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        // HTTP/1.1 only (the dashboard, curl and Prometheus need nothing else): its head timer runs
        // from the connection's start and between requests, so a connection that sends nothing is
        // closed after ADMIN_READ_TIMEOUT (the auto-detecting builder's first read had no timeout,
        // and its HTTP/2 side no idle timeout).
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(ADMIN_READ_TIMEOUT);
        let builder = Arc::new(builder);
        tokio::pin!(shutdown);
        // The connections, ended with the listener: a keep-alive one (a dashboard, a scraper)
        // would otherwise go on being served after the stop, holding the whole gateway.
        let mut conns = tokio::task::JoinSet::new();
        let mut accept_errors = crate::proxy::AcceptErrors::new("admin");
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors (EMFILE), say: pause as the proxy's loop does,
                        // rather than spin at full CPU and log a line per try.
                        accept_errors.warn(&e);
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tokio::time::sleep(crate::proxy::ACCEPT_ERROR_PAUSE) => continue,
                        }
                    }
                },
            };
            let state = self.state.clone();
            let builder = builder.clone();
            conns.spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.serve(req, peer).await) }
                });
                if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
        conns.shutdown().await;
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// One of the dashboard's files, with the headers that keep it to itself.
fn dashboard_file(content_type: &'static str, body: &'static str) -> Resp {
    let mut r = respond(StatusCode::OK, content_type, body);
    let h = r.headers_mut();
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(DASHBOARD_CSP),
    );
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Resp {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(status, JSON, body)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode: {e}"),
        ),
    }
}

fn error(status: StatusCode, message: &str) -> Resp {
    let mut body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    body.push(b'\n');
    respond(status, JSON, body)
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Compares a presented token with the configured one in time that depends only on the configured
/// token's length, never on where the first difference is.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ e;
    }
    std::hint::black_box(diff) == 0
}

/// `Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer(v: &HeaderValue) -> Option<&[u8]> {
    let v = v.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

/// Minimal percent-decoding of one path segment (upstream names are plain config keys).
fn decode_segment(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a mutating call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Denied {
    /// No token is configured: mutating calls are off (403).
    NoTokenConfigured,
    /// The request's token is missing or wrong (401).
    BadToken,
}

impl Denied {
    fn response(self) -> Resp {
        match self {
            Denied::NoTokenConfigured => error(
                StatusCode::FORBIDDEN,
                "mutating admin calls are disabled: set admin.token_env to the name of an environment variable holding a token",
            ),
            Denied::BadToken => {
                let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerChange {
    state: BreakerCommand,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeChange {
    mode: Mode,
}

/// Reads a mutating call's JSON body (at most [`MAX_ADMIN_BODY`], within [`ADMIN_READ_TIMEOUT`]);
/// a 400 naming `expected` when it is not that.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    expected: &str,
) -> Result<T, Resp> {
    let body = Limited::new(req.into_body(), MAX_ADMIN_BODY).collect();
    let body = match tokio::time::timeout(ADMIN_READ_TIMEOUT, body).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "cannot read the request body",
            ))
        }
    };
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("expected {expected}: {e}"),
        )
    })
}

impl AdminState {
    /// Whether the request names this listener: an IP literal, `localhost` (or a name under it),
    /// or an allowed host. Another name is a page of another site that had its name re-pointed to
    /// this address (DNS rebinding): the browser would let it read the answers.
    fn host_allowed(&self, req: &Request<Incoming>) -> bool {
        let host = match req.uri().host() {
            Some(h) => h,
            None => match req.headers().get(HOST) {
                None => return true,
                Some(v) => match v.to_str() {
                    Ok(v) => v,
                    Err(_) => return false,
                },
            },
        };
        if host.starts_with('[') {
            return true; // an IPv6 literal
        }
        let name = host.rsplit_once(':').map_or(host, |(n, _)| n);
        // A fully qualified name (`localhost.`) is the same name.
        let name = name.strip_suffix('.').unwrap_or(name);
        name.parse::<std::net::Ipv4Addr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || name
                .get(name.len().saturating_sub(".localhost".len())..)
                .is_some_and(|t| t.eq_ignore_ascii_case(".localhost"))
            || self
                .allowed_hosts
                .iter()
                .any(|a| a.eq_ignore_ascii_case(name))
    }

    async fn serve(&self, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        if self.check_host && !self.host_allowed(&req) {
            return respond(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "this host name is not allowed on the admin listener (DNS rebinding protection): \
                 use its address, localhost, or list the name in admin.allowed_hosts\n",
            );
        }
        let path = req.uri().path();
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        if let Some(&(_, content_type, body)) = DASHBOARD.iter().find(|(p, _, _)| *p == path) {
            return if get {
                dashboard_file(content_type, body)
            } else {
                method_not_allowed("GET, HEAD")
            };
        }
        match path {
            "/" if get => {
                let mut r = respond(StatusCode::FOUND, "text/plain; charset=utf-8", "");
                r.headers_mut()
                    .insert(LOCATION, HeaderValue::from_static("/dashboard"));
                r
            }
            "/health" if get => self.health(),
            "/ready" if get => self.ready(),
            "/metrics" if get => self.metrics(),
            BREAKERS if get => {
                let rt = self.gateway.runtime();
                json(StatusCode::OK, &health::breakers(&self.gateway, &rt))
            }
            AUDIT if get => self.audit(req.uri().query()).await,
            MODE if get => json(StatusCode::OK, &self.gateway.mode_status()),
            CONFIG if get => self.config(),
            MODE if req.method() == Method::PUT || req.method() == Method::DELETE => {
                self.set_mode(req, peer).await
            }
            MODE => method_not_allowed("GET, HEAD, PUT, DELETE"),
            "/health" | "/ready" | "/metrics" | BREAKERS | AUDIT | CONFIG => {
                method_not_allowed("GET, HEAD")
            }
            _ => match path
                .strip_prefix(BREAKERS)
                .and_then(|p| p.strip_prefix('/'))
            {
                Some(name) if !name.is_empty() && !name.contains('/') => {
                    let Some(name) = decode_segment(name) else {
                        return error(StatusCode::NOT_FOUND, "no such upstream");
                    };
                    if get {
                        self.one_breaker(&name)
                    } else if req.method() == Method::PUT {
                        self.set_breaker(&name, req, peer).await
                    } else {
                        method_not_allowed("GET, HEAD, PUT")
                    }
                }
                _ => error(StatusCode::NOT_FOUND, "not found"),
            },
        }
    }

    /// `GET /api/config`: the config in force (as `bulwark check` prints it), its generation, what
    /// became of the last reload (a refused one's error: the file on disk is not what runs), and
    /// the settings of it that wait for a restart (the process still runs the started ones).
    fn config(&self) -> Resp {
        let rt = self.gateway.runtime();
        let status = self.gateway.reload_status();
        json(
            StatusCode::OK,
            &serde_json::json!({
                "generation": self.gateway.generation(),
                "file": status.file,
                "last_reload": {
                    "at_unix_ms": status.last_attempt_unix_ms,
                    "ok": status.last_ok,
                    "error": status.last_error,
                },
                "restart_required": status.restart_required,
                "effective": crate::config::to_yaml(&rt.config),
            }),
        )
    }

    fn health(&self) -> Resp {
        let rt = self.gateway.runtime();
        let report = health::health(&rt, self.gateway.generation(), self.gateway.mode());
        let status = if report.status == health::Status::Unhealthy {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        json(status, &report)
    }

    fn ready(&self) -> Resp {
        let (status, phase) = match self.gateway.phase() {
            Phase::Serving => (StatusCode::OK, "serving"),
            Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
            Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        };
        json(
            status,
            &serde_json::json!({ "ready": status == StatusCode::OK, "phase": phase }),
        )
    }

    fn metrics(&self) -> Resp {
        let rt = self.gateway.runtime();
        respond(StatusCode::OK, OPENMETRICS, rt.telemetry().encode(&rt))
    }

    fn one_breaker(&self, name: &str) -> Resp {
        let rt = self.gateway.runtime();
        match rt.upstream(name) {
            Some(up) => json(StatusCode::OK, &health::breaker_report(&self.gateway, up)),
            None => error(
                StatusCode::NOT_FOUND,
                &format!("no upstream named `{name}`"),
            ),
        }
    }

    /// Checks the bearer token of a mutating call.
    fn authorize(&self, req: &Request<Incoming>) -> Result<(), Denied> {
        let token = self.token.as_ref().ok_or(Denied::NoTokenConfigured)?;
        let ok = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(bearer)
            .is_some_and(|given| constant_time_eq(given, token.as_bytes()));
        if ok {
            Ok(())
        } else {
            Err(Denied::BadToken)
        }
    }

    /// `GET /api/audit?limit=N`: the newest `N` entries (default [`store::DEFAULT_AUDIT_LIMIT`], at
    /// most [`store::MAX_AUDIT_LIMIT`]); an empty list without a store.
    async fn audit(&self, query: Option<&str>) -> Resp {
        let mut limit = store::DEFAULT_AUDIT_LIMIT;
        for (k, v) in query
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
        {
            if k == "limit" {
                match v.parse::<usize>() {
                    Ok(n) if (1..=store::MAX_AUDIT_LIMIT).contains(&n) => limit = n,
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "limit must be a whole number from 1 to {}",
                                store::MAX_AUDIT_LIMIT
                            ),
                        )
                    }
                }
            }
        }
        let Some(store) = self.gateway.store().cloned() else {
            return json(StatusCode::OK, &serde_json::json!({ "entries": [] }));
        };
        match tokio::task::spawn_blocking(move || store.audit(limit)).await {
            Ok(Ok(entries)) => json(StatusCode::OK, &serde_json::json!({ "entries": entries })),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "admin: cannot read the audit log");
                error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            }
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot read the audit log: {e}"),
            ),
        }
    }

    /// `PUT /api/mode` (set the override) and `DELETE /api/mode` (clear it).
    async fn set_mode(&self, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        if let Err(d) = self.authorize(&req) {
            let r = d.response();
            tracing::warn!(status = r.status().as_u16(), "admin: refused mode change");
            return r;
        }
        let over = if req.method() == Method::PUT {
            let expected = r#"{"mode": "normal" | "maintenance" | "read_only" | "degraded"}"#;
            match read_json::<ModeChange>(req, expected).await {
                Ok(c) => Some(c.mode),
                Err(r) => return r,
            }
        } else {
            None
        };
        let client = peer.to_string();
        let result = if self.gateway.store().is_some() {
            // The store write blocks (one fsync): off the workers.
            let gateway = self.gateway.clone();
            match tokio::task::spawn_blocking(move || gateway.set_mode_by(over, Some(&client)))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("mode change failed: {e}"),
                    )
                }
            }
        } else {
            self.gateway.set_mode_by(over, Some(&client))
        };
        match result {
            Ok(status) => json(StatusCode::OK, &status),
            Err(e) => {
                tracing::error!(error = %e, "admin: mode change not recorded; nothing changed");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("the change could not be recorded, nothing was changed: {e}"),
                )
            }
        }
    }

    async fn set_breaker(&self, name: &str, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        if let Err(d) = self.authorize(&req) {
            let r = d.response();
            // `?`: the name comes from the path, percent-decoded, before anything checked it (a
            // `%0A` in it must not start a line of its own in the log).
            tracing::warn!(upstream = ?name, status = r.status().as_u16(), "admin: refused breaker change");
            return r;
        }
        let change: BreakerChange =
            match read_json(req, r#"{"state": "forced_open" | "closed" | "disabled"}"#).await {
                Ok(c) => c,
                Err(r) => return r,
            };
        let result = if self.gateway.store().is_some() {
            // The store write blocks (one fsync): run it, and the apply after it, off the workers.
            let gateway = self.gateway.clone();
            let owned = name.to_owned();
            let client = peer.to_string();
            match tokio::task::spawn_blocking(move || {
                gateway.set_breaker_by(&owned, change.state, Some(&client))
            })
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("breaker change failed: {e}"),
                    )
                }
            }
        } else {
            self.gateway
                .set_breaker_by(name, change.state, Some(&peer.to_string()))
        };
        match result {
            Ok(_) => match self.gateway.runtime().upstream(name) {
                Some(up) => json(StatusCode::OK, &health::breaker_report(&self.gateway, up)),
                // `closed` cleared a kept override of an upstream that is not in the config.
                None => json(
                    StatusCode::OK,
                    &serde_json::json!({ "upstream": name, "override": null, "in_config": false }),
                ),
            },
            Err(BreakerChangeError::Store(e)) => {
                tracing::error!(upstream = %name, error = %e, "admin: breaker change not recorded; nothing changed");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("the change could not be recorded, nothing was changed: {e}"),
                )
            }
            Err(BreakerChangeError::UnknownUpstream) => error(
                StatusCode::NOT_FOUND,
                &format!("no upstream named `{name}`"),
            ),
            Err(BreakerChangeError::NoBreaker) => error(
                StatusCode::CONFLICT,
                &format!("upstream `{name}` has no circuit breaker"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_checked_on_loopback_and_wherever_allowed_hosts_are_named() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(checks_host(at("127.0.0.1:9901"), &[]));
        assert!(checks_host(at("[::1]:9901"), &[]));
        assert!(!checks_host(at("0.0.0.0:9901"), &[]));
        assert!(!checks_host(at("10.0.0.5:9901"), &[]));
        assert!(checks_host(
            at("10.0.0.5:9901"),
            &["gw-1.internal".to_owned()]
        ));
    }

    #[test]
    fn the_token_from_the_environment_is_trimmed() {
        let admin = |var: &str| config::Admin {
            token_env: Some(var.to_owned()),
            ..serde_norway::from_str("{}").unwrap()
        };
        // Names of this test's own: no other test reads them.
        std::env::set_var("BULWARK_TEST_TOKEN_NL", "s3cret\n");
        std::env::set_var("BULWARK_TEST_TOKEN_BLANK", " \n");
        assert_eq!(
            token_from_env(&admin("BULWARK_TEST_TOKEN_NL")).as_deref(),
            Some("s3cret")
        );
        assert_eq!(token_from_env(&admin("BULWARK_TEST_TOKEN_BLANK")), None);
        // Only ASCII whitespace, as on the presented side.
        std::env::set_var("BULWARK_TEST_TOKEN_NBSP", "s3cret\u{a0}");
        assert_eq!(
            token_from_env(&admin("BULWARK_TEST_TOKEN_NBSP")).as_deref(),
            Some("s3cret\u{a0}")
        );
        assert_eq!(token_from_env(&admin("BULWARK_TEST_TOKEN_UNSET")), None);
    }

    #[test]
    fn constant_time_eq_matches_only_equal_tokens() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cres", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret-and-more", b"s3cret"));
        assert!(!constant_time_eq(b"s3c", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        // A zero byte does not pass for a missing one.
        assert!(!constant_time_eq(b"ab", b"ab\0"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(
            bearer(&HeaderValue::from_static("Bearer abc")),
            Some(&b"abc"[..])
        );
        assert_eq!(
            bearer(&HeaderValue::from_static("bearer  abc ")),
            Some(&b"abc"[..])
        );
        assert_eq!(bearer(&HeaderValue::from_static("Basic abc")), None);
        assert_eq!(bearer(&HeaderValue::from_static("Bearer")), None);
    }

    #[test]
    fn segments_are_percent_decoded() {
        assert_eq!(decode_segment("a%2Db").as_deref(), Some("a-b"));
        assert_eq!(decode_segment("plain").as_deref(), Some("plain"));
        assert_eq!(decode_segment("bad%zz"), None);
        assert_eq!(decode_segment("cut%2"), None);
    }
}
