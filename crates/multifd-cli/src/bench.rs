//! `multifd bench`: loopback throughput for several compression methods and channel
//! counts, beside QEMU's own multifd migration of the same image in the same run when
//! QEMU is installed; or, with `--codec-ceiling`, what one core can do: zero-page
//! detection against plain memory reads, and each codec over the image's non-zero pages.
//!
//! Our destination receives into fresh anonymous memory, as QEMU's destination does, and
//! both run on this host, so both compete for the same cores. CPU seconds are those of
//! the whole process (our source and destination run in it) or of both QEMU processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::ValueEnum;
use multifd::{
    Compression, CompressionSettings, Destination, DestinationConfig, GuestMemory, Listener,
    PacketCompressor, PacketDecompressor, Source, SourceConfig,
};
use serde_json::json;

use crate::cpu_time::process_cpu_seconds;
use crate::demo::anonymous_block;
use crate::device_bench::{self, DeviceBenchArgs};
use crate::image::{self, parse_size, PAGE};
use crate::qemu_baseline::{self, QemuOptions};
use crate::ram_files::{self, RamFile};
use crate::Method;

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
    /// Compression to measure, comma-separated: METHOD (at its default level) or
    /// METHOD:LEVEL, METHOD being none, zlib, zstd or lz4 (QEMU is measured for none,
    /// zlib and zstd at levels it accepts).
    #[arg(long, value_delimiter = ',', default_value = "none", value_parser = parse_compression)]
    compress: Vec<CompressionSettings>,
    /// Measure single-core ceilings instead of migrating: zero-page detection against
    /// plain memory reads, and each `--compress` method compressing and decompressing
    /// the image's non-zero pages packet by packet.
    #[arg(long)]
    codec_ceiling: bool,
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
const MB: f64 = 1e6;

/// What one side did in one configuration (medians over the repeats).
#[derive(Clone, Copy)]
struct Figures {
    seconds: f64,
    /// Bytes on the wire, where known.
    wire_bytes: Option<u64>,
    cpu_seconds: f64,
}

struct Row {
    compression: CompressionSettings,
    channels: u8,
    ours: Figures,
    qemu: Option<Figures>,
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
    if args.codec_ceiling {
        return codec_ceiling(&image_path, args.size, &args.compress, args.json);
    }
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
    let configurations: Vec<(CompressionSettings, u8)> = args
        .compress
        .iter()
        .flat_map(|&compression| {
            args.channels
                .iter()
                .map(move |&channels| (compression, channels))
        })
        .collect();
    // One unmeasured run of each side first: the first migration after the image is made
    // pays for cold page tables and fresh host memory, whichever side goes first.
    let first = args.channels.first().copied().unwrap_or(1);
    bench.ours(CompressionSettings::NONE, first)?;
    let qemu_version = bench
        .qemu(CompressionSettings::NONE, first)?
        .map(|run| run.version);

    let mut ours = vec![Vec::new(); configurations.len()];
    let mut theirs = vec![Vec::new(); configurations.len()];
    for repeat in 0..args.repeat {
        for (index, &(compression, channels)) in configurations.iter().enumerate() {
            // Alternate who goes first, so neither side always inherits the other's
            // warm memory.
            if repeat % 2 == 0 {
                ours[index].push(bench.ours(compression, channels)?);
            }
            if qemu_version.is_some() {
                if let Some(run) = bench.qemu(compression, channels)? {
                    theirs[index].push(Figures {
                        seconds: run.seconds,
                        wire_bytes: run.wire_bytes.or(Some(run.transferred_bytes)),
                        cpu_seconds: run.cpu_seconds,
                    });
                }
            }
            if repeat % 2 == 1 {
                ours[index].push(bench.ours(compression, channels)?);
            }
        }
    }
    let rows: Vec<Row> = configurations
        .iter()
        .enumerate()
        .map(|(index, &(compression, channels))| Row {
            compression,
            channels,
            ours: median(&mut ours[index]),
            qemu: (!theirs[index].is_empty()).then(|| median(&mut theirs[index])),
        })
        .collect();
    if args.json {
        let figures = |figures: &Figures| {
            json!({
                "seconds": figures.seconds,
                "guest_gib_per_second": args.size as f64 / GIB / figures.seconds,
                "wire_bytes": figures.wire_bytes,
                "cpu_seconds": figures.cpu_seconds,
            })
        };
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
                    "compression": row.compression.to_string(),
                    "channels": row.channels,
                    "ours": figures(&row.ours),
                    "qemu": row.qemu.as_ref().map(figures),
                })).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "{:.2} GiB image (25% zero, 25% random, 50% text-like pages), destination memory \
             {}, median of {} runs; CPU s: both sides' processes",
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
            println!("baseline: {version}; its wire bytes with compression counted by a relay");
        }
    }
    Ok(())
}

/// Parses `METHOD` or `METHOD:LEVEL`.
fn parse_compression(text: &str) -> Result<CompressionSettings, String> {
    let (method, level) = match text.split_once(':') {
        Some((method, level)) => {
            let level = level
                .parse::<i32>()
                .map_err(|error| format!("level {level:?}: {error}"))?;
            (method, Some(level))
        }
        None => (text, None),
    };
    let method = Method::from_str(method, true)?;
    CompressionSettings::new(method.into(), level).map_err(|error| error.to_string())
}

/// What every measured run shares.
struct Bench<'a> {
    image: &'a [RamFile],
    size: u64,
    prealloc: bool,
    qemu: QemuChoice,
}

impl Bench<'_> {
    /// One migration of the image into anonymous memory: the source's seconds, its wire
    /// bytes, and the CPU time of this process (both sides) during the migration.
    fn ours(&self, compression: CompressionSettings, channels: u8) -> Result<Figures> {
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
            compression,
            ..SourceConfig::default()
        };
        let cpu_before = process_cpu_seconds(std::process::id())?;
        let started = Instant::now();
        let mut source = Source::connect(&address, &config, memory)?;
        source.queue_block(0)?;
        let stats = source.complete()?;
        let seconds = started.elapsed().as_secs_f64();
        receiving
            .join()
            .map_err(|_| anyhow::anyhow!("the destination thread panicked"))??;
        let cpu_seconds = process_cpu_seconds(std::process::id())? - cpu_before;
        Ok(Figures {
            seconds,
            wire_bytes: Some(stats.bytes),
            cpu_seconds,
        })
    }

    /// One QEMU migration of the image; `None` when QEMU is not to be measured, not
    /// installed (an error if it was required), or does not offer the method (lz4) or
    /// level (zstd's negative ones).
    fn qemu(
        &self,
        compression: CompressionSettings,
        channels: u8,
    ) -> Result<Option<qemu_baseline::QemuRun>> {
        if self.qemu == QemuChoice::Never {
            return Ok(None);
        }
        let Ok(level) = u32::try_from(compression.level) else {
            return Ok(None);
        };
        let compression = match compression.method {
            Compression::None => None,
            Compression::Zlib => Some(("zlib", level)),
            Compression::Zstd => Some(("zstd", level)),
            Compression::Lz4 => return Ok(None),
        };
        let options = QemuOptions {
            image: &self.image[0].path,
            channels: u32::from(channels),
            compression,
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

/// The median run by seconds, with that run's wire bytes and CPU time.
fn median(runs: &mut [Figures]) -> Figures {
    runs.sort_by(|left, right| left.seconds.total_cmp(&right.seconds));
    runs[runs.len() / 2]
}

fn print_row(row: &Row, size: u64, header: bool) {
    if header {
        println!(
            "{:>12} {:>8} | {:>8} {:>7} {:>9} {:>6} {:>7} | {:>8} {:>7} {:>9} {:>6} {:>7} | {:>7}",
            "compression",
            "channels",
            "seconds",
            "GiB/s",
            "wire GiB",
            "ratio",
            "CPU s",
            "QEMU s",
            "GiB/s",
            "wire GiB",
            "ratio",
            "CPU s",
            "speedup"
        );
    }
    let columns = |figures: Option<&Figures>| match figures {
        Some(figures) => {
            let (wire, ratio) = match figures.wire_bytes {
                Some(bytes) => (
                    format!("{:.3}", bytes as f64 / GIB),
                    format!("{:.2}", size as f64 / bytes as f64),
                ),
                None => ("-".into(), "-".into()),
            };
            format!(
                "{:>8.2} {:>7.3} {wire:>9} {ratio:>6} {:>7.2}",
                figures.seconds,
                size as f64 / GIB / figures.seconds,
                figures.cpu_seconds
            )
        }
        None => format!("{:>8} {:>7} {:>9} {:>6} {:>7}", "-", "-", "-", "-", "-"),
    };
    let speedup = match &row.qemu {
        Some(qemu) => format!("{:.2}x", qemu.seconds / row.ours.seconds),
        None => "-".into(),
    };
    println!(
        "{:>12} {:>8} | {} | {} | {speedup:>7}",
        row.compression.to_string(),
        row.channels,
        columns(Some(&row.ours)),
        columns(row.qemu.as_ref()),
    );
}

/// Size of the all-zero buffer zero-page detection is timed on: large enough to spill
/// every cache, so the scan runs at memory speed.
const ZERO_BUFFER: usize = 256 << 20;
/// Pages per packet in the ceiling measurement: QEMU's and our default 512 KiB packets.
const PAGES_PER_PACKET: usize = 128;

/// Prints what one core does: memory reads, zero-page detection, and each method
/// compressing and decompressing the image's non-zero pages packet by packet.
fn codec_ceiling(
    image: &Path,
    size: u64,
    compressions: &[CompressionSettings],
    json: bool,
) -> Result<()> {
    let file =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    // SAFETY: the image is this benchmark's own file in its own temporary directory;
    // nothing else maps or writes it while the mapping lives.
    let mapping = unsafe { memmap2::Mmap::map(&file) }.context("mapping the image")?;
    let bytes: &[u8] = &mapping;
    // Untimed pass: the first read of the mapping faults its pages in.
    std::hint::black_box(sum_words(bytes));

    let started = Instant::now();
    std::hint::black_box(sum_words(bytes));
    let read_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let zero_pages: Vec<bool> = bytes
        .chunks_exact(PAGE)
        // SAFETY: each chunk is a whole page of the mapping, which is page-aligned.
        .map(|page| unsafe { multifd::is_zero_page(page.as_ptr(), PAGE) })
        .collect();
    let detect_seconds = started.elapsed().as_secs_f64();
    let zero_count = zero_pages.iter().filter(|&&zero| zero).count();

    let mut zeroes = memmap2::MmapMut::map_anon(ZERO_BUFFER).context("zero buffer")?;
    zeroes.fill(0);
    let started = Instant::now();
    let all_zero = zeroes
        .chunks_exact(PAGE)
        // SAFETY: as above, whole pages of a page-aligned mapping.
        .all(|page| unsafe { multifd::is_zero_page(page.as_ptr(), PAGE) });
    let zero_scan_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(all_zero, "a zero page was not detected");

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut codecs = Vec::new();
    for &compression in compressions
        .iter()
        .filter(|compression| compression.method != Compression::None)
    {
        codecs.push((compression, measure_codec(bytes, &zero_pages, compression)?));
    }

    let rate = |bytes: f64, seconds: f64| bytes / MB / seconds;
    if json {
        println!(
            "{}",
            json!({
                "guest_bytes": size,
                "cpus": cores,
                "memory_read_mb_per_second": rate(size as f64, read_seconds),
                "zero_detection_mb_per_second": rate(size as f64, detect_seconds),
                "zero_detection_all_zero_mb_per_second": rate(ZERO_BUFFER as f64, zero_scan_seconds),
                "zero_pages": zero_count,
                "codecs": codecs.iter().map(|(compression, codec)| json!({
                    "compression": compression.to_string(),
                    "input_bytes": codec.input_bytes,
                    "payload_bytes": codec.payload_bytes,
                    "compress_seconds": codec.compress.as_secs_f64(),
                    "decompress_seconds": codec.decompress.as_secs_f64(),
                    "compress_mb_per_second": rate(codec.input_bytes as f64, codec.compress.as_secs_f64()),
                    "decompress_mb_per_second": rate(codec.input_bytes as f64, codec.decompress.as_secs_f64()),
                    "guest_gib_per_second_one_core": size as f64 / GIB / codec.compress.as_secs_f64(),
                    "guest_gib_per_second_ceiling": codec.ceiling(size, cores),
                })).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!(
        "{:.2} GiB image, {} of {} pages zero, {cores} cores",
        size as f64 / GIB,
        zero_count,
        zero_pages.len()
    );
    println!(
        "memory read (one core, word sums):   {:>8.0} MB/s",
        rate(size as f64, read_seconds)
    );
    println!(
        "zero-page detection over the image:  {:>8.0} MB/s (non-zero pages exit early)",
        rate(size as f64, detect_seconds)
    );
    println!(
        "zero-page detection, all-zero pages: {:>8.0} MB/s (every byte read)",
        rate(ZERO_BUFFER as f64, zero_scan_seconds)
    );
    if codecs.is_empty() {
        return Ok(());
    }
    println!(
        "{:>12} {:>14} {:>6} {:>12} {:>14} {:>15} {:>15}",
        "compression",
        "compress MB/s",
        "ratio",
        "inflate MB/s",
        "1-core GiB/s",
        "ceiling GiB/s",
        "raw packets"
    );
    for (compression, codec) in &codecs {
        println!(
            "{:>12} {:>14.0} {:>6.2} {:>12.0} {:>14.3} {:>15.3} {:>15}",
            compression.to_string(),
            rate(codec.input_bytes as f64, codec.compress.as_secs_f64()),
            codec.input_bytes as f64 / codec.payload_bytes.max(1) as f64,
            rate(codec.input_bytes as f64, codec.decompress.as_secs_f64()),
            size as f64 / GIB / codec.compress.as_secs_f64(),
            codec.ceiling(size, cores),
            codec.raw_packets
        );
    }
    println!(
        "MB/s and ratio over the non-zero pages; 1-core GiB/s: guest bytes per second of \
         one core compressing; ceiling: guest GiB/s if all {cores} cores did nothing but \
         compress and decompress"
    );
    Ok(())
}

/// Sums the bytes as native words: a plain, vectorisable read of every byte.
fn sum_words(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|word| u64::from_ne_bytes(word.try_into().unwrap_or_default()))
        .fold(0u64, u64::wrapping_add)
}

/// One codec over the image's non-zero pages.
struct CodecFigures {
    input_bytes: u64,
    payload_bytes: u64,
    raw_packets: u64,
    compress: Duration,
    decompress: Duration,
}

impl CodecFigures {
    /// Guest GiB/s if `cores` cores only compressed and decompressed.
    fn ceiling(&self, size: u64, cores: usize) -> f64 {
        let seconds = (self.compress + self.decompress).as_secs_f64() / cores as f64;
        size as f64 / GIB / seconds
    }
}

/// Compresses the non-zero pages of each 128-page packet of `image` with one stream, as
/// one channel would, and decompresses each payload right after; times both.
fn measure_codec(
    image: &[u8],
    zero_pages: &[bool],
    settings: CompressionSettings,
) -> Result<CodecFigures> {
    let packet_bytes = PAGES_PER_PACKET * PAGE;
    let mut compressor =
        PacketCompressor::new(settings, packet_bytes)?.context("a compression method")?;
    let mut decompressor =
        PacketDecompressor::new(settings.method, packet_bytes)?.context("a compression method")?;
    let mut staging = vec![0u8; packet_bytes];
    let mut figures = CodecFigures {
        input_bytes: 0,
        payload_bytes: 0,
        raw_packets: 0,
        compress: Duration::ZERO,
        decompress: Duration::ZERO,
    };
    for (packet, zero) in image
        .chunks(packet_bytes)
        .zip(zero_pages.chunks(PAGES_PER_PACKET))
    {
        let mut length = 0;
        for (page, _) in packet
            .chunks_exact(PAGE)
            .zip(zero)
            .filter(|(_, &zero)| !zero)
        {
            staging[length..length + PAGE].copy_from_slice(page);
            length += PAGE;
        }
        if length == 0 {
            continue;
        }
        figures.input_bytes += length as u64;
        let started = Instant::now();
        let payload = compressor.compress(&staging[..length])?;
        figures.compress += started.elapsed();
        let Some(payload) = payload else {
            figures.raw_packets += 1;
            figures.payload_bytes += length as u64;
            decompressor.restart()?;
            continue;
        };
        figures.payload_bytes += payload.len() as u64;
        let size = payload.len();
        decompressor.input(size).copy_from_slice(payload);
        let started = Instant::now();
        let pages = decompressor
            .inflate(0, size, length)
            .map_err(|violation| anyhow::anyhow!("{violation}"))?;
        figures.decompress += started.elapsed();
        anyhow::ensure!(
            pages == &staging[..length],
            "{settings}: round trip differs"
        );
    }
    Ok(figures)
}
