//! The self-checking guest in the KVM VMM: it boots and checks itself; its check catches a
//! page corrupted from the host; it keeps passing its checks after live migrations with 1
//! and 2 vCPUs (and 20 in a row); its vCPU state survives a save/load round trip register
//! by register; a page the migration loses is the exact page it reports; and the same
//! image boots under a BIOS in QEMU (when QEMU is installed). A local migration hands the
//! guest's memfd over instead of its pages: the guest runs on in the very same memory,
//! and is refused to a TCP address with the guest running on.
//!
//! Without `/dev/kvm` the tests print `SKIPPED` and pass, unless `MULTIFD_REQUIRE_KVM=1`.
#![cfg(target_arch = "x86_64")]

use std::io::Write;
use std::time::Duration;

use multifd::Address;
use multifd_testvm::kvm_available;
use multifd_testvm::{
    GuestImage, GuestProgress, KvmFault, KvmMigration, KvmMigrationReport, KvmVm, SerialLine,
    VcpuState, VmConfig,
};

/// Guest passes are milliseconds (unpaced) to a quarter second (paced); this bounds any
/// wait for a few of them on a loaded 2-core host.
const WAIT: Duration = Duration::from_secs(20);

/// A small VM: `memory` MiB, `vcpus`, 64 bytes checked per page, `rate` MiB/s (0:
/// unpaced), a 1 MiB frame buffer.
fn config(memory: u64, vcpus: u8, rate: u64) -> VmConfig {
    let mut config = VmConfig::new(memory << 20, vcpus);
    config.write_bytes = 64;
    config.dirty_rate = rate << 20;
    config.frame_buffer = 1 << 20;
    config
}

fn unix_address(directory: &tempfile::TempDir, name: &str) -> Address {
    format!("unix:{}", directory.path().join(name).display())
        .parse()
        .expect("address")
}

/// A loopback TCP address with a port that was free a moment ago.
fn tcp_address() -> Address {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    format!("tcp:127.0.0.1:{port}").parse().expect("address")
}

fn assert_clean(vm: &KvmVm, progress: &GuestProgress) {
    assert!(
        progress.errors.is_empty(),
        "guest errors {:?}; last lines {:?}",
        progress.errors,
        vm.serial_lines()
    );
    assert!(vm.vcpu_failures().is_empty(), "{:?}", vm.vcpu_failures());
}

#[test]
fn the_guest_boots_and_checks_itself_on_every_vcpu() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let mut config = config(32, 2, 0);
    config.serial = Some(directory.path().join("serial.log"));
    let vm = KvmVm::start(&config).expect("start the VM");
    let first = vm
        .wait_for_passes(&GuestProgress::default(), 3, WAIT)
        .expect("passes");
    let later = vm.wait_for_passes(&first, 5, WAIT).expect("more passes");
    assert_clean(&vm, &later);
    assert_eq!(later.passes.len(), 2);
    assert!(later
        .passes
        .iter()
        .zip(&first.passes)
        .all(|(now, then)| now >= &(then + 5)));
    vm.pause().expect("pause");
    assert!(!vm.is_running());
    assert!(
        vm.frame_buffer().generation() > 0,
        "the frame buffer follows"
    );
    vm.frame_buffer().verify().expect("frame buffer consistent");
    let log = std::fs::read_to_string(directory.path().join("serial.log")).expect("log");
    assert!(log.lines().any(|line| line.starts_with("P0 ")), "{log}");
    assert!(log.lines().any(|line| line.starts_with("P1 ")), "{log}");
    // Paused, nothing moves.
    let paused = vm.progress();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.progress().passes, paused.passes);
    vm.resume();
    vm.wait_for_passes(&paused, 2, WAIT).expect("runs again");
}

#[test]
fn a_guest_with_a_pass_count_halts_after_it() {
    if !kvm_available() {
        return;
    }
    let mut config = config(8, 2, 0);
    config.passes = 3;
    let vm = KvmVm::start(&config).expect("start the VM");
    let progress = vm
        .wait_for_passes(&GuestProgress::default(), 3, WAIT)
        .expect("three passes");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.progress().passes, vec![3, 3]);
    assert_eq!(vm.halted_vcpus(), vec![true, true]);
    assert_clean(&vm, &progress);
}

#[test]
fn a_page_corrupted_from_the_host_is_reported_exactly() {
    if !kvm_available() {
        return;
    }
    let vm = KvmVm::start(&config(16, 1, 0)).expect("start the VM");
    let progress = vm
        .wait_for_passes(&GuestProgress::default(), 2, WAIT)
        .expect("passes");
    // A word inside the 64 bytes checked, in the middle of the range.
    let address = (8 << 20) + 0x5000 + 16;
    let bogus = 0xdead_beef_u32;
    // The write can land between the guest's check and its write of that same page (a
    // window of nanoseconds per pass); then the guest overwrites it: try again.
    let mut reported = None;
    for _ in 0..10 {
        vm.write_guest(address, &bogus.to_le_bytes())
            .expect("write");
        if let Ok(progress) =
            vm.wait_for(Duration::from_secs(2), "an error", |p| !p.errors.is_empty())
        {
            reported = Some(progress);
            break;
        }
    }
    let reported = reported.expect("the guest reports the corrupted page");
    let error = reported.errors[0];
    assert_eq!(error.address, address);
    assert_eq!(error.found, bogus);
    assert!(error.expected >= progress.passes[0], "{error:?}");
    assert_eq!(error.vcpu, 0);
    // The vCPU stops after reporting.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.halted_vcpus(), vec![true]);
    assert!(vm.vcpu_failures().is_empty());
}

/// Migrates `vm` and checks the guest goes on on the destination from where it stopped.
fn migrate_and_check(vm: &KvmVm, migration: &KvmMigration) -> (KvmVm, KvmMigrationReport) {
    let (destination, report) = migration.migrate(vm, &mut |_| {}).expect("migration");
    assert!(!vm.is_running(), "the source stays stopped");
    let before = report.before.clone();
    assert_clean(vm, &before);
    // Passes continue from the source's counters on every vCPU.
    let after = destination
        .wait_for_passes(&before, 2, WAIT)
        .expect("the guest runs on the destination");
    assert_clean(&destination, &after);
    assert!(after
        .passes
        .iter()
        .zip(&before.passes)
        .all(|(after, before)| after >= &(before + 2)));
    (destination, report)
}

fn live_migration(vcpus: u8, address: Address) {
    let vm = KvmVm::start(&config(64, vcpus, 256)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 2, WAIT)
        .expect("passes before the migration");
    let mut migration = KvmMigration::new(address);
    migration.source.channels = 2;
    let (destination, report) = migrate_and_check(&vm, &migration);
    assert!(!report.precopy.rounds.is_empty());
    assert!(report.precopy.migration.bytes >= 1 << 20);
    // After round 0 only what the guest dirtied moves, never the whole guest again.
    let pages = (64 << 20) / 4096;
    assert_eq!(report.precopy.rounds[0].pages_sent, pages);
    for round in &report.precopy.rounds[1..] {
        assert!(round.pages_sent < pages / 2, "{round:?}");
    }
    assert!(report.precopy.final_pages < pages / 2);
    assert!(
        report.precopy.downtime < Duration::from_secs(2),
        "{report:?}"
    );
    destination.pause().expect("pause the destination");
    destination
        .frame_buffer()
        .verify()
        .expect("frame buffer consistent");
    assert!(destination.frame_buffer().generation() >= vm.frame_buffer().generation());
}

#[test]
fn live_migration_with_one_vcpu_over_a_unix_socket() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    live_migration(1, unix_address(&directory, "one.sock"));
}

#[test]
fn live_migration_with_two_vcpus_over_tcp() {
    if !kvm_available() {
        return;
    }
    live_migration(2, tcp_address());
}

#[test]
fn vcpu_state_round_trips_register_by_register() {
    if !kvm_available() {
        return;
    }
    let config = config(16, 2, 64);
    let vm = KvmVm::start(&config).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 1, WAIT)
        .expect("passes");
    vm.pause().expect("pause");
    let fresh = KvmVm::incoming(&config).expect("a fresh VM");
    for index in 0..2 {
        let saved = vm.vcpu_state(index).expect("save");
        assert_eq!(saved.sregs.cr0 & 1, 1, "in protected mode");
        let decoded = VcpuState::decode(&saved.encode()).expect("decode");
        fresh.set_vcpu_state(index, &decoded).expect("load");
        let again = fresh.vcpu_state(index).expect("save again");
        assert_eq!(again.regs, saved.regs, "vCPU {index} regs");
        assert_eq!(again.sregs, saved.sregs, "vCPU {index} sregs");
        assert_eq!(again.xcrs, saved.xcrs, "vCPU {index} xcrs");
        assert_eq!(again.xsave.region, saved.xsave.region, "vCPU {index} xsave");
        assert_eq!(again.events, saved.events, "vCPU {index} events");
        assert_eq!(again.mp_state, saved.mp_state, "vCPU {index} mp state");
        assert_eq!(
            again.debug_regs, saved.debug_regs,
            "vCPU {index} debug regs"
        );
        assert_eq!(again.msrs.len(), saved.msrs.len());
        assert!(saved.msrs.len() > 10, "KVM lists the usual MSRs");
        for (&(index_again, value_again), &(msr, value)) in again.msrs.iter().zip(&saved.msrs) {
            assert_eq!(index_again, msr);
            if msr == 0x10 {
                // IA32_TSC keeps counting in a stopped vCPU: later, and within a second.
                assert!(
                    value_again >= value && value_again - value < vm.tsc_hz(),
                    "TSC"
                );
            } else {
                assert_eq!(value_again, value, "MSR {msr:#x} of vCPU {index}");
            }
        }
        let blob = saved.encode();
        for length in (0..blob.len()).step_by(7) {
            assert!(
                VcpuState::decode(&blob[..length]).is_err(),
                "{length} bytes"
            );
        }
        for byte in [0, 4, 6, 8, 10] {
            let mut garbled = blob.clone();
            garbled[byte] ^= 0x10;
            assert!(VcpuState::decode(&garbled).is_err(), "byte {byte} flipped");
        }
    }
}

#[test]
fn a_page_lost_by_the_migration_is_the_page_the_guest_reports() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let vm = KvmVm::start(&config(32, 1, 256)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 2, WAIT)
        .expect("passes");
    let lost = (4 << 20) + 7 * 4096;
    let mut migration = KvmMigration::new(unix_address(&directory, "lost.sock"));
    migration.source.channels = 2;
    migration.fault = Some(KvmFault::LoseDirtyPage(lost));
    let (destination, report) = migration.migrate(&vm, &mut |_| {}).expect("migration");
    assert!(report.before.errors.is_empty());
    let reported = destination
        .wait_for(WAIT, "the guest reports the lost page", |p| {
            !p.errors.is_empty()
        })
        .expect("an error");
    let error = reported.errors[0];
    assert_eq!(error.page(), lost, "{error:?}");
    assert_eq!(error.address, lost, "the first word is already stale");
    assert!(error.found < error.expected, "{error:?}");
    // What the source had there when it stopped is newer than what the guest found.
    assert!(vm.read_guest_u32(lost).expect("read") > error.found);
}

#[test]
fn twenty_ping_pong_migrations_in_a_row() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let mut vm = KvmVm::start(&config(64, 2, 256)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 1, WAIT)
        .expect("passes");
    let mut downtimes = Vec::new();
    for round in 0..20 {
        let mut migration =
            KvmMigration::new(unix_address(&directory, &format!("pingpong-{round}.sock")));
        migration.source.channels = 2;
        let (destination, report) = migrate_and_check(&vm, &migration);
        downtimes.push(report.precopy.downtime);
        vm = destination;
    }
    let progress = vm.progress();
    assert_clean(&vm, &progress);
    downtimes.sort();
    let _ = writeln!(
        std::io::stderr(),
        "20 ping-pong migrations: downtime p50 {:?}, max {:?}; passes {:?}",
        downtimes[10],
        downtimes[19],
        progress.passes
    );
}

/// Kills and reaps QEMU however the test ends.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_same_image_boots_under_a_bios_in_qemu() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let mut image = GuestImage::new(16 << 20);
    image.write_bytes = 64;
    // Patched for 2 vCPUs: under a BIOS the image still runs one.
    image.vcpus = 2;
    let disk = directory.path().join("guest.img");
    std::fs::write(&disk, image.build().expect("image")).expect("write the image");
    let serial = directory.path().join("serial.log");
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-accel", "kvm", "-machine", "pc", "-smp", "1", "-m", "16M"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw", disk.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let _qemu = match qemu {
        Ok(child) => Qemu(child),
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: qemu-system-x86_64 does not start ({error})"
            );
            return;
        }
    };
    let deadline = std::time::Instant::now() + WAIT;
    let log = loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        let passes = log
            .lines()
            .filter_map(SerialLine::parse)
            .filter(|line| matches!(line, SerialLine::Pass { vcpu: 0, .. }))
            .count();
        if passes >= 3 || std::time::Instant::now() >= deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<SerialLine> = log.lines().filter_map(SerialLine::parse).collect();
    assert!(
        lines.iter().take(3).eq([1, 2, 3]
            .map(|pass| SerialLine::Pass { vcpu: 0, pass })
            .iter()),
        "QEMU's serial log: {log:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|line| matches!(line, SerialLine::Mismatch(_))),
        "{log:?}"
    );
}

#[test]
fn the_throttle_slows_the_guest_and_a_stop_still_stops_it() {
    if !kvm_available() {
        return;
    }
    use multifd::VmControl;
    // 1 MiB to check and write: many passes a second, so the rates compare well.
    let vm = KvmVm::start(&config(2, 1, 0)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 1, WAIT)
        .expect("passes");
    let passes_in = |span: Duration| {
        let before = vm.progress().passes[0];
        std::thread::sleep(span);
        vm.progress().passes[0] - before
    };
    let span = Duration::from_millis(1000);
    let full = passes_in(span);
    let mut control = vm.control();
    control.throttle(80);
    let throttled = passes_in(span);
    let started = std::time::Instant::now();
    control.stop().expect("stop while throttled");
    let stop_time = started.elapsed();
    let _ = writeln!(
        std::io::stderr(),
        "throttle: {full} passes/s at full speed, {throttled} at 80%, stop in {stop_time:?}"
    );
    assert!(full >= 10, "the unthrottled guest makes progress: {full}");
    assert!(
        throttled * 2 < full,
        "80% throttle: {throttled} passes against {full}"
    );
    assert!(stop_time < Duration::from_secs(1), "{stop_time:?}");
    control.resume();
    let resumed = passes_in(span);
    assert!(
        resumed * 2 > full,
        "full speed again: {resumed} against {full}"
    );
    assert_clean(&vm, &vm.progress());
}

#[test]
fn a_failed_migration_leaves_the_guest_running_on_the_source() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let vm = KvmVm::start(&config(16, 1, 64)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 1, WAIT)
        .expect("passes");
    let mut migration = KvmMigration::new(unix_address(&directory, "failed.sock"));
    // Never within a zero downtime limit, and out of time at once: cancelled.
    migration.precopy.downtime_limit = Duration::ZERO;
    migration.precopy.timeout = Some(Duration::ZERO);
    let error = migration
        .migrate(&vm, &mut |_| {})
        .expect_err("the migration is cancelled");
    assert!(error.to_string().contains("timeout"), "{error}");
    assert!(vm.is_running());
    let progress = vm
        .wait_for_passes(&vm.progress(), 2, WAIT)
        .expect("the guest runs on");
    assert_clean(&vm, &progress);
}

#[test]
fn a_guest_that_never_exits_still_stops_and_shuts_down_at_once() {
    if !kvm_available() {
        return;
    }
    // 1 MiB/s over 15 MiB: a pass (and its serial line, the only exit) every 15 s.
    let vm = KvmVm::start(&config(16, 2, 1)).expect("start the VM");
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    vm.pause().expect("pause");
    let paused = started.elapsed();
    vm.resume();
    std::thread::sleep(Duration::from_millis(100));
    let started = std::time::Instant::now();
    drop(vm);
    let dropped = started.elapsed();
    assert!(paused < Duration::from_secs(1), "pause took {paused:?}");
    assert!(dropped < Duration::from_secs(1), "drop took {dropped:?}");
}

/// Migrates a running guest to a destination that refuses its VM state, which comes
/// after the stop, and checks the guest then runs on at the source with every check
/// passing; returns whether the driver had reached the switchover.
fn a_refused_vm_state_resumes_the_source(local: bool) -> bool {
    let directory = tempfile::tempdir().expect("tempdir");
    let vm = KvmVm::start(&config(32, 2, 128)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 1, WAIT)
        .expect("passes");
    let mut migration = KvmMigration::new(unix_address(&directory, "refused.sock"));
    migration.local = local;
    migration.fault = Some(KvmFault::RefuseVmState);
    let mut stopped = false;
    let error = migration
        .migrate(&vm, &mut |progress| {
            stopped |= progress.phase == multifd::Phase::Switchover;
        })
        .expect_err("the destination refuses the VM state");
    assert!(error.to_string().contains("RefuseVmState"), "{error}");
    assert!(vm.is_running());
    let progress = vm
        .wait_for_passes(&vm.progress(), 2, WAIT)
        .expect("the guest runs on at the source");
    assert_clean(&vm, &progress);
    stopped
}

#[test]
fn a_migration_failing_after_the_stop_resumes_the_guest_on_the_source() {
    if !kvm_available() {
        return;
    }
    assert!(
        a_refused_vm_state_resumes_the_source(false),
        "the failure came after the stop"
    );
}

/// The guest's pages are the same memory on both sides of a local migration: same file,
/// and a host write on one side shows on the other.
fn assert_same_memory(source: &KvmVm, destination: &KvmVm, address: u64, word: u32) {
    use std::os::unix::fs::MetadataExt;
    let inode = |vm: &KvmVm| {
        let metadata = vm.memory_file().metadata().expect("memfd metadata");
        (metadata.dev(), metadata.ino())
    };
    assert_eq!(inode(destination), inode(source), "the same memfd");
    destination
        .write_guest(address, &word.to_le_bytes())
        .expect("write");
    assert_eq!(source.read_guest_u32(address).expect("read"), word);
}

#[test]
fn local_migration_hands_a_running_guest_its_own_memory() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let vm = KvmVm::start(&config(64, 2, 256)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 2, WAIT)
        .expect("passes before the migration");
    let mut migration = KvmMigration::new(unix_address(&directory, "local.sock"));
    migration.local = true;
    migration.source.channels = 2;
    let (first, report) = migrate_and_check(&vm, &migration);
    assert!(report.precopy.rounds.is_empty(), "{report:?}");
    assert_eq!(report.precopy.final_pages, 0);
    let sent = &report.precopy.migration;
    assert_eq!(sent.normal_pages + sent.zero_pages, 0, "no RAM page sent");
    let received = &report.destination;
    assert_eq!(received.normal_pages + received.zero_pages, 0);
    // Past the 64 bytes the guest checks in each page: it never writes there.
    assert_same_memory(&vm, &first, (8 << 20) + 0x800, 0xfeed_f00d);
    // The source never runs again, whatever asks it to.
    let stopped = vm.progress();
    vm.resume();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!vm.is_running());
    assert_eq!(vm.progress().passes, stopped.passes);

    // The adopted memory moves on: locally once more, then over TCP with KVM's dirty
    // log on the switched slot (the guest's checks prove every page arrived).
    migration.address = unix_address(&directory, "again.sock");
    let (second, _) = migrate_and_check(&first, &migration);
    assert_same_memory(&vm, &second, (8 << 20) + 0x1800, 0x0bad_cafe);
    let mut copy = KvmMigration::new(tcp_address());
    copy.source.channels = 2;
    let (third, report) = migrate_and_check(&second, &copy);
    assert!(report.precopy.rounds[0].pages_sent > 0, "{report:?}");
    let progress = third.progress();
    assert_clean(&third, &progress);
}

#[test]
fn local_migration_to_a_tcp_address_is_refused_and_the_guest_runs_on() {
    if !kvm_available() {
        return;
    }
    let vm = KvmVm::start(&config(16, 1, 64)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 1, WAIT)
        .expect("passes");
    let mut migration = KvmMigration::new(tcp_address());
    migration.local = true;
    let error = migration
        .migrate(&vm, &mut |_| {})
        .expect_err("no descriptors over TCP");
    assert!(
        error
            .to_string()
            .contains("local memory needs a unix: address"),
        "{error}"
    );
    assert!(vm.is_running());
    let progress = vm
        .wait_for_passes(&vm.progress(), 2, WAIT)
        .expect("the guest runs on");
    assert_clean(&vm, &progress);
}

#[test]
fn a_local_migration_failing_after_the_stop_resumes_the_guest_on_the_source() {
    if !kvm_available() {
        return;
    }
    a_refused_vm_state_resumes_the_source(true);
}

/// A live snapshot of a running guest: the guest runs on at the source, and a fresh VM
/// restored from the file resumes from the snapshot's passes with every check passing, so
/// every page the guest wrote before the stop is in the file.
#[test]
fn a_live_snapshot_restores_into_a_new_vm_that_keeps_checking_itself() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("guest.snap");
    let vm = KvmVm::start(&config(64, 2, 64)).expect("start the VM");
    vm.wait_for_passes(&GuestProgress::default(), 2, WAIT)
        .expect("passes before the snapshot");
    let stats = multifd_testvm::snapshot(
        &vm,
        &path,
        &multifd::SnapshotConfig::default(),
        &multifd::PrecopyConfig::default(),
        &mut |_| {},
    )
    .expect("snapshot");
    assert!(!stats.rounds.is_empty(), "a live save runs rounds");
    let after = vm.progress();
    let progress = vm
        .wait_for_passes(&after, 1, WAIT)
        .expect("the source runs on");
    assert_clean(&vm, &progress);
    drop(vm);

    let restored = KvmVm::incoming(&config(64, 2, 64)).expect("incoming VM");
    multifd_testvm::restore(&restored, &path).expect("restore");
    let arrived = restored.progress();
    assert!(
        arrived.passes.iter().all(|&passes| passes >= 2),
        "{arrived:?}"
    );
    let progress = restored
        .wait_for_passes(&arrived, 2, WAIT)
        .expect("the restored guest runs on");
    assert_clean(&restored, &progress);
}
