//! `multifd vm`: the KVM guest of `multifd-testvm` as processes. `vm run` boots it and
//! serves a control socket; `vm incoming` receives one and runs it on (serving a control
//! socket too, so it can move again); `vm migrate` asks a running VM to move; `vm
//! pingpong` moves one guest back and forth between fresh `vm incoming` processes; `vm
//! image` writes the guest as a disk image for QEMU.

mod child;
mod control;
mod hops;

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use multifd::{Address, DestinationConfig, Listener, SourceConfig};
use multifd_cli::bench::parse_compression;
use multifd_cli::image::parse_size;
use multifd_testvm::{host_tsc_hz, GuestImage, KvmVm, VmConfig};
use serde_json::{json, Value};

use crate::precopy::{self, PrecopyArgs};

pub use hops::{demo, kvm_available};

/// `multifd vm` subcommands.
#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// Write the guest's boot sector as a raw disk image QEMU boots
    /// (`-drive file=FILE,format=raw`), paced for this host's TSC.
    Image(ImageArgs),
    /// Boot the guest and serve its control socket until it has migrated away.
    Run(RunArgs),
    /// Receive a guest (or, with --from, restore it from a snapshot file: `vm restore` is
    /// the same command), resume it and run it on.
    #[command(visible_alias = "restore")]
    Incoming(IncomingArgs),
    /// Save a live snapshot of a running guest into a file; the guest runs on.
    Snapshot(SnapshotArgs),
    /// Ask a running guest (`vm run` or `vm incoming`) to live-migrate.
    Migrate(MigrateArgs),
    /// Show a running guest's passes per vCPU and any error it reported.
    Status(StatusArgs),
    /// Migrate one guest back and forth, a fresh destination process each time.
    Pingpong(PingpongArgs),
}

/// Runs a `multifd vm` subcommand.
pub fn run(command: VmCommand) -> Result<()> {
    match command {
        VmCommand::Image(args) => image(&args),
        VmCommand::Run(args) => run_vm(&args),
        VmCommand::Incoming(args) => incoming(&args),
        VmCommand::Migrate(args) => migrate(&args),
        VmCommand::Snapshot(args) => snapshot(&args),
        VmCommand::Status(args) => status(&args),
        VmCommand::Pingpong(args) => hops::pingpong(&args),
    }
}

/// A byte rate: `0`, or a size such as `400M`.
fn parse_rate(text: &str) -> Result<u64, String> {
    if text == "0" {
        Ok(0)
    } else {
        parse_size(text)
    }
}

/// The guest on the command line.
#[derive(clap::Args, Clone, Debug)]
pub struct GuestArgs {
    /// Guest memory (whole pages, 2 MiB to 3 GiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    /// vCPUs, each checking its own slice of memory.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=4))]
    vcpus: u8,
    /// W: bytes the guest checks and rewrites at the start of every page on every pass.
    #[arg(long, default_value_t = 64)]
    write_bytes: u32,
    /// Bytes per second the guest dirties over all vCPUs (e.g. 400M); 0 runs it unpaced
    /// (the simulated guest of `demo --guest threads`: idle).
    #[arg(long, default_value = "100M", value_parser = parse_rate)]
    pub dirty_rate: u64,
    /// Size of the frame buffer device (its state moves with the VM).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    frame_buffer: u64,
}

impl GuestArgs {
    fn config(&self, serial: Option<&Path>) -> VmConfig {
        let mut config = VmConfig::new(self.memory, self.vcpus);
        config.write_bytes = self.write_bytes;
        config.dirty_rate = self.dirty_rate;
        config.frame_buffer = self.frame_buffer;
        config.serial = serial.map(Path::to_path_buf);
        config
    }

    /// How long a pass may take, generously: three times a pass at the dirty rate
    /// (every vCPU dirties its slice at its share of the rate), and at least a minute (a
    /// loaded host, pages faulted in for the first time).
    fn pass_bound(&self) -> Duration {
        let pass = if self.dirty_rate > 0 {
            self.memory as f64 / self.dirty_rate as f64
        } else {
            0.0
        };
        Duration::from_secs_f64(3.0 * pass).max(Duration::from_secs(60))
    }

    /// The same guest as arguments of another `multifd vm` process.
    fn to_args(&self) -> Vec<String> {
        [
            ("--memory", self.memory.to_string()),
            ("--vcpus", self.vcpus.to_string()),
            ("--write-bytes", self.write_bytes.to_string()),
            ("--dirty-rate", self.dirty_rate.to_string()),
            ("--frame-buffer", self.frame_buffer.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }
}

#[derive(clap::Args)]
pub struct ImageArgs {
    /// The image file to write.
    #[arg(long)]
    out: PathBuf,
    /// Guest memory QEMU gives the guest (`-m`); the guest checks `[1 MiB, memory)`.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// W: bytes checked and rewritten per page and pass.
    #[arg(long, default_value_t = 64)]
    write_bytes: u32,
    /// Bytes per second the guest dirties; 0 runs it unpaced.
    #[arg(long, default_value = "100M", value_parser = parse_rate)]
    dirty_rate: u64,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// A file the guest's serial lines are appended to.
    #[arg(long)]
    serial: Option<PathBuf>,
    /// The Unix socket `vm migrate` talks to.
    #[arg(long)]
    control: PathBuf,
    /// Print events as JSON lines on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct IncomingArgs {
    /// Address to receive on: tcp:HOST:PORT (port 0 picks one, printed) or unix:PATH.
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    listen: Option<Address>,
    /// Restore the guest from this snapshot file (`vm snapshot`) instead of receiving it.
    #[arg(long)]
    from: Option<PathBuf>,
    /// The guest: the same as the source's.
    #[command(flatten)]
    guest: GuestArgs,
    /// A file the guest's serial lines are appended to.
    #[arg(long)]
    serial: Option<PathBuf>,
    /// A Unix socket to serve once the guest runs here, so it can migrate on.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Run the guest this many seconds after it arrived (and on until it finished a pass
    /// there, if it has not yet, within three passes' time), then exit: 0 only if it
    /// reported no error and made progress. Without it, run until killed (or migrated on).
    #[arg(long, value_name = "SECONDS")]
    run_for: Option<u64>,
    /// Give up if no source connects within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    timeout: u64,
    /// Print events as JSON lines on stdout.
    #[arg(long)]
    json: bool,
}

/// How to migrate: what `vm migrate`, `vm pingpong` and `demo` pass to the source.
#[derive(clap::Args, Clone, Debug)]
pub struct MigrateSettings {
    /// Parallel channels (1 to 255).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..))]
    pub channels: u8,
    /// Page compression, `METHOD` or `METHOD:LEVEL` (none, zlib, zstd, lz4).
    #[arg(long, value_parser = checked_compression)]
    pub compress: Option<String>,
    /// Same host: hand the guest's memory (a memfd) over on a unix: address instead of
    /// copying it; only vCPU and device state move.
    #[arg(long)]
    pub local: bool,
    #[command(flatten)]
    pub precopy: PrecopyArgs,
}

fn checked_compression(text: &str) -> Result<String, String> {
    parse_compression(text).map(|_| text.to_owned())
}

impl MigrateSettings {
    fn to_json(&self) -> Value {
        json!({
            "channels": self.channels,
            "compress": self.compress,
            "local": self.local,
            "precopy": self.precopy.to_json(),
        })
    }

    /// The source's configuration from what [`MigrateSettings::to_json`] wrote.
    fn source_from_json(value: &Value) -> Result<(SourceConfig, PrecopyArgs)> {
        let precopy = PrecopyArgs::from_json(&value["precopy"])?;
        let mut source = SourceConfig::default();
        source.channels = value["channels"]
            .as_u64()
            .and_then(|channels| u8::try_from(channels).ok())
            .filter(|&channels| channels > 0)
            .context("channels must be 1 to 255")?;
        if let Some(text) = value["compress"].as_str() {
            source.compression = parse_compression(text).map_err(anyhow::Error::msg)?;
        }
        source.max_bandwidth = precopy.max_bandwidth;
        source.local_memory = value["local"].as_bool().unwrap_or(false);
        Ok((source, precopy))
    }
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The running VM's control socket.
    #[arg(long)]
    control: PathBuf,
    /// The `vm incoming` to move to: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    to: Address,
    /// The destination's control socket (`vm incoming --control`), asked afterwards
    /// for its own downtime measure.
    #[arg(long)]
    destination_control: Option<PathBuf>,
    #[command(flatten)]
    settings: MigrateSettings,
    /// Print one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// The running VM's control socket.
    #[arg(long)]
    control: PathBuf,
    /// The snapshot file to write (by the VM's process; a relative path is taken from
    /// here).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    precopy: PrecopyArgs,
    /// Print one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The running VM's control socket.
    #[arg(long)]
    control: PathBuf,
    /// Print the JSON status object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct PingpongArgs {
    /// Migrations, each to a fresh `vm incoming` process.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    settings: MigrateSettings,
    /// Print one JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
}

/// Prints an event: a JSON line, or its text.
fn event(json: bool, value: &Value, text: &str) {
    if json {
        multifd_cli::outln!("{value}");
    } else {
        multifd_cli::outln!("{text}");
    }
}

fn image(args: &ImageArgs) -> Result<()> {
    let mut image = GuestImage::new(args.memory);
    image.write_bytes = args.write_bytes;
    image.dirty_rate = args.dirty_rate;
    if args.dirty_rate > 0 {
        image.tsc_hz = host_tsc_hz();
    }
    let sector = image.build()?;
    fs::write(&args.out, sector).with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} bytes); boot it with qemu-system-x86_64 -accel kvm -m {}M -drive file={},format=raw -serial stdio",
        args.out.display(),
        sector.len(),
        args.memory >> 20,
        args.out.display()
    );
    Ok(())
}

fn run_vm(args: &RunArgs) -> Result<()> {
    let server = control::Server::bind(&args.control)?;
    let vm = KvmVm::start(&args.guest.config(args.serial.as_deref()))?;
    event(
        args.json,
        &json!({ "event": "ready", "control": args.control }),
        &format!("guest running; control socket {}", args.control.display()),
    );
    server.serve(&vm, &Value::Null, None)?;
    event(
        args.json,
        &json!({ "event": "migrated" }),
        "the guest runs on the destination now",
    );
    Ok(())
}

fn incoming(args: &IncomingArgs) -> Result<()> {
    let server = args
        .control
        .as_deref()
        .map(control::Server::bind)
        .transpose()?;
    let vm = KvmVm::incoming(&args.guest.config(args.serial.as_deref()))?;
    let stats = match (&args.from, &args.listen) {
        (Some(file), _) => multifd_testvm::restore(&vm, file)
            .with_context(|| format!("restoring {}", file.display()))?,
        (None, Some(listen)) => {
            let listener = Listener::bind(listen)?;
            let address = listener.address();
            event(
                args.json,
                &json!({ "event": "listening", "address": address.to_string() }),
                &format!("waiting for the guest on {address}"),
            );
            let mut config = DestinationConfig::default();
            config.wait_for_source = Some(Duration::from_secs(args.timeout));
            multifd_testvm::receive(&vm, &listener, &config)?
        }
        (None, None) => bail!("vm incoming needs --listen or --from"),
    };
    let (arrived, resumed) = (vm.progress(), Instant::now());
    let arrival = json!({
        "event": "resumed",
        "destination_downtime_ms": stats.switchover_time.map(|time| time.as_secs_f64() * 1e3),
        "seconds": stats.total_time.as_secs_f64(),
        "bytes": stats.bytes,
        "passes": arrived.passes,
    });
    event(
        args.json,
        &arrival,
        &format!(
            "guest resumed after {:.2} s; destination downtime {}; passes {:?}",
            stats.total_time.as_secs_f64(),
            stats.switchover_time.map_or("n/a".into(), |time| format!(
                "{:.1} ms",
                time.as_secs_f64() * 1e3
            )),
            arrived.passes
        ),
    );
    let deadline = args
        .run_for
        .map(|seconds| Instant::now() + Duration::from_secs(seconds));
    let moved = match &server {
        Some(server) => server.serve(&vm, &arrival, deadline)? == control::Served::MigratedAway,
        None => {
            while deadline.is_none_or(|deadline| Instant::now() < deadline) {
                thread::sleep(control::POLL);
            }
            false
        }
    };
    if moved {
        event(
            args.json,
            &json!({ "event": "migrated" }),
            "the guest runs on the destination now",
        );
        return Ok(());
    }
    let now = vm
        .wait_for(
            args.guest.pass_bound(),
            "a pass after the migration",
            |now| !now.errors.is_empty() || now.min_passes() > arrived.min_passes(),
        )
        .with_context(|| {
            format!(
                "the guest made no progress after the migration (passes {:?} at arrival)",
                arrived.passes
            )
        })?;
    if let Some(error) = now.errors.first() {
        bail!("the guest reported an error after the migration: {error}");
    }
    if let Some(failure) = vm.vcpu_failures().first() {
        bail!("a vCPU failed after the migration: {failure}");
    }
    let seconds = resumed.elapsed().as_secs_f64();
    event(
        args.json,
        &json!({
            "event": "done",
            "passes": now.passes,
            "arrival_passes": arrived.passes,
            "seconds": seconds,
        }),
        &format!(
            "guest ok: passes {:?} at arrival, {:?} after {seconds:.1} s, no errors",
            arrived.passes, now.passes
        ),
    );
    Ok(())
}

fn migrate(args: &MigrateArgs) -> Result<()> {
    let mut summary = control::migrate(&args.control, &args.to, &args.settings, &mut |line| {
        if !args.json {
            eprintln!("{line}");
        }
    })?;
    if let Some(path) = &args.destination_control {
        let status = control::status(path)?;
        summary["destination_downtime_ms"] = status["arrival"]["destination_downtime_ms"].clone();
    }
    if args.json {
        multifd_cli::outln!("{summary}");
    } else {
        multifd_cli::out!("{}", precopy::table(&summary));
    }
    Ok(())
}

fn snapshot(args: &SnapshotArgs) -> Result<()> {
    let out = std::path::absolute(&args.out)
        .with_context(|| format!("the snapshot path {}", args.out.display()))?;
    let summary = control::snapshot(&args.control, &out, &args.precopy, &mut |line| {
        if !args.json {
            eprintln!("{line}");
        }
    })?;
    if args.json {
        multifd_cli::outln!("{summary}");
    } else {
        multifd_cli::out!("{}", precopy::table(&summary));
    }
    Ok(())
}

fn status(args: &StatusArgs) -> Result<()> {
    let status = control::status(&args.control)?;
    if args.json {
        multifd_cli::outln!("{status}");
    } else {
        multifd_cli::outln!(
            "{}; passes per vCPU {}; errors {}; vCPU failures {}",
            if status["running"].as_bool() == Some(true) {
                "running"
            } else {
                "stopped"
            },
            status["passes"],
            status["errors"],
            status["vcpu_failures"]
        );
    }
    Ok(())
}
