//! `multifd bench`: loopback throughput for several channel counts, beside QEMU's own
//! multifd migration of the same image in the same run when QEMU is installed.
//!
//! Our destination receives into fresh anonymous memory, as QEMU's destination does, and
//! both run on this host, so both compete for the same cores.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::ValueEnum;
use multifd::{Destination, DestinationConfig, GuestMemory, Listener, Source, SourceConfig};
use serde_json::json;

use crate::demo::anonymous_block;
use crate::device_bench::{self, DeviceBenchArgs};
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
    /// Preallocate the destination's memory before each run (both ours and QEMU's), so
    /// page faults on fresh memory are not part of the measurement.
    #[arg(long)]
    prealloc: bool,
    /// Directory for the image (default: /dev/shm when present, else the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure device state instead: the switchover time of this many devices moved
    /// sequentially over one channel, over the shared channels, and over dedicated
    /// channels (the last half), with and without a concurrent final RAM round of
    /// --final-ram bytes. Channel counts must be at least 2.
    #[arg(long, default_value_t = 0)]
    devices: u32,
    /// State per device, with --devices.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    device_size: u64,
    /// The concurrent final RAM round, with --devices (0: only without RAM).
    #[arg(long, default_value = "1G", value_parser = parse_size_or_zero)]
    final_ram: u64,
    /// With --devices: bytes per second each device saves and loads at most (0: no
    /// limit), as a device's firmware paces its state; 512M is 512 MiB/s.
    #[arg(long, default_value = "0", value_parser = parse_size_or_zero)]
    device_rate: u64,
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
    if args.devices > 0 {
        return device_bench::run(DeviceBenchArgs {
            devices: args.devices,
            device_size: args.device_size,
            final_ram: args.final_ram,
            channels: args.channels,
            repeat: args.repeat,
            device_rate: args.device_rate,
            json: args.json,
        });
    }
    let directory = image::scratch_directory(args.dir.as_deref(), "multifd-bench-")?;
    let image_path = directory.path().join("guest.img");
    image::create(&image_path, args.size, 1)?;
    let image = [RamFile {
        name: "pc.ram".into(),
        path: image_path.clone(),
    }];
    let bench = Bench {
        image: &image,
        size: args.size,
        prealloc: args.prealloc,
        qemu: args.qemu,
    };
    // One unmeasured run of each side first: the first migration after the image is made
    // pays for cold page tables and fresh host memory, whichever side goes first.
    let first = args.channels.first().copied().unwrap_or(1);
    bench.ours(first)?;
    let qemu_version = bench.qemu(first)?.map(|run| run.version);

    let mut ours = vec![Vec::new(); args.channels.len()];
    let mut theirs = vec![Vec::new(); args.channels.len()];
    let mut wire_bytes = vec![0; args.channels.len()];
    for repeat in 0..args.repeat {
        for (index, &channels) in args.channels.iter().enumerate() {
            // Alternate who goes first, so neither side always inherits the other's
            // warm memory.
            let mut measure_ours = || -> Result<()> {
                let (seconds, bytes) = bench.ours(channels)?;
                ours[index].push(seconds);
                wire_bytes[index] = bytes;
                Ok(())
            };
            if repeat % 2 == 0 {
                measure_ours()?;
            }
            if qemu_version.is_some() {
                if let Some(run) = bench.qemu(channels)? {
                    theirs[index].push(run.seconds);
                }
            }
            if repeat % 2 == 1 {
                measure_ours()?;
            }
        }
    }
    let rows: Vec<Row> = args
        .channels
        .iter()
        .enumerate()
        .map(|(index, &channels)| Row {
            channels,
            seconds: median(&mut ours[index]),
            wire_bytes: wire_bytes[index],
            qemu_seconds: (!theirs[index].is_empty()).then(|| median(&mut theirs[index])),
        })
        .collect();
    if args.json {
        println!(
            "{}",
            json!({
                "guest_bytes": args.size,
                "image": "25% zero, 25% random, 50% text-like pages",
                "destination_memory": if args.prealloc { "preallocated" } else { "fresh" },
                "repeat": args.repeat,
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
    } else {
        println!(
            "{:.2} GiB image, destination memory {}, median of {} runs",
            args.size as f64 / GIB,
            if args.prealloc {
                "preallocated"
            } else {
                "fresh"
            },
            args.repeat
        );
        for (index, row) in rows.iter().enumerate() {
            print_row(row, args.size, index == 0);
        }
        if let Some(version) = qemu_version {
            println!("baseline: {version}");
        }
    }
    Ok(())
}

/// What every measured run shares.
struct Bench<'a> {
    image: &'a [RamFile],
    size: u64,
    prealloc: bool,
    qemu: QemuChoice,
}

impl Bench<'_> {
    /// One migration of the image into anonymous memory; returns the source's seconds and
    /// wire bytes.
    fn ours(&self, channels: u8) -> Result<(f64, u64)> {
        let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
        let address = listener.address();
        let destination_memory =
            GuestMemory::new(vec![anonymous_block("pc.ram", self.size, self.prealloc)?])?;
        let receiving = std::thread::spawn(move || {
            Destination::new(DestinationConfig::default())
                .run(&listener, |_| Ok(destination_memory))
        });
        let memory = ram_files::map_for_sending(self.image)?;
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

    /// One QEMU migration of the image; `None` when QEMU is not to be measured or not
    /// installed (an error if it was required).
    fn qemu(&self, channels: u8) -> Result<Option<qemu_baseline::QemuRun>> {
        if self.qemu == QemuChoice::Never {
            return Ok(None);
        }
        let options = QemuOptions {
            image: &self.image[0].path,
            channels: u32::from(channels),
            compression: None,
            prealloc_destination: self.prealloc,
        };
        match qemu_baseline::run(&options)? {
            None if self.qemu == QemuChoice::Always => {
                anyhow::bail!("qemu-system-x86_64 is not installed")
            }
            run => Ok(run),
        }
    }
}

/// A size as [`parse_size`] reads it, or 0 for "none".
fn parse_size_or_zero(text: &str) -> Result<u64, String> {
    if text == "0" {
        Ok(0)
    } else {
        parse_size(text)
    }
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
