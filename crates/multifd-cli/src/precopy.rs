//! A live (precopy) migration on the command line: its settings ([`PrecopyArgs`], which
//! travel as JSON to a `multifd vm run` process), and what it shows — a line per round while
//! it runs, then the rounds table, dirty rate, both downtimes, total time and throughput, as
//! text or JSON.
//!
//! The summary is built as JSON once ([`summary`]) and the table is drawn from it
//! ([`table`]), so a migration that ran in another process (`multifd vm run`, asked over
//! its control socket) prints exactly as one that ran here.

use std::time::Duration;

use anyhow::{Context, Result};
use multifd::{Phase, PrecopyConfig, PrecopyProgress, PrecopyStats, TimeoutStrategy};
use multifd_cli::image::parse_size;
use serde_json::{json, Value};

const MIB: f64 = (1u64 << 20) as f64;

/// The precopy driver's settings on the command line.
#[derive(clap::Args, Clone, Debug)]
pub struct PrecopyArgs {
    /// The longest the guest may stay stopped, in milliseconds.
    #[arg(
        long = "downtime-limit",
        alias = "downtime-limit-ms",
        default_value_t = 300
    )]
    downtime_limit_ms: u64,
    /// Wire bytes per second over all channels (e.g. 1G); unlimited by default.
    #[arg(long, value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Throttle the guest when it dirties memory faster than the link moves it.
    #[arg(long)]
    auto_converge: bool,
    /// Seconds precopy may run before `--timeout-strategy` decides (0: no limit). A
    /// guest that never converges would otherwise run until interrupted.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// What the timeout does: cancel (the guest stays on the source) or force.
    #[arg(long, value_enum, default_value_t = Strategy::Cancel)]
    timeout_strategy: Strategy,
}

/// What the precopy timeout does.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Strategy {
    /// The guest stays on the source.
    Cancel,
    /// Switch over anyway.
    Force,
}

impl PrecopyArgs {
    /// The driver's configuration.
    pub fn config(&self) -> PrecopyConfig {
        let mut config = PrecopyConfig::default();
        config.downtime_limit = Duration::from_millis(self.downtime_limit_ms);
        config.auto_converge = self.auto_converge;
        config.timeout = (self.timeout > 0).then(|| Duration::from_secs(self.timeout));
        config.timeout_strategy = match self.timeout_strategy {
            Strategy::Cancel => TimeoutStrategy::Cancel,
            Strategy::Force => TimeoutStrategy::Force,
        };
        config
    }

    /// The settings as JSON, for another process.
    pub fn to_json(&self) -> Value {
        json!({
            "downtime_limit_ms": self.downtime_limit_ms,
            "max_bandwidth": self.max_bandwidth,
            "auto_converge": self.auto_converge,
            "timeout": self.timeout,
            "force": matches!(self.timeout_strategy, Strategy::Force),
        })
    }

    /// The settings [`PrecopyArgs::to_json`] wrote.
    pub fn from_json(value: &Value) -> Result<Self> {
        let number = |key: &str| {
            value[key]
                .as_u64()
                .with_context(|| format!("precopy setting {key:?} is not a number"))
        };
        Ok(Self {
            downtime_limit_ms: number("downtime_limit_ms")?,
            max_bandwidth: value["max_bandwidth"].as_u64(),
            auto_converge: value["auto_converge"].as_bool().unwrap_or(false),
            timeout: number("timeout")?,
            timeout_strategy: if value["force"].as_bool() == Some(true) {
                Strategy::Force
            } else {
                Strategy::Cancel
            },
        })
    }
}

/// A progress line for a round or the switchover; `None` for the other phases.
pub fn progress_line(progress: &PrecopyProgress) -> Option<String> {
    matches!(progress.phase, Phase::Round(_) | Phase::Switchover).then(|| {
        format!(
            "{:>10}  dirty {:>8.1} MiB  rate {:>8.1} MiB/s  bandwidth {:>8.1} MiB/s  expected downtime {:>7.1} ms  throttle {:>2}%",
            progress.phase.to_string(),
            progress.remaining_dirty_bytes as f64 / MIB,
            progress.dirty_rate / MIB,
            progress.bandwidth / MIB,
            progress.expected_downtime.as_secs_f64() * 1e3,
            progress.throttle_percent,
        )
    })
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The guest's dirty rate in bytes per second: pages it dirtied while the rounds ran, over
/// their time.
fn dirty_rate(stats: &PrecopyStats) -> f64 {
    let page_size = f64::from(stats.migration.page_size);
    let (pages, seconds) = stats
        .rounds
        .iter()
        .fold((0u64, 0f64), |(pages, seconds), round| {
            (
                pages + round.pages_dirtied,
                seconds + round.duration.as_secs_f64(),
            )
        });
    if seconds > 0.0 {
        pages as f64 * page_size / seconds
    } else {
        0.0
    }
}

/// The source's figures as one JSON object; `destination_downtime_ms` (the destination's
/// own switchover → loaded) is `null` until the caller learns it from the destination.
pub fn summary(stats: &PrecopyStats) -> Value {
    let seconds = stats.total_time.as_secs_f64();
    json!({
        "status": "completed",
        "rounds": stats.rounds.len(),
        "downtime_ms": milliseconds(stats.downtime),
        "destination_downtime_ms": null,
        "expected_downtime_ms": milliseconds(stats.expected_downtime),
        "device_save_ms": stats.migration.device_save_time.map(milliseconds),
        "drain_ms": stats.migration.drain_time.map(milliseconds),
        "total_seconds": seconds,
        "dirty_rate_bytes_per_second": dirty_rate(stats),
        "throughput_bytes_per_second": if seconds > 0.0 { stats.migration.bytes as f64 / seconds } else { 0.0 },
        "max_throttle_percent": stats.max_throttle_percent,
        "forced": stats.forced,
        "final_pages": stats.final_pages,
        "bytes": stats.migration.bytes,
        "device_bytes": stats.migration.device_bytes,
        "per_round": stats.rounds.iter().map(|round| json!({
            "round": round.round,
            "pages_sent": round.pages_sent,
            "pages_dirtied": round.pages_dirtied,
            "bytes": round.bytes,
            "seconds": round.duration.as_secs_f64(),
            "throttle_percent": round.throttle_percent,
        })).collect::<Vec<_>>(),
    })
}

/// The rounds table and the totals of a [`summary`].
pub fn table(summary: &Value) -> String {
    let number = |value: &Value, key: &str| value[key].as_f64().unwrap_or(0.0);
    let count = |value: &Value, key: &str| value[key].as_u64().unwrap_or(0);
    let mut out = format!(
        "{:>5} {:>12} {:>12} {:>10} {:>9} {:>9}\n",
        "round", "pages sent", "dirtied", "MiB", "seconds", "throttle"
    );
    for round in summary["per_round"].as_array().into_iter().flatten() {
        out += &format!(
            "{:>5} {:>12} {:>12} {:>10.1} {:>9.3} {:>8}%\n",
            count(round, "round"),
            count(round, "pages_sent"),
            count(round, "pages_dirtied"),
            number(round, "bytes") / MIB,
            number(round, "seconds"),
            count(round, "throttle_percent")
        );
    }
    out += &format!(
        "final round after the stop: {} pages; dirty rate {:.1} MiB/s\n",
        summary["final_pages"],
        number(summary, "dirty_rate_bytes_per_second") / MIB
    );
    out += &format!(
        "downtime: {:.1} ms (source stop -> Completed), {} (destination switchover -> loaded); expected {:.1} ms\n",
        number(summary, "downtime_ms"),
        summary["destination_downtime_ms"]
            .as_f64()
            .map_or("n/a".into(), |downtime| format!("{downtime:.1} ms")),
        number(summary, "expected_downtime_ms")
    );
    out += &format!(
        "total {:.2} s, {:.1} MiB on the wire ({:.1} MiB/s), max throttle {}%{}\n",
        number(summary, "total_seconds"),
        number(summary, "bytes") / MIB,
        number(summary, "throughput_bytes_per_second") / MIB,
        summary["max_throttle_percent"],
        if summary["forced"].as_bool() == Some(true) {
            ", switchover forced by the timeout"
        } else {
            ""
        },
    );
    out
}
