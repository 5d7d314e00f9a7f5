//! Retries, failover, timeouts, 429, idempotency, fallback: what a client sees when upstreams fail.
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

/// An upstream that sleeps `delay` before answering 200.
async fn slow(name: &str, delay: Duration) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |_req| {
            let n = n.clone();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                reply(&n, 200, n.clone())
            })
        }),
    )
    .await
}

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
