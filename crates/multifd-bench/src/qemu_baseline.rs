//! Baseline: QEMU's own multifd live migration of a memory image.
//!
//! Two `qemu-system-x86_64` processes run on this host. Both start paused (`-S`),
//! with no devices (`-nodefaults`), on the `pc` machine, with `-accel kvm -accel tcg`
//! (KVM if it works, else TCG; the guest never executes, so this only matters for
//! how dirty pages are tracked). Their guest RAM is one memory backend, `mem`:
//!
//! * the source maps the caller's image as guest RAM through a `memory-backend-file`
//!   with `share=off,readonly=on`: QEMU opens the file read-only and maps it
//!   privately, so it reads the image's pages straight from the page cache and cannot
//!   change the file. No copy is made; the image is read once beforehand (untimed) so
//!   that its pages are cached;
//! * the destination gets fresh anonymous memory of the same size
//!   (`memory-backend-ram`) and waits with `-incoming defer`.
//!
//! Both are driven over QMP (JSON lines on a Unix socket): the `multifd` capability is
//! turned on and `multifd-channels`, `multifd-compression` with its level and a
//! `max-bandwidth` of 1 TiB/s (QEMU throttles to 128 MiB/s by default) are set on both
//! sides, then read back with `query-migrate-parameters`. The compression level also
//! goes on both command lines as `-global migration.multifd-<algorithm>-level=<level>`:
//! QEMU 7.2 accepts it over QMP but keeps the old value. The destination listens with
//! `migrate-incoming` on `tcp:127.0.0.1:0`, and its `query-migrate` tells the port it
//! was given. The source then gets `migrate` and is polled with `query-migrate` every
//! 20 ms until `completed`, then the destination is polled until it has loaded
//! everything too. The guest is paused, so no page is dirtied again and the default
//! `downtime-limit` lets the migration finish after one pass over RAM.
//!
//! What is measured: [`QemuRun::seconds`] is our wall clock from sending `migrate` to
//! both sides reporting `completed`; [`QemuRun::total_time_ms`] and
//! [`QemuRun::transferred_bytes`] are the source's `total-time` and `ram.transferred`
//! (QEMU 7.2 counts multifd pages there before compression, so with compression it is
//! not what went over the socket); [`QemuRun::cpu_seconds`] is the CPU time both
//! processes used from `migrate` to completion. With compression, the source connects
//! through a byte-counting relay in this process ([`Relay`]) instead of straight to the
//! destination, and [`QemuRun::wire_bytes`] is what it forwarded from the source: the
//! compressed size QEMU does not report. (The relay only copies the compressed stream,
//! a small load beside compressing it.)
//!
//! Both processes are killed and the temporary directory (sockets, logs) removed when
//! [`run`] returns, on success or error. Startup, each QMP reply and the migration have
//! time limits (the last one grows with the guest's size), so it never hangs.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use multifd::Side;
use multifd_cli::cpu_time::process_cpu_seconds;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::qemu_process::{
    image_backend, memory_only_guest, qemu_version, u64_field, work_directory, Qemu, POLL_INTERVAL,
};

/// Guest RAM sizes must be a multiple of this (2 MiB).
const SIZE_ALIGNMENT: u64 = 2 << 20;
/// Bandwidth limit set on both sides, in bytes per second: 1 TiB/s, i.e. none (QEMU's
/// default is 128 MiB/s).
pub const MAX_BANDWIDTH: u64 = 1 << 40;
/// How long the migration may take, from `migrate` until both sides are done: this
/// much, plus [`MIGRATION_TIMEOUT_PER_GIB`] for each GiB of guest RAM (zlib level 1
/// on two channels moves about 0.05 GiB/s on a two-core host).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How much longer the migration may take for each GiB of guest RAM.
const MIGRATION_TIMEOUT_PER_GIB: Duration = Duration::from_secs(60);

/// The result of one QEMU multifd migration.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuRun {
    /// Wall-clock seconds from the `migrate` command until both sides reported
    /// `completed`.
    pub seconds: f64,
    /// QEMU's own `total-time` of the migration on the source, in milliseconds.
    pub total_time_ms: u64,
    /// QEMU's `ram.transferred` on the source: bytes sent for guest RAM, zero pages
    /// being a few bytes each. QEMU 7.2 counts multifd pages before compression.
    pub transferred_bytes: u64,
    /// Bytes the source sent on all its connections, counted by the relay; `None`
    /// without compression, where no relay is used (`transferred_bytes` is then exact
    /// up to the main channel's framing).
    pub wire_bytes: Option<u64>,
    /// CPU seconds of both QEMU processes from `migrate` until both completed.
    pub cpu_seconds: f64,
    /// The first line of `qemu-system-x86_64 --version`.
    pub version: String,
}

/// What to migrate and how.
#[derive(Debug, Clone, Copy)]
pub struct QemuOptions<'a> {
    /// The memory image: a file whose size, a multiple of 2 MiB, is the guest's RAM
    /// size. It is only read.
    pub image: &'a Path,
    /// The number of multifd channels (QEMU accepts 1 to 255).
    pub channels: u32,
    /// Multifd compression as `(algorithm, level)`, the algorithm being `"zlib"`
    /// (levels 0 to 9) or `"zstd"` (levels 0 to 20); `None` for no compression.
    pub compression: Option<(&'a str, u32)>,
    /// Whether the destination's memory is allocated before the migration starts
    /// (`prealloc=on`), so page faults on fresh memory are not part of the measurement.
    pub prealloc_destination: bool,
}

/// Migrates the image from one QEMU to another on this host with multifd and returns
/// the timings.
///
/// Returns `Ok(None)` when `qemu-system-x86_64` is not installed.
///
/// # Errors
///
/// Fails when the image cannot be read or its size is not a multiple of 2 MiB, when
/// the options are invalid, when QEMU fails to start or rejects a command, when the
/// migration fails (with QEMU's `error-desc` and the tail of both processes' stderr),
/// or when a phase times out.
pub fn run(options: &QemuOptions) -> Result<Option<QemuRun>> {
    let Some(version) = qemu_version()? else {
        return Ok(None);
    };
    let settings = settings(options)?;
    let size = image_size(options.image)?;
    warm_page_cache(options.image)?;
    let destination = if options.prealloc_destination {
        DestinationRam::Preallocated
    } else {
        DestinationRam::Fresh
    };
    let mut pair = Pair::launch(options.image, size, &settings.arguments, &destination)?;
    let measurement = pair.migrate(&settings.parameters, options.compression.is_some())?;
    Ok(Some(QemuRun {
        seconds: measurement.seconds,
        total_time_ms: measurement.total_time_ms,
        transferred_bytes: measurement.transferred_bytes,
        wire_bytes: measurement.wire_bytes,
        cpu_seconds: measurement.cpu_seconds,
        version,
    }))
}

/// How both QEMUs are set up for one migration, checked.
struct Settings {
    /// `migrate-set-parameters` arguments, set on both sides over QMP.
    parameters: Value,
    /// Extra command-line arguments for both sides.
    arguments: Vec<String>,
}

/// The settings for these options.
///
/// The compression level also goes on the command line as
/// `-global migration.multifd-<algorithm>-level=<level>`, because QEMU 7.2 answers
/// `migrate-set-parameters` with success but keeps the old level.
fn settings(options: &QemuOptions) -> Result<Settings> {
    ensure!(
        (1..=255).contains(&options.channels),
        "multifd channels must be 1 to 255, not {}",
        options.channels
    );
    let mut parameters = json!({
        "multifd-channels": options.channels,
        "max-bandwidth": MAX_BANDWIDTH,
        "multifd-compression": "none",
    });
    let mut arguments = Vec::new();
    if let Some((algorithm, level)) = options.compression {
        let max_level = match algorithm {
            "zlib" => 9,
            "zstd" => 20,
            other => bail!("unknown multifd compression {other:?}: expected \"zlib\" or \"zstd\""),
        };
        ensure!(
            level <= max_level,
            "{algorithm} level must be 0 to {max_level}, not {level}"
        );
        let level_parameter = format!("multifd-{algorithm}-level");
        arguments.push("-global".to_owned());
        arguments.push(format!("migration.{level_parameter}={level}"));
        parameters["multifd-compression"] = json!(algorithm);
        parameters[level_parameter] = json!(level);
    }
    Ok(Settings {
        parameters,
        arguments,
    })
}

/// The image's size, checked to be a non-zero multiple of 2 MiB.
fn image_size(image: &Path) -> Result<u64> {
    let metadata = fs::metadata(image).with_context(|| format!("reading {}", image.display()))?;
    ensure!(metadata.is_file(), "{} is not a file", image.display());
    let size = metadata.len();
    ensure!(
        size > 0 && size % SIZE_ALIGNMENT == 0,
        "{} is {size} bytes, not a non-zero multiple of 2 MiB",
        image.display()
    );
    Ok(size)
}

/// Reads the whole image once so that the migration reads it from memory, not disk.
fn warm_page_cache(image: &Path) -> Result<()> {
    let mut file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut buffer = vec![0; 1 << 20];
    while file
        .read(&mut buffer)
        .with_context(|| format!("reading {}", image.display()))?
        > 0
    {}
    Ok(())
}

/// What one migration measured.
struct Measurement {
    seconds: f64,
    total_time_ms: u64,
    transferred_bytes: u64,
    wire_bytes: Option<u64>,
    cpu_seconds: f64,
}

/// Where the destination QEMU's guest RAM lives.
enum DestinationRam {
    /// Fresh anonymous memory, faulted in as pages arrive.
    Fresh,
    /// Anonymous memory allocated at startup (`prealloc=on`).
    Preallocated,
    /// A shared file, so the result can be compared with the image (tests only).
    #[cfg(test)]
    File(std::path::PathBuf),
}

/// The source and destination QEMU. Dropping it kills both, then removes the
/// temporary directory (fields drop in declaration order).
struct Pair {
    source: Qemu,
    destination: Qemu,
    /// The time limit of the migration.
    timeout: Duration,
    /// Held only to be removed on drop, after both QEMUs are gone.
    _workdir: TempDir,
}

impl Pair {
    /// Starts both QEMUs, with `arguments` added: the source with `image` as its RAM,
    /// the destination with fresh RAM, which is anonymous, or a new `share=on` file at
    /// `destination_ram` when given (so that it can be compared).
    fn launch(
        image: &Path,
        size: u64,
        arguments: &[String],
        destination_ram: &DestinationRam,
    ) -> Result<Self> {
        let workdir = work_directory()?;
        let mib = size >> 20;
        let common = |backend: String| -> Vec<String> {
            let mut common = memory_only_guest(mib, &backend);
            common.extend_from_slice(arguments);
            common
        };

        let source_backend = image_backend(image, mib)?;
        let source = Qemu::launch("source", &common(source_backend), workdir.path())?;

        let destination_backend = match destination_ram {
            #[cfg(test)]
            DestinationRam::File(path) => {
                let path = path.as_path();
                let file =
                    File::create(path).with_context(|| format!("creating {}", path.display()))?;
                file.set_len(size)
                    .with_context(|| format!("sizing {}", path.display()))?;
                format!(
                    "memory-backend-file,id=mem,size={mib}M,mem-path={},share=on",
                    crate::qemu_process::option_path(path)?
                )
            }
            DestinationRam::Fresh => format!("memory-backend-ram,id=mem,size={mib}M"),
            DestinationRam::Preallocated => {
                format!("memory-backend-ram,id=mem,size={mib}M,prealloc=on")
            }
        };
        let mut destination_args = common(destination_backend);
        destination_args.extend(["-incoming".to_owned(), "defer".to_owned()]);
        let destination = Qemu::launch("destination", &destination_args, workdir.path())?;

        let gib = u32::try_from(size.div_ceil(1 << 30)).unwrap_or(u32::MAX);
        Ok(Self {
            source,
            destination,
            timeout: MIGRATION_TIMEOUT
                .saturating_add(MIGRATION_TIMEOUT_PER_GIB.saturating_mul(gib)),
            _workdir: workdir,
        })
    }

    /// CPU seconds both QEMUs have used so far.
    fn cpu_seconds(&self) -> Result<f64> {
        Ok(process_cpu_seconds(self.source.pid())? + process_cpu_seconds(self.destination.pid())?)
    }

    /// Runs one migration with these `migrate-set-parameters` arguments; with
    /// `count_wire_bytes`, through a [`Relay`] that counts the bytes the source sends.
    fn migrate(&mut self, parameters: &Value, count_wire_bytes: bool) -> Result<Measurement> {
        for side in [&mut self.source, &mut self.destination] {
            side.configure_migration(&[("multifd", true)], parameters)?;
        }
        let destination_port = self.destination.listen_for_migration()?;
        let relay = if count_wire_bytes {
            Some(Relay::start(destination_port)?)
        } else {
            None
        };
        let port = relay.as_ref().map_or(destination_port, |relay| relay.port);
        let uri = format!("tcp:127.0.0.1:{port}");

        let cpu_before = self.cpu_seconds()?;
        let start = Instant::now();
        self.source
            .execute("migrate", Some(json!({ "uri": uri })))?;
        let source_done = self.wait_for_completion(Side::Source, start)?;
        self.wait_for_completion(Side::Destination, start)?;
        let seconds = start.elapsed().as_secs_f64();
        let cpu_seconds = self.cpu_seconds()? - cpu_before;

        Ok(Measurement {
            seconds,
            total_time_ms: u64_field(&source_done, "/total-time")?,
            transferred_bytes: u64_field(&source_done, "/ram/transferred")?,
            wire_bytes: relay.map(Relay::finish),
            cpu_seconds,
        })
    }

    /// Polls one side's `query-migrate` until `completed` and returns that reply.
    fn wait_for_completion(&mut self, side: Side, start: Instant) -> Result<Value> {
        loop {
            let qemu = match side {
                Side::Source => &mut self.source,
                Side::Destination => &mut self.destination,
            };
            let (status, reply) = qemu.migration_status()?;
            match status.as_str() {
                "completed" => return Ok(reply),
                "failed" | "cancelled" => {
                    let description = reply["error-desc"].as_str().unwrap_or("no error-desc");
                    let error = anyhow!("migration {status} on the {side}: {description}");
                    return Err(self.explain(&error));
                }
                _ => {}
            }
            if start.elapsed() >= self.timeout {
                let error = anyhow!(
                    "migration not completed on the {side} after {:?} \
                     (status {status:?}): {reply}",
                    self.timeout
                );
                return Err(self.explain(&error));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `error` followed by both QEMUs' state and stderr.
    fn explain(&mut self, error: &anyhow::Error) -> anyhow::Error {
        let error = self.source.explain(error);
        self.destination.explain(&error)
    }
}

/// A TCP relay on loopback between the source and the destination QEMU that counts the
/// bytes the source sends on every connection (the main channel and each multifd one).
struct Relay {
    port: u16,
    counted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Every relayed socket, so that `finish` can end connections QEMU left open.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<thread::JoinHandle<Vec<thread::JoinHandle<()>>>>,
}

/// How often the relay's acceptor checks whether it should stop.
const RELAY_POLL: Duration = Duration::from_millis(5);
/// How long `Relay::finish` lets connections close by themselves: both QEMUs have
/// completed by then, so everything was relayed and they are only tearing down.
const RELAY_DRAIN: Duration = Duration::from_secs(5);
/// Buffer of each relay direction: large enough that a compressed packet takes a few
/// system calls.
const RELAY_BUFFER: usize = 256 * 1024;

impl Relay {
    /// Listens on a fresh loopback port and relays each connection to `destination_port`.
    fn start(destination_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the relay")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let counted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (counted, stop) = (Arc::clone(&counted), Arc::clone(&stop));
            let sockets = Arc::clone(&sockets);
            thread::spawn(move || {
                let mut forwarders = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((source, _)) => {
                            let Ok(destination) =
                                TcpStream::connect(("127.0.0.1", destination_port))
                            else {
                                // The source sees its connection close and reports it.
                                continue;
                            };
                            if let (Ok(mut sockets), Ok(source), Ok(destination)) =
                                (sockets.lock(), source.try_clone(), destination.try_clone())
                            {
                                sockets.extend([source, destination]);
                            }
                            forwarders.extend(Self::forward(source, destination, &counted));
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(RELAY_POLL);
                        }
                        Err(_) => thread::sleep(RELAY_POLL),
                    }
                }
                forwarders
            })
        };
        Ok(Self {
            port,
            counted,
            stop,
            sockets,
            acceptor: Some(acceptor),
        })
    }

    /// Copies both directions of one connection; counts what the source sends.
    fn forward(
        source: TcpStream,
        destination: TcpStream,
        counted: &Arc<AtomicU64>,
    ) -> Vec<thread::JoinHandle<()>> {
        let (Ok(source_reader), Ok(destination_writer)) =
            (source.try_clone(), destination.try_clone())
        else {
            return Vec::new();
        };
        let counted = Arc::clone(counted);
        let forward = thread::spawn(move || {
            copy_until_eof(source_reader, destination_writer, Some(&counted));
        });
        let backward = thread::spawn(move || copy_until_eof(destination, source, None));
        vec![forward, backward]
    }

    /// Stops accepting, lets the relayed connections close (ending those still open
    /// after [`RELAY_DRAIN`]) and returns the count.
    fn finish(mut self) -> u64 {
        let forwarders = self.stop_accepting();
        let deadline = Instant::now() + RELAY_DRAIN;
        while Instant::now() < deadline && !forwarders.iter().all(|f| f.is_finished()) {
            thread::sleep(RELAY_POLL);
        }
        self.close(forwarders);
        self.counted.load(Ordering::Relaxed)
    }

    /// Stops the acceptor thread and returns the forwarders it started.
    fn stop_accepting(&mut self) -> Vec<thread::JoinHandle<()>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.acceptor.take() {
            Some(acceptor) => acceptor.join().unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Ends every relayed connection and waits for `forwarders`.
    fn close(&self, forwarders: Vec<thread::JoinHandle<()>>) {
        if let Ok(mut sockets) = self.sockets.lock() {
            for socket in sockets.drain(..) {
                // Best effort: most are closed already.
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
        for forwarder in forwarders {
            // A forwarder that panicked only lost its part of the count.
            let _ = forwarder.join();
        }
    }
}

/// A relay dropped without [`Relay::finish`] (the migration failed) stops its threads too.
impl Drop for Relay {
    fn drop(&mut self) {
        let forwarders = self.stop_accepting();
        self.close(forwarders);
    }
}

/// Copies `from` to `to` until EOF or an error, then shuts `to` for writing (and
/// `from` for reading, so the opposite direction ends too); adds to `counted`.
fn copy_until_eof(mut from: TcpStream, mut to: TcpStream, counted: Option<&AtomicU64>) {
    let mut buffer = vec![0u8; RELAY_BUFFER];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(length) => {
                if to.write_all(&buffer[..length]).is_err() {
                    break;
                }
                if let Some(counted) = counted {
                    counted.fetch_add(length as u64, Ordering::Relaxed);
                }
            }
        }
    }
    // Best effort: either side may be gone already.
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = from.shutdown(std::net::Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_process::QEMU;

    fn options(channels: u32, compression: Option<(&str, u32)>) -> QemuOptions<'_> {
        QemuOptions {
            image: Path::new("unused"),
            channels,
            compression,
            prealloc_destination: false,
        }
    }

    #[test]
    fn settings_without_compression() -> Result<()> {
        let settings = settings(&options(4, None))?;
        assert_eq!(settings.parameters["multifd-channels"], 4);
        assert_eq!(settings.parameters["multifd-compression"], "none");
        assert_eq!(settings.parameters["max-bandwidth"], MAX_BANDWIDTH);
        assert!(settings.arguments.is_empty());
        Ok(())
    }

    #[test]
    fn settings_with_compression() -> Result<()> {
        let zstd = settings(&options(2, Some(("zstd", 3))))?;
        assert_eq!(zstd.parameters["multifd-compression"], "zstd");
        assert_eq!(zstd.parameters["multifd-zstd-level"], 3);
        assert_eq!(
            zstd.arguments,
            ["-global", "migration.multifd-zstd-level=3"]
        );
        let zlib = settings(&options(2, Some(("zlib", 9))))?;
        assert_eq!(zlib.parameters["multifd-zlib-level"], 9);
        Ok(())
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(settings(&options(0, None)).is_err());
        assert!(settings(&options(256, None)).is_err());
        assert!(settings(&options(2, Some(("lz4", 1)))).is_err());
        assert!(settings(&options(2, Some(("zlib", 10)))).is_err());
        assert!(settings(&options(2, Some(("zstd", 21)))).is_err());
    }

    #[test]
    fn a_dropped_relay_ends_its_connections() -> Result<()> {
        let destination = TcpListener::bind("127.0.0.1:0")?;
        let relay = Relay::start(destination.local_addr()?.port())?;
        let mut source = TcpStream::connect(("127.0.0.1", relay.port))?;
        source.write_all(b"page")?;
        let (mut received, _) = destination.accept()?;
        let mut buffer = [0u8; 4];
        received.read_exact(&mut buffer)?;
        assert_eq!(&buffer, b"page");
        drop(relay);
        for end in [&mut source, &mut received] {
            end.set_read_timeout(Some(Duration::from_secs(5)))?;
            assert_eq!(end.read(&mut buffer)?, 0, "the connection is still open");
        }
        Ok(())
    }

    /// Writes `pages` 4 KiB pages cycling through zero, random and text-like content.
    fn write_mixed_image(path: &Path, pages: usize) -> Result<()> {
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let words: [&[u8]; 6] = [
            b"page ", b"memory ", b"the ", b"guest ", b"dirty ", b"log.\n",
        ];
        let mut out = io::BufWriter::new(File::create(path)?);
        let mut page = vec![0u8; 4096];
        for index in 0..pages {
            match index % 4 {
                0 => page.fill(0),
                1 => page
                    .chunks_exact_mut(8)
                    .for_each(|chunk| chunk.copy_from_slice(&next().to_le_bytes())),
                _ => {
                    let mut text = Vec::with_capacity(4200);
                    while text.len() < page.len() {
                        text.extend_from_slice(words[(next() % 6) as usize]);
                    }
                    page.copy_from_slice(&text[..4096]);
                }
            }
            out.write_all(&page)?;
        }
        out.flush()?;
        Ok(())
    }

    /// Whether two files have the same bytes.
    fn same_contents(left: &Path, right: &Path) -> Result<bool> {
        let mut left = File::open(left)?;
        let mut right = File::open(right)?;
        let mut left_chunk = vec![0; 1 << 20];
        let mut right_chunk = vec![0; 1 << 20];
        loop {
            let length = left.read(&mut left_chunk)?;
            if length == 0 {
                return Ok(right.read(&mut right_chunk)? == 0);
            }
            right.read_exact(&mut right_chunk[..length])?;
            if left_chunk[..length] != right_chunk[..length] {
                return Ok(false);
            }
        }
    }

    /// Migrates a 256 MiB mixed image into a file-backed destination, with `options`
    /// but that image, and checks that the destination's RAM equals the image and that
    /// the image is unchanged.
    fn check_destination_ram(options: QemuOptions) -> Result<()> {
        let workdir = work_directory()?;
        let image = workdir.path().join("image");
        let reference = workdir.path().join("reference");
        let destination_ram = workdir.path().join("destination.ram");
        write_mixed_image(&image, 256 << 8)?;
        fs::copy(&image, &reference)?;
        let settings = settings(&options)?;
        let size = image_size(&image)?;
        let mut pair = Pair::launch(
            &image,
            size,
            &settings.arguments,
            &DestinationRam::File(destination_ram.clone()),
        )?;
        let measurement = pair.migrate(&settings.parameters, options.compression.is_some())?;
        assert!(measurement.transferred_bytes > 0);
        assert!(same_contents(&reference, &destination_ram)?);
        drop(pair);
        assert!(
            same_contents(&reference, &image)?,
            "the source changed the image"
        );
        Ok(())
    }

    #[test]
    #[ignore = "starts QEMUs and writes 768 MiB; run with --ignored"]
    fn destination_ram_equals_image() -> Result<()> {
        if qemu_version()?.is_none() {
            eprintln!("{QEMU} is not installed; skipping");
            return Ok(());
        }
        check_destination_ram(options(4, None))?;
        check_destination_ram(options(2, Some(("zstd", 3))))
    }
}
