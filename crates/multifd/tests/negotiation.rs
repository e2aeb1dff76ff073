//! The control handshake: a destination that requires settings the source does not
//! propose rejects the migration with a clear reason on both ends (never a hang), and a
//! source refuses an unusable configuration before it connects.
// Assertion helpers take the (error, reason) pair or the config a test case has just
// built inline, and tests read better passing it by value.
#![allow(clippy::needless_pass_by_value)]

mod common;

use std::io::{Read, Write};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use multifd::{
    Address, BlockAnnouncement, CompressionSettings, DestinationConfig, Error, GuestMemory, Link,
    MigrationStats, RamBlock, RejectCode, Side, Source, SourceConfig, ZeroPageMode,
};
use multifd_wire::{Compression, ControlMessage, DeviceAnnouncement, Flags, RejectReason};

const BLOCK: &str = "pc.ram";
const BLOCK_LEN: usize = 16 * PAGE;

fn memory() -> GuestMemory {
    GuestMemory::new(vec![block(BLOCK, BLOCK_LEN)]).expect("memory")
}

fn announced() -> Vec<BlockAnnouncement> {
    vec![BlockAnnouncement {
        name: BLOCK.into(),
        length: BLOCK_LEN as u64,
    }]
}

/// A destination with `config` (its timeouts shortened) on a fresh TCP address.
fn destination(config: DestinationConfig) -> (Address, JoinHandle<Result<MigrationStats, Error>>) {
    let (listener, address) = listener(false);
    let config = {
        let mut config = config;
        config.wait_for_source = Some(DEADLINE);
        config.connect_timeout = DEADLINE;
        config.round_timeout = DEADLINE;
        config
    };
    (address, spawn_destination(listener, config, memory()))
}

/// The destination's rejection, which must come within the deadline.
fn destination_rejection(destination: JoinHandle<Result<MigrationStats, Error>>) -> RejectReason {
    match join_within(destination, DEADLINE) {
        Err(Error::Rejected {
            side: Side::Destination,
            reason,
        }) => reason,
        other => panic!("expected the destination to reject, got {other:?}"),
    }
}

/// Runs the real source with `source_config` against a destination requiring
/// `destination_config`; both must report a rejection with `code`.
fn rejected(destination_config: DestinationConfig, source_config: SourceConfig, code: RejectCode) {
    let (address, destination) = destination(destination_config);
    let started = Instant::now();
    let source = Source::connect(&address, &source_config, memory());
    let source_reason = match source {
        Err(Error::Rejected {
            side: Side::Source,
            reason,
        }) => reason,
        Err(other) => panic!("expected the source to be rejected, got {other:?}"),
        Ok(_) => panic!("expected the source to be rejected, it connected"),
    };
    assert!(
        started.elapsed() < DEADLINE,
        "rejection took {:?}",
        started.elapsed()
    );
    let destination_reason = destination_rejection(destination);
    assert_eq!(source_reason.code, code, "{source_reason:?}");
    assert_eq!(source_reason, destination_reason);
}

#[test]
fn channel_count_mismatch() {
    rejected(
        {
            let mut config = DestinationConfig::default();
            config.channels = Some(4);
            config
        },
        {
            let mut config = SourceConfig::default();
            config.channels = 2;
            config
        },
        RejectCode::ChannelCount,
    );
}

#[test]
fn page_size_mismatch() {
    rejected(
        {
            let mut config = DestinationConfig::default();
            config.page_size = Some(4096);
            config
        },
        {
            let mut config = SourceConfig::default();
            config.page_size = 1024;
            config
        },
        RejectCode::PageSize,
    );
}

#[test]
fn packet_size_mismatch() {
    rejected(
        {
            let mut config = DestinationConfig::default();
            config.packet_size = Some(512 * 1024);
            config
        },
        {
            let mut config = SourceConfig::default();
            config.packet_size = 256 * 1024;
            config
        },
        RejectCode::PacketSize,
    );
}

#[test]
fn zero_page_mode_mismatch() {
    rejected(
        {
            let mut config = DestinationConfig::default();
            config.zero_page = Some(ZeroPageMode::None);
            config
        },
        {
            let mut config = SourceConfig::default();
            config.zero_page = ZeroPageMode::Multifd;
            config
        },
        RejectCode::ZeroPage,
    );
}

#[test]
fn uuid_mismatch() {
    rejected(
        {
            let mut config = DestinationConfig::default();
            config.uuid = Some(*b"expected-uuid-!!");
            config
        },
        {
            let mut config = SourceConfig::default();
            config.uuid = Some(*b"different-uuid!!");
            config
        },
        RejectCode::Uuid,
    );
}

#[test]
fn matching_requirements_are_accepted() {
    let uuid = *b"the-right-uuid!!";
    let (address, destination) = destination({
        let mut config = DestinationConfig::default();
        config.channels = Some(3);
        config.page_size = Some(4096);
        config.packet_size = Some(64 * 1024);
        config.zero_page = Some(ZeroPageMode::None);
        config.compression = Some(zstd(3));
        config.uuid = Some(uuid);
        config
    });
    let source_memory = memory();
    fill_mixed(&source_memory.blocks()[0], 5);
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 3;
        config.page_size = 4096;
        config.packet_size = 64 * 1024;
        config.zero_page = ZeroPageMode::None;
        config.compression = zstd(3);
        config.uuid = Some(uuid);
        config.connect_timeout = DEADLINE;
        config
    };
    let mut source = Source::connect(&address, &config, source_memory).expect("connect");
    source.queue_block(0).expect("queue");
    let sent = source.complete().expect("complete");
    let received = join_within(destination, DEADLINE).expect("destination completes");
    assert_eq!(sent.normal_pages, (BLOCK_LEN / PAGE) as u64);
    assert_eq!(sent.normal_pages, received.normal_pages);
    assert_eq!(received.channels.len(), 3);
}

/// A raw source announces `hello`, `blocks` and `devices`; the destination must answer
/// `Reject` with `code` and return the same rejection.
fn raw_rejected(
    hello: multifd_wire::Hello,
    blocks: Vec<BlockAnnouncement>,
    devices: Vec<DeviceAnnouncement>,
    code: RejectCode,
) -> RejectReason {
    let (address, destination) = destination(DestinationConfig::default());
    let mut raw = RawSource::announce(&address, &hello, blocks, devices);
    let reason = match raw.receive() {
        ControlMessage::Reject(reason) => reason,
        other => panic!("expected Reject, got {other:?}"),
    };
    assert_eq!(reason.code, code, "{reason:?}");
    assert_eq!(destination_rejection(destination), reason);
    reason
}

#[test]
fn protocol_version_mismatch() {
    let hello = multifd_wire::Hello {
        protocol_version: 2,
        ..raw_hello(2, [7; 16])
    };
    let reason = raw_rejected(hello, announced(), Vec::new(), RejectCode::Version);
    assert!(reason.detail.contains("protocol version 2"), "{reason:?}");
}

/// 255 channels of 16 MiB zstd packets would make the destination allocate about 8 GiB
/// of receive buffers before any page arrived: refused at the handshake, while QEMU's
/// 512 KiB packets fit at any channel count.
#[test]
fn receive_buffers_beyond_the_cap_are_rejected() {
    let hello = multifd_wire::Hello {
        packet_size: 16 << 20,
        compression: Compression::Zstd,
        compression_level: 1,
        // The extension zstd packets carry (0x200).
        extensions: 0x200,
        ..raw_hello(255, [9; 16])
    };
    let reason = raw_rejected(hello, announced(), Vec::new(), RejectCode::ChannelCount);
    assert!(
        reason
            .detail
            .contains("255 channels of 16777216-byte packets need"),
        "{reason:?}"
    );
    assert!(reason.detail.contains("receive buffers"), "{reason:?}");

    let (address, destination) = destination(DestinationConfig::default());
    let hello = multifd_wire::Hello {
        compression: Compression::Zstd,
        compression_level: 1,
        // The extension zstd packets carry (0x200).
        extensions: 0x200,
        ..raw_hello(255, [9; 16])
    };
    let mut raw = RawSource::announce(&address, &hello, announced(), Vec::new());
    assert_eq!(raw.receive(), ControlMessage::Welcome);
    drop(raw);
    join_within(destination, DEADLINE).expect_err("the source vanished");
}

/// A `Hello` whose compression or zero-page field holds a value this version does not
/// know: the destination cannot decode it, and still answers `Reject` saying why.
#[test]
fn an_undecodable_hello_is_rejected_with_the_reason() {
    // Offsets in the frame: 8-byte frame header, then version (4), uuid (16), channels,
    // page size, packet size (4 each), compression (4), level (4), zero-page mode (4).
    for (offset, value, code, says) in [
        (40, 0x99u32, RejectCode::Compression, "compression"),
        (48, 7, RejectCode::ZeroPage, "zero-page mode"),
    ] {
        let (address, destination) = destination(DestinationConfig::default());
        let mut frame = Vec::new();
        ControlMessage::Hello(raw_hello(2, [7; 16]))
            .encode(&mut frame)
            .expect("encode");
        frame[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
        let mut raw_control = tcp_connect(&address);
        raw_control
            .write_all(&multifd_wire::CONTROL_MAGIC.to_be_bytes())
            .expect("magic");
        raw_control.write_all(&frame).expect("hello");
        let mut header = [0u8; multifd_wire::CONTROL_FRAME_HEADER_LEN];
        raw_control.read_exact(&mut header).expect("answer");
        let length = ControlMessage::payload_len(&header).expect("length");
        let mut answer = header.to_vec();
        answer.resize(header.len() + length, 0);
        raw_control
            .read_exact(&mut answer[header.len()..])
            .expect("answer payload");
        match ControlMessage::decode(&answer) {
            Ok(ControlMessage::Reject(reason)) => {
                assert_eq!(reason.code, code, "{reason:?}");
                assert!(reason.detail.contains(says), "{reason:?}");
            }
            other => panic!("expected Reject, got {other:?}"),
        }
        let error = join_within(destination, DEADLINE).expect_err("destination fails");
        assert!(error.wire_error().is_some(), "{error:?}");
    }
}

fn zstd(level: i32) -> CompressionSettings {
    CompressionSettings::new(Compression::Zstd, Some(level)).expect("a zstd level")
}

#[test]
fn compression_method_mismatch() {
    for (required, proposed) in [
        (CompressionSettings::NONE, zstd(1)),
        (zstd(1), CompressionSettings::NONE),
        (
            zstd(1),
            CompressionSettings::new(Compression::Zlib, Some(1)).expect("zlib"),
        ),
        (
            CompressionSettings::new(Compression::Lz4, None).expect("lz4"),
            zstd(1),
        ),
    ] {
        rejected(
            {
                let mut config = DestinationConfig::default();
                config.compression = Some(required);
                config
            },
            {
                let mut config = SourceConfig::default();
                config.compression = proposed;
                config
            },
            RejectCode::Compression,
        );
    }
}

#[test]
fn compression_level_mismatch() {
    rejected(
        {
            let mut config = DestinationConfig::default();
            config.compression = Some(zstd(3));
            config
        },
        {
            let mut config = SourceConfig::default();
            config.compression = zstd(1);
            config
        },
        RejectCode::Compression,
    );
}

/// A `Hello` proposing `method` at `level` with `extensions`.
fn compressed_hello(method: Compression, level: i32, extensions: u32) -> multifd_wire::Hello {
    multifd_wire::Hello {
        compression: method,
        compression_level: level,
        extensions,
        ..raw_hello(2, [7; 16])
    }
}

#[test]
fn compression_level_out_of_range() {
    for (method, level, detail) in [
        (Compression::Zstd, 20, "zstd level 20 outside -5..=19"),
        (Compression::Zstd, -6, "zstd level -6 outside -5..=19"),
        (Compression::Zlib, 10, "zlib level 10 outside 0..=9"),
        (Compression::Zlib, -1, "zlib level -1 outside 0..=9"),
        (Compression::Lz4, 1, "lz4 has no levels, got level 1"),
        (Compression::None, 1, "none has no levels, got level 1"),
    ] {
        let extensions = CompressionSettings { method, level: 0 }.method.extension()
            | if method == Compression::None {
                0
            } else {
                Flags::UNCOMPRESSED
            };
        let hello = compressed_hello(method, level, extensions);
        let reason = raw_rejected(hello, announced(), Vec::new(), RejectCode::Compression);
        assert_eq!(reason.detail, detail);
    }
}

#[test]
fn compression_extensions_must_match_the_method() {
    for (method, extensions) in [
        // lz4 without its extension bit, or without the raw fallback.
        (Compression::Lz4, Flags::UNCOMPRESSED),
        (Compression::Lz4, Flags::LZ4),
        // The raw fallback without compression; lz4's bit with another method.
        (Compression::None, Flags::UNCOMPRESSED),
        (Compression::Zstd, Flags::LZ4 | Flags::UNCOMPRESSED),
        (Compression::Zlib, 0),
    ] {
        let hello = compressed_hello(method, 0, extensions);
        let reason = raw_rejected(hello, announced(), Vec::new(), RejectCode::Extensions);
        assert!(
            reason
                .detail
                .contains(&format!("extensions {extensions:#x}")),
            "{reason:?}"
        );
    }
}

#[test]
fn compression_level_is_a_config_error() {
    assert!(matches!(
        CompressionSettings::new(Compression::Zstd, Some(20)),
        Err(Error::Config(detail)) if detail == "zstd level 20 outside -5..=19"
    ));
    invalid_config(
        {
            let mut config = SourceConfig::default();
            config.compression = CompressionSettings {
                method: Compression::Zlib,
                level: 12,
            };
            config
        },
        "zlib level 12",
    );
}

#[test]
fn unsupported_extensions() {
    let hello = multifd_wire::Hello {
        extensions: 0x100,
        ..raw_hello(2, [7; 16])
    };
    raw_rejected(hello, announced(), Vec::new(), RejectCode::Extensions);
}

#[test]
fn zero_channels_announced() {
    raw_rejected(
        raw_hello(0, [7; 16]),
        announced(),
        Vec::new(),
        RejectCode::ChannelCount,
    );
}

#[test]
fn block_length_not_a_multiple_of_the_page_size() {
    let blocks = vec![BlockAnnouncement {
        name: BLOCK.into(),
        length: 3 * PAGE as u64 + 100,
    }];
    let reason = raw_rejected(
        raw_hello(2, [7; 16]),
        blocks,
        Vec::new(),
        RejectCode::RamBlocks,
    );
    assert!(reason.detail.contains(BLOCK), "{reason:?}");
}

#[test]
fn block_announced_twice() {
    let mut blocks = announced();
    blocks.extend(announced());
    raw_rejected(
        raw_hello(2, [7; 16]),
        blocks,
        Vec::new(),
        RejectCode::RamBlocks,
    );
}

#[test]
fn unregistered_device_announced() {
    let devices = vec![DeviceAnnouncement {
        idstr: "virtio-net".into(),
        instance_id: 0,
    }];
    let reason = raw_rejected(
        raw_hello(2, [7; 16]),
        announced(),
        devices,
        RejectCode::Devices,
    );
    assert!(reason.detail.contains("virtio-net"), "{reason:?}");
}

#[test]
fn blocks_the_mapper_refuses() {
    let (listener, address) = listener(false);
    let destination = spawn_destination_with(listener, quick_destination_config(), |_| {
        Err("no memory for pc.ram on this host".to_owned())
    });
    let error = match Source::connect(&address, &SourceConfig::default(), memory()) {
        Err(error) => error,
        Ok(_) => panic!("the source connected"),
    };
    let expected = RejectReason {
        code: RejectCode::RamBlocks,
        detail: "no memory for pc.ram on this host".into(),
    };
    assert!(
        matches!(&error, Error::Rejected { side: Side::Source, reason } if *reason == expected),
        "{error:?}"
    );
    assert_eq!(destination_rejection(destination), expected);
}

#[test]
fn blocks_mapped_with_another_length() {
    let (listener, address) = listener(false);
    let destination = spawn_destination_with(listener, quick_destination_config(), |_| {
        GuestMemory::new(vec![block(BLOCK, BLOCK_LEN / 2)]).map_err(|error| error.to_string())
    });
    let error = match Source::connect(&address, &SourceConfig::default(), memory()) {
        Err(error) => error,
        Ok(_) => panic!("the source connected"),
    };
    assert!(
        matches!(
            &error,
            Error::Rejected { side: Side::Source, reason } if reason.code == RejectCode::RamBlocks
        ),
        "{error:?}"
    );
    let reason = destination_rejection(destination);
    assert_eq!(reason.code, RejectCode::RamBlocks);
}

/// A destination handed a read-only mapping would fault writing the first page into it;
/// it refuses the migration instead, naming the block, and the source is told.
#[test]
fn a_read_only_block_is_refused_as_destination_memory() {
    let (listener, address) = listener(false);
    let file = tempfile::tempfile().expect("temp file");
    file.set_len(BLOCK_LEN as u64).expect("size");
    let destination = spawn_destination_with(listener, quick_destination_config(), move |_| {
        let block = RamBlock::map_file(BLOCK, &file, false).map_err(|error| error.to_string())?;
        assert!(!block.is_writable());
        GuestMemory::new(vec![block]).map_err(|error| error.to_string())
    });
    let source = memory();
    fill_mixed(&source.blocks()[0], 5);
    let error = match Source::connect(&address, &SourceConfig::default(), source) {
        Err(error) => error,
        Ok(_) => panic!("the source connected"),
    };
    let expected = RejectReason {
        code: RejectCode::RamBlocks,
        detail: "ramblock \"pc.ram\" is mapped read-only on the destination".into(),
    };
    assert!(
        matches!(&error, Error::Rejected { side: Side::Source, reason } if *reason == expected),
        "{error:?}"
    );
    assert_eq!(destination_rejection(destination), expected);
}

/// `Source::connect` with `config` must refuse before opening any connection.
fn invalid_config(config: SourceConfig, names: &str) {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.set_nonblocking(true).expect("nonblocking");
    let address: Address = format!("tcp:{}", probe.local_addr().expect("address"))
        .parse()
        .expect("address");
    let error = match Source::connect(&address, &config, memory()) {
        Err(error) => error,
        Ok(_) => panic!("connected with {config:?}"),
    };
    match &error {
        Error::Config(detail) => assert!(detail.contains(names), "{detail}"),
        other => panic!("expected Error::Config, got {other:?}"),
    }
    match probe.accept() {
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the source connected anyway: {other:?}"),
    }
}

#[test]
fn zero_channels_is_a_config_error() {
    invalid_config(
        {
            let mut config = SourceConfig::default();
            config.channels = 0;
            config
        },
        "0 channels",
    );
}

#[test]
fn page_size_not_a_power_of_two_is_a_config_error() {
    invalid_config(
        {
            let mut config = SourceConfig::default();
            config.page_size = 1000;
            config
        },
        "page size 1000",
    );
}

#[test]
fn packet_size_not_a_multiple_of_the_page_size_is_a_config_error() {
    invalid_config(
        {
            let mut config = SourceConfig::default();
            config.packet_size = 512 * 1024 + 100;
            config
        },
        "packet size 524388",
    );
}

#[test]
fn block_not_a_multiple_of_the_page_size_is_a_config_error() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.set_nonblocking(true).expect("nonblocking");
    let address: Address = format!("tcp:{}", probe.local_addr().expect("address"))
        .parse()
        .expect("address");
    let memory = GuestMemory::new(vec![block(BLOCK, 3 * PAGE)]).expect("memory");
    let config = {
        let mut config = SourceConfig::default();
        config.page_size = 8192;
        config
    };
    match Source::connect(&address, &config, memory) {
        Err(Error::Config(detail)) => assert!(detail.contains(BLOCK), "{detail}"),
        Err(other) => panic!("expected Error::Config, got {other:?}"),
        Ok(_) => panic!("connected"),
    }
    assert!(probe.accept().is_err(), "no connection was attempted");
}

/// A TCP address where nothing listens (a port just freed).
fn dead_tcp_address() -> Address {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = format!("tcp:{}", probe.local_addr().expect("address"));
    drop(probe);
    address.parse().expect("address")
}

fn connect_fails_in_time(address: &Address, kind: std::io::ErrorKind) {
    let timeout = Duration::from_millis(300);
    let config = {
        let mut config = SourceConfig::default();
        config.connect_timeout = timeout;
        config
    };
    let started = Instant::now();
    let error = match Source::connect(address, &config, memory()) {
        Err(error) => error,
        Ok(_) => panic!("connected to {address}"),
    };
    let elapsed = started.elapsed();
    assert!(
        elapsed < timeout + Duration::from_millis(700),
        "gave up after {elapsed:?}"
    );
    match &error {
        Error::Io {
            side: Side::Source,
            link: Link::Control,
            source,
            ..
        } => assert_eq!(source.kind(), kind, "{error}"),
        other => panic!("expected Error::Io on the control link, got {other:?}"),
    }
}

#[test]
fn connect_to_a_closed_tcp_port_fails_within_the_timeout() {
    connect_fails_in_time(&dead_tcp_address(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn connect_to_a_missing_unix_socket_fails_within_the_timeout() {
    let path = std::env::temp_dir().join(format!(
        "multifd-test-{}-nobody-listens.sock",
        std::process::id()
    ));
    connect_fails_in_time(&Address::Unix(path), std::io::ErrorKind::NotFound);
}

#[test]
fn destination_gives_up_waiting_for_a_source() {
    let (listener, _address) = listener(false);
    let config = {
        let mut config = DestinationConfig::default();
        config.wait_for_source = Some(Duration::from_millis(200));
        config
    };
    let started = Instant::now();
    let destination = spawn_destination(listener, config, memory());
    match join_within(destination, DEADLINE) {
        Err(Error::Timeout {
            side: Side::Destination,
            what: "waiting for a source",
        }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn source_times_out_when_the_destination_never_answers() {
    // A listener that accepts but never speaks: the source must give up at its
    // connect timeout, not hang.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address: Address = format!("tcp:{}", silent.local_addr().expect("address"))
        .parse()
        .expect("address");
    let config = {
        let mut config = SourceConfig::default();
        config.connect_timeout = Duration::from_millis(300);
        config
    };
    let started = Instant::now();
    let result = Source::connect(&address, &config, memory());
    assert!(started.elapsed() < Duration::from_secs(2));
    match result {
        Err(Error::Timeout {
            side: Side::Source,
            what: "waiting for the destination's welcome",
        }) => {}
        Err(other) => panic!("expected a timeout, got {other:?}"),
        Ok(_) => panic!("connected to a silent listener"),
    }
    drop(silent);
}

/// A source that gives up while its channels are connecting ends the destination's wait
/// at once with its reason (an `Abort`), or with the closed control channel.
#[test]
fn a_source_giving_up_during_setup_ends_the_wait_promptly() {
    use multifd_wire::ControlMessage;
    for abort in [true, false] {
        let (listener, address) = listener(false);
        let memory = GuestMemory::new(vec![block("pc.ram", 64 << 10)]).expect("memory");
        let destination = spawn_destination(listener, quick_destination_config(), memory);
        let mut source = RawSource::connect(
            &address,
            &raw_hello(2, [3; 16]),
            vec![multifd::BlockAnnouncement {
                name: "pc.ram".into(),
                length: 64 << 10,
            }],
        );
        source.open_channel(0);
        let started = std::time::Instant::now();
        if abort {
            source.send(&ControlMessage::Abort("channel 1 unreachable".into()));
        } else {
            drop(source);
        }
        let error = join_within(destination, DEADLINE).expect_err("the destination fails");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        if abort {
            assert!(
                matches!(&error, Error::PeerFailed { side: Side::Destination, reason }
                    if reason == "source aborted: channel 1 unreachable"),
                "{error:?}"
            );
        } else {
            assert!(
                matches!(
                    error,
                    Error::Closed {
                        side: Side::Destination,
                        link: Link::Control,
                        ..
                    }
                ),
                "{error:?}"
            );
        }
    }
}

/// A reason from the peer is shown with its control characters escaped: a hostile source
/// cannot forge a `multifd:` line or recolour the operator's terminal.
#[test]
fn peer_text_reaches_the_display_escaped() {
    let (address, destination) = destination(DestinationConfig::default());
    let mut source = RawSource::connect(&address, &raw_hello(2, [8; 16]), announced());
    source.send(&ControlMessage::Abort(
        "bye\nmultifd: migration completed \u{1b}[32mOK".into(),
    ));
    let error = join_within(destination, DEADLINE).expect_err("aborted");
    let shown = error.to_string();
    assert!(
        !shown.contains('\n') && !shown.contains('\u{1b}'),
        "{shown:?}"
    );
    assert!(
        shown.ends_with("source aborted: bye\\nmultifd: migration completed \\u{1b}[32mOK"),
        "{shown}"
    );
}

/// A source announcing more memory than the destination takes is refused before the VMM
/// is asked to map any of it (and before the destination allocates anything for it).
#[test]
fn an_oversized_announcement_is_refused_before_mapping() {
    let (listener, address) = listener(false);
    let destination = spawn_destination_with(listener, quick_destination_config(), |_| {
        panic!("map_blocks must not be called")
    });
    let mut source = RawSource::announce(
        &address,
        &raw_hello(2, [3; 16]),
        vec![BlockAnnouncement {
            name: BLOCK.into(),
            length: 15 << 40,
        }],
        Vec::new(),
    );
    let reason = match source.receive() {
        ControlMessage::Reject(reason) => reason,
        other => panic!("expected Reject, got {other:?}"),
    };
    assert_eq!(reason.code, RejectCode::RamBlocks);
    assert!(
        reason
            .detail
            .contains("together more than this destination's 1099511627776 bytes"),
        "{reason:?}"
    );
    assert_eq!(destination_rejection(destination), reason);
}
