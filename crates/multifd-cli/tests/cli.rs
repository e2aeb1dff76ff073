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

/// Waits for a `send` and a `recv` process, 30 s at most each.
fn finish_pair(send: Child, recv: Child) -> (Output, Output) {
    let timeout = Duration::from_secs(30);
    (finish(send, timeout), finish(recv, timeout))
}

/// Fails the test, showing the process's stderr, unless it succeeded.
fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
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
    let (sent, received) = finish_pair(send, recv);
    assert_success(&sent, "send");
    assert_success(&received, "recv");
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
    let (sent, received) = finish_pair(send, recv);
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
        .args([
            "demo",
            "--guest",
            "image",
            "--size",
            "8M",
            "--channels",
            "2",
            "--json",
            "--dir",
        ])
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

#[test]
fn send_and_recv_copy_device_files_over_dedicated_channels() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| directory.path().join(name);
    image(&path("ram.img"), 64, 1);
    // A device with state and a config blob, and one small enough to be only a config.
    let nic: Vec<u8> = (0..3_000_000u32)
        .map(|index| (index * 7 % 251) as u8)
        .collect();
    std::fs::write(path("nic.state"), &nic).expect("write nic");
    std::fs::write(path("rng.state"), b"tiny device").expect("write rng");
    let recv = start_recv(
        directory.path(),
        &[
            "--ram",
            &arg("pc.ram", &path("ram.copy")),
            "--device",
            &arg("0000:00:05.0/vfio", &path("nic.copy")),
            "--device",
            &arg("virtio-rng/2", &path("rng.copy")),
            "--json",
        ],
    );
    let send = spawn(multifd().args([
        "send",
        "--to",
        &socket(directory.path()),
        "--channels",
        "3",
        "--device-channels",
        "1",
        "--device-chunk-size",
        "262144",
        "--ram",
        &arg("pc.ram", &path("ram.img")),
        "--device",
        &arg("0000:00:05.0/vfio", &path("nic.state")),
        "--device",
        &arg("virtio-rng/2", &path("rng.state")),
        "--json",
    ]));
    let (sent, received) = finish_pair(send, recv);
    assert_success(&sent, "send");
    assert_success(&received, "recv");
    assert!(std::fs::read(path("nic.copy")).expect("copy") == nic);
    assert_eq!(
        std::fs::read(path("rng.copy")).expect("copy"),
        b"tiny device"
    );

    let sent: Value = serde_json::from_slice(&sent.stdout).expect("send prints JSON");
    let received: Value = serde_json::from_slice(&received.stdout).expect("recv prints JSON");
    // The NIC: 3,000,000 - 4096 state bytes in chunks of 256 KiB (12) plus its config.
    for report in [&sent, &received] {
        let devices = report["devices"].as_array().expect("devices");
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0]["idstr"], "0000:00:05.0/vfio");
        assert_eq!(devices[0]["bytes"], 3_000_000);
        assert_eq!(devices[0]["chunks"], 13);
        assert_eq!(devices[1]["idstr"], "virtio-rng");
        assert_eq!(devices[1]["instance_id"], 2);
        assert_eq!(devices[1]["chunks"], 1);
        assert!(report["switchover_seconds"].as_f64().is_some());
        let per_channel = report["per_channel"].as_array().expect("per_channel");
        assert_eq!(per_channel[2]["device_chunks"], 14);
        assert_eq!(per_channel[2]["normal_pages"], 0);
    }
    assert!(received["devices"][0]["load_seconds"].as_f64().is_some());
    assert!(sent["devices"][0]["save_seconds"].as_f64().is_some());
}

#[test]
fn bench_refuses_zero_repeats() {
    let output = multifd()
        .args(["bench", "--repeat", "0"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid value '0' for '--repeat <REPEAT>'"),
        "{stderr}"
    );
}

/// Runs `recv` with `recv_extra` and `send` with `send_extra` on a 512-page image;
/// returns both outputs and whether the copy equals the image.
fn migrate_with(recv_extra: &[&str], send_extra: &[&str]) -> (Output, Output, bool) {
    let directory = tempfile::tempdir().expect("temp dir");
    let (ram, copy) = (
        directory.path().join("ram.img"),
        directory.path().join("ram.copy"),
    );
    image(&ram, 512, 7);
    let ram_copy = arg("pc.ram", &copy);
    let recv = start_recv(
        directory.path(),
        &[&["--ram", ram_copy.as_str(), "--json"], recv_extra].concat(),
    );
    let send = spawn(
        multifd()
            .args(["send", "--to", &socket(directory.path()), "--json"])
            .args(["--ram", &arg("pc.ram", &ram)])
            .args(send_extra),
    );
    let (sent, received) = finish_pair(send, recv);
    let equal = std::fs::read(&copy).ok() == Some(std::fs::read(&ram).expect("ram"));
    (sent, received, equal)
}

#[test]
fn compressed_send_and_recv_report_the_ratio() {
    let (sent, received, equal) = migrate_with(
        &["--compress", "zstd", "--level", "3"],
        &["--compress", "zstd", "--level", "3", "--channels", "2"],
    );
    assert_success(&sent, "send");
    assert_success(&received, "recv");
    assert!(equal, "the copy differs");
    let sent: Value = serde_json::from_slice(&sent.stdout).expect("send prints JSON");
    let received: Value = serde_json::from_slice(&received.stdout).expect("recv prints JSON");
    for report in [&sent, &received] {
        let normal_pages = report["normal_pages"].as_u64().expect("normal pages");
        assert_eq!(report["raw_payload_bytes"], normal_pages * 4096);
        assert!(
            report["compression_ratio"].as_f64().expect("ratio") > 10.0,
            "{report}"
        );
        assert!(report["codec_seconds"].as_f64().expect("codec seconds") > 0.0);
        assert_eq!(report["uncompressed_packets"], 0);
    }
    assert_eq!(sent["payload_bytes"], received["payload_bytes"]);
}

#[test]
fn a_compression_mismatch_is_a_one_line_rejection_on_both_ends() {
    let (sent, received, _) = migrate_with(&["--compress", "lz4"], &["--compress", "zlib"]);
    for (output, side) in [(&sent, "source"), (&received, "destination")] {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "multifd: {side}: migration rejected (Compression): source compression \
                 \"zlib level 1\", destination expects \"lz4\""
            )),
            "{stderr}"
        );
    }
}

#[test]
fn compression_levels_are_checked_before_connecting() {
    for (arguments, message) in [
        (
            ["--compress", "lz4", "--level", "1"],
            "lz4 has no levels, got level 1",
        ),
        (
            ["--compress", "zlib", "--level", "10"],
            "zlib level 10 outside 0..=9",
        ),
        (
            ["--compress", "zstd", "--level", "-6"],
            "zstd level -6 outside -5..=19",
        ),
    ] {
        let output = multifd()
            .args(["send", "--to", "unix:/nonexistent/socket"])
            .args(["--ram", "pc.ram=/dev/null"])
            .args(arguments)
            .output()
            .expect("run");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stderr.trim_end(),
            format!("multifd: invalid configuration: {message}")
        );
    }
    let output = multifd()
        .args([
            "recv",
            "--listen",
            "unix:/nonexistent/socket",
            "--level",
            "3",
        ])
        .args(["--ram", "pc.ram=/dev/null"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--compress"));
}

/// `recv --timeout` with a value too large for a deadline means no limit, not a crash.
#[test]
fn a_huge_recv_timeout_is_no_limit() {
    let directory = tempfile::tempdir().expect("temp dir");
    let (ram, copy) = (
        directory.path().join("ram.img"),
        directory.path().join("ram.copy"),
    );
    image(&ram, 64, 3);
    let recv = start_recv(
        directory.path(),
        &[
            "--ram",
            &arg("pc.ram", &copy),
            "--timeout",
            &u64::MAX.to_string(),
        ],
    );
    let send = spawn(multifd().args([
        "send",
        "--to",
        &socket(directory.path()),
        "--ram",
        &arg("pc.ram", &ram),
    ]));
    let (sent, received) = finish_pair(send, recv);
    assert_success(&received, "recv");
    assert_success(&sent, "send");
    assert!(std::fs::read(&ram).expect("ram") == std::fs::read(&copy).expect("copy"));
}

/// A reader of the output that went away (`multifd demo | head -0`) costs the output,
/// not the result: exit 0, no panic.
#[test]
fn a_closed_stdout_does_not_crash_a_successful_run() {
    let directory = tempfile::tempdir().expect("temp dir");
    let mut child = spawn(
        multifd()
            .args([
                "demo",
                "--guest",
                "image",
                "--size",
                "8M",
                "--channels",
                "2",
                "--dir",
            ])
            .arg(directory.path()),
    );
    drop(child.stdout.take());
    let output = finish(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Outputs that could only fail, or lose data, once a source connected are refused at
/// startup with the flag named: before anything listens.
#[test]
fn recv_refuses_bad_outputs_at_startup() {
    let directory = tempfile::tempdir().expect("temp dir");
    let file = |name: &str| arg(name, &directory.path().join("a.copy"));
    let other = arg("vga.vram", &directory.path().join("b.copy"));
    let missing = arg("pc.ram", &directory.path().join("no/such/dir/a.copy"));
    let as_directory = arg("pc.ram", directory.path());
    let device = |name: &str| format!("{name}={}", directory.path().join("d.copy").display());
    let cases: [(Vec<String>, &str); 8] = [
        (
            vec![
                "--ram".into(),
                file("pc.ram"),
                "--ram".into(),
                file("pc.ram"),
            ],
            "--ram: pc.ram is given twice",
        ),
        (
            vec![
                "--ram".into(),
                file("pc.ram"),
                "--ram".into(),
                file("vga.vram"),
            ],
            "is already the output of another --ram or --device",
        ),
        (
            vec![
                "--ram".into(),
                file("pc.ram"),
                "--device".into(),
                format!("net0={}", directory.path().join("a.copy").display()),
            ],
            "is already the output of another --ram or --device",
        ),
        (vec!["--ram".into(), missing], "--ram pc.ram: no directory"),
        (vec!["--ram".into(), as_directory], "is a directory"),
        (
            vec![
                "--ram".into(),
                other,
                "--device".into(),
                device("net0"),
                "--device".into(),
                device("net0"),
            ],
            "--device: \"net0\" instance 0 is given twice",
        ),
        (
            vec![
                "--ram".into(),
                file("pc.ram"),
                "--channels".into(),
                "0".into(),
            ],
            "--channels",
        ),
        (
            vec![
                "--ram".into(),
                file("pc.ram"),
                "--device".into(),
                device("net0"),
                "--max-queued-device-bytes".into(),
                "4096".into(),
            ],
            "--max-queued-device-bytes 4096 is below one device-state chunk",
        ),
    ];
    for (extra, expected) in cases {
        let started = Instant::now();
        let output = multifd()
            .args(["recv", "--listen", &socket(directory.path())])
            .args(&extra)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            !directory.path().join("migration.sock").exists(),
            "{extra:?} listened"
        );
    }
}

/// A receive that fails leaves the files it would have replaced as they were, with no
/// partial file beside them.
#[test]
fn a_failed_recv_leaves_existing_outputs_untouched() {
    let directory = tempfile::tempdir().expect("temp dir");
    let (ram, vram) = (
        directory.path().join("ram.img"),
        directory.path().join("vram.img"),
    );
    image(&ram, 16, 3);
    image(&vram, 16, 4);
    let copy = directory.path().join("ram.copy");
    std::fs::write(&copy, b"precious").expect("existing output");
    // The source announces vga.vram too, which recv has no file for: it fails after
    // creating pc.ram's file.
    let recv = start_recv(directory.path(), &["--ram", &arg("pc.ram", &copy)]);
    let send = spawn(multifd().args([
        "send",
        "--to",
        &socket(directory.path()),
        "--ram",
        &arg("pc.ram", &ram),
        "--ram",
        &arg("vga.vram", &vram),
    ]));
    let (sent, received) = finish_pair(send, recv);
    assert!(!sent.status.success() && !received.status.success());
    assert_eq!(std::fs::read(&copy).expect("output"), b"precious");
    let leftovers: Vec<_> = std::fs::read_dir(directory.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .contains("multifd-partial")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `recv --ram` naming the very image a local `send` reads: the image is never truncated
/// under the sender, and ends up holding what it held.
#[test]
fn recv_into_the_file_send_is_reading_keeps_it_intact() {
    let directory = tempfile::tempdir().expect("temp dir");
    let ram = directory.path().join("ram.img");
    image(&ram, 256, 5);
    let original = std::fs::read(&ram).expect("image");
    let recv = start_recv(directory.path(), &["--ram", &arg("pc.ram", &ram)]);
    let send = spawn(multifd().args([
        "send",
        "--to",
        &socket(directory.path()),
        "--ram",
        &arg("pc.ram", &ram),
    ]));
    let (sent, received) = finish_pair(send, recv);
    assert_success(&sent, "send");
    assert_success(&received, "recv");
    assert!(std::fs::read(&ram).expect("image") == original);
}

/// An engine error is printed once: its message already holds its cause, which is not
/// repeated after it.
#[test]
fn an_error_and_its_cause_are_printed_once() {
    use std::io::Write;
    let directory = tempfile::tempdir().expect("temp dir");
    // A stray connection does not end recv's wait; its error ends the wait's timeout.
    let recv = start_recv(
        directory.path(),
        &[
            "--ram",
            &arg("pc.ram", &directory.path().join("ram.copy")),
            "--timeout",
            "1",
        ],
    );
    let mut stray =
        std::os::unix::net::UnixStream::connect(directory.path().join("migration.sock"))
            .expect("connect");
    stray
        .write_all(&0xdead_beef_u32.to_be_bytes())
        .expect("write");
    drop(stray);
    let output = finish(recv, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(stderr.matches("0xdeadbeef").count(), 1, "{stderr}");
}

/// An image file truncated by another process while `send` reads it: pages past its new
/// end would raise `SIGBUS`. `send` survives, refuses to declare completion, and both
/// ends exit 1 with an error naming the block; no process dies of a signal.
#[test]
fn an_image_truncated_during_the_send_is_an_error_not_a_signal() {
    let directory = tempfile::tempdir().expect("temp dir");
    let (ram, copy) = (
        directory.path().join("ram.img"),
        directory.path().join("ram.copy"),
    );
    image(&ram, 64 * 256, 3);
    let recv = start_recv(directory.path(), &["--ram", &arg("pc.ram", &copy)]);
    // 64 MiB at 32 MiB/s: the send is still reading the image two seconds in.
    let send = spawn(
        multifd()
            .args(["send", "--to", &socket(directory.path())])
            .args(["--ram", &arg("pc.ram", &ram)])
            .args(["--channels", "1", "--max-bandwidth", "33554432"]),
    );
    std::thread::sleep(Duration::from_millis(500));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ram)
        .expect("open the image")
        .set_len(1 << 20)
        .expect("truncate");
    let (sent, received) = finish_pair(send, recv);
    for (output, side) in [(&sent, "send"), (&received, "recv")] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{side}: {stderr}");
        assert!(
            stderr.contains("shrank to 1048576 bytes"),
            "{side}: {stderr}"
        );
    }
    assert!(!copy.exists(), "a failed recv leaves no output");
}

/// A destination disk too small for the announced memory is a clear error before the
/// migration starts, not a `SIGBUS` when a compressed page is written into the mapped
/// file. Runs `recv` in a private mount namespace with a 1 MiB tmpfs as its output
/// directory; skipped loudly where that is not allowed.
#[test]
fn a_full_destination_disk_is_an_error_not_a_signal() {
    let directory = tempfile::tempdir().expect("temp dir");
    let small = directory.path().join("small");
    std::fs::create_dir(&small).expect("mkdir");
    let probe = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=1m tmpfs {}",
            small.display()
        ))
        .output();
    if !probe.is_ok_and(|output| output.status.success()) {
        eprintln!("SKIPPED: no private mount namespace with tmpfs here (needs root and unshare)");
        return;
    }
    let ram = directory.path().join("ram.img");
    image(&ram, 1024, 7);
    let copy = small.join("ram.copy");
    let recv = spawn(
        Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o size=1m tmpfs {} && exec {} recv --listen {} --ram {}",
                small.display(),
                env!("CARGO_BIN_EXE_multifd"),
                socket(directory.path()),
                arg("pc.ram", &copy),
            )),
    );
    let path = directory.path().join("migration.sock");
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "recv never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let send = spawn(multifd().args([
        "send",
        "--to",
        &socket(directory.path()),
        "--compress",
        "zstd",
        "--ram",
        &arg("pc.ram", &ram),
    ]));
    let (sent, received) = finish_pair(send, recv);
    let stderr = String::from_utf8_lossy(&received.stderr);
    assert_eq!(received.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(!sent.status.success());
}

/// `send --integrity crc32c` moves an image byte for byte; `recv --integrity crc32c`
/// refuses a source without it.
#[test]
fn integrity_is_negotiated_from_the_command_line() {
    let (sent, received, equal) =
        migrate_with(&[], &["--integrity", "crc32c", "--compress", "lz4"]);
    assert_success(&sent, "send");
    assert_success(&received, "recv");
    assert!(equal);
    let (sent, received, _) = migrate_with(&["--integrity", "crc32c"], &[]);
    for output in [&sent, &received] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains("integrity"), "{stderr}");
    }
}

#[test]
fn send_and_recv_over_mutual_tls() {
    let certificates = tempfile::tempdir().expect("temp dir");
    multifd_cli::tls::generate_certificates(certificates.path()).expect("certificates");
    let tls_dir = certificates.path().to_str().expect("utf-8 path");
    let (sent, received, equal) = migrate_with(
        &["--tls-dir", tls_dir],
        &[
            "--tls-dir",
            tls_dir,
            "--tls-hostname",
            "localhost",
            "--channels",
            "4",
        ],
    );
    assert_success(&sent, "send");
    assert_success(&received, "recv");
    assert!(equal, "the copy differs");
}

#[test]
fn tls_on_one_end_only_is_a_one_line_error_on_both_ends() {
    let certificates = tempfile::tempdir().expect("temp dir");
    multifd_cli::tls::generate_certificates(certificates.path()).expect("certificates");
    let tls_dir = certificates.path().to_str().expect("utf-8 path");
    // recv drops the plaintext connection as a stray and reports it when its wait ends.
    let (sent, received, _) = migrate_with(&["--tls-dir", tls_dir, "--timeout", "2"], &[]);
    for (output, says) in [
        (
            &sent,
            "source control channel: TLS: the peer sent a TLS record",
        ),
        (
            &received,
            "destination listener: TLS: the peer is not speaking TLS",
        ),
    ] {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// Two memory images and a device file saved to a snapshot with `snapshot save`.
fn saved_snapshot(directory: &Path, extra: &[&str]) -> Value {
    image(&directory.join("ram.img"), 300, 1);
    image(&directory.join("vram.img"), 17, 9);
    let device: Vec<u8> = (0..10_000u32).map(|index| (index % 251) as u8).collect();
    std::fs::write(directory.join("nic.state"), device).expect("write device");
    let output = multifd()
        .args(["snapshot", "save", "--json", "--channels", "4"])
        .args(["--ram", &arg("pc.ram", &directory.join("ram.img"))])
        .args(["--ram", &arg("vga.vram", &directory.join("vram.img"))])
        .args([
            "--device",
            &arg("0000:00:05.0/vfio", &directory.join("nic.state")),
        ])
        .args(["--out", &directory.join("vm.snap").display().to_string()])
        .args(extra)
        .output()
        .expect("run");
    assert_success(&output, "snapshot save");
    serde_json::from_slice(&output.stdout).expect("json")
}

fn restore_snapshot(directory: &Path, extra: &[&str]) -> Output {
    multifd()
        .args(["snapshot", "restore", "--json"])
        .args(["--from", &directory.join("vm.snap").display().to_string()])
        .args(["--ram", &arg("pc.ram", &directory.join("ram.copy"))])
        .args(["--ram", &arg("vga.vram", &directory.join("vram.copy"))])
        .args([
            "--device",
            &arg("0000:00:05.0/vfio", &directory.join("nic.copy")),
        ])
        .args(extra)
        .output()
        .expect("run")
}

fn assert_restored(directory: &Path) {
    for (original, copy) in [
        ("ram.img", "ram.copy"),
        ("vram.img", "vram.copy"),
        ("nic.state", "nic.copy"),
    ] {
        assert!(
            std::fs::read(directory.join(original)).expect("read")
                == std::fs::read(directory.join(copy)).expect("read"),
            "{copy} differs from {original}"
        );
    }
}

#[test]
fn snapshot_save_and_restore_round_trip_with_json_stats() {
    let directory = tempfile::tempdir().expect("temp dir");
    let saved = saved_snapshot(directory.path(), &[]);
    assert_eq!(saved["status"], "completed");
    assert_eq!(saved["guest_bytes"], (300 + 17) * 4096);
    // Every third page is zero: a hole, not written.
    assert_eq!(saved["zero_pages"], 100 + 6);
    assert_eq!(saved["normal_pages"], 200 + 11);
    assert_eq!(saved["device_bytes"], 10_000);
    assert_eq!(saved["channels"], 4);
    assert!(saved["file_bytes"].as_u64().expect("file_bytes") > 0);
    assert!(saved["guest_gib_per_second"].as_f64().is_some());
    let output = restore_snapshot(directory.path(), &["--channels", "3", "--direct-io"]);
    assert_success(&output, "snapshot restore");
    let restored: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(restored["status"], "completed");
    assert_eq!(restored["side"], "destination");
    assert_eq!(restored["normal_pages"], 200 + 11);
    assert_restored(directory.path());
}

#[test]
fn snapshot_save_with_direct_io_and_lazy_restore() {
    let directory = tempfile::tempdir().expect("temp dir");
    saved_snapshot(directory.path(), &["--direct-io"]);
    let output = restore_snapshot(directory.path(), &["--lazy"]);
    assert_success(&output, "lazy snapshot restore");
    let restored: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(restored["mode"], "lazy");
    assert!(restored["memory_ready_seconds"].as_f64().is_some());
    assert_restored(directory.path());
}

#[test]
fn snapshot_restore_refuses_bad_outputs_and_bad_files() {
    let directory = tempfile::tempdir().expect("temp dir");
    saved_snapshot(directory.path(), &[]);
    let twice = restore_snapshot(
        directory.path(),
        &[
            "--ram",
            &arg("pc.ram", &directory.path().join("other.copy")),
        ],
    );
    assert!(!twice.status.success());
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("--ram: pc.ram is given twice"),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
    let same_path = restore_snapshot(
        directory.path(),
        &["--ram", &arg("extra", &directory.path().join("ram.copy"))],
    );
    assert!(String::from_utf8_lossy(&same_path.stderr)
        .contains("is already the output of another --ram or --device"));
    // A corrupted bitmap: refused, nothing left behind.
    let snapshot = directory.path().join("vm.snap");
    let mut bytes = std::fs::read(&snapshot).expect("read");
    let last_bitmap_byte = bytes.iter().take(1 << 20).rposition(|&byte| byte != 0);
    bytes[last_bitmap_byte.expect("a bitmap byte")] ^= 1;
    std::fs::write(&snapshot, bytes).expect("write");
    let corrupted = restore_snapshot(directory.path(), &[]);
    assert!(!corrupted.status.success());
    let stderr = String::from_utf8_lossy(&corrupted.stderr);
    assert!(
        stderr.contains("bitmap: CRC32C mismatch") && stderr.lines().count() == 1,
        "{stderr}"
    );
    let json: Value = serde_json::from_slice(&corrupted.stdout).unwrap_or(Value::Null);
    assert!(json.is_null() || json["status"] == "failed");
    let left: Vec<_> = std::fs::read_dir(directory.path())
        .expect("list")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".copy") || name.contains("multifd-partial"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn snapshot_save_refuses_to_overwrite_an_input() {
    let directory = tempfile::tempdir().expect("temp dir");
    let ram = directory.path().join("ram.img");
    image(&ram, 4, 1);
    let before = std::fs::read(&ram).expect("read");
    let output = multifd()
        .args(["snapshot", "save", "--ram", &arg("pc.ram", &ram)])
        .args(["--out", &ram.display().to_string()])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is also an input"));
    assert!(std::fs::read(&ram).expect("read") == before);
}
