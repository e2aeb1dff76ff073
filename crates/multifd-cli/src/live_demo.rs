//! `multifd demo --guest threads`: a live migration of a simulated guest whose writer
//! threads keep dirtying memory, driven by the engine's precopy driver over loopback,
//! then checked byte for byte against the source at the moment of the stop.

use anyhow::{bail, Context, Result};
use multifd::{Address, DeviceId};
use multifd_cli::bench::parse_compression;
use multifd_testvm::{LocalMigration, PatternDevice, ThreadGuestConfig};
use serde_json::json;

use crate::precopy;
use crate::vm::{GuestArgs, MigrateSettings};

/// The demo's two devices: a 100 MiB one (a GPU's memory) and a 4 KiB one.
const DEVICES: [(&str, usize); 2] = [("gpu", 100 << 20), ("rtc", 4096)];

/// Runs the live demo; `Err` (a non-zero exit) when it failed or did not verify.
pub fn run(vm: &GuestArgs, settings: &MigrateSettings, json: bool) -> Result<()> {
    let mut guest = ThreadGuestConfig::default();
    guest.memory = vm.memory;
    guest.dirty_rate = vm.dirty_rate;
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
    migration.source.channels = settings.channels;
    if let Some(text) = &settings.compress {
        migration.source.compression = parse_compression(text).map_err(anyhow::Error::msg)?;
    }
    migration.source.max_bandwidth = settings.precopy.max_bandwidth;
    migration.precopy = settings.precopy.config();
    let report = migration.run(&mut |progress| {
        if let Some(line) = precopy::progress_line(progress).filter(|_| !json) {
            eprintln!("{line}");
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
            let mut summary = precopy::summary(&stats);
            summary["destination_downtime_ms"] =
                json!(destination_downtime.map(|downtime| downtime.as_secs_f64() * 1e3));
            summary["verified"] = json!(verified);
            if json {
                multifd_cli::outln!("{summary}");
            } else {
                multifd_cli::out!("{}", precopy::table(&summary));
                multifd_cli::outln!(
                    "verified: {}",
                    if verified {
                        "memory and devices match the source at the stop"
                    } else {
                        "MISMATCH"
                    }
                );
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
