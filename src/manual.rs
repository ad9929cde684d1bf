//! `dqkd completions` and `dqkd man`: generated from the same argument definitions the
//! binary parses, so they never drift from it. Nothing installs them; docs/operating.md shows how.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::args::Cli;

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command, "dqkd", &mut out);
    out.flush().context("writing the completion script")
}

/// Writes the top-level manual page to stdout, or every page into `out`.
pub fn man(out: Option<&Path>) -> anyhow::Result<()> {
    let command = Cli::command();
    match out {
        None => {
            let mut stdout = std::io::stdout().lock();
            clap_mangen::Man::new(command)
                .render(&mut stdout)
                .context("writing the manual page")?;
            stdout.flush().context("writing the manual page")
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))
        }
    }
}
