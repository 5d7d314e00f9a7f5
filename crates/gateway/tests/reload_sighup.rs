//! The real binary: `bulwark run` with JSON logs, reloading on SIGHUP, admin on an ephemeral port,
//! exiting cleanly on SIGTERM, and a SIGHUP during the start reloads rather than kills it. (A
//! child process, so signals never reach the test runner.)
#![cfg(unix)]
mod admin_support;
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use admin_support::*;
use support::*;

/// Starts `bulwark run --threads 1 -c path`; its stdout lines are gathered as they come.
fn run_binary(path: &std::path::Path) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["run", "--threads", "1", "-c"])
        .arg(path)
        .env_remove("BULWARK_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = gather_lines(&mut child);
    (child, lines)
}

#[tokio::test]
async fn sighup_reloads_the_binary_and_sigterm_stops_it() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let dir = temp_dir();
    let path = dir.join("gw.yaml");
    let base = format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
logging: {{ format: json, level: info }}
upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
  b: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /a }}
    upstream: a
",
        a.url(),
        b.url()
    );
    std::fs::write(&path, &base).unwrap();
    let (mut child, lines) = run_binary(&path);
    let find = |needle: &str| {
        lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    };

    let ll = &find;
    eventually(20, "the binary logs its addresses", || async move {
        ll("bulwark listening").is_some()
    })
    .await;
    let started: serde_json::Value =
        serde_json::from_str(&find("bulwark listening").unwrap()).unwrap();
    let fields = &started["fields"];
    let (proxy, admin) = (
        fields["listen"].as_str().unwrap().to_owned(),
        fields["admin"].as_str().unwrap().to_owned(),
    );
    let c = client();
    assert_eq!(get(&c, &format!("http://{admin}/ready")).await.status, 200);
    assert_eq!(get(&c, &format!("http://{proxy}/a")).await.status, 200);
    assert_eq!(get(&c, &format!("http://{proxy}/b")).await.status, 404);

    // A route added; SIGHUP asks for the reload at once (the file poll would find it within a
    // second too, so the log line below is what proves the signal path).
    std::fs::write(
        &path,
        format!("{base}  - match: {{ path_prefix: /b }}\n    upstream: b\n"),
    )
    .unwrap();
    signal(child.id(), "-HUP");
    let url = format!("http://{proxy}/b");
    eventually(10, "the route added by SIGHUP answers", || {
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url).await.status == 200 }
    })
    .await;
    eventually(5, "the reload is logged", || async move {
        ll("SIGHUP: reloading the config").is_some() && ll("config reloaded").is_some()
    })
    .await;
    let reloaded: serde_json::Value =
        serde_json::from_str(&find("config reloaded").unwrap()).unwrap();
    assert_eq!(reloaded["level"], "INFO");

    let pid = child.id();
    signal(pid, "-TERM");
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .unwrap_or_else(|_| {
        signal(pid, "-KILL");
        panic!("the binary did not stop on SIGTERM")
    })
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status}");
}

/// A SIGHUP that arrives during the start (`systemctl reload` right after `systemctl start` of a
/// `Type=simple` unit, a logrotate `postrotate` hook) reloads once the start is done, rather than
/// kill the process (SIGHUP's default action). Here the start is held in the store's open (its
/// file locked by another connection, which SQLite waits out for up to its busy timeout), so the
/// signal surely lands in that window.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_sighup_during_start_up_does_not_kill_the_gateway() {
    let a = Upstream::named("a").await;
    let dir = temp_dir();
    let db = dir.join("bulwark.db");
    let other = rusqlite::Connection::open(&db).unwrap();
    other
        .execute_batch("CREATE TABLE held (x INTEGER); BEGIN EXCLUSIVE;")
        .unwrap();
    let path = dir.join("gw.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0
logging: {{ format: json, level: info }}
store: {{ path: '{}' }}
upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: a
",
            db.display(),
            a.url()
        ),
    )
    .unwrap();
    let (mut child, lines) = run_binary(&path);
    let pid = child.id();
    // The gateway has opened the store file, and waits for its lock.
    let fds = format!("/proc/{pid}/fd");
    let opened = || {
        std::fs::read_dir(&fds).is_ok_and(|d| {
            d.filter_map(Result::ok)
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == db))
        })
    };
    eventually(10, "the gateway opens its store", || {
        let o = opened();
        async move { o }
    })
    .await;
    signal(pid, "-HUP");
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the gateway died of a SIGHUP sent during its start: {status}");
        }
        if lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("bulwark listening"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway neither started nor exited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(pid, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
