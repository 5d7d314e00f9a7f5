//! Config loading and `bulwark check`: the output loads again, repeated keys and custom values are
//! placed at their line, endpoint ports are in range, and edge values do not break the listener.
use std::process::Command;

use bulwark_gateway::config::{from_str, ConfigError};

mod support;

const UP: &str = "upstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }\n";

fn err(src: &str) -> ConfigError {
    match from_str(src, "gw.yaml") {
        Ok(_) => panic!("accepted, expected an error:\n{src}"),
        Err(e) => e,
    }
}

/// `bulwark check --config path`: (exit code, stdout, stderr).
fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What `check` prints must load again and print the same: today the amplification report after
/// the effective config is plain text (`route r -> a -> b: 3 x 2 x 2 = 12`, `  warning: ...`), not
/// YAML comments, so `bulwark check -c gw.yaml > effective.yaml; bulwark check -c effective.yaml`
/// fails with `unknown field `route r -> a -> b``.
#[test]
fn check_output_fed_back_to_check_gives_the_same_output() {
    let dir = support::TempDir::new("rev-config");
    let first = dir.join("gw.yaml");
    std::fs::write(
        &first,
        "upstreams:
  a: { endpoints: [{url: 'http://127.0.0.1:9001'}] }
  b: { endpoints: [{url: 'http://127.0.0.1:9002'}] }
routes:
  - name: r
    upstream: a
    failover: [b]
    retry: { attempts: 3 }
    hedge: { delay: 50ms }
",
    )
    .unwrap();
    let (code, out1, err1) = check(&first);
    assert_eq!(code, 0, "{err1}");
    let second = dir.join("effective.yaml");
    std::fs::write(&second, &out1).unwrap();
    let (code, out2, err2) = check(&second);
    assert_eq!(
        code, 0,
        "check's own output does not load:\n{err2}\n--- output:\n{out1}"
    );
    assert_eq!(out2, out1);
}

/// A key given twice in one mapping is a duplicate name: the error must name that key and the
/// line of the repeat. Today serde's `duplicate field` error is placed at the start of the
/// mapping that holds it, with the mapping's path: `gw.yaml:1:1: .: duplicate field `listen``
/// for a `listen` repeated on line 4.
#[test]
fn a_repeated_key_is_reported_at_the_repeat_with_its_key_path() {
    let e = err(&format!("listen: 127.0.0.1:1\n{UP}listen: 127.0.0.1:2\n"));
    assert_eq!(
        (e.position, e.path.as_str()),
        (Some((4, 1)), "listen"),
        "{e}"
    );

    // Nested, flow style: the second `attempts` is at line 5, column 27.
    let e = err(&format!(
        "{UP}routes:\n  - upstream: a\n    retry: {{ attempts: 1, attempts: 2 }}\n"
    ));
    assert_eq!(
        (e.position, e.path.as_str()),
        (Some((5, 27)), "routes[0].retry.attempts"),
        "{e}"
    );
}

/// The custom deserializers of `hedge.delay` and `client_rate_limit.key` read a `String` first
/// and raise their error after it, so serde_norway stamps it with the position of the enclosing
/// mapping's first key: a bad `delay` on line 9 is reported at line 6 (`max_hedges`), a bad
/// `key` on line 8 at line 6 (`per_second`). Other value errors (`timeout: 3 weeks`) are placed
/// at the value.
#[test]
fn hedge_delay_and_client_key_errors_point_at_their_line() {
    let src = format!(
        "{UP}routes:\n  - upstream: a\n    hedge:\n      max_hedges: 1\n\n      # p100 is not a percentile\n      delay: p100\n"
    );
    // line 1 upstreams, 2 a, 3 routes, 4 - upstream, 5 hedge, 6 max_hedges, 7 blank,
    // 8 comment, 9 delay
    let e = err(&src);
    assert_eq!(e.path, "routes[0].hedge.delay", "{e}");
    assert_eq!(e.position.map(|p| p.0), Some(9), "{e}");

    let src = format!(
        "{UP}routes:\n  - upstream: a\n    hedge:\n      max_hedges: 1\n      delay: 5parsecs\n"
    );
    let e = err(&src);
    assert_eq!(e.path, "routes[0].hedge.delay", "{e}");
    assert_eq!(e.position.map(|p| p.0), Some(7), "{e}");

    let src = format!(
        "{UP}routes:\n  - upstream: a\n    client_rate_limit:\n      per_second: 1\n      max_keys: 10\n      key: 'header:bad name'\n"
    );
    let e = err(&src);
    assert_eq!(e.path, "routes[0].client_rate_limit.key", "{e}");
    assert_eq!(e.position.map(|p| p.0), Some(8), "{e}");
}

/// `request_headers.set` (and `match.headers`) are read into a `BTreeMap`, so a header name
/// written twice exactly is silently collapsed to the last value, while the same name in another
/// case is refused (`x-a` is set twice (header names ignore case)). The docs say "a name may
/// appear once"; an operator who pasted a second `authorization` gets whichever came last.
#[test]
fn a_header_name_written_twice_is_refused() {
    let e = err(&format!(
        "{UP}routes:\n  - upstream: a\n    request_headers:\n      set:\n        x-a: one\n        x-a: two\n"
    ));
    assert_eq!(e.path, "routes[0].request_headers.set.x-a", "{e}");
    assert_eq!(e.position, Some((8, 9)), "{e}");

    let e = err(&format!(
        "{UP}routes:\n  - upstream: a\n    match:\n      headers:\n        x-tenant: one\n        x-tenant: two\n"
    ));
    assert_eq!(e.path, "routes[0].match.headers.x-tenant", "{e}");
    assert_eq!(e.position, Some((8, 9)), "{e}");
}

/// An endpoint port above 65535 passes `check_url` (the `http` crate's URI parser does not range
/// check ports), and `EndpointUrl::port` then finds no `u16` port and falls back to the scheme's
/// default: `http://127.0.0.1:65536` silently connects to port 80 (with `Host: 127.0.0.1:65536`).
#[test]
fn an_endpoint_port_out_of_range_is_refused() {
    let e = err("upstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:65536'}] }\n");
    assert_eq!(e.path, "upstreams.a.endpoints[0].url", "{e}");
    assert_eq!(e.position, Some((2, 21)), "{e}");
}

/// Port 0 is no destination: every connect fails. `check` accepts it.
#[test]
fn an_endpoint_port_of_zero_is_refused() {
    let e = err("upstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:0'}] }\n");
    assert_eq!(e.path, "upstreams.a.endpoints[0].url", "{e}");
}

/// The running route takes its retry budget from the *enabled* retry section only
/// (`route.rs`: `c.retry.filter(|r| r.enabled)`), so with `retry: { enabled: false, budget: ... }`
/// its hedges run without any budget. `check_report` looks for a budget in the retry section
/// whether enabled or not, and so says nothing about a route that sends up to 5 upstream
/// requests per client request with no budget.
#[test]
fn a_budget_in_a_disabled_retry_section_does_not_silence_the_warning() {
    let c = from_str(
        &format!(
            "{UP}routes:\n  - name: h\n    upstream: a\n    retry: {{ enabled: false, budget: {{}} }}\n    hedge: {{ max_hedges: 4, delay: 10ms }}\n"
        ),
        "gw.yaml",
    )
    .unwrap();
    let report = bulwark_gateway::cli::check_report(&c);
    assert!(report.contains("route h -> a: 1 x 5 x 1 = 5\n"), "{report}");
    assert!(
        report.contains(
            "warning: route h hedges without a budget: in an outage it multiplies load by 5; \
             enable retry (its budget counts only then; attempts: 1 keeps retries off)"
        ),
        "{report}"
    );
}

/// `limits.max_header_bytes` accepts any size up to `u64::MAX` bytes, and `Server::run` computes
/// its head buffer limit as `max_header_bytes.max(8192) + 1024` (proxy/mod.rs): for a value
/// within 1024 of `usize::MAX` that overflows. In a debug build the server task panics before
/// it accepts anything; in a release build (no overflow checks) it wraps to 1023, and any request
/// head longer than 1023 bytes is refused.
#[tokio::test]
async fn a_huge_max_header_bytes_does_not_break_the_listener() {
    let up = support::Upstream::echo().await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nlimits: {{ max_header_bytes: 18446744073709551615 }}\nupstreams:\n  u: {{ endpoints: [{{url: '{}'}}] }}\nroutes:\n  - upstream: u\n",
        up.url()
    );
    let config = from_str(&yaml, "gw.yaml").unwrap();
    let server = bulwark_gateway::proxy::Server::bind(&config).await.unwrap();
    let addr = server.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let c = support::client();
    let req = http::Request::get(format!("http://{addr}/x"))
        .header("x-long", "v".repeat(2048))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = tokio::select! {
        biased;
        r = &mut task => panic!("the server task ended before answering: {r:?}"),
        r = c.request(req) => r,
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => panic!("request failed ({e}); server task: {:?}", task.await),
    };
    assert_eq!(resp.status(), 200);
    let _ = tx.send(());
    let _ = task.await;
}

/// Bad input gets a clear error: a negative duration is reported as an "unknown unit `-1s`", and
/// a fractional size as an "unknown unit `.5MB`", neither of which says what is wrong.
#[test]
fn negative_durations_and_fractional_sizes_get_a_clear_error() {
    let e = err(&format!("{UP}routes:\n  - upstream: a\n    timeout: -1s\n"));
    assert_eq!(e.path, "routes[0].timeout", "{e}");
    assert!(!e.message.contains("unknown unit"), "{e}");
    assert!(e.message.contains("negative"), "{e}");

    let e = err(&format!(
        "{UP}routes:\n  - upstream: a\n    retry_buffer: 1.5MB\n"
    ));
    assert_eq!(e.path, "routes[0].retry_buffer", "{e}");
    assert!(!e.message.contains("unknown unit"), "{e}");
}

/// `bulwark check -c name` run in `dir`: (exit code, stdout, stderr).
fn check_in(dir: &std::path::Path, name: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .current_dir(dir)
        .args(["check", "-c", name])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `admin.listen` must not take the proxy's port: compared literally, a proxy on the wildcard
/// address and the admin listener on loopback with the same port passed `check`, and `run` failed
/// with `Address already in use` (same for `127.0.0.1:P` and `[::ffff:127.0.0.1]:P`). Found by a
/// review; failed before its fix.
#[test]
fn an_admin_address_that_overlaps_the_proxy_s_is_refused_at_load() {
    let e = err(&format!(
        "listen: 0.0.0.0:18471\nadmin: {{ listen: 127.0.0.1:18471 }}\n{UP}"
    ));
    assert_eq!(e.path, "admin.listen", "{e}");
    assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    let e = err(&format!(
        "listen: 127.0.0.1:18472\nadmin: {{ listen: '[::ffff:127.0.0.1]:18472' }}\n{UP}"
    ));
    assert_eq!(e.path, "admin.listen", "{e}");
    let e = err(&format!(
        "listen: '[::1]:18473'\nadmin: {{ listen: '[::]:18473' }}\n{UP}"
    ));
    assert_eq!(e.path, "admin.listen", "{e}");
    // Different ports, or an IPv4 wildcard next to an IPv6 address, can both be bound.
    for ok in [
        "listen: 0.0.0.0:18474\nadmin: { listen: 127.0.0.1:18475 }\n",
        "listen: 0.0.0.0:18476\nadmin: { listen: '[::1]:18476' }\n",
        "listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\n",
    ] {
        from_str(&format!("{ok}{UP}"), "gw.yaml").unwrap();
    }
}

/// Every error of `check` is `FILE:LINE:COL: key.path: what is wrong`: a `store: {}` (the default
/// path) whose file is unusable was reported without a line or column. Found by a review; failed
/// before its fix.
#[test]
fn a_bad_default_store_file_is_reported_with_line_and_column() {
    let dir = support::TempDir::new("cfg-store-default");
    std::fs::write(dir.join("bulwark.db"), "not a sqlite file\n").unwrap();
    std::fs::write(dir.join("gw.yaml"), format!("{UP}store: {{}}\n")).unwrap();
    let (code, out, stderr) = check_in(dir.path(), "gw.yaml");
    assert_eq!(code, 1, "{out}{stderr}");
    let line = stderr.lines().next().unwrap_or_default();
    assert!(line.starts_with("gw.yaml:3:"), "{stderr}");
    assert!(line.contains("store.path"), "{stderr}");
}

/// A fixed hedge `delay` as long as the route's `timeout` can never fire: refused at its key
/// (it was accepted, and counted in the route's amplification). Found by a review; failed before
/// its fix.
#[test]
fn a_hedge_delay_beyond_the_route_timeout_is_refused() {
    let e = err(&format!(
        "{UP}routes:\n  - name: r\n    upstream: a\n    timeout: 1s\n    hedge: {{ delay: 5s }}\n"
    ));
    assert_eq!(e.path, "routes[0].hedge.delay", "{e}");
    assert!(e.message.contains("timeout"), "{e}");
    // Shorter, a percentile, or turned off: accepted.
    for hedge in [
        "{ delay: 900ms }",
        "{ delay: p99 }",
        "{ enabled: false, delay: 5s }",
    ] {
        from_str(
            &format!("{UP}routes:\n  - upstream: a\n    timeout: 1s\n    hedge: {hedge}\n"),
            "gw.yaml",
        )
        .unwrap();
    }
}

/// A stray `---` deep in the file (a second YAML document) is reported at its line, not at 1:1.
/// Found by a review; failed before its fix.
#[test]
fn a_second_document_is_reported_where_it_starts() {
    let e = err(&format!("{UP}---\nlisten: 127.0.0.1:1\n"));
    assert_eq!(e.position, Some((3, 1)), "{e}");
    let e = err(&format!("---\n# first\n{UP}--- \nlisten: 127.0.0.1:1\n"));
    assert_eq!(e.position, Some((5, 1)), "{e}");
}

/// One server written two ways is a duplicate endpoint (it would get double weight, and a retry
/// "to another endpoint" could go back to it): the port made explicit or zero-padded, the host in
/// capitals. Found by a review.
#[test]
fn the_same_endpoint_written_two_ways_is_a_duplicate() {
    for (a, b) in [
        ("http://127.0.0.1:80", "http://127.0.0.1"),
        ("http://127.0.0.1:9001", "http://127.0.0.1:09001"),
        ("https://Example.com", "https://example.com:443"),
    ] {
        let e = err(&format!(
            "upstreams:\n  a: {{ endpoints: [{{url: '{a}'}}, {{url: '{b}'}}] }}\n"
        ));
        assert_eq!(e.path, "upstreams.a.endpoints[1].url", "{a} {b}: {e}");
        assert!(e.message.contains("duplicate endpoint"), "{e}");
    }
    // Another port, or the other scheme, is another server.
    from_str(
        "upstreams:\n  a: { endpoints: [{url: 'http://h:80'}, {url: 'http://h:81'}, {url: 'https://h:80'}] }\n",
        "gw.yaml",
    )
    .unwrap();
}

/// Values that can never do what they say are refused at their key: a 204 or 304 fallback with a
/// body (the body is never sent), a cooldown on a status that is no refusal, a match path no
/// request path can hold. Found by a review (each was accepted).
#[test]
fn settings_that_can_never_apply_are_refused() {
    let route = |extra: &str| format!("{UP}routes:\n  - upstream: a\n{extra}");
    let e = err(&route("    fallback: { status: 204, body: hello }\n"));
    assert_eq!(e.path, "routes[0].fallback.body", "{e}");
    from_str(&route("    fallback: { status: 204 }\n"), "gw.yaml").unwrap();
    let e = err(
        "upstreams:\n  a: { endpoints: [{url: 'http://127.0.0.1:9001'}], cooldown: { on: [429, 200] } }\n",
    );
    assert_eq!(e.path, "upstreams.a.cooldown.on[1]", "{e}");
    for bad in ["'/a b'", "'/a?x=1'", "'/a#top'"] {
        let e = err(&route(&format!("    match: {{ path_prefix: {bad} }}\n")));
        assert_eq!(e.path, "routes[0].match.path_prefix", "{bad}: {e}");
    }
    from_str(
        &route("    match: { path: '/a%20b/c-d_e.f~g' }\n"),
        "gw.yaml",
    )
    .unwrap();
}

// Made with OpenSSL 3: an EC key and a self-signed certificate for `localhost`, the key then
// encrypted (`pkcs8 -topk8`, passphrase `x`); and an RSA key in OpenSSL's legacy encrypted
// PKCS#1 form (`rsa -aes256 -traditional`), shortened here: only its PEM headers are looked at
// before the key would be read.
const EC_CERT: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBkTCCATigAwIBAgIUbEhYECqe5p+CvkwI2ttjx6CdhgUwCgYIKoZIzj0EAwIw\n\
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyOTA0MTQ1OVoYDzIxMjYxMTA1\n\
MDQxNDU5WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO\n\
PQMBBwNCAAQpDEmTkkWlKm7neKyUlVv4zDK/Vy4v5VAnz741mqCEuDoj/nzAGzCZ\n\
xwnk1T5wv9VW2o0MxdGml3gPwJAxBbxUo2YwZDAdBgNVHQ4EFgQUp11C1+hB8CVv\n\
xJ8RT9hRpdH0pGYwHwYDVR0jBBgwFoAUp11C1+hB8CVvxJ8RT9hRpdH0pGYwFAYD\n\
VR0RBA0wC4IJbG9jYWxob3N0MAwGA1UdEwEB/wQCMAAwCgYIKoZIzj0EAwIDRwAw\n\
RAIgUt6m5164WInNck2qhhXuExYB3k4lpknz3ZNGdmsGz6gCICODAvcK8yfAtm0C\n\
e3SUHObtipR4lqXMaXPncIViyoU1\n\
-----END CERTIFICATE-----\n\
";
const EC_PKCS8_ENCRYPTED_KEY: &str = "\
-----BEGIN ENCRYPTED PRIVATE KEY-----\n\
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAj8LNNrsku1JwICCAAw\n\
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEOpwVGyF9LxDURXmiyx4ecUEgZC9\n\
pj7fjy53/bbcWQb6H6kDnjlztUy5o8nDKwWi6UwMkwSSaXM3LqFBdSshc/bDtx87\n\
q6ok0u8KtHX0Batbd2WFIp0NRseWUrmTUQ4TLtIoLeaMRI70zMoMTUP31NI2asQP\n\
DYcyFU19AyH94xepO27i7b657YFEBavjvxwm+y8tyeMwuU4A8WE+c86GB771ink=\n\
-----END ENCRYPTED PRIVATE KEY-----\n\
";
const RSA_PKCS1_ENCRYPTED_KEY: &str = "\
-----BEGIN RSA PRIVATE KEY-----\n\
Proc-Type: 4,ENCRYPTED\n\
DEK-Info: AES-256-CBC,48F03072554B3236F8C5C06D90171E85\n\
\n\
ODNC6eZtVR4pyXU9+725IwURtemxxJN+nO156GXQkC36zCnACMzuLbs/G3FPgWaV\n\
EMwJQw0TNnsEk3i44whdDiLUqhZ56DC4Emd/ojNHmrS8ln4hTrI9RAQXWurNtQlg\n\
-----END RSA PRIVATE KEY-----\n\
";

/// An encrypted private key (the most common wrong key file handed to a proxy) is refused at
/// `tls.key`, listener and upstream alike, saying it is encrypted: it was `no PEM private key in
/// ...` (PKCS#8) and `... is not a PEM file: InvalidCharacter(45)` (legacy PKCS#1), sending the
/// operator after a missing or corrupt file. Found by a review; failed before its fix.
#[test]
fn an_encrypted_private_key_is_reported_as_encrypted() {
    let dir = support::TempDir::new("cfg-keyfile");
    let cert_path = dir.join("c.crt");
    std::fs::write(&cert_path, EC_CERT).unwrap();
    for (name, key) in [
        ("pkcs8", EC_PKCS8_ENCRYPTED_KEY),
        ("pkcs1", RSA_PKCS1_ENCRYPTED_KEY),
    ] {
        let key_path = dir.join(&format!("{name}.key"));
        std::fs::write(&key_path, key).unwrap();
        let e = err(&format!(
            "tls:\n  cert: '{}'\n  key: '{}'\n",
            cert_path.display(),
            key_path.display()
        ));
        assert_eq!(e.path, "tls.key", "{name}: {e}");
        assert!(e.message.contains("encrypted private key"), "{name}: {e}");
        let e = err(&format!(
            "upstreams:\n  a:\n    endpoints: [{{url: 'https://localhost:1'}}]\n    tls:\n      \
             cert: '{}'\n      key: '{}'\n",
            cert_path.display(),
            key_path.display()
        ));
        assert_eq!(e.path, "upstreams.a.tls.key", "{name}: {e}");
        assert!(e.message.contains("encrypted private key"), "{name}: {e}");
    }
}
