//! A running VM's control socket: a Unix socket taking one JSON request per connection
//! and answering in JSON lines.
//!
//! - `{"request":"status"}` → `{"running":…,"passes":[…],"errors":[…],"vcpu_failures":[…],
//!   "arrival":…}` (`arrival`: how the VM got here, `null` for the one booted here).
//! - `{"request":"migrate","to":ADDRESS,"settings":{…}}` → `{"progress":LINE}` per round,
//!   then `{"completed":SUMMARY}` (the VM runs on the destination now and this process
//!   exits) or `{"failed":MESSAGE,"source_running":…}` (it keeps serving).
//! - `{"request":"snapshot","out":PATH,"precopy":{…}}` → `{"progress":LINE}` per round,
//!   then `{"completed":SUMMARY}` or `{"failed":…}`; the guest runs on here either way.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use multifd::{Address, KvmDirtyLogMode, SnapshotConfig};
use multifd_testvm::KvmVm;
use serde_json::{json, Value};

use super::MigrateSettings;
use crate::precopy::{self, PrecopyArgs};

/// How often the server looks for a connection (and its deadline).
pub const POLL: Duration = Duration::from_millis(50);
/// How long a client may take to send its request, and the server to answer a status.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a migration may go without a line: a round reports when it ends, and a
/// round of 3 GiB over a slow, capped link is well within it.
const MIGRATION_LINE_TIMEOUT: Duration = Duration::from_secs(300);

/// How [`Server::serve`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// The VM migrated away.
    MigratedAway,
    /// The deadline passed.
    Deadline,
}

/// A bound control socket; the socket file goes when it is dropped.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds `path`, replacing a stale socket nobody serves.
    pub fn bind(path: &Path) -> Result<Self> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!("control socket {} is in use", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("the control socket")?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Answers requests about `vm` until it migrated away or `deadline` passed.
    pub fn serve(&self, vm: &KvmVm, arrival: &Value, deadline: Option<Instant>) -> Result<Served> {
        loop {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Ok(Served::Deadline);
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if handle(&stream, vm, arrival) {
                        return Ok(Served::MigratedAway);
                    }
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
                Err(error) => return Err(error).context("accepting on the control socket"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one connection; true when the VM migrated away. A client that went away
/// mid-answer costs it the answer, nothing else.
fn handle(stream: &UnixStream, vm: &KvmVm, arrival: &Value) -> bool {
    let mut writer = stream;
    let request = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(anyhow::Error::from)
        .and_then(|()| read_json(&mut BufReader::new(stream)));
    let mut reply = |value: Value| {
        let _ = writeln!(writer, "{value}");
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            reply(json!({ "failed": format!("bad request: {error:#}") }));
            return false;
        }
    };
    match request["request"].as_str() {
        Some("status") => {
            let progress = vm.progress();
            reply(json!({
                "running": vm.is_running(),
                "passes": progress.passes,
                "errors": progress.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "vcpu_failures": vm.vcpu_failures(),
                "arrival": arrival,
            }));
            false
        }
        Some(kind @ ("migrate" | "snapshot")) => {
            let mut progress = |line| reply(json!({ "progress": line }));
            let done = if kind == "migrate" {
                migrate_here(vm, &request, &mut progress)
            } else {
                snapshot_here(vm, &request, &mut progress)
            };
            match done {
                Ok(summary) => {
                    reply(json!({ "completed": summary }));
                    // A migrated guest runs elsewhere now; a snapshot's runs on here.
                    kind == "migrate"
                }
                Err(error) => {
                    reply(json!({
                        "failed": crate::report::one_line(&error),
                        "source_running": vm.is_running(),
                    }));
                    false
                }
            }
        }
        _ => {
            reply(json!({ "failed": format!("unknown request {request}") }));
            false
        }
    }
}

/// Runs the source half of a migration of `vm` as `request` says.
fn migrate_here(vm: &KvmVm, request: &Value, progress: &mut dyn FnMut(String)) -> Result<Value> {
    let address: Address = request["to"]
        .as_str()
        .context("no address to migrate to")?
        .parse()?;
    let (source, precopy) = MigrateSettings::source_from_json(&request["settings"])?;
    let stats = multifd_testvm::send(
        vm,
        &address,
        &source,
        &precopy.config(),
        KvmDirtyLogMode::default(),
        &mut |update| {
            if let Some(line) = precopy::progress_line(update) {
                progress(line);
            }
        },
    )?;
    Ok(precopy::summary(&stats))
}

/// Saves a live snapshot of `vm` where `request` says; the guest runs on.
fn snapshot_here(vm: &KvmVm, request: &Value, progress: &mut dyn FnMut(String)) -> Result<Value> {
    let out = request["out"].as_str().context("no snapshot file")?;
    let precopy = PrecopyArgs::from_json(&request["precopy"])?;
    let stats = multifd_testvm::snapshot(
        vm,
        Path::new(out),
        &SnapshotConfig::default(),
        &precopy.config(),
        &mut |update| {
            if let Some(line) = precopy::progress_line(update) {
                progress(line);
            }
        },
    )?;
    Ok(precopy::summary(&stats))
}

fn read_json(reader: &mut impl BufRead) -> Result<Value> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("the connection closed");
    }
    Ok(serde_json::from_str(&line)?)
}

fn connect(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let stream = UnixStream::connect(path)
        .with_context(|| format!("cannot reach the VM's control socket {}", path.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    Ok(stream)
}

/// The VM's status (see the module documentation).
pub fn status(path: &Path) -> Result<Value> {
    let stream = connect(path, REQUEST_TIMEOUT)?;
    writeln!(&stream, "{}", json!({ "request": "status" }))?;
    let reply = read_json(&mut BufReader::new(&stream))
        .with_context(|| format!("no status from {}", path.display()))?;
    if let Some(error) = reply["failed"].as_str() {
        bail!("{error}");
    }
    Ok(reply)
}

/// Asks the VM at `path` to migrate to `to`; `progress` gets each round's line. Returns
/// the summary ([`precopy::summary`]) when the destination confirmed.
pub fn migrate(
    path: &Path,
    to: &Address,
    settings: &MigrateSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<Value> {
    let request =
        json!({ "request": "migrate", "to": to.to_string(), "settings": settings.to_json() });
    precopy_request(path, &request, "migration", progress)
}

/// Asks the VM at `path` for a live snapshot into `out` (a path the VM process can
/// write); returns the summary once the file is complete.
pub fn snapshot(
    path: &Path,
    out: &Path,
    precopy: &PrecopyArgs,
    progress: &mut dyn FnMut(&str),
) -> Result<Value> {
    let request = json!({
        "request": "snapshot",
        "out": out.display().to_string(),
        "precopy": precopy.to_json(),
    });
    precopy_request(path, &request, "snapshot", progress)
}

/// Sends `request`, which runs the precopy driver (`what` names it), and follows its
/// progress lines to the end.
fn precopy_request(
    path: &Path,
    request: &Value,
    what: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Value> {
    let stream = connect(path, MIGRATION_LINE_TIMEOUT)?;
    writeln!(&stream, "{request}")?;
    let mut reader = BufReader::new(&stream);
    loop {
        let mut reply = read_json(&mut reader)
            .with_context(|| format!("the VM at {} stopped answering", path.display()))?;
        if let Some(line) = reply["progress"].as_str() {
            progress(line);
        } else if let Some(error) = reply["failed"].as_str() {
            bail!(
                "{what} failed: {error} (the guest {} on the source)",
                if reply["source_running"].as_bool() == Some(true) {
                    "keeps running"
                } else {
                    "is stopped"
                }
            );
        } else {
            return Ok(reply["completed"].take());
        }
    }
}
