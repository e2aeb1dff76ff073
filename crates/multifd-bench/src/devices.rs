//! `multifd-bench devices`: the switchover time (from `SwitchoverStart` to the
//! destination's `Completed`, the downtime proxy) of device state moved three ways, with
//! and without a concurrent final RAM round:
//!
//! - (a) sequential: the devices saved one after another on one thread, through one
//!   dedicated channel, as a VMM without multifd device state serializes them;
//! - (b) shared: one save thread per device over the shared multifd channels;
//! - (c) dedicated: one save thread per device over the last half of the channels
//!   (the seeds' RFC design), RAM over the first half.
//!
//! Devices save from memory and load by copying into preallocated memory, so what is
//! measured is the transport, not a device; with `--device-rate` each device also produces
//! and consumes its state no faster than that, as real devices do (a VFIO device's state
//! comes out of and goes back into its firmware at a rate of its own), without using CPU
//! for it. Everything runs on this host over loopback.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use multifd::{
    DestinationConfig, DeviceError, DeviceId, GuestMemory, Listener, LoadDevice, LoadDevices,
    RamBlock, SaveDevice, Source, SourceConfig, StateWriter,
};
use multifd_cli::bench::{anonymous_block, median};
use multifd_cli::image::{self, parse_size};
use multifd_cli::GIB;
use serde_json::json;

const MIB: f64 = (1u64 << 20) as f64;

#[derive(clap::Args)]
pub struct DevicesArgs {
    /// Devices to move.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    devices: u32,
    /// State per device.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    device_size: u64,
    /// The concurrent final RAM round (0: only without RAM).
    #[arg(long, default_value = "1G", value_parser = parse_size_or_zero)]
    final_ram: u64,
    /// Bytes per second each device saves and loads at most (0: no limit), as a device's
    /// firmware paces its state; 512M is 512 MiB/s.
    #[arg(long, default_value = "0", value_parser = parse_size_or_zero)]
    device_rate: u64,
    /// Channel counts to measure, comma-separated; at least 2 each (one dedicated to device
    /// state).
    #[arg(long, value_delimiter = ',', default_values_t = [2u8, 4, 8])]
    channels: Vec<u8>,
    /// Runs per configuration; the median is reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// A size as [`parse_size`] reads it, or 0 for "none".
pub fn parse_size_or_zero(text: &str) -> Result<u64, String> {
    if text == "0" {
        Ok(0)
    } else {
        parse_size(text)
    }
}

/// Holds a device to `rate` bytes per second by sleeping (a device's own pace costs the
/// host no CPU).
struct Pacer {
    rate: u64,
    started: Option<Instant>,
    bytes: u64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            started: None,
            bytes: 0,
        }
    }

    /// Accounts for `bytes` more and sleeps until the rate allows them.
    fn pace(&mut self, bytes: usize) {
        if self.rate == 0 {
            return;
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        self.bytes += bytes as u64;
        let due = started + Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// How much a paced device saves between two checks of its pace.
const PACE_STEP: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sequential,
    Shared,
    Dedicated,
}

impl Mode {
    const ALL: [Self; 3] = [Self::Sequential, Self::Shared, Self::Dedicated];

    fn config(self, channels: u8) -> SourceConfig {
        let mut config = SourceConfig::default();
        config.channels = channels;
        match self {
            Self::Sequential => {
                config.device_channels = 1;
                config.sequential_device_save = true;
            }
            Self::Shared => {}
            Self::Dedicated => config.device_channels = channels / 2,
        }
        config
    }
}

/// Saves a device's state from memory.
struct MemorySave {
    state: Arc<Vec<u8>>,
    pacer: Pacer,
}

impl SaveDevice for MemorySave {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        for piece in self.state.chunks(PACE_STEP) {
            self.pacer.pace(piece.len());
            state.write_all(piece)?;
        }
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(b"config".to_vec())
    }
}

/// Loads a device's state by copying it into preallocated memory.
struct MemoryLoad {
    target: Arc<Mutex<Vec<u8>>>,
    position: usize,
    pacer: Pacer,
}

impl LoadDevice for MemoryLoad {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        self.pacer.pace(chunk.len());
        let mut target = self
            .target
            .lock()
            .map_err(|_| "the target buffer is poisoned")?;
        let end = self.position + chunk.len();
        let Some(slot) = target.get_mut(self.position..end) else {
            return Err(format!("state longer than the {} bytes expected", end).into());
        };
        slot.copy_from_slice(chunk);
        self.position = end;
        Ok(())
    }

    fn load_config(&mut self, _config: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// Memory shared by every run: device states, their targets, the RAM blocks.
struct Setup {
    states: Vec<Arc<Vec<u8>>>,
    targets: Vec<Arc<Mutex<Vec<u8>>>>,
    source_ram: RamBlock,
    destination_ram: RamBlock,
    device_rate: u64,
}

fn device_id(index: usize) -> DeviceId {
    DeviceId::new(format!("0000:00:{:02x}.0/vfio", index + 4), 0)
}

impl Setup {
    fn new(args: &DevicesArgs) -> Result<Self> {
        let size = usize::try_from(args.device_size)?;
        let states = (0..args.devices)
            .map(|index| {
                let mut state = vec![0u8; size];
                image::fill(&mut state, 100 + u64::from(index));
                Arc::new(state)
            })
            .collect();
        let targets = (0..args.devices)
            .map(|_| Arc::new(Mutex::new(vec![1u8; size])))
            .collect();
        let ram_size = args.final_ram.max(image::PAGE as u64);
        let mut mapping = memmap2::MmapMut::map_anon(usize::try_from(ram_size)?)?;
        image::fill(&mut mapping, 7);
        Ok(Self {
            states,
            targets,
            source_ram: RamBlock::from_mapping("pc.ram", mapping)?,
            destination_ram: anonymous_block("pc.ram", ram_size, true)?,
            device_rate: args.device_rate,
        })
    }

    /// One migration; returns the source's switchover-to-completed seconds.
    fn run(&self, mode: Mode, channels: u8, with_ram: bool) -> Result<f64> {
        let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?)?;
        let address = listener.address();
        let destination_memory = GuestMemory::new(vec![self.destination_ram.clone()])?;
        let loaders: LoadDevices = self
            .targets
            .iter()
            .enumerate()
            .map(|(index, target)| {
                let load = MemoryLoad {
                    target: Arc::clone(target),
                    position: 0,
                    pacer: Pacer::new(self.device_rate),
                };
                (device_id(index), Box::new(load) as Box<dyn LoadDevice>)
            })
            .collect();
        let mut config = DestinationConfig::default();
        config.memory_zeroed = true;
        let receiving = std::thread::spawn(move || {
            multifd::Destination::new(config).run_with_devices(
                &listener,
                |_| Ok(destination_memory),
                loaders,
            )
        });
        let savers = self
            .states
            .iter()
            .enumerate()
            .map(|(index, state)| {
                let save = MemorySave {
                    state: Arc::clone(state),
                    pacer: Pacer::new(self.device_rate),
                };
                (device_id(index), Box::new(save) as Box<dyn SaveDevice>)
            })
            .collect();
        let memory = GuestMemory::new(vec![self.source_ram.clone()])?;
        let mut source =
            Source::connect_with_devices(&address, &mode.config(channels), memory, savers)?;
        source.switchover()?;
        if with_ram {
            source.queue_block(0)?;
        }
        let stats = source.complete()?;
        receiving
            .join()
            .map_err(|_| anyhow::anyhow!("the destination thread panicked"))??;
        let expected = self.states.len() as u64 * (self.states[0].len() as u64 + 6);
        ensure!(
            stats.device_bytes == expected,
            "{} device bytes sent, expected {expected}",
            stats.device_bytes
        );
        stats
            .switchover_time
            .map(|time| time.as_secs_f64())
            .ok_or_else(|| anyhow::anyhow!("no switchover time measured"))
    }
}

struct Row {
    final_ram: u64,
    channels: u8,
    /// Median seconds per mode, in [`Mode::ALL`] order.
    seconds: [f64; 3],
}

pub fn run(args: &DevicesArgs) -> Result<()> {
    ensure!(
        args.channels.iter().all(|&channels| channels >= 2),
        "device benchmarks need at least 2 channels (one dedicated to device state)"
    );
    let setup = Setup::new(args)?;
    let rams: Vec<u64> = if args.final_ram > 0 {
        vec![0, args.final_ram]
    } else {
        vec![0]
    };
    // One unmeasured run: the first migration pays for cold page tables and sockets.
    setup.run(Mode::Shared, args.channels[0], false)?;
    let mut rows = Vec::new();
    for &final_ram in &rams {
        for &channels in &args.channels {
            let mut runs: [Vec<f64>; 3] = Default::default();
            for repeat in 0..args.repeat {
                // Rotate the order so no mode always runs first or last.
                for offset in 0..Mode::ALL.len() {
                    let index = (offset + repeat as usize) % Mode::ALL.len();
                    runs[index].push(setup.run(Mode::ALL[index], channels, final_ram > 0)?);
                }
            }
            rows.push(Row {
                final_ram,
                channels,
                seconds: runs.map(|mut values| median(&mut values, |&seconds| seconds)),
            });
        }
    }
    print(args, &rows);
    Ok(())
}

fn print(args: &DevicesArgs, rows: &[Row]) {
    if args.json {
        println!(
            "{}",
            json!({
                "devices": args.devices,
                "device_bytes": args.device_size,
                "device_rate": args.device_rate,
                "repeat": args.repeat,
                "cpus": std::thread::available_parallelism().map_or(1, usize::from),
                "runs": rows.iter().map(|row| json!({
                    "final_ram_bytes": row.final_ram,
                    "channels": row.channels,
                    "dedicated_channels": row.channels / 2,
                    "sequential_seconds": row.seconds[0],
                    "shared_seconds": row.seconds[1],
                    "dedicated_seconds": row.seconds[2],
                    "shared_ratio": row.seconds[1] / row.seconds[0],
                    "dedicated_ratio": row.seconds[2] / row.seconds[0],
                })).collect::<Vec<_>>(),
            })
        );
        return;
    }
    let rate = if args.device_rate == 0 {
        "devices unpaced".to_owned()
    } else {
        format!(
            "devices paced at {:.0} MiB/s",
            args.device_rate as f64 / MIB
        )
    };
    println!(
        "{} devices x {:.0} MiB of state, {rate}; switchover to completed (downtime proxy), median of {} runs",
        args.devices,
        args.device_size as f64 / MIB,
        args.repeat
    );
    println!(
        "{:>10} {:>8} {:>14} {:>10} {:>14} {:>8} {:>8}",
        "final RAM",
        "channels",
        "(a) sequential",
        "(b) shared",
        "(c) dedicated",
        "(b)/(a)",
        "(c)/(a)"
    );
    for row in rows {
        let ram = if row.final_ram == 0 {
            "none".to_owned()
        } else {
            format!("{:.2} GiB", row.final_ram as f64 / GIB)
        };
        println!(
            "{:>10} {:>8} {:>12.3} s {:>8.3} s {:>8.3} s K={} {:>8.2} {:>8.2}",
            ram,
            row.channels,
            row.seconds[0],
            row.seconds[1],
            row.seconds[2],
            row.channels / 2,
            row.seconds[1] / row.seconds[0],
            row.seconds[2] / row.seconds[0]
        );
    }
}
