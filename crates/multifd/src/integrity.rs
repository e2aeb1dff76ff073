//! The integrity extension: a CRC32C trailer after every packet, so a corrupted page (a
//! flipped bit in a NIC, a bad relay) is a named error instead of silently wrong guest
//! memory. TCP's own 16-bit checksum misses such errors at a rate that matters at
//! migration volumes. A leaf: it imports nothing from the crate.

use std::fmt;

/// How packets are protected beyond what the transport does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Integrity {
    /// No end-to-end check (QEMU's wire format).
    #[default]
    None,
    /// A CRC32C of each packet and its payload, checked before anything is applied.
    Crc32c,
}

impl fmt::Display for Integrity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::None => "none",
            Self::Crc32c => "crc32c",
        })
    }
}

/// Bytes of the trailer after each packet when the extension is on.
pub(crate) const TRAILER_LEN: usize = 4;

/// The CRC32C of `parts` as one byte string.
pub(crate) fn checksum(parts: &[&[u8]]) -> u32 {
    parts
        .iter()
        .fold(0, |crc, part| crc32c::crc32c_append(crc, part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_checksum_as_one_string() {
        // The standard CRC32C check value of "123456789".
        assert_eq!(checksum(&[b"123456789"]), 0xe306_9283);
        assert_eq!(checksum(&[b"1234", b"", b"56789"]), 0xe306_9283);
    }
}
