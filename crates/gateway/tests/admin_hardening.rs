//! The admin listener against hostile callers: log lines forged through a name, DNS rebinding (a
//! foreign `Host`), and connections that send nothing (HTTP/1.1 or an HTTP/2 preface).
mod admin_support;
mod support;

use admin_support::*;
use support::*;

const TOKEN: &str = "let-me-in";

fn one_upstream(up: &Upstream) -> String {
    format!(
        "upstreams:
  primary:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{}}
routes:
  - name: api
    upstream: primary
",
        up.url()
    )
}

/// One raw HTTP/1.1 request on a fresh connection to the admin listener.
async fn raw_admin(admin: std::net::SocketAddr, request: String) -> RawResponse {
    let mut c = RawClient::connect_to(admin).await;
    c.send(request.as_bytes()).await;
    c.response(request.starts_with("HEAD ")).await
}

/// An unauthenticated caller writes lines of its own into the gateway's log.
///
/// `PUT /api/circuit-breakers/{upstream}` logs a refused call at `warn` with the upstream name taken
/// from the path *after* percent-decoding, and before anything checks that it names an upstream
/// (`set_breaker` in `admin/mod.rs`: `tracing::warn!(upstream = %name, ...)`). `%0A` decodes to a
/// newline, which the text formatter (the default `logging.format`) writes as it is, so anyone who
/// can reach the admin listener, without the token, can forge whole log lines (a fake "breaker
/// set by the admin API" line, a fake access-log line) that log shippers and operators take for
/// the gateway's own. Names are plain config keys that can never hold a control character
/// (`label_safe`), so such a path names no upstream and should be refused without being logged
/// raw (or logged escaped, `?name`).
#[tokio::test]
async fn an_unauthenticated_caller_cannot_forge_log_lines_through_the_upstream_name() {
    let (logs, _guard) = capture_logs();
    let up = Upstream::named("up").await;
    let ops = Ops::start(&one_upstream(&up), Some(TOKEN)).await;
    let forged =
        "2030-01-01T00:00:00.000000Z  WARN bulwark_gateway::proxy: circuit breaker set by \
                  the admin API upstream=primary state=disabled";
    let encoded = forged.replace(' ', "%20");
    let r = raw_admin(
        ops.admin,
        format!(
            "PUT /api/circuit-breakers/x%0A{encoded} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
    )
    .await;
    // Refused: no token.
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    // The warning is emitted before the answer is written, on this test's thread.
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    ops.stop().await;
    let injected: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("2030-01-01T00:00:00"))
        .collect();
    assert!(
        injected.is_empty(),
        "an unauthenticated request wrote its own line into the log: {injected:?}\nwhole log:\n{text}"
    );
}

/// The admin listener answers whatever `Host` a request names: a web page the operator visits can
/// read it through DNS rebinding.
///
/// The listener is on loopback so that only this machine can read it (docs: "Reading is open to
/// whoever can reach it (it listens on loopback by default)"), and the dashboard invites opening it
/// in a browser. A page on `http://rebind.attacker.example:9901/` whose name is then re-pointed to
/// 127.0.0.1 is, for the browser, same-origin with itself, and reads `/api/circuit-breakers`,
/// `/health`, `/metrics` and `/api/audit` (internal endpoint URLs, route names, operator
/// addresses) and sends them home. Nothing in `AdminState::serve` looks at `Host`. The known
/// defence is to answer only `Host` values that name this listener (an IP literal, `localhost`, or
/// names the config lists), as geth (`--http.vhosts`), Jupyter, webpack-dev-server and Vite do for
/// their loopback servers; requests with the loopback `Host` values keep working (asserted first).
#[tokio::test]
async fn a_loopback_admin_listener_refuses_a_foreign_host_dns_rebinding() {
    let up = Upstream::named("up").await;
    let ops = Ops::start(&one_upstream(&up), Some(TOKEN)).await;
    let port = ops.admin.port();
    let paths = [
        "/api/circuit-breakers",
        "/health",
        "/metrics",
        "/api/audit",
        "/dashboard",
    ];
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        for path in paths {
            let r = raw_admin(
                ops.admin,
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            )
            .await;
            assert_eq!(r.status, 200, "GET {path} with Host {host}");
        }
    }
    let host = format!("rebind.attacker.example:{port}");
    let mut answered = Vec::new();
    for path in paths {
        let r = raw_admin(
            ops.admin,
            format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n\
                 Sec-Fetch-Site: same-origin\r\n\r\n"
            ),
        )
        .await;
        if !(400..500).contains(&r.status) {
            answered.push(format!("{path}: {}", r.status));
        }
    }
    ops.stop().await;
    assert!(
        answered.is_empty(),
        "a loopback admin listener served a page of another site (Host {host}): {answered:?}"
    );
}

/// Longest an admin connection may hold a socket without sending a request: the admin's own read
/// timeout (10 s, `ADMIN_READ_TIMEOUT`) with a margin.
const HOLD_LIMIT_SECS: u64 = 25;

/// A connection that never sends a byte is kept open for ever.
///
/// `ADMIN_READ_TIMEOUT` ("time to read an admin request head or body") is given to hyper as the
/// HTTP/1 `header_read_timeout`, but the listener serves with `hyper_util`'s `auto::Builder`, which
/// first reads the connection's opening bytes to tell HTTP/1.1 from an HTTP/2 preface, and that
/// read has no timeout: the HTTP/1 timer only starts once the version is known. The admin listener
/// has no connection limit either (the proxy listener has `limits.max_connections`), so whoever can
/// reach `admin.listen` (every local process; a monitoring network when it is not loopback) can
/// open sockets until the process runs out of file descriptors, which it shares with the proxy:
/// the proxy then can no longer accept clients or connect to upstreams. nginx
/// (`client_header_timeout`, 60 s, counted from the accept) and HAProxy (`timeout http-request`)
/// close such a connection.
#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let up = Upstream::named("up").await;
    let ops = Ops::start(&one_upstream(&up), Some(TOKEN)).await;
    let mut silent = RawClient::connect_to(ops.admin).await;
    let closed = silent.closed_within(HOLD_LIMIT_SECS).await;
    // The listener still serves others meanwhile.
    assert_eq!(ops.admin_get(&client(), "/ready").await.status, 200);
    ops.stop().await;
    assert!(
        closed,
        "a connection that sent nothing was still open after {HOLD_LIMIT_SECS}s"
    );
}

/// The same through HTTP/2: the admin listener speaks h2c (prior knowledge) because it uses the
/// `auto` builder, with no HTTP/2 timer, keep-alive or idle timeout configured, so a client that
/// sends the preface and its SETTINGS and then nothing holds the connection for ever (the HTTP/1
/// `header_read_timeout` does not apply to HTTP/2). Either closing idle HTTP/2 connections or
/// serving HTTP/1.1 only (the dashboard and `curl` need nothing else) ends it.
#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let up = Upstream::named("up").await;
    let ops = Ops::start(&one_upstream(&up), Some(TOKEN)).await;
    let mut idle = RawClient::connect_to(ops.admin).await;
    // Connection preface, then an empty SETTINGS frame; nothing more.
    idle.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await;
    let closed = idle.closed_within(HOLD_LIMIT_SECS).await;
    ops.stop().await;
    assert!(
        closed,
        "an HTTP/2 connection with no request was still open after {HOLD_LIMIT_SECS}s \
         (read from it: {} bytes)",
        idle.buf.len()
    );
}

/// `admin.allowed_hosts` names the hosts an operator reaches the admin listener by; others are
/// still refused.
#[tokio::test]
async fn allowed_hosts_are_answered() {
    let up = Upstream::named("up").await;
    // (Ops writes the `admin:` section last: this line goes into it.)
    let ops = Ops::start(
        &format!("  allowed_hosts: [Gw.Internal]\n{}", one_upstream(&up)),
        Some(TOKEN),
    )
    .await;
    let port = ops.admin.port();
    for (host, status) in [
        (format!("gw.internal:{port}"), 200),
        ("gw.internal".to_owned(), 200),
        (format!("other.example:{port}"), 403),
        (format!("[::1]:{port}"), 200),
        (format!("dash.localhost:{port}"), 200),
    ] {
        let r = raw_admin(
            ops.admin,
            format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, status, "Host {host}");
    }
    ops.stop().await;
}

/// `bulwark run` in a child process whose open-file limit is `nofile` (the shell's `ulimit`),
/// its JSON log lines collected as they come. Killed on drop.
struct Limited {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Limited {
    fn spawn(yaml: &str, nofile: u32) -> Limited {
        use std::process::{Command, Stdio};
        let dir = TempDir::new("admin-emfile");
        let path = dir.join("run.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n {nofile} && exec \"$0\" run --threads 1 -c \"$1\""
            ))
            .arg(env!("CARGO_BIN_EXE_bulwark"))
            .arg(&path)
            .env_remove("BULWARK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = gather_lines(&mut child);
        Limited {
            child,
            lines,
            _dir: dir,
        }
    }

    fn count(&self, needle: &str) -> usize {
        let lines = self.lines.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    fn log(&self, needle: &str) -> Option<String> {
        let lines = self.lines.lock().unwrap();
        lines.iter().find(|l| l.contains(needle)).cloned()
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Out of file descriptors (EMFILE), the admin listener pauses between accepts and logs one line
/// per 5 s, as the proxy's listener does (and nginx and Envoy). It retried at once, spinning a core
/// and writing ~25,000 warnings a second, until a connection closed: a few dozen dashboard tabs
/// or a scraper leaking connections did it (found by a review; failed before its fix).
#[tokio::test]
async fn the_admin_listener_does_not_spin_or_flood_the_log_when_out_of_file_descriptors() {
    let up = Upstream::named("up").await;
    let gw = Limited::spawn(
        &format!(
            "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
logging: {{ format: json }}
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
",
            up.url()
        ),
        48,
    );
    wait_until(20, || gw.log("bulwark listening").is_some()).await;
    let line = gw.log("bulwark listening").unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let admin: std::net::SocketAddr = v["fields"]["admin"].as_str().unwrap().parse().unwrap();

    // More connections than the process may have files: the kernel completes their handshakes
    // (they wait in the backlog), the gateway accepts until it is out of descriptors.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    wait_until(10, || gw.count("accept failed") > 0).await;
    // A second of being out of descriptors (an idle admin connection is closed after 10 s, so
    // none frees one before then): a rate, so measured over a fixed time.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let n = gw.count("accept failed");
    let first = gw.log("accept failed").unwrap_or_default();
    drop(held);
    assert!(
        n <= 2,
        "{n} `accept failed` lines in about a second: the admin accept loop spins\n{first}"
    );
    assert!(first.contains("\"listener\":\"admin\""), "{first}");
}
