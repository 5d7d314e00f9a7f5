//! Endpoint health against what misleads it: a client stalling its upload is not the upstream's
//! failure, latency outliers are judged against the peers taking traffic now (not a dead or
//! cooling primary's old samples, not cached values), and a failing probe does not take back an
//! ejected endpoint.
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// An upstream that reads the whole request body before answering 200 (as any upstream that
/// parses a JSON body does), and answers `/health` with 200.
async fn body_reader(name: &str) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |req: http::Request<hyper::body::Incoming>| {
            let n = n.clone();
            Box::pin(async move {
                use http_body_util::BodyExt;
                let _ = req.into_body().collect().await;
                reply(&n, 200, n.clone())
            })
        }),
    )
    .await
}

/// A client that stalls in the middle of its (streamed) upload makes the attempt hit the route's
/// timeout while the upstream is only waiting for the client's bytes. That is counted as the
/// endpoint's failure (`Observed::Failed`), so a handful of slow or malicious uploaders eject a
/// healthy endpoint for every other client. The upstream did nothing wrong: as with Envoy, whose
/// route timeout starts only once the downstream request is complete, a stalled upload must not
/// count against the upstream.
#[tokio::test]
async fn a_client_stalling_its_upload_does_not_eject_a_healthy_endpoint() {
    let a = body_reader("a").await;
    let b = body_reader("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    outlier_detection: {{ consecutive_failures: 2, ejection_time: 1h, max_ejection_time: 1h, max_ejection_percent: 50 }}
routes:
  - upstream: u
    timeout: 300ms
",
        a.url(),
        b.url()
    ))
    .await;
    // Four clients each send the head and a first chunk of a POST body, then stall (their
    // connections stay open). Each gets the gateway's timeout answer.
    for _ in 0..4 {
        let mut c = RawClient::connect(&gw).await;
        c.send(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await;
        let r = c.response(false).await;
        // 504 today; a 408 `body_timeout` would do as well.
        assert!(matches!(r.status, 504 | 408), "{r:?}");
    }
    let (ea, eb) = (endpoint(&gw, "u", 0), endpoint(&gw, "u", 1));
    assert!(
        !ea.is_ejected() && !eb.is_ejected(),
        "a healthy endpoint was ejected because clients stalled their uploads \
         (a ejected: {}, b ejected: {})",
        ea.is_ejected(),
        eb.is_ejected()
    );
    // And the clients that do send their bodies are served by both endpoints.
    let c = client();
    let seen = spray(&c, &gw.url("/"), 4).await;
    assert!(
        seen.iter().any(|s| s == "a") && seen.iter().any(|s| s == "b"),
        "{seen:?}"
    );
    gw.stop().await;
}

/// The same stalled uploads also count as failures for the upstream's circuit breaker: a client
/// opens the breaker of a healthy upstream, and every other client gets 503 `circuit_open`.
#[tokio::test]
async fn a_client_stalling_its_upload_does_not_open_the_breaker() {
    let a = body_reader("a").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ window: {{ kind: count, size: 10 }}, minimum_calls: 4, failure_rate_threshold: 50, open_duration: 1h }}
routes:
  - upstream: u
    timeout: 300ms
",
        a.url()
    ))
    .await;
    for _ in 0..4 {
        let mut c = RawClient::connect(&gw).await;
        c.send(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await;
        let r = c.response(false).await;
        // 504 today; a 408 `body_timeout` would do as well.
        assert!(matches!(r.status, 504 | 408), "{r:?}");
    }
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (200, None),
        "a healthy upstream's breaker was opened by clients stalling their uploads"
    );
    gw.stop().await;
}

/// Latency outlier detection compares an endpoint's p99 with the p99 its peers had *whenever they
/// last took traffic*: an endpoint that is down (health check failing), ejected, or in another
/// priority tier keeps its old window forever and still counts as a peer. Here the primary tier
/// (a fast, nearby endpoint) goes down and the backup tier takes over; the backup, naturally
/// slower, is compared with the dead primary's old p99 and ejected as a "latency outlier". The
/// upstream then has no endpoint at all and every client gets 503 `no_healthy_endpoint`, while
/// the backup answers fine. Envoy's outlier statistics only count hosts with enough requests in
/// the current interval; the docs promise the comparison of an endpoint's *recent* p99 with its
/// peers'.
#[tokio::test]
async fn a_backup_tier_is_not_ejected_against_a_dead_primarys_old_latency() {
    let primary_up = Arc::new(AtomicBool::new(true));
    let primary = checked_with_delay("primary", primary_up.clone(), Duration::ZERO).await;
    let backup = checked_with_delay(
        "backup",
        Arc::new(AtomicBool::new(true)),
        Duration::from_millis(300),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}', priority: 0}}, {{url: '{}', priority: 1}}]
    health_check: {{ path: /health, interval: 50ms, timeout: 1s, unhealthy_threshold: 1, healthy_threshold: 1 }}
    outlier_detection: {{ latency_multiple: 3.0, latency_min_samples: 16, ejection_time: 1h, max_ejection_time: 1h, uneject_on_health_check: false }}
routes:
  - upstream: u
",
        primary.url(),
        backup.url()
    ))
    .await;
    let c = client();
    let url = gw.url("/");
    // Normal times: the primary tier takes everything.
    let seen = spray(&c, &url, 32).await;
    assert!(seen.iter().all(|s| s == "primary"), "{seen:?}");

    // The primary goes down; the backup tier takes over.
    primary_up.store(false, Ordering::SeqCst);
    let p = endpoint(&gw, "u", 0);
    wait_until(10, || !p.is_healthy()).await;
    let backup_ep = endpoint(&gw, "u", 1);
    let mut answers = Vec::new();
    for _ in 0..3 {
        let round = futures_util::future::join_all((0..16).map(|_| get(&c, &url))).await;
        answers.extend(round.into_iter().map(|r| {
            r.header("x-upstream")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{} {:?}", r.status, r.header("x-bulwark-reason")))
        }));
    }
    assert!(
        !backup_ep.is_ejected() && answers.iter().all(|s| s == "backup"),
        "the only serving endpoint was ejected as a latency outlier against a dead peer's old \
         p99 (backup ejected: {}); answers: {answers:?}",
        backup_ep.is_ejected()
    );
    gw.stop().await;
}

/// The same with default settings and no health check: the primary tier runs out of quota (429
/// with `Retry-After: 3600`), the slower backup tier takes over and is ejected as a "latency
/// outlier" against the primary's old p99, and clients are told 429 `rate_limited` with
/// `Retry-After: 300` (the primary's capped cooldown, although the backup's ejection ends
/// sooner), while the backup serves fine.
#[tokio::test]
async fn a_backup_tier_is_not_ejected_against_a_cooling_primarys_old_latency() {
    let out = Arc::new(AtomicBool::new(false));
    let primary = quota("primary", 429, out.clone(), || "3600".into()).await;
    let backup = checked_with_delay(
        "backup",
        Arc::new(AtomicBool::new(true)),
        Duration::from_millis(300),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}', priority: 0}}, {{url: '{}', priority: 1}}]
    outlier_detection: {{ latency_multiple: 3.0, latency_min_samples: 16 }}
routes:
  - upstream: u
",
        primary.url(),
        backup.url()
    ))
    .await;
    let c = client();
    let url = gw.url("/");
    let seen = spray(&c, &url, 32).await;
    assert!(seen.iter().all(|s| s == "primary"), "{seen:?}");
    out.store(true, Ordering::SeqCst);
    let r = get(&c, &url).await;
    assert_eq!(r.status, 429);
    assert!(endpoint(&gw, "u", 0).in_cooldown());
    let mut answers = Vec::new();
    for _ in 0..3 {
        let round = futures_util::future::join_all((0..16).map(|_| get(&c, &url))).await;
        answers.extend(round.into_iter().map(|r| {
            r.header("x-upstream")
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    format!("{} retry-after {:?}", r.status, r.header("retry-after"))
                })
        }));
    }
    let backup_ep = endpoint(&gw, "u", 1);
    assert!(
        !backup_ep.is_ejected() && answers.iter().all(|s| s == "backup"),
        "the backup was ejected against the cooling primary's old p99 (ejected: {}); answers: {answers:?}",
        backup_ep.is_ejected()
    );
    gw.stop().await;
}

/// Every endpoint slows down at the same moment (a provider-wide slowdown): none is an outlier,
/// and none should be ejected ("an endpoint whose recent p99 exceeds a multiple of its peers'
/// median"). But the endpoint judged first compares its fresh p99 with its peers' cached p99,
/// which is up to 15 samples old (`LatencyWindow::percentile` caches for `REFRESH_EVERY`
/// samples), so it sees fast peers and is ejected: a uniform slowdown takes endpoints out (up to
/// `max_ejection_percent`) and piles their load on the others.
#[tokio::test]
async fn a_uniform_slowdown_ejects_no_endpoint_as_a_latency_outlier() {
    let slow = Arc::new(AtomicBool::new(false));
    let mut ups = Vec::new();
    for name in ["e0", "e1", "e2"] {
        let (n, slow) = (name.to_owned(), slow.clone());
        ups.push(
            Upstream::start(
                name,
                Arc::new(move |_req| {
                    let (n, slow) = (n.clone(), slow.clone());
                    Box::pin(async move {
                        if slow.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(600)).await;
                        }
                        reply(&n, 200, n.clone())
                    })
                }),
            )
            .await,
        );
    }
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]
    outlier_detection: {{ latency_multiple: 3.0, latency_min_samples: 16, ejection_time: 1h, max_ejection_time: 1h }}
routes:
  - upstream: u
",
        ups[0].url(),
        ups[1].url(),
        ups[2].url()
    ))
    .await;
    let c = client();
    let url = gw.url("/");
    let batch = |n: usize| futures_util::future::join_all((0..n).map(|_| get(&c, &url)));
    // 32 fast samples per endpoint (round robin: 16 each per batch of 48).
    for _ in 0..2 {
        for r in batch(48).await {
            assert_eq!(r.status, 200);
        }
    }
    // Everyone slows down alike; 16 more samples each.
    slow.store(true, Ordering::SeqCst);
    for r in batch(48).await {
        assert_eq!(r.status, 200);
    }
    let ejected: Vec<usize> = (0..3)
        .filter(|&i| endpoint(&gw, "u", i).is_ejected())
        .collect();
    assert!(
        ejected.is_empty(),
        "endpoints {ejected:?} ejected as latency outliers while all three slowed down alike"
    );
    gw.stop().await;
}

/// `uneject_on_health_check` takes an ejected endpoint back when "the check finds it healthy".
/// The gateway reads the checker's *debounced status* instead: while an endpoint's probes fail
/// but fewer than `unhealthy_threshold` times in a row, the status is still `Healthy`, so an
/// endpoint that has just broken (every request and every probe fails) is ejected by outlier
/// detection and taken back at the next tick of the applier, before the health check declares
/// it unhealthy (with the defaults, 5 s interval x 3 probes: for 10-15 s, during which it is
/// re-ejected and taken back again). Envoy unejects on a *successful* active health check.
#[tokio::test]
async fn failing_probes_do_not_uneject_a_broken_endpoint() {
    let broken = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let (b2, p2) = (broken.clone(), probes.clone());
    let a = Upstream::start(
        "a",
        Arc::new(move |req| {
            let (broken, probes) = (b2.clone(), p2.clone());
            Box::pin(async move {
                let down = broken.load(Ordering::SeqCst);
                if req.uri().path() == "/health" {
                    probes.fetch_add(1, Ordering::SeqCst);
                    reply("a", if down { 503 } else { 200 }, "")
                } else {
                    reply("a", if down { 500 } else { 200 }, "a")
                }
            })
        }),
    )
    .await;
    let b = Upstream::named("b").await;
    // unhealthy_threshold is the default, 3.
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    health_check: {{ path: /health, interval: 100ms, timeout: 1s }}
    outlier_detection: {{ consecutive_failures: 2, ejection_time: 1h, max_ejection_time: 1h }}
routes:
  - upstream: u
",
        a.url(),
        b.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 0);
    let c = client();
    let url = gw.url("/");
    wait_until(10, || probes.load(Ordering::SeqCst) >= 2).await;
    assert!(ep.is_healthy());

    // It breaks: traffic ejects it within a few requests.
    broken.store(true, Ordering::SeqCst);
    wait_for(10, || async {
        get(&c, &url).await;
        ep.is_ejected()
    })
    .await;
    // Until the health check declares it unhealthy (3 failing probes), it must stay ejected:
    // every probe since it broke has failed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ep.is_healthy() {
        assert!(
            ep.is_ejected(),
            "the ejection of a broken endpoint was ended by the health check while its probes fail"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "never declared unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.stop().await;
}
