//! The snapshot file's metadata parser: `snapshot_metadata_len` and
//! `SnapshotMetadata::parse` over hostile bytes, as if they were the start of a file of
//! several lengths. Each input is parsed as it is, and again with its CRCs repaired (each
//! bitmap's CRC in its block entry, then the header's), so that the checks behind the CRCs
//! (tables, names, offsets, overlaps, bitmap bits) see the fuzzer's bytes too. Whatever
//! parses must re-encode to metadata that parses to the same value, and every area it
//! describes must lie within the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd::bench_internals::{
    snapshot_header_len, snapshot_metadata_len, SnapshotMetadata, SNAPSHOT_BLOCK_ENTRY_LEN,
    SNAPSHOT_FIXED_LEN,
};

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// `data` with every CRC it has room for set to the CRC of what it covers.
fn repaired(data: &[u8]) -> Option<Vec<u8>> {
    let mut bytes = data.to_vec();
    if bytes.len() < SNAPSHOT_FIXED_LEN {
        return None;
    }
    let page_size = u64::from(be_u32(&bytes, 12));
    let (blocks, devices) = (be_u32(&bytes, 16), be_u32(&bytes, 20));
    let header_len = usize::try_from(snapshot_header_len(blocks.into(), devices.into())).ok()?;
    if header_len > bytes.len() || page_size == 0 {
        return None;
    }
    for block in 0..blocks as usize {
        let entry = SNAPSHOT_FIXED_LEN + block * SNAPSHOT_BLOCK_ENTRY_LEN;
        let length = be_u64(&bytes, entry + 256);
        let bitmap = usize::try_from(be_u64(&bytes, entry + 272)).ok()?;
        let words = usize::try_from((length / page_size).div_ceil(64)).ok()?;
        if let Some(raw) = bytes.get(bitmap..bitmap.checked_add(words.checked_mul(8)?)?) {
            let crc = crc32c::crc32c(raw);
            bytes[entry + 280..entry + 284].copy_from_slice(&crc.to_be_bytes());
        }
    }
    let crc = crc32c::crc32c(&bytes[..header_len - 4]);
    bytes[header_len - 4..header_len].copy_from_slice(&crc.to_be_bytes());
    Some(bytes)
}

fn check(data: &[u8]) {
    let length = data.len() as u64;
    // The file as long as the input, longer (the pages after the metadata), or absurd.
    for file_len in [length, length + (64 << 20), u64::MAX] {
        let stated = snapshot_metadata_len(data, file_len);
        let Ok(metadata) = SnapshotMetadata::parse(data, file_len) else {
            continue;
        };
        assert_eq!(stated, Ok(metadata.metadata_len));
        assert!(metadata.metadata_len <= metadata.file_len && metadata.file_len <= file_len);
        for (block, bitmap) in metadata.blocks.iter().zip(&metadata.bitmaps) {
            assert!(block.file_offset + block.length <= metadata.file_len);
            let pages = block.length / u64::from(metadata.page_size);
            assert_eq!(bitmap.len() as u64, pages.div_ceil(64));
        }
        for device in &metadata.devices {
            assert!(device.offset + device.state_len + device.config_len <= metadata.file_len);
        }
        let encoded = metadata.encode();
        assert_eq!(encoded.len() as u64, metadata.metadata_len);
        let again =
            SnapshotMetadata::parse(&encoded, file_len).expect("re-encoded metadata parses");
        assert_eq!(again, metadata);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(repaired) = repaired(data) {
        check(&repaired);
    }
});
