//! Liveness against a destination that stops cooperating: every wait of the source has a
//! bound (the idle timeout) and yields to cancel. The peer is a hand-driven destination on
//! real sockets that completes the handshake and then misbehaves.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use multifd::{Address, Error, GuestMemory, Link, Side, Source, SourceConfig, Violation};
use multifd_wire::{ControlMessage, CONTROL_FRAME_HEADER_LEN};

/// What the hand-driven destination does once the handshake is done.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Reads and discards everything, and never answers `Complete`.
    NeverAnswers,
    /// Accepts the channels but never reads from them.
    NeverReads,
    /// Reads everything and confirms round 2 although round 1 was never confirmed.
    ReceiptOutOfOrder,
}

/// Reads one control frame.
fn read_frame(stream: &mut TcpStream) -> ControlMessage {
    let mut header = [0u8; CONTROL_FRAME_HEADER_LEN];
    stream.read_exact(&mut header).expect("frame header");
    let length = ControlMessage::payload_len(&header).expect("frame length");
    let mut frame = header.to_vec();
    frame.resize(header.len() + length, 0);
    stream
        .read_exact(&mut frame[header.len()..])
        .expect("frame payload");
    ControlMessage::decode(&frame).expect("frame")
}

/// A destination that welcomes a migration of `channels` channels, then misbehaves as
/// told until the source closes its connections (or `linger` passes).
fn misbehaving_destination(
    channels: u8,
    misbehaviour: Misbehaviour,
    linger: Duration,
) -> (Address, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address: Address = format!("tcp:{}", listener.local_addr().expect("address"))
        .parse()
        .expect("address");
    let thread = std::thread::spawn(move || {
        let (mut control, _) = listener.accept().expect("control");
        let mut magic = [0u8; 4];
        control.read_exact(&mut magic).expect("magic");
        // Hello, RamBlocks, Devices, DeviceSettings.
        for _ in 0..4 {
            read_frame(&mut control);
        }
        let mut frame = Vec::new();
        ControlMessage::Welcome.encode(&mut frame).expect("encode");
        control.write_all(&frame).expect("welcome");
        let mut held = Vec::new();
        for _ in 0..channels {
            let (stream, _) = listener.accept().expect("channel");
            held.push(stream);
        }
        let started = Instant::now();
        let mut readers: Vec<JoinHandle<()>> = Vec::new();
        if let Misbehaviour::ReceiptOutOfOrder = misbehaviour {
            let mut frame = Vec::new();
            ControlMessage::RoundReceived { round: 2 }
                .encode(&mut frame)
                .expect("encode");
            control.write_all(&frame).expect("receipt");
        }
        if let Misbehaviour::NeverAnswers | Misbehaviour::ReceiptOutOfOrder = misbehaviour {
            for mut stream in held.drain(..) {
                readers.push(std::thread::spawn(move || {
                    let _ = std::io::copy(&mut stream, &mut std::io::sink());
                }));
            }
        }
        // Read the control channel to its end (or the linger) without ever answering.
        control
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut buffer = [0u8; 4096];
        while started.elapsed() < linger {
            match control.read(&mut buffer) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        drop(held);
        drop(control);
        for reader in readers {
            let _ = reader.join();
        }
    });
    (address, thread)
}

/// A source of 2 channels with idle timeout `idle`, connected to a destination that
/// misbehaves as told (for 20 s at most).
fn source_against(misbehaviour: Misbehaviour, idle: Duration) -> (Source, JoinHandle<()>) {
    let (address, destination) = misbehaving_destination(2, misbehaviour, Duration::from_secs(20));
    let source = Source::connect(&address, &config(idle), source_memory()).expect("connect");
    (source, destination)
}

fn source_memory() -> GuestMemory {
    let block = block("pc.ram", 64 << 20);
    fill_random(&block, 3);
    GuestMemory::new(vec![block]).expect("memory")
}

fn config(idle_timeout: Duration) -> SourceConfig {
    let mut config = SourceConfig::default();
    config.channels = 2;
    config.idle_timeout = idle_timeout;
    config
}

#[test]
fn a_destination_that_never_confirms_ends_complete_at_the_idle_timeout() {
    let idle = Duration::from_millis(800);
    let (mut source, destination) = source_against(Misbehaviour::NeverAnswers, idle);
    source.queue_block(0).expect("queue");
    let started = Instant::now();
    let error = source.complete().expect_err("no Completed ever comes");
    assert!(
        matches!(
            error,
            Error::Stalled {
                side: Side::Source,
                link: Link::Control,
                context: "waiting for the destination's Completed",
            }
        ),
        "{error}"
    );
    assert!(started.elapsed() < idle + Duration::from_secs(5));
    destination.join().expect("destination");
}

#[test]
fn cancel_frees_a_source_waiting_for_completed() {
    let (mut source, destination) =
        source_against(Misbehaviour::NeverAnswers, Duration::from_secs(60));
    source.queue_block(0).expect("queue");
    let cancel = source.cancel_handle();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        cancel.cancel();
    });
    let started = Instant::now();
    let error = source.complete().expect_err("cancelled");
    assert!(
        matches!(error, Error::Cancelled { side: Side::Source }),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    canceller.join().expect("canceller");
    destination.join().expect("destination");
}

#[test]
fn the_wait_for_a_round_receipt_that_never_comes_is_bounded() {
    let (mut source, destination) =
        source_against(Misbehaviour::NeverAnswers, Duration::from_secs(60));
    source.queue_block(0).expect("queue");
    source.end_round().expect("round 1");
    let bound = Duration::from_millis(400);
    let started = Instant::now();
    assert!(!source.wait_until_received(bound).expect("no error"));
    let waited = started.elapsed();
    assert!(
        waited >= bound && waited < bound + Duration::from_secs(2),
        "{waited:?}"
    );
    drop(source);
    destination.join().expect("destination");
}

#[test]
fn cancel_ends_the_wait_for_a_round_receipt() {
    let (mut source, destination) =
        source_against(Misbehaviour::NeverAnswers, Duration::from_secs(60));
    source.queue_block(0).expect("queue");
    source.end_round().expect("round 1");
    let cancel = source.cancel_handle();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        cancel.cancel();
    });
    let started = Instant::now();
    let error = source
        .wait_until_received(Duration::from_secs(60))
        .expect_err("cancelled");
    assert!(
        matches!(error, Error::Cancelled { side: Side::Source }),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    canceller.join().expect("canceller");
    drop(source);
    destination.join().expect("destination");
}

#[test]
fn a_receipt_for_a_round_not_confirmed_in_order_fails_the_source() {
    let (mut source, destination) =
        source_against(Misbehaviour::ReceiptOutOfOrder, Duration::from_secs(60));
    // The receipt for round 2 comes before round 1 even ended: whatever call sees the
    // failure first reports it.
    let error = source
        .queue_block(0)
        .and_then(|()| source.end_round())
        .and_then(|()| {
            source
                .wait_until_received(Duration::from_secs(5))
                .map(|_| ())
        })
        .expect_err("the source fails");
    assert_eq!(
        error.violation(),
        Some(&Violation::RoundOutOfOrder {
            expected: 1,
            received: 2,
        }),
        "{error}"
    );
    drop(source);
    destination.join().expect("destination");
}

#[test]
fn a_destination_that_never_reads_a_channel_stalls_the_write_at_the_idle_timeout() {
    let idle = Duration::from_millis(800);
    let (mut source, destination) = source_against(Misbehaviour::NeverReads, idle);
    let started = Instant::now();
    // 64 MiB of random pages cannot fit in the socket buffers: a write blocks, then fails.
    let error = match source.queue_block(0) {
        Err(error) => {
            drop(source);
            error
        }
        Ok(()) => source.complete().expect_err("the channels never drain"),
    };
    assert!(
        matches!(
            error,
            Error::Stalled {
                side: Side::Source,
                link: Link::Channel(_),
                context: "write packet",
            }
        ),
        "{error}"
    );
    assert!(started.elapsed() < idle + Duration::from_secs(5));
    destination.join().expect("destination");
}

/// A source that sets the migration up and then goes silent (hung, or cut off by a
/// partition that sends no reset) no longer holds the destination forever: it fails at
/// its idle timeout and tells the source why.
#[test]
fn a_silent_source_ends_the_destination_at_its_idle_timeout() {
    let memory = GuestMemory::new(vec![block("pc.ram", 64 << 10)]).expect("memory");
    let (listener, address) = listener(false);
    let mut config = quick_destination_config();
    let idle = Duration::from_millis(800);
    config.idle_timeout = idle;
    let destination = spawn_destination(listener, config, memory);
    let mut source = RawSource::connect(&address, &raw_hello(2, [6; 16]), small_block_announced());
    source.open_channels(2);
    let started = Instant::now();
    let error = join_within(destination, idle + DEADLINE).expect_err("the destination gives up");
    assert!(
        matches!(
            error,
            Error::Stalled {
                side: Side::Destination,
                link: Link::Control,
                ..
            }
        ),
        "{error}"
    );
    assert!(started.elapsed() < idle + Duration::from_secs(3));
    assert!(source.expect_failed().contains("no progress"));
}
