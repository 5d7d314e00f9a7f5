//! HTTP/2 streams whose response body stops moving: cut after `limits.idle_timeout`, whether the
//! upstream sends nothing more or the client reads nothing (its flow-control window stays shut),
//! freeing what the stream held upstream while the connection goes on serving.
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// An h2c connection to `gw` whose streams grant the gateway a 16 KiB window (never more while
/// their bodies go unread).
async fn h2_conn(gw: &Gateway) -> http2::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .adaptive_window(false)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://x{path}"))
        .body(Full::default())
        .unwrap()
}

/// The upstream's in-flight count seen by the gateway: the stream's lease on the endpoint.
fn inflight(gw: &Gateway) -> usize {
    gw.state.runtime().upstreams[0].endpoints[0].inflight()
}

/// An upstream that answers `/big` with an endless body, reporting on the channel when the gateway
/// closes that connection, and anything else with `ok`.
async fn endless() -> (RawUpstream, mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let up = RawUpstream::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(req) = read_head(&mut s, &mut buf).await {
                if req.starts_with("GET /big") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n")
                        .await;
                    let chunk = vec![b'x'; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {}
                    let _ = tx.send(());
                    return;
                }
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (up, rx)
}

#[tokio::test]
async fn a_client_that_stops_reading_a_stream_frees_the_upstream_and_keeps_its_connection() {
    let (up, mut closed) = endless().await;
    let gw = Gateway::start(&limited_config(&up.url(), "idle_timeout: 1s")).await;
    let mut send = h2_conn(&gw).await;
    let resp = send.send_request(get("/big")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(inflight(&gw), 1);
    // The body goes unread: the stream's window shuts at 16 KiB, and the gateway stops reading
    // the upstream, whose writes then block.
    tokio::time::timeout(Duration::from_secs(10), closed.recv())
        .await
        .expect("the upstream connection stayed open for a client that reads nothing")
        .unwrap();
    wait_until(10, || inflight(&gw) == 0).await;
    // The stream was reset, not the connection: reading it now fails, and the same connection
    // carries the next request.
    let read = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the cut stream did not end");
    assert!(read.is_err(), "a cut stream read as complete");
    let next = send.send_request(get("/next")).await.unwrap();
    assert_eq!(next.status(), 200);
    let body = next.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_stalling_mid_body_is_cut_on_an_http2_stream_after_idle_timeout() {
    let (tx, mut eof) = mpsc::unbounded_channel();
    let up = RawUpstream::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n";
            if s.write_all(head).await.is_err() {
                return;
            }
            let mut b = [0u8; 1024];
            while let Ok(n) = s.read(&mut b).await {
                if n == 0 {
                    break;
                }
            }
            let _ = tx.send(());
        }
    })
    .await;
    let idle = Duration::from_millis(600);
    let gw = Gateway::start(&limited_config(&up.url(), "idle_timeout: 600ms")).await;
    let mut resp = get_streaming(&h2c_client(), &gw.url("/stall")).await;
    assert_eq!(
        next_data(resp.body_mut()).await.as_deref(),
        Some(&b"abc"[..])
    );
    let still_since = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(10), resp.body_mut().frame())
        .await
        .expect("a stalled upstream body was not cut");
    assert!(
        matches!(next, Some(Err(_))),
        "the cut stream must fail, not end"
    );
    // Not before the body had been still for idle_timeout (less the time "abc" took to arrive).
    assert!(
        still_since.elapsed() >= idle - Duration::from_millis(100),
        "cut after {:?}",
        still_since.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(5), eof.recv())
        .await
        .expect("the upstream connection was not closed")
        .unwrap();
    wait_until(10, || inflight(&gw) == 0).await;
    gw.stop().await;
}

/// Answers with ten one-byte chunks 150 ms apart; whether the connection can carry another.
async fn trickle(s: &mut TcpStream) -> bool {
    let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    if s.write_all(head).await.is_err() {
        return false;
    }
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if s.write_all(format!("1\r\n{i}\r\n").as_bytes())
            .await
            .is_err()
        {
            return false;
        }
    }
    s.write_all(b"0\r\n\r\n").await.is_ok()
}

#[tokio::test]
async fn an_http2_body_that_keeps_moving_slower_than_idle_timeout_in_all_is_not_cut() {
    // Ten chunks 150 ms apart: 1.5 s in all, each gap well under the 500 ms idle_timeout.
    let up = RawUpstream::start(move |mut s, _| async move {
        let mut buf = Vec::new();
        while read_head(&mut s, &mut buf).await.is_some() {
            if !trickle(&mut s).await {
                return;
            }
        }
    })
    .await;
    let gw = Gateway::start(&limited_config(&up.url(), "idle_timeout: 500ms")).await;
    let mut send = h2_conn(&gw).await;
    let resp = send.send_request(get("/slow")).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the body did not end")
        .expect("a moving body was cut")
        .to_bytes();
    assert_eq!(&body[..], b"0123456789");
    // Nor was the connection idle while it streamed: it still takes requests.
    let next = send.send_request(get("/slow")).await;
    assert!(next.is_ok(), "{next:?}");
    gw.stop().await;
}

#[tokio::test]
async fn an_http2_connection_carries_at_most_max_concurrent_streams_at_once() {
    let (up, release) = Upstream::held("held", "done").await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_concurrent_streams: 2")).await;
    let mut send = h2_conn(&gw).await;
    // One request first: the client then knows the gateway's SETTINGS (a stream opened before
    // they arrive, beyond the limit, is refused).
    release.notify_one();
    let first = send.send_request(get("/")).await.unwrap();
    assert_eq!(first.status(), 200);
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let mut s = send.clone();
            tokio::spawn(async move {
                s.ready().await?;
                s.send_request(get("/")).await
            })
        })
        .collect();
    wait_until(10, || up.hits() == 3).await;
    // The third stream waits for one of the two to end (the gateway's SETTINGS allow two).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.hits(), 3);
    release.notify_one();
    wait_until(10, || up.hits() == 4).await;
    release.notify_one();
    release.notify_one();
    for c in calls {
        let r = tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("a stream never finished")
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    gw.stop().await;
}

/// An upload body fed from a channel (the client keeps its request open while the sender lives).
type Fed = http_body_util::StreamBody<
    futures_util::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, std::io::Error>>,
>;

/// An HTTP/2 upstream that answers `abc` at once and then sends nothing more (never ending), and a
/// gateway in front with `idle_timeout: 500ms`; the client POSTs over h2c and keeps its upload
/// open. The upstream's request body (the client's, forwarded) is held by the upstream
/// connection's task, not the stream's: the cut must reach it too.
#[tokio::test]
async fn a_cut_stream_with_its_upload_still_open_is_reset_through_an_http2_upstream() {
    use futures_util::StreamExt;
    let up = Upstream::start(
        "u",
        std::sync::Arc::new(|_req: Request<hyper::body::Incoming>| {
            Box::pin(async move {
                let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                    http_body::Frame::data(Bytes::from_static(b"abc")),
                )]);
                let body =
                    http_body_util::StreamBody::new(first.chain(futures_util::stream::pending()));
                http::Response::new(BodyExt::boxed(body))
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 500ms }}\nupstreams:\n  u: {{ endpoints: [{{url: '{}'}}], http2: true }}\nroutes:\n  - upstream: u\n",
        up.url()
    ))
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Fed>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"up"))))
        .unwrap();
    let upload =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
            .boxed();
    let req = Request::post("http://x/")
        .body(http_body_util::StreamBody::new(upload))
        .unwrap();
    let mut resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"abc"));
    let next = tokio::time::timeout(Duration::from_secs(10), resp.body_mut().frame())
        .await
        .expect("a still stream with its upload open was not reset");
    assert!(matches!(next, Some(Err(_))), "the cut stream must fail");
    wait_until(10, || inflight(&gw) == 0).await;
    drop(tx);
    gw.stop().await;
}

/// A raw `h2` client connection to `gw` (prior knowledge), its connection driven by a task.
async fn h2_raw(gw: &Gateway) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 30)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

/// Sends `total` bytes on `stream` as flow control allows; returns how many it sent before the
/// window stayed shut for `stop`.
async fn push(stream: &mut h2::SendStream<Bytes>, total: usize, stop: Duration) -> usize {
    let mut sent = 0;
    while sent < total {
        stream.reserve_capacity((total - sent).min(16 * 1024));
        let capacity = std::future::poll_fn(|cx| stream.poll_capacity(cx));
        let cap = match tokio::time::timeout(stop, capacity).await {
            Ok(Some(Ok(c))) => c,
            _ => return sent,
        };
        if cap > 0 {
            stream
                .send_data(Bytes::from(vec![b'a'; cap]), false)
                .unwrap();
            sent += cap;
        }
    }
    sent
}

/// One stream whose upload the gateway does not read yet (its request waits in a bulkhead queue)
/// does not stop the uploads of the connection's other streams: with hyper's default windows (1
/// MiB for a stream and for the whole connection) it took the connection's whole window, and
/// another stream could not send a byte. Found by a review; failed before.
#[tokio::test]
async fn an_unread_upload_on_one_stream_does_not_stall_uploads_on_the_others() {
    let (held, release) = Upstream::held("held", "done").await;
    let echo = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        r#"limits: {{ idle_timeout: 30s }}
upstreams:
  held: {{ endpoints: [{{url: '{}'}}], bulkhead: {{ max_concurrent: 1, max_queued: 10, queue_timeout: 1m }} }}
  echo: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /held }}
    upstream: held
  - upstream: echo
"#,
        held.url(),
        echo.url()
    ))
    .await;
    let mut send = h2_raw(&gw).await;
    // C takes the held upstream's one slot.
    let (c, _) = send
        .send_request(Request::get("http://x/held/c").body(()).unwrap(), true)
        .unwrap();
    wait_until(10, || held.hits() == 1).await;
    // A waits in the bulkhead's queue; its upload goes as far as the gateway's windows let it.
    let mut send = send.ready().await.unwrap();
    let (_a, mut a_body) = send
        .send_request(Request::post("http://x/held/a").body(()).unwrap(), false)
        .unwrap();
    let a_sent = push(&mut a_body, 4 << 20, Duration::from_secs(2)).await;
    assert!(a_sent > 0);
    // B, to another upstream, uploads 64 KiB.
    let mut send = send.ready().await.unwrap();
    let (b, mut b_body) = send
        .send_request(Request::post("http://x/b").body(()).unwrap(), false)
        .unwrap();
    let b_sent = push(&mut b_body, 64 * 1024, Duration::from_secs(10)).await;
    assert_eq!(b_sent, 64 * 1024, "A's unread {a_sent} bytes stalled B");
    b_body.send_data(Bytes::new(), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    release.notify_one();
    release.notify_one();
    drop(c);
    gw.stop().await;
}

/// An upload still moving after its (early) response ended keeps the HTTP/2 connection from
/// being closed as idle: it was cut about `idle_timeout` after the response (a GOAWAY), and the
/// upstream got a truncated body. The client paces its upload (a chunk every 200 ms for three
/// times `idle_timeout`). Found by a review; failed before.
#[tokio::test]
async fn an_upload_still_moving_after_its_early_response_is_not_cut_as_an_idle_connection() {
    let (up, mut bodies) = Upstream::reporting_bodies("r").await;
    let gw = Gateway::start(&limited_config(&up.url(), "idle_timeout: 1s")).await;
    let send = h2_raw(&gw).await;
    let mut send = send.ready().await.unwrap();
    let (resp, mut body) = send
        .send_request(Request::post("http://x/up").body(()).unwrap(), false)
        .unwrap();
    body.send_data(Bytes::from_static(&[b'x'; 1024]), false)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no response")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut rb = resp.into_body();
    let mut got = Vec::new();
    while let Some(d) = rb.data().await {
        let d = d.unwrap();
        let _ = rb.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    assert_eq!(&got[..], b"ok");
    let mut sent = 1024;
    for _ in 0..15 {
        // The client's pace, not a wait for something.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let chunk = body.send_data(Bytes::from_static(&[b'x'; 1024]), false);
        assert!(chunk.is_ok(), "cut after {sent} bytes: {chunk:?}");
        sent += 1024;
    }
    body.send_data(Bytes::new(), true).unwrap();
    let whole = tokio::time::timeout(Duration::from_secs(10), bodies.recv())
        .await
        .expect("the upstream never got the end of the body")
        .unwrap();
    assert_eq!(whole.len(), sent);
    gw.stop().await;
}
