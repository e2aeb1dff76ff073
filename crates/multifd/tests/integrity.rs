//! The CRC32C integrity extension: migrations stay byte-exact with it, and a byte flipped
//! on the wire inside a page's payload is a named error on both ends (nothing of the
//! packet applied), where without it the corruption lands silently in guest memory.

mod common;

use std::io::{Read, Write};

use common::*;
use multifd::{
    Address, Compression, CompressionSettings, Error, GuestMemory, Integrity, Link, Side, Source,
    SourceConfig, Violation,
};

fn source_memory() -> GuestMemory {
    let block = block("pc.ram", 2 << 20);
    fill_random(&block, 9);
    GuestMemory::new(vec![block]).expect("memory")
}

fn config(integrity: Integrity, compression: CompressionSettings) -> SourceConfig {
    let mut config = SourceConfig::default();
    config.channels = 2;
    config.integrity = integrity;
    config.compression = compression;
    config
}

/// Migrates `source_memory()` through `address`; the source's and the destination's
/// results and the destination's memory.
fn migrate(
    listener: multifd::Listener,
    address: &Address,
    config: &SourceConfig,
) -> (
    Result<multifd::MigrationStats, Error>,
    Result<multifd::MigrationStats, Error>,
    GuestMemory,
    GuestMemory,
) {
    let memory = source_memory();
    let received = empty_like(&memory);
    let destination = spawn_destination(listener, quick_destination_config(), received.clone());
    let sent = Source::connect(address, config, memory.clone()).and_then(|mut source| {
        source.queue_block(0)?;
        source.complete()
    });
    let destination = join_within(destination, DEADLINE);
    (sent, destination, memory, received)
}

#[test]
fn migrations_with_crc32c_are_byte_exact() {
    for compression in [
        CompressionSettings::NONE,
        CompressionSettings::new(Compression::Zstd, None).expect("zstd"),
    ] {
        let (listener, address) = listener(false);
        let (sent, received, memory, copy) =
            migrate(listener, &address, &config(Integrity::Crc32c, compression));
        sent.expect("source");
        received.expect("destination");
        assert!(
            bytes(&memory.blocks()[0]) == bytes(&copy.blocks()[0]),
            "{compression}"
        );
    }
}

/// A relay that flips one byte of channel 0's stream at `at` (counted after its hello).
fn flipping_proxy(target: &Address, at: usize) -> Address {
    relay(
        target,
        move |channel, mut from_source, mut to_destination| {
            let mut buffer = [0u8; 1 << 16];
            let mut seen = 0usize;
            while let Ok(read) = from_source.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                if channel == Some(0) && (seen..seen + read).contains(&at) {
                    buffer[at - seen] ^= 0x01;
                }
                seen += read;
                if to_destination.write_all(&buffer[..read]).is_err() {
                    break;
                }
            }
        },
    )
}

/// 5000 bytes into the payload of channel 0's first RAM packet (1344 bytes of packet at
/// 128 pages per packet).
const FLIPPED: usize = 1344 + 5000;

#[test]
fn a_flipped_payload_bit_is_a_named_error_on_both_ends() {
    let (listener, address) = listener(false);
    let proxy = flipping_proxy(&address, FLIPPED);
    let (sent, received, _, _) = migrate(
        listener,
        &proxy,
        &config(Integrity::Crc32c, CompressionSettings::NONE),
    );
    let error = received.expect_err("the destination detects the flip");
    assert!(
        matches!(
            error,
            Error::Protocol {
                side: Side::Destination,
                link: Link::Channel(0),
                source: Violation::ChecksumMismatch { .. },
            }
        ),
        "{error}"
    );
    let error = sent.expect_err("the source is told");
    assert!(
        error.to_string().contains("CRC32C mismatch on packet_num"),
        "{error}"
    );
}

#[test]
fn without_crc32c_the_same_flip_corrupts_memory_silently() {
    let (listener, address) = listener(false);
    let proxy = flipping_proxy(&address, FLIPPED);
    let (sent, received, memory, copy) = migrate(
        listener,
        &proxy,
        &config(Integrity::None, CompressionSettings::NONE),
    );
    sent.expect("the source succeeds");
    received.expect("the destination succeeds");
    assert!(bytes(&memory.blocks()[0]) != bytes(&copy.blocks()[0]));
}

#[test]
fn a_destination_requiring_crc32c_rejects_a_source_without_it() {
    let (listener, address) = listener(false);
    let mut destination_config = quick_destination_config();
    destination_config.integrity = Some(Integrity::Crc32c);
    let destination = spawn_destination(listener, destination_config, source_memory());
    let error = Source::connect(
        &address,
        &config(Integrity::None, CompressionSettings::NONE),
        source_memory(),
    )
    .map(|_| ())
    .expect_err("rejected");
    assert!(error.to_string().contains("integrity"), "{error}");
    join_within(destination, DEADLINE).expect_err("the destination rejects");
}
