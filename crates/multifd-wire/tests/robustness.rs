//! No decoder panics on any input, and whatever a decoder accepts re-encodes to a value
//! that decodes the same (SPEC §5: bad input gets a clear error, never a crash).

mod common;

use common::{
    chunk_header, control_message, limits_and_ram_packet, name_field_string, OwnedRamPacket,
};
use multifd_wire::{
    ChannelHello, Compression, ControlMessage, DeviceStateChunkHeader, DeviceStateLimits,
    DeviceStatePacket, Flags, PacketHeader, RamLimits, RamPacket,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Limits that exercise every branch: small and default packets, each method, extensions.
const RAM_LIMITS: [RamLimits; 5] = [
    RamLimits {
        max_pages: 128,
        page_size: 4096,
        compression: Compression::None,
        extensions: 0,
    },
    RamLimits {
        max_pages: 4,
        page_size: 4096,
        compression: Compression::Zlib,
        extensions: 0x100,
    },
    RamLimits {
        max_pages: 1,
        page_size: 1,
        compression: Compression::Zstd,
        extensions: u32::MAX,
    },
    RamLimits {
        max_pages: u32::MAX,
        page_size: 2 << 20,
        compression: Compression::None,
        extensions: 0,
    },
    RamLimits {
        max_pages: 8,
        page_size: 0,
        compression: Compression::None,
        extensions: 0,
    },
];

const DEVICE_LIMITS: [DeviceStateLimits; 3] = [
    DeviceStateLimits {
        max_payload: 1 << 20,
        extensions: 0,
    },
    DeviceStateLimits {
        max_payload: 0,
        extensions: u32::MAX,
    },
    DeviceStateLimits {
        max_payload: u32::MAX,
        extensions: 0x100,
    },
];

/// Runs every decoder over `bytes`; where one accepts, checks that its value re-encodes
/// and decodes to the same value.
fn decode_everything(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(hello) = ChannelHello::decode(bytes) {
        prop_assert_eq!(ChannelHello::decode(&hello.encode()), Ok(hello));
    }
    if let Ok(header) = PacketHeader::decode(bytes) {
        let mut out = Vec::new();
        header.encode(&mut out);
        prop_assert_eq!(&out[..], bytes);
        let _ = header.kind();
        let _ = header.flags.compression();
    }
    for limits in &RAM_LIMITS {
        let total = RamPacket::total_len(bytes, limits);
        if let Ok(packet) = RamPacket::decode(bytes, limits) {
            prop_assert_eq!(total, Ok(bytes.len()));
            prop_assert!(
                u64::from(packet.normal_pages()) + u64::from(packet.zero_pages())
                    <= u64::from(packet.pages_alloc)
            );
            prop_assert!(packet.pages_alloc <= limits.max_pages);
            let owned = OwnedRamPacket::from_decoded(&packet);
            let again = owned.encode();
            prop_assert_eq!(again.len(), bytes.len());
            let decoded = RamPacket::decode(&again, limits).unwrap();
            prop_assert_eq!(OwnedRamPacket::from_decoded(&decoded), owned);
        }
    }
    for limits in &DEVICE_LIMITS {
        if let Ok(packet) = DeviceStatePacket::decode(bytes, limits) {
            prop_assert!(packet.next_packet_size >= 12);
            prop_assert!(packet.next_packet_size <= limits.max_payload);
            let mut out = Vec::new();
            packet.encode(&mut out).unwrap();
            prop_assert_eq!(DeviceStatePacket::decode(&out, limits), Ok(packet));
        }
    }
    if let Ok(header) = DeviceStateChunkHeader::decode(bytes) {
        prop_assert_eq!(&header.encode()[..], bytes);
    }
    let length = ControlMessage::payload_len(bytes.get(..8).unwrap_or(bytes));
    if let Ok(message) = ControlMessage::decode(bytes) {
        prop_assert_eq!(length, Ok(bytes.len() - 8));
        let mut out = Vec::new();
        message.encode(&mut out).unwrap();
        prop_assert_eq!(&out[..], bytes);
    }
    if bytes.len() >= 4 {
        let value = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if let Ok(compression) = Compression::from_wire(value) {
            prop_assert_eq!(compression.to_wire(), value);
        }
        let _ = Flags(value).compression();
    }
    Ok(())
}

/// One change to a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Xor(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
    Append(Vec<u8>),
    /// Overwrites a big-endian u32 with a boundary value.
    Word(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let index = any::<usize>();
    prop_oneof![
        (index, any::<u8>()).prop_map(|(at, byte)| Mutation::Set(at, byte)),
        (index, 1u8..).prop_map(|(at, bits)| Mutation::Xor(at, bits)),
        index.prop_map(Mutation::Truncate),
        (index, any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        index.prop_map(Mutation::Remove),
        vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        (
            index,
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(0x40),
                Just(0x100),
                Just(0xfff),
                Just(0x1000),
                Just(0x10_0000),
                Just(0x10_0001),
                Just(u32::MAX),
                any::<u32>(),
            ]
        )
            .prop_map(|(at, word)| Mutation::Word(at, word)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for mutation in mutations {
        let len = bytes.len();
        match mutation {
            Mutation::Set(at, byte) if len > 0 => bytes[at % len] = *byte,
            Mutation::Xor(at, bits) if len > 0 => bytes[at % len] ^= *bits,
            Mutation::Truncate(at) => bytes.truncate(at % (len + 1)),
            Mutation::Insert(at, byte) => bytes.insert(at % (len + 1), *byte),
            Mutation::Remove(at) if len > 0 => {
                bytes.remove(at % len);
            }
            Mutation::Append(tail) => bytes.extend_from_slice(tail),
            Mutation::Word(at, word) if len >= 4 => {
                // Fields are 4-byte aligned in every structure; hit them.
                let at = (at % (len / 4)) * 4;
                bytes[at..at + 4].copy_from_slice(&word.to_be_bytes());
            }
            _ => {}
        }
    }
}

/// Valid encodings of every structure.
fn valid_encoding() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<[u8; 16]>(), any::<u8>())
            .prop_map(|(uuid, channel)| ChannelHello { uuid, channel }.encode().to_vec()),
        any::<u32>().prop_map(|flags| {
            let mut out = Vec::new();
            PacketHeader {
                flags: Flags(flags),
            }
            .encode(&mut out);
            out
        }),
        limits_and_ram_packet().prop_map(|(_, packet)| packet.encode()),
        (name_field_string(), any::<u32>(), 12u32..4096).prop_map(|(idstr, instance_id, size)| {
            let mut out = Vec::new();
            DeviceStatePacket {
                idstr: &idstr,
                instance_id,
                next_packet_size: size,
            }
            .encode(&mut out)
            .unwrap();
            out
        }),
        chunk_header().prop_map(|header| header.encode().to_vec()),
        control_message().prop_map(|message| {
            let mut out = Vec::new();
            message.encode(&mut out).unwrap();
            out
        }),
    ]
}

/// Bytes that get past the first checks: a multifd header with any flags, or a control
/// frame of a known type with a consistent length.
fn plausible_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<u32>(), vec(any::<u8>(), 0..2048)).prop_map(|(flags, rest)| {
            let mut out = vec![0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1];
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&rest);
            out
        }),
        (
            prop_oneof![1u32..=7, 0x101u32..=0x105, any::<u32>(),],
            vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(message_type, payload)| common::frame(message_type, &payload)),
        (any::<u32>(), any::<u32>()).prop_map(|(idx, flags)| {
            let mut out = vec![0; 4];
            out.extend_from_slice(&idx.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes(bytes in vec(any::<u8>(), 0..2048)) {
        decode_everything(&bytes)?;
    }

    #[test]
    fn plausible(bytes in plausible_bytes()) {
        decode_everything(&bytes)?;
    }

    #[test]
    fn mutated_encodings(
        mut bytes in valid_encoding(),
        mutations in vec(mutation(), 1..6),
    ) {
        mutate(&mut bytes, &mutations);
        decode_everything(&bytes)?;
    }
}

#[test]
fn every_prefix_of_valid_encodings() {
    // Every truncation of one sample of each structure is an error, not a panic.
    let mut samples = vec![
        ChannelHello {
            uuid: [1; 16],
            channel: 2,
        }
        .encode()
        .to_vec(),
        DeviceStateChunkHeader {
            idx: 1,
            config_state: true,
        }
        .encode()
        .to_vec(),
    ];
    let mut ram = Vec::new();
    multifd_wire::RamPacketFields {
        flags: Flags(0),
        pages_alloc: 128,
        next_packet_size: 4096,
        packet_num: 3,
        ramblock: "pc.ram",
        normal: &[0],
        zero: &[4096],
    }
    .encode(&mut ram)
    .unwrap();
    samples.push(ram);
    let mut device = Vec::new();
    DeviceStatePacket {
        idstr: "dev",
        instance_id: 0,
        next_packet_size: 100,
    }
    .encode(&mut device)
    .unwrap();
    samples.push(device);
    for message in common::one_of_each_message() {
        let mut out = Vec::new();
        message.encode(&mut out).unwrap();
        samples.push(out);
    }
    for sample in samples {
        for length in 0..sample.len() {
            decode_everything(&sample[..length]).unwrap();
        }
    }
}
