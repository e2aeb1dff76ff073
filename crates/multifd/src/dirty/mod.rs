//! Dirty-page tracking: which pages of each RAM block were written since the last look.
//!
//! A live (precopy) migration sends every page once (round 0), then, round after round,
//! only the pages written since the previous round. Those come from a [`DirtyLog`]:
//! `start` before round 0, one `harvest` per block per round, `stop` at the end.
//!
//! Writes come from two places, so logs come in two kinds, OR-ed by a [`DirtyLogUnion`]
//! (as Cloud Hypervisor and Firecracker combine KVM's log with their own):
//! - the guest's own writes, which only the hypervisor sees: `KvmDirtyLog` (feature
//!   `kvm`) reads KVM's per-slot dirty log;
//! - the VMM's writes into guest memory (device emulation, DMA): an [`AtomicDirtyBitmap`]
//!   the device threads mark, or vm-memory's own dirty bitmap (`VmMemoryDirtyLog`,
//!   feature `vm-memory`, which also turns vm-memory regions into [`GuestMemory`]).
//!
//! Bitmaps use the layout [`Source::queue_dirty_bitmap`](crate::Source::queue_dirty_bitmap)
//! takes: bit `i % 64` of word `i / 64` is page `i` of the block. Pages are the
//! migration's page size, and every log of a migration must count in that size.
//!
//! Harvesting is fetch-and-clear, atomic per word (or per KVM slot): a write either lands
//! in the bits a harvest takes, and the page is sent after that harvest, or its bit stays
//! set for the next harvest. A write is never lost between reading and clearing.

#[cfg(feature = "kvm")]
mod kvm;
#[cfg(feature = "vm-memory")]
mod vm_memory;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::Error;
use crate::ram::GuestMemory;

#[cfg(feature = "kvm")]
pub use kvm::{KvmDirtyLog, KvmDirtyLogMode, KvmSlot};
#[cfg(feature = "vm-memory")]
pub use vm_memory::{guest_memory_from_mmap, guest_memory_from_mmap_named, VmMemoryDirtyLog};

/// Dirty-page tracking for the RAM blocks of one migration (block index = position in the
/// [`GuestMemory`]).
///
/// Protocol for a precopy driver: `start`, then harvest every block once and send every
/// page in round 0 whatever that harvest reported (it may report pages nobody wrote: KVM
/// with initially-set reports all of them), then harvest each later round, and `stop`.
/// After an error the log's bits are in an unknown state: abandon the migration (a new one
/// starts again with round 0).
pub trait DirtyLog: Send {
    /// Begins tracking: every guest write after this returns is reported by a later harvest.
    fn start(&mut self) -> io::Result<()>;

    /// Fetch-and-clear: ORs the pages of `block` written since the last harvest (or since
    /// start) into `bitmap` (bit `i` of word `i / 64` = page `i`, LSB first, as
    /// [`Source::queue_dirty_bitmap`](crate::Source::queue_dirty_bitmap) takes it) and
    /// clears them in the log, atomically per word so no write is lost between fetch and
    /// clear.
    ///
    /// `bitmap.len()` must be the block's page count divided by 64, rounded up; otherwise,
    /// or for an unknown block, this is an [`io::ErrorKind::InvalidInput`] error and nothing
    /// is cleared.
    fn harvest(&mut self, block: usize, bitmap: &mut [u64]) -> io::Result<()>;

    /// Ends tracking (dirty logging off).
    fn stop(&mut self) -> io::Result<()>;
}

/// Words of a dirty bitmap covering `pages` pages.
fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// The error for a block number the log does not have.
fn unknown_block(block: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("dirty log has no block {block}"),
    )
}

/// Checks `bitmap` has one bit per page of a block of `pages` pages.
fn check_bitmap(block: usize, pages: u64, bitmap: &[u64]) -> io::Result<()> {
    let expected = bitmap_words(pages);
    if bitmap.len() == expected {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "dirty bitmap for block {block} has {} words, its {pages} pages need {expected}",
                bitmap.len()
            ),
        ))
    }
}

/// Runs all of `results` (where `?` would stop at the first error) and returns the first
/// error.
fn first_error(results: impl Iterator<Item = io::Result<()>>) -> io::Result<()> {
    let mut first = Ok(());
    for result in results {
        if first.is_ok() {
            first = result;
        }
    }
    first
}

/// Page counts of the blocks of `memory` at `page_size`, which must be a power of two
/// dividing every block's length.
fn block_pages(memory: &GuestMemory, page_size: u32) -> Result<Vec<u64>, Error> {
    if !page_size.is_power_of_two() {
        return Err(Error::Config(format!(
            "dirty log page size {page_size} is not a power of two"
        )));
    }
    memory
        .blocks()
        .iter()
        .map(|block| {
            if block.len().is_multiple_of(u64::from(page_size)) {
                Ok(block.len() / u64::from(page_size))
            } else {
                Err(Error::Config(format!(
                    "ramblock {:?} length {} is not a multiple of the page size {page_size}",
                    block.name(),
                    block.len()
                )))
            }
        })
        .collect()
}

/// The bits of one block.
#[derive(Debug)]
struct BlockBits {
    pages: u64,
    words: Box<[AtomicU64]>,
}

/// A lock-free dirty bitmap for the writes the VMM itself makes into guest memory (device
/// emulation, DMA), one bit per page of every block of a [`GuestMemory`].
///
/// Device threads [`mark`](Self::mark) what they wrote while the migration harvests it:
/// share it in an [`Arc`] (which is the [`DirtyLog`]). Marking is a `fetch_or` on the
/// page's word, harvesting a `swap(0)` per word written straight into the caller's bitmap,
/// which then goes to `queue_dirty_bitmap` as it is: no intermediate copy.
///
/// Mark a range after writing it: a harvest that takes the bit sends the page afterwards,
/// so the page holds the write; marking first could let a harvest send the page before the
/// write lands and consume the bit.
#[derive(Debug)]
pub struct AtomicDirtyBitmap {
    page_shift: u32,
    blocks: Vec<BlockBits>,
}

impl AtomicDirtyBitmap {
    /// A clean bitmap for the blocks of `memory`, in pages of `page_size` bytes (the
    /// migration's), which must be a power of two dividing every block's length.
    pub fn new(memory: &GuestMemory, page_size: u32) -> Result<Self, Error> {
        let blocks = block_pages(memory, page_size)?
            .into_iter()
            .map(|pages| BlockBits {
                pages,
                words: (0..bitmap_words(pages))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            })
            .collect();
        Ok(Self {
            page_shift: page_size.trailing_zeros(),
            blocks,
        })
    }

    /// The page size the bitmap counts in.
    pub fn page_size(&self) -> u32 {
        1 << self.page_shift
    }

    /// Marks the pages holding bytes `offset..offset + len` of `block` dirty.
    ///
    /// # Panics
    ///
    /// If `block` is not a block of the memory or the range runs past its end: the VMM
    /// marks only what it wrote, which lies inside a block.
    pub fn mark(&self, block: usize, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = offset.saturating_add(len - 1);
        self.mark_pages(block, offset >> self.page_shift, last >> self.page_shift);
    }

    /// Marks page `page` of `block` dirty.
    ///
    /// # Panics
    ///
    /// As [`mark`](Self::mark).
    pub fn mark_page(&self, block: usize, page: u64) {
        self.mark_pages(block, page, page);
    }

    /// Marks pages `first..=last` of `block`, one `fetch_or` per word touched.
    fn mark_pages(&self, block: usize, first: u64, last: u64) {
        let bits = &self.blocks[block];
        assert!(
            last < bits.pages,
            "dirty mark of page {last} past the {} pages of block {block}",
            bits.pages
        );
        for word in first / 64..=last / 64 {
            let low = if word == first / 64 { first % 64 } else { 0 };
            let high = if word == last / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - high)) & (u64::MAX << low);
            // Release: a harvest that sees the bit also sees the write marked before it.
            bits.words[word as usize].fetch_or(mask, Ordering::Release);
        }
    }

    /// [`DirtyLog::harvest`] through a shared reference: what the `Arc` implementation
    /// calls, and usable directly by a driver holding the bitmap alone.
    pub fn harvest(&self, block: usize, bitmap: &mut [u64]) -> io::Result<()> {
        let bits = self.blocks.get(block).ok_or_else(|| unknown_block(block))?;
        check_bitmap(block, bits.pages, bitmap)?;
        for (out, word) in bitmap.iter_mut().zip(bits.words.iter()) {
            // A plain load first skips the write to clean words, most of them in late
            // rounds; a mark landing after the load is taken by the next harvest.
            if word.load(Ordering::Relaxed) != 0 {
                // Acquire: pairs with the marking `fetch_or`, so the page read after this
                // harvest sees the marked write.
                *out |= word.swap(0, Ordering::Acquire);
            }
        }
        Ok(())
    }

    /// Drops every mark (the pages' writes are older than round 0, which sends them).
    fn clear(&self) {
        for word in self.blocks.iter().flat_map(|bits| bits.words.iter()) {
            // A swap, not a store: it acquires the writes of the marks it drops.
            word.swap(0, Ordering::Acquire);
        }
    }
}

impl DirtyLog for Arc<AtomicDirtyBitmap> {
    /// Drops marks made before the migration (round 0 sends those pages anyway); marking
    /// itself is always on.
    fn start(&mut self) -> io::Result<()> {
        self.clear();
        Ok(())
    }

    fn harvest(&mut self, block: usize, bitmap: &mut [u64]) -> io::Result<()> {
        AtomicDirtyBitmap::harvest(self, block, bitmap)
    }

    /// Nothing to turn off: marks after the migration are dropped by the next `start`.
    fn stop(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Several dirty logs OR-ed together: typically KVM's (the guest's writes) and an
/// [`AtomicDirtyBitmap`] or vm-memory bitmap (the VMM's writes).
///
/// Every member must cover the same blocks in the same page size. `start` starts them in
/// order (stopping those already started if one fails), `harvest` ORs each member's pages
/// into the same bitmap, `stop` stops them all and reports the first error.
pub struct DirtyLogUnion {
    logs: Vec<Box<dyn DirtyLog>>,
}

impl DirtyLogUnion {
    /// The union of `logs`.
    pub fn new(logs: Vec<Box<dyn DirtyLog>>) -> Self {
        Self { logs }
    }
}

impl fmt::Debug for DirtyLogUnion {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("DirtyLogUnion")
            .field("logs", &self.logs.len())
            .finish()
    }
}

impl DirtyLog for DirtyLogUnion {
    fn start(&mut self) -> io::Result<()> {
        for started in 0..self.logs.len() {
            if let Err(error) = self.logs[started].start() {
                for log in &mut self.logs[..started] {
                    // The start error is the one to report; this is cleanup.
                    let _ = log.stop();
                }
                return Err(error);
            }
        }
        Ok(())
    }

    /// Each member checks the bitmap's length before clearing, so a wrong length clears
    /// nothing as long as the members agree on the blocks (as the type requires).
    fn harvest(&mut self, block: usize, bitmap: &mut [u64]) -> io::Result<()> {
        self.logs
            .iter_mut()
            .try_for_each(|log| log.harvest(block, bitmap))
    }

    fn stop(&mut self) -> io::Result<()> {
        first_error(self.logs.iter_mut().map(|log| log.stop()))
    }
}

/// The offsets of the pages whose bits are set in `bitmap` (bit `i` of word `i / 64` is
/// page `i`) for block `block` of `length` bytes. A bitmap may be shorter than the block
/// (missing words are clean pages); a bit past the block's last page is refused before
/// any offset is given out.
pub(crate) fn dirty_offsets(
    block: usize,
    bitmap: &[u64],
    length: u64,
    page_size: u32,
) -> Result<impl Iterator<Item = u64> + '_, Error> {
    let page_size = u64::from(page_size);
    if let Some(page) = first_page_past(bitmap, length / page_size) {
        return Err(Error::PageOutOfRange {
            block,
            offset: page * page_size,
        });
    }
    Ok(bitmap.iter().enumerate().flat_map(move |(index, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let page = index as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                page * page_size
            })
        })
    }))
}

/// The first page at or past `pages` whose bit is set in `bitmap`, if any.
fn first_page_past(bitmap: &[u64], pages: u64) -> Option<u64> {
    let full_words = usize::try_from(pages / 64).unwrap_or(usize::MAX);
    let tail_bits = pages % 64;
    bitmap
        .iter()
        .enumerate()
        .skip(full_words)
        .find_map(|(index, &word)| {
            // Bits of the last partial word below `tail_bits` are pages of the block.
            let past = if index == full_words {
                word >> tail_bits << tail_bits
            } else {
                word
            };
            (past != 0).then(|| index as u64 * 64 + u64::from(past.trailing_zeros()))
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use memmap2::MmapMut;

    use super::*;
    use crate::RamBlock;

    const PAGE: u32 = 4096;
    /// The concurrency tests' block: enough marks that many harvests overlap them, in
    /// small pages to keep the mapping small.
    const PAGES: u64 = 1 << 20;
    const SMALL_PAGE: u32 = 64;

    /// Guest memory of blocks with these page counts of `PAGE` bytes.
    fn memory(pages: &[u64]) -> GuestMemory {
        memory_in(PAGE, pages)
    }

    fn memory_in(page_size: u32, pages: &[u64]) -> GuestMemory {
        let blocks = pages
            .iter()
            .enumerate()
            .map(|(index, &pages)| {
                let mapping = MmapMut::map_anon((pages * u64::from(page_size)) as usize).unwrap();
                RamBlock::from_mapping(format!("ram{index}"), mapping).unwrap()
            })
            .collect();
        GuestMemory::new(blocks).unwrap()
    }

    fn bitmap_of(pages: u64, set: &BTreeSet<u64>) -> Vec<u64> {
        let mut bitmap = vec![0; bitmap_words(pages)];
        for page in set {
            bitmap[(page / 64) as usize] |= 1 << (page % 64);
        }
        bitmap
    }

    fn pages_of(bitmap: &[u64]) -> BTreeSet<u64> {
        (0..bitmap.len() as u64 * 64)
            .filter(|page| bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0)
            .collect()
    }

    fn harvested(log: &mut dyn DirtyLog, block: usize, pages: u64) -> BTreeSet<u64> {
        let mut bitmap = vec![0; bitmap_words(pages)];
        log.harvest(block, &mut bitmap).unwrap();
        pages_of(&bitmap)
    }

    #[test]
    fn marks_are_harvested_once_per_page() {
        let mut log = Arc::new(AtomicDirtyBitmap::new(&memory(&[200, 3]), PAGE).unwrap());
        log.start().unwrap();
        log.mark(0, 3 * 4096 + 10, 1);
        // Bytes 60*4096+4095 ..= 130*4096: pages 60 to 130, across three words.
        log.mark(0, 60 * 4096 + 4095, 69 * 4096 + 2);
        log.mark(0, 199 * 4096, 4096);
        log.mark(0, 5 * 4096, 0);
        log.mark_page(1, 2);

        let mut expected: BTreeSet<u64> = (60..=130).collect();
        expected.extend([3, 199]);
        assert_eq!(harvested(&mut log, 0, 200), expected);
        assert_eq!(harvested(&mut log, 1, 3), BTreeSet::from([2]));
        assert!(harvested(&mut log, 0, 200).is_empty());
        assert!(harvested(&mut log, 1, 3).is_empty());
    }

    #[test]
    fn harvest_ors_into_the_callers_bitmap() {
        let log = AtomicDirtyBitmap::new(&memory(&[128]), PAGE).unwrap();
        log.mark_page(0, 70);
        let mut bitmap = bitmap_of(128, &BTreeSet::from([1, 70, 100]));
        log.harvest(0, &mut bitmap).unwrap();
        assert_eq!(pages_of(&bitmap), BTreeSet::from([1, 70, 100]));
    }

    #[test]
    fn start_drops_earlier_marks() {
        let mut log = Arc::new(AtomicDirtyBitmap::new(&memory(&[64]), PAGE).unwrap());
        log.mark_page(0, 9);
        log.start().unwrap();
        assert!(harvested(&mut log, 0, 64).is_empty());
    }

    #[test]
    fn wrong_bitmap_length_or_block_is_invalid_input_and_clears_nothing() {
        let mut log = Arc::new(AtomicDirtyBitmap::new(&memory(&[65]), PAGE).unwrap());
        log.mark_page(0, 64);
        for words in [1, 3] {
            let error = log.harvest(0, &mut vec![0; words]).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        }
        let error = log.harvest(1, &mut [0; 2]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        assert_eq!(harvested(&mut log, 0, 65), BTreeSet::from([64]));
    }

    #[test]
    #[should_panic(expected = "past the 4 pages of block 0")]
    fn marking_past_the_block_panics() {
        let log = AtomicDirtyBitmap::new(&memory(&[4]), PAGE).unwrap();
        log.mark(0, 3 * 4096, 4097);
    }

    #[test]
    fn page_size_must_fit_the_blocks() {
        let memory = memory(&[3]);
        assert!(AtomicDirtyBitmap::new(&memory, 3000).is_err());
        assert!(AtomicDirtyBitmap::new(&memory, 8192).is_err());
        let log = AtomicDirtyBitmap::new(&memory, 2048).unwrap();
        assert_eq!(log.page_size(), 2048);
        log.mark_page(0, 5);
    }

    /// Threads mark every page of a block exactly once, spread over `logs` (page `p` in
    /// log `p % logs.len()`), while `harvest` runs in a loop: every page must come out in
    /// exactly one harvest.
    fn concurrent_marks_come_out_once(
        logs: &[Arc<AtomicDirtyBitmap>],
        mut harvest: impl FnMut(&mut [u64]),
    ) {
        const THREADS: u64 = 4;
        let mut counts = vec![0u8; PAGES as usize];
        let mut bitmap = vec![0; bitmap_words(PAGES)];
        let mut harvest_and_count = || {
            bitmap.fill(0);
            harvest(&mut bitmap);
            for (index, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    counts[index * 64 + bits.trailing_zeros() as usize] += 1;
                    bits &= bits - 1;
                }
            }
        };
        let go = std::sync::Barrier::new(THREADS as usize + 1);
        std::thread::scope(|scope| {
            let markers: Vec<_> = (0..THREADS)
                .map(|thread| {
                    let go = &go;
                    scope.spawn(move || {
                        go.wait();
                        // Interleaved pages, so threads share words.
                        for page in (thread..PAGES).step_by(THREADS as usize) {
                            logs[page as usize % logs.len()].mark_page(0, page);
                        }
                    })
                })
                .collect();
            go.wait();
            loop {
                let finished = markers.iter().all(|marker| marker.is_finished());
                harvest_and_count();
                // One harvest after the markers finished takes their last marks.
                if finished {
                    break;
                }
            }
        });
        let wrong: Vec<_> = (0..PAGES)
            .filter(|&page| counts[page as usize] != 1)
            .map(|page| (page, counts[page as usize]))
            .take(10)
            .collect();
        assert!(
            wrong.is_empty(),
            "pages not reported exactly once: {wrong:?}..."
        );
    }

    #[test]
    fn concurrent_marks_are_neither_lost_nor_reported_twice() {
        let log =
            Arc::new(AtomicDirtyBitmap::new(&memory_in(SMALL_PAGE, &[PAGES]), SMALL_PAGE).unwrap());
        let mut shared = Arc::clone(&log);
        concurrent_marks_come_out_once(&[log], |bitmap| shared.harvest(0, bitmap).unwrap());
    }

    #[test]
    fn union_of_concurrently_marked_logs_loses_and_repeats_nothing() {
        let memory = memory_in(SMALL_PAGE, &[PAGES]);
        let logs = [
            Arc::new(AtomicDirtyBitmap::new(&memory, SMALL_PAGE).unwrap()),
            Arc::new(AtomicDirtyBitmap::new(&memory, SMALL_PAGE).unwrap()),
        ];
        let mut union = DirtyLogUnion::new(vec![
            Box::new(Arc::clone(&logs[0])),
            Box::new(Arc::clone(&logs[1])),
        ]);
        concurrent_marks_come_out_once(&logs, |bitmap| union.harvest(0, bitmap).unwrap());
    }

    #[test]
    fn union_ors_its_members() {
        let memory = memory(&[130]);
        let first = Arc::new(AtomicDirtyBitmap::new(&memory, PAGE).unwrap());
        let second = Arc::new(AtomicDirtyBitmap::new(&memory, PAGE).unwrap());
        let mut union = DirtyLogUnion::new(vec![
            Box::new(Arc::clone(&first)),
            Box::new(Arc::clone(&second)),
        ]);
        union.start().unwrap();
        first.mark_page(0, 1);
        first.mark_page(0, 5);
        second.mark_page(0, 5);
        second.mark_page(0, 129);

        let error = union.harvest(0, &mut [0; 2]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        assert_eq!(harvested(&mut union, 0, 130), BTreeSet::from([1, 5, 129]));
        assert!(harvested(&mut union, 0, 130).is_empty());
        union.stop().unwrap();
    }

    /// A log that records its calls and fails the ones it is told to.
    struct Recorder {
        name: &'static str,
        fail: &'static [&'static str],
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl Recorder {
        fn call(&self, what: &str) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("{} {what}", self.name));
            if self.fail.contains(&what) {
                Err(io::Error::other(format!("{} {what} failed", self.name)))
            } else {
                Ok(())
            }
        }
    }

    impl DirtyLog for Recorder {
        fn start(&mut self) -> io::Result<()> {
            self.call("start")
        }
        fn harvest(&mut self, _block: usize, _bitmap: &mut [u64]) -> io::Result<()> {
            self.call("harvest")
        }
        fn stop(&mut self) -> io::Result<()> {
            self.call("stop")
        }
    }

    fn recorded_union(
        fail: [&'static [&'static str]; 3],
    ) -> (DirtyLogUnion, Arc<Mutex<Vec<String>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let logs = ["a", "b", "c"]
            .into_iter()
            .zip(fail)
            .map(|(name, fail)| {
                Box::new(Recorder {
                    name,
                    fail,
                    calls: Arc::clone(&calls),
                }) as Box<dyn DirtyLog>
            })
            .collect();
        (DirtyLogUnion::new(logs), calls)
    }

    #[test]
    fn union_start_failure_stops_the_members_already_started() {
        let (mut union, calls) = recorded_union([&[], &["start"], &[]]);
        let error = union.start().unwrap_err();
        assert_eq!(error.to_string(), "b start failed");
        assert_eq!(*calls.lock().unwrap(), ["a start", "b start", "a stop"]);
    }

    #[test]
    fn union_stop_stops_every_member_and_reports_the_first_error() {
        let (mut union, calls) = recorded_union([&[], &["stop"], &["stop"]]);
        let error = union.stop().unwrap_err();
        assert_eq!(error.to_string(), "b stop failed");
        assert_eq!(*calls.lock().unwrap(), ["a stop", "b stop", "c stop"]);
    }

    #[test]
    fn union_harvest_stops_at_the_first_error() {
        let (mut union, calls) = recorded_union([&["harvest"], &[], &[]]);
        assert!(union.harvest(0, &mut []).is_err());
        assert_eq!(*calls.lock().unwrap(), ["a harvest"]);
    }
}
