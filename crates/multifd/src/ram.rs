//! Guest RAM: named blocks of memory the VMM owns, and the destination's record of which
//! pages it has received.

use std::any::Any;
use std::fs::File;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut, MmapOptions, MmapRaw};

use crate::error::Error;

/// A named, contiguous range of guest memory.
///
/// The engine reads (source) or writes (destination) it only through raw pointers: with
/// vectored socket I/O, volatile loads for zero detection and volatile stores to zero a
/// page, so the guest may keep changing it during a live migration.
#[derive(Debug, Clone)]
pub struct RamBlock {
    name: String,
    host: NonNull<u8>,
    length: u64,
    /// Whether the memory may be written: only such a block can receive a migration.
    writable: bool,
    /// Keeps the memory's owner (a mapping the engine was handed, a vm-memory region)
    /// alive for as long as the block is used.
    _owner: Option<Arc<dyn Any + Send + Sync>>,
    /// The file a block from [`RamBlock::map_file`] maps, to check that it still covers
    /// the block: past a file's end a mapping has no pages.
    file: Option<Arc<File>>,
}

// SAFETY: a RamBlock is a pointer into memory that the VMM keeps mapped for the block's
// lifetime (contract of `from_raw_parts`, or guaranteed by the owned mapping). The engine
// never forms references into it, only raw, volatile or kernel accesses, so sharing the
// pointer between threads cannot create aliasing references.
unsafe impl Send for RamBlock {}
// SAFETY: see `Send`: all accesses go through raw pointers.
unsafe impl Sync for RamBlock {}

impl RamBlock {
    /// A block over memory the VMM owns.
    ///
    /// # Safety
    ///
    /// `host` must point to `length` bytes that stay mapped readable and writable until
    /// every migration using this block has returned, and that no Rust reference aliases
    /// while a destination writes them.
    pub unsafe fn from_raw_parts(name: impl Into<String>, host: NonNull<u8>, length: u64) -> Self {
        Self {
            name: name.into(),
            host,
            length,
            writable: true,
            _owner: None,
            file: None,
        }
    }

    /// A block over memory that `owner` keeps mapped: a mapping the engine was handed,
    /// or a vm-memory region.
    ///
    /// # Safety
    ///
    /// `host` must point to `length` bytes that stay mapped readable (and writable if
    /// `writable`) while `owner` lives, under the aliasing rules of `from_raw_parts`.
    pub(crate) unsafe fn with_owner(
        name: impl Into<String>,
        host: NonNull<u8>,
        length: u64,
        writable: bool,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        Self {
            name: name.into(),
            host,
            length,
            writable,
            _owner: Some(owner),
            file: None,
        }
    }

    /// A block over a writable mapping (anonymous memory, a shared file); the block keeps
    /// the mapping alive.
    pub fn from_mapping(name: impl Into<String>, mapping: MmapMut) -> Result<Self, Error> {
        Self::owning(name, MmapRaw::from(mapping), true)
    }

    /// A block over a read-only mapping: a source can send it, a destination refuses it.
    pub fn from_read_only_mapping(name: impl Into<String>, mapping: Mmap) -> Result<Self, Error> {
        Self::owning(name, MmapRaw::from(mapping), false)
    }

    fn owning(name: impl Into<String>, mapping: MmapRaw, writable: bool) -> Result<Self, Error> {
        let host = NonNull::new(mapping.as_mut_ptr())
            .ok_or_else(|| Error::Config("mapping at a null address".into()))?;
        let length = mapping.len() as u64;
        // SAFETY: the mapping spans `length` bytes from `host` until it is dropped, the
        // block owns it, and `writable` says how it was mapped.
        Ok(unsafe { Self::with_owner(name, host, length, writable, Arc::new(mapping)) })
    }

    /// Maps a whole file as a block: read-only for a source, shared and writable for a
    /// destination (pages are written through to the file).
    pub fn map_file(name: impl Into<String>, file: &File, writable: bool) -> Result<Self, Error> {
        let name = name.into();
        let map_error = |source: std::io::Error| {
            Error::Config(format!("cannot map ramblock {name:?}: {source}"))
        };
        let mapping = if writable {
            MmapOptions::new().map_raw(file)
        } else {
            MmapOptions::new().map_raw_read_only(file)
        }
        .map_err(map_error)?;
        let file = file.try_clone().map_err(map_error)?;
        let mut block = Self::owning(name, mapping, writable)?;
        block.file = Some(Arc::new(file));
        Ok(block)
    }

    /// The file a block from [`RamBlock::map_file`] maps (for a destination of a local
    /// migration, the handed-over descriptor: the VMM's handle on the guest's RAM).
    pub fn file(&self) -> Option<&File> {
        self.file.as_deref()
    }

    /// Checks that a block from [`RamBlock::map_file`] is still wholly backed by its file.
    /// A file that shrank while mapped (truncated by another process) has no pages past
    /// its new end: the kernel fails reads of them, and a process touching them gets
    /// `SIGBUS`. A source checks this before it declares completion, so a migration that
    /// read such pages fails instead of delivering zeros.
    pub fn check_file(&self) -> Result<(), Error> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let now = file.metadata().map_err(|source| {
            Error::Config(format!(
                "ramblock {:?}: cannot stat its file: {source}",
                self.name
            ))
        })?;
        if now.len() < self.length {
            return Err(Error::BlockFileShrank {
                block: self.name.clone(),
                length: self.length,
                now: now.len(),
            });
        }
        Ok(())
    }

    /// Whether the block may be written, as a destination needs.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The block's name, as RAM packets carry it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The block's length in bytes.
    pub fn len(&self) -> u64 {
        self.length
    }

    /// Whether the block has no bytes.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// The block's first byte, for the VMM's own raw accesses.
    pub fn as_ptr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// Address of the byte at `offset`; the caller has checked `offset` against the length.
    pub(crate) fn host_address(&self, offset: u64) -> *mut u8 {
        self.host.as_ptr().wrapping_add(offset as usize)
    }

    /// Copies the page at `offset` out of guest memory into `page` with volatile word
    /// loads: the guest may be writing it, and no reference to its memory is formed.
    ///
    /// # Safety
    ///
    /// `offset + page.len()` must be within the block, `page.len()` a multiple of 8, and
    /// the block's host address 8-byte aligned (checked at setup).
    pub(crate) unsafe fn read_page(&self, offset: u64, page: &mut [u8]) {
        let words = self.host_address(offset).cast::<u64>().cast_const();
        for (index, chunk) in page.chunks_exact_mut(8).enumerate() {
            // SAFETY: within the block and aligned per the caller's contract; the block's
            // memory is mapped readable (`from_raw_parts`/`map_file` contracts).
            let word = unsafe { words.add(index).read_volatile() };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
    }

    /// Copies `page` into guest memory at `offset` with a raw copy (no reference to
    /// guest memory is formed).
    ///
    /// # Safety
    ///
    /// `offset + page.len()` must be within the block, which must be mapped writable.
    pub(crate) unsafe fn write_page(&self, offset: u64, page: &[u8]) {
        // SAFETY: the destination range is inside the block per the caller's contract and
        // mapped writable; `page` is a channel buffer, which cannot overlap guest memory.
        unsafe {
            std::ptr::copy_nonoverlapping(page.as_ptr(), self.host_address(offset), page.len());
        }
    }

    /// Zeroes one page with volatile stores.
    ///
    /// # Safety
    ///
    /// `offset + page_size` must be within the block, and `page_size` a multiple of 8.
    pub(crate) unsafe fn zero_page(&self, offset: u64, page_size: u32) {
        let words = self.host_address(offset).cast::<u64>();
        for index in 0..page_size as usize / 8 {
            // SAFETY: within the block per the caller's contract; the block's memory is
            // mapped writable on a destination (`from_raw_parts`/`map_file` contracts).
            unsafe { words.add(index).write_volatile(0) };
        }
    }
}

/// Why `name` cannot travel in a 256-byte NUL-terminated name field (RAM block names,
/// device id strings), if it cannot.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() >= multifd_wire::NAME_FIELD_LEN {
        Some("name must be 1 to 255 bytes")
    } else if name.contains('\0') {
        Some("name contains a NUL byte")
    } else {
        None
    }
}

/// The RAM blocks of one migration, in announcement order.
#[derive(Debug, Clone, Default)]
pub struct GuestMemory {
    blocks: Vec<RamBlock>,
}

impl GuestMemory {
    /// Guest memory made of these blocks; names must be unique and fit a RAM packet.
    pub fn new(blocks: Vec<RamBlock>) -> Result<Self, Error> {
        for (index, block) in blocks.iter().enumerate() {
            if let Some(problem) = name_problem(&block.name) {
                return Err(Error::Config(format!(
                    "ramblock name {:?}: {problem}",
                    block.name
                )));
            }
            if blocks[..index].iter().any(|other| other.name == block.name) {
                return Err(Error::Config(format!(
                    "duplicate ramblock name {:?}",
                    block.name
                )));
            }
        }
        Ok(Self { blocks })
    }

    /// The blocks.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Index of the block called `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|block| block.name == name)
    }

    /// Checks that no block's file shrank below the block ([`RamBlock::check_file`]).
    pub(crate) fn check_files(&self) -> Result<(), Error> {
        self.blocks.iter().try_for_each(RamBlock::check_file)
    }

    /// Checks every block is a whole number of pages and the host addresses are aligned
    /// for word-at-a-time access.
    pub(crate) fn check_layout(&self, page_size: u32) -> Result<(), Error> {
        for block in &self.blocks {
            if block.length % u64::from(page_size) != 0 {
                return Err(Error::Config(format!(
                    "ramblock {:?} length {} is not a multiple of the page size {page_size}",
                    block.name, block.length
                )));
            }
            if !(block.host.as_ptr() as usize).is_multiple_of(8) {
                return Err(Error::Config(format!(
                    "ramblock {:?} host address is not 8-byte aligned",
                    block.name
                )));
            }
        }
        Ok(())
    }
}

/// The least span one bit of [`ReceivedPages`] stands for. With the smallest page sizes
/// (64 bytes) a bit per page would cost the destination 1/512 of the guest's size, which a
/// source picks; a bit per 4 KiB bounds it at 1/32768 (32 MiB per TiB).
const MIN_TRACKED_SPAN: u64 = 4096;

/// One bit per span of each block: may this span hold anything but zeros on the
/// destination (contents or a zero marker of a page in it arrived before, or the memory did
/// not start zeroed)? A zero page needs writing only if its span may. A span is the page,
/// or 4 KiB when pages are smaller: coarser only means some zero pages are written that
/// could have been skipped.
#[derive(Debug)]
pub(crate) struct ReceivedPages {
    blocks: Vec<Vec<AtomicU64>>,
    /// Pages per span, a power of two.
    pages_per_span: u64,
}

impl ReceivedPages {
    /// Every span clean if the memory `starts_zeroed`, every span possibly dirty otherwise.
    pub(crate) fn new(memory: &GuestMemory, page_size: u32, starts_zeroed: bool) -> Self {
        let span = u64::from(page_size).max(MIN_TRACKED_SPAN);
        let initial = if starts_zeroed { 0 } else { u64::MAX };
        let blocks = memory
            .blocks()
            .iter()
            .map(|block| {
                let spans = block.len().div_ceil(span);
                (0..spans.div_ceil(64))
                    .map(|_| AtomicU64::new(initial))
                    .collect()
            })
            .collect();
        Self {
            blocks,
            pages_per_span: span / u64::from(page_size),
        }
    }

    /// Marks the span of `page` of `block` received; returns whether it already was.
    pub(crate) fn mark(&self, block: usize, page: u64) -> bool {
        let span = page / self.pages_per_span;
        let bit = 1u64 << (span % 64);
        self.blocks[block][(span / 64) as usize].fetch_or(bit, Ordering::Relaxed) & bit != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_file_that_shrank_is_named() {
        let file = tempfile::tempfile().expect("file");
        file.set_len(64 << 10).expect("size");
        let block = RamBlock::map_file("pc.ram", &file, false).expect("map");
        block.check_file().expect("whole");
        file.set_len(4096).expect("truncate");
        match block.check_file() {
            Err(error @ Error::BlockFileShrank { .. }) => assert_eq!(
                error.to_string(),
                "ramblock \"pc.ram\": its file shrank to 4096 bytes during the migration \
                 (the block has 65536)"
            ),
            other => panic!("expected BlockFileShrank, got {other:?}"),
        }
    }
}
