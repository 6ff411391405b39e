//! MQTT on the edge's wire: framing (the fixed header of every packet, sizes refused before
//! the body arrives), decoding through rumqttd's own v4/v5 codecs (plus the PUBLISH packet id
//! rumqttd keeps private), CONNECT, and the few packets the edge writes itself (CONNACK,
//! SUBACK, UNSUBACK, acknowledgements, PUBLISH to a device, DISCONNECT). Payload bytes are
//! never copied into new types.

use bytes::{Buf, Bytes, BytesMut};
use rumqttd::protocol::{self, Packet, Protocol};

mod encode;
pub use encode::{
    connack_refusal, disconnect_v5, puback_dropped, put_ack, put_publish, put_suback, put_unsuback,
    Refusal, PINGRESP,
};

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const DISCONNECT: u8 = 14;

/// MQTT 5 reason codes the edge sends.
pub mod reason {
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// MQTT 3.1.1 CONNACK return code "not authorized".
    pub const V4_NOT_AUTHORIZED: u8 = 0x05;
    /// MQTT 3.1.1 CONNACK return code "server unavailable".
    pub const V4_SERVER_UNAVAILABLE: u8 = 0x03;
}

/// Why bytes are not a valid MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("packet truncated")]
    Truncated,
    #[error("string is not UTF-8")]
    Utf8,
    #[error("unsupported protocol level {0}")]
    Protocol(u8),
    #[error("CONNECT could not be decoded: {0}")]
    Connect(String),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// The fixed header of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub byte1: u8,
    pub header_len: usize,
    pub remaining: usize,
}

impl Header {
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }

    pub fn qos(&self) -> u8 {
        (self.byte1 >> 1) & 0b11
    }
}

/// Parses the fixed header at the start of `buf`. `Ok(None)` means more bytes are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, PacketError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(Header {
                byte1,
                header_len: 2 + i,
                remaining,
            }));
        }
    }
    Err(PacketError::BadLength)
}

/// Takes the next complete packet out of `buf`, if there is one. A packet larger than
/// `max_len` is refused as soon as its header is read.
pub fn next_frame(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<(Header, Bytes)>, PacketError> {
    let Some(header) = parse_header(buf)? else {
        return Ok(None);
    };
    if header.frame_len() > max_len {
        return Err(PacketError::TooLarge(header.frame_len()));
    }
    if buf.len() < header.frame_len() {
        buf.reserve(header.frame_len() - buf.len());
        return Ok(None);
    }
    Ok(Some((header, buf.split_to(header.frame_len()).freeze())))
}

fn read_u16(b: &mut &[u8]) -> Result<u16, PacketError> {
    if b.len() < 2 {
        return Err(PacketError::Truncated);
    }
    Ok(b.get_u16())
}

fn read_bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], PacketError> {
    let len = usize::from(read_u16(b)?);
    if b.len() < len {
        return Err(PacketError::Truncated);
    }
    let (s, rest) = b.split_at(len);
    *b = rest;
    Ok(s)
}

fn read_str<'a>(b: &mut &'a [u8]) -> Result<&'a str, PacketError> {
    std::str::from_utf8(read_bytes(b)?).map_err(|_| PacketError::Utf8)
}

fn read_varint(b: &mut &[u8]) -> Result<usize, PacketError> {
    let mut value = 0usize;
    for i in 0..4 {
        if b.is_empty() {
            return Err(PacketError::Truncated);
        }
        let byte = b.get_u8();
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(PacketError::BadLength)
}

fn skip(b: &mut &[u8], n: usize) -> Result<(), PacketError> {
    if b.len() < n {
        return Err(PacketError::Truncated);
    }
    b.advance(n);
    Ok(())
}

/// Skips an MQTT 5 property block, returning the Topic Alias if one is present.
fn read_properties(b: &mut &[u8]) -> Result<Option<u16>, PacketError> {
    let len = read_varint(b)?;
    if b.len() < len {
        return Err(PacketError::Truncated);
    }
    let (mut props, rest) = b.split_at(len);
    *b = rest;
    let mut alias = None;
    while !props.is_empty() {
        let id = read_varint(&mut props)?;
        match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => skip(&mut props, 1)?,
            0x13 | 0x21 | 0x22 => skip(&mut props, 2)?,
            0x23 => alias = Some(read_u16(&mut props)?),
            0x02 | 0x11 | 0x18 | 0x27 => skip(&mut props, 4)?,
            0x0B => {
                read_varint(&mut props)?;
            }
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                read_bytes(&mut props)?;
            }
            0x26 => {
                read_bytes(&mut props)?;
                read_bytes(&mut props)?;
            }
            _ => return Err(PacketError::Truncated),
        }
    }
    Ok(alias)
}

/// What the edge needs from a PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishInfo<'a> {
    /// Empty when an MQTT 5 client uses an established topic alias.
    pub topic: &'a str,
    pub packet_id: Option<u16>,
    pub topic_alias: Option<u16>,
}

/// Decodes the topic (and, for QoS > 0, packet id and v5 topic alias) of a PUBLISH frame.
pub fn publish_info<'a>(
    header: &Header,
    frame: &'a [u8],
    v5: bool,
) -> Result<PublishInfo<'a>, PacketError> {
    let mut b = &frame[header.header_len..];
    let topic = read_str(&mut b)?;
    let packet_id = if header.qos() > 0 {
        Some(read_u16(&mut b)?)
    } else {
        None
    };
    let topic_alias = if v5 { read_properties(&mut b)? } else { None };
    Ok(PublishInfo {
        topic,
        packet_id,
        topic_alias,
    })
}

/// A decoded CONNECT.
#[derive(Debug)]
pub struct ConnectInfo {
    /// 4 (3.1.1) or 5.
    pub level: u8,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub will_topic: Option<String>,
    pub keep_alive: u16,
    packet: Packet,
}

impl ConnectInfo {
    pub fn v5(&self) -> bool {
        self.level == 5
    }

    /// The codec for the rest of the connection.
    pub fn codec(&self) -> Codec {
        if self.v5() {
            Codec::V5
        } else {
            Codec::V4
        }
    }

    /// The Will as the publish the edge makes for the device when it goes away uncleanly
    /// (QoS 0 into the router: what subscribers get is their subscription's QoS).
    pub fn will(&self) -> Option<Packet> {
        let Packet::Connect(_, _, Some(will), will_props, _) = &self.packet else {
            return None;
        };
        let props = will_props.as_ref().map(|p| protocol::PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            content_type: p.content_type.clone(),
            ..Default::default()
        });
        Some(Packet::Publish(
            protocol::Publish::new(will.topic.clone(), will.message.clone(), will.retain),
            props,
        ))
    }
}

/// One packet from a client.
#[derive(Debug)]
pub struct Decoded {
    /// Bytes on the wire.
    pub len: usize,
    /// QoS bits of the fixed header (PUBLISH).
    pub qos: u8,
    /// A PUBLISH's packet id (QoS 1 and 2).
    pub packet_id: Option<u16>,
    pub packet: Packet,
}

/// The MQTT codec of one connection (3.1.1 or 5), rumqttd's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    V4,
    V5,
}

impl Codec {
    pub fn v5(self) -> bool {
        self == Codec::V5
    }

    /// Takes the next complete packet out of `buf` and decodes it. A packet larger than
    /// `max_len` is refused as soon as its header is read.
    pub fn next_packet(
        self,
        buf: &mut BytesMut,
        max_len: usize,
    ) -> Result<Option<Decoded>, PacketError> {
        let Some(header) = parse_header(buf)? else {
            return Ok(None);
        };
        let len = header.frame_len();
        if len > max_len {
            return Err(PacketError::TooLarge(len));
        }
        if buf.len() < len {
            buf.reserve(len - buf.len());
            return Ok(None);
        }
        if !from_client(header.kind()) {
            return Err(PacketError::Malformed(format!(
                "packet type {} is not one a client sends",
                header.kind()
            )));
        }
        // rumqttd keeps a decoded PUBLISH's packet id private; the edge needs it to answer a
        // publish it drops.
        let packet_id = if header.kind() == PUBLISH {
            publish_info(&header, &buf[..len], self.v5())?.packet_id
        } else {
            None
        };
        let packet = match self {
            Codec::V4 => protocol::v4::V4.read_mut(buf, max_len),
            Codec::V5 => protocol::v5::V5.read_mut(buf, max_len),
        }
        .map_err(|e| PacketError::Malformed(format!("{e:?}")))?;
        Ok(Some(Decoded {
            len,
            qos: header.qos(),
            packet_id,
            packet,
        }))
    }

    /// Appends `packet`, encoded, to `out`.
    pub fn write(self, packet: Packet, out: &mut BytesMut) -> Result<usize, PacketError> {
        match self {
            Codec::V4 => protocol::v4::V4.write(packet, out),
            Codec::V5 => protocol::v5::V5.write(packet, out),
        }
        .map_err(|e| PacketError::Malformed(format!("{e:?}")))
    }

    /// The CONNACK accepting a device; MQTT 5 announces the edge's topic alias limit.
    pub fn connack_accepted(self, topic_alias_max: u16) -> Result<BytesMut, PacketError> {
        let props = self.v5().then(|| protocol::ConnAckProperties {
            topic_alias_max: Some(topic_alias_max),
            ..Default::default()
        });
        let ack = protocol::ConnAck {
            session_present: false,
            code: protocol::ConnectReturnCode::Success,
        };
        let mut out = BytesMut::with_capacity(16);
        self.write(Packet::ConnAck(ack, props), &mut out)?;
        Ok(out)
    }
}

/// Whether a client may send packets of this type (MQTT 3.1.1 and 5 without AUTH, which the
/// edge does not support). The others are refused before rumqttd's codec sees them: its v5
/// decoder panics on a CONNACK or UNSUBACK with a body (`unreachable!`, rumqttd 0.20), and
/// they would be protocol errors from a client anyway.
fn from_client(kind: u8) -> bool {
    matches!(
        kind,
        CONNECT
            | PUBLISH
            | PUBACK
            | PUBREC
            | PUBREL
            | PUBCOMP
            | SUBSCRIBE
            | UNSUBSCRIBE
            | PINGREQ
            | DISCONNECT
    )
}

/// Decodes a CONNECT frame (levels 4 and 5).
pub fn connect(frame: &Bytes, max_len: usize) -> Result<ConnectInfo, PacketError> {
    // Fixed header, then protocol name (2 + 4 bytes), then the level.
    let header = parse_header(frame)?.ok_or(PacketError::Truncated)?;
    if header.kind() != CONNECT {
        return Err(PacketError::Connect("not a CONNECT".into()));
    }
    let level = *frame
        .get(header.header_len + 6)
        .ok_or(PacketError::Truncated)?;
    let mut buf = BytesMut::from(&frame[..]);
    let packet = match level {
        4 => protocol::v4::V4.read_mut(&mut buf, max_len),
        5 => protocol::v5::V5.read_mut(&mut buf, max_len),
        other => return Err(PacketError::Protocol(other)),
    }
    .map_err(|e| PacketError::Connect(format!("{e:?}")))?;
    let Packet::Connect(connect, _, will, _, login) = &packet else {
        return Err(PacketError::Connect("not a CONNECT".into()));
    };
    let will_topic = match will {
        Some(w) => Some(
            std::str::from_utf8(&w.topic)
                .map_err(|_| PacketError::Utf8)?
                .to_owned(),
        ),
        None => None,
    };
    Ok(ConnectInfo {
        level,
        client_id: connect.client_id.clone(),
        username: login.as_ref().map(|l| l.username.clone()),
        password: login.as_ref().map(|l| l.password.clone().into_bytes()),
        will_topic,
        keep_alive: connect.keep_alive,
        packet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_tells_the_device_why() {
        let cases = [
            (false, Refusal::NotAuthorized, &[0x20, 2, 0, 0x05][..]),
            (false, Refusal::Unavailable, &[0x20, 2, 0, 0x03][..]),
            (false, Refusal::RateExceeded, &[0x20, 2, 0, 0x03][..]),
            (true, Refusal::NotAuthorized, &[0x20, 3, 0, 0x87, 0][..]),
            (true, Refusal::Unavailable, &[0x20, 3, 0, 0x88, 0][..]),
            (true, Refusal::RateExceeded, &[0x20, 3, 0, 0x9F, 0][..]),
        ];
        for (v5, why, bytes) in cases {
            assert_eq!(&connack_refusal(v5, why)[..], bytes, "{why:?}, v5 {v5}");
        }
    }

    fn frame(bytes: &[u8]) -> (Header, Bytes) {
        let mut buf = BytesMut::from(bytes);
        next_frame(&mut buf, 1024).unwrap().unwrap()
    }

    #[test]
    fn a_frame_is_cut_only_when_complete_and_oversized_ones_are_refused_early() {
        let mut buf = BytesMut::from(&[0x30, 0x05, 0x00][..]);
        assert_eq!(next_frame(&mut buf, 1024).unwrap(), None);
        let mut big = BytesMut::from(&[0x30, 0xFF, 0xFF, 0x03][..]);
        assert!(matches!(
            next_frame(&mut big, 1024),
            Err(PacketError::TooLarge(_))
        ));
        let mut bad = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert_eq!(
            next_frame(&mut bad, usize::MAX),
            Err(PacketError::BadLength)
        );
    }

    #[test]
    fn publish_topics_are_read_in_both_versions() {
        // QoS 1, topic "a/b", packet id 7, payload "x".
        let (h, f) = frame(&[0x32, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07, b'x']);
        let info = publish_info(&h, &f, false).unwrap();
        assert_eq!((info.topic, info.packet_id), ("a/b", Some(7)));
        // v5 QoS 0, empty topic, properties: topic alias 3.
        let (h, f) = frame(&[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x03]);
        let info = publish_info(&h, &f, true).unwrap();
        assert_eq!((info.topic, info.topic_alias), ("", Some(3)));
    }

    #[test]
    fn packets_only_a_server_sends_are_refused_before_rumqttd_decodes_them() {
        // Found by the packet_framing fuzz target: rumqttd's v5 decoder hit `unreachable!` on
        // a CONNACK or UNSUBACK with a body, killing the connection's task.
        for bytes in [
            &[0x20, 0x03, 0x00, 0x00, 0x00][..],
            &[0xB0, 0x03, 0x00, 0x01, 0x00],
            &[0x22, 0x22, 0x22],
            &[0x90, 0x03, 0x00, 0x01, 0x00],
            &[0xD0, 0x00],
        ] {
            for codec in [Codec::V4, Codec::V5] {
                let mut buf = BytesMut::from(bytes);
                let res = codec.next_packet(&mut buf, 1024);
                if bytes.len() >= 2 + usize::from(bytes[1]) {
                    assert!(
                        matches!(res, Err(PacketError::Malformed(_))),
                        "{codec:?} {bytes:02x?}: {res:?}"
                    );
                } else {
                    assert!(matches!(res, Ok(None)), "{codec:?} {bytes:02x?}: {res:?}");
                }
            }
        }
        let (_, not_connect) = frame(&[0x20, 0x07, 0, 4, b'M', b'Q', b'T', b'T', 5]);
        assert!(matches!(
            connect(&not_connect, 1024),
            Err(PacketError::Connect(_))
        ));
    }

    #[test]
    fn publishes_and_acks_encode_as_rumqttd_decodes_them() {
        for v5 in [false, true] {
            for (qos, retain) in [(0u8, false), (1, true)] {
                let mut out = BytesMut::new();
                put_publish(&mut out, b"devices/a/led", b"on", qos, 9, retain, v5);
                let codec = if v5 { Codec::V5 } else { Codec::V4 };
                let d = codec.next_packet(&mut out, 1024).unwrap().unwrap();
                assert_eq!(d.qos, qos);
                assert_eq!(d.packet_id, (qos > 0).then_some(9));
                let Packet::Publish(p, _) = d.packet else {
                    panic!("not a publish")
                };
                assert_eq!(
                    (&p.topic[..], &p.payload[..], p.retain),
                    (&b"devices/a/led"[..], &b"on"[..], retain)
                );
                assert!(out.is_empty());
            }
        }
        let mut out = BytesMut::new();
        put_suback(&mut out, 3, &[1, 0], false);
        assert_eq!(&out[..], &[0x90, 4, 0, 3, 1, 0]);
        out.clear();
        put_suback(&mut out, 3, &[1], true);
        assert_eq!(&out[..], &[0x90, 4, 0, 3, 0, 1]);
        out.clear();
        put_unsuback(&mut out, 4, 2, true);
        assert_eq!(&out[..], &[0xB0, 5, 0, 4, 0, 0, 0]);
        out.clear();
        put_ack(&mut out, PUBACK, 7);
        assert_eq!(&out[..], &[0x40, 2, 0, 7]);
    }
}
