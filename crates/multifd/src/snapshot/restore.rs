//! Restoring: [`Snapshot`] opens a file and validates all of its metadata (header, tables,
//! every bitmap, their CRCs) before anything else happens; then either N threads read the
//! pages present into the target memory with `preadv` (and zero the others, unless the
//! memory is known to be zeroed), or the blocks are mapped from the file privately for a
//! lazy restore. Device blobs are read and checked against their CRCs before the first
//! byte of target memory is written, then loaded.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use multifd_wire::BlockAnnouncement;

use super::file_io::{check_direct_io, snapshot_io, transfer_at, Direction};
use super::format::{self, DeviceEntry, Metadata, FIXED_LEN};
use crate::device::{LoadDevice, LoadDevices};
use crate::error::{Error, SnapshotFault};
use crate::ids::{DeviceId, Side};
use crate::integrity::checksum;
use crate::ram::{GuestMemory, RamBlock};
use crate::stats::{ChannelCounters, Counters, MigrationStats};
use crate::transport::{push_page, IOV_MAX};

/// Pages a restore thread takes at a time: 1 MiB of 4 KiB pages, as the writer's jobs
/// (see `PAGES_PER_JOB` there): few enough claims to cost nothing, enough jobs that the
/// threads finish together.
const PAGES_PER_JOB: u64 = 256;

/// Bytes of device state handed to [`LoadDevice::load_state`] at a time: the engine's
/// default chunk size, so a device sees the pieces it sees in a migration.
const DEVICE_CHUNK: usize = crate::DEFAULT_DEVICE_CHUNK_SIZE as usize;

/// How a snapshot is restored into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreConfig {
    /// Reader threads (1 to 255).
    pub threads: u8,
    /// Whether the target memory is known to hold only zeros (freshly mapped anonymous
    /// memory or a new file): then zero pages are not written, as
    /// [`DestinationConfig::memory_zeroed`](crate::DestinationConfig::memory_zeroed).
    pub memory_zeroed: bool,
    /// Read pages with `O_DIRECT`, around the page cache: the page size and every target
    /// block's host address must then be multiples of 4 KiB, as for
    /// [`SnapshotConfig::direct_io`](crate::SnapshotConfig::direct_io).
    pub direct_io: bool,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        Self {
            threads: 2,
            memory_zeroed: false,
            direct_io: false,
        }
    }
}

/// What a lazy restore gives back.
#[derive(Debug)]
#[non_exhaustive]
pub struct LazyRestore {
    /// The guest memory: each block a private mapping of the file. Pages are read from
    /// the file on first touch; writes stay in this process.
    pub memory: GuestMemory,
    /// From the call to the memory being usable (every block mapped): the earliest a
    /// vCPU could run.
    pub memory_ready: Duration,
    /// From the call to every device loaded.
    pub total_time: Duration,
    /// Device-state bytes loaded.
    pub device_bytes: u64,
}

/// An open snapshot file whose metadata passed every check.
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    file: File,
    metadata: Metadata,
}

impl Snapshot {
    /// Opens `path` and validates its header, tables and bitmaps (fields, CRCs, that
    /// every area fits in the file and none overlaps another); every problem is an
    /// [`Error::BadSnapshot`] naming the field.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_owned();
        let io_error = |context| snapshot_io(&path, context);
        let file = File::open(&path).map_err(io_error("open"))?;
        let actual_len = file.metadata().map_err(io_error("stat"))?.len();
        let bad = |source| Error::BadSnapshot {
            path: path.clone(),
            source,
        };
        let mut fixed = vec![0u8; FIXED_LEN.min(actual_len as usize)];
        file.read_exact_at(&mut fixed, 0)
            .map_err(io_error("read the header"))?;
        let metadata_len = format::metadata_len(&fixed, actual_len).map_err(bad)?;
        let mut bytes = vec![0u8; metadata_len as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(io_error("read the metadata"))?;
        let metadata = Metadata::parse(&bytes, actual_len).map_err(bad)?;
        Ok(Self {
            path,
            file,
            metadata,
        })
    }

    /// The page size the snapshot was saved with.
    pub fn page_size(&self) -> u32 {
        self.metadata.page_size
    }

    /// The saved blocks (name and length), to map target memory for.
    pub fn blocks(&self) -> Vec<BlockAnnouncement> {
        self.metadata
            .blocks
            .iter()
            .map(|block| BlockAnnouncement {
                name: block.name.clone(),
                length: block.length,
            })
            .collect()
    }

    /// The saved devices, in save order.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.metadata
            .devices
            .iter()
            .map(|device| device.id.clone())
            .collect()
    }

    /// Pages present (saved with contents) over all blocks.
    pub fn present_pages(&self) -> u64 {
        self.metadata
            .bitmaps
            .iter()
            .flatten()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    /// Restores into `memory`, which must have exactly the file's blocks (names and
    /// lengths) and be writable, and loads `devices`, exactly the file's devices. Every
    /// device blob is checked against its CRC before any page is written.
    pub fn restore(
        &self,
        config: &RestoreConfig,
        memory: &GuestMemory,
        devices: LoadDevices,
    ) -> Result<MigrationStats, Error> {
        let started = Instant::now();
        if config.threads == 0 {
            return Err(Error::Config("a restore needs at least one thread".into()));
        }
        let targets = self.match_blocks(memory)?;
        for block in memory.blocks() {
            if !block.is_writable() {
                return Err(Error::Config(format!(
                    "ramblock {:?} is mapped read-only",
                    block.name()
                )));
            }
        }
        memory.check_layout(self.metadata.page_size)?;
        let direct = if config.direct_io {
            check_direct_io(self.metadata.page_size, memory)?;
            Some(
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&self.path)
                    .map_err(snapshot_io(
                        &self.path,
                        "open with O_DIRECT (the filesystem may not support it)",
                    ))?,
            )
        } else {
            None
        };
        let pages = direct.as_ref().unwrap_or(&self.file);
        let loads = self.read_devices(devices)?;
        let ids: Vec<DeviceId> = loads.iter().map(|load| load.entry.id.clone()).collect();
        let counters = Counters::new(
            Side::Destination,
            config.threads,
            self.metadata.page_size,
            &ids,
            started,
        );
        counters.guest_bytes.store(
            memory.blocks().iter().map(RamBlock::len).sum(),
            Ordering::Relaxed,
        );
        counters.setup_done();
        let jobs = self.jobs();
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..usize::from(config.threads))
                .map(|id| {
                    let reader = Reader {
                        snapshot: self,
                        pages,
                        memory,
                        targets: &targets,
                        counters: &counters.channels[id],
                        memory_zeroed: config.memory_zeroed,
                        whole_ranges: config.direct_io,
                    };
                    let (jobs, next, stop) = (&jobs, &next, &stop);
                    scope.spawn(move || reader.run(jobs, next, stop))
                })
                .collect();
            threads
                .into_iter()
                .map(|thread| {
                    thread.join().unwrap_or_else(|_| {
                        Err(Error::Internal {
                            side: Side::Destination,
                            what: "a snapshot reader thread panicked".into(),
                        })
                    })
                })
                .collect::<Result<Vec<()>, Error>>()
        });
        result?;
        counters.rounds.store(1, Ordering::Relaxed);
        counters.drained();
        for (load, counters) in loads.into_iter().zip(&counters.devices) {
            let loaded = Instant::now();
            let bytes = load.entry.len();
            load.load()?;
            counters.count_chunk(bytes as usize);
            counters.add_busy(loaded.elapsed());
        }
        counters.devices_saved();
        Ok(counters.finish())
    }

    /// Maps every block from the file privately (copy on write) and loads `devices`: the
    /// memory is usable as soon as it is mapped, each page read from the file when first
    /// touched (a zero page from a hole). The file must stay in place while the memory
    /// is used.
    pub fn restore_lazy(&self, devices: LoadDevices) -> Result<LazyRestore, Error> {
        let started = Instant::now();
        let loads = self.read_devices(devices)?;
        let blocks = self
            .metadata
            .blocks
            .iter()
            .map(|block| {
                let length = usize::try_from(block.length).map_err(|_| {
                    Error::Config(format!("ramblock {:?} is larger than memory", block.name))
                })?;
                // SAFETY: a private mapping: writes to the memory never reach the file,
                // and the caller keeps the file in place (documented above), so the
                // mapping's bytes are the file's until written.
                let mapping = unsafe {
                    MmapOptions::new()
                        .offset(block.file_offset)
                        .len(length)
                        .map_copy(&self.file)
                }
                .map_err(snapshot_io(&self.path, "map a block privately"))?;
                RamBlock::from_mapping(&block.name, mapping)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let memory = GuestMemory::new(blocks)?;
        let memory_ready = started.elapsed();
        let mut device_bytes = 0;
        for load in loads {
            device_bytes += load.entry.len();
            load.load()?;
        }
        Ok(LazyRestore {
            memory,
            memory_ready,
            total_time: started.elapsed(),
            device_bytes,
        })
    }

    /// For each file block, the index of the target block of the same name and length;
    /// every target block must be in the file.
    fn match_blocks(&self, memory: &GuestMemory) -> Result<Vec<usize>, Error> {
        let bad = |source| Error::BadSnapshot {
            path: self.path.clone(),
            source,
        };
        let targets = self
            .metadata
            .blocks
            .iter()
            .map(|block| {
                let index = memory
                    .find(&block.name)
                    .ok_or_else(|| bad(SnapshotFault::UnknownBlock(block.name.clone())))?;
                let target = memory.blocks()[index].len();
                if target != block.length {
                    return Err(bad(SnapshotFault::BlockSizeMismatch {
                        name: block.name.clone(),
                        file: block.length,
                        target,
                    }));
                }
                Ok(index)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if let Some(missing) = memory.blocks().iter().find(|target| {
            !self
                .metadata
                .blocks
                .iter()
                .any(|block| block.name == target.name())
        }) {
            return Err(bad(SnapshotFault::MissingBlock(missing.name().into())));
        }
        Ok(targets)
    }

    /// Pairs every saved device with its loader and reads its blob, checked against the
    /// CRC; a device on one side only is an error.
    fn read_devices(&self, devices: LoadDevices) -> Result<Vec<DeviceLoad>, Error> {
        let bad = |source| Error::BadSnapshot {
            path: self.path.clone(),
            source,
        };
        let mut devices: Vec<Option<(DeviceId, Box<dyn LoadDevice>)>> =
            devices.into_iter().map(Some).collect();
        let mut loads = Vec::with_capacity(self.metadata.devices.len());
        for entry in &self.metadata.devices {
            let found = devices
                .iter_mut()
                .find(|slot| slot.as_ref().is_some_and(|(id, _)| *id == entry.id))
                .and_then(Option::take);
            let Some((_, device)) = found else {
                return Err(bad(SnapshotFault::DeviceMismatch {
                    device: entry.id.clone(),
                    reason: "in the file, but no device was given to load it",
                }));
            };
            let length = usize::try_from(entry.len()).map_err(|_| {
                Error::Config(format!("device {} state is larger than memory", entry.id))
            })?;
            let mut blob = vec![0u8; length];
            self.file
                .read_exact_at(&mut blob, entry.offset)
                .map_err(snapshot_io(&self.path, "read device state"))?;
            let computed = checksum(&[&blob]);
            if computed != entry.crc {
                return Err(bad(SnapshotFault::ChecksumMismatch {
                    what: format!("device {}", entry.id),
                    stored: entry.crc,
                    computed,
                }));
            }
            loads.push(DeviceLoad {
                entry: entry.clone(),
                device,
                blob,
            });
        }
        if let Some((id, _)) = devices.into_iter().flatten().next() {
            return Err(bad(SnapshotFault::DeviceMismatch {
                device: id,
                reason: "given to load, but not in the file",
            }));
        }
        Ok(loads)
    }

    /// The restore's jobs: (file block, first page, pages).
    fn jobs(&self) -> Vec<(usize, u64, u64)> {
        let page_size = u64::from(self.metadata.page_size);
        let mut jobs = Vec::new();
        for (index, block) in self.metadata.blocks.iter().enumerate() {
            let pages = block.length / page_size;
            let mut first = 0;
            while first < pages {
                let count = PAGES_PER_JOB.min(pages - first);
                jobs.push((index, first, count));
                first += count;
            }
        }
        jobs
    }
}

/// A device, its checked blob, and where the blob's state ends.
struct DeviceLoad {
    entry: DeviceEntry,
    device: Box<dyn LoadDevice>,
    blob: Vec<u8>,
}

impl DeviceLoad {
    /// Hands the state to the device in chunks, then the config.
    fn load(mut self) -> Result<(), Error> {
        let failed = |message: String| Error::Device {
            side: Side::Destination,
            device: self.entry.id.clone(),
            message,
        };
        // Both lengths were checked against the blob's length when it was read.
        let (state, config) = self.blob.split_at(self.entry.state_len as usize);
        for chunk in state.chunks(DEVICE_CHUNK) {
            self.device
                .load_state(chunk)
                .map_err(|error| failed(format!("load failed: {error}")))?;
        }
        self.device
            .load_config(config)
            .map_err(|error| failed(format!("loading the config failed: {error}")))
    }
}

/// One restore thread.
/// One block of the snapshot as a reader job sees it.
#[derive(Clone, Copy)]
struct JobBlock<'a> {
    /// Where the block's pages start in the file.
    file_offset: u64,
    /// Which pages the file holds.
    bitmap: &'a [u64],
    /// Where they go.
    block: &'a RamBlock,
    page_size: u64,
}

impl JobBlock<'_> {
    fn present(&self, page: u64) -> bool {
        self.bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
}

struct Reader<'a> {
    snapshot: &'a Snapshot,
    /// The descriptor pages are read through (`O_DIRECT` when asked).
    pages: &'a File,
    memory: &'a GuestMemory,
    /// Per file block, its target block's index.
    targets: &'a [usize],
    counters: &'a ChannelCounters,
    memory_zeroed: bool,
    /// Read each job from its first to its last present page in one `preadv`, holes
    /// included, then zero the absent pages in between: with `O_DIRECT` every request
    /// waits for the disk, while a hole costs no disk read, so fewer, larger requests
    /// win. Through the page cache a hole would be read into cache pages for nothing.
    whole_ranges: bool,
}

impl Reader<'_> {
    /// Takes jobs until none is left or another thread failed.
    fn run(
        &self,
        jobs: &[(usize, u64, u64)],
        next: &AtomicUsize,
        stop: &AtomicBool,
    ) -> Result<(), Error> {
        let mut iovecs = Vec::with_capacity(PAGES_PER_JOB as usize);
        while !stop.load(Ordering::Relaxed) {
            let Some(&job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            let result = if self.whole_ranges {
                self.read_whole_range(job, &mut iovecs)
            } else {
                self.read_job(job, &mut iovecs)
            };
            if let Err(source) = result {
                stop.store(true, Ordering::Relaxed);
                return Err(Error::SnapshotIo {
                    path: self.snapshot.path.clone(),
                    context: "read pages",
                    source,
                });
            }
        }
        Ok(())
    }

    /// Reads one job's present pages with a single `preadv` over their whole range, then
    /// zeroes the absent pages: those inside the range always (the read put the file's
    /// bytes there), the others unless the memory is known zeroed.
    fn read_whole_range(
        &self,
        (index, first, count): (usize, u64, u64),
        iovecs: &mut Vec<libc::iovec>,
    ) -> std::io::Result<()> {
        let job = self.job_block(index);
        let (block, page_size) = (job.block, job.page_size);
        let present = |page| job.present(page);
        let pages = first..first + count;
        let range = pages
            .clone()
            .find(|&page| present(page))
            .zip(pages.clone().rev().find(|&page| present(page)));
        let (mut normal, mut calls) = (0, 0);
        if let Some((start, end)) = range {
            iovecs.clear();
            for page in start..=end {
                push_page(
                    iovecs,
                    0,
                    block.host_address(page * page_size),
                    page_size as usize,
                );
            }
            // SAFETY: whole pages inside the target block (the page range comes from the
            // file block, whose length equals the target's), mapped writable (checked),
            // and the engine forms no reference to them.
            unsafe {
                transfer_at(
                    self.pages,
                    iovecs,
                    job.file_offset + start * page_size,
                    Direction::Read,
                )?;
            }
            iovecs.clear();
            calls = 1;
        }
        for page in pages {
            if present(page) {
                normal += 1;
                continue;
            }
            let inside = range.is_some_and(|(start, end)| (start..=end).contains(&page));
            if inside || !self.memory_zeroed {
                // SAFETY: a whole page inside the target block (as above), whose page size
                // is a multiple of 8 (checked when the file was parsed).
                unsafe { block.zero_page(page * page_size, page_size as u32) };
            }
        }
        self.count(normal * page_size, (normal, count - normal), calls);
        Ok(())
    }

    /// Reads the present pages of one job into the target, one `preadv` per run, and
    /// zeroes the absent ones unless the memory is known zeroed.
    fn read_job(
        &self,
        (index, first, count): (usize, u64, u64),
        iovecs: &mut Vec<libc::iovec>,
    ) -> std::io::Result<()> {
        let job = self.job_block(index);
        let (block, page_size) = (job.block, job.page_size);
        let mut run_start = None;
        let (mut normal, mut zero, mut calls) = (0u64, 0u64, 0u64);
        let mut flush = |run_start: &mut Option<u64>, iovecs: &mut Vec<libc::iovec>| {
            if let Some(start) = run_start.take() {
                // SAFETY: the iovecs are whole pages inside the target block (the page
                // range comes from the file block, whose length equals the target's),
                // mapped writable (checked), and the engine forms no reference to them.
                unsafe {
                    transfer_at(self.pages, iovecs, job.file_offset + start, Direction::Read)?;
                }
                iovecs.clear();
                calls += 1;
            }
            std::io::Result::Ok(())
        };
        for page in first..first + count {
            let offset = page * page_size;
            if !job.present(page) {
                flush(&mut run_start, iovecs)?;
                if !self.memory_zeroed {
                    // SAFETY: a whole page inside the target block (as above), whose
                    // page size is a multiple of 8 (checked when the file was parsed).
                    unsafe { block.zero_page(offset, page_size as u32) };
                }
                zero += 1;
                continue;
            }
            if iovecs.len() == IOV_MAX {
                flush(&mut run_start, iovecs)?;
            }
            run_start.get_or_insert(offset);
            push_page(iovecs, 0, block.host_address(offset), page_size as usize);
            normal += 1;
        }
        flush(&mut run_start, iovecs)?;
        self.count(normal * page_size, (normal, zero), calls);
        Ok(())
    }

    /// Block `index` as a job reads it: where it starts in the file, which pages the file
    /// holds, and the target block.
    fn job_block(&self, index: usize) -> JobBlock<'_> {
        let metadata = &self.snapshot.metadata;
        JobBlock {
            file_offset: metadata.blocks[index].file_offset,
            bitmap: &metadata.bitmaps[index],
            block: &self.memory.blocks()[self.targets[index]],
            page_size: u64::from(metadata.page_size),
        }
    }

    /// Adds one job to the reader's counters: `bytes` read in `calls` reads, and its
    /// present and absent pages.
    fn count(&self, bytes: u64, (normal, zero): (u64, u64), calls: u64) {
        let counters = &self.counters;
        ChannelCounters::add(&counters.bytes, bytes);
        ChannelCounters::add(&counters.packets, calls);
        ChannelCounters::add(&counters.normal_pages, normal);
        ChannelCounters::add(&counters.zero_pages, zero);
        ChannelCounters::add(&counters.payload_bytes, bytes);
        ChannelCounters::add(&counters.raw_payload_bytes, bytes);
    }
}
