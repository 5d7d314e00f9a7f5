//! Fault injection (`fault:` on a route): delays and aborts for a share of requests, before anything
//! is sent upstream.
mod admin_support;
mod support;

use std::time::Duration;

use tokio::time::Instant;

use admin_support::sample;
use support::*;

fn config(up: &str, route: &str) -> String {
    format!(
        "upstreams:
  main: {{ endpoints: [{{url: '{up}'}}] }}
routes:
  - name: chaos
    upstream: main
{route}"
    )
}

#[tokio::test]
async fn an_abort_answers_without_reaching_the_upstream() {
    let up = Upstream::named("up").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "    fault: { abort: { status: 418, percent: 100 } }
    fallback: { status: 200, body: fallback }
",
    ))
    .await;
    let c = client();
    for _ in 0..3 {
        let g = get(&c, &gw.url("/x")).await;
        assert_eq!(g.status, 418, "the fault, not the fallback");
        assert_eq!(g.header("x-bulwark-reason"), Some("fault"));
        assert!(g.body.is_empty());
    }
    assert_eq!(up.hits(), 0);
    let rt = gw.state.runtime();
    let m = rt.telemetry().encode(&rt);
    assert_eq!(
        sample(&m, "bulwark_faults_total{route=\"chaos\",kind=\"abort\"}"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "bulwark_requests_total{route=\"chaos\",upstream=\"main\",code=\"418\"}"
        ),
        Some(3.0),
        "{m}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_share_of_requests_is_aborted() {
    let up = Upstream::named("up").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "    fault: { abort: { status: 503, percent: 25 } }\n",
    ))
    .await;
    let c = client();
    let n = 800;
    let mut aborted = 0;
    for _ in 0..n {
        let g = get(&c, &gw.url("/")).await;
        match g.status.as_u16() {
            503 => aborted += 1,
            200 => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(up.hits(), n - aborted);
    // Binomial(800, 0.25): mean 200, sd 12.2; these bounds are 6 sd away.
    assert!((125..=275).contains(&aborted), "{aborted} of {n}");
    gw.stop().await;
}

#[tokio::test]
async fn a_delay_holds_the_request_then_it_is_sent() {
    let up = Upstream::named("up").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "    fault: { delay: { duration: 300ms, percent: 100 } }\n",
    ))
    .await;
    let c = client();
    let t = Instant::now();
    let g = get(&c, &gw.url("/")).await;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!((g.status.as_u16(), g.text().as_str()), (200, "up"));
    assert_eq!(up.hits(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_delay_past_the_deadline_is_a_timeout() {
    let up = Upstream::named("up").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "    timeout: 200ms
    fault: { delay: { duration: 1h, percent: 100 }, abort: { status: 500, percent: 100 } }
",
    ))
    .await;
    let c = client();
    let t = Instant::now();
    let g = get(&c, &gw.url("/")).await;
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(g.status, 504);
    assert_eq!(g.header("x-bulwark-reason"), Some("timeout"));
    assert_eq!(up.hits(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_disabled_section_injects_nothing() {
    let up = Upstream::named("up").await;
    let gw = Gateway::start(&config(
        &up.url(),
        "    fault: { enabled: false, abort: { status: 503, percent: 100 } }\n",
    ))
    .await;
    assert_eq!(get(&client(), &gw.url("/")).await.status, 200);
    assert!(gw.state.runtime().routes[0].fault.is_none());
    gw.stop().await;
}
