//! A whole destination fed hostile bytes over real sockets: a valid handshake for one
//! channel and one 64 KiB block, then the input split between the control connection
//! and the channel. The destination must end with an error or a completion, never a
//! panic, a crash or a hang (the timeouts are short, so a hang shows as a slow input).
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use multifd::{
    Address, BlockAnnouncement, Destination, DestinationConfig, GuestMemory, Listener, RamBlock,
};
use multifd_wire::{
    ChannelHello, Compression, ControlMessage, DeviceStateSettings, Hello, ZeroPageMode,
    CONTROL_MAGIC, PROTOCOL_VERSION,
};

const BLOCK_LEN: usize = 64 << 10;
const UUID: [u8; 16] = [7; 16];
/// Short enough that an input that stalls the destination costs a fraction of a second.
const TIMEOUT: Duration = Duration::from_millis(200);

fn frame(message: &ControlMessage) -> Vec<u8> {
    let mut bytes = Vec::new();
    message.encode(&mut bytes).expect("encode");
    bytes
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("fuzz.sock");
    let listener = Listener::bind(&Address::Unix(path.clone())).expect("bind");
    let mut config = DestinationConfig::default();
    config.connect_timeout = TIMEOUT;
    config.round_timeout = TIMEOUT;
    config.idle_timeout = TIMEOUT;
    config.wait_for_source = Some(TIMEOUT);
    config.memory_zeroed = true;
    let destination = std::thread::spawn(move || {
        Destination::new(config).run(&listener, |_| {
            let mapping =
                memmap2::MmapMut::map_anon(BLOCK_LEN).map_err(|error| error.to_string())?;
            let block =
                RamBlock::from_mapping("pc.ram", mapping).map_err(|error| error.to_string())?;
            GuestMemory::new(vec![block]).map_err(|error| error.to_string())
        })
    });
    let mut control = UnixStream::connect(&path).expect("connect");
    let mut handshake = CONTROL_MAGIC.to_be_bytes().to_vec();
    handshake.extend(frame(&ControlMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        uuid: UUID,
        channels: 1,
        page_size: 4096,
        packet_size: 512 << 10,
        compression: Compression::None,
        compression_level: 0,
        zero_page: ZeroPageMode::Multifd,
        extensions: 0,
    })));
    handshake.extend(frame(&ControlMessage::RamBlocks(vec![BlockAnnouncement {
        name: "pc.ram".into(),
        length: BLOCK_LEN as u64,
    }])));
    handshake.extend(frame(&ControlMessage::Devices(Vec::new())));
    handshake.extend(frame(&ControlMessage::DeviceSettings(
        DeviceStateSettings {
            max_payload: (64 << 10) + 12,
            dedicated_channels: 0,
        },
    )));
    let _ = control.write_all(&handshake);
    let mut channel = UnixStream::connect(&path).expect("connect");
    let _ = channel.write_all(
        &ChannelHello {
            uuid: UUID,
            channel: 0,
        }
        .encode(),
    );
    let (to_channel, to_control) = data.split_at(data.len() * usize::from(split) / 256);
    let _ = channel.write_all(to_channel);
    let _ = control.write_all(to_control);
    let _ = channel.shutdown(Shutdown::Write);
    let _ = control.shutdown(Shutdown::Write);
    let _ = destination
        .join()
        .expect("the destination thread must not panic");
});
