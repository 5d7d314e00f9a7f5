//! Header fixes from review: every `Connection` line names hop-by-hop headers, and every
//! `x-forwarded-for` line is kept.
mod support;

use std::sync::{Arc, Mutex};

use support::*;

#[tokio::test]
async fn several_connection_and_forwarded_for_lines() {
    let seen = Arc::new(Mutex::new(Vec::<http::HeaderMap>::new()));
    let s = seen.clone();
    let up = Upstream::start(
        "u",
        Arc::new(move |req| {
            s.lock().unwrap().push(req.headers().clone());
            Box::pin(async move { reply("u", 200, "ok") })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
",
        up.url()
    ))
    .await;
    let resp = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nConnection: x-secret\r\n\
          x-secret: 1\r\nx-forwarded-for: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let h = seen.lock().unwrap().pop().unwrap();
    assert!(!h.contains_key("x-secret"), "{h:?}");
    assert!(!h.contains_key("connection"), "{h:?}");
    let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["10.0.0.1, 10.0.0.2, 127.0.0.1"]);
    gw.stop().await;
}

/// An HTTP/2 client's `cookie` fields (browsers send one per cookie) reach an HTTP/1.1 upstream as
/// one `Cookie` line joined with `; ` (RFC 9113 8.2.3); one field goes through as it is, and an
/// HTTP/1.1 client's request is not touched. Its `te: trailers` does not reach an HTTP/1.1 upstream.
#[tokio::test]
async fn http2_cookie_fields_are_joined_for_an_http1_upstream() {
    let (tx, mut heads) = tokio::sync::mpsc::unbounded_channel();
    let up = RawUpstream::answering(move |head| {
        let _ = tx.send(head.to_ascii_lowercase());
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
    })
    .await;
    let gw = Gateway::start(&one_route(&up.url(), "")).await;
    let cookies = |head: &str| -> Vec<String> {
        head.lines()
            .filter_map(|l| l.strip_prefix("cookie: ").map(str::to_owned))
            .collect()
    };
    let h2 = h2c_client();
    let req = |values: &[&str]| {
        let mut b = http::Request::get(gw.url("/"));
        for v in values {
            b = b.header("cookie", *v);
        }
        b.body(Default::default()).unwrap()
    };
    assert_eq!(send(&h2, req(&["a=1", "b=2", "c=3"])).await.status, 200);
    assert_eq!(cookies(&heads.recv().await.unwrap()), ["a=1; b=2; c=3"]);
    assert_eq!(send(&h2, req(&["a=1; b=2"])).await.status, 200);
    assert_eq!(cookies(&heads.recv().await.unwrap()), ["a=1; b=2"]);
    assert_eq!(send(&h2, req(&[])).await.status, 200);
    assert!(cookies(&heads.recv().await.unwrap()).is_empty());
    // `te: trailers`, kept for HTTP/2 upstreams (gRPC), is hop-by-hop to an HTTP/1.1 one.
    for size in [1, 200 * 1024] {
        // A small body goes out with the kept head, one over `retry_buffer` streams in a request
        // of its own.
        let te = http::Request::post(gw.url("/"))
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                b'x';
                size
            ])))
            .unwrap();
        assert_eq!(send(&h2, te).await.status, 200);
        let head = heads.recv().await.unwrap();
        assert!(!head.contains("\nte:"), "{head}");
    }
    let r = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: gw\r\nCookie: a=1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(cookies(&heads.recv().await.unwrap()), ["a=1"]);
    gw.stop().await;
}

/// An upstream that records each request's headers (by path) and answers `status` (200 to its
/// health checks, at `/health`).
async fn recording(
    name: &str,
    status: u16,
) -> (
    Upstream,
    tokio::sync::mpsc::UnboundedReceiver<(String, http::HeaderMap)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let n = name.to_owned();
    let up = Upstream::start(
        name,
        Arc::new(move |req: http::Request<hyper::body::Incoming>| {
            let path = req.uri().path().to_owned();
            let status = if path == "/health" { 200 } else { status };
            let _ = tx.send((path, req.headers().clone()));
            let n = n.clone();
            Box::pin(async move {
                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                reply(&n, status, "")
            })
        }),
    )
    .await;
    (up, rx)
}

/// `request_headers` per upstream: in a failover chain each upstream gets its own credentials and
/// never another's, over the kept-head path (a small body), a streamed body and HTTP/2; a value
/// may come from the environment; health checks carry the headers too.
#[tokio::test]
async fn each_upstream_of_a_chain_gets_its_own_request_headers() {
    let (a, mut seen_a) = recording("a", 503).await;
    let (b, mut seen_b) = recording("b", 200).await;
    // Cargo sets CARGO_PKG_NAME for the test process: a variable this test need not set (setting
    // one would race with other tests reading the environment).
    let gw = Gateway::start(&format!(
        "upstreams:
  a:
    endpoints: [{{url: '{}'}}]
    health_check: {{ path: /health, interval: 50ms, timeout: 1s }}
    request_headers:
      set: {{ Authorization: 'Bearer ${{CARGO_PKG_NAME}}', x-tenant: a }}
      remove: [x-internal]
  b:
    endpoints: [{{url: '{}'}}]
    http2: true
    request_headers: {{ set: {{ api-key: b-key }} }}
routes:
  - upstream: a
    failover: [b]
    retry: {{ attempts: 1 }}
",
        a.url(),
        b.url()
    ))
    .await;
    let key = format!("Bearer {}", env!("CARGO_PKG_NAME"));
    let c = client();
    for size in [3, 200 * 1024] {
        let req = http::Request::put(gw.url("/v1/x"))
            .header("authorization", "Bearer client")
            .header("x-internal", "1")
            .header("x-tenant", "client")
            .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                b'x';
                size
            ])))
            .unwrap();
        let got = send(&c, req).await;
        // A body over `retry_buffer` streams, cannot be replayed, and the client gets a's 503.
        let want = if size == 3 { 200 } else { 503 };
        assert_eq!(got.status, want, "{size}");
        let (path, h) = loop {
            let (path, h) = seen_a.recv().await.unwrap();
            if path != "/health" {
                break (path, h);
            }
        };
        assert_eq!(path, "/v1/x");
        assert_eq!(h.get("authorization").unwrap(), key.as_str());
        assert_eq!(h.get_all("x-tenant").iter().collect::<Vec<_>>(), ["a"]);
        assert!(!h.contains_key("x-internal"), "{h:?}");
        if size == 3 {
            let (_, h) = seen_b.recv().await.unwrap();
            assert_eq!(h.get("api-key").unwrap(), "b-key");
            // What the client sent, not a's credentials.
            assert_eq!(h.get("authorization").unwrap(), "Bearer client");
            assert_eq!(h.get("x-tenant").unwrap(), "client");
            assert_eq!(h.get("x-internal").unwrap(), "1");
        }
    }
    // Health checks carry a's headers.
    let h = loop {
        let (path, h) = seen_a.recv().await.unwrap();
        if path == "/health" {
            break h;
        }
    };
    assert_eq!(h.get("authorization").unwrap(), key.as_str());
    gw.stop().await;
}

/// A route's `request_headers` apply before its upstream's (which win on the same name), and its
/// `response_headers` apply to every response of the route: the upstream's and the gateway's own.
#[tokio::test]
async fn route_request_and_response_headers() {
    let (up, mut seen) = recording("u", 200).await;
    let dead = dead_url().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    request_headers: {{ set: {{ x-both: upstream }} }}
  dead: {{ endpoints: [{{url: '{dead}'}}] }}
routes:
  - match: {{ path_prefix: /dead/ }}
    upstream: dead
    response_headers: {{ set: {{ x-served-by: '${{CARGO_PKG_NAME}}' }} }}
  - upstream: u
    request_headers:
      set: {{ x-route: r, x-both: route }}
      remove: [cookie]
    response_headers:
      set: {{ strict-transport-security: max-age=63072000 }}
      remove: [x-upstream]
",
        up.url()
    ))
    .await;
    let c = client();
    let got = send(
        &c,
        http::Request::get(gw.url("/x"))
            .header("cookie", "a=1")
            .header("x-route", "client")
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let (_, h) = seen.recv().await.unwrap();
    assert_eq!(h.get("x-route").unwrap(), "r");
    assert_eq!(h.get("x-both").unwrap(), "upstream");
    assert!(!h.contains_key("cookie"), "{h:?}");
    assert_eq!(
        got.header("strict-transport-security"),
        Some("max-age=63072000")
    );
    // `reply` sets `x-upstream: u`; the route removes it.
    assert!(got.header("x-upstream").is_none());
    // The gateway's own answer (no upstream reachable) gets the route's headers too.
    let got = get(&c, &gw.url("/dead/x")).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("x-served-by"), Some(env!("CARGO_PKG_NAME")));
    gw.stop().await;
}
