//! WebSocket over HTTP/2 (RFC 8441, section 4): a client's `RST_STREAM` (`CANCEL`, its TCP reset)
//! ends the tunnel and closes the upstream connection, where its `END_STREAM` (its FIN) only
//! half-closes it. The reset was read as a FIN: the tunnel and its upstream connection lived on
//! until the upstream wrote or `idle_timeout` passed (found by a review; failed before its fix).
mod support;

use std::time::Duration;

use bytes::Bytes;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The `Sec-WebSocket-Accept` for the `Sec-WebSocket-Key` of a request head (RFC 6455 4.2.2).
fn accept_for(head: &str) -> String {
    use base64::Engine as _;
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim())
        })
        .unwrap_or_default();
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// A WebSocket upstream that echoes until its input ends, says so on `tx`, then keeps its side
/// open for 20 s (a push-only feed between two pushes): only a close of the connection ends it.
async fn echo_then_linger(tx: mpsc::UnboundedSender<&'static str>) -> RawUpstream {
    RawUpstream::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            let Some(head) = read_head(&mut s, &mut buf).await else {
                return;
            };
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_for(&head)
            );
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            let mut b = [0u8; 1024];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = tx.send("eof");
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
    })
    .await
}

fn tunnels(gw: &Gateway) -> i64 {
    gw.state.runtime().telemetry().tunnels_open()
}

/// An HTTP/2 client (the h2 crate, which can reset a stream), past the server's SETTINGS
/// (ENABLE_CONNECT_PROTOCOL), with an RFC 8441 WebSocket stream open (its 200 checked).
async fn h2_websocket(gw: &Gateway) -> (h2::RecvStream, h2::SendStream<Bytes>) {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send
        .send_request(
            http::Request::get("http://gw/first").body(()).unwrap(),
            true,
        )
        .unwrap();
    let _ = resp.await.unwrap();
    assert!(send.is_extended_connect_protocol_enabled());
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("http://gw/ws")
        .header("sec-websocket-version", "13")
        .extension(h2::ext::Protocol::from_static("websocket"))
        .body(())
        .unwrap();
    let (resp, tx) = send.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    (resp.into_body(), tx)
}

#[tokio::test]
async fn an_http2_client_reset_closes_the_tunnel_and_its_upstream_connection() {
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let up = echo_then_linger(tx).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  ws: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - name: r\n    upstream: ws\n    websocket: true\n",
        up.url()
    ))
    .await;
    let (mut recv, mut send) = h2_websocket(&gw).await;
    send.send_data(Bytes::from_static(b"hello"), false).unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        let d = tokio::time::timeout(Duration::from_secs(10), recv.data())
            .await
            .expect("no echo within 10 s")
            .expect("stream ended")
            .unwrap();
        let _ = recv.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    assert_eq!(got, b"hello");
    assert_eq!(tunnels(&gw), 1);
    send.send_reset(h2::Reason::CANCEL);
    let eof = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert_eq!(
        eof.ok().flatten(),
        Some("eof"),
        "the upstream never saw the end"
    );
    // The tunnel is gone (not left half-open until the upstream writes or idle_timeout passes).
    wait_until(5, || tunnels(&gw) == 0).await;
    gw.stop().await;
}

/// The same client ending its side with `END_STREAM` (its FIN) only half-closes the tunnel: what
/// the upstream sends after seeing the end still reaches the client.
#[tokio::test]
async fn an_http2_client_end_stream_still_half_closes() {
    let up = RawUpstream::start(|mut s, _| async move {
        let mut buf = Vec::new();
        let Some(head) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_for(&head)
        );
        if s.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        let mut b = [0u8; 64];
        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
        let _ = s.write_all(b"bye").await;
    })
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  ws: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - name: r\n    upstream: ws\n    websocket: true\n",
        up.url()
    ))
    .await;
    let (mut recv, mut send) = h2_websocket(&gw).await;
    send.send_data(Bytes::from_static(b"done"), true).unwrap();
    let mut got = Vec::new();
    while let Some(d) = tokio::time::timeout(Duration::from_secs(10), recv.data())
        .await
        .expect("no end within 10 s")
    {
        let d = d.unwrap();
        let _ = recv.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    assert_eq!(got, b"bye");
    gw.stop().await;
}
