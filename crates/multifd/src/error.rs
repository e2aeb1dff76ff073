//! The engine's error type: which side, which connection, what went wrong.

use std::fmt::{self, Write};
use std::io;

use multifd_wire::{Compression, RejectReason, WireError};

use crate::ids::{DeviceId, Link, Side, Uuid};

/// A well-formed message or packet that breaks the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A RAM packet whose CRC32C trailer does not match its bytes (integrity extension):
    /// it was corrupted on the way, and nothing of it was applied.
    #[error(
        "CRC32C mismatch on packet_num {packet_num}: sent {sent:#010x}, computed {computed:#010x}"
    )]
    ChecksumMismatch {
        /// The packet's number (its `packet_num` field).
        packet_num: u64,
        /// The checksum the sender put in the trailer.
        sent: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A device-state packet whose CRC32C trailer does not match its bytes.
    #[error("device {device}: CRC32C mismatch on chunk idx {idx}: sent {sent:#010x}, computed {computed:#010x}")]
    DeviceChecksumMismatch {
        /// The device.
        device: DeviceId,
        /// The chunk's idx.
        idx: u32,
        /// The checksum the sender put in the trailer.
        sent: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A channel sent a SYNC for a round the source never ended before completing.
    #[error("channel {channel} sent a SYNC past round {rounds}, the last the source ended")]
    SyncPastLastRound {
        /// The channel.
        channel: u8,
        /// Rounds the source ended.
        rounds: u64,
    },
    /// A channel had a packet in flight (partly read, or waiting unread) when the source
    /// declared completion: data outside the totals the source confirmed.
    #[error("channel {channel} has a packet in flight at completion")]
    PacketAfterCompletion {
        /// The channel.
        channel: u8,
    },
    /// The first four bytes of a connection are neither the control nor the multifd magic.
    #[error("connection magic {0:#010x} is neither control nor multifd")]
    UnknownConnectionMagic(u32),
    /// A second control connection.
    #[error("a second control connection")]
    DuplicateControl,
    /// More channel connections than any migration opens arrived before a control
    /// connection.
    #[error("more than {max} channel connections before any control connection")]
    TooManyEarlyChannels {
        /// How many are kept.
        max: usize,
    },
    /// A channel id at or above the negotiated count.
    #[error("channel id {id} not below the channel count {count}")]
    ChannelIdOutOfRange {
        /// The id received.
        id: u8,
        /// The negotiated count.
        count: u8,
    },
    /// Two channels with the same id.
    #[error("duplicate channel id {0}")]
    DuplicateChannel(u8),
    /// A channel hello for another migration.
    #[error("channel uuid {received} differs from the migration's {expected}")]
    UuidMismatch {
        /// The migration's uuid.
        expected: Uuid,
        /// The uuid the channel sent.
        received: Uuid,
    },
    /// A RAM packet naming a block that was not announced.
    #[error("unknown ramblock {0:?}")]
    UnknownRamBlock(String),
    /// A page offset outside its block.
    #[error("offset {offset:#x} past the end of ramblock {block:?} ({length:#x} bytes)")]
    OffsetPastBlock {
        /// The block.
        block: String,
        /// The offset received.
        offset: u64,
        /// The block's length.
        length: u64,
    },
    /// A device-state packet for a device that was not announced.
    #[error("unknown device {idstr:?} instance {instance_id}")]
    UnknownDevice {
        /// The device's id string.
        idstr: String,
        /// The device's instance id.
        instance_id: u32,
    },
    /// A device-state chunk whose idx was received before.
    #[error("device {device}: duplicate chunk idx {idx}")]
    DuplicateChunk {
        /// The device.
        device: DeviceId,
        /// The repeated idx.
        idx: u32,
    },
    /// A device-state chunk past the device's config chunk, which must be its last.
    #[error("device {device}: chunk idx {idx} after the config chunk idx {config_idx}")]
    ChunkAfterConfig {
        /// The device.
        device: DeviceId,
        /// The chunk past the config.
        idx: u32,
        /// The config chunk's idx.
        config_idx: u32,
    },
    /// A second device-state chunk flagged as the config.
    #[error(
        "device {device}: chunk idx {idx} flagged as config after config chunk idx {config_idx}"
    )]
    SecondConfigChunk {
        /// The device.
        device: DeviceId,
        /// The second config chunk's idx.
        idx: u32,
        /// The first config chunk's idx.
        config_idx: u32,
    },
    /// A device's queued chunks would pass the configured cap.
    #[error(
        "device {device}: {queued} bytes of device state queued, above the cap of {cap} \
         (the device loads slower than its state arrives; raise the cap)"
    )]
    DeviceQueueFull {
        /// The device.
        device: DeviceId,
        /// Bytes the queue would hold with the chunk, bookkeeping included.
        queued: u64,
        /// The cap.
        cap: u64,
    },
    /// At completion, a device's stream has a hole or no config chunk.
    #[error(
        "device {device}: chunk idx {idx} missing at completion{}",
        if *config_received { "" } else { " (no config chunk received)" }
    )]
    MissingChunks {
        /// The device.
        device: DeviceId,
        /// The first idx never received.
        idx: u32,
        /// Whether the config chunk arrived.
        config_received: bool,
    },
    /// A device-state packet on a channel dedicated to RAM, or RAM pages on a channel
    /// dedicated to device state.
    #[error("{0} on a channel that does not carry it")]
    WrongChannelKind(&'static str),
    /// A second `SwitchoverStart`.
    #[error("a second SwitchoverStart")]
    DuplicateSwitchover,
    /// A compressed payload that does not decode.
    #[error("corrupt {method} payload in packet {packet_num}: {detail}")]
    CorruptPayload {
        /// The negotiated method.
        method: Compression,
        /// The packet's sequence number.
        packet_num: u64,
        /// What the decoder found wrong.
        detail: String,
    },
    /// A compressed payload that inflates to fewer bytes than its normal pages.
    #[error(
        "{method} payload of packet {packet_num} inflates to {inflated} bytes, expected {expected}"
    )]
    PayloadInflatesShort {
        /// The negotiated method.
        method: Compression,
        /// The packet's sequence number.
        packet_num: u64,
        /// Bytes it inflated to.
        inflated: u64,
        /// `normal_pages × page_size`.
        expected: u64,
    },
    /// A compressed payload that inflates to more bytes than its normal pages.
    #[error(
        "{method} payload of packet {packet_num} inflates past the {expected} bytes of its pages"
    )]
    PayloadInflatesLong {
        /// The negotiated method.
        method: Compression,
        /// The packet's sequence number.
        packet_num: u64,
        /// `normal_pages × page_size`.
        expected: u64,
    },
    /// A control message where the protocol does not allow it.
    #[error("unexpected control message {0}")]
    UnexpectedMessage(&'static str),
    /// A round ended out of sequence.
    #[error("round {received} ended, expected round {expected}")]
    RoundOutOfOrder {
        /// The next round.
        expected: u64,
        /// The round the message named.
        received: u64,
    },
    /// The two ends counted different totals.
    #[error("totals differ: source {source_totals}, destination {destination_totals}")]
    TotalsMismatch {
        /// What the source says it sent.
        source_totals: String,
        /// What the destination received.
        destination_totals: String,
    },
}

/// What is wrong with a snapshot file, or with the memory and devices it is restored
/// into; each names the field or the area.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotFault {
    /// The file ends before a structure it must hold.
    #[error("truncated: {what} needs {needed} bytes, the file has {available}")]
    Truncated {
        /// What could not be read.
        what: String,
        /// Bytes it needs (from the start of the file or of its area).
        needed: u64,
        /// Bytes there are.
        available: u64,
    },
    /// The file does not begin with the snapshot magic: not a snapshot, or a save that
    /// never finished (the magic is written last).
    #[error("magic {found:02x?} is not a multifd snapshot's (or the save did not finish)")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// A format version this build does not read.
    #[error("version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The file's version field.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A CRC32C that does not match the bytes it covers: the file was corrupted.
    #[error("{what}: CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    ChecksumMismatch {
        /// The header, a block's bitmap or a device's blob.
        what: String,
        /// The CRC in the file.
        stored: u32,
        /// The CRC of the bytes read.
        computed: u32,
    },
    /// A header field with a value the format does not allow.
    #[error("{field} = {value:#x}: {reason}")]
    InvalidField {
        /// The field, with the block or device it belongs to.
        field: String,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A block name or device id string that is malformed or given twice.
    #[error("{field}: {reason}")]
    BadName {
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two areas of the file share bytes.
    #[error("{first} overlaps {second}")]
    Overlap {
        /// The area that starts first.
        first: String,
        /// The area that starts inside it.
        second: String,
    },
    /// A block's bitmap marks a page past the block's end.
    #[error("block {block:?} bitmap: bit {page} set past the block's {pages} pages")]
    BitPastEnd {
        /// The block.
        block: String,
        /// The first such page.
        page: u64,
        /// Pages in the block.
        pages: u64,
    },
    /// A block of the file that the target memory does not have.
    #[error("block {0:?} of the file has no block of that name in the target memory")]
    UnknownBlock(String),
    /// A block of the target memory that the file does not have.
    #[error("target block {0:?} is not in the file")]
    MissingBlock(String),
    /// A block whose length in the file differs from the target's.
    #[error(
        "block {name:?} does not fit the target: {file} bytes in the file, {target} in the target"
    )]
    BlockSizeMismatch {
        /// The block.
        name: String,
        /// Its length in the file.
        file: u64,
        /// The target block's length.
        target: u64,
    },
    /// A device of the file that no target device loads, or a target device the file
    /// does not have.
    #[error("device {device}: {reason}")]
    DeviceMismatch {
        /// The device.
        device: DeviceId,
        /// Which side lacks it.
        reason: &'static str,
    },
}

/// Everything that can make a migration fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller's configuration or memory layout is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An address string that is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("invalid address {address:?}: expected tcp:HOST:PORT or unix:PATH")]
    Address {
        /// The string given.
        address: String,
    },
    /// A system call on a connection failed.
    #[error("{side} {link}: {context}: {source}")]
    Io {
        /// Where.
        side: Side,
        /// Which connection.
        link: Link,
        /// What was being done.
        context: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The peer closed a connection the migration still needed.
    #[error("{side} {link}: connection closed by peer {context}")]
    Closed {
        /// Where.
        side: Side,
        /// Which connection.
        link: Link,
        /// What was being read (e.g. "mid-packet").
        context: &'static str,
    },
    /// Bytes from the peer that do not decode.
    #[error("{side} {link}: {source}")]
    Wire {
        /// Where.
        side: Side,
        /// Which connection.
        link: Link,
        /// The decoding error.
        #[source]
        source: WireError,
    },
    /// Decodable input that breaks the protocol.
    #[error("{side} {link}: {source}")]
    Protocol {
        /// Where.
        side: Side,
        /// Which connection.
        link: Link,
        /// The broken rule.
        #[source]
        source: Violation,
    },
    /// The destination refused the source's settings.
    #[error("{side}: migration rejected ({code:?}): {detail}", code = reason.code, detail = Printable(&reason.detail))]
    Rejected {
        /// Where the rejection is reported.
        side: Side,
        /// Why.
        reason: RejectReason,
    },
    /// The peer reported a failure of its own.
    #[error("{side}: peer failed: {}", Printable(reason))]
    PeerFailed {
        /// The side that received the report.
        side: Side,
        /// The peer's message.
        reason: String,
    },
    /// The file mapped as a RAM block shrank during the migration: the pages past its new
    /// end could not be read.
    #[error("ramblock {block:?}: its file shrank to {now} bytes during the migration (the block has {length})")]
    BlockFileShrank {
        /// The block.
        block: String,
        /// The block's length.
        length: u64,
        /// The file's length now.
        now: u64,
    },
    /// A local migration sent `Complete` but never learnt the outcome: the destination
    /// may be running the guest on the memory both sides map, so the source must not
    /// resume it (the precopy driver does not).
    #[error("source: the local handover is unconfirmed; the guest was not resumed here")]
    HandoverUnconfirmed {
        /// Why no confirmation came.
        #[source]
        source: Box<Error>,
    },
    /// Something did not happen in time.
    #[error("{side}: timed out {what}")]
    Timeout {
        /// Where.
        side: Side,
        /// What was awaited.
        what: &'static str,
    },
    /// A wait timed out while only connections that were not the migration's arrived
    /// (a port probe, an HTTP request, a peer that never spoke, a failed TLS handshake):
    /// the last of them is the source of this error.
    #[error("{side}: timed out {what}; dropped {strays} stray connection(s), the last")]
    TimeoutWithStrays {
        /// Where.
        side: Side,
        /// What was awaited.
        what: &'static str,
        /// Connections dropped as strays during the wait.
        strays: u64,
        /// Why the last stray was dropped.
        #[source]
        last: Box<Error>,
    },
    /// A connection with work in flight made no progress for the idle timeout: the peer
    /// stopped reading or answering, or vanished.
    #[error("{side} {link}: no progress for the idle timeout ({context})")]
    Stalled {
        /// Where.
        side: Side,
        /// Which connection.
        link: Link,
        /// What was being done.
        context: &'static str,
    },
    /// The migration was cancelled through its [`CancelHandle`](crate::CancelHandle).
    #[error("{side}: migration cancelled")]
    Cancelled {
        /// Where.
        side: Side,
    },
    /// A device's save or load callback failed; the migration stopped.
    #[error("{side}: device {device}: {message}")]
    Device {
        /// Where.
        side: Side,
        /// The device.
        device: DeviceId,
        /// What failed and the device's error.
        message: String,
    },
    /// The VMM's dirty log failed (starting, harvesting or stopping it).
    #[error("{side}: dirty log: {source}")]
    DirtyLog {
        /// Where.
        side: Side,
        /// The log's error.
        #[source]
        source: io::Error,
    },
    /// The VMM's VM control failed (stopping the vCPUs); the VM runs on the source.
    #[error("source: VM control: {message}")]
    Vm {
        /// What failed and the VMM's error.
        message: String,
    },
    /// A page queued by the caller that is not a whole page inside a block.
    #[error(
        "source: page at offset {offset:#x} of ramblock {block} is not a whole page inside it"
    )]
    PageOutOfRange {
        /// Index of the block.
        block: usize,
        /// The offset given.
        offset: u64,
    },
    /// A TLS certificate or key file could not be read.
    #[error("TLS file {}: {source}", path.display())]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why it could not be read.
        #[source]
        source: io::Error,
    },
    /// A TLS certificate or key file holds no usable PEM item.
    #[error("TLS file {}: bad PEM: {source}", path.display())]
    TlsPem {
        /// The file.
        path: std::path::PathBuf,
        /// The parse error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The TLS certificates and keys do not make a usable configuration.
    #[error("TLS setup ({what}): {source}")]
    TlsSetup {
        /// What was being set up.
        what: &'static str,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// A TLS handshake or record failed: a certificate the peer or this side refused, a
    /// peer that does not speak TLS, or one that did not finish the handshake in time.
    #[error("{side} {link}: TLS: {source}")]
    Tls {
        /// Where.
        side: Side,
        /// Which connection.
        link: Link,
        /// The TLS or I/O error, the rustls error inside when there is one.
        #[source]
        source: io::Error,
    },
    /// A system call on a snapshot file failed.
    #[error("snapshot {}: {context}: {source}", path.display())]
    SnapshotIo {
        /// The file.
        path: std::path::PathBuf,
        /// What was being done.
        context: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A snapshot file that is malformed, corrupted or does not fit the target; nothing
    /// was written to the target memory.
    #[error("snapshot {}: {source}", path.display())]
    BadSnapshot {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        #[source]
        source: SnapshotFault,
    },
    /// A migration thread panicked (a bug); the migration was stopped.
    #[error("{side}: internal error: {what}")]
    Internal {
        /// Where.
        side: Side,
        /// What.
        what: String,
    },
}

impl Error {
    /// A failed system call on `link`; an unexpected end of file is the peer closing the
    /// connection, reported as [`Error::Closed`].
    pub(crate) fn io(side: Side, link: Link, context: &'static str, source: io::Error) -> Self {
        // A rustls error surfacing through a read (an alert: the peer refused this side's
        // certificate once the handshake was over on this side) is a TLS failure.
        if source
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return Self::Tls { side, link, source };
        }
        if source.kind() == io::ErrorKind::UnexpectedEof {
            return Self::Closed {
                side,
                link,
                context,
            };
        }
        // The kernel could not touch guest memory it was given: a file-backed block whose
        // file shrank, or whose filesystem could not allocate a page.
        let source = if source.raw_os_error() == Some(libc::EFAULT) {
            io::Error::new(
                source.kind(),
                "guest memory could not be read or written (EFAULT): a memory file shrank \
                 or its disk is full",
            )
        } else {
            source
        };
        Self::Io {
            side,
            link,
            context,
            source,
        }
    }

    /// Like [`Error::io`] for a socket with a timeout set to the idle timeout: a timed-out
    /// call is [`Error::Stalled`].
    pub(crate) fn io_or_stalled(
        side: Side,
        link: Link,
        context: &'static str,
        source: io::Error,
    ) -> Self {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Stalled {
                side,
                link,
                context,
            },
            _ => Self::io(side, link, context, source),
        }
    }

    pub(crate) fn wire(side: Side, link: Link, source: WireError) -> Self {
        Self::Wire { side, link, source }
    }

    pub(crate) fn protocol(side: Side, link: Link, source: Violation) -> Self {
        Self::Protocol { side, link, source }
    }

    /// The wire error inside, if this error is one.
    pub fn wire_error(&self) -> Option<&WireError> {
        match self {
            Self::Wire { source, .. } => Some(source),
            _ => None,
        }
    }

    /// What is wrong with a snapshot file, if this error says.
    pub fn snapshot_fault(&self) -> Option<&SnapshotFault> {
        match self {
            Self::BadSnapshot { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The protocol violation inside, if this error is one.
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            Self::Protocol { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Text from the peer, shown with its control characters escaped: a hostile peer cannot
/// move the cursor, recolour the terminal or forge a line of output of its own.
struct Printable<'a>(&'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for character in self.0.chars() {
            if character.is_control() {
                write!(formatter, "{}", character.escape_default())?;
            } else {
                formatter.write_char(character)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efault_says_what_it_means() {
        let error = Error::io(
            Side::Source,
            Link::Channel(2),
            "write packet",
            io::Error::from_raw_os_error(libc::EFAULT),
        );
        let message = error.to_string();
        assert!(
            message.starts_with("source channel 2: write packet: "),
            "{message}"
        );
        assert!(
            message.contains("a memory file shrank or its disk is full"),
            "{message}"
        );
        assert!(!message.contains("Bad address"), "{message}");
    }
}
