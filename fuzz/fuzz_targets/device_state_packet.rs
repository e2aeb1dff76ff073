//! Device-state packets: `DeviceStatePacket::decode` under several limits. Whatever
//! decodes must re-encode to 276 bytes that decode to the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd_wire::{DeviceStateLimits, DeviceStatePacket, DEVICE_STATE_PACKET_LEN};

const LIMITS: [DeviceStateLimits; 3] = [
    DeviceStateLimits {
        max_payload: 1 << 20,
        extensions: 0,
    },
    DeviceStateLimits {
        max_payload: 0,
        extensions: u32::MAX,
    },
    DeviceStateLimits {
        max_payload: u32::MAX,
        extensions: 0x100,
    },
];

fuzz_target!(|data: &[u8]| {
    for limits in &LIMITS {
        let Ok(packet) = DeviceStatePacket::decode(data, limits) else {
            continue;
        };
        assert!(packet.next_packet_size >= 12);
        assert!(packet.next_packet_size <= limits.max_payload);
        let mut out = Vec::new();
        packet
            .encode(&mut out)
            .expect("a decoded packet re-encodes");
        assert_eq!(out.len(), DEVICE_STATE_PACKET_LEN);
        assert_eq!(DeviceStatePacket::decode(&out, limits), Ok(packet));
    }
});
