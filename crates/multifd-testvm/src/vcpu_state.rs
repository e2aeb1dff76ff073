//! vCPU and VM state as bytes: what travels as the `cpu/N` and `vm` devices.
//!
//! A vCPU's state is what KVM holds for it: general registers, special registers (segments,
//! control registers, descriptor tables, EFER, APIC base), the XSAVE area (x87, SSE, AVX
//! and any other component the host enabled), the XCRs, every MSR KVM lists that reads
//! and writes back on this host, pending events (exceptions, NMI, interrupt shadow), the
//! multiprocessing state and the debug registers. The VM's is the KVM clock. The VMM
//! creates no in-kernel irqchip or PIT (the guest never enables interrupts), so there is
//! no LAPIC, IOAPIC, PIC or PIT state to move.
//!
//! # Encoding
//!
//! ```text
//! magic "MFDS" | version u16 | kind u16 (1 vCPU, 2 VM) | sections
//! section = tag u16 | length u32 | bytes
//! ```
//!
//! little-endian throughout. Each KVM structure is its section's bytes exactly, in the
//! kernel's ABI layout (stable by design); its length must be the structure's size. MSRs
//! are a count and (index u32, value u64) pairs. Every section must appear exactly once;
//! an unknown tag, a duplicate, a missing section, a short or long blob is an
//! [`Error::State`], never a panic.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::Error;

/// "MFDS": multifd state.
const MAGIC: [u8; 4] = *b"MFDS";
/// The encoding's version; a blob of another version is refused.
const VERSION: u16 = 1;
const KIND_VCPU: u16 = 1;
const KIND_VM: u16 = 2;

const TAG_REGS: u16 = 1;
const TAG_SREGS: u16 = 2;
const TAG_XSAVE: u16 = 3;
const TAG_XCRS: u16 = 4;
const TAG_MSRS: u16 = 5;
const TAG_EVENTS: u16 = 6;
const TAG_MP_STATE: u16 = 7;
const TAG_DEBUG_REGS: u16 = 8;
const TAG_CLOCK: u16 = 9;

/// KVM structures that are plain bytes.
///
/// # Safety
///
/// Implementors are `repr(C)` structures of integers and arrays of integers with no
/// implicit padding, for which every bit pattern is a valid value. kvm-bindings derives
/// zerocopy's `IntoBytes` and `FromBytes` for each of the types below (under its `serde`
/// feature), which checks exactly this at compile time.
unsafe trait Plain: Sized {
    fn bytes(&self) -> &[u8] {
        // SAFETY: per the trait's contract every byte of `Self` is initialized (no
        // padding), and the slice covers exactly `self`, borrowed for its lifetime.
        unsafe {
            std::slice::from_raw_parts((self as *const Self).cast(), std::mem::size_of::<Self>())
        }
    }

    /// `Self` from exactly `size_of::<Self>()` bytes.
    fn read(bytes: &[u8], what: &str) -> Result<Self, Error> {
        if bytes.len() != std::mem::size_of::<Self>() {
            return Err(Error::State(format!(
                "{what}: {} bytes, expected {}",
                bytes.len(),
                std::mem::size_of::<Self>()
            )));
        }
        // SAFETY: `bytes` holds exactly `size_of::<Self>()` bytes (checked), any bit
        // pattern is a valid `Self` (the trait's contract), and `read_unaligned` does not
        // need the slice aligned.
        Ok(unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() })
    }
}

// SAFETY: see the trait: kvm-bindings derives zerocopy's IntoBytes + FromBytes for each.
unsafe impl Plain for kvm_regs {}
// SAFETY: as above.
unsafe impl Plain for kvm_sregs {}
// SAFETY: as above (the flexible array `extra` is zero-sized).
unsafe impl Plain for kvm_xsave {}
// SAFETY: as above.
unsafe impl Plain for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Plain for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Plain for kvm_mp_state {}
// SAFETY: as above.
unsafe impl Plain for kvm_debugregs {}
// SAFETY: as above.
unsafe impl Plain for kvm_clock_data {}

/// A KVM ioctl's error, naming what it did.
fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Everything KVM holds for one vCPU.
#[non_exhaustive]
pub struct VcpuState {
    /// General registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area (x87, SSE and the extended components).
    pub xsave: kvm_xsave,
    /// XCR0 and the other extended control registers.
    pub xcrs: kvm_xcrs,
    /// (index, value) of every MSR saved, in the order saved.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMI, SMM state.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, …
    pub mp_state: kvm_mp_state,
    /// DR0–DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VcpuState")
            .field("regs", &self.regs)
            .field("sregs", &self.sregs)
            .field("xcrs", &self.xcrs)
            .field("msrs", &self.msrs.len())
            .field("events", &self.events)
            .field("mp_state", &self.mp_state)
            .field("debug_regs", &self.debug_regs)
            .finish_non_exhaustive()
    }
}

impl PartialEq for VcpuState {
    fn eq(&self, other: &Self) -> bool {
        self.regs == other.regs
            && self.sregs == other.sregs
            && self.xsave.region == other.xsave.region
            && self.xcrs == other.xcrs
            && self.msrs == other.msrs
            && self.events == other.events
            && self.mp_state == other.mp_state
            && self.debug_regs == other.debug_regs
    }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running; `msrs` are the MSR indices to save
    /// (those of KVM_GET_MSR_INDEX_LIST this host saves and restores; [`crate::KvmVm`]
    /// finds them when it creates its vCPUs).
    pub fn save(vcpu: &VcpuFd, msrs: &[u32]) -> Result<Self, Error> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut list = Msrs::from_entries(&entries)
            .map_err(|error| Error::State(format!("MSR list: {error:?}")))?;
        let read = vcpu
            .get_msrs(&mut list)
            .map_err(kvm_error("KVM_GET_MSRS"))?;
        if read != msrs.len() {
            return Err(Error::State(format!(
                "KVM_GET_MSRS read {read} of {} MSRs (stopped at {:#x})",
                msrs.len(),
                msrs.get(read).copied().unwrap_or(0)
            )));
        }
        Ok(Self {
            regs: vcpu.get_regs().map_err(kvm_error("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm_error("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm_error("KVM_GET_XCRS"))?,
            msrs: list
                .as_slice()
                .iter()
                .map(|entry| (entry.index, entry.data))
                .collect(),
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_error("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm_error("KVM_GET_MP_STATE"))?,
            debug_regs: vcpu
                .get_debug_regs()
                .map_err(kvm_error("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Writes the state into a vCPU that is not running.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_error("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_error("KVM_SET_REGS"))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(kvm_error("KVM_SET_XCRS"))?;
        // SAFETY: `kvm_xsave` is the 4096-byte legacy structure and the VMM never enables
        // KVM_CAP_XSAVE2 (nor asks for AMX), so KVM_SET_XSAVE reads exactly 4096 bytes.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_error("KVM_SET_XSAVE"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries)
            .map_err(|error| Error::State(format!("MSR list: {error:?}")))?;
        let written = vcpu.set_msrs(&list).map_err(kvm_error("KVM_SET_MSRS"))?;
        if written != entries.len() {
            return Err(Error::State(format!(
                "KVM_SET_MSRS wrote {written} of {} MSRs (refused {:#x})",
                entries.len(),
                entries.get(written).map_or(0, |entry| entry.index)
            )));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_error("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_error("KVM_SET_MP_STATE"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm_error("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }

    /// The encoded state (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = header(KIND_VCPU);
        section(&mut out, TAG_REGS, self.regs.bytes());
        section(&mut out, TAG_SREGS, self.sregs.bytes());
        section(&mut out, TAG_XSAVE, self.xsave.bytes());
        section(&mut out, TAG_XCRS, self.xcrs.bytes());
        let mut msrs = Vec::with_capacity(4 + 12 * self.msrs.len());
        msrs.extend_from_slice(&(self.msrs.len() as u32).to_le_bytes());
        for (index, value) in &self.msrs {
            msrs.extend_from_slice(&index.to_le_bytes());
            msrs.extend_from_slice(&value.to_le_bytes());
        }
        section(&mut out, TAG_MSRS, &msrs);
        section(&mut out, TAG_EVENTS, self.events.bytes());
        section(&mut out, TAG_MP_STATE, self.mp_state.bytes());
        section(&mut out, TAG_DEBUG_REGS, self.debug_regs.bytes());
        out
    }

    /// Decodes an encoded vCPU state, checking every length.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let sections = sections(
            bytes,
            KIND_VCPU,
            &[
                TAG_REGS,
                TAG_SREGS,
                TAG_XSAVE,
                TAG_XCRS,
                TAG_MSRS,
                TAG_EVENTS,
                TAG_MP_STATE,
                TAG_DEBUG_REGS,
            ],
        )?;
        let [regs, sregs, xsave, xcrs, msrs, events, mp_state, debug_regs] = sections[..] else {
            unreachable!("`sections` returns one slice per tag asked for")
        };
        Ok(Self {
            regs: Plain::read(regs, "regs")?,
            sregs: Plain::read(sregs, "sregs")?,
            xsave: Plain::read(xsave, "xsave")?,
            xcrs: Plain::read(xcrs, "xcrs")?,
            msrs: decode_msrs(msrs)?,
            events: Plain::read(events, "vcpu events")?,
            mp_state: Plain::read(mp_state, "mp state")?,
            debug_regs: Plain::read(debug_regs, "debug registers")?,
        })
    }
}

fn decode_msrs(bytes: &[u8]) -> Result<Vec<(u32, u64)>, Error> {
    let bad = || Error::State(format!("MSR section of {} bytes is malformed", bytes.len()));
    let (count, pairs) = bytes.split_first_chunk::<4>().ok_or_else(bad)?;
    let count = u32::from_le_bytes(*count) as usize;
    if pairs.len() != count.checked_mul(12).ok_or_else(bad)? {
        return Err(bad());
    }
    Ok(pairs
        .chunks_exact(12)
        .map(|pair| {
            let (index, value) = pair.split_at(4);
            (
                u32::from_le_bytes(index.try_into().unwrap_or_default()),
                u64::from_le_bytes(value.try_into().unwrap_or_default()),
            )
        })
        .collect())
}

/// The VM-wide state: the KVM clock.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct VmState {
    /// The guest's kvmclock, as KVM_GET_CLOCK reads it.
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Reads the VM's state (its vCPUs stopped).
    pub fn save(vm: &VmFd) -> Result<Self, Error> {
        Ok(Self {
            clock: vm.get_clock().map_err(kvm_error("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the clock into `vm`: the guest's clock goes on from where it stopped.
    pub fn restore(&self, vm: &VmFd) -> Result<(), Error> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_error("KVM_SET_CLOCK"))
    }

    /// The encoded state.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = header(KIND_VM);
        section(&mut out, TAG_CLOCK, self.clock.bytes());
        out
    }

    /// Decodes an encoded VM state.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let sections = sections(bytes, KIND_VM, &[TAG_CLOCK])?;
        Ok(Self {
            clock: Plain::read(sections[0], "clock")?,
        })
    }
}

/// The MSRs of `kvm`'s index list that this host reads and writes back on `vcpu` (a
/// fresh vCPU of the VM, not running): the list KVM reports includes MSRs a given CPU
/// lacks, which KVM_GET_MSRS / KVM_SET_MSRS refuse.
pub fn saveable_msrs(kvm: &kvm_ioctls::Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, Error> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_error("KVM_GET_MSR_INDEX_LIST"))?;
    let mut saveable = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|error| Error::State(format!("MSR list: {error:?}")))?;
        if vcpu.get_msrs(&mut one).ok() != Some(1) {
            continue;
        }
        if vcpu.set_msrs(&one).ok() == Some(1) {
            saveable.push(index);
        }
    }
    Ok(saveable)
}

fn header(kind: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(8192);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out
}

fn section(out: &mut Vec<u8>, tag: u16, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The sections of `bytes`, one per tag of `tags` in that order, each present once.
fn sections<'a>(bytes: &'a [u8], kind: u16, tags: &[u16]) -> Result<Vec<&'a [u8]>, Error> {
    let bad = |what: String| Error::State(what);
    let (magic, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| bad(format!("state of {} bytes has no header", bytes.len())))?;
    if *magic != MAGIC {
        return Err(bad(format!(
            "state magic {magic:02x?}, expected {MAGIC:02x?}"
        )));
    }
    let (version, rest) = take_u16(rest, "version")?;
    if version != VERSION {
        return Err(bad(format!(
            "state version {version}, this build reads {VERSION}"
        )));
    }
    let (found_kind, mut rest) = take_u16(rest, "kind")?;
    if found_kind != kind {
        return Err(bad(format!("state kind {found_kind}, expected {kind}")));
    }
    let mut found: Vec<Option<&[u8]>> = vec![None; tags.len()];
    while !rest.is_empty() {
        let (tag, after) = take_u16(rest, "section tag")?;
        let (length, after) = after
            .split_first_chunk::<4>()
            .ok_or_else(|| bad(format!("section {tag} has no length")))?;
        let length = u32::from_le_bytes(*length) as usize;
        if after.len() < length {
            return Err(bad(format!(
                "section {tag} claims {length} bytes, {} left",
                after.len()
            )));
        }
        let (body, after) = after.split_at(length);
        let slot = tags
            .iter()
            .position(|&known| known == tag)
            .ok_or_else(|| bad(format!("unknown section {tag}")))?;
        if found[slot].replace(body).is_some() {
            return Err(bad(format!("section {tag} appears twice")));
        }
        rest = after;
    }
    found
        .into_iter()
        .zip(tags)
        .map(|(body, tag)| body.ok_or_else(|| bad(format!("section {tag} is missing"))))
        .collect()
}

fn take_u16<'a>(bytes: &'a [u8], what: &str) -> Result<(u16, &'a [u8]), Error> {
    let (value, rest) = bytes
        .split_first_chunk::<2>()
        .ok_or_else(|| Error::State(format!("state truncated at its {what}")))?;
    Ok((u16::from_le_bytes(*value), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut out = header(KIND_VM);
        let clock = kvm_clock_data {
            clock: 0x1234_5678,
            ..Default::default()
        };
        section(&mut out, TAG_CLOCK, clock.bytes());
        out
    }

    #[test]
    fn vm_state_round_trips() {
        let state = VmState::decode(&sample()).unwrap();
        assert_eq!(state.clock.clock, 0x1234_5678);
        assert_eq!(state.encode(), sample());
    }

    #[test]
    fn every_truncation_and_garbling_is_an_error() {
        let blob = sample();
        for length in 0..blob.len() {
            assert!(VmState::decode(&blob[..length]).is_err(), "{length}");
        }
        for index in 0..12 {
            let mut garbled = blob.clone();
            garbled[index] ^= 0x40;
            assert!(VmState::decode(&garbled).is_err(), "byte {index}");
        }
        let mut twice = blob.clone();
        twice.extend_from_slice(&blob[8..]);
        assert!(VmState::decode(&twice).is_err());
        let mut long = blob;
        long.push(0);
        assert!(VmState::decode(&long).is_err());
        assert!(VcpuState::decode(&sample()).is_err());
        assert!(decode_msrs(&[1, 0, 0, 0, 1]).is_err());
    }
}
