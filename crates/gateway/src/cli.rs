//! Command line: `bulwark run` and `bulwark check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};

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
        #[arg(long)]
        threads: Option<usize>,
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
        /// Concurrent client connections.
        #[arg(long, default_value_t = crate::demo::DemoOptions::default().concurrency)]
        concurrency: usize,
    },
}

/// Entry point of the `bulwark` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                print!("{}", check_report(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, threads } => run(config, threads),
        Command::Demo {
            duration,
            seed,
            concurrency,
        } => demo(crate::demo::DemoOptions {
            duration,
            seed,
            concurrency,
            ..Default::default()
        }),
    }
}

fn demo(opts: crate::demo::DemoOptions) -> ExitCode {
    // The live display owns stdout: logs go to stderr, warnings only.
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
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
        match crate::demo::run(opts, crate::demo::InProcessGateway::default()).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulwark demo: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn run(path: PathBuf, threads: Option<usize>) -> ExitCode {
    init_tracing();
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let threads = threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
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
        let server = match crate::proxy::Server::bind(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bulwark: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(listen = %server.local_addr(), "bulwark listening");
        server.run(shutdown_signal()).await;
        tracing::info!("bulwark stopped");
        ExitCode::SUCCESS
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
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

/// The text `bulwark check` prints: the effective config, then per-route amplification with warnings.
pub fn check_report(c: &Config) -> String {
    let mut out = String::from("# effective config (defaults filled in)\n");
    out.push_str(&config::to_yaml(c));
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
            "route {name} -> {}: {attempts} x {} x {} = {amp}\n",
            chain.join(" -> "),
            1 + hedges,
            chain.len()
        ));
        if amp > AMPLIFICATION_WARN_THRESHOLD {
            out.push_str(&format!(
                "  warning: route {name} can send up to {amp} upstream requests per client request (threshold {AMPLIFICATION_WARN_THRESHOLD})\n"
            ));
        }
        let retries = attempts > 1 || hedges > 0;
        let budget = r.retry.as_ref().and_then(|x| x.budget.as_ref()).is_some();
        if retries && !budget {
            out.push_str(&format!(
                "  warning: route {name} retries without a budget: in an outage it multiplies load by {amp}; add retry.budget\n"
            ));
        }
    }
    out
}
