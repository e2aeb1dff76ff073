//! Rounds: pages re-sent in a later round overwrite the earlier copy on the destination.

mod common;

use common::*;
use multifd::{DestinationConfig, GuestMemory, Source, SourceConfig};

/// Pages changed between rounds are re-sent from a dirty bitmap; the destination ends
/// with the last round's contents, including pages that became zero.
#[test]
fn later_rounds_overwrite_earlier_copies() {
    let source_block = block("pc.ram", 2 << 20);
    fill_mixed(&source_block, 11);
    let source_memory = GuestMemory::new(vec![source_block.clone()]).expect("memory");
    let destination_memory = empty_like(&source_memory);
    let (listener, address) = listener(false);
    let destination = spawn_destination(
        listener,
        DestinationConfig::default(),
        destination_memory.clone(),
    );
    let config = SourceConfig {
        channels: 4,
        ..SourceConfig::default()
    };
    let mut source = Source::connect(&address, &config, source_memory).expect("connect");
    source.queue_block(0).expect("queue");
    source.end_round().expect("round 1");

    // Between rounds the "guest" writes: page 3 changes, page 7 becomes zero, page 9 gets
    // new data; the dirty bitmap names exactly those.
    let pages = bytes_mut(&source_block);
    pages[3 * PAGE..4 * PAGE].fill(0x5a);
    pages[7 * PAGE..8 * PAGE].fill(0);
    pages[9 * PAGE + 100] ^= 0xff;
    source
        .queue_dirty_bitmap(0, &[(1 << 3) | (1 << 7) | (1 << 9)])
        .expect("queue dirty");
    source.end_round().expect("round 2");

    // Round 3 re-sends page 3 once more, changed again.
    bytes_mut(&source_block)[3 * PAGE..4 * PAGE].fill(0xa5);
    source.queue_page(0, 3 * PAGE as u64).expect("queue page");
    let sent = source.complete().expect("complete");
    let received = destination.join().expect("join").expect("destination");

    assert!(bytes(&source_block) == bytes(&destination_memory.blocks()[0]));
    assert_eq!(sent.rounds, 3);
    assert_eq!(received.rounds, 3);
    assert_eq!(sent.pages_per_round, vec![512, 3, 1]);
    assert_eq!(
        sent.channels
            .iter()
            .map(|channel| channel.sync_packets)
            .sum::<u64>(),
        12
    );
}

/// Queueing a page that is not a whole page inside a block is refused before anything
/// is sent, and the migration can go on.
#[test]
fn queueing_outside_a_block_is_refused() {
    let source_memory = GuestMemory::new(vec![block("pc.ram", 64 << 10)]).expect("memory");
    let destination_memory = empty_like(&source_memory);
    let (listener, address) = listener(true);
    let destination = spawn_destination(listener, DestinationConfig::default(), destination_memory);
    let mut source =
        Source::connect(&address, &SourceConfig::default(), source_memory).expect("connect");
    for (block, offset) in [(0, 64 << 10), (0, 100), (1, 0)] {
        assert!(matches!(
            source.queue_page(block, offset),
            Err(multifd::Error::PageOutOfRange { block: b, offset: o }) if b == block && o == offset
        ));
    }
    source.queue_block(0).expect("queue");
    source.complete().expect("complete");
    destination.join().expect("join").expect("destination");
}
