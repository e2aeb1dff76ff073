//! `multifd`: migrate guest memory images between hosts over parallel channels.

mod demo;
mod device_files;
mod live_demo;
mod precopy;
mod report;
mod snapshot;
mod vm;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use multifd::{
    Address, CompressionSettings, Destination, DestinationConfig, GuestMemory, Integrity, Listener,
    MigrationStats, SaveDevices, Source, SourceConfig, ZeroPageMode,
};
use multifd_cli::bench;
use multifd_cli::outputs::Outputs;
use multifd_cli::ram_files::{self, RamFile};
use multifd_cli::tls::TlsArgs;
use multifd_cli::Method;

use crate::device_files::DeviceFile;

#[derive(Parser)]
#[command(
    name = "multifd",
    version,
    about = "Live migration of guest memory over parallel channels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send memory images to a listening `multifd recv`.
    Send(SendArgs),
    /// Receive a migration into memory-image files.
    Recv(RecvArgs),
    /// Live-migrate a self-checking KVM guest to a second process over loopback and check
    /// it runs on there (the simulated guest without /dev/kvm; `--guest image` copies
    /// memory-image files); print the rounds, downtime and throughput.
    Demo(demo::DemoArgs),
    /// Save memory images and device state into a snapshot file, or restore one.
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// Run, receive, migrate and ping-pong the self-checking KVM guest as processes, or
    /// write it as a disk image for QEMU.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Measure migration throughput for several compression methods and channel counts,
    /// over loopback or, with --to, to a `multifd recv` on another host.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct SendArgs {
    /// Destination: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    to: Address,
    /// Parallel channels (1 to 255).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..))]
    channels: u8,
    /// RAM block NAME and the memory-image file holding it, as NAME=PATH (repeatable).
    #[arg(long = "ram", value_name = "NAME=PATH", required = true)]
    ram: Vec<RamFile>,
    /// End-to-end integrity: `crc32c` puts a CRC32C after every packet, so a corrupted
    /// byte on the way is an error naming the channel and packet.
    #[arg(long, value_enum, default_value_t = IntegrityArg::None)]
    integrity: IntegrityArg,
    /// A device and the file holding its state, as IDSTR[/INSTANCE]=PATH (repeatable).
    /// The file's last 4 KiB (the whole file when smaller) is sent as the device's config
    /// blob, the rest as its state stream; the instance is the part after the last `/`
    /// when it is a number, 0 otherwise.
    #[arg(long = "device", value_name = "IDSTR[/INSTANCE]=PATH")]
    devices: Vec<DeviceFile>,
    /// Device-state bytes per chunk.
    #[arg(long, default_value_t = multifd::DEFAULT_DEVICE_CHUNK_SIZE)]
    device_chunk_size: u32,
    /// Dedicate the last K channels to device state (RAM uses the others); 0 shares them.
    #[arg(long, value_name = "K", default_value_t = 0)]
    device_channels: u8,
    /// Most wire bytes per second over all channels together (default: unlimited), to
    /// leave the rest of the link to other traffic.
    #[arg(long, value_name = "BYTES_PER_SECOND", value_parser = clap::value_parser!(u64).range(1..))]
    max_bandwidth: Option<u64>,
    /// Send uncompressed pages with MSG_ZEROCOPY (TCP only; not with --compress, --tls-dir
    /// or --integrity): the kernel reads the image instead of copying it. On loopback the
    /// kernel copies anyway.
    #[arg(long)]
    zero_copy: bool,
    #[command(flatten)]
    settings: Settings,
    /// Zero-page handling: detect zero pages in the channel threads, or send every page.
    #[arg(long, value_enum, default_value_t = ZeroPage::Multifd)]
    zero_page: ZeroPage,
    /// Page compression: zlib and zstd as QEMU's multifd does them, or lz4 (fastest).
    #[arg(long, value_enum, default_value_t = Method::None)]
    compress: Method,
    /// Compression level: zlib 0 to 9 (default 1), zstd -5 to 19 (default 1); none and
    /// lz4 have no levels.
    #[arg(long, allow_negative_numbers = true)]
    level: Option<i32>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    output: Output,
}

#[derive(clap::Args)]
struct RecvArgs {
    /// Address to listen on: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    listen: Address,
    /// Where each announced RAM block goes, as NAME=PATH (repeatable). Each file is written
    /// under a temporary name beside PATH and renamed to PATH only when the migration
    /// succeeded; a failed one leaves PATH as it was.
    #[arg(long = "ram", value_name = "NAME=PATH", required = true)]
    ram: Vec<RamFile>,
    /// A device and the file to write its loaded state to (state, then config blob), as
    /// IDSTR[/INSTANCE]=PATH (repeatable). The source must send exactly these devices.
    #[arg(long = "device", value_name = "IDSTR[/INSTANCE]=PATH")]
    devices: Vec<DeviceFile>,
    /// Most device-state bytes one device may have queued before it loads them; past it
    /// the migration fails.
    #[arg(long, value_name = "BYTES", default_value_t = multifd::DEFAULT_MAX_QUEUED_DEVICE_BYTES)]
    max_queued_device_bytes: u64,
    /// Refuse a source announcing more guest memory than this, in bytes, before any file
    /// is created.
    #[arg(long, value_name = "BYTES", default_value_t = multifd::DEFAULT_MAX_GUEST_BYTES)]
    max_guest_bytes: u64,
    /// Refuse a source whose channels would need more receive buffers than this, in bytes
    /// (packet, decompression and checking buffers over all channels).
    #[arg(long, value_name = "BYTES", default_value_t = multifd::DEFAULT_MAX_RECEIVE_BUFFER_BYTES)]
    max_receive_buffer_bytes: u64,
    /// Accept only this many channels (1 to 255).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    channels: Option<u8>,
    /// Accept only this integrity (`none` or `crc32c`); by default the source's.
    #[arg(long, value_enum)]
    integrity: Option<IntegrityArg>,
    /// Accept only this compression method (at `--level`, or the method's default).
    #[arg(long, value_enum)]
    compress: Option<Method>,
    /// Accept only this compression level (with `--compress`).
    #[arg(long, allow_negative_numbers = true, requires = "compress")]
    level: Option<i32>,
    /// Give up if no source connects within this many seconds (default: wait).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    output: Output,
}

/// `--integrity` values.
#[derive(Clone, Copy, ValueEnum)]
enum IntegrityArg {
    /// No end-to-end check (QEMU's wire format).
    None,
    /// A CRC32C after every packet.
    Crc32c,
}

impl From<IntegrityArg> for Integrity {
    fn from(integrity: IntegrityArg) -> Self {
        match integrity {
            IntegrityArg::None => Self::None,
            IntegrityArg::Crc32c => Self::Crc32c,
        }
    }
}

/// Settings both ends must agree on.
#[derive(clap::Args)]
struct Settings {
    /// Page size in bytes.
    #[arg(long, default_value_t = 4096)]
    page_size: u32,
    /// Packet size in bytes (a multiple of the page size).
    #[arg(long, default_value_t = 512 * 1024)]
    packet_size: u32,
}

#[derive(clap::Args)]
struct Output {
    /// Print one JSON object with the statistics on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ZeroPage {
    None,
    Multifd,
}

impl From<ZeroPage> for ZeroPageMode {
    fn from(mode: ZeroPage) -> Self {
        match mode {
            ZeroPage::None => Self::None,
            ZeroPage::Multifd => Self::Multifd,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Send(args) => send(&args),
        Command::Recv(args) => recv(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Snapshot { command } => snapshot::run(&command),
        Command::Vm(command) => vm::run(command),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("multifd: {}", report::one_line(&error));
            ExitCode::FAILURE
        }
    }
}

fn send(args: &SendArgs) -> Result<()> {
    let mut config = SourceConfig::default();
    config.channels = args.channels;
    config.page_size = args.settings.page_size;
    config.packet_size = args.settings.packet_size;
    config.zero_page = args.zero_page.into();
    config.device_chunk_size = args.device_chunk_size;
    config.device_channels = args.device_channels;
    config.compression = CompressionSettings::new(args.compress.into(), args.level)?;
    config.integrity = args.integrity.into();
    config.tls = args.tls.config();
    config.max_bandwidth = args.max_bandwidth;
    config.zero_copy = args.zero_copy;
    let memory = ram_files::map_for_sending(&args.ram)?;
    let devices = device_files::open_for_sending(&args.devices)?;
    let result = send_all(
        &args.to,
        &config,
        memory,
        devices,
        "sending",
        args.output.json,
    );
    report::print_outcome(result, args.output.json)
}

/// Migrates memory images and device state in one go, with a progress bar: every block in
/// one round, then switchover (the devices' state goes), then completion.
pub(crate) fn send_all(
    address: &Address,
    config: &SourceConfig,
    memory: GuestMemory,
    devices: SaveDevices,
    label: &'static str,
    json: bool,
) -> Result<MigrationStats> {
    let mut source = Source::connect_with_devices(address, config, memory, devices)?;
    let progress = report::ProgressBar::start(&source.monitor(), label, json);
    let result = (|| {
        for block in 0..source.memory().blocks().len() {
            source.queue_block(block)?;
        }
        source.end_round()?;
        source.switchover()?;
        source.complete()
    })();
    progress.finish();
    Ok(result?)
}

fn recv(args: &RecvArgs) -> Result<()> {
    device_files::check_outputs(&args.ram, &args.devices)?;
    let default_chunk = u64::from(multifd::DEFAULT_DEVICE_CHUNK_SIZE);
    anyhow::ensure!(
        args.devices.is_empty() || args.max_queued_device_bytes >= default_chunk,
        "--max-queued-device-bytes {} is below one device-state chunk of the default size \
         ({default_chunk} bytes): a source sending default chunks would be refused",
        args.max_queued_device_bytes
    );
    let compression = args
        .compress
        .map(|method| CompressionSettings::new(method.into(), args.level))
        .transpose()?;
    let listener = Listener::bind(&args.listen)?;
    let mut config = DestinationConfig::default();
    config.channels = args.channels;
    config.compression = compression;
    config.wait_for_source = args.timeout.map(Duration::from_secs);
    config.max_queued_device_bytes = args.max_queued_device_bytes;
    config.max_guest_bytes = args.max_guest_bytes;
    config.max_receive_buffer_bytes = args.max_receive_buffer_bytes;
    config.integrity = args.integrity.map(Into::into);
    config.tls = args.tls.config();
    // `create_for_receiving` maps new files.
    config.memory_zeroed = true;
    let destination = Destination::new(config);
    let outputs = Outputs::default();
    let devices = device_files::create_for_receiving(&args.devices, &outputs)?;
    let progress =
        report::ProgressBar::start(&destination.monitor(), "receiving", args.output.json);
    let result = destination.run_with_devices(
        &listener,
        |announced| {
            ram_files::create_for_receiving(&args.ram, announced, &outputs)
                .map_err(|error| format!("{error:#}"))
        },
        devices,
    );
    progress.finish();
    // Only a whole migration replaces the files; a failed one leaves them as they were.
    let result = result.map_err(anyhow::Error::from).and_then(|stats| {
        outputs.commit()?;
        Ok(stats)
    });
    report::print_outcome(result, args.output.json)
}
