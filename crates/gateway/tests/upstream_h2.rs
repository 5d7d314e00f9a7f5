//! HTTP/2 upstream connections: one gone silent is replaced after an unanswered ping, and a
//! stream the upstream refused unprocessed is sent again.
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An h2c upstream (hyper) answering "ok".
async fn h2c_ok() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_r: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP relay to `to`. `freeze()` black-holes every connection open at that moment (bytes are
/// no longer forwarded either way, sockets stay open, as behind a dead NAT entry or a crashed
/// host); connections opened afterwards are relayed normally.
struct Relay {
    addr: std::net::SocketAddr,
    frozen_upto: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let frozen_upto = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (f, a) = (frozen_upto.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let id = a.fetch_add(1, Ordering::SeqCst) + 1;
                let u = TcpStream::connect(to).await.unwrap();
                let (mut cr, mut cw) = c.into_split();
                let (mut ur, mut uw) = u.into_split();
                let (f1, f2) = (f.clone(), f.clone());
                tokio::spawn(async move {
                    let mut b = vec![0u8; 65536];
                    loop {
                        let n = match cr.read(&mut b).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if f1.load(Ordering::SeqCst) >= id {
                            std::future::pending::<()>().await;
                        }
                        if uw.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut b = vec![0u8; 65536];
                    loop {
                        let n = match ur.read(&mut b).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if f2.load(Ordering::SeqCst) >= id {
                            std::future::pending::<()>().await;
                        }
                        if cw.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Relay {
            addr,
            frozen_upto,
            accepted,
        }
    }
    fn freeze(&self) {
        self.frozen_upto
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// Sends GETs for `secs` seconds; returns the statuses.
async fn statuses_for(gw: &Gateway, secs: u64) -> Vec<u16> {
    let c = client();
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::new();
    while tokio::time::Instant::now() < end {
        out.push(get(&c, &gw.url("/x")).await.status.as_u16());
    }
    out
}

/// The statuses of 4 s of GETs through a gateway whose one connection (or HTTP/2 connection) to
/// the upstream was black-holed after a first answer; pings every 300 ms, 300 ms to answer.
async fn blackhole(http2: bool) -> Vec<u16> {
    let h1 = Upstream::named("u").await;
    let up = if http2 { h2c_ok().await } else { h1.addr };
    let relay = Relay::start(up).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: {http2}, endpoints: [{{url: 'http://{}'}}], pool: {{ ping_interval: 300ms, ping_timeout: 300ms }} }}\nroutes:\n  - upstream: u\n    timeout: 500ms\n",
        relay.addr
    ))
    .await;
    assert_eq!(get(&client(), &gw.url("/x")).await.status, 200);
    relay.freeze();
    let s = statuses_for(&gw, 4).await;
    gw.stop().await;
    s
}

/// HTTP/1.1 recovers at once: the timed-out request's connection is dropped.
#[tokio::test]
async fn http1_recovers_from_a_black_holed_connection() {
    let s = blackhole(false).await;
    assert_eq!(s.last(), Some(&200), "{s:?}");
}

/// The shared HTTP/2 connection goes silent (no FIN, no reset; new connections work): the
/// unanswered ping closes it, and the next request opens a new one.
#[tokio::test]
async fn a_silent_http2_connection_is_replaced_after_an_unanswered_ping() {
    let s = blackhole(true).await;
    assert_eq!(s.last(), Some(&200), "never recovered: {s:?}");
}

/// The first connection to the upstream answers the first request's HEADERS with a graceful
/// GOAWAY whose last stream id is 0 (RFC 9113 6.8: stream 1 was not processed, as when a server
/// shuts down while a request is on its way); later connections answer. A POST on a route without
/// retries is sent again on a new connection, and gets the answer.
#[tokio::test]
async fn a_stream_past_a_graceful_goaway_is_sent_again() {
    let (addr, conns) = goaway_upstream(0, 0).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n"
    ))
    .await;
    let req = Request::post(gw.url("/pay"))
        .body(Full::new(Bytes::from("x")))
        .unwrap();
    let g = send(&client(), req).await;
    assert_eq!(g.status, 200, "reason {:?}", g.header("x-bulwark-reason"));
    assert_eq!(g.text(), "ok");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

/// An h2c upstream (h2 crate) that refuses the first stream with REFUSED_STREAM (RFC 9113 8.7:
/// not processed, safe to send again whatever the method) and answers the others: a POST on a
/// route without retries gets the answer.
#[tokio::test]
async fn a_refused_http2_stream_is_sent_again() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let processed = Arc::new(AtomicBool::new(false));
    let (n2, p2) = (n.clone(), processed.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (n, p) = (n2.clone(), p2.clone());
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tcp).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if n.fetch_add(1, Ordering::SeqCst) == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    drop(req);
                    p.store(true, Ordering::SeqCst);
                    let mut s = respond.send_response(Response::new(()), false).unwrap();
                    s.send_data(Bytes::from("ok"), true).unwrap();
                }
            });
        }
    });
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n"
    ))
    .await;
    let req = Request::post(gw.url("/pay"))
        .body(Full::new(Bytes::from("x")))
        .unwrap();
    let g = send(&client(), req).await;
    assert_eq!(g.status, 200, "reason {:?}", g.header("x-bulwark-reason"));
    assert!(processed.load(Ordering::SeqCst));
    assert_eq!(n.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

/// An `http2: true` upstream's 20 KiB response head passes, as it does over HTTP/1.1 (the limit
/// is 64 KiB for both; hyper's HTTP/2 default, 16 KiB, made it a 502 and charged the endpoint a
/// failure; found by a review).
#[tokio::test]
async fn an_http2_upstreams_20k_response_head_passes() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let resp = Response::builder()
                        .header("x-filler", "v".repeat(20 * 1024))
                        .body(())
                        .unwrap();
                    let mut s = respond.send_response(resp, false).unwrap();
                    s.send_data(Bytes::from("ok"), true).unwrap();
                }
            });
        }
    });
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n"
    ))
    .await;
    let g = get(&client(), &gw.url("/")).await;
    assert_eq!(
        (g.status.as_u16(), g.header("x-bulwark-reason")),
        (200, None)
    );
    assert_eq!(g.header("x-filler").map(str::len), Some(20 * 1024));
    assert_eq!(g.text(), "ok");
    gw.stop().await;
}
