//! `multifd vm` processes started by this one (`vm pingpong`, `demo`): this same binary,
//! its stdout read line by line (JSON events) with a timeout, killed if still running
//! when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How often [`ChildVm::wait`] looks whether the process ended.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// A `multifd vm ...` child process.
pub struct ChildVm {
    child: Child,
    lines: Receiver<String>,
    what: String,
}

impl ChildVm {
    /// Starts `multifd vm ARGS`; its stderr is this process's.
    pub fn spawn(what: &str, args: &[String]) -> Result<Self> {
        let program = std::env::current_exe().context("finding the multifd binary")?;
        let mut child = Command::new(program)
            .arg("vm")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {what}"))?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let (sender, lines) = mpsc::channel();
        // Ends at the child's end of stdout.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            what: what.to_owned(),
        })
    }

    /// The next JSON event the process printed, which must be `name`, waiting at most
    /// `timeout`.
    pub fn event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => match serde_json::from_str::<Value>(&line) {
                Ok(event) if event["event"] == name => Ok(event),
                _ => bail!("the {} printed {line:?}, not the {name:?} event", self.what),
            },
            Err(RecvTimeoutError::Timeout) => {
                bail!("the {} printed nothing for {timeout:?}", self.what)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait(timeout)?;
                bail!("the {} exited ({status})", self.what)
            }
        }
    }

    /// Waits at most `timeout` for the process to end.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                bail!("the {} still runs after {timeout:?}", self.what);
            }
            thread::sleep(EXIT_POLL);
        }
    }

    /// Waits at most `timeout` for the process to end and succeed.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<()> {
        let status = self.wait(timeout)?;
        if !status.success() {
            bail!("the {} failed ({status})", self.what);
        }
        Ok(())
    }
}

impl Drop for ChildVm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
