//! One channel's decompressor for each method, fed a stream of hostile packets: each
//! packet is a payload size, an expected page count and the payload, as a receive thread
//! hands them over after its checks (size within the method's bound, pages within the
//! packet). Any result is fine but a panic; after an error the stream restarts, as the
//! raw-fallback extension does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd::bench_internals::PacketDecompressor;
use multifd::Compression;

const PAGE: usize = 4096;
/// Four pages a packet keeps each input cheap while crossing page and block boundaries.
const PACKET_PAGES: usize = 4;

fuzz_target!(|data: &[u8]| {
    for method in [Compression::Zlib, Compression::Zstd, Compression::Lz4] {
        let Ok(Some(mut decompressor)) = PacketDecompressor::new(method, PACKET_PAGES * PAGE)
        else {
            return;
        };
        let bound = method
            .max_payload((PACKET_PAGES * PAGE) as u64)
            .unwrap_or_default() as usize;
        let mut rest = data;
        let mut packet_num = 0;
        while rest.len() >= 3 {
            let size = (usize::from(u16::from_be_bytes([rest[0], rest[1]])) % (bound + 1))
                .min(rest.len() - 3);
            let pages = usize::from(rest[2]) % (PACKET_PAGES + 1);
            let payload = &rest[3..3 + size];
            rest = &rest[3 + size..];
            decompressor.input(size).copy_from_slice(payload);
            if let Ok(pages_out) = decompressor.inflate(packet_num, size, pages * PAGE) {
                assert_eq!(pages_out.len(), pages * PAGE);
            } else if decompressor.restart().is_err() {
                return;
            }
            packet_num += 1;
        }
    }
});
