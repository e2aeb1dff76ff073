//! `multifd-bench`: what is measured for comparison, kept out of the `multifd` binary:
//! QEMU's own multifd migration beside ours, QEMU's live migration of a guest that dirties
//! memory, the same guest live-migrated by QEMU and by our KVM VMM, one core's codec
//! ceilings, the layouts of device state, and snapshot files beside QEMU's mapped-ram
//! file migration.

mod codec_ceiling;
mod devices;
mod live;
mod live_qemu;
mod local;
mod qemu;
mod qemu_baseline;
mod qemu_process;
mod snapshot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "multifd-bench",
    about = "Benchmarks of multifd against QEMU and against the hardware's limits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure throughput on loopback for several compression methods and channel counts,
    /// beside QEMU's own multifd migration of the same image when QEMU is installed (for
    /// none, zlib and zstd at levels it accepts).
    Qemu(qemu::QemuArgs),
    /// Measure single-core ceilings instead of migrating: zero-page detection against
    /// plain memory reads, and each `--compress` method compressing and decompressing the
    /// image's non-zero pages packet by packet.
    CodecCeiling(codec_ceiling::CodecCeilingArgs),
    /// Measure the switchover time of device state moved sequentially over one channel,
    /// over the shared channels, and over dedicated channels (the last half), with and
    /// without a concurrent final RAM round.
    Devices(devices::DevicesArgs),
    /// Live-migrate a boot-sector guest that dirties memory at each `--rates` rate with
    /// QEMU's own precopy (multifd), the baseline for `multifd demo --guest threads`.
    LiveQemu(live_qemu::LiveQemuArgs),
    /// Save and restore a snapshot file of an image, beside QEMU's mapped-ram file
    /// migration (`migrate file:`, multifd) of the same image, at each channel count,
    /// without and with O_DIRECT.
    Snapshot(snapshot::SnapshotArgs),
    /// Live-migrate the same self-checking guest in QEMU and in our KVM VMM (1 vCPU each)
    /// at each rate and channel count, interleaved; medians of `--repeat` runs beside
    /// each other, with ours/QEMU ratios.
    Live(live::LiveArgs),
    /// Migrate an idle KVM test guest locally (its memory handed over, not copied) and
    /// over loopback TCP: total time and downtime of each.
    Local(local::LocalArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Qemu(args) => qemu::run(&args),
        Command::CodecCeiling(args) => codec_ceiling::run(&args),
        Command::Devices(args) => devices::run(&args),
        Command::LiveQemu(args) => live_qemu::run(&args),
        Command::Snapshot(args) => snapshot::run(&args),
        Command::Live(args) => live::run(&args),
        Command::Local(args) => local::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("multifd-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
