//! Hot reload: new routes served, invalid files rejected (and logged), live state of unchanged
//! upstreams kept, admin overrides re-applied, in-flight requests and connections unaffected.
mod admin_support;
mod support;

use std::sync::{Arc, Mutex, OnceLock};

use admin_support::*;
use support::*;

/// A file poll interval long enough never to fire during a test.
const NO_POLL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Everything logged by this test binary (a global subscriber writing into memory).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogCapture(w.clone()))
            .try_init();
        buf
    })
}

fn logged() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

#[tokio::test]
async fn a_new_route_is_served_after_the_file_changes() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let one = format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /a }}
    upstream: a
",
        a.url()
    );
    let ops = Ops::start(&one, None).await;
    let c = client();
    assert_eq!(get(&c, &ops.url("/a")).await.status, 200);
    assert_eq!(get(&c, &ops.url("/b")).await.status, 404);

    // The file is rewritten whole, as an operator would: upstream b and a route to it.
    ops.rewrite(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
  b: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /a }}
    upstream: a
  - match: {{ path_prefix: /b }}
    upstream: b
",
        a.url(),
        b.url()
    ));
    let url = ops.url("/b");
    let cc = c.clone();
    eventually(10, "the new route answers", || {
        let (c, url) = (cc.clone(), url.clone());
        async move {
            let g = get(&c, &url).await;
            g.status == 200 && g.header("x-upstream") == Some("b")
        }
    })
    .await;
    assert_eq!(
        get(&c, &ops.url("/a")).await.header("x-upstream"),
        Some("a")
    );
    ops.stop().await;
}

#[tokio::test]
async fn an_invalid_file_is_rejected_logged_and_the_old_config_keeps_serving() {
    logs();
    let a = Upstream::named("a").await;
    let good = format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: a
",
        a.url()
    );
    let ops = Ops::start(&good, None).await;
    let c = client();
    let generation = ops.gateway().generation();

    // A typo on line 6 of the file (the header takes lines 1-3).
    ops.rewrite(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: a
    timout: 5s
",
        a.url()
    ));
    let r = ops.reloader().clone();
    eventually(10, "the reload is rejected", || {
        let r = r.clone();
        async move { r.last_error().is_some() }
    })
    .await;
    let err = ops.reloader().last_error().unwrap();
    let file = ops.path.display().to_string();
    assert!(
        err.starts_with(&format!(
            "{file}:8:5: routes[0].timout: unknown field `timout`"
        )),
        "{err}"
    );
    assert_eq!(ops.gateway().generation(), generation);
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    let log = logged();
    let line = log
        .lines()
        .find(|l| l.contains("config reload rejected") && l.contains(&file))
        .unwrap_or_else(|| panic!("no log line for {file}:\n{log}"));
    assert!(line.contains(":8:5: routes[0].timout"), "{line}");
    assert!(line.contains("ERROR"), "{line}");

    // A route naming a missing upstream: a validation error, placed in the file too.
    ops.rewrite(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: nowhere
",
        a.url()
    ));
    let r = ops.reloader().clone();
    eventually(10, "the second bad file is rejected", || {
        let r = r.clone();
        async move { r.last_error().is_some_and(|e| e.contains("nowhere")) }
    })
    .await;
    let err = ops.reloader().last_error().unwrap();
    assert!(err.starts_with(&format!("{file}:7:")), "{err}");
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);

    // Fixing the file clears the error and swaps the new config in.
    ops.rewrite(&format!(
        "{good}  - match: {{ path: /fixed }}\n    upstream: a\n"
    ));
    let (r, gw) = (ops.reloader().clone(), ops.gateway().clone());
    eventually(10, "the fixed file is loaded", || {
        let (r, gw) = (r.clone(), gw.clone());
        async move { r.last_error().is_none() && gw.generation() > generation }
    })
    .await;
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    ops.stop().await;
}

#[tokio::test]
async fn unchanged_upstreams_keep_their_breaker_and_overrides_survive_a_rebuild() {
    let failing = Upstream::status("failing", 500).await;
    let fine = Upstream::named("fine").await;
    let config = |b_open_duration: &str, extra_route: bool| {
        let mut y = format!(
            "upstreams:
  a:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ minimum_calls: 2, window: {{ kind: count, size: 10 }}, open_duration: 60s }}
  b:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ open_duration: {b_open_duration} }}
routes:
  - match: {{ path_prefix: /a }}
    upstream: a
  - match: {{ path_prefix: /b }}
    upstream: b
",
            failing.url(),
            fine.url()
        );
        if extra_route {
            y.push_str("  - match: { path_prefix: /c }\n    upstream: b\n");
        }
        y
    };
    // Reloads are triggered by hand here (as SIGHUP does), so the file poll must not race them.
    let ops = Ops::start_with(&config("30s", false), Some("tok"), NO_POLL).await;
    let c = client();

    // Open a's breaker with real failures.
    for _ in 0..2 {
        assert_eq!(get(&c, &ops.url("/a")).await.status, 500);
    }
    let g = get(&c, &ops.url("/a")).await;
    assert_eq!(g.header("x-bulwark-reason"), Some("circuit_open"));
    let hits = failing.hits();
    // Force b open by hand.
    ops.set_breaker(&c, "b", "forced_open").await;
    let before = ops.gateway().runtime();

    // Reload: a route added (a unchanged), b's settings changed (rebuilt).
    ops.rewrite(&config("45s", true));
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.kept, ["a"]);
    assert_eq!(r.rebuilt, ["b"]);
    let after = ops.gateway().runtime();
    assert!(Arc::ptr_eq(
        before.upstream("a").unwrap(),
        after.upstream("a").unwrap()
    ));

    // a: still open, window and all; nothing reaches the failing upstream.
    let cb = ops.admin_json(&c, "/api/circuit-breakers").await;
    assert_eq!(cb["upstreams"]["a"]["state"], "open", "{cb}");
    assert_eq!(cb["upstreams"]["a"]["window"]["failures"], 2, "{cb}");
    let g = get(&c, &ops.url("/a")).await;
    assert_eq!(
        (g.status.as_u16(), g.header("x-bulwark-reason")),
        (503, Some("circuit_open"))
    );
    assert_eq!(failing.hits(), hits);

    // b: a new breaker, with the admin override applied before it served anything.
    assert_eq!(cb["upstreams"]["b"]["state"], "forced_open", "{cb}");
    assert_eq!(cb["upstreams"]["b"]["override"], "forced_open", "{cb}");
    for path in ["/b", "/c"] {
        let g = get(&c, &ops.url(path)).await;
        assert_eq!(g.header("x-bulwark-reason"), Some("circuit_open"), "{path}");
    }
    let h = ops.admin_json(&c, "/health").await;
    assert_eq!(h["upstreams"]["b"]["circuit_breaker"], "forced_open");

    // Closing clears the override; the next reload leaves b closed.
    ops.set_breaker(&c, "b", "closed").await;
    ops.rewrite(&config("45s", false));
    ops.reloader().reload().unwrap();
    assert_eq!(get(&c, &ops.url("/b")).await.status, 200);
    ops.stop().await;
}

#[tokio::test]
async fn a_request_in_flight_on_a_kept_connection_completes_across_a_reload() {
    let (slow, release) = Upstream::held("slow", "done").await;
    let fresh = Upstream::named("fresh").await;
    let base = format!(
        "upstreams:
  slow: {{ endpoints: [{{url: '{}'}}] }}
  fresh: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /slow }}
    upstream: slow
",
        slow.url(),
        fresh.url()
    );
    let ops = Ops::start_with(&base, None, NO_POLL).await;
    let mut s = RawClient::connect_to(ops.proxy).await;
    s.send(b"GET /slow HTTP/1.1\r\nhost: gw\r\n\r\n").await;
    let sl = &slow;
    eventually(5, "the request reached the upstream", || async move {
        sl.hits() == 1
    })
    .await;

    ops.rewrite(&format!(
        "{base}  - match: {{ path_prefix: /new }}\n    upstream: fresh\n"
    ));
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.kept, ["slow", "fresh"]);
    release.notify_one();
    let r = s.response(false).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"done"[..]));

    // The same connection goes on, now served by the new config.
    s.send(b"GET /new HTTP/1.1\r\nhost: gw\r\n\r\n").await;
    let r = s.response(false).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"fresh"[..]));
    ops.stop().await;
}

#[tokio::test]
async fn the_access_log_is_off_by_default_and_follows_a_reload() {
    logs();
    let a = Upstream::named("a").await;
    let routes = format!(
        "upstreams:
  acc: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: logged
    upstream: acc
",
        a.url()
    );
    let ops = Ops::start_with(&routes, None, NO_POLL).await;
    let c = client();
    assert_eq!(get(&c, &ops.url("/quiet-path")).await.status, 200);
    assert!(!logged().contains("/quiet-path"));

    ops.rewrite(&format!("logging: {{ access_log: true }}\n{routes}"));
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.kept, ["acc"]);
    assert!(r.restart_required.is_empty(), "{:?}", r.restart_required);
    assert_eq!(get(&c, &ops.url("/loud-path?secret=1")).await.status, 200);
    let log = logged();
    let line = log
        .lines()
        .find(|l| l.contains("bulwark::access") && l.contains("/loud-path"))
        .unwrap_or_else(|| panic!("no access log line:\n{log}"));
    for field in [
        "method=GET",
        "path=\"/loud-path\"",
        "status=200",
        "route=\"logged\"",
        "upstream=\"acc\"",
        "attempts=1",
        "reason=\"-\"",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(
        !line.contains("secret"),
        "the query string is not logged: {line}"
    );
    ops.stop().await;
}

/// A reload keeps a route's retry budget (and its balance) while the route's budget settings stay
/// the same: a reload during an outage hands out no fresh retry credit. Changed settings start a
/// new budget.
#[tokio::test]
async fn a_route_keeps_its_retry_budget_across_a_reload() {
    let failing = Upstream::status("failing", 503).await;
    let config = |min_per_second: u32, extra_route: bool| {
        let mut y = format!(
            "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: api
    upstream: a
    retry:
      attempts: 2
      on: [5xx]
      backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }}
      budget: {{ ratio: 0.2, min_per_second: {min_per_second}, window: 10s }}
",
            failing.url()
        );
        if extra_route {
            y.push_str("  - match: { path: /other }\n    upstream: a\n");
        }
        y
    };
    let ops = Ops::start_with(&config(1, false), None, NO_POLL).await;
    let balance = |ops: &Ops| {
        let rt = ops.gateway().runtime();
        let api = rt.routes.iter().find(|r| &*r.name == "api").unwrap();
        api.policies.budget().unwrap().balance()
    };
    assert_eq!(balance(&ops), 10);
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &ops.url("/")).await.status, 503);
    }
    // floor(1 x 10 + 0.2 x 3) - 3 retries.
    assert_eq!(balance(&ops), 7);
    assert_eq!(failing.hits(), 6);

    ops.rewrite(&config(1, true));
    ops.reloader().reload().unwrap();
    assert_eq!(
        ops.gateway().runtime().routes.len(),
        2,
        "the new config serves"
    );
    assert_eq!(
        balance(&ops),
        7,
        "same budget settings: the balance is kept"
    );

    ops.rewrite(&config(2, true));
    ops.reloader().reload().unwrap();
    assert_eq!(balance(&ops), 20, "a changed budget starts with its floor");
    ops.stop().await;
}

/// Twenty reloads under steady load, alternating configs that change an upstream's settings (so its
/// pools and state are rebuilt), add and remove a route, and keep the other upstream as it is: not
/// one request fails, over HTTP/1.1 keep-alive and HTTP/2 connections that live across them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let config = |n: u32| {
        let extra = if n % 2 == 0 {
            "  - match: { path_prefix: /extra }\n    upstream: b\n"
        } else {
            ""
        };
        format!(
            "upstreams:
  a: {{ endpoints: [{{url: '{}'}}], connect_timeout: {}ms, circuit_breaker: {{}} }}
  b: {{ endpoints: [{{url: '{}'}}] }}
routes:
{extra}  - match: {{ path_prefix: /b }}
    upstream: b
  - upstream: a
    retry: {{ attempts: 2, budget: {{}} }}
",
            a.url(),
            1000 + n,
            b.url()
        )
    };
    let ops = Ops::start_with(&config(0), None, NO_POLL).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, c) in [client(), client(), h2c_client(), h2c_client()]
        .into_iter()
        .enumerate()
    {
        let (stop, base) = (stop.clone(), ops.url(""));
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (path, want) = if (ok + i as u32) % 2 == 0 {
                    ("/a", "a")
                } else {
                    ("/b", "b")
                };
                let r = get(&c, &format!("{base}{path}")).await;
                if r.status == 200 && r.text() == want {
                    ok += 1;
                } else {
                    failed.push(format!("{path}: {} {:?} {}", r.status, r.headers, r.text()));
                }
            }
            (ok, failed)
        }));
    }
    for n in 1..=20 {
        ops.rewrite(&config(n));
        let r = ops.reloader().reload().unwrap();
        assert_eq!(r.kept, ["b"], "reload {n}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in load {
        let (ok, failed) = t.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        total += ok;
    }
    assert!(total > 100, "{total} requests in 20 reloads");
    ops.stop().await;
}

/// A route may hide the gateway's `x-bulwark-*` headers from its clients with `response_headers`;
/// the access log still reads them (it is written before the route's headers are applied).
#[tokio::test]
async fn the_access_log_sees_what_response_headers_remove() {
    logs();
    let bad = Upstream::status("bad", 503).await;
    let ops = Ops::start_with(
        &format!(
            "logging: {{ access_log: true }}
upstreams:
  hidden: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: hides
    upstream: hidden
    retry: {{ attempts: 2, backoff: {{ base: 1ms }} }}
    response_headers: {{ remove: [x-bulwark-reason, x-bulwark-attempts] }}
",
            bad.url()
        ),
        None,
        NO_POLL,
    )
    .await;
    let got = get(&client(), &ops.url("/hidden-path")).await;
    assert_eq!(got.status, 503);
    assert!(got.header("x-bulwark-reason").is_none() && got.header("x-bulwark-attempts").is_none());
    let log = logged();
    let line = log
        .lines()
        .find(|l| l.contains("bulwark::access") && l.contains("/hidden-path"))
        .unwrap_or_else(|| panic!("no access log line:\n{log}"));
    assert!(line.contains("attempts=2"), "{line}");
    assert!(line.contains("reason=\"upstream_error\""), "{line}");
    ops.stop().await;
}

/// A listener certificate renewed in place (the same paths, new files, as certbot or cert-manager
/// do) is served to new connections after a reload, without a restart; connections already open
/// keep theirs.
#[tokio::test]
async fn a_reload_serves_a_listener_certificate_renewed_in_place() {
    let up = Upstream::named("a").await;
    let old = TestTls::new("renew-old");
    let yaml = format!("{}{}", old.config_line(), one_route(&up.url(), ""));
    let ops = Ops::start_with(&yaml, None, NO_POLL).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let handshake = |tls: &TestTls| {
        let connector = tls.connector(&[b"http/1.1"]);
        let (name, addr) = (name.clone(), ops.proxy);
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            connector.connect(name, tcp).await
        }
    };
    let mut open = handshake(&old).await.expect("the first certificate");
    let new = TestTls::new("renew-new");
    assert!(handshake(&new).await.is_err(), "not trusted before");
    std::fs::copy(&new.cert_path, &old.cert_path).unwrap();
    std::fs::copy(&new.key_path, &old.key_path).unwrap();
    let r = ops.reloader().reload().unwrap();
    assert!(!r.restart_required.contains(&"tls"), "{r:?}");
    assert!(handshake(&new).await.is_ok(), "the renewed certificate");
    assert!(handshake(&old).await.is_err(), "the old one is gone");
    // The connection opened before the reload still serves.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    open.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    open.read_to_end(&mut got).await.unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    ops.stop().await;
}

/// Reload docs: "Taking effect only after a restart (a reload that changes them says so in a
/// `warn` line): ... raising `limits.max_header_bytes`". After a reload from 2 KiB
/// to 32 KiB the reload reports `limits.max_header_bytes` as restart-only, so a 4 KiB head should
/// still get 431, as a 20 KiB one does.
#[tokio::test]
async fn raising_max_header_bytes_by_reload_is_restart_only() {
    let up = Upstream::named("u").await;
    let body = |limit: &str| {
        format!(
            "limits: {{ max_header_bytes: {limit} }}
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
",
            up.url()
        )
    };
    let ops = Ops::start(&body("2KiB"), None).await;
    let status = |pad: usize| {
        let proxy = ops.proxy;
        async move {
            let mut c = RawClient::connect_to(proxy).await;
            let head = format!(
                "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(pad)
            );
            c.send(head.as_bytes()).await;
            c.response(false).await.status
        }
    };
    assert_eq!(status(4096).await, 431, "before the reload");

    ops.rewrite(&body("32KiB"));
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.restart_required, ["limits.max_header_bytes"]);
    let (four, twenty) = (status(4096).await, status(20_000).await);
    assert_eq!(
        (four, twenty),
        (431, 431),
        "after the reload: a 4 KiB head got {four}, a 20 KiB head got {twenty}"
    );
    // A later reload is compared with the config at start, not with the one before it.
    ops.rewrite(&body("16KiB"));
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.restart_required, ["limits.max_header_bytes"]);
    assert_eq!(status(4096).await, 431);
    ops.stop().await;
}
