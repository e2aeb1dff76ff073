//! The snapshot file's metadata parser: `snapshot_metadata_len` and
//! `SnapshotMetadata::parse` over hostile bytes, as if they were the start of a file of
//! several lengths. Whatever parses must re-encode to metadata that parses to the same
//! value, and every area it describes must lie within the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd::bench_internals::{snapshot_metadata_len, SnapshotMetadata};

fuzz_target!(|data: &[u8]| {
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
        let again = SnapshotMetadata::parse(&encoded, file_len).expect("re-encoded metadata parses");
        assert_eq!(again, metadata);
    }
});
