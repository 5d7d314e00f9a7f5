//! The upstream side: an idempotent request that meets a stale keep-alive connection goes again
//! on a fresh one, an upstream's early answer to an upload reaches the client even when its reset
//! beat the gateway's write, and an upstream's WebSocket handshake over HTTP/2 must carry the right
//! accept.
mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A route to `url` with the default retry policy (none: one attempt), as an operator writes it.
fn plain_config(url: &str) -> String {
    format!("upstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n")
}

/// The stale keep-alive race: the upstream's keep-alive timeout fires while the gateway's request
/// is on its way, so the upstream closes a reused connection having taken (or dropped) the request
/// without answering a byte. For an idempotent request on a *reused* connection this is the
/// classic race every client retries once on a fresh connection (Go's Transport, nginx's cached
/// upstream connections, hyper's pool); here it is a 502 unless the route has retries.
#[tokio::test]
async fn a_get_on_a_reused_connection_the_upstream_closed_unanswered_is_sent_again() {
    // Connection 0: answers its first request keep-alive, then closes on the second one without a
    // byte of answer (its keep-alive timer fired). Every later connection answers normally.
    let up = RawUpstream::start(|mut s, i| async move {
        let mut buf = Vec::new();
        let mut n = 0;
        while read_head(&mut s, &mut buf).await.is_some() {
            if i == 0 && n == 1 {
                return; // closed with the request unanswered
            }
            n += 1;
            let body = format!("conn {i}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let gw = Gateway::start(&plain_config(&up.url())).await;
    let c = client();
    let r = get(&c, &gw.url("/a")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "conn 0"));
    let ep = endpoint(&gw, "u", 0);
    wait_until(10, || ep.pool.idle_count() == 1).await;
    // The second GET goes on the pooled connection 0, which the upstream closes unanswered.
    let r = get(&c, &gw.url("/b")).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "conn 1"),
        "a GET that met a stale keep-alive connection got {} {:?} (reason {:?})",
        r.status,
        r.text(),
        r.header("x-bulwark-reason")
    );
    gw.stop().await;
}

/// RFC 8441: for a WebSocket over HTTP/2 the gateway is the WebSocket client of the upstream: it
/// makes up the `Sec-WebSocket-Key` itself (and strips `Sec-WebSocket-Accept` from the answer), so
/// only it can check the upstream's `Sec-WebSocket-Accept` (RFC 6455 4.1: a wrong or missing one
/// fails the connection). A 101 with a wrong accept (an upstream that is not a WebSocket server
/// or that answers another handshake) is still turned into the stream's 200 and tunnelled.
#[tokio::test]
async fn an_http2_websocket_whose_upstream_101_has_a_wrong_accept_is_refused() {
    let up = RawUpstream::start(|mut s, _| async move {
        let mut buf = Vec::new();
        loop {
            let Some(head) = read_head(&mut s, &mut buf).await else {
                return;
            };
            if head
                .to_ascii_lowercase()
                .contains("\r\nupgrade: websocket\r\n")
            {
                break;
            }
            let refused = b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n";
            if s.write_all(refused).await.is_err() {
                return;
            }
        }
        // A fixed accept, whatever key was sent (the RFC 6455 sample's).
        let answer =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let _ = s.write_all(answer).await;
        let mut b = [0u8; 1024];
        while let Ok(n) = s.read(&mut b).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  ws: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: ws\n    websocket: true\n",
        up.url()
    ))
    .await;
    let mut send = h2c_sender(gw.addr).await;
    // A first request, so the gateway's SETTINGS (extended CONNECT allowed) are known.
    let first = send
        .send_request(
            http::Request::get("http://gw/settings")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    drop(first);
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("http://gw/ws")
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(
        resp.status(),
        502,
        "a 101 whose Sec-WebSocket-Accept does not match the gateway's key became a tunnel"
    );
    gw.stop().await;
}

/// An upstream that refuses a large upload early (413 before reading the body, then closing the
/// socket with the body unread, which sends a TCP reset) while the gateway is still writing a
/// buffered request body (up to `retry_buffer`): the 413 has arrived, but the write error wins and
/// the client gets a 502 instead of the upstream's 413.
#[tokio::test]
async fn an_early_413_from_the_upstream_during_a_buffered_upload_reaches_the_client() {
    const BODY: usize = 12 * 1024 * 1024;
    let up = early_413_upstream().await;
    let yaml = format!(
        "limits: {{ max_body_bytes: 32MiB }}\nupstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    retry_buffer: 16MiB\n",
        up.url()
    );
    let gw = Gateway::start(&yaml).await;
    let req = Request::post(gw.url("/upload"))
        .header("content-length", BODY.to_string())
        .body(Full::new(Bytes::from(vec![b'x'; BODY])))
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(
        r.status.as_u16(),
        413,
        "the upstream's early 413 was replaced by {} (reason {:?})",
        r.status,
        r.header("x-bulwark-reason")
    );
    assert_eq!(r.text(), "too big!");
    gw.stop().await;
}

/// An HTTP/2 WebSocket (extended CONNECT) that the gateway answers itself with a 2xx (a
/// `fault.abort` with status 200, a 200 `fallback` in maintenance) is a 502 that keeps the
/// gateway's own reason and claims no attempt: it read `upstream_error` and
/// `x-bulwark-attempts: 1` (and `attempts=1` in the access log), though nothing was sent
/// anywhere. Found by a review; failed before its fix.
#[tokio::test]
async fn an_http2_websocket_answered_by_the_gateway_does_not_claim_an_upstream_attempt() {
    let (buf, _guard) = capture_logs();
    let up = Upstream::named("up").await;
    let gw = Gateway::start(&format!(
        "mode: maintenance
logging: {{ access_log: true }}
upstreams:
  main: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: faulty
    match: {{ path_prefix: /faulty }}
    upstream: main
    websocket: true
    exempt_modes: [maintenance]
    fault: {{ abort: {{ status: 200, percent: 100 }} }}
  - name: maint
    match: {{ path_prefix: /maint }}
    upstream: main
    websocket: true
    fallback: {{ status: 200, body: 'down for maintenance' }}
",
        up.url()
    ))
    .await;
    let mut send = h2c_sender::<http_body_util::Empty<Bytes>>(gw.addr).await;
    // A first request, so that the gateway's SETTINGS (extended CONNECT allowed) have arrived.
    let first = send
        .send_request(
            Request::get("http://gw/other")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(first.status(), 404);
    for (path, reason) in [("/faulty/ws", "fault"), ("/maint/ws", "fallback")] {
        let mut req = Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("http://gw{path}"))
            .header("sec-websocket-version", "13")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let r = send.send_request(req).await.unwrap();
        assert_eq!(r.status(), 502, "{path}: no tunnel to nothing");
        assert_eq!(r.headers().get("x-bulwark-attempts"), None, "{path}");
        assert_eq!(
            r.headers().get("x-bulwark-reason").map(|v| v.as_bytes()),
            Some(reason.as_bytes()),
            "{path}"
        );
    }
    assert_eq!(up.hits(), 0);
    gw.stop().await;
    let log = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    let connects: Vec<_> = log
        .lines()
        .filter(|l| l.contains("bulwark::access") && l.contains("CONNECT"))
        .collect();
    assert_eq!(connects.len(), 2, "{log}");
    for l in connects {
        assert!(l.contains("attempts=0"), "{l}");
    }
}
