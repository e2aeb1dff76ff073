//! Test guests that prove a live migration end to end, with real threads and real
//! sockets: [`ThreadGuest`] is a simulated guest whose writer threads dirty its memory at
//! a set rate, with the dirty log and VM control a VMM would hand the precopy driver, and
//! [`PatternDevice`]/[`DeviceSink`] are devices whose state is checked byte for byte;
//! [`LocalMigration`] runs a whole live migration of one to a destination thread over a
//! real socket and compares both ends.

mod devices;
mod local;
mod threads;

pub use devices::{DeviceSink, Loaded, PatternDevice};
pub use local::{LocalMigration, LocalReport};
pub use threads::{
    anonymous_memory, first_difference, GuestControl, ThreadGuest, ThreadGuestConfig,
};

/// What can go wrong setting up a test guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Mapping the guest's memory failed.
    #[error("mapping {bytes} bytes of guest memory: {source}")]
    Map {
        /// The size asked for.
        bytes: u64,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The engine refused the memory layout.
    #[error(transparent)]
    Engine(#[from] multifd::Error),
    /// A writer thread could not be started.
    #[error("starting a writer thread: {0}")]
    Spawn(#[source] std::io::Error),
}
