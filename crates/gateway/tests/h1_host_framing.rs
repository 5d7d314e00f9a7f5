//! HTTP/1.1: which host a request is for (an absolute-form target wins over `Host`; an invalid
//! `Host` value is a 400), and an HTTP/1.0 upstream response with Transfer-Encoding is not reused.
mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Two upstreams, `adm` and `pub`, each answering every request with `x-up: <name>`; a route
/// taking `host: admin.example` to `adm`, and a catch-all to `pub`.
async fn admin_and_public() -> (RawUpstream, RawUpstream, Gateway) {
    let answer = |name: &'static str| {
        move |_: &str| {
            format!("HTTP/1.1 200 OK\r\nx-up: {name}\r\ncontent-length: 2\r\n\r\nok").into_bytes()
        }
    };
    let adm = RawUpstream::answering(answer("adm")).await;
    let public = RawUpstream::answering(answer("pub")).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  adm: {{ endpoints: [{{url: '{}'}}] }}\n  pub: {{ endpoints: [{{url: '{}'}}] }}\n\
         routes:\n  - match: {{ headers: {{ host: admin.example }} }}\n    upstream: adm\n  - upstream: pub\n",
        adm.url(),
        public.url()
    ))
    .await;
    (adm, public, gw)
}

/// RFC 9112 3.2.2: for an absolute-form target the server MUST ignore the `Host` field and use
/// the target's authority (a proxy MUST replace `Host` with it). The gateway routes on the `Host`
/// line instead, so a front component that goes by the target (as the RFC says) and the gateway
/// pick different routes for the same request: `GET http://public.example/` with
/// `Host: admin.example` passes a front check for `public.example` and lands on the admin route.
/// Over HTTP/2 the same disagreement (`host` vs `:authority`) is refused with 400; over HTTP/1.1
/// either the target's authority must win or the request must be refused.
#[tokio::test]
async fn an_absolute_form_target_decides_the_host_not_the_host_line() {
    let (_adm, _public, gw) = admin_and_public().await;
    for (req, want) in [
        (
            "GET http://public.example/x HTTP/1.1\r\nHost: admin.example\r\n\r\n",
            "pub",
        ),
        (
            "GET http://admin.example/x HTTP/1.1\r\nHost: public.example\r\n\r\n",
            "adm",
        ),
    ] {
        let mut c = RawClient::connect(&gw).await;
        c.send(req.as_bytes()).await;
        let r = c.response(false).await;
        let ok = r.status == 400 || (r.status == 200 && r.header("x-up") == Some(want));
        assert!(
            ok,
            "{req:?}: routed by the Host line, not the target's authority \
             (want the `{want}` route or 400): {r:?}"
        );
    }
    gw.stop().await;
}

/// RFC 9112 3.2: a request whose `Host` field value is not valid (`uri-host [":" port]`) MUST get
/// 400, as does one with several `Host` lines (which the gateway already refuses). A list
/// (`a, b`: what an intermediary that joins repeated lines forwards for two `Host` lines) or a
/// value with `/` and `@` is passed on and routed as an opaque string, so components that read
/// the host out of it differently disagree about which host was asked for.
#[tokio::test]
async fn an_invalid_host_value_is_refused() {
    let (_adm, _public, gw) = admin_and_public().await;
    for host in [
        "public.example, admin.example",
        "admin.example, public.example",
        "public.example/x@admin.example",
        "admin.example public.example",
    ] {
        let mut c = RawClient::connect(&gw).await;
        c.send(format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await;
        let r = c.response(false).await;
        assert_eq!(r.status, 400, "Host: {host:?} was accepted: {r:?}");
    }
    gw.stop().await;
}

/// RFC 9112 6.1: "A server or client that receives an HTTP/1.0 message containing a
/// Transfer-Encoding header field MUST treat the message as if the framing is faulty, even if a
/// Content-Length is present, and close the connection after processing the message." The
/// gateway's upstream client decodes an HTTP/1.0 `Transfer-Encoding: chunked` response and, with
/// `Connection: keep-alive`, puts the connection back in the pool, where the next client's request
/// goes on it (an HTTP/1.0 peer and the gateway can disagree on where that response ended: a
/// response desync). Here the upstream reports when the gateway closes its connection; it must,
/// right after the response.
#[tokio::test]
async fn an_http10_response_with_transfer_encoding_closes_the_upstream_connection() {
    let (eof_tx, mut eof) = mpsc::unbounded_channel::<usize>();
    let up = RawUpstream::start(move |mut s, i| {
        let eof_tx = eof_tx.clone();
        async move {
            let mut buf = Vec::new();
            while read_head(&mut s, &mut buf).await.is_some() {
                let answer: &[u8] = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\
                    Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
                if tokio::io::AsyncWriteExt::write_all(&mut s, answer)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // `read_head` returned None: the gateway closed (or reset) the connection.
            let mut rest = [0u8; 16];
            let _ = s.read(&mut rest).await;
            let _ = eof_tx.send(i);
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    retry: {{ attempts: 1 }}\n",
        up.url()
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "{r:?}");
    let closed = tokio::time::timeout(Duration::from_secs(5), eof.recv()).await;
    assert!(
        matches!(closed, Ok(Some(0))),
        "the upstream connection that sent an HTTP/1.0 message with Transfer-Encoding was kept \
         for reuse (pool idle: {})",
        endpoint(&gw, "u", 0).pool.idle_count()
    );
    gw.stop().await;
}
