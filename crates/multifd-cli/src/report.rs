//! What the command line shows: a progress bar while running, then a table or JSON.

use std::io::IsTerminal;
use std::time::Duration;

use multifd::{ChannelStats, MigrationStats, Monitor};
use multifd_cli::GIB;
use serde_json::{json, Value};

/// An error and its causes on one line.
pub fn one_line(error: &anyhow::Error) -> String {
    // The engine's errors already show their cause in their own message; a context added
    // here does not. Each cause is added once, so neither is printed twice.
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// A progress bar on a terminal's stderr, fed from the migration's monitor.
pub struct ProgressBar {
    watcher: Option<(multifd::ProgressWatcher, indicatif::ProgressBar)>,
}

/// How often the bar is redrawn.
const REFRESH: Duration = Duration::from_millis(100);

impl ProgressBar {
    /// Shows a bar unless stderr is not a terminal or JSON output was asked for.
    pub fn start(monitor: &Monitor, label: &'static str, json: bool) -> Self {
        let watcher = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label);
            let drawn = bar.clone();
            let watcher = monitor.watch(REFRESH, move |progress| {
                drawn.set_length(progress.guest_bytes);
                drawn.set_position(progress.guest_bytes_done);
            });
            (watcher, bar)
        });
        Self { watcher }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some((watcher, bar)) = self.watcher {
            drop(watcher);
            bar.finish_and_clear();
        }
    }
}

/// Prints the statistics (table or JSON); on failure with `--json`, prints a JSON object
/// with the error too, and passes the error on for the one-line message and exit code.
pub fn print_outcome(result: anyhow::Result<MigrationStats>, json: bool) -> anyhow::Result<()> {
    match result {
        Ok(stats) => {
            if json {
                multifd_cli::outln!("{}", to_json(&stats));
            } else {
                multifd_cli::out!("{}", table(&stats));
            }
            Ok(())
        }
        Err(error) => {
            if json {
                multifd_cli::outln!(
                    "{}",
                    json!({ "status": "failed", "error": one_line(&error) })
                );
            }
            Err(error)
        }
    }
}

/// The statistics as one JSON object.
pub fn to_json(stats: &MigrationStats) -> Value {
    json!({
        "status": "completed",
        "side": stats.side.to_string(),
        "seconds": stats.total_time.as_secs_f64(),
        "setup_seconds": stats.setup_time.as_secs_f64(),
        "bytes": stats.bytes,
        "guest_bytes": stats.guest_bytes(),
        "guest_gib_per_second": stats.guest_throughput() / GIB,
        "wire_gib_per_second": stats.wire_throughput() / GIB,
        "packets": stats.packets,
        "normal_pages": stats.normal_pages,
        "zero_pages": stats.zero_pages,
        "payload_bytes": stats.payload_bytes,
        "raw_payload_bytes": stats.raw_payload_bytes,
        "compression_ratio": stats.compression_ratio(),
        "codec_seconds": stats.codec_time.as_secs_f64(),
        "uncompressed_packets": stats.uncompressed_packets,
        "zero_copy_sends": stats.channel_totals().zero_copy_sends,
        "zero_copy_copied": stats.channel_totals().zero_copy_copied,
        "page_size": stats.page_size,
        "rounds": stats.rounds,
        "pages_per_round": stats.pages_per_round,
        "channels": stats.channels.len(),
        "per_channel": stats.channels.iter().map(|channel| json!({
            "id": channel.id,
            "bytes": channel.bytes,
            "packets": channel.packets,
            "normal_pages": channel.normal_pages,
            "zero_pages": channel.zero_pages,
            "payload_bytes": channel.payload_bytes,
            "raw_payload_bytes": channel.raw_payload_bytes,
            "codec_seconds": channel.codec_time.as_secs_f64(),
            "uncompressed_packets": channel.uncompressed_packets,
            "sync_packets": channel.sync_packets,
            "device_chunks": channel.device_chunks,
        })).collect::<Vec<_>>(),
        "switchover_seconds": stats.switchover_time.map(|time| time.as_secs_f64()),
        "device_bytes": stats.device_bytes,
        "device_chunks": stats.device_chunks,
        "peak_queued_device_bytes": stats.peak_queued_device_bytes,
        "stray_connections": stats.stray_connections,
        "devices": stats.devices.iter().map(|device| json!({
            "idstr": device.id.idstr,
            "instance_id": device.id.instance_id,
            "bytes": device.bytes,
            "chunks": device.chunks,
            busy_key(stats.side): device.busy_time.as_secs_f64(),
        })).collect::<Vec<_>>(),
    })
}

/// What a device's busy time is on this side: its save, or its loading.
fn busy_key(side: multifd::Side) -> &'static str {
    match side {
        multifd::Side::Source => "save_seconds",
        multifd::Side::Destination => "load_seconds",
    }
}

/// The statistics as a human-readable table.
pub fn table(stats: &MigrationStats) -> String {
    let mut out = String::new();
    let seconds = stats.total_time.as_secs_f64();
    out += &format!(
        "{} completed in {seconds:.3} s (setup {:.3} s), {} rounds\n",
        stats.side,
        stats.setup_time.as_secs_f64(),
        stats.rounds
    );
    out += &format!(
        "guest memory {:.2} GiB at {:.2} GiB/s; wire {:.2} GiB at {:.2} GiB/s\n",
        stats.guest_bytes() as f64 / GIB,
        stats.guest_throughput() / GIB,
        stats.bytes as f64 / GIB,
        stats.wire_throughput() / GIB,
    );
    out += &format!(
        "page payload {} bytes before compression, {} sent (ratio {:.2}); codec {:.3} s; \
         {} packets sent raw as incompressible\n",
        stats.raw_payload_bytes,
        stats.payload_bytes,
        stats.compression_ratio(),
        stats.codec_time.as_secs_f64(),
        stats.uncompressed_packets,
    );
    out += &format!(
        "{:>8} {:>14} {:>10} {:>12} {:>12} {:>6} {:>13} {:>7} {:>9}\n",
        "channel",
        "bytes",
        "packets",
        "normal",
        "zero",
        "syncs",
        "device chunks",
        "ratio",
        "codec s"
    );
    for channel in &stats.channels {
        out += &channel_row(&channel.id, channel);
    }
    let total = stats.channel_totals();
    out += &channel_row(&"total", &total);
    if let Some(switchover) = stats.switchover_time {
        out += &format!(
            "switchover to completion (downtime proxy): {:.3} s\n",
            switchover.as_secs_f64()
        );
    }
    if total.zero_copy_sends > 0 {
        out += &format!(
            "zero-copy: {} page sends, {} of them copied by the kernel after all\n",
            total.zero_copy_sends, total.zero_copy_copied
        );
    }
    if stats.stray_connections > 0 {
        out += &format!(
            "{} stray connection(s) to the listener dropped (not this migration's)\n",
            stats.stray_connections
        );
    }
    if !stats.devices.is_empty() {
        let busy = match stats.side {
            multifd::Side::Source => "save s",
            multifd::Side::Destination => "load s",
        };
        out += &format!(
            "{:>24} {:>9} {:>14} {:>8} {:>8}\n",
            "device", "instance", "bytes", "chunks", busy
        );
        for device in &stats.devices {
            out += &format!(
                "{:>24} {:>9} {:>14} {:>8} {:>8.3}\n",
                device.id.idstr,
                device.id.instance_id,
                device.bytes,
                device.chunks,
                device.busy_time.as_secs_f64()
            );
        }
        out += &format!(
            "device state {} bytes in {} chunks",
            stats.device_bytes, stats.device_chunks
        );
        if stats.side == multifd::Side::Destination {
            out += &format!("; at most {} bytes queued", stats.peak_queued_device_bytes);
        }
        out += "\n";
    }
    out
}

/// One line of the per-channel table, labelled `label`.
fn channel_row(label: &dyn std::fmt::Display, channel: &ChannelStats) -> String {
    format!(
        "{label:>8} {:>14} {:>10} {:>12} {:>12} {:>6} {:>13} {:>7.2} {:>9.3}\n",
        channel.bytes,
        channel.packets,
        channel.normal_pages,
        channel.zero_pages,
        channel.sync_packets,
        channel.device_chunks,
        channel.compression_ratio(),
        channel.codec_time.as_secs_f64()
    )
}
