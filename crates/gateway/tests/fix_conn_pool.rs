//! Upstream connection reuse: a connection whose request body is still streaming is not handed to
//! another request, even when its response has already ended.
mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Reads from `s` until a whole response head and a `content-length` body of `len` bytes arrived.
async fn read_response(s: &mut TcpStream, len: usize) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            if out.len() >= end + 4 + len {
                return String::from_utf8_lossy(&out).into_owned();
            }
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_connection_still_sending_a_request_body_is_not_reused() {
    // The upstream answers at once and reads the request body in the background (full duplex, so the
    // connection stays keep-alive); it reports each body it read to the end.
    let (bodies_tx, mut bodies) = mpsc::unbounded_channel::<bytes::Bytes>();
    let up = Upstream::start(
        "u",
        Arc::new(move |req: Request<hyper::body::Incoming>| {
            let bodies_tx = bodies_tx.clone();
            Box::pin(async move {
                tokio::spawn(async move {
                    if let Ok(b) = req.into_body().collect().await {
                        let _ = bodies_tx.send(b.to_bytes());
                    }
                });
                reply("u", 200, "ok")
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n",
        up.url()
    ))
    .await;

    // A: a chunked POST (streamed upstream) that stalls after its first chunk.
    let mut a = TcpStream::connect(gw.addr).await.unwrap();
    a.write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    let resp_a = tokio::time::timeout(Duration::from_secs(10), read_response(&mut a, 2))
        .await
        .expect("A's early response did not arrive");
    assert!(resp_a.starts_with("HTTP/1.1 200"), "{resp_a}");
    assert!(resp_a.ends_with("ok"), "{resp_a}");

    // B, while A's body is still stalled: served (not stuck behind A's body until the route timeout).
    let mut b = TcpStream::connect(gw.addr).await.unwrap();
    b.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let resp_b = tokio::time::timeout(Duration::from_secs(20), read_response(&mut b, 2))
        .await
        .expect("B's response did not arrive");
    assert!(resp_b.starts_with("HTTP/1.1 200"), "{resp_b}");
    assert_eq!(up.hits(), 2);

    // A finishes its body now: it arrives intact upstream (B's GET body, empty, may come first).
    a.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let body = bodies.recv().await.unwrap();
            if !body.is_empty() {
                return body;
            }
        }
    })
    .await
    .expect("A's body did not reach the upstream");
    assert_eq!(got, "hello world");

    // Sequential requests still reuse one pooled connection.
    let ep = endpoint(&gw, "u", 0);
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &gw.url("/c")).await.status, 200);
    }
    wait_until(10, || ep.pool.idle_count() >= 1).await;
    gw.stop().await;
}
