//! Every way the multifd-channel decoders refuse input (SPEC §5), with the exact error.

mod common;

use common::{DEFAULT_LIMITS, DEVICE_LIMITS};
use multifd_wire::{
    ChannelHello, Compression, DeviceStateChunkHeader, DeviceStateLimits, DeviceStatePacket, Flags,
    PacketHeader, RamLimits, RamPacket, RamPacketFields, WireError,
};

/// A RAM packet written field by field, so that tests can write what the encoder refuses.
#[derive(Clone)]
struct RawRam {
    magic: u32,
    version: u32,
    flags: u32,
    pages_alloc: u32,
    normal_pages: u32,
    next_packet_size: u32,
    packet_num: u64,
    zero_pages: u32,
    name: Vec<u8>,
    offsets: Vec<u64>,
}

impl RawRam {
    /// Two normal pages and one zero page of 4 KiB in a packet of 4 offsets.
    fn valid() -> Self {
        Self {
            magic: 0x1122_3344,
            version: 1,
            flags: 0,
            pages_alloc: 4,
            normal_pages: 2,
            next_packet_size: 8192,
            packet_num: 1,
            zero_pages: 1,
            name: b"pc.ram".to_vec(),
            offsets: vec![0x1000, 0x2000, 0x3000, 0],
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.magic.to_be_bytes()); // 0..4
        out.extend_from_slice(&self.version.to_be_bytes()); // 4..8
        out.extend_from_slice(&self.flags.to_be_bytes()); // 8..12
        out.extend_from_slice(&self.pages_alloc.to_be_bytes()); // 12..16
        out.extend_from_slice(&self.normal_pages.to_be_bytes()); // 16..20
        out.extend_from_slice(&self.next_packet_size.to_be_bytes()); // 20..24
        out.extend_from_slice(&self.packet_num.to_be_bytes()); // 24..32
        out.extend_from_slice(&self.zero_pages.to_be_bytes()); // 32..36
        out.extend_from_slice(&[0; 28]); // 36..64
        let mut name = self.name.clone();
        name.resize(256, 0);
        out.extend_from_slice(&name); // 64..320
        for offset in &self.offsets {
            out.extend_from_slice(&offset.to_be_bytes()); // 320..
        }
        out
    }
}

fn limits4() -> RamLimits {
    RamLimits {
        max_pages: 4,
        ..DEFAULT_LIMITS
    }
}

fn decode_ram(raw: &RawRam, limits: &RamLimits) -> Result<(), WireError> {
    RamPacket::decode(&raw.bytes(), limits).map(|_| ())
}

/// A device-state packet written field by field.
fn raw_device(flags: u32, idstr: &[u8], instance_id: u32, size: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]); // 0..8: magic, version
    out.extend_from_slice(&flags.to_be_bytes()); // 8..12
    let mut name = idstr.to_vec();
    name.resize(256, 0);
    out.extend_from_slice(&name); // 12..268
    out.extend_from_slice(&instance_id.to_be_bytes()); // 268..272
    out.extend_from_slice(&size.to_be_bytes()); // 272..276
    out
}

fn decode_device(bytes: &[u8], limits: &DeviceStateLimits) -> Result<(), WireError> {
    DeviceStatePacket::decode(bytes, limits).map(|_| ())
}

fn hello_bytes() -> Vec<u8> {
    ChannelHello {
        uuid: [5; 16],
        channel: 1,
    }
    .encode()
    .to_vec()
}

#[test]
fn valid_samples_decode() {
    decode_ram(&RawRam::valid(), &limits4()).unwrap();
    decode_device(&raw_device(0x40, b"dev", 0, 100), &DEVICE_LIMITS).unwrap();
    ChannelHello::decode(&hello_bytes()).unwrap();
}

// ---- truncation ----

#[test]
fn channel_hello_truncated() {
    let bytes = hello_bytes();
    for (length, needed) in [
        (0, 4),
        (3, 4),
        (4, 8),
        (10, 24),
        (24, 25),
        (25, 64),
        (63, 64),
    ] {
        assert_eq!(
            ChannelHello::decode(&bytes[..length]),
            Err(WireError::Truncated {
                structure: "channel hello",
                needed,
                available: length,
            }),
            "length {length}"
        );
    }
}

#[test]
fn packet_header_truncated() {
    let bytes = [0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 0, 0, 0, 0];
    for (length, needed) in [(0, 4), (5, 8), (8, 12), (11, 12)] {
        assert_eq!(
            PacketHeader::decode(&bytes[..length]),
            Err(WireError::Truncated {
                structure: "packet header",
                needed,
                available: length,
            })
        );
    }
}

#[test]
fn ram_packet_truncated() {
    let bytes = RawRam::valid().bytes();
    assert_eq!(bytes.len(), 352);
    // In the header, in the counts, in the packet number, in the reserved bytes, in the
    // name, in the offset table, one byte short.
    for (length, needed) in [
        (0, 4),
        (11, 12),
        (14, 16),
        (30, 32),
        (40, 64),
        (100, 320),
        (319, 320),
        (320, 352),
        (340, 352),
        (351, 352),
    ] {
        assert_eq!(
            RamPacket::decode(&bytes[..length], &limits4()),
            Err(WireError::Truncated {
                structure: "RAM packet",
                needed,
                available: length,
            }),
            "length {length}"
        );
    }
}

#[test]
fn ram_packet_total_len_truncated() {
    let bytes = RawRam::valid().bytes();
    for (length, needed) in [(0, 4), (12, 16), (15, 16)] {
        assert_eq!(
            RamPacket::total_len(&bytes[..length], &limits4()),
            Err(WireError::Truncated {
                structure: "RAM packet",
                needed,
                available: length,
            })
        );
    }
    assert_eq!(RamPacket::total_len(&bytes[..16], &limits4()), Ok(352));
}

#[test]
fn device_state_packet_truncated() {
    let bytes = raw_device(0x40, b"dev", 1, 100);
    for (length, needed) in [
        (0, 4),
        (10, 12),
        (12, 268),
        (267, 268),
        (270, 272),
        (275, 276),
    ] {
        assert_eq!(
            DeviceStatePacket::decode(&bytes[..length], &DEVICE_LIMITS),
            Err(WireError::Truncated {
                structure: "device-state packet",
                needed,
                available: length,
            }),
            "length {length}"
        );
    }
}

#[test]
fn chunk_header_truncated() {
    let bytes = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
    for (length, needed) in [(0, 4), (4, 8), (7, 8), (11, 12)] {
        assert_eq!(
            DeviceStateChunkHeader::decode(&bytes[..length]),
            Err(WireError::Truncated {
                structure: "device-state chunk header",
                needed,
                available: length,
            })
        );
    }
}

// ---- trailing bytes ----

#[test]
fn trailing_bytes() {
    let mut hello = hello_bytes();
    hello.push(0);
    assert_eq!(
        ChannelHello::decode(&hello),
        Err(WireError::TrailingBytes {
            structure: "channel hello",
            count: 1,
        })
    );

    assert_eq!(
        PacketHeader::decode(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 0, 0, 0, 0, 9, 9]),
        Err(WireError::TrailingBytes {
            structure: "packet header",
            count: 2,
        })
    );

    let mut ram = RawRam::valid().bytes();
    ram.extend_from_slice(&[0; 3]);
    assert_eq!(
        RamPacket::decode(&ram, &limits4()),
        Err(WireError::TrailingBytes {
            structure: "RAM packet",
            count: 3,
        })
    );
    // An extra offset the count does not cover is trailing, not part of the table.
    let mut raw = RawRam::valid();
    raw.offsets.push(0);
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::TrailingBytes {
            structure: "RAM packet",
            count: 8,
        })
    );

    let mut device = raw_device(0x40, b"dev", 1, 100);
    device.push(0);
    assert_eq!(
        DeviceStatePacket::decode(&device, &DEVICE_LIMITS),
        Err(WireError::TrailingBytes {
            structure: "device-state packet",
            count: 1,
        })
    );

    assert_eq!(
        DeviceStateChunkHeader::decode(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
        Err(WireError::TrailingBytes {
            structure: "device-state chunk header",
            count: 2,
        })
    );
}

// ---- magic and version ----

#[test]
fn bad_magic() {
    let mut hello = hello_bytes();
    hello[0] = 0x12;
    assert_eq!(
        ChannelHello::decode(&hello),
        Err(WireError::BadMagic {
            structure: "channel hello",
            value: 0x1222_3344,
            expected: 0x1122_3344,
        })
    );
    // The control channel's magic is not a multifd channel's.
    let mut hello = hello_bytes();
    hello[..4].copy_from_slice(b"MFDC");
    assert_eq!(
        ChannelHello::decode(&hello),
        Err(WireError::BadMagic {
            structure: "channel hello",
            value: 0x4d46_4443,
            expected: 0x1122_3344,
        })
    );
    // Little-endian magic, as a wrong-endian peer would send.
    assert_eq!(
        PacketHeader::decode(&[0x44, 0x33, 0x22, 0x11, 0, 0, 0, 1, 0, 0, 0, 0]),
        Err(WireError::BadMagic {
            structure: "packet header",
            value: 0x4433_2211,
            expected: 0x1122_3344,
        })
    );
    let mut raw = RawRam::valid();
    raw.magic = 0;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::BadMagic {
            structure: "packet header",
            value: 0,
            expected: 0x1122_3344,
        })
    );
    assert_eq!(
        RamPacket::total_len(&raw.bytes(), &limits4()),
        Err(WireError::BadMagic {
            structure: "packet header",
            value: 0,
            expected: 0x1122_3344,
        })
    );
    let mut device = raw_device(0x40, b"dev", 1, 100);
    device[3] = 0x45;
    assert_eq!(
        DeviceStatePacket::decode(&device, &DEVICE_LIMITS),
        Err(WireError::BadMagic {
            structure: "packet header",
            value: 0x1122_3345,
            expected: 0x1122_3344,
        })
    );
}

#[test]
fn bad_version() {
    let mut hello = hello_bytes();
    hello[7] = 2;
    assert_eq!(
        ChannelHello::decode(&hello),
        Err(WireError::BadVersion {
            structure: "channel hello",
            value: 2,
            expected: 1,
        })
    );
    assert_eq!(
        PacketHeader::decode(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(WireError::BadVersion {
            structure: "packet header",
            value: 0,
            expected: 1,
        })
    );
    let mut raw = RawRam::valid();
    raw.version = 0x0100_0000; // 1 in the wrong byte order
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::BadVersion {
            structure: "packet header",
            value: 0x0100_0000,
            expected: 1,
        })
    );
    let mut device = raw_device(0x40, b"dev", 1, 100);
    device[7] = 3;
    assert_eq!(
        DeviceStatePacket::decode(&device, &DEVICE_LIMITS),
        Err(WireError::BadVersion {
            structure: "packet header",
            value: 3,
            expected: 1,
        })
    );
}

// ---- flags and compression ----

#[test]
fn ram_packet_unknown_flags() {
    let mut raw = RawRam::valid();
    raw.flags = 0x80;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::UnknownFlags {
            bits: 0x80,
            flags: 0x80,
        })
    );
    // DEVICE_STATE does not belong on a RAM packet.
    raw.flags = Flags::DEVICE_STATE;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::UnknownFlags {
            bits: 0x40,
            flags: 0x40,
        })
    );
    // Low bits cannot be "negotiated" as extensions.
    raw.flags = 0x80;
    let limits = RamLimits {
        extensions: 0xff,
        ..limits4()
    };
    assert_eq!(
        decode_ram(&raw, &limits),
        Err(WireError::UnknownFlags {
            bits: 0x80,
            flags: 0x80,
        })
    );
}

#[test]
fn ram_packet_extension_flags() {
    let mut raw = RawRam::valid();
    raw.flags = 0x400;
    // Not negotiated: refused.
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::UnknownFlags {
            bits: 0x400,
            flags: 0x400,
        })
    );
    // Another extension negotiated, not this one: refused.
    let other = RamLimits {
        extensions: 0x800,
        ..limits4()
    };
    assert_eq!(
        decode_ram(&raw, &other),
        Err(WireError::UnknownFlags {
            bits: 0x400,
            flags: 0x400,
        })
    );
    // Negotiated: accepted and kept.
    let negotiated = RamLimits {
        extensions: 0x400,
        ..limits4()
    };
    let bytes = raw.bytes();
    let packet = RamPacket::decode(&bytes, &negotiated).unwrap();
    assert_eq!(packet.flags, Flags(0x400));
    // Only the unnegotiated bits are named.
    raw.flags = 0x8000_0601;
    raw.normal_pages = 0;
    raw.zero_pages = 0;
    raw.next_packet_size = 0;
    assert_eq!(
        decode_ram(&raw, &negotiated),
        Err(WireError::UnknownFlags {
            bits: 0x8000_0200,
            flags: 0x8000_0601,
        })
    );
}

#[test]
fn ram_packet_qemu_compression_refused() {
    for (value, name) in [(0x08, "qpl"), (0x10, "uadk"), (0x20, "qatzip")] {
        let mut raw = RawRam::valid();
        raw.flags = value;
        assert_eq!(
            decode_ram(&raw, &limits4()),
            Err(WireError::UnsupportedCompression(name))
        );
        assert_eq!(
            Compression::from_wire(value),
            Err(WireError::UnsupportedCompression(name))
        );
        assert_eq!(
            Flags(value | Flags::SYNC).compression(),
            Err(WireError::UnsupportedCompression(name))
        );
    }
}

#[test]
fn ram_packet_unknown_compression() {
    for value in [0x06, 0x0a, 0x0e, 0x3e] {
        let mut raw = RawRam::valid();
        raw.flags = value;
        assert_eq!(
            decode_ram(&raw, &limits4()),
            Err(WireError::UnknownCompression(value))
        );
    }
    assert_eq!(
        Compression::from_wire(0x01),
        Err(WireError::UnknownCompression(0x01))
    );
    assert_eq!(
        Compression::from_wire(0x40),
        Err(WireError::UnknownCompression(0x40))
    );
    assert_eq!(Compression::from_wire(0x00), Ok(Compression::None));
    assert_eq!(Compression::from_wire(0x02), Ok(Compression::Zlib));
    assert_eq!(Compression::from_wire(0x04), Ok(Compression::Zstd));
}

#[test]
fn lz4_bit_with_a_qemu_compression_value_is_unknown() {
    let limits = RamLimits {
        compression: Compression::Lz4,
        extensions: Flags::LZ4,
        ..limits4()
    };
    for value in [0x102, 0x104] {
        let mut raw = RawRam::valid();
        raw.flags = value;
        raw.next_packet_size = 100;
        assert_eq!(
            decode_ram(&raw, &limits),
            Err(WireError::UnknownCompression(value))
        );
    }
    let mut raw = RawRam::valid();
    raw.flags = Flags::LZ4;
    raw.next_packet_size = 100;
    decode_ram(&raw, &limits).unwrap();
    // Not negotiated: the bit is refused before the method is looked at.
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::UnknownFlags {
            bits: 0x100,
            flags: 0x100,
        })
    );
}

#[test]
fn raw_fallback_payload_is_exactly_the_pages() {
    for compression in [Compression::Zlib, Compression::Zstd, Compression::Lz4] {
        let limits = RamLimits {
            compression,
            extensions: compression.extension() | Flags::UNCOMPRESSED,
            ..limits4()
        };
        let mut raw = RawRam::valid();
        raw.flags = compression.to_wire() | Flags::UNCOMPRESSED;
        decode_ram(&raw, &limits).unwrap();
        for size in [0, 100, 8191, 8193, 9344] {
            raw.next_packet_size = size;
            assert_eq!(
                decode_ram(&raw, &limits),
                Err(WireError::PayloadSizeMismatch {
                    size,
                    expected: 8192,
                }),
                "{compression}"
            );
        }
        // Without the extension negotiated, the flag is refused.
        let plain = RamLimits {
            extensions: compression.extension(),
            ..limits
        };
        raw.next_packet_size = 8192;
        assert_eq!(
            decode_ram(&raw, &plain),
            Err(WireError::UnknownFlags {
                bits: Flags::UNCOMPRESSED,
                flags: raw.flags,
            })
        );
    }
}

#[test]
fn ram_packet_compression_mismatch() {
    let mut raw = RawRam::valid();
    raw.flags = Compression::Zlib.to_wire();
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::CompressionMismatch {
            negotiated: Compression::None,
            received: Compression::Zlib,
        })
    );
    // An uncompressed packet on a zstd migration, SYNC or not.
    let zstd = RamLimits {
        compression: Compression::Zstd,
        ..limits4()
    };
    for flags in [0, Flags::SYNC] {
        let mut raw = RawRam::valid();
        raw.flags = flags;
        assert_eq!(
            decode_ram(&raw, &zstd),
            Err(WireError::CompressionMismatch {
                negotiated: Compression::Zstd,
                received: Compression::None,
            })
        );
    }
    raw.flags = Compression::Zlib.to_wire();
    assert_eq!(
        decode_ram(&raw, &zstd),
        Err(WireError::CompressionMismatch {
            negotiated: Compression::Zstd,
            received: Compression::Zlib,
        })
    );
}

// ---- counts, offsets and payload ----

#[test]
fn pages_alloc_above_max() {
    let mut raw = RawRam::valid();
    raw.pages_alloc = 5;
    raw.offsets.push(0);
    let expected = Err(WireError::PagesAllocTooLarge {
        pages_alloc: 5,
        max: 4,
    });
    assert_eq!(decode_ram(&raw, &limits4()), expected);
    assert_eq!(
        RamPacket::total_len(&raw.bytes()[..320], &limits4()).map(|_| ()),
        expected
    );

    // A hostile pages_alloc is refused from the fixed part alone, before any table.
    raw.pages_alloc = u32::MAX;
    let bytes = raw.bytes();
    assert_eq!(
        RamPacket::total_len(&bytes[..320], &DEFAULT_LIMITS),
        Err(WireError::PagesAllocTooLarge {
            pages_alloc: u32::MAX,
            max: 128,
        })
    );
    assert_eq!(
        RamPacket::decode(&bytes[..320], &DEFAULT_LIMITS),
        Err(WireError::PagesAllocTooLarge {
            pages_alloc: u32::MAX,
            max: 128,
        })
    );
    // Exactly the maximum is fine.
    assert_eq!(
        RamPacket::total_len(&RawRam::valid().bytes()[..320], &limits4()),
        Ok(352)
    );
}

#[test]
fn too_many_pages() {
    let mut raw = RawRam::valid();
    raw.normal_pages = 3;
    raw.zero_pages = 2;
    raw.next_packet_size = 3 * 4096;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::TooManyPages {
            normal: 3,
            zero: 2,
            pages_alloc: 4,
        })
    );
    raw.normal_pages = 5;
    raw.zero_pages = 0;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::TooManyPages {
            normal: 5,
            zero: 0,
            pages_alloc: 4,
        })
    );
    // Counts whose sum overflows u32 are still refused, not wrapped.
    raw.normal_pages = u32::MAX;
    raw.zero_pages = 2;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::TooManyPages {
            normal: u32::MAX,
            zero: 2,
            pages_alloc: 4,
        })
    );
    // pages_alloc 0 carries nothing.
    let raw = RawRam {
        pages_alloc: 0,
        normal_pages: 0,
        zero_pages: 1,
        next_packet_size: 0,
        offsets: vec![],
        ..RawRam::valid()
    };
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::TooManyPages {
            normal: 0,
            zero: 1,
            pages_alloc: 0,
        })
    );
    // The encoder refuses the same.
    let mut out = vec![7];
    assert_eq!(
        RamPacketFields {
            flags: Flags(0),
            pages_alloc: 2,
            next_packet_size: 0,
            packet_num: 0,
            ramblock: "pc.ram",
            normal: &[0, 4096],
            zero: &[8192],
        }
        .encode(&mut out),
        Err(WireError::TooManyPages {
            normal: 2,
            zero: 1,
            pages_alloc: 2,
        })
    );
    assert_eq!(out, [7], "nothing written on error");
}

#[test]
fn misaligned_normal_offset() {
    let mut raw = RawRam::valid();
    raw.offsets[1] = 0x2001;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::MisalignedOffset {
            offset: 0x2001,
            page_size: 4096,
        })
    );
    // Aligned to 4 KiB but not to the negotiated 64 KiB.
    let raw = RawRam {
        next_packet_size: 2 * 65536,
        offsets: vec![0x1_0000, 0x1_1000, 0x2_0000, 0],
        ..RawRam::valid()
    };
    let limits = RamLimits {
        page_size: 65536,
        ..limits4()
    };
    assert_eq!(
        decode_ram(&raw, &limits),
        Err(WireError::MisalignedOffset {
            offset: 0x1_1000,
            page_size: 65536,
        })
    );
}

#[test]
fn misaligned_zero_offset() {
    let mut raw = RawRam::valid();
    raw.offsets[2] = u64::MAX;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::MisalignedOffset {
            offset: u64::MAX,
            page_size: 4096,
        })
    );
    // Entries past normal + zero are not looked at.
    let mut raw = RawRam::valid();
    raw.offsets[3] = 0x123;
    decode_ram(&raw, &limits4()).unwrap();
}

#[test]
fn payload_size_mismatch_without_compression() {
    for size in [0, 4096, 8191, 8193, u32::MAX] {
        let mut raw = RawRam::valid();
        raw.next_packet_size = size;
        assert_eq!(
            decode_ram(&raw, &limits4()),
            Err(WireError::PayloadSizeMismatch {
                size,
                expected: 8192,
            })
        );
    }
    // Zero pages carry no payload.
    let raw = RawRam {
        normal_pages: 0,
        zero_pages: 3,
        next_packet_size: 4096,
        ..RawRam::valid()
    };
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::PayloadSizeMismatch {
            size: 4096,
            expected: 0,
        })
    );
}

/// [`limits4`] with `compression` and its extension negotiated.
fn compressed_limits4(compression: Compression) -> RamLimits {
    RamLimits {
        compression,
        extensions: compression.extension(),
        ..limits4()
    }
}

#[test]
fn payload_above_bound_with_compression() {
    // 2 pages of 4 KiB: raw 8192, bound 8192 + 8192 / 64 + 1024 = 9344.
    for compression in [Compression::Zlib, Compression::Zstd, Compression::Lz4] {
        assert_eq!(compression.max_payload(8192), Some(9344));
        let limits = compressed_limits4(compression);
        let mut raw = RawRam::valid();
        raw.flags = compression.to_wire();
        for size in [1, 8192, 9344] {
            raw.next_packet_size = size;
            decode_ram(&raw, &limits).unwrap();
        }
        for size in [9345, u32::MAX] {
            raw.next_packet_size = size;
            assert_eq!(
                decode_ram(&raw, &limits),
                Err(WireError::PayloadTooLarge {
                    size,
                    bound: 9344,
                    normal_pages: 2,
                })
            );
        }
    }
    assert_eq!(Compression::None.max_payload(8192), None);
}

/// With compression a packet's payload may be any size up to the bound, but a packet
/// without normal pages has no payload at all: otherwise its payload bytes would be read
/// as the next packet (a SYNC smuggled in as payload).
#[test]
fn payload_without_normal_pages_with_compression() {
    for compression in [Compression::Zlib, Compression::Zstd, Compression::Lz4] {
        let limits = compressed_limits4(compression);
        let mut raw = RawRam::valid();
        raw.flags = compression.to_wire();
        raw.normal_pages = 0;
        raw.zero_pages = 3;
        raw.offsets = vec![0x1000, 0x2000, 0x3000, 0];
        raw.next_packet_size = 0;
        decode_ram(&raw, &limits).unwrap();
        for size in [1, 1024] {
            raw.next_packet_size = size;
            assert_eq!(
                decode_ram(&raw, &limits),
                Err(WireError::PayloadSizeMismatch { size, expected: 0 })
            );
        }
    }
}

#[test]
fn sync_with_pages() {
    let mut raw = RawRam::valid();
    raw.flags = Flags::SYNC;
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::SyncWithPages {
            pages: 3,
            payload: 8192,
        })
    );
    let raw = RawRam {
        flags: Flags::SYNC,
        normal_pages: 0,
        zero_pages: 1,
        next_packet_size: 0,
        ..RawRam::valid()
    };
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::SyncWithPages {
            pages: 1,
            payload: 0,
        })
    );
    // Payload without pages.
    let raw = RawRam {
        flags: Flags::SYNC | Compression::Zlib.to_wire(),
        normal_pages: 0,
        zero_pages: 0,
        next_packet_size: 5,
        ..RawRam::valid()
    };
    let zlib = RamLimits {
        compression: Compression::Zlib,
        ..limits4()
    };
    assert_eq!(
        decode_ram(&raw, &zlib),
        Err(WireError::SyncWithPages {
            pages: 0,
            payload: 5,
        })
    );
    // A proper SYNC is fine, whatever its name field and unused entries hold.
    let raw = RawRam {
        flags: Flags::SYNC,
        normal_pages: 0,
        zero_pages: 0,
        next_packet_size: 0,
        ..RawRam::valid()
    };
    let bytes = raw.bytes();
    let packet = RamPacket::decode(&bytes, &limits4()).unwrap();
    assert!(packet.flags.is_sync());
    assert_eq!(packet.normal_pages() + packet.zero_pages(), 0);
}

// ---- names ----

#[test]
fn ramblock_unterminated() {
    let raw = RawRam {
        name: vec![b'a'; 256],
        ..RawRam::valid()
    };
    assert_eq!(
        decode_ram(&raw, &limits4()),
        Err(WireError::Unterminated { field: "ramblock" })
    );
}

#[test]
fn ramblock_not_utf8() {
    for name in [
        &[0xff, 0xfe][..],
        &[b'p', b'c', 0xc3][..],
        &[0xed, 0xa0, 0x80][..],
    ] {
        let raw = RawRam {
            name: name.to_vec(),
            ..RawRam::valid()
        };
        assert_eq!(
            decode_ram(&raw, &limits4()),
            Err(WireError::NotUtf8 { field: "ramblock" })
        );
    }
    // Invalid bytes after the terminator do not matter.
    let raw = RawRam {
        name: [&b"ok"[..], &[0, 0xff, 0xfe]].concat(),
        ..RawRam::valid()
    };
    let bytes = raw.bytes();
    assert_eq!(
        RamPacket::decode(&bytes, &limits4()).unwrap().ramblock,
        "ok"
    );
}

#[test]
fn idstr_unterminated() {
    assert_eq!(
        decode_device(&raw_device(0x40, &[b'x'; 256], 0, 100), &DEVICE_LIMITS),
        Err(WireError::Unterminated { field: "idstr" })
    );
}

#[test]
fn idstr_not_utf8() {
    assert_eq!(
        decode_device(&raw_device(0x40, &[b'v', 0x80], 0, 100), &DEVICE_LIMITS),
        Err(WireError::NotUtf8 { field: "idstr" })
    );
}

#[test]
fn encode_name_too_long() {
    let name = "n".repeat(256);
    let mut out = vec![1, 2];
    assert_eq!(
        RamPacketFields {
            flags: Flags(0),
            pages_alloc: 1,
            next_packet_size: 0,
            packet_num: 0,
            ramblock: &name,
            normal: &[],
            zero: &[],
        }
        .encode(&mut out),
        Err(WireError::NameTooLong {
            field: "ramblock",
            length: 256,
        })
    );
    assert_eq!(out, [1, 2], "nothing written on error");

    // A NUL inside the name would cut it short on the other side.
    assert_eq!(
        RamPacketFields {
            flags: Flags(0),
            pages_alloc: 1,
            next_packet_size: 0,
            packet_num: 0,
            ramblock: "pc\0ram",
            normal: &[],
            zero: &[],
        }
        .encode(&mut out),
        Err(WireError::NameTooLong {
            field: "ramblock",
            length: 6,
        })
    );
    assert_eq!(out, [1, 2], "nothing written on error");

    let idstr = "é".repeat(128); // 256 bytes
    assert_eq!(
        DeviceStatePacket {
            idstr: &idstr,
            instance_id: 0,
            next_packet_size: 12,
        }
        .encode(&mut out),
        Err(WireError::NameTooLong {
            field: "idstr",
            length: 256,
        })
    );
    assert_eq!(out, [1, 2], "nothing written on error");
}

// ---- device state ----

#[test]
fn device_state_empty() {
    assert_eq!(
        decode_device(&raw_device(0x40, b"dev", 0, 0), &DEVICE_LIMITS),
        Err(WireError::EmptyDeviceState)
    );
}

#[test]
fn device_state_shorter_than_chunk_header() {
    for size in [1, 11] {
        assert_eq!(
            decode_device(&raw_device(0x40, b"dev", 0, size), &DEVICE_LIMITS),
            Err(WireError::DeviceStateTooShort { size })
        );
    }
    // Exactly a chunk header (a chunk with no data) is accepted.
    decode_device(&raw_device(0x40, b"dev", 0, 12), &DEVICE_LIMITS).unwrap();
}

#[test]
fn device_state_above_max() {
    let limits = DeviceStateLimits {
        max_payload: 4096,
        extensions: 0,
    };
    decode_device(&raw_device(0x40, b"dev", 0, 4096), &limits).unwrap();
    for size in [4097, u32::MAX] {
        assert_eq!(
            decode_device(&raw_device(0x40, b"dev", 0, size), &limits),
            Err(WireError::DeviceStateTooLarge { size, max: 4096 })
        );
    }
}

#[test]
fn device_state_sync() {
    for flags in [0x41, 0x01, 0x81] {
        assert_eq!(
            decode_device(&raw_device(flags, b"dev", 0, 100), &DEVICE_LIMITS),
            Err(WireError::SyncOnDeviceState)
        );
    }
}

#[test]
fn device_state_unknown_flags() {
    assert_eq!(
        decode_device(&raw_device(0xc0, b"dev", 0, 100), &DEVICE_LIMITS),
        Err(WireError::UnknownFlags {
            bits: 0x80,
            flags: 0xc0,
        })
    );
    // Compression does not apply to device state.
    assert_eq!(
        decode_device(&raw_device(0x42, b"dev", 0, 100), &DEVICE_LIMITS),
        Err(WireError::UnknownFlags {
            bits: 0x02,
            flags: 0x42,
        })
    );
    // Extensions: refused unless negotiated.
    assert_eq!(
        decode_device(&raw_device(0x140, b"dev", 0, 100), &DEVICE_LIMITS),
        Err(WireError::UnknownFlags {
            bits: 0x100,
            flags: 0x140,
        })
    );
    let negotiated = DeviceStateLimits {
        extensions: 0x100,
        ..DEVICE_LIMITS
    };
    decode_device(&raw_device(0x140, b"dev", 0, 100), &negotiated).unwrap();
}

#[test]
fn device_state_without_device_state_flag() {
    // A RAM packet's header is not a device-state packet's.
    for flags in [0u32, 0x100] {
        let negotiated = DeviceStateLimits {
            extensions: 0x100,
            ..DEVICE_LIMITS
        };
        assert_eq!(
            decode_device(&raw_device(flags, b"dev", 0, 100), &negotiated),
            Err(WireError::InvalidValue {
                field: "device-state packet flags",
                value: flags.into(),
            })
        );
    }
}

#[test]
fn chunk_version() {
    for version in [1, 0x0100_0000, u32::MAX] {
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&u32::to_be_bytes(version));
        assert_eq!(
            DeviceStateChunkHeader::decode(&bytes),
            Err(WireError::ChunkVersion(version))
        );
    }
}

#[test]
fn chunk_unknown_flags() {
    for flags in [2u32, 3, 0x8000_0001, u32::MAX] {
        let mut bytes = [0u8; 12];
        bytes[8..].copy_from_slice(&flags.to_be_bytes());
        assert_eq!(
            DeviceStateChunkHeader::decode(&bytes),
            Err(WireError::UnknownChunkFlags(flags))
        );
    }
}

// ---- limits that came from a handshake ----

#[test]
fn zero_page_size_does_not_panic() {
    // A page size of 0 should never be negotiated; if it is, offsets are refused rather
    // than dividing by zero.
    let limits = RamLimits {
        page_size: 0,
        ..limits4()
    };
    let raw = RawRam {
        next_packet_size: 0,
        ..RawRam::valid()
    };
    assert_eq!(
        decode_ram(&raw, &limits),
        Err(WireError::MisalignedOffset {
            offset: 0x1000,
            page_size: 0,
        })
    );
}

#[test]
fn errors_name_field_and_value() {
    // The messages carry what an operator needs.
    let text = WireError::PagesAllocTooLarge {
        pages_alloc: 129,
        max: 128,
    }
    .to_string();
    assert!(text.contains("pages_alloc") && text.contains("129") && text.contains("128"));
    let text = WireError::MisalignedOffset {
        offset: 0x1001,
        page_size: 4096,
    }
    .to_string();
    assert!(text.contains("0x1001") && text.contains("4096"));
    let text = WireError::BadMagic {
        structure: "packet header",
        value: 0x4433_2211,
        expected: 0x1122_3344,
    }
    .to_string();
    assert!(text.contains("packet header") && text.contains("0x44332211"));
    let text = WireError::Unterminated { field: "ramblock" }.to_string();
    assert!(text.contains("ramblock"));
}
