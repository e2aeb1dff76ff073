//! The `multifd` binary end to end: separate `recv` and `send` processes over real
//! sockets, JSON output, and one-line errors with a non-zero exit code.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn multifd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_multifd"))
}

/// A file of `pages` pages: every third page zero, the others numbered.
fn image(path: &Path, pages: usize, seed: u8) {
    let mut bytes = vec![0u8; pages * 4096];
    for (index, page) in bytes.chunks_mut(4096).enumerate() {
        if index % 3 != 0 {
            page.fill(seed.wrapping_add(index as u8));
            page[..8].copy_from_slice(&(index as u64).to_le_bytes());
        }
    }
    std::fs::write(path, bytes).expect("write image");
}

/// Waits for a child, killing it after `timeout` so a hang fails the test.
fn finish(mut child: Child, timeout: Duration) -> Output {
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > timeout {
            child.kill().expect("kill");
            panic!("process still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn spawn(command: &mut Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn multifd")
}

fn socket(directory: &Path) -> String {
    format!("unix:{}", directory.join("migration.sock").display())
}

/// Starts `recv` and waits until its socket exists.
fn start_recv(directory: &Path, extra: &[&str]) -> Child {
    let child = spawn(
        multifd()
            .args(["recv", "--listen", &socket(directory)])
            .args(extra),
    );
    let path = directory.join("migration.sock");
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "recv never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn arg(name: &str, path: &Path) -> String {
    format!("{name}={}", path.display())
}

#[test]
fn send_and_recv_copy_every_block_and_report_json() {
    let directory = tempfile::tempdir().expect("temp dir");
    let (ram, vram) = (
        directory.path().join("ram.img"),
        directory.path().join("vram.img"),
    );
    let (ram_copy, vram_copy) = (
        directory.path().join("ram.copy"),
        directory.path().join("vram.copy"),
    );
    image(&ram, 2048, 1);
    image(&vram, 300, 2);
    let recv = start_recv(
        directory.path(),
        &[
            "--ram",
            &arg("pc.ram", &ram_copy),
            "--ram",
            &arg("vga.vram", &vram_copy),
            "--json",
        ],
    );
    let send = spawn(multifd().args([
        "send",
        "--to",
        &socket(directory.path()),
        "--channels",
        "3",
        "--ram",
        &arg("pc.ram", &ram),
        "--ram",
        &arg("vga.vram", &vram),
        "--json",
    ]));
    let (sent, received) = (
        finish(send, Duration::from_secs(30)),
        finish(recv, Duration::from_secs(30)),
    );
    assert!(
        sent.status.success(),
        "send: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        received.status.success(),
        "recv: {}",
        String::from_utf8_lossy(&received.stderr)
    );
    assert!(std::fs::read(&ram).expect("ram") == std::fs::read(&ram_copy).expect("copy"));
    assert!(std::fs::read(&vram).expect("vram") == std::fs::read(&vram_copy).expect("copy"));

    let sent: Value = serde_json::from_slice(&sent.stdout).expect("send prints JSON");
    let received: Value = serde_json::from_slice(&received.stdout).expect("recv prints JSON");
    for report in [&sent, &received] {
        assert_eq!(report["status"], "completed");
        assert_eq!(report["channels"], 3);
        assert_eq!(
            report["per_channel"].as_array().expect("per_channel").len(),
            3
        );
        assert_eq!(report["zero_pages"], (2048 / 3 + 1) + (300 / 3));
        assert_eq!(report["normal_pages"], 2348 - ((2048 / 3 + 1) + (300 / 3)));
        assert!(report["seconds"].as_f64().expect("seconds") > 0.0);
    }
    assert_eq!(sent["side"], "source");
    assert_eq!(received["side"], "destination");
    assert_eq!(sent["bytes"], received["bytes"]);
}

#[test]
fn an_unmapped_block_fails_both_ends_with_one_line() {
    let directory = tempfile::tempdir().expect("temp dir");
    let ram = directory.path().join("ram.img");
    image(&ram, 16, 3);
    let recv = start_recv(
        directory.path(),
        &["--ram", &arg("other", &directory.path().join("x"))],
    );
    let send = spawn(multifd().args([
        "send",
        "--to",
        &socket(directory.path()),
        "--ram",
        &arg("pc.ram", &ram),
    ]));
    let (sent, received) = (
        finish(send, Duration::from_secs(30)),
        finish(recv, Duration::from_secs(30)),
    );
    for (output, side) in [(&sent, "source"), (&received, "destination")] {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!("multifd: {side}: migration rejected (RamBlocks)"))
                && stderr
                    .contains("ramblock \"pc.ram\" announced by the source has no --ram mapping"),
            "{stderr}"
        );
    }
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let directory = tempfile::tempdir().expect("temp dir");
    let output = multifd()
        .args([
            "send",
            "--to",
            "tcp:nowhere",
            "--ram",
            "pc.ram=/nonexistent",
        ])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid address \"tcp:nowhere\""));

    let output = multifd()
        .args([
            "send",
            "--to",
            &socket(directory.path()),
            "--ram",
            &arg("pc.ram", &directory.path().join("missing.img")),
        ])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("multifd: cannot open"), "{stderr}");
}

#[test]
fn demo_verifies_its_copy() {
    let directory = tempfile::tempdir().expect("temp dir");
    let output = multifd()
        .args(["demo", "--size", "8M", "--channels", "2", "--json", "--dir"])
        .arg(directory.path())
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["verified"], true);
    assert_eq!(report["status"], "completed");
    assert_eq!(report["guest_bytes"], (8u64 << 20) + (16 << 20));
    assert_eq!(
        report["destination"]["normal_pages"],
        report["normal_pages"]
    );
}
