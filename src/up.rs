//! `dqkd up`: a local cluster in the foreground, ready to try with curl.
//!
//! The state folder keeps the CA, the certificates, the key-encryption key and the key
//! store, so a second run serves the same keys with the same certificates. The manifest and
//! site file are written anew each run from the flags (they hold nothing secret).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use dqkd_client::{Client, KeyRequestBody};
use dqkd_kme::config::{KeyLife, ManifestLimits, SiteEntry, StoreFiles, TlsFiles};
use dqkd_kme::{Config, Manifest, SiteFile};

use crate::args::UpArgs;

const CLUSTER: &str = "local";
const SITE: &str = "KME_A";
const ALICE: &str = "alice";
const BOB: &str = "bob";

/// File locations inside the state folder.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    fn ca(&self) -> PathBuf {
        self.pki().join(dqkd_pki::CA_CERT_FILE)
    }
    fn kme_dir(&self) -> PathBuf {
        self.pki().join("kme")
    }
    fn sae_dir(&self) -> PathBuf {
        self.pki().join("sae")
    }
    fn sae_file(&self, sae: &str, ext: &str) -> PathBuf {
        self.sae_dir().join(format!("{sae}.{ext}"))
    }
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let layout = Layout { dir };
    ensure_pki(&layout)?;
    let site_path = write_config(&layout, args.port)?;
    let config = Config::load(&site_path)?;
    let serving = dqkd_kme::run(config).await?;
    let url = format!("https://{}", serving.api_addr());

    println!();
    println!(
        "dqkd local cluster {CLUSTER:?} is up (state in {})",
        layout.dir.display()
    );
    println!("  site {SITE}: ETSI 014 API at {url}  SAEs: {ALICE}, {BOB}");
    println!();
    if !args.no_demo {
        if let Err(e) = demo(&layout, &url).await {
            println!("demo failed: {e:#}");
        }
    }
    print_curl(&layout, &url);
    println!("Press Ctrl-C to stop.");
    crate::shutdown_signal().await;
    println!("stopping…");
    serving.shutdown().await;
    Ok(())
}

fn ensure_pki(layout: &Layout) -> anyhow::Result<()> {
    if !layout.ca().exists() {
        dqkd_pki::init_ca(CLUSTER, &layout.pki(), false)?;
    }
    let ca = dqkd_pki::load_ca(&layout.pki())?;
    let issue = |role: dqkd_pki::Role, id: &str, dir: PathBuf| -> anyhow::Result<()> {
        if dir.join(format!("{id}.pem")).exists() {
            return Ok(());
        }
        let options = dqkd_pki::IssueOptions {
            out_dir: dir,
            ..Default::default()
        };
        ca.issue(role, id, &options)?;
        Ok(())
    };
    issue(dqkd_pki::Role::Kme, SITE, layout.kme_dir())?;
    issue(dqkd_pki::Role::Sae, ALICE, layout.sae_dir())?;
    issue(dqkd_pki::Role::Sae, BOB, layout.sae_dir())?;
    let kek = layout.data().join(format!("{SITE}.kek"));
    if !kek.exists() {
        std::fs::create_dir_all(layout.data())?;
        dqkd_store::Kek::generate_file(&kek, false)?;
    }
    Ok(())
}

fn write_config(layout: &Layout, port: u16) -> anyhow::Result<PathBuf> {
    let manifest = Manifest {
        cluster: CLUSTER.into(),
        limits: ManifestLimits::default(),
        keys: KeyLife::default(),
        sites: vec![SiteEntry {
            kme_id: SITE.into(),
            api_addr: format!("127.0.0.1:{port}"),
            saes: vec![ALICE.into(), BOB.into()],
        }],
    };
    let site = SiteFile {
        manifest: "cluster.toml".into(),
        kme_id: SITE.into(),
        api_listen: ([127, 0, 0, 1], port).into(),
        tls: TlsFiles {
            ca: relative(layout, &layout.ca()),
            cert: relative(layout, &layout.kme_dir().join(format!("{SITE}.pem"))),
            key: relative(layout, &layout.kme_dir().join(format!("{SITE}.key"))),
        },
        store: StoreFiles {
            path: relative(layout, &layout.data().join(format!("{SITE}.redb"))),
            kek: relative(layout, &layout.data().join(format!("{SITE}.kek"))),
        },
    };
    write_toml(&layout.dir.join("cluster.toml"), &manifest)?;
    let site_path = layout.dir.join(format!("site-{SITE}.toml"));
    write_toml(&site_path, &site)?;
    Ok(site_path)
}

fn relative(layout: &Layout, path: &Path) -> PathBuf {
    path.strip_prefix(&layout.dir).unwrap_or(path).to_owned()
}

fn write_toml<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = toml::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Alice asks for a key to share with Bob; Bob fetches it by ID; both must be equal.
async fn demo(layout: &Layout, url: &str) -> anyhow::Result<()> {
    let client = |sae: &str| -> anyhow::Result<Client> {
        let tls = dqkd_pki::client_config_from_combined(
            &layout.ca(),
            &layout.sae_file(sae, "combined.pem"),
        )?;
        Ok(Client::new(url, tls)?)
    };
    let alice = client(ALICE)?;
    let bob = client(BOB)?;
    println!("Alice→Bob, as the ETSI 014 API sees it:");
    let status = alice.status(BOB).await?;
    println!(
        "  1. alice: status for {BOB}: {} keys of {} bits available from {}",
        status.stored_key_count, status.key_size, status.source_KME_ID
    );
    let sent = alice.enc_keys(BOB, &KeyRequestBody::default()).await?;
    let key = sent.keys.first().context("enc_keys returned no key")?;
    println!("  2. alice: enc_keys for {BOB} → key_ID {}", key.key_ID);
    let got = bob.dec_keys(ALICE, &[key.key_ID.as_str()]).await?;
    let same = got.keys.first().is_some_and(|k| k.key == key.key);
    println!(
        "  3. bob:   dec_keys from {ALICE} with that key_ID → {}",
        if same {
            "the same key"
        } else {
            "A DIFFERENT KEY (bug)"
        }
    );
    anyhow::ensure!(same, "Bob's key differs from Alice's");
    println!();
    Ok(())
}

fn print_curl(layout: &Layout, url: &str) {
    let rel = |p: PathBuf| {
        std::env::current_dir()
            .ok()
            .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_path_buf))
            .unwrap_or(p)
            .display()
            .to_string()
    };
    let ca = rel(layout.ca());
    let alice = rel(layout.sae_file(ALICE, "p12"));
    let bob = rel(layout.sae_file(BOB, "p12"));
    println!("Try it with curl. Alice asks for a key to share with Bob:");
    println!();
    println!("  curl --cert {alice} --cert-type P12 --cacert {ca} \\");
    println!("      \"{url}/api/v1/keys/{BOB}/enc_keys\"");
    println!();
    println!("Bob fetches it with the key_ID Alice got:");
    println!();
    println!("  curl --cert {bob} --cert-type P12 --cacert {ca} \\");
    println!("      \"{url}/api/v1/keys/{ALICE}/dec_keys\" \\");
    println!("      -H \"Content-Type: application/json\" \\");
    println!("      -d '{{\"key_IDs\": [{{\"key_ID\": \"SOME_KEY_ID\"}}]}}'");
    println!();
}
