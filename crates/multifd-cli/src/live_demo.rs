//! `multifd demo --guest threads`: a live migration of a simulated guest whose writer
//! threads keep dirtying memory, driven by the engine's precopy driver over loopback,
//! then checked byte for byte against the source at the moment of the stop.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use multifd::{Address, CompressionSettings, DeviceId, Phase, PrecopyStats, TimeoutStrategy};
use multifd_cli::image::parse_size;
use multifd_testvm::{LocalMigration, PatternDevice, ThreadGuestConfig};
use serde_json::json;

/// The simulated guest's settings on the command line.
#[derive(clap::Args)]
pub struct LiveArgs {
    /// Guest memory.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// Bytes per second the guest dirties (e.g. 400M); 0 for an idle guest.
    #[arg(long, default_value = "100M", value_parser = parse_rate)]
    dirty_rate: u64,
    /// The longest the guest may stay stopped, in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_limit_ms: u64,
    /// Wire bytes per second over all channels (e.g. 1G); unlimited by default.
    #[arg(long, value_parser = parse_size)]
    max_bandwidth: Option<u64>,
    /// Throttle the guest when it dirties memory faster than the link moves it.
    #[arg(long)]
    auto_converge: bool,
    /// Seconds precopy may run before `--timeout-strategy` decides (0: no limit). A
    /// guest that never converges would otherwise run until interrupted.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// What the timeout does: cancel (the guest stays on the source) or force.
    #[arg(long, value_enum, default_value_t = Strategy::Cancel)]
    timeout_strategy: Strategy,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Strategy {
    Cancel,
    Force,
}

/// A byte rate: `0`, or a size such as `400M`.
fn parse_rate(text: &str) -> Result<u64, String> {
    if text == "0" {
        Ok(0)
    } else {
        parse_size(text)
    }
}

/// The demo's two devices: a 100 MiB one (a GPU's memory) and a 4 KiB one.
const DEVICES: [(&str, usize); 2] = [("gpu", 100 << 20), ("rtc", 4096)];

/// Runs the live demo; `Err` (a non-zero exit) when it failed or did not verify.
pub fn run(
    live: &LiveArgs,
    channels: u8,
    compression: Option<CompressionSettings>,
    json: bool,
) -> Result<()> {
    let mut guest = ThreadGuestConfig::default();
    guest.memory = live.memory;
    guest.dirty_rate = live.dirty_rate;
    let directory = tempfile::tempdir().context("a directory for the socket")?;
    let address: Address = format!("unix:{}", directory.path().join("live.sock").display())
        .parse()
        .context("the socket address")?;
    let mut migration = LocalMigration::new(guest, address);
    migration.devices = DEVICES
        .iter()
        .enumerate()
        .map(|(seed, &(name, size))| {
            (
                DeviceId::new(name, 0),
                PatternDevice::new(size, seed as u64 + 1),
            )
        })
        .collect();
    migration.source.channels = channels;
    if let Some(compression) = compression {
        migration.source.compression = compression;
    }
    migration.source.max_bandwidth = live.max_bandwidth;
    migration.precopy.downtime_limit = Duration::from_millis(live.downtime_limit_ms);
    migration.precopy.auto_converge = live.auto_converge;
    migration.precopy.timeout = (live.timeout > 0).then(|| Duration::from_secs(live.timeout));
    migration.precopy.timeout_strategy = match live.timeout_strategy {
        Strategy::Cancel => TimeoutStrategy::Cancel,
        Strategy::Force => TimeoutStrategy::Force,
    };
    let report = migration.run(&mut |progress| {
        if !json && matches!(progress.phase, Phase::Round(_) | Phase::Switchover) {
            eprintln!(
                "{:>10}  dirty {:>8.1} MiB  rate {:>8.1} MiB/s  bandwidth {:>8.1} MiB/s  expected downtime {:>7.1} ms  throttle {:>2}%",
                progress.phase.to_string(),
                progress.remaining_dirty_bytes as f64 / MIB,
                progress.dirty_rate / MIB,
                progress.bandwidth / MIB,
                progress.expected_downtime.as_secs_f64() * 1e3,
                progress.throttle_percent,
            );
        }
    })?;
    let destination_downtime = report
        .destination
        .as_ref()
        .ok()
        .and_then(|stats| stats.switchover_time);
    match report.result {
        Ok(stats) => {
            let verified = report.mismatch.is_none();
            if json {
                multifd_cli::outln!("{}", summary(&stats, destination_downtime, verified));
            } else {
                print_table(&stats, destination_downtime, verified);
            }
            if let Some(mismatch) = report.mismatch {
                bail!("verification failed: {mismatch}");
            }
            Ok(())
        }
        Err(error) => {
            if json {
                multifd_cli::outln!(
                    "{}",
                    json!({
                        "status": "failed",
                        "error": error.to_string(),
                        "source_running": report.source_running,
                    })
                );
            }
            bail!(
                "live migration failed: {error} (the guest {} on the source)",
                if report.source_running {
                    "keeps running"
                } else {
                    "is stopped"
                }
            )
        }
    }
}

const MIB: f64 = (1u64 << 20) as f64;

fn summary(
    stats: &PrecopyStats,
    destination_downtime: Option<Duration>,
    verified: bool,
) -> serde_json::Value {
    json!({
        "status": "completed",
        "verified": verified,
        "rounds": stats.rounds.len(),
        "downtime_ms": stats.downtime.as_secs_f64() * 1e3,
        "destination_downtime_ms": destination_downtime.map(|downtime| downtime.as_secs_f64() * 1e3),
        "expected_downtime_ms": stats.expected_downtime.as_secs_f64() * 1e3,
        "device_save_ms": stats.migration.device_save_time.map(|time| time.as_secs_f64() * 1e3),
        "drain_ms": stats.migration.drain_time.map(|time| time.as_secs_f64() * 1e3),
        "total_seconds": stats.total_time.as_secs_f64(),
        "max_throttle_percent": stats.max_throttle_percent,
        "forced": stats.forced,
        "final_pages": stats.final_pages,
        "bytes": stats.migration.bytes,
        "device_bytes": stats.migration.device_bytes,
        "per_round": stats.rounds.iter().map(|round| json!({
            "round": round.round,
            "pages_sent": round.pages_sent,
            "pages_dirtied": round.pages_dirtied,
            "bytes": round.bytes,
            "seconds": round.duration.as_secs_f64(),
            "throttle_percent": round.throttle_percent,
        })).collect::<Vec<_>>(),
    })
}

fn print_table(stats: &PrecopyStats, destination_downtime: Option<Duration>, verified: bool) {
    multifd_cli::outln!(
        "{:>5} {:>12} {:>12} {:>10} {:>9} {:>9}",
        "round",
        "pages sent",
        "dirtied",
        "MiB",
        "seconds",
        "throttle"
    );
    for round in &stats.rounds {
        multifd_cli::outln!(
            "{:>5} {:>12} {:>12} {:>10.1} {:>9.3} {:>8}%",
            round.round,
            round.pages_sent,
            round.pages_dirtied,
            round.bytes as f64 / MIB,
            round.duration.as_secs_f64(),
            round.throttle_percent
        );
    }
    multifd_cli::outln!("final round after the stop: {} pages", stats.final_pages);
    multifd_cli::outln!(
        "downtime: {:.1} ms (source stop -> Completed), {} (destination switchover -> loaded); expected {:.1} ms",
        stats.downtime.as_secs_f64() * 1e3,
        destination_downtime.map_or("n/a".into(), |downtime| format!("{:.1} ms", downtime.as_secs_f64() * 1e3)),
        stats.expected_downtime.as_secs_f64() * 1e3
    );
    multifd_cli::outln!(
        "total {:.2} s, {:.1} MiB on the wire ({:.1} MiB/s), max throttle {}%{}; verified: {}",
        stats.total_time.as_secs_f64(),
        stats.migration.bytes as f64 / MIB,
        stats.migration.bytes as f64 / MIB / stats.total_time.as_secs_f64(),
        stats.max_throttle_percent,
        if stats.forced {
            ", switchover forced by the timeout"
        } else {
            ""
        },
        if verified {
            "memory and devices match the source at the stop"
        } else {
            "MISMATCH"
        }
    );
}
