//! PEM files of certificates and keys, read the same way for the listener's `tls` and an
//! upstream's `tls`: errors name the file and say what is wrong with it.

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates in the PEM file at `path`, in file order (a chain: leaf first); an error when it
/// cannot be read, is not PEM or holds no certificate.
pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}` is not a PEM file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no PEM certificate in `{}`", path.display()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path`. An encrypted key
/// (PKCS#8 `ENCRYPTED PRIVATE KEY`, or OpenSSL's `Proc-Type: 4,ENCRYPTED` header) is refused as
/// such: the gateway takes no passphrase.
pub(crate) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    let encrypted = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    if encrypted(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || encrypted(b"Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "`{}` holds an encrypted private key, and the gateway takes no passphrase: decrypt it \
             (`openssl pkey -in KEY -out KEY.plain`) and keep the file readable by the gateway only",
            path.display()
        ));
    }
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("`{}` is not a PEM file: {e}", path.display()))?
        .ok_or_else(|| format!("no PEM private key in `{}`", path.display()))
}

/// The certificate revocation lists in the PEM file at `path`; an error when it cannot be read, is
/// not PEM or holds no CRL.
pub(crate) fn crls(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, String> {
    let pem = read(path)?;
    let crls = rustls_pemfile::crls(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}` is not a PEM file: {e}", path.display()))?;
    if crls.is_empty() {
        return Err(format!(
            "no PEM certificate revocation list (`X509 CRL`) in `{}`",
            path.display()
        ));
    }
    Ok(crls)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = std::env::temp_dir().join(format!("bulwark-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        assert!(certs(&missing)
            .unwrap_err()
            .starts_with(&format!("cannot read `{}`: ", missing.display())));
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        assert_eq!(
            certs(&empty).unwrap_err(),
            format!("no PEM certificate in `{}`", empty.display())
        );
        assert_eq!(
            private_key(&empty).unwrap_err(),
            format!("no PEM private key in `{}`", empty.display())
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let both = dir.join("both.pem");
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&both, format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
        assert_eq!(certs(&both).unwrap().len(), 1);
        assert!(private_key(&both).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
