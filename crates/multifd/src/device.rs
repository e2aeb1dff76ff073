//! Device state: the device traits a VMM implements, the source's chunking writer, and
//! the destination's per-device reassembly and load threads.
//!
//! After switchover each device's [`SaveDevice`] runs on its own thread and writes its
//! state into a [`StateWriter`], which cuts it into chunks `idx = 0, 1, …` and hands each
//! to the same buffer swap as RAM; the device's config blob follows as the last chunk,
//! flagged `CONFIG_STATE`. Chunks of one device travel on different channels, so the
//! destination queues them per device in a [`Reassembler`] and a load thread per device
//! hands them to its [`LoadDevice`] strictly in `idx` order, the config last, while later
//! chunks are still arriving.
//!
//! Each payload is read from the socket once, straight into the buffer that is queued and
//! then lent to the device: no further copy. Buffers are recycled through a small pool.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use multifd_wire::{DeviceStateChunkHeader, DEVICE_STATE_CHUNK_HEADER_LEN};

use crate::failure::{lock, Failure};
use crate::send::{Batch, SendChannels};
use crate::{Error, Side, Violation};

/// What a device's save or load callback returns on failure.
pub type DeviceError = Box<dyn std::error::Error + Send + Sync>;

/// The devices a source saves, each with its id.
pub type SaveDevices = Vec<(DeviceId, Box<dyn SaveDevice>)>;

/// The devices a destination loads, each with its id.
pub type LoadDevices = Vec<(DeviceId, Box<dyn LoadDevice>)>;

/// Names a device on both ends: its id string and instance id, as QEMU's savevm does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId {
    /// The device's id string (1 to 255 bytes, no NUL).
    pub idstr: String,
    /// Tells apart several instances with the same id string.
    pub instance_id: u32,
}

impl DeviceId {
    /// The device `idstr`, instance `instance_id`.
    pub fn new(idstr: impl Into<String>, instance_id: u32) -> Self {
        Self {
            idstr: idstr.into(),
            instance_id,
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:?} instance {}", self.idstr, self.instance_id)
    }
}

/// The source side of a device: writes its state after the VM stopped.
pub trait SaveDevice: Send {
    /// Writes the device's state, of any length, into `state`; the engine chunks it.
    /// Runs on the device's own thread, concurrently with other devices and RAM.
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError>;

    /// The device's config blob, sent as its last chunk after the state; it must fit in
    /// one chunk (the configured chunk size).
    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError>;
}

/// The destination side of a device: loads its state as it arrives.
pub trait LoadDevice: Send {
    /// Loads the next piece of the state; pieces come strictly in the order they were
    /// written, each as one chunk of at most the negotiated chunk size.
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError>;

    /// Loads the config blob, after every piece of the state.
    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError>;
}

/// Per-device figures, updated by the device's save or load thread.
#[derive(Debug)]
pub(crate) struct DeviceCounters {
    pub(crate) id: DeviceId,
    /// State and config bytes, chunk headers excluded.
    pub(crate) bytes: AtomicU64,
    pub(crate) chunks: AtomicU64,
    /// Nanoseconds: the save thread's run on the source, time inside load callbacks on the
    /// destination.
    pub(crate) busy_nanos: AtomicU64,
}

impl DeviceCounters {
    pub(crate) fn new(id: DeviceId) -> Self {
        Self {
            id,
            bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
        }
    }

    fn count_chunk(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
    }

    fn add_busy(&self, busy: Duration) {
        let nanos = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        self.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// The sink a [`SaveDevice`] writes its state into: fills the producer's batch up to the
/// chunk size and hands it to the send channels, getting an empty buffer back.
pub struct StateWriter<'a> {
    channels: &'a SendChannels,
    batch: Batch,
    next_idx: u32,
    /// Chunk header plus the largest state payload of one chunk.
    chunk_len: usize,
    counters: &'a DeviceCounters,
}

impl fmt::Debug for StateWriter<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("StateWriter")
            .field("device", &self.counters.id)
            .field("next_idx", &self.next_idx)
            .finish()
    }
}

impl<'a> StateWriter<'a> {
    fn new(
        channels: &'a SendChannels,
        batch: Batch,
        chunk_size: u32,
        counters: &'a DeviceCounters,
    ) -> Self {
        let mut writer = Self {
            channels,
            batch,
            next_idx: 0,
            chunk_len: DEVICE_STATE_CHUNK_HEADER_LEN + chunk_size as usize,
            counters,
        };
        writer.start_chunk();
        writer
    }

    fn start_chunk(&mut self) {
        let chunk = &mut self.batch.chunk;
        chunk.clear();
        // Placeholder for the header, written once the chunk is complete.
        chunk.resize(DEVICE_STATE_CHUNK_HEADER_LEN, 0);
    }

    fn state_len(&self) -> usize {
        self.batch.chunk.len() - DEVICE_STATE_CHUNK_HEADER_LEN
    }

    /// Sends the chunk being filled, flagged `CONFIG_STATE` if `config`.
    fn send_chunk(&mut self, config: bool) -> io::Result<()> {
        let header = DeviceStateChunkHeader {
            idx: self.next_idx,
            config_state: config,
        }
        .encode();
        self.batch.chunk[..DEVICE_STATE_CHUNK_HEADER_LEN].copy_from_slice(&header);
        let bytes = self.state_len();
        self.channels
            .send(&mut self.batch)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the migration stopped"))?;
        self.counters.count_chunk(bytes);
        self.next_idx = self
            .next_idx
            .checked_add(1)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "more than 2^32 chunks"))?;
        self.start_chunk();
        Ok(())
    }

    /// Sends what is buffered, then the config blob as the last chunk.
    fn finish(mut self, config: &[u8]) -> io::Result<()> {
        if self.state_len() > 0 {
            self.send_chunk(false)?;
        }
        let room = self.chunk_len - DEVICE_STATE_CHUNK_HEADER_LEN;
        if config.len() > room {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "config blob of {} bytes does not fit in a chunk of {room}",
                    config.len()
                ),
            ));
        }
        self.batch.chunk.extend_from_slice(config);
        self.send_chunk(true)
    }
}

impl io::Write for StateWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.batch.chunk.len() == self.chunk_len {
            self.send_chunk(false)?;
        }
        let taken = bytes.len().min(self.chunk_len - self.batch.chunk.len());
        self.batch.chunk.extend_from_slice(&bytes[..taken]);
        Ok(taken)
    }

    /// Sends the partly filled chunk now (a device that wants its bytes on the way).
    fn flush(&mut self) -> io::Result<()> {
        if self.state_len() > 0 {
            self.send_chunk(false)?;
        }
        Ok(())
    }
}

/// A device registered with a source, and where its figures go.
pub(crate) struct SaveJob {
    pub(crate) device: Box<dyn SaveDevice>,
    pub(crate) index: usize,
    pub(crate) counters: Arc<DeviceCounters>,
}

/// Saves each device in `jobs` in turn on the calling thread: its state, then its config,
/// then the next device. A save error fails the migration, naming the device.
pub(crate) fn save_devices(
    jobs: Vec<SaveJob>,
    channels: &SendChannels,
    chunk_size: u32,
    failure: &Failure,
) {
    for mut job in jobs {
        let started = Instant::now();
        let batch = Batch::device_state(job.index, chunk_size);
        let result = save_one(&mut job, channels, batch, chunk_size);
        job.counters.add_busy(started.elapsed());
        if let Err(message) = result {
            // After a failure elsewhere the writer reports the stop; that first error wins.
            failure.fail(Error::Device {
                side: Side::Source,
                device: job.counters.id.clone(),
                message,
            });
            return;
        }
    }
}

fn save_one(
    job: &mut SaveJob,
    channels: &SendChannels,
    batch: Batch,
    chunk_size: u32,
) -> Result<(), String> {
    let mut writer = StateWriter::new(channels, batch, chunk_size, &job.counters);
    job.device
        .save_state(&mut writer)
        .map_err(|error| format!("save failed: {error}"))?;
    let config = job
        .device
        .save_config()
        .map_err(|error| format!("saving the config failed: {error}"))?;
    writer
        .finish(&config)
        .map_err(|error| format!("save failed: {error}"))
}

/// What a chunk's arrival broke, in one device's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReassemblyError {
    /// This idx was queued or loaded already.
    Duplicate { idx: u32 },
    /// A chunk past the config chunk, which must be the last.
    AfterConfig { idx: u32, config_idx: u32 },
    /// A second chunk flagged as the config.
    SecondConfig { idx: u32, config_idx: u32 },
    /// Queuing the chunk would pass the cap.
    QueueFull { queued: u64, cap: u64 },
}

/// What is missing from a device's stream at completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Missing {
    /// The first idx never received.
    pub(crate) idx: u32,
    /// Whether the config chunk was received.
    pub(crate) config_received: bool,
}

/// Every queued chunk is charged this much on top of its payload, for its bookkeeping
/// (map entry, buffer header), so a flood of empty chunks also meets the cap.
pub(crate) const CHUNK_OVERHEAD: u64 = 64;

/// One device's out-of-order chunks, released strictly in `idx` order.
///
/// Pure bookkeeping (no I/O, no threads), generic over the buffer so it can be tested
/// on its own: chunks go in with [`Reassembler::insert`] in any order, come out with
/// [`Reassembler::pop`] as `0, 1, 2, …` up to and including the config chunk.
#[derive(Debug)]
pub(crate) struct Reassembler<B> {
    /// Received chunks not yet released, by idx: payload and whether it is the config.
    pending: BTreeMap<u32, (B, bool)>,
    /// The next idx to release.
    /// Wider than an idx, so releasing idx `u32::MAX` cannot overflow.
    next: u64,
    /// The config chunk's idx, once it arrived.
    config_idx: Option<u32>,
    /// Whether the config chunk was released: the stream is complete.
    done: bool,
    /// Payload bytes of the pending chunks.
    queued_bytes: u64,
    cap: u64,
}

impl<B: AsRef<[u8]>> Reassembler<B> {
    /// An empty stream whose pending chunks may hold at most `cap` bytes (each charged
    /// its payload plus [`CHUNK_OVERHEAD`]).
    pub(crate) fn new(cap: u64) -> Self {
        Self {
            pending: BTreeMap::new(),
            next: 0,
            config_idx: None,
            done: false,
            queued_bytes: 0,
            cap,
        }
    }

    /// Queues chunk `idx`; refuses duplicates, anything past the config chunk and
    /// anything that would pass the cap.
    pub(crate) fn insert(
        &mut self,
        idx: u32,
        config: bool,
        payload: B,
    ) -> Result<(), ReassemblyError> {
        if u64::from(idx) < self.next || self.pending.contains_key(&idx) {
            return Err(ReassemblyError::Duplicate { idx });
        }
        if let Some(config_idx) = self.config_idx {
            if idx > config_idx {
                return Err(ReassemblyError::AfterConfig { idx, config_idx });
            }
            if config {
                return Err(ReassemblyError::SecondConfig { idx, config_idx });
            }
        }
        if config {
            if let Some((&last, _)) = self.pending.last_key_value() {
                if last > idx {
                    return Err(ReassemblyError::AfterConfig {
                        idx: last,
                        config_idx: idx,
                    });
                }
            }
        }
        let length = payload.as_ref().len() as u64;
        let charged = self.charged() + length + CHUNK_OVERHEAD;
        if charged > self.cap {
            return Err(ReassemblyError::QueueFull {
                queued: charged,
                cap: self.cap,
            });
        }
        if config {
            self.config_idx = Some(idx);
        }
        self.queued_bytes += length;
        self.pending.insert(idx, (payload, config));
        Ok(())
    }

    /// The next chunk in order, if it arrived: its payload and whether it is the config.
    pub(crate) fn pop(&mut self) -> Option<(B, bool)> {
        let (payload, config) = self.pending.remove(&u32::try_from(self.next).ok()?)?;
        self.queued_bytes -= payload.as_ref().len() as u64;
        self.next += 1;
        self.done = config;
        Some((payload, config))
    }

    /// Whether the config chunk was released.
    #[cfg(test)]
    fn is_done(&self) -> bool {
        self.done
    }

    /// Payload bytes queued now.
    #[cfg(test)]
    fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// With no more input to come: what is missing, or `None` if the stream is whole
    /// (every chunk up to the config received, whether released yet or not).
    pub(crate) fn missing(&self) -> Option<Missing> {
        let mut expected = self.next;
        for &idx in self.pending.keys() {
            if u64::from(idx) != expected {
                break;
            }
            expected += 1;
        }
        match self.config_idx {
            Some(config_idx) if expected > u64::from(config_idx) => None,
            _ if self.done => None,
            config_idx => Some(Missing {
                idx: u32::try_from(expected).unwrap_or(u32::MAX),
                config_received: config_idx.is_some(),
            }),
        }
    }

    fn charged(&self) -> u64 {
        self.queued_bytes + self.pending.len() as u64 * CHUNK_OVERHEAD
    }
}

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

/// One destination device: its reassembler and what its load thread waits on.
struct DeviceStream {
    counters: Arc<DeviceCounters>,
    state: Mutex<StreamState>,
    ready: Condvar,
}

struct StreamState {
    chunks: Reassembler<Vec<u8>>,
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
            let failure = Arc::clone(failure);
            let spawned = std::thread::Builder::new()
                .name(format!("multifd-load-{}", lock(&loaders.threads).len()))
                .spawn(move || owner.load(&stream, device, &failure));
            match spawned {
                Ok(thread) => lock(&loaders.threads).push(thread),
                Err(error) => {
                    return Err(Error::Internal {
                        side: Side::Destination,
                        what: format!("cannot spawn a device load thread: {error}"),
                    })
                }
            }
        }
        Ok(loaders)
    }

    /// The index of device `(idstr, instance_id)`.
    pub(crate) fn find(&self, idstr: &str, instance_id: u32) -> Option<usize> {
        self.streams.iter().position(|stream| {
            stream.counters.id.idstr == idstr && stream.counters.id.instance_id == instance_id
        })
    }

    /// A buffer to read a payload of `length` bytes into.
    pub(crate) fn buffer(&self, length: usize) -> Vec<u8> {
        self.pool.take(length)
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
        let length = payload.len();
        let mut state = lock(&stream.state);
        let id = || stream.counters.id.clone();
        state
            .chunks
            .insert(header.idx, header.config_state, payload)
            .map_err(|error| match error {
                ReassemblyError::Duplicate { idx } => {
                    Violation::DuplicateChunk { device: id(), idx }
                }
                ReassemblyError::AfterConfig { idx, config_idx } => Violation::ChunkAfterConfig {
                    device: id(),
                    idx,
                    config_idx,
                },
                ReassemblyError::SecondConfig { idx, config_idx } => Violation::SecondConfigChunk {
                    device: id(),
                    idx,
                    config_idx,
                },
                ReassemblyError::QueueFull { queued, cap } => Violation::DeviceQueueFull {
                    device: id(),
                    queued,
                    cap,
                },
            })?;
        drop(state);
        stream.counters.count_chunk(length);
        let queued = self.queued.fetch_add(length as u64, Ordering::Relaxed) + length as u64;
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
                    link: crate::Link::Control,
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
        self.join(failure);
        if failure.is_failed() {
            return Err(failure.first_error(Error::Cancelled {
                side: Side::Destination,
            }));
        }
        Ok(())
    }

    /// Waits for every load thread to end.
    pub(crate) fn join(&self, failure: &Failure) {
        let threads = std::mem::take(&mut *lock(&self.threads));
        for thread in threads {
            if thread.join().is_err() {
                failure.fail(Error::Internal {
                    side: Side::Destination,
                    what: "a device load thread panicked".into(),
                });
            }
        }
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
        let mut state: MutexGuard<'_, StreamState> = lock(&stream.state);
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
            state = stream
                .ready
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn chunk(idx: u32) -> Vec<u8> {
        vec![idx as u8; 1 + (idx as usize % 5)]
    }

    #[test]
    fn releases_in_order_whatever_the_arrival_order() {
        let mut chunks = Reassembler::new(1 << 20);
        chunks.insert(2, true, chunk(2)).expect("config");
        assert_eq!(chunks.pop(), None);
        chunks.insert(0, false, chunk(0)).expect("first");
        assert_eq!(chunks.pop(), Some((chunk(0), false)));
        assert_eq!(
            chunks.missing(),
            Some(Missing {
                idx: 1,
                config_received: true
            })
        );
        chunks.insert(1, false, chunk(1)).expect("second");
        assert_eq!(chunks.missing(), None);
        assert_eq!(chunks.pop(), Some((chunk(1), false)));
        assert_eq!(chunks.pop(), Some((chunk(2), true)));
        assert!(chunks.is_done());
        assert_eq!(chunks.queued_bytes(), 0);
    }

    #[test]
    fn refuses_duplicates_chunks_after_the_config_and_a_second_config() {
        let mut chunks = Reassembler::new(1 << 20);
        chunks.insert(0, false, chunk(0)).expect("first");
        assert_eq!(
            chunks.insert(0, false, chunk(0)),
            Err(ReassemblyError::Duplicate { idx: 0 })
        );
        chunks.pop().expect("released");
        assert_eq!(
            chunks.insert(0, false, chunk(0)),
            Err(ReassemblyError::Duplicate { idx: 0 }),
            "a released chunk is still a duplicate"
        );
        chunks.insert(5, false, chunk(5)).expect("ahead");
        assert_eq!(
            chunks.insert(3, true, chunk(3)),
            Err(ReassemblyError::AfterConfig {
                idx: 5,
                config_idx: 3
            }),
            "a config before a queued chunk makes that chunk come after it"
        );
        chunks.insert(6, true, chunk(6)).expect("config");
        assert_eq!(
            chunks.insert(7, false, chunk(7)),
            Err(ReassemblyError::AfterConfig {
                idx: 7,
                config_idx: 6
            })
        );
        assert_eq!(
            chunks.insert(4, true, chunk(4)),
            Err(ReassemblyError::SecondConfig {
                idx: 4,
                config_idx: 6
            })
        );
    }

    #[test]
    fn refuses_chunks_past_the_cap_counting_their_bookkeeping() {
        let mut chunks = Reassembler::new(2 * CHUNK_OVERHEAD + 10);
        chunks.insert(1, false, vec![0; 10]).expect("fits");
        assert_eq!(
            chunks.insert(2, false, vec![0; 1]),
            Err(ReassemblyError::QueueFull {
                queued: 2 * CHUNK_OVERHEAD + 11,
                cap: 2 * CHUNK_OVERHEAD + 10
            })
        );
        chunks
            .insert(2, false, Vec::new())
            .expect("an empty chunk fits");
        assert!(matches!(
            chunks.insert(3, false, Vec::new()),
            Err(ReassemblyError::QueueFull { .. })
        ));
    }

    #[test]
    fn an_empty_stream_misses_its_first_chunk() {
        let chunks = Reassembler::<Vec<u8>>::new(1 << 20);
        assert_eq!(
            chunks.missing(),
            Some(Missing {
                idx: 0,
                config_received: false
            })
        );
    }

    proptest! {
        /// Any arrival order of a whole stream, with duplicates and strays mixed in,
        /// releases exactly `0..=config` in order; strays and duplicates are refused with
        /// the right error; the queue never holds more than the cap.
        #[test]
        fn any_arrival_order_releases_in_order(
            count in 1u32..40,
            seed in any::<u64>(),
            duplicates in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
            strays in proptest::collection::vec(0u32..20, 0..5),
            cap_chunks in 3u64..50,
        ) {
            let cap = cap_chunks * (CHUNK_OVERHEAD + 5);
            let mut order: Vec<u32> = (0..count).collect();
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut chunks = Reassembler::new(cap);
            let mut released = Vec::new();
            let mut sent = std::collections::BTreeSet::new();
            let mut full = false;
            for (step, &idx) in order.iter().enumerate() {
                match chunks.insert(idx, idx == count - 1, chunk(idx)) {
                    Ok(()) => { sent.insert(idx); }
                    Err(ReassemblyError::QueueFull { queued, cap: limit }) => {
                        prop_assert!(queued > limit);
                        full = true;
                        break;
                    }
                    Err(other) => prop_assert!(false, "unexpected {other:?}"),
                }
                prop_assert!(chunks.charged() <= cap);
                for index in &duplicates {
                    let again = order[index.index(step + 1)];
                    prop_assert_eq!(
                        chunks.insert(again, false, chunk(again)),
                        Err(ReassemblyError::Duplicate { idx: again })
                    );
                }
                if step % 3 == 0 {
                    while let Some((payload, config)) = chunks.pop() {
                        let idx = released.len() as u32;
                        prop_assert_eq!(payload, chunk(idx));
                        prop_assert_eq!(config, idx == count - 1);
                        released.push(idx);
                    }
                }
            }
            while let Some((_, _)) = chunks.pop() {
                released.push(released.len() as u32);
            }
            prop_assert_eq!(&released, &(0..released.len() as u32).collect::<Vec<_>>());
            if full {
                prop_assert!(!chunks.is_done());
            } else {
                prop_assert!(chunks.is_done());
                prop_assert_eq!(chunks.missing(), None);
                prop_assert_eq!(released.len() as u32, count);
                prop_assert_eq!(chunks.queued_bytes(), 0);
                for stray in strays {
                    let idx = count + stray;
                    prop_assert_eq!(
                        chunks.insert(idx, false, chunk(idx)),
                        Err(ReassemblyError::AfterConfig { idx, config_idx: count - 1 })
                    );
                }
            }
        }

        /// Leaving one chunk out of a stream is always detected at completion, naming
        /// the first hole.
        #[test]
        fn a_hole_is_reported_at_completion(count in 1u32..30, hole in any::<prop::sample::Index>()) {
            let hole = hole.index(count as usize) as u32;
            let mut chunks = Reassembler::new(u64::MAX);
            for idx in (0..count).rev().filter(|&idx| idx != hole) {
                chunks.insert(idx, idx == count - 1, chunk(idx)).expect("insert");
            }
            while chunks.pop().is_some() {}
            prop_assert_eq!(
                chunks.missing(),
                Some(Missing { idx: hole, config_received: hole != count - 1 })
            );
        }
    }
}
