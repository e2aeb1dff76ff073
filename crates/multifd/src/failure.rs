//! First-error-wins shutdown shared by every thread of one migration.
//!
//! The first thread to fail records its error; every registered hook then runs once, in
//! registration order (notify the peer, wake condition variables, shut sockets down), so
//! each thread blocked anywhere wakes promptly and stops. Later errors are consequences
//! of the first and are dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Error, Side};

type Hook = Box<dyn Fn(&str) + Send + Sync>;

pub(crate) struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<Error>>,
    hooks: Mutex<Vec<Hook>>,
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
            hooks: Mutex::new(Vec::new()),
        })
    }

    /// Registers a hook to run, with the first error's message, when the migration fails;
    /// runs it at once if it already has.
    pub(crate) fn on_failure(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        let mut hooks = lock(&self.hooks);
        if self.is_failed() {
            let message = lock(&self.first)
                .as_ref()
                .map(Error::to_string)
                .unwrap_or_default();
            drop(hooks);
            hook(&message);
            return;
        }
        hooks.push(Box::new(hook));
    }

    /// Records `error` if it is the first, then runs the hooks; later errors are dropped.
    pub(crate) fn fail(&self, error: Error) {
        let message = error.to_string();
        {
            let mut first = lock(&self.first);
            if self.failed.swap(true, Ordering::SeqCst) {
                tracing::debug!("after the first failure: {message}");
                return;
            }
            tracing::warn!("migration failed: {message}");
            *first = Some(error);
        }
        let hooks = std::mem::take(&mut *lock(&self.hooks));
        for hook in &hooks {
            hook(&message);
        }
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The first error, for the caller; `fallback` if none was recorded.
    pub(crate) fn take_or(&self, fallback: Error) -> Error {
        lock(&self.first).take().unwrap_or(fallback)
    }

    /// Records `error` (if first) and returns the first error.
    pub(crate) fn fail_and_take(&self, error: Error) -> Error {
        let side = side_of(&error);
        self.fail(error);
        self.take_or(Error::Internal {
            side,
            what: "the first error was already taken".into(),
        })
    }
}

fn side_of(error: &Error) -> Side {
    match error {
        Error::Io { side, .. }
        | Error::Closed { side, .. }
        | Error::Wire { side, .. }
        | Error::Protocol { side, .. }
        | Error::Rejected { side, .. }
        | Error::PeerFailed { side, .. }
        | Error::Timeout { side, .. }
        | Error::Cancelled { side }
        | Error::Internal { side, .. } => *side,
        Error::Config(_) | Error::Address { .. } | Error::PageOutOfRange { .. } => Side::Source,
    }
}

/// Locks ignoring poison: a panicking migration thread is reported through `join`, and the
/// state behind these locks stays consistent across a panic (plain flags and lists).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
