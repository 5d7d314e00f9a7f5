//! Attempt-loop fixes from review: chunked bodies replayed, the route deadline in the bulkhead
//! queue, hedging on a refused upstream, retries and their own bulkhead slot, failover without a
//! retry section; a provider's response kept when the next step sends nothing, budget tokens of
//! unsent retries given back, quota cooldowns on by default and outside the breaker; hedges never
//! to an endpoint already tried nor for non-idempotent requests, and the bulkhead queue not counted
//! as upstream slowness.
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

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

/// One route on upstream `u` at `url`, whose bulkhead has one slot and no queue; with `attempts`,
/// it retries 5xx that many times, with no backoff.
fn one_slot(url: &str, attempts: Option<u32>) -> String {
    let retry = attempts.map_or(String::new(), |n| {
        format!(
            "    retry:\n      attempts: {n}\n      on: [5xx]\n      backoff: {{ kind: constant, base: 0ms, max: 0ms, jitter: none }}\n"
        )
    });
    format!(
        "upstreams:
  u:
    endpoints: [{{url: '{url}'}}]
    bulkhead: {{ max_concurrent: 1, max_queued: 0 }}
routes:
  - upstream: u
{retry}"
    )
}

#[tokio::test]
async fn a_retry_does_not_wait_for_the_bulkhead_slot_of_the_response_it_retries() {
    let up = Upstream::status("u", 503).await;
    let gw = Gateway::start(&one_slot(&up.url(), Some(3))).await;
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

/// A connect failure sent nothing, so a POST is sent again to another endpoint of the same
/// upstream when the route retries `connect_failure` (as nginx and HAProxy resend it), with its
/// body; a 503 from an endpoint is still not retried for a POST. Without `connect_failure` in
/// `on`, the POST is not resent.
#[tokio::test]
async fn a_post_that_could_not_connect_goes_to_another_endpoint() {
    let (live, bodies) = recording("live", 200).await;
    let dead = dead_url().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ balance: round_robin, endpoints: [{{url: '{dead}'}}, {{url: '{}'}}] }}
  v: {{ balance: round_robin, endpoints: [{{url: '{dead}'}}, {{url: '{}'}}] }}
routes:
  - match: {{ path_prefix: /only5xx }}
    upstream: v
    retry: {{ attempts: 2, on: [5xx], backoff: {{base: 1ms, max: 1ms}}, budget: {{min_per_second: 100}} }}
  - upstream: u
    retry: {{ attempts: 2, backoff: {{base: 1ms, max: 1ms}}, budget: {{min_per_second: 100}} }}
",
        live.url(),
        live.url()
    ))
    .await;
    let c = client();
    let post = |path: &str, i: usize| {
        http::Request::post(gw.url(path))
            .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                "order={i}"
            ))))
            .unwrap()
    };
    let mut resent = 0;
    for i in 0..4 {
        let r = send(&c, post("/orders", i)).await;
        assert_eq!(r.status, 200, "POST {i}");
        assert_eq!(r.header("x-upstream"), Some("live"));
        if r.header("x-bulwark-attempts") == Some("2") {
            resent += 1;
        }
    }
    // (Each retry takes the round robin's next turn, so each POST starts on the dead endpoint.)
    assert!(resent > 0, "no POST was tried on the dead endpoint first");
    assert_eq!(
        *bodies.lock().unwrap(),
        ["order=0", "order=1", "order=2", "order=3"],
        "each POST reached the live endpoint once, body intact"
    );
    // Retrying only 5xx: a POST whose connect failed is not resent.
    let mut statuses = Vec::new();
    for i in 0..2 {
        let r = send(&c, post("/only5xx", i)).await;
        statuses.push(r.status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 502]);
    assert_eq!(live.hits(), 5);
    gw.stop().await;
}

/// A POST whose connect failed, on a route that retries connect failures, whose retry the budget
/// refuses: nothing was sent, so the next upstream of the chain still takes it for free (as
/// before connect failures were retried whatever the method). Found by a review of the change.
#[tokio::test]
async fn a_post_that_could_not_connect_still_fails_over_when_the_budget_is_spent() {
    let live = Upstream::named("backup").await;
    let (d1, d2) = (dead_url().await, dead_url().await);
    let gw = Gateway::start(&format!(
        "upstreams:
  main: {{ balance: round_robin, endpoints: [{{url: '{d1}'}}, {{url: '{d2}'}}] }}
  backup: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: main
    failover: [backup]
    retry: {{ attempts: 2, on: [connect_failure], backoff: {{base: 1ms, max: 1ms}}, budget: {{ratio: 0.0, min_per_second: 0}} }}
",
        live.url()
    ))
    .await;
    let c = client();
    let r = send(
        &c,
        http::Request::post(gw.url("/orders"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"order=1",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (200, None),
        "a POST that reached nothing was not failed over to the backup"
    );
    assert_eq!(r.header("x-upstream"), Some("backup"));
    gw.stop().await;
}

/// The route's retry budget balance.
fn budget_balance(gw: &Gateway) -> u64 {
    gw.state.runtime().routes[0]
        .policies
        .budget()
        .unwrap()
        .balance()
}

/// `r` is the 503 of `Upstream::status(name, 503)`, passed through after `attempts` attempts.
fn passed_through(r: &Got, name: &str, attempts: &str) {
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-upstream"), Some(name));
    assert_eq!(r.text(), format!("{name} says 503"));
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(r.header("x-bulwark-attempts"), Some(attempts));
}

/// The state of upstream `up`'s breaker.
fn breaker_state(gw: &Gateway, up: &str) -> bulwark::events::BreakerState {
    gw.state
        .runtime()
        .upstream(up)
        .unwrap()
        .policies
        .breaker()
        .unwrap()
        .state()
}

/// With a breaker that opens on the provider's first 503, the step the route's `policy` takes next
/// (a retry, or a hedge) is refused: the client gets the provider's own response (body and
/// headers), not a gateway 503, and the refused step's budget token is given back.
async fn a_provider_response_survives_a_refused_step(policy: &str, what: &str) {
    let up = Upstream::status("provider", 503).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ window: {{ kind: count, size: 10 }}, minimum_calls: 1, failure_rate_threshold: 50, open_duration: 1m }}
routes:
  - upstream: u
{policy}      on: [5xx]
      budget: {{ ratio: 0.2, min_per_second: 1, window: 10s }}
",
        up.url()
    ))
    .await;
    let before = budget_balance(&gw);
    let r = get(&client(), &gw.url("/")).await;
    passed_through(&r, "provider", "1");
    assert_eq!(up.hits(), 1, "{what}");
    assert_eq!(breaker_state(&gw, "u"), bulwark::events::BreakerState::Open);
    assert_eq!(budget_balance(&gw), before, "{what}: refunded");
    gw.stop().await;
}

/// A retry refused, with no backoff and with one (the response's body is read while waiting).
#[tokio::test]
async fn a_provider_response_is_passed_through_when_its_retry_is_refused() {
    for backoff in ["0ms", "50ms"] {
        let policy = format!(
            "    retry:\n      attempts: 3\n      backoff: {{ kind: constant, base: {backoff}, max: {backoff}, jitter: none }}\n"
        );
        a_provider_response_survives_a_refused_step(&policy, &format!("retry, backoff {backoff}"))
            .await;
    }
}

/// The failover upstream has no available endpoint: the primary's answer is what the client sees.
#[tokio::test]
async fn a_provider_response_is_passed_through_when_failover_finds_no_endpoint() {
    let a = Upstream::status("a", 503).await;
    let b = Upstream::named("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
  b: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: a
    failover: [b]
    retry:
      attempts: 1
      on: [5xx]
      budget: {{ ratio: 0.2, min_per_second: 1, window: 10s }}
",
        a.url(),
        b.url()
    ))
    .await;
    gw.set_available("b", 0, false);
    let before = budget_balance(&gw);
    let r = get(&client(), &gw.url("/")).await;
    passed_through(&r, "a", "1");
    assert_eq!((a.hits(), b.hits()), (1, 0));
    assert_eq!(budget_balance(&gw), before, "the failover sent nothing");
    // With b back, the same request fails over (and spends a token).
    gw.set_available("b", 0, true);
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-upstream")),
        (200, Some("b"))
    );
    assert_eq!(budget_balance(&gw), before - 1);
    gw.stop().await;
}

/// Retries waiting in backoff already hold their budget token: a burst of concurrent failures
/// cannot send more retries than the budget allows, however long the backoff.
#[tokio::test]
async fn concurrent_failures_in_backoff_cannot_overshoot_the_budget() {
    let dead = Upstream::status("dead", 503).await;
    let gw = Gateway::start(&retrying_5xx(
        &dead.url(),
        "",
        3,
        "300ms",
        "{ ratio: 0.2, min_per_second: 1, window: 10s }",
    ))
    .await;
    const N: usize = 40;
    let c = client();
    let all = (0..N).map(|_| {
        let (c, url) = (c.clone(), gw.url("/"));
        tokio::spawn(async move { get(&c, &url).await })
    });
    let mut exhausted = 0;
    for r in futures_util::future::join_all(all).await {
        let r = r.unwrap();
        assert_eq!(r.status, 503);
        if r.header("x-bulwark-reason") == Some("budget_exhausted") {
            exhausted += 1;
        }
    }
    // floor(1 x 10 s + 0.2 x 40) = 18 retries at most, all requests failing at once.
    let retries = dead.hits() - N;
    assert!(retries <= 18, "{retries} retries");
    assert!(retries >= 10, "the reserve alone allows 10: {retries}");
    assert!(exhausted >= N - 18, "{exhausted} refused by the budget");
    gw.stop().await;
}

/// One route on upstream `u` at `url` (with `route` settings), retrying 5xx `attempts` times
/// after a constant `backoff`, with `budget`.
fn retrying_5xx(url: &str, route: &str, attempts: u32, backoff: &str, budget: &str) -> String {
    format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{url}'}}] }}
routes:
  - upstream: u
{route}    retry:
      attempts: {attempts}
      on: [5xx]
      backoff: {{ kind: constant, base: {backoff}, max: {backoff}, jitter: none }}
      budget: {budget}
"
    )
}

/// A client that goes away while its retry waits in backoff gives the retry's budget token back:
/// the retry never went out, and the budget counts only retries that went out or still wait.
#[tokio::test]
async fn a_client_gone_during_the_backoff_gives_the_retry_token_back() {
    let dead = Upstream::status("dead", 503).await;
    // A spent token stays spent for the budget's window: longer than the waits below.
    let budget = "{ ratio: 0, min_per_second: 1, window: 60s }";
    let gw = Gateway::start(&retrying_5xx(
        &dead.url(),
        "    timeout: 60s\n",
        2,
        "30s",
        budget,
    ))
    .await;
    let before = budget_balance(&gw);
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    wait_until(10, || dead.hits() == 1 && budget_balance(&gw) == before - 1).await;
    drop(c);
    wait_until(10, || budget_balance(&gw) == before).await;
    assert_eq!(dead.hits(), 1, "the retry never went out");
    gw.stop().await;
}

/// With no `cooldown` section, a 429 + `Retry-After` still takes its endpoint out of rotation
/// (cooldown is on by default), and quota answers never open the breaker.
#[tokio::test]
async fn quota_cooldown_is_on_by_default_and_outside_the_breaker() {
    let out = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let q = quota("quota", 429, out.clone(), || "30".into()).await;
    let ok = Upstream::named("ok").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    circuit_breaker: {{ window: {{ kind: count, size: 10 }}, minimum_calls: 1, failure_rate_threshold: 1, open_duration: 1m }}
  solo:
    endpoints: [{{url: '{0}'}}]
    circuit_breaker: {{ window: {{ kind: count, size: 10 }}, minimum_calls: 1, failure_rate_threshold: 1, open_duration: 1m }}
routes:
  - match: {{ path_prefix: /solo }}
    upstream: solo
  - upstream: u
",
        q.url(),
        ok.url()
    ))
    .await;
    let c = client();
    let r = get(&c, &gw.url("/")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-upstream")),
        (429, Some("quota"))
    );
    assert!(endpoint(&gw, "u", 0).in_cooldown());
    let seen = spray(&c, &gw.url("/"), 6).await;
    assert!(seen.iter().all(|s| s == "ok"), "{seen:?}");
    assert_eq!(
        breaker_state(&gw, "u"),
        bulwark::events::BreakerState::Closed
    );

    // A single endpoint out of quota: its 429 is passed through, then the gateway answers for
    // it with the time left, and the breaker stays closed throughout.
    let r = get(&c, &gw.url("/solo")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-upstream")),
        (429, Some("quota"))
    );
    let r = get(&c, &gw.url("/solo")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-bulwark-reason"), Some("rate_limited"));
    assert_eq!(
        breaker_state(&gw, "solo"),
        bulwark::events::BreakerState::Closed
    );
    assert_eq!(q.hits(), 2);
    gw.stop().await;
}

/// A hedged route: the hedge that follows the original's 503 is refused; the race must not hide
/// the provider's response, nor keep the hedge's token.
#[tokio::test]
async fn a_refused_hedge_neither_hides_the_provider_response_nor_spends_budget() {
    let policy = "    hedge: { delay: 500ms }\n    retry:\n      attempts: 1\n";
    a_provider_response_survives_a_refused_step(policy, "hedge").await;
}

/// The retry after a provider's 503 cannot connect (nothing sent): the 503 is what the client
/// sees, not a gateway 502.
#[tokio::test]
async fn a_connect_failure_does_not_replace_an_earlier_response() {
    let up = Upstream::status("provider", 503).await;
    let dead = dead_url().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
routes:
  - upstream: u
    retry:
      attempts: 2
      on: [5xx, connect_failure]
      backoff: {{ kind: constant, base: 0ms, max: 0ms, jitter: none }}
",
        up.url(),
        dead
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    passed_through(&r, "provider", "2");
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

/// A failed response whose body is larger than `retry_buffer` cannot be kept while its retry
/// waits: when that retry is then refused (the breaker opened), the client gets 502
/// `upstream_error`, as when no attempt got a response; not 503 `circuit_open`, which would say
/// the request went nowhere.
#[tokio::test]
async fn a_failed_response_too_large_to_keep_through_a_backoff_gives_502() {
    let big = "x".repeat(4096);
    let up = Upstream::start(
        "provider",
        Arc::new(move |_req| {
            let big = big.clone();
            Box::pin(async move { reply("provider", 503, big) })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    circuit_breaker: {{ window: {{ kind: count, size: 10 }}, minimum_calls: 1, failure_rate_threshold: 50, open_duration: 1m }}
routes:
  - upstream: u
    retry_buffer: 1KiB
    retry:
      attempts: 2
      on: [5xx]
      backoff: {{ kind: constant, base: 20ms, max: 20ms, jitter: none }}
",
        up.url()
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-bulwark-reason"), Some("upstream_error"));
    assert_eq!(
        r.header("x-upstream"),
        None,
        "the provider's response was dropped"
    );
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

/// A hedge waiting in the upstream's bulkhead queue when the original attempt wins is dropped
/// without sending anything: its budget token is given back.
#[tokio::test]
async fn a_hedge_cancelled_while_queued_gives_its_budget_token_back() {
    let slow = |name: &'static str| {
        Upstream::start(
            name,
            Arc::new(move |_req| {
                Box::pin(async move {
                    // A slow answer: the hedge starts (and queues) meanwhile.
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    reply(name, 200, name)
                })
            }),
        )
    };
    let (a, b) = (slow("a").await, slow("b").await);
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
    bulkhead: {{ max_concurrent: 1, max_queued: 10, queue_timeout: 1m }}
routes:
  - upstream: u
    hedge: {{ delay: 20ms }}
    retry:
      attempts: 1
      on: [5xx]
      budget: {{ ratio: 0.2, min_per_second: 1, window: 10s }}
",
        a.url(),
        b.url()
    ))
    .await;
    let before = budget_balance(&gw);
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(a.hits() + b.hits(), 1, "the hedge never left the queue");
    assert_eq!(budget_balance(&gw), before, "its token was given back");
    gw.stop().await;
}

/// An upstream answering 429 + `Retry-After: 1` to its first request and 200 after; records when
/// each request arrived.
async fn first_429(name: &str, times: Arc<Mutex<Vec<tokio::time::Instant>>>) -> Upstream {
    let n = name.to_owned();
    let count = Arc::new(AtomicUsize::new(0));
    Upstream::start(
        name,
        Arc::new(move |_req| {
            let (n, count, times) = (n.clone(), count.clone(), times.clone());
            Box::pin(async move {
                times.lock().unwrap().push(tokio::time::Instant::now());
                if count.fetch_add(1, Ordering::SeqCst) == 0 {
                    let mut r = reply(&n, 429, "slow down");
                    r.headers_mut().insert("retry-after", "1".parse().unwrap());
                    r
                } else {
                    reply(&n, 200, "ok")
                }
            })
        }),
    )
    .await
}

/// One route on upstream `u` at `url` (with `extra` settings), retrying a 429 once; hedged after
/// 50 ms when `hedge`.
fn retry_429(url: &str, extra: &str, hedge: bool) -> String {
    let hedge = if hedge {
        "    hedge: { delay: 50ms, max_hedges: 1 }\n"
    } else {
        ""
    };
    format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{url}'}}]{extra} }}
routes:
  - upstream: u
    timeout: 5s
{hedge}    retry: {{ attempts: 2, on: [429], backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }} }}
"
    )
}

/// Control: without a hedge, the single endpoint's Retry-After is waited out and the retry succeeds.
#[tokio::test]
async fn without_a_hedge_the_retry_after_is_waited_out() {
    let times = Arc::new(Mutex::new(Vec::new()));
    let up = first_429("u", times.clone()).await;
    let gw = Gateway::start(&retry_429(&up.url(), "", false)).await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}

/// With a hedge on the same route (default cooldown on): the hedge after the 429 finds no endpoint
/// (the only one cools down), which must not end the request: the retry still comes, after the
/// Retry-After.
#[tokio::test]
async fn a_hedge_finding_no_endpoint_does_not_stop_the_retry_after_a_429() {
    let times = Arc::new(Mutex::new(Vec::new()));
    let up = first_429("u", times.clone()).await;
    let gw = Gateway::start(&retry_429(&up.url(), "", true)).await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        r.status,
        200,
        "reason {:?} attempts {:?}",
        r.header("x-bulwark-reason"),
        r.header("x-bulwark-attempts")
    );
    gw.stop().await;
}

/// Cooldown off: no hedge goes to the same (only) endpoint; its Retry-After is waited out.
#[tokio::test]
async fn no_hedge_goes_to_the_only_endpoint_before_its_retry_after() {
    let times = Arc::new(Mutex::new(Vec::new()));
    let up = first_429("u", times.clone()).await;
    let gw = Gateway::start(&retry_429(
        &up.url(),
        ", cooldown: { enabled: false }",
        true,
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 200);
    let t = times.lock().unwrap().clone();
    assert_eq!(t.len(), 2);
    let gap = t[1] - t[0];
    assert!(
        gap >= Duration::from_millis(900),
        "second request after {gap:?}, Retry-After was 1s"
    );
    gw.stop().await;
}

/// Hedging is for idempotent requests: a POST on a route with `retry_non_idempotent` is not
/// hedged (a second copy while the first is in flight).
#[tokio::test]
async fn a_post_is_not_hedged_even_with_retry_non_idempotent() {
    let slow = Silent::start().await;
    let fast = Upstream::named("fast").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    balance: round_robin
    endpoints: [{{url: '{}'}}, {{url: '{}'}}]
routes:
  - upstream: u
    timeout: 500ms
    retry_non_idempotent: true
    retry: {{ attempts: 1 }}
    hedge: {{ delay: 50ms, max_hedges: 1 }}
",
        slow.url(),
        fast.url()
    ))
    .await;
    let req = Request::post(gw.url("/"))
        .body(Full::new(Bytes::from_static(b"charge=1")))
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(
        fast.hits(),
        0,
        "a POST was hedged: status {} attempts {:?}",
        r.status,
        r.header("x-bulwark-attempts")
    );
    gw.stop().await;
}

/// The bulkhead's queue is the gateway's wait, not the upstream's slowness: a 200 ms upstream
/// behind a one-slot bulkhead stays under a 300 ms `slow_call_duration`, and the breaker closed.
#[tokio::test]
async fn time_in_the_bulkhead_queue_is_not_upstream_slowness() {
    let up = Upstream::start(
        "u",
        Arc::new(|_req| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                reply("u", 200, "ok")
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    bulkhead: {{ enabled: true, max_concurrent: 1, max_queued: 10, queue_timeout: 5s }}
    circuit_breaker:
      window: {{ kind: count, size: 10 }}
      minimum_calls: 3
      slow_call_duration: 300ms
      slow_call_rate_threshold: 50
      open_duration: 1m
routes:
  - upstream: u
    timeout: 10s
",
        up.url()
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = gw.url("/");
        tasks.push(tokio::spawn(
            async move { get(&client(), &url).await.status },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // Every upstream call took ~200 ms (< 300 ms): the breaker must stay closed.
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 200, "reason {:?}", r.header("x-bulwark-reason"));
    gw.stop().await;
}

/// As for a retry, no hedge starts that the route's deadline cannot finish: with attempts that
/// typically take 150 ms, a hedge due 100 ms before the deadline is not sent.
#[tokio::test]
async fn no_hedge_starts_that_the_deadline_cannot_finish() {
    let (a, b) = (Silent::start().await, Silent::start().await);
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}, {{url: '{}'}}] }}
routes:
  - upstream: u
    timeout: 300ms
    hedge: {{ delay: 200ms }}
",
        a.url(),
        b.url()
    ))
    .await;
    let rt = gw.state.runtime();
    for _ in 0..20 {
        rt.routes[0]
            .policies
            .latency()
            .record(Duration::from_millis(150));
    }
    let c = client();
    assert_eq!(get(&c, &gw.url("/")).await.status, 504);
    let accepted = |s: &Silent| s.accepted.load(Ordering::SeqCst);
    assert_eq!(accepted(&a) + accepted(&b), 1, "no hedge went out");
    gw.stop().await;
}

/// An upstream answering 503 with a chunked body: `error`, then its end only once `release` is
/// notified.
async fn slow_503() -> (RawUpstream, Arc<tokio::sync::Notify>) {
    use tokio::io::AsyncWriteExt;
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let up = RawUpstream::start(move |mut s, _| {
        let gate = gate.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            let head = b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n";
            let _ = s.write_all(head).await;
            let _ = s.write_all(b"5\r\nerror\r\n").await;
            gate.notified().await;
            let _ = s.write_all(b"0\r\n\r\n").await;
        }
    })
    .await;
    (up, release)
}

/// A failed response passed through to the client holds its upstream's bulkhead slot until its
/// body ends, as a successful one does (it was given back at once, so a slow error body escaped
/// the limit).
#[tokio::test]
async fn a_failed_response_passed_through_holds_its_bulkhead_slot_to_its_end() {
    let (up, release) = slow_503().await;
    let gw = Gateway::start(&one_slot(&up.url(), None)).await;
    let c = client();
    let first = get_streaming(&c, &gw.url("/")).await;
    assert_eq!(first.status(), 503);
    let mut body = first.into_body();
    assert_eq!(next_data(&mut body).await.as_deref(), Some(&b"error"[..]));
    // Its body still streams: the one slot is taken.
    let second = get(&c, &gw.url("/")).await;
    assert_eq!(
        (second.status.as_u16(), second.header("x-bulwark-reason")),
        (503, Some("bulkhead_full"))
    );
    assert_eq!(up.accepted(), 1);
    release.notify_one();
    while next_data(&mut body).await.is_some() {}
    // Its end gave the slot back.
    release.notify_one();
    let third = get(&c, &gw.url("/")).await;
    assert_eq!(third.text(), "error");
    gw.stop().await;
}

/// The last failed response of a retrying route, passed through once its attempts are spent,
/// holds its upstream's bulkhead slot to its end too (the slot was given back as soon as the
/// response was found retryable, before the loop knew whether anything else would be tried).
#[tokio::test]
async fn the_last_failed_response_of_spent_retries_holds_its_bulkhead_slot() {
    let (up, release) = slow_503().await;
    let gw = Gateway::start(&one_slot(&up.url(), Some(2))).await;
    let c = client();
    let first = get_streaming(&c, &gw.url("/")).await;
    assert_eq!(first.status(), 503);
    assert_eq!(up.accepted(), 2, "both attempts went out");
    let mut body = first.into_body();
    assert_eq!(next_data(&mut body).await.as_deref(), Some(&b"error"[..]));
    let second = get(&c, &gw.url("/")).await;
    let accepted = up.accepted();
    release.notify_waiters();
    assert_eq!(
        (
            second.status.as_u16(),
            second.header("x-bulwark-reason"),
            accepted
        ),
        (503, Some("bulkhead_full"), 2),
        "the passed-through response held no slot"
    );
    gw.stop().await;
}

/// A failed response kept while its retry waits gives its bulkhead slot back before the backoff:
/// a request queued for the upstream's one slot goes out during the first one's backoff, even
/// while the kept response's (slow) error body is still being read. (It was held until the next
/// attempt, and the body read lasts up to the whole backoff.)
#[tokio::test]
async fn a_kept_response_gives_its_bulkhead_slot_back_before_the_backoff() {
    let (up, release) = slow_503().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    bulkhead: {{ max_concurrent: 1, max_queued: 1, queue_timeout: 1m }}
routes:
  - upstream: u
    timeout: 5m
    retry:
      attempts: 2
      on: [5xx]
      backoff: {{ kind: constant, base: 1m, max: 1m, jitter: none }}
",
        up.url()
    ))
    .await;
    let url = gw.url("/");
    let first = tokio::spawn(async move { get(&client(), &url).await.status });
    wait_until(10, || up.accepted() == 1).await;
    let url = gw.url("/");
    let second = tokio::spawn(async move { get(&client(), &url).await.status });
    // The first request is in its backoff (1 min): the second one's attempt goes out meanwhile.
    wait_until(10, || up.accepted() == 2).await;
    release.notify_waiters();
    first.abort();
    second.abort();
    gw.stop().await;
}

/// An attempt the full bulkhead refuses spends no rate-limit token: the rate limit counts what is
/// sent, so refusals under overload do not eat the upstream's quota.
#[tokio::test]
async fn a_bulkhead_refusal_spends_no_rate_limit_token() {
    let (up, release) = Upstream::held("u", "ok").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u:
    endpoints: [{{url: '{}'}}]
    bulkhead: {{ max_concurrent: 1, max_queued: 0 }}
    rate_limit: {{ per_second: 0.1, burst: 2 }}
routes:
  - upstream: u
",
        up.url()
    ))
    .await;
    let c = client();
    // The first request takes a token and the bulkhead's only slot, and is held upstream.
    let first = tokio::spawn({
        let (c, url) = (c.clone(), gw.url("/1"));
        async move { get(&c, &url).await }
    });
    wait_until(10, || up.hits() == 1).await;
    for i in 0..3 {
        let r = get(&c, &gw.url(&format!("/busy/{i}"))).await;
        assert_eq!(r.header("x-bulwark-reason"), Some("bulkhead_full"));
    }
    release.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    // The second token is still there (the permit stored here releases the next request).
    release.notify_one();
    let r = get(&c, &gw.url("/2")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (200, None)
    );
    gw.stop().await;
}
