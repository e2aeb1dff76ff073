//! Moving one KVM guest between processes: `multifd vm pingpong` and `multifd demo`.
//!
//! Every VM is a child process of this one: a `vm run` boots the guest, and each
//! migration goes to a fresh `vm incoming` on loopback TCP, asked over the control socket
//! of the process that holds the guest, which exits once it handed over. Each hop checks
//! the guest's own verdict (no error on any vCPU) and, after the last, that it made
//! progress where it runs now.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use multifd::Address;
use serde_json::{json, Value};

use super::child::ChildVm;
use super::{control, GuestArgs, MigrateSettings, PingpongArgs};
use crate::precopy;

/// How long a VM process may take to start (map memory, boot) and report, and the
/// guest its first pass at least.
const STARTUP: Duration = Duration::from_secs(120);
/// How long the guest dirties memory on the source before the first migration.
const WARM_UP: Duration = Duration::from_secs(2);
/// How long a source may take to exit after handing over, and a destination to report
/// its arrival after the source's `Completed`.
const SETTLE: Duration = Duration::from_secs(30);
/// How often a guest's status is polled while waiting for a pass.
const STATUS_POLL: Duration = Duration::from_millis(100);
/// How long the demo's guest runs on the destination before it is judged (and on until
/// it finished a pass there).
const DEMO_RUN_FOR: u64 = 3;

/// Whether this process can use KVM, or why not.
pub fn kvm_available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|error| format!("/dev/kvm is not available ({error})"))
}

/// What moving a guest did.
struct Moved {
    /// Each migration's summary ([`precopy::summary`], with the destination's downtime).
    summaries: Vec<Value>,
    /// Passes per vCPU when the guest arrived at its last destination, and at the end.
    arrival_passes: Value,
    final_passes: Value,
    /// How long the guest ran on its last destination until it was judged.
    final_seconds: f64,
    /// From the first migration's request to the end.
    total: Duration,
}

fn min_passes(passes: &Value) -> u64 {
    passes
        .as_array()
        .and_then(|passes| passes.iter().filter_map(Value::as_u64).min())
        .unwrap_or(0)
}

/// Fails on any guest error or vCPU failure in a status.
fn check_guest(status: &Value, place: &str) -> Result<()> {
    for key in ["errors", "vcpu_failures"] {
        if let Some(error) = status[key].as_array().and_then(|errors| errors.first()) {
            bail!(
                "the guest failed {place}: {}",
                error.as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

/// Polls the VM at `socket` until every vCPU did more than `passes` passes, at most
/// `bound`.
fn wait_for_pass(socket: &Path, passes: u64, place: &str, bound: Duration) -> Result<Value> {
    let start = Instant::now();
    loop {
        let status = control::status(socket)?;
        check_guest(&status, place)?;
        if min_passes(&status["passes"]) > passes {
            return Ok(status);
        }
        if start.elapsed() >= bound {
            bail!(
                "the guest made no pass {place} in {bound:?} (passes {})",
                status["passes"]
            );
        }
        thread::sleep(STATUS_POLL);
    }
}

/// Boots the guest in a `vm run` process, lets it dirty memory, then migrates it `count`
/// times, each to a fresh `vm incoming`. With `run_for`, the last destination runs the
/// guest that long and judges it itself; otherwise this waits for its next pass there.
fn move_guest(
    guest: &GuestArgs,
    settings: &MigrateSettings,
    count: u32,
    run_for: Option<u64>,
    json: bool,
) -> Result<Moved> {
    let directory = tempfile::tempdir().context("a directory for the control sockets")?;
    let socket = |index: u32| -> PathBuf { directory.path().join(format!("vm{index}.sock")) };
    let vm_args = |command: &str, index: u32, extra: &[String]| -> Vec<String> {
        let mut args = vec![
            command.to_owned(),
            "--json".to_owned(),
            "--control".to_owned(),
        ];
        args.push(socket(index).display().to_string());
        args.extend(guest.to_args());
        args.extend_from_slice(extra);
        args
    };
    let mut current = ChildVm::spawn("source VM", &vm_args("run", 0, &[]))?;
    current.event("ready", STARTUP)?;
    wait_for_pass(
        &socket(0),
        0,
        "on the source",
        STARTUP.max(guest.pass_bound()),
    )?;
    thread::sleep(WARM_UP);

    let start = Instant::now();
    let mut summaries = Vec::new();
    let mut arrival = Value::Null;
    for hop in 1..=count {
        // A local handover needs a unix socket; otherwise loopback TCP.
        let listen = if settings.local {
            format!(
                "unix:{}",
                directory.path().join(format!("hop{hop}.sock")).display()
            )
        } else {
            "tcp:127.0.0.1:0".to_owned()
        };
        let mut extra = vec!["--listen".to_owned(), listen];
        if let Some(seconds) = run_for.filter(|_| hop == count) {
            extra.extend(["--run-for".to_owned(), seconds.to_string()]);
        }
        let mut destination = ChildVm::spawn("destination VM", &vm_args("incoming", hop, &extra))?;
        let listening = destination.event("listening", STARTUP)?;
        let address: Address = listening["address"]
            .as_str()
            .context("the destination VM printed no address")?
            .parse()?;
        let mut summary = control::migrate(&socket(hop - 1), &address, settings, &mut |line| {
            if !json {
                eprintln!("{line}");
            }
        })
        .with_context(|| format!("migration {hop} of {count}"))?;
        current.wait_success(SETTLE)?;
        arrival = destination.event("resumed", SETTLE)?;
        summary["destination_downtime_ms"] = arrival["destination_downtime_ms"].clone();
        check_guest(
            &control::status(&socket(hop))?,
            &format!("after migration {hop}"),
        )?;
        if !json {
            eprintln!(
                "migration {hop}: downtime {:.1} ms, {} rounds, {:.2} s",
                summary["downtime_ms"].as_f64().unwrap_or(0.0),
                summary["rounds"],
                summary["total_seconds"].as_f64().unwrap_or(0.0)
            );
        }
        summaries.push(summary);
        current = destination;
    }
    let arrival_passes = arrival["passes"].clone();
    let judged = Instant::now();
    let (final_passes, final_seconds) = match run_for {
        Some(seconds) => {
            current.wait_success(Duration::from_secs(seconds) + guest.pass_bound() + SETTLE)?;
            let done = current.event("done", SETTLE)?;
            (
                done["passes"].clone(),
                done["seconds"].as_f64().unwrap_or(0.0),
            )
        }
        None => (
            wait_for_pass(
                &socket(count),
                min_passes(&arrival_passes),
                "on its last destination",
                guest.pass_bound(),
            )?["passes"]
                .clone(),
            judged.elapsed().as_secs_f64(),
        ),
    };
    Ok(Moved {
        summaries,
        arrival_passes,
        final_passes,
        final_seconds,
        total: start.elapsed(),
    })
}

/// `multifd demo` with a KVM guest: one migration to a second process, which runs the
/// guest [`DEMO_RUN_FOR`] seconds (and on until its next pass) and fails unless it
/// progressed without an error.
pub fn demo(guest: &GuestArgs, settings: &MigrateSettings, json: bool) -> Result<()> {
    let moved = move_guest(guest, settings, 1, Some(DEMO_RUN_FOR), json)?;
    let mut summary = moved.summaries.into_iter().next().unwrap_or_default();
    if json {
        summary["guest"] = json!({
            "seconds_on_destination": moved.final_seconds,
            "passes_at_arrival": moved.arrival_passes,
            "passes_after": moved.final_passes,
            "errors": 0,
        });
        multifd_cli::outln!("{summary}");
    } else {
        multifd_cli::out!("{}", precopy::table(&summary));
        multifd_cli::outln!(
            "guest: passes {} at arrival, {} after {:.1} s on the destination process; its checks found no error",
            moved.arrival_passes,
            moved.final_passes,
            moved.final_seconds
        );
    }
    Ok(())
}

/// The `p`-th percentile (0 < p ≤ 1) of sorted values, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}

fn percentiles(summaries: &[Value], key: &str) -> Value {
    let mut values: Vec<f64> = summaries
        .iter()
        .filter_map(|summary| summary[key].as_f64())
        .collect();
    values.sort_by(f64::total_cmp);
    json!({
        "p50": percentile(&values, 0.5),
        "p99": percentile(&values, 0.99),
        "max": values.last().copied().unwrap_or(0.0),
    })
}

/// `multifd vm pingpong`.
pub fn pingpong(args: &PingpongArgs) -> Result<()> {
    let moved = move_guest(&args.guest, &args.settings, args.count, None, args.json)?;
    let downtime = percentiles(&moved.summaries, "downtime_ms");
    let destination = percentiles(&moved.summaries, "destination_downtime_ms");
    if args.json {
        multifd_cli::outln!(
            "{}",
            json!({
                "status": "completed",
                "count": args.count,
                "downtime_ms": downtime,
                "destination_downtime_ms": destination,
                "total_seconds": moved.total.as_secs_f64(),
                "passes_at_last_arrival": moved.arrival_passes,
                "passes_after": moved.final_passes,
                "migrations": moved.summaries,
            })
        );
    } else {
        let line = |what: &str, values: &Value| {
            multifd_cli::outln!(
                "{what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                values["p50"].as_f64().unwrap_or(0.0),
                values["p99"].as_f64().unwrap_or(0.0),
                values["max"].as_f64().unwrap_or(0.0)
            );
        };
        line("downtime (source stop -> Completed)", &downtime);
        line("downtime (destination switchover -> loaded)", &destination);
        multifd_cli::outln!(
            "{} migrations in {:.2} s, each to a fresh process; guest passes {} after the last, no errors",
            args.count,
            moved.total.as_secs_f64(),
            moved.final_passes
        );
    }
    Ok(())
}
