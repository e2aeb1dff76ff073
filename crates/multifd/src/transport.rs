//! Connections: TCP and Unix-domain sockets, and raw vectored I/O between a socket and
//! guest memory.
//!
//! Guest memory may change under a live migration, so the engine never forms a `&[u8]`
//! over it; pages move between a socket and guest memory with `writev`/`readv` over raw
//! iovecs, and the kernel does the copy. Over TLS the pages must pass through rustls:
//! they are copied with raw pointer copies between guest memory and a buffer.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::ids::{Link, Side};
use crate::sync::deadline_after;
use crate::tls::TlsStream;

/// Where a destination listens and a source connects.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Address {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = || Error::Address {
            address: text.to_owned(),
        };
        if let Some(host_port) = text.strip_prefix("tcp:") {
            let (host, port) = host_port.rsplit_once(':').ok_or_else(invalid)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(invalid());
            }
            Ok(Self::Tcp(host_port.to_owned()))
        } else if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid());
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            Err(invalid())
        }
    }
}

impl Address {
    /// The host of a TCP address (brackets kept for IPv6), `None` for a Unix socket.
    pub(crate) fn host(&self) -> Option<&str> {
        match self {
            Self::Tcp(host_port) => host_port.rsplit_once(':').map(|(host, _)| host),
            Self::Unix(_) => None,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(host_port) => write!(formatter, "tcp:{host_port}"),
            Self::Unix(path) => write!(formatter, "unix:{}", path.display()),
        }
    }
}

/// One connection, control or multifd channel.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Shared by every clone: a TLS session cannot be split into independent readers.
    Tls(Arc<TlsStream>),
}

impl Stream {
    /// Connects, retrying refused connections until `timeout` so a source may start just
    /// before its destination listens.
    pub(crate) fn connect(address: &Address, timeout: Duration) -> io::Result<Self> {
        let deadline = deadline_after(timeout);
        loop {
            let attempt = match address {
                Address::Tcp(host_port) => connect_tcp(host_port, timeout),
                Address::Unix(path) => UnixStream::connect(path).map(Self::Unix),
            };
            match attempt {
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                result => return result,
            }
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(stream) => Self::Tcp(stream.try_clone()?),
            Self::Unix(stream) => Self::Unix(stream.try_clone()?),
            Self::Tls(stream) => Self::Tls(Arc::clone(stream)),
        })
    }

    /// Ends both directions; a thread blocked on this connection wakes with an error or EOF.
    pub(crate) fn shutdown(&self) {
        // Already-closed connections report ENOTCONN; nothing else is left to do then.
        let _ = match self {
            Self::Tcp(stream) => stream.shutdown(Shutdown::Both),
            Self::Unix(stream) => stream.shutdown(Shutdown::Both),
            Self::Tls(stream) => {
                stream.socket.shutdown();
                Ok(())
            }
        };
    }

    /// Whether input already read from the socket waits to be consumed (only TLS buffers
    /// any): a poll on the socket would miss it.
    fn has_buffered_input(&self) -> bool {
        match self {
            Self::Tls(stream) => stream.has_buffered_input(),
            Self::Tcp(_) | Self::Unix(_) => false,
        }
    }

    /// Whether bytes have arrived that nobody has read yet (EOF does not count).
    pub(crate) fn has_pending_data(&self) -> bool {
        if self.has_buffered_input() {
            return true;
        }
        let mut byte = 0u8;
        let fd = self.as_fd().as_raw_fd();
        // SAFETY: `byte` is a valid one-byte buffer for the call; MSG_PEEK leaves the data
        // queued and MSG_DONTWAIT never blocks.
        let peeked = unsafe {
            libc::recv(
                fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        peeked > 0
    }

    /// Ends the sending direction: the peer reads EOF once it has read everything sent.
    pub(crate) fn shutdown_write(&self) {
        // As in `shutdown`: a closed connection has nothing left to end.
        let _ = match self {
            Self::Tcp(stream) => stream.shutdown(Shutdown::Write),
            Self::Unix(stream) => stream.shutdown(Shutdown::Write),
            Self::Tls(stream) => {
                stream.socket.shutdown_write();
                Ok(())
            }
        };
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(stream) => stream.set_write_timeout(timeout),
            Self::Unix(stream) => stream.set_write_timeout(timeout),
            Self::Tls(stream) => stream.socket.set_write_timeout(timeout),
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(stream) => stream.set_read_timeout(timeout),
            Self::Unix(stream) => stream.set_read_timeout(timeout),
            Self::Tls(stream) => stream.socket.set_read_timeout(timeout),
        }
    }

    /// Fills `buffer` by `deadline`, however the peer paces its bytes: each read waits
    /// only for the time left, so a peer trickling one byte at a time cannot stretch the
    /// wait. EOF before the end is `UnexpectedEof`, the deadline `TimedOut`.
    pub(crate) fn read_exact_by(&self, mut buffer: &mut [u8], deadline: Instant) -> io::Result<()> {
        while !buffer.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.set_read_timeout(Some(left))?;
            match (&*self).read(buffer) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => buffer = &mut buffer[read..],
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // A socket read timeout shows as `WouldBlock`: here it is the deadline.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::ErrorKind::TimedOut.into())
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Lets the kernel notice a peer that vanished (a host that crashed, a network
    /// partition) even while this side only waits: TCP keepalive probes an idle
    /// connection, and `TCP_USER_TIMEOUT` drops one whose sent data stays unacknowledged
    /// for `idle_timeout`. Unix sockets need neither: the kernel knows both ends.
    pub(crate) fn set_liveness(&self, idle_timeout: Duration) -> io::Result<()> {
        let socket = match self {
            Self::Tcp(stream) => socket2::SockRef::from(stream),
            Self::Tls(stream) => return stream.socket.set_liveness(idle_timeout),
            Self::Unix(_) => return Ok(()),
        };
        // Probes start after a tenth of the idle timeout without traffic and repeat that
        // often, so an unanswered peer is declared dead after about the idle timeout.
        let probe = (idle_timeout / 10).max(Duration::from_secs(1));
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(probe)
            .with_interval(probe)
            .with_retries(KEEPALIVE_PROBES);
        socket.set_tcp_keepalive(&keepalive)?;
        socket.set_tcp_user_timeout(Some(idle_timeout))
    }

    /// Writes every byte the iovecs describe, resuming after partial writes.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and readable until this returns.
    /// The memory may be written concurrently (live guest RAM): the kernel copies it and
    /// no Rust reference to it is formed.
    pub(crate) unsafe fn write_all_raw(&self, iovecs: &mut [libc::iovec]) -> io::Result<()> {
        if let Self::Tls(stream) = self {
            // SAFETY: the same contract, passed on.
            return unsafe { stream.write_all_raw(iovecs) };
        }
        let fd = self.as_fd().as_raw_fd();
        transfer_all(iovecs, io::ErrorKind::WriteZero, |remaining, count| {
            // SAFETY: an all-zero msghdr is valid (no address, no control data).
            let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
            message.msg_iov = remaining.as_mut_ptr();
            message.msg_iovlen = count as _;
            // SAFETY: the iovecs point to memory the caller keeps mapped (contract above);
            // `count` is within the slice. MSG_NOSIGNAL: a peer that went away is an EPIPE
            // error here, not a SIGPIPE that kills an embedding VMM.
            unsafe { libc::sendmsg(fd, &message, libc::MSG_NOSIGNAL) }
        })
    }

    /// Fills every byte the iovecs describe, resuming after partial reads; EOF before the
    /// end is `UnexpectedEof`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and writable until this returns
    /// and that no Rust reference aliases.
    pub(crate) unsafe fn read_exact_raw(&self, iovecs: &mut [libc::iovec]) -> io::Result<()> {
        if let Self::Tls(stream) = self {
            // SAFETY: the same contract, passed on.
            return unsafe { stream.read_exact_raw(iovecs) };
        }
        let fd = self.as_fd().as_raw_fd();
        transfer_all(iovecs, io::ErrorKind::UnexpectedEof, |remaining, count| {
            // SAFETY: the iovecs point to writable memory the caller keeps mapped and
            // unaliased (contract above); `count` is within the slice.
            unsafe { libc::readv(fd, remaining.as_ptr(), count as libc::c_int) }
        })
    }
}

/// Repeats a vectored system call until every iovec is done: resumes after partial
/// transfers and interruptions, and reports a transfer of zero bytes as `on_zero`.
pub(crate) fn transfer_all(
    iovecs: &mut [libc::iovec],
    on_zero: io::ErrorKind,
    mut call: impl FnMut(&mut [libc::iovec], usize) -> isize,
) -> io::Result<()> {
    let mut remaining = iovecs;
    while !remaining.is_empty() {
        let count = remaining.len().min(IOV_MAX);
        let done = call(remaining, count);
        if done < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if done == 0 {
            return Err(on_zero.into());
        }
        remaining = advance(remaining, done as usize);
    }
    Ok(())
}

/// Keepalive probes left unanswered before the kernel drops a connection: with a probe
/// every tenth of the idle timeout after a tenth of it idle, nine probes end a dead
/// connection at about the idle timeout.
const KEEPALIVE_PROBES: u32 = 9;

/// Linux's limit on iovecs per call.
pub(crate) const IOV_MAX: usize = 1024;

/// Drops the first `done` bytes from the iovecs after a partial transfer.
pub(crate) fn advance(iovecs: &mut [libc::iovec], mut done: usize) -> &mut [libc::iovec] {
    let mut first = 0;
    while first < iovecs.len() && done >= iovecs[first].iov_len {
        done -= iovecs[first].iov_len;
        first += 1;
    }
    let rest = &mut iovecs[first..];
    if let Some(partial) = rest.first_mut() {
        // Pointer arithmetic on a raw pointer: no memory is accessed here.
        partial.iov_base = partial.iov_base.cast::<u8>().wrapping_add(done).cast();
        partial.iov_len -= done;
    }
    rest
}

fn connect_tcp(host_port: &str, timeout: Duration) -> io::Result<Stream> {
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "host resolves to no address");
    for address in host_port.to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, timeout) {
            Ok(stream) => {
                // Packets are written whole with one writev; Nagle would only delay them.
                stream.set_nodelay(true)?;
                return Ok(Stream::Tcp(stream));
            }
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(stream) => stream.as_fd(),
            Self::Unix(stream) => stream.as_fd(),
            Self::Tls(stream) => stream.socket.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => (&*stream).read(buffer),
            Stream::Unix(stream) => (&*stream).read(buffer),
            Stream::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => (&*stream).write(buffer),
            Stream::Unix(stream) => (&*stream).write(buffer),
            Stream::Tls(stream) => stream.write_all(buffer).map(|()| buffer.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`Listener::accept_until`] saw.
pub(crate) enum Accepted {
    /// A new connection.
    Connection(Stream),
    /// The watched connection has data or was closed.
    WatchReadable,
    /// The wake descriptor became readable.
    Woken,
    /// The deadline passed.
    TimedOut,
}

/// A bound listening socket for a destination.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    /// The path is removed again when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `address`. For TCP, port 0 picks a free port; [`Listener::address`] tells it.
    pub fn bind(address: &Address) -> Result<Self, Error> {
        let bind_error = |source| Error::Io {
            side: Side::Destination,
            link: Link::Listener,
            context: "bind",
            source,
        };
        let inner = match address {
            Address::Tcp(host_port) => {
                ListenerInner::Tcp(TcpListener::bind(host_port.as_str()).map_err(bind_error)?)
            }
            Address::Unix(path) => ListenerInner::Unix(
                UnixListener::bind(path)
                    .map_err(|error| bind_error(explain_unix_bind(path, error)))?,
                path.clone(),
            ),
        };
        Ok(Self { inner })
    }

    /// The address sources should connect to.
    pub fn address(&self) -> Address {
        match &self.inner {
            ListenerInner::Tcp(listener) => match listener.local_addr() {
                Ok(address) => Address::Tcp(address.to_string()),
                Err(_) => Address::Tcp(String::new()),
            },
            ListenerInner::Unix(_, path) => Address::Unix(path.clone()),
        }
    }

    /// Accepts one connection, waiting at most until `deadline`, unless `watch` (an
    /// established connection) becomes readable first: it then has a message for the
    /// caller, or its peer closed it; or `wake` (a descriptor other threads write to)
    /// becomes readable.
    pub(crate) fn accept_until(
        &self,
        deadline: Instant,
        watch: Option<&Stream>,
        wake: BorrowedFd<'_>,
    ) -> io::Result<Accepted> {
        if watch.is_some_and(Stream::has_buffered_input) {
            return Ok(Accepted::WatchReadable);
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let mut polls = [
            libc::pollfd {
                fd: self.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: watch.map_or(-1, |stream| stream.as_fd().as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let millis = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `polls` is a valid array of three pollfds that lives across the call; a
        // negative descriptor is ignored by poll(2).
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, millis) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted {
                Ok(Accepted::TimedOut)
            } else {
                Err(error)
            };
        }
        if polls[1].revents != 0 {
            return Ok(Accepted::WatchReadable);
        }
        if polls[2].revents != 0 {
            return Ok(Accepted::Woken);
        }
        if polls[0].revents == 0 {
            return Ok(Accepted::TimedOut);
        }
        Ok(Accepted::Connection(match &self.inner {
            ListenerInner::Tcp(listener) => {
                let (stream, _) = listener.accept()?;
                // A peer that reset the connection already makes this fail; reading from
                // it then fails too, and that is where the connection is judged.
                let _ = stream.set_nodelay(true);
                Stream::Tcp(stream)
            }
            ListenerInner::Unix(listener, _) => Stream::Unix(listener.accept()?.0),
        }))
    }

    fn raw_fd(&self) -> libc::c_int {
        match &self.inner {
            ListenerInner::Tcp(listener) => listener.as_raw_fd(),
            ListenerInner::Unix(listener, _) => listener.as_raw_fd(),
        }
    }
}

/// Says why a Unix socket path is taken: a socket file left behind by a process that
/// was killed (nobody accepts on it) needs removing; a live one belongs to another
/// process.
fn explain_unix_bind(path: &std::path::Path, error: io::Error) -> io::Error {
    if error.kind() != io::ErrorKind::AddrInUse {
        return error;
    }
    let why = match UnixStream::connect(path) {
        Err(refused) if refused.kind() == io::ErrorKind::ConnectionRefused => {
            "nobody listens on it: a socket file left by a process that was killed; remove it"
        }
        _ => "another process listens on it",
    };
    io::Error::new(error.kind(), format!("{} exists, {why}", path.display()))
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix(_, path) = &self.inner {
            // The socket file is ours; if it is already gone there is nothing to clean.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Appends a page to `iovecs`, extending the last iovec when the page follows it in
/// memory (fewer, longer copies in the kernel); the first `fixed` iovecs are never
/// extended.
pub(crate) fn push_page(
    iovecs: &mut Vec<libc::iovec>,
    fixed: usize,
    page: *mut u8,
    page_size: usize,
) {
    if iovecs.len() > fixed {
        if let Some(last) = iovecs.last_mut() {
            if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == page {
                last.iov_len += page_size;
                return;
            }
        }
    }
    iovecs.push(iovec(page, page_size));
}

pub(crate) fn iovec(base: *const u8, length: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast_mut().cast(),
        iov_len: length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_unix_socket_file_is_explained() {
        let directory = std::env::temp_dir().join(format!("multifd-stale-{}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("directory");
        let path = directory.join("stale.sock");
        // A socket file whose listener is gone, as a killed process leaves it.
        drop(UnixListener::bind(&path).expect("bind"));
        let error = Listener::bind(&Address::Unix(path.clone())).expect_err("taken");
        let message = error.to_string();
        assert!(message.contains("nobody listens on it"), "{message}");
        assert!(message.contains("remove it"), "{message}");
        let live = Listener::bind(&Address::Unix(directory.join("live.sock"))).expect("bind");
        let Address::Unix(live_path) = live.address() else {
            panic!("unix")
        };
        let error = Listener::bind(&Address::Unix(live_path)).expect_err("taken");
        assert!(error.to_string().contains("another process"), "{error}");
        drop(live);
        std::fs::remove_dir_all(&directory).expect("clean up");
    }

    #[test]
    fn liveness_turns_on_keepalive_and_the_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let stream = Stream::Tcp(client);
        let socket = socket2::SockRef::from(&stream);
        assert!(!socket.keepalive().expect("keepalive"));
        stream
            .set_liveness(Duration::from_secs(30))
            .expect("liveness");
        assert!(socket.keepalive().expect("keepalive"));
        assert_eq!(
            socket.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            socket.keepalive_time().expect("keepalive time"),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn a_read_by_a_deadline_is_not_stretched_by_a_trickling_peer() {
        let (mut writer, reader) = UnixStream::pair().expect("pair");
        let trickle = std::thread::spawn(move || {
            for byte in 0..20u8 {
                if writer.write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let stream = Stream::Unix(reader);
        let started = Instant::now();
        let mut buffer = [0u8; 20];
        let error = stream
            .read_exact_by(&mut buffer, started + Duration::from_millis(300))
            .expect_err("the deadline passes first");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_millis(400));
        drop(stream);
        trickle.join().expect("trickle");
    }
}
