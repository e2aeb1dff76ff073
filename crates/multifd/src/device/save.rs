//! The source side of device state: one save thread per device writes into a
//! [`StateWriter`], which cuts the state into chunks and hands each to the send channels.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use multifd_wire::{DeviceStateChunkHeader, DEVICE_STATE_CHUNK_HEADER_LEN};

use super::SaveDevice;
use crate::error::Error;
use crate::failure::Failure;
use crate::ids::Side;
use crate::send::{Batch, SendChannels};
use crate::stats::DeviceCounters;

/// The sink a [`SaveDevice`] writes its state into. In a migration it fills the
/// producer's batch up to the chunk size and hands it to the send channels, getting an
/// empty buffer back; in a snapshot it streams the state into the file's device area.
pub struct StateWriter<'a> {
    sink: &'a mut dyn io::Write,
}

impl fmt::Debug for StateWriter<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("StateWriter")
            .finish_non_exhaustive()
    }
}

impl<'a> StateWriter<'a> {
    /// A writer that passes every byte on to `sink`.
    pub(crate) fn new(sink: &'a mut dyn io::Write) -> Self {
        Self { sink }
    }
}

impl io::Write for StateWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.sink.write(bytes)
    }

    /// Sends (or writes out) what is buffered now: a device that wants its bytes on the
    /// way.
    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

/// The send channels as a device's byte sink: cuts the state into chunks of the chunk
/// size, each handed to the channels in the producer's batch.
struct ChannelSink<'a> {
    channels: &'a SendChannels,
    batch: Batch,
    next_idx: u32,
    /// Chunk header plus the largest state payload of one chunk.
    chunk_len: usize,
    counters: &'a DeviceCounters,
}

impl<'a> ChannelSink<'a> {
    fn new(
        channels: &'a SendChannels,
        batch: Batch,
        chunk_size: u32,
        counters: &'a DeviceCounters,
        next_idx: u32,
    ) -> Self {
        let mut writer = Self {
            channels,
            batch,
            next_idx,
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

impl io::Write for ChannelSink<'_> {
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
    /// The idx of the device's next chunk: chunks sent during precopy come first.
    pub(crate) next_idx: u32,
}

impl SaveJob {
    /// Lets the device send what it can while the VM runs (one precopy round's share),
    /// as chunks continuing its stream; the chunks leave before this returns.
    pub(crate) fn save_precopy(
        &mut self,
        channels: &SendChannels,
        chunk_size: u32,
    ) -> Result<(), Error> {
        let batch = Batch::device_state(self.index, chunk_size);
        let mut sink = ChannelSink::new(channels, batch, chunk_size, &self.counters, self.next_idx);
        let started = Instant::now();
        let result = self
            .device
            .save_precopy(&mut StateWriter::new(&mut sink))
            .map_err(|error| format!("precopy save failed: {error}"))
            .and_then(|()| {
                io::Write::flush(&mut sink).map_err(|error| format!("precopy save failed: {error}"))
            });
        self.next_idx = sink.next_idx;
        self.counters.add_busy(started.elapsed());
        result.map_err(|message| Error::Device {
            side: Side::Source,
            device: self.counters.id.clone(),
            message,
        })
    }
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
    let mut sink = ChannelSink::new(channels, batch, chunk_size, &job.counters, job.next_idx);
    job.device
        .save_state(&mut StateWriter::new(&mut sink))
        .map_err(|error| format!("save failed: {error}"))?;
    let config = job
        .device
        .save_config()
        .map_err(|error| format!("saving the config failed: {error}"))?;
    sink.finish(&config)
        .map_err(|error| format!("save failed: {error}"))
}
