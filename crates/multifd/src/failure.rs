//! First-error-wins shutdown shared by every thread of one migration.
//!
//! The first thread to fail records its error; every registered hook then runs once, in
//! registration order (notify the peer, wake condition variables, shut sockets down), so
//! each thread blocked anywhere wakes promptly and stops. Later errors are consequences
//! of the first and are dropped.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::Error;
use crate::ids::Side;
use crate::sync::lock;

/// How long a side that saw only a broken connection waits for the peer's own report of
/// the failure (`Abort` or `Failed` on the control channel), which names the real cause,
/// before blaming the connection. The peer sends its report before it closes anything, so
/// on a live link the report is at most one round trip behind the break; a second covers
/// a loaded host without making a real break noticeably slower to report.
pub(crate) const PEER_REASON_GRACE: Duration = Duration::from_secs(1);

type Hook = Box<dyn Fn(&str) + Send + Sync>;

pub(crate) struct Failure {
    failed: AtomicBool,
    /// The first error, until a caller takes it to report it.
    first: Mutex<Option<Error>>,
    /// The first error's message, for hooks registered after the failure.
    message: OnceLock<String>,
    hooks: Mutex<Vec<Hook>>,
    /// Signalled (under `hooks`) when the migration fails.
    failed_signal: Condvar,
}

impl std::fmt::Debug for Failure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Failure")
            .field("failed", &self.is_failed())
            .finish()
    }
}

impl Failure {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            failed: AtomicBool::new(false),
            first: Mutex::new(None),
            message: OnceLock::new(),
            hooks: Mutex::new(Vec::new()),
            failed_signal: Condvar::new(),
        })
    }

    /// Registers a hook to run, with the first error's message, when the migration fails;
    /// runs it at once if it already has.
    pub(crate) fn on_failure(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        let mut hooks = lock(&self.hooks);
        if let Some(message) = self.message.get() {
            drop(hooks);
            hook(message);
            return;
        }
        hooks.push(Box::new(hook));
    }

    /// Records `error` if it is the first, then runs the hooks; later errors are dropped.
    pub(crate) fn fail(&self, error: Error) {
        if let Ok(error) = self.claim(error) {
            *lock(&self.first) = Some(error);
            self.run_hooks();
        }
    }

    /// Fails the migration with `error` unless it already failed, and returns the error
    /// to report: the first one, or `error` itself if the first was already handed out.
    pub(crate) fn first_error(&self, error: Error) -> Error {
        match self.claim(error) {
            Ok(error) => {
                self.run_hooks();
                error
            }
            Err(later) => lock(&self.first).take().unwrap_or(later),
        }
    }

    /// Waits up to `timeout` for the migration to fail; returns whether it has.
    pub(crate) fn wait_for_failure(&self, timeout: Duration) -> bool {
        let hooks = lock(&self.hooks);
        let _hooks = self
            .failed_signal
            .wait_timeout_while(hooks, timeout, |_| !self.is_failed())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.is_failed()
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// `Ok(error)` if it is the first (its message recorded), `Err(error)` if another was.
    fn claim(&self, error: Error) -> Result<Error, Error> {
        let message = error.to_string();
        let hooks = lock(&self.hooks);
        if self.failed.swap(true, Ordering::SeqCst) {
            tracing::debug!("after the first failure: {message}");
            return Err(error);
        }
        tracing::warn!("migration failed: {message}");
        // Set under the hooks lock, so `on_failure` either queues a hook or sees this.
        let _ = self.message.set(message);
        self.failed_signal.notify_all();
        drop(hooks);
        Ok(error)
    }

    fn run_hooks(&self) {
        let message = self.message.get().cloned().unwrap_or_default();
        let hooks = std::mem::take(&mut *lock(&self.hooks));
        for hook in &hooks {
            hook(&message);
        }
    }
}

impl Failure {
    /// Starts a migration thread named `name` running `body`. A panic in it (a bug) fails
    /// the migration at once with an internal error naming the thread, so the other
    /// threads stop instead of waiting for work the dead one will never do.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        side: Side,
        name: &str,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<JoinHandle<()>, Error> {
        let failure = Arc::clone(self);
        let panicked = format!("thread {name} panicked");
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if panic::catch_unwind(AssertUnwindSafe(body)).is_err() {
                    failure.fail(Error::Internal {
                        side,
                        what: panicked,
                    });
                }
            })
            .map_err(|error| Error::Internal {
                side,
                what: format!("cannot spawn thread {name}: {error}"),
            })
    }
}

/// Waits for every thread in `threads` to end. Threads started by [`Failure::spawn`]
/// report their own panics when they happen, so a join has nothing left to report.
pub(crate) fn join_threads(threads: impl IntoIterator<Item = JoinHandle<()>>) {
    for thread in threads {
        let _ = thread.join();
    }
}

/// Stops a running migration from another thread.
#[derive(Clone)]
pub struct CancelHandle {
    pub(crate) failure: Arc<Failure>,
    pub(crate) side: Side,
}

impl CancelHandle {
    /// Fails the migration with [`Error::Cancelled`]; every thread stops and the peer is
    /// told. Does nothing if the migration already ended.
    pub fn cancel(&self) {
        self.failure.fail(Error::Cancelled { side: self.side });
    }
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CancelHandle")
            .field("side", &self.side)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_fails_the_migration_at_once() {
        let failure = Failure::new();
        let thread = failure
            .spawn(Side::Destination, "multifd-test", || panic!("a bug"))
            .expect("spawn");
        // Without the guard nothing would fail the migration until someone joined.
        assert!(failure.wait_for_failure(Duration::from_secs(10)));
        join_threads([thread]);
        let error = failure.first_error(Error::Cancelled {
            side: Side::Destination,
        });
        assert!(
            matches!(&error, Error::Internal { side: Side::Destination, what }
                if what == "thread multifd-test panicked"),
            "{error}"
        );
    }
}
