//! `/metrics`: the gateway's and the library's families, with config-name labels, exact counts.
mod admin_support;
mod support;

use admin_support::*;
use support::*;

#[tokio::test]
async fn metrics_count_every_request_with_route_upstream_and_code() {
    let ok = Upstream::named("ok").await;
    let bad = Upstream::status("bad", 503).await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ minimum_calls: 100 }}
  flaky:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ minimum_calls: 100 }}
routes:
  - name: api
    match: {{ path_prefix: /api/ }}
    upstream: primary
  - name: broken
    match: {{ path_prefix: /broken/ }}
    upstream: flaky
",
            ok.url(),
            bad.url()
        ),
        Some("t"),
    )
    .await;
    let c = client();

    // Before any traffic: every breaker's state gauge exists (closed), every endpoint is healthy.
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, r#"bulwark_circuit_breaker_state{upstream="primary"}"#),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"bulwark_circuit_breaker_state{upstream="flaky"}"#),
        Some(0.0)
    );
    let ep = format!(
        r#"bulwark_endpoint_healthy{{upstream="primary",endpoint="{}"}}"#,
        ok.url()
    );
    assert_eq!(sample(&m, &ep), Some(1.0), "{m}");

    const N: usize = 7;
    for i in 0..N {
        assert_eq!(get(&c, &ops.url(&format!("/api/{i}"))).await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(&c, &ops.url("/broken/x")).await.status, 503);
    }
    // Not routed: not counted (no route label to give it).
    assert_eq!(get(&c, &ops.url("/elsewhere")).await.status, 404);

    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(
            &m,
            r#"bulwark_requests_total{route="api",upstream="primary",code="200"}"#
        ),
        Some(N as f64),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_requests_total{route="broken",upstream="flaky",code="503"}"#
        ),
        Some(3.0),
        "{m}"
    );
    assert!(!m.contains(r#"code="404""#), "{m}");
    assert_eq!(
        sample(
            &m,
            r#"bulwark_request_duration_seconds_count{route="api",upstream="primary"}"#
        ),
        Some(N as f64),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_request_duration_seconds_bucket{le="+Inf",route="api",upstream="primary"}"#
        ),
        Some(N as f64),
        "{m}"
    );
    assert!(
        m.contains("# TYPE bulwark_request_duration_seconds histogram"),
        "{m}"
    );
    assert!(m.contains("# TYPE bulwark_requests counter"), "{m}");

    // Library families are fed by the policies' events: a forced-open breaker is a transition.
    ops.set_breaker(&c, "primary", "forced_open").await;
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, r#"bulwark_circuit_breaker_state{upstream="primary"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_circuit_breaker_transitions_total{upstream="primary",from="closed",to="forced_open"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(get(&c, &ops.url("/api/x")).await.status, 503);
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(
            &m,
            r#"bulwark_requests_total{route="api",upstream="primary",code="503"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_circuit_breaker_rejected_total{upstream="primary"}"#
        ),
        Some(1.0),
        "{m}"
    );

    // Endpoint health follows the endpoint's state at scrape time.
    ops.set_available("primary", 0, false);
    let m = ops.metrics(&c).await;
    assert_eq!(sample(&m, &ep), Some(0.0), "{m}");
    let g = ops.admin_get(&c, "/metrics").await;
    assert!(g
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    ops.stop().await;
}

#[tokio::test]
async fn series_of_removed_upstreams_disappear_after_a_reload_and_counters_continue() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let yaml = |with_b: bool| {
        let mut y = format!(
            "upstreams:
  a:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{}}
",
            a.url()
        );
        if with_b {
            y.push_str(&format!(
                "  b:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{}}
",
                b.url()
            ));
        }
        y.push_str("routes:\n  - name: r\n    upstream: a\n");
        y
    };
    let ops = Ops::start(&yaml(true), None).await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    }
    let m = ops.metrics(&c).await;
    assert!(
        m.contains(r#"bulwark_circuit_breaker_state{upstream="b"}"#),
        "{m}"
    );

    ops.rewrite(&yaml(false));
    ops.reloader().reload().unwrap();
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    let m = ops.metrics(&c).await;
    // Its gauges are gone; what stays is its counters (they survive reloads, here at 0).
    for line in m.lines().filter(|l| l.contains(r#"upstream="b""#)) {
        let family = line.split('{').next().unwrap_or_default();
        assert!(family.ends_with("_total"), "{line}\n{m}");
    }
    assert_eq!(
        sample(
            &m,
            r#"bulwark_circuit_breaker_rejected_total{upstream="b"}"#
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_requests_total{route="r",upstream="a",code="200"}"#
        ),
        Some(3.0),
        "{m}"
    );
    ops.stop().await;
}

#[tokio::test]
async fn route_decisions_are_counted_retries_budget_timeouts_fallbacks() {
    let bad = Upstream::status("bad", 503).await;
    let dead = dead_url().await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  flaky:
    endpoints: [{{url: '{}'}}]
  gone:
    endpoints: [{{url: '{}'}}]
routes:
  - name: retried
    match: {{ path_prefix: /r/ }}
    upstream: flaky
    retry:
      attempts: 3
      on: [5xx]
      backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }}
      budget: {{ ratio: 0.0, min_per_second: 1, window: 2s }}
  - name: guarded
    match: {{ path_prefix: /g/ }}
    upstream: gone
    fallback: {{ status: 200, body: 'cached' }}
",
            bad.url(),
            dead
        ),
        Some("t"),
    )
    .await;
    let c = client();
    // The budget holds 2 retries (1/s x 2 s, ratio 0): the first request uses both, the second
    // finds none.
    assert_eq!(get(&c, &ops.url("/r/1")).await.status, 503);
    let second = get(&c, &ops.url("/r/2")).await;
    assert_eq!(second.header("x-bulwark-reason"), Some("budget_exhausted"));
    assert_eq!(bad.hits(), 4);
    // A connect failure on the guarded route: its fallback answers.
    let g = get(&c, &ops.url("/g/1")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.header("x-bulwark-reason"), Some("fallback"));

    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(
            &m,
            r#"bulwark_retry_attempts_total{route="retried",reason="5xx"}"#
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_retry_budget_exhausted_total{route="retried"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_fallback_total{route="guarded",kind="upstream_error"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

/// `bulwark_endpoint_healthy` is 1 only while the endpoint may receive traffic: a quota cooldown (a
/// 429 with `Retry-After`) makes it 0, as an ejection does.
#[tokio::test]
async fn an_endpoint_in_a_quota_cooldown_is_not_counted_healthy() {
    let up = Upstream::start(
        "quota",
        std::sync::Arc::new(|_req| {
            Box::pin(async move {
                let mut r = reply("quota", 429, "slow down");
                r.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("60"));
                r
            })
        }),
    )
    .await;
    let ops = Ops::start(&one_route(&up.url(), ""), None).await;
    let c = client();
    let healthy = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("bulwark_endpoint_healthy{"))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(healthy(&ops.metrics(&c).await).as_deref(), Some("1"));
    assert_eq!(get(&c, &ops.url("/")).await.status, 429);
    assert_eq!(healthy(&ops.metrics(&c).await).as_deref(), Some("0"));
    ops.stop().await;
}

#[tokio::test]
async fn counters_the_config_can_move_exist_at_zero_before_any_event() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let ops = Ops::start(
        &format!(
            "admission: {{ max_concurrent: 8 }}
upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{}}
    bulkhead: {{ max_concurrent: 8 }}
    rate_limit: {{ per_second: 1000 }}
  spare:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ enabled: false }}
routes:
  - name: full
    match: {{ path_prefix: /full/ }}
    upstream: primary
    failover: [spare]
    retry:
      attempts: 2
      per_try_timeout: 1s
      on: [5xx, connect_failure, 429]
      budget: {{ ratio: 0.2, min_per_second: 1, window: 10s }}
    hedge: {{ delay: 50ms }}
    client_rate_limit: {{ per_second: 100 }}
    fault: {{ delay: {{ duration: 1ms, percent: 0.001 }} }}
  - name: plain
    upstream: spare
    retry: {{ attempts: 1 }}
",
            a.url(),
            b.url()
        ),
        Some("t"),
    )
    .await;
    let c = client();
    let m = ops.metrics(&c).await;
    for series in [
        r#"bulwark_circuit_breaker_rejected_total{upstream="primary"}"#,
        r#"bulwark_bulkhead_rejected_total{upstream="primary"}"#,
        r#"bulwark_rate_limited_total{name="primary"}"#,
        r#"bulwark_timeouts_total{route="full",kind="total"}"#,
        r#"bulwark_timeouts_total{route="full",kind="attempt"}"#,
        r#"bulwark_retry_attempts_total{route="full",reason="5xx"}"#,
        r#"bulwark_retry_attempts_total{route="full",reason="upstream_error"}"#,
        r#"bulwark_retry_attempts_total{route="full",reason="429"}"#,
        r#"bulwark_retry_attempts_total{route="full",reason="failover"}"#,
        r#"bulwark_retry_budget_exhausted_total{route="full"}"#,
        r#"bulwark_hedges_total{route="full"}"#,
        r#"bulwark_client_rate_limited_total{route="full"}"#,
        r#"bulwark_faults_total{route="full",kind="delay"}"#,
        r#"bulwark_shed_total{reason="queue_full",priority="low"}"#,
        r#"bulwark_shed_total{reason="timeout",priority="critical"}"#,
        r#"bulwark_timeouts_total{route="plain",kind="total"}"#,
    ] {
        assert_eq!(sample(&m, series), Some(0.0), "{series}\n{m}");
    }
    // Nothing the config cannot move: no breaker on `spare`, no retries on `plain`, no abort.
    for absent in [
        r#"bulwark_circuit_breaker_rejected_total{upstream="spare"}"#,
        r#"bulwark_retry_attempts_total{route="plain""#,
        r#"bulwark_retry_attempts_total{route="full",reason="timeout"}"#,
        r#"bulwark_faults_total{route="full",kind="abort"}"#,
        r#"bulwark_hedges_total{route="plain"}"#,
    ] {
        assert!(!m.contains(absent), "{absent}\n{m}");
    }
    // They count from there.
    assert_eq!(get(&c, &ops.url("/full/x")).await.status, 200);
    assert_eq!(get(&c, &ops.url("/other")).await.status, 200);
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, r#"bulwark_hedges_total{route="full"}"#),
        Some(0.0),
        "{m}"
    );
    ops.stop().await;
}

#[tokio::test]
async fn client_and_upstream_connections_are_exported() {
    let up = Upstream::named("a").await;
    let ops = Ops::start(&one_route(&up.url(), ""), None).await;
    let c = client();
    let m = ops.metrics(&c).await;
    assert_eq!(sample(&m, "bulwark_connections_open"), Some(0.0), "{m}");
    assert_eq!(
        sample(&m, "bulwark_connections_accepted_total"),
        Some(0.0),
        "{m}"
    );
    let endpoint = |name: &str| format!(r#"{name}{{upstream="u",endpoint="{}"}}"#, up.url());
    let pooled = endpoint("bulwark_upstream_connections_pooled");
    let opened = endpoint("bulwark_upstream_connections_opened_total");
    assert_eq!(sample(&m, &pooled), Some(0.0), "{m}");
    assert_eq!(sample(&m, &opened), Some(0.0), "{m}");

    // Three keep-alive clients, four requests each, one after another: one upstream connection
    // carries them all.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(RawClient::connect_to(ops.proxy).await);
    }
    for _ in 0..4 {
        for rc in &mut clients {
            rc.send(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n").await;
            assert_eq!(rc.response(false).await.status, 200);
        }
    }
    let m = ops.metrics(&c).await;
    assert_eq!(sample(&m, "bulwark_connections_open"), Some(3.0), "{m}");
    assert_eq!(
        sample(&m, "bulwark_connections_accepted_total"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(sample(&m, &opened), Some(1.0), "{m}");
    assert_eq!(sample(&m, &pooled), Some(1.0), "{m}");

    drop(clients);
    eventually(10, "connections closed", || async {
        sample(&ops.metrics(&c).await, "bulwark_connections_open") == Some(0.0)
    })
    .await;
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, "bulwark_connections_accepted_total"),
        Some(3.0),
        "{m}"
    );
    ops.stop().await;
}

/// A pooled connection the upstream has closed is not counted in
/// `bulwark_upstream_connections_pooled` (it was, until the next checkout or the reaper). Found
/// by a review.
#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_counted() {
    let up =
        RawUpstream::answering_once(|_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
            .await;
    let ops = Ops::start(&one_route(&up.url(), ""), None).await;
    let c = client();
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    let pooled = format!(
        r#"bulwark_upstream_connections_pooled{{upstream="u",endpoint="{}"}}"#,
        up.url()
    );
    eventually(2, "the closed connection is not counted", || async {
        sample(&ops.metrics(&c).await, &pooled) == Some(0.0)
    })
    .await;
    let m = ops.metrics(&c).await;
    let opened = pooled.replace("pooled", "opened_total");
    assert_eq!(sample(&m, &opened), Some(1.0), "{m}");
    ops.stop().await;
}
