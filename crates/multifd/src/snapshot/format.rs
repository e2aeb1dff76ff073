//! The snapshot file's layout, its encoder and its bounds-checked parser.
//!
//! # Format, version 1
//!
//! All integers are big-endian, as on the wire. The file has four areas, in this order:
//!
//! ```text
//! 0                      metadata: header, block table, device table, header CRC,
//!                        then one bitmap per block
//! (1 MiB aligned)        block 0's pages, page i at block offset + i × page size
//! (1 MiB aligned)        block 1's pages …
//! (1 MiB aligned)        device area: each device's state then config, back to back
//! ```
//!
//! The header, [`FIXED_LEN`] bytes:
//!
//! | field | size | meaning |
//! |---|---|---|
//! | magic | 8 | `MFDSNAP` and a newline ([`MAGIC`]) |
//! | version | u32 | [`VERSION`]; any other is refused |
//! | page_size | u32 | a power of two from 64 bytes to 1 GiB |
//! | block_count | u32 | entries in the block table |
//! | device_count | u32 | entries in the device table |
//! | metadata_len | u64 | bytes of the metadata area (header to the last bitmap's end) |
//! | file_len | u64 | the file's length when it was written |
//!
//! A block table entry, [`BLOCK_ENTRY_LEN`] bytes: name (256 bytes, NUL-terminated, as in
//! RAM packets), length u64 (a non-zero multiple of the page size), file_offset u64
//! (1 MiB aligned), bitmap_offset u64 (8-byte aligned, inside the metadata area),
//! bitmap_crc u32 (CRC32C of the bitmap's bytes).
//!
//! A device table entry, [`DEVICE_ENTRY_LEN`] bytes: idstr (256 bytes, NUL-terminated),
//! instance_id u32, offset u64, state_len u64, config_len u64, crc u32 (CRC32C of the
//! state and config bytes). The state is handed to [`LoadDevice::load_state`] in chunks,
//! then the config to [`LoadDevice::load_config`].
//!
//! After the tables, a u32 CRC32C of every byte before it (magic to the last table entry).
//!
//! A block's bitmap holds one bit per page, `ceil(pages / 64)` u64 words: bit `i % 64` of
//! word `i / 64` set means page `i` is in the file at its fixed offset; a clear bit is a
//! zero page, and its bytes in the file read as zeros: a hole (never written, or punched
//! out when a live save found a page that had turned to zeros), or with `O_DIRECT` an
//! unwritten preallocated extent. No bit past the block's last page may be set.
//!
//! No two areas overlap (metadata, bitmaps, blocks, device blobs), and every one lies
//! within `file_len`. The writer writes the metadata last, so a save that did not finish
//! leaves a file whose magic is zeros.
//!
//! [`LoadDevice::load_state`]: crate::LoadDevice::load_state
//! [`LoadDevice::load_config`]: crate::LoadDevice::load_config

use std::collections::HashSet;

use crate::error::SnapshotFault;
use crate::ids::DeviceId;
use crate::integrity::checksum;
use crate::ram::name_problem;

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"MFDSNAP\n";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the fixed header.
pub const FIXED_LEN: usize = 8 + 4 + 4 + 4 + 4 + 8 + 8;
/// Bytes of one block table entry.
pub const BLOCK_ENTRY_LEN: usize = NAME_LEN + 8 + 8 + 8 + 4;
/// Bytes of one device table entry.
pub const DEVICE_ENTRY_LEN: usize = NAME_LEN + 4 + 8 + 8 + 8 + 4;
/// Alignment of every block's pages and of the device area in the file: a block starts
/// on a boundary of any page size up to 1 MiB and of any `O_DIRECT` granularity, and a
/// private mapping of it needs no adjustment; at most 1 MiB of padding per block is
/// nothing next to a block of guest RAM (QEMU's mapped-ram aligns the same way).
pub const ALIGNMENT: u64 = 1 << 20;
/// The most metadata a reader accepts, in bytes: the bitmaps of 8 TiB of 4 KiB pages. The
/// reader holds the metadata in memory, so a header cannot make it allocate more.
pub const MAX_METADATA_LEN: u64 = 256 << 20;

const NAME_LEN: usize = multifd_wire::NAME_FIELD_LEN;
const CRC_LEN: usize = 4;

/// One RAM block as the file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    /// The block's name.
    pub name: String,
    /// The block's length in bytes.
    pub length: u64,
    /// Where its first page is in the file.
    pub file_offset: u64,
    /// Where its bitmap is in the file.
    pub bitmap_offset: u64,
    /// CRC32C of the bitmap's bytes.
    pub bitmap_crc: u32,
}

/// One device's saved state as the file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The device.
    pub id: DeviceId,
    /// Where its state starts in the file; the config follows the state.
    pub offset: u64,
    /// Bytes of state.
    pub state_len: u64,
    /// Bytes of the config blob.
    pub config_len: u64,
    /// CRC32C of the state and config bytes.
    pub crc: u32,
}

impl DeviceEntry {
    /// State and config bytes together.
    pub fn len(&self) -> u64 {
        self.state_len.saturating_add(self.config_len)
    }
}

/// A parsed and validated metadata area: the header's tables and every block's bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// The page size.
    pub page_size: u32,
    /// The metadata area's length.
    pub metadata_len: u64,
    /// The file's length when written.
    pub file_len: u64,
    /// The blocks, in file order.
    pub blocks: Vec<BlockEntry>,
    /// The devices, in save order.
    pub devices: Vec<DeviceEntry>,
    /// Per block, its bitmap of present pages.
    pub bitmaps: Vec<Vec<u64>>,
}

/// Bytes of the header with its tables and CRC, for these counts.
pub fn header_len(blocks: u64, devices: u64) -> u64 {
    FIXED_LEN as u64
        + blocks * BLOCK_ENTRY_LEN as u64
        + devices * DEVICE_ENTRY_LEN as u64
        + CRC_LEN as u64
}

/// `value` rounded up to a multiple of `alignment` (a power of two), `None` on overflow.
pub(crate) fn align_up(value: u64, alignment: u64) -> Option<u64> {
    Some(value.checked_add(alignment - 1)? & !(alignment - 1))
}

/// Where a writer puts everything but the device blobs, whose lengths it learns last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) metadata_len: u64,
    /// Per block: file offset and bitmap offset.
    pub(crate) blocks: Vec<(u64, u64)>,
    /// Where the device area starts.
    pub(crate) device_area: u64,
}

impl Plan {
    /// Lays out blocks of these lengths (whole pages of `page_size`) and `devices` devices.
    pub(crate) fn new(page_size: u32, lengths: &[u64], devices: usize) -> Option<Self> {
        let mut next_bitmap = align_up(header_len(lengths.len() as u64, devices as u64), 8)?;
        let mut bitmap_offsets = Vec::with_capacity(lengths.len());
        for &length in lengths {
            bitmap_offsets.push(next_bitmap);
            let words = (length / u64::from(page_size)).div_ceil(64);
            next_bitmap = next_bitmap.checked_add(words.checked_mul(8)?)?;
        }
        let metadata_len = next_bitmap;
        let mut next_block = align_up(metadata_len, ALIGNMENT)?;
        let mut blocks = Vec::with_capacity(lengths.len());
        for (&length, bitmap) in lengths.iter().zip(bitmap_offsets) {
            blocks.push((next_block, bitmap));
            next_block = align_up(next_block.checked_add(length)?, ALIGNMENT)?;
        }
        Some(Self {
            metadata_len,
            blocks,
            device_area: next_block,
        })
    }
}

impl Metadata {
    /// The metadata area's bytes: header, tables, header CRC, bitmaps at their offsets.
    /// The entries' CRCs are computed here from the bitmaps.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.metadata_len as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.page_size.to_be_bytes());
        out.extend_from_slice(&(self.blocks.len() as u32).to_be_bytes());
        out.extend_from_slice(&(self.devices.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.metadata_len.to_be_bytes());
        out.extend_from_slice(&self.file_len.to_be_bytes());
        let bitmap_bytes: Vec<Vec<u8>> = self
            .bitmaps
            .iter()
            .map(|bitmap| bitmap.iter().flat_map(|word| word.to_be_bytes()).collect())
            .collect();
        for (block, bytes) in self.blocks.iter().zip(&bitmap_bytes) {
            put_name(&mut out, &block.name);
            out.extend_from_slice(&block.length.to_be_bytes());
            out.extend_from_slice(&block.file_offset.to_be_bytes());
            out.extend_from_slice(&block.bitmap_offset.to_be_bytes());
            out.extend_from_slice(&checksum(&[bytes]).to_be_bytes());
        }
        for device in &self.devices {
            put_name(&mut out, &device.id.idstr);
            out.extend_from_slice(&device.id.instance_id.to_be_bytes());
            out.extend_from_slice(&device.offset.to_be_bytes());
            out.extend_from_slice(&device.state_len.to_be_bytes());
            out.extend_from_slice(&device.config_len.to_be_bytes());
            out.extend_from_slice(&device.crc.to_be_bytes());
        }
        let crc = checksum(&[&out]);
        out.extend_from_slice(&crc.to_be_bytes());
        for (block, bytes) in self.blocks.iter().zip(&bitmap_bytes) {
            out.resize(block.bitmap_offset as usize, 0);
            out.extend_from_slice(bytes);
        }
        out.resize(self.metadata_len as usize, 0);
        out
    }

    /// Parses the metadata area `bytes` (at least the fixed header; the whole area is
    /// [`metadata_len`] bytes) of a file of `actual_len` bytes, checking every field,
    /// every CRC and that no area overlaps another or passes the file's end.
    pub fn parse(bytes: &[u8], actual_len: u64) -> Result<Self, SnapshotFault> {
        let fixed = Fixed::parse(bytes, actual_len)?;
        if (bytes.len() as u64) < fixed.metadata_len {
            return Err(truncated(
                "metadata",
                fixed.metadata_len,
                bytes.len() as u64,
            ));
        }
        let header_len = header_len(fixed.block_count.into(), fixed.device_count.into());
        if header_len > fixed.metadata_len {
            return Err(SnapshotFault::InvalidField {
                field: "metadata_len".into(),
                value: fixed.metadata_len,
                reason: "shorter than the header with its tables",
            });
        }
        let header_len = header_len as usize;
        let crc_at = header_len - CRC_LEN;
        let mut stored = [0u8; CRC_LEN];
        stored.copy_from_slice(&bytes[crc_at..header_len]);
        let stored = u32::from_be_bytes(stored);
        let computed = checksum(&[&bytes[..crc_at]]);
        if stored != computed {
            return Err(SnapshotFault::ChecksumMismatch {
                what: "header".into(),
                stored,
                computed,
            });
        }
        let mut reader = Reader::new("header tables", &bytes[..crc_at], FIXED_LEN);
        let mut blocks = Vec::with_capacity(fixed.block_count as usize);
        for index in 0..fixed.block_count {
            blocks.push(parse_block(&mut reader, index, &fixed)?);
        }
        let mut devices = Vec::with_capacity(fixed.device_count as usize);
        for index in 0..fixed.device_count {
            devices.push(parse_device(&mut reader, index, fixed.file_len)?);
        }
        // Inside the metadata area: the header and the bitmaps. In the file: the
        // metadata area, the blocks and the device blobs.
        let mut inner = vec![Extent::new("header".into(), 0, header_len as u64)];
        let mut extents = vec![Extent::new("metadata".into(), 0, fixed.metadata_len)];
        let mut bitmaps = Vec::with_capacity(blocks.len());
        let mut names = HashSet::new();
        for block in &blocks {
            if !names.insert(block.name.as_str()) {
                return Err(SnapshotFault::BadName {
                    field: format!("block {:?} name", block.name),
                    reason: "given twice",
                });
            }
            let (bitmap, extent) = parse_bitmap(bytes, block, &fixed)?;
            bitmaps.push(bitmap);
            inner.push(extent);
            extents.push(Extent::new(
                format!("block {:?}", block.name),
                block.file_offset,
                block.file_offset + block.length,
            ));
        }
        let mut ids = HashSet::new();
        for device in &devices {
            if !ids.insert(&device.id) {
                return Err(SnapshotFault::BadName {
                    field: format!("device {}", device.id),
                    reason: "given twice",
                });
            }
            extents.push(Extent::new(
                format!("device {}", device.id),
                device.offset,
                device.offset + device.len(),
            ));
        }
        check_overlaps(inner)?;
        check_overlaps(extents)?;
        Ok(Self {
            page_size: fixed.page_size,
            metadata_len: fixed.metadata_len,
            file_len: fixed.file_len,
            blocks,
            devices,
            bitmaps,
        })
    }
}

/// The fixed header's fields, checked.
struct Fixed {
    page_size: u32,
    block_count: u32,
    device_count: u32,
    metadata_len: u64,
    file_len: u64,
}

impl Fixed {
    fn parse(bytes: &[u8], actual_len: u64) -> Result<Self, SnapshotFault> {
        if actual_len < FIXED_LEN as u64 {
            return Err(truncated("header", FIXED_LEN as u64, actual_len));
        }
        let mut reader = Reader::new("header", bytes, 0);
        let magic: [u8; 8] = reader.array()?;
        if magic != MAGIC {
            return Err(SnapshotFault::BadMagic { found: magic });
        }
        let version = reader.u32()?;
        if version != VERSION {
            return Err(SnapshotFault::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let page_size = reader.u32()?;
        if !page_size.is_power_of_two() || !(64..=1 << 30).contains(&page_size) {
            return Err(SnapshotFault::InvalidField {
                field: "page_size".into(),
                value: page_size.into(),
                reason: "not a power of two from 64 bytes to 1 GiB",
            });
        }
        let block_count = reader.u32()?;
        let device_count = reader.u32()?;
        let metadata_len = reader.u64()?;
        let file_len = reader.u64()?;
        if metadata_len > MAX_METADATA_LEN {
            return Err(SnapshotFault::InvalidField {
                field: "metadata_len".into(),
                value: metadata_len,
                reason: "above the 256 MiB a reader accepts",
            });
        }
        if file_len > actual_len {
            return Err(truncated(
                "file (header field file_len)",
                file_len,
                actual_len,
            ));
        }
        if metadata_len > file_len {
            return Err(SnapshotFault::InvalidField {
                field: "metadata_len".into(),
                value: metadata_len,
                reason: "past the file_len",
            });
        }
        Ok(Self {
            page_size,
            block_count,
            device_count,
            metadata_len,
            file_len,
        })
    }
}

/// The length of the metadata area as the fixed header at the start of `bytes` states it,
/// after checking the magic and version; the caller then reads that much.
pub fn metadata_len(bytes: &[u8], actual_len: u64) -> Result<u64, SnapshotFault> {
    Fixed::parse(bytes, actual_len).map(|fixed| fixed.metadata_len)
}

fn parse_block(
    reader: &mut Reader<'_>,
    index: u32,
    fixed: &Fixed,
) -> Result<BlockEntry, SnapshotFault> {
    let name = reader.name(&format!("block[{index}] name"))?;
    let field = |what: &str| format!("block {name:?} {what}");
    let length = reader.u64()?;
    let file_offset = reader.u64()?;
    let bitmap_offset = reader.u64()?;
    let bitmap_crc = reader.u32()?;
    let invalid = |what: &str, value: u64, reason: &'static str| SnapshotFault::InvalidField {
        field: field(what),
        value,
        reason,
    };
    if length == 0 || length % u64::from(fixed.page_size) != 0 {
        return Err(invalid(
            "length",
            length,
            "not a non-zero multiple of the page size",
        ));
    }
    if file_offset % ALIGNMENT != 0 {
        return Err(invalid("file_offset", file_offset, "not 1 MiB aligned"));
    }
    match file_offset.checked_add(length) {
        Some(end) if end <= fixed.file_len => {}
        _ => {
            return Err(invalid(
                "file_offset",
                file_offset,
                "the block does not fit in the file (past file_len)",
            ))
        }
    }
    if bitmap_offset % 8 != 0 {
        return Err(invalid(
            "bitmap_offset",
            bitmap_offset,
            "not 8-byte aligned",
        ));
    }
    Ok(BlockEntry {
        name,
        length,
        file_offset,
        bitmap_offset,
        bitmap_crc,
    })
}

fn parse_device(
    reader: &mut Reader<'_>,
    index: u32,
    file_len: u64,
) -> Result<DeviceEntry, SnapshotFault> {
    let idstr = reader.name(&format!("device[{index}] idstr"))?;
    let instance_id = reader.u32()?;
    let id = DeviceId::new(idstr, instance_id);
    let offset = reader.u64()?;
    let state_len = reader.u64()?;
    let config_len = reader.u64()?;
    let crc = reader.u32()?;
    let end = offset
        .checked_add(state_len)
        .and_then(|end| end.checked_add(config_len));
    match end {
        Some(end) if end <= file_len => {}
        _ => {
            return Err(SnapshotFault::InvalidField {
                field: format!("device {id} offset"),
                value: offset,
                reason: "state and config do not fit in the file (past file_len)",
            })
        }
    }
    Ok(DeviceEntry {
        id,
        offset,
        state_len,
        config_len,
        crc,
    })
}

/// A block's bitmap, checked against its CRC and its block's page count, and the extent
/// it covers.
fn parse_bitmap(
    bytes: &[u8],
    block: &BlockEntry,
    fixed: &Fixed,
) -> Result<(Vec<u64>, Extent), SnapshotFault> {
    let pages = block.length / u64::from(fixed.page_size);
    let words = pages.div_ceil(64);
    let start = block.bitmap_offset;
    let end = start
        .checked_add(words * 8)
        .filter(|&end| end <= fixed.metadata_len);
    let Some(end) = end else {
        return Err(SnapshotFault::InvalidField {
            field: format!("block {:?} bitmap_offset", block.name),
            value: start,
            reason: "the bitmap does not fit in the metadata area",
        });
    };
    // Within the metadata area, which is within `bytes` (checked by the caller).
    let raw = &bytes[start as usize..end as usize];
    let computed = checksum(&[raw]);
    if computed != block.bitmap_crc {
        return Err(SnapshotFault::ChecksumMismatch {
            what: format!("block {:?} bitmap", block.name),
            stored: block.bitmap_crc,
            computed,
        });
    }
    let bitmap: Vec<u64> = raw
        .chunks_exact(8)
        .map(|word| {
            let mut array = [0u8; 8];
            array.copy_from_slice(word);
            u64::from_be_bytes(array)
        })
        .collect();
    let tail = pages % 64;
    if let Some(&last) = bitmap.last() {
        if tail != 0 && last >> tail != 0 {
            let page = (words - 1) * 64 + tail + u64::from((last >> tail).trailing_zeros());
            return Err(SnapshotFault::BitPastEnd {
                block: block.name.clone(),
                page,
                pages,
            });
        }
    }
    let extent = Extent::new(format!("block {:?} bitmap", block.name), start, end);
    Ok((bitmap, extent))
}

/// A named byte range of the file.
struct Extent {
    name: String,
    start: u64,
    end: u64,
}

impl Extent {
    fn new(name: String, start: u64, end: u64) -> Self {
        Self { name, start, end }
    }
}

/// Fails on the first two non-empty extents that share a byte.
fn check_overlaps(mut extents: Vec<Extent>) -> Result<(), SnapshotFault> {
    extents.retain(|extent| extent.end > extent.start);
    extents.sort_by_key(|extent| (extent.start, extent.end));
    for pair in extents.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(SnapshotFault::Overlap {
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}

fn truncated(what: &str, needed: u64, available: u64) -> SnapshotFault {
    SnapshotFault::Truncated {
        what: what.into(),
        needed,
        available,
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    // Names were checked at setup (`name_problem`): shorter than the field, no NUL.
    out.extend_from_slice(name.as_bytes());
    out.resize(out.len() + NAME_LEN - name.len(), 0);
}

/// A cursor over metadata bytes; every read checks the bytes are there.
struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, bytes: &'a [u8], position: usize) -> Self {
        Self {
            what,
            bytes,
            position,
        }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], SnapshotFault> {
        let end = self.position + count;
        let taken = self
            .bytes
            .get(self.position..end)
            .ok_or_else(|| truncated(self.what, end as u64, self.bytes.len() as u64))?;
        self.position = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotFault> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u32(&mut self) -> Result<u32, SnapshotFault> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, SnapshotFault> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A 256-byte NUL-terminated name field, checked as the engine checks names.
    fn name(&mut self, field: &str) -> Result<String, SnapshotFault> {
        let raw = self.take(NAME_LEN)?;
        let bad = |reason| SnapshotFault::BadName {
            field: field.into(),
            reason,
        };
        let end = raw
            .iter()
            .position(|&byte| byte == 0)
            .ok_or_else(|| bad("not NUL-terminated"))?;
        let name = std::str::from_utf8(&raw[..end]).map_err(|_| bad("not UTF-8"))?;
        if let Some(problem) = name_problem(name) {
            return Err(bad(problem));
        }
        Ok(name.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        let plan = Plan::new(4096, &[8 << 20, 130 * 4096], 1).expect("plan");
        let blocks = [("ram", 8u64 << 20), ("rom", 130 * 4096)]
            .iter()
            .zip(&plan.blocks)
            .map(
                |(&(name, length), &(file_offset, bitmap_offset))| BlockEntry {
                    name: name.into(),
                    length,
                    file_offset,
                    bitmap_offset,
                    bitmap_crc: 0,
                },
            )
            .collect();
        let mut bitmaps = vec![vec![0u64; 32], vec![0u64; 3]];
        bitmaps[0][3] = 0xf0f0;
        bitmaps[1][2] = 0b11;
        let device = DeviceEntry {
            id: DeviceId::new("vga", 1),
            offset: plan.device_area,
            state_len: 10,
            config_len: 4,
            crc: 7,
        };
        let mut metadata = Metadata {
            page_size: 4096,
            metadata_len: plan.metadata_len,
            file_len: plan.device_area + 14,
            blocks,
            devices: vec![device],
            bitmaps,
        };
        // The CRCs `encode` computes, so the sample compares equal after a parse.
        for (block, bitmap) in metadata.blocks.iter_mut().zip(&metadata.bitmaps) {
            let bytes: Vec<u8> = bitmap.iter().flat_map(|word| word.to_be_bytes()).collect();
            block.bitmap_crc = checksum(&[&bytes]);
        }
        metadata
    }

    #[test]
    fn encodes_and_parses_back() {
        let metadata = sample();
        let bytes = metadata.encode();
        assert_eq!(bytes.len() as u64, metadata.metadata_len);
        assert_eq!(
            metadata_len(&bytes, metadata.file_len),
            Ok(metadata.metadata_len)
        );
        assert_eq!(Metadata::parse(&bytes, metadata.file_len), Ok(metadata));
    }

    #[test]
    fn a_bit_past_the_last_page_is_refused() {
        let mut metadata = sample();
        metadata.bitmaps[1][2] = 1 << 2;
        let bytes = metadata.encode();
        assert_eq!(
            Metadata::parse(&bytes, metadata.file_len),
            Err(SnapshotFault::BitPastEnd {
                block: "rom".into(),
                page: 130,
                pages: 130
            })
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let metadata = sample();
        let bytes = metadata.encode();
        for length in 0..bytes.len() {
            assert!(Metadata::parse(&bytes[..length], metadata.file_len).is_err());
        }
    }
}
