//! The destination against a hand-driven source: every rule of SPEC §5 that applies to
//! RAM packets, device-state packets, channel hellos and the control channel, each broken
//! on its own over a real loopback connection. Every case must end the destination with
//! the exact error (side, connection, field and value), tell the source why on the
//! control channel, and leave no thread running.
// Assertion helpers take the (error, reason) pair or the config a test case has just
// built inline, and tests read better passing it by value.
#![allow(clippy::needless_pass_by_value)]

mod common;

use std::io::Write;
use std::thread::JoinHandle;

use common::*;
use multifd::{BlockAnnouncement, Error, GuestMemory, Link, MigrationStats, Side, Violation};
use multifd_wire::{
    ChannelHello, Compression, ControlMessage, Flags, Totals, WireError, CONTROL_FRAME_HEADER_LEN,
    MAX_CONTROL_FRAME, MULTIFD_MAGIC, MULTIFD_VERSION,
};

/// Channels of every session.
const CHANNELS: u8 = 2;
/// The one RAM block every session announces.
const BLOCK: &str = "pc.ram";
/// Its length: 16 pages.
const BLOCK_LEN: u64 = 16 * RAW_PAGE as u64;
const UUID: [u8; 16] = *b"validation-uuid!";

/// A destination, and a raw source that has passed the handshake (control channel only).
struct Session {
    raw: RawSource,
    destination: JoinHandle<Result<MigrationStats, Error>>,
    memory: GuestMemory,
}

/// Starts a destination and lets a raw source through the handshake.
fn handshake() -> Session {
    handshake_with(quick_destination_config())
}

/// [`handshake`] with a destination that gives up waiting for channels after
/// [`STRAY_WAIT`]: for connections the destination drops as strays, after which it waits
/// on for the channels that never come.
fn stray_session() -> Session {
    let mut config = quick_destination_config();
    config.connect_timeout = STRAY_WAIT;
    handshake_with(config)
}

/// How long a [`stray_session`] waits for its channels.
const STRAY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn handshake_with(config: multifd::DestinationConfig) -> Session {
    let (listener, address) = listener(false);
    let memory = GuestMemory::new(vec![block(BLOCK, BLOCK_LEN as usize)]).expect("memory");
    let destination = spawn_destination(listener, config, memory.clone());
    let raw = RawSource::connect(
        &address,
        &raw_hello(u32::from(CHANNELS), UUID),
        vec![BlockAnnouncement {
            name: BLOCK.into(),
            length: BLOCK_LEN,
        }],
    );
    Session {
        raw,
        destination,
        memory,
    }
}

/// A session with every channel connected.
fn connected() -> Session {
    let mut session = handshake();
    session.raw.open_channels(CHANNELS);
    session
}

impl Session {
    /// The destination's error (it must return within the deadline) and the reason it
    /// sent to the source on the control channel.
    fn failure(mut self) -> (Error, String) {
        let error = match join_within(self.destination, DEADLINE) {
            Ok(stats) => panic!("destination succeeded: {stats:?}"),
            Err(error) => error,
        };
        let reason = self.raw.expect_failed();
        (error, reason)
    }
}

/// Sends `packet` on channel `channel` of a connected session and returns the failure.
fn send_on_channel(channel: u8, packet: &[u8]) -> (Error, String) {
    let mut session = connected();
    session.raw.write_channel(usize::from(channel), packet);
    session.failure()
}

/// Asserts a wire error on channel `channel`, reported to the source as well.
fn assert_channel_wire(channel: u8, (error, reason): (Error, String), expected: WireError) {
    assert!(
        matches!(
            error,
            Error::Wire {
                side: Side::Destination,
                link: Link::Channel(id),
                ..
            } if id == channel
        ),
        "{error:?}"
    );
    assert_eq!(error.wire_error(), Some(&expected), "{error}");
    assert!(reason.contains(&format!("channel {channel}")), "{reason}");
    assert!(reason.contains(&expected.to_string()), "{reason}");
}

/// Asserts a protocol violation on `link`, reported to the source as well.
fn assert_violation(
    link: Link,
    (error, reason): (Error, String),
    expected: Violation,
    reason_names: &str,
) {
    assert!(
        matches!(
            error,
            Error::Protocol {
                side: Side::Destination,
                link: actual,
                ..
            } if actual == link
        ),
        "{error:?}"
    );
    assert_eq!(error.violation(), Some(&expected), "{error}");
    assert!(reason.contains(reason_names), "{reason}");
    assert!(reason.contains(&expected.to_string()), "{reason}");
}

/// Asserts the destination dropped exactly one stray connection, then timed out waiting
/// for `what`; returns why the stray was dropped.
fn stray_error((error, _): (Error, String), what: &str) -> Error {
    match error {
        Error::TimeoutWithStrays {
            side: Side::Destination,
            what: waited,
            strays: 1,
            last,
        } if waited == what => *last,
        other => panic!("expected one stray and a timeout {what}, got {other:?}"),
    }
}

/// Asserts the destination saw a channel close at `context`.
fn assert_closed(channel: u8, (error, reason): (Error, String), context: &str) {
    assert!(
        matches!(
            error,
            Error::Closed {
                side: Side::Destination,
                link: Link::Channel(id),
                context: actual,
            } if id == channel && actual == context
        ),
        "{error:?}"
    );
    assert!(reason.contains(&format!("channel {channel}")), "{reason}");
}

/// One valid RAM packet: pages 0 and 2 with contents, page 1 zero.
fn valid_packet() -> Vec<u8> {
    ram_packet(0, BLOCK, &[0, 2 * RAW_PAGE as u64], &[RAW_PAGE as u64])
}

fn page_bytes(seed: u8) -> Vec<u8> {
    (0..RAW_PAGE as usize)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

// --- the positive case ------------------------------------------------------------------

#[test]
fn valid_packets_sync_and_complete_are_accepted() {
    let mut session = connected();
    let first = page_bytes(1);
    let second = page_bytes(2);
    let mut stream = valid_packet();
    stream.extend_from_slice(&first);
    stream.extend_from_slice(&second);
    stream.extend_from_slice(&sync_packet());
    session.raw.write_channel(0, &stream);
    for channel in 1..usize::from(CHANNELS) {
        session.raw.write_channel(channel, &sync_packet());
    }
    session.raw.send(&ControlMessage::RoundEnd { round: 1 });
    let totals = Totals {
        packets: 1 + u64::from(CHANNELS),
        normal_pages: 2,
        zero_pages: 1,
        payload_bytes: 2 * u64::from(RAW_PAGE),
        rounds: 1,
        device_chunks: 0,
        device_bytes: 0,
    };
    session.raw.send(&ControlMessage::Complete(totals));
    assert_eq!(session.raw.receive(), ControlMessage::Completed(totals));
    for channel in &session.raw.channels {
        channel.shutdown(std::net::Shutdown::Both).expect("close");
    }
    let stats = join_within(session.destination, DEADLINE).expect("destination completes");
    assert_eq!(stats.side, Side::Destination);
    assert_eq!(stats.packets, totals.packets);
    assert_eq!(stats.normal_pages, 2);
    assert_eq!(stats.zero_pages, 1);
    assert_eq!(stats.payload_bytes, totals.payload_bytes);
    assert_eq!(stats.rounds, 1);
    let memory = bytes(&session.memory.blocks()[0]);
    let page = RAW_PAGE as usize;
    assert_eq!(&memory[..page], &first[..]);
    assert!(memory[page..2 * page].iter().all(|&byte| byte == 0));
    assert_eq!(&memory[2 * page..3 * page], &second[..]);
    assert!(memory[3 * page..].iter().all(|&byte| byte == 0));
}

// --- packet header ----------------------------------------------------------------------

#[test]
fn wrong_packet_magic() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::MAGIC, 0xdead_beef);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::BadMagic {
            structure: "packet header",
            value: 0xdead_beef,
            expected: MULTIFD_MAGIC,
        },
    );
}

#[test]
fn wrong_packet_version() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::VERSION, 2);
    assert_channel_wire(
        1,
        send_on_channel(1, &packet),
        WireError::BadVersion {
            structure: "packet header",
            value: 2,
            expected: MULTIFD_VERSION,
        },
    );
}

#[test]
fn unknown_flag() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::FLAGS, 0x80);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::UnknownFlags {
            bits: 0x80,
            flags: 0x80,
        },
    );
}

#[test]
fn unnegotiated_extension_flag() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::FLAGS, Flags::FIRST_EXTENSION);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::UnknownFlags {
            bits: 0x100,
            flags: 0x100,
        },
    );
}

#[test]
fn unnegotiated_compression() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::FLAGS, Compression::Zstd.to_wire());
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::CompressionMismatch {
            negotiated: Compression::None,
            received: Compression::Zstd,
        },
    );
}

#[test]
fn unsupported_qemu_compression() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::FLAGS, 0x08);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::UnsupportedCompression("qpl"),
    );
}

// --- channel hello ----------------------------------------------------------------------

#[test]
fn channel_id_equal_to_the_count() {
    let mut session = handshake();
    session.raw.open_channel(0);
    session.raw.open_channel(CHANNELS);
    assert_violation(
        Link::Channel(CHANNELS),
        session.failure(),
        Violation::ChannelIdOutOfRange {
            id: CHANNELS,
            count: CHANNELS,
        },
        &format!("channel {CHANNELS}"),
    );
}

#[test]
fn channel_id_far_above_the_count() {
    let mut session = handshake();
    session.raw.open_channel(255);
    assert_violation(
        Link::Channel(255),
        session.failure(),
        Violation::ChannelIdOutOfRange {
            id: 255,
            count: CHANNELS,
        },
        "channel 255",
    );
}

#[test]
fn duplicate_channel_id() {
    let mut session = handshake();
    session.raw.open_channel(1);
    session.raw.open_channel(1);
    assert_violation(
        Link::Channel(1),
        session.failure(),
        Violation::DuplicateChannel(1),
        "channel 1",
    );
}

#[test]
fn a_channel_of_another_migration_is_a_stray() {
    let mut session = stray_session();
    session.raw.open_channel(0);
    let other = *b"another-uuid-!!!";
    session.raw.open_channel_with(ChannelHello {
        uuid: other,
        channel: 1,
    });
    let stray = stray_error(session.failure(), "waiting for every channel");
    assert!(
        matches!(
            stray,
            Error::Protocol {
                link: Link::Channel(1),
                ..
            }
        ),
        "{stray:?}"
    );
    assert_eq!(
        stray.violation(),
        Some(&Violation::UuidMismatch {
            expected: multifd::Uuid(UUID),
            received: multifd::Uuid(other),
        })
    );
}

#[test]
fn a_channel_hello_with_a_wrong_version_is_a_stray() {
    let mut session = stray_session();
    let mut hello = ChannelHello {
        uuid: UUID,
        channel: 0,
    }
    .encode();
    put_u32_at(&mut hello, 4, 7);
    session.raw.open_channel_bytes(&hello);
    let stray = stray_error(session.failure(), "waiting for every channel");
    assert!(
        matches!(
            stray,
            Error::Wire {
                side: Side::Destination,
                link: Link::Listener,
                ..
            }
        ),
        "{stray:?}"
    );
    assert_eq!(
        stray.wire_error(),
        Some(&WireError::BadVersion {
            structure: "channel hello",
            value: 7,
            expected: MULTIFD_VERSION,
        })
    );
}

#[test]
fn pages_alloc_above_the_negotiated_count() {
    let mut packet = valid_packet();
    put_u32_at(
        &mut packet,
        ram_field::PAGES_ALLOC,
        RAW_PAGES_PER_PACKET + 1,
    );
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::PagesAllocTooLarge {
            pages_alloc: RAW_PAGES_PER_PACKET + 1,
            max: RAW_PAGES_PER_PACKET,
        },
    );
}

#[test]
fn normal_plus_zero_above_pages_alloc() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::NORMAL_PAGES, 100);
    put_u32_at(&mut packet, ram_field::ZERO_PAGES, 29);
    put_u32_at(&mut packet, ram_field::NEXT_PACKET_SIZE, 100 * RAW_PAGE);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::TooManyPages {
            normal: 100,
            zero: 29,
            pages_alloc: RAW_PAGES_PER_PACKET,
        },
    );
}

#[test]
fn normal_plus_zero_overflowing_u32() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::NORMAL_PAGES, u32::MAX);
    put_u32_at(&mut packet, ram_field::ZERO_PAGES, 2);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::TooManyPages {
            normal: u32::MAX,
            zero: 2,
            pages_alloc: RAW_PAGES_PER_PACKET,
        },
    );
}

#[test]
fn unknown_ramblock() {
    let packet = ram_packet(0, "nvram", &[0], &[]);
    assert_violation(
        Link::Channel(0),
        send_on_channel(0, &packet),
        Violation::UnknownRamBlock("nvram".into()),
        "channel 0",
    );
}

#[test]
fn unterminated_ramblock_name() {
    let mut packet = valid_packet();
    packet[ram_field::RAMBLOCK..ram_field::OFFSETS].fill(b'a');
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::Unterminated { field: "ramblock" },
    );
}

#[test]
fn offset_not_page_aligned() {
    let mut packet = valid_packet();
    put_u64_at(
        &mut packet,
        ram_field::OFFSETS + 8,
        2 * u64::from(RAW_PAGE) + 8,
    );
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::MisalignedOffset {
            offset: 2 * u64::from(RAW_PAGE) + 8,
            page_size: RAW_PAGE,
        },
    );
}

#[test]
fn zero_page_offset_not_page_aligned() {
    let mut packet = valid_packet();
    // The third offset is the zero page's.
    put_u64_at(&mut packet, ram_field::OFFSETS + 16, 1);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::MisalignedOffset {
            offset: 1,
            page_size: RAW_PAGE,
        },
    );
}

fn offset_past_block(offset: u64, zero: bool) {
    let packet = if zero {
        ram_packet(0, BLOCK, &[], &[offset])
    } else {
        ram_packet(0, BLOCK, &[offset], &[])
    };
    assert_violation(
        Link::Channel(0),
        send_on_channel(0, &packet),
        Violation::OffsetPastBlock {
            block: BLOCK.into(),
            offset,
            length: BLOCK_LEN,
        },
        "channel 0",
    );
}

#[test]
fn offset_one_page_past_the_last() {
    let last = BLOCK_LEN - u64::from(RAW_PAGE);
    offset_past_block(last + u64::from(RAW_PAGE), false);
}

#[test]
fn zero_page_offset_one_page_past_the_last() {
    let last = BLOCK_LEN - u64::from(RAW_PAGE);
    offset_past_block(last + u64::from(RAW_PAGE), true);
}

#[test]
fn offset_at_the_top_of_the_address_space() {
    // u64::MAX rounded down to a page.
    offset_past_block(u64::MAX - (u64::from(RAW_PAGE) - 1), false);
}

#[test]
fn last_page_of_the_block_is_accepted() {
    // The edge below `offset_one_page_past_the_last`: the last page itself is fine; the
    // session then fails only where the test makes it fail (an unknown block after it).
    let mut session = connected();
    let last = BLOCK_LEN - u64::from(RAW_PAGE);
    let mut stream = ram_packet(0, BLOCK, &[last], &[]);
    stream.extend_from_slice(&page_bytes(9));
    stream.extend_from_slice(&ram_packet(0, "marker", &[0], &[]));
    session.raw.write_channel(0, &stream);
    let memory = session.memory.clone();
    assert_violation(
        Link::Channel(0),
        session.failure(),
        Violation::UnknownRamBlock("marker".into()),
        "channel 0",
    );
    let received = &bytes(&memory.blocks()[0])[last as usize..];
    assert_eq!(received, &page_bytes(9)[..], "the last page was received");
}

#[test]
fn next_packet_size_not_normal_times_page() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::NEXT_PACKET_SIZE, 2 * RAW_PAGE + 1);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::PayloadSizeMismatch {
            size: 2 * RAW_PAGE + 1,
            expected: 2 * u64::from(RAW_PAGE),
        },
    );
}

#[test]
fn sync_packet_carrying_pages() {
    let mut packet = valid_packet();
    put_u32_at(&mut packet, ram_field::FLAGS, Flags::SYNC);
    assert_channel_wire(
        0,
        send_on_channel(0, &packet),
        WireError::SyncWithPages {
            pages: 3,
            payload: 2 * RAW_PAGE,
        },
    );
}

// --- device-state packets ---------------------------------------------------------------

#[test]
fn empty_device_state_packet() {
    let packet = device_state_packet("virtio-net", 0, 0);
    assert_channel_wire(0, send_on_channel(0, &packet), WireError::EmptyDeviceState);
}

#[test]
fn sync_on_device_state_packet() {
    let mut packet = device_state_packet("virtio-net", 0, 12);
    put_u32_at(
        &mut packet,
        device_field::FLAGS,
        Flags::DEVICE_STATE | Flags::SYNC,
    );
    assert_channel_wire(0, send_on_channel(0, &packet), WireError::SyncOnDeviceState);
}

#[test]
fn unterminated_idstr() {
    let mut packet = device_state_packet("virtio-net", 0, 12);
    packet[device_field::IDSTR..device_field::INSTANCE_ID].fill(b'x');
    assert_channel_wire(
        1,
        send_on_channel(1, &packet),
        WireError::Unterminated { field: "idstr" },
    );
}

#[test]
fn device_state_for_an_unknown_device() {
    let mut packet = device_state_packet("virtio-net", 3, 12);
    packet.extend_from_slice(
        &multifd_wire::DeviceStateChunkHeader {
            idx: 0,
            config_state: true,
        }
        .encode(),
    );
    assert_violation(
        Link::Channel(1),
        send_on_channel(1, &packet),
        Violation::UnknownDevice {
            idstr: "virtio-net".into(),
            instance_id: 3,
        },
        "channel 1",
    );
}

// --- truncated streams ------------------------------------------------------------------

#[test]
fn eof_between_packets() {
    let mut session = connected();
    session.raw.close_channel(1);
    assert_closed(1, session.failure(), "between packets");
}

#[test]
fn eof_after_a_packet_header() {
    let mut session = connected();
    session.raw.write_channel(0, &valid_packet()[..12]);
    session.raw.close_channel(0);
    assert_closed(0, session.failure(), "mid-packet");
}

#[test]
fn eof_mid_offset_table() {
    let mut session = connected();
    session
        .raw
        .write_channel(0, &valid_packet()[..ram_field::OFFSETS + 20]);
    session.raw.close_channel(0);
    assert_closed(0, session.failure(), "mid-packet");
}

#[test]
fn eof_mid_payload() {
    let mut session = connected();
    let mut stream = valid_packet();
    stream.extend_from_slice(&page_bytes(1));
    stream.extend_from_slice(&page_bytes(2)[..100]);
    session.raw.write_channel(0, &stream);
    session.raw.close_channel(0);
    assert_closed(0, session.failure(), "mid-payload");
}

#[test]
fn eof_mid_device_state_packet() {
    let mut session = connected();
    session
        .raw
        .write_channel(1, &device_state_packet("virtio-net", 0, 12)[..100]);
    session.raw.close_channel(1);
    assert_closed(1, session.failure(), "mid-packet");
}

// --- connections and the control channel ------------------------------------------------

#[test]
fn a_connection_with_an_unknown_magic_is_a_stray() {
    let (listener, address) = listener(false);
    let memory = GuestMemory::new(vec![block(BLOCK, BLOCK_LEN as usize)]).expect("memory");
    let mut config = quick_destination_config();
    config.wait_for_source = Some(STRAY_WAIT);
    let destination = spawn_destination(listener, config, memory);
    let mut stream = tcp_connect(&address);
    stream
        .write_all(&0x5245_4144u32.to_be_bytes())
        .expect("write");
    let error = join_within(destination, DEADLINE).expect_err("destination fails");
    let Error::TimeoutWithStrays {
        side: Side::Destination,
        what: "waiting for a source",
        strays: 1,
        last,
    } = &error
    else {
        panic!("expected a timeout after one stray, got {error:?}");
    };
    assert!(
        matches!(
            **last,
            Error::Protocol {
                side: Side::Destination,
                link: Link::Listener,
                ..
            }
        ),
        "{last:?}"
    );
    assert_eq!(
        last.violation(),
        Some(&Violation::UnknownConnectionMagic(0x5245_4144))
    );
}

#[test]
fn a_second_control_connection_is_a_stray() {
    let mut session = stray_session();
    session.raw.open_channel(0);
    let mut second = tcp_connect(&session.raw.address);
    second
        .write_all(&multifd_wire::CONTROL_MAGIC.to_be_bytes())
        .expect("write");
    let stray = stray_error(session.failure(), "waiting for every channel");
    assert_eq!(stray.violation(), Some(&Violation::DuplicateControl));
}

/// A control frame header: type and length.
fn frame_header(message_type: u32, length: u32) -> [u8; CONTROL_FRAME_HEADER_LEN] {
    let mut header = [0u8; CONTROL_FRAME_HEADER_LEN];
    header[..4].copy_from_slice(&message_type.to_be_bytes());
    header[4..].copy_from_slice(&length.to_be_bytes());
    header
}

fn assert_control_wire((error, reason): (Error, String), expected: WireError) {
    assert!(
        matches!(
            error,
            Error::Wire {
                side: Side::Destination,
                link: Link::Control,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.wire_error(), Some(&expected), "{error}");
    assert!(reason.contains("control channel"), "{reason}");
    assert!(reason.contains(&expected.to_string()), "{reason}");
}

#[test]
fn control_frame_above_the_cap() {
    let mut session = connected();
    // A RoundEnd frame claiming one byte more than the cap; no payload follows.
    session
        .raw
        .write_control(&frame_header(4, MAX_CONTROL_FRAME + 1));
    assert_control_wire(
        session.failure(),
        WireError::FrameTooLarge {
            length: MAX_CONTROL_FRAME + 1,
            max: MAX_CONTROL_FRAME,
        },
    );
}

#[test]
fn control_frame_above_the_cap_during_the_handshake() {
    let (listener, address) = listener(false);
    let memory = GuestMemory::new(vec![block(BLOCK, BLOCK_LEN as usize)]).expect("memory");
    let destination = spawn_destination(listener, quick_destination_config(), memory);
    let mut control = tcp_connect(&address);
    control
        .write_all(&multifd_wire::CONTROL_MAGIC.to_be_bytes())
        .expect("write");
    control
        .write_all(&frame_header(1, u32::MAX))
        .expect("write");
    let error = join_within(destination, DEADLINE).expect_err("destination fails");
    assert!(
        matches!(
            error,
            Error::Wire {
                side: Side::Destination,
                link: Link::Control,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(
        error.wire_error(),
        Some(&WireError::FrameTooLarge {
            length: u32::MAX,
            max: MAX_CONTROL_FRAME,
        })
    );
}

#[test]
fn unknown_control_message_type() {
    let mut session = connected();
    session.raw.write_control(&frame_header(0x77, 0));
    assert_control_wire(session.failure(), WireError::UnknownMessageType(0x77));
}

#[test]
fn unexpected_control_message_after_the_handshake() {
    let mut session = connected();
    session.raw.send(&ControlMessage::Welcome);
    assert_violation(
        Link::Control,
        session.failure(),
        Violation::UnexpectedMessage("Welcome"),
        "control channel",
    );
}

#[test]
fn round_end_out_of_order() {
    let mut session = connected();
    session.raw.send(&ControlMessage::RoundEnd { round: 2 });
    assert_violation(
        Link::Control,
        session.failure(),
        Violation::RoundOutOfOrder {
            expected: 1,
            received: 2,
        },
        "control channel",
    );
}

#[test]
fn totals_mismatch_at_complete() {
    let mut session = connected();
    for channel in 0..usize::from(CHANNELS) {
        session.raw.write_channel(channel, &sync_packet());
    }
    session.raw.send(&ControlMessage::RoundEnd { round: 1 });
    let received = Totals {
        packets: u64::from(CHANNELS),
        rounds: 1,
        ..Totals::default()
    };
    let claimed = Totals {
        normal_pages: 5,
        payload_bytes: 5 * u64::from(RAW_PAGE),
        ..received
    };
    session.raw.send(&ControlMessage::Complete(claimed));
    assert_violation(
        Link::Control,
        session.failure(),
        Violation::TotalsMismatch {
            source_totals: claimed.to_string(),
            destination_totals: received.to_string(),
        },
        "totals differ: source 2 packets, 5 normal and 0 zero pages",
    );
}
