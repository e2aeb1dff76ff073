//! `multifd`: live migration of a virtual machine's memory and device state over N
//! parallel channels, in the design of QEMU's multifd transport and its device-state
//! extension.
//!
//! A VMM keeps its guest RAM and its devices; it lends them to the engine:
//!
//! - guest RAM as named [`RamBlock`]s gathered in a [`GuestMemory`] (a pointer and a
//!   length, or a mapped file; the engine never owns guest memory and never forms a Rust
//!   reference over it, so the guest may keep writing while pages move);
//! - devices with state as [`SaveDevice`]s on the source and [`LoadDevice`]s on the
//!   destination, named by a [`DeviceId`].
//!
//! The [`Source`] connects to a [`Destination`] listening on a [`Listener`], negotiates
//! every setting (a mismatch is an [`Error::Rejected`] on both ends, never a hang), and
//! opens the channels. The VMM then queues pages round by round, each round ending with a
//! barrier on every channel so a page re-sent in a later round always lands last. When the
//! VM is stopped, [`Source::switchover`] saves every device on its own thread through the
//! same channels, concurrently with the last RAM round; [`Source::complete`] returns only
//! after the destination confirmed it received and loaded everything. Until then the
//! source VM is intact: on any error the VMM simply resumes it.
//!
//! # A live migration, source side
//!
//! ```no_run
//! use multifd::{GuestMemory, SaveDevices, Source, SourceConfig};
//! # fn guest_memory() -> GuestMemory { unimplemented!() }
//! # fn devices() -> SaveDevices { unimplemented!() }
//! # fn harvest_dirty_log(block: usize) -> Vec<u64> { unimplemented!() }
//! # fn dirty_pages_left() -> u64 { unimplemented!() }
//! # fn stop_vcpus() {}
//! # fn main() -> Result<(), multifd::Error> {
//! let mut config = SourceConfig::default();
//! config.channels = 4;
//! let address = "tcp:dest-host:4444".parse()?;
//! let mut source = Source::connect_with_devices(&address, &config, guest_memory(), devices())?;
//!
//! // Round 0: every page, while the guest runs and dirties memory.
//! let blocks = source.memory().blocks().len();
//! for block in 0..blocks {
//!     source.queue_block(block)?;
//! }
//! source.end_round()?;
//! // Later rounds: what the guest dirtied meanwhile (bit i of the bitmap = page i).
//! while dirty_pages_left() > 1024 {
//!     for block in 0..blocks {
//!         source.queue_dirty_bitmap(block, &harvest_dirty_log(block))?;
//!     }
//!     source.end_round()?;
//! }
//! // Switchover: the VM is stopped; devices save on their own threads while the last
//! // dirty pages go out.
//! stop_vcpus();
//! source.switchover()?;
//! for block in 0..blocks {
//!     source.queue_dirty_bitmap(block, &harvest_dirty_log(block))?;
//! }
//! let stats = source.complete()?; // Ok only once the destination loaded everything
//! println!("{} bytes in {:?}", stats.bytes, stats.total_time);
//! # Ok(()) }
//! ```
//!
//! # The destination side
//!
//! ```no_run
//! use multifd::{BlockAnnouncement, Destination, DestinationConfig, GuestMemory, Listener,
//!     LoadDevices};
//! # fn map_guest_memory(blocks: &[BlockAnnouncement]) -> Result<GuestMemory, String> { unimplemented!() }
//! # fn devices() -> LoadDevices { unimplemented!() }
//! # fn main() -> Result<(), multifd::Error> {
//! let listener = Listener::bind(&"tcp:0.0.0.0:4444".parse()?)?;
//! let destination = Destination::new(DestinationConfig::default());
//! // The source announces its blocks; the VMM maps memory of the same names and lengths.
//! let stats = destination.run_with_devices(&listener, map_guest_memory, devices())?;
//! // Every page and every device is loaded: the VMM resumes the VM here.
//! # Ok(()) }
//! ```
//!
//! # A device
//!
//! A device writes its state as a byte stream of any length into a [`StateWriter`] (an
//! [`std::io::Write`] the engine cuts into chunks spread over the channels), then returns
//! a small config blob sent last. The destination gets the chunks strictly in order, then
//! the config:
//!
//! ```
//! use std::io::Write;
//! use multifd::{DeviceError, LoadDevice, SaveDevice, StateWriter};
//!
//! struct FrameBuffer {
//!     pixels: Vec<u8>,
//!     mode: u32,
//! }
//!
//! impl SaveDevice for FrameBuffer {
//!     fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
//!         state.write_all(&self.pixels)?;
//!         Ok(())
//!     }
//!
//!     fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
//!         Ok(self.mode.to_be_bytes().to_vec())
//!     }
//! }
//!
//! impl LoadDevice for FrameBuffer {
//!     fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
//!         self.pixels.extend_from_slice(chunk);
//!         Ok(())
//!     }
//!
//!     fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError> {
//!         let mode: [u8; 4] = config.try_into().map_err(|_| "config is not 4 bytes")?;
//!         self.mode = u32::from_be_bytes(mode);
//!         Ok(())
//!     }
//! }
//! ```
//!
//! # Snapshots
//!
//! A [`SnapshotWriter`] writes the VM to a file instead of a destination, with the same
//! round API, so the precopy driver takes it too ([`PrecopyTarget`]); a [`Snapshot`]
//! validates a file and restores it, in parallel or lazily:
//!
//! ```no_run
//! use multifd::{GuestMemory, LoadDevices, RestoreConfig, SaveDevices, Snapshot,
//!     SnapshotConfig, SnapshotWriter};
//! # fn guest_memory() -> GuestMemory { unimplemented!() }
//! # fn devices() -> SaveDevices { unimplemented!() }
//! # fn load_devices() -> LoadDevices { unimplemented!() }
//! # fn map_like(blocks: &[multifd::BlockAnnouncement]) -> GuestMemory { unimplemented!() }
//! # fn main() -> Result<(), multifd::Error> {
//! let mut config = SnapshotConfig::default();
//! config.threads = 4;
//! let mut writer = SnapshotWriter::create("vm.snap", &config, guest_memory(), devices())?;
//! for block in 0..writer.memory().blocks().len() {
//!     writer.queue_block(block)?; // zero pages stay holes in the file
//! }
//! writer.complete()?; // the devices, then the metadata, written last
//!
//! let snapshot = Snapshot::open("vm.snap")?; // every field and CRC checked here
//! let memory = map_like(&snapshot.blocks());
//! snapshot.restore(&RestoreConfig::default(), &memory, load_devices())?;
//! # Ok(()) }
//! ```
//!
//! Progress comes from a [`Monitor`] (a snapshot, or a periodic callback); a
//! [`CancelHandle`] stops either end from another thread; the result is a
//! [`MigrationStats`]. Every failure is one [`Error`] naming the side, the connection and
//! the cause. Packet layouts and their validation live in the `multifd-wire` crate.
#![deny(missing_docs)]

mod bandwidth;
pub mod bench_internals;
mod channel_roles;
mod compress;
mod device;
mod dirty;
mod error;
mod failure;
mod ids;
mod integrity;
mod local_memory;
mod migration;
mod precopy;
mod ram;
mod recv;
mod send;
mod snapshot;
mod stats;
mod sync;
mod tls;
mod transport;
mod zero_copy;
mod zero_page;

pub use compress::CompressionSettings;
pub use device::{DeviceError, LoadDevice, LoadDevices, SaveDevice, SaveDevices, StateWriter};
#[cfg(feature = "vm-memory")]
pub use dirty::{guest_memory_from_mmap, guest_memory_from_mmap_named, VmMemoryDirtyLog};
pub use dirty::{AtomicDirtyBitmap, DirtyLog, DirtyLogUnion};
#[cfg(feature = "kvm")]
pub use dirty::{KvmDirtyLog, KvmDirtyLogMode, KvmSlot};
pub use error::{Error, SnapshotFault, Violation};
pub use failure::CancelHandle;
pub use ids::{DeviceId, Link, Side, Uuid};
pub use integrity::Integrity;
pub use migration::{
    Destination, DestinationConfig, Source, SourceConfig, DEFAULT_DEVICE_CHUNK_SIZE,
    DEFAULT_MAX_GUEST_BYTES, DEFAULT_MAX_QUEUED_DEVICE_BYTES, DEFAULT_MAX_RECEIVE_BUFFER_BYTES,
};
pub use multifd_wire::{
    BlockAnnouncement, Compression, RejectCode, RejectReason, WireError, ZeroPageMode,
};
pub use precopy::{
    Phase, Precopy, PrecopyConfig, PrecopyProgress, PrecopyStats, PrecopyTarget, RoundStats,
    Throttle, TimeoutStrategy, VmControl, DEFAULT_DOWNTIME_LIMIT,
};
pub use ram::{GuestMemory, RamBlock};
pub use snapshot::{LazyRestore, RestoreConfig, Snapshot, SnapshotConfig, SnapshotWriter};
pub use stats::{ChannelStats, DeviceStats, MigrationStats, Monitor, Progress, ProgressWatcher};
pub use tls::TlsConfig;
pub use transport::{Address, Listener};
