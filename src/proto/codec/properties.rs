//! MQTT 5.0 properties (§2.2.2): one struct holding every property, with the
//! decoder checking which identifiers each packet type allows.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::header::{varint_len, write_varint};
use super::wire::{put_str, str_len, topic_name, Reader};
use super::DecodeError;

/// Every MQTT 5.0 property. Unset ones are `None` / empty. Which may appear
/// depends on the packet; the decoder enforces that and rejects duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// 0x01 Payload Format Indicator (PUBLISH, will).
    pub payload_format_indicator: Option<u8>,
    /// 0x02 Message Expiry Interval, seconds (PUBLISH, will).
    pub message_expiry_interval: Option<u32>,
    /// 0x03 Content Type (PUBLISH, will).
    pub content_type: Option<ByteString>,
    /// 0x08 Response Topic (PUBLISH, will).
    pub response_topic: Option<ByteString>,
    /// 0x09 Correlation Data (PUBLISH, will).
    pub correlation_data: Option<Bytes>,
    /// 0x0B Subscription Identifier: one in SUBSCRIBE, any number in PUBLISH.
    pub subscription_identifiers: Vec<u32>,
    /// 0x11 Session Expiry Interval, seconds (CONNECT, CONNACK, DISCONNECT).
    pub session_expiry_interval: Option<u32>,
    /// 0x12 Assigned Client Identifier (CONNACK).
    pub assigned_client_identifier: Option<ByteString>,
    /// 0x13 Server Keep Alive, seconds (CONNACK).
    pub server_keep_alive: Option<u16>,
    /// 0x15 Authentication Method (CONNECT, CONNACK, AUTH).
    pub authentication_method: Option<ByteString>,
    /// 0x16 Authentication Data (CONNECT, CONNACK, AUTH).
    pub authentication_data: Option<Bytes>,
    /// 0x17 Request Problem Information (CONNECT).
    pub request_problem_information: Option<u8>,
    /// 0x18 Will Delay Interval, seconds (will).
    pub will_delay_interval: Option<u32>,
    /// 0x19 Request Response Information (CONNECT).
    pub request_response_information: Option<u8>,
    /// 0x1A Response Information (CONNACK).
    pub response_information: Option<ByteString>,
    /// 0x1C Server Reference (CONNACK, DISCONNECT).
    pub server_reference: Option<ByteString>,
    /// 0x1F Reason String (CONNACK, acks, DISCONNECT, AUTH).
    pub reason_string: Option<ByteString>,
    /// 0x21 Receive Maximum (CONNECT, CONNACK); never 0.
    pub receive_maximum: Option<u16>,
    /// 0x22 Topic Alias Maximum (CONNECT, CONNACK).
    pub topic_alias_maximum: Option<u16>,
    /// 0x23 Topic Alias (PUBLISH); never 0.
    pub topic_alias: Option<u16>,
    /// 0x24 Maximum QoS (CONNACK): 0 or 1.
    pub maximum_qos: Option<u8>,
    /// 0x25 Retain Available (CONNACK): 0 or 1.
    pub retain_available: Option<u8>,
    /// 0x26 User Property: any number, order kept, in every packet with properties.
    pub user_properties: Vec<(ByteString, ByteString)>,
    /// 0x27 Maximum Packet Size (CONNECT, CONNACK); never 0.
    pub maximum_packet_size: Option<u32>,
    /// 0x28 Wildcard Subscription Available (CONNACK): 0 or 1.
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29 Subscription Identifier Available (CONNACK): 0 or 1.
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A Shared Subscription Available (CONNACK): 0 or 1.
    pub shared_subscription_available: Option<u8>,
}

/// The property identifiers of §2.2.2.2.
pub(crate) mod id {
    pub(crate) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub(crate) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub(crate) const CONTENT_TYPE: u8 = 0x03;
    pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
    pub(crate) const CORRELATION_DATA: u8 = 0x09;
    pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub(crate) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub(crate) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub(crate) const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
    pub(crate) const AUTHENTICATION_DATA: u8 = 0x16;
    pub(crate) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub(crate) const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub(crate) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub(crate) const RESPONSE_INFORMATION: u8 = 0x1A;
    pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
    pub(crate) const REASON_STRING: u8 = 0x1F;
    pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
    pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub(crate) const TOPIC_ALIAS: u8 = 0x23;
    pub(crate) const MAXIMUM_QOS: u8 = 0x24;
    pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
    pub(crate) const USER_PROPERTY: u8 = 0x26;
    pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub(crate) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub(crate) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub(crate) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// Which property identifiers a packet may carry: bit `id` set for each.
/// Every identifier is below 64, so one `u64` holds the table of §2.2.2.2.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allowed(u64);

const fn allowed(ids: &[u8]) -> Allowed {
    let mut mask = 0u64;
    let mut i = 0;
    while i < ids.len() {
        mask |= 1 << ids[i];
        i += 1;
    }
    Allowed(mask)
}

use id::*;

/// CONNECT (§3.1.2.11).
pub(crate) const CONNECT: Allowed = allowed(&[
    SESSION_EXPIRY_INTERVAL,
    RECEIVE_MAXIMUM,
    MAXIMUM_PACKET_SIZE,
    TOPIC_ALIAS_MAXIMUM,
    REQUEST_RESPONSE_INFORMATION,
    REQUEST_PROBLEM_INFORMATION,
    USER_PROPERTY,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
]);
/// Will properties of CONNECT (§3.1.3.2).
pub(crate) const WILL: Allowed = allowed(&[
    WILL_DELAY_INTERVAL,
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    USER_PROPERTY,
]);
/// CONNACK (§3.2.2.3).
pub(crate) const CONNACK: Allowed = allowed(&[
    SESSION_EXPIRY_INTERVAL,
    RECEIVE_MAXIMUM,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    MAXIMUM_PACKET_SIZE,
    ASSIGNED_CLIENT_IDENTIFIER,
    TOPIC_ALIAS_MAXIMUM,
    REASON_STRING,
    USER_PROPERTY,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
    SERVER_KEEP_ALIVE,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
]);
/// PUBLISH (§3.3.2.3).
pub(crate) const PUBLISH: Allowed = allowed(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    TOPIC_ALIAS,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    USER_PROPERTY,
    SUBSCRIPTION_IDENTIFIER,
    CONTENT_TYPE,
]);
/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK (§3.4.2.2 ...).
pub(crate) const ACK: Allowed = allowed(&[REASON_STRING, USER_PROPERTY]);
/// SUBSCRIBE (§3.8.2.1).
pub(crate) const SUBSCRIBE: Allowed = allowed(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]);
/// UNSUBSCRIBE (§3.10.2.1).
pub(crate) const UNSUBSCRIBE: Allowed = allowed(&[USER_PROPERTY]);
/// DISCONNECT (§3.14.2.2).
pub(crate) const DISCONNECT: Allowed = allowed(&[
    SESSION_EXPIRY_INTERVAL,
    REASON_STRING,
    USER_PROPERTY,
    SERVER_REFERENCE,
]);
/// AUTH (§3.15.2.2).
pub(crate) const AUTH: Allowed = allowed(&[
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REASON_STRING,
    USER_PROPERTY,
]);

/// The value of a property that must not be 0 (Receive Maximum,
/// Maximum Packet Size, Topic Alias, Subscription Identifier).
#[inline]
fn non_zero<T: Default + PartialEq>(id: u8, v: T) -> Result<T, DecodeError> {
    if v == T::default() {
        Err(DecodeError::InvalidPropertyValue(id))
    } else {
        Ok(v)
    }
}

/// A byte property that only takes 0 or 1 (Request Problem / Response
/// Information, Maximum QoS, the "... Available" flags, Payload Format
/// Indicator): "It is a Protocol Error to include a value other than 0 or 1".
#[inline]
fn flag(id: u8, r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(DecodeError::InvalidPropertyValue(id)),
    }
}

/// Reads a Property Length and the properties after it (§2.2.2).
///
/// Identifiers outside `allowed` are [`DecodeError::InvalidProperty`]; any
/// property but User Property (and Subscription Identifier, when
/// `repeat_sub_id`: PUBLISH) appearing twice is
/// [`DecodeError::DuplicateProperty`]. A Property Length of 0 gives `None`.
pub(crate) fn decode(
    r: &mut Reader<'_>,
    allowed: Allowed,
    repeat_sub_id: bool,
) -> Result<Option<Box<Properties>>, DecodeError> {
    let len = r.varint()?;
    if len == 0 {
        return Ok(None);
    }
    let mut r = r.sub(len)?;
    let mut p = Properties::default();
    let mut seen = 0u64;
    while !r.is_empty() {
        // The identifier is a Variable Byte Integer, but every defined one is
        // below 0x80: a longer encoding can only name an unknown property.
        let pid = r.u8()?;
        if pid >= 64 || allowed.0 & (1 << pid) == 0 {
            return Err(DecodeError::InvalidProperty(pid));
        }
        let repeatable = pid == USER_PROPERTY || (pid == SUBSCRIPTION_IDENTIFIER && repeat_sub_id);
        if !repeatable {
            if seen & (1 << pid) != 0 {
                return Err(DecodeError::DuplicateProperty(pid));
            }
            seen |= 1 << pid;
        }
        match pid {
            PAYLOAD_FORMAT_INDICATOR => p.payload_format_indicator = Some(flag(pid, &mut r)?),
            MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32()?),
            CONTENT_TYPE => p.content_type = Some(r.string()?),
            RESPONSE_TOPIC => {
                // A topic name: no wildcards (MQTT-3.3.2-14), not empty.
                let topic = topic_name(r.string()?)?;
                p.response_topic = Some(topic.as_bytestring().clone());
            }
            CORRELATION_DATA => p.correlation_data = Some(r.binary()?),
            SUBSCRIPTION_IDENTIFIER => {
                // 1..=268,435,455 (§3.3.2.3.8); a fifth varint byte is as
                // malformed here as anywhere.
                let v = r.varint().map_err(|e| match e {
                    DecodeError::MalformedRemainingLength => DecodeError::InvalidPropertyValue(pid),
                    e => e,
                })?;
                p.subscription_identifiers.push(non_zero(pid, v as u32)?);
            }
            SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32()?),
            ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string()?),
            SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16()?),
            AUTHENTICATION_METHOD => p.authentication_method = Some(r.string()?),
            AUTHENTICATION_DATA => p.authentication_data = Some(r.binary()?),
            REQUEST_PROBLEM_INFORMATION => p.request_problem_information = Some(flag(pid, &mut r)?),
            WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32()?),
            REQUEST_RESPONSE_INFORMATION => {
                p.request_response_information = Some(flag(pid, &mut r)?)
            }
            RESPONSE_INFORMATION => p.response_information = Some(r.string()?),
            SERVER_REFERENCE => p.server_reference = Some(r.string()?),
            REASON_STRING => p.reason_string = Some(r.string()?),
            RECEIVE_MAXIMUM => p.receive_maximum = Some(non_zero(pid, r.u16()?)?),
            TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16()?),
            TOPIC_ALIAS => p.topic_alias = Some(non_zero(pid, r.u16()?)?),
            MAXIMUM_QOS => p.maximum_qos = Some(flag(pid, &mut r)?),
            RETAIN_AVAILABLE => p.retain_available = Some(flag(pid, &mut r)?),
            USER_PROPERTY => {
                let k = r.string()?;
                let v = r.string()?;
                p.user_properties.push((k, v));
            }
            MAXIMUM_PACKET_SIZE => p.maximum_packet_size = Some(non_zero(pid, r.u32()?)?),
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                p.wildcard_subscription_available = Some(flag(pid, &mut r)?)
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                p.subscription_identifier_available = Some(flag(pid, &mut r)?)
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                p.shared_subscription_available = Some(flag(pid, &mut r)?)
            }
            // `allowed` only holds the identifiers matched above.
            _ => return Err(DecodeError::InvalidProperty(pid)),
        }
    }
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(DecodeError::MissingAuthMethod);
    }
    Ok(Some(Box::new(p)))
}

/// Walks every set property in identifier order: the single place that
/// knows the wire layout for encoding, so length and bytes cannot disagree.
macro_rules! for_each_property {
    ($p:expr, $byte:ident, $u16:ident, $u32:ident, $str:ident, $varint:ident, $pair:ident) => {{
        let p = $p;
        if let Some(v) = p.payload_format_indicator {
            $byte(PAYLOAD_FORMAT_INDICATOR, v);
        }
        if let Some(v) = p.message_expiry_interval {
            $u32(MESSAGE_EXPIRY_INTERVAL, v);
        }
        if let Some(v) = &p.content_type {
            $str(CONTENT_TYPE, v.as_bytes());
        }
        if let Some(v) = &p.response_topic {
            $str(RESPONSE_TOPIC, v.as_bytes());
        }
        if let Some(v) = &p.correlation_data {
            $str(CORRELATION_DATA, &v[..]);
        }
        for &v in &p.subscription_identifiers {
            $varint(SUBSCRIPTION_IDENTIFIER, v as usize);
        }
        if let Some(v) = p.session_expiry_interval {
            $u32(SESSION_EXPIRY_INTERVAL, v);
        }
        if let Some(v) = &p.assigned_client_identifier {
            $str(ASSIGNED_CLIENT_IDENTIFIER, v.as_bytes());
        }
        if let Some(v) = p.server_keep_alive {
            $u16(SERVER_KEEP_ALIVE, v);
        }
        if let Some(v) = &p.authentication_method {
            $str(AUTHENTICATION_METHOD, v.as_bytes());
        }
        if let Some(v) = &p.authentication_data {
            $str(AUTHENTICATION_DATA, &v[..]);
        }
        if let Some(v) = p.request_problem_information {
            $byte(REQUEST_PROBLEM_INFORMATION, v);
        }
        if let Some(v) = p.will_delay_interval {
            $u32(WILL_DELAY_INTERVAL, v);
        }
        if let Some(v) = p.request_response_information {
            $byte(REQUEST_RESPONSE_INFORMATION, v);
        }
        if let Some(v) = &p.response_information {
            $str(RESPONSE_INFORMATION, v.as_bytes());
        }
        if let Some(v) = &p.server_reference {
            $str(SERVER_REFERENCE, v.as_bytes());
        }
        if let Some(v) = &p.reason_string {
            $str(REASON_STRING, v.as_bytes());
        }
        if let Some(v) = p.receive_maximum {
            $u16(RECEIVE_MAXIMUM, v);
        }
        if let Some(v) = p.topic_alias_maximum {
            $u16(TOPIC_ALIAS_MAXIMUM, v);
        }
        if let Some(v) = p.topic_alias {
            $u16(TOPIC_ALIAS, v);
        }
        if let Some(v) = p.maximum_qos {
            $byte(MAXIMUM_QOS, v);
        }
        if let Some(v) = p.retain_available {
            $byte(RETAIN_AVAILABLE, v);
        }
        for (k, v) in &p.user_properties {
            $pair(k.as_bytes(), v.as_bytes());
        }
        if let Some(v) = p.maximum_packet_size {
            $u32(MAXIMUM_PACKET_SIZE, v);
        }
        if let Some(v) = p.wildcard_subscription_available {
            $byte(WILDCARD_SUBSCRIPTION_AVAILABLE, v);
        }
        if let Some(v) = p.subscription_identifier_available {
            $byte(SUBSCRIPTION_IDENTIFIER_AVAILABLE, v);
        }
        if let Some(v) = p.shared_subscription_available {
            $byte(SHARED_SUBSCRIPTION_AVAILABLE, v);
        }
    }};
}

impl Properties {
    /// Size of the properties themselves, without the Property Length.
    pub(crate) fn content_len(&self) -> usize {
        // Cell, not `&mut`: the macro hands out six closures at once.
        let n = std::cell::Cell::new(0usize);
        let add = |k: usize| n.set(n.get() + k);
        let b = |_: u8, _: u8| add(2);
        let h = |_: u8, _: u16| add(3);
        let w = |_: u8, _: u32| add(5);
        let s = |_: u8, v: &[u8]| add(1 + str_len(v));
        let vi = |_: u8, v: usize| add(1 + varint_len(v));
        let pair = |k: &[u8], v: &[u8]| add(1 + str_len(k) + str_len(v));
        for_each_property!(self, b, h, w, s, vi, pair);
        n.get()
    }

    /// Writes the properties themselves, without the Property Length.
    pub(crate) fn encode_content(&self, out: &mut BytesMut) {
        let out = std::cell::RefCell::new(out);
        let b = |id: u8, v: u8| {
            let mut o = out.borrow_mut();
            o.put_u8(id);
            o.put_u8(v);
        };
        let h = |id: u8, v: u16| {
            let mut o = out.borrow_mut();
            o.put_u8(id);
            o.put_u16(v);
        };
        let w = |id: u8, v: u32| {
            let mut o = out.borrow_mut();
            o.put_u8(id);
            o.put_u32(v);
        };
        let s = |id: u8, v: &[u8]| {
            let mut o = out.borrow_mut();
            o.put_u8(id);
            put_str(&mut o, v);
        };
        let vi = |id: u8, v: usize| {
            let mut o = out.borrow_mut();
            o.put_u8(id);
            write_varint(&mut o, v);
        };
        let pair = |k: &[u8], v: &[u8]| {
            let mut o = out.borrow_mut();
            o.put_u8(USER_PROPERTY);
            put_str(&mut o, k);
            put_str(&mut o, v);
        };
        for_each_property!(self, b, h, w, s, vi, pair);
    }
}

/// Size of a property section on the wire: Property Length plus properties.
#[inline]
pub(crate) fn wire_len(p: &Option<Box<Properties>>) -> usize {
    match p {
        None => 1,
        Some(p) => {
            let n = p.content_len();
            varint_len(n) + n
        }
    }
}

/// Writes a property section: Property Length, then the properties.
#[inline]
pub(crate) fn encode(p: &Option<Box<Properties>>, out: &mut BytesMut) {
    match p {
        None => out.put_u8(0),
        Some(p) => {
            write_varint(out, p.content_len());
            p.encode_content(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed value for property `id`, as its type in §2.2.2.2 says.
    fn sample_value(id: u8) -> Vec<u8> {
        match id {
            // Byte (0 is valid for every flag).
            PAYLOAD_FORMAT_INDICATOR
            | REQUEST_PROBLEM_INFORMATION
            | REQUEST_RESPONSE_INFORMATION
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE => vec![1],
            // Two Byte Integer (non-zero for those that must be).
            SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => vec![0, 5],
            // Four Byte Integer.
            MESSAGE_EXPIRY_INTERVAL
            | SESSION_EXPIRY_INTERVAL
            | WILL_DELAY_INTERVAL
            | MAXIMUM_PACKET_SIZE => vec![0, 0, 1, 0],
            SUBSCRIPTION_IDENTIFIER => vec![7],
            // Binary Data.
            CORRELATION_DATA | AUTHENTICATION_DATA => vec![0, 2, 0xff, 0],
            USER_PROPERTY => b"\x00\x01k\x00\x01v".to_vec(),
            // UTF-8 strings (a topic name for Response Topic).
            _ => b"\x00\x03a/b".to_vec(),
        }
    }

    fn decode_one(id: u8, allowed: Allowed) -> Result<Option<Box<Properties>>, DecodeError> {
        let mut body = Vec::new();
        if id == AUTHENTICATION_DATA {
            // Data needs its method beside it (§3.1.2.11.10).
            body.push(AUTHENTICATION_METHOD);
            body.extend(sample_value(AUTHENTICATION_METHOD));
        }
        body.push(id);
        body.extend(sample_value(id));
        let mut wire = vec![body.len() as u8];
        wire.extend(body);
        let bytes = Bytes::from(wire);
        let mut r = Reader::new(&bytes, 0);
        decode(&mut r, allowed, false)
    }

    /// Every identifier of table 2.2.2.2 is accepted in exactly the packets
    /// the table lists, and refused (InvalidProperty) in all others.
    #[test]
    fn each_property_is_allowed_exactly_where_table_2_2_2_2_says() {
        let table: &[(u8, &[&str])] = &[
            (0x01, &["PUBLISH", "WILL"]),
            (0x02, &["PUBLISH", "WILL"]),
            (0x03, &["PUBLISH", "WILL"]),
            (0x08, &["PUBLISH", "WILL"]),
            (0x09, &["PUBLISH", "WILL"]),
            (0x0b, &["PUBLISH", "SUBSCRIBE"]),
            (0x11, &["CONNECT", "CONNACK", "DISCONNECT"]),
            (0x12, &["CONNACK"]),
            (0x13, &["CONNACK"]),
            (0x15, &["CONNECT", "CONNACK", "AUTH"]),
            (0x16, &["CONNECT", "CONNACK", "AUTH"]),
            (0x17, &["CONNECT"]),
            (0x18, &["WILL"]),
            (0x19, &["CONNECT"]),
            (0x1a, &["CONNACK"]),
            (0x1c, &["CONNACK", "DISCONNECT"]),
            (0x1f, &["CONNACK", "ACK", "DISCONNECT", "AUTH"]),
            (0x21, &["CONNECT", "CONNACK"]),
            (0x22, &["CONNECT", "CONNACK"]),
            (0x23, &["PUBLISH"]),
            (0x24, &["CONNACK"]),
            (0x25, &["CONNACK"]),
            (
                0x26,
                &[
                    "CONNECT",
                    "WILL",
                    "CONNACK",
                    "PUBLISH",
                    "ACK",
                    "SUBSCRIBE",
                    "UNSUBSCRIBE",
                    "DISCONNECT",
                    "AUTH",
                ],
            ),
            (0x27, &["CONNECT", "CONNACK"]),
            (0x28, &["CONNACK"]),
            (0x29, &["CONNACK"]),
            (0x2a, &["CONNACK"]),
        ];
        let packets: &[(&str, Allowed)] = &[
            ("CONNECT", CONNECT),
            ("WILL", WILL),
            ("CONNACK", CONNACK),
            ("PUBLISH", PUBLISH),
            ("ACK", ACK),
            ("SUBSCRIBE", SUBSCRIBE),
            ("UNSUBSCRIBE", UNSUBSCRIBE),
            ("DISCONNECT", DISCONNECT),
            ("AUTH", AUTH),
        ];
        for id in 0u8..0x30 {
            let listed = table.iter().find(|(i, _)| *i == id);
            for (name, allowed) in packets {
                let expect_ok = listed.is_some_and(|(_, ps)| ps.contains(name));
                let got = decode_one(id, *allowed);
                if expect_ok {
                    assert!(matches!(got, Ok(Some(_))), "{id:#04x} in {name}: {got:?}");
                } else {
                    let refused_id = if id == AUTHENTICATION_DATA && !expect_ok {
                        // The method in front is refused first.
                        AUTHENTICATION_METHOD
                    } else {
                        id
                    };
                    assert_eq!(
                        got,
                        Err(DecodeError::InvalidProperty(refused_id)),
                        "{id:#04x} in {name}"
                    );
                }
            }
        }
    }

    #[test]
    fn auth_data_without_method_and_wildcard_response_topic_are_refused() {
        let bytes = Bytes::from_static(b"\x05\x16\x00\x02\xff\x00");
        assert_eq!(
            decode(&mut Reader::new(&bytes, 0), CONNECT, false),
            Err(DecodeError::MissingAuthMethod)
        );
        // MQTT-3.3.2-14: Response Topic is a topic name, so no wildcards.
        let bytes = Bytes::from_static(b"\x06\x08\x00\x03a/+");
        assert_eq!(
            decode(&mut Reader::new(&bytes, 0), PUBLISH, false),
            Err(DecodeError::InvalidTopicName)
        );
    }
}
