//! Test guests that prove a live migration end to end, with real threads and real
//! sockets: [`ThreadGuest`] is a simulated guest whose writer threads dirty its memory at
//! a set rate, with the dirty log and VM control a VMM would hand the precopy driver, and
//! [`PatternDevice`]/[`DeviceSink`] are devices whose state is checked byte for byte;
//! [`LocalMigration`] runs a whole live migration of one to a destination thread over a
//! real socket and compares both ends.
//!
//! On Linux with KVM, [`KvmVm`] is a minimal VMM running a guest of our own: a boot
//! sector ([`GuestImage`], see [`guest_image`]) that checks on every pass that each page
//! still holds what it wrote on the previous pass and reports on its serial port
//! ([`GuestProgress`]). Its vCPU and VM state travel as devices ([`VcpuState`],
//! [`VmState`]) with a large [`FrameBuffer`] device, and [`KvmMigration`] live-migrates
//! it to a second VM over real sockets, where the guest's own checks prove that every
//! page arrived.
//!
//! ```no_run
//! use std::time::Duration;
//! use multifd_testvm::{GuestProgress, KvmMigration, KvmVm, VmConfig};
//!
//! # fn main() -> Result<(), multifd_testvm::Error> {
//! let mut config = VmConfig::new(1 << 30, 2); // 1 GiB, 2 vCPUs
//! config.write_bytes = 64; // checked per page and pass
//! config.dirty_rate = 100 << 20; // bytes per second, over all vCPUs
//! config.frame_buffer = 16 << 20;
//! let vm = KvmVm::start(&config)?;
//! vm.wait_for_passes(&GuestProgress::default(), 2, Duration::from_secs(30))?;
//!
//! let mut migration = KvmMigration::new("tcp:127.0.0.1:4444".parse()?);
//! migration.source.channels = 4;
//! migration.precopy.downtime_limit = Duration::from_millis(300);
//! let (moved, report) = migration.migrate(&vm, &mut |progress| println!("{}", progress.phase))?;
//! println!("{} rounds, downtime {:?}", report.precopy.rounds.len(), report.precopy.downtime);
//! // The guest goes on where it stopped; its checks keep passing.
//! let after = moved.wait_for_passes(&report.before, 2, Duration::from_secs(30))?;
//! assert!(after.errors.is_empty());
//! # Ok(()) }
//! ```
//!
//! Between two processes, the source calls [`send`] on its running VM and the destination
//! [`receive`] on a [`KvmVm::incoming`] one; [`GuestImage`] writes the same guest as a
//! disk image for QEMU. On one host, a local migration ([`KvmMigration::local`], or
//! `local_memory` in the source's settings for [`send`]) hands the guest's memfd over a
//! Unix socket instead of copying its pages, and the destination VM runs the guest in
//! that very memory.

mod devices;
mod frame_buffer;
pub mod guest_image;
mod kvm_migration;
mod kvm_vm;
mod local;
mod serial;
mod threads;
mod vcpu;
mod vcpu_state;

pub use devices::{DeviceSink, Loaded, PatternDevice};
pub use frame_buffer::{FrameBuffer, ROW_SIZE as FRAME_BUFFER_ROW_SIZE};
pub use guest_image::{host_tsc_hz, GuestImage, GuestParameters};
pub use kvm_migration::{
    receive, restore, send, snapshot, KvmFault, KvmMigration, KvmMigrationReport,
};
pub use kvm_vm::{KvmControl, KvmVm, VmConfig, DEFAULT_FRAME_BUFFER};
pub use local::{LocalMigration, LocalReport};
pub use serial::{GuestError, GuestProgress, SerialLine};
pub use threads::{
    anonymous_memory, first_difference, GuestControl, ThreadGuest, ThreadGuestConfig,
};
pub use vcpu_state::{VcpuState, VmState};

/// For tests that need a KVM guest: whether `/dev/kvm` is usable. When it is not, a test
/// prints a loud `SKIPPED` line and returns, unless `MULTIFD_REQUIRE_KVM=1` (set by CI
/// where `/dev/kvm` exists), which turns the skip into a panic.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(error) if std::env::var("MULTIFD_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("MULTIFD_REQUIRE_KVM=1 but /dev/kvm is not available: {error}")
        }
        Err(error) => {
            eprintln!("SKIPPED: /dev/kvm not available ({error})");
            false
        }
    }
}

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
    /// The guest's parameters or the VM's configuration are invalid.
    #[error("{0}")]
    Guest(String),
    /// The boot sector did not assemble.
    #[error("assembling the boot sector: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What the VMM was doing.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VMM thread could not be started, or its signal set up.
    #[error("starting a VMM thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The serial file could not be opened.
    #[error("opening the serial file {path}: {source}")]
    Serial {
        /// The file.
        path: std::path::PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// A saved vCPU, VM or device state is malformed or does not load.
    #[error("device state: {0}")]
    State(String),
    /// Something did not happen in time (the vCPUs did not stop, the guest made no
    /// progress).
    #[error("timed out: {0}")]
    Timeout(String),
}
