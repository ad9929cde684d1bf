//! Outgoing calls that accept exactly one identity.
//!
//! A valid certificate of the cluster is not enough for a server a KME calls: a KME
//! certificate answering at an entropy server's address would hand the KME ranges of its
//! choosing, and an entropy server's certificate answering at a peer's address could
//! acknowledge keys it never stored. [`PinnedServerVerifier`] therefore runs the usual chain,
//! name and revocation checks and then accepts the server only if its certificate carries
//! the one `dqkd://` identity the manifest names for that address.
//!
//! The revocation lists it checks against can be replaced while it is in use
//! ([`PinnedServerVerifier::set_crls`]), so that a client re-reads its list as servers do.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{PkiError, Result};
use crate::identity::{dqkd_uri, Identity};
use crate::tls::{alpn, provider, root_store, KeyExchange};

/// Checks a server's certificate against the cluster CA, the current revocation list and
/// one expected identity.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    expected: Identity,
    roots: Arc<RootCertStore>,
    chain: RwLock<Arc<WebPkiServerVerifier>>,
}

/// The server presented a valid cluster certificate of someone else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server presented {found}, not {expected}")]
pub struct IdentityMismatch {
    /// The identity the manifest names for the address called.
    pub expected: String,
    /// What the certificate says instead (its `dqkd://` URI, or why it has none).
    pub found: String,
}

impl PinnedServerVerifier {
    /// A verifier that trusts `ca_certs`, refuses certificates that `crls` revoke (none: no
    /// revocation check) and accepts only `expected`.
    pub fn new(
        ca_certs: &[CertificateDer<'_>],
        crls: Vec<CertificateRevocationListDer<'static>>,
        expected: Identity,
    ) -> Result<Arc<Self>> {
        let roots = Arc::new(root_store(ca_certs)?);
        let chain = chain_verifier(&roots, crls)?;
        Ok(Arc::new(Self {
            expected,
            roots,
            chain: RwLock::new(chain),
        }))
    }

    /// The identity this verifier accepts.
    pub fn expected(&self) -> &Identity {
        &self.expected
    }

    /// Checks every later handshake against `crls` instead of the lists given so far.
    pub fn set_crls(&self, crls: Vec<CertificateRevocationListDer<'static>>) -> Result<()> {
        let chain = chain_verifier(&self.roots, crls)?;
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the value
        // inside is still a whole verifier.
        *self.chain.write().unwrap_or_else(|e| e.into_inner()) = chain;
        Ok(())
    }

    fn chain(&self) -> Arc<WebPkiServerVerifier> {
        self.chain.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Compares the identity in `end_entity` with the expected one.
    fn check_identity(&self, end_entity: &[u8]) -> std::result::Result<(), IdentityMismatch> {
        let expected = self.expected.uri();
        let found = match X509Certificate::from_der(end_entity) {
            Ok((_, cert)) => match dqkd_uri(&cert) {
                Ok(Some(uri)) if uri == expected => return Ok(()),
                Ok(Some(uri)) => uri.to_owned(),
                Ok(None) => "a certificate without a dqkd:// identity".to_owned(),
                Err(e) => format!("a certificate whose identity is unreadable ({e})"),
            },
            Err(e) => format!("an unreadable certificate ({e})"),
        };
        Err(IdentityMismatch { expected, found })
    }
}

fn chain_verifier(
    roots: &Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<WebPkiServerVerifier>> {
    let builder = WebPkiServerVerifier::builder_with_provider(
        roots.clone(),
        provider(KeyExchange::PreferHybrid),
    );
    let builder = if crls.is_empty() {
        builder
    } else {
        builder.with_crls(crls).only_check_end_entity_revocation()
    };
    builder.build().map_err(PkiError::from)
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let verified = self.chain().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match self.check_identity(end_entity.as_ref()) {
            Ok(()) => Ok(verified),
            Err(mismatch) => {
                tracing::error!(
                    server = ?server_name,
                    expected = %mismatch.expected,
                    found = %mismatch.found,
                    "refused a server: its certificate is not the identity the manifest names for this address"
                );
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(mismatch)),
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain().supported_verify_schemes()
    }
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
