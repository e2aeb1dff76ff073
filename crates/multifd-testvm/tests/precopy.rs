//! The precopy driver end to end: a simulated guest whose writer threads keep dirtying
//! memory is live-migrated over a real socket to a destination thread, then the
//! destination's memory and devices are compared byte for byte with the source's at the
//! stop. Convergence, auto-converge, both timeout strategies, the bandwidth cap and
//! device pre-copy each get their own case.

use std::time::{Duration, Instant};

use multifd::{Address, DeviceId, Error, Phase, PrecopyProgress, PrecopyStats, TimeoutStrategy};
use multifd_testvm::{LocalMigration, LocalReport, PatternDevice, ThreadGuestConfig};

/// How far past the downtime limit a test accepts the measured downtime: the limit is an
/// estimate from the last round's bandwidth, and on a loaded 2-core CI host the stop, the
/// final drain and the confirmation can be scheduled late.
const DOWNTIME_TOLERANCE: Duration = Duration::from_millis(500);

fn guest(memory: u64, dirty_rate: u64) -> ThreadGuestConfig {
    let mut guest = ThreadGuestConfig::default();
    guest.memory = memory;
    guest.dirty_rate = dirty_rate;
    guest
}

fn migration(guest: ThreadGuestConfig) -> (LocalMigration, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("tempdir");
    let address: Address = format!("unix:{}", directory.path().join("live.sock").display())
        .parse()
        .expect("address");
    let mut migration = LocalMigration::new(guest, address);
    migration.source.channels = 2;
    (migration, directory)
}

fn run(migration: &LocalMigration) -> (LocalReport, Vec<PrecopyProgress>) {
    let mut seen = Vec::new();
    let report = migration
        .run(&mut |progress| seen.push(*progress))
        .expect("set up the local migration");
    (report, seen)
}

/// Asserts a verified success and returns the source's figures.
fn verified(report: LocalReport) -> PrecopyStats {
    let stats = report.result.expect("the live migration succeeds");
    report.destination.expect("the destination succeeds");
    assert_eq!(
        report.mismatch, None,
        "destination differs from the stopped source"
    );
    stats
}

#[test]
fn converges_at_a_low_dirty_rate_within_the_downtime_limit() {
    let (mut migration, _directory) = migration(guest(64 << 20, 4 << 20));
    migration.devices = vec![
        (DeviceId::new("vga", 0), PatternDevice::new(4 << 20, 7)),
        (DeviceId::new("rtc", 0), PatternDevice::new(4096, 8)),
    ];
    let (report, seen) = run(&migration);
    assert!(
        report.pages_written > 0,
        "the guest wrote during the migration"
    );
    let stats = verified(report);
    assert!(!stats.forced);
    assert!(!stats.rounds.is_empty());
    assert_eq!(stats.rounds[0].pages_sent, (64 << 20) / 4096);
    assert!(
        stats.downtime <= migration.precopy.downtime_limit + DOWNTIME_TOLERANCE,
        "downtime {:?}",
        stats.downtime
    );
    assert_eq!(stats.max_throttle_percent, 0);
    let phases: Vec<Phase> = seen.iter().map(|progress| progress.phase).collect();
    assert_eq!(phases.first(), Some(&Phase::Setup));
    assert!(phases.contains(&Phase::Switchover));
    assert_eq!(phases.last(), Some(&Phase::Done));
    assert_eq!(stats.migration.device_bytes, (4 << 20) + 4096 + 16);
}

/// A guest dirtying twice what the capped link moves: without throttling it never
/// converges; auto-converge throttles it until it does.
fn too_fast() -> (LocalMigration, tempfile::TempDir) {
    let (mut migration, directory) = migration(guest(32 << 20, 48 << 20));
    migration.source.max_bandwidth = Some(24 << 20);
    (migration, directory)
}

#[test]
fn auto_converge_throttles_a_guest_that_outruns_the_link() {
    let (mut migration, _directory) = too_fast();
    migration.precopy.auto_converge = true;
    migration.precopy.timeout = Some(Duration::from_secs(60));
    let (report, seen) = run(&migration);
    let stats = verified(report);
    assert!(!stats.forced);
    assert!(
        stats.max_throttle_percent >= 20,
        "{}",
        stats.max_throttle_percent
    );
    // The first step is sized from the measured rates: dirtying 2x the bandwidth needs
    // about 75% to bring the dirty rate under half the bandwidth, more than QEMU's 20%.
    let first = seen
        .iter()
        .map(|progress| progress.throttle_percent)
        .find(|&percent| percent > 0)
        .expect("a throttle was applied");
    assert!(first > 20, "first step {first}%");
}

#[test]
fn timeout_with_cancel_leaves_the_guest_running_on_the_source() {
    let (mut migration, _directory) = too_fast();
    migration.precopy.timeout = Some(Duration::from_millis(1500));
    migration.precopy.timeout_strategy = TimeoutStrategy::Cancel;
    let started = Instant::now();
    let (report, seen) = run(&migration);
    let error = report.result.expect_err("precopy cannot converge");
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("not converged within the timeout"),
        "{error}"
    );
    let destination = report.destination.expect_err("the destination fails too");
    assert!(
        destination
            .to_string()
            .contains("not converged within the timeout"),
        "{destination}"
    );
    assert!(report.source_running, "the guest runs on at the source");
    assert_eq!(
        seen.last().map(|progress| progress.phase),
        Some(Phase::Failed)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn timeout_with_force_switches_over_anyway() {
    let (mut migration, _directory) = too_fast();
    migration.precopy.timeout = Some(Duration::from_millis(1500));
    migration.precopy.timeout_strategy = TimeoutStrategy::Force;
    let (report, _) = run(&migration);
    let stats = verified(report);
    assert!(stats.forced);
}

#[test]
fn the_bandwidth_cap_holds_across_channels() {
    let (mut migration, _directory) = migration(guest(48 << 20, 0));
    migration.source.channels = 4;
    let cap = 16u64 << 20;
    migration.source.max_bandwidth = Some(cap);
    let (report, _) = run(&migration);
    let stats = verified(report);
    let round = stats.rounds[0];
    let rate = round.bytes as f64 / round.duration.as_secs_f64();
    // A loose bound: the benchmark gives the exact figure; this catches a cap ignored or
    // applied per channel (4x).
    assert!(
        rate < cap as f64 * 1.25 && rate > cap as f64 * 0.6,
        "{rate} bytes/s against a cap of {cap}"
    );
}

#[test]
fn device_precopy_is_counted_in_the_estimate_and_not_resent() {
    let (mut migration, _directory) = migration(guest(16 << 20, 1 << 20));
    let size = 8 << 20;
    migration.devices = vec![(
        DeviceId::new("gpu", 0),
        PatternDevice::new(size, 3).with_precopy_share(2 << 20),
    )];
    let (report, seen) = run(&migration);
    let stats = verified(report);
    // Every state byte once, plus the 8-byte config: nothing sent twice.
    assert_eq!(stats.migration.device_bytes, size as u64 + 8);
    let rounds = stats.rounds.len() as u64;
    let decision = seen
        .iter()
        .rev()
        .find(|progress| progress.phase == Phase::Switchover)
        .expect("a switchover");
    // What the devices still had to send went into the estimate.
    let precopied = (2u64 << 20) * rounds;
    assert_eq!(
        decision.pending_device_bytes,
        (size as u64).saturating_sub(precopied)
    );
}
