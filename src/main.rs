//! `dqkd`: one binary for every role of a Digital QKD cluster.
//!
//! This file only parses arguments, sets up logging, wires the library crates and maps the
//! final error to an exit code; the domain lives in the crates under `crates/`.

#![forbid(unsafe_code)]

mod args;
mod bench;
mod check;
mod delay_proxy;
mod keys;
mod logging;
mod manual;
mod pki;
mod status;
mod up;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use args::{Cli, Command};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let destination = match &cli.command {
        Command::Up(args) => logging::Destination::File {
            path: logging::up_log(&args.dir),
            verbose: args.verbose,
        },
        _ => logging::Destination::Stderr,
    };
    if let Err(error) = logging::init(cli.log_format, &destination) {
        eprintln!("dqkd: {error:#}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("dqkd: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pki(cmd) => pki::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Kme(args) => runtime_for_servers()?
            .block_on(serve_kme(args))
            .map(|()| ExitCode::SUCCESS),
        Command::Entropy(args) => runtime_for_servers()?
            .block_on(serve_entropy(args))
            .map(|()| ExitCode::SUCCESS),
        Command::Keys(args) => runtime()?.block_on(keys::run(args)),
        Command::Up(args) => runtime_for_servers()?
            .block_on(up::run(args))
            .map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => runtime()?
            .block_on(up::run_demo(args))
            .map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => runtime()?
            .block_on(bench::run(args))
            .map(|()| ExitCode::SUCCESS),
        Command::Check(args) => check::run(args),
        Command::Completions { shell } => manual::completions(shell).map(|()| ExitCode::SUCCESS),
        Command::Man { out } => manual::man(out.as_deref()).map(|()| ExitCode::SUCCESS),
        Command::Status(args) => runtime()?.block_on(status::run(args)),
        Command::Psk(args) => runtime()?
            .block_on(run_psk(args))
            .map(|()| ExitCode::SUCCESS),
    }
}

async fn run_psk(args: Box<args::PskArgs>) -> anyhow::Result<()> {
    let args = *args;
    let seconds = |what: &str, value: f64| {
        std::time::Duration::try_from_secs_f64(value)
            .with_context(|| format!("{what} must be a number of seconds, not {value}"))
    };
    let schedule = dqkd_psk::Schedule::new(
        seconds("--interval", args.interval)?,
        seconds("--max-skew", args.max_skew)?,
    )?;
    let apply: std::sync::Arc<dyn dqkd_psk::Apply> = match (args.wg_iface, args.wg_peer, args.exec)
    {
        (Some(interface), Some(peer), _) => std::sync::Arc::new(dqkd_psk::apply::WireGuard {
            wg: args.wg,
            interface,
            peer,
        }),
        (_, _, Some(command)) => std::sync::Arc::new(dqkd_psk::apply::Exec { command }),
        _ => anyhow::bail!("give --wg-iface and --wg-peer, or --exec"),
    };
    let end = match (args.role, args.peer, args.listen) {
        (args::PskRole::Initiator, Some(peer_url), _) => dqkd_psk::End::Initiator { peer_url },
        (args::PskRole::Responder, _, Some(listen)) => dqkd_psk::End::Responder { listen },
        _ => anyhow::bail!("the initiator needs --peer, the responder --listen"),
    };
    let mut tls = dqkd_psk::TlsFiles::new(args.ca, args.cert, args.key);
    tls.crl = args.crl;
    let rotator = dqkd_psk::start(dqkd_psk::Config {
        cluster: args.cluster,
        sae: args.sae,
        peer_sae: args.peer_sae,
        tls,
        kme_url: args.kme,
        schedule,
        end,
        apply,
        metrics_listen: args.metrics_listen,
    })
    .await?;
    if let Some(addr) = rotator.listen_addr() {
        tracing::info!(%addr, "taking offers");
    }
    shutdown_signal().await;
    rotator.stop().await;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The runtime of a process that serves: with the descriptor limit raised first.
fn runtime_for_servers() -> anyhow::Result<tokio::runtime::Runtime> {
    raise_descriptor_limit();
    runtime()
}

/// Descriptors kept free beyond the listeners' connection caps: store files, outgoing
/// connections to peers and entropy servers, the metrics listener.
const DESCRIPTOR_HEADROOM: u64 = 256;

/// Raises the soft limit on open descriptors to the hard limit, so that the listeners'
/// connection caps, not a default soft limit of 1,024, bound what a server holds; logs
/// the change.
fn raise_descriptor_limit() {
    #[cfg(unix)]
    {
        use rlimit::Resource;
        let (soft, hard) = match Resource::NOFILE.get() {
            Ok(limits) => limits,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the open-descriptor limit");
                return;
            }
        };
        if soft >= hard {
            tracing::info!(
                limit = soft,
                "open-descriptor limit already at its hard limit"
            );
            return;
        }
        match rlimit::increase_nofile_limit(hard) {
            Ok(now) => tracing::info!(
                from = soft,
                to = now,
                hard,
                "raised the open-descriptor limit"
            ),
            Err(e) => {
                tracing::warn!(limit = soft, hard, error = %e, "cannot raise the open-descriptor limit")
            }
        }
    }
}

/// Warns when the open-descriptor limit cannot hold every listener full at once: the caps
/// would then not protect the process from running out of descriptors.
fn check_descriptor_budget(listeners: u64, limits: &dqkd_kme::config::ServerLimits) {
    #[cfg(unix)]
    {
        let Ok((soft, _)) = rlimit::Resource::NOFILE.get() else {
            return;
        };
        let needed = listeners * u64::from(limits.max_connections) + DESCRIPTOR_HEADROOM;
        if soft < needed {
            tracing::warn!(
                limit = soft,
                needed,
                "the open-descriptor limit is below the listeners' connection caps plus headroom; \
                 lower connections.max_connections or raise the hard limit (LimitNOFILE, ulimit -Hn)"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (listeners, limits);
}

async fn serve_kme(args: args::KmeArgs) -> anyhow::Result<()> {
    let mut config = dqkd_kme::Config::load(&args.config)?;
    if let Some(name) = &args.replica {
        config = config.with_replica(name)?;
    }
    let listeners = 1 + u64::from(config.peer_listen.is_some());
    check_descriptor_budget(listeners, &config.connections);
    let serving = dqkd_kme::run(config).await?;
    if let Some(path) = &args.ready_file {
        write_ready_file(
            path,
            serde_json::json!({
                "api_addr": serving.api_addr().to_string(),
                "peer_addr": serving.peer_addr().map(|a| a.to_string()),
                "metrics_addr": serving.metrics_addr().map(|a| a.to_string()),
            }),
        )?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    serving.shutdown().await;
    Ok(())
}

async fn serve_entropy(args: args::EntropyArgs) -> anyhow::Result<()> {
    let config = dqkd_entropy::Config::load(&args.config)?;
    check_descriptor_budget(1, &config.connections);
    let serving = dqkd_entropy::run(config).await?;
    if let Some(path) = &args.ready_file {
        write_ready_file(
            path,
            serde_json::json!({ "api_addr": serving.api_addr().to_string() }),
        )?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    serving.shutdown().await;
    Ok(())
}

/// Tells a supervisor (or a test) where a server (KME or entropy server) listens once it
/// accepts connections.
fn write_ready_file(path: &Path, addresses: serde_json::Value) -> anyhow::Result<()> {
    let text = addresses.to_string();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
