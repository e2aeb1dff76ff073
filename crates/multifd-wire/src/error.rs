//! The one error type of this crate.

use crate::Compression;

/// Why bytes could not be decoded (or, for a few caller mistakes, encoded).
///
/// Every variant names the field and the offending value, so a destination can report
/// exactly what a hostile or broken source sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("{structure} truncated: needs {needed} bytes, got {available}")]
    Truncated {
        /// The structure being decoded.
        structure: &'static str,
        /// Bytes needed to continue.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// Bytes left over after a complete structure.
    #[error("{structure} has {count} trailing bytes")]
    TrailingBytes {
        /// The structure being decoded.
        structure: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// A magic number other than the expected one.
    #[error("{structure} magic {value:#010x}, expected {expected:#010x}")]
    BadMagic {
        /// The structure being decoded.
        structure: &'static str,
        /// The magic received.
        value: u32,
        /// The magic expected.
        expected: u32,
    },
    /// A version other than the supported one.
    #[error("{structure} version {value}, expected {expected}")]
    BadVersion {
        /// The structure being decoded.
        structure: &'static str,
        /// The version received.
        value: u32,
        /// The version supported.
        expected: u32,
    },
    /// Flag bits that are unknown, or extensions that were not negotiated.
    #[error("unknown or unnegotiated flags {bits:#x} in flags {flags:#x}")]
    UnknownFlags {
        /// The offending bits.
        bits: u32,
        /// The whole flags word.
        flags: u32,
    },
    /// A compression value QEMU defines but this implementation does not offer.
    #[error("unsupported compression method {0}")]
    UnsupportedCompression(&'static str),
    /// A compression value nobody defines.
    #[error("unknown compression value {0:#x}")]
    UnknownCompression(u32),
    /// A packet compressed with another method than the negotiated one.
    #[error("packet compression {received}, negotiated {negotiated}")]
    CompressionMismatch {
        /// The method the handshake agreed on.
        negotiated: Compression,
        /// The method the packet claims.
        received: Compression,
    },
    /// `pages_alloc` above the negotiated pages per packet.
    #[error("pages_alloc {pages_alloc} above the negotiated {max}")]
    PagesAllocTooLarge {
        /// The value received.
        pages_alloc: u32,
        /// The negotiated maximum.
        max: u32,
    },
    /// `normal_pages + zero_pages` above `pages_alloc`.
    #[error("normal_pages {normal} + zero_pages {zero} above pages_alloc {pages_alloc}")]
    TooManyPages {
        /// Normal pages claimed.
        normal: u32,
        /// Zero pages claimed.
        zero: u32,
        /// Offsets present in the packet.
        pages_alloc: u32,
    },
    /// A page offset that is not a multiple of the page size.
    #[error("offset {offset:#x} not aligned to page size {page_size}")]
    MisalignedOffset {
        /// The offset received.
        offset: u64,
        /// The negotiated page size.
        page_size: u32,
    },
    /// `next_packet_size` inconsistent with the pages the packet carries.
    #[error("next_packet_size {size}, expected {expected}")]
    PayloadSizeMismatch {
        /// The size received.
        size: u32,
        /// The only size allowed for this packet.
        expected: u64,
    },
    /// `next_packet_size` above what the compression method can produce for the pages.
    #[error("next_packet_size {size} above the bound {bound} for {normal_pages} pages")]
    PayloadTooLarge {
        /// The size received.
        size: u32,
        /// The largest size allowed.
        bound: u64,
        /// Normal pages in the packet.
        normal_pages: u32,
    },
    /// A SYNC packet that carries pages or payload.
    #[error("SYNC packet carries {pages} pages and {payload} payload bytes")]
    SyncWithPages {
        /// Pages claimed.
        pages: u32,
        /// Payload bytes claimed.
        payload: u32,
    },
    /// A name field without its NUL terminator.
    #[error("{field} is not NUL-terminated")]
    Unterminated {
        /// The field.
        field: &'static str,
    },
    /// A name that is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    NotUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A name too long for its field (an encoding error: the caller's input).
    #[error("{field} of {length} bytes does not fit its field")]
    NameTooLong {
        /// The field.
        field: &'static str,
        /// The name's length in bytes.
        length: usize,
    },
    /// A device-state packet without payload.
    #[error("device-state packet with empty payload")]
    EmptyDeviceState,
    /// A device-state packet with the SYNC flag.
    #[error("SYNC flag on a device-state packet")]
    SyncOnDeviceState,
    /// A device-state payload above the negotiated bound.
    #[error("device-state payload of {size} bytes above the bound {max}")]
    DeviceStateTooLarge {
        /// The size received.
        size: u32,
        /// The largest size allowed.
        max: u32,
    },
    /// A device-state payload too short for its chunk header.
    #[error("device-state payload of {size} bytes is shorter than its chunk header")]
    DeviceStateTooShort {
        /// The size received.
        size: u32,
    },
    /// A chunk header with a version other than 0.
    #[error("device-state chunk version {0}, expected 0")]
    ChunkVersion(u32),
    /// Unknown chunk header flags.
    #[error("unknown device-state chunk flags {0:#x}")]
    UnknownChunkFlags(u32),
    /// A control frame longer than the cap.
    #[error("control frame of {length} bytes above the cap {max}")]
    FrameTooLarge {
        /// The length received.
        length: u32,
        /// The cap.
        max: u32,
    },
    /// A control message type nobody defines.
    #[error("unknown control message type {0}")]
    UnknownMessageType(u32),
    /// A field holding a value outside its enumeration or range.
    #[error("{field} has invalid value {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value received.
        value: u64,
    },
}
