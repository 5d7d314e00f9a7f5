//! Retries, failover, timeouts, 429, idempotency, fallback, the upstream rate limit and bulkhead,
//! `enabled: false` on each upstream policy, and `retry_buffer`: what a client sees when upstreams
//! fail or the gateway refuses.
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

#[tokio::test]
async fn killing_one_of_three_endpoints_mid_load_fails_no_idempotent_request() {
    let ups = [
        Upstream::named("e0").await,
        Upstream::named("e1").await,
        Upstream::named("e2").await,
    ];
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]
routes:
  - upstream: u
    retry:
      attempts: 3
      on: [connect_failure, reset, 5xx]
      backoff: {{ base: 1ms, max: 5ms }}
      budget: {{ ratio: 1.0, min_per_second: 100 }}
",
        ups[0].url(),
        ups[1].url(),
        ups[2].url()
    ))
    .await;
    let url = gw.url("/");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut bad = 0;
            for _ in 0..150 {
                if get(&c, &url).await.status != 200 {
                    bad += 1;
                }
            }
            bad
        }));
    }
    // Mid-load: once e1 has served some traffic, kill it (listener and open connections).
    wait_until(20, || ups[1].hits() >= 50).await;
    ups[1].kill();
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap();
    }
    assert_eq!(
        failed, 0,
        "idempotent requests failed after an endpoint was killed"
    );
    assert!(ups[0].hits() + ups[2].hits() >= 1200 - ups[1].hits());
    gw.stop().await;
}

#[tokio::test]
async fn retry_goes_to_a_different_endpoint() {
    let bad = Upstream::status("bad", 503).await;
    let good = Upstream::named("good").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
routes:
  - upstream: u
    retry: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 1ms }}, budget: {{ min_per_second: 100 }} }}
",
        bad.url(),
        good.url()
    ))
    .await;
    let c = client();
    let mut retried = 0;
    for _ in 0..20 {
        let r = get(&c, &gw.url("/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "good");
        if r.header("x-bulwark-attempts") == Some("2") {
            retried += 1;
        }
    }
    // Every request reached `good` exactly once; each one that tried `bad` first was retried there
    // (never on `bad` again).
    assert_eq!(good.hits(), 20);
    assert_eq!(bad.hits(), retried);
    assert!(retried > 0);
    gw.stop().await;
}

#[tokio::test]
async fn last_upstream_response_is_passed_through_with_attempts() {
    let a = Upstream::status("a", 503).await;
    let b = Upstream::status("b", 503).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ balance: round_robin, endpoints: [{{url: '{}'}}, {{url: '{}'}}] }}
routes:
  - upstream: u
    retry: {{ attempts: 2, on: [5xx], backoff: {{ base: 1ms, max: 1ms }}, budget: {{}} }}
",
        a.url(),
        b.url()
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 503);
    assert!(r.text().ends_with("says 503"), "{}", r.text());
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(a.hits() + b.hits(), 2);
    assert_eq!(
        (a.hits(), b.hits()),
        (1, 1),
        "the retry went to the other endpoint"
    );
    gw.stop().await;
}

#[tokio::test]
async fn connect_failures_everywhere_give_502() {
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    retry: {{ attempts: 2, backoff: {{base: 1ms, max: 1ms}}, budget: {{}} }}\n",
        dead_url().await
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    gw.stop().await;
}

#[tokio::test]
async fn per_try_timeout_moves_on_and_total_timeout_gives_504() {
    let sleepy = slow("sleepy", Duration::from_secs(30)).await;
    let quick = Upstream::named("quick").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  mixed: {{ balance: round_robin, endpoints: [{{url: '{}'}}, {{url: '{}'}}] }}
  stuck: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /mixed }}
    upstream: mixed
    timeout: 10s
    retry: {{ attempts: 2, per_try_timeout: 100ms, on: [timeout], backoff: {{base: 1ms, max: 1ms}}, budget: {{}} }}
  - match: {{ path_prefix: /stuck }}
    upstream: stuck
    timeout: 200ms
",
        sleepy.url(),
        quick.url(),
        sleepy.url()
    ))
    .await;
    let c = client();
    for _ in 0..4 {
        let r = get(&c, &gw.url("/mixed")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "quick");
    }
    let r = get(&c, &gw.url("/stuck")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-bulwark-reason"), Some("timeout"));
    gw.stop().await;
}

#[tokio::test]
async fn too_many_requests_passed_through_or_retried_elsewhere() {
    let n429 = Upstream::start(
        "quota",
        Arc::new(|_req| {
            Box::pin(async {
                let mut r = reply("quota", 429, "slow down");
                r.headers_mut().insert("retry-after", "1".parse().unwrap());
                r
            })
        }),
    )
    .await;
    let ok = Upstream::named("ok").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  only429: {{ endpoints: [{{url: '{0}'}}], cooldown: {{ enabled: false }} }}
  both: {{ balance: round_robin, endpoints: [{{url: '{0}'}}, {{url: '{1}'}}] }}
routes:
  - match: {{ path_prefix: /plain }}
    upstream: only429
  - match: {{ path_prefix: /retried }}
    upstream: both
    retry: {{ attempts: 2, on: [429], backoff: {{base: 1ms, max: 1ms}}, budget: {{}} }}
  - match: {{ path_prefix: /short }}
    upstream: only429
    timeout: 500ms
    retry: {{ attempts: 3, on: [429], backoff: {{base: 1ms, max: 1ms}}, budget: {{}} }}
",
        n429.url(),
        ok.url()
    ))
    .await;
    let c = client();
    let r = get(&c, &gw.url("/plain")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (429, "slow down"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("1"));
    for _ in 0..4 {
        let r = get(&c, &gw.url("/retried")).await;
        assert_eq!(r.status, 200, "a 429 is retried on the other endpoint");
    }
    // Retry-After (1 s) is longer than the route has left (500 ms): no retry, the 429 goes back.
    // (Cooldown is off on `only429`: with it, the first 429 would keep the gateway from asking.)
    let before = n429.hits();
    let r = get(&c, &gw.url("/short")).await;
    assert_eq!(r.status, 429);
    assert_eq!(n429.hits() - before, 1);
    gw.stop().await;
}

#[tokio::test]
async fn non_idempotent_post_is_not_retried_unless_idempotency_key() {
    let bad = Upstream::status("bad", 503).await;
    let good = Upstream::named("good").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ balance: round_robin, endpoints: [{{url: '{}'}}, {{url: '{}'}}] }}
routes:
  - upstream: u
    retry: {{ attempts: 2, on: [5xx], backoff: {{base: 1ms, max: 1ms}}, budget: {{min_per_second: 100}} }}
",
        bad.url(),
        good.url()
    ))
    .await;
    let c = client();
    let post = |key: Option<&str>| {
        let mut b = Request::post(gw.url("/charge"));
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        b.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    };
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(send(&c, post(None)).await.status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 503, 503, 503, 503, 503]);
    assert_eq!(bad.hits() + good.hits(), 10, "no POST was sent twice");
    for i in 0..10 {
        let r = send(&c, post(Some(&format!("k{i}")))).await;
        assert_eq!(r.status, 200, "with Idempotency-Key the POST is retried");
    }
    gw.stop().await;
}

#[tokio::test]
async fn failover_chain_and_fallback() {
    let backup = Upstream::named("backup").await;
    let dead = dead_url().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  primary: {{ endpoints: [{{url: '{dead}'}}] }}
  secondary: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /chain }}
    upstream: primary
    failover: [secondary]
    retry: {{ attempts: 2, backoff: {{base: 1ms, max: 1ms}}, budget: {{}} }}
  - match: {{ path_prefix: /fallback }}
    upstream: primary
    fallback: {{ status: 200, body: '{{\"cached\":true}}', content_type: application/json }}
",
        backup.url()
    ))
    .await;
    let c = client();
    let r = get(&c, &gw.url("/chain")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "backup"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("3"));
    // Primary marked unavailable (as health checks would): straight to the next upstream.
    gw.set_available("primary", 0, false);
    let r = get(&c, &gw.url("/chain")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-attempts")),
        (200, None)
    );
    // No endpoint at all and a fallback: the fallback answers.
    let r = get(&c, &gw.url("/fallback")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "{\"cached\":true}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-bulwark-reason"), Some("fallback"));
    gw.stop().await;
}

#[tokio::test]
async fn no_available_endpoint_gives_503_with_retry_after() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    gw.set_available("u", 0, false);
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-bulwark-reason"), Some("no_healthy_endpoint"));
    assert!(r.header("retry-after").is_some());
    gw.stop().await;
}

// ---- upstream policies: rate limit, bulkhead, and `enabled: false` on every section ------------

/// An upstream whose requests wait until the returned sender sends `true` (all of them at once,
/// whenever they arrived), then answer 200 with its name.
async fn held_until_released(name: &str) -> (Upstream, tokio::sync::watch::Sender<bool>) {
    let (release, rx) = tokio::sync::watch::channel(false);
    let n = name.to_owned();
    let up = Upstream::start(
        name,
        Arc::new(move |_req| {
            let (mut rx, n) = (rx.clone(), n.clone());
            Box::pin(async move {
                let _ = rx.wait_for(|r| *r).await;
                reply(&n, 200, n.clone())
            })
        }),
    )
    .await;
    (up, release)
}

/// An upstream whose `/health` answers 503 (counting the probes) and everything else 200.
async fn failing_probes(name: &str) -> (Upstream, Arc<AtomicUsize>) {
    let probes = Arc::new(AtomicUsize::new(0));
    let (n, p) = (name.to_owned(), probes.clone());
    let up = Upstream::start(
        name,
        Arc::new(move |req| {
            let (n, p) = (n.clone(), p.clone());
            Box::pin(async move {
                if req.uri().path() == "/health" {
                    p.fetch_add(1, Ordering::SeqCst);
                    reply(&n, 503, "sick")
                } else {
                    reply(&n, 200, n.clone())
                }
            })
        }),
    )
    .await;
    (up, probes)
}

/// GETs `url` `n` times, one after another, and returns each answer's status and
/// `x-bulwark-reason` (`-` when none).
async fn outcomes(c: &Client, url: &str, n: usize) -> Vec<(u16, String)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = get(c, url).await;
        let reason = r.header("x-bulwark-reason").unwrap_or("-").to_owned();
        out.push((r.status.as_u16(), reason));
    }
    out
}

#[tokio::test]
async fn rate_limit_refuses_with_429_and_retry_after_without_reaching_the_upstream() {
    let up = Upstream::named("u").await;
    // 0.05/s is one request every 20 s: only the burst is admitted however slow the machine.
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    rate_limit: {{ per_second: 0.05, burst: 3 }}
routes:
  - upstream: u
",
        up.url()
    ))
    .await;
    let c = client();
    for _ in 0..3 {
        let r = get(&c, &gw.url("/")).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "u"));
    }
    assert_eq!(up.hits(), 3);
    for _ in 0..4 {
        let r = get(&c, &gw.url("/")).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("x-bulwark-reason"), Some("rate_limited"));
        // The exact time until the next request is admitted, in whole seconds rounded up: at
        // most the 20 s emission interval, at least 1.
        let secs: u64 = r
            .header("retry-after")
            .expect("a 429 from the rate limit carries Retry-After")
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=20).contains(&secs), "Retry-After: {secs}");
        assert_eq!(r.header("x-bulwark-attempts"), None, "nothing was sent");
    }
    assert_eq!(up.hits(), 3, "refused requests never reached the upstream");
    gw.stop().await;
}

#[tokio::test]
async fn full_bulkhead_without_a_queue_refuses_with_503_bulkhead_full() {
    let (up, release) = held_until_released("u").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    bulkhead: {{ max_concurrent: 2, max_queued: 0, queue_timeout: 0ms }}
routes:
  - upstream: u
",
        up.url()
    ))
    .await;
    let url = gw.url("/");
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&client(), &url).await.status.as_u16() })
        })
        .collect();
    // Both slots are taken by requests the upstream is holding.
    wait_until(10, || up.hits() == 2).await;
    let c = client();
    for _ in 0..3 {
        let r = get(&c, &url).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-bulwark-reason"), Some("bulkhead_full"));
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(up.hits(), 2, "refused requests never reached the upstream");
    assert!(holders.iter().all(|h| !h.is_finished()));
    release.send(true).unwrap();
    for h in holders {
        assert_eq!(h.await.unwrap(), 200);
    }
    // The slots are free again.
    let r = get(&c, &url).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "u"));
    assert_eq!(up.hits(), 3);
    gw.stop().await;
}

// Each `enabled: false` test runs the same load against two upstreams of one gateway, identical but
// for `enabled`: the `on` one proves the load triggers the policy, the `off` one that a disabled
// section does nothing.

/// A gateway with two upstreams that differ only in `enabled` of section `key` (`section` holds its
/// other settings): `on` (endpoints `on`) behind `/on`, `off` (endpoints `off`) behind `/off`, both
/// balanced round robin.
async fn on_and_off(key: &str, section: &str, on: &[&Upstream], off: &[&Upstream]) -> Gateway {
    let urls = |ups: &[&Upstream]| {
        let eps: Vec<String> = ups
            .iter()
            .map(|u| format!("{{url: '{}'}}", u.url()))
            .collect();
        eps.join(", ")
    };
    Gateway::start(&format!(
        "upstreams:
  on:
    balance: round_robin
    endpoints: [{}]
    {key}: {{ enabled: true, {section} }}
  off:
    balance: round_robin
    endpoints: [{}]
    {key}: {{ enabled: false, {section} }}
routes:
  - {{ match: {{ path_prefix: /on }}, upstream: on }}
  - {{ match: {{ path_prefix: /off }}, upstream: off }}
",
        urls(on),
        urls(off)
    ))
    .await
}

#[tokio::test]
async fn circuit_breaker_enabled_false_never_opens() {
    let on = Upstream::status("on", 500).await;
    let off = Upstream::status("off", 500).await;
    let section = "window: { kind: count, size: 10 }, minimum_calls: 4, failure_rate_threshold: 50, open_duration: 60s";
    let gw = on_and_off("circuit_breaker", section, &[&on], &[&off]).await;
    let c = client();
    let seen = outcomes(&c, &gw.url("/on"), 10).await;
    assert!(
        seen.contains(&(503, "circuit_open".into())),
        "the load opens an enabled breaker: {seen:?}"
    );
    assert!(on.hits() < 10);
    let seen = outcomes(&c, &gw.url("/off"), 10).await;
    assert!(
        seen.iter().all(|s| *s == (500, "upstream_error".into())),
        "{seen:?}"
    );
    assert_eq!(off.hits(), 10, "every request reached the upstream");
    gw.stop().await;
}

#[tokio::test]
async fn bulkhead_enabled_false_admits_past_max_concurrent() {
    let (on, release_on) = held_until_released("on").await;
    let (off, release_off) = held_until_released("off").await;
    let section = "max_concurrent: 1, max_queued: 0";
    let gw = on_and_off("bulkhead", section, &[&on], &[&off]).await;
    let spawn_get = |url: String| tokio::spawn(async move { get(&client(), &url).await });

    // Enabled: one request held at the upstream fills it; a second is refused.
    let held = spawn_get(gw.url("/on"));
    wait_until(10, || on.hits() == 1).await;
    let r = get(&client(), &gw.url("/on")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-bulwark-reason"), Some("bulkhead_full"));
    release_on.send(true).unwrap();
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(on.hits(), 1);

    // Disabled: the same two requests are both at the upstream at once.
    let first = spawn_get(gw.url("/off"));
    wait_until(10, || off.hits() == 1).await;
    let second = spawn_get(gw.url("/off"));
    wait_until(10, || off.hits() == 2).await;
    release_off.send(true).unwrap();
    for r in [first.await.unwrap(), second.await.unwrap()] {
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "off"));
    }
    gw.stop().await;
}

#[tokio::test]
async fn rate_limit_enabled_false_admits_past_the_burst() {
    let on = Upstream::named("on").await;
    let off = Upstream::named("off").await;
    let section = "per_second: 0.05, burst: 2";
    let gw = on_and_off("rate_limit", section, &[&on], &[&off]).await;
    let c = client();
    let seen = outcomes(&c, &gw.url("/on"), 6).await;
    assert_eq!(seen.iter().filter(|s| s.0 == 200).count(), 2, "{seen:?}");
    assert!(seen.contains(&(429, "rate_limited".into())), "{seen:?}");
    assert_eq!(on.hits(), 2);
    let seen = outcomes(&c, &gw.url("/off"), 6).await;
    assert!(seen.iter().all(|s| *s == (200, "-".into())), "{seen:?}");
    assert_eq!(off.hits(), 6);
    gw.stop().await;
}

#[tokio::test]
async fn outlier_detection_enabled_false_never_ejects() {
    let (on_bad, on_good) = (
        Upstream::status("on_bad", 500).await,
        Upstream::named("on_good").await,
    );
    let (off_bad, off_good) = (
        Upstream::status("off_bad", 500).await,
        Upstream::named("off_good").await,
    );
    let section = "consecutive_failures: 2, ejection_time: 60s, max_ejection_percent: 50";
    let gw = on_and_off(
        "outlier_detection",
        section,
        &[&on_bad, &on_good],
        &[&off_bad, &off_good],
    )
    .await;
    let c = client();
    spray(&c, &gw.url("/on"), 10).await;
    assert!(endpoint(&gw, "on", 0).is_ejected());
    assert_eq!(on_bad.hits(), 2, "ejected after 2 consecutive failures");
    let seen = spray(&c, &gw.url("/off"), 10).await;
    assert!(!endpoint(&gw, "off", 0).is_ejected());
    assert_eq!(
        (off_bad.hits(), off_good.hits()),
        (5, 5),
        "round robin kept sending to the failing endpoint: {seen:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn cooldown_enabled_false_keeps_sending_to_an_endpoint_out_of_quota() {
    let quota_on = Arc::new(AtomicBool::new(true));
    let quota_off = Arc::new(AtomicBool::new(true));
    let (on_q, on_ok) = (
        quota("on_quota", 429, quota_on, || "60".into()).await,
        Upstream::named("on_ok").await,
    );
    let (off_q, off_ok) = (
        quota("off_quota", 429, quota_off, || "60".into()).await,
        Upstream::named("off_ok").await,
    );
    let section = "on: [429], max: 5m";
    let gw = on_and_off("cooldown", section, &[&on_q, &on_ok], &[&off_q, &off_ok]).await;
    let c = client();
    spray(&c, &gw.url("/on"), 10).await;
    assert!(endpoint(&gw, "on", 0).in_cooldown());
    assert_eq!(
        on_q.hits(),
        1,
        "one 429 with Retry-After cools the endpoint down"
    );
    let seen = spray(&c, &gw.url("/off"), 10).await;
    assert!(!endpoint(&gw, "off", 0).in_cooldown());
    assert_eq!(
        (off_q.hits(), off_ok.hits()),
        (5, 5),
        "round robin kept sending to the endpoint out of quota: {seen:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn health_check_enabled_false_sends_no_probe() {
    let (on, on_probes) = failing_probes("on").await;
    let (off, off_probes) = failing_probes("off").await;
    let section = "path: /health, interval: 20ms, timeout: 1s, unhealthy_threshold: 1";
    let gw = on_and_off("health_check", section, &[&on], &[&off]).await;
    // Both checkers (if both existed) started together with the same interval: once the enabled
    // one has probed several times, the disabled one would have probed too.
    let on_ep = endpoint(&gw, "on", 0);
    wait_until(10, || {
        on_probes.load(Ordering::SeqCst) >= 5 && !on_ep.is_healthy()
    })
    .await;
    let c = client();
    let r = get(&c, &gw.url("/on")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-bulwark-reason"), Some("no_healthy_endpoint"));
    assert_eq!(off_probes.load(Ordering::SeqCst), 0, "no probe was sent");
    assert!(endpoint(&gw, "off", 0).is_healthy());
    let r = get(&c, &gw.url("/off")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "off"));
    gw.stop().await;
}

// ---- what may be retried: non-idempotent methods, bodies over `retry_buffer` -------------------

/// Every request of an [`fails_first`] upstream, by `x-test-id`: the body of each attempt.
type Attempts = Arc<Mutex<HashMap<String, Vec<Bytes>>>>;

/// An upstream that reads each request body to the end, records it under the request's
/// `x-test-id`, and answers 503 (`first attempt of <id> fails`) to the first attempt of each id and
/// 200 (`ok <id>`) to the later ones.
async fn fails_first(name: &str) -> (Upstream, Attempts) {
    let attempts: Attempts = Arc::default();
    let (n, a) = (name.to_owned(), attempts.clone());
    let up = Upstream::start(
        name,
        Arc::new(move |req| {
            let (n, a) = (n.clone(), a.clone());
            Box::pin(async move {
                let id = req
                    .headers()
                    .get("x-test-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let nth = {
                    let mut a = a.lock().unwrap();
                    let v = a.entry(id.clone()).or_default();
                    v.push(body);
                    v.len()
                };
                if nth == 1 {
                    reply(&n, 503, format!("first attempt of {id} fails"))
                } else {
                    reply(&n, 200, format!("ok {id}"))
                }
            })
        }),
    )
    .await;
    (up, attempts)
}

/// The bodies of the attempts recorded under `id`.
fn attempts_of(a: &Attempts, id: &str) -> Vec<Bytes> {
    a.lock().unwrap().get(id).cloned().unwrap_or_default()
}

/// `n` bytes that do not repeat with any short period, so a lost, doubled or reordered piece shows.
fn pattern(n: usize) -> Bytes {
    (0..n)
        .map(|i| (i.wrapping_mul(31) % 251) as u8 ^ (i >> 8) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A request `method` to `url` with `x-test-id: id`, optional headers, and `body`.
fn request(
    method: &str,
    url: &str,
    id: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(url)
        .header("x-test-id", id);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body)).unwrap()
}

/// A route on upstream `u` for `prefix`, retrying once on 5xx (1 ms backoff, a budget that never
/// runs out here), with the route keys `extra` (`key: value` each).
fn retrying_route(prefix: &str, extra: &[&str]) -> String {
    let mut r = format!(
        "  - match: {{ path_prefix: {prefix} }}
    upstream: u
    retry: {{ attempts: 2, on: [5xx], backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }}, budget: {{ min_per_second: 100 }} }}
"
    );
    for e in extra {
        r += &format!("    {e}\n");
    }
    r
}

#[tokio::test]
async fn retry_non_idempotent_retries_a_post_and_only_idempotency_key_does_without_it() {
    let (up, attempts) = fails_first("u").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
{}{}",
        up.url(),
        retrying_route("/any", &["retry_non_idempotent: true"]),
        retrying_route("/safe", &[]),
    ))
    .await;
    let c = client();
    let body = Bytes::from_static(b"{\"amount\": 42}");

    // `retry_non_idempotent: true`: the POST that got a 503 is sent again, with the same body.
    let r = send(&c, request("POST", &gw.url("/any"), "a", &[], body.clone())).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok a"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    assert_eq!(attempts_of(&attempts, "a"), [body.clone(), body.clone()]);
    // PATCH is the other non-idempotent method it covers.
    let r = send(
        &c,
        request("PATCH", &gw.url("/any"), "p", &[], body.clone()),
    )
    .await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok p"));
    assert_eq!(attempts_of(&attempts, "p").len(), 2);

    // Without it: the POST is sent once and the upstream's 503 is passed through.
    let r = send(
        &c,
        request("POST", &gw.url("/safe"), "b", &[], body.clone()),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (503, "first attempt of b fails")
    );
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("1"));
    assert_eq!(
        attempts_of(&attempts, "b").len(),
        1,
        "the POST was sent once"
    );
    assert_eq!(attempts_of(&attempts, "b")[0], body);

    // ... unless the client says it is safe to repeat, with an Idempotency-Key.
    let key = [("idempotency-key", "order-7")];
    let r = send(
        &c,
        request("POST", &gw.url("/safe"), "c", &key, body.clone()),
    )
    .await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok c"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    assert_eq!(attempts_of(&attempts, "c"), [body.clone(), body]);
    gw.stop().await;
}

#[tokio::test]
async fn a_body_over_retry_buffer_streams_once_and_is_not_retried() {
    let (up, attempts) = fails_first("u").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
{}",
        up.url(),
        retrying_route("/", &["retry_buffer: 1KiB"]),
    ))
    .await;
    let c = client();

    // 64 KiB with a Content-Length, over the 1 KiB buffer: one attempt, the whole body, and the
    // upstream's 503 passed through as the last attempt's response.
    let big = pattern(64 * 1024);
    let r = send(&c, request("PUT", &gw.url("/big"), "big", &[], big.clone())).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (503, "first attempt of big fails")
    );
    assert_eq!(r.header("x-upstream"), Some("u"));
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("1"));
    let seen = attempts_of(&attempts, "big");
    assert_eq!(seen.len(), 1, "a streamed body is not retried");
    assert!(
        seen[0] == big,
        "the streamed body arrived altered ({} bytes)",
        seen[0].len()
    );

    // Under the buffer, on the same route: kept and retried.
    let small = pattern(512);
    let r = send(
        &c,
        request("PUT", &gw.url("/small"), "small", &[], small.clone()),
    )
    .await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok small"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    assert_eq!(attempts_of(&attempts, "small"), [small.clone(), small]);
    gw.stop().await;
}

#[tokio::test]
async fn a_chunked_body_over_retry_buffer_streams_once_and_is_not_retried() {
    let (up, attempts) = fails_first("u").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
{}",
        up.url(),
        retrying_route("/", &["retry_buffer: 1KiB", "retry_non_idempotent: true"]),
    ))
    .await;
    // A POST (retried on this route) with a 16 KiB chunked body: no length announced, so the
    // gateway only learns it is over the buffer while reading it.
    let big = pattern(16 * 1024);
    let mut raw = RawClient::connect(&gw).await;
    let mut out = b"POST /chunked HTTP/1.1\r\nHost: gw\r\nx-test-id: chunked\r\n\
        Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for chunk in big.chunks(1000) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    raw.send(&out).await;
    let r = raw.response(false).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, b"first attempt of chunked fails");
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("1"));
    let seen = attempts_of(&attempts, "chunked");
    assert_eq!(seen.len(), 1, "a streamed body is not retried");
    assert!(
        seen[0] == big,
        "the streamed body arrived altered ({} bytes)",
        seen[0].len()
    );
    gw.stop().await;
}
