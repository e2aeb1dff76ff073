//! End-to-end migrations over real sockets on loopback: the destination's memory must
//! equal the source's byte for byte.

mod common;

use common::*;
use multifd::{DestinationConfig, GuestMemory, Source, SourceConfig, ZeroPageMode};

fn mixed_memory(seed: u64) -> GuestMemory {
    let blocks = vec![
        block("pc.ram", 4 << 20),
        block("vga.vram", 1 << 20),
        block("rom", 64 << 10),
    ];
    for (index, block) in blocks.iter().enumerate() {
        fill_mixed(block, seed + index as u64);
    }
    GuestMemory::new(blocks).expect("memory")
}

fn migrate_all(channels: u8, unix: bool, zero_page: ZeroPageMode) {
    let source_memory = mixed_memory(u64::from(channels) * 7 + 1);
    let destination_memory = empty_like(&source_memory);
    let (listener, address) = listener(unix);
    let destination = spawn_destination(
        listener,
        DestinationConfig::default(),
        destination_memory.clone(),
    );
    let config = {
        let mut config = SourceConfig::default();
        config.channels = channels;
        config.zero_page = zero_page;
        config
    };
    let mut source = Source::connect(&address, &config, source_memory.clone()).expect("connect");
    for index in 0..source_memory.blocks().len() {
        source.queue_block(index).expect("queue");
    }
    let sent = source.complete().expect("source completes");
    let received = destination
        .join()
        .expect("join")
        .expect("destination completes");
    for (original, copy) in source_memory
        .blocks()
        .iter()
        .zip(destination_memory.blocks())
    {
        assert!(
            bytes(original) == bytes(copy),
            "block {} differs",
            original.name()
        );
    }
    let pages = source_memory
        .blocks()
        .iter()
        .map(|block| block.len())
        .sum::<u64>()
        / PAGE as u64;
    assert_eq!(sent.normal_pages + sent.zero_pages, pages);
    assert_eq!(sent.normal_pages, received.normal_pages);
    assert_eq!(sent.zero_pages, received.zero_pages);
    assert_eq!(sent.bytes, received.bytes);
    assert_eq!(sent.channels.len(), usize::from(channels));
    match zero_page {
        ZeroPageMode::Multifd => assert!(sent.zero_pages > pages / 8, "zero pages detected"),
        ZeroPageMode::None => assert_eq!(sent.zero_pages, 0),
    }
    if channels > 1 {
        assert!(
            sent.channels
                .iter()
                .filter(|channel| channel.normal_pages > 0)
                .count()
                > 1,
            "work spread over channels: {:?}",
            sent.channels
        );
    }
}

#[test]
fn one_channel_over_tcp() {
    migrate_all(1, false, ZeroPageMode::Multifd);
}

#[test]
fn four_channels_over_tcp() {
    migrate_all(4, false, ZeroPageMode::Multifd);
}

#[test]
fn sixteen_channels_over_tcp() {
    migrate_all(16, false, ZeroPageMode::Multifd);
}

#[test]
fn one_channel_over_unix() {
    migrate_all(1, true, ZeroPageMode::Multifd);
}

#[test]
fn four_channels_over_unix() {
    migrate_all(4, true, ZeroPageMode::Multifd);
}

#[test]
fn sixteen_channels_over_unix() {
    migrate_all(16, true, ZeroPageMode::Multifd);
}

#[test]
fn without_zero_page_detection() {
    migrate_all(4, false, ZeroPageMode::None);
}

/// A progress watcher sees the announced size from the start, never sees the transferred
/// count go backwards, and the monitor ends at the whole memory.
#[test]
fn progress_is_reported_while_migrating() {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    let source_memory = mixed_memory(99);
    let total: u64 = source_memory.blocks().iter().map(|block| block.len()).sum();
    let (listener, address) = listener(false);
    let destination = spawn_destination(
        listener,
        DestinationConfig::default(),
        empty_like(&source_memory),
    );
    let mut source =
        Source::connect(&address, &SourceConfig::default(), source_memory).expect("connect");
    let monitor = source.monitor();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let seen = Arc::clone(&seen);
        monitor.watch(Duration::from_millis(1), move |progress| {
            seen.lock().expect("lock").push(*progress);
        })
    };
    for block in 0..3 {
        source.queue_block(block).expect("queue");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = source.complete().expect("complete");
    drop(watcher);
    destination.join().expect("join").expect("destination");

    let seen = seen.lock().expect("lock");
    assert!(seen.len() >= 2, "watcher called {} times", seen.len());
    assert!(seen.iter().all(|progress| progress.guest_bytes == total));
    assert!(seen
        .windows(2)
        .all(|pair| pair[0].guest_bytes_done <= pair[1].guest_bytes_done));
    let last = monitor.progress();
    assert_eq!(last.guest_bytes_done, total);
    assert_eq!(last.bytes, stats.bytes);
    assert_eq!(last.rounds, 1);
}

/// A destination carries exactly one migration; a second `run` is refused at once.
#[test]
fn a_destination_runs_one_migration() {
    let source_memory = GuestMemory::new(vec![block("pc.ram", 64 << 10)]).expect("memory");
    let (listener, address) = listener(true);
    let destination = std::sync::Arc::new(multifd::Destination::new(DestinationConfig::default()));
    let receiving = {
        let destination = std::sync::Arc::clone(&destination);
        let memory = empty_like(&source_memory);
        std::thread::spawn(move || destination.run(&listener, |_| Ok(memory)).map(|_| listener))
    };
    let mut source =
        Source::connect(&address, &SourceConfig::default(), source_memory).expect("connect");
    source.queue_block(0).expect("queue");
    source.complete().expect("complete");
    let listener = receiving.join().expect("join").expect("first run");
    let again = destination.run(&listener, |_| Err("unused".into()));
    assert!(
        matches!(&again, Err(multifd::Error::Config(message)) if message.contains("one migration")),
        "{again:?}"
    );
}

/// Migrates mixed memory into destination memory full of 0xab (a retry into a used
/// buffer) with `memory_zeroed` as given; returns how many pages end up wrong.
fn pages_wrong_after_migrating_into_used_memory(memory_zeroed: bool) -> usize {
    let source_memory = mixed_memory(99);
    let destination_memory = empty_like(&source_memory);
    for block in destination_memory.blocks() {
        bytes_mut(block).fill(0xab);
    }
    let (listener, address) = listener(false);
    let mut config = DestinationConfig::default();
    config.memory_zeroed = memory_zeroed;
    let destination = spawn_destination(listener, config, destination_memory.clone());
    let mut source = Source::connect(&address, &SourceConfig::default(), source_memory.clone())
        .expect("connect");
    for index in 0..source_memory.blocks().len() {
        source.queue_block(index).expect("queue");
    }
    source.complete().expect("source completes");
    destination
        .join()
        .expect("join")
        .expect("destination completes");
    source_memory
        .blocks()
        .iter()
        .zip(destination_memory.blocks())
        .map(|(original, copy)| {
            bytes(original)
                .chunks(PAGE)
                .zip(bytes(copy).chunks(PAGE))
                .filter(|(a, b)| a != b)
                .count()
        })
        .sum()
}

#[test]
fn zero_pages_are_written_into_memory_not_known_to_be_zeroed() {
    // The default assumes nothing of the destination's memory: byte for byte.
    assert_eq!(pages_wrong_after_migrating_into_used_memory(false), 0);
    // Claiming zeroed memory that is not skips the zero pages: the check can fail.
    assert!(pages_wrong_after_migrating_into_used_memory(true) > 0);
}
