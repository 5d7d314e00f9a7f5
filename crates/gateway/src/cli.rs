//! Command line: `bulwark run` and `bulwark check`, and [`start`], which composes a running gateway
//! (proxy listener, admin listener, config reloader) for the binary and for tests.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::admin::metrics::Telemetry;
use crate::admin::{self, AdminServer};
use crate::config::{self, Config, LogFormat, Mode};
use crate::proxy::{BreakerCommand, Gateway, Server, StartError};
use crate::reload::{self, Reloader};
use crate::store::Store;

/// The process allocator. A proxy allocates and frees a few small buffers per request (header maps,
/// hyper's read/write buffers, channel cells); mimalloc's thread-local free lists serve those far more
/// cheaply than glibc malloc, whose bins and `brk` trimming showed up at ~4-5% of CPU under load (see
/// `bench/results/gateway.md`). Declared here rather than in `main.rs` so that the binary, the tests
/// and the demo all run on the allocator that is benchmarked.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Amplification above this (attempts x hedges x failover) gets a warning from `check`.
pub const AMPLIFICATION_WARN_THRESHOLD: u32 = 10;

/// bulwark: a resilience reverse proxy driven by one YAML file.
#[derive(Debug, Parser)]
#[command(name = "bulwark", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve traffic.
    Run {
        /// The config file.
        #[arg(short, long)]
        config: PathBuf,
        /// Worker threads (default: number of cores). 1 runs everything on one thread.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: Option<u16>,
        /// Log format; overrides `logging.format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Validate a config, print it with defaults filled in and each route's worst-case load amplification.
    Check {
        /// The config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start three simulated providers (healthy, flaky, slow), a gateway in front of them and a bounded
    /// load, and show live what the gateway does.
    Demo {
        /// How long the load runs.
        #[arg(long, default_value = "30s", value_parser = config::parse_duration)]
        duration: std::time::Duration,
        /// Seed for the providers' failures and latencies.
        #[arg(long, default_value_t = crate::demo::DemoOptions::default().seed)]
        seed: u64,
        /// Concurrent client connections, 1 to 1024.
        #[arg(
            long,
            default_value_t = crate::demo::DemoOptions::default().concurrency as u16,
            value_parser = clap::value_parser!(u16).range(1..=1024)
        )]
        concurrency: u16,
    },
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(a: LogFormatArg) -> Self {
        match a {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// Entry point of the `bulwark` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => match check_store(&c) {
                Ok(note) => {
                    print!("{}{}", check_report(&c), note.unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}", store_error(&config, e));
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            threads,
            log_format,
        } => run(config, threads, log_format.map(Into::into)),
        Command::Demo {
            duration,
            seed,
            concurrency,
        } => demo(crate::demo::DemoOptions {
            duration,
            seed,
            concurrency: usize::from(concurrency),
            ..Default::default()
        }),
    }
}

fn demo(opts: crate::demo::DemoOptions) -> ExitCode {
    // The live display owns the terminal: logs go to stderr, errors only (the display already shows
    // breaker transitions, which the gateway logs as warnings).
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Ended by a signal: 128 + its number, as a shell reports a process a signal ended
        // (130 for Ctrl-C), so that a script or a shell loop running the demo stops too.
        let by_signal = |n: i32| ExitCode::from(u8::try_from(128 + n).unwrap_or(130));
        match crate::demo::run(opts, crate::demo::InProcessGateway::default()).await {
            Ok(summary) => summary.signal.map_or(ExitCode::SUCCESS, by_signal),
            Err(e @ crate::demo::DemoError::Interrupted(n)) => {
                eprintln!("bulwark demo: {e}");
                by_signal(n)
            }
            Err(e) => {
                eprintln!("bulwark demo: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn run(path: PathBuf, threads: Option<u16>, log_format: Option<LogFormat>) -> ExitCode {
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    init_tracing(&config.logging, log_format);
    raise_fd_limit(config.limits.max_connections);
    let threads = threads
        .map(usize::from)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    // One thread: a current-thread runtime (no work-stealing overhead, no cross-thread wakeups).
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Before anything listens: a SIGTERM right after start drains rather than kills.
        let stop = shutdown_signal();
        let running = match start(&path, &config, reload::POLL_INTERVAL).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("bulwark: {e}");
                return ExitCode::FAILURE;
            }
        };
        match running.admin_addr {
            Some(admin) => {
                tracing::info!(listen = %running.proxy_addr, %admin, "bulwark listening")
            }
            None => tracing::info!(listen = %running.proxy_addr, "bulwark listening"),
        }
        stop.await;
        // A second signal during the drain means "now" (an operator pressing Ctrl-C again).
        let again = shutdown_signal();
        tracing::info!(
            "shutting down: draining in-flight requests (a second SIGTERM or SIGINT stops at once)"
        );
        tokio::select! {
            () = running.stop() => {
                tracing::info!("bulwark stopped");
                ExitCode::SUCCESS
            }
            () = again => {
                tracing::warn!("second signal: stopped without finishing the drain");
                ExitCode::FAILURE
            }
        }
    })
}

/// File descriptors `max_connections` client connections need at most: each with an upstream
/// connection, plus the listeners, the admin API, health checks, the store and log files.
pub fn fds_needed(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64)
}

/// Raises the soft limit on open files to the hard limit, as HAProxy (from its `maxconn`) and
/// Go's runtime do: a shell's usual soft limit (1024) is far below what the default
/// `max_connections` needs, and a process out of descriptors fails its upstream connections,
/// which the breaker and outlier detection would then hold against healthy endpoints. Warns when
/// even the limit in force then is below [`fds_needed`]. The limit in force, if known.
pub fn raise_fd_limit(max_connections: usize) -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let was = getrlimit(Resource::Nofile);
    if was.current.is_some() && was.current != was.maximum {
        let raised = Rlimit {
            current: was.maximum,
            maximum: was.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "could not raise the open-file limit");
        }
    }
    let limit = getrlimit(Resource::Nofile).current;
    let need = fds_needed(max_connections);
    if let Some(l) = limit.filter(|&l| l < need) {
        tracing::warn!(
            limit = l,
            max_connections,
            needed = need,
            "the open-file limit is below what limits.max_connections needs (a client and an upstream connection each): raise it (ulimit -n, systemd LimitNOFILE=) or lower max_connections"
        );
    }
    limit
}

/// A gateway started by [`start`]: proxy, admin listener (when configured) and config reloader.
#[derive(Debug)]
pub struct Running {
    /// The proxy's bound address.
    pub proxy_addr: SocketAddr,
    /// The admin listener's bound address, when `admin:` is configured.
    pub admin_addr: Option<SocketAddr>,
    /// The shared gateway state.
    pub gateway: Arc<Gateway>,
    /// The reloader watching the config file.
    pub reloader: Arc<Reloader>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (up to `drain_timeout`), then stops the admin
    /// listener (which answers `/ready` with 503 during the drain) and the reloader.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Runs until `shutdown` completes, then [`stop`](Self::stop)s.
    pub async fn wait(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.stop().await;
    }
}

/// Starts everything `bulwark run` runs for the config `config`, loaded from `path`: the proxy
/// listener, the admin listener (if `admin:` is set; its token read from `admin.token_env` now) and
/// the reloader (SIGHUP, and the file checked every `poll`). One metrics registry serves all runtimes.
pub async fn start(path: &Path, config: &Config, poll: Duration) -> Result<Running, StartError> {
    // SIGHUP's handler before anything slow (the store may wait for its file's lock): from now
    // on a SIGHUP (`systemctl reload` right after `start`) reloads once the start is done,
    // rather than kill the process.
    start_with(path, config, poll, reload::hangup()).await
}

/// [`start`], with the SIGHUP handler that reloads (`None`: SIGHUP does not reload; the demo
/// takes it as its terminal closing).
pub async fn start_with(
    path: &Path,
    config: &Config,
    poll: Duration,
    hup: reload::Hangup,
) -> Result<Running, StartError> {
    // The store first: a file that cannot be used fails the start before any port is bound.
    let store = match &config.store {
        Some(s) => Some(open_store(s.path.clone(), s.audit_max_entries).await?),
        None => None,
    };
    let telemetry = Arc::new(Telemetry::new());
    let server = Server::bind_with(config, telemetry).await?;
    let proxy_addr = server.local_addr();
    let gateway = server.gateway();
    // Persisted admin overrides go on top of the file's config before the listener serves.
    if let Some((store, persisted, mode)) = store {
        tracing::info!(file = %store.path().display(), overrides = persisted.len(), mode = mode.map_or("-", Mode::as_str), "store opened");
        gateway.attach_store(store, persisted, mode);
    }
    let admin = match &config.admin {
        Some(a) => {
            let token = admin::token_from_env(a);
            if token.is_none() {
                tracing::warn!(
                    token_env = a.token_env.as_deref().unwrap_or("-"),
                    "admin: no token configured; mutating admin calls will be refused (403)"
                );
            }
            Some(
                AdminServer::bind(a.listen, gateway.clone(), token)
                    .await?
                    .with_allowed_hosts(&a.allowed_hosts),
            )
        }
        None => None,
    };
    let admin_addr = admin.as_ref().map(AdminServer::local_addr);
    let reloader = Arc::new(Reloader::new(path, gateway.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Created here, before `start` returns: its SIGHUP handler is in place from now on.
    let watch = reloader.clone().watch_with(poll, hup);
    let task = tokio::spawn(async move {
        let watcher = tokio::spawn(watch);
        let (admin_stop, admin_task) = match admin {
            Some(a) => {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(a.run(async move {
                    let _ = rx.await;
                }));
                (Some(tx), Some(task))
            }
            None => (None, None),
        };
        server
            .run(async move {
                let _ = stop_rx.await;
            })
            .await;
        watcher.abort();
        if let Some(tx) = admin_stop {
            let _ = tx.send(());
        }
        if let Some(t) = admin_task {
            let _ = t.await;
        }
    });
    // Ready from now (the accept loop also says so when it starts): the listener is bound, and
    // a connection made before the loop first runs waits in its backlog. Callers log "listening"
    // next, and `/ready` must agree with that line.
    gateway.set_phase(crate::proxy::Phase::Serving);
    Ok(Running {
        proxy_addr,
        admin_addr,
        gateway,
        reloader,
        stop: Some(stop_tx),
        task,
    })
}

/// The store and what it keeps: breaker overrides, and the mode override.
type Opened = (Arc<Store>, BTreeMap<String, BreakerCommand>, Option<Mode>);

/// Opens the store file and reads its overrides, on the blocking pool.
async fn open_store(path: PathBuf, audit_max_entries: u64) -> Result<Opened, StartError> {
    let opened = tokio::task::spawn_blocking(move || {
        let store = Store::open(&path)?.keep_audit(audit_max_entries);
        let persisted = store.overrides()?;
        let mode = store.mode_override()?;
        Ok::<_, crate::store::StoreError>((Arc::new(store), persisted, mode))
    })
    .await
    .map_err(|e| format!("store: cannot open: {e}"))?;
    Ok(opened?)
}

/// A store `bulwark check` found unusable, as a config error: `FILE:LINE:COL: store.path: ...`.
fn store_error(file: &std::path::Path, e: crate::store::StoreError) -> config::ConfigError {
    let key = [config::Seg::key("store"), config::Seg::key("path")];
    let src = std::fs::read_to_string(file).unwrap_or_default();
    config::ConfigError {
        file: file.display().to_string(),
        // `store: {}` keeps the default path, which has no line of its own: `store:`'s.
        position: config::locate_nearest(&src, &key),
        path: config::render(&key),
        message: e.to_string(),
    }
}

/// What `bulwark check` says about `store:`, checked without creating the file (see
/// [`crate::store::inspect`]); `None` without `store:`.
pub fn check_store(c: &Config) -> Result<Option<String>, crate::store::StoreError> {
    let Some(s) = &c.store else {
        return Ok(None);
    };
    let path = s.path.display();
    Ok(Some(match crate::store::inspect(&s.path)? {
        crate::store::Inspection::WillBeCreated => {
            format!("# store: {path} does not exist; `run` will create it\n")
        }
        crate::store::Inspection::Existing { version } => {
            format!("# store: {path} is a SQLite file, schema version {version}\n")
        }
    }))
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled, so a signal in between is not lost (nor fatal). Call it inside the
/// runtime.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let signal = first_signal(false);
    async move {
        signal.await;
    }
}

/// Resolves to the number of the first of SIGINT (2), SIGTERM (15) and, with `hangup`, SIGHUP (1)
/// received. The handlers are installed when this is called (inside the runtime); where none can
/// be (no Unix signals), Ctrl-C alone.
pub(crate) fn first_signal(hangup: bool) -> impl std::future::Future<Output = i32> {
    #[cfg(unix)]
    let mut handlers: Vec<(i32, tokio::signal::unix::Signal)> = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut kinds = vec![(2, SignalKind::interrupt()), (15, SignalKind::terminate())];
        if hangup {
            kinds.push((1, SignalKind::hangup()));
        }
        kinds
            .into_iter()
            .filter_map(|(n, kind)| signal(kind).ok().map(|s| (n, s)))
            .collect()
    };
    #[cfg(not(unix))]
    let _ = hangup;
    async move {
        #[cfg(unix)]
        if !handlers.is_empty() {
            return std::future::poll_fn(move |cx| {
                for (n, s) in &mut handlers {
                    if s.poll_recv(cx).is_ready() {
                        return std::task::Poll::Ready(*n);
                    }
                }
                std::task::Poll::Pending
            })
            .await;
        }
        let _ = tokio::signal::ctrl_c().await;
        2
    }
}

/// Installs the global `tracing` subscriber: `BULWARK_LOG` (if set) or `logging.level` as the filter,
/// `--log-format` or `logging.format` as the format. The access-log target is always let through at
/// `info`: whether lines are produced is `logging.access_log`'s decision, which follows reloads.
fn init_tracing(logging: &config::Logging, format: Option<LogFormat>) {
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("BULWARK_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    // An invalid BULWARK_LOG is said so (on stderr: logging is not up yet), and `logging.level`
    // applies instead.
    let from_env = from_env.and_then(|s| match EnvFilter::builder().parse(&s) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!(
                "bulwark: BULWARK_LOG `{s}` is not a valid filter ({e}); using logging.level `{}`",
                logging.level
            );
            None
        }
    });
    let mut filter = from_env.unwrap_or_else(|| {
        EnvFilter::builder()
            .parse(&logging.level)
            .unwrap_or_else(|_| EnvFilter::new(config::DEFAULT_LOG_LEVEL))
    });
    if let Ok(d) = "bulwark::access=info".parse() {
        filter = filter.add_directive(d);
    }
    // Colours only on a terminal: a pipe or a file (journald, `docker logs`) gets plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colors_wanted(std::io::stdout().is_terminal()));
    let _ = match format.unwrap_or(logging.format) {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Worst-case upstream requests per client request of route `i`:
/// attempts x (1 + max hedges) x (1 + failover chain length).
pub fn amplification(route: &config::Route) -> u32 {
    let attempts = route
        .retry
        .as_ref()
        .filter(|r| r.enabled)
        .map_or(1, |r| r.attempts);
    let hedges = route
        .hedge
        .as_ref()
        .filter(|h| h.enabled)
        .map_or(0, |h| h.max_hedges);
    attempts
        .saturating_mul(1 + hedges)
        .saturating_mul(1 + route.failover.len() as u32)
}

/// The text `bulwark check` prints: the effective config, then per-route amplification with warnings
/// as YAML comments (so the whole output loads again as the same config).
pub fn check_report(c: &Config) -> String {
    let mut out = String::from("# effective config (defaults filled in)\n");
    out.push_str(&config::to_yaml(&config::effective(c)));
    out.push_str(
        "\n# worst-case load amplification per route (attempts x (1 + hedges) x (1 + failover))\n",
    );
    for (i, r) in c.routes.iter().enumerate() {
        let name = r.name.clone().unwrap_or_else(|| format!("route{i}"));
        let attempts = r
            .retry
            .as_ref()
            .filter(|x| x.enabled)
            .map_or(1, |x| x.attempts);
        let hedges = r
            .hedge
            .as_ref()
            .filter(|h| h.enabled)
            .map_or(0, |h| h.max_hedges);
        let chain: Vec<&str> = std::iter::once(r.upstream.as_str())
            .chain(r.failover.iter().map(String::as_str))
            .collect();
        let amp = amplification(r);
        out.push_str(&format!(
            "# route {name} -> {}: {attempts} x {} x {} = {amp}\n",
            chain.join(" -> "),
            1 + hedges,
            chain.len()
        ));
        if amp > AMPLIFICATION_WARN_THRESHOLD {
            out.push_str(&format!(
                "#   warning: route {name} can send up to {amp} upstream requests per client request (threshold {AMPLIFICATION_WARN_THRESHOLD})\n"
            ));
        }
        let retries = attempts > 1 || hedges > 0;
        // The budget of an enabled retry section only: hedges draw on the same budget, and a
        // disabled section gives them none (as the running route builds it).
        let budget = r
            .retry
            .as_ref()
            .filter(|x| x.enabled)
            .and_then(|x| x.budget.as_ref())
            .is_some();
        if retries && !budget {
            let what = if attempts > 1 { "retries" } else { "hedges" };
            let disabled = r.retry.as_ref().is_some_and(|x| !x.enabled);
            let fix = if disabled {
                "enable retry (its budget counts only then; attempts: 1 keeps retries off)"
            } else {
                "add retry.budget"
            };
            out.push_str(&format!(
                "#   warning: route {name} {what} without a budget: in an outage it multiplies load by {amp}; {fix}\n"
            ));
        }
        if let Some(f) = r.fault.as_ref().filter(|f| f.enabled) {
            let mut faults = Vec::new();
            if let Some(d) = f.delay.as_ref().filter(|d| d.percent > 0.0) {
                faults.push(format!(
                    "delays {}% of requests by {}",
                    d.percent,
                    config::format_duration(d.duration.get())
                ));
            }
            if let Some(a) = f.abort.as_ref().filter(|a| a.percent > 0.0) {
                faults.push(format!("aborts {}% with {}", a.percent, a.status));
            }
            if !faults.is_empty() {
                out.push_str(&format!(
                    "#   warning: route {name} injects faults: {}\n",
                    faults.join(", ")
                ));
            }
        }
    }
    out
}

/// Whether output to a terminal (`tty`) may carry ANSI colours: not when `NO_COLOR` is set to
/// anything but the empty string (no-color.org), nor when `TERM` is `dumb`.
pub fn colors_wanted(tty: bool) -> bool {
    colors_given(
        tty,
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

/// [`colors_wanted`], given the two variables.
fn colors_given(tty: bool, no_color: Option<&OsStr>, term: Option<&OsStr>) -> bool {
    tty && no_color.is_none_or(OsStr::is_empty) && term.is_none_or(|t| t != "dumb")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_and_not_when_no_color_or_a_dumb_term_says_so() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert!(colors_given(true, None, os("xterm-256color")));
        assert!(colors_given(true, None, None));
        assert!(!colors_given(false, None, os("xterm")));
        assert!(!colors_given(true, os("1"), os("xterm")));
        assert!(!colors_given(true, os("0"), None), "any non-empty NO_COLOR");
        assert!(
            colors_given(true, os(""), None),
            "an empty NO_COLOR is unset"
        );
        assert!(!colors_given(true, None, os("dumb")));
    }
}
