//! Balancers keep their shares when an endpoint is unavailable, peak-EWMA learns from timeouts, and a
//! Retry-After is waited out when the retry can only go back to an endpoint already tried.
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use tokio::time::Instant as StdInstant;

use bulwark_gateway::upstream::{Tried, Upstream as Up};
use support::*;

/// round_robin. Before the fix, with one of three equal endpoints unavailable (a failed health check,
/// an ejection), the endpoint that follows it in the ring takes its whole share: the remaining two
/// are loaded 1:2 instead of 1:1. Envoy (and nginx, HAProxy) balance round robin over the hosts
/// that are available, so each of the two gets half.
#[tokio::test]
async fn round_robin_stays_even_when_an_endpoint_is_unavailable() {
    let (a, b, c) = (
        Upstream::named("a").await,
        Upstream::named("b").await,
        Upstream::named("c").await,
    );
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    balance: round_robin\n    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]\nroutes:\n  - upstream: u\n",
        a.url(), b.url(), c.url()
    ))
    .await;
    gw.set_available("u", 1, false);
    let m = answers_by_body(&gw, 60).await;
    let (ca, cc) = (
        m.get("a").copied().unwrap_or(0),
        m.get("c").copied().unwrap_or(0),
    );
    assert_eq!(ca + cc, 60, "{m:?}");
    // Strict round robin over the two available endpoints: 30 each (one off at most).
    assert!(
        ca.abs_diff(cc) <= 2,
        "uneven round robin around the unavailable endpoint: {m:?}"
    );
    gw.stop().await;
}

/// weighted. Before the fix, smooth weighted round robin with weights 5,1,1 and the weight-5 endpoint
/// unavailable sends the remaining two endpoints (equal weights) traffic 5:2, not 1:1: every slot of
/// the missing endpoint in the precomputed schedule falls to the next entry. Envoy rebuilds its
/// weighted scheduler over the available hosts; nginx's smooth WRR skips down peers in the loop
/// itself, so the remaining weights are honoured.
#[tokio::test]
async fn weighted_honours_remaining_weights_when_one_is_unavailable() {
    let (a, b, c) = (
        Upstream::named("a").await,
        Upstream::named("b").await,
        Upstream::named("c").await,
    );
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    balance: weighted\n    endpoints: [{{url: '{}', weight: 5}}, {{url: '{}', weight: 1}}, {{url: '{}', weight: 1}}]\nroutes:\n  - upstream: u\n",
        a.url(), b.url(), c.url()
    ))
    .await;
    gw.set_available("u", 0, false);
    let m = answers_by_body(&gw, 70).await;
    let (cb, cc) = (
        m.get("b").copied().unwrap_or(0),
        m.get("c").copied().unwrap_or(0),
    );
    assert_eq!(cb + cc, 70, "{m:?}");
    assert!(cb.abs_diff(cc) <= 2, "b and c have equal weights: {m:?}");
    gw.stop().await;
}

/// random. Before the fix, a draw that lands on an unavailable endpoint moves to the next one in the
/// tier, so with one of three equal endpoints out the next one gets 2/3 of the traffic. Envoy's
/// random balancer draws among the available hosts.
#[tokio::test]
async fn random_stays_uniform_when_an_endpoint_is_unavailable() {
    let (a, b, c) = (
        Upstream::named("a").await,
        Upstream::named("b").await,
        Upstream::named("c").await,
    );
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    balance: random\n    endpoints: [{{url: '{}'}}, {{url: '{}'}}, {{url: '{}'}}]\nroutes:\n  - upstream: u\n",
        a.url(), b.url(), c.url()
    ))
    .await;
    gw.set_available("u", 1, false);
    let m = answers_by_body(&gw, 600).await;
    let ca = m.get("a").copied().unwrap_or(0);
    // Expected 300 each; sigma ~12: 240..=360 is 5 sigma. The skip gives ~200 / ~400.
    assert!((240..=360).contains(&ca), "{m:?}");
    gw.stop().await;
}

/// peak_ewma. Before the fix, it learnt latency only from responses. An attempt that times out (or is reset,
/// or cannot connect) leaves no sample, so an endpoint that never answers keeps the lowest possible
/// cost (1 ns x (in flight + 1)) and wins every comparison against an endpoint that answers in a
/// fraction of a millisecond: peak_ewma sends every first attempt to the black hole. tower's
/// PeakEwma records the RTT when the request's handle is dropped, whatever the outcome, and
/// Finagle's adds a penalty for outstanding requests without a sample.
#[tokio::test]
async fn peak_ewma_learns_from_timed_out_attempts() {
    let hole = Silent::start().await;
    let fast = Upstream::named("fast").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    balance: peak_ewma\n    endpoints: [{{url: '{}'}}, {{url: '{}'}}]\nroutes:\n  - upstream: u\n    timeout: 5s\n    retry: {{ attempts: 2, per_try_timeout: 100ms, backoff: {{ base: 1ms, max: 1ms }} }}\n",
        hole.url(), fast.url()
    ))
    .await;
    let m = answers_by_body(&gw, 20).await;
    assert_eq!(m.get("fast").copied(), Some(20), "{m:?}");
    let to_hole = hole.accepted.load(Ordering::SeqCst);
    // After one 100 ms timeout the hole's estimate should be ~100 ms against the fast endpoint's
    // sub-millisecond one: it should get at most a couple of the 20 first attempts.
    assert!(
        to_hole <= 3,
        "peak_ewma sent {to_hole} of 20 first attempts to an endpoint that never answers"
    );
    gw.stop().await;
}

/// Retry-After. Before the fix, a `Retry-After` was waited out only when the upstream has a single endpoint. When the
/// retry can only go back to the endpoint that asked for the wait (its peer is down), it is sent at
/// once, after the backoff alone, to an endpoint that said it would not serve yet. The upstream here
/// answers 503 with `Retry-After: 1` and serves only once a second has passed, as it said.
#[tokio::test]
async fn retry_after_is_honoured_when_the_retry_goes_back_to_the_same_endpoint() {
    let first: Arc<AtomicU64> = Arc::new(AtomicU64::new(0));
    let epoch = StdInstant::now();
    let f = first.clone();
    let picky = Upstream::start(
        "picky",
        Arc::new(move |_req| {
            let f = f.clone();
            Box::pin(async move {
                let now = epoch.elapsed().as_millis() as u64 + 1;
                let t0 = match f.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => now,
                    Err(t) => t,
                };
                if now - t0 >= 950 {
                    reply("picky", 200, "ok")
                } else {
                    let mut r = reply("picky", 503, "come back in a second");
                    r.headers_mut().insert("retry-after", "1".parse().unwrap());
                    r
                }
            })
        }),
    )
    .await;
    let other = Upstream::named("other").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    balance: round_robin\n    endpoints: [{{url: '{}'}}, {{url: '{}'}}]\nroutes:\n  - upstream: u\n    timeout: 10s\n    retry: {{ attempts: 2, backoff: {{ base: 1ms, max: 1ms }} }}\n",
        picky.url(), other.url()
    ))
    .await;
    // The other endpoint is down (health check): the retry can only go back to `picky`.
    gw.set_available("u", 1, false);
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(picky.hits(), 2, "one attempt and one retry");
    assert_eq!(
        r.status,
        200,
        "the retry ignored Retry-After: {:?}",
        r.text()
    );
    gw.stop().await;
}

/// `Upstream::has_untried` (new, used by `forward` to decide whether a retry waits out the
/// upstream's `Retry-After`) must agree with `Upstream::pick`: its doc says "whether a pick for a
/// request that tried `tried` could find an endpoint it has not tried".
///
/// In panic mode, `pick` stays in the panic tier: once every endpoint of that tier that is not
/// cooling down was tried, it picks one of them again (`.or_else(... free)`), never an endpoint of
/// a lower-priority tier. `has_untried` instead falls through to "any available endpoint of any
/// tier not tried", so with an available endpoint in a lower tier it answers `true` while the
/// pick goes back to an endpoint this request already tried: the retry skips the Retry-After wait
/// and is sent at once to the endpoint that asked it to wait.
#[tokio::test]
async fn has_untried_agrees_with_pick_in_panic_mode_with_a_lower_tier() {
    let yaml = "upstreams:
  u:
    panic_threshold: 60
    endpoints:
      - { url: 'http://127.0.0.1:1' }
      - { url: 'http://127.0.0.1:2' }
      - { url: 'http://127.0.0.1:3', priority: 1 }
routes:
  - upstream: u
";
    let cfg = bulwark_gateway::config::from_str(yaml, "t.yaml").unwrap();
    let up = Up::new("u", cfg.upstreams.get("u").unwrap(), &None).unwrap();
    // Tier 0 = endpoints 0 and 1; endpoint 1 fails its health check: 1 of 2 up, 50% < 60%:
    // panic mode over tier 0. Endpoint 2 (tier 1) is available.
    up.endpoints[1].set_available(false);
    assert!(up.endpoints[2].is_available());

    // The request tried both endpoints of tier 0 (the panic pick ignores health).
    let mut tried = Tried::default();
    tried.insert(0);
    tried.insert(1);
    for _ in 0..50 {
        let picked = up.pick(tried).expect("an endpoint");
        if tried.contains(picked) {
            assert!(
                !up.has_untried(tried),
                "pick went back to tried endpoint {picked}, yet has_untried said an untried one \
                 could be found (so the retry skips the Retry-After wait)"
            );
        }
    }
}

/// An upstream of `round_robin` over `1 + down + 1` endpoints: the first and the last available,
/// the `down` ones between them failed their health check (no panic mode).
fn rr_upstream(down: usize) -> Up {
    let mut yaml = String::from("upstreams:\n  u:\n    balance: round_robin\n    endpoints:\n");
    for i in 0..down + 2 {
        yaml.push_str(&format!(
            "      - {{ url: 'http://127.0.0.1:{}' }}\n",
            1000 + i
        ));
    }
    yaml.push_str("routes:\n  - upstream: u\n");
    let cfg = bulwark_gateway::config::from_str(&yaml, "t.yaml").unwrap();
    let up = Up::new("u", cfg.upstreams.get("u").unwrap(), &None).unwrap();
    for i in 1..=down {
        up.endpoints[i].set_available(false);
    }
    up
}

/// Round robin over A, (98 unavailable), C: every slot of the shared cursor is taken by exactly
/// one pick (the unavailable ones consumed and passed), so A and C get the same share, whatever the
/// number of threads picking: with the old `(0..len).map(|_| fetch_add(1)).find(ok)` each
/// `fetch_add` hands out a slot nobody else gets (the only slack: a pick whose `len` slots were all
/// unavailable ones falls back to the first available endpoint, A). Measured with the old code:
/// 200008 vs 199992 in a batch of 400000; with the new one 131644 vs 268356.
///
/// The new `cursor_pick` takes one slot `c`, scans `c, c+1, ...` locally, and only then moves the
/// cursor past the scanned slots with a second `fetch_add`. A pick that lands on an unavailable
/// slot therefore reads slots that other threads are being handed at the same time: two picks
/// take the same C slot (C is picked twice), and the late `fetch_add(skipped)` then jumps the
/// cursor over slots nobody looked at (A's turn among them). Under concurrent load the endpoint
/// after a run of unavailable ones gets their share: exactly what `pick`'s doc says must not
/// happen ("must not hand its share to the one after it").
#[test]
fn round_robin_shares_stay_exact_when_two_threads_pick_past_unavailable_endpoints() {
    const DOWN: usize = 98;
    const PER_THREAD: usize = 200_000;
    const BATCHES: usize = 3;
    let up = rr_upstream(DOWN);
    let (a, c) = (0, DOWN + 1);
    let (mut na, mut nc) = (0usize, 0usize);
    for batch in 0..BATCHES {
        let start = Barrier::new(2);
        let counts: Vec<(usize, usize)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        let (mut x, mut y) = (0usize, 0usize);
                        for _ in 0..PER_THREAD {
                            match up.pick(Tried::default()) {
                                Some(i) if i == a => x += 1,
                                Some(i) if i == c => y += 1,
                                other => panic!("picked {other:?}, an unavailable endpoint"),
                            }
                        }
                        (x, y)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (x, y) in counts {
            na += x;
            nc += y;
        }
        // Every pick took its own A or C slot of the cursor: equal shares, give or take the rare
        // fallback pick (1% of the picks is far more than that slack).
        assert!(
            na.abs_diff(nc) <= (na + nc) / 100,
            "batch {batch}: A picked {na} times, C {nc} times: round robin over the two available \
             endpoints lost its 1:1 share under concurrent picks"
        );
    }
}
