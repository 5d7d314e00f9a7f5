//! Admission before the attempt loop: a route's rate limit per client (`client_rate_limit`), and
//! the gateway's limit on requests forwarded at once with its priority queue (`admission`).
//!
//! One token bucket (the library's GCRA, [`KeyedRateLimiter`]) per client, where a client is the
//! connection's address or the value of a request header (an API key, a tenant id). The map of
//! clients is bounded (`max_keys`): beyond it, idle clients are forgotten once their bucket has
//! refilled, and new ones that find no room share one bucket, so a flood of made-up keys cannot
//! grow memory (but while the map is full of live clients, new real clients share that one
//! bucket with the flood).
//!
//! Keys are kept as 64-bit hashes (SipHash with a random key per limiter), not as the values
//! themselves: an API key is never stored, each client costs the same small entry whatever its
//! header's length, and nobody outside can aim two keys at one bucket. Two clients share a bucket
//! only on a 64-bit collision. No per-client value ever reaches a metric label or a log line.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use bulwark::rate_limit::KeyedRateLimiter;
use http::{HeaderMap, HeaderName, HeaderValue};

use bulwark::shed::{Priority, ShedPermit, Shedder};
use tokio::time::Instant;

use crate::config::{self, ClientKey, RoutePriority};
use crate::policy::{forward, refused, Events, Refused};

/// A route's rate limit per client.
#[derive(Clone)]
pub struct ClientLimit {
    limiter: KeyedRateLimiter<u64>,
    key: Option<HeaderName>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for ClientLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLimit")
            .field("key", &self.key)
            .field("clients", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

/// Why [`ClientLimit::check`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client's bucket is empty: the next token comes after this long.
    Limited(Duration),
    /// The key header came with different values.
    AmbiguousKey,
}

impl ClientLimit {
    /// Builds the limiter of a `client_rate_limit` section (enabled, `per_second` > 0 checked).
    pub fn new(c: &config::ClientRateLimit) -> Result<ClientLimit, Refused> {
        let section = ["client_rate_limit"];
        let (n, per) = crate::policy::rate(c.per_second);
        let limiter = KeyedRateLimiter::builder()
            .rate(n, per)
            .burst(crate::policy::burst(c.burst, c.per_second))
            .max_keys(c.max_keys)
            // A client may be forgotten once its bucket is full again (the library's default
            // keeps it 5 minutes, sending new clients to the shared bucket meanwhile).
            .idle_timeout(crate::policy::refill(c.burst, c.per_second))
            .build()
            .map_err(|e| refused(&section, e))?;
        let key = match &c.key {
            ClientKey::ClientIp => None,
            ClientKey::Header(h) => {
                Some(HeaderName::from_bytes(h.as_bytes()).map_err(|e| Refused {
                    path: vec!["client_rate_limit", "key"],
                    reason: e.to_string(),
                })?)
            }
        };
        Ok(ClientLimit {
            limiter,
            key,
            hasher: Default::default(),
        })
    }

    /// Takes one token from the bucket of the client that sent `headers` over a connection from
    /// `peer_ip`. A request without the key header (or with only empty ones) is not limited, as
    /// nginx and Envoy do. The header's value is taken without surrounding whitespace (which an
    /// upstream's parser drops too); a header given several times with different values is
    /// refused ([`Refusal::AmbiguousKey`]): an upstream would read one of them, and the others
    /// would pick fresh buckets at will.
    /// An IPv6 client is keyed by its /64, the block one host usually has to itself, so that it
    /// cannot take a fresh bucket per address.
    /// A `host` key is the host in any case (RFC 9110 4.2.3: one host to the upstream, not a fresh
    /// bucket per spelling), and an HTTP/2 request's `:authority` (`uri`'s) when it has no `host`
    /// field, as routes read it.
    pub fn check(
        &self,
        peer_ip: &HeaderValue,
        headers: &HeaderMap,
        uri: &http::Uri,
    ) -> Result<(), Refusal> {
        let mut hasher = self.hasher.build_hasher();
        match &self.key {
            None => hash_client_ip(&mut hasher, peer_ip),
            Some(h) => {
                let host = *h == http::header::HOST;
                let mut values = headers
                    .get_all(h)
                    .iter()
                    .map(|v| v.as_bytes().trim_ascii())
                    .filter(|v| !v.is_empty());
                let key = match values.next() {
                    Some(key) => key,
                    None => match uri.authority().filter(|_| host) {
                        Some(a) => a.as_str().as_bytes(),
                        None => return Ok(()),
                    },
                };
                if values.any(|v| !(v == key || host && v.eq_ignore_ascii_case(key))) {
                    return Err(Refusal::AmbiguousKey);
                }
                if host {
                    key.iter()
                        .for_each(|b| hasher.write_u8(b.to_ascii_lowercase()));
                } else {
                    hasher.write(key);
                }
            }
        }
        self.limiter
            .check(&hasher.finish())
            .map_err(|e| Refusal::Limited(e.retry_after().unwrap_or(Duration::from_secs(1))))
    }

    /// Clients remembered now.
    pub fn clients(&self) -> usize {
        self.limiter.len()
    }
}

/// Feeds the client address's key to `hasher`: an IPv4 address (also one mapped into IPv6) whole,
/// an IPv6 address by its first 64 bits.
fn hash_client_ip(hasher: &mut impl Hasher, peer_ip: &HeaderValue) {
    let ip = peer_ip
        .to_str()
        .ok()
        .and_then(|s| s.parse::<std::net::IpAddr>().ok())
        .map(|ip| ip.to_canonical());
    match ip {
        Some(std::net::IpAddr::V4(v4)) => hasher.write(&v4.octets()),
        Some(std::net::IpAddr::V6(v6)) => {
            hasher.write_u8(6);
            hasher.write(&v6.octets()[..8]);
        }
        None => hasher.write(peer_ip.as_bytes()),
    }
}

/// The library's shedder for an `admission` section (enabled, `max_concurrent` >= 1 checked),
/// reporting `Event::Shed` to `events`.
fn build_shedder(a: &config::Admission, events: &Events) -> Result<Shedder, Refused> {
    let mut b = Shedder::builder()
        .name("admission")
        .max_concurrent(a.max_concurrent)
        .queue_timeout(a.queue_timeout.get());
    if let Some(q) = a.max_queued {
        b = b.max_queued(q);
    }
    if let Some(l) = events {
        b = b.listener(forward(l.clone()));
    }
    b.build().map_err(|e| refused(&["admission"], e))
}

/// The gateway's admission queue: at most `max_concurrent` requests forwarded at once, the others
/// waiting by priority (the route's, or lower when the client asks through `priority_header`).
#[derive(Debug, Clone)]
pub struct Admission {
    shedder: Shedder,
    header: Option<HeaderName>,
    /// Held by every runtime that uses this queue: while one is alive, a request that loaded it
    /// may still take a slot (see [`Admission::in_use`]).
    users: std::sync::Arc<()>,
}

impl Admission {
    /// From an enabled, validated `admission` section.
    pub fn new(a: &config::Admission, events: &Events) -> Result<Admission, Refused> {
        let header = match &a.priority_header {
            Some(h) => Some(HeaderName::from_bytes(h.as_bytes()).map_err(|_| Refused {
                path: vec!["admission", "priority_header"],
                reason: format!("invalid header name `{h}`"),
            })?),
            None => None,
        };
        Ok(Admission {
            shedder: build_shedder(a, events)?,
            header,
            users: std::sync::Arc::default(),
        })
    }

    /// Whether a runtime using this queue is still alive, from a [`Admission::users`] handle.
    pub(crate) fn in_use(users: &std::sync::Weak<()>) -> bool {
        users.strong_count() > 0
    }

    /// A handle that tells (through [`Admission::in_use`]) whether a runtime using this queue
    /// is still alive.
    pub(crate) fn users(&self) -> std::sync::Weak<()> {
        std::sync::Arc::downgrade(&self.users)
    }

    /// The priority of a request on a route of priority `route`: the route's, or the one the
    /// request's `priority_header` names when that is lower. A client can make its requests less
    /// important (a batch job), never more.
    pub fn priority(&self, route: RoutePriority, headers: &HeaderMap) -> Priority {
        let route = route.level();
        let asked = self
            .header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Priority::from_name(v.trim()));
        match asked {
            Some(p) if p < route => p,
            _ => route,
        }
    }

    /// A slot for a request of `priority`, waiting no later than `deadline`.
    pub async fn admit(&self, priority: Priority, deadline: Instant) -> Option<ShedPermit> {
        if let Some(p) = self.shedder.try_acquire() {
            return Some(p);
        }
        // The route's deadline ends the wait as a timeout (504), not as a shed request: it leaves
        // the queue without the library's shed event (and wins a tie with `queue_timeout`).
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => None,
            r = self.shedder.acquire(priority) => r.ok(),
        }
    }

    /// The library's shedder (its queue and counts).
    pub fn shedder(&self) -> &Shedder {
        &self.shedder
    }
}

#[cfg(test)]
mod tests {
    /// A request target without authority (the key header, when there is one, is in `headers`).
    fn root() -> http::Uri {
        http::Uri::from_static("/")
    }

    use super::*;

    fn limit(yaml: &str) -> ClientLimit {
        let c: config::ClientRateLimit = serde_norway::from_str(yaml).unwrap();
        ClientLimit::new(&c).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn each_client_has_its_own_bucket() {
        let l = limit("{ per_second: 2, burst: 2 }");
        let (a, b) = (
            HeaderValue::from_static("10.0.0.1"),
            HeaderValue::from_static("10.0.0.2"),
        );
        let h = HeaderMap::new();
        assert!(l.check(&a, &h, &root()).is_ok());
        assert!(l.check(&a, &h, &root()).is_ok());
        assert_eq!(
            l.check(&a, &h, &root()),
            Err(Refusal::Limited(Duration::from_millis(500)))
        );
        assert!(l.check(&b, &h, &root()).is_ok(), "another client");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.check(&a, &h, &root()).is_ok(), "refilled one token");
        assert!(l.check(&a, &h, &root()).is_err());
        assert_eq!(l.clients(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_key_ignores_the_address_and_skips_requests_without_it() {
        let l = limit("{ per_second: 1, burst: 1, key: 'header:X-Api-Key' }");
        let ip = HeaderValue::from_static("10.0.0.1");
        let other_ip = HeaderValue::from_static("10.0.0.2");
        let mut alice = HeaderMap::new();
        alice.insert("x-api-key", HeaderValue::from_static("alice"));
        assert!(l.check(&ip, &alice, &root()).is_ok());
        assert_eq!(
            l.check(&other_ip, &alice, &root()),
            Err(Refusal::Limited(Duration::from_secs(1)))
        );
        let mut bob = HeaderMap::new();
        bob.insert("x-api-key", HeaderValue::from_static("bob"));
        assert!(l.check(&ip, &bob, &root()).is_ok());
        let none = HeaderMap::new();
        let mut empty = HeaderMap::new();
        empty.insert("x-api-key", HeaderValue::from_static(""));
        for _ in 0..5 {
            assert!(l.check(&ip, &none, &root()).is_ok());
            assert!(l.check(&ip, &empty, &root()).is_ok());
        }
        assert_eq!(l.clients(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_or_padded_headers_cannot_pick_a_bucket_and_ipv6_clients_count_by_their_64() {
        let l = limit("{ per_second: 1, burst: 1, key: 'header:x-api-key' }");
        let ip = HeaderValue::from_static("10.0.0.1");
        let mut alice = HeaderMap::new();
        alice.insert("x-api-key", HeaderValue::from_static("alice"));
        assert!(l.check(&ip, &alice, &root()).is_ok());
        // An empty first value does not hide the second: this is alice's (empty) bucket.
        let mut sneaky = HeaderMap::new();
        sneaky.append("x-api-key", HeaderValue::from_static(""));
        sneaky.append("x-api-key", HeaderValue::from_static("alice"));
        assert!(l.check(&ip, &sneaky, &root()).is_err());
        // Two different values: refused (an upstream reads one, the other would pick a bucket).
        let mut two = HeaderMap::new();
        two.append("x-api-key", HeaderValue::from_static("alice"));
        two.append("x-api-key", HeaderValue::from_static("nonce-1"));
        assert_eq!(l.check(&ip, &two, &root()), Err(Refusal::AmbiguousKey));
        // The same value twice, or with whitespace around it, is alice's (empty) bucket.
        let mut again = HeaderMap::new();
        again.append("x-api-key", HeaderValue::from_static("alice"));
        again.append("x-api-key", HeaderValue::from_static(" alice "));
        assert!(matches!(
            l.check(&ip, &again, &root()),
            Err(Refusal::Limited(_))
        ));
        let mut spaced = HeaderMap::new();
        spaced.insert("x-api-key", HeaderValue::from_static("alice  "));
        assert!(matches!(
            l.check(&ip, &spaced, &root()),
            Err(Refusal::Limited(_))
        ));

        let l = limit("{ per_second: 1, burst: 1 }");
        let h = HeaderMap::new();
        let a = HeaderValue::from_static("2001:db8:1:2::1");
        let same_64 = HeaderValue::from_static("2001:db8:1:2:ffff::7");
        let other_64 = HeaderValue::from_static("2001:db8:1:3::1");
        assert!(l.check(&a, &h, &root()).is_ok());
        assert!(
            l.check(&same_64, &h, &root()).is_err(),
            "one /64, one bucket"
        );
        assert!(l.check(&other_64, &h, &root()).is_ok());
        let v4 = HeaderValue::from_static("192.0.2.7");
        let mapped = HeaderValue::from_static("::ffff:192.0.2.7");
        assert!(l.check(&v4, &h, &root()).is_ok());
        assert!(
            l.check(&mapped, &h, &root()).is_err(),
            "an IPv4-mapped address is the IPv4 one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fractional_rate_is_exact() {
        let l = limit("{ per_second: 0.5, burst: 1 }");
        let ip = HeaderValue::from_static("10.0.0.1");
        let h = HeaderMap::new();
        assert!(l.check(&ip, &h, &root()).is_ok());
        assert_eq!(
            l.check(&ip, &h, &root()),
            Err(Refusal::Limited(Duration::from_secs(2)))
        );
    }
}
