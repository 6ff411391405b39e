//! Fuzz harness `packet_framing`: what the edge runs on a device's bytes, before
//! authentication (framing, the CONNECT) and after it (the pump: rumqttd's v4/v5 codecs, the
//! PUBLISH fields the edge reads itself, the ACL on topics and filters). Shared by
//! `fuzz/fuzz_targets/packet_framing.rs` and the corpus replay test
//! `broker/tests/fuzz_corpus.rs`.
//!
//! Input: the first byte picks the packet size limit (low two bits) and how many bytes each
//! read from the socket returns (the other six: 1 to 64), so packets arrive split as they do
//! on a network; the rest is the byte stream from the device.
//!
//! Checked: nothing panics; a frame is exactly its header's length and within the limit; the
//! codec consumes exactly the frame it reports; what the edge writes to a device (PUBLISH)
//! decodes to what it was given.

use bytes::BytesMut;
use companion_broker::acl;
use companion_broker::packet::{self, Codec, PacketError};
use companion_schema::DeviceId;
use rumqttd::protocol::Packet;

/// Packet size limits: tiny, the shipped default's order, MQTT's largest.
const MAX_LENS: [usize; 4] = [16, 1024, 65_536, 268_435_455 + 5];

pub fn run(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let max = MAX_LENS[usize::from(control & 0b11)];
    let chunk = usize::from(control >> 2) + 1;
    let device = DeviceId::parse("pi-1").expect("a valid device id");

    let _ = packet::parse_header(stream);
    before_authentication(stream, chunk, max, &device);
    for codec in [Codec::V4, Codec::V5] {
        after_authentication(codec, stream, chunk, max, &device);
    }
}

/// `edge::connection`: frames cut from the stream as it arrives; the first is the CONNECT.
fn before_authentication(stream: &[u8], chunk: usize, max: usize, device: &DeviceId) {
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let (header, frame) = match packet::next_frame(&mut buf, max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                // The edge closes the connection.
                Err(_) => return,
            };
            assert_eq!(frame.len(), header.frame_len());
            assert!(frame.len() <= max, "{} > {max}", frame.len());
            match header.kind() {
                packet::CONNECT => {
                    if let Ok(connect) = packet::connect(&frame, max) {
                        let _ = (connect.codec(), connect.will());
                        if let Some(topic) = &connect.will_topic {
                            let _ = acl::may_publish(device, topic);
                        }
                        let _ = acl::truncate(&connect.client_id, 64);
                    }
                }
                packet::PUBLISH => {
                    for v5 in [false, true] {
                        if let Ok(info) = packet::publish_info(&header, &frame, v5) {
                            let _ = acl::may_publish(device, info.topic);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// `edge::pump`: every complete packet decoded once, publishes and filters checked.
fn after_authentication(codec: Codec, stream: &[u8], chunk: usize, max: usize, device: &DeviceId) {
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            let decoded = match codec.next_packet(&mut buf, max) {
                Ok(Some(d)) => d,
                Ok(None) => {
                    assert_eq!(buf.len(), before, "nothing is consumed without a packet");
                    break;
                }
                // The edge closes the connection.
                Err(PacketError::TooLarge(len)) => {
                    assert!(len > max);
                    return;
                }
                Err(_) => return,
            };
            assert!(decoded.len <= max, "{} > {max}", decoded.len);
            assert_eq!(
                before - buf.len(),
                decoded.len,
                "the codec consumed a different length than the frame's"
            );
            inspect(codec, decoded, device);
        }
    }
}

fn inspect(codec: Codec, decoded: packet::Decoded, device: &DeviceId) {
    match decoded.packet {
        Packet::Publish(publish, _) => {
            if let Ok(topic) = std::str::from_utf8(&publish.topic) {
                let _ = acl::may_publish(device, topic);
            }
            // The edge's own encoder, on what a device can send: it must decode back. (The
            // edge writes only whole topics to a device, never an empty one.)
            if publish.topic.is_empty() {
                return;
            }
            let qos = decoded.qos.min(1);
            let id = decoded.packet_id.unwrap_or(1).max(1);
            let mut out = BytesMut::new();
            packet::put_publish(
                &mut out,
                &publish.topic,
                &publish.payload,
                qos,
                id,
                publish.retain,
                codec.v5(),
            );
            let written = out.len();
            let again = codec
                .next_packet(&mut out, usize::MAX)
                .expect("the edge's PUBLISH decodes")
                .expect("the edge's PUBLISH is complete");
            assert_eq!(again.len, written);
            assert!(out.is_empty());
            assert_eq!(again.qos, qos);
            assert_eq!(again.packet_id, (qos > 0).then_some(id));
            let Packet::Publish(p, _) = again.packet else {
                panic!("the edge's PUBLISH decodes as {:?}", again.packet);
            };
            assert_eq!(p.topic, publish.topic);
            assert_eq!(p.payload, publish.payload);
            assert_eq!(p.retain, publish.retain);
        }
        Packet::Subscribe(s, _) => {
            for f in &s.filters {
                let _ = acl::may_subscribe(device, &f.path);
            }
            let mut out = BytesMut::new();
            let codes = vec![0u8; s.filters.len()];
            packet::put_suback(&mut out, s.pkid, &codes, codec.v5());
        }
        Packet::Unsubscribe(u, _) => {
            for f in &u.filters {
                let _ = acl::may_subscribe(device, f);
            }
            let mut out = BytesMut::new();
            packet::put_unsuback(&mut out, u.pkid, u.filters.len(), codec.v5());
        }
        _ => {}
    }
}
