//! `dqkd status`: the status page of each site, for a terminal. It reads the same JSON the
//! page is made from (`/status.json` on each site's metrics listener) and exits 1 when
//! something needs an operator: a site or peer that does not answer, an unhealthy entropy
//! server, a certificate within 30 days of its end, or server errors.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use dqkd_kme::status::Snapshot;

use crate::args::StatusArgs;

/// Days left under which a certificate counts as a problem.
const WARN_DAYS: f64 = 30.0;

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let urls = if args.urls.is_empty() {
        site_urls(&args.dir)?
    } else {
        args.urls.clone()
    };
    anyhow::ensure!(
        !urls.is_empty(),
        "no site to ask: pass --url, or --dir with site files that set metrics_listen"
    );
    let mut healthy = true;
    let mut snapshots = Vec::new();
    for url in &urls {
        match fetch(url).await {
            Ok(snapshot) => {
                healthy &= problems(&snapshot).is_empty();
                snapshots.push((url.clone(), Some(snapshot)));
            }
            Err(e) => {
                healthy = false;
                if !args.json {
                    println!("{url}: no answer ({e:#})\n");
                }
                snapshots.push((url.clone(), None));
            }
        }
    }
    if args.json {
        let all: Vec<_> = snapshots.iter().filter_map(|(_, s)| s.as_ref()).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for snapshot in snapshots.iter().filter_map(|(_, s)| s.as_ref()) {
            print!("{}", render(snapshot));
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The metrics listeners named by the site files in `dir`.
fn site_urls(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("site-") && n.ends_with(".toml"))
        })
        .collect();
    files.sort();
    let mut urls = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let site: dqkd_kme::SiteFile =
            toml::from_str(&text).with_context(|| format!("reading {}", file.display()))?;
        if let Some(addr) = site.metrics_listen {
            urls.push(format!("http://{addr}"));
        }
    }
    Ok(urls)
}

async fn fetch(url: &str) -> anyhow::Result<Snapshot> {
    let addr = url
        .strip_prefix("http://")
        .context("the status URL must start with http:// (the metrics listener is plain HTTP)")?
        .trim_end_matches('/');
    let body = http_get(addr, "/status.json").await?;
    serde_json::from_str(&body).context("reading the status JSON")
}

/// The body of a plain-HTTP `GET path` to `addr` (`host:port`) answered 200.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within 5 s"))?
        .with_context(|| format!("asking {addr}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("an answer without HTTP headers")?;
    let status = head.lines().next().unwrap_or("");
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "{addr}{path} answered {status:?}"
    );
    Ok(body.to_owned())
}

/// What needs an operator, one line each.
fn problems(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for peer in s.peers.iter().filter(|p| !p.reachable) {
        out.push(format!("peer {} unreachable", peer.kme_id));
    }
    for server in s.entropy.iter().filter(|e| !e.healthy) {
        out.push(format!("entropy server {} unhealthy", server.id));
    }
    for cert in &s.certificates {
        match cert.days_left {
            Some(days) if days < WARN_DAYS => {
                out.push(format!("{} ends in {days:.1} days", cert.certificate))
            }
            None => out.push(format!("{} unreadable", cert.certificate)),
            _ => {}
        }
    }
    if s.requests.server_errors > 0 {
        out.push(format!("{} server errors (5xx)", s.requests.server_errors));
    }
    out
}

/// One site as a block of text.
fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  (cluster {}, up {} s)",
        s.kme_id, s.cluster, s.uptime_secs
    );
    let mut line = |label: &str, items: Vec<String>| {
        let text = if items.is_empty() {
            "–".to_owned()
        } else {
            items.join(" · ")
        };
        let _ = writeln!(out, "  {label:<11}{text}");
    };
    line(
        "sites",
        s.sites
            .iter()
            .map(|site| format!("{} ({} SAEs) {}", site.kme_id, site.saes, site.api_addr))
            .collect(),
    );
    line(
        "peers",
        s.peers
            .iter()
            .map(|p| match (p.reachable, p.round_trip_ms) {
                (true, Some(ms)) => format!("{} reachable {ms:.1} ms", p.kme_id),
                (true, None) => format!("{} reachable", p.kme_id),
                (false, _) => format!(
                    "{} UNREACHABLE ({})",
                    p.kme_id,
                    p.error.as_deref().unwrap_or("no answer")
                ),
            })
            .collect(),
    );
    line(
        "pools",
        s.pools
            .iter()
            .map(|p| {
                let rate = p
                    .refill_per_sec
                    .map_or("measuring".to_owned(), |r| format!("{r:.0} keys/s"));
                format!("→{} {}/{} ready, refill {rate}", p.peer, p.ready, p.target)
            })
            .collect(),
    );
    line(
        "entropy",
        s.entropy
            .iter()
            .map(|e| match (e.healthy, e.round_trip_ms) {
                (true, Some(ms)) => format!("{} healthy {ms:.1} ms", e.id),
                (true, None) => format!("{} healthy", e.id),
                (false, _) => format!(
                    "{} UNHEALTHY ({})",
                    e.id,
                    e.error.as_deref().unwrap_or("no answer")
                ),
            })
            .collect(),
    );
    line(
        "keys held",
        vec![
            format!("{} waiting for SAEs", s.keys.waiting),
            format!("{} ready in pools", s.keys.ready),
        ],
    );
    line(
        "tls",
        s.tls
            .iter()
            .map(|t| format!("{} {} ×{}", t.listener, t.group, t.handshakes))
            .collect(),
    );
    line(
        "certs",
        s.certificates
            .iter()
            .map(|c| match c.days_left {
                Some(days) => format!("{} {days:.0} days", c.certificate),
                None => format!("{} UNREADABLE", c.certificate),
            })
            .collect(),
    );
    line(
        "requests",
        vec![format!(
            "{} total, {} 4xx, {} 5xx",
            s.requests.total, s.requests.client_errors, s.requests.server_errors
        )],
    );
    line(
        "recent",
        s.recent_errors
            .iter()
            .take(3)
            .map(|e| format!("{} {}", e.level, e.message))
            .collect(),
    );
    let problems = problems(s);
    if problems.is_empty() {
        let _ = writeln!(out, "  => ok");
    } else {
        let _ = writeln!(out, "  => NEEDS ATTENTION: {}", problems.join("; "));
    }
    out.push('\n');
    out
}
