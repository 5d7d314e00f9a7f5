//! The proxy: listener (HTTP/1.1, h2c, TLS), limits, routing, and the attempt loop.
//!
//! A request passes these stages, in order:
//! 1. the connection (accept under `max_connections`; TLS; our own HTTP/1.1 loop (`h1`), or hyper's
//!    HTTP/2 server for TLS ALPN `h2` and connections that start with the HTTP/2 preface);
//! 2. limits (head size -> 431, declared body size -> 413, streamed body size -> 413 on overflow);
//! 3. routing (first match wins; 404 otherwise), then the operating mode (`maintenance`,
//!    `read_only`, `degraded`), which may refuse the request (503) or forbid retries, the route's
//!    rate limit per client (`admission`, 429), its injected faults (`chaos`), and the admission
//!    queue (`admission`: requests forwarded at once, waiting by priority; 503 `shed`), whose slot
//!    the response body keeps until it ends;
//! 4. header rewriting (hop-by-hop out, `x-forwarded-*` and `x-request-id` in);
//! 5. the attempt loop (`attempt`) that talks to upstreams;
//! 6. one mapping from outcome to response ([`respond`]).

pub(crate) mod attempt;

pub mod body;
pub(crate) mod h1;
pub(crate) mod h2;
pub mod headers;
pub mod respond;
pub mod route;
pub(crate) mod tunnel;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, Response};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use bulwark::events::BreakerState;

use crate::admin::metrics::{RouteStats, Telemetry};
use crate::config::{self, Config, Mode};
use crate::store::Store;
use crate::upstream::Upstream;
use body::{ClientBody, RespBody};
use respond::Local;
use route::{ModeAction, Route};

/// Limits enforced per request, from `limits:`.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Request head bytes.
    pub max_header_bytes: usize,
    /// Request header fields.
    pub max_headers: usize,
    /// Request body bytes.
    pub max_body_bytes: u64,
}

/// The immutable routing state built from one config; swapped whole on reload.
#[derive(Debug)]
pub struct Runtime {
    /// Routes in match order.
    pub routes: Vec<Route>,
    /// Upstreams, indexed by routes' chains.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Request limits.
    pub limits: RequestLimits,
    /// The config this runtime was built from.
    pub config: Arc<Config>,
    /// The config the process started with: what the settings a reload cannot change (the
    /// listener's, the admin's...) still come from. A reload compares against it.
    pub started: Arc<Config>,
    /// Emit one access-log line per request (`logging.access_log`).
    pub access_log: bool,
    /// `admission`: requests forwarded at once, and the priority queue in front.
    pub admission: Option<crate::admission::Admission>,
    /// Admission queues that reloads replaced, while requests still hold or wait for their slots,
    /// or a runtime still using them may give one (the gauges count them too).
    retired_admission: Vec<(bulwark::shed::Shedder, std::sync::Weak<()>)>,
    /// The listener's TLS setup from this config's `tls` files (a reload reads them again, so a
    /// certificate renewed in place is served to new connections).
    listener_tls: Option<ListenerTls>,
    /// Request metrics, index-aligned with `routes`, resolved at build time.
    pub(crate) stats: Vec<RouteStats>,
    telemetry: Arc<Telemetry>,
}

impl Runtime {
    /// Builds the runtime of a validated config, with its own metrics registry.
    pub fn new(config: &Config) -> Result<Self, String> {
        Self::build(config, &Arc::new(Telemetry::new()), None)
    }

    /// Builds the runtime of a validated config; the policies report their events to `events` (and
    /// not to the runtime's own metrics registry).
    pub fn with_events(config: &Config, events: &crate::policy::Events) -> Result<Self, String> {
        Self::build_with(config, &Arc::new(Telemetry::new()), events, None)
    }

    /// Builds the runtime of a validated config, reporting to `telemetry`. With `previous` (a reload),
    /// every upstream whose name and settings are unchanged is carried over as is (the same
    /// `Arc<Upstream>`), so its live state survives: breaker window and state, endpoint health and
    /// load, connection pools. Changed and new upstreams start fresh.
    pub fn build(
        config: &Config,
        telemetry: &Arc<Telemetry>,
        previous: Option<&Runtime>,
    ) -> Result<Self, String> {
        Self::build_with(config, telemetry, &telemetry.events(), previous)
    }

    fn build_with(
        config: &Config,
        telemetry: &Arc<Telemetry>,
        events: &crate::policy::Events,
        previous: Option<&Runtime>,
    ) -> Result<Self, String> {
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for (name, up) in config.upstreams.iter() {
            let kept = previous.and_then(|p| p.unchanged_upstream(name, up));
            upstreams.push(match kept {
                Some(u) => u,
                None => Arc::new(
                    Upstream::new(name, up, events).map_err(|e| format!("upstreams.{name}.{e}"))?,
                ),
            });
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let carried = crate::policy::Carried {
                budget: previous.and_then(|p| p.unchanged_budget(i, r)),
                latency: previous.and_then(|p| p.same_upstreams_latency(i, r)),
            };
            let mut route =
                Route::with_events(i, r, |n| config.upstreams.index_of(n), events, carried)?;
            if let Some(limit) = previous.and_then(|p| p.unchanged_client_limit(i, r)) {
                route.client_limit = Some(limit.clone());
            }
            routes.push(route);
        }
        // Kept across a reload that leaves the section unchanged (its queue and running count).
        let kept = previous.filter(|p| same_settings(&p.config.admission, &config.admission));
        let admission = match config.admission.as_ref().filter(|a| a.enabled) {
            Some(a) => match kept {
                Some(p) => p.admission.clone(),
                None => {
                    Some(crate::admission::Admission::new(a, events).map_err(|e| e.to_string())?)
                }
            },
            None => None,
        };
        // A replaced queue lives on in the requests it admitted (or still queues), and in the
        // runtimes that use it (a request that loaded one may take a slot after this reload):
        // kept for the gauges while it has either.
        let mut retired_admission = Vec::new();
        if let Some(p) = previous {
            let live = |(s, users): &(bulwark::shed::Shedder, std::sync::Weak<()>)| {
                s.running() + s.queued() > 0 || crate::admission::Admission::in_use(users)
            };
            retired_admission.extend(p.retired_admission.iter().filter(|r| live(r)).cloned());
            if let (Some(old), None) = (&p.admission, &kept) {
                retired_admission.push((old.shedder().clone(), old.users()));
            }
        }
        let listener_tls = match &config.tls {
            Some(t) => Some(ListenerTls::load(
                &t.cert,
                &t.key,
                previous.and_then(|p| p.listener_tls.as_ref()),
            )?),
            // Turning `tls` off takes a restart: until then the listener serves the certificate
            // in force (perhaps renewed by a reload since the start), not the one it was bound
            // with.
            None => previous.and_then(|p| p.listener_tls.clone()),
        };
        let stats = routes
            .iter()
            .map(|r| {
                let primary = r.chain.first().map_or("", |&u| &*upstreams[u].name);
                telemetry.route_stats(&r.name, primary)
            })
            .collect();
        let config = Arc::new(config.clone());
        let started = previous.map_or_else(|| config.clone(), |p| p.started.clone());
        let runtime = Runtime {
            routes,
            upstreams,
            limits: RequestLimits {
                // Raising it needs a restart (the listener's read buffer is sized at start), so
                // a reload never takes it above the value at start, for HTTP/1.1 and HTTP/2 alike.
                max_header_bytes: config
                    .limits
                    .max_header_bytes
                    .as_usize()
                    .min(started.limits.max_header_bytes.as_usize()),
                max_headers: config.limits.max_headers,
                max_body_bytes: config.limits.max_body_bytes.get(),
            },
            access_log: config.logging.access_log,
            config,
            started,
            admission,
            retired_admission,
            listener_tls,
            stats,
            telemetry: telemetry.clone(),
        };
        telemetry.declare(&runtime);
        Ok(runtime)
    }

    /// Requests forwarded under the admission queues (this runtime's and the ones reloads replaced
    /// that still have some), and requests waiting in them.
    pub fn admission_counts(&self) -> (usize, usize) {
        let queues = self.admission.iter().map(|a| a.shedder());
        queues
            .chain(self.retired_admission.iter().map(|(s, _)| s))
            .fold((0, 0), |(r, q), s| (r + s.running(), q + s.queued()))
    }

    /// The retry budget of this runtime's counterpart of route `i` of a new config (`c`), when the
    /// two have the same budget settings: the reloaded route keeps it, balance and all. A named
    /// route's counterpart is the route of that name; an unnamed one's, the unnamed route at the
    /// same position.
    fn unchanged_budget(
        &self,
        i: usize,
        c: &config::Route,
    ) -> Option<&bulwark::retry::RetryBudget> {
        let budget_of = |r: &config::Route| r.retry.as_ref().filter(|r| r.enabled)?.budget.clone();
        let j = self.counterpart(i, c)?;
        let (new_settings, old_settings) = (budget_of(c)?, budget_of(&self.config.routes[j])?);
        if !same_settings(&old_settings, &new_settings) {
            return None;
        }
        self.routes.get(j)?.policies.budget()
    }

    /// The rate limit per client of this runtime's counterpart of route `i` of a new config (`c`),
    /// when the two have the same settings: the reloaded route keeps its clients' buckets (a reload
    /// does not hand every client a fresh burst).
    fn unchanged_client_limit(
        &self,
        i: usize,
        c: &config::Route,
    ) -> Option<&crate::admission::ClientLimit> {
        let j = self.counterpart(i, c)?;
        let new = c.client_rate_limit.as_ref()?;
        let old = self.config.routes[j].client_rate_limit.as_ref()?;
        if !same_settings(old, new) {
            return None;
        }
        self.routes.get(j)?.client_limit.as_ref()
    }

    /// The latency window of this runtime's counterpart of route `i` of a new config (`c`), when
    /// the two go to the same upstreams (primary and failover chain).
    fn same_upstreams_latency(
        &self,
        i: usize,
        c: &config::Route,
    ) -> Option<&Arc<bulwark::latency::LatencyWindow>> {
        let j = self.counterpart(i, c)?;
        let old = &self.config.routes[j];
        if old.upstream != c.upstream || old.failover != c.failover {
            return None;
        }
        Some(self.routes.get(j)?.policies.latency())
    }

    /// The index of route `i` of a new config (`c`) in this runtime: the route of the same name, or
    /// for an unnamed one, the unnamed route at the same position.
    fn counterpart(&self, i: usize, c: &config::Route) -> Option<usize> {
        let olds = &self.config.routes;
        match &c.name {
            Some(n) => olds.iter().position(|r| r.name.as_ref() == Some(n)),
            None if olds.get(i)?.name.is_none() => Some(i),
            None => None,
        }
    }

    /// This runtime's upstream `name`, if its settings equal `settings`.
    fn unchanged_upstream(&self, name: &str, settings: &config::Upstream) -> Option<Arc<Upstream>> {
        let old = self.config.upstreams.get(name)?;
        if !same_settings(old, settings) {
            return None;
        }
        self.upstream(name)
            .filter(|u| u.same_tls_files(settings))
            .cloned()
    }

    /// An upstream by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| &*u.name == name)
    }

    /// The metrics registry this runtime reports to.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }
}

/// Whether two config sections are equal, compared through their serialized form (every config type
/// is `Serialize`, and the serialized form is what `bulwark check` prints, defaults included).
fn same_settings<T: serde::Serialize>(a: &T, b: &T) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Where the gateway is in its life, for `GET /ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Built, not yet accepting.
    Starting,
    /// Accepting and serving.
    Serving,
    /// Shutting down: no longer accepting, finishing in-flight requests.
    Draining,
}

/// A manual circuit-breaker state set through the admin API; it stays until changed, across reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerCommand {
    /// Reject every call until changed.
    ForcedOpen,
    /// Close with an empty window and return to automatic operation (clears an override).
    Closed,
    /// Admit every call and record nothing.
    Disabled,
}

impl BreakerCommand {
    fn apply(self, b: &bulwark::breaker::CircuitBreaker) {
        match self {
            BreakerCommand::ForcedOpen => b.force_open(),
            BreakerCommand::Closed => b.reset(),
            BreakerCommand::Disabled => b.disable(),
        }
    }

    /// Puts a breaker that stands in for one already in this state (rebuilt by a reload, or
    /// built at a restart) into it without a transition event: no change the operator can see.
    fn restore(self, b: &bulwark::breaker::CircuitBreaker) {
        let state = match self {
            BreakerCommand::ForcedOpen => BreakerState::ForcedOpen,
            BreakerCommand::Closed => BreakerState::Closed,
            BreakerCommand::Disabled => BreakerState::Disabled,
        };
        b.restore(state);
    }
}

/// Why a manual breaker change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerChangeError {
    /// No upstream of that name.
    UnknownUpstream,
    /// The upstream has no circuit breaker (`circuit_breaker` absent or `enabled: false`).
    NoBreaker,
    /// The store could not record the change; nothing was changed.
    Store(crate::store::StoreError),
}

/// The gateway's shared state: the current runtime, swappable on reload, plus what outlives one
/// runtime (lifecycle phase, admin overrides, the store).
#[derive(Debug)]
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    phase: AtomicU8,
    generation: AtomicU64,
    /// Admin breaker overrides by upstream name. Also serialises swaps against admin changes, so an
    /// override set during a reload is never lost.
    overrides: Mutex<BTreeMap<String, BreakerCommand>>,
    /// The embedded store, when `store:` is configured: the source of truth for overrides.
    store: OnceLock<Arc<Store>>,
    /// Serialises admin changes end to end (check, store write, apply), so two changes of one
    /// upstream are recorded and applied in the same order. Never taken on the request path.
    changes: Mutex<()>,
    /// The admin API's mode override (index in [`Mode::ALL`], or [`NO_OVERRIDE`]); changed under the
    /// `overrides` lock. The mode in force is it, else the config's in the runtime a request
    /// loaded: a reload changes the config's mode and the routes it applies to at once.
    mode_override: AtomicU8,
    /// The config file and the outcome of the last reload, for `GET /api/config`.
    reloads: Mutex<ReloadStatus>,
    /// Woken when a runtime is installed (the idle-connection reaper recomputes its interval).
    installed: tokio::sync::Notify,
}

/// The config file and what became of the last reload of it: what `GET /api/config` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    /// The config file being watched (none without a reloader).
    pub file: Option<String>,
    /// When the last reload was tried (Unix time, milliseconds), if one was.
    pub last_attempt_unix_ms: Option<u64>,
    /// Whether it applied.
    pub last_ok: Option<bool>,
    /// Its error, if it was refused: the previous config keeps serving.
    pub last_error: Option<String>,
    /// The settings of the config in force that differ from those the process started with and
    /// take effect only after a restart (the process still runs the started ones).
    pub restart_required: Vec<&'static str>,
}

/// [`Gateway::mode_override`] when no override is set.
const NO_OVERRIDE: u8 = u8::MAX;

/// The operating mode, where it comes from: what `GET /api/mode` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ModeStatus {
    /// The mode in force.
    pub mode: Mode,
    /// The config file's `mode`.
    pub configured: Mode,
    /// The admin API's override, which wins over the file until cleared.
    #[serde(rename = "override")]
    pub override_: Option<Mode>,
}

fn mode_index(m: Mode) -> u8 {
    m.index() as u8
}

impl Gateway {
    /// A gateway serving `runtime`.
    pub fn new(runtime: Runtime) -> Self {
        runtime.telemetry.refresh(&runtime);
        let mode = runtime.config.mode;
        runtime.telemetry.set_mode(mode);
        Gateway {
            mode_override: AtomicU8::new(NO_OVERRIDE),
            runtime: ArcSwap::from_pointee(runtime),
            phase: AtomicU8::new(Phase::Starting as u8),
            generation: AtomicU64::new(1),
            overrides: Mutex::new(BTreeMap::new()),
            store: OnceLock::new(),
            changes: Mutex::new(()),
            reloads: Mutex::new(ReloadStatus::default()),
            installed: tokio::sync::Notify::new(),
        }
    }

    /// What `GET /api/config` shows of reloads.
    pub fn reload_status(&self) -> ReloadStatus {
        self.reloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records the file a reloader watches.
    pub fn set_config_file(&self, file: &std::path::Path) {
        self.reloads.lock().unwrap_or_else(|p| p.into_inner()).file =
            Some(file.display().to_string());
    }

    /// Records the outcome of a reload: the restart-only settings the applied config changed, or
    /// the refused one's error (the config in force, and what it awaits, stay as they were).
    pub fn record_reload(&self, outcome: Result<&[&'static str], &str>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut s = self.reloads.lock().unwrap_or_else(|p| p.into_inner());
        s.last_attempt_unix_ms = Some(now);
        s.last_ok = Some(outcome.is_ok());
        match outcome {
            Ok(pending) => {
                s.last_error = None;
                s.restart_required = pending.to_vec();
            }
            Err(e) => s.last_error = Some(e.to_owned()),
        }
    }

    /// The current runtime.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Attaches the store (once; a second call is ignored and returns `false`) and applies the
    /// overrides read from it to the current runtime's breakers. Call it before the listener serves.
    /// An override whose upstream is not in the config (or has no breaker) is kept, with a warning:
    /// it stays in the store and is applied if a reload brings the upstream back, until an operator
    /// clears it with `closed`.
    ///
    /// A persisted mode override (`mode`) is applied too, with a warning naming it.
    pub fn attach_store(
        &self,
        store: Arc<Store>,
        persisted: BTreeMap<String, BreakerCommand>,
        mode: Option<Mode>,
    ) -> bool {
        if self.store.set(store).is_err() {
            return false;
        }
        let mut overrides = self.lock_overrides();
        let rt = self.runtime();
        if let Some(m) = mode {
            tracing::warn!(mode = %m, configured = %rt.config.mode, "operating mode override restored from the store");
        }
        self.install_mode(mode, &rt);
        for (name, cmd) in persisted {
            match rt.upstream(&name).and_then(|u| u.policies.breaker()) {
                Some(b) => {
                    cmd.restore(b);
                    tracing::warn!(upstream = %name, state = %b.state(), "circuit breaker override restored from the store");
                }
                None => {
                    tracing::warn!(upstream = %name, state = crate::store::command_name(cmd), "stored breaker override kept but not applied: the upstream or its breaker is not in the config")
                }
            }
            overrides.insert(name, cmd);
        }
        rt.telemetry.refresh(&rt);
        true
    }

    /// The attached store, if any.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.get()
    }

    /// Swaps in a new runtime; requests in flight finish on the old one. Admin breaker overrides are
    /// applied to the new runtime's breakers before any request can see it. An override whose
    /// upstream is gone (or has no breaker any more) is dropped with a warning when there is no store;
    /// with a store it is kept (in the store and here), with a warning, and applied again if a later
    /// reload brings the upstream back.
    pub fn swap(&self, runtime: Runtime) {
        // After an admin change in progress (its audit row names the config's mode of the moment).
        let _serial = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let keep_dormant = self.store.get().is_some();
        let mut overrides = self.lock_overrides();
        overrides.retain(|name, cmd| {
            match runtime.upstream(name).and_then(|u| u.policies.breaker()) {
                Some(b) => {
                    cmd.restore(b);
                    true
                }
                None if keep_dormant => {
                    tracing::warn!(upstream = %name, "admin breaker override kept in the store but not applied: the upstream or its breaker is gone");
                    true
                }
                None => {
                    tracing::warn!(upstream = %name, "admin breaker override dropped: the upstream or its breaker is gone");
                    false
                }
            }
        });
        runtime.telemetry.refresh(&runtime);
        self.install_mode(self.mode_override(), &runtime);
        let new = Arc::new(runtime);
        let old = self.runtime.swap(new.clone());
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.installed.notify_waiters();
        // Upstreams the new runtime did not carry over are retired now, though requests in flight
        // may hold the old runtime a while yet (as Envoy tears down a removed cluster's health
        // checks at once and drains its pools).
        for up in &old.upstreams {
            if !new.upstreams.iter().any(|n| Arc::ptr_eq(n, up)) {
                up.retire();
            }
        }
    }

    /// The admin API's mode override, if one is set.
    fn mode_override(&self) -> Option<Mode> {
        Mode::ALL
            .get(usize::from(self.mode_override.load(Ordering::Relaxed)))
            .copied()
    }

    /// Records `over` as the mode override and reports the mode in force with `rt` (it, or `rt`'s
    /// config's) to the metrics, before `rt` is installed, if it is a new one. Callers hold the
    /// `overrides` lock.
    fn install_mode(&self, over: Option<Mode>, rt: &Runtime) {
        let before = self.mode();
        let mode = over.unwrap_or(rt.config.mode);
        self.mode_override
            .store(over.map_or(NO_OVERRIDE, mode_index), Ordering::Relaxed);
        rt.telemetry.set_mode(mode);
        if before != mode {
            tracing::warn!(mode = %mode, "operating mode changed");
        }
    }

    /// The operating mode in force for requests on `rt`: the override, else `rt`'s config's (one
    /// atomic load).
    pub fn mode_in(&self, rt: &Runtime) -> Mode {
        self.mode_override().unwrap_or(rt.config.mode)
    }

    /// The operating mode in force.
    pub fn mode(&self) -> Mode {
        self.mode_in(&self.runtime())
    }

    /// The mode in force, the config's, and the admin override.
    pub fn mode_status(&self) -> ModeStatus {
        let _held = self.lock_overrides();
        ModeStatus {
            mode: self.mode(),
            configured: self.runtime().config.mode,
            override_: self.mode_override(),
        }
    }

    /// Sets the admin mode override (`Some`), which wins over the config's `mode` across reloads
    /// (and restarts, with a store), or clears it (`None`): the config's mode is then in force.
    ///
    /// With a store attached the change is recorded there first (override and audit row, with
    /// `client`, in one transaction) and applied only once that succeeded; this then blocks on
    /// SQLite, so async callers run it with `spawn_blocking`.
    pub fn set_mode_by(
        &self,
        over: Option<Mode>,
        client: Option<&str>,
    ) -> Result<ModeStatus, crate::store::StoreError> {
        let _serial = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(store) = self.store.get() {
            let from = self.mode();
            let to = over.unwrap_or(self.runtime().config.mode);
            store.record_mode(over, from, to, crate::store::SET_BY_ADMIN_API, client)?;
        }
        let overrides = self.lock_overrides();
        let rt = self.runtime();
        self.install_mode(over, &rt);
        drop(overrides);
        match over {
            Some(m) => tracing::warn!(mode = %m, "operating mode set by the admin API"),
            None => {
                tracing::warn!(mode = %rt.config.mode, "operating mode override cleared by the admin API: the config's mode is in force")
            }
        }
        Ok(self.mode_status())
    }

    /// How many runtimes have been installed (1 at start, +1 per reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The lifecycle phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }

    /// Sets the lifecycle phase (the server does this; exposed for embedders).
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    fn lock_overrides(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BreakerCommand>> {
        // The map stays consistent even if a holder panicked (every update is a single insert/remove).
        self.overrides.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets upstream `name`'s breaker by hand, as [`set_breaker_by`](Self::set_breaker_by) with no
    /// client address.
    pub fn set_breaker(
        &self,
        name: &str,
        cmd: BreakerCommand,
    ) -> Result<Option<BreakerState>, BreakerChangeError> {
        self.set_breaker_by(name, cmd, None)
    }

    /// Sets upstream `name`'s breaker by hand. `ForcedOpen` and `Disabled` are kept as overrides and
    /// re-applied after every reload; `Closed` closes the breaker and clears the override. Returns the
    /// breaker's new state (`None` when `Closed` cleared a kept override of an upstream that is not in
    /// the config or has no breaker).
    ///
    /// With a store attached the change is first recorded there (override and audit row, with
    /// `client`, in one transaction) and applied only once that succeeded: a failed write returns
    /// [`BreakerChangeError::Store`] and changes nothing. This then blocks on SQLite: async callers
    /// run it with `spawn_blocking` (the admin API does).
    pub fn set_breaker_by(
        &self,
        name: &str,
        cmd: BreakerCommand,
        client: Option<&str>,
    ) -> Result<Option<BreakerState>, BreakerChangeError> {
        let _serial = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let store = self.store.get();
        let rt = self.runtime();
        let up = rt.upstream(name);
        let from = match up.and_then(|u| u.policies.breaker()) {
            Some(b) => b.state().as_str(),
            None => {
                // A kept override of an upstream that is gone (or lost its breaker) can be cleared.
                let kept = self.breaker_override(name);
                match (kept, cmd, store) {
                    (Some(k), BreakerCommand::Closed, Some(_)) => crate::store::command_name(k),
                    _ if up.is_none() => return Err(BreakerChangeError::UnknownUpstream),
                    _ => return Err(BreakerChangeError::NoBreaker),
                }
            }
        };
        if let Some(store) = store {
            store
                .record(&crate::store::BreakerChange {
                    upstream: name,
                    from,
                    to: cmd,
                    by: crate::store::SET_BY_ADMIN_API,
                    client,
                })
                .map_err(BreakerChangeError::Store)?;
        }
        let mut overrides = self.lock_overrides();
        // A reload may have swapped the runtime since the look above: apply to the current one.
        let rt = self.runtime();
        let breaker = rt.upstream(name).and_then(|u| u.policies.breaker());
        if breaker.is_none() && store.is_none() {
            return Err(if rt.upstream(name).is_none() {
                BreakerChangeError::UnknownUpstream
            } else {
                BreakerChangeError::NoBreaker
            });
        }
        if let Some(b) = breaker {
            cmd.apply(b);
        }
        match cmd {
            BreakerCommand::Closed => {
                overrides.remove(name);
            }
            other => {
                overrides.insert(name.to_owned(), other);
            }
        }
        drop(overrides);
        match breaker {
            Some(b) => {
                tracing::warn!(upstream = %name, state = %b.state(), "circuit breaker set by the admin API")
            }
            None => {
                tracing::warn!(upstream = %name, state = crate::store::command_name(cmd), "kept breaker override of an upstream not in the config changed by the admin API")
            }
        }
        rt.telemetry.refresh(&rt);
        Ok(breaker.map(|b| b.state()))
    }

    /// The admin override of upstream `name`'s breaker, if any.
    pub fn breaker_override(&self, name: &str) -> Option<BreakerCommand> {
        self.lock_overrides().get(name).copied()
    }

    /// Overrides kept for upstreams that are not in the current config or have no breaker (only
    /// with a store; see [`attach_store`](Self::attach_store)).
    pub fn dormant_overrides(&self) -> BTreeMap<String, BreakerCommand> {
        let rt = self.runtime();
        self.lock_overrides()
            .iter()
            .filter(|(name, _)| {
                rt.upstream(name)
                    .and_then(|u| u.policies.breaker())
                    .is_none()
            })
            .map(|(n, c)| (n.clone(), *c))
            .collect()
    }
}

/// Per-connection state shared with the request service.
#[derive(Debug)]
struct ConnCtx {
    gateway: Arc<Gateway>,
    peer_ip: HeaderValue,
    proto: HeaderValue,
    inflight: AtomicUsize,
    /// Milliseconds since `opened` when a request last finished.
    last_active_ms: AtomicU64,
    opened: Instant,
}

impl ConnCtx {
    /// When the connection has been idle for `idle` since a request last finished (or it opened).
    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.opened + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed)) + idle
    }

    /// Records activity (the end of an exchange, an upload's frame) at `at`, never moving it back.
    fn stamp_active(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.opened).as_millis() as u64;
        self.last_active_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// Decrements in-flight and stamps activity when a request's service future ends (or is dropped):
/// at the time it was told it ended, else now.
struct Active<'a>(&'a ConnCtx, Option<Instant>);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let c = self.0;
        c.stamp_active(self.1.unwrap_or_else(Instant::now));
        c.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Stamps an HTTP/2 connection's activity as a request body streams on it (see [`ClientBody::h2`]).
#[derive(Debug)]
pub struct ConnActivity(Arc<ConnCtx>);

impl ConnActivity {
    fn stamp(&self) {
        self.0.stamp_active(Instant::now());
    }
}

/// Keeps an HTTP/2 connection busy (not idle) while a response body streams on it: counted in
/// flight until dropped with the body, then stamps the connection's activity.
pub(crate) struct Streaming(Arc<ConnCtx>);

impl Streaming {
    fn new(ctx: Arc<ConnCtx>) -> Self {
        ctx.inflight.fetch_add(1, Ordering::Relaxed);
        Streaming(ctx)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        drop(Active(&self.0, None));
    }
}

async fn handle(ctx: &ConnCtx, req: Request<ClientBody>) -> Response<RespBody> {
    ctx.inflight.fetch_add(1, Ordering::Relaxed);
    let mut active = Active(ctx, None);
    let start = Instant::now();
    let rt = ctx.gateway.runtime();
    let websocket_h2 = (req.version() == http::Version::HTTP_2)
        .then(|| req.extensions().get::<h2::ExtendedConnect>())
        .flatten()
        .map(|c| c.accept.clone());
    // A request dropped before its answer (the client went away, or the drain timed out) is
    // still counted, and logged, as a 499 (nginx's status for it) by this guard's drop.
    let mut unanswered = Abandoned {
        rt: &rt,
        start,
        route: AtomicUsize::new(NO_ROUTE),
        tally: attempt::Tally::default(),
        // Only when the access log is on: what its line needs from the request (which is
        // consumed below). An HTTP/2 WebSocket was sent as a CONNECT (it goes upstream as the
        // HTTP/1.1 GET it became).
        request: rt.access_log.then(|| {
            let method = match websocket_h2 {
                Some(_) => http::Method::CONNECT,
                None => req.method().clone(),
            };
            (method, req.uri().clone())
        }),
        answered: false,
    };
    let (mut resp, route) = route_and_forward(ctx, &rt, req, start, &unanswered).await;
    unanswered.answered = true;
    // The status the client gets: an HTTP/2 WebSocket's 101 from upstream reaches it as a 200.
    let mut status = resp.status().as_u16();
    if let Some(accept) = &websocket_h2 {
        resp = h2::refuse_unswitched(resp, accept);
        status = match resp.status() {
            http::StatusCode::SWITCHING_PROTOCOLS => 200,
            s => s.as_u16(),
        };
    }
    let end = Instant::now();
    active.1 = Some(end);
    let elapsed = end.saturating_duration_since(start);
    // Metrics: a few atomic adds on handles resolved when the runtime was built.
    if let Some(i) = route {
        rt.stats[i].record(status, elapsed);
    }
    if let Some((method, uri)) = &unanswered.request {
        let mut line = AccessLine::of(&resp, route);
        line.status = status;
        let upstream = unanswered.tally.upstream();
        access_line(
            &rt,
            route,
            upstream,
            method.as_str(),
            uri.path(),
            line,
            elapsed,
        );
    }
    // After the log line, which reads `x-bulwark-*` (a route may remove them for its clients).
    if let Some(extra) = route.and_then(|i| rt.routes[i].response_headers.as_ref()) {
        extra.apply(resp.headers_mut());
    }
    resp
}

/// Stages 2 to 6; also returns the index of the route that took the request, if one did.
async fn route_and_forward(
    ctx: &ConnCtx,
    rt: &Runtime,
    mut req: Request<ClientBody>,
    start: Instant,
    unanswered: &Abandoned<'_>,
) -> (Response<RespBody>, Option<usize>) {
    let limits = rt.limits;
    // Stage 2: limits. The HTTP/1 loop already refuses heads far over the limit while reading; this
    // makes the limit exact (and covers HTTP/2, whose headers arrive decoded).
    let target_len = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    // An HTTP/2 request's host comes as `:authority`, which HTTP/1.1 writes as a `Host` line.
    let authority = match req.uri().authority() {
        Some(a)
            if req.version() == http::Version::HTTP_2
                && !req.headers().contains_key(http::header::HOST) =>
        {
            "host: \r\n".len() + a.as_str().len()
        }
        _ => 0,
    };
    if req.headers().len() > limits.max_headers
        || headers::head_size(req.method(), target_len, req.headers()) + authority
            > limits.max_header_bytes
    {
        // Over HTTP/2 a browser sends each cookie as a field of its own (RFC 9113 8.2.3), joined
        // into one `cookie` line below: counted as that line, as HTTP/1.1 carries them (looked at
        // only here, past a limit, so a request under both costs nothing more).
        let crumbs = req
            .headers()
            .get_all(http::header::COOKIE)
            .iter()
            .count()
            .saturating_sub(1);
        let joined = crumbs * ("cookie: \r\n".len() - "; ".len());
        if req.headers().len() - crumbs > limits.max_headers
            || headers::head_size(req.method(), target_len, req.headers()) + authority - joined
                > limits.max_header_bytes
        {
            return (respond::local(Local::HeadersTooLarge), None);
        }
    }
    if let Some(len) = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limits.max_body_bytes {
            return (respond::local(Local::BodyTooLarge), None);
        }
    }
    // A dot-segment would be resolved upstream to a path other than the one routed (and judged by
    // modes, limits and rewrites): refused, whatever the route. So is a target that is neither a
    // path nor the `*` of a server-wide OPTIONS (RFC 9112 3.2.4, RFC 9113 8.3.1): HTTP/2's
    // `:path: ?a=b` would be routed as `/` and sent as it came.
    // A percent-encoded unreserved character (`/%61dmin`) is decoded first (RFC 3986 6.2.2.2): the
    // upstream decodes it before it routes, so the routes judge, and the upstream gets, `/admin`.
    // A `%` not followed by two hex digits is an invalid target (nginx refuses it too).
    match route::decode_unreserved(req.uri().path()) {
        Ok(None) => {}
        Ok(Some(path)) => match route::with_path(req.uri(), &path) {
            Some(uri) => *req.uri_mut() = uri,
            None => return (respond::local(Local::BadRequest), None),
        },
        Err(route::InvalidEscape) => return (respond::local(Local::BadRequest), None),
    }
    if route::has_dot_segment(req.uri().path()) || !valid_target(&req) {
        return (respond::local(Local::BadRequest), None);
    }
    // HTTP/2: a `host` field naming another host than `:authority` (RFC 9113 8.3.1), or several,
    // leaves it ambiguous which host is asked for (routes match on it): refused, as two `Host`
    // lines are over HTTP/1.1; so is a field value with whitespace around it (RFC 9113 8.2.1).
    if req.version() == http::Version::HTTP_2
        && (h2::ambiguous_host(&req) || h2::padded_field(&req))
    {
        return (respond::local(Local::BadRequest), None);
    }
    // Stage 3: routing.
    let Some(ri) = rt.routes.iter().position(|r| r.matcher.matches(&req)) else {
        return (respond::local(Local::NoRoute), None);
    };
    let route = &rt.routes[ri];
    unanswered.route.store(ri, Ordering::Relaxed);
    if req.extensions().get::<h2::ExtendedConnect>().is_some() && !route.tunnels(&req) {
        // An HTTP/2 WebSocket request on a route that does not tunnel: no plain answer fits it.
        return (respond::local(Local::BadRequest), Some(ri));
    }
    // The operating mode, per route (one atomic load; nothing more in `normal`).
    let mode = ctx.gateway.mode_in(rt);
    let action = route.mode_action(mode, &req);
    if action == ModeAction::Refuse {
        rt.stats[ri].refused_by_mode(mode);
        let retry_after = rt.config.mode_retry_after.get();
        let refused = respond::Failure::Mode { mode, retry_after };
        return (attempt::answer_unsent(route, refused), Some(ri));
    }
    if let Some(limit) = &route.client_limit {
        match limit.check(&ctx.peer_ip, req.headers(), req.uri()) {
            Ok(()) => {}
            Err(crate::admission::Refusal::Limited(retry_after)) => {
                rt.stats[ri].client_rate_limited();
                let limited = respond::Failure::RateLimited { retry_after };
                return (attempt::answer_unsent(route, limited), Some(ri));
            }
            Err(crate::admission::Refusal::AmbiguousKey) => {
                return (respond::local(Local::BadRequest), Some(ri));
            }
        }
    }
    if let Some(fault) = &route.fault {
        if let Some(resp) = crate::chaos::inject(fault, route, &rt.stats[ri], start).await {
            return (resp, Some(ri));
        }
    }
    // The admission queue: the slot is held until the response body is done.
    let slot = match &rt.admission {
        Some(a) => {
            let priority = a.priority(route.priority, req.headers());
            let deadline = start + route.timeout;
            match a.admit(priority, deadline).await {
                Some(slot) => Some(slot),
                None => {
                    let failure = if Instant::now() >= deadline {
                        route.policies.on_timeout("total");
                        respond::Failure::Timeout
                    } else {
                        respond::Failure::Shed
                    };
                    return (attempt::answer_unsent(route, failure), Some(ri));
                }
            }
        }
        None => None,
    };
    // Stage 4: headers (and the target, when the route rewrites it).
    let (mut parts, body) = req.into_parts();
    if route.rewrite.is_some() {
        match route.rewritten(&parts.uri) {
            Some(uri) => parts.uri = uri,
            // A dot-segment would climb out of the rewritten prefix upstream.
            None => return (respond::local(Local::BadRequest), Some(ri)),
        }
    }
    if parts.version == http::Version::HTTP_2 {
        let te_trailers = headers::keep_te_trailers(&parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers);
        if te_trailers {
            parts
                .headers
                .insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        headers::join_cookies(&mut parts.headers);
    } else {
        headers::strip_hop_by_hop(&mut parts.headers);
    }
    headers::add_forwarded(&mut parts.headers, &ctx.peer_ip, &ctx.proto);
    if let Some(extra) = &route.request_headers {
        extra.apply(&mut parts.headers);
    }
    if let Some(offer) = parts.extensions.get::<tunnel::UpgradeOffer>() {
        // Only a websocket route tunnels: elsewhere the request goes as a plain one, its
        // `Upgrade` and `Connection` removed above like every hop-by-hop header.
        if route.websocket && offer.is_websocket() {
            // `websocket` alone, whatever else the client listed: the one protocol tunnelled.
            parts.headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            parts
                .headers
                .insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        }
    }
    let link = body.link();
    let body = Limited::new(
        body,
        usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
    );
    // Stage 5 and 6.
    let no_retries = action == ModeAction::NoRetries;
    // A response body that stops moving is cut at `idle_timeout` (HTTP/1.1: the connection loop;
    // HTTP/2: the stream's watcher), so it may keep the slot until it ends.
    let tally = &unanswered.tally;
    let mut resp = attempt::forward(rt, route, parts, (body, link), start, no_retries, tally).await;
    if let Some(slot) = slot {
        resp.body_mut().hold_slot(slot);
    }
    (resp, Some(ri))
}

/// A request until it is answered (see [`handle`]): dropped before that, it is counted in its
/// route's metrics and logged as a 499 `client_closed`, with the attempts it sent.
struct Abandoned<'a> {
    rt: &'a Runtime,
    start: Instant,
    /// The route that took it ([`NO_ROUTE`] until one did).
    route: AtomicUsize,
    /// The attempts it sent.
    tally: attempt::Tally,
    /// Its method and target, for the access log (only when the log is on).
    request: Option<(http::Method, http::Uri)>,
    answered: bool,
}

/// [`Abandoned::route`] before a route took the request.
const NO_ROUTE: usize = usize::MAX;

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let elapsed = self.start.elapsed();
        let route = Some(self.route.load(Ordering::Relaxed)).filter(|&r| r != NO_ROUTE);
        if let Some(stats) = route.and_then(|r| self.rt.stats.get(r)) {
            stats.record(STATUS_CLIENT_CLOSED, elapsed);
        }
        if let Some((method, uri)) = self.request.take() {
            let line = AccessLine {
                status: STATUS_CLIENT_CLOSED,
                reason: Some("client_closed"),
                attempts: self.tally.total.load(Ordering::Relaxed),
            };
            let upstream = self.tally.upstream();
            access_line(
                self.rt,
                route,
                upstream,
                method.as_str(),
                uri.path(),
                line,
                elapsed,
            );
        }
    }
}

/// The access log's status for a request dropped before its answer (nginx's 499).
const STATUS_CLIENT_CLOSED: u16 = 499;

/// An answer the gateway gives before a request could be parsed or routed (a malformed or too
/// large HTTP/1.1 head, a refused HTTP/2 CONNECT): its access-log line, when the log is on.
pub(crate) fn access_log_refused(
    gateway: &Gateway,
    method: Option<&http::Method>,
    path: Option<&str>,
    resp: &Response<RespBody>,
) {
    let rt = gateway.runtime();
    if rt.access_log {
        let method = method.map_or("-", http::Method::as_str);
        let line = AccessLine::of(resp, None);
        let path = path.filter(|p| !p.is_empty()).unwrap_or("-");
        access_line(&rt, None, None, method, path, line, Duration::ZERO);
    }
}

/// What an access-log line says of the answer.
struct AccessLine<'a> {
    status: u16,
    reason: Option<&'a str>,
    attempts: u32,
}

impl<'a> AccessLine<'a> {
    fn of(resp: &'a Response<RespBody>, route: Option<usize>) -> Self {
        let h = resp.headers();
        let reason = h
            .get(&respond::X_BULWARK_REASON)
            .and_then(|v| v.to_str().ok());
        // No `x-bulwark-attempts` means one attempt for a routed success, none for anything the
        // gateway answered itself.
        let attempts = h
            .get(&respond::X_BULWARK_ATTEMPTS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(u32::from(route.is_some() && reason.is_none()));
        AccessLine {
            status: resp.status().as_u16(),
            reason,
            attempts,
        }
    }
}

/// One access-log line (target `bulwark::access`): method, path (no query string: it may carry
/// secrets), status, duration, route, upstream (the one of the latest attempt, a failover's when
/// the request failed over; else the route's primary), attempts, and what acted
/// (`x-bulwark-reason`).
fn access_line(
    rt: &Runtime,
    route: Option<usize>,
    tried: Option<usize>,
    method: &str,
    path: &str,
    line: AccessLine<'_>,
    elapsed: Duration,
) {
    let (route, primary) = route
        .and_then(|i| rt.stats.get(i))
        .map_or(("-", "-"), |s| (s.route(), s.upstream()));
    let upstream = tried
        .and_then(|u| rt.upstreams.get(u))
        .map_or(primary, |u| &*u.name);
    tracing::info!(
        target: "bulwark::access",
        method = %method,
        path,
        status = line.status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        route,
        upstream,
        attempts = line.attempts,
        reason = line.reason.unwrap_or("-"),
    );
}

/// Whether the request target is a path (origin or absolute form), or `*` with `OPTIONS`.
fn valid_target<B>(req: &Request<B>) -> bool {
    match req.uri().path_and_query().map(|p| p.as_str().as_bytes()) {
        None | Some([b'/', ..]) => true,
        Some(b"*") => req.method() == http::Method::OPTIONS,
        Some(_) => false,
    }
}

/// Listener settings taken from the config at bind time.
#[derive(Debug, Clone)]
struct ListenSettings {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    lingering_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
    max_concurrent_streams: u32,
    drain_timeout: Duration,
}

/// A bound gateway listener, ready to run.
pub struct Server {
    listener: TcpListener,
    gateway: Arc<Gateway>,
    settings: ListenSettings,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Error starting the server.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

impl Server {
    /// Builds the runtime and binds the listener of `config` (port 0 picks a free port), with a
    /// metrics registry of its own.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        Self::bind_with(config, Arc::new(Telemetry::new())).await
    }

    /// Builds the runtime, reporting to `telemetry`, and binds the listener of `config`.
    pub async fn bind_with(config: &Config, telemetry: Arc<Telemetry>) -> Result<Self, StartError> {
        let runtime = Runtime::build(config, &telemetry, None)?;
        let tls = runtime.listener_tls.as_ref().map(|t| t.acceptor.clone());
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        Ok(Server {
            listener,
            gateway: Arc::new(Gateway::new(runtime)),
            settings: ListenSettings {
                header_read_timeout: config.limits.header_read_timeout.get(),
                idle_timeout: config.limits.idle_timeout.get(),
                lingering_timeout: config.limits.lingering_timeout.get(),
                max_header_bytes: config.limits.max_header_bytes.as_usize(),
                max_connections: config.limits.max_connections,
                max_concurrent_streams: config.limits.max_concurrent_streams,
                drain_timeout: config.drain_timeout.get(),
            },
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The shared gateway state (for reload and the admin API).
    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests finish for up
    /// to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            gateway,
            settings,
            tls,
        } = self;
        // Each stream's task is cut when its response body stays still for `idle_timeout`.
        let mut h2 = http2::Builder::new(h2::StreamExec {
            idle: settings.idle_timeout,
        });
        h2.timer(TokioTimer::new())
            // Flow control toward clients: each stream may hold `H2_STREAM_WINDOW` of request
            // body the gateway has not read yet, the connection many times that, so that one
            // stream whose upstream does not read yet (queued, connecting, slow) does not stall
            // the other streams' uploads, as hyper's default (1 MiB for both) let it.
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            // Response body each stream holds while the client does not read: a client that
            // grants a huge window and reads nothing pins this much per stream, not hyper's
            // default 400 KiB (100 streams: 40 MiB per connection).
            .max_send_buf_size(H2_SEND_BUFFER)
            .max_header_list_size(h2::header_list_ceiling(settings.max_header_bytes))
            .max_concurrent_streams(settings.max_concurrent_streams)
            // WebSocket over HTTP/2 (RFC 8441), on routes with `websocket: true`.
            .enable_connect_protocol();
        let h2 = Arc::new(h2);
        let limits = h1::Limits {
            head_timeout: settings.header_read_timeout,
            idle_timeout: settings.idle_timeout,
            linger: settings.lingering_timeout,
            // The exact limit is checked on the parsed head; this bounds what is read before (as
            // hyper's buffer limit did before).
            max_head: settings.max_header_bytes.max(8192).saturating_add(1024),
        };
        let proto = HeaderValue::from_static(if tls.is_some() { "https" } else { "http" });
        // (The drain takes every permit at once, and `acquire_many` counts in `u32`.)
        let max = settings
            .max_connections
            .min(Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        let slots = Arc::new(Semaphore::new(max));
        let (stop_tx, stop_rx) = watch::channel(false);
        let reaper = tokio::spawn(reap_idle(gateway.clone()));
        gateway.set_phase(Phase::Serving);

        tokio::pin!(shutdown);
        let mut accept_errors = AcceptErrors::new("proxy");
        // The connections' tasks: those still running at the drain timeout (a tunnel, a request
        // past it) are aborted when this set is dropped, at the end of `run`.
        let mut conns = tokio::task::JoinSet::new();
        // One registry for the process: reloads keep it.
        let telemetry = gateway.runtime().telemetry.clone();
        loop {
            // Stage 1: a connection slot, then accept (beyond max_connections, clients wait in the backlog).
            // Ended connections are reaped as they end (a task's memory is held until then).
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Typically out of file descriptors (EMFILE): retrying at once would spin
                        // at full CPU, so pause to let connections close.
                        accept_errors.warn(&e);
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                        }
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let open = telemetry.connection_opened();
            let ctx = Arc::new(ConnCtx {
                gateway: gateway.clone(),
                peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                    .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
                proto: proto.clone(),
                inflight: AtomicUsize::new(0),
                last_active_ms: AtomicU64::new(0),
                opened: Instant::now(),
            });
            let h2 = h2.clone();
            let stop = stop_rx.clone();
            // A TLS listener serves the certificate of the config in force (a reload may have
            // renewed it); one whose config dropped `tls` keeps its own until a restart.
            let tls = tls.as_ref().map(|bound| {
                gateway
                    .runtime()
                    .listener_tls
                    .as_ref()
                    .map_or_else(|| bound.clone(), |t| t.acceptor.clone())
            });
            let handshake_timeout = settings.header_read_timeout;
            let idle = settings.idle_timeout;
            // One task per client connection; the upstream HTTP/1 connections its requests use
            // are driven by those requests (see `upstream::pool`), not by tasks of their own.
            let task = async move {
                let (_permit, _open) = (permit, open);
                match tls {
                    None => serve_conn(stream, false, ctx, &h2, stop, limits, idle).await,
                    // Boxed: a connection's task is as large as its largest state, and the TLS one
                    // (handshake, then a TLS stream) is over twice the plaintext one (21.7 KB
                    // against 9.3 KB per connection): a TLS connection pays one allocation.
                    Some(acceptor) => {
                        Box::pin(async move {
                            // A handshake still going when the drain starts is dropped: nothing
                            // of a request has come yet (as an idle connection is closed).
                            let mut stopped = stop.clone();
                            let handshake =
                                tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                            let shook = tokio::select! {
                                r = handshake => r,
                                _ = stopped.wait_for(|&s| s) => {
                                    tracing::debug!(%peer, "TLS handshake dropped: draining");
                                    return;
                                }
                            };
                            match shook {
                                Ok(Ok(s)) => {
                                    let alpn_h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                                    serve_conn(s, alpn_h2, ctx, &h2, stop, limits, idle).await
                                }
                                _ => tracing::debug!(%peer, "TLS handshake failed or timed out"),
                            }
                        })
                        .await
                    }
                }
            };
            conns.spawn(task);
        }
        gateway.set_phase(Phase::Draining);
        drop(listener);
        reaper.abort();
        let _ = stop_tx.send(true);
        // Drain: every connection holds a slot until it closes.
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        if tokio::time::timeout(settings.drain_timeout, slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("drain timeout reached; dropping remaining connections");
        }
    }
}

/// How long an accept loop (the proxy's, the admin listener's) pauses after a failed `accept`
/// (e.g. out of file descriptors).
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How often a run of accept failures is logged.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(5);

/// Rate-limits the accept-failure warning: one line per [`ACCEPT_WARN_EVERY`], counting the others.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    /// Which listener: `proxy` or `admin`.
    listener: &'static str,
    last_warn: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    pub(crate) fn new(listener: &'static str) -> Self {
        AcceptErrors {
            listener,
            last_warn: None,
            suppressed: 0,
        }
    }

    /// Logs `e` unless a warning went out less than [`ACCEPT_WARN_EVERY`] ago; returns whether it did.
    pub(crate) fn warn(&mut self, e: &std::io::Error) -> bool {
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < ACCEPT_WARN_EVERY)
        {
            self.suppressed += 1;
            return false;
        }
        tracing::warn!(
            listener = self.listener,
            error = %e,
            suppressed = self.suppressed,
            "accept failed"
        );
        self.last_warn = Some(now);
        self.suppressed = 0;
        true
    }
}

/// Closes idle upstream connections past `pool.idle_timeout`: every 5 s, or every quarter of the
/// shortest idle timeout configured when that is shorter (at least every 50 ms), so that a
/// connection is closed within a quarter of its timeout after it expires. A reload recomputes the
/// interval at once.
async fn reap_idle(gateway: Arc<Gateway>) {
    const MAX_GAP: Duration = Duration::from_secs(5);
    loop {
        let installed = gateway.installed.notified();
        let runtime = gateway.runtime();
        let mut gap = MAX_GAP;
        for up in &runtime.upstreams {
            up.reap_idle();
            for ep in &up.endpoints {
                gap = gap.min(ep.pool.idle_timeout() / 4);
            }
        }
        drop(runtime);
        tokio::select! {
            _ = tokio::time::sleep(gap.max(Duration::from_millis(50))) => {}
            _ = installed => {}
        }
    }
}

/// Serves one client connection until it ends: HTTP/2 (hyper) when TLS negotiated `h2` or the
/// connection starts with the HTTP/2 preface, HTTP/1.1 (our own loop, [`h1::serve`]) otherwise.
async fn serve_conn<I>(
    io: I,
    alpn_h2: bool,
    ctx: Arc<ConnCtx>,
    h2: &http2::Builder<h2::StreamExec>,
    stop: watch::Receiver<bool>,
    limits: h1::Limits,
    idle: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, read) = if alpn_h2 {
        (io, Bytes::new())
    } else {
        match h1::serve(io, ctx.clone(), stop.clone(), limits).await {
            Some(h2_conn) => h2_conn,
            None => return,
        }
    };
    let io = h2::HeaderWatch::new(Rewind { read, io }, limits.head_timeout);
    serve_h2(io, ctx, h2, stop, idle).await;
}

/// Serves one HTTP/2 connection until it ends, closing it gracefully when it stays idle (no request
/// in flight) for `idle`, or on shutdown.
async fn serve_h2<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    builder: &http2::Builder<h2::StreamExec>,
    mut stop: watch::Receiver<bool>,
    idle: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = ctx.clone();
    let resets = Arc::new(h2::Resets::default());
    let svc_resets = resets.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        let early = svc_resets.opened();
        async move {
            // Polled inside the stream's task: its progress is there to report to.
            let progress = h2::current();
            let mut req = req;
            let head = req.method() == http::Method::HEAD;
            let connect = match h2::take_connect(&mut req) {
                h2::Connect::No => None,
                h2::Connect::WebSocket(on) => Some(on),
                h2::Connect::Refused => {
                    early.answered();
                    let resp = respond::local(Local::BadRequest);
                    access_log_refused(
                        &ctx.gateway,
                        Some(req.method()),
                        Some(req.uri().path()),
                        &resp,
                    );
                    return Ok(resp.map(|b| h2::WatchedBody::new(b, progress, None)));
                }
            };
            let resp = if http_body::Body::is_end_stream(req.body()) {
                handle(&ctx, req.map(|_| ClientBody::Empty)).await
            } else {
                let conn = ConnActivity(ctx.clone());
                let req = req.map(|inner| ClientBody::h2(inner, idle, progress.clone(), conn));
                let resp = handle(&ctx, req).await;
                progress.respond();
                resp
            };
            let resp = match connect {
                None => h2::without_content(resp, head),
                Some(on) => h2::answer_connect(resp, on, idle, || {
                    let tunnel = ctx.gateway.runtime().telemetry.tunnel_opened();
                    (tunnel, Streaming::new(ctx.clone()))
                }),
            };
            let streaming =
                (!http_body::Body::is_end_stream(resp.body())).then(|| Streaming::new(ctx.clone()));
            early.answered();
            Ok::<_, Infallible>(resp.map(|b| h2::WatchedBody::new(b, progress, streaming)))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    // Once closing, the connection's GOAWAY and PING wait for the client's answer; a client gone
    // without a FIN never gives one. So a connection closing for being idle (nothing in flight,
    // nothing moved for `idle_timeout`) is dropped after `H2_CLOSE_GRACE`, whatever the client
    // does; one closing for the drain, when the drain times out (or after `H2_CLOSE_GRACE` when
    // its client never opened a stream: nothing of it can be in flight, and hyper sends no GOAWAY
    // before the client's preface, so a client that connected and stayed quiet would otherwise
    // hold the shutdown for the whole drain).
    let drain_wait = |resets: &h2::Resets| {
        if resets.any() {
            far_future()
        } else {
            Instant::now() + H2_CLOSE_GRACE
        }
    };
    let mut closing = *stop.borrow_and_update();
    if closing {
        conn.as_mut().graceful_shutdown();
        idle_timer.as_mut().reset(drain_wait(&resets));
    }
    loop {
        // `biased`: the connection is polled first on every wake-up (nearly all are for it), with no
        // per-poll random branch order.
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            // The drain: the connection closes when its client has taken every response (a
            // response h2 still holds for a slow reader's flow-control window is not in flight,
            // yet not delivered), or when the drain times out.
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
                idle_timer.as_mut().reset(drain_wait(&resets));
            }
            // Rapid reset: half of the streams reset by the client right after it opened them.
            _ = resets.trip.notified(), if !closing => {
                tracing::debug!("HTTP/2 client resets most streams right after opening them: GOAWAY");
                closing = true;
                conn.as_mut().graceful_shutdown();
                idle_timer.as_mut().reset(Instant::now() + H2_CLOSE_GRACE);
            }
            _ = &mut idle_timer => {
                let busy = ctx.inflight.load(Ordering::Relaxed) > 0;
                if closing {
                    if !busy {
                        tracing::debug!("closing HTTP/2 connection not closed by its client");
                        return;
                    }
                    idle_timer.as_mut().reset(Instant::now() + H2_CLOSE_GRACE);
                    continue;
                }
                let deadline = ctx.idle_deadline(idle);
                if !busy && Instant::now() >= deadline {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    idle_timer.as_mut().reset(Instant::now() + H2_CLOSE_GRACE);
                } else {
                    // Busy (a long stream, say): look again an idle period on; the end of the
                    // last request stamps a later deadline, which is then kept exactly.
                    let next = if busy { idle } else { Duration::from_millis(10) };
                    idle_timer.as_mut().reset(deadline.max(Instant::now() + next));
                }
            }
        }
    }
}

/// Request body an HTTP/2 client may send on one stream before the gateway reads it.
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// Response body the gateway buffers per HTTP/2 stream toward a client that does not read (the
/// upstream is read no further meanwhile).
const H2_SEND_BUFFER: usize = 64 * 1024;

/// Request body an HTTP/2 client may send on all of a connection's streams before the gateway
/// reads it: 64 streams' worth (the memory one connection can hold in unread uploads).
const H2_CONNECTION_WINDOW: u32 = 64 * H2_STREAM_WINDOW;

/// How long an HTTP/2 connection closing for being idle, with no stream left, waits for its
/// client to answer the GOAWAY's PING (and close) before it is dropped.
const H2_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A timer deadline that never comes in practice.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// A connection's I/O with bytes already read from it put back in front (the HTTP/1 loop read the
/// start of an HTTP/2 connection before it knew; a tunnel's two sides may have read past their
/// heads).
pub(crate) struct Rewind<I> {
    pub(crate) read: Bytes,
    pub(crate) io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

write_through!(Rewind);

/// The listener's TLS acceptor, with the file contents it was built from: a reload whose files
/// are unchanged keeps it (and its session resumption state).
#[derive(Clone)]
struct ListenerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    files: Arc<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ListenerTls")
    }
}

impl ListenerTls {
    fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        previous: Option<&ListenerTls>,
    ) -> Result<Self, String> {
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("tls.{key}: cannot read `{}`: {e}", p.display()))
        };
        let files = (read("cert", cert)?, read("key", key)?);
        if let Some(p) = previous.filter(|p| *p.files == files) {
            return Ok(p.clone());
        }
        let cfg = server_tls(cert, key).map_err(|(key, e)| format!("tls.{key}: {e}"))?;
        Ok(ListenerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            files: Arc::new(files),
        })
    }
}

/// Which of `cert` and `key` a refusal of the pair by rustls is about: a certificate it cannot
/// parse is the `cert` file's fault, anything else (a key that does not fit) the `key` file's.
pub(crate) fn cert_or_key(e: rustls::Error) -> (&'static str, String) {
    match e {
        rustls::Error::InvalidCertificate(e) => ("cert", format!("not a valid certificate: {e:?}")),
        e => ("key", format!("does not fit the certificate: {e}")),
    }
}

/// The listener's TLS setup from the `tls` files; an error names the key (`cert`, `key`) at fault.
pub(crate) fn server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ServerConfig, (&'static str, String)> {
    let certs = crate::pem::certs(cert).map_err(|e| ("cert", e))?;
    let key = crate::pem::private_key(key).map_err(|e| ("key", e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(cert_or_key)?;
    // `http/1.0` too (as nginx lists it): rustls refuses the handshake of a client whose offer
    // has none of these (`curl --http1.0` offers only `http/1.0`), and it goes to the HTTP/1 path.
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod accept_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn accept_failures_are_logged_once_per_interval() {
        let mut errors = AcceptErrors::new("proxy");
        let e = std::io::Error::from_raw_os_error(24);
        assert!(errors.warn(&e));
        // One failure per pause, as the accept loop sees them: 99 more within the interval.
        for _ in 0..99 {
            tokio::time::advance(ACCEPT_ERROR_PAUSE).await;
            assert!(!errors.warn(&e));
        }
        assert_eq!(errors.suppressed, 99);
        tokio::time::advance(ACCEPT_ERROR_PAUSE).await;
        assert!(errors.warn(&e));
        assert_eq!(errors.suppressed, 0);
    }
}
