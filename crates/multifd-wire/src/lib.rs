//! Byte-exact encoding and decoding of everything `multifd` puts on the wire.
//!
//! Two kinds of connection carry a migration (see the project's `SPEC.md`):
//!
//! - **Multifd channels** carry pages and device state in QEMU's layouts, byte for byte:
//!   a [`ChannelHello`] once, then packets, each starting with a [`PacketHeader`]: a
//!   [`RamPacket`] (pages, or a SYNC marking the end of a round) or a
//!   [`DeviceStatePacket`] whose payload starts with a [`DeviceStateChunkHeader`].
//! - **The control channel** is this project's own: [`CONTROL_MAGIC`] and then framed
//!   [`ControlMessage`]s that negotiate settings, announce RAM blocks and devices, end rounds
//!   and confirm completion.
//!
//! Decoding is "parse, don't validate": every decoder reads through a bounds-checked
//! reader, checks each field against the negotiated [`RamLimits`] or [`DeviceStateLimits`]
//! and returns a value whose fields are known to be consistent, or a [`WireError`] that
//! names the field and the value. Nothing here does I/O, spawns threads or uses `unsafe`;
//! the engine crate owns sockets and memory.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod codec;
mod control;
mod device_state;
mod error;
mod header;
mod hello;
mod ram_packet;

pub use control::{
    BlockAnnouncement, ControlMessage, DeviceAnnouncement, DeviceStateSettings, Hello, RejectCode,
    RejectReason, Totals, ZeroPageMode, CONTROL_FRAME_HEADER_LEN, CONTROL_MAGIC, MAX_CONTROL_FRAME,
    PROTOCOL_VERSION,
};
pub use device_state::{
    DeviceStateChunkHeader, DeviceStateLimits, DeviceStatePacket, CHUNK_FLAG_CONFIG_STATE,
    DEVICE_STATE_CHUNK_HEADER_LEN, DEVICE_STATE_PACKET_LEN,
};
pub use error::WireError;
pub use header::{Compression, Flags, PacketHeader, PacketKind, PACKET_HEADER_LEN};
pub use hello::{ChannelHello, CHANNEL_HELLO_LEN};
pub use ram_packet::{RamLimits, RamPacket, RamPacketFields, RAM_PACKET_FIXED_LEN};

/// First four bytes of every multifd channel and of every packet header.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// Version carried by the channel hello and by every packet header.
pub const MULTIFD_VERSION: u32 = 1;
/// Length of the NUL-terminated name fields (RAM block name, device idstr).
pub const NAME_FIELD_LEN: usize = 256;
