//! Attempt-loop fixes from review: chunked bodies replayed, the route deadline in the bulkhead
//! queue, hedging on a refused upstream, retries and their own bulkhead slot, failover without a
//! retry section.
mod support;

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use support::*;

/// An upstream that reads each request body, records it, and answers `status`.
async fn recording(name: &str, status: u16) -> (Upstream, Arc<Mutex<Vec<String>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let (n, b) = (name.to_owned(), bodies.clone());
    let up = Upstream::start(
        name,
        Arc::new(move |req| {
            let (n, b) = (n.clone(), b.clone());
            Box::pin(async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                b.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                reply(&n, status, "nope")
            })
        }),
    )
    .await;
    (up, bodies)
}

/// The value of header `name` in a raw HTTP/1.1 response.
fn raw_header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn a_small_chunked_body_is_buffered_and_retried() {
    let (up, bodies) = recording("u", 503).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
    retry:
      attempts: 3
      on: [5xx]
      backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }}
",
        up.url()
    ))
    .await;
    let resp = raw(
        gw.addr,
        b"PUT /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert_eq!(raw_header(&resp, "x-bulwark-attempts"), Some("3"), "{resp}");
    assert_eq!(up.hits(), 3);
    assert_eq!(*bodies.lock().unwrap(), ["hello world"; 3]);
    gw.stop().await;
}

#[tokio::test]
async fn the_route_deadline_ends_the_wait_in_the_bulkhead_queue() {
    let (release, rx) = tokio::sync::watch::channel(false);
    let up = Upstream::start(
        "u",
        Arc::new(move |req| {
            let mut rx = rx.clone();
            Box::pin(async move {
                if req.uri().path() == "/hold" {
                    let _ = rx.wait_for(|r| *r).await;
                }
                reply("u", 200, "ok")
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    bulkhead: {{ max_concurrent: 1, max_queued: 10, queue_timeout: 1m }}
routes:
  - match: {{ path_prefix: /hold }}
    upstream: u
    timeout: 1m
  - upstream: u
    timeout: 500ms
",
        up.url()
    ))
    .await;
    let hold_url = gw.url("/hold");
    let holder = tokio::spawn(async move { get(&client(), &hold_url).await.status });
    // The holder has the upstream's only bulkhead slot.
    wait_until(10, || up.hits() == 1).await;
    let r = get(&client(), &gw.url("/short")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-bulwark-reason"), Some("timeout"));
    assert_eq!(r.header("x-bulwark-attempts"), None, "nothing was sent");
    // The 504 came from the route's deadline, not from the holder leaving the bulkhead.
    assert!(!holder.is_finished());
    release.send(true).unwrap();
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_retry_does_not_wait_for_the_bulkhead_slot_of_the_response_it_retries() {
    let up = Upstream::status("u", 503).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    bulkhead: {{ max_concurrent: 1, max_queued: 0 }}
routes:
  - upstream: u
    retry:
      attempts: 3
      on: [5xx]
      backoff: {{ kind: constant, base: 0ms, max: 0ms, jitter: none }}
",
        up.url()
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("3"));
    assert_eq!(up.hits(), 3);
    gw.stop().await;
}

/// A hedged route whose primary's breaker is open fails over without racing the refusal: no hedge
/// is started on the primary, no budget is spent, and only the request sent counts as an attempt.
#[tokio::test]
async fn a_hedged_route_fails_over_from_an_open_breaker_without_hedging() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  a:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ window: {{ kind: count, size: 10 }}, minimum_calls: 5 }}
  b:
    endpoints: [{{url: '{}'}}]
routes:
  - upstream: a
    failover: [b]
    hedge: {{ delay: 5s, max_hedges: 2 }}
    retry: {{ attempts: 1, budget: {{ ratio: 0, min_per_second: 1, window: 10s }} }}
",
        a.url(),
        b.url()
    ))
    .await;
    gw.state
        .runtime()
        .upstream("a")
        .unwrap()
        .policies
        .breaker()
        .unwrap()
        .force_open();
    let balance = || {
        gw.state.runtime().routes[0]
            .policies
            .budget()
            .unwrap()
            .balance()
    };
    let before = balance();
    assert!(before > 0, "the budget has tokens a hedge could spend");
    let c = client();
    for _ in 0..5 {
        let r = get(&c, &gw.url("/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-upstream"), Some("b"));
        // One attempt: a success after one attempt carries no attempts header.
        assert_eq!(r.header("x-bulwark-attempts"), None);
    }
    assert_eq!(balance(), before, "no hedge spent the budget");
    assert_eq!((a.hits(), b.hits()), (0, 5));
    gw.stop().await;
}

/// A connect failure sent nothing: without a `retry:` section, and even for a POST, the request
/// moves on to the next upstream of the chain.
#[tokio::test]
async fn a_connect_failure_fails_over_without_a_retry_section() {
    let (b, bodies) = recording("b", 200).await;
    let dead = dead_url().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{dead}'}}] }}
  b: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: a
    failover: [b]
",
        b.url()
    ))
    .await;
    let c = client();
    let r = get(&c, &gw.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("b"));
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    let post = http::Request::post(gw.url("/orders"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"order=1",
        )))
        .unwrap();
    let r = send(&c, post).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("b"));
    assert_eq!(b.hits(), 2);
    assert_eq!(*bodies.lock().unwrap(), ["", "order=1"]);
    gw.stop().await;
}
