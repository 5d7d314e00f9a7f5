//! Shared test support: in-process upstream servers, a real gateway on an ephemeral port, clients.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

pub mod h2raw;
pub mod mutate;

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
    /// Answers 200 with the request's body (`x-upstream: echo`), or 400 `body failed` when the
    /// body could not be read.
    pub async fn echo() -> Upstream {
        Upstream::start(
            "echo",
            Arc::new(|req: Request<Incoming>| {
                Box::pin(async move {
                    match req.into_body().collect().await {
                        Ok(b) => reply("echo", 200, b.to_bytes()),
                        Err(_) => reply("echo", 400, "body failed"),
                    }
                })
            }),
        )
        .await
    }

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

    /// An upstream that holds every request until the returned `Notify` releases it (one request
    /// per `notify_one`), then answers 200 with `body`.
    pub async fn held(name: &str, body: &'static str) -> (Upstream, Arc<Notify>) {
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let n = name.to_owned();
        let up = Upstream::start(
            name,
            Arc::new(move |_req| {
                let (r, n) = (r.clone(), n.clone());
                Box::pin(async move {
                    r.notified().await;
                    reply(&n, 200, body)
                })
            }),
        )
        .await;
        (up, release)
    }

    /// An upstream that answers 200 `ok` at once and reads each request body in the background
    /// (full duplex, so the connection stays keep-alive), reporting every body it read to the end.
    pub async fn reporting_bodies(name: &str) -> (Upstream, mpsc::UnboundedReceiver<Bytes>) {
        let (bodies_tx, bodies) = mpsc::unbounded_channel::<Bytes>();
        let n = name.to_owned();
        let up = Upstream::start(
            name,
            Arc::new(move |req: Request<Incoming>| {
                let (bodies_tx, n) = (bodies_tx.clone(), n.clone());
                Box::pin(async move {
                    tokio::spawn(async move {
                        if let Ok(b) = req.into_body().collect().await {
                            let _ = bodies_tx.send(b.to_bytes());
                        }
                    });
                    reply(&n, 200, "ok")
                })
            }),
        )
        .await;
        (up, bodies)
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

/// An upstream answering `status` with `Retry-After: <retry_after()>` while `quota` holds, 200 after.
pub async fn quota(
    name: &str,
    status: u16,
    quota: Arc<AtomicBool>,
    retry_after: fn() -> String,
) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |_req| {
            let (n, quota) = (n.clone(), quota.clone());
            Box::pin(async move {
                if quota.load(Ordering::SeqCst) {
                    let mut r = reply(&n, status, "out of quota");
                    r.headers_mut()
                        .insert("retry-after", retry_after().parse().unwrap());
                    r
                } else {
                    reply(&n, 200, n.clone())
                }
            })
        }),
    )
    .await
}

/// GETs `url` `n` times, one after another, and returns the `x-upstream` of each answer (or its
/// status when there is none).
pub async fn spray(c: &Client, url: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = get(c, url).await;
        out.push(
            r.header("x-upstream")
                .map(str::to_owned)
                .unwrap_or_else(|| r.status.to_string()),
        );
    }
    out
}

/// GET `url`.
pub async fn get(c: &Client, url: &str) -> Got {
    send(c, Request::get(url).body(Full::default()).unwrap()).await
}

/// GETs `url` and returns the response with its body unread, for tests that read it frame by
/// frame (streaming).
pub async fn get_streaming(c: &Client, url: &str) -> Response<Incoming> {
    c.request(Request::get(url).body(Full::default()).unwrap())
        .await
        .expect("request failed")
}

/// The next data frame of `body`, `None` at its end; panics if nothing comes within 5 s (the
/// gateway held it back) or the body fails.
pub async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("nothing within 5 s: held back by the gateway")
        .map(|f| {
            f.expect("body failed")
                .into_data()
                .expect("not a data frame")
        })
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

/// A config with one upstream `u` at `url` and one catch-all route to it, after `extra` (whole
/// top-level YAML lines, e.g. a `tls:` line).
pub fn one_route(url: &str, extra: &str) -> String {
    format!(
        "{extra}upstreams:\n  u: {{ endpoints: [{{url: '{url}'}}] }}\nroutes:\n  - upstream: u\n"
    )
}

/// [`one_route`] with `limits` (YAML flow mapping entries, e.g. `max_body_bytes: 1KiB`).
pub fn limited_config(url: &str, limits: &str) -> String {
    one_route(url, &format!("limits: {{ {limits} }}\n"))
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

    /// Answers every request of every connection with `respond(request)`, the request as
    /// [`read_head`] returns it (head as sent, `content-length` body appended).
    pub async fn answering(
        respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
    ) -> RawUpstream {
        RawUpstream::serving(respond, false).await
    }

    /// As [`answering`](Self::answering), closing each connection after its first answer.
    pub async fn answering_once(
        respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
    ) -> RawUpstream {
        RawUpstream::serving(respond, true).await
    }

    async fn serving(
        respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
        once: bool,
    ) -> RawUpstream {
        let respond = Arc::new(respond);
        RawUpstream::start(move |mut s, _| {
            let respond = respond.clone();
            async move {
                let mut buf = Vec::new();
                while let Some(req) = read_head(&mut s, &mut buf).await {
                    if s.write_all(&respond(&req)).await.is_err() || once {
                        return;
                    }
                }
            }
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads from `s` into `buf` until it holds a whole request head, and no further (a body is left
/// unread); the length of the head, blank line included, or `None` at EOF.
pub async fn read_head_only(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(p + 4);
        }
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Reads one request head (and a `content-length` body, appended) from `s`, as sent (names keep
/// their case); `None` at EOF. Bytes past the request stay in `buf` for the next call.
pub async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .map_or(0, |v| v.parse().unwrap());
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return Some(head + &body);
            }
        }
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// How reading a response ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed {
    /// The body ended as its framing says.
    Complete,
    /// The connection ended before the framing said the body was over.
    Cut,
}

/// A raw client connection to the gateway (plain TCP, or any stream such as TLS) with its read
/// buffer (bytes of the next response are kept), for tests that need the exact bytes on the wire.
pub struct RawClient<S = TcpStream> {
    pub s: S,
    pub buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(gw: &Gateway) -> RawClient {
        RawClient::connect_to(gw.addr).await
    }

    pub async fn connect_to(addr: SocketAddr) -> RawClient {
        RawClient::new(TcpStream::connect(addr).await.unwrap())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub fn new(s: S) -> RawClient<S> {
        RawClient { s, buf: Vec::new() }
    }

    /// Writes `bytes` and flushes them (a TLS stream buffers).
    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
        self.s.flush().await.unwrap();
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

    /// The next `n` bytes; `None` if the connection ends first.
    pub async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// The next CRLF-terminated line, without its CRLF; `None` if the connection ends first.
    pub async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = self.take(p + 2).await?;
                return Some(String::from_utf8_lossy(&l[..p]).into_owned());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads one response (a HEAD response, a 1xx, 204 and 304 have no body whatever the headers
    /// say): the body as far as it came, and whether its framing completed. Panics on EOF inside
    /// the head or on a malformed one.
    pub async fn read_response(&mut self, head_request: bool) -> (RawResponse, Framed) {
        let status_line = self.line().await.expect("EOF before a status line");
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"))[..3]
            .parse()
            .unwrap();
        let mut headers = Vec::new();
        loop {
            let l = self.line().await.expect("EOF inside a head");
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
        }
        let mut r = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            return (r, Framed::Complete);
        }
        if let Some(n) = r.header("content-length") {
            let n: usize = n.parse().unwrap();
            return match self.take(n).await {
                Some(b) => {
                    r.body = b;
                    (r, Framed::Complete)
                }
                None => {
                    r.body = std::mem::take(&mut self.buf);
                    (r, Framed::Cut)
                }
            };
        }
        if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let Some(size) = self.line().await else {
                    return (r, Framed::Cut);
                };
                let size = usize::from_str_radix(&size, 16).unwrap();
                if size == 0 {
                    loop {
                        match self.line().await {
                            None => return (r, Framed::Cut),
                            Some(l) if l.is_empty() => return (r, Framed::Complete),
                            Some(_) => {}
                        }
                    }
                }
                match self.take(size + 2).await {
                    Some(data) => r.body.extend_from_slice(&data[..size]),
                    None => {
                        r.body.append(&mut self.buf);
                        return (r, Framed::Cut);
                    }
                }
            }
        }
        // Neither length nor chunks: the body runs to the end of the connection.
        while self.fill().await {}
        r.body = std::mem::take(&mut self.buf);
        (r, Framed::Complete)
    }

    /// As [`read_response`](Self::read_response), for a response that must arrive whole: panics if
    /// the connection ends before its framing does.
    pub async fn response(&mut self, head_request: bool) -> RawResponse {
        let (r, framed) = self.read_response(head_request).await;
        assert_eq!(framed, Framed::Complete, "the response was cut: {r:?}");
        r
    }

    /// Whether the gateway closes the connection within `secs` (bytes before EOF are kept).
    pub async fn closed_within(&mut self, secs: u64) -> bool {
        let mut b = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(secs), async {
            loop {
                match self.s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.buf.extend_from_slice(&b[..n]),
                }
            }
        })
        .await
        .is_ok()
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

/// A fresh directory for one test's files (`bulwark-<tag>-<pid>-<n>` under the system's temporary
/// directory), removed with everything in it on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("bulwark-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `localhost`, written as PEM files for the gateway's `tls:`
/// section (removed on drop), and a client that trusts it.
pub struct TestTls {
    _dir: TempDir,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
    cert: rcgen::CertifiedKey,
}

impl TestTls {
    /// A new certificate, its files under a temporary directory named after `tag`.
    pub fn new(tag: &str) -> TestTls {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = TempDir::new(tag);
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        TestTls {
            _dir: dir,
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

/// Captures this test's log lines (text, no ANSI) until the guard is dropped. `#[tokio::test]`
/// runs the gateway's tasks on the test's own thread, so a thread-local subscriber sees them all.
pub fn capture_logs() -> (
    Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || LogCapture(w.clone()))
        .finish();
    (buf, tracing::subscriber::set_default(sub))
}

/// A `tracing` writer into memory (tests that read what was logged).
pub struct LogCapture(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends `n` GETs of `/` through `gw` (each must get 200) and counts the answers by body (the
/// named upstreams answer with their name).
pub async fn answers_by_body(gw: &Gateway, n: usize) -> std::collections::HashMap<String, usize> {
    let c = client();
    let mut m = std::collections::HashMap::new();
    for _ in 0..n {
        let r = get(&c, &gw.url("/")).await;
        assert_eq!(r.status, 200);
        *m.entry(r.text()).or_default() += 1;
    }
    m
}

/// An h2c upstream whose first connection answers the first request's HEADERS with a GOAWAY of
/// last stream id `last` carrying error `code` (RFC 9113 6.8); after an error code it closes the
/// connection, as a server shutting down on an error does. Later connections (h2 crate) answer
/// `ok`. Returns its address and how many connections it accepted.
pub async fn goaway_upstream(code: u32, last: u32) -> (SocketAddr, Arc<AtomicUsize>) {
    // One frame (RFC 9113 4.1): type 4 SETTINGS, 7 GOAWAY; flag 1 is the SETTINGS ACK.
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(payload);
        f
    }
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            if c2.fetch_add(1, Ordering::SeqCst) > 0 {
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((_req, mut respond))) = conn.accept().await {
                        let mut s = respond.send_response(Response::new(()), false).unwrap();
                        s.send_data(Bytes::from("ok"), true).unwrap();
                    }
                });
                continue;
            }
            tokio::spawn(async move {
                // An empty SETTINGS, then frame by frame after the client's 24-byte preface.
                tcp.write_all(&frame(4, 0, &[])).await.unwrap();
                let mut preface = [0u8; 24];
                tcp.read_exact(&mut preface).await.unwrap();
                loop {
                    let mut head = [0u8; 9];
                    if tcp.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = usize::from(head[0]) << 16
                        | usize::from(head[1]) << 8
                        | usize::from(head[2]);
                    let mut payload = vec![0u8; len];
                    if tcp.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    match (head[3], head[4] & 1) {
                        (4, 0) => tcp.write_all(&frame(4, 1, &[])).await.unwrap(),
                        (1, _) => {
                            let mut p = last.to_be_bytes().to_vec();
                            p.extend_from_slice(&code.to_be_bytes());
                            let _ = tcp.write_all(&frame(7, 0, &p)).await;
                            if code != 0 {
                                let _ = tcp.shutdown().await;
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// An upstream that sleeps `delay` before answering 200 with its name.
pub async fn slow(name: &str, delay: Duration) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |_req| {
            let n = n.clone();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                reply(&n, 200, n.clone())
            })
        }),
    )
    .await
}

/// An upstream whose `/health` answers 200 while `up` holds (503 otherwise); every other request
/// gets 200 with its name.
pub async fn checked(name: &str, up: Arc<AtomicBool>) -> Upstream {
    checked_with_delay(name, up, Duration::ZERO).await
}

/// [`checked`], whose answers to requests other than `/health` come after `delay`.
pub async fn checked_with_delay(name: &str, up: Arc<AtomicBool>, delay: Duration) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |req| {
            let (n, up) = (n.clone(), up.clone());
            Box::pin(async move {
                if req.uri().path() == "/health" {
                    let ok = up.load(Ordering::SeqCst);
                    reply(&n, if ok { 200 } else { 503 }, "")
                } else {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    reply(&n, 200, n.clone())
                }
            })
        }),
    )
    .await
}

/// An upstream that reads a request's head only and answers `413 too big!` with
/// `connection: close`, then drops the connection with the body unread (the kernel answers the
/// rest of the upload with a reset): an early refusal of an upload.
pub async fn early_413_upstream() -> RawUpstream {
    RawUpstream::start(|mut s, _| async move {
        // Only the head: the body is left unread.
        if read_head_only(&mut s, &mut Vec::new()).await.is_none() {
            return;
        }
        let _ = s
            .write_all(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!",
            )
            .await;
    })
    .await
}

/// A request body fed from a channel, frame by frame (a client that streams, pauses, gives up).
pub struct ChanBody(pub mpsc::Receiver<http_body::Frame<Bytes>>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

/// An h2c (prior knowledge) connection to `addr`, its connection driven by a task of its own: the
/// sender of requests with bodies of type `B`.
pub async fn h2c_sender<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// The lines a child process (the `bulwark` binary) writes to its piped stdout, gathered as they
/// come by a thread of their own.
pub fn gather_lines(child: &mut std::process::Child) -> Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let out = child.stdout.take().expect("stdout piped");
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

/// Sends `sig` (`-HUP`, `-TERM`, ...) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Its exit status, if the child ends within `secs` (polled: a child process is no future).
pub fn exit_within(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    for _ in 0..secs * 20 {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
