//! RAM packets: `PacketHeader::decode`, `RamPacket::total_len` and `RamPacket::decode`
//! under several negotiated limits. Whatever decodes must re-encode to a packet of the
//! same length that decodes to the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd_wire::{
    Compression, PacketHeader, RamLimits, RamPacket, RamPacketFields, PACKET_HEADER_LEN,
};

const LIMITS: [RamLimits; 6] = [
    // The spec's default: 4 KiB pages, 512 KiB packets.
    RamLimits {
        max_pages: 128,
        page_size: 4096,
        compression: Compression::None,
        extensions: 0,
    },
    // Small packets, zlib with the raw fallback extension.
    RamLimits {
        max_pages: 4,
        page_size: 4096,
        compression: Compression::Zlib,
        extensions: 0x200,
    },
    // lz4 (an extension bit of its own) with the raw fallback.
    RamLimits {
        max_pages: 128,
        page_size: 4096,
        compression: Compression::Lz4,
        extensions: 0x300,
    },
    // Every offset aligned, zstd, every extension.
    RamLimits {
        max_pages: 2,
        page_size: 1,
        compression: Compression::Zstd,
        extensions: u32::MAX,
    },
    // No limit on pages_alloc, huge pages.
    RamLimits {
        max_pages: u32::MAX,
        page_size: 2 << 20,
        compression: Compression::None,
        extensions: 0,
    },
    // A page size no handshake should accept.
    RamLimits {
        max_pages: 8,
        page_size: 0,
        compression: Compression::None,
        extensions: 0,
    },
];

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = PacketHeader::decode(data.get(..PACKET_HEADER_LEN).unwrap_or(data)) {
        let mut out = Vec::new();
        header.encode(&mut out);
        assert_eq!(PacketHeader::decode(&out), Ok(header));
    }
    for limits in &LIMITS {
        let total_len = RamPacket::total_len(data, limits);
        let Ok(packet) = RamPacket::decode(data, limits) else {
            continue;
        };
        assert_eq!(total_len, Ok(data.len()));
        assert!(packet.pages_alloc <= limits.max_pages);
        let normal: Vec<u64> = packet.normal_offsets().collect();
        let zero: Vec<u64> = packet.zero_offsets().collect();
        assert!(normal.len() + zero.len() <= packet.pages_alloc as usize);
        if packet.flags.is_uncompressed() || limits.compression == Compression::None {
            // A raw payload is exactly the normal pages.
            let raw = normal.len() as u64 * u64::from(limits.page_size);
            assert_eq!(u64::from(packet.next_packet_size), raw);
        }
        let fields = RamPacketFields {
            flags: packet.flags,
            pages_alloc: packet.pages_alloc,
            next_packet_size: packet.next_packet_size,
            packet_num: packet.packet_num,
            ramblock: packet.ramblock,
            normal: &normal,
            zero: &zero,
        };
        let mut out = Vec::new();
        fields
            .encode(&mut out)
            .expect("a decoded packet re-encodes");
        assert_eq!(out.len(), data.len());
        let again = RamPacket::decode(&out, limits).expect("a re-encoded packet decodes");
        assert_eq!(again, packet);
        assert_eq!(again.normal_offsets().collect::<Vec<_>>(), normal);
        assert_eq!(again.zero_offsets().collect::<Vec<_>>(), zero);
    }
});
