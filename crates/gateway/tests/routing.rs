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

type Heads = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Two upstreams, `adm` and `pub`, each answering with `x-up: <name>`; routes given in `routes`.
/// Also the request heads `adm` got.
async fn adm_and_pub(routes: &str) -> (Heads, RawUpstream, RawUpstream, Gateway) {
    let heads = Heads::default();
    let answer = |name: &'static str, seen: Heads| {
        move |req: &str| {
            seen.lock().unwrap().push(req.to_owned());
            format!("HTTP/1.1 200 OK\r\nx-up: {name}\r\ncontent-length: 2\r\n\r\nok").into_bytes()
        }
    };
    let adm = RawUpstream::answering(answer("adm", heads.clone())).await;
    let public = RawUpstream::answering(answer("pub", Heads::default())).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  adm: {{ endpoints: [{{url: '{}'}}] }}\n  pub: {{ endpoints: [{{url: '{}'}}] }}\n\
         routes:\n{routes}",
        adm.url(),
        public.url()
    ))
    .await;
    (heads, adm, public, gw)
}

async fn raw_exchange(gw: &Gateway, req: &str) -> RawResponse {
    let mut c = RawClient::connect(gw).await;
    c.send(req.as_bytes()).await;
    c.response(false).await
}

/// The host is case-insensitive (RFC 9110 4.2.3): `Host: ADMIN.example` is `admin.example` to
/// every upstream, to nginx's `server_name` and to Envoy's `domains`, so it takes the
/// `admin.example` route and its policies, not the catch-all (review sec2).
#[tokio::test]
async fn a_host_route_matches_the_host_in_any_case() {
    let (_h, _a, _p, gw) = adm_and_pub(
        "  - match: { headers: { host: admin.example } }\n    upstream: adm\n  - upstream: pub\n",
    )
    .await;
    for host in ["admin.example", "ADMIN.example", "Admin.Example"] {
        let r = raw_exchange(&gw, &format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
        assert_eq!(
            (r.status, r.header("x-up")),
            (200, Some("adm")),
            "Host: {host}"
        );
    }
    let r = raw_exchange(&gw, "GET /x HTTP/1.1\r\nHost: other.example\r\n\r\n").await;
    assert_eq!((r.status, r.header("x-up")), (200, Some("pub")));
    gw.stop().await;
}

/// `%61` is `a` (an unreserved character, percent-encoded) and every server decodes it before it
/// routes: `/%61dmin/x` takes the `/admin` route, and goes upstream as `/admin/x` (RFC 3986
/// 6.2.2.2). It went to the catch-all, past the admin route's policies (review sec2).
#[tokio::test]
async fn a_percent_encoded_unreserved_character_does_not_dodge_a_prefix_route() {
    let (heads, _a, _p, gw) =
        adm_and_pub("  - match: { path_prefix: /admin }\n    upstream: adm\n  - upstream: pub\n")
            .await;
    for path in ["/admin/x", "/%61dmin/x", "/adm%69n/x", "/%61%64%6d%69%6e/x"] {
        let r = raw_exchange(
            &gw,
            &format!("GET {path}?q=%61 HTTP/1.1\r\nHost: a\r\n\r\n"),
        )
        .await;
        assert_eq!((r.status, r.header("x-up")), (200, Some("adm")), "{path}");
    }
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 4);
    assert!(
        heads
            .iter()
            .all(|h| h.starts_with("GET /admin/x?q=%61 HTTP/1.1\r\n")),
        "{heads:?}"
    );
    // A reserved character stays encoded, and a dot-segment in disguise is still refused.
    let r = raw_exchange(&gw, "GET /%61dmin%2Fx HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(r.status, 200);
    let r = raw_exchange(&gw, "GET /x/%2E%2E/admin HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(r.status, 400);
    // A `%` without two hex digits is refused: decoding would make a new escape of
    // `/%%36%31dmin` (`/%61dmin`, judged as it is and decoded upstream to `/admin`: review df9).
    for path in ["/%%36%31dmin/x", "/100%", "/%zz"] {
        let r = raw_exchange(&gw, &format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n")).await;
        assert_eq!(r.status, 400, "{path}");
    }
    gw.stop().await;
}

/// A `prefix_rewrite` under a prefix written with an escaped unreserved character (`/%61pi`, which
/// matches `/api` as requests are decoded) replaces what was matched, no more, no less.
#[tokio::test]
async fn a_prefix_rewrite_under_an_escaped_prefix_replaces_what_matched() {
    let (heads, _a, _p, gw) = adm_and_pub(
        "  - match: { path_prefix: /%61pi }\n    prefix_rewrite: /v1\n    upstream: adm\n  - upstream: pub\n",
    )
    .await;
    for path in ["/api/x", "/%61pi/x"] {
        let r = raw_exchange(&gw, &format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n")).await;
        assert_eq!((r.status, r.header("x-up")), (200, Some("adm")), "{path}");
    }
    let heads = heads.lock().unwrap().clone();
    assert!(
        heads.len() == 2
            && heads
                .iter()
                .all(|h| h.starts_with("GET /v1/x HTTP/1.1\r\n")),
        "{heads:?}"
    );
    gw.stop().await;
}
