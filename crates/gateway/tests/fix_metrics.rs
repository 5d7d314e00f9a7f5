//! Metrics fixes from review: a deadline hit while buffering the request body is a counted timeout
//! (and fallback); a hedge refused by the budget counts as budget exhaustion.
mod admin_support;
mod support;

use admin_support::*;
use support::*;

#[tokio::test]
async fn body_buffering_timeouts_and_hedges_refused_by_the_budget_are_counted() {
    let ok = Upstream::named("ok").await;
    let silent = Silent::start().await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  ok: {{ endpoints: [{{url: '{}'}}] }}
  silent: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: buffered
    match: {{ path_prefix: /b/ }}
    upstream: ok
    timeout: 200ms
    retry: {{ attempts: 2 }}
    fallback: {{ status: 200, body: 'cached' }}
  - name: hedged
    match: {{ path_prefix: /h/ }}
    upstream: silent
    timeout: 300ms
    hedge: {{ delay: 20ms, max_hedges: 1 }}
    retry: {{ attempts: 1, budget: {{ ratio: 0, min_per_second: 0 }} }}
",
            ok.url(),
            silent.url()
        ),
        None,
    )
    .await;
    let c = client();
    // Half of the announced body, then nothing: the deadline ends the buffering.
    let resp = raw(
        ops.proxy,
        b"PUT /b/1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("x-bulwark-reason: fallback"), "{resp}");
    assert_eq!(ok.hits(), 0);
    let r = get(&c, &ops.url("/h/1")).await;
    assert_eq!(r.status, 504);
    assert_eq!(silent.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

    let m = ops.metrics(&c).await;
    for (series, want) in [
        (
            r#"bulwark_timeouts_total{route="buffered",kind="total"}"#,
            1.0,
        ),
        (
            r#"bulwark_fallback_total{route="buffered",kind="timeout"}"#,
            1.0,
        ),
        (
            r#"bulwark_retry_budget_exhausted_total{route="hedged"}"#,
            1.0,
        ),
        (
            r#"bulwark_timeouts_total{route="hedged",kind="total"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&m, series), Some(want), "{series}\n{m}");
    }
    ops.stop().await;
}

/// An upstream answer whose body is broken from its first byte (a bad first chunk-size line, in
/// the same write as the head): the client gets the gateway's 502, and the metrics count that
/// 502, not the upstream's 200.
#[tokio::test]
async fn a_body_broken_from_its_start_is_counted_as_the_502_the_client_got() {
    let up = RawUpstream::answering(|_| {
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec()
    })
    .await;
    let ops = Ops::start(
        &format!(
            "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - name: r\n    upstream: u\n    retry: {{ attempts: 1 }}\n",
            up.url()
        ),
        None,
    )
    .await;
    let c = client();
    let got = get(&c, &ops.url("/x")).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("x-bulwark-reason"), Some("upstream_error"));
    let m = ops.metrics(&c).await;
    let series =
        |code: &str| format!(r#"bulwark_requests_total{{route="r",upstream="u",code="{code}"}}"#);
    assert_eq!(sample(&m, &series("502")), Some(1.0), "{m}");
    assert_eq!(sample(&m, &series("200")), None, "{m}");
    ops.stop().await;
}

/// `bulwark_hedges_total` counts hedges that go to an endpoint: on a one-endpoint upstream a hedge
/// has nowhere to go (it never goes to the endpoint already tried), and is not counted; with two,
/// one hedge goes, and the next finds no endpoint left.
#[tokio::test]
async fn hedges_that_find_no_endpoint_are_not_counted() {
    let (s1, s2, s3) = (
        Silent::start().await,
        Silent::start().await,
        Silent::start().await,
    );
    let ops = Ops::start(
        &format!(
            "upstreams:
  one: {{ endpoints: [{{url: '{}'}}] }}
  two: {{ endpoints: [{{url: '{}'}}, {{url: '{}'}}] }}
routes:
  - name: one
    match: {{ path_prefix: /one/ }}
    upstream: one
    timeout: 200ms
    hedge: {{ delay: 20ms, max_hedges: 2 }}
  - name: two
    upstream: two
    timeout: 200ms
    hedge: {{ delay: 20ms, max_hedges: 2 }}
",
            s1.url(),
            s2.url(),
            s3.url()
        ),
        None,
    )
    .await;
    let c = client();
    assert_eq!(get(&c, &ops.url("/one/x")).await.status, 504);
    assert_eq!(get(&c, &ops.url("/two/x")).await.status, 504);
    let accepted = |s: &Silent| s.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        (accepted(&s1), accepted(&s2) + accepted(&s3)),
        (1, 2),
        "requests sent"
    );
    let m = ops.metrics(&c).await;
    let hedges = |route: &str| sample(&m, &format!(r#"bulwark_hedges_total{{route="{route}"}}"#));
    assert_eq!(hedges("one").unwrap_or(0.0), 0.0, "{m}");
    assert_eq!(hedges("two"), Some(1.0), "{m}");
    ops.stop().await;
}

/// A hedge the upstream refuses (here its full bulkhead) sends nothing and is not counted in
/// `bulwark_hedges_total`, as a hedge that finds no endpoint is not.
#[tokio::test]
async fn a_hedge_the_bulkhead_refuses_is_not_counted() {
    let (s1, s2) = (Silent::start().await, Silent::start().await);
    let ops = Ops::start(
        &format!(
            "upstreams:
  two:
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    bulkhead: {{ max_concurrent: 1, max_queued: 0 }}
routes:
  - name: two
    upstream: two
    timeout: 300ms
    hedge: {{ delay: 20ms, max_hedges: 1 }}
",
            s1.url(),
            s2.url()
        ),
        None,
    )
    .await;
    let c = client();
    assert_eq!(get(&c, &ops.url("/x")).await.status, 504);
    let accepted = |s: &Silent| s.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(accepted(&s1) + accepted(&s2), 1, "one request sent");
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, r#"bulwark_bulkhead_rejected_total{upstream="two"}"#),
        Some(1.0),
        "the hedge was refused: {m}"
    );
    let hedges = sample(&m, r#"bulwark_hedges_total{route="two"}"#);
    assert_eq!(hedges.unwrap_or(0.0), 0.0, "{m}");
    ops.stop().await;
}
