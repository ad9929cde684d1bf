//! `dqkd check`: what `dqkd kme` (or `dqkd entropy`) would refuse at start, found without
//! starting anything.
//!
//! The site file and manifest go through the KME's own loader (the same checks, the same
//! messages), an entropy server's file through its own; the certificates through the
//! verifier the servers use; the key-encryption key through the store's loader. Each
//! problem is one line naming the file and the entry.

use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use dqkd_kme::config::{KekLocation, StoreLocation, TlsFiles};
use dqkd_pki::{CertificateFiles, Finding, Role, Severity};

use crate::args::CheckArgs;

/// How long the database gets to accept a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One line of the report.
struct Line {
    entry: String,
    severity: Severity,
    message: String,
}

/// Prints one line per problem or warning and exits 1 when any problem was found.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let path = args.config.as_path();
    if is_entropy_file(path) {
        return Ok(entropy(path));
    }
    let config = match dqkd_kme::Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            // The loader's messages name the file and the entry already.
            println!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    let mut lines = certificates(&config.tls, &config.cluster, Role::Kme, &config.kme_id);
    lines.extend(kek(&config.store.kek));
    lines.extend(store(&config.store.location));
    let what = format!("site {} of cluster {}", config.kme_id, config.cluster);
    Ok(report(path, &lines, &what))
}

/// An entropy server's file names its `server_id`; a site file never does.
fn is_entropy_file(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("server_id") && !t.contains_key("manifest"))
}

/// The same checks for an entropy server: its loader, its certificates, its mix file.
fn entropy(path: &Path) -> ExitCode {
    let config = match dqkd_entropy::Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            println!("{e}");
            return ExitCode::from(1);
        }
    };
    let mut lines = certificates(
        &config.tls,
        &config.cluster,
        Role::Entropy,
        &config.server_id,
    );
    if let Some(mix) = &config.mix_file {
        if let Err(e) = std::fs::File::open(mix) {
            lines.push(Line {
                entry: "mix_file".into(),
                severity: Severity::Problem,
                message: format!("{}: {e}", mix.display()),
            });
        }
    }
    let what = format!(
        "entropy server {} of cluster {}",
        config.server_id, config.cluster
    );
    report(path, &lines, &what)
}

/// Prints the lines, then a summary: `ok` on stdout, or the count of problems on stderr.
fn report(path: &Path, lines: &[Line], what: &str) -> ExitCode {
    for line in lines {
        let tag = match line.severity {
            Severity::Problem => "",
            Severity::Warning => "warning: ",
        };
        println!("{}: {}: {tag}{}", path.display(), line.entry, line.message);
    }
    let problems = lines
        .iter()
        .filter(|l| l.severity == Severity::Problem)
        .count();
    if problems > 0 {
        eprintln!(
            "dqkd check: {problems} problem(s) in {} ({what})",
            path.display()
        );
        return ExitCode::from(1);
    }
    println!("{}: ok ({what})", path.display());
    ExitCode::SUCCESS
}

/// Chain, validity, key and revocation list; then whose certificate it is.
fn certificates(tls: &TlsFiles, cluster: &str, role: Role, id: &str) -> Vec<Line> {
    let files = CertificateFiles {
        ca: &tls.ca,
        cert: &tls.cert,
        key: &tls.key,
        crl: tls.crl.as_deref(),
    };
    let findings = dqkd_pki::inspect_certificates(files, SystemTime::now());
    let mut lines: Vec<Line> = findings.into_iter().map(|f| tls_line(tls, f)).collect();
    // An unreadable file was reported above; the identity check would only repeat it.
    if dqkd_pki::load_certs(&tls.cert).is_ok() {
        if let Err(message) = dqkd_net::check_own_certificate(&tls.cert, cluster, role, id) {
            lines.push(Line {
                entry: "[tls] cert".into(),
                severity: Severity::Problem,
                message,
            });
        }
    }
    lines
}

/// Names the site-file entry that points at the finding's file.
fn tls_line(tls: &TlsFiles, f: Finding) -> Line {
    let entry = if f.file == tls.ca {
        "[tls] ca"
    } else if f.file == tls.key {
        "[tls] key"
    } else if tls.crl.as_ref() == Some(&f.file) {
        "[tls] crl"
    } else {
        "[tls] cert"
    };
    let message = if f.message.contains(&*f.file.to_string_lossy()) {
        f.message
    } else {
        format!("{}: {}", f.file.display(), f.message)
    };
    Line {
        entry: entry.into(),
        severity: f.severity,
        message,
    }
}

/// The store's own loader: present, private (mode 0600 or stricter), 64 hex characters.
/// The KEK opens as the KME would open it: the file (present, mode 0600, 64 hex
/// characters), or the key in its PKCS#11 token (module, token, PIN and object).
fn kek(location: &KekLocation) -> Option<Line> {
    dqkd_kme::server::open_kek(location).err().map(|e| Line {
        entry: "[store] kek".into(),
        severity: Severity::Problem,
        message: e.to_string(),
    })
}

/// What can be learnt cheaply: the embedded file (or its folder) is writable; PostgreSQL's
/// certificate files load and its host accepts a TCP connection (no login).
fn store(location: &StoreLocation) -> Vec<Line> {
    let problem = |entry: &str, message: String| Line {
        entry: entry.into(),
        severity: Severity::Problem,
        message,
    };
    match location {
        StoreLocation::Embedded(path) => embedded_problem(path)
            .map(|m| problem("[store] path", m))
            .into_iter()
            .collect(),
        StoreLocation::Postgres { url, tls, .. } => {
            let mut lines = Vec::new();
            if let Some(tls) = tls {
                if let Err(e) = dqkd_pki::load_certs(&tls.ca) {
                    lines.push(problem("[store] ca", e.to_string()));
                }
                if let Some(client) = &tls.client {
                    if let Err(e) = dqkd_pki::load_certs(&client.cert) {
                        lines.push(problem("[store] cert", e.to_string()));
                    }
                    if let Err(e) = dqkd_pki::load_private_key(&client.key) {
                        lines.push(problem("[store] key", e.to_string()));
                    }
                }
            }
            if let Some(message) = unreachable_database(url) {
                lines.push(problem("[store] url", message));
            }
            lines
        }
    }
}

/// Why the embedded store at `path` could not be opened for writing. The store makes
/// missing folders itself, so the nearest folder that exists must take a new file.
fn embedded_problem(path: &Path) -> Option<String> {
    if path.is_dir() {
        return Some(format!("{} is a folder, not a store file", path.display()));
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .err()
            .map(|e| format!("{}: cannot open for writing: {e}", path.display()));
    }
    let mut folder = path.parent().unwrap_or(Path::new("."));
    while !folder.as_os_str().is_empty() && !folder.exists() {
        folder = folder.parent().unwrap_or(Path::new("."));
    }
    if folder.as_os_str().is_empty() {
        folder = Path::new(".");
    }
    if !folder.is_dir() {
        return Some(format!(
            "{} cannot be made: {} is not a folder",
            path.display(),
            folder.display()
        ));
    }
    tempfile::NamedTempFile::new_in(folder).err().map(|e| {
        format!(
            "{} cannot be made: no new file can be written in {}: {e}",
            path.display(),
            folder.display()
        )
    })
}

/// `None` when some host of the URL accepts a TCP connection. Messages name hosts and
/// ports only: the URL may carry a password.
fn unreachable_database(url: &str) -> Option<String> {
    let endpoints = match dqkd_store_postgres::url_tcp_endpoints(url) {
        Ok(endpoints) => endpoints,
        Err(e) => return Some(e.to_string()),
    };
    if endpoints.is_empty() {
        return None; // Unix sockets only: nothing cheap to try from here.
    }
    let mut tried = Vec::new();
    for (host, port) in &endpoints {
        let addrs = (host.as_str(), *port).to_socket_addrs();
        let reached = addrs.is_ok_and(|mut addrs| {
            addrs.any(|addr| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).is_ok())
        });
        if reached {
            return None;
        }
        tried.push(format!("{host}:{port}"));
    }
    Some(format!(
        "the database does not accept connections at {}",
        tried.join(", ")
    ))
}
