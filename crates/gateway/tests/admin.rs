//! The admin API: /health, /ready, manual breaker control through the proxy, and authorisation.
mod admin_support;
mod support;

use std::time::Duration;

use admin_support::*;
use support::*;

const TOKEN: &str = "let-me-in";

fn two_upstreams(primary: &Upstream, secondary: &Upstream) -> String {
    format!(
        "upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ minimum_calls: 2, open_duration: 60s }}
  secondary:
    endpoints: [{{url: '{}'}}]
routes:
  - name: api
    upstream: primary
    failover: [secondary]
",
        primary.url(),
        secondary.url()
    )
}

#[tokio::test]
async fn health_reports_shape_and_aggregate_status() {
    let (p, s) = (Upstream::named("p").await, Upstream::named("s").await);
    let ops = Ops::start(&two_upstreams(&p, &s), Some(TOKEN)).await;
    let c = client();

    let g = ops.admin_get(&c, "/health").await;
    assert_eq!(g.status, 200);
    assert_eq!(g.header("content-type"), Some("application/json"));
    let h: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(h["status"], "healthy", "{h}");
    let primary = &h["upstreams"]["primary"];
    assert_eq!(primary["circuit_breaker"], "closed");
    assert_eq!(primary["endpoints"][0]["url"], p.url());
    assert_eq!(primary["endpoints"][0]["healthy"], true);
    assert_eq!(primary["endpoints"][0]["ejected"], false);
    // An upstream without a breaker reports it as disabled.
    assert_eq!(h["upstreams"]["secondary"]["circuit_breaker"], "disabled");
    // Upstreams appear in config order.
    let names: Vec<&String> = h["upstreams"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["primary", "secondary"]);

    // The primary loses its only endpoint: the route still has its failover, so degraded (200).
    ops.set_available("primary", 0, false);
    let g = ops.admin_get(&c, "/health").await;
    let h: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(
        (g.status.as_u16(), h["status"].as_str()),
        (200, Some("degraded")),
        "{h}"
    );
    assert_eq!(h["upstreams"]["primary"]["status"], "unhealthy");
    assert_eq!(h["upstreams"]["primary"]["endpoints"][0]["healthy"], false);

    // And the failover too: the route has nothing left, so unhealthy (503).
    ops.set_available("secondary", 0, false);
    let g = ops.admin_get(&c, "/health").await;
    let h: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(
        (g.status.as_u16(), h["status"].as_str()),
        (503, Some("unhealthy")),
        "{h}"
    );
    assert_eq!(h["unavailable_routes"], serde_json::json!(["api"]));

    // A forced-open breaker makes its upstream unhealthy just like lost endpoints.
    ops.set_available("secondary", 0, true);
    ops.set_available("primary", 0, true);
    ops.set_breaker(&c, "primary", "forced_open").await;
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["upstreams"]["primary"]["circuit_breaker"], "forced_open");
    assert_eq!(h["upstreams"]["primary"]["status"], "unhealthy");
    ops.stop().await;
}

/// Every endpoint of an upstream in a quota cooldown (a 429 with `Retry-After`) takes no traffic
/// (its requests get the gateway's own 429 `rate_limited`), so `/health` says so: the endpoint is
/// `cooling_down`, the upstream unhealthy, and with no failover the route is unavailable (503). It
/// said `healthy` throughout.
#[tokio::test]
async fn health_counts_an_endpoint_in_a_quota_cooldown_as_unusable() {
    let out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let up = quota("quota", 429, out, || "60".to_owned()).await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: api
    upstream: u
",
            up.url()
        ),
        None,
    )
    .await;
    let c = client();
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["upstreams"]["u"]["endpoints"][0]["cooling_down"], false);

    assert_eq!(get(&c, &ops.url("/")).await.status, 429);
    let g = ops.admin_get(&c, "/health").await;
    let h: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(
        (g.status.as_u16(), h["status"].as_str()),
        (503, Some("unhealthy")),
        "{h}"
    );
    let u = &h["upstreams"]["u"];
    assert_eq!(u["status"], "unhealthy", "{h}");
    assert_eq!(u["endpoints"][0]["cooling_down"], true, "{h}");
    assert_eq!(u["endpoints"][0]["healthy"], true, "{h}");
    assert_eq!(u["endpoints"][0]["ejected"], false, "{h}");
    assert_eq!(h["unavailable_routes"], serde_json::json!(["api"]));
    // What the route's clients get meanwhile, which is what the status stands for.
    let hits = up.hits();
    let r = get(&c, &ops.url("/")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-bulwark-reason"), Some("rate_limited"));
    assert_eq!(up.hits(), hits, "a cooling endpoint got a request");
    ops.stop().await;
}

#[tokio::test]
async fn ready_is_200_while_serving_and_503_while_draining() {
    let (slow, release) = Upstream::held("slow", "done").await;
    let ops = Ops::start(
        &format!(
            "drain_timeout: 20s
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
",
            slow.url()
        ),
        None,
    )
    .await;
    let c = client();
    let g = ops.admin_get(&c, "/ready").await;
    assert_eq!(g.status, 200, "{}", g.text());

    // One request in flight holds the drain open.
    let url = ops.url("/");
    let inflight = tokio::spawn(async move { get(&client(), &url).await });
    let s = &slow;
    eventually(5, "request reached the upstream", || async move {
        s.hits() == 1
    })
    .await;

    let admin = ops.admin;
    let stopping = tokio::spawn(ops.stop());
    let ac = client();
    eventually(5, "/ready turns 503", || {
        let ac = ac.clone();
        async move {
            let g = get(&ac, &format!("http://{admin}/ready")).await;
            g.status == 503 && g.text().contains("draining")
        }
    })
    .await;
    release.notify_one();
    let got = inflight.await.unwrap();
    assert_eq!((got.status.as_u16(), got.text()), (200, "done".to_owned()));
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn forcing_a_breaker_open_makes_the_proxy_answer_503_until_closed() {
    let up = Upstream::named("up").await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ open_duration: 60s }}
routes:
  - upstream: primary
",
            up.url()
        ),
        Some(TOKEN),
    )
    .await;
    let c = client();
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);

    let put = ops.set_breaker(&c, "primary", "forced_open").await;
    assert_eq!(put["state"], "forced_open");
    assert_eq!(put["override"], "forced_open");
    let hits = up.hits();
    let g = get(&c, &ops.url("/")).await;
    assert_eq!(g.status, 503);
    assert_eq!(g.header("x-bulwark-reason"), Some("circuit_open"));
    assert!(g.header("retry-after").is_some());
    assert_eq!(
        up.hits(),
        hits,
        "a forced-open breaker sends nothing upstream"
    );

    let all = ops.admin_json(&c, "/api/circuit-breakers").await;
    let b = &all["upstreams"]["primary"];
    assert_eq!(b["state"], "forced_open", "{all}");
    assert_eq!(b["configured"], true);
    // The window still holds the one call made before (forcing open does not clear it).
    assert_eq!(b["window"]["calls"], 1);
    let one = ops.admin_json(&c, "/api/circuit-breakers/primary").await;
    assert_eq!(one["state"], "forced_open");

    let put = ops.set_breaker(&c, "primary", "closed").await;
    assert_eq!(put["state"], "closed");
    assert_eq!(put["override"], serde_json::Value::Null);
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);

    // Disabled: admitted, and reported as such.
    let put = ops.set_breaker(&c, "primary", "disabled").await;
    assert_eq!(put["state"], "disabled");
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    ops.stop().await;
}

#[tokio::test]
async fn mutating_calls_need_the_token_and_valid_input() {
    let up = Upstream::named("up").await;
    let yaml = format!(
        "upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{}}
  plain:
    endpoints: [{{url: '{}'}}]
routes:
  - upstream: primary
",
        up.url(),
        up.url()
    );
    let ops = Ops::start(&yaml, Some(TOKEN)).await;
    let c = client();
    let path = "/api/circuit-breakers/primary";
    let open = r#"{"state": "forced_open"}"#;

    let g = ops.admin_put(&c, path, None, open).await;
    assert_eq!(g.status, 401, "{}", g.text());
    assert_eq!(g.header("www-authenticate"), Some("Bearer"));
    let g = ops.admin_put(&c, path, Some("let-me-i"), open).await;
    assert_eq!(g.status, 401);
    let g = ops.admin_put(&c, path, Some("let-me-inn"), open).await;
    assert_eq!(g.status, 401);
    // Refused calls change nothing.
    assert_eq!(ops.admin_json(&c, path).await["state"], "closed");

    let g = ops
        .admin_put(&c, "/api/circuit-breakers/nope", Some(TOKEN), open)
        .await;
    assert_eq!(g.status, 404, "{}", g.text());
    for bad in [
        "",
        "{",
        r#"{"state": "half_open"}"#,
        r#"{"state": "open"}"#,
        r#"{"mode": "closed"}"#,
    ] {
        let g = ops.admin_put(&c, path, Some(TOKEN), bad).await;
        assert_eq!(g.status, 400, "{bad}: {}", g.text());
    }
    let g = ops
        .admin_put(&c, "/api/circuit-breakers/plain", Some(TOKEN), open)
        .await;
    assert_eq!(g.status, 409, "{}", g.text());
    let g = ops.admin_get(&c, "/api/circuit-breakers/nope").await;
    assert_eq!(g.status, 404);
    let g = ops.admin_get(&c, "/nope").await;
    assert_eq!(g.status, 404);
    let g = send(
        &c,
        http::Request::delete(ops.admin_url(path))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(g.status, 405);

    let g = ops.admin_put(&c, path, Some(TOKEN), open).await;
    assert_eq!(g.status, 200);
    ops.stop().await;

    // No token configured: mutating calls are refused outright, whatever is sent.
    let ops = Ops::start(&yaml, None).await;
    for token in [None, Some(TOKEN), Some("")] {
        let g = ops.admin_put(&c, path, token, open).await;
        assert_eq!(g.status, 403, "{}", g.text());
    }
    assert_eq!(ops.admin_json(&c, path).await["state"], "closed");
    // Reading stays open.
    assert_eq!(ops.admin_get(&c, "/health").await.status, 200);
    ops.stop().await;
}

/// A gateway started as `bulwark run` starts it, with `admin.token_env: <var>` (and nothing else
/// set here: the test decides what the variable holds). The config directory is kept alive with it.
async fn start_with_token_env(
    var: &str,
    up: &Upstream,
) -> (bulwark_gateway::cli::Running, TempDir) {
    let dir = temp_dir();
    let path = dir.join("bulwark.yaml");
    let content = format!(
        "listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  token_env: {var}
upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{}}
routes:
  - upstream: primary
",
        up.url()
    );
    std::fs::write(&path, &content).unwrap();
    let config = bulwark_gateway::config::load(&path).unwrap_or_else(|e| panic!("{e}\n{content}"));
    let running = bulwark_gateway::cli::start(&path, &config, Duration::from_secs(60))
        .await
        .unwrap();
    (running, dir)
}

/// PUTs `forced_open` with each of `authorizations` (raw header values, `None`: no header) and
/// asserts every one is refused with 403 and leaves the breaker closed; reads stay open.
async fn assert_mutations_disabled(admin: std::net::SocketAddr, authorizations: &[Option<&str>]) {
    let c = client();
    let url = format!("http://{admin}/api/circuit-breakers/primary");
    for auth in authorizations {
        let mut b = http::Request::put(&url).header("content-type", "application/json");
        if let Some(a) = auth {
            b = b.header("authorization", *a);
        }
        let g = send(
            &c,
            b.body(r#"{"state": "forced_open"}"#.to_owned().into())
                .unwrap(),
        )
        .await;
        assert_eq!(g.status, 403, "{auth:?}: {}", g.text());
        let err: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
        assert!(err["error"].is_string(), "{err}");
    }
    let g = get(&c, &url).await;
    assert_eq!(g.status, 200, "{}", g.text());
    let state: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(
        state["state"], "closed",
        "a refused call changed the breaker"
    );
}

/// A name no other test (nor the environment) uses.
fn unique_var(tag: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "BULWARK_TEST_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

#[tokio::test]
async fn token_env_naming_an_unset_variable_refuses_mutations_with_403() {
    let up = Upstream::named("up").await;
    let var = unique_var("UNSET_TOKEN");
    assert!(std::env::var_os(&var).is_none());
    let (running, _dir) = start_with_token_env(&var, &up).await;
    let admin = running.admin_addr.unwrap();
    assert_mutations_disabled(
        admin,
        &[
            None,
            Some("Bearer "),
            Some("Bearer"),
            Some("Bearer anything"),
            Some(&format!("Bearer {var}")),
        ],
    )
    .await;

    // The token is read at start: setting the variable afterwards opens nothing.
    std::env::set_var(&var, TOKEN);
    assert_mutations_disabled(admin, &[Some(&format!("Bearer {TOKEN}"))]).await;
    std::env::remove_var(&var);
    running.stop().await;
}

#[tokio::test]
async fn token_env_naming_an_empty_variable_refuses_mutations_with_403() {
    let up = Upstream::named("up").await;
    let var = unique_var("EMPTY_TOKEN");
    std::env::set_var(&var, "");
    let (running, _dir) = start_with_token_env(&var, &up).await;
    // An empty token must never match an empty (or absent) credential.
    assert_mutations_disabled(
        running.admin_addr.unwrap(),
        &[
            None,
            Some("Bearer "),
            Some("Bearer"),
            Some("Bearer x"),
            Some(""),
        ],
    )
    .await;
    std::env::remove_var(&var);
    running.stop().await;
}

/// An open breaker whose open duration has run out lets the next call through as a probe: /health
/// calls it half-open (degraded, 200), not open (unhealthy, 503). Without traffic the library's
/// state stays open until a call comes, and a load balancer reading /health would send none.
#[tokio::test]
async fn an_open_breaker_past_its_open_duration_is_reported_half_open() {
    let dead = dead_url().await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  only:
    endpoints: [{{url: '{dead}'}}]
    circuit_breaker: {{ minimum_calls: 2, open_duration: 1s }}
routes:
  - name: api
    upstream: only
"
        ),
        None,
    )
    .await;
    let c = client();
    for _ in 0..3 {
        get(&c, &ops.url("/")).await;
    }
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["upstreams"]["only"]["circuit_breaker"], "open", "{h}");
    // No traffic, until the breaker would admit a probe.
    eventually(10, "the open duration to run out", || async {
        ops.admin_json(&c, "/api/circuit-breakers/only").await["open_remaining_ms"] == 0
    })
    .await;
    let g = ops.admin_get(&c, "/health").await;
    let h: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(g.status.as_u16(), 200, "{h}");
    assert_eq!(
        h["upstreams"]["only"]["circuit_breaker"], "half_open",
        "{h}"
    );
    assert_eq!(h["status"], "degraded", "{h}");
    // The breakers API (which the dashboard shows) says the same.
    let b = ops.admin_json(&c, "/api/circuit-breakers/only").await;
    assert_eq!(b["state"], "half_open", "{b}");
    ops.stop().await;
}

/// "An endpoint takes traffic until its first probe answers": a first probe that fails takes it
/// out at once, not an `interval` later.
#[tokio::test]
async fn a_failed_first_health_probe_takes_the_endpoint_out_at_once() {
    let dead = dead_url().await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  hc:
    endpoints: [{{url: '{dead}'}}]
    health_check: {{ interval: 60s, timeout: 1s }}
routes:
  - upstream: hc
"
        ),
        None,
    )
    .await;
    let c = client();
    eventually(10, "the first probe's verdict", || async {
        ops.admin_json(&c, "/health").await["upstreams"]["hc"]["endpoints"][0]["healthy"] == false
    })
    .await;
    ops.stop().await;
}

/// `PUT /api/circuit-breakers/{upstream}` with `closed` is documented as "closed with an empty
/// window". On a breaker that is already closed it changes nothing: the answer (and every later
/// `GET`) still shows the failures counted before, and they still count towards opening it.
#[tokio::test]
async fn put_closed_empties_the_window_of_a_closed_breaker() {
    let bad = Upstream::status("bad", 503).await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ minimum_calls: 100 }}
routes:
  - upstream: u
",
            bad.url()
        ),
        Some("t"),
    )
    .await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &ops.url("/")).await.status, 503);
    }
    let before = ops.admin_json(&c, "/api/circuit-breakers/u").await;
    assert_eq!(before["state"], "closed", "{before}");
    assert_eq!(before["window"]["failures"], 3, "{before}");
    let put = ops.set_breaker(&c, "u", "closed").await;
    ops.stop().await;
    assert_eq!(put["state"], "closed", "{put}");
    assert_eq!(
        (&put["window"]["calls"], &put["window"]["failures"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "closed with an empty window: {put}"
    );
}
