//! Property tests: whatever a sender may encode decodes to the same values, and
//! re-encoding a decoded value gives the same bytes.

mod common;

use common::{
    chunk_header, control_message, limits_and_ram_packet, name_field_string, OwnedRamPacket,
};
use multifd_wire::{
    ChannelHello, ControlMessage, DeviceStateChunkHeader, DeviceStateLimits, DeviceStatePacket,
    Flags, PacketHeader, PacketKind, RamPacket, CONTROL_FRAME_HEADER_LEN,
    DEVICE_STATE_CHUNK_HEADER_LEN, DEVICE_STATE_PACKET_LEN, RAM_PACKET_FIXED_LEN,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn channel_hello(uuid in any::<[u8; 16]>(), channel in any::<u8>()) {
        let hello = ChannelHello { uuid, channel };
        let bytes = hello.encode();
        prop_assert_eq!(&bytes[..4], &[0x11, 0x22, 0x33, 0x44]);
        prop_assert_eq!(&bytes[8..24], &uuid);
        prop_assert_eq!(bytes[24], channel);
        prop_assert!(bytes[25..].iter().all(|&byte| byte == 0));
        prop_assert_eq!(ChannelHello::decode(&bytes), Ok(hello));
    }

    #[test]
    fn packet_header(flags in any::<u32>()) {
        let header = PacketHeader { flags: Flags(flags) };
        let mut bytes = Vec::new();
        header.encode(&mut bytes);
        prop_assert_eq!(bytes.len(), 12);
        prop_assert_eq!(&bytes[8..], &flags.to_be_bytes());
        let decoded = PacketHeader::decode(&bytes).unwrap();
        prop_assert_eq!(decoded, header);
        let expected_kind = if flags & 0x40 != 0 { PacketKind::DeviceState } else { PacketKind::Ram };
        prop_assert_eq!(decoded.kind(), expected_kind);
    }

    #[test]
    fn ram_packet((limits, packet) in limits_and_ram_packet()) {
        let bytes = packet.encode();
        prop_assert_eq!(bytes.len(), RamPacket::wire_len(packet.pages_alloc));
        prop_assert_eq!(bytes.len(), RAM_PACKET_FIXED_LEN + 8 * packet.pages_alloc as usize);
        prop_assert_eq!(
            RamPacket::total_len(&bytes[..RAM_PACKET_FIXED_LEN], &limits),
            Ok(bytes.len())
        );
        let decoded = RamPacket::decode(&bytes, &limits).unwrap();
        prop_assert_eq!(decoded.normal_pages() as usize, packet.normal.len());
        prop_assert_eq!(decoded.zero_pages() as usize, packet.zero.len());
        prop_assert_eq!(decoded.flags.is_sync(), packet.flags.is_sync());
        prop_assert_eq!(decoded.flags.compression(), Ok(limits.compression));
        let owned = OwnedRamPacket::from_decoded(&decoded);
        prop_assert_eq!(&owned, &packet);
        // Canonical: re-encoding gives the same bytes.
        prop_assert_eq!(owned.encode(), bytes);
    }

    #[test]
    fn device_state_packet(
        idstr in name_field_string(),
        instance_id in any::<u32>(),
        max_payload in 12u32..,
        size_seed in any::<u32>(),
        extensions in any::<u32>(),
    ) {
        let next_packet_size = 12 + size_seed % (max_payload - 11);
        let limits = DeviceStateLimits { max_payload, extensions };
        let packet = DeviceStatePacket { idstr: &idstr, instance_id, next_packet_size };
        let mut bytes = Vec::new();
        packet.encode(&mut bytes).unwrap();
        prop_assert_eq!(bytes.len(), DEVICE_STATE_PACKET_LEN);
        let header = PacketHeader::decode(&bytes[..12]).unwrap();
        prop_assert_eq!(header.kind(), PacketKind::DeviceState);
        prop_assert_eq!(DeviceStatePacket::decode(&bytes, &limits), Ok(packet));
    }

    #[test]
    fn device_state_chunk_header(header in chunk_header()) {
        let bytes = header.encode();
        prop_assert_eq!(bytes.len(), DEVICE_STATE_CHUNK_HEADER_LEN);
        prop_assert_eq!(&bytes[..4], &[0, 0, 0, 0]);
        prop_assert_eq!(&bytes[4..8], &header.idx.to_be_bytes());
        prop_assert_eq!(DeviceStateChunkHeader::decode(&bytes), Ok(header));
    }

    #[test]
    fn control_message_round_trip(message in control_message()) {
        let mut bytes = Vec::new();
        message.encode(&mut bytes).unwrap();
        let length = ControlMessage::payload_len(&bytes[..CONTROL_FRAME_HEADER_LEN]).unwrap();
        prop_assert_eq!(length + CONTROL_FRAME_HEADER_LEN, bytes.len());
        let decoded = ControlMessage::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded, &message);
        let mut again = Vec::new();
        decoded.encode(&mut again).unwrap();
        prop_assert_eq!(again, bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn control_messages_back_to_back(messages in proptest::collection::vec(control_message(), 1..8)) {
        // A stream of frames splits at the lengths the headers announce.
        let mut stream = Vec::new();
        for message in &messages {
            message.encode(&mut stream).unwrap();
        }
        let mut rest = &stream[..];
        for message in &messages {
            let length = ControlMessage::payload_len(&rest[..CONTROL_FRAME_HEADER_LEN]).unwrap();
            let (frame, tail) = rest.split_at(CONTROL_FRAME_HEADER_LEN + length);
            prop_assert_eq!(&ControlMessage::decode(frame).unwrap(), message);
            rest = tail;
        }
        prop_assert!(rest.is_empty());
    }
}
