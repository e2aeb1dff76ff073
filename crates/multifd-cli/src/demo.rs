//! `multifd demo`: one command that shows the engine working end to end on loopback: by
//! default a KVM guest live-migrated to a second process (`crate::vm`), or the simulated
//! guest (`crate::live_demo`), or memory-image files copied and compared.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use memmap2::Mmap;
use multifd::{Destination, DestinationConfig, Listener, SourceConfig};
use multifd_cli::image::{self, parse_size};
use multifd_cli::outputs::Outputs;
use multifd_cli::ram_files::{self, RamFile};
use multifd_cli::GIB;
use serde_json::json;

use crate::device_files::{self, DeviceFile};
use crate::live_demo;
use crate::report;
use crate::vm::{self, GuestArgs, MigrateSettings};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Size of the generated guest-memory image.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Directory for the images (default: /dev/shm when present, else the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// What to migrate: the KVM guest (the default where /dev/kvm is usable; the
    /// simulated one elsewhere), the simulated guest, or memory-image files.
    #[arg(long, value_enum)]
    guest: Option<Guest>,
    /// The live demos' guest (`--memory`, `--dirty-rate`; the KVM guest's `--vcpus`,
    /// `--write-bytes`, `--frame-buffer`).
    #[command(flatten)]
    vm: GuestArgs,
    /// The live demos' migration: `--channels`, `--compress` and the precopy settings.
    #[command(flatten)]
    settings: MigrateSettings,
}

/// What the demo migrates.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Guest {
    /// The self-checking KVM guest, live-migrated to a second process.
    Kvm,
    /// Writer threads dirtying anonymous memory at `--dirty-rate`.
    Threads,
    /// Generated memory-image files (`--size`) and device files, copied and compared.
    Image,
}

/// A second, small block, so the demo shows several RAM blocks (a VGA frame buffer's size).
const VRAM_SIZE: u64 = 16 << 20;

/// Devices the demo migrates, with their state sizes: a NIC with a lot of state, a GPU
/// with some, and a device whose whole state fits its config blob.
const DEVICES: [(&str, u32, u64); 3] = [
    ("0000:00:05.0/vfio", 0, 24 << 20),
    ("0000:00:06.0/vfio", 0, 6 << 20),
    ("virtio-rng", 1, 1000),
];

pub fn run(args: &DemoArgs) -> Result<()> {
    let guest = args.guest.unwrap_or_else(|| match vm::kvm_available() {
        Ok(()) => Guest::Kvm,
        Err(reason) => {
            eprintln!("{reason}: running the simulated guest instead");
            Guest::Threads
        }
    });
    match guest {
        Guest::Kvm => return vm::demo(&args.vm, &args.settings, args.json),
        Guest::Threads => return live_demo::run(&args.vm, &args.settings, args.json),
        Guest::Image => {}
    }
    let directory = image::scratch_directory(args.dir.as_deref(), "multifd-demo-")?;
    let path = |name: &str| directory.path().join(name);
    let blocks = [("pc.ram", args.size, 1), ("vga.vram", VRAM_SIZE, 2)];

    let generating = Instant::now();
    for (name, size, seed) in blocks {
        image::create(&path(&format!("{name}.src")), size, seed)?;
    }
    if !args.json {
        eprintln!(
            "generated {:.2} GiB of mixed pages (25% zero, 25% random, 50% text) in {:.2} s",
            (args.size + VRAM_SIZE) as f64 / GIB,
            generating.elapsed().as_secs_f64()
        );
    }
    let ram = |suffix: &str| -> Vec<RamFile> {
        blocks
            .iter()
            .map(|(name, _, _)| RamFile {
                name: (*name).into(),
                path: path(&format!("{name}.{suffix}")),
            })
            .collect()
    };
    let (sources, destinations) = (ram("src"), ram("dst"));
    let device_files = |suffix: &str| -> Vec<DeviceFile> {
        DEVICES
            .iter()
            .enumerate()
            .map(|(index, (idstr, instance_id, _))| DeviceFile {
                id: multifd::DeviceId::new(*idstr, *instance_id),
                path: path(&format!("device{index}.{suffix}")),
            })
            .collect()
    };
    let (device_sources, device_destinations) = (device_files("src"), device_files("dst"));
    for (index, (file, (_, _, size))) in device_sources.iter().zip(DEVICES).enumerate() {
        image::create(&file.path, size, 10 + index as u64)?;
    }

    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
    let address = listener.address();
    let mut config = DestinationConfig::default();
    // `create_for_receiving` maps new files.
    config.memory_zeroed = true;
    let destination = Destination::new(config);
    let outputs = Outputs::default();
    let loaders = device_files::create_for_receiving(&device_destinations, &outputs)?;
    let receiving = {
        let destinations = destinations.clone();
        std::thread::spawn(move || {
            let received = destination.run_with_devices(
                &listener,
                |announced| {
                    ram_files::create_for_receiving(&destinations, announced, &outputs)
                        .map_err(|error| format!("{error:#}"))
                },
                loaders,
            )?;
            outputs.commit()?;
            anyhow::Ok(received)
        })
    };
    let savers = device_files::open_for_sending(&device_sources)?;
    let memory = ram_files::map_for_sending(&sources)?;
    let mut config = SourceConfig::default();
    config.channels = args.settings.channels;
    let sent = crate::send_all(&address, &config, memory, savers, "migrating", args.json);
    let received = receiving
        .join()
        .map_err(|_| anyhow::anyhow!("the destination thread panicked"))?;
    let (sent, received) = (sent?, received?);

    for (source, destination) in sources.iter().zip(&destinations) {
        verify(&source.path, &destination.path)?;
    }
    for (source, destination) in device_sources.iter().zip(&device_destinations) {
        verify(&source.path, &destination.path)?;
    }
    if args.json {
        let mut object = report::to_json(&sent);
        object["verified"] = json!(true);
        object["destination"] = report::to_json(&received);
        multifd_cli::outln!("{object}");
    } else {
        multifd_cli::out!("{}", report::table(&sent));
        multifd_cli::outln!(
            "verified: destination memory and device state equal the source's byte for byte"
        );
    }
    Ok(())
}

/// Compares two image files byte for byte.
pub fn verify(source: &Path, destination: &Path) -> Result<()> {
    let map = |path: &Path| -> Result<Mmap> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the migration has finished; nothing writes these files while mapped.
        unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))
    };
    let (expected, actual) = (map(source)?, map(destination)?);
    ensure!(
        expected.len() == actual.len(),
        "{} is {} bytes, {} is {}",
        source.display(),
        expected.len(),
        destination.display(),
        actual.len()
    );
    if let Some(position) = expected.iter().zip(actual.iter()).position(|(a, b)| a != b) {
        anyhow::bail!(
            "{} differs from {} at byte {position:#x}",
            destination.display(),
            source.display()
        );
    }
    Ok(())
}
