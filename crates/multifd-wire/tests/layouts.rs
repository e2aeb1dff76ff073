//! Byte-exact layouts of the multifd-channel structures (SPEC §3.1), against expected
//! bytes written out by hand from the spec, never produced by the encoder.

mod common;

use common::{DEFAULT_LIMITS, DEVICE_LIMITS};
use multifd_wire::{
    ChannelHello, Compression, DeviceStateChunkHeader, DeviceStatePacket, Flags, PacketHeader,
    PacketKind, RamLimits, RamPacket, RamPacketFields, CHANNEL_HELLO_LEN, CHUNK_FLAG_CONFIG_STATE,
    DEVICE_STATE_CHUNK_HEADER_LEN, DEVICE_STATE_PACKET_LEN, MULTIFD_MAGIC, MULTIFD_VERSION,
    NAME_FIELD_LEN, PACKET_HEADER_LEN, RAM_PACKET_FIXED_LEN,
};

/// A name field: the name's bytes, then NULs up to 256 bytes.
fn name_field(name: &[u8]) -> Vec<u8> {
    let mut field = name.to_vec();
    field.resize(256, 0);
    field
}

#[test]
fn constants_match_qemu() {
    assert_eq!(MULTIFD_MAGIC, 0x1122_3344);
    assert_eq!(MULTIFD_VERSION, 1);
    assert_eq!(NAME_FIELD_LEN, 256);
    assert_eq!(Flags::SYNC, 0x01);
    assert_eq!(Flags::COMPRESSION_MASK, 0x3e);
    assert_eq!(Flags::DEVICE_STATE, 0x40);
    assert_eq!(Flags::FIRST_EXTENSION, 0x100);
    assert_eq!(Compression::None.to_wire(), 0x00);
    assert_eq!(Compression::Zlib.to_wire(), 0x02);
    assert_eq!(Compression::Zstd.to_wire(), 0x04);
    assert_eq!(CHUNK_FLAG_CONFIG_STATE, 1);
}

#[test]
fn extension_encodings() {
    // lz4 is this project's extension bit, with QEMU's compression field left at 0.
    assert_eq!(Flags::LZ4, 0x100);
    assert_eq!(Flags::UNCOMPRESSED, 0x200);
    assert_eq!(Compression::Lz4.to_wire(), 0x100);
    assert_eq!(Compression::Lz4.extension(), 0x100);
    for method in [Compression::None, Compression::Zlib, Compression::Zstd] {
        assert_eq!(method.extension(), 0, "{method}");
    }
    assert_eq!(Compression::from_wire(0x100), Ok(Compression::Lz4));
    assert_eq!(Flags(0x101).compression(), Ok(Compression::Lz4));
    assert_eq!(Flags(0x300).compression(), Ok(Compression::Lz4));
    assert!(Flags(0x200).is_uncompressed());
    assert!(!Flags(0x100).is_uncompressed());
    assert_eq!(Compression::Lz4.to_string(), "lz4");
    assert_eq!(Compression::ALL.len(), 4);
    for method in Compression::ALL {
        assert_eq!(Compression::from_wire(method.to_wire()), Ok(method));
    }
}

#[test]
fn structure_sizes() {
    assert_eq!(CHANNEL_HELLO_LEN, 64);
    assert_eq!(PACKET_HEADER_LEN, 12);
    assert_eq!(RAM_PACKET_FIXED_LEN, 320);
    assert_eq!(RamPacket::wire_len(0), 320);
    assert_eq!(RamPacket::wire_len(4), 352);
    assert_eq!(RamPacket::wire_len(128), 1344);
    assert_eq!(DEVICE_STATE_PACKET_LEN, 276);
    assert_eq!(DEVICE_STATE_CHUNK_HEADER_LEN, 12);
}

#[test]
fn encoded_sizes() {
    assert_eq!(
        ChannelHello {
            uuid: [0xab; 16],
            channel: 255
        }
        .encode()
        .len(),
        64
    );

    let mut header = Vec::new();
    PacketHeader {
        flags: Flags(Flags::SYNC),
    }
    .encode(&mut header);
    assert_eq!(header.len(), 12);

    // The spec's default: 4 KiB pages, 512 KiB packets, so 128 offsets: 1344 bytes,
    // whether the packet carries pages or is a SYNC.
    let normal: Vec<u64> = (0..100).map(|page| page * 4096).collect();
    let zero: Vec<u64> = (100..128).map(|page| page * 4096).collect();
    for (flags, normal, zero, size) in [
        (0, &normal[..], &zero[..], 100 * 4096),
        (Flags::SYNC, &[][..], &[][..], 0),
        (0, &normal[..1], &[][..], 4096),
    ] {
        let mut packet = Vec::new();
        RamPacketFields {
            flags: Flags(flags),
            pages_alloc: 128,
            next_packet_size: size,
            packet_num: 1,
            ramblock: "pc.ram",
            normal,
            zero,
        }
        .encode(&mut packet)
        .unwrap();
        assert_eq!(packet.len(), 1344);
        assert_eq!(
            RamPacket::total_len(&packet[..320], &DEFAULT_LIMITS),
            Ok(1344)
        );
        RamPacket::decode(&packet, &DEFAULT_LIMITS).unwrap();
    }

    let mut device = Vec::new();
    DeviceStatePacket {
        idstr: "0000:00:02.0/vfio",
        instance_id: 0,
        next_packet_size: 12,
    }
    .encode(&mut device)
    .unwrap();
    assert_eq!(device.len(), 276);

    assert_eq!(
        DeviceStateChunkHeader {
            idx: 0,
            config_state: true
        }
        .encode()
        .len(),
        12
    );
}

#[test]
fn encoders_append_to_existing_bytes() {
    let mut out = vec![0xee; 5];
    PacketHeader { flags: Flags(0) }.encode(&mut out);
    assert_eq!(&out[..5], &[0xee; 5]);
    assert_eq!(out.len(), 17);

    let mut out = vec![0xee; 3];
    RamPacketFields {
        flags: Flags(0),
        pages_alloc: 2,
        next_packet_size: 4096,
        packet_num: 0,
        ramblock: "a",
        normal: &[4096],
        zero: &[],
    }
    .encode(&mut out)
    .unwrap();
    assert_eq!(out.len(), 3 + 336);
    assert_eq!(&out[..3], &[0xee; 3]);
    RamPacket::decode(&out[3..], &DEFAULT_LIMITS).unwrap();

    let mut out = vec![0xee; 7];
    DeviceStatePacket {
        idstr: "d",
        instance_id: 1,
        next_packet_size: 100,
    }
    .encode(&mut out)
    .unwrap();
    assert_eq!(out.len(), 7 + 276);
    assert_eq!(&out[..7], &[0xee; 7]);
    DeviceStatePacket::decode(&out[7..], &DEVICE_LIMITS).unwrap();
}

#[test]
fn channel_hello_bytes() {
    let mut expected = Vec::new();
    expected.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]); // 0..4: magic
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 4..8: version 1
    expected.extend_from_slice(&[
        0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, // 8..24: uuid
        0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    ]);
    expected.push(0x03); // 24: channel id
    expected.extend_from_slice(&[0; 7]); // 25..32: unused1
    expected.extend_from_slice(&[0; 32]); // 32..64: unused2 (4 x u64)
    assert_eq!(expected.len(), 64);

    let hello = ChannelHello {
        uuid: [
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d,
            0x0e, 0x0f,
        ],
        channel: 3,
    };
    assert_eq!(hello.encode().to_vec(), expected);
    assert_eq!(ChannelHello::decode(&expected), Ok(hello));
}

#[test]
fn channel_hello_ignores_reserved_bytes() {
    // QEMU never reads unused1/unused2; neither do we.
    let mut bytes = vec![0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1];
    bytes.extend_from_slice(&[0xaa; 16]); // uuid
    bytes.push(200); // channel id
    bytes.extend_from_slice(&[0xff; 39]); // reserved, not zero
    assert_eq!(
        ChannelHello::decode(&bytes),
        Ok(ChannelHello {
            uuid: [0xaa; 16],
            channel: 200
        })
    );
}

#[test]
fn packet_header_bytes() {
    let expected = [
        0x11, 0x22, 0x33, 0x44, // 0..4: magic
        0x00, 0x00, 0x00, 0x01, // 4..8: version
        0x00, 0x00, 0x01, 0x43, // 8..12: flags = extension 0x100 | DEVICE_STATE | ZLIB | SYNC
    ];
    let header = PacketHeader {
        flags: Flags(0x143),
    };
    let mut out = Vec::new();
    header.encode(&mut out);
    assert_eq!(out, expected);
    assert_eq!(PacketHeader::decode(&expected), Ok(header));

    // The header decoder checks only magic and version: the flags are judged by the
    // packet decoders, against what was negotiated.
    let header =
        PacketHeader::decode(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff])
            .unwrap();
    assert_eq!(header.flags, Flags(u32::MAX));
}

#[test]
fn packet_kind_and_flag_accessors() {
    let ram = PacketHeader { flags: Flags(0x03) };
    assert_eq!(ram.kind(), PacketKind::Ram);
    assert!(ram.flags.is_sync());
    assert!(!ram.flags.is_device_state());
    assert_eq!(ram.flags.compression(), Ok(Compression::Zlib));

    let device = PacketHeader { flags: Flags(0x40) };
    assert_eq!(device.kind(), PacketKind::DeviceState);
    assert!(!device.flags.is_sync());
    assert!(device.flags.is_device_state());
    assert_eq!(device.flags.compression(), Ok(Compression::None));

    assert_eq!(Flags(0x04).compression(), Ok(Compression::Zstd));
    assert_eq!(Flags::default(), Flags(0));
    assert_eq!(Compression::default(), Compression::None);
    assert_eq!(Compression::None.to_string(), "none");
    assert_eq!(Compression::Zlib.to_string(), "zlib");
    assert_eq!(Compression::Zstd.to_string(), "zstd");
}

/// The RAM packet of `ram_packet_bytes`: 4 offsets, two normal pages, one zero page.
fn expected_ram_packet() -> Vec<u8> {
    let mut expected = Vec::new();
    expected.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]); // 0..4: magic
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 4..8: version
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x00]); // 8..12: flags (no compression)
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x04]); // 12..16: pages_alloc = 4
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x02]); // 16..20: normal_pages = 2
    expected.extend_from_slice(&[0x00, 0x00, 0x20, 0x00]); // 20..24: next_packet_size = 8192
    expected.extend_from_slice(&[0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08]); // 24..32: packet_num
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 32..36: zero_pages = 1
    expected.extend_from_slice(&[0; 4]); // 36..40: unused32
    expected.extend_from_slice(&[0; 24]); // 40..64: unused64 (3 x u64)
    assert_eq!(expected.len(), 64);
    expected.extend_from_slice(b"pc.ram"); // 64..70: ramblock
    expected.extend_from_slice(&[0; 250]); // 70..320: NUL terminator and padding
    assert_eq!(expected.len(), 320);
    expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0x00]); // 320..328: normal 0x1000
    expected.extend_from_slice(&[0, 0, 0, 0x01, 0, 0, 0x30, 0x00]); // 328..336: normal 0x1_0000_3000
    expected.extend_from_slice(&[0, 0, 0, 0, 0x20, 0, 0, 0]); // 336..344: zero 0x2000_0000
    expected.extend_from_slice(&[0; 8]); // 344..352: unused entry
    assert_eq!(expected.len(), 352);
    expected
}

#[test]
fn ram_packet_bytes() {
    let expected = expected_ram_packet();
    let normal = [0x1000, 0x1_0000_3000];
    let zero = [0x2000_0000];
    let fields = RamPacketFields {
        flags: Flags(0),
        pages_alloc: 4,
        next_packet_size: 8192,
        packet_num: 0x0102_0304_0506_0708,
        ramblock: "pc.ram",
        normal: &normal,
        zero: &zero,
    };
    let mut out = Vec::new();
    fields.encode(&mut out).unwrap();
    assert_eq!(out, expected);

    let limits = RamLimits {
        max_pages: 4,
        ..DEFAULT_LIMITS
    };
    assert_eq!(RamPacket::total_len(&expected[..320], &limits), Ok(352));
    // total_len needs only the header and pages_alloc.
    assert_eq!(RamPacket::total_len(&expected[..16], &limits), Ok(352));
    let packet = RamPacket::decode(&expected, &limits).unwrap();
    assert_eq!(packet.flags, Flags(0));
    assert_eq!(packet.pages_alloc, 4);
    assert_eq!(packet.normal_pages(), 2);
    assert_eq!(packet.zero_pages(), 1);
    assert_eq!(packet.next_packet_size, 8192);
    assert_eq!(packet.packet_num, 0x0102_0304_0506_0708);
    assert_eq!(packet.ramblock, "pc.ram");
    assert_eq!(packet.normal_offsets().collect::<Vec<_>>(), normal);
    assert_eq!(packet.zero_offsets().collect::<Vec<_>>(), zero);
    assert_eq!(packet.normal_offsets().len(), 2);
    assert_eq!(packet.zero_offsets().len(), 1);
}

#[test]
fn ram_packet_ignores_reserved_bytes_and_unused_entries() {
    let mut bytes = expected_ram_packet();
    bytes[36..64].fill(0xff); // reserved
    bytes[71..320].fill(0xff); // after the name's NUL terminator at 70
    bytes[344..352].fill(0x77); // the unused offset entry, not even aligned
    let limits = RamLimits {
        max_pages: 4,
        ..DEFAULT_LIMITS
    };
    let packet = RamPacket::decode(&bytes, &limits).unwrap();
    assert_eq!(packet.ramblock, "pc.ram");
    assert_eq!(
        packet.normal_offsets().collect::<Vec<_>>(),
        [0x1000, 0x1_0000_3000]
    );
    assert_eq!(packet.zero_offsets().collect::<Vec<_>>(), [0x2000_0000]);
    // The re-encoding is canonical: reserved bytes and unused entries zero.
    let normal: Vec<u64> = packet.normal_offsets().collect();
    let zero: Vec<u64> = packet.zero_offsets().collect();
    let mut out = Vec::new();
    RamPacketFields {
        flags: packet.flags,
        pages_alloc: packet.pages_alloc,
        next_packet_size: packet.next_packet_size,
        packet_num: packet.packet_num,
        ramblock: packet.ramblock,
        normal: &normal,
        zero: &zero,
    }
    .encode(&mut out)
    .unwrap();
    assert_eq!(out, expected_ram_packet());
}

#[test]
fn sync_packet_bytes() {
    let mut expected = Vec::new();
    expected.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]); // 0..4: magic
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 4..8: version
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x05]); // 8..12: flags = ZSTD | SYNC
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x04]); // 12..16: pages_alloc = 4
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x00]); // 16..20: normal_pages = 0
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x00]); // 20..24: next_packet_size = 0
    expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x01, 0x2c]); // 24..32: packet_num = 300
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x00]); // 32..36: zero_pages = 0
    expected.extend_from_slice(&[0; 28]); // 36..64: reserved
    expected.extend_from_slice(&name_field(b"")); // 64..320: empty ramblock
    expected.extend_from_slice(&[0; 32]); // 320..352: four unused offsets
    assert_eq!(expected.len(), 352);

    let fields = RamPacketFields {
        flags: Flags(Flags::SYNC | Compression::Zstd.to_wire()),
        pages_alloc: 4,
        next_packet_size: 0,
        packet_num: 300,
        ramblock: "",
        normal: &[],
        zero: &[],
    };
    let mut out = Vec::new();
    fields.encode(&mut out).unwrap();
    assert_eq!(out, expected);

    let limits = RamLimits {
        max_pages: 4,
        page_size: 4096,
        compression: Compression::Zstd,
        extensions: 0,
    };
    let packet = RamPacket::decode(&expected, &limits).unwrap();
    assert!(packet.flags.is_sync());
    assert_eq!(packet.flags.compression(), Ok(Compression::Zstd));
    assert_eq!(packet.pages_alloc, 4);
    assert_eq!(packet.normal_pages(), 0);
    assert_eq!(packet.zero_pages(), 0);
    assert_eq!(packet.next_packet_size, 0);
    assert_eq!(packet.packet_num, 300);
    assert_eq!(packet.ramblock, "");
    assert_eq!(packet.normal_offsets().count(), 0);
    assert_eq!(packet.zero_offsets().count(), 0);
}

#[test]
fn device_state_packet_bytes() {
    let mut expected = Vec::new();
    expected.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]); // 0..4: magic
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 4..8: version
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x40]); // 8..12: flags = DEVICE_STATE
    expected.extend_from_slice(b"0000:00:02.0/vfio"); // 12..29: idstr (17 bytes)
    expected.extend_from_slice(&[0; 239]); // 29..268: NUL terminator and padding
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x07]); // 268..272: instance_id = 7
    expected.extend_from_slice(&[0x00, 0x01, 0x00, 0x0c]); // 272..276: next_packet_size
    assert_eq!(expected.len(), 276);

    let packet = DeviceStatePacket {
        idstr: "0000:00:02.0/vfio",
        instance_id: 7,
        next_packet_size: 0x1_000c,
    };
    let mut out = Vec::new();
    packet.encode(&mut out).unwrap();
    assert_eq!(out, expected);
    assert_eq!(
        DeviceStatePacket::decode(&expected, &DEVICE_LIMITS),
        Ok(packet)
    );
}

#[test]
fn chunk_header_bytes() {
    let expected = [
        0x00, 0x00, 0x00, 0x00, // 0..4: version 0
        0x00, 0x00, 0x00, 0x05, // 4..8: idx 5
        0x00, 0x00, 0x00, 0x00, // 8..12: flags: not the last chunk
    ];
    let header = DeviceStateChunkHeader {
        idx: 5,
        config_state: false,
    };
    assert_eq!(header.encode(), expected);
    assert_eq!(DeviceStateChunkHeader::decode(&expected), Ok(header));

    let expected = [
        0x00, 0x00, 0x00, 0x00, // 0..4: version 0
        0x00, 0x00, 0x00, 0x05, // 4..8: idx 5
        0x00, 0x00, 0x00, 0x01, // 8..12: flags = CONFIG_STATE
    ];
    let header = DeviceStateChunkHeader {
        idx: 5,
        config_state: true,
    };
    assert_eq!(header.encode(), expected);
    assert_eq!(DeviceStateChunkHeader::decode(&expected), Ok(header));

    let expected = [0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1];
    assert_eq!(
        DeviceStateChunkHeader::decode(&expected),
        Ok(DeviceStateChunkHeader {
            idx: 0xdead_beef,
            config_state: true
        })
    );
}

#[test]
fn longest_names_fit() {
    // 255 bytes plus the terminator fill the field exactly.
    let name = "r".repeat(255);
    let mut out = Vec::new();
    RamPacketFields {
        flags: Flags(0),
        pages_alloc: 0,
        next_packet_size: 0,
        packet_num: 0,
        ramblock: &name,
        normal: &[],
        zero: &[],
    }
    .encode(&mut out)
    .unwrap();
    assert_eq!(out.len(), 320);
    assert_eq!(&out[64..319], name.as_bytes());
    assert_eq!(out[319], 0);
    assert_eq!(
        RamPacket::decode(&out, &DEFAULT_LIMITS).unwrap().ramblock,
        name
    );

    let idstr = "d".repeat(255);
    let mut out = Vec::new();
    DeviceStatePacket {
        idstr: &idstr,
        instance_id: 0,
        next_packet_size: 12,
    }
    .encode(&mut out)
    .unwrap();
    assert_eq!(out.len(), 276);
    assert_eq!(out[12 + 255], 0);
    assert_eq!(
        DeviceStatePacket::decode(&out, &DEVICE_LIMITS)
            .unwrap()
            .idstr,
        idstr
    );

    // A multi-byte UTF-8 name survives.
    let name = "ramblock-é-日本";
    let mut out = Vec::new();
    RamPacketFields {
        flags: Flags(0),
        pages_alloc: 0,
        next_packet_size: 0,
        packet_num: 0,
        ramblock: name,
        normal: &[],
        zero: &[],
    }
    .encode(&mut out)
    .unwrap();
    assert_eq!(&out[64..64 + name.len()], name.as_bytes());
    assert_eq!(
        RamPacket::decode(&out, &DEFAULT_LIMITS).unwrap().ramblock,
        name
    );
}
