//! Compression end to end: every method at several levels and channel counts moves mixed
//! images byte for byte, channel streams stay in step over many packets and rounds,
//! incompressible pages cost no more than raw ones, and a hand-driven source's corrupt,
//! short, over-inflating, oversized and truncated payloads end the destination with the
//! exact error for each method.
// Assertion helpers take the (error, reason) pair or the config a test case has just
// built inline, and tests read better passing it by value.
#![allow(clippy::needless_pass_by_value)]

mod common;

use std::thread::JoinHandle;

use common::*;
use multifd::bench_internals::PacketCompressor;
use multifd::{
    BlockAnnouncement, Compression, CompressionSettings, Error, GuestMemory, Link, MigrationStats,
    Side, Source, SourceConfig, Violation,
};
use multifd_wire::{Flags, WireError};

/// Every method, at its default level and at others worth covering: zlib's stored
/// level 0 (never shrinks, so every packet takes the raw fallback), a slow level, and
/// zstd's fast negative levels.
const SETTINGS: [(Compression, Option<i32>); 8] = [
    (Compression::None, None),
    (Compression::Zlib, None),
    (Compression::Zlib, Some(0)),
    (Compression::Zlib, Some(6)),
    (Compression::Zstd, None),
    (Compression::Zstd, Some(-5)),
    (Compression::Zstd, Some(9)),
    (Compression::Lz4, None),
];

fn settings(method: Compression, level: Option<i32>) -> CompressionSettings {
    CompressionSettings::new(method, level).expect("valid settings")
}

/// Migrates every block of `source_memory` in `rounds` rounds (the whole memory each
/// round, `between_rounds` changing it in between) with `compression`; the destination
/// requires the same settings. Returns both sides' statistics once the copy is checked.
fn migrate(
    source_memory: &GuestMemory,
    channels: u8,
    compression: CompressionSettings,
    rounds: u64,
    mut between_rounds: impl FnMut(u64),
) -> (MigrationStats, MigrationStats) {
    let destination_memory = empty_like(source_memory);
    let (listener, address) = listener(false);
    let destination = spawn_destination(
        listener,
        {
            let mut config = quick_destination_config();
            config.compression = Some(compression);
            config
        },
        destination_memory.clone(),
    );
    let config = {
        let mut config = SourceConfig::default();
        config.channels = channels;
        config.compression = compression;
        config
    };
    let mut source = Source::connect(&address, &config, source_memory.clone()).expect("connect");
    for round in 0..rounds {
        if round > 0 {
            between_rounds(round);
        }
        for index in 0..source_memory.blocks().len() {
            source.queue_block(index).expect("queue");
        }
        source.end_round().expect("end round");
    }
    let sent = source.complete().expect("source completes");
    let received = join_within(destination, DEADLINE).expect("destination completes");
    for (original, copy) in source_memory
        .blocks()
        .iter()
        .zip(destination_memory.blocks())
    {
        assert!(
            bytes(original) == bytes(copy),
            "{compression}, {channels} channels: block {} differs",
            original.name()
        );
    }
    assert_eq!(sent.payload_bytes, received.payload_bytes);
    assert_eq!(sent.raw_payload_bytes, received.raw_payload_bytes);
    assert_eq!(sent.uncompressed_packets, received.uncompressed_packets);
    assert_eq!(sent.raw_payload_bytes, sent.normal_pages * PAGE as u64);
    (sent, received)
}

fn mixed_memory(seed: u64) -> GuestMemory {
    let blocks = vec![block("pc.ram", 2 << 20), block("vga.vram", 256 << 10)];
    for (index, block) in blocks.iter().enumerate() {
        fill_mixed(block, seed + index as u64);
    }
    GuestMemory::new(blocks).expect("memory")
}

#[test]
fn mixed_images_round_trip_with_every_method_level_and_channel_count() {
    for (method, level) in SETTINGS {
        for channels in [1, 3] {
            let compression = settings(method, level);
            let memory = mixed_memory(u64::from(channels) + 11);
            let (sent, _) = migrate(&memory, channels, compression, 1, |_| {});
            assert!(
                sent.zero_pages > 0,
                "zero pages are found before compression"
            );
            let compressing = method != Compression::None && level != Some(0);
            if compressing {
                // A quarter of the pages are random: the rest must more than make up.
                assert!(
                    sent.compression_ratio() > 1.5,
                    "{compression}: ratio {}",
                    sent.compression_ratio()
                );
                assert!(sent.codec_time > std::time::Duration::ZERO);
            } else {
                assert_eq!(sent.payload_bytes, sent.raw_payload_bytes, "{compression}");
            }
        }
    }
}

#[test]
fn streams_stay_in_step_over_many_packets_and_rounds() {
    // Small packets (4 pages) and 4 rounds that each change a third of the pages: every
    // channel carries dozens of packets per stream, raw fallbacks included.
    for method in [Compression::Zlib, Compression::Zstd, Compression::Lz4] {
        let memory = mixed_memory(3);
        let destination_memory = empty_like(&memory);
        let (listener, address) = listener(true);
        let compression = settings(method, None);
        let destination = spawn_destination(
            listener,
            quick_destination_config(),
            destination_memory.clone(),
        );
        let config = {
            let mut config = SourceConfig::default();
            config.channels = 2;
            config.packet_size = 4 * PAGE as u32;
            config.compression = compression;
            config
        };
        let mut source = Source::connect(&address, &config, memory.clone()).expect("connect");
        for round in 0..4u64 {
            if round > 0 {
                let pc_ram = &memory.blocks()[0];
                for (index, page) in bytes_mut(pc_ram).chunks_mut(PAGE).enumerate() {
                    if index as u64 % 3 == round % 3 {
                        page[..8].copy_from_slice(&round.to_le_bytes());
                    }
                }
            }
            source.queue_block(0).expect("queue");
            source.queue_block(1).expect("queue");
            source.end_round().expect("end round");
        }
        let sent = source.complete().expect("source completes");
        join_within(destination, DEADLINE).expect("destination completes");
        for (original, copy) in memory.blocks().iter().zip(destination_memory.blocks()) {
            assert!(
                bytes(original) == bytes(copy),
                "{method}: {} differs",
                original.name()
            );
        }
        let pages_per_channel = sent.packets / 2;
        assert!(
            pages_per_channel > 200,
            "{method}: {pages_per_channel} packets per channel"
        );
        assert!(
            sent.uncompressed_packets > 0,
            "{method}: random packets went raw"
        );
    }
}

#[test]
fn incompressible_pages_cost_no_more_than_raw() {
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    fill_random(&memory.blocks()[0], 99);
    let (raw, _) = migrate(&memory, 2, CompressionSettings::NONE, 1, |_| {});
    for (method, level) in SETTINGS {
        let compression = settings(method, level);
        let (sent, received) = migrate(&memory, 2, compression, 1, |_| {});
        assert_eq!(sent.bytes, raw.bytes, "{compression}: wire bytes");
        assert_eq!(sent.payload_bytes, sent.raw_payload_bytes, "{compression}");
        let page_packets = sent.packets - sent.channels.len() as u64;
        let expected_raw = if method == Compression::None {
            0
        } else {
            page_packets
        };
        assert_eq!(sent.uncompressed_packets, expected_raw, "{compression}");
        assert_eq!(received.uncompressed_packets, expected_raw, "{compression}");
    }
}

// --- a hand-driven source sending hostile compressed payloads ---------------------------

const BLOCK: &str = "pc.ram";
const BLOCK_LEN: u64 = 16 * RAW_PAGE as u64;
const UUID: [u8; 16] = *b"compression-uuid";

/// A destination and a raw source on one channel with `method` at its default level.
struct Session {
    raw: RawSource,
    destination: JoinHandle<Result<MigrationStats, Error>>,
}

fn session(method: Compression) -> Session {
    let (listener, address) = listener(false);
    let memory = GuestMemory::new(vec![block(BLOCK, BLOCK_LEN as usize)]).expect("memory");
    let destination = spawn_destination(listener, quick_destination_config(), memory);
    let compression = settings(method, None);
    let hello = multifd_wire::Hello {
        compression: method,
        compression_level: compression.level,
        extensions: method.extension() | Flags::UNCOMPRESSED,
        ..raw_hello(1, UUID)
    };
    let announced = vec![BlockAnnouncement {
        name: BLOCK.into(),
        length: BLOCK_LEN,
    }];
    let mut raw = RawSource::connect(&address, &hello, announced);
    raw.open_channels(1);
    Session { raw, destination }
}

impl Session {
    /// Writes `bytes` on the channel and returns the destination's error and the reason
    /// it sent the source.
    fn fails_with(mut self, bytes: &[u8]) -> (Error, String) {
        self.raw.write_channel(0, bytes);
        let error = match join_within(self.destination, DEADLINE) {
            Ok(stats) => panic!("destination succeeded: {stats:?}"),
            Err(error) => error,
        };
        (error, self.raw.expect_failed())
    }
}

/// Text-like pages: compressible by every method.
fn text_pages(pages: usize) -> Vec<u8> {
    b"multifd compresses pages "
        .iter()
        .cycle()
        .take(pages * RAW_PAGE as usize)
        .copied()
        .collect()
}

/// `pages` text pages compressed as the first packet of a fresh `method` stream.
fn compressed(method: Compression, pages: usize) -> Vec<u8> {
    let mut compressor = PacketCompressor::new(settings(method, None), 8 * RAW_PAGE as usize)
        .expect("compressor")
        .expect("a method");
    compressor
        .compress(&text_pages(pages))
        .expect("compress")
        .expect("text pages shrink")
        .to_vec()
}

/// A RAM packet with `normal` pages at offsets 0, 1, … compressed with `method`, whose
/// `next_packet_size` is `size`, followed by `payload`.
fn packet_with_payload(
    method: Compression,
    extra_flags: u32,
    normal: u64,
    size: u32,
    payload: &[u8],
) -> Vec<u8> {
    let offsets: Vec<u64> = (0..normal).map(|page| page * u64::from(RAW_PAGE)).collect();
    let mut bytes = ram_packet(method.to_wire() | extra_flags, BLOCK, &offsets, &[]);
    put_u32_at(&mut bytes, ram_field::NEXT_PACKET_SIZE, size);
    bytes.extend_from_slice(payload);
    bytes
}

fn assert_violation((error, reason): (Error, String), expected: Violation) {
    assert!(
        matches!(
            error,
            Error::Protocol {
                side: Side::Destination,
                link: Link::Channel(0),
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.violation(), Some(&expected), "{error}");
    assert!(reason.contains("channel 0"), "{reason}");
    assert!(reason.contains(&expected.to_string()), "{reason}");
}

fn assert_wire((error, reason): (Error, String), expected: WireError) {
    assert!(
        matches!(
            error,
            Error::Wire {
                side: Side::Destination,
                link: Link::Channel(0),
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.wire_error(), Some(&expected), "{error}");
    assert!(reason.contains(&expected.to_string()), "{reason}");
}

const COMPRESSED_METHODS: [Compression; 3] =
    [Compression::Zlib, Compression::Zstd, Compression::Lz4];

#[test]
fn corrupt_payloads() {
    let garbage = [0xa5u8; 64];
    for (method, detail) in [
        (
            Compression::Zlib,
            "deflate decompression error: incorrect header check",
        ),
        (Compression::Zstd, "Unknown frame descriptor"),
        (
            Compression::Lz4,
            "block of 2779096485 bytes past the payload's end (60 bytes left)",
        ),
    ] {
        let packet = packet_with_payload(method, 0, 2, garbage.len() as u32, &garbage);
        assert_violation(
            session(method).fails_with(&packet),
            Violation::CorruptPayload {
                method,
                packet_num: 0,
                detail: detail.into(),
            },
        );
    }
}

#[test]
fn payloads_that_inflate_short() {
    for method in COMPRESSED_METHODS {
        let payload = compressed(method, 1);
        let packet = packet_with_payload(method, 0, 2, payload.len() as u32, &payload);
        assert_violation(
            session(method).fails_with(&packet),
            Violation::PayloadInflatesShort {
                method,
                packet_num: 0,
                inflated: u64::from(RAW_PAGE),
                expected: 2 * u64::from(RAW_PAGE),
            },
        );
    }
}

#[test]
fn payloads_that_inflate_past_their_pages() {
    for method in COMPRESSED_METHODS {
        let payload = compressed(method, 2);
        let packet = packet_with_payload(method, 0, 1, payload.len() as u32, &payload);
        assert_violation(
            session(method).fails_with(&packet),
            Violation::PayloadInflatesLong {
                method,
                packet_num: 0,
                expected: u64::from(RAW_PAGE),
            },
        );
    }
}

#[test]
fn payloads_above_the_method_bound() {
    for method in COMPRESSED_METHODS {
        let raw = 2 * u64::from(RAW_PAGE);
        let bound = method.max_payload(raw).expect("a bound");
        let size = bound as u32 + 1;
        // Refused from the packet alone: not a payload byte is read or allocated.
        let packet = packet_with_payload(method, 0, 2, size, &[]);
        assert_wire(
            session(method).fails_with(&packet),
            WireError::PayloadTooLarge {
                size,
                bound,
                normal_pages: 2,
            },
        );
    }
}

#[test]
fn truncated_payloads() {
    for method in COMPRESSED_METHODS {
        let payload = compressed(method, 2);
        let packet = packet_with_payload(
            method,
            0,
            2,
            payload.len() as u32,
            &payload[..payload.len() / 2],
        );
        let mut session = session(method);
        session.raw.write_channel(0, &packet);
        session.raw.close_channel(0);
        let error = join_within(session.destination, DEADLINE).expect_err("truncated");
        assert!(
            matches!(
                error,
                Error::Closed {
                    side: Side::Destination,
                    link: Link::Channel(0),
                    context: "mid-payload",
                }
            ),
            "{method}: {error:?}"
        );
    }
}

#[test]
fn raw_fallback_payload_must_be_the_raw_pages() {
    for method in COMPRESSED_METHODS {
        let size = u64::from(RAW_PAGE) + 1;
        let packet = packet_with_payload(method, Flags::UNCOMPRESSED, 1, size as u32, &[]);
        assert_wire(
            session(method).fails_with(&packet),
            WireError::PayloadSizeMismatch {
                size: size as u32,
                expected: u64::from(RAW_PAGE),
            },
        );
    }
}

#[test]
fn a_corrupt_packet_after_valid_ones_names_its_packet() {
    // The stream is checked packet by packet: a valid first packet lands, the second
    // (its bytes flipped) fails with its own packet number.
    for method in COMPRESSED_METHODS {
        let mut compressor = PacketCompressor::new(settings(method, None), 8 * RAW_PAGE as usize)
            .expect("compressor")
            .expect("a method");
        let first = compressor
            .compress(&text_pages(2))
            .expect("compress")
            .expect("shrinks")
            .to_vec();
        let mut second = compressor
            .compress(&text_pages(2))
            .expect("compress")
            .expect("shrinks")
            .to_vec();
        for byte in &mut second {
            *byte ^= 0x5a;
        }
        let mut stream = packet_with_payload(method, 0, 2, first.len() as u32, &first);
        let mut next = packet_with_payload(method, 0, 2, second.len() as u32, &second);
        put_u64_at(&mut next, ram_field::PACKET_NUM, 1);
        stream.extend_from_slice(&next);
        let (error, _) = session(method).fails_with(&stream);
        assert!(
            matches!(
                error.violation(),
                Some(
                    Violation::CorruptPayload { packet_num: 1, .. }
                        | Violation::PayloadInflatesShort { packet_num: 1, .. }
                        | Violation::PayloadInflatesLong { packet_num: 1, .. }
                )
            ),
            "{method}: {error:?}"
        );
    }
}

/// The negotiated page-payload extensions (lz4, raw fallback) do not apply to device
/// state: a device-state packet carrying them is refused.
#[test]
fn device_state_packets_carry_no_compression_extensions() {
    for extra in [Flags::UNCOMPRESSED, Flags::LZ4] {
        let mut packet = device_state_packet("dev", 0, 12);
        let flags = Flags::DEVICE_STATE | extra;
        put_u32_at(&mut packet, device_field::FLAGS, flags);
        assert_wire(
            session(Compression::Lz4).fails_with(&packet),
            WireError::UnknownFlags { bits: extra, flags },
        );
    }
}
