//! A minimal KVM VMM for the self-checking guest ([`crate::guest_image`]).
//!
//! - **Memory**: one RAM block `ram` backed by a memfd (so a later local migration can
//!   hand the file to another process), registered as KVM slot 0 at guest address 0.
//!   The VMM keeps guest RAM below the 32-bit PCI hole: at most 3 GiB, so one block and
//!   one slot suffice. An incoming VM of a local migration adopts the source's memfd
//!   instead: slot 0 moves to the handed-over mapping before its vCPUs first run, and the
//!   source, stopped for good, never runs again.
//! - **vCPUs**: 1–4, each on its own thread ([`crate::vcpu`]), given the host's supported
//!   CPUID (with its own APIC id). A started VM puts them at 0x7c00 in real mode with
//!   the register convention the sector expects (`EAX` = [`VCPU_MAGIC`], `EBX` = index);
//!   an incoming VM creates them paused, to be loaded from a migration.
//! - **No irqchip, no PIT**: the guest runs with interrupts off and only halts for good
//!   (after an error, or after its last pass), so `HLT` exits to the VMM, which parks the
//!   vCPU. Without an in-kernel irqchip there is no LAPIC, PIC, IOAPIC or PIT state to
//!   migrate either.
//! - **Devices**: COM1 ([`crate::serial`]), and a frame buffer ([`FrameBuffer`]) that a
//!   housekeeping thread redraws from the guest's pass counters every [`TICK`].
//! - **Migration**: the guest's state moves as devices — `("cpu", n)` per vCPU, `("vm", 0)`
//!   for the KVM clock, `("serial", 0)`, `("framebuffer", 0)` — see [`KvmVm::save_devices`] and
//!   [`KvmVm::load_devices`]; the dirty log is KVM's ([`KvmVm::dirty_log`]) and the VM
//!   control stops, throttles and resumes the vCPU threads ([`KvmVm::control`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use multifd::{
    DeviceError, DeviceId, GuestMemory, KvmDirtyLog, KvmDirtyLogMode, KvmSlot, LoadDevice,
    LoadDevices, RamBlock, SaveDevice, SaveDevices, StateWriter, VmControl,
};

use crate::frame_buffer::{FrameBuffer, LoadFrameBuffer, SaveFrameBuffer};
use crate::guest_image::{GuestImage, LOAD_ADDRESS, MAX_END, PAGE_SIZE, VCPU_MAGIC};
use crate::serial::{GuestProgress, LoadSerial, SaveSerial, Serial};
use crate::vcpu::{run_vcpu, RunControl, KICK_INTERVAL, STOP_TIMEOUT};
use crate::vcpu_state::{saveable_msrs, VcpuState, VmState};
use crate::Error;

/// How often the housekeeping thread redraws the frame buffer (when the guest made
/// progress) and, while throttled, kicks the vCPUs into their next time slice: the
/// throttle's slice, so one thread does both.
pub const TICK: Duration = crate::vcpu::SLICE;
/// Where KVM puts the three pages of its real-mode TSS on Intel hosts: just below the
/// 4 GiB boundary, above any RAM this VMM maps (at most 3 GiB), as is customary.
const TSS_ADDRESS: usize = 0xfffb_d000;
/// IA32_MTRR_DEF_TYPE, and the value that enables the MTRRs (bit 11) with write-back
/// (type 6) as the default memory type. At reset the MTRRs are off, which makes all
/// memory uncacheable wherever the hypervisor honours the guest's memory types.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WRITE_BACK: u64 = 0x806;
/// The default frame buffer: 256 MiB of device state, as the issue asks.
pub const DEFAULT_FRAME_BUFFER: u64 = 256 << 20;

/// How to build a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmConfig {
    /// Guest RAM in bytes (a multiple of 4 KiB, at most 3 GiB).
    pub memory: u64,
    /// vCPUs, 1–4.
    pub vcpus: u8,
    /// W: bytes the guest checks and writes per page (a multiple of 4 from 8 to 4096).
    pub write_bytes: u32,
    /// Bytes per second the guest dirties over all vCPUs; 0 runs it unpaced.
    pub dirty_rate: u64,
    /// Passes before each vCPU halts; 0 (the default) never.
    pub passes: u32,
    /// Size of the frame buffer device, a multiple of 64 KiB.
    pub frame_buffer: u64,
    /// A file the serial lines are appended to, besides the in-memory log.
    pub serial: Option<PathBuf>,
}

impl VmConfig {
    /// `memory` bytes and `vcpus` vCPUs, W = 8, unpaced, a 256 MiB frame buffer.
    pub fn new(memory: u64, vcpus: u8) -> Self {
        Self {
            memory,
            vcpus,
            write_bytes: 8,
            dirty_rate: 0,
            passes: 0,
            frame_buffer: DEFAULT_FRAME_BUFFER,
            serial: None,
        }
    }
}

/// A running (or incoming) KVM guest; dropping it stops and joins its threads.
pub struct KvmVm {
    config: VmConfig,
    vm: Arc<VmFd>,
    ram: Arc<Ram>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    msrs: Arc<Vec<u32>>,
    tsc_hz: u64,
    control: Arc<RunControl>,
    serial: Arc<Serial>,
    frame_buffer: Arc<FrameBuffer>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KvmVm")
            .field("config", &self.config)
            .field("tsc_hz", &self.tsc_hz)
            .finish_non_exhaustive()
    }
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

impl KvmVm {
    /// Boots the guest: builds the image for this configuration (paced with the vCPUs'
    /// TSC frequency), loads it at 0x7c00 and starts every vCPU there.
    pub fn start(config: &VmConfig) -> Result<Self, Error> {
        let vm = Self::create(config, false)?;
        let mut image = GuestImage::new(config.memory);
        image.write_bytes = config.write_bytes;
        image.dirty_rate = config.dirty_rate;
        image.tsc_hz = vm.tsc_hz;
        image.vcpus = config.vcpus;
        image.passes = config.passes;
        let sector = image.build()?;
        let ram = &vm.ram.own.0.blocks()[0];
        // SAFETY: the sector's 512 bytes at 0x7c00 lie inside the block (at least 1 MiB,
        // checked by `create`), which stays mapped while `vm` lives; no vCPU runs yet
        // (they stay parked until the `resume` below), so nothing else touches these bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                sector.as_ptr(),
                ram.as_ptr().add(LOAD_ADDRESS as usize),
                sector.len(),
            );
        }
        for (index, vcpu) in vm.vcpus.iter().enumerate() {
            let vcpu = vcpu.lock().unwrap_or_else(PoisonError::into_inner);
            let mut sregs = vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            vcpu.set_sregs(&sregs).map_err(kvm_error("KVM_SET_SREGS"))?;
            let mut regs = vcpu.get_regs().map_err(kvm_error("KVM_GET_REGS"))?;
            regs.rip = LOAD_ADDRESS;
            regs.rflags = 2;
            regs.rax = u64::from(VCPU_MAGIC);
            regs.rbx = index as u64;
            vcpu.set_regs(&regs).map_err(kvm_error("KVM_SET_REGS"))?;
            // What a BIOS would have done: MTRRs on, memory write-back by default.
            let mtrr = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                data: MTRR_ENABLE_WRITE_BACK,
                ..Default::default()
            }])
            .map_err(|error| Error::State(format!("MSR list: {error:?}")))?;
            if vcpu.set_msrs(&mtrr).map_err(kvm_error("KVM_SET_MSRS"))? != 1 {
                return Err(Error::State("KVM refused IA32_MTRR_DEF_TYPE".into()));
            }
        }
        vm.control.resume();
        Ok(vm)
    }

    /// A VM to migrate into: same memory layout and vCPUs, created paused, with an empty
    /// frame buffer. Load it through [`KvmVm::load_devices`] and then [`KvmVm::resume`].
    pub fn incoming(config: &VmConfig) -> Result<Self, Error> {
        Self::create(config, true)
    }

    fn create(config: &VmConfig, incoming: bool) -> Result<Self, Error> {
        if config.memory < 2 << 20
            || config.memory > MAX_END
            || !config.memory.is_multiple_of(PAGE_SIZE)
        {
            return Err(Error::Guest(format!(
                "guest memory {:#x} must be whole pages from 2 MiB to 3 GiB",
                config.memory
            )));
        }
        if !(1..=crate::guest_image::MAX_VCPUS).contains(&config.vcpus) {
            return Err(Error::Guest(format!("{} vCPUs: 1 to 4", config.vcpus)));
        }
        let frame_buffer = Arc::new(FrameBuffer::new(config.frame_buffer, !incoming)?);
        let serial_file = config
            .serial
            .as_ref()
            .map(|path| {
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| Error::Serial {
                        path: path.clone(),
                        source,
                    })
            })
            .transpose()?;
        let (memory, memory_file) = memfd_memory(config.memory)?;
        let kvm = Kvm::new().map_err(kvm_error("opening /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_error("KVM_CREATE_VM"))?);
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_error("KVM_SET_TSS_ADDR"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: config.memory,
            userspace_addr: memory.blocks()[0].as_ptr() as u64,
        };
        // SAFETY: the region is the whole block, a shared mapping of the memfd that
        // `memory` keeps mapped. Only running vCPUs touch guest memory, and they all run
        // on this struct's threads, which `drop` joins before the fields (and so this
        // mapping) go; a thread that cannot be joined leaks the mapping instead.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_error("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            for entry in cpuid.as_mut_slice() {
                match entry.function {
                    // Initial APIC id in EBX[31:24].
                    1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
                    // x2APIC id of the topology leaves.
                    0xb | 0x1f => entry.edx = u32::from(index),
                    _ => {}
                }
            }
            vcpu.set_cpuid2(&cpuid)
                .map_err(kvm_error("KVM_SET_CPUID2"))?;
            vcpus.push(Arc::new(Mutex::new(vcpu)));
        }
        let (msrs, tsc_hz) = {
            let first = vcpus[0].lock().unwrap_or_else(PoisonError::into_inner);
            let khz = first.get_tsc_khz().map_err(kvm_error("KVM_GET_TSC_KHZ"))?;
            (saveable_msrs(&kvm, &first)?, u64::from(khz) * 1000)
        };
        let control = Arc::new(RunControl::new(vcpus.len(), true)?);
        let serial = Arc::new(Serial::new(vcpus.len(), serial_file));
        let mut vm = Self {
            config: config.clone(),
            vm,
            ram: Arc::new(Ram {
                own: (memory, memory_file),
                handed_over: OnceLock::new(),
            }),
            vcpus,
            msrs: Arc::new(msrs),
            tsc_hz,
            control,
            serial,
            frame_buffer,
            threads: Vec::new(),
        };
        vm.spawn_threads()?;
        Ok(vm)
    }

    fn spawn_threads(&mut self) -> Result<(), Error> {
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let (vcpu, control, serial) = (
                Arc::clone(vcpu),
                Arc::clone(&self.control),
                Arc::clone(&self.serial),
            );
            let thread = std::thread::Builder::new()
                .name(format!("vcpu-{index}"))
                .spawn(move || run_vcpu(index, &vcpu, &control, &serial))
                .map_err(Error::Thread)?;
            self.control.add_thread(thread.as_pthread_t());
            self.threads.push(thread);
        }
        let (control, serial, frame_buffer) = (
            Arc::clone(&self.control),
            Arc::clone(&self.serial),
            Arc::clone(&self.frame_buffer),
        );
        let thread = std::thread::Builder::new()
            .name("vm-housekeeping".into())
            .spawn(move || {
                while control.housekeeping_tick(TICK) {
                    if !control.paused() {
                        frame_buffer.follow(&serial.progress().passes);
                    }
                }
            })
            .map_err(Error::Thread)?;
        self.threads.push(thread);
        Ok(())
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The guest's RAM, one block named `ram` (after a local migration into this VM, the
    /// memory the source handed over).
    pub fn memory(&self) -> GuestMemory {
        self.ram.current().0.clone()
    }

    /// The memfd backing the guest's RAM (after a local migration into this VM, the
    /// source's).
    pub fn memory_file(&self) -> &File {
        &self.ram.current().1
    }

    /// The vCPUs' TSC frequency in Hz (`KVM_GET_TSC_KHZ`).
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// What the guest reported so far on its serial port.
    pub fn progress(&self) -> GuestProgress {
        self.serial.progress()
    }

    /// The last serial lines (at most 256).
    pub fn serial_lines(&self) -> Vec<String> {
        self.serial.history()
    }

    /// Why appending to the serial file stopped, if it did.
    pub fn serial_file_error(&self) -> Option<String> {
        self.serial.file_error()
    }

    /// What went wrong on vCPU threads (unexpected exits, failed `KVM_RUN`).
    pub fn vcpu_failures(&self) -> Vec<String> {
        self.control.failures()
    }

    /// Which vCPUs halted (after a self-check error, their last pass, or a failure).
    pub fn halted_vcpus(&self) -> Vec<bool> {
        self.control.halted()
    }

    /// Whether the vCPUs run (not stopped).
    pub fn is_running(&self) -> bool {
        self.control.is_running()
    }

    /// The frame buffer device.
    pub fn frame_buffer(&self) -> &Arc<FrameBuffer> {
        &self.frame_buffer
    }

    /// Waits until `done` holds for the guest's progress, at most `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl FnMut(&GuestProgress) -> bool,
    ) -> Result<GuestProgress, Error> {
        self.serial.wait_until(timeout, what, done)
    }

    /// Waits until every vCPU finished `passes` more passes than `since` shows (or the
    /// guest reports an error), at most `timeout`.
    pub fn wait_for_passes(
        &self,
        since: &GuestProgress,
        passes: u32,
        timeout: Duration,
    ) -> Result<GuestProgress, Error> {
        let base = since.passes.clone();
        self.serial.wait_until(
            timeout,
            &format!("{passes} more passes on every vCPU"),
            |progress| {
                !progress.errors.is_empty()
                    || progress.passes.iter().enumerate().all(|(vcpu, &now)| {
                        now >= base.get(vcpu).copied().unwrap_or(0).saturating_add(passes)
                    })
            },
        )
    }

    /// Stops every vCPU (and the frame buffer's redraws).
    pub fn pause(&self) -> Result<(), Error> {
        self.control.stop()
    }

    /// Runs the vCPUs again, unthrottled; does nothing once a local migration handed this
    /// VM's memory over (another VM runs the guest in it now).
    pub fn resume(&self) {
        self.control.resume();
    }

    /// The VM control for the precopy driver.
    pub fn control(&self) -> KvmControl {
        KvmControl {
            control: Arc::clone(&self.control),
        }
    }

    /// KVM's dirty log over the guest's RAM, for the precopy driver.
    pub fn dirty_log(&self, mode: KvmDirtyLogMode) -> Result<KvmDirtyLog, Error> {
        let slot = KvmSlot::new(0, 0, self.config.memory, 0);
        // SAFETY: slot 0 is registered in this VM exactly so (number, address 0, the whole
        // block, no flags) and stays registered while the VM lives; the log holds an Arc
        // of the VM fd, and the caller uses it while this VM (and its memory) exists.
        Ok(unsafe {
            KvmDirtyLog::new(
                Arc::clone(&self.vm),
                &self.ram.current().0,
                PAGE_SIZE as u32,
                &[slot],
                mode,
            )
        }?)
    }

    /// The state of vCPU `index` (the VM must be paused).
    pub fn vcpu_state(&self, index: usize) -> Result<VcpuState, Error> {
        let vcpu = self
            .vcpus
            .get(index)
            .ok_or_else(|| Error::Guest(format!("no vCPU {index}")))?;
        VcpuState::save(
            &vcpu.lock().unwrap_or_else(PoisonError::into_inner),
            &self.msrs,
        )
    }

    /// Writes `state` into vCPU `index` (the VM must be paused).
    pub fn set_vcpu_state(&self, index: usize, state: &VcpuState) -> Result<(), Error> {
        let vcpu = self
            .vcpus
            .get(index)
            .ok_or_else(|| Error::Guest(format!("no vCPU {index}")))?;
        state.restore(&vcpu.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The devices a migration saves once the VM is stopped: `("cpu", n)` per vCPU,
    /// `("vm", 0)`, `("serial", 0)` and `("framebuffer", 0)` (which also sends during
    /// precopy).
    pub fn save_devices(&self) -> SaveDevices {
        self.frame_buffer.mark_all_dirty();
        let mut devices: SaveDevices = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(index, vcpu)| {
                (
                    DeviceId::new("cpu", index as u32),
                    Box::new(SaveVcpu {
                        vcpu: Arc::clone(vcpu),
                        msrs: Arc::clone(&self.msrs),
                    }) as Box<dyn SaveDevice>,
                )
            })
            .collect();
        devices.push((
            DeviceId::new("vm", 0),
            Box::new(SaveVm(Arc::clone(&self.vm))),
        ));
        devices.push((
            DeviceId::new("serial", 0),
            Box::new(SaveSerial(Arc::clone(&self.serial))),
        ));
        devices.push((
            DeviceId::new("framebuffer", 0),
            Box::new(SaveFrameBuffer(Arc::clone(&self.frame_buffer))),
        ));
        devices
    }

    /// The most device state a migration of this VM moves: the frame buffer in records,
    /// and at most 1 MiB for each other device (vCPUs, VM, serial port).
    pub fn max_device_state_bytes(&self) -> u64 {
        self.frame_buffer.stream_bytes() + (self.vcpus.len() as u64 + 2) * MAX_STATE as u64
    }

    /// The destination side of [`KvmVm::save_devices`]: each loads straight into this
    /// (paused) VM.
    pub fn load_devices(&self) -> LoadDevices {
        let mut devices: LoadDevices = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(index, vcpu)| {
                (
                    DeviceId::new("cpu", index as u32),
                    Box::new(LoadVcpu {
                        vcpu: Arc::clone(vcpu),
                        state: Vec::new(),
                    }) as Box<dyn LoadDevice>,
                )
            })
            .collect();
        devices.push((
            DeviceId::new("vm", 0),
            Box::new(LoadVm {
                vm: Arc::clone(&self.vm),
                state: Vec::new(),
            }),
        ));
        devices.push((
            DeviceId::new("serial", 0),
            Box::new(LoadSerial {
                serial: Arc::clone(&self.serial),
                state: Vec::new(),
            }),
        ));
        devices.push((
            DeviceId::new("framebuffer", 0),
            Box::new(LoadFrameBuffer(Arc::clone(&self.frame_buffer))),
        ));
        devices
    }

    /// Marks this (stopped) source of a local migration as handed over: the destination
    /// runs the guest in the same memory now, so [`KvmVm::resume`] must never run it here.
    pub(crate) fn hand_over(&self) {
        self.control.retire();
    }

    /// What switches this incoming VM to memory handed over by a local migration.
    pub(crate) fn memory_switch(&self) -> MemorySwitch {
        MemorySwitch {
            vm: Arc::clone(&self.vm),
            ram: Arc::clone(&self.ram),
            control: Arc::clone(&self.control),
            bytes: self.config.memory,
        }
    }

    /// Writes `bytes` into guest RAM at `address` from the host, marking nothing dirty
    /// (tests corrupt a page with it to see the guest catch it).
    pub fn write_guest(&self, address: u64, bytes: &[u8]) -> Result<(), Error> {
        let ram = &self.ram.current().0.blocks()[0];
        if address
            .checked_add(bytes.len() as u64)
            .is_none_or(|end| end > ram.len())
        {
            return Err(Error::Guest(format!(
                "{} bytes at {address:#x} run past guest RAM",
                bytes.len()
            )));
        }
        for (offset, &byte) in bytes.iter().enumerate() {
            // SAFETY: inside the block (checked above), which stays mapped while `self`
            // lives; a volatile byte store because the guest may be using the memory.
            unsafe {
                ram.as_ptr()
                    .add(address as usize + offset)
                    .write_volatile(byte);
            }
        }
        Ok(())
    }

    /// Reads a 32-bit word of guest RAM at `address` (4-byte aligned).
    pub fn read_guest_u32(&self, address: u64) -> Result<u32, Error> {
        let ram = &self.ram.current().0.blocks()[0];
        if !address.is_multiple_of(4) || address.checked_add(4).is_none_or(|end| end > ram.len()) {
            return Err(Error::Guest(format!("no aligned word at {address:#x}")));
        }
        // SAFETY: an aligned word inside the mapped block (checked above); volatile
        // because the guest may be writing it.
        Ok(unsafe {
            ram.as_ptr()
                .add(address as usize)
                .cast::<u32>()
                .read_volatile()
        })
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.control.quit();
        let deadline = Instant::now() + STOP_TIMEOUT;
        for thread in self.threads.drain(..) {
            // A vCPU inside KVM_RUN only sees `quit` once kicked out; a kick can be lost
            // just before it enters, so repeat until the thread is gone.
            while !thread.is_finished() && Instant::now() < deadline {
                self.control.kick_thread(&thread);
                std::thread::sleep(KICK_INTERVAL);
            }
            if thread.is_finished() {
                // A thread only panics on a bug, already printed by the panic hook.
                let _ = thread.join();
            } else {
                // Stuck past every bound: leave it detached rather than hang, and leave
                // guest RAM mapped for good so that a vCPU still in KVM_RUN never writes
                // into memory the process reuses.
                std::mem::forget(Arc::clone(&self.ram));
            }
        }
    }
}

/// The guest's RAM and its file: the memfd the VM was built with, or the one a local
/// migration handed over (KVM slot 0 maps the current one).
struct Ram {
    own: (GuestMemory, File),
    handed_over: OnceLock<(GuestMemory, File)>,
}

impl Ram {
    fn current(&self) -> &(GuestMemory, File) {
        self.handed_over.get().unwrap_or(&self.own)
    }
}

/// Moves an incoming VM's RAM to memory a local migration handed over (see
/// [`KvmVm::memory_switch`]).
pub(crate) struct MemorySwitch {
    vm: Arc<VmFd>,
    ram: Arc<Ram>,
    control: Arc<RunControl>,
    bytes: u64,
}

impl MemorySwitch {
    /// Makes `memory` the guest's RAM: slot 0 is deleted and registered again at the new
    /// mapping (KVM cannot move a slot's host address in place). The vCPUs must not run;
    /// an incoming VM's have not run yet.
    pub(crate) fn adopt(&self, memory: GuestMemory) -> Result<(), Error> {
        let block = match memory.blocks() {
            [block] if block.name() == "ram" && block.len() == self.bytes => block,
            blocks => {
                return Err(Error::Guest(format!(
                    "handed-over memory {:?}: this VM has one block \"ram\" of {} bytes",
                    blocks
                        .iter()
                        .map(|block| (block.name(), block.len()))
                        .collect::<Vec<_>>(),
                    self.bytes
                )))
            }
        };
        let file = block
            .file()
            .ok_or_else(|| Error::Guest("handed-over memory without its file".into()))?
            .try_clone()
            .map_err(|source| Error::Map {
                bytes: self.bytes,
                source,
            })?;
        if self.control.is_running() {
            return Err(Error::Guest(
                "the vCPUs run: guest memory is switched only while they are stopped".into(),
            ));
        }
        if self.ram.handed_over.get().is_some() {
            return Err(Error::Guest(
                "this VM already adopted handed-over memory".into(),
            ));
        }
        let region = |memory_size, userspace_addr| kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size,
            userspace_addr,
        };
        let old = self.ram.own.0.blocks()[0].as_ptr() as u64;
        // SAFETY: a size of 0 deletes slot 0; no vCPU runs (checked above, and an incoming
        // VM's vCPUs stay parked until its resume), so none uses the slot meanwhile.
        unsafe { self.vm.set_user_memory_region(region(0, old)) }
            .map_err(kvm_error("deleting KVM memory slot 0"))?;
        // SAFETY: the region is the whole handed-over block, a shared mapping that `Ram`
        // keeps (in `handed_over`, set below) as long as the VM, whose `drop` joins the
        // vCPU threads before the mapping goes, as for the VM's own memory.
        unsafe {
            self.vm
                .set_user_memory_region(region(self.bytes, block.as_ptr() as u64))
        }
        .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION (handed-over memory)"))?;
        // Only this switch sets it, once (checked above): the set cannot fail.
        let _ = self.ram.handed_over.set((memory, file));
        Ok(())
    }
}

/// A memfd of `bytes` bytes mapped shared, as a one-block memory named `ram`.
fn memfd_memory(bytes: u64) -> Result<(GuestMemory, File), Error> {
    let map_error = |source| Error::Map { bytes, source };
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"multifd-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(map_error(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes).map_err(map_error)?;
    let block = RamBlock::map_file("ram", &file, true)?;
    Ok((GuestMemory::new(vec![block])?, file))
}

/// The precopy driver's handle on a [`KvmVm`]'s vCPUs.
#[derive(Clone)]
pub struct KvmControl {
    control: Arc<RunControl>,
}

impl std::fmt::Debug for KvmControl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("KvmControl").finish_non_exhaustive()
    }
}

impl VmControl for KvmControl {
    fn stop(&mut self) -> Result<(), DeviceError> {
        Ok(self.control.stop()?)
    }

    fn throttle(&mut self, percent: u8) {
        self.control.throttle(percent);
    }

    fn resume(&mut self) {
        self.control.resume();
    }
}

struct SaveVcpu {
    vcpu: Arc<Mutex<VcpuFd>>,
    msrs: Arc<Vec<u32>>,
}

impl SaveDevice for SaveVcpu {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        let vcpu = self.vcpu.lock().unwrap_or_else(PoisonError::into_inner);
        let saved = VcpuState::save(&vcpu, &self.msrs)?;
        drop(vcpu);
        state.write_all(&saved.encode())?;
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(Vec::new())
    }
}

struct LoadVcpu {
    vcpu: Arc<Mutex<VcpuFd>>,
    state: Vec<u8>,
}

/// The most state bytes a `cpu`, `vm` or `serial` device may send: an encoded vCPU is
/// about 6 KiB, the serial port a few bytes per vCPU and error;
/// 1 MiB bounds what a garbled stream makes the destination buffer.
pub(crate) const MAX_STATE: usize = 1 << 20;

fn collect(state: &mut Vec<u8>, chunk: &[u8]) -> Result<(), DeviceError> {
    if state.len() + chunk.len() > MAX_STATE {
        return Err(format!("more than {MAX_STATE} bytes of CPU/VM state").into());
    }
    state.extend_from_slice(chunk);
    Ok(())
}

impl LoadDevice for LoadVcpu {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        collect(&mut self.state, chunk)
    }

    fn load_config(&mut self, _config: &[u8]) -> Result<(), DeviceError> {
        let state = VcpuState::decode(&self.state)?;
        state.restore(&self.vcpu.lock().unwrap_or_else(PoisonError::into_inner))?;
        Ok(())
    }
}

struct SaveVm(Arc<VmFd>);

impl SaveDevice for SaveVm {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        state.write_all(&VmState::save(&self.0)?.encode())?;
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(Vec::new())
    }
}

struct LoadVm {
    vm: Arc<VmFd>,
    state: Vec<u8>,
}

impl LoadDevice for LoadVm {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        collect(&mut self.state, chunk)
    }

    fn load_config(&mut self, _config: &[u8]) -> Result<(), DeviceError> {
        VmState::decode(&self.state)?.restore(&self.vm)?;
        Ok(())
    }
}
