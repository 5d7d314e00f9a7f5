//! What one party's bytes make the gateway send to another, checked on the exact bytes a raw
//! HTTP/1.1 upstream receives: HTTP/2 requests forwarded to HTTP/1.1 (the downgrade behind
//! request-smuggling bugs in other proxies), request targets, rewrites. Found by a review; each
//! failed before its fix.
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::h2raw::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HPACK block of literal fields without indexing (new names), in the order given.
fn block(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in fields {
        assert!(n.len() < 127 && v.len() < 127);
        b.push(0x00);
        b.push(n.len() as u8);
        b.extend_from_slice(n.as_bytes());
        b.push(v.len() as u8);
        b.extend_from_slice(v);
    }
    b
}

/// How the gateway answered one HTTP/2 stream.
#[derive(Debug, PartialEq)]
enum H2Answer {
    /// A response HEADERS frame, with its `:status`.
    Status(u16),
    Reset,
    GoAway,
    Closed,
}

/// Opens an h2c connection to `gw`, sends one GET on stream 1 with `fields` (after the preface
/// and SETTINGS) and returns how it was answered.
async fn h2_get(gw: &Gateway, fields: &[(&str, &[u8])]) -> H2Answer {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block(fields)));
    s.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    let _ = s.write_all(&frame(SETTINGS, 1, 0, &[])).await;
                }
                HEADERS if stream == 1 => {
                    // `:status` comes first: a static index (0x88 = 200, 0x8c = 400, ...), or a
                    // literal with the indexed name `:status`, its length, then three digits.
                    let status = match payload.first() {
                        Some(0x88) => 200,
                        Some(0x8c) => 400,
                        Some(0x8d) => 404,
                        _ => std::str::from_utf8(&payload[2..5])
                            .ok()
                            .and_then(|d| d.parse().ok())
                            .unwrap_or(0),
                    };
                    return H2Answer::Status(status);
                }
                RST_STREAM if stream == 1 => return H2Answer::Reset,
                GOAWAY => return H2Answer::GoAway,
                _ => {}
            }
        }
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return H2Answer::Closed,
            Ok(Ok(n)) => n,
            Err(_) => panic!("no answer to stream 1 within 10s"),
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A raw HTTP/1.1 upstream recording every request it reads, answering each `200` with an empty
/// body.
async fn recording_upstream() -> (RawUpstream, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let up = RawUpstream::answering(move |req| {
        s.lock().unwrap().push(req.to_owned());
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()
    })
    .await;
    (up, seen)
}

/// Whether a recorded request's target has a `.` or `..` segment.
fn target_has_dot_segment(request: &str) -> bool {
    let target = request.split(' ').nth(1).unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    path.split('/').any(|seg| seg == "." || seg == "..")
}

/// `path_prefix: /svc` with `prefix_rewrite: /v1/`: the client's `/svc../admin` has no
/// dot-segment (`svc..` is a plain segment), but the rewritten target would be `/v1/../admin`,
/// which the upstream resolves to `/admin`, out of `/v1/`.
#[tokio::test]
async fn a_prefix_rewrite_never_sends_a_dot_segment_upstream() {
    let (up, seen) = recording_upstream().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - match: {{ path_prefix: /svc }}\n    prefix_rewrite: /v1/\n    upstream: u\n",
        up.url()
    ))
    .await;
    let ok = raw(gw.addr, b"GET /svc/items HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let answer = raw(gw.addr, b"GET /svc../admin HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let seen = seen.lock().unwrap().clone();
    assert!(seen[0].starts_with("GET /v1//items "), "{seen:?}");
    assert!(!seen.iter().any(|r| target_has_dot_segment(r)), "{seen:?}");
}

/// RFC 9113 8.3.1: `:path` starts with `/` (or is `*` for OPTIONS). `:path: ?a=b` was routed as
/// `/` and sent upstream as `GET ?a=b HTTP/1.1`; over HTTP/1.1 the same target gets 400.
#[tokio::test]
async fn an_http2_path_not_starting_with_a_slash_is_refused_as_over_http1() {
    let (up, seen) = recording_upstream().await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let h1 = raw(gw.addr, b"GET ?a=b HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(h1.starts_with("HTTP/1.1 400"), "{h1}");
    let answer = h2_get(
        &gw,
        &[
            (":method", b"GET"),
            (":scheme", b"http"),
            (":authority", b"x"),
            (":path", b"?a=b"),
        ],
    )
    .await;
    assert!(seen.lock().unwrap().is_empty(), "{answer:?}");
    assert!(
        matches!(answer, H2Answer::Status(400) | H2Answer::Reset),
        "{answer:?}"
    );
}

/// RFC 9113 8.2.1: a field value must not start or end with a space or a tab. An HTTP/1.1
/// upstream drops that whitespace, so it would read another value than the one the gateway
/// matched routes on: refused.
#[tokio::test]
async fn http2_field_values_with_surrounding_whitespace_are_refused() {
    let (up, seen) = recording_upstream().await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    for (name, value) in [("x-a", &b" lead"[..]), ("x-b", &b"trail\t"[..])] {
        let answer = h2_get(
            &gw,
            &[
                (":method", b"GET"),
                (":scheme", b"http"),
                (":authority", b"x"),
                (":path", b"/ws"),
                (name, value),
            ],
        )
        .await;
        assert_eq!(answer, H2Answer::Status(400), "{name}");
    }
    let fine = h2_get(
        &gw,
        &[
            (":method", b"GET"),
            (":scheme", b"http"),
            (":authority", b"x"),
            (":path", b"/ws"),
            ("x-c", b"in side"),
        ],
    )
    .await;
    assert_eq!(fine, H2Answer::Status(200));
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// RFC 9112 3.2.4 and RFC 9113 8.3.1: the asterisk form is only for a server-wide `OPTIONS`.
#[tokio::test]
async fn the_asterisk_form_is_refused_for_methods_other_than_options() {
    let (up, seen) = recording_upstream().await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let options = raw(gw.addr, b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(options.starts_with("HTTP/1.1 200"), "{options}");
    let get = raw(gw.addr, b"GET * HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(get.starts_with("HTTP/1.1 400"), "{get}");
    let post = raw(
        gw.addr,
        b"POST * HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 400"), "{post}");
    let h2 = h2_get(
        &gw,
        &[
            (":method", b"GET"),
            (":scheme", b"http"),
            (":authority", b"x"),
            (":path", b"*"),
        ],
    )
    .await;
    assert!(
        matches!(h2, H2Answer::Status(400) | H2Answer::Reset),
        "{h2:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("OPTIONS * "), "{seen:?}");
}

/// RFC 9112 3.2.4: `OPTIONS http://host` (an empty path, no query) goes to the origin as
/// `OPTIONS *`; with a path it stays a request for that path.
#[tokio::test]
async fn an_absolute_form_options_without_a_path_goes_upstream_as_the_asterisk() {
    let (up, seen) = recording_upstream().await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let wide = raw(
        gw.addr,
        b"OPTIONS http://t.example:8080 HTTP/1.1\r\nhost: other\r\n\r\n",
    )
    .await;
    assert!(wide.starts_with("HTTP/1.1 200"), "{wide}");
    let one = raw(
        gw.addr,
        b"OPTIONS http://t.example:8080/ HTTP/1.1\r\nhost: other\r\n\r\n",
    )
    .await;
    assert!(one.starts_with("HTTP/1.1 200"), "{one}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].starts_with("OPTIONS * HTTP/1.1\r\n"), "{seen:?}");
    assert!(seen[1].starts_with("OPTIONS / HTTP/1.1\r\n"), "{seen:?}");
}

/// An absolute-form target with an empty path and a query (`GET http://t?x=1`, a valid
/// absolute-URI) names the path `/`: served, and sent upstream as `/?x=1` (as nginx does).
#[tokio::test]
async fn an_absolute_form_target_with_an_empty_path_and_a_query_is_sent_as_root() {
    let (up, seen) = recording_upstream().await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let answer = raw(gw.addr, b"GET http://t?x=1 HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = seen.lock().unwrap().clone();
    assert!(seen[0].starts_with("GET /?x=1 HTTP/1.1"), "{seen:?}");
}
