//! `multifd-bench live`: the same self-checking guest live-migrated by QEMU and by our
//! VMM, at each dirty rate and channel count, interleaved, the median of `--repeat` runs.
//!
//! QEMU's side is `live-qemu`'s ([`crate::live_qemu::migrate`]): the patched boot
//! sector in QEMU with KVM, one vCPU, multifd over loopback TCP. Ours is
//! [`multifd_testvm::KvmMigration`]: the same guest parameters in our VMM with one vCPU,
//! the destination VM in this process on a thread, over loopback TCP too (no TLS, no
//! compression on either side). Both guests fill their memory, run
//! [`crate::live_qemu::WARM_UP`] more, then migrate with the same downtime limit; after
//! the move each guest must run on (a new pass) with no self-check error, or the run
//! fails. Our frame buffer is one 64 KiB row by default, since QEMU's guest has no display
//! device.
//!
//! Reported: total time (QEMU's `total-time`, our driver's start → `Completed`),
//! downtime (QEMU's `downtime`; ours as the source sees it, stop → `Completed`, and as
//! the destination does, switchover → loaded), rounds (QEMU's `dirty-sync-count`; our
//! precopy rounds), bytes on the wire, and ours/QEMU ratios of the medians.

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use multifd::Address;
use multifd_cli::image::parse_size;
use multifd_cli::GIB;
use multifd_testvm::{GuestProgress, KvmMigration, KvmVm, VmConfig};
use serde_json::{json, Value};

use crate::live_qemu::{
    self, image, parse_rate, pass_timeout, LiveQemuArgs, Outcome, Rate, PASS_TIMEOUT, WARM_UP,
};

#[derive(clap::Args)]
pub struct LiveArgs {
    /// Guest memory.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// Dirty rates, comma-separated: bytes per second, 0 for an idle guest (it fills its
    /// memory, then halts), `unpaced` for as fast as the vCPU goes.
    #[arg(long, value_delimiter = ',', default_value = "0,100M,400M,unpaced", value_parser = parse_rate)]
    rates: Vec<Rate>,
    /// Channel counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [2u32, 4],
          value_parser = clap::value_parser!(u32).range(1..=255))]
    channels: Vec<u32>,
    /// W: bytes the guest checks and writes at the start of every page.
    #[arg(long, default_value_t = 8)]
    write_bytes: u32,
    /// Downtime limit for both, in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_limit_ms: u64,
    /// Auto-converge on both.
    #[arg(long)]
    auto_converge: bool,
    /// Seconds a migration may take before it is cancelled (QEMU) or fails (ours).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Runs per configuration and VMM; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Our VMM's frame buffer (a multiple of 64 KiB).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    frame_buffer: u64,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// One migration by our VMM.
struct Ours {
    total: Duration,
    downtime: Duration,
    destination_downtime: Option<Duration>,
    rounds: usize,
    bytes: u64,
}

/// Every run of one rate and channel count.
struct Cell {
    rate: Rate,
    channels: u32,
    qemu: Vec<live_qemu::Run>,
    ours: Vec<Ours>,
}

pub fn run(args: &LiveArgs) -> Result<()> {
    let qemu_args = LiveQemuArgs {
        memory: args.memory,
        rates: args.rates.clone(),
        write_bytes: args.write_bytes,
        channels: args.channels.clone(),
        auto_converge: args.auto_converge,
        downtime_limit_ms: args.downtime_limit_ms,
        timeout: args.timeout,
        repeat: args.repeat,
        json: args.json,
    };
    let (version, tsc_hz) = live_qemu::prepare(&qemu_args)?;
    let mut cells: Vec<Cell> = args
        .rates
        .iter()
        .flat_map(|&rate| {
            args.channels.iter().map(move |&channels| Cell {
                rate,
                channels,
                qemu: Vec::new(),
                ours: Vec::new(),
            })
        })
        .collect();
    for repeat in 1..=args.repeat {
        for cell in &mut cells {
            let qemu = live_qemu::migrate(&qemu_args, cell.rate, tsc_hz, cell.channels)?;
            let ours = ours(args, &qemu_args, cell.rate, cell.channels).with_context(|| {
                format!("our VMM at {} with {} channels", cell.rate, cell.channels)
            })?;
            if !args.json {
                eprintln!(
                    "run {repeat}/{}: {} ch {}: QEMU {} in {} ms, downtime {} ms; ours {:.0} ms, downtime {:.1} ms",
                    args.repeat,
                    cell.rate,
                    cell.channels,
                    qemu.status(),
                    qemu.u64_at("/total-time").unwrap_or(0),
                    qemu.u64_at("/downtime").unwrap_or(0),
                    ours.total.as_secs_f64() * 1e3,
                    ours.downtime.as_secs_f64() * 1e3
                );
            }
            cell.qemu.push(qemu);
            cell.ours.push(ours);
        }
    }
    let rows: Vec<Value> = cells.iter().map(Cell::medians).collect();
    if args.json {
        println!(
            "{}",
            json!({
                "qemu_version": version,
                "memory": args.memory,
                "write_bytes": args.write_bytes,
                "downtime_limit_ms": args.downtime_limit_ms,
                "auto_converge": args.auto_converge,
                "repeat": args.repeat,
                "frame_buffer": args.frame_buffer,
                "rows": rows,
            })
        );
    } else {
        print_table(&rows);
        println!(
            "{version} vs multifd-testvm, 1 vCPU each, guest {} MiB, W {} bytes, downtime limit {} ms{}; \
             medians of {} runs; ratio = ours / QEMU; down = downtime (QEMU's `downtime`, ours \
             stop -> Completed, and dest = our destination's switchover -> loaded)",
            args.memory >> 20,
            args.write_bytes,
            args.downtime_limit_ms,
            if args.auto_converge { ", auto-converge" } else { "" },
            args.repeat
        );
    }
    Ok(())
}

/// A loopback TCP address with a port that was free a moment ago.
fn loopback() -> Result<Address> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .context("a free loopback port")?
        .port();
    Ok(format!("tcp:127.0.0.1:{port}").parse()?)
}

/// Migrates the guest dirtying at `rate` within our VMM, checking it runs on after.
fn ours(args: &LiveArgs, qemu_args: &LiveQemuArgs, rate: Rate, channels: u32) -> Result<Ours> {
    let mut config = VmConfig::new(args.memory, 1);
    config.write_bytes = args.write_bytes;
    config.frame_buffer = args.frame_buffer;
    let wait = match rate {
        Rate::Idle => {
            config.passes = 1;
            PASS_TIMEOUT
        }
        Rate::Paced(bytes) => {
            config.dirty_rate = bytes;
            pass_timeout(&image(qemu_args, rate, 1).parameters()?, bytes as f64)
        }
        Rate::Unpaced => PASS_TIMEOUT,
    };
    let vm = KvmVm::start(&config)?;
    vm.wait_for_passes(&GuestProgress::default(), 1, wait)?;
    thread::sleep(WARM_UP);
    let mut migration = KvmMigration::new(loopback()?);
    migration.source.channels = u8::try_from(channels).context("channels")?;
    migration.precopy.downtime_limit = Duration::from_millis(args.downtime_limit_ms);
    migration.precopy.auto_converge = args.auto_converge;
    migration.precopy.timeout = Some(Duration::from_secs(args.timeout));
    let (moved, report) = migration.migrate(&vm, &mut |_| {})?;
    let after = if rate == Rate::Idle {
        moved.progress()
    } else {
        moved.wait_for_passes(&report.before, 1, wait)?
    };
    if let Some(error) = report.before.errors.iter().chain(&after.errors).next() {
        bail!("the guest's self-check failed: {error}");
    }
    if let Some(failure) = moved.vcpu_failures().first() {
        bail!("a vCPU failed on the destination: {failure}");
    }
    Ok(Ours {
        total: report.precopy.total_time,
        downtime: report.precopy.downtime,
        destination_downtime: report.destination.switchover_time,
        rounds: report.precopy.rounds.len(),
        bytes: report.precopy.migration.bytes,
    })
}

/// The median of the values present.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => None,
        length if length % 2 == 1 => Some(values[middle]),
        _ => Some((values[middle - 1] + values[middle]) / 2.0),
    }
}

fn ratio(ours: Option<f64>, qemu: Option<f64>) -> Option<f64> {
    ours.zip(qemu.filter(|&qemu| qemu > 0.0))
        .map(|(ours, qemu)| ours / qemu)
}

impl Cell {
    /// Medians over the runs (QEMU's completed ones), as one JSON row.
    fn medians(&self) -> Value {
        let completed: Vec<&live_qemu::Run> = self
            .qemu
            .iter()
            .filter(|run| run.migration.outcome == Outcome::Completed)
            .collect();
        let qemu = |pointer: &str| {
            median(
                completed
                    .iter()
                    .filter_map(|run| run.u64_at(pointer))
                    .map(|value| value as f64)
                    .collect(),
            )
        };
        let ours = |value: &dyn Fn(&Ours) -> Option<f64>| {
            median(self.ours.iter().filter_map(value).collect())
        };
        let qemu_total = qemu("/total-time");
        let qemu_downtime = qemu("/downtime");
        let ours_total = ours(&|run| Some(run.total.as_secs_f64() * 1e3));
        let ours_downtime = ours(&|run| Some(run.downtime.as_secs_f64() * 1e3));
        json!({
            "rate": self.rate.to_string(),
            "channels": self.channels,
            "qemu_completed": completed.len(),
            "qemu_runs": self.qemu.len(),
            "qemu_failures": self.qemu.iter().filter(|run| run.migration.outcome != Outcome::Completed).map(live_qemu::Run::status).collect::<Vec<_>>(),
            "qemu_total_ms": qemu_total,
            "ours_total_ms": ours_total,
            "total_ratio": ratio(ours_total, qemu_total),
            "qemu_downtime_ms": qemu_downtime,
            "ours_downtime_ms": ours_downtime,
            "ours_destination_downtime_ms": ours(&|run| run.destination_downtime.map(|time| time.as_secs_f64() * 1e3)),
            "downtime_ratio": ratio(ours_downtime, qemu_downtime),
            "qemu_rounds": qemu("/ram/dirty-sync-count"),
            "ours_rounds": ours(&|run| Some(run.rounds as f64)),
            "qemu_bytes": qemu("/ram/transferred"),
            "ours_bytes": ours(&|run| Some(run.bytes as f64)),
        })
    }
}

fn print_table(rows: &[Value]) {
    println!(
        "{:>10} {:>3} | {:>8} {:>8} {:>5} | {:>8} {:>8} {:>8} {:>5} | {:>6} {:>6} | {:>6} {:>6} | {:>4}",
        "rate",
        "ch",
        "QEMU s",
        "ours s",
        "ratio",
        "QEMU ms",
        "ours ms",
        "dest ms",
        "ratio",
        "QEMU r",
        "ours r",
        "Q GiB",
        "o GiB",
        "ok"
    );
    let cell = |row: &Value, key: &str, scale: f64, precision: usize| {
        row[key].as_f64().map_or_else(
            || "-".to_owned(),
            |value| format!("{:.precision$}", value / scale),
        )
    };
    for row in rows {
        println!(
            "{:>10} {:>3} | {:>8} {:>8} {:>5} | {:>8} {:>8} {:>8} {:>5} | {:>6} {:>6} | {:>6} {:>6} | {:>4}",
            row["rate"].as_str().unwrap_or("?"),
            row["channels"].as_u64().unwrap_or(0),
            cell(row, "qemu_total_ms", 1e3, 2),
            cell(row, "ours_total_ms", 1e3, 2),
            cell(row, "total_ratio", 1.0, 2),
            cell(row, "qemu_downtime_ms", 1.0, 0),
            cell(row, "ours_downtime_ms", 1.0, 1),
            cell(row, "ours_destination_downtime_ms", 1.0, 1),
            cell(row, "downtime_ratio", 1.0, 2),
            cell(row, "qemu_rounds", 1.0, 0),
            cell(row, "ours_rounds", 1.0, 0),
            cell(row, "qemu_bytes", GIB, 2),
            cell(row, "ours_bytes", GIB, 2),
            format!("{}/{}", row["qemu_completed"], row["qemu_runs"]),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
    }
}
