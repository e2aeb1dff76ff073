//! The self-checking guest: a 512-byte boot sector assembled at run time from the Rust
//! source below with `iced-x86`'s code assembler, so that the same bytes boot under a BIOS
//! (QEMU: `-drive file=guest.img,format=raw`) and in this crate's VMM ([`crate::KvmVm`]).
//!
//! # What it does
//!
//! A BIOS loads the sector at 0x7c00 and jumps to it in real mode. The 16-bit code decides
//! which vCPU it is (below), turns the A20 line on through the "fast A20" port 0x92, loads
//! a GDT of three entries (null, flat 4 GiB code, flat 4 GiB data), sets CR0.PE and jumps
//! far into 32-bit code, which runs with interrupts off for ever:
//!
//! * The range `[1 MiB, end)` is cut into one slice of whole pages per vCPU (the last
//!   takes the remainder). Each vCPU has its own 1 KiB stack below 0x7000 and keeps its
//!   variables there, so the vCPUs share nothing but the read-only sector.
//! * Pass 1 fills the first W bytes of every 4 KiB page of the slice with the 32-bit
//!   word 1, unchecked (memory under a BIOS is not zero above 1 MiB). Every later pass
//!   `n` first checks (`repe scasd`) that the W bytes still hold `n − 1` in every word,
//!   then writes `n` into them (`rep stosd`). A lost dirty page, a page from the wrong
//!   round or a torn page all show up as a word that is not `n − 1`.
//! * A mismatch prints `E<v> <address> <found> <expected>\n` on COM1 (port 0x3f8) — `v`
//!   the vCPU index as one decimal digit, then the address of the first differing word
//!   and the two values, in lower-case hex without leading zeros — and the vCPU stops
//!   (`cli; hlt` in a loop).
//! * After each pass it prints `P<v> <pass>\n` (pass in hex). Every byte written to the
//!   port is a VM exit, so the lines are as short as they can be and there is no status
//!   register polling (QEMU's UART and ours take a byte at any time).
//! * After `passes` passes the vCPU halts, unless `passes` is 0 (it never does). One
//!   pass makes an idle guest: it fills its memory once, then stops writing.
//! * Pacing: after every `batch` pages the vCPU spins on `rdtsc` until `pace` TSC ticks
//!   have passed since the end of its previous batch (0: no pacing). A vCPU then dirties
//!   `batch × 4 KiB` every `pace` ticks, whatever W is; [`GuestImage`] computes `pace` from
//!   a dirty rate in bytes per second and the TSC frequency.
//!
//! # Which vCPU am I
//!
//! The VMM starts every vCPU itself at 0x7c00 in real mode (no BIOS, no INIT/SIPI) with
//! `EAX` = [`VCPU_MAGIC`] and `EBX` = the vCPU's index. Under a BIOS `EAX` does not hold the
//! magic, so the code takes index 0 of 1 vCPU whatever the patched count: the same image
//! runs one vCPU in QEMU. An index not below the count halts at once.
//!
//! # Layout
//!
//! The parameters are 32-bit little-endian words patched at fixed offsets; the code never
//! changes with them.
//!
//! | offset  | contents                                                  |
//! |---------|-----------------------------------------------------------|
//! | 0x000   | 16-bit code (entry point, 0x7c00)                         |
//! | 0x040   | 32-bit code                                               |
//! | 0x1c0   | GDT: null, code (0x08), data (0x10)                       |
//! | 0x1d8   | GDT descriptor (`lgdt` operand: limit, base)              |
//! | 0x1e0   | `end`: first address past the range, page-aligned         |
//! | 0x1e4   | `words`: W / 4, the 32-bit words checked per page (2–1024)|
//! | 0x1e8   | `pace`: TSC ticks per batch per vCPU (0 = unpaced)        |
//! | 0x1ec   | `batch`: pages between two pacing waits (≥ 1)             |
//! | 0x1f0   | `vcpus`: vCPUs the VMM starts (1–4)                       |
//! | 0x1f4   | `passes`: passes before the vCPU halts (0 = never)        |
//! | 0x1fe   | boot signature 0x55 0xaa                                  |

use iced_x86::code_asm::{
    al, ax, byte_ptr, cl, cr0, ds, dword_ptr, dx, eax, ebp, ebx, ecx, edi, edx, es, esi, esp, ptr,
    ss, CodeAssembler,
};

use crate::Error;

/// The size of a boot sector.
pub const SECTOR: usize = 512;
/// The page size the guest works in (x86's, and the migration's).
pub const PAGE_SIZE: u64 = 4096;
/// The first address the guest checks and writes: below 1 MiB are the BIOS, the sector
/// and the stacks.
pub const FIRST_ADDRESS: u64 = 1 << 20;
/// The most vCPUs the image supports (one decimal digit in the serial lines, and the
/// stacks below 0x7000 must stay above the BIOS data area).
pub const MAX_VCPUS: u8 = 4;
/// What `EAX` holds when the VMM (not a BIOS) starts a vCPU: "MFDV" in little-endian.
pub const VCPU_MAGIC: u32 = u32::from_le_bytes(*b"MFDV");
/// Where the BIOS loads the sector (and the VMM puts it) and starts it.
pub const LOAD_ADDRESS: u64 = 0x7c00;
/// The highest `end` the image accepts: the 32-bit code addresses memory below 4 GiB, and
/// the VMM keeps RAM below the PCI hole at 3 GiB.
pub const MAX_END: u64 = 3 << 30;

/// Where the 32-bit code starts in the sector: past the 16-bit code (checked).
const PROTECTED_OFFSET: usize = 0x40;
/// Where the GDT is in the sector (8-byte aligned, as the processor prefers).
const GDT_OFFSET: usize = 0x1c0;
/// Where the GDT descriptor is in the sector.
const GDT_DESCRIPTOR_OFFSET: usize = 0x1d8;
/// Offsets of the patched parameters (see the module's table).
pub const END_OFFSET: usize = 0x1e0;
/// Offset of `words` (W / 4).
pub const WORDS_OFFSET: usize = 0x1e4;
/// Offset of `pace`.
pub const PACE_OFFSET: usize = 0x1e8;
/// Offset of `batch`.
pub const BATCH_OFFSET: usize = 0x1ec;
/// Offset of `vcpus`.
pub const VCPUS_OFFSET: usize = 0x1f0;
/// Offset of `passes`.
pub const PASSES_OFFSET: usize = 0x1f4;
/// Code and data selectors (GDT entries 1 and 2).
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
/// Flat 4 GiB segments: base 0, limit 0xfffff in 4 KiB units, 32-bit, present, ring 0;
/// code is execute/read, data read/write.
const GDT: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
/// CR0's CD (bit 30) and NW (bit 29): set at reset, caching disabled.
const CR0_CACHE_DISABLE: u32 = 0x6000_0000;
/// COM1's transmit register.
pub const COM1: u16 = 0x3f8;
/// The "fast A20" gate (system control port A); bit 1 enables A20. Bit 0 resets the
/// machine, so the code only ever sets bit 1 of what it read.
const SYSTEM_CONTROL_A: u16 = 0x92;
/// The top of vCPU 0's stack; vCPU `i`'s is `STACK_SIZE × i` lower. 0x7000 leaves the
/// sector (0x7c00) above and, for 4 vCPUs, stays far above the BIOS data area (0x500).
const STACK_TOP: u32 = 0x7000;
/// log2 of each vCPU's stack size (1 KiB: a few calls and the variables below).
const STACK_SHIFT: u32 = 10;
/// A vCPU's variables, below its frame pointer `ebp` (the top of its stack).
const SLICE_START: i32 = -4;
const SLICE_END: i32 = -8;
const PASS: i32 = -12;
const INDEX: i32 = -16;
const TSC_LOW: i32 = -20;
const TSC_HIGH: i32 = -24;
/// Room for the variables on the stack.
const FRAME: u32 = 32;

/// The default number of pages between two pacing waits: 16 pages (64 KiB) keeps the
/// wait short (about 0.6 ms at 100 MB/s per vCPU), so the rate is smooth within a
/// migration round, while one `rdtsc` loop per 16 pages costs nothing measurable.
pub const DEFAULT_BATCH: u32 = 16;

/// The values patched into the sector (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GuestParameters {
    /// First address past the range checked and written.
    pub end: u32,
    /// W / 4: 32-bit words checked and written at the start of each page.
    pub words: u32,
    /// TSC ticks per batch per vCPU; 0 runs unpaced.
    pub pace: u32,
    /// Pages between two pacing waits.
    pub batch: u32,
    /// vCPUs the VMM starts.
    pub vcpus: u32,
    /// Passes before each vCPU halts; 0 never.
    pub passes: u32,
}

impl GuestParameters {
    /// Pages checked and written in one pass, over all vCPUs.
    pub fn pages_per_pass(&self) -> u64 {
        (u64::from(self.end).saturating_sub(FIRST_ADDRESS)) / PAGE_SIZE
    }
}

/// Builds the boot sector from a memory size, a write size W, a dirty rate and a TSC
/// frequency.
///
/// The dirty rate is in bytes per second over all vCPUs, counted in whole pages (a page
/// written is a page to migrate, whatever W is). It becomes a per-vCPU `pace` of
/// `batch × 4096 × vcpus × tsc_hz / rate` ticks. For our VMM the TSC frequency is the
/// vCPU's (`KVM_GET_TSC_KHZ`, [`crate::KvmVm::tsc_hz`]); for an image booted in QEMU it is
/// the host's ([`host_tsc_hz`]), which a KVM guest's TSC runs at unless scaled.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GuestImage {
    /// Guest memory in bytes: the range is `[1 MiB, memory)` (at most 3 GiB).
    pub memory: u64,
    /// W: bytes checked and written at the start of every page, a multiple of 4 from 8
    /// to 4096.
    pub write_bytes: u32,
    /// Bytes per second dirtied over all vCPUs; 0 runs unpaced (as fast as it can).
    pub dirty_rate: u64,
    /// The guest's TSC frequency in Hz (needed when `dirty_rate` is not 0).
    pub tsc_hz: u64,
    /// vCPUs the VMM starts (1–4; under a BIOS only the first runs).
    pub vcpus: u8,
    /// Pages between two pacing waits.
    pub batch: u32,
    /// Passes before each vCPU halts; 0 (the default) never. 1 makes an idle guest.
    pub passes: u32,
}

impl GuestImage {
    /// An unpaced, one-vCPU guest over `memory` bytes checking 8 bytes per page.
    pub fn new(memory: u64) -> Self {
        Self {
            memory,
            write_bytes: 8,
            dirty_rate: 0,
            tsc_hz: 0,
            vcpus: 1,
            batch: DEFAULT_BATCH,
            passes: 0,
        }
    }

    /// The parameters the sector gets, checked.
    pub fn parameters(&self) -> Result<GuestParameters, Error> {
        let invalid = |what: String| Err(Error::Guest(what));
        if self.memory <= FIRST_ADDRESS + PAGE_SIZE * u64::from(self.vcpus.max(1))
            || self.memory > MAX_END
        {
            return invalid(format!(
                "guest memory {:#x} must leave at least a page per vCPU above 1 MiB and be at most 3 GiB",
                self.memory
            ));
        }
        if !(8..=4096).contains(&self.write_bytes) || !self.write_bytes.is_multiple_of(4) {
            return invalid(format!(
                "write bytes {} must be a multiple of 4 from 8 to 4096",
                self.write_bytes
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return invalid(format!("{} vCPUs: 1 to {MAX_VCPUS}", self.vcpus));
        }
        if self.batch == 0 {
            return invalid("the batch must be at least one page".into());
        }
        let pace = if self.dirty_rate == 0 {
            0
        } else {
            if self.tsc_hz == 0 {
                return invalid("a paced guest needs the TSC frequency".into());
            }
            let ticks = u128::from(self.batch)
                * u128::from(PAGE_SIZE)
                * u128::from(self.vcpus)
                * u128::from(self.tsc_hz)
                / u128::from(self.dirty_rate);
            match u32::try_from(ticks.max(1)) {
                Ok(ticks) => ticks,
                Err(_) => {
                    return invalid(format!(
                        "a dirty rate of {} B/s is too low for batches of {} pages",
                        self.dirty_rate, self.batch
                    ))
                }
            }
        };
        Ok(GuestParameters {
            // At most 3 GiB (checked above), so it fits; rounded down to a page.
            end: (self.memory & !(PAGE_SIZE - 1)) as u32,
            words: self.write_bytes / 4,
            pace,
            batch: self.batch,
            vcpus: u32::from(self.vcpus),
            passes: self.passes,
        })
    }

    /// The 512-byte boot sector.
    pub fn build(&self) -> Result<[u8; SECTOR], Error> {
        boot_sector(&self.parameters()?)
    }
}

/// The host's TSC frequency in Hz, measured against the monotonic clock over 50 ms: what
/// a QEMU guest's TSC runs at when QEMU does not scale it (ours uses the vCPU's own
/// figure). Accurate to a few hundred parts per million, plenty for pacing.
pub fn host_tsc_hz() -> u64 {
    use std::time::{Duration, Instant};
    /// Long enough that the clock reads' jitter (microseconds) is negligible.
    const SPAN: Duration = Duration::from_millis(50);
    let start = Instant::now();
    let first = rdtsc();
    while start.elapsed() < SPAN {
        std::hint::spin_loop();
    }
    let ticks = rdtsc().wrapping_sub(first);
    (ticks as f64 / start.elapsed().as_secs_f64()) as u64
}

fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` reads the time-stamp counter; every x86_64 processor has it and it
    // touches no memory.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// The sector with `parameters` patched in (unchecked values: see
/// [`GuestImage::parameters`]).
pub fn boot_sector(parameters: &GuestParameters) -> Result<[u8; SECTOR], Error> {
    let mut sector = [0u8; SECTOR];
    let real_mode = real_mode_code()?;
    let protected_mode = protected_mode_code()?;
    if real_mode.len() > PROTECTED_OFFSET || PROTECTED_OFFSET + protected_mode.len() > GDT_OFFSET {
        return Err(Error::Guest(format!(
            "the code ({} + {} bytes) does not fit the sector's layout",
            real_mode.len(),
            protected_mode.len()
        )));
    }
    sector[..real_mode.len()].copy_from_slice(&real_mode);
    sector[PROTECTED_OFFSET..][..protected_mode.len()].copy_from_slice(&protected_mode);
    for (index, entry) in GDT.iter().enumerate() {
        sector[GDT_OFFSET + 8 * index..][..8].copy_from_slice(&entry.to_le_bytes());
    }
    let gdt_limit = (8 * GDT.len() - 1) as u16;
    sector[GDT_DESCRIPTOR_OFFSET..][..2].copy_from_slice(&gdt_limit.to_le_bytes());
    sector[GDT_DESCRIPTOR_OFFSET + 2..][..4].copy_from_slice(&address(GDT_OFFSET).to_le_bytes());
    for (offset, value) in [
        (END_OFFSET, parameters.end),
        (WORDS_OFFSET, parameters.words),
        (PACE_OFFSET, parameters.pace),
        (BATCH_OFFSET, parameters.batch),
        (VCPUS_OFFSET, parameters.vcpus),
        (PASSES_OFFSET, parameters.passes),
    ] {
        sector[offset..][..4].copy_from_slice(&value.to_le_bytes());
    }
    sector[SECTOR - 2..].copy_from_slice(&[0x55, 0xaa]);
    Ok(sector)
}

/// The guest address of a sector offset.
fn address(offset: usize) -> u32 {
    // Offsets are below SECTOR: no truncation, no overflow.
    LOAD_ADDRESS as u32 + offset as u32
}

/// Real mode to 32-bit protected mode. Leaves the vCPU index in `ebx` and the vCPU count
/// in `ecx` (0: read it from the sector once data segments are flat).
fn real_mode_code() -> Result<Vec<u8>, Error> {
    let mut a = CodeAssembler::new(16)?;
    let mut started_by_vmm = a.create_label();
    let mut common = a.create_label();
    a.cli()?;
    a.cmp(eax, VCPU_MAGIC)?;
    a.je(started_by_vmm)?;
    // Under a BIOS: vCPU 0 of 1.
    a.xor(ebx, ebx)?;
    a.xor(ecx, ecx)?;
    a.inc(ecx)?;
    a.jmp(common)?;
    a.set_label(&mut started_by_vmm)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut common)?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.in_(al, u32::from(SYSTEM_CONTROL_A))?;
    a.or(al, 2)?;
    a.out(u32::from(SYSTEM_CONTROL_A), al)?;
    a.lgdt(ptr(address(GDT_DESCRIPTOR_OFFSET)))?;
    a.mov(eax, cr0)?;
    // Caches on (CD and NW clear, as after a reset they are set and nothing here runs a
    // BIOS that clears them), protection on.
    a.and(eax, !CR0_CACHE_DISABLE)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    a.jmp_far(CODE_SELECTOR, address(PROTECTED_OFFSET))?;
    Ok(a.assemble(LOAD_ADDRESS)?)
}

/// The workload. Registers in the loop: `esi` the page, `ebx` pages left in the batch,
/// `ebp` the frame (the vCPU's variables below it); `eax`, `ecx`, `edx`, `edi` scratch.
fn protected_mode_code() -> Result<Vec<u8>, Error> {
    let mut a = CodeAssembler::new(32)?;
    let mut count_known = a.create_label();
    let mut not_last = a.create_label();
    let mut pass = a.create_label();
    let mut page = a.create_label();
    let mut write = a.create_label();
    let mut spin = a.create_label();
    let mut paced = a.create_label();
    let mut pass_done = a.create_label();
    let mut mismatch = a.create_label();
    let mut halt = a.create_label();
    let mut putc = a.create_label();
    let mut begin = a.create_label();
    let mut field = a.create_label();
    let mut hex_skip = a.create_label();
    let mut hex_digits = a.create_label();
    let mut hex_digit = a.create_label();
    let mut decimal = a.create_label();
    let var = |offset: i32| dword_ptr(ebp + offset);

    a.mov(ax, u32::from(DATA_SELECTOR))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.cld()?;
    a.test(ecx, ecx)?;
    a.jnz(count_known)?;
    a.mov(ecx, dword_ptr(address(VCPUS_OFFSET)))?;
    a.set_label(&mut count_known)?;
    a.cmp(ebx, ecx)?;
    a.jae(halt)?;
    // The vCPU's stack and frame.
    a.mov(eax, ebx)?;
    a.shl(eax, STACK_SHIFT)?;
    a.mov(esp, STACK_TOP)?;
    a.sub(esp, eax)?;
    a.mov(ebp, esp)?;
    a.sub(esp, FRAME)?;
    a.mov(var(INDEX), ebx)?;
    // The slice: pages / vcpus pages each, from 1 MiB; the last vCPU runs to `end`.
    a.mov(eax, dword_ptr(address(END_OFFSET)))?;
    a.sub(eax, FIRST_ADDRESS as u32)?;
    a.shr(eax, 12)?;
    a.xor(edx, edx)?;
    a.div(ecx)?;
    a.shl(eax, 12)?;
    a.mov(esi, eax)?;
    a.mul(ebx)?;
    a.add(eax, FIRST_ADDRESS as u32)?;
    a.mov(var(SLICE_START), eax)?;
    a.add(eax, esi)?;
    a.dec(ecx)?;
    a.cmp(ebx, ecx)?;
    a.jne(not_last)?;
    a.mov(eax, dword_ptr(address(END_OFFSET)))?;
    a.set_label(&mut not_last)?;
    a.mov(var(SLICE_END), eax)?;
    a.mov(var(PASS), 1u32)?;
    a.rdtsc()?;
    a.mov(var(TSC_LOW), eax)?;
    a.mov(var(TSC_HIGH), edx)?;
    a.mov(ebx, dword_ptr(address(BATCH_OFFSET)))?;

    a.set_label(&mut pass)?;
    a.mov(esi, var(SLICE_START))?;
    a.set_label(&mut page)?;
    a.cmp(esi, var(SLICE_END))?;
    a.jae(pass_done)?;
    a.mov(eax, var(PASS))?;
    a.cmp(eax, 1)?;
    a.jbe(write)?;
    a.dec(eax)?;
    a.mov(edi, esi)?;
    a.mov(ecx, dword_ptr(address(WORDS_OFFSET)))?;
    a.repe().scasd()?;
    a.jne(mismatch)?;
    a.inc(eax)?;
    a.set_label(&mut write)?;
    a.mov(edi, esi)?;
    a.mov(ecx, dword_ptr(address(WORDS_OFFSET)))?;
    a.rep().stosd()?;
    a.add(esi, PAGE_SIZE as u32)?;
    a.dec(ebx)?;
    a.jnz(page)?;
    // A batch is done: wait until `pace` ticks passed since the last one ended.
    a.mov(ebx, dword_ptr(address(BATCH_OFFSET)))?;
    a.mov(ecx, dword_ptr(address(PACE_OFFSET)))?;
    a.jecxz(page)?;
    a.set_label(&mut spin)?;
    a.rdtsc()?;
    a.sub(eax, var(TSC_LOW))?;
    a.sbb(edx, var(TSC_HIGH))?;
    a.jnz(paced)?;
    a.cmp(eax, ecx)?;
    a.jb(spin)?;
    a.set_label(&mut paced)?;
    a.rdtsc()?;
    a.mov(var(TSC_LOW), eax)?;
    a.mov(var(TSC_HIGH), edx)?;
    a.jmp(page)?;

    // "P<v> <pass>\n"
    a.set_label(&mut pass_done)?;
    a.mov(al, u32::from(b'P'))?;
    a.call(begin)?;
    a.mov(eax, var(PASS))?;
    a.call(field)?;
    a.mov(al, u32::from(b'\n'))?;
    a.call(putc)?;
    a.mov(eax, var(PASS))?;
    a.cmp(eax, dword_ptr(address(PASSES_OFFSET)))?;
    a.je(halt)?;
    a.inc(eax)?;
    a.mov(var(PASS), eax)?;
    a.jmp(pass)?;

    // "E<v> <address> <found> <expected>\n": `edi` is past the differing word, `eax`
    // the value expected.
    a.set_label(&mut mismatch)?;
    a.sub(edi, 4)?;
    a.mov(esi, eax)?;
    a.mov(al, u32::from(b'E'))?;
    a.call(begin)?;
    a.mov(eax, edi)?;
    a.call(field)?;
    a.mov(eax, dword_ptr(edi))?;
    a.call(field)?;
    a.mov(eax, esi)?;
    a.call(field)?;
    a.mov(al, u32::from(b'\n'))?;
    a.call(putc)?;
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;

    // putc: writes `al` to COM1.
    a.set_label(&mut putc)?;
    a.push(edx)?;
    a.mov(dx, u32::from(COM1))?;
    a.out(dx, al)?;
    a.pop(edx)?;
    a.ret()?;

    // begin: writes `al`, then the vCPU index as a digit.
    a.set_label(&mut begin)?;
    a.call(putc)?;
    a.mov(al, byte_ptr(ebp + INDEX))?;
    a.add(al, u32::from(b'0'))?;
    a.jmp(putc)?;

    // field: writes a space, then `eax` in hex without leading zeros; keeps every
    // register but `eax`.
    a.set_label(&mut field)?;
    a.push(ecx)?;
    a.push(edx)?;
    a.mov(edx, eax)?;
    a.mov(al, u32::from(b' '))?;
    a.call(putc)?;
    a.mov(ecx, 28u32)?;
    a.set_label(&mut hex_skip)?;
    a.mov(eax, edx)?;
    a.shr(eax, cl)?;
    a.and(eax, 15)?;
    a.jnz(hex_digit)?;
    a.sub(ecx, 4)?;
    a.jnz(hex_skip)?;
    a.set_label(&mut hex_digits)?;
    a.mov(eax, edx)?;
    a.shr(eax, cl)?;
    a.and(eax, 15)?;
    a.set_label(&mut hex_digit)?;
    a.cmp(al, 10)?;
    a.jb(decimal)?;
    a.add(al, u32::from(b'a' - b'0' - 10))?;
    a.set_label(&mut decimal)?;
    a.add(al, u32::from(b'0'))?;
    a.call(putc)?;
    a.sub(ecx, 4)?;
    a.jns(hex_digits)?;
    a.pop(edx)?;
    a.pop(ecx)?;
    a.ret()?;
    Ok(a.assemble(u64::from(address(PROTECTED_OFFSET)))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(sector: &[u8; SECTOR], offset: usize) -> u32 {
        u32::from_le_bytes(sector[offset..][..4].try_into().unwrap())
    }

    #[test]
    fn parameters_land_at_their_offsets() {
        let mut image = GuestImage::new(64 << 20);
        image.write_bytes = 64;
        image.vcpus = 2;
        image.dirty_rate = 100 << 20;
        image.tsc_hz = 2_000_000_000;
        let sector = image.build().unwrap();
        assert_eq!(sector[510..], [0x55, 0xaa]);
        assert_eq!(word(&sector, END_OFFSET), 64 << 20);
        assert_eq!(word(&sector, WORDS_OFFSET), 16);
        assert_eq!(word(&sector, BATCH_OFFSET), DEFAULT_BATCH);
        assert_eq!(word(&sector, VCPUS_OFFSET), 2);
        assert_eq!(word(&sector, PASSES_OFFSET), 0);
        assert_eq!(
            image.parameters().unwrap().pages_per_pass(),
            (63 << 20) / 4096
        );
        // 16 pages × 4 KiB × 2 vCPUs at 100 MiB/s: 1.25 ms of a 2 GHz TSC.
        assert_eq!(word(&sector, PACE_OFFSET), 2_500_000);
        // The code starts with `cli` and jumps far to the 32-bit code.
        assert_eq!(sector[0], 0xfa);
        let far_jump = [0xea, 0x40, 0x7c, 0x08, 0x00];
        assert!(sector[..PROTECTED_OFFSET]
            .windows(5)
            .any(|window| window == far_jump));
    }

    #[test]
    fn only_the_parameters_change() {
        let left = GuestImage::new(64 << 20).build().unwrap();
        let mut other = GuestImage::new(128 << 20);
        other.write_bytes = 4096;
        other.vcpus = 4;
        other.passes = 1;
        let right = other.build().unwrap();
        assert!((0..SECTOR)
            .filter(|&i| left[i] != right[i])
            .all(|i| (END_OFFSET..PASSES_OFFSET + 4).contains(&i)));
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let base = GuestImage::new(64 << 20);
        let mut cases = vec![GuestImage::new(1 << 20), GuestImage::new(4 << 30)];
        for write_bytes in [0, 4, 10, 4100] {
            cases.push(GuestImage {
                write_bytes,
                ..base.clone()
            });
        }
        for vcpus in [0, 5] {
            cases.push(GuestImage {
                vcpus,
                ..base.clone()
            });
        }
        cases.push(GuestImage {
            dirty_rate: 1,
            ..base.clone()
        });
        cases.push(GuestImage {
            dirty_rate: 1,
            tsc_hz: 3_000_000_000,
            ..base.clone()
        });
        for case in cases {
            assert!(case.build().is_err(), "{case:?}");
        }
    }
}
