//! Shared helpers for the engine's integration tests: guest memory over anonymous
//! mappings, page patterns, and running a destination on a thread.
#![allow(dead_code)]

use std::thread::JoinHandle;

use memmap2::MmapMut;
use multifd::{
    Address, BlockAnnouncement, Destination, DestinationConfig, Error, GuestMemory, Listener,
    MigrationStats, RamBlock,
};

pub const PAGE: usize = 4096;

/// A block over a fresh zeroed anonymous mapping.
pub fn block(name: &str, length: usize) -> RamBlock {
    let mapping = MmapMut::map_anon(length).expect("anonymous mapping");
    RamBlock::from_mapping(name, mapping).expect("block")
}

/// The block's bytes. Only call while no migration uses the block.
pub fn bytes(block: &RamBlock) -> &[u8] {
    // SAFETY: the block maps `len` bytes for its lifetime, and the tests call this only
    // while no migration thread touches it.
    unsafe { std::slice::from_raw_parts(block.as_ptr(), block.len() as usize) }
}

/// The block's bytes, writable. Only call while no migration uses the block.
#[allow(clippy::mut_from_ref)]
pub fn bytes_mut(block: &RamBlock) -> &mut [u8] {
    // SAFETY: as `bytes`; tests hold no other view of the block at the same time.
    unsafe { std::slice::from_raw_parts_mut(block.as_ptr(), block.len() as usize) }
}

/// Fills a block with a mix of zero, random and text-like pages, seeded.
pub fn fill_mixed(block: &RamBlock, seed: u64) {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for page in bytes_mut(block).chunks_mut(PAGE) {
        match next() % 4 {
            0 => page.fill(0),
            1 => page
                .chunks_mut(8)
                .for_each(|word| word.copy_from_slice(&next().to_le_bytes()[..word.len()])),
            _ => {
                let words = [&b"migrate "[..], b"page ", b"channel ", b"sync ", b"ram\n"];
                let mut position = 0;
                while position < page.len() {
                    let word = words[(next() % 5) as usize];
                    let length = word.len().min(page.len() - position);
                    page[position..position + length].copy_from_slice(&word[..length]);
                    position += length;
                }
            }
        }
    }
}

/// A destination listening on a fresh address of the given kind.
pub fn listener(unix: bool) -> (Listener, Address) {
    let address: Address = if unix {
        let path = std::env::temp_dir().join(format!(
            "multifd-test-{}-{}.sock",
            std::process::id(),
            next_id()
        ));
        Address::Unix(path)
    } else {
        "tcp:127.0.0.1:0".parse().expect("address")
    };
    let listener = Listener::bind(&address).expect("bind");
    let address = listener.address();
    (listener, address)
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs a destination that maps each announced block onto the matching block of
/// `memory`.
pub fn spawn_destination(
    listener: Listener,
    config: DestinationConfig,
    memory: GuestMemory,
) -> JoinHandle<Result<MigrationStats, Error>> {
    spawn_destination_with_devices(listener, config, memory, Vec::new())
}

/// Like [`spawn_destination`], loading the state of `devices`.
pub fn spawn_destination_with_devices(
    listener: Listener,
    config: DestinationConfig,
    memory: GuestMemory,
    devices: multifd::LoadDevices,
) -> JoinHandle<Result<MigrationStats, Error>> {
    std::thread::spawn(move || {
        Destination::new(config).run_with_devices(
            &listener,
            |announced: &[BlockAnnouncement]| {
                GuestMemory::new(
                    announced
                        .iter()
                        .map(|block| {
                            memory
                                .find(&block.name)
                                .map(|index| memory.blocks()[index].clone())
                                .ok_or_else(|| format!("no block {}", block.name))
                        })
                        .collect::<Result<_, _>>()?,
                )
                .map_err(|error| error.to_string())
            },
            devices,
        )
    })
}

/// Zeroed blocks with the same names and lengths as `source`.
pub fn empty_like(source: &GuestMemory) -> GuestMemory {
    GuestMemory::new(
        source
            .blocks()
            .iter()
            .map(|original| block(original.name(), original.len() as usize))
            .collect(),
    )
    .expect("memory")
}

// ---------------------------------------------------------------------------------------
// Helpers for the hostile-input and failure tests (validation, negotiation, broken
// channels): joining with a deadline, a hand-driven "raw source" speaking the wire
// protocol byte by byte, and packet builders whose bytes the tests then corrupt.
// ---------------------------------------------------------------------------------------

/// How long a test waits for any thread, or for any answer from a peer.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Joins `handle`, failing the test if the thread runs longer than `timeout` (a hang) and
/// re-raising its panic if it panicked.
pub fn join_within<T: Send + 'static>(handle: JoinHandle<T>, timeout: std::time::Duration) -> T {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-joiner".into())
        .spawn(move || {
            // The receiver is gone only if the test already failed on the deadline.
            let _ = sender.send(handle.join());
        })
        .expect("spawn the joiner");
    match receiver.recv_timeout(timeout) {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("thread still running after {timeout:?}: hang"),
    }
}

/// Runs a destination with `map_blocks` on a thread.
pub fn spawn_destination_with<F>(
    listener: Listener,
    config: DestinationConfig,
    map_blocks: F,
) -> JoinHandle<Result<MigrationStats, Error>>
where
    F: FnOnce(&[BlockAnnouncement]) -> Result<GuestMemory, String> + Send + 'static,
{
    std::thread::Builder::new()
        .name("test-destination".into())
        .spawn(move || Destination::new(config).run(&listener, map_blocks))
        .expect("spawn the destination")
}

/// A destination configuration whose timeouts end any test that goes wrong quickly.
pub fn quick_destination_config() -> DestinationConfig {
    {
        let mut config = DestinationConfig::default();
        config.wait_for_source = Some(DEADLINE);
        config.connect_timeout = DEADLINE;
        config.round_timeout = DEADLINE;
        config
    }
}

/// Page size of every raw-source test.
pub const RAW_PAGE: u32 = 4096;
/// Packet size of every raw-source test: 128 pages per packet, QEMU's default.
pub const RAW_PACKET: u32 = 512 * 1024;
/// Offsets per RAM packet with [`RAW_PACKET`].
pub const RAW_PAGES_PER_PACKET: u32 = RAW_PACKET / RAW_PAGE;

/// Byte offsets of the fields of a RAM packet (QEMU's `MultiFDPacket_t`).
pub mod ram_field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 8;
    pub const PAGES_ALLOC: usize = 12;
    pub const NORMAL_PAGES: usize = 16;
    pub const NEXT_PACKET_SIZE: usize = 20;
    pub const PACKET_NUM: usize = 24;
    pub const ZERO_PAGES: usize = 32;
    pub const RAMBLOCK: usize = 64;
    pub const OFFSETS: usize = 320;
}

/// Byte offsets of the fields of a device-state packet.
pub mod device_field {
    pub const FLAGS: usize = 8;
    pub const IDSTR: usize = 12;
    pub const INSTANCE_ID: usize = 268;
    pub const NEXT_PACKET_SIZE: usize = 272;
}

/// Overwrites a big-endian u32 at `at`.
pub fn put_u32_at(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// Overwrites a big-endian u64 at `at`.
pub fn put_u64_at(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// A valid RAM packet of [`RAW_PAGES_PER_PACKET`] offsets: `flags`, `ramblock`, the
/// normal and zero offsets, and `next_packet_size = normal × page`.
pub fn ram_packet(flags: u32, ramblock: &str, normal: &[u64], zero: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    multifd_wire::RamPacketFields {
        flags: multifd_wire::Flags(flags),
        pages_alloc: RAW_PAGES_PER_PACKET,
        next_packet_size: normal.len() as u32 * RAW_PAGE,
        packet_num: 0,
        ramblock,
        normal,
        zero,
    }
    .encode(&mut out)
    .expect("encode a RAM packet");
    assert_eq!(out.len(), 320 + 8 * RAW_PAGES_PER_PACKET as usize);
    out
}

/// A valid SYNC packet.
pub fn sync_packet() -> Vec<u8> {
    ram_packet(multifd_wire::Flags::SYNC, "", &[], &[])
}

/// A valid device-state packet (without its payload).
pub fn device_state_packet(idstr: &str, instance_id: u32, next_packet_size: u32) -> Vec<u8> {
    let mut out = Vec::new();
    multifd_wire::DeviceStatePacket {
        idstr,
        instance_id,
        next_packet_size,
    }
    .encode(&mut out)
    .expect("encode a device-state packet");
    assert_eq!(out.len(), multifd_wire::DEVICE_STATE_PACKET_LEN);
    out
}

/// A `Hello` with the raw-source settings.
pub fn raw_hello(channels: u32, uuid: [u8; 16]) -> multifd_wire::Hello {
    multifd_wire::Hello {
        protocol_version: multifd_wire::PROTOCOL_VERSION,
        uuid,
        channels,
        page_size: RAW_PAGE,
        packet_size: RAW_PACKET,
        compression: multifd_wire::Compression::None,
        compression_level: 0,
        zero_page: multifd::ZeroPageMode::Multifd,
        extensions: 0,
    }
}

/// A blocking TCP connection to `address` whose reads and writes give up after
/// [`DEADLINE`].
pub fn tcp_connect(address: &Address) -> std::net::TcpStream {
    let Address::Tcp(host_port) = address else {
        panic!("not a TCP address: {address}");
    };
    let stream = std::net::TcpStream::connect(host_port.as_str()).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.set_write_timeout(Some(DEADLINE)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// The device-state settings a [`RawSource`] announces: chunks of up to 64 KiB of state,
/// every channel shared.
pub const DEVICE_SETTINGS: multifd_wire::DeviceStateSettings = multifd_wire::DeviceStateSettings {
    max_payload: (64 << 10) + multifd_wire::DEVICE_STATE_CHUNK_HEADER_LEN as u32,
    dedicated_channels: 0,
};

/// The one 64 KiB `pc.ram` block a hand-driven source announces in the round and
/// liveness tests.
pub fn small_block_announced() -> Vec<BlockAnnouncement> {
    vec![BlockAnnouncement {
        name: "pc.ram".into(),
        length: 64 << 10,
    }]
}

/// A source driven by hand: every byte it sends is chosen by the test.
pub struct RawSource {
    pub address: Address,
    pub control: std::net::TcpStream,
    pub uuid: [u8; 16],
    /// Channel connections in the order they were opened.
    pub channels: Vec<std::net::TcpStream>,
}

impl RawSource {
    /// Connects the control channel and sends the magic, these three messages and
    /// [`DEVICE_SETTINGS`], without waiting for the answer.
    pub fn announce(
        address: &Address,
        hello: &multifd_wire::Hello,
        blocks: Vec<BlockAnnouncement>,
        devices: Vec<multifd_wire::DeviceAnnouncement>,
    ) -> Self {
        Self::announce_with(address, hello, blocks, devices, DEVICE_SETTINGS)
    }

    /// Like [`RawSource::announce`], with these device-state settings.
    pub fn announce_with(
        address: &Address,
        hello: &multifd_wire::Hello,
        blocks: Vec<BlockAnnouncement>,
        devices: Vec<multifd_wire::DeviceAnnouncement>,
        device_settings: multifd_wire::DeviceStateSettings,
    ) -> Self {
        use std::io::Write;
        let mut control = tcp_connect(address);
        control
            .write_all(&multifd_wire::CONTROL_MAGIC.to_be_bytes())
            .expect("write the control magic");
        let mut source = Self {
            address: address.clone(),
            control,
            uuid: hello.uuid,
            channels: Vec::new(),
        };
        source.send(&multifd_wire::ControlMessage::Hello(hello.clone()));
        source.send(&multifd_wire::ControlMessage::RamBlocks(blocks));
        source.send(&multifd_wire::ControlMessage::Devices(devices));
        source.send(&multifd_wire::ControlMessage::DeviceSettings(
            device_settings,
        ));
        source
    }

    /// Announces `hello` and `blocks` with no devices and expects `Welcome`.
    pub fn connect(
        address: &Address,
        hello: &multifd_wire::Hello,
        blocks: Vec<BlockAnnouncement>,
    ) -> Self {
        let mut source = Self::announce(address, hello, blocks, Vec::new());
        match source.receive() {
            multifd_wire::ControlMessage::Welcome => source,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Sends one control message.
    pub fn send(&mut self, message: &multifd_wire::ControlMessage) {
        let mut frame = Vec::new();
        message
            .encode(&mut frame)
            .expect("encode a control message");
        self.write_control(&frame);
    }

    /// Writes raw bytes on the control connection.
    pub fn write_control(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.control
            .write_all(bytes)
            .expect("write on the control connection");
    }

    /// Reads one control message, or says why none came.
    pub fn try_receive(&mut self) -> Result<multifd_wire::ControlMessage, String> {
        use std::io::Read;
        let mut header = [0u8; multifd_wire::CONTROL_FRAME_HEADER_LEN];
        self.control
            .read_exact(&mut header)
            .map_err(|error| format!("reading a frame header: {error}"))?;
        let length = multifd_wire::ControlMessage::payload_len(&header)
            .map_err(|error| format!("frame header: {error}"))?;
        let mut frame = header.to_vec();
        frame.resize(header.len() + length, 0);
        self.control
            .read_exact(&mut frame[header.len()..])
            .map_err(|error| format!("reading a frame payload: {error}"))?;
        multifd_wire::ControlMessage::decode(&frame).map_err(|error| format!("frame: {error}"))
    }

    /// Reads one control message; fails the test if none arrives within [`DEADLINE`].
    pub fn receive(&mut self) -> multifd_wire::ControlMessage {
        self.try_receive()
            .unwrap_or_else(|error| panic!("no control message: {error}"))
    }

    /// Expects the destination's `Failed` report and returns its text.
    pub fn expect_failed(&mut self) -> String {
        match self.receive() {
            multifd_wire::ControlMessage::Failed(reason) => reason,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    /// Opens a channel connection and sends this hello; returns its index in `channels`.
    pub fn open_channel_with(&mut self, hello: multifd_wire::ChannelHello) -> usize {
        self.open_channel_bytes(&hello.encode())
    }

    /// Opens a channel connection and sends these first bytes.
    pub fn open_channel_bytes(&mut self, bytes: &[u8]) -> usize {
        use std::io::Write;
        let mut stream = tcp_connect(&self.address);
        stream.write_all(bytes).expect("write a channel hello");
        self.channels.push(stream);
        self.channels.len() - 1
    }

    /// Opens channel `id` of this migration.
    pub fn open_channel(&mut self, id: u8) -> usize {
        let uuid = self.uuid;
        self.open_channel_with(multifd_wire::ChannelHello { uuid, channel: id })
    }

    /// Opens channels `0..count` in order.
    pub fn open_channels(&mut self, count: u8) {
        for id in 0..count {
            self.open_channel(id);
        }
    }

    /// Writes bytes on the channel opened `index`-th.
    pub fn write_channel(&mut self, index: usize, bytes: &[u8]) {
        use std::io::Write;
        self.channels[index]
            .write_all(bytes)
            .expect("write on a channel");
    }

    /// Ends the writing half of a channel: the destination reads EOF after what was sent.
    pub fn close_channel(&mut self, index: usize) {
        self.channels[index]
            .shutdown(std::net::Shutdown::Write)
            .expect("shut a channel down");
    }
}

/// Threads of this process whose name starts with one of `prefixes` (names as the
/// kernel keeps them, cut to 15 bytes).
pub fn threads_named(prefixes: &[&str]) -> Vec<String> {
    let mut names = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return names;
    };
    for task in tasks.flatten() {
        // A thread may end while the directory is read; it then has no name to check.
        if let Ok(name) = std::fs::read_to_string(task.path().join("comm")) {
            let name = name.trim_end().to_owned();
            if prefixes.iter().any(|prefix| name.starts_with(prefix)) {
                names.push(name);
            }
        }
    }
    names
}

/// Names of the engine's own threads (send, receive, source control, device save,
/// device load and connection-identifying threads).
pub const ENGINE_THREADS: [&str; 6] = [
    "multifd-admit",
    "multifd-send-",
    "multifd-recv-",
    "multifd-source-",
    "multifd-save-",
    "multifd-load-",
];

/// Waits up to `settle` for every engine thread to end; returns those still running.
pub fn engine_threads_after(settle: std::time::Duration) -> Vec<String> {
    let give_up = std::time::Instant::now() + settle;
    loop {
        let running = threads_named(&ENGINE_THREADS);
        if running.is_empty() || std::time::Instant::now() >= give_up {
            return running;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Seeded pseudo-random bytes in a block (incompressible, no zero pages).
pub fn fill_random(block: &RamBlock, seed: u64) {
    let mut state = seed | 1;
    for word in bytes_mut(block).chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
}

/// A TCP relay in front of `target`: each connection's first bytes (the control magic, or
/// a channel's whole hello) are forwarded as they are, then `forward` pumps the rest from
/// the source to the destination, told which channel it is (`None` for the control
/// connection). Whatever the destination answers goes straight back.
pub fn relay(
    target: &Address,
    forward: impl Fn(Option<u8>, std::net::TcpStream, std::net::TcpStream) + Send + Sync + 'static,
) -> Address {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let Address::Tcp(target) = target.clone() else {
        panic!("the relay forwards TCP only");
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let address = listener.local_addr().expect("relay address");
    let forward = std::sync::Arc::new(forward);
    std::thread::spawn(move || {
        for incoming in listener.incoming() {
            let Ok(mut from_source) = incoming else {
                return;
            };
            let mut to_destination = TcpStream::connect(&target).expect("connect through");
            let mut back = to_destination.try_clone().expect("clone");
            let mut to_source = from_source.try_clone().expect("clone");
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back, &mut to_source);
                let _ = to_source.shutdown(Shutdown::Both);
            });
            let forward = std::sync::Arc::clone(&forward);
            std::thread::spawn(move || {
                let mut first = [0u8; multifd_wire::CHANNEL_HELLO_LEN];
                if from_source.read_exact(&mut first[..4]).is_err() {
                    return;
                }
                let mut sent = 4;
                if first[..4] == multifd_wire::MULTIFD_MAGIC.to_be_bytes() {
                    if from_source.read_exact(&mut first[4..]).is_err() {
                        return;
                    }
                    sent = first.len();
                }
                let channel = multifd_wire::ChannelHello::decode(&first)
                    .map(|hello| hello.channel)
                    .ok();
                if to_destination.write_all(&first[..sent]).is_err() {
                    return;
                }
                forward(
                    channel,
                    from_source,
                    to_destination.try_clone().expect("clone"),
                );
                let _ = to_destination.shutdown(Shutdown::Write);
            });
        }
    });
    Address::Tcp(address.to_string())
}
