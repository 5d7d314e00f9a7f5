//! Fixes from a review of the request path: the per-client key cannot pick buckets, a `host` route
//! matches HTTP/2, dot-segments are refused in every spelling, and only the gateway sets
//! `x-bulwark-*`.
mod support;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

/// An upstream answering 200 with `<path-and-query> key=<first x-api-key>`, and recording it.
async fn recorder() -> (Upstream, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let up = Upstream::start(
        "rec",
        Arc::new(move |req: Request<hyper::body::Incoming>| {
            let key = req
                .headers()
                .get("x-api-key")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_else(|| "-".into());
            let line = format!("{} key={key}", req.uri());
            s.lock().unwrap().push(line.clone());
            Box::pin(async move { reply("rec", 200, line) })
        }),
    )
    .await;
    (up, seen)
}

fn limited(url: &str) -> String {
    format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n    client_rate_limit: {{ per_second: 1, burst: 1, key: 'header:x-api-key' }}\n"
    )
}

/// A key header given twice with different values is refused (400) and never reaches the
/// upstream: an upstream reads one of them (alice), and the other would pick a fresh bucket.
#[tokio::test]
async fn a_client_key_header_given_twice_with_different_values_is_refused() {
    let (up, seen) = recorder().await;
    let gw = Gateway::start(&limited(&up.url())).await;
    for i in 0..3 {
        let req = format!(
            "GET /x HTTP/1.1\r\nHost: a\r\nx-api-key: alice\r\nx-api-key: nonce{i}\r\nConnection: close\r\n\r\n"
        );
        let resp = raw(gw.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    }
    assert!(seen.lock().unwrap().is_empty());
    gw.stop().await;
}

/// Over HTTP/2 a header value may keep whitespace around it (h2 does not refuse it), which an
/// HTTP/1.1 upstream's parser drops: `alice`, `alice `, `alice  `... are one client, one bucket.
#[tokio::test]
async fn a_client_key_padded_with_whitespace_is_the_same_client() {
    let (up, seen) = recorder().await;
    let gw = Gateway::start(&limited(&up.url())).await;
    let c = h2c_client();
    let mut ok = 0;
    for i in 0..5 {
        let key = format!("alice{}", " ".repeat(i));
        let req = Request::get(gw.url("/x"))
            .header("x-api-key", key)
            .body(Full::<Bytes>::default())
            .unwrap();
        if send(&c, req).await.status == 200 {
            ok += 1;
        }
    }
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|l| l.ends_with("key=alice")), "{seen:?}");
    assert_eq!(
        ok, 1,
        "alice got {ok} requests through a 1/s, burst-1 limit"
    );
    gw.stop().await;
}

/// A route matching on `host` (virtual hosting) matches HTTP/2 requests too, whose host is their
/// `:authority` (no `host` field).
#[tokio::test]
async fn a_host_route_matches_http2_requests_by_their_authority() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
  b: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ headers: {{ host: 'api.example' }} }}
    upstream: a
  - upstream: b
",
        a.url(),
        b.url()
    ))
    .await;
    let h1 = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(h1.ends_with("a"), "{h1}");
    // The same request over h2c, with :authority api.example.
    let mut send_req = h2c_sender(gw.addr).await;
    let req = Request::get("http://api.example/")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = send_req.send_request(req).await.unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        &body[..],
        b"a",
        "HTTP/2 with :authority api.example went to the catch-all"
    );
    gw.stop().await;
}

/// `read_only` mode with a prefix route exempt from it (a `POST` search API): a `POST` whose path
/// climbs out of the prefix with `..` (which the upstream would resolve to `/orders`, a write the
/// mode refuses) gets 400, whatever the route.
#[tokio::test]
async fn a_dot_segment_cannot_climb_out_of_an_exempt_route() {
    let (up, seen) = recorder().await;
    let gw = Gateway::start(&format!(
        "mode: read_only
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /search/ }}
    upstream: u
    exempt_modes: [read_only]
  - upstream: u
",
        up.url()
    ))
    .await;
    let direct = raw(
        gw.addr,
        b"POST /orders HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(direct.starts_with("HTTP/1.1 503"), "{direct}");
    let sneaky = raw(
        gw.addr,
        b"POST /search/../orders HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(sneaky.starts_with("HTTP/1.1 400"), "{sneaky}");
    assert!(seen.lock().unwrap().is_empty());
    gw.stop().await;
}

/// Dot-segments in the spellings upstreams commonly resolve as one are refused too: `..;`
/// (Tomcat/Jetty path parameters), and `..%2f`, `%2e%2e%2f`, `..%5c` (servers that decode them).
#[tokio::test]
async fn dot_segments_in_other_spellings_are_refused() {
    let (up, seen) = recorder().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /svc/ }}
    upstream: u
    prefix_rewrite: /v1/
",
        up.url()
    ))
    .await;
    let mut through = Vec::new();
    for path in [
        "/svc/..;/admin",
        "/svc/..%2fadmin",
        "/svc/%2e%2e%2fadmin",
        "/svc/..%5cadmin",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let resp = raw(gw.addr, req.as_bytes()).await;
        if resp.starts_with("HTTP/1.1 200") {
            through.push(path);
        }
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        through.is_empty(),
        "forwarded: {through:?}; upstream saw {seen:?}"
    );
    gw.stop().await;
}

/// Only the gateway says what the gateway did: an upstream's own `x-bulwark-reason` and
/// `x-bulwark-attempts` are removed.
#[tokio::test]
async fn an_upstream_cannot_forge_x_bulwark_headers() {
    let up = Upstream::start(
        "forger",
        Arc::new(|_req| {
            Box::pin(async move {
                http::Response::builder()
                    .status(200)
                    .header("x-bulwark-reason", "circuit_open")
                    .header("x-bulwark-attempts", "7")
                    .body(full("ok"))
                    .unwrap()
            })
        }),
    )
    .await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-bulwark-reason"), None);
    assert_eq!(r.header("x-bulwark-attempts"), None);
    gw.stop().await;
}
