//! Metrics fixes from review: a deadline hit while buffering the request body is a counted timeout
//! (and fallback); a hedge refused by the budget counts as budget exhaustion; retries are counted
//! when sent, by what failed; a removed upstream's breaker gauge stays removed.
mod admin_support;
mod support;

use std::sync::Arc;

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

/// `bulwark_circuit_breaker_state` of an upstream a reload removed is dropped at the next scrape,
/// but a request still in flight on the old runtime that trips the removed upstream's breaker
/// re-creates the series (the library's transition event), and nothing ever removes it again:
/// `/metrics` reports, for ever, an open breaker of an upstream that does not exist.
#[tokio::test]
async fn a_removed_upstreams_breaker_gauge_is_not_brought_back_by_a_request_in_flight() {
    let a = Upstream::named("a").await;
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let b = Upstream::start(
        "b",
        Arc::new(move |_req| {
            let r = r.clone();
            Box::pin(async move {
                r.notified().await;
                reply("b", 500, "b failed")
            })
        }),
    )
    .await;
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
    circuit_breaker: {{ minimum_calls: 1 }}
",
                b.url()
            ));
        }
        y.push_str("routes:\n");
        if with_b {
            y.push_str("  - name: rb\n    match: { path_prefix: /b/ }\n    upstream: b\n");
        }
        y.push_str("  - name: ra\n    upstream: a\n");
        y
    };
    let ops = Ops::start(&yaml(true), None).await;
    let c = client();
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, r#"bulwark_circuit_breaker_state{upstream="b"}"#),
        Some(0.0),
        "{m}"
    );

    // A request to `b` is in flight when a reload removes `b`.
    let in_flight = {
        let (c, url) = (c.clone(), ops.url("/b/slow"));
        tokio::spawn(async move { get(&c, &url).await.status })
    };
    wait_until(10, || b.hits() == 1).await;
    ops.rewrite(&yaml(false));
    ops.reloader().reload().unwrap();
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, r#"bulwark_circuit_breaker_state{upstream="b"}"#),
        None,
        "removed at once: {m}"
    );

    // The old runtime's request ends with a 500, which opens `b`'s (old) breaker.
    release.notify_one();
    assert_eq!(in_flight.await.unwrap(), 500);
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    for _ in 0..2 {
        let m = ops.metrics(&c).await;
        assert_eq!(
            sample(&m, r#"bulwark_circuit_breaker_state{upstream="b"}"#),
            None,
            "a gauge for an upstream no longer in the config:\n{m}"
        );
    }
    ops.stop().await;
}

/// `bulwark_retry_attempts_total{reason}` is documented as "by what failed". With a primary tier
/// answering 503 and a backup tier that refuses connections, the second retry is started by a
/// connect failure, yet it is counted as `5xx` (the reason is read from the last response kept,
/// not from the attempt that just failed).
#[tokio::test]
async fn a_retry_after_a_connect_failure_is_counted_as_upstream_error() {
    let bad = Upstream::status("bad", 503).await;
    let dead = dead_url().await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  u:
    endpoints: [{{url: '{}', priority: 0}}, {{url: '{dead}', priority: 1}}]
routes:
  - name: r
    upstream: u
    retry:
      attempts: 3
      on: [5xx, connect_failure]
      backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }}
",
            bad.url()
        ),
        None,
    )
    .await;
    let c = client();
    let g = get(&c, &ops.url("/")).await;
    // First attempt: 503 (primary); second: connect failure (backup); third: 503 (primary again).
    assert_eq!(g.status, 503);
    assert_eq!(bad.hits(), 2);
    let m = ops.metrics(&c).await;
    ops.stop().await;
    let reason = |r: &str| {
        sample(
            &m,
            &format!(r#"bulwark_retry_attempts_total{{route="r",reason="{r}"}}"#),
        )
    };
    assert_eq!(
        (reason("5xx"), reason("upstream_error")),
        (Some(1.0), Some(1.0)),
        "one retry after the 503, one after the connect failure:\n{m}"
    );
}

/// A retry that sends nothing (the breaker the failed attempt just opened refuses it) gives its
/// budget token back and is not an attempt (`x-bulwark-attempts: 1`), as a hedge that sends
/// nothing is not counted in `bulwark_hedges_total`; but `bulwark_retry_attempts_total` counts it:
/// the operator sees one retry for a request the upstream received once.
#[tokio::test]
async fn a_retry_that_sends_nothing_is_not_counted_as_a_retry() {
    let bad = Upstream::status("bad", 503).await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ minimum_calls: 1, open_duration: 60s }}
routes:
  - name: r
    upstream: u
    retry:
      attempts: 3
      on: [5xx]
      backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }}
",
            bad.url()
        ),
        None,
    )
    .await;
    let c = client();
    let g = get(&c, &ops.url("/")).await;
    assert_eq!(g.status, 503);
    assert_eq!(bad.hits(), 1, "the retry was refused by the open breaker");
    assert_eq!(g.header("x-bulwark-attempts"), Some("1"));
    let m = ops.metrics(&c).await;
    ops.stop().await;
    assert_eq!(
        sample(
            &m,
            r#"bulwark_circuit_breaker_rejected_total{upstream="u"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_retry_attempts_total{route="r",reason="5xx"}"#
        ),
        Some(0.0),
        "no retry was sent (the series exists from the start):\n{m}"
    );
}

/// A request its client abandons while it is forwarded is counted, as the 499 the access log
/// calls it (nginx's status for it), in `bulwark_requests_total` and the duration histogram: an
/// error rate computed from them no longer misses the requests clients gave up on.
#[tokio::test]
async fn a_request_the_client_abandons_is_counted_as_a_499() {
    let up = Silent::start().await;
    let ops = Ops::start(
        &format!(
            "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - name: r\n    upstream: u\n",
            up.url()
        ),
        None,
    )
    .await;
    let mut raw = RawClient::connect_to(ops.proxy).await;
    raw.send(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let accepted = up.accepted.clone();
    wait_until(10, || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    drop(raw);
    let closed = up.closed.clone();
    wait_until(10, || closed.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
    let c = client();
    let m = ops.metrics(&c).await;
    ops.stop().await;
    assert_eq!(
        sample(
            &m,
            r#"bulwark_requests_total{route="r",upstream="u",code="499"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_request_duration_seconds_count{route="r",upstream="u"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

/// The access-log lines captured so far.
fn access_lines(buf: &Arc<std::sync::Mutex<Vec<u8>>>) -> Vec<String> {
    String::from_utf8_lossy(&buf.lock().unwrap())
        .lines()
        .filter(|l| l.contains("bulwark::access"))
        .map(str::to_owned)
        .collect()
}

/// The one access-log line for `path`, once it is there.
async fn line_for(buf: &Arc<std::sync::Mutex<Vec<u8>>>, path: &str) -> String {
    let want = format!("path=\"{path}\"");
    wait_until(10, || access_lines(buf).iter().any(|l| l.contains(&want))).await;
    let lines: Vec<String> = access_lines(buf)
        .into_iter()
        .filter(|l| l.contains(&want))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines[0].clone()
}

/// A raw h2c upstream answering every stream with HEADERS (`:status: 200`, no END_STREAM) and,
/// in the same write, RST_STREAM(INTERNAL_ERROR): an answer broken from its start.
async fn h2_head_then_reset() -> std::net::SocketAddr {
    use support::h2raw::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                if tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.is_err() {
                    return;
                }
                let mut preface = [0u8; 24];
                if tcp.read_exact(&mut preface).await.is_err() {
                    return;
                }
                while let Some((kind, flags, stream, _)) = read_frame(&mut tcp).await {
                    match (kind, flags & 1) {
                        (SETTINGS, 0) => {
                            let _ = tcp.write_all(&frame(SETTINGS, 1, 0, &[])).await;
                        }
                        (HEADERS, _) => {
                            // `:status: 200` is HPACK static table index 8.
                            let mut out = frame(HEADERS, END_HEADERS, stream, &[0x88]);
                            out.extend(frame(RST_STREAM, 0, stream, &2u32.to_be_bytes()));
                            let _ = tcp.write_all(&out).await;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    addr
}

fn h2_upstream_config(addr: std::net::SocketAddr) -> String {
    format!(
        "logging: {{ access_log: true }}\nupstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    retry: {{ attempts: 1 }}\n"
    )
}

/// An HTTP/2 upstream's answer broken from its start (its stream reset right after the head) is
/// a reset, as for an HTTP/1.1 upstream: an HTTP/1.1 client gets the gateway's 502 and the access
/// log says 502, and an HTTP/2 client gets that 502 too, not a bare stream reset (review dn2: both
/// were logged and counted as the upstream's 200).
#[tokio::test]
async fn an_http2_upstream_answer_broken_from_its_start_is_the_502_the_clients_get() {
    let (buf, _guard) = capture_logs();
    let gw = Gateway::start(&h2_upstream_config(h2_head_then_reset().await)).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /h1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(
        (
            r.status,
            r.header("x-bulwark-reason"),
            r.header("x-bulwark-attempts")
        ),
        (502, Some("upstream_error"), Some("1")),
        "{r:?}"
    );
    let line = line_for(&buf, "/h1").await;
    assert!(line.contains("status=502"), "{line}");

    let g = get(&h2c_client(), &gw.url("/h2")).await;
    assert_eq!(
        (g.status.as_u16(), g.header("x-bulwark-reason")),
        (502, Some("upstream_error"))
    );
    let line = line_for(&buf, "/h2").await;
    assert!(line.contains("status=502"), "{line}");
    gw.stop().await;
}

/// An upload streamed past `retry_buffer` (hyper's client) answered with a chunked body broken at
/// its first chunk-size line: the client's 502 is what the access log says (review dn2: 200).
#[tokio::test]
async fn a_streamed_upload_answered_with_a_body_broken_from_its_start_is_logged_as_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (buf, _guard) = capture_logs();
    let up = RawUpstream::start(|mut s, _| async move {
        if read_head_only(&mut s, &mut Vec::new()).await.is_none() {
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n")
            .await;
        let mut tmp = [0u8; 8192];
        while matches!(s.read(&mut tmp).await, Ok(n) if n > 0) {}
    })
    .await;
    let gw = Gateway::start(&format!(
        "logging: {{ access_log: true }}\nupstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    retry_buffer: 1KiB\n",
        up.url()
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    let mut req = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 8192\r\n\r\n".to_vec();
    req.extend(vec![b'a'; 8192]);
    c.send(&req).await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(
        (r.status, r.header("x-bulwark-reason")),
        (502, Some("upstream_error")),
        "{r:?}"
    );
    let line = line_for(&buf, "/up").await;
    assert!(line.contains("status=502"), "{line}");
    gw.stop().await;
}
