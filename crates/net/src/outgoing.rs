//! The calls a dqkd process makes to other dqkd processes (a KME to its peer sites and to
//! entropy servers).
//!
//! Each client accepts exactly one server identity, the one the manifest names for the
//! address it calls ([`dqkd_pki::PinnedServerVerifier`]), offers the configured key exchange
//! (post-quantum hybrid only, by default), and follows the cluster's revocation list as
//! servers do: when the list changes, every client checks new handshakes against it and
//! drops its pooled connections, so that a server revoked meanwhile is not called again
//! over a connection made before.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use dqkd_pki::{Identity, KeyExchange, PinnedServerVerifier};
use http_body_util::Full;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::crl::{follow, read_at_start, CrlSubscriber};
use crate::{https_client, HttpsClient, TlsFiles, Versions};

/// This process's certificate as a client, the key exchange it offers, and the revocation
/// list in force; makes [`PinnedClient`]s.
pub struct OutgoingTls {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    key_exchange: KeyExchange,
    state: Mutex<CrlState>,
}

/// The revocation list in force and every client that checks against it (each client
/// keeps its [`OutgoingTls`], and so the list's follower, alive; not the other way round).
struct CrlState {
    crls: Vec<CertificateRevocationListDer<'static>>,
    number: Option<u64>,
    clients: Vec<Weak<PinnedInner>>,
}

impl std::fmt::Debug for OutgoingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingTls")
            .field("key_exchange", &self.key_exchange)
            .finish_non_exhaustive()
    }
}

impl OutgoingTls {
    /// Loads the certificate, key, CA and revocation list of `tls` for calls that offer
    /// `key_exchange`. When `tls` names a revocation list, it is re-read every
    /// [`crate::CRL_POLL`] for as long as the returned value lives (call from a Tokio
    /// runtime).
    pub fn load(
        tls: &TlsFiles,
        key_exchange: KeyExchange,
    ) -> Result<Arc<Self>, dqkd_pki::PkiError> {
        let crl_pem = read_at_start(tls.crl.as_deref())?;
        let crls = match (&tls.crl, &crl_pem) {
            (Some(path), Some(pem)) => dqkd_pki::parse_crls(pem, path)?,
            _ => Vec::new(),
        };
        let outgoing = Arc::new(Self {
            ca: dqkd_pki::load_certs(&tls.ca)?,
            chain: dqkd_pki::load_certs(&tls.cert)?,
            key: dqkd_pki::load_private_key(&tls.key)?,
            key_exchange,
            state: Mutex::new(CrlState {
                number: dqkd_pki::crl_number(&crls),
                crls,
                clients: Vec::new(),
            }),
        });
        if let (Some(crl), Some(seen)) = (tls.crl.clone(), crl_pem) {
            let subscriber = ClientCrl {
                tls: tls.clone(),
                outgoing: Arc::downgrade(&outgoing),
            };
            tokio::spawn(follow(crl, seen, subscriber));
        }
        Ok(outgoing)
    }

    /// One pinned client straight from certificate files, for a tool or test that calls one
    /// server (no revocation list unless `tls` names one).
    pub fn single(
        tls: &TlsFiles,
        key_exchange: KeyExchange,
        expected: Identity,
        versions: Versions,
    ) -> Result<PinnedClient, dqkd_pki::PkiError> {
        Self::load(tls, key_exchange)?.client(expected, versions, None)
    }

    /// The key exchange these calls offer.
    pub fn key_exchange(&self) -> KeyExchange {
        self.key_exchange
    }

    /// A pooled client for calls to the server whose certificate carries `expected`, and no
    /// other. `connect_timeout` bounds the TCP connect.
    pub fn client(
        self: &Arc<Self>,
        expected: Identity,
        versions: Versions,
        connect_timeout: Option<Duration>,
    ) -> Result<PinnedClient, dqkd_pki::PkiError> {
        let mut state = self.lock();
        let verifier = PinnedServerVerifier::new(&self.ca, state.crls.clone(), expected)?;
        let config = self.config(verifier.clone())?;
        let inner = Arc::new(PinnedInner {
            http: RwLock::new(https_client(config.clone(), versions, connect_timeout)),
            config,
            verifier,
            versions,
            connect_timeout,
            _tls: self.clone(),
        });
        state.clients.retain(|client| client.strong_count() > 0);
        state.clients.push(Arc::downgrade(&inner));
        Ok(PinnedClient { inner })
    }

    fn config(
        &self,
        verifier: Arc<PinnedServerVerifier>,
    ) -> Result<rustls::ClientConfig, dqkd_pki::PkiError> {
        dqkd_pki::pinned_client_config(
            verifier,
            self.key_exchange,
            self.chain.clone(),
            self.key.clone_key(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CrlState> {
        // Poisoned only by a panic while swapping whole values: what is inside is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `crls` in force for every client: new handshakes are checked against them, and
    /// connections made before are dropped from the pools.
    fn install(&self, crls: Vec<CertificateRevocationListDer<'static>>, number: Option<u64>) {
        let mut state = self.lock();
        state.clients.retain(|client| client.strong_count() > 0);
        for client in state.clients.iter().filter_map(Weak::upgrade) {
            if let Err(e) = client.verifier.set_crls(crls.clone()) {
                tracing::error!(server = %client.verifier.expected(), error = %e,
                    "the new revocation list could not be applied to calls to this server");
                continue;
            }
            client.renew();
        }
        state.crls = crls;
        state.number = number;
    }
}

/// A pooled HTTPS client that accepts one server identity; cheap to clone.
#[derive(Clone)]
pub struct PinnedClient {
    inner: Arc<PinnedInner>,
}

struct PinnedInner {
    http: RwLock<HttpsClient>,
    config: rustls::ClientConfig,
    verifier: Arc<PinnedServerVerifier>,
    versions: Versions,
    connect_timeout: Option<Duration>,
    /// Keeps the revocation list followed for as long as a client uses it.
    _tls: Arc<OutgoingTls>,
}

impl PinnedClient {
    /// Sends `request` over a pooled connection (made, and checked, when none is idle).
    pub fn request(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        let http = self
            .inner
            .http
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        http.request(request)
    }

    /// The identity this client accepts.
    pub fn expected(&self) -> &Identity {
        self.inner.verifier.expected()
    }
}

impl PinnedInner {
    /// Replaces the connection pool: idle connections close as the old pool is dropped;
    /// requests under way finish on theirs. The TLS session cache is replaced too: a
    /// resumed session skips certificate checks, so a revoked server could otherwise be
    /// reached again through a session made before.
    fn renew(&self) {
        let mut config = self.config.clone();
        config.resumption = rustls::client::Resumption::default();
        let fresh = https_client(config, self.versions, self.connect_timeout);
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }
}

/// The client side of a revocation list.
struct ClientCrl {
    tls: TlsFiles,
    outgoing: Weak<OutgoingTls>,
}

type LoadedCrls = Vec<CertificateRevocationListDer<'static>>;

impl CrlSubscriber for ClientCrl {
    type Loaded = LoadedCrls;

    fn is_gone(&self) -> bool {
        self.outgoing.strong_count() == 0
    }

    fn in_force(&self) -> Option<u64> {
        self.outgoing.upgrade().and_then(|o| o.lock().number)
    }

    fn load(&self, pem: &[u8]) -> Result<(Option<u64>, LoadedCrls), dqkd_pki::PkiError> {
        let path = self
            .tls
            .crl
            .as_deref()
            .unwrap_or(std::path::Path::new("crl"));
        let crls = dqkd_pki::parse_crls(pem, path)?;
        // Checked before anything is replaced: a list a verifier cannot use is refused whole.
        dqkd_pki::client_verifier(&dqkd_pki::load_certs(&self.tls.ca)?, crls.clone())?;
        Ok((dqkd_pki::crl_number(&crls), crls))
    }

    fn install(&mut self, crls: LoadedCrls) {
        if let Some(outgoing) = self.outgoing.upgrade() {
            let number = dqkd_pki::crl_number(&crls);
            outgoing.install(crls, number);
        }
    }
}
