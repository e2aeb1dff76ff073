//! `NAME=PATH` arguments: memory-image files mapped as RAM blocks.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use multifd::{BlockAnnouncement, GuestMemory, RamBlock};

use crate::outputs::Outputs;

/// One `--ram NAME=PATH` argument.
#[derive(Debug, Clone)]
pub struct RamFile {
    /// The RAM block's name.
    pub name: String,
    /// The image file.
    pub path: PathBuf,
}

impl FromStr for RamFile {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(Self {
                name: name.into(),
                path: path.into(),
            }),
            _ => Err(format!("{text:?} is not NAME=PATH")),
        }
    }
}

/// Maps each file read-only as the block of its name, in argument order, guarded
/// against the file shrinking during the send (see [`crate::shrink_guard`]).
pub fn map_for_sending(files: &[RamFile]) -> Result<GuestMemory> {
    let blocks = files
        .iter()
        .map(|file| {
            let handle = File::open(&file.path)
                .with_context(|| format!("cannot open {}", file.path.display()))?;
            Ok(RamBlock::map_file(&file.name, &handle, false)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let memory = GuestMemory::new(blocks)?;
    crate::shrink_guard::guard(&memory)?;
    Ok(memory)
}

/// Creates a new file (in `outputs`, renamed into place on success) for every announced
/// block, with its disk space reserved at the announced length, and maps it writable; the
/// new files are all zeros. A
/// block without a `NAME=PATH` is an error.
pub fn create_for_receiving(
    files: &[RamFile],
    announced: &[BlockAnnouncement],
    outputs: &Outputs,
) -> Result<GuestMemory> {
    let blocks = announced
        .iter()
        .map(|block| {
            let Some(file) = files.iter().find(|file| file.name == block.name) else {
                bail!(
                    "ramblock {:?} announced by the source has no --ram mapping",
                    block.name
                );
            };
            let handle = outputs.create(&file.path)?;
            reserve(&handle, block.length).with_context(|| {
                format!(
                    "cannot reserve {} bytes for ramblock {:?} at {}",
                    block.length,
                    block.name,
                    file.path.display()
                )
            })?;
            Ok(RamBlock::map_file(&block.name, &handle, true)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GuestMemory::new(blocks)?)
}

/// Gives `file` `length` bytes of disk now. A page written later through the mapping can
/// then never find the disk full, which would end the process with `SIGBUS` instead of an
/// error; a full disk is reported here, before the migration starts.
fn reserve(file: &File, length: u64) -> std::io::Result<()> {
    let length = libc::off_t::try_from(length)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: posix_fallocate only reads the descriptor and the two integers; `file` keeps
    // the descriptor open for the call.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, length) } {
        0 => Ok(()),
        code => Err(std::io::Error::from_raw_os_error(code)),
    }
}
