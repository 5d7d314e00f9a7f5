//! The HTTP/2 and TLS listener: a closing HTTP/2 connection is dropped when its client never
//! answers, a TLS handshake does not hold the drain, HTTP/2 heads are counted against
//! `max_header_bytes` as HTTP/1.1 ones are (and refused with the gateway's own 431), and a `host`
//! field that contradicts `:authority` is refused (one that names the same host is not). A drain
//! does not cut a response a slow HTTP/2 client is still taking.
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::net::TcpStream;

/// The HTTP/2 connection preface, then an empty SETTINGS frame (all that an h2c client must send
/// before its first request).
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

/// Whether `buf` (frames from the gateway) holds a frame of `kind` (RFC 9113 frame type).
fn has_frame(buf: &[u8], kind: u8) -> bool {
    let mut i = 0;
    while i + 9 <= buf.len() {
        let len =
            (usize::from(buf[i]) << 16) | (usize::from(buf[i + 1]) << 8) | usize::from(buf[i + 2]);
        if buf[i + 3] == kind {
            return true;
        }
        i += 9 + len;
    }
    false
}

/// An HTTP/2 connection that goes quiet (its client gone without a FIN, or one that simply never
/// answers) is closed at `idle_timeout`, as an idle HTTP/1.1 connection is: the gateway sends
/// GOAWAY and a PING, and must not wait for the PING's answer forever. It does: the connection,
/// and its `max_connections` slot, are held for good.
#[tokio::test]
async fn an_idle_http2_connection_whose_client_never_answers_is_closed() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(
        &up.url(),
        "idle_timeout: 300ms, max_connections: 1",
    ))
    .await;
    let mut quiet = RawClient::connect(&gw).await;
    quiet.send(H2_PREFACE_AND_SETTINGS).await;
    // The client reads what comes but never sends another byte (no SETTINGS ack, no PING ack).
    let closed = quiet.closed_within(10).await;
    assert!(
        has_frame(&quiet.buf, 7),
        "no GOAWAY after idle_timeout: {:?}",
        quiet.buf
    );
    assert!(
        closed,
        "an idle HTTP/2 connection stayed open 10 s past idle_timeout (300ms), waiting for the \
         answer to the GOAWAY's PING"
    );
    // Its slot is free again: the next client is served.
    let mut next = RawClient::connect(&gw).await;
    next.send(GET).await;
    let r = tokio::time::timeout(Duration::from_secs(5), next.response(false))
        .await
        .expect("the only connection slot is still held by the quiet HTTP/2 connection");
    assert_eq!(r.status, 200);
    gw.stop().await;
}

/// The same over TLS (ALPN `h2`): the quiet connection is never closed.
#[tokio::test]
async fn an_idle_http2_connection_over_tls_whose_client_never_answers_is_closed() {
    let up = Upstream::named("u").await;
    let tls = TestTls::new("rev-tls-quiet");
    let gw = Gateway::start(&format!(
        "{}{}",
        tls.config_line(),
        limited_config(&up.url(), "idle_timeout: 300ms")
    ))
    .await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let s = tls.connector(&[b"h2"]).connect(name, tcp).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut quiet = RawClient::new(s);
    quiet.send(H2_PREFACE_AND_SETTINGS).await;
    let closed = quiet.closed_within(10).await;
    assert!(has_frame(&quiet.buf, 7), "no GOAWAY after idle_timeout");
    assert!(
        closed,
        "an idle HTTP/2 connection over TLS stayed open 10 s past idle_timeout (300ms)"
    );
    gw.stop().await;
}

/// At shutdown a connection with nothing of a request closes at once (see drain.rs); a TLS
/// connection whose client has not finished (here: not started) its handshake holds the drain
/// until `header_read_timeout` instead, since the handshake does not watch for the shutdown.
#[tokio::test]
async fn a_tls_handshake_in_progress_does_not_hold_the_shutdown() {
    let up = Upstream::named("u").await;
    let tls = TestTls::new("rev-tls-hs");
    let gw = Gateway::start(&format!(
        "{}drain_timeout: 60s\n{}",
        tls.config_line(),
        limited_config(&up.url(), "header_read_timeout: 30s")
    ))
    .await;
    // TCP connected, no ClientHello (a preconnect, a port scanner, a stalled client).
    let mut stalled = RawClient::connect(&gw).await;
    // A whole exchange on a connection accepted after it: the first one has been accepted.
    {
        let connector = tls.connector(&[b"http/1.1"]);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let mut other = RawClient::new(connector.connect(name, tcp).await.unwrap());
        other.send(GET).await;
        assert_eq!(other.response(false).await.status, 200);
    }
    let stopping = tokio::spawn(gw.stop());
    assert!(
        stalled.closed_within(5).await,
        "a TLS connection in its handshake is kept open at shutdown"
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown held by a TLS handshake that will not finish (until header_read_timeout)")
        .unwrap();
}

/// `max_header_bytes` counts an HTTP/2 request's decoded headers as it counts an HTTP/1.1 head
/// (docs: "for HTTP/2, the same count over the decoded headers"). A request of many small headers,
/// 350 bytes as an HTTP/1.1 head under a 1 KiB limit, passes over HTTP/1.1 but gets 431 over
/// HTTP/2: the HTTP/2 server's own SETTINGS_MAX_HEADER_LIST_SIZE, set to the same number, counts
/// 32 bytes more per field (RFC 7541 4.1) and refuses it before the gateway's count is made.
#[tokio::test]
async fn http2_headers_count_against_max_header_bytes_as_http1_heads_do() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_header_bytes: 1KiB")).await;
    let req = || {
        let mut b = Request::get(gw.url("/"));
        for i in 0..30 {
            b = b.header(format!("x-h{i:02}"), "v");
        }
        b.body(Full::<Bytes>::default()).unwrap()
    };
    let h1 = send(&client(), req()).await;
    assert_eq!(h1.status, 200, "over HTTP/1.1");
    let h2 = send(&h2c_client(), req()).await;
    assert_eq!(h2.version, http::Version::HTTP_2);
    assert_eq!(
        h2.status, 200,
        "the same request over HTTP/2 is refused: {:?}",
        h2.headers
    );
    gw.stop().await;
}

/// A head over `max_header_bytes` gets 431 with `x-bulwark-reason: headers_too_large` (docs, "What
/// clients see") and an access-log line (docs, "Logs": each request, a refused head included);
/// over HTTP/2 the 431 is the h2 library's own, without the header and without a line.
#[tokio::test]
async fn an_http2_431_says_headers_too_large_and_is_logged() {
    let (logs, _guard) = capture_logs();
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(
        &up.url(),
        "logging: { access_log: true }\nlimits: { max_header_bytes: 16KiB }\n",
    ))
    .await;
    let r = send(
        &h2c_client(),
        Request::get(gw.url("/"))
            .header("x-big", "a".repeat(17 * 1024))
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 431);
    assert_eq!(up.hits(), 0);
    gw.stop().await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let logged = text
        .lines()
        .any(|l| l.contains("bulwark::access") && l.contains("status=431"));
    assert_eq!(
        (r.header("x-bulwark-reason"), logged),
        (Some("headers_too_large"), true),
        "(x-bulwark-reason, access-log line) of the HTTP/2 431; headers {:?}; log:\n{text}",
        r.headers
    );
}

/// RFC 9113 8.3.1: a server SHOULD treat as malformed an HTTP/2 request whose `host` differs from
/// its `:authority`, and the docs say a route's `host` condition matches an HTTP/2 request by its
/// `:authority`. A request for `:authority public.example` that adds `host: admin.internal` is
/// routed as `admin.internal` (over HTTP/1.1, two differing hosts are a 400).
#[tokio::test]
async fn an_http2_host_field_that_contradicts_authority_does_not_pick_the_route() {
    let admin = Upstream::named("admin").await;
    let public = Upstream::named("public").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  admin: {{ endpoints: [{{url: '{}'}}] }}\n  public: {{ endpoints: [{{url: '{}'}}] }}\n\
         routes:\n  - {{ match: {{ headers: {{ host: admin.internal }} }}, upstream: admin }}\n  - {{ upstream: public }}\n",
        admin.url(),
        public.url()
    ))
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get("http://public.example/")
        .header("host", "admin.internal")
        .body(())
        .unwrap();
    let outcome = match client.send_request(req, true) {
        Ok((resp, _)) => match tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("no answer")
        {
            Ok(resp) => {
                let status = resp.status();
                let mut body = resp.into_body();
                let mut got = Vec::new();
                while let Some(chunk) = body.data().await {
                    got.extend_from_slice(&chunk.unwrap());
                }
                format!("{status} {}", String::from_utf8_lossy(&got))
            }
            Err(e) => format!("stream error: {e}"),
        },
        Err(e) => format!("stream error: {e}"),
    };
    assert_ne!(
        outcome, "200 OK admin",
        "a request for :authority public.example was routed by its host field to the admin upstream"
    );
    assert_eq!(admin.hits(), 0);
    gw.stop().await;
}

/// The HTTP/2 close grace drops a closing connection 1 s after its GOAWAY once nothing is "in
/// flight" (`ConnCtx::inflight`). But a response body is no longer in flight as soon as hyper has
/// handed its last frame to h2, which buffers it until the client's flow-control window lets it
/// out: a drain that starts while a slow client still has a response's tail to receive drops the
/// connection 1 s later and truncates that response (before, the drain waited for it, up to
/// `drain_timeout`).
#[tokio::test]
async fn h2_drain_does_not_truncate_a_response_still_buffered_for_a_slow_client() {
    const LEN: usize = 4_000;
    let up = Upstream::start(
        "big",
        Arc::new(|_req| Box::pin(async { reply("big", 200, vec![b'x'; LEN]) })),
    )
    .await;
    let gw = Gateway::start(&format!(
        "drain_timeout: 30s\nupstreams:\n  big: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - {{ upstream: big }}\n",
        up.url()
    ))
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    // A client that reads slowly: a small window, released only when it reads.
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(100)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get("http://x/").body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no response head")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The first window's worth arrives; the client does not give the window back yet.
    let first = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("no data")
        .unwrap()
        .unwrap();
    let mut got = first.len();
    assert!(got < LEN);

    // The drain starts while the response's tail waits for the client's window.
    let mut stop = tokio::spawn(gw.stop());
    // It may not end while the response is unfinished (drain_timeout is 30 s): give it a few
    // seconds to (wrongly) finish.
    let _ = tokio::time::timeout(Duration::from_secs(4), &mut stop).await;

    // Now the client reads the rest.
    let _ = body.flow_control().release_capacity(first.len());
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("body stalled")
    {
        match chunk {
            Ok(c) => {
                got += c.len();
                let _ = body.flow_control().release_capacity(c.len());
            }
            Err(e) => {
                panic!("response cut after {got} of {LEN} bytes by the drain: {e}");
            }
        }
    }
    assert_eq!(got, LEN);
    let _ = stop.await;
}

/// RFC 9113 8.3.1 asks an intermediary to compare `host` with `:authority` after scheme-based
/// normalization (RFC 9110 4.2.3): `public.example:80` and `public.example` are the same host for
/// `http`. The new check compares the raw strings and refuses the request with a 400.
#[tokio::test]
async fn h2_host_field_naming_the_authority_without_its_default_port_is_not_refused() {
    let public = Upstream::named("public").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  public: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - {{ upstream: public }}\n",
        public.url()
    ))
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get("http://public.example:80/")
        .header("host", "public.example")
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        ":authority public.example:80 with host public.example (same host) was refused"
    );
    assert_eq!(public.hits(), 1);
    gw.stop().await;
}
