//! Configuration: the cluster manifest (the same file at every site) and the site file
//! (what only this site knows: listeners, certificates, store).
//!
//! Raw TOML is parsed into the serde types [`Manifest`] and [`SiteFile`], then checked as
//! a whole into a [`Config`] that the server trusts without further checks. Every problem is
//! reported with the file and the offending entry named.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dqkd_etsi014::Limits;
use serde::{Deserialize, Serialize};

/// The cluster manifest, as written in TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Cluster name; it is part of every certificate identity (`dqkd://<cluster>/…`).
    pub cluster: String,
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
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self { timeout_ms: 5000 }
    }
}

/// Ready-key pools: keys generated ahead of demand for each pair of sites and already
/// regenerated at the peer, so `enc_keys` needs one peer round trip to name their SAEs and
/// none to the entropy servers. Pools hold keys of `limits.default_key_size`; requests for
/// other sizes, multicast requests, same-site pairs and batches of more than 64 keys are
/// served on demand, as is any request a pool cannot cover.
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
    pub id: String,
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
    pub kme_id: String,
    /// Where SAEs reach the site's ETSI API, e.g. `127.0.0.1:8443`.
    pub api_addr: String,
    /// Where other sites reach this site's peer API, e.g. `127.0.0.1:9443` (required when
    /// the cluster has more than one site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// The SAE IDs that belong to this site.
    pub saes: Vec<String>,
}

/// The site file, as written in TOML. Relative paths are relative to the file's folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    /// Path of the cluster manifest.
    pub manifest: PathBuf,
    /// Which site of the manifest this process is.
    pub kme_id: String,
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
    /// The site key-encryption key (64 hex characters), which seals keys at rest. Every
    /// replica of a site uses the same one.
    pub kek: PathBuf,
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
    /// The site key-encryption key file.
    pub kek: PathBuf,
}

/// A problem with the configuration; each names the file or entry at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
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
    pub kme_id: String,
    /// ETSI API address SAEs use.
    pub api_addr: String,
    /// Peer API address other sites use (`None` only in a one-site cluster).
    pub peer_addr: Option<String>,
    /// SAE IDs of the site.
    pub saes: BTreeSet<String>,
}

/// The validated configuration of one KME.
#[derive(Debug, Clone)]
pub struct Config {
    /// Cluster name (the identity namespace of certificates).
    pub cluster: String,
    /// This site's KME ID.
    pub kme_id: String,
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
    pub sites: BTreeMap<String, Site>,
    /// Which site each SAE belongs to.
    pub sae_site: BTreeMap<String, String>,
    /// Certificates, with absolute paths.
    pub tls: TlsFiles,
    /// Store, with absolute paths.
    pub store: StoreConfig,
    /// Connection limits of each listener.
    pub connections: ServerLimits,
    /// This process's name among the replicas of its site (`dqkd kme --replica`), which
    /// then keeps ready-key pools of its own; `None` for a site's only process.
    pub replica: Option<String>,
}

impl Config {
    /// Reads the site file and the manifest it names, and checks them together.
    pub fn load(site_path: &Path) -> Result<Self, ConfigError> {
        let site: SiteFile = read_toml(site_path, "site file")?;
        let base = site_path.parent().unwrap_or(Path::new("."));
        let manifest_path = base.join(&site.manifest);
        let manifest: Manifest = read_toml(&manifest_path, "cluster manifest")?;
        Self::from_parts(manifest, &manifest_path, site, site_path)
    }

    /// Checks a manifest and a site file together; paths in the site file are relative to
    /// `site_path`'s folder.
    pub fn from_parts(
        manifest: Manifest,
        manifest_path: &Path,
        site: SiteFile,
        site_path: &Path,
    ) -> Result<Self, ConfigError> {
        let base = site_path.parent().unwrap_or(Path::new("."));
        let invalid = |problem: String| ConfigError::Invalid {
            path: manifest_path.to_owned(),
            problem,
        };
        if !valid_name(&manifest.cluster) {
            return Err(invalid(format!(
                "cluster name {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                manifest.cluster
            )));
        }
        check_limits(&manifest.limits).map_err(invalid)?;
        if manifest.keys.ttl_secs == 0
            || manifest.keys.purge_interval_secs == 0
            || manifest.keys.master_refetch_secs == 0
        {
            return Err(invalid(
                "keys.ttl_secs, keys.purge_interval_secs and keys.master_refetch_secs must be at least 1"
                    .into(),
            ));
        }
        if manifest.sites.is_empty() {
            return Err(invalid("the manifest lists no [[sites]]".into()));
        }
        let mut sites = BTreeMap::new();
        let mut sae_site = BTreeMap::new();
        for entry in &manifest.sites {
            if !valid_name(&entry.kme_id) {
                return Err(invalid(format!(
                    "KME ID {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                    entry.kme_id
                )));
            }
            if sites.contains_key(&entry.kme_id) {
                return Err(invalid(format!("site {:?} is listed twice", entry.kme_id)));
            }
            let mut saes = BTreeSet::new();
            for sae in &entry.saes {
                if !valid_name(sae) {
                    return Err(invalid(format!(
                        "SAE ID {sae:?} of site {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                        entry.kme_id
                    )));
                }
                if let Some(other) = sae_site.insert(sae.clone(), entry.kme_id.clone()) {
                    return Err(invalid(format!(
                        "SAE {sae:?} is listed under both site {other:?} and site {:?}",
                        entry.kme_id
                    )));
                }
                saes.insert(sae.clone());
            }
            sites.insert(
                entry.kme_id.clone(),
                Site {
                    kme_id: entry.kme_id.clone(),
                    api_addr: entry.api_addr.clone(),
                    peer_addr: entry.peer_addr.clone(),
                    saes,
                },
            );
        }
        // A path segment may name an SAE or a KME: the two namespaces must not overlap.
        if let Some(clash) = sites.keys().find(|id| sae_site.contains_key(*id)) {
            return Err(invalid(format!(
                "{clash:?} is both a KME ID and an SAE ID; IDs must be unique in the cluster"
            )));
        }
        if !sites.contains_key(&site.kme_id) {
            return Err(invalid(format!(
                "this site's kme_id {:?} is not one of the manifest's sites ({})",
                site.kme_id,
                sites.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if sites.len() > 1 {
            if let Some(site) = sites.values().find(|s| s.peer_addr.is_none()) {
                return Err(invalid(format!(
                    "site {:?} has no peer_addr; every site of a multi-site cluster needs one",
                    site.kme_id
                )));
            }
            if site.peer_listen.is_none() {
                return Err(ConfigError::Invalid {
                    path: site_path.to_owned(),
                    problem: format!(
                        "site {:?} is part of a {}-site cluster and needs peer_listen",
                        site.kme_id,
                        sites.len()
                    ),
                });
            }
        }
        let mut entropy_ids = BTreeSet::new();
        for server in &manifest.entropy {
            if !valid_name(&server.id) || !entropy_ids.insert(server.id.as_str()) {
                return Err(invalid(format!(
                    "entropy server ID {:?} must be unique and 1-64 characters of A-Z a-z 0-9 . _ -",
                    server.id
                )));
            }
        }
        check_keygen(&manifest.keygen).map_err(invalid)?;
        let n = manifest.keygen.n;
        if sites.len() > 1 {
            check_cross_site_sizes(&manifest.limits).map_err(invalid)?;
        }
        if !manifest.entropy.is_empty() && manifest.entropy.len() < usize::from(n) {
            return Err(invalid(format!(
                "keygen.n = {n} but the manifest lists only {} entropy servers",
                manifest.entropy.len()
            )));
        }
        if manifest.peers.timeout_ms == 0 {
            return Err(invalid("peers.timeout_ms must be at least 1".into()));
        }
        check_pools(&manifest.pools, manifest.entropy.is_empty()).map_err(invalid)?;
        site.connections
            .check()
            .map_err(|problem| ConfigError::Invalid {
                path: site_path.to_owned(),
                problem,
            })?;
        let abs = |p: &Path| base.join(p);
        Ok(Self {
            cluster: manifest.cluster,
            kme_id: site.kme_id,
            api_listen: site.api_listen,
            peer_listen: site.peer_listen,
            metrics_listen: site.metrics_listen,
            keygen: manifest.keygen,
            entropy: manifest.entropy,
            peer_timeout: Duration::from_millis(manifest.peers.timeout_ms),
            pools: manifest.pools,
            master_refetch: manifest.keys.master_refetch,
            master_refetch_window: Duration::from_secs(
                manifest
                    .keys
                    .master_refetch_secs
                    .min(manifest.keys.ttl_secs),
            ),
            limits: manifest.limits,
            key_ttl: Duration::from_secs(manifest.keys.ttl_secs),
            purge_interval: Duration::from_secs(manifest.keys.purge_interval_secs),
            sites,
            sae_site,
            tls: site.tls.relative_to(base),
            store: StoreConfig {
                location: store_location(&site.store, base, site_path)?,
                kek: abs(&site.store.kek),
            },
            connections: site.connections,
            replica: None,
        })
    }

    /// Names this process among the replicas of its site, so that its ready-key pools are
    /// its own: replicas sharing one pool would each hand out keys another one listed.
    /// Only a shared (PostgreSQL) store has replicas.
    pub fn with_replica(mut self, name: &str) -> Result<Self, ConfigError> {
        let refuse = |problem: &str| ConfigError::Replica {
            name: name.to_owned(),
            problem: problem.to_owned(),
        };
        if !valid_name(name) {
            return Err(refuse("must be 1-64 characters of A-Z a-z 0-9 . _ -"));
        }
        if !matches!(self.store.location, StoreLocation::Postgres { .. }) {
            return Err(refuse(
                "only a site on PostgreSQL ([store] url) runs replicas; an embedded store has one KME process",
            ));
        }
        self.replica = Some(name.to_owned());
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

/// Pools need entropy servers (only they make keys another site can regenerate), a low-water
/// mark under the target, and a batch the peer message can carry.
fn check_pools(pools: &PoolSettings, no_entropy: bool) -> Result<(), String> {
    if pools.target == 0 {
        return Ok(());
    }
    if no_entropy {
        return Err(
            "pools.target is set but the manifest lists no [[entropy]] servers; ready keys for \
             other sites need them"
                .into(),
        );
    }
    if pools.low_water >= pools.target {
        return Err(format!(
            "pools.low_water ({}) must be below pools.target ({})",
            pools.low_water, pools.target
        ));
    }
    if pools.batch == 0 || pools.batch > MAX_POOL_BATCH {
        return Err(format!(
            "pools.batch must be 1 to {MAX_POOL_BATCH}; got {}",
            pools.batch
        ));
    }
    if pools.ttl_secs < 60 {
        return Err(format!(
            "pools.ttl_secs must be at least 60; got {}",
            pools.ttl_secs
        ));
    }
    Ok(())
}

/// Exactly one of `path` and `url`; `DQKD_STORE_URL` overrides the URL.
fn store_location(
    store: &StoreFiles,
    base: &Path,
    site_path: &Path,
) -> Result<StoreLocation, ConfigError> {
    let invalid = |problem: &str| ConfigError::Invalid {
        path: site_path.to_owned(),
        problem: problem.to_owned(),
    };
    let url = std::env::var("DQKD_STORE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| store.url.clone());
    match (&store.path, url) {
        (Some(path), None) => {
            if store.ca.is_some()
                || store.cert.is_some()
                || store.key.is_some()
                || store.insecure_allow_plaintext
            {
                return Err(invalid(
                    "[store] ca, cert, key and insecure_allow_plaintext apply to PostgreSQL \
                     (url) only, not to the embedded store (path)",
                ));
            }
            Ok(StoreLocation::Embedded(base.join(path)))
        }
        (None, Some(url)) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(invalid("[store] url must be a postgres:// URL"));
            }
            let pool_size = store.pool_size.unwrap_or(16);
            if pool_size == 0 {
                return Err(invalid("[store] pool_size must be at least 1"));
            }
            let tls = postgres_tls(store, &url, base).map_err(|p| invalid(&p))?;
            Ok(StoreLocation::Postgres {
                url,
                pool_size,
                tls,
            })
        }
        (Some(_), Some(_)) => Err(invalid(
            "[store] names both path and url (or DQKD_STORE_URL is set): choose one store",
        )),
        (None, None) => Err(invalid(
            "[store] needs path (embedded store) or url (PostgreSQL)",
        )),
    }
}

/// TLS to PostgreSQL from `[store] ca`, `cert` and `key`, checked against what `url` says:
/// with `ca`, TLS is required (an `sslmode` allowing plaintext, or a Unix socket, contradicts
/// it); without, the connection is plaintext, which a host other than loopback gets only with
/// `insecure_allow_plaintext`.
fn postgres_tls(store: &StoreFiles, url: &str, base: &Path) -> Result<Option<PostgresTls>, String> {
    let facts = dqkd_store_postgres::url_transport(url)
        .map_err(|e| format!("[store] url (or DQKD_STORE_URL): {e}"))?;
    let client = match (&store.cert, &store.key) {
        (Some(cert), Some(key)) => Some(ClientCertFiles {
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None) => None,
        _ => {
            return Err(
                "[store] cert and key (the client certificate for PostgreSQL) go \
                        together: give both or neither"
                    .into(),
            )
        }
    };
    let Some(ca) = &store.ca else {
        if client.is_some() {
            return Err(
                "[store] cert and key need [store] ca: a client certificate is sent only over \
                 TLS, and TLS needs the CA that signed the server's certificate"
                    .into(),
            );
        }
        if facts.ssl_mode == Some(dqkd_store_postgres::WrittenSslMode::Require) {
            return Err(
                "[store] url asks for sslmode=require but [store] ca is not set: dqkd verifies \
                 the database server's certificate (chain and host name), so name the CA that \
                 signed it in [store] ca"
                    .into(),
            );
        }
        if let Some(host) = facts.remote_host {
            if !store.insecure_allow_plaintext {
                return Err(format!(
                    "[store] url connects to {host} in plaintext: set [store] ca to the CA that \
                     signed the database server's certificate (TLS), or \
                     insecure_allow_plaintext = true to accept an unencrypted connection on a \
                     trusted network"
                ));
            }
        }
        return Ok(None);
    };
    if store.insecure_allow_plaintext {
        return Err(
            "[store] insecure_allow_plaintext contradicts [store] ca: with a CA the connection \
             is always TLS; remove one of them"
                .into(),
        );
    }
    if facts.unix_socket {
        return Err(
            "[store] ca is set but the url connects through a Unix socket, which PostgreSQL \
             never encrypts: connect to a TCP host, or remove ca"
                .into(),
        );
    }
    if let Some(
        mode @ (dqkd_store_postgres::WrittenSslMode::Disable
        | dqkd_store_postgres::WrittenSslMode::Prefer),
    ) = facts.ssl_mode
    {
        return Err(format!(
            "[store] url has sslmode={}, which contradicts [store] ca (with a CA the connection \
             is TLS, required and verified): remove sslmode from the url or write \
             sslmode=require",
            mode.as_str()
        ));
    }
    Ok(Some(PostgresTls {
        ca: base.join(ca),
        client,
    }))
}

/// `n ≥ 2` always; `1 ≤ c` unless `insecure_allow_c0`; and a Cauchy matrix that fits
/// GF(2^8) (`c < n`, `2n − c ≤ 256`).
fn check_keygen(k: &KeygenParams) -> Result<(), String> {
    let KeygenParams {
        n,
        c,
        insecure_allow_c0,
    } = *k;
    if n < 2 {
        return Err(format!(
            "[keygen] n = {n}: at least 2 entropy servers per key are needed (with one, the \
             key is that server's block)"
        ));
    }
    if c >= n || 2 * usize::from(n) - usize::from(c) > 256 {
        return Err(format!(
            "[keygen] needs c < n and 2n - c <= 256; got n = {n}, c = {c}"
        ));
    }
    if c == 0 && !insecure_allow_c0 {
        return Err(
            "[keygen] c = 0: every entropy server would learn linear information about every \
             key; use c >= 1 (or, never in production, [keygen] insecure_allow_c0 = true)"
                .into(),
        );
    }
    Ok(())
}

/// Keys shared between sites are at least [`MIN_CROSS_SITE_KEY_BITS`] bits unless the
/// manifest says `[limits] allow_short_keys = true`.
fn check_cross_site_sizes(l: &ManifestLimits) -> Result<(), String> {
    if l.min_key_size < MIN_CROSS_SITE_KEY_BITS && !l.allow_short_keys {
        return Err(format!(
            "[limits] min_key_size = {} bits: keys shared between sites must be at least \
             {MIN_CROSS_SITE_KEY_BITS} bits (with c + 1 entropy servers leaked a shorter key is \
             within reach of a search); raise it, or set [limits] allow_short_keys = true",
            l.min_key_size
        ));
    }
    Ok(())
}

fn check_limits(l: &ManifestLimits) -> Result<(), String> {
    if l.min_key_size == 0 || !l.min_key_size.is_multiple_of(8) || !l.max_key_size.is_multiple_of(8)
    {
        return Err(
            "limits.min_key_size and limits.max_key_size must be positive multiples of 8".into(),
        );
    }
    if l.min_key_size > l.max_key_size {
        return Err("limits.min_key_size is larger than limits.max_key_size".into());
    }
    if !l.default_key_size.is_multiple_of(8)
        || l.default_key_size < l.min_key_size
        || l.default_key_size > l.max_key_size
    {
        return Err(
            "limits.default_key_size must be a multiple of 8 within [min_key_size, max_key_size]"
                .into(),
        );
    }
    if l.max_key_per_request == 0 || l.max_key_count == 0 {
        return Err(
            "limits.max_key_per_request and limits.max_key_count must be at least 1".into(),
        );
    }
    if u64::from(l.max_key_per_request) > l.max_key_count {
        return Err("limits.max_key_per_request cannot exceed limits.max_key_count".into());
    }
    // 1 MiB keys at most: a response must stay far below the body limits of clients.
    if l.max_key_size > 8 * 1024 * 1024 {
        return Err("limits.max_key_size may be at most 8388608 bits (1 MiB)".into());
    }
    Ok(())
}

/// Names that appear in certificates, URLs and file names: a conservative alphabet.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn read_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        what,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(sites: &str) -> Manifest {
        toml::from_str(&format!("cluster = \"c1\"\n{sites}")).expect("manifest parses")
    }

    fn site(kme_id: &str) -> SiteFile {
        SiteFile {
            manifest: "cluster.toml".into(),
            kme_id: kme_id.into(),
            api_listen: "127.0.0.1:0".parse().expect("addr"),
            peer_listen: Some("127.0.0.1:0".parse().expect("addr")),
            metrics_listen: None,
            tls: TlsFiles {
                ca: "ca.pem".into(),
                cert: "kme.pem".into(),
                key: "kme.key".into(),
                crl: None,
                key_exchange: None,
                peer_key_exchange: None,
            },
            store: StoreFiles {
                path: Some("store.redb".into()),
                url: None,
                pool_size: None,
                ca: None,
                cert: None,
                key: None,
                insecure_allow_plaintext: false,
                kek: "kek".into(),
            },
            connections: ServerLimits::default(),
        }
    }

    fn check(sites: &str, kme: &str) -> Result<Config, ConfigError> {
        Config::from_parts(
            manifest(sites),
            Path::new("cluster.toml"),
            site(kme),
            Path::new("/etc/dqkd/site.toml"),
        )
    }

    const TWO_SITES: &str = r#"
[[sites]]
kme_id = "A"
api_addr = "127.0.0.1:1"
peer_addr = "127.0.0.1:3"
saes = ["alice", "carol"]
[[sites]]
kme_id = "B"
api_addr = "127.0.0.1:2"
peer_addr = "127.0.0.1:4"
saes = ["bob"]
"#;

    #[test]
    fn a_consistent_manifest_loads() {
        let config = check(TWO_SITES, "A").expect("valid");
        assert_eq!(config.own_site().saes.len(), 2);
        assert_eq!(config.sae_site["bob"], "B");
        assert_eq!(config.tls.ca, Path::new("/etc/dqkd/ca.pem"));
        assert_eq!(config.limits, ManifestLimits::default());
    }

    #[test]
    fn inconsistencies_are_named() {
        let err = check(TWO_SITES, "C").expect_err("unknown site");
        assert!(err.to_string().contains("\"C\" is not one of"), "{err}");

        let dup_sae = TWO_SITES.replace("[\"bob\"]", "[\"alice\"]");
        let err = check(&dup_sae, "A").expect_err("SAE twice");
        assert!(
            err.to_string().contains("\"alice\" is listed under both"),
            "{err}"
        );

        let clash = TWO_SITES.replace("[\"bob\"]", "[\"A\"]");
        let err = check(&clash, "A").expect_err("KME/SAE clash");
        assert!(
            err.to_string().contains("both a KME ID and an SAE ID"),
            "{err}"
        );

        let bad_name = TWO_SITES.replace("\"bob\"", "\"b o b\"");
        assert!(check(&bad_name, "A").is_err());
    }

    #[test]
    fn limits_must_make_sense() {
        let mut m = manifest(TWO_SITES);
        m.limits.min_key_size = 12;
        let err = Config::from_parts(m, Path::new("m.toml"), site("A"), Path::new("site.toml"))
            .expect_err("bad limits");
        assert!(err.to_string().contains("multiples of 8"), "{err}");

        let mut m = manifest(TWO_SITES);
        m.limits.default_key_size = 16;
        assert!(
            Config::from_parts(m, Path::new("m.toml"), site("A"), Path::new("site.toml")).is_err()
        );
    }

    #[test]
    fn multi_site_and_keygen_settings_are_checked() {
        let no_peer = TWO_SITES.replace("peer_addr = \"127.0.0.1:4\"\n", "");
        let err = check(&no_peer, "A").expect_err("missing peer_addr");
        assert!(err.to_string().contains("\"B\" has no peer_addr"), "{err}");

        let mut lonely = site("A");
        lonely.peer_listen = None;
        let err = Config::from_parts(
            manifest(TWO_SITES),
            Path::new("m.toml"),
            lonely,
            Path::new("site.toml"),
        )
        .expect_err("missing peer_listen");
        assert!(err.to_string().contains("needs peer_listen"), "{err}");

        let few = format!("{TWO_SITES}\n[[entropy]]\nid = \"E1\"\naddr = \"127.0.0.1:5\"\n");
        let err = check(&few, "A").expect_err("n > servers");
        assert!(err.to_string().contains("only 1 entropy servers"), "{err}");

        let bad_c = format!("[keygen]\nn = 2\nc = 2\n{TWO_SITES}");
        assert!(check(&bad_c, "A").is_err());
    }

    #[test]
    fn parameters_that_void_the_claim_are_refused() {
        let with = |keygen: &str| format!("[keygen]\n{keygen}\n{TWO_SITES}");
        for (keygen, needle) in [
            ("n = 1\nc = 0", "[keygen] n = 1: at least 2"),
            (
                "n = 1\nc = 0\ninsecure_allow_c0 = true",
                "[keygen] n = 1: at least 2",
            ),
            ("n = 0\nc = 0", "[keygen] n = 0: at least 2"),
            ("n = 3\nc = 0", "[keygen] c = 0"),
            ("n = 2\nc = 0", "insecure_allow_c0 = true"),
            ("n = 3\nc = 3", "c < n"),
        ] {
            let err = check(&with(keygen), "A").expect_err(keygen);
            let text = err.to_string();
            assert!(text.starts_with("cluster.toml: "), "names the file: {text}");
            assert!(text.contains(needle), "{keygen}: {text}");
        }
        let config = check(&with("n = 3\nc = 0\ninsecure_allow_c0 = true"), "A")
            .expect("c = 0 with the switch");
        assert_eq!(config.keygen.c, 0);
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("insecure_allow_c0"), "{warnings:?}");
        // The switch alone, with c >= 1, weakens nothing and warns about nothing.
        let config = check(&with("n = 3\nc = 1\ninsecure_allow_c0 = true"), "A").expect("valid");
        assert!(config.warnings().is_empty());
        assert!(check(TWO_SITES, "A").expect("valid").warnings().is_empty());
    }

    #[test]
    fn short_keys_between_sites_need_the_switch() {
        assert_eq!(ManifestLimits::default().min_key_size, 128);
        let with = |limits: &str, sites: &str| format!("[limits]\n{limits}\n{sites}");
        let err = check(&with("min_key_size = 64", TWO_SITES), "A").expect_err("64 bits");
        let text = err.to_string();
        assert!(text.starts_with("cluster.toml: "), "{text}");
        assert!(
            text.contains("[limits] min_key_size = 64 bits") && text.contains("allow_short_keys"),
            "{text}"
        );
        assert!(check(&with("min_key_size = 120", TWO_SITES), "A").is_err());
        let config = check(&with("min_key_size = 128", TWO_SITES), "A").expect("128 bits");
        assert!(config.warnings().is_empty());

        let config = check(
            &with("min_key_size = 64\nallow_short_keys = true", TWO_SITES),
            "A",
        )
        .expect("allowed");
        assert_eq!(config.limits.min_key_size, 64);
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("allow_short_keys"), "{warnings:?}");

        // One site shares no key with another site: short keys need no switch there.
        let one_site =
            "[[sites]]\nkme_id = \"A\"\napi_addr = \"127.0.0.1:1\"\nsaes = [\"alice\"]\n";
        let config = check(&with("min_key_size = 64", one_site), "A").expect("one site");
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn only_a_site_on_postgres_names_its_replicas() {
        let embedded = check(TWO_SITES, "A").expect("valid");
        assert_eq!(embedded.replica, None);
        let err = embedded.with_replica("r1").expect_err("embedded store");
        assert!(
            err.to_string().contains("only a site on PostgreSQL"),
            "{err}"
        );

        let mut shared = site("A");
        shared.store.path = None;
        shared.store.url = Some("postgres://db.internal/dqkd".into());
        shared.store.insecure_allow_plaintext = true;
        let on_postgres = || {
            Config::from_parts(
                manifest(TWO_SITES),
                Path::new("m.toml"),
                shared.clone(),
                Path::new("site.toml"),
            )
            .expect("valid")
        };
        let named = on_postgres().with_replica("kme-a.2").expect("valid name");
        assert_eq!(named.replica.as_deref(), Some("kme-a.2"));
        for bad in ["", "r 1", "r1@a", &"r".repeat(65)] {
            let err = on_postgres().with_replica(bad).expect_err(bad);
            assert!(err.to_string().contains("1-64 characters"), "{err}");
        }
    }

    #[test]
    fn pool_settings_are_checked() {
        let entropy = "[[entropy]]\nid = \"E1\"\naddr = \"127.0.0.1:5\"\n\
                       [[entropy]]\nid = \"E2\"\naddr = \"127.0.0.1:6\"\n\
                       [[entropy]]\nid = \"E3\"\naddr = \"127.0.0.1:7\"\n";
        let with = |pools: &str, entropy: &str| format!("[pools]\n{pools}\n{entropy}{TWO_SITES}");
        let config = check(&with("target = 1000\nlow_water = 500", entropy), "A").expect("valid");
        assert_eq!(config.pools.target, 1000);
        assert_eq!(config.pools.batch, PoolSettings::default().batch);
        assert_eq!(check(TWO_SITES, "A").expect("valid").pools.target, 0);

        for (pools, entropy, needle) in [
            ("target = 1000", "", "no [[entropy]] servers"),
            (
                "target = 1000\nlow_water = 1000",
                entropy,
                "must be below pools.target",
            ),
            (
                "target = 10\nbatch = 0",
                entropy,
                "pools.batch must be 1 to",
            ),
            (
                "target = 10\nbatch = 70000",
                entropy,
                "pools.batch must be 1 to",
            ),
            ("target = 10\nttl_secs = 5", entropy, "at least 60"),
        ] {
            let err = check(&with(pools, entropy), "A").expect_err(pools);
            assert!(err.to_string().contains(needle), "{pools}: {err}");
        }
    }

    #[test]
    fn the_store_is_a_file_or_a_postgres_url() {
        let files = |path: Option<&str>, url: Option<&str>| StoreFiles {
            path: path.map(Into::into),
            url: url.map(Into::into),
            pool_size: None,
            ca: None,
            cert: None,
            key: None,
            insecure_allow_plaintext: false,
            kek: "kek".into(),
        };
        let base = Path::new("/srv");
        let site = Path::new("/srv/site.toml");
        if std::env::var_os("DQKD_STORE_URL").is_none() {
            assert_eq!(
                store_location(&files(Some("k.redb"), None), base, site).expect("file"),
                StoreLocation::Embedded("/srv/k.redb".into())
            );
            assert!(store_location(&files(None, None), base, site).is_err());
            assert!(store_location(&files(None, Some("mysql://x")), base, site).is_err());
        }
        assert_eq!(
            store_location(&files(None, Some("postgres://u@localhost/db")), base, site)
                .expect("pg"),
            StoreLocation::Postgres {
                url: std::env::var("DQKD_STORE_URL")
                    .unwrap_or_else(|_| "postgres://u@localhost/db".into()),
                pool_size: 16,
                tls: None,
            }
        );
        let err = store_location(
            &files(Some("k.redb"), Some("postgres://u@h/db")),
            base,
            site,
        )
        .expect_err("both");
        assert!(err.to_string().contains("choose one store"), "{err}");
    }

    /// `[store]` as written, for the PostgreSQL transport checks.
    fn postgres_store(url: &str, extra: &str) -> StoreFiles {
        toml::from_str(&format!("url = {url:?}\nkek = \"kek\"\n{extra}")).expect("[store]")
    }

    #[test]
    fn plaintext_to_a_remote_database_needs_the_insecure_switch() {
        if std::env::var_os("DQKD_STORE_URL").is_some() {
            return;
        }
        let (base, site) = (Path::new("/srv"), Path::new("/srv/site.toml"));
        let check =
            |url: &str, extra: &str| store_location(&postgres_store(url, extra), base, site);
        for remote in [
            "postgres://dqkd@db.example.net/kme_a",
            "postgres://dqkd@10.0.0.5:5432/kme_a",
            "postgres://dqkd@localhost/kme_a?hostaddr=10.0.0.5",
        ] {
            let err = check(remote, "").expect_err(remote);
            let text = err.to_string();
            assert!(text.contains("/srv/site.toml"), "{text}");
            assert!(text.contains("in plaintext"), "{text}");
            assert!(text.contains("[store] ca"), "{text}");
            assert!(text.contains("insecure_allow_plaintext"), "{text}");
            let allowed = check(remote, "insecure_allow_plaintext = true").expect(remote);
            assert!(
                matches!(allowed, StoreLocation::Postgres { tls: None, .. }),
                "{allowed:?}"
            );
        }
        for local in [
            "postgres://dqkd@127.0.0.1/kme_a",
            "postgres://dqkd@127.0.0.53:5433/kme_a",
            "postgres://dqkd@localhost/kme_a",
            "postgres://dqkd@[::1]/kme_a",
            "postgres://dqkd@localhost/kme_a?host=/run/postgresql",
        ] {
            let ok = check(local, "").expect(local);
            assert!(
                matches!(ok, StoreLocation::Postgres { tls: None, .. }),
                "{ok:?}"
            );
        }
    }

    #[test]
    fn a_ca_makes_postgres_tls_and_contradictions_are_refused() {
        if std::env::var_os("DQKD_STORE_URL").is_some() {
            return;
        }
        let (base, site) = (Path::new("/srv"), Path::new("/srv/site.toml"));
        let check =
            |url: &str, extra: &str| store_location(&postgres_store(url, extra), base, site);
        let remote = "postgres://dqkd@db.example.net/kme_a";
        assert_eq!(
            check(remote, "ca = \"pki/db-ca.pem\"").expect("tls"),
            StoreLocation::Postgres {
                url: remote.into(),
                pool_size: 16,
                tls: Some(PostgresTls {
                    ca: "/srv/pki/db-ca.pem".into(),
                    client: None,
                }),
            }
        );
        let with_client = check(
            &format!("{remote}?sslmode=require"),
            "ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"",
        )
        .expect("client certificate");
        assert!(
            matches!(&with_client, StoreLocation::Postgres { tls: Some(PostgresTls {
                client: Some(ClientCertFiles { cert, key }), .. }), .. }
                if cert == Path::new("/srv/c.pem") && key == Path::new("/srv/c.key")),
            "{with_client:?}"
        );
        for (url, extra, needle) in [
            (
                format!("{remote}?sslmode=disable"),
                "ca = \"ca.pem\"",
                "sslmode=disable, which contradicts [store] ca",
            ),
            (
                format!("{remote}?sslmode=prefer"),
                "ca = \"ca.pem\"",
                "sslmode=prefer, which contradicts [store] ca",
            ),
            (
                "postgres://dqkd@127.0.0.1/kme_a?sslmode=require".into(),
                "",
                "sslmode=require but [store] ca is not set",
            ),
            (
                format!("{remote}?sslmode=verify-full"),
                "ca = \"ca.pem\"",
                "write sslmode=require",
            ),
            (
                remote.into(),
                "ca = \"ca.pem\"\ninsecure_allow_plaintext = true",
                "insecure_allow_plaintext contradicts [store] ca",
            ),
            (
                "postgres://dqkd@localhost/kme_a?host=/run/postgresql".into(),
                "ca = \"ca.pem\"",
                "Unix socket",
            ),
            (
                remote.into(),
                "ca = \"ca.pem\"\ncert = \"c.pem\"",
                "give both or neither",
            ),
            (
                "postgres://dqkd@127.0.0.1/kme_a".into(),
                "cert = \"c.pem\"\nkey = \"c.key\"",
                "need [store] ca",
            ),
        ] {
            let err = check(&url, extra).expect_err(&url);
            let text = err.to_string();
            assert!(text.contains(needle), "{url} {extra}: {text}");
            assert!(text.contains("/srv/site.toml"), "{text}");
        }
        let embedded: StoreFiles =
            toml::from_str("path = \"k.redb\"\nkek = \"kek\"\nca = \"ca.pem\"").expect("[store]");
        let err = store_location(&embedded, base, site).expect_err("ca on a file");
        assert!(err.to_string().contains("PostgreSQL (url) only"), "{err}");
    }

    #[test]
    fn connection_limits_default_and_zero_is_refused() {
        let config = check(TWO_SITES, "A").expect("valid");
        assert_eq!(config.connections, ServerLimits::default());
        let mut file = site("A");
        file.connections.idle_timeout_ms = 0;
        let err = Config::from_parts(
            manifest(TWO_SITES),
            Path::new("cluster.toml"),
            file,
            Path::new("/etc/dqkd/site.toml"),
        )
        .expect_err("zero");
        let text = err.to_string();
        assert!(
            text.contains("/etc/dqkd/site.toml") && text.contains("connections.idle_timeout_ms"),
            "{text}"
        );
        let parsed: SiteFile = toml::from_str(
            "manifest = \"c.toml\"\nkme_id = \"A\"\napi_listen = \"127.0.0.1:0\"\n\
             [tls]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n[store]\npath = \"s\"\nkek = \"k\"\n\
             [connections]\nmax_connections = 64\n",
        )
        .expect("parses");
        assert_eq!(parsed.connections.max_connections, 64);
        assert_eq!(parsed.connections.idle_timeout_ms, 60_000);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<Manifest>("cluster = \"c\"\nsites = []\ncolour = 1")
            .expect_err("unknown field");
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
