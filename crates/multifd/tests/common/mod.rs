//! Shared helpers for the engine's integration tests: guest memory over anonymous
//! mappings, page patterns, and running a destination on a thread.
#![allow(dead_code)]

use std::thread::JoinHandle;

use memmap2::{MmapMut, MmapRaw};
use multifd::{
    Address, BlockAnnouncement, Destination, DestinationConfig, Error, GuestMemory, Listener,
    MigrationStats, RamBlock,
};

pub const PAGE: usize = 4096;

/// A block over a fresh zeroed anonymous mapping.
pub fn block(name: &str, length: usize) -> RamBlock {
    let mapping = MmapMut::map_anon(length).expect("anonymous mapping");
    RamBlock::from_mapping(name, MmapRaw::from(mapping)).expect("block")
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
    std::thread::spawn(move || {
        Destination::new(config).run(&listener, |announced: &[BlockAnnouncement]| {
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
        })
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
