//! The TLS listener across a reload that drops `tls`, and at shutdown with a quiet HTTP/2 client
//! (found by a review; each test failed before its fix).
mod admin_support;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::net::TcpStream;

/// A TLS connection to `addr` from a client trusting only `tls`'s certificate, offering `alpn`.
async fn connect(
    tls: &TestTls,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(addr).await?;
    tls.connector(alpn).connect(name, tcp).await
}

const GET: &[u8] = b"GET /x HTTP/1.1\r\nhost: localhost\r\n\r\n";

/// A reload serves a renewed listener certificate to every new connection, and turning `tls` off
/// takes a restart (the listener stays TLS until then). A reload that drops the `tls` section
/// keeps serving the certificate in force, not the one the process started with (perhaps
/// expired or revoked by then).
#[tokio::test]
async fn a_reload_that_drops_tls_keeps_serving_the_renewed_certificate() {
    use admin_support::Ops;
    let up = Upstream::named("u").await;
    let routes = format!(
        "upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n",
        up.url()
    );
    let first = TestTls::new("tls-edges-first");
    let ops = Ops::start_with(
        &format!("{}{routes}", first.config_line()),
        None,
        Duration::from_secs(3600),
    )
    .await;
    assert!(connect(&first, ops.proxy, &[b"http/1.1"]).await.is_ok());

    // The certificate is renewed (new files, another issuer) and reloaded: new connections get it.
    let renewed = TestTls::new("tls-edges-renewed");
    ops.rewrite(&format!("{}{routes}", renewed.config_line()));
    ops.reloader().reload().unwrap();
    let mut c = RawClient::new(connect(&renewed, ops.proxy, &[b"http/1.1"]).await.unwrap());
    c.send(GET).await;
    assert_eq!(c.response(false).await.status, 200);

    // A reload without `tls`: a restart is required to turn it off, so the listener stays TLS...
    ops.rewrite(&routes);
    let r = ops.reloader().reload().unwrap();
    assert!(r.restart_required.contains(&"tls"), "{r:?}");
    // ...with the certificate in force, not the one replaced before.
    let again = connect(&renewed, ops.proxy, &[b"http/1.1"]).await;
    assert!(
        again.is_ok(),
        "after a reload that dropped `tls`, the listener serves the certificate it started with \
         again, not the renewed one: {:?}",
        again.err()
    );
    ops.stop().await;
}

/// A certificate renewed in place (certbot and cert-manager write new contents behind the same
/// paths) is served to new connections without a SIGHUP or an edit of the config: the files the
/// config names are watched as the config file is, as Envoy watches its certificate files. A look
/// that finds the new certificate next to the old key (written one after the other) is refused
/// and tried again.
#[tokio::test]
async fn a_certificate_renewed_in_place_is_served_without_a_signal() {
    use admin_support::{eventually, Ops};
    let up = Upstream::named("u").await;
    let first = TestTls::new("tls-watch-first");
    let ca = first.cert_path.with_file_name("ca.pem");
    std::fs::copy(&first.cert_path, &ca).unwrap();
    let ops = Ops::start(
        &format!(
            "{}upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\n  secure: {{ endpoints: \
             [{{url: 'https://localhost:1'}}], tls: {{ ca: '{}' }} }}\nroutes:\n  - upstream: u\n",
            first.config_line(),
            up.url(),
            ca.display()
        ),
        None,
    )
    .await;
    assert!(connect(&first, ops.proxy, &[b"http/1.1"]).await.is_ok());
    let generation = ops.gateway().generation();

    let renewed = TestTls::new("tls-watch-renewed");
    std::fs::copy(&renewed.cert_path, &first.cert_path).unwrap();
    std::fs::copy(&renewed.key_path, &first.key_path).unwrap();
    let proxy = ops.proxy;
    eventually(10, "new connections get the renewed certificate", || {
        let renewed = &renewed;
        async move { connect(renewed, proxy, &[b"http/1.1"]).await.is_ok() }
    })
    .await;
    let mut c = RawClient::new(connect(&renewed, proxy, &[b"http/1.1"]).await.unwrap());
    c.send(GET).await;
    assert_eq!(c.response(false).await.status, 200);
    assert!(ops.gateway().generation() > generation);
    assert_eq!(ops.reloader().last_error(), None);

    // An upstream's CA file replaced in place rebuilds that upstream (and only it).
    let generation = ops.gateway().generation();
    let secure = ops.gateway().runtime().upstream("secure").unwrap().clone();
    let kept = ops.gateway().runtime().upstream("u").unwrap().clone();
    std::fs::copy(&renewed.cert_path, &ca).unwrap();
    let gw = ops.gateway();
    eventually(10, "the CA file's change is reloaded", || async {
        gw.generation() > generation
    })
    .await;
    let now = ops.gateway().runtime();
    assert!(!std::sync::Arc::ptr_eq(
        now.upstream("secure").unwrap(),
        &secure
    ));
    assert!(std::sync::Arc::ptr_eq(now.upstream("u").unwrap(), &kept));
    ops.stop().await;
}

/// At shutdown a client connection with nothing of a request closes at once (within the HTTP/2
/// close grace), over HTTP/1.1 and HTTP/2 alike: a TLS connection that negotiated ALPN `h2` and
/// never sent its connection preface (a preconnect, a scanner) does not hold the shutdown until
/// `drain_timeout`.
#[tokio::test]
async fn an_h2_connection_without_its_preface_does_not_hold_the_drain() {
    let up = Upstream::named("u").await;
    let tls = TestTls::new("tls-edges-drain");
    let gw = Gateway::start(&format!(
        "{}drain_timeout: 60s\n{}",
        tls.config_line(),
        one_route(&up.url(), "")
    ))
    .await;
    // Control: the same with ALPN http/1.1 closes at once.
    let mut h1 = RawClient::new(connect(&tls, gw.addr, &[b"http/1.1"]).await.unwrap());
    let s = connect(&tls, gw.addr, &[b"h2"]).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut quiet = RawClient::new(s);
    // The gateway has taken both past their handshakes: a request on a third connection is served
    // after them (one task each, accepted in order).
    let mut other = RawClient::new(connect(&tls, gw.addr, &[b"http/1.1"]).await.unwrap());
    other.send(GET).await;
    assert_eq!(other.response(false).await.status, 200);
    drop(other);

    let stopping = tokio::spawn(gw.stop());
    assert!(h1.closed_within(5).await, "the quiet HTTP/1.1 connection");
    assert!(
        quiet.closed_within(5).await,
        "a TLS connection with ALPN h2 and no preface is kept open at shutdown"
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown held (until drain_timeout, 60 s) by an h2 connection that sent nothing")
        .unwrap();
}

/// `curl --http1.0 https://...` offers ALPN `http/1.0` only: served, not refused at the
/// handshake with `no_application_protocol` (nginx lists `http/1.0` too; review tl2).
#[tokio::test]
async fn an_http10_client_offering_alpn_http10_is_served_over_tls() {
    use tokio::io::AsyncReadExt;
    let up = Upstream::named("u").await;
    let tls = TestTls::new("tls-alpn10");
    let gw = Gateway::start(&format!(
        "{}upstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n",
        tls.config_line(),
        up.url()
    ))
    .await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let s = match tls.connector(&[b"http/1.0"]).connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => panic!("a client offering ALPN `http/1.0` fails the TLS handshake: {e}"),
    };
    let mut c = RawClient::new(s);
    c.send(b"GET /x HTTP/1.0\r\nhost: localhost\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with('u'), "the body of upstream `u`: {text}");
    gw.stop().await;
}
