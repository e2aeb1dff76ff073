//! Admission: telling a migration's connections from strays on a public listener.
//!
//! Anything can connect to a destination's listener: port scanners, load-balancer health
//! checks, an HTTP client, a source of another migration, a peer that connects and never
//! speaks. None of them may end or stall the migration the destination waits for, so the
//! accepting thread never reads from a new connection itself. Each accepted connection
//! is identified on its own short-lived thread, by the setup deadline: the TLS handshake
//! where TLS is configured, then the connection magic and, for a multifd channel, its
//! hello. The verdict comes back over a channel, and a byte on a wake socket makes the
//! accepting thread's poll return at once.
//!
//! A connection that fails identification is a stray: dropped, logged, counted, and
//! remembered as the last stray error so that a destination that times out can say what
//! it saw instead of a source. At most [`MAX_UNIDENTIFIED`] connections are identified
//! at once; a newer one evicts the oldest, so a flood of idle connections cannot keep the
//! real source's connection from being read, and file descriptors stay bounded.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use multifd_wire::{ChannelHello, CHANNEL_HELLO_LEN, CONTROL_MAGIC, MULTIFD_MAGIC};
use rustls::ServerConfig;

use crate::error::{Error, Violation};
use crate::failure::Failure;
use crate::ids::{Link, Side};
use crate::tls;
use crate::transport::Stream;

/// Connections identified at once. A real source opens its control connection and then
/// its channels (at most 255), each of which identifies itself within a round trip; 32
/// in flight let a source's channels through while strays hold the rest, and bound the
/// threads and descriptors a flood of connections can take.
pub(crate) const MAX_UNIDENTIFIED: usize = 32;

/// What an identified connection is.
pub(crate) enum Identified {
    /// A control connection: the source's handshake follows.
    Control(Stream),
    /// A multifd channel and the hello it opened with.
    Channel(ChannelHello, Stream),
}

impl Identified {
    fn stream(&self) -> &Stream {
        match self {
            Self::Control(stream) | Self::Channel(_, stream) => stream,
        }
    }
}

/// The verdict on one connection, from its identifying thread.
struct Verdict {
    id: u64,
    result: Result<Identified, Error>,
}

/// A connection being identified.
struct Pending {
    id: u64,
    /// A clone of the connection, to shut it down on eviction or when admission ends.
    socket: Stream,
    /// Shut down to make room: its thread is ending.
    evicted: bool,
    thread: JoinHandle<()>,
}

/// Identifies a destination's incoming connections off the accepting thread.
pub(crate) struct Admission {
    tls: Option<Arc<ServerConfig>>,
    /// How long a connection may take to identify itself.
    timeout: Duration,
    /// The idle timeout, for the kernel's liveness checks on every connection.
    idle_timeout: Duration,
    failure: Arc<Failure>,
    verdicts: (Sender<Verdict>, Receiver<Verdict>),
    /// Identifying threads write a byte to the first socket; the accepting thread polls
    /// the second.
    wake: (Arc<UnixStream>, UnixStream),
    pending: VecDeque<Pending>,
    next_id: u64,
    strays: u64,
    last_stray: Option<Error>,
}

impl Admission {
    pub(crate) fn new(
        tls: Option<Arc<ServerConfig>>,
        timeout: Duration,
        idle_timeout: Duration,
        failure: &Arc<Failure>,
    ) -> Result<Self, Error> {
        let wake_error = |error| Error::io(Side::Destination, Link::Listener, "wake socket", error);
        let (writer, reader) = UnixStream::pair().map_err(wake_error)?;
        // Neither end may block: a full wake socket already wakes the poll.
        writer.set_nonblocking(true).map_err(wake_error)?;
        reader.set_nonblocking(true).map_err(wake_error)?;
        Ok(Self {
            tls,
            timeout,
            idle_timeout,
            failure: Arc::clone(failure),
            verdicts: mpsc::channel(),
            wake: (Arc::new(writer), reader),
            pending: VecDeque::new(),
            next_id: 0,
            strays: 0,
            last_stray: None,
        })
    }

    /// The descriptor that becomes readable when a verdict is ready.
    pub(crate) fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.1.as_fd()
    }

    /// Starts identifying `stream`, evicting the oldest pending connection when
    /// [`MAX_UNIDENTIFIED`] are pending already.
    pub(crate) fn admit(&mut self, stream: Stream) -> Result<(), Error> {
        let live = self
            .pending
            .iter()
            .filter(|pending| !pending.evicted)
            .count();
        if live >= MAX_UNIDENTIFIED {
            if let Some(oldest) = self.pending.iter_mut().find(|pending| !pending.evicted) {
                // Its thread then fails at once and reports the stray.
                oldest.socket.shutdown();
                oldest.evicted = true;
            }
        }
        let socket = stream
            .try_clone()
            .map_err(|error| Error::io(Side::Destination, Link::Listener, "clone", error))?;
        let id = self.next_id;
        self.next_id += 1;
        let verdicts = self.verdicts.0.clone();
        let wake = Arc::clone(&self.wake.0);
        let tls = self.tls.clone();
        let deadline = Instant::now() + self.timeout;
        let idle_timeout = self.idle_timeout;
        let thread = self
            .failure
            .spawn(Side::Destination, "multifd-admit", move || {
                let result = identify(stream, tls.as_ref(), deadline).and_then(|identified| {
                    identified
                        .stream()
                        .set_liveness(idle_timeout)
                        .map_err(|error| {
                            Error::io(Side::Destination, Link::Listener, "keepalive", error)
                        })?;
                    Ok(identified)
                });
                // The receiver lives as long as the admission that joins this thread.
                let _ = verdicts.send(Verdict { id, result });
                // A full wake socket has already woken the poll.
                let _ = (&*wake).write(&[1]);
            })?;
        self.pending.push_back(Pending {
            id,
            socket,
            evicted: false,
            thread,
        });
        Ok(())
    }

    /// The next connection identified since the last call, if any; strays met on the way
    /// are dropped, logged and counted.
    pub(crate) fn next_identified(&mut self) -> Option<Identified> {
        let mut drained = [0u8; 64];
        // Empties the wake socket; the verdicts themselves are on the channel.
        while matches!((&self.wake.1).read(&mut drained), Ok(read) if read > 0) {}
        while let Ok(verdict) = self.verdicts.1.try_recv() {
            if let Some(index) = self.pending.iter().position(|p| p.id == verdict.id) {
                if let Some(done) = self.pending.remove(index) {
                    // The thread has sent its verdict, its last act.
                    let _ = done.thread.join();
                }
            }
            match verdict.result {
                Ok(identified) => return Some(identified),
                Err(error) => self.stray(error),
            }
        }
        None
    }

    /// Drops a connection that is not (or no longer) the migration's, and remembers why.
    pub(crate) fn stray(&mut self, error: Error) {
        self.strays += 1;
        tracing::warn!(strays = self.strays, "dropped a stray connection: {error}");
        self.last_stray = Some(error);
    }

    /// Connections dropped as strays so far.
    pub(crate) fn strays(&self) -> u64 {
        self.strays
    }

    /// The error a wait that timed out ends with: plain, or naming the strays met.
    pub(crate) fn timed_out(&mut self, what: &'static str) -> Error {
        match self.last_stray.take() {
            Some(last) => Error::TimeoutWithStrays {
                side: Side::Destination,
                what,
                strays: self.strays,
                last: Box::new(last),
            },
            None => Error::Timeout {
                side: Side::Destination,
                what,
            },
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        for pending in &self.pending {
            pending.socket.shutdown();
        }
        for pending in self.pending.drain(..) {
            // Shut down, the thread ends within its next read.
            let _ = pending.thread.join();
        }
    }
}

/// Reads what a connection is, by `deadline`: the TLS handshake first where configured
/// (the magic is inside TLS), then the magic and, for a channel, the rest of its hello.
fn identify(
    stream: Stream,
    tls: Option<&Arc<ServerConfig>>,
    deadline: Instant,
) -> Result<Identified, Error> {
    let listener_error =
        |context, error| Error::io(Side::Destination, Link::Listener, context, error);
    let stream = match tls {
        Some(config) => tls::accept(stream, config, deadline).map_err(|source| Error::Tls {
            side: Side::Destination,
            link: Link::Listener,
            source,
        })?,
        None => stream,
    };
    let mut first = [0u8; CHANNEL_HELLO_LEN];
    stream
        .read_exact_by(&mut first[..4], deadline)
        .map_err(|error| listener_error("read connection magic", error))?;
    let magic = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
    let identified = match magic {
        CONTROL_MAGIC => Identified::Control(stream),
        MULTIFD_MAGIC => {
            stream
                .read_exact_by(&mut first[4..], deadline)
                .map_err(|error| listener_error("read channel hello", error))?;
            let hello = ChannelHello::decode(&first)
                .map_err(|error| Error::wire(Side::Destination, Link::Listener, error))?;
            Identified::Channel(hello, stream)
        }
        other if tls.is_none() && tls::is_record_header(&first) => {
            return Err(Error::Tls {
                side: Side::Destination,
                link: Link::Listener,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} (magic {other:#010x})", tls::PEER_USES_TLS),
                ),
            })
        }
        other => {
            return Err(Error::protocol(
                Side::Destination,
                Link::Listener,
                Violation::UnknownConnectionMagic(other),
            ))
        }
    };
    identified
        .stream()
        .set_read_timeout(None)
        .map_err(|error| listener_error("set read timeout", error))?;
    Ok(identified)
}
