//! Devices whose state is checked byte for byte: [`PatternDevice`] saves a deterministic
//! pattern (optionally part of it during precopy, as a VFIO device's pre-copy phase does)
//! and [`DeviceSink`] collects what arrives.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use multifd::{DeviceError, LoadDevice, SaveDevice, StateWriter};

/// A source device whose state is `state` and whose config blob is `config`.
#[derive(Debug, Clone)]
pub struct PatternDevice {
    state: Arc<Vec<u8>>,
    config: Vec<u8>,
    /// Bytes sent per precopy round; 0 sends everything at switchover.
    precopy_share: usize,
    /// Bytes of the state already sent during precopy.
    sent: usize,
}

impl PatternDevice {
    /// A device of `length` bytes of a pattern derived from `seed`, with an 8-byte
    /// config; all of it is saved at switchover.
    pub fn new(length: usize, seed: u64) -> Self {
        let mut value = seed | 1;
        let state = (0..length)
            .map(|_| {
                value ^= value << 13;
                value ^= value >> 7;
                value ^= value << 17;
                value as u8
            })
            .collect();
        Self {
            state: Arc::new(state),
            config: seed.to_be_bytes().to_vec(),
            precopy_share: 0,
            sent: 0,
        }
    }

    /// Sends up to `share` bytes in each precopy round, the rest at switchover.
    pub fn with_precopy_share(mut self, share: usize) -> Self {
        self.precopy_share = share;
        self
    }

    /// The state the destination must end up with.
    pub fn state(&self) -> Arc<Vec<u8>> {
        Arc::clone(&self.state)
    }

    /// The config blob the destination must end up with.
    pub fn config(&self) -> &[u8] {
        &self.config
    }
}

impl SaveDevice for PatternDevice {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        state.write_all(&self.state[self.sent..])?;
        self.sent = self.state.len();
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(self.config.clone())
    }

    fn pending_bytes(&mut self) -> u64 {
        (self.state.len() - self.sent) as u64
    }

    fn save_precopy(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        let end = (self.sent + self.precopy_share).min(self.state.len());
        state.write_all(&self.state[self.sent..end])?;
        self.sent = end;
        Ok(())
    }
}

/// What a [`DeviceSink`] loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The state, chunks appended in the order they were loaded.
    pub state: Vec<u8>,
    /// The config blob, once loaded.
    pub config: Option<Vec<u8>>,
}

/// A destination device that keeps what it loads, for the test to compare.
#[derive(Debug, Clone, Default)]
pub struct DeviceSink {
    loaded: Arc<Mutex<Loaded>>,
}

impl DeviceSink {
    /// A sink with room for `length` bytes of state, resident as a VMM's device memory is
    /// before the migration starts (growing a buffer, or faulting its pages in, while
    /// loading would add work to the downtime that a real device does not have).
    pub fn with_capacity(length: usize) -> Self {
        // Touched now, so its pages are resident before the migration, like a device's.
        let mut state = vec![1u8; length];
        state.clear();
        let loaded = Loaded {
            state,
            config: None,
        };
        Self {
            loaded: Arc::new(Mutex::new(loaded)),
        }
    }

    /// The state and the config loaded so far.
    pub fn loaded(&self) -> Loaded {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl LoadDevice for DeviceSink {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        loaded.state.extend_from_slice(chunk);
        Ok(())
    }

    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        loaded.config = Some(config.to_vec());
        Ok(())
    }
}
