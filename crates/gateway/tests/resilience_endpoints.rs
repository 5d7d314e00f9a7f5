//! Per-endpoint resilience: active health checks, outlier ejection (consecutive failures, the
//! max_ejection_percent cap, latency outliers) and provider-quota cooldown, against real upstreams.
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use support::*;

type Probes = Arc<Mutex<Vec<(bool, Option<bool>)>>>;

/// An upstream whose `/health` answers 200 while `up` holds (503 otherwise) and logs, per probe,
/// whether it passed and whether the gateway saw the endpoint healthy when the probe arrived.
async fn checked(
    name: &str,
    up: Arc<AtomicBool>,
    probes: Probes,
    traffic: Arc<AtomicUsize>,
    gw: Arc<OnceLock<Arc<bulwark_gateway::proxy::Gateway>>>,
) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |req| {
            let (n, up, probes, traffic, gw) = (
                n.clone(),
                up.clone(),
                probes.clone(),
                traffic.clone(),
                gw.clone(),
            );
            Box::pin(async move {
                if req.uri().path() == "/health" {
                    let ok = up.load(Ordering::SeqCst);
                    let seen = gw
                        .get()
                        .map(|g| g.runtime().upstream("u").unwrap().endpoints[0].is_healthy());
                    probes.lock().unwrap().push((ok, seen));
                    reply(&n, if ok { 200 } else { 503 }, "")
                } else {
                    traffic.fetch_add(1, Ordering::SeqCst);
                    reply(&n, 200, n.clone())
                }
            })
        }),
    )
    .await
}

#[tokio::test]
async fn health_check_thresholds_are_exact_and_unhealthy_endpoints_get_no_traffic() {
    let up = Arc::new(AtomicBool::new(true));
    let probes: Probes = Arc::default();
    let traffic = Arc::new(AtomicUsize::new(0));
    let cell = Arc::new(OnceLock::new());
    let a = checked(
        "a",
        up.clone(),
        probes.clone(),
        traffic.clone(),
        cell.clone(),
    )
    .await;
    let b = Upstream::named("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    health_check: {{ path: /health, interval: 100ms, timeout: 1s, unhealthy_threshold: 3, healthy_threshold: 2 }}
routes:
  - upstream: u
",
        a.url(),
        b.url()
    ))
    .await;
    cell.set(gw.state.clone()).ok().unwrap();
    let ep = endpoint(&gw, "u", 0);
    let c = client();
    let url = gw.url("/x");
    wait_until(10, || probes.lock().unwrap().len() >= 2).await;
    assert!(ep.is_healthy());

    up.store(false, Ordering::SeqCst);
    let failing = || -> Vec<Option<bool>> {
        let p = probes.lock().unwrap();
        p.iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, seen)| *seen)
            .collect()
    };
    wait_until(10, || failing().len() >= 4).await;
    // Failing probes 1-3 each found the endpoint still healthy; the 4th found it unhealthy: it
    // went down on exactly the 3rd consecutive failure.
    assert_eq!(
        failing()[..4],
        [Some(true), Some(true), Some(true), Some(false)]
    );
    assert!(!ep.is_healthy() && !ep.is_available());
    let before = traffic.load(Ordering::SeqCst);
    let seen = spray(&c, &url, 8).await;
    assert!(seen.iter().all(|s| s == "b"), "{seen:?}");
    assert_eq!(
        traffic.load(Ordering::SeqCst),
        before,
        "no traffic while unhealthy"
    );

    let mark = probes.lock().unwrap().len();
    up.store(true, Ordering::SeqCst);
    let passing = || -> Vec<Option<bool>> {
        let p = probes.lock().unwrap();
        p[mark..]
            .iter()
            .filter(|(ok, _)| *ok)
            .map(|(_, s)| *s)
            .collect()
    };
    wait_until(10, || passing().len() >= 3).await;
    // Up again on exactly the 2nd consecutive pass (the 3rd pass finds it healthy).
    assert_eq!(passing()[..3], [Some(false), Some(false), Some(true)]);
    assert!(ep.is_healthy());
    let seen = spray(&c, &url, 4).await;
    assert!(seen.iter().any(|s| s == "a"), "{seen:?}");
    gw.stop().await;
}

#[tokio::test]
async fn tcp_health_check_takes_a_dead_endpoint_out() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    health_check: {{ kind: tcp, interval: 50ms, timeout: 500ms, unhealthy_threshold: 2 }}
routes:
  - upstream: u
",
        a.url(),
        b.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 0);
    a.kill();
    wait_until(10, || !ep.is_healthy()).await;
    let seen = spray(&client(), &gw.url("/"), 6).await;
    assert!(seen.iter().all(|s| s == "b"), "{seen:?}");
    gw.stop().await;
}

/// Sends requests to `url` until endpoint `ep` is ejected.
async fn until_ejected(c: &Client, url: &str, ep: &bulwark_gateway::upstream::Endpoint) {
    wait_for(10, || async {
        get(c, url).await;
        ep.is_ejected()
    })
    .await;
}

#[tokio::test]
async fn consecutive_failures_eject_then_the_ejection_ends_and_grows() {
    let bad = Upstream::status("bad", 500).await;
    let good = Upstream::named("good").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    outlier_detection: {{ consecutive_failures: 3, ejection_time: 300ms, max_ejection_time: 10s, max_ejection_percent: 50 }}
routes:
  - upstream: u
",
        bad.url(),
        good.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 0);
    let c = client();
    let url = gw.url("/");
    until_ejected(&c, &url, &ep).await;
    assert_eq!(bad.hits(), 3, "ejected on the 3rd consecutive failure");
    let seen = spray(&c, &url, 10).await;
    assert!(seen.iter().all(|s| s == "good"), "{seen:?}");
    assert_eq!(bad.hits(), 3);

    // The ejection ends by time; the endpoint gets traffic again, fails 3 more times and is
    // ejected for twice as long.
    wait_until(10, || !ep.is_ejected()).await;
    until_ejected(&c, &url, &ep).await;
    assert_eq!(bad.hits(), 6);
    assert_eq!(ep.ejection_count(), 2);
    assert!(ep.ejection_remaining().unwrap() > Duration::from_millis(300));
    gw.stop().await;
}

/// An ejected endpoint whose active health check passes is taken back at the next check (Envoy's
/// `successful_active_health_check_uneject_host`, on by default), not after its ejection time;
/// `uneject_on_health_check: false` keeps it out for the whole ejection.
#[tokio::test]
async fn a_passing_health_check_ends_an_ejection_unless_turned_off() {
    for uneject in [true, false] {
        // `/health` passes; every other request fails.
        let probes = Arc::new(AtomicUsize::new(0));
        let p = probes.clone();
        let bad = Upstream::start(
            "bad",
            Arc::new(move |req| {
                let p = p.clone();
                Box::pin(async move {
                    if req.uri().path() == "/health" {
                        p.fetch_add(1, Ordering::SeqCst);
                        reply("bad", 200, "")
                    } else {
                        reply("bad", 500, "")
                    }
                })
            }),
        )
        .await;
        let good = Upstream::named("good").await;
        let gw = Gateway::start(&format!(
            "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    health_check: {{ path: /health, interval: 50ms, healthy_threshold: 1 }}
    outlier_detection: {{ consecutive_failures: 2, ejection_time: 1h, max_ejection_time: 1h, uneject_on_health_check: {uneject} }}
routes:
  - upstream: u
",
            bad.url(),
            good.url()
        ))
        .await;
        let ep = endpoint(&gw, "u", 0);
        let c = client();
        let url = gw.url("/");
        until_ejected(&c, &url, &ep).await;
        if uneject {
            wait_until(10, || !ep.is_ejected()).await;
            assert_eq!(ep.ejection_count(), 1, "it still counts for the next one");
        } else {
            // Several passing checks later, still out.
            let seen = probes.load(Ordering::SeqCst);
            wait_until(10, || probes.load(Ordering::SeqCst) >= seen + 3).await;
            assert!(ep.is_ejected());
        }
        gw.stop().await;
    }
}

#[tokio::test]
async fn max_ejection_percent_keeps_half_the_endpoints_in() {
    let ups = [
        Upstream::status("e0", 500).await,
        Upstream::status("e1", 500).await,
        Upstream::status("e2", 500).await,
        Upstream::status("e3", 500).await,
    ];
    let eps: Vec<String> = ups
        .iter()
        .map(|u| format!("{{url: '{}'}}", u.url()))
        .collect();
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{}]
    outlier_detection: {{ consecutive_failures: 2, ejection_time: 30s, max_ejection_percent: 50 }}
routes:
  - upstream: u
",
        eps.join(", ")
    ))
    .await;
    let c = client();
    for _ in 0..40 {
        let r = get(&c, &gw.url("/")).await;
        assert_eq!(r.status, 500, "the remaining endpoints still answer");
    }
    let rt = gw.state.runtime();
    let ejected = rt
        .upstream("u")
        .unwrap()
        .endpoints
        .iter()
        .filter(|e| e.is_ejected())
        .count();
    assert_eq!(ejected, 2);
    gw.stop().await;
}

#[tokio::test]
async fn latency_outlier_is_ejected() {
    let fast0 = Upstream::named("fast0").await;
    let fast1 = Upstream::named("fast1").await;
    let slow = Upstream::start(
        "slow",
        Arc::new(|_req| {
            Box::pin(async {
                // Far enough above the fast endpoints' p99 x 3 that a loaded machine (the fast
                // ones slowed to a few hundred ms: seen once with 250 here, while two builds ran
                // beside the tests) cannot hide the outlier.
                tokio::time::sleep(Duration::from_millis(1000)).await;
                reply("slow", 200, "slow")
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]
    outlier_detection: {{ latency_multiple: 3.0, latency_min_samples: 16, ejection_time: 30s }}
routes:
  - upstream: u
",
        fast0.url(),
        fast1.url(),
        slow.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 2);
    let c = client();
    let url = gw.url("/");
    // Twelve at a time (four of them to the slow one), so its samples come in seconds.
    wait_for(30, || async {
        futures_util::future::join_all((0..12).map(|_| get(&c, &url))).await;
        ep.is_ejected()
    })
    .await;
    assert!(!endpoint(&gw, "u", 0).is_ejected() && !endpoint(&gw, "u", 1).is_ejected());
    let before = slow.hits();
    let seen = spray(&c, &url, 10).await;
    assert!(seen.iter().all(|s| s.starts_with("fast")), "{seen:?}");
    assert_eq!(slow.hits(), before);
    gw.stop().await;
}

#[tokio::test]
async fn quota_429_with_retry_after_cools_the_endpoint_down() {
    let out = Arc::new(AtomicBool::new(true));
    let q = quota("quota", 429, out.clone(), || "1".into()).await;
    let ok = Upstream::named("ok").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    cooldown: {{ on: [429] }}
  solo:
    endpoints: [{{url: '{0}'}}]
    cooldown: {{}}
routes:
  - match: {{ path_prefix: /solo }}
    upstream: solo
  - upstream: u
",
        q.url(),
        ok.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 0);
    let c = client();
    let url = gw.url("/");
    // Round robin starts at the quota endpoint: its 429 is passed through and starts a cooldown.
    let r = get(&c, &url).await;
    assert_eq!(
        (r.status.as_u16(), r.header("retry-after")),
        (429, Some("1"))
    );
    out.store(false, Ordering::SeqCst);
    assert!(ep.in_cooldown() && !ep.is_ejected() && ep.is_healthy());
    let seen = spray(&c, &url, 6).await;
    assert!(seen.iter().all(|s| s == "ok"), "{seen:?}");
    assert_eq!(q.hits(), 1);
    // After the cooldown it gets traffic again.
    wait_until(10, || !ep.in_cooldown()).await;
    let seen = spray(&c, &url, 4).await;
    assert!(seen.iter().any(|s| s == "quota"), "{seen:?}");

    // A single endpoint in cooldown: the gateway answers for it, with the time left.
    out.store(true, Ordering::SeqCst);
    let r = get(&c, &gw.url("/solo")).await;
    assert_eq!(r.status, 429);
    let hits = q.hits();
    let r = get(&c, &gw.url("/solo")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-bulwark-reason"), Some("rate_limited"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(q.hits(), hits, "not sent upstream during the cooldown");
    gw.stop().await;
}

#[tokio::test]
async fn configured_status_with_an_http_date_retry_after_cools_down_too() {
    let out = Arc::new(AtomicBool::new(true));
    let q = quota("quota", 402, out.clone(), || {
        http_date(SystemTime::now() + Duration::from_secs(2))
    })
    .await;
    let ok = Upstream::named("ok").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    cooldown: {{ on: [429, 402], max: 1m }}
routes:
  - upstream: u
",
        q.url(),
        ok.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 0);
    let c = client();
    let r = get(&c, &gw.url("/")).await;
    assert_eq!(r.status, 402, "a 402 is passed through");
    out.store(false, Ordering::SeqCst);
    let left = ep.cooldown_remaining().expect("in cooldown");
    assert!(
        left > Duration::ZERO && left <= Duration::from_secs(2),
        "{left:?}"
    );
    let seen = spray(&c, &gw.url("/"), 4).await;
    assert!(seen.iter().all(|s| s == "ok"), "{seen:?}");
    wait_until(10, || !ep.in_cooldown()).await;
    let seen = spray(&c, &gw.url("/"), 4).await;
    assert!(seen.iter().any(|s| s == "quota"), "{seen:?}");
    gw.stop().await;
}

/// An upstream's `rate_limit` counts what is sent: a request that finds no endpoint available
/// sends nothing and spends no token, so the next request, once the endpoint is back, is sent
/// (review ix2: the limit was asked before the endpoint was picked, and the 503
/// `no_healthy_endpoint` spent the burst of 1; the next request got 429 with nothing sent).
#[tokio::test]
async fn a_request_with_no_endpoint_spends_no_rate_limit_token() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    rate_limit: {{ per_second: 0.05, burst: 1 }}
routes:
  - upstream: u
",
        up.url()
    ))
    .await;
    let c = client();
    gw.set_available("u", 0, false);
    let r = get(&c, &gw.url("/down")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (503, Some("no_healthy_endpoint"))
    );
    gw.set_available("u", 0, true);
    let r = get(&c, &gw.url("/back")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (200, None)
    );
    assert_eq!(up.hits(), 1);
    // And the token is spent now: the limit still holds.
    let r = get(&c, &gw.url("/again")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (429, Some("rate_limited"))
    );
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}
