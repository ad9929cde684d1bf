//! Where logs go: stderr for servers and tools; for `dqkd up`, a file under its state
//! folder (and stderr too with `--verbose`), so that the summary, the flow and the curl
//! lines it prints are not buried in log lines. Every process also keeps its last warnings
//! and errors for the status page.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::args::LogFormat;

/// Where one run logs.
pub enum Destination {
    /// Standard error.
    Stderr,
    /// A file, and standard error too when `verbose`.
    File {
        /// The log file (appended to).
        path: PathBuf,
        /// Also stream to standard error.
        verbose: bool,
    },
}

/// The log file of `dqkd up` in its state folder.
pub fn up_log(dir: &Path) -> PathBuf {
    dir.join("logs").join("dqkd.log")
}

/// Installs the process's subscriber (filter from `RUST_LOG`, default `info`).
pub fn init(format: LogFormat, destination: &Destination) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(dqkd_kme::status::RecentErrors);
    match destination {
        Destination::Stderr => registry.with(stderr_layer(format)).init(),
        Destination::File { path, verbose } => {
            let file = open(path)?;
            // Log files and collectors get plain text, never colours.
            let to_file = layer(format, Mutex::new(file), false);
            registry
                .with(to_file)
                .with(verbose.then(|| stderr_layer(format)))
                .init();
        }
    }
    Ok(())
}

fn open(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the log file {}", path.display()))
}

fn stderr_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    // Colours only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    layer(format, std::io::stderr, ansi)
}

fn layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    }
}
