//! The few packets the edge writes itself: CONNACK refusals, acknowledgements, SUBACK,
//! UNSUBACK, PINGRESP, DISCONNECT (v5) and PUBLISH to a device.

use bytes::{BufMut, Bytes, BytesMut};

use super::{reason, DISCONNECT, PUBACK, PUBLISH, PUBREL, SUBACK, UNSUBACK};

/// The answer to PINGREQ (the same in 3.1.1 and 5).
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];

/// Why a CONNECT is refused, as the device is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong or unknown credentials, a disabled device, a Will outside its topics: 3.1.1
    /// "not authorized" (0x05), 5 "not authorized" (0x87).
    NotAuthorized,
    /// The credentials could not be checked (the registry did not answer): try again later.
    /// 3.1.1 "server unavailable" (0x03), 5 "server unavailable" (0x88).
    Unavailable,
    /// The source address is blocked after failed logins: 3.1.1 "server unavailable"
    /// (0x03, it has nothing closer), 5 "connection rate exceeded" (0x9F).
    RateExceeded,
}

/// A CONNACK refusing the connection.
pub fn connack_refusal(v5: bool, why: Refusal) -> Bytes {
    let code = match (v5, why) {
        (true, Refusal::NotAuthorized) => reason::NOT_AUTHORIZED,
        (true, Refusal::Unavailable) => reason::SERVER_UNAVAILABLE,
        (true, Refusal::RateExceeded) => reason::CONNECTION_RATE_EXCEEDED,
        (false, Refusal::NotAuthorized) => reason::V4_NOT_AUTHORIZED,
        (false, Refusal::Unavailable | Refusal::RateExceeded) => reason::V4_SERVER_UNAVAILABLE,
    };
    if v5 {
        Bytes::copy_from_slice(&[0x20, 0x03, 0x00, code, 0x00])
    } else {
        Bytes::copy_from_slice(&[0x20, 0x02, 0x00, code])
    }
}

/// An MQTT 5 server DISCONNECT with a reason code (3.1.1 has no server DISCONNECT).
pub fn disconnect_v5(code: u8) -> Bytes {
    Bytes::copy_from_slice(&[DISCONNECT << 4, 0x02, code, 0x00])
}

/// The acknowledgement for a QoS 1 PUBLISH the edge dropped.
pub fn puback_dropped(packet_id: u16, v5: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(6);
    b.put_u8(PUBACK << 4);
    if v5 {
        b.put_u8(4);
        b.put_u16(packet_id);
        b.put_u8(reason::QUOTA_EXCEEDED);
        b.put_u8(0);
    } else {
        b.put_u8(2);
        b.put_u16(packet_id);
    }
    b.freeze()
}

/// Appends a variable-length remaining length.
fn put_remaining(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            return;
        }
    }
}

/// Appends a PUBLISH to a device. `packet_id` is used for QoS 1.
pub fn put_publish(
    out: &mut BytesMut,
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    packet_id: u16,
    retain: bool,
    v5: bool,
) {
    let qos = qos.min(1);
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + usize::from(v5) + payload.len();
    out.reserve(len + 5);
    out.put_u8((PUBLISH << 4) | (qos << 1) | u8::from(retain));
    put_remaining(out, len);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic);
    if qos > 0 {
        out.put_u16(packet_id);
    }
    if v5 {
        out.put_u8(0); // no properties
    }
    out.put_slice(payload);
}

/// Appends a two-byte acknowledgement (PUBACK, PUBREC, PUBCOMP: reason "success" is implied
/// in MQTT 5 when the remaining length is 2).
pub fn put_ack(out: &mut BytesMut, kind: u8, packet_id: u16) {
    let flags = if kind == PUBREL { 0b0010 } else { 0 };
    out.put_u8((kind << 4) | flags);
    out.put_u8(2);
    out.put_u16(packet_id);
}

/// Appends a SUBACK granting `codes` (0 or 1 per filter, 0x80/0x87 for a refusal).
pub fn put_suback(out: &mut BytesMut, packet_id: u16, codes: &[u8], v5: bool) {
    put_remaining_packet(out, SUBACK, packet_id, codes, v5);
}

/// Appends an UNSUBACK for `count` filters.
pub fn put_unsuback(out: &mut BytesMut, packet_id: u16, count: usize, v5: bool) {
    if v5 {
        put_remaining_packet(out, UNSUBACK, packet_id, &vec![0u8; count], true);
    } else {
        put_ack(out, UNSUBACK, packet_id);
    }
}

fn put_remaining_packet(out: &mut BytesMut, kind: u8, packet_id: u16, codes: &[u8], v5: bool) {
    out.put_u8(kind << 4);
    put_remaining(out, 2 + usize::from(v5) + codes.len());
    out.put_u16(packet_id);
    if v5 {
        out.put_u8(0);
    }
    out.put_slice(codes);
}
