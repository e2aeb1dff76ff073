//! One device's reassembler under a hostile chunk sequence: inserts of any idx, config
//! flag and length, interleaved with pops. It must never panic or overflow, release
//! chunks strictly in idx order, never hold more than its cap, and after the config chunk
//! is released accept nothing more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd::bench_internals::Reassembler;

/// A small cap, so the cap is hit often.
const CAP: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let mut chunks = Reassembler::new(CAP);
    let mut next = 0u64;
    let mut done = false;
    for operation in data.chunks(6) {
        let [kind, a, b, c, d, length] = match operation {
            &[kind, a, b, c, d, length] => [kind, a, b, c, d, length],
            _ => return,
        };
        if kind % 3 == 0 {
            while let Some((payload, config)) = chunks.pop() {
                let payload: Vec<u8> = payload;
                assert!(!done, "a chunk after the released config");
                assert_eq!(u64::from(payload[0]), next % 256, "out of order");
                next += 1;
                done = config;
            }
        } else {
            let idx = u32::from_be_bytes([a, b, c, d]);
            let config = kind % 3 == 2;
            // Each payload starts with its idx's low byte, so order can be checked.
            let payload = vec![idx as u8; 1 + usize::from(length) * 8];
            let _ = chunks.insert(idx, config, payload);
        }
        let _ = chunks.missing();
    }
});
