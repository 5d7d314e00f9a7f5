//! A client that goes away in the middle of its upload is a request dropped before its answer:
//! counted and logged as a 499 `client_closed`, as the docs promise, not as a 400 `bad_request`
//! (a malformed request) that no client received (found by a review; failed before its fix).
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

fn config(url: &str) -> String {
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
    let ops = Ops::start(&config(&up.url()), None).await;
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
    let ops = Ops::start(&config(&up.url()), None).await;
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
