//! Client connection timeouts: `header_read_timeout` runs from the first byte of a request head (so
//! slow-loris is cut), while an idle keep-alive connection lasts `idle_timeout`.
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

fn config(url: &str, limits: &str) -> String {
    format!(
        "limits: {{ {limits} }}\nupstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n"
    )
}

/// Reads one response with a `content-length` body of `len` bytes (or whatever came before EOF).
async fn read_response(s: &mut TcpStream, len: usize) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                if out.len() >= end + 4 + len {
                    return;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("response did not arrive");
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the gateway closes `s` (read returns EOF or an error) within `secs`; bytes read before
/// are discarded.
async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn a_stalled_first_request_head_is_cut_after_header_read_timeout() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 60s",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Well under idle_timeout: the head clock closed it.
    assert!(closed_within(&mut s, 10).await, "slow-loris head not cut");
    assert_eq!(up.hits(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_head_on_a_keep_alive_connection_is_cut_after_header_read_timeout() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 60s",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let r = read_response(&mut s, 1).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    assert!(closed_within(&mut s, 10).await, "slow-loris head not cut");
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_header_read_timeout_until_idle_timeout() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 2s",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let r = read_response(&mut s, 1).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Idle for over three header_read_timeouts (the scenario, not a wait for state).
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.write_all(GET).await.unwrap();
    let r = read_response(&mut s, 1).await;
    assert!(
        r.starts_with("HTTP/1.1 200"),
        "second request not served: {r:?}"
    );
    // Then, idle again, it is closed by idle_timeout.
    assert!(
        closed_within(&mut s, 15).await,
        "idle connection not closed"
    );
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn an_http2_connection_is_not_timed_as_a_request_head() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 60s",
    ))
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
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
    let (bodies_tx, mut bodies) = mpsc::unbounded_channel::<Bytes>();
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
    let gw = Gateway::start(&config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 60s",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, 2).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // More body, then the rest after over three header_read_timeouts.
    s.write_all(b"1\r\n \r\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.write_all(b"5\r\nworld\r\n0\r\n\r\n").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), bodies.recv())
        .await
        .expect("the body did not reach the upstream")
        .unwrap();
    assert_eq!(got, "hello world");
    gw.stop().await;
}
