//! Identifiers every layer names things by: the side of a migration, a connection, a
//! migration's uuid and a device. A leaf: it imports nothing from the crate.

use std::fmt;

/// The end of a migration an error happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The sending host.
    Source,
    /// The receiving host.
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Source => "source",
            Self::Destination => "destination",
        })
    }
}

/// The connection an error happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Link {
    /// The listening socket, before a connection is identified.
    Listener,
    /// The control channel.
    Control,
    /// Multifd channel with this id.
    Channel(u8),
}

impl fmt::Display for Link {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Listener => formatter.write_str("listener"),
            Self::Control => formatter.write_str("control channel"),
            Self::Channel(id) => write!(formatter, "channel {id}"),
        }
    }
}

/// A migration's uuid, printed in the usual hyphenated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uuid(pub [u8; 16]);

impl fmt::Display for Uuid {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, byte) in self.0.iter().enumerate() {
            if matches!(index, 4 | 6 | 8 | 10) {
                formatter.write_str("-")?;
            }
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Names a device on both ends: its id string and instance id, as QEMU's savevm does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId {
    /// The device's id string (1 to 255 bytes, no NUL).
    pub idstr: String,
    /// Tells apart several instances with the same id string.
    pub instance_id: u32,
}

impl DeviceId {
    /// The device `idstr`, instance `instance_id`.
    pub fn new(idstr: impl Into<String>, instance_id: u32) -> Self {
        Self {
            idstr: idstr.into(),
            instance_id,
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:?} instance {}", self.idstr, self.instance_id)
    }
}
