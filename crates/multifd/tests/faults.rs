//! Fault injection: a relay between a real source and a real destination cuts, stalls or
//! corrupts the control channel or a data channel at each phase of a migration (handshake,
//! round 1, device state, completion). Every case must end on both sides with an error
//! within the configured bounds, leave no engine thread behind, and leave the source's
//! memory as it was.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use multifd::{
    DeviceError, DeviceId, Error, GuestMemory, Integrity, LoadDevice, SaveDevice, Source,
    SourceConfig, StateWriter,
};

/// The idle timeout both ends use here: a stalled connection must end the migration well
/// within the test's bound.
const IDLE: Duration = Duration::from_millis(1500);
/// How long a case may take from start to both ends failed.
const BOUND: Duration = Duration::from_secs(15);

/// Cases share the process's thread list, which each one checks: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which connection the fault hits.
#[derive(Clone, Copy, Debug)]
enum Target {
    Control,
    /// A multifd channel, by id.
    Channel(u8),
}

/// What happens to it, counted in bytes after the connection's first bytes (its magic,
/// or its whole hello).
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Both directions are closed once this many bytes went through.
    Cut(usize),
    /// Nothing more is forwarded after this many bytes, but the connection stays open.
    Stall(usize),
    /// The byte at this position has one bit flipped.
    Flip(usize),
}

fn faulty_relay(address: &multifd::Address, target: Target, fault: Fault) -> multifd::Address {
    relay(
        address,
        move |channel, mut from_source, mut to_destination| {
            let hit = match target {
                Target::Control => channel.is_none(),
                Target::Channel(id) => channel == Some(id),
            };
            let mut buffer = [0u8; 1 << 16];
            let mut seen = 0usize;
            while let Ok(read) = from_source.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                let mut forward = read;
                if hit {
                    match fault {
                        Fault::Cut(at) | Fault::Stall(at) if seen + read > at => {
                            forward = at - seen;
                        }
                        Fault::Flip(at) if (seen..seen + read).contains(&at) => {
                            buffer[at - seen] ^= 0x10;
                        }
                        _ => {}
                    }
                }
                if to_destination.write_all(&buffer[..forward]).is_err() {
                    break;
                }
                seen += forward;
                if forward < read {
                    if let Fault::Stall(_) = fault {
                        // Keep both ends open and silent until the source gives up.
                        let _ = std::io::copy(&mut from_source, &mut std::io::sink());
                    }
                    cut(&from_source, &to_destination);
                    return;
                }
            }
        },
    )
}

fn cut(one: &TcpStream, other: &TcpStream) {
    let _ = one.shutdown(std::net::Shutdown::Both);
    let _ = other.shutdown(std::net::Shutdown::Both);
}

/// A device of 4 MiB saved at switchover, so there is a device-state phase.
struct Device(Vec<u8>);

impl SaveDevice for Device {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        state.write_all(&self.0)?;
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(vec![1; 8])
    }
}

struct Sink;

impl LoadDevice for Sink {
    fn load_state(&mut self, _chunk: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }

    fn load_config(&mut self, _config: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// A checksum of the source's memory, read through the test's own view of it.
fn digest(memory: &GuestMemory) -> u64 {
    bytes(&memory.blocks()[0])
        .chunks(8)
        .fold(0xcbf2_9ce4_8422_2325, |hash, word| {
            (hash ^ u64::from_le_bytes(word.try_into().unwrap_or([0; 8])))
                .wrapping_mul(0x0100_0000_01b3)
        })
}

/// Runs a migration of 8 MiB and a 4 MiB device through a relay with `fault` on
/// `target`, and checks that it failed cleanly on both ends.
fn fails_cleanly(target: Target, fault: Fault) {
    let _serial = serial();
    let block = block("pc.ram", 8 << 20);
    fill_random(&block, 21);
    let memory = GuestMemory::new(vec![block]).expect("memory");
    let before = digest(&memory);
    let (listener, address) = listener(false);
    let mut destination_config = quick_destination_config();
    destination_config.idle_timeout = IDLE;
    destination_config.round_timeout = IDLE;
    let device = DeviceId::new("gpu", 0);
    let destination = spawn_destination_with_devices(
        listener,
        destination_config,
        empty_like(&memory),
        vec![(device.clone(), Box::new(Sink))],
    );
    let proxy = faulty_relay(&address, target, fault);
    let mut config = SourceConfig::default();
    config.channels = 2;
    // Pages on channel 0, device state on channel 1: each phase's bytes are on a known
    // channel, so a fault lands in its phase however chunks and pages are scheduled.
    config.device_channels = 1;
    config.idle_timeout = IDLE;
    config.connect_timeout = IDLE;
    config.integrity = Integrity::Crc32c;
    let started = Instant::now();
    let devices: multifd::SaveDevices = vec![(device, Box::new(Device(vec![7; 4 << 20])))];
    let sent = Source::connect_with_devices(&proxy, &config, memory.clone(), devices).and_then(
        |mut source| {
            source.queue_block(0)?;
            source.end_round()?;
            source.switchover()?;
            source.complete()
        },
    );
    let received = join_within(destination, BOUND);
    let what = format!("{target:?} {fault:?}");
    let source_error = sent.expect_err(&format!("{what}: the source must fail"));
    let destination_error = received.expect_err(&format!("{what}: the destination must fail"));
    assert!(
        started.elapsed() < BOUND,
        "{what}: took {:?}",
        started.elapsed()
    );
    for error in [&source_error, &destination_error] {
        assert!(!matches!(error, Error::Internal { .. }), "{what}: {error}");
        let message = error.to_string();
        assert!(
            // A rejection is the control channel's handshake by definition.
            [
                "control channel",
                "channel 0",
                "channel 1",
                "listener",
                "rejected"
            ]
            .iter()
            .any(|link| message.contains(link)),
            "{what}: the error names no link: {message}"
        );
    }
    assert_eq!(
        engine_threads_after(Duration::from_secs(5)),
        Vec::<String>::new(),
        "{what}: engine threads left"
    );
    assert_eq!(digest(&memory), before, "{what}: the source memory changed");
}

/// Bytes into channel 0, which carries every page (channel 1 is dedicated to device
/// state), that fall inside round 1's pages.
const IN_ROUND_1: usize = 300 << 10;
/// Bytes into channel 1, which carries only the 4 MiB of device state: past its hello,
/// inside the state, whatever the scheduling of chunks.
const IN_DEVICE_STATE: usize = 1 << 20;

#[test]
fn control_cut_during_the_handshake() {
    fails_cleanly(Target::Control, Fault::Cut(20));
}

#[test]
fn control_flipped_during_the_handshake() {
    fails_cleanly(Target::Control, Fault::Flip(10));
}

/// Bytes of the control channel's handshake after its magic, for the source of
/// [`fails_cleanly`]: the frames it sends, encoded as it encodes them.
fn handshake_len() -> usize {
    use multifd_wire::{
        BlockAnnouncement, Compression, ControlMessage, DeviceAnnouncement, DeviceStateSettings,
        Flags, Hello, ZeroPageMode, PROTOCOL_VERSION,
    };
    let messages = [
        ControlMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            uuid: [0; 16],
            channels: 2,
            page_size: 4096,
            packet_size: 512 << 10,
            compression: Compression::None,
            compression_level: 0,
            zero_page: ZeroPageMode::Multifd,
            extensions: Flags::CRC32C,
        }),
        ControlMessage::RamBlocks(vec![BlockAnnouncement {
            name: "pc.ram".into(),
            length: 8 << 20,
        }]),
        ControlMessage::Devices(vec![DeviceAnnouncement {
            idstr: "gpu".into(),
            instance_id: 0,
        }]),
        ControlMessage::DeviceSettings(DeviceStateSettings {
            max_payload: (1 << 20) + 12,
            dedicated_channels: 0,
        }),
    ];
    messages
        .iter()
        .map(|message| {
            let mut frame = Vec::new();
            message.encode(&mut frame).expect("encode");
            frame.len()
        })
        .sum()
}

#[test]
fn control_stalled_before_completion() {
    // Past the handshake the control channel carries RoundEnd, SwitchoverStart and
    // Complete: stall it inside the first of them.
    fails_cleanly(Target::Control, Fault::Stall(handshake_len() + 2));
}

#[test]
fn channel_cut_during_round_1() {
    fails_cleanly(Target::Channel(0), Fault::Cut(IN_ROUND_1));
}

#[test]
fn channel_stalled_during_round_1() {
    fails_cleanly(Target::Channel(0), Fault::Stall(IN_ROUND_1));
}

#[test]
fn channel_flipped_during_round_1() {
    fails_cleanly(Target::Channel(0), Fault::Flip(IN_ROUND_1));
}

#[test]
fn channel_cut_during_device_state() {
    fails_cleanly(Target::Channel(1), Fault::Cut(IN_DEVICE_STATE));
}

#[test]
fn channel_flipped_during_device_state() {
    fails_cleanly(Target::Channel(1), Fault::Flip(IN_DEVICE_STATE));
}
