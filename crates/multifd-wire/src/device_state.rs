//! The device-state packet and the chunk header at the start of its payload.
//!
//! A device's state travels as chunks `idx = 0, 1, …` spread over the channels; each
//! chunk is a [`DeviceStatePacket`] (276 bytes) followed by `next_packet_size` payload
//! bytes, of which the first 12 are a [`DeviceStateChunkHeader`].

use crate::codec::{put_name_field, put_u32, Reader};
use crate::{Flags, PacketHeader, WireError, NAME_FIELD_LEN};

/// Length of [`DeviceStatePacket`] on the wire.
pub const DEVICE_STATE_PACKET_LEN: usize = 12 + NAME_FIELD_LEN + 4 + 4;
/// Length of [`DeviceStateChunkHeader`] on the wire.
pub const DEVICE_STATE_CHUNK_HEADER_LEN: usize = 12;
/// Chunk flag: this is the device's last chunk, carrying its config state.
pub const CHUNK_FLAG_CONFIG_STATE: u32 = 1;

/// What the destination accepts in a device-state packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStateLimits {
    /// The largest payload (chunk header included) one packet may announce.
    pub max_payload: u32,
    /// Negotiated extension flag bits.
    pub extensions: u32,
}

/// A decoded device-state packet: which device the payload belongs to, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatePacket<'a> {
    /// The device's id string.
    pub idstr: &'a str,
    /// The device's instance id.
    pub instance_id: u32,
    /// Payload bytes that follow, chunk header included.
    pub next_packet_size: u32,
}

impl<'a> DeviceStatePacket<'a> {
    /// Appends the 276-byte packet (flags `DEVICE_STATE`).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        PacketHeader {
            flags: Flags(Flags::DEVICE_STATE),
        }
        .encode(out);
        if let Err(error) = put_name_field(out, "idstr", self.idstr) {
            out.truncate(start);
            return Err(error);
        }
        put_u32(out, self.instance_id);
        put_u32(out, self.next_packet_size);
        Ok(())
    }

    /// Decodes and validates a whole device-state packet.
    pub fn decode(bytes: &'a [u8], limits: &DeviceStateLimits) -> Result<Self, WireError> {
        let mut reader = Reader::new("device-state packet", bytes);
        let flags = PacketHeader::read(&mut reader)?.flags;
        if flags.is_sync() {
            return Err(WireError::SyncOnDeviceState);
        }
        flags.check_allowed(Flags::DEVICE_STATE, limits.extensions)?;
        if !flags.is_device_state() {
            return Err(WireError::InvalidValue {
                field: "device-state packet flags",
                value: flags.0.into(),
            });
        }
        let idstr = reader.name_field("idstr")?;
        let instance_id = reader.u32()?;
        let next_packet_size = reader.u32()?;
        reader.finish()?;
        if next_packet_size == 0 {
            return Err(WireError::EmptyDeviceState);
        }
        if next_packet_size < DEVICE_STATE_CHUNK_HEADER_LEN as u32 {
            return Err(WireError::DeviceStateTooShort {
                size: next_packet_size,
            });
        }
        if next_packet_size > limits.max_payload {
            return Err(WireError::DeviceStateTooLarge {
                size: next_packet_size,
                max: limits.max_payload,
            });
        }
        Ok(Self {
            idstr,
            instance_id,
            next_packet_size,
        })
    }
}

/// The header at the start of every device-state payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStateChunkHeader {
    /// Position of the chunk in the device's stream: 0, 1, 2, …
    pub idx: u32,
    /// Whether this is the last chunk, holding the device's config state.
    pub config_state: bool,
}

impl DeviceStateChunkHeader {
    /// Encodes the 12 bytes: version 0, idx, flags.
    pub fn encode(&self) -> [u8; DEVICE_STATE_CHUNK_HEADER_LEN] {
        let mut bytes = [0u8; DEVICE_STATE_CHUNK_HEADER_LEN];
        bytes[4..8].copy_from_slice(&self.idx.to_be_bytes());
        if self.config_state {
            bytes[8..12].copy_from_slice(&CHUNK_FLAG_CONFIG_STATE.to_be_bytes());
        }
        bytes
    }

    /// Decodes the 12 bytes, refusing a version other than 0 and unknown flags.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut reader = Reader::new("device-state chunk header", bytes);
        let version = reader.u32()?;
        if version != 0 {
            return Err(WireError::ChunkVersion(version));
        }
        let idx = reader.u32()?;
        let flags = reader.u32()?;
        if flags & !CHUNK_FLAG_CONFIG_STATE != 0 {
            return Err(WireError::UnknownChunkFlags(flags));
        }
        reader.finish()?;
        Ok(Self {
            idx,
            config_state: flags & CHUNK_FLAG_CONFIG_STATE != 0,
        })
    }
}
