//! A whole live migration on one host: a [`ThreadGuest`] and its devices migrated by the
//! precopy driver to a destination thread over a real loopback socket, then checked: the
//! destination's memory and devices must equal the source's at the moment of the stop.

use std::sync::Mutex;
use std::thread;

use multifd::{
    Address, Destination, DestinationConfig, DeviceId, GuestMemory, Listener, LoadDevices,
    MigrationStats, Precopy, PrecopyConfig, PrecopyProgress, PrecopyStats, SaveDevices, Source,
    SourceConfig,
};

use crate::threads::{anonymous_memory, first_difference};
use crate::{DeviceSink, Error, PatternDevice, ThreadGuest, ThreadGuestConfig};

/// One local live migration's settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LocalMigration {
    /// The simulated guest.
    pub guest: ThreadGuestConfig,
    /// The devices, saved at switchover (or partly during precopy).
    pub devices: Vec<(DeviceId, PatternDevice)>,
    /// Channels, compression, bandwidth cap.
    pub source: SourceConfig,
    /// Downtime limit, auto-converge, timeout.
    pub precopy: PrecopyConfig,
    /// Where the destination listens: a Unix socket or a loopback TCP port.
    pub address: Address,
}

/// What a local live migration did.
#[derive(Debug)]
#[non_exhaustive]
pub struct LocalReport {
    /// The source's figures, or the migration's error.
    pub result: Result<PrecopyStats, multifd::Error>,
    /// The destination's figures (its `switchover_time` is its own downtime measure:
    /// `SwitchoverStart` received → everything loaded), or its error.
    pub destination: Result<MigrationStats, multifd::Error>,
    /// After a success: `None` if memory and devices matched, else what differed.
    pub mismatch: Option<String>,
    /// Whether the source guest still runs (after a failure it must).
    pub source_running: bool,
    /// Pages the guest wrote before the stop.
    pub pages_written: u64,
}

impl LocalMigration {
    /// A migration of a guest of `guest` settings over `address` with default settings.
    pub fn new(guest: ThreadGuestConfig, address: Address) -> Self {
        Self {
            guest,
            devices: Vec::new(),
            source: SourceConfig::default(),
            precopy: PrecopyConfig::default(),
            address,
        }
    }

    /// Runs the migration; `progress` sees the driver's reports.
    pub fn run(&self, progress: &mut dyn FnMut(&PrecopyProgress)) -> Result<LocalReport, Error> {
        let mut guest = ThreadGuest::start(&self.guest)?;
        let listener = Listener::bind(&self.address)?;
        let sinks: Vec<DeviceSink> = self
            .devices
            .iter()
            .map(|(_, device)| DeviceSink::with_capacity(device.state().len()))
            .collect();
        let received: Mutex<Option<GuestMemory>> = Mutex::new(None);
        let memory_bytes = self.guest.memory;
        let (result, destination) = thread::scope(|scope| {
            let load: LoadDevices = self
                .devices
                .iter()
                .zip(&sinks)
                .map(|((id, _), sink)| (id.clone(), Box::new(sink.clone()) as _))
                .collect();
            let received = &received;
            let listener = &listener;
            let mut config = DestinationConfig::default();
            // `anonymous_memory` maps fresh zeroed memory.
            config.memory_zeroed = true;
            let destination = Destination::new(config);
            let cancel = destination.cancel_handle();
            let destination = scope.spawn(move || {
                destination.run_with_devices(
                    listener,
                    |blocks| {
                        let memory = anonymous_memory(&blocks[0].name, memory_bytes)
                            .map_err(|error| error.to_string())?;
                        *received.lock().map_err(|_| "poisoned")? = Some(memory.clone());
                        Ok(memory)
                    },
                    load,
                )
            });
            let result = self.migrate(&mut guest, progress);
            if result.is_err() {
                // A source that failed before connecting (or mid-way) must not leave the
                // destination waiting for it.
                cancel.cancel();
            }
            let destination = destination.join().unwrap_or_else(|_| {
                Err(multifd::Error::Config(
                    "the destination thread panicked".into(),
                ))
            });
            (result, destination)
        });
        let mismatch = match (&result, received.into_inner()) {
            (Ok(_), Ok(Some(received))) => self.compare(&guest, &received, &sinks),
            (Ok(_), _) => Some("the destination mapped no memory".into()),
            (Err(_), _) => None,
        };
        Ok(LocalReport {
            result,
            destination,
            mismatch,
            source_running: guest.is_running(),
            pages_written: guest.pages_written(),
        })
    }

    fn migrate(
        &self,
        guest: &mut ThreadGuest,
        progress: &mut dyn FnMut(&PrecopyProgress),
    ) -> Result<PrecopyStats, multifd::Error> {
        let devices: SaveDevices = self
            .devices
            .iter()
            .map(|(id, device)| (id.clone(), Box::new(device.clone()) as _))
            .collect();
        let source =
            Source::connect_with_devices(&self.address, &self.source, guest.memory(), devices)?;
        let mut dirty = guest.dirty_log();
        let mut control = guest.control();
        Precopy::new(self.precopy.clone()).run(source, &mut dirty, &mut control, progress)
    }

    /// What differs between the stopped source and the destination, if anything.
    fn compare(
        &self,
        guest: &ThreadGuest,
        received: &GuestMemory,
        sinks: &[DeviceSink],
    ) -> Option<String> {
        if let Some(offset) = first_difference(&guest.memory().blocks()[0], &received.blocks()[0]) {
            return Some(format!("guest memory differs at offset {offset:#x}"));
        }
        for ((id, device), sink) in self.devices.iter().zip(sinks) {
            let loaded = sink.loaded();
            if loaded.state != *device.state() || loaded.config.as_deref() != Some(device.config())
            {
                return Some(format!("device {id} differs"));
            }
        }
        None
    }
}
