//! The access log: one line per request, including the answers given before a request is parsed
//! and the requests dropped before their answer.
mod admin_support;
mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use admin_support::*;
use support::*;

fn access_lines(buf: &Arc<Mutex<Vec<u8>>>) -> Vec<String> {
    String::from_utf8_lossy(&buf.lock().unwrap())
        .lines()
        .filter(|l| l.contains("bulwark::access"))
        .map(str::to_owned)
        .collect()
}

/// A head the HTTP/1.1 loop refuses itself (malformed: 400; far over `max_header_bytes`: 431) has
/// a line, as the 431 for a head only a little over the limit (answered by the request handler)
/// has.
#[tokio::test]
async fn heads_refused_while_reading_have_a_line() {
    let (buf, _guard) = capture_logs();
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(
        &up.url(),
        "logging: { access_log: true }\nlimits: { max_header_bytes: 1KiB }\n",
    ))
    .await;
    let pad = |n: usize| {
        format!(
            "GET /pad HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(n)
        )
    };
    assert!(raw(gw.addr, pad(1100).as_bytes())
        .await
        .starts_with("HTTP/1.1 431"));
    assert!(raw(gw.addr, pad(20_000).as_bytes())
        .await
        .starts_with("HTTP/1.1 431"));
    let bad = raw(
        gw.addr,
        b"GET /malformed HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    gw.stop().await;
    let lines = access_lines(&buf);
    let with = |s: &str| lines.iter().filter(|l| l.contains(s)).count();
    assert_eq!(with("status=431"), 2, "{}", lines.join("\n"));
    assert_eq!(with("status=400"), 1, "{}", lines.join("\n"));
    assert!(lines
        .iter()
        .any(|l| l.contains("status=400") && l.contains("path=\"-\"")));
}

/// A request the client abandons while it is forwarded gets a 499 `client_closed` line (nginx's
/// 499), with its route and the attempt it sent: it reached the upstream, and left no trace
/// before.
#[tokio::test]
async fn a_request_the_client_abandons_has_a_499_line() {
    let (buf, _guard) = capture_logs();
    let up = Silent::start().await;
    let gw = Gateway::start(&one_route(&up.url(), "logging: { access_log: true }\n")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /abandoned-path HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let accepted = up.accepted.clone();
    wait_until(10, || accepted.load(Ordering::SeqCst) == 1).await;
    drop(c);
    // The gateway gave the request up (its upstream connection closed).
    let closed = up.closed.clone();
    wait_until(10, || closed.load(Ordering::SeqCst) == 1).await;
    gw.stop().await;
    let lines = access_lines(&buf);
    let line = lines
        .iter()
        .find(|l| l.contains("/abandoned-path"))
        .unwrap_or_else(|| panic!("no line:\n{}", lines.join("\n")));
    assert!(line.contains("status=499"), "{line}");
    assert!(line.contains("reason=\"client_closed\""), "{line}");
    assert!(line.contains("route=\"route0\""), "{line}");
    assert!(line.contains("upstream=\"u\""), "{line}");
    assert!(line.contains("attempts=1"), "{line}");
}

/// An HTTP/2 `CONNECT` the gateway refuses (400, answered before the request handler) has a line,
/// as the same 400 over HTTP/1.1 has.
#[tokio::test]
async fn a_refused_http2_connect_has_a_line() {
    let (buf, _guard) = capture_logs();
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(&up.url(), "logging: { access_log: true }\n")).await;
    let mut send = h2c_sender(gw.addr).await;
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("http://gw/h2-connect-refused")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("something-else"));
    let r = send.send_request(req).await.unwrap();
    assert_eq!(r.status(), 400);
    gw.stop().await;
    let lines = access_lines(&buf);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("status=400") && l.contains("method=CONNECT")),
        "{}",
        lines.join("\n")
    );
}

/// The access log's `attempts` is "upstream attempts sent". A streamed (chunked) request body that
/// grows past `max_body_bytes` after the request went upstream ends in 413 `body_too_large`, and
/// the line says `attempts=0` although the upstream received the request.
#[tokio::test]
async fn a_413_after_the_request_went_upstream_logs_its_attempt() {
    let (logs, _guard) = capture_logs();
    let up = Upstream::echo().await;
    let gw = Gateway::start(&one_route(
        &up.url(),
        "logging: { access_log: true }\nlimits: { max_body_bytes: 1KiB }\n",
    ))
    .await;
    let mut raw = RawClient::connect(&gw).await;
    raw.send(b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n")
        .await;
    // The request (head and first chunk) reaches the upstream before the body is over the limit.
    wait_until(10, || up.hits() == 1).await;
    let big = format!("800\r\n{}\r\n0\r\n\r\n", "x".repeat(0x800));
    raw.send(big.as_bytes()).await;
    let (resp, _) = raw.read_response(false).await;
    assert_eq!(resp.status, 413);
    assert_eq!(resp.header("x-bulwark-reason"), Some("body_too_large"));
    gw.stop().await;
    let lines = access_lines(&logs);
    let line = lines
        .iter()
        .find(|l| l.contains("status=413"))
        .unwrap_or_else(|| panic!("no 413 line: {lines:?}"));
    assert!(
        line.contains("attempts=1"),
        "the upstream received the request (hits {}): {line}",
        up.hits()
    );
}

/// A request the failover upstream served is logged with the upstream that served it (as nginx's
/// `$upstream_addr` and Envoy's upstream cluster show the one used), not the route's primary.
/// Found by a review.
#[tokio::test]
async fn the_access_log_names_the_upstream_that_served_a_failover() {
    let (buf, _guard) = capture_logs();
    let primary = Upstream::named("primary").await;
    let backup = Upstream::named("backup").await;
    let gw = Gateway::start(&format!(
        "logging: {{ access_log: true }}\nupstreams:\n  primary: {{ endpoints: [{{url: '{}'}}] }}\n  backup: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - name: r\n    upstream: primary\n    failover: [backup]\n",
        primary.url(),
        backup.url()
    ))
    .await;
    gw.set_available("primary", 0, false);
    let c = client();
    let g = get(&c, &gw.url("/served-by-backup")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.text(), "backup");
    gw.stop().await;
    let lines = access_lines(&buf);
    let line = lines
        .iter()
        .find(|l| l.contains("/served-by-backup"))
        .unwrap_or_else(|| panic!("no line:\n{}", lines.join("\n")));
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains("upstream=\"backup\""), "{line}");
}

// A client that goes away in the middle of its upload is a request dropped before its answer:
// counted and logged as a 499 `client_closed`, not as a 400 `bad_request` (a malformed request)
// that no client received (found by a review; each failed before its fix).

/// Access log on, one upstream `u` at `url`, one route `r`.
fn upload_config(url: &str) -> String {
    format!(
        "logging: {{ access_log: true }}\nupstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - name: r\n    upstream: u\n"
    )
}

/// Awaits the request's series in `bulwark_requests_total`, then checks it is a 499 (no 400) in
/// the metrics and the access log, with the attempt it sent.
async fn assert_counted_and_logged_as_499(ops: &Ops, logs: &Arc<Mutex<Vec<u8>>>, path: &str) {
    let c = client();
    eventually(10, "the request is counted", || async {
        ops.metrics(&c)
            .await
            .contains(r#"bulwark_requests_total{route="r",upstream="u","#)
    })
    .await;
    let m = ops.metrics(&c).await;
    let counted: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("bulwark_requests_total"))
        .collect();
    assert_eq!(
        sample(
            &m,
            r#"bulwark_requests_total{route="r",upstream="u",code="499"}"#
        ),
        Some(1.0),
        "the client went away mid-upload; counted as: {counted:?}"
    );
    assert_eq!(
        sample(
            &m,
            r#"bulwark_requests_total{route="r",upstream="u",code="400"}"#
        ),
        None,
        "no client received a 400: {counted:?}"
    );
    let lines = access_lines(logs);
    let line = lines
        .iter()
        .find(|l| l.contains(path))
        .unwrap_or_else(|| panic!("no line:\n{}", lines.join("\n")));
    assert!(line.contains("status=499"), "{line}");
    assert!(line.contains("reason=\"client_closed\""), "{line}");
    assert!(line.contains("attempts=1"), "{line}");
}

/// HTTP/1.1: the client declares a 100 000-byte body, sends 10 bytes (the request goes upstream,
/// streamed), then closes its connection before any answer.
#[tokio::test]
async fn an_h1_client_that_leaves_mid_upload_is_a_499_not_a_400() {
    let (logs, _guard) = capture_logs();
    let up = Silent::start().await;
    let ops = Ops::start(&upload_config(&up.url()), None).await;
    let mut raw = RawClient::connect_to(ops.proxy).await;
    raw.send(
        b"POST /h1-upload-gone HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789",
    )
    .await;
    let accepted = up.accepted.clone();
    wait_until(10, || accepted.load(Ordering::SeqCst) == 1).await;
    drop(raw);
    // The gateway gave the request up (its upstream connection closed).
    let closed = up.closed.clone();
    wait_until(10, || closed.load(Ordering::SeqCst) == 1).await;
    assert_counted_and_logged_as_499(&ops, &logs, "/h1-upload-gone").await;
    ops.stop().await;
}

/// HTTP/2: the same upload, and the client's connection ends (its process died, its network went
/// away) before any answer.
#[tokio::test]
async fn an_h2_client_whose_connection_ends_mid_upload_is_a_499_not_a_400() {
    let (logs, _guard) = capture_logs();
    let up = Silent::start().await;
    let ops = Ops::start(&upload_config(&up.url()), None).await;
    let tcp = tokio::net::TcpStream::connect(ops.proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = http::Request::post(format!("http://{}/h2-upload-gone", ops.proxy))
        .header("content-length", "100000")
        .body(ChanBody(rx))
        .unwrap();
    let response = tokio::spawn(send.send_request(req));
    tx.send(http_body::Frame::data(bytes::Bytes::from_static(
        b"0123456789",
    )))
    .await
    .unwrap();
    let accepted = up.accepted.clone();
    wait_until(10, || accepted.load(Ordering::SeqCst) == 1).await;
    // The connection's task is dropped: its socket closes.
    conn.abort();
    response.abort();
    let closed = up.closed.clone();
    wait_until(10, || closed.load(Ordering::SeqCst) == 1).await;
    assert_counted_and_logged_as_499(&ops, &logs, "/h2-upload-gone").await;
    drop(tx);
    ops.stop().await;
}
