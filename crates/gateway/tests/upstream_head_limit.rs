//! The 64 KiB limit on an upstream's response head holds for every request, a streamed upload's
//! included (those go through hyper's HTTP/1.1 client, not the gateway's own).
mod support;

use support::*;

/// A route to `url` whose requests with a body over 1 KiB stream upstream (not buffered for a
/// retry): those go through the upstream client for streamed bodies (hyper's), the others through
/// the gateway's own HTTP/1.1 client.
fn streaming_config(url: &str) -> String {
    format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n    retry_buffer: 1KiB\n"
    )
}

/// A response head of about `kib` KiB: one `x-filler` field, so the 100-field limit is not what
/// refuses it.
fn big_head(kib: usize) -> Vec<u8> {
    let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
    r.extend_from_slice(format!("x-filler: {}\r\n", "v".repeat(kib * 1024)).as_bytes());
    r.extend_from_slice(b"content-length: 2\r\n\r\nok");
    r
}

/// The request and body a client sends: `body_len` bytes, with a `content-length`.
fn post(body_len: usize) -> Vec<u8> {
    let mut req =
        format!("POST /up HTTP/1.1\r\nHost: x\r\ncontent-length: {body_len}\r\n\r\n").into_bytes();
    req.resize(req.len() + body_len, b'b');
    req
}

/// docs/gateway.md ("Upstream connections (HTTP/1.1)"): "a head over 64 KiB ... is an upstream
/// error (502)". The gateway's own client enforces it (`upstream::h1::MAX_HEAD`), but a request
/// whose body streams (larger than `retry_buffer`, or chunked without retries) goes through
/// hyper's client (`Pool::send_streamed`), built with hyper's defaults: its head limit is its read
/// buffer's, about 400 KiB (8 KiB + 100 x 4 KiB). So a 300 KiB head, refused for a GET, is
/// accepted for an upload, and each such upstream connection may hold six times the documented
/// head buffer. Fails while `send_streamed` does not set `max_buf_size` (or check the head).
#[tokio::test]
async fn a_response_head_over_64kib_is_a_502_for_a_streamed_upload_too() {
    let up = RawUpstream::answering(|_| big_head(300)).await;
    let gw = Gateway::start(&streaming_config(&up.url())).await;

    // The gateway's own client: a GET (no body) gets the documented 502.
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 502, "a GET's 300 KiB response head");

    // A body over retry_buffer streams: the same head must get the same answer.
    let mut c = RawClient::connect(&gw).await;
    c.send(&post(4096)).await;
    let r = c.response(false).await;
    assert_eq!(
        r.status, 502,
        "a streamed upload's 300 KiB response head was accepted (the documented limit is 64 KiB)"
    );
    gw.stop().await;
}
