//! `KvmDirtyLog` against a real KVM VM: a tiny 32-bit guest stores one byte to each of a
//! known set of pages and halts, and the harvests must report exactly those pages, then
//! nothing, in both harvest modes (and, with `vm-memory`, OR-ed with vm-memory's bitmap).
//!
//! Without `/dev/kvm` the tests print `SKIPPED` and pass, unless `MULTIFD_REQUIRE_KVM=1`.
#![cfg(all(feature = "kvm", target_arch = "x86_64"))]

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memmap2::MmapMut;
use multifd::{DirtyLog, GuestMemory, KvmDirtyLog, KvmDirtyLogMode, KvmSlot, RamBlock};

const PAGE: u64 = 4096;
/// Block 0's second slot and block 1's slot sit at these guest addresses, away from
/// slot 0 (guest pages 0 to 255, holding the code at address 0).
const SLOT1_GPA: u64 = 0x20_0000;
const SLOT2_GPA: u64 = 0x40_0000;
/// The byte the guest stores.
const MARK: u8 = 0xaa;

/// KVM, or `None` after a loud skip line when there is none (a failure when
/// `MULTIFD_REQUIRE_KVM=1`).
fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(error) if kvm_required() => {
            panic!("MULTIFD_REQUIRE_KVM=1 but /dev/kvm is not available: {error}")
        }
        Err(error) => {
            skipped(&format!("/dev/kvm not available ({error})"));
            None
        }
    }
}

/// Whether missing KVM support fails the tests instead of skipping them.
fn kvm_required() -> bool {
    std::env::var("MULTIFD_REQUIRE_KVM").as_deref() == Ok("1")
}

/// Says a test is skipped straight to stderr, where the test harness's output capture
/// (which only takes `print!`/`eprint!`) cannot hide it.
fn skipped(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// A block over a fresh anonymous mapping.
fn block(name: &str, pages: u64) -> RamBlock {
    let mapping = MmapMut::map_anon((pages * PAGE) as usize).expect("anonymous mapping");
    RamBlock::from_mapping(name, mapping).expect("block")
}

/// Registers `slot` over its block's memory.
fn register(vm: &VmFd, memory: &GuestMemory, slot: &KvmSlot) {
    let host = memory.blocks()[slot.block].as_ptr() as u64 + slot.block_offset;
    let region = kvm_userspace_memory_region {
        slot: slot.slot,
        flags: slot.flags,
        guest_phys_addr: slot.guest_phys_addr,
        memory_size: slot.size,
        userspace_addr: host,
    };
    // SAFETY: the range is inside the block's mapping, which the test keeps alive for
    // longer than the VM (declared before it, so dropped after it).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
}

/// One vCPU in flat 32-bit protected mode (segments set through KVM_SET_SREGS, so no
/// descriptor tables in guest memory and no paging: the guest writes nothing on its own).
fn flat_vcpu(vm: &VmFd) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    let flat = |selector, type_| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    sregs.cs = flat(0x08, 0xb); // code: execute/read, accessed
    let data = flat(0x10, 0x3); // data: read/write, accessed
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1; // CR0.PE
    vcpu.set_sregs(&sregs).expect("set sregs");
    vcpu
}

/// Writes guest code at address 0 (block 0, page 0) storing `MARK` at each address, then
/// halting; runs it from the start until the halt.
fn run_guest(vcpu: &mut VcpuFd, memory: &GuestMemory, addresses: &[u64]) {
    let mut code = Vec::new();
    for &address in addresses {
        code.extend_from_slice(&[0xc6, 0x05]); // mov byte [disp32], imm8
        code.extend_from_slice(&u32::try_from(address).unwrap().to_le_bytes());
        code.push(MARK);
    }
    code.push(0xf4); // hlt
    assert!(code.len() as u64 <= PAGE);
    // SAFETY: page 0 of block 0 is mapped and only the guest, which is not running,
    // accesses it otherwise.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), memory.blocks()[0].as_ptr(), code.len());
    };
    let regs = kvm_regs {
        rip: 0,
        rflags: 0x2, // bit 1 is always set
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("set regs");
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::Hlt => {}
        exit => panic!("guest exited with {exit:?}, not on its hlt"),
    }
}

/// The byte at `page` of `block`, as the guest left it.
fn byte_at(memory: &GuestMemory, block: usize, page: u64) -> u8 {
    // SAFETY: inside the block's mapping; the guest is not running.
    unsafe {
        memory.blocks()[block]
            .as_ptr()
            .add((page * PAGE) as usize)
            .read_volatile()
    }
}

/// Every block's harvest, as (block, page) pairs.
fn harvest(log: &mut dyn DirtyLog, memory: &GuestMemory) -> BTreeSet<(usize, u64)> {
    let mut dirty = BTreeSet::new();
    for (index, block) in memory.blocks().iter().enumerate() {
        let pages = block.len() / PAGE;
        let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
        log.harvest(index, &mut bitmap).expect("harvest");
        dirty.extend(
            (0..pages)
                .filter(|page| bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0)
                .map(|page| (index, page)),
        );
    }
    dirty
}

fn all_pages(memory: &GuestMemory) -> BTreeSet<(usize, u64)> {
    let pages = |index: usize| 0..memory.blocks()[index].len() / PAGE;
    (0..memory.blocks().len())
        .flat_map(|index| pages(index).map(move |page| (index, page)))
        .collect()
}

/// Guest address of `page` of `block` in the layout of `guest_writes_are_harvested_exactly`.
fn address(block: usize, page: u64) -> u64 {
    match (block, page) {
        (0, 0..256) => page * PAGE,
        (0, _) => SLOT1_GPA + (page - 256) * PAGE,
        _ => SLOT2_GPA + page * PAGE,
    }
}

/// Block 0 (456 pages) in two slots, the second 256 pages (a multiple of 64) into the
/// block and ending on a partial bitmap word; block 1 (64 pages) in a third slot.
fn guest_writes_are_harvested_exactly(mode: KvmDirtyLogMode) {
    let Some(kvm) = kvm() else { return };
    let memory = GuestMemory::new(vec![block("ram0", 456), block("ram1", 64)]).unwrap();
    let vm = Arc::new(kvm.create_vm().expect("vm"));
    let slots = [
        KvmSlot::new(0, 0, 256 * PAGE, 0),
        KvmSlot::new(1, SLOT1_GPA, 200 * PAGE, 0).at_block_offset(256 * PAGE),
        KvmSlot::new(2, SLOT2_GPA, 64 * PAGE, 1),
    ];
    for slot in &slots {
        register(&vm, &memory, slot);
    }
    let mut vcpu = flat_vcpu(&vm);
    // SAFETY: `register` registered each slot as described, over the block's memory at
    // its offset, and the test changes no slot while the log exists.
    let mut log =
        unsafe { KvmDirtyLog::new(Arc::clone(&vm), &memory, PAGE as u32, &slots, mode) }.unwrap();
    match mode {
        KvmDirtyLogMode::GetDirtyLog => assert!(!log.manual_protect()),
        _ if !log.manual_protect() => {
            assert!(
                !kvm_required(),
                "KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"
            );
            skipped("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not available");
            return;
        }
        _ => {}
    }

    log.start().unwrap();
    let error = log.harvest(0, &mut [0; 7]).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
    // With initially-set every page starts dirty (and the failed harvest above cleared
    // none); otherwise none does (the code was written by the host, which KVM does not
    // log).
    let first = if log.initially_set() {
        all_pages(&memory)
    } else {
        BTreeSet::new()
    };
    assert_eq!(
        harvest(&mut log, &memory),
        first,
        "first harvest after start"
    );

    let rounds: [&[(usize, u64)]; 2] = [
        &[
            (0, 3),
            (0, 7),
            (0, 100),
            (0, 255),
            (0, 256),
            (0, 455),
            (1, 5),
            (1, 63),
        ],
        // Page 7 again: its write protection was re-armed by the previous harvest.
        &[(0, 1), (0, 7), (0, 64), (0, 300), (1, 0), (1, 5)],
    ];
    for (round, pages) in rounds.into_iter().enumerate() {
        let addresses: Vec<u64> = pages.iter().map(|&(b, p)| address(b, p)).collect();
        run_guest(&mut vcpu, &memory, &addresses);
        let expected: BTreeSet<_> = pages.iter().copied().collect();
        assert_eq!(harvest(&mut log, &memory), expected, "round {round}");
        assert_eq!(
            harvest(&mut log, &memory),
            BTreeSet::new(),
            "second harvest of round {round}"
        );
        for &(block, page) in pages {
            assert_eq!(
                byte_at(&memory, block, page),
                MARK,
                "block {block} page {page}"
            );
        }
    }

    log.stop().unwrap();
    // Logging is off: KVM has no dirty log left to read, and the slots still run the guest.
    let mut bitmap = [0u64; 1];
    assert!(log.harvest(1, &mut bitmap).is_err());
    run_guest(&mut vcpu, &memory, &[address(1, 9)]);
    assert_eq!(byte_at(&memory, 1, 9), MARK);
}

#[test]
fn slots_must_fit_their_blocks() {
    let Some(kvm) = kvm() else { return };
    let memory = GuestMemory::new(vec![block("ram0", 256)]).unwrap();
    let vm = kvm.create_vm().expect("vm");
    let mode = KvmDirtyLogMode::Auto;
    let new = |page_size: u32, slots: &[KvmSlot]| {
        // SAFETY: every layout here is rejected before a slot is used, or (the first) is
        // never started.
        unsafe { KvmDirtyLog::new(&vm, &memory, page_size, slots, mode) }
    };
    let whole = KvmSlot::new(0, 0, 256 * PAGE, 0);
    assert!(new(PAGE as u32, &[whole]).is_ok());
    let bad = [
        (8192, vec![whole]),
        (4096, vec![whole.at_block_offset(64 * PAGE)]),
        (
            4096,
            vec![KvmSlot::new(0, 0, 128 * PAGE, 0).at_block_offset(PAGE)],
        ),
        (4096, vec![KvmSlot::new(0, 0, 100, 0)]),
        (4096, vec![KvmSlot::new(0, 0, PAGE, 1)]),
        (
            4096,
            vec![KvmSlot::new(0, 0, PAGE, 0), KvmSlot::new(0, PAGE, PAGE, 0)],
        ),
    ];
    for (page_size, slots) in bad {
        assert!(new(page_size, &slots).is_err(), "{page_size} {slots:?}");
    }
}

#[test]
fn guest_writes_are_harvested_exactly_with_manual_protect() {
    guest_writes_are_harvested_exactly(KvmDirtyLogMode::Auto);
}

#[test]
fn guest_writes_are_harvested_exactly_with_get_dirty_log_alone() {
    guest_writes_are_harvested_exactly(KvmDirtyLogMode::GetDirtyLog);
}

/// vm-memory regions as the engine's memory and as KVM's slots; KVM's log (the guest's
/// writes) OR-ed with vm-memory's bitmap (the VMM's writes through vm-memory).
#[cfg(feature = "vm-memory")]
#[test]
fn vm_memory_regions_and_bitmaps_union_with_kvm() {
    use multifd::{guest_memory_from_mmap, DirtyLogUnion, VmMemoryDirtyLog};
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    let Some(kvm) = kvm() else { return };
    let mmap = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
        (GuestAddress(0), (256 * PAGE) as usize),
        (GuestAddress(SLOT2_GPA), (64 * PAGE) as usize),
    ])
    .unwrap();
    let memory = guest_memory_from_mmap(&mmap).unwrap();
    let names: Vec<_> = memory.blocks().iter().map(RamBlock::name).collect();
    assert_eq!(names, ["ram0", "ram1"]);
    let vm = Arc::new(kvm.create_vm().expect("vm"));
    let slots = [
        KvmSlot::new(0, 0, 256 * PAGE, 0),
        KvmSlot::new(1, SLOT2_GPA, 64 * PAGE, 1),
    ];
    for slot in &slots {
        register(&vm, &memory, slot);
    }
    let mut vcpu = flat_vcpu(&vm);
    // SAFETY: as in `guest_writes_are_harvested_exactly`.
    let kvm_log = unsafe {
        KvmDirtyLog::new(
            Arc::clone(&vm),
            &memory,
            PAGE as u32,
            &slots,
            KvmDirtyLogMode::Auto,
        )
    }
    .unwrap();
    let vmm_log = VmMemoryDirtyLog::new(&mmap, PAGE as u32).unwrap();
    let mut log = DirtyLogUnion::new(vec![Box::new(kvm_log), Box::new(vmm_log)]);

    mmap.write_obj(MARK, GuestAddress(20 * PAGE)).unwrap();
    log.start().unwrap();
    // Round 0 sends everything, whatever this reports (all pages with initially-set).
    harvest(&mut log, &memory);
    run_guest(&mut vcpu, &memory, &[3 * PAGE, SLOT2_GPA + 2 * PAGE]);
    mmap.write_obj(MARK, GuestAddress(9 * PAGE + 100)).unwrap();
    mmap.write_obj(MARK, GuestAddress(SLOT2_GPA + 10 * PAGE))
        .unwrap();
    assert_eq!(
        harvest(&mut log, &memory),
        BTreeSet::from([(0, 3), (0, 9), (1, 2), (1, 10)])
    );
    assert_eq!(harvest(&mut log, &memory), BTreeSet::new());
    log.stop().unwrap();
}
