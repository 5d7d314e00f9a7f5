//! `bulwark check`: effective config, amplification, warnings, and FILE:LINE:COL errors with exit 1.
use std::process::Command;

mod support;

/// A config file `name` with `content`, in a directory removed when the guard is dropped.
struct Written {
    _dir: support::TempDir,
    path: std::path::PathBuf,
}

impl std::ops::Deref for Written {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

fn write(name: &str, content: &str) -> Written {
    let dir = support::TempDir::new("cli");
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    Written { _dir: dir, path }
}

fn check(path: &std::path::Path) -> (i32, String, String) {
    check_with(path, |_| {})
}

/// `bulwark check` on `path`, its command first adjusted by `setup` (its environment, say).
fn check_with(path: &std::path::Path, setup: impl FnOnce(&mut Command)) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulwark"));
    cmd.args(["check", "--config"]).arg(path);
    setup(&mut cmd);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_effective_config_and_amplification() {
    let p = write(
        "ok.yaml",
        "upstreams:
  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }
  b: { endpoints: [{url: 'http://127.0.0.1:9002'}] }
  c: { endpoints: [{url: 'http://127.0.0.1:9003'}] }
routes:
  - name: safe
    match: { path_prefix: /v1/ }
    upstream: a
    retry: { attempts: 3, budget: { ratio: 0.2 } }
  - name: risky
    upstream: a
    failover: [b, c]
    retry: { attempts: 3 }
    hedge: { delay: 50ms }
  - name: chaos
    upstream: c
    fault: { delay: { duration: 250ms, percent: 0.5 }, abort: { status: 503, percent: 10 } }
",
    );
    let (code, out, err) = check(&p);
    assert_eq!(code, 0, "{err}");
    // Defaults filled in.
    assert!(out.contains("max_header_bytes: 32KiB"), "{out}");
    assert!(out.contains("idle_timeout: 1m"), "{out}");
    assert!(out.contains("balance: least_request"), "{out}");
    // Amplification lines and warnings.
    assert!(out.contains("route safe -> a: 3 x 1 x 1 = 3\n"), "{out}");
    assert!(
        out.contains("route risky -> a -> b -> c: 3 x 2 x 3 = 18\n"),
        "{out}"
    );
    assert!(out.contains("warning: route risky can send up to 18 upstream requests per client request (threshold 10)"), "{out}");
    assert!(
        out.contains("warning: route risky retries without a budget"),
        "{out}"
    );
    assert!(!out.contains("warning: route safe"), "{out}");
    assert!(
        out.contains(
            "warning: route chaos injects faults: delays 0.5% of requests by 250ms, aborts 10% with 503\n"
        ),
        "{out}"
    );
}

#[test]
fn check_reports_errors_with_file_line_col_and_exits_1() {
    let p = write(
        "bad.yaml",
        "upstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }\nroutes:\n  - upstream: a\n    timeout: 3 weeks\n",
    );
    let (code, out, err) = check(&p);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:5:14: routes[0].timeout: invalid duration `3 weeks`: unknown unit `weeks` (use ms, s, m or h)",
            p.display()
        )
    );
    let p = write("missing.yaml", "upstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }\nroutes:\n  - upstream: nope\n");
    let (code, _, err) = check(&p);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:4:5: routes[0].upstream: unknown upstream `nope` (defined: a)",
            p.display()
        )
    );
}

/// `request_headers` values name environment variables: `check` expands them to validate, prints
/// the value as written (never the secret), and names the key of an unset variable or a bad entry.
#[test]
fn check_reads_request_header_variables_and_never_prints_them() {
    let p = write(
        "headers.yaml",
        "upstreams:
  a:
    endpoints: [{url: 'http://127.0.0.1:9001'}]
    request_headers:
      set: { Authorization: 'Bearer ${BULWARK_TEST_KEY}' }
      remove: [cookie]
routes:
  - upstream: a
",
    );
    let run = |key: Option<&str>| {
        check_with(&p, |cmd| {
            match key {
                Some(k) => cmd.env("BULWARK_TEST_KEY", k),
                None => cmd.env_remove("BULWARK_TEST_KEY"),
            };
        })
    };
    let (code, out, err) = run(Some("sk-live-123"));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Authorization: Bearer ${BULWARK_TEST_KEY}"),
        "{out}"
    );
    assert!(!out.contains("sk-live-123") && !err.contains("sk-live-123"));
    let (code, _, err) = run(None);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:5:14: upstreams.a.request_headers.set.Authorization: environment variable `BULWARK_TEST_KEY` is not set (or empty)",
            p.display()
        )
    );
    // A value the variable makes invalid: named, not shown.
    let (code, _, err) = run(Some("two\nlines"));
    assert_eq!(code, 1);
    assert!(
        err.contains("request_headers.set.Authorization: not a valid header value"),
        "{err}"
    );
    assert!(!err.contains("two"), "{err}");

    let p = write(
        "reserved.yaml",
        "upstreams:\n  a:\n    endpoints: [{url: 'http://127.0.0.1:9001'}]\n    request_headers: { remove: [x-a, Host] }\nroutes:\n  - upstream: a\n",
    );
    let (code, _, err) = check(&p);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:4:38: upstreams.a.request_headers.remove[1]: `host` cannot be changed here: the gateway sets it (or it is hop-by-hop)",
            p.display()
        )
    );
}

#[test]
fn check_inspects_the_store_without_creating_it() {
    let dir = support::TempDir::new("cli");
    let db = dir.join("state.db");
    let cfg = |db: &std::path::Path| {
        format!(
            "store: {{ path: '{}' }}\nupstreams:\n  a: {{ endpoints: [{{url: 'http://127.0.0.1:9001'}}] }}\nroutes:\n  - upstream: a\n",
            db.display()
        )
    };
    let p = write("store.yaml", &cfg(&db));
    let (code, out, err) = check(&p);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.ends_with(&format!(
            "# store: {} does not exist; `run` will create it\n",
            db.display()
        )),
        "{out}"
    );
    assert!(!db.exists(), "check must not create the store file");

    // Not a SQLite file: exit 1, the path named as any config error is, nothing on stdout.
    std::fs::write(&db, "not sqlite, just text that is long enough to have a header ........................................").unwrap();
    let (code, out, err) = check(&p);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:1:10: store.path: store {}: not a SQLite database",
            p.display(),
            db.display()
        )
    );

    // A directory that does not exist.
    let p = write("nodir.yaml", &cfg(&dir.join("nope/state.db")));
    let (code, _, err) = check(&p);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("{}:1:10: store.path: ", p.display())),
        "{err}"
    );
    assert!(err.contains("the directory"), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    // Redis is refused at load, placed in the file.
    let p = write(
        "redis.yaml",
        "store:\n  redis: redis://127.0.0.1:6379\nupstreams: {}\n",
    );
    let (code, _, err) = check(&p);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "{}:2:3: store.redis: not available yet",
            p.display()
        )),
        "{err}"
    );
}

/// `bulwark run` as a child process (so signals never reach the test runner), its JSON log lines
/// (stdout) collected as they come. Killed on drop if the test did not see it exit.
#[cfg(unix)]
struct RunningBinary {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _config: Written,
}

#[cfg(unix)]
impl RunningBinary {
    /// Starts `bulwark run` on `yaml` (which should log JSON at `info`, to find its addresses).
    fn spawn(yaml: &str) -> RunningBinary {
        RunningBinary::spawn_with(yaml, 2)
    }

    /// [`spawn`](Self::spawn) with `--threads threads`.
    fn spawn_with(yaml: &str, threads: usize) -> RunningBinary {
        use std::process::Stdio;
        let config = write("run.yaml", yaml);
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(["run", "--threads", &threads.to_string(), "-c"])
            .arg(&*config)
            .env_remove("BULWARK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = support::gather_lines(&mut child);
        RunningBinary {
            child,
            lines,
            _config: config,
        }
    }

    /// The first log line containing `needle`, if any yet.
    fn log(&self, needle: &str) -> Option<String> {
        let lines = self.lines.lock().unwrap();
        lines.iter().find(|l| l.contains(needle)).cloned()
    }

    /// Waits for the `bulwark listening` line; returns its `fields` (`listen`, `admin`).
    async fn listening(&self) -> serde_json::Value {
        support::wait_until(20, || self.log("bulwark listening").is_some()).await;
        let line = self.log("bulwark listening").unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        v["fields"].clone()
    }

    /// Sends `sig` (`-TERM`, `-INT`...) with kill(1).
    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Waits up to `secs` for the process to exit (polling, so nothing blocks the runtime).
    async fn exited_within(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the binary did not exit within {secs}s; log:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

#[cfg(unix)]
impl Drop for RunningBinary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `bulwark run` with `drain_timeout` in front of an upstream that never answers, and one request
/// held there (the upstream accepted it).
#[cfg(unix)]
async fn holding_a_request(
    drain_timeout: &str,
) -> (RunningBinary, support::RawClient, support::Silent) {
    let up = support::Silent::start().await;
    let gw = RunningBinary::spawn(&format!(
        "listen: 127.0.0.1:0
drain_timeout: {drain_timeout}
logging: {{ format: json, level: info }}
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
    timeout: 1h
",
        up.url()
    ));
    let fields = gw.listening().await;
    let proxy: std::net::SocketAddr = fields["listen"].as_str().unwrap().parse().unwrap();
    let mut held = support::RawClient::connect_to(proxy).await;
    held.send(b"GET /forever HTTP/1.1\r\nHost: held\r\n\r\n")
        .await;
    let accepted = up.accepted.clone();
    support::wait_until(10, || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    (gw, held, up)
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_with_a_request_held_past_drain_timeout_exits_and_closes_the_client() {
    let (mut gw, mut held, up) = holding_a_request("300ms").await;

    gw.signal("-TERM");
    let status = gw.exited_within(10).await;
    // The drain gave up on the held request, said so, and the shutdown still counts as clean.
    assert!(
        gw.log("drain timeout reached").is_some(),
        "no drain-timeout warning; log:\n{}",
        gw.lines.lock().unwrap().join("\n")
    );
    assert!(status.success(), "{status}");

    // The held client is not left hanging: its connection ends, without a success.
    assert!(
        held.closed_within(10).await,
        "the held client connection is still open"
    );
    let got = String::from_utf8_lossy(&held.buf).into_owned();
    assert!(!got.starts_with("HTTP/1.1 2"), "{got}");
    // And the upstream connection the request held is released too.
    let closed = up.closed.clone();
    support::wait_until(10, || closed.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
}

#[cfg(unix)]
#[tokio::test]
async fn sigint_drains_like_sigterm_the_request_in_flight_completes_and_exit_is_0() {
    let (up, release) = support::Upstream::held("slow", "done").await;
    let mut gw = RunningBinary::spawn(&format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
drain_timeout: 30s
logging: {{ format: json, level: info }}
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
",
        up.url()
    ));
    let fields = gw.listening().await;
    let proxy = fields["listen"].as_str().unwrap().to_owned();
    let admin = fields["admin"].as_str().unwrap().to_owned();
    let c = support::client();
    assert_eq!(
        support::get(&c, &format!("http://{admin}/ready"))
            .await
            .status,
        200
    );

    let url = format!("http://{proxy}/slow");
    let inflight = tokio::spawn(async move { support::get(&support::client(), &url).await });
    let u = &up;
    support::wait_until(10, || u.hits() == 1).await;

    gw.signal("-INT");
    // SIGINT starts the drain: /ready turns 503 and the proxy stops accepting.
    let ready = format!("http://{admin}/ready");
    support::wait_for(10, || {
        let (c, ready) = (c.clone(), ready.clone());
        async move {
            let g = support::get(&c, &ready).await;
            g.status == 503 && g.text().contains("draining")
        }
    })
    .await;
    let proxy_addr: std::net::SocketAddr = proxy.parse().unwrap();
    support::wait_for(10, || async move {
        tokio::net::TcpStream::connect(proxy_addr).await.is_err()
    })
    .await;
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "exited while a request was in flight"
    );

    // The request in flight finishes, whole, then the process exits 0.
    release.notify_one();
    let got = inflight.await.unwrap();
    assert_eq!((got.status.as_u16(), got.text()), (200, "done".to_owned()));
    let status = gw.exited_within(10).await;
    assert!(status.success(), "{status}");
    assert!(gw.log("bulwark stopped").is_some());
    assert!(gw.log("drain timeout reached").is_none());
}

/// With `--threads 1` the process keeps one thread while it serves, its config file watched: a
/// second one (a blocking-pool thread woken by every look at the file, as there once was) makes
/// every socket call dearer, since glibc then treats them as cancellation points.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn one_worker_thread_means_one_thread() {
    let up = support::Upstream::named("up").await;
    let gw = RunningBinary::spawn_with(
        &format!(
            "listen: 127.0.0.1:0
logging: {{ format: json, level: info }}
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
",
            up.url()
        ),
        1,
    );
    let proxy = gw.listening().await["listen"].as_str().unwrap().to_owned();
    assert_eq!(
        support::get(&support::client(), &format!("http://{proxy}/"))
            .await
            .status,
        200
    );
    // Past two looks at the config file (one a second).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let tasks = std::fs::read_dir(format!("/proc/{}/task", gw.child.id()))
        .unwrap()
        .count();
    assert_eq!(tasks, 1, "threads of bulwark run --threads 1");
}

/// Ctrl-C early in `bulwark demo` (here as soon as its temporary directory exists, before or just
/// after the load starts) takes everything down: no `bulwark-demo-*` directory is left behind. (A
/// SIGINT during the set-up used to kill the process before it could remove it.)
#[tokio::test]
async fn an_early_ctrl_c_in_demo_leaves_no_temporary_directory() {
    let tmp = support::TempDir::new("demo-tmp");
    let leftovers = || {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("bulwark-demo-"))
            .count()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["demo", "--duration", "20s"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    support::wait_until(20, || leftovers() == 1).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let mut status = None;
    support::wait_until(30, || {
        status = child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    let status = status.unwrap();
    // 130 when the set-up was interrupted, 0 when the load had begun and ended early.
    assert!(matches!(status.code(), Some(130 | 0)), "{status:?}");
    assert_eq!(leftovers(), 0, "the temporary directory was left behind");
}

/// A second SIGINT during the drain stops the process at once (exit 1), instead of waiting out
/// the whole `drain_timeout` (here 1 h) for a request that never ends.
#[cfg(unix)]
#[tokio::test]
async fn a_second_sigint_during_the_drain_stops_at_once() {
    let (mut gw, _held, _up) = holding_a_request("1h").await;
    gw.signal("-INT");
    support::wait_until(10, || gw.log("shutting down: draining").is_some()).await;
    gw.signal("-INT");
    let status = gw.exited_within(10).await;
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(gw.log("second signal").is_some());
}

/// `bulwark run --threads 1` on `yaml`, with `BULWARK_LOG` set to `log` (unset without), its
/// standard output and error piped.
fn run_piped(yaml: &str, log: Option<&str>) -> (std::process::Child, Written) {
    use std::process::Stdio;
    let config = write("run.yaml", yaml);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulwark"));
    cmd.args(["run", "--threads", "1", "-c"]).arg(&*config);
    match log {
        Some(l) => cmd.env("BULWARK_LOG", l),
        None => cmd.env_remove("BULWARK_LOG"),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, config)
}

/// An invalid `BULWARK_LOG` is reported on stderr, and `logging.level` applies instead (it was
/// replaced by `info` without a word).
#[test]
fn an_invalid_bulwark_log_is_reported_and_logging_level_applies() {
    let (mut child, _config) = run_piped(
        "listen: 127.0.0.1:0\nlogging: { format: json, level: error }\n",
        Some("bulwark_gateway=loud"),
    );
    // `error` level: nothing on stdout at start; the stderr line comes before anything listens.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.contains("BULWARK_LOG `bulwark_gateway=loud` is not a valid filter")
            && line.contains("using logging.level `error`"),
        "{line}"
    );
}

/// `logging.format: text` to a pipe or a file (journald, `docker logs`) has no ANSI colour codes.
#[test]
fn text_logs_to_a_pipe_have_no_ansi_escapes() {
    use std::io::{BufRead, BufReader};
    let (mut child, _config) = run_piped(
        "listen: 127.0.0.1:0\nlogging: { format: text, level: info }\n",
        None,
    );
    // Up to the `listening` line (a warning about the open-file limit may come first).
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("bulwark listening");
        lines.push(line);
        if done || lines.len() > 10 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("bulwark listening")),
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "ANSI escapes in a piped log: {lines:?}"
    );
}

/// `bulwark check` prints "the effective config with every default filled in": also the admin
/// listener's `allowed_hosts` (default `[]`) and an upstream's `tls.crl_leaf_only` (default
/// `false`), which it used to leave out. Found by a review.
#[test]
fn check_prints_the_documented_defaults_of_admin_and_upstream_tls() {
    let dir = support::TempDir::new("check-defaults");
    let path = dir.join("gw.yaml");
    std::fs::write(
        &path,
        "admin: {}
upstreams:
  llm:
    endpoints: [ { url: 'https://api.example.com' } ]
    tls: { server_name: api.example.com }
routes:
  - upstream: llm
",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("  listen: 127.0.0.1:9901\n"), "{stdout}");
    assert!(
        stdout.contains("      server_name: api.example.com\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  allowed_hosts: []\n"),
        "admin.allowed_hosts (default `[]`) is not in the effective config:\n{stdout}"
    );
    assert!(
        stdout.contains("      crl_leaf_only: false\n"),
        "upstreams.llm.tls.crl_leaf_only (default `false`) is not in the effective config:\n{stdout}"
    );
}

/// `--threads 0` is a usage error naming the flag (exit 2, as clap gives for any bad value); it
/// was silently taken as 1. Found by a review; failed before its fix.
#[test]
fn threads_zero_is_a_usage_error() {
    let cfg = write(
        "gw.yaml",
        "listen: 127.0.0.1:0\nupstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }\n",
    );
    for bad in ["0", "many", "100000"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .args(["run", "--threads", bad, "-c"])
            .arg(&*cfg)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Accepted, it would serve: stopped after 15 s.
        let _ = support::exit_within(&mut child, 15);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--threads {bad}: {stderr}");
        assert!(stderr.contains("--threads"), "{stderr}");
    }
}

/// An empty (or comments-only) file is refused by `check` (and so by `run`), as a reload refuses
/// it: every default would be a gateway without a route, answering 404 to everything.
#[test]
fn an_empty_config_file_is_refused() {
    for content in [
        "",
        "\n  \n",
        "# to do\n\n  # later\n",
        "---\n# nothing yet\n...\n",
        "\u{feff}# saved with a byte order mark\n",
    ] {
        let p = write("empty.yaml", content);
        let (code, out, err) = check(&p);
        assert_eq!(code, 1, "{content:?}: {out}");
        assert_eq!(
            err.trim(),
            format!(
                "{}: .: the file is empty (or only comments): a config needs at least `upstreams` and `routes`",
                p.display()
            ),
            "{content:?}"
        );
    }
}

/// `bulwark run` started with a low soft limit on open files (a shell's usual 1024; here 256)
/// raises it to the hard limit, as HAProxy does from its `maxconn`: the default
/// `max_connections` needs ~20,000 descriptors, and a process out of them fails upstream connects
/// that the breaker and outlier detection then hold against healthy endpoints. When even the hard
/// limit is below what `max_connections` needs, it says so in its log.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn run_raises_the_open_file_limit_and_warns_when_it_is_short() {
    use std::process::Stdio;
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .unwrap();
    if hard == "unlimited" || hard.parse::<u64>().unwrap() <= 256 {
        return; // nothing to raise to here
    }
    let hard: u64 = hard.parse().unwrap();
    for (max_connections, short) in [(100, false), (hard as usize, true)] {
        let config = write(
            "fd.yaml",
            &format!(
                "listen: 127.0.0.1:0
logging: {{ format: json, level: info }}
limits: {{ max_connections: {max_connections} }}
upstreams:
  u: {{ endpoints: [{{url: 'http://127.0.0.1:9'}}] }}
routes:
  - upstream: u
"
            ),
        );
        let mut child = Command::new("sh")
            .args([
                "-c",
                "ulimit -Sn 256 && exec \"$0\" run --threads 1 -c \"$1\"",
            ])
            .arg(env!("CARGO_BIN_EXE_bulwark"))
            .arg(&*config)
            .env_remove("BULWARK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = support::gather_lines(&mut child);
        let seen = |needle: &str| lines.lock().unwrap().iter().any(|l| l.contains(needle));
        support::wait_until(20, || seen("bulwark listening")).await;
        let soft = std::fs::read_to_string(format!("/proc/{}/limits", child.id()))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(3)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(soft, hard, "max_connections {max_connections}");
        assert_eq!(
            seen("open-file limit is below"),
            short,
            "max_connections {max_connections}: {:?}",
            lines.lock().unwrap()
        );
    }
}
