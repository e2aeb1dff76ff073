//! `multifd-bench codec-ceiling`: what one core can do, whatever the channels: read
//! memory, detect zero pages, and compress and decompress the image's non-zero pages
//! packet by packet, as one channel does.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
// The engine's codec internals, imported here only.
use multifd::bench_internals::{is_zero_page, PacketCompressor, PacketDecompressor};
use multifd::{Compression, CompressionSettings};
use multifd_cli::bench::{parse_compression, ImageArgs};
use multifd_cli::image::PAGE;
use multifd_cli::GIB;
use serde_json::json;

#[derive(clap::Args)]
pub struct CodecCeilingArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Methods to measure, comma-separated: METHOD (at its default level) or METHOD:LEVEL,
    /// METHOD being zlib, zstd or lz4 (none measures nothing beyond zero-page detection).
    #[arg(long, value_delimiter = ',', default_value = "zlib,zstd,lz4", value_parser = parse_compression)]
    compress: Vec<CompressionSettings>,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// Size of the all-zero buffer zero-page detection is timed on: large enough to spill
/// every cache, so the scan runs at memory speed.
const ZERO_BUFFER: usize = 256 << 20;
/// Pages per packet in the ceiling measurement: QEMU's and our default 512 KiB packets.
const PAGES_PER_PACKET: usize = 128;
const MB: f64 = 1e6;

pub fn run(args: &CodecCeilingArgs) -> Result<()> {
    let (_directory, image) = args.image.generate()?;
    let ceilings = measure(&image, args.image.size, &args.compress)?;
    if args.json {
        ceilings.print_json();
    } else {
        ceilings.print_table();
    }
    Ok(())
}

/// What one core did over the image.
struct Ceilings {
    size: u64,
    cores: usize,
    read_seconds: f64,
    detect_seconds: f64,
    zero_scan_seconds: f64,
    pages: usize,
    zero_pages: usize,
    codecs: Vec<(CompressionSettings, CodecFigures)>,
}

/// Times memory reads and zero-page detection over the image and over all-zero memory,
/// then each method over the image's non-zero pages.
fn measure(image: &Path, size: u64, compressions: &[CompressionSettings]) -> Result<Ceilings> {
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
        .map(|page| unsafe { is_zero_page(page.as_ptr(), PAGE) })
        .collect();
    let detect_seconds = started.elapsed().as_secs_f64();

    let mut zeroes = memmap2::MmapMut::map_anon(ZERO_BUFFER).context("zero buffer")?;
    zeroes.fill(0);
    let started = Instant::now();
    let all_zero = zeroes
        .chunks_exact(PAGE)
        // SAFETY: as above, whole pages of a page-aligned mapping.
        .all(|page| unsafe { is_zero_page(page.as_ptr(), PAGE) });
    let zero_scan_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(all_zero, "a zero page was not detected");

    let codecs = compressions
        .iter()
        .filter(|compression| compression.method != Compression::None)
        .map(|&compression| Ok((compression, measure_codec(bytes, &zero_pages, compression)?)))
        .collect::<Result<_>>()?;
    Ok(Ceilings {
        size,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        read_seconds,
        detect_seconds,
        zero_scan_seconds,
        pages: zero_pages.len(),
        zero_pages: zero_pages.iter().filter(|&&zero| zero).count(),
        codecs,
    })
}

/// Megabytes per second.
fn rate(bytes: f64, seconds: f64) -> f64 {
    bytes / MB / seconds
}

impl Ceilings {
    fn print_json(&self) {
        let size = self.size as f64;
        println!(
            "{}",
            json!({
                "guest_bytes": self.size,
                "cpus": self.cores,
                "memory_read_mb_per_second": rate(size, self.read_seconds),
                "zero_detection_mb_per_second": rate(size, self.detect_seconds),
                "zero_detection_all_zero_mb_per_second": rate(ZERO_BUFFER as f64, self.zero_scan_seconds),
                "zero_pages": self.zero_pages,
                "codecs": self.codecs.iter().map(|(compression, codec)| json!({
                    "compression": compression.to_string(),
                    "input_bytes": codec.input_bytes,
                    "payload_bytes": codec.payload_bytes,
                    "compress_seconds": codec.compress.as_secs_f64(),
                    "decompress_seconds": codec.decompress.as_secs_f64(),
                    "compress_mb_per_second": rate(codec.input_bytes as f64, codec.compress.as_secs_f64()),
                    "decompress_mb_per_second": rate(codec.input_bytes as f64, codec.decompress.as_secs_f64()),
                    "guest_gib_per_second_one_core": size / GIB / codec.compress.as_secs_f64(),
                    "guest_gib_per_second_ceiling": codec.ceiling(self.size, self.cores),
                })).collect::<Vec<_>>(),
            })
        );
    }

    fn print_table(&self) {
        let (size, cores) = (self.size as f64, self.cores);
        println!(
            "{:.2} GiB image, {} of {} pages zero, {cores} cores",
            size / GIB,
            self.zero_pages,
            self.pages
        );
        println!(
            "memory read (one core, word sums):   {:>8.0} MB/s",
            rate(size, self.read_seconds)
        );
        println!(
            "zero-page detection over the image:  {:>8.0} MB/s (non-zero pages exit early)",
            rate(size, self.detect_seconds)
        );
        println!(
            "zero-page detection, all-zero pages: {:>8.0} MB/s (every byte read)",
            rate(ZERO_BUFFER as f64, self.zero_scan_seconds)
        );
        if self.codecs.is_empty() {
            return;
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
        for (compression, codec) in &self.codecs {
            println!(
                "{:>12} {:>14.0} {:>6.2} {:>12.0} {:>14.3} {:>15.3} {:>15}",
                compression.to_string(),
                rate(codec.input_bytes as f64, codec.compress.as_secs_f64()),
                codec.input_bytes as f64 / codec.payload_bytes.max(1) as f64,
                rate(codec.input_bytes as f64, codec.decompress.as_secs_f64()),
                size / GIB / codec.compress.as_secs_f64(),
                codec.ceiling(self.size, cores),
                codec.raw_packets
            );
        }
        println!(
            "MB/s and ratio over the non-zero pages; 1-core GiB/s: guest bytes per second of \
             one core compressing; ceiling: guest GiB/s if all {cores} cores did nothing but \
             compress and decompress"
        );
    }
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
