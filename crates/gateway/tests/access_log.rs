//! The access log: one line per request, including the answers given before a request is parsed
//! and the requests dropped before their answer.
mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

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
