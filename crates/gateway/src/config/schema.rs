//! The config schema: plain data, `deny_unknown_fields` everywhere, defaults as named constants.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::units::{ByteSize, Dur};

// ---- defaults -------------------------------------------------------------------------------------

/// Where the proxy listens when `listen` is not given: loopback, so a bare config exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Largest request head: 32 KiB is what large cookie/JWT-laden requests need, and nginx's 4 x 8 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: ByteSize = ByteSize::kib(32);
/// Largest request body: 10 MiB covers API payloads (LLM prompts included) without inviting abuse.
pub const DEFAULT_MAX_BODY_BYTES: ByteSize = ByteSize::mib(10);
/// Time to receive a complete request head; short enough to shed slow-loris clients.
pub const DEFAULT_HEADER_READ_TIMEOUT: Dur = Dur::from_secs(10);
/// Default `limits.lingering_timeout`.
pub const DEFAULT_LINGERING_TIMEOUT: Dur = Dur::from_secs(2);
/// Keep-alive idle time before a client connection is closed; above common client pool timeouts.
pub const DEFAULT_IDLE_TIMEOUT: Dur = Dur::from_secs(60);
/// Concurrent client connections; beyond this the listener stops accepting until one closes.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// `limits.max_concurrent_streams` (hyper's default).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Default most header fields in a request (Envoy's `max_headers_count`, hyper's).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// The largest `limits.max_headers` (the HTTP/1.1 parser's slots).
pub const MAX_MAX_HEADERS: usize = 1000;
/// How long a shutdown waits for in-flight requests before dropping them.
pub const DEFAULT_DRAIN_TIMEOUT: Dur = Dur::from_secs(30);
/// Clients a route's `client_rate_limit` remembers at most (one bucket of 8 bytes plus the map's
/// entry each).
pub const DEFAULT_CLIENT_MAX_KEYS: usize = 100_000;
/// `admission.queue_timeout`: a request waits at most a second for a slot, then is shed.
pub const DEFAULT_ADMISSION_QUEUE_TIMEOUT: Dur = Dur::from_secs(1);
/// `Retry-After` of the 503s a mode (maintenance, read-only, degraded) gives: a minute.
pub const DEFAULT_MODE_RETRY_AFTER: Dur = Dur::from_secs(60);
/// Admin listener, loopback only by default.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Embedded store file.
pub const DEFAULT_STORE_PATH: &str = "./bulwark.db";
/// Idle upstream connections kept per endpoint: enough for bursts at one core, bounded memory.
pub const DEFAULT_POOL_MAX_IDLE: usize = 128;
/// Idle upstream connections older than this are closed; below typical server keep-alive (often 60 s+)
/// so we close first and rarely send on a connection the server is closing.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Dur = Dur::from_secs(30);
/// `pool.ping_interval`: an HTTP/2 upstream connection is pinged this often.
pub const DEFAULT_POOL_PING_INTERVAL: Dur = Dur::from_secs(10);
/// `pool.ping_timeout`: an unanswered ping closes the connection after this long.
pub const DEFAULT_POOL_PING_TIMEOUT: Dur = Dur::from_secs(5);
/// `pool.h2_stream_window`: the HTTP/2 flow-control window of each stream to an upstream (what the
/// upstream may send ahead of the client reading it).
pub const DEFAULT_POOL_H2_STREAM_WINDOW: ByteSize = ByteSize::mib(1);
/// `pool.h2_connection_window`: the window of a whole HTTP/2 upstream connection, as Go's HTTP/2
/// client sets it (1 GiB): large enough that streams whose clients read nothing cannot use it up
/// and stall the other clients' streams on the shared connection; memory is bounded per stream.
pub const DEFAULT_POOL_H2_CONNECTION_WINDOW: ByteSize = ByteSize::mib(1024);
/// TCP connect timeout to an endpoint; a connect is one round trip, so 1 s is generous on a LAN.
pub const DEFAULT_CONNECT_TIMEOUT: Dur = Dur::from_secs(1);
/// Whole-request timeout of a route, all attempts included.
pub const DEFAULT_ROUTE_TIMEOUT: Dur = Dur::from_secs(30);
/// Request bodies up to this size are kept so they can be retried; larger ones stream and are not retried.
pub const DEFAULT_RETRY_BUFFER: ByteSize = ByteSize::kib(64);
/// Attempts per upstream (first try included) when a `retry` section is present.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 3;
/// First backoff step.
pub const DEFAULT_BACKOFF_BASE: Dur = Dur::from_millis(100);
/// Backoff cap.
pub const DEFAULT_BACKOFF_MAX: Dur = Dur::from_secs(5);
/// Retry budget: retries may add at most 20% load on top of first attempts (Finagle's default).
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Retry budget floor, so low-traffic routes can still retry.
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
/// Retry budget accounting window (Finagle's 10 s).
pub const DEFAULT_BUDGET_WINDOW: Dur = Dur::from_secs(10);
/// Extra hedged requests at most.
pub const DEFAULT_MAX_HEDGES: u32 = 1;
/// Hedge after the observed p95: only the slowest 5% get a second request.
pub const DEFAULT_HEDGE_PERCENTILE: f64 = 95.0;
/// Fallback status: "unavailable", the honest default for a static degraded answer.
pub const DEFAULT_FALLBACK_STATUS: u16 = 503;
/// Health check defaults (Envoy-like): probe every 5 s, 1 s timeout, 3 failures down, 2 successes up.
pub const DEFAULT_HC_PATH: &str = "/health";
/// Health check interval.
pub const DEFAULT_HC_INTERVAL: Dur = Dur::from_secs(5);
/// Health check timeout.
pub const DEFAULT_HC_TIMEOUT: Dur = Dur::from_secs(1);
/// Consecutive failed probes before an endpoint is unhealthy.
pub const DEFAULT_HC_UNHEALTHY_THRESHOLD: u32 = 3;
/// Consecutive good probes before it is healthy again.
pub const DEFAULT_HC_HEALTHY_THRESHOLD: u32 = 2;
/// Consecutive failures that eject an endpoint (Envoy's default is 5).
pub const DEFAULT_OD_CONSECUTIVE_FAILURES: u32 = 5;
/// Base ejection time, multiplied by the ejection count.
pub const DEFAULT_OD_EJECTION_TIME: Dur = Dur::from_secs(30);
/// Cap on one ejection.
pub const DEFAULT_OD_MAX_EJECTION_TIME: Dur = Dur::from_secs(300);
/// Never eject more than this share of an upstream's endpoints.
pub const DEFAULT_OD_MAX_EJECTION_PERCENT: u32 = 50;
/// Latency samples an endpoint needs before its p99 is compared with its peers': a p99 of fewer
/// than ~100 samples is just the slowest call seen.
pub const DEFAULT_OD_LATENCY_MIN_SAMPLES: u64 = 100;
/// Health check: statuses that pass when `expected_status` is not given (2xx and 3xx, as HAProxy's
/// `http-check`): a redirect still proves the server is up.
pub const DEFAULT_HC_EXPECTED_STATUS: StatusRange = StatusRange { from: 200, to: 399 };
/// Statuses that put an endpoint in cooldown by default: 429 Too Many Requests.
pub const DEFAULT_COOLDOWN_ON: &[u16] = &[429];
/// Longest cooldown, whatever `Retry-After` asks: a provider asking for an hour is more likely
/// misconfigured than right, and 5 minutes keeps probing it now and then.
pub const DEFAULT_COOLDOWN_MAX: Dur = Dur::from_secs(300);
/// Breaker: count window of the last 100 calls.
pub const DEFAULT_CB_WINDOW_SIZE: u64 = 100;
/// Breaker: no decision before 20 calls in the window.
pub const DEFAULT_CB_MINIMUM_CALLS: u32 = 20;
/// Breaker: open at 50% failures.
pub const DEFAULT_CB_FAILURE_RATE: f64 = 50.0;
/// Breaker: a call slower than this counts as slow.
pub const DEFAULT_CB_SLOW_CALL_DURATION: Dur = Dur::from_secs(2);
/// Breaker: slow calls alone open it only when all are slow.
pub const DEFAULT_CB_SLOW_CALL_RATE: f64 = 100.0;
/// Breaker: stay open 30 s before probing.
pub const DEFAULT_CB_OPEN_DURATION: Dur = Dur::from_secs(30);
/// Breaker: probes allowed in half-open.
pub const DEFAULT_CB_HALF_OPEN_CALLS: u32 = 3;
/// Bulkhead: concurrent calls per upstream.
pub const DEFAULT_BH_MAX_CONCURRENT: u32 = 256;
/// Bulkhead: waiting calls per upstream.
pub const DEFAULT_BH_MAX_QUEUED: u32 = 1024;
/// Bulkhead: longest wait for a slot.
pub const DEFAULT_BH_QUEUE_TIMEOUT: Dur = Dur::from_secs(1);

fn yes() -> bool {
    true
}

// ---- top level ------------------------------------------------------------------------------------

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Proxy listener address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TLS on the proxy listener (ALPN h2, http/1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Client-side limits.
    #[serde(default)]
    pub limits: Limits,
    /// Shutdown drain time for in-flight requests.
    #[serde(default = "default_drain")]
    pub drain_timeout: Dur,
    /// Operating mode: `normal`, `maintenance`, `read_only` or `degraded` (the admin API can override
    /// it at run time).
    #[serde(default)]
    pub mode: Mode,
    /// `Retry-After` of the 503s a mode gives.
    #[serde(default = "default_mode_retry_after")]
    pub mode_retry_after: Dur,
    /// A limit on requests forwarded at once, with a priority queue in front of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,
    /// Admin listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    /// Log format, level and access log.
    #[serde(default)]
    pub logging: Logging,
    /// Shared state store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<Store>,
    /// Named upstreams, in file order.
    #[serde(default)]
    pub upstreams: NamedMap<Upstream>,
    /// Routes, first match wins.
    #[serde(default)]
    pub routes: Vec<Route>,
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
}
fn default_drain() -> Dur {
    DEFAULT_DRAIN_TIMEOUT
}
fn default_mode_retry_after() -> Dur {
    DEFAULT_MODE_RETRY_AFTER
}

/// The gateway's operating mode: what it serves, whatever the upstreams' state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Everything is served.
    #[default]
    Normal,
    /// Nothing is served: every routed request gets 503 (routes may be exempt).
    Maintenance,
    /// Only safe methods (`GET`, `HEAD`, `OPTIONS`, `TRACE`) are served; others get 503.
    ReadOnly,
    /// Optional routes get 503 (or their fallback); the others are served with one attempt per
    /// upstream: no retries, no hedges.
    Degraded,
}

impl Mode {
    /// Every mode, in order.
    pub const ALL: [Mode; 4] = [
        Mode::Normal,
        Mode::Maintenance,
        Mode::ReadOnly,
        Mode::Degraded,
    ];

    /// The name used in the config, the admin API, the store and `x-bulwark-reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Maintenance => "maintenance",
            Mode::ReadOnly => "read_only",
            Mode::Degraded => "degraded",
        }
    }

    /// Its position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The mode named `s` (as [`as_str`](Self::as_str) writes it).
    pub fn from_name(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `tls: { cert, key }`: PEM files.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// `limits:` enforced on every client connection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Request head size; over it 431.
    pub max_header_bytes: ByteSize,
    /// Header fields in a request; over it 431.
    pub max_headers: usize,
    /// Request body size; over it 413.
    pub max_body_bytes: ByteSize,
    /// Time to read a request head.
    pub header_read_timeout: Dur,
    /// Keep-alive idle time.
    pub idle_timeout: Dur,
    /// After refusing a request whose body it did not read, how long to go on reading (and
    /// dropping) what the client still sends, while it keeps sending; 0: no lingering close.
    pub lingering_timeout: Dur,
    /// Concurrent connections.
    pub max_connections: usize,
    /// Concurrent streams (requests) on one HTTP/2 client connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            lingering_timeout: DEFAULT_LINGERING_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// `admin:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Admin listener address.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Env var holding the bearer token for mutating calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Host names the admin listener answers besides IP literals and `localhost` (DNS rebinding
    /// protection): the names operators and scrapers reach it by.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9901)))
}

/// Log level when neither `logging.level` nor `BULWARK_LOG` says otherwise.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// `logging:`. Format and level are read at start; `access_log` follows reloads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Logging {
    /// `text` (human) or `json` (one object per line).
    pub format: LogFormat,
    /// A `tracing` filter: a level (`info`) or directives (`info,bulwark_gateway=debug`).
    pub level: String,
    /// One line per request (target `bulwark::access`); off by default.
    pub access_log: bool,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            format: LogFormat::Text,
            level: DEFAULT_LOG_LEVEL.to_owned(),
            access_log: false,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `store:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// Embedded store file.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// Redis URL for shared state across gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    /// The audit log keeps this many newest entries; each change drops the older ones.
    #[serde(default = "default_audit_max_entries")]
    pub audit_max_entries: u64,
}

fn default_store_path() -> PathBuf {
    PathBuf::from(DEFAULT_STORE_PATH)
}

/// Default of `store.audit_max_entries`.
pub const DEFAULT_AUDIT_MAX_ENTRIES: u64 = 100_000;

fn default_audit_max_entries() -> u64 {
    DEFAULT_AUDIT_MAX_ENTRIES
}

// ---- upstreams ------------------------------------------------------------------------------------

/// One upstream: a set of endpoints with its policies.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Load balancer.
    #[serde(default)]
    pub balance: Balance,
    /// Speak HTTP/2 (prior knowledge) to the endpoints.
    #[serde(default)]
    pub http2: bool,
    /// TCP connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Connection pool per endpoint.
    #[serde(default)]
    pub pool: Pool,
    /// Active health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Passive outlier detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Provider quotas: cooldown of an endpoint on 429 (or other configured statuses) + `Retry-After`.
    /// On by default (429); `cooldown: {enabled: false}` turns it off.
    #[serde(
        default = "default_cooldown",
        deserialize_with = "cooldown_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub cooldown: Option<Cooldown>,
    /// Panic mode (Envoy's `healthy_panic_threshold`): when the percentage of available endpoints
    /// (healthy and not ejected) falls below this, balance over every endpoint of the first tier,
    /// ignoring health and ejection. Absent or 0: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<f64>,
    /// Circuit breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Bulkhead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<Bulkhead>,
    /// Rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// TLS settings for the `https://` endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Headers set on (or removed from) every request sent to the endpoints.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
}

/// `request_headers:` of an upstream (every request and health check sent to its endpoints) or a
/// route, and a route's `response_headers:`: headers set or removed. A value may name environment
/// variables as `${NAME}` (`$$` is a literal `$`); they are read when the config is loaded, and
/// the value is printed as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderRules {
    /// Header name to value; replaces any value the request has under that name.
    #[serde(
        deserialize_with = "unique_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub set: BTreeMap<String, String>,
    /// Header names removed from the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderRules {
    /// Whether the section changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// `tls:` of an upstream: how its `https://` endpoints are verified, and the client certificate the
/// gateway presents to them. Every key is optional; there is deliberately no way to skip
/// verification.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTls {
    /// A PEM bundle of the root certificates trusted for this upstream (private CAs), instead of
    /// Mozilla's roots. Read when the config is loaded; a relative path is relative to the working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The name sent as SNI and checked against the certificate; default: each endpoint's URL host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The client certificate (a PEM chain, leaf first) presented to upstreams that ask for one
    /// (mutual TLS); set together with `key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Certificate revocation lists (one PEM file, one or more `X509 CRL` blocks): a server
    /// certificate revoked by its issuer fails the handshake. Every certificate of the chain below
    /// the trust anchor needs its issuer's CRL in the file (unless `crl_leaf_only`), and an
    /// expired CRL (past its next update) fails the handshake too, as in Envoy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
    /// With `crl`: check the server's own certificate only, not the intermediates (Envoy's
    /// `only_verify_leaf_cert_crl`).
    pub crl_leaf_only: bool,
}

fn default_connect_timeout() -> Dur {
    DEFAULT_CONNECT_TIMEOUT
}

/// One endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `http://host[:port]` or `https://host[:port]`.
    pub url: String,
    /// Relative weight for `weighted`.
    #[serde(default = "one")]
    pub weight: u32,
    /// Priority tier: 0 first; tier n+1 only when no endpoint of tier n is available.
    #[serde(default)]
    pub priority: u8,
}

fn one() -> u32 {
    1
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each endpoint in turn.
    RoundRobin,
    /// Smooth weighted round robin (nginx).
    Weighted,
    /// Power of two choices on in-flight requests; the default because it adapts to load.
    #[default]
    LeastRequest,
    /// Power of two choices on peak-EWMA latency x load.
    PeakEwma,
    /// Uniform random.
    Random,
}

/// `pool:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Idle connections kept per endpoint.
    pub max_idle: usize,
    /// Idle connections older than this are closed.
    pub idle_timeout: Dur,
    /// HTTP/2 upstreams: a ping this often on each connection.
    pub ping_interval: Dur,
    /// HTTP/2 upstreams: a ping unanswered this long closes the connection (a new one is opened).
    pub ping_timeout: Dur,
    /// HTTP/2 upstreams: the flow-control window of each stream.
    pub h2_stream_window: ByteSize,
    /// HTTP/2 upstreams: the flow-control window of each connection.
    pub h2_connection_window: ByteSize,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            max_idle: DEFAULT_POOL_MAX_IDLE,
            idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            ping_interval: DEFAULT_POOL_PING_INTERVAL,
            ping_timeout: DEFAULT_POOL_PING_TIMEOUT,
            h2_stream_window: DEFAULT_POOL_H2_STREAM_WINDOW,
            h2_connection_window: DEFAULT_POOL_H2_CONNECTION_WINDOW,
        }
    }
}

/// `health_check:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// `false` turns it off.
    pub enabled: bool,
    /// `http` probes `path`; `tcp` only connects.
    pub kind: HealthCheckKind,
    /// HTTP path.
    pub path: String,
    /// Statuses that pass: `200` or a range `"200-299"` (default 200-399).
    pub expected_status: StatusRange,
    /// Probe interval.
    pub interval: Dur,
    /// Probe timeout.
    pub timeout: Dur,
    /// Consecutive failures before unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive successes before healthy.
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            enabled: true,
            kind: HealthCheckKind::Http,
            path: DEFAULT_HC_PATH.into(),
            expected_status: DEFAULT_HC_EXPECTED_STATUS,
            interval: DEFAULT_HC_INTERVAL,
            timeout: DEFAULT_HC_TIMEOUT,
            unhealthy_threshold: DEFAULT_HC_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_HC_HEALTHY_THRESHOLD,
        }
    }
}

/// Health check kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// HTTP GET.
    #[default]
    Http,
    /// TCP connect.
    Tcp,
}

/// `outlier_detection:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// `false` turns it off.
    pub enabled: bool,
    /// Consecutive failures that eject.
    pub consecutive_failures: u32,
    /// Base ejection time (x ejection count).
    pub ejection_time: Dur,
    /// Cap on one ejection.
    pub max_ejection_time: Dur,
    /// Never eject more than this percent of endpoints.
    pub max_ejection_percent: u32,
    /// Eject an endpoint whose p99 exceeds this multiple of its peers' median p99 (off when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_multiple: Option<f64>,
    /// Latency samples an endpoint (and each peer counted) needs before the p99 comparison applies.
    pub latency_min_samples: u64,
    /// An ejected endpoint that the active health check finds healthy is taken back at once
    /// (Envoy's `successful_active_health_check_uneject_host`).
    pub uneject_on_health_check: bool,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            enabled: true,
            consecutive_failures: DEFAULT_OD_CONSECUTIVE_FAILURES,
            ejection_time: DEFAULT_OD_EJECTION_TIME,
            max_ejection_time: DEFAULT_OD_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_OD_MAX_EJECTION_PERCENT,
            latency_multiple: None,
            latency_min_samples: DEFAULT_OD_LATENCY_MIN_SAMPLES,
            uneject_on_health_check: true,
        }
    }
}

/// `cooldown:` provider quotas. A response whose status is listed in `on` and that carries
/// `Retry-After` (seconds or an HTTP date) takes its endpoint out of the balancer for that long
/// (at most `max`); separate from outlier ejection, which is about failures.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cooldown {
    /// `false` turns it off.
    pub enabled: bool,
    /// Statuses that start a cooldown (default `[429]`; add 402 for prepaid quotas).
    pub on: Vec<u16>,
    /// Longest cooldown, whatever `Retry-After` says.
    pub max: Dur,
}

/// An upstream without a `cooldown` section still honours its providers' 429 + `Retry-After`.
fn default_cooldown() -> Option<Cooldown> {
    Some(Cooldown::default())
}

/// `cooldown:` left empty (`~`) means the defaults, as no section does; `enabled: false` turns it off.
fn cooldown_or_default<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Cooldown>, D::Error> {
    Ok(Some(
        Option::<Cooldown>::deserialize(d)?.unwrap_or_default(),
    ))
}

impl Default for Cooldown {
    fn default() -> Self {
        Cooldown {
            enabled: true,
            on: DEFAULT_COOLDOWN_ON.to_vec(),
            max: DEFAULT_COOLDOWN_MAX,
        }
    }
}

/// An inclusive range of HTTP statuses, written `200` or `"200-399"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    /// First status that matches.
    pub from: u16,
    /// Last status that matches.
    pub to: u16,
}

impl StatusRange {
    /// Whether `status` is in the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.from..=self.to).contains(&status)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Clone, Copy)]
        struct V;
        impl Visitor<'_> for V {
            type Value = StatusRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status (`200`) or a range (`200-399`)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusRange, E> {
                match u16::try_from(v) {
                    Ok(s) if (100..=599).contains(&s) => Ok(StatusRange { from: s, to: s }),
                    _ => Err(E::custom(format!("`{v}` is not an HTTP status code"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusRange, E> {
                let bad = || {
                    E::custom(format!(
                        "invalid status range `{v}`, expected e.g. `200-399`"
                    ))
                };
                let (a, b) = v.split_once('-').unwrap_or((v, v));
                let a = self.visit_u64::<E>(a.trim().parse().map_err(|_| bad())?)?;
                let b = self.visit_u64::<E>(b.trim().parse().map_err(|_| bad())?)?;
                if a.from > b.to {
                    return Err(bad());
                }
                Ok(StatusRange {
                    from: a.from,
                    to: b.to,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.from == self.to {
            s.serialize_u16(self.from)
        } else {
            s.serialize_str(&format!("{}-{}", self.from, self.to))
        }
    }
}

/// `circuit_breaker:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    /// `false` turns it off.
    pub enabled: bool,
    /// Sliding window.
    pub window: Window,
    /// Calls needed in the window before the breaker may open.
    pub minimum_calls: u32,
    /// Failure percentage that opens it.
    pub failure_rate_threshold: f64,
    /// A call slower than this is slow.
    pub slow_call_duration: Dur,
    /// Slow-call percentage that opens it.
    pub slow_call_rate_threshold: f64,
    /// Time open before half-open.
    pub open_duration: Dur,
    /// Probes in half-open.
    pub half_open_calls: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            enabled: true,
            window: Window::default(),
            minimum_calls: DEFAULT_CB_MINIMUM_CALLS,
            failure_rate_threshold: DEFAULT_CB_FAILURE_RATE,
            slow_call_duration: DEFAULT_CB_SLOW_CALL_DURATION,
            slow_call_rate_threshold: DEFAULT_CB_SLOW_CALL_RATE,
            open_duration: DEFAULT_CB_OPEN_DURATION,
            half_open_calls: DEFAULT_CB_HALF_OPEN_CALLS,
        }
    }
}

/// `window: { kind: count, size: 100 }` or `{ kind: time, size: 60s }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Count or time.
    pub kind: WindowKind,
    /// Calls (count) or a duration (time).
    pub size: WindowSize,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            kind: WindowKind::Count,
            size: WindowSize::Calls(DEFAULT_CB_WINDOW_SIZE),
        }
    }
}

/// Window kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// Last N calls.
    Count,
    /// Last T of time.
    Time,
}

/// Window size: a call count or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSize {
    /// N calls.
    Calls(u64),
    /// A duration.
    Time(Dur),
}

impl<'de> Deserialize<'de> for WindowSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WindowSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a call count (`100`) or a duration (`60s`)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<WindowSize, E> {
                Ok(WindowSize::Calls(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WindowSize, E> {
                super::units::parse_duration(v)
                    .map(|d| WindowSize::Time(Dur(d)))
                    .map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for WindowSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WindowSize::Calls(n) => s.serialize_u64(*n),
            WindowSize::Time(d) => d.serialize(s),
        }
    }
}

/// `admission:`: requests forwarded at once, and a queue served by priority.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admission {
    /// `false` turns it off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Requests forwarded at once (required).
    #[serde(default)]
    pub max_concurrent: usize,
    /// Requests waiting at once (default: `max_concurrent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<usize>,
    /// Longest wait in the queue.
    #[serde(default = "default_admission_queue_timeout")]
    pub queue_timeout: Dur,
    /// A request header by which clients may lower their request's priority below the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_header: Option<String>,
}

fn default_admission_queue_timeout() -> Dur {
    DEFAULT_ADMISSION_QUEUE_TIMEOUT
}

/// A route's priority in the admission queue (`low`, `normal`, `high`, `critical`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutePriority {
    /// Shed first.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Served before normal routes.
    High,
    /// Shed last.
    Critical,
}

impl RoutePriority {
    /// The library's priority.
    pub fn level(self) -> bulwark::shed::Priority {
        match self {
            RoutePriority::Low => bulwark::shed::Priority::Low,
            RoutePriority::Normal => bulwark::shed::Priority::Normal,
            RoutePriority::High => bulwark::shed::Priority::High,
            RoutePriority::Critical => bulwark::shed::Priority::Critical,
        }
    }
}

/// `bulkhead:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bulkhead {
    /// `false` turns it off.
    pub enabled: bool,
    /// Concurrent calls.
    pub max_concurrent: u32,
    /// Waiting calls.
    pub max_queued: u32,
    /// Longest wait.
    pub queue_timeout: Dur,
}

impl Default for Bulkhead {
    fn default() -> Self {
        Bulkhead {
            enabled: true,
            max_concurrent: DEFAULT_BH_MAX_CONCURRENT,
            max_queued: DEFAULT_BH_MAX_QUEUED,
            queue_timeout: DEFAULT_BH_QUEUE_TIMEOUT,
        }
    }
}

/// `rate_limit:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// `false` turns it off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Sustained rate.
    #[serde(default)]
    pub per_second: f64,
    /// Burst above the rate (defaults to one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

// ---- routes ---------------------------------------------------------------------------------------

/// One route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name used in metrics and logs (default: `route<N>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the route matches.
    #[serde(rename = "match", default)]
    pub matcher: Match,
    /// Primary upstream.
    pub upstream: String,
    /// Next upstreams, in order, when one is unavailable or exhausted.
    #[serde(default)]
    pub failover: Vec<String>,
    /// Whole-request timeout, all attempts included.
    #[serde(default = "default_route_timeout")]
    pub timeout: Dur,
    /// Retry policy (one attempt when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Bodies up to this size are buffered so they can be retried.
    #[serde(default = "default_retry_buffer")]
    pub retry_buffer: ByteSize,
    /// Retry POST/PATCH too (otherwise only idempotent methods or requests with `Idempotency-Key`).
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Hedged requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<Hedge>,
    /// Static response when the gateway cannot get one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// Tunnel WebSocket upgrades (HTTP/1.1 clients and upstreams).
    #[serde(default)]
    pub websocket: bool,
    /// Replaces the matched `path_prefix` (or the whole `path`) of the request path upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// Headers set on (or removed from) the route's requests, before the upstream's own.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    /// Headers set on (or removed from) every response of the route, the gateway's own included.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
    /// Modes that do not apply to this route (it is served as in `normal`).
    #[serde(default)]
    pub exempt_modes: Vec<Mode>,
    /// Not served in `degraded` mode (503, or the route's fallback).
    #[serde(default)]
    pub optional: bool,
    /// Injected delays and aborts (fault injection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// A rate limit per client (address or header value) on this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_rate_limit: Option<ClientRateLimit>,
    /// The route's priority in the `admission` queue.
    #[serde(default)]
    pub priority: RoutePriority,
}

/// `client_rate_limit:` on a route: one token bucket per client.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRateLimit {
    /// `false` turns it off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Sustained rate per client.
    #[serde(default)]
    pub per_second: f64,
    /// Burst above the rate (defaults to one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// What tells clients apart.
    #[serde(default)]
    pub key: ClientKey,
    /// Clients remembered at most; beyond, new clients share one bucket.
    #[serde(default = "default_client_max_keys")]
    pub max_keys: usize,
}

fn default_client_max_keys() -> usize {
    DEFAULT_CLIENT_MAX_KEYS
}

/// `client_rate_limit.key`: `client_ip` or `header:<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClientKey {
    /// The address the connection comes from.
    #[default]
    ClientIp,
    /// The value of a request header (lowercase name).
    Header(String),
}

impl<'de> Deserialize<'de> for ClientKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "client_ip" {
            return Ok(ClientKey::ClientIp);
        }
        match s.strip_prefix("header:").map(str::trim) {
            Some(name) if http::HeaderName::from_bytes(name.as_bytes()).is_ok() => {
                Ok(ClientKey::Header(name.to_ascii_lowercase()))
            }
            _ => Err(de::Error::custom(format!(
                "invalid key `{s}`: expected `client_ip` or `header:<name>` (`header:x-api-key`)"
            ))),
        }
    }
}

impl Serialize for ClientKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ClientKey::ClientIp => s.serialize_str("client_ip"),
            ClientKey::Header(h) => s.serialize_str(&format!("header:{h}")),
        }
    }
}

/// `fault:` on a route: delays and aborts injected into a share of its requests, to see how clients
/// (and the gateway's own timeouts and fallbacks) cope, as Envoy's fault filter does.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// `false` turns the section off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Hold a share of requests before they are sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer a share of requests with a status, sending nothing upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// `fault.delay`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    /// How long.
    pub duration: Dur,
    /// Share of requests, 0 to 100.
    pub percent: f64,
}

/// `fault.abort`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    /// The status answered.
    pub status: u16,
    /// Share of requests, 0 to 100.
    pub percent: f64,
}

fn default_route_timeout() -> Dur {
    DEFAULT_ROUTE_TIMEOUT
}
fn default_retry_buffer() -> ByteSize {
    DEFAULT_RETRY_BUFFER
}

/// `match:`; all given conditions must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Path equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Method is one of these (any when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header equals value, for each entry.
    #[serde(
        default,
        deserialize_with = "unique_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub headers: BTreeMap<String, String>,
}

/// `retry:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// `false` turns it off.
    pub enabled: bool,
    /// Attempts per upstream, the first included.
    pub attempts: u32,
    /// Timeout of one attempt (bounded by the route's remaining time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Dur>,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// Conditions that make an attempt retryable.
    pub on: Vec<RetryOn>,
    /// Retry budget; without one a full outage multiplies load by `attempts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            enabled: true,
            attempts: DEFAULT_RETRY_ATTEMPTS,
            per_try_timeout: None,
            backoff: Backoff::default(),
            on: vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::Timeout,
                RetryOn::Server5xx,
                RetryOn::Status(429),
            ],
            budget: None,
        }
    }
}

/// `backoff:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Growth.
    pub kind: BackoffKind,
    /// First delay.
    pub base: Dur,
    /// Cap.
    pub max: Dur,
    /// Randomisation.
    pub jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            kind: BackoffKind::Exponential,
            base: DEFAULT_BACKOFF_BASE,
            max: DEFAULT_BACKOFF_MAX,
            jitter: Jitter::Full,
        }
    }
}

/// Backoff growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackoffKind {
    /// base x 2^n.
    Exponential,
    /// base x (n+1).
    Linear,
    /// base, every time (`fixed` is accepted too).
    #[serde(alias = "fixed")]
    Constant,
    /// base x fib(n): 1, 1, 2, 3, 5, ...
    Fibonacci,
    /// AWS decorrelated jitter: min(max, random(base, previous x 3)); carries its own randomness.
    DecorrelatedJitter,
}

/// Backoff jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Exact delays.
    None,
    /// Uniform in [0, d].
    Full,
    /// Uniform in [d/2, d].
    Equal,
}

/// One retry condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// TCP connect failed (request never sent).
    ConnectFailure,
    /// Connection reset or closed mid-exchange.
    Reset,
    /// Per-try timeout.
    Timeout,
    /// Any 5xx status.
    Server5xx,
    /// This status.
    Status(u16),
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RetryOn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connect_failure, reset, timeout, 5xx or a status code")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RetryOn, E> {
                match u16::try_from(v) {
                    Ok(s) if (100..=599).contains(&s) => Ok(RetryOn::Status(s)),
                    _ => Err(E::custom(format!("`{v}` is not an HTTP status code"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RetryOn, E> {
                match v {
                    "connect_failure" => Ok(RetryOn::ConnectFailure),
                    "reset" => Ok(RetryOn::Reset),
                    "timeout" => Ok(RetryOn::Timeout),
                    "5xx" => Ok(RetryOn::Server5xx),
                    other => match other.parse::<u64>() {
                        Ok(n) => self.visit_u64(n),
                        Err(_) => Err(E::custom(format!(
                            "unknown retry condition `{other}`, expected connect_failure, reset, timeout, 5xx or a status code"
                        ))),
                    },
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::ConnectFailure => s.serialize_str("connect_failure"),
            RetryOn::Reset => s.serialize_str("reset"),
            RetryOn::Timeout => s.serialize_str("timeout"),
            RetryOn::Server5xx => s.serialize_str("5xx"),
            RetryOn::Status(c) => s.serialize_u16(*c),
        }
    }
}

/// `budget:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Retries allowed per first attempt.
    pub ratio: f64,
    /// Retries always allowed per second.
    pub min_per_second: u32,
    /// Accounting window.
    pub window: Dur,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            ratio: DEFAULT_BUDGET_RATIO,
            min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
            window: DEFAULT_BUDGET_WINDOW,
        }
    }
}

/// `hedge:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hedge {
    /// `false` turns it off.
    pub enabled: bool,
    /// When to send a hedge: a duration (`50ms`) or a latency percentile (`p95`).
    pub delay: HedgeDelay,
    /// Extra requests at most.
    pub max_hedges: u32,
}

impl Default for Hedge {
    fn default() -> Self {
        Hedge {
            enabled: true,
            delay: HedgeDelay::Percentile(DEFAULT_HEDGE_PERCENTILE),
            max_hedges: DEFAULT_MAX_HEDGES,
        }
    }
}

/// Hedge delay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    /// Fixed.
    Fixed(Dur),
    /// Observed latency percentile (0-100).
    Percentile(f64),
}

impl<'de> Deserialize<'de> for HedgeDelay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(p) = s.strip_prefix('p') {
            return match p.parse::<f64>() {
                Ok(v) if v > 0.0 && v < 100.0 => Ok(HedgeDelay::Percentile(v)),
                _ => Err(de::Error::custom(format!(
                    "invalid hedge delay `{s}`: a percentile is `p50`..`p99.9`"
                ))),
            };
        }
        super::units::parse_duration(&s)
            .map(|d| HedgeDelay::Fixed(Dur(d)))
            .map_err(de::Error::custom)
    }
}

impl Serialize for HedgeDelay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HedgeDelay::Fixed(d) => d.serialize(s),
            HedgeDelay::Percentile(p) => s.serialize_str(&format!("p{p}")),
        }
    }
}

/// `fallback:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    /// Status.
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    /// Body.
    #[serde(default)]
    pub body: String,
    /// Content type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

fn default_fallback_status() -> u16 {
    DEFAULT_FALLBACK_STATUS
}

// ---- an ordered map that reports duplicates -------------------------------------------------------

/// A YAML mapping kept in file order; a duplicate key is an error placed at the duplicate.
#[derive(Debug, Clone)]
pub struct NamedMap<T>(pub Vec<(String, T)>);

impl<T> Default for NamedMap<T> {
    fn default() -> Self {
        NamedMap(Vec::new())
    }
}

impl<T> NamedMap<T> {
    /// Looks a name up.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
    /// Position of a name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|(k, _)| k == name)
    }
    /// Entries in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NamedMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = NamedMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of names to definitions")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NamedMap<T>, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(k) = map.next_key_seed(UniqueKey(&mut seen))? {
                    out.push((k, map.next_value()?));
                }
                Ok(NamedMap(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// A mapping of names to strings in which a name written twice is an error at the repeat (a plain
/// map would keep the last value silently).
fn unique_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping of names to values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = HashSet::new();
            let mut out = BTreeMap::new();
            while let Some(k) = map.next_key_seed(UniqueKey(&mut seen))? {
                let v = map.next_value()?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

/// Reads a key and fails (inside the parser, so the error carries the key's position) on a repeat.
struct UniqueKey<'a>(&'a mut HashSet<String>);

impl<'de> DeserializeSeed<'de> for UniqueKey<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for UniqueKey<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if !self.0.insert(v.to_owned()) {
            return Err(E::custom(format!("duplicate name `{v}`")));
        }
        Ok(v.to_owned())
    }
}

impl<T: Serialize> Serialize for NamedMap<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}
