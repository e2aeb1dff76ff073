//! Device state end to end: many devices saved concurrently with a RAM round, loaded in
//! order on the destination; dedicated channels; the sequential baseline; chunks arriving
//! out of order; every device rule of SPEC §5 broken by a hand-driven source; the queue
//! cap; and a device whose save or load fails, named on both sides.
// Assertion helpers take the (error, reason) pair or the config a test case has just
// built inline, and tests read better passing it by value.
#![allow(clippy::needless_pass_by_value)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use multifd::{
    BlockAnnouncement, Compression, CompressionSettings, DestinationConfig, DeviceError, DeviceId,
    Error, GuestMemory, Link, LoadDevice, LoadDevices, MigrationStats, SaveDevice, SaveDevices,
    Side, Source, SourceConfig, StateWriter, Violation,
};
use multifd_wire::{ControlMessage, DeviceAnnouncement, DeviceStateChunkHeader, Totals, WireError};

/// Runs the tests one at a time: the failure tests check that no engine thread is left,
/// which threads of a test running alongside would defeat.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Period of every device's byte pattern: a prime, so that no two chunks of a stream
/// (whatever the chunk size) carry the same bytes and a reordering cannot go unseen.
const PATTERN_PERIOD: usize = 1_048_573;

/// A device's pattern: seeded pseudo-random bytes, repeated.
fn pattern(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = Vec::with_capacity(PATTERN_PERIOD + 8);
    while bytes.len() < PATTERN_PERIOD {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(PATTERN_PERIOD);
    bytes
}

fn config_blob(seed: u64) -> Vec<u8> {
    format!("config of device {seed}").into_bytes()
}

/// Saves `length` bytes of its pattern, in writes of `write_size`; fails after
/// `fail_after` bytes if set.
struct PatternSave {
    seed: u64,
    length: u64,
    write_size: usize,
    fail_after: Option<u64>,
}

impl SaveDevice for PatternSave {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        let pattern = pattern(self.seed);
        let mut position = 0u64;
        while position < self.length {
            if self.fail_after.is_some_and(|limit| position >= limit) {
                return Err("the device stopped responding".into());
            }
            let offset = (position % PATTERN_PERIOD as u64) as usize;
            let take = (self.length - position)
                .min(self.write_size as u64)
                .min((PATTERN_PERIOD - offset) as u64) as usize;
            state.write_all(&pattern[offset..offset + take])?;
            position += take as u64;
        }
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(config_blob(self.seed))
    }
}

/// What a [`PatternLoad`] saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Loaded {
    bytes: u64,
    chunks: u64,
    config: Option<Vec<u8>>,
}

/// Checks every chunk against its pattern at the position the stream reached, so a
/// chunk loaded out of order fails the load.
struct PatternLoad {
    pattern: Vec<u8>,
    loaded: Arc<Mutex<Loaded>>,
    fail_at_chunk: Option<u64>,
}

impl LoadDevice for PatternLoad {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        let mut loaded = self.loaded.lock().expect("loaded");
        if self.fail_at_chunk == Some(loaded.chunks) {
            return Err("the device rejected its state".into());
        }
        if loaded.config.is_some() {
            return Err("state after the config".into());
        }
        let mut position = loaded.bytes;
        let mut rest = chunk;
        while !rest.is_empty() {
            let offset = (position % PATTERN_PERIOD as u64) as usize;
            let take = rest.len().min(PATTERN_PERIOD - offset);
            if rest[..take] != self.pattern[offset..offset + take] {
                return Err(format!("bytes at offset {position} differ: out of order?").into());
            }
            rest = &rest[take..];
            position += take as u64;
        }
        loaded.bytes = position;
        loaded.chunks += 1;
        Ok(())
    }

    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError> {
        self.loaded.lock().expect("loaded").config = Some(config.to_vec());
        Ok(())
    }
}

fn device_id(seed: u64) -> DeviceId {
    DeviceId::new(format!("0000:00:{seed:02x}.0/vfio"), seed as u32 % 2)
}

struct Devices {
    save: SaveDevices,
    load: LoadDevices,
    loaded: Vec<Arc<Mutex<Loaded>>>,
}

/// `count` devices of `length` bytes each; the destination registers them in reverse.
fn devices(count: u64, length: u64) -> Devices {
    let mut devices = Devices {
        save: Vec::new(),
        load: Vec::new(),
        loaded: Vec::new(),
    };
    for seed in 0..count {
        let loaded = Arc::new(Mutex::new(Loaded::default()));
        devices.save.push((
            device_id(seed),
            Box::new(PatternSave {
                seed,
                length,
                write_size: 200_000,
                fail_after: None,
            }),
        ));
        devices.load.insert(
            0,
            (
                device_id(seed),
                Box::new(PatternLoad {
                    pattern: pattern(seed),
                    loaded: Arc::clone(&loaded),
                    fail_at_chunk: None,
                }),
            ),
        );
        devices.loaded.push(loaded);
    }
    devices
}

/// Migrates one RAM block and `devices`: a first RAM round, switchover, a final RAM round
/// of the whole block concurrently with the device saves, completion. Checks RAM and
/// every device on the destination.
fn migrate(
    config: SourceConfig,
    destination_config: DestinationConfig,
    devices: Devices,
    length: u64,
) -> (MigrationStats, MigrationStats) {
    let ram = block("pc.ram", 16 << 20);
    fill_random(&ram, 3);
    let source_memory = GuestMemory::new(vec![ram]).expect("memory");
    let destination_memory = empty_like(&source_memory);
    let (listener, address) = listener(false);
    let destination = spawn_destination_with_devices(
        listener,
        destination_config,
        destination_memory.clone(),
        devices.load,
    );
    let mut source =
        Source::connect_with_devices(&address, &config, source_memory.clone(), devices.save)
            .expect("connect");
    source.queue_block(0).expect("queue");
    source.end_round().expect("round");
    source.switchover().expect("switchover");
    source.queue_block(0).expect("final round");
    let sent = source.complete().expect("source completes");
    let received = join_within(destination, 4 * DEADLINE).expect("destination completes");
    assert!(bytes(&source_memory.blocks()[0]) == bytes(&destination_memory.blocks()[0]));
    for (seed, loaded) in devices.loaded.iter().enumerate() {
        let loaded = loaded.lock().expect("loaded");
        assert_eq!(loaded.bytes, length, "device {seed}");
        assert_eq!(
            loaded.config.as_deref(),
            Some(&config_blob(seed as u64)[..])
        );
    }
    (sent, received)
}

#[test]
fn eight_devices_of_64_mib_with_a_ram_round_over_8_channels() {
    let _serial = serial();
    const LENGTH: u64 = 64 << 20;
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 8;
        config
    };
    let (sent, received) = migrate(
        config,
        DestinationConfig::default(),
        devices(8, LENGTH),
        LENGTH,
    );
    let chunks_per_device = LENGTH / u64::from(multifd::DEFAULT_DEVICE_CHUNK_SIZE) + 1;
    for stats in [&sent, &received] {
        assert_eq!(stats.devices.len(), 8);
        for (seed, device) in stats.devices.iter().enumerate() {
            assert_eq!(device.id, device_id(seed as u64));
            assert_eq!(device.chunks, chunks_per_device);
            assert_eq!(device.bytes, LENGTH + config_blob(seed as u64).len() as u64);
        }
        assert_eq!(stats.device_chunks, 8 * chunks_per_device);
        assert!(stats.switchover_time.is_some());
        assert!(
            stats
                .channels
                .iter()
                .all(|channel| channel.device_chunks > 0),
            "device state spread over every channel: {:?}",
            stats.channels
        );
    }
    assert!(received.peak_queued_device_bytes > 0);
    assert!(received.peak_queued_device_bytes <= 8 * multifd::DEFAULT_MAX_QUEUED_DEVICE_BYTES);
}

#[test]
fn device_state_shares_channels_with_compressed_ram() {
    let _serial = serial();
    const LENGTH: u64 = 4 << 20;
    for method in [Compression::Zstd, Compression::Lz4] {
        let compression = CompressionSettings::new(method, None).expect("settings");
        let config = {
            let mut config = SourceConfig::default();
            config.channels = 3;
            config.compression = compression;
            config
        };
        let destination_config = {
            let mut config = DestinationConfig::default();
            config.compression = Some(compression);
            config
        };
        let (sent, received) = migrate(config, destination_config, devices(2, LENGTH), LENGTH);
        for stats in [&sent, &received] {
            assert_eq!(stats.devices.len(), 2, "{method}");
            assert!(stats.device_chunks > 0, "{method}");
            // The RAM is random: every RAM packet with pages took the raw fallback.
            assert!(stats.uncompressed_packets > 0, "{method}");
            assert_eq!(stats.payload_bytes, stats.raw_payload_bytes, "{method}");
        }
        assert_eq!(sent.uncompressed_packets, received.uncompressed_packets);
    }
}

/// A loopback TCP proxy in front of `target` that holds back everything channel
/// `delayed` sends after its hello for `delay`, so chunks sent on the other channels
/// overtake the ones sent on it.
fn delaying_proxy(
    target: multifd::Address,
    delayed: u8,
    delay: std::time::Duration,
) -> multifd::Address {
    relay(
        &target,
        move |channel, mut from_source, mut to_destination| {
            if channel == Some(delayed) {
                std::thread::sleep(delay);
            }
            let _ = std::io::copy(&mut from_source, &mut to_destination);
        },
    )
}

#[test]
fn a_delayed_channel_reorders_chunks_which_still_load_in_order() {
    let _serial = serial();
    const LENGTH: u64 = 4 << 20;
    let devices = devices(2, LENGTH);
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let (listener, address) = listener(false);
    let destination = spawn_destination_with_devices(
        listener,
        DestinationConfig::default(),
        empty_like(&memory),
        devices.load,
    );
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 2;
        config.device_chunk_size = 64 << 10;
        config
    };
    let proxy = delaying_proxy(address, 1, std::time::Duration::from_millis(300));
    let mut source =
        Source::connect_with_devices(&proxy, &config, memory, devices.save).expect("connect");
    source.queue_block(0).expect("queue");
    source.complete().expect("source completes");
    let received = join_within(destination, DEADLINE).expect("destination completes");
    for (seed, loaded) in devices.loaded.iter().enumerate() {
        // Each chunk was checked against the pattern at the position the stream reached.
        let loaded = loaded.lock().expect("loaded");
        assert_eq!(loaded.bytes, LENGTH, "device {seed}");
        assert_eq!(
            loaded.config.as_deref(),
            Some(&config_blob(seed as u64)[..])
        );
    }
    assert!(
        received.channels[1].device_chunks > 0,
        "the delayed channel carried chunks: {:?}",
        received.channels
    );
    assert!(
        received.peak_queued_device_bytes >= 64 << 10,
        "later chunks overtook the delayed ones and waited: {}",
        received.peak_queued_device_bytes
    );
}

#[test]
fn dedicated_channels_carry_only_device_state() {
    let _serial = serial();
    const LENGTH: u64 = 3 << 20;
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 4;
        config.device_channels = 2;
        config.device_chunk_size = 64 << 10;
        config
    };
    let (sent, received) = migrate(
        config,
        DestinationConfig::default(),
        devices(3, LENGTH),
        LENGTH,
    );
    for stats in [&sent, &received] {
        for channel in &stats.channels {
            if channel.id < 2 {
                assert!(channel.normal_pages > 0, "{channel:?}");
                assert_eq!(channel.device_chunks, 0, "{channel:?}");
            } else {
                assert_eq!(channel.normal_pages, 0, "{channel:?}");
                assert!(channel.device_chunks > 0, "{channel:?}");
            }
        }
        assert_eq!(stats.device_chunks, 3 * (LENGTH / (64 << 10) + 1));
    }
}

#[test]
fn sequential_save_on_one_dedicated_channel() {
    let _serial = serial();
    const LENGTH: u64 = 1 << 20;
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 2;
        config.device_channels = 1;
        config.device_chunk_size = 100_000;
        config.sequential_device_save = true;
        config
    };
    let (sent, _) = migrate(
        config,
        DestinationConfig::default(),
        devices(4, LENGTH),
        LENGTH,
    );
    assert_eq!(sent.channels[0].device_chunks, 0);
    assert_eq!(sent.channels[1].device_chunks, 4 * (LENGTH / 100_000 + 2));
}

#[test]
fn a_device_whose_save_fails_ends_both_sides_naming_it() {
    let _serial = serial();
    let mut devices = devices(3, 4 << 20);
    devices.save[1].1 = Box::new(PatternSave {
        seed: 1,
        length: 4 << 20,
        write_size: 65536,
        fail_after: Some(1 << 20),
    });
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let (listener, address) = listener(false);
    let destination = spawn_destination_with_devices(
        listener,
        quick_destination_config(),
        empty_like(&memory),
        devices.load,
    );
    let mut source =
        Source::connect_with_devices(&address, &SourceConfig::default(), memory, devices.save)
            .expect("connect");
    source.queue_block(0).expect("queue");
    let error = source.complete().expect_err("the save failed");
    assert!(
        matches!(&error, Error::Device { side: Side::Source, device, message }
            if *device == device_id(1) && message.contains("stopped responding")),
        "{error:?}"
    );
    let error = join_within(destination, DEADLINE).expect_err("the destination fails too");
    assert!(
        matches!(&error, Error::PeerFailed { side: Side::Destination, reason }
            if reason.contains(&device_id(1).idstr) && reason.contains("stopped responding")),
        "{error:?}"
    );
    assert_eq!(engine_threads_after(DEADLINE), Vec::<String>::new());
}

#[test]
fn a_device_whose_load_fails_ends_both_sides_naming_it() {
    let _serial = serial();
    let mut devices = devices(2, 4 << 20);
    let loaded = Arc::new(Mutex::new(Loaded::default()));
    devices.load[0] = (
        device_id(1),
        Box::new(PatternLoad {
            pattern: pattern(1),
            loaded,
            fail_at_chunk: Some(2),
        }),
    );
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let (listener, address) = listener(false);
    let destination = spawn_destination_with_devices(
        listener,
        quick_destination_config(),
        empty_like(&memory),
        devices.load,
    );
    let mut source =
        Source::connect_with_devices(&address, &SourceConfig::default(), memory, devices.save)
            .expect("connect");
    source.queue_block(0).expect("queue");
    let error = source.complete().expect_err("the load failed");
    assert!(
        matches!(&error, Error::PeerFailed { side: Side::Source, reason }
            if reason.contains(&device_id(1).idstr) && reason.contains("rejected its state")),
        "{error:?}"
    );
    let error = join_within(destination, DEADLINE).expect_err("the destination failed");
    assert!(
        matches!(&error, Error::Device { side: Side::Destination, device, message }
            if *device == device_id(1) && message.contains("rejected its state")),
        "{error:?}"
    );
    assert_eq!(engine_threads_after(DEADLINE), Vec::<String>::new());
}

#[test]
fn the_destination_rejects_a_registered_device_the_source_does_not_announce() {
    let _serial = serial();
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let mut devices = devices(2, 1);
    devices.save.pop();
    let (listener, address) = listener(false);
    let destination = spawn_destination_with_devices(
        listener,
        quick_destination_config(),
        empty_like(&memory),
        devices.load,
    );
    let error =
        Source::connect_with_devices(&address, &SourceConfig::default(), memory, devices.save)
            .err()
            .expect("rejected");
    assert!(
        matches!(&error, Error::Rejected { side: Side::Source, reason }
            if reason.code == multifd::RejectCode::Devices
                && reason.detail.contains(&device_id(1).idstr)
                && reason.detail.contains("did not announce")),
        "{error:?}"
    );
    assert!(join_within(destination, DEADLINE).is_err());
}

#[test]
fn the_destination_rejects_chunks_larger_than_its_queue_cap() {
    let _serial = serial();
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let devices = devices(1, 1);
    let (listener, address) = listener(false);
    let destination_config = {
        let mut config = quick_destination_config();
        config.max_queued_device_bytes = 1 << 20;
        config
    };
    let destination = spawn_destination_with_devices(
        listener,
        destination_config,
        empty_like(&memory),
        devices.load,
    );
    let config = {
        let mut config = SourceConfig::default();
        config.device_chunk_size = 4 << 20;
        config
    };
    let error = Source::connect_with_devices(&address, &config, memory, devices.save)
        .err()
        .expect("rejected");
    assert!(
        matches!(&error, Error::Rejected { reason, .. }
            if reason.code == multifd::RejectCode::Devices && reason.detail.contains("queue cap")),
        "{error:?}"
    );
    assert!(join_within(destination, DEADLINE).is_err());
}

#[test]
fn dedicated_channels_must_leave_one_for_ram() {
    let _serial = serial();
    let memory = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 2;
        config.device_channels = 2;
        config
    };
    let (_listener, address) = listener(false);
    let error = Source::connect(&address, &config, memory)
        .err()
        .expect("refused");
    assert!(
        matches!(error, Error::Config(ref detail) if detail.contains("dedicated")),
        "{error:?}"
    );
}

// --- a hand-driven source: arrival order and the device rules of SPEC §5 ----------------

const UUID: [u8; 16] = *b"device-state-uid";
const CHANNELS: u8 = 2;
const DEVICE: &str = "0000:00:05.0/vfio";

/// Records every load in order, as text: `state:<bytes>` or `config:<bytes>`.
struct Recorder(Arc<Mutex<Vec<String>>>);

impl LoadDevice for Recorder {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        let text = String::from_utf8_lossy(chunk);
        self.0.lock().expect("log").push(format!("state:{text}"));
        Ok(())
    }

    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError> {
        let text = String::from_utf8_lossy(config);
        self.0.lock().expect("log").push(format!("config:{text}"));
        Ok(())
    }
}

struct Session {
    raw: RawSource,
    destination: std::thread::JoinHandle<Result<MigrationStats, Error>>,
    log: Arc<Mutex<Vec<String>>>,
}

/// A destination with device [`DEVICE`] instance 0 registered, queuing at most `cap`
/// bytes, and a raw source past the handshake with every channel open.
fn session(cap: u64) -> Session {
    session_with(cap, DEVICE_SETTINGS)
}

/// Like [`session`], with these device-state settings.
fn session_with(cap: u64, device_settings: multifd_wire::DeviceStateSettings) -> Session {
    let (listener, address) = listener(false);
    let memory = GuestMemory::new(vec![block("pc.ram", 16 * RAW_PAGE as usize)]).expect("memory");
    let log = Arc::new(Mutex::new(Vec::new()));
    let config = {
        let mut config = quick_destination_config();
        config.max_queued_device_bytes = cap;
        config
    };
    let destination = spawn_destination_with_devices(
        listener,
        config,
        memory,
        vec![(
            DeviceId::new(DEVICE, 0),
            Box::new(Recorder(Arc::clone(&log))),
        )],
    );
    let mut raw = RawSource::announce_with(
        &address,
        &raw_hello(u32::from(CHANNELS), UUID),
        vec![BlockAnnouncement {
            name: "pc.ram".into(),
            length: 16 * u64::from(RAW_PAGE),
        }],
        vec![DeviceAnnouncement {
            idstr: DEVICE.into(),
            instance_id: 0,
        }],
        device_settings,
    );
    match raw.receive() {
        ControlMessage::Welcome => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    raw.open_channels(CHANNELS);
    Session {
        raw,
        destination,
        log,
    }
}

/// A device-state packet of [`DEVICE`] with chunk `idx` carrying `payload`.
fn chunk(idx: u32, config: bool, payload: &[u8]) -> Vec<u8> {
    let mut packet = device_state_packet(DEVICE, 0, 12 + payload.len() as u32);
    packet.extend_from_slice(
        &DeviceStateChunkHeader {
            idx,
            config_state: config,
        }
        .encode(),
    );
    packet.extend_from_slice(payload);
    packet
}

impl Session {
    fn send(&mut self, channel: u8, idx: u32, config: bool, payload: &[u8]) {
        self.raw
            .write_channel(usize::from(channel), &chunk(idx, config, payload));
    }

    /// SYNC on every channel, `RoundEnd`, `Complete` with `totals`.
    fn complete(&mut self, totals: Totals) {
        for channel in 0..CHANNELS {
            self.raw.write_channel(
                usize::from(channel),
                &ram_packet(multifd_wire::Flags::SYNC, "", &[], &[]),
            );
        }
        self.raw.send(&ControlMessage::RoundEnd { round: 1 });
        self.raw.send(&ControlMessage::Complete(totals));
    }

    fn failure(mut self) -> (Error, String) {
        let error = join_within(self.destination, DEADLINE).expect_err("the destination fails");
        let reason = self.raw.expect_failed();
        (error, reason)
    }
}

fn totals(chunks: u64, bytes: u64) -> Totals {
    Totals {
        packets: u64::from(CHANNELS),
        rounds: 1,
        device_chunks: chunks,
        device_bytes: bytes,
        ..Totals::default()
    }
}

/// The destination failed with `expected` on `link`, and told the source so.
fn assert_link_violation(error: &Error, reason: &str, link: Link, expected: &Violation) {
    assert!(
        matches!(error, Error::Protocol { side: Side::Destination, link: actual, .. } if *actual == link),
        "{error:?}"
    );
    assert_eq!(error.violation(), Some(expected), "{error}");
    assert!(reason.contains(&expected.to_string()), "{reason}");
    assert!(reason.contains(&link.to_string()), "{reason}");
}

/// As [`assert_link_violation`], for a violation that names the test device.
fn assert_violation((error, reason): (Error, String), link: Link, expected: Violation) {
    assert_link_violation(&error, &reason, link, &expected);
    assert!(reason.contains(DEVICE), "{reason}");
}

fn device() -> DeviceId {
    DeviceId::new(DEVICE, 0)
}

#[test]
fn chunks_arriving_out_of_order_load_in_order() {
    let _serial = serial();
    let mut session = session(1 << 20);
    session.raw.send(&ControlMessage::SwitchoverStart);
    // Channel 1 delivers the end of the stream first; channel 0, delayed, its start.
    session.send(1, 3, true, b"cfg");
    session.send(1, 1, false, b"one");
    std::thread::sleep(std::time::Duration::from_millis(100));
    session.send(0, 2, false, b"two");
    session.send(0, 0, false, b"zero");
    session.complete(totals(4, 13));
    match session.raw.receive() {
        ControlMessage::Completed(received) => assert_eq!(received, totals(4, 13)),
        other => panic!("expected Completed, got {other:?}"),
    }
    let stats = join_within(session.destination, DEADLINE).expect("completes");
    assert_eq!(
        *session.log.lock().expect("log"),
        ["state:zero", "state:one", "state:two", "config:cfg"]
    );
    assert_eq!(stats.devices[0].chunks, 4);
    assert!(
        stats.peak_queued_device_bytes >= 9,
        "three chunks waited for chunk 0"
    );
    assert!(stats.switchover_time.is_some());
}

#[test]
fn duplicate_chunk_idx() {
    let _serial = serial();
    let mut session = session(1 << 20);
    session.send(1, 0, false, b"zero");
    session.send(1, 0, false, b"zero");
    assert_violation(
        session.failure(),
        Link::Channel(1),
        Violation::DuplicateChunk {
            device: device(),
            idx: 0,
        },
    );
}

#[test]
fn chunk_after_the_config_chunk() {
    let _serial = serial();
    let mut session = session(1 << 20);
    session.send(0, 0, true, b"cfg");
    session.send(0, 1, false, b"late");
    assert_violation(
        session.failure(),
        Link::Channel(0),
        Violation::ChunkAfterConfig {
            device: device(),
            idx: 1,
            config_idx: 0,
        },
    );
}

#[test]
fn chunk_header_version_other_than_0() {
    let _serial = serial();
    let mut session = session(1 << 20);
    let mut packet = chunk(0, false, b"zero");
    put_u32_at(&mut packet, multifd_wire::DEVICE_STATE_PACKET_LEN, 1);
    session.raw.write_channel(1, &packet);
    let (error, reason) = session.failure();
    assert!(
        matches!(
            error,
            Error::Wire {
                side: Side::Destination,
                link: Link::Channel(1),
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.wire_error(), Some(&WireError::ChunkVersion(1)));
    assert!(reason.contains("channel 1"), "{reason}");
}

#[test]
fn chunks_missing_at_completion() {
    let _serial = serial();
    let mut session = session(1 << 20);
    session.send(0, 1, false, b"one");
    session.send(1, 2, true, b"cfg");
    session.complete(totals(2, 6));
    assert_violation(
        session.failure(),
        Link::Control,
        Violation::MissingChunks {
            device: device(),
            idx: 0,
            config_received: true,
        },
    );
}

#[test]
fn config_chunk_missing_at_completion() {
    let _serial = serial();
    let mut session = session(1 << 20);
    session.send(0, 0, false, b"zero");
    session.complete(totals(1, 4));
    assert_violation(
        session.failure(),
        Link::Control,
        Violation::MissingChunks {
            device: device(),
            idx: 1,
            config_received: false,
        },
    );
}

#[test]
fn queued_bytes_over_the_cap() {
    let _serial = serial();
    const CAP: u64 = 100 << 10;
    let mut session = session(CAP);
    let payload = vec![b'x'; 60 << 10];
    // Chunk 0 never comes: chunks 1 and 2 wait, and together pass the cap.
    session.send(1, 1, false, &payload);
    session.send(1, 2, false, &payload);
    assert_violation(
        session.failure(),
        Link::Channel(1),
        Violation::DeviceQueueFull {
            device: device(),
            queued: 2 * ((60 << 10) + 64),
            cap: CAP,
        },
    );
}

/// Channel 1 of 2 dedicated to device state.
const ONE_DEDICATED: multifd_wire::DeviceStateSettings = multifd_wire::DeviceStateSettings {
    dedicated_channels: 1,
    ..DEVICE_SETTINGS
};

#[test]
fn device_state_on_a_ram_channel() {
    let _serial = serial();
    let mut session = session_with(1 << 20, ONE_DEDICATED);
    session.send(0, 0, false, b"zero");
    let (error, reason) = session.failure();
    let expected = Violation::WrongChannelKind("device state");
    assert_link_violation(&error, &reason, Link::Channel(0), &expected);
}

#[test]
fn ram_pages_on_a_device_state_channel() {
    let _serial = serial();
    let mut session = session_with(1 << 20, ONE_DEDICATED);
    session
        .raw
        .write_channel(1, &ram_packet(0, "pc.ram", &[0], &[]));
    session.raw.write_channel(1, &vec![7u8; RAW_PAGE as usize]);
    let (error, reason) = session.failure();
    let expected = Violation::WrongChannelKind("RAM pages");
    assert_link_violation(&error, &reason, Link::Channel(1), &expected);
}

#[test]
fn dedicated_channels_without_one_for_ram_are_rejected() {
    let _serial = serial();
    let (listener, address) = listener(false);
    let memory = GuestMemory::new(vec![block("pc.ram", 16 * RAW_PAGE as usize)]).expect("memory");
    let destination =
        spawn_destination_with_devices(listener, quick_destination_config(), memory, Vec::new());
    let mut raw = RawSource::announce_with(
        &address,
        &raw_hello(u32::from(CHANNELS), UUID),
        vec![BlockAnnouncement {
            name: "pc.ram".into(),
            length: 16 * u64::from(RAW_PAGE),
        }],
        Vec::new(),
        multifd_wire::DeviceStateSettings {
            dedicated_channels: u32::from(CHANNELS),
            ..DEVICE_SETTINGS
        },
    );
    match raw.receive() {
        ControlMessage::Reject(reason) => {
            assert_eq!(reason.code, multifd::RejectCode::ChannelCount, "{reason:?}");
            assert!(reason.detail.contains("dedicated"), "{reason:?}");
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    assert!(join_within(destination, DEADLINE).is_err());
}

/// Chunks still being read count against the cap before their buffers exist: a source
/// that starts a large chunk on every channel and sends none of it cannot make the
/// destination allocate past the cap.
#[test]
fn chunks_being_read_count_against_the_cap() {
    let _serial = serial();
    const CAP: u64 = 100 << 10;
    let mut session = session(CAP);
    let started = |idx| {
        let packet = chunk(idx, false, &vec![b'x'; 60 << 10]);
        // The packet and chunk headers, and not one byte of the payload.
        packet[..multifd_wire::DEVICE_STATE_PACKET_LEN + 12].to_vec()
    };
    session.raw.write_channel(0, &started(0));
    std::thread::sleep(std::time::Duration::from_millis(200));
    session.raw.write_channel(1, &started(1));
    assert_violation(
        session.failure(),
        Link::Channel(1),
        Violation::DeviceQueueFull {
            device: device(),
            queued: 2 * ((60 << 10) + 64),
            cap: CAP,
        },
    );
}
