//! A storm of requests against upstreams that misbehave in every way at once (errors, resets,
//! slow heads, stalled and dribbled bodies, answers past the per-try timeout), with retries,
//! hedges, failover and bulkheads on, and clients that give up mid-request. Every request that is
//! waited for gets an answer in bounded time, and afterwards nothing is held: every endpoint's
//! in-flight count and every bulkhead's permits are back to zero, and the gateway serves on.
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::AsyncWriteExt;

/// An upstream whose k-th request (over all its connections) gets behaviour `k % 7`.
async fn chaotic() -> RawUpstream {
    let next = Arc::new(AtomicUsize::new(0));
    RawUpstream::start(move |mut s, _| {
        let next = next.clone();
        async move {
            let mut buf = Vec::new();
            while read_head(&mut s, &mut buf).await.is_some() {
                let ms = tokio::time::sleep;
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let sent = match next.fetch_add(1, Ordering::Relaxed) % 7 {
                    0 => s.write_all(ok).await,
                    1 => {
                        s.write_all(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy")
                            .await
                    }
                    2 => {
                        ms(Duration::from_millis(30)).await;
                        s.write_all(ok).await
                    }
                    // No answer: the connection closes under the request.
                    3 => return,
                    4 => {
                        let r = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
                            .await;
                        ms(Duration::from_millis(150)).await;
                        r.and(s.write_all(b"world").await)
                    }
                    5 => {
                        let mut r = s
                            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                            .await;
                        for _ in 0..3 {
                            ms(Duration::from_millis(5)).await;
                            r = r.and(s.write_all(b"2\r\nab\r\n").await);
                        }
                        r.and(s.write_all(b"0\r\n\r\n").await)
                    }
                    _ => {
                        // Past the per-try timeout.
                        ms(Duration::from_millis(120)).await;
                        s.write_all(ok).await
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_failures_leaves_nothing_held() {
    storm(client()).await;
}

/// The same over HTTP/2 (h2c): requests cancelled by the client reset their streams only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_over_http2_leaves_nothing_held() {
    storm(h2c_client()).await;
}

async fn storm(c: Client) {
    let (a1, a2, b1) = (chaotic().await, chaotic().await, chaotic().await);
    let healthy = Upstream::named("healthy").await;
    let bulkhead = "bulkhead: { max_concurrent: 12, max_queued: 32, queue_timeout: 200ms }";
    let gw = Gateway::start(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}, {{url: '{}'}}], {bulkhead} }}
  b: {{ endpoints: [{{url: '{}'}}], {bulkhead} }}
  h: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path: /ok }}
    upstream: h
  - upstream: a
    failover: [b]
    timeout: 500ms
    retry: {{ attempts: 3, per_try_timeout: 80ms, backoff: {{ base: 1ms, max: 5ms }}, budget: {{ ratio: 1.0, min_per_second: 1000 }} }}
    hedge: {{ delay: 20ms }}
",
        a1.url(),
        a2.url(),
        b1.url(),
        healthy.url()
    ))
    .await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut tasks = Vec::new();
    for i in 0..240u64 {
        let (c, url) = (c.clone(), gw.url(&format!("/storm/{i}")));
        let post = rng.below(3) == 0;
        // One in five clients gives up after 0-40 ms.
        let give_up = (rng.below(5) == 0).then(|| Duration::from_millis(rng.below(40)));
        tasks.push(tokio::spawn(async move {
            let req = if post {
                Request::post(url).body(Full::new(Bytes::from_static(b"payload")))
            } else {
                Request::get(url).body(Full::new(Bytes::new()))
            }
            .unwrap();
            let exchange = async {
                let resp = c.request(req).await?;
                let status = format!(
                    "{} {}",
                    resp.status().as_u16(),
                    resp.headers()
                        .get("x-bulwark-reason")
                        .map_or("", |v| v.to_str().unwrap_or("?"))
                );
                // A body cut by a failing upstream is an error here, not a hang.
                let _ = resp.into_body().collect().await;
                Ok::<_, hyper_util::client::legacy::Error>(status)
            };
            match give_up {
                Some(after) => {
                    let _ = tokio::time::timeout(after, exchange).await;
                    None
                }
                None => Some(
                    tokio::time::timeout(Duration::from_secs(10), exchange)
                        .await
                        .unwrap_or_else(|_| panic!("request {i}: no answer within 10 s")),
                ),
            }
        }));
        if i % 16 == 15 {
            // Waves, so the bulkheads fill and drain more than once.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        if let Some(Ok(status)) = t.await.unwrap() {
            *statuses.entry(status).or_insert(0) += 1;
        }
    }
    // Everything the storm held is given back.
    let rt = gw.state.runtime();
    let held = || {
        rt.upstreams
            .iter()
            .flat_map(|u| {
                let bulkhead = u.policies.bulkhead().map_or(0, |b| b.in_flight());
                u.endpoints
                    .iter()
                    .map(|e| (u.name.to_string(), e.inflight()))
                    .chain([(format!("{} bulkhead", u.name), bulkhead)])
                    .collect::<Vec<_>>()
            })
            .filter(|(_, n)| *n > 0)
            .collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !held().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still held 10 s after the storm: {:?} (statuses {statuses:?})",
            held()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        statuses.get("200 ").copied().unwrap_or(0) > 20,
        "{statuses:?}"
    );
    let r = get(&c, &gw.url("/ok")).await;
    assert_eq!(r.status, 200);
    gw.stop().await;
}

/// Requests one client sends strictly one after another (each once the previous response was
/// read to its end), through a gateway with a one-slot, no-queue `section` (`bulkhead` on the
/// upstream, or the gateway's `admission`): the ones refused.
async fn sequential_refusals(section: &str, n: usize) -> Vec<String> {
    let up = Upstream::named("u").await;
    let (admission, bulkhead) = match section {
        "admission" => ("admission: { max_concurrent: 1, max_queued: 0 }\n", ""),
        _ => ("", ", bulkhead: { max_concurrent: 1, max_queued: 0 }"),
    };
    let gw = Gateway::start(&format!(
        "{admission}upstreams:\n  u: {{ endpoints: [{{url: '{}'}}]{bulkhead} }}\nroutes:\n  - upstream: u\n",
        up.url()
    ))
    .await;
    let c = client();
    let mut refused = Vec::new();
    for i in 0..n {
        let r = get(&c, &gw.url("/seq")).await;
        if r.status != 200 {
            let reason = r.header("x-bulwark-reason").unwrap_or("-");
            refused.push(format!("request {i}: {} {reason}", r.status));
        }
    }
    gw.stop().await;
    refused
}

/// A client whose previous response it has read to the end has nothing in flight: on a
/// multi-threaded runtime it could send its next request before the connection's task dropped
/// the finished body, and find the one bulkhead slot (or admission slot) still taken (1 to 5 in
/// 1000 were refused before the slots were given back at the body's end). Found by a review.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_requests_never_find_a_one_slot_bulkhead_or_admission_full() {
    for section in ["bulkhead", "admission"] {
        let refused = sequential_refusals(section, 1000).await;
        assert!(
            refused.is_empty(),
            "{section}: {} of 1000 sequential requests refused: {:?}",
            refused.len(),
            &refused[..refused.len().min(5)]
        );
    }
}
