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
//! Layout, one module per concept: [`transport`] (sockets, raw vectored I/O), `send`
//! (channel threads and the buffer swap), `recv` (receive threads, packet validation
//! against the announced blocks, the SYNC barrier), `ram` (guest memory), `zero_page`,
//! `migration` (handshake, rounds, completion), `stats`, and `failure`
//! (first-error-wins shutdown). Wire formats live in the `multifd-wire` crate.
#![deny(missing_docs)]

mod error;
mod failure;
mod migration;
mod ram;
mod recv;
mod send;
mod stats;
pub mod transport;
mod zero_page;

pub use error::{Error, Link, Side, Uuid, Violation};
pub use failure::CancelHandle;
pub use migration::{Destination, DestinationConfig, Source, SourceConfig};
pub use multifd_wire::{BlockAnnouncement, RejectCode, RejectReason, ZeroPageMode};
pub use ram::{GuestMemory, RamBlock};
pub use stats::{ChannelStats, MigrationStats, Monitor, Progress, ProgressWatcher};
pub use transport::{Address, Listener};
