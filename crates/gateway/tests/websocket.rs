//! WebSocket tunnels: an upgrade on a `websocket: true` route reaches an HTTP/1.1 upstream with its
//! `Upgrade` and `Connection` headers; the upstream's 101 goes to the client, and then bytes go
//! both ways, untouched, until one side closes or nothing moves for `idle_timeout`.
mod admin_support;
mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const UPGRADE: &[u8] = b"GET /ws?room=1 HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, Upgrade\r\n\
Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// The `Sec-WebSocket-Accept` for the `Sec-WebSocket-Key` of a request head, as a WebSocket
/// server computes it (RFC 6455 4.2.2).
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

/// The 101 head that accepts the upgrade of request head `head`.
fn switching(head: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_for(head)
    )
}

/// Writes back every byte read from `s` until its input ends (or a write fails).
async fn echo(s: &mut tokio::net::TcpStream) {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&b[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A WebSocket upstream: answers an upgrade with a 101 (and `early` in the same write), then echoes
/// every byte until the gateway closes, then closes too. Anything else gets 426. Reports each
/// request head, and `"eof"` when the gateway closed the tunnel.
async fn ws_upstream(early: &'static [u8]) -> (RawUpstream, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let up = RawUpstream::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            let Some(head) = read_head(&mut s, &mut buf).await else {
                return;
            };
            let lower = head.to_ascii_lowercase();
            let mut answer = switching(&head).into_bytes();
            let _ = tx.send(head);
            if !(lower.contains("\r\nupgrade: websocket\r\n")
                && lower.contains("\r\nconnection: upgrade\r\n"))
            {
                let _ = s
                    .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            }
            answer.extend_from_slice(early);
            // What the client sent right behind its request head.
            answer.extend_from_slice(&buf);
            if s.write_all(&answer).await.is_err() {
                return;
            }
            echo(&mut s).await;
            let _ = tx.send("eof".into());
        }
    })
    .await;
    (up, rx)
}

/// The route line that turns tunnels on.
const WS: &str = "    websocket: true\n";

fn config(url: &str, extra_route: &str, limits: &str) -> String {
    format!(
        "limits: {{ {limits} }}\nupstreams:\n  ws: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: ws\n{extra_route}"
    )
}

/// A client connection to `gw` whose upgrade went through (its 101 read).
async fn upgraded(gw: &Gateway) -> RawClient {
    let mut c = RawClient::connect(gw).await;
    c.send(UPGRADE).await;
    switched(&mut c).await;
    c
}

/// Reads the 101 off `c` and checks it.
async fn switched<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(c: &mut RawClient<S>) {
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 101, "{r:?}");
    assert_eq!(r.header("upgrade"), Some("websocket"));
    assert_eq!(r.header("connection"), Some("upgrade"));
    // The upstream's accept for the client's key, passed through (the client checks it).
    assert!(r
        .header("sec-websocket-accept")
        .is_some_and(|a| a.len() == 28));
    assert_eq!(
        r.headers.iter().filter(|(k, _)| k == "connection").count(),
        1
    );
}

#[tokio::test]
async fn an_upgrade_is_tunnelled_both_ways_until_the_client_closes() {
    let (up, mut heads) = ws_upstream(b"hello from upstream").await;
    let gw = Gateway::start(&config(&up.url(), WS, "")).await;
    let mut c = upgraded(&gw).await;
    let head = heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get /ws?room=1 http/1.1\r\n"), "{head}");
    for want in [
        "\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n",
        "\r\nsec-websocket-version: 13\r\n",
        "\r\nx-forwarded-for: 127.0.0.1\r\n",
    ] {
        assert!(head.contains(want), "{want:?} in {head}");
    }
    // Bytes the upstream sent with its 101, then an echo each way, binary included.
    assert_eq!(c.take(19).await.unwrap(), b"hello from upstream");
    for msg in [&b"\x81\x05hello"[..], &[0u8, 255, 13, 10, 13, 10][..]] {
        c.send(msg).await;
        assert_eq!(c.take(msg.len()).await.unwrap(), msg);
    }
    // The client closes its side: the upstream sees the end, closes, and so does the gateway.
    c.s.shutdown().await.unwrap();
    assert_eq!(heads.recv().await.as_deref(), Some("eof"));
    assert!(c.closed_within(5).await);
    gw.stop().await;
}

#[tokio::test]
async fn bytes_sent_with_the_upgrade_request_reach_the_upstream() {
    let (up, _heads) = ws_upstream(b"").await;
    let gw = Gateway::start(&config(&up.url(), WS, "")).await;
    let mut c = RawClient::connect(&gw).await;
    let mut first = UPGRADE.to_vec();
    first.extend_from_slice(b"early frame");
    c.send(&first).await;
    switched(&mut c).await;
    // The upstream sends back what came behind the head (whether the gateway passed it with the
    // head or as the tunnel's first bytes).
    assert_eq!(c.take(11).await.unwrap(), b"early frame");
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn a_tunnel_quiet_for_idle_timeout_is_closed_on_both_sides() {
    let (up, mut heads) = ws_upstream(b"").await;
    let gw = Gateway::start(&config(&up.url(), WS, "idle_timeout: 300ms")).await;
    let mut c = upgraded(&gw).await;
    heads.recv().await.unwrap();
    // Traffic keeps it open past idle_timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.send(b"ping").await;
        assert_eq!(c.take(4).await.unwrap(), b"ping");
    }
    // ...silence closes it.
    assert!(c.closed_within(5).await);
    assert_eq!(heads.recv().await.as_deref(), Some("eof"));
    gw.stop().await;
}

/// Without `websocket: true` the upgrade goes as a plain request (its `Upgrade` removed), and an
/// upstream's refusal of an upgrade is an ordinary response on a connection that goes on serving.
#[tokio::test]
async fn a_refused_or_unrouted_upgrade_is_an_ordinary_exchange() {
    let (up, mut heads) = ws_upstream(b"").await;
    let gw = Gateway::start(&config(&up.url(), "", "")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(UPGRADE).await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 426, "{r:?}");
    let head = heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(!head.contains("\r\nupgrade:"), "{head}");
    gw.stop().await;

    // A websocket route whose upstream does not speak it: its answer comes back, and the client
    // connection carries the next request.
    let plain = Upstream::status("plain", 404).await;
    let gw = Gateway::start(&config(&plain.url(), WS, "")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(UPGRADE).await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 404, "{r:?}");
    c.send(b"GET /next HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(plain.hits(), 2);
    gw.stop().await;
}

/// The upgrade goes through the route's resilience like any request: a dead first upstream fails
/// over to the next, which takes the tunnel.
#[tokio::test]
async fn an_upgrade_fails_over_to_the_next_upstream() {
    let (up, _heads) = ws_upstream(b"").await;
    let dead = dead_url().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  a: {{ endpoints: [{{url: '{dead}'}}] }}\n  b: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: a\n    failover: [b]\n    websocket: true\n",
        up.url()
    ))
    .await;
    let mut c = upgraded(&gw).await;
    c.send(b"over").await;
    assert_eq!(c.take(4).await.unwrap(), b"over");
    drop(c);
    gw.stop().await;
}

/// A tunnel counts as in flight for a graceful shutdown: it goes on carrying bytes while the
/// gateway drains, and is closed at `drain_timeout`.
#[tokio::test]
async fn a_tunnel_lives_through_the_drain_and_is_closed_at_its_end() {
    let (up, mut heads) = ws_upstream(b"").await;
    let gw = Gateway::start(&format!("drain_timeout: 1s\n{}", config(&up.url(), WS, ""))).await;
    let mut c = upgraded(&gw).await;
    heads.recv().await.unwrap();
    let stop = tokio::spawn(gw.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(b"still").await;
    assert_eq!(c.take(5).await.unwrap(), b"still");
    assert!(c.closed_within(5).await);
    stop.await.unwrap();
    assert_eq!(heads.recv().await.as_deref(), Some("eof"));
}

/// The same over TLS (ALPN `http/1.1`): the tunnel runs inside the client's TLS session.
#[tokio::test]
async fn an_upgrade_over_tls_is_tunnelled() {
    let (up, _heads) = ws_upstream(b"").await;
    let tls = TestTls::new("ws-tls");
    let gw = Gateway::start(&format!(
        "{}{}",
        tls.config_line(),
        config(&up.url(), WS, "")
    ))
    .await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let s = tls
        .connector(&[b"http/1.1"])
        .connect(name, tcp)
        .await
        .unwrap();
    let mut c = RawClient::new(s);
    c.send(UPGRADE).await;
    switched(&mut c).await;
    c.send(b"secret bytes").await;
    assert_eq!(c.take(12).await.unwrap(), b"secret bytes");
    c.s.shutdown().await.unwrap();
    assert!(c.closed_within(5).await);
    gw.stop().await;
}

/// Only `websocket` is tunnelled: the upstream is offered `websocket` alone, whatever else the
/// client listed, and a 101 to another protocol (an h2c tunnel would carry any request past the
/// route) is refused with 502.
#[tokio::test]
async fn only_websocket_is_offered_and_accepted() {
    let (up, mut heads) = ws_upstream(b"").await;
    let gw = Gateway::start(&config(&up.url(), WS, "")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c, websocket\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n").await;
    switched(&mut c).await;
    let head = heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(
        !head.contains("h2c") && !head.contains("http2-settings"),
        "{head}"
    );
    drop(c);
    gw.stop().await;

    let h2c = RawUpstream::answering(|_| {
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n".to_vec()
    })
    .await;
    let gw = Gateway::start(&config(&h2c.url(), WS, "")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(UPGRADE).await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    gw.stop().await;
}

/// `bulwark_websocket_tunnels` counts the tunnels open: one while it carries bytes, none once the
/// client has closed it.
#[tokio::test]
async fn open_tunnels_are_a_gauge() {
    let (up, _heads) = ws_upstream(b"").await;
    let ops = admin_support::Ops::start(&config(&up.url(), WS, ""), None).await;
    let c = client();
    let tunnels = |m: &str| admin_support::sample(m, "bulwark_websocket_tunnels");
    assert_eq!(tunnels(&ops.metrics(&c).await), Some(0.0));
    let mut t = RawClient::connect_to(ops.proxy).await;
    t.send(UPGRADE).await;
    switched(&mut t).await;
    t.send(b"hi").await;
    assert_eq!(t.take(2).await.unwrap(), b"hi");
    assert_eq!(tunnels(&ops.metrics(&c).await), Some(1.0));
    t.s.shutdown().await.unwrap();
    assert!(t.closed_within(5).await);
    admin_support::eventually(5, "the tunnel uncounted", || async {
        tunnels(&ops.metrics(&c).await) == Some(0.0)
    })
    .await;
    ops.stop().await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket over HTTP/2 (RFC 8441)
// ---------------------------------------------------------------------------------------------

/// An h2c connection to `gw`, past the gateway's SETTINGS (a first request answered), so that an
/// extended CONNECT may be sent.
async fn h2_ready(
    gw: &Gateway,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let mut send = h2c_sender(gw.addr).await;
    let first = send.send_request(h2_get("/settings")).await.unwrap();
    drop(first);
    send
}

fn h2_get(path: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://gw{path}"))
        .body(Default::default())
        .unwrap()
}

/// An extended CONNECT for `path`, with `protocol` as its `:protocol` (none: a plain CONNECT).
fn h2_connect(
    path: &str,
    protocol: Option<&'static str>,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://gw{path}"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "chat")
        .body(Default::default())
        .unwrap();
    if let Some(p) = protocol {
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static(p));
    }
    req
}

#[tokio::test]
async fn a_websocket_over_http2_is_tunnelled_to_an_http1_upstream() {
    let (up, mut heads) = ws_upstream(b"hello from upstream").await;
    let gw = Gateway::start(&config(&up.url(), WS, "")).await;
    let mut send = h2_ready(&gw).await;
    // The first request was an ordinary one: the upstream answered it 426.
    assert!(heads.recv().await.unwrap().starts_with("GET /settings"));
    let resp = send
        .send_request(h2_connect("/ws?room=1", Some("websocket")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    assert!(resp.headers().get("upgrade").is_none());
    assert_eq!(gw.state.runtime().telemetry().tunnels_open(), 1);
    // The upstream got an HTTP/1.1 upgrade with a fresh key and the client's headers.
    let head = heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get /ws?room=1 http/1.1\r\n"), "{head}");
    for want in [
        "\r\nupgrade: websocket\r\n",
        "\r\nconnection: upgrade\r\n",
        "\r\nsec-websocket-version: 13\r\n",
        "\r\nsec-websocket-protocol: chat\r\n",
        "\r\nsec-websocket-key: ",
    ] {
        assert!(head.contains(want), "{want:?} in {head}");
    }
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let mut got = [0u8; 19];
    io.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello from upstream");
    for msg in [&b"\x81\x05hello"[..], &[0u8, 255, 13, 10, 13, 10][..]] {
        io.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    // The client ends its stream: the upstream sees the end and closes; the stream ends too, and
    // the connection goes on serving.
    io.shutdown().await.unwrap();
    assert_eq!(heads.recv().await.as_deref(), Some("eof"));
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest))
        .await
        .expect("the tunnel's stream did not end")
        .unwrap();
    wait_until(10, || gw.state.runtime().telemetry().tunnels_open() == 0).await;
    let again = send.send_request(h2_get("/after")).await.unwrap();
    assert_eq!(again.status(), 426);
    gw.stop().await;
}

#[tokio::test]
async fn an_http2_connect_the_gateway_does_not_tunnel_gets_400() {
    let (up, mut heads) = ws_upstream(b"").await;
    // A route without `websocket: true`: a WebSocket request there has no plain answer.
    let gw = Gateway::start(&config(&up.url(), "", "")).await;
    let mut send = h2_ready(&gw).await;
    heads.recv().await.unwrap();
    for (path, protocol) in [
        ("/ws", Some("websocket")),
        ("/other", Some("something-else")),
        ("/plain", None),
    ] {
        let r = send.send_request(h2_connect(path, protocol)).await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
        assert_eq!(r.headers()["x-bulwark-reason"], "bad_request");
    }
    gw.stop().await;
    // The upstream saw none of them.
    assert!(heads.try_recv().is_err());
}

#[tokio::test]
async fn an_http2_websocket_the_upstream_refuses_gets_its_answer_or_502() {
    // A 404 from the upstream comes back as it is.
    let plain = Upstream::status("plain", 404).await;
    let gw = Gateway::start(&config(&plain.url(), WS, "")).await;
    let mut send = h2_ready(&gw).await;
    let r = send
        .send_request(h2_connect("/ws", Some("websocket")))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    gw.stop().await;
    // A 200 that does not switch would open a tunnel to nothing: 502.
    let ok = Upstream::named("ok").await;
    let gw = Gateway::start(&config(&ok.url(), WS, "")).await;
    let mut send = h2_ready(&gw).await;
    let r = send
        .send_request(h2_connect("/ws", Some("websocket")))
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-bulwark-reason"], "upstream_error");
    gw.stop().await;
}

#[tokio::test]
async fn an_http2_tunnel_lives_through_the_drain_and_is_closed_at_its_end() {
    let (up, mut heads) = ws_upstream(b"").await;
    let gw = Gateway::start(&format!("drain_timeout: 1s\n{}", config(&up.url(), WS, ""))).await;
    let mut send = h2_ready(&gw).await;
    heads.recv().await.unwrap();
    let resp = send
        .send_request(h2_connect("/ws", Some("websocket")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    heads.recv().await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let stop = tokio::spawn(gw.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    io.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    io.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still");
    // At the drain timeout the connection, and the tunnel with it, are closed.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the tunnel outlived the drain timeout");
    stop.await.unwrap();
    let eof = tokio::time::timeout(Duration::from_secs(5), heads.recv()).await;
    assert_eq!(
        eof.expect("the upstream side stayed open").as_deref(),
        Some("eof")
    );
}

/// A 101 has no body: a `Content-Length` (or `Transfer-Encoding`) the upstream put on its 101 does
/// not reach the client, and the bytes behind the head are the tunnel's.
#[tokio::test]
async fn the_clients_101_carries_no_framing_header() {
    let up = RawUpstream::start(|mut s, _| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_none() {
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 5\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello")
            .await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await;
    let gw = Gateway::start(&config(&up.url(), WS, "")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(UPGRADE).await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 101, "{r:?}");
    assert_eq!(r.header("content-length"), None, "{r:?}");
    assert_eq!(c.take(5).await.unwrap(), b"hello");
    drop(c);
    gw.stop().await;
}

/// An RFC 8441 WebSocket over HTTP/2 is answered 200 (the upstream's HTTP/1.1 101 is turned into
/// it): `bulwark_requests_total`'s `code` is the status sent to the client, and the access log's
/// `status` and `method` what the client got and sent: 200 to a CONNECT, not the 101 to a GET of
/// the upstream's side. Found by a review.
#[tokio::test]
async fn an_http2_websocket_is_counted_and_logged_as_the_200_its_client_got() {
    let (buf, _guard) = capture_logs();
    let (up, _heads) = ws_upstream(b"").await;
    let gw = Gateway::start(&format!(
        "logging: {{ access_log: true }}\nupstreams:\n  ws: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - name: r\n    upstream: ws\n    websocket: true\n",
        up.url()
    ))
    .await;
    let mut send = h2_ready(&gw).await;
    let resp = send
        .send_request(h2_connect("/ws-h2", Some("websocket")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rt = gw.state.runtime();
    let m = rt.telemetry().encode(&rt);
    let log = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    let line = log
        .lines()
        .find(|l| l.contains("bulwark::access") && l.contains("/ws-h2"))
        .unwrap_or_else(|| panic!("no line:\n{log}"));
    assert!(line.contains("status=200"), "the client got 200: {line}");
    assert!(
        line.contains("method=CONNECT"),
        "the client sent a CONNECT: {line}"
    );
    assert_eq!(
        admin_support::sample(
            &m,
            r#"bulwark_requests_total{route="r",upstream="ws",code="200"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        admin_support::sample(
            &m,
            r#"bulwark_requests_total{route="r",upstream="ws",code="101"}"#
        ),
        None,
        "no client got a 101:\n{m}"
    );
}

// RFC 8441, section 4: a client's `RST_STREAM` (`CANCEL`, its TCP reset) ends the tunnel and
// closes the upstream connection, where its `END_STREAM` (its FIN) only half-closes it. The reset
// was read as a FIN: the tunnel and its upstream connection lived on until the upstream wrote or
// `idle_timeout` passed (found by a review; failed before its fix).

/// A WebSocket upstream that echoes until its input ends, says `"eof"` on `tx`, then writes `then`
/// and closes; with `then` `None` it keeps its side open for 20 s (a push-only feed between two
/// pushes: only a close of the connection ends it).
async fn echo_until_end(
    tx: mpsc::UnboundedSender<&'static str>,
    then: Option<&'static [u8]>,
) -> RawUpstream {
    RawUpstream::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            let Some(head) = read_head(&mut s, &mut buf).await else {
                return;
            };
            if s.write_all(switching(&head).as_bytes()).await.is_err() {
                return;
            }
            echo(&mut s).await;
            let _ = tx.send("eof");
            match then {
                Some(bytes) => {
                    let _ = s.write_all(bytes).await;
                }
                None => tokio::time::sleep(Duration::from_secs(20)).await,
            }
        }
    })
    .await
}

fn tunnels(gw: &Gateway) -> i64 {
    gw.state.runtime().telemetry().tunnels_open()
}

/// An HTTP/2 client (the h2 crate, which can reset a stream), past the server's SETTINGS
/// (ENABLE_CONNECT_PROTOCOL), with an RFC 8441 WebSocket stream open (its 200 checked).
async fn h2_crate_websocket(gw: &Gateway) -> (h2::RecvStream, h2::SendStream<bytes::Bytes>) {
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
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

/// What arrives on `recv` until `n` bytes did, or (`n` = `usize::MAX`) until the stream ends.
async fn h2_read(recv: &mut h2::RecvStream, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), recv.data())
            .await
            .expect("nothing within 10 s");
        let Some(d) = next else { break };
        let d = d.unwrap();
        let _ = recv.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    got
}

#[tokio::test]
async fn an_http2_client_reset_closes_the_tunnel_and_its_upstream_connection() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let up = echo_until_end(tx, None).await;
    let gw = Gateway::start(&config(&up.url(), WS, "")).await;
    let (mut recv, mut send) = h2_crate_websocket(&gw).await;
    send.send_data(bytes::Bytes::from_static(b"hello"), false)
        .unwrap();
    assert_eq!(h2_read(&mut recv, 5).await, b"hello");
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
    let (tx, _rx) = mpsc::unbounded_channel();
    let up = echo_until_end(tx, Some(b"bye")).await;
    let gw = Gateway::start(&config(&up.url(), WS, "")).await;
    let (mut recv, mut send) = h2_crate_websocket(&gw).await;
    send.send_data(bytes::Bytes::from_static(b"done"), true)
        .unwrap();
    assert_eq!(h2_read(&mut recv, usize::MAX).await, b"donebye");
    gw.stop().await;
}
