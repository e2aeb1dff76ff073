//! The precopy driver: settings, the control-channel handshake, rounds and completion.
//!
//! A source connects the control channel, sends `Hello` (settings), `RamBlocks` and
//! `Devices`, and waits for `Welcome` or `Reject`; then it connects every multifd channel.
//! Each round ends with a SYNC on every channel and `RoundEnd` on the control channel; the
//! destination answers `RoundReceived` once every channel's pages of the round are in
//! memory (round receipts, which the source always asks for). At
//! the end the source sends `Complete` with its totals, and succeeds only on the
//! destination's `Completed`, whose totals must match. Until then the source's memory is
//! only read, so a failed migration leaves the source VM intact.

mod admission;
mod control;
mod destination;
mod source;

use std::collections::HashSet;
use std::hash::Hash;
use std::time::Duration;

use multifd_wire::{
    BlockAnnouncement, DeviceAnnouncement, DeviceStateSettings, Flags, Hello, RejectCode,
    RejectReason, DEVICE_STATE_CHUNK_HEADER_LEN, PROTOCOL_VERSION,
};

use crate::compress::CompressionSettings;
use crate::integrity::Integrity;
use crate::ram::name_problem;

pub use destination::{
    Destination, DestinationConfig, DEFAULT_MAX_GUEST_BYTES, DEFAULT_MAX_QUEUED_DEVICE_BYTES,
    DEFAULT_MAX_RECEIVE_BUFFER_BYTES,
};
pub use source::{Source, SourceConfig, DEFAULT_DEVICE_CHUNK_SIZE};

/// Smallest page size accepted: zero detection and zeroing work in 64-byte steps.
const MIN_PAGE_SIZE: u32 = 64;
/// Largest page size accepted (huge pages are sent as runs of small ones).
const MAX_PAGE_SIZE: u32 = 1 << 20;
/// Largest packet accepted: bounds each channel's receive buffer and every payload.
const MAX_PACKET_SIZE: u32 = 16 << 20;

/// Largest device-state chunk accepted, for the same reason as [`MAX_PACKET_SIZE`]: it
/// bounds every receive buffer the destination allocates for a chunk.
const MAX_DEVICE_CHUNK_SIZE: u32 = 16 << 20;

/// How long a connection with work in flight may make no progress by default: a channel
/// write that moves no byte, the wait for the destination's `Completed`. Far above any
/// stall a loaded host or a congested link causes (seconds), well under the minutes a
/// vanished peer would otherwise hold a stopped VM.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long setup may take by default: connecting, handshake, every channel arriving.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks the settings in a `Hello` are usable, whoever proposes them.
pub(crate) fn check_settings(hello: &Hello) -> Result<(), RejectReason> {
    let reject = |code, detail: String| Err(RejectReason { code, detail });
    if hello.protocol_version != PROTOCOL_VERSION {
        return reject(
            RejectCode::Version,
            format!(
                "protocol version {}, destination speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        );
    }
    if hello.channels == 0 || hello.channels > u32::from(u8::MAX) {
        return reject(
            RejectCode::ChannelCount,
            format!("{} channels, must be 1 to 255", hello.channels),
        );
    }
    if !hello.page_size.is_power_of_two()
        || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&hello.page_size)
    {
        return reject(
            RejectCode::PageSize,
            format!(
                "page size {}, must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}",
                hello.page_size
            ),
        );
    }
    if hello.packet_size == 0
        || !hello.packet_size.is_multiple_of(hello.page_size)
        || hello.packet_size > MAX_PACKET_SIZE
    {
        return reject(
            RejectCode::PacketSize,
            format!(
                "packet size {}, must be a multiple of the page size {} up to {MAX_PACKET_SIZE}",
                hello.packet_size, hello.page_size
            ),
        );
    }
    let compression = CompressionSettings {
        method: hello.compression,
        level: hello.compression_level,
    };
    if let Err(detail) = compression.check() {
        return reject(RejectCode::Compression, detail);
    }
    let extensions =
        hello.extensions & !(Flags::CRC32C | Flags::LOCAL_MEMORY | Flags::ROUND_RECEIPTS);
    if extensions != compression.extensions() {
        return reject(
            RejectCode::Extensions,
            format!(
                "extensions {:#x}, {compression} uses exactly {:#x} (and optionally {:#x}, \
                 crc32c integrity, {:#x}, local memory, and {:#x}, round receipts)",
                hello.extensions,
                compression.extensions(),
                Flags::CRC32C,
                Flags::LOCAL_MEMORY,
                Flags::ROUND_RECEIPTS
            ),
        );
    }
    Ok(())
}

/// The extension bit `integrity` negotiates.
pub(crate) fn integrity_extension(integrity: Integrity) -> u32 {
    match integrity {
        Integrity::None => 0,
        Integrity::Crc32c => Flags::CRC32C,
    }
}

/// The integrity a `Hello`'s extensions ask for.
pub(crate) fn integrity_of(extensions: u32) -> Integrity {
    if extensions & Flags::CRC32C != 0 {
        Integrity::Crc32c
    } else {
        Integrity::None
    }
}

/// Checks announced RAM blocks: names that fit a RAM packet, each name once, whole pages.
pub(crate) fn check_blocks(
    blocks: &[BlockAnnouncement],
    page_size: u32,
) -> Result<(), RejectReason> {
    let problem = first_problem(
        blocks,
        |block| &block.name,
        |block| block.name.as_str(),
        |block| {
            (!block.length.is_multiple_of(u64::from(page_size)))
                .then_some("length is not a multiple of the page size")
        },
    );
    match problem {
        Some((block, problem)) => Err(RejectReason {
            code: RejectCode::RamBlocks,
            detail: format!(
                "ramblock {:?} ({} bytes): {problem}",
                block.name, block.length
            ),
        }),
        None => Ok(()),
    }
}

/// Checks announced devices: valid id strings, each device once.
pub(crate) fn check_devices(devices: &[DeviceAnnouncement]) -> Result<(), RejectReason> {
    match first_problem(
        devices,
        |device| &device.idstr,
        |device| (device.idstr.as_str(), device.instance_id),
        |_| None,
    ) {
        Some((device, problem)) => Err(RejectReason {
            code: RejectCode::Devices,
            detail: format!(
                "device {:?} instance {}: {problem}",
                device.idstr, device.instance_id
            ),
        }),
        None => Ok(()),
    }
}

/// The first announced item that cannot be accepted, and why: a name that does not fit a
/// name field, an item the `same` as an earlier one, or `other`'s objection.
fn first_problem<'a, T, K: Hash + Eq>(
    items: &'a [T],
    name: impl Fn(&T) -> &String,
    key: impl Fn(&'a T) -> K,
    other: impl Fn(&T) -> Option<&'static str>,
) -> Option<(&'a T, &'static str)> {
    // A set, not a scan of the earlier items: a hostile announcement of many thousands of
    // entries costs linear time, not quadratic.
    let mut seen = HashSet::with_capacity(items.len());
    items.iter().find_map(|item| {
        name_problem(name(item))
            .or_else(|| (!seen.insert(key(item))).then_some("announced twice"))
            .or_else(|| other(item))
            .map(|problem| (item, problem))
    })
}

/// Checks the device-state settings against the channel count.
pub(crate) fn check_device_settings(
    settings: &DeviceStateSettings,
    channels: u32,
) -> Result<(), RejectReason> {
    let header = DEVICE_STATE_CHUNK_HEADER_LEN as u32;
    if settings.max_payload <= header || settings.max_payload > MAX_DEVICE_CHUNK_SIZE + header {
        return Err(RejectReason {
            code: RejectCode::Devices,
            detail: format!(
                "device-state chunk size {}, must be 1 to {MAX_DEVICE_CHUNK_SIZE}",
                i64::from(settings.max_payload) - i64::from(header)
            ),
        });
    }
    if settings.dedicated_channels >= channels {
        return Err(RejectReason {
            code: RejectCode::ChannelCount,
            detail: format!(
                "{} dedicated device-state channels, must be fewer than the {channels} channels",
                settings.dedicated_channels
            ),
        });
    }
    Ok(())
}

/// Compares a setting the destination was configured with to the source's.
fn expect<T: PartialEq + std::fmt::Debug>(
    code: RejectCode,
    name: &str,
    expected: Option<T>,
    proposed: &T,
) -> Result<(), RejectReason> {
    match expected {
        Some(expected) if expected != *proposed => Err(RejectReason {
            code,
            detail: format!("source {name} {proposed:?}, destination expects {expected:?}"),
        }),
        _ => Ok(()),
    }
}
