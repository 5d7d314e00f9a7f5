//! HTTP/2 toward upstreams (`http2: true`) with scripted `h2`-crate upstreams: refused streams, idle
//! connections, the peer's stream limit (found by a review; each test failed before its fix).
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// An h2c upstream (h2 crate) that answers every request with `name`.
async fn h2_named(name: &'static str) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    h.fetch_add(1, Ordering::SeqCst);
                    let mut s = respond.send_response(Response::new(()), false).unwrap();
                    s.send_data(Bytes::from(name), true).unwrap();
                }
            });
        }
    });
    (addr, hits)
}

/// An h2c upstream (h2 crate) that refuses every stream with `REFUSED_STREAM` (an overloaded
/// server shedding load: RFC 9113 8.7, the requests were not processed). Counts the streams.
async fn h2_refusing() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let n = n2.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    n.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, n)
}

/// An h2c upstream (h2 crate) that allows one stream at a time per connection
/// (SETTINGS_MAX_CONCURRENT_STREAMS = 1): `answer` gets each request and its started response
/// stream. Counts the connections.
async fn h2_one_stream(
    answer: fn(Request<h2::RecvStream>, h2::SendStream<Bytes>),
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_concurrent_streams(1)
                    .handshake::<_, Bytes>(tcp)
                    .await
                else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let s = respond.send_response(Response::new(()), false).unwrap();
                    answer(req, s);
                }
            });
        }
    });
    (addr, conns)
}

/// An [`h2_one_stream`] answer: `/upload` gets `accepted` at once and its body is read on to its
/// end (once `gate` is notified, if given); anything else gets `ok`.
fn answer_upload_early(
    req: Request<h2::RecvStream>,
    mut s: h2::SendStream<Bytes>,
    gate: Option<&'static tokio::sync::Notify>,
) {
    if req.uri().path() != "/upload" {
        s.send_data(Bytes::from("ok"), true).unwrap();
        return;
    }
    s.send_data(Bytes::from("accepted"), true).unwrap();
    let mut body = req.into_body();
    tokio::spawn(async move {
        if let Some(gate) = gate {
            gate.notified().await;
        }
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
    });
}

/// 1. A POST whose stream an endpoint refuses (`REFUSED_STREAM`: not processed) on the resend too
/// is a request that was never processed, like a connect failure: on a route with retries it goes
/// to the other endpoint (Envoy's `refused-stream` retry condition, whatever the method). Before
/// the fix, the second refusal was classed as a reset (may have been processed), so the POST was
/// not retried and the client got 502, while a healthy endpoint stood next to it.
#[tokio::test]
async fn a_post_refused_by_one_http2_endpoint_goes_to_the_other() {
    let (bad, refused) = h2_refusing().await;
    let (good, _) = h2_named("good").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, balance: round_robin, endpoints: [{{url: 'http://{bad}'}}, {{url: 'http://{good}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n    retry: {{ attempts: 3, backoff: {{ kind: constant, base: 1ms }} }}\n"
    ))
    .await;
    let c = client();
    for i in 0..4 {
        let req = Request::post(gw.url("/pay"))
            .body(Full::new(Bytes::from("x")))
            .unwrap();
        let g = send(&c, req).await;
        assert_eq!(
            g.status,
            200,
            "POST {i}: reason {:?}, attempts {:?}, streams refused so far {}",
            g.header("x-bulwark-reason"),
            g.header("x-bulwark-attempts"),
            refused.load(Ordering::SeqCst)
        );
        assert_eq!(g.text(), "good");
    }
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the refusing endpoint was never tried"
    );
    gw.stop().await;
}

/// 2. `pool.idle_timeout` ("idle connections older than this are closed") for an `http2: true`
/// upstream: the shared connection, once idle (no stream open) that long, is closed, as Envoy's
/// `idle_timeout` closes an idle upstream HTTP/2 connection. Before the fix, it was kept open forever (and
/// pinged every `ping_interval`), for an endpoint used once (a failover target, a canary) or
/// one a DNS/L4 balancer has moved away from.
#[tokio::test]
async fn an_idle_http2_upstream_connection_is_closed_after_the_pool_idle_timeout() {
    let (ok, _) = h2_named("ok").await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let c2 = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let c = c2.clone();
            tokio::spawn(async move {
                let mut u = TcpStream::connect(ok).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut u).await;
                c.store(true, Ordering::SeqCst);
            });
        }
    });
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}], pool: {{ idle_timeout: 300ms }} }}\nroutes:\n  - upstream: u\n"
    ))
    .await;
    assert_eq!(get(&client(), &gw.url("/")).await.status, 200);
    wait_until(10, || closed.load(Ordering::SeqCst)).await;
    gw.stop().await;
}

/// 3. An upstream advertising SETTINGS_MAX_CONCURRENT_STREAMS = 1 (real servers: nginx 128, Go
/// 250, many gRPC servers 100) whose one stream is taken by a long-lived response (a server-sent
/// event stream, a long poll, a gRPC stream). Another request to that endpoint must not wait
/// behind it until the route's timeout: Envoy (and Go's HTTP/2 transport) open another connection
/// when the ones they have are at their stream limit.
#[tokio::test]
async fn a_request_beyond_the_upstreams_stream_limit_is_not_stuck_behind_a_long_stream() {
    let (addr, conns) = h2_one_stream(|req, mut s| {
        if req.uri().path() == "/events" {
            // A stream that stays open: one event, then nothing (for now).
            s.send_data(Bytes::from("data: hello\n\n"), false).unwrap();
            tokio::spawn(async move {
                let _s = s;
                std::future::pending::<()>().await;
            });
        } else {
            s.send_data(Bytes::from("ok"), true).unwrap();
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 3s\n"
    ))
    .await;
    let c = client();
    let mut events = get_streaming(&c, &gw.url("/events")).await;
    assert_eq!(events.status(), 200);
    assert!(next_data(events.body_mut()).await.is_some());
    let g = get(&client(), &gw.url("/other")).await;
    assert_eq!(
        g.status,
        200,
        "a request waited behind a long-lived stream on the upstream's only stream slot: reason \
         {:?}, upstream connections {}",
        g.header("x-bulwark-reason"),
        conns.load(Ordering::SeqCst)
    );
    drop(events);
    gw.stop().await;
}

/// 4. docs/gateway.md (upstreams, HTTP/2): a request an HTTP/2 upstream refused unprocessed on two
/// connections "failed as a connect failure does (nothing was processed): ... the request goes
/// ... to the next upstream of a `failover` chain". A connect failure fails a POST over to the next
/// upstream for free; a refused stream is counted as "reached" (attempt.rs: only ConnectFailure
/// leaves `tally.reached` unset), so the failover was treated as a retry after delivery, which a
/// POST may not have: the client got 502 while the failover upstream was healthy (a review of the
/// fix for 1).
#[tokio::test]
async fn a_post_refused_unprocessed_by_an_http2_primary_fails_over_like_a_connect_failure() {
    let (bad, refused) = h2_refusing().await;
    let (good, good_hits) = h2_named("failover").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  p: {{ http2: true, endpoints: [{{url: 'http://{bad}'}}] }}\n  f: {{ http2: true, endpoints: [{{url: 'http://{good}'}}] }}\nroutes:\n  - upstream: p\n    failover: [f]\n    timeout: 5s\n"
    ))
    .await;
    let c = client();
    let req = Request::post(gw.url("/pay"))
        .body(Full::new(Bytes::from("x")))
        .unwrap();
    let g = send(&c, req).await;
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the primary was never tried"
    );
    assert_eq!(
        (g.status.as_u16(), g.text()),
        (200, "failover".to_string()),
        "reason {:?}, attempts {:?}, failover hits {}",
        g.header("x-bulwark-reason"),
        g.header("x-bulwark-attempts"),
        good_hits.load(Ordering::SeqCst)
    );
    gw.stop().await;
}

/// 5. upstream/pool.rs: a stream's slot on an HTTP/2 connection is held by the response body
/// (`Inner::H2 { _slot }`) and was given back when that body was dropped (a review of the fix
/// for 3). A stream is open until both its halves end (RFC 9113 5.1): an upstream that answers an upload before it ends (an early
/// "accepted", a gRPC client stream answered early) and goes on reading it keeps the stream, and
/// its place under SETTINGS_MAX_CONCURRENT_STREAMS, while the upload goes on. The pool counts the
/// slot free as soon as the answer has gone to the client, puts the next request on that
/// connection, and `h2` queues it there behind the upload: the very wait (504 at the route's
/// timeout) the multi-connection pool was built to avoid. Envoy counts a stream until both ends
/// are done.
#[tokio::test]
async fn a_request_is_not_queued_behind_an_upload_still_streaming_after_its_answer() {
    let (addr, conns) = h2_one_stream(|req, s| answer_upload_early(req, s, None)).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 2s\n"
    ))
    .await;
    // An upload that goes on (chunked, not ended) after its answer.
    let mut up = RawClient::connect(&gw).await;
    up.send(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    let r = up.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"accepted"[..]));
    // The upload still streams (one more chunk); another request to the same endpoint.
    up.send(b"5\r\nworld\r\n").await;
    let g = get(&client(), &gw.url("/other")).await;
    assert_eq!(
        g.status,
        200,
        "a request waited behind an upload on the upstream's only stream: reason {:?}, \
         upstream connections {}",
        g.header("x-bulwark-reason"),
        conns.load(Ordering::SeqCst)
    );
    drop(up);
    gw.stop().await;
}

/// A body in memory larger than the upstream's flow-control window (200 KiB against 64 KiB) is
/// still being sent after an early answer: its stream keeps its place under the upstream's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` (1 here), and the next request goes on another connection
/// instead of queueing behind it until the route's timeout (found by a review: only a body
/// streamed from the client held its place).
#[tokio::test]
async fn a_request_is_not_queued_behind_a_buffered_upload_still_sending_after_its_answer() {
    static RELEASE: tokio::sync::Notify = tokio::sync::Notify::const_new();
    let (addr, conns) = h2_one_stream(|req, s| answer_upload_early(req, s, Some(&RELEASE))).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 2s\n    retry_buffer: 1MiB\n"
    ))
    .await;
    // 200 KiB with a length, under retry_buffer: read whole, sent from memory.
    let req = Request::post(gw.url("/upload"))
        .body(Full::new(Bytes::from(vec![b'x'; 200 * 1024])))
        .unwrap();
    let g = send(&client(), req).await;
    assert_eq!((g.status.as_u16(), g.text()), (200, "accepted".to_string()));
    let g = get(&client(), &gw.url("/other")).await;
    RELEASE.notify_waiters();
    assert_eq!(
        (g.status.as_u16(), g.header("x-bulwark-reason"), g.text()),
        (200, None, "ok".to_string()),
        "upstream connections {}",
        conns.load(Ordering::SeqCst)
    );
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    gw.stop().await;
}
