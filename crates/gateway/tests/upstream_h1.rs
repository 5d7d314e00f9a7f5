//! The gateway's own HTTP/1.1 client toward upstreams: response framing (chunked with trailers,
//! read to close, HEAD, 204/304, interim 1xx), keep-alive reuse and its limits (`Connection:
//! close`, idle connections the upstream closed), broken upstreams (malformed or oversized heads,
//! a body cut short) and streaming (server-sent events). Upstreams here are raw TCP scripts, so
//! each test controls the exact bytes and the connection's life.
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

type Raw = RawUpstream;

/// `req` (a request from [`read_head`]) with its head lowercased (its body as sent), so a test
/// can match names in one case.
fn lowercase_head(req: &str) -> String {
    let (head, body) = req.split_at(req.find("\r\n\r\n").unwrap() + 4);
    head.to_ascii_lowercase() + body
}

/// A route to `url` with one attempt (no retry hides what the client did).
fn config(url: &str) -> String {
    format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 10s\n    retry: {{ attempts: 1 }}\n"
    )
}

#[tokio::test]
async fn a_chunked_response_with_trailers_arrives_whole_however_it_is_split() {
    // The response goes out in odd pieces: inside the size line, the data, the CRLFs, the trailers.
    let up = Raw::start(|mut s, _| async move {
        let mut buf = Vec::new();
        while read_head(&mut s, &mut buf).await.is_some() {
            let whole = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n\
                          5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-sum: 42\r\n\r\n";
            for piece in whole.chunks(3) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        }
    })
    .await;

    // Through the pool itself: the trailers come out as a frame of their own.
    let pool = bulwark_gateway::upstream::Pool::new(
        up.addr.to_string(),
        false,
        8,
        Duration::from_secs(30),
        Duration::from_secs(5),
    );
    for _ in 0..3 {
        let mut req = Request::get("/t")
            .body(bulwark_gateway::proxy::body::ReqBody::empty())
            .unwrap();
        req.headers_mut().insert("host", "up".parse().unwrap());
        let resp = pool.send(req, None).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("transfer-encoding").is_none());
        let mut body = resp.into_body();
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert_eq!(data, b"hello, world");
        assert_eq!(trailers.unwrap().get("x-sum").unwrap(), "42");
        pool.put(
            body.take_conn()
                .expect("a chunked body read to its end gives its connection back"),
        );
    }
    assert_eq!(up.accepted(), 1, "one connection for all three");

    // Through the gateway.
    let gw = Gateway::start(&config(&format!("http://{}", up.addr))).await;
    let r = get(&client(), &gw.url("/t")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello, world");
    gw.stop().await;
}

#[tokio::test]
async fn a_response_without_length_is_read_to_close_and_its_connection_not_reused() {
    let up = Raw::start(|mut s, i| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(format!("HTTP/1.1 200 OK\r\n\r\nuntil close {i}").as_bytes())
                .await;
        }
        // Dropped: the close ends the body.
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/a")).await.text(), "until close 0");
    assert_eq!(get(&c, &gw.url("/b")).await.text(), "until close 1");
    assert_eq!(up.accepted(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn head_204_and_304_responses_have_no_body_and_keep_the_connection() {
    let up = Raw::answering(|head| {
        let r: &[u8] = if head.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        } else if head.starts_with("GET /204") {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else if head.starts_with("GET /304") {
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"
        };
        r.to_vec()
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let c = client();
    for _ in 0..2 {
        let r = send(
            &c,
            Request::head(gw.url("/h")).body(Full::default()).unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
        let r = get(&c, &gw.url("/204")).await;
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
        let r = get(&c, &gw.url("/304")).await;
        assert_eq!(r.status, 304);
        assert!(r.body.is_empty());
        assert_eq!(get(&c, &gw.url("/x")).await.text(), "body");
    }
    assert_eq!(
        up.accepted(),
        1,
        "every exchange on one upstream connection"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_interim_100_continue_is_skipped() {
    let up = Raw::answering(|_| {
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Final: yes\r\n\r\nok".to_vec()
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let c = client();
    for _ in 0..2 {
        let r = get(&c, &gw.url("/c")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-final"), Some("yes"));
        assert!(r.header("link").is_none(), "interim headers are not merged");
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(up.accepted(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_connection_close_response_is_not_reused() {
    // The upstream says close but keeps its end open: the gateway must not send on it again.
    let up = Raw::answering(|_| {
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok".to_vec()
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let c = client();
    for _ in 0..3 {
        let r = get(&c, &gw.url("/c")).await;
        assert_eq!(r.text(), "ok");
        assert!(
            r.header("connection").is_none(),
            "hop-by-hop, not passed on"
        );
    }
    assert_eq!(up.accepted(), 3);
    let ep = endpoint(&gw, "u", 0);
    assert_eq!(ep.pool.idle_count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn sequential_requests_share_one_keep_alive_connection_with_exact_framing() {
    // The upstream echoes each request head (lowercased), so the test sees what the gateway sent.
    let up = Raw::answering(|req| {
        let head = lowercase_head(req);
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}",
            head.len()
        )
        .into_bytes()
    })
    .await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let c = client();
    for i in 0..10 {
        let r = get(&c, &gw.url(&format!("/n/{i}?q=1"))).await;
        assert_eq!(r.status, 200);
        let sent = r.text();
        assert!(
            sent.starts_with(&format!("get /n/{i}?q=1 http/1.1\r\n")),
            "{sent}"
        );
        assert!(
            !sent.contains("content-length"),
            "a GET without body has no length: {sent}"
        );
        assert!(!sent.contains("transfer-encoding"), "{sent}");
    }
    // A buffered (replayable) body: exactly one content-length, the body's.
    let r = send(
        &c,
        Request::put(gw.url("/p"))
            .header("content-length", "3")
            .body(Full::new(Bytes::from_static(b"abc")))
            .unwrap(),
    )
    .await;
    let sent = r.text();
    assert_eq!(sent.matches("content-length: 3").count(), 1, "{sent}");
    assert!(sent.ends_with("\r\n\r\nabc"), "{sent}");
    assert_eq!(
        up.accepted(),
        1,
        "one upstream connection for every request"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced() {
    // Each connection answers one request, keep-alive, then the upstream closes it while idle.
    let closed = Arc::new(AtomicUsize::new(0));
    let cl = closed.clone();
    let up = Raw::start(move |mut s, i| {
        let cl = cl.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_some() {
                let body = format!("conn {i}");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
            drop(s);
            cl.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    // One attempt: only the pool's own stale-connection handling can save the second request.
    let gw = Gateway::start(&config(&up.url())).await;
    let ep = endpoint(&gw, "u", 0);
    let c = client();
    for i in 0..3 {
        let r = get(&c, &gw.url("/s")).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.text(), format!("conn {i}"));
        // Closed while idle in the pool (the periodic reap may drop it first: either way the
        // next request must not be sent on it).
        wait_until(10, || closed.load(Ordering::SeqCst) > i).await;
        assert!(ep.pool.idle_count() <= 1);
    }
    assert_eq!(up.accepted(), 3);
    gw.stop().await;

    // The pool alone (no reaper): the close is seen at checkout, and the request goes on a new
    // connection.
    let pool = bulwark_gateway::upstream::Pool::new(
        up.addr.to_string(),
        false,
        8,
        Duration::from_secs(30),
        Duration::from_secs(5),
    );
    for i in 3..5 {
        let mut req = Request::get("/p")
            .body(bulwark_gateway::proxy::body::ReqBody::empty())
            .unwrap();
        req.headers_mut().insert("host", "up".parse().unwrap());
        let mut body = pool.send(req, None).await.unwrap().into_body();
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, format!("conn {i}"));
        pool.put(body.take_conn().unwrap());
        wait_until(10, || closed.load(Ordering::SeqCst) > i).await;
        assert_eq!(pool.idle_count(), 1);
    }
    assert_eq!(up.accepted(), 5);
}

#[tokio::test]
async fn a_malformed_or_oversized_response_head_is_a_502() {
    let bad = Raw::answering(|_| b"HTTP/1.1 abc Nope\r\n\r\n".to_vec()).await;
    let gw = Gateway::start(&config(&bad.url())).await;
    assert_eq!(get(&client(), &gw.url("/m")).await.status, 502);
    gw.stop().await;

    let huge = Raw::answering(|_| {
        let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..2000 {
            r.extend_from_slice(format!("x-filler-{i}: {}\r\n", "v".repeat(40)).as_bytes());
        }
        r.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        r
    })
    .await;
    let gw = Gateway::start(&config(&huge.url())).await;
    assert_eq!(get(&client(), &gw.url("/h")).await.status, 502);
    gw.stop().await;

    let not_http = Raw::answering(|_| b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()).await;
    let gw = Gateway::start(&config(&not_http.url())).await;
    assert_eq!(get(&client(), &gw.url("/n")).await.status, 502);
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_that_dies_mid_body_ends_the_client_response() {
    // Head and part of the body, a stall, then the upstream goes away.
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let up = Raw::start(move |mut s, _| {
        let go_rx = go_rx.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_some() {
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
                    .await
                    .unwrap();
                go_rx.lock().await.recv().await;
            }
        }
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let addr = gw.addr;
    let client = tokio::spawn(async move {
        // Reads until the gateway closes the connection (or 20 s pass).
        let mut c = RawClient::connect_to(addr).await;
        c.send(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let closed = c.closed_within(20).await;
        (String::from_utf8_lossy(&c.buf).into_owned(), closed)
    });
    wait_until(10, || up.accepted() == 1).await;
    go_tx.send(()).unwrap();
    let (out, closed) = client.await.unwrap();
    assert!(closed, "the client response hangs: {out}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("abc"), "what arrived was passed on: {out}");
    gw.stop().await;
}

/// Server-sent events: each event reaches the client before the upstream sends the next.
async fn events_one_by_one(chunked: bool) {
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<mpsc::UnboundedSender<String>>();
    let up = Raw::start(move |mut s, _| {
        let sent_tx = sent_tx.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            let head: &[u8] = if chunked {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            };
            s.write_all(head).await.unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            sent_tx.send(tx).unwrap();
            while let Some(event) = rx.recv().await {
                let wire = if chunked {
                    format!("{:x}\r\n{event}\r\n", event.len())
                } else {
                    event
                };
                s.write_all(wire.as_bytes()).await.unwrap();
            }
            if chunked {
                s.write_all(b"0\r\n\r\n").await.unwrap();
            }
        }
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let resp = get_streaming(&client(), &gw.url("/events")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let events = sent_rx.recv().await.unwrap();
    for i in 0..5 {
        let event = format!("data: token{i}\n\n");
        events.send(event.clone()).unwrap();
        assert_eq!(next_data(&mut body).await, Some(Bytes::from(event)));
    }
    drop(events);
    assert_eq!(next_data(&mut body).await, None, "the stream did not end");
    gw.stop().await;
}

#[tokio::test]
async fn server_sent_events_in_chunks_reach_the_client_one_by_one() {
    events_one_by_one(true).await;
}

#[tokio::test]
async fn server_sent_events_until_close_reach_the_client_one_by_one() {
    events_one_by_one(false).await;
}

/// A raw upstream for the pool tests: answers every request `conn <i>` (`i`: the index of the
/// connection it came on), keep-alive, once `release` says so; counts the requests it received
/// and the connections still open, and records the connections the gateway closed (EOF).
struct Tracked {
    raw: Raw,
    requests: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    closed: Arc<std::sync::Mutex<Vec<usize>>>,
    release: tokio::sync::watch::Sender<bool>,
}

impl Tracked {
    /// Answers at once when `released`; otherwise holds every answer until [`Tracked::release`].
    async fn start(released: bool) -> Tracked {
        let requests = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (release, release_rx) = tokio::sync::watch::channel(released);
        let (rq, op, cl) = (requests.clone(), open.clone(), closed.clone());
        let raw = Raw::start(move |mut s, i| {
            let (rq, op, cl, mut go) = (rq.clone(), op.clone(), cl.clone(), release_rx.clone());
            async move {
                op.fetch_add(1, Ordering::SeqCst);
                let mut buf = Vec::new();
                while read_head(&mut s, &mut buf).await.is_some() {
                    rq.fetch_add(1, Ordering::SeqCst);
                    if go.wait_for(|go| *go).await.is_err() {
                        break;
                    }
                    let body = format!("conn {i}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        break;
                    }
                }
                // EOF (or a reset): the gateway closed this connection.
                op.fetch_sub(1, Ordering::SeqCst);
                cl.lock().unwrap().push(i);
            }
        })
        .await;
        Tracked {
            raw,
            requests,
            open,
            closed,
            release,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn closed(&self) -> Vec<usize> {
        let mut c = self.closed.lock().unwrap().clone();
        c.sort_unstable();
        c
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// [`config`] with the upstream's `pool:` entries `pool` (flow entries).
fn pool_config(url: &str, pool: &str) -> String {
    format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{url}'}}], pool: {{ {pool} }} }}\nroutes:\n  - upstream: u\n    timeout: 10s\n    retry: {{ attempts: 1 }}\n"
    )
}

#[tokio::test]
async fn at_most_max_idle_connections_stay_open_and_later_requests_reuse_them() {
    const N: usize = 5;
    let up = Tracked::start(false).await;
    let gw = Gateway::start(&pool_config(
        &up.raw.url(),
        "max_idle: 2, idle_timeout: 60s",
    ))
    .await;
    // N requests in flight at once: each needs a connection of its own.
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let url = gw.url(&format!("/c/{i}"));
            tokio::spawn(async move { get(&client(), &url).await })
        })
        .collect();
    wait_until(10, || up.requests() == N).await;
    assert_eq!(up.raw.accepted(), N);
    up.release();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.text().starts_with("conn "), "{}", r.text());
    }
    // Every response was read to its end, so each connection went back to the pool: two are
    // kept, the gateway closes the others.
    wait_until(10, || up.open() <= 2).await;
    assert_eq!(up.open(), 2, "max_idle connections stay open");
    assert_eq!(up.closed().len(), N - 2);
    assert_eq!(endpoint(&gw, "u", 0).pool.idle_count(), 2);

    // Later requests, one after another, go on the kept connections: nothing new is opened.
    let c = client();
    let closed = up.closed();
    for i in 0..10 {
        let r = get(&c, &gw.url(&format!("/s/{i}"))).await;
        assert_eq!(r.status, 200);
        let conn: usize = r.text().strip_prefix("conn ").unwrap().parse().unwrap();
        assert!(
            !closed.contains(&conn),
            "served on closed connection {conn}"
        );
    }
    assert_eq!(up.raw.accepted(), N, "no new upstream connection");
    assert_eq!(up.open(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_idle_timeout_and_the_next_request_opens_a_new_one() {
    let short = Tracked::start(true).await;
    let long = Tracked::start(true).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  short: {{ endpoints: [{{url: '{}'}}], pool: {{ max_idle: 4, idle_timeout: 200ms }} }}
  long: {{ endpoints: [{{url: '{}'}}], pool: {{ max_idle: 4, idle_timeout: 10m }} }}
routes:
  - {{ match: {{ path_prefix: /long }}, upstream: long, retry: {{ attempts: 1 }} }}
  - {{ upstream: short, retry: {{ attempts: 1 }} }}
",
        short.raw.url(),
        long.raw.url()
    ))
    .await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/a")).await.text(), "conn 0");
    assert_eq!(get(&c, &gw.url("/long")).await.text(), "conn 0");
    // The gateway closes the idle connection once past its idle timeout: the upstream sees EOF.
    wait_until(20, || short.closed() == [0]).await;
    assert_eq!(short.open(), 0);
    assert_eq!(endpoint(&gw, "short", 0).pool.idle_count(), 0);
    // The same sweep keeps the connection whose timeout has not passed.
    assert_eq!(long.open(), 1);
    assert_eq!(endpoint(&gw, "long", 0).pool.idle_count(), 1);

    // The next request opens a new connection and succeeds.
    let r = get(&c, &gw.url("/b")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "conn 1");
    assert_eq!(short.raw.accepted(), 2);
    assert_eq!(get(&c, &gw.url("/long")).await.text(), "conn 0");
    assert_eq!(long.raw.accepted(), 1);
    gw.stop().await;
}

/// Trailers that frame, route or are hop-by-hop (RFC 9110 6.5.1) are not passed on: a client that
/// merged a `content-length` or `connection` trailer into the head would read the message
/// differently from the gateway. Others (`x-sum`) pass.
#[tokio::test]
async fn forbidden_trailer_fields_are_dropped() {
    let up = Raw::start(|mut s, _| async move {
        let mut buf = Vec::new();
        while read_head(&mut s, &mut buf).await.is_some() {
            let whole = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                          5\r\nhello\r\n0\r\nx-sum: 42\r\nContent-Length: 99\r\nConnection: close\r\n\
                          Transfer-Encoding: chunked\r\nHost: evil\r\n\r\n";
            s.write_all(whole).await.unwrap();
        }
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let mut c = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"GET /t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The head, then the body's chunks up to the last chunk and its trailer section.
    while !String::from_utf8_lossy(&got).contains("\r\n0\r\n") || !got.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(&mut c, &mut b))
            .await
            .expect("the whole response within 10s")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let trailers = &text[text.rfind("\r\n0\r\n").unwrap()..];
    assert!(trailers.contains("x-sum: 42"), "{text}");
    for name in ["content-length", "connection", "transfer-encoding", "host"] {
        assert!(
            !trailers.contains(name),
            "{name} passed as a trailer: {text}"
        );
    }
    gw.stop().await;
}
