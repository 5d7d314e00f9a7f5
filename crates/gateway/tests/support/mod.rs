//! Shared test support: in-process upstream servers, a real gateway on an ephemeral port, clients.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub type Body = BoxBody<Bytes, Infallible>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// A response with `status`, body `body` and `x-upstream: name`.
pub fn reply(name: &str, status: u16, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("x-upstream", name)
        .body(full(body))
        .unwrap()
}

/// A running in-process upstream.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    kill: watch::Sender<bool>,
}

impl Upstream {
    /// Starts an upstream answering every request with `handler`.
    pub async fn start(name: &str, handler: Handler) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (kill, kill_rx) = watch::channel(false);
        let h = hits.clone();
        tokio::spawn(async move {
            let mut k = kill_rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    _ = k.changed() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let handler = handler.clone();
                let hits = h.clone();
                let mut k2 = kill_rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let f = handler(req);
                        async move { Ok::<_, Infallible>(f.await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = k2.changed() => {} // killed: drop the connection abruptly
                    }
                });
            }
        });
        Upstream {
            name: name.to_owned(),
            addr,
            hits,
            kill,
        }
    }

    /// An upstream that answers 200 with its name.
    pub async fn named(name: &str) -> Upstream {
        let n = name.to_owned();
        Upstream::start(
            name,
            Arc::new(move |_req| {
                let n = n.clone();
                Box::pin(async move { reply(&n, 200, n.clone()) })
            }),
        )
        .await
    }

    /// An upstream that answers with `status` and its name.
    pub async fn status(name: &str, status: u16) -> Upstream {
        let n = name.to_owned();
        Upstream::start(
            name,
            Arc::new(move |_req| {
                let n = n.clone();
                Box::pin(async move { reply(&n, status, format!("{n} says {status}")) })
            }),
        )
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection.
    pub fn kill(&self) {
        let _ = self.kill.send(true);
    }
}

/// A free loopback port with nothing listening on it.
pub async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    format!("http://{a}")
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    pub state: Arc<bulwark_gateway::proxy::Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Starts a gateway from YAML (its `listen` is forced to an ephemeral loopback port).
    pub async fn start(yaml: &str) -> Gateway {
        let yaml = format!("listen: 127.0.0.1:0\n{yaml}");
        let config = bulwark_gateway::config::from_str(&yaml, "test.yaml")
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let server = bulwark_gateway::proxy::Server::bind(&config).await.unwrap();
        let addr = server.local_addr();
        let state = server.gateway();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Gateway {
            addr,
            state,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Marks endpoint `i` (in priority order) of upstream `up` (un)available, as a health check would.
    pub fn set_available(&self, up: &str, i: usize, available: bool) {
        self.state.runtime().upstream(up).unwrap().endpoints[i].set_available(available);
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// An HTTP/1.1 keep-alive client.
pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A finished response: status, headers, body.
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` and reads the whole response.
pub async fn send(c: &Client, req: Request<Full<Bytes>>) -> Got {
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let version = resp.version();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
        version,
    }
}

/// GET `url`.
pub async fn get(c: &Client, url: &str) -> Got {
    send(c, Request::get(url).body(Full::default()).unwrap()).await
}

/// Writes raw bytes to `addr` and reads the response until the server closes or `until` is seen.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && !out.starts_with(b"HTTP/1.1 100") {
                    // Enough for a head; give the body a moment only if a length says so.
                    let text = String::from_utf8_lossy(&out).to_string();
                    if text.to_ascii_lowercase().contains("content-length: 0") {
                        break;
                    }
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until `cond` holds, panicking after `secs`.
pub async fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in {secs}s"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `t` as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), for `Retry-After` dates.
pub fn http_date(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MO: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        WD[(days % 7) as usize],
        MO[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Endpoint `i` (in priority order) of upstream `up` of a running gateway.
pub fn endpoint(gw: &Gateway, up: &str, i: usize) -> Arc<bulwark_gateway::upstream::Endpoint> {
    gw.state.runtime().upstream(up).unwrap().endpoints[i].clone()
}

/// Waits until `cond` holds (async condition), panicking after `secs`.
pub async fn wait_for<F, Fut>(secs: u64, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A raw TCP upstream that reads each request head and never answers, counting the connections
/// it accepted and those the client closed (so a test can see a cancelled request's connection drop).
pub struct Silent {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
}

impl Silent {
    pub async fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    // Read until the peer closes (EOF or error); the request is never answered.
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Silent {
            addr,
            accepted,
            closed,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A config with one upstream `u` at `url`, one catch-all route to it, and `limits` (YAML flow
/// mapping entries, e.g. `max_body_bytes: 1KiB`).
pub fn limited_config(url: &str, limits: &str) -> String {
    format!(
        "limits: {{ {limits} }}\nupstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n"
    )
}

/// A raw TCP upstream: each accepted connection is handed to a script, with its index, so a test
/// controls the exact bytes and the connection's life.
pub struct RawUpstream {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl RawUpstream {
    pub async fn start<F, Fut>(script: F) -> RawUpstream
    where
        F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                let i = a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script(s, i));
            }
        });
        RawUpstream { addr, accepted }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A raw client connection to the gateway with its read buffer (bytes of the next response are
/// kept), for tests that need the exact bytes on the wire.
pub struct RawClient {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(gw: &Gateway) -> RawClient {
        RawClient {
            s: TcpStream::connect(gw.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads more; `false` at EOF (or an error). Panics after 10 s without a byte.
    pub async fn fill(&mut self) -> bool {
        let mut b = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b))
            .await
            .expect("nothing from the gateway within 10 s")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
        }
    }
}

/// One response read off a raw connection (header names lowercased).
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A self-signed certificate for `localhost`, written as PEM files for the gateway's `tls:`
/// section (removed on drop), and a client that trusts it.
pub struct TestTls {
    dir: std::path::PathBuf,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
    cert: rcgen::CertifiedKey,
}

impl TestTls {
    /// A new certificate, its files under a temporary directory named after `tag`.
    pub fn new(tag: &str) -> TestTls {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = std::env::temp_dir().join(format!("bulwark-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        TestTls {
            dir,
            cert_path,
            key_path,
            cert,
        }
    }

    /// The gateway's `tls:` line.
    pub fn config_line(&self) -> String {
        format!(
            "tls: {{ cert: '{}', key: '{}' }}\n",
            self.cert_path.display(),
            self.key_path.display()
        )
    }

    /// A client trusting this certificate, offering the ALPN protocols `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

impl Drop for TestTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
