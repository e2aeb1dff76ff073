//! Strategies and helpers shared by the integration tests.
//!
//! Each test file includes this module and uses part of it.
#![allow(dead_code)]

use multifd_wire::{
    BlockAnnouncement, Compression, ControlMessage, DeviceAnnouncement, DeviceStateChunkHeader,
    DeviceStateLimits, DeviceStateSettings, Flags, Hello, RamLimits, RamPacket, RamPacketFields,
    RejectCode, RejectReason, Totals, ZeroPageMode, NAME_FIELD_LEN,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// The defaults of the spec: 4 KiB pages, 512 KiB packets, no compression.
pub const DEFAULT_LIMITS: RamLimits = RamLimits {
    max_pages: 128,
    page_size: 4096,
    compression: Compression::None,
    extensions: 0,
};

/// Device-state limits used by the hand-written tests.
pub const DEVICE_LIMITS: DeviceStateLimits = DeviceStateLimits {
    max_payload: 1 << 20,
    extensions: 0,
};

/// An owned RAM packet: what a sender chooses, in a form strategies can produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRamPacket {
    pub flags: Flags,
    pub pages_alloc: u32,
    pub next_packet_size: u32,
    pub packet_num: u64,
    pub ramblock: String,
    pub normal: Vec<u64>,
    pub zero: Vec<u64>,
}

impl OwnedRamPacket {
    pub fn fields(&self) -> RamPacketFields<'_> {
        RamPacketFields {
            flags: self.flags,
            pages_alloc: self.pages_alloc,
            next_packet_size: self.next_packet_size,
            packet_num: self.packet_num,
            ramblock: &self.ramblock,
            normal: &self.normal,
            zero: &self.zero,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.fields()
            .encode(&mut out)
            .expect("a valid packet encodes");
        out
    }

    /// Copies everything a decoded packet exposes.
    pub fn from_decoded(packet: &RamPacket<'_>) -> Self {
        Self {
            flags: packet.flags,
            pages_alloc: packet.pages_alloc,
            next_packet_size: packet.next_packet_size,
            packet_num: packet.packet_num,
            ramblock: packet.ramblock.to_owned(),
            normal: packet.normal_offsets().collect(),
            zero: packet.zero_offsets().collect(),
        }
    }
}

/// A name that fits a 256-byte NUL-terminated field: at most 255 bytes, no NUL.
pub fn name_field_string() -> impl Strategy<Value = String> {
    prop_oneof![
        // Printable ASCII up to the longest allowed length.
        "[ -~]{0,255}",
        // Any non-NUL characters, cut down to what fits in bytes.
        "[^\\x00]{0,100}".prop_map(|name| truncate_to_bytes(name, NAME_FIELD_LEN - 1)),
    ]
}

/// Cuts `text` at a char boundary so that it is at most `max` bytes long.
pub fn truncate_to_bytes(mut text: String, max: usize) -> String {
    while text.len() > max {
        text.pop();
    }
    text
}

/// Any string a control message can carry (well under the u16 length limit).
pub fn control_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,64}",
        any::<String>(),
        // Long strings (cheap to generate: one character repeated).
        (1000usize..3000, any::<char>()).prop_map(|(count, fill)| fill.to_string().repeat(count)),
    ]
}

pub fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        Just(Compression::Zlib),
        Just(Compression::Zstd),
        Just(Compression::Lz4),
    ]
}

/// Negotiated limits: a power-of-two page size, a packet size, a method and extensions.
pub fn ram_limits() -> impl Strategy<Value = RamLimits> {
    (
        prop_oneof![Just(4096u32), Just(16384), Just(65536), Just(2 << 20)],
        1u32..=256,
        compression(),
        any::<u32>(),
    )
        .prop_map(
            |(page_size, max_pages, compression, extensions)| RamLimits {
                max_pages,
                page_size,
                compression,
                // Any extensions, except lz4's bit, which comes with lz4 only.
                extensions: (extensions & !(Flags::FIRST_EXTENSION - 1) & !Flags::LZ4)
                    | compression.extension(),
            },
        )
}

/// A valid RAM packet (pages or SYNC) for the given limits.
pub fn ram_packet(limits: RamLimits) -> impl Strategy<Value = OwnedRamPacket> {
    let page_size = u64::from(limits.page_size);
    (0..=limits.max_pages)
        .prop_flat_map(move |pages_alloc| {
            (
                Just(pages_alloc),
                0..=pages_alloc,
                0..=pages_alloc,
                any::<bool>(),
            )
        })
        .prop_flat_map(move |(pages_alloc, normal, zero, sync)| {
            let (normal, zero) = if sync {
                (0, 0)
            } else {
                (normal, zero.min(pages_alloc - normal))
            };
            // Page-aligned offsets anywhere in a 2^40-byte block.
            let offset = (0u64..(1u64 << 40) / page_size).prop_map(move |page| page * page_size);
            let raw = u64::from(normal) * page_size;
            // Where the raw fallback was negotiated, packets with an odd page count use it.
            let uncompressed =
                limits.extensions & Flags::UNCOMPRESSED != 0 && normal % 2 == 1 && !sync;
            let bound = if uncompressed {
                None
            } else {
                limits.compression.max_payload(raw)
            };
            let payload = match (sync, bound) {
                // A packet without normal pages has no payload, whatever the method.
                (true, _) | (false, Some(_)) if normal == 0 => Just(0u32).boxed(),
                (true, _) => Just(0u32).boxed(),
                (false, None) => Just(u32::try_from(raw).unwrap()).boxed(),
                (false, Some(bound)) => (0..=u32::try_from(bound).unwrap()).boxed(),
            };
            (
                Just(pages_alloc),
                Just(sync),
                vec(offset.clone(), normal as usize),
                vec(offset, zero as usize),
                payload,
                any::<u64>(),
                name_field_string(),
                any::<u32>(),
                Just(uncompressed),
            )
        })
        .prop_map(
            move |(
                pages_alloc,
                sync,
                normal,
                zero,
                next_packet_size,
                packet_num,
                ramblock,
                ext,
                uncompressed,
            )| {
                let other_extensions = limits.extensions & !(Flags::LZ4 | Flags::UNCOMPRESSED);
                let mut flags = limits.compression.to_wire() | (ext & other_extensions);
                if sync {
                    flags |= Flags::SYNC;
                }
                if uncompressed {
                    flags |= Flags::UNCOMPRESSED;
                }
                OwnedRamPacket {
                    flags: Flags(flags),
                    pages_alloc,
                    next_packet_size,
                    packet_num,
                    ramblock: if sync { String::new() } else { ramblock },
                    normal,
                    zero,
                }
            },
        )
}

/// Limits and a valid RAM packet for them.
pub fn limits_and_ram_packet() -> impl Strategy<Value = (RamLimits, OwnedRamPacket)> {
    ram_limits().prop_flat_map(|limits| (Just(limits), ram_packet(limits)))
}

pub fn chunk_header() -> impl Strategy<Value = DeviceStateChunkHeader> {
    (any::<u32>(), any::<bool>())
        .prop_map(|(idx, config_state)| DeviceStateChunkHeader { idx, config_state })
}

pub fn zero_page_mode() -> impl Strategy<Value = ZeroPageMode> {
    prop_oneof![Just(ZeroPageMode::None), Just(ZeroPageMode::Multifd)]
}

pub fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u32>(),
        any::<[u8; 16]>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        compression(),
        any::<i32>(),
        zero_page_mode(),
        any::<u32>(),
    )
        .prop_map(
            |(
                protocol_version,
                uuid,
                channels,
                page_size,
                packet_size,
                compression,
                compression_level,
                zero_page,
                extensions,
            )| Hello {
                protocol_version,
                uuid,
                channels,
                page_size,
                packet_size,
                compression,
                compression_level,
                zero_page,
                extensions,
            },
        )
}

pub fn totals() -> impl Strategy<Value = Totals> {
    any::<[u64; 7]>().prop_map(|values| Totals {
        packets: values[0],
        normal_pages: values[1],
        zero_pages: values[2],
        payload_bytes: values[3],
        rounds: values[4],
        device_chunks: values[5],
        device_bytes: values[6],
    })
}

pub fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop_oneof![
        Just(RejectCode::Version),
        Just(RejectCode::ChannelCount),
        Just(RejectCode::PageSize),
        Just(RejectCode::PacketSize),
        Just(RejectCode::Uuid),
        Just(RejectCode::Compression),
        Just(RejectCode::Extensions),
        Just(RejectCode::ZeroPage),
        Just(RejectCode::RamBlocks),
        Just(RejectCode::Devices),
    ]
}

pub fn control_message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        hello().prop_map(ControlMessage::Hello),
        vec(
            (control_string(), any::<u64>())
                .prop_map(|(name, length)| BlockAnnouncement { name, length }),
            0..40,
        )
        .prop_map(ControlMessage::RamBlocks),
        vec(
            (control_string(), any::<u32>())
                .prop_map(|(idstr, instance_id)| DeviceAnnouncement { idstr, instance_id }),
            0..40,
        )
        .prop_map(ControlMessage::Devices),
        any::<u64>().prop_map(|round| ControlMessage::RoundEnd { round }),
        any::<u64>().prop_map(|round| ControlMessage::RoundReceived { round }),
        Just(ControlMessage::SwitchoverStart),
        totals().prop_map(ControlMessage::Complete),
        control_string().prop_map(ControlMessage::Abort),
        Just(ControlMessage::Welcome),
        (reject_code(), control_string())
            .prop_map(|(code, detail)| ControlMessage::Reject(RejectReason { code, detail })),
        totals().prop_map(ControlMessage::Completed),
        control_string().prop_map(ControlMessage::Failed),
    ]
}

/// Every message type the crate defines, one example each.
pub fn one_of_each_message() -> Vec<ControlMessage> {
    vec![
        ControlMessage::Hello(Hello {
            protocol_version: 1,
            uuid: [7; 16],
            channels: 4,
            page_size: 4096,
            packet_size: 512 << 10,
            compression: Compression::Zstd,
            compression_level: 1,
            zero_page: ZeroPageMode::Multifd,
            extensions: 0,
        }),
        ControlMessage::RamBlocks(vec![BlockAnnouncement {
            name: "pc.ram".into(),
            length: 1 << 30,
        }]),
        ControlMessage::Devices(vec![DeviceAnnouncement {
            idstr: "0000:00:02.0/vfio".into(),
            instance_id: 0,
        }]),
        ControlMessage::DeviceSettings(DeviceStateSettings {
            max_payload: 1 << 20,
            dedicated_channels: 2,
        }),
        ControlMessage::RoundEnd { round: 1 },
        ControlMessage::SwitchoverStart,
        ControlMessage::Complete(Totals::default()),
        ControlMessage::Abort("cancelled".into()),
        ControlMessage::Welcome,
        ControlMessage::Reject(RejectReason {
            code: RejectCode::PageSize,
            detail: "4096 != 65536".into(),
        }),
        ControlMessage::Completed(Totals::default()),
        ControlMessage::Failed("disk full".into()),
        ControlMessage::RoundReceived { round: 3 },
    ]
}

/// Builds a control frame by hand: type, length, payload.
pub fn frame(message_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&message_type.to_be_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}
