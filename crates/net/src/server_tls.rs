//! A server's TLS configuration as it stands now: replaced whenever its revocation list
//! changes, and watched by every open connection so that a caller revoked meanwhile is cut
//! off. Each listener of a process accepts the key exchange groups configured for it.

use std::sync::Arc;

use dqkd_pki::KeyExchange;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::crl::{follow, read_at_start, CrlSubscriber};
use crate::TlsFiles;

/// The TLS side of one listener: the configuration in force and the key exchange it
/// accepts, with the labels its handshake metric carries.
#[derive(Clone)]
pub struct ServerTls {
    current: watch::Receiver<Arc<LoadedTls>>,
    key_exchange: KeyExchange,
    labels: Arc<[(&'static str, String)]>,
}

/// One loaded configuration per key exchange policy, the verifier inside them, and the
/// number of their CRL.
pub(crate) struct LoadedTls {
    hybrid_only: Arc<rustls::ServerConfig>,
    prefer_hybrid: Arc<rustls::ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    crl_number: Option<u64>,
}

impl LoadedTls {
    /// Loads the configuration of `tls`, with the revocation list read as `crl_pem` (the
    /// bytes of `tls.crl`, read once by the caller so that it knows exactly what is in force).
    fn load(tls: &TlsFiles, crl_pem: Option<&[u8]>) -> Result<Self, dqkd_pki::PkiError> {
        let crls = match (&tls.crl, crl_pem) {
            (Some(path), Some(pem)) => dqkd_pki::parse_crls(pem, path)?,
            _ => Vec::new(),
        };
        let crl_number = dqkd_pki::crl_number(&crls);
        let verifier = dqkd_pki::client_verifier(&dqkd_pki::load_certs(&tls.ca)?, crls)?;
        let chain = dqkd_pki::load_certs(&tls.cert)?;
        let key = dqkd_pki::load_private_key(&tls.key)?;
        let config = |key_exchange| {
            dqkd_pki::server_config_with_verifier(
                verifier.clone(),
                chain.clone(),
                key.clone_key(),
                key_exchange,
            )
            .map(Arc::new)
        };
        Ok(Self {
            hybrid_only: config(KeyExchange::HybridOnly)?,
            prefer_hybrid: config(KeyExchange::PreferHybrid)?,
            verifier,
            crl_number,
        })
    }
}

impl ServerTls {
    /// Loads the server's configuration from `tls` for a listener that accepts
    /// `key_exchange` and, when `tls` names a revocation list, starts re-reading that list
    /// every [`crate::CRL_POLL`] for as long as the returned value (or a clone) lives. A list
    /// that is missing or unreadable at start is an error: a server told to check
    /// revocations never starts without. `labels` name the listener in the
    /// `dqkd_tls_handshakes_total` metric.
    pub fn load(
        tls: &TlsFiles,
        key_exchange: KeyExchange,
        labels: Vec<(&'static str, String)>,
    ) -> Result<Self, dqkd_pki::PkiError> {
        let crl_pem = read_at_start(tls.crl.as_deref())?;
        let loaded = LoadedTls::load(tls, crl_pem.as_deref())?;
        let (sender, current) = watch::channel(Arc::new(loaded));
        if let (Some(crl), Some(seen)) = (tls.crl.clone(), crl_pem) {
            let subscriber = ServerCrl {
                tls: tls.clone(),
                sender,
            };
            tokio::spawn(follow(crl, seen, subscriber));
        }
        Ok(Self {
            current,
            key_exchange,
            labels: labels.into(),
        })
    }

    /// Another listener of the same process: same certificate, trust anchor and revocation
    /// list, its own key exchange policy and metric labels.
    pub fn for_listener(
        &self,
        key_exchange: KeyExchange,
        labels: Vec<(&'static str, String)>,
    ) -> Self {
        Self {
            current: self.current.clone(),
            key_exchange,
            labels: labels.into(),
        }
    }

    /// The labels of this listener's metrics (the process and the listener's name).
    pub(crate) fn labels(&self) -> Arc<[(&'static str, String)]> {
        self.labels.clone()
    }

    /// The key exchange this listener accepts.
    pub fn key_exchange(&self) -> KeyExchange {
        self.key_exchange
    }

    /// The configuration for the next handshake.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        let loaded = self.current.borrow();
        TlsAcceptor::from(match self.key_exchange {
            KeyExchange::HybridOnly => loaded.hybrid_only.clone(),
            KeyExchange::PreferHybrid => loaded.prefer_hybrid.clone(),
        })
    }

    /// Counts a finished handshake by the group it negotiated, and logs it at debug.
    pub(crate) fn record_handshake(
        &self,
        conn: &rustls::CommonState,
        remote: std::net::SocketAddr,
    ) {
        let group = dqkd_pki::negotiated_group(conn).unwrap_or_else(|| "none".to_owned());
        tracing::debug!(%remote, group = %group, "TLS handshake done");
        let mut labels: Vec<(&'static str, String)> = self.labels.to_vec();
        labels.push(("group", group));
        metrics::counter!("dqkd_tls_handshakes_total", &labels).increment(1);
    }

    /// Updates of the configuration, for an open connection to check its caller again.
    pub(crate) fn updates(&self) -> watch::Receiver<Arc<LoadedTls>> {
        // A clone starts as "changed" after any reload, so a connection accepted just
        // before one is checked against the new list too (once more than needed, harmless).
        self.current.clone()
    }
}

/// The server side of a revocation list: every changed list makes a new configuration.
struct ServerCrl {
    tls: TlsFiles,
    sender: watch::Sender<Arc<LoadedTls>>,
}

impl CrlSubscriber for ServerCrl {
    type Loaded = LoadedTls;

    fn is_gone(&self) -> bool {
        self.sender.is_closed()
    }

    fn in_force(&self) -> Option<u64> {
        self.sender.borrow().crl_number
    }

    fn load(&self, pem: &[u8]) -> Result<(Option<u64>, LoadedTls), dqkd_pki::PkiError> {
        let loaded = LoadedTls::load(&self.tls, Some(pem))?;
        Ok((loaded.crl_number, loaded))
    }

    fn install(&mut self, loaded: LoadedTls) {
        self.sender.send_replace(Arc::new(loaded));
    }
}

/// Returns once a new configuration refuses the client certificate chain `chain` (never,
/// while the configuration stays as it is).
pub(crate) async fn revoked(
    updates: &mut watch::Receiver<Arc<LoadedTls>>,
    chain: &[CertificateDer<'static>],
) {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return std::future::pending().await;
    };
    while updates.changed().await.is_ok() {
        let verifier = updates.borrow_and_update().verifier.clone();
        if verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_err()
        {
            return;
        }
    }
    std::future::pending().await
}
