//! The admission queue (`admission:`): requests forwarded at once, the others waiting by priority,
//! the least important shed first.
mod admin_support;
mod support;

use std::sync::Arc;
use std::time::Duration;

use admin_support::*;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::sync::Notify;
use tokio::time::Instant;

/// One slot, a queue of one, three routes by priority on a held upstream.
fn config(up: &str, admission: &str) -> String {
    format!(
        "admission: {admission}
upstreams:
  main: {{ endpoints: [{{url: '{up}'}}] }}
routes:
  - match: {{ path_prefix: /low }}
    upstream: main
    priority: low
  - match: {{ path_prefix: /critical }}
    upstream: main
    priority: critical
  - match: {{ path_prefix: /fast }}
    upstream: main
    timeout: 50ms
  - upstream: main
"
    )
}

fn spawn_get(gw: &Gateway, path: &str, priority: Option<&str>) -> tokio::task::JoinHandle<Got> {
    let c = client();
    let mut b = Request::get(gw.url(path));
    if let Some(p) = priority {
        b = b.header("x-priority", p);
    }
    let req = b.body(Full::new(Bytes::new())).unwrap();
    tokio::spawn(async move { send(&c, req).await })
}

fn queued(gw: &Gateway) -> usize {
    gw.state
        .runtime()
        .admission
        .as_ref()
        .unwrap()
        .shedder()
        .queued()
}

async fn held() -> (Upstream, Arc<Notify>) {
    Upstream::held("held", "done").await
}

#[tokio::test]
async fn a_critical_request_displaces_a_low_one_from_the_full_queue() {
    let (up, release) = held().await;
    let gw = Gateway::start(&config(&up.url(), "{ max_concurrent: 1, max_queued: 1 }")).await;
    let first = spawn_get(&gw, "/", None);
    wait_until(10, || up.hits() == 1).await;
    let low = spawn_get(&gw, "/low", None);
    wait_until(10, || queued(&gw) == 1).await;
    let critical = spawn_get(&gw, "/critical", None);
    let g = low.await.unwrap();
    assert_eq!(g.status, 503);
    assert_eq!(g.header("x-bulwark-reason"), Some("shed"));
    assert_eq!(g.header("retry-after"), Some("1"));
    // Another low one finds the queue full of a more important request.
    let g = spawn_get(&gw, "/low", None).await.unwrap();
    assert_eq!(g.header("x-bulwark-reason"), Some("shed"));
    release.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    wait_until(10, || up.hits() == 2).await;
    release.notify_one();
    assert_eq!(critical.await.unwrap().status, 200);
    assert_eq!(up.hits(), 2, "the shed requests never reached the upstream");
    let rt = gw.state.runtime();
    let m = rt.telemetry().encode(&rt);
    for (series, n) in [
        (
            r#"bulwark_shed_total{reason="displaced",priority="low"}"#,
            1.0,
        ),
        (
            r#"bulwark_shed_total{reason="queue_full",priority="low"}"#,
            1.0,
        ),
        ("bulwark_admission_running", 0.0),
        ("bulwark_admission_queued", 0.0),
    ] {
        assert_eq!(sample(&m, series), Some(n), "{series}\n{m}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_waiter_is_shed_at_the_queue_timeout_or_times_out_at_the_route_deadline() {
    let (up, release) = held().await;
    let gw = Gateway::start(&config(
        &up.url(),
        "{ max_concurrent: 1, max_queued: 4, queue_timeout: 200ms }",
    ))
    .await;
    let first = spawn_get(&gw, "/", None);
    wait_until(10, || up.hits() == 1).await;
    let t = Instant::now();
    let g = spawn_get(&gw, "/", None).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        (g.status.as_u16(), g.header("x-bulwark-reason")),
        (503, Some("shed"))
    );
    // The route's 50 ms deadline comes first: a timeout, counted as one and not as shed.
    let g = spawn_get(&gw, "/fast", None).await.unwrap();
    assert_eq!(
        (g.status.as_u16(), g.header("x-bulwark-reason")),
        (504, Some("timeout"))
    );
    let rt = gw.state.runtime();
    let m = rt.telemetry().encode(&rt);
    let timeouts = r#"bulwark_timeouts_total{route="route2",kind="total"}"#;
    assert_eq!(sample(&m, timeouts), Some(1.0), "{m}");
    let shed = |reason: &str| {
        let name = format!(r#"bulwark_shed_total{{reason="{reason}",priority="normal"}}"#);
        sample(&m, &name).unwrap_or(0.0)
    };
    assert_eq!((shed("timeout"), shed("queue_full")), (1.0, 0.0), "{m}");
    release.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_may_lower_its_priority_never_raise_it() {
    let (up, release) = held().await;
    let gw = Gateway::start(&config(
        &up.url(),
        "{ max_concurrent: 1, max_queued: 1, priority_header: x-priority }",
    ))
    .await;
    let first = spawn_get(&gw, "/", None);
    wait_until(10, || up.hits() == 1).await;
    // A critical route's request that says `low` is low: a normal one displaces it.
    let lowered = spawn_get(&gw, "/critical", Some("low"));
    wait_until(10, || queued(&gw) == 1).await;
    let normal = spawn_get(&gw, "/", None);
    assert_eq!(
        lowered.await.unwrap().header("x-bulwark-reason"),
        Some("shed")
    );
    // A low route's request that says `critical` stays low: refused by the full queue.
    let g = spawn_get(&gw, "/low", Some("critical")).await.unwrap();
    assert_eq!(g.header("x-bulwark-reason"), Some("shed"));
    for _ in 0..2 {
        release.notify_one();
    }
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(normal.await.unwrap().status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_the_queue_when_the_section_is_unchanged() {
    let (up, release) = held().await;
    let section = "{ max_concurrent: 1, max_queued: 1 }";
    let ops = Ops::start(&config(&up.url(), section), None).await;
    let c = client();
    let first = tokio::spawn({
        let (c, url) = (c.clone(), ops.url("/"));
        async move { get(&c, &url).await }
    });
    wait_until(10, || up.hits() == 1).await;
    let gen = ops.gateway().generation();
    ops.rewrite(&format!(
        "{}  - match: {{ path: /extra }}\n    upstream: main\n",
        config(&up.url(), section)
    ));
    eventually(10, "reload", || async { ops.gateway().generation() > gen }).await;
    let admission = |gw: &bulwark_gateway::proxy::Gateway| {
        gw.runtime().admission.as_ref().unwrap().shedder().running()
    };
    assert_eq!(
        admission(ops.gateway()),
        1,
        "the slot taken before the reload"
    );
    release.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(admission(ops.gateway()), 0);
    ops.stop().await;
}

/// After a reload that replaces the queue, requests admitted under the old one still hold its
/// slots (both limits apply side by side), and the gauges count them.
#[tokio::test]
async fn the_gauges_count_the_slots_of_a_queue_a_reload_replaced() {
    let (up, release) = held().await;
    let ops = Ops::start(
        &config(&up.url(), "{ max_concurrent: 1, max_queued: 1 }"),
        None,
    )
    .await;
    let c = client();
    let first = tokio::spawn({
        let (c, url) = (c.clone(), ops.url("/"));
        async move { get(&c, &url).await }
    });
    wait_until(10, || up.hits() == 1).await;
    let running = |m: &str| sample(m, "bulwark_admission_running");
    assert_eq!(running(&ops.metrics(&c).await), Some(1.0));
    let gen = ops.gateway().generation();
    ops.rewrite(&config(&up.url(), "{ max_concurrent: 1, max_queued: 2 }"));
    eventually(10, "reload", || async { ops.gateway().generation() > gen }).await;
    let m = ops.metrics(&c).await;
    assert_eq!(running(&m), Some(1.0), "forwarded under the old queue\n{m}");
    release.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    eventually(10, "the old slot given back", || async {
        running(&ops.metrics(&c).await) == Some(0.0)
    })
    .await;
    ops.stop().await;
}

/// An upstream whose first answer streams: head and one chunk, then the rest once `release` is
/// notified. Later answers (on that connection or others) are whole: `ok`.
async fn streaming_upstream(release: Arc<Notify>) -> RawUpstream {
    use tokio::io::AsyncWriteExt;
    RawUpstream::start(move |mut s, i| {
        let r = release.clone();
        async move {
            let mut buf = Vec::new();
            let mut n = 0;
            while read_head(&mut s, &mut buf).await.is_some() {
                n += 1;
                if i == 0 && n == 1 {
                    let head =
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                    s.write_all(head.as_bytes()).await.unwrap();
                    r.notified().await;
                    s.write_all(b"4\r\nlast\r\n0\r\n\r\n").await.unwrap();
                } else {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                }
            }
        }
    })
    .await
}

/// A streamed response keeps its slot until its body ends (over HTTP/2 too: a stream whose body
/// stops moving is cut at `idle_timeout`, see `h2_streams.rs`).
async fn a_streamed_response_holds_its_slot_until_its_body_ends(c: Client) {
    let release = Arc::new(Notify::new());
    let up = streaming_upstream(release.clone()).await;
    let gw = Gateway::start(&config(&up.url(), "{ max_concurrent: 1, max_queued: 1 }")).await;
    let mut streaming = get_streaming(&c, &gw.url("/")).await;
    assert_eq!(
        next_data(streaming.body_mut()).await.as_deref(),
        Some(&b"first"[..])
    );
    // The head went out, the body has not ended: the slot is still taken.
    let second = spawn_get(&gw, "/", None);
    wait_until(10, || queued(&gw) == 1).await;
    release.notify_one();
    assert_eq!(
        next_data(streaming.body_mut()).await.as_deref(),
        Some(&b"last"[..])
    );
    let g = second.await.unwrap();
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "ok"));
    gw.stop().await;
}

#[tokio::test]
async fn a_streamed_http1_response_holds_its_slot_until_its_body_ends() {
    a_streamed_response_holds_its_slot_until_its_body_ends(client()).await;
}

#[tokio::test]
async fn a_streamed_http2_response_holds_its_slot_until_its_body_ends() {
    a_streamed_response_holds_its_slot_until_its_body_ends(h2c_client()).await;
}

/// `bulwark_admission_running` counts the slots of the current queue and of the queues reloads
/// replaced that were busy when the reload built the new runtime. A request that had already
/// loaded the old runtime but took its slot only after the reload (it was in its route's fault
/// delay, which comes before admission) is forwarded under the replaced queue, yet counted
/// nowhere: the gauge says 0 while it holds a slot.
#[tokio::test]
async fn the_admission_gauge_counts_a_slot_the_replaced_queue_gave_after_the_reload() {
    let (up, release) = Upstream::held("held", "done").await;
    let config = |max_queued: u32| {
        format!(
            "admission: {{ max_concurrent: 1, max_queued: {max_queued} }}
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: slow
    upstream: u
    fault: {{ delay: {{ duration: 2s, percent: 100 }} }}
",
            up.url()
        )
    };
    let ops = Ops::start_with(&config(1), None, Duration::from_secs(3600)).await;
    let c = client();
    let first = tokio::spawn({
        let (c, url) = (c.clone(), ops.url("/"));
        async move { get(&c, &url).await }
    });
    let delays = "bulwark_faults_total{route=\"slow\",kind=\"delay\"}";
    eventually(5, "the request is in its fault delay", || async {
        sample(&ops.metrics(&c).await, delays) == Some(1.0)
    })
    .await;
    // The queue's section changes while the request waits out its delay.
    ops.rewrite(&config(2));
    ops.reloader().reload().unwrap();
    let u = &up;
    eventually(
        5,
        "the request is forwarded",
        || async move { u.hits() == 1 },
    )
    .await;
    let m = ops.metrics(&c).await;
    assert_eq!(
        sample(&m, "bulwark_admission_running"),
        Some(1.0),
        "one request holds a slot (of the replaced queue)"
    );
    release.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    ops.stop().await;
}

/// "A waiting request whose client closes its connection leaves the queue at once (a 499), also
/// over HTTP/1.1 when it has a body that arrived whole": a small chunked POST (its last chunk
/// sent with its head) stayed queued for a client that was gone, and would have been sent
/// upstream when a slot freed. Found by a review; failed before its fix.
#[tokio::test]
async fn a_queued_chunked_post_whose_client_leaves_frees_its_place() {
    let (up, release) = Upstream::held("held", "done").await;
    let gw = Gateway::start(&format!(
        "admission: {{ max_concurrent: 1, max_queued: 4, queue_timeout: 30s }}
upstreams:
  main: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - name: r
    upstream: main
",
        up.url()
    ))
    .await;
    let first = spawn_get(&gw, "/", None);
    wait_until(10, || up.hits() == 1).await;
    let mut abandoned = RawClient::connect(&gw).await;
    abandoned
        .send(
            b"POST /orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        )
        .await;
    wait_until(10, || queued(&gw) == 1).await;
    drop(abandoned);
    // The first request still holds the only slot: only the departure can empty the queue.
    wait_until(5, || queued(&gw) == 0).await;
    let rt = gw.state.runtime();
    let m = rt.telemetry().encode(&rt);
    let closed = r#"bulwark_requests_total{route="r",upstream="main",code="499"}"#;
    assert_eq!(sample(&m, closed), Some(1.0), "{m}");
    release.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(up.hits(), 1, "the abandoned POST never went upstream");
    gw.stop().await;
}
