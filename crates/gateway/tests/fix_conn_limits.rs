//! Listener limits: `max_connections`, and HTTP/1.1 over TLS (keep-alive and the head timeout).
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::net::TcpStream;

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn max_connections_holds_a_third_connection_until_one_closes() {
    let up = Upstream::named("u").await;
    let gw = Gateway::start(&limited_config(&up.url(), "max_connections: 2")).await;
    // Two keep-alive connections, each served once and left open.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::connect(&gw).await;
        c.send(GET).await;
        let r = tokio::time::timeout(Duration::from_secs(10), c.response(false))
            .await
            .expect("response did not arrive");
        assert_eq!(r.status, 200, "{r:?}");
        open.push(c);
    }
    assert_eq!(up.hits(), 2);
    // A third connects (the kernel backlog takes it) and sends a request: it is not served.
    let mut third = RawClient::connect(&gw).await;
    third.send(GET).await;
    let early = tokio::time::timeout(Duration::from_millis(500), third.response(false)).await;
    assert!(
        early.is_err(),
        "third connection served over the limit: {early:?}"
    );
    assert_eq!(up.hits(), 2, "the gateway took a request over the limit");
    // One closes: the third is accepted and served.
    drop(open.remove(0));
    let r = tokio::time::timeout(Duration::from_secs(10), third.response(false))
        .await
        .expect("third connection not served after one closed");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.hits(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn http1_over_tls_keeps_alive_and_times_out_a_stalled_head() {
    let up = Upstream::named("u").await;
    let tls = TestTls::new("fix-conn-tls");
    let gw = Gateway::start(&format!(
        "{}{}",
        tls.config_line(),
        limited_config(&up.url(), "header_read_timeout: 300ms")
    ))
    .await;

    let connector = tls.connector(&[b"http/1.1"]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // hyper's HTTP/1.1 client: two requests on one TLS connection.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let tls = connector.connect(name.clone(), tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for _ in 0..2 {
        send.ready().await.unwrap();
        let resp = send
            .send_request(
                Request::get("/tls")
                    .header("host", "localhost")
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_11);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "u");
    }
    assert_eq!(up.hits(), 2);
    drop(send);
    let _ = conn.await;

    // A partial head over TLS is cut after header_read_timeout.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let mut c = RawClient::new(connector.connect(name, tcp).await.unwrap());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    assert!(c.closed_within(10).await, "stalled head over TLS not cut");
    assert_eq!(up.hits(), 2);
    gw.stop().await;
}
