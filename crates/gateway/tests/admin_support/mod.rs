//! Support for the operations tests: a gateway started exactly as `bulwark run` starts it (proxy,
//! admin listener, reloader) from a real config file, and admin API clients.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulwark_gateway::cli::Running;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use super::support::{self, Client, Got};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory for one test's files (removed when the returned guard is dropped).
pub fn temp_dir() -> support::TempDir {
    support::TempDir::new("ops")
}

/// A running gateway with its admin listener and reloader.
pub struct Ops {
    pub running: Option<Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub path: PathBuf,
    header: String,
    pub token: Option<String>,
    /// Holds the config file's directory (removed with the `Ops`).
    _dir: support::TempDir,
}

/// Writes `content` to `path` atomically (write a temporary file, then rename), as editors and
/// config management do, so the reloader never sees a half-written file.
pub fn write_atomic(path: &PathBuf, content: &str) {
    let tmp = path.with_extension(format!("tmp{}", SEQ.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl Ops {
    /// Starts a gateway from `yaml` (without `listen`/`admin`, which are added: ephemeral loopback
    /// ports, and `token_env` naming a variable set to `token` when one is given). The file is
    /// polled every 50 ms.
    pub async fn start(yaml: &str, token: Option<&str>) -> Ops {
        Ops::start_with(yaml, token, Duration::from_millis(50)).await
    }

    /// As [`Ops::start`], polling the file every `poll`.
    pub async fn start_with(yaml: &str, token: Option<&str>, poll: Duration) -> Ops {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let header = match token {
            Some(t) => {
                let var = format!("BULWARK_TEST_ADMIN_TOKEN_{}_{n}", std::process::id());
                std::env::set_var(&var, t);
                format!("listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n  token_env: {var}\n")
            }
            None => "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n".to_owned(),
        };
        let dir = temp_dir();
        let path = dir.join("bulwark.yaml");
        let content = format!("{header}{yaml}");
        std::fs::write(&path, &content).unwrap();
        let config =
            bulwark_gateway::config::load(&path).unwrap_or_else(|e| panic!("{e}\n{content}"));
        let running = bulwark_gateway::cli::start(&path, &config, poll)
            .await
            .unwrap();
        Ops {
            proxy: running.proxy_addr,
            admin: running.admin_addr.unwrap(),
            running: Some(running),
            path,
            header,
            token: token.map(str::to_owned),
            _dir: dir,
        }
    }

    /// Replaces the config file's body (the `listen`/`admin` header is kept).
    pub fn rewrite(&self, yaml: &str) {
        write_atomic(&self.path, &format!("{}{yaml}", self.header));
    }

    pub fn gateway(&self) -> &std::sync::Arc<bulwark_gateway::proxy::Gateway> {
        &self.running.as_ref().unwrap().gateway
    }

    /// Marks endpoint `i` (in priority order) of upstream `up` (un)available, as a health check
    /// would (as [`Gateway::set_available`](crate::support::Gateway::set_available)).
    pub fn set_available(&self, up: &str, i: usize, available: bool) {
        self.gateway().runtime().upstream(up).unwrap().endpoints[i].set_available(available);
    }

    pub fn reloader(&self) -> &std::sync::Arc<bulwark_gateway::reload::Reloader> {
        &self.running.as_ref().unwrap().reloader
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// GET an admin path.
    pub async fn admin_get(&self, c: &Client, path: &str) -> Got {
        support::get(c, &self.admin_url(path)).await
    }

    /// GET an admin path and parse its JSON.
    pub async fn admin_json(&self, c: &Client, path: &str) -> serde_json::Value {
        let g = self.admin_get(c, path).await;
        serde_json::from_slice(&g.body).unwrap_or_else(|e| panic!("{e}: {}", g.text()))
    }

    /// PUT `body` to an admin path with `Authorization: Bearer <token>` when `token` is given.
    pub async fn admin_put(&self, c: &Client, path: &str, token: Option<&str>, body: &str) -> Got {
        let mut b = Request::put(self.admin_url(path)).header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        support::send(c, b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
    }

    /// Sets a breaker with the configured token; asserts 200.
    pub async fn set_breaker(&self, c: &Client, upstream: &str, state: &str) -> serde_json::Value {
        let g = self
            .admin_put(
                c,
                &format!("/api/circuit-breakers/{upstream}"),
                self.token.as_deref(),
                &format!("{{\"state\": \"{state}\"}}"),
            )
            .await;
        assert_eq!(g.status, 200, "{}", g.text());
        serde_json::from_slice(&g.body).unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self, c: &Client) -> String {
        self.admin_get(c, "/metrics").await.text()
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

/// Awaits `cond` (re-evaluated every 10 ms) until it holds, panicking after `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not met within {secs}s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the sample line `series` (exact name and labels) in a metrics text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}
