//! The 64-byte hello that opens every multifd channel (QEMU's `MultiFDInit_t`).

use crate::codec::{put_u32, Reader};
use crate::{WireError, MULTIFD_MAGIC, MULTIFD_VERSION};

/// Length of [`ChannelHello`] on the wire.
pub const CHANNEL_HELLO_LEN: usize = 64;

/// Names the migration and the channel a new connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHello {
    /// The migration's uuid, as announced on the control channel.
    pub uuid: [u8; 16],
    /// This channel's index, below the negotiated channel count.
    pub channel: u8,
}

impl ChannelHello {
    /// Encodes the hello: magic, version, uuid, id, then 39 zero bytes.
    pub fn encode(&self) -> [u8; CHANNEL_HELLO_LEN] {
        let mut out = Vec::with_capacity(CHANNEL_HELLO_LEN);
        put_u32(&mut out, MULTIFD_MAGIC);
        put_u32(&mut out, MULTIFD_VERSION);
        out.extend_from_slice(&self.uuid);
        out.push(self.channel);
        out.resize(CHANNEL_HELLO_LEN, 0);
        let mut bytes = [0u8; CHANNEL_HELLO_LEN];
        bytes.copy_from_slice(&out);
        bytes
    }

    /// Decodes a hello, checking magic and version. The reserved bytes are ignored, as
    /// QEMU ignores them; the channel id is checked by the caller, who knows the count.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut reader = Reader::new("channel hello", bytes);
        reader.multifd_magic_and_version("channel hello")?;
        let uuid = reader.array()?;
        let channel = reader.u8()?;
        reader.take(CHANNEL_HELLO_LEN - 25)?;
        reader.finish()?;
        Ok(Self { uuid, channel })
    }
}
