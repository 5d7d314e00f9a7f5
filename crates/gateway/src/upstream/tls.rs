//! TLS to `https://` endpoints: one `rustls::ClientConfig` per upstream, built when the config is
//! loaded (or an upstream is rebuilt by a reload), shared by every connection of its endpoints.
//!
//! Trust is Mozilla's root programme (the `webpki-roots` crate, compiled in, so a gateway in a
//! scratch container verifies public providers without a system bundle) plus the PEM bundle of
//! `tls.ca`, for private CAs. There is no way to skip verification: a certificate that does not
//! verify for the server name fails the connect like a refused TCP connection.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::config::UpstreamTls;

/// ALPN id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";

/// A TLS setting that cannot be used: the key under `tls` it is about, and why.
#[derive(Debug)]
pub(crate) struct TlsSettingError {
    /// `ca` or `server_name`.
    pub(crate) key: &'static str,
    pub(crate) message: String,
}

/// The client config of an upstream with `tls` (or none: the defaults) speaking HTTP/2 or not.
pub(crate) fn client_config(
    tls: Option<&UpstreamTls>,
    http2: bool,
) -> Result<Arc<ClientConfig>, TlsSettingError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = tls.and_then(|t| t.ca.as_deref()) {
        for cert in read_ca(ca)? {
            roots.add(cert).map_err(|e| TlsSettingError {
                key: "ca",
                message: format!("invalid CA certificate in `{}`: {e}", ca.display()),
            })?;
        }
    }
    if let Some(name) = tls.and_then(|t| t.server_name.as_deref()) {
        server_name(name).map_err(|message| TlsSettingError {
            key: "server_name",
            message,
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSettingError {
            key: "ca",
            message: format!("TLS setup failed: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![if http2 { ALPN_H2 } else { ALPN_HTTP11 }.to_vec()];
    Ok(Arc::new(cfg))
}

/// The certificates of the PEM bundle at `path`: an error when it cannot be read, is not PEM or
/// holds no certificate.
fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSettingError> {
    let fail = |message: String| TlsSettingError { key: "ca", message };
    let pem =
        std::fs::read(path).map_err(|e| fail(format!("cannot read `{}`: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("`{}` is not a PEM bundle: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(fail(format!("no PEM certificate in `{}`", path.display())));
    }
    Ok(certs)
}

/// The contents of the `tls.ca` file of `tls`, if any (a reload compares it to tell a changed
/// bundle behind an unchanged path).
pub(crate) fn ca_contents(tls: Option<&UpstreamTls>) -> Option<Vec<u8>> {
    tls.and_then(|t| t.ca.as_deref())
        .and_then(|p| std::fs::read(p).ok())
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
