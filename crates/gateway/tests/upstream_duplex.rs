//! The gateway's own HTTP/1.1 client toward upstreams: an upstream that answers a buffered upload
//! before reading it gets the rest of the body while its answer streams (found by a review; the
//! test failed before its fix).
mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Reads a request head off `s`; returns the declared `content-length` and the body bytes that
/// came with the head.
async fn head_only(s: &mut TcpStream) -> Option<(usize, usize)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .map_or(0, |v| v.parse().unwrap());
            return Some((len, buf.len() - end - 4));
        }
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Reads one chunk of a chunked body off `c`: its data, `Some(empty)` for the last chunk (with the
/// final CRLF read), `None` if the connection ends first.
async fn chunk(c: &mut RawClient) -> Option<Vec<u8>> {
    let size = c.line().await?;
    let size = usize::from_str_radix(size.trim(), 16).unwrap();
    if size == 0 {
        loop {
            if c.line().await?.is_empty() {
                return Some(Vec::new());
            }
        }
    }
    let data = c.take(size + 2).await?;
    Some(data[..size].to_vec())
}

/// An upstream that answers an upload at once, before it has read the body (a streaming upload
/// processor, an echo that streams back, a gRPC-web-like full-duplex service), and only then
/// reads the body: the request body is still owed to it. hyper's client (which the gateway used
/// before, and still uses for bodies over `retry_buffer`), Envoy and nginx keep sending the body
/// while the response streams. Before the fix, the gateway's own client stopped writing the
/// request the moment the response head arrived: the rest of a buffered body (up to
/// `retry_buffer`) was never sent, the upstream waited for it, and the client's response hung
/// (until the idle timeout cut it) while the upstream had only part of the upload.
#[tokio::test]
async fn an_early_response_to_a_buffered_upload_does_not_stop_the_body_going_upstream() {
    const BODY: usize = 16 * 1024 * 1024;
    let go = Arc::new(Notify::new());
    let up_go = go.clone();
    let up = RawUpstream::start(move |mut s, _| {
        let go = up_go.clone();
        async move {
            let Some((len, mut have)) = head_only(&mut s).await else {
                return;
            };
            // The answer starts before the body is read.
            if s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nstarted\r\n")
                .await
                .is_err()
            {
                return;
            }
            go.notified().await;
            // Then the body, all of it (or what comes before 5 s without a byte).
            let mut tmp = vec![0u8; 64 * 1024];
            while have < len {
                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await {
                    Ok(Ok(n)) if n > 0 => have += n,
                    _ => break,
                }
            }
            let last = format!("got {have}");
            let _ = s
                .write_all(format!("{:x}\r\n{last}\r\n0\r\n\r\n", last.len()).as_bytes())
                .await;
        }
    })
    .await;
    let yaml = format!(
        "limits: {{ max_body_bytes: 64MiB }}\nupstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 30s\n    retry_buffer: 32MiB\n",
        up.url()
    );
    let gw = Gateway::start(&yaml).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n").as_bytes(),
    )
    .await;
    c.send(&vec![b'x'; BODY]).await;
    let status = tokio::time::timeout(Duration::from_secs(20), c.line())
        .await
        .expect("no response head within 20 s")
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    while !c.line().await.unwrap().is_empty() {}
    assert_eq!(chunk(&mut c).await.unwrap(), b"started");
    // The client has the start of the answer: the upstream now reads the body.
    go.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(30), chunk(&mut c))
        .await
        .expect("the rest of the response did not come within 30 s");
    assert_eq!(
        rest.map(|d| String::from_utf8_lossy(&d).into_owned())
            .as_deref(),
        Some(format!("got {BODY}").as_str()),
        "the upstream did not get the whole request body"
    );
    gw.stop().await;
}
