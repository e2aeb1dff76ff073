//! `multifd bench`: loopback throughput for several channel counts, beside QEMU's own
//! multifd migration of the same image in the same run when QEMU is installed.
//!
//! Our destination receives into fresh anonymous memory, as QEMU's destination does, and
//! both run on this host, so both compete for the same cores.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::ValueEnum;
use multifd::{Destination, DestinationConfig, GuestMemory, Listener, Source, SourceConfig};
use serde_json::json;

use crate::demo::{anonymous_block, default_dir};
use crate::image::{self, parse_size};
use crate::qemu_baseline::{self, QemuOptions};
use crate::ram_files::{self, RamFile};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Size of the generated guest-memory image.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    size: u64,
    /// Channel counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u8, 2, 4, 8])]
    channels: Vec<u8>,
    /// Runs per configuration; the median is reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Whether to measure QEMU too: when installed (auto), required (always), or not.
    #[arg(long, value_enum, default_value_t = QemuChoice::Auto)]
    qemu: QemuChoice,
    /// Directory for the image (default: /dev/shm when present, else the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum QemuChoice {
    Auto,
    Always,
    Never,
}

const GIB: f64 = (1u64 << 30) as f64;

struct Row {
    channels: u8,
    seconds: f64,
    wire_bytes: u64,
    qemu_seconds: Option<f64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let base = args.dir.clone().unwrap_or_else(default_dir);
    let directory = tempfile::Builder::new()
        .prefix("multifd-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a directory in {}", base.display()))?;
    let image_path = directory.path().join("guest.img");
    image::create(&image_path, args.size, 1)?;
    let image = [RamFile {
        name: "pc.ram".into(),
        path: image_path.clone(),
    }];
    let mut qemu_version = None;
    let mut rows = Vec::new();
    for &channels in &args.channels {
        let mut ours = Vec::new();
        let mut wire_bytes = 0;
        for _ in 0..args.repeat {
            let (seconds, bytes) = migrate_once(&image, channels, args.size)?;
            ours.push(seconds);
            wire_bytes = bytes;
        }
        let qemu_seconds = if args.qemu == QemuChoice::Never {
            None
        } else {
            let mut runs = Vec::new();
            for _ in 0..args.repeat {
                let options = QemuOptions {
                    image: &image_path,
                    channels: u32::from(channels),
                    compression: None,
                };
                match qemu_baseline::run(&options)? {
                    Some(run) => {
                        runs.push(run.seconds);
                        qemu_version = Some(run.version);
                    }
                    None if args.qemu == QemuChoice::Always => {
                        anyhow::bail!("qemu-system-x86_64 is not installed")
                    }
                    None => break,
                }
            }
            (!runs.is_empty()).then(|| median(&mut runs))
        };
        let row = Row {
            channels,
            seconds: median(&mut ours),
            wire_bytes,
            qemu_seconds,
        };
        if !args.json {
            print_row(&row, args.size, rows.is_empty());
        }
        rows.push(row);
    }
    if args.json {
        println!(
            "{}",
            json!({
                "guest_bytes": args.size,
                "image": "25% zero, 25% random, 50% text-like pages",
                "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(1),
                "qemu_version": qemu_version,
                "runs": rows.iter().map(|row| json!({
                    "channels": row.channels,
                    "seconds": row.seconds,
                    "guest_gib_per_second": args.size as f64 / GIB / row.seconds,
                    "wire_bytes": row.wire_bytes,
                    "qemu_seconds": row.qemu_seconds,
                    "qemu_guest_gib_per_second": row.qemu_seconds.map(|seconds| args.size as f64 / GIB / seconds),
                })).collect::<Vec<_>>(),
            })
        );
    } else if let Some(version) = qemu_version {
        println!("baseline: {version}");
    }
    Ok(())
}

/// One migration of the image into anonymous memory; returns the source's seconds and
/// wire bytes.
fn migrate_once(image: &[RamFile], channels: u8, size: u64) -> Result<(f64, u64)> {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
    let address = listener.address();
    let destination_memory = GuestMemory::new(vec![anonymous_block("pc.ram", size)?])?;
    let receiving = std::thread::spawn(move || {
        Destination::new(DestinationConfig::default()).run(&listener, |_| Ok(destination_memory))
    });
    let memory = ram_files::map_for_sending(image)?;
    let config = SourceConfig {
        channels,
        ..SourceConfig::default()
    };
    let started = Instant::now();
    let mut source = Source::connect(&address, &config, memory)?;
    source.queue_block(0)?;
    let stats = source.complete()?;
    let seconds = started.elapsed().as_secs_f64();
    receiving
        .join()
        .map_err(|_| anyhow::anyhow!("the destination thread panicked"))??;
    Ok((seconds, stats.bytes))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn print_row(row: &Row, size: u64, header: bool) {
    if header {
        println!(
            "{:>8} {:>10} {:>10} {:>12} {:>10} {:>10} {:>8}",
            "channels", "seconds", "GiB/s", "wire GiB", "QEMU s", "QEMU GiB/s", "speedup"
        );
    }
    let throughput = |seconds: f64| size as f64 / GIB / seconds;
    let (qemu_seconds, qemu_throughput, speedup) = match row.qemu_seconds {
        Some(seconds) => (
            format!("{seconds:.3}"),
            format!("{:.2}", throughput(seconds)),
            format!("{:.2}x", seconds / row.seconds),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    println!(
        "{:>8} {:>10.3} {:>10.2} {:>12.2} {:>10} {:>10} {:>8}",
        row.channels,
        row.seconds,
        throughput(row.seconds),
        row.wire_bytes as f64 / GIB,
        qemu_seconds,
        qemu_throughput,
        speedup
    );
}
