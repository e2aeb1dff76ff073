//! Locking and waiting that ignore poison. A panicking migration thread is reported
//! through `join`, and the state behind these locks
//! stays consistent across a panic (plain flags, counters and lists), so a poisoned lock is
//! taken as it is rather than turned into a second panic. A leaf: it imports nothing from
//! the crate.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Far enough ahead to mean "never" for a migration, near enough that adding it to any
/// `Instant` of a running system does not overflow (a century).
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The instant `timeout` from now; a timeout too large to represent (an operator's
/// "no limit") is taken as [`NEVER`] instead of overflowing.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout.min(NEVER)).unwrap_or(now)
}

/// Locks `mutex`, ignoring poison.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar` once, ignoring poison.
pub(crate) fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar` once for at most `timeout`, ignoring poison.
pub(crate) fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}
