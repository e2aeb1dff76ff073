//! vCPU threads and how the VMM stops, throttles and resumes them.
//!
//! Each vCPU runs `KVM_RUN` in a loop on its own thread and handles the exits itself:
//! port I/O goes to the serial port ([`crate::serial`]), `HLT` parks the vCPU for good
//! (the guest only halts after reporting an error or after its last pass, with
//! interrupts off: there is no irqchip to wake it), anything else is recorded as a
//! failure and parks it too.
//!
//! **Stopping.** [`RunControl::stop`] sets `paused` and kicks every vCPU thread with a
//! real-time signal whose handler does nothing: a thread inside `KVM_RUN` returns with
//! `EINTR`. A signal that lands just before a thread enters `KVM_RUN` is lost, so the
//! kick repeats every [`KICK_INTERVAL`] until every thread has parked, at most
//! [`STOP_TIMEOUT`]. A thread that left `KVM_RUN` on port I/O first re-enters it once with
//! `immediate_exit` set: KVM completes the instruction (advances RIP, stores an `IN`'s
//! value) and returns at once, so the saved state never repeats or loses an I/O.
//! The VMM's own housekeeping thread (the frame buffer's redraws) parks with the vCPUs,
//! so nothing changes guest-visible state while the VM is stopped.
//!
//! **Throttling** (auto-converge). With a throttle of `p`%, a vCPU that has run for
//! [`SLICE`] sleeps `SLICE × p / (100 − p)` before running again; the housekeeping thread
//! kicks the vCPUs every [`SLICE`] while throttled, so a guest that rarely exits is cut
//! into slices too. A stop wakes a sleeping vCPU at once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::serial::Serial;
use crate::Error;

/// How long [`RunControl::stop`] waits for every vCPU to park: a vCPU leaves `KVM_RUN`
/// within microseconds of a kick, so this bound only matters when something is broken
/// (a thread stuck outside the VMM's control), which then fails the stop cleanly.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an unparked vCPU is kicked again: short enough that a lost signal costs
/// little downtime, long enough not to flood threads that are already on their way.
pub const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// The throttle's time slice: 10 ms, QEMU's, fine-grained enough that a throttled guest
/// still looks steady over a migration round.
pub const SLICE: Duration = Duration::from_millis(10);

/// The kick signal's handler: nothing; its only effect is to interrupt `KVM_RUN`.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kick signal, with its handler installed (once per process).
fn kick_signal() -> Result<libc::c_int, Error> {
    static INSTALLED: OnceLock<Result<libc::c_int, i32>> = OnceLock::new();
    let installed = *INSTALLED.get_or_init(|| {
        register_signal_handler(SIGRTMIN(), on_kick)
            .map(|()| SIGRTMIN())
            .map_err(|error| error.errno())
    });
    installed.map_err(|errno| Error::Thread(std::io::Error::from_raw_os_error(errno)))
}

/// What the threads and the control share.
struct RunState {
    paused: bool,
    quit: bool,
    /// The VM's memory was handed over (a local migration): it never runs again.
    retired: bool,
    throttle: u8,
    /// Threads (vCPUs and housekeeping) parked.
    parked: usize,
    /// vCPUs that halted (or failed) and stay parked.
    halted: Vec<bool>,
    /// What went wrong on vCPU threads.
    failures: Vec<String>,
    /// The vCPU threads, to kick; valid while `quit` is false (the VM joins them only
    /// after setting it, and kicks happen under this lock).
    threads: Vec<libc::pthread_t>,
}

/// Stops, throttles and resumes a VM's threads.
pub(crate) struct RunControl {
    state: Mutex<RunState>,
    changed: Condvar,
    /// vCPU threads plus the housekeeping thread.
    participants: usize,
    signal: libc::c_int,
}

impl RunControl {
    /// A control for `vcpus` vCPU threads and one housekeeping thread, paused or not.
    pub(crate) fn new(vcpus: usize, paused: bool) -> Result<Self, Error> {
        Ok(Self {
            state: Mutex::new(RunState {
                paused,
                quit: false,
                retired: false,
                throttle: 0,
                parked: 0,
                halted: vec![false; vcpus],
                failures: Vec::new(),
                threads: Vec::new(),
            }),
            changed: Condvar::new(),
            participants: vcpus + 1,
            signal: kick_signal()?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, RunState>,
        timeout: Duration,
    ) -> MutexGuard<'a, RunState> {
        self.changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, RunState>) -> MutexGuard<'a, RunState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a vCPU thread to kick.
    pub(crate) fn add_thread(&self, thread: libc::pthread_t) {
        self.lock().threads.push(thread);
    }

    fn kick(&self, state: &RunState) {
        if state.quit {
            return;
        }
        for &thread in &state.threads {
            // SAFETY: the thread is not joined while `quit` is false (checked above, under
            // the lock the VM takes to set it before joining), so the handle is valid;
            // the signal's handler is installed and does nothing.
            unsafe { libc::pthread_kill(thread, self.signal) };
        }
    }

    /// Kicks one thread that the caller has not joined yet (shutting down).
    pub(crate) fn kick_thread<T>(&self, thread: &std::thread::JoinHandle<T>) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the thread is not joined (the caller holds its handle), so its pthread
        // handle is valid; the signal's handler is installed and does nothing.
        unsafe { libc::pthread_kill(thread.as_pthread_t(), self.signal) };
    }

    /// Stops every vCPU and the housekeeping thread; returns once all are parked.
    pub(crate) fn stop(&self) -> Result<(), Error> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut state = self.lock();
        if state.quit {
            return Err(Error::Timeout("the VM is shutting down".into()));
        }
        state.paused = true;
        self.changed.notify_all();
        while state.parked < self.participants {
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "only {} of {} VM threads stopped within {STOP_TIMEOUT:?}",
                    state.parked, self.participants
                )));
            }
            self.kick(&state);
            state = self.wait_timeout(state, KICK_INTERVAL);
        }
        Ok(())
    }

    /// Lets every thread run again, unthrottled, unless the VM is retired.
    pub(crate) fn resume(&self) {
        let mut state = self.lock();
        if state.retired {
            return;
        }
        state.paused = false;
        state.throttle = 0;
        self.changed.notify_all();
    }

    /// Keeps the VM stopped for good: [`RunControl::resume`] does nothing any more.
    pub(crate) fn retire(&self) {
        self.lock().retired = true;
    }

    pub(crate) fn throttle(&self, percent: u8) {
        self.lock().throttle = percent.min(99);
        self.changed.notify_all();
    }

    pub(crate) fn is_running(&self) -> bool {
        !self.lock().paused
    }

    pub(crate) fn failures(&self) -> Vec<String> {
        self.lock().failures.clone()
    }

    pub(crate) fn halted(&self) -> Vec<bool> {
        self.lock().halted.clone()
    }

    /// Tells every thread to exit; after this no thread is kicked.
    pub(crate) fn quit(&self) {
        self.lock().quit = true;
        self.changed.notify_all();
    }

    fn halt(&self, vcpu: usize, failure: Option<String>) {
        let mut state = self.lock();
        state.halted[vcpu] = true;
        state.failures.extend(failure);
    }

    /// Parks the calling thread while the VM is paused (or `halted`); `before` runs
    /// before it counts as parked. Returns false when the VM quits.
    fn park_if_paused(&self, halted: impl Fn(&RunState) -> bool, before: impl FnOnce()) -> bool {
        let state = self.lock();
        if state.quit {
            return false;
        }
        if !state.paused && !halted(&state) {
            return true;
        }
        drop(state);
        before();
        let mut state = self.lock();
        state.parked += 1;
        self.changed.notify_all();
        while !state.quit && (state.paused || halted(&state)) {
            state = self.wait(state);
        }
        state.parked -= 1;
        !state.quit
    }

    /// Sleeps `duration` unless the VM is paused or quits first.
    fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        let mut state = self.lock();
        while !state.paused && !state.quit {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self.wait_timeout(state, deadline - now);
        }
    }

    /// One housekeeping tick: parks while paused, kicks throttled vCPUs, then waits
    /// `tick`. Returns false when the VM quits; true when the caller may act (not paused).
    pub(crate) fn housekeeping_tick(&self, tick: Duration) -> bool {
        if !self.park_if_paused(|_| false, || {}) {
            return false;
        }
        let mut state = self.lock();
        if state.throttle > 0 {
            self.kick(&state);
        }
        state = self.wait_timeout(state, tick);
        !state.quit
    }

    /// Whether the VM is paused now (the housekeeping thread then parks before acting).
    pub(crate) fn paused(&self) -> bool {
        self.lock().paused
    }
}

/// A vCPU thread's body: runs `vcpu` until the VM quits.
pub(crate) fn run_vcpu(
    index: usize,
    vcpu: &Mutex<VcpuFd>,
    control: &Arc<RunControl>,
    serial: &Serial,
) {
    let lock = || vcpu.lock().unwrap_or_else(PoisonError::into_inner);
    let mut pending_io = false;
    let mut slice_start = Instant::now();
    loop {
        let parked_before = Instant::now();
        let go_on = control.park_if_paused(
            |state| state.halted[index],
            || {
                if std::mem::take(&mut pending_io) {
                    finish_io(&mut lock());
                }
            },
        );
        if !go_on {
            return;
        }
        // After a pause the throttle's time slice starts afresh.
        if parked_before.elapsed() > SLICE {
            slice_start = Instant::now();
        }
        let throttle = control.lock().throttle;
        if throttle > 0 && slice_start.elapsed() >= SLICE {
            let throttle = u32::from(throttle);
            control.sleep(SLICE * throttle / (100 - throttle));
            slice_start = Instant::now();
            continue;
        }
        let mut fd = lock();
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                for &byte in data {
                    serial.write(index, port, byte);
                }
                pending_io = true;
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = Serial::read(port);
                }
                pending_io = true;
            }
            Ok(VcpuExit::Hlt) => control.halt(index, None),
            Ok(other) => {
                control.halt(
                    index,
                    Some(format!("vCPU {index}: unexpected exit {other:?}")),
                );
            }
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {}
            Err(error) => control.halt(index, Some(format!("vCPU {index}: KVM_RUN: {error}"))),
        }
    }
}

/// Completes a pending port I/O without running guest code (see the module docs).
fn finish_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    // EINTR is the expected result: KVM completed the I/O, then saw immediate_exit.
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}
