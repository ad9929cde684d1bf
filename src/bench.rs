//! `dqkd bench`: a load generator over real mutual TLS.
//!
//! Each worker owns its own clients (so `--concurrency` is also the number of
//! connections per site) and runs Alice→Bob pairs: `enc_keys` at Alice's site, then
//! `dec_keys` at Bob's, checking that Bob's keys equal Alice's. `--mode status` measures
//! the HTTP+TLS ceiling of the machine with `status` calls only. `--peer-delay-ms` and
//! `--entropy-delay-ms` put a fixed one-way delay on the links between the sites and to the
//! entropy servers (see [`crate::delay_proxy`]), so that WAN figures can be reproduced on
//! one machine.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dqkd_client::{Client, KeyRequestBody};

use crate::args::{BenchArgs, BenchMode};
use crate::delay_proxy::RelayProbe;
use crate::up::{LinkDelays, LocalCluster, LocalStore};

/// What one phase measured.
struct Report {
    mode: BenchMode,
    seconds: f64,
    pairs: u64,
    keys: u64,
    errors: u64,
    mismatches: u64,
    first_error: Option<String>,
    enc: Vec<u32>,
    dec: Vec<u32>,
    status: Vec<u32>,
    /// Round trips of the probe relay during the phase (empty without a peer delay).
    link_rtt: Vec<u32>,
}

/// What one worker saw (latencies in microseconds).
#[derive(Default)]
struct WorkerLog {
    pairs: u64,
    keys: u64,
    errors: u64,
    mismatches: u64,
    first_error: Option<String>,
    enc: Vec<u32>,
    dec: Vec<u32>,
    status: Vec<u32>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir;
    let state = match &args.dir {
        Some(d) => d.clone(),
        None => {
            dir = tempfile::tempdir().context("creating a temporary state folder")?;
            dir.path().to_path_buf()
        }
    };
    eprintln!(
        "starting a 2-site cluster with 3 entropy servers on ports {}… (state in {})",
        args.port,
        state.display()
    );
    let store = match &args.postgres {
        Some(admin_url) => LocalStore::Postgres {
            admin_url: admin_url.clone(),
            prefix: format!("dqkd_bench_{}", std::process::id()),
        },
        None => LocalStore::Embedded,
    };
    let kek =
        crate::up::LocalKek::from_args(args.kek_pkcs11.as_deref(), args.pkcs11_module.as_deref());
    let cluster = LocalCluster::start_with_kek(
        &state,
        2,
        args.port,
        &store,
        crate::up::local_pools(args.pool_target),
        delays(&args),
        &kek,
    )
    .await?;
    let result = bench(&cluster, &args, &store).await;
    cluster.shutdown().await;
    if let LocalStore::Postgres { admin_url, .. } = &store {
        for kme in ["KME_A", "KME_B"] {
            if let Err(e) =
                dqkd_store_postgres::drop_database(admin_url, &store.database(kme)).await
            {
                eprintln!("could not drop the bench database of {kme}: {e}");
            }
        }
    }
    result
}

/// The link delays `args` ask for.
fn delays(args: &BenchArgs) -> LinkDelays {
    LinkDelays {
        peer: Duration::from_millis(args.peer_delay_ms),
        entropy: Duration::from_millis(args.entropy_delay_ms),
    }
}

/// How a one-way delay reads in the report.
fn delay_text(ms: u64) -> String {
    if ms == 0 {
        "none (direct)".to_owned()
    } else {
        format!("{ms} ms one way (RTT {} ms)", 2 * ms)
    }
}

async fn bench(cluster: &LocalCluster, args: &BenchArgs, store: &LocalStore) -> anyhow::Result<()> {
    let store_name = match store {
        LocalStore::Embedded => "embedded",
        LocalStore::Postgres { .. } => "postgres",
    };
    let kek_name = if args.kek_pkcs11.is_some() {
        "pkcs11"
    } else {
        "file"
    };
    let fill = if args.pool_target > 0 {
        Some(wait_for_pools(cluster, args.pool_target).await?)
    } else {
        None
    };
    let mut reports = Vec::new();
    if args.status_baseline && args.mode != BenchMode::Status {
        reports.push(phase(cluster, args, BenchMode::Status).await?);
    }
    reports.push(phase(cluster, args, args.mode).await?);
    let ratio = match (reports.first(), reports.last()) {
        (Some(base), Some(main)) if reports.len() == 2 && !base.status.is_empty() => {
            let status_rps = base.status.len() as f64 / base.seconds;
            Some((main.pairs as f64 / main.seconds) / (status_rps / 3.0))
        }
        _ => None,
    };
    if args.json {
        let phases: Vec<_> = reports.iter().map(|r| r.json(args)).collect();
        let out = serde_json::json!({
            "machine": machine(),
            "store": store_name,
            "kek": kek_name,
            "pool_target": args.pool_target,
            "pool_fill_seconds": fill.map(|d| d.as_secs_f64()),
            "peer_delay_ms": args.peer_delay_ms,
            "entropy_delay_ms": args.entropy_delay_ms,
            "phases": phases,
            "pairs_per_s_over_status_rps_div_3": ratio,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "machine: {}   store: {store_name}   kek: {kek_name}",
            machine()
        );
        println!(
            "link delays: sites A↔B {}; KMEs↔entropy servers {}",
            delay_text(args.peer_delay_ms),
            delay_text(args.entropy_delay_ms)
        );
        if let Some(fill) = fill {
            let secs = fill.as_secs_f64();
            println!(
                "ready pools: {} keys per link, both links filled in {secs:.1} s ({:.0} keys/min per link)",
                args.pool_target,
                args.pool_target as f64 / secs * 60.0
            );
        } else {
            println!("ready pools: off (every key made on demand)");
        }
        for r in &reports {
            r.print(args);
        }
        if let Some(ratio) = ratio {
            println!("pairs/s ÷ (status requests/s ÷ 3) = {ratio:.2}");
        }
    }
    let failed: u64 = reports.iter().map(|r| r.mismatches).sum();
    anyhow::ensure!(failed == 0, "{failed} keys differed between Alice and Bob");
    Ok(())
}

/// Waits until both sites' pools toward each other hold `target` ready keys (as `status`
/// reports them) and returns how long that took from the cluster's start.
async fn wait_for_pools(cluster: &LocalCluster, target: u64) -> anyhow::Result<Duration> {
    let started = cluster.started();
    let a = cluster.client(0)?;
    let b = cluster.client(1)?;
    let (kme_a, _) = cluster.site(0);
    let (kme_b, _) = cluster.site(1);
    // Refill runs at well over 10,000 keys/s per link; allow a generous margin.
    let limit = Duration::from_secs(60 + target / 5_000);
    let progress = std::io::stderr().is_terminal();
    loop {
        let ab = a.status(kme_b).await.context("status at site A")?;
        let ba = b.status(kme_a).await.context("status at site B")?;
        if ab.stored_key_count >= target && ba.stored_key_count >= target {
            if progress {
                eprintln!();
            }
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "ready pools did not fill within {limit:?}: A→B {}, B→A {} of {target}",
            ab.stored_key_count,
            ba.stored_key_count
        );
        if progress {
            eprint!(
                "\r  pools: A→B {:>9}  B→A {:>9} of {target}",
                ab.stored_key_count, ba.stored_key_count
            );
            let _ = std::io::stderr().flush();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn phase(
    cluster: &LocalCluster,
    args: &BenchArgs,
    mode: BenchMode,
) -> anyhow::Result<Report> {
    let (_, alice) = cluster.site(0);
    let (kme_b, bob) = cluster.site(1);
    let (alice, bob, kme_b) = (alice.to_owned(), bob.to_owned(), kme_b.to_owned());
    let same_slave = cluster.second_sae(0);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let budget = Arc::new(AtomicU64::new(args.requests.unwrap_or(u64::MAX)));
    let mut workers = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let master = cluster.client(0)?;
        let slave = match mode {
            BenchMode::Cross => cluster.client(1)?,
            _ => cluster.client_as(0, &same_slave)?,
        };
        let ctx = Worker {
            mode,
            master,
            slave,
            master_id: alice.clone(),
            slave_id: match mode {
                BenchMode::Cross => bob.clone(),
                _ => same_slave.clone(),
            },
            status_target: kme_b.clone(),
            request: KeyRequestBody {
                number: Some(args.number),
                size: Some(args.size),
                ..Default::default()
            },
            stop: stop.clone(),
            done: done.clone(),
            budget: budget.clone(),
        };
        workers.push(tokio::spawn(ctx.run()));
    }
    let probe = (args.peer_delay_ms > 0 && mode != BenchMode::Status).then(|| {
        tokio::spawn(probe_link(
            Duration::from_millis(args.peer_delay_ms),
            stop.clone(),
        ))
    });
    let started = Instant::now();
    let duration = Duration::from_secs_f64(args.duration);
    let progress = std::io::stderr().is_terminal();
    while started.elapsed() < duration && budget.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if progress {
            let frac = (started.elapsed().as_secs_f64() / duration.as_secs_f64()).min(1.0);
            let bar = "#".repeat((frac * 30.0) as usize);
            eprint!(
                "\r{:>6}: [{bar:<30}] {:>5.1}s  {} done",
                mode.name(),
                started.elapsed().as_secs_f64(),
                done.load(Ordering::Relaxed)
            );
            let _ = std::io::stderr().flush();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut log = WorkerLog::default();
    for w in workers {
        let part = w.await.context("a bench worker failed")?;
        log.pairs += part.pairs;
        log.keys += part.keys;
        log.errors += part.errors;
        log.mismatches += part.mismatches;
        log.first_error = log.first_error.or(part.first_error);
        log.enc.extend(part.enc);
        log.dec.extend(part.dec);
        log.status.extend(part.status);
    }
    let seconds = started.elapsed().as_secs_f64();
    if progress {
        eprintln!();
    }
    let link_rtt = match probe {
        Some(task) => task.await.context("the link probe failed")??,
        None => Vec::new(),
    };
    Ok(Report {
        mode,
        seconds,
        pairs: log.pairs,
        keys: log.keys,
        errors: log.errors,
        mismatches: log.mismatches,
        first_error: log.first_error,
        enc: log.enc,
        dec: log.dec,
        status: log.status,
        link_rtt,
    })
}

/// Pings a relay of the peer link's delay every 50 ms until `stop`, returning each round
/// trip in microseconds: what the link itself cost during the run.
async fn probe_link(delay: Duration, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<u32>> {
    let mut probe = RelayProbe::start(delay)
        .await
        .context("starting the link probe")?;
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let took = probe
            .ping()
            .await
            .context("pinging through the probe relay")?;
        samples.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(samples)
}

struct Worker {
    mode: BenchMode,
    master: Client,
    slave: Client,
    master_id: String,
    slave_id: String,
    status_target: String,
    request: KeyRequestBody,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    budget: Arc<AtomicU64>,
}

impl Worker {
    async fn run(self) -> WorkerLog {
        let mut log = WorkerLog::default();
        while !self.stop.load(Ordering::Relaxed) && self.take_budget() {
            match self.mode {
                BenchMode::Status => {
                    let t = Instant::now();
                    match self.master.status(&self.status_target).await {
                        Ok(_) => log.status.push(micros(t)),
                        Err(e) => log.error(e.to_string()),
                    }
                }
                BenchMode::Cross | BenchMode::Same => self.pair(&mut log).await,
            }
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        log
    }

    fn take_budget(&self) -> bool {
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_ok()
    }

    async fn pair(&self, log: &mut WorkerLog) {
        let t = Instant::now();
        let sent = match self.master.enc_keys(&self.slave_id, &self.request).await {
            Ok(k) => k,
            Err(e) => return log.error(format!("enc_keys: {e}")),
        };
        log.enc.push(micros(t));
        let ids: Vec<&str> = sent.keys.iter().map(|k| k.key_ID.as_str()).collect();
        let t = Instant::now();
        let got = match self.slave.dec_keys(&self.master_id, &ids).await {
            Ok(k) => k,
            Err(e) => return log.error(format!("dec_keys: {e}")),
        };
        log.dec.push(micros(t));
        let same = got.keys.len() == sent.keys.len()
            && sent
                .keys
                .iter()
                .zip(&got.keys)
                .all(|(a, b)| a.key_ID == b.key_ID && a.key == b.key);
        if same {
            log.pairs += 1;
            log.keys += sent.keys.len() as u64;
        } else {
            log.mismatches += 1;
        }
    }
}

impl WorkerLog {
    fn error(&mut self, message: String) {
        self.errors += 1;
        self.first_error.get_or_insert(message);
    }
}

fn micros(since: Instant) -> u32 {
    u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX)
}

/// p-th percentile of `samples` (sorted in place), in milliseconds.
fn percentile(samples: &mut [u32], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    f64::from(samples[rank.min(samples.len() - 1)]) / 1000.0
}

impl Report {
    fn latency(samples: &[u32]) -> serde_json::Value {
        let mut s = samples.to_vec();
        serde_json::json!({
            "count": s.len(),
            "p50_ms": percentile(&mut s, 50.0),
            "p90_ms": percentile(&mut s, 90.0),
            "p99_ms": percentile(&mut s, 99.0),
            "max_ms": percentile(&mut s, 100.0),
        })
    }

    fn json(&self, args: &BenchArgs) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode.name(),
            "concurrency": args.concurrency,
            "number": args.number,
            "size_bits": args.size,
            "seconds": self.seconds,
            "pairs": self.pairs,
            "pairs_per_s": self.pairs as f64 / self.seconds,
            "keys_per_s": self.keys as f64 / self.seconds,
            "status_per_s": self.status.len() as f64 / self.seconds,
            "errors": self.errors,
            "first_error": self.first_error,
            "mismatches": self.mismatches,
            "enc_keys": Self::latency(&self.enc),
            "dec_keys": Self::latency(&self.dec),
            "status": Self::latency(&self.status),
            "peer_link_rtt": Self::latency(&self.link_rtt),
        })
    }

    fn print(&self, args: &BenchArgs) {
        println!(
            "{} phase: {:.1}s, concurrency {}, number {}, size {} bits",
            self.mode.name(),
            self.seconds,
            args.concurrency,
            args.number,
            args.size
        );
        if self.mode == BenchMode::Status {
            println!(
                "  status requests/s: {:.0}",
                self.status.len() as f64 / self.seconds
            );
        } else {
            println!(
                "  pairs/s: {:.0}   keys/s: {:.0}   pairs: {}   mismatches: {}",
                self.pairs as f64 / self.seconds,
                self.keys as f64 / self.seconds,
                self.pairs,
                self.mismatches
            );
        }
        println!("  errors: {}", self.errors);
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        for (name, samples) in [
            ("enc_keys", &self.enc),
            ("dec_keys", &self.dec),
            ("status", &self.status),
            ("link RTT", &self.link_rtt),
        ] {
            if samples.is_empty() {
                continue;
            }
            let mut s = samples.clone();
            println!(
                "  {name:<8} latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
                percentile(&mut s, 50.0),
                percentile(&mut s, 90.0),
                percentile(&mut s, 99.0),
                percentile(&mut s, 100.0)
            );
        }
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cores} cores, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}
