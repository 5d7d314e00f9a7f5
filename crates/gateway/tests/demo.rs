//! Tests of `bulwark demo`'s pieces over real loopback sockets: the simulated providers, the generated
//! config, the load loop (against a provider directly, no gateway) and the pure rendering functions.
//! Timing assertions are lower bounds only.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bulwark_gateway::demo::client::HttpClient;
use bulwark_gateway::demo::display::{self, Snapshot, Window};
use bulwark_gateway::demo::load::{self, LoadConfig, LoadSnapshot, LoadStats};
use bulwark_gateway::demo::providers::PROVIDER_HEADER;
use bulwark_gateway::demo::{
    config_yaml, DemoSummary, Phase, PhaseTotals, Provider, ProviderStats, Providers,
    TransitionCount,
};
use hyper::StatusCode;
use serde_norway::Value;
use tokio::time::Instant;

/// Guards a test against hanging forever; never a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);

#[tokio::test]
async fn healthy_answers_200_tagged_and_health_is_not_counted() {
    let providers = Providers::start(1).await.unwrap();
    let mut client = HttpClient::new(providers.addr(Provider::Healthy));

    let resp = client.get("/api/chat").await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.headers[PROVIDER_HEADER], "healthy");
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["provider"], "healthy");

    let health = client.get("/health").await.unwrap();
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.headers[PROVIDER_HEADER], "healthy");

    let stats = providers.stats_of(Provider::Healthy);
    assert_eq!(
        (stats.requests, stats.errors),
        (1, 0),
        "/health is not counted"
    );
    for other in [Provider::Flaky, Provider::Slow] {
        assert_eq!(providers.stats_of(other).requests, 0);
    }
}

/// Send `n` sequential requests; return how many got a 503.
async fn count_503(client: &mut HttpClient, n: usize, provider: &str) -> usize {
    let mut failures = 0;
    for _ in 0..n {
        let resp = client.get("/api/chat").await.unwrap();
        assert_eq!(resp.headers[PROVIDER_HEADER], provider);
        match resp.status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
                assert_eq!(body["error"]["type"], "overloaded");
                failures += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    failures
}

#[tokio::test]
async fn flaky_fails_about_30_percent_with_a_seed_and_all_when_down() {
    const N: usize = 400;
    let providers = Providers::start(7).await.unwrap();
    providers.set_latency(Provider::Flaky, Duration::ZERO, Duration::ZERO);
    let mut client = HttpClient::new(providers.addr(Provider::Flaky));

    let failures = count_503(&mut client, N, "flaky").await;
    let fraction = failures as f64 / N as f64;
    assert!(
        (0.2..=0.4).contains(&fraction),
        "failure fraction {fraction}"
    );
    let stats = providers.stats_of(Provider::Flaky);
    assert_eq!(stats.requests, N as u64);
    assert_eq!(stats.errors, failures as u64);

    // Same seed, same request order: the same answers.
    let again = Providers::start(7).await.unwrap();
    again.set_latency(Provider::Flaky, Duration::ZERO, Duration::ZERO);
    let mut client2 = HttpClient::new(again.addr(Provider::Flaky));
    assert_eq!(count_503(&mut client2, N, "flaky").await, failures);

    // Fully down: every call fails, /health still answers.
    providers.take_down(Provider::Flaky);
    assert!(providers.is_down(Provider::Flaky));
    assert_eq!(count_503(&mut client, 50, "flaky").await, 50);
    assert_eq!(client.get("/health").await.unwrap().status, StatusCode::OK);

    // Back up: failures return to a fraction.
    providers.bring_up(Provider::Flaky);
    let back = count_503(&mut client, N, "flaky").await;
    assert!(back < N && back > 0, "{back} of {N} after bring_up");

    providers.set_failure_rate(Provider::Flaky, 0.0);
    assert_eq!(count_503(&mut client, 50, "flaky").await, 0);
    providers.set_failure_rate(Provider::Healthy, 1.0);
    let mut healthy = HttpClient::new(providers.addr(Provider::Healthy));
    assert_eq!(count_503(&mut healthy, 20, "healthy").await, 20);

    let stats = providers.stats_of(Provider::Flaky);
    assert_eq!(stats.requests, (N + 50 + N + 50) as u64);
    assert_eq!(stats.errors, (failures + 50 + back) as u64);
}

#[tokio::test]
async fn slow_takes_at_least_its_minimum_latency() {
    let providers = Providers::start(3).await.unwrap();
    let mut client = HttpClient::new(providers.addr(Provider::Slow));
    for _ in 0..2 {
        let started = Instant::now();
        let resp = client.get("/slow/report").await.unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.headers[PROVIDER_HEADER], "slow");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
    // A changed latency takes effect while running.
    providers.set_latency(
        Provider::Slow,
        Duration::from_millis(50),
        Duration::from_millis(60),
    );
    let started = Instant::now();
    client.get("/slow/report").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(providers.stats_of(Provider::Slow).requests, 3);
    assert_eq!(providers.stats_of(Provider::Slow).errors, 0);
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[*key],
    })
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string: {:?}", get(v, path)))
}

#[tokio::test]
async fn config_yaml_parses_and_names_the_providers() {
    let providers = Providers::start(1).await.unwrap();
    let listen = "127.0.0.1:18080".parse().unwrap();
    let admin = "127.0.0.1:19901".parse().unwrap();
    // A state directory with characters YAML cares about still comes out as one string.
    let dir = Path::new("/tmp/demo: a #dir, 'quoted'");
    let yaml = config_yaml(&providers, listen, admin, dir);
    let v: Value = serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));

    assert_eq!(str_at(&v, &["listen"]), "127.0.0.1:18080");
    assert_eq!(str_at(&v, &["admin", "listen"]), "127.0.0.1:19901");
    assert_eq!(
        str_at(&v, &["store", "path"]),
        dir.join("bulwark-demo.db").to_str().unwrap()
    );
    for p in Provider::ALL {
        assert_eq!(
            str_at(&v, &["upstreams", p.name(), "endpoints", "0", "url"]),
            providers.url(p)
        );
        assert!(yaml.contains(&providers.addr(p).to_string()));
    }
    let cb = get(&v, &["upstreams", "flaky", "circuit_breaker"]);
    assert_eq!(str_at(cb, &["window", "kind"]), "count");
    assert_eq!(cb["window"]["size"].as_u64(), Some(40));
    assert_eq!(cb["minimum_calls"].as_u64(), Some(20));
    assert_eq!(cb["failure_rate_threshold"].as_u64(), Some(70));
    assert_eq!(str_at(cb, &["open_duration"]), "5s");
    assert_eq!(cb["half_open_calls"].as_u64(), Some(3));

    let api = get(&v, &["routes", "0"]);
    assert_eq!(str_at(api, &["match", "path_prefix"]), "/api/");
    assert_eq!(str_at(api, &["upstream"]), "flaky");
    assert_eq!(str_at(api, &["failover", "0"]), "healthy");
    assert_eq!(api["retry"]["attempts"].as_u64(), Some(3));
    assert_eq!(str_at(api, &["retry", "backoff", "kind"]), "exponential");
    let on: Vec<&str> = api["retry"]["on"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(on, ["5xx", "connect_failure", "reset", "timeout"]);
    assert!(api["retry"]["budget"]["ratio"].as_f64().is_some());
    assert!(api["timeout"].as_str().is_some());

    let slow = get(&v, &["routes", "1"]);
    assert_eq!(str_at(slow, &["match", "path_prefix"]), "/slow/");
    assert_eq!(str_at(slow, &["upstream"]), "slow");
    assert_eq!(str_at(slow, &["timeout"]), "1s");
    let fallback_body = str_at(slow, &["fallback", "body"]);
    serde_json::from_str::<serde_json::Value>(fallback_body).unwrap();
}

async fn run_load(
    target: std::net::SocketAddr,
    duration: Duration,
    slow_share: f64,
) -> LoadSnapshot {
    let stats = Arc::new(LoadStats::new());
    let config = LoadConfig {
        target,
        duration,
        concurrency: 4,
        slow_share,
        seed: 11,
    };
    let started = Instant::now();
    let snap = tokio::time::timeout(HANG_GUARD, load::run(config, Arc::clone(&stats)))
        .await
        .expect("the load loop stops by itself");
    assert!(
        started.elapsed() >= duration,
        "ran for at least its duration"
    );
    assert_eq!(snap, stats.snapshot(), "nothing counted after run returned");
    snap
}

#[tokio::test]
async fn load_against_a_provider_counts_add_up_and_stop() {
    let providers = Providers::start(5).await.unwrap();
    providers.set_latency(Provider::Flaky, Duration::ZERO, Duration::from_millis(1));

    let snap = run_load(
        providers.addr(Provider::Flaky),
        Duration::from_millis(400),
        0.2,
    )
    .await;
    assert!(snap.requests > 0);
    assert_eq!(snap.no_response, 0);
    assert_eq!(snap.requests, snap.ok + snap.non_2xx);
    assert_eq!(snap.client_errors(), snap.non_2xx);
    // Every response was tagged by flaky, and flaky counted exactly what the clients received.
    assert_eq!(snap.served_by(Provider::Flaky), snap.requests);
    assert_eq!(snap.served_by_unknown, 0);
    let flaky = providers.stats_of(Provider::Flaky);
    assert_eq!(flaky.requests, snap.requests);
    assert_eq!(flaky.errors, snap.non_2xx);
    // Straight to a provider: no gateway, so no x-bulwark-reason and no failover.
    assert_eq!(snap.failovers, 0);
    assert!(snap.reasons_seen().is_empty());

    // Taken down: every response is a non-2xx the clients count, and the provider agrees.
    providers.take_down(Provider::Flaky);
    let before = providers.stats_of(Provider::Flaky);
    let down = run_load(
        providers.addr(Provider::Flaky),
        Duration::from_millis(200),
        0.0,
    )
    .await;
    assert!(down.requests > 0);
    assert_eq!(down.non_2xx, down.requests);
    assert_eq!(down.client_errors(), down.requests);
    let after = providers.stats_of(Provider::Flaky);
    assert_eq!(after.errors - before.errors, down.requests);
}

#[tokio::test]
async fn load_counts_failovers_and_errors_for_unreachable_targets() {
    let providers = Providers::start(5).await.unwrap();
    providers.set_latency(Provider::Healthy, Duration::ZERO, Duration::from_millis(1));
    // `/api/` answered by healthy is what a failover looks like through the gateway.
    let snap = run_load(
        providers.addr(Provider::Healthy),
        Duration::from_millis(300),
        0.0,
    )
    .await;
    assert_eq!(snap.failovers, snap.requests);
    assert_eq!(snap.ok, snap.requests);

    // Nothing listens: every request is a client-visible error with no response, and it still stops.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let snap = run_load(free, Duration::from_millis(200), 0.0).await;
    assert!(snap.requests > 0);
    assert_eq!(snap.no_response, snap.requests);
    assert_eq!(snap.client_errors(), snap.requests);
}

#[test]
fn percentile_is_nearest_rank() {
    let mut v: Vec<u32> = (1..=100).rev().collect();
    assert_eq!(
        load::percentile(&mut v, 50.0),
        Some(Duration::from_micros(50))
    );
    assert_eq!(
        load::percentile(&mut v, 99.0),
        Some(Duration::from_micros(99))
    );
    assert_eq!(
        load::percentile(&mut v, 100.0),
        Some(Duration::from_micros(100))
    );
    assert_eq!(load::percentile(&mut [], 50.0), None);
}

fn sample_snapshot(breakers: Option<BTreeMap<String, String>>) -> Snapshot {
    let mut reasons = [0; load::REASONS.len()];
    reasons[0] = 40; // circuit_open
    reasons[7] = 120; // fallback
    Snapshot {
        elapsed: Duration::from_millis(12_400),
        total: Duration::from_secs(30),
        phase: Phase::FlakyDown,
        load: LoadSnapshot {
            requests: 12_345,
            ok: 12_342,
            non_2xx: 2,
            no_response: 1,
            served_by: [7_900, 4_000, 445],
            served_by_unknown: 0,
            failovers: 3_210,
            reasons,
            reasons_other: 0,
        },
        window: Window {
            rate: 412.0,
            client_errors: 1,
            p50: Some(Duration::from_micros(14_200)),
            p99: Some(Duration::from_millis(230)),
        },
        providers: vec![
            ProviderStats {
                provider: Provider::Healthy,
                requests: 7_900,
                errors: 0,
            },
            ProviderStats {
                provider: Provider::Flaky,
                requests: 5_678,
                errors: 1_234,
            },
            ProviderStats {
                provider: Provider::Slow,
                requests: 445,
                errors: 0,
            },
        ],
        breakers,
    }
}

#[test]
fn render_shows_every_field() {
    let breakers = BTreeMap::from([
        ("flaky".to_owned(), "open".to_owned()),
        ("healthy".to_owned(), "closed".to_owned()),
    ]);
    let frame = display::render(&sample_snapshot(Some(breakers)), false);
    for expected in [
        "12.4s / 30.0s",
        "phase 2/3",
        "12,345 total",
        "412/s",
        "p50 14ms",
        "p99 230ms",
        "clients saw  3 errors in 12,345 requests (0.02%)",
        "providers    returned 1,234 errors in 14,023 calls (8.8%)",
        "flaky OPEN",
        "healthy closed",
        "slow ?",
        "failovers    3,210 /api/",
        "circuit_open 40",
        "fallback 120",
    ] {
        assert!(frame.contains(expected), "missing {expected:?} in\n{frame}");
    }
    assert!(!frame.contains('\x1b'), "no escapes without colour");
    assert!(
        frame.lines().all(|l| l.chars().count() < 100),
        "fits a terminal:\n{frame}"
    );

    let colored = display::render(&sample_snapshot(None), true);
    assert!(colored.contains("\x1b["));
    let plain = display::render(&sample_snapshot(None), false);
    for u in ["flaky ?", "healthy ?", "slow ?"] {
        assert!(plain.contains(u), "unreachable admin API shows ?: {plain}");
    }
}

#[test]
fn render_wraps_many_reasons_within_the_width() {
    let mut snap = sample_snapshot(None);
    snap.load.reasons = [1_234_567; load::REASONS.len()];
    snap.load.reasons_other = 5;
    // And the `served by` line of a long run (it went to 87 columns; found by a review).
    snap.load.served_by = [1_234_567; 3];
    snap.load.served_by_unknown = 1_234_567;
    let frame = display::render(&snap, false);
    assert!(
        frame
            .lines()
            .all(|l| l.chars().count() <= display::MAX_WIDTH),
        "{frame}"
    );
    for reason in load::REASONS.iter().chain(&["other"]) {
        assert!(
            frame.contains(&format!("{reason} ")),
            "{reason} in\n{frame}"
        );
    }
}

#[test]
fn render_line_is_one_plain_line() {
    let breakers = BTreeMap::from([("flaky".to_owned(), "half_open".to_owned())]);
    let line = display::render_line(&sample_snapshot(Some(breakers)));
    assert_eq!(line.lines().count(), 1);
    assert!(!line.contains('\x1b'));
    for expected in [
        "12.4s / 30.0s",
        "phase 2",
        "12345 req (412/s)",
        "client errors 3",
        "provider errors 1234/14023",
        "flaky=half_open healthy=? slow=?",
        "failovers 3210",
    ] {
        assert!(line.contains(expected), "missing {expected:?} in {line}");
    }
}

#[test]
fn summary_shows_totals_and_transitions() {
    let snap = sample_snapshot(None);
    let summary = DemoSummary {
        elapsed: Duration::from_secs(30),
        interrupted: false,
        signal: None,
        load: snap.load.clone(),
        p50: Some(Duration::from_millis(12)),
        p99: Some(Duration::from_millis(480)),
        providers: snap.providers.clone(),
        phases: vec![
            PhaseTotals {
                phase: Phase::Normal,
                requests: 4_000,
                client_errors: 1,
                failovers: 10,
                provider_calls: 5_000,
                provider_errors: 1_500,
            },
            PhaseTotals {
                phase: Phase::FlakyDown,
                requests: 8_345,
                client_errors: 2,
                failovers: 3_200,
                provider_calls: 9_023,
                provider_errors: 2_734,
            },
        ],
        breaker_transitions: vec![TransitionCount {
            upstream: "flaky".into(),
            from: "closed".into(),
            to: "open".into(),
            count: 2,
        }],
        transitions_from_metrics: true,
        gateway_url: "http://127.0.0.1:8080".into(),
        admin_url: "http://127.0.0.1:9901".into(),
    };
    assert_eq!(summary.client_errors(), 3);
    assert_eq!(summary.provider_requests(), 14_023);
    assert_eq!(summary.provider_errors(), 1_234);
    let text = display::render_summary(&summary, false);
    for expected in [
        "12,345 requests in 30.0s (412/s)",
        "clients saw        3 errors (0.02%)",
        "p99 480ms",
        "providers returned 1,234 errors in 14,023 calls",
        "flaky        5,678 calls",
        "failovers          3,210",
        "closed -> open x2",
        "1 normal",
        "2 flaky down",
        "2,734 / 9,023",
        "from /metrics",
        "http://127.0.0.1:9901",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[test]
fn phase_totals_are_differences() {
    let before = LoadSnapshot {
        requests: 10,
        ok: 8,
        non_2xx: 1,
        no_response: 1,
        failovers: 2,
        ..Default::default()
    };
    let after = LoadSnapshot {
        requests: 30,
        ok: 25,
        non_2xx: 3,
        no_response: 2,
        failovers: 7,
        ..Default::default()
    };
    let p = |requests, errors| {
        vec![
            ProviderStats {
                provider: Provider::Flaky,
                requests,
                errors,
            },
            ProviderStats {
                provider: Provider::Healthy,
                requests: requests / 2,
                errors: 0,
            },
        ]
    };
    let t = PhaseTotals::between(Phase::FlakyDown, (&before, &p(10, 3)), (&after, &p(50, 23)));
    assert_eq!(
        t,
        PhaseTotals {
            phase: Phase::FlakyDown,
            requests: 20,
            client_errors: 3,
            failovers: 5,
            provider_calls: 60,
            provider_errors: 20,
        }
    );
}

#[test]
fn header_prints_the_admin_url() {
    let text = display::render_header(
        "http://127.0.0.1:8080",
        "http://127.0.0.1:9901",
        Path::new("/tmp/x.yaml"),
        Duration::from_secs(30),
    );
    assert!(text.contains("http://127.0.0.1:9901/health"));
    assert!(text.contains("http://127.0.0.1:9901/api/circuit-breakers"));
    assert!(text.contains("http://127.0.0.1:9901/dashboard"));
    assert!(text.contains("/tmp/x.yaml"));
}

#[test]
fn number_formatting() {
    assert_eq!(display::count(0), "0");
    assert_eq!(display::count(999), "999");
    assert_eq!(display::count(1_000), "1,000");
    assert_eq!(display::count(1_234_567), "1,234,567");
    assert_eq!(display::percent(0, 10), "0%");
    assert_eq!(display::percent(1, 0), "0%");
    assert_eq!(display::percent(1, 3), "33%");
    assert_eq!(display::percent(3, 200), "1.5%");
    assert_eq!(
        display::latency(Some(Duration::from_micros(4_200))),
        "4.2ms"
    );
    assert_eq!(
        display::latency(Some(Duration::from_millis(1_250))),
        "1.25s"
    );
    assert_eq!(display::latency(None), "-");
}

/// The number after `prefix` in `text` (digits with thousands separators), e.g. `count_after(s,
/// "clients saw")` on `clients saw        1,234 errors`.
fn count_after(text: &str, prefix: &str) -> u64 {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in\n{text}"));
    let digits: String = text[at + prefix.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in\n{text}"))
}

/// The first `http://...` word on the line starting (after spaces) with `label`.
fn url_on(text: &str, label: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in\n{text}"));
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL on {line:?}"))
        .to_owned()
}

/// `bulwark demo` as a user runs it, output piped (not a terminal): a line a second, then the summary,
/// exit 0, and nothing left behind.
#[tokio::test]
async fn the_demo_binary_runs_to_its_summary_and_exits_0() {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["demo", "--duration", "3s"])
        .env_remove("BULWARK_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(HANG_GUARD, child.wait_with_output())
        .await
        .expect("the demo did not finish within 60 s")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let text = &stdout;
    assert!(!text.contains('\x1b'), "escapes on a pipe:\n{text}");

    // The header names where everything is, the admin API first of all.
    let gateway = url_on(text, "gateway ");
    let admin_health = url_on(text, "admin API");
    let admin = admin_health
        .strip_suffix("/health")
        .unwrap_or_else(|| panic!("{admin_health}"))
        .to_owned();
    assert!(admin.starts_with("http://127.0.0.1:"), "{admin}");
    assert!(
        text.contains(&format!("{admin}/api/circuit-breakers")),
        "{text}"
    );
    let config = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("config"))
        .unwrap_or_else(|| panic!("no config line in\n{text}"))
        .trim()
        .to_owned();

    // Not a terminal: progress comes as plain lines.
    assert!(
        text.lines()
            .any(|l| l.starts_with('[') && l.contains("phase 1") && l.contains("req (")),
        "{text}"
    );

    // The summary: totals for the whole run, per provider, per phase, failovers and breakers.
    assert!(text.contains("bulwark demo summary: "), "{text}");
    assert!(!text.contains("(interrupted)"), "{text}");
    let requests = count_after(text, "bulwark demo summary:");
    assert!(requests > 0, "{text}");
    assert!(
        text.contains(" requests in 3.0s ("),
        "ran for its duration:\n{text}"
    );
    let client_errors = count_after(text, "clients saw");
    let provider_errors = count_after(text, "providers returned");
    let providers_line = text
        .lines()
        .find(|l| l.contains("providers returned"))
        .unwrap();
    assert!(count_after(providers_line, "errors in") > 0, "{text}");
    // The demo's point: the gateway hides most provider errors from the clients.
    assert!(
        client_errors < provider_errors,
        "clients saw {client_errors} errors, providers returned {provider_errors}:\n{text}"
    );
    for provider in ["healthy", "flaky", "slow"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(provider)
                && l.contains(" calls ")
                && l.trim_end().ends_with("errors")),
            "no line for {provider} in\n{text}"
        );
    }
    assert!(text.contains("by phase"), "{text}");
    assert!(text.contains("1 normal"), "{text}");
    assert!(text.contains("2 flaky down"), "{text}");
    assert!(count_after(text, "\n  failovers  ") > 0, "{text}");
    assert!(
        text.contains("  breaker flaky ") || text.contains("  breakers           no transitions"),
        "no breaker line in\n{text}"
    );
    let last = text.lines().last().unwrap_or_default();
    assert!(last.trim_start().starts_with("gateway was"), "{text}");
    assert_eq!(url_on(last, "gateway was"), gateway);
    assert!(
        last.trim_end().ends_with(&format!("admin API {admin}")),
        "{last}"
    );

    // Its temporary config (and the directory with the store) is gone.
    assert!(
        !Path::new(&config).exists(),
        "{config} left behind after the demo"
    );
}
