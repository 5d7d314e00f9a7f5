//! Health: thresholds and timeouts of the background checker (paused time), the
//! aggregate by criticality, TCP checks against real sockets, system checks.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::health::{
    check_fn, CheckResult, Criticality, HealthCheck, HealthChecker, HealthRegistry, HealthStatus,
    SystemCheck, TcpCheck, PENDING_DETAIL,
};
use bulwark::Event;
use tokio::time::{sleep, sleep_until, Instant};

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// A check whose answer the test switches, counting how often it ran.
#[derive(Clone, Default)]
struct Switch {
    down: Arc<AtomicBool>,
    runs: Arc<AtomicU32>,
}

impl Switch {
    fn check(&self, name: &str) -> impl HealthCheck + 'static {
        let s = self.clone();
        check_fn(name, move || {
            s.runs.fetch_add(1, Ordering::SeqCst);
            let down = s.down.load(Ordering::SeqCst);
            async move {
                if down {
                    CheckResult::unhealthy("refused")
                } else {
                    CheckResult::healthy()
                }
            }
        })
    }
    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

type Changes = Arc<Mutex<Vec<(String, &'static str)>>>;

fn changes() -> (Changes, impl Fn(&Event) + Send + Sync + 'static) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (seen, move |e: &Event| {
        if let Event::HealthChanged { name, status } = e {
            s.lock().unwrap().push((name.to_string(), *status));
        }
    })
}

#[tokio::test(start_paused = true)]
async fn thresholds_count_exact_consecutive_results() {
    let sw = Switch::default();
    let mut registry = HealthRegistry::new();
    registry
        .register(sw.check("db"), Criticality::Critical)
        .unwrap();
    let (seen, listener) = changes();
    let t0 = Instant::now();
    let checker = HealthChecker::builder(registry)
        .interval(10 * SEC)
        .unhealthy_threshold(3)
        .healthy_threshold(2)
        .listener(listener)
        .build()
        .unwrap();
    // Before the first round: pending, reported unhealthy.
    assert_eq!(checker.status(), HealthStatus::Unhealthy);
    assert_eq!(
        checker.report().components[0].detail.as_deref(),
        Some(PENDING_DETAIL)
    );
    let mut rx = checker.subscribe();

    // Round 1 at t=0: the first pass counts at once.
    sleep_until(t0 + MS).await;
    assert_eq!(sw.runs(), 1);
    assert_eq!(checker.status(), HealthStatus::Healthy);
    assert!(rx.has_changed().unwrap());
    rx.mark_unchanged();

    // Three failures in a row: healthy after the 1st and 2nd, unhealthy at the 3rd.
    sw.set_down(true);
    for (round, expected) in [
        (1, HealthStatus::Healthy),
        (2, HealthStatus::Healthy),
        (3, HealthStatus::Unhealthy),
    ] {
        sleep_until(t0 + round * 10 * SEC + MS).await;
        assert_eq!(checker.status(), expected, "after failure {round}");
    }
    assert_eq!(sw.runs(), 4);
    let report = checker.report();
    assert_eq!(report.components[0].detail.as_deref(), Some("refused"));
    assert!(rx.has_changed().unwrap());
    rx.mark_unchanged();

    // Two passes in a row to come back.
    sw.set_down(false);
    sleep_until(t0 + 40 * SEC + MS).await;
    assert_eq!(checker.status(), HealthStatus::Unhealthy, "after pass 1");
    assert!(!rx.has_changed().unwrap(), "no status change, no wake-up");
    sleep_until(t0 + 50 * SEC + MS).await;
    assert_eq!(checker.status(), HealthStatus::Healthy, "after pass 2");
    assert!(rx.has_changed().unwrap());

    assert_eq!(
        *seen.lock().unwrap(),
        [
            ("db".to_string(), "healthy"),
            ("db".to_string(), "unhealthy"),
            ("db".to_string(), "healthy"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_failure_run_starts_over() {
    let sw = Switch::default();
    let mut registry = HealthRegistry::new();
    registry
        .register(sw.check("db"), Criticality::Critical)
        .unwrap();
    let t0 = Instant::now();
    let checker = HealthChecker::builder(registry)
        .interval(SEC)
        .unhealthy_threshold(2)
        .build()
        .unwrap();
    // t=0 pass, t=1 fail, t=2 pass, t=3 fail, t=4 fail.
    for (round, down) in [(1, true), (2, false), (3, true), (4, true)] {
        sleep_until(t0 + (round - 1) * SEC + MS).await;
        sw.set_down(down);
    }
    sleep_until(t0 + 3 * SEC + MS).await;
    assert_eq!(checker.status(), HealthStatus::Healthy);
    sleep_until(t0 + 4 * SEC + MS).await;
    assert_eq!(checker.status(), HealthStatus::Unhealthy);
}

#[tokio::test(start_paused = true)]
async fn a_check_timeout_counts_as_a_failure() {
    let slow = Arc::new(AtomicBool::new(false));
    let s = slow.clone();
    let mut registry = HealthRegistry::new();
    registry
        .register(
            check_fn("search", move || {
                let slow = s.load(Ordering::SeqCst);
                async move {
                    if slow {
                        sleep(60 * SEC).await;
                    }
                    CheckResult::healthy()
                }
            }),
            Criticality::Critical,
        )
        .unwrap();
    let t0 = Instant::now();
    let checker = HealthChecker::builder(registry)
        .interval(10 * SEC)
        .timeout(SEC)
        .unhealthy_threshold(2)
        .build()
        .unwrap();
    sleep_until(t0 + MS).await;
    assert_eq!(checker.status(), HealthStatus::Healthy);
    slow.store(true, Ordering::SeqCst);
    // Round at 10s times out at 11s: one failure.
    sleep_until(t0 + 11 * SEC + MS).await;
    assert_eq!(checker.status(), HealthStatus::Healthy);
    let detail = checker.report().components[0].detail.clone().unwrap();
    assert!(detail.contains("timed out after 1s"), "{detail}");
    // Round at 20s times out at 21s: the second, unhealthy. Not a moment earlier.
    sleep_until(t0 + 21 * SEC - MS).await;
    assert_eq!(checker.status(), HealthStatus::Healthy);
    sleep_until(t0 + 21 * SEC + MS).await;
    assert_eq!(checker.status(), HealthStatus::Unhealthy);
}

#[tokio::test(start_paused = true)]
async fn checker_aggregates_by_criticality_and_stops_when_dropped() {
    let (db, cache) = (Switch::default(), Switch::default());
    let mut registry = HealthRegistry::new();
    registry
        .register(db.check("db"), Criticality::Critical)
        .unwrap()
        .register(cache.check("cache"), Criticality::NonCritical)
        .unwrap();
    let t0 = Instant::now();
    let checker = HealthChecker::builder(registry)
        .interval(SEC)
        .unhealthy_threshold(1)
        .healthy_threshold(1)
        .build()
        .unwrap();
    sleep_until(t0 + MS).await;
    assert_eq!(checker.status(), HealthStatus::Healthy);

    cache.set_down(true);
    sleep_until(t0 + SEC + MS).await;
    let report = checker.report();
    assert_eq!(report.status, HealthStatus::Degraded);
    assert_eq!(
        report.component("cache").unwrap().status,
        HealthStatus::Unhealthy
    );
    assert!(report
        .to_json()
        .starts_with(r#"{"status":"degraded","components":[{"name":"db","status":"healthy""#));

    db.set_down(true);
    sleep_until(t0 + 2 * SEC + MS).await;
    assert_eq!(checker.status(), HealthStatus::Unhealthy);

    // Dropping the checker stops the task: no more runs, and subscribers see it.
    let mut rx = checker.subscribe();
    let runs = db.runs();
    drop(checker);
    sleep_until(t0 + 10 * SEC).await;
    assert_eq!(db.runs(), runs);
    assert!(rx.changed().await.is_err(), "sender gone with the task");
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_the_task() {
    let sw = Switch::default();
    let mut registry = HealthRegistry::new();
    registry
        .register(sw.check("db"), Criticality::Critical)
        .unwrap();
    let checker = HealthChecker::builder(registry)
        .interval(SEC)
        .build()
        .unwrap();
    let rx = checker.subscribe();
    sleep(MS).await;
    checker.shutdown().await;
    assert!(
        rx.has_changed().is_err(),
        "task ended before shutdown returned"
    );
}

#[tokio::test]
async fn registry_check_all_aggregates_and_times_out() {
    let mut registry = HealthRegistry::new();
    registry
        .register(
            check_fn("db", || async { CheckResult::healthy() }),
            Criticality::Critical,
        )
        .unwrap()
        .register(
            check_fn("cache", || async { CheckResult::unhealthy("down") }),
            Criticality::NonCritical,
        )
        .unwrap();
    let report = registry.check_all().await;
    assert_eq!(report.status, HealthStatus::Degraded);
    assert_eq!(report.components.len(), 2);
    assert_eq!(report.components[1].detail.as_deref(), Some("down"));

    registry
        .register(
            check_fn("queue", || async { CheckResult::degraded("backlog") }),
            Criticality::Critical,
        )
        .unwrap();
    assert_eq!(registry.check_all().await.status, HealthStatus::Degraded);

    registry
        .register(
            check_fn("auth", || async { CheckResult::unhealthy("503") }),
            Criticality::Critical,
        )
        .unwrap();
    assert_eq!(registry.check_all().await.status, HealthStatus::Unhealthy);

    // Names must be unique and not empty.
    let dup = registry.register(
        check_fn("db", || async { CheckResult::healthy() }),
        Criticality::Critical,
    );
    assert_eq!(dup.unwrap_err().field(), "register");
    let empty = registry.register(
        check_fn("", || async { CheckResult::healthy() }),
        Criticality::Critical,
    );
    assert!(empty.is_err());
}

#[tokio::test(start_paused = true)]
async fn registry_check_all_within_counts_a_hang_as_unhealthy() {
    let mut registry = HealthRegistry::new();
    registry
        .register(
            check_fn("hangs", std::future::pending::<CheckResult>),
            Criticality::Critical,
        )
        .unwrap();
    let t0 = Instant::now();
    let report = registry.check_all_within(2 * SEC).await;
    assert_eq!(t0.elapsed(), 2 * SEC);
    assert_eq!(report.status, HealthStatus::Unhealthy);
}

#[test]
fn checker_builder_validates() {
    let field = |b: bulwark::health::HealthCheckerBuilder| b.build().unwrap_err().field();
    let r = HealthRegistry::new;
    // Outside a runtime: an error, not a panic.
    assert_eq!(field(HealthChecker::builder(r())), "build");
    assert_eq!(
        field(HealthChecker::builder(r()).interval(Duration::ZERO)),
        "interval"
    );
    assert_eq!(
        field(HealthChecker::builder(r()).timeout(Duration::ZERO)),
        "timeout"
    );
    assert_eq!(
        field(HealthChecker::builder(r()).unhealthy_threshold(0)),
        "unhealthy_threshold"
    );
    assert_eq!(
        field(HealthChecker::builder(r()).healthy_threshold(0)),
        "healthy_threshold"
    );
}

// Real sockets on 127.0.0.1, real time: nothing here waits on the clock, and paused
// time would fire the connect timeout while the runtime waits for I/O.
#[tokio::test]
async fn tcp_check_against_a_listener_and_a_closed_port() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap();
    let check = TcpCheck::new("upstream", open.to_string()).timeout(5 * SEC);
    assert_eq!(check.name(), "upstream");
    let r = check.check().await;
    assert_eq!(r.status, HealthStatus::Healthy, "{:?}", r.detail);

    // A port that was just bound and released: nothing listens there.
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let r = TcpCheck::new("gone", closed.to_string())
        .timeout(5 * SEC)
        .check()
        .await;
    assert_eq!(r.status, HealthStatus::Unhealthy);
    let detail = r.detail.unwrap();
    assert!(
        detail.starts_with(&format!("connect to {closed}:")),
        "{detail}"
    );
    drop(listener);
}

#[tokio::test]
async fn system_check_that_must_pass() {
    let check = SystemCheck::builder()
        .load_per_core(1e9, 1e9)
        .memory_available_percent(0.0, 0.0)
        .disk_free_percent("/", 0.0, 0.0)
        .build()
        .unwrap();
    let r = check.check().await;
    assert_eq!(r.status, HealthStatus::Healthy, "{:?}", r.detail);
    assert_eq!(check.name(), "system");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn system_check_that_must_fail() {
    // Available memory is always below 100% of the total.
    let check = SystemCheck::builder()
        .name("host")
        .skip_load()
        .memory_available_percent(100.0, 100.0)
        .build()
        .unwrap();
    let r = check.check().await;
    assert_eq!(r.status, HealthStatus::Unhealthy, "{:?}", r.detail);
    assert!(r.detail.unwrap().contains("memory available"));

    // Degraded level crossed, unhealthy not: degraded.
    let check = SystemCheck::builder()
        .skip_load()
        .memory_available_percent(100.0, 0.0)
        .build()
        .unwrap();
    assert_eq!(check.check().await.status, HealthStatus::Degraded);

    // A path that does not exist cannot be measured: degraded, with the reason.
    let check = SystemCheck::builder()
        .skip_load()
        .skip_memory()
        .disk_free_percent("/definitely/not/here", 10.0, 5.0)
        .build()
        .unwrap();
    let r = check.check().await;
    assert_eq!(r.status, HealthStatus::Degraded);
    assert!(r.detail.unwrap().contains("unreadable"));
}

#[test]
fn types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<HealthChecker>();
    assert_send_sync::<HealthRegistry>();
    assert_send_sync::<TcpCheck>();
    assert_send_sync::<SystemCheck>();
}

/// Two probes at the same moment (a readiness and a liveness probe; the background checker and
/// an on-demand `check_all`) on a healthy machine are both healthy: the second shares the
/// running `SystemCheck` measurement (review df6: it was answered unhealthy, "the previous
/// measurement has not finished").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_of_a_healthy_machine_are_healthy() {
    let check = SystemCheck::builder()
        .load_per_core(1e9, 1e9)
        .memory_available_percent(0.0, 0.0)
        .build()
        .unwrap();
    let mut registry = HealthRegistry::new();
    registry.register(check, Criticality::Critical).unwrap();
    for _ in 0..10 {
        let (a, b) = tokio::join!(registry.check_all(), registry.check_all());
        for r in [a, b] {
            assert_eq!(r.status, HealthStatus::Healthy, "{r:?}");
        }
    }
}

/// A check polled outside a Tokio runtime answers degraded, and does not leave a broken
/// measurement behind: a later check inside a runtime measures (review df7: the first poll
/// panicked in `spawn_blocking` and every later check re-raised that panic).
#[test]
fn a_check_outside_a_runtime_does_not_break_later_checks() {
    let check = SystemCheck::builder()
        .load_per_core(1e9, 1e9)
        .memory_available_percent(0.0, 0.0)
        .build()
        .unwrap();
    let outside = futures_util::FutureExt::now_or_never(check.check()).expect("answers at once");
    assert_eq!(outside.status, HealthStatus::Degraded, "{outside:?}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let later = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), check.check())
            .await
            .expect("the check ends")
    });
    assert_eq!(later.status, HealthStatus::Healthy, "{later:?}");
}
