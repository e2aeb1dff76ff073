//! The RAM packet: which pages of which RAM block follow, and how many payload bytes.
//!
//! Layout (QEMU's `MultiFDPacket_t`, big-endian, packed): header (12); `pages_alloc` u32;
//! `normal_pages` u32; `next_packet_size` u32; `packet_num` u64; `zero_pages` u32; 4 + 24
//! reserved bytes; RAM block name [256]; then `pages_alloc` u64 offsets, normal pages
//! first, then zero pages, unused entries zero.

use crate::codec::{put_name_field, put_u32, put_u64, Reader};
use crate::{Compression, Flags, PacketHeader, WireError, NAME_FIELD_LEN};

/// Length of a RAM packet before its offset table.
pub const RAM_PACKET_FIXED_LEN: usize = 12 + 4 + 4 + 4 + 8 + 4 + 4 + 24 + NAME_FIELD_LEN;

/// What the destination negotiated, against which RAM packets are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLimits {
    /// The most offsets a packet may carry (packet size / page size).
    pub max_pages: u32,
    /// The page size; every offset must be a multiple of it.
    pub page_size: u32,
    /// The negotiated compression method.
    pub compression: Compression,
    /// Negotiated extension flag bits (those from [`Flags::FIRST_EXTENSION`] up).
    pub extensions: u32,
}

impl RamLimits {
    fn check_payload(&self, flags: Flags, normal_pages: u32, size: u32) -> Result<(), WireError> {
        let raw = u64::from(normal_pages) * u64::from(self.page_size);
        // No pages, no payload, whatever the method: bytes after such a packet would be
        // read as the next packet.
        if normal_pages == 0 && size != 0 {
            return Err(WireError::PayloadSizeMismatch { size, expected: 0 });
        }
        let compression = if flags.is_uncompressed() {
            Compression::None
        } else {
            self.compression
        };
        match compression.max_payload(raw) {
            None if u64::from(size) != raw => Err(WireError::PayloadSizeMismatch {
                size,
                expected: raw,
            }),
            Some(bound) if u64::from(size) > bound => Err(WireError::PayloadTooLarge {
                size,
                bound,
                normal_pages,
            }),
            _ => Ok(()),
        }
    }
}

/// The fields a sender chooses for one RAM packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamPacketFields<'a> {
    /// Flags, including the compression value.
    pub flags: Flags,
    /// Offsets in the table (the negotiated pages per packet).
    pub pages_alloc: u32,
    /// Payload bytes that follow the packet.
    pub next_packet_size: u32,
    /// Sequence number across all channels.
    pub packet_num: u64,
    /// The RAM block the offsets belong to.
    pub ramblock: &'a str,
    /// Offsets of the pages whose contents follow.
    pub normal: &'a [u64],
    /// Offsets of pages that are all zero.
    pub zero: &'a [u64],
}

impl RamPacketFields<'_> {
    /// Appends the whole packet: the fixed part and all `pages_alloc` offsets.
    ///
    /// Refuses (before writing) a name that does not fit or more offsets than
    /// `pages_alloc`: both are the caller's bugs, not wire conditions.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let normal = u32::try_from(self.normal.len()).unwrap_or(u32::MAX);
        let zero = u32::try_from(self.zero.len()).unwrap_or(u32::MAX);
        if normal.saturating_add(zero) > self.pages_alloc {
            return Err(WireError::TooManyPages {
                normal,
                zero,
                pages_alloc: self.pages_alloc,
            });
        }
        let start = out.len();
        PacketHeader { flags: self.flags }.encode(out);
        put_u32(out, self.pages_alloc);
        put_u32(out, normal);
        put_u32(out, self.next_packet_size);
        put_u64(out, self.packet_num);
        put_u32(out, zero);
        out.resize(out.len() + 28, 0);
        if let Err(error) = put_name_field(out, "ramblock", self.ramblock) {
            out.truncate(start);
            return Err(error);
        }
        for &offset in self.normal.iter().chain(self.zero) {
            put_u64(out, offset);
        }
        out.resize(start + RamPacket::wire_len(self.pages_alloc), 0);
        Ok(())
    }
}

/// A decoded, validated RAM packet borrowing the received bytes.
///
/// Validation covers everything that needs only the negotiated limits: magic, version,
/// flags, compression, counts, alignment of every used offset and the payload size. The
/// block name and offsets-within-block are for the caller, who knows the blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamPacket<'a> {
    /// The flags word.
    pub flags: Flags,
    /// Offsets in the table.
    pub pages_alloc: u32,
    /// Payload bytes that follow the packet.
    pub next_packet_size: u32,
    /// Sequence number across all channels.
    pub packet_num: u64,
    /// The RAM block name (empty or stale on a SYNC packet).
    pub ramblock: &'a str,
    normal: &'a [u8],
    zero: &'a [u8],
}

impl<'a> RamPacket<'a> {
    /// Bytes on the wire of a packet with `pages_alloc` offsets.
    pub fn wire_len(pages_alloc: u32) -> usize {
        RAM_PACKET_FIXED_LEN + 8 * pages_alloc as usize
    }

    /// From the packet's first [`RAM_PACKET_FIXED_LEN`] bytes, the length of the whole
    /// packet, refusing a `pages_alloc` above the limit before anything is read for it.
    pub fn total_len(fixed: &[u8], limits: &RamLimits) -> Result<usize, WireError> {
        let mut reader = Reader::new("RAM packet", fixed);
        PacketHeader::read(&mut reader)?;
        let pages_alloc = reader.u32()?;
        if pages_alloc > limits.max_pages {
            return Err(WireError::PagesAllocTooLarge {
                pages_alloc,
                max: limits.max_pages,
            });
        }
        Ok(Self::wire_len(pages_alloc))
    }

    /// Decodes and validates a whole RAM packet.
    pub fn decode(bytes: &'a [u8], limits: &RamLimits) -> Result<Self, WireError> {
        let mut reader = Reader::new("RAM packet", bytes);
        let header = PacketHeader::read(&mut reader)?;
        let flags = header.flags;
        flags.check_allowed(Flags::SYNC | Flags::COMPRESSION_MASK, limits.extensions)?;
        let received = flags.compression()?;
        if received != limits.compression {
            return Err(WireError::CompressionMismatch {
                negotiated: limits.compression,
                received,
            });
        }
        let pages_alloc = reader.u32()?;
        if pages_alloc > limits.max_pages {
            return Err(WireError::PagesAllocTooLarge {
                pages_alloc,
                max: limits.max_pages,
            });
        }
        let normal_pages = reader.u32()?;
        let next_packet_size = reader.u32()?;
        let packet_num = reader.u64()?;
        let zero_pages = reader.u32()?;
        reader.take(28)?;
        let ramblock = reader.name_field("ramblock")?;
        if u64::from(normal_pages) + u64::from(zero_pages) > u64::from(pages_alloc) {
            return Err(WireError::TooManyPages {
                normal: normal_pages,
                zero: zero_pages,
                pages_alloc,
            });
        }
        if flags.is_sync() && (normal_pages != 0 || zero_pages != 0 || next_packet_size != 0) {
            return Err(WireError::SyncWithPages {
                pages: normal_pages + zero_pages,
                payload: next_packet_size,
            });
        }
        limits.check_payload(flags, normal_pages, next_packet_size)?;
        let table = reader.take(8 * pages_alloc as usize)?;
        reader.finish()?;
        let (normal, rest) = table.split_at(8 * normal_pages as usize);
        let zero = &rest[..8 * zero_pages as usize];
        let packet = Self {
            flags,
            pages_alloc,
            next_packet_size,
            packet_num,
            ramblock,
            normal,
            zero,
        };
        let page_size = u64::from(limits.page_size);
        if let Some(offset) = packet
            .normal_offsets()
            .chain(packet.zero_offsets())
            // `checked_rem`: a page size of 0 (never valid, but it came off the wire in the
            // control handshake) refuses every offset instead of dividing by zero.
            .find(|offset| offset.checked_rem(page_size) != Some(0))
        {
            return Err(WireError::MisalignedOffset {
                offset,
                page_size: limits.page_size,
            });
        }
        Ok(packet)
    }

    /// Number of pages whose contents follow.
    pub fn normal_pages(&self) -> u32 {
        (self.normal.len() / 8) as u32
    }

    /// Number of all-zero pages.
    pub fn zero_pages(&self) -> u32 {
        (self.zero.len() / 8) as u32
    }

    /// Offsets of the pages whose contents follow, in payload order.
    pub fn normal_offsets(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        offsets(self.normal)
    }

    /// Offsets of the all-zero pages.
    pub fn zero_offsets(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        offsets(self.zero)
    }
}

fn offsets(table: &[u8]) -> impl ExactSizeIterator<Item = u64> + '_ {
    table.chunks_exact(8).map(|entry| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(entry);
        u64::from_be_bytes(bytes)
    })
}
