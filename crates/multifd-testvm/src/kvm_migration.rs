//! Live migration of a [`KvmVm`]: the precopy driver with KVM's dirty log and the VM's
//! control on the source, a paused [`KvmVm::incoming`] on the destination that receives
//! RAM and every device (vCPUs, KVM clock, frame buffer) and then resumes.
//!
//! The two halves are separate ([`send`], [`receive`]) so that each can run in its own
//! process; [`KvmMigration::migrate`] runs both in this one, the destination on a thread,
//! over a real socket. The source VM stays intact until the destination confirmed it
//! loaded everything: on any failure the precopy driver resumes it and the destination
//! VM is dropped.
//!
//! A local migration ([`KvmMigration::local`], or [`SourceConfig::local_memory`] for
//! [`send`]) hands the guest's memfd over a Unix socket instead: the driver stops the VM
//! at once, only device state moves, and the incoming VM switches its memory slot to the
//! handed-over mapping while it loads the devices, so a failure there still leaves the
//! source intact. Once the destination confirmed, the source never runs again: both map
//! the same pages.
//!
//! Test-only faults ([`KvmFault`]): the source's dirty log loses one page in every
//! harvest, so the destination keeps the copy from round 0 and the guest, running on
//! there, must report that exact page as stale; or the destination refuses the VM state
//! after the switchover, so the source must resume its stopped VM intact.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use multifd::{
    Address, BlockAnnouncement, Destination, DestinationConfig, DeviceError, DeviceId, DirtyLog,
    GuestMemory, KvmDirtyLogMode, Listener, LoadDevice, MigrationStats, Precopy, PrecopyConfig,
    PrecopyProgress, PrecopyStats, RestoreConfig, Snapshot, SnapshotConfig, SnapshotWriter, Source,
    SourceConfig,
};

use crate::guest_image::PAGE_SIZE;
use crate::kvm_vm::MemorySwitch;
use crate::serial::GuestProgress;
use crate::{Error, KvmVm};

/// A test-only fault injected into a migration.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvmFault {
    /// The source's dirty log drops the page at this guest address from every harvest:
    /// the page moves in round 0 only, as if KVM had lost its writes. So that the loss
    /// surely matters, the first harvest (after round 0) waits until every vCPU finished
    /// two more passes — each rewrote the page after round 0 sent it.
    LoseDirtyPage(u64),
    /// The destination refuses the `("vm", 0)` state once it has arrived: the migration
    /// fails after the source stopped its VM, which must then run on where it was.
    RefuseVmState,
}

/// How to migrate a [`KvmVm`] within this process.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KvmMigration {
    /// Where the destination listens: a Unix socket or a TCP address.
    pub address: Address,
    /// Channels, compression, bandwidth cap, TLS.
    pub source: SourceConfig,
    /// Downtime limit, auto-converge, timeout.
    pub precopy: PrecopyConfig,
    /// The destination's limits and timeouts (`memory_zeroed` is set: its RAM is a
    /// fresh memfd; `max_queued_device_bytes` is raised to the VM's device state if
    /// below).
    pub destination: DestinationConfig,
    /// How KVM's dirty log is harvested.
    pub dirty_log_mode: KvmDirtyLogMode,
    /// Hand the guest's memory over instead of copying it (as `source.local_memory`
    /// does): `address` must be `unix:`. No page moves, so
    /// [`KvmFault::LoseDirtyPage`] is refused with it.
    pub local: bool,
    /// A fault to inject, for tests.
    #[doc(hidden)]
    pub fault: Option<KvmFault>,
}

/// What a migration did.
#[derive(Debug)]
#[non_exhaustive]
pub struct KvmMigrationReport {
    /// The source's figures: rounds, downtime (source stop → destination's `Completed`),
    /// total time, bytes.
    pub precopy: PrecopyStats,
    /// The destination's figures (its `switchover_time` is its own downtime measure).
    pub destination: MigrationStats,
    /// The guest's progress on the source when it stopped.
    pub before: GuestProgress,
    /// From the start of the migration to the destination's VM running.
    pub total_time: Duration,
}

impl KvmMigration {
    /// A migration over `address` with default settings.
    pub fn new(address: Address) -> Self {
        Self {
            address,
            source: SourceConfig::default(),
            precopy: PrecopyConfig::default(),
            destination: DestinationConfig::default(),
            dirty_log_mode: KvmDirtyLogMode::default(),
            local: false,
            fault: None,
        }
    }

    /// Live-migrates `vm` to a new VM of the same configuration in this process; returns
    /// it running. On failure `vm` runs on (the error says why).
    pub fn migrate(
        &self,
        vm: &KvmVm,
        progress: &mut dyn FnMut(&PrecopyProgress),
    ) -> Result<(KvmVm, KvmMigrationReport), Error> {
        let start = Instant::now();
        let mut source = self.source.clone();
        source.local_memory |= self.local;
        if source.local_memory && matches!(self.fault, Some(KvmFault::LoseDirtyPage(_))) {
            return Err(Error::Guest(
                "a local migration moves no page: LoseDirtyPage cannot apply".into(),
            ));
        }
        let incoming = KvmVm::incoming(vm.config())?;
        let listener = Listener::bind(&self.address)?;
        let destination = Arc::new(destination(&self.destination, &incoming));
        let cancel = destination.cancel_handle();
        let (sent, received) = thread::scope(|scope| {
            let refuse = self.fault == Some(KvmFault::RefuseVmState);
            let (destination, incoming, listener) = (&destination, &incoming, &listener);
            let destination =
                scope.spawn(move || receive_on(destination, incoming, listener, refuse));
            let sent = send_with_fault(
                vm,
                &self.address,
                &source,
                &self.precopy,
                self.dirty_log_mode,
                self.fault,
                progress,
            );
            if sent.is_err() {
                // The source may have failed before it could tell the destination.
                cancel.cancel();
            }
            let received = destination
                .join()
                .unwrap_or_else(|_| Err(Error::Guest("the destination thread panicked".into())));
            (sent, received)
        });
        let precopy = sent?;
        let destination = received?;
        Ok((
            incoming,
            KvmMigrationReport {
                precopy,
                destination,
                before: vm.progress(),
                total_time: start.elapsed(),
            },
        ))
    }
}

/// The source half: live-migrates `vm` to the destination at `address`. On success the
/// VM is stopped (the destination runs it now; after a local migration,
/// `source.local_memory`, it never runs here again); on failure it runs on.
pub fn send(
    vm: &KvmVm,
    address: &Address,
    source: &SourceConfig,
    precopy: &PrecopyConfig,
    mode: KvmDirtyLogMode,
    progress: &mut dyn FnMut(&PrecopyProgress),
) -> Result<PrecopyStats, Error> {
    send_with_fault(vm, address, source, precopy, mode, None, progress)
}

fn send_with_fault(
    vm: &KvmVm,
    address: &Address,
    source: &SourceConfig,
    precopy: &PrecopyConfig,
    mode: KvmDirtyLogMode,
    fault: Option<KvmFault>,
    progress: &mut dyn FnMut(&PrecopyProgress),
) -> Result<PrecopyStats, Error> {
    let connection = Source::connect_with_devices(address, source, vm.memory(), vm.save_devices())?;
    let mut kvm_log;
    // A destination that maps this memory needs no page, so no log: KVM's would only
    // write-protect the guest's memory for nothing.
    let dirty: &mut dyn DirtyLog = if source.local_memory {
        &mut NoPages
    } else {
        kvm_log = vm.dirty_log(mode)?;
        &mut kvm_log
    };
    let mut control = vm.control();
    let driver = Precopy::new(precopy.clone());
    let stats = match fault {
        None | Some(KvmFault::RefuseVmState) => {
            driver.run(connection, dirty, &mut control, progress)
        }
        Some(KvmFault::LoseDirtyPage(address)) => {
            let mut losing = LosingDirtyLog {
                inner: dirty,
                page: address / PAGE_SIZE,
                vm,
                harvests: 0,
            };
            driver.run(connection, &mut losing, &mut control, progress)
        }
    }?;
    if source.local_memory {
        vm.hand_over();
    }
    Ok(stats)
}

/// The destination half: receives a migration on `listener` into `vm` (from
/// [`KvmVm::incoming`]), then resumes it. From a local source, `vm` adopts the
/// handed-over memory (its [`KvmVm::memory`] and [`KvmVm::memory_file`] are the source's).
pub fn receive(
    vm: &KvmVm,
    listener: &Listener,
    config: &DestinationConfig,
) -> Result<MigrationStats, Error> {
    receive_on(&Arc::new(destination(config, vm)), vm, listener, false)
}

/// A destination for a fresh [`KvmVm::incoming`]: its memfd starts zeroed, and the cap
/// on queued device state admits the VM's whole device state (the frame buffer arrives
/// faster than its rows are checked and copied when the channels outrun one loading
/// thread; queuing it all is what the VM would hold anyway).
fn destination(config: &DestinationConfig, vm: &KvmVm) -> Destination {
    let mut config = config.clone();
    config.memory_zeroed = true;
    config.max_queued_device_bytes = config
        .max_queued_device_bytes
        .max(vm.max_device_state_bytes());
    Destination::new(config)
}

/// Receives into `vm`, then resumes it; `refuse_vm_state` injects
/// [`KvmFault::RefuseVmState`].
fn receive_on(
    destination: &Arc<Destination>,
    vm: &KvmVm,
    listener: &Listener,
    refuse_vm_state: bool,
) -> Result<MigrationStats, Error> {
    let memory = vm.memory();
    let devices = vm
        .load_devices()
        .into_iter()
        .map(|(id, device)| {
            if id != DeviceId::new("vm", 0) {
                return (id, device);
            }
            let inner: Box<dyn LoadDevice> = if refuse_vm_state {
                Box::new(Refuse)
            } else {
                device
            };
            let adopt: Box<dyn LoadDevice> = Box::new(AdoptMemory {
                inner,
                destination: Arc::clone(destination),
                switch: vm.memory_switch(),
            });
            (id, adopt)
        })
        .collect();
    let stats =
        destination.run_with_devices(listener, |blocks| map_blocks(blocks, memory), devices)?;
    vm.resume();
    Ok(stats)
}

/// Checks the source announces this VM's single block, and lends it.
fn map_blocks(blocks: &[BlockAnnouncement], memory: GuestMemory) -> Result<GuestMemory, String> {
    let ram = &memory.blocks()[0];
    match blocks {
        [block] if block.name == ram.name() && block.length == ram.len() => Ok(memory),
        _ => Err(format!(
            "the source announces {:?}; this VM has one block {:?} of {} bytes",
            blocks
                .iter()
                .map(|block| (&block.name, block.length))
                .collect::<Vec<_>>(),
            ram.name(),
            ram.len()
        )),
    }
}

/// The `("vm", 0)` load, followed by the switch to handed-over memory after a local
/// migration: before the destination confirms, so that a failed switch fails the
/// migration and the source resumes.
struct AdoptMemory {
    inner: Box<dyn LoadDevice>,
    destination: Arc<Destination>,
    switch: MemorySwitch,
}

impl LoadDevice for AdoptMemory {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        self.inner.load_state(chunk)
    }

    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError> {
        self.inner.load_config(config)?;
        if let Some(memory) = self.destination.local_memory() {
            self.switch.adopt(memory)?;
        }
        Ok(())
    }
}

/// The dirty log of a local migration: the destination maps the guest's memory, so no
/// page is ever dirty for it.
struct NoPages;

impl DirtyLog for NoPages {
    fn start(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn harvest(&mut self, _block: usize, _bitmap: &mut [u64]) -> std::io::Result<()> {
        Ok(())
    }

    fn stop(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A device load that takes the state and refuses it (see [`KvmFault::RefuseVmState`]).
struct Refuse;

impl LoadDevice for Refuse {
    fn load_state(&mut self, _chunk: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }

    fn load_config(&mut self, _config: &[u8]) -> Result<(), DeviceError> {
        Err("refused by the test-only fault RefuseVmState".into())
    }
}

/// How long the lost-page fault waits for the guest's two passes: far more than a pass
/// of a test guest takes.
const FAULT_WAIT: Duration = Duration::from_secs(20);

/// A dirty log that loses one page (see [`KvmFault`]).
struct LosingDirtyLog<'a> {
    inner: &'a mut dyn DirtyLog,
    page: u64,
    vm: &'a KvmVm,
    /// Harvests so far: the driver's first one, right after `start`, precedes round 0.
    harvests: u32,
}

impl DirtyLog for LosingDirtyLog<'_> {
    fn start(&mut self) -> std::io::Result<()> {
        self.inner.start()
    }

    fn harvest(&mut self, block: usize, bitmap: &mut [u64]) -> std::io::Result<()> {
        self.harvests += 1;
        // The VM has one block: the second harvest is the first after round 0.
        if self.harvests == 2 {
            self.vm
                .wait_for_passes(&self.vm.progress(), 2, FAULT_WAIT)
                .map_err(std::io::Error::other)?;
        }
        self.inner.harvest(block, bitmap)?;
        if let Some(word) = bitmap.get_mut((self.page / 64) as usize) {
            *word &= !(1 << (self.page % 64));
        }
        Ok(())
    }

    fn stop(&mut self) -> std::io::Result<()> {
        self.inner.stop()
    }
}

/// Saves a live snapshot of the running `vm` into the file `path`: the precopy driver
/// rewrites the pages the guest dirties in place, stops the vCPUs for the last round and
/// the device state, and the guest then runs on here.
pub fn snapshot(
    vm: &KvmVm,
    path: &Path,
    config: &SnapshotConfig,
    precopy: &PrecopyConfig,
    progress: &mut dyn FnMut(&PrecopyProgress),
) -> Result<PrecopyStats, Error> {
    let writer = SnapshotWriter::create(path, config, vm.memory(), vm.save_devices())?;
    let mut dirty = vm.dirty_log(KvmDirtyLogMode::default())?;
    let mut control = vm.control();
    let stats = Precopy::new(precopy.clone()).run(writer, &mut dirty, &mut control, progress)?;
    vm.resume();
    Ok(stats)
}

/// Restores a snapshot from `path` into `vm`, a fresh [`KvmVm::incoming`] with the
/// snapshot's memory size, vCPUs and frame buffer, then resumes the guest where it
/// stopped.
pub fn restore(vm: &KvmVm, path: &Path) -> Result<MigrationStats, Error> {
    let snapshot = Snapshot::open(path)?;
    let mut config = RestoreConfig::default();
    // An incoming VM's memfd is new: only zeros.
    config.memory_zeroed = true;
    let stats = snapshot.restore(&config, &vm.memory(), vm.load_devices())?;
    vm.resume();
    Ok(stats)
}
