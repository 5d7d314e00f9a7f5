//! Hot reload as operators do it: a symlink switched to a file of the same length and mtime, and
//! what a reloaded route carries over (found by a review; each test failed before its fix).
mod admin_support;
mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use admin_support::*;
use support::*;

/// Sets a file's modification time (as `touch -d`, `cp -p`, `rsync -t`, a Nix store path (always
/// 1 s after the epoch) or a reproducible container image layer leave it).
fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Points the symlink `link` at `target` atomically (a new symlink renamed over the old one, as
/// `ln -sfn` + `mv -T`, NixOS's `/etc/static` switch or a Kubernetes `..data` swap do).
fn swap_symlink(link: &Path, target: &Path) {
    let tmp = link.with_extension("swap");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// Pads each config with a trailing comment so that all of them have the same length.
fn same_length(configs: &mut [String]) {
    let len = configs.iter().map(String::len).max().unwrap() + 2;
    for c in configs.iter_mut() {
        let pad = len - c.len() - 1;
        c.push('#');
        c.push_str(&"x".repeat(pad));
    }
    assert!(configs.iter().all(|c| c.len() == len));
}

/// The docs (Reload) say the watcher "follows the path, so replacing the file by a rename or a
/// symlink swap, as editors and Kubernetes ConfigMaps do, is seen". It compares only the target's
/// modification time and length: a symlink switched to another file (a new inode) of the same
/// length and modification time is never seen. That is every switch on NixOS (every store file
/// has mtime 1 s after the epoch; `/etc/bulwark.yaml -> /etc/static/... -> /nix/store/...`) when
/// the change keeps the length (a port, a weight, a timeout digit), and any blue/green switch
/// between files copied with `cp -p`/`rsync -a`/from an image layer. The gateway keeps serving
/// the old config for ever (until a SIGHUP), with no log line.
#[tokio::test]
async fn a_symlink_switched_to_another_file_of_the_same_length_and_mtime_is_reloaded() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let dir = temp_dir();
    let mut configs = vec![
        format!(
            "listen: 127.0.0.1:0\nupstreams:\n  a: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: a\n",
            a.url()
        ),
        format!(
            "listen: 127.0.0.1:0\nupstreams:\n  b: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: b\n",
            b.url()
        ),
    ];
    same_length(&mut configs);
    let (blue, green) = (dir.join("blue.yaml"), dir.join("green.yaml"));
    std::fs::write(&blue, &configs[0]).unwrap();
    std::fs::write(&green, &configs[1]).unwrap();
    let nix_epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
    set_mtime(&blue, nix_epoch);
    set_mtime(&green, nix_epoch);
    let link = dir.join("bulwark.yaml");
    std::os::unix::fs::symlink(&blue, &link).unwrap();

    let config = bulwark_gateway::config::load(&link).unwrap();
    let running = bulwark_gateway::cli::start(&link, &config, Duration::from_millis(20))
        .await
        .unwrap();
    let url = format!("http://{}/", running.proxy_addr);
    let c = client();
    assert_eq!(get(&c, &url).await.header("x-upstream"), Some("a"));

    // The operator switches to the green config.
    swap_symlink(&link, &green);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let g = get(&c, &url).await;
        if g.header("x-upstream") == Some("b") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the config behind the switched symlink was not applied within 3 s (150 looks): \
             still served by {:?}, generation {}",
            g.header("x-upstream"),
            running.gateway.generation()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.stop().await;
}

/// Requests sent to the two endpoints so far.
fn sent(a: &Upstream, b: &Upstream) -> usize {
    a.hits() + b.hits()
}

/// Sends `n` GETs one after the other; returns how many requests the endpoints received for them
/// beyond one each (the hedges).
async fn hedges_for(c: &Client, url: &str, a: &Upstream, b: &Upstream, n: usize) -> usize {
    let before = sent(a, b);
    for _ in 0..n {
        assert_eq!(get(c, url).await.status, 200);
    }
    // A hedge that lost the race has reached its endpoint before the winner answered.
    sent(a, b) - before - n
}

/// `hedge: { delay: p95 }` hedges at the p95 of the route's recent attempts, 100 ms until 20 are
/// known. Routes are rebuilt on every reload, and the rebuilt route starts with an empty latency
/// window (`RoutePolicies::build`, `Arc::new(LatencyWindow::default())`), though the docs take care
/// that the retry budget of an unchanged route is carried over "so a reload during an outage hands
/// out no fresh retry credit". After any reload (an unrelated route added, a SIGHUP with nothing
/// changed) a route whose upstream answers in 250 ms hedges each of its next 20 requests at 100 ms:
/// double load on an upstream that is slow, at the moment an operator reloads to deal with it.
#[tokio::test]
async fn a_reload_does_not_reset_the_latency_a_percentile_hedge_waits_for() {
    let a = slow("a", Duration::from_millis(250)).await;
    let b = slow("b", Duration::from_millis(250)).await;
    let body = |extra: &str| {
        format!(
            "upstreams:
  u: {{ endpoints: [{{url: '{}'}}, {{url: '{}'}}] }}
routes:
  - name: api
    match: {{ path_prefix: /api }}
    upstream: u
    hedge: {{ delay: p95 }}
{extra}",
            a.url(),
            b.url()
        )
    };
    let ops = Ops::start_with(&body(""), None, Duration::from_secs(3600)).await;
    let c = client();
    let url = ops.url("/api");
    // Warm-up: 25 latencies known (in rounds of 5 concurrent requests).
    for _ in 0..5 {
        let mut round = Vec::new();
        for _ in 0..5 {
            let (c, url) = (c.clone(), url.clone());
            round.push(tokio::spawn(async move { get(&c, &url).await.status }));
        }
        for r in round {
            assert_eq!(r.await.unwrap(), 200);
        }
    }
    let before = hedges_for(&c, &url, &a, &b, 10).await;

    // An unrelated change: a new route to the same upstream.
    ops.rewrite(&body(
        "  - name: other\n    match: { path_prefix: /other }\n    upstream: u\n",
    ));
    ops.reloader().reload().unwrap();
    let after = hedges_for(&c, &url, &a, &b, 10).await;
    assert!(
        after <= 3,
        "after a reload that left the route unchanged, {after} of 10 requests were hedged \
         ({before} of 10 before the reload)"
    );
    ops.stop().await;
}

/// An admin override re-applied to a breaker that a reload rebuilt is not a state change anyone
/// can see (the upstream was `forced_open` before and after): it is not counted in
/// `bulwark_circuit_breaker_transitions_total` (nor logged) again at each reload, or an alert on
/// transitions to `forced_open` fires at every config push (review rl2: it read 4 after three
/// reloads).
#[tokio::test]
async fn reapplying_an_override_to_a_rebuilt_breaker_counts_no_transition() {
    let b = Upstream::named("b").await;
    let config = |open: &str| {
        format!(
            "upstreams:
  b:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ open_duration: {open} }}
routes:
  - upstream: b
",
            b.url()
        )
    };
    let ops = Ops::start_with(&config("30s"), Some("tok"), Duration::from_secs(3600)).await;
    let c = client();
    ops.set_breaker(&c, "b", "forced_open").await;
    let series =
        r#"bulwark_circuit_breaker_transitions_total{upstream="b",from="closed",to="forced_open"}"#;
    assert_eq!(sample(&ops.metrics(&c).await, series), Some(1.0));

    for (i, open) in ["45s", "60s", "75s"].into_iter().enumerate() {
        ops.rewrite(&config(open));
        let r = ops.reloader().reload().unwrap();
        assert_eq!(r.rebuilt, ["b"], "reload {i}");
    }
    let cb = ops.admin_json(&c, "/api/circuit-breakers").await;
    assert_eq!(cb["upstreams"]["b"]["state"], "forced_open", "{cb}");
    assert_eq!(get(&c, &ops.url("/")).await.status, 503);
    assert_eq!(b.hits(), 0);
    assert_eq!(sample(&ops.metrics(&c).await, series), Some(1.0));
    // A real change after the reloads is counted as before.
    ops.set_breaker(&c, "b", "closed").await;
    let back =
        r#"bulwark_circuit_breaker_transitions_total{upstream="b",from="forced_open",to="closed"}"#;
    assert_eq!(sample(&ops.metrics(&c).await, back), Some(1.0));
    ops.stop().await;
}
