//! Snapshot files: byte-exact round trips of RAM (zero and non-zero pages, several blocks,
//! 1 and 4 threads, with and without `O_DIRECT` on both sides) and device state, lazy restore, the
//! file's size, and every kind of bad file, each with its exact error and the target
//! memory untouched.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{block, bytes, bytes_mut, fill_mixed, PAGE};
use multifd::bench_internals::{snapshot_metadata_len, SnapshotMetadata};
use multifd::{
    DeviceError, DeviceId, Error, GuestMemory, LoadDevice, LoadDevices, RestoreConfig, SaveDevice,
    SaveDevices, Snapshot, SnapshotConfig, SnapshotFault, SnapshotWriter, StateWriter,
};

/// 1 MiB: the format's alignment of blocks and of the device area.
const MIB: u64 = 1 << 20;

/// A device whose state is a seeded pattern, with a small config blob.
struct PatternSave {
    state: Vec<u8>,
    config: Vec<u8>,
}

impl SaveDevice for PatternSave {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        // Uneven writes, so the device area's buffering is crossed at odd places.
        for piece in self.state.chunks(100_003) {
            state.write_all(piece)?;
        }
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(self.config.clone())
    }
}

/// What a loaded device received.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Loaded {
    state: Vec<u8>,
    config: Option<Vec<u8>>,
}

#[derive(Clone, Default)]
struct PatternLoad(Arc<Mutex<Loaded>>);

impl LoadDevice for PatternLoad {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        self.0.lock().expect("lock").state.extend_from_slice(chunk);
        Ok(())
    }

    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError> {
        self.0.lock().expect("lock").config = Some(config.to_vec());
        Ok(())
    }
}

fn pattern(length: usize, seed: u64) -> Vec<u8> {
    (0..length)
        .map(|index| {
            (index as u64)
                .wrapping_mul(seed | 1)
                .wrapping_add(seed >> 3) as u8
        })
        .collect()
}

/// The devices of every test: 3 MiB and a few bytes of state, and a device with no state.
fn device_specs() -> Vec<(DeviceId, Vec<u8>, Vec<u8>)> {
    vec![
        (
            DeviceId::new("0000:00:02.0/vfio", 0),
            pattern(3 * MIB as usize + 17, 5),
            pattern(300, 6),
        ),
        (DeviceId::new("rtc", 1), Vec::new(), pattern(16, 7)),
    ]
}

fn save_devices() -> SaveDevices {
    device_specs()
        .into_iter()
        .map(|(id, state, config)| {
            (
                id,
                Box::new(PatternSave { state, config }) as Box<dyn SaveDevice>,
            )
        })
        .collect()
}

fn load_devices() -> (LoadDevices, Vec<PatternLoad>) {
    let sinks: Vec<PatternLoad> = device_specs()
        .iter()
        .map(|_| PatternLoad::default())
        .collect();
    let devices = device_specs()
        .into_iter()
        .zip(&sinks)
        .map(|((id, _, _), sink)| (id, Box::new(sink.clone()) as Box<dyn LoadDevice>))
        .collect();
    (devices, sinks)
}

fn assert_devices_loaded(sinks: &[PatternLoad]) {
    for ((id, state, config), sink) in device_specs().into_iter().zip(sinks) {
        let loaded = sink.0.lock().expect("lock").clone();
        assert!(loaded.state == state, "device {id}: state differs");
        assert_eq!(loaded.config, Some(config), "device {id}: config");
    }
}

/// Three blocks: mixed pages, mixed pages of a length that is not a whole MiB, and an
/// all-zero block.
fn source_memory() -> GuestMemory {
    let ram = block("pc.ram", 8 << 20);
    fill_mixed(&ram, 11);
    let vram = block("vga.vram", (1 << 20) + 3 * PAGE);
    fill_mixed(&vram, 12);
    let rom = block("pc.rom", 64 << 10);
    GuestMemory::new(vec![ram, vram, rom]).expect("memory")
}

/// Blocks like `source`'s, filled with 0xa5 so any page the restore fails to write or
/// to zero shows.
fn dirty_target_like(source: &GuestMemory) -> GuestMemory {
    let target = common::empty_like(source);
    for block in target.blocks() {
        bytes_mut(block).fill(0xa5);
    }
    target
}

fn guest_bytes(memory: &GuestMemory) -> u64 {
    memory.blocks().iter().map(|block| block.len()).sum()
}

fn non_zero_bytes(memory: &GuestMemory) -> u64 {
    memory
        .blocks()
        .iter()
        .flat_map(|block| bytes(block).chunks(PAGE))
        .filter(|page| page.iter().any(|&byte| byte != 0))
        .count() as u64
        * PAGE as u64
}

fn assert_same_memory(expected: &GuestMemory, actual: &GuestMemory) {
    for (expected, actual) in expected.blocks().iter().zip(actual.blocks()) {
        assert_eq!(expected.name(), actual.name());
        assert!(
            bytes(expected) == bytes(actual),
            "block {:?} differs",
            expected.name()
        );
    }
}

fn save(path: &Path, memory: &GuestMemory, threads: u8, direct_io: bool) -> Result<(), Error> {
    let mut config = SnapshotConfig::default();
    config.threads = threads;
    config.direct_io = direct_io;
    let mut writer = SnapshotWriter::create(path, &config, memory.clone(), save_devices())?;
    for index in 0..memory.blocks().len() {
        writer.queue_block(index)?;
    }
    let stats = writer.complete()?;
    assert_eq!(stats.normal_pages * PAGE as u64, non_zero_bytes(memory));
    assert_eq!(
        (stats.normal_pages + stats.zero_pages) * PAGE as u64,
        guest_bytes(memory)
    );
    assert_eq!(stats.channels.len(), usize::from(threads));
    Ok(())
}

fn restore(
    path: &Path,
    target: &GuestMemory,
    threads: u8,
    memory_zeroed: bool,
    direct_io: bool,
) -> Vec<PatternLoad> {
    let snapshot = Snapshot::open(path).expect("open the snapshot");
    let (devices, sinks) = load_devices();
    let mut config = RestoreConfig::default();
    config.threads = threads;
    config.memory_zeroed = memory_zeroed;
    config.direct_io = direct_io;
    let stats = snapshot.restore(&config, target, devices).expect("restore");
    assert_eq!(stats.normal_pages, snapshot.present_pages());
    sinks
}

/// The most a file may take beyond the guest's bytes: the metadata area (1 MiB here) and
/// up to 1 MiB of alignment per block, plus the device state.
fn metadata_allowance(memory: &GuestMemory) -> u64 {
    let devices: u64 = device_specs()
        .iter()
        .map(|(_, state, config)| (state.len() + config.len()) as u64)
        .sum();
    MIB + memory.blocks().len() as u64 * MIB + devices
}

fn round_trip(threads: u8, direct_io: bool) {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("vm.snap");
    let memory = source_memory();
    match save(&path, &memory, threads, direct_io) {
        Ok(()) => {}
        Err(Error::SnapshotIo {
            context, source, ..
        }) if direct_io
            && context.starts_with("open with O_DIRECT")
            && source.kind() == std::io::ErrorKind::InvalidInput =>
        {
            eprintln!(
                "SKIPPED: O_DIRECT is not supported in {} ({context}: {source})",
                directory.path().display()
            );
            return;
        }
        Err(error) => panic!("save: {error}"),
    }
    let file = std::fs::metadata(&path).expect("stat");
    assert!(
        file.len() <= guest_bytes(&memory) + metadata_allowance(&memory),
        "file of {} bytes for a guest of {}",
        file.len(),
        guest_bytes(&memory)
    );
    // Zero pages are holes: the disk holds the non-zero pages, the metadata and devices
    // (with O_DIRECT the blocks are preallocated, zero pages unwritten but allocated).
    let data = if direct_io {
        guest_bytes(&memory)
    } else {
        non_zero_bytes(&memory)
    };
    assert!(
        file.blocks() * 512 <= data + metadata_allowance(&memory),
        "{} bytes allocated for {} non-zero bytes",
        file.blocks() * 512,
        non_zero_bytes(&memory)
    );
    let target = dirty_target_like(&memory);
    let sinks = restore(&path, &target, threads, false, direct_io);
    assert_same_memory(&memory, &target);
    assert_devices_loaded(&sinks);
}

#[test]
fn round_trip_one_thread() {
    round_trip(1, false);
}

#[test]
fn round_trip_four_threads() {
    round_trip(4, false);
}

#[test]
fn round_trip_one_thread_direct_io() {
    round_trip(1, true);
}

#[test]
fn round_trip_four_threads_direct_io() {
    round_trip(4, true);
}

#[test]
fn restore_into_zeroed_memory_skips_zero_pages_and_stays_exact() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("vm.snap");
    let memory = source_memory();
    save(&path, &memory, 2, false).expect("save");
    // With O_DIRECT a job is read in one request, holes included.
    for direct_io in [false, true] {
        let target = common::empty_like(&memory);
        let sinks = restore(&path, &target, 2, true, direct_io);
        assert_same_memory(&memory, &target);
        assert_devices_loaded(&sinks);
    }
}

#[test]
fn a_rewritten_page_that_turned_to_zeros_reads_as_zeros() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("vm.snap");
    let ram = block("ram", 1 << 20);
    bytes_mut(&ram).fill(0x77);
    let memory = GuestMemory::new(vec![ram.clone()]).expect("memory");
    let mut writer = SnapshotWriter::create(
        &path,
        &SnapshotConfig::default(),
        memory.clone(),
        Vec::new(),
    )
    .expect("create");
    writer.queue_block(0).expect("queue");
    writer.end_round().expect("round 0");
    // The guest zeroes page 3 after round 0; a second round sends it again.
    bytes_mut(&ram)[3 * PAGE..4 * PAGE].fill(0);
    writer.queue_page(0, 3 * PAGE as u64).expect("queue");
    writer.complete().expect("complete");
    let snapshot = Snapshot::open(&path).expect("open");
    assert_eq!(snapshot.present_pages(), 255);
    // Lazily mapped, the page is read from the file itself: it must be a hole now.
    let lazy = snapshot.restore_lazy(Vec::new()).expect("lazy restore");
    assert_same_memory(&memory, &lazy.memory);
}

#[test]
fn lazy_restore_maps_the_file_privately() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("vm.snap");
    let memory = source_memory();
    save(&path, &memory, 2, false).expect("save");
    let before = std::fs::read(&path).expect("read");
    let snapshot = Snapshot::open(&path).expect("open");
    let (devices, sinks) = load_devices();
    let lazy = snapshot.restore_lazy(devices).expect("lazy restore");
    assert!(lazy.memory_ready <= lazy.total_time);
    assert_same_memory(&memory, &lazy.memory);
    assert_devices_loaded(&sinks);
    // The guest writes its memory: the file does not change.
    for block in lazy.memory.blocks() {
        bytes_mut(block).fill(0x3c);
    }
    drop(lazy);
    assert!(std::fs::read(&path).expect("read") == before);
}

// ----------------------------------------------------------------------------------------
// Bad files: each one a `BadSnapshot` naming what is wrong, nothing written to the target.
// ----------------------------------------------------------------------------------------

/// A valid snapshot of `source_memory()` with the two devices, in a fresh directory.
fn saved() -> (tempfile::TempDir, std::path::PathBuf, GuestMemory) {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("vm.snap");
    let memory = source_memory();
    save(&path, &memory, 2, false).expect("save");
    (directory, path, memory)
}

fn metadata_of(path: &Path) -> SnapshotMetadata {
    let bytes = std::fs::read(path).expect("read");
    let length = snapshot_metadata_len(&bytes, bytes.len() as u64).expect("metadata length");
    SnapshotMetadata::parse(&bytes[..length as usize], bytes.len() as u64).expect("metadata")
}

/// Rewrites the metadata with valid CRCs after `change`.
fn rewrite_metadata(path: &Path, change: impl FnOnce(&mut SnapshotMetadata)) {
    let mut metadata = metadata_of(path);
    change(&mut metadata);
    let file = OpenOptions::new().write(true).open(path).expect("open");
    file.write_all_at(&metadata.encode(), 0).expect("write");
}

fn flip_byte(path: &Path, at: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).expect("read");
    byte[0] ^= 0x10;
    file.write_all_at(&byte, at).expect("write");
}

fn fault(error: &Error) -> SnapshotFault {
    error
        .snapshot_fault()
        .unwrap_or_else(|| panic!("not a bad-snapshot error: {error}"))
        .clone()
}

/// Opens `path` (and, if that passes, restores it into a target filled with 0xa5), and
/// returns the fault; the target must be untouched.
fn open_or_restore_fault(path: &Path, memory: &GuestMemory) -> SnapshotFault {
    let target = dirty_target_like(memory);
    let error = match Snapshot::open(path) {
        Err(error) => error,
        Ok(snapshot) => {
            let (devices, _) = load_devices();
            snapshot
                .restore(&RestoreConfig::default(), &target, devices)
                .expect_err("a bad snapshot must not restore")
        }
    };
    for block in target.blocks() {
        assert!(
            bytes(block).iter().all(|&byte| byte == 0xa5),
            "block {:?} was written before the file was found bad",
            block.name()
        );
    }
    let message = error.to_string();
    assert!(message.contains("vm.snap"), "names the file: {message}");
    fault(&error)
}

#[test]
fn a_truncated_file_is_refused() {
    let (_directory, path, memory) = saved();
    let length = std::fs::metadata(&path).expect("stat").len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(length - 1)
        .expect("truncate");
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::Truncated {
            what: "file (header field file_len)".into(),
            needed: length,
            available: length - 1,
        }
    );
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(20)
        .expect("truncate");
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::Truncated {
            what: "header".into(),
            needed: 40,
            available: 20,
        }
    );
}

#[test]
fn a_wrong_magic_is_refused() {
    let (_directory, path, memory) = saved();
    flip_byte(&path, 0);
    let mut found = *b"MFDSNAP\n";
    found[0] ^= 0x10;
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::BadMagic { found }
    );
}

#[test]
fn an_unfinished_save_has_no_magic() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("vm.snap");
    let memory = source_memory();
    let mut writer = SnapshotWriter::create(
        &path,
        &SnapshotConfig::default(),
        memory.clone(),
        Vec::new(),
    )
    .expect("create");
    writer.queue_block(0).expect("queue");
    writer.end_round().expect("round");
    drop(writer);
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::BadMagic { found: [0; 8] }
    );
}

#[test]
fn a_wrong_version_is_refused() {
    let (_directory, path, memory) = saved();
    flip_byte(&path, 11);
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::UnsupportedVersion {
            found: 0x11,
            supported: 1
        }
    );
}

#[test]
fn a_corrupted_header_is_refused() {
    let (_directory, path, memory) = saved();
    // A byte of the first block's name.
    flip_byte(&path, 41);
    assert!(matches!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::ChecksumMismatch { what, .. } if what == "header"
    ));
}

#[test]
fn a_corrupted_bitmap_is_refused() {
    let (_directory, path, memory) = saved();
    let bitmap = metadata_of(&path).blocks[1].bitmap_offset;
    flip_byte(&path, bitmap + 5);
    assert!(matches!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::ChecksumMismatch { what, .. } if what == "block \"vga.vram\" bitmap"
    ));
}

#[test]
fn a_corrupted_device_blob_is_refused_before_any_page_is_written() {
    let (_directory, path, memory) = saved();
    let device = metadata_of(&path).devices[0].clone();
    flip_byte(&path, device.offset + device.state_len / 2);
    assert!(matches!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::ChecksumMismatch { what, .. }
            if what == "device \"0000:00:02.0/vfio\" instance 0"
    ));
}

#[test]
fn a_block_past_the_end_of_the_file_is_refused() {
    let (_directory, path, memory) = saved();
    rewrite_metadata(&path, |metadata| metadata.blocks[2].length = 1 << 40);
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::InvalidField {
            field: "block \"pc.rom\" file_offset".into(),
            value: metadata_of_offset(&path, 2),
            reason: "the block does not fit in the file (past file_len)",
        }
    );
}

/// A block's file offset, read from the raw table (the file may no longer parse).
fn metadata_of_offset(path: &Path, block: u64) -> u64 {
    let file = std::fs::File::open(path).expect("open");
    let mut offset = [0u8; 8];
    // Fixed header 40 bytes, entries of 284: name 256, length 8, then the offset.
    file.read_exact_at(&mut offset, 40 + block * 284 + 264)
        .expect("read");
    u64::from_be_bytes(offset)
}

#[test]
fn overlapping_blocks_are_refused() {
    let (_directory, path, memory) = saved();
    rewrite_metadata(&path, |metadata| {
        metadata.blocks[1].file_offset = metadata.blocks[0].file_offset + MIB;
    });
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::Overlap {
            first: "block \"pc.ram\"".into(),
            second: "block \"vga.vram\"".into(),
        }
    );
}

#[test]
fn a_device_overlapping_a_block_is_refused() {
    let (_directory, path, memory) = saved();
    rewrite_metadata(&path, |metadata| {
        metadata.devices[1].offset = metadata.blocks[2].file_offset;
    });
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::Overlap {
            first: "device \"rtc\" instance 1".into(),
            second: "block \"pc.rom\"".into(),
        }
    );
}

#[test]
fn a_misaligned_block_is_refused() {
    let (_directory, path, memory) = saved();
    rewrite_metadata(&path, |metadata| metadata.blocks[0].file_offset += 4096);
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::InvalidField {
            field: "block \"pc.ram\" file_offset".into(),
            value: MIB + 4096,
            reason: "not 1 MiB aligned",
        }
    );
}

#[test]
fn a_bitmap_bit_past_the_block_is_refused() {
    let (_directory, path, memory) = saved();
    // vga.vram has 259 pages: word 4 holds pages 256 to 319.
    rewrite_metadata(&path, |metadata| metadata.bitmaps[1][4] |= 1 << 3);
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::BitPastEnd {
            block: "vga.vram".into(),
            page: 259,
            pages: 259,
        }
    );
}

#[test]
fn a_block_that_does_not_fit_the_target_is_refused() {
    let (_directory, path, memory) = saved();
    let snapshot = Snapshot::open(&path).expect("open");
    let restore_into = |blocks: Vec<multifd::RamBlock>| {
        let target = GuestMemory::new(blocks).expect("memory");
        for block in target.blocks() {
            bytes_mut(block).fill(0xa5);
        }
        let (devices, _) = load_devices();
        let error = snapshot
            .restore(&RestoreConfig::default(), &target, devices)
            .expect_err("refused");
        for block in target.blocks() {
            assert!(bytes(block).iter().all(|&byte| byte == 0xa5));
        }
        fault(&error)
    };
    let sizes = |memory: &GuestMemory| -> Vec<(String, usize)> {
        memory
            .blocks()
            .iter()
            .map(|block| (block.name().to_owned(), block.len() as usize))
            .collect()
    };
    let mut smaller: Vec<_> = sizes(&memory)
        .into_iter()
        .map(|(name, length)| block(&name, length))
        .collect();
    smaller[0] = block("pc.ram", 4 << 20);
    assert_eq!(
        restore_into(smaller),
        SnapshotFault::BlockSizeMismatch {
            name: "pc.ram".into(),
            file: 8 << 20,
            target: 4 << 20,
        }
    );
    let missing: Vec<_> = sizes(&memory)
        .into_iter()
        .skip(1)
        .map(|(name, length)| block(&name, length))
        .collect();
    assert_eq!(
        restore_into(missing),
        SnapshotFault::UnknownBlock("pc.ram".into())
    );
    let mut extra: Vec<_> = sizes(&memory)
        .into_iter()
        .map(|(name, length)| block(&name, length))
        .collect();
    extra.push(block("extra", 4096));
    assert_eq!(
        restore_into(extra),
        SnapshotFault::MissingBlock("extra".into())
    );
}

#[test]
fn devices_must_match_the_file() {
    let (_directory, path, memory) = saved();
    let snapshot = Snapshot::open(&path).expect("open");
    let target = common::empty_like(&memory);
    let (mut devices, _) = load_devices();
    devices.pop();
    let error = snapshot
        .restore(&RestoreConfig::default(), &target, devices)
        .expect_err("refused");
    assert_eq!(
        fault(&error),
        SnapshotFault::DeviceMismatch {
            device: DeviceId::new("rtc", 1),
            reason: "in the file, but no device was given to load it",
        }
    );
    let (mut devices, _) = load_devices();
    devices.push((
        DeviceId::new("net0", 0),
        Box::new(PatternLoad::default()) as Box<dyn LoadDevice>,
    ));
    let error = snapshot
        .restore(&RestoreConfig::default(), &target, devices)
        .expect_err("refused");
    assert_eq!(
        fault(&error),
        SnapshotFault::DeviceMismatch {
            device: DeviceId::new("net0", 0),
            reason: "given to load, but not in the file",
        }
    );
}

#[test]
fn not_a_snapshot_at_all() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("vm.snap");
    std::fs::File::create(&path)
        .and_then(|mut file| file.write_all(&[0xff; 4096]))
        .expect("write");
    let memory = source_memory();
    assert_eq!(
        open_or_restore_fault(&path, &memory),
        SnapshotFault::BadMagic { found: [0xff; 8] }
    );
}
