//! The proxy: listener (HTTP/1.1, h2c, TLS), limits, routing, and the attempt loop.
//!
//! A request passes these stages, in order:
//! 1. the connection (accept under `max_connections`; TLS; hyper's HTTP/1.1 or HTTP/2 by preface);
//! 2. limits (head size -> 431, declared body size -> 413, streamed body size -> 413 on overflow);
//! 3. routing (first match wins; 404 otherwise);
//! 4. header rewriting (hop-by-hop out, `x-forwarded-*` and `x-request-id` in);
//! 5. the attempt loop ([`attempt`]) that talks to upstreams;
//! 6. one mapping from outcome to response ([`respond`]).

pub(crate) mod attempt;
pub mod body;
pub mod headers;
pub mod respond;
pub mod route;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::config::Config;
use crate::upstream::Upstream;
use body::RespBody;
use respond::Local;
use route::Route;

/// Limits enforced per request, from `limits:`.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Request head bytes.
    pub max_header_bytes: usize,
    /// Request body bytes.
    pub max_body_bytes: u64,
}

/// The immutable routing state built from one config; swapped whole on reload.
#[derive(Debug)]
pub struct Runtime {
    /// Routes in match order.
    pub routes: Vec<Route>,
    /// Upstreams, indexed by routes' chains.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Request limits.
    pub limits: RequestLimits,
}

impl Runtime {
    /// Builds the runtime of a validated config.
    pub fn new(config: &Config) -> Result<Self, String> {
        Self::with_events(config, &None)
    }

    /// Builds the runtime of a validated config; the policies report their events to `events`.
    pub fn with_events(config: &Config, events: &crate::policy::Events) -> Result<Self, String> {
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for (name, up) in config.upstreams.iter() {
            upstreams.push(Arc::new(
                Upstream::new(name, up, events).map_err(|e| format!("upstreams.{name}.{e}"))?,
            ));
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            routes.push(Route::with_events(
                i,
                r,
                |n| config.upstreams.index_of(n),
                events,
            )?);
        }
        Ok(Runtime {
            routes,
            upstreams,
            limits: RequestLimits {
                max_header_bytes: config.limits.max_header_bytes.as_usize(),
                max_body_bytes: config.limits.max_body_bytes.get(),
            },
        })
    }

    /// An upstream by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| &*u.name == name)
    }
}

/// The gateway's shared state: the current runtime, swappable on reload.
#[derive(Debug)]
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
}

impl Gateway {
    /// A gateway serving `runtime`.
    pub fn new(runtime: Runtime) -> Self {
        Gateway {
            runtime: ArcSwap::from_pointee(runtime),
        }
    }
    /// The current runtime.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }
    /// Swaps in a new runtime; requests in flight finish on the old one.
    pub fn swap(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
    }
}

/// Per-connection state shared with the request service.
#[derive(Debug)]
struct ConnCtx {
    gateway: Arc<Gateway>,
    peer_ip: HeaderValue,
    proto: HeaderValue,
    inflight: AtomicUsize,
    /// Milliseconds since `opened` when a request last started or finished.
    last_active_ms: AtomicU64,
    opened: Instant,
}

/// Decrements in-flight and stamps activity when a request's service future ends (or is dropped).
struct Active<'a>(&'a ConnCtx);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let c = self.0;
        c.last_active_ms
            .store(c.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        c.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(ctx: &ConnCtx, req: Request<Incoming>) -> Response<RespBody> {
    ctx.inflight.fetch_add(1, Ordering::Relaxed);
    let _active = Active(ctx);
    let rt = ctx.gateway.runtime();
    let limits = rt.limits;
    // Stage 2: limits. hyper already refuses heads over its buffer; this makes the limit exact (and
    // covers HTTP/2, whose headers arrive decoded).
    let uri_len = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    if headers::head_size(req.headers(), uri_len) > limits.max_header_bytes {
        return respond::local(Local::HeadersTooLarge);
    }
    if let Some(len) = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limits.max_body_bytes {
            return respond::local(Local::BodyTooLarge);
        }
    }
    // Stage 3: routing.
    let Some(route) = rt.routes.iter().find(|r| r.matcher.matches(&req)) else {
        return respond::local(Local::NoRoute);
    };
    // Stage 4: headers.
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::add_forwarded(&mut parts.headers, &ctx.peer_ip, &ctx.proto);
    let body = Limited::new(
        body,
        usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
    );
    // Stage 5 and 6.
    attempt::forward(&rt, route, parts, body).await
}

/// Listener settings taken from the config at bind time.
#[derive(Debug, Clone)]
struct ListenSettings {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
    drain_timeout: Duration,
}

/// A bound gateway listener, ready to run.
pub struct Server {
    listener: TcpListener,
    gateway: Arc<Gateway>,
    settings: ListenSettings,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Error starting the server.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

impl Server {
    /// Builds the runtime and binds the listener of `config` (port 0 picks a free port).
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let runtime = Runtime::new(config)?;
        let tls = match &config.tls {
            Some(t) => Some(tls_acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        Ok(Server {
            listener,
            gateway: Arc::new(Gateway::new(runtime)),
            settings: ListenSettings {
                header_read_timeout: config.limits.header_read_timeout.get(),
                idle_timeout: config.limits.idle_timeout.get(),
                max_header_bytes: config.limits.max_header_bytes.as_usize(),
                max_connections: config.limits.max_connections,
                drain_timeout: config.drain_timeout.get(),
            },
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The shared gateway state (for reload and the admin API).
    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests finish for up
    /// to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            gateway,
            settings,
            tls,
        } = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes.max(8192) + 1024)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
        let builder = Arc::new(builder);
        let proto = HeaderValue::from_static(if tls.is_some() { "https" } else { "http" });
        let max = settings.max_connections.min(Semaphore::MAX_PERMITS);
        let slots = Arc::new(Semaphore::new(max));
        let (stop_tx, stop_rx) = watch::channel(false);
        let reaper = tokio::spawn(reap_idle(gateway.clone()));

        tokio::pin!(shutdown);
        loop {
            // Stage 1: a connection slot, then accept (beyond max_connections, clients wait in the backlog).
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let ctx = Arc::new(ConnCtx {
                gateway: gateway.clone(),
                peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                    .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
                proto: proto.clone(),
                inflight: AtomicUsize::new(0),
                last_active_ms: AtomicU64::new(0),
                opened: Instant::now(),
            });
            let builder = builder.clone();
            let stop = stop_rx.clone();
            let tls = tls.clone();
            let settings = settings.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tls {
                    None => serve_conn(stream, ctx, &builder, stop, settings.idle_timeout).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            settings.header_read_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => {
                                serve_conn(s, ctx, &builder, stop, settings.idle_timeout).await
                            }
                            _ => tracing::debug!(%peer, "TLS handshake failed or timed out"),
                        }
                    }
                }
            });
        }
        drop(listener);
        reaper.abort();
        let _ = stop_tx.send(true);
        // Drain: every connection holds a slot until it closes.
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        if tokio::time::timeout(settings.drain_timeout, slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("drain timeout reached; dropping remaining connections");
        }
    }
}

async fn reap_idle(gateway: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        for up in &gateway.runtime().upstreams {
            up.reap_idle();
        }
    }
}

async fn serve_conn<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    builder: &auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
    idle: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle_timer, if !closing => {
                let last = ctx.opened + Duration::from_millis(ctx.last_active_ms.load(Ordering::Relaxed));
                if ctx.inflight.load(Ordering::Relaxed) == 0 && Instant::now() >= last + idle {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                } else {
                    idle_timer.as_mut().reset((last + idle).max(Instant::now() + Duration::from_millis(10)));
                }
            }
        }
    }
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("tls: cannot read {}: {e}", p.display()))
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls: bad certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls: no certificate in {}", cert.display()).into());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("tls: bad key {}: {e}", key.display()))?
        .ok_or_else(|| format!("tls: no private key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
