//! The `multifd-bench` binary end to end: the device-state benchmark's JSON report.

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

#[test]
fn devices_reports_the_three_layouts_with_ratios() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_multifd-bench"));
    command.args([
        "devices",
        "--devices",
        "2",
        "--device-size",
        "1M",
        "--final-ram",
        "4M",
        "--channels",
        "2",
        "--json",
    ]);
    // A hang fails the test instead of stalling the suite.
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || sender.send(command.output()));
    let output = receiver
        .recv_timeout(Duration::from_secs(60))
        .expect("bench still running after 60 s")
        .expect("run multifd-bench");
    assert!(
        output.status.success(),
        "bench: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("bench prints JSON");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "without and with the final RAM round");
    assert_eq!(runs[0]["final_ram_bytes"], 0);
    assert_eq!(runs[1]["final_ram_bytes"], 4 << 20);
    for run in runs {
        assert_eq!(run["dedicated_channels"], 1);
        for key in ["sequential_seconds", "shared_seconds", "dedicated_seconds"] {
            assert!(run[key].as_f64().expect(key) > 0.0, "{run}");
        }
        assert!(run["shared_ratio"].as_f64().expect("ratio") > 0.0, "{run}");
    }
}
