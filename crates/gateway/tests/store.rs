//! The embedded store (`store:`): admin breaker overrides survive restarts, every change is in the
//! audit log, a failed write changes nothing, and files the store cannot use fail the start.
mod admin_support;
mod support;

use std::path::Path;

use admin_support::*;
use support::*;

const TOKEN: &str = "store-token";

fn yaml(store: &Path, up: &Upstream) -> String {
    format!(
        "store: {{ path: '{}' }}
upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ open_duration: 60s }}
routes:
  - upstream: primary
",
        store.display(),
        up.url()
    )
}

async fn put_state(ops: &Ops, c: &Client, upstream: &str, state: &str) -> Got {
    ops.admin_put(
        c,
        &format!("/api/circuit-breakers/{upstream}"),
        Some(TOKEN),
        &format!("{{\"state\": \"{state}\"}}"),
    )
    .await
}

#[tokio::test]
async fn an_override_survives_a_restart_until_closed() {
    let up = Upstream::named("up").await;
    let dir = TempDir::new("store");
    let db = dir.join("bulwark.db");
    let c = client();

    let ops = Ops::start(&yaml(&db, &up), Some(TOKEN)).await;
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    ops.set_breaker(&c, "primary", "forced_open").await;
    ops.stop().await;
    assert!(db.is_file());

    // Started again on the same file: forced open before the first request.
    let ops = Ops::start(&yaml(&db, &up), Some(TOKEN)).await;
    let hits = up.hits();
    let g = get(&c, &ops.url("/")).await;
    assert_eq!(g.status, 503, "{}", g.text());
    assert_eq!(g.header("x-bulwark-reason"), Some("circuit_open"));
    assert_eq!(up.hits(), hits, "nothing sent upstream");
    let b = ops.admin_json(&c, "/api/circuit-breakers/primary").await;
    assert_eq!(b["state"], "forced_open", "{b}");
    assert_eq!(b["override"], "forced_open", "{b}");

    // Closed clears it in the store too: the next start is back to the file's config.
    ops.set_breaker(&c, "primary", "closed").await;
    ops.stop().await;
    let ops = Ops::start(&yaml(&db, &up), Some(TOKEN)).await;
    let b = ops.admin_json(&c, "/api/circuit-breakers/primary").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["override"], serde_json::Value::Null, "{b}");
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    ops.stop().await;
}

#[tokio::test]
async fn the_audit_log_lists_changes_newest_first() {
    let up = Upstream::named("up").await;
    let dir = TempDir::new("store");
    let db = dir.join("bulwark.db");
    let c = client();
    let ops = Ops::start(&yaml(&db, &up), Some(TOKEN)).await;
    let a = ops.admin_json(&c, "/api/audit").await;
    assert_eq!(a, serde_json::json!({ "entries": [] }));

    ops.set_breaker(&c, "primary", "forced_open").await;
    ops.set_breaker(&c, "primary", "disabled").await;
    ops.set_breaker(&c, "primary", "closed").await;
    // A refused call (bad token) is not a change and is not in the log.
    let g = ops
        .admin_put(
            &c,
            "/api/circuit-breakers/primary",
            Some("wrong"),
            r#"{"state": "forced_open"}"#,
        )
        .await;
    assert_eq!(g.status, 401);
    ops.stop().await;

    // Read after a restart: the log is in the file.
    let ops = Ops::start(&yaml(&db, &up), Some(TOKEN)).await;
    let a = ops.admin_json(&c, "/api/audit").await;
    let entries = a["entries"].as_array().unwrap();
    let steps: Vec<(&str, &str, &str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["upstream"].as_str().unwrap(),
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("clear_override", "primary", "disabled", "closed"),
            ("set_override", "primary", "forced_open", "disabled"),
            ("set_override", "primary", "closed", "forced_open"),
        ],
        "{a}"
    );
    for e in entries {
        let time = e["time"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z'), "{time}");
        assert!(
            e["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{e}"
        );
    }
    let times: Vec<&str> = entries
        .iter()
        .map(|e| e["time"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");

    let a = ops.admin_json(&c, "/api/audit?limit=1").await;
    assert_eq!(a["entries"].as_array().unwrap().len(), 1);
    assert_eq!(a["entries"][0]["action"], "clear_override");
    assert_eq!(ops.admin_get(&c, "/api/audit?limit=0").await.status, 400);
    assert_eq!(ops.admin_get(&c, "/api/audit?limit=x").await.status, 400);
    assert_eq!(ops.admin_get(&c, "/api/audit?limit=1001").await.status, 400);
    assert_eq!(ops.admin_get(&c, "/api/audit?limit=1000").await.status, 200);
    let g = ops.admin_put(&c, "/api/audit", Some(TOKEN), "{}").await;
    assert_eq!(g.status, 405);
    ops.stop().await;
}

#[tokio::test]
async fn a_failed_store_write_answers_500_and_changes_nothing() {
    let up = Upstream::named("up").await;
    let dir = TempDir::new("store");
    let db = dir.join("bulwark.db");
    let c = client();
    let ops = Ops::start(&yaml(&db, &up), Some(TOKEN)).await;

    // Another connection (as a `sqlite3` shell left in a transaction would) holds the write lock:
    // the gateway's write waits its busy timeout, then fails. Root cannot chmod its way to a
    // failure, a lock works for everyone.
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let g = put_state(&ops, &c, "primary", "forced_open").await;
    assert_eq!(g.status, 500, "{}", g.text());
    assert_eq!(g.header("content-type"), Some("application/json"));
    let e: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("nothing was changed") && msg.contains("bulwark.db"),
        "{msg}"
    );

    // Nothing changed: not in memory, not in the store.
    let b = ops.admin_json(&c, "/api/circuit-breakers/primary").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["override"], serde_json::Value::Null, "{b}");
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    assert_eq!(
        ops.admin_json(&c, "/api/audit").await,
        serde_json::json!({ "entries": [] })
    );

    // With the lock released the same call goes through.
    let g = put_state(&ops, &c, "primary", "forced_open").await;
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(get(&c, &ops.url("/")).await.status, 503);
    ops.stop().await;
}

#[tokio::test]
async fn an_override_of_a_removed_upstream_is_kept_until_cleared() {
    let (a, b) = (Upstream::named("a").await, Upstream::named("b").await);
    let dir = TempDir::new("store");
    let db = dir.join("bulwark.db");
    let both = format!(
        "store: {{ path: '{}' }}
upstreams:
  a: {{ endpoints: [{{url: '{}'}}], circuit_breaker: {{}} }}
  b: {{ endpoints: [{{url: '{}'}}], circuit_breaker: {{}} }}
routes:
  - {{ match: {{ path_prefix: /b }}, upstream: b }}
  - upstream: a
",
        db.display(),
        a.url(),
        b.url()
    );
    let only_a = format!(
        "store: {{ path: '{}' }}
upstreams:
  a: {{ endpoints: [{{url: '{}'}}], circuit_breaker: {{}} }}
routes:
  - upstream: a
",
        db.display(),
        a.url()
    );
    let c = client();
    let ops = Ops::start(&both, Some(TOKEN)).await;
    ops.set_breaker(&c, "b", "forced_open").await;

    // Reload without b: the override is kept (listed apart), not dropped.
    ops.rewrite(&only_a);
    ops.reloader().reload().unwrap();
    let all = ops.admin_json(&c, "/api/circuit-breakers").await;
    assert_eq!(all["kept_overrides"]["b"], "forced_open", "{all}");
    ops.stop().await;

    // Restart without b: still kept; then b comes back by reload and is forced open at once.
    let ops = Ops::start(&only_a, Some(TOKEN)).await;
    let all = ops.admin_json(&c, "/api/circuit-breakers").await;
    assert_eq!(all["kept_overrides"]["b"], "forced_open", "{all}");
    ops.rewrite(&both);
    ops.reloader().reload().unwrap();
    let g = get(&c, &ops.url("/b")).await;
    assert_eq!(g.status, 503, "{}", g.text());
    assert_eq!(g.header("x-bulwark-reason"), Some("circuit_open"));
    let all = ops.admin_json(&c, "/api/circuit-breakers").await;
    assert!(all.get("kept_overrides").is_none(), "{all}");

    // Without b again, `closed` clears the kept override (only `closed`: others are 404).
    ops.rewrite(&only_a);
    ops.reloader().reload().unwrap();
    assert_eq!(put_state(&ops, &c, "b", "disabled").await.status, 404);
    let g = put_state(&ops, &c, "b", "closed").await;
    assert_eq!(g.status, 200, "{}", g.text());
    let all = ops.admin_json(&c, "/api/circuit-breakers").await;
    assert!(all.get("kept_overrides").is_none(), "{all}");
    let audit = ops.admin_json(&c, "/api/audit?limit=1").await;
    assert_eq!(audit["entries"][0]["from"], "forced_open", "{audit}");
    assert_eq!(audit["entries"][0]["to"], "closed", "{audit}");
    ops.stop().await;
}

/// `cli::start` (what `bulwark run` calls) on a config with `store: {path}`: its error.
async fn start_error(db: &Path) -> String {
    let up = Upstream::named("up").await;
    let dir = TempDir::new("store-cfg");
    let path = dir.join("bulwark.yaml");
    std::fs::write(
        &path,
        format!("listen: 127.0.0.1:0\n{}", yaml(db, &up)).as_bytes(),
    )
    .unwrap();
    let config = bulwark_gateway::config::load(&path).unwrap();
    match bulwark_gateway::cli::start(&path, &config, std::time::Duration::from_secs(1)).await {
        Ok(_) => panic!("started on {}", db.display()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_store_file_that_cannot_be_used_fails_the_start() {
    let dir = TempDir::new("store");

    let missing = dir.join("no-such-dir/bulwark.db");
    let e = start_error(&missing).await;
    assert!(
        e.starts_with(&format!("store {}: ", missing.display())),
        "{e}"
    );
    assert!(!missing.exists());

    let junk = dir.join("junk.db");
    std::fs::write(&junk, vec![b'#'; 8192]).unwrap();
    let e = start_error(&junk).await;
    assert!(e.starts_with(&format!("store {}: ", junk.display())), "{e}");
    assert!(e.contains("not a database"), "{e}");

    let newer = dir.join("newer.db");
    {
        let c = rusqlite::Connection::open(&newer).unwrap();
        c.pragma_update(None, "user_version", 2).unwrap();
    }
    let e = start_error(&newer).await;
    assert_eq!(
        e,
        format!(
            "store {}: schema version 2 is newer than this bulwark supports (1); use a newer \
             bulwark or another file",
            newer.display()
        )
    );

    let e = start_error(dir.path()).await;
    assert!(e.ends_with(": is a directory"), "{e}");
}

#[tokio::test]
async fn without_a_store_nothing_is_written() {
    let up = Upstream::named("up").await;
    let c = client();
    let ops = Ops::start(
        &format!(
            "upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{}}
routes:
  - upstream: primary
",
            up.url()
        ),
        Some(TOKEN),
    )
    .await;
    ops.set_breaker(&c, "primary", "forced_open").await;
    assert_eq!(
        ops.admin_json(&c, "/api/audit").await,
        serde_json::json!({ "entries": [] })
    );
    // Nothing beside the config file, and no default `./bulwark.db` in the working directory.
    let files: Vec<_> = std::fs::read_dir(ops.path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["bulwark.yaml"]);
    assert!(!Path::new(bulwark_gateway::config::DEFAULT_STORE_PATH).exists());
    ops.stop().await;
}

/// `bulwark check` on the store of a running gateway: in WAL mode the file's header lags until a
/// checkpoint, so the schema version is asked of SQLite.
#[test]
fn the_schema_version_of_a_store_in_use_is_read_right() {
    use bulwark_gateway::store::{inspect, Inspection, Store, SCHEMA_VERSION};
    let dir = TempDir::new("store-in-use");
    let path = dir.join("s.db");
    let s = Store::open(&path).unwrap(); // as `bulwark run` holds it
    let seen = inspect(&path);
    drop(s);
    let after = inspect(&path);
    let want = Ok(Inspection::Existing {
        version: SCHEMA_VERSION,
    });
    assert_eq!(seen, want);
    assert_eq!(after, want);
}

/// One runtime thread (as `--threads 1`): an admin change whose store write waits on the file's
/// lock holds the gateway's change lock; a reload arriving meanwhile must wait for it off the
/// runtime thread, so proxied requests go on. (Before, the reload blocked the thread for the
/// store's busy timeout, about a second.)
#[tokio::test]
async fn a_reload_during_a_slow_store_write_does_not_stall_the_proxy() {
    use std::time::Duration;
    use tokio::time::Instant;
    let up = Upstream::named("up").await;
    let dir = TempDir::new("store-stall");
    let db = dir.join("bulwark.db");
    let y = yaml(&db, &up);
    let c = client();
    let ops = Ops::start(&y, Some(TOKEN)).await;
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);

    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let put = {
        let (ops_url, c) = (ops.admin_url("/api/circuit-breakers/primary"), c.clone());
        let req = http::Request::put(ops_url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"state": "forced_open"}"#,
            )))
            .unwrap();
        tokio::spawn(async move { send(&c, req).await.status })
    };
    // The PUT is now waiting on the file's lock, holding the change lock.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ops.rewrite(&y.replace("open_duration: 60s", "open_duration: 61s"));
    let t = Instant::now();
    let mut worst = Duration::ZERO;
    while t.elapsed() < Duration::from_millis(1500) {
        let s = Instant::now();
        assert_eq!(get(&c, &ops.url("/")).await.status, 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
        worst = worst.max(s.elapsed());
    }
    assert_eq!(put.await.unwrap(), 500, "the store was locked");
    other.execute_batch("ROLLBACK").unwrap();
    eventually(10, "the reload", || async {
        ops.gateway().generation() == 2
    })
    .await;
    // A request and a 10 ms sleep take ~12 ms when the thread is free; the stall was ~900 ms.
    assert!(
        worst < Duration::from_millis(500),
        "the runtime stalled for {worst:?}"
    );
    ops.stop().await;
}
