//! The destination end of a migration.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use multifd_wire::{
    BlockAnnouncement, ChannelHello, ControlMessage, DeviceAnnouncement, DeviceStateLimits,
    DeviceStateSettings, Flags, Hello, RamLimits, RejectCode, RejectReason, WireError,
    ZeroPageMode, CHANNEL_HELLO_LEN,
};

use super::admission::{Admission, Identified};
use super::control::{lock_for_report, ControlChannel};
use super::{
    check_blocks, check_device_settings, check_devices, check_settings, expect, integrity_of,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
};
use crate::channel_roles::ChannelRoles;
use crate::compress::CompressionSettings;
use crate::device::load::DeviceLoaders;
use crate::device::reassembler::CHUNK_OVERHEAD;
use crate::device::LoadDevices;
use crate::error::{Error, Violation};
use crate::failure::{join_threads, CancelHandle, Failure};
use crate::ids::{DeviceId, Link, Side, Uuid};
use crate::integrity::Integrity;
use crate::local_memory;
use crate::ram::{GuestMemory, RamBlock, ReceivedPages};
use crate::recv::{
    channel_buffer_bytes, ChannelReceiver, ReceiveSettings, ReleaseError, SyncBarrier,
};
use crate::stats::{ChannelCounters, Counters, MigrationStats, Monitor};
use crate::sync::{deadline_after, lock};
use crate::tls::TlsConfig;
use crate::transport::{Accepted, Listener, Stream};

/// What a destination accepts. Settings left `None` are taken from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DestinationConfig {
    /// Required channel count.
    pub channels: Option<u8>,
    /// Required page size.
    pub page_size: Option<u32>,
    /// Required packet size.
    pub packet_size: Option<u32>,
    /// Required zero-page mode.
    pub zero_page: Option<ZeroPageMode>,
    /// Required compression method and level.
    pub compression: Option<CompressionSettings>,
    /// Required migration uuid: only the migration the operator expects is accepted.
    pub uuid: Option<[u8; 16]>,
    /// How long to wait for a source to connect; `None` waits until cancelled.
    pub wait_for_source: Option<Duration>,
    /// How long the handshake and the arrival of every channel may take.
    pub connect_timeout: Duration,
    /// How long channels may take to reach their SYNC once the source ended a round.
    pub round_timeout: Duration,
    /// Most device-state bytes one device may have queued, received but not loaded yet;
    /// past it the migration fails (see [`DEFAULT_MAX_QUEUED_DEVICE_BYTES`]).
    pub max_queued_device_bytes: u64,
    /// Whether the memory `map_blocks` returns is all zeros (freshly mapped anonymous
    /// memory, a new sparse file). Then zero pages the source sends are only written where
    /// something else was received before; otherwise (the default, for memory of unknown
    /// contents such as a retry into a used buffer) every zero page is written.
    pub memory_zeroed: bool,
    /// How long the source may stay silent on the control channel once the migration is
    /// set up (no `RoundEnd`, `Complete` or other message) before the migration fails with
    /// [`Error::Stalled`]: a source that hung or vanished does not hold the destination.
    pub idle_timeout: Duration,
    /// Most guest memory a source may announce, over all blocks, checked before
    /// `map_blocks` is asked for any of it (see [`DEFAULT_MAX_GUEST_BYTES`]).
    pub max_guest_bytes: u64,
    /// Most bytes the receive threads of all channels together may allocate for packet,
    /// decompression and checking buffers (they grow with the channel count and packet
    /// size a source asks for); a source asking for more is rejected before any is
    /// allocated (see [`DEFAULT_MAX_RECEIVE_BUFFER_BYTES`]).
    pub max_receive_buffer_bytes: u64,
    /// Required integrity; `None` takes the source's.
    pub integrity: Option<Integrity>,
    /// TLS on every connection (`None`: plaintext). Each connection's handshake runs
    /// right after it is accepted, within [`DestinationConfig::connect_timeout`].
    pub tls: Option<TlsConfig>,
}

/// Default [`DestinationConfig::max_guest_bytes`]: 1 TiB, above the guests a multifd
/// migration moves in practice, while a hostile announcement cannot make the destination
/// map or track more than that (its page-tracking bitmap is then at most 32 MiB). A VMM
/// with larger guests raises it.
pub const DEFAULT_MAX_GUEST_BYTES: u64 = 1 << 40;

/// Default [`DestinationConfig::max_receive_buffer_bytes`]: 1 GiB. QEMU's defaults (512
/// KiB packets) need about 1 MiB per channel even with compression and CRC32C, so any
/// channel count fits; a source asking for 255 channels of 16 MiB compressed packets
/// would need 8 GiB.
pub const DEFAULT_MAX_RECEIVE_BUFFER_BYTES: u64 = 1 << 30;

/// Default [`DestinationConfig::max_queued_device_bytes`]. A device whose load keeps up
/// has about one chunk per channel queued (the reorder window: a few MiB with 1 MiB chunks,
/// 128 MiB only at 8 channels of the largest 16 MiB chunks); 128 MiB leaves that room plus
/// slack for a load thread that stalls briefly, while several devices together still fit
/// a destination host's memory.
pub const DEFAULT_MAX_QUEUED_DEVICE_BYTES: u64 = 128 << 20;

impl Default for DestinationConfig {
    fn default() -> Self {
        Self {
            channels: None,
            page_size: None,
            packet_size: None,
            zero_page: None,
            compression: None,
            uuid: None,
            wait_for_source: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            round_timeout: Duration::from_secs(60),
            max_queued_device_bytes: DEFAULT_MAX_QUEUED_DEVICE_BYTES,
            memory_zeroed: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_guest_bytes: DEFAULT_MAX_GUEST_BYTES,
            max_receive_buffer_bytes: DEFAULT_MAX_RECEIVE_BUFFER_BYTES,
            integrity: None,
            tls: None,
        }
    }
}

/// Control messages a source may send before the destination has accepted every channel.
/// A source does not wait for the destination between rounds, so one with a small guest
/// may end several rounds and complete while its channels are still being identified;
/// each message kept is a few dozen bytes, and past this many the source is misbehaving.
const MAX_EARLY_MESSAGES: usize = 1024;

/// How often a destination waiting for connections checks for cancellation.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// How long accepting pauses after a transient failure (out of descriptors): long enough
/// not to spin on a listener that keeps failing, short against the setup deadline.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Channel connections kept while no control connection has arrived: a source's channels
/// (at most 255) may arrive before its control connection, and a flood of channel hellos
/// must not exhaust the destination's descriptors.
const MAX_PARKED: usize = 256;

/// The receiving end: accepts one migration into memory the VMM maps.
#[derive(Debug)]
pub struct Destination {
    config: DestinationConfig,
    failure: Arc<Failure>,
    monitor: Monitor,
    /// Set by the first `run`: a destination carries one migration.
    used: AtomicBool,
    /// The memory a local source handed over.
    local_memory: OnceLock<GuestMemory>,
}

/// The connections of a migration whose handshake succeeded.
struct Connected {
    control: ControlChannel,
    hello: Hello,
    memory: GuestMemory,
    device_settings: DeviceStateSettings,
    /// The registered devices, in the order the source announced them.
    devices: LoadDevices,
}

impl Destination {
    /// A destination with this configuration.
    pub fn new(config: DestinationConfig) -> Self {
        Self {
            config,
            failure: Failure::new(),
            monitor: Monitor::default(),
            used: AtomicBool::new(false),
            local_memory: OnceLock::new(),
        }
    }

    /// A live view of the counters, for progress reporting.
    pub fn monitor(&self) -> Monitor {
        self.monitor.clone()
    }

    /// A handle that stops the migration from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle {
            failure: Arc::clone(&self.failure),
            side: Side::Destination,
        }
    }

    /// Accepts one migration on `listener` and runs it to completion.
    ///
    /// `map_blocks` receives the RAM blocks the source announced and returns the memory
    /// to receive them into, with the same names and lengths (see
    /// [`DestinationConfig::memory_zeroed`] for what is assumed of its contents).
    /// An `Err` from it rejects the migration with that message. The source must announce
    /// no devices.
    pub fn run(
        &self,
        listener: &Listener,
        map_blocks: impl FnOnce(&[BlockAnnouncement]) -> Result<GuestMemory, String>,
    ) -> Result<MigrationStats, Error> {
        self.run_with_devices(listener, map_blocks, Vec::new())
    }

    /// Like [`Destination::run`], loading the state of `devices`. The source must
    /// announce exactly these devices (any other set is rejected: a device left out would
    /// silently keep its old state); `Completed` is sent, and this returns, only once
    /// every device loaded all its chunks and its config.
    pub fn run_with_devices(
        &self,
        listener: &Listener,
        map_blocks: impl FnOnce(&[BlockAnnouncement]) -> Result<GuestMemory, String>,
        devices: LoadDevices,
    ) -> Result<MigrationStats, Error> {
        if self.used.swap(true, Ordering::SeqCst) {
            return Err(Error::Config(
                "a Destination runs one migration; create a new one for the next".into(),
            ));
        }
        let result = self.run_migration(listener, map_blocks, devices);
        result.map_err(|error| self.failure.first_error(error))
    }

    fn run_migration(
        &self,
        listener: &Listener,
        map_blocks: impl FnOnce(&[BlockAnnouncement]) -> Result<GuestMemory, String>,
        devices: LoadDevices,
    ) -> Result<MigrationStats, Error> {
        let tls = self
            .config
            .tls
            .as_ref()
            .map(TlsConfig::server)
            .transpose()?;
        let mut admission = Admission::new(
            tls,
            self.config.connect_timeout,
            self.config.idle_timeout,
            &self.failure,
        )?;
        let mut parked = VecDeque::new();
        let control = self.accept_control(listener, &mut admission, &mut parked)?;
        let started = Instant::now();
        let connected = self.handshake(control, map_blocks, devices)?;
        let Connected {
            control,
            hello,
            memory,
            device_settings,
            devices,
        } = connected;
        let channel_count = hello.channels as u8;
        let device_ids: Vec<DeviceId> = devices.iter().map(|(id, _)| id.clone()).collect();
        let counters = Counters::new(
            Side::Destination,
            channel_count,
            hello.page_size,
            &device_ids,
            started,
        );
        counters.guest_bytes.store(
            memory.blocks().iter().map(|block| block.len()).sum(),
            Ordering::Relaxed,
        );
        self.monitor.attach(&counters);

        let control = Arc::new(Mutex::new(control));
        let notifier = Arc::clone(&control);
        self.failure.on_failure(move |reason| {
            if let Some(mut control) = lock_for_report(&notifier) {
                // Best effort: the source may already be gone.
                let _ = control.send(&ControlMessage::Failed(reason.into()));
                control.stream().shutdown();
            }
        });
        let control_clone = lock(&control).try_clone()?;
        self.failure
            .on_failure(move |_| control_clone.stream().shutdown());

        let mut early = Vec::new();
        let streams = self.accept_channels(
            (listener, &mut admission),
            (&control, &mut early),
            &hello,
            parked,
            &counters,
        )?;
        let strays = admission.strays();
        // Every channel is in: no connection is identified any more.
        drop(admission);
        // Cloned before any channel thread runs: a failing channel's hook must find the
        // control lock free to send `Failed`.
        let reader = lock(&control).try_clone()?;
        let barrier = SyncBarrier::new(channel_count, &self.failure);
        let receiving = self.start_channels(
            streams,
            &hello,
            (memory, &device_settings, devices),
            &counters,
            &barrier,
        )?;
        counters.setup_done();
        tracing::info!(uuid = %Uuid(hello.uuid), channels = channel_count, "migration accepted");

        let result = if self.failure.is_failed() {
            Err(Error::Cancelled {
                side: Side::Destination,
            })
        } else {
            self.run_rounds(
                (&control, hello.extensions & Flags::ROUND_RECEIPTS != 0),
                (reader, early),
                &barrier,
                &counters,
                &receiving.loaders,
                &receiving.shutdowns,
            )
        };
        // On error, failing first stops the channel and load threads so they can be joined.
        let result = result
            .map(|stats| MigrationStats {
                stray_connections: strays,
                ..stats
            })
            .map_err(|error| self.failure.first_error(error));
        join_threads(receiving.threads);
        receiving.loaders.join();
        match result {
            Ok(_) if self.failure.is_failed() => Err(self.failure.first_error(Error::Internal {
                side: Side::Destination,
                what: "a channel failed after completion".into(),
            })),
            result => result,
        }
    }

    /// Starts the device load threads and one receive thread per channel.
    fn start_channels(
        &self,
        streams: Vec<Stream>,
        hello: &Hello,
        (memory, device_settings, devices): (GuestMemory, &DeviceStateSettings, LoadDevices),
        counters: &Arc<Counters>,
        barrier: &Arc<SyncBarrier>,
    ) -> Result<Receiving, Error> {
        let channel_count = hello.channels as u8;
        let loaders = DeviceLoaders::start(
            counters
                .devices
                .iter()
                .cloned()
                .zip(devices.into_iter().map(|(_, device)| device))
                .collect(),
            self.config.max_queued_device_bytes,
            channel_count,
            Arc::clone(&counters.peak_queued_device_bytes),
            &self.failure,
        );
        let loaders = match loaders {
            Ok(loaders) => loaders,
            Err(error) => return Err(self.failure.first_error(error)),
        };
        let settings = Arc::new(ReceiveSettings {
            received: ReceivedPages::new(&memory, hello.page_size, self.config.memory_zeroed),
            memory,
            ram_limits: ram_limits(hello),
            device_limits: DeviceStateLimits {
                max_payload: device_settings.max_payload,
                // The negotiated extensions (lz4, raw fallback) concern page payloads;
                // none applies to device state, so a device-state packet carries none.
                extensions: 0,
            },
            devices: Arc::clone(&loaders),
            roles: ChannelRoles::new(channel_count, device_settings.dedicated_channels as u8),
            integrity: integrity_of(hello.extensions),
        });
        let mut shutdowns = Vec::with_capacity(streams.len());
        let mut threads = Vec::with_capacity(streams.len());
        for (id, stream) in streams.into_iter().enumerate() {
            shutdowns.push(stream.try_clone().map_err(|error| {
                Error::io(Side::Destination, Link::Channel(id as u8), "clone", error)
            })?);
            let receiver = ChannelReceiver {
                id: id as u8,
                stream,
                settings: Arc::clone(&settings),
                counters: Arc::clone(counters),
                barrier: Arc::clone(barrier),
            };
            let failure = Arc::clone(&self.failure);
            let spawned = self.failure.spawn(
                Side::Destination,
                &format!("multifd-recv-{id}"),
                move || {
                    receiver.run(&failure);
                },
            );
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    self.failure.fail(error);
                    break;
                }
            }
        }
        Ok(Receiving {
            threads,
            shutdowns,
            loaders,
        })
    }

    /// Waits for the control connection; multifd channels that arrive first are parked,
    /// at most [`MAX_PARKED`] (a newer one drops the oldest as a stray).
    fn accept_control(
        &self,
        listener: &Listener,
        admission: &mut Admission,
        parked: &mut VecDeque<(ChannelHello, Stream)>,
    ) -> Result<Stream, Error> {
        let give_up = self.config.wait_for_source.map(deadline_after);
        loop {
            match self.accept_one((listener, admission), give_up, "waiting for a source", None)? {
                Identified::Control(stream) => return Ok(stream),
                Identified::Channel(hello, stream) => {
                    if parked.len() >= MAX_PARKED {
                        parked.pop_front();
                        admission.stray(Error::protocol(
                            Side::Destination,
                            Link::Listener,
                            Violation::TooManyEarlyChannels { max: MAX_PARKED },
                        ));
                    }
                    parked.push_back((hello, stream));
                }
            }
        }
    }

    /// Waits for the next connection that identifies itself as a migration's (strays are
    /// dropped by `admission` on the way).
    ///
    /// While waiting, messages on `control` are read as they come: the source's `Abort`
    /// or EOF (it gave up during setup) ends the wait at once; any other message (a
    /// source already ending its first round) is kept in `early` for later.
    fn accept_one(
        &self,
        (listener, admission): (&Listener, &mut Admission),
        give_up: Option<Instant>,
        what: &'static str,
        mut control: Option<(&Mutex<ControlChannel>, &mut Vec<ControlMessage>)>,
    ) -> Result<Identified, Error> {
        let control_stream = control
            .as_ref()
            .map(|(control, _)| lock(control).stream().try_clone())
            .transpose()
            .map_err(|error| Error::io(Side::Destination, Link::Control, "clone", error))?;
        loop {
            if self.failure.is_failed() {
                return Err(Error::Cancelled {
                    side: Side::Destination,
                });
            }
            if let Some(identified) = admission.next_identified() {
                return Ok(identified);
            }
            let now = Instant::now();
            if give_up.is_some_and(|give_up| now >= give_up) {
                return Err(admission.timed_out(what));
            }
            let slice_end =
                give_up.map_or(now + ACCEPT_POLL, |give_up| give_up.min(now + ACCEPT_POLL));
            let accepted =
                listener.accept_until(slice_end, control_stream.as_ref(), admission.wake_fd());
            match accepted {
                Ok(Accepted::Connection(stream)) => admission.admit(stream)?,
                Ok(Accepted::TimedOut | Accepted::Woken) => {}
                Ok(Accepted::WatchReadable) => {
                    if let Some((control, early)) = control.as_mut() {
                        match lock(control).receive()? {
                            ControlMessage::Abort(reason) => return Err(source_aborted(&reason)),
                            message if early.len() < MAX_EARLY_MESSAGES => early.push(message),
                            message => {
                                return Err(Error::protocol(
                                    Side::Destination,
                                    Link::Control,
                                    Violation::UnexpectedMessage(message.name()),
                                ))
                            }
                        }
                    }
                }
                // Out of descriptors or buffers, or a connection reset while queued: the
                // listener still works once some are free.
                Err(error) if is_transient_accept_error(&error) => {
                    tracing::warn!("accept: {error}");
                    std::thread::sleep(ACCEPT_RETRY);
                }
                Err(error) => {
                    return Err(Error::io(
                        Side::Destination,
                        Link::Listener,
                        "accept",
                        error,
                    ))
                }
            }
        }
    }

    /// Reads `Hello`, `RamBlocks`, `Devices` and `DeviceSettings`, and answers `Welcome`
    /// or `Reject`.
    fn handshake(
        &self,
        stream: Stream,
        map_blocks: impl FnOnce(&[BlockAnnouncement]) -> Result<GuestMemory, String>,
        registered: LoadDevices,
    ) -> Result<Connected, Error> {
        let mut control = ControlChannel::new(Side::Destination, stream)?;
        // The whole handshake, not each read, runs against the setup deadline.
        control.set_deadline(Some(deadline_after(self.config.connect_timeout)));
        let unexpected = |message: &ControlMessage| {
            Error::protocol(
                Side::Destination,
                Link::Control,
                Violation::UnexpectedMessage(message.name()),
            )
        };
        let hello = match control.receive() {
            Ok(ControlMessage::Hello(hello)) => hello,
            Ok(other) => return Err(unexpected(&other)),
            Err(error) => {
                // A `Hello` this side cannot read (a newer source's settings) is refused
                // as any other mismatch is, so the source learns why.
                if let Some(wire) = error.wire_error() {
                    let _ = control.send(&ControlMessage::Reject(RejectReason {
                        code: reject_code(wire),
                        detail: format!("unreadable Hello: {wire}"),
                    }));
                }
                return Err(error);
            }
        };
        let blocks = match control.receive()? {
            ControlMessage::RamBlocks(blocks) => blocks,
            other => return Err(unexpected(&other)),
        };
        let announced = match control.receive()? {
            ControlMessage::Devices(devices) => devices,
            other => return Err(unexpected(&other)),
        };
        let device_settings = match control.receive()? {
            ControlMessage::DeviceSettings(settings) => settings,
            other => return Err(unexpected(&other)),
        };
        let mut devices = None;
        let verdict = self
            .negotiate(&hello)
            .and_then(|()| self.check_receive_buffers(&hello))
            .and_then(|()| check_blocks(&blocks, hello.page_size))
            .and_then(|()| self.check_guest_size(&blocks))
            .and_then(|()| self.check_device_settings(&device_settings, hello.channels))
            .and_then(|()| {
                devices = Some(match_devices(&announced, registered)?);
                Ok(())
            })
            .and_then(|()| {
                let memory = if hello.extensions & Flags::LOCAL_MEMORY != 0 {
                    self.map_local_memory(control.stream(), &blocks)?
                } else {
                    map_blocks(&blocks).map_err(|detail| RejectReason {
                        code: RejectCode::RamBlocks,
                        detail,
                    })?
                };
                check_mapped_blocks(&blocks, &memory, hello.page_size)?;
                Ok(memory)
            });
        match verdict {
            Ok(memory) => {
                control.send(&ControlMessage::Welcome)?;
                control.set_deadline(None);
                control.stream().set_read_timeout(None).map_err(|error| {
                    Error::io(Side::Destination, Link::Control, "set read timeout", error)
                })?;
                Ok(Connected {
                    control,
                    hello,
                    memory,
                    device_settings,
                    devices: devices.unwrap_or_default(),
                })
            }
            Err(reason) => {
                // The rejection is reported locally whether or not the source still listens.
                let _ = control.send(&ControlMessage::Reject(reason.clone()));
                Err(Error::Rejected {
                    side: Side::Destination,
                    reason,
                })
            }
        }
    }

    fn check_device_settings(
        &self,
        settings: &DeviceStateSettings,
        channels: u32,
    ) -> Result<(), RejectReason> {
        check_device_settings(settings, channels)?;
        let cap = self.config.max_queued_device_bytes;
        if u64::from(settings.max_payload) + CHUNK_OVERHEAD > cap {
            return Err(RejectReason {
                code: RejectCode::Devices,
                detail: format!(
                    "device-state chunks of up to {} bytes do not fit the destination's \
                     queue cap of {cap} bytes per device",
                    settings.max_payload
                ),
            });
        }
        Ok(())
    }

    /// Maps the memory a local source hands over (see [`crate::local_memory`]): one
    /// descriptor per announced block, each exactly the block's size.
    fn map_local_memory(
        &self,
        stream: &Stream,
        blocks: &[BlockAnnouncement],
    ) -> Result<GuestMemory, RejectReason> {
        let refuse = |detail: String| RejectReason {
            code: RejectCode::RamBlocks,
            detail,
        };
        let files = local_memory::receive(
            stream,
            blocks.len(),
            deadline_after(self.config.connect_timeout),
        )
        .map_err(|error| refuse(format!("local memory: {error}")))?;
        let mapped = blocks
            .iter()
            .zip(&files)
            .map(|(block, file)| {
                let length = file
                    .metadata()
                    .map_err(|error| refuse(format!("local memory {:?}: {error}", block.name)))?
                    .len();
                if length != block.length {
                    return Err(refuse(format!(
                        "local memory {:?}: a descriptor of {length} bytes for a block of {}",
                        block.name, block.length
                    )));
                }
                RamBlock::map_file(block.name.as_str(), file, true)
                    .map_err(|error| refuse(error.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let memory = GuestMemory::new(mapped).map_err(|error| refuse(error.to_string()))?;
        // The caller maps nothing itself: it takes the memory from here.
        let _ = self.local_memory.set(memory.clone());
        Ok(memory)
    }

    /// The memory a local migration handed over (see [`SourceConfig::local_memory`]),
    /// once the handshake accepted it; `None` for a migration that sent pages.
    ///
    /// [`SourceConfig::local_memory`]: crate::SourceConfig::local_memory
    pub fn local_memory(&self) -> Option<GuestMemory> {
        self.local_memory.get().cloned()
    }

    /// Refuses settings whose receive buffers over all channels exceed this destination's
    /// cap.
    fn check_receive_buffers(&self, hello: &Hello) -> Result<(), RejectReason> {
        let per_channel = channel_buffer_bytes(&ram_limits(hello), integrity_of(hello.extensions));
        let total = per_channel.saturating_mul(u64::from(hello.channels));
        let cap = self.config.max_receive_buffer_bytes;
        if total <= cap {
            return Ok(());
        }
        Err(RejectReason {
            code: RejectCode::ChannelCount,
            detail: format!(
                "{} channels of {}-byte packets need {total} bytes of receive buffers, more \
                 than this destination's {cap}",
                hello.channels, hello.packet_size
            ),
        })
    }

    /// Refuses an announcement larger in total than this destination takes.
    fn check_guest_size(&self, blocks: &[BlockAnnouncement]) -> Result<(), RejectReason> {
        let total = blocks
            .iter()
            .try_fold(0u64, |total, block| total.checked_add(block.length));
        match total {
            Some(total) if total <= self.config.max_guest_bytes => Ok(()),
            _ => Err(RejectReason {
                code: RejectCode::RamBlocks,
                detail: format!(
                    "{} ramblocks announced, together more than this destination's {} bytes",
                    blocks.len(),
                    self.config.max_guest_bytes
                ),
            }),
        }
    }

    fn negotiate(&self, hello: &Hello) -> Result<(), RejectReason> {
        let config = &self.config;
        check_settings(hello)?;
        expect(
            RejectCode::ChannelCount,
            "channel count",
            config.channels.map(u32::from),
            &hello.channels,
        )?;
        expect(
            RejectCode::PageSize,
            "page size",
            config.page_size,
            &hello.page_size,
        )?;
        expect(
            RejectCode::PacketSize,
            "packet size",
            config.packet_size,
            &hello.packet_size,
        )?;
        expect(
            RejectCode::ZeroPage,
            "zero-page mode",
            config.zero_page,
            &hello.zero_page,
        )?;
        expect(
            RejectCode::Compression,
            "compression",
            config.compression.map(|settings| settings.to_string()),
            &CompressionSettings {
                method: hello.compression,
                level: hello.compression_level,
            }
            .to_string(),
        )?;
        expect(
            RejectCode::Extensions,
            "integrity",
            config.integrity,
            &integrity_of(hello.extensions),
        )?;
        expect(
            RejectCode::Uuid,
            "uuid",
            config.uuid.map(|uuid| Uuid(uuid).to_string()),
            &Uuid(hello.uuid).to_string(),
        )
    }

    /// Accepts connections until every channel of the migration has arrived. Channels of
    /// another migration and further control connections are strays; a channel of this
    /// migration with a bad id is the source's error.
    fn accept_channels(
        &self,
        (listener, admission): (&Listener, &mut Admission),
        (control, early): (&Mutex<ControlChannel>, &mut Vec<ControlMessage>),
        hello: &Hello,
        parked: VecDeque<(ChannelHello, Stream)>,
        counters: &Counters,
    ) -> Result<Vec<Stream>, Error> {
        let count = hello.channels as u8;
        let mut streams: Vec<Option<Stream>> = (0..count).map(|_| None).collect();
        let mut pending = parked.into_iter();
        let give_up = deadline_after(self.config.connect_timeout);
        // A control message the source sends meanwhile must arrive whole by then too.
        lock(control).set_deadline(Some(give_up));
        while streams.iter().any(Option::is_none) {
            let (channel, stream) = match pending.next() {
                Some(parked) => parked,
                None => {
                    match self.accept_one(
                        (listener, &mut *admission),
                        Some(give_up),
                        "waiting for every channel",
                        Some((control, &mut *early)),
                    )? {
                        Identified::Channel(channel, stream) => (channel, stream),
                        Identified::Control(_) => {
                            admission.stray(Error::protocol(
                                Side::Destination,
                                Link::Listener,
                                Violation::DuplicateControl,
                            ));
                            continue;
                        }
                    }
                }
            };
            let violation = |violation| {
                Error::protocol(Side::Destination, Link::Channel(channel.channel), violation)
            };
            if channel.uuid != hello.uuid {
                admission.stray(violation(Violation::UuidMismatch {
                    expected: Uuid(hello.uuid),
                    received: Uuid(channel.uuid),
                }));
                continue;
            }
            let slot = streams
                .get_mut(usize::from(channel.channel))
                .ok_or_else(|| {
                    violation(Violation::ChannelIdOutOfRange {
                        id: channel.channel,
                        count,
                    })
                })?;
            if slot.is_some() {
                return Err(violation(Violation::DuplicateChannel(channel.channel)));
            }
            let clone = stream.try_clone().map_err(|error| {
                Error::io(
                    Side::Destination,
                    Link::Channel(channel.channel),
                    "clone",
                    error,
                )
            })?;
            self.failure.on_failure(move |_| clone.shutdown());
            ChannelCounters::add(
                &counters.channels[usize::from(channel.channel)].bytes,
                CHANNEL_HELLO_LEN as u64,
            );
            *slot = Some(stream);
        }
        lock(control).set_deadline(None);
        Ok(streams.into_iter().flatten().collect())
    }

    /// Releases rounds as the source ends them, until `Complete`: reads the messages kept
    /// while channels were accepted, then the control channel through `reader`.
    fn run_rounds(
        &self,
        (control, mut receipts): (&Mutex<ControlChannel>, bool),
        (mut reader, early): (ControlChannel, Vec<ControlMessage>),
        barrier: &SyncBarrier,
        counters: &Counters,
        loaders: &DeviceLoaders,
        shutdowns: &[Stream],
    ) -> Result<MigrationStats, Error> {
        reader
            .stream()
            .set_read_timeout(Some(self.config.idle_timeout))
            .map_err(|error| {
                Error::io(Side::Destination, Link::Control, "set read timeout", error)
            })?;
        let mut early = early.into_iter();
        let mut released = 0u64;
        let violation = |violation| Error::protocol(Side::Destination, Link::Control, violation);
        loop {
            let message = match early.next() {
                Some(message) => message,
                None => reader.receive()?,
            };
            match message {
                ControlMessage::RoundEnd { round } => {
                    if round != released + 1 {
                        return Err(violation(Violation::RoundOutOfOrder {
                            expected: released + 1,
                            received: round,
                        }));
                    }
                    match barrier.release(round, self.config.round_timeout) {
                        Ok(()) => {}
                        Err(ReleaseError::TimedOut { channel }) => {
                            return Err(Error::Stalled {
                                side: Side::Destination,
                                link: Link::Channel(channel),
                                context: "its SYNC never came within the round timeout",
                            })
                        }
                        Err(ReleaseError::Stopped) => {
                            return Err(Error::Cancelled {
                                side: Side::Destination,
                            })
                        }
                    }
                    released = round;
                    counters.rounds.store(released, Ordering::Relaxed);
                    // A receipt that cannot be written means the source closed the
                    // connection, usually after an `Abort` still to be read here: that
                    // reason, or the read error, is what to report, not this write's.
                    if receipts
                        && lock(control)
                            .send(&ControlMessage::RoundReceived { round })
                            .is_err()
                    {
                        receipts = false;
                    }
                }
                ControlMessage::SwitchoverStart => {
                    if !counters.switchover_started() {
                        return Err(violation(Violation::DuplicateSwitchover));
                    }
                }
                ControlMessage::Complete(sent) => {
                    barrier.finish(released).map_err(violation)?;
                    // Bytes already queued on a channel but not yet read are a packet
                    // the source did not declare, as one half read is.
                    if let Some(channel) = shutdowns.iter().position(Stream::has_pending_data) {
                        return Err(violation(Violation::PacketAfterCompletion {
                            channel: channel as u8,
                        }));
                    }
                    // Every channel delivered its last SYNC before the last `RoundEnd`, so
                    // every device chunk has arrived: a hole now is a missing chunk.
                    loaders.complete(&self.failure)?;
                    let received = counters.totals();
                    if sent != received {
                        return Err(violation(Violation::TotalsMismatch {
                            source_totals: sent.to_string(),
                            destination_totals: received.to_string(),
                        }));
                    }
                    lock(control).send(&ControlMessage::Completed(received))?;
                    for stream in shutdowns {
                        stream.shutdown();
                    }
                    let stats = counters.finish();
                    tracing::info!(
                        seconds = stats.total_time.as_secs_f64(),
                        "migration received"
                    );
                    return Ok(stats);
                }
                ControlMessage::Abort(reason) => return Err(source_aborted(&reason)),
                other => return Err(violation(Violation::UnexpectedMessage(other.name()))),
            }
        }
    }
}

/// The threads receiving a migration, and how to stop them.
struct Receiving {
    /// One per channel.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// A clone of each channel's connection, to shut it down.
    shutdowns: Vec<Stream>,
    loaders: Arc<DeviceLoaders>,
}

/// The error a source's `Abort` becomes.
fn source_aborted(reason: &str) -> Error {
    Error::PeerFailed {
        side: Side::Destination,
        reason: format!("source aborted: {reason}"),
    }
}

/// The listener, and the TLS configuration its connections handshake with.
/// What a RAM packet may hold under the settings `hello` proposes.
fn ram_limits(hello: &Hello) -> RamLimits {
    RamLimits {
        max_pages: hello.packet_size / hello.page_size,
        page_size: hello.page_size,
        compression: hello.compression,
        extensions: hello.extensions,
    }
}

/// The reject code for a `Hello` that did not decode.
fn reject_code(error: &WireError) -> RejectCode {
    match error {
        WireError::UnknownCompression(_) => RejectCode::Compression,
        WireError::InvalidValue {
            field: "zero-page mode",
            ..
        } => RejectCode::ZeroPage,
        _ => RejectCode::Version,
    }
}

/// Whether a failed `accept` leaves the listener usable: the process or system is out
/// of descriptors or memory for now, or the connection was reset while it was queued.
fn is_transient_accept_error(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

/// Puts the registered devices in the order the source announced them; rejects any
/// difference between the two sets.
fn match_devices(
    announced: &[DeviceAnnouncement],
    mut registered: LoadDevices,
) -> Result<LoadDevices, RejectReason> {
    check_devices(announced)?;
    let reject = |detail| {
        Err(RejectReason {
            code: RejectCode::Devices,
            detail,
        })
    };
    let mut ordered = Vec::with_capacity(announced.len());
    for device in announced {
        let position = registered
            .iter()
            .position(|(id, _)| id.idstr == device.idstr && id.instance_id == device.instance_id);
        match position {
            Some(position) => ordered.push(registered.swap_remove(position)),
            None => {
                return reject(format!(
                    "device {:?} instance {} is not registered on the destination",
                    device.idstr, device.instance_id
                ))
            }
        }
    }
    if let Some((id, _)) = registered.first() {
        return reject(format!(
            "device {id} is registered on the destination but the source did not announce it"
        ));
    }
    Ok(ordered)
}

fn check_mapped_blocks(
    announced: &[BlockAnnouncement],
    memory: &GuestMemory,
    page_size: u32,
) -> Result<(), RejectReason> {
    let mismatch = |detail| RejectReason {
        code: RejectCode::RamBlocks,
        detail,
    };
    if memory.blocks().len() != announced.len() {
        return Err(mismatch(format!(
            "{} ramblocks announced, {} mapped",
            announced.len(),
            memory.blocks().len()
        )));
    }
    for (announced, mapped) in announced.iter().zip(memory.blocks()) {
        if announced.name != mapped.name() || announced.length != mapped.len() {
            return Err(mismatch(format!(
                "ramblock {:?} of {} bytes mapped as {:?} of {} bytes",
                announced.name,
                announced.length,
                mapped.name(),
                mapped.len()
            )));
        }
        if !mapped.is_writable() {
            return Err(mismatch(format!(
                "ramblock {:?} is mapped read-only on the destination",
                announced.name
            )));
        }
    }
    memory
        .check_layout(page_size)
        .map_err(|error| mismatch(error.to_string()))
}
