//! HTTP/2 trailers between an `http2: true` upstream and an HTTP/2 client: the fields RFC 9110
//! 6.5.1 forbids as trailers are dropped on this path too (no HTTP/1.1 parser or encoder sees them).
mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use support::*;

/// A response body: one data frame, then trailers.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// Commit 7f876a4 and the docs ("... reach the client, except those RFC 9110 6.5.1 forbids as
/// trailers: framing and routing fields (`content-length`, `transfer-encoding`, `host`) ... and
/// `content-type`, `content-encoding`, `content-range`, which are dropped") filter trailers only
/// where HTTP/1.1 is parsed or written (`chunked::parse_trailers`, `h1::encode_trailers`). An
/// `http2: true` upstream's trailers going to an HTTP/2 client are neither: they reach the client
/// as they came.
#[tokio::test]
async fn forbidden_trailers_from_an_h2_upstream_to_an_h2_client_are_dropped() {
    let up = Upstream::start(
        "h2",
        Arc::new(|_req: Request<Incoming>| {
            Box::pin(async move {
                let mut t = HeaderMap::new();
                t.insert("x-checksum", HeaderValue::from_static("ok"));
                t.insert("content-type", HeaderValue::from_static("text/evil"));
                t.insert("content-encoding", HeaderValue::from_static("gzip"));
                t.insert("content-length", HeaderValue::from_static("999"));
                t.insert("host", HeaderValue::from_static("evil.example"));
                let body = WithTrailers {
                    data: Some(Bytes::from_static(b"hello")),
                    trailers: Some(t),
                };
                Response::builder()
                    .status(200)
                    .header("content-type", "text/plain")
                    .body(body.boxed())
                    .unwrap()
            })
        }),
    )
    .await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ http2: true, endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n    timeout: 5s\n",
        up.url()
    ))
    .await;
    let c = h2c_client();
    let req = Request::get(gw.url("/t"))
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("timed out")
        .expect("request failed");
    assert_eq!(resp.status(), 200);
    let collected = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("timed out")
        .expect("body failed");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("x-checksum").map(|v| v.as_bytes()),
        Some(&b"ok"[..]),
        "an allowed trailer must pass: {trailers:?}"
    );
    for name in ["content-type", "content-encoding", "content-length", "host"] {
        assert!(
            trailers.get(name).is_none(),
            "forbidden trailer `{name}` reached the HTTP/2 client: {trailers:?}"
        );
    }
    gw.stop().await;
}
