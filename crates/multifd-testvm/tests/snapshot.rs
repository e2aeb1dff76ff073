//! A live snapshot: the precopy driver writes a guest whose writer threads keep dirtying
//! memory into a snapshot file, rewriting dirty pages in place, then the file is restored
//! and compared byte for byte with the guest's memory at the stop. The file never grows
//! past the guest's size and the metadata.

use std::time::Duration;

use multifd::{
    DeviceId, Phase, Precopy, PrecopyConfig, RestoreConfig, SaveDevices, Snapshot, SnapshotConfig,
    SnapshotWriter, TimeoutStrategy,
};
use multifd_testvm::{
    anonymous_memory, first_difference, DeviceSink, PatternDevice, ThreadGuest, ThreadGuestConfig,
};

const GUEST: u64 = 64 << 20;

#[test]
fn a_live_snapshot_of_a_dirtying_guest_restores_to_its_memory_at_the_stop() {
    let mut guest_config = ThreadGuestConfig::default();
    guest_config.memory = GUEST;
    guest_config.dirty_rate = 16 << 20;
    guest_config.writers = 2;
    let guest = ThreadGuest::start(&guest_config).expect("guest");
    let device = PatternDevice::new(1 << 20, 3).with_precopy_share(256 << 10);
    let devices: SaveDevices = vec![(DeviceId::new("vga", 0), Box::new(device.clone()) as _)];

    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("live.snap");
    let mut config = SnapshotConfig::default();
    config.threads = 2;
    let writer = SnapshotWriter::create(&path, &config, guest.memory(), devices).expect("create");
    let mut precopy = PrecopyConfig::default();
    // The page cache takes the first round in tens of milliseconds, far faster than the
    // guest dirties: a low switchover bandwidth makes the driver run more rounds, so
    // pages are rewritten in place before the stop.
    precopy.downtime_limit = Duration::from_millis(2);
    precopy.switchover_bandwidth = Some(64 << 20);
    precopy.timeout = Some(Duration::from_secs(20));
    precopy.timeout_strategy = TimeoutStrategy::Force;
    let mut phases = Vec::new();
    let stats = Precopy::new(precopy)
        .run(
            writer,
            &mut guest.dirty_log(),
            &mut guest.control(),
            &mut |progress| phases.push(progress.phase),
        )
        .expect("live snapshot");
    assert!(!guest.is_running(), "the driver stopped the guest");
    assert!(guest.pages_written() > 0, "the guest wrote during the save");
    assert!(
        stats.rounds.len() >= 2,
        "dirty pages were rewritten in later rounds: {:?}",
        stats.rounds
    );
    assert_eq!(phases.last(), Some(&Phase::Done));

    // Every round rewrote pages in place: the file is the guest, the metadata area
    // (1 MiB), the block's alignment (under 1 MiB) and the device state.
    let length = std::fs::metadata(&path).expect("stat").len();
    let device_bytes = (device.state().len() + device.config().len()) as u64;
    assert!(
        length <= GUEST + (2 << 20) + device_bytes,
        "file of {length} bytes for a guest of {GUEST}"
    );

    let snapshot = Snapshot::open(&path).expect("open");
    let target = anonymous_memory("ram", GUEST).expect("memory");
    let sink = DeviceSink::with_capacity(device.state().len());
    let mut restore = RestoreConfig::default();
    restore.memory_zeroed = true;
    snapshot
        .restore(
            &restore,
            &target,
            vec![(DeviceId::new("vga", 0), Box::new(sink.clone()) as _)],
        )
        .expect("restore");
    assert_eq!(
        first_difference(&guest.memory().blocks()[0], &target.blocks()[0]),
        None,
        "the restored memory differs from the guest's at the stop"
    );
    let loaded = sink.loaded();
    assert!(loaded.state == *device.state(), "device state differs");
    assert_eq!(loaded.config.as_deref(), Some(device.config()));
}
