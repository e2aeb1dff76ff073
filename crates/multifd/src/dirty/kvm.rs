//! KVM's dirty log: the pages the guest wrote, per memory slot, one bit per page.
//!
//! Logging is switched on per slot by re-registering it with `KVM_MEM_LOG_DIRTY_PAGES`
//! (same address and size; KVM then only changes the flags). Two ways to harvest:
//!
//! - `KVM_GET_DIRTY_LOG` alone: the kernel copies the slot's bitmap out, clears it and
//!   write-protects the pages it reported, all under its MMU lock, so the next write to
//!   any of them is logged again.
//! - With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`):
//!   `KVM_GET_DIRTY_LOG` only copies, and `KVM_CLEAR_DIRTY_LOG` of exactly the bits read
//!   clears them and re-protects those pages. A write between the two lands on a page
//!   still reported and still writable: it is in memory before the clear, so the send
//!   that follows the harvest carries it; writes after the clear fault and are logged.
//!   Bits set between the two calls for other pages are not in the mask and survive.
//!   QEMU measured this ~40% faster on large guests; with `KVM_DIRTY_LOG_INITIALLY_SET`
//!   enabling logging write-protects nothing up front (every bit starts set, pages get
//!   protected as they are cleared).
//!
//! The capability is VM-wide and decides how a slot's bitmap is created when logging is
//! switched on (all ones with initially-set, and no up-front write protection), so it is
//! enabled before the slots get the logging flag.
//!
//! KVM's bitmap is little-endian (the kernel sets bits with `set_bit_le`): bit `i % 8` of
//! byte `i / 8` is page `i` of the slot, which read as little-endian `u64` words is the
//! layout [`DirtyLog::harvest`] fills.

use std::borrow::Borrow;
use std::fmt::Display;
use std::io;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    kvm_userspace_memory_region, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use super::{bitmap_words, block_pages, check_bitmap, first_error, unknown_block, DirtyLog};
use crate::error::Error;
use crate::ram::GuestMemory;

// kvm-ioctls has no wrapper for it; number and argument from the kernel's uapi kvm.h.
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Which KVM ioctls [`KvmDirtyLog`] harvests with.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvmDirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` when the kernel offers
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (with initially-set where offered), else
    /// `KVM_GET_DIRTY_LOG` alone.
    #[default]
    Auto,
    /// `KVM_GET_DIRTY_LOG` alone, which clears as it reads, even where manual protect is
    /// offered (it is switched off at start).
    GetDirtyLog,
}

/// A KVM memory slot holding part (or all) of a RAM block, as the VMM registered it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmSlot {
    /// The slot number as KVM takes it (address space id in the upper 16 bits).
    pub slot: u32,
    /// Guest physical address of the slot's first byte.
    pub guest_phys_addr: u64,
    /// The slot's size in bytes.
    pub size: u64,
    /// Index of the RAM block holding the slot's memory.
    pub block: usize,
    /// Where in the block the slot's memory starts: a multiple of 64 pages, so the slot's
    /// bitmap words land on whole words of the block's.
    pub block_offset: u64,
    /// The flags the VMM registered the slot with (e.g. `KVM_MEM_READONLY`), kept when
    /// logging is switched on and off.
    pub flags: u32,
}

impl KvmSlot {
    /// Slot `slot` at `guest_phys_addr`, `size` bytes from the start of block `block`,
    /// registered without flags.
    pub fn new(slot: u32, guest_phys_addr: u64, size: u64, block: usize) -> Self {
        Self {
            slot,
            guest_phys_addr,
            size,
            block,
            block_offset: 0,
            flags: 0,
        }
    }

    /// The same slot starting `block_offset` bytes into its block.
    pub fn at_block_offset(self, block_offset: u64) -> Self {
        Self {
            block_offset,
            ..self
        }
    }

    /// The same slot registered with `flags`.
    pub fn with_flags(self, flags: u32) -> Self {
        Self { flags, ..self }
    }
}

/// A slot, checked, with what its ioctls need.
#[derive(Debug)]
struct Slot {
    /// The registration as the VMM made it (flags without logging).
    region: kvm_userspace_memory_region,
    block: usize,
    /// The block's bitmap word holding the slot's first page.
    first_word: usize,
    /// The slot's page count, as `KVM_CLEAR_DIRTY_LOG` takes it.
    pages: u32,
}

/// KVM's dirty log for the memory slots holding a migration's RAM blocks: the guest's
/// writes. Combine it with a log of the VMM's own writes in a
/// [`DirtyLogUnion`](super::DirtyLogUnion).
///
/// `V` is how the log reaches the VM: `Arc<VmFd>` (the default), `&VmFd`, or `VmFd`.
///
/// In manual-protect mode with initially-set, the first harvest after `start` reports
/// every page of every slot: the precopy driver harvests once right after `start` and
/// sends everything in round 0 anyway, so nothing is sent twice, and that harvest is when
/// the pages get write-protected.
///
/// Enabling manual protect changes `KVM_GET_DIRTY_LOG` for every slot of the VM, and it
/// stays enabled after `stop`. The VM must not use the dirty ring (KVM then refuses the
/// dirty-log ioctls). Call `stop` when done: dropping the log leaves logging on.
#[derive(Debug)]
pub struct KvmDirtyLog<V = Arc<VmFd>> {
    vm: V,
    slots: Vec<Slot>,
    block_pages: Vec<u64>,
    /// Whether the kernel has `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
    manual_protect_offered: bool,
    /// The capability's flags `start` sets: 0 for `KVM_GET_DIRTY_LOG` alone.
    manual_protect: u64,
}

impl<V: Borrow<VmFd>> KvmDirtyLog<V> {
    /// A log over `slots` of `vm`, for the blocks of `memory` in pages of `page_size` bytes,
    /// which must be the host's page size (KVM logs host pages).
    ///
    /// # Safety
    ///
    /// Each slot must be registered in `vm`, as described (number, guest address, size,
    /// flags), over the bytes of its block from `block_offset`, and stay so while the log
    /// exists. (`start` and `stop` re-register the slots with that same memory; KVM refuses
    /// to move or resize an existing slot, but an unregistered slot number would be
    /// created over the block's memory, which the VM could then use after the block is
    /// gone.)
    pub unsafe fn new(
        vm: V,
        memory: &GuestMemory,
        page_size: u32,
        slots: &[KvmSlot],
        mode: KvmDirtyLogMode,
    ) -> Result<Self, Error> {
        let host_page_size = host_page_size()?;
        if u64::from(page_size) != host_page_size {
            return Err(Error::Config(format!(
                "KVM logs pages of {host_page_size} bytes, not {page_size}"
            )));
        }
        let block_pages = block_pages(memory, page_size)?;
        let slots = slots
            .iter()
            .enumerate()
            .map(|(index, slot)| {
                if slots[..index].iter().any(|other| other.slot == slot.slot) {
                    return Err(Error::Config(format!(
                        "KVM slot {} listed twice",
                        slot.slot
                    )));
                }
                checked_slot(memory, host_page_size, slot)
            })
            .collect::<Result<_, _>>()?;
        let offered = vm
            .borrow()
            .check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        let offered = u64::try_from(offered).unwrap_or(0);
        let manual_protect = match mode {
            KvmDirtyLogMode::Auto
                if offered & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) != 0 =>
            {
                offered
                    & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
            }
            _ => 0,
        };
        Ok(Self {
            vm,
            slots,
            block_pages,
            manual_protect_offered: offered != 0,
            manual_protect,
        })
    }

    /// Whether harvests use `KVM_CLEAR_DIRTY_LOG` (manual protect) rather than
    /// `KVM_GET_DIRTY_LOG` alone.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect != 0
    }

    /// Whether the first harvest after `start` reports every page (initially-set).
    pub fn initially_set(&self) -> bool {
        self.manual_protect & u64::from(KVM_DIRTY_LOG_INITIALLY_SET) != 0
    }

    /// Re-registers `slot` with `flags`.
    fn register(&self, slot: &Slot, flags: u32) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            flags,
            ..slot.region
        };
        // SAFETY: per `new`'s contract the slot is registered over exactly this memory and
        // stays so; KVM refuses to move or resize an existing slot, so only its flags change.
        unsafe { self.vm.borrow().set_user_memory_region(region) }.map_err(|error| {
            kvm_error(
                format_args!("KVM_SET_USER_MEMORY_REGION flags {flags:#x}"),
                region.slot,
                error,
            )
        })
    }
}

/// Checks a slot lies inside its block on whole pages, its bitmap starts on a word of the
/// block's, and its page count fits `KVM_CLEAR_DIRTY_LOG`.
fn checked_slot(memory: &GuestMemory, page_size: u64, slot: &KvmSlot) -> Result<Slot, Error> {
    let problem = |what: &str| Error::Config(format!("KVM slot {}: {what}", slot.slot));
    let block = memory
        .blocks()
        .get(slot.block)
        .ok_or_else(|| problem(&format!("no block {}", slot.block)))?;
    if slot.size == 0 || !slot.size.is_multiple_of(page_size) {
        return Err(problem(&format!("size {} is not whole pages", slot.size)));
    }
    if !slot.block_offset.is_multiple_of(64 * page_size) {
        return Err(problem(&format!(
            "block offset {:#x} is not a multiple of 64 pages",
            slot.block_offset
        )));
    }
    if slot
        .block_offset
        .checked_add(slot.size)
        .is_none_or(|end| end > block.len())
    {
        return Err(problem(&format!(
            "{} bytes at offset {:#x} run past block {:?}",
            slot.size,
            slot.block_offset,
            block.name()
        )));
    }
    let pages = u32::try_from(slot.size / page_size)
        .map_err(|_| problem("more pages than KVM_CLEAR_DIRTY_LOG can take"))?;
    Ok(Slot {
        region: kvm_userspace_memory_region {
            slot: slot.slot,
            flags: slot.flags & !KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: slot.guest_phys_addr,
            memory_size: slot.size,
            userspace_addr: block.as_ptr() as u64 + slot.block_offset,
        },
        block: slot.block,
        first_word: bitmap_words(slot.block_offset / page_size),
        pages,
    })
}

fn host_page_size() -> Result<u64, Error> {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).map_err(|_| Error::Config("sysconf(_SC_PAGESIZE) failed".into()))
}

/// An ioctl's error, naming it and the slot, keeping the errno's kind.
fn kvm_error(ioctl: impl Display, slot: u32, error: kvm_ioctls::Error) -> io::Error {
    let error = io::Error::from(error);
    io::Error::new(error.kind(), format!("{ioctl} on KVM slot {slot}: {error}"))
}

/// `KVM_CLEAR_DIRTY_LOG` of the pages set in `words` (the bitmap just read from the
/// whole slot): clears those bits and re-protects those pages.
fn clear_dirty_log(vm: &VmFd, slot: &Slot, words: &mut [u64]) -> io::Result<()> {
    let clear = kvm_clear_dirty_log {
        slot: slot.region.slot,
        num_pages: slot.pages,
        first_page: 0,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: words.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM file descriptor and `clear` a kvm_clear_dirty_log as the ioctl
    // takes it; its bitmap holds at least `num_pages` bits (`words` is the bitmap
    // KVM_GET_DIRTY_LOG filled for this slot) and outlives the call, during which the
    // kernel only reads it.
    let result = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if result == 0 {
        Ok(())
    } else {
        Err(kvm_error(
            "KVM_CLEAR_DIRTY_LOG",
            slot.region.slot,
            kvm_ioctls::Error::last(),
        ))
    }
}

impl<V: Borrow<VmFd> + Send> DirtyLog for KvmDirtyLog<V> {
    fn start(&mut self) -> io::Result<()> {
        if self.manual_protect_offered {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [self.manual_protect, 0, 0, 0],
                ..Default::default()
            };
            self.vm.borrow().enable_cap(&cap).map_err(|error| {
                let error = io::Error::from(error);
                io::Error::new(
                    error.kind(),
                    format!("KVM_ENABLE_CAP MANUAL_DIRTY_LOG_PROTECT2: {error}"),
                )
            })?;
        }
        for (started, slot) in self.slots.iter().enumerate() {
            if let Err(error) = self.register(slot, slot.region.flags | KVM_MEM_LOG_DIRTY_PAGES) {
                for slot in &self.slots[..started] {
                    // The start error is the one to report; this is cleanup.
                    let _ = self.register(slot, slot.region.flags);
                }
                return Err(error);
            }
        }
        Ok(())
    }

    fn harvest(&mut self, block: usize, bitmap: &mut [u64]) -> io::Result<()> {
        let pages = *self
            .block_pages
            .get(block)
            .ok_or_else(|| unknown_block(block))?;
        check_bitmap(block, pages, bitmap)?;
        let vm = self.vm.borrow();
        for slot in self.slots.iter().filter(|slot| slot.block == block) {
            let mut words = vm
                .get_dirty_log(slot.region.slot, slot.region.memory_size as usize)
                .map_err(|error| kvm_error("KVM_GET_DIRTY_LOG", slot.region.slot, error))?;
            if self.manual_protect() && words.iter().any(|&word| word != 0) {
                clear_dirty_log(vm, slot, &mut words)?;
            }
            for (out, word) in bitmap[slot.first_word..].iter_mut().zip(&words) {
                *out |= u64::from_le(*word);
            }
        }
        Ok(())
    }

    fn stop(&mut self) -> io::Result<()> {
        first_error(
            self.slots
                .iter()
                .map(|slot| self.register(slot, slot.region.flags)),
        )
    }
}
