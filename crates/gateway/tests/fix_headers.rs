//! Header fixes from review: every `Connection` line names hop-by-hop headers, and every
//! `x-forwarded-for` line is kept.
mod support;

use std::sync::{Arc, Mutex};

use support::*;

#[tokio::test]
async fn several_connection_and_forwarded_for_lines() {
    let seen = Arc::new(Mutex::new(Vec::<http::HeaderMap>::new()));
    let s = seen.clone();
    let up = Upstream::start(
        "u",
        Arc::new(move |req| {
            s.lock().unwrap().push(req.headers().clone());
            Box::pin(async move { reply("u", 200, "ok") })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:
  u: {{ endpoints: [{{url: '{}'}}] }}
routes:
  - upstream: u
",
        up.url()
    ))
    .await;
    let resp = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nConnection: x-secret\r\n\
          x-secret: 1\r\nx-forwarded-for: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let h = seen.lock().unwrap().pop().unwrap();
    assert!(!h.contains_key("x-secret"), "{h:?}");
    assert!(!h.contains_key("connection"), "{h:?}");
    let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["10.0.0.1, 10.0.0.2, 127.0.0.1"]);
    gw.stop().await;
}
