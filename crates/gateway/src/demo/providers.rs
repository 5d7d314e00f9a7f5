//! Simulated providers: three small HTTP/1.1 servers on loopback that behave like the dependencies a
//! gateway sits in front of.
//!
//! Each provider answers any path (the gateway forwards `/api/...` and `/slow/...` unchanged) and tags
//! every response with `x-demo-provider: <name>`, so the load loop can tell which provider actually
//! served a request that went through the gateway. `GET /health` always answers 200 and is not counted:
//! the gateway's own health checks must not inflate the "errors returned by providers" number the demo
//! is about.
//!
//! Behaviour can be changed while the servers run ([`Providers::take_down`], [`Providers::bring_up`],
//! [`Providers::set_failure_rate`], [`Providers::set_latency`]); that is how the demo makes a breaker open
//! and later recover. Randomness (failures, latencies) comes from one seeded RNG per provider, so a
//! given seed and a given request order give the same answers.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Response header naming the provider that produced a response.
pub const PROVIDER_HEADER: &str = "x-demo-provider";

/// Failure rate of `flaky` while it is up: the "flaky with 30% 5xx".
pub const DEFAULT_FLAKY_FAILURE_RATE: f64 = 0.30;
/// Latency of `healthy` (and of `flaky`): a fast, well-behaved API answer.
pub const DEFAULT_HEALTHY_LATENCY: (Duration, Duration) =
    (Duration::from_millis(5), Duration::from_millis(20));
/// Latency of `slow`: its worst case is well above the `/slow/` route's timeout, so the demo shows
/// timeouts turning into the route's fallback response.
pub const DEFAULT_SLOW_LATENCY: (Duration, Duration) =
    (Duration::from_millis(300), Duration::from_millis(1500));

/// One of the three simulated providers. Its [`name`](Provider::name) is also the upstream name in the
/// demo's gateway config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    /// Always 200, 5-20 ms.
    Healthy,
    /// 30% HTTP 503 with a JSON error body, otherwise 200; can be taken fully down.
    Flaky,
    /// Always 200, but 300-1500 ms.
    Slow,
}

impl Provider {
    /// All providers, in display order.
    pub const ALL: [Provider; 3] = [Provider::Healthy, Provider::Flaky, Provider::Slow];

    /// The provider's name: `healthy`, `flaky` or `slow`.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Healthy => "healthy",
            Provider::Flaky => "flaky",
            Provider::Slow => "slow",
        }
    }

    /// The provider with this name, if any.
    pub fn from_name(name: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }

    fn default_failure_rate(self) -> f64 {
        match self {
            Provider::Flaky => DEFAULT_FLAKY_FAILURE_RATE,
            Provider::Healthy | Provider::Slow => 0.0,
        }
    }

    fn default_latency(self) -> (Duration, Duration) {
        match self {
            Provider::Healthy | Provider::Flaky => DEFAULT_HEALTHY_LATENCY,
            Provider::Slow => DEFAULT_SLOW_LATENCY,
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters of one provider, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderStats {
    /// Which provider.
    pub provider: Provider,
    /// Requests answered (not counting `GET /health`).
    pub requests: u64,
    /// Of those, answered with a 5xx.
    pub errors: u64,
}

/// Live state of one provider, shared by its connections.
#[derive(Debug)]
struct State {
    provider: Provider,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Failure probability in parts per million (an `f64` does not fit an atomic).
    failure_ppm: AtomicU32,
    down: AtomicBool,
    min_latency_us: AtomicU64,
    max_latency_us: AtomicU64,
    /// One RNG per provider so a seed reproduces the same sequence of answers. A std mutex held for two
    /// draws; never across an await.
    rng: Mutex<fastrand::Rng>,
}

const PPM: f64 = 1_000_000.0;

impl State {
    fn new(provider: Provider, seed: u64) -> State {
        let (min, max) = provider.default_latency();
        let state = State {
            provider,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            failure_ppm: AtomicU32::new(0),
            down: AtomicBool::new(false),
            min_latency_us: AtomicU64::new(0),
            max_latency_us: AtomicU64::new(0),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
        };
        state.set_failure_rate(provider.default_failure_rate());
        state.set_latency(min, max);
        state
    }

    fn set_failure_rate(&self, rate: f64) {
        let ppm = (rate.clamp(0.0, 1.0) * PPM).round() as u32;
        self.failure_ppm.store(ppm, Ordering::Relaxed);
    }

    fn set_latency(&self, min: Duration, max: Duration) {
        let min_us = u64::try_from(min.as_micros()).unwrap_or(u64::MAX);
        let max_us = u64::try_from(max.as_micros())
            .unwrap_or(u64::MAX)
            .max(min_us);
        self.min_latency_us.store(min_us, Ordering::Relaxed);
        self.max_latency_us.store(max_us, Ordering::Relaxed);
    }

    /// Decide this request's fate: (fail?, latency).
    fn draw(&self) -> (bool, Duration) {
        let ppm = self.failure_ppm.load(Ordering::Relaxed);
        let down = self.down.load(Ordering::Relaxed);
        let min = self.min_latency_us.load(Ordering::Relaxed);
        let max = self.max_latency_us.load(Ordering::Relaxed).max(min);
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let fail = down || rng.u32(0..1_000_000) < ppm;
        let latency = Duration::from_micros(rng.u64(min..=max));
        (fail, latency)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() == Method::GET && req.uri().path() == "/health" {
            return self.response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"));
        }
        let (fail, latency) = self.draw();
        tokio::time::sleep(latency).await;
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if fail {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let body = format!(
                "{{\"error\":{{\"type\":\"overloaded\",\"message\":\"{} is unavailable (simulated)\"}}}}",
                self.provider
            );
            self.response(StatusCode::SERVICE_UNAVAILABLE, Bytes::from(body))
        } else {
            let body = format!(
                "{{\"provider\":\"{}\",\"answer\":\"ok\",\"n\":{n}}}",
                self.provider
            );
            self.response(StatusCode::OK, Bytes::from(body))
        }
    }

    fn response(&self, status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            PROVIDER_HEADER,
            HeaderValue::from_static(self.provider.name()),
        );
        resp
    }
}

#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

/// The three running providers. Dropping it stops them (the accept loops and every open connection).
#[derive(Debug)]
pub struct Providers {
    servers: Vec<Server>,
}

impl Providers {
    /// Bind `healthy`, `flaky` and `slow` on `127.0.0.1:0` and serve them on the current tokio runtime.
    /// `seed` seeds each provider's RNG (mixed with the provider, so they differ).
    pub async fn start(seed: u64) -> io::Result<Providers> {
        let mut servers = Vec::with_capacity(Provider::ALL.len());
        for provider in Provider::ALL {
            let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
            let addr = listener.local_addr()?;
            let provider_seed =
                seed ^ (0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(provider.index() as u64 + 1));
            let state = Arc::new(State::new(provider, provider_seed));
            let accept = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
            servers.push(Server {
                addr,
                state,
                accept,
            });
        }
        Ok(Providers { servers })
    }

    fn server(&self, provider: Provider) -> &Server {
        // `start` pushes one server per provider in `Provider::ALL` order, and `index` is that order.
        &self.servers[provider.index()]
    }

    /// The address `provider` listens on.
    pub fn addr(&self, provider: Provider) -> SocketAddr {
        self.server(provider).addr
    }

    /// `http://127.0.0.1:<port>` of `provider`.
    pub fn url(&self, provider: Provider) -> String {
        format!("http://{}", self.addr(provider))
    }

    /// Counters of every provider, in [`Provider::ALL`] order.
    pub fn stats(&self) -> Vec<ProviderStats> {
        Provider::ALL
            .into_iter()
            .map(|p| self.stats_of(p))
            .collect()
    }

    /// Counters of one provider.
    pub fn stats_of(&self, provider: Provider) -> ProviderStats {
        let state = &self.server(provider).state;
        ProviderStats {
            provider,
            requests: state.requests.load(Ordering::Relaxed),
            errors: state.errors.load(Ordering::Relaxed),
        }
    }

    /// Set the probability (clamped to 0..=1) that `provider` answers 503.
    pub fn set_failure_rate(&self, provider: Provider, rate: f64) {
        self.server(provider).state.set_failure_rate(rate);
    }

    /// Set `provider`'s latency range (uniform between `min` and `max`; `max` below `min` counts as `min`).
    pub fn set_latency(&self, provider: Provider, min: Duration, max: Duration) {
        self.server(provider).state.set_latency(min, max);
    }

    /// Take `provider` fully down: every request (except `GET /health`) gets a 503 until
    /// [`bring_up`](Providers::bring_up). The listener stays up, so this is an outage of the service,
    /// not of the network: what an overloaded or broken API provider looks like.
    pub fn take_down(&self, provider: Provider) {
        self.server(provider)
            .state
            .down
            .store(true, Ordering::Relaxed);
    }

    /// Undo [`take_down`](Providers::take_down): back to the provider's failure rate.
    pub fn bring_up(&self, provider: Provider) {
        self.server(provider)
            .state
            .down
            .store(false, Ordering::Relaxed);
    }

    /// Whether `provider` is taken down.
    pub fn is_down(&self, provider: Provider) -> bool {
        self.server(provider).state.down.load(Ordering::Relaxed)
    }
}

impl Drop for Providers {
    fn drop(&mut self) {
        for server in &self.servers {
            // Aborting the accept loop drops its `JoinSet`, which aborts every connection task.
            server.accept.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::debug!(provider = %state.provider, %err, "demo provider: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(state.handle(req).await) }
                    });
                    // A client closing its connection mid-request is normal under load; nothing to do.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Reap finished connections so the set does not grow for the whole run.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
