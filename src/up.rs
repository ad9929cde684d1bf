//! `dqkd up` and `dqkd demo`: a local cluster in the foreground, ready to try with curl.
//!
//! The state folder keeps the CA, the certificates, the key-encryption keys and the key
//! stores, so a second run serves the same keys with the same certificates. The manifest,
//! site files and entropy-server files are written anew each run from the flags (they hold
//! nothing secret).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use dqkd_client::{Client, KeyRequestBody};
use dqkd_kme::config::{
    EntropyEntry, KeyLife, KeygenParams, ManifestLimits, PeerSettings, PoolSettings, SiteEntry,
    StoreFiles, TlsFiles,
};
use dqkd_kme::{Config, Manifest, SiteFile};

use crate::args::{DemoArgs, UpArgs};
use crate::delay_proxy::DelayProxy;

mod flow;
mod kek;
mod links;

use flow::{demo, print_curl};
pub use kek::LocalKek;
use links::Advertised;
pub use links::LinkDelays;

const CLUSTER: &str = "local";
const ENTROPY_SERVERS: usize = 3;

/// File locations inside the state folder.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        Ok(Self { dir })
    }
    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    fn ca(&self) -> PathBuf {
        self.pki().join(dqkd_pki::CA_CERT_FILE)
    }
    fn role_dir(&self, role: dqkd_pki::Role) -> PathBuf {
        self.pki().join(role.as_str())
    }
    fn cert(&self, role: dqkd_pki::Role, id: &str, ext: &str) -> PathBuf {
        self.role_dir(role).join(format!("{id}.{ext}"))
    }
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    fn manifest(&self) -> PathBuf {
        self.dir.join("cluster.toml")
    }
    /// A path relative to the state folder, as written into config files.
    fn rel(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.dir).unwrap_or(path).to_owned()
    }
}

/// Each site's second SAE, for same-site pairs (`alice` → `alice2`).
fn second_sae(first: &str) -> String {
    format!("{first}2")
}

/// The local cluster's names: site `i` is `KME_<letter>` with two SAEs.
struct Plan {
    sites: Vec<(String, String)>,
    entropy: Vec<String>,
    port: u16,
}

impl Plan {
    fn new(sites: u8, port: u16) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=26).contains(&sites),
            "--sites must be between 1 and 26"
        );
        let saes = ["alice", "bob", "carol", "dave", "erin", "frank"];
        let sites = (0..sites)
            .map(|i| {
                let letter = char::from(b'A' + i);
                let sae = saes
                    .get(usize::from(i))
                    .map(|s| (*s).to_owned())
                    .unwrap_or_else(|| format!("sae-{}", letter.to_ascii_lowercase()));
                (format!("KME_{letter}"), sae)
            })
            .collect();
        let entropy = (1..=ENTROPY_SERVERS).map(|j| format!("E{j}")).collect();
        Ok(Self {
            sites,
            entropy,
            port,
        })
    }
    fn api_port(&self, i: usize) -> u16 {
        self.port + i as u16
    }
    fn peer_port(&self, i: usize) -> u16 {
        self.port + 100 + i as u16
    }
    fn entropy_port(&self, j: usize) -> u16 {
        self.port + 200 + j as u16
    }
    fn metrics_port(&self, i: usize) -> u16 {
        self.port + 300 + i as u16
    }
}

/// Where the sites of a local cluster keep their keys.
pub enum LocalStore {
    /// One embedded store file per site, in the state folder.
    Embedded,
    /// One PostgreSQL database per site, `<prefix>_<kme id>`, on the server of `admin_url`.
    Postgres {
        /// A URL whose user may create databases.
        admin_url: String,
        /// Database name prefix (lower case, digits, `_`).
        prefix: String,
    },
}

impl LocalStore {
    /// The database name of site `kme`.
    pub fn database(&self, kme: &str) -> String {
        match self {
            Self::Embedded => String::new(),
            Self::Postgres { prefix, .. } => format!("{prefix}_{}", kme.to_ascii_lowercase()),
        }
    }

    fn url(&self, kme: &str) -> Option<String> {
        match self {
            Self::Embedded => None,
            Self::Postgres { admin_url, .. } => {
                let base = admin_url
                    .rsplit_once('/')
                    .map_or(admin_url.as_str(), |(b, _)| b);
                Some(format!("{base}/{}", self.database(kme)))
            }
        }
    }
}

/// A local cluster running in this process.
pub struct LocalCluster {
    layout: Layout,
    plan: Plan,
    entropy: Vec<dqkd_entropy::Serving>,
    kmes: Vec<dqkd_kme::Serving>,
    relays: Vec<DelayProxy>,
    started: Instant,
}

impl LocalCluster {
    /// Makes what is missing under `dir` and starts every server on loopback, with
    /// `delays` on the links between them.
    pub async fn start(
        dir: &Path,
        sites: u8,
        port: u16,
        store: &LocalStore,
        pools: PoolSettings,
        delays: LinkDelays,
    ) -> anyhow::Result<Self> {
        Self::start_with_kek(dir, sites, port, store, pools, delays, &LocalKek::File).await
    }

    /// [`LocalCluster::start`] with the sites' KEKs where `kek` says.
    pub async fn start_with_kek(
        dir: &Path,
        sites: u8,
        port: u16,
        store: &LocalStore,
        pools: PoolSettings,
        delays: LinkDelays,
        kek: &LocalKek,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let layout = Layout::new(dir)?;
        let plan = Plan::new(sites, port)?;
        ensure_pki(&layout, &plan)?;
        kek.ensure(&plan)?;
        if let LocalStore::Postgres { admin_url, .. } = store {
            for (kme, _) in &plan.sites {
                dqkd_store_postgres::create_database_if_missing(admin_url, &store.database(kme))
                    .await
                    .with_context(|| format!("creating the database of site {kme}"))?;
            }
        }
        let advertised = Advertised::start(&plan, delays).await?;
        write_configs(&layout, &plan, store, pools, &advertised, kek)?;

        let mut entropy = Vec::new();
        for (j, id) in plan.entropy.iter().enumerate() {
            let path = layout.dir.join(format!("entropy-{id}.toml"));
            let config = dqkd_entropy::Config::load(&path)?;
            let serving = dqkd_entropy::run(config).await.with_context(|| {
                format!(
                    "starting entropy server {id} on port {}",
                    plan.entropy_port(j)
                )
            })?;
            entropy.push(serving);
        }
        let mut kmes = Vec::new();
        for (i, (kme, _)) in plan.sites.iter().enumerate() {
            let config = Config::load(&layout.dir.join(format!("site-{kme}.toml")))?;
            let serving = dqkd_kme::run(config)
                .await
                .with_context(|| format!("starting site {kme} on port {}", plan.api_port(i)))?;
            kmes.push(serving);
        }
        Ok(Self {
            layout,
            plan,
            entropy,
            kmes,
            relays: advertised.relays,
            started,
        })
    }

    /// When `start` began.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A client for site `i`'s first SAE at its own site.
    pub fn client(&self, i: usize) -> anyhow::Result<Client> {
        client_for(&self.layout, &self.plan, i)
    }

    /// A client for `sae` (an SAE of site `i`) at its own site.
    pub fn client_as(&self, i: usize, sae: &str) -> anyhow::Result<Client> {
        sae_client(&self.layout, &self.plan, i, sae)
    }

    /// Site `i`'s KME ID and first SAE.
    pub fn site(&self, i: usize) -> (&str, &str) {
        let (kme, sae) = &self.plan.sites[i];
        (kme, sae)
    }

    /// Site `i`'s second SAE (for same-site pairs).
    pub fn second_sae(&self, i: usize) -> String {
        second_sae(&self.plan.sites[i].1)
    }

    /// Stops every server, KMEs first so that no request is left waiting on an entropy
    /// server that is already gone.
    pub async fn shutdown(self) {
        for kme in self.kmes {
            kme.shutdown().await;
        }
        for server in self.entropy {
            server.shutdown().await;
        }
        drop(self.relays);
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let store = match &args.postgres {
        Some(admin_url) => LocalStore::Postgres {
            admin_url: admin_url.clone(),
            prefix: format!("dqkd_{CLUSTER}"),
        },
        None => LocalStore::Embedded,
    };
    let cluster = LocalCluster::start_with_kek(
        &args.dir,
        args.sites,
        args.port,
        &store,
        local_pools(args.pool_target),
        LinkDelays::default(),
        &LocalKek::from_args(args.kek_pkcs11.as_deref(), args.pkcs11_module.as_deref()),
    )
    .await?;
    let (layout, plan) = (&cluster.layout, &cluster.plan);
    println!();
    println!(
        "dqkd local cluster {CLUSTER:?} is up (state in {})",
        layout.dir.display()
    );
    for (i, (kme, sae)) in plan.sites.iter().enumerate() {
        println!(
            "  site {kme}: ETSI 014 API https://127.0.0.1:{}  peer API :{}  SAEs {sae}, {}",
            plan.api_port(i),
            plan.peer_port(i),
            second_sae(sae)
        );
        println!(
            "          status page http://127.0.0.1:{port}/status  metrics http://127.0.0.1:{port}/metrics",
            port = plan.metrics_port(i),
        );
    }
    println!(
        "  entropy servers: {}  (n = 3, c = 1)",
        plan.entropy
            .iter()
            .enumerate()
            .map(|(j, id)| format!("{id} :{}", plan.entropy_port(j)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  logs: {}{}",
        crate::logging::up_log(&layout.dir).display(),
        if args.verbose {
            " (and here)"
        } else {
            " (--verbose streams them here too)"
        }
    );
    println!();
    if !args.no_demo && plan.sites.len() >= 2 {
        if let Err(e) = demo(layout, plan).await {
            println!("demo failed: {e:#}");
        }
    }
    print_curl(layout, plan);
    println!(
        "See every site at a glance: dqkd status --dir {}",
        args.dir.display()
    );
    println!();
    println!("Press Ctrl-C to stop.");
    crate::shutdown_signal().await;
    println!("stopping…");
    cluster.shutdown().await;
    Ok(())
}

/// Ready keys per link of the demo's throwaway cluster: enough to show pools at work.
const DEMO_POOL_TARGET: u64 = 10_000;

/// `dqkd demo`: the Alice→Bob flow against a cluster that `dqkd up` is running.
pub async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    if let Some((layout, plan)) = running_cluster(&args.dir)? {
        match demo(&layout, &plan).await {
            Ok(()) => return Ok(()),
            Err(e) if is_unreachable(&e) => {
                println!("no cluster answers at {}; starting one", args.dir.display());
            }
            Err(e) => return Err(e),
        }
    }
    // Nothing running there: a throwaway cluster of our own, on ports of its own.
    let dir = tempfile::tempdir().context("creating a temporary state folder")?;
    let cluster = LocalCluster::start(
        dir.path(),
        2,
        args.port,
        &LocalStore::Embedded,
        local_pools(DEMO_POOL_TARGET),
        LinkDelays::default(),
    )
    .await?;
    let result = demo(&cluster.layout, &cluster.plan).await;
    cluster.shutdown().await;
    result
}

/// The layout and plan of the cluster `dqkd up` wrote under `dir`, if it wrote one.
fn running_cluster(dir: &Path) -> anyhow::Result<Option<(Layout, Plan)>> {
    let manifest_path = dir.join("cluster.toml");
    let Ok(text) = std::fs::read_to_string(&manifest_path) else {
        return Ok(None);
    };
    let manifest: Manifest =
        toml::from_str(&text).with_context(|| format!("reading {}", manifest_path.display()))?;
    anyhow::ensure!(
        manifest.sites.len() >= 2,
        "the demo needs a cluster of at least two sites"
    );
    let port = manifest.sites[0]
        .api_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("reading site A's port from the manifest")?;
    let plan = Plan::new(manifest.sites.len() as u8, port)?;
    Ok(Some((Layout::new(dir)?, plan)))
}

/// Whether the demo failed because nothing answered (rather than a wrong answer).
fn is_unreachable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<dqkd_client::ClientError>(),
            Some(dqkd_client::ClientError::Transport(_) | dqkd_client::ClientError::Timeout(_))
        )
    })
}

fn ensure_pki(layout: &Layout, plan: &Plan) -> anyhow::Result<()> {
    use dqkd_pki::Role;
    if !layout.ca().exists() {
        dqkd_pki::init_ca(CLUSTER, &layout.pki(), false)?;
    }
    let ca = dqkd_pki::load_ca(&layout.pki())?;
    // Every process checks callers against the CA's revocation list, so that
    // `dqkd pki revoke` works on a running local cluster.
    if !ca.crl_path().exists() {
        ca.write_crl()?;
    }
    let issue = |role: Role, id: &str| -> anyhow::Result<()> {
        if layout.cert(role, id, "pem").exists() {
            return Ok(());
        }
        let options = dqkd_pki::IssueOptions {
            out_dir: layout.role_dir(role),
            ..Default::default()
        };
        ca.issue(role, id, &options)?;
        Ok(())
    };
    // Key-encryption keys and key stores: this user's alone.
    let mut data = std::fs::DirBuilder::new();
    data.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut data, 0o700);
    data.create(layout.data())?;
    for (kme, sae) in &plan.sites {
        issue(Role::Kme, kme)?;
        issue(Role::Sae, sae)?;
        issue(Role::Sae, &second_sae(sae))?;
        let kek = layout.data().join(format!("{kme}.kek"));
        if !kek.exists() {
            dqkd_store::Kek::generate_file(&kek, false)?;
        }
    }
    for id in &plan.entropy {
        issue(Role::Entropy, id)?;
    }
    Ok(())
}

/// Pool settings of a local cluster: refill when half the target is used.
pub fn local_pools(target: u64) -> PoolSettings {
    PoolSettings {
        target,
        low_water: target / 2,
        ..PoolSettings::default()
    }
}

fn write_configs(
    layout: &Layout,
    plan: &Plan,
    store: &LocalStore,
    pools: PoolSettings,
    advertised: &Advertised,
    kek: &LocalKek,
) -> anyhow::Result<()> {
    use dqkd_pki::{Name, PkiError, Role};
    let manifest = Manifest {
        cluster: Name::new("cluster name", CLUSTER)?,
        limits: ManifestLimits::default(),
        keys: KeyLife::default(),
        keygen: KeygenParams::default(),
        peers: PeerSettings::default(),
        pools,
        entropy: plan
            .entropy
            .iter()
            .enumerate()
            .map(|(j, id)| {
                Ok(EntropyEntry {
                    id: Name::new("entropy server ID", id.as_str())?,
                    addr: advertised.entropy[j].to_string(),
                })
            })
            .collect::<Result<_, PkiError>>()?,
        sites: plan
            .sites
            .iter()
            .enumerate()
            .map(|(i, (kme, sae))| {
                Ok(SiteEntry {
                    kme_id: Name::new("KME ID", kme.as_str())?,
                    api_addr: format!("127.0.0.1:{}", plan.api_port(i)),
                    peer_addr: Some(advertised.peer[i].to_string()),
                    saes: vec![
                        Name::new("SAE ID", sae.as_str())?,
                        Name::new("SAE ID", second_sae(sae))?,
                    ],
                })
            })
            .collect::<Result<_, PkiError>>()?,
    };
    write_toml(&layout.manifest(), &manifest)?;
    let tls = |role: Role, id: &str| TlsFiles {
        ca: layout.rel(&layout.ca()),
        cert: layout.rel(&layout.cert(role, id, "pem")),
        key: layout.rel(&layout.cert(role, id, "key")),
        crl: Some(layout.rel(&layout.pki().join(dqkd_pki::CRL_FILE))),
        key_exchange: None,
        peer_key_exchange: None,
    };
    for (i, (kme, _)) in plan.sites.iter().enumerate() {
        let site = SiteFile {
            manifest: "cluster.toml".into(),
            kme_id: Name::new("KME ID", kme.as_str())?,
            api_listen: ([127, 0, 0, 1], plan.api_port(i)).into(),
            peer_listen: Some(([127, 0, 0, 1], plan.peer_port(i)).into()),
            metrics_listen: Some(([127, 0, 0, 1], plan.metrics_port(i)).into()),
            tls: tls(Role::Kme, kme),
            store: StoreFiles {
                path: match store {
                    LocalStore::Embedded => {
                        Some(layout.rel(&layout.data().join(format!("{kme}.redb"))))
                    }
                    LocalStore::Postgres { .. } => None,
                },
                url: store.url(kme),
                pool_size: None,
                ca: None,
                cert: None,
                key: None,
                insecure_allow_plaintext: false,
                kek: kek.for_site(layout, kme).0,
                pkcs11_module: kek.for_site(layout, kme).1,
                pkcs11_pin: None,
            },
            connections: Default::default(),
        };
        write_toml(&layout.dir.join(format!("site-{kme}.toml")), &site)?;
    }
    for (j, id) in plan.entropy.iter().enumerate() {
        let file = dqkd_entropy::config::ConfigFile {
            cluster: CLUSTER.into(),
            server_id: id.clone(),
            listen: ([127, 0, 0, 1], plan.entropy_port(j)).into(),
            tls: tls(Role::Entropy, id),
            pool_ttl_secs: None,
            pool_rotate_secs: None,
            pool_max_bytes: None,
            max_allocation: None,
            max_live_bytes: None,
            max_live_bytes_per_kme: None,
            mix_file: None,
            connections: Default::default(),
        };
        write_toml(&layout.dir.join(format!("entropy-{id}.toml")), &file)?;
    }
    Ok(())
}

fn write_toml<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = toml::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Alice at site A asks for a key for Bob's site; Bob fetches it at site B by ID.
fn client_for(layout: &Layout, plan: &Plan, i: usize) -> anyhow::Result<Client> {
    sae_client(layout, plan, i, &plan.sites[i].1)
}

fn sae_client(layout: &Layout, plan: &Plan, i: usize, sae: &str) -> anyhow::Result<Client> {
    let tls = dqkd_pki::client_config_from_combined(
        &layout.ca(),
        &layout.cert(dqkd_pki::Role::Sae, sae, "combined.pem"),
    )?;
    Ok(Client::new(
        &format!("https://127.0.0.1:{}", plan.api_port(i)),
        tls,
    )?)
}
