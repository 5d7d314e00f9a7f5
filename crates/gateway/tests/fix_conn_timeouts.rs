//! Client connection timeouts: `header_read_timeout` runs from the first byte of a request head (so
//! slow-loris is cut), while an idle keep-alive connection lasts `idle_timeout`.
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

use support::limited_config as config;

/// Upstream `u` (answers its name) behind a gateway with `limits`.
async fn named_behind_gateway(limits: &str) -> (Upstream, Gateway) {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&config(&up.url(), limits)).await;
    (up, gw)
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn a_stalled_first_request_head_is_cut_after_header_read_timeout() {
    let (up, gw) = named_behind_gateway("header_read_timeout: 300ms, idle_timeout: 60s").await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    // Well under idle_timeout: the head clock closed it.
    assert!(c.closed_within(10).await, "slow-loris head not cut");
    assert_eq!(up.hits(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_head_on_a_keep_alive_connection_is_cut_after_header_read_timeout() {
    let (up, gw) = named_behind_gateway("header_read_timeout: 300ms, idle_timeout: 60s").await;
    let mut c = RawClient::connect(&gw).await;
    c.send(GET).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    c.send(b"GET / HTTP/1.1\r\nHo").await;
    assert!(c.closed_within(10).await, "slow-loris head not cut");
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_header_read_timeout_until_idle_timeout() {
    let (up, gw) = named_behind_gateway("header_read_timeout: 300ms, idle_timeout: 2s").await;
    let mut c = RawClient::connect(&gw).await;
    c.send(GET).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Idle for over three header_read_timeouts (the scenario, not a wait for state).
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.send(GET).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "second request not served: {r:?}");
    // Then, idle again, it is closed by idle_timeout.
    assert!(c.closed_within(15).await, "idle connection not closed");
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn an_http2_connection_is_not_timed_as_a_request_head() {
    let (_up, gw) = named_behind_gateway("header_read_timeout: 300ms, idle_timeout: 60s").await;
    let mut send = h2c_sender(gw.addr).await;
    // The preface and settings went out; no request for over three header_read_timeouts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..2 {
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            send.send_request(
                Request::get("http://x/h2")
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            ),
        )
        .await
        .expect("h2 request timed out")
        .expect("h2 connection was closed");
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_request_body_still_arriving_after_its_response_is_not_cut() {
    // The upstream answers at once and reads the body in the background, reporting it.
    let (up, mut bodies) = Upstream::reporting_bodies("u").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 60s",
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    // More body, then the rest after over three header_read_timeouts.
    c.send(b"1\r\n \r\n").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.send(b"5\r\nworld\r\n0\r\n\r\n").await;
    let got = tokio::time::timeout(Duration::from_secs(10), bodies.recv())
        .await
        .expect("the body did not reach the upstream")
        .unwrap();
    assert_eq!(got, "hello world");
    gw.stop().await;
}

/// `Expect: 100-continue` refused on its declared length (413): no 100, the refusal with
/// `connection: close`, and the gateway closes its side at once (then lingers), not after
/// `header_read_timeout` spent waiting for a body the client holds back (review hx1).
#[tokio::test]
async fn an_expect_continue_refusal_closes_promptly() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&config(
        &up.url(),
        "max_body_bytes: 4, header_read_timeout: 30s",
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(
        c.closed_within(8).await,
        "connection: close said, the connection kept open"
    );
    gw.stop().await;
}

/// A chunked upload answered (404) while it is still arriving: `connection: close`, and the
/// gateway closes its sending side at once, as `lingering_timeout` describes (review hx1).
#[tokio::test]
async fn a_refused_chunked_upload_closes_promptly() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        "limits: {{ header_read_timeout: 30s }}\nupstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - match: {{ path_prefix: /api }}\n    upstream: u\n",
        up.url()
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"POST /nope HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(
        c.closed_within(8).await,
        "connection: close said, the connection kept open"
    );
    gw.stop().await;
}
