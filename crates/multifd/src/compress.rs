//! Page compression: the negotiated method and level, and each channel's compressor and
//! decompressor, reused for every packet (no allocation per packet).
//!
//! # Payload formats
//!
//! A RAM packet's payload holds its normal pages, in offset order. Zero pages are found
//! before compression and never compressed (they travel as offsets only). A packet
//! without normal pages has no payload and does not touch the channel's stream.
//!
//! - **zlib** (QEMU's format): one zlib stream (RFC 1950 header, deflate data, no
//!   trailer) per channel for the whole migration. Each packet's pages are fed in order
//!   and the stream is `Z_SYNC_FLUSH`ed at the end of the packet, so each payload ends on
//!   a byte boundary with the `00 00 ff ff` marker and decodes only after the previous
//!   packets of its channel. The stream never ends.
//! - **zstd** (QEMU's format): one zstd frame per channel for the whole migration, fed
//!   like zlib and flushed (`ZSTD_e_flush`) at the end of every packet. The frame never
//!   ends.
//! - **lz4** (this project's extension, flag [`Flags::LZ4`]): no state across packets.
//!   The packet's page bytes are cut into blocks of [`LZ4_BLOCK_LEN`] bytes (the last one
//!   shorter); each block is sent as its compressed length (u32, big-endian) followed by
//!   one LZ4 block (the raw block format: no frame, no checksum). Each block's
//!   decompressed length follows from `normal_pages × page_size`.
//!
//! **Raw fallback** (extension flag [`Flags::UNCOMPRESSED`], negotiated whenever a method
//! is): when a packet's compressed form would not be smaller than its pages, the sender
//! sends the pages raw with that flag instead. A compressor cannot take back input it has
//! consumed, so instead of leaving the stream untouched, both ends restart it in lockstep:
//! after a raw packet the sender's next compressed packet on that channel starts a new
//! stream (a new zlib header or zstd frame), and the receiver resets its decompressor when
//! it sees the flag. Incompressible pages thus cost exactly their raw size on the wire.
//!
//! # Receive-side bounds
//!
//! A payload must fit [`Compression::max_payload`] (checked by the wire decoder before
//! anything is read) and must inflate to exactly `normal_pages × page_size` bytes: the
//! decompressor writes into a buffer of exactly that size and reports a payload that
//! would produce more, produces less, leaves input unused, or does not decode. The zstd
//! window is capped at [`ZSTD_WINDOW_LOG_MAX`], so a hostile frame header cannot make the
//! destination allocate more than that per channel.

use std::fmt;
use std::io;
use std::ops::RangeInclusive;

use flate2::{FlushCompress, FlushDecompress, Status};
use multifd_wire::{Compression, Flags};
use zstd::stream::raw::{DParameter, InBuffer, Operation, OutBuffer};

use crate::error::{Error, Violation};
use crate::ram::RamBlock;

/// Bytes of pages per lz4 block: below 64 KiB, so `lz4_flex` uses its stack-allocated
/// 16-bit hash table (no allocation per block) and a block never needs a match further
/// back than lz4's 64 KiB window anyway. 60 KiB is 15 pages of 4 KiB.
pub const LZ4_BLOCK_LEN: usize = 60 * 1024;

/// Length of the big-endian length prefix before each lz4 block.
const LZ4_LENGTH_PREFIX: usize = 4;

/// Largest zstd window the destination accepts (2^23 = 8 MiB): the window zstd level 19,
/// the highest level offered, uses for a stream of unknown size. It bounds each channel's
/// decompression memory whatever a frame header claims.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// zlib levels: 0 (stored) to 9, as zlib defines them.
const ZLIB_LEVELS: RangeInclusive<i32> = 0..=9;
/// zstd levels: the fast negative levels down to -5 (lz4-like speed) up to 19, the
/// highest level whose window stays within [`ZSTD_WINDOW_LOG_MAX`].
const ZSTD_LEVELS: RangeInclusive<i32> = -5..=19;

/// A compression method and its level, as both ends negotiate them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompressionSettings {
    /// The method.
    pub method: Compression,
    /// The level; 0 for methods without levels (`none`, `lz4`).
    pub level: i32,
}

impl CompressionSettings {
    /// No compression.
    pub const NONE: Self = Self {
        method: Compression::None,
        level: 0,
    };

    /// `method` at `level`, or at the method's default level (zlib 1, zstd 1, as QEMU)
    /// when `level` is `None`. A level outside the method's range, or any level for a
    /// method without levels, is a configuration error.
    pub fn new(method: Compression, level: Option<i32>) -> Result<Self, Error> {
        let settings = Self {
            method,
            level: level.unwrap_or_else(|| Self::default_level(method)),
        };
        settings.check().map_err(Error::Config)?;
        Ok(settings)
    }

    /// The level used when none is given.
    pub fn default_level(method: Compression) -> i32 {
        match method {
            Compression::Zlib | Compression::Zstd => 1,
            Compression::None | Compression::Lz4 => 0,
        }
    }

    /// The levels a method accepts; `None` for methods without levels.
    pub fn levels(method: Compression) -> Option<RangeInclusive<i32>> {
        match method {
            Compression::Zlib => Some(ZLIB_LEVELS),
            Compression::Zstd => Some(ZSTD_LEVELS),
            Compression::None | Compression::Lz4 => None,
        }
    }

    /// Checks the level suits the method; the error says why not.
    pub(crate) fn check(&self) -> Result<(), String> {
        let valid = match Self::levels(self.method) {
            Some(levels) => levels.contains(&self.level),
            None => self.level == 0,
        };
        if valid {
            return Ok(());
        }
        Err(match Self::levels(self.method) {
            Some(levels) => format!(
                "{} level {} outside {}..={}",
                self.method,
                self.level,
                levels.start(),
                levels.end()
            ),
            None => format!("{} has no levels, got level {}", self.method, self.level),
        })
    }

    /// The extension bits a migration with these settings negotiates: the method's own
    /// and, whenever something is compressed, the raw fallback.
    pub(crate) fn extensions(&self) -> u32 {
        match self.method {
            Compression::None => 0,
            method => method.extension() | Flags::UNCOMPRESSED,
        }
    }
}

impl fmt::Display for CompressionSettings {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Self::levels(self.method) {
            Some(_) => write!(formatter, "{} level {}", self.method, self.level),
            None => write!(formatter, "{}", self.method),
        }
    }
}

/// One stream's compressor, reused for every packet of a channel.
///
/// [`PacketCompressor::compress`] produces one packet's payload in the formats described
/// in this module's documentation.
pub struct PacketCompressor {
    encoder: Encoder,
    output: Vec<u8>,
}

enum Encoder {
    Zlib(flate2::Compress),
    Zstd(zstd::stream::raw::Encoder<'static>),
    Lz4,
}

impl PacketCompressor {
    /// A compressor for packets of at most `packet_bytes` page bytes; `None` for
    /// [`Compression::None`].
    pub fn new(settings: CompressionSettings, packet_bytes: usize) -> io::Result<Option<Self>> {
        settings.check().map_err(io::Error::other)?;
        let encoder = match settings.method {
            Compression::None => return Ok(None),
            Compression::Zlib => Encoder::Zlib(flate2::Compress::new(
                flate2::Compression::new(settings.level as u32),
                true,
            )),
            Compression::Zstd => Encoder::Zstd(zstd::stream::raw::Encoder::new(settings.level)?),
            Compression::Lz4 => Encoder::Lz4,
        };
        let output_len = match encoder {
            // `lz4_flex` refuses to compress a block unless the output has room for its
            // worst case (110% plus 20 bytes), whatever the block would really take.
            Encoder::Lz4 => {
                let blocks = packet_bytes.div_ceil(LZ4_BLOCK_LEN);
                packet_bytes
                    + blocks
                        * (lz4_flex::block::get_maximum_output_size(LZ4_BLOCK_LEN) - LZ4_BLOCK_LEN
                            + LZ4_LENGTH_PREFIX)
            }
            Encoder::Zlib(_) | Encoder::Zstd(_) => packet_bytes,
        };
        Ok(Some(Self {
            encoder,
            output: vec![0; output_len],
        }))
    }

    /// Compresses one packet's pages, continuing the channel's stream. Returns the
    /// payload, or `None` when it would not be smaller than `pages`: then the stream has
    /// been restarted and the caller sends `pages` raw with [`Flags::UNCOMPRESSED`].
    pub fn compress(&mut self, pages: &[u8]) -> io::Result<Option<&[u8]>> {
        // A payload the size of the pages or larger is not worth sending compressed, so
        // a stream compressor gets no more room than the pages themselves and stops as
        // soon as it fills it. (lz4 insists on room for its worst case; see `new`.)
        let limit = pages.len().min(self.output.len());
        let produced = match &mut self.encoder {
            Encoder::Zlib(stream) => deflate_sync(stream, pages, &mut self.output[..limit])?,
            Encoder::Zstd(stream) => zstd_flush(stream, pages, &mut self.output[..limit])?,
            Encoder::Lz4 => lz4_blocks(pages, &mut self.output),
        };
        match produced {
            Some(length) if length < pages.len() => Ok(Some(&self.output[..length])),
            _ => {
                self.restart()?;
                Ok(None)
            }
        }
    }

    /// Starts a new stream: what was fed so far is forgotten.
    fn restart(&mut self) -> io::Result<()> {
        match &mut self.encoder {
            Encoder::Zlib(stream) => stream.reset(),
            Encoder::Zstd(stream) => stream.reinit()?,
            Encoder::Lz4 => {}
        }
        Ok(())
    }
}

/// Feeds `input` to the zlib stream and sync-flushes it; `None` if `output` fills first.
fn deflate_sync(
    stream: &mut flate2::Compress,
    input: &[u8],
    output: &mut [u8],
) -> io::Result<Option<usize>> {
    let (start_in, start_out) = (stream.total_in(), stream.total_out());
    loop {
        let read = (stream.total_in() - start_in) as usize;
        let written = (stream.total_out() - start_out) as usize;
        if written == output.len() {
            return Ok(None);
        }
        stream
            .compress(&input[read..], &mut output[written..], FlushCompress::Sync)
            .map_err(io::Error::other)?;
        let read = (stream.total_in() - start_in) as usize;
        let written = (stream.total_out() - start_out) as usize;
        // With Z_SYNC_FLUSH, room left in the output means the flush is complete.
        if read == input.len() && written < output.len() {
            return Ok(Some(written));
        }
    }
}

/// Feeds `input` to the zstd stream and flushes it; `None` if `output` fills first.
fn zstd_flush(
    stream: &mut zstd::stream::raw::Encoder<'static>,
    input: &[u8],
    output: &mut [u8],
) -> io::Result<Option<usize>> {
    let capacity = output.len();
    let mut source = InBuffer::around(input);
    let mut sink = OutBuffer::around(output);
    while source.pos() < input.len() {
        if sink.pos() == capacity {
            return Ok(None);
        }
        stream.run(&mut source, &mut sink)?;
    }
    while stream.flush(&mut sink)? != 0 {
        if sink.pos() == capacity {
            return Ok(None);
        }
    }
    Ok(Some(sink.pos()))
}

/// Compresses `input` as length-prefixed lz4 blocks; `None` if `output` is too small.
fn lz4_blocks(input: &[u8], output: &mut [u8]) -> Option<usize> {
    let mut written = 0;
    for block in input.chunks(LZ4_BLOCK_LEN) {
        let body = output.get_mut(written + LZ4_LENGTH_PREFIX..)?;
        let length = lz4_flex::block::compress_into(block, body).ok()?;
        output[written..written + LZ4_LENGTH_PREFIX]
            .copy_from_slice(&(length as u32).to_be_bytes());
        written += LZ4_LENGTH_PREFIX + length;
    }
    Some(written)
}

/// A send channel's compression state: its compressor and the buffer that pages are
/// copied into from guest memory (compressors read a stable copy, never guest memory).
pub(crate) struct ChannelCompressor {
    compressor: PacketCompressor,
    staging: Vec<u8>,
}

/// A packet's payload as it goes on the wire.
pub(crate) struct Payload<'a> {
    /// The bytes to send.
    pub(crate) bytes: &'a [u8],
    /// Whether they are the raw pages (flag [`Flags::UNCOMPRESSED`]).
    pub(crate) uncompressed: bool,
}

impl ChannelCompressor {
    /// A channel's compressor; `None` for [`Compression::None`].
    pub(crate) fn new(
        settings: CompressionSettings,
        packet_bytes: usize,
    ) -> io::Result<Option<Self>> {
        Ok(
            PacketCompressor::new(settings, packet_bytes)?.map(|compressor| Self {
                compressor,
                staging: vec![0; packet_bytes],
            }),
        )
    }

    /// Copies the pages at `offsets` of `block` out of guest memory and compresses them.
    ///
    /// # Safety
    ///
    /// Every offset must be a whole page inside `block`, whose host address is 8-byte
    /// aligned; `page_size` must be a multiple of 8, and `offsets.len() × page_size` at
    /// most the packet size this compressor was made for.
    pub(crate) unsafe fn compress_pages(
        &mut self,
        block: &RamBlock,
        offsets: &[u64],
        page_size: usize,
    ) -> io::Result<Payload<'_>> {
        let length = offsets.len() * page_size;
        let staging = &mut self.staging[..length];
        for (page, &offset) in staging.chunks_exact_mut(page_size).zip(offsets) {
            // SAFETY: the caller guarantees a whole page inside the block, aligned, of a
            // size that is a multiple of 8.
            unsafe { block.read_page(offset, page) };
        }
        let pages = &self.staging[..length];
        Ok(match self.compressor.compress(pages)? {
            Some(bytes) => Payload {
                bytes,
                uncompressed: false,
            },
            None => Payload {
                bytes: pages,
                uncompressed: true,
            },
        })
    }
}

/// Why a payload could not be inflated to its pages.
#[derive(Debug)]
enum InflateError {
    /// The bytes do not decode; the codec's message.
    Corrupt(String),
    /// They decode to this many bytes, fewer than the pages.
    Short(u64),
    /// They decode to more bytes than the pages.
    Long,
}

/// One stream's decompressor and its buffers (sized once for the largest packet),
/// reused for every packet of a channel: the counterpart of [`PacketCompressor`].
pub struct PacketDecompressor {
    method: Compression,
    decoder: Decoder,
    input: Vec<u8>,
    pages: Vec<u8>,
}

enum Decoder {
    Zlib(flate2::Decompress),
    Zstd(zstd::stream::raw::Decoder<'static>),
    Lz4,
}

impl PacketDecompressor {
    /// A decompressor for packets of at most `packet_bytes` page bytes; `None` for
    /// [`Compression::None`].
    pub fn new(method: Compression, packet_bytes: usize) -> io::Result<Option<Self>> {
        let decoder = match method {
            Compression::None => return Ok(None),
            Compression::Zlib => Decoder::Zlib(flate2::Decompress::new(true)),
            Compression::Zstd => {
                let mut decoder = zstd::stream::raw::Decoder::new()?;
                decoder.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))?;
                Decoder::Zstd(decoder)
            }
            Compression::Lz4 => Decoder::Lz4,
        };
        let bound = method
            .max_payload(packet_bytes as u64)
            .unwrap_or(packet_bytes as u64);
        Ok(Some(Self {
            method,
            decoder,
            input: vec![0; bound as usize],
            pages: vec![0; packet_bytes],
        }))
    }

    /// The buffer to read a payload of `size` bytes into.
    ///
    /// # Panics
    ///
    /// If `size` is above the method's bound for the packet size
    /// ([`Compression::max_payload`]), which the wire decoder checks first.
    pub fn input(&mut self, size: usize) -> &mut [u8] {
        &mut self.input[..size]
    }

    /// Inflates the `size` payload bytes read through [`Self::input`] into exactly
    /// `expected` page bytes, continuing the stream. Returns the pages, or the violation
    /// naming `packet_num`.
    ///
    /// # Panics
    ///
    /// If `size` is above the bound [`Self::input`] allows or `expected` above the
    /// packet size this decompressor was made for.
    pub fn inflate(
        &mut self,
        packet_num: u64,
        size: usize,
        expected: usize,
    ) -> Result<&[u8], Violation> {
        let input = &self.input[..size];
        let output = &mut self.pages[..expected];
        let result = match &mut self.decoder {
            Decoder::Zlib(stream) => inflate_stream(input, output, |input, output| {
                let (start_in, start_out) = (stream.total_in(), stream.total_out());
                match stream.decompress(input, output, FlushDecompress::Sync) {
                    Ok(Status::StreamEnd) => Err("the stream ended (it never does)".into()),
                    Ok(_) => Ok((
                        (stream.total_in() - start_in) as usize,
                        (stream.total_out() - start_out) as usize,
                    )),
                    Err(error) => Err(error.to_string()),
                }
            }),
            Decoder::Zstd(stream) => inflate_stream(input, output, |input, output| {
                let mut source = InBuffer::around(input);
                let mut sink = OutBuffer::around(output);
                stream
                    .run(&mut source, &mut sink)
                    .map_err(|error| error.to_string())?;
                Ok((source.pos(), sink.pos()))
            }),
            Decoder::Lz4 => inflate_lz4(input, output),
        };
        let method = self.method;
        match result {
            Ok(()) => Ok(&self.pages[..expected]),
            Err(InflateError::Corrupt(detail)) => Err(Violation::CorruptPayload {
                method,
                packet_num,
                detail,
            }),
            Err(InflateError::Short(inflated)) => Err(Violation::PayloadInflatesShort {
                method,
                packet_num,
                inflated,
                expected: expected as u64,
            }),
            Err(InflateError::Long) => Err(Violation::PayloadInflatesLong {
                method,
                packet_num,
                expected: expected as u64,
            }),
        }
    }

    /// Starts a new stream, as the sender did after a raw packet.
    pub fn restart(&mut self) -> io::Result<()> {
        match &mut self.decoder {
            Decoder::Zlib(stream) => stream.reset(true),
            Decoder::Zstd(stream) => stream.reinit()?,
            Decoder::Lz4 => {}
        }
        Ok(())
    }
}

/// Drives a stream decoder over all of `input` into exactly `output`. `step` decodes
/// what it can of its input into its output and says how much it consumed and produced.
fn inflate_stream(
    input: &[u8],
    output: &mut [u8],
    mut step: impl FnMut(&[u8], &mut [u8]) -> Result<(usize, usize), String>,
) -> Result<(), InflateError> {
    let (mut read, mut written) = (0, 0);
    // Once the pages are full, the decoder gets this one spare byte: anything it puts
    // there means the payload inflates past its pages.
    let mut spare = [0u8; 1];
    loop {
        let full = written == output.len();
        let room: &mut [u8] = if full {
            &mut spare
        } else {
            &mut output[written..]
        };
        let (consumed, produced) = step(&input[read..], room).map_err(InflateError::Corrupt)?;
        if full && produced > 0 {
            return Err(InflateError::Long);
        }
        read += consumed;
        written += produced;
        if consumed == 0 && produced == 0 {
            break;
        }
    }
    if read < input.len() {
        return Err(InflateError::Corrupt(format!(
            "{} payload bytes left over that decode to nothing",
            input.len() - read
        )));
    }
    if written < output.len() {
        return Err(InflateError::Short(written as u64));
    }
    Ok(())
}

/// Decodes length-prefixed lz4 blocks of [`LZ4_BLOCK_LEN`] page bytes into `output`.
fn inflate_lz4(input: &[u8], output: &mut [u8]) -> Result<(), InflateError> {
    let mut read = 0;
    let mut written = 0;
    for block in output.chunks_mut(LZ4_BLOCK_LEN) {
        let Some(prefix) = input.get(read..read + LZ4_LENGTH_PREFIX) else {
            return Err(if read == input.len() {
                InflateError::Short(written as u64)
            } else {
                InflateError::Corrupt("payload ends inside a block length".into())
            });
        };
        let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        read += LZ4_LENGTH_PREFIX;
        let body = input
            .get(read..)
            .and_then(|rest| rest.get(..length))
            .ok_or_else(|| {
                InflateError::Corrupt(format!(
                    "block of {length} bytes past the payload's end ({} bytes left)",
                    input.len() - read
                ))
            })?;
        read += length;
        match lz4_flex::block::decompress_into(body, block) {
            Ok(produced) if produced == block.len() => written += produced,
            Ok(produced) => return Err(InflateError::Short((written + produced) as u64)),
            Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) => {
                return Err(InflateError::Long)
            }
            Err(error) => return Err(InflateError::Corrupt(error.to_string())),
        }
    }
    if read < input.len() {
        return Err(InflateError::Corrupt(format!(
            "{} payload bytes after the last block",
            input.len() - read
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;
    const PACKET: usize = 32 * PAGE;

    fn settings(method: Compression) -> CompressionSettings {
        CompressionSettings::new(method, None).expect("default level")
    }

    /// Text-like, compressible pages that differ from packet to packet.
    fn text_pages(seed: u64, pages: usize) -> Vec<u8> {
        let words: [&[u8]; 5] = [b"migrate ", b"page ", b"channel ", b"sync ", b"ram\n"];
        let mut state = seed | 1;
        let mut bytes = Vec::with_capacity(pages * PAGE);
        while bytes.len() < pages * PAGE {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(words[(state % 5) as usize]);
        }
        bytes.truncate(pages * PAGE);
        bytes
    }

    fn random_pages(seed: u64, pages: usize) -> Vec<u8> {
        let mut state = seed | 1;
        (0..pages * PAGE / 8)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()
            })
            .collect()
    }

    /// What the receiver does with one packet: raw pages restart the stream, compressed
    /// ones are inflated.
    fn receive(decompressor: &mut PacketDecompressor, payload: &[u8], raw: bool, pages: &[u8]) {
        if raw {
            assert_eq!(payload, pages);
            decompressor.restart().expect("restart");
            return;
        }
        decompressor.input(payload.len()).copy_from_slice(payload);
        let inflated = decompressor
            .inflate(0, payload.len(), pages.len())
            .expect("inflate");
        assert_eq!(inflated, pages);
    }

    #[test]
    fn every_stream_survives_many_packets_including_raw_fallbacks() {
        const PACKETS: u64 = 160;
        for method in [Compression::Zlib, Compression::Zstd, Compression::Lz4] {
            let mut compressor = PacketCompressor::new(settings(method), PACKET)
                .expect("compressor")
                .expect("a method");
            let mut decompressor = PacketDecompressor::new(method, PACKET)
                .expect("decompressor")
                .expect("a method");
            let mut compressed_packets = 0;
            let mut raw_packets = 0;
            for packet in 0..PACKETS {
                // Mostly text-like packets of varying length, with an incompressible
                // packet now and then to exercise the raw fallback mid-stream.
                let pages = 1 + (packet as usize * 7) % 32;
                let bytes = if packet % 17 == 5 {
                    random_pages(packet, pages)
                } else {
                    text_pages(packet, pages)
                };
                let (payload, raw) = match compressor.compress(&bytes).expect("compress") {
                    Some(payload) => (payload.to_vec(), false),
                    None => (bytes.clone(), true),
                };
                if raw {
                    raw_packets += 1;
                } else {
                    compressed_packets += 1;
                    assert!(
                        payload.len() < bytes.len(),
                        "{method}: payload did not shrink"
                    );
                }
                receive(&mut decompressor, &payload, raw, &bytes);
            }
            let random_packets = (0..PACKETS).filter(|packet| packet % 17 == 5).count();
            assert_eq!(
                raw_packets, random_packets,
                "{method}: random packets go raw"
            );
            assert_eq!(
                compressed_packets,
                PACKETS as usize - random_packets,
                "{method}"
            );
        }
    }

    #[test]
    fn levels_are_checked() {
        assert_eq!(
            CompressionSettings::new(Compression::Zlib, None)
                .map(|s| s.level)
                .ok(),
            Some(1)
        );
        assert_eq!(
            CompressionSettings::new(Compression::Zstd, None)
                .map(|s| s.level)
                .ok(),
            Some(1)
        );
        for (method, level) in [
            (Compression::Zlib, -1),
            (Compression::Zlib, 10),
            (Compression::Zstd, -6),
            (Compression::Zstd, 20),
            (Compression::Lz4, 1),
            (Compression::None, 1),
        ] {
            assert!(
                CompressionSettings::new(method, Some(level)).is_err(),
                "{method} {level}"
            );
        }
        for (method, level) in [
            (Compression::Zlib, 0),
            (Compression::Zlib, 9),
            (Compression::Zstd, -5),
            (Compression::Zstd, 19),
            (Compression::Lz4, 0),
        ] {
            assert!(CompressionSettings::new(method, Some(level)).is_ok());
        }
    }
}
