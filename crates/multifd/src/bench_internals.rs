//! Engine internals that benchmarks and fuzz targets drive directly: one channel's codec,
//! the zero-page check, the device-state reassembler and the snapshot metadata parser. Not part of the stable API; a VMM has no use for them (the
//! engine runs them inside its channel threads) and they may change in any release.
#![doc(hidden)]

pub use crate::compress::{
    PacketCompressor, PacketDecompressor, LZ4_BLOCK_LEN, ZSTD_WINDOW_LOG_MAX,
};
pub use crate::device::reassembler::{Missing, Reassembler, ReassemblyError};
pub use crate::snapshot::format::{
    header_len as snapshot_header_len, metadata_len as snapshot_metadata_len,
    Metadata as SnapshotMetadata, BLOCK_ENTRY_LEN as SNAPSHOT_BLOCK_ENTRY_LEN,
    FIXED_LEN as SNAPSHOT_FIXED_LEN,
};
pub use crate::zero_page::is_zero_page;
