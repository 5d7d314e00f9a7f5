//! What a client (and the metrics) see when the gateway acts across retries, hedging and failover
//! chains: found by a review, each test failed before its fix.
mod admin_support;
mod support;

use std::time::Duration;

use admin_support::*;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn post(url: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// A raw upstream that reads a request head and answers `101 Switching Protocols` to it (a
/// request that offered no upgrade), then reads on (the rest of the body) until the gateway
/// closes.
async fn switches_anyway() -> RawUpstream {
    RawUpstream::start(|mut s, _| async move {
        let mut buf = Vec::new();
        if read_head_only(&mut s, &mut buf).await.is_none() {
            return;
        }
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            )
            .await;
        let mut tmp = [0u8; 8192];
        while matches!(s.read(&mut tmp).await, Ok(n) if n > 0) {}
    })
    .await
}

/// "An upstream that answers `101 Switching Protocols` anyway gets the client a 502": for an upload
/// streamed past `retry_buffer` (hyper's client) too, as a failed attempt (counted as a 502,
/// with `x-bulwark-attempts`, replaced by the route's fallback). It was taken for a success:
/// metrics counted a `101` the client never got, and the fallback was not used.
#[tokio::test]
async fn a_101_to_a_streamed_upload_is_a_counted_502_and_the_fallback_replaces_it() {
    let up = switches_anyway().await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: plain
    match: {{ path_prefix: /plain/ }}
    upstream: u
    retry_buffer: 1KiB
  - name: fb
    upstream: u
    retry_buffer: 1KiB
    fallback: {{ status: 503, body: 'sorry' }}
",
            up.url()
        ),
        None,
    )
    .await;
    let c = client();
    let r = send(&c, post(&ops.url("/plain/x"), vec![b'a'; 8 * 1024])).await;
    let fb = send(&c, post(&ops.url("/fb/x"), vec![b'a'; 8 * 1024])).await;
    let m = ops.metrics(&c).await;
    let code = |code: &str| {
        sample(
            &m,
            &format!(r#"bulwark_requests_total{{route="plain",upstream="u",code="{code}"}}"#),
        )
    };
    assert_eq!(
        (
            r.status.as_u16(),
            r.header("x-bulwark-reason"),
            r.header("x-bulwark-attempts"),
            code("101"),
            code("502"),
        ),
        (502, Some("upstream_error"), Some("1"), None, Some(1.0)),
        "(status, reason, attempts, metrics 101, metrics 502)"
    );
    assert_eq!(
        (fb.status.as_u16(), fb.header("x-bulwark-reason"), fb.text()),
        (503, Some("fallback"), "sorry".to_owned()),
        "the route's fallback replaces the failure"
    );
    ops.stop().await;
}

/// The same over HTTP/2 (where a 101 cannot be sent at all): a 502, not a stream reset.
#[tokio::test]
async fn a_101_to_a_streamed_upload_gives_an_http2_client_a_502() {
    let up = switches_anyway().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
    retry_buffer: 1KiB
",
        up.url()
    ))
    .await;
    let c = h2c_client();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        c.request(post(&gw.url("/x"), vec![b'a'; 8 * 1024])),
    )
    .await
    .expect("no answer in 10s");
    let resp = resp.expect("the stream failed instead of a 502");
    assert_eq!(resp.status().as_u16(), 502);
    assert_eq!(
        resp.headers()
            .get("x-bulwark-reason")
            .and_then(|v| v.to_str().ok()),
        Some("upstream_error")
    );
    gw.stop().await;
}

/// `bulwark_timeouts_total{kind="total"}` counts requests that hit the route's deadline: once for a
/// hedged request whose original and hedge were both in flight then (each attempt counted it).
#[tokio::test]
async fn a_hedged_request_that_hits_its_deadline_is_one_total_timeout() {
    let (s1, s2) = (Silent::start().await, Silent::start().await);
    let ops = Ops::start(
        &format!(
            "upstreams:
  two: {{ endpoints: [{{url: '{}'}}, {{url: '{}'}}] }}
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
    let r = get(&c, &ops.url("/x")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (504, Some("timeout"))
    );
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, r#"bulwark_timeouts_total{route="two",kind="total"}"#),
        Some(1.0),
        "{m}"
    );
    ops.stop().await;
}

/// A primary that got the request and failed (timed out, or reset the connection), then a
/// failover upstream whose breaker is open: the client gets the primary's failure (504, 502),
/// not 503 `circuit_open`, which says the request went nowhere (it was delivered, and may have
/// been processed). `circuit_open` is for a chain whose every breaker is open.
#[tokio::test]
async fn a_sent_request_that_failed_is_not_reported_as_circuit_open_by_a_refused_failover() {
    let slow = Silent::start().await;
    let resets = RawUpstream::start(|mut s, _| async move {
        let mut buf = Vec::new();
        let _ = read_head(&mut s, &mut buf).await; // then dropped: no answer
    })
    .await;
    let b = Upstream::named("b").await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  slow: {{ endpoints: [{{url: '{}'}}] }}
  resets: {{ endpoints: [{{url: '{}'}}] }}
  b:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ window: {{ kind: count, size: 10 }}, minimum_calls: 1, failure_rate_threshold: 50, open_duration: 1m }}
routes:
  - name: t
    match: {{ path_prefix: /t/ }}
    upstream: slow
    failover: [b]
    timeout: 10s
    retry: {{ attempts: 1, per_try_timeout: 200ms }}
  - name: r
    upstream: resets
    failover: [b]
    timeout: 10s
    retry: {{ attempts: 1 }}
",
            slow.url(),
            resets.url(),
            b.url()
        ),
        Some("answers-token"),
    )
    .await;
    let c = client();
    ops.set_breaker(&c, "b", "forced_open").await;
    let r = get(&c, &ops.url("/t/x")).await;
    let t = (
        r.status.as_u16(),
        r.header("x-bulwark-reason").map(str::to_owned),
        r.header("x-bulwark-attempts").map(str::to_owned),
    );
    let r = get(&c, &ops.url("/r/x")).await;
    let rr = (
        r.status.as_u16(),
        r.header("x-bulwark-reason").map(str::to_owned),
        r.header("x-bulwark-attempts").map(str::to_owned),
    );
    assert_eq!(b.hits(), 0);
    assert_eq!(
        (t, rr),
        (
            (504, Some("timeout".to_owned()), Some("1".to_owned())),
            (502, Some("upstream_error".to_owned()), Some("1".to_owned()))
        ),
        "(timed out then refused, reset then refused)"
    );
    ops.stop().await;
}
