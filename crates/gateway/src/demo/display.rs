//! The live display: a frame of a few lines redrawn in place about four times a second on a terminal
//! (ANSI: cursor up, clear to end of screen, print), or one summary line a second when stdout is not a
//! terminal (a CI log, a pipe), so the output stays readable there too.
//!
//! Rendering is pure ([`render`], [`render_line`], [`render_summary`] take data and return a `String`);
//! only [`Screen`] writes to stdout.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use super::admin::BreakerStates;
use super::load::{self, LoadSnapshot};
use super::providers::{Provider, ProviderStats};
use super::{DemoSummary, Phase};

/// Upstreams in the order the display lists their breakers: the interesting one first.
pub const BREAKER_ORDER: [Provider; 3] = [Provider::Flaky, Provider::Healthy, Provider::Slow];

/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 30;

/// Client-side numbers of the last whole second.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    /// Requests finished per second.
    pub rate: f64,
    /// Errors clients saw in the window.
    pub client_errors: u64,
    /// Median latency in the window.
    pub p50: Option<Duration>,
    /// 99th percentile latency in the window.
    pub p99: Option<Duration>,
}

impl Window {
    /// The window between two snapshots `span` apart, with the latencies (µs) recorded in it.
    pub fn between(
        before: &LoadSnapshot,
        after: &LoadSnapshot,
        span: Duration,
        latencies: &mut [u32],
    ) -> Window {
        let requests = after.requests.saturating_sub(before.requests);
        let secs = span.as_secs_f64();
        Window {
            rate: if secs > 0.0 {
                requests as f64 / secs
            } else {
                0.0
            },
            client_errors: after.client_errors().saturating_sub(before.client_errors()),
            p50: load::percentile(latencies, 50.0),
            p99: load::percentile(latencies, 99.0),
        }
    }
}

/// Everything one frame shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Time since the load started.
    pub elapsed: Duration,
    /// Length of the run.
    pub total: Duration,
    /// Current phase.
    pub phase: Phase,
    /// Client-side totals so far.
    pub load: LoadSnapshot,
    /// The last whole second.
    pub window: Window,
    /// Provider-side totals so far, in [`Provider::ALL`] order.
    pub providers: Vec<ProviderStats>,
    /// Breaker state per upstream; `None` when the admin API did not answer.
    pub breakers: Option<BreakerStates>,
}

impl Snapshot {
    fn provider_totals(&self) -> (u64, u64) {
        provider_totals(&self.providers)
    }
}

fn provider_totals(providers: &[ProviderStats]) -> (u64, u64) {
    providers
        .iter()
        .fold((0, 0), |(r, e), p| (r + p.requests, e + p.errors))
}

/// Terminal colours, or none.
#[derive(Debug, Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn code(self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
    fn bold(self, text: &str) -> String {
        self.code("1", text)
    }
    fn dim(self, text: &str) -> String {
        self.code("2", text)
    }
    fn red(self, text: &str) -> String {
        self.code("1;31", text)
    }
    fn green(self, text: &str) -> String {
        self.code("32", text)
    }
    fn yellow(self, text: &str) -> String {
        self.code("1;33", text)
    }
    /// A breaker state, upper-cased and red when it is rejecting traffic.
    fn state(self, state: &str) -> String {
        match state {
            "closed" => self.green(state),
            "open" | "forced_open" => self.red(&state.to_uppercase()),
            "half_open" => self.yellow(state),
            _ => self.dim(state),
        }
    }
}

/// `12,345`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `4.2ms`, `230ms`, `1.25s`; `-` for none.
pub fn latency(d: Option<Duration>) -> String {
    match d {
        None => "-".to_owned(),
        Some(d) if d < Duration::from_millis(10) => format!("{:.1}ms", d.as_secs_f64() * 1e3),
        Some(d) if d < Duration::from_secs(1) => format!("{}ms", d.as_millis()),
        Some(d) => format!("{:.2}s", d.as_secs_f64()),
    }
}

/// `part` as a percentage of `whole`: `0.02%`.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0%".to_owned();
    }
    let p = part as f64 * 100.0 / whole as f64;
    if p == 0.0 || p >= 10.0 {
        format!("{p:.0}%")
    } else if p >= 1.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.2}%")
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn breaker_of(breakers: Option<&BreakerStates>, provider: Provider) -> &str {
    breakers
        .and_then(|b| b.get(provider.name()))
        .map_or("?", String::as_str)
}

fn progress_bar(elapsed: Duration, total: Duration) -> String {
    let frac = if total.is_zero() {
        1.0
    } else {
        (elapsed.as_secs_f64() / total.as_secs_f64()).clamp(0.0, 1.0)
    };
    let filled = (frac * BAR_WIDTH as f64).round() as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled))
}

/// The multi-line frame for a terminal. `color` adds ANSI colours; lines stay under [`MAX_WIDTH`]
/// visible columns, because a wrapped line would throw off the cursor-up redraw.
pub fn render(s: &Snapshot, color: bool) -> String {
    let p = Paint(color);
    let (provider_requests, provider_errors) = s.provider_totals();
    let client_errors = s.load.client_errors();
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = writeln!(
        out,
        "{} {} {} / {}",
        p.bold("bulwark demo"),
        progress_bar(s.elapsed, s.total),
        secs(s.elapsed),
        secs(s.total),
    );
    let _ = writeln!(
        out,
        "  phase {}/3    {}",
        s.phase.number(),
        s.phase.describe()
    );
    let _ = writeln!(
        out,
        "  requests     {} total   {:.0}/s   p50 {}  p99 {}  (last second)",
        count(s.load.requests),
        s.window.rate,
        latency(s.window.p50),
        latency(s.window.p99),
    );
    let client = format!(
        "{} errors in {} requests ({})",
        count(client_errors),
        count(s.load.requests),
        percent(client_errors, s.load.requests)
    );
    let _ = writeln!(
        out,
        "  clients saw  {}",
        if client_errors == 0 {
            p.green(&client)
        } else {
            p.yellow(&client)
        },
    );
    let _ = writeln!(
        out,
        "  providers    returned {} errors in {} calls ({})",
        count(provider_errors),
        count(provider_requests),
        percent(provider_errors, provider_requests),
    );
    let breakers: Vec<String> = BREAKER_ORDER
        .iter()
        .map(|u| {
            format!(
                "{} {}",
                u.name(),
                p.state(breaker_of(s.breakers.as_ref(), *u))
            )
        })
        .collect();
    let _ = writeln!(out, "  breakers     {}", breakers.join("   "));
    let mut served: Vec<String> = Provider::ALL
        .iter()
        .map(|u| format!("{} {}", u.name(), count(s.load.served_by(*u))))
        .collect();
    if s.load.served_by_unknown > 0 {
        served.push(format!("gateway {}", count(s.load.served_by_unknown)));
    }
    out.push_str(&wrap("  served by    ", &served, "   "));
    let _ = writeln!(
        out,
        "  failovers    {} /api/ requests answered by healthy",
        count(s.load.failovers)
    );
    let reasons: Vec<String> = s
        .load
        .reasons_seen()
        .iter()
        .map(|(r, n)| format!("{r} {}", count(*n)))
        .collect();
    if reasons.is_empty() {
        let _ = writeln!(out, "  gateway did  {}", p.dim("nothing yet"));
    } else {
        out.push_str(&wrap("  gateway did  ", &reasons, "   "));
    }
    out
}

/// Widest line [`render`] produces, in visible columns: fits an 80-column terminal.
pub const MAX_WIDTH: usize = 79;

/// `items` joined by `sep` after `label`, wrapped under the label's indentation at [`MAX_WIDTH`].
fn wrap(label: &str, items: &[String], sep: &str) -> String {
    let indent = " ".repeat(label.chars().count());
    let mut out = String::new();
    let mut line = label.to_owned();
    let mut empty = true;
    for item in items {
        let width = line.chars().count() + sep.len() + item.chars().count();
        if !empty && width > MAX_WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = indent.clone();
            empty = true;
        }
        if !empty {
            line.push_str(sep);
        }
        line.push_str(item);
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// One plain line per second, for a stdout that is not a terminal.
pub fn render_line(s: &Snapshot) -> String {
    let (provider_requests, provider_errors) = s.provider_totals();
    let breakers: Vec<String> = BREAKER_ORDER
        .iter()
        .map(|u| format!("{}={}", u.name(), breaker_of(s.breakers.as_ref(), *u)))
        .collect();
    format!(
        "[{:>5} / {}] phase {} | {} req ({:.0}/s) | client errors {} | provider errors {}/{} | breakers {} | failovers {}",
        secs(s.elapsed),
        secs(s.total),
        s.phase.number(),
        s.load.requests,
        s.window.rate,
        s.load.client_errors(),
        provider_errors,
        provider_requests,
        breakers.join(" "),
        s.load.failovers,
    )
}

/// What the demo prints before the load starts: where things are.
pub fn render_header(
    gateway_url: &str,
    admin_url: &str,
    config: &Path,
    duration: Duration,
) -> String {
    format!(
        "bulwark demo: 3 simulated providers (healthy, flaky 30% 503, slow 300-1500ms) behind a gateway\n  \
         gateway    {gateway_url}   (/api/ -> flaky, failover healthy; /slow/ -> slow, 1s timeout, fallback)\n  \
         dashboard  {admin_url}/dashboard\n  \
         admin API  {admin_url}/health   {admin_url}/api/circuit-breakers   {admin_url}/metrics\n  \
         config     {}\n  \
         load       {} (Ctrl-C stops early)\n",
        config.display(),
        secs(duration),
    )
}

/// The final summary.
pub fn render_summary(s: &DemoSummary, color: bool) -> String {
    let p = Paint(color);
    let (provider_requests, provider_errors) = provider_totals(&s.providers);
    let client_errors = s.client_errors();
    let rate = if s.elapsed.is_zero() {
        0.0
    } else {
        s.load.requests as f64 / s.elapsed.as_secs_f64()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} summary{}: {} requests in {} ({rate:.0}/s)",
        p.bold("bulwark demo"),
        if s.interrupted { " (interrupted)" } else { "" },
        count(s.load.requests),
        secs(s.elapsed),
    );
    let _ = writeln!(
        out,
        "  clients saw        {} errors ({})   p50 {}  p99 {}",
        count(client_errors),
        percent(client_errors, s.load.requests),
        latency(s.p50),
        latency(s.p99),
    );
    let _ = writeln!(
        out,
        "  providers returned {} errors in {} calls ({})",
        count(provider_errors),
        count(provider_requests),
        percent(provider_errors, provider_requests),
    );
    for stats in &s.providers {
        let _ = writeln!(
            out,
            "    {:<8} {:>9} calls {:>9} errors",
            stats.provider.name(),
            count(stats.requests),
            count(stats.errors),
        );
    }
    if !s.phases.is_empty() {
        let _ = writeln!(
            out,
            "  by phase          requests  client errors  provider errors  failovers"
        );
        for t in &s.phases {
            let label = format!("{} {}", t.phase.number(), t.phase.name());
            let provider = format!("{} / {}", count(t.provider_errors), count(t.provider_calls));
            let _ = writeln!(
                out,
                "    {label:<13} {:>10} {:>14} {:>16} {:>10}",
                count(t.requests),
                count(t.client_errors),
                provider,
                count(t.failovers),
            );
        }
    }
    let _ = writeln!(
        out,
        "  failovers          {} /api/ requests answered by healthy instead of flaky",
        count(s.load.failovers),
    );
    let reasons = s.load.reasons_seen();
    if !reasons.is_empty() {
        let list: Vec<String> = reasons
            .iter()
            .map(|(r, n)| format!("{r} {}", count(*n)))
            .collect();
        let _ = writeln!(out, "  gateway acted      {}", list.join(", "));
    }
    let source = if s.transitions_from_metrics {
        "from /metrics"
    } else {
        "as polled"
    };
    if s.breaker_transitions.is_empty() {
        let _ = writeln!(out, "  breakers           no transitions seen ({source})");
    }
    for upstream in BREAKER_ORDER {
        let moves: Vec<String> = s
            .breaker_transitions
            .iter()
            .filter(|t| t.upstream == upstream.name())
            .map(|t| format!("{} -> {} x{}", t.from, t.to, t.count))
            .collect();
        if !moves.is_empty() {
            let _ = writeln!(
                out,
                "  breaker {:<10} {}   ({source})",
                upstream.name(),
                moves.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "  gateway was        {}   admin API {}",
        s.gateway_url, s.admin_url
    );
    out
}

/// Where frames go: stdout, redrawn in place on a terminal, one line a second otherwise.
#[derive(Debug)]
pub struct Screen {
    tty: bool,
    /// ANSI colours: on a terminal, unless `NO_COLOR` or `TERM=dumb` says not ([`crate::cli::colors_wanted`]).
    color: bool,
    /// Lines of the frame currently on screen, to move back over.
    drawn: usize,
}

impl Screen {
    /// stdout, detecting whether it is a terminal.
    pub fn stdout() -> Screen {
        // A dumb terminal cannot move its cursor back over the last frame: a line a second there.
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        let tty = super::stdout_is_tty() && !dumb;
        Screen {
            tty,
            color: crate::cli::colors_wanted(tty),
            drawn: 0,
        }
    }

    /// Whether frames are redrawn in place.
    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// Whether output may carry ANSI colours (only on a terminal, and see [`Screen::stdout`]).
    pub fn color(&self) -> bool {
        self.color
    }

    /// Print text below the current frame; the next frame starts under it.
    pub fn print(&mut self, text: &str) {
        self.write(text);
        self.drawn = 0;
    }

    /// Show `s`: replace the previous frame on a terminal, else print one line.
    pub fn frame(&mut self, s: &Snapshot) {
        if self.tty {
            let frame = render(s, self.color);
            let mut out = String::new();
            if self.drawn > 0 {
                // Cursor up over the old frame, to column 0, clear to the end of the screen.
                let _ = write!(out, "\x1b[{}A\r\x1b[J", self.drawn);
            }
            out.push_str(&frame);
            self.drawn = frame.lines().count();
            self.write(&out);
        } else {
            let mut line = render_line(s);
            line.push('\n');
            self.write(&line);
        }
    }

    fn write(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (the user piped into `head`) must not stop the demo.
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    }
}
