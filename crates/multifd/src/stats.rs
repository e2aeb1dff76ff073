//! Statistics: live counters updated by the channel threads, and the snapshots handed to
//! callers ([`Progress`] while running, [`MigrationStats`] at the end).
//!
//! Each channel's counters are written by that channel's thread only, with relaxed atomics:
//! readers want a recent value, not a consistent cut.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use multifd_wire::Totals;

use crate::ids::{DeviceId, Side};
use crate::sync::{lock, wait_timeout};

#[derive(Debug, Default)]
pub(crate) struct ChannelCounters {
    pub(crate) bytes: AtomicU64,
    pub(crate) packets: AtomicU64,
    pub(crate) normal_pages: AtomicU64,
    pub(crate) zero_pages: AtomicU64,
    pub(crate) payload_bytes: AtomicU64,
    pub(crate) sync_packets: AtomicU64,
    pub(crate) device_chunks: AtomicU64,
    pub(crate) raw_payload_bytes: AtomicU64,
    pub(crate) uncompressed_packets: AtomicU64,
    pub(crate) codec_nanos: AtomicU64,
    pub(crate) zero_copy_sends: AtomicU64,
    pub(crate) zero_copy_copied: AtomicU64,
}

impl ChannelCounters {
    pub(crate) fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    fn snapshot(&self, id: u8) -> ChannelStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ChannelStats {
            id,
            bytes: read(&self.bytes),
            packets: read(&self.packets),
            normal_pages: read(&self.normal_pages),
            zero_pages: read(&self.zero_pages),
            payload_bytes: read(&self.payload_bytes),
            sync_packets: read(&self.sync_packets),
            device_chunks: read(&self.device_chunks),
            raw_payload_bytes: read(&self.raw_payload_bytes),
            uncompressed_packets: read(&self.uncompressed_packets),
            codec_time: Duration::from_nanos(read(&self.codec_nanos)),
            zero_copy_sends: read(&self.zero_copy_sends),
            zero_copy_copied: read(&self.zero_copy_copied),
        }
    }
}

/// Per-device figures, updated by the device's save or load thread.
#[derive(Debug)]
pub(crate) struct DeviceCounters {
    pub(crate) id: DeviceId,
    /// State and config bytes, chunk headers excluded.
    pub(crate) bytes: AtomicU64,
    pub(crate) chunks: AtomicU64,
    /// Nanoseconds: the save thread's run on the source, time inside load callbacks on the
    /// destination.
    pub(crate) busy_nanos: AtomicU64,
}

impl DeviceCounters {
    pub(crate) fn new(id: DeviceId) -> Self {
        Self {
            id,
            bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
        }
    }

    pub(crate) fn count_chunk(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_busy(&self, busy: Duration) {
        let nanos = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        self.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Shared by a migration's threads and by every [`Monitor`] handed out.
#[derive(Debug)]
pub(crate) struct Counters {
    side: Side,
    page_size: u32,
    started: Instant,
    pub(crate) channels: Vec<ChannelCounters>,
    pub(crate) guest_bytes: AtomicU64,
    pub(crate) rounds: AtomicU64,
    setup_time: Mutex<Option<Duration>>,
    pub(crate) pages_per_round: Mutex<Vec<u64>>,
    /// One per device, in announcement order.
    pub(crate) devices: Vec<Arc<DeviceCounters>>,
    /// Most device-state payload bytes queued at once on the destination, all devices.
    pub(crate) peak_queued_device_bytes: Arc<AtomicU64>,
    /// When `SwitchoverStart` was sent (source) or received (destination).
    switchover: OnceLock<Instant>,
    /// Source: when the last device finished saving after the switchover.
    devices_saved: OnceLock<Instant>,
    /// Source: when every channel had written its last packet.
    drained: OnceLock<Instant>,
}

impl Counters {
    /// Counters for a migration that began at `started` (the source's connect, or the
    /// destination's accepting the control connection).
    pub(crate) fn new(
        side: Side,
        channels: u8,
        page_size: u32,
        devices: &[DeviceId],
        started: Instant,
    ) -> Arc<Self> {
        Arc::new(Self {
            side,
            page_size,
            started,
            channels: (0..channels).map(|_| ChannelCounters::default()).collect(),
            guest_bytes: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            setup_time: Mutex::new(None),
            pages_per_round: Mutex::new(Vec::new()),
            devices: devices
                .iter()
                .map(|id| Arc::new(DeviceCounters::new(id.clone())))
                .collect(),
            peak_queued_device_bytes: Arc::new(AtomicU64::new(0)),
            switchover: OnceLock::new(),
            devices_saved: OnceLock::new(),
            drained: OnceLock::new(),
        })
    }

    /// Records that every device finished saving.
    pub(crate) fn devices_saved(&self) {
        let _ = self.devices_saved.set(Instant::now());
    }

    /// Records that every channel wrote its last packet.
    pub(crate) fn drained(&self) {
        let _ = self.drained.set(Instant::now());
    }

    /// Records the switchover (the source VM stopped); `false` if it was recorded before.
    pub(crate) fn switchover_started(&self) -> bool {
        self.switchover.set(Instant::now()).is_ok()
    }

    fn device_stats(&self) -> Vec<DeviceStats> {
        self.devices
            .iter()
            .map(|device| DeviceStats {
                id: device.id.clone(),
                bytes: device.bytes.load(Ordering::Relaxed),
                chunks: device.chunks.load(Ordering::Relaxed),
                busy_time: Duration::from_nanos(device.busy_nanos.load(Ordering::Relaxed)),
            })
            .collect()
    }

    /// Records the end of setup (handshake done, every channel connected).
    pub(crate) fn setup_done(&self) {
        if let Ok(mut setup) = self.setup_time.lock() {
            setup.get_or_insert(self.started.elapsed());
        }
    }

    fn channel_stats(&self) -> Vec<ChannelStats> {
        self.channels
            .iter()
            .enumerate()
            .map(|(id, counters)| counters.snapshot(id as u8))
            .collect()
    }

    /// The totals sent to the peer at completion, summed over channels.
    pub(crate) fn totals(&self) -> Totals {
        let channels = self.channel_stats();
        Totals {
            packets: channels.iter().map(|channel| channel.packets).sum(),
            normal_pages: channels.iter().map(|channel| channel.normal_pages).sum(),
            zero_pages: channels.iter().map(|channel| channel.zero_pages).sum(),
            payload_bytes: channels.iter().map(|channel| channel.payload_bytes).sum(),
            rounds: self.rounds.load(Ordering::Relaxed),
            device_chunks: self
                .devices
                .iter()
                .map(|device| device.chunks.load(Ordering::Relaxed))
                .sum(),
            device_bytes: self
                .devices
                .iter()
                .map(|device| device.bytes.load(Ordering::Relaxed))
                .sum(),
        }
    }

    pub(crate) fn progress(&self) -> Progress {
        let totals = self.totals();
        Progress {
            bytes: self
                .channels
                .iter()
                .map(|channel| channel.bytes.load(Ordering::Relaxed))
                .sum(),
            guest_bytes_done: ((totals.normal_pages + totals.zero_pages)
                * u64::from(self.page_size))
            .min(self.guest_bytes.load(Ordering::Relaxed)),
            guest_bytes: self.guest_bytes.load(Ordering::Relaxed),
            rounds: totals.rounds,
            elapsed: self.started.elapsed(),
        }
    }

    /// From the switchover to `mark`, if both happened.
    fn since_switchover(&self, mark: &OnceLock<Instant>) -> Option<Duration> {
        Some(
            mark.get()?
                .saturating_duration_since(*self.switchover.get()?),
        )
    }

    pub(crate) fn finish(&self) -> MigrationStats {
        let channels = self.channel_stats();
        let devices = self.device_stats();
        let total = ChannelStats::total(&channels);
        MigrationStats {
            side: self.side,
            page_size: self.page_size,
            bytes: total.bytes,
            packets: total.packets,
            normal_pages: total.normal_pages,
            zero_pages: total.zero_pages,
            payload_bytes: total.payload_bytes,
            raw_payload_bytes: total.raw_payload_bytes,
            uncompressed_packets: total.uncompressed_packets,
            codec_time: total.codec_time,
            rounds: self.rounds.load(Ordering::Relaxed),
            pages_per_round: self
                .pages_per_round
                .lock()
                .map(|rounds| rounds.clone())
                .unwrap_or_default(),
            setup_time: self
                .setup_time
                .lock()
                .ok()
                .and_then(|setup| *setup)
                .unwrap_or_default(),
            total_time: self.started.elapsed(),
            switchover_time: self.switchover.get().map(Instant::elapsed),
            device_save_time: self.since_switchover(&self.devices_saved),
            drain_time: self.since_switchover(&self.drained),
            device_chunks: devices.iter().map(|device| device.chunks).sum(),
            device_bytes: devices.iter().map(|device| device.bytes).sum(),
            peak_queued_device_bytes: self.peak_queued_device_bytes.load(Ordering::Relaxed),
            stray_connections: 0,
            devices,
            channels,
        }
    }
}

/// A live view of a running migration, for progress reporting from another thread.
///
/// A destination's counters exist only once the source has said how many channels it
/// uses; until then the progress is all zero.
#[derive(Debug, Clone, Default)]
pub struct Monitor(pub(crate) Arc<OnceLock<Arc<Counters>>>);

impl Monitor {
    pub(crate) fn of(counters: &Arc<Counters>) -> Self {
        let monitor = Self::default();
        monitor.attach(counters);
        monitor
    }

    pub(crate) fn attach(&self, counters: &Arc<Counters>) {
        // A monitor is attached once, when the counters are created.
        let _ = self.0.set(Arc::clone(counters));
    }

    /// A snapshot of the counters now.
    pub fn progress(&self) -> Progress {
        self.0
            .get()
            .map(|counters| counters.progress())
            .unwrap_or_default()
    }

    /// Calls `report` with a fresh snapshot every `interval`, on a thread of its own,
    /// until the returned watcher is dropped (which waits for the last call to end).
    pub fn watch(
        &self,
        interval: Duration,
        mut report: impl FnMut(&Progress) + Send + 'static,
    ) -> ProgressWatcher {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let monitor = self.clone();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("multifd-progress".into())
            .spawn(move || {
                let (stopped, wakeup) = &*stopping;
                let mut stopped = lock(stopped);
                while !*stopped {
                    report(&monitor.progress());
                    stopped = wait_timeout(wakeup, stopped, interval);
                }
            })
            .ok();
        ProgressWatcher { stop, thread }
    }
}

/// Reports progress periodically until dropped; see [`Monitor::watch`].
#[derive(Debug)]
pub struct ProgressWatcher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ProgressWatcher {
    fn drop(&mut self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            // A panic in the caller's report function ends only the reporting.
            let _ = thread.join();
        }
    }
}

/// A snapshot of a running migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Progress {
    /// Bytes written or read on all channels so far (packets and payload).
    pub bytes: u64,
    /// Guest bytes transferred so far (normal and zero pages, times the page size), at
    /// most `guest_bytes`: a live migration re-sends the pages the guest dirtied, so all
    /// rounds together may move more than the guest's size (`bytes` counts everything).
    pub guest_bytes_done: u64,
    /// Guest bytes announced (the sum of the RAM block lengths), for a progress bar.
    pub guest_bytes: u64,
    /// Rounds ended so far.
    pub rounds: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
}

/// What one channel carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelStats {
    /// The channel's id.
    pub id: u8,
    /// Bytes on the wire: channel hello, packets and payload.
    pub bytes: u64,
    /// RAM packets, SYNC packets included.
    pub packets: u64,
    /// Pages sent with contents.
    pub normal_pages: u64,
    /// Pages sent as zero.
    pub zero_pages: u64,
    /// Page payload bytes (after compression, where there is any).
    pub payload_bytes: u64,
    /// SYNC packets.
    pub sync_packets: u64,
    /// Device-state chunks (packets) this channel carried.
    pub device_chunks: u64,
    /// Page payload bytes before compression (normal pages times the page size).
    pub raw_payload_bytes: u64,
    /// Packets sent raw because compression would not have shrunk them.
    pub uncompressed_packets: u64,
    /// Time spent compressing (source: copying pages out of guest memory included) or
    /// decompressing (destination: copying pages into guest memory included).
    pub codec_time: Duration,
    /// Source with zero-copy: page sends the kernel finished without copying them, plus
    /// those it copied anyway (see `zero_copy_copied`).
    pub zero_copy_sends: u64,
    /// Source with zero-copy: page sends the kernel copied after all (always on loopback).
    pub zero_copy_copied: u64,
}

impl ChannelStats {
    /// `channels` added up, as one row with `id` 0.
    fn total(channels: &[ChannelStats]) -> Self {
        let sum = |field: fn(&ChannelStats) -> u64| channels.iter().map(field).sum();
        Self {
            id: 0,
            bytes: sum(|channel| channel.bytes),
            packets: sum(|channel| channel.packets),
            normal_pages: sum(|channel| channel.normal_pages),
            zero_pages: sum(|channel| channel.zero_pages),
            payload_bytes: sum(|channel| channel.payload_bytes),
            sync_packets: sum(|channel| channel.sync_packets),
            device_chunks: sum(|channel| channel.device_chunks),
            raw_payload_bytes: sum(|channel| channel.raw_payload_bytes),
            uncompressed_packets: sum(|channel| channel.uncompressed_packets),
            codec_time: channels.iter().map(|channel| channel.codec_time).sum(),
            zero_copy_sends: sum(|channel| channel.zero_copy_sends),
            zero_copy_copied: sum(|channel| channel.zero_copy_copied),
        }
    }

    /// Page bytes before compression per payload byte sent (1 without compression).
    pub fn compression_ratio(&self) -> f64 {
        compression_ratio(self.raw_payload_bytes, self.payload_bytes)
    }
}

fn compression_ratio(raw: u64, sent: u64) -> f64 {
    if sent == 0 {
        1.0
    } else {
        raw as f64 / sent as f64
    }
}

/// What one device's state amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceStats {
    /// The device.
    pub id: DeviceId,
    /// State and config bytes, chunk headers excluded.
    pub bytes: u64,
    /// Chunks, the config chunk included.
    pub chunks: u64,
    /// Source: the device's save, from its thread's start to its config chunk handed to
    /// a channel. Destination: time spent inside the device's load callbacks.
    pub busy_time: Duration,
}

/// What a whole migration did, on one side.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationStats {
    /// The side these figures were measured on.
    pub side: Side,
    /// The page size in bytes.
    pub page_size: u32,
    /// Bytes on the wire over all channels (the control channel excluded).
    pub bytes: u64,
    /// RAM packets over all channels.
    pub packets: u64,
    /// Pages sent with contents.
    pub normal_pages: u64,
    /// Pages sent as zero.
    pub zero_pages: u64,
    /// Page payload bytes, as sent (compressed where compression was used).
    pub payload_bytes: u64,
    /// Page payload bytes before compression.
    pub raw_payload_bytes: u64,
    /// Packets sent raw because compression would not have shrunk them.
    pub uncompressed_packets: u64,
    /// Compression (source) or decompression (destination) time over all channels.
    pub codec_time: Duration,
    /// Rounds (each ended by a SYNC on every channel).
    pub rounds: u64,
    /// Pages queued in each round (the dirty pages of that round), source side only.
    pub pages_per_round: Vec<u64>,
    /// From start to every channel connected and the settings agreed.
    pub setup_time: Duration,
    /// From start to completion confirmed.
    pub total_time: Duration,
    /// From `SwitchoverStart` (source VM stopped) to completion confirmed: the downtime
    /// the migration itself causes. `None` if the source never switched over.
    pub switchover_time: Option<Duration>,
    /// Source: from `SwitchoverStart` to every device's state and config handed to the
    /// channels (the device part of the downtime).
    pub device_save_time: Option<Duration>,
    /// Source: from `SwitchoverStart` to every channel having written its last packet (the
    /// final RAM round and the device state); the rest of `switchover_time` is the
    /// destination finishing its loads and confirming.
    pub drain_time: Option<Duration>,
    /// Device-state chunks over all devices.
    pub device_chunks: u64,
    /// Destination: connections to the listener dropped as not the migration's (probes,
    /// other protocols, failed TLS handshakes, channels of another migration).
    pub stray_connections: u64,
    /// Device-state bytes over all devices, chunk headers excluded.
    pub device_bytes: u64,
    /// Destination: most device-state bytes queued at once, waiting for their load
    /// threads, over all devices. Zero on the source.
    pub peak_queued_device_bytes: u64,
    /// Per-device figures, in announcement order.
    pub devices: Vec<DeviceStats>,
    /// Per-channel figures.
    pub channels: Vec<ChannelStats>,
}

impl MigrationStats {
    /// Every channel's figures added up, as one row (`id` 0).
    pub fn channel_totals(&self) -> ChannelStats {
        ChannelStats::total(&self.channels)
    }

    /// Guest bytes transferred: normal and zero pages times the page size.
    pub fn guest_bytes(&self) -> u64 {
        (self.normal_pages + self.zero_pages) * u64::from(self.page_size)
    }

    /// Guest bytes per second over the whole migration.
    pub fn guest_throughput(&self) -> f64 {
        self.guest_bytes() as f64 / self.total_time.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Page bytes before compression per payload byte sent (1 without compression).
    pub fn compression_ratio(&self) -> f64 {
        compression_ratio(self.raw_payload_bytes, self.payload_bytes)
    }

    /// Wire bytes per second over the whole migration.
    pub fn wire_throughput(&self) -> f64 {
        self.bytes as f64 / self.total_time.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}
