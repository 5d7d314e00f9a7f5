//! Routing: path prefix, exact path, method, headers, first match wins, 404.
mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

#[tokio::test]
async fn routes_by_prefix_exact_method_and_header() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let c = Upstream::named("c").await;
    let d = Upstream::named("d").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
  b: {{ endpoints: [{{url: '{}'}}] }}
  c: {{ endpoints: [{{url: '{}'}}] }}
  d: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path: /exact }}
    upstream: a
  - match: {{ path_prefix: /api/, headers: {{ x-tenant: gold }} }}
    upstream: d
  - match: {{ path_prefix: /api/, methods: [POST] }}
    upstream: c
  - match: {{ path_prefix: /api/ }}
    upstream: b
",
        a.url(),
        b.url(),
        c.url(),
        d.url()
    ))
    .await;
    let cl = client();
    assert_eq!(get(&cl, &gw.url("/exact")).await.text(), "a");
    // Exact means exact: a longer path does not match it, and nothing else matches either.
    let r = get(&cl, &gw.url("/exact/more")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-bulwark-reason"), Some("no_route"));
    assert_eq!(get(&cl, &gw.url("/api/x")).await.text(), "b");
    let post = Request::post(gw.url("/api/x"))
        .body(Full::new(Bytes::from("p")))
        .unwrap();
    assert_eq!(send(&cl, post).await.text(), "c");
    let gold = Request::get(gw.url("/api/x"))
        .header("x-tenant", "gold")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&cl, gold).await.text(), "d", "first match wins");
    let silver = Request::get(gw.url("/api/x"))
        .header("x-tenant", "silver")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&cl, silver).await.text(), "b");
    assert_eq!(get(&cl, &gw.url("/other")).await.status, 404);
    gw.stop().await;
}

#[tokio::test]
async fn forwards_headers_and_strips_hop_by_hop() {
    let echo = Upstream::start(
        "echo",
        std::sync::Arc::new(|req: Request<hyper::body::Incoming>| {
            let h = req.headers();
            let line = format!(
                "host={} xff={} proto={} rid={} secret={} te={}",
                h.get("host").map(|v| v.to_str().unwrap()).unwrap_or("-"),
                h.get("x-forwarded-for")
                    .map(|v| v.to_str().unwrap())
                    .unwrap_or("-"),
                h.get("x-forwarded-proto")
                    .map(|v| v.to_str().unwrap())
                    .unwrap_or("-"),
                h.get("x-request-id")
                    .map(|v| v.to_str().unwrap())
                    .unwrap_or("-"),
                h.get("x-secret").is_some(),
                h.get("te").is_some(),
            );
            Box::pin(async move { reply("echo", 200, line) })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  e: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: e\n",
        echo.url()
    ))
    .await;
    let raw_resp = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: client.example\r\nConnection: close, x-secret\r\nx-secret: 1\r\nTE: trailers\r\nx-request-id: abc\r\nx-forwarded-for: 10.0.0.9\r\n\r\n",
    )
    .await;
    let expected = format!(
        "host={} xff=10.0.0.9, 127.0.0.1 proto=http rid=abc secret=false te=false",
        echo.addr
    );
    assert!(raw_resp.contains(&expected), "{raw_resp}");
    // Without an id, one is generated.
    let r = get(&client(), &gw.url("/")).await;
    assert!(!r.text().contains("rid=-"), "{}", r.text());
    gw.stop().await;
}

/// `prefix_rewrite` swaps what the route's `path_prefix` (or exact `path`) matched for another
/// prefix in the target sent upstream, keeping the rest of the path and the query, whatever form
/// the client's target had and whichever protocol it spoke.
#[tokio::test]
async fn prefix_rewrite_replaces_the_matched_part_of_the_path() {
    let up = Upstream::start(
        "u",
        std::sync::Arc::new(|req: Request<hyper::body::Incoming>| {
            let target = req.uri().to_string();
            Box::pin(async move { reply("u", 200, target) })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /svc/ }}
    upstream: u
    prefix_rewrite: /v1/
  - match: {{ path: /old }}
    upstream: u
    prefix_rewrite: /new/place
  - match: {{ path_prefix: /root/ }}
    upstream: u
    prefix_rewrite: /
  - upstream: u
",
        up.url()
    ))
    .await;
    let (h1, h2) = (client(), h2c_client());
    for (path, upstream_sees) in [
        ("/svc/items?x=1&y=%20", "/v1/items?x=1&y=%20"),
        ("/svc/", "/v1/"),
        ("/old?q", "/new/place?q"),
        ("/root/a/b", "/a/b"),
        ("/svc", "/svc"),
        ("/other/svc/x", "/other/svc/x"),
    ] {
        assert_eq!(
            get(&h1, &gw.url(path)).await.text(),
            upstream_sees,
            "{path}"
        );
        assert_eq!(
            get(&h2, &gw.url(path)).await.text(),
            upstream_sees,
            "{path}"
        );
    }
    let r = raw(
        gw.addr,
        b"GET http://gw.example/svc/abs?k=v HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.ends_with("/v1/abs?k=v"), "{r}");
    // A dot-segment would take the rewritten path out of `/v1/` upstream: refused.
    for target in [
        "/svc/../admin",
        "/svc/%2E%2e/admin",
        "/svc/a/./b",
        "/svc/..",
    ] {
        let r = raw(
            gw.addr,
            format!("GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400"), "{target}: {r}");
    }
    // Dots inside a segment are just names.
    assert_eq!(
        get(&h1, &gw.url("/svc/..a/b.c/...")).await.text(),
        "/v1/..a/b.c/..."
    );
    gw.stop().await;
}
