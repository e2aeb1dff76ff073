//! The destination side of device state: each payload is read from the socket once,
//! straight into a pooled buffer that is queued per device ([`Reassembler`]) and then lent
//! to the device's load thread: no further copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use multifd_wire::DeviceStateChunkHeader;

use super::reassembler::{Reassembler, ReassemblyError, CHUNK_OVERHEAD};
use super::LoadDevice;
use crate::error::{Error, Violation};
use crate::failure::{join_threads, Failure};
use crate::ids::{Link, Side};
use crate::stats::DeviceCounters;
use crate::sync::{lock, wait};

/// Payload buffers recycled between the receive threads and the load threads.
#[derive(Debug)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Buffers kept at most: one per channel being filled and one per device being
    /// loaded is what the steady state needs; more would only hold memory.
    keep: usize,
}

impl BufferPool {
    /// A buffer of `length` bytes; a recycled one keeps its length, so reusing it for a
    /// chunk of the same size costs no zeroing.
    fn take(&self, length: usize) -> Vec<u8> {
        let mut buffer = lock(&self.free).pop().unwrap_or_default();
        buffer.resize(length, 0);
        buffer
    }

    fn give_back(&self, buffer: Vec<u8>) {
        let mut free = lock(&self.free);
        if free.len() < self.keep {
            free.push(buffer);
        }
    }
}

/// What a chunk broke in `stream`, as the violation naming its device.
fn violation(stream: &DeviceStream, error: ReassemblyError) -> Violation {
    let device = stream.counters.id.clone();
    match error {
        ReassemblyError::Duplicate { idx } => Violation::DuplicateChunk { device, idx },
        ReassemblyError::AfterConfig { idx, config_idx } => Violation::ChunkAfterConfig {
            device,
            idx,
            config_idx,
        },
        ReassemblyError::SecondConfig { idx, config_idx } => Violation::SecondConfigChunk {
            device,
            idx,
            config_idx,
        },
        ReassemblyError::QueueFull { queued, cap } => Violation::DeviceQueueFull {
            device,
            queued,
            cap,
        },
    }
}

/// One destination device: its reassembler and what its load thread waits on.
struct DeviceStream {
    counters: Arc<DeviceCounters>,
    state: Mutex<StreamState>,
    ready: Condvar,
}

struct StreamState {
    chunks: Reassembler<Vec<u8>>,
    /// Bytes reserved for chunks being read from the sockets (payload plus bookkeeping),
    /// counted against the cap with the queued ones before their buffers exist.
    in_flight: u64,
    /// The source completed: nothing more will arrive.
    input_done: bool,
    failed: bool,
}

/// The destination's devices: a reassembler and a load thread each.
pub(crate) struct DeviceLoaders {
    streams: Vec<Arc<DeviceStream>>,
    pool: Arc<BufferPool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Payload bytes queued over all devices now, and the most ever.
    queued: AtomicU64,
    peak_queued: Arc<AtomicU64>,
}

impl DeviceLoaders {
    /// Starts one load thread per device; each device's queue holds at most `cap` bytes.
    pub(crate) fn start(
        devices: Vec<(Arc<DeviceCounters>, Box<dyn LoadDevice>)>,
        cap: u64,
        channels: u8,
        peak_queued: Arc<AtomicU64>,
        failure: &Arc<Failure>,
    ) -> Result<Arc<Self>, Error> {
        let loaders = Arc::new(Self {
            streams: devices
                .iter()
                .map(|(counters, _)| {
                    Arc::new(DeviceStream {
                        counters: Arc::clone(counters),
                        state: Mutex::new(StreamState {
                            chunks: Reassembler::new(cap),
                            in_flight: 0,
                            input_done: false,
                            failed: false,
                        }),
                        ready: Condvar::new(),
                    })
                })
                .collect(),
            pool: Arc::new(BufferPool {
                free: Mutex::new(Vec::new()),
                keep: usize::from(channels) + devices.len(),
            }),
            threads: Mutex::new(Vec::new()),
            queued: AtomicU64::new(0),
            peak_queued,
        });
        let waker = Arc::clone(&loaders);
        failure.on_failure(move |_| waker.stop_all());
        for (stream, (_, device)) in loaders.streams.iter().zip(devices) {
            let stream = Arc::clone(stream);
            let owner = Arc::clone(&loaders);
            let runner = Arc::clone(failure);
            let name = format!("multifd-load-{}", lock(&loaders.threads).len());
            let thread = failure.spawn(Side::Destination, &name, move || {
                owner.load(&stream, device, &runner);
            })?;
            lock(&loaders.threads).push(thread);
        }
        Ok(loaders)
    }

    /// The index of device `(idstr, instance_id)`.
    pub(crate) fn find(&self, idstr: &str, instance_id: u32) -> Option<usize> {
        self.streams.iter().position(|stream| {
            stream.counters.id.idstr == idstr && stream.counters.id.instance_id == instance_id
        })
    }

    /// A buffer to read a payload of `length` bytes for device `device` into. The bytes
    /// are reserved against the device's cap first: a source starting a large chunk on
    /// every channel at once cannot make the destination allocate past the cap.
    pub(crate) fn buffer(&self, device: usize, length: usize) -> Result<Vec<u8>, Violation> {
        let stream = &self.streams[device];
        let charge = length as u64 + CHUNK_OVERHEAD;
        let mut state = lock(&stream.state);
        state
            .chunks
            .check_room(state.in_flight + charge)
            .map_err(|error| violation(stream, error))?;
        state.in_flight += charge;
        drop(state);
        Ok(self.pool.take(length))
    }

    /// Queues a received chunk for device `device`.
    pub(crate) fn insert(
        &self,
        device: usize,
        header: DeviceStateChunkHeader,
        payload: Vec<u8>,
    ) -> Result<(), Violation> {
        // `device` came from `find`, over the same list.
        let stream = &self.streams[device];
        let length = payload.len() as u64;
        // Counted before the chunk is queued: once queued, the load thread may take it and
        // subtract its length at once, and the total must never go below zero.
        let queued = self.queued.fetch_add(length, Ordering::Relaxed) + length;
        let mut state = lock(&stream.state);
        // The reservation `buffer` made becomes the queued chunk.
        state.in_flight -= length + CHUNK_OVERHEAD;
        let inserted = state
            .chunks
            .insert(header.idx, header.config_state, payload);
        drop(state);
        if inserted.is_err() {
            self.queued.fetch_sub(length, Ordering::Relaxed);
        }
        inserted.map_err(|error| violation(stream, error))?;
        stream.counters.count_chunk(length as usize);
        self.peak_queued.fetch_max(queued, Ordering::Relaxed);
        stream.ready.notify_one();
        Ok(())
    }

    /// The source completed and every channel delivered its last SYNC: nothing more will
    /// arrive. Fails naming the first device whose stream has a hole, otherwise waits for
    /// every device to load its config.
    pub(crate) fn complete(&self, failure: &Failure) -> Result<(), Error> {
        for stream in &self.streams {
            let mut state = lock(&stream.state);
            state.input_done = true;
            if let Some(missing) = state.chunks.missing() {
                return Err(Error::Protocol {
                    side: Side::Destination,
                    link: Link::Control,
                    source: Violation::MissingChunks {
                        device: stream.counters.id.clone(),
                        idx: missing.idx,
                        config_received: missing.config_received,
                    },
                });
            }
            drop(state);
            stream.ready.notify_one();
        }
        self.join();
        if failure.is_failed() {
            return Err(failure.first_error(Error::Cancelled {
                side: Side::Destination,
            }));
        }
        Ok(())
    }

    /// Waits for every load thread to end.
    pub(crate) fn join(&self) {
        let threads = std::mem::take(&mut *lock(&self.threads));
        join_threads(threads);
    }

    fn stop_all(&self) {
        for stream in &self.streams {
            lock(&stream.state).failed = true;
            stream.ready.notify_all();
        }
    }

    /// A device's load thread: applies chunks in order until the config is loaded.
    fn load(&self, stream: &DeviceStream, mut device: Box<dyn LoadDevice>, failure: &Failure) {
        loop {
            let Some((payload, config)) = self.next_chunk(stream) else {
                return;
            };
            self.queued
                .fetch_sub(payload.len() as u64, Ordering::Relaxed);
            let started = Instant::now();
            let result = if config {
                device.load_config(&payload)
            } else {
                device.load_state(&payload)
            };
            stream.counters.add_busy(started.elapsed());
            self.pool.give_back(payload);
            if let Err(error) = result {
                failure.fail(Error::Device {
                    side: Side::Destination,
                    device: stream.counters.id.clone(),
                    message: format!(
                        "{} failed: {error}",
                        if config { "loading the config" } else { "load" }
                    ),
                });
                return;
            }
            if config {
                return;
            }
        }
    }

    /// Waits for the next chunk in order; `None` once the migration failed or the input
    /// ended without it (completion then reports the hole).
    fn next_chunk(&self, stream: &DeviceStream) -> Option<(Vec<u8>, bool)> {
        let mut state = lock(&stream.state);
        loop {
            if state.failed {
                return None;
            }
            if let Some(chunk) = state.chunks.pop() {
                return Some(chunk);
            }
            if state.input_done {
                return None;
            }
            state = wait(&stream.ready, state);
        }
    }
}
