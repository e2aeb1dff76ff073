//! QEMU processes for the baselines: started with their stderr in a file and killed on
//! drop, driven over QMP (JSON lines on a Unix socket), every step with a time limit.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tempfile::TempDir;

/// The QEMU binary that is run.
pub const QEMU: &str = "qemu-system-x86_64";
/// How long each QEMU may take to open its QMP socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one QMP command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a QEMU is polled: for its QMP socket at startup, for `query-migrate`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How much of a QEMU's stderr an error message quotes, at most.
const STDERR_TAIL: usize = 4096;

/// The first line of `qemu-system-x86_64 --version`, or `None` if it is not installed.
pub fn qemu_version() -> Result<Option<String>> {
    let output = match Command::new(QEMU)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("running {QEMU} --version")),
    };
    ensure!(
        output.status.success(),
        "{QEMU} --version failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().next().unwrap_or_default().trim();
    ensure!(!line.is_empty(), "{QEMU} --version printed nothing");
    Ok(Some(line.to_owned()))
}

/// `path` as a QEMU option value, with commas doubled.
pub fn option_path(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .ok_or_else(|| anyhow!("{} is not valid UTF-8", path.display()))?;
    Ok(text.replace(',', ",,"))
}

/// Arguments for a paused PC without devices whose `mib` MiB of RAM is `backend` (a
/// `-object` memory backend with id `mem`), on KVM, or TCG where KVM is missing.
pub fn memory_only_guest(mib: u64, backend: &str) -> Vec<String> {
    [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-accel",
        "kvm",
        "-accel",
        "tcg",
        "-machine",
        "pc,memory-backend=mem",
        "-m",
        &format!("{mib}M"),
        "-object",
        backend,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A memory backend of `mib` MiB that maps `image` private and read-only: QEMU's guest
/// RAM is the image, which it never changes.
pub fn image_backend(image: &Path, mib: u64) -> Result<String> {
    Ok(format!(
        "memory-backend-file,id=mem,size={mib}M,mem-path={},share=off,readonly=on",
        option_path(image)?
    ))
}

/// The TCP port in a destination's `query-migrate` reply after `migrate-incoming`.
fn listening_port(reply: &Value) -> Result<u16> {
    let port = &reply["socket-address"][0]["port"];
    let port = match port {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => None,
    };
    port.ok_or_else(|| anyhow!("no listening port in destination query-migrate: {reply}"))
}

/// A `u64` field of a JSON object, or an error naming it.
pub fn u64_field(value: &Value, pointer: &str) -> Result<u64> {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("query-migrate has no {pointer}: {value}"))
}

/// A fresh directory for the sockets, logs and guest images, removed with its contents on
/// drop.
pub fn work_directory() -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix("multifd-bench-qemu-")
        .tempdir()
        .context("creating the QEMU work directory")
}

/// A running QEMU with its stderr going to a file; killed on drop.
struct Process {
    role: &'static str,
    child: Child,
    stderr: PathBuf,
}

impl Process {
    fn spawn(role: &'static str, args: &[String], workdir: &Path) -> Result<Self> {
        let stderr = workdir.join(format!("{role}.stderr"));
        let log =
            File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let child = Command::new(QEMU)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the {role} {QEMU}"))?;
        Ok(Self {
            role,
            child,
            stderr,
        })
    }

    /// The end of what this QEMU wrote to stderr so far.
    fn stderr_tail(&self) -> String {
        let text = fs::read(&self.stderr)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let text = text.trim();
        let mut start = text.len().saturating_sub(STDERR_TAIL);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_owned()
    }

    /// `error` (flattened) followed by this QEMU's state and stderr.
    fn explain(&mut self, error: &anyhow::Error) -> anyhow::Error {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            Ok(None) => "still running".to_owned(),
            Err(wait_error) => format!("state unknown: {wait_error}"),
        };
        let stderr = self.stderr_tail();
        let stderr = if stderr.is_empty() {
            "(empty)"
        } else {
            &stderr
        };
        anyhow!(
            "{error:#}\n{} QEMU (pid {}) {state}; its stderr:\n{stderr}",
            self.role,
            self.child.id()
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Best effort: the process may already have exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection: one JSON object per line each way.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to a starting QEMU's QMP socket and leaves capabilities negotiation.
    fn connect(socket: &Path, process: &mut Process) -> Result<Self> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let stream = loop {
            if let Some(status) = process.child.try_wait()? {
                bail!("QEMU exited during startup ({status})");
            }
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(error) if Instant::now() >= deadline => {
                    return Err(error).with_context(|| {
                        format!(
                            "QMP socket {} not ready after {STARTUP_TIMEOUT:?}",
                            socket.display()
                        )
                    })
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read_message().context("reading the QMP greeting")?;
        ensure!(
            greeting.get("QMP").is_some(),
            "unexpected QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value, skipping events.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut message = json!({ "execute": command });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        writeln!(self.writer, "{message}").with_context(|| format!("sending QMP {command}"))?;
        loop {
            let reply = self
                .read_message()
                .with_context(|| format!("waiting for the reply to QMP {command}"))?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                bail!(
                    "QMP {command} failed: {}: {}",
                    error["class"].as_str().unwrap_or("?"),
                    error["desc"].as_str().unwrap_or("?")
                );
            }
            bail!("unexpected reply to QMP {command}: {reply}");
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message {line:?}"))
    }
}

/// One QEMU process and its QMP connection.
pub struct Qemu {
    process: Process,
    qmp: Qmp,
}

impl Qemu {
    /// Starts `qemu-system-x86_64` with `args` and a QMP socket in `workdir`, and
    /// connects to it; its stderr goes to `<role>.stderr` there.
    pub fn launch(role: &'static str, args: &[String], workdir: &Path) -> Result<Self> {
        let socket = workdir.join(format!("{role}.qmp"));
        let mut all_args = args.to_vec();
        all_args.push("-qmp".to_owned());
        all_args.push(format!("unix:{},server=on,wait=off", option_path(&socket)?));
        let mut process = Process::spawn(role, &all_args, workdir)?;
        match Qmp::connect(&socket, &mut process) {
            Ok(qmp) => Ok(Self { process, qmp }),
            Err(error) => Err(process.explain(&error)),
        }
    }

    /// Runs a QMP command; an error carries this QEMU's stderr.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.qmp
            .execute(command, arguments)
            .map_err(|error| self.process.explain(&error))
    }

    /// Checks with `query-migrate-parameters` that QEMU took every one of `wanted`.
    fn check_parameters(&mut self, wanted: &Value) -> Result<()> {
        let actual = self.execute("query-migrate-parameters", None)?;
        let wanted = wanted
            .as_object()
            .ok_or_else(|| anyhow!("migration parameters are not an object: {wanted}"))?;
        for (name, value) in wanted {
            if actual.get(name) != Some(value) {
                let error = anyhow!(
                    "the {} QEMU did not apply {name}={value}: it has {}",
                    self.process.role,
                    actual.get(name).unwrap_or(&Value::Null)
                );
                return Err(self.process.explain(&error));
            }
        }
        Ok(())
    }

    /// The `status` of this side's `query-migrate`, with the whole reply.
    pub fn migration_status(&mut self) -> Result<(String, Value)> {
        let reply = self.execute("query-migrate", None)?;
        let status = reply["status"].as_str().unwrap_or_default().to_owned();
        Ok((status, reply))
    }

    /// Sets migration capabilities and `migrate-set-parameters` arguments, then checks
    /// that QEMU took every parameter.
    pub fn configure_migration(
        &mut self,
        capabilities: &[(&str, bool)],
        parameters: &Value,
    ) -> Result<()> {
        let capabilities: Vec<Value> = capabilities
            .iter()
            .map(|&(capability, state)| json!({ "capability": capability, "state": state }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": capabilities })),
        )?;
        self.execute("migrate-set-parameters", Some(parameters.clone()))?;
        self.check_parameters(parameters)
    }

    /// Makes a destination started with `-incoming defer` listen on a fresh loopback port,
    /// and returns the port.
    pub fn listen_for_migration(&mut self) -> Result<u16> {
        self.execute(
            "migrate-incoming",
            Some(json!({ "uri": "tcp:127.0.0.1:0" })),
        )?;
        let (_, incoming) = self.migration_status()?;
        listening_port(&incoming)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// `error` (flattened) followed by this QEMU's state and stderr.
    pub fn explain(&mut self, error: &anyhow::Error) -> anyhow::Error {
        self.process.explain(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_from_string_or_number() -> Result<()> {
        let reply = json!({ "socket-address": [{ "port": "39455", "type": "inet" }] });
        assert_eq!(listening_port(&reply)?, 39455);
        let reply = json!({ "socket-address": [{ "port": 4444 }] });
        assert_eq!(listening_port(&reply)?, 4444);
        assert!(listening_port(&json!({})).is_err());
        Ok(())
    }

    #[test]
    fn commas_are_doubled() -> Result<()> {
        assert_eq!(option_path(Path::new("/tmp/a,b"))?, "/tmp/a,,b");
        Ok(())
    }
}
