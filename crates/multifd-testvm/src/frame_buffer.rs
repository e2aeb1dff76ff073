//! A large emulated device whose content follows the guest: a "frame buffer" that the VMM
//! redraws as the guest reports progress, migrated through the device-state channels as
//! the device `fb/0` and checked on load.
//!
//! The buffer is cut into rows of [`ROW_SIZE`] bytes. Every row starts with a 32-byte
//! header — magic, its own index, the generation that drew it, the vCPUs' pass counters
//! then — and the rest of the row is a pattern computed from that header alone, so each
//! row can be checked on its own. A redraw bumps the buffer's generation and redraws one
//! row (round robin) from the latest pass counters; the VMM's updater thread redraws at
//! most every [`crate::kvm_vm`] tick, and only when the guest made progress.
//!
//! Migration: during precopy the device sends every row redrawn since it last sent it
//! (all rows in round 0) and reports the rest as pending, so the downtime estimate counts
//! it; after the stop it sends the rows redrawn since. The stream is a sequence of
//! records (row index `u32` LE, then the row). The config blob, sent last, carries the
//! generation and a digest of every row's generation. The destination checks every row as
//! it arrives (header names the row, pattern matches the header) and, with the config,
//! that every row arrived and that the rows' generations match the digest: a lost,
//! stale or garbled row is an error.

use std::sync::{Mutex, MutexGuard, PoisonError};

use multifd::{DeviceError, LoadDevice, SaveDevice, StateWriter};

use crate::Error;

/// Bytes per row: the unit of redraw and of migration. 64 KiB keeps a redraw (one row)
/// cheap (tens of microseconds) and the per-row overhead of a record (4 bytes) and of the
/// digest negligible, while a 256 MiB buffer still has 4096 rows to spread redraws over.
pub const ROW_SIZE: usize = 64 << 10;
/// A row header's size: magic, index, generation, four pass counters.
const HEADER: usize = 32;
/// A row header's magic: "FBRW".
const ROW_MAGIC: u32 = u32::from_le_bytes(*b"FBRW");
/// The config blob's magic and version: "FBCF", 1.
const CONFIG_MAGIC: u32 = u32::from_le_bytes(*b"FBCF");
const CONFIG_VERSION: u32 = 1;
/// A record's prefix: the row index.
const RECORD_PREFIX: usize = 4;

struct Inner {
    bytes: Vec<u8>,
    /// Each row's generation, as drawn or loaded.
    generations: Vec<u64>,
    /// Rows redrawn since last sent.
    dirty: Vec<bool>,
    /// Rows received at least once (destination).
    loaded: Vec<bool>,
    generation: u64,
    /// The passes the last redraw showed.
    shown: [u32; 4],
    /// A record cut across chunks, on the destination.
    partial: Vec<u8>,
}

/// The frame buffer; see the module documentation.
pub struct FrameBuffer {
    inner: Mutex<Inner>,
    rows: usize,
}

impl std::fmt::Debug for FrameBuffer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FrameBuffer")
            .field("rows", &self.rows)
            .field("generation", &self.lock().generation)
            .finish_non_exhaustive()
    }
}

impl FrameBuffer {
    /// A buffer of `size` bytes (a non-zero multiple of [`ROW_SIZE`]), every row drawn
    /// at generation 0 when `draw`, else left zero to be loaded.
    pub fn new(size: u64, draw: bool) -> Result<Self, Error> {
        let rows = usize::try_from(size / ROW_SIZE as u64).unwrap_or(0);
        if size == 0 || !size.is_multiple_of(ROW_SIZE as u64) || rows == 0 {
            return Err(Error::Guest(format!(
                "frame buffer size {size} must be a non-zero multiple of {ROW_SIZE}"
            )));
        }
        let mut bytes = vec![0u8; rows * ROW_SIZE];
        // Touch every page now: the allocator hands out untouched zero pages, and
        // faulting them in while rows arrive would slow the load that the switchover may
        // wait for. (`black_box` keeps the compiler from proving the fill redundant.)
        std::hint::black_box(&mut bytes).fill(0);
        let mut inner = Inner {
            bytes,
            generations: vec![0; rows],
            dirty: vec![draw; rows],
            loaded: vec![false; rows],
            generation: 0,
            shown: [0; 4],
            partial: Vec::new(),
        };
        if draw {
            for row in 0..rows {
                draw_row(
                    &mut inner.bytes[row * ROW_SIZE..][..ROW_SIZE],
                    row,
                    0,
                    [0; 4],
                );
            }
        }
        Ok(Self {
            inner: Mutex::new(inner),
            rows,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The buffer's size in bytes.
    pub fn size(&self) -> u64 {
        (self.rows * ROW_SIZE) as u64
    }

    /// The bytes of a stream carrying every row once (records with their prefixes).
    pub fn stream_bytes(&self) -> u64 {
        (self.rows * (RECORD_PREFIX + ROW_SIZE)) as u64
    }

    /// The buffer's generation (redraws so far, carried over a migration).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Redraws one row if `passes` differ from what the last redraw showed; returns
    /// whether it did.
    pub fn follow(&self, passes: &[u32]) -> bool {
        let mut shown = [0; 4];
        for (slot, pass) in shown.iter_mut().zip(passes) {
            *slot = *pass;
        }
        let mut inner = self.lock();
        if inner.shown == shown {
            return false;
        }
        inner.shown = shown;
        inner.generation += 1;
        let generation = inner.generation;
        let row = (generation % self.rows as u64) as usize;
        draw_row(
            &mut inner.bytes[row * ROW_SIZE..][..ROW_SIZE],
            row,
            generation,
            shown,
        );
        inner.generations[row] = generation;
        inner.dirty[row] = true;
        true
    }

    /// Checks every row against its header and the digest of generations: what the
    /// destination's load does, callable on any buffer.
    pub fn verify(&self) -> Result<(), Error> {
        let inner = self.lock();
        for row in 0..self.rows {
            check_row(&inner.bytes[row * ROW_SIZE..][..ROW_SIZE], row)?;
        }
        Ok(())
    }

    /// Marks every row as still to send: a new migration has sent nothing yet.
    pub(crate) fn mark_all_dirty(&self) {
        self.lock().dirty.fill(true);
    }

    /// Sends every dirty row, clearing its bit, one row under the lock at a time.
    fn send_dirty(&self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        use std::io::Write;
        let mut record = vec![0u8; RECORD_PREFIX + ROW_SIZE];
        for row in 0..self.rows {
            {
                let mut inner = self.lock();
                if !inner.dirty[row] {
                    continue;
                }
                inner.dirty[row] = false;
                record[..RECORD_PREFIX].copy_from_slice(&(row as u32).to_le_bytes());
                record[RECORD_PREFIX..].copy_from_slice(&inner.bytes[row * ROW_SIZE..][..ROW_SIZE]);
            }
            state.write_all(&record)?;
        }
        Ok(())
    }

    fn config(&self) -> Vec<u8> {
        let inner = self.lock();
        let mut config = Vec::with_capacity(32);
        for word in [
            CONFIG_MAGIC,
            CONFIG_VERSION,
            ROW_SIZE as u32,
            self.rows as u32,
        ] {
            config.extend_from_slice(&word.to_le_bytes());
        }
        config.extend_from_slice(&inner.generation.to_le_bytes());
        config.extend_from_slice(&digest(&inner.generations).to_le_bytes());
        config
    }

    fn load_records(&self, chunk: &[u8]) -> Result<(), Error> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let record = RECORD_PREFIX + ROW_SIZE;
        let mut chunk = chunk;
        // A record cut by the previous chunk is completed first.
        if !inner.partial.is_empty() {
            let take = (record - inner.partial.len()).min(chunk.len());
            inner.partial.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if inner.partial.len() < record {
                return Ok(());
            }
            let partial = std::mem::take(&mut inner.partial);
            self.load_record(inner, &partial)?;
            inner.partial = partial;
            inner.partial.clear();
        }
        // Whole records straight from the chunk, without a copy.
        let mut records = chunk.chunks_exact(record);
        for whole in &mut records {
            self.load_record(inner, whole)?;
        }
        inner.partial.extend_from_slice(records.remainder());
        Ok(())
    }

    /// Checks one record (`RECORD_PREFIX + ROW_SIZE` bytes) and copies its row in.
    fn load_record(&self, inner: &mut Inner, record: &[u8]) -> Result<(), Error> {
        let (prefix, bytes) = record.split_at(RECORD_PREFIX);
        let row = u32::from_le_bytes(prefix.try_into().unwrap_or_default()) as usize;
        if row >= self.rows {
            return Err(Error::State(format!(
                "frame buffer record for row {row} of {}",
                self.rows
            )));
        }
        let generation = check_row(bytes, row)?;
        inner.bytes[row * ROW_SIZE..][..ROW_SIZE].copy_from_slice(bytes);
        inner.generations[row] = generation;
        inner.loaded[row] = true;
        Ok(())
    }

    fn load_config(&self, config: &[u8]) -> Result<(), Error> {
        let bad = |what: String| Error::State(format!("frame buffer config: {what}"));
        if config.len() != 32 {
            return Err(bad(format!("{} bytes, expected 32", config.len())));
        }
        let word = |index: usize| {
            u32::from_le_bytes(config[4 * index..][..4].try_into().unwrap_or_default())
        };
        let long = |offset: usize| {
            u64::from_le_bytes(config[offset..][..8].try_into().unwrap_or_default())
        };
        if word(0) != CONFIG_MAGIC || word(1) != CONFIG_VERSION {
            return Err(bad(format!("magic {:#x} version {}", word(0), word(1))));
        }
        if word(2) as usize != ROW_SIZE || word(3) as usize != self.rows {
            return Err(bad(format!(
                "{} rows of {} bytes, this buffer has {} of {ROW_SIZE}",
                word(3),
                word(2),
                self.rows
            )));
        }
        let mut inner = self.lock();
        if !inner.partial.is_empty() {
            return Err(bad(format!(
                "{} bytes of a cut record",
                inner.partial.len()
            )));
        }
        if let Some(row) = inner.loaded.iter().position(|loaded| !loaded) {
            return Err(bad(format!("row {row} never arrived")));
        }
        let (generation, expected) = (long(16), long(24));
        let found = digest(&inner.generations);
        if found != expected {
            return Err(bad(format!(
                "the rows' generations digest to {found:#x}, the source's to {expected:#x}: a row is stale"
            )));
        }
        inner.generation = generation;
        Ok(())
    }
}

/// FNV-1a over the rows' generations: a stale row changes it.
fn digest(generations: &[u64]) -> u64 {
    generations
        .iter()
        .flat_map(|generation| generation.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The step between two pattern words: an odd constant (2^64 / φ), so the words of a
/// row never repeat and every bit changes often. Each word is the previous one plus the
/// step, one addition per 8 bytes, so checking a 256 MiB buffer costs little more than
/// reading it (the destination checks every row as it arrives, and a backlog of rows
/// still to check at the switchover would be downtime).
const PATTERN_STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// The pattern words of a row whose header digests to `seed`.
fn pattern(seed: u64) -> impl Iterator<Item = u64> {
    std::iter::successors(Some(seed), |word| Some(word.wrapping_add(PATTERN_STEP)))
}

/// Draws row `row` (exactly `ROW_SIZE` bytes) for `generation` and `passes`.
fn draw_row(bytes: &mut [u8], row: usize, generation: u64, passes: [u32; 4]) {
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&ROW_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&(row as u32).to_le_bytes());
    header[8..16].copy_from_slice(&generation.to_le_bytes());
    for (index, pass) in passes.iter().enumerate() {
        header[16 + 4 * index..][..4].copy_from_slice(&pass.to_le_bytes());
    }
    bytes[..HEADER].copy_from_slice(&header);
    let seed = digest_bytes(&header);
    for (word, value) in bytes[HEADER..].chunks_exact_mut(8).zip(pattern(seed)) {
        word.copy_from_slice(&value.to_le_bytes());
    }
}

fn digest_bytes(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Checks a row against its own header; returns its generation.
fn check_row(bytes: &[u8], row: usize) -> Result<u64, Error> {
    let header = &bytes[..HEADER];
    let magic = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
    let index = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default()) as usize;
    if magic != ROW_MAGIC || index != row {
        return Err(Error::State(format!(
            "frame buffer row {row}: header says magic {magic:#x} row {index}"
        )));
    }
    let seed = digest_bytes(header);
    let matches = bytes[HEADER..]
        .chunks_exact(8)
        .zip(pattern(seed))
        .all(|(word, value)| word == value.to_le_bytes());
    if !matches {
        return Err(Error::State(format!(
            "frame buffer row {row}: its content does not match its header"
        )));
    }
    Ok(u64::from_le_bytes(
        header[8..16].try_into().unwrap_or_default(),
    ))
}

/// The source side of the frame buffer device.
pub(crate) struct SaveFrameBuffer(pub(crate) std::sync::Arc<FrameBuffer>);

impl SaveDevice for SaveFrameBuffer {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        self.0.send_dirty(state)
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(self.0.config())
    }

    fn pending_bytes(&mut self) -> u64 {
        let dirty = self.0.lock().dirty.iter().filter(|dirty| **dirty).count();
        (dirty * (RECORD_PREFIX + ROW_SIZE)) as u64
    }

    fn save_precopy(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        self.0.send_dirty(state)
    }
}

/// The destination side of the frame buffer device.
pub(crate) struct LoadFrameBuffer(pub(crate) std::sync::Arc<FrameBuffer>);

impl LoadDevice for LoadFrameBuffer {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        Ok(self.0.load_records(chunk)?)
    }

    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError> {
        Ok(self.0.load_config(config)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(buffer: &FrameBuffer, rows: impl Iterator<Item = usize>) -> Vec<u8> {
        let inner = buffer.lock();
        let mut out = Vec::new();
        for row in rows {
            out.extend_from_slice(&(row as u32).to_le_bytes());
            out.extend_from_slice(&inner.bytes[row * ROW_SIZE..][..ROW_SIZE]);
        }
        out
    }

    #[test]
    fn a_copy_loads_and_a_stale_or_garbled_row_does_not() {
        let source = FrameBuffer::new(4 * ROW_SIZE as u64, true).unwrap();
        let stale = records(&source, 0..4);
        assert!(source.follow(&[3, 4]));
        assert!(!source.follow(&[3, 4]));
        assert!(source.follow(&[5, 4]));
        source.verify().unwrap();
        let fresh = records(&source, 0..4);

        let good = FrameBuffer::new(4 * ROW_SIZE as u64, false).unwrap();
        // Chunks cut across records.
        for chunk in fresh.chunks(1000) {
            good.load_records(chunk).unwrap();
        }
        good.load_config(&source.config()).unwrap();
        good.verify().unwrap();
        assert_eq!(good.generation(), 2);

        let old = FrameBuffer::new(4 * ROW_SIZE as u64, false).unwrap();
        old.load_records(&stale).unwrap();
        assert!(old.load_config(&source.config()).is_err());

        let missing = FrameBuffer::new(4 * ROW_SIZE as u64, false).unwrap();
        missing.load_records(&fresh[..3 * (ROW_SIZE + 4)]).unwrap();
        assert!(missing.load_config(&source.config()).is_err());

        let mut garbled = fresh.clone();
        garbled[4 + 100] ^= 1;
        let broken = FrameBuffer::new(4 * ROW_SIZE as u64, false).unwrap();
        assert!(broken.load_records(&garbled).is_err());
        assert!(FrameBuffer::new(1000, true).is_err());
    }
}
