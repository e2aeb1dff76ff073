//! Control-channel frames (SPEC §3.2): byte layouts written out by hand, and every way a
//! frame is refused.

mod common;

use common::{frame, one_of_each_message};
use multifd_wire::{
    BlockAnnouncement, Compression, ControlMessage, DeviceAnnouncement, DeviceStateSettings, Hello,
    RejectCode, RejectReason, Totals, WireError, ZeroPageMode, CONTROL_FRAME_HEADER_LEN,
    CONTROL_MAGIC, MAX_CONTROL_FRAME, MULTIFD_MAGIC, PROTOCOL_VERSION,
};

fn encode(message: &ControlMessage) -> Vec<u8> {
    let mut out = Vec::new();
    message.encode(&mut out).unwrap();
    out
}

/// Checks encode == expected, decode(expected) == message and the frame header's length.
fn check_frame(message: ControlMessage, expected: &[u8]) {
    assert_eq!(encode(&message), expected, "encoding of {message:?}");
    assert_eq!(ControlMessage::decode(expected), Ok(message));
    assert_eq!(
        ControlMessage::payload_len(&expected[..CONTROL_FRAME_HEADER_LEN]),
        Ok(expected.len() - CONTROL_FRAME_HEADER_LEN)
    );
}

#[test]
fn constants() {
    assert_eq!(CONTROL_MAGIC.to_be_bytes(), *b"MFDC");
    assert_ne!(CONTROL_MAGIC, MULTIFD_MAGIC);
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(CONTROL_FRAME_HEADER_LEN, 8);
    assert_eq!(MAX_CONTROL_FRAME, 1 << 20);
}

#[test]
fn hello_frame_bytes() {
    let mut expected = Vec::new();
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 0..4: type Hello
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x30]); // 4..8: length 48
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 8..12: protocol version 1
    expected.extend_from_slice(&[
        0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, // 12..28: uuid
        0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff,
    ]);
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x08]); // 28..32: channels 8
    expected.extend_from_slice(&[0x00, 0x00, 0x10, 0x00]); // 32..36: page size 4096
    expected.extend_from_slice(&[0x00, 0x08, 0x00, 0x00]); // 36..40: packet size 512 KiB
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x04]); // 40..44: compression zstd
    expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xfd]); // 44..48: level -3
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 48..52: zero pages: multifd
    expected.extend_from_slice(&[0x00, 0x00, 0x01, 0x00]); // 52..56: extensions 0x100
    assert_eq!(expected.len(), 56);

    let mut uuid = [0u8; 16];
    for (index, byte) in uuid.iter_mut().enumerate() {
        *byte = 0xf0 + index as u8;
    }
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        uuid,
        channels: 8,
        page_size: 4096,
        packet_size: 512 << 10,
        compression: Compression::Zstd,
        compression_level: -3,
        zero_page: ZeroPageMode::Multifd,
        extensions: 0x100,
    };
    check_frame(ControlMessage::Hello(hello.clone()), &expected);

    // The other compression methods and zero-page mode.
    expected[40..44].copy_from_slice(&[0, 0, 0, 0x02]);
    expected[48..52].copy_from_slice(&[0, 0, 0, 0]);
    check_frame(
        ControlMessage::Hello(Hello {
            compression: Compression::Zlib,
            zero_page: ZeroPageMode::None,
            ..hello.clone()
        }),
        &expected,
    );
    expected[40..44].copy_from_slice(&[0, 0, 0, 0]);
    check_frame(
        ControlMessage::Hello(Hello {
            compression: Compression::None,
            zero_page: ZeroPageMode::None,
            ..hello
        }),
        &expected,
    );
}

#[test]
fn round_end_frame_bytes() {
    let expected = [
        0x00, 0x00, 0x00, 0x04, // 0..4: type RoundEnd
        0x00, 0x00, 0x00, 0x08, // 4..8: length 8
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, // 8..16: round
    ];
    check_frame(
        ControlMessage::RoundEnd {
            round: 0x1_0000_0002,
        },
        &expected,
    );
}

#[test]
fn round_received_frame_bytes() {
    let expected = [
        0x00, 0x00, 0x01, 0x05, // 0..4: type RoundReceived
        0x00, 0x00, 0x00, 0x08, // 4..8: length 8
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, // 8..16: round
    ];
    check_frame(ControlMessage::RoundReceived { round: 7 }, &expected);
}

#[test]
fn ram_blocks_frame_bytes() {
    let mut expected = Vec::new();
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x02]); // 0..4: type RamBlocks
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x26]); // 4..8: length 38
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x02]); // 8..12: two blocks
    expected.extend_from_slice(&[0x00, 0x06]); // 12..14: name length 6
    expected.extend_from_slice(b"pc.ram"); // 14..20: name
    expected.extend_from_slice(&[0, 0, 0, 0x01, 0, 0, 0, 0]); // 20..28: length 4 GiB
    expected.extend_from_slice(&[0x00, 0x08]); // 28..30: name length 8
    expected.extend_from_slice(b"vga.vram"); // 30..38: name
    expected.extend_from_slice(&[0, 0, 0, 0, 0x01, 0, 0, 0]); // 38..46: length 16 MiB
    assert_eq!(expected.len(), 46);
    check_frame(
        ControlMessage::RamBlocks(vec![
            BlockAnnouncement {
                name: "pc.ram".into(),
                length: 4 << 30,
            },
            BlockAnnouncement {
                name: "vga.vram".into(),
                length: 16 << 20,
            },
        ]),
        &expected,
    );

    // No blocks at all.
    check_frame(
        ControlMessage::RamBlocks(Vec::new()),
        &[0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 0],
    );
}

#[test]
fn devices_frame_bytes() {
    let mut expected = Vec::new();
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x03]); // 0..4: type Devices
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x1b]); // 4..8: length 27
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // 8..12: one device
    expected.extend_from_slice(&[0x00, 0x11]); // 12..14: idstr length 17
    expected.extend_from_slice(b"0000:00:02.0/vfio"); // 14..31: idstr
    expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x07]); // 31..35: instance id 7
    assert_eq!(expected.len(), 35);
    check_frame(
        ControlMessage::Devices(vec![DeviceAnnouncement {
            idstr: "0000:00:02.0/vfio".into(),
            instance_id: 7,
        }]),
        &expected,
    );
}

#[test]
fn device_settings_frame_bytes() {
    check_frame(
        ControlMessage::DeviceSettings(DeviceStateSettings {
            max_payload: 0x0010_000c,
            dedicated_channels: 2,
        }),
        &[
            0, 0, 0, 8, // type DeviceSettings
            0, 0, 0, 8, // length 8
            0, 0x10, 0, 0x0c, // max payload: 1 MiB of state + the 12-byte chunk header
            0, 0, 0, 2, // two dedicated channels
        ],
    );
}

#[test]
fn empty_frames_bytes() {
    check_frame(ControlMessage::SwitchoverStart, &[0, 0, 0, 5, 0, 0, 0, 0]);
    check_frame(ControlMessage::Welcome, &[0, 0, 0x01, 0x01, 0, 0, 0, 0]);
}

#[test]
fn totals_frames_bytes() {
    let totals = Totals {
        packets: 1,
        normal_pages: 2,
        zero_pages: 3,
        payload_bytes: 4,
        rounds: 5,
        device_chunks: 6,
        device_bytes: 0x0102_0304_0506_0708,
    };
    let mut payload = Vec::new();
    for value in 1..=6u8 {
        payload.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, value]); // one u64 per count
    }
    payload.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]); // device bytes
    assert_eq!(payload.len(), 56);

    let mut expected = vec![0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x38]; // Complete, 56
    expected.extend_from_slice(&payload);
    check_frame(ControlMessage::Complete(totals), &expected);

    let mut expected = vec![0x00, 0x00, 0x01, 0x03, 0x00, 0x00, 0x00, 0x38]; // Completed, 56
    expected.extend_from_slice(&payload);
    check_frame(ControlMessage::Completed(totals), &expected);
}

#[test]
fn reason_frames_bytes() {
    check_frame(
        ControlMessage::Abort("stop".into()),
        &[
            0x00, 0x00, 0x00, 0x07, // type Abort
            0x00, 0x00, 0x00, 0x06, // length 6
            0x00, 0x04, b's', b't', b'o', b'p', // reason
        ],
    );
    check_frame(
        ControlMessage::Failed("no".into()),
        &[
            0x00, 0x00, 0x01, 0x04, // type Failed
            0x00, 0x00, 0x00, 0x04, // length 4
            0x00, 0x02, b'n', b'o', // reason
        ],
    );
    check_frame(
        ControlMessage::Failed(String::new()),
        &[0x00, 0x00, 0x01, 0x04, 0, 0, 0, 2, 0, 0],
    );
}

#[test]
fn reject_frames_bytes() {
    let codes = [
        (RejectCode::Version, 1u8),
        (RejectCode::ChannelCount, 2),
        (RejectCode::PageSize, 3),
        (RejectCode::PacketSize, 4),
        (RejectCode::Uuid, 5),
        (RejectCode::Compression, 6),
        (RejectCode::Extensions, 7),
        (RejectCode::ZeroPage, 8),
        (RejectCode::RamBlocks, 9),
        (RejectCode::Devices, 10),
    ];
    for (code, wire) in codes {
        check_frame(
            ControlMessage::Reject(RejectReason {
                code,
                detail: "x".into(),
            }),
            &[
                0x00, 0x00, 0x01, 0x02, // type Reject
                0x00, 0x00, 0x00, 0x07, // length 7
                0x00, 0x00, 0x00, wire, // code
                0x00, 0x01, b'x', // detail
            ],
        );
    }
}

#[test]
fn encode_appends() {
    let mut out = vec![0xaa, 0xbb];
    ControlMessage::Welcome.encode(&mut out).unwrap();
    ControlMessage::RoundEnd { round: 9 }
        .encode(&mut out)
        .unwrap();
    assert_eq!(
        out,
        [
            0xaa, 0xbb, // what was there
            0, 0, 1, 1, 0, 0, 0, 0, // Welcome
            0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 9, // RoundEnd 9
        ]
    );
}

#[test]
fn every_message_round_trips() {
    for message in one_of_each_message() {
        let bytes = encode(&message);
        assert_eq!(ControlMessage::decode(&bytes), Ok(message));
    }
}

// ---- refusals ----

#[test]
fn frame_header_truncated_or_long() {
    assert_eq!(
        ControlMessage::payload_len(&[0, 0, 0, 4, 0, 0, 0]),
        Err(WireError::Truncated {
            structure: "control frame header",
            needed: 8,
            available: 7,
        })
    );
    assert_eq!(
        ControlMessage::payload_len(&[]),
        Err(WireError::Truncated {
            structure: "control frame header",
            needed: 4,
            available: 0,
        })
    );
    assert_eq!(
        ControlMessage::payload_len(&[0, 0, 0, 4, 0, 0, 0, 8, 0]),
        Err(WireError::TrailingBytes {
            structure: "control frame header",
            count: 1,
        })
    );
}

#[test]
fn frame_above_cap() {
    // Exactly the cap is fine; one more is not.
    assert_eq!(
        ControlMessage::payload_len(&[0, 0, 0, 2, 0x00, 0x10, 0x00, 0x00]),
        Ok(1 << 20)
    );
    assert_eq!(
        ControlMessage::payload_len(&[0, 0, 0, 2, 0x00, 0x10, 0x00, 0x01]),
        Err(WireError::FrameTooLarge {
            length: 0x10_0001,
            max: 0x10_0000,
        })
    );
    assert_eq!(
        ControlMessage::payload_len(&[0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff]),
        Err(WireError::FrameTooLarge {
            length: u32::MAX,
            max: MAX_CONTROL_FRAME,
        })
    );
    // decode refuses the length before looking for the payload.
    assert_eq!(
        ControlMessage::decode(&[0, 0, 0, 2, 0x00, 0x10, 0x00, 0x01]),
        Err(WireError::FrameTooLarge {
            length: 0x10_0001,
            max: 0x10_0000,
        })
    );
    // Even for an unknown type.
    assert_eq!(
        ControlMessage::decode(&[0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        Err(WireError::FrameTooLarge {
            length: u32::MAX,
            max: MAX_CONTROL_FRAME,
        })
    );
}

#[test]
fn frame_exactly_at_cap_round_trips() {
    // 4 (count) + 15 * (2 + 65535 + 8) + (2 + 65387 + 8) = 1 MiB exactly.
    let mut blocks: Vec<BlockAnnouncement> = (0..15)
        .map(|index| BlockAnnouncement {
            name: "n".repeat(65535),
            length: index,
        })
        .collect();
    blocks.push(BlockAnnouncement {
        name: "m".repeat(65387),
        length: 99,
    });
    let message = ControlMessage::RamBlocks(blocks);
    let bytes = encode(&message);
    assert_eq!(bytes.len(), 8 + (1 << 20));
    assert_eq!(&bytes[4..8], &[0x00, 0x10, 0x00, 0x00]);
    assert_eq!(ControlMessage::decode(&bytes), Ok(message));
}

#[test]
fn encode_refuses_frame_above_cap() {
    // 4 + 17 * (2 + 65535 + 8) = 1_114_269 bytes.
    let message = ControlMessage::RamBlocks(
        (0..17)
            .map(|_| BlockAnnouncement {
                name: "n".repeat(65535),
                length: 0,
            })
            .collect(),
    );
    let mut out = vec![1, 2, 3];
    assert_eq!(
        message.encode(&mut out),
        Err(WireError::FrameTooLarge {
            length: 1_114_269,
            max: MAX_CONTROL_FRAME,
        })
    );
    assert_eq!(out, [1, 2, 3], "nothing written on error");

    let message = ControlMessage::Devices(
        (0..17)
            .map(|_| DeviceAnnouncement {
                idstr: "d".repeat(65535),
                instance_id: 0,
            })
            .collect(),
    );
    assert_eq!(
        message.encode(&mut Vec::new()),
        Err(WireError::FrameTooLarge {
            length: 4 + 17 * (2 + 65535 + 4),
            max: MAX_CONTROL_FRAME,
        })
    );
}

#[test]
fn encode_refuses_strings_too_long() {
    let long = "z".repeat(65536);
    let cases = [
        (
            ControlMessage::RamBlocks(vec![BlockAnnouncement {
                name: long.clone(),
                length: 1,
            }]),
            "block name",
        ),
        (
            ControlMessage::Devices(vec![DeviceAnnouncement {
                idstr: long.clone(),
                instance_id: 1,
            }]),
            "device idstr",
        ),
        (ControlMessage::Abort(long.clone()), "abort reason"),
        (ControlMessage::Failed(long.clone()), "failure reason"),
        (
            ControlMessage::Reject(RejectReason {
                code: RejectCode::Uuid,
                detail: long.clone(),
            }),
            "reject detail",
        ),
    ];
    for (message, field) in cases {
        let mut out = vec![9];
        assert_eq!(
            message.encode(&mut out),
            Err(WireError::NameTooLong {
                field,
                length: 65536
            })
        );
        assert_eq!(out, [9], "nothing written on error");
    }
    // 65535 bytes is the longest string.
    let message = ControlMessage::Abort("z".repeat(65535));
    assert_eq!(ControlMessage::decode(&encode(&message)), Ok(message));
}

#[test]
fn frame_truncated() {
    assert_eq!(
        ControlMessage::decode(&[0, 0, 0, 4]),
        Err(WireError::Truncated {
            structure: "control frame",
            needed: 8,
            available: 4,
        })
    );
    // The length says 8 payload bytes, 4 are there.
    assert_eq!(
        ControlMessage::decode(&[0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0, 1]),
        Err(WireError::Truncated {
            structure: "control frame",
            needed: 16,
            available: 12,
        })
    );
}

#[test]
fn frame_trailing_bytes() {
    let mut bytes = encode(&ControlMessage::RoundEnd { round: 1 });
    bytes.push(0);
    assert_eq!(
        ControlMessage::decode(&bytes),
        Err(WireError::TrailingBytes {
            structure: "control frame",
            count: 1,
        })
    );
}

#[test]
fn payload_shorter_than_message() {
    assert_eq!(
        ControlMessage::decode(&frame(4, &[0, 0, 0, 1])),
        Err(WireError::Truncated {
            structure: "control message",
            needed: 8,
            available: 4,
        })
    );
    let hello = encode(&one_of_each_message()[0]);
    assert_eq!(hello.len(), 56);
    assert_eq!(
        ControlMessage::decode(&frame(1, &hello[8..55])),
        Err(WireError::Truncated {
            structure: "control message",
            needed: 48,
            available: 47,
        })
    );
    assert_eq!(
        ControlMessage::decode(&frame(6, &[0; 55])),
        Err(WireError::Truncated {
            structure: "control message",
            needed: 56,
            available: 55,
        })
    );
    // The count says three blocks; one is there (4 + 2 + 1 + 8 = 15 bytes).
    assert_eq!(
        ControlMessage::decode(&frame(2, &[0, 0, 0, 3, 0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 1])),
        Err(WireError::Truncated {
            structure: "control message",
            needed: 17,
            available: 15,
        })
    );
    // A huge count over an empty list fails at once, without allocating for it.
    assert_eq!(
        ControlMessage::decode(&frame(3, &[0xff, 0xff, 0xff, 0xff])),
        Err(WireError::Truncated {
            structure: "control message",
            needed: 6,
            available: 4,
        })
    );
    // A string length past the payload.
    assert_eq!(
        ControlMessage::decode(&frame(7, &[0x01, 0x00, b'a', b'b'])),
        Err(WireError::Truncated {
            structure: "control message",
            needed: 258,
            available: 4,
        })
    );
    // A reject without its detail.
    assert_eq!(
        ControlMessage::decode(&frame(0x102, &[0, 0, 0, 1])),
        Err(WireError::Truncated {
            structure: "control message",
            needed: 6,
            available: 4,
        })
    );
}

#[test]
fn payload_trailing_bytes() {
    assert_eq!(
        ControlMessage::decode(&frame(4, &[0, 0, 0, 0, 0, 0, 0, 1, 0])),
        Err(WireError::TrailingBytes {
            structure: "control message",
            count: 1,
        })
    );
    assert_eq!(
        ControlMessage::decode(&frame(5, &[0, 0])),
        Err(WireError::TrailingBytes {
            structure: "control message",
            count: 2,
        })
    );
    assert_eq!(
        ControlMessage::decode(&frame(0x101, &[1])),
        Err(WireError::TrailingBytes {
            structure: "control message",
            count: 1,
        })
    );
    // Every message refuses trailing bytes inside its frame.
    for message in one_of_each_message() {
        let bytes = encode(&message);
        let mut payload = bytes[8..].to_vec();
        payload.extend_from_slice(&[0, 0, 0]);
        let message_type = u32::from_be_bytes(bytes[..4].try_into().unwrap());
        assert_eq!(
            ControlMessage::decode(&frame(message_type, &payload)),
            Err(WireError::TrailingBytes {
                structure: "control message",
                count: 3,
            }),
            "{message:?}"
        );
    }
}

#[test]
fn unknown_message_types() {
    for message_type in [0, 9, 0x100, 0x106, 0x4d46_4443, u32::MAX] {
        assert_eq!(
            ControlMessage::decode(&frame(message_type, &[])),
            Err(WireError::UnknownMessageType(message_type))
        );
    }
}

#[test]
fn an_unknown_reject_code_keeps_its_detail() {
    for code in [0u32, 11, u32::MAX] {
        let message = ControlMessage::Reject(RejectReason {
            code: RejectCode::Unrecognized(code),
            detail: "a reason from a newer peer".into(),
        });
        let bytes = encode(&message);
        assert_eq!(bytes[8..12], code.to_be_bytes());
        assert_eq!(ControlMessage::decode(&bytes), Ok(message));
    }
}

/// A valid Hello payload (48 bytes) to corrupt.
fn hello_payload() -> Vec<u8> {
    encode(&one_of_each_message()[0])[8..].to_vec()
}

#[test]
fn invalid_zero_page_mode() {
    for mode in [2u32, 0x100, u32::MAX] {
        let mut payload = hello_payload();
        payload[40..44].copy_from_slice(&mode.to_be_bytes()); // zero-page mode
        assert_eq!(
            ControlMessage::decode(&frame(1, &payload)),
            Err(WireError::InvalidValue {
                field: "zero-page mode",
                value: mode.into(),
            })
        );
    }
}

#[test]
fn hello_compression_refused() {
    for (value, expected) in [
        (0x08u32, WireError::UnsupportedCompression("qpl")),
        (0x10, WireError::UnsupportedCompression("uadk")),
        (0x20, WireError::UnsupportedCompression("qatzip")),
        (0x01, WireError::UnknownCompression(0x01)),
        (0x03, WireError::UnknownCompression(0x03)),
        (0x40, WireError::UnknownCompression(0x40)),
    ] {
        let mut payload = hello_payload();
        payload[32..36].copy_from_slice(&value.to_be_bytes()); // compression
        assert_eq!(ControlMessage::decode(&frame(1, &payload)), Err(expected));
    }
}

#[test]
fn strings_not_utf8() {
    let bad = [0x00, 0x02, 0xc3, 0x28]; // length 2, an invalid UTF-8 sequence
    let mut blocks = vec![0, 0, 0, 1];
    blocks.extend_from_slice(&bad);
    blocks.extend_from_slice(&[0; 8]);
    let mut devices = vec![0, 0, 0, 1];
    devices.extend_from_slice(&bad);
    devices.extend_from_slice(&[0; 4]);
    let mut reject = vec![0, 0, 0, 1];
    reject.extend_from_slice(&bad);
    for (message_type, payload, field) in [
        (2u32, blocks, "block name"),
        (3, devices, "device idstr"),
        (7, bad.to_vec(), "abort reason"),
        (0x102, reject, "reject detail"),
        (0x104, bad.to_vec(), "failure reason"),
    ] {
        assert_eq!(
            ControlMessage::decode(&frame(message_type, &payload)),
            Err(WireError::NotUtf8 { field })
        );
    }
}
