//! `https://` upstreams: real TLS servers (hyper behind tokio-rustls, HTTP/1.1 and HTTP/2 by
//! ALPN, certificates from rcgen) on loopback. Covers bodies both ways, keep-alive reuse, HTTP/2,
//! certificates that must not be trusted (and retries around them), client certificates (mutual
//! TLS), `server_name`, health checks, streamed request bodies and reloads of the `tls` section.
//! Next to HTTP/2 over TLS: HTTP/2 in cleartext to `http://` endpoints (h2c, prior knowledge).
mod admin_support;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// A self-signed certificate for `names`, its PEM files (certificate, key) in a directory of its own.
struct Cert {
    _dir: support::TempDir,
    cert_path: PathBuf,
    key_path: PathBuf,
    key: rcgen::CertifiedKey,
}

impl Cert {
    fn new(names: &[&str]) -> Cert {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let key = rcgen::generate_simple_self_signed(names).unwrap();
        let dir = support::TempDir::new("uptls");
        let cert_path = dir.join("ca.pem");
        std::fs::write(&cert_path, key.cert.pem()).unwrap();
        let key_path = dir.join("key.pem");
        std::fs::write(&key_path, key.key_pair.serialize_pem()).unwrap();
        Cert {
            _dir: dir,
            cert_path,
            key_path,
            key,
        }
    }

    /// The `tls:` flow mapping trusting this certificate (plus `extra` entries).
    fn tls(&self, extra: &str) -> String {
        format!("tls: {{ ca: '{}'{extra} }}", self.cert_path.display())
    }

    /// `tls:` entries presenting this certificate as the gateway's client certificate.
    fn identity(&self) -> String {
        format!(
            ", cert: '{}', key: '{}'",
            self.cert_path.display(),
            self.key_path.display()
        )
    }

    fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        self.server_config_for(alpn, None)
    }

    /// A server config with this certificate that, with `clients`, requires a client certificate
    /// issued by (here: equal to) `clients`.
    fn server_config_for(
        &self,
        alpn: &[&[u8]],
        clients: Option<&Cert>,
    ) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(self.key.key_pair.serialize_der()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.key.cert.der().clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder
            .with_single_cert(vec![self.key.cert.der().clone()], key)
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// What a TLS upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    version: http::Version,
    host: String,
    user_agent: String,
    chunked: bool,
}

/// A TLS upstream: hyper's server (HTTP/1.1 or HTTP/2, as ALPN chose) answering 200 with the
/// request body echoed (`hello` for an empty one); counts accepted TCP connections and finished
/// TLS handshakes, and records every request.
struct TlsUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The client certificate (leaf, DER) of each finished handshake that had one.
    client_certs: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl TlsUpstream {
    async fn start(cert: &Cert, alpn: &[&[u8]]) -> TlsUpstream {
        TlsUpstream::with_config(cert.server_config(alpn)).await
    }

    async fn with_config(cfg: Arc<rustls::ServerConfig>) -> TlsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let accepted = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let client_certs = Arc::new(Mutex::new(Vec::new()));
        let (a, h, s, cc) = (
            accepted.clone(),
            handshakes.clone(),
            seen.clone(),
            client_certs.clone(),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (acceptor, h, s, cc) = (acceptor.clone(), h.clone(), s.clone(), cc.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                    {
                        cc.lock().unwrap().push(leaf.to_vec());
                    }
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let s = s.clone();
                        async move {
                            let header = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let host = match req.version() {
                                http::Version::HTTP_2 => req
                                    .uri()
                                    .authority()
                                    .map(|a| a.to_string())
                                    .unwrap_or_default(),
                                _ => header("host"),
                            };
                            s.lock().unwrap().push(Seen {
                                path: req.uri().path().to_owned(),
                                version: req.version(),
                                host,
                                user_agent: header("user-agent"),
                                chunked: header("transfer-encoding") == "chunked",
                            });
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let body = if body.is_empty() {
                                Bytes::from_static(b"hello")
                            } else {
                                body
                            };
                            Ok::<_, Infallible>(Response::new(Full::new(body)))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream {
            addr,
            accepted,
            handshakes,
            seen,
            client_certs,
        }
    }

    async fn h1(cert: &Cert) -> TlsUpstream {
        TlsUpstream::start(cert, &[b"h2", b"http/1.1"]).await
    }

    /// `https://localhost:PORT` (the certificates are for `localhost`).
    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// One upstream `u` with `endpoints` (URLs) and the extra upstream keys `extra` (flow entries),
/// one catch-all route to it with `route` (flow entries).
fn config(endpoints: &[String], extra: &str, route: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|u| format!("{{url: '{u}'}}"))
        .collect();
    format!(
        "upstreams:\n  u: {{ endpoints: [{}]{extra} }}\nroutes:\n  - {{ upstream: u, timeout: 10s{route} }}\n",
        eps.join(", ")
    )
}

fn post(url: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::post(url)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn a_get_and_a_large_post_go_through_an_https_upstream_intact() {
    let cert = Cert::new(&["localhost"]);
    let up = TlsUpstream::h1(&cert).await;
    let gw = Gateway::start(&config(
        &[up.url()],
        &format!(", {}", cert.tls("")),
        ", retry_buffer: 2MiB",
    ))
    .await;
    let c = client();
    let g = get(&c, &gw.url("/x")).await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "hello"));
    let s = &up.seen()[0];
    assert_eq!(s.version, http::Version::HTTP_11, "ALPN http/1.1 offered");
    assert_eq!(s.host, format!("localhost:{}", up.addr.port()));

    // 1 MiB, kept for retries (under retry_buffer): our own client, written through TLS.
    let body = pattern(1 << 20);
    let g = send(&c, post(&gw.url("/big"), body.clone())).await;
    assert_eq!(g.status, 200);
    assert!(g.body == body, "1 MiB echoed intact");
    gw.stop().await;

    // The same 1 MiB over a default retry_buffer: streamed on hyper's client over TLS.
    let gw = Gateway::start(&config(&[up.url()], &format!(", {}", cert.tls("")), "")).await;
    let g = send(&c, post(&gw.url("/big"), body.clone())).await;
    assert_eq!(g.status, 200);
    assert!(g.body == body, "1 MiB streamed and echoed intact");
    gw.stop().await;
}

#[tokio::test]
async fn sequential_requests_reuse_one_tls_connection() {
    let cert = Cert::new(&["localhost"]);
    let up = TlsUpstream::h1(&cert).await;
    let gw = Gateway::start(&config(&[up.url()], &format!(", {}", cert.tls("")), "")).await;
    let c = client();
    for i in 0..10 {
        let g = get(&c, &gw.url(&format!("/{i}"))).await;
        assert_eq!(g.status, 200);
        // A body under retry_buffer goes with the head on the pooled connection too.
        let g = send(&c, post(&gw.url("/p"), pattern(5000))).await;
        assert_eq!(g.body.len(), 5000);
    }
    assert_eq!(up.seen().len(), 20);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "one TCP connection");
    assert_eq!(up.handshakes.load(Ordering::SeqCst), 1, "one TLS handshake");
    gw.stop().await;
}

#[tokio::test]
async fn http2_upstreams_negotiate_h2_by_alpn() {
    let cert = Cert::new(&["localhost"]);
    let up = TlsUpstream::h1(&cert).await;
    let extra = format!(", http2: true, {}", cert.tls(""));
    let gw = Gateway::start(&config(&[up.url()], &extra, "")).await;
    let c = client();
    for _ in 0..3 {
        let g = get(&c, &gw.url("/h2")).await;
        assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "hello"));
    }
    let g = send(&c, post(&gw.url("/p"), pattern(300_000))).await;
    assert_eq!(g.body.len(), 300_000);
    let seen = up.seen();
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_2));
    assert_eq!(
        seen[0].host,
        format!("localhost:{}", up.addr.port()),
        ":authority"
    );
    assert_eq!(
        up.handshakes.load(Ordering::SeqCst),
        1,
        "one shared connection"
    );
    gw.stop().await;

    // A server that does not offer h2: the connect fails (502), nothing reaches it.
    let h1_only = TlsUpstream::start(&cert, &[b"http/1.1"]).await;
    let gw = Gateway::start(&config(&[h1_only.url()], &extra, "")).await;
    let g = get(&c, &gw.url("/h2")).await;
    assert_eq!(g.status, 502);
    assert_eq!(g.header("x-bulwark-reason"), Some("upstream_error"));
    assert!(h1_only.seen().is_empty());
    gw.stop().await;
}

/// A cleartext HTTP/2-only upstream (hyper's HTTP/2 server: prior knowledge, no HTTP/1.1 at all)
/// answering 200 with the request body echoed (`hello` for an empty one). Requests to `/held/...`
/// are answered only once `release` says so. Counts accepted TCP connections and the requests
/// received, and records each request's version and `:authority`.
struct H2cUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(http::Version, String)>>>,
    release: tokio::sync::watch::Sender<bool>,
}

impl H2cUpstream {
    async fn start() -> H2cUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (release, release_rx) = tokio::sync::watch::channel(false);
        let (a, rq, s) = (accepted.clone(), requests.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (rq, s, go) = (rq.clone(), s.clone(), release_rx.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (rq, s, mut go) = (rq.clone(), s.clone(), go.clone());
                        async move {
                            let authority = req
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .unwrap_or_default();
                            s.lock().unwrap().push((req.version(), authority));
                            rq.fetch_add(1, Ordering::SeqCst);
                            let held = req.uri().path().starts_with("/held/");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            if held {
                                let _ = go.wait_for(|go| *go).await;
                            }
                            let body = if body.is_empty() {
                                Bytes::from_static(b"hello")
                            } else {
                                body
                            };
                            Ok::<_, Infallible>(Response::new(Full::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        H2cUpstream {
            addr,
            accepted,
            requests,
            seen,
            release,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// Sends `n` GETs to `/held/<i>` at once (each from a client of its own), waits until the upstream
/// holds them all, releases them and checks every answer.
async fn concurrent_held_gets(gw: &Gateway, up: &H2cUpstream, n: usize) {
    let before = up.requests();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = gw.url(&format!("/held/{i}"));
            tokio::spawn(async move { get(&client(), &url).await })
        })
        .collect();
    // All n in flight at the upstream at the same moment.
    wait_until(10, || up.requests() == before + n).await;
    up.release();
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "hello"));
    }
}

#[tokio::test]
async fn http2_cleartext_upstreams_use_prior_knowledge_and_share_one_connection() {
    let up = H2cUpstream::start().await;
    let gw = Gateway::start(&config(&[up.url()], ", http2: true", "")).await;
    let c = client();
    let g = get(&c, &gw.url("/x")).await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "hello"));
    // Bodies both ways: one buffered (under retry_buffer), one streamed (over it).
    let g = send(&c, post(&gw.url("/small"), pattern(5000))).await;
    assert_eq!(g.status, 200);
    assert!(g.body == pattern(5000), "5 kB echoed intact");
    let g = send(&c, post(&gw.url("/big"), pattern(300_000))).await;
    assert_eq!(g.status, 200);
    assert!(g.body == pattern(300_000), "300 kB echoed intact");

    // Several requests in flight at once are streams of the same connection.
    concurrent_held_gets(&gw, &up, 8).await;

    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 11);
    for (version, authority) in &seen {
        assert_eq!(*version, http::Version::HTTP_2);
        assert_eq!(*authority, up.addr.to_string(), ":authority as written");
    }
    assert_eq!(up.accepted(), 1, "one shared HTTP/2 connection");
    gw.stop().await;
}

#[tokio::test]
async fn concurrent_first_requests_to_an_http2_upstream_open_one_connection() {
    let up = H2cUpstream::start().await;
    let gw = Gateway::start(&config(&[up.url()], ", http2: true", "")).await;
    // No connection yet: eight requests arrive together.
    concurrent_held_gets(&gw, &up, 8).await;
    assert_eq!(up.accepted(), 1, "one shared HTTP/2 connection");
    gw.stop().await;
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_502_and_the_gateway_keeps_serving() {
    let cert = Cert::new(&["localhost"]);
    let up = TlsUpstream::h1(&cert).await;
    let plain = Upstream::named("plain").await;
    // No `ca:`: a self-signed certificate is not among Mozilla's roots.
    let yaml = format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\n  p: {{ endpoints: [{{url: '{}'}}] }}\n\
         routes:\n  - {{ match: {{ path_prefix: /tls }}, upstream: u, retry: {{ attempts: 2, backoff: {{ kind: constant, base: 1ms, jitter: none }} }} }}\n  - {{ upstream: p }}\n",
        up.url(),
        plain.url()
    );
    let gw = Gateway::start(&yaml).await;
    let c = client();
    for _ in 0..3 {
        let g = get(&c, &gw.url("/tls")).await;
        assert_eq!(g.status, 502);
        assert_eq!(g.header("x-bulwark-reason"), Some("upstream_error"));
        let g = get(&c, &gw.url("/other")).await;
        assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "plain"));
    }
    assert!(up.seen().is_empty(), "no request was sent");
    assert_eq!(up.handshakes.load(Ordering::SeqCst), 0);
    gw.stop().await;
}

/// An upstream's certificate, the gateway's client certificate, and an HTTP/1.1 TLS upstream that
/// requires that client certificate.
async fn mutual_tls_upstream() -> (Cert, Cert, TlsUpstream) {
    let server = Cert::new(&["localhost"]);
    let gateway_id = Cert::new(&["gateway.test"]);
    let up =
        TlsUpstream::with_config(server.server_config_for(&[b"http/1.1"], Some(&gateway_id))).await;
    (server, gateway_id, up)
}

#[tokio::test]
async fn a_client_certificate_is_presented_to_an_upstream_that_requires_one() {
    let (server, gateway_id, up) = mutual_tls_upstream().await;
    let c = client();

    // Without a client certificate, and with one the upstream does not trust: the upstream ends
    // the handshake, no request reaches it, the client gets 502 and the gateway keeps serving.
    let stranger = Cert::new(&["gateway.test"]);
    for tls in [server.tls(""), server.tls(&stranger.identity())] {
        let gw = Gateway::start(&config(&[up.url()], &format!(", {tls}"), "")).await;
        for _ in 0..2 {
            let g = get(&c, &gw.url("/x")).await;
            assert_eq!(g.status, 502);
            assert_eq!(g.header("x-bulwark-reason"), Some("upstream_error"));
        }
        gw.stop().await;
    }
    assert!(up.seen().is_empty(), "no request was served");
    assert_eq!(up.handshakes.load(Ordering::SeqCst), 0);

    // With the gateway's certificate: served, on one connection, and the upstream saw it.
    let tls = server.tls(&gateway_id.identity());
    let gw = Gateway::start(&config(&[up.url()], &format!(", {tls}"), "")).await;
    for i in 0..3 {
        let g = get(&c, &gw.url(&format!("/{i}"))).await;
        assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "hello"));
    }
    assert_eq!(up.seen().len(), 3);
    assert_eq!(
        *up.client_certs.lock().unwrap(),
        vec![gateway_id.key.cert.der().to_vec()]
    );
    gw.stop().await;
}

#[tokio::test]
async fn requests_retry_around_an_untrusted_or_dead_endpoint() {
    let trusted = Cert::new(&["localhost"]);
    let other = Cert::new(&["localhost"]);
    let good = TlsUpstream::h1(&trusted).await;
    let bad = TlsUpstream::h1(&other).await;
    let dead = format!("https://localhost:{}", {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    });
    let route = ", retry: { attempts: 2, on: [connect_failure], backoff: { kind: constant, base: 1ms, jitter: none } }";
    for broken in [bad.url(), dead] {
        let extra = format!(", balance: round_robin, {}", trusted.tls(""));
        let gw = Gateway::start(&config(&[broken, good.url()], &extra, route)).await;
        let c = client();
        for i in 0..8 {
            let g = get(&c, &gw.url(&format!("/{i}"))).await;
            assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "hello"));
        }
        gw.stop().await;
    }
    assert!(bad.seen().is_empty());
    assert_eq!(good.seen().len(), 16);
}

#[tokio::test]
async fn server_name_overrides_the_url_host() {
    let cert = Cert::new(&["localhost"]);
    let up = TlsUpstream::h1(&cert).await;
    let ip_url = format!("https://127.0.0.1:{}", up.addr.port());
    let c = client();

    // The certificate does not name 127.0.0.1.
    let gw = Gateway::start(&config(
        std::slice::from_ref(&ip_url),
        &format!(", {}", cert.tls("")),
        "",
    ))
    .await;
    assert_eq!(get(&c, &gw.url("/")).await.status, 502);
    gw.stop().await;

    let extra = format!(", {}", cert.tls(", server_name: localhost"));
    let gw = Gateway::start(&config(&[ip_url], &extra, "")).await;
    let g = get(&c, &gw.url("/")).await;
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "hello"));
    assert_eq!(
        up.seen()[0].host,
        format!("127.0.0.1:{}", up.addr.port()),
        "Host stays the URL's"
    );
    gw.stop().await;
}

#[tokio::test]
async fn http_health_checks_run_over_tls() {
    let cert = Cert::new(&["localhost"]);
    let other = Cert::new(&["localhost"]);
    let up = TlsUpstream::h1(&cert).await;
    let untrusted = TlsUpstream::h1(&other).await;
    let hc = "health_check: { path: /health, interval: 50ms, timeout: 2s, unhealthy_threshold: 1, healthy_threshold: 1 }";
    let extra = format!(", {}, {hc}", cert.tls(""));
    let gw = Gateway::start(&config(&[up.url(), untrusted.url()], &extra, "")).await;
    let checker = || {
        gw.state
            .runtime()
            .upstream("u")
            .unwrap()
            .health_checker()
            .unwrap()
            .report()
    };
    wait_until(10, || {
        let r = checker();
        r.components[0].status == bulwark::health::HealthStatus::Healthy
            && r.components[0].detail.is_none()
    })
    .await;
    assert!(endpoint(&gw, "u", 0).is_healthy());
    let seen = up.seen();
    assert!(seen
        .iter()
        .all(|s| s.path == "/health" && s.user_agent == "bulwark-health-check"));
    // Probes go through the pool: one connection carries them all.
    wait_until(10, || up.seen().len() >= 3).await;
    assert_eq!(up.handshakes.load(Ordering::SeqCst), 1);
    // The untrusted endpoint fails its probes and is taken out.
    wait_until(10, || !endpoint(&gw, "u", 1).is_healthy()).await;
    assert!(untrusted.seen().is_empty());
    gw.stop().await;
}

/// POSTs `chunks` to `url` as a chunked body (no length), returning status and body.
async fn post_chunked(addr: SocketAddr, url: &str, chunks: Vec<Bytes>) -> (u16, Bytes) {
    type ChunkBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(c))),
    );
    let body: ChunkBody = StreamBody::new(stream).boxed();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, ChunkBody>(TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(url).body(body).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn a_streamed_chunked_body_arrives_intact_over_tls() {
    let cert = Cert::new(&["localhost"]);
    let up = TlsUpstream::h1(&cert).await;
    let gw = Gateway::start(&config(
        &[up.url()],
        &format!(", {}", cert.tls("")),
        ", retry_buffer: 4KiB",
    ))
    .await;
    let whole = pattern(300_000);
    let chunks: Vec<Bytes> = whole.chunks(7_000).map(Bytes::copy_from_slice).collect();
    for _ in 0..2 {
        let (status, body) = post_chunked(gw.addr, &gw.url("/stream"), chunks.clone()).await;
        assert_eq!(status, 200);
        assert!(body == whole, "streamed body echoed intact");
    }
    assert!(up.seen().iter().all(|s| s.chunked), "sent chunked upstream");
    gw.stop().await;
}

#[tokio::test]
async fn a_reload_rebuilds_an_upstream_whose_tls_section_or_ca_file_changed() {
    use admin_support::Ops;
    let cert = Cert::new(&["localhost"]);
    let up = TlsUpstream::h1(&cert).await;
    let ca_dir = admin_support::temp_dir();
    let ca = ca_dir.join("ca.pem");
    std::fs::copy(&cert.cert_path, &ca).unwrap();
    let yaml = |extra: &str| {
        config(
            &[up.url()],
            &format!(", tls: {{ ca: '{}'{extra} }}", ca.display()),
            "",
        )
    };
    let ops = Ops::start_with(&yaml(""), None, std::time::Duration::from_secs(3600)).await;
    let c = client();
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);

    // Unchanged: kept, connection pool and all.
    ops.rewrite(&yaml(""));
    let r = ops.reloader().reload().unwrap();
    assert_eq!(
        (r.kept.as_slice(), r.rebuilt.len()),
        (&["u".to_owned()][..], 0)
    );

    // A changed tls section: rebuilt.
    ops.rewrite(&yaml(", server_name: localhost"));
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.rebuilt, ["u"]);
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);

    // Same section, but the file behind `ca` now holds another certificate: rebuilt, and the
    // upstream's certificate is no longer trusted.
    let other = Cert::new(&["localhost"]);
    std::fs::copy(&other.cert_path, &ca).unwrap();
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.rebuilt, ["u"]);
    assert_eq!(get(&c, &ops.url("/")).await.status, 502);
    ops.stop().await;
}

#[tokio::test]
async fn a_reload_rebuilds_an_upstream_whose_client_certificate_files_changed() {
    use admin_support::Ops;
    let (server, gateway_id, up) = mutual_tls_upstream().await;
    let dir = admin_support::temp_dir();
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    let install = |id: &Cert| {
        std::fs::copy(&id.cert_path, &cert).unwrap();
        std::fs::copy(&id.key_path, &key).unwrap();
    };
    install(&gateway_id);
    let yaml = config(
        &[up.url()],
        &format!(
            ", {}",
            server.tls(&format!(
                ", cert: '{}', key: '{}'",
                cert.display(),
                key.display()
            ))
        ),
        "",
    );
    let ops = Ops::start_with(&yaml, None, std::time::Duration::from_secs(3600)).await;
    let c = client();
    assert_eq!(get(&c, &ops.url("/")).await.status, 200);
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.kept, ["u"], "unchanged files: kept");

    // The same paths now hold a certificate the upstream does not trust: rebuilt, and refused.
    install(&Cert::new(&["gateway.test"]));
    let r = ops.reloader().reload().unwrap();
    assert_eq!(r.rebuilt, ["u"]);
    assert_eq!(get(&c, &ops.url("/")).await.status, 502);
    ops.stop().await;
}

/// An HTTP/2 upstream that closes its connection after every answer (GOAWAY): each next request
/// finds the shared connection closed and opens a new one, without an error for the client.
#[tokio::test]
async fn a_closed_shared_http2_connection_is_replaced() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, c) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let answered = Arc::new(tokio::sync::Notify::new());
                let done = answered.clone();
                let svc = service_fn(move |_req: Request<Incoming>| {
                    done.notify_one();
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("one")))) }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = answered.notified() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let url = format!("http://{addr}");
    let gw = Gateway::start(&config(&[url], ", http2: true", "")).await;
    let c = client();
    for i in 1..=4 {
        let g = get(&c, &gw.url("/x")).await;
        assert_eq!(
            (g.status.as_u16(), g.text().as_str()),
            (200, "one"),
            "request {i}"
        );
        wait_until(10, || closed.load(Ordering::SeqCst) == i).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "a new connection per request"
    );
    gw.stop().await;
}

/// A certificate file that is PEM but not a certificate is the `cert` key's error, for the
/// listener and for an upstream's client certificate (rustls finds it while matching the key, and
/// it was reported at `key`).
#[test]
fn a_corrupt_certificate_is_reported_at_cert_not_at_key() {
    let dir = TempDir::new("corrupt-cert");
    let good = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = dir.join("key.pem");
    std::fs::write(&key, good.key_pair.serialize_pem()).unwrap();
    let cert = dir.join("cert.pem");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQoLDA0ODw==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = |yaml: String| {
        bulwark_gateway::config::from_str(&yaml, "gw.yaml")
            .unwrap_err()
            .to_string()
    };
    let listener = err(format!(
        "tls:\n  cert: '{}'\n  key: '{}'\n",
        cert.display(),
        key.display()
    ));
    assert!(
        listener.starts_with("gw.yaml:2:3: tls.cert: "),
        "{listener}"
    );
    let upstream = err(format!(
        "upstreams:\n  a:\n    endpoints: [{{url: 'https://localhost:1'}}]\n    tls:\n      cert: '{}'\n      key: '{}'\n",
        cert.display(),
        key.display()
    ));
    assert!(
        upstream.starts_with("gw.yaml:5:7: upstreams.a.tls.cert: "),
        "{upstream}"
    );
}

/// A CA, a CRL it signed (valid until `crl_until`, revoking serial 2), and two `localhost`
/// certificates it issued: serial 1 (`good`) and serial 2 (`revoked`).
struct Pki {
    _dir: support::TempDir,
    ca_path: PathBuf,
    crl_path: PathBuf,
    good: Arc<rustls::ServerConfig>,
    revoked: Arc<rustls::ServerConfig>,
}

impl Pki {
    fn new(crl_until: i32) -> Pki {
        use rcgen::{
            date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams,
            DnType, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
            RevokedCertParams, SerialNumber,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name
            .push(DnType::CommonName, "bulwark test CA");
        let ca = p.self_signed(&ca_key).unwrap();
        let leaf = |serial: u64| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            p.serial_number = Some(SerialNumber::from(serial));
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        };
        let crl = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(crl_until, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(2u64),
                revocation_time: date_time_ymd(2020, 1, 1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca, &ca_key)
        .unwrap();
        let dir = support::TempDir::new("uptls-crl");
        let (ca_path, crl_path) = (dir.join("ca.pem"), dir.join("crl.pem"));
        std::fs::write(&ca_path, ca.pem()).unwrap();
        std::fs::write(&crl_path, crl.pem().unwrap()).unwrap();
        Pki {
            _dir: dir,
            ca_path,
            crl_path,
            good: leaf(1),
            revoked: leaf(2),
        }
    }
}

/// With `tls.crl`, a server certificate its CA revoked fails the handshake (a connect failure:
/// 502, nothing sent), one it did not revoke passes, and an expired CRL fails every handshake
/// (as in Envoy). Without `crl`, the revoked certificate is accepted, as before.
#[tokio::test]
async fn a_revoked_server_certificate_fails_the_handshake_with_a_crl() {
    let pki = Pki::new(2200);
    let good = TlsUpstream::with_config(pki.good.clone()).await;
    let revoked = TlsUpstream::with_config(pki.revoked.clone()).await;
    let tls = |crl: bool| {
        let crl = if crl {
            format!(", crl: '{}'", pki.crl_path.display())
        } else {
            String::new()
        };
        format!("tls: {{ ca: '{}'{crl} }}", pki.ca_path.display())
    };
    let yaml = format!(
        "upstreams:\n  good: {{ endpoints: [{{url: '{}'}}], {} }}\n  revoked: {{ endpoints: [{{url: '{}'}}], {} }}\n  \
         unchecked: {{ endpoints: [{{url: '{}'}}], {} }}\n\
         routes:\n  - {{ match: {{ path_prefix: /good }}, upstream: good }}\n  - {{ match: {{ path_prefix: /revoked }}, upstream: revoked }}\n  - {{ upstream: unchecked }}\n",
        good.url(),
        tls(true),
        revoked.url(),
        tls(true),
        revoked.url(),
        tls(false)
    );
    let gw = Gateway::start(&yaml).await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/good")).await.status, 200);
    let g = get(&c, &gw.url("/revoked")).await;
    assert_eq!(g.status, 502);
    assert_eq!(g.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(get(&c, &gw.url("/unchecked")).await.status, 200);
    assert_eq!(
        revoked.seen().len(),
        1,
        "only the unchecked request reached it"
    );
    gw.stop().await;

    // A CRL past its next update: even the good certificate fails.
    let stale = Pki::new(2021);
    let good = TlsUpstream::with_config(stale.good.clone()).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  good: {{ endpoints: [{{url: '{}'}}], tls: {{ ca: '{}', crl: '{}' }} }}\nroutes:\n  - upstream: good\n",
        good.url(),
        stale.ca_path.display(),
        stale.crl_path.display()
    ))
    .await;
    assert_eq!(get(&c, &gw.url("/")).await.status, 502);
    assert!(good.seen().is_empty());
    gw.stop().await;
}

/// `crl` errors are config errors at their key: a file with no CRL, and `crl_leaf_only` without
/// `crl`.
#[test]
fn crl_settings_are_checked_at_load() {
    let pki = Pki::new(2200);
    let dir = support::TempDir::new("uptls-crl-cfg");
    let path = dir.join("bulwark.yaml");
    let load = |tls: &str| {
        std::fs::write(
            &path,
            format!(
                "upstreams:\n  u: {{ endpoints: [{{url: 'https://localhost:1'}}], tls: {{ {tls} }} }}\nroutes:\n  - upstream: u\n"
            ),
        )
        .unwrap();
        bulwark_gateway::config::load(&path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    // The CA file holds a certificate, not a CRL.
    let e = load(&format!("crl: '{}'", pki.ca_path.display())).unwrap_err();
    assert!(
        e.contains("upstreams.u.tls.crl: no PEM certificate revocation list"),
        "{e}"
    );
    let e = load("crl_leaf_only: true").unwrap_err();
    assert!(e.contains("upstreams.u.tls.crl_leaf_only: "), "{e}");
    load(&format!(
        "ca: '{}', crl: '{}', crl_leaf_only: true",
        pki.ca_path.display(),
        pki.crl_path.display()
    ))
    .unwrap();
}
