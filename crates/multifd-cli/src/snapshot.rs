//! `multifd snapshot save` and `multifd snapshot restore`: memory-image files and device
//! files to and from a snapshot file. Both write their outputs under temporary names and
//! rename them into place only on success, as `recv` does.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use multifd::{RestoreConfig, Snapshot, SnapshotConfig, SnapshotWriter};
use multifd_cli::outputs::{self, Outputs};
use multifd_cli::ram_files::{self, RamFile};
use multifd_cli::GIB;
use serde_json::json;

use crate::device_files::{self, DeviceFile};
use crate::report;

/// `multifd snapshot` subcommands.
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Save memory-image files and device files into a snapshot file.
    Save(SaveArgs),
    /// Restore a snapshot file into memory-image files and device files.
    Restore(RestoreArgs),
}

/// `multifd snapshot save`.
#[derive(Args)]
pub struct SaveArgs {
    /// RAM block NAME and the memory-image file holding it, as NAME=PATH (repeatable).
    #[arg(long = "ram", value_name = "NAME=PATH", required = true)]
    ram: Vec<RamFile>,
    /// A device and the file holding its state, as IDSTR[/INSTANCE]=PATH (repeatable);
    /// the file's last 4 KiB are its config blob, as for `send`.
    #[arg(long = "device", value_name = "IDSTR[/INSTANCE]=PATH")]
    devices: Vec<DeviceFile>,
    /// The snapshot file to write (under a temporary name, renamed when complete).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Writer threads (1 to 255).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..))]
    channels: u8,
    /// Write pages with O_DIRECT, around the page cache.
    #[arg(long)]
    direct_io: bool,
    /// Page size in bytes.
    #[arg(long, default_value_t = 4096)]
    page_size: u32,
    /// Print one JSON object with the statistics on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// `multifd snapshot restore`.
#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot file.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// Where each block of the snapshot goes, as NAME=PATH (repeatable; every block of the
    /// file needs one). Written under a temporary name, renamed on success.
    #[arg(long = "ram", value_name = "NAME=PATH", required = true)]
    ram: Vec<RamFile>,
    /// A device of the snapshot and the file to write its state and config to, as
    /// IDSTR[/INSTANCE]=PATH (repeatable; exactly the file's devices).
    #[arg(long = "device", value_name = "IDSTR[/INSTANCE]=PATH")]
    devices: Vec<DeviceFile>,
    /// Reader threads (1 to 255).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..))]
    channels: u8,
    /// Read pages with O_DIRECT, around the page cache.
    #[arg(long, conflicts_with = "lazy")]
    direct_io: bool,
    /// Map the snapshot privately instead of reading it (the memory is usable at once,
    /// pages come in as they are touched); reports the time until the memory was usable,
    /// then copies it into the outputs.
    #[arg(long)]
    lazy: bool,
    /// Print one JSON object with the statistics on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs a `multifd snapshot` subcommand.
pub fn run(command: &SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::Save(args) => save(args),
        SnapshotCommand::Restore(args) => restore(args),
    }
}

fn save(args: &SaveArgs) -> Result<()> {
    outputs::check(&[outputs::Output {
        flag: "--out",
        name: "snapshot",
        path: &args.out,
    }])?;
    let out = canonical_output(&args.out)?;
    for input in args
        .ram
        .iter()
        .map(|file| &file.path)
        .chain(args.devices.iter().map(|device| &device.path))
    {
        if input.canonicalize().is_ok_and(|input| input == out) {
            bail!("--out {} is also an input", args.out.display());
        }
    }
    let memory = ram_files::map_for_sending(&args.ram)?;
    let devices = device_files::open_for_sending(&args.devices)?;
    let mut config = SnapshotConfig::default();
    config.threads = args.channels;
    config.direct_io = args.direct_io;
    config.page_size = args.page_size;
    let outputs = Outputs::default();
    let temporary = outputs.create_path(&args.out)?;
    let result = (|| {
        let mut writer = SnapshotWriter::create(&temporary, &config, memory, devices)?;
        let progress = report::ProgressBar::start(&writer.monitor(), "saving", args.json);
        let result = (|| {
            for block in 0..writer.memory().blocks().len() {
                writer.queue_block(block)?;
            }
            writer.complete()
        })();
        progress.finish();
        let stats = result?;
        let file = std::fs::metadata(&temporary)
            .with_context(|| format!("cannot stat {}", temporary.display()))?;
        anyhow::Ok((stats, file.len(), file.blocks() * 512))
    })();
    let (stats, length, allocated) = match result {
        Ok(done) => done,
        Err(error) => return report::print_outcome(Err(error), args.json),
    };
    outputs.commit()?;
    if args.json {
        let mut value = report::to_json(&stats);
        value["file"] = json!(args.out);
        value["file_bytes"] = json!(length);
        value["allocated_bytes"] = json!(allocated);
        multifd_cli::outln!("{value}");
    } else {
        multifd_cli::out!("{}", report::table(&stats));
        multifd_cli::outln!(
            "snapshot {}: {length} bytes, {allocated} allocated (zero pages are holes)",
            args.out.display()
        );
    }
    Ok(())
}

/// Where `path` will be once renamed into place, with its directory resolved.
fn canonical_output(path: &Path) -> Result<PathBuf> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let directory = directory
        .canonicalize()
        .with_context(|| format!("no directory {}", directory.display()))?;
    Ok(directory.join(path.file_name().unwrap_or_default()))
}

fn restore(args: &RestoreArgs) -> Result<()> {
    device_files::check_outputs(&args.ram, &args.devices)?;
    let from = args.from.canonicalize().ok();
    for file in &args.ram {
        if from.is_some() && canonical_output(&file.path).ok() == from {
            bail!(
                "--ram {}: {} is the snapshot itself",
                file.name,
                file.path.display()
            );
        }
    }
    let started = Instant::now();
    let snapshot = Snapshot::open(&args.from)?;
    let blocks = snapshot.blocks();
    if let Some(extra) = args
        .ram
        .iter()
        .find(|file| !blocks.iter().any(|block| block.name == file.name))
    {
        bail!(
            "--ram {}: the snapshot has no block of that name",
            extra.name
        );
    }
    let outputs = Outputs::default();
    let memory = ram_files::create_for_receiving(&args.ram, &blocks, &outputs)?;
    let devices = device_files::create_for_receiving(&args.devices, &outputs)?;
    if args.lazy {
        let lazy = snapshot.restore_lazy(devices)?;
        let copy_started = Instant::now();
        for (source, target) in lazy.memory.blocks().iter().zip(memory.blocks()) {
            // SAFETY: both blocks are mappings this process owns, of the same length
            // (`create_for_receiving` sized the output from the snapshot's block), and
            // nothing else runs on them.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    source.as_ptr(),
                    target.as_ptr(),
                    source.len() as usize,
                );
            }
        }
        let copy_time = copy_started.elapsed();
        outputs.commit()?;
        let total = started.elapsed();
        let bytes: u64 = memory.blocks().iter().map(|block| block.len()).sum();
        if args.json {
            multifd_cli::outln!(
                "{}",
                json!({
                    "status": "completed",
                    "mode": "lazy",
                    "guest_bytes": bytes,
                    "memory_ready_seconds": lazy.memory_ready.as_secs_f64(),
                    "devices_loaded_seconds": lazy.total_time.as_secs_f64(),
                    "device_bytes": lazy.device_bytes,
                    "copy_seconds": copy_time.as_secs_f64(),
                    "seconds": total.as_secs_f64(),
                })
            );
        } else {
            multifd_cli::outln!(
                "lazy restore: memory usable after {:.3} ms (mapped privately), devices \
                 loaded after {:.3} ms ({} bytes)\ncopied {:.2} GiB into the outputs in {:.3} s \
                 ({:.2} GiB/s); {:.3} s in all",
                lazy.memory_ready.as_secs_f64() * 1e3,
                lazy.total_time.as_secs_f64() * 1e3,
                lazy.device_bytes,
                bytes as f64 / GIB,
                copy_time.as_secs_f64(),
                bytes as f64 / GIB / copy_time.as_secs_f64().max(1e-9),
                total.as_secs_f64()
            );
        }
        return Ok(());
    }
    let mut config = RestoreConfig::default();
    config.threads = args.channels;
    config.direct_io = args.direct_io;
    // `create_for_receiving` maps new files.
    config.memory_zeroed = true;
    let result = snapshot
        .restore(&config, &memory, devices)
        .map_err(anyhow::Error::from)
        .and_then(|stats| {
            outputs.commit()?;
            Ok(stats)
        });
    report::print_outcome(result, args.json)
}
