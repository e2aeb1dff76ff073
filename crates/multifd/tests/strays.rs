//! A public listener meets connections that are not a migration's: port probes, HTTP
//! requests, peers that never speak, floods of idle connections and of channel hellos
//! of another migration. Each is dropped and counted, and the real source connecting
//! meanwhile migrates byte-exact. A handshake trickled byte by byte, or a control frame
//! left half-written while channels connect, ends at the setup deadline, not later.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use multifd::{Address, Error, GuestMemory, Link, MigrationStats, Side, Source, SourceConfig};
use multifd_wire::{BlockAnnouncement, ChannelHello, ControlMessage};

/// The setup deadline of the destinations here: short, so that silent strays are judged
/// within a test.
const SETUP: Duration = Duration::from_millis(500);

fn memory() -> GuestMemory {
    let memory = GuestMemory::new(vec![block("pc.ram", 2 << 20)]).expect("memory");
    fill_mixed(&memory.blocks()[0], 11);
    memory
}

/// Migrates `memory` from a real source to the destination at `address` and returns the
/// destination's statistics once both ends succeeded and the copy matched.
fn migrate(
    memory: &GuestMemory,
    copy: &GuestMemory,
    address: &Address,
    destination: std::thread::JoinHandle<Result<MigrationStats, Error>>,
) -> MigrationStats {
    let mut config = SourceConfig::default();
    config.channels = 4;
    let mut source = Source::connect(address, &config, memory.clone()).expect("source");
    source.queue_block(0).expect("queue");
    source.end_round().expect("round");
    source.complete().expect("complete");
    let stats = join_within(destination, DEADLINE).expect("destination");
    assert!(
        bytes(&memory.blocks()[0]) == bytes(&copy.blocks()[0]),
        "copy differs"
    );
    stats
}

fn destination(
    copy: &GuestMemory,
) -> (
    Address,
    std::thread::JoinHandle<Result<MigrationStats, Error>>,
) {
    let (listener, address) = listener(false);
    let mut config = quick_destination_config();
    config.connect_timeout = SETUP;
    (
        address.clone(),
        spawn_destination(listener, config, copy.clone()),
    )
}

#[test]
fn probes_http_and_silent_peers_are_dropped_and_the_source_gets_through() {
    let memory = memory();
    let copy = empty_like(&memory);
    let (address, destination) = destination(&copy);
    // A port probe: connect and close.
    drop(tcp_connect(&address));
    // An HTTP client.
    let mut http = tcp_connect(&address);
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    // A peer that connects and never speaks, held open through the migration.
    let _silent = tcp_connect(&address);
    // Something that starts like a channel hello and stops.
    let mut half = tcp_connect(&address);
    half.write_all(&multifd_wire::MULTIFD_MAGIC.to_be_bytes())
        .expect("write");
    // Past the setup deadline of all four: each has been judged a stray.
    std::thread::sleep(SETUP * 2);
    let started = Instant::now();
    let stats = migrate(&memory, &copy, &address, destination);
    assert_eq!(stats.stray_connections, 4);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(engine_threads_after(DEADLINE), Vec::<String>::new());
}

#[test]
fn a_flood_of_silent_connections_does_not_keep_the_source_out() {
    let memory = memory();
    let copy = empty_like(&memory);
    let (listener, address) = listener(false);
    let mut config = quick_destination_config();
    // Long enough that no silent connection is judged by its deadline: only eviction
    // makes room for the source.
    config.connect_timeout = DEADLINE;
    let destination = spawn_destination(listener, config, copy.clone());
    let flood: Vec<TcpStream> = (0..100).map(|_| tcp_connect(&address)).collect();
    let stats = migrate(&memory, &copy, &address, destination);
    // Five connections of the source arrived while at least 32 silent ones were pending:
    // each evicted one.
    assert!(stats.stray_connections >= 5, "{}", stats.stray_connections);
    drop(flood);
    assert_eq!(engine_threads_after(DEADLINE), Vec::<String>::new());
}

#[test]
fn channel_hellos_of_another_migration_are_parked_capped_and_dropped() {
    let memory = memory();
    let copy = empty_like(&memory);
    let (address, destination) = destination(&copy);
    let hello = ChannelHello {
        uuid: *b"not-this-one-!!!",
        channel: 0,
    }
    .encode();
    // More than the 256 a destination parks before a control connection arrives.
    let flood: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut stream = tcp_connect(&address);
            stream.write_all(&hello).expect("hello");
            stream
        })
        .collect();
    std::thread::sleep(SETUP);
    let stats = migrate(&memory, &copy, &address, destination);
    assert_eq!(stats.stray_connections, 300);
    drop(flood);
}

#[test]
fn a_handshake_trickled_byte_by_byte_ends_at_the_setup_deadline() {
    let (listener, address) = listener(false);
    let mut config = quick_destination_config();
    config.connect_timeout = Duration::from_secs(1);
    let destination = spawn_destination(listener, config, memory());
    let mut control = tcp_connect(&address);
    let mut frame = multifd_wire::CONTROL_MAGIC.to_be_bytes().to_vec();
    ControlMessage::Hello(raw_hello(2, *b"trickled-uuid!!!"))
        .encode(&mut frame)
        .expect("encode");
    let started = Instant::now();
    // One byte every 200 ms, each well inside the deadline on its own.
    let trickle = std::thread::spawn(move || {
        for byte in frame {
            if control.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    stalled_at_the_setup_deadline(destination, started);
    trickle.join().expect("trickle");
}

#[test]
fn a_control_frame_left_half_written_while_channels_connect_ends_at_the_setup_deadline() {
    let (listener, address) = listener(false);
    let mut config = quick_destination_config();
    config.connect_timeout = Duration::from_secs(1);
    let destination = spawn_destination(listener, config, memory());
    let mut raw = RawSource::connect(
        &address,
        &raw_hello(2, *b"half-frame-uuid!"),
        vec![BlockAnnouncement {
            name: "pc.ram".into(),
            length: 2 << 20,
        }],
    );
    let started = Instant::now();
    // Four of a frame header's eight bytes, then nothing.
    raw.write_control(&[0, 0, 0, 4]);
    stalled_at_the_setup_deadline(destination, started);
}

/// Asserts the destination ended stalled on its control channel within its 1 s setup
/// deadline (counted from `started`) and a margin, not later.
fn stalled_at_the_setup_deadline(
    destination: std::thread::JoinHandle<Result<MigrationStats, Error>>,
    started: Instant,
) {
    let error = join_within(destination, DEADLINE).expect_err("destination fails");
    let elapsed = started.elapsed();
    assert!(
        matches!(
            error,
            Error::Stalled {
                side: Side::Destination,
                link: Link::Control,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(elapsed < Duration::from_millis(1800), "{elapsed:?}");
}
