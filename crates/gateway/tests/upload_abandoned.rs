//! An upload streamed to an upstream that stopped reading it: once the client has its answer and
//! is gone, the gateway lets go of the upstream connection (HTTP/1.1) or stream (HTTP/2), the
//! client's socket and the task sending the body, whether the client spoke HTTP/1.1 or HTTP/2
//! (found by two reviews; each test failed before its fix: sockets and a task held for ever per
//! such upload, outside every gauge and `max_connections`).
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The tests of this file count the process's descriptors: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Open file descriptors of this process (the gateway runs in it).
fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Sends `POST` with a 1 GiB declared body and uploads until the buffers on the way fill; reads
/// the answer (which the upstream gives from the head alone), then leaves.
async fn upload_then_leave(gw: &Gateway, path: &str) {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 1073741824\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        while wr.write_all(&chunk).await.is_ok() {}
    });
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"ok") {
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut b))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&b[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // The upload goes on a moment (filling the buffers: the state to test), then the client leaves.
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer.abort();
    let _ = writer.await;
}

/// HTTP/1.1 upstream: it answers from the head, then neither reads nor closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_to_an_upstream_that_stopped_reading_is_released_when_the_client_leaves()
{
    let _serial = SERIAL.lock().await;
    let (up, held) = answers_then_stops_reading().await;
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 1s, max_body_bytes: 1GiB }}\nupstreams:\n  u: {{ endpoints: \
         [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n",
        up.url()
    ))
    .await;
    let base = fds();
    const N: usize = 4;
    for i in 0..N {
        upload_then_leave(&gw, &format!("/up/{i}")).await;
    }
    assert_eq!(up.accepted(), N);
    // At rest: of these exchanges, only the upstream's own (never closed) sockets remain.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fds() > base + N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} descriptors (base {base}, {N} held by the upstream itself): the gateway still \
             holds the client's socket and the upstream connection of each exchange",
            fds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    gw.stop().await;
}

/// HTTP/2 upstream: it answers from the head and keeps the stream, granting no window. Once the
/// client is gone, the connection (whose only stream that is) closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_to_an_h2_upstream_that_stopped_reading_ends_its_stream() {
    let _serial = SERIAL.lock().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let live = Arc::new(AtomicUsize::new(0));
    let l = live.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            l.fetch_add(1, Ordering::SeqCst);
            let l = l.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    // Keeps the body, reads none of it.
                    let body = req.into_body();
                    tokio::spawn(async move {
                        let _body = body;
                        std::future::pending::<()>().await;
                    });
                    Ok::<_, Infallible>(reply("h2", 200, "ok"))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                l.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 1s, max_body_bytes: 1GiB }}\nupstreams:\n  u: {{ endpoints: \
         [{{url: 'http://{addr}'}}], http2: true, pool: {{ idle_timeout: 1s }} }}\nroutes:\n  - \
         upstream: u\n"
    ))
    .await;
    upload_then_leave(&gw, "/up").await;
    assert_eq!(live.load(Ordering::SeqCst), 1);
    wait_until(12, || live.load(Ordering::SeqCst) == 0).await;
    // The next request opens a new connection and is served.
    let r = get(&client(), &gw.url("/next")).await;
    assert_eq!(r.status, 200);
    gw.stop().await;
}

/// The inodes of this process's TCP sockets whose local port is `local` and remote port `remote`
/// (`None`: any), from `/proc/net/tcp`: by exact ports, so tests alongside do not disturb it.
fn socket_inodes(local: Option<u16>, remote: Option<u16>) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
            let inode: u64 = f[9].parse().unwrap();
            (inode != 0
                && local.is_none_or(|p| port(f[1]) == p)
                && remote.is_none_or(|p| port(f[2]) == p))
            .then_some(inode)
        })
        .collect()
}

/// Whether a descriptor of this process still holds the socket `inode`, whatever its TCP state.
fn fd_holds(inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_str() == Some(want.as_str()))
}

/// An HTTP/1.1 upstream that answers from the head alone, then neither reads nor closes.
async fn answers_then_stops_reading() -> (RawUpstream, Arc<std::sync::Mutex<Vec<TcpStream>>>) {
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    let up = RawUpstream::start(move |mut s, _| {
        let keep = keep.clone();
        async move {
            // The head only (`read_head` would wait for the body).
            if read_head_only(&mut s, &mut Vec::new()).await.is_none() {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            keep.lock().unwrap().push(s);
        }
    })
    .await;
    (up, held)
}

/// An HTTP/2 client's upload, abandoned the same way (its connection ends): the upstream
/// connection is released too. Only HTTP/1.1 bodies were linked to their upstream copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_clients_abandoned_upload_releases_the_upstream_connection() {
    let _serial = SERIAL.lock().await;
    let (up, held) = answers_then_stops_reading().await;
    let up_port = up.addr.port();
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 1s, max_body_bytes: 1GiB }}\nupstreams:\n  u: {{ endpoints: \
         [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n",
        up.url()
    ))
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, ChanBody>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(4);
    let req = Request::post(gw.url("/up")).body(ChanBody(rx)).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    // Upload until every buffer on the way is full (a send that waits this long: nothing moves).
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    for sent in 0.. {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tx.send(Frame::data(chunk.clone())),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the body was dropped while the upload went on"),
            Err(_) => break,
        }
        assert!(sent < 4096, "the upload never filled the buffers");
    }
    let ours = socket_inodes(None, Some(up_port));
    assert_eq!(ours.len(), 1, "the gateway's upstream connection");
    // The client leaves.
    conn.abort();
    let _ = conn.await;
    drop(send);
    drop(tx);
    wait_until(12, || !fd_holds(ours[0])).await;
    drop(held);
    gw.stop().await;
}

/// A stream of frames from a channel.
fn from_channel(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// An upload abandoned on an `http2: true` upstream connection that also carries a long-lived
/// healthy stream (server-sent events): the stream cannot be reset through hyper, and lives while
/// the connection does, but the departed client's socket is released (the body held a strong
/// reference to the client connection, socket included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_to_a_shared_h2_connection_releases_the_clients_socket() {
    let _serial = SERIAL.lock().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    if req.uri().path() == "/events" {
                        // A comment line every 200 ms, for ever.
                        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
                        tokio::spawn(async move {
                            let mut tick = tokio::time::interval(Duration::from_millis(200));
                            loop {
                                tick.tick().await;
                                let line = Ok(Frame::data(Bytes::from_static(b":\n")));
                                if tx.send(line).await.is_err() {
                                    return;
                                }
                            }
                        });
                        let body = StreamBody::new(from_channel(rx)).boxed();
                        return Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(body)
                                .unwrap(),
                        );
                    }
                    let body = req.into_body();
                    tokio::spawn(async move {
                        let _body = body;
                        std::future::pending::<()>().await;
                    });
                    Ok::<_, Infallible>(reply("h2", 200, "ok"))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 1s, max_body_bytes: 1GiB }}\nupstreams:\n  u: {{ endpoints: \
         [{{url: 'http://{addr}'}}], http2: true }}\nroutes:\n  - upstream: u\n"
    ))
    .await;
    let mut events = TcpStream::connect(gw.addr).await.unwrap();
    events
        .write_all(b"GET /events HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    events.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let reader = tokio::spawn(async move {
        let mut b = [0u8; 1024];
        while matches!(events.read(&mut b).await, Ok(n) if n > 0) {}
    });

    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let client = s.local_addr().unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1073741824\r\n\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    // Upload until the writes stop moving, then read the answer.
    let chunk = vec![b'x'; 64 * 1024];
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(500), wr.write_all(&chunk)).await {
        r.unwrap();
    }
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"ok") {
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut b))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&b[..n]);
    }
    let ours = socket_inodes(Some(gw.addr.port()), Some(client.port()));
    assert_eq!(ours.len(), 1);
    drop(rd);
    drop(wr);
    wait_until(12, || !fd_holds(ours[0])).await;
    reader.abort();
    gw.stop().await;
}

/// A streamed upload the route's deadline cuts (the client never finishes it) is a `total`
/// timeout in `bulwark_timeouts_total`: the per-try timer, counted from the end of the upload,
/// never started (it was labelled `attempt`).
#[tokio::test]
async fn a_streamed_upload_cut_by_the_route_deadline_is_a_total_timeout() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: slow_upload
    upstream: u
    timeout: 600ms
    retry_buffer: 1KiB
    retry: {{ attempts: 1, per_try_timeout: 100ms }}
",
        up.url()
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    c.send(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n")
        .await;
    c.send(&[b'x'; 1024]).await;
    let (resp, _) = c.read_response(false).await;
    assert_eq!(resp.status, 504);
    let rt = gw.state.runtime();
    let m = rt.telemetry().encode(&rt);
    let series = |kind: &str| {
        let s = format!("bulwark_timeouts_total{{route=\"slow_upload\",kind=\"{kind}\"}}");
        m.lines()
            .find_map(|l| l.strip_prefix(s.as_str())?.trim().parse::<f64>().ok())
    };
    assert_eq!(
        (series("total"), series("attempt")),
        (Some(1.0), Some(0.0)),
        "{m}"
    );
    gw.stop().await;
}

// Uploads that go on after an early answer and keep moving are not given up (a review of the
// change above, kept as regression tests).

const STEADY: usize = 2 * 1024 * 1024;

/// An HTTP/1.1 upstream that answers `200 ok` from the head alone, then reads the body slowly but
/// steadily (8 KiB every 20 ms); reports the body bytes it got when the body ends or its
/// connection does.
async fn early_then_steady() -> (RawUpstream, mpsc::UnboundedReceiver<usize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let up = RawUpstream::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            let Some(end) = read_head_only(&mut s, &mut buf).await else {
                return;
            };
            let mut tmp = vec![0u8; 8192];
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let mut got = buf.len() - end;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            while got < len {
                match s.read(&mut tmp).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
                // The upstream's own pace (not a wait for anything).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tx.send(got);
        }
    })
    .await;
    (up, rx)
}

fn steady_config(url: &str) -> String {
    format!(
        "limits: {{ idle_timeout: 1s, max_body_bytes: 1GiB }}\nupstreams:\n  u: {{ endpoints: \
         [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 60s\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_upload_that_moves_after_an_early_answer_is_not_cut() {
    let (up, mut got) = early_then_steady().await;
    let gw = Gateway::start(&steady_config(&up.url())).await;
    let s = TcpStream::connect(gw.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(
        format!("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {STEADY}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 16 * 1024];
        for _ in 0..STEADY / chunk.len() {
            wr.write_all(&chunk).await.unwrap();
        }
        wr
    });
    let mut b = vec![0u8; 1024];
    let mut resp = Vec::new();
    while !resp.ends_with(b"ok") {
        let n = rd.read(&mut b).await.unwrap();
        assert!(n > 0);
        resp.extend_from_slice(&b[..n]);
    }
    let n = tokio::time::timeout(Duration::from_secs(30), got.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, STEADY);
    drop(writer);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upload_that_moves_after_its_response_ended_is_not_cut() {
    let (up, mut got) = early_then_steady().await;
    let gw = Gateway::start(&steady_config(&up.url())).await;
    let mut send = h2c_sender::<ChanBody>(gw.addr).await;
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(4);
    let req = Request::post(gw.url("/up"))
        .header("content-length", STEADY)
        .body(ChanBody(rx))
        .unwrap();
    let writer = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        for _ in 0..STEADY / chunk.len() {
            if tx.send(Frame::data(chunk.clone())).await.is_err() {
                return;
            }
        }
    });
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    let n = tokio::time::timeout(Duration::from_secs(30), got.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, STEADY);
    drop(writer);
    gw.stop().await;
}
