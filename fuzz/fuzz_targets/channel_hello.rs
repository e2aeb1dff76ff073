//! Channel hellos: `ChannelHello::decode`. Whatever decodes must re-encode to 64 bytes
//! that decode to the same values (the reserved bytes are ignored, so the bytes may
//! differ there and only there).
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd_wire::ChannelHello;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = ChannelHello::decode(data) {
        let bytes = hello.encode();
        assert_eq!(&bytes[..25], &data[..25]);
        assert_eq!(ChannelHello::decode(&bytes), Ok(hello));
    }
});
