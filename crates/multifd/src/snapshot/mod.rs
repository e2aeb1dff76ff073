//! Snapshots: the engine writing a VM's memory and device state to a file instead of to a
//! destination, and reading it back.
//!
//! The file follows the idea of QEMU's mapped-ram: every page of every block has a fixed
//! place in the file (the block's 1 MiB-aligned base plus the page's offset), a bitmap per
//! block says which pages are there, and zero pages are holes that are never written (the
//! layout is in [`format`]). Fixed places are what make the rest simple:
//!
//! - **Saving** ([`SnapshotWriter`]) needs no ordering between threads: N writer threads
//!   take jobs of pages, skip the zero ones, and `pwritev` each run of the others to its
//!   place, optionally with `O_DIRECT` straight from guest memory.
//! - **Live saving** needs no second engine: [`SnapshotWriter`] has the round API of a
//!   [`Source`](crate::Source) ([`PrecopyTarget`](crate::PrecopyTarget)), so the precopy
//!   driver ([`Precopy::run`](crate::Precopy::run)) drives it as it drives a migration.
//!   A page dirtied again is written again over its old copy, so the file never grows
//!   with the rounds.
//! - **Restoring** ([`Snapshot`]) validates all metadata first, then N threads `preadv`
//!   their share of the pages straight into guest memory; or, lazily, each block is
//!   mapped privately from the file and the guest can run at once, its pages faulted in
//!   from the page cache as it touches them (Firecracker's way).
//!
//! Device state goes into a device area after the blocks, each device's state and config
//! back to back with a CRC32C; the devices save through the same
//! [`SaveDevice`](crate::SaveDevice) and [`LoadDevice`](crate::LoadDevice) traits as in a
//! migration.

pub(crate) mod file_io;
pub mod format;
mod restore;
mod save;

pub use restore::{LazyRestore, RestoreConfig, Snapshot};
pub use save::{SnapshotConfig, SnapshotWriter};
