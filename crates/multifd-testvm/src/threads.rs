//! A simulated guest: writer threads ("vCPUs") that dirty random pages of anonymous
//! memory at a set rate, marking each write in an [`AtomicDirtyBitmap`] as KVM's dirty
//! log would, and a [`GuestControl`] that stops, throttles and resumes them as a VMM's
//! vCPU control does.
//!
//! Every write stores an 8-byte sequence number at a random word of a random page, then
//! marks the page: write first, mark second, so a harvest that takes the bit sends the
//! page with the write in it. Once [`GuestControl::stop`] returned, the memory no longer
//! changes, so the destination's copy must equal the source's byte for byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use multifd::{AtomicDirtyBitmap, DeviceError, GuestMemory, RamBlock, VmControl};

use crate::Error;

/// The page size the guest dirties in (the migration's).
const PAGE_SIZE: u64 = 4096;

/// How often a writer wakes to spend its budget: often enough that the rate is smooth
/// within a precopy round (tens of milliseconds at least), rarely enough that the sleeps
/// cost nothing measurable.
const TICK: Duration = Duration::from_millis(1);

/// How a [`ThreadGuest`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThreadGuestConfig {
    /// Guest memory in bytes (a multiple of 4 KiB), one RAM block named `ram`.
    pub memory: u64,
    /// Bytes per second the writers dirty together (pages × 4 KiB), unthrottled; 0 runs
    /// no writer.
    pub dirty_rate: u64,
    /// Writer threads.
    pub writers: usize,
    /// Seeds the initial contents and the writers' page choices.
    pub seed: u64,
}

impl Default for ThreadGuestConfig {
    fn default() -> Self {
        Self {
            memory: 64 << 20,
            dirty_rate: 0,
            writers: 1,
            seed: 1,
        }
    }
}

/// What the writers and the control share.
#[derive(Debug)]
struct Shared {
    state: Mutex<RunState>,
    changed: Condvar,
    /// Pages written so far, over all writers.
    writes: AtomicU64,
}

#[derive(Debug)]
struct RunState {
    paused: bool,
    /// Writers parked at the pause.
    parked: usize,
    throttle: u8,
    quit: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, RunState>) -> MutexGuard<'a, RunState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running simulated guest; dropping it stops its writers.
#[derive(Debug)]
pub struct ThreadGuest {
    memory: GuestMemory,
    dirty: Arc<AtomicDirtyBitmap>,
    shared: Arc<Shared>,
    writers: Vec<JoinHandle<()>>,
}

/// Anonymous, zeroed memory of `bytes` bytes as a one-block [`GuestMemory`] named `name`:
/// what a destination maps to receive a guest into.
pub fn anonymous_memory(name: &str, bytes: u64) -> Result<GuestMemory, Error> {
    let map_error = |source| Error::Map { bytes, source };
    let length = usize::try_from(bytes).map_err(|_| {
        map_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "larger than the address space",
        ))
    })?;
    let mapping = MmapOptions::new()
        .len(length)
        .map_anon()
        .map_err(map_error)?;
    Ok(GuestMemory::new(vec![RamBlock::from_mapping(
        name, mapping,
    )?])?)
}

impl ThreadGuest {
    /// Maps the memory, fills it with a pattern (so round 0 moves real pages, not zero
    /// pages) and starts the writers.
    pub fn start(config: &ThreadGuestConfig) -> Result<Self, Error> {
        let memory = anonymous_memory("ram", config.memory)?;
        fill(&memory.blocks()[0], config.seed);
        let dirty = Arc::new(AtomicDirtyBitmap::new(&memory, PAGE_SIZE as u32)?);
        let shared = Arc::new(Shared {
            state: Mutex::new(RunState {
                paused: false,
                parked: 0,
                throttle: 0,
                quit: false,
            }),
            changed: Condvar::new(),
            writes: AtomicU64::new(0),
        });
        let mut guest = Self {
            memory,
            dirty,
            shared,
            writers: Vec::new(),
        };
        if config.dirty_rate > 0 {
            let writers = config.writers.max(1);
            let pages_per_second = config.dirty_rate as f64 / PAGE_SIZE as f64 / writers as f64;
            for index in 0..writers {
                let writer = Writer {
                    block: guest.memory.blocks()[0].clone(),
                    dirty: Arc::clone(&guest.dirty),
                    shared: Arc::clone(&guest.shared),
                    pages_per_second,
                    random: config.seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                };
                let thread = std::thread::Builder::new()
                    .name(format!("guest-writer-{index}"))
                    .spawn(move || writer.run())
                    .map_err(Error::Spawn)?;
                guest.writers.push(thread);
            }
        }
        Ok(guest)
    }

    /// The guest's memory, to hand to a [`multifd::Source`].
    pub fn memory(&self) -> GuestMemory {
        self.memory.clone()
    }

    /// The guest's dirty log, shared with its writers.
    pub fn dirty_log(&self) -> Arc<AtomicDirtyBitmap> {
        Arc::clone(&self.dirty)
    }

    /// The guest's vCPU control, for the precopy driver.
    pub fn control(&self) -> GuestControl {
        GuestControl {
            shared: Arc::clone(&self.shared),
            writers: self.writers.len(),
        }
    }

    /// Pages written since the start, over all writers.
    pub fn pages_written(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// Whether the writers are running (not stopped by the control).
    pub fn is_running(&self) -> bool {
        !self.shared.lock().paused
    }
}

impl Drop for ThreadGuest {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.changed.notify_all();
        for writer in self.writers.drain(..) {
            // A writer only panics on a bug, already printed by the panic hook.
            let _ = writer.join();
        }
    }
}

/// Stops, throttles and resumes a [`ThreadGuest`]'s writers.
#[derive(Debug, Clone)]
pub struct GuestControl {
    shared: Arc<Shared>,
    writers: usize,
}

impl VmControl for GuestControl {
    fn stop(&mut self) -> Result<(), DeviceError> {
        let mut state = self.shared.lock();
        state.paused = true;
        self.shared.changed.notify_all();
        while state.parked < self.writers && !state.quit {
            state = self.shared.wait(state);
        }
        Ok(())
    }

    fn throttle(&mut self, percent: u8) {
        self.shared.lock().throttle = percent.min(100);
    }

    fn resume(&mut self) {
        let mut state = self.shared.lock();
        state.paused = false;
        state.throttle = 0;
        self.shared.changed.notify_all();
    }
}

/// One writer thread ("vCPU").
struct Writer {
    block: RamBlock,
    dirty: Arc<AtomicDirtyBitmap>,
    shared: Arc<Shared>,
    pages_per_second: f64,
    random: u64,
}

impl Writer {
    fn run(mut self) {
        let pages = self.block.len() / PAGE_SIZE;
        let mut budget = 0.0f64;
        let mut last = Instant::now();
        loop {
            let throttle = {
                let mut state = self.shared.lock();
                if state.paused && !state.quit {
                    state.parked += 1;
                    self.shared.changed.notify_all();
                    while state.paused && !state.quit {
                        state = self.shared.wait(state);
                    }
                    state.parked -= 1;
                    last = Instant::now();
                    budget = 0.0;
                }
                if state.quit {
                    return;
                }
                state.throttle
            };
            let now = Instant::now();
            let share = f64::from(100 - throttle) / 100.0;
            budget += now.duration_since(last).as_secs_f64() * self.pages_per_second * share;
            last = now;
            while budget >= 1.0 {
                budget -= 1.0;
                let page = self.next_random() % pages;
                let word = self.next_random() % (PAGE_SIZE / 8);
                let sequence = self.shared.writes.fetch_add(1, Ordering::Relaxed) + 1;
                // SAFETY: `page < pages` and `word < PAGE_SIZE / 8`, so the 8 bytes lie
                // inside the block, which stays mapped while `self.block` lives; the
                // address is 8-byte aligned (page-aligned block, whole words). A volatile
                // store because the migration reads the same memory concurrently.
                unsafe {
                    let address = self
                        .block
                        .as_ptr()
                        .add((page * PAGE_SIZE + word * 8) as usize);
                    std::ptr::write_volatile(address.cast::<u64>(), sequence);
                }
                self.dirty.mark_page(0, page);
            }
            std::thread::sleep(TICK);
        }
    }

    /// xorshift64: cheap, and enough to spread writes over the pages.
    fn next_random(&mut self) -> u64 {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        self.random
    }
}

/// Fills `block` with a non-zero pattern derived from `seed`.
fn fill(block: &RamBlock, seed: u64) {
    let words = block.len() / 8;
    let base = block.as_ptr().cast::<u64>();
    let mut value = seed | 1;
    for index in 0..words {
        value = value
            .wrapping_mul(0x5851_f42d_4c95_7f2d)
            .wrapping_add(index);
        // SAFETY: `index < len / 8` keeps the store inside the block, mapped while
        // `block` lives and 8-byte aligned; nothing else runs on it yet.
        unsafe { base.add(index as usize).write(value) };
    }
}

/// The offset of the first 8-byte word where two blocks differ (0 when their lengths
/// differ), or `None` when they hold the same bytes. Read with volatile loads: guest
/// memory is never referenced as a slice (callers compare after the guest stopped).
pub fn first_difference(a: &RamBlock, b: &RamBlock) -> Option<u64> {
    if a.len() != b.len() {
        return Some(0);
    }
    let words = a.len() / 8;
    let (left, right) = (a.as_ptr().cast::<u64>(), b.as_ptr().cast::<u64>());
    (0..words)
        .find(|&index| {
            // SAFETY: both blocks are `words * 8` bytes, mapped while they live, 8-byte
            // aligned; volatile because guest memory is not ours to reference.
            unsafe {
                left.add(index as usize).read_volatile()
                    != right.add(index as usize).read_volatile()
            }
        })
        .map(|index| index * 8)
}
