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
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 4;
        config
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

/// With round receipts the source learns when a round is in the destination's memory:
/// once `wait_until_received` says so, the destination holds every page of the rounds
/// ended so far.
#[test]
fn a_round_receipt_means_the_round_is_in_the_destination_memory() {
    let source_block = block("pc.ram", 8 << 20);
    fill_mixed(&source_block, 5);
    let source_memory = GuestMemory::new(vec![source_block.clone()]).expect("memory");
    let destination_memory = empty_like(&source_memory);
    let (listener, address) = listener(false);
    let destination = spawn_destination(
        listener,
        DestinationConfig::default(),
        destination_memory.clone(),
    );
    let mut config = SourceConfig::default();
    config.channels = 2;
    let mut source = Source::connect(&address, &config, source_memory).expect("connect");
    let timeout = std::time::Duration::from_secs(10);
    // Nothing ended yet: nothing to wait for.
    assert!(source.wait_until_received(timeout).expect("no rounds"));
    source.queue_block(0).expect("queue");
    source.end_round().expect("round 1");
    assert!(source
        .wait_until_received(timeout)
        .expect("round 1 received"));
    assert!(bytes(&source_block) == bytes(&destination_memory.blocks()[0]));

    bytes_mut(&source_block)[5 * PAGE..6 * PAGE].fill(0x77);
    source.queue_page(0, 5 * PAGE as u64).expect("queue page");
    source.end_round().expect("round 2");
    assert!(source
        .wait_until_received(timeout)
        .expect("round 2 received"));
    assert!(bytes(&source_block) == bytes(&destination_memory.blocks()[0]));

    let sent = source.complete().expect("complete");
    destination.join().expect("join").expect("destination");
    assert_eq!(sent.rounds, 2);
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

/// The SYNC barrier: channel 1 carries round 2's copy of a page before channel 0 has even
/// started round 1's copy of it. Without the barrier the destination would apply round
/// 2's copy first and then overwrite it with round 1's; with it, round 2 waits.
/// Channels also connect out of order, one of them before the control channel.
#[test]
fn a_later_round_on_another_channel_waits_for_the_earlier_round() {
    use multifd_wire::{ChannelHello, ControlMessage, Totals};

    let destination_memory = GuestMemory::new(vec![block("pc.ram", 64 << 10)]).expect("memory");
    let (listener, address) = listener(false);
    let destination = spawn_destination(
        listener,
        quick_destination_config(),
        destination_memory.clone(),
    );
    let uuid = [7u8; 16];

    // Channel 1 connects before the control channel does.
    let early = {
        use std::io::Write;
        let mut stream = tcp_connect(&address);
        stream
            .write_all(&ChannelHello { uuid, channel: 1 }.encode())
            .expect("hello");
        stream
    };
    let mut source = RawSource::connect(&address, &raw_hello(2, uuid), small_block_announced());
    source.channels.push(early);
    let channel_0 = source.open_channel(0);
    let channel_1 = 0;

    let round_1_copy = vec![0x11u8; PAGE];
    let round_2_copy = vec![0x22u8; PAGE];
    let page = |contents: &[u8]| {
        let mut bytes = ram_packet(0, "pc.ram", &[0], &[]);
        bytes.extend_from_slice(contents);
        bytes
    };
    // Channel 1: its round-1 SYNC, then round 2's copy and SYNC, all at once.
    source.write_channel(channel_1, &sync_packet());
    source.write_channel(channel_1, &page(&round_2_copy));
    source.write_channel(channel_1, &sync_packet());
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Channel 0, late: round 1's copy, then both SYNCs.
    source.write_channel(channel_0, &page(&round_1_copy));
    source.write_channel(channel_0, &sync_packet());
    source.write_channel(channel_0, &sync_packet());
    source.send(&ControlMessage::RoundEnd { round: 1 });
    source.send(&ControlMessage::RoundEnd { round: 2 });
    let totals = Totals {
        packets: 6,
        normal_pages: 2,
        zero_pages: 0,
        payload_bytes: 2 * PAGE as u64,
        rounds: 2,
        device_chunks: 0,
        device_bytes: 0,
    };
    source.send(&ControlMessage::Complete(totals));
    assert_eq!(source.receive(), ControlMessage::Completed(totals));
    join_within(destination, DEADLINE).expect("destination completes");
    assert!(bytes(&destination_memory.blocks()[0])[..PAGE] == round_2_copy[..]);
}

/// A source may end its first round before the destination has accepted every channel
/// (connections complete in the kernel before `accept`): the early `RoundEnd` is kept,
/// not mistaken for a source giving up.
#[test]
fn a_round_may_end_before_every_channel_is_accepted() {
    use multifd_wire::{ControlMessage, Totals};

    let destination_memory = GuestMemory::new(vec![block("pc.ram", 64 << 10)]).expect("memory");
    let (listener, address) = listener(false);
    let destination = spawn_destination(
        listener,
        quick_destination_config(),
        destination_memory.clone(),
    );
    let mut source = RawSource::connect(&address, &raw_hello(2, [9; 16]), small_block_announced());
    let first = source.open_channel(0);
    let mut packet = ram_packet(0, "pc.ram", &[4096], &[]);
    packet.extend_from_slice(&[0x33; PAGE]);
    source.write_channel(first, &packet);
    source.write_channel(first, &sync_packet());
    source.send(&ControlMessage::RoundEnd { round: 1 });
    std::thread::sleep(std::time::Duration::from_millis(150));
    let second = source.open_channel(1);
    source.write_channel(second, &sync_packet());
    let totals = Totals {
        packets: 3,
        normal_pages: 1,
        payload_bytes: PAGE as u64,
        rounds: 1,
        ..Totals::default()
    };
    source.send(&ControlMessage::Complete(totals));
    assert_eq!(source.receive(), ControlMessage::Completed(totals));
    join_within(destination, DEADLINE).expect("destination completes");
    assert!(bytes(&destination_memory.blocks()[0])[PAGE..2 * PAGE] == [0x33; PAGE]);
}

/// A channel that sends one SYNC more than the rounds the source ends would wait at the
/// barrier for a round that never comes, and the destination would confirm completion and
/// then hang joining it. The destination refuses to complete instead, naming the channel,
/// and both ends agree the migration failed.
#[test]
fn a_sync_past_the_last_round_fails_the_migration() {
    fails_at_completion(
        (0, &sync_packet()),
        3,
        &multifd::Violation::SyncPastLastRound {
            channel: 0,
            rounds: 1,
        },
    );
}

/// A packet half-sent on a channel when the source declares completion is data outside
/// the confirmed totals, even when they match (a packet is counted once its header is
/// read): the destination refuses to complete, naming the channel, instead of confirming
/// and then failing on the cut packet, and both ends agree the migration failed.
#[test]
fn a_packet_half_sent_at_completion_fails_the_migration() {
    // Ten bytes of a packet header: nothing of it is counted yet, so the totals match,
    // and the channel thread waits for the rest.
    fails_at_completion(
        (1, &ram_packet(0, "pc.ram", &[0], &[])[..10]),
        2,
        &multifd::Violation::PacketAfterCompletion { channel: 1 },
    );
}

/// Ends round 1 on two channels, writes `extra` bytes on one channel, then completes with
/// totals of `packets` packets: the destination must refuse with `expected` on its
/// control channel and tell the source.
fn fails_at_completion(
    (channel, extra): (usize, &[u8]),
    packets: u64,
    expected: &multifd::Violation,
) {
    use multifd::{Error, Link, Side};
    use multifd_wire::{ControlMessage, Totals};

    let destination_memory = GuestMemory::new(vec![block("pc.ram", 64 << 10)]).expect("memory");
    let (listener, address) = listener(false);
    let destination = spawn_destination(listener, quick_destination_config(), destination_memory);
    let mut source = RawSource::connect(&address, &raw_hello(2, [4; 16]), small_block_announced());
    source.open_channels(2);
    source.write_channel(0, &sync_packet());
    source.write_channel(1, &sync_packet());
    source.send(&ControlMessage::RoundEnd { round: 1 });
    source.write_channel(channel, extra);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let totals = Totals {
        packets,
        rounds: 1,
        ..Totals::default()
    };
    source.send(&ControlMessage::Complete(totals));
    let reason = source.expect_failed();
    assert!(reason.contains(&expected.to_string()), "{reason}");
    let error = join_within(destination, DEADLINE).expect_err("the destination fails");
    assert!(
        matches!(
            &error,
            Error::Protocol {
                side: Side::Destination,
                link: Link::Control,
                source,
            } if source == expected
        ),
        "{error}"
    );
}

/// A dirty bitmap naming a page past the block is refused before any of its pages is
/// queued: the round holds only what the caller queued successfully.
#[test]
fn an_oversized_dirty_bitmap_queues_nothing() {
    let source_block = block("pc.ram", 64 * PAGE);
    fill_mixed(&source_block, 3);
    let source_memory = GuestMemory::new(vec![source_block]).expect("memory");
    let destination_memory = empty_like(&source_memory);
    let (listener, address) = listener(false);
    let destination = spawn_destination(
        listener,
        DestinationConfig::default(),
        destination_memory.clone(),
    );
    let mut source =
        Source::connect(&address, &SourceConfig::default(), source_memory).expect("connect");
    // Pages 0 and 1 are in the block; bit 0 of the second word is page 64, past its end.
    let error = source
        .queue_dirty_bitmap(0, &[0b11, 1])
        .expect_err("page 64 is past the block");
    assert!(
        matches!(
            error,
            multifd::Error::PageOutOfRange {
                block: 0,
                offset: 0x40000
            }
        ),
        "{error}"
    );
    source.queue_dirty_bitmap(0, &[0b100]).expect("page 2");
    let sent = source.complete().expect("complete");
    destination.join().expect("join").expect("destination");
    assert_eq!(sent.pages_per_round, vec![1]);
}
