//! `dqkd completions` and `dqkd man` run, and what they print covers the real commands.

mod common;

use std::process::Command;

use common::{dqkd, path_str};

#[test]
fn completions_cover_every_shell_and_command() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = dqkd(&["completions", shell]);
        for command in ["check", "kme", "pki", "completions"] {
            assert!(script.contains(command), "{shell}: no {command}");
        }
    }
    // The bash script must at least parse.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dqkd.bash");
    std::fs::write(&file, dqkd(&["completions", "bash"])).expect("write");
    let status = Command::new("bash")
        .arg("-n")
        .arg(&file)
        .status()
        .expect("bash runs");
    assert!(status.success(), "bash -n refused the completion script");
}

#[test]
fn man_prints_a_page_and_writes_one_per_command() {
    let page = dqkd(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH dqkd"),
        "{page}"
    );
    assert!(page.contains("check"), "{page}");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("man1");
    dqkd(&["man", "--out", path_str(&out)]);
    for page in ["dqkd.1", "dqkd-check.1", "dqkd-kme.1", "dqkd-pki.1"] {
        let text = std::fs::read_to_string(out.join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page} missing or empty");
    }
}
