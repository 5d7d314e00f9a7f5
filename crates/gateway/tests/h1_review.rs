//! Adversarial review of the gateway's own HTTP/1.1 code (listener and upstream client), over raw
//! TCP on both sides: smuggling and desync vectors (chunk extensions and trailers with bare LF,
//! empty chunk-size lines, transfer-coding variants), stalls at each step (an upstream that stops
//! mid-body, a client that stops reading), and `Upgrade` / `CONNECT` requests.
mod support;

use std::io;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use support::limited_config as config;

// ---------------------------------------------------------------------------------------------
// Raw upstream
// ---------------------------------------------------------------------------------------------

type Up = RawUpstream;

impl Up {
    /// Answers every request with `body` as a `content-length` response, echoing the target in
    /// `x-target`.
    async fn echo_target() -> Up {
        Up::answering(|head| {
            let target = head.split(' ').nth(1).unwrap_or("");
            format!("HTTP/1.1 200 OK\r\nx-target: {target}\r\ncontent-length: 2\r\n\r\nok")
                .into_bytes()
        })
        .await
    }

    /// Reads each request's body to its end before answering 200 (a body that never ends
    /// properly gets no answer).
    async fn reading_bodies() -> Up {
        Up::start(|mut s, _| async move {
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            loop {
                // The head, then a chunked body up to its last chunk and empty trailer section.
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                assert!(head.contains("transfer-encoding: chunked"), "{head}");
                while !buf[end..].windows(5).any(|w| w == b"0\r\n\r\n") {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            }
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Raw client
// ---------------------------------------------------------------------------------------------

type Client = RawClient;

// ---------------------------------------------------------------------------------------------
// Request framing (listener)
// ---------------------------------------------------------------------------------------------

/// A request whose framing we must refuse gets 400 and the connection closes; nothing reaches the
/// upstream.
async fn refused(gw: &Gateway, up: &Up, req: &[u8]) {
    refused_body(gw, req).await;
    assert_eq!(up.accepted(), 0, "{}", String::from_utf8_lossy(req));
}

/// As [`refused`], for a request whose body is malformed: the request may have started upstream by
/// then (a streamed body), but the upstream never sees it end, and the 400 is the gateway's.
async fn refused_body(gw: &Gateway, req: &[u8]) {
    let mut c = Client::connect(gw).await;
    c.send(req).await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(req));
    assert_eq!(
        r.header("x-bulwark-reason"),
        Some("bad_request"),
        "{}",
        String::from_utf8_lossy(req)
    );
    assert!(c.closed_within(5).await, "{}", String::from_utf8_lossy(req));
}

#[tokio::test]
async fn a_bare_lf_in_a_chunk_extension_is_refused() {
    // A front proxy that ends the size line at the LF reads `5` as the chunk size and "xx\r\nhe"
    // as its data; we read the line to the CR and took "hello" as the data: the two must not
    // disagree, so the line is malformed.
    let up = Up::reading_bodies().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    refused_body(
        &gw,
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;a\nxx\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_bare_lf_in_the_trailer_section_is_refused() {
    // `0\r\n\n` ends the body for a lenient front proxy, which then sends `GET /smuggled` as a
    // request of its own; reading on to the next CRLF would swallow it as a trailer line.
    let up = Up::reading_bodies().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    refused_body(
        &gw,
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    refused_body(
        &gw,
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\nx-t: 1\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn smuggling_framings_are_refused() {
    let up = Up::reading_bodies().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let cases: &[&[u8]] = &[
        // TE and CL together.
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // chunked not the final coding.
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        // Not `chunked` at all.
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n",
        // obs-fold.
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        // Whitespace before the colon.
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        // Odd lengths.
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\nab",
    ];
    for req in cases {
        refused(&gw, &up, req).await;
    }
    let bodies: &[&[u8]] = &[
        // Chunked bodies: a size over 64 bits, no size, a bare LF after the size or the data.
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000001\r\nx\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n;x\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
    ];
    for req in bodies {
        refused_body(&gw, req).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_request_hidden_in_a_body_stays_body() {
    let up = Up::start(|mut s, _| async move {
        let mut buf = Vec::new();
        while let Some(head) = read_head(&mut s, &mut buf).await {
            let target = head.split(' ').nth(1).unwrap_or("").to_owned();
            let body_len = head.len() - head.find("\r\n\r\n").unwrap() - 4;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nx-target: {target}\r\nx-len: {body_len}\r\ncontent-length: 0\r\n\r\n"
            );
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    // With retries, a chunked PUT body is read whole and sent with a `content-length`.
    let gw = Gateway::start(&format!(
        "{}    retry: {{ attempts: 2 }}\n",
        config(&up.url(), "")
    ))
    .await;
    let mut c = Client::connect(&gw).await;
    let hidden = "GET /hidden HTTP/1.1\r\nHost: x\r\n\r\n";
    c.send(
        format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{hidden}\
             PUT /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n\
             GET /c HTTP/1.1\r\nHost: x\r\n\r\n",
            hidden.len(),
            hidden.len()
        )
        .as_bytes(),
    )
    .await;
    for (target, len) in [("/a", hidden.len()), ("/b", hidden.len()), ("/c", 0)] {
        let (r, framed) = c.read_response(false).await;
        assert_eq!(framed, Framed::Complete);
        assert_eq!(r.header("x-target"), Some(target), "{r:?}");
        assert_eq!(r.header("x-len"), Some(len.to_string().as_str()), "{r:?}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_chunked_body_over_max_body_bytes_gets_413_and_closes() {
    let up = Up::echo_target().await;
    let gw = Gateway::start(&config(&up.url(), "max_body_bytes: 1KiB")).await;
    let mut c = Client::connect(&gw).await;
    let mut req = b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'a'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.send(&req).await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(c.closed_within(5).await);
    // And a declared length over it, before any byte of the body.
    // (The connection then reads and drops what the client still sends, for up to
    // header_read_timeout, before it closes: a lingering close, so the 413 is not lost to a reset.)
    let mut c = Client::connect(&gw).await;
    c.send(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n")
        .await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    c.send(&[b'a'; 1025]).await;
    assert!(c.closed_within(5).await);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Response framing (upstream client)
// ---------------------------------------------------------------------------------------------

/// An upstream whose first connection answers the first request with `first` (a chunked response
/// with a broken chunk-size line) and any later request on it with "smuggled"; other connections
/// answer "fresh".
async fn broken_chunks(first: &'static [u8]) -> Up {
    Up::start(move |mut s, i| async move {
        let mut buf = Vec::new();
        let mut n = 0;
        while read_head(&mut s, &mut buf).await.is_some() {
            let resp: &[u8] = match (i, n) {
                (0, 0) => first,
                (0, _) => b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled",
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh",
            };
            n += 1;
            if s.write_all(resp).await.is_err() {
                return;
            }
        }
    })
    .await
}

async fn a_broken_chunk_line_cuts_the_response(first: &'static [u8]) {
    let up = broken_chunks(first).await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Client::connect(&gw).await;
    c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (r, framed) = c.read_response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(framed, Framed::Cut, "{r:?}");
    // The upstream connection is not reused: the next request gets a response of its own.
    let mut c = Client::connect(&gw).await;
    c.send(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (r, framed) = c.read_response(false).await;
    assert_eq!((r.status, framed), (200, Framed::Complete));
    assert_eq!(r.body, b"fresh");
    assert_eq!(up.accepted(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_chunk_size_line_without_digits_is_not_the_last_chunk() {
    // httparse reads an empty size line as size 0: the body would look complete after "abc", the
    // connection would go back to the pool, and what the upstream sends next would be taken for
    // the next request's response.
    a_broken_chunk_line_cuts_the_response(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n\r\n\r\n",
    )
    .await;
    a_broken_chunk_line_cuts_the_response(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n;x\r\n\r\n",
    )
    .await;
}

/// A body broken before any of it could go out (its first chunk-size line is bad, in the same write
/// as the head) fails the attempt, as a reset would: the request is retried on a new connection
/// (the broken one is not reused), and without a retry the client gets the gateway's 502 on a
/// connection that stays open.
#[tokio::test]
async fn an_upstream_body_broken_from_its_start_fails_the_attempt() {
    for first in [
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let up = broken_chunks(first).await;
        let gw = Gateway::start(&format!(
            "{}    retry: {{ attempts: 2 }}\n",
            config(&up.url(), "")
        ))
        .await;
        let mut c = Client::connect(&gw).await;
        c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let r = c.response(false).await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"fresh"[..]), "{r:?}");
        assert_eq!(up.accepted(), 2);
        gw.stop().await;

        let up = broken_chunks(first).await;
        let gw = Gateway::start(&config(&up.url(), "")).await;
        let mut c = Client::connect(&gw).await;
        c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let r = c.response(false).await;
        assert_eq!(r.status, 502, "{r:?}");
        assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
        c.send(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let r = c.response(false).await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"fresh"[..]));
        gw.stop().await;
    }
}

#[tokio::test]
async fn a_bare_lf_in_an_upstream_chunk_extension_is_an_error() {
    a_broken_chunk_line_cuts_the_response(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0;\n\r\n\r\n",
    )
    .await;
}

#[tokio::test]
async fn a_bare_lf_in_upstream_trailers_is_an_error() {
    // A lenient peer ends the trailer section (or a trailer line) at a bare LF, a strict one reads
    // on to the next CRLF: the two would end the body at different bytes, so it is cut and the
    // connection is not reused.
    a_broken_chunk_line_cuts_the_response(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\n\r\n",
    )
    .await;
    a_broken_chunk_line_cuts_the_response(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\n",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Stalls
// ---------------------------------------------------------------------------------------------

/// An upstream that answers the first request with `head_and_some` and then sends nothing more;
/// reports on `eof` when the gateway closes the connection.
async fn stalling(head_and_some: &'static [u8]) -> (Up, mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let up = Up::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            if s.write_all(head_and_some).await.is_err() {
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
    (up, rx)
}

async fn an_upstream_stalling_mid_body_is_cut_after_idle_timeout(head_and_some: &'static [u8]) {
    let (up, mut eof) = stalling(head_and_some).await;
    let gw = Gateway::start(&config(&up.url(), "idle_timeout: 1s")).await;
    let mut c = Client::connect(&gw).await;
    c.send(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (r, framed) = c.read_response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(framed, Framed::Cut, "{r:?}");
    assert!(r.body.starts_with(b"abc"), "{r:?}");
    tokio::time::timeout(Duration::from_secs(5), eof.recv())
        .await
        .expect("the upstream connection was not closed")
        .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_stalling_mid_body_ends_the_exchange() {
    an_upstream_stalling_mid_body_is_cut_after_idle_timeout(
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
    )
    .await;
    an_upstream_stalling_mid_body_is_cut_after_idle_timeout(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\na\r\nab",
    )
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_frees_the_upstream() {
    let (tx, mut closed) = mpsc::unbounded_channel();
    let up = Up::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n")
                .await;
            let chunk = vec![b'x'; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
            let _ = tx.send(());
        }
    })
    .await;
    let gw = Gateway::start(&config(&up.url(), "idle_timeout: 1s")).await;
    let mut c = Client::connect(&gw).await;
    c.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The client reads nothing: socket buffers fill, the gateway's writes stop progressing.
    tokio::time::timeout(Duration::from_secs(10), closed.recv())
        .await
        .expect("the upstream connection stayed open for a client that reads nothing")
        .unwrap();
    drop(c);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_stalling_mid_upload_frees_the_upstream() {
    // The upstream answers early, then waits for the rest of a streamed body that never comes.
    let (tx, mut eof) = mpsc::unbounded_channel();
    let up = Up::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .is_err()
            {
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
    let gw = Gateway::start(&config(&up.url(), "idle_timeout: 1s")).await;
    let mut c = Client::connect(&gw).await;
    c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        .await;
    let (r, framed) = c.read_response(false).await;
    assert_eq!((r.status, framed), (200, Framed::Complete), "{r:?}");
    // The client keeps its connection open and sends nothing more.
    tokio::time::timeout(Duration::from_secs(10), eof.recv())
        .await
        .expect("the upstream connection stayed open after the client connection was given up")
        .unwrap();
    assert!(c.closed_within(5).await);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Semantics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_upgrade_request_goes_out_as_a_plain_request_and_a_101_is_a_502() {
    let (tx, mut heads) = mpsc::unbounded_channel();
    let up = Up::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut s, &mut buf).await {
                let _ = tx.send(head.to_ascii_lowercase());
                let resp: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\x81\x05hello";
                if s.write_all(resp).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Client::connect(&gw).await;
    c.send(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let (r, framed) = c.read_response(false).await;
    assert_eq!((r.status, framed), (502, Framed::Complete), "{r:?}");
    let head = heads.recv().await.unwrap();
    assert!(!head.contains("upgrade"), "{head}");
    // The client connection still carries requests (it never switched protocols).
    c.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 502);
    gw.stop().await;
}

#[tokio::test]
async fn connect_is_refused() {
    let up = Up::echo_target().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    refused(
        &gw,
        &up,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn head_204_and_304_keep_their_framing_and_the_connections_stay_in_step() {
    let up = Up::answering(|head| {
        let resp: &[u8] = if head.starts_with("HEAD") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
        } else if head.starts_with("GET /204") {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else if head.starts_with("GET /304") {
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 99\r\netag: \"x\"\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"
        };
        resp.to_vec()
    })
    .await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Client::connect(&gw).await;
    c.send(
        b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /304 HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let (r, _) = c.read_response(true).await;
    assert_eq!((r.status, r.header("content-length")), (200, Some("1234")));
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("transfer-encoding"), None);
    let (r, _) = c.read_response(false).await;
    assert_eq!((r.status, r.header("content-length")), (304, Some("99")));
    let (r, framed) = c.read_response(false).await;
    assert_eq!(
        (r.status, framed, &r.body[..]),
        (200, Framed::Complete, &b"body"[..])
    );
    // One upstream connection carried all four.
    assert_eq!(up.accepted(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_still_sending_a_refused_body_reads_the_413() {
    let up = Up::echo_target().await;
    let gw = Gateway::start(&config(&up.url(), "max_body_bytes: 1KiB")).await;
    for _ in 0..5 {
        let c = Client::connect(&gw).await;
        let (mut rd, mut wr) = c.s.into_split();
        let writer = tokio::spawn(async move {
            let _ = wr
                .write_all(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n")
                .await;
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..300 {
                if wr.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match rd.read(&mut b).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => got.extend_from_slice(&b[..n]),
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("no end within 10 s");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 413"), "{r:?} {text:?}");
        writer.abort();
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_writes_its_whole_refused_body_before_reading_gets_the_413() {
    // A simple blocking client writes the whole body, then reads. The gateway refuses the body at
    // its head and stops reading it; if it then closed with the client's bytes unread, the socket
    // would send a reset, and the client's write would fail before it reads the 413. Instead the
    // gateway reads and drops the rest (a lingering close) until the client is done.
    let up = Up::echo_target().await;
    let gw = Gateway::start(&config(&up.url(), "max_body_bytes: 1KiB")).await;
    // Far more than loopback's socket buffers hold, so the writes need the gateway to read.
    const BODY: usize = 32 << 20;
    let mut c = Client::connect(&gw).await;
    let head = format!("POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n");
    let chunk = vec![b'a'; 1 << 20];
    let written = tokio::time::timeout(Duration::from_secs(10), async {
        c.s.write_all(head.as_bytes()).await?;
        for _ in 0..BODY / chunk.len() {
            c.s.write_all(&chunk).await?;
        }
        io::Result::Ok(())
    })
    .await
    .expect("the body was not taken within 10 s");
    written.expect("writing the refused body failed (a reset?)");
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(c.closed_within(5).await);
    gw.stop().await;
}

#[tokio::test]
async fn a_transfer_coding_the_gateway_would_drop_is_refused() {
    // The gateway decodes `chunked` and sends the body with a `content-length`: another coding
    // (gzip) would reach the upstream as the body's raw bytes, with nothing saying so; `chunked`
    // twice is not a valid message either.
    let up = Up::echo_target().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    for req in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    ] {
        refused(&gw, &up, req).await;
    }
    // `chunked` alone, in any case, with list whitespace, is fine.
    let mut c = Client::connect(&gw).await;
    c.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  Chunked ,\r\n\r\n2\r\nab\r\n0\r\n\r\n",
    )
    .await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    gw.stop().await;
}

/// An upstream that reads request heads and never answers; reports on `eof` when the gateway
/// closes the connection.
async fn mute() -> (Up, mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let up = Up::start(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut b = [0u8; 4096];
            while let Ok(n) = s.read(&mut b).await {
                if n == 0 {
                    break;
                }
            }
            let _ = tx.send(());
        }
    })
    .await;
    (up, rx)
}

/// A client sends `framing` and the `start` of a body, then nothing more, to a mute upstream, with
/// or without retries (buffered or streamed body): it gets `want` (status, reason) and both
/// connections close.
async fn stalled_body(limits: &str, timeout: &str, framing: &str, start: &str, want: (u16, &str)) {
    for (method, retry) in [("PUT", "    retry: { attempts: 2 }\n"), ("POST", "")] {
        let (up, mut eof) = mute().await;
        let yaml = format!(
            "{}    timeout: {timeout}\n{retry}",
            config(&up.url(), limits)
        );
        let gw = Gateway::start(&yaml).await;
        let mut c = Client::connect(&gw).await;
        c.send(
            format!("{method} /slow HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n{start}").as_bytes(),
        )
        .await;
        let (r, _) = c.read_response(false).await;
        let what = format!("{method} {framing}: {r:?}");
        assert_eq!(
            (r.status, r.header("x-bulwark-reason")),
            (want.0, Some(want.1)),
            "{what}"
        );
        assert!(c.closed_within(5).await, "{what}");
        if up.accepted() > 0 {
            tokio::time::timeout(Duration::from_secs(5), eof.recv())
                .await
                .unwrap_or_else(|_| panic!("{what}: the upstream connection stayed open"))
                .unwrap();
        }
        // (The gateway lingers on its side of the client connection until this close.)
        drop(c);
        gw.stop().await;
    }
}

#[tokio::test]
async fn a_client_stalling_mid_chunk_gets_504_and_everything_closes() {
    // The route's deadline comes first; a body still for idle_timeout would get 408.
    let limits = "idle_timeout: 10s, header_read_timeout: 1s";
    let chunked = "Transfer-Encoding: chunked";
    stalled_body(limits, "1s", chunked, "5\r\nab", (504, "timeout")).await;
}

/// A client that stops sending its body (before any response) gets 408 `body_timeout` after
/// `idle_timeout`, long before the route's deadline (60 s, which would give 504).
#[tokio::test]
async fn a_client_stalling_mid_body_gets_408_after_idle_timeout() {
    let want = (408, "body_timeout");
    let limits = "idle_timeout: 500ms";
    stalled_body(limits, "60s", "Content-Length: 10", "ab", want).await;
    stalled_body(limits, "60s", "Transfer-Encoding: chunked", "5\r\nab", want).await;
}

/// Once the response is going out, a quiet upload is not cut: the upstream answers at once and
/// streams, the client pauses its body for longer than `idle_timeout`, then finishes it, and the
/// upstream gets all of it.
#[tokio::test]
async fn a_quiet_upload_under_a_streaming_response_is_not_cut() {
    let up = Up::start(|s, _| async move {
        let (mut rd, mut wr) = tokio::io::split(s);
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        let _ = wr
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        // Ticks every 100 ms while the upload lasts, then says how much of it came.
        let ticking = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if wr.write_all(b"1\r\n.\r\n").await.is_err() {
                    return;
                }
            }
        };
        let reading = async {
            while !buf.ends_with(b"0\r\n\r\n") {
                match rd.read(&mut tmp).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            true
        };
        let whole = tokio::select! { r = reading => r, () = ticking => false };
        let tail = if whole && buf.windows(6).any(|w| w == b"second") {
            "whole"
        } else {
            "cut"
        };
        let _ = wr
            .write_all(format!("{:x}\r\n{tail}\r\n0\r\n\r\n", tail.len()).as_bytes())
            .await;
    })
    .await;
    let gw = Gateway::start(&config(&up.url(), "idle_timeout: 400ms")).await;
    let mut c = Client::connect(&gw).await;
    c.send(b"POST /both HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        .await;
    assert_eq!(c.line().await.as_deref(), Some("HTTP/1.1 200 OK"));
    // Quiet for twice idle_timeout while the response streams.
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.send(b"6\r\nsecond\r\n0\r\n\r\n").await;
    let mut rest = String::new();
    while let Some(l) = c.line().await {
        rest.push_str(&l);
        rest.push('\n');
        if rest.ends_with("\n0\n\n") {
            break;
        }
    }
    assert!(rest.contains("whole"), "{rest}");
    gw.stop().await;
}

/// A body that keeps moving, however slowly, is not cut: each piece comes within `idle_timeout`
/// of the last, for longer than `idle_timeout` in all.
#[tokio::test]
async fn a_slow_body_that_keeps_moving_is_not_cut() {
    let up = Up::reading_bodies().await;
    let gw = Gateway::start(&config(&up.url(), "idle_timeout: 400ms")).await;
    let mut c = Client::connect(&gw).await;
    c.send(b"POST /slow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    for _ in 0..6 {
        c.send(b"1\r\na\r\n").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    c.send(b"0\r\n\r\n").await;
    let (r, _) = c.read_response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    gw.stop().await;
}

/// An upstream whose whole answer, head and (empty) body, comes in one write: the client gets the
/// head and a proper end of the body, never a bare terminating chunk. A body already known to be
/// empty when the head goes out may also go out as `content-length: 0`; one with trailers must be
/// chunked, to carry them.
#[tokio::test]
async fn a_body_that_ends_with_its_head_keeps_the_head() {
    for (answer, close, body_ends) in [
        // An empty chunked body, with and without trailers.
        (
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            false,
            "0\r\n\r\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\n",
            false,
            "0\r\nx-t: 1\r\n\r\n",
        ),
        // A body to the end of the connection, empty.
        (b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\n", true, "0\r\n\r\n"),
        (b"HTTP/1.0 200 OK\r\n\r\n", true, "0\r\n\r\n"),
    ] {
        let respond = move |_: &str| answer.to_vec();
        let up = if close {
            Up::answering_once(respond).await
        } else {
            Up::answering(respond).await
        };
        let gw = Gateway::start(&config(&up.url(), "")).await;
        let mut c = Client::connect(&gw).await;
        for _ in 0..2 {
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let status = c.line().await;
            assert_eq!(
                status.as_deref(),
                Some("HTTP/1.1 200 OK"),
                "{}",
                String::from_utf8_lossy(answer)
            );
            let mut head = String::new();
            while let Some(l) = c.line().await.filter(|l| !l.is_empty()) {
                head.push_str(&l.to_ascii_lowercase());
                head.push('\n');
            }
            if body_ends == "0\r\n\r\n" && head.contains("content-length: 0\n") {
                // Nothing follows the head (the next request's answer would show it).
                continue;
            }
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            let end = c.take(body_ends.len()).await.unwrap();
            assert_eq!(String::from_utf8_lossy(&end), body_ends, "{head}");
        }
        gw.stop().await;
    }
}

/// A status outside 100-599 (which HTTP/1.1 parsers accept) is passed through as it is, as a
/// failure: RFC 9110 (section 15) says to handle it as a 5xx, so it carries the reason a passed
/// through 5xx does. With no reason phrase known for it, it goes out as `Unknown`.
#[tokio::test]
async fn a_status_past_599_is_passed_through_as_a_server_error() {
    let up =
        Up::answering(|_| b"HTTP/1.1 904 Whatever\r\ncontent-length: 2\r\n\r\nok".to_vec()).await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut c = Client::connect(&gw).await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(c.line().await.as_deref(), Some("HTTP/1.1 904 Unknown"));
    let mut head = Vec::new();
    while let Some(l) = c.line().await.filter(|l| !l.is_empty()) {
        head.push(l.to_ascii_lowercase());
    }
    assert!(
        head.iter().any(|l| l == "x-bulwark-reason: upstream_error"),
        "{head:?}"
    );
    assert_eq!(c.take(2).await.as_deref(), Some(&b"ok"[..]));
    gw.stop().await;
}

#[tokio::test]
async fn two_host_headers_are_refused() {
    // A route matching `host: admin` would take the second line where a front proxy (or an
    // authorization in front of the gateway) went by the first.
    let up = Up::echo_target().await;
    let yaml = format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - match: {{ headers: {{ host: admin }} }}\n    upstream: u\n",
        up.url()
    );
    let gw = Gateway::start(&yaml).await;
    refused(
        &gw,
        &up,
        b"GET /secret HTTP/1.1\r\nHost: public\r\nHost: admin\r\n\r\n",
    )
    .await;
    let mut c = Client::connect(&gw).await;
    c.send(b"GET /secret HTTP/1.1\r\nHost: admin\r\n\r\n").await;
    assert_eq!(c.read_response(false).await.0.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_transfer_coding_the_gateway_would_drop_is_a_502() {
    // The gateway decodes `chunked` only and removes `transfer-encoding` (hop-by-hop): a gzip
    // coding would reach the client as the body's raw bytes, labelled as nothing.
    for resp in [
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\n\x1f\x8b\x08\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nconnection: close\r\n\r\n\x1f\x8b\x08",
    ] {
        let up = Up::start(move |mut s, _| async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_some() {
                let _ = s.write_all(resp).await;
            }
        })
        .await;
        let gw = Gateway::start(&config(&up.url(), "")).await;
        let mut c = Client::connect(&gw).await;
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (r, _) = c.read_response(false).await;
        assert_eq!(r.status, 502, "{r:?}");
        gw.stop().await;
    }
}
