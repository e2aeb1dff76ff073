//! Device-state chunk headers: `DeviceStateChunkHeader::decode`. Whatever decodes must
//! re-encode to the same 12 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd_wire::DeviceStateChunkHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = DeviceStateChunkHeader::decode(data) {
        let bytes = header.encode();
        assert_eq!(&bytes[..], data);
        assert_eq!(DeviceStateChunkHeader::decode(&bytes), Ok(header));
    }
});
