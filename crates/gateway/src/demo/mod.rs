//! `bulwark demo`: the README's first command. With no setup at all it shows what the gateway is for.
//!
//! Why a demo built into the binary: the claim "clients see far fewer errors than the providers
//! return" is easiest to believe when it happens on your own machine, live, in thirty seconds. So the
//! demo starts three simulated providers on loopback ([`providers`]: `healthy`, `flaky` with 30% 503s,
//! `slow`), writes a gateway config in front of them ([`config`]), starts the real gateway on it, and
//! drives a bounded load through it ([`load`]) while a progress display ([`display`]) shows requests,
//! errors seen by clients against errors returned by providers, breaker states (read from the admin
//! API, [`admin`]) and failovers.
//!
//! The run has three [`Phase`]s, so the breaker has something to do: normal (`flaky` fails 30% of calls,
//! retries hide that), `flaky` fully down (its breaker opens and `/api/` traffic fails over to
//! `healthy`), and `flaky` back up (the breaker half-opens after its open duration and closes).
//!
//! # The seam to the gateway
//! The demo does not know how the gateway is built; it only needs to start one on a config file and
//! stop it. That is the [`DemoGateway`] trait, which the CLI implements on top of the real gateway and
//! passes to [`run`]. Anything that serves the config (the library user's own process, a child
//! process) fits the same trait.

mod in_process;
pub use in_process::InProcessGateway;
pub mod admin;
pub mod client;
pub mod config;
pub mod display;
pub mod load;
pub mod providers;

use std::fmt;
use std::future::Future;
use std::io::{self, IsTerminal};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

pub use config::config_yaml;
pub use providers::{Provider, ProviderStats, Providers};

use admin::{AdminPoller, BreakerStates};
use display::{Screen, Snapshot, Window};
use load::{LoadConfig, LoadSnapshot, LoadStats};

/// Default length of the load: long enough for the breaker to open, wait out its 5 s open duration
/// and recover, short enough to watch.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(30);
/// Default seed: any fixed value, so two runs behave alike.
pub const DEFAULT_SEED: u64 = 0x5EED;
/// How long the gateway's listener may take to accept connections after [`DemoGateway::start`].
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the admin API may take to answer once the listener does. Not fatal: without it the
/// demo runs and shows breaker states as `?`.
pub const ADMIN_GRACE: Duration = Duration::from_secs(2);
/// Redraw period on a terminal (about 4 frames a second).
pub const REDRAW_INTERVAL: Duration = Duration::from_millis(250);
/// How often the admin API is polled for breaker states.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The seam between the demo and the gateway: start a gateway on a config file, stop it.
///
/// [`run`] calls [`start`](DemoGateway::start) once with the path of the YAML file it wrote (see
/// [`config_yaml`]), then waits until the listener accepts connections (up to [`READY_TIMEOUT`]) and
/// the admin API answers (up to [`ADMIN_GRACE`] more; optional); at the end it calls [`shutdown`](DemoGateway::shutdown) once, also after an
/// interruption (Ctrl-C). `start` should load and validate the config, bind, spawn the serving task(s)
/// on the current tokio runtime and return; an invalid config or a bind failure is an `Err` with a
/// message for the user. `shutdown` stops serving and resolves once the gateway is stopped.
///
/// The gateway must not stop on SIGINT by itself during the demo (the demo handles Ctrl-C and then
/// calls `shutdown`), and its logs should stay at `warn` or below, because they share the terminal with
/// the in-place display.
///
/// ```
/// use std::path::PathBuf;
/// use bulwark_gateway::demo::DemoGateway;
/// use futures_util::future::BoxFuture;
///
/// /// The CLI's implementation, sketched: `serve` is whatever runs the gateway until `stop` fires.
/// struct InProcess {
///     stop: Option<tokio::sync::oneshot::Sender<()>>,
///     task: Option<tokio::task::JoinHandle<()>>,
/// }
///
/// impl DemoGateway for InProcess {
///     fn start(&mut self, config: PathBuf) -> BoxFuture<'_, Result<(), String>> {
///         Box::pin(async move {
///             let _ = config; // load + validate + bind here; `Err(format!(...))` on failure
///             let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
///             self.stop = Some(stop);
///             self.task = Some(tokio::spawn(async move {
///                 let _ = stopped.await; // serve until told to stop
///             }));
///             Ok(())
///         })
///     }
///
///     fn shutdown(&mut self) -> BoxFuture<'_, ()> {
///         Box::pin(async move {
///             if let Some(stop) = self.stop.take() {
///                 let _ = stop.send(());
///             }
///             if let Some(task) = self.task.take() {
///                 let _ = task.await;
///             }
///         })
///     }
/// }
/// ```
pub trait DemoGateway: Send {
    /// Start a gateway serving the config at `config` (a YAML file). Resolve once it is serving (or
    /// about to: [`run`] waits for it to answer), or fail with a message for the user.
    fn start(&mut self, config: PathBuf) -> BoxFuture<'_, Result<(), String>>;

    /// Stop the gateway started by [`start`](DemoGateway::start); resolve once it has stopped.
    fn shutdown(&mut self) -> BoxFuture<'_, ()>;
}

/// What `bulwark demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Length of the load ([`DEFAULT_DURATION`]).
    pub duration: Duration,
    /// Seeds the providers' failures and latencies and the load's choice of routes.
    pub seed: u64,
    /// Number of concurrent clients ([`load::DEFAULT_CONCURRENCY`]).
    pub concurrency: usize,
    /// Gateway listener; `None` picks a free loopback port.
    pub listen: Option<SocketAddr>,
    /// Admin listener; `None` picks a free loopback port.
    pub admin_listen: Option<SocketAddr>,
}

impl Default for DemoOptions {
    fn default() -> DemoOptions {
        DemoOptions {
            duration: DEFAULT_DURATION,
            seed: DEFAULT_SEED,
            concurrency: load::DEFAULT_CONCURRENCY,
            listen: None,
            admin_listen: None,
        }
    }
}

/// A stage of the demo's run, chosen by elapsed time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `flaky` fails 30% of calls; retries hide it from clients.
    Normal,
    /// `flaky` answers every call with 503; its breaker opens and `/api/` fails over to `healthy`.
    FlakyDown,
    /// `flaky` is back at 30%; its breaker half-opens and closes.
    Recovered,
}

impl Phase {
    /// Fraction of the run after which `flaky` goes down.
    pub const DOWN_AT: f64 = 0.25;
    /// Fraction of the run after which `flaky` comes back.
    pub const UP_AT: f64 = 0.60;

    /// The phase at `elapsed` into a run of `total`.
    pub fn at(elapsed: Duration, total: Duration) -> Phase {
        let frac = if total.is_zero() {
            1.0
        } else {
            elapsed.as_secs_f64() / total.as_secs_f64()
        };
        if frac < Phase::DOWN_AT {
            Phase::Normal
        } else if frac < Phase::UP_AT {
            Phase::FlakyDown
        } else {
            Phase::Recovered
        }
    }

    /// 1, 2 or 3.
    pub fn number(self) -> u8 {
        match self {
            Phase::Normal => 1,
            Phase::FlakyDown => 2,
            Phase::Recovered => 3,
        }
    }

    /// A short name: `normal`, `flaky down`, `recovered`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Normal => "normal",
            Phase::FlakyDown => "flaky down",
            Phase::Recovered => "recovered",
        }
    }

    /// One line for the display.
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Normal => "normal: flaky fails 30% of calls, retries hide it",
            Phase::FlakyDown => "flaky is DOWN: every call fails, breaker should open",
            Phase::Recovered => "flaky is back (30% failures): breaker half-opens, closes",
        }
    }
}

/// What happened during one phase, client side and provider side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseTotals {
    /// Which phase.
    pub phase: Phase,
    /// Requests the clients finished in it.
    pub requests: u64,
    /// Of those, errors the clients saw.
    pub client_errors: u64,
    /// `/api/` requests answered by `healthy`.
    pub failovers: u64,
    /// Calls the providers answered in it.
    pub provider_calls: u64,
    /// Errors the providers returned in it.
    pub provider_errors: u64,
}

impl PhaseTotals {
    /// The difference between counters read when `phase` began and when it ended.
    pub fn between(
        phase: Phase,
        (load_before, providers_before): (&LoadSnapshot, &[ProviderStats]),
        (load_after, providers_after): (&LoadSnapshot, &[ProviderStats]),
    ) -> PhaseTotals {
        let sum = |stats: &[ProviderStats]| {
            stats
                .iter()
                .fold((0u64, 0u64), |(r, e), p| (r + p.requests, e + p.errors))
        };
        let (calls_before, errors_before) = sum(providers_before);
        let (calls_after, errors_after) = sum(providers_after);
        PhaseTotals {
            phase,
            requests: load_after.requests.saturating_sub(load_before.requests),
            client_errors: load_after
                .client_errors()
                .saturating_sub(load_before.client_errors()),
            failovers: load_after.failovers.saturating_sub(load_before.failovers),
            provider_calls: calls_after.saturating_sub(calls_before),
            provider_errors: errors_after.saturating_sub(errors_before),
        }
    }
}

/// How often the gateway moved one breaker from one state to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionCount {
    /// Upstream name.
    pub upstream: String,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// How many times.
    pub count: u64,
}

/// Totals of a finished demo.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    /// How long the load ran.
    pub elapsed: Duration,
    /// Whether a signal ended it early (Ctrl-C, SIGTERM, a closed terminal's SIGHUP).
    pub interrupted: bool,
    /// The signal that ended it early, if one did (its number: 2, 15 or 1).
    pub signal: Option<i32>,
    /// Everything the clients saw.
    pub load: LoadSnapshot,
    /// Median latency seen by clients.
    pub p50: Option<Duration>,
    /// 99th percentile latency seen by clients.
    pub p99: Option<Duration>,
    /// What each provider served and how many errors it returned.
    pub providers: Vec<ProviderStats>,
    /// The same numbers per phase, for the phases the run reached.
    pub phases: Vec<PhaseTotals>,
    /// Breaker transitions: from the gateway's `/metrics` when it has them, else as observed by
    /// polling the admin API (which can miss a short `half_open`).
    pub breaker_transitions: Vec<TransitionCount>,
    /// Whether `breaker_transitions` came from `/metrics`.
    pub transitions_from_metrics: bool,
    /// The gateway's listener.
    pub gateway_url: String,
    /// The admin API.
    pub admin_url: String,
}

impl DemoSummary {
    /// Errors clients saw (non-2xx or no response).
    pub fn client_errors(&self) -> u64 {
        self.load.client_errors()
    }

    /// Calls the providers answered.
    pub fn provider_requests(&self) -> u64 {
        self.providers.iter().map(|p| p.requests).sum()
    }

    /// Errors the providers returned.
    pub fn provider_errors(&self) -> u64 {
        self.providers.iter().map(|p| p.errors).sum()
    }
}

/// Why the demo could not run.
#[derive(Debug)]
pub enum DemoError {
    /// The simulated providers could not bind.
    Providers(io::Error),
    /// No free port, or the config file could not be written.
    Setup(io::Error),
    /// [`DemoGateway::start`] failed.
    Gateway(String),
    /// The gateway's listener did not accept connections within [`READY_TIMEOUT`].
    NotReady {
        /// Gateway listener.
        listen: SocketAddr,
    },
    /// A signal (its number) before the load started: Ctrl-C, SIGTERM, SIGHUP (what was set up
    /// is taken down again).
    Interrupted(i32),
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DemoError::Providers(err) => {
                write!(f, "could not start the simulated providers: {err}")
            }
            DemoError::Setup(err) => write!(f, "could not prepare the demo: {err}"),
            DemoError::Gateway(msg) => write!(f, "could not start the gateway: {msg}"),
            DemoError::NotReady { listen } => write!(
                f,
                "the gateway did not accept connections on {listen} within {}s",
                READY_TIMEOUT.as_secs()
            ),
            DemoError::Interrupted(_) => f.write_str("interrupted before the load started"),
        }
    }
}

impl std::error::Error for DemoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DemoError::Providers(err) | DemoError::Setup(err) => Some(err),
            DemoError::Gateway(_) | DemoError::NotReady { .. } | DemoError::Interrupted(_) => None,
        }
    }
}

/// Run the demo: providers, config, `gateway`, load with the live display on stdout, final summary.
///
/// Needs a tokio runtime with timers and IO (the CLI's). Returns the totals once the load has run for
/// `opts.duration` (or the user pressed Ctrl-C) and the gateway has been shut down.
pub async fn run<G: DemoGateway>(
    opts: DemoOptions,
    mut gateway: G,
) -> Result<DemoSummary, DemoError> {
    // Ctrl-C, SIGTERM (`timeout`, `docker stop`, a cancelled CI job) and SIGHUP (the terminal
    // closed) are ours from the start: during the set-up they take down what was set up (the
    // temporary directory included) instead of killing the process; during the load they end the
    // load early, and the gateway is stopped as after a full run. (Installed now.)
    let mut ctrl_c = Box::pin(crate::cli::first_signal(true));
    let providers = Providers::start(opts.seed)
        .await
        .map_err(DemoError::Providers)?;
    let (listen, admin) = listen_addrs(&opts).map_err(DemoError::Setup)?;
    let state_dir = StateDir::create().map_err(DemoError::Setup)?;
    let config_path = state_dir.path().join("bulwark-demo.yaml");
    std::fs::write(
        &config_path,
        config_yaml(&providers, listen, admin, state_dir.path()),
    )
    .map_err(|e| DemoError::Setup(in_context(e, "cannot write", &config_path)))?;

    // Not raced with Ctrl-C: a start cut short could leave some of the gateway running (its store
    // writing into the directory being removed). A Ctrl-C meanwhile is seen just below.
    gateway
        .start(config_path.clone())
        .await
        .map_err(DemoError::Gateway)?;
    let ready = tokio::select! {
        r = wait_ready(listen, admin) => r.ok_or(DemoError::NotReady { listen }),
        sig = &mut ctrl_c => Err(DemoError::Interrupted(sig)),
    };
    let admin_up = match ready {
        Ok(up) => up,
        Err(e) => {
            gateway.shutdown().await;
            return Err(e);
        }
    };

    let gateway_url = format!("http://{listen}");
    let admin_url = format!("http://{admin}");
    let mut screen = Screen::stdout();
    screen.print(&display::render_header(
        &gateway_url,
        &admin_url,
        &config_path,
        opts.duration,
    ));
    if !admin_up {
        screen.print(&format!(
            "  (the admin API at {admin_url} does not answer: breaker states show as ?)\n"
        ));
    }

    let summary = drive(&opts, &providers, listen, admin, &mut screen, ctrl_c).await;
    let (breaker_transitions, from_metrics) = match metrics_transitions(admin).await {
        Some(t) => (t, true),
        None => (summary.observed, false),
    };
    gateway.shutdown().await;

    let summary = DemoSummary {
        elapsed: summary.elapsed,
        interrupted: summary.signal.is_some(),
        signal: summary.signal,
        load: summary.load,
        p50: summary.p50,
        p99: summary.p99,
        providers: providers.stats(),
        phases: summary.phases,
        breaker_transitions,
        transitions_from_metrics: from_metrics,
        gateway_url,
        admin_url,
    };
    screen.print(&display::render_summary(&summary, screen.color()));
    drop(state_dir);
    Ok(summary)
}

/// What [`drive`] measured.
struct Driven {
    elapsed: Duration,
    /// The signal that ended the load early.
    signal: Option<i32>,
    load: LoadSnapshot,
    p50: Option<Duration>,
    p99: Option<Duration>,
    phases: Vec<PhaseTotals>,
    observed: Vec<TransitionCount>,
}

/// Run the load, switch phases, poll breakers, redraw; until the load ends or Ctrl-C.
async fn drive(
    opts: &DemoOptions,
    providers: &Providers,
    listen: SocketAddr,
    admin: SocketAddr,
    screen: &mut Screen,
    mut ctrl_c: Pin<Box<impl Future<Output = i32>>>,
) -> Driven {
    let stats = Arc::new(LoadStats::new());
    let load_config = LoadConfig {
        target: listen,
        duration: opts.duration,
        concurrency: opts.concurrency,
        slow_share: load::DEFAULT_SLOW_SHARE,
        seed: opts.seed,
    };
    let started = Instant::now();
    let mut load_task = tokio::spawn(load::run(load_config, Arc::clone(&stats)));

    let (breakers_tx, breakers_rx) = tokio::sync::watch::channel::<Option<BreakerStates>>(None);
    let observed = Arc::new(Mutex::new(Vec::<TransitionCount>::new()));
    let poll_task = tokio::spawn(poll_breakers(admin, breakers_tx, Arc::clone(&observed)));

    let mut all_latencies: Vec<u32> = Vec::new();
    let mut window = Window::default();
    let mut window_start = (started, LoadSnapshot::default());
    let mut phase = Phase::Normal;
    // Counters read as each phase began.
    let mut phase_start = (LoadSnapshot::default(), providers.stats());
    let mut phases = Vec::new();
    let mut tick = tokio::time::interval(if screen.is_tty() {
        REDRAW_INTERVAL
    } else {
        Duration::from_secs(1)
    });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    let (load, signal) = loop {
        tokio::select! {
            finished = &mut load_task => {
                // The load task never panics; if it did, the counters it left are still right.
                let load = finished.unwrap_or_else(|_| stats.snapshot());
                break (load, None);
            }
            sig = &mut ctrl_c => {
                load_task.abort();
                break (stats.snapshot(), Some(sig));
            }
            _ = tick.tick() => {}
        }
        let elapsed = started.elapsed();
        let now_phase = Phase::at(elapsed, opts.duration);
        if now_phase != phase {
            let now = (stats.snapshot(), providers.stats());
            phases.push(PhaseTotals::between(
                phase,
                (&phase_start.0, &phase_start.1),
                (&now.0, &now.1),
            ));
            phase_start = now;
            match now_phase {
                Phase::FlakyDown => providers.take_down(Provider::Flaky),
                Phase::Normal | Phase::Recovered => providers.bring_up(Provider::Flaky),
            }
            phase = now_phase;
        }
        // The "last second" window: close it once a second has passed, give or take half a tick
        // (piped, the ticks come a second apart, and the window opened just after the last one).
        if window_start.0.elapsed() + tick.period() / 2 >= Duration::from_secs(1) {
            let now = stats.snapshot();
            let mut latencies = stats.take_latencies();
            window = Window::between(
                &window_start.1,
                &now,
                window_start.0.elapsed(),
                &mut latencies,
            );
            all_latencies.extend_from_slice(&latencies);
            window_start = (Instant::now(), now);
        }
        let snapshot = Snapshot {
            elapsed: elapsed.min(opts.duration),
            total: opts.duration,
            phase,
            load: stats.snapshot(),
            window: window.clone(),
            providers: providers.stats(),
            breakers: breakers_rx.borrow().clone(),
        };
        screen.frame(&snapshot);
    };
    poll_task.abort();
    phases.push(PhaseTotals::between(
        phase,
        (&phase_start.0, &phase_start.1),
        (&load, &providers.stats()),
    ));
    providers.bring_up(Provider::Flaky);
    let elapsed = started.elapsed().min(opts.duration);

    all_latencies.extend_from_slice(&stats.take_latencies());
    let p50 = load::percentile(&mut all_latencies, 50.0);
    let p99 = load::percentile(&mut all_latencies, 99.0);
    let observed = std::mem::take(&mut *observed.lock().unwrap_or_else(|p| p.into_inner()));
    Driven {
        elapsed,
        signal,
        load,
        p50,
        p99,
        phases,
        observed,
    }
}

/// Poll breaker states into `tx`, counting the transitions seen between polls into `observed`.
async fn poll_breakers(
    admin: SocketAddr,
    tx: tokio::sync::watch::Sender<Option<BreakerStates>>,
    observed: Arc<Mutex<Vec<TransitionCount>>>,
) {
    let mut poller = AdminPoller::new(admin);
    let mut last: Option<BreakerStates> = None;
    loop {
        let states = poller.breakers().await;
        if let (Some(prev), Some(now)) = (&last, &states) {
            let mut seen = observed.lock().unwrap_or_else(|p| p.into_inner());
            for (upstream, to) in now {
                match prev.get(upstream) {
                    Some(from) if from != to => count_transition(&mut seen, upstream, from, to, 1),
                    _ => {}
                }
            }
        }
        if states.is_some() {
            last = states.clone();
        }
        tx.send_replace(states);
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn count_transition(seen: &mut Vec<TransitionCount>, upstream: &str, from: &str, to: &str, n: u64) {
    match seen
        .iter_mut()
        .find(|t| t.upstream == upstream && t.from == from && t.to == to)
    {
        Some(t) => t.count += n,
        None => seen.push(TransitionCount {
            upstream: upstream.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            count: n,
        }),
    }
}

/// Breaker transitions from the gateway's `/metrics`
/// (`bulwark_circuit_breaker_transitions_total{upstream,from,to}`), if it serves them.
async fn metrics_transitions(admin: SocketAddr) -> Option<Vec<TransitionCount>> {
    let mut client = client::HttpClient::new(admin);
    let resp = tokio::time::timeout(admin::POLL_TIMEOUT, client.get("/metrics"))
        .await
        .ok()?
        .ok()?;
    if !resp.status.is_success() {
        return None;
    }
    let text = std::str::from_utf8(&resp.body).ok()?;
    // A gateway without this metric yet: fall back to what polling observed.
    text.contains("bulwark_circuit_breaker_transitions_total")
        .then(|| parse_transitions(text))
}

/// Parse `bulwark_circuit_breaker_transitions_total` samples out of Prometheus text exposition.
pub fn parse_transitions(text: &str) -> Vec<TransitionCount> {
    const NAME: &str = "bulwark_circuit_breaker_transitions_total{";
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(NAME) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Some(count) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let label = |key: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        if let (Some(upstream), Some(from), Some(to)) =
            (label("upstream"), label("from"), label("to"))
        {
            if count > 0.0 {
                count_transition(&mut out, &upstream, &from, &to, count as u64);
            }
        }
    }
    out
}

/// The gateway and admin addresses: the requested ones, or free loopback ports.
fn listen_addrs(opts: &DemoOptions) -> io::Result<(SocketAddr, SocketAddr)> {
    // Both probe sockets are held until both ports are known, so the two differ. Another process could
    // take a port between here and the gateway's bind; the gateway then fails to start with a clear
    // error (library callers can fix both in `DemoOptions::listen` and `admin_listen`).
    let a = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let b = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok((
        opts.listen.unwrap_or(a.local_addr()?),
        opts.admin_listen.unwrap_or(b.local_addr()?),
    ))
}

/// Wait until the gateway accepts connections, up to [`READY_TIMEOUT`]; then give its admin API a
/// moment too. Only the listener is required: without an admin API the demo still runs and shows `?`
/// for breaker states. Returns whether the admin API answered.
async fn wait_ready(listen: SocketAddr, admin: SocketAddr) -> Option<bool> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin_deadline = Instant::now() + ADMIN_GRACE;
    let mut poller = AdminPoller::new(admin);
    loop {
        if poller.is_up().await {
            return Some(true);
        }
        if Instant::now() >= admin_deadline {
            return Some(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private temporary directory for the config file and the gateway's store, removed on drop.
#[derive(Debug)]
struct StateDir(PathBuf);

impl StateDir {
    fn create() -> io::Result<StateDir> {
        let dir = std::env::temp_dir().join(format!(
            "bulwark-demo-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| in_context(e, "cannot create", &dir))?;
        Ok(StateDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        // Best effort: a leftover temp dir is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `err` with what was being done to which path (an `io::Error` names neither).
fn in_context(err: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{doing} `{}`: {err}", path.display()))
}

/// Whether stdout is a terminal (the display redraws in place) or not (one line a second).
pub fn stdout_is_tty() -> bool {
    io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_elapsed_time() {
        let total = Duration::from_secs(30);
        assert_eq!(Phase::at(Duration::ZERO, total), Phase::Normal);
        assert_eq!(
            Phase::at(Duration::from_millis(7_499), total),
            Phase::Normal
        );
        assert_eq!(
            Phase::at(Duration::from_millis(7_500), total),
            Phase::FlakyDown
        );
        assert_eq!(
            Phase::at(Duration::from_millis(17_999), total),
            Phase::FlakyDown
        );
        assert_eq!(Phase::at(Duration::from_secs(18), total), Phase::Recovered);
        assert_eq!(Phase::at(Duration::from_secs(40), total), Phase::Recovered);
    }

    #[test]
    fn transitions_from_prometheus_text() {
        let text = "# HELP bulwark_circuit_breaker_transitions_total Breaker transitions.\n\
            # TYPE bulwark_circuit_breaker_transitions_total counter\n\
            bulwark_circuit_breaker_transitions_total{upstream=\"flaky\",from=\"closed\",to=\"open\"} 2\n\
            bulwark_circuit_breaker_transitions_total{to=\"closed\",from=\"half_open\",upstream=\"flaky\"} 1\n\
            bulwark_circuit_breaker_transitions_total{upstream=\"slow\",from=\"closed\",to=\"open\"} 0\n\
            bulwark_circuit_breaker_state{upstream=\"flaky\"} 0\n";
        let t = parse_transitions(text);
        assert_eq!(t.len(), 2);
        assert_eq!(
            (
                t[0].upstream.as_str(),
                t[0].from.as_str(),
                t[0].to.as_str(),
                t[0].count
            ),
            ("flaky", "closed", "open", 2)
        );
        assert_eq!(
            (t[1].from.as_str(), t[1].to.as_str(), t[1].count),
            ("half_open", "closed", 1)
        );
    }
}
