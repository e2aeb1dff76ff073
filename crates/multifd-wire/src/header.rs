//! The 12-byte header every multifd packet starts with, and its flags.

use std::fmt;

use crate::codec::{put_u32, Reader};
use crate::{WireError, MULTIFD_MAGIC, MULTIFD_VERSION};

/// Length of [`PacketHeader`] on the wire.
pub const PACKET_HEADER_LEN: usize = 12;

/// The flags word of a packet header.
///
/// Bits 1..=5 hold an enumerated compression value, not independent flags; bits from
/// `0x100` up are this project's extensions and valid only where negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u32);

impl Flags {
    /// The packet ends a round: no pages, no payload.
    pub const SYNC: u32 = 0x01;
    /// The field that holds the compression value.
    pub const COMPRESSION_MASK: u32 = 0x3e;
    /// The packet carries device state, not pages.
    pub const DEVICE_STATE: u32 = 0x40;
    /// The first bit that belongs to this project's negotiated extensions.
    pub const FIRST_EXTENSION: u32 = 0x100;
    /// Extension: the payload is lz4-compressed ([`Compression::Lz4`]). The compression
    /// field stays 0 (QEMU has no lz4); valid only when negotiated in `Hello.extensions`.
    pub const LZ4: u32 = 0x100;
    /// Extension (raw fallback): this packet's payload is its pages uncompressed although
    /// a compression method was negotiated, because they did not shrink. The sender and
    /// the receiver both restart the channel's compression stream after such a packet.
    /// Valid only when negotiated in `Hello.extensions`.
    pub const UNCOMPRESSED: u32 = 0x200;
    /// Extension (integrity), negotiated in `Hello.extensions` only and never set in a
    /// packet: every packet on every channel is followed by a 4-byte big-endian CRC32C
    /// (Castagnoli) of the packet and its payload exactly as sent.
    pub const CRC32C: u32 = 0x400;
    /// Extension (local memory), negotiated in `Hello.extensions` only and never set in a
    /// packet: source and destination share a host, and the source hands its RAM blocks
    /// over as file descriptors on the Unix control connection instead of sending pages.
    pub const LOCAL_MEMORY: u32 = 0x800;
    /// Extension (round receipts), negotiated in `Hello.extensions` only and never set in
    /// a packet: the destination answers every `RoundEnd` with `RoundReceived` once the
    /// round is loaded.
    pub const ROUND_RECEIPTS: u32 = 0x1000;

    /// Whether the SYNC bit is set.
    pub fn is_sync(self) -> bool {
        self.0 & Self::SYNC != 0
    }

    /// Whether the DEVICE_STATE bit is set.
    pub fn is_device_state(self) -> bool {
        self.0 & Self::DEVICE_STATE != 0
    }

    /// Whether the UNCOMPRESSED (raw fallback) extension bit is set.
    pub fn is_uncompressed(self) -> bool {
        self.0 & Self::UNCOMPRESSED != 0
    }

    /// The compression method the flags announce: the compression field, or the lz4
    /// extension bit.
    pub fn compression(self) -> Result<Compression, WireError> {
        Compression::from_wire(self.0 & (Self::COMPRESSION_MASK | Self::LZ4))
    }

    /// Rejects bits outside `allowed` that are not negotiated `extensions`.
    pub(crate) fn check_allowed(self, allowed: u32, extensions: u32) -> Result<(), WireError> {
        let unknown = self.0 & !(allowed | (extensions & !(Self::FIRST_EXTENSION - 1)));
        if unknown != 0 {
            return Err(WireError::UnknownFlags {
                bits: unknown,
                flags: self.0,
            });
        }
        Ok(())
    }
}

/// A page compression method, as carried in the flags' compression field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Raw pages.
    #[default]
    None,
    /// zlib, one stream per channel.
    Zlib,
    /// zstd, one stream per channel.
    Zstd,
    /// lz4, this project's extension: independent blocks, no state across packets.
    Lz4,
}

impl Compression {
    /// Every method, in wire order.
    pub const ALL: [Self; 4] = [Self::None, Self::Zlib, Self::Zstd, Self::Lz4];

    /// The flag bits that announce the method: QEMU's value in the compression field, or
    /// for lz4 the [`Flags::LZ4`] extension bit (also its value in `Hello.compression`).
    pub fn to_wire(self) -> u32 {
        match self {
            Self::None => 0x00,
            Self::Zlib => 0x02,
            Self::Zstd => 0x04,
            Self::Lz4 => Flags::LZ4,
        }
    }

    /// The extension bits a migration with this method must negotiate.
    pub fn extension(self) -> u32 {
        match self {
            Self::Lz4 => Flags::LZ4,
            Self::None | Self::Zlib | Self::Zstd => 0,
        }
    }

    /// The largest payload a packet of `raw` page bytes may carry: `None` when the payload
    /// must be exactly `raw` bytes (no compression). For compressors the bound is the
    /// worst-case expansion of incompressible input (deflate stored blocks: 5 bytes per
    /// 64 KiB; zstd raw blocks: 3 bytes per 128 KiB; lz4: 1/255 plus 20 bytes per 60 KiB
    /// block) plus the per-packet flush marker and the stream header on a channel's first
    /// packet, rounded up generously.
    pub fn max_payload(self, raw: u64) -> Option<u64> {
        match self {
            Self::None => None,
            Self::Zlib | Self::Zstd | Self::Lz4 => Some(raw + raw / 64 + 1024),
        }
    }

    /// Parses the bits [`Compression::to_wire`] produces; QEMU's QPL, UADK and QATzip are
    /// recognised and refused.
    pub fn from_wire(value: u32) -> Result<Self, WireError> {
        match value {
            0x00 => Ok(Self::None),
            0x02 => Ok(Self::Zlib),
            0x04 => Ok(Self::Zstd),
            Flags::LZ4 => Ok(Self::Lz4),
            0x08 => Err(WireError::UnsupportedCompression("qpl")),
            0x10 => Err(WireError::UnsupportedCompression("uadk")),
            0x20 => Err(WireError::UnsupportedCompression("qatzip")),
            other => Err(WireError::UnknownCompression(other)),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::None => "none",
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
            Self::Lz4 => "lz4",
        })
    }
}

/// What a packet carries, from its header flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// A RAM packet (pages, or a SYNC): a [`crate::RamPacket`] follows.
    Ram,
    /// A device-state packet: a [`crate::DeviceStatePacket`] follows.
    DeviceState,
}

/// The common header: magic, version and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    /// The flags word, not yet checked against what was negotiated.
    pub flags: Flags,
}

impl PacketHeader {
    /// Decodes and checks magic and version.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut reader = Reader::new("packet header", bytes);
        let header = Self::read(&mut reader)?;
        reader.finish()?;
        Ok(header)
    }

    pub(crate) fn read(reader: &mut Reader<'_>) -> Result<Self, WireError> {
        reader.multifd_magic_and_version("packet header")?;
        Ok(Self {
            flags: Flags(reader.u32()?),
        })
    }

    /// What follows the header.
    pub fn kind(&self) -> PacketKind {
        if self.flags.is_device_state() {
            PacketKind::DeviceState
        } else {
            PacketKind::Ram
        }
    }

    /// Appends the 12 header bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, MULTIFD_MAGIC);
        put_u32(out, MULTIFD_VERSION);
        put_u32(out, self.flags.0);
    }
}
