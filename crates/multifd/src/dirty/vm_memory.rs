//! rust-vmm `vm-memory` adapters: a `GuestMemoryMmap`'s regions as the engine's
//! [`GuestMemory`], and its `AtomicBitmap` dirty bitmaps as a [`DirtyLog`], without
//! `unsafe` in the VMM.
//!
//! Blocks follow the regions' order (by guest address), one block per region: block `i`
//! of the [`GuestMemory`] and of the [`VmMemoryDirtyLog`] is region `i`. Each block holds
//! an `Arc` of its region's mapping, so the memory stays mapped while the engine uses it,
//! even if the VMM drops or replaces its `GuestMemoryMmap`.

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, MmapRegion};

use super::{check_bitmap, unknown_block, DirtyLog};
use crate::error::Error;
use crate::ram::{GuestMemory, RamBlock};

/// The regions of `memory` as blocks named `ram0`, `ram1`, … in guest-address order.
pub fn guest_memory_from_mmap<B>(memory: &GuestMemoryMmap<B>) -> Result<GuestMemory, Error>
where
    B: Bitmap + Send + Sync + 'static,
{
    guest_memory_from_mmap_named(
        memory,
        (0..memory.num_regions()).map(|index| format!("ram{index}")),
    )
}

/// The regions of `memory` as blocks named `names`, one name per region in guest-address
/// order.
pub fn guest_memory_from_mmap_named<B, N>(
    memory: &GuestMemoryMmap<B>,
    names: impl IntoIterator<Item = N>,
) -> Result<GuestMemory, Error>
where
    B: Bitmap + Send + Sync + 'static,
    N: Into<String>,
{
    let names: Vec<String> = names.into_iter().map(Into::into).collect();
    if names.len() != memory.num_regions() {
        return Err(Error::Config(format!(
            "{} ramblock names for {} vm-memory regions",
            names.len(),
            memory.num_regions()
        )));
    }
    let blocks = memory
        .iter()
        .zip(names)
        .map(|(region, name)| {
            let mapping = region.get_mmap();
            let host = NonNull::new(mapping.as_ptr()).ok_or_else(|| {
                Error::Config(format!("vm-memory region {name:?} at a null address"))
            })?;
            let length = mapping.size() as u64;
            let writable = mapping.prot() & libc::PROT_WRITE != 0;
            // SAFETY: an MmapRegion maps `size()` bytes at `as_ptr()` until it is dropped,
            // and the block owns an `Arc` of it; vm-memory itself accesses that memory only
            // through raw pointers and volatile slices, as the engine does.
            Ok(unsafe { RamBlock::with_owner(name, host, length, writable, mapping) })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    GuestMemory::new(blocks)
}

/// vm-memory's dirty bitmaps of a `GuestMemoryMmap<AtomicBitmap>`'s regions as a
/// [`DirtyLog`]: the writes the VMM makes through vm-memory (`Bytes`, volatile slices),
/// which vm-memory marks after each write. Writes by the guest itself are not in it (use
/// `KvmDirtyLog` in a [`DirtyLogUnion`](super::DirtyLogUnion)), nor writes through raw
/// pointers.
///
/// A harvest is `AtomicBitmap::get_and_reset`, a `fetch_and(0)` per word: atomic per word,
/// so a mark is either taken by this harvest or left for the next, never lost.
#[derive(Debug)]
pub struct VmMemoryDirtyLog {
    regions: Vec<Arc<MmapRegion<AtomicBitmap>>>,
}

impl VmMemoryDirtyLog {
    /// The dirty bitmaps of `memory`'s regions, which must count pages of `page_size`
    /// bytes (the migration's; vm-memory's default is the host page size).
    pub fn new(memory: &GuestMemoryMmap<AtomicBitmap>, page_size: u32) -> Result<Self, Error> {
        let regions: Vec<_> = memory.iter().map(|region| region.get_mmap()).collect();
        let page_size = u64::from(page_size);
        for (index, region) in regions.iter().enumerate() {
            let tracked = region.bitmap();
            let size = region.size() as u64;
            if tracked.byte_size() != region.size()
                || page_size == 0
                || !size.is_multiple_of(page_size)
                || tracked.len() as u64 != size / page_size
            {
                return Err(Error::Config(format!(
                    "vm-memory region {index}'s dirty bitmap tracks {} pages over {} bytes, \
                     not {size} bytes in pages of {page_size}",
                    tracked.len(),
                    tracked.byte_size()
                )));
            }
        }
        Ok(Self { regions })
    }
}

impl DirtyLog for VmMemoryDirtyLog {
    /// Drops marks made before the migration (round 0 sends those pages anyway);
    /// vm-memory marks writes all the time.
    fn start(&mut self) -> io::Result<()> {
        for region in &self.regions {
            // Read-and-reset, not a plain reset: it acquires the writes of the marks it drops.
            region.bitmap().get_and_reset();
        }
        Ok(())
    }

    fn harvest(&mut self, block: usize, bitmap: &mut [u64]) -> io::Result<()> {
        let region = self
            .regions
            .get(block)
            .ok_or_else(|| unknown_block(block))?;
        let dirty = region.bitmap();
        check_bitmap(block, dirty.len() as u64, bitmap)?;
        for (out, word) in bitmap.iter_mut().zip(dirty.get_and_reset()) {
            *out |= word;
        }
        Ok(())
    }

    /// Nothing to turn off: marks after the migration are dropped by the next `start`.
    fn stop(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const PAGE: usize = 4096;

    /// Two regions, of 70 and 3 pages, with dirty bitmaps.
    fn mmap() -> GuestMemoryMmap<AtomicBitmap> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 70 * PAGE),
            (GuestAddress(0x10_0000), 3 * PAGE),
        ])
        .unwrap()
    }

    #[test]
    fn regions_become_blocks_in_order() {
        let memory = guest_memory_from_mmap(&mmap()).unwrap();
        let blocks: Vec<_> = memory
            .blocks()
            .iter()
            .map(|block| (block.name(), block.len()))
            .collect();
        assert_eq!(blocks, [("ram0", 70 * 4096), ("ram1", 3 * 4096)]);

        let named = guest_memory_from_mmap_named(&mmap(), ["low", "high"]).unwrap();
        assert_eq!(named.find("high"), Some(1));
        assert!(guest_memory_from_mmap_named(&mmap(), ["one"]).is_err());
        assert!(guest_memory_from_mmap_named(&mmap(), ["same", "same"]).is_err());
    }

    #[test]
    fn blocks_keep_their_regions_mapped() {
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), PAGE)]).unwrap();
        mmap.write_obj(0x1234_5678_u32, GuestAddress(0x1008))
            .unwrap();
        let memory = guest_memory_from_mmap(&mmap).unwrap();
        drop(mmap);
        let block = &memory.blocks()[0];
        // SAFETY: offset 8 is inside the block, whose mapping the block keeps alive.
        let value = unsafe { block.as_ptr().add(8).cast::<u32>().read_volatile() };
        assert_eq!(value, 0x1234_5678);
    }

    fn harvested(log: &mut VmMemoryDirtyLog, block: usize, words: usize) -> Vec<u64> {
        let mut bitmap = vec![0; words];
        log.harvest(block, &mut bitmap).unwrap();
        bitmap
    }

    #[test]
    fn harvest_takes_vm_memory_writes_once() {
        let mmap = mmap();
        let mut log = VmMemoryDirtyLog::new(&mmap, PAGE as u32).unwrap();
        mmap.write_obj(1_u8, GuestAddress(2 * PAGE as u64)).unwrap();
        log.start().unwrap();
        assert_eq!(
            harvested(&mut log, 0, 2),
            [0, 0],
            "start drops earlier marks"
        );

        // 16 bytes across pages 63 and 64; one byte on page 1 of the second region.
        mmap.write_slice(&[7; 16], GuestAddress(64 * PAGE as u64 - 8))
            .unwrap();
        mmap.write_obj(1_u8, GuestAddress(0x10_0000 + PAGE as u64))
            .unwrap();
        let error = log.harvest(0, &mut [0; 1]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        assert_eq!(harvested(&mut log, 0, 2), [1 << 63, 1]);
        assert_eq!(harvested(&mut log, 1, 1), [1 << 1]);
        assert_eq!(harvested(&mut log, 0, 2), [0, 0]);
        let error = log.harvest(2, &mut [0; 1]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        log.stop().unwrap();
    }

    #[test]
    fn page_size_must_match_the_bitmaps() {
        assert!(VmMemoryDirtyLog::new(&mmap(), 8192).is_err());
        assert!(VmMemoryDirtyLog::new(&mmap(), 0).is_err());
    }
}
