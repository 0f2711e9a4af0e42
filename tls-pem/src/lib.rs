//! TLS for our HTTP servers (the manager's API, the nodes' peer server): a rustls
//! acceptor from PEM files (certificate chain and private key), using the ring provider
//! whatever other providers the build enables. Clients trust extra CAs with
//! [`read_ca_bundle`].

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the TLS private key {} (PEM)", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| format!("the TLS certificate {} and its key do not fit together", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The PEM bytes of a CA bundle, checked to hold at least one certificate; `what` names
/// it in errors ("the broker's CA certificate").
pub fn read_ca_bundle(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    let n = CertificateDer::pem_slice_iter(&pem).filter(|c| c.is_ok()).count();
    if n == 0 {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(pem)
}
