//! HTTP/2 abuse, over raw frames on loopback sockets (h2c with prior knowledge) and `h2`-crate
//! upstreams: paced rapid reset, a header block left open, a client that reads nothing on a shared
//! upstream connection, and GOAWAY from an upstream (what is sent again, what is not).
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use support::h2raw::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

/// An HPACK block for `GET http://x{path}`, without touching the dynamic table (static
/// `:method GET`, `:scheme http`; `:path` and `:authority` as literals without indexing).
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    b.extend_from_slice(&[0x04, path.len() as u8]);
    b.extend_from_slice(path.as_bytes());
    b.extend_from_slice(&[0x01, 0x01, b'x']);
    b
}

/// SETTINGS with the given (id, value) pairs.
fn settings(params: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in params {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

/// A raw h2c client: writes frames; a task reads and parses what the gateway sends, acknowledging
/// its SETTINGS, and records a GOAWAY and the end of the connection.
struct Raw {
    w: OwnedWriteHalf,
    goaway: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    headers: Arc<AtomicUsize>,
}

impl Raw {
    /// Connects to `gw` and sends the preface and `first` (a SETTINGS frame).
    async fn connect(gw: &Gateway, first: Vec<u8>) -> Raw {
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let (mut r, mut w) = tcp.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(first);
        w.write_all(&hello).await.unwrap();
        let goaway = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let headers = Arc::new(AtomicUsize::new(0));
        let (g, c, hs) = (goaway.clone(), closed.clone(), headers.clone());
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 65536];
            loop {
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while buf.len() >= 9 {
                    let len = (usize::from(buf[0]) << 16)
                        | (usize::from(buf[1]) << 8)
                        | usize::from(buf[2]);
                    if buf.len() < 9 + len {
                        break;
                    }
                    match (buf[3], buf[4]) {
                        (GOAWAY, _) => g.store(true, Ordering::SeqCst),
                        (HEADERS, _) => {
                            hs.fetch_add(1, Ordering::SeqCst);
                        }
                        (SETTINGS, 0) => {
                            let _ = ack_tx.send(());
                        }
                        _ => {}
                    }
                    buf.drain(..9 + len);
                }
            }
            c.store(true, Ordering::SeqCst);
        });
        let mut raw = Raw {
            w,
            goaway,
            closed,
            headers,
        };
        // The gateway's SETTINGS come first: acknowledge them.
        tokio::time::timeout(Duration::from_secs(10), ack_rx.recv())
            .await
            .expect("no SETTINGS from the gateway");
        raw.send(&frame(SETTINGS, 0x1, 0, &[])).await;
        raw
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.w.write_all(bytes).await.is_ok()
    }

    /// Whether the gateway has sent GOAWAY or closed the connection.
    fn ended(&self) -> bool {
        self.goaway.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst)
    }
}

/// Waits up to `secs` for `cond`; returns whether it held.
async fn within(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The docs: "A request the upstream did not process (its stream refused with `REFUSED_STREAM`,
/// or past a `GOAWAY`, RFC 9113 8.7) is sent once more on a new connection, whatever its
/// method, when its body is in memory". RFC 9113 makes the last stream id of *any* GOAWAY the
/// bound of what may have been processed, whatever its error code. An upstream that goes away
/// with `INTERNAL_ERROR` or `ENHANCE_YOUR_CALM` (an overloaded server, or one defending itself)
/// does not fail a plain GET that it never saw, on a route without retries: the GET is sent again
/// on a new connection.
#[tokio::test]
async fn a_get_past_a_goaway_with_an_error_code_is_sent_again() {
    for code in [
        0x2u32, /* INTERNAL_ERROR */
        0xb,    /* ENHANCE_YOUR_CALM */
    ] {
        let (addr, conns) = goaway_upstream(code, 0).await;
        let gw = Gateway::start(&format!(
            "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n"
        ))
        .await;
        let req = Request::get(gw.url("/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let g = send(&client(), req).await;
        assert_eq!(
            g.status,
            200,
            "a GET past a GOAWAY (last stream 0, code {code:#x}) was not sent again: reason {:?}, \
             upstream connections {}",
            g.header("x-bulwark-reason"),
            conns.load(Ordering::SeqCst)
        );
        assert_eq!(g.text(), "ok");
        gw.stop().await;
    }
}

/// An h2c upstream (h2 crate) that answers `/big` with an 8 MiB body (sent as fast as its
/// flow-control windows allow) and anything else with `ok`.
async fn big_and_small_upstream() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tcp).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let mut s = respond.send_response(Response::new(()), false).unwrap();
                    if req.uri().path() == "/big" {
                        s.send_data(Bytes::from(vec![b'x'; 8 << 20]), true).unwrap();
                    } else {
                        s.send_data(Bytes::from("ok"), true).unwrap();
                    }
                }
            });
        }
    });
    addr
}

/// Head-of-line blocking across clients on the shared HTTP/2 upstream connection: one client
/// opens three streams with an initial window of 0 (so the gateway can send it nothing) for a
/// large body. The gateway's HTTP/2 client leaves what it received for them unread, and h2 keeps
/// the *connection* window consumed by that unread data (2 MiB per stream, 5 MiB per
/// connection: hyper's defaults): three such streams shut the connection window, and every other
/// client's response from that endpoint stalls behind them, until `idle_timeout` cuts the
/// streams (60 s by default, and the attacker simply opens three more).
#[tokio::test]
async fn a_client_that_reads_nothing_does_not_stall_other_clients_on_a_shared_http2_upstream() {
    let addr = big_and_small_upstream().await;
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 120s }}\nupstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 100s\n"
    ))
    .await;
    // A first request opens the shared connection.
    let c = client();
    assert_eq!(get(&c, &gw.url("/small")).await.text(), "ok");
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: the gateway may send this client no DATA.
    let mut slow = Raw::connect(&gw, settings(&[(4, 0)])).await;
    for id in [1u32, 3, 5] {
        slow.send(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            id,
            &get_block("/big"),
        ))
        .await;
    }
    assert!(
        within(10, || slow.headers.load(Ordering::SeqCst) == 3).await,
        "the three responses did not start"
    );
    // Another client, another request to the same endpoint.
    let other = tokio::spawn(async move {
        let c = client();
        let resp = get_streaming(&c, &format!("http://{}/small", gw.addr)).await;
        use http_body_util::BodyExt;
        resp.into_body().collect().await.map(|b| b.to_bytes())
    });
    let got = tokio::time::timeout(Duration::from_secs(15), other).await;
    assert!(
        matches!(&got, Ok(Ok(Ok(b))) if &b[..] == b"ok"),
        "another client's response stalled behind a client that reads nothing (the shared \
         HTTP/2 upstream connection's window is held by unread streams): {got:?}"
    );
    drop(slow);
}

/// The other side of the rule: a stream at or below a GOAWAY's last stream id may have been
/// processed, so when the connection then ends, that GET is not sent again (a route without
/// retries: 502, one upstream connection).
#[tokio::test]
async fn a_get_at_or_below_a_goaways_last_stream_id_is_not_sent_again() {
    let (addr, conns) = goaway_upstream(0x2 /* INTERNAL_ERROR */, 1).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: 'http://{addr}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n"
    ))
    .await;
    let req = Request::get(gw.url("/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let g = send(&client(), req).await;
    assert_eq!(g.status, 502, "{:?}", g.header("x-bulwark-reason"));
    assert_eq!(conns.load(Ordering::SeqCst), 1);
    gw.stop().await;
}
/// Slow-loris over HTTP/2: a client opens a stream with a HEADERS frame that does not end its
/// header block (no END_HEADERS) and then sends nothing more. Over HTTP/1.1 a head that does not
/// complete is closed at `header_read_timeout`; over HTTP/2 the incomplete block is held (with
/// its connection and its `max_connections` slot) until the connection's `idle_timeout`.
#[tokio::test]
async fn an_http2_header_block_left_incomplete_is_closed_at_header_read_timeout() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 120s",
    ))
    .await;
    let mut c = Raw::connect(&gw, settings(&[])).await;
    // `:method GET`, `:scheme http`, then the block stops (a CONTINUATION would finish it).
    c.send(&frame(HEADERS, END_STREAM, 1, &[0x82, 0x86])).await;
    assert!(
        within(15, || c.ended()).await,
        "an HTTP/2 header block left incomplete was still held long after header_read_timeout \
         (300ms): no GOAWAY and no close"
    );
    assert_eq!(up.hits(), 0);
    gw.stop().await;
}

/// Rapid reset (CVE-2023-44487), paced so that each stream is accepted before its reset: the
/// client opens a stream, waits until the gateway has forwarded its request upstream, and resets
/// it. A reset stream no longer counts against `max_concurrent_streams`, so one connection makes
/// the gateway start (connect, send) an unbounded number of upstream requests, at the client's
/// pace and whatever the upstream's latency. h2's own guard (`max_pending_accept_reset_streams`)
/// only counts streams reset before the server accepted them (a burst in one read: that one is
/// refused with GOAWAY, checked). Envoy closes a connection whose streams are mostly reset
/// prematurely; nginx counts reset streams towards `keepalive_requests` (1000) and closes.
#[tokio::test]
async fn streams_reset_after_going_upstream_get_their_connection_closed() {
    let up = Silent::start().await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_concurrent_streams: 2")).await;
    let mut c = Raw::connect(&gw, settings(&[])).await;
    let mut forwarded = 0usize;
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        if c.ended()
            || !c
                .send(&frame(
                    HEADERS,
                    END_STREAM | END_HEADERS,
                    id,
                    &get_block("/"),
                ))
                .await
        {
            break;
        }
        let want = forwarded + 1;
        // The request reached the upstream (or the gateway ended the connection).
        if !within(10, || {
            up.accepted.load(Ordering::SeqCst) >= want || c.ended()
        })
        .await
            || c.ended()
        {
            break;
        }
        forwarded += 1;
        // RST_STREAM, CANCEL.
        if !c.send(&frame(RST_STREAM, 0, id, &8u32.to_be_bytes())).await {
            break;
        }
    }
    assert!(
        c.ended(),
        "{forwarded} streams, each reset by the client right after its request went upstream, \
         and the gateway neither sent GOAWAY nor closed the connection"
    );
    gw.stop().await;
}

/// Slow-loris with a HEADERS frame that carries END_HEADERS but whose payload stops coming: the
/// head is no more complete than a block waiting for its CONTINUATION, and is cut at
/// `header_read_timeout` too (it was held until `idle_timeout`). Found by a review; failed before
/// its fix.
#[tokio::test]
async fn an_http2_headers_frame_whose_payload_stops_is_closed_at_header_read_timeout() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(
        &up.url(),
        "header_read_timeout: 300ms, idle_timeout: 120s",
    ))
    .await;
    let mut c = Raw::connect(&gw, settings(&[])).await;
    // A frame header announcing 100 bytes of header block, then only two of them.
    let mut f = frame(HEADERS, END_STREAM | END_HEADERS, 1, &[0x82, 0x86]);
    f[2] = 100;
    c.send(&f).await;
    assert!(
        within(15, || c.ended()).await,
        "an HTTP/2 HEADERS frame left incomplete was still held 15 s on (header_read_timeout 300ms)"
    );
    // A frame header itself cut short, on another connection.
    let mut c = Raw::connect(&gw, settings(&[])).await;
    c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 3, &[0x82])[..4])
        .await;
    assert!(within(15, || c.ended()).await, "a frame header cut short");
    assert_eq!(up.hits(), 0);
    gw.stop().await;
}

/// `max_header_bytes` counts the same over both protocols: a host asked for as HTTP/2's
/// `:authority` counts as the `Host` line HTTP/1.1 carries (a 1,500-byte host under a 1 KiB
/// limit got 431 over HTTP/1.1 and went upstream over HTTP/2). Found by a review; failed before
/// its fix.
#[tokio::test]
async fn a_long_authority_counts_against_max_header_bytes_over_http2_as_host_does_over_http1() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_header_bytes: 1KiB")).await;
    let host = "a".repeat(1500);
    let mut c = RawClient::connect(&gw).await;
    c.send(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 431, "over HTTP/1.1: {r:?}");
    let mut h2 = h2c_sender::<http_body_util::Empty<Bytes>>(gw.addr).await;
    let r = h2
        .send_request(
            Request::get(format!("http://{host}/"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 431, "over HTTP/2");
    // A short one passes.
    let r = h2
        .send_request(Request::get("http://gw/").body(Default::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

/// `limits.max_headers` (100 by default, as Envoy's `max_headers_count`) holds over both
/// protocols: 120 one-byte headers got 431 over HTTP/1.1 (an undocumented 100-line limit of
/// the parser) and went through over HTTP/2. Raised, it lets both through. Found by a review;
/// failed before its fix.
#[tokio::test]
async fn a_request_with_many_small_headers_gets_the_same_answer_over_both_protocols() {
    // Answers 200 whatever the headers (a hyper server would refuse over 100 lines itself).
    let up = RawUpstream::answering(|_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        .await;
    for (limits, expected) in [("max_headers: 100", 431), ("max_headers: 200", 200)] {
        let gw = Gateway::start(&limited_config(&up.url(), limits)).await;
        let req = || {
            let mut b = Request::get(gw.url("/"));
            for i in 0..120 {
                b = b.header(format!("x-h{i:03}"), "v");
            }
            b.body(Full::<Bytes>::default()).unwrap()
        };
        let h2 = send(&h2c_client(), req()).await;
        assert_eq!(h2.version, http::Version::HTTP_2);
        let h1 = send(&client(), req()).await;
        assert_eq!(
            (h1.status.as_u16(), h2.status.as_u16()),
            (expected, expected),
            "{limits}"
        );
        gw.stop().await;
    }
}

/// `header_read_timeout` is per head: a client sending a steady stream of small requests whose
/// reads each end inside the next request's frame (a busy link cuts them anywhere) is not cut
/// while every head completes in a fraction of it. The first deadline was kept for as long as
/// reads ended inside *some* head (9 of 30 answers, then closed). Found by a review; failed
/// before its fix.
#[tokio::test]
async fn http2_requests_each_complete_promptly_are_not_cut_because_reads_end_inside_the_next() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(
        &up.url(),
        "header_read_timeout: 1s, idle_timeout: 120s",
    ))
    .await;
    let mut c = Raw::connect(&gw, settings(&[])).await;
    let n: u32 = 30; // 30 x 100 ms: three times header_read_timeout
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                2 * i + 1,
                &get_block("/"),
            )
        })
        .collect();
    // The first 5 bytes of request 0's frame; then every 100 ms (the client's pace, the test's
    // subject) the rest of request i and the first 5 bytes of request i + 1.
    assert!(c.send(&frames[0][..5]).await);
    for i in 0..n as usize {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut piece = frames[i][5..].to_vec();
        if i + 1 < n as usize {
            piece.extend_from_slice(&frames[i + 1][..5]);
        }
        if !c.send(&piece).await || c.ended() {
            break;
        }
    }
    let all = within(10, || {
        c.headers.load(Ordering::SeqCst) >= n as usize || c.ended()
    })
    .await;
    assert!(
        all && !c.ended(),
        "cut although every head completed within 100 ms (header_read_timeout 1s): {} of {n} \
         answers",
        c.headers.load(Ordering::SeqCst)
    );
    gw.stop().await;
}

/// `limits.max_headers` counts an HTTP/2 request's cookies (one field each, as browsers send
/// them, RFC 9113 8.2.3) as the one `cookie` line they become: 120 cookies passed over HTTP/1.1
/// and got 431 over HTTP/2. Found by a review; failed before its fix.
#[tokio::test]
async fn cookie_crumbs_of_an_http2_request_count_as_the_one_cookie_line_they_become() {
    let up = RawUpstream::answering(|_| b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        .await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_headers: 100")).await;
    let cookies: Vec<String> = (0..120).map(|i| format!("c{i}=v")).collect();
    let h1 = send(
        &client(),
        Request::get(gw.url("/"))
            .header("cookie", cookies.join("; "))
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await;
    assert_eq!(h1.status.as_u16(), 200, "over HTTP/1.1");
    let mut b = Request::get(gw.url("/"));
    for c in &cookies {
        b = b.header("cookie", c.as_str());
    }
    let h2 = send(&h2c_client(), b.body(Full::<Bytes>::default()).unwrap()).await;
    assert_eq!(h2.version, http::Version::HTTP_2);
    assert_eq!(
        h2.status.as_u16(),
        200,
        "reason {:?}",
        h2.header("x-bulwark-reason")
    );
    gw.stop().await;
}
