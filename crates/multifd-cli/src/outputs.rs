//! The files a receive writes. Each is written under a temporary name beside its final
//! one and renamed into place only once the whole migration succeeded: a failed receive
//! leaves every existing file as it was, and a receive into the very file a local `send`
//! is reading never truncates it under the sender.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use tempfile::NamedTempFile;

/// One output the operator named: the flag it came from, the name it goes by (a block or
/// a device), and its path.
#[derive(Debug, Clone, Copy)]
pub struct Output<'a> {
    /// The flag, for messages: `--ram` or `--device`.
    pub flag: &'static str,
    /// The block name or device id it is for.
    pub name: &'a str,
    /// Where it goes.
    pub path: &'a Path,
}

/// Refuses, before anything listens, outputs that could only fail or lose data once a
/// source connected: a name or a path given twice, a missing directory, a directory
/// where a file should go.
pub fn check(outputs: &[Output<'_>]) -> Result<()> {
    let mut names = HashSet::new();
    let mut paths = HashSet::new();
    for output in outputs {
        if !names.insert((output.flag, output.name)) {
            bail!("{}: {} is given twice", output.flag, output.name);
        }
        if output.path.is_dir() {
            bail!(
                "{} {}: {} is a directory",
                output.flag,
                output.name,
                output.path.display()
            );
        }
        let directory = directory_of(output.path);
        let directory = directory.canonicalize().with_context(|| {
            format!(
                "{} {}: no directory {}",
                output.flag,
                output.name,
                directory.display()
            )
        })?;
        let file_name = output.path.file_name().unwrap_or_default();
        if !paths.insert(directory.join(file_name)) {
            bail!(
                "{} {}: {} is already the output of another --ram or --device",
                output.flag,
                output.name,
                output.path.display()
            );
        }
    }
    Ok(())
}

/// The directory `path` is in (the current one for a bare file name).
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Output files being written, renamed into place by [`Outputs::commit`] or removed when
/// dropped without it.
#[derive(Debug, Default)]
pub struct Outputs {
    pending: Mutex<Vec<(NamedTempFile, PathBuf)>>,
}

impl Outputs {
    /// A new, empty file to be renamed to `path` on commit; returns a handle to it.
    pub fn create(&self, path: &Path) -> Result<File> {
        let temporary = Self::temporary(path)?;
        let handle = temporary
            .reopen()
            .with_context(|| format!("cannot open {}", temporary.path().display()))?;
        self.keep(temporary, path);
        Ok(handle)
    }

    /// A new, empty file to be renamed to `path` on commit; returns its temporary path,
    /// for code that opens the file itself.
    pub fn create_path(&self, path: &Path) -> Result<PathBuf> {
        let temporary = Self::temporary(path)?;
        let temporary_path = temporary.path().to_owned();
        self.keep(temporary, path);
        Ok(temporary_path)
    }

    fn temporary(path: &Path) -> Result<NamedTempFile> {
        tempfile::Builder::new()
            .prefix(&format!(
                ".{}.",
                path.file_name().unwrap_or_default().to_string_lossy()
            ))
            .suffix(".multifd-partial")
            .tempfile_in(directory_of(path))
            .with_context(|| format!("cannot create a file beside {}", path.display()))
    }

    fn keep(&self, temporary: NamedTempFile, path: &Path) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((temporary, path.to_owned()));
    }

    /// Renames every file into place: the migration succeeded.
    pub fn commit(self) -> Result<()> {
        let pending = self
            .pending
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        for (temporary, path) in pending {
            temporary.persist(&path).with_context(|| {
                format!("cannot rename the received file to {}", path.display())
            })?;
        }
        Ok(())
    }
}
