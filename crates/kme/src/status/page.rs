//! The status page as one self-contained HTML document: inline style, no script, no
//! external resource, reloaded by the browser every few seconds. Rendered from the same
//! [`Snapshot`] that `/status.json` serves.

use std::fmt::Write as _;

use super::Snapshot;

/// Seconds between reloads of an open page.
const RELOAD_SECS: u32 = 5;
/// Days left under which a certificate is shown as a warning.
const WARN_DAYS: f64 = 30.0;

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d232a;background:#f7f8fa}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}\
.sub{color:#5b6570;margin-bottom:1em}\
table{border-collapse:collapse;background:#fff;min-width:28em}\
th,td{border:1px solid #d8dde3;padding:.3em .7em;text-align:left}th{background:#eef1f4}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#176b2c;font-weight:600}.bad{color:#b3261e;font-weight:600}.warn{color:#9a5b00;font-weight:600}\
.grid{display:flex;flex-wrap:wrap;gap:0 2.5em}";

/// The page.
pub(crate) fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{RELOAD_SECS}\">\
         <title>dqkd {site} status</title><style>{STYLE}</style></head><body>\
         <h1>dqkd site {site}</h1><div class=\"sub\">cluster <b>{cluster}</b> · up {uptime} · \
         <span id=\"generated\" data-at=\"{at}\">figures of {when}</span> · \
         <a href=\"status.json\">JSON</a> · <a href=\"metrics\">metrics</a></div><div class=\"grid\">",
        site = esc(&s.kme_id),
        cluster = esc(&s.cluster),
        uptime = duration(s.uptime_secs),
        at = s.generated_at,
        when = date(s.generated_at),
    );

    section(
        &mut out,
        "sites",
        "Sites",
        &["KME", "ETSI API", "peer API", "SAEs"],
        |out| {
            for site in &s.sites {
                let this = if site.this_site { " (this site)" } else { "" };
                row(
                    out,
                    &format!("data-site=\"{}\"", esc(&site.kme_id)),
                    &[
                        format!("{}{this}", esc(&site.kme_id)),
                        esc(&site.api_addr),
                        esc(site.peer_addr.as_deref().unwrap_or("–")),
                        num(site.saes as u64),
                    ],
                );
            }
        },
    );

    section(
        &mut out,
        "peers",
        "Peer sites",
        &["KME", "state", "round trip", "why"],
        |out| {
            for peer in &s.peers {
                row(
                    out,
                    &format!(
                        "data-peer=\"{}\" data-reachable=\"{}\"",
                        esc(&peer.kme_id),
                        peer.reachable
                    ),
                    &[
                        esc(&peer.kme_id),
                        state(peer.reachable, "reachable", "unreachable"),
                        peer.round_trip_ms.map_or("–".into(), ms),
                        esc(peer.error.as_deref().unwrap_or("")),
                    ],
                );
            }
            if s.peers.is_empty() {
                out.push_str("<tr><td colspan=\"4\">no other site</td></tr>");
            }
        },
    );

    section(
        &mut out,
        "pools",
        "Ready-key pools",
        &["toward", "ready", "target", "refill"],
        |out| {
            for pool in &s.pools {
                row(
                    out,
                    &format!(
                        "data-pool=\"{}\" data-ready=\"{}\"",
                        esc(&pool.peer),
                        pool.ready
                    ),
                    &[
                        esc(&pool.peer),
                        num(pool.ready),
                        num(pool.target),
                        pool.refill_per_sec
                            .map_or("measuring…".into(), |r| format!("{r:.0} keys/s")),
                    ],
                );
            }
            if s.pools.is_empty() {
                out.push_str("<tr><td colspan=\"4\">no pools (every key made on demand)</td></tr>");
            }
        },
    );

    section(
        &mut out,
        "entropy",
        "Entropy servers",
        &["server", "state", "round trip", "why"],
        |out| {
            for server in &s.entropy {
                row(
                    out,
                    &format!(
                        "data-entropy=\"{}\" data-healthy=\"{}\"",
                        esc(&server.id),
                        server.healthy
                    ),
                    &[
                        esc(&server.id),
                        state(server.healthy, "healthy", "unhealthy"),
                        server.round_trip_ms.map_or("–".into(), ms),
                        esc(server.error.as_deref().unwrap_or("")),
                    ],
                );
            }
        },
    );

    section(&mut out, "keys", "Keys held", &["what", "count"], |out| {
        row(
            out,
            "data-keys=\"waiting\"",
            &[
                "waiting for this site's SAEs (per SAE)".into(),
                num(s.keys.waiting),
            ],
        );
        row(
            out,
            "data-keys=\"ready\"",
            &["ready in pools".into(), num(s.keys.ready)],
        );
    });

    section(
        &mut out,
        "tls",
        "Negotiated key exchange",
        &["listener", "group", "handshakes"],
        |out| {
            for tls in &s.tls {
                row(
                    out,
                    &format!("data-listener=\"{}\"", esc(&tls.listener)),
                    &[esc(&tls.listener), esc(&tls.group), num(tls.handshakes)],
                );
            }
            if s.tls.is_empty() {
                out.push_str("<tr><td colspan=\"3\">no handshake yet</td></tr>");
            }
        },
    );

    section(
        &mut out,
        "certificates",
        "Certificates",
        &["which", "expires", "days left", "file"],
        |out| {
            for cert in &s.certificates {
                let days = match cert.days_left {
                    Some(d) if d < 0.0 => {
                        format!("<span class=\"bad\">expired {:.0} days ago</span>", -d)
                    }
                    Some(d) if d < WARN_DAYS => format!("<span class=\"warn\">{d:.1}</span>"),
                    Some(d) => format!("<span class=\"ok\">{d:.0}</span>"),
                    None => "<span class=\"bad\">unreadable</span>".into(),
                };
                row(
                    out,
                    &format!("data-certificate=\"{}\"", esc(&cert.certificate)),
                    &[
                        esc(&cert.certificate),
                        cert.expires_at.map_or("–".into(), date),
                        days,
                        esc(&cert.path),
                    ],
                );
            }
        },
    );

    section(
        &mut out,
        "requests",
        "Requests since start",
        &["all", "4xx", "5xx"],
        |out| {
            let server = if s.requests.server_errors > 0 {
                format!("<span class=\"bad\">{}</span>", s.requests.server_errors)
            } else {
                num(0)
            };
            row(
                out,
                "data-requests",
                &[num(s.requests.total), num(s.requests.client_errors), server],
            );
        },
    );
    out.push_str("</div>");

    section(
        &mut out,
        "errors",
        "Recent warnings and errors (this process)",
        &["time", "level", "message"],
        |out| {
            for e in &s.recent_errors {
                row(out, "", &[date(e.at), esc(&e.level), esc(&e.message)]);
            }
            if s.recent_errors.is_empty() {
                out.push_str("<tr><td colspan=\"3\">none</td></tr>");
            }
        },
    );
    out.push_str("</body></html>\n");
    out
}

fn section(
    out: &mut String,
    id: &str,
    title: &str,
    heads: &[&str],
    rows: impl FnOnce(&mut String),
) {
    let _ = write!(out, "<section id=\"{id}\"><h2>{title}</h2><table><tr>");
    for head in heads {
        let _ = write!(out, "<th>{head}</th>");
    }
    out.push_str("</tr>");
    rows(out);
    out.push_str("</table></section>");
}

/// One row; cells are HTML already.
fn row(out: &mut String, attributes: &str, cells: &[String]) {
    let _ = write!(out, "<tr {attributes}>");
    for cell in cells {
        let class = if cell.starts_with(|c: char| c.is_ascii_digit()) {
            " class=\"n\""
        } else {
            ""
        };
        let _ = write!(out, "<td{class}>{cell}</td>");
    }
    out.push_str("</tr>");
}

fn state(good: bool, yes: &str, no: &str) -> String {
    if good {
        format!("<span class=\"ok\">{yes}</span>")
    } else {
        format!("<span class=\"bad\">{no}</span>")
    }
}

fn num(n: u64) -> String {
    n.to_string()
}

fn ms(ms: f64) -> String {
    format!("{ms:.1} ms")
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// `YYYY-MM-DD hh:mm:ss UTC` of a Unix time.
fn date(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Text made safe for HTML.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_escapes() {
        assert_eq!(date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(date(1_764_561_645), "2025-12-01 04:00:45 UTC");
        assert_eq!(date(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
