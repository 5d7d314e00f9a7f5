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

/// Removes hop-by-hop headers (RFC 9110 7.6.1): the fixed set and any named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in Connection (on any of its lines): rare, so the common path is one failed
    // lookup.
    let conn = h.get_all(header::CONNECTION);
    if conn.iter().next().is_some() {
        let named: Vec<HeaderName> = conn
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        if h.contains_key(n) {
            h.remove(n);
        }
    }
}

/// Adds `x-forwarded-for` (appending the peer to all the lines received, joined into one),
/// `x-forwarded-proto` and `x-request-id` (kept when the client sent one, generated otherwise).
pub fn add_forwarded(h: &mut HeaderMap, peer_ip: &HeaderValue, proto: &HeaderValue) {
    let all = h.get_all(&X_FORWARDED_FOR);
    match all.iter().next() {
        Some(_) => {
            let len: usize = all.iter().map(|v| v.len() + 2).sum();
            let mut b = BytesMut::with_capacity(len + peer_ip.len());
            for prev in all.iter() {
                b.put_slice(prev.as_bytes());
                b.put_slice(b", ");
            }
            b.put_slice(peer_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_maybe_shared(b.freeze()) {
                h.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        None => {
            h.insert(X_FORWARDED_FOR.clone(), peer_ip.clone());
        }
    }
    h.insert(X_FORWARDED_PROTO.clone(), proto.clone());
    if !h.contains_key(&X_REQUEST_ID) {
        h.insert(X_REQUEST_ID.clone(), new_request_id());
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

/// Sum of the request head's header bytes (names, values and the `: ` and CRLF per line).
pub fn head_size(h: &HeaderMap, uri_len: usize) -> usize {
    h.iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + uri_len
}

#[cfg(test)]
mod tests {
    use super::*;

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
