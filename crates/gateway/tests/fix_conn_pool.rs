//! Upstream connection reuse: a connection whose request body is still streaming is not handed to
//! another request, even when its response has already ended.
mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn a_connection_still_sending_a_request_body_is_not_reused() {
    // The upstream answers at once and reads the request body in the background (full duplex, so the
    // connection stays keep-alive); it reports each body it read to the end.
    let (up, mut bodies) = Upstream::reporting_bodies("u").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n",
        up.url()
    ))
    .await;

    // A: a chunked POST (streamed upstream) that stalls after its first chunk.
    let mut a = RawClient::connect(&gw).await;
    a.send(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    let resp_a = tokio::time::timeout(Duration::from_secs(10), a.response(false))
        .await
        .expect("A's early response did not arrive");
    assert_eq!(resp_a.status, 200, "{resp_a:?}");
    assert_eq!(resp_a.body, b"ok", "{resp_a:?}");

    // B, while A's body is still stalled: served (not stuck behind A's body until the route timeout).
    let mut b = RawClient::connect(&gw).await;
    b.send(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let resp_b = tokio::time::timeout(Duration::from_secs(20), b.response(false))
        .await
        .expect("B's response did not arrive");
    assert_eq!(resp_b.status, 200, "{resp_b:?}");
    assert_eq!(up.hits(), 2);

    // A finishes its body now: it arrives intact upstream (B's GET body, empty, may come first).
    a.send(b"6\r\n world\r\n0\r\n\r\n").await;
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let body = bodies.recv().await.unwrap();
            if !body.is_empty() {
                return body;
            }
        }
    })
    .await
    .expect("A's body did not reach the upstream");
    assert_eq!(got, "hello world");

    // Sequential requests still reuse one pooled connection.
    let ep = endpoint(&gw, "u", 0);
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &gw.url("/c")).await.status, 200);
    }
    wait_until(10, || ep.pool.idle_count() >= 1).await;
    gw.stop().await;
}

/// With the pool full (`max_idle: 1`) of a connection that outlived `pool.idle_timeout`, the
/// connection a request just finished on takes its place (it was closed, and the next request
/// opened a new one); and the expired one is closed within a fraction of its timeout.
#[tokio::test]
async fn a_full_pool_makes_room_for_the_connection_just_used() {
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let up = RawUpstream::start(move |mut s, _| {
        let r = r.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(req) = read_head(&mut s, &mut buf).await {
                if req.starts_with("GET /slow") {
                    r.notified().await;
                }
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    endpoints: [{{url: '{}'}}]\n    pool: {{max_idle: 1, idle_timeout: 400ms}}\nroutes:\n  - upstream: u\n    timeout: 10s\n",
        up.url()
    ))
    .await;
    let ep = endpoint(&gw, "u", 0);
    let slow = {
        let c = client();
        let url = gw.url("/slow");
        tokio::spawn(async move { get(&c, &url).await })
    };
    wait_until(10, || up.accepted() == 1).await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/fast")).await.status, 200);
    assert_eq!(up.accepted(), 2);
    // The fast request's connection waits in the pool, and outlives its idle timeout there: the
    // reaper closes it (it ran every 5 s whatever the timeout).
    wait_until(10, || ep.pool.idle_count() == 1).await;
    wait_until(3, || ep.pool.idle_count() == 0).await;
    release.notify_one();
    assert_eq!(slow.await.unwrap().status, 200);
    // The slow request's connection is kept, and the next request reuses it.
    wait_until(10, || ep.pool.idle_count() == 1).await;
    assert_eq!(get(&c, &gw.url("/again")).await.status, 200);
    assert_eq!(up.accepted(), 2, "the connection just used was dropped");
    gw.stop().await;
}

/// A reload that shortens `pool.idle_timeout` is followed by the reaper at once: it slept the 5 s
/// the default 30 s gave it, so an idle connection of the new config outlived its timeout by up
/// to 5 s (found by a review).
#[tokio::test]
async fn a_reload_that_shortens_pool_idle_timeout_is_followed_by_the_reaper() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let closed = Arc::new(AtomicUsize::new(0));
    let c2 = closed.clone();
    let up = RawUpstream::start(move |mut s, _| {
        let closed = c2.clone();
        async move {
            let mut buf = Vec::new();
            while read_head(&mut s, &mut buf).await.is_some() {
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let config = |extra: &str| {
        format!(
            "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}]{extra} }}\nroutes:\n  - upstream: u\n",
            up.url()
        )
    };
    let gw = Gateway::start(&config("")).await;
    // Let the reaper start its first (5 s) sleep, then shorten the timeout.
    tokio::task::yield_now().await;
    let new =
        bulwark_gateway::config::from_str(&config(", pool: { idle_timeout: 200ms }"), "gw.yaml")
            .unwrap();
    let old = gw.state.runtime();
    let rt = bulwark_gateway::proxy::Runtime::build(&new, old.telemetry(), Some(&old)).unwrap();
    gw.state.swap(rt);
    let c = client();
    assert_eq!(get(&c, &gw.url("/x")).await.status, 200);
    wait_until(3, || closed.load(Ordering::SeqCst) == 1).await;
    gw.stop().await;
}
