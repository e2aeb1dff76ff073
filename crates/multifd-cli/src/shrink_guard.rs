//! Keeps `send` alive when a memory-image file shrinks under it.
//!
//! `send` maps its image files. If another process truncates one, every access to a page
//! past the file's new end raises `SIGBUS`, which would kill `send` in the middle of a
//! migration. While a guard is in place, a `SIGBUS` handler maps an anonymous zero page
//! over a faulting page that lies in a guarded mapping and returns, so that the access
//! completes (reading zeros). The engine then finds, before it declares completion, that
//! the file no longer covers its block ([`multifd::RamBlock::check_file`]), and the
//! migration fails on both ends with an error naming the block. A fault anywhere else
//! takes the default action, as if no handler were installed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use anyhow::{bail, Result};
use multifd::GuestMemory;

/// Mappings guarded at once: one per `--ram` of a `send`, which names a handful.
const MAX_GUARDED: usize = 64;

/// A guarded address range, `[start, end)`; `0..0` is free. Atomics, because the signal
/// handler reads them at any moment.
struct Range {
    start: AtomicUsize,
    end: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // Only to initialise `RANGES`.
const FREE: Range = Range {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
};

static RANGES: [Range; MAX_GUARDED] = [FREE; MAX_GUARDED];

static INSTALL: Once = Once::new();

/// Guards every block of `memory` (mapped from files) for the rest of the process.
pub fn guard(memory: &GuestMemory) -> Result<()> {
    let mut installed = Ok(());
    INSTALL.call_once(|| installed = install());
    installed?;
    for block in memory.blocks() {
        let start = block.as_ptr() as usize;
        let end = start + block.len() as usize;
        let free = RANGES
            .iter()
            .find(|range| range.end.load(Ordering::Acquire) == 0);
        let Some(range) = free else {
            bail!("more than {MAX_GUARDED} memory files to guard");
        };
        range.start.store(start, Ordering::Release);
        range.end.store(end, Ordering::Release);
    }
    Ok(())
}

fn install() -> Result<()> {
    // SAFETY: an all-zero sigaction is a valid starting point (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised and names a handler of the SA_SIGINFO signature;
    // the old action is not needed.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } != 0 {
        bail!(
            "installing the SIGBUS handler: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The `SIGBUS` handler. It only reads atomics and makes two system calls (`mmap`,
/// `sigaction`), all async-signal-safe on Linux.
extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGBUS
    // `si_addr` is the faulting address.
    let address = unsafe { (*info).si_addr() } as usize;
    let guarded = RANGES.iter().any(|range| {
        let start = range.start.load(Ordering::Acquire);
        address >= start && address < range.end.load(Ordering::Acquire)
    });
    if guarded {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let base = address & !(page - 1);
        // SAFETY: the page lies inside a mapping this process made for the migration,
        // which no Rust reference covers (the engine only reads it through raw pointers
        // and system calls); replacing it with a private zero page changes only what
        // those reads see.
        let mapped = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            return;
        }
    }
    // Not ours (or the page could not be replaced): the default action, once the
    // faulting access is retried.
    // SAFETY: an all-zero sigaction with SIG_DFL restores the default disposition.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
    }
}
