//! Protocols and limits: SSE streaming, h2c, TLS with ALPN h2, large bodies, 431/413/400.
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::sync::{mpsc, Mutex};

/// A response body fed from a channel, one frame per message.
struct ChanBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test]
async fn server_sent_events_reach_the_client_chunk_by_chunk() {
    // The upstream hands the test the sender of its response body; the test sends one event, checks
    // the client got it, then sends the next.
    let (tx_out, mut rx_out) = mpsc::unbounded_channel();
    let tx_out = Arc::new(Mutex::new(Some(tx_out)));
    let sse = Upstream::start(
        "sse",
        Arc::new(move |_req| {
            let tx_out = tx_out.clone();
            Box::pin(async move {
                let (sender, rx) = mpsc::channel::<Bytes>(1);
                let body = ChanBody(rx);
                if let Some(t) = tx_out.lock().await.take() {
                    let _ = t.send(sender);
                }
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body.boxed())
                    .unwrap()
            })
        }),
    )
    .await;
    let gw = Gateway::start(&one_route(&sse.url(), "")).await;
    let c = client();
    let resp = get_streaming(&c, &gw.url("/stream")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let sender = rx_out.recv().await.unwrap();
    for i in 0..5 {
        let event = format!("data: token{i}\n\n");
        sender.send(Bytes::from(event.clone())).await.unwrap();
        assert_eq!(next_data(&mut body).await, Some(Bytes::from(event)));
    }
    drop(sender);
    assert_eq!(next_data(&mut body).await, None);
    gw.stop().await;
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let c = h2c_client();
    for _ in 0..3 {
        let r = get(&c, &gw.url("/h2")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.version, http::Version::HTTP_2);
        assert_eq!(r.text(), "u");
    }
    gw.stop().await;
}

#[tokio::test]
async fn tls_with_alpn_h2() {
    let up = Upstream::named("u").await;
    let tls = TestTls::new("tls");
    let gw = Gateway::start(&one_route(&up.url(), &tls.config_line())).await;

    let connector = tls.connector(&[b"h2", b"http/1.1"]);
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("https://localhost/tls")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "u");
    gw.stop().await;
}

#[tokio::test]
async fn one_mib_post_body_arrives_intact() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let data: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let data = Bytes::from(data);
    let c = client();
    // Streamed (over the retry buffer, and POST) and buffered (PUT under the buffer) paths.
    let r = send(
        &c,
        Request::post(gw.url("/up"))
            .body(Full::new(data.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body == data, "1 MiB body changed in transit");
    let small = data.slice(..10_000);
    let r = send(
        &c,
        Request::put(gw.url("/up"))
            .body(Full::new(small.clone()))
            .unwrap(),
    )
    .await;
    assert!(r.body == small);
    gw.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_header_bytes: 16KiB")).await;
    // Over the exact limit but under hyper's buffer: the gateway's own check answers.
    let big = "a".repeat(17 * 1024);
    let resp = raw(
        gw.addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // Far over: hyper refuses it while reading.
    let huge = "a".repeat(64 * 1024);
    let resp = raw(
        gw.addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {huge}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_eq!(up.hits(), 0);
    // Over HTTP/2 too.
    let r = send(
        &h2c_client(),
        Request::get(gw.url("/"))
            .header("x-big", &big)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 431);
    gw.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_body_bytes: 1KiB")).await;
    let c = client();
    let r = send(
        &c,
        Request::post(gw.url("/"))
            .body(Full::new(Bytes::from(vec![b'x'; 2048])))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 413, "Content-Length over the limit");
    // Chunked, no length: refused while streaming (POST streams; PUT goes through the retry buffer).
    for method in ["POST", "PUT"] {
        let chunk = "x".repeat(600);
        let req = format!(
            "{method} / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
        );
        let resp = raw(gw.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 413"), "{method}: {resp}");
    }
    // Under the limit passes.
    let r = send(
        &c,
        Request::post(gw.url("/"))
            .body(Full::new(Bytes::from(vec![b'x'; 1000])))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn malformed_request_gets_400_and_the_gateway_keeps_serving() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    ] {
        let resp = raw(gw.addr, junk).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{junk:?} -> {resp:?}");
    }
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(&up.url(), "idle_timeout: 200ms")).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Nothing more is sent: the gateway closes the idle connection (read returns 0) well before 5 s.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection was not closed");
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let started = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (s2, r2) = (started.clone(), release.clone());
    let up = Upstream::start(
        "slow",
        Arc::new(move |_req| {
            let (s, r) = (s2.clone(), r2.clone());
            Box::pin(async move {
                s.notify_one();
                r.notified().await;
                reply("slow", 200, "finished")
            })
        }),
    )
    .await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let url = gw.url("/");
    let addr = gw.addr;
    let inflight = tokio::spawn(async move { get(&client(), &url).await });
    started.notified().await;
    let stopping = tokio::spawn(gw.stop());
    // The listener closes: new connections are refused.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused.is_ok(), "listener still accepting after shutdown");
    // The in-flight request still completes.
    release.notify_one();
    let r = inflight.await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "finished"));
    stopping.await.unwrap();
}

type Feed = mpsc::Sender<Result<http_body::Frame<Bytes>, std::convert::Infallible>>;

/// An HTTP/2 (h2c) POST to the gateway whose body starts with `first` and goes on with what is
/// sent on the returned feed (it ends when the feed is dropped): the response, to await, and the
/// feed.
async fn fed_h2_post(
    gw: &Gateway,
    path: &str,
    first: &'static [u8],
) -> (
    impl std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
    Feed,
) {
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(gw.addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(1);
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(first))))
        .await
        .unwrap();
    let body = http_body_util::StreamBody::new(Box::pin(futures_util::stream::unfold(
        rx,
        |mut rx| async { rx.recv().await.map(|f| (f, rx)) },
    )));
    let response = sender.send_request(Request::post(gw.url(path)).body(body).unwrap());
    (response, tx)
}

/// An HTTP/2 client that stops sending its request body gets 408 `body_timeout` after
/// `idle_timeout`, long before the route's deadline.
#[tokio::test]
async fn an_http2_body_that_stalls_gets_408() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 500ms }}\n{}    timeout: 60s\n",
        one_route(&up.url(), "")
    ))
    .await;
    // One chunk, then nothing (the sender is kept, so the stream does not end).
    let (response, tx) = fed_h2_post(&gw, "/stall", b"part").await;
    let started = tokio::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("no answer within 30 s")
        .unwrap();
    assert_eq!(r.status(), 408);
    assert_eq!(r.headers().get("x-bulwark-reason").unwrap(), "body_timeout");
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(tx);
    gw.stop().await;
}

/// Over HTTP/2 too, a quiet upload is not cut once the response is going out: the upstream
/// answers at once and streams while it reads; the client pauses its body for twice
/// `idle_timeout`, then finishes it, and the upstream gets all of it.
#[tokio::test]
async fn an_http2_upload_quiet_under_a_streaming_response_is_not_cut() {
    let up = Upstream::start(
        "both",
        Arc::new(|req: Request<hyper::body::Incoming>| {
            Box::pin(async move {
                let (tx, rx) = mpsc::channel::<Bytes>(8);
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut got = Vec::new();
                    loop {
                        tokio::select! {
                            f = body.frame() => match f {
                                Some(Ok(f)) => got.extend_from_slice(f.data_ref().map_or(&[][..], |d| d)),
                                Some(Err(_)) => break,
                                None => {
                                    let _ = tx.send(Bytes::from(format!("got {}", got.len()))).await;
                                    return;
                                }
                            },
                            () = tokio::time::sleep(Duration::from_millis(100)) => {
                                if tx.send(Bytes::from_static(b".")).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = tx.send(Bytes::from_static(b"cut")).await;
                });
                http::Response::new(ChanBody(rx).boxed())
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 400ms }}\n{}",
        one_route(&up.url(), "")
    ))
    .await;
    let (response, tx) = fed_h2_post(&gw, "/both", b"first").await;
    let r = response.await.unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"second"))))
        .await
        .unwrap();
    drop(tx);
    let got = tokio::time::timeout(Duration::from_secs(10), r.into_body().collect())
        .await
        .expect("the response did not end within 10 s")
        .unwrap()
        .to_bytes();
    assert!(
        got.ends_with(b"got 11"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    gw.stop().await;
}

/// A gRPC call through the gateway, HTTP/2 on both sides: `te: trailers` (which gRPC servers
/// require) reaches the upstream, and the response's trailers (`grpc-status`) reach the client.
#[tokio::test]
async fn a_grpc_call_keeps_te_trailers_and_the_response_trailers() {
    let up = Upstream::start(
        "grpc",
        Arc::new(|req: Request<hyper::body::Incoming>| {
            Box::pin(async move {
                let te = req
                    .headers()
                    .get_all("te")
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                    .collect::<Vec<_>>()
                    .join(",");
                let _ = req.into_body().collect().await;
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let frames = vec![
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                        b"\0\0\0\0\x02hi",
                    ))),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("x-te-seen", te)
                    .body(body.boxed())
                    .unwrap()
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  g: {{ endpoints: [{{url: '{}'}}], http2: true }}\nroutes:\n  - upstream: g\n",
        up.url()
    ))
    .await;
    let c = h2c_client();
    let req = Request::post(gw.url("/pkg.Service/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("x-te-seen").unwrap(), "trailers");
    let all = resp.into_body().collect().await.unwrap();
    assert_eq!(
        all.trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap()),
        Some("0")
    );
    assert_eq!(&all.to_bytes()[..], b"\0\0\0\0\x02hi");
    gw.stop().await;
}
