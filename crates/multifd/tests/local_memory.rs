//! Local migration: the source hands its memfd-backed RAM blocks over as descriptors on a
//! Unix control socket; the destination maps the same memory, no page crosses a channel,
//! and device state still moves. Refused where it cannot work, with a clear error.

mod common;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use common::*;
use std::io::Write;

use multifd::{
    Destination, DeviceError, DeviceId, Error, GuestMemory, LoadDevice, RamBlock, SaveDevice,
    SaveDevices, Source, SourceConfig, StateWriter,
};

/// A memfd of `length` bytes mapped as block `name`.
fn memfd_block(name: &str, length: u64) -> RamBlock {
    let label = std::ffi::CString::new(name).expect("name");
    // SAFETY: `label` is a valid C string for the call; the result is checked.
    let fd = unsafe { libc::memfd_create(label.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(length).expect("size");
    RamBlock::map_file(name, &file, true).expect("map")
}

fn local_config() -> SourceConfig {
    let mut config = SourceConfig::default();
    config.local_memory = true;
    config
}

#[test]
fn local_memory_is_handed_over_not_copied() {
    let memory = GuestMemory::new(vec![
        memfd_block("pc.ram", 8 << 20),
        memfd_block("vga.vram", 1 << 20),
    ])
    .expect("memory");
    fill_mixed(&memory.blocks()[0], 5);
    fill_random(&memory.blocks()[1], 6);
    let expected: Vec<Vec<u8>> = memory.blocks().iter().map(|b| bytes(b).to_vec()).collect();
    let (listener, address) = listener(true);
    let destination = Arc::new(Destination::new(quick_destination_config()));
    let receiving = {
        let destination = Arc::clone(&destination);
        std::thread::spawn(move || {
            destination.run(
                &listener,
                |_| Err("a local migration maps no memory".into()),
            )
        })
    };
    let mut source = Source::connect(&address, &local_config(), memory.clone()).expect("connect");
    source.queue_block(0).expect("queue");
    source.queue_block(1).expect("queue");
    let sent = source.complete().expect("complete");
    let received = join_within(receiving, DEADLINE).expect("destination");
    assert_eq!(sent.normal_pages + sent.zero_pages, 0, "no page was sent");
    assert_eq!(received.normal_pages + received.zero_pages, 0);
    let moved = destination.local_memory().expect("the handed-over memory");
    for (block, expected) in moved.blocks().iter().zip(&expected) {
        assert!(
            bytes(block) == expected.as_slice(),
            "{} differs",
            block.name()
        );
    }
    // Shared, not copied: a write on one side shows on the other.
    bytes_mut(&memory.blocks()[0])[4096] ^= 0xff;
    assert_eq!(bytes(&moved.blocks()[0])[4096], expected[0][4096] ^ 0xff);
}

#[test]
fn local_memory_is_refused_where_it_cannot_work() {
    let files = GuestMemory::new(vec![memfd_block("pc.ram", 1 << 20)]).expect("memory");
    let (_tcp_listener, tcp) = listener(false);
    match Source::connect(&tcp, &local_config(), files) {
        Err(Error::Config(message)) => {
            assert!(
                message.starts_with("local memory needs a unix: address"),
                "{message}"
            );
        }
        other => panic!("expected a configuration error, got {:?}", other.err()),
    }
    let anonymous = GuestMemory::new(vec![block("pc.ram", 1 << 20)]).expect("memory");
    let (_unix_listener, unix) = listener(true);
    match Source::connect(&unix, &local_config(), anonymous) {
        Err(Error::Config(message)) => assert_eq!(
            message,
            "local memory: ramblock \"pc.ram\" is not a mapped file (a memfd or a file on tmpfs)"
        ),
        other => panic!("expected a configuration error, got {:?}", other.err()),
    }
}

/// A device whose config load takes long, and says when it starts.
struct SlowConfig(std::sync::mpsc::Sender<()>);

impl LoadDevice for SlowConfig {
    fn load_state(&mut self, _chunk: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }

    fn load_config(&mut self, _config: &[u8]) -> Result<(), DeviceError> {
        let _ = self.0.send(());
        std::thread::sleep(std::time::Duration::from_secs(3));
        Ok(())
    }
}

struct SmallDevice;

impl SaveDevice for SmallDevice {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        state.write_all(&[3; 4096])?;
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        Ok(vec![1; 8])
    }
}

/// Once `Complete` is sent, the destination of a local migration may run the guest on the
/// memory both map: a source that then loses track of the outcome (here, cancelled while
/// the destination still loads) reports the handover as unconfirmed, so that nobody
/// resumes the guest on the source too.
#[test]
fn a_local_handover_whose_outcome_is_unknown_is_not_a_plain_failure() {
    let memory = GuestMemory::new(vec![memfd_block("pc.ram", 1 << 20)]).expect("memory");
    let (listener, address) = listener(true);
    let (loading, started) = std::sync::mpsc::channel();
    let device = DeviceId::new("slow", 0);
    let destination = spawn_destination_with_devices(
        listener,
        quick_destination_config(),
        empty_like(&memory),
        vec![(device.clone(), Box::new(SlowConfig(loading)))],
    );
    let devices: SaveDevices = vec![(device, Box::new(SmallDevice))];
    let mut source =
        Source::connect_with_devices(&address, &local_config(), memory, devices).expect("connect");
    source.queue_block(0).expect("queue");
    let cancel = source.cancel_handle();
    let canceller = std::thread::spawn(move || {
        started.recv().expect("the config load starts");
        // Well after the source sent `Complete`, while the destination still loads.
        std::thread::sleep(std::time::Duration::from_secs(1));
        cancel.cancel();
    });
    match source.complete() {
        Err(error @ Error::HandoverUnconfirmed { .. }) => {
            assert!(error.to_string().contains("not resumed"), "{error}");
        }
        other => panic!("expected HandoverUnconfirmed, got {other:?}"),
    }
    canceller.join().expect("canceller");
    // The destination learns the source went away.
    let _ = join_within(destination, DEADLINE);
}
