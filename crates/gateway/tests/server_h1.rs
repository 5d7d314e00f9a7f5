//! The gateway's own HTTP/1.1 server side, spoken to over raw TCP: heads split across reads,
//! pipelining, HTTP/1.0 and `Connection: close`, chunked bodies, `Expect: 100-continue`, HEAD,
//! 431/400, the head and idle timers, and a client that goes away mid-response.
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Mutex};

use support::limited_config as config;

/// An upstream that answers with the request body, and the method and target in headers.
async fn echo() -> Upstream {
    Upstream::start(
        "echo",
        Arc::new(|req: Request<hyper::body::Incoming>| {
            Box::pin(async move {
                let method = req.method().to_string();
                let target = req.uri().to_string();
                let body = match req.into_body().collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => return reply("echo", 400, "body failed"),
                };
                let mut r = reply("echo", 200, body);
                r.headers_mut().insert("x-method", method.parse().unwrap());
                r.headers_mut().insert("x-target", target.parse().unwrap());
                r
            })
        }),
    )
    .await
}

type Raw = RawClient;

#[tokio::test]
async fn a_head_split_across_many_reads_is_served() {
    let up = echo().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    let req = b"GET /split?q=1 HTTP/1.1\r\nHost: x\r\nX-Long: abcdefghijklmnopqrstuvwxyz\r\n\r\n";
    for piece in req.chunks(3) {
        c.send(piece).await;
        c.s.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-target"), Some("/split?q=1"));
    assert!(r.header("date").is_some(), "{r:?}");
    gw.stop().await;
}

/// A connection quiet for a while between requests gives its read buffer back; the requests that
/// follow on it (one, then a pipelined pair split across reads) are served as before.
#[tokio::test]
async fn a_keep_alive_connection_serves_on_after_giving_its_buffer_back() {
    let up = echo().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    // Past the gateway's 1 s release point (the quiet time is what is tested, not a wait).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    c.send(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\nPOST /3 HTTP/1.1\r\nHost: x\r\nContent-")
        .await;
    c.s.flush().await.unwrap();
    tokio::task::yield_now().await;
    c.send(b"Length: 5\r\n\r\nhello").await;
    for (target, body) in [("/2", ""), ("/3", "hello")] {
        let r = c.response(false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-target"), Some(target));
        assert_eq!(r.body, body.as_bytes());
    }
    assert_eq!(up.hits(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = echo().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    c.send(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /3 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    for (target, body) in [("/1", ""), ("/2", "hello"), ("/3", "")] {
        let r = c.response(false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-target"), Some(target));
        assert_eq!(r.body, body.as_bytes());
    }
    assert_eq!(up.hits(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn http10_gets_a_delimited_response_and_the_connection_closes() {
    let up = echo().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /old HTTP/1.0\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-target"), Some("/old"));
    assert!(
        r.header("content-length").is_some() || r.header("connection") == Some("close"),
        "{r:?}"
    );
    assert!(
        r.header("transfer-encoding").is_none(),
        "no chunked for 1.0"
    );
    assert!(c.closed_within(10).await, "HTTP/1.0 connection left open");
    // With keep-alive asked for, it stays.
    let mut c = Raw::connect(&gw).await;
    for _ in 0..2 {
        c.send(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    gw.stop().await;
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let up = echo().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_within(10).await, "connection left open");
    assert!(c.buf.is_empty(), "answered past Connection: close");
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_chunked_request_body_is_forwarded_intact() {
    let up = echo().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    // POST streams (not retried), PUT goes through the retry buffer; extensions and trailers too.
    for method in ["POST", "PUT"] {
        c.send(
            format!(
                "{method} /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let r = c.response(false).await;
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"hello world"[..]),
            "{method}"
        );
    }
    // A bigger one, sent in pieces, keeps every byte.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    c.send(b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    for part in data.chunks(30_000) {
        c.send(format!("{:x}\r\n", part.len()).as_bytes()).await;
        c.send(part).await;
        c.send(b"\r\n").await;
    }
    c.send(b"0\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert!(r.body == data, "chunked body changed in transit");
    gw.stop().await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let up = echo().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    // Nothing of the body is sent until the gateway asks for it.
    let r = c.response(false).await;
    assert_eq!(r.status, 100);
    c.send(b"hello").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    gw.stop().await;
}

/// The gateway answers `Expect: 100-continue` itself and does not pass it upstream (as Envoy):
/// the upstream gets the body with the head, and does not wait for a `100` of its own. The same
/// for an HTTP/2 client's request (the body sent without waiting, as hyper's client does).
#[tokio::test]
async fn expect_is_not_sent_upstream() {
    let up = RawUpstream::answering(|req| {
        let seen = req.to_ascii_lowercase().contains("\r\nexpect:");
        let body = if seen { "expect" } else { "none" };
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
    .await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(c.response(false).await.status, 100);
    c.send(b"hello").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"none"[..]));
    let h2 = h2c_client();
    let req = Request::put(gw.url("/e"))
        .header("expect", "100-continue")
        .body(http_body_util::Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let r = send(&h2, req).await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "none".to_owned()));
    gw.stop().await;
}

#[tokio::test]
async fn a_head_response_has_no_body() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let r = c.response(true).await;
    assert_eq!(r.status, 200);
    // The next bytes are the GET's response, not a body.
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"u"[..]));
    gw.stop().await;
}

#[tokio::test]
async fn oversized_and_malformed_heads_are_refused_and_the_gateway_serves_on() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&config(&up.url(), "max_header_bytes: 4KiB")).await;
    let big = "a".repeat(20 * 1024);
    let mut c = Raw::connect(&gw).await;
    c.send(format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 431);
    assert_eq!(r.header("x-bulwark-reason"), Some("headers_too_large"));
    assert!(c.closed_within(10).await);
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET / HTTP/1.1\r\nHost x\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 400);
    assert!(c.closed_within(10).await);
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_loris_head_is_cut_while_an_idle_keep_alive_connection_lives_on() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 60s",
    ))
    .await;
    let mut idle = Raw::connect(&gw).await;
    idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(idle.response(false).await.status, 200);
    let mut slow = Raw::connect(&gw).await;
    slow.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
    assert!(slow.closed_within(10).await, "slow-loris head not cut");
    // The idle connection outlived it (several header_read_timeouts) and still serves.
    idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(idle.response(false).await.status, 200);
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_gone_mid_response_does_not_stall_the_gateway() {
    // The upstream streams a body the test feeds; the test keeps the sender to see when the
    // gateway drops the exchange (the upstream's body is then dropped and sends fail).
    let (tx_out, mut rx_out) = mpsc::unbounded_channel::<mpsc::Sender<Bytes>>();
    let tx_out = Arc::new(Mutex::new(tx_out));
    let up = Upstream::start(
        "stream",
        Arc::new(move |req: Request<hyper::body::Incoming>| {
            let tx_out = tx_out.clone();
            Box::pin(async move {
                if req.uri().path() != "/stream" {
                    return reply("stream", 200, "ok");
                }
                let (tx, rx) = mpsc::channel::<Bytes>(1);
                tx_out.lock().await.send(tx).unwrap();
                let body = http_body_util::StreamBody::new(futures_util::stream::unfold(
                    rx,
                    |mut rx| async move {
                        rx.recv().await.map(|b| {
                            (
                                Ok::<_, std::convert::Infallible>(http_body::Frame::data(b)),
                                rx,
                            )
                        })
                    },
                ));
                http::Response::builder()
                    .status(200)
                    .body(http_body_util::BodyExt::boxed(body))
                    .unwrap()
            })
        }),
    )
    .await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let tx = tokio::time::timeout(Duration::from_secs(10), rx_out.recv())
        .await
        .unwrap()
        .unwrap();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    // The head and the first chunk arrive, chunked.
    let status = c.line().await.expect("EOF before a status line");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    while !c.line().await.expect("EOF inside a head").is_empty() {}
    assert_eq!(c.line().await.as_deref(), Some("5"));
    assert_eq!(c.take(7).await.as_deref(), Some(&b"first\r\n"[..]));
    drop(c);
    // The exchange is dropped: the upstream body's receiver goes away.
    wait_for(10, || {
        let tx = tx.clone();
        async move { tx.send(Bytes::from_static(b"more")).await.is_err() }
    })
    .await;
    // And the gateway serves on.
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_an_exchange_in_flight() {
    let started = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (s2, r2) = (started.clone(), release.clone());
    let up = Upstream::start(
        "slow",
        Arc::new(move |req: Request<hyper::body::Incoming>| {
            let (s, r) = (s2.clone(), r2.clone());
            Box::pin(async move {
                if req.uri().path() == "/slow" {
                    s.notify_one();
                    r.notified().await;
                }
                reply("slow", 200, "finished")
            })
        }),
    )
    .await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut idle = Raw::connect(&gw).await;
    idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(idle.response(false).await.status, 200);
    let mut busy = Raw::connect(&gw).await;
    busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    started.notified().await;
    let stopping = tokio::spawn(gw.stop());
    assert!(
        idle.closed_within(10).await,
        "idle connection not closed on shutdown"
    );
    release.notify_one();
    let r = busy.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"finished"[..]));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(busy.closed_within(10).await);
    stopping.await.unwrap();
}

/// A response of `chunks` one-byte chunks `every` apart, under `idle_timeout: 1s`: once it ends,
/// the client connection carries the next request (it has only just become idle), however long
/// the response took in all.
async fn keep_alive_after_a_streamed_response(chunks: usize, every: Duration) {
    let up = RawUpstream::start(move |mut s, _| async move {
        let mut buf = Vec::new();
        let mut n = 0;
        while let Some(_req) = read_head(&mut s, &mut buf).await {
            n += 1;
            if n == 1 {
                s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                for _ in 0..chunks {
                    tokio::time::sleep(every).await;
                    s.write_all(b"1\r\nx\r\n").await.unwrap();
                }
                s.write_all(b"0\r\n\r\n").await.unwrap();
            } else {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
        }
    })
    .await;
    let gw = Gateway::start(&limited_config(&up.url(), "idle_timeout: 1s")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!((r.status, r.body.len()), (200, chunks));
    assert_eq!(r.header("connection"), None, "{r:?}");
    // Well within idle_timeout of the end of the response.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (r, framed) = tokio::time::timeout(Duration::from_secs(5), async {
        if c.buf.is_empty() && !c.fill().await {
            panic!("the gateway closed the idle-for-50ms keep-alive connection");
        }
        c.read_response(false).await
    })
    .await
    .unwrap();
    assert_eq!((r.status, framed), (200, Framed::Complete));
    gw.stop().await;
}

#[tokio::test]
async fn keep_alive_survives_a_response_that_streamed_longer_than_idle_timeout() {
    keep_alive_after_a_streamed_response(6, Duration::from_millis(400)).await;
}

#[tokio::test]
async fn keep_alive_survives_a_response_that_streamed_for_less_than_idle_timeout() {
    keep_alive_after_a_streamed_response(3, Duration::from_millis(200)).await;
}

/// `Content-Length: 5, 5` is accepted (RFC 9112 6.3 allows it) and goes upstream as one number,
/// and a declared length over the limit in that form still gets 413 (not a `100 Continue`).
#[tokio::test]
async fn a_comma_joined_content_length_is_normalised_and_checked() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let up = RawUpstream::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            use tokio::io::AsyncReadExt;
            let (mut b, mut got) = (vec![0u8; 8192], Vec::new());
            while let Ok(Ok(n @ 1..)) =
                tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await
            {
                got.extend_from_slice(&b[..n]);
            }
            let _ = tx.send(String::from_utf8_lossy(&got).to_ascii_lowercase());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        }
    })
    .await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_body_bytes: 1KiB")).await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello")
        .await;
    assert_eq!(c.response(false).await.status, 200);
    let seen = rx.recv().await.unwrap();
    assert!(
        !seen.contains("content-length: 5, 5"),
        "upstream got:\n{seen}"
    );

    let mut c = RawClient::connect(&gw).await;
    c.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000, 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let first = c.line().await.unwrap();
    assert!(first.starts_with("HTTP/1.1 413"), "{first}");
    gw.stop().await;
}
