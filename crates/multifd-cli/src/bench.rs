//! `multifd bench`: how fast this host migrates a generated image, for several compression
//! methods and channel counts. Over loopback the destination receives into fresh anonymous
//! memory, as a VMM's does, in this process: source and destination compete for the same
//! cores and CPU seconds are both sides'. With `--to` the image goes over a real link to a
//! `multifd recv` on another host, and CPU seconds are the source's.
//!
//! The steps are public so that `multifd-bench` measures a baseline beside the same runs.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::ValueEnum;
use multifd::{
    Address, CompressionSettings, Destination, DestinationConfig, Error, GuestMemory, Integrity,
    Link, Listener, RamBlock, Source, SourceConfig, TlsConfig,
};
use serde_json::{json, Value};

use crate::cpu_time::process_cpu_seconds;
use crate::image::{self, parse_size, PAGE};
use crate::ram_files::{self, RamFile};
use crate::tls::generate_certificates;
use crate::{Method, GIB};

/// `multifd bench`: our own migration's throughput, over loopback or to a remote `recv`.
#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    runs: RunArgs,
    /// Send to the `multifd recv` listening at ADDR (tcp:HOST:PORT or unix:PATH) instead of
    /// migrating over loopback, to measure a real link. Every run is one migration: run
    /// `recv` in a loop there; each run waits for it to listen again.
    #[arg(long, value_name = "ADDR", conflicts_with = "prealloc")]
    to: Option<Address>,
}

/// The generated image a benchmark migrates or compresses.
#[derive(clap::Args)]
pub struct ImageArgs {
    /// Size of the generated guest-memory image.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub size: u64,
    /// Directory for the image (default: /dev/shm when present, else the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl ImageArgs {
    /// Generates the image in a scratch directory, which is removed with the returned guard.
    pub fn generate(&self) -> Result<(tempfile::TempDir, PathBuf)> {
        let directory = image::scratch_directory(self.dir.as_deref(), "multifd-bench-")?;
        let path = directory.path().join("guest.img");
        image::create(&path, self.size, 1)?;
        Ok((directory, path))
    }
}

/// Which migrations a throughput benchmark runs, and how often.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The image to migrate.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Channel counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u8, 2, 4, 8])]
    pub channels: Vec<u8>,
    /// Runs per configuration; the median is reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Preallocate the destination's memory before each run, so page faults on fresh
    /// memory are not part of the measurement.
    #[arg(long)]
    pub prealloc: bool,
    /// Compression to measure, comma-separated: METHOD (at its default level) or
    /// METHOD:LEVEL, METHOD being none, zlib, zstd or lz4.
    #[arg(long, value_delimiter = ',', default_value = "none", value_parser = parse_compression)]
    pub compress: Vec<CompressionSettings>,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measure every configuration over mutual TLS 1.3 too, beside plaintext, with
    /// throwaway certificates (over loopback only).
    #[arg(long)]
    pub tls: bool,
    /// Measure every configuration with the CRC32C integrity trailer too, beside plain.
    #[arg(long)]
    pub integrity: bool,
    /// Measure every uncompressed configuration with zero-copy sends too, beside plain.
    #[arg(long)]
    pub zero_copy: bool,
}

/// How the packets of one configuration travel, beside the compression.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain packets over plaintext sockets.
    Plain,
    /// Over mutual TLS 1.3.
    Tls,
    /// With a CRC32C trailer on every packet.
    Crc32c,
    /// Pages sent with `MSG_ZEROCOPY`.
    ZeroCopy,
}

impl Transport {
    /// The variants `args` asks for, plain first.
    fn selected(args: &RunArgs) -> Vec<Self> {
        let mut selected = vec![Self::Plain];
        for (wanted, transport) in [
            (args.tls, Self::Tls),
            (args.integrity, Self::Crc32c),
            (args.zero_copy, Self::ZeroCopy),
        ] {
            if wanted {
                selected.push(transport);
            }
        }
        selected
    }

    /// The suffix of the table's first column; also the JSON `transport` value.
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Tls => "tls",
            Self::Crc32c => "crc32c",
            Self::ZeroCopy => "zero-copy",
        }
    }
}

/// Parses `METHOD` or `METHOD:LEVEL`.
pub fn parse_compression(text: &str) -> Result<CompressionSettings, String> {
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

/// One compression method at one channel count.
#[derive(Clone, Copy)]
pub struct Configuration {
    /// Method and level.
    pub compression: CompressionSettings,
    /// Channel count.
    pub channels: u8,
    /// How the packets travel.
    pub transport: Transport,
}

impl Configuration {
    /// The compression, and `+tls`, `+crc32c` or `+zero-copy`, as the table's first column
    /// shows them.
    fn label(&self) -> String {
        match self.transport {
            Transport::Plain => self.compression.to_string(),
            other => format!("{} +{}", self.compression, other.name()),
        }
    }
}

/// What one side did in one configuration (medians over the repeats).
#[derive(Clone, Copy)]
pub struct Figures {
    /// Wall time of the migration.
    pub seconds: f64,
    /// Bytes on the wire, where known.
    pub wire_bytes: Option<u64>,
    /// CPU time of the side's process over the migration.
    pub cpu_seconds: f64,
}

/// One configuration's medians: ours, and the baseline's where it was measured.
pub struct Row {
    configuration: Configuration,
    ours: Figures,
    baseline: Option<Figures>,
}

/// Another migration measured beside ours, on the same image, in the same run.
pub trait Baseline {
    /// One unmeasured run without compression; false when the baseline cannot run on this
    /// host, which leaves its columns empty.
    fn warm_up(&mut self, channels: u8) -> Result<bool>;
    /// One measured run; `None` when the baseline does not offer this configuration.
    fn run(&mut self, configuration: Configuration) -> Result<Option<Figures>>;
}

/// Where our migrations go.
pub enum Target {
    /// A destination in this process, receiving into anonymous memory.
    Loopback {
        /// Touch the destination's memory before the run, so first-touch page faults
        /// are not measured.
        prealloc: bool,
    },
    /// A `multifd recv` on another host.
    Remote(Address),
}

/// How long a run waits for the remote `multifd recv` to listen: the operator's loop
/// restarts it within milliseconds, so this only covers a slow host, and a wrong address
/// still fails soon.
const RECV_RESTART_WAIT: Duration = Duration::from_secs(10);
/// How often a run tries to connect while the remote `multifd recv` restarts.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(50);

/// The image and where it goes: what every measured run of ours shares.
pub struct Bench {
    image: [RamFile; 1],
    size: u64,
    target: Target,
}

/// `multifd bench`: our migrations of a generated image, without a baseline.
pub fn run(args: BenchArgs) -> Result<()> {
    let (_directory, image) = args.runs.image.generate()?;
    let target = match args.to {
        Some(address) => Target::Remote(address),
        None => Target::Loopback {
            prealloc: args.runs.prealloc,
        },
    };
    let bench = Bench::new(image, args.runs.image.size, target);
    let rows = bench.measure(&args.runs, None)?;
    if args.runs.json {
        crate::outln!("{}", bench.json(&rows, args.runs.repeat, None));
    } else {
        bench.print_table(&rows, args.runs.repeat, None);
    }
    Ok(())
}

impl Bench {
    /// A benchmark of the `size`-byte image at `image`, migrated to `target`.
    pub fn new(image: PathBuf, size: u64, target: Target) -> Self {
        Self {
            image: [RamFile {
                name: "pc.ram".into(),
                path: image,
            }],
            size,
            target,
        }
    }

    /// Runs every configuration `args.repeat` times, and the baseline's beside it; returns
    /// the medians.
    pub fn measure(
        &self,
        args: &RunArgs,
        mut baseline: Option<&mut dyn Baseline>,
    ) -> Result<Vec<Row>> {
        let certificates = if args.tls {
            if matches!(self.target, Target::Remote(_)) {
                anyhow::bail!("--tls measures over loopback only");
            }
            let directory = tempfile::tempdir().context("certificate directory")?;
            generate_certificates(directory.path()).context("throwaway certificates")?;
            Some(directory)
        } else {
            None
        };
        let certificates = certificates.as_ref().map(tempfile::TempDir::path);
        let transports = Transport::selected(args);
        let configurations: Vec<Configuration> = args
            .compress
            .iter()
            .flat_map(|&compression| {
                let transports = &transports;
                args.channels.iter().flat_map(move |&channels| {
                    transports
                        .iter()
                        .map(move |&transport| Configuration {
                            compression,
                            channels,
                            transport,
                        })
                        // Zero-copy sends pages as they are in memory: no compression.
                        .filter(|configuration| {
                            configuration.transport != Transport::ZeroCopy
                                || configuration.compression == CompressionSettings::NONE
                        })
                })
            })
            .collect();
        // One unmeasured run of each side first: the first migration after the image is
        // made pays for cold page tables and fresh host memory, whichever side goes first.
        let first = args.channels.first().copied().unwrap_or(1);
        self.run(
            Configuration {
                compression: CompressionSettings::NONE,
                channels: first,
                transport: Transport::Plain,
            },
            certificates,
        )?;
        if let Some(side) = baseline.as_deref_mut() {
            if !side.warm_up(first)? {
                baseline = None;
            }
        }
        let mut ours = vec![Vec::new(); configurations.len()];
        let mut theirs = vec![Vec::new(); configurations.len()];
        for repeat in 0..args.repeat {
            for (index, &configuration) in configurations.iter().enumerate() {
                // Alternate who goes first, so neither side always inherits the other's
                // warm memory.
                if repeat % 2 == 0 {
                    ours[index].push(self.run(configuration, certificates)?);
                }
                // Baselines run the plain variant only.
                if let Some(side) = baseline
                    .as_deref_mut()
                    .filter(|_| configuration.transport == Transport::Plain)
                {
                    theirs[index].extend(side.run(configuration)?);
                }
                if repeat % 2 == 1 {
                    ours[index].push(self.run(configuration, certificates)?);
                }
            }
        }
        let by_seconds = |figures: &Figures| figures.seconds;
        Ok(configurations
            .into_iter()
            .zip(ours.iter_mut().zip(&mut theirs))
            .map(|(configuration, (ours, theirs))| Row {
                configuration,
                ours: median(ours, by_seconds),
                baseline: (!theirs.is_empty()).then(|| median(theirs, by_seconds)),
            })
            .collect())
    }

    /// One migration of the image: the source's seconds and wire bytes, and the CPU time
    /// of this process meanwhile. A TLS run uses the certificates in `certificates`.
    fn run(&self, configuration: Configuration, certificates: Option<&Path>) -> Result<Figures> {
        let tls = certificates
            .filter(|_| configuration.transport == Transport::Tls)
            .map(TlsConfig::new);
        match &self.target {
            Target::Loopback { prealloc } => self.over_loopback(configuration, tls, *prealloc),
            Target::Remote(address) => self.send(address, configuration, tls, || Ok(())),
        }
    }

    fn over_loopback(
        &self,
        configuration: Configuration,
        tls: Option<TlsConfig>,
        prealloc: bool,
    ) -> Result<Figures> {
        let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
        let address = listener.address();
        let memory = GuestMemory::new(vec![anonymous_block("pc.ram", self.size, prealloc)?])?;
        let mut config = DestinationConfig::default();
        // Fresh anonymous memory (preallocated with zeros or not).
        config.memory_zeroed = true;
        config.tls.clone_from(&tls);
        let receiving =
            std::thread::spawn(move || Destination::new(config).run(&listener, |_| Ok(memory)));
        self.send(&address, configuration, tls, || {
            receiving
                .join()
                .map_err(|_| anyhow::anyhow!("the destination thread panicked"))??;
            Ok(())
        })
    }

    /// Sends the image once; `received` waits for a destination in this process, so that
    /// its CPU time counts too.
    fn send(
        &self,
        address: &Address,
        configuration: Configuration,
        tls: Option<TlsConfig>,
        received: impl FnOnce() -> Result<()>,
    ) -> Result<Figures> {
        let memory = ram_files::map_for_sending(&self.image)?;
        let mut config = SourceConfig::default();
        config.channels = configuration.channels;
        config.compression = configuration.compression;
        config.tls = tls;
        config.integrity = if configuration.transport == Transport::Crc32c {
            Integrity::Crc32c
        } else {
            Integrity::None
        };
        config.zero_copy = configuration.transport == Transport::ZeroCopy;
        let (mut source, started, cpu_before) = connect(address, &config, &memory)?;
        source.queue_block(0)?;
        let stats = source.complete()?;
        let seconds = started.elapsed().as_secs_f64();
        received()?;
        let cpu_seconds = process_cpu_seconds(std::process::id())? - cpu_before;
        Ok(Figures {
            seconds,
            wire_bytes: Some(stats.bytes),
            cpu_seconds,
        })
    }

    /// Prints the medians as a table, with the baseline's columns under its `baseline` name.
    pub fn print_table(&self, rows: &[Row], repeat: u32, baseline: Option<&str>) {
        let (destination, cpu) = match &self.target {
            Target::Loopback { prealloc } => (
                format!("destination memory {}", memory_state(*prealloc)),
                "both sides' processes",
            ),
            Target::Remote(address) => (format!("sent to {address}"), "this process (the source)"),
        };
        crate::outln!(
            "{:.2} GiB image ({IMAGE_MIX}), {destination}, median of {repeat} runs; CPU s: {cpu}",
            self.size as f64 / GIB,
        );
        let mut header = format!(
            "{:>17} {:>8} | {}",
            "compression",
            "channels",
            figures_header("seconds")
        );
        if let Some(name) = baseline {
            header += &format!(
                " | {} | {:>7}",
                figures_header(&format!("{name} s")),
                "speedup"
            );
        }
        crate::outln!("{header}");
        for row in rows {
            let mut line = format!(
                "{:>17} {:>8} | {}",
                row.configuration.label(),
                row.configuration.channels,
                self.columns(Some(&row.ours)),
            );
            if baseline.is_some() {
                let speedup = match &row.baseline {
                    Some(theirs) => format!("{:.2}x", theirs.seconds / row.ours.seconds),
                    None => "-".into(),
                };
                line += &format!(" | {} | {speedup:>7}", self.columns(row.baseline.as_ref()));
            }
            crate::outln!("{line}");
        }
    }

    /// One side's figures in the table, or dashes where it was not measured.
    fn columns(&self, figures: Option<&Figures>) -> String {
        let Some(figures) = figures else {
            return format!("{:>8} {:>7} {:>9} {:>6} {:>7}", "-", "-", "-", "-", "-");
        };
        let (wire, ratio) = match figures.wire_bytes {
            Some(bytes) => (
                format!("{:.3}", bytes as f64 / GIB),
                format!("{:.2}", self.size as f64 / bytes as f64),
            ),
            None => ("-".into(), "-".into()),
        };
        format!(
            "{:>8.2} {:>7.3} {wire:>9} {ratio:>6} {:>7.2}",
            figures.seconds,
            self.size as f64 / GIB / figures.seconds,
            figures.cpu_seconds
        )
    }

    /// The medians as one JSON object, with the baseline's figures under its `baseline`
    /// key in every run.
    pub fn json(&self, rows: &[Row], repeat: u32, baseline: Option<&str>) -> Value {
        let figures = |figures: &Figures| {
            json!({
                "seconds": figures.seconds,
                "guest_gib_per_second": self.size as f64 / GIB / figures.seconds,
                "wire_bytes": figures.wire_bytes,
                "cpu_seconds": figures.cpu_seconds,
            })
        };
        let runs: Vec<Value> = rows
            .iter()
            .map(|row| {
                let mut run = json!({
                    "compression": row.configuration.compression.to_string(),
                    "channels": row.configuration.channels,
                    "transport": row.configuration.transport.name(),
                    "ours": figures(&row.ours),
                });
                if let Some(key) = baseline {
                    run[key] = json!(row.baseline.as_ref().map(figures));
                }
                run
            })
            .collect();
        let mut object = json!({
            "guest_bytes": self.size,
            "image": IMAGE_MIX,
            "repeat": repeat,
            "cpus": std::thread::available_parallelism().map_or(1, usize::from),
            "runs": runs,
        });
        match &self.target {
            Target::Loopback { prealloc } => {
                object["destination_memory"] = json!(memory_state(*prealloc));
            }
            Target::Remote(address) => object["destination"] = json!(address.to_string()),
        }
        object
    }
}

/// What the generated image holds, as the reports say it.
const IMAGE_MIX: &str = "25% zero, 25% random, 50% text-like pages";

/// The destination's memory at the start of a loopback run.
fn memory_state(prealloc: bool) -> &'static str {
    if prealloc {
        "preallocated"
    } else {
        "fresh"
    }
}

/// The table heading of one side's figures, its first column called `seconds`.
fn figures_header(seconds: &str) -> String {
    format!(
        "{seconds:>8} {:>7} {:>9} {:>6} {:>7}",
        "GiB/s", "wire GiB", "ratio", "CPU s"
    )
}

/// Connects, trying again while a remote `multifd recv` restarts between runs. Returns the
/// source, when the attempt that connected started, and this process's CPU seconds then:
/// failed attempts are not measured.
fn connect(
    address: &Address,
    config: &SourceConfig,
    memory: &GuestMemory,
) -> Result<(Source, Instant, f64)> {
    let deadline = Instant::now() + RECV_RESTART_WAIT;
    loop {
        let cpu_before = process_cpu_seconds(std::process::id())?;
        let started = Instant::now();
        match Source::connect(address, config, memory.clone()) {
            Ok(source) => return Ok((source, started, cpu_before)),
            Err(error) if recv_restarting(&error) && Instant::now() < deadline => {
                std::thread::sleep(RECONNECT_INTERVAL);
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Whether a failed connection attempt met a remote `multifd recv` restarting: nothing
/// listening yet, or the exiting one's socket resetting a connection it never accepted.
fn recv_restarting(error: &Error) -> bool {
    match error {
        Error::Io {
            link: Link::Control,
            source,
            ..
        } => matches!(
            source.kind(),
            ErrorKind::ConnectionRefused | ErrorKind::NotFound | ErrorKind::ConnectionReset
        ),
        Error::Closed {
            link: Link::Control,
            ..
        } => true,
        _ => false,
    }
}

/// The middle run by `key` (the upper middle of an even count); `runs` is not empty.
pub fn median<T: Copy>(runs: &mut [T], key: impl Fn(&T) -> f64) -> T {
    runs.sort_by(|left, right| key(left).total_cmp(&key(right)));
    runs[runs.len() / 2]
}

/// A block over anonymous memory, as a VMM's guest RAM would be: backed by transparent
/// huge pages where the kernel allows, as QEMU and most VMMs advise. With `prealloc`
/// every page is faulted in now, as a VMM that preallocates guest RAM does.
pub fn anonymous_block(name: &str, size: u64, prealloc: bool) -> Result<RamBlock> {
    let mut mapping = memmap2::MmapMut::map_anon(size as usize).context("anonymous memory")?;
    // Only a hint: without huge pages the memory works the same, with more page faults.
    let _ = mapping.advise(memmap2::Advice::HugePage);
    if prealloc {
        for page in mapping.chunks_mut(PAGE) {
            page[0] = 0;
        }
    }
    Ok(RamBlock::from_mapping(name, mapping)?)
}
