//! A boot-sector guest that dirties its memory at an adjustable rate, for QEMU's live
//! migration ([`crate::live_qemu`]), assembled at run time.
//!
//! A BIOS loads the sector at 0x7c00 and jumps to it in real mode. The 16-bit code turns
//! the A20 line on (so that addresses past 1 MiB do not wrap), loads a GDT of three
//! entries (null, flat 4 GiB code, flat 4 GiB data), sets CR0.PE and jumps far into the
//! 32-bit code at [`PROTECTED_OFFSET`], which runs with interrupts off and loops:
//!
//! * a pass increments the first byte of every 4 KiB page in `[1 MiB, end)`, then writes
//!   `B` to COM1 (port 0x3f8), so that progress shows in the serial log;
//! * after every `batch` pages it spins `delay` iterations of `dec ecx; jnz` (pacing:
//!   about one iteration per cycle, no VM exit), except in the first pass, which fills
//!   every page unpaced so that the migration moves real pages, not zero pages (as our
//!   simulated guest fills its memory before it starts writing);
//! * after `passes` passes it halts (an idle guest); 0 passes loops forever.
//!
//! The parameters are 32-bit little-endian words patched into the assembled sector at
//! fixed offsets, so the code does not change with them:
//!
//! | offset  | contents                                  |
//! |---------|-------------------------------------------|
//! | 0x000   | 16-bit code (entry point, 0x7c00)         |
//! | 0x040   | 32-bit code                               |
//! | 0x1c0   | GDT: null, code (0x08), data (0x10)       |
//! | 0x1d8   | GDT descriptor (limit, base)              |
//! | 0x1e0   | `end`: first address past the pages dirtied |
//! | 0x1e4   | `batch`: pages between two delays (≥ 1)   |
//! | 0x1e8   | `delay`: iterations of the delay loop     |
//! | 0x1ec   | `passes`: passes before halting, 0 never  |
//! | 0x1fe   | boot signature 0x55 0xaa                  |

use anyhow::{ensure, Context, Result};
use iced_x86::code_asm::{
    al, ax, byte_ptr, cr0, ds, dword_ptr, dx, eax, ebp, ebx, ecx, edi, es, esi, ptr, ss,
    CodeAssembler,
};

/// The size of a boot sector.
pub const SECTOR: usize = 512;
/// Where the BIOS loads the sector and starts it.
const LOAD_ADDRESS: u32 = 0x7c00;
/// Where the 32-bit code starts in the sector: past the 16-bit code (checked).
const PROTECTED_OFFSET: usize = 0x40;
/// Where the GDT is in the sector (8-byte aligned, as the processor prefers).
const GDT_OFFSET: usize = 0x1c0;
/// Where the GDT descriptor (`lgdt`'s operand) is in the sector.
const GDT_DESCRIPTOR_OFFSET: usize = 0x1d8;
/// Where `end` is in the sector.
pub const END_OFFSET: usize = 0x1e0;
/// Where `batch` is in the sector.
pub const BATCH_OFFSET: usize = 0x1e4;
/// Where `delay` is in the sector.
pub const DELAY_OFFSET: usize = 0x1e8;
/// Where `passes` is in the sector.
pub const PASSES_OFFSET: usize = 0x1ec;
/// The first byte the guest dirties: RAM below 1 MiB holds the BIOS and this code.
pub const FIRST_DIRTY_ADDRESS: u32 = 1 << 20;
/// The page size the guest dirties in (QEMU's target page size on x86).
pub const PAGE_SIZE: u32 = 4096;
/// The code segment selector (GDT entry 1) and the data segment selector (entry 2).
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
/// Flat 4 GiB segments: base 0, limit 0xfffff in 4 KiB units, 32-bit, present, ring 0;
/// code is execute/read, data read/write.
const GDT: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
/// COM1's transmit register.
const COM1: u16 = 0x3f8;
/// What the guest writes to COM1 after each pass.
pub const PASS_MARK: u8 = b'B';
/// The port of the "fast A20" gate (system control port A).
const SYSTEM_CONTROL_A: u16 = 0x92;

/// What the guest does, patched into the sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParameters {
    /// The first address past the pages dirtied: pages in `[1 MiB, end)` are.
    pub end: u32,
    /// Pages between two delays.
    pub batch: u32,
    /// Iterations of the delay loop after each batch (0: unpaced).
    pub delay: u32,
    /// Passes before the guest halts (0: never).
    pub passes: u32,
}

impl GuestParameters {
    /// Pages dirtied in one pass.
    pub fn pages_per_pass(&self) -> u64 {
        u64::from(self.end.saturating_sub(FIRST_DIRTY_ADDRESS) / PAGE_SIZE)
    }
}

/// The boot sector for these parameters.
///
/// # Errors
///
/// Fails when `end` leaves no page to dirty or is not page-aligned, when `batch` is 0,
/// or when the code does not fit its place in the sector.
pub fn boot_sector(parameters: &GuestParameters) -> Result<[u8; SECTOR]> {
    ensure!(
        parameters.end > FIRST_DIRTY_ADDRESS && parameters.end.is_multiple_of(PAGE_SIZE),
        "the guest's end {:#x} must be page-aligned and above 1 MiB",
        parameters.end
    );
    ensure!(
        parameters.batch > 0,
        "the guest's batch must be at least 1 page"
    );
    let mut sector = [0u8; SECTOR];
    let real_mode = real_mode_code()?;
    let protected_mode = protected_mode_code()?;
    ensure!(
        real_mode.len() <= PROTECTED_OFFSET,
        "the 16-bit code is {} bytes, more than its {PROTECTED_OFFSET}",
        real_mode.len()
    );
    ensure!(
        PROTECTED_OFFSET + protected_mode.len() <= GDT_OFFSET,
        "the 32-bit code is {} bytes, more than its {}",
        protected_mode.len(),
        GDT_OFFSET - PROTECTED_OFFSET
    );
    sector[..real_mode.len()].copy_from_slice(&real_mode);
    sector[PROTECTED_OFFSET..][..protected_mode.len()].copy_from_slice(&protected_mode);
    for (index, entry) in GDT.iter().enumerate() {
        sector[GDT_OFFSET + 8 * index..][..8].copy_from_slice(&entry.to_le_bytes());
    }
    let gdt_limit = u16::try_from(8 * GDT.len() - 1).context("GDT size")?;
    sector[GDT_DESCRIPTOR_OFFSET..][..2].copy_from_slice(&gdt_limit.to_le_bytes());
    sector[GDT_DESCRIPTOR_OFFSET + 2..][..4].copy_from_slice(&address(GDT_OFFSET).to_le_bytes());
    for (offset, value) in [
        (END_OFFSET, parameters.end),
        (BATCH_OFFSET, parameters.batch),
        (DELAY_OFFSET, parameters.delay),
        (PASSES_OFFSET, parameters.passes),
    ] {
        sector[offset..][..4].copy_from_slice(&value.to_le_bytes());
    }
    sector[SECTOR - 2..].copy_from_slice(&[0x55, 0xaa]);
    Ok(sector)
}

/// The guest address of a sector offset.
fn address(offset: usize) -> u32 {
    // Offsets are below SECTOR, so this neither truncates nor overflows.
    LOAD_ADDRESS + offset as u32
}

/// Real mode to 32-bit protected mode, as the BIOS left the processor.
fn real_mode_code() -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.in_(al, u32::from(SYSTEM_CONTROL_A))?;
    a.or(al, 2)?;
    a.out(u32::from(SYSTEM_CONTROL_A), al)?;
    a.lgdt(ptr(address(GDT_DESCRIPTOR_OFFSET)))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    a.jmp_far(CODE_SELECTOR, address(PROTECTED_OFFSET))?;
    Ok(a.assemble(u64::from(LOAD_ADDRESS))?)
}

/// The dirtying loop. Registers: `ebx` the page, `ecx` the batch or delay count, `esi`
/// `end`, `edi` passes done, `ebp` the delay of this pass (0 in the first).
fn protected_mode_code() -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(32)?;
    let mut pass = a.create_label();
    let mut batch = a.create_label();
    let mut page = a.create_label();
    let mut delay = a.create_label();
    let mut pass_done = a.create_label();
    let mut halt = a.create_label();

    a.mov(ax, u32::from(DATA_SELECTOR))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(esi, dword_ptr(address(END_OFFSET)))?;
    a.xor(edi, edi)?;
    a.xor(ebp, ebp)?;

    a.set_label(&mut pass)?;
    a.mov(ebx, FIRST_DIRTY_ADDRESS)?;
    a.set_label(&mut batch)?;
    a.mov(ecx, dword_ptr(address(BATCH_OFFSET)))?;
    a.set_label(&mut page)?;
    a.cmp(ebx, esi)?;
    a.jae(pass_done)?;
    a.inc(byte_ptr(ebx))?;
    a.add(ebx, PAGE_SIZE)?;
    a.dec(ecx)?;
    a.jnz(page)?;
    a.mov(ecx, ebp)?;
    a.jecxz(batch)?;
    a.set_label(&mut delay)?;
    a.dec(ecx)?;
    a.jnz(delay)?;
    a.jmp(batch)?;

    a.set_label(&mut pass_done)?;
    a.mov(dx, u32::from(COM1))?;
    a.mov(al, u32::from(PASS_MARK))?;
    a.out(dx, al)?;
    a.inc(edi)?;
    a.cmp(edi, dword_ptr(address(PASSES_OFFSET)))?;
    a.je(halt)?;
    a.mov(ebp, dword_ptr(address(DELAY_OFFSET)))?;
    a.jmp(pass)?;

    a.set_label(&mut halt)?;
    a.hlt()?;
    a.jmp(halt)?;
    Ok(a.assemble(u64::from(address(PROTECTED_OFFSET)))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMETERS: GuestParameters = GuestParameters {
        end: 64 << 20,
        batch: 64,
        delay: 0x1234_5678,
        passes: 0,
    };

    fn word(sector: &[u8; SECTOR], offset: usize) -> u32 {
        u32::from_le_bytes(sector[offset..][..4].try_into().unwrap())
    }

    #[test]
    fn boot_sector_layout() -> Result<()> {
        let sector = boot_sector(&PARAMETERS)?;
        assert_eq!(sector.len(), 512);
        assert_eq!(sector[510..], [0x55, 0xaa]);
        assert_eq!(word(&sector, END_OFFSET), 64 << 20);
        assert_eq!(word(&sector, BATCH_OFFSET), 64);
        assert_eq!(word(&sector, DELAY_OFFSET), 0x1234_5678);
        assert_eq!(word(&sector, PASSES_OFFSET), 0);
        // The 16-bit code starts with `cli` and jumps far to the 32-bit code.
        assert_eq!(sector[0], 0xfa);
        let far_jump = [0xea, 0x40, 0x7c, 0x08, 0x00];
        assert!(sector[..PROTECTED_OFFSET]
            .windows(far_jump.len())
            .any(|window| window == far_jump));
        assert_eq!(PARAMETERS.pages_per_pass(), (63 << 20) / 4096);
        Ok(())
    }

    #[test]
    fn only_the_parameters_change() -> Result<()> {
        let idle = GuestParameters {
            delay: 7,
            passes: 1,
            ..PARAMETERS
        };
        let (left, right) = (boot_sector(&PARAMETERS)?, boot_sector(&idle)?);
        let differing: Vec<usize> = (0..SECTOR).filter(|&i| left[i] != right[i]).collect();
        assert!(differing
            .iter()
            .all(|&i| (DELAY_OFFSET..PASSES_OFFSET + 4).contains(&i)));
        Ok(())
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for parameters in [
            GuestParameters {
                end: FIRST_DIRTY_ADDRESS,
                ..PARAMETERS
            },
            GuestParameters {
                end: (64 << 20) + 1,
                ..PARAMETERS
            },
            GuestParameters {
                batch: 0,
                ..PARAMETERS
            },
        ] {
            assert!(boot_sector(&parameters).is_err(), "{parameters:?}");
        }
    }
}
