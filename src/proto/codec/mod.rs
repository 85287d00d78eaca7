//! The MQTT wire format for 3.1 (`MQIsdp`, level 3), 3.1.1 (`MQTT`, level 4)
//! and 5.0 (`MQTT`, level 5): one type per control packet, one file per family.
//!
//! Decoding is incremental and zero-copy: [`decode`] returns `Ok(None)` until a
//! whole packet is buffered, rejects an oversized packet from its fixed header
//! before the body arrives, and hands out payloads, topics and strings as
//! slices of the read buffer (`Bytes` / `ByteString`). Every malformed-packet
//! rule of the specs yields a [`DecodeError`] that knows what the peer is owed.
//!
//! One set of types serves all three versions. Fields that only exist in 5.0
//! (`properties`, reason codes on acknowledgements) are `None` / `0` for 3.x,
//! and the encoder leaves them out when writing 3.x.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use std::num::NonZeroU16;

use crate::proto::topic::{TopicFilter, TopicName};

mod connect;
mod error;
mod header;
pub(crate) mod properties;
mod publish;
mod simple;
mod subscribe;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;
pub(crate) mod wire;

pub use error::DecodeError;
pub use header::{FixedHeader, MAX_REMAINING_LENGTH};
pub use properties::Properties;

/// The protocol level a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V3_1_1,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// True for 5.0, the only version with properties and reason codes.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

/// Quality of service of a PUBLISH or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QoS {
    /// QoS 0: fire and forget.
    AtMostOnce = 0,
    /// QoS 1: acknowledged by PUBACK, may be duplicated.
    AtLeastOnce = 1,
    /// QoS 2: PUBREC / PUBREL / PUBCOMP, delivered exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for wire value `v`; 3 and above are malformed (MQTT-3.3.1-4).
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A packet identifier: never zero (MQTT-2.3.1-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketId(pub NonZeroU16);

impl PacketId {
    /// `None` for 0, which no packet that carries an identifier may use.
    pub fn new(v: u16) -> Option<PacketId> {
        NonZeroU16::new(v).map(PacketId)
    }

    /// The identifier's wire value.
    pub fn get(self) -> u16 {
        self.0.get()
    }
}

/// CONNACK return codes of MQTT 3.1 / 3.1.1 (§3.2.2.3).
pub mod return_code {
    /// 0x00 Connection accepted.
    pub const ACCEPTED: u8 = 0;
    /// 0x01 The server does not support the requested protocol level.
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 1;
    /// 0x02 The client identifier is well-formed UTF-8 but not allowed.
    pub const IDENTIFIER_REJECTED: u8 = 2;
    /// 0x03 The MQTT service is unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 3;
    /// 0x04 The user name or password is malformed or wrong.
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 4;
    /// 0x05 The client is not authorized to connect.
    pub const NOT_AUTHORIZED: u8 = 5;
}

/// MQTT 5.0 reason codes (§2.4) used by CONNACK, acknowledgements,
/// DISCONNECT and AUTH.
pub mod reason {
    #![allow(missing_docs)]
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const REAUTHENTICATE: u8 = 0x19;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const USE_ANOTHER_SERVER: u8 = 0x9C;
    pub const SERVER_MOVED: u8 = 0x9D;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (type 1). Boxed: it is large and rare.
    Connect(Box<Connect>),
    /// CONNACK (type 2).
    ConnAck(ConnAck),
    /// PUBLISH (type 3).
    Publish(Publish),
    /// PUBACK (type 4).
    PubAck(PubResp),
    /// PUBREC (type 5).
    PubRec(PubResp),
    /// PUBREL (type 6).
    PubRel(PubResp),
    /// PUBCOMP (type 7).
    PubComp(PubResp),
    /// SUBSCRIBE (type 8).
    Subscribe(Subscribe),
    /// SUBACK (type 9).
    SubAck(SubAck),
    /// UNSUBSCRIBE (type 10).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (type 11).
    UnsubAck(UnsubAck),
    /// PINGREQ (type 12).
    PingReq,
    /// PINGRESP (type 13).
    PingResp,
    /// DISCONNECT (type 14).
    Disconnect(Disconnect),
    /// AUTH (type 15, 5.0 only).
    Auth(Auth),
}

/// CONNECT: the first packet of every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The protocol the client speaks; every later packet is decoded by it.
    pub protocol: ProtocolVersion,
    /// cleanSession (3.x) / Clean Start (5.0).
    pub clean_start: bool,
    /// Keep-alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// The client identifier; may be empty (the broker decides what that means).
    pub client_id: ByteString,
    /// The will message, when the Will Flag is set.
    pub will: Option<LastWill>,
    /// User name, when its flag is set.
    pub username: Option<ByteString>,
    /// Password, when its flag is set (binary data).
    pub password: Option<Bytes>,
    /// CONNECT properties (5.0 only).
    pub properties: Option<Box<Properties>>,
}

/// The will of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// Where the will is published (no wildcards).
    pub topic: TopicName,
    /// The will payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// Will properties (5.0 only): will delay, message expiry, content type, ...
    pub properties: Option<Box<Properties>>,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present; always written as 0 for 3.1, which has no such flag.
    pub session_present: bool,
    /// [`return_code`] for 3.x, [`reason`] code for 5.0.
    pub code: u8,
    /// CONNACK properties (5.0 only).
    pub properties: Option<Box<Properties>>,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP: this is a redelivery.
    pub dup: bool,
    /// Delivery QoS.
    pub qos: QoS,
    /// RETAIN.
    pub retain: bool,
    /// Topic; empty only for a 5.0 PUBLISH that names it by Topic Alias.
    pub topic: TopicName,
    /// Present exactly when `qos` > 0 (MQTT-2.3.1-5).
    pub packet_id: Option<PacketId>,
    /// Application payload: a slice of the read buffer, shared on fan-out.
    pub payload: Bytes,
    /// PUBLISH properties (5.0 only).
    pub properties: Option<Box<Properties>>,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubResp {
    /// The identifier of the PUBLISH this acknowledges.
    pub packet_id: PacketId,
    /// Reason code (5.0; always 0 for 3.x). Omitted on the wire when 0 and
    /// there are no properties (MQTT 5 §3.4.2.1).
    pub reason: u8,
    /// Properties (5.0 only).
    pub properties: Option<Box<Properties>>,
}

/// Options of one SUBSCRIBE entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Maximum QoS the subscriber will accept.
    pub qos: QoS,
    /// 5.0 No Local: do not deliver the subscriber's own messages.
    pub no_local: bool,
    /// 5.0 Retain As Published: keep the RETAIN flag when forwarding.
    pub retain_as_published: bool,
    /// 5.0 Retain Handling: 0 send retained, 1 only on a new subscription, 2 never.
    pub retain_handling: u8,
}

impl SubscriptionOptions {
    /// The 3.x options: just a QoS.
    pub fn qos(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// At least one filter (MQTT-3.8.3-3).
    pub filters: Vec<(TopicFilter, SubscriptionOptions)>,
    /// Properties (5.0 only): subscription identifier, user properties.
    pub properties: Option<Box<Properties>>,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: PacketId,
    /// One code per filter: granted QoS 0..2, or 0x80 (3.1.1) / a 5.0 reason code.
    pub codes: Vec<u8>,
    /// Properties (5.0 only).
    pub properties: Option<Box<Properties>>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// At least one filter (MQTT-3.10.3-2).
    pub filters: Vec<TopicFilter>,
    /// Properties (5.0 only).
    pub properties: Option<Box<Properties>>,
}

/// UNSUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: PacketId,
    /// One reason code per filter (5.0 only; empty for 3.x).
    pub codes: Vec<u8>,
    /// Properties (5.0 only).
    pub properties: Option<Box<Properties>>,
}

/// DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Reason code (5.0; 0 for 3.x). Omitted on the wire when 0 and there are
    /// no properties.
    pub reason: u8,
    /// Properties (5.0 only).
    pub properties: Option<Box<Properties>>,
}

/// AUTH (5.0 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Reason code. Omitted on the wire when 0 and there are no properties.
    pub reason: u8,
    /// Properties: authentication method and data.
    pub properties: Option<Box<Properties>>,
}

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` and consumes nothing while the packet is incomplete.
/// `version` is the connection's protocol (use [`ProtocolVersion::V3_1_1`]
/// before CONNECT; a CONNECT decodes by the level it carries). A packet whose
/// fixed header announces more than `max_packet_size` bytes in total is
/// refused at once with [`DecodeError::PacketTooLarge`], before its body is
/// buffered.
///
/// When it returns an error the connection is done for: the bytes of a
/// packet whose body was refused have been consumed, those of a packet
/// refused from its fixed header have not.
#[inline]
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    header::check_first_byte(first, version)?;
    let Some(h) = FixedHeader::parse(buf)? else {
        return Ok(None);
    };
    let size = h.packet_len();
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    // One `Bytes` for the whole packet; every string and payload below is a
    // slice of it, so nothing is copied.
    let packet = buf.split_to(size).freeze();
    let mut r = wire::Reader::new(&packet, h.header_len);
    let p = match h.packet_type {
        1 => Packet::Connect(connect::decode_connect(&mut r)?),
        2 => Packet::ConnAck(connect::decode_connack(&mut r, version)?),
        // The hot path: the payload becomes `packet` itself.
        3 => Packet::Publish(publish::decode_publish(
            h.flags,
            packet,
            h.header_len,
            version,
        )?),
        4 => Packet::PubAck(publish::decode_pub_resp(4, &mut r, version)?),
        5 => Packet::PubRec(publish::decode_pub_resp(5, &mut r, version)?),
        6 => Packet::PubRel(publish::decode_pub_resp(6, &mut r, version)?),
        7 => Packet::PubComp(publish::decode_pub_resp(7, &mut r, version)?),
        8 => Packet::Subscribe(subscribe::decode_subscribe(&mut r, version)?),
        9 => Packet::SubAck(subscribe::decode_suback(&mut r, version)?),
        10 => Packet::Unsubscribe(subscribe::decode_unsubscribe(&mut r, version)?),
        11 => Packet::UnsubAck(subscribe::decode_unsuback(&mut r, version)?),
        12 => {
            r.finish()?;
            Packet::PingReq
        }
        13 => {
            r.finish()?;
            Packet::PingResp
        }
        14 => Packet::Disconnect(simple::decode_disconnect(&mut r, version)?),
        15 => Packet::Auth(simple::decode_auth(&mut r)?),
        // `check_first_byte` refused 0; a nibble holds nothing above 15.
        t => return Err(DecodeError::InvalidPacketType(t)),
    };
    Ok(Some(p))
}

impl Packet {
    /// Appends this packet's wire form for `version` to `out`.
    ///
    /// 5.0-only fields are left out for 3.x. A CONNECT is written by its own
    /// `protocol` field whatever `version` says. `out` grows once, by
    /// [`Packet::encoded_len`]. The encoder trusts the packet's invariants
    /// (packet id present for QoS > 0, 3.x CONNECT password only with a
    /// user name, properties only of the kinds the packet allows); a packet
    /// that breaks them is written as is and refused by the peer. So do the
    /// sizes: a string or binary field over 65,535 bytes, or a body over
    /// 268,435,455 bytes, trips a `debug_assert` and is written with a
    /// truncated length in release builds. Every packet the broker encodes
    /// is built from decoded fields and its own small ones, which those
    /// limits already bound; checking again per field would tax every
    /// PUBLISH sent for a case that cannot arise.
    #[inline]
    pub fn encode(&self, version: ProtocolVersion, out: &mut BytesMut) {
        let version = match self {
            Packet::Connect(c) => c.protocol,
            _ => version,
        };
        let remaining = self.remaining_len(version);
        out.reserve(1 + header::varint_len(remaining) + remaining);
        #[cfg(debug_assertions)]
        let start = out.len();
        out.put_u8(self.first_byte());
        header::write_varint(out, remaining);
        match self {
            Packet::Connect(c) => c.encode_body(out),
            Packet::ConnAck(a) => a.encode_body(version, out),
            Packet::Publish(p) => p.encode_body(version, out),
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                a.encode_body(version, out)
            }
            Packet::Subscribe(s) => s.encode_body(version, out),
            Packet::SubAck(a) => a.encode_body(version, out),
            Packet::Unsubscribe(u) => u.encode_body(version, out),
            Packet::UnsubAck(a) => a.encode_body(version, out),
            Packet::PingReq | Packet::PingResp => {}
            Packet::Disconnect(d) => d.encode_body(version, out),
            Packet::Auth(a) => a.encode_body(version, out),
        }
        #[cfg(debug_assertions)]
        debug_assert_eq!(out.len() - start, self.encoded_len(version), "{self:?}");
    }

    /// The packet's full size on the wire (fixed header included) for `version`.
    #[inline]
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let version = match self {
            Packet::Connect(c) => c.protocol,
            _ => version,
        };
        let remaining = self.remaining_len(version);
        1 + header::varint_len(remaining) + remaining
    }

    /// The control packet type, 1 (CONNECT) to 15 (AUTH).
    pub fn packet_type(&self) -> u8 {
        match self {
            Packet::Connect(_) => 1,
            Packet::ConnAck(_) => 2,
            Packet::Publish(_) => 3,
            Packet::PubAck(_) => 4,
            Packet::PubRec(_) => 5,
            Packet::PubRel(_) => 6,
            Packet::PubComp(_) => 7,
            Packet::Subscribe(_) => 8,
            Packet::SubAck(_) => 9,
            Packet::Unsubscribe(_) => 10,
            Packet::UnsubAck(_) => 11,
            Packet::PingReq => 12,
            Packet::PingResp => 13,
            Packet::Disconnect(_) => 14,
            Packet::Auth(_) => 15,
        }
    }

    /// The packet's name as the specs spell it, for logs and counters.
    pub fn name(&self) -> &'static str {
        const NAMES: [&str; 16] = [
            "RESERVED",
            "CONNECT",
            "CONNACK",
            "PUBLISH",
            "PUBACK",
            "PUBREC",
            "PUBREL",
            "PUBCOMP",
            "SUBSCRIBE",
            "SUBACK",
            "UNSUBSCRIBE",
            "UNSUBACK",
            "PINGREQ",
            "PINGRESP",
            "DISCONNECT",
            "AUTH",
        ];
        NAMES[usize::from(self.packet_type())]
    }

    /// Byte 1 of the fixed header: type and flags (MQTT-2.2.2-1).
    #[inline]
    fn first_byte(&self) -> u8 {
        match self {
            Packet::Publish(p) => p.first_byte(),
            Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => {
                self.packet_type() << 4 | 0b0010
            }
            _ => self.packet_type() << 4,
        }
    }

    #[inline]
    fn remaining_len(&self, version: ProtocolVersion) -> usize {
        match self {
            Packet::Connect(c) => c.remaining_len(),
            Packet::ConnAck(a) => a.remaining_len(version),
            Packet::Publish(p) => p.remaining_len(version),
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                a.remaining_len(version)
            }
            Packet::Subscribe(s) => s.remaining_len(version),
            Packet::SubAck(a) => a.remaining_len(version),
            Packet::Unsubscribe(u) => u.remaining_len(version),
            Packet::UnsubAck(a) => a.remaining_len(version),
            Packet::PingReq | Packet::PingResp => 0,
            Packet::Disconnect(d) => d.remaining_len(version),
            Packet::Auth(a) => a.remaining_len(version),
        }
    }
}
