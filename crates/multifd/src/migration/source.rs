//! The source end of a migration.

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use multifd_wire::{
    BlockAnnouncement, ChannelHello, Compression, ControlMessage, DeviceAnnouncement,
    DeviceStateSettings, Flags, Hello, Totals, ZeroPageMode, DEVICE_STATE_CHUNK_HEADER_LEN,
    PROTOCOL_VERSION,
};

use super::control::{lock_for_report, ControlChannel};
use super::{
    check_device_settings, check_devices, check_settings, integrity_extension,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
};
use crate::bandwidth::BandwidthLimit;
use crate::compress::CompressionSettings;
use crate::device::save::{save_devices, SaveJob};
use crate::device::SaveDevices;
use crate::dirty::dirty_offsets;
use crate::error::{Error, Violation};
use crate::failure::{join_threads, CancelHandle, Failure, PEER_REASON_GRACE};
use crate::ids::{DeviceId, Link, Side, Uuid};
use crate::integrity::Integrity;
use crate::local_memory::{self, MAX_LOCAL_BLOCKS};
use crate::ram::{GuestMemory, RamBlock};
use crate::send::{Batch, ChannelSettings, SendChannels};
use crate::stats::{ChannelCounters, Counters, MigrationStats, Monitor};
use crate::sync::{deadline_after, lock};
use crate::tls::{self, TlsConfig};
use crate::transport::{Address, Stream};
use crate::zero_copy::ZeroCopy;

/// How a source migrates.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceConfig {
    /// Multifd channels to open (1 to 255).
    pub channels: u8,
    /// Guest page size in bytes.
    pub page_size: u32,
    /// Bytes of pages per packet; QEMU's 512 KiB gives 128 pages of 4 KiB.
    pub packet_size: u32,
    /// Zero-page handling.
    pub zero_page: ZeroPageMode,
    /// Compression method and level ([`CompressionSettings::new`] checks the level).
    pub compression: CompressionSettings,
    /// The migration's uuid; a random one when `None`.
    pub uuid: Option<[u8; 16]>,
    /// How long connecting and the handshake may take.
    pub connect_timeout: Duration,
    /// Device-state bytes per chunk (the config chunk's blob must fit in one).
    pub device_chunk_size: u32,
    /// How many of the last channels carry only device state, RAM using the others
    /// (the seeds' RFC design); 0 shares every channel between RAM and devices.
    pub device_channels: u8,
    /// Saves the devices one after another on a single thread instead of one thread
    /// each: how a VMM without multifd device state serializes them. A benchmark's
    /// baseline, not part of the stable API.
    #[doc(hidden)]
    pub sequential_device_save: bool,
    /// Wire bytes per second of all channels together (`None`: as fast as the link and
    /// the CPUs go). The channels pause whenever the migration runs ahead of the budget,
    /// so a live migration leaves the rest of the link to the guest's own traffic.
    pub max_bandwidth: Option<u64>,
    /// Send uncompressed pages with `MSG_ZEROCOPY`: the kernel reads them from guest
    /// memory instead of copying them, saving CPU on a real NIC (on loopback the kernel
    /// copies anyway). Needs TCP, and refused with compression, TLS and integrity, which
    /// all need the bytes in this process's buffers.
    pub zero_copy: bool,
    /// Local migration: hand every RAM block over as its file descriptor on a Unix
    /// control socket (`SCM_RIGHTS`) instead of sending pages; the destination maps the
    /// same memory, so queued pages are not sent and only device state moves. Every
    /// block must come from [`RamBlock::map_file`] (a memfd, a tmpfs or hugetlbfs file),
    /// and once the destination confirmed, the source must not run the guest again.
    pub local_memory: bool,
    /// How long a connection with work in flight may make no progress before the
    /// migration fails with [`Error::Stalled`]: a channel write that moves no byte (a
    /// destination that stopped reading), or the wait for the destination's `Completed`.
    pub idle_timeout: Duration,
    /// End-to-end integrity of every packet (negotiated; see [`Integrity`]).
    pub integrity: Integrity,
    /// TLS on every connection (`None`: plaintext). Each connection's handshake, the
    /// channels' in parallel, must finish within [`SourceConfig::connect_timeout`].
    pub tls: Option<TlsConfig>,
}

/// Default [`SourceConfig::device_chunk_size`]: 1 MiB makes the 288 bytes of packet and
/// chunk headers negligible and each write large, while a device of a few MiB is still
/// spread over every channel and the destination's reorder window (about one chunk per
/// channel) stays a few MiB.
pub const DEFAULT_DEVICE_CHUNK_SIZE: u32 = 1 << 20;

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            channels: 2,
            page_size: 4096,
            packet_size: 512 * 1024,
            zero_page: ZeroPageMode::Multifd,
            compression: CompressionSettings::NONE,
            uuid: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            device_chunk_size: DEFAULT_DEVICE_CHUNK_SIZE,
            device_channels: 0,
            sequential_device_save: false,
            max_bandwidth: None,
            zero_copy: false,
            local_memory: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            integrity: Integrity::None,
            tls: None,
        }
    }
}

/// What the control reader thread reports to the driver.
enum ControlEvent {
    RoundReceived(u64),
    Completed(Totals),
    PeerFailed(String),
}

/// A running migration on the source host.
///
/// Queue pages (or whole blocks), end rounds, then [`Source::complete`]. Guest memory is
/// only read; if anything fails, the migration stops, the destination is told, and the
/// source VM can simply keep running.
///
/// Threads: one per channel (zero-page detection, compression, the vectored write), one
/// reading the control channel, and after [`Source::switchover`] one per device saving
/// its state. The `Source` itself is driven from one thread. `queue_*` fill a packet's
/// worth of offsets without blocking; handing a full packet to the channels blocks until
/// a channel is idle, so queueing runs at the speed of the link (that back-pressure is
/// what the precopy driver measures). [`Source::end_round`] blocks until every channel
/// wrote its SYNC, and [`Source::complete`] until the destination confirmed. Each of
/// these waits ends at once when a [`CancelHandle`] cancels from another thread, and with
/// [`Error::Stalled`] when a connection makes no progress for
/// [`SourceConfig::idle_timeout`].
pub struct Source {
    memory: GuestMemory,
    page_size: u32,
    pages_per_packet: u32,
    control: Arc<Mutex<ControlChannel>>,
    events: mpsc::Receiver<ControlEvent>,
    control_reader: Option<JoinHandle<()>>,
    channels: Option<Arc<SendChannels>>,
    failure: Arc<Failure>,
    counters: Arc<Counters>,
    batch: Batch,
    pages_this_round: u64,
    rounds: u64,
    /// The last round the destination confirmed it loaded (`RoundReceived`).
    received_round: u64,
    /// Devices not saved yet: all of them until [`Source::switchover`].
    unsaved_devices: Vec<SaveJob>,
    /// Whether [`Source::switchover`] ran.
    switched_over: bool,
    save_threads: Vec<JoinHandle<()>>,
    device_chunk_size: u32,
    sequential_device_save: bool,
    idle_timeout: Duration,
    /// The destination maps this memory itself: pages are never sent.
    local_memory: bool,
}

/// How often a source waiting for `Completed` looks whether the migration failed
/// (cancelled from another thread): short enough that a cancel returns at once to a
/// person, long enough to cost nothing.
const COMPLETION_POLL: Duration = Duration::from_millis(50);

impl Source {
    /// Connects to a destination, negotiates, and opens every channel; no devices.
    pub fn connect(
        address: &Address,
        config: &SourceConfig,
        memory: GuestMemory,
    ) -> Result<Self, Error> {
        Self::connect_with_devices(address, config, memory, Vec::new())
    }

    /// Connects like [`Source::connect`] and announces `devices`, whose state
    /// [`Source::switchover`] sends. The destination must have registered exactly these.
    pub fn connect_with_devices(
        address: &Address,
        config: &SourceConfig,
        memory: GuestMemory,
        devices: SaveDevices,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        let offer = Offer::new(config, &memory, &devices)?;
        if config.local_memory && !matches!(address, Address::Unix(_)) {
            return Err(Error::Config(format!(
                "local memory needs a unix: address, not {address}"
            )));
        }
        let tls = match &config.tls {
            Some(tls) => Some((tls.client()?, tls.server_name(address.host())?)),
            None => None,
        };
        let connect = |link| {
            let stream = Stream::connect(address, config.connect_timeout)
                .map_err(|error| Error::io(Side::Source, link, "connect", error))?;
            stream
                .set_liveness(config.idle_timeout)
                .map_err(|error| Error::io(Side::Source, link, "keepalive", error))?;
            match &tls {
                Some((client, name)) => {
                    let deadline = Instant::now() + config.connect_timeout;
                    tls::connect(stream, client, name.clone(), deadline).map_err(|source| {
                        Error::Tls {
                            side: Side::Source,
                            link,
                            source,
                        }
                    })
                }
                None => Ok(stream),
            }
        };
        let mut control = ControlChannel::new(Side::Source, connect(Link::Control)?)?;
        let uuid = offer.negotiate(&mut control, &memory, config.connect_timeout)?;
        // In parallel: with TLS each channel's handshake costs a few round trips and
        // signatures, which N channels should not pay one after another.
        let opened = std::thread::scope(|scope| {
            let connect = &connect;
            let threads: Vec<_> = (0..config.channels)
                .map(|id| {
                    scope.spawn(move || {
                        let stream = open_channel(
                            connect(Link::Channel(id)),
                            uuid,
                            id,
                            config.idle_timeout,
                        )?;
                        if config.zero_copy {
                            ZeroCopy::enable(&stream).map_err(|error| {
                                Error::io(
                                    Side::Source,
                                    Link::Channel(id),
                                    "enable zero-copy",
                                    error,
                                )
                            })?;
                        }
                        Ok(stream)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|thread| {
                    thread.join().unwrap_or_else(|_| {
                        Err(Error::Internal {
                            side: Side::Source,
                            what: "a channel's connecting thread panicked".into(),
                        })
                    })
                })
                .collect::<Result<Vec<Stream>, Error>>()
        });
        let streams = match opened {
            Ok(streams) => streams,
            Err(error) => {
                // Tell the destination now rather than leave it waiting for the channel.
                let _ = control.send(&ControlMessage::Abort(error.to_string()));
                return Err(error);
            }
        };
        Self::start(config, memory, devices, (control, streams), started).inspect(
            |_| tracing::info!(uuid = %Uuid(uuid), channels = config.channels, "migration set up"),
        )
    }

    /// Starts the migration over negotiated connections: the failure hooks, the control
    /// reader and the channel threads.
    fn start(
        config: &SourceConfig,
        memory: GuestMemory,
        devices: SaveDevices,
        (control, streams): (ControlChannel, Vec<Stream>),
        started: Instant,
    ) -> Result<Self, Error> {
        let device_ids: Vec<DeviceId> = devices.iter().map(|(id, _)| id.clone()).collect();
        let failure = Failure::new();
        let counters = Counters::new(
            Side::Source,
            config.channels,
            config.page_size,
            &device_ids,
            started,
        );
        counters.guest_bytes.store(
            memory.blocks().iter().map(|block| block.len()).sum(),
            Ordering::Relaxed,
        );
        let reader = control.try_clone()?;
        let control = Arc::new(Mutex::new(control));
        notify_on_failure(&failure, &control, &streams)?;
        for channel in &counters.channels {
            ChannelCounters::add(&channel.bytes, multifd_wire::CHANNEL_HELLO_LEN as u64);
        }
        let (events_sender, events) = mpsc::channel();
        let reader_failure = Arc::clone(&failure);
        let reader_counters = Arc::clone(&counters);
        let control_reader = failure.spawn(Side::Source, "multifd-source-control", move || {
            read_control(reader, (&reader_failure, &reader_counters), &events_sender);
        })?;

        let pages_per_packet = config.packet_size / config.page_size;
        let channels = SendChannels::start(
            streams,
            ChannelSettings {
                memory: memory.clone(),
                page_size: config.page_size,
                pages_per_packet,
                zero_page: config.zero_page,
                compression: config.compression,
                devices: device_ids,
                dedicated_channels: config.device_channels,
                bandwidth: config.max_bandwidth.map(BandwidthLimit::new),
                integrity: config.integrity,
                zero_copy: config.zero_copy,
                idle_timeout: config.idle_timeout,
            },
            &counters,
            &failure,
        );
        let unsaved_devices = devices
            .into_iter()
            .enumerate()
            .map(|(index, (_, device))| SaveJob {
                device,
                index,
                counters: Arc::clone(&counters.devices[index]),
                next_idx: 0,
            })
            .collect();
        counters.setup_done();
        Ok(Self {
            memory,
            page_size: config.page_size,
            pages_per_packet,
            control,
            events,
            control_reader: Some(control_reader),
            channels: Some(Arc::new(channels)),
            failure,
            counters,
            batch: Batch {
                offsets: Vec::with_capacity(pages_per_packet as usize),
                ..Batch::default()
            },
            pages_this_round: 0,
            rounds: 0,
            received_round: 0,
            unsaved_devices,
            switched_over: false,
            save_threads: Vec::new(),
            device_chunk_size: config.device_chunk_size,
            sequential_device_save: config.sequential_device_save,
            local_memory: config.local_memory,
            idle_timeout: config.idle_timeout,
        })
    }

    /// Whether the destination maps this very memory ([`SourceConfig::local_memory`]).
    pub fn shares_memory(&self) -> bool {
        self.local_memory
    }

    /// The guest page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The blocks being migrated.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// A live view of the counters, for progress reporting.
    pub fn monitor(&self) -> Monitor {
        Monitor::of(&self.counters)
    }

    /// A handle that stops the migration from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle {
            failure: Arc::clone(&self.failure),
            side: Side::Source,
        }
    }

    /// Queues the page at `offset` of block `block` (an index into the blocks) for the
    /// current round. Queue each page at most once per round.
    pub fn queue_page(&mut self, block: usize, offset: u64) -> Result<(), Error> {
        let length = self.block_len(block, offset)?;
        let page_size = u64::from(self.page_size);
        if !offset.is_multiple_of(page_size) || offset >= length {
            return Err(Error::PageOutOfRange { block, offset });
        }
        if self.local_memory {
            // The destination maps the same memory: there is nothing to send.
            return Ok(());
        }
        if self.batch.block != block && !self.batch.offsets.is_empty()
            || self.batch.offsets.len() == self.pages_per_packet as usize
        {
            self.flush()?;
        }
        self.batch.block = block;
        self.batch.offsets.push(offset);
        self.pages_this_round += 1;
        Ok(())
    }

    /// Queues every page of block `block`.
    pub fn queue_block(&mut self, block: usize) -> Result<(), Error> {
        let length = self.block_len(block, 0)?;
        for offset in (0..length).step_by(self.page_size as usize) {
            self.queue_page(block, offset)?;
        }
        Ok(())
    }

    /// Queues the pages whose bits are set in `bitmap` (bit `i` of word `i / 64` is page
    /// `i` of the block), as a dirty log gives them.
    ///
    /// The bitmap may be shorter than the block (missing words are clean pages) but not
    /// longer, and no bit past the block's last page may be set: such a bitmap is refused
    /// before any of its pages is queued.
    pub fn queue_dirty_bitmap(&mut self, block: usize, bitmap: &[u64]) -> Result<(), Error> {
        let length = self.block_len(block, 0)?;
        for offset in dirty_offsets(block, bitmap, length, self.page_size)? {
            self.queue_page(block, offset)?;
        }
        Ok(())
    }

    /// Ends the current round: every queued page is sent, every channel sends a SYNC, and
    /// the destination is told, so pages queued afterwards overwrite this round's copies.
    pub fn end_round(&mut self) -> Result<(), Error> {
        self.flush()?;
        self.channels()?.sync_round().map_err(|_| self.stopped())?;
        self.rounds += 1;
        self.counters.rounds.store(self.rounds, Ordering::Relaxed);
        lock(&self.counters.pages_per_round).push(self.pages_this_round);
        self.pages_this_round = 0;
        let round = self.rounds;
        self.send_control(&ControlMessage::RoundEnd { round })
    }

    /// Live migration: waits, at most `bound`, until the destination confirmed it loaded
    /// every round ended so far; returns whether it did. The precopy driver calls it
    /// before stopping the VM: what is still in flight then (in socket buffers, or being
    /// written into the destination's memory) would otherwise move during the downtime.
    /// A cancel or failure meanwhile ends the wait with the error.
    pub fn wait_until_received(&mut self, bound: Duration) -> Result<bool, Error> {
        let deadline = deadline_after(bound);
        while self.received_round < self.rounds {
            match self.next_event(deadline)? {
                Some(ControlEvent::RoundReceived(round)) => self.received_round = round,
                // `Completed` before `Complete` was sent.
                Some(_) => {
                    return Err(self.fail(Error::protocol(
                        Side::Source,
                        Link::Control,
                        Violation::UnexpectedMessage("Completed"),
                    )))
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Live migration: lets every device with a pre-copy phase send what it can now
    /// ([`SaveDevice::save_precopy`](crate::SaveDevice::save_precopy)), on the calling
    /// thread, one device after the other; the chunks are on their way when it returns.
    /// Call it between rounds, before [`Source::switchover`].
    pub fn save_devices_precopy(&mut self) -> Result<(), Error> {
        let channels = Arc::clone(self.channels()?);
        for job in &mut self.unsaved_devices {
            if let Err(error) = job.save_precopy(&channels, self.device_chunk_size) {
                self.failure.fail(error);
                return Err(self.stopped());
            }
        }
        Ok(())
    }

    /// Live migration: the device-state bytes the devices would still send if the VM
    /// stopped now ([`SaveDevice::pending_bytes`](crate::SaveDevice::pending_bytes)).
    pub fn pending_device_bytes(&mut self) -> u64 {
        self.unsaved_devices
            .iter_mut()
            .map(|job| job.device.pending_bytes())
            .sum()
    }

    /// Fails the migration with `error` (the destination is told why) and returns the
    /// error to report. If it failed already, `error` is what a method of this source
    /// returned for that failure, and is returned as it is.
    pub(crate) fn abort(&self, error: Error) -> Error {
        if self.failure.is_failed() {
            return error;
        }
        self.fail(error)
    }

    /// The VM is stopped: tells the destination (the downtime clock starts) and starts
    /// saving every device, each on its own thread, concurrently with whatever the
    /// caller queues next (the final RAM round). Called at most once; [`Source::complete`]
    /// calls it if the caller did not.
    pub fn switchover(&mut self) -> Result<(), Error> {
        if self.switched_over {
            return Err(Error::Config("switchover already started".into()));
        }
        self.switched_over = true;
        self.send_control(&ControlMessage::SwitchoverStart)?;
        self.counters.switchover_started();
        let channels = Arc::clone(self.channels()?);
        let jobs = std::mem::take(&mut self.unsaved_devices);
        let groups: Vec<Vec<SaveJob>> = if self.sequential_device_save {
            vec![jobs]
        } else {
            jobs.into_iter().map(|job| vec![job]).collect()
        };
        for (number, group) in groups.into_iter().enumerate() {
            let channels = Arc::clone(&channels);
            let failure = Arc::clone(&self.failure);
            let chunk_size = self.device_chunk_size;
            let spawned =
                self.failure
                    .spawn(Side::Source, &format!("multifd-save-{number}"), move || {
                        save_devices(group, &channels, chunk_size, &failure);
                    });
            match spawned {
                Ok(thread) => self.save_threads.push(thread),
                Err(error) => return Err(self.fail(error)),
            }
        }
        Ok(())
    }

    /// Finishes: switches over if the caller did not, waits for every device's save,
    /// ends the last round (which drains every channel: each writes all it was given,
    /// then a SYNC), reports the totals, waits for the destination to confirm it received
    /// and loaded everything, and closes the channels.
    pub fn complete(mut self) -> Result<MigrationStats, Error> {
        if !self.switched_over {
            self.switchover()?;
        }
        self.join_save_threads();
        if self.failure.is_failed() {
            return Err(self.stopped());
        }
        self.counters.devices_saved();
        let devices_sent = !self.counters.devices.is_empty();
        if self.pages_this_round > 0 || self.rounds == 0 || devices_sent {
            self.end_round()?;
        }
        self.counters.drained();
        // Every page has been read: a file that shrank meanwhile made some unreadable.
        if let Err(error) = self.memory.check_files() {
            return Err(self.fail(error));
        }
        let totals = self.counters.totals();
        let answer = self
            .send_control(&ControlMessage::Complete(totals))
            .and_then(|()| self.wait_for_completed());
        let received = match answer {
            Ok(received) => received,
            // The destination may have confirmed and resumed the guest on the memory both
            // map; only its own report of failure says it did not.
            Err(error) if self.local_memory && !matches!(error, Error::PeerFailed { .. }) => {
                return Err(Error::HandoverUnconfirmed {
                    source: Box::new(error),
                })
            }
            Err(error) => return Err(error),
        };
        if received != totals {
            return Err(self.fail(Error::protocol(
                Side::Source,
                Link::Control,
                Violation::TotalsMismatch {
                    source_totals: totals.to_string(),
                    destination_totals: received.to_string(),
                },
            )));
        }
        if let Some(reader) = self.control_reader.take() {
            // The reader ended after delivering `Completed`.
            let _ = reader.join();
        }
        if let Some(channels) = self.channels.take() {
            channels.finish();
        }
        if self.failure.is_failed() {
            return Err(self.stopped());
        }
        let stats = self.counters.finish();
        tracing::info!(
            seconds = stats.total_time.as_secs_f64(),
            bytes = stats.bytes,
            "migration completed"
        );
        Ok(stats)
    }

    /// The destination's `Completed` totals, within the idle timeout; a cancel or any
    /// other failure meanwhile ends the wait at once.
    fn wait_for_completed(&self) -> Result<Totals, Error> {
        let deadline = deadline_after(self.idle_timeout);
        loop {
            match self.next_event(deadline)? {
                Some(ControlEvent::Completed(received)) => return Ok(received),
                // Receipts nobody waited for.
                Some(_) => {}
                None => {
                    return Err(self.fail(Error::Stalled {
                        side: Side::Source,
                        link: Link::Control,
                        context: "waiting for the destination's Completed",
                    }))
                }
            }
        }
    }

    /// The control reader's next receipt or `Completed`, or `None` once `deadline`
    /// passes; a cancel, a failure or the destination's `Failed` meanwhile ends the wait
    /// with the error to report.
    fn next_event(&self, deadline: Instant) -> Result<Option<ControlEvent>, Error> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left.min(COMPLETION_POLL)) {
                Ok(ControlEvent::PeerFailed(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.stopped())
                }
                Ok(event) => return Ok(Some(event)),
                Err(mpsc::RecvTimeoutError::Timeout) if self.failure.is_failed() => {
                    return Err(self.stopped())
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    return Ok(None)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn join_save_threads(&mut self) {
        join_threads(self.save_threads.drain(..));
    }

    /// The length of block `block`; a block that does not exist is reported as the page
    /// at `offset` of it being out of range.
    fn block_len(&self, block: usize, offset: u64) -> Result<u64, Error> {
        self.memory
            .blocks()
            .get(block)
            .map(RamBlock::len)
            .ok_or(Error::PageOutOfRange { block, offset })
    }

    fn channels(&self) -> Result<&Arc<SendChannels>, Error> {
        self.channels.as_ref().ok_or_else(|| self.stopped())
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.batch.offsets.is_empty() {
            return Ok(());
        }
        let channels = self.channels.as_ref().ok_or_else(|| self.stopped())?;
        channels.send(&mut self.batch).map_err(|_| self.stopped())
    }

    fn send_control(&self, message: &ControlMessage) -> Result<(), Error> {
        let result = lock(&self.control).send(message);
        result.map_err(|error| self.fail(error))
    }

    fn fail(&self, error: Error) -> Error {
        self.failure.fail(error);
        self.stopped()
    }

    /// The error to report once the migration has failed. When the source only saw a
    /// broken connection (a channel, or the control channel's write side), the
    /// destination's report, arriving on the control channel, says why.
    fn stopped(&self) -> Error {
        let first = self
            .failure
            .first_error(Error::Cancelled { side: Side::Source });
        if !matches!(first, Error::Io { .. } | Error::Closed { .. }) {
            return first;
        }
        let deadline = Instant::now() + PEER_REASON_GRACE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(ControlEvent::PeerFailed(reason)) => {
                    return Error::PeerFailed {
                        side: Side::Source,
                        reason,
                    }
                }
                // Receipts nobody waited for are still queued before the report.
                Ok(ControlEvent::RoundReceived(_)) => {}
                _ => break,
            }
        }
        first
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if self.channels.is_some() {
            self.failure.fail(Error::Cancelled { side: Side::Source });
            self.join_save_threads();
            drop(self.channels.take());
        }
        if let Some(reader) = self.control_reader.take() {
            lock(&self.control).stream().shutdown();
            let _ = reader.join();
        }
    }
}

/// Registers what a failure does: tell the destination why (`Abort`), then shut every
/// channel down so each blocked thread wakes.
fn notify_on_failure(
    failure: &Failure,
    control: &Arc<Mutex<ControlChannel>>,
    streams: &[Stream],
) -> Result<(), Error> {
    let notifier = Arc::clone(control);
    failure.on_failure(move |reason| {
        if let Some(mut control) = lock_for_report(&notifier) {
            // Best effort: the peer may already be gone.
            let _ = control.send(&ControlMessage::Abort(reason.into()));
            let stream = control.stream();
            // Bounds the reader's wait for the destination's own failure report.
            let _ = stream.set_read_timeout(Some(PEER_REASON_GRACE));
        }
    });

    // Registered after the `Abort` notifier: the destination should read why the
    // source failed before it sees the channels close.
    for (id, stream) in streams.iter().enumerate() {
        let clone = stream
            .try_clone()
            .map_err(|error| Error::io(Side::Source, Link::Channel(id as u8), "clone", error))?;
        failure.on_failure(move |_| clone.shutdown());
    }
    Ok(())
}

/// Zero-copy sends guest pages as they are, from guest memory: refused with the settings
/// that need the bytes in this process first.
fn check_zero_copy(config: &SourceConfig) -> Result<(), Error> {
    if !config.zero_copy {
        return Ok(());
    }
    let conflict = if config.compression.method != Compression::None {
        "compression"
    } else if config.tls.is_some() {
        "TLS"
    } else if config.integrity != Integrity::None {
        "integrity checks"
    } else {
        return Ok(());
    };
    Err(Error::Config(format!(
        "zero-copy sends guest pages as they are in memory, which {conflict} cannot use: \
         turn one of them off"
    )))
}

/// Local memory hands blocks over as their files, on the same host.
fn check_local_memory(config: &SourceConfig, memory: &GuestMemory) -> Result<(), Error> {
    if config.tls.is_some() {
        return Err(Error::Config(
            "local memory needs no TLS: both ends share the host".into(),
        ));
    }
    if memory.blocks().len() > MAX_LOCAL_BLOCKS {
        return Err(Error::Config(format!(
            "local memory hands over at most {MAX_LOCAL_BLOCKS} blocks"
        )));
    }
    match memory.blocks().iter().find(|block| block.file().is_none()) {
        Some(block) => Err(Error::Config(format!(
            "local memory: ramblock {:?} is not a mapped file (a memfd or a file on tmpfs)",
            block.name()
        ))),
        None => Ok(()),
    }
}

/// What the source proposes in the handshake, checked before anything is sent.
struct Offer {
    hello: Hello,
    devices: Vec<DeviceAnnouncement>,
    device_settings: DeviceStateSettings,
}

impl Offer {
    /// The handshake for `config`, `memory` and `devices`; an unusable setting is an
    /// [`Error::Config`] before any connection is made.
    fn new(
        config: &SourceConfig,
        memory: &GuestMemory,
        devices: &SaveDevices,
    ) -> Result<Self, Error> {
        let uuid = match config.uuid {
            Some(uuid) => uuid,
            None => {
                random_uuid().map_err(|error| Error::Config(format!("no random uuid: {error}")))?
            }
        };
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            uuid,
            channels: u32::from(config.channels),
            page_size: config.page_size,
            packet_size: config.packet_size,
            compression: config.compression.method,
            compression_level: config.compression.level,
            zero_page: config.zero_page,
            extensions: config.compression.extensions()
                | integrity_extension(config.integrity)
                | Flags::ROUND_RECEIPTS
                | if config.local_memory {
                    Flags::LOCAL_MEMORY
                } else {
                    0
                },
        };
        check_settings(&hello).map_err(|reason| Error::Config(reason.detail))?;
        check_zero_copy(config)?;
        if config.local_memory {
            check_local_memory(config, memory)?;
        }
        memory.check_layout(config.page_size)?;
        let devices: Vec<DeviceAnnouncement> = devices
            .iter()
            .map(|(id, _)| DeviceAnnouncement {
                idstr: id.idstr.clone(),
                instance_id: id.instance_id,
            })
            .collect();
        check_devices(&devices).map_err(|reason| Error::Config(reason.detail))?;
        let device_settings = DeviceStateSettings {
            max_payload: config
                .device_chunk_size
                .saturating_add(DEVICE_STATE_CHUNK_HEADER_LEN as u32),
            dedicated_channels: u32::from(config.device_channels),
        };
        check_device_settings(&device_settings, hello.channels)
            .map_err(|reason| Error::Config(reason.detail))?;
        Ok(Self {
            hello,
            devices,
            device_settings,
        })
    }

    /// Sends the offer on the control channel and waits, at most `timeout`, for the
    /// destination's `Welcome`; returns the migration's uuid.
    fn negotiate(
        self,
        control: &mut ControlChannel,
        memory: &GuestMemory,
        timeout: Duration,
    ) -> Result<[u8; 16], Error> {
        let uuid = self.hello.uuid;
        control.send_magic()?;
        let local_memory = self.hello.extensions & Flags::LOCAL_MEMORY != 0;
        control.send(&ControlMessage::Hello(self.hello))?;
        control.send(&ControlMessage::RamBlocks(
            memory
                .blocks()
                .iter()
                .map(|block| BlockAnnouncement {
                    name: block.name().into(),
                    length: block.len(),
                })
                .collect(),
        ))?;
        control.send(&ControlMessage::Devices(self.devices))?;
        control.send(&ControlMessage::DeviceSettings(self.device_settings))?;
        if local_memory {
            let files: Vec<_> = memory
                .blocks()
                .iter()
                .filter_map(|block| block.file().map(AsFd::as_fd))
                .collect();
            local_memory::send(control.stream(), &files).map_err(|error| {
                Error::io(Side::Source, Link::Control, "hand over memory", error)
            })?;
        }
        let set_timeout = |control: &ControlChannel, timeout| {
            control
                .stream()
                .set_read_timeout(timeout)
                .map_err(|error| Error::io(Side::Source, Link::Control, "set read timeout", error))
        };
        set_timeout(control, Some(timeout))?;
        // A destination trickling its answer cannot stretch the setup deadline either.
        control.set_deadline(Some(deadline_after(timeout)));
        let answer = control.receive();
        control.set_deadline(None);
        match answer {
            Ok(ControlMessage::Welcome) => {}
            Ok(ControlMessage::Reject(reason)) => {
                return Err(Error::Rejected {
                    side: Side::Source,
                    reason,
                })
            }
            Ok(other) => {
                return Err(Error::protocol(
                    Side::Source,
                    Link::Control,
                    Violation::UnexpectedMessage(other.name()),
                ))
            }
            Err(Error::Stalled { .. }) => {
                return Err(Error::Timeout {
                    side: Side::Source,
                    what: "waiting for the destination's welcome",
                })
            }
            Err(error) => return Err(error),
        }
        set_timeout(control, None)?;
        Ok(uuid)
    }
}

/// Opens multifd channel `id` of migration `uuid`: its connection, then its hello.
fn open_channel(
    connected: Result<Stream, Error>,
    uuid: [u8; 16],
    id: u8,
    idle_timeout: Duration,
) -> Result<Stream, Error> {
    let stream = connected?;
    // Every later write on the channel moves at least one byte per idle timeout, or fails.
    stream
        .set_write_timeout(Some(idle_timeout))
        .map_err(|error| Error::io(Side::Source, Link::Channel(id), "set write timeout", error))?;
    let hello = ChannelHello { uuid, channel: id }.encode();
    (&stream)
        .write_all(&hello)
        .map_err(|error| Error::io(Side::Source, Link::Channel(id), "write hello", error))?;
    Ok(stream)
}

/// The source's control reader: delivers round receipts, then `Completed` or `Failed`;
/// anything else fails the migration.
fn read_control(
    mut control: ControlChannel,
    (failure, counters): (&Failure, &Counters),
    events: &mpsc::Sender<ControlEvent>,
) {
    let mut receipts = 0u64;
    let error = loop {
        match control.receive() {
            // One per round, in order, never for a round not ended yet (`end_round`
            // counts a round before it sends `RoundEnd`).
            Ok(ControlMessage::RoundReceived { round })
                if round == receipts + 1 && round <= counters.rounds.load(Ordering::Relaxed) =>
            {
                receipts = round;
                let _ = events.send(ControlEvent::RoundReceived(round));
            }
            Ok(ControlMessage::RoundReceived { round }) => {
                break Error::protocol(
                    Side::Source,
                    Link::Control,
                    Violation::RoundOutOfOrder {
                        expected: receipts + 1,
                        received: round,
                    },
                )
            }
            Ok(ControlMessage::Completed(totals)) => {
                // The driver may have stopped waiting; then nobody needs the totals.
                let _ = events.send(ControlEvent::Completed(totals));
                return;
            }
            Ok(ControlMessage::Failed(reason)) => {
                // Recorded before the driver hears of it, so the driver reports this error.
                failure.fail(Error::PeerFailed {
                    side: Side::Source,
                    reason: reason.clone(),
                });
                let _ = events.send(ControlEvent::PeerFailed(reason));
                return;
            }
            Ok(other) => {
                break Error::protocol(
                    Side::Source,
                    Link::Control,
                    Violation::UnexpectedMessage(other.name()),
                )
            }
            Err(error) => break error,
        }
    };
    failure.fail(error);
}

fn random_uuid() -> std::io::Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    // getrandom(2), not /dev/urandom: a container or sandbox may have no /dev.
    // SAFETY: `uuid` is a valid, writable 16-byte buffer for the call.
    let read = unsafe { libc::getrandom(uuid.as_mut_ptr().cast(), uuid.len(), 0) };
    if read != uuid.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    // Version 4, variant 1, as RFC 9562 lays out random uuids.
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(uuid)
}
