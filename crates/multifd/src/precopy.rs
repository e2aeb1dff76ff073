//! The live loop: moves a running VM with the pre-copy method until the rest fits in the
//! downtime limit, then switches over.
//!
//! Round 0 queues every page while the guest runs. Each later round harvests the dirty
//! log ([`DirtyLog`]) and measures what the last round did: how fast the guest dirtied
//! memory and how fast the channels moved it. The expected downtime is what would still
//! have to move after a stop — the dirty pages plus the device state the devices report
//! as pending — divided by the switchover bandwidth (measured, or configured). When it is
//! within [`PrecopyConfig::downtime_limit`] and another round would not make it much
//! shorter, the driver stops the VM ([`VmControl::stop`]), harvests the last dirty pages,
//! sends them while every device saves concurrently, and completes; otherwise it sends the
//! dirty pages as the next round. Rounds go on within the limit while each at least halves
//! the pages still to send (the guest dirties at most half of what the link moves) and
//! those would take more than 1/64 of the limit: a downtime well under the limit costs a
//! few short rounds. Before the stop the driver waits, at most the downtime limit, until
//! the destination confirmed the rounds sent so far ([`PrecopyTarget::wait_until_received`]):
//! bytes still in socket buffers would otherwise move during the downtime.
//!
//! **Auto-converge.** A guest that dirties memory faster than the link moves it never
//! converges. When two rounds in a row dirty more than half of what they sent (QEMU's
//! trigger), the driver throttles the vCPUs through [`VmControl::throttle`]. QEMU starts
//! at 20% and adds 10% per trigger, so a guest dirtying 4× the bandwidth needs seven
//! triggers (fourteen rounds) before it converges. Here the first step is sized from the
//! measurement instead: to make the dirty rate at most half the bandwidth, the vCPUs may
//! run at most `bandwidth / (2 · dirty rate)` of the time, so the throttle starts at
//! `1 − bandwidth / (2 · dirty rate)` (at least [`Throttle::initial`]) and then grows by
//! [`Throttle::step`] up to [`Throttle::max`].
//!
//! Device state that cannot move before the stop counts in full: if it alone needs more
//! than the downtime limit at the switchover bandwidth, precopy cannot converge, and only
//! the timeout (or a higher limit) ends it.
//!
//! **Timeout.** Past [`PrecopyConfig::timeout`], the [`TimeoutStrategy`] decides: `Cancel`
//! fails the migration (the destination is told, the VM keeps running on the source at full
//! speed, nothing lost) or `Force` switches over at once whatever the downtime.
//!
//! **Targets.** The driver moves the VM to a [`PrecopyTarget`]: a [`Source`] connected to
//! a destination, or a [`SnapshotWriter`] for a live snapshot,
//! where each round rewrites the dirty pages in place in the file. Both have the same
//! round API (queue pages, end the round, switch over, complete), so there is one driver.
//!
//! **Failure.** Whatever fails, the source VM stays intact: before the stop nothing
//! changed but the throttle, which is lifted; after it, [`VmControl::resume`] runs the vCPUs
//! again. The destination's VMM resumes the guest only once everything is loaded. A local
//! migration (the destination maps the source's memory) that loses track of the outcome
//! after `Complete` is the exception: the guest stays stopped rather than risk running
//! twice on one memory ([`Error::HandoverUnconfirmed`]).

use std::fmt;
use std::time::{Duration, Instant};

use crate::dirty::DirtyLog;
use crate::error::Error;
use crate::ids::Side;
use crate::migration::Source;
use crate::ram::GuestMemory;
use crate::snapshot::SnapshotWriter;
use crate::stats::MigrationStats;

/// The part of a VMM the precopy driver drives: its vCPUs.
pub trait VmControl {
    /// Stops every vCPU; returns once none runs (guest memory no longer changes but
    /// through the VMM's own writes, which its dirty log still records).
    fn stop(&mut self) -> Result<(), crate::DeviceError>;

    /// Lets the vCPUs run at most `100 − percent` percent of the time (0: full speed).
    fn throttle(&mut self, percent: u8);

    /// The migration failed: the vCPUs run again, unthrottled, on the source (whether or
    /// not they were stopped).
    fn resume(&mut self);
}

/// Where the precopy driver moves a running VM: a [`Source`] (to a destination over the
/// channels) or a [`SnapshotWriter`] (into a snapshot file, rewriting dirty pages in
/// place). Both keep the same round API, so one driver serves both; the trait is sealed.
pub trait PrecopyTarget: sealed::Sealed {
    /// The guest page size in bytes.
    fn page_size(&self) -> u32;

    /// The blocks being moved.
    fn memory(&self) -> &GuestMemory;

    /// Bytes written so far (to the channels or the file), for the bandwidth estimate.
    fn bytes_moved(&self) -> u64;

    /// Queues every page of block `block` for the current round.
    fn queue_block(&mut self, block: usize) -> Result<(), Error>;

    /// Queues the pages whose bits are set in `bitmap` for the current round.
    fn queue_dirty_bitmap(&mut self, block: usize, bitmap: &[u64]) -> Result<(), Error>;

    /// Ends the round: returns once every page queued in it was written.
    fn end_round(&mut self) -> Result<(), Error>;

    /// Lets devices with a pre-copy phase save what they can while the VM runs.
    fn save_devices_precopy(&mut self) -> Result<(), Error>;

    /// Device-state bytes still to save if the VM stopped now.
    fn pending_device_bytes(&mut self) -> u64;

    /// Fails the transfer with `error` (telling the other end, if there is one) and
    /// returns the error to report.
    fn abort(&self, error: Error) -> Error;

    /// Whether the other end maps this very memory (a local migration): no page needs
    /// to move, so the driver stops the VM at once and moves only device state.
    fn shares_memory(&self) -> bool {
        false
    }

    /// Waits, at most `bound`, until the other end has everything of the rounds ended so
    /// far; returns whether it said so in time. A file has it once written.
    fn wait_until_received(&mut self, _bound: Duration) -> Result<bool, Error> {
        Ok(true)
    }

    /// The VM is stopped: starts saving every device, concurrently with the last round.
    fn switchover(&mut self) -> Result<(), Error>;

    /// Finishes: the last round and every device written (and, for a migration, loaded by
    /// the destination).
    fn complete(self) -> Result<MigrationStats, Error>
    where
        Self: Sized;
}

mod sealed {
    /// Only the engine's targets implement [`PrecopyTarget`](super::PrecopyTarget).
    pub trait Sealed {}

    impl Sealed for crate::Source {}
    impl Sealed for crate::SnapshotWriter {}
}

impl PrecopyTarget for Source {
    fn page_size(&self) -> u32 {
        Source::page_size(self)
    }

    fn memory(&self) -> &GuestMemory {
        Source::memory(self)
    }

    fn bytes_moved(&self) -> u64 {
        self.monitor().progress().bytes
    }

    fn queue_block(&mut self, block: usize) -> Result<(), Error> {
        Source::queue_block(self, block)
    }

    fn queue_dirty_bitmap(&mut self, block: usize, bitmap: &[u64]) -> Result<(), Error> {
        Source::queue_dirty_bitmap(self, block, bitmap)
    }

    fn end_round(&mut self) -> Result<(), Error> {
        Source::end_round(self)
    }

    fn save_devices_precopy(&mut self) -> Result<(), Error> {
        Source::save_devices_precopy(self)
    }

    fn pending_device_bytes(&mut self) -> u64 {
        Source::pending_device_bytes(self)
    }

    fn abort(&self, error: Error) -> Error {
        Source::abort(self, error)
    }

    fn shares_memory(&self) -> bool {
        Source::shares_memory(self)
    }

    fn wait_until_received(&mut self, bound: Duration) -> Result<bool, Error> {
        Source::wait_until_received(self, bound)
    }

    fn switchover(&mut self) -> Result<(), Error> {
        Source::switchover(self)
    }

    fn complete(self) -> Result<MigrationStats, Error> {
        Source::complete(self)
    }
}

impl PrecopyTarget for SnapshotWriter {
    fn page_size(&self) -> u32 {
        SnapshotWriter::page_size(self)
    }

    fn memory(&self) -> &GuestMemory {
        SnapshotWriter::memory(self)
    }

    fn bytes_moved(&self) -> u64 {
        self.monitor().progress().bytes
    }

    fn queue_block(&mut self, block: usize) -> Result<(), Error> {
        SnapshotWriter::queue_block(self, block)
    }

    fn queue_dirty_bitmap(&mut self, block: usize, bitmap: &[u64]) -> Result<(), Error> {
        SnapshotWriter::queue_dirty_bitmap(self, block, bitmap)
    }

    fn end_round(&mut self) -> Result<(), Error> {
        SnapshotWriter::end_round(self)
    }

    fn save_devices_precopy(&mut self) -> Result<(), Error> {
        SnapshotWriter::save_devices_precopy(self)
    }

    fn pending_device_bytes(&mut self) -> u64 {
        SnapshotWriter::pending_device_bytes(self)
    }

    fn abort(&self, error: Error) -> Error {
        SnapshotWriter::abort(self, error)
    }

    fn switchover(&mut self) -> Result<(), Error> {
        SnapshotWriter::switchover(self)
    }

    fn complete(self) -> Result<MigrationStats, Error> {
        SnapshotWriter::complete(self)
    }
}

/// What happens when precopy has not converged by [`PrecopyConfig::timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeoutStrategy {
    /// Fail the migration; the VM keeps running on the source.
    #[default]
    Cancel,
    /// Switch over now, whatever the downtime.
    Force,
}

/// Auto-converge's throttle steps, in percent of vCPU time taken away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Throttle {
    /// The least first step (QEMU's default, 20).
    pub initial: u8,
    /// Added at every later trigger (QEMU's default, 10).
    pub step: u8,
    /// Never more (QEMU's default, 99).
    pub max: u8,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            initial: 20,
            step: 10,
            max: 99,
        }
    }
}

/// How a live migration converges.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PrecopyConfig {
    /// The longest the VM may stay stopped (default 300 ms, as QEMU and Cloud Hypervisor).
    pub downtime_limit: Duration,
    /// Throttle the vCPUs when the guest dirties memory faster than it moves (off by
    /// default: a VMM opts in to slowing its guest).
    pub auto_converge: bool,
    /// Auto-converge's steps.
    pub throttle: Throttle,
    /// Bytes per second the switchover may count on; `None` uses the bandwidth measured
    /// in the last round that moved enough to measure it.
    pub switchover_bandwidth: Option<u64>,
    /// How long precopy may run before [`PrecopyConfig::timeout_strategy`] decides;
    /// `None` runs until it converges or is cancelled.
    pub timeout: Option<Duration>,
    /// What the timeout does.
    pub timeout_strategy: TimeoutStrategy,
}

/// Default [`PrecopyConfig::downtime_limit`].
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(300);

impl Default for PrecopyConfig {
    fn default() -> Self {
        Self {
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            auto_converge: false,
            throttle: Throttle::default(),
            switchover_bandwidth: None,
            timeout: None,
            timeout_strategy: TimeoutStrategy::default(),
        }
    }
}

/// A round's bandwidth counts only if it moved at least this much: a round of a few pages
/// measures latency, not the link, and would make the estimate swing. 8 MiB is 16 packets
/// of 512 KiB, enough to keep every channel busy for a while at any channel count we allow
/// to matter.
const MIN_MEASURED_BYTES: u64 = 8 << 20;

/// Once the expected downtime is within the limit, rounds go on while they at least halve
/// the dirty pages still to send, until those would take under `1/64` of the limit (4.7 ms
/// at the default 300 ms): about the fixed cost of a switchover (stopping the vCPUs, saving
/// their state, the `Complete` round trip), so a further round could not make the downtime
/// visibly shorter. Halving rounds bound the extra time by twice the first estimate within
/// the limit.
const MIN_WORTHWHILE_SHARE: f64 = 64.0;

/// How long the driver waits before the next round when the last harvest found nothing
/// dirty but the estimate is still over the limit (pending device state): long enough
/// that an idle guest does not turn the loop into a busy spin, short next to any downtime
/// limit or timeout worth setting.
const IDLE_ROUND_WAIT: Duration = Duration::from_millis(50);

/// Where a live migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Dirty logging started; round 0 not sent yet.
    Setup,
    /// Precopy round `n` is being sent (0 is the whole guest).
    Round(u64),
    /// The VM is stopped: the last dirty pages and the device state are moving.
    Switchover,
    /// Waiting for the destination to confirm it loaded everything.
    Completing,
    /// The destination confirmed: the VM runs there now.
    Done,
    /// The migration failed; the VM runs on the source.
    Failed,
}

impl fmt::Display for Phase {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup => formatter.write_str("setup"),
            Self::Round(round) => write!(formatter, "round {round}"),
            Self::Switchover => formatter.write_str("switchover"),
            Self::Completing => formatter.write_str("completing"),
            Self::Done => formatter.write_str("done"),
            Self::Failed => formatter.write_str("failed"),
        }
    }
}

/// A snapshot of a live migration, handed to the progress callback at every round and
/// phase change.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PrecopyProgress {
    /// Where the migration is.
    pub phase: Phase,
    /// Rounds sent so far.
    pub rounds: u64,
    /// Dirty bytes found by the last harvest, still to send.
    pub remaining_dirty_bytes: u64,
    /// Device-state bytes the devices report as pending.
    pub pending_device_bytes: u64,
    /// Bytes per second the guest dirtied in the last round.
    pub dirty_rate: f64,
    /// Wire bytes per second the channels moved in the last round.
    pub bandwidth: f64,
    /// The downtime a switchover now would cause, at the switchover bandwidth.
    pub expected_downtime: Duration,
    /// The vCPU throttle in percent.
    pub throttle_percent: u8,
    /// Since the driver started.
    pub elapsed: Duration,
}

/// One precopy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundStats {
    /// The round's number (0: the whole guest).
    pub round: u64,
    /// Pages queued in the round.
    pub pages_sent: u64,
    /// Pages the guest dirtied while the round was sent (found by the next harvest).
    pub pages_dirtied: u64,
    /// Wire bytes the round moved, device state included.
    pub bytes: u64,
    /// From the round's first page queued to its SYNC on every channel.
    pub duration: Duration,
    /// The throttle while the round was sent, in percent.
    pub throttle_percent: u8,
}

/// What a live migration did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PrecopyStats {
    /// The transfer's own figures (bytes, pages, channels, devices).
    pub migration: MigrationStats,
    /// Every precopy round, in order; the final round after the stop is not among them.
    pub rounds: Vec<RoundStats>,
    /// Pages sent after the stop.
    pub final_pages: u64,
    /// From the call to [`VmControl::stop`] to the destination's `Completed`: the downtime
    /// as the source sees it (Cloud Hypervisor's measure; at least the destination's).
    pub downtime: Duration,
    /// What the driver expected the downtime to be when it decided to switch over.
    pub expected_downtime: Duration,
    /// The highest throttle applied, in percent.
    pub max_throttle_percent: u8,
    /// Whether the switchover was forced by the timeout rather than reached.
    pub forced: bool,
    /// From the driver's start to `Completed`.
    pub total_time: Duration,
}

/// The precopy driver; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Precopy {
    config: PrecopyConfig,
}

/// What a harvest found, per block.
struct Harvest {
    bitmaps: Vec<Vec<u64>>,
    /// Pages set over all bitmaps.
    pages: u64,
}

impl Harvest {
    fn new(bitmaps: Vec<Vec<u64>>) -> Self {
        let pages = bitmaps
            .iter()
            .flatten()
            .map(|word| u64::from(word.count_ones()))
            .sum();
        Self { bitmaps, pages }
    }
}

impl Precopy {
    /// A driver with this configuration.
    pub fn new(config: PrecopyConfig) -> Self {
        Self { config }
    }

    /// Migrates the running VM behind `source`, `dirty` and `vm` to completion, calling
    /// `progress` at every round and phase change (on this thread: keep it short).
    ///
    /// `source` is a [`Source`] connected to a destination, or a [`SnapshotWriter`]
    /// for a live snapshot. `dirty` must cover every block of the source's memory, in the same
    /// order. On any error the VM runs on at the source, unthrottled; the destination is
    /// told why. The one exception is [`Error::HandoverUnconfirmed`]: a local migration
    /// that lost track of the outcome after `Complete` leaves the VM stopped, since the
    /// destination may already run it on the same memory.
    pub fn run<T: PrecopyTarget>(
        &self,
        mut source: T,
        dirty: &mut dyn DirtyLog,
        vm: &mut dyn VmControl,
        progress: &mut dyn FnMut(&PrecopyProgress),
    ) -> Result<PrecopyStats, Error> {
        let mut run = Run::new(&self.config, &source, progress);
        let result = run.precopy(&mut source, dirty, vm);
        let stopped = match result {
            Ok(Converged { harvest, forced }) => {
                run.forced = forced;
                run.switch_over(source, dirty, vm, harvest)
            }
            Err(error) => {
                // The destination is told why; the VM never stopped.
                let error = source.abort(error);
                vm.resume();
                let _ = dirty.stop();
                Err(error)
            }
        };
        if stopped.is_err() {
            run.report(Phase::Failed);
        }
        stopped
    }
}

/// Precopy ended: the last harvest, still to send after the stop.
struct Converged {
    harvest: Harvest,
    forced: bool,
}

/// One run of the driver: its measurements so far.
struct Run<'a> {
    config: &'a PrecopyConfig,
    progress: &'a mut dyn FnMut(&PrecopyProgress),
    started: Instant,
    page_size: u64,
    block_pages: Vec<u64>,
    rounds: Vec<RoundStats>,
    /// The last bandwidth measured on a round that moved enough.
    bandwidth: Option<f64>,
    dirty_rate: f64,
    last_bandwidth: f64,
    throttle: u8,
    max_throttle: u8,
    /// Consecutive rounds that dirtied more than half of what they sent.
    busy_rounds: u32,
    remaining_dirty: u64,
    pending_device: u64,
    expected: Duration,
    forced: bool,
}

impl<'a> Run<'a> {
    fn new(
        config: &'a PrecopyConfig,
        source: &impl PrecopyTarget,
        progress: &'a mut dyn FnMut(&PrecopyProgress),
    ) -> Self {
        let page_size = u64::from(source.page_size());
        Self {
            config,
            progress,
            started: Instant::now(),
            page_size,
            block_pages: source
                .memory()
                .blocks()
                .iter()
                .map(|block| block.len() / page_size)
                .collect(),
            rounds: Vec::new(),
            bandwidth: config.switchover_bandwidth.map(|bytes| bytes as f64),
            dirty_rate: 0.0,
            last_bandwidth: 0.0,
            throttle: 0,
            max_throttle: 0,
            busy_rounds: 0,
            remaining_dirty: 0,
            pending_device: 0,
            expected: Duration::ZERO,
            forced: false,
        }
    }

    fn report(&mut self, phase: Phase) {
        let snapshot = PrecopyProgress {
            phase,
            rounds: self.rounds.len() as u64,
            remaining_dirty_bytes: self.remaining_dirty,
            pending_device_bytes: self.pending_device,
            dirty_rate: self.dirty_rate,
            bandwidth: self.last_bandwidth,
            expected_downtime: self.expected,
            throttle_percent: self.throttle,
            elapsed: self.started.elapsed(),
        };
        (self.progress)(&snapshot);
    }

    /// Rounds until the rest fits in the downtime limit (or the timeout forces it).
    fn precopy(
        &mut self,
        source: &mut impl PrecopyTarget,
        dirty: &mut dyn DirtyLog,
        vm: &mut dyn VmControl,
    ) -> Result<Converged, Error> {
        self.report(Phase::Setup);
        dirty.start().map_err(dirty_log_error)?;
        // Some logs start with every page set (KVM's `KVM_DIRTY_LOG_INITIALLY_SET`, whose
        // first harvest is what write-protects the pages): round 0 sends every page
        // anyway, so what the log holds now is dropped, and the next harvest finds only
        // pages written after this point.
        self.harvest(dirty)?;
        if source.shares_memory() {
            return Ok(Converged {
                harvest: self.harvest(dirty)?,
                forced: false,
            });
        }
        self.report(Phase::Round(0));
        let mut round_started = Instant::now();
        let mut bytes_before = source.bytes_moved();
        for block in 0..self.block_pages.len() {
            source.queue_block(block)?;
        }
        let mut pages_sent = self.block_pages.iter().sum::<u64>();
        self.end_round(source, (round_started, bytes_before), pages_sent)?;
        loop {
            let harvest = self.harvest(dirty)?;
            let round_time = round_started.elapsed();
            self.measure(&harvest, round_time, pages_sent);
            self.pending_device = source.pending_device_bytes();
            self.expected = self.expected_downtime();
            let within_limit = self.expected <= self.config.downtime_limit;
            if within_limit && !self.another_round_pays() {
                return Ok(Converged {
                    harvest,
                    forced: false,
                });
            }
            if let Some(timeout) = self.config.timeout {
                if self.started.elapsed() >= timeout {
                    if within_limit {
                        return Ok(Converged {
                            harvest,
                            forced: false,
                        });
                    }
                    return match self.config.timeout_strategy {
                        TimeoutStrategy::Force => Ok(Converged {
                            harvest,
                            forced: true,
                        }),
                        TimeoutStrategy::Cancel => Err(Error::Timeout {
                            side: Side::Source,
                            what: "precopy: not converged within the timeout (cancelled)",
                        }),
                    };
                }
            }
            if self.config.auto_converge {
                self.auto_converge(vm);
            }
            if harvest.pages == 0 {
                // Nothing dirty, yet the estimate is over the limit: device state the
                // devices cannot send before the stop. Another round cannot help until the
                // guest or a device changes something; wait instead of spinning.
                std::thread::sleep(IDLE_ROUND_WAIT);
            }
            self.report(Phase::Round(self.rounds.len() as u64));
            round_started = Instant::now();
            bytes_before = source.bytes_moved();
            for (block, bitmap) in harvest.bitmaps.iter().enumerate() {
                source.queue_dirty_bitmap(block, bitmap)?;
            }
            pages_sent = harvest.pages;
            self.end_round(source, (round_started, bytes_before), pages_sent)?;
        }
    }

    /// Devices send their precopy share, then the round ends on every channel.
    fn end_round(
        &mut self,
        source: &mut impl PrecopyTarget,
        (started, bytes_before): (Instant, u64),
        pages_sent: u64,
    ) -> Result<(), Error> {
        source.save_devices_precopy()?;
        source.end_round()?;
        let duration = started.elapsed();
        let bytes = source.bytes_moved() - bytes_before;
        self.rounds.push(RoundStats {
            round: self.rounds.len() as u64,
            pages_sent,
            pages_dirtied: 0,
            bytes,
            duration,
            throttle_percent: self.throttle,
        });
        Ok(())
    }

    fn harvest(&self, dirty: &mut dyn DirtyLog) -> Result<Harvest, Error> {
        let mut bitmaps = Vec::with_capacity(self.block_pages.len());
        for (block, &block_pages) in self.block_pages.iter().enumerate() {
            let mut bitmap = vec![0u64; block_pages.div_ceil(64) as usize];
            dirty.harvest(block, &mut bitmap).map_err(dirty_log_error)?;
            bitmaps.push(bitmap);
        }
        Ok(Harvest::new(bitmaps))
    }

    /// Updates the rates from the round just ended and what the guest dirtied during it.
    fn measure(&mut self, harvest: &Harvest, round_time: Duration, pages_sent: u64) {
        let seconds = round_time.as_secs_f64().max(1e-6);
        self.remaining_dirty = harvest.pages * self.page_size;
        self.dirty_rate = self.remaining_dirty as f64 / seconds;
        if let Some(round) = self.rounds.last_mut() {
            round.pages_dirtied = harvest.pages;
            self.last_bandwidth = round.bytes as f64 / round.duration.as_secs_f64().max(1e-6);
            if self.config.switchover_bandwidth.is_none() && round.bytes >= MIN_MEASURED_BYTES {
                self.bandwidth = Some(self.last_bandwidth);
            }
        }
        if harvest.pages * 2 > pages_sent {
            self.busy_rounds += 1;
        } else {
            self.busy_rounds = 0;
        }
    }

    /// The bandwidth the switchover counts on: configured or measured on a round that moved
    /// enough, else the last round's, else none yet.
    fn switchover_bandwidth(&self) -> Option<f64> {
        self.bandwidth
            .or((self.last_bandwidth > 0.0).then_some(self.last_bandwidth))
    }

    fn expected_downtime(&self) -> Duration {
        let bytes = (self.remaining_dirty + self.pending_device) as f64;
        match self.switchover_bandwidth() {
            Some(bandwidth) => Duration::from_secs_f64(bytes / bandwidth),
            None => Duration::MAX,
        }
    }

    /// Whether one more round would still cut the downtime, once it is within the limit.
    ///
    /// The next round sends what is dirty now, taking `remaining / bandwidth`, while the
    /// guest dirties `dirty_rate` of it again: at most half the rest is dirty afterwards
    /// when the guest dirties at most half of what the link moves. A guest that keeps
    /// rewriting the same few pages measures a higher rate over a shorter round, so this
    /// stops the iteration by itself once rounds no longer shrink the rest. Below
    /// [`MIN_WORTHWHILE_SHARE`] of the limit, a round buys a few milliseconds at most.
    fn another_round_pays(&self) -> bool {
        let Some(bandwidth) = self.switchover_bandwidth() else {
            return false;
        };
        let dirty_time = self.remaining_dirty as f64 / bandwidth;
        let floor = self.config.downtime_limit.as_secs_f64() / MIN_WORTHWHILE_SHARE;
        dirty_time > floor && self.dirty_rate * 2.0 <= bandwidth
    }

    /// Raises the throttle after two busy rounds in a row (see the module docs).
    fn auto_converge(&mut self, vm: &mut dyn VmControl) {
        if self.busy_rounds < 2 {
            return;
        }
        self.busy_rounds = 0;
        let steps = self.config.throttle;
        let next = if self.throttle == 0 {
            let bandwidth = self.bandwidth.unwrap_or(self.last_bandwidth);
            let needed = 1.0 - bandwidth / (2.0 * self.dirty_rate.max(1.0));
            let sized = (needed * 100.0).ceil().clamp(0.0, 100.0) as u8;
            sized.max(steps.initial)
        } else {
            self.throttle.saturating_add(steps.step)
        }
        .min(steps.max);
        if next != self.throttle {
            self.throttle = next;
            self.max_throttle = self.max_throttle.max(next);
            tracing::info!(percent = next, "auto-converge: throttling the vCPUs");
            vm.throttle(next);
        }
    }

    /// Stops the VM, sends the last dirty pages while the devices save, completes.
    fn switch_over<T: PrecopyTarget>(
        &mut self,
        mut source: T,
        dirty: &mut dyn DirtyLog,
        vm: &mut dyn VmControl,
        mut pending: Harvest,
    ) -> Result<PrecopyStats, Error> {
        // Rounds still in flight would move during the downtime: let the destination catch
        // up while the guest runs (what it dirties meanwhile joins the last harvest).
        // Waiting longer than the downtime limit would mean the link is far slower than
        // measured; then the stop goes ahead and the rest moves in the downtime.
        match source.wait_until_received(self.config.downtime_limit) {
            Ok(true) => {}
            Ok(false) => tracing::debug!("switching over before the destination caught up"),
            Err(error) => {
                let _ = dirty.stop();
                vm.resume();
                return Err(source.abort(error));
            }
        }
        self.report(Phase::Switchover);
        // The downtime starts with the stop request, as QEMU's does: the first vCPU may
        // park long before the last one.
        let stopped = Instant::now();
        if let Err(error) = vm.stop() {
            let _ = dirty.stop();
            vm.resume();
            return Err(source.abort(Error::Vm {
                message: format!("stopping the vCPUs failed: {error}"),
            }));
        }
        let result = (|| {
            source.switchover()?;
            // The pages harvested before the stop are still to send; OR the last ones in.
            for (block, bitmap) in pending.bitmaps.iter_mut().enumerate() {
                dirty.harvest(block, bitmap).map_err(dirty_log_error)?;
            }
            let pending = Harvest::new(pending.bitmaps);
            for (block, bitmap) in pending.bitmaps.iter().enumerate() {
                source.queue_dirty_bitmap(block, bitmap)?;
            }
            self.report(Phase::Completing);
            Ok((source.complete()?, pending.pages))
        })();
        let _ = dirty.stop();
        match result {
            Ok((migration, final_pages)) => {
                let downtime = stopped.elapsed();
                self.report(Phase::Done);
                Ok(PrecopyStats {
                    migration,
                    rounds: std::mem::take(&mut self.rounds),
                    final_pages,
                    downtime,
                    expected_downtime: self.expected,
                    max_throttle_percent: self.max_throttle,
                    forced: self.forced,
                    total_time: self.started.elapsed(),
                })
            }
            // Resuming could run the guest twice on one memory (see the variant).
            Err(error @ Error::HandoverUnconfirmed { .. }) => Err(error),
            Err(error) => {
                vm.resume();
                Err(error)
            }
        }
    }
}

fn dirty_log_error(source: std::io::Error) -> Error {
    Error::DirtyLog {
        side: Side::Source,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A run that measured `bandwidth` and `dirty_rate` (bytes/s) and has `dirty` bytes left.
    fn measured(
        config: &PrecopyConfig,
        progress: &mut dyn FnMut(&PrecopyProgress),
        bandwidth: f64,
        dirty_rate: f64,
        dirty: u64,
    ) -> bool {
        let mut run = Run {
            config,
            progress,
            started: Instant::now(),
            page_size: 4096,
            block_pages: vec![],
            rounds: Vec::new(),
            bandwidth: Some(bandwidth),
            dirty_rate,
            last_bandwidth: bandwidth,
            throttle: 0,
            max_throttle: 0,
            busy_rounds: 0,
            remaining_dirty: dirty,
            pending_device: 0,
            expected: Duration::ZERO,
            forced: false,
        };
        run.expected = run.expected_downtime();
        assert!(run.expected <= config.downtime_limit);
        run.another_round_pays()
    }

    #[test]
    fn rounds_go_on_within_the_limit_while_they_halve_the_rest() {
        let config = PrecopyConfig::default();
        let gib = 1024.0 * MIB as f64;
        // 100 ms of pages left; the guest dirties a quarter of what the link moves.
        assert!(measured(&config, &mut |_| {}, gib, gib / 4.0, 100 * MIB));
        // Exactly half still halves the rest.
        assert!(measured(&config, &mut |_| {}, gib, gib / 2.0, 100 * MIB));
    }

    #[test]
    fn a_round_that_would_not_halve_the_rest_is_not_sent() {
        let config = PrecopyConfig::default();
        let gib = 1024.0 * MIB as f64;
        assert!(!measured(&config, &mut |_| {}, gib, gib * 0.6, 100 * MIB));
    }

    #[test]
    fn a_rest_under_a_64th_of_the_limit_is_not_worth_a_round() {
        let config = PrecopyConfig::default();
        let gib = 1024.0 * MIB as f64;
        // 4 MiB at 1 GiB/s is 3.9 ms, under 300 ms / 64 = 4.7 ms; 8 MiB (7.8 ms) is over.
        assert!(!measured(&config, &mut |_| {}, gib, 0.0, 4 * MIB));
        assert!(measured(&config, &mut |_| {}, gib, 0.0, 8 * MIB));
    }
}
