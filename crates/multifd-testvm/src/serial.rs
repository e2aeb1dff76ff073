//! COM1 as the guest sees it, and what its lines mean.
//!
//! The guest ([`crate::guest_image`]) only writes the transmit register (port 0x3f8) and
//! never enables interrupts, so the emulation is a byte sink: reads of the line status
//! register say "transmitter empty", every other register reads 0 and ignores writes.
//! Each vCPU's bytes go to its own line buffer (the VMM knows which vCPU exited), so lines
//! of two vCPUs printing at once never interleave. Complete lines are parsed
//! ([`SerialLine`]) into the guest's progress and errors ([`GuestProgress`]), kept in a
//! short history and, optionally, appended to a file.
//!
//! The port's state migrates as the device `("serial", 0)`: each vCPU's unfinished line
//! (a migration may stop the guest in the middle of one), the pass counters and the
//! errors, so the destination's log continues the source's.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::Error;

/// The line status register: "transmit holding register and transmitter empty".
const LINE_STATUS_EMPTY: u8 = 0x60;
/// How many complete lines the log keeps: enough to see how a guest ended (its last
/// passes and an error), bounded however long it runs (thousands of passes a second).
const HISTORY: usize = 256;
/// The longest line kept: the guest's longest (an error line) is under 40 bytes, so a
/// longer one is garbage and is cut rather than grown without bound.
const MAX_LINE: usize = 128;

/// A guest's self-check failure, as it printed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GuestError {
    /// The vCPU that found it.
    pub vcpu: u8,
    /// Guest physical address of the first word that differed.
    pub address: u64,
    /// What the word held.
    pub found: u32,
    /// What it should have held: the previous pass's number.
    pub expected: u32,
}

impl GuestError {
    /// The address of the page holding the word.
    pub fn page(&self) -> u64 {
        self.address & !(crate::guest_image::PAGE_SIZE - 1)
    }
}

impl std::fmt::Display for GuestError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "vCPU {} found {:#x} at {:#x}, expected {:#x}",
            self.vcpu, self.found, self.address, self.expected
        )
    }
}

/// One line the guest printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SerialLine {
    /// `P<v> <pass>`: vCPU `vcpu` finished pass `pass` (1 is the unchecked fill).
    Pass {
        /// The vCPU.
        vcpu: u8,
        /// The pass it finished.
        pass: u32,
    },
    /// `E<v> <address> <found> <expected>`: a check failed; the vCPU stopped.
    Mismatch(GuestError),
}

impl SerialLine {
    /// Parses one line (without its newline); `None` for anything else (a BIOS banner
    /// under QEMU, or garbage).
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim_end_matches('\r');
        let kind = line.as_bytes().first()?;
        let mut fields = line.get(1..)?.split(' ');
        let vcpu = fields.next()?;
        if vcpu.len() != 1 {
            return None;
        }
        let vcpu = vcpu.parse::<u8>().ok()?;
        let mut hex = || u32::from_str_radix(fields.next()?, 16).ok();
        let parsed = match kind {
            b'P' => Self::Pass { vcpu, pass: hex()? },
            b'E' => Self::Mismatch(GuestError {
                vcpu,
                address: u64::from(hex()?),
                found: hex()?,
                expected: hex()?,
            }),
            _ => return None,
        };
        fields.next().is_none().then_some(parsed)
    }
}

/// What the guest reported so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GuestProgress {
    /// Per vCPU, the last pass it finished (0: none reported yet).
    pub passes: Vec<u32>,
    /// Every self-check failure, in order.
    pub errors: Vec<GuestError>,
    /// Lines received, parsed or not.
    pub lines: u64,
}

impl GuestProgress {
    /// The fewest passes any vCPU finished.
    pub fn min_passes(&self) -> u32 {
        self.passes.iter().copied().min().unwrap_or(0)
    }
}

struct State {
    partial: Vec<Vec<u8>>,
    history: VecDeque<String>,
    progress: GuestProgress,
    file: Option<LineWriter<File>>,
    file_error: Option<String>,
}

/// The serial port of a VM: line buffers per vCPU, parsed progress, history, file.
pub(crate) struct Serial {
    state: Mutex<State>,
    /// Signalled at every complete line.
    line: Condvar,
}

impl Serial {
    pub(crate) fn new(vcpus: usize, file: Option<File>) -> Self {
        Self {
            state: Mutex::new(State {
                partial: vec![Vec::new(); vcpus],
                history: VecDeque::with_capacity(HISTORY),
                progress: GuestProgress {
                    passes: vec![0; vcpus],
                    ..GuestProgress::default()
                },
                file: file.map(LineWriter::new),
                file_error: None,
            }),
            line: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A byte vCPU `vcpu` wrote to `port`.
    pub(crate) fn write(&self, vcpu: usize, port: u16, byte: u8) {
        if port != crate::guest_image::COM1 {
            return;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let Some(partial) = state.partial.get_mut(vcpu) else {
            return;
        };
        if byte != b'\n' {
            if partial.len() < MAX_LINE {
                partial.push(byte);
            }
            return;
        }
        let line = String::from_utf8_lossy(partial).into_owned();
        partial.clear();
        state.progress.lines += 1;
        match SerialLine::parse(&line) {
            Some(SerialLine::Pass { vcpu, pass }) => {
                if let Some(passes) = state.progress.passes.get_mut(usize::from(vcpu)) {
                    *passes = pass;
                }
            }
            Some(SerialLine::Mismatch(error)) => state.progress.errors.push(error),
            None => {}
        }
        if let Some(file) = &mut state.file {
            if let Err(error) = writeln!(file, "{line}") {
                state.file_error = Some(error.to_string());
                state.file = None;
            }
        }
        if state.history.len() == HISTORY {
            state.history.pop_front();
        }
        state.history.push_back(line);
        self.line.notify_all();
    }

    /// What a read of `port` returns.
    pub(crate) fn read(port: u16) -> u8 {
        if port == crate::guest_image::COM1 + 5 {
            LINE_STATUS_EMPTY
        } else {
            0
        }
    }

    pub(crate) fn progress(&self) -> GuestProgress {
        self.lock().progress.clone()
    }

    pub(crate) fn history(&self) -> Vec<String> {
        self.lock().history.iter().cloned().collect()
    }

    pub(crate) fn file_error(&self) -> Option<String> {
        self.lock().file_error.clone()
    }

    /// Waits until `done` holds for the progress (checked at every line), at most
    /// `timeout`; returns the progress then, or a timeout error naming `what`.
    pub(crate) fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&GuestProgress) -> bool,
    ) -> Result<GuestProgress, Error> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if done(&state.progress) {
                return Ok(state.progress.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "{what} within {timeout:?} (guest progress: passes {:?}, errors {:?})",
                    state.progress.passes, state.progress.errors
                )));
            }
            state = self
                .line
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The serial state's version.
const STATE_VERSION: u32 = 1;

impl Serial {
    /// The migrated state (see the module documentation): version, vCPU count, per vCPU
    /// its pass and unfinished line, then the errors; little-endian.
    fn encode(&self) -> Vec<u8> {
        let state = self.lock();
        let mut out = Vec::new();
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(state.partial.len() as u32).to_le_bytes());
        for (partial, pass) in state.partial.iter().zip(&state.progress.passes) {
            out.extend_from_slice(&pass.to_le_bytes());
            out.push(partial.len() as u8);
            out.extend_from_slice(partial);
        }
        out.extend_from_slice(&(state.progress.errors.len() as u32).to_le_bytes());
        for error in &state.progress.errors {
            out.push(error.vcpu);
            out.extend_from_slice(&error.address.to_le_bytes());
            out.extend_from_slice(&error.found.to_le_bytes());
            out.extend_from_slice(&error.expected.to_le_bytes());
        }
        out
    }

    /// Loads what [`Serial::encode`] wrote, checking every length.
    fn decode(&self, bytes: &[u8]) -> Result<(), Error> {
        let mut reader = Reader(bytes);
        let version = reader.u32()?;
        if version != STATE_VERSION {
            return Err(Error::State(format!("serial state version {version}")));
        }
        let vcpus = reader.u32()? as usize;
        let mut state = self.lock();
        if vcpus != state.partial.len() {
            return Err(Error::State(format!(
                "serial state for {vcpus} vCPUs, this VM has {}",
                state.partial.len()
            )));
        }
        for vcpu in 0..vcpus {
            state.progress.passes[vcpu] = reader.u32()?;
            let length = usize::from(reader.take(1)?[0]);
            state.partial[vcpu] = reader.take(length)?.to_vec();
        }
        let errors = reader.u32()?;
        for _ in 0..errors {
            let vcpu = reader.take(1)?[0];
            let address = u64::from_le_bytes(reader.take(8)?.try_into().unwrap_or_default());
            let (found, expected) = (reader.u32()?, reader.u32()?);
            state.progress.errors.push(GuestError {
                vcpu,
                address,
                found,
                expected,
            });
        }
        if !reader.0.is_empty() {
            return Err(Error::State(format!(
                "{} bytes after the serial state",
                reader.0.len()
            )));
        }
        Ok(())
    }
}

/// Bounds-checked reads over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < length {
            return Err(Error::State("serial state truncated".into()));
        }
        let (taken, rest) = self.0.split_at(length);
        self.0 = rest;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
}

/// The source side of the serial device.
pub(crate) struct SaveSerial(pub(crate) std::sync::Arc<Serial>);

impl multifd::SaveDevice for SaveSerial {
    fn save_state(
        &mut self,
        state: &mut multifd::StateWriter<'_>,
    ) -> Result<(), multifd::DeviceError> {
        state.write_all(&self.0.encode())?;
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, multifd::DeviceError> {
        Ok(Vec::new())
    }
}

/// The destination side of the serial device.
pub(crate) struct LoadSerial {
    pub(crate) serial: std::sync::Arc<Serial>,
    pub(crate) state: Vec<u8>,
}

impl multifd::LoadDevice for LoadSerial {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), multifd::DeviceError> {
        if self.state.len() + chunk.len() > crate::kvm_vm::MAX_STATE {
            return Err("serial state too large".into());
        }
        self.state.extend_from_slice(chunk);
        Ok(())
    }

    fn load_config(&mut self, _config: &[u8]) -> Result<(), multifd::DeviceError> {
        Ok(self.serial.decode(&self.state)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        assert_eq!(
            SerialLine::parse("P1 1a"),
            Some(SerialLine::Pass { vcpu: 1, pass: 26 })
        );
        assert_eq!(
            SerialLine::parse("E0 100ff8 3 5"),
            Some(SerialLine::Mismatch(GuestError {
                vcpu: 0,
                address: 0x10_0ff8,
                found: 3,
                expected: 5
            }))
        );
        for garbage in [
            "", "P", "P0", "P0 ", "P10 1", "X0 1", "P0 1 2", "E0 1 2", "P0 zz",
        ] {
            assert_eq!(SerialLine::parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn vcpus_have_their_own_lines() {
        let serial = Serial::new(2, None);
        for (vcpu, byte) in [(0, b'P'), (1, b'P'), (0, b'0'), (1, b'1'), (1, b' ')] {
            serial.write(vcpu, 0x3f8, byte);
        }
        for byte in *b" 2\n" {
            serial.write(0, 0x3f8, byte);
        }
        for byte in *b"7\n" {
            serial.write(1, 0x3f8, byte);
        }
        serial.write(1, 0x2f8, b'x');
        assert_eq!(serial.progress().passes, vec![2, 7]);
        assert_eq!(serial.history(), vec!["P0 2", "P1 7"]);
    }

    #[test]
    fn state_moves_with_unfinished_lines() {
        let source = Serial::new(2, None);
        for byte in *b"E1 2000 5 6\nP1 3\nP1 1" {
            source.write(1, 0x3f8, byte);
        }
        let blob = source.encode();
        let destination = Serial::new(2, None);
        destination.decode(&blob).unwrap();
        for byte in *b"0\n" {
            destination.write(1, 0x3f8, byte);
        }
        let progress = destination.progress();
        assert_eq!(progress.passes, vec![0, 16]);
        assert_eq!(progress.errors.len(), 1);
        for length in 0..blob.len() {
            assert!(Serial::new(2, None).decode(&blob[..length]).is_err());
        }
        assert!(Serial::new(3, None).decode(&blob).is_err());
    }
}
