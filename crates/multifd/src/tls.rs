//! Mutual TLS 1.3 (rustls) on every connection.
//!
//! A [`TlsStream`] is shared (`Arc`) by every clone of its connection: the control channel
//! is read on one thread while another writes on it, and failure hooks shut it down from
//! a third. rustls' `Connection` is a state machine that does no I/O of its own, so this
//! module drives the socket itself and never holds the session lock across a blocking
//! call:
//!
//! - a reader takes the `reading` lock (one reader at a time), reads ciphertext from the
//!   socket into its own buffer *without* the session lock, then locks the session only
//!   to feed it those bytes and take out plaintext;
//! - a writer takes the `writing` lock (so records reach the socket in the order they were
//!   sealed), encrypts under the session lock into its own buffer, releases the session
//!   lock, and only then writes to the socket.
//!
//! So a reader blocked on the socket never stops a writer, and the reverse. The lock order
//! is always `reading` or `writing` before `session`, and a reader that must answer the
//! peer (a TLS 1.3 key update) releases the session lock before taking `writing`.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::error::Error;
use crate::sync::lock;
use crate::transport::Stream;

/// TLS settings of one end, from a certificate directory laid out as QEMU and Cloud
/// Hypervisor lay it out: `ca-cert.pem` on both ends, `server-cert.pem` and
/// `server-key.pem` on the destination, `client-cert.pem` and `client-key.pem` on the
/// source. Only TLS 1.3 is spoken.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsConfig {
    /// The certificate directory.
    pub dir: PathBuf,
    /// The name the source expects in the destination's certificate; `None` takes the
    /// host of the address it connects to. Unused on the destination.
    pub server_name: Option<String>,
    /// Mutual authentication (the default): the destination requires a client
    /// certificate signed by the CA, and the source presents its own. When `false` the
    /// destination accepts any client and the source presents none.
    pub mutual: bool,
}

impl TlsConfig {
    /// Mutual TLS with the certificates in `dir`, the server name taken from the address.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            server_name: None,
            mutual: true,
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The source's rustls configuration.
    pub(crate) fn client(&self) -> Result<Arc<ClientConfig>, Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup_error("TLS 1.3 with ring"))?
            .with_root_certificates(self.roots()?);
        let config = if self.mutual {
            builder
                .with_client_auth_cert(
                    certificates(&self.file("client-cert.pem"))?,
                    private_key(&self.file("client-key.pem"))?,
                )
                .map_err(setup_error("client certificate and key"))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(Arc::new(config))
    }

    /// The destination's rustls configuration.
    pub(crate) fn server(&self) -> Result<Arc<ServerConfig>, Error> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup_error("TLS 1.3 with ring"))?;
        let builder = if self.mutual {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                    .build()
                    .map_err(|error| {
                        setup_error("client verifier")(rustls::Error::General(error.to_string()))
                    })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(
                certificates(&self.file("server-cert.pem"))?,
                private_key(&self.file("server-key.pem"))?,
            )
            .map_err(setup_error("server certificate and key"))?;
        // Connections are never resumed: tickets would only be bytes on every connection.
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The name the source checks the destination's certificate against: the override,
    /// else the host of a TCP address (`host:port`, `[v6]:port`).
    pub(crate) fn server_name(&self, host: Option<&str>) -> Result<ServerName<'static>, Error> {
        let name =
            self.server_name.as_deref().or(host).ok_or_else(|| {
                Error::Config("a Unix-socket address needs a TLS server name".into())
            })?;
        ServerName::try_from(
            name.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )
        .map_err(|error| Error::Config(format!("TLS server name {name:?}: {error}")))
    }

    fn roots(&self) -> Result<RootCertStore, Error> {
        let path = self.file("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for certificate in certificates(&path)? {
            roots
                .add(certificate)
                .map_err(setup_error("CA certificate"))?;
        }
        Ok(roots)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first (ring prefers AES-256): every guest page is encrypted, and with
    // fewer rounds it is the fastest suite on CPUs with AES instructions, at a strength
    // that is ample for a migration's lifetime. Both ends list it first, so it is chosen.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn setup_error(what: &'static str) -> impl Fn(rustls::Error) -> Error {
    move |source| Error::TlsSetup { what, source }
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::TlsFile {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path) -> impl Fn(pem::Error) -> Error + '_ {
    |source| Error::TlsPem {
        path: path.to_owned(),
        source,
    }
}

/// Every certificate in a PEM file; none is an error.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(&read_file(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(path))?;
    if certificates.is_empty() {
        return Err(pem_error(path)(pem::Error::NoItemsFound));
    }
    Ok(certificates)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(&read_file(path)?).map_err(pem_error(path))
}

/// Runs a handshake on `socket` until it completes or `deadline` passes, then wraps the
/// connection. The socket's timeouts are cleared again afterwards, as a fresh socket has
/// them.
fn handshake(
    socket: Stream,
    session: impl Into<rustls::Connection>,
    deadline: Instant,
) -> io::Result<TlsStream> {
    let mut session = session.into();
    // The writers drain every record right after sealing it, so rustls need not cap them.
    session.set_buffer_limit(None);
    while session.is_handshaking() || session.wants_write() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_slow());
        }
        socket.set_read_timeout(Some(left))?;
        socket.set_write_timeout(Some(left))?;
        if let Err(error) = session.complete_io(&mut &socket) {
            return Err(handshake_failed(&socket, error, deadline));
        }
    }
    socket.set_read_timeout(None)?;
    socket.set_write_timeout(None)?;
    Ok(TlsStream {
        socket,
        session: Mutex::new(session),
        reading: Mutex::new(Incoming {
            buffer: vec![0; INCOMING_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }),
        writing: Mutex::new(Outgoing::default()),
    })
}

/// After a failed handshake, whose alert rustls has already written: closes the sending
/// direction and reads until the peer closes, for at most [`ALERT_GRACE`]. Closing at once
/// with the peer's bytes unread would reset the connection, and a reset can discard the
/// alert before the peer reads it; in TLS 1.3 a client whose certificate the server
/// refused has already finished its handshake and learns why only from that alert.
fn linger(socket: &Stream, deadline: Instant) {
    socket.shutdown_write();
    let give_up = deadline.min(Instant::now() + ALERT_GRACE);
    let mut sink = [0u8; 4096];
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*socket).read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// How long a failed handshake waits for its peer to read the alert and close: a peer on
/// the same network reads it within a round trip or two.
const ALERT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Explains a failed handshake and lets the peer learn why before the connection closes.
fn handshake_failed(socket: &Stream, error: io::Error, deadline: Instant) -> io::Error {
    let not_tls = matches!(
        error.get_ref().and_then(|inner| inner.downcast_ref()),
        Some(rustls::Error::InvalidMessage(_))
    );
    let error = if not_tls {
        // rustls sends no alert to a peer whose bytes are not TLS records; this one lets
        // a plaintext peer report that this end uses TLS.
        let _ = (&*socket).write_all(&DECODE_ERROR_ALERT);
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer is not speaking TLS ({error})"),
        )
    } else if matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        too_slow()
    } else if matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
    ) {
        io::Error::new(
            error.kind(),
            format!(
                "the peer closed the connection during the TLS handshake: it may not use TLS, \
                 or it refused this side's certificate ({error})"
            ),
        )
    } else {
        error
    };
    linger(socket, deadline);
    error
}

/// A peer silent (or too slow) past the setup deadline: a port probe, a stuck peer.
fn too_slow() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the TLS handshake did not finish within the setup deadline",
    )
}

/// A plaintext TLS record: a fatal `decode_error` alert.
const DECODE_ERROR_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50];

/// Why a plaintext end refuses what its peer sent.
pub(crate) const PEER_USES_TLS: &str =
    "the peer sent a TLS record: it uses TLS and this side does not (configure TLS on both ends)";

/// Bytes [`is_record_header`] looks at.
pub(crate) const RECORD_START_LEN: usize = 3;

/// Whether `bytes` start like a TLS record (handshake or alert, TLS 1.0 to 1.3 framing):
/// what a plaintext end sees when its peer uses TLS. No control or multifd magic starts so.
pub(crate) fn is_record_header(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, 0x01..=0x04, ..])
}

/// Ciphertext read from the socket per call: a few maximum-size TLS records, so a bulk
/// receive makes few system calls.
const INCOMING_BUFFER: usize = 64 * 1024;

/// Plaintext taken out of rustls per copy into guest memory: one maximum-size record.
const PLAINTEXT_CHUNK: usize = 16 * 1024;

/// One TLS connection, shared by the clones of its [`Stream`].
pub(crate) struct TlsStream {
    /// The connection underneath: shut down, timeouts and polling act on it directly.
    pub(crate) socket: Stream,
    session: Mutex<rustls::Connection>,
    reading: Mutex<Incoming>,
    writing: Mutex<Outgoing>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TlsStream")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// Ciphertext read from the socket and not yet fed to the session: `buffer[start..end]`.
struct Incoming {
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

#[derive(Default)]
struct Outgoing {
    /// Guest pages copied out of guest memory to be encrypted.
    plaintext: Vec<u8>,
    /// Sealed records on their way to the socket.
    ciphertext: Vec<u8>,
}

/// The source's handshake on a fresh connection to `name`, bounded by `deadline`.
pub(crate) fn connect(
    socket: Stream,
    config: &Arc<ClientConfig>,
    name: ServerName<'static>,
    deadline: Instant,
) -> io::Result<Stream> {
    let session = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    Ok(Stream::Tls(Arc::new(handshake(socket, session, deadline)?)))
}

/// The destination's handshake on an accepted connection, bounded by `deadline`.
pub(crate) fn accept(
    socket: Stream,
    config: &Arc<ServerConfig>,
    deadline: Instant,
) -> io::Result<Stream> {
    let session = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
    Ok(Stream::Tls(Arc::new(handshake(socket, session, deadline)?)))
}

impl TlsStream {
    /// Reads plaintext; blocks on the socket without the session lock (module comment).
    pub(crate) fn read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        let mut incoming = lock(&self.reading);
        self.read_locked(&mut incoming, buffer)
    }

    fn read_locked(&self, incoming: &mut Incoming, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut session = lock(&self.session);
            match session.reader().read(buffer) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                result => return result,
            }
            if incoming.start == incoming.end {
                drop(session);
                let read = (&self.socket).read(&mut incoming.buffer)?;
                incoming.start = 0;
                incoming.end = read;
                session = lock(&self.session);
            }
            // An empty slice (the socket's EOF) tells rustls the peer closed.
            let mut ciphertext = &incoming.buffer[incoming.start..incoming.end];
            incoming.start += session.read_tls(&mut ciphertext)?;
            let processed = session.process_new_packets();
            let answer = session.wants_write();
            drop(session);
            if answer {
                // A key update to answer, or the alert for a bad record: sent before the
                // error below so the peer learns why.
                let mut outgoing = lock(&self.writing);
                self.seal_and_send(&mut outgoing.ciphertext, &[])?;
            }
            processed.map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        }
    }

    /// Whether bytes already taken from the socket wait to be read (plaintext in the
    /// session, or ciphertext not fed to it yet): polling the socket would not report
    /// them. `false` while another thread is reading, which then gets them itself.
    pub(crate) fn has_buffered_input(&self) -> bool {
        let Ok(incoming) = self.reading.try_lock() else {
            return false;
        };
        incoming.start < incoming.end
            || lock(&self.session)
                .process_new_packets()
                .is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
    }

    /// Writes all of `data`.
    pub(crate) fn write_all(&self, data: &[u8]) -> io::Result<()> {
        let mut outgoing = lock(&self.writing);
        self.seal_and_send(&mut outgoing.ciphertext, data)
    }

    /// Encrypts `data` (and any record the session has queued) under the session lock,
    /// then writes the records to the socket without it. The caller holds `writing`.
    fn seal_and_send(&self, ciphertext: &mut Vec<u8>, data: &[u8]) -> io::Result<()> {
        {
            let mut session = lock(&self.session);
            session.writer().write_all(data)?;
            while session.wants_write() {
                session.write_tls(ciphertext)?;
            }
        }
        let written = (&self.socket).write_all(ciphertext);
        ciphertext.clear();
        written
    }

    /// Copies the iovecs' bytes out of (guest) memory and writes them through TLS.
    ///
    /// # Safety
    ///
    /// As [`Stream::write_all_raw`].
    pub(crate) unsafe fn write_all_raw(&self, iovecs: &[libc::iovec]) -> io::Result<()> {
        let mut outgoing = lock(&self.writing);
        let Outgoing {
            plaintext,
            ciphertext,
        } = &mut *outgoing;
        plaintext.clear();
        for iovec in iovecs {
            let start = plaintext.len();
            plaintext.reserve(iovec.iov_len);
            // SAFETY: the iovec describes mapped, readable memory (the caller's contract)
            // and the reservation makes room for its bytes after `start`. A raw copy
            // forms no reference to guest memory, which the guest may be writing; the
            // channel buffer cannot overlap it. `set_len` covers exactly the bytes copied.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    iovec.iov_base.cast::<u8>().cast_const(),
                    plaintext.as_mut_ptr().add(start),
                    iovec.iov_len,
                );
                plaintext.set_len(start + iovec.iov_len);
            }
        }
        self.seal_and_send(ciphertext, plaintext)
    }

    /// Fills the iovecs with plaintext, copied into place from a bounce buffer.
    ///
    /// # Safety
    ///
    /// As [`Stream::read_exact_raw`].
    pub(crate) unsafe fn read_exact_raw(&self, iovecs: &[libc::iovec]) -> io::Result<()> {
        let mut incoming = lock(&self.reading);
        let mut chunk = [0u8; PLAINTEXT_CHUNK];
        for iovec in iovecs {
            let base = iovec.iov_base.cast::<u8>();
            let mut done = 0;
            while done < iovec.iov_len {
                let want = (iovec.iov_len - done).min(PLAINTEXT_CHUNK);
                let read = self.read_locked(&mut incoming, &mut chunk[..want])?;
                if read == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                // SAFETY: `done + read <= iov_len`, so the target is inside the iovec,
                // which the caller keeps mapped, writable and unaliased; `chunk` is a
                // local buffer and cannot overlap it.
                unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), base.add(done), read) };
                done += read;
            }
        }
        Ok(())
    }
}
