//! Control-channel messages: negotiation, announcements, rounds and completion.
//!
//! The control connection starts with [`CONTROL_MAGIC`] (so the destination tells it from
//! multifd channels, which start with `MULTIFD_MAGIC`), then carries frames: type u32,
//! length u32, payload, all big-endian. Every frame is capped at [`MAX_CONTROL_FRAME`]
//! and every frame must be consumed exactly by its message.

use crate::codec::{put_i32, put_string, put_u32, put_u64, Reader};
use crate::{Compression, WireError};

/// First four bytes of the control connection ("MFDC").
pub const CONTROL_MAGIC: u32 = 0x4d46_4443;
/// The control protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Length of a frame's type and length fields.
pub const CONTROL_FRAME_HEADER_LEN: usize = 8;
/// Largest control payload accepted: room for thousands of RAM blocks or devices, small
/// enough that a hostile length cannot make the reader allocate much.
pub const MAX_CONTROL_FRAME: u32 = 1 << 20;

/// How zero pages are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroPageMode {
    /// Every page is sent with its contents.
    None,
    /// Channel threads detect zero pages and send their offsets only.
    #[default]
    Multifd,
}

/// The source's opening message: everything both ends must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Control protocol version ([`PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// Identifies the migration; every channel hello repeats it.
    pub uuid: [u8; 16],
    /// Number of multifd channels that will connect.
    pub channels: u32,
    /// Page size in bytes.
    pub page_size: u32,
    /// Packet size in bytes (pages per packet = packet size / page size).
    pub packet_size: u32,
    /// Compression method.
    pub compression: Compression,
    /// Compression level.
    pub compression_level: i32,
    /// Zero-page handling.
    pub zero_page: ZeroPageMode,
    /// Extension bits the source wants to use.
    pub extensions: u32,
}

/// A RAM block the source will send pages of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAnnouncement {
    /// The block's name, as RAM packets carry it.
    pub name: String,
    /// The block's length in bytes.
    pub length: u64,
}

/// A device the source will send state for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAnnouncement {
    /// The device's id string.
    pub idstr: String,
    /// The device's instance id.
    pub instance_id: u32,
}

/// How device state travels, announced with the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStateSettings {
    /// Largest device-state payload of one packet, chunk header included: the destination
    /// sizes its receive buffers by it and refuses anything larger.
    pub max_payload: u32,
    /// How many of the last channels carry only device state (0: every channel carries
    /// both RAM and device state).
    pub dedicated_channels: u32,
}

/// Counts one side reports at completion so the other can check nothing was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// RAM packets, SYNC packets included.
    pub packets: u64,
    /// Pages sent with their contents.
    pub normal_pages: u64,
    /// Pages sent as zero.
    pub zero_pages: u64,
    /// Payload bytes after RAM packets.
    pub payload_bytes: u64,
    /// Rounds ended.
    pub rounds: u64,
    /// Device-state chunks.
    pub device_chunks: u64,
    /// Device-state payload bytes, chunk headers excluded.
    pub device_bytes: u64,
}

impl std::fmt::Display for Totals {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} packets, {} normal and {} zero pages, {} payload bytes, {} rounds, \
             {} device chunks of {} bytes",
            self.packets,
            self.normal_pages,
            self.zero_pages,
            self.payload_bytes,
            self.rounds,
            self.device_chunks,
            self.device_bytes
        )
    }
}

/// Why a destination refused a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    /// Protocol version mismatch.
    Version,
    /// Channel count mismatch or out of range.
    ChannelCount,
    /// Page size mismatch or invalid.
    PageSize,
    /// Packet size mismatch or invalid.
    PacketSize,
    /// Migration uuid mismatch.
    Uuid,
    /// Compression method or level mismatch or unsupported.
    Compression,
    /// Unsupported extensions.
    Extensions,
    /// Zero-page mode mismatch.
    ZeroPage,
    /// RAM blocks that the destination cannot map.
    RamBlocks,
    /// Devices that the destination does not have.
    Devices,
    /// A code this version does not know (from a newer peer); the detail text still says
    /// why.
    Unrecognized(u32),
}

impl RejectCode {
    const ALL: [Self; 10] = [
        Self::Version,
        Self::ChannelCount,
        Self::PageSize,
        Self::PacketSize,
        Self::Uuid,
        Self::Compression,
        Self::Extensions,
        Self::ZeroPage,
        Self::RamBlocks,
        Self::Devices,
    ];

    fn to_wire(self) -> u32 {
        match self {
            Self::Unrecognized(value) => value,
            known => {
                Self::ALL
                    .iter()
                    .position(|&code| code == known)
                    .unwrap_or(0) as u32
                    + 1
            }
        }
    }

    fn from_wire(value: u32) -> Self {
        value
            .checked_sub(1)
            .and_then(|index| Self::ALL.get(index as usize))
            .copied()
            .unwrap_or(Self::Unrecognized(value))
    }
}

/// A [`RejectCode`] with a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectReason {
    /// What did not match.
    pub code: RejectCode,
    /// The values involved, for the operator.
    pub detail: String,
}

/// One control-channel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Source → destination: the settings to agree on.
    Hello(Hello),
    /// Source → destination: the RAM blocks.
    RamBlocks(Vec<BlockAnnouncement>),
    /// Source → destination: the devices.
    Devices(Vec<DeviceAnnouncement>),
    /// Source → destination: how device state travels.
    DeviceSettings(DeviceStateSettings),
    /// Source → destination: every channel has sent its SYNC for this round (1-based).
    RoundEnd {
        /// The round that ended.
        round: u64,
    },
    /// Source → destination: the source VM is stopped.
    SwitchoverStart,
    /// Source → destination: everything was sent; the source's totals.
    Complete(Totals),
    /// Source → destination: the source gives up.
    Abort(String),
    /// Destination → source: settings accepted.
    Welcome,
    /// Destination → source: settings refused.
    Reject(RejectReason),
    /// Destination → source: everything was received and loaded; the destination's totals.
    Completed(Totals),
    /// Destination → source: the destination failed.
    Failed(String),
    /// Destination → source: every page and chunk of this round (1-based) arrived and
    /// was loaded. Sent after each `RoundEnd` only when the source asked for receipts
    /// ([`Flags::ROUND_RECEIPTS`](crate::Flags::ROUND_RECEIPTS)); the source waits for
    /// the last one before it stops the VM, so nothing of the rounds before is still in
    /// flight during the downtime.
    RoundReceived {
        /// The round loaded.
        round: u64,
    },
}

const HELLO: u32 = 1;
const RAM_BLOCKS: u32 = 2;
const DEVICES: u32 = 3;
const ROUND_END: u32 = 4;
const SWITCHOVER_START: u32 = 5;
const COMPLETE: u32 = 6;
const ABORT: u32 = 7;
const DEVICE_SETTINGS: u32 = 8;
const WELCOME: u32 = 0x101;
const REJECT: u32 = 0x102;
const COMPLETED: u32 = 0x103;
const FAILED: u32 = 0x104;
const ROUND_RECEIVED: u32 = 0x105;

impl ControlMessage {
    /// Appends the whole frame: type, length and payload.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        put_u32(out, self.message_type());
        put_u32(out, 0);
        if let Err(error) = self.encode_payload(out) {
            out.truncate(start);
            return Err(error);
        }
        let length = out.len() - start - CONTROL_FRAME_HEADER_LEN;
        if length > MAX_CONTROL_FRAME as usize {
            out.truncate(start);
            return Err(WireError::FrameTooLarge {
                length: u32::try_from(length).unwrap_or(u32::MAX),
                max: MAX_CONTROL_FRAME,
            });
        }
        out[start + 4..start + 8].copy_from_slice(&(length as u32).to_be_bytes());
        Ok(())
    }

    /// From a frame's first [`CONTROL_FRAME_HEADER_LEN`] bytes, the payload length,
    /// refusing lengths above the cap before anything is allocated for them.
    pub fn payload_len(frame_header: &[u8]) -> Result<usize, WireError> {
        let mut reader = Reader::new("control frame header", frame_header);
        reader.u32()?;
        let length = reader.u32()?;
        reader.finish()?;
        if length > MAX_CONTROL_FRAME {
            return Err(WireError::FrameTooLarge {
                length,
                max: MAX_CONTROL_FRAME,
            });
        }
        Ok(length as usize)
    }

    /// Decodes a whole frame (header and payload).
    pub fn decode(frame: &[u8]) -> Result<Self, WireError> {
        let mut reader = Reader::new("control frame", frame);
        let message_type = reader.u32()?;
        let length = reader.u32()?;
        if length > MAX_CONTROL_FRAME {
            return Err(WireError::FrameTooLarge {
                length,
                max: MAX_CONTROL_FRAME,
            });
        }
        let mut payload = Reader::new("control message", reader.take(length as usize)?);
        reader.finish()?;
        let message = match message_type {
            HELLO => Self::Hello(read_hello(&mut payload)?),
            RAM_BLOCKS => Self::RamBlocks(read_list(&mut payload, |reader| {
                Ok(BlockAnnouncement {
                    name: reader.string("block name")?,
                    length: reader.u64()?,
                })
            })?),
            DEVICES => Self::Devices(read_list(&mut payload, |reader| {
                Ok(DeviceAnnouncement {
                    idstr: reader.string("device idstr")?,
                    instance_id: reader.u32()?,
                })
            })?),
            DEVICE_SETTINGS => Self::DeviceSettings(DeviceStateSettings {
                max_payload: payload.u32()?,
                dedicated_channels: payload.u32()?,
            }),
            ROUND_END => Self::RoundEnd {
                round: payload.u64()?,
            },
            SWITCHOVER_START => Self::SwitchoverStart,
            COMPLETE => Self::Complete(read_totals(&mut payload)?),
            ABORT => Self::Abort(payload.string("abort reason")?),
            WELCOME => Self::Welcome,
            REJECT => Self::Reject(RejectReason {
                code: RejectCode::from_wire(payload.u32()?),
                detail: payload.string("reject detail")?,
            }),
            COMPLETED => Self::Completed(read_totals(&mut payload)?),
            FAILED => Self::Failed(payload.string("failure reason")?),
            ROUND_RECEIVED => Self::RoundReceived {
                round: payload.u64()?,
            },
            other => return Err(WireError::UnknownMessageType(other)),
        };
        payload.finish()?;
        Ok(message)
    }

    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "Hello",
            Self::RamBlocks(_) => "RamBlocks",
            Self::Devices(_) => "Devices",
            Self::DeviceSettings(_) => "DeviceSettings",
            Self::RoundEnd { .. } => "RoundEnd",
            Self::SwitchoverStart => "SwitchoverStart",
            Self::Complete(_) => "Complete",
            Self::Abort(_) => "Abort",
            Self::Welcome => "Welcome",
            Self::Reject(_) => "Reject",
            Self::Completed(_) => "Completed",
            Self::Failed(_) => "Failed",
            Self::RoundReceived { .. } => "RoundReceived",
        }
    }

    fn message_type(&self) -> u32 {
        match self {
            Self::Hello(_) => HELLO,
            Self::RamBlocks(_) => RAM_BLOCKS,
            Self::Devices(_) => DEVICES,
            Self::DeviceSettings(_) => DEVICE_SETTINGS,
            Self::RoundEnd { .. } => ROUND_END,
            Self::SwitchoverStart => SWITCHOVER_START,
            Self::Complete(_) => COMPLETE,
            Self::Abort(_) => ABORT,
            Self::Welcome => WELCOME,
            Self::Reject(_) => REJECT,
            Self::Completed(_) => COMPLETED,
            Self::Failed(_) => FAILED,
            Self::RoundReceived { .. } => ROUND_RECEIVED,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Self::Hello(hello) => {
                put_u32(out, hello.protocol_version);
                out.extend_from_slice(&hello.uuid);
                put_u32(out, hello.channels);
                put_u32(out, hello.page_size);
                put_u32(out, hello.packet_size);
                put_u32(out, hello.compression.to_wire());
                put_i32(out, hello.compression_level);
                put_u32(
                    out,
                    match hello.zero_page {
                        ZeroPageMode::None => 0,
                        ZeroPageMode::Multifd => 1,
                    },
                );
                put_u32(out, hello.extensions);
            }
            Self::RamBlocks(blocks) => {
                put_u32(out, blocks.len() as u32);
                for block in blocks {
                    put_string(out, "block name", &block.name)?;
                    put_u64(out, block.length);
                }
            }
            Self::Devices(devices) => {
                put_u32(out, devices.len() as u32);
                for device in devices {
                    put_string(out, "device idstr", &device.idstr)?;
                    put_u32(out, device.instance_id);
                }
            }
            Self::DeviceSettings(settings) => {
                put_u32(out, settings.max_payload);
                put_u32(out, settings.dedicated_channels);
            }
            Self::RoundEnd { round } | Self::RoundReceived { round } => put_u64(out, *round),
            Self::SwitchoverStart | Self::Welcome => {}
            Self::Complete(totals) | Self::Completed(totals) => {
                for value in [
                    totals.packets,
                    totals.normal_pages,
                    totals.zero_pages,
                    totals.payload_bytes,
                    totals.rounds,
                    totals.device_chunks,
                    totals.device_bytes,
                ] {
                    put_u64(out, value);
                }
            }
            Self::Abort(reason) => put_string(out, "abort reason", reason)?,
            Self::Failed(reason) => put_string(out, "failure reason", reason)?,
            Self::Reject(reason) => {
                put_u32(out, reason.code.to_wire());
                put_string(out, "reject detail", &reason.detail)?;
            }
        }
        Ok(())
    }
}

fn read_hello(reader: &mut Reader<'_>) -> Result<Hello, WireError> {
    Ok(Hello {
        protocol_version: reader.u32()?,
        uuid: reader.array()?,
        channels: reader.u32()?,
        page_size: reader.u32()?,
        packet_size: reader.u32()?,
        compression: Compression::from_wire(reader.u32()?)?,
        compression_level: reader.i32()?,
        zero_page: match reader.u32()? {
            0 => ZeroPageMode::None,
            1 => ZeroPageMode::Multifd,
            other => {
                return Err(WireError::InvalidValue {
                    field: "zero-page mode",
                    value: other.into(),
                })
            }
        },
        extensions: reader.u32()?,
    })
}

/// Reads a u32 count and that many entries; entries are pushed one by one, so a hostile
/// count cannot allocate more than the (capped) frame holds.
fn read_list<T>(
    reader: &mut Reader<'_>,
    mut entry: impl FnMut(&mut Reader<'_>) -> Result<T, WireError>,
) -> Result<Vec<T>, WireError> {
    let count = reader.u32()?;
    let mut entries = Vec::new();
    for _ in 0..count {
        entries.push(entry(reader)?);
    }
    Ok(entries)
}

fn read_totals(reader: &mut Reader<'_>) -> Result<Totals, WireError> {
    Ok(Totals {
        packets: reader.u64()?,
        normal_pages: reader.u64()?,
        zero_pages: reader.u64()?,
        payload_bytes: reader.u64()?,
        rounds: reader.u64()?,
        device_chunks: reader.u64()?,
        device_bytes: reader.u64()?,
    })
}
