//! Streamed request bodies that fail on the client's side towards HTTP/2 upstreams, and streamed
//! uploads an upstream answers early (found by a review; each test failed before its fix).
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// `POST`s `total` bytes over HTTP/2 (h2c) without a length, 16 KiB a frame; the status and
/// `x-bulwark-reason` of the answer.
async fn h2_unsized_post(gw: &Gateway, total: usize) -> (u16, Option<String>) {
    let mut send = h2c_sender(gw.addr).await;
    let (tx, rx) = mpsc::channel(4);
    let req = Request::post("http://gw/upload")
        .body(ChanBody(rx))
        .unwrap();
    let feeder = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'z'; 16 * 1024]);
        let mut sent = 0;
        while sent < total {
            if tx.send(Frame::data(chunk.clone())).await.is_err() {
                return;
            }
            sent += chunk.len();
        }
    });
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("no answer within 20 s")
        .expect("request failed");
    feeder.abort();
    let reason = resp
        .headers()
        .get("x-bulwark-reason")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), reason)
}

/// A chunked `POST` of `total` bytes (16 KiB chunks) on a new raw connection; its response (the
/// writes may fail once the gateway has answered).
async fn chunked_post(gw: &Gateway, total: usize) -> RawResponse {
    let mut c = RawClient::connect(gw).await;
    c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    let mut chunk = format!("{:x}\r\n", 16 * 1024).into_bytes();
    chunk.extend(vec![b'q'; 16 * 1024]);
    chunk.extend_from_slice(b"\r\n");
    let mut sent = 0;
    while sent < total {
        if c.s.write_all(&chunk).await.is_err() {
            break;
        }
        sent += 16 * 1024;
    }
    let _ = c.s.write_all(b"0\r\n\r\n").await;
    c.read_response(false).await.0
}

/// One `http2: true` upstream at `url`, behind a breaker that opens after 2 failed calls.
fn h2_upstream_with_breaker(url: &str, limits: &str) -> String {
    format!(
        "limits: {{ {limits} }}\nupstreams:\n  u:\n    http2: true\n    endpoints: [{{url: '{url}'}}]\n    circuit_breaker: {{ minimum_calls: 2, open_duration: 60s }}\nroutes:\n  - upstream: u\n"
    )
}

/// `limits.max_body_bytes`: a streamed body gets 413 when it crosses the limit, and a client's
/// body error is not the upstream's fault, also towards an `http2: true` upstream (whose client
/// reports the body's failure only as a stream it reset). Before, it was a 502 charged to the
/// upstream's breaker: two oversized uploads opened it for everyone.
#[tokio::test]
async fn a_streamed_upload_over_max_body_bytes_to_an_http2_upstream_gets_413_and_spares_the_upstream(
) {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&h2_upstream_with_breaker(&up.url(), "max_body_bytes: 1MiB")).await;
    // Chunked over HTTP/1.1, and without a length over HTTP/2: the limit is crossed mid-stream.
    let r = chunked_post(&gw, 3 << 20).await;
    assert_eq!(
        (r.status, r.header("x-bulwark-reason")),
        (413, Some("body_too_large")),
        "HTTP/1.1 chunked upload"
    );
    let (status, reason) = h2_unsized_post(&gw, 3 << 20).await;
    assert_eq!(
        (status, reason.as_deref()),
        (413, Some("body_too_large")),
        "HTTP/2 upload without a length"
    );
    // The client's oversized bodies are not the upstream's failures: its breaker stays closed.
    let ok = get(&client(), &gw.url("/")).await;
    assert_eq!(ok.status, 200, "{:?}", ok.header("x-bulwark-reason"));
    gw.stop().await;
}

/// `limits.idle_timeout`: "a request body the client stops sending for this long, before the
/// response has started, gets 408 `body_timeout`", and a client stalling its upload "counts for
/// nothing here or in the circuit breaker", also towards an `http2: true` upstream.
#[tokio::test]
async fn an_upload_stalled_before_the_response_to_an_http2_upstream_gets_408() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&h2_upstream_with_breaker(&up.url(), "idle_timeout: 1s")).await;
    for _ in 0..2 {
        let mut c = RawClient::connect(&gw).await;
        c.send(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await;
        // ...and nothing more.
        let (r, _) = c.read_response(false).await;
        assert_eq!(
            (r.status, r.header("x-bulwark-reason")),
            (408, Some("body_timeout")),
            "the client stalled, not the upstream"
        );
    }
    let ok = get(&client(), &gw.url("/")).await;
    assert_eq!(ok.status, 200, "{:?}", ok.header("x-bulwark-reason"));
    gw.stop().await;
}

/// "An upstream that answers before it has read the whole request (an early 413 or 401 to an
/// upload) and resets the connection gets its answer to the client, even when the reset made the
/// gateway's write fail": also for an upload streamed past `retry_buffer` (the kind an upstream
/// refuses early), over HTTP/1.1 with a length and over HTTP/2 without one.
#[tokio::test]
async fn an_early_413_from_the_upstream_during_a_streamed_upload_reaches_the_client() {
    let up = early_413_upstream().await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_body_bytes: 32MiB")).await;
    // HTTP/1.1 with a length over retry_buffer.
    const BODY: usize = 4 << 20;
    let mut c = RawClient::connect(&gw).await;
    c.send(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n").as_bytes(),
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(10), c.s.write_all(&vec![b'x'; BODY])).await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(
        (r.status, r.header("x-bulwark-reason")),
        (413, None),
        "HTTP/1.1 upload: the upstream's early 413 was replaced"
    );
    assert_eq!(r.body, b"too big!");
    // HTTP/2 without a length.
    let (status, reason) = h2_unsized_post(&gw, BODY).await;
    assert_eq!(
        (status, reason.as_deref()),
        (413, None),
        "HTTP/2 upload: the upstream's early 413 was replaced"
    );
    gw.stop().await;
}

/// Sends a chunked POST through `gw` whose body takes `pause` to arrive (one chunk, a pause, the
/// last chunk), and reads the answer.
async fn slow_upload(gw: &Gateway, pause: Duration) -> RawResponse {
    let mut c = RawClient::connect(gw).await;
    c.send(b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    // The client's own pace: this is the slow upload, not a wait for the gateway.
    tokio::time::sleep(pause).await;
    c.send(b"0\r\n\r\n").await;
    c.response(false).await
}

/// A slow upload is the client's time, not the upstream's: an upstream that answers as soon as
/// it has the whole body is not a slow call, or any client could open the breaker by uploading
/// slowly (review ix2: two 700 ms uploads against `slow_call_duration: 300ms` opened it, and
/// every other client got 503 `circuit_open`).
#[tokio::test]
async fn slow_uploads_do_not_open_the_breaker_on_slow_calls() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    circuit_breaker:
      window: {{ kind: count, size: 10 }}
      minimum_calls: 2
      slow_call_duration: 300ms
      slow_call_rate_threshold: 50
routes:
  - upstream: u
",
        up.url()
    ))
    .await;
    for _ in 0..2 {
        let r = slow_upload(&gw, Duration::from_millis(700)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello");
    }
    let breaker = gw
        .state
        .runtime()
        .upstream("u")
        .unwrap()
        .policies
        .breaker()
        .unwrap()
        .state();
    assert_eq!(breaker, bulwark::events::BreakerState::Closed);
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (200, None)
    );
    gw.stop().await;
}
