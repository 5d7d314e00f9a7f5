//! What a client sees when the gateway acts across retries, hedging and failover chains (found by
//! a review; each test but the control failed before its fix): a hedge that found no endpoint
//! after a reset, the Retry-After of a chain of refusals, a retry that cannot fit the deadline.
mod support;

use support::*;
use tokio::io::AsyncWriteExt;

/// A raw upstream whose first connection reads the request and closes without an answer (a
/// reset, as the gateway sees it); every later connection answers 200 `ok`.
async fn resets_first() -> RawUpstream {
    RawUpstream::start(|mut s, i| async move {
        let mut buf = Vec::new();
        if i == 0 {
            let _ = read_head(&mut s, &mut buf).await;
            return; // dropped: closed with no response
        }
        while read_head(&mut s, &mut buf).await.is_some() {
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await
}

/// Control for the test below: the same route without `hedge` retries the reset and succeeds.
#[tokio::test]
async fn control_a_reset_on_a_single_endpoint_route_is_retried() {
    let up = resets_first().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
    timeout: 10s
    retry: {{ attempts: 3, on: [reset, connect_failure, 5xx], backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }} }}
",
        up.url()
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-attempts")),
        (200, Some("2"))
    );
    gw.stop().await;
}

/// A hedged route on a one-endpoint upstream, retrying resets: the first attempt is reset well
/// before the hedge delay. The library starts a hedge at once on a failure; it finds no endpoint
/// (the only one was tried). That must not end the request as "no healthy endpoint": the docs say
/// a failed attempt on a single endpoint "is retried as usual", and the endpoint is healthy.
#[tokio::test]
async fn a_reset_on_a_hedged_single_endpoint_route_is_retried_not_no_healthy_endpoint() {
    let up = resets_first().await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
    timeout: 10s
    hedge: {{ delay: 2s, max_hedges: 1 }}
    retry: {{ attempts: 3, on: [reset, connect_failure, 5xx], backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }} }}
",
        up.url()
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-bulwark-reason")),
        (200, None),
        "attempts {:?}, upstream connections {}",
        r.header("x-bulwark-attempts"),
        up.accepted()
    );
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    gw.stop().await;
}

/// A breaker that opens on its first failure and stays open for `open`.
fn breaker(open: &str) -> String {
    format!(
        "circuit_breaker: {{ window: {{ kind: count, size: 10 }}, minimum_calls: 1, failure_rate_threshold: 50, open_duration: {open} }}"
    )
}

/// Both breakers of a chain open: the primary's lets a probe through in ~3 s, the failover's in
/// ~5 min. The request can be served as soon as the primary probes, so `Retry-After` (the
/// breaker's remaining open time, per the docs) must not tell the client to stay away for 5
/// minutes: it is the earliest time any upstream of the chain would take the request.
#[tokio::test]
async fn retry_after_of_a_chain_of_open_breakers_is_the_earliest_reopening() {
    let a = Upstream::status("a", 503).await;
    let b = Upstream::status("b", 503).await;
    let gw = Gateway::start(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}], {} }}
  b: {{ endpoints: [{{url: '{}'}}], {} }}
routes:
  - upstream: a
    failover: [b]
    timeout: 10s
    retry: {{ attempts: 1, on: [5xx] }}
",
        a.url(),
        breaker("3s"),
        b.url(),
        breaker("5m")
    ))
    .await;
    // a's 503 opens a's breaker; the failover to b gets b's 503, which opens b's.
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        r.header("x-upstream"),
        Some("b"),
        "{:?}",
        r.header("x-bulwark-reason")
    );
    assert_eq!((a.hits(), b.hits()), (1, 1));
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-bulwark-reason"), Some("circuit_open"));
    assert_eq!((a.hits(), b.hits()), (1, 1), "nothing sent");
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=3).contains(&secs),
        "Retry-After {secs}: the primary takes requests again within 3 s"
    );
    gw.stop().await;
}

/// The primary provider answers 429 with `Retry-After: 120` (out of quota for two minutes); the
/// route retries 429 and has a failover. The retry on the primary cannot be sent (its Retry-After
/// does not fit in the route's 10 s), so the primary is exhausted for this request: the failover
/// takes it, as it takes the next request (whose primary is in its quota cooldown). The client
/// must not get the primary's 429 while a healthy backup is configured and time is left.
#[tokio::test]
async fn a_retry_after_too_long_to_wait_fails_over_instead_of_passing_the_429_through() {
    let a = Upstream::start(
        "a",
        std::sync::Arc::new(|_req| {
            Box::pin(async move {
                let mut r = reply("a", 429, "quota exceeded");
                r.headers_mut()
                    .insert("retry-after", "120".parse().unwrap());
                r
            })
        }),
    )
    .await;
    let b = Upstream::named("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
  b: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: a
    failover: [b]
    timeout: 10s
    retry: {{ attempts: 2, on: [5xx, 429], backoff: {{ kind: constant, base: 1ms, max: 1ms, jitter: none }} }}
",
        a.url(),
        b.url()
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-upstream")),
        (200, Some("b")),
        "reason {:?}, attempts {:?}",
        r.header("x-bulwark-reason"),
        r.header("x-bulwark-attempts")
    );
    assert_eq!(r.header("x-bulwark-attempts"), Some("2"));
    assert_eq!((a.hits(), b.hits()), (1, 1));
    gw.stop().await;
}

/// Same with a plain backoff too long for the deadline (no Retry-After): a 503 from the primary,
/// a retry whose backoff cannot fit, and a failover that could. The request is not over: the
/// failover upstream is tried.
#[tokio::test]
async fn a_backoff_too_long_for_the_deadline_still_fails_over() {
    let a = Upstream::status("a", 503).await;
    let b = Upstream::named("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:
  a: {{ endpoints: [{{url: '{}'}}] }}
  b: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: a
    failover: [b]
    timeout: 2s
    retry: {{ attempts: 3, on: [5xx], backoff: {{ kind: constant, base: 5s, max: 5s, jitter: none }} }}
",
        a.url(),
        b.url()
    ))
    .await;
    let r = get(&client(), &gw.url("/")).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-upstream")),
        (200, Some("b")),
        "reason {:?}, attempts {:?}",
        r.header("x-bulwark-reason"),
        r.header("x-bulwark-attempts")
    );
    assert_eq!((a.hits(), b.hits()), (1, 1));
    gw.stop().await;
}

/// A chain refused by a rate limit (admitting again within 10 s) and then by an open breaker
/// (30 s): the client gets the rate limit's 429 and its `Retry-After`, not a 503 `circuit_open`
/// (not every breaker of the chain is open) with the later time.
#[tokio::test]
async fn a_chain_refused_by_a_rate_limit_and_an_open_breaker_answers_the_earliest() {
    let ok = Upstream::named("ok").await;
    for chain in [("limited", "guarded"), ("guarded", "limited")] {
        let gw = Gateway::start(&format!(
            "upstreams:
  limited:
    endpoints: [{{url: '{ok}'}}]
    rate_limit: {{ per_second: 0.1, burst: 1 }}
  guarded:
    endpoints: [{{url: '{ok}'}}]
    circuit_breaker: {{}}
routes:
  - name: api
    upstream: {}
    failover: [{}]
",
            chain.0,
            chain.1,
            ok = ok.url()
        ))
        .await;
        let runtime = gw.state.runtime();
        let guarded = runtime.upstream("guarded").unwrap();
        guarded.policies.breaker().unwrap().force_open();
        let c = client();
        // Takes `limited`'s only token.
        assert_eq!(get(&c, &gw.url("/a")).await.status, 200);
        let hits = ok.hits();
        let g = get(&c, &gw.url("/b")).await;
        assert_eq!(ok.hits(), hits, "nothing was sent for the second request");
        assert_eq!(
            (g.status.as_u16(), g.header("x-bulwark-reason")),
            (429, Some("rate_limited")),
            "{chain:?}"
        );
        let retry_after: u64 = g.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=10).contains(&retry_after), "{chain:?}: {retry_after}");
        gw.stop().await;
    }
}
