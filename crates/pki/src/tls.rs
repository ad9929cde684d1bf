//! rustls configurations for dqkd's mutual TLS.
//!
//! Both sides trust only the cluster CA and always present a certificate.
//! The ring provider is passed explicitly everywhere: relying on a
//! process-wide default provider breaks as soon as some other dependency
//! installs (or fails to install) a different one.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::{PkiError, Result};
use crate::identity::Identity;
use crate::pem::{load_certs, load_private_key};
use crate::revoke::load_crls;

/// TLS versions dqkd speaks: 1.3 preferred, 1.2 for older SAE stacks.
const VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// ALPN protocols offered by both sides: HTTP/2 first, then HTTP/1.1.
fn alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// The crypto provider used by every configuration built here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a root store holding exactly the certificates in `ca_certs`.
pub fn root_store(ca_certs: &[CertificateDer<'_>]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in ca_certs {
        roots
            .add(cert.clone().into_owned())
            .map_err(|e| PkiError::tls("adding CA certificate to trust store", e))?;
    }
    Ok(roots)
}

/// Server configuration from PEM files: client certificate required and
/// verified against the CA in `ca_pem`; TLS 1.3 and 1.2; ALPN `h2`, `http/1.1`.
pub fn server_config(ca_pem: &Path, cert_chain_pem: &Path, key_pem: &Path) -> Result<ServerConfig> {
    server_config_with_crl(ca_pem, cert_chain_pem, key_pem, None)
}

/// Like [`server_config`], also refusing clients whose certificate the CRL in `crl_pem`
/// revokes (see [`client_verifier`]).
pub fn server_config_with_crl(
    ca_pem: &Path,
    cert_chain_pem: &Path,
    key_pem: &Path,
    crl_pem: Option<&Path>,
) -> Result<ServerConfig> {
    let crls = crl_pem.map(load_crls).transpose()?.unwrap_or_default();
    let verifier = client_verifier(&load_certs(ca_pem)?, crls)?;
    server_config_with_verifier(
        verifier,
        load_certs(cert_chain_pem)?,
        load_private_key(key_pem)?,
    )
    .map_err(|e| add_file_context(e, cert_chain_pem, key_pem))
}

/// Like [`server_config`], from already-loaded DER (for tests and embedding).
pub fn server_config_from_der(
    ca_certs: &[CertificateDer<'_>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig> {
    server_config_with_verifier(client_verifier(ca_certs, Vec::new())?, cert_chain, key)
}

/// How a server checks client certificates: they must chain to `ca_certs` and, when
/// `crls` are given, not be revoked by them (a certificate whose issuer has no CRL among
/// them is refused too, so a CRL file from the wrong CA fails closed). Kept apart from the
/// configuration so that a server can check an open connection again when its CRL changes.
pub fn client_verifier(
    ca_certs: &[CertificateDer<'_>],
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>> {
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca_certs)?), provider());
    let builder = if crls.is_empty() {
        builder
    } else {
        builder.with_crls(crls).only_check_end_entity_revocation()
    };
    Ok(builder.build()?)
}

/// A server configuration around a given client-certificate verifier.
pub fn server_config_with_verifier(
    verifier: Arc<dyn ClientCertVerifier>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig> {
    let provider = provider();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| PkiError::tls("selecting TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)
        .map_err(|e| PkiError::tls("loading server certificate and key", e))?;
    config.alpn_protocols = alpn();
    Ok(config)
}

/// Client configuration from PEM files: trusts only the CA in `ca_pem` and
/// presents the certificate chain and key; ALPN `h2`, `http/1.1`.
pub fn client_config(ca_pem: &Path, cert_chain_pem: &Path, key_pem: &Path) -> Result<ClientConfig> {
    client_config_with_crl(ca_pem, cert_chain_pem, key_pem, None)
}

/// Like [`client_config`], also refusing servers whose certificate the CRL in `crl_pem`
/// revokes.
pub fn client_config_with_crl(
    ca_pem: &Path,
    cert_chain_pem: &Path,
    key_pem: &Path,
    crl_pem: Option<&Path>,
) -> Result<ClientConfig> {
    let crls = crl_pem.map(load_crls).transpose()?.unwrap_or_default();
    client_config_with_crls(
        &load_certs(ca_pem)?,
        crls,
        load_certs(cert_chain_pem)?,
        load_private_key(key_pem)?,
    )
    .map_err(|e| add_file_context(e, cert_chain_pem, key_pem))
}

/// Like [`client_config`], with key and chain from one `<id>.combined.pem` file.
pub fn client_config_from_combined(ca_pem: &Path, combined_pem: &Path) -> Result<ClientConfig> {
    client_config_from_der(
        &load_certs(ca_pem)?,
        load_certs(combined_pem)?,
        load_private_key(combined_pem)?,
    )
    .map_err(|e| add_file_context(e, combined_pem, combined_pem))
}

/// Like [`client_config`], from already-loaded DER (for tests and embedding).
pub fn client_config_from_der(
    ca_certs: &[CertificateDer<'_>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig> {
    client_config_with_crls(ca_certs, Vec::new(), cert_chain, key)
}

/// Like [`client_config_from_der`], refusing servers whose certificate `crls` revoke
/// (none: no revocation check).
pub fn client_config_with_crls(
    ca_certs: &[CertificateDer<'_>],
    crls: Vec<CertificateRevocationListDer<'static>>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig> {
    let builder =
        WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(ca_certs)?), provider());
    let builder = if crls.is_empty() {
        builder
    } else {
        builder.with_crls(crls).only_check_end_entity_revocation()
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| PkiError::tls("selecting TLS versions", e))?
        .with_webpki_verifier(builder.build()?)
        .with_client_auth_cert(cert_chain, key)
        .map_err(|e| PkiError::tls("loading client certificate and key", e))?;
    config.alpn_protocols = alpn();
    Ok(config)
}

/// The identity of the peer of an established connection.
///
/// Works on `rustls::ServerConnection` / `ClientConnection` (and so on
/// tokio-rustls streams via `get_ref().1`). The handshake must be complete:
/// only then has the certificate been verified against the cluster CA.
pub fn peer_identity(conn: &CommonState, cluster: &str) -> Result<Identity> {
    if conn.is_handshaking() {
        return Err(PkiError::NoIdentity {
            reason: "handshake not complete",
        });
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(PkiError::NoIdentity {
            reason: "peer presented no certificate",
        })?;
    Identity::from_certificate(leaf, cluster)
}

/// rustls errors about a key or chain do not say which file was at fault; add it.
fn add_file_context(err: PkiError, chain: &Path, key: &Path) -> PkiError {
    match err {
        PkiError::Tls { context, source } => PkiError::Tls {
            context: format!("{context} ({}, {})", chain.display(), key.display()),
            source,
        },
        other => other,
    }
}
