//! An upload streamed to an upstream that stopped reading it: once the client has its answer and
//! is gone, the gateway lets go of the upstream connection (HTTP/1.1) or stream (HTTP/2), the
//! client's socket and the task sending the body (found by a review; both tests failed before
//! the fix: two sockets and a task held for ever per such upload, outside every gauge and
//! `max_connections`).
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    let up = RawUpstream::start(move |mut s, _| {
        let keep = keep.clone();
        async move {
            // The head only (`read_head` would wait for the body).
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            // Never reads again, never closes.
            keep.lock().unwrap().push(s);
        }
    })
    .await;
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
