//! Mutated HTTP/1.1 responses from an upstream (property test over real TCP): whatever bytes an
//! upstream answers with, the client gets, in bounded time, either that response's status and
//! headers passed through or the gateway's own 502/504, never a 500 and never a silent close; a
//! second request on the same client connection is answered the same way (no desync from a reused
//! upstream connection), and the gateway serves a healthy route as before.
mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::*;
use tokio::io::AsyncWriteExt;

/// Responses the mutations start from.
const BASES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n",
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nbusy",
    b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nX-Old: 1\r\n\r\nuntil the end",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
];

/// A case: the upstream's answer to every request, and whether it closes after answering.
fn case() -> impl Strategy<Value = (Vec<u8>, bool)> {
    (mutate::mutated(BASES, 0..4), any::<bool>())
}

/// Headers the gateway may add or rewrite on a passed-through response.
const GATEWAY_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "date",
    "x-bulwark-attempts",
    "x-bulwark-reason",
];

/// The final status line's code of an upstream answer, if it has a well-formed one.
fn final_status(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    let mut status = None;
    // Lines end with CRLF or a bare LF (RFC 9112 2.2 lets a recipient take either).
    for line in text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if let Some(rest) = line
            .strip_prefix("HTTP/1.1 ")
            .or(line.strip_prefix("HTTP/1.0 "))
        {
            status = rest.get(..3).and_then(|c| c.parse().ok());
            if !status.is_some_and(|s| (100..200).contains(&s)) {
                break;
            }
        }
    }
    status
}

/// Checks one response the client got for a request answered by `answer`.
fn check(r: &RawResponse, answer: &[u8]) -> Result<(), TestCaseError> {
    let why = format!(
        "{} {:?} for the answer {:?}",
        r.status,
        r.headers,
        String::from_utf8_lossy(answer)
    );
    prop_assert!(r.status != 500, "{}", why);
    let reason = r.header("x-bulwark-reason");
    if matches!(
        (r.status, reason),
        (502, Some("upstream_error")) | (504, Some("timeout"))
    ) {
        // The gateway's own (or an upstream's 502 or 504 passed through).
        return Ok(());
    }
    // Passed through (a 5xx marked as the failure it is): the answer's status, and only headers
    // it had or the gateway manages.
    prop_assert_eq!(Some(r.status), final_status(answer), "{}", why);
    prop_assert!(
        reason.is_none() || (reason == Some("upstream_error") && r.status >= 500),
        "{}",
        why
    );
    let lower = String::from_utf8_lossy(answer).to_ascii_lowercase();
    for (name, value) in &r.headers {
        if GATEWAY_HEADERS.contains(&name.as_str()) {
            continue;
        }
        prop_assert!(
            lower.contains(&format!("{name}:")) && lower.contains(&value.to_ascii_lowercase()),
            "a header the answer did not have: {}: {} in {}",
            name,
            value,
            why
        );
    }
    Ok(())
}

async fn run_case(answer: Vec<u8>, close: bool) -> Result<(), TestCaseError> {
    let reply = answer.clone();
    let respond = move |_: &str| reply.clone();
    let up = if close {
        RawUpstream::answering_once(respond).await
    } else {
        RawUpstream::answering(respond).await
    };
    let healthy = Upstream::named("healthy").await;
    let gw = Gateway::start(&format!(
        "limits: {{ idle_timeout: 300ms }}
upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
  h: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - match: {{ path: /ok }}
    upstream: h
  - upstream: u
    timeout: 2s
",
        up.url(),
        healthy.url()
    ))
    .await;
    let mut c = RawClient::connect(&gw).await;
    for i in 0..2 {
        if c.s
            .write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_err()
        {
            prop_assert!(i > 0, "the first request could not be sent");
            break;
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            // A status line must come: the answer passed through, or the gateway's own.
            if c.buf.is_empty() && !c.fill().await {
                return None;
            }
            Some(c.read_response(false).await)
        })
        .await;
        let Ok(Some((r, framed))) = got else {
            return Err(TestCaseError::fail(format!(
                "no response to request {} within 5 s for the answer {:?}",
                i + 1,
                String::from_utf8_lossy(&answer)
            )));
        };
        check(&r, &answer)?;
        if framed == Framed::Cut || r.header("connection") == Some("close") {
            break;
        }
    }
    let mut c = RawClient::connect(&gw).await;
    c.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await;
    prop_assert_eq!(c.response(false).await.status, 200);
    gw.stop().await;
    Ok(())
}

#[test]
fn mutated_upstream_answers_are_passed_through_or_replaced_never_desynced() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 64,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |(answer, close)| {
            rt.block_on(run_case(answer, close))
        })
        .unwrap();
}
