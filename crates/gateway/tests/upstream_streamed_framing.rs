//! A request whose body is streamed (a `Content-Length` over `retry_buffer`, or a chunked upload
//! that is not retried) goes through hyper's HTTP/1 client, not the gateway's own; the answer's
//! framing is held to the same rules either way. Each test sends the same upstream answer to a
//! small upload (the gateway's own client) and to a large one (hyper's). Found by a review: the
//! large one got the raw gzip bytes unlabelled, a short well-formed body, or a stream reset.
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

/// One attempt, so a 502 is not hidden by a retry.
fn config(url: &str) -> String {
    format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 10s\n    retry: {{ attempts: 1 }}\n"
    )
}

/// A POST with a `Content-Length` body of `len` bytes.
fn post(len: usize) -> Vec<u8> {
    let mut r =
        format!("POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").into_bytes();
    r.resize(r.len() + len, b'a');
    r
}

/// The answer to a POST of `len` bytes on a new connection, and how it was framed.
async fn answer_to_upload(gw: &Gateway, len: usize) -> (RawResponse, Framed) {
    let mut c = RawClient::connect(gw).await;
    c.send(&post(len)).await;
    tokio::time::timeout(Duration::from_secs(10), c.read_response(false))
        .await
        .expect("no response")
}

/// Sizes of the request body: sent whole (own client) and streamed (over `retry_buffer`).
const SMALL: usize = 10;
const STREAMED: usize = 200_000;

#[tokio::test]
async fn a_gzip_transfer_coding_is_a_502_after_any_upload() {
    let up = RawUpstream::answering(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .to_vec()
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    for len in [SMALL, STREAMED] {
        let (r, _) = answer_to_upload(&gw, len).await;
        assert_eq!(
            (r.status, r.header("x-bulwark-reason")),
            (502, Some("upstream_error")),
            "upload of {len} bytes: {r:?}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn with_both_framings_chunked_wins_after_any_upload() {
    let up = RawUpstream::answering(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n"
            .to_vec()
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    for len in [SMALL, STREAMED] {
        let (r, framed) = answer_to_upload(&gw, len).await;
        assert_eq!(r.status, 200, "upload of {len} bytes: {r:?}");
        assert_eq!(
            (String::from_utf8_lossy(&r.body).into_owned(), framed),
            ("hello world".to_owned(), Framed::Complete),
            "upload of {len} bytes: {r:?}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_content_length_list_reaches_an_http2_client_as_one_number_after_any_upload() {
    let up = RawUpstream::answering(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec()
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let c = h2c_client();
    for len in [SMALL, STREAMED] {
        let req = Request::post(gw.url("/p"))
            .body(Full::new(Bytes::from(vec![b'a'; len])))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
            .await
            .expect("no response")
            .unwrap_or_else(|e| panic!("upload of {len} bytes: the stream failed: {e:?}"));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers().get("content-length").unwrap(), "5");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
    }
    gw.stop().await;
}
