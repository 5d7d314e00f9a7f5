//! What a reload stops at once although requests still hold the old runtime (the health checks and
//! idle connections of upstreams it removed or rebuilt), and what stopping the gateway ends (found
//! by a review; each test failed before its fix).
mod admin_support;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bulwark_gateway::proxy::Runtime;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use support::*;

/// An upstream that counts its open connections and the health probes (`GET /health`) it got.
struct Counted {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
}

impl Counted {
    async fn start() -> Counted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(AtomicUsize::new(0));
        let (o, p) = (open.clone(), probes.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (o, p) = (o.clone(), p.clone());
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let p = p.clone();
                        async move {
                            let resp: Response<Body> = match req.uri().path() {
                                "/health" => {
                                    p.fetch_add(1, Ordering::SeqCst);
                                    reply("counted", 200, "ok")
                                }
                                _ => reply("counted", 200, "hello"),
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Counted { addr, open, probes }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }
}

/// Swaps in the runtime of `yaml`, as a reload does (`Reloader::try_reload`).
fn reload(gw: &Gateway, yaml: &str) {
    let yaml = format!("listen: 127.0.0.1:0\n{yaml}");
    let config = bulwark_gateway::config::from_str(&yaml, "test.yaml")
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let old = gw.state.runtime();
    let new = Runtime::build(&config, old.telemetry(), Some(&old)).unwrap();
    drop(old);
    gw.state.swap(new);
}

/// Probes `up` receives during `window` (after a grace for a probe in flight).
async fn probes_during(up: &Counted, window: Duration) -> usize {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = up.probes();
    tokio::time::sleep(window).await;
    up.probes() - before
}

fn checked_upstream(name: &str, url: &str, extra: &str) -> String {
    format!(
        "  {name}:
    endpoints: [{{url: '{url}'}}]
    health_check: {{ interval: 100ms, timeout: 1s }}
{extra}"
    )
}

/// A gateway with a slow upstream (`/slow`, held until released) and a health-checked upstream
/// `b` (every other path); `i` varies `b`'s `connect_timeout`, so each `i` rebuilds `b`.
fn slow_and_b(slow: &Upstream, b: &Counted, i: usize) -> String {
    format!(
        "upstreams:\n  slow: {{ endpoints: [{{url: '{}'}}] }}\n{}routes:\n  - match: {{ path_prefix: /slow }}\n    upstream: slow\n  - match: {{ path_prefix: / }}\n    upstream: b\n",
        slow.url(),
        checked_upstream("b", &b.url(), &format!("    connect_timeout: {}ms\n", 500 + i)),
    )
}

/// "The checks stop when the upstream is removed by a reload", also while a request that started
/// before the reload (on any route: an LLM completion, a long poll) is still in flight and holds
/// the old runtime.
#[tokio::test]
async fn a_removed_upstream_stops_probing_while_an_older_request_is_in_flight() {
    let (slow, release) = Upstream::held("slow", "late").await;
    let b = Counted::start().await;
    let gw = Gateway::start(&slow_and_b(&slow, &b, 0)).await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/b")).await.status, 200);
    wait_until(5, || b.probes() >= 2).await;

    let (cc, url) = (c.clone(), gw.url("/slow"));
    let pending = tokio::spawn(async move { get(&cc, &url).await });
    wait_until(5, || slow.hits() == 1).await;
    reload(
        &gw,
        &format!(
            "upstreams:\n  slow: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - match: {{ path_prefix: /slow }}\n    upstream: slow\n",
            slow.url()
        ),
    );
    assert_eq!(get(&c, &gw.url("/b")).await.status, 404, "b is gone");

    let probes = probes_during(&b, Duration::from_secs(1)).await;
    let open = b.open();
    release.notify_one();
    assert_eq!(pending.await.unwrap().status, 200);
    gw.stop().await;
    assert!(
        probes <= 1,
        "{probes} health probes reached upstream b in the second after a reload removed it \
         (it is probed every 100ms); {open} connections to it still open"
    );
}

/// Under steady traffic of long requests, each reload leaves the runtime its requests started on
/// alive a while: its rebuilt upstreams must not go on probing and holding connections (10
/// reloads would otherwise make 11 checkers and 11 connections).
#[tokio::test]
async fn reloads_during_long_requests_do_not_multiply_probes_and_upstream_connections() {
    let (slow, release) = Upstream::held("slow", "late").await;
    let b = Counted::start().await;
    let gw = Gateway::start(&slow_and_b(&slow, &b, 0)).await;
    let c = client();
    let mut pending = Vec::new();
    for i in 1..=10 {
        // One long request on each generation, then a reload that changes `b`.
        let (cc, url) = (c.clone(), gw.url("/slow"));
        pending.push(tokio::spawn(async move { get(&cc, &url).await }));
        wait_until(5, || slow.hits() == i).await;
        reload(&gw, &slow_and_b(&slow, &b, i));
    }
    let probes = probes_during(&b, Duration::from_secs(1)).await;
    let open = b.open();
    for p in pending {
        release.notify_one();
        assert_eq!(p.await.unwrap().status, 200);
    }
    gw.stop().await;
    // One checker probes every 100ms: 10 a second. Generous bounds.
    assert!(
        probes <= 25 && open <= 3,
        "after 10 reloads under long requests, upstream b got {probes} health probes a second \
         over {open} open connections (expected about 10 a second over 1)"
    );
}

/// `Running::stop` (what `bulwark run` and the in-process demo call) ends the admin listener's
/// keep-alive connections too: one left serving (a dashboard, a scraper) held the whole gateway,
/// whose health checks then went on probing upstreams after the stop.
#[tokio::test]
async fn stopping_the_gateway_ends_admin_keep_alive_connections() {
    let b = Counted::start().await;
    let yaml = format!(
        "upstreams:\n{}routes:\n  - match: {{ path_prefix: / }}\n    upstream: b\n",
        checked_upstream("b", &b.url(), "")
    );
    let ops = admin_support::Ops::start(&yaml, None).await;
    wait_until(5, || b.probes() >= 1).await;
    let mut admin = RawClient::connect_to(ops.admin).await;
    let req = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    admin.send(req).await;
    assert_eq!(admin.response(false).await.status, 200);

    ops.stop().await;
    let probes = probes_during(&b, Duration::from_secs(1)).await;
    // The same keep-alive connection, after the stop (a write to a closed one may fail).
    let _ = tokio::io::AsyncWriteExt::write_all(&mut admin.s, req).await;
    let closed = admin.closed_within(3).await;
    let answered = String::from_utf8_lossy(&admin.buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    assert!(
        closed && answered.is_empty() && probes == 0,
        "after Running::stop returned: the admin connection answered {answered:?} (closed within \
         3s: {closed}), and upstream b got {probes} health probes in a second"
    );
}

/// A request in flight on an upstream when a reload rebuilds it ends after the reload: its
/// keep-alive connection must not go back into the retired pool, which no reaper visits (it
/// stayed open as long as any request held the old runtime: here a long request on another
/// route; in production an SSE stream, for hours). The docs: a rebuilt upstream's idle
/// connections close at the reload (review up3).
#[tokio::test]
async fn a_connection_released_into_a_pool_retired_by_a_reload_is_closed() {
    use tokio::io::AsyncWriteExt;
    let (slow, release_slow) = Upstream::held("slow", "late").await;
    let closed = Arc::new(AtomicUsize::new(0));
    let release_u = Arc::new(tokio::sync::Notify::new());
    let (c2, r2) = (closed.clone(), release_u.clone());
    let u = RawUpstream::start(move |mut s, _| {
        let (closed, release) = (c2.clone(), r2.clone());
        async move {
            let mut buf = Vec::new();
            while let Some(req) = read_head(&mut s, &mut buf).await {
                if req.starts_with("GET /u/hold") {
                    release.notified().await;
                }
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    break;
                }
            }
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    // `connect_timeout` varies so that the reload rebuilds `u` (a changed upstream).
    let config = |connect_ms: u32| {
        format!(
            "upstreams:
  slow: {{ endpoints: [{{url: '{}'}}] }}
  u:
    endpoints: [{{url: '{}'}}]
    connect_timeout: {connect_ms}ms
    pool: {{ idle_timeout: 200ms }}
routes:
  - match: {{ path_prefix: /slow }}
    upstream: slow
    timeout: 60s
  - match: {{ path_prefix: /u }}
    upstream: u
    timeout: 60s
",
            slow.url(),
            u.url()
        )
    };
    let gw = Gateway::start(&config(500)).await;
    let old = endpoint(&gw, "u", 0);
    let c = client();
    // A long request that keeps the old runtime alive across the reload.
    let (cc, url) = (c.clone(), gw.url("/slow"));
    let long = tokio::spawn(async move { get(&cc, &url).await });
    wait_until(5, || slow.hits() == 1).await;
    // A request on `u`, in flight over the reload.
    let (cc, url) = (c.clone(), gw.url("/u/hold"));
    let held = tokio::spawn(async move { get(&cc, &url).await });
    wait_until(5, || u.accepted() == 1).await;
    reload(&gw, &config(600));
    release_u.notify_one();
    assert_eq!(held.await.unwrap().status, 200);
    // Closed at once; 3 s is generous.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while closed.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let closed_in_time = closed.load(Ordering::SeqCst) == 1;
    let kept = old.pool.idle_count();
    release_slow.notify_one();
    assert_eq!(long.await.unwrap().status, 200);
    gw.stop().await;
    assert!(
        closed_in_time,
        "stayed open in the retired pool ({kept} idle there)"
    );
    assert_eq!(kept, 0, "a retired pool took a connection back");
}
