//! `multifd`: live migration of a virtual machine's memory over N parallel channels, in
//! the design of QEMU's multifd transport.
//!
//! A VMM hands the engine its guest RAM as named [`RamBlock`]s; the engine does the rest.
//!
//! ```no_run
//! use multifd::{Address, Destination, DestinationConfig, GuestMemory, Listener, RamBlock,
//!     Source, SourceConfig};
//! # fn source_memory() -> GuestMemory { unimplemented!() }
//! # fn map(blocks: &[multifd::BlockAnnouncement]) -> Result<GuestMemory, String> { unimplemented!() }
//! # fn main() -> Result<(), multifd::Error> {
//! // Destination host:
//! let listener = Listener::bind(&"tcp:0.0.0.0:4444".parse()?)?;
//! let destination = Destination::new(DestinationConfig::default());
//! let stats = destination.run(&listener, map)?;
//!
//! // Source host:
//! let config = SourceConfig { channels: 4, ..SourceConfig::default() };
//! let mut source = Source::connect(&"tcp:dest:4444".parse()?, &config, source_memory())?;
//! for block in 0..source.memory().blocks().len() {
//!     source.queue_block(block)?;
//! }
//! source.end_round()?;
//! let stats = source.complete()?;
//! # Ok(()) }
//! ```
//!
//! Devices with state implement [`SaveDevice`] on the source and [`LoadDevice`] on the
//! destination, registered with [`Source::connect_with_devices`] and
//! [`Destination::run_with_devices`]; after [`Source::switchover`] their state moves over
//! the same channels, concurrently with the final RAM round.
//!
//! Layout, one module per concept: [`transport`] (sockets, raw vectored I/O), `send`
//! (channel threads and the buffer swap), `recv` (receive threads, packet validation
//! against the announced blocks, the SYNC barrier), `ram` (guest memory), `device` (device traits, chunking,
//! reassembly, load threads), [`dirty`] (dirty-page tracking for live migration),
//! `zero_page`, `compress` (per-channel compressors and the
//! payload formats),
//! `migration` (handshake, rounds, completion), `stats`, and `failure`
//! (first-error-wins shutdown). Wire formats live in the `multifd-wire` crate.
#![deny(missing_docs)]

mod compress;
mod device;
pub mod dirty;
mod error;
mod failure;
mod migration;
mod ram;
mod recv;
mod send;
mod stats;
pub mod transport;
mod zero_page;

pub use compress::{
    CompressionSettings, PacketCompressor, PacketDecompressor, LZ4_BLOCK_LEN, ZSTD_WINDOW_LOG_MAX,
};
pub use device::{
    DeviceError, DeviceId, LoadDevice, LoadDevices, SaveDevice, SaveDevices, StateWriter,
};
#[cfg(feature = "vm-memory")]
pub use dirty::{guest_memory_from_mmap, guest_memory_from_mmap_named, VmMemoryDirtyLog};
pub use dirty::{AtomicDirtyBitmap, DirtyLog, DirtyLogUnion};
#[cfg(feature = "kvm")]
pub use dirty::{KvmDirtyLog, KvmDirtyLogMode, KvmSlot};
pub use error::{Error, Link, Side, Uuid, Violation};
pub use failure::CancelHandle;
pub use migration::{
    Destination, DestinationConfig, Source, SourceConfig, DEFAULT_DEVICE_CHUNK_SIZE,
    DEFAULT_MAX_QUEUED_DEVICE_BYTES,
};
pub use multifd_wire::{BlockAnnouncement, Compression, RejectCode, RejectReason, ZeroPageMode};
pub use ram::{GuestMemory, RamBlock};
pub use stats::{ChannelStats, DeviceStats, MigrationStats, Monitor, Progress, ProgressWatcher};
pub use transport::{Address, Listener};
pub use zero_page::is_zero_page;
