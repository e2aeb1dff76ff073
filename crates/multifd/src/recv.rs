//! The receive side: one thread per channel, and the barrier that ends each round.
//!
//! A channel thread reads a packet header, validates the whole packet
//! ([`multifd_wire::RamPacket::decode`] for what the negotiated limits decide, then the
//! block name and every offset against the announced blocks here) and only then reads
//! the pages, with `readv` straight into guest memory. At a SYNC it stops until the
//! control side releases the round ([`SyncBarrier`]), because the next round may carry a
//! newer copy of a page this round sent on another channel.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use multifd_wire::{
    Compression, DeviceStateChunkHeader, DeviceStateLimits, DeviceStatePacket, PacketHeader,
    PacketKind, RamLimits, RamPacket, DEVICE_STATE_CHUNK_HEADER_LEN, DEVICE_STATE_PACKET_LEN,
    PACKET_HEADER_LEN, RAM_PACKET_FIXED_LEN,
};

use crate::channel_roles::ChannelRoles;
use crate::compress::PacketDecompressor;
use crate::device::load::DeviceLoaders;
use crate::error::{Error, Violation};
use crate::failure::{Failure, PEER_REASON_GRACE};
use crate::ids::{DeviceId, Link, Side};
use crate::integrity::{checksum, Integrity, TRAILER_LEN};
use crate::ram::{GuestMemory, RamBlock, ReceivedPages};
use crate::stats::{ChannelCounters, Counters};
use crate::sync::{deadline_after, lock, wait, wait_timeout};
use crate::transport::{push_page, Stream};

/// Channels wait here at each SYNC until the control side releases the round.
pub(crate) struct SyncBarrier {
    state: Mutex<BarrierState>,
    changed: Condvar,
    /// Per channel: a packet has begun arriving and is not fully handled yet. Atomics
    /// outside the state lock: every packet sets and clears its flag, and the channels
    /// should not contend on one mutex for it.
    mid_packet: Vec<AtomicBool>,
}

struct BarrierState {
    /// SYNC packets seen per channel.
    synced: Vec<u64>,
    /// Rounds released so far.
    released: u64,
    /// Completion confirmed: a connection closing at a packet boundary is expected.
    finishing: bool,
    failed: bool,
}

/// Why the control side could not release a round.
pub(crate) enum ReleaseError {
    Stopped,
    /// This channel (the first of those late) had not reached the round's SYNC in time.
    TimedOut {
        channel: u8,
    },
}

impl SyncBarrier {
    pub(crate) fn new(channels: u8, failure: &Failure) -> Arc<Self> {
        let barrier = Arc::new(Self {
            state: Mutex::new(BarrierState {
                synced: vec![0; usize::from(channels)],
                released: 0,
                finishing: false,
                failed: false,
            }),
            changed: Condvar::new(),
            mid_packet: (0..channels).map(|_| AtomicBool::new(false)).collect(),
        });
        let waker = Arc::clone(&barrier);
        failure.on_failure(move |_| {
            waker.lock().failed = true;
            waker.changed.notify_all();
        });
        barrier
    }

    fn lock(&self) -> MutexGuard<'_, BarrierState> {
        lock(&self.state)
    }

    /// Channel `channel` reached a SYNC: blocks until its round is released. `false` if
    /// the migration failed meanwhile, or completed without that round (a SYNC past the
    /// last round, which the source never ends).
    fn arrive(&self, channel: u8) -> bool {
        let mut state = self.lock();
        state.synced[usize::from(channel)] += 1;
        // The SYNC is read whole: the channel waits here at a packet boundary.
        self.set_mid_packet(channel, false);
        let round = state.synced[usize::from(channel)];
        self.changed.notify_all();
        while !state.failed && !state.finishing && state.released < round {
            state = wait(&self.changed, state);
        }
        !state.failed && state.released >= round
    }

    /// Waits until every channel has reached its SYNC for `round`, then releases them.
    pub(crate) fn release(&self, round: u64, timeout: Duration) -> Result<(), ReleaseError> {
        let deadline = deadline_after(timeout);
        let mut state = self.lock();
        while !state.failed && state.synced.iter().any(|&synced| synced < round) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let late = state.synced.iter().position(|&synced| synced < round);
                return Err(ReleaseError::TimedOut {
                    channel: late.unwrap_or_default() as u8,
                });
            }
            state = wait_timeout(&self.changed, state, left);
        }
        if state.failed {
            return Err(ReleaseError::Stopped);
        }
        state.released = round;
        self.changed.notify_all();
        Ok(())
    }

    /// Channel `channel` has begun reading a packet (`true`) or handled one (`false`).
    fn set_mid_packet(&self, channel: u8, mid_packet: bool) {
        self.mid_packet[usize::from(channel)].store(mid_packet, Ordering::SeqCst);
    }

    /// The source completed after `rounds` rounds: from now on channels may see their
    /// connection close, and a channel waiting at a later SYNC is let go. Refused, with the
    /// channel, if a channel already sent a SYNC past `rounds`, or is in the middle of a
    /// packet: the source sent more than it declared.
    pub(crate) fn finish(&self, rounds: u64) -> Result<(), Violation> {
        let mut state = self.lock();
        if let Some(channel) = state.synced.iter().position(|&synced| synced > rounds) {
            return Err(Violation::SyncPastLastRound {
                channel: channel as u8,
                rounds,
            });
        }
        let mid_packet = self
            .mid_packet
            .iter()
            .position(|mid| mid.load(Ordering::SeqCst));
        if let Some(channel) = mid_packet {
            return Err(Violation::PacketAfterCompletion {
                channel: channel as u8,
            });
        }
        state.finishing = true;
        self.changed.notify_all();
        Ok(())
    }

    fn finishing(&self) -> bool {
        self.lock().finishing
    }
}

/// What every receive thread shares.
pub(crate) struct ReceiveSettings {
    pub(crate) memory: GuestMemory,
    pub(crate) received: ReceivedPages,
    pub(crate) ram_limits: RamLimits,
    pub(crate) device_limits: DeviceStateLimits,
    pub(crate) devices: Arc<DeviceLoaders>,
    /// Which channels may carry RAM pages and which device state.
    pub(crate) roles: ChannelRoles,
    /// Whether every packet carries a CRC32C trailer.
    pub(crate) integrity: Integrity,
}

/// The bytes one receive thread allocates for `limits` before any packet arrives, or
/// grows to: the packet buffer, the decompressor's input and output, and the staging
/// buffer for pages checked against a CRC32C trailer. The destination bounds their total
/// over all channels before it starts any.
pub(crate) fn channel_buffer_bytes(limits: &RamLimits, integrity: Integrity) -> u64 {
    let packet_bytes = u64::from(limits.max_pages) * u64::from(limits.page_size);
    let mut bytes = RamPacket::wire_len(limits.max_pages) as u64;
    if limits.compression != Compression::None {
        bytes += limits
            .compression
            .max_payload(packet_bytes)
            .unwrap_or(packet_bytes)
            + packet_bytes;
    }
    if integrity == Integrity::Crc32c {
        bytes += packet_bytes;
    }
    bytes
}

/// One channel's receive thread.
pub(crate) struct ChannelReceiver {
    pub(crate) id: u8,
    pub(crate) stream: Stream,
    pub(crate) settings: Arc<ReceiveSettings>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) barrier: Arc<SyncBarrier>,
}

impl ChannelReceiver {
    fn error_io(&self, context: &'static str, error: io::Error) -> Error {
        Error::io(Side::Destination, Link::Channel(self.id), context, error)
    }

    /// With the integrity extension, reads the packet's CRC32C trailer and checks it
    /// against the packet's bytes, `parts`, before anything of the packet is applied; a
    /// mismatch is `Err((sent, computed))`, for the caller to name the packet.
    fn check_trailer(&self, parts: &[&[u8]]) -> Result<Result<(), (u32, u32)>, Error> {
        if self.settings.integrity != Integrity::Crc32c {
            return Ok(Ok(()));
        }
        let mut trailer = [0u8; TRAILER_LEN];
        (&self.stream)
            .read_exact(&mut trailer)
            .map_err(|error| self.error_io("mid-packet", error))?;
        let counters = &self.counters.channels[usize::from(self.id)];
        ChannelCounters::add(&counters.bytes, TRAILER_LEN as u64);
        let sent = u32::from_be_bytes(trailer);
        let computed = checksum(parts);
        Ok(if sent == computed {
            Ok(())
        } else {
            Err((sent, computed))
        })
    }

    /// [`Self::check_trailer`] for RAM packet `packet_num`.
    fn check_ram_trailer(&self, packet_num: u64, parts: &[&[u8]]) -> Result<(), Error> {
        self.check_trailer(parts)?.map_err(|(sent, computed)| {
            self.violation(Violation::ChecksumMismatch {
                packet_num,
                sent,
                computed,
            })
        })
    }

    fn error_wire(&self, error: multifd_wire::WireError) -> Error {
        Error::wire(Side::Destination, Link::Channel(self.id), error)
    }

    fn violation(&self, violation: Violation) -> Error {
        Error::protocol(Side::Destination, Link::Channel(self.id), violation)
    }

    /// Receives packets until the connection closes after completion, or fails.
    pub(crate) fn run(self, failure: &Failure) {
        if let Err(error) = self.receive_all() {
            if self.barrier.finishing() {
                // Everything the source declared arrived and was confirmed; what follows
                // (a packet cut by the shutdown, a stray SYNC) cannot change the outcome.
                tracing::warn!(channel = self.id, "after completion: {error}");
                return;
            }
            // A source that fails sends `Abort` with its reason and closes its channels; a
            // closed channel is often the first sign of that here. Give the control channel
            // a moment to deliver the real reason before blaming this channel.
            let broken = matches!(error, Error::Closed { .. } | Error::Io { .. });
            if broken && failure.wait_for_failure(PEER_REASON_GRACE) {
                return;
            }
            failure.fail(error);
        }
    }

    fn receive_all(&self) -> Result<(), Error> {
        let limits = self.settings.ram_limits;
        let mut packet = vec![0u8; RamPacket::wire_len(limits.max_pages)];
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(limits.max_pages as usize);
        let packet_bytes = (limits.max_pages * limits.page_size) as usize;
        let mut decompressor = PacketDecompressor::new(limits.compression, packet_bytes)
            .map_err(|error| self.error_io("create the decompressor", error))?;
        // With the integrity extension, uncompressed pages land here first, to be checked
        // before they are written into guest memory.
        let mut checked = Vec::new();
        loop {
            match (&self.stream).read(&mut packet[..1]) {
                Ok(0) if self.barrier.finishing() => return Ok(()),
                Ok(0) => {
                    return Err(Error::Closed {
                        side: Side::Destination,
                        link: Link::Channel(self.id),
                        context: "between packets",
                    })
                }
                Ok(_) => self.barrier.set_mid_packet(self.id, true),
                Err(_) if self.barrier.finishing() => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(self.error_io("read packet header", error)),
            }
            (&self.stream)
                .read_exact(&mut packet[1..PACKET_HEADER_LEN])
                .map_err(|error| self.error_io("mid-packet", error))?;
            let header = PacketHeader::decode(&packet[..PACKET_HEADER_LEN])
                .map_err(|e| self.error_wire(e))?;
            match header.kind() {
                PacketKind::Ram => {
                    self.receive_ram(
                        &mut packet,
                        &mut iovecs,
                        &mut checked,
                        decompressor.as_mut(),
                    )?;
                }
                PacketKind::DeviceState => self.receive_device_state(&mut packet)?,
            }
            self.barrier.set_mid_packet(self.id, false);
        }
    }

    fn receive_ram(
        &self,
        packet: &mut [u8],
        iovecs: &mut Vec<libc::iovec>,
        checked: &mut Vec<u8>,
        decompressor: Option<&mut PacketDecompressor>,
    ) -> Result<(), Error> {
        let settings = &*self.settings;
        let limits = &settings.ram_limits;
        (&self.stream)
            .read_exact(&mut packet[PACKET_HEADER_LEN..RAM_PACKET_FIXED_LEN])
            .map_err(|error| self.error_io("mid-packet", error))?;
        let length = RamPacket::total_len(&packet[..RAM_PACKET_FIXED_LEN], limits)
            .map_err(|error| self.error_wire(error))?;
        (&self.stream)
            .read_exact(&mut packet[RAM_PACKET_FIXED_LEN..length])
            .map_err(|error| self.error_io("mid-packet", error))?;
        let ram = RamPacket::decode(&packet[..length], limits).map_err(|e| self.error_wire(e))?;
        let counters = &self.counters.channels[usize::from(self.id)];
        ChannelCounters::add(&counters.packets, 1);
        ChannelCounters::add(&counters.bytes, length as u64);
        if ram.flags.is_sync() {
            self.check_ram_trailer(ram.packet_num, &[&packet[..length]])?;
            ChannelCounters::add(&counters.sync_packets, 1);
            return if self.barrier.arrive(self.id) {
                Ok(())
            } else {
                Err(Error::Cancelled {
                    side: Side::Destination,
                })
            };
        }
        if ram.normal_pages() == 0 && ram.zero_pages() == 0 {
            return self.check_ram_trailer(ram.packet_num, &[&packet[..length]]);
        }
        if !settings.roles.carries_ram(self.id) {
            return Err(self.violation(Violation::WrongChannelKind("RAM pages")));
        }
        let block_index = settings
            .memory
            .find(ram.ramblock)
            .ok_or_else(|| self.violation(Violation::UnknownRamBlock(ram.ramblock.into())))?;
        let block = &settings.memory.blocks()[block_index];
        let page_size = u64::from(limits.page_size);
        let last_page = block.len().saturating_sub(page_size);
        if let Some(offset) = ram
            .normal_offsets()
            .chain(ram.zero_offsets())
            .find(|&offset| offset > last_page || block.len() < page_size)
        {
            return Err(self.violation(Violation::OffsetPastBlock {
                block: block.name().into(),
                offset,
                length: block.len(),
            }));
        }
        match decompressor {
            Some(decompressor) if ram.normal_pages() > 0 && !ram.flags.is_uncompressed() => {
                self.receive_compressed(&ram, &packet[..length], block, decompressor)?;
            }
            decompressor => {
                if let Some(decompressor) = decompressor.filter(|_| ram.flags.is_uncompressed()) {
                    // The sender restarted its stream after this raw packet.
                    decompressor
                        .restart()
                        .map_err(|error| self.error_io("restart the decompressor", error))?;
                    ChannelCounters::add(&counters.uncompressed_packets, 1);
                }
                self.receive_raw(&ram, &packet[..length], block, iovecs, checked)?;
            }
        }
        for offset in ram.normal_offsets() {
            settings.received.mark(block_index, offset / page_size);
        }
        for offset in ram.zero_offsets() {
            if settings.received.mark(block_index, offset / page_size) {
                // SAFETY: the offset is a whole page inside the block (checked above) and
                // the page size is a multiple of 8 (checked at negotiation).
                unsafe { block.zero_page(offset, limits.page_size) };
            }
        }
        ChannelCounters::add(&counters.normal_pages, u64::from(ram.normal_pages()));
        ChannelCounters::add(&counters.zero_pages, u64::from(ram.zero_pages()));
        ChannelCounters::add(&counters.payload_bytes, u64::from(ram.next_packet_size));
        ChannelCounters::add(
            &counters.raw_payload_bytes,
            u64::from(ram.normal_pages()) * page_size,
        );
        ChannelCounters::add(&counters.bytes, u64::from(ram.next_packet_size));
        Ok(())
    }

    /// Reads a compressed payload into the channel's buffer, inflates it (exactly
    /// `normal × page` bytes, or a violation) and copies the pages into guest memory.
    /// Reads an uncompressed payload into guest memory: straight in with `readv`, or,
    /// with the integrity extension, through `checked` so its checksum is verified before
    /// any page is written.
    fn receive_raw(
        &self,
        ram: &RamPacket<'_>,
        packet: &[u8],
        block: &RamBlock,
        iovecs: &mut Vec<libc::iovec>,
        checked: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let page_size = self.settings.ram_limits.page_size as usize;
        if self.settings.integrity == Integrity::Crc32c {
            checked.resize(ram.next_packet_size as usize, 0);
            (&self.stream)
                .read_exact(checked)
                .map_err(|error| self.error_io("mid-payload", error))?;
            self.check_ram_trailer(ram.packet_num, &[packet, checked])?;
            for (page, offset) in checked.chunks_exact(page_size).zip(ram.normal_offsets()) {
                // SAFETY: a whole page inside the block (offsets checked by the caller),
                // which stays mapped writable for the migration.
                unsafe { block.write_page(offset, page) };
            }
            return Ok(());
        }
        iovecs.clear();
        for offset in ram.normal_offsets() {
            push_page(iovecs, 0, block.host_address(offset), page_size);
        }
        // SAFETY: every iovec is a whole page inside the block (offsets checked by the
        // caller), and the block stays mapped writable for the migration with no Rust
        // references into it (`RamBlock` contract).
        unsafe { self.stream.read_exact_raw(iovecs) }
            .map_err(|error| self.error_io("mid-payload", error))
    }

    fn receive_compressed(
        &self,
        ram: &RamPacket<'_>,
        packet: &[u8],
        block: &RamBlock,
        decompressor: &mut PacketDecompressor,
    ) -> Result<(), Error> {
        let size = ram.next_packet_size as usize;
        (&self.stream)
            .read_exact(decompressor.input(size))
            .map_err(|error| self.error_io("mid-payload", error))?;
        self.check_ram_trailer(ram.packet_num, &[packet, decompressor.input(size)])?;
        let started = Instant::now();
        let page_size = self.settings.ram_limits.page_size as usize;
        let expected = ram.normal_pages() as usize * page_size;
        let pages = decompressor
            .inflate(ram.packet_num, size, expected)
            .map_err(|violation| self.violation(violation))?;
        for (page, offset) in pages.chunks_exact(page_size).zip(ram.normal_offsets()) {
            // SAFETY: the offset is a whole page inside the block (checked by the caller),
            // which stays mapped writable for the migration.
            unsafe { block.write_page(offset, page) };
        }
        let counters = &self.counters.channels[usize::from(self.id)];
        ChannelCounters::add(&counters.codec_nanos, started.elapsed().as_nanos() as u64);
        Ok(())
    }

    /// Validates a device-state packet and its chunk header, reads the chunk straight into
    /// a buffer and queues it on the device's reassembler.
    fn receive_device_state(&self, packet: &mut [u8]) -> Result<(), Error> {
        let settings = &*self.settings;
        (&self.stream)
            .read_exact(&mut packet[PACKET_HEADER_LEN..DEVICE_STATE_PACKET_LEN])
            .map_err(|error| self.error_io("mid-packet", error))?;
        let device =
            DeviceStatePacket::decode(&packet[..DEVICE_STATE_PACKET_LEN], &settings.device_limits)
                .map_err(|error| self.error_wire(error))?;
        let index = settings
            .devices
            .find(device.idstr, device.instance_id)
            .ok_or_else(|| {
                self.violation(Violation::UnknownDevice {
                    idstr: device.idstr.into(),
                    instance_id: device.instance_id,
                })
            })?;
        if !settings.roles.carries_device_state(self.id) {
            return Err(self.violation(Violation::WrongChannelKind("device state")));
        }
        let mut header_bytes = [0u8; DEVICE_STATE_CHUNK_HEADER_LEN];
        (&self.stream)
            .read_exact(&mut header_bytes)
            .map_err(|error| self.error_io("mid-payload", error))?;
        let header =
            DeviceStateChunkHeader::decode(&header_bytes).map_err(|e| self.error_wire(e))?;
        // Bounded by the negotiated maximum payload, checked by the decoder.
        let length = device.next_packet_size as usize - DEVICE_STATE_CHUNK_HEADER_LEN;
        let mut payload = settings
            .devices
            .buffer(index, length)
            .map_err(|violation| self.violation(violation))?;
        (&self.stream)
            .read_exact(&mut payload)
            .map_err(|error| self.error_io("mid-payload", error))?;
        self.check_trailer(&[&packet[..DEVICE_STATE_PACKET_LEN], &header_bytes, &payload])?
            .map_err(|(sent, computed)| {
                self.violation(Violation::DeviceChecksumMismatch {
                    device: DeviceId::new(device.idstr, device.instance_id),
                    idx: header.idx,
                    sent,
                    computed,
                })
            })?;
        settings
            .devices
            .insert(index, header, payload)
            .map_err(|violation| self.violation(violation))?;
        let counters = &self.counters.channels[usize::from(self.id)];
        ChannelCounters::add(
            &counters.bytes,
            (DEVICE_STATE_PACKET_LEN + device.next_packet_size as usize) as u64,
        );
        ChannelCounters::add(&counters.device_chunks, 1);
        Ok(())
    }
}
