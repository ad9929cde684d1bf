//! rustls configurations for dqkd's mutual TLS.
//!
//! Both sides trust only the cluster CA and always present a certificate.
//! The key exchange is post-quantum hybrid (X25519MLKEM768): a recording of today's
//! traffic stays safe from an adversary who can break elliptic-curve Diffie-Hellman later,
//! as long as ML-KEM holds, and as safe as X25519 if ML-KEM falls. [`KeyExchange`] says
//! whether classical groups are still accepted beside it. The provider (aws-lc-rs, the one
//! rustls ships ML-KEM with) is passed explicitly everywhere: relying on a process-wide
//! default provider breaks as soon as some other dependency installs a different one.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::{PkiError, Result};
use crate::identity::Identity;
use crate::pem::{load_certs, load_private_key};
use crate::pinned::PinnedServerVerifier;
use crate::revoke::load_crls;

/// TLS versions dqkd speaks: 1.3 preferred, 1.2 for older SAE stacks.
const VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
/// TLS 1.2 has no hybrid key exchange, so a hybrid-only endpoint speaks TLS 1.3 alone.
const VERSIONS_HYBRID_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Which key exchange groups an endpoint offers (client) or accepts (server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyExchange {
    /// X25519MLKEM768 only (TLS 1.3 only): a peer without ML-KEM cannot connect. The
    /// default of every link between dqkd processes.
    HybridOnly,
    /// X25519MLKEM768 first, then X25519, P-256 and P-384 for clients without ML-KEM
    /// (curl on OpenSSL 3.0, most ETSI 014 clients today). The default of the ETSI API.
    PreferHybrid,
}

impl KeyExchange {
    /// The word used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyExchange::HybridOnly => "hybrid-only",
            KeyExchange::PreferHybrid => "prefer-hybrid",
        }
    }

    fn groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        match self {
            KeyExchange::HybridOnly => vec![kx_group::X25519MLKEM768],
            KeyExchange::PreferHybrid => vec![
                kx_group::X25519MLKEM768,
                kx_group::X25519,
                kx_group::SECP256R1,
                kx_group::SECP384R1,
            ],
        }
    }

    fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        match self {
            KeyExchange::HybridOnly => VERSIONS_HYBRID_ONLY,
            KeyExchange::PreferHybrid => VERSIONS,
        }
    }
}

impl std::fmt::Display for KeyExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of the key exchange group a finished handshake used (`X25519MLKEM768`,
/// `X25519`, ...), for logs and metrics; `None` before the handshake has chosen one.
pub fn negotiated_group(conn: &CommonState) -> Option<String> {
    conn.negotiated_key_exchange_group()
        .map(|group| format!("{:?}", group.name()))
}

/// ALPN protocols offered by both sides: HTTP/2 first, then HTTP/1.1.
fn alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// The crypto provider for a client that offers, or a server that accepts, the groups of
/// `key_exchange`.
pub fn provider(key_exchange: KeyExchange) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: key_exchange.groups(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
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
/// verified against the CA in `ca_pem`; TLS 1.3 and 1.2; hybrid key exchange preferred;
/// ALPN `h2`, `http/1.1`.
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
        KeyExchange::PreferHybrid,
    )
    .map_err(|e| add_file_context(e, cert_chain_pem, key_pem))
}

/// Like [`server_config`], from already-loaded DER (for tests and embedding).
pub fn server_config_from_der(
    ca_certs: &[CertificateDer<'_>],
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig> {
    server_config_with_verifier(
        client_verifier(ca_certs, Vec::new())?,
        cert_chain,
        key,
        KeyExchange::PreferHybrid,
    )
}

/// How a server checks client certificates: they must chain to `ca_certs` and, when
/// `crls` are given, not be revoked by them (a certificate whose issuer has no CRL among
/// them is refused too, so a CRL file from the wrong CA fails closed). Kept apart from the
/// configuration so that a server can check an open connection again when its CRL changes.
pub fn client_verifier(
    ca_certs: &[CertificateDer<'_>],
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>> {
    let builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(ca_certs)?),
        provider(KeyExchange::PreferHybrid),
    );
    let builder = if crls.is_empty() {
        builder
    } else {
        builder.with_crls(crls).only_check_end_entity_revocation()
    };
    Ok(builder.build()?)
}

/// A server configuration around a given client-certificate verifier, accepting the
/// groups of `key_exchange`.
pub fn server_config_with_verifier(
    verifier: Arc<dyn ClientCertVerifier>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    key_exchange: KeyExchange,
) -> Result<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider(key_exchange))
        .with_protocol_versions(key_exchange.versions())
        .map_err(|e| PkiError::tls("selecting TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)
        .map_err(|e| PkiError::tls("loading server certificate and key", e))?;
    config.alpn_protocols = alpn();
    Ok(config)
}

/// Client configuration from PEM files: trusts only the CA in `ca_pem` and
/// presents the certificate chain and key; hybrid key exchange preferred; ALPN `h2`,
/// `http/1.1`.
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
    let builder = WebPkiServerVerifier::builder_with_provider(
        Arc::new(root_store(ca_certs)?),
        provider(KeyExchange::PreferHybrid),
    );
    let builder = if crls.is_empty() {
        builder
    } else {
        builder.with_crls(crls).only_check_end_entity_revocation()
    };
    let mut config = ClientConfig::builder_with_provider(provider(KeyExchange::PreferHybrid))
        .with_protocol_versions(VERSIONS)
        .map_err(|e| PkiError::tls("selecting TLS versions", e))?
        .with_webpki_verifier(builder.build()?)
        .with_client_auth_cert(cert_chain, key)
        .map_err(|e| PkiError::tls("loading client certificate and key", e))?;
    config.alpn_protocols = alpn();
    Ok(config)
}

/// A client configuration for a database server (PostgreSQL): trusts only `ca_certs`, checks
/// the whole chain and that the certificate names the host connected to (DNS name or IP
/// address), presents `client_auth` (chain and key) when given, offers the hybrid key exchange
/// first with classical groups after it (database servers rarely have ML-KEM yet), and
/// announces ALPN `postgresql` (PostgreSQL 17 and later refuse any other protocol name).
pub fn database_client_config(
    ca_certs: &[CertificateDer<'_>],
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig> {
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(root_store(ca_certs)?),
        provider(KeyExchange::PreferHybrid),
    )
    .build()?;
    let builder = ClientConfig::builder_with_provider(provider(KeyExchange::PreferHybrid))
        .with_protocol_versions(VERSIONS)
        .map_err(|e| PkiError::tls("selecting TLS versions", e))?
        .with_webpki_verifier(verifier);
    let mut config = match client_auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| PkiError::tls("loading client certificate and key", e))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// A client configuration for a call between dqkd processes: it presents `cert_chain`,
/// offers the groups of `key_exchange`, and accepts only the server `verifier` pins.
pub fn pinned_client_config(
    verifier: Arc<PinnedServerVerifier>,
    key_exchange: KeyExchange,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider(key_exchange))
        .with_protocol_versions(key_exchange.versions())
        .map_err(|e| PkiError::tls("selecting TLS versions", e))?
        .dangerous()
        // Not dangerous: the pinned verifier runs the full WebPKI chain, name and
        // revocation checks first and only then narrows them to one identity.
        .with_custom_certificate_verifier(verifier)
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
        PkiError::Tls { context, cause } => PkiError::Tls {
            context: format!("{context} ({}, {})", chain.display(), key.display()),
            cause,
        },
        other => other,
    }
}
