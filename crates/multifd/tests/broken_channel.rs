//! Failures in the middle of a migration: one channel's connection cut by a proxy, and
//! cancellation from either end. Both ends must stop promptly with an error that names
//! the cause, and no engine thread may outlive the migration.
//!
//! The tests in this file run one at a time: each checks that no engine thread is left in
//! the process, which another migration running in parallel would spoil.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use multifd::{
    Address, Destination, DestinationConfig, Error, GuestMemory, Link, MigrationStats, Side,
    Source, SourceConfig,
};

/// Serializes the tests of this file (see the module comment).
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long both ends may take to report a failure.
const FAILURE_DEADLINE: Duration = Duration::from_secs(3);

/// A TCP proxy between a source and a destination that cuts one multifd channel once it
/// has forwarded a number of bytes from the source.
struct Proxy {
    address: Address,
    stop: Arc<AtomicBool>,
    /// Every socket the proxy holds, to wake its threads at the end.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    /// Set once the channel was cut.
    cut: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

const MULTIFD_MAGIC: [u8; 4] = multifd_wire::MULTIFD_MAGIC.to_be_bytes();
const CONTROL_MAGIC: [u8; 4] = multifd_wire::CONTROL_MAGIC.to_be_bytes();

impl Proxy {
    /// Forwards connections to `upstream`; cuts multifd channel `channel` after
    /// `cut_after` bytes of the source's stream on it (its hello included).
    fn start(upstream: &Address, channel: u8, cut_after: usize) -> Self {
        let Address::Tcp(upstream) = upstream.clone() else {
            panic!("the proxy forwards TCP only");
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let address: Address = format!("tcp:{}", listener.local_addr().expect("address"))
            .parse()
            .expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let cut = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = Arc::clone(&stop);
            let sockets = Arc::clone(&sockets);
            let cut = Arc::clone(&cut);
            std::thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || {
                    let mut threads = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let client = match listener.accept() {
                            Ok((client, _)) => client,
                            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(2));
                                continue;
                            }
                            Err(error) => panic!("proxy accept: {error}"),
                        };
                        client.set_nonblocking(false).expect("blocking");
                        client.set_nodelay(true).expect("nodelay");
                        let server = TcpStream::connect(upstream.as_str()).expect("proxy connect");
                        server.set_nodelay(true).expect("nodelay");
                        {
                            let mut sockets = sockets.lock().expect("sockets");
                            sockets.push(client.try_clone().expect("clone"));
                            sockets.push(server.try_clone().expect("clone"));
                        }
                        let number = threads.len() / 2;
                        let up = Forward {
                            from: client.try_clone().expect("clone"),
                            to: server.try_clone().expect("clone"),
                            cut: Some((channel, cut_after, Arc::clone(&cut))),
                        };
                        let down = Forward {
                            from: server,
                            to: client,
                            cut: None,
                        };
                        for (name, forward) in [("up", up), ("down", down)] {
                            threads.push(
                                std::thread::Builder::new()
                                    .name(format!("proxy-{name}-{number}"))
                                    .spawn(move || forward.run())
                                    .expect("spawn a forwarder"),
                            );
                        }
                    }
                    threads
                })
                .expect("spawn the proxy")
        };
        Self {
            address,
            stop,
            sockets,
            cut,
            acceptor: Some(acceptor),
        }
    }

    /// Stops the proxy: closes every connection and joins every proxy thread.
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let threads = join_within(self.acceptor.take().expect("acceptor"), DEADLINE);
        for socket in self.sockets.lock().expect("sockets").iter() {
            // Already shut down by a forwarder or the peer: nothing left to do.
            let _ = socket.shutdown(Shutdown::Both);
        }
        for thread in threads {
            join_within(thread, DEADLINE);
        }
    }
}

/// One direction of one proxied connection.
struct Forward {
    from: TcpStream,
    to: TcpStream,
    /// For the source-to-destination direction: the channel to cut, after how many bytes,
    /// and the flag to raise when cut.
    cut: Option<(u8, usize, Arc<AtomicBool>)>,
}

impl Forward {
    fn run(mut self) {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut limit = None;
        if let Some((channel, cut_after, _)) = &self.cut {
            // Identify the connection by its first bytes: control or multifd channel id.
            let mut hello = [0u8; multifd_wire::CHANNEL_HELLO_LEN];
            if self.from.read_exact(&mut hello[..4]).is_err() {
                return self.close();
            }
            let first = if hello[..4] == MULTIFD_MAGIC {
                if self.from.read_exact(&mut hello[4..]).is_err() {
                    return self.close();
                }
                if hello[24] == *channel {
                    limit = Some(*cut_after);
                }
                &hello[..]
            } else {
                assert_eq!(hello[..4], CONTROL_MAGIC, "unknown connection");
                &hello[..4]
            };
            if self.to.write_all(first).is_err() {
                return self.close();
            }
            limit = limit.map(|limit: usize| limit.saturating_sub(first.len()));
        }
        loop {
            let wanted = limit.map_or(buffer.len(), |limit| limit.min(buffer.len()));
            if wanted == 0 {
                // Cut: both of this connection's sockets go down at once.
                let _ = self.from.shutdown(Shutdown::Both);
                let _ = self.to.shutdown(Shutdown::Both);
                if let Some((_, _, cut)) = &self.cut {
                    cut.store(true, Ordering::SeqCst);
                }
                return;
            }
            let read = match self.from.read(&mut buffer[..wanted]) {
                Ok(0) | Err(_) => return self.close(),
                Ok(read) => read,
            };
            if self.to.write_all(&buffer[..read]).is_err() {
                return self.close();
            }
            limit = limit.map(|limit| limit - read);
        }
    }

    /// Passes an end of stream on (or, after an error, gives up on both sockets).
    fn close(self) {
        let _ = self.to.shutdown(Shutdown::Write);
    }
}

/// A destination on a fresh TCP address whose cancel handle the test keeps.
fn destination(
    memory: GuestMemory,
) -> (
    Address,
    multifd::CancelHandle,
    JoinHandle<Result<MigrationStats, Error>>,
) {
    let (listener, address) = listener(false);
    let destination = Destination::new({
        let mut config = DestinationConfig::default();
        config.wait_for_source = Some(DEADLINE);
        config.connect_timeout = DEADLINE;
        config.round_timeout = DEADLINE;
        config
    });
    let cancel = destination.cancel_handle();
    let thread = std::thread::Builder::new()
        .name("test-destination".into())
        .spawn(move || {
            destination.run(&listener, move |announced| {
                let blocks = announced
                    .iter()
                    .map(|block| {
                        memory
                            .find(&block.name)
                            .map(|index| memory.blocks()[index].clone())
                            .ok_or_else(|| format!("no block {}", block.name))
                    })
                    .collect::<Result<_, _>>()?;
                GuestMemory::new(blocks).map_err(|error| error.to_string())
            })
        })
        .expect("spawn the destination");
    (address, cancel, thread)
}

fn random_memory(length: usize, seed: u64) -> GuestMemory {
    let block = block("pc.ram", length);
    fill_random(&block, seed);
    GuestMemory::new(vec![block]).expect("memory")
}

/// Queues every page of every block for `rounds` rounds, then completes.
fn migrate(mut source: Source, rounds: usize) -> Result<MigrationStats, Error> {
    for _ in 0..rounds {
        for block in 0..source.memory().blocks().len() {
            source.queue_block(block)?;
        }
        source.end_round()?;
    }
    source.complete()
}

/// Asserts that no engine thread outlives the migration (after a short settle).
fn assert_no_engine_threads() {
    let left = engine_threads_after(Duration::from_secs(1));
    assert!(left.is_empty(), "threads left running: {left:?}");
}

/// The channel the proxy cuts.
const CUT: u8 = 2;

/// Migrates 32 MiB of random data over 4 channels through a proxy that cuts channel
/// [`CUT`] after 200 KiB. Both ends must fail within the deadline and leave no engine
/// thread behind; returns their errors.
fn cut_channel_mid_migration() -> (Error, Error) {
    let source_memory = random_memory(32 << 20, 0x5eed);
    let (address, _cancel, destination) = destination(empty_like(&source_memory));
    let proxy = Proxy::start(&address, CUT, 200 << 10);
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 4;
        config.connect_timeout = DEADLINE;
        config
    };
    let started = Instant::now();
    let source = Source::connect(&proxy.address, &config, source_memory).expect("connect");
    // A new thread carries its parent's name until it sets its own: poll.
    let give_up = Instant::now() + Duration::from_secs(1);
    while threads_named(&ENGINE_THREADS).is_empty() && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !threads_named(&ENGINE_THREADS).is_empty(),
        "the thread check sees the engine's threads: {:?}",
        threads_named(&[""])
    );
    let source = std::thread::Builder::new()
        .name("test-source".into())
        .spawn(move || migrate(source, 1))
        .expect("spawn the source");
    let source_result = join_within(source, FAILURE_DEADLINE);
    let destination_result = join_within(destination, FAILURE_DEADLINE);
    let elapsed = started.elapsed();
    assert!(
        proxy.cut.load(Ordering::SeqCst),
        "the proxy cut the channel"
    );
    proxy.finish();
    assert!(elapsed < FAILURE_DEADLINE, "failing took {elapsed:?}");
    assert_no_engine_threads();
    (
        source_result.expect_err("the source fails"),
        destination_result.expect_err("the destination fails"),
    )
}

/// Whether a destination error reports a channel break: the channel's EOF or I/O error
/// (`Some(id)`), or the source's Abort naming its own channel `id`.
fn destination_broken_channel(error: &Error) -> Option<u8> {
    match error {
        Error::Closed {
            side: Side::Destination,
            link: Link::Channel(id),
            ..
        }
        | Error::Io {
            side: Side::Destination,
            link: Link::Channel(id),
            ..
        } => Some(*id),
        Error::PeerFailed {
            side: Side::Destination,
            reason,
        } => {
            (0..4).find(|id| reason.starts_with(&format!("source aborted: source channel {id}: ")))
        }
        _ => None,
    }
}

/// Whether a source error reports a channel break: its own (`Some(id)`), or the
/// destination's report naming channel `id`.
fn source_broken_channel(error: &Error) -> Option<u8> {
    match error {
        Error::Closed {
            side: Side::Source,
            link: Link::Channel(id),
            ..
        }
        | Error::Io {
            side: Side::Source,
            link: Link::Channel(id),
            ..
        } => Some(*id),
        Error::PeerFailed {
            side: Side::Source,
            reason,
        } => (0..4).find(|id| reason.contains(&format!("channel {id}:"))),
        _ => None,
    }
}

#[test]
fn channel_cut_mid_migration_stops_both_ends() {
    let _serial = serial();
    let (source_error, destination_error) = cut_channel_mid_migration();
    // Which channel each end names is `channel_cut_is_reported_as_that_channel`; here both
    // must report a broken channel, promptly, with every thread gone.
    assert!(
        destination_broken_channel(&destination_error).is_some(),
        "{destination_error:?}"
    );
    assert!(
        source_broken_channel(&source_error).is_some(),
        "{source_error:?}"
    );
}

#[test]
fn channel_cut_is_reported_as_that_channel() {
    let _serial = serial();
    // Both ends see the cut: the destination reads EOF on the channel, and the source's
    // next write on it is reset (the proxy's socket no longer reads). Whichever end
    // notices first reports it, so the destination may also learn of the cut from the
    // source's Abort; either way each end's error names the channel that was cut.
    // The wrong attribution is a race: try several times.
    for _ in 0..10 {
        let (source_error, destination_error) = cut_channel_mid_migration();
        assert_eq!(
            destination_broken_channel(&destination_error),
            Some(CUT),
            "{destination_error:?}"
        );
        assert_eq!(
            source_broken_channel(&source_error),
            Some(CUT),
            "{source_error:?}"
        );
    }
}

/// Cancels a source from another thread once 4 MiB went out; returns what both ends
/// reported, each within the deadline.
fn cancel_source_mid_migration() -> (Result<MigrationStats, Error>, Result<MigrationStats, Error>) {
    let source_memory = random_memory(8 << 20, 0xca11);
    let (address, _cancel, destination) = destination(empty_like(&source_memory));
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 4;
        config.connect_timeout = DEADLINE;
        config
    };
    let source = Source::connect(&address, &config, source_memory).expect("connect");
    let cancel = source.cancel_handle();
    let monitor = source.monitor();
    // Enough rounds that the migration is still running when the cancel comes.
    let source = std::thread::Builder::new()
        .name("test-source".into())
        .spawn(move || migrate(source, 1000))
        .expect("spawn the source");
    let canceller = std::thread::Builder::new()
        .name("test-canceller".into())
        .spawn(move || {
            let give_up = Instant::now() + DEADLINE;
            while monitor.progress().bytes < 4 << 20 && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(1));
            }
            cancel.cancel();
            Instant::now()
        })
        .expect("spawn the canceller");
    let cancelled_at = join_within(canceller, DEADLINE + Duration::from_secs(1));
    let source_result = join_within(source, FAILURE_DEADLINE);
    let destination_result = join_within(destination, FAILURE_DEADLINE);
    assert!(cancelled_at.elapsed() < FAILURE_DEADLINE);
    assert_no_engine_threads();
    (source_result, destination_result)
}

#[test]
fn source_cancel_stops_both_ends() {
    let _serial = serial();
    let (source_result, destination_result) = cancel_source_mid_migration();
    match source_result {
        Err(Error::Cancelled { side: Side::Source }) => {}
        other => panic!("expected the source cancelled, got {other:?}"),
    }
    // What the destination reports is `destination_learns_the_source_cancelled`; here only
    // that it stopped, with the cancel's report or the channels the cancel closed.
    match destination_result {
        Err(Error::PeerFailed {
            side: Side::Destination,
            reason,
        }) => assert!(reason.contains("cancelled"), "{reason}"),
        Err(Error::Closed {
            side: Side::Destination,
            link: Link::Channel(_),
            ..
        }) => {}
        other => panic!("expected the destination to stop, got {other:?}"),
    }
}

#[test]
fn destination_learns_the_source_cancelled() {
    let _serial = serial();
    let (source_result, destination_result) = cancel_source_mid_migration();
    match source_result {
        Err(Error::Cancelled { side: Side::Source }) => {}
        other => panic!("expected the source cancelled, got {other:?}"),
    }
    match destination_result {
        Err(Error::PeerFailed {
            side: Side::Destination,
            reason,
        }) => assert!(reason.contains("cancelled"), "{reason}"),
        other => panic!("expected the destination to report the cancel, got {other:?}"),
    }
}

#[test]
fn destination_cancel_mid_migration() {
    let _serial = serial();
    let source_memory = random_memory(8 << 20, 0xdead);
    let (address, cancel, destination) = destination(empty_like(&source_memory));
    let config = {
        let mut config = SourceConfig::default();
        config.channels = 4;
        config.connect_timeout = DEADLINE;
        config
    };
    let source = Source::connect(&address, &config, source_memory).expect("connect");
    let monitor = source.monitor();
    let source = std::thread::Builder::new()
        .name("test-source".into())
        .spawn(move || migrate(source, 1000))
        .expect("spawn the source");
    let give_up = Instant::now() + DEADLINE;
    while monitor.progress().bytes < 4 << 20 && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(1));
    }
    cancel.cancel();
    let destination_result = join_within(destination, FAILURE_DEADLINE);
    let source_result = join_within(source, FAILURE_DEADLINE);

    match destination_result {
        Err(Error::Cancelled {
            side: Side::Destination,
        }) => {}
        other => panic!("expected the destination cancelled, got {other:?}"),
    }
    match source_result {
        Err(Error::PeerFailed {
            side: Side::Source,
            reason,
        }) => assert!(reason.contains("cancelled"), "{reason}"),
        other => panic!("expected the source to report the cancel, got {other:?}"),
    }
    assert_no_engine_threads();
}

#[test]
fn destination_cancel_while_waiting_for_a_source() {
    let _serial = serial();
    let (listener, _address) = listener(false);
    let destination = Destination::new(DestinationConfig::default());
    let cancel = destination.cancel_handle();
    let thread = std::thread::Builder::new()
        .name("test-destination".into())
        .spawn(move || destination.run(&listener, |_| Err("no source ever comes".to_owned())))
        .expect("spawn the destination");
    std::thread::sleep(Duration::from_millis(150));
    let cancelled = Instant::now();
    cancel.cancel();
    match join_within(thread, Duration::from_secs(1)) {
        Err(Error::Cancelled {
            side: Side::Destination,
        }) => {}
        other => panic!("expected the destination cancelled, got {other:?}"),
    }
    assert!(
        cancelled.elapsed() < Duration::from_millis(500),
        "cancel took {:?}",
        cancelled.elapsed()
    );
    assert_no_engine_threads();
}
