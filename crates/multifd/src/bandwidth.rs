//! One bandwidth budget shared by every channel of a migration: each channel thread
//! charges the bytes it wrote and sleeps when the migration as a whole is ahead of the
//! budget. Unlike a per-channel cap (QEMU's `max-bandwidth` is split this way in
//! practice by its single sender), the sum over all channels is what is capped, whatever
//! the channel count.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// How far the channels may run ahead of the budget at once. A channel writes a whole
/// packet (512 KiB by default) before it charges it, so the pace is only exact over
/// spans much longer than one packet; 20 ms of credit absorbs scheduling jitter without
/// letting a burst pass the cap noticeably over a second.
const BURST: Duration = Duration::from_millis(20);

/// A wire-bytes-per-second budget.
#[derive(Debug)]
pub(crate) struct BandwidthLimit {
    bytes_per_second: u64,
    /// When the bytes charged so far would have been sent at exactly the budget.
    paid_until: Mutex<Option<Instant>>,
}

impl BandwidthLimit {
    /// A budget of `bytes_per_second` (at least 1).
    pub(crate) fn new(bytes_per_second: u64) -> Self {
        Self {
            bytes_per_second: bytes_per_second.max(1),
            paid_until: Mutex::new(None),
        }
    }

    /// Charges `bytes` just written and returns how long the caller must pause for the
    /// migration to stay within the budget (zero when it is behind it).
    pub(crate) fn charge(&self, bytes: u64) -> Duration {
        let now = Instant::now();
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        let mut paid_until = lock(&self.paid_until);
        // Idle time earns no credit beyond the burst.
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = paid_until.map_or(earliest, |paid| paid.max(earliest));
        let paid = start + cost;
        *paid_until = Some(paid);
        paid.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_budget_holds() {
        let limit = BandwidthLimit::new(1_000_000);
        // 20 ms of credit: 20 kB pass without a pause.
        assert_eq!(limit.charge(20_000), Duration::ZERO);
        // The next 100 kB cost 100 ms at 1 MB/s.
        let pause = limit.charge(100_000);
        assert!(
            pause > Duration::from_millis(90) && pause <= Duration::from_millis(101),
            "{pause:?}"
        );
    }

    #[test]
    fn every_channel_shares_one_budget() {
        let limit = BandwidthLimit::new(1_000_000);
        let total: Duration = (0..10)
            .map(|_| limit.charge(100_000))
            .max()
            .unwrap_or_default();
        // Ten channels charging 100 kB each: the last waits about one second.
        assert!(total > Duration::from_millis(900), "{total:?}");
    }
}
