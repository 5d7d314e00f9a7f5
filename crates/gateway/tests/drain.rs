//! Graceful shutdown: what requests in flight, or arriving, get while the gateway drains.
mod support;

use bulwark_gateway::proxy::Phase;
use support::*;
use tokio::io::AsyncWriteExt;

/// A request in flight finishes during the drain whatever `max_connections` says: above
/// `u32::MAX` the drain used to end at once (it waited for fewer permits than the listener had)
/// and cut it.
#[tokio::test]
async fn a_request_in_flight_finishes_during_the_drain_with_a_huge_max_connections() {
    let (up, release) = Upstream::held("slow", "done").await;
    let gw = Gateway::start(&one_route(
        &up.url(),
        "drain_timeout: 30s\nlimits: { max_connections: 4294967296 }\n",
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let u = &up;
    wait_until(10, || u.hits() == 1).await;
    let state = gw.state.clone();
    let stopping = tokio::spawn(gw.stop());
    wait_until(10, || state.phase() == Phase::Draining).await;
    release.notify_one();
    assert!(c.closed_within(10).await, "the connection was not closed");
    let got = String::from_utf8_lossy(&c.buf).into_owned();
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("done"),
        "the request in flight was cut by the drain: {got:?}"
    );
    stopping.await.unwrap();
}

/// A request whose head had started to arrive when the shutdown began is read and answered (with
/// `connection: close`), as nginx and Envoy do; only a connection with nothing of a next request
/// closes at once. (It was closed unanswered.)
#[tokio::test]
async fn a_request_head_started_before_the_shutdown_is_answered() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(&up.url(), "drain_timeout: 30s\n")).await;
    let mut partial = RawClient::connect(&gw).await;
    partial.send(b"GET /late HTTP/1.1\r\nHost: x\r\n").await;
    // A whole exchange on a connection accepted after it: the first one's bytes have been read.
    let mut other = RawClient::connect(&gw).await;
    other.send(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(other.response(false).await.status, 200);
    let state = gw.state.clone();
    let stopping = tokio::spawn(gw.stop());
    wait_until(10, || state.phase() == Phase::Draining).await;
    // The client finishes its head.
    let _ = partial.s.write_all(b"\r\n").await;
    assert!(partial.closed_within(10).await);
    let got = String::from_utf8_lossy(&partial.buf).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(got.contains("connection: close"), "{got:?}");
    stopping.await.unwrap();
}

/// Stray line ends after a request (some clients send a CRLF after a body) are not a request: at
/// shutdown such a connection closes at once, not after header_read_timeout.
#[tokio::test]
async fn stray_line_ends_do_not_hold_a_connection_open_at_shutdown() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(
        &up.url(),
        "drain_timeout: 60s\nlimits: { header_read_timeout: 30s }\n",
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    c.send(b"\r\n").await;
    // A whole exchange on a connection accepted after it: the first one's bytes have been read.
    let mut other = RawClient::connect(&gw).await;
    other.send(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(other.response(false).await.status, 200);
    let stopping = tokio::spawn(gw.stop());
    assert!(c.closed_within(5).await, "held open by a stray CRLF");
    drop(other);
    stopping.await.unwrap();
}

/// A request that has already reached the gateway (it sits in the connection's receive buffer)
/// on an idle keep-alive connection when the drain begins is answered with `connection: close`,
/// as a request whose head had started to arrive is, not reset unread (Envoy serves requests on
/// keep-alive connections during its drain with `connection: close`). Found by a review.
#[tokio::test]
async fn a_request_already_received_on_an_idle_keep_alive_connection_is_answered_at_shutdown() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(&up.url(), "drain_timeout: 30s\n")).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = RawClient::connect(&gw).await;
        c.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(c.response(false).await.status, 200);
        clients.push(c);
    }
    // Every connection now waits for its next request. Each client sends it, whole (on loopback
    // the bytes are in the gateway's socket buffer once `send` returns) ...
    for c in &mut clients {
        c.send(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }
    // ... and only then does the shutdown begin.
    let stopping = tokio::spawn(gw.stop());
    let mut answered = 0;
    let mut seen = Vec::new();
    for c in &mut clients {
        assert!(c.closed_within(10).await, "the connection was not closed");
        let got = String::from_utf8_lossy(&c.buf).into_owned();
        if got.starts_with("HTTP/1.1 200") && got.contains("connection: close") {
            answered += 1;
        }
        seen.push(got);
    }
    assert_eq!(
        answered,
        clients.len(),
        "requests the gateway had received before its shutdown were reset unanswered: {seen:?}"
    );
    stopping.await.unwrap();
}
