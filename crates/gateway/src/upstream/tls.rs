//! TLS to `https://` endpoints: one `rustls::ClientConfig` per upstream, built when the config is
//! loaded (or an upstream is rebuilt by a reload), shared by every connection of its endpoints.
//!
//! Trust is Mozilla's root programme (the `webpki-roots` crate, compiled in, so a gateway in a
//! scratch container verifies public providers without a system bundle), or, with `tls.ca`, that
//! PEM bundle only (a private CA). There is no way to skip verification: a certificate that does not
//! verify for the server name fails the connect like a refused TCP connection.
//!
//! With `tls.cert` and `tls.key`, the gateway presents that client certificate to servers that
//! ask for one (mutual TLS). With `tls.crl`, a server certificate its issuer revoked fails the
//! handshake.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

use crate::config::UpstreamTls;

/// ALPN id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";

/// A TLS setting that cannot be used: the key under `tls` it is about, and why.
#[derive(Debug)]
pub(crate) struct TlsSettingError {
    /// `ca`, `server_name`, `cert`, `key`, `crl` or `crl_leaf_only`.
    pub(crate) key: &'static str,
    pub(crate) message: String,
}

/// The client config of an upstream with `tls` (or none: the defaults) speaking HTTP/2 or not.
pub(crate) fn client_config(
    tls: Option<&UpstreamTls>,
    http2: bool,
) -> Result<Arc<ClientConfig>, TlsSettingError> {
    let roots = roots(tls.and_then(|t| t.ca.as_deref()))?;
    if let Some(name) = tls.and_then(|t| t.server_name.as_deref()) {
        server_name(name).map_err(|message| TlsSettingError {
            key: "server_name",
            message,
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = verifier(tls, roots, &provider)?;
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSettingError {
            key: "ca",
            message: format!("TLS setup failed: {e}"),
        })?
        .with_webpki_verifier(verifier);
    let mut cfg = match client_identity(tls)? {
        Some((chain, key)) => cfg.with_client_auth_cert(chain, key).map_err(|e| {
            let (key, message) = crate::proxy::cert_or_key(e);
            TlsSettingError { key, message }
        })?,
        None => cfg.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![if http2 { ALPN_H2 } else { ALPN_HTTP11 }.to_vec()];
    Ok(Arc::new(cfg))
}

/// The server certificate verifier: WebPKI path building to `roots` for the server name, plus, with
/// `crl`, revocation checks (the whole chain below the anchor, or the leaf only; a certificate whose
/// issuer has no CRL in the file, or an expired CRL, fails: Envoy's defaults).
fn verifier(
    tls: Option<&UpstreamTls>,
    roots: RootCertStore,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsSettingError> {
    let mut builder =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    match (
        tls.and_then(|t| t.crl.as_deref()),
        tls.is_some_and(|t| t.crl_leaf_only),
    ) {
        (Some(crl), leaf_only) => {
            let crls = crate::pem::crls(crl).map_err(|message| TlsSettingError {
                key: "crl",
                message,
            })?;
            builder = builder.with_crls(crls).enforce_revocation_expiration();
            if leaf_only {
                builder = builder.only_check_end_entity_revocation();
            }
        }
        (None, true) => {
            return Err(TlsSettingError {
                key: "crl_leaf_only",
                message: "`crl_leaf_only` needs `crl` (the revocation lists to check)".into(),
            })
        }
        (None, false) => {}
    }
    builder.build().map_err(|e| TlsSettingError {
        key: if tls.is_some_and(|t| t.crl.is_some()) {
            "crl"
        } else {
            "ca"
        },
        message: format!("TLS verifier setup failed: {e}"),
    })
}

/// The trusted roots: the certificates of `ca` only, when given (as Envoy's `trusted_ca` and
/// nginx's `proxy_ssl_trusted_certificate`: a private CA's upstream must not also accept any
/// publicly issued certificate for its name); otherwise Mozilla's.
fn roots(ca: Option<&std::path::Path>) -> Result<RootCertStore, TlsSettingError> {
    let mut roots = RootCertStore::empty();
    let Some(ca) = ca else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    };
    let certs = crate::pem::certs(ca).map_err(|message| TlsSettingError { key: "ca", message })?;
    for cert in certs {
        roots.add(cert).map_err(|e| TlsSettingError {
            key: "ca",
            message: format!("invalid CA certificate in `{}`: {e}", ca.display()),
        })?;
    }
    Ok(roots)
}

type Identity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// The client certificate chain and key of `tls.cert` and `tls.key`: both or neither.
fn client_identity(tls: Option<&UpstreamTls>) -> Result<Option<Identity>, TlsSettingError> {
    let (cert, key) = match tls.map(|t| (t.cert.as_deref(), t.key.as_deref())) {
        Some((Some(c), Some(k))) => (c, k),
        Some((Some(_), None)) => {
            return Err(TlsSettingError {
                key: "cert",
                message: "`cert` needs `key` (the certificate's private key)".into(),
            })
        }
        Some((None, Some(_))) => {
            return Err(TlsSettingError {
                key: "key",
                message: "`key` needs `cert` (the client certificate)".into(),
            })
        }
        _ => return Ok(None),
    };
    let chain = crate::pem::certs(cert).map_err(|message| TlsSettingError {
        key: "cert",
        message,
    })?;
    let key = crate::pem::private_key(key).map_err(|message| TlsSettingError {
        key: "key",
        message,
    })?;
    Ok(Some((chain, key)))
}

/// The contents of the files `tls` names (`ca`, `cert`, `key`, `crl`), in that order; a reload
/// compares them to tell changed files behind unchanged paths (a CRL republished in place).
pub(crate) fn file_contents(tls: Option<&UpstreamTls>) -> Vec<Option<Vec<u8>>> {
    let Some(t) = tls else {
        return Vec::new();
    };
    [&t.ca, &t.cert, &t.key, &t.crl]
        .into_iter()
        .map(|p| p.as_deref().and_then(|p| std::fs::read(p).ok()))
        .collect()
}

/// `name` as a TLS server name (SNI and certificate check): a DNS name or an IP address (an IPv6
/// one with or without brackets).
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(bare.to_owned())
        .map_err(|e| format!("invalid TLS server name `{name}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_replaces_the_built_in_roots() {
        let builtin = roots(None).unwrap();
        assert_eq!(builtin.len(), webpki_roots::TLS_SERVER_ROOTS.len());
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        let path = std::env::temp_dir().join(format!("bulwark-ca-{}.pem", std::process::id()));
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let only = roots(Some(&path));
        let _ = std::fs::remove_file(&path);
        assert_eq!(only.unwrap().len(), 1, "the CA alone");
    }

    #[test]
    fn server_names_take_dns_names_and_ip_addresses() {
        assert!(server_name("api.example.com").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("bad name").is_err());
        assert!(server_name("").is_err());
    }

    #[test]
    fn alpn_follows_the_protocol() {
        let h2 = client_config(None, true).unwrap();
        assert_eq!(h2.alpn_protocols, vec![b"h2".to_vec()]);
        let h1 = client_config(None, false).unwrap();
        assert_eq!(h1.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
