//! HTTP/2 peers and what the gateway holds or sends for them: a client that reads nothing pins
//! bounded memory; many small chunks from an HTTP/1.1 side do not become as many DATA frames (a
//! standard HTTP/2 peer takes that for a flood and closes the connection). Found by a review
//! (sec2); each test failed before its fix.
mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

/// The tests of this file run one at a time: one measures the process's memory, which the others
/// would disturb.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The process's resident memory, in bytes (the gateway runs in this process).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Waits until RSS has not grown for `quiet` (or `max` passed); the growth over `base`, at most.
async fn rss_growth_settled(base: u64, quiet: Duration, max: Duration) -> u64 {
    let end = tokio::time::Instant::now() + max;
    let mut peak = rss();
    let mut since = tokio::time::Instant::now();
    while tokio::time::Instant::now() < end && since.elapsed() < quiet {
        // Sampling the memory over time is the measurement itself, not a wait for an event.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss();
        if now > peak + 256 * 1024 {
            peak = now;
            since = tokio::time::Instant::now();
        }
    }
    peak.saturating_sub(base)
}

/// An upstream answering every request with `len` bytes (one shared buffer).
async fn big_upstream(len: usize) -> Upstream {
    let body = bytes::Bytes::from(vec![b'x'; len]);
    Upstream::start(
        "big",
        std::sync::Arc::new(move |_req| {
            let body = body.clone();
            Box::pin(async move { http::Response::new(full(body)) })
        }),
    )
    .await
}

/// An HPACK block for `GET http://x{path}`.
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    b.extend_from_slice(&[0x04, path.len() as u8]);
    b.extend_from_slice(path.as_bytes());
    b.extend_from_slice(&[0x01, 0x01, b'x']);
    b
}

/// An HTTP/2 client that opens 100 streams for 4 MiB responses, grants a huge flow-control window
/// and never reads its socket: the gateway holds a bounded send buffer per stream (it held
/// hyper's default 400 KiB each, ~50 MiB for this one connection, until `idle_timeout`).
#[tokio::test]
async fn an_http2_client_that_reads_nothing_pins_bounded_memory() {
    let _serial = serial().await;
    use support::h2raw::*;
    let up = big_upstream(4 << 20).await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let c = h2c_client();
    assert_eq!(get(&c, &gw.url("/warm")).await.status, 200);
    drop(c);
    let base = rss();

    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE = 2^31 - 1, then the connection window to the same.
    hello.extend(frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    hello.extend(frame(8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    for i in 0..100u32 {
        hello.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1 + 2 * i,
            &get_block("/big"),
        ));
    }
    s.write_all(&hello).await.unwrap();
    let grew = rss_growth_settled(base, Duration::from_secs(3), Duration::from_secs(30)).await;
    drop(s);
    assert!(
        grew < 32 << 20,
        "one HTTP/2 connection that reads nothing made the gateway hold {} MiB",
        grew >> 20
    );
    gw.stop().await;
}

/// An HTTP/1.1 upstream streaming 100,000 chunks of 16 bytes (a row per write), many per read:
/// an HTTP/2 client that looks at the head before it reads the body gets it whole. Each chunk was
/// a DATA frame of its own, and the client (the `h2` crate) tore the connection down with
/// `GOAWAY ENHANCE_YOUR_CALM`.
#[tokio::test]
async fn an_upstream_streaming_small_chunks_does_not_get_http2_clients_disconnected() {
    let _serial = serial().await;
    const CHUNKS: usize = 100_000;
    const RECORD: &[u8] = b"{\"n\":1234567,\"\"}";
    let mut wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..CHUNKS {
        wire.extend_from_slice(b"10\r\n");
        wire.extend_from_slice(RECORD);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let wire = std::sync::Arc::new(wire);
    let up = RawUpstream::start(move |mut s, _| {
        let wire = wire.clone();
        async move {
            let mut buf = Vec::new();
            while read_head(&mut s, &mut buf).await.is_some() {
                if s.write_all(&wire).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let got = get(&client(), &gw.url("/rows")).await;
    assert_eq!(got.body.len(), CHUNKS * RECORD.len());
    let c = h2c_client();
    let req = http::Request::get(gw.url("/rows"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.expect("response head");
    assert_eq!(resp.status(), 200);
    // The application looks at the head before it reads the body (its frames wait in the
    // client's stream window meanwhile): the client's own pace, not a wait for the gateway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    match http_body_util::BodyExt::collect(resp.into_body()).await {
        Ok(b) => assert_eq!(b.to_bytes().len(), CHUNKS * RECORD.len()),
        Err(e) => panic!("the HTTP/2 client gave up the connection: {e:?}"),
    }
    gw.stop().await;
}

/// An HTTP/1.1 client uploading a chunked body of 100,000 chunks of 16 bytes to an `http2: true`
/// upstream that reads the body only after some work: the upload arrives whole. Each chunk was a
/// DATA frame of its own; the upstream's `h2` took it for a flood and sent GOAWAY on the shared
/// connection (the client got 502).
#[tokio::test]
async fn a_client_uploading_small_chunks_does_not_get_the_shared_http2_upstream_connection_closed()
{
    let _serial = serial().await;
    const CHUNKS: usize = 100_000;
    let up = Upstream::start(
        "h2",
        std::sync::Arc::new(|req: http::Request<hyper::body::Incoming>| {
            Box::pin(async move {
                // Some work before the body is read (an auth check, a queue).
                tokio::time::sleep(Duration::from_millis(300)).await;
                match http_body_util::BodyExt::collect(req.into_body()).await {
                    Ok(b) => reply("h2", 200, b.to_bytes().len().to_string()),
                    Err(e) => reply("h2", 500, format!("{e}")),
                }
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n",
        up.url()
    ))
    .await;
    let mut wire =
        b"POST /upload HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..CHUNKS {
        wire.extend_from_slice(b"10\r\n0123456789abcdef\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let c = RawClient::connect(&gw).await;
    let (mut r, mut w) = tokio::io::split(c.s);
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&wire).await;
        w
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 4096];
        loop {
            match r.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&b[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"1600000") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let _ = writer.await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("1600000"),
        "the upload of {CHUNKS} 16-byte chunks did not reach the upstream whole: {text}"
    );
    gw.stop().await;
}
