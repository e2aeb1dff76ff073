//! Bounds-checked reading and big-endian writing, shared by every structure.

use crate::WireError;

/// A cursor over received bytes; every read checks that the bytes are there.
pub(crate) struct Reader<'a> {
    structure: &'static str,
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    /// `structure` names what is being decoded, for error messages.
    pub(crate) fn new(structure: &'static str, bytes: &'a [u8]) -> Self {
        Self {
            structure,
            bytes,
            position: 0,
        }
    }

    pub(crate) fn take(&mut self, count: usize) -> Result<&'a [u8], WireError> {
        let available = self.bytes.len() - self.position;
        if count > available {
            return Err(WireError::Truncated {
                structure: self.structure,
                needed: self.position + count,
                available: self.bytes.len(),
            });
        }
        let taken = &self.bytes[self.position..self.position + count];
        self.position += count;
        Ok(taken)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A fixed-size, NUL-terminated name field such as a RAM block name.
    pub(crate) fn name_field(&mut self, field: &'static str) -> Result<&'a str, WireError> {
        let raw = self.take(crate::NAME_FIELD_LEN)?;
        let end = raw
            .iter()
            .position(|&byte| byte == 0)
            .ok_or(WireError::Unterminated { field })?;
        std::str::from_utf8(&raw[..end]).map_err(|_| WireError::NotUtf8 { field })
    }

    /// A length-prefixed (u16) UTF-8 string, as used by control messages.
    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let length = usize::from(self.u16()?);
        let raw = self.take(length)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| WireError::NotUtf8 { field })
    }

    /// QEMU's multifd magic and version, which open both the channel hello and every
    /// packet header (`structure` names which, for errors).
    pub(crate) fn multifd_magic_and_version(
        &mut self,
        structure: &'static str,
    ) -> Result<(), WireError> {
        let magic = self.u32()?;
        if magic != crate::MULTIFD_MAGIC {
            return Err(WireError::BadMagic {
                structure,
                value: magic,
                expected: crate::MULTIFD_MAGIC,
            });
        }
        let version = self.u32()?;
        if version != crate::MULTIFD_VERSION {
            return Err(WireError::BadVersion {
                structure,
                value: version,
                expected: crate::MULTIFD_VERSION,
            });
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<(), WireError> {
        match self.bytes.len() - self.position {
            0 => Ok(()),
            count => Err(WireError::TrailingBytes {
                structure: self.structure,
                count,
            }),
        }
    }
}

pub(crate) fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_be_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

pub(crate) fn put_i32(out: &mut Vec<u8>, value: i32) {
    out.extend_from_slice(&value.to_be_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_be_bytes());
}

/// Writes `name` into a fixed 256-byte NUL-terminated field; names that do not fit with
/// their terminator are the caller's bug, so they are refused before anything is written.
pub(crate) fn put_name_field(
    out: &mut Vec<u8>,
    field: &'static str,
    name: &str,
) -> Result<(), WireError> {
    if name.len() >= crate::NAME_FIELD_LEN || name.as_bytes().contains(&0) {
        return Err(WireError::NameTooLong {
            field,
            length: name.len(),
        });
    }
    out.extend_from_slice(name.as_bytes());
    out.resize(out.len() + crate::NAME_FIELD_LEN - name.len(), 0);
    Ok(())
}

/// Writes a u16-length-prefixed string, refusing strings longer than the prefix allows.
pub(crate) fn put_string(
    out: &mut Vec<u8>,
    field: &'static str,
    text: &str,
) -> Result<(), WireError> {
    let length = u16::try_from(text.len()).map_err(|_| WireError::NameTooLong {
        field,
        length: text.len(),
    })?;
    put_u16(out, length);
    out.extend_from_slice(text.as_bytes());
    Ok(())
}
