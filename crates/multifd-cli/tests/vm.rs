//! `multifd vm` and the KVM `demo` end to end, each VM its own process: `vm run`, `vm
//! migrate` and `vm incoming` move a guest that keeps passing its checks; `vm pingpong`
//! moves one three times; `demo` moves one and judges it; `vm image` writes a bootable
//! sector; a missing control socket and a destination nobody listens on are one-line
//! errors, the second leaving the guest running on the source.
//!
//! Without `/dev/kvm` the KVM tests print `SKIPPED` and pass, unless
//! `MULTIFD_REQUIRE_KVM=1`.
#![cfg(target_arch = "x86_64")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use multifd_testvm::kvm_available;
use serde_json::Value;

/// Bounds every wait for a process or an event: VM processes start in well under a
/// second and the test guests pass in milliseconds, even on a loaded 2-core host.
const WAIT: Duration = Duration::from_secs(30);

/// A small guest: 64 MiB, 2 vCPUs, 64 bytes checked per page, 50 MiB/s, a 1 MiB frame
/// buffer.
const GUEST: [&str; 10] = [
    "--memory",
    "64M",
    "--vcpus",
    "2",
    "--write-bytes",
    "64",
    "--dirty-rate",
    "50M",
    "--frame-buffer",
    "1M",
];

fn multifd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_multifd"))
}

/// Runs `multifd ARGS` to completion, at most [`WAIT`] (× `slack`).
fn run(args: &[&str], slack: u32) -> Output {
    let mut child = multifd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn multifd");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > WAIT * slack {
            child.kill().expect("kill");
            panic!("multifd {args:?} still running after {:?}", WAIT * slack);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    assert!(output.status.success(), "failed: {}", stderr(output));
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

/// A `multifd vm` process printing JSON events; killed when dropped.
struct VmProcess {
    child: Child,
    events: Receiver<Value>,
}

impl VmProcess {
    fn spawn(args: &[&str]) -> Self {
        let mut child = multifd()
            .arg("vm")
            .args(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn multifd vm");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(serde_json::from_str(&line).expect("a JSON event"));
            }
        });
        Self { child, events }
    }

    fn event(&self, name: &str) -> Value {
        let event = self.events.recv_timeout(WAIT).expect("an event in time");
        assert_eq!(event["event"], name, "{event}");
        event
    }

    fn exit_code(&mut self) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(started.elapsed() < WAIT, "the VM process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// Starts `vm run` with its control socket at `control`.
fn start_source(control: &Path) -> VmProcess {
    let mut args = vec!["run", "--control", path_arg(control)];
    args.extend(GUEST);
    let source = VmProcess::spawn(&args);
    source.event("ready");
    source
}

fn status(control: &Path) -> Value {
    json(&run(
        &["vm", "status", "--control", path_arg(control), "--json"],
        1,
    ))
}

fn min_passes(status: &Value) -> u64 {
    status["passes"]
        .as_array()
        .and_then(|passes| passes.iter().filter_map(Value::as_u64).min())
        .unwrap_or(0)
}

/// Polls the VM until every vCPU passed more than `passes` times; asserts no guest error.
fn wait_for_pass(control: &Path, passes: u64) -> Value {
    let started = Instant::now();
    loop {
        let status = status(control);
        assert_eq!(status["errors"], serde_json::json!([]), "{status}");
        assert_eq!(status["vcpu_failures"], serde_json::json!([]), "{status}");
        if min_passes(&status) > passes {
            return status;
        }
        assert!(started.elapsed() < WAIT, "no progress: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn socket(directory: &tempfile::TempDir, name: &str) -> PathBuf {
    directory.path().join(name)
}

#[test]
fn run_migrate_and_incoming_processes_move_a_guest_that_keeps_passing() {
    if !kvm_available() {
        return;
    }
    let summary = move_guest("tcp:127.0.0.1:0", &["--channels", "2"]);
    assert!(summary["rounds"].as_u64() >= Some(1), "{summary}");
    assert!(summary["downtime_ms"].as_f64() > Some(0.0), "{summary}");
    assert!(
        summary["destination_downtime_ms"].as_f64() > Some(0.0),
        "{summary}"
    );
    assert!(summary["dirty_rate_bytes_per_second"].is_number());
}

/// `--local`: the guest's memfd is handed over on a unix socket, no RAM round runs, and
/// the guest keeps passing its checks in the destination process.
#[test]
fn a_local_migration_hands_the_guest_memory_to_the_incoming_process() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let listen = format!("unix:{}", directory.path().join("local.sock").display());
    let summary = move_guest(&listen, &["--local"]);
    assert_eq!(summary["rounds"].as_u64(), Some(0), "{summary}");
    assert!(summary["downtime_ms"].as_f64() > Some(0.0), "{summary}");
}

/// Starts a guest in a `vm run` process, moves it with `vm migrate` (and `extra` flags) to
/// a `vm incoming` process listening on `listen`, checks that the source exits 0 and the
/// guest passes again on the destination; returns `vm migrate`'s JSON summary.
fn move_guest(listen: &str, extra: &[&str]) -> Value {
    let directory = tempfile::tempdir().expect("tempdir");
    let (source_control, destination_control) = (
        socket(&directory, "source.sock"),
        socket(&directory, "destination.sock"),
    );
    let mut source = start_source(&source_control);
    wait_for_pass(&source_control, 0);

    let mut args = vec!["incoming", "--listen", listen];
    args.extend(["--control", path_arg(&destination_control)]);
    args.extend(GUEST);
    let destination = VmProcess::spawn(&args);
    let listening = destination.event("listening");
    let address = listening["address"].as_str().expect("address");
    let mut migrate = vec![
        "vm",
        "migrate",
        "--control",
        path_arg(&source_control),
        "--to",
        address,
        "--destination-control",
        path_arg(&destination_control),
        "--json",
    ];
    migrate.extend(extra);
    let summary = json(&run(&migrate, 2));
    assert_eq!(
        source.exit_code(),
        Some(0),
        "the source exits after handing over"
    );

    let arrival = destination.event("resumed");
    let arrived = arrival["passes"]
        .as_array()
        .and_then(|passes| passes.iter().filter_map(Value::as_u64).min())
        .expect("passes at arrival");
    assert!(arrived >= 1, "{arrival}");
    wait_for_pass(&destination_control, arrived + 1);
    summary
}

#[test]
fn pingpong_moves_a_guest_three_times_between_fresh_processes() {
    if !kvm_available() {
        return;
    }
    let mut args = vec![
        "vm",
        "pingpong",
        "--count",
        "3",
        "--channels",
        "2",
        "--json",
    ];
    args.extend(GUEST);
    let report = json(&run(&args, 3));
    assert_eq!(report["count"], 3, "{report}");
    assert_eq!(report["migrations"].as_array().map(Vec::len), Some(3));
    let downtime = &report["downtime_ms"];
    assert!(downtime["p50"].as_f64() > Some(0.0), "{report}");
    assert!(
        downtime["max"].as_f64() >= downtime["p99"].as_f64(),
        "{report}"
    );
    assert!(
        report["destination_downtime_ms"]["max"].as_f64() > Some(0.0),
        "{report}"
    );
}

#[test]
fn demo_moves_the_kvm_guest_to_a_second_process_and_judges_it() {
    if !kvm_available() {
        return;
    }
    let mut args = vec!["demo", "--json"];
    args.extend(GUEST);
    let summary = json(&run(&args, 2));
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(summary["guest"]["errors"], 0, "{summary}");
    assert!(summary["per_round"]
        .as_array()
        .is_some_and(|rounds| !rounds.is_empty()));
    assert!(summary["throughput_bytes_per_second"].as_f64() > Some(0.0));
}

#[test]
fn image_writes_a_boot_sector() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = socket(&directory, "guest.img");
    let output = run(
        &[
            "vm",
            "image",
            "--out",
            path_arg(&path),
            "--memory",
            "128M",
            "--write-bytes",
            "256",
            "--dirty-rate",
            "100M",
        ],
        1,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let image = std::fs::read(&path).expect("the image");
    assert!(
        !image.is_empty() && image.len().is_multiple_of(512),
        "{} bytes",
        image.len()
    );
    assert_eq!(image[510..512], [0x55, 0xaa], "boot signature");

    let bad = run(
        &[
            "vm",
            "image",
            "--out",
            path_arg(&path),
            "--write-bytes",
            "6",
        ],
        1,
    );
    assert!(!bad.status.success());
    assert_eq!(stderr(&bad).lines().count(), 1, "{}", stderr(&bad));
}

#[test]
fn bad_control_sockets_and_destinations_are_one_line_errors() {
    let directory = tempfile::tempdir().expect("tempdir");
    let missing = socket(&directory, "nobody.sock");
    let output = run(
        &[
            "vm",
            "migrate",
            "--control",
            path_arg(&missing),
            "--to",
            "tcp:127.0.0.1:1",
        ],
        1,
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("control socket"), "{message}");

    if !kvm_available() {
        return;
    }
    let control = socket(&directory, "source.sock");
    let mut source = start_source(&control);
    let before = wait_for_pass(&control, 0);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let output = run(
        &[
            "vm",
            "migrate",
            "--control",
            path_arg(&control),
            "--to",
            &format!("tcp:127.0.0.1:{port}"),
        ],
        1,
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("keeps running"), "{message}");
    let after = wait_for_pass(&control, min_passes(&before));
    assert_eq!(after["running"], true, "{after}");
    assert_eq!(
        source.child.try_wait().expect("wait"),
        None,
        "the source runs on"
    );
}

/// `vm snapshot` saves a running guest live (it runs on), and `vm restore --from` boots a
/// new process from the file, where the guest resumes and keeps passing its checks.
#[test]
fn snapshot_and_restore_move_a_guest_through_a_file() {
    if !kvm_available() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let (source_control, restored_control) = (
        socket(&directory, "source.sock"),
        socket(&directory, "restored.sock"),
    );
    let file = directory.path().join("guest.snap");
    let source = start_source(&source_control);
    wait_for_pass(&source_control, 0);
    let summary = json(&run(
        &[
            "vm",
            "snapshot",
            "--control",
            path_arg(&source_control),
            "--out",
            path_arg(&file),
            "--json",
        ],
        2,
    ));
    assert!(summary["rounds"].as_u64() >= Some(1), "{summary}");
    let after = min_passes(&status(&source_control));
    wait_for_pass(&source_control, after + 1);
    drop(source);

    let mut args = vec!["restore", "--from", path_arg(&file)];
    args.extend(["--control", path_arg(&restored_control)]);
    args.extend(GUEST);
    let restored = VmProcess::spawn(&args);
    let arrival = restored.event("resumed");
    let arrived = arrival["passes"]
        .as_array()
        .and_then(|passes| passes.iter().filter_map(Value::as_u64).min())
        .expect("passes at arrival");
    assert!(arrived >= 1, "{arrival}");
    wait_for_pass(&restored_control, arrived + 1);
}

/// Without `/dev/kvm` (hidden here by a private tmpfs over `/dev`), `demo` says so in one
/// line and moves the simulated guest instead. Skipped loudly where a private mount
/// namespace is not allowed.
#[test]
fn demo_without_kvm_says_so_and_moves_the_simulated_guest() {
    let hide_dev = "mount -t tmpfs tmpfs /dev";
    let probe = Command::new("unshare")
        .args(["--mount", "sh", "-c", hide_dev])
        .output();
    if !probe.is_ok_and(|output| output.status.success()) {
        eprintln!("SKIPPED: no private mount namespace with tmpfs here (needs root and unshare)");
        return;
    }
    let output = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "{hide_dev} && exec {} demo --memory 64M --dirty-rate 16M --json",
            env!("CARGO_BIN_EXE_multifd")
        ))
        .output()
        .expect("run the demo");
    let stderr = stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .lines()
            .filter(|line| line.contains("/dev/kvm is not available"))
            .count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("running the simulated guest instead"),
        "{stderr}"
    );
    let summary: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(summary["status"], "completed", "{summary}");
}
