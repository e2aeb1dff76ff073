//! `multifd-bench qemu`: `multifd bench` on loopback, beside QEMU's own multifd migration
//! of the same image in the same run ([`crate::qemu_baseline`]).
//!
//! Both destinations receive into fresh anonymous memory and both run on this host, so
//! both compete for the same cores. CPU seconds are those of the whole process (our source
//! and destination run in it) or of both QEMU processes.

use std::path::Path;

use anyhow::{ensure, Result};
use multifd::Compression;
use multifd_cli::bench::{Baseline, Bench, Configuration, Figures, RunArgs, Target};
use serde_json::json;

use crate::qemu_baseline::{self, QemuOptions};
use crate::qemu_process::QEMU;

#[derive(clap::Args)]
pub struct QemuArgs {
    #[command(flatten)]
    runs: RunArgs,
    /// Fail when QEMU is not installed, instead of leaving its columns empty.
    #[arg(long)]
    require_qemu: bool,
}

/// QEMU migrating the image, as the baseline.
struct QemuBaseline<'a> {
    image: &'a Path,
    prealloc: bool,
    required: bool,
    /// What `--version` says, once a warm-up run found QEMU installed.
    version: Option<String>,
}

impl QemuBaseline<'_> {
    fn options(&self, channels: u8, compression: Option<(&'static str, u32)>) -> QemuOptions<'_> {
        QemuOptions {
            image: self.image,
            channels: u32::from(channels),
            compression,
            prealloc_destination: self.prealloc,
        }
    }
}

impl Baseline for QemuBaseline<'_> {
    fn warm_up(&mut self, channels: u8) -> Result<bool> {
        let run = qemu_baseline::run(&self.options(channels, None))?;
        ensure!(run.is_some() || !self.required, "{QEMU} is not installed");
        self.version = run.map(|run| run.version);
        Ok(self.version.is_some())
    }

    /// `None` for what QEMU does not offer: lz4, and zstd's negative levels.
    fn run(&mut self, configuration: Configuration) -> Result<Option<Figures>> {
        let Ok(level) = u32::try_from(configuration.compression.level) else {
            return Ok(None);
        };
        let compression = match configuration.compression.method {
            Compression::None => None,
            Compression::Zlib => Some(("zlib", level)),
            Compression::Zstd => Some(("zstd", level)),
            Compression::Lz4 => return Ok(None),
        };
        let run = qemu_baseline::run(&self.options(configuration.channels, compression))?;
        Ok(run.map(|run| Figures {
            seconds: run.seconds,
            wire_bytes: run.wire_bytes.or(Some(run.transferred_bytes)),
            cpu_seconds: run.cpu_seconds,
        }))
    }
}

pub fn run(args: &QemuArgs) -> Result<()> {
    let (_directory, image) = args.runs.image.generate()?;
    let mut qemu = QemuBaseline {
        image: &image,
        prealloc: args.runs.prealloc,
        required: args.require_qemu,
        version: None,
    };
    let target = Target::Loopback {
        prealloc: args.runs.prealloc,
    };
    let bench = Bench::new(image.clone(), args.runs.image.size, target);
    let rows = bench.measure(&args.runs, Some(&mut qemu))?;
    if args.runs.json {
        let mut object = bench.json(&rows, args.runs.repeat, Some("qemu"));
        object["qemu_version"] = json!(qemu.version);
        println!("{object}");
    } else {
        bench.print_table(&rows, args.runs.repeat, Some("QEMU"));
        if let Some(version) = qemu.version {
            println!("baseline: {version}; its wire bytes with compression counted by a relay");
        }
    }
    Ok(())
}
