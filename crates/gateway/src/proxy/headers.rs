//! Header rewriting: hop-by-hop removal and the `x-forwarded-*` / `x-request-id` headers.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `idempotency-key`.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The fixed hop-by-hop set (RFC 9110 7.6.1, plus `keep-alive` and `proxy-connection`), as a bit per
/// name so one pass over the map finds which are present.
fn hop_by_hop_bit(name: &HeaderName) -> u16 {
    // A match on the lowercase name: a length switch and a short compare, no hashing.
    match name.as_str() {
        "connection" => 1,
        "keep-alive" => 1 << 1,
        "proxy-connection" => 1 << 2,
        "proxy-authenticate" => 1 << 3,
        "proxy-authorization" => 1 << 4,
        "te" => 1 << 5,
        "trailer" => 1 << 6,
        "transfer-encoding" => 1 << 7,
        "upgrade" => 1 << 8,
        // Not hop-by-hop, but the gateway's own: neither a client nor an upstream may say what the
        // gateway did.
        "x-bulwark-reason" => 1 << 9,
        "x-bulwark-attempts" => 1 << 10,
        // Not hop-by-hop either: the gateway answers a client's `100-continue` itself (HTTP/1.1)
        // and sends the body upstream without waiting for one, as Envoy does (and strips it).
        "expect" => 1 << 11,
        _ => 0,
    }
}

fn hop_by_hop_name(bit: u32) -> &'static HeaderName {
    match bit {
        0 => &header::CONNECTION,
        1 => &KEEP_ALIVE,
        2 => &PROXY_CONNECTION,
        3 => &header::PROXY_AUTHENTICATE,
        4 => &header::PROXY_AUTHORIZATION,
        5 => &header::TE,
        6 => &header::TRAILER,
        7 => &header::TRANSFER_ENCODING,
        8 => &header::UPGRADE,
        9 => &super::respond::X_BULWARK_REASON,
        10 => &super::respond::X_BULWARK_ATTEMPTS,
        _ => &header::EXPECT,
    }
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1): the fixed set and any named in `Connection`; the
/// gateway's own `x-bulwark-reason` and `x-bulwark-attempts`, which only the gateway sets; and
/// `expect`, which the gateway answers.
///
/// Runs twice per proxied request (request and response), so it is built for the common cases: one
/// pass over the (few) entries finds the hop-by-hop names present, without hashing; a map without any
/// (most requests) is left untouched; `Connection: keep-alive` (most upstream responses) costs one
/// lookup per listed token and one removal, and allocates nothing.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let present = h.keys().fold(0u16, |acc, name| acc | hop_by_hop_bit(name));
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Headers named in Connection. Copy the values out (a reference-count increment each) so the
        // map can be changed while reading them; a second Connection line is rare and the only case
        // that allocates.
        let mut values = h.get_all(header::CONNECTION).iter();
        let first = values.next().cloned();
        let rest: Vec<HeaderValue> = values.cloned().collect();
        for v in first.iter().chain(rest.iter()) {
            for token in v.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                // `&str` lookups lowercase into a stack buffer: no `HeaderName` is allocated.
                if let Ok(name) = std::str::from_utf8(token) {
                    if !name.is_empty() && h.contains_key(name) {
                        h.remove(name);
                    }
                }
            }
        }
    }
    let mut bits = u32::from(present);
    while bits != 0 {
        let i = bits.trailing_zeros();
        bits &= bits - 1;
        h.remove(hop_by_hop_name(i));
    }
}

/// Whether an HTTP/2 request carries `te: trailers`, the one `te` HTTP/2 allows (RFC 9113 8.2.2)
/// and the one gRPC servers require: [`strip_hop_by_hop`] removes it with the other hop-by-hop
/// fields, and the caller puts it back for HTTP/2 upstreams.
/// Trailer fields that are not passed on (RFC 9110 6.5.1, 6.5.2): those that frame or route the
/// message, hop-by-hop ones, and those that change how its content is read. A client that merged
/// such a trailer into the head (some do) would read the message differently from the gateway.
/// Anything else (gRPC's `grpc-status`, checksums, timing) passes.
const FORBIDDEN_TRAILERS: [&str; 14] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "content-encoding",
    "content-type",
    "content-range",
];

/// Removes the `FORBIDDEN_TRAILERS` from `trailers`. Every upstream response body
/// (`RespBody`) and every HTTP/2 client's request body (`ClientBody`) does it, whatever protocol
/// brought the trailers and whichever takes them on (an HTTP/1.1 client's request trailers are
/// dropped whole).
pub fn strip_forbidden_trailers(trailers: &mut HeaderMap) {
    for name in FORBIDDEN_TRAILERS {
        trailers.remove(name);
    }
}

pub fn keep_te_trailers(h: &HeaderMap) -> bool {
    let mut all = h.get_all(header::TE).iter();
    matches!((all.next(), all.next()), (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers"))
}

/// Joins the `cookie` fields of an HTTP/2 request into one, separated by `; `. HTTP/2 clients split
/// them (browsers do, so that HPACK can index each cookie); HTTP/1.1 allows one `Cookie` line, and
/// RFC 9113 8.2.3 says they must be joined before the request goes to anything but HTTP/2. Joined
/// for any upstream: an HTTP/2 one takes either form. One lookup when there is at most one.
pub fn join_cookies(h: &mut HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in h.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    // The parts were valid field values and `; ` is too: this cannot fail.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// Adds `x-forwarded-for` (appending the peer to all the lines received, joined into one),
/// `x-forwarded-proto` and `x-request-id` (kept when the client sent one, generated otherwise).
pub fn add_forwarded(h: &mut HeaderMap, peer_ip: &HeaderValue, proto: &HeaderValue) {
    // Up to four inserts follow (these three and the upstream's `Host`): grow the map once, not
    // once per insert.
    h.reserve(4);
    let all = h.get_all(&X_FORWARDED_FOR);
    if all.iter().next().is_some() {
        // Every line the client sent, joined, then the peer.
        let len: usize = all.iter().map(|v| v.len() + 2).sum();
        let mut b = BytesMut::with_capacity(len + peer_ip.len());
        for prev in all.iter() {
            b.put_slice(prev.as_bytes());
            b.put_slice(b", ");
        }
        b.put_slice(peer_ip.as_bytes());
        if let Ok(v) = HeaderValue::from_maybe_shared(b.freeze()) {
            h.insert(&X_FORWARDED_FOR, v);
        }
    } else {
        h.insert(&X_FORWARDED_FOR, peer_ip.clone());
    }
    h.insert(&X_FORWARDED_PROTO, proto.clone());
    match h.entry(&X_REQUEST_ID) {
        header::Entry::Vacant(e) => {
            e.insert(new_request_id());
        }
        // Kept when the client sent one id; an empty one, or several (which would name different
        // requests to different readers), is replaced by one of ours.
        header::Entry::Occupied(mut e) => {
            if e.get().is_empty() || e.iter().nth(1).is_some() {
                e.insert(new_request_id());
            }
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static ID_PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// A request id unique to this process run: a random 64-bit prefix and a counter, in hex.
pub fn new_request_id() -> HeaderValue {
    let prefix = *ID_PREFIX.get_or_init(|| fastrand::u64(..));
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 33];
    hex(prefix, &mut buf[..16]);
    buf[16] = b'-';
    hex(n, &mut buf[17..]);
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn hex(mut v: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// Size of the request head as HTTP/1.1 writes it: the request line (`METHOD SP target SP
/// HTTP/1.1 CRLF`), each header line (name, `: `, value, CRLF) and the blank line. For an HTTP/2
/// request (no request line on the wire) it counts the same, a few bytes more than its headers.
pub fn head_size(method: &http::Method, target_len: usize, h: &HeaderMap) -> usize {
    const REQUEST_LINE: usize = " ".len() + " HTTP/1.1\r\n".len();
    const BLANK_LINE: usize = "\r\n".len();
    let lines: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    method.as_str().len() + target_len + REQUEST_LINE + lines + BLANK_LINE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_size_is_the_http1_head_length() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc"));
        let wire = "GET /a/b?c=1 HTTP/1.1\r\nhost: example.com\r\nx-request-id: abc\r\n\r\n";
        assert_eq!(
            head_size(&http::Method::GET, "/a/b?c=1".len(), &h),
            wire.len()
        );
    }

    #[test]
    fn a_client_request_id_is_kept_when_it_is_one_and_not_empty() {
        let (ip, proto) = (
            HeaderValue::from_static("127.0.0.1"),
            HeaderValue::from_static("http"),
        );
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc"));
        add_forwarded(&mut h, &ip, &proto);
        assert_eq!(h[&X_REQUEST_ID], "abc");
        for values in [&[""][..], &["abc", "def"][..]] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(&X_REQUEST_ID, HeaderValue::from_static(v));
            }
            add_forwarded(&mut h, &ip, &proto);
            let ids: Vec<_> = h.get_all(&X_REQUEST_ID).iter().collect();
            assert_eq!(ids.len(), 1, "{values:?}");
            assert!(ids[0].len() > 8 && !values.contains(&ids[0].to_str().unwrap()));
        }
    }

    #[test]
    fn hop_by_hop_removed_including_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn connection_tokens_every_line_any_case() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" X-One ,, x-two"),
        );
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        // Nothing hop-by-hop: untouched.
        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn forwarded_headers() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            &HeaderValue::from_static("http"),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        let id = h[&X_REQUEST_ID].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 33);
        let mut h2 = HeaderMap::new();
        h2.insert(&X_REQUEST_ID, HeaderValue::from_static("abc"));
        add_forwarded(
            &mut h2,
            &HeaderValue::from_static("::1"),
            &HeaderValue::from_static("https"),
        );
        assert_eq!(h2[&X_REQUEST_ID], "abc");
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn every_connection_line_and_every_forwarded_for_line_counts() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("X-Secret, x-other"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));

        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        add_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            &HeaderValue::from_static("http"),
        );
        let xff: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(xff, ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]);
    }
}
