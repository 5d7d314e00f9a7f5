//! The response a client of the gateway gets, as HTTP semantics (RFC 9110, 9112, 9113): HEAD and
//! 204 over HTTP/2, a response head that promises a connection the gateway then closes, and an
//! upstream's `Content-Length` list passed on to HTTP/2 clients (found by a review; each test
//! failed before its fix).
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::AsyncWriteExt;

/// One upstream `u` at `url`, one catch-all route with a fallback of `status` and body `sorry`.
fn fallback_config(url: &str, status: u16) -> String {
    // A 204 or 304 fallback has no body (refused at load).
    let body = if matches!(status, 204 | 304) {
        ""
    } else {
        "body: sorry, "
    };
    format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n    \
         fallback: {{ status: {status}, {body}content_type: text/plain }}\n"
    )
}

/// Sends `req` on an h2c connection and collects the answer: its status, headers and body, or
/// the error the client saw (a stream reset, for instance).
async fn h2_exchange(
    gw: &Gateway,
    req: Request<Full<Bytes>>,
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    let mut send = h2c_sender::<Full<Bytes>>(gw.addr).await;
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("no answer within 10 s")
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("body not complete within 10 s")
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok((parts.status.as_u16(), parts.headers, body))
}

/// RFC 9110 9.3.2 / RFC 9113 8.1.1: a response to HEAD has no content. Over HTTP/1.1 the gateway
/// leaves the fallback's body out; over HTTP/2 it sends it as DATA, and an HTTP/2 client (the h2
/// crate, as curl and browsers) treats DATA on a HEAD response as malformed: the stream is reset
/// with PROTOCOL_ERROR and the client gets no answer at all.
#[tokio::test]
async fn an_http2_head_answered_by_a_fallback_gets_its_head_without_a_body() {
    let dead = dead_url().await;
    let gw = Gateway::start(&fallback_config(&dead, 503)).await;
    // HTTP/1.1 does it right.
    let mut c = RawClient::connect(&gw).await;
    c.send(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let r = c.response(true).await;
    assert_eq!(
        (r.status, r.header("x-bulwark-reason")),
        (503, Some("fallback"))
    );
    let r = c.response(false).await;
    assert_eq!((r.status, &r.body[..]), (503, &b"sorry"[..]));
    // HTTP/2.
    let req = Request::builder()
        .method(Method::HEAD)
        .uri(gw.url("/x"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = h2_exchange(&gw, req).await;
    let (status, headers, body) = got.expect("HTTP/2 HEAD answered by a fallback");
    assert_eq!(status, 503);
    assert_eq!(
        headers.get("x-bulwark-reason").map(|v| v.to_str().unwrap()),
        Some("fallback")
    );
    assert!(body.is_empty(), "{body:?}");
    gw.stop().await;
}

/// RFC 9110 6.4.1 and 8.6: a 204 has no content, and a server MUST NOT send `Content-Length` in
/// it. The HTTP/1.1 listener drops both; the HTTP/2 one sent a 204 fallback's `content-length`,
/// and passed on an upstream 204's `content-length: 0`.
#[tokio::test]
async fn an_http2_204_has_neither_content_nor_content_length() {
    let dead = dead_url().await;
    let gw = Gateway::start(&fallback_config(&dead, 204)).await;
    let req = Request::get(gw.url("/x"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = h2_exchange(&gw, req).await.unwrap();
    assert_eq!(status, 204);
    assert!(body.is_empty(), "a 204 with content: {body:?}");
    assert_eq!(headers.get("content-length"), None, "{headers:?}");
    gw.stop().await;

    let up = RawUpstream::answering(|_| {
        b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n".to_vec()
    })
    .await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let req = Request::get(gw.url("/x"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = h2_exchange(&gw, req).await.unwrap();
    assert_eq!(status, 204);
    assert!(body.is_empty());
    assert_eq!(headers.get("content-length"), None, "{headers:?}");
    gw.stop().await;
}

/// RFC 9110 8.6: a 304's `content-length` would be the representation's length, which a 304
/// the gateway makes (a fallback) does not know: it had `content-length: 0` (found by a review).
#[tokio::test]
async fn a_304_fallback_claims_no_length() {
    let dead = dead_url().await;
    let gw = Gateway::start(&fallback_config(&dead, 304)).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    for _ in 0..2 {
        let r = c.response(true).await;
        assert_eq!(r.status, 304);
        assert_eq!(r.header("content-length"), None, "{r:?}");
        assert_eq!(r.header("x-bulwark-reason"), Some("fallback"));
    }
    let req = Request::get(gw.url("/x"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = h2_exchange(&gw, req).await.unwrap();
    assert_eq!(status, 304);
    assert!(body.is_empty());
    assert_eq!(headers.get("content-length"), None, "{headers:?}");
    gw.stop().await;
}

/// An answer that leaves a request body unread (here a 404 to a 100 KiB POST) makes the gateway
/// close the connection after it (more than 64 KiB is not drained), but the answer does not say
/// `Connection: close`: the client takes the connection as reusable, and the next request it sends
/// on it is read and dropped by the lingering close, never answered. Envoy says `connection:
/// close` when it will not read the rest of the request; nginx reads and discards the body and
/// keeps the connection.
#[tokio::test]
async fn a_connection_the_gateway_will_close_is_announced_with_connection_close() {
    let up = RawUpstream::answering(|_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        .await;
    let cfg = format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    \
         match: {{ path_prefix: /api/ }}\n",
        up.url()
    );
    let gw = Gateway::start(&cfg).await;
    let mut c = RawClient::connect(&gw).await;
    let body = vec![b'a'; 100 * 1024];
    c.send(
        format!(
            "POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    c.send(&body).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 404);
    if r.header("connection") != Some("close") {
        // Kept alive, as the answer says: the next request on it is answered.
        let _ =
            c.s.write_all(b"GET /api/a HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
        let status = c.line().await;
        assert_eq!(
            status.as_deref(),
            Some("HTTP/1.1 200 OK"),
            "the 404 did not say `connection: close`, yet the next request went unanswered"
        );
    }
    gw.stop().await;
}

/// RFC 9110 8.6: `Content-Length: 5, 5` may be taken as 5, and a recipient that does so replaces
/// the value with one number before passing it on. The HTTP/1.1 listener sends `content-length: 5`;
/// the HTTP/2 one passes `5, 5` through, which an HTTP/2 client cannot parse: it resets the stream
/// (PROTOCOL_ERROR) and the response is lost.
#[tokio::test]
async fn an_upstream_content_length_list_reaches_an_http2_client_as_one_number() {
    let up = RawUpstream::answering(|_| {
        b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello".to_vec()
    })
    .await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(
        (r.header("content-length"), &r.body[..]),
        (Some("5"), &b"hello"[..])
    );
    let req = Request::get(gw.url("/x"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = h2_exchange(&gw, req)
        .await
        .expect("HTTP/2 client got the response");
    assert_eq!((status, &body[..]), (200, &b"hello"[..]));
    assert_eq!(
        headers.get("content-length").map(|v| v.to_str().unwrap()),
        Some("5")
    );
    gw.stop().await;
}

/// A small chunked upload answered without being read (here a 404), all of it already with the
/// head: the gateway drops it and keeps the connection, as nginx does (it used to close after any
/// chunked rest, announced). One whose end has not come yet still closes, and says so.
#[tokio::test]
async fn a_small_chunked_body_left_unread_keeps_the_connection() {
    let up = RawUpstream::answering(|_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        .await;
    let cfg = format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    \
         match: {{ path_prefix: /api/ }}\n",
        up.url()
    );
    let gw = Gateway::start(&cfg).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n",
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("connection"), None);
    c.send(b"GET /api/a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "the next request on the connection");

    // The end not there yet: the answer says the connection closes.
    let mut c = RawClient::connect(&gw).await;
    c.send(
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("connection"), Some("close"));
    gw.stop().await;
}
