//! Control frames: `ControlMessage::payload_len` and `ControlMessage::decode`. Whatever
//! decodes must re-encode to the same frame, byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd_wire::{ControlMessage, CONTROL_FRAME_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let payload_len =
        ControlMessage::payload_len(data.get(..CONTROL_FRAME_HEADER_LEN).unwrap_or(data));
    if let Ok(message) = ControlMessage::decode(data) {
        assert_eq!(payload_len, Ok(data.len() - CONTROL_FRAME_HEADER_LEN));
        let mut out = Vec::new();
        message
            .encode(&mut out)
            .expect("a decoded message re-encodes");
        assert_eq!(out, data);
        assert_eq!(ControlMessage::decode(&out), Ok(message));
    }
});
