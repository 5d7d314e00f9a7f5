//! Upstream- and route-level resilience against real upstreams: the breaker opening and recovering,
//! the retry budget capping load on a dead upstream, hedging (and its budget), deadline-aware retries.
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulwark::events::BreakerState;
use support::*;

/// An upstream answering 500 until `healed`, 200 after.
async fn healable(name: &str, healed: Arc<AtomicBool>) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |_req| {
            let (n, healed) = (n.clone(), healed.clone());
            Box::pin(async move {
                if healed.load(Ordering::SeqCst) {
                    reply(&n, 200, "ok")
                } else {
                    reply(&n, 500, "broken")
                }
            })
        }),
    )
    .await
}

#[tokio::test]
async fn breaker_opens_stops_upstream_load_and_recovers_through_half_open() {
    let healed = Arc::new(AtomicBool::new(false));
    let up = healable("u", healed.clone()).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    circuit_breaker:
      window: {{ kind: count, size: 10 }}
      minimum_calls: 5
      failure_rate_threshold: 50
      open_duration: 200ms
      half_open_calls: 1
routes:
  - upstream: u
",
        up.url()
    ))
    .await;
    let c = client();
    let url = gw.url("/");
    let breaker = || {
        gw.state
            .runtime()
            .upstream("u")
            .unwrap()
            .policies
            .breaker()
            .unwrap()
            .state()
    };
    for _ in 0..5 {
        assert_eq!(get(&c, &url).await.status, 500);
    }
    assert_eq!(up.hits(), 5);
    assert_eq!(breaker(), BreakerState::Open);
    for _ in 0..20 {
        let r = get(&c, &url).await;
        if breaker() != BreakerState::Open {
            break; // open_duration elapsed on a slow machine: the next call is a probe
        }
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-bulwark-reason"), Some("circuit_open"));
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(up.hits(), 5, "no request reached the upstream while open");

    // Still broken: the half-open probe fails and the breaker opens again.
    wait_for(10, || async {
        get(&c, &url).await;
        up.hits() > 5
    })
    .await;
    assert_eq!(up.hits(), 6, "exactly one probe in half-open");
    assert_eq!(breaker(), BreakerState::Open);

    // Healed: the next probe succeeds and closes it.
    healed.store(true, Ordering::SeqCst);
    wait_for(10, || async { get(&c, &url).await.status == 200 }).await;
    assert_eq!(breaker(), BreakerState::Closed);
    for _ in 0..5 {
        assert_eq!(get(&c, &url).await.status, 200);
    }
    gw.stop().await;
}

#[tokio::test]
async fn retry_budget_caps_load_on_a_dead_upstream() {
    let dead = Upstream::status("dead", 503).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
    retry:
      attempts: 3
      on: [5xx]
      backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }}
      budget: {{ ratio: 0.2, min_per_second: 1, window: 10s }}
",
        dead.url()
    ))
    .await;
    let c = client();
    const N: usize = 50;
    let mut exhausted = 0;
    for _ in 0..N {
        let r = get(&c, &gw.url("/")).await;
        assert_eq!(r.status, 503);
        if r.header("x-bulwark-reason") == Some("budget_exhausted") {
            exhausted += 1;
        }
    }
    // Finagle's arithmetic: retries <= floor(min_per_second x window + ratio x requests)
    // = floor(1 x 10 + 0.2 x 50) = 20, all within one window; every token is used because each
    // request may retry twice. Without the budget it would be 3 x 50 = 150.
    assert_eq!(dead.hits(), N + 20);
    assert!(exhausted > 0);
    gw.stop().await;
}

#[tokio::test]
async fn hedge_answers_from_the_fast_endpoint_and_cancels_the_slow_request() {
    let slow = Silent::start().await;
    let fast = Upstream::named("fast").await;
    let slow2 = Silent::start().await;
    let fast2 = Upstream::named("fast2").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
  nobudget:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
routes:
  - match: {{ path_prefix: /nobudget }}
    upstream: nobudget
    timeout: 300ms
    hedge: {{ delay: 50ms, max_hedges: 1 }}
    retry: {{ attempts: 1, budget: {{ ratio: 0, min_per_second: 0 }} }}
  - upstream: u
    hedge: {{ delay: 50ms, max_hedges: 1 }}
",
        slow.url(),
        fast.url(),
        slow2.url(),
        fast2.url()
    ))
    .await;
    let c = client();
    // Round robin sends the original to the silent endpoint; the hedge goes to the fast one.
    let start = tokio::time::Instant::now();
    let r = get(&c, &gw.url("/")).await;
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("fast"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    assert_eq!(fast.hits(), 1);
    // The losing request was dropped: its connection closes.
    wait_until(10, || slow.closed.load(Ordering::SeqCst) == 1).await;
    assert_eq!(slow.accepted.load(Ordering::SeqCst), 1);

    // Hedges draw on the retry budget: with none left, no hedge, and the route times out.
    let r = get(&c, &gw.url("/nobudget")).await;
    assert_eq!(r.status, 504);
    assert_eq!(fast2.hits(), 0);
    assert_eq!(r.header("x-bulwark-attempts"), Some("1"));
    gw.stop().await;
}

#[tokio::test]
async fn no_retry_starts_that_the_deadline_cannot_finish() {
    // /warm answers in 400 ms; /fail answers 503 after 1.7 s.
    let up = Upstream::start(
        "u",
        Arc::new(|req| {
            let fail = req.uri().path() == "/fail";
            Box::pin(async move {
                if fail {
                    tokio::time::sleep(Duration::from_millis(1700)).await;
                    reply("u", 503, "late failure")
                } else {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    reply("u", 200, "ok")
                }
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
    timeout: 2s
    retry:
      attempts: 3
      on: [5xx]
      backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }}
",
        up.url()
    ))
    .await;
    // Ten successful attempts of ~400 ms make the route's p90 prediction ~400 ms.
    let mut warm = Vec::new();
    for _ in 0..10 {
        let url = gw.url("/warm");
        warm.push(tokio::spawn(
            async move { get(&client(), &url).await.status },
        ));
    }
    for w in warm {
        assert_eq!(w.await.unwrap(), 200);
    }
    let before = up.hits();
    // The 503 comes after 1.7 s of 2 s: a retry (~400 ms) cannot finish, so none is sent and the
    // upstream's answer is passed through instead of a 504 after a doomed retry.
    let r = get(&client(), &gw.url("/fail")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "late failure");
    assert_eq!(r.header("x-bulwark-attempts"), Some("1"));
    assert_eq!(up.hits() - before, 1);
    gw.stop().await;
}

/// Failing over from an upstream whose breaker refuses the request sends nothing to it, so it is
/// not a retry: it costs no budget, even with a budget that allows no retry at all.
#[tokio::test]
async fn failover_from_an_open_breaker_spends_no_budget() {
    let broken = healable("broken", Arc::new(AtomicBool::new(false))).await;
    let healed = Arc::new(AtomicBool::new(true));
    let backup = healable("backup", healed).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  broken:
    endpoints: [{{url: '{}'}}]
    circuit_breaker:
      window: {{ kind: count, size: 10 }}
      minimum_calls: 2
      failure_rate_threshold: 50
      open_duration: 1m
  backup:
    endpoints: [{{url: '{}'}}]
routes:
  - upstream: broken
    failover: [backup]
    retry:
      attempts: 1
      on: [5xx]
      budget: {{ ratio: 0.0, min_per_second: 0 }}
",
        broken.url(),
        backup.url()
    ))
    .await;
    let c = client();
    let url = gw.url("/");
    // Two failures open the breaker; failing over after them would be a retry, and the budget
    // allows none, so those two clients see the broken upstream's answer.
    for _ in 0..2 {
        assert_eq!(get(&c, &url).await.status, 500);
    }
    assert_eq!(broken.hits(), 2);
    // Open: every request goes to the backup without touching the broken upstream or the budget.
    for _ in 0..20 {
        let r = get(&c, &url).await;
        assert_eq!(r.status, 200, "reason: {:?}", r.header("x-bulwark-reason"));
    }
    assert_eq!(broken.hits(), 2);
    assert_eq!(backup.hits(), 20);
}

/// An upstream answering 200 with its name at once, except that while `armed` the first request
/// to `/stall` reaching it (or its twin sharing `armed`) disarms it and is never answered; the
/// endpoint that held it writes its name into `stalled`.
async fn stall_once(
    name: &str,
    armed: Arc<AtomicBool>,
    stalled: Arc<std::sync::Mutex<Option<String>>>,
) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |req| {
            let (n, armed, stalled) = (n.clone(), armed.clone(), stalled.clone());
            Box::pin(async move {
                if req.uri().path() == "/stall" && armed.swap(false, Ordering::SeqCst) {
                    *stalled.lock().unwrap() = Some(n.clone());
                    std::future::pending::<()>().await;
                }
                reply(&n, 200, n.clone())
            })
        }),
    )
    .await
}

/// The default hedge delay is the p95 of the route's recent successful attempts once 20 are
/// known, and 100 ms before; either way a stalled request is hedged to the other endpoint, whose
/// answer the client gets. (The route deadline is generous: a busy CI machine must not turn a
/// fast request into a timeout.)
#[tokio::test]
async fn a_percentile_hedge_starts_once_twenty_latencies_are_known() {
    let armed = Arc::new(AtomicBool::new(false));
    let stalled = Arc::new(std::sync::Mutex::new(None));
    let a = stall_once("a", armed.clone(), stalled.clone()).await;
    let b = stall_once("b", armed.clone(), stalled.clone()).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
routes:
  - upstream: u
    timeout: 30s
    hedge: {{}}
",
        a.url(),
        b.url()
    ))
    .await;
    let rt = gw.state.runtime();
    let policies = &rt.routes[0].policies;
    let hedge = policies.hedge().expect("the route hedges");
    let c = client();
    let url = gw.url("/");
    let hits = || (a.hits(), b.hits());
    // A stalled request: the original is held at one endpoint, the hedge answers from the other.
    let stall = || async {
        let before = hits();
        armed.store(true, Ordering::SeqCst);
        let r = get(&c, &gw.url("/stall")).await;
        assert_eq!(r.status, 200, "reason: {:?}", r.header("x-bulwark-reason"));
        assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
        let held = stalled
            .lock()
            .unwrap()
            .take()
            .expect("one attempt was held");
        let answered = r.header("x-upstream").unwrap().to_owned();
        assert_ne!(answered, held, "the hedge went to the other endpoint");
        assert_eq!(r.text(), answered);
        let after = hits();
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, 1),
            "the original on one endpoint, the hedge on the other"
        );
    };

    for _ in 0..19 {
        assert_eq!(get(&c, &url).await.status, 200);
    }
    assert_eq!(policies.latency().recorded(), 19);
    assert_eq!(
        hedge.current_delay(),
        Duration::from_millis(100),
        "the fixed delay before 20 samples"
    );
    stall().await;

    // The hedged call's samples take the window past 20: the delay becomes the learned p95.
    assert!(policies.latency().recorded() >= 20);
    assert_ne!(
        hedge.current_delay(),
        Duration::from_millis(100),
        "the p95 of the recorded loopback requests, not the fixed delay"
    );
    stall().await;
    gw.stop().await;
}
