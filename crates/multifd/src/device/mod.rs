//! Device state: the traits a VMM implements for its devices, the source's chunking
//! writer ([`save`]), and the destination's per-device reassembly ([`reassembler`]) and
//! load threads ([`load`]).
//!
//! After switchover each device's [`SaveDevice`] runs on its own thread and writes its
//! state into a [`StateWriter`], which cuts it into chunks `idx = 0, 1, …` and hands each
//! to the same buffer swap as RAM; the device's config blob follows as the last chunk,
//! flagged `CONFIG_STATE`. Chunks of one device travel on different channels, so the
//! destination queues them per device and a load thread per device hands them to its
//! [`LoadDevice`] strictly in `idx` order, the config last, while later chunks are still
//! arriving.
//!
//! A snapshot uses the same traits: the [`StateWriter`] then streams the state into the
//! file's device area, and the restore hands it back to the [`LoadDevice`] in chunks.

pub(crate) mod load;
pub(crate) mod reassembler;
pub(crate) mod save;

pub use save::StateWriter;

use crate::ids::DeviceId;

/// What a device's save or load callback returns on failure.
pub type DeviceError = Box<dyn std::error::Error + Send + Sync>;

/// The devices a source saves, each with its id.
pub type SaveDevices = Vec<(DeviceId, Box<dyn SaveDevice>)>;

/// The devices a destination loads, each with its id.
pub type LoadDevices = Vec<(DeviceId, Box<dyn LoadDevice>)>;

/// The source side of a device: writes its state after the VM stopped (and, in a live
/// migration, optionally some of it during the precopy rounds).
pub trait SaveDevice: Send {
    /// Writes the device's state, of any length, into `state`; the engine chunks it.
    /// Runs on the device's own thread, concurrently with other devices and RAM.
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError>;

    /// The device's config blob, sent as its last chunk after the state; it must fit in
    /// one chunk (the configured chunk size).
    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError>;

    /// Live migration only: bytes of state the device would still have to send if the VM
    /// stopped now. The precopy driver adds them to the RAM still dirty when it estimates
    /// the downtime. Devices without a pre-copy phase keep the default, 0.
    fn pending_bytes(&mut self) -> u64 {
        0
    }

    /// Live migration only: called once per precopy round while the VM still runs, so a
    /// device with a large state (a VFIO device's pre-copy phase) sends what it can early.
    /// What it writes here is already on its way: at switchover [`SaveDevice::save_state`]
    /// writes only what is left or changed, and nothing is sent twice unless the device
    /// writes it again. The default sends nothing.
    fn save_precopy(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        let _ = state;
        Ok(())
    }
}

/// The destination side of a device: loads its state as it arrives.
pub trait LoadDevice: Send {
    /// Loads the next piece of the state; pieces come strictly in the order they were
    /// written, each as one chunk of at most the negotiated chunk size.
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError>;

    /// Loads the config blob, after every piece of the state.
    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError>;
}
