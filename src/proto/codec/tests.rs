//! Property tests over the whole codec: `decode(encode(p)) == p` for every
//! packet of every version, arbitrary bytes never panic, and a stream split
//! at any points decodes to the same packets.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use proptest::collection::vec;
use proptest::option::weighted;
use proptest::prelude::*;

use super::properties::id::*;
use super::*;
use crate::proto::topic::{TopicFilter, TopicName};

const LARGE: usize = MAX_REMAINING_LENGTH + 5;

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![
        Just(ProtocolVersion::V3_1),
        Just(ProtocolVersion::V3_1_1),
        Just(ProtocolVersion::V5)
    ]
}

/// Strings with multi-byte characters, never U+0000.
fn string() -> impl Strategy<Value = ByteString> {
    "[a-z0-9 /é€😀+#$]{0,10}".prop_map(ByteString::from)
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn topic_name() -> impl Strategy<Value = TopicName> {
    "[a-z0-9é$]{0,4}(/[a-z0-9 €]{0,4}){0,3}"
        .prop_filter("non-empty", |s| !s.is_empty())
        .prop_map(|s| TopicName::new(s).expect("generated a valid name"))
}

fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![Just("+".to_string()), "[a-z0-9é]{0,4}"];
    (vec(level, 1..4), any::<bool>()).prop_filter_map("non-empty", |(levels, hash)| {
        let mut s = levels.join("/");
        if hash {
            s.push_str(if s.is_empty() { "#" } else { "/#" });
        }
        TopicFilter::new(s).ok()
    })
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1u16..).prop_map(|v| PacketId::new(v).expect("non-zero"))
}

fn opt<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    weighted(0.25, s)
}

fn flag() -> impl Strategy<Value = u8> {
    0u8..=1
}

/// Properties holding only the identifiers in `allowed`; at most one
/// Subscription Identifier unless `multi_sub_id`. `None` rather than an
/// empty set, since that is what decoding a Property Length of 0 gives.
fn properties(
    allowed: &'static [u8],
    multi_sub_id: bool,
) -> BoxedStrategy<Option<Box<Properties>>> {
    let a = (
        opt(flag()),
        opt(any::<u32>()),
        opt(string()),
        opt(topic_name().prop_map(|t| t.as_bytestring().clone())),
        opt(binary()),
        vec(1u32..=268_435_455, 0..3),
        opt(any::<u32>()),
        opt(string()),
        opt(any::<u16>()),
        opt(string()),
        opt(binary()),
        opt(flag()),
    );
    let b = (
        opt(any::<u32>()),
        opt(flag()),
        opt(string()),
        opt(string()),
        opt(string()),
        opt(1u16..),
        opt(any::<u16>()),
        opt(1u16..),
        opt(flag()),
        opt(flag()),
        vec((string(), string()), 0..3),
        opt(1u32..),
    );
    let c = (opt(flag()), opt(flag()), opt(flag()));
    (a, b, c)
        .prop_map(move |(a, b, c)| {
            let mut p = Properties {
                payload_format_indicator: a.0,
                message_expiry_interval: a.1,
                content_type: a.2,
                response_topic: a.3,
                correlation_data: a.4,
                subscription_identifiers: a.5,
                session_expiry_interval: a.6,
                assigned_client_identifier: a.7,
                server_keep_alive: a.8,
                authentication_method: a.9,
                authentication_data: a.10,
                request_problem_information: a.11,
                will_delay_interval: b.0,
                request_response_information: b.1,
                response_information: b.2,
                server_reference: b.3,
                reason_string: b.4,
                receive_maximum: b.5,
                topic_alias_maximum: b.6,
                topic_alias: b.7,
                maximum_qos: b.8,
                retain_available: b.9,
                user_properties: b.10,
                maximum_packet_size: b.11,
                wildcard_subscription_available: c.0,
                subscription_identifier_available: c.1,
                shared_subscription_available: c.2,
            };
            let has = |id: u8| allowed.contains(&id);
            macro_rules! keep {
                ($($id:ident => $field:ident),* $(,)?) => {
                    $(if !has($id) { p.$field = Default::default(); })*
                };
            }
            keep!(
                PAYLOAD_FORMAT_INDICATOR => payload_format_indicator,
                MESSAGE_EXPIRY_INTERVAL => message_expiry_interval,
                CONTENT_TYPE => content_type,
                RESPONSE_TOPIC => response_topic,
                CORRELATION_DATA => correlation_data,
                SUBSCRIPTION_IDENTIFIER => subscription_identifiers,
                SESSION_EXPIRY_INTERVAL => session_expiry_interval,
                ASSIGNED_CLIENT_IDENTIFIER => assigned_client_identifier,
                SERVER_KEEP_ALIVE => server_keep_alive,
                AUTHENTICATION_METHOD => authentication_method,
                AUTHENTICATION_DATA => authentication_data,
                REQUEST_PROBLEM_INFORMATION => request_problem_information,
                WILL_DELAY_INTERVAL => will_delay_interval,
                REQUEST_RESPONSE_INFORMATION => request_response_information,
                RESPONSE_INFORMATION => response_information,
                SERVER_REFERENCE => server_reference,
                REASON_STRING => reason_string,
                RECEIVE_MAXIMUM => receive_maximum,
                TOPIC_ALIAS_MAXIMUM => topic_alias_maximum,
                TOPIC_ALIAS => topic_alias,
                MAXIMUM_QOS => maximum_qos,
                RETAIN_AVAILABLE => retain_available,
                USER_PROPERTY => user_properties,
                MAXIMUM_PACKET_SIZE => maximum_packet_size,
                WILDCARD_SUBSCRIPTION_AVAILABLE => wildcard_subscription_available,
                SUBSCRIPTION_IDENTIFIER_AVAILABLE => subscription_identifier_available,
                SHARED_SUBSCRIPTION_AVAILABLE => shared_subscription_available,
            );
            if !multi_sub_id {
                p.subscription_identifiers.truncate(1);
            }
            // Authentication Data needs its method (§3.1.2.11.10).
            if p.authentication_data.is_some() && p.authentication_method.is_none() {
                p.authentication_method = Some(ByteString::from_static("m"));
            }
            (p != Properties::default()).then(|| Box::new(p))
        })
        .boxed()
}

/// Properties for `version`: always `None` for 3.x.
fn props_for(
    v: ProtocolVersion,
    allowed: &'static [u8],
    multi_sub_id: bool,
) -> BoxedStrategy<Option<Box<Properties>>> {
    if v.is_v5() {
        properties(allowed, multi_sub_id)
    } else {
        Just(None).boxed()
    }
}

const CONNECT_IDS: &[u8] = &[0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16];
const WILL_IDS: &[u8] = &[0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26];
const CONNACK_IDS: &[u8] = &[
    0x11, 0x21, 0x24, 0x25, 0x27, 0x12, 0x22, 0x1f, 0x26, 0x28, 0x29, 0x2a, 0x13, 0x1a, 0x1c, 0x15,
    0x16,
];
const PUBLISH_IDS: &[u8] = &[0x01, 0x02, 0x23, 0x08, 0x09, 0x26, 0x0b, 0x03];
const ACK_IDS: &[u8] = &[0x1f, 0x26];
const SUBSCRIBE_IDS: &[u8] = &[0x0b, 0x26];
const UNSUBSCRIBE_IDS: &[u8] = &[0x26];
const DISCONNECT_IDS: &[u8] = &[0x11, 0x1f, 0x26, 0x1c];
const AUTH_IDS: &[u8] = &[0x15, 0x16, 0x1f, 0x26];

const CONNACK_V5: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x8c, 0x90, 0x95, 0x97,
    0x99, 0x9a, 0x9b, 0x9c, 0x9d, 0x9f,
];
const PUBACK_V5: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_V5: &[u8] = &[0x00, 0x92];
const SUBACK_V3: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const SUBACK_V5: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8f, 0x91, 0x97, 0x9e, 0xa1, 0xa2,
];
const UNSUBACK_V5: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8f, 0x91];
const DISCONNECT_V5: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8b, 0x8d, 0x8e, 0x8f, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9a, 0x9b, 0x9c, 0x9d, 0x9e, 0x9f, 0xa0, 0xa1, 0xa2,
];
const AUTH_V5: &[u8] = &[0x00, 0x18, 0x19];

fn code(codes: &'static [u8]) -> impl Strategy<Value = u8> {
    prop::sample::select(codes)
}

/// A reason code: 0 in 3.x, any of `codes` in 5.0.
fn reason_for(v: ProtocolVersion, codes: &'static [u8]) -> BoxedStrategy<u8> {
    if v.is_v5() {
        code(codes).boxed()
    } else {
        Just(0).boxed()
    }
}

fn connect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let will = (
        topic_name(),
        binary(),
        qos(),
        any::<bool>(),
        props_for(v, WILL_IDS, false),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        string(),
        opt(will),
        opt(string()),
        opt(binary()),
        props_for(v, CONNECT_IDS, false),
    )
        .prop_map(
            move |(
                clean_start,
                keep_alive,
                client_id,
                will,
                username,
                mut password,
                properties,
            )| {
                // 3.x: no password without a user name (MQTT-3.1.2-22).
                if !v.is_v5() && username.is_none() {
                    password = None;
                }
                Packet::Connect(Box::new(Connect {
                    protocol: v,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

fn publish(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        packet_id(),
        binary(),
        props_for(v, PUBLISH_IDS, true),
    )
        .prop_map(
            move |(dup, qos, retain, topic, alias_only, id, payload, properties)| {
                let by_alias = properties.as_ref().is_some_and(|p| p.topic_alias.is_some());
                Packet::Publish(Publish {
                    // DUP only with QoS > 0 (MQTT-3.3.1-2), except in 3.1.
                    dup: dup && (qos != QoS::AtMostOnce || v == ProtocolVersion::V3_1),
                    qos,
                    retain,
                    topic: if by_alias && alias_only {
                        TopicName::alias_only()
                    } else {
                        topic
                    },
                    packet_id: (qos != QoS::AtMostOnce).then_some(id),
                    payload,
                    properties,
                })
            },
        )
}

fn pub_resp(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        4u8..=7,
        packet_id(),
        reason_for(v, PUBACK_V5),
        reason_for(v, PUBREL_V5),
        props_for(v, ACK_IDS, false),
    )
        .prop_map(|(ty, packet_id, ack_reason, rel_reason, properties)| {
            let r = |reason| PubResp {
                packet_id,
                reason,
                properties,
            };
            match ty {
                4 => Packet::PubAck(r(ack_reason)),
                5 => Packet::PubRec(r(ack_reason)),
                6 => Packet::PubRel(r(rel_reason)),
                _ => Packet::PubComp(r(rel_reason)),
            }
        })
}

fn subscribe(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let opts = (qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(q, nl, rap, rh)| {
        if v.is_v5() {
            SubscriptionOptions {
                qos: q,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: rh,
            }
        } else {
            SubscriptionOptions::qos(q)
        }
    });
    (
        packet_id(),
        vec((topic_filter(), opts), 1..4),
        props_for(v, SUBSCRIBE_IDS, false),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn acks(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    let suback = (
        packet_id(),
        vec(code(if v5 { SUBACK_V5 } else { SUBACK_V3 }), 0..4),
        props_for(v, ACK_IDS, false),
    )
        .prop_map(|(packet_id, codes, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                codes,
                properties,
            })
        });
    let unsuback = (
        packet_id(),
        vec(code(UNSUBACK_V5), 0..4),
        props_for(v, ACK_IDS, false),
    )
        .prop_map(move |(packet_id, codes, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                codes: if v5 { codes } else { Vec::new() },
                properties,
            })
        });
    let unsubscribe = (
        packet_id(),
        vec(topic_filter(), 1..4),
        props_for(v, UNSUBSCRIBE_IDS, false),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        });
    let connack = (
        any::<bool>(),
        if v5 {
            code(CONNACK_V5).boxed()
        } else {
            (0u8..=5).boxed()
        },
        props_for(v, CONNACK_IDS, false),
    )
        .prop_map(move |(sp, code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present: sp && v != ProtocolVersion::V3_1,
                code,
                properties,
            })
        });
    prop_oneof![suback, unsuback, unsubscribe, connack]
}

fn simple(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let disconnect = (
        reason_for(v, DISCONNECT_V5),
        props_for(v, DISCONNECT_IDS, false),
    )
        .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }));
    if v.is_v5() {
        // Every AUTH but the empty one names its method (§3.15.2.2.2).
        let auth = (code(AUTH_V5), properties(AUTH_IDS, false)).prop_map(|(reason, properties)| {
            if reason == 0 && properties.is_none() {
                return Packet::Auth(Auth::default());
            }
            let mut properties = properties.unwrap_or_default();
            if properties.authentication_method.is_none() {
                properties.authentication_method = Some(ByteString::from_static("m"));
            }
            Packet::Auth(Auth {
                reason,
                properties: Some(properties),
            })
        });
        prop_oneof![
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            disconnect,
            auth
        ]
        .boxed()
    } else {
        prop_oneof![Just(Packet::PingReq), Just(Packet::PingResp), disconnect].boxed()
    }
}

/// Any packet valid for `v`.
fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    prop_oneof![
        1 => connect(v),
        3 => publish(v),
        2 => pub_resp(v),
        2 => subscribe(v),
        2 => acks(v),
        1 => simple(v),
    ]
    .boxed()
}

fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|v| (Just(v), packet(v)))
}

fn encode(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    p.encode(v, &mut out);
    out
}

/// Decodes everything in `buf`, stopping at the first error.
fn drain(buf: &mut BytesMut, v: ProtocolVersion, max: usize) -> Vec<Packet> {
    let mut out = Vec::new();
    while let Ok(Some(p)) = decode(buf, v, max) {
        out.push(p);
    }
    out
}

/// Big packets: payloads that need a 2- to 3-byte Remaining Length and
/// topics and client ids near the 65,535-byte string limit, which the
/// everyday strategies (strings of ≤ 10 characters) never reach.
fn big_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    let long_str = |max: usize| {
        (1..=max, any::<u8>())
            .prop_map(|(n, c)| "é".repeat(n / 2) + &"a".repeat(n % 2 + (c % 2) as usize))
    };
    (
        version(),
        0usize..300_000,
        long_str(65_000),
        long_str(65_000),
        qos(),
    )
        .prop_map(|(v, payload_len, topic, client_id, qos)| {
            let topic = TopicName::new(topic).expect("no wildcards");
            let payload = Bytes::from(vec![0xa5u8; payload_len]);
            let packet = if payload_len % 2 == 0 {
                Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain: false,
                    topic,
                    packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(7).unwrap()),
                    payload,
                    properties: None,
                })
            } else {
                Packet::Connect(Box::new(Connect {
                    protocol: v,
                    clean_start: true,
                    keep_alive: 60,
                    client_id: ByteString::from(client_id),
                    will: Some(LastWill {
                        topic,
                        payload: payload.slice(..payload.len().min(65_535)),
                        qos,
                        retain: true,
                        properties: None,
                    }),
                    username: None,
                    password: None,
                    properties: None,
                }))
            };
            (v, packet)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn big_packets_round_trip((v, p) in big_packet()) {
        let mut buf = encode(&p, v);
        prop_assert_eq!(buf.len(), p.encoded_len(v));
        prop_assert_eq!(decode(&mut buf, v, LARGE), Ok(Some(p)));
        prop_assert!(buf.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn decode_inverts_encode((v, p) in versioned_packet()) {
        let mut buf = encode(&p, v);
        prop_assert_eq!(buf.len(), p.encoded_len(v));
        let size = buf.len();
        // Every strict prefix is "not yet", and consumes nothing.
        for cut in [1, size / 2, size - 1] {
            if cut > 0 && cut < size {
                let mut part = BytesMut::from(&buf[..cut]);
                prop_assert_eq!(decode(&mut part, v, LARGE), Ok(None));
                prop_assert_eq!(part.len(), cut);
            }
        }
        prop_assert_eq!(decode(&mut buf, v, size), Ok(Some(p)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn oversized_packet_refused_from_its_fixed_header((v, p) in versioned_packet()) {
        let buf = encode(&p, v);
        let header = FixedHeader::parse(&buf).unwrap().unwrap();
        let mut only_header = BytesMut::from(&buf[..header.header_len]);
        let max = buf.len() - 1;
        prop_assert_eq!(
            decode(&mut only_header, v, max),
            Err(DecodeError::PacketTooLarge { size: buf.len(), max })
        );
        prop_assert_eq!(only_header.len(), header.header_len);
    }

    #[test]
    fn split_stream_yields_the_same_packets(
        (v, packets) in version().prop_flat_map(|v| (Just(v), vec(packet(v), 1..6))),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut stream = BytesMut::new();
        for p in &packets {
            p.encode(v, &mut stream);
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for cut in cuts {
            buf.extend_from_slice(&stream[at..cut]);
            at = cut;
            loop {
                match decode(&mut buf, v, LARGE) {
                    Ok(Some(p)) => got.push(p),
                    Ok(None) => break,
                    Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                }
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, packets);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        v in version(),
        bytes in vec(any::<u8>(), 0..256),
        max in prop_oneof![Just(0usize), 2usize..64, Just(LARGE), Just(usize::MAX)],
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        for p in drain(&mut buf, v, max) {
            // Whatever decodes re-encodes to something that decodes the same.
            let mut again = encode(&p, v);
            prop_assert_eq!(decode(&mut again, v, usize::MAX), Ok(Some(p)));
        }
    }

    /// Bytes that start like a real packet get further than random ones.
    #[test]
    fn mutated_packets_never_panic(
        (v, p) in versioned_packet(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encode(&p, v).to_vec();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        let mut buf = BytesMut::from(&bytes[..]);
        for p in drain(&mut buf, v, usize::MAX) {
            let mut again = encode(&p, v);
            prop_assert_eq!(decode(&mut again, v, usize::MAX), Ok(Some(p)));
        }
    }
}

#[test]
fn empty_buffer_is_not_yet() {
    for v in [
        ProtocolVersion::V3_1,
        ProtocolVersion::V3_1_1,
        ProtocolVersion::V5,
    ] {
        assert_eq!(decode(&mut BytesMut::new(), v, 10), Ok(None));
    }
}

#[test]
fn packet_too_large_counts_the_fixed_header() {
    // PUBLISH with Remaining Length 200: 203 bytes in all.
    let mut buf = BytesMut::from(&b"\x30\xc8\x01"[..]);
    assert_eq!(
        decode(&mut buf, ProtocolVersion::V3_1_1, 202),
        Err(DecodeError::PacketTooLarge {
            size: 203,
            max: 202
        })
    );
    assert_eq!(decode(&mut buf, ProtocolVersion::V3_1_1, 203), Ok(None));
    assert_eq!(buf.len(), 3);
}

#[test]
fn names_and_types() {
    assert_eq!(Packet::PingReq.packet_type(), 12);
    assert_eq!(Packet::PingReq.name(), "PINGREQ");
    assert_eq!(Packet::Auth(Auth::default()).name(), "AUTH");
}
