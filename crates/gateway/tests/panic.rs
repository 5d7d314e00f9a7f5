//! Panic mode (`panic_threshold`): when too few endpoints are available, traffic spreads over all
//! of them; off by default; seen in `/health` and `bulwark_upstream_panic`; quota cooldowns still
//! hold. Real upstreams and health checks on 127.0.0.1.
mod admin_support;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use admin_support::*;
use support::*;

fn healthy(ops: &Ops, up: &str) -> Vec<bool> {
    let rt = ops.gateway().runtime();
    let u = rt.upstream(up).unwrap();
    u.endpoints.iter().map(|e| e.is_healthy()).collect()
}

async fn panic_gauge(ops: &Ops, c: &Client, up: &str) -> Option<f64> {
    let m = ops.metrics(c).await;
    sample(&m, &format!(r#"bulwark_upstream_panic{{upstream="{up}"}}"#))
}

fn three_checked(urls: &[String], extra: &str) -> String {
    format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]
    health_check: {{ path: /health, interval: 50ms, timeout: 1s, unhealthy_threshold: 1, healthy_threshold: 1 }}
{extra}routes:
  - upstream: u
",
        urls[0], urls[1], urls[2]
    )
}

#[tokio::test]
async fn without_a_threshold_all_unhealthy_is_503_no_healthy_endpoint() {
    let up = Arc::new(AtomicBool::new(false));
    let eps = [
        checked("a", up.clone()).await,
        checked("b", up.clone()).await,
        checked("c", up.clone()).await,
    ];
    let urls: Vec<String> = eps.iter().map(Upstream::url).collect();
    let ops = Ops::start(&three_checked(&urls, ""), None).await;
    let c = client();
    eventually(10, "all unhealthy", || async {
        healthy(&ops, "u").iter().all(|h| !h)
    })
    .await;
    let r = get(&c, &ops.url("/x")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-bulwark-reason"), Some("no_healthy_endpoint"));
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["upstreams"]["u"]["panic"], false, "{h}");
    assert_eq!(panic_gauge(&ops, &c, "u").await, Some(0.0));
    ops.stop().await;
}

#[tokio::test]
async fn failing_health_checks_put_the_upstream_in_panic_until_they_pass() {
    let ups: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let eps = [
        checked("a", ups[0].clone()).await,
        checked("b", ups[1].clone()).await,
        checked("c", ups[2].clone()).await,
    ];
    let urls: Vec<String> = eps.iter().map(Upstream::url).collect();
    let ops = Ops::start(&three_checked(&urls, "    panic_threshold: 50\n"), None).await;
    let c = client();
    let url = ops.url("/x");
    eventually(10, "all unhealthy", || async {
        healthy(&ops, "u").iter().all(|h| !h)
    })
    .await;

    // Every endpoint fails its health check but answers traffic: requests succeed, on all three.
    let seen = spray(&c, &url, 9).await;
    for n in ["a", "b", "c"] {
        assert!(seen.iter().any(|s| s == n), "{seen:?}");
    }
    assert!(
        seen.iter().all(|s| ["a", "b", "c"].contains(&s.as_str())),
        "{seen:?}"
    );
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["upstreams"]["u"]["panic"], true, "{h}");
    // The status rule is unchanged: no endpoint is usable.
    assert_eq!(h["upstreams"]["u"]["status"], "unhealthy", "{h}");
    assert_eq!(panic_gauge(&ops, &c, "u").await, Some(1.0));

    // Two of three pass again (67% >= 50%): panic ends, normal balancing over those two.
    ups[0].store(true, Ordering::SeqCst);
    ups[1].store(true, Ordering::SeqCst);
    eventually(10, "a and b healthy", || async {
        healthy(&ops, "u") == [true, true, false]
    })
    .await;
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["upstreams"]["u"]["panic"], false, "{h}");
    assert_eq!(h["upstreams"]["u"]["status"], "degraded", "{h}");
    assert_eq!(panic_gauge(&ops, &c, "u").await, Some(0.0));
    let seen = spray(&c, &url, 8).await;
    assert!(seen.iter().any(|s| s == "a"), "{seen:?}");
    assert!(seen.iter().any(|s| s == "b"), "{seen:?}");
    assert!(seen.iter().all(|s| s != "c"), "{seen:?}");
    ops.stop().await;
}

#[tokio::test]
async fn the_threshold_applies_while_some_endpoints_are_still_available() {
    let eps = [
        Upstream::named("a").await,
        Upstream::named("b").await,
        Upstream::named("c").await,
        Upstream::named("d").await,
    ];
    let list = eps
        .iter()
        .map(|e| format!("{{url: '{}'}}", e.url()))
        .collect::<Vec<_>>()
        .join(", ");
    let ops = Ops::start(
        &format!(
            "upstreams:
  half:
    balance: round_robin
    endpoints: [{list}]
    panic_threshold: 50
  fifth:
    balance: round_robin
    endpoints: [{list}]
    panic_threshold: 20
routes:
  - match: {{ path_prefix: /half }}
    upstream: half
  - upstream: fifth
"
        ),
        None,
    )
    .await;
    for up in ["half", "fifth"] {
        for i in 0..3 {
            ops.set_available(up, i, false);
        }
    }
    let c = client();
    // 1 of 4 available (25%): below 50%, panic, traffic over all four.
    let seen = spray(&c, &ops.url("/half"), 12).await;
    for n in ["a", "b", "c", "d"] {
        assert!(seen.iter().any(|s| s == n), "{seen:?}");
    }
    // Not below 20%: no panic, everything on the healthy one.
    let seen = spray(&c, &ops.url("/fifth"), 8).await;
    assert!(seen.iter().all(|s| s == "d"), "{seen:?}");
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["upstreams"]["half"]["panic"], true, "{h}");
    assert_eq!(h["upstreams"]["fifth"]["panic"], false, "{h}");
    assert_eq!(panic_gauge(&ops, &c, "half").await, Some(1.0));
    assert_eq!(panic_gauge(&ops, &c, "fifth").await, Some(0.0));
    ops.stop().await;
}

#[tokio::test]
async fn ejected_endpoints_count_as_unavailable() {
    let bad1 = Upstream::status("bad1", 503).await;
    let bad2 = Upstream::status("bad2", 503).await;
    let ok = Upstream::named("ok").await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]
    outlier_detection: {{ consecutive_failures: 1, ejection_time: 1m, max_ejection_percent: 100 }}
    panic_threshold: 50
routes:
  - upstream: u
",
            bad1.url(),
            bad2.url(),
            ok.url()
        ),
        None,
    )
    .await;
    let c = client();
    let url = ops.url("/x");
    let ejected = || {
        let rt = ops.gateway().runtime();
        let u = rt.upstream("u").unwrap();
        u.endpoints
            .iter()
            .map(|e| e.is_ejected())
            .collect::<Vec<_>>()
    };
    // Round robin: one request to each of the failing endpoints ejects it.
    let seen = spray(&c, &url, 2).await;
    assert_eq!(seen, ["bad1", "bad2"]);
    assert_eq!(ejected(), [true, true, false]);
    // 1 of 3 available: panic, the ejected endpoints get traffic again.
    let seen = spray(&c, &url, 6).await;
    for n in ["bad1", "bad2", "ok"] {
        assert!(seen.iter().any(|s| s == n), "{seen:?}");
    }
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["upstreams"]["u"]["panic"], true, "{h}");
    assert_eq!(panic_gauge(&ops, &c, "u").await, Some(1.0));
    ops.stop().await;
}

#[tokio::test]
async fn an_endpoint_in_a_quota_cooldown_stays_out_in_panic() {
    let q = quota("quota", 429, Arc::new(AtomicBool::new(true)), || {
        "60".into()
    })
    .await;
    let b = Upstream::named("b").await;
    let cc = Upstream::named("c").await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]
    cooldown: {{}}
    panic_threshold: 50
routes:
  - upstream: u
",
            q.url(),
            b.url(),
            cc.url()
        ),
        None,
    )
    .await;
    for i in 0..3 {
        ops.set_available("u", i, false);
    }
    let c = client();
    let url = ops.url("/x");
    // Panic: round robin starts at the quota endpoint, whose 429 starts a cooldown.
    let r = get(&c, &url).await;
    assert_eq!(r.status, 429);
    assert_eq!(q.hits(), 1);
    let ep = endpoint_of(&ops, "u", 0);
    assert!(ep.in_cooldown());
    // Still in panic; the cooling endpoint gets nothing.
    let seen = spray(&c, &url, 8).await;
    assert!(seen.iter().any(|s| s == "b"), "{seen:?}");
    assert!(seen.iter().any(|s| s == "c"), "{seen:?}");
    assert!(seen.iter().all(|s| s == "b" || s == "c"), "{seen:?}");
    assert_eq!(q.hits(), 1);
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["upstreams"]["u"]["panic"], true, "{h}");
    ops.stop().await;
}

fn endpoint_of(ops: &Ops, up: &str, i: usize) -> Arc<bulwark_gateway::upstream::Endpoint> {
    ops.gateway().runtime().upstream(up).unwrap().endpoints[i].clone()
}
