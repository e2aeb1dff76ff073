//! The send side: one thread per channel, and the buffer swap that feeds them.
//!
//! Each channel owns one [`Batch`]; each producer (the RAM queue, each device-state
//! saver) owns another. [`SendChannels::send`] hands the producer's filled batch to an
//! idle channel and gives the producer that channel's empty one: no copy and no allocation
//! per packet. Producers are served in arrival order (a ticket queue) and idle channels in
//! the order they became idle, so neither a producer nor a channel starves.
//!
//! A round ends with [`SendChannels::sync_round`]: every channel sends a SYNC packet after
//! whatever batch it holds, and the call returns once all have. That is also the source's
//! explicit drain before completion: when it returns, every queued byte was written.
//!
//! With dedicated device-state channels the last K channels form a pool of their own:
//! device-state batches go only there and RAM batches only to the others, each pool with
//! its own ticket queue, so a producer waiting for one pool never holds up the other.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use multifd_wire::{
    DeviceStatePacket, Flags, RamPacketFields, ZeroPageMode, DEVICE_STATE_CHUNK_HEADER_LEN,
};

use crate::bandwidth::BandwidthLimit;
use crate::channel_roles::ChannelRoles;
use crate::compress::{ChannelCompressor, CompressionSettings};
use crate::error::Error;
use crate::failure::{join_threads, Failure};
use crate::ids::{DeviceId, Link, Side};
use crate::integrity::{checksum, Integrity, TRAILER_LEN};
use crate::ram::GuestMemory;
use crate::stats::{ChannelCounters, Counters};
use crate::sync::{deadline_after, lock, wait};
use crate::transport::{iovec, push_page, Stream};
use crate::zero_copy::ZeroCopy;
use crate::zero_page::is_zero_page;

/// A packet's worth of work: pages of one block, or one device-state chunk.
///
/// A batch holds buffers for both kinds, so whichever batch a producer gets back from the
/// swap, it can fill it without allocating once the buffers have grown to size.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) kind: BatchKind,
    pub(crate) block: usize,
    pub(crate) offsets: Vec<u64>,
    /// For a device-state chunk: the chunk header, then the state bytes.
    pub(crate) chunk: Vec<u8>,
}

/// What a [`Batch`] carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchKind {
    /// Pages of `Batch::block` at `Batch::offsets`.
    #[default]
    Pages,
    /// A chunk of the device at this index in [`ChannelSettings::devices`].
    DeviceState {
        /// The device's index.
        device: usize,
    },
}

impl Batch {
    /// An empty batch for a device-state producer, with room for one chunk.
    pub(crate) fn device_state(device: usize, chunk_size: u32) -> Self {
        Self {
            kind: BatchKind::DeviceState { device },
            chunk: Vec::with_capacity(DEVICE_STATE_CHUNK_HEADER_LEN + chunk_size as usize),
            ..Self::default()
        }
    }
}

/// The migration stopped (its first error is in the [`Failure`]).
#[derive(Debug)]
pub(crate) struct Stopped;

/// What every channel thread shares.
pub(crate) struct ChannelSettings {
    pub(crate) memory: GuestMemory,
    pub(crate) page_size: u32,
    pub(crate) pages_per_packet: u32,
    pub(crate) zero_page: ZeroPageMode,
    pub(crate) compression: CompressionSettings,
    /// The devices whose chunks may be sent, by index.
    pub(crate) devices: Vec<DeviceId>,
    /// How many of the last channels carry only device state (0: all carry both).
    pub(crate) dedicated_channels: u8,
    /// The wire-bytes budget of all channels together, if capped.
    pub(crate) bandwidth: Option<BandwidthLimit>,
    /// Whether every packet carries a CRC32C trailer.
    pub(crate) integrity: Integrity,
    /// Whether uncompressed pages go out with `MSG_ZEROCOPY` (see [`crate::zero_copy`]).
    pub(crate) zero_copy: bool,
    /// How long the kernel may take to finish a round's zero-copy sends.
    pub(crate) idle_timeout: Duration,
}

#[derive(Default)]
struct Slot {
    batch: Batch,
    job: bool,
    sync: bool,
}

/// Channels that serve the same kind of batch, and the producers waiting for them.
#[derive(Default)]
struct Pool {
    idle: VecDeque<u8>,
    next_ticket: u64,
    serving: u64,
}

/// The pool of RAM batches, and of device state without dedicated channels.
const SHARED_POOL: usize = 0;
/// The pool of device-state batches on dedicated channels.
const DEVICE_POOL: usize = 1;

struct State {
    slots: Vec<Slot>,
    pools: [Pool; 2],
    roles: ChannelRoles,
    stopping: bool,
    failed: bool,
}

/// The pool channel `channel` serves.
fn pool_of_channel(channel: u8, roles: ChannelRoles) -> usize {
    if roles.carries_ram(channel) {
        SHARED_POOL
    } else {
        DEVICE_POOL
    }
}

impl State {
    fn pool_of_channel(&self, channel: u8) -> usize {
        pool_of_channel(channel, self.roles)
    }

    fn pool_of_batch(&self, kind: BatchKind) -> usize {
        match kind {
            BatchKind::DeviceState { .. } if self.roles.has_dedicated() => DEVICE_POOL,
            _ => SHARED_POOL,
        }
    }
}

struct Shared {
    state: Mutex<State>,
    producers: Condvar,
    channels: Vec<Condvar>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn wake_all(&self) {
        self.producers.notify_all();
        for channel in &self.channels {
            channel.notify_all();
        }
    }
}

/// The source's channel threads.
pub(crate) struct SendChannels {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl SendChannels {
    /// Starts one thread per stream; `streams[i]` is channel `i`, its hello already sent.
    pub(crate) fn start(
        streams: Vec<Stream>,
        settings: ChannelSettings,
        counters: &Arc<Counters>,
        failure: &Arc<Failure>,
    ) -> Self {
        let channels = streams.len();
        let roles = ChannelRoles::new(channels as u8, settings.dedicated_channels);
        let mut pools: [Pool; 2] = Default::default();
        for channel in 0..channels as u8 {
            pools[pool_of_channel(channel, roles)]
                .idle
                .push_back(channel);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots: (0..channels)
                    .map(|_| Slot {
                        batch: Batch {
                            block: 0,
                            offsets: Vec::with_capacity(settings.pages_per_packet as usize),
                            ..Batch::default()
                        },
                        ..Slot::default()
                    })
                    .collect(),
                pools,
                roles,
                stopping: false,
                failed: false,
            }),
            producers: Condvar::new(),
            channels: (0..channels).map(|_| Condvar::new()).collect(),
        });
        let waker = Arc::clone(&shared);
        failure.on_failure(move |_| {
            waker.lock().failed = true;
            waker.wake_all();
        });
        let settings = Arc::new(settings);
        let packet_numbers = Arc::new(AtomicU64::new(0));
        let threads = streams
            .into_iter()
            .enumerate()
            .map(|(id, stream)| {
                let sender = ChannelSender {
                    id: id as u8,
                    stream,
                    settings: Arc::clone(&settings),
                    counters: Arc::clone(counters),
                    packet_numbers: Arc::clone(&packet_numbers),
                    header: Vec::new(),
                    normal: Vec::with_capacity(settings.pages_per_packet as usize),
                    zero: Vec::with_capacity(settings.pages_per_packet as usize),
                    compressor: None,
                    charged: 0,
                    copied: Vec::new(),
                    trailer: [0; TRAILER_LEN],
                    zero_copy: settings.zero_copy.then(ZeroCopy::default),
                };
                let shared = Arc::clone(&shared);
                let runner = Arc::clone(failure);
                failure.spawn(Side::Source, &format!("multifd-send-{id}"), move || {
                    sender.run(&shared, &runner);
                })
            })
            .collect::<Result<Vec<_>, _>>();
        let threads = threads.unwrap_or_else(|error| {
            failure.fail(error);
            Vec::new()
        });
        Self {
            shared,
            threads: Mutex::new(threads),
        }
    }

    /// Swaps `batch` (filled) with an idle channel's empty batch and starts that channel
    /// on it; `batch` keeps its kind. Blocks while every channel of its pool is busy. Safe
    /// to call from several producers.
    pub(crate) fn send(&self, batch: &mut Batch) -> Result<(), Stopped> {
        let mut state = self.shared.lock();
        let pool = state.pool_of_batch(batch.kind);
        let ticket = state.pools[pool].next_ticket;
        state.pools[pool].next_ticket += 1;
        while !state.failed
            && (state.pools[pool].serving != ticket || state.pools[pool].idle.is_empty())
        {
            state = wait(&self.shared.producers, state);
        }
        state.pools[pool].serving += 1;
        if state.failed {
            self.shared.producers.notify_all();
            return Err(Stopped);
        }
        let Some(channel) = state.pools[pool].idle.pop_front() else {
            return Err(Stopped);
        };
        let kind = batch.kind;
        let slot = &mut state.slots[usize::from(channel)];
        std::mem::swap(&mut slot.batch, batch);
        batch.kind = kind;
        slot.job = true;
        self.shared.channels[usize::from(channel)].notify_one();
        self.shared.producers.notify_all();
        Ok(())
    }

    /// Makes every channel send a SYNC after the batch it holds; returns when all have.
    /// Channels waiting to send their SYNC take no new batch, so producers still sending
    /// (device savers) cannot hold a SYNC back.
    pub(crate) fn sync_round(&self) -> Result<(), Stopped> {
        let mut state = self.shared.lock();
        for pool in &mut state.pools {
            pool.idle.clear();
        }
        for (slot, wakeup) in state.slots.iter_mut().zip(&self.shared.channels) {
            slot.sync = true;
            wakeup.notify_one();
        }
        while !state.failed && state.slots.iter().any(|slot| slot.sync) {
            state = wait(&self.shared.producers, state);
        }
        if state.failed {
            Err(Stopped)
        } else {
            Ok(())
        }
    }

    /// Lets every channel thread finish its work and exit, and waits for them. The
    /// connections close as the threads drop them.
    pub(crate) fn finish(&self) {
        self.shared.lock().stopping = true;
        self.shared.wake_all();
        let threads = std::mem::take(&mut *lock(&self.threads));
        join_threads(threads);
    }
}

impl Drop for SendChannels {
    fn drop(&mut self) {
        let threads = self
            .threads
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if !threads.is_empty() {
            {
                let mut state = self.shared.lock();
                state.stopping = true;
                state.failed = true;
            }
            self.shared.wake_all();
            for thread in threads.drain(..) {
                // A panic here was a consequence of the failure being torn down.
                let _ = thread.join();
            }
        }
    }
}

/// With the integrity extension, puts the CRC32C of `parts` in `trailer`; returns the
/// trailer's length on the wire (0 without the extension).
fn seal(integrity: Integrity, trailer: &mut [u8; TRAILER_LEN], parts: &[&[u8]]) -> usize {
    if integrity != Integrity::Crc32c {
        return 0;
    }
    *trailer = checksum(parts).to_be_bytes();
    TRAILER_LEN
}

enum Work {
    Batch(Batch),
    Sync,
}

/// One channel thread's state; its buffers are reused for every packet.
struct ChannelSender {
    id: u8,
    stream: Stream,
    settings: Arc<ChannelSettings>,
    counters: Arc<Counters>,
    packet_numbers: Arc<AtomicU64>,
    header: Vec<u8>,
    normal: Vec<u64>,
    zero: Vec<u64>,
    /// The channel's compression stream, made on its thread; `None` without compression.
    compressor: Option<ChannelCompressor>,
    /// The channel's bytes already charged to the bandwidth budget.
    charged: u64,
    /// With the integrity extension: the pages of an uncompressed packet, copied out of
    /// guest memory so the checksum covers exactly the bytes sent.
    copied: Vec<u8>,
    /// The CRC32C trailer of the packet being sent.
    trailer: [u8; TRAILER_LEN],
    /// With zero-copy: the sends the kernel has yet to finish.
    zero_copy: Option<ZeroCopy>,
}

impl ChannelSender {
    fn run(mut self, shared: &Shared, failure: &Failure) {
        let id = usize::from(self.id);
        let packet_bytes = (self.settings.pages_per_packet * self.settings.page_size) as usize;
        match ChannelCompressor::new(self.settings.compression, packet_bytes) {
            Ok(compressor) => self.compressor = compressor,
            Err(error) => {
                failure.fail(Error::io(
                    Side::Source,
                    Link::Channel(self.id),
                    "create the compressor",
                    error,
                ));
                return;
            }
        }
        let mut iovecs = Vec::with_capacity(1 + self.settings.pages_per_packet as usize);
        loop {
            let work = {
                let mut state = shared.lock();
                loop {
                    if state.failed {
                        return;
                    }
                    let slot = &mut state.slots[id];
                    if slot.job {
                        break Work::Batch(std::mem::take(&mut slot.batch));
                    }
                    if slot.sync {
                        break Work::Sync;
                    }
                    if state.stopping {
                        return;
                    }
                    state = wait(&shared.channels[id], state);
                }
            };
            let result = match &work {
                Work::Batch(batch) => match batch.kind {
                    BatchKind::Pages => self.send_pages(batch, &mut iovecs),
                    BatchKind::DeviceState { device } => self.send_device_state(device, batch),
                },
                Work::Sync => self.send_sync(),
            };
            if let Err(error) = result {
                // The kernel could not read the pages: if a block's file shrank, that is
                // the error to report, naming the block.
                let shrank = if error.raw_os_error() == Some(libc::EFAULT) {
                    self.settings.memory.check_files().err()
                } else {
                    None
                };
                failure.fail(shrank.unwrap_or_else(|| {
                    Error::io_or_stalled(
                        Side::Source,
                        Link::Channel(self.id),
                        "write packet",
                        error,
                    )
                }));
                return;
            }
            if let Some(limit) = &self.settings.bandwidth {
                let written = self.counters().bytes.load(Ordering::Relaxed);
                let pause = limit.charge(written - std::mem::replace(&mut self.charged, written));
                // Woken early by a failure, which the next turn of the loop sees.
                if !pause.is_zero() && failure.wait_for_failure(pause) {
                    return;
                }
            }
            let mut state = shared.lock();
            let slot = &mut state.slots[id];
            let sync_next = match work {
                Work::Batch(mut batch) => {
                    batch.offsets.clear();
                    batch.chunk.clear();
                    slot.batch = batch;
                    slot.job = false;
                    slot.sync
                }
                Work::Sync => {
                    slot.sync = false;
                    false
                }
            };
            if !sync_next {
                let pool = state.pool_of_channel(self.id);
                state.pools[pool].idle.push_back(self.id);
            }
            shared.producers.notify_all();
        }
    }

    fn trailer_len(&self) -> usize {
        if self.settings.integrity == Integrity::Crc32c {
            TRAILER_LEN
        } else {
            0
        }
    }

    fn counters(&self) -> &ChannelCounters {
        &self.counters.channels[usize::from(self.id)]
    }

    fn send_sync(&mut self) -> std::io::Result<()> {
        if let Some(zero_copy) = &mut self.zero_copy {
            // Nothing of the round may still be in flight once its SYNC is sent.
            zero_copy.wait_all(&self.stream, deadline_after(self.settings.idle_timeout))?;
            let (sends, copied) = zero_copy.finished();
            let counters = &self.counters.channels[usize::from(self.id)];
            counters.zero_copy_sends.store(sends, Ordering::Relaxed);
            counters.zero_copy_copied.store(copied, Ordering::Relaxed);
        }
        self.normal.clear();
        self.zero.clear();
        self.header.clear();
        self.encode_packet(Flags::SYNC, "", 0)?;
        let trailer = seal(self.settings.integrity, &mut self.trailer, &[&self.header]);
        let mut iovecs = [
            iovec(self.header.as_ptr(), self.header.len()),
            iovec(self.trailer.as_ptr(), trailer),
        ];
        // SAFETY: the iovecs point to `self.header` and `self.trailer`, which are not
        // touched during the call.
        unsafe { self.stream.write_all_raw(&mut iovecs)? };
        let counters = self.counters();
        ChannelCounters::add(&counters.bytes, (self.header.len() + trailer) as u64);
        ChannelCounters::add(&counters.packets, 1);
        ChannelCounters::add(&counters.sync_packets, 1);
        Ok(())
    }

    fn send_pages(&mut self, batch: &Batch, iovecs: &mut Vec<libc::iovec>) -> std::io::Result<()> {
        let settings = Arc::clone(&self.settings);
        let block = &settings.memory.blocks()[batch.block];
        let page_size = settings.page_size as usize;
        self.normal.clear();
        self.zero.clear();
        for &offset in &batch.offsets {
            let zero = settings.zero_page == ZeroPageMode::Multifd
                // SAFETY: the RAM queue only batches whole pages inside the block, and the
                // block's host address is 8-byte aligned (checked at setup); the page
                // size is a multiple of 64 (checked at setup).
                && unsafe { is_zero_page(block.host_address(offset), page_size) };
            if zero {
                self.zero.push(offset);
            } else {
                self.normal.push(offset);
            }
        }
        let raw_payload = self.normal.len() * page_size;
        iovecs.clear();
        iovecs.push(iovec(self.header.as_ptr(), 0));
        let mut flags = 0;
        let payload = match self.compressor.as_mut() {
            Some(compressor) if !self.normal.is_empty() => {
                let started = Instant::now();
                // SAFETY: the queued offsets are whole pages inside the block (checked when
                // queued), whose host address is 8-byte aligned and whose page size is a
                // multiple of 64 (both checked at setup); a batch holds at most a packet.
                let packed = unsafe { compressor.compress_pages(block, &self.normal, page_size)? };
                if packed.uncompressed {
                    flags |= Flags::UNCOMPRESSED;
                }
                iovecs.push(iovec(packed.bytes.as_ptr(), packed.bytes.len()));
                let counters = &self.counters.channels[usize::from(self.id)];
                ChannelCounters::add(&counters.codec_nanos, started.elapsed().as_nanos() as u64);
                ChannelCounters::add(
                    &counters.uncompressed_packets,
                    u64::from(packed.uncompressed),
                );
                packed.bytes.len()
            }
            _ if self.settings.integrity == Integrity::Crc32c => {
                // The checksum must cover the bytes sent, which a running guest could
                // change between checksumming and sending its memory: send a copy.
                self.copied.resize(raw_payload, 0);
                for (page, &offset) in self.copied.chunks_exact_mut(page_size).zip(&self.normal) {
                    // SAFETY: a whole page inside the block (checked when queued), whose
                    // host address is 8-byte aligned and page size a multiple of 64 (both
                    // checked at setup).
                    unsafe { block.read_page(offset, page) };
                }
                iovecs.push(iovec(self.copied.as_ptr(), raw_payload));
                raw_payload
            }
            _ => {
                for &offset in &self.normal {
                    push_page(iovecs, 1, block.host_address(offset), page_size);
                }
                raw_payload
            }
        };
        self.header.clear();
        self.encode_packet(flags, block.name(), payload as u32)?;
        iovecs[0] = iovec(self.header.as_ptr(), self.header.len());
        if self.settings.integrity == Integrity::Crc32c {
            let payload_bytes = match iovecs.get(1) {
                // SAFETY: the payload iovec, when there is one, is the single buffer
                // filled above (the copy or the compressor's output), owned by this
                // thread and untouched until the packet is sent.
                Some(buffer) => unsafe {
                    std::slice::from_raw_parts(buffer.iov_base.cast::<u8>(), buffer.iov_len)
                },
                None => &[],
            };
            seal(
                Integrity::Crc32c,
                &mut self.trailer,
                &[&self.header, payload_bytes],
            );
            iovecs.push(iovec(self.trailer.as_ptr(), TRAILER_LEN));
        }
        match &mut self.zero_copy {
            // Only guest pages go zero-copy: the header is copied, the pages follow.
            Some(zero_copy) if iovecs.len() > 1 => {
                let (header, pages) = iovecs.split_at_mut(1);
                // SAFETY: the header iovec points to `self.header`, untouched during the
                // call.
                unsafe { self.stream.write_all_raw(header)? };
                // SAFETY: the page iovecs point inside the block (whole pages, checked when
                // queued), which stays mapped for the migration, past the wait for every
                // notification at the round's SYNC. Guest writes meanwhile are allowed.
                unsafe {
                    zero_copy.send(
                        &self.stream,
                        pages,
                        deadline_after(self.settings.idle_timeout),
                    )?;
                }
            }
            // SAFETY: the header iovec points to `self.header`, untouched during the call;
            // page iovecs point inside the block (whole pages, checked when queued), which
            // stays mapped for the migration, or into the compressor's buffers, untouched
            // until the next packet. Guest writes during the copy are allowed.
            _ => unsafe { self.stream.write_all_raw(iovecs)? },
        }
        let trailer = self.trailer_len();
        let counters = self.counters();
        ChannelCounters::add(
            &counters.bytes,
            (self.header.len() + payload + trailer) as u64,
        );
        ChannelCounters::add(&counters.packets, 1);
        ChannelCounters::add(&counters.normal_pages, self.normal.len() as u64);
        ChannelCounters::add(&counters.zero_pages, self.zero.len() as u64);
        ChannelCounters::add(&counters.payload_bytes, payload as u64);
        ChannelCounters::add(&counters.raw_payload_bytes, raw_payload as u64);
        Ok(())
    }

    /// Writes one device-state packet and its chunk (header and state) in one `writev`.
    fn send_device_state(&mut self, device: usize, batch: &Batch) -> std::io::Result<()> {
        let id = &self.settings.devices[device];
        let payload = u32::try_from(batch.chunk.len())
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        self.header.clear();
        DeviceStatePacket {
            idstr: &id.idstr,
            instance_id: id.instance_id,
            next_packet_size: payload,
        }
        .encode(&mut self.header)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        let trailer = seal(
            self.settings.integrity,
            &mut self.trailer,
            &[&self.header, &batch.chunk],
        );
        let mut iovecs = [
            iovec(self.header.as_ptr(), self.header.len()),
            iovec(batch.chunk.as_ptr(), batch.chunk.len()),
            iovec(self.trailer.as_ptr(), trailer),
        ];
        // SAFETY: the iovecs point to buffers this thread owns (`self.header`, the batch's
        // chunk and `self.trailer`), untouched during the call.
        unsafe { self.stream.write_all_raw(&mut iovecs)? };
        let counters = self.counters();
        ChannelCounters::add(
            &counters.bytes,
            (self.header.len() + batch.chunk.len() + trailer) as u64,
        );
        ChannelCounters::add(&counters.device_chunks, 1);
        Ok(())
    }

    fn encode_packet(
        &mut self,
        flags: u32,
        ramblock: &str,
        next_packet_size: u32,
    ) -> std::io::Result<()> {
        RamPacketFields {
            flags: Flags(flags | self.settings.compression.method.to_wire()),
            pages_alloc: self.settings.pages_per_packet,
            next_packet_size,
            packet_num: self.packet_numbers.fetch_add(1, Ordering::Relaxed),
            ramblock,
            normal: &self.normal,
            zero: &self.zero,
        }
        .encode(&mut self.header)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use multifd_wire::{Compression, PacketHeader, RamLimits, RamPacket, RAM_PACKET_FIXED_LEN};

    use super::*;
    use crate::ram::RamBlock;

    const PAGE: u32 = 4096;
    const PAGES_PER_PACKET: u32 = 4;

    /// What a reader thread saw on one channel: for each packet, SYNC or page count.
    fn drain(mut stream: UnixStream) -> Vec<Option<u32>> {
        let limits = RamLimits {
            max_pages: PAGES_PER_PACKET,
            page_size: PAGE,
            compression: Compression::None,
            extensions: 0,
        };
        let mut packets = Vec::new();
        let mut packet = vec![0u8; RamPacket::wire_len(PAGES_PER_PACKET)];
        let mut payload = vec![0u8; (PAGE * PAGES_PER_PACKET) as usize];
        while stream
            .read_exact(&mut packet[..RAM_PACKET_FIXED_LEN])
            .is_ok()
        {
            PacketHeader::decode(&packet[..12]).expect("header");
            let length =
                RamPacket::total_len(&packet[..RAM_PACKET_FIXED_LEN], &limits).expect("length");
            stream
                .read_exact(&mut packet[RAM_PACKET_FIXED_LEN..length])
                .expect("offsets");
            let ram = RamPacket::decode(&packet[..length], &limits).expect("packet");
            let size = ram.next_packet_size as usize;
            stream.read_exact(&mut payload[..size]).expect("payload");
            packets.push((!ram.flags.is_sync()).then(|| ram.normal_pages() + ram.zero_pages()));
        }
        packets
    }

    /// Per channel, what its reader saw: for each packet, its page count or `None` (SYNC).
    type Readers = Vec<JoinHandle<Vec<Option<u32>>>>;

    /// A pool over `streams` sending pages of a 64-page anonymous block.
    fn pool(streams: Vec<Stream>, failure: &Arc<Failure>) -> SendChannels {
        let mapping = memmap2::MmapMut::map_anon(64 * PAGE as usize).expect("memory");
        let block = RamBlock::from_mapping("ram", mapping).expect("block");
        let counters = Counters::new(
            Side::Source,
            streams.len() as u8,
            PAGE,
            &[],
            std::time::Instant::now(),
        );
        SendChannels::start(
            streams,
            ChannelSettings {
                memory: GuestMemory::new(vec![block]).expect("memory"),
                page_size: PAGE,
                pages_per_packet: PAGES_PER_PACKET,
                zero_page: ZeroPageMode::Multifd,
                compression: CompressionSettings::NONE,
                devices: Vec::new(),
                dedicated_channels: 0,
                bandwidth: None,
                integrity: Integrity::None,
                zero_copy: false,
                idle_timeout: Duration::from_secs(10),
            },
            &counters,
            failure,
        )
    }

    /// A pool of `channels` channels, each drained by a reader thread.
    fn start(channels: usize) -> (SendChannels, Arc<Failure>, Readers) {
        let (mut ours, mut readers) = (Vec::new(), Vec::new());
        for _ in 0..channels {
            let (local, remote) = UnixStream::pair().expect("socket pair");
            ours.push(Stream::Unix(local));
            readers.push(std::thread::spawn(move || drain(remote)));
        }
        let failure = Failure::new();
        (pool(ours, &failure), failure, readers)
    }

    fn full_batch() -> Batch {
        Batch {
            offsets: (0..u64::from(PAGES_PER_PACKET))
                .map(|page| page * u64::from(PAGE))
                .collect(),
            ..Batch::default()
        }
    }

    #[test]
    fn send_swaps_buffers_without_allocating() {
        let (pool, _failure, readers) = start(2);
        let mut batch = full_batch();
        let before = batch.offsets.as_ptr();
        pool.send(&mut batch).expect("send");
        assert!(
            batch.offsets.is_empty(),
            "the producer gets the channel's empty batch"
        );
        assert_ne!(
            batch.offsets.as_ptr(),
            before,
            "buffers were swapped, not copied"
        );
        assert_eq!(batch.offsets.capacity(), PAGES_PER_PACKET as usize);
        pool.finish();
        let packets: Vec<_> = readers
            .into_iter()
            .flat_map(|reader| reader.join().expect("reader"))
            .collect();
        assert_eq!(packets, vec![Some(PAGES_PER_PACKET)]);
    }

    #[test]
    fn producers_that_keep_sending_cannot_hold_a_sync_back() {
        let (pool, _failure, readers) = start(2);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let mut batch = full_batch();
                        pool.send(&mut batch).expect("send");
                    }
                });
            }
            for _ in 0..20 {
                pool.sync_round()
                    .expect("every round ends while producers send");
            }
            stop.store(true, Ordering::Relaxed);
        });
        pool.finish();
        for reader in readers {
            let packets = reader.join().expect("reader");
            assert_eq!(packets.iter().filter(|packet| packet.is_none()).count(), 20);
        }
    }

    #[test]
    fn concurrent_producers_reach_every_channel_and_syncs_come_last() {
        const PRODUCERS: usize = 4;
        const BATCHES: usize = 200;
        let (pool, _failure, readers) = start(4);
        std::thread::scope(|scope| {
            for _ in 0..PRODUCERS {
                scope.spawn(|| {
                    for _ in 0..BATCHES {
                        let mut batch = full_batch();
                        pool.send(&mut batch).expect("send");
                    }
                });
            }
        });
        pool.sync_round().expect("sync");
        pool.finish();
        let per_channel: Vec<_> = readers
            .into_iter()
            .map(|reader| reader.join().expect("reader"))
            .collect();
        let total: usize = per_channel.iter().map(|packets| packets.len() - 1).sum();
        assert_eq!(total, PRODUCERS * BATCHES);
        for packets in &per_channel {
            assert_eq!(
                packets.last(),
                Some(&None),
                "each channel ends its round with a SYNC"
            );
            assert_eq!(packets.iter().filter(|packet| packet.is_none()).count(), 1);
            // Idle channels are used in the order they became idle: none starves.
            assert!(
                packets.len() > BATCHES / 4,
                "channel starved: {} packets",
                packets.len()
            );
        }
    }

    #[test]
    fn a_broken_channel_stops_every_producer() {
        let (healthy, healthy_peer) = UnixStream::pair().expect("socket pair");
        let (broken, broken_peer) = UnixStream::pair().expect("socket pair");
        drop(broken_peer);
        let reader = std::thread::spawn(move || drain(healthy_peer));
        let failure = Failure::new();
        let pool = pool(vec![Stream::Unix(healthy), Stream::Unix(broken)], &failure);
        // The broken channel fails once its thread runs and writes; on a loaded host the
        // healthy one may take many batches first, so the bound is time, not a count.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stopped = false;
        while !stopped && Instant::now() < deadline {
            stopped = pool.send(&mut full_batch()).is_err();
        }
        assert!(stopped, "sending went on after a channel broke");
        assert!(pool.sync_round().is_err());
        pool.finish();
        let error = failure.first_error(Error::Cancelled { side: Side::Source });
        assert!(
            matches!(
                error,
                Error::Io {
                    side: Side::Source,
                    link: Link::Channel(1),
                    ..
                }
            ),
            "{error}"
        );
        drop(reader);
    }
}
