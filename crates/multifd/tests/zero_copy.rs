//! Zero-copy sends (`MSG_ZEROCOPY`): byte-exact over TCP with several channels and rounds,
//! every send finished by the kernel before each round's SYNC; refused with compression,
//! TLS and integrity, and on a Unix socket, with a clear error.

mod common;

use common::*;
use multifd::{
    Compression, CompressionSettings, Error, GuestMemory, Integrity, Source, SourceConfig,
    TlsConfig,
};

fn zero_copy_config() -> SourceConfig {
    let mut config = SourceConfig::default();
    config.channels = 4;
    config.zero_copy = true;
    config
}

#[test]
fn a_zero_copy_migration_is_byte_exact_over_several_rounds() {
    let memory = GuestMemory::new(vec![block("pc.ram", 8 << 20), block("vga.vram", 1 << 20)])
        .expect("memory");
    fill_mixed(&memory.blocks()[0], 21);
    fill_random(&memory.blocks()[1], 22);
    let copy = empty_like(&memory);
    let (listener, address) = listener(false);
    let destination = spawn_destination(listener, quick_destination_config(), copy.clone());
    let mut source =
        Source::connect(&address, &zero_copy_config(), memory.clone()).expect("connect");
    source.queue_block(0).expect("queue");
    source.queue_block(1).expect("queue");
    source.end_round().expect("round 1");
    // Round 2: every 7th page of the first block changes and is sent again.
    let pages = bytes_mut(&memory.blocks()[0]);
    for page in (0..pages.len() / 4096).step_by(7) {
        pages[page * 4096] ^= 0xa5;
        source
            .queue_page(0, (page * 4096) as u64)
            .expect("queue page");
    }
    let stats = source.complete().expect("complete");
    join_within(destination, DEADLINE).expect("destination");
    for (sent, received) in memory.blocks().iter().zip(copy.blocks()) {
        assert!(bytes(sent) == bytes(received), "{} differs", sent.name());
    }
    let totals = stats.channel_totals();
    assert!(totals.zero_copy_sends > 0, "{totals:?}");
    assert!(
        totals.zero_copy_copied <= totals.zero_copy_sends,
        "{totals:?}"
    );
    eprintln!(
        "zero-copy sends: {}, copied by the kernel: {} (loopback copies)",
        totals.zero_copy_sends, totals.zero_copy_copied
    );
}

/// Turns on one setting that needs the bytes in the source's buffers.
type Setting = fn(&mut SourceConfig, &std::path::Path);

#[test]
fn zero_copy_is_refused_with_what_needs_the_bytes() {
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let (_listener, address) = listener(false);
    let tls_dir = tempfile::tempdir().expect("dir");
    let cases: [(Setting, &str); 3] = [
        (
            |config, _| {
                config.compression =
                    CompressionSettings::new(Compression::Zstd, None).expect("zstd");
            },
            "compression",
        ),
        (|config, dir| config.tls = Some(TlsConfig::new(dir)), "TLS"),
        (
            |config, _| config.integrity = Integrity::Crc32c,
            "integrity checks",
        ),
    ];
    for (set, conflict) in cases {
        let mut config = zero_copy_config();
        set(&mut config, tls_dir.path());
        match Source::connect(&address, &config, memory.clone()) {
            Err(Error::Config(message)) => assert_eq!(
                message,
                format!(
                    "zero-copy sends guest pages as they are in memory, which {conflict} \
                     cannot use: turn one of them off"
                )
            ),
            other => panic!("expected a configuration error, got {:?}", other.err()),
        }
    }
}

#[test]
fn zero_copy_over_a_unix_socket_is_an_error_naming_the_channel() {
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let (listener, address) = listener(true);
    let destination = spawn_destination(listener, quick_destination_config(), empty_like(&memory));
    let error = Source::connect(&address, &zero_copy_config(), memory)
        .err()
        .expect("refused");
    let message = error.to_string();
    assert!(message.contains("enable zero-copy"), "{message}");
    assert!(message.contains("source channel"), "{message}");
    // The destination learns the source went away.
    join_within(destination, DEADLINE).expect_err("no migration");
}
