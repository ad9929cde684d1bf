//! The files under deploy/: systemd units that `systemd-analyze` accepts and rates as
//! hardened, alert rules that `promtool` accepts and whose unit tests pass, and a Grafana
//! dashboard that is JSON and queries only metrics the code exports.
//!
//! A missing tool prints a loud SKIPPED line, and fails instead under `DQKD_TEST_REQUIRE=1`
//! (CI installs both).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::BIN;

/// Metrics the rules or the dashboard may name before the code exports them, each with
/// the reason. Remove an entry once its metric is in the code.
const PENDING_METRICS: &[(&str, &str)] = &[];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `tool` runs; when it does not, SKIPPED (or a failure under DQKD_TEST_REQUIRE=1).
fn have(tool: &str, version_arg: &str, package: &str) -> bool {
    if Command::new(tool).arg(version_arg).output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("DQKD_TEST_REQUIRE").as_deref() != Ok("1"),
        "{tool} is required (DQKD_TEST_REQUIRE=1): apt-get install {package}"
    );
    eprintln!("!!! SKIPPED: {tool} is not installed (Debian: {package}); deploy/ was NOT checked with it !!!");
    false
}

fn run(command: &mut Command) -> (bool, String) {
    let out = command.output().expect("the tool runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn systemd_units_verify_and_are_hardened() {
    if !have("systemd-analyze", "--version", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for unit in ["dqkd-kme.service", "dqkd-entropy.service"] {
        let text =
            std::fs::read_to_string(root().join("deploy/systemd").join(unit)).expect("unit file");
        assert!(text.contains("/usr/local/bin/dqkd "), "{unit}");
        // verify insists that the binary exists: point the unit at the one just built.
        let copy = dir.path().join(unit);
        std::fs::write(&copy, text.replace("/usr/local/bin/dqkd", BIN)).expect("copy");
        let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
        // Unknown or misspelt settings are only warnings there: any output is a failure.
        assert!(ok && out.trim().is_empty(), "{unit}: {out}");
        // Exposure 0-100 (shown as 0.0-10.0): 20 is well inside "OK".
        let (ok, out) = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
            .arg(&copy));
        assert!(ok, "{unit} is not hardened enough:\n{out}");
    }
}

#[test]
fn alert_rules_pass_promtool() {
    if !have("promtool", "--version", "prometheus") {
        return;
    }
    let dir = root().join("deploy/prometheus");
    let (ok, out) = run(Command::new("promtool")
        .args(["check", "rules", "dqkd-alerts.yml"])
        .current_dir(&dir));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("promtool")
        .args(["test", "rules", "dqkd-alerts.test.yml"])
        .current_dir(&dir));
    assert!(ok, "{out}");
}

#[test]
fn dashboard_is_json_with_queries() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/dqkd-cluster.json"))
        .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            assert!(!metric_names(expr).is_empty(), "{expr}");
        }
    }
}

#[test]
fn rules_and_dashboard_name_only_exported_metrics() {
    let sources = rust_sources();
    let mut checked = 0;
    for file in [
        "deploy/prometheus/dqkd-alerts.yml",
        "deploy/grafana/dqkd-cluster.json",
    ] {
        let text = std::fs::read_to_string(root().join(file)).expect("file");
        for name in metric_names(&text) {
            let base = exported_name(&name);
            if PENDING_METRICS.iter().any(|(pending, _)| *pending == base) {
                continue;
            }
            assert!(
                sources.iter().any(|s| names_metric(s, base)),
                "{file} queries {name}, but no source file exports {base}"
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} metric names found");
}

/// Every `dqkd_…` name in a text.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("dqkd_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `dqkd_…` preceded by a letter is part of a longer word, not a metric.
        let before = rest[..at].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The name the code registers: histograms are queried through their series suffixes.
fn exported_name(name: &str) -> &str {
    ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|base| {
            base.ends_with("_seconds") || base.ends_with("_keys") || base.ends_with("_ops")
        })
        .unwrap_or(name)
}

/// `name` occurs in `source` as a whole word.
fn names_metric(source: &str, name: &str) -> bool {
    source.match_indices(name).any(|(at, _)| {
        let next = source[at + name.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The text of every Rust source file outside tests.
fn rust_sources() -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root().join("crates"), root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name() != Some("tests".as_ref()) {
                    stack.push(path);
                }
            } else if path.extension() == Some("rs".as_ref()) {
                out.push(std::fs::read_to_string(&path).expect("source"));
            }
        }
    }
    assert!(
        out.len() > 20,
        "found too few sources under {}",
        root().display()
    );
    out
}
