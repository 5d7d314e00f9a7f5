//! The web dashboard (`GET /dashboard` on the admin listener), rendered by a real browser: headless
//! Chromium loads the page, its script reads the admin API, and the DOM it leaves must show the
//! gateway's state. `scripts/test.sh` installs Chromium when it is missing; set `BULWARK_CHROMIUM`
//! to use another binary.
mod admin_support;
mod support;

use std::time::Duration;

use admin_support::*;
use support::*;

const TOKEN: &str = "dash-token";

fn chromium() -> String {
    let bin = std::env::var("BULWARK_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
    let found = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{bin}` not found: the dashboard test needs Chromium (`bash scripts/test.sh` installs it, \
         or set BULWARK_CHROMIUM)"
    );
    bin
}

/// The DOM of `url` after its scripts ran, as headless Chromium leaves it. No traffic leaves
/// loopback: background networking, updates and the like are off.
async fn rendered(url: &str) -> String {
    let profile = TempDir::new("chromium");
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-domain-reliability",
                "--no-first-run",
                "--no-pings",
                // Every host name but the gateway's address resolves to nothing: no DNS queries
                // for Google's update and sync hosts, whatever the flags above miss.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=5000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish within 90 s")
    .expect("chromium could not be run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_dashboard_shows_the_gateway_s_state_in_a_browser() {
    let up = Upstream::named("up").await;
    let dead = dead_url().await;
    let ops = Ops::start(
        &format!(
            "upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{}}
  backup:
    endpoints: [{{url: '{dead}'}}]
routes:
  - name: constructor
    match: {{ path_prefix: /c/ }}
    upstream: primary
  - name: api
    upstream: primary
",
            up.url()
        ),
        Some(TOKEN),
    )
    .await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    }
    // A route named like a property of every JavaScript object is shown like any other.
    assert_eq!(get(&c, &ops.url("/c/x")).await.status, 200);
    ops.set_breaker(&c, "primary", "forced_open").await;
    assert_eq!(get(&c, &ops.url("/")).await.status, 503);
    let g = ops
        .admin_put(&c, "/api/mode", Some(TOKEN), r#"{"mode": "degraded"}"#)
        .await;
    assert_eq!(g.status, 200, "{}", g.text());

    let dom = rendered(&ops.admin_url("/dashboard")).await;
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the script ran: {dom}"
    );
    assert!(!dom.contains("Cannot read the admin API"), "{dom}");
    for expected in [
        r#"data-mode="degraded""#,
        "mode: degraded (override)",
        r#"data-upstream="primary" data-breaker="forced_open""#,
        r#"data-upstream="backup" data-breaker="disabled""#,
        r#"data-route="api" data-requests="4""#,
        r#"data-route="constructor" data-requests="1""#,
        "override: forced_open",
    ] {
        assert!(dom.contains(expected), "missing {expected}: {dom}");
    }
    ops.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_with_a_strict_content_security_policy() {
    let up = Upstream::named("up").await;
    let ops = Ops::start(
        &format!(
            "upstreams:\n  a: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: a\n",
            up.url()
        ),
        None,
    )
    .await;
    let c = client();
    let page = ops.admin_get(&c, "/dashboard").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(page
        .text()
        .contains(r#"<script src="/dashboard.js" defer>"#));
    let js = ops.admin_get(&c, "/dashboard.js").await;
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(
        !js.text().contains("innerHTML"),
        "values are written as text only"
    );
    assert_eq!(ops.admin_get(&c, "/dashboard.css").await.status, 200);
    let root = ops.admin_get(&c, "/").await;
    assert_eq!(
        (root.status.as_u16(), root.header("location")),
        (302, Some("/dashboard"))
    );
    ops.stop().await;
}
