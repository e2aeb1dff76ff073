//! CPU time of a process, for benchmarks: user plus system time from `/proc/PID/stat`.

use anyhow::{ensure, Context, Result};

/// CPU seconds (user + system, all threads) that process `pid` has used so far.
///
/// The kernel counts in clock ticks (usually 10 ms), which is precise enough for runs of
/// seconds.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields
    // from the last ')'. utime and stime are fields 14 and 15, i.e. the 12th and 13th
    // after the name.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    ensure!(fields.len() > 12, "{path}: only {} fields", fields.len());
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks_per_second > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(ticks as f64 / ticks_per_second as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_grows_with_work() -> Result<()> {
        let before = process_cpu_seconds(std::process::id())?;
        let started = std::time::Instant::now();
        let mut sum = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(100) {
            sum = std::hint::black_box(sum.wrapping_add(1));
        }
        let after = process_cpu_seconds(std::process::id())?;
        assert!(after >= before + 0.05, "{before} -> {after}");
        Ok(())
    }
}
