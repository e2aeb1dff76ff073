//! `multifd-bench live-qemu`: QEMU's own live migration of a guest that keeps dirtying
//! memory at a set rate, the baseline for our precopy driver (`multifd demo --guest
//! threads --dirty-rate ...`).
//!
//! The guest is `multifd_testvm`'s self-checking boot sector
//! ([`multifd_testvm::guest_image`]), the same one our VMM runs: after a filling pass it
//! checks and rewrites the first W bytes of every page above 1 MiB pass after pass,
//! prints `P0 <pass>` on its serial port after each and `E0 <address> <found> <expected>`
//! (then halts) if a page does not hold what it wrote on the previous pass, which fails
//! the run. Its dirty rate is paced in TSC ticks: the image gets the rate and the host's
//! TSC frequency ([`multifd_testvm::host_tsc_hz`], which a QEMU/KVM guest's TSC runs at),
//! so no calibration boot is needed. The rate actually kept is measured from the pass
//! lines during the warm-up (a guest may be slower than its target: `unpaced` is as fast
//! as the vCPU goes).
//!
//! **Migration.** A source QEMU (`-accel kvm`, one vCPU, no devices but COM1 to a file
//! and the boot disk) runs the guest; a destination waits with `-incoming defer`. Both get
//! the `multifd` capability (and `auto-converge` when asked), `multifd-channels`,
//! `downtime-limit` and a `max-bandwidth` of 1 TiB/s (QEMU's default of 128 MiB/s would
//! cap the link). The guest fills its memory, runs [`WARM_UP`] more, then the source gets
//! `migrate` to the destination over loopback TCP and `query-migrate` is polled until
//! `completed` or `failed`; past the deadline the migration is cancelled (`migrate_cancel`)
//! and the guest must still be running on the source. After completion the destination's
//! guest must be running and (unless idle, halted) write a new pass line: a guest that
//! stopped would mean a broken migration, and the run fails.
//!
//! Reported from the source's `query-migrate`: `total-time`, `downtime`, `setup-time`,
//! `ram.dirty-sync-count` (rounds), `ram.transferred`, `ram.mbps`; while polling, the last
//! non-zero `ram.dirty-pages-rate` (the rate the guest kept under dirty logging, lower
//! than the one measured before when write faults slow it; QEMU zeroes it at completion) and
//! the highest `cpu-throttle-percentage`.

use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use multifd_cli::image::parse_size;
use multifd_cli::GIB;
use serde_json::{json, Value};
use tempfile::TempDir;

use multifd_testvm::guest_image::{GuestImage, GuestParameters, FIRST_ADDRESS, PAGE_SIZE};
use multifd_testvm::{host_tsc_hz, SerialLine};

use crate::devices::parse_size_or_zero;
use crate::qemu_baseline::MAX_BANDWIDTH;
use crate::qemu_process::{option_path, qemu_version, work_directory, Qemu, QEMU};

const MIB: f64 = (1u64 << 20) as f64;

/// How long the guest may take for one pass before the run fails, at least: its first pass
/// touches every page of up to 3 GiB for the first time, which host page faults make slow
/// (10 s for 2 GiB in a nested KVM guest). A paced pass may take twice its expected time.
pub(crate) const PASS_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the serial log is read: passes are timed to 1 ms, a two-thousandth of the
/// [`WARM_UP`] they are timed over.
const SERIAL_POLL: Duration = Duration::from_millis(1);
/// How long the guest runs after filling its memory before the migration starts.
pub(crate) const WARM_UP: Duration = Duration::from_secs(2);
/// How often `query-migrate` is polled: each poll takes QEMU's main lock, which the
/// migration also needs, so not more often than the precopy rounds change.
const MIGRATE_POLL: Duration = Duration::from_millis(100);
/// How long `migrate_cancel` and the destination's completion may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most guest RAM: the guest addresses it flat below 4 GiB, and the `pc` machine
/// keeps RAM up to 3 GiB below its PCI hole whatever the configuration.
const MAX_MEMORY: u64 = 3 << 30;

#[derive(clap::Args)]
pub struct LiveQemuArgs {
    /// Guest memory.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub(crate) memory: u64,
    /// Dirty rates, comma-separated: bytes per second (100M is 100 MiB/s), 0 for an idle
    /// guest (it fills its memory, then halts), `unpaced` for as fast as the vCPU goes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,100M,400M,1600M,unpaced",
        value_parser = parse_rate
    )]
    pub(crate) rates: Vec<Rate>,
    /// W: bytes the guest checks and writes at the start of every page (a multiple of 4
    /// from 8 to 4096).
    #[arg(long, default_value_t = 8)]
    pub(crate) write_bytes: u32,
    /// Multifd channel counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [4u32],
          value_parser = clap::value_parser!(u32).range(1..=255))]
    pub(crate) channels: Vec<u32>,
    /// Turn on QEMU's auto-converge (throttle the vCPU from 20%, +10% steps, up to 99%).
    #[arg(long)]
    pub(crate) auto_converge: bool,
    /// QEMU's `downtime-limit`, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) downtime_limit_ms: u64,
    /// Seconds a migration may take before it is cancelled.
    #[arg(long, default_value_t = 120)]
    pub(crate) timeout: u64,
    /// Runs per configuration, each one reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) repeat: u32,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A target dirty rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rate {
    /// The guest fills its memory, then halts.
    Idle,
    /// Bytes per second.
    Paced(u64),
    /// As fast as the vCPU increments bytes.
    Unpaced,
}

pub(crate) fn parse_rate(text: &str) -> Result<Rate, String> {
    match text {
        "unpaced" => Ok(Rate::Unpaced),
        _ => parse_size_or_zero(text).map(|rate| match rate {
            0 => Rate::Idle,
            rate => Rate::Paced(rate),
        }),
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Idle => formatter.write_str("idle"),
            Self::Paced(rate) => write!(formatter, "{:.0} MiB/s", *rate as f64 / MIB),
            Self::Unpaced => formatter.write_str("unpaced"),
        }
    }
}

/// Checks the arguments and that QEMU is installed (its version); builds every image
/// first, so a bad rate or W fails before the first boot. Returns the version and the
/// host's TSC frequency the images are paced with.
pub(crate) fn prepare(args: &LiveQemuArgs) -> Result<(String, u64)> {
    ensure!(
        args.memory > FIRST_ADDRESS
            && args.memory <= MAX_MEMORY
            && args.memory.is_multiple_of(1 << 20),
        "--memory must be whole MiB, above 1 MiB and at most 3 GiB"
    );
    let Some(version) = qemu_version()? else {
        bail!("{QEMU} is not installed");
    };
    let tsc_hz = host_tsc_hz();
    for &rate in &args.rates {
        image(args, rate, tsc_hz).parameters()?;
    }
    Ok((version, tsc_hz))
}

pub fn run(args: &LiveQemuArgs) -> Result<()> {
    let (version, tsc_hz) = prepare(args)?;
    let mut runs = Vec::new();
    for &rate in &args.rates {
        for &channels in &args.channels {
            for _ in 0..args.repeat {
                let run = migrate(args, rate, tsc_hz, channels)?;
                if !args.json {
                    eprintln!("{}", run.summary());
                }
                runs.push(run);
            }
        }
    }
    if args.json {
        println!(
            "{}",
            json!({
                "qemu_version": version,
                "memory": args.memory,
                "downtime_limit_ms": args.downtime_limit_ms,
                "timeout_seconds": args.timeout,
                "batch_pages": multifd_testvm::guest_image::DEFAULT_BATCH,
                "write_bytes": args.write_bytes,
                "tsc_hz": tsc_hz,
                "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
            })
        );
    } else {
        print_table(&runs);
        println!(
            "{version}; guest {} MiB, W {} bytes, downtime limit {} ms; rates in MiB/s, pace in TSC \
             ticks per batch (0 unpaced); MiB/s = ram.mbps; dirty = the last ram.dirty-pages-rate, \
             the guest's rate under dirty logging (QEMU updates it once a second)",
            args.memory >> 20,
            args.write_bytes,
            args.downtime_limit_ms
        );
    }
    Ok(())
}

/// The guest for `rate`: paced at it, unpaced, or (idle) one filling pass then halted.
pub(crate) fn image(args: &LiveQemuArgs, rate: Rate, tsc_hz: u64) -> GuestImage {
    let mut image = GuestImage::new(args.memory);
    image.write_bytes = args.write_bytes;
    image.tsc_hz = tsc_hz;
    match rate {
        Rate::Idle => image.passes = 1,
        Rate::Paced(rate) => image.dirty_rate = rate,
        Rate::Unpaced => {}
    }
    image
}

/// How long a pass at `rate` bytes per second may take: twice its expected time, and at
/// least [`PASS_TIMEOUT`].
pub(crate) fn pass_timeout(parameters: &GuestParameters, rate: f64) -> Duration {
    let expected = parameters.pages_per_pass() as f64 * PAGE_SIZE as f64 / rate;
    Duration::try_from_secs_f64(2.0 * expected)
        .map_or(Duration::MAX, |timeout| timeout.max(PASS_TIMEOUT))
}

/// One QEMU running the boot-sector guest, with its serial log.
struct Guest {
    qemu: Qemu,
    serial: SerialLog,
}

impl Guest {
    /// Writes the boot sector into `workdir` and starts QEMU on it; with `incoming`, as a
    /// destination waiting for `migrate-incoming`.
    fn boot(
        role: &'static str,
        workdir: &Path,
        memory: u64,
        sector: &[u8],
        incoming: bool,
    ) -> Result<Self> {
        let image = workdir.join(format!("{role}.img"));
        fs::write(&image, sector).with_context(|| format!("writing {}", image.display()))?;
        let serial = workdir.join(format!("{role}.serial"));
        let mut args: Vec<String> = [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            "kvm",
            "-machine",
            "pc",
            "-smp",
            "1",
            "-m",
            &format!("{}M", memory >> 20),
            "-serial",
            &format!("file:{}", option_path(&serial)?),
            "-drive",
            &format!("file={},format=raw", option_path(&image)?),
        ]
        .map(str::to_owned)
        .to_vec();
        if incoming {
            args.extend(["-incoming".to_owned(), "defer".to_owned()]);
        }
        let qemu = Qemu::launch(role, &args, workdir)?;
        Ok(Self {
            qemu,
            serial: SerialLog::new(serial),
        })
    }

    /// The dirty rate in bytes per second, from passes timed over at least `window`.
    fn dirty_rate(
        &mut self,
        parameters: &GuestParameters,
        window: Duration,
        pass_timeout: Duration,
    ) -> Result<f64> {
        let passes_per_second = self
            .serial
            .pass_rate(window, pass_timeout)
            .map_err(|error| self.qemu.explain(&error))?;
        Ok(passes_per_second * parameters.pages_per_pass() as f64 * PAGE_SIZE as f64)
    }

    /// Whether QEMU says the guest runs (`query-status`).
    fn running(&mut self) -> Result<bool> {
        let status = self.qemu.execute("query-status", None)?;
        Ok(status["running"].as_bool().unwrap_or(false))
    }
}

/// The guest's serial log, counted in pass lines; a self-check error line fails the run.
struct SerialLog {
    path: PathBuf,
    file: Option<File>,
    /// Bytes of a line not finished yet.
    partial: Vec<u8>,
    marks: u64,
}

impl SerialLog {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            partial: Vec::new(),
            marks: 0,
        }
    }

    /// Pass lines written so far.
    fn marks(&mut self) -> Result<u64> {
        if self.file.is_none() {
            // QEMU creates the file when it starts.
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(self.marks),
                Err(error) => {
                    return Err(error).with_context(|| format!("opening {}", self.path.display()))
                }
            }
        }
        if let Some(file) = &mut self.file {
            file.read_to_end(&mut self.partial)
                .with_context(|| format!("reading {}", self.path.display()))?;
            let complete = self
                .partial
                .iter()
                .rposition(|&byte| byte == b'\n')
                .map_or(0, |end| end + 1);
            let lines: Vec<u8> = self.partial.drain(..complete).collect();
            for line in String::from_utf8_lossy(&lines).lines() {
                match SerialLine::parse(line) {
                    Some(SerialLine::Pass { .. }) => self.marks += 1,
                    Some(SerialLine::Mismatch(error)) => {
                        bail!(
                            "the guest's self-check failed ({}): {error}",
                            self.path.display()
                        )
                    }
                    _ => {}
                }
            }
        }
        Ok(self.marks)
    }

    /// Waits until the log holds at least `marks` pass lines, each pass taking at most
    /// `pass_timeout`.
    fn wait_for_marks(&mut self, marks: u64, pass_timeout: Duration) -> Result<()> {
        while self.marks()? < marks {
            self.next_mark(pass_timeout)?;
        }
        Ok(())
    }

    /// Waits at most `timeout` for the next mark; returns the mark count and when it was
    /// seen.
    fn next_mark(&mut self, timeout: Duration) -> Result<(u64, Instant)> {
        let start = Instant::now();
        let before = self.marks()?;
        loop {
            thread::sleep(SERIAL_POLL);
            let marks = self.marks()?;
            if marks > before {
                return Ok((marks, Instant::now()));
            }
            if start.elapsed() >= timeout {
                bail!(
                    "the guest wrote no pass line to {} in {timeout:?} ({before} so far)",
                    self.path.display()
                );
            }
        }
    }

    /// Passes per second, timed from one mark to the first mark at least `window` later.
    fn pass_rate(&mut self, window: Duration, pass_timeout: Duration) -> Result<f64> {
        let (first, start) = self.next_mark(pass_timeout)?;
        loop {
            let (marks, seen) = self.next_mark(pass_timeout)?;
            let elapsed = seen - start;
            if elapsed >= window {
                return Ok((marks - first) as f64 / elapsed.as_secs_f64());
            }
        }
    }
}

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Completed,
    Failed(String),
    /// Not completed within the deadline and cancelled; whether the guest still ran on
    /// the source afterwards.
    TimedOut {
        source_running: bool,
    },
}

/// One migration's figures.
pub(crate) struct Run {
    target: Rate,
    /// Bytes per second the guest dirtied before the migration, measured (0 when idle).
    achieved: f64,
    /// TSC ticks per batch the guest was paced at (0: unpaced).
    pace: u32,
    channels: u32,
    auto_converge: bool,
    pub(crate) migration: Migration,
}

/// What polling the source's `query-migrate` saw.
pub(crate) struct Migration {
    pub(crate) outcome: Outcome,
    /// The last reply.
    reply: Value,
    /// The highest `cpu-throttle-percentage`.
    max_throttle: u64,
    /// The last non-zero `ram.dirty-pages-rate` (QEMU zeroes it at completion).
    dirty_pages_rate: Option<u64>,
}

/// Migrates a guest dirtying at `rate` from one QEMU to another.
pub(crate) fn migrate(args: &LiveQemuArgs, rate: Rate, tsc_hz: u64, channels: u32) -> Result<Run> {
    let image = image(args, rate, tsc_hz);
    let parameters = image.parameters()?;
    let sector = image.build()?;
    let workdir = work_directory()?;
    let mut pair = Pair::boot(&workdir, args.memory, &sector)?;
    pair.source.serial.wait_for_marks(1, PASS_TIMEOUT)?;
    let achieved = match rate {
        Rate::Idle => {
            thread::sleep(WARM_UP);
            0.0
        }
        Rate::Paced(target) => pair.source.dirty_rate(
            &parameters,
            WARM_UP,
            pass_timeout(&parameters, target as f64),
        )?,
        Rate::Unpaced => pair.source.dirty_rate(&parameters, WARM_UP, PASS_TIMEOUT)?,
    };

    let settings = json!({
        "multifd-channels": channels,
        "downtime-limit": args.downtime_limit_ms,
        "max-bandwidth": MAX_BANDWIDTH,
    });
    let capabilities = [("multifd", true), ("auto-converge", args.auto_converge)];
    for guest in [&mut pair.source, &mut pair.destination] {
        guest.qemu.configure_migration(&capabilities, &settings)?;
    }
    let port = pair.destination.qemu.listen_for_migration()?;
    pair.source.qemu.execute(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
    )?;
    let migration = pair.wait(Duration::from_secs(args.timeout))?;
    if migration.outcome == Outcome::Completed {
        pair.check_destination(&parameters, achieved)?;
    }
    Ok(Run {
        target: rate,
        achieved,
        pace: parameters.pace,
        channels,
        auto_converge: args.auto_converge,
        migration,
    })
}

/// The source and destination guests; dropping it kills both.
struct Pair {
    source: Guest,
    destination: Guest,
}

impl Pair {
    fn boot(workdir: &TempDir, memory: u64, sector: &[u8]) -> Result<Self> {
        Ok(Self {
            source: Guest::boot("source", workdir.path(), memory, sector, false)?,
            destination: Guest::boot("destination", workdir.path(), memory, sector, true)?,
        })
    }

    /// Polls the source until the migration completes or fails, or cancels it after
    /// `timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<Migration> {
        let start = Instant::now();
        let mut max_throttle = 0;
        let mut dirty_pages_rate = None;
        loop {
            let (status, reply) = self.source.qemu.migration_status()?;
            if let Some(throttle) = reply["cpu-throttle-percentage"].as_u64() {
                max_throttle = max_throttle.max(throttle);
            }
            if let Some(rate) = reply
                .pointer("/ram/dirty-pages-rate")
                .and_then(Value::as_u64)
                .filter(|&rate| rate > 0)
            {
                dirty_pages_rate = Some(rate);
            }
            let outcome = match status.as_str() {
                "completed" => Outcome::Completed,
                "failed" => Outcome::Failed(
                    reply["error-desc"]
                        .as_str()
                        .unwrap_or("no error-desc")
                        .to_owned(),
                ),
                _ if start.elapsed() >= timeout => {
                    self.cancel()?;
                    Outcome::TimedOut {
                        source_running: self.source.running()?,
                    }
                }
                _ => {
                    thread::sleep(MIGRATE_POLL);
                    continue;
                }
            };
            return Ok(Migration {
                outcome,
                reply,
                max_throttle,
                dirty_pages_rate,
            });
        }
    }

    /// Cancels the migration and waits until the source says it is over.
    fn cancel(&mut self) -> Result<()> {
        self.source.qemu.execute("migrate_cancel", None)?;
        let start = Instant::now();
        loop {
            let (status, _) = self.source.qemu.migration_status()?;
            if matches!(status.as_str(), "cancelled" | "failed" | "completed") {
                return Ok(());
            }
            ensure!(
                start.elapsed() < SETTLE_TIMEOUT,
                "migration still {status:?} {SETTLE_TIMEOUT:?} after migrate_cancel"
            );
            thread::sleep(MIGRATE_POLL);
        }
    }

    /// Checks that the destination loaded everything and its guest runs, and (unless it
    /// is idle, halted) writes a new pass line at about the `achieved` rate, its checks
    /// passing.
    fn check_destination(&mut self, parameters: &GuestParameters, achieved: f64) -> Result<()> {
        let start = Instant::now();
        loop {
            let (status, reply) = self.destination.qemu.migration_status()?;
            match status.as_str() {
                "completed" => break,
                "failed" | "cancelled" => {
                    bail!("the destination's migration {status}: {reply}")
                }
                _ if start.elapsed() >= SETTLE_TIMEOUT => bail!(
                    "the destination is still {status:?} {SETTLE_TIMEOUT:?} after the source completed"
                ),
                _ => thread::sleep(MIGRATE_POLL),
            }
        }
        ensure!(
            self.destination.running()?,
            "the guest does not run on the destination after the migration"
        );
        if achieved > 0.0 {
            // The destination's log is new: any pass line was written after the migration.
            self.destination
                .serial
                .wait_for_marks(1, pass_timeout(parameters, achieved))
                .context("the destination's guest made no progress after the migration")?;
        }
        Ok(())
    }
}

impl Run {
    pub(crate) fn u64_at(&self, pointer: &str) -> Option<u64> {
        self.migration
            .reply
            .pointer(pointer)
            .and_then(Value::as_u64)
    }

    pub(crate) fn status(&self) -> String {
        match &self.migration.outcome {
            Outcome::Completed => "completed".to_owned(),
            Outcome::Failed(error) => format!("failed: {error}"),
            Outcome::TimedOut { source_running } => format!(
                "cancelled at the timeout; guest {} on the source",
                if *source_running { "runs" } else { "STOPPED" }
            ),
        }
    }

    /// The last `ram.dirty-pages-rate` in bytes per second.
    fn qemu_dirty_rate(&self) -> Option<f64> {
        self.migration
            .dirty_pages_rate
            .map(|pages| pages as f64 * PAGE_SIZE as f64)
    }

    /// `ram.mbps` (megabits per second) in bytes per second.
    fn bandwidth(&self) -> Option<f64> {
        self.migration
            .reply
            .pointer("/ram/mbps")
            .and_then(Value::as_f64)
            .map(|mbps| mbps * 1e6 / 8.0)
    }

    /// One line for progress on stderr.
    fn summary(&self) -> String {
        format!(
            "{} ({} channels{}): {}",
            self.target,
            self.channels,
            if self.auto_converge {
                ", auto-converge"
            } else {
                ""
            },
            self.status()
        )
    }

    fn json(&self) -> Value {
        json!({
            "target": self.target.to_string(),
            "target_bytes_per_second": match self.target {
                Rate::Idle => Some(0),
                Rate::Paced(rate) => Some(rate),
                Rate::Unpaced => None,
            },
            "achieved_bytes_per_second": self.achieved,
            "pace_ticks": self.pace,
            "channels": self.channels,
            "auto_converge": self.auto_converge,
            "status": match self.migration.outcome {
                Outcome::Completed => "completed",
                Outcome::Failed(_) => "failed",
                Outcome::TimedOut { .. } => "timeout",
            },
            "error": match &self.migration.outcome {
                Outcome::Failed(error) => Some(error.as_str()),
                _ => None,
            },
            "source_running_after_cancel": match self.migration.outcome {
                Outcome::TimedOut { source_running } => Some(source_running),
                _ => None,
            },
            "total_ms": self.u64_at("/total-time"),
            "downtime_ms": self.u64_at("/downtime"),
            "setup_ms": self.u64_at("/setup-time"),
            "rounds": self.u64_at("/ram/dirty-sync-count"),
            "transferred_bytes": self.u64_at("/ram/transferred"),
            "ram_mbps": self.migration.reply.pointer("/ram/mbps").and_then(Value::as_f64),
            "dirty_pages_rate": self.migration.dirty_pages_rate,
            "max_throttle_percent": self.migration.max_throttle,
        })
    }
}

fn print_table(runs: &[Run]) {
    println!(
        "{:>8} {:>8} {:>10} {:>3} {:>3} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>8}  status",
        "target",
        "achieved",
        "pace",
        "ch",
        "ac",
        "total s",
        "down ms",
        "rounds",
        "GiB",
        "MiB/s",
        "dirty",
        "throttle"
    );
    let number = |value: Option<f64>, precision: usize| {
        value.map_or_else(|| "-".to_owned(), |value| format!("{value:.precision$}"))
    };
    for run in runs {
        let target = match run.target {
            Rate::Paced(rate) => format!("{:.0}", rate as f64 / MIB),
            Rate::Idle => "0".to_owned(),
            Rate::Unpaced => "unpaced".to_owned(),
        };
        println!(
            "{target:>8} {:>8} {:>10} {:>3} {:>3} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>7}%  {}",
            number(Some(run.achieved / MIB), 0),
            run.pace,
            run.channels,
            if run.auto_converge { "on" } else { "off" },
            number(run.u64_at("/total-time").map(|ms| ms as f64 / 1e3), 2),
            number(run.u64_at("/downtime").map(|ms| ms as f64), 0),
            number(run.u64_at("/ram/dirty-sync-count").map(|n| n as f64), 0),
            number(
                run.u64_at("/ram/transferred")
                    .map(|bytes| bytes as f64 / GIB),
                2
            ),
            number(run.bandwidth().map(|rate| rate / MIB), 0),
            number(run.qemu_dirty_rate().map(|rate| rate / MIB), 0),
            run.migration.max_throttle,
            run.status()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("0"), Ok(Rate::Idle));
        assert_eq!(parse_rate("100M"), Ok(Rate::Paced(100 << 20)));
        assert_eq!(parse_rate("unpaced"), Ok(Rate::Unpaced));
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn slow_passes_get_longer_timeouts() {
        let parameters = GuestImage::new(2 << 30).parameters().expect("parameters");
        assert_eq!(pass_timeout(&parameters, 100.0 * MIB), PASS_TIMEOUT);
        let slow = pass_timeout(&parameters, 10.0 * MIB).as_secs_f64();
        assert!((409.0..410.0).contains(&slow), "{slow}");
        assert_eq!(pass_timeout(&parameters, 0.0), Duration::MAX);
    }

    #[test]
    #[ignore = "boots the guest in QEMU with KVM; run with --ignored"]
    fn guest_boots_and_makes_progress() -> Result<()> {
        if qemu_version()?.is_none() {
            eprintln!("{QEMU} is not installed; skipping");
            return Ok(());
        }
        let image = GuestImage::new(64 << 20);
        let parameters = image.parameters()?;
        let workdir = work_directory()?;
        let mut guest = Guest::boot("test", workdir.path(), 64 << 20, &image.build()?, false)?;
        guest.serial.wait_for_marks(3, PASS_TIMEOUT)?;
        assert!(guest.running()?);
        assert!(guest.dirty_rate(&parameters, WARM_UP, PASS_TIMEOUT)? > 0.0);
        Ok(())
    }
}
