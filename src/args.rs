//! Command-line arguments. Only parsing and shape checks live here; the commands turn
//! them into library calls.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// dqkd: Digital Quantum Key Distribution — ETSI GS QKD 014 key management entities.
#[derive(Debug, Parser)]
#[command(name = "dqkd", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "DQKD_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make the cluster CA, certificates and key-encryption keys.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Run a site's KME (the ETSI 014 API) from a site file.
    Kme(KmeArgs),
    /// Run an entropy server (random pools for KMEs) from its config file.
    Entropy(EntropyArgs),
    /// Call a KME's ETSI 014 API as an SAE and print the JSON it answers.
    Keys(KeysArgs),
    /// Run a local cluster in the foreground, making certificates and config as needed.
    Up(UpArgs),
    /// Run the Alice→Bob flow against a cluster that `dqkd up` is running.
    Demo(DemoArgs),
    /// Start a local cluster and measure it under load over real mutual TLS.
    Bench(BenchArgs),
    /// Check a site file (its manifest, certificates, KEK and store) or an entropy server's
    /// file without starting anything; one line per problem, exit 1 if any.
    Check(CheckArgs),
    /// Print a shell completion script for dqkd.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print dqkd's manual page (roff), or write one page per command into a folder.
    Man {
        /// Folder for `dqkd.1` and one `dqkd-<command>.1` per command.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show sites at a glance (peers, pools, entropy servers, certificates, errors) from
    /// their status endpoints on the metrics listeners.
    Status(StatusArgs),
    /// Rotate a WireGuard (or any) preshared key from the cluster: run one of these at each end.
    // Boxed: the largest arguments by far, kept out of every other variant's size.
    Psk(Box<PskArgs>),
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the cluster CA (`ca.pem`, `ca.key`) in a folder.
    Init {
        /// Cluster name; it is part of every identity (`dqkd://<cluster>/…`).
        #[arg(long)]
        cluster: String,
        /// Folder for the CA files.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the cluster CA: `.pem`, `.key`, `.combined.pem`, `.p12`.
    Issue {
        /// What the certificate is for.
        #[arg(value_enum)]
        role: RoleArg,
        /// The KME ID, SAE ID or entropy server ID (for `server`: a file name).
        id: String,
        /// Folder holding `ca.pem` and `ca.key`.
        #[arg(long)]
        ca: PathBuf,
        /// Output folder (default: `<ca>/<role>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// DNS name the server answers on (repeatable; default localhost for KMEs and entropy
        /// servers; `server` needs at least one --dns or --ip).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// IP address the server answers on (repeatable; default 127.0.0.1 and ::1). An SAE
        /// issued with --dns or --ip may also serve on them (the `dqkd psk` responder).
        #[arg(long = "ip")]
        ip_addresses: Vec<IpAddr>,
        /// Password of the `.p12` bundle (default empty, as `curl --cert x.p12` expects).
        #[arg(long, default_value = "")]
        password: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate this CA issued: record it and rewrite `<ca>/ca.crl.pem`, which
    /// servers with `[tls] crl` re-read within seconds.
    Revoke {
        /// The certificate file (`.pem`; its first certificate is revoked).
        cert: PathBuf,
        /// Folder holding `ca.pem` and `ca.key`.
        #[arg(long)]
        ca: PathBuf,
    },
    /// Write `<ca>/ca.crl.pem` again, signed now, with what is revoked (nothing at first), so
    /// servers can be pointed at it before anything is revoked.
    Crl {
        /// Folder holding `ca.pem` and `ca.key`.
        #[arg(long)]
        ca: PathBuf,
    },
    /// Issue a certificate again with the same identity and names (a new key, a new
    /// validity), replacing its files; restart the server that uses it.
    Renew {
        /// The certificate file (`.pem`) to renew; this CA must have issued it.
        cert: PathBuf,
        /// Folder holding `ca.pem` and `ca.key`.
        #[arg(long)]
        ca: PathBuf,
        /// Password of the new `.p12` bundle.
        #[arg(long, default_value = "")]
        password: String,
        /// Validity of the new certificate in days (capped at the CA's own expiry).
        #[arg(long, default_value_t = dqkd_pki::DEFAULT_VALIDITY_DAYS)]
        days: u32,
    },
    /// Create a site key-encryption key file (seals keys at rest).
    Kek {
        /// The file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file (keys sealed under the old one become unreadable).
        #[arg(long)]
        force: bool,
    },
}

/// Certificate roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// A site's KME.
    Kme,
    /// An application (SAE).
    Sae,
    /// An entropy server.
    Entropy,
    /// A TLS server outside the cluster's identities (the sites' PostgreSQL): DNS and IP
    /// names only, no dqkd identity, server authentication only; writes `.pem` and `.key`.
    Server,
}

#[derive(Debug, Args)]
pub struct KmeArgs {
    /// The site file (TOML); it names the cluster manifest.
    #[arg(long, env = "DQKD_CONFIG")]
    pub config: PathBuf,
    /// This process's name among the replicas of a site on PostgreSQL (unique per site and
    /// kept across restarts): each replica then keeps ready-key pools of its own.
    #[arg(long, env = "DQKD_REPLICA")]
    pub replica: Option<String>,
    /// Write `{"api_addr": …}` here once the API accepts connections.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The site file (TOML) of a KME, which names the cluster manifest, or an entropy
    /// server's file.
    #[arg(long, env = "DQKD_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct EntropyArgs {
    /// The entropy server's config file (TOML).
    #[arg(long, env = "DQKD_ENTROPY_CONFIG")]
    pub config: PathBuf,
    /// Write `{"api_addr": …}` here once the API accepts connections.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The KME's ETSI API, e.g. https://127.0.0.1:8443
    #[arg(long, env = "DQKD_KME_URL")]
    pub kme: String,
    /// The cluster CA certificate.
    #[arg(long, env = "DQKD_CA")]
    pub ca: PathBuf,
    /// This SAE's certificate chain (PEM); with --key.
    #[arg(long, env = "DQKD_CERT", requires = "key", conflicts_with = "identity")]
    pub cert: Option<PathBuf>,
    /// This SAE's private key (PEM); with --cert.
    #[arg(long, env = "DQKD_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// This SAE's key and chain in one PEM file (`<id>.combined.pem`).
    #[arg(long, env = "DQKD_IDENTITY")]
    pub identity: Option<PathBuf>,
    #[command(subcommand)]
    pub call: KeysCall,
}

#[derive(Debug, Subcommand)]
pub enum KeysCall {
    /// Get status for a slave SAE (or a KME ID).
    Status {
        /// Slave SAE ID.
        slave: String,
    },
    /// Get keys to share with a slave SAE (enc_keys).
    Enc {
        /// Slave SAE ID (or KME ID).
        slave: String,
        /// Number of keys.
        #[arg(long)]
        number: Option<u32>,
        /// Key size in bits.
        #[arg(long)]
        size: Option<u32>,
        /// Further slave SAEs that get the same keys (repeatable).
        #[arg(long = "additional")]
        additional: Vec<String>,
        /// Use the GET form (number and size only).
        #[arg(long, conflicts_with = "additional")]
        get: bool,
    },
    /// Get keys by ID as a slave SAE (dec_keys).
    Dec {
        /// Master SAE ID (or its KME ID).
        master: String,
        /// Key IDs.
        #[arg(required = true)]
        key_ids: Vec<String>,
        /// Use the GET form (one key ID).
        #[arg(long)]
        get: bool,
    },
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// State folder: certificates, config and key stores live here and are reused.
    #[arg(long, default_value = "dqkd-local")]
    pub dir: PathBuf,
    /// Number of sites (KME_A, KME_B, …), each with two SAEs (alice and alice2, bob and
    /// bob2, …).
    #[arg(long, default_value_t = 2)]
    pub sites: u8,
    /// Port of site A's ETSI API on 127.0.0.1; site i uses port+i, its peer API
    /// port+100+i, its metrics port+300+i, entropy server j port+200+j.
    #[arg(long, default_value_t = 8443)]
    pub port: u16,
    /// Do not run the Alice→Bob demonstration after start-up.
    #[arg(long)]
    pub no_demo: bool,
    /// Keep each site's keys in PostgreSQL (a database `dqkd_local_<kme>` per site, made
    /// on the server of this admin URL if missing) instead of an embedded file.
    #[arg(long, value_name = "ADMIN_URL")]
    pub postgres: Option<String>,
    /// Ready keys each site keeps per peer site (refilled when half are used); 0 makes
    /// every key on demand.
    #[arg(long, default_value_t = 100_000)]
    pub pool_target: u64,
    /// Also stream the logs to stderr (they always go to `<dir>/logs/dqkd.log`).
    #[arg(long, short)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A site's metrics listener, e.g. http://127.0.0.1:8744 (repeatable). Without it,
    /// every site file (`site-*.toml`) in --dir is asked.
    #[arg(long = "url")]
    pub urls: Vec<String>,
    /// Folder of the site files, as `dqkd up` writes them.
    #[arg(long, default_value = "dqkd-local")]
    pub dir: PathBuf,
    /// Print the sites' JSON (one array) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The state folder `dqkd up` runs from. When no cluster answers there, the demo
    /// starts a throwaway one of its own.
    #[arg(long, default_value = "dqkd-local")]
    pub dir: PathBuf,
    /// Base port of the throwaway cluster (see `dqkd up --port`).
    #[arg(long, default_value_t = 38443)]
    pub port: u16,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = BenchMode::Cross)]
    pub mode: BenchMode,
    /// Concurrent workers, each with its own connection to each site.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds to run each phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop each phase after this many pairs (or status calls), if sooner.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Keys per enc_keys request.
    #[arg(long, default_value_t = 1)]
    pub number: u32,
    /// Key size in bits.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Also run a status-only phase first and report pairs/s ÷ (status requests/s ÷ 3).
    #[arg(long)]
    pub status_baseline: bool,
    /// Print one JSON report instead of text.
    #[arg(long)]
    pub json: bool,
    /// State folder of the cluster the bench starts (default: a temporary folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Base port of the cluster the bench starts (site A's API; see `dqkd up --port`).
    #[arg(long, default_value_t = 28443)]
    pub port: u16,
    /// Run the sites on PostgreSQL: a throwaway database per site on the server of this
    /// admin URL, dropped afterwards.
    #[arg(long, value_name = "ADMIN_URL")]
    pub postgres: Option<String>,
    /// Ready keys each site keeps per peer site; the bench waits until both pools are full
    /// before it measures. 0 makes every key on demand.
    #[arg(long, default_value_t = 100_000)]
    pub pool_target: u64,
    /// One-way delay in milliseconds between the two sites, each direction, through a
    /// relay on loopback in front of each site's peer API (0: the sites connect directly).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub peer_delay_ms: u64,
    /// One-way delay in milliseconds between each KME and the entropy servers, each
    /// direction, through a relay in front of each entropy server (0: direct).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub entropy_delay_ms: u64,
}

/// Bench workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Alice at site A, Bob at site B: enc_keys at A, dec_keys at B.
    Cross,
    /// Both SAEs at site A.
    Same,
    /// status calls only: the HTTP + TLS ceiling.
    Status,
}

impl BenchMode {
    /// The mode's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cross => "cross",
            Self::Same => "same",
            Self::Status => "status",
        }
    }
}

#[derive(Debug, Args)]
pub struct PskArgs {
    /// This end's part: the initiator makes the keys, the responder takes their IDs.
    #[arg(long, value_enum)]
    pub role: PskRole,
    /// The cluster name, as given to `dqkd pki init --cluster`.
    #[arg(long, env = "DQKD_CLUSTER")]
    pub cluster: String,
    /// This end's SAE ID (its certificate is --cert).
    #[arg(long)]
    pub sae: String,
    /// The other end's SAE ID.
    #[arg(long)]
    pub peer_sae: String,
    /// This end's KME, its ETSI 014 API, e.g. https://127.0.0.1:8443
    #[arg(long, env = "DQKD_KME_URL")]
    pub kme: String,
    /// The cluster CA certificate.
    #[arg(long, env = "DQKD_CA")]
    pub ca: PathBuf,
    /// This SAE's certificate chain (PEM); the responder's needs --ip/--dns at issue.
    #[arg(long, env = "DQKD_CERT")]
    pub cert: PathBuf,
    /// This SAE's private key (PEM).
    #[arg(long, env = "DQKD_KEY")]
    pub key: PathBuf,
    /// The cluster's revocation list, followed on the link between the two ends.
    #[arg(long)]
    pub crl: Option<PathBuf>,
    /// Initiator: the responding end, e.g. https://198.51.100.7:9443
    #[arg(long, required_if_eq("role", "initiator"))]
    pub peer: Option<String>,
    /// Responder: the address to take offers on.
    #[arg(long, required_if_eq("role", "responder"))]
    pub listen: Option<SocketAddr>,
    /// Seconds between rotations, the same at both ends (default: WireGuard's rekey time).
    #[arg(long, default_value_t = 120.0)]
    pub interval: f64,
    /// The largest difference between the two ends' clocks tolerated, in seconds (under a
    /// quarter of the interval).
    #[arg(long, default_value_t = 5.0)]
    pub max_skew: f64,
    /// The WireGuard interface whose peer gets the key (with --wg-peer).
    #[arg(long, requires = "wg_peer", conflicts_with = "exec")]
    pub wg_iface: Option<String>,
    /// The peer's public key, as `wg show IFACE peers` prints it.
    #[arg(long, requires = "wg_iface")]
    pub wg_peer: Option<String>,
    /// The `wg` program.
    #[arg(long, default_value = "wg")]
    pub wg: PathBuf,
    /// Instead of WireGuard: a shell command that gets the key (Base64, one line) on stdin,
    /// and DQKD_PSK_KEY_ID and DQKD_PSK_EPOCH in its environment.
    #[arg(long, required_unless_present = "wg_iface")]
    pub exec: Option<String>,
    /// Serve Prometheus metrics in plain HTTP here (`/metrics`).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

/// The two ends of `dqkd psk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PskRole {
    /// Calls enc_keys and offers the key IDs.
    Initiator,
    /// Takes the key IDs and calls dec_keys.
    Responder,
}
