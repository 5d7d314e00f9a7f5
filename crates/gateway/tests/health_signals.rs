//! What the gateway learns about an endpoint whose attempts a hedge beats, and checks of one
//! endpoint held back by another's (found by a review; each test failed before its fix).
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// `balance: peak_ewma` with a route `hedge`: the slow endpoint's attempts are all beaten by the
/// hedge to the fast one and cancelled. The time a cancelled attempt ran is a lower bound of the
/// endpoint's latency, so the slow endpoint does not keep the cost of one never measured (the
/// cheapest) and soon loses the power-of-two comparisons (as the docs promise for timeouts, and
/// as tower records a cancelled call's time).
#[tokio::test]
async fn peak_ewma_learns_from_hedged_attempts_that_lost() {
    let fast = Upstream::named("fast").await;
    let slowpoke = slow("slow", Duration::from_secs(3)).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: peak_ewma
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
routes:
  - upstream: u
    hedge: {{ delay: 30ms, max_hedges: 1 }}
",
        fast.url(),
        slowpoke.url()
    ))
    .await;
    let c = client();
    let url = gw.url("/");
    for _ in 0..30 {
        let r = get(&c, &url).await;
        assert_eq!(r.header("x-upstream"), Some("fast"));
    }
    // Once it has been seen taking 30 ms+ (vs ~1 ms), the slow endpoint should lose nearly every
    // comparison for the next ~10 s (the EWMA decay time).
    let to_slow = slowpoke.hits();
    assert!(
        to_slow <= 10,
        "the slow endpoint got the first attempt of {to_slow} of 30 requests (fast: {})",
        fast.hits()
    );
    gw.stop().await;
}

/// Latency outlier detection with a route `hedge`: an endpoint that takes 3 s per request, whose
/// every attempt the hedge beats, is judged by the time its attempts ran, and ejected ("eject an
/// endpoint whose recent p99 is above this multiple (> 1) of the median of its peers' p99").
#[tokio::test]
async fn a_latency_outlier_is_ejected_when_hedges_beat_its_answers() {
    let fast0 = Upstream::named("fast0").await;
    let fast1 = Upstream::named("fast1").await;
    let slowpoke = slow("slow", Duration::from_secs(3)).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]
    outlier_detection: {{ latency_multiple: 3.0, latency_min_samples: 16, ejection_time: 30s }}
routes:
  - upstream: u
    hedge: {{ delay: 200ms, max_hedges: 1 }}
",
        fast0.url(),
        fast1.url(),
        slowpoke.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 2);
    let c = client();
    let url = gw.url("/");
    // 150 requests, a third of them first sent to the slow endpoint (50 of its attempts, each
    // taking at least the 200 ms hedge delay, against ~1 ms for its peers: a margin that holds
    // on a loaded host, where the peers' first answers, on cold connections, can take 20 ms+).
    for _ in 0..15 {
        futures_util::future::join_all((0..10).map(|_| get(&c, &url))).await;
        if ep.is_ejected() {
            break;
        }
    }
    assert!(
        ep.is_ejected(),
        "an endpoint taking 3 s per request, beaten by every hedge, was never ejected \
         (it got {} attempts)",
        slowpoke.hits()
    );
    gw.stop().await;
}

/// An upstream whose `/health` never answers (the probe hangs until its timeout).
async fn hanging_health(name: &str) -> Upstream {
    let n = name.to_owned();
    Upstream::start(
        name,
        Arc::new(move |req| {
            let n = n.clone();
            Box::pin(async move {
                if req.uri().path() == "/health" {
                    std::future::pending::<()>().await;
                }
                reply(&n, 200, n.clone())
            })
        }),
    )
    .await
}

/// Each endpoint is checked on its own timer (as Envoy checks each host): one endpoint whose probe
/// hangs until its timeout (a blackholed host) does not hold back another's checks or verdicts.
/// Interval 100 ms, timeout 3 s: endpoint b, failing its checks (2 in a row make it unhealthy),
/// is marked unhealthy in ~0.2 s, not ~6 s behind a's hanging probes.
#[tokio::test]
async fn a_hanging_probe_does_not_slow_the_other_endpoints_checks() {
    let a = hanging_health("a").await;
    let b_up = Arc::new(AtomicBool::new(true));
    let b = checked("b", b_up.clone()).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    health_check: {{ path: /health, interval: 100ms, timeout: 3s, unhealthy_threshold: 2, healthy_threshold: 1 }}
routes:
  - upstream: u
",
        a.url(),
        b.url()
    ))
    .await;
    let eb = endpoint(&gw, "u", 1);
    // b's first probes pass (it is healthy), then it starts failing.
    wait_until(5, || b.hits() >= 1).await;
    b_up.store(false, Ordering::SeqCst);
    let start = tokio::time::Instant::now();
    wait_until(10, || !eb.is_healthy()).await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(2000),
        "b, failing every probe at a 100 ms interval with unhealthy_threshold 2, was marked \
         unhealthy only after {took:?} (held back by a's hanging probe)"
    );
    gw.stop().await;
}

const MS: f64 = 1e6; // ewma_cost is in nanoseconds

/// peak_ewma: an attempt cancelled unanswered "raises the estimate to the time it ran when that is
/// higher" than the estimate as it has decayed by then: an endpoint once measured at 1 s, then
/// beaten by hedges after 400 ms each, is known to take at least 400 ms, not its decayed ~50 ms.
/// Found by a review of the change.
#[tokio::test]
async fn a_latency_floor_raises_a_decayed_peak_ewma_estimate() {
    let up = Upstream::named("a").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ balance: peak_ewma, endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n",
        up.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 0);
    tokio::time::pause();
    ep.observe_latency(Duration::from_secs(1), tokio::time::Instant::now());
    // 30 s without an answered attempt: the 1 s peak has decayed (~50 ms).
    tokio::time::advance(Duration::from_secs(30)).await;
    let decayed = ep.ewma_cost();
    assert!(decayed < 200.0 * MS, "decayed estimate {} ms", decayed / MS);
    // An attempt cancelled after 400 ms unanswered (a hedge beat it).
    ep.observe_latency_floor(Duration::from_millis(400), tokio::time::Instant::now());
    let cost = ep.ewma_cost();
    tokio::time::resume();
    assert!(
        cost >= 399.0 * MS,
        "after an attempt that ran 400 ms unanswered the estimate is {} ms (was {} ms)",
        cost / MS,
        decayed / MS
    );
    gw.stop().await;
}

/// A client that streams its upload slowly and then gives up (an HTTP/2 RST_STREAM) stalled the
/// exchange, not the upstream (which waits for the body): the cancelled attempt is no sample of
/// the endpoint's latency, or any client could make an endpoint look slow to peak_ewma (and to
/// latency outlier detection) by starting uploads and abandoning them. Found by a review of the
/// change.
#[tokio::test]
async fn an_abandoned_slow_upload_is_not_taken_for_the_endpoints_latency() {
    use bytes::Bytes;
    use http_body::Frame;
    let up = Upstream::echo().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ balance: peak_ewma, endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n",
        up.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 0);
    let before = ep.ewma_cost();

    let mut send = h2c_sender(gw.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = http::Request::post("http://gw/upload")
        .body(ChanBody(rx))
        .unwrap();
    tx.send(Frame::data(Bytes::from(vec![b'z'; 1024])))
        .await
        .unwrap();
    let pending = tokio::spawn(send.send_request(req));
    // The attempt is on its way (the endpoint has it in flight); the client dawdles...
    wait_until(5, || ep.inflight() == 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ...and gives up: the response future dropped, the stream reset.
    pending.abort();
    drop(tx);
    wait_until(5, || ep.inflight() == 0).await;
    let after = ep.ewma_cost();
    assert!(
        after < 100.0 * MS,
        "an upload the client abandoned after 1.5 s set the endpoint's latency estimate to {} ms \
         (was {} ms)",
        after / MS,
        before / MS
    );
    gw.stop().await;
}
