//! Saving: [`SnapshotWriter`], the round API of a [`Source`](crate::Source) over a file.
//!
//! The caller (or the precopy driver) queues pages; full jobs of [`PAGES_PER_JOB`] pages
//! go to a bounded queue that N writer threads drain. A writer thread checks each page for
//! zeros (the engine's zero-page check), writes runs of non-zero pages with one `pwritev`
//! each at their fixed offsets, and keeps the bitmap of pages present: a page found zero
//! that was written in an earlier round gets its bytes punched out, so a clear bit always
//! reads as zeros. Rewriting a dirty page lands on the same bytes, so the file never grows
//! past the layout planned at creation (guest size, alignment and metadata) plus the
//! device state.
//!
//! [`SnapshotWriter::end_round`] waits until every queued page is written: the precopy
//! driver's barrier. At [`SnapshotWriter::switchover`] one thread saves the devices into
//! the device area while the last pages are written. [`SnapshotWriter::complete`] writes
//! the metadata last, so an interrupted save leaves a file without its magic, which no
//! restore accepts.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::file_io::{
    check_direct_io, preallocate, punch_hole, snapshot_io, transfer_at, Direction, PresentPages,
};
use super::format::{BlockEntry, DeviceEntry, Metadata, Plan};
use crate::device::{SaveDevice, SaveDevices, StateWriter};
use crate::dirty::dirty_offsets;
use crate::error::Error;
use crate::failure::{join_threads, CancelHandle, Failure};
use crate::ids::{DeviceId, Side};
use crate::ram::{name_problem, GuestMemory, RamBlock};
use crate::stats::{ChannelCounters, Counters, DeviceCounters, MigrationStats, Monitor};
use crate::sync::{lock, wait};
use crate::transport::{push_page, IOV_MAX};
use crate::zero_page::is_zero_page;

/// Pages handed to a writer thread at a time: 256 pages of 4 KiB are 1 MiB, large enough
/// that the per-job locking and the per-call cost of `pwritev` vanish and `O_DIRECT`
/// requests are big, small enough that a few threads share a block evenly.
const PAGES_PER_JOB: usize = 256;

/// Jobs queued per writer thread before the producer waits: two keep every thread busy
/// while the producer fills the next, without holding more than a few MiB of offsets.
const JOBS_PER_THREAD: usize = 2;

/// Device-state bytes buffered before a write to the device area: 1 MiB writes are large
/// enough to run at the disk's speed.
const DEVICE_WRITE_BUFFER: usize = 1 << 20;

/// How a snapshot is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotConfig {
    /// Writer threads (1 to 255), the channels of a file.
    pub threads: u8,
    /// Guest page size in bytes: a power of two from 64 bytes.
    pub page_size: u32,
    /// Write pages with `O_DIRECT`, around the page cache: the page size and every
    /// block's host address must then be multiples of 4 KiB (guest memory is written
    /// straight from where it is, so it must be aligned as the disk needs). The metadata
    /// and device state go through the page cache either way.
    ///
    /// The blocks' ranges are then preallocated: direct writes into allocated
    /// (unwritten) extents run concurrently on ext4 and XFS, while writes that allocate
    /// take the inode's lock one at a time, which made 4 threads no faster than 1. Zero
    /// pages are still never written and read as zeros, but take disk space.
    pub direct_io: bool,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            threads: 2,
            page_size: 4096,
            direct_io: false,
        }
    }
}

/// A page job: pages of one block at these offsets.
#[derive(Debug, Default)]
struct Job {
    block: usize,
    offsets: Vec<u64>,
}

/// The queue between the producer and the writer threads.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
    capacity: usize,
}

#[derive(Debug, Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Jobs a thread is writing now.
    busy: usize,
    /// Offset buffers of finished jobs, for the producer to reuse.
    free: Vec<Vec<u64>>,
    stopping: bool,
    failed: bool,
}

/// The save stopped (its first error is in the [`Failure`]).
struct Stopped;

impl Queue {
    /// Queues `job`; waits while the queue is full.
    fn push(&self, job: Job) -> Result<(), Stopped> {
        let mut state = lock(&self.state);
        while !state.failed && state.jobs.len() >= self.capacity {
            state = wait(&self.changed, state);
        }
        if state.failed {
            return Err(Stopped);
        }
        state.jobs.push_back(job);
        self.changed.notify_all();
        Ok(())
    }

    /// An empty offsets buffer, reused when one is free.
    fn buffer(&self) -> Vec<u64> {
        lock(&self.state)
            .free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(PAGES_PER_JOB))
    }

    /// Waits until every queued job was written.
    fn drain(&self) -> Result<(), Stopped> {
        let mut state = lock(&self.state);
        while !state.failed && (!state.jobs.is_empty() || state.busy > 0) {
            state = wait(&self.changed, state);
        }
        if state.failed {
            Err(Stopped)
        } else {
            Ok(())
        }
    }

    /// The next job for a writer thread; `None` when stopping or failed.
    fn next(&self) -> Option<Job> {
        let mut state = lock(&self.state);
        loop {
            if state.failed {
                return None;
            }
            if let Some(job) = state.jobs.pop_front() {
                state.busy += 1;
                return Some(job);
            }
            if state.stopping {
                return None;
            }
            state = wait(&self.changed, state);
        }
    }

    /// A writer thread finished `job`.
    fn done(&self, mut job: Job) {
        let mut state = lock(&self.state);
        state.busy -= 1;
        job.offsets.clear();
        state.free.push(job.offsets);
        self.changed.notify_all();
    }

    fn stop(&self, failed: bool) {
        let mut state = lock(&self.state);
        state.stopping = true;
        state.failed |= failed;
        self.changed.notify_all();
    }
}

/// What every writer thread shares.
struct Shared {
    path: PathBuf,
    /// The descriptor pages are written through (`O_DIRECT` when asked).
    pages: File,
    memory: GuestMemory,
    page_size: u32,
    /// Per block, where its first page is in the file.
    block_offsets: Vec<u64>,
    present: PresentPages,
    counters: Arc<Counters>,
    queue: Queue,
}

/// A device to save, with the state it wrote during precopy.
struct DeviceSlot {
    id: DeviceId,
    device: Box<dyn SaveDevice>,
    /// Written by [`SaveDevice::save_precopy`], put in the file before the rest.
    precopy: Vec<u8>,
    counters: Arc<DeviceCounters>,
}

/// A snapshot being written: the round API of a [`Source`](crate::Source), with a file
/// instead of a destination (the file format is documented beside its parser, in the
/// engine's `snapshot::format` module). Drive it by hand (queue every block, [`SnapshotWriter::complete`]) for a
/// snapshot of a stopped VM, or hand it to [`Precopy::run`](crate::Precopy::run) for a
/// live one.
pub struct SnapshotWriter {
    shared: Arc<Shared>,
    /// The descriptor the metadata and device state are written through.
    file: Arc<File>,
    plan: Plan,
    threads: Vec<JoinHandle<()>>,
    failure: Arc<Failure>,
    job: Job,
    pages_this_round: u64,
    rounds: u64,
    devices: Vec<DeviceSlot>,
    device_thread: Option<JoinHandle<()>>,
    /// The device table, filled by the device thread.
    device_entries: Arc<Mutex<Vec<DeviceEntry>>>,
    switched_over: bool,
}

impl std::fmt::Debug for SnapshotWriter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SnapshotWriter")
            .field("path", &self.shared.path)
            .field("rounds", &self.rounds)
            .finish_non_exhaustive()
    }
}

impl SnapshotWriter {
    /// Creates (or truncates) the file at `path`, sized for `memory`'s blocks with every
    /// page a hole, and starts the writer threads. `devices` are saved at switchover.
    pub fn create(
        path: impl AsRef<Path>,
        config: &SnapshotConfig,
        memory: GuestMemory,
        devices: SaveDevices,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        let path = path.as_ref().to_owned();
        check_config(config, &memory, &devices)?;
        let lengths: Vec<u64> = memory.blocks().iter().map(RamBlock::len).collect();
        let plan = Plan::new(config.page_size, &lengths, devices.len())
            .ok_or_else(|| Error::Config("the snapshot would pass 2^64 bytes".into()))?;
        let io_error = |context| snapshot_io(&path, context);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("create"))?;
        // Truncated only if it has contents: truncating a file to zero makes ext4 flush
        // everything written to it when it is closed (its heuristic for files replaced by
        // rewriting), which would turn the end of every save into a synchronous writeback.
        if file.metadata().map_err(io_error("stat"))?.len() > 0 {
            file.set_len(0).map_err(io_error("truncate"))?;
        }
        // Sparse: every page a hole until written; zero pages stay holes.
        file.set_len(plan.device_area)
            .map_err(io_error("set the length"))?;
        let pages = if config.direct_io {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .map_err(io_error(
                    "open with O_DIRECT (the filesystem may not support it)",
                ))?
        } else {
            file.try_clone()
                .map_err(io_error("duplicate the descriptor"))?
        };
        if config.direct_io {
            for (&(offset, _), &length) in plan.blocks.iter().zip(&lengths) {
                preallocate(&file, offset, length).map_err(io_error("preallocate a block"))?;
            }
        }
        let ids: Vec<DeviceId> = devices.iter().map(|(id, _)| id.clone()).collect();
        let counters = Counters::new(
            Side::Source,
            config.threads,
            config.page_size,
            &ids,
            started,
        );
        counters
            .guest_bytes
            .store(lengths.iter().sum(), Ordering::Relaxed);
        let page_size = u64::from(config.page_size);
        let shared = Arc::new(Shared {
            path,
            pages,
            page_size: config.page_size,
            block_offsets: plan.blocks.iter().map(|&(offset, _)| offset).collect(),
            present: PresentPages::new(lengths.iter().map(|length| length / page_size)),
            counters,
            memory,
            queue: Queue {
                state: Mutex::new(QueueState::default()),
                changed: Condvar::new(),
                capacity: usize::from(config.threads) * JOBS_PER_THREAD,
            },
        });
        let failure = Failure::new();
        let waker = Arc::clone(&shared);
        failure.on_failure(move |_| waker.queue.stop(true));
        let mut writer = Self {
            file: Arc::new(file),
            plan,
            threads: Vec::new(),
            failure: Arc::clone(&failure),
            job: Job::default(),
            pages_this_round: 0,
            rounds: 0,
            devices: devices
                .into_iter()
                .zip(&shared.counters.devices)
                .map(|((id, device), counters)| DeviceSlot {
                    id,
                    device,
                    precopy: Vec::new(),
                    counters: Arc::clone(counters),
                })
                .collect(),
            device_thread: None,
            device_entries: Arc::new(Mutex::new(Vec::new())),
            switched_over: false,
            shared,
        };
        for id in 0..config.threads {
            let shared = Arc::clone(&writer.shared);
            let runner = Arc::clone(&failure);
            let thread =
                failure.spawn(Side::Source, &format!("multifd-snapshot-{id}"), move || {
                    write_pages(&shared, usize::from(id), &runner);
                })?;
            writer.threads.push(thread);
        }
        writer.shared.counters.setup_done();
        Ok(writer)
    }

    /// The guest page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.shared.page_size
    }

    /// The blocks being saved.
    pub fn memory(&self) -> &GuestMemory {
        &self.shared.memory
    }

    /// A live view of the counters (bytes written, pages), for progress reporting.
    pub fn monitor(&self) -> Monitor {
        Monitor::of(&self.shared.counters)
    }

    /// A handle that stops the save from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle {
            failure: Arc::clone(&self.failure),
            side: Side::Source,
        }
    }

    /// Queues the page at `offset` of block `block` for the current round.
    pub fn queue_page(&mut self, block: usize, offset: u64) -> Result<(), Error> {
        let length = self.block_len(block, offset)?;
        if !offset.is_multiple_of(u64::from(self.shared.page_size)) || offset >= length {
            return Err(Error::PageOutOfRange { block, offset });
        }
        if self.job.block != block && !self.job.offsets.is_empty()
            || self.job.offsets.len() == PAGES_PER_JOB
        {
            self.flush()?;
        }
        self.job.block = block;
        self.job.offsets.push(offset);
        self.pages_this_round += 1;
        Ok(())
    }

    /// Queues every page of block `block`.
    pub fn queue_block(&mut self, block: usize) -> Result<(), Error> {
        let length = self.block_len(block, 0)?;
        for offset in (0..length).step_by(self.shared.page_size as usize) {
            self.queue_page(block, offset)?;
        }
        Ok(())
    }

    /// Queues the pages whose bits are set in `bitmap` (bit `i` of word `i / 64` is page
    /// `i`), as [`Source::queue_dirty_bitmap`](crate::Source::queue_dirty_bitmap) does:
    /// a bit past the block's last page is refused before any page is queued.
    pub fn queue_dirty_bitmap(&mut self, block: usize, bitmap: &[u64]) -> Result<(), Error> {
        let length = self.block_len(block, 0)?;
        for offset in dirty_offsets(block, bitmap, length, self.shared.page_size)? {
            self.queue_page(block, offset)?;
        }
        Ok(())
    }

    /// Ends the current round: returns once every page queued so far is in the file, so
    /// a page queued afterwards overwrites this round's copy.
    pub fn end_round(&mut self) -> Result<(), Error> {
        self.flush()?;
        self.shared
            .queue
            .drain()
            .map_err(|Stopped| self.stopped())?;
        self.rounds += 1;
        let counters = &self.shared.counters;
        counters.rounds.store(self.rounds, Ordering::Relaxed);
        lock(&counters.pages_per_round).push(self.pages_this_round);
        self.pages_this_round = 0;
        Ok(())
    }

    /// Live snapshot: lets every device with a pre-copy phase save what it can now
    /// ([`SaveDevice::save_precopy`]); it is kept in memory and goes into the file
    /// before the rest of the device's state at switchover.
    pub fn save_devices_precopy(&mut self) -> Result<(), Error> {
        for slot in &mut self.devices {
            let started = Instant::now();
            let result = slot
                .device
                .save_precopy(&mut StateWriter::new(&mut slot.precopy));
            slot.counters.add_busy(started.elapsed());
            if let Err(error) = result {
                let error = Error::Device {
                    side: Side::Source,
                    device: slot.id.clone(),
                    message: format!("precopy save failed: {error}"),
                };
                self.failure.fail(error);
                return Err(self.stopped());
            }
        }
        Ok(())
    }

    /// Live snapshot: device-state bytes the devices would still save if the VM stopped
    /// now.
    pub fn pending_device_bytes(&mut self) -> u64 {
        self.devices
            .iter_mut()
            .map(|slot| slot.device.pending_bytes())
            .sum()
    }

    /// Fails the save with `error` (if it had not failed) and returns the error to report.
    /// The file is left without its magic.
    pub fn abort(&self, error: Error) -> Error {
        if self.failure.is_failed() {
            return error;
        }
        self.failure.fail(error);
        self.stopped()
    }

    /// The VM is stopped: starts saving every device, one after the other on a thread of
    /// their own, concurrently with whatever the caller queues next (the final round).
    /// Called at most once; [`SnapshotWriter::complete`] calls it if the caller did not.
    pub fn switchover(&mut self) -> Result<(), Error> {
        if self.switched_over {
            return Err(Error::Config("switchover already started".into()));
        }
        self.switched_over = true;
        self.shared.counters.switchover_started();
        let devices = std::mem::take(&mut self.devices);
        let file = Arc::clone(&self.file);
        let path = self.shared.path.clone();
        let start = self.plan.device_area;
        let entries = Arc::clone(&self.device_entries);
        let failure = Arc::clone(&self.failure);
        let thread = self
            .failure
            .spawn(
                Side::Source,
                "multifd-snapshot-devices",
                move || match save_devices(devices, &file, &path, start) {
                    Ok(saved) => *lock(&entries) = saved,
                    Err(error) => failure.fail(error),
                },
            )
            .map_err(|error| self.abort(error))?;
        self.device_thread = Some(thread);
        Ok(())
    }

    /// Finishes: switches over if the caller did not, writes the last pages, waits for
    /// the devices, then writes the metadata (header, tables, bitmaps) and returns the
    /// figures. The file is complete when this returns; making it durable (`fsync`) is
    /// left to the caller.
    pub fn complete(mut self) -> Result<MigrationStats, Error> {
        if !self.switched_over {
            self.switchover()?;
        }
        if self.pages_this_round > 0 || self.rounds == 0 {
            self.end_round()?;
        }
        if let Some(thread) = self.device_thread.take() {
            join_threads([thread]);
        }
        if self.failure.is_failed() {
            return Err(self.stopped());
        }
        self.shared.counters.devices_saved();
        self.shared.queue.stop(false);
        join_threads(self.threads.drain(..));
        let devices = std::mem::take(&mut *lock(&self.device_entries));
        let file_len = devices
            .last()
            .map_or(self.plan.device_area, |device| device.offset + device.len());
        let blocks = self
            .shared
            .memory
            .blocks()
            .iter()
            .zip(&self.plan.blocks)
            .map(|(block, &(file_offset, bitmap_offset))| BlockEntry {
                name: block.name().into(),
                length: block.len(),
                file_offset,
                bitmap_offset,
                // Computed by `encode` from the bitmap.
                bitmap_crc: 0,
            })
            .collect();
        let metadata = Metadata {
            page_size: self.shared.page_size,
            metadata_len: self.plan.metadata_len,
            file_len,
            blocks,
            devices,
            bitmaps: self.shared.present.bitmaps(),
        };
        let io_error = |context| snapshot_io(&self.shared.path, context);
        self.file
            .set_len(file_len)
            .map_err(io_error("set the length"))?;
        self.file
            .write_all_at(&metadata.encode(), 0)
            .map_err(io_error("write the metadata"))?;
        self.shared.counters.drained();
        Ok(self.shared.counters.finish())
    }

    fn block_len(&self, block: usize, offset: u64) -> Result<u64, Error> {
        self.shared
            .memory
            .blocks()
            .get(block)
            .map(RamBlock::len)
            .ok_or(Error::PageOutOfRange { block, offset })
    }

    /// Hands the job being filled to the writer threads.
    fn flush(&mut self) -> Result<(), Error> {
        if self.job.offsets.is_empty() {
            return Ok(());
        }
        let next = Job {
            block: self.job.block,
            offsets: self.shared.queue.buffer(),
        };
        let job = std::mem::replace(&mut self.job, next);
        self.shared
            .queue
            .push(job)
            .map_err(|Stopped| self.stopped())
    }

    /// The error to report once the save has failed.
    fn stopped(&self) -> Error {
        self.failure
            .first_error(Error::Cancelled { side: Side::Source })
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.device_thread.is_some() {
            self.failure.fail(Error::Cancelled { side: Side::Source });
            join_threads(self.device_thread.take());
            join_threads(self.threads.drain(..));
        }
    }
}

/// Refuses a configuration, memory layout or device list the format cannot hold.
fn check_config(
    config: &SnapshotConfig,
    memory: &GuestMemory,
    devices: &SaveDevices,
) -> Result<(), Error> {
    if config.threads == 0 {
        return Err(Error::Config("a snapshot needs at least one thread".into()));
    }
    if !config.page_size.is_power_of_two() || !(64..=1 << 30).contains(&config.page_size) {
        return Err(Error::Config(format!(
            "page size {} is not a power of two from 64 bytes to 1 GiB",
            config.page_size
        )));
    }
    memory.check_layout(config.page_size)?;
    if config.direct_io {
        check_direct_io(config.page_size, memory)?;
    }
    let mut seen = HashSet::new();
    for (id, _) in devices {
        if let Some(problem) = name_problem(&id.idstr) {
            return Err(Error::Config(format!("device {id}: {problem}")));
        }
        if !seen.insert(id) {
            return Err(Error::Config(format!("device {id} given twice")));
        }
    }
    Ok(())
}

/// A writer thread: takes jobs until the save stops or fails.
fn write_pages(shared: &Shared, id: usize, failure: &Failure) {
    let mut iovecs = Vec::with_capacity(PAGES_PER_JOB);
    while let Some(job) = shared.queue.next() {
        let result = write_job(shared, id, &job, &mut iovecs);
        shared.queue.done(job);
        if let Err(error) = result {
            failure.fail(Error::SnapshotIo {
                path: shared.path.clone(),
                context: "write pages",
                source: error,
            });
            return;
        }
    }
}

/// Writes one job: zero pages become (or stay) holes, each run of consecutive non-zero
/// pages one `pwritev` at the run's fixed offset.
fn write_job(
    shared: &Shared,
    id: usize,
    job: &Job,
    iovecs: &mut Vec<libc::iovec>,
) -> io::Result<()> {
    let block = &shared.memory.blocks()[job.block];
    let base = shared.block_offsets[job.block];
    let page_size = u64::from(shared.page_size);
    let counters = &shared.counters.channels[id];
    // The run being gathered: its first page's offset in the block, and where it ends.
    let mut run: Option<(u64, u64)> = None;
    let mut normal = 0u64;
    let mut zero = 0u64;
    let mut calls = 0u64;
    let mut flush = |run: &mut Option<(u64, u64)>, iovecs: &mut Vec<libc::iovec>| {
        if let Some((start, _)) = run.take() {
            // SAFETY: the iovecs are whole pages inside the block (checked when queued),
            // which stays mapped while the writer lives; the guest may write them
            // meanwhile, which the dirty log catches for the next round.
            unsafe { transfer_at(&shared.pages, iovecs, base + start, Direction::Write)? };
            iovecs.clear();
            calls += 1;
        }
        io::Result::Ok(())
    };
    for &offset in &job.offsets {
        let page = offset / page_size;
        // SAFETY: a whole page inside the block (checked when queued); the host address
        // is 8-byte aligned and the page size a multiple of 64 (checked at creation).
        if unsafe { is_zero_page(block.host_address(offset), page_size as usize) } {
            flush(&mut run, iovecs)?;
            if shared.present.clear(job.block, page) {
                // Written in an earlier round, zeros now: make its bytes read as zeros.
                punch_hole(&shared.pages, base + offset, page_size)?;
            }
            zero += 1;
            continue;
        }
        shared.present.set(job.block, page);
        match run {
            Some((_, end)) if end == offset && iovecs.len() < IOV_MAX => {}
            _ => flush(&mut run, iovecs)?,
        }
        push_page(iovecs, 0, block.host_address(offset), page_size as usize);
        run = Some((run.map_or(offset, |(start, _)| start), offset + page_size));
        normal += 1;
    }
    flush(&mut run, iovecs)?;
    let bytes = normal * page_size;
    ChannelCounters::add(&counters.bytes, bytes);
    ChannelCounters::add(&counters.packets, calls);
    ChannelCounters::add(&counters.normal_pages, normal);
    ChannelCounters::add(&counters.zero_pages, zero);
    ChannelCounters::add(&counters.payload_bytes, bytes);
    ChannelCounters::add(&counters.raw_payload_bytes, bytes);
    Ok(())
}

/// Saves each device in turn into the device area from `start`: its precopy bytes, its
/// state, then its config. Returns the device table.
fn save_devices(
    devices: Vec<DeviceSlot>,
    file: &File,
    path: &Path,
    start: u64,
) -> Result<Vec<DeviceEntry>, Error> {
    let mut area = DeviceArea {
        file,
        offset: start,
        buffer: Vec::with_capacity(DEVICE_WRITE_BUFFER),
        crc: 0,
    };
    let mut entries = Vec::with_capacity(devices.len());
    for mut slot in devices {
        let started = Instant::now();
        let offset = area.position();
        area.crc = 0;
        let failed = |message: String| Error::Device {
            side: Side::Source,
            device: slot.id.clone(),
            message,
        };
        let io_error = |context| snapshot_io(path, context);
        io::Write::write_all(&mut area, &slot.precopy).map_err(io_error("write device state"))?;
        slot.device
            .save_state(&mut StateWriter::new(&mut area))
            .map_err(|error| failed(format!("save failed: {error}")))?;
        let state_len = area.position() - offset;
        let config = slot
            .device
            .save_config()
            .map_err(|error| failed(format!("saving the config failed: {error}")))?;
        io::Write::write_all(&mut area, &config).map_err(io_error("write device config"))?;
        area.write_out().map_err(io_error("write device state"))?;
        let length = state_len + config.len() as u64;
        slot.counters.count_chunk(length as usize);
        slot.counters.add_busy(started.elapsed());
        entries.push(DeviceEntry {
            id: slot.id,
            offset,
            state_len,
            config_len: config.len() as u64,
            crc: area.crc,
        });
    }
    Ok(entries)
}

/// The device area as a byte stream: buffered, written at increasing offsets, with the
/// CRC32C of what passed since it was last reset.
struct DeviceArea<'a> {
    file: &'a File,
    /// Where the buffer goes in the file.
    offset: u64,
    buffer: Vec<u8>,
    crc: u32,
}

impl DeviceArea<'_> {
    /// The file offset of the next byte written.
    fn position(&self) -> u64 {
        self.offset + self.buffer.len() as u64
    }

    fn write_out(&mut self) -> io::Result<()> {
        self.file.write_all_at(&self.buffer, self.offset)?;
        self.offset += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }
}

impl io::Write for DeviceArea<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.buffer.len() >= DEVICE_WRITE_BUFFER {
            self.write_out()?;
        }
        let taken = bytes.len().min(DEVICE_WRITE_BUFFER - self.buffer.len());
        self.crc = crc32c::crc32c_append(self.crc, &bytes[..taken]);
        self.buffer.extend_from_slice(&bytes[..taken]);
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out()
    }
}
