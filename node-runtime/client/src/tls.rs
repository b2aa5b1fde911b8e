//! TLS for the node API over TCP (rustls, aws-lc-rs): the client's configuration (a CA to trust,
//! optionally a client certificate for mTLS) and the errors a user can act on.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the client's TLS material comes from.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM CA certificate(s) the node's certificate must chain to.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM), for nodes that require them (`--client-ca`).
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// PEM certificates from a file; the error names the file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("parse certificates in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// A PEM private key (PKCS#8, PKCS#1 or SEC1); the error names the file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("read private key from {}: {e}", path.display()))
}

/// The client configuration for `https://` endpoints.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca = files.ca_file.as_deref().ok_or_else(|| {
        "an https:// node needs --ca-file: the CA certificate that signed the node's certificate"
            .to_string()
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| format!("client certificate {}: {e}", cert.display()))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("--cert and --key go together".to_string()),
    };
    Ok(Arc::new(config))
}

/// A client configuration from PEM bytes (a kubeconfig's `certificate-authority-data` and
/// `client-certificate-data` / `client-key-data`); `what` names where they came from.
pub fn client_config_pem(
    ca: &[u8],
    client: Option<(&[u8], &[u8])>,
    what: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        let c = c.map_err(|e| format!("{what}: parse the CA certificate: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("{what}: not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{what}: no PEM CA certificate"));
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{what}: parse the client certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| format!("{what}: parse the client key: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("{what}: client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// What a failed TLS handshake means, in words a user can act on.
pub fn explain(e: &std::io::Error) -> String {
    format!("tls handshake: {}", with_hint(&e.to_string()))
}

/// `text` with a hint when it names a TLS failure a user can fix. With TLS 1.3 a refused client
/// certificate shows only on the first read, so request errors get the same hints.
pub fn with_hint(text: &str) -> String {
    let hint = if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        " (the node's certificate is not signed by --ca-file, or names another host)"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        " (the node requires a client certificate: pass --cert and --key)"
    } else if text.contains("BadCertificate") || text.contains("UnknownCA") {
        " (the node does not accept this client certificate)"
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        " (the server does not speak TLS on this port: use http://)"
    } else {
        ""
    };
    format!("{text}{hint}")
}
