//! Writing output files without clobbering anything by accident.
//!
//! Certificates and keys are precious: overwriting a KME key silently would cut
//! it off from its peers. So every write is `create_new` (O_EXCL) unless the
//! caller passed `force`, and secret files are created with mode 0600 so there
//! is no window in which they are world-readable.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{PkiError, Result};

/// Whether a file holds private-key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secrecy {
    /// Certificates only: mode 0644.
    Public,
    /// Contains a private key: mode 0600.
    Secret,
}

/// One file to be written, prepared fully in memory first so that a failure
/// while building (say) the PKCS#12 bundle leaves nothing half-written.
pub(crate) struct OutFile {
    pub(crate) path: PathBuf,
    pub(crate) contents: zeroize::Zeroizing<Vec<u8>>,
    pub(crate) secrecy: Secrecy,
}

/// Fails with [`PkiError::AlreadyExists`] for the first path that exists, unless `force`.
pub(crate) fn ensure_free<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    force: bool,
) -> Result<()> {
    if force {
        return Ok(());
    }
    for path in paths {
        // symlink_metadata so that a dangling symlink also counts as "exists".
        if fs::symlink_metadata(path).is_ok() {
            return Err(PkiError::AlreadyExists {
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// Creates `dir` (and parents) if needed.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| PkiError::io("creating directory", dir, e))
}

/// Writes all files; each is created fresh (replacing an old one only if `force`).
pub(crate) fn write_all(files: &[OutFile], force: bool) -> Result<()> {
    ensure_free(files.iter().map(|f| f.path.as_path()), force)?;
    for file in files {
        write_new(file, force)?;
    }
    Ok(())
}

fn write_new(file: &OutFile, force: bool) -> Result<()> {
    let path = &file.path;
    if force {
        // Remove rather than truncate: an old file's looser mode must not survive.
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PkiError::io("removing", path, e)),
        }
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match file.secrecy {
            Secrecy::Secret => 0o600,
            Secrecy::Public => 0o644,
        });
    }
    let mut handle = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists { path: path.clone() }
        } else {
            PkiError::io("creating", path, e)
        }
    })?;
    handle
        .write_all(&file.contents)
        .and_then(|()| handle.sync_all())
        .map_err(|e| PkiError::io("writing", path, e))
}

/// Reads a whole text file, naming it in the error.
pub(crate) fn read_to_string(path: &Path) -> Result<zeroize::Zeroizing<String>> {
    fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| PkiError::io("reading", path, e))
}
