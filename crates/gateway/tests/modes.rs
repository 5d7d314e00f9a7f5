//! Operating modes (`mode:`, `PUT /api/mode`): maintenance refuses everything, read-only refuses
//! writes, degraded refuses optional routes and forbids retries and hedges; routes may be exempt;
//! the admin override wins over the file across reloads and restarts, and is audited.
mod admin_support;
mod support;

use admin_support::*;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

const TOKEN: &str = "mode-token";

/// Three routes on one upstream: `/status` exempt from maintenance and read-only, `/extras/`
/// optional, `/with-fallback/` with a fallback; everything else plain (retries on 5xx).
fn yaml(mode: &str, up: &str) -> String {
    format!(
        "mode: {mode}
mode_retry_after: 90s
upstreams:
  main:
    endpoints: [{{url: '{up}'}}]
routes:
  - name: status
    match: {{ path: /status }}
    upstream: main
    exempt_modes: [maintenance, read_only]
  - name: extras
    match: {{ path_prefix: /extras/ }}
    upstream: main
    optional: true
  - name: with-fallback
    match: {{ path_prefix: /with-fallback/ }}
    upstream: main
    fallback: {{ status: 200, body: 'static page', content_type: text/plain }}
  - name: api
    upstream: main
    retry: {{ attempts: 3, backoff: {{ kind: constant, base: 1ms }} }}
"
    )
}

async fn post(c: &Client, url: &str, body: &'static str) -> Got {
    send(
        c,
        Request::post(url)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap(),
    )
    .await
}

fn refused_by(g: &Got, mode: &str) {
    assert_eq!(g.status, 503, "{}", g.text());
    assert_eq!(g.header("x-bulwark-reason"), Some(mode));
    assert_eq!(g.header("retry-after"), Some("90"));
    assert_eq!(g.header("x-bulwark-attempts"), None, "nothing was sent");
}

#[tokio::test]
async fn maintenance_refuses_every_route_but_the_exempt_ones() {
    let up = Upstream::named("up").await;
    let gw = Gateway::start(&yaml("maintenance", &up.url())).await;
    let c = client();
    refused_by(&get(&c, &gw.url("/v1/items")).await, "maintenance");
    refused_by(&post(&c, &gw.url("/v1/items"), "x").await, "maintenance");
    refused_by(&get(&c, &gw.url("/extras/a")).await, "maintenance");
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    // The fallback replaces the 503, as it replaces every failure.
    let g = get(&c, &gw.url("/with-fallback/x")).await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "static page"));
    assert_eq!(g.header("x-bulwark-reason"), Some("fallback"));
    // The exempt route is served.
    let g = get(&c, &gw.url("/status")).await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "up"));
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn read_only_refuses_writes_and_keeps_the_connection() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(&yaml("read_only", &up.url())).await;
    let c = client();
    for m in ["GET", "HEAD", "OPTIONS"] {
        let req = Request::builder()
            .method(m)
            .uri(gw.url("/v1/items"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(&c, req).await.status, 200, "{m}");
    }
    for m in ["POST", "PUT", "PATCH", "DELETE"] {
        let req = Request::builder()
            .method(m)
            .uri(gw.url("/v1/items"))
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        refused_by(&send(&c, req).await, "read_only");
    }
    assert_eq!(up.hits(), 3);
    // Exempt: a write goes through, body intact.
    let g = post(&c, &gw.url("/status"), "written").await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "written"));

    // A refused write with a body it did not read: the connection carries the next request.
    let mut raw = RawClient::connect(&gw).await;
    raw.send(b"POST /v1/a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloGET /v1/b HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let first = raw.response(false).await;
    assert_eq!(first.status, 503);
    assert_eq!(first.header("x-bulwark-reason"), Some("read_only"));
    let second = raw.response(false).await;
    assert_eq!(second.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn degraded_sends_one_attempt_and_refuses_optional_routes() {
    let failing = Upstream::status("failing", 503).await;
    let gw = Gateway::start(&yaml("normal", &failing.url())).await;
    let c = client();
    // Normal: three attempts on a 503.
    let g = get(&c, &gw.url("/v1/x")).await;
    assert_eq!(g.header("x-bulwark-attempts"), Some("3"));
    assert_eq!(failing.hits(), 3);
    gw.stop().await;

    let gw = Gateway::start(&yaml("degraded", &failing.url())).await;
    let g = get(&c, &gw.url("/v1/x")).await;
    assert_eq!(g.status, 503);
    assert_eq!(
        g.text(),
        "failing says 503",
        "the upstream's answer, passed through"
    );
    assert_eq!(g.header("x-bulwark-attempts"), Some("1"));
    assert_eq!(failing.hits(), 4, "one attempt, no retry");
    refused_by(&get(&c, &gw.url("/extras/x")).await, "degraded");
    assert_eq!(failing.hits(), 4);
    gw.stop().await;
}

#[tokio::test]
async fn degraded_still_fails_over_when_nothing_was_sent() {
    let dead = dead_url().await;
    let good = Upstream::named("good").await;
    let gw = Gateway::start(&format!(
        "mode: degraded
upstreams:
  dead: {{ endpoints: [{{url: '{dead}'}}] }}
  good: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: dead
    failover: [good]
    retry: {{ attempts: 3 }}
",
        good.url()
    ))
    .await;
    let c = client();
    let g = get(&c, &gw.url("/")).await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "good"));
    assert_eq!(good.hits(), 1);
    gw.stop().await;
}

/// Sends one request through a route that hedges after 1 ms over two endpoints that hold every
/// request, in `mode`; returns how many attempts reached them while they held it.
async fn hedged_attempts(mode: &str) -> usize {
    let (a, release_a) = Upstream::held("a", "from a").await;
    let (b, release_b) = Upstream::held("b", "from b").await;
    let gw = Gateway::start(&format!(
        "mode: {mode}
upstreams:
  pair: {{ endpoints: [{{url: '{}'}}, {{url: '{}'}}] }}
routes:
  - upstream: pair
    hedge: {{ delay: 1ms }}
",
        a.url(),
        b.url()
    ))
    .await;
    let hits = || a.hits() + b.hits();
    let c = client();
    let req = tokio::spawn({
        let url = gw.url("/");
        async move { get(&c, &url).await }
    });
    wait_until(10, || hits() >= 1).await;
    // A hedge is sent 1 ms after the first attempt; give it a hundred times that.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let seen = hits();
    release_a.notify_one();
    release_b.notify_one();
    assert_eq!(req.await.unwrap().status, 200);
    gw.stop().await;
    seen
}

#[tokio::test]
async fn degraded_sends_no_hedge() {
    assert_eq!(hedged_attempts("normal").await, 2, "the hedge");
    assert_eq!(hedged_attempts("degraded").await, 1, "no hedge");
}

async fn mode_call(ops: &Ops, c: &Client, method: &str, token: Option<&str>, body: &str) -> Got {
    let mut b = Request::builder()
        .method(method)
        .uri(ops.admin_url("/api/mode"));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(c, b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

fn json(g: &Got) -> serde_json::Value {
    assert_eq!(g.status, 200, "{}", g.text());
    serde_json::from_slice(&g.body).unwrap()
}

#[tokio::test]
async fn the_admin_api_sets_and_clears_the_mode_over_reloads() {
    let up = Upstream::named("up").await;
    let c = client();
    let ops = Ops::start(&yaml("normal", &up.url()), Some(TOKEN)).await;
    assert_eq!(
        ops.admin_json(&c, "/api/mode").await,
        serde_json::json!({ "mode": "normal", "configured": "normal", "override": null })
    );
    assert_eq!(ops.admin_json(&c, "/health").await["mode"], "normal");
    let maintenance = r#"{"mode": "maintenance"}"#;
    assert_eq!(
        mode_call(&ops, &c, "PUT", None, maintenance).await.status,
        401
    );
    assert_eq!(
        mode_call(&ops, &c, "PUT", Some("bad"), maintenance)
            .await
            .status,
        401
    );
    let bad = mode_call(&ops, &c, "PUT", Some(TOKEN), r#"{"mode": "off"}"#).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("maintenance"), "{}", bad.text());
    assert_eq!(
        get(&c, &ops.url("/v1")).await.status,
        200,
        "nothing changed"
    );

    let s = json(&mode_call(&ops, &c, "PUT", Some(TOKEN), maintenance).await);
    assert_eq!(
        s,
        serde_json::json!({ "mode": "maintenance", "configured": "normal", "override": "maintenance" })
    );
    assert_eq!(
        get(&c, &ops.url("/v1")).await.header("x-bulwark-reason"),
        Some("maintenance")
    );
    assert_eq!(ops.admin_json(&c, "/health").await["mode"], "maintenance");
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, "bulwark_mode{mode=\"maintenance\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "bulwark_mode{mode=\"normal\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "bulwark_mode_refused_total{route=\"api\",mode=\"maintenance\"}"
        ),
        Some(1.0),
        "{m}"
    );

    // A reload that changes the file's mode: the override still wins.
    let gen = ops.gateway().generation();
    ops.rewrite(&yaml("read_only", &up.url()));
    eventually(10, "reload", || async { ops.gateway().generation() > gen }).await;
    assert_eq!(
        ops.admin_json(&c, "/api/mode").await,
        serde_json::json!({ "mode": "maintenance", "configured": "read_only", "override": "maintenance" })
    );
    // Cleared: the file's (new) mode is in force.
    let s = json(&mode_call(&ops, &c, "DELETE", Some(TOKEN), "").await);
    assert_eq!(
        s,
        serde_json::json!({ "mode": "read_only", "configured": "read_only", "override": null })
    );
    assert_eq!(get(&c, &ops.url("/v1")).await.status, 200);
    refused_by(&post(&c, &ops.url("/v1"), "x").await, "read_only");
    // Without an override, a reload changes the mode, with the routes: a request still on the
    // old runtime is judged by the old file's mode.
    let gen = ops.gateway().generation();
    let old = ops.gateway().runtime();
    ops.rewrite(&yaml("normal", &up.url()));
    eventually(10, "reload", || async { ops.gateway().generation() > gen }).await;
    assert_eq!(post(&c, &ops.url("/v1"), "x").await.status, 200);
    use bulwark_gateway::config::Mode;
    assert_eq!(ops.gateway().mode_in(&old), Mode::ReadOnly);
    assert_eq!(ops.gateway().mode(), Mode::Normal);
    drop(old);
    assert_eq!(
        mode_call(&ops, &c, "POST", Some(TOKEN), maintenance)
            .await
            .status,
        405
    );
    ops.stop().await;

    // No token configured: refused, never open.
    let ops = Ops::start(&yaml("normal", &up.url()), None).await;
    assert_eq!(
        mode_call(&ops, &c, "PUT", Some(TOKEN), maintenance)
            .await
            .status,
        403
    );
    assert_eq!(ops.gateway().mode(), Mode::Normal);
    ops.stop().await;
}

#[tokio::test]
async fn a_mode_override_survives_a_restart_and_is_audited() {
    let up = Upstream::named("up").await;
    let dir = TempDir::new("modes");
    let db = dir.join("bulwark.db");
    let file = |mode: &str| {
        format!(
            "store: {{ path: '{}' }}\n{}",
            db.display(),
            yaml(mode, &up.url())
        )
    };
    let c = client();
    let ops = Ops::start(&file("normal"), Some(TOKEN)).await;
    json(&mode_call(&ops, &c, "PUT", Some(TOKEN), r#"{"mode": "degraded"}"#).await);
    ops.stop().await;

    let ops = Ops::start(&file("normal"), Some(TOKEN)).await;
    assert_eq!(
        ops.gateway().mode(),
        bulwark_gateway::config::Mode::Degraded
    );
    refused_by(&get(&c, &ops.url("/extras/a")).await, "degraded");
    json(&mode_call(&ops, &c, "DELETE", Some(TOKEN), "").await);
    ops.stop().await;

    let ops = Ops::start(&file("normal"), Some(TOKEN)).await;
    assert_eq!(get(&c, &ops.url("/extras/a")).await.status, 200);
    let a = ops.admin_json(&c, "/api/audit").await;
    let steps: Vec<(&str, &serde_json::Value, &str, &str)> = a["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                &e["upstream"],
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap(),
            )
        })
        .collect();
    let null = serde_json::Value::Null;
    assert_eq!(
        steps,
        [
            ("clear_mode", &null, "degraded", "normal"),
            ("set_mode", &null, "normal", "degraded"),
        ],
        "{a}"
    );
    ops.stop().await;
}

#[tokio::test]
async fn read_only_refuses_a_websocket_upgrade_but_not_on_an_exempt_route() {
    let up = Upstream::named("up").await;
    let gw = Gateway::start(&format!(
        "mode: read_only
upstreams:
  main: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path: /exempt }}
    upstream: main
    websocket: true
    exempt_modes: [read_only]
  - upstream: main
    websocket: true
",
        up.url()
    ))
    .await;
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    let mut c = RawClient::connect(&gw).await;
    c.send(upgrade("/chat").as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-bulwark-reason"), Some("read_only"));
    assert_eq!(up.hits(), 0);
    // A plain GET on the same route is served.
    c.send(b"GET /chat HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(c.response(false).await.status, 200);
    // On the exempt route the upgrade goes upstream (this upstream answers 200, not 101).
    let mut c = RawClient::connect(&gw).await;
    c.send(upgrade("/exempt").as_bytes()).await;
    assert_eq!(c.response(false).await.status, 200);
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}
