//! Positioned, vectored file I/O between guest memory and a snapshot file.
//!
//! Guest memory is only ever described to the kernel by raw `iovec`s (`pwritev` from it,
//! `preadv` into it): the guest may be writing it during a live save, so no Rust slice
//! over it may exist. That is why these calls go through `libc` rather than a safe
//! wrapper taking `IoSlice`s (which are slices). The same holds for the bitmap of pages
//! present, shared by the writer threads as atomics.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;
use crate::ram::GuestMemory;
use crate::transport::transfer_all;

/// Alignment `O_DIRECT` needs of memory addresses, lengths and file offsets: 4 KiB
/// covers both logical block sizes disks use (512 bytes and 4 KiB). Guest pages of 4 KiB
/// or more in page-aligned mappings meet it, and so does every page's file offset
/// (1 MiB-aligned block + whole pages).
const DIRECT_IO_ALIGNMENT: u64 = 4096;

/// Refuses `O_DIRECT` for a page size or a block address it cannot serve: guest memory
/// is read or written where it is, so it must be aligned as the disk needs.
pub(crate) fn check_direct_io(page_size: u32, memory: &GuestMemory) -> Result<(), Error> {
    if !u64::from(page_size).is_multiple_of(DIRECT_IO_ALIGNMENT) {
        return Err(Error::Config(format!(
            "O_DIRECT needs a page size that is a multiple of {DIRECT_IO_ALIGNMENT}"
        )));
    }
    for block in memory.blocks() {
        if !(block.as_ptr() as u64).is_multiple_of(DIRECT_IO_ALIGNMENT) {
            return Err(Error::Config(format!(
                "O_DIRECT needs ramblock {:?} at a {DIRECT_IO_ALIGNMENT}-byte aligned address",
                block.name()
            )));
        }
    }
    Ok(())
}

/// Turns an I/O error on the snapshot file at `path` while doing `context` into the
/// error to report, for `map_err`.
pub(crate) fn snapshot_io(path: &Path, context: &'static str) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::SnapshotIo {
        path,
        context,
        source,
    }
}

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From memory to the file (`pwritev`).
    Write,
    /// From the file to memory (`preadv`).
    Read,
}

/// Moves every byte the iovecs describe to or from `file` at `offset`, resuming after
/// partial transfers and interruptions. A read that hits the end of the file is
/// `UnexpectedEof`, a write that moves nothing `WriteZero`.
///
/// # Safety
///
/// Every iovec must describe memory that stays mapped until this returns: readable for a
/// write (it may change meanwhile), writable and unaliased by any Rust reference for a
/// read.
pub(crate) unsafe fn transfer_at(
    file: &File,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    direction: Direction,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let total: u64 = iovecs.iter().map(|iovec| iovec.iov_len as u64).sum();
    if offset
        .checked_add(total)
        .is_none_or(|end| libc::off_t::try_from(end).is_err())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "offset past 2^63",
        ));
    }
    let on_zero = match direction {
        Direction::Write => io::ErrorKind::WriteZero,
        Direction::Read => io::ErrorKind::UnexpectedEof,
    };
    transfer_all(iovecs, on_zero, |remaining, count| {
        // Within `off_t`: the whole transfer's end was checked above.
        let position = offset as libc::off_t;
        let count = count as libc::c_int;
        let done = match direction {
            // SAFETY: the iovecs describe mapped, readable memory (contract above);
            // `count` is within the slice.
            Direction::Write => unsafe { libc::pwritev(fd, remaining.as_ptr(), count, position) },
            // SAFETY: the iovecs describe mapped, writable, unaliased memory (contract
            // above); `count` is within the slice.
            Direction::Read => unsafe { libc::preadv(fd, remaining.as_ptr(), count, position) },
        };
        if done > 0 {
            offset += done as u64;
        }
        done
    })
}

/// Allocates `length` bytes at `offset` as unwritten extents: they read as zeros and
/// take disk space, but no byte is written.
pub(crate) fn preallocate(file: &File, offset: u64, length: u64) -> io::Result<()> {
    fallocate(file, 0, offset, length)
}

/// Deallocates `length` bytes at `offset` so they read as zeros, without changing the
/// file's length.
pub(crate) fn punch_hole(file: &File, offset: u64, length: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        length,
    )
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
    let (Ok(offset), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length))
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range past 2^63",
        ));
    };
    // SAFETY: fallocate only reads the descriptor and the integers; `file` keeps the
    // descriptor open for the call.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, length) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Per block, one bit per page: is the page in the file? Set and cleared by the writer
/// threads (pages of one word may be on different threads), read at the end.
#[derive(Debug)]
pub(crate) struct PresentPages {
    blocks: Vec<Vec<AtomicU64>>,
}

impl PresentPages {
    /// No page present, for blocks of these page counts.
    pub(crate) fn new(pages: impl IntoIterator<Item = u64>) -> Self {
        Self {
            blocks: pages
                .into_iter()
                .map(|pages| (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    /// Marks `page` of `block` present.
    pub(crate) fn set(&self, block: usize, page: u64) {
        let bit = 1u64 << (page % 64);
        self.blocks[block][(page / 64) as usize].fetch_or(bit, Ordering::Relaxed);
    }

    /// Marks `page` of `block` absent; returns whether it was present.
    pub(crate) fn clear(&self, block: usize, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.blocks[block][(page / 64) as usize].fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }

    /// The bitmaps as they are now.
    pub(crate) fn bitmaps(&self) -> Vec<Vec<u64>> {
        self.blocks
            .iter()
            .map(|words| {
                words
                    .iter()
                    .map(|word| word.load(Ordering::Relaxed))
                    .collect()
            })
            .collect()
    }
}
