//! The control channel's framing over a connection.

use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use multifd_wire::{ControlMessage, CONTROL_FRAME_HEADER_LEN, CONTROL_MAGIC};

use crate::error::Error;
use crate::ids::{Link, Side};
use crate::tls;
use crate::transport::Stream;

/// A control connection: frames out, frames in, each side's errors named.
pub(crate) struct ControlChannel {
    side: Side,
    stream: Stream,
    frame: Vec<u8>,
    /// While set (during setup), every message must arrive whole by then, however the
    /// peer paces its bytes; otherwise reads wait as long as the socket's read timeout.
    deadline: Option<Instant>,
}

/// How long a control write may block: the peer reads its control channel promptly, so a
/// write stuck this long means the peer is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a failure report waits for the control channel: another thread writing a
/// small frame (a round's receipt or end) holds it for microseconds; one that holds it
/// longer is stuck on a peer that stopped reading, which then learns of the failure from
/// the closed connections instead.
const REPORT_LOCK_WAIT: Duration = Duration::from_millis(50);

/// The control channel for a failure report, unless another thread keeps it longer than
/// [`REPORT_LOCK_WAIT`]. Never blocks on a lock this thread holds.
pub(crate) fn lock_for_report(
    control: &Mutex<ControlChannel>,
) -> Option<MutexGuard<'_, ControlChannel>> {
    let deadline = Instant::now() + REPORT_LOCK_WAIT;
    loop {
        match control.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

impl ControlChannel {
    pub(crate) fn new(side: Side, stream: Stream) -> Result<Self, Error> {
        let channel = Self {
            side,
            stream,
            frame: Vec::new(),
            deadline: None,
        };
        channel
            .stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|error| channel.io("set write timeout", error))?;
        Ok(channel)
    }

    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    pub(crate) fn try_clone(&self) -> Result<Self, Error> {
        Ok(Self {
            side: self.side,
            stream: self
                .stream
                .try_clone()
                .map_err(|error| self.io("clone", error))?,
            frame: Vec::new(),
            deadline: self.deadline,
        })
    }

    /// Sets (or with `None` clears) the instant by which each message must have arrived.
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Reads and writes on the control channel run under a timeout (the setup deadline,
    /// then the idle timeout): one that passes is [`Error::Stalled`].
    fn io(&self, context: &'static str, error: io::Error) -> Error {
        Error::io_or_stalled(self.side, Link::Control, context, error)
    }

    pub(crate) fn send_magic(&self) -> Result<(), Error> {
        (&self.stream)
            .write_all(&CONTROL_MAGIC.to_be_bytes())
            .map_err(|error| self.io("write magic", error))
    }

    pub(crate) fn send(&mut self, message: &ControlMessage) -> Result<(), Error> {
        self.frame.clear();
        message
            .encode(&mut self.frame)
            .map_err(|error| Error::wire(self.side, Link::Control, error))?;
        (&self.stream)
            .write_all(&self.frame)
            .map_err(|error| Error::io(self.side, Link::Control, "write message", error))
    }

    /// Reads one message; EOF between messages is [`Error::Closed`].
    pub(crate) fn receive(&mut self) -> Result<ControlMessage, Error> {
        self.frame.resize(CONTROL_FRAME_HEADER_LEN, 0);
        // The start of a TLS record first: a TLS peer's alert (7 bytes) is shorter than a
        // frame header, and a plaintext end should say that the peer uses TLS.
        let (start, rest) = self.frame.split_at_mut(tls::RECORD_START_LEN);
        let awaiting = |error| {
            Error::io_or_stalled(self.side, Link::Control, "while awaiting a message", error)
        };
        read(&self.stream, start, self.deadline).map_err(awaiting)?;
        if !matches!(self.stream, Stream::Tls(_)) && tls::is_record_header(start) {
            return Err(Error::Tls {
                side: self.side,
                link: Link::Control,
                source: io::Error::new(io::ErrorKind::InvalidData, tls::PEER_USES_TLS),
            });
        }
        read(&self.stream, rest, self.deadline).map_err(awaiting)?;
        let length = ControlMessage::payload_len(&self.frame)
            .map_err(|error| Error::wire(self.side, Link::Control, error))?;
        self.frame.resize(CONTROL_FRAME_HEADER_LEN + length, 0);
        read(
            &self.stream,
            &mut self.frame[CONTROL_FRAME_HEADER_LEN..],
            self.deadline,
        )
        .map_err(|error| Error::io_or_stalled(self.side, Link::Control, "mid-message", error))?;
        ControlMessage::decode(&self.frame)
            .map_err(|error| Error::wire(self.side, Link::Control, error))
    }
}

/// Fills `buffer`, by `deadline` when there is one.
fn read(stream: &Stream, buffer: &mut [u8], deadline: Option<Instant>) -> io::Result<()> {
    match deadline {
        Some(deadline) => stream.read_exact_by(buffer, deadline),
        None => (&*stream).read_exact(buffer),
    }
}
