//! Configuration: the cluster manifest (the same file at every site) and the site file
//! (what only this site knows: listeners, certificates, store).
//!
//! Raw TOML is parsed into the serde types [`Manifest`] and [`SiteFile`], then checked as
//! a whole into a [`Config`] that the server trusts without further checks. Every problem is
//! reported with the file and the offending entry named.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dqkd_etsi014::Limits;
use dqkd_pki::Name;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// The cluster manifest, as written in TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Cluster name; it is part of every certificate identity (`dqkd://<cluster>/…`).
    pub cluster: Name,
    /// ETSI 014 limits every site advertises in `status` and enforces.
    #[serde(default)]
    pub limits: ManifestLimits,
    /// How long keys live and who may fetch them again.
    #[serde(default)]
    pub keys: KeyLife,
    /// Parameters of the BLAST-style generator.
    #[serde(default)]
    pub keygen: KeygenParams,
    /// Site-to-site (peer) settings.
    #[serde(default)]
    pub peers: PeerSettings,
    /// Ready-key pools per peer link.
    #[serde(default)]
    pub pools: PoolSettings,
    /// The entropy servers every site draws from. With none, keys come from each KME's
    /// operating-system CSPRNG and only same-site pairs are possible.
    #[serde(default)]
    pub entropy: Vec<EntropyEntry>,
    /// The sites of the cluster.
    pub sites: Vec<SiteEntry>,
}

/// Parameters of the BLAST-style generator (see docs/keygen-protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeygenParams {
    /// Entropy servers used per key (at least 2: with one, the key is that server's block).
    pub n: u8,
    /// How many of the `n` servers (or their links) may leak without weakening the key.
    /// At least 1: with 0, every server learns linear information about every key.
    pub c: u8,
    /// Accept `c = 0` anyway (for measurements, never production); every start logs a
    /// warning.
    #[serde(skip_serializing_if = "is_false")]
    pub insecure_allow_c0: bool,
}

impl Default for KeygenParams {
    fn default() -> Self {
        Self {
            n: 3,
            c: 1,
            insecure_allow_c0: false,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Smallest key two sites may share unless `[limits] allow_short_keys = true`: with `c + 1`
/// servers leaked a key keeps only part of its bits, and fewer than 128 bits is within reach
/// of a search.
pub const MIN_CROSS_SITE_KEY_BITS: u32 = 128;

/// Site-to-site settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerSettings {
    /// How long a site waits for a peer (and for entropy servers) before answering 503.
    pub timeout_ms: u64,
    /// Most keys under way toward a set of peer sites at once (generated or taken from a
    /// pool, not yet answered): bounds the memory a long round trip ties up.
    pub max_in_flight_keys: u32,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            timeout_ms: 5000,
            max_in_flight_keys: 65536,
        }
    }
}

/// Ready-key pools: keys generated ahead of demand for each pair of sites and already
/// regenerated at the peer, so `enc_keys` needs one peer round trip to name their SAEs and
/// none to the entropy servers. Pools hold keys of `limits.default_key_size`; requests for
/// other sizes, multicast requests, same-site pairs and, toward a near site, batches of more
/// than 64 keys are served on demand, as is any request a pool cannot cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Ready keys each site keeps per peer site. 0 turns pools off.
    pub target: u64,
    /// A refill starts when a pool falls to this many keys or fewer and runs up to `target`.
    pub low_water: u64,
    /// Keys per refill batch: one entropy allocation per server and one peer message each.
    pub batch: u32,
    /// Seconds a ready key is kept unused before it is shredded at both sites.
    pub ttl_secs: u64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            target: 0,
            low_water: 0,
            batch: 8192,
            ttl_secs: 86_400,
        }
    }
}

/// Most keys in one refill batch; its peer message (IDs and metadata) stays a few MiB.
pub const MAX_POOL_BATCH: u32 = 65_536;

/// One entropy server of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyEntry {
    /// The server's ID (its certificate identity is `dqkd://<cluster>/entropy/<id>`).
    pub id: Name,
    /// Where KMEs reach it, e.g. `127.0.0.1:7001`.
    pub addr: String,
}

/// ETSI 014 limits (sizes in bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManifestLimits {
    /// Key size used when a request names none.
    pub default_key_size: u32,
    /// Smallest key a request may ask for.
    pub min_key_size: u32,
    /// Largest key a request may ask for.
    pub max_key_size: u32,
    /// Most keys in one request (and most key IDs in one dec_keys).
    pub max_key_per_request: u32,
    /// Most undelivered keys a master/slave pair may have stored at once.
    pub max_key_count: u64,
    /// Most `additional_slave_SAE_IDs` in one request.
    pub max_sae_id_count: u32,
    /// Allow `min_key_size` below [`MIN_CROSS_SITE_KEY_BITS`] in a cluster of more than one
    /// site; every start then logs a warning.
    #[serde(skip_serializing_if = "is_false")]
    pub allow_short_keys: bool,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        let etsi = Limits::default();
        Self {
            default_key_size: etsi.default_key_size,
            // Not ETSI's 64: keys shared between sites are at least 128 bits.
            min_key_size: etsi.min_key_size.max(MIN_CROSS_SITE_KEY_BITS),
            max_key_size: etsi.max_key_size,
            max_key_per_request: etsi.max_key_per_request,
            max_key_count: 100_000,
            max_sae_id_count: etsi.max_sae_id_count,
            allow_short_keys: false,
        }
    }
}

impl ManifestLimits {
    /// The subset the ETSI request parser needs.
    pub fn etsi(&self) -> Limits {
        Limits {
            default_key_size: self.default_key_size,
            min_key_size: self.min_key_size,
            max_key_size: self.max_key_size,
            max_key_per_request: self.max_key_per_request,
            max_sae_id_count: self.max_sae_id_count,
        }
    }
}

/// Key lifetime settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyLife {
    /// Seconds an undelivered key is kept before it is shredded.
    pub ttl_secs: u64,
    /// Seconds between sweeps that shred expired keys.
    pub purge_interval_secs: u64,
    /// Whether the master SAE may fetch its own keys again with dec_keys at its own site
    /// (the mission's "retrieve the key from either site"). `false` means "deliver once":
    /// the master gets a key only in its enc_keys answer. Slaves always get a key once.
    pub master_refetch: bool,
    /// Seconds the master's own copy is kept for such a fetch when no SAE of its site is a
    /// slave (at most `ttl_secs`). Short by default: most masters never fetch again, and
    /// every copy kept is a key at rest.
    pub master_refetch_secs: u64,
}

impl Default for KeyLife {
    fn default() -> Self {
        Self {
            ttl_secs: 3600,
            purge_interval_secs: 10,
            master_refetch: true,
            master_refetch_secs: 300,
        }
    }
}

/// One site of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEntry {
    /// The site's KME ID (unique in the cluster, distinct from every SAE ID).
    pub kme_id: Name,
    /// Where SAEs reach the site's ETSI API, e.g. `127.0.0.1:8443`.
    pub api_addr: String,
    /// Where other sites reach this site's peer API, e.g. `127.0.0.1:9443` (required when
    /// the cluster has more than one site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// The SAE IDs that belong to this site.
    pub saes: Vec<Name>,
}

/// The site file, as written in TOML. Relative paths are relative to the file's folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    /// Path of the cluster manifest.
    pub manifest: PathBuf,
    /// Which site of the manifest this process is.
    pub kme_id: Name,
    /// Address the ETSI API listens on (`127.0.0.1:0` picks a free port).
    pub api_listen: SocketAddr,
    /// Address the peer (KME-to-KME) API listens on; required when the cluster has more
    /// than one site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<SocketAddr>,
    /// Address of the Prometheus `/metrics` listener (plain HTTP; keep it on a private
    /// interface). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Certificates.
    pub tls: TlsFiles,
    /// Key store.
    pub store: StoreFiles,
    /// Connection limits of each listener (ETSI API and peer API); defaults when absent.
    #[serde(default, skip_serializing_if = "ServerLimits::is_default")]
    pub connections: ServerLimits,
}

/// Certificate files (the same shape for every dqkd process).
pub use dqkd_net::TlsFiles;

/// Connection limits of a listener (the same shape for every dqkd server).
pub use dqkd_net::ServerLimits;

/// Key store of a site, as written: exactly one of `path` (embedded) and `url`
/// (PostgreSQL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFiles {
    /// The embedded store file (one KME process per site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A PostgreSQL URL, `postgres://user@host:port/database`, shared by every replica
    /// of the site. The environment variable `DQKD_STORE_URL` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Connections to PostgreSQL per replica (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    /// PEM file of the CA that signed the PostgreSQL server's certificate. When set, every
    /// connection is TLS (required, never plaintext) and the server's chain and host name are
    /// verified against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) presented to PostgreSQL; needs `key` and `ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Accept a plaintext connection to a PostgreSQL host that is not loopback (a trusted
    /// private network). Loopback hosts and Unix sockets never need it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_allow_plaintext: bool,
    /// The site key-encryption key, which seals keys at rest: a file of 64 hex characters,
    /// or `pkcs11:token=<label>;object=<label>` for a key held in a PKCS#11 token. Every
    /// replica of a site uses the same one.
    pub kek: PathBuf,
    /// The PKCS#11 module (shared library) of the token when `kek` is a `pkcs11:` URI;
    /// `DQKD_PKCS11_MODULE` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11_module: Option<PathBuf>,
    /// The token's user PIN when `kek` is a `pkcs11:` URI; `DQKD_PKCS11_PIN` overrides it
    /// (prefer the environment, which keeps the PIN out of files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11_pin: Option<Secret>,
}

/// Text that must not be shown: `Debug` hides it (a token PIN).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// Where the site key-encryption key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekLocation {
    /// A file of 64 hex characters, mode 0600.
    File(PathBuf),
    /// A key generated in, and never leaving, a PKCS#11 token.
    Pkcs11 {
        /// `pkcs11:token=…;object=…`.
        uri: String,
        /// The token's module (shared library).
        module: PathBuf,
        /// The token's user PIN.
        pin: Secret,
    },
}

impl std::fmt::Display for KekLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KekLocation::File(path) => write!(f, "{}", path.display()),
            KekLocation::Pkcs11 { uri, .. } => f.write_str(uri),
        }
    }
}

/// Where a site keeps its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded single-file store.
    Embedded(PathBuf),
    /// PostgreSQL, shared by the site's replicas.
    Postgres {
        /// Connection URL.
        url: String,
        /// Connections per replica.
        pool_size: usize,
        /// TLS to the database (`None`: plaintext, which the configuration allowed).
        tls: Option<PostgresTls>,
    },
}

/// TLS to PostgreSQL: required on every connection, the server verified against `ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresTls {
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    /// Client certificate chain and key (PEM), when the server asks for one.
    pub client: Option<ClientCertFiles>,
}

/// A client certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// The validated key store settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Embedded file or PostgreSQL.
    pub location: StoreLocation,
    /// The site key-encryption key.
    pub kek: KekLocation,
}

/// A problem with the configuration; each names the file or entry at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// A file is not valid TOML of the expected shape.
    #[error("{path} is not a valid {what}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// "cluster manifest" or "site file".
        what: &'static str,
        /// The parser's explanation (with line and column).
        message: String,
    },
    /// The manifest contradicts itself or the site file.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The replica name given on the command line is unusable.
    #[error("replica name {name:?}: {problem}")]
    Replica {
        /// The name given.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// A site as the running KME sees it: its KME ID and SAEs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// KME ID.
    pub kme_id: Name,
    /// ETSI API address SAEs use.
    pub api_addr: String,
    /// Peer API address other sites use (`None` only in a one-site cluster).
    pub peer_addr: Option<String>,
    /// SAE IDs of the site.
    pub saes: BTreeSet<Name>,
}

/// The validated configuration of one KME.
#[derive(Debug, Clone)]
pub struct Config {
    /// Cluster name (the identity namespace of certificates).
    pub cluster: Name,
    /// This site's KME ID.
    pub kme_id: Name,
    /// ETSI API listen address.
    pub api_listen: SocketAddr,
    /// Peer API listen address (`None` in a one-site cluster).
    pub peer_listen: Option<SocketAddr>,
    /// Prometheus listener address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Generator parameters.
    pub keygen: KeygenParams,
    /// Entropy servers, in manifest order.
    pub entropy: Vec<EntropyEntry>,
    /// How long to wait for peers and entropy servers.
    pub peer_timeout: Duration,
    /// Most keys under way per link (`[peers] max_in_flight_keys`).
    pub peer_window_keys: usize,
    /// Ready-key pools (`target == 0`: off).
    pub pools: PoolSettings,
    /// Whether masters may fetch their keys again (see [`KeyLife::master_refetch`]).
    pub master_refetch: bool,
    /// How long the master's own copy is kept (see [`KeyLife::master_refetch_secs`]).
    pub master_refetch_window: Duration,
    /// Limits from the manifest.
    pub limits: ManifestLimits,
    /// How long undelivered keys live.
    pub key_ttl: Duration,
    /// How often expired keys are shredded.
    pub purge_interval: Duration,
    /// All sites by KME ID.
    pub sites: BTreeMap<Name, Site>,
    /// Which site each SAE belongs to.
    pub sae_site: BTreeMap<Name, Name>,
    /// Certificates, with absolute paths.
    pub tls: TlsFiles,
    /// Store, with absolute paths.
    pub store: StoreConfig,
    /// Connection limits of each listener.
    pub connections: ServerLimits,
    /// This process's name among the replicas of its site (`dqkd kme --replica`), which
    /// then keeps ready-key pools of its own; `None` for a site's only process.
    pub replica: Option<Name>,
    /// Where key and pool expiry read the time: the system clock, unless a test moves it
    /// ([`Config::with_clock`]).
    pub clock: Arc<dyn Clock>,
}

impl Config {
    /// The same configuration reading the time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Reads the site file and the manifest it names, and checks them together.
    pub fn load(site_path: &Path) -> Result<Self, ConfigError> {
        let site: SiteFile = read_toml(site_path, "site file")?;
        let base = site_path.parent().unwrap_or(Path::new("."));
        let manifest_path = base.join(&site.manifest);
        let manifest: Manifest = read_toml(&manifest_path, "cluster manifest")?;
        Self::from_parts(manifest, &manifest_path, site, site_path)
    }

    /// Names this process among the replicas of its site, so that its ready-key pools are
    /// its own: replicas sharing one pool would each hand out keys another one listed.
    /// Only a shared (PostgreSQL) store has replicas.
    pub fn with_replica(mut self, name: &str) -> Result<Self, ConfigError> {
        let refuse = |problem: &str| ConfigError::Replica {
            name: name.to_owned(),
            problem: problem.to_owned(),
        };
        let replica = Name::new("replica name", name).map_err(|e| match e {
            dqkd_pki::PkiError::InvalidName { reason, .. } => refuse(reason),
            other => refuse(&other.to_string()),
        })?;
        if !matches!(self.store.location, StoreLocation::Postgres { .. }) {
            return Err(refuse(
                "only a site on PostgreSQL ([store] url) runs replicas; an embedded store has one KME process",
            ));
        }
        self.replica = Some(replica);
        Ok(self)
    }

    /// What this configuration switched off, one sentence each, for a warning at every
    /// start: `[keygen] insecure_allow_c0` in use, or short keys between sites allowed.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.keygen.c == 0 {
            out.push(
                "[keygen] c = 0 (insecure_allow_c0 = true): every entropy server learns linear \
                 information about every key; never use this in production"
                    .to_owned(),
            );
        }
        if self.sites.len() > 1 && self.limits.min_key_size < MIN_CROSS_SITE_KEY_BITS {
            out.push(format!(
                "[limits] allow_short_keys = true: keys of {} bits may be shared between sites; \
                 with c + 1 servers leaked such a key is within reach of a search",
                self.limits.min_key_size
            ));
        }
        out
    }

    /// This site's entry.
    pub fn own_site(&self) -> &Site {
        // Invariant checked in `from_parts`: kme_id names a site of the manifest.
        &self.sites[&self.kme_id]
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.to_owned(),
        cause,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        what,
        message: e.to_string(),
    })
}

mod store;
#[cfg(test)]
mod tests;
mod validate;
