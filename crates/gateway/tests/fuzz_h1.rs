//! Mutated HTTP/1.1 requests over real TCP (property test): whatever bytes a client sends, the
//! gateway answers with well-formed responses of its own or passes on what the upstream answered to
//! a request it accepted, closes the connection in bounded time, never answers 500, never forwards
//! a request the upstream cannot parse, and serves the next client as before.
mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::*;
use tokio::io::AsyncWriteExt;

/// Requests the mutations start from: a GET with headers, a POST with a length, a chunked POST,
/// HTTP/1.0, and two pipelined requests.
const BASES: &[&[u8]] = &[
    b"GET /a?x=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok",
];

/// Sends `bytes`, collects everything the gateway sends until it closes (at most 5 s), and checks
/// each response. A write refused because the gateway already closed is not an error.
async fn exchange(gw: &Gateway, bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut c = RawClient::connect(gw).await;
    let _ = c.s.write_all(bytes).await;
    prop_assert!(
        c.closed_within(5).await,
        "the connection was still open 5 s after {:?}",
        String::from_utf8_lossy(bytes)
    );
    while !c.buf.is_empty() {
        let (r, _) = c.read_response(false).await;
        let why = format!(
            "{} {:?} for {:?}",
            r.status,
            r.headers,
            String::from_utf8_lossy(bytes)
        );
        prop_assert!(r.status != 500, "{}", why);
        prop_assert!(
            r.status != 502,
            "a forwarded request the upstream could not take: {}",
            why
        );
        prop_assert!(
            r.header("x-upstream") == Some("echo") || r.header("x-bulwark-reason").is_some(),
            "a response from neither the upstream's handler nor the gateway: {}",
            why
        );
        if r.header("x-upstream") == Some("echo") {
            prop_assert_eq!(r.status, 200, "the upstream saw a broken body: {}", why);
        }
    }
    Ok(())
}

#[test]
fn mutated_requests_get_well_formed_answers_and_the_gateway_serves_on() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (up, gw) = rt.block_on(async {
        let up = Upstream::echo().await;
        let gw = Gateway::start(&limited_config(
            &up.url(),
            "header_read_timeout: 300ms, idle_timeout: 300ms, max_body_bytes: 1KiB",
        ))
        .await;
        (up, gw)
    });
    let mut runner = TestRunner::new(Config {
        cases: 40,
        // A failing input costs seconds (the wait for the close): shrink a little only.
        max_shrink_iters: 24,
        failure_persistence: None,
        ..Config::default()
    });
    // Six inputs at a time, each on its own connection.
    runner
        .run(
            &prop::collection::vec(mutate::mutated(BASES, 1..4), 6),
            |inputs| {
                rt.block_on(async {
                    let runs = inputs.iter().map(|i| exchange(&gw, i));
                    for r in futures_util::future::join_all(runs).await {
                        r?;
                    }
                    let mut c = RawClient::connect(&gw).await;
                    c.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
                    prop_assert_eq!(c.response(false).await.status, 200);
                    Ok(())
                })
            },
        )
        .unwrap();
    assert!(
        up.hits() > 40,
        "most inputs reach the upstream: {}",
        up.hits()
    );
    rt.block_on(gw.stop());
}
