//! `multifd-bench snapshot`: our snapshot file beside QEMU's mapped-ram file migration of
//! the same image, in one run.
//!
//! The image (25% zero, 25% random, 50% text-like pages, as `multifd bench` generates) is
//! read once so both sides read it from the page cache. For every channel count, without
//! and with `O_DIRECT`:
//!
//! - **ours**: [`SnapshotWriter`] saves the mapped image (every block queued, then
//!   `complete`), then [`Snapshot::restore`] reads it back into fresh anonymous memory
//!   (zero pages not written, as a fresh mapping is zeroed), and the copy is compared
//!   with the image (untimed);
//! - **QEMU**: a paused source QEMU with the image as its RAM (`memory-backend-file`,
//!   read-only, private) runs `migrate file:PATH` with the `mapped-ram` and `multifd`
//!   capabilities, `multifd-channels` and `direct-io` set; then a destination QEMU with
//!   fresh RAM (`-incoming defer`, same settings) runs `migrate-incoming file:PATH`.
//!
//! Times are wall clocks around the call (ours) or from the QMP command to
//! `query-migrate` reporting `completed` (QEMU, polled every [`QEMU_POLL`]); GiB/s is the
//! guest's size over the median time of `--repeat` runs, ours and QEMU's alternating.
//! Each snapshot file is deleted after its run, so the runs do not share page cache. Both
//! write into and read from the page cache of the same filesystem unless `O_DIRECT` is on;
//! the image is synced to disk first, so its writeback does not slow the first runs.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::MmapMut;
use multifd::{GuestMemory, RamBlock, RestoreConfig, Snapshot, SnapshotConfig, SnapshotWriter};
use multifd_cli::image::{self, parse_size};
use multifd_cli::GIB;
use serde_json::json;

use crate::qemu_process::{
    image_backend, memory_only_guest, option_path, qemu_version, work_directory, Qemu, QEMU,
};

/// How often QEMU's `query-migrate` is polled: a few milliseconds, so that polling adds
/// under 1% to a run of a second or more.
const QEMU_POLL: Duration = Duration::from_millis(5);
/// How long one QEMU save or restore may take: generous for a disk at 100 MiB/s.
const QEMU_TIMEOUT_PER_GIB: Duration = Duration::from_secs(60);
/// QEMU's default bandwidth limit is 128 MiB/s; this lifts it (1 TiB/s).
const MAX_BANDWIDTH: u64 = 1 << 40;
/// The image's seed: the same bytes in every run.
const SEED: u64 = 7;

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// Guest memory size (a multiple of 2 MiB), e.g. 1G.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Channel (thread) counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    channels: Vec<u8>,
    /// Where the image and the snapshot files go (a filesystem with O_DIRECT, so not
    /// tmpfs); default: the temp directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Runs of each configuration; the median save and restore times are reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Fail when QEMU is not installed, instead of leaving its rows out.
    #[arg(long)]
    require_qemu: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One save and one restore.
#[derive(Debug, Clone, Copy)]
struct Times {
    save: Duration,
    restore: Duration,
}

pub fn run(args: &SnapshotArgs) -> Result<()> {
    ensure!(
        args.size > 0 && args.size.is_multiple_of(2 << 20),
        "--size must be a non-zero multiple of 2 MiB"
    );
    ensure!(
        args.channels.iter().all(|&channels| channels > 0),
        "--channels must be 1 to 255"
    );
    let directory = tempfile::Builder::new()
        .prefix("multifd-snapshot-bench")
        .tempdir_in(args.dir.clone().unwrap_or_else(std::env::temp_dir))
        .context("cannot create the scratch directory")?;
    let image_path = directory.path().join("image.img");
    image::create(&image_path, args.size, SEED)?;
    // On disk before anything is timed: its writeback would compete with the first runs.
    File::open(&image_path)
        .and_then(|file| file.sync_all())
        .context("syncing the image")?;
    warm_page_cache(&image_path)?;
    let version = qemu_version()?;
    ensure!(
        version.is_some() || !args.require_qemu,
        "{QEMU} is not installed"
    );
    let mut rows = Vec::new();
    for &channels in &args.channels {
        for direct_io in [false, true] {
            // Ours and QEMU's runs alternate, so a slow spell of the host hits both.
            let (mut our_runs, mut qemu_runs) = (Vec::new(), Vec::new());
            for _ in 0..args.repeat {
                our_runs.push(ours(&image_path, directory.path(), channels, direct_io)?);
                if version.is_some() {
                    qemu_runs.push(qemu(
                        &image_path,
                        directory.path(),
                        args.size,
                        channels,
                        direct_io,
                    )?);
                }
            }
            let qemu = (!qemu_runs.is_empty()).then(|| median(&qemu_runs));
            rows.push((channels, direct_io, median(&our_runs), qemu));
        }
    }
    print(args, version.as_deref(), &rows);
    Ok(())
}

fn warm_page_cache(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buffer = vec![0; 1 << 20];
    while file.read(&mut buffer)? > 0 {}
    Ok(())
}

/// Our save and restore of the image, the copy checked against it.
fn ours(image_path: &Path, directory: &Path, channels: u8, direct_io: bool) -> Result<Times> {
    let snapshot_path = directory.join("ours.snap");
    let file = File::open(image_path)?;
    let memory = GuestMemory::new(vec![RamBlock::map_file("pc.ram", &file, false)?])?;
    let mut config = SnapshotConfig::default();
    config.threads = channels;
    config.direct_io = direct_io;
    let started = Instant::now();
    let mut writer = SnapshotWriter::create(&snapshot_path, &config, memory.clone(), Vec::new())?;
    writer.queue_block(0)?;
    writer.complete()?;
    let save = started.elapsed();

    let length = usize::try_from(memory.blocks()[0].len())?;
    let target = GuestMemory::new(vec![RamBlock::from_mapping(
        "pc.ram",
        MmapMut::map_anon(length).context("mapping the restore target")?,
    )?])?;
    let mut restore = RestoreConfig::default();
    restore.threads = channels;
    restore.memory_zeroed = true;
    restore.direct_io = direct_io;
    let started = Instant::now();
    Snapshot::open(&snapshot_path)?.restore(&restore, &target, Vec::new())?;
    let restore_time = started.elapsed();
    // SAFETY: both blocks map `length` bytes that nothing writes any more.
    let same = unsafe {
        std::slice::from_raw_parts(memory.blocks()[0].as_ptr(), length)
            == std::slice::from_raw_parts(target.blocks()[0].as_ptr(), length)
    };
    ensure!(same, "our restored memory differs from the image");
    std::fs::remove_file(&snapshot_path)?;
    Ok(Times {
        save,
        restore: restore_time,
    })
}

/// QEMU's mapped-ram save and restore of the image.
fn qemu(
    image_path: &Path,
    directory: &Path,
    size: u64,
    channels: u8,
    direct_io: bool,
) -> Result<Times> {
    let workdir = work_directory()?;
    let snapshot_path = directory.join("qemu.snap");
    let uri = format!("file:{}", option_path(&snapshot_path)?);
    let mib = size >> 20;
    let timeout = QEMU_TIMEOUT_PER_GIB.saturating_mul(u32::try_from(size.div_ceil(1 << 30))?);
    let parameters = json!({
        "multifd-channels": channels,
        "max-bandwidth": MAX_BANDWIDTH,
        "direct-io": direct_io,
    });
    let capabilities = [("multifd", true), ("mapped-ram", true)];
    let arguments = |backend: String, incoming: bool| -> Vec<String> {
        let mut arguments = memory_only_guest(mib, &backend);
        if incoming {
            arguments.extend(["-incoming".to_owned(), "defer".to_owned()]);
        }
        arguments
    };

    let save = {
        let backend = image_backend(image_path, mib)?;
        let mut source = Qemu::launch("source", &arguments(backend, false), workdir.path())?;
        source.configure_migration(&capabilities, &parameters)?;
        let started = Instant::now();
        source.execute("migrate", Some(json!({ "uri": uri })))?;
        wait_for_completion(&mut source, timeout)?;
        started.elapsed()
    };
    let restore = {
        let backend = format!("memory-backend-ram,id=mem,size={mib}M");
        let mut destination =
            Qemu::launch("destination", &arguments(backend, true), workdir.path())?;
        destination.configure_migration(&capabilities, &parameters)?;
        let started = Instant::now();
        destination.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
        wait_for_completion(&mut destination, timeout)?;
        started.elapsed()
    };
    std::fs::remove_file(&snapshot_path)?;
    Ok(Times { save, restore })
}

/// Polls `query-migrate` until `completed`.
fn wait_for_completion(qemu: &mut Qemu, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let (status, reply) = qemu.migration_status()?;
        match status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let description = reply["error-desc"].as_str().unwrap_or("no error-desc");
                bail!(qemu.explain(&anyhow!("QEMU migration {status}: {description}")));
            }
            _ if started.elapsed() > timeout => {
                bail!(qemu.explain(&anyhow!("QEMU migration not completed after {timeout:?}")));
            }
            _ => thread::sleep(QEMU_POLL),
        }
    }
}

/// The median save and the median restore time of `runs` (at least one).
fn median(runs: &[Times]) -> Times {
    let middle = |time: fn(&Times) -> Duration| {
        let mut times: Vec<Duration> = runs.iter().map(time).collect();
        times.sort();
        times[times.len() / 2]
    };
    Times {
        save: middle(|times| times.save),
        restore: middle(|times| times.restore),
    }
}

fn gib_per_second(size: u64, time: Duration) -> f64 {
    size as f64 / GIB / time.as_secs_f64().max(1e-9)
}

fn print(args: &SnapshotArgs, version: Option<&str>, rows: &[(u8, bool, Times, Option<Times>)]) {
    let rate = |time: Duration| gib_per_second(args.size, time);
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|(channels, direct_io, ours, qemu)| {
                json!({
                    "channels": channels,
                    "direct_io": direct_io,
                    "ours": {
                        "save_seconds": ours.save.as_secs_f64(),
                        "save_gib_per_second": rate(ours.save),
                        "restore_seconds": ours.restore.as_secs_f64(),
                        "restore_gib_per_second": rate(ours.restore),
                    },
                    "qemu": qemu.map(|qemu| json!({
                        "save_seconds": qemu.save.as_secs_f64(),
                        "save_gib_per_second": rate(qemu.save),
                        "restore_seconds": qemu.restore.as_secs_f64(),
                        "restore_gib_per_second": rate(qemu.restore),
                    })),
                })
            })
            .collect();
        multifd_cli::outln!(
            "{}",
            json!({
                "size": args.size,
                "repeat": args.repeat,
                "qemu_version": version,
                "runs": rows,
            })
        );
        return;
    }
    multifd_cli::outln!(
        "snapshot of a {:.2} GiB image, median of {} runs; QEMU: {}",
        args.size as f64 / GIB,
        args.repeat,
        version.unwrap_or("not installed")
    );
    multifd_cli::outln!(
        "{:>8} {:>9} | {:>12} {:>12} | {:>12} {:>12} | {:>9} {:>9}",
        "channels",
        "direct-io",
        "save GiB/s",
        "QEMU save",
        "restore GiB/s",
        "QEMU rest.",
        "save ×",
        "restore ×"
    );
    for (channels, direct_io, ours, qemu) in rows {
        let qemu_rate = |time: fn(&Times) -> Duration| {
            qemu.map_or_else(
                || "-".to_owned(),
                |qemu| format!("{:.2}", rate(time(&qemu))),
            )
        };
        let ratio = |time: fn(&Times) -> Duration| {
            qemu.map_or_else(
                || "-".to_owned(),
                |qemu| {
                    format!(
                        "{:.2}",
                        time(&qemu).as_secs_f64() / time(ours).as_secs_f64()
                    )
                },
            )
        };
        multifd_cli::outln!(
            "{:>8} {:>9} | {:>12.2} {:>12} | {:>12.2} {:>12} | {:>9} {:>9}",
            channels,
            if *direct_io { "on" } else { "off" },
            rate(ours.save),
            qemu_rate(|times| times.save),
            rate(ours.restore),
            qemu_rate(|times| times.restore),
            ratio(|times| times.save),
            ratio(|times| times.restore),
        );
    }
}
