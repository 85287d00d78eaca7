//! PUBLISH (§3.3) and its acknowledgements PUBACK, PUBREC, PUBREL, PUBCOMP
//! (§3.4 - §3.7).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::header::varint_len;
use super::properties;
use super::wire::{put_str, str_len, topic_name, Reader};
use super::{reason, DecodeError, PacketId, ProtocolVersion, PubResp, Publish, QoS};
use crate::proto::topic::TopicName;

/// Decodes a PUBLISH from the whole `packet`, its variable header starting
/// at `pos`; `flags` is the low nibble of its fixed header, whose QoS was
/// already checked against 3 from byte 1.
///
/// Takes the packet by value so that the payload is `packet` itself, advanced
/// past the headers: one reference-count update less per PUBLISH than
/// slicing it out and dropping the packet (atomics dominate this path).
#[inline]
pub(crate) fn decode_publish(
    flags: u8,
    packet: Bytes,
    pos: usize,
    version: ProtocolVersion,
) -> Result<Publish, DecodeError> {
    let r = &mut Reader::new(&packet, pos);
    let dup = flags & 0b1000 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS(3))?;
    // "The DUP flag MUST be set to 0 for all QoS 0 messages" (MQTT-3.3.1-2 of
    // 3.1.1 and 5.0). 3.1 has no such rule, so its old clients are let be.
    if dup && qos == QoS::AtMostOnce && version != ProtocolVersion::V3_1 {
        return Err(DecodeError::InvalidFlags {
            packet_type: 3,
            flags,
        });
    }
    let raw_topic = r.raw_topic()?;
    // An empty topic is only allowed in 5.0 with a Topic Alias, which is
    // known after the properties; anything else is checked now.
    let topic = if raw_topic.is_empty() {
        None
    } else {
        Some(topic_name(raw_topic)?)
    };
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.packet_id()?)
    };
    let props = if version.is_v5() {
        properties::decode(r, properties::PUBLISH, true)?
    } else {
        None
    };
    let topic = match topic {
        Some(t) => t,
        None if props.as_ref().is_some_and(|p| p.topic_alias.is_some()) => {
            TopicName::alias_only() // MQTT 5 §3.3.2.3.4
        }
        None => return Err(DecodeError::InvalidTopicName), // MQTT-4.7.3-1
    };
    let header_end = r.position();
    let mut payload = packet;
    payload.advance(header_end);
    Ok(Publish {
        dup,
        qos,
        retain: flags & 1 != 0,
        topic,
        packet_id,
        payload,
        properties: props,
    })
}

impl Publish {
    /// A QoS 0 PUBLISH of `payload` to `topic`, no flags, no properties.
    pub fn new(topic: TopicName, payload: impl Into<Bytes>) -> Self {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            packet_id: None,
            payload: payload.into(),
            properties: None,
        }
    }

    /// The size of this PUBLISH on the wire for `version`, fixed header
    /// included: what a peer's Maximum Packet Size is compared with.
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let rl = self.remaining_len(version);
        1 + varint_len(rl) + rl
    }

    /// Byte 1 of the fixed header.
    #[inline]
    pub(crate) fn first_byte(&self) -> u8 {
        0x30 | u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain)
    }

    #[inline]
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        let mut n = str_len(self.topic.as_bytes()) + self.payload.len();
        if self.qos != QoS::AtMostOnce {
            n += 2;
        }
        if version.is_v5() {
            n += properties::wire_len(&self.properties);
        }
        n
    }

    #[inline]
    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        put_str(out, self.topic.as_bytes());
        if self.qos != QoS::AtMostOnce {
            // A QoS > 0 PUBLISH without an identifier is a caller bug; 0 makes
            // the peer refuse it rather than misparse it.
            debug_assert!(
                self.packet_id.is_some(),
                "QoS > 0 PUBLISH needs a packet id"
            );
            out.put_u16(self.packet_id.map_or(0, PacketId::get));
        }
        if version.is_v5() {
            properties::encode(&self.properties, out);
        }
        out.put_slice(&self.payload);
    }
}

/// Whether `code` is a 5.0 reason code of this acknowledgement type.
fn is_pub_resp_reason(packet_type: u8, code: u8) -> bool {
    match packet_type {
        // PUBACK (§3.4.2.1) and PUBREC (§3.5.2.1).
        4 | 5 => matches!(
            code,
            reason::SUCCESS
                | reason::NO_MATCHING_SUBSCRIBERS
                | reason::UNSPECIFIED_ERROR
                | reason::IMPLEMENTATION_SPECIFIC_ERROR
                | reason::NOT_AUTHORIZED
                | reason::TOPIC_NAME_INVALID
                | reason::PACKET_IDENTIFIER_IN_USE
                | reason::QUOTA_EXCEEDED
                | reason::PAYLOAD_FORMAT_INVALID
        ),
        // PUBREL (§3.6.2.1) and PUBCOMP (§3.7.2.1).
        _ => matches!(code, reason::SUCCESS | reason::PACKET_IDENTIFIER_NOT_FOUND),
    }
}

/// Decodes PUBACK / PUBREC / PUBREL / PUBCOMP (`packet_type` 4 to 7).
///
/// In 5.0 the Reason Code may be left out when the Remaining Length is 2
/// (it is then 0x00) and the Property Length when it is below 4 (§3.4.2.1).
pub(crate) fn decode_pub_resp(
    packet_type: u8,
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<PubResp, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut ack = PubResp::new(packet_id);
    if version.is_v5() && !r.is_empty() {
        ack.reason = r.u8()?;
        if !is_pub_resp_reason(packet_type, ack.reason) {
            return Err(DecodeError::InvalidReasonCode(ack.reason));
        }
        if !r.is_empty() {
            ack.properties = properties::decode(r, properties::ACK, false)?;
        }
    }
    r.finish()?;
    Ok(ack)
}

impl PubResp {
    /// A success acknowledgement of `packet_id`.
    pub fn new(packet_id: PacketId) -> Self {
        PubResp {
            packet_id,
            reason: reason::SUCCESS,
            properties: None,
        }
    }

    #[inline]
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        match (version.is_v5(), self.reason, &self.properties) {
            (false, _, _) | (true, 0, None) => 2,
            (true, _, None) => 3,
            (true, _, p) => 3 + properties::wire_len(p),
        }
    }

    #[inline]
    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if version.is_v5() && (self.reason != 0 || self.properties.is_some()) {
            out.put_u8(self.reason);
            if self.properties.is_some() {
                properties::encode(&self.properties, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use bytestring::ByteString;

    use super::super::{decode, Packet, Properties};
    use super::*;
    use ProtocolVersion::*;

    fn topic(s: &'static str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    #[test]
    fn publish_qos0_and_qos1_bytes_every_version() {
        let p0 = Packet::Publish(Publish::new(topic("a/b"), Bytes::from_static(b"hi")));
        let mut p1 = Publish::new(topic("a/b"), Bytes::from_static(b"hi"));
        p1.qos = QoS::AtLeastOnce;
        p1.retain = true;
        p1.packet_id = Some(pid(10));
        let p1 = Packet::Publish(p1);
        for v in [V3_1, V3_1_1] {
            assert_eq!(enc(&p0, v), b"\x30\x07\x00\x03a/bhi");
            assert_eq!(enc(&p1, v), b"\x33\x09\x00\x03a/b\x00\x0ahi");
            assert_eq!(dec(b"\x30\x07\x00\x03a/bhi", v).unwrap(), Some(p0.clone()));
            assert_eq!(
                dec(b"\x33\x09\x00\x03a/b\x00\x0ahi", v).unwrap(),
                Some(p1.clone())
            );
        }
        assert_eq!(enc(&p0, V5), b"\x30\x08\x00\x03a/b\x00hi");
        assert_eq!(enc(&p1, V5), b"\x33\x0a\x00\x03a/b\x00\x0a\x00hi");
        assert_eq!(dec(b"\x30\x08\x00\x03a/b\x00hi", V5).unwrap(), Some(p0));
        assert_eq!(
            dec(b"\x33\x0a\x00\x03a/b\x00\x0a\x00hi", V5).unwrap(),
            Some(p1)
        );
    }

    #[test]
    fn payload_and_topic_are_slices_of_the_read_buffer() {
        let mut buf = BytesMut::from(&b"\x30\x07\x00\x03a/bhi"[..]);
        let base = buf.as_ptr() as usize;
        let Some(Packet::Publish(p)) = decode(&mut buf, V3_1_1, MAX).unwrap() else {
            panic!()
        };
        assert_eq!(p.payload.as_ptr() as usize, base + 7);
        assert_eq!(p.topic.as_ptr() as usize, base + 4);
    }

    #[test]
    fn qos_3_is_malformed_mqtt_3_3_1_4() {
        assert_eq!(
            dec(b"\x36\x07\x00\x03a/bhi", V3_1_1),
            Err(DecodeError::InvalidQoS(3))
        );
        // Refused from byte 1, before the body arrives.
        assert_eq!(dec(b"\x36", V5), Err(DecodeError::InvalidQoS(3)));
    }

    #[test]
    fn dup_with_qos_0_is_malformed_mqtt_3_3_1_2() {
        let e = Err(DecodeError::InvalidFlags {
            packet_type: 3,
            flags: 8,
        });
        assert_eq!(dec(b"\x38\x07\x00\x03a/bhi", V3_1_1), e);
        assert_eq!(dec(b"\x38\x08\x00\x03a/b\x00hi", V5), e);
        // 3.1 has no such rule.
        let Some(Packet::Publish(p)) = dec(b"\x38\x07\x00\x03a/bhi", V3_1).unwrap() else {
            panic!()
        };
        assert!(p.dup);
    }

    #[test]
    fn wildcards_or_empty_topic_are_malformed_mqtt_3_3_2_2() {
        assert_eq!(
            dec(b"\x30\x07\x00\x03a/+hi", V3_1_1),
            Err(DecodeError::InvalidTopicName)
        );
        assert_eq!(
            dec(b"\x30\x07\x00\x03a/#hi", V3_1_1),
            Err(DecodeError::InvalidTopicName)
        );
        assert_eq!(
            dec(b"\x30\x04\x00\x00hi", V3_1_1),
            Err(DecodeError::InvalidTopicName)
        );
        assert_eq!(
            dec(b"\x30\x05\x00\x00\x00hi", V5),
            Err(DecodeError::InvalidTopicName)
        );
        assert_eq!(
            dec(b"\x30\x07\x00\x03a\x00bhi", V3_1_1),
            Err(DecodeError::NullCharacter)
        );
        assert_eq!(
            dec(b"\x30\x07\x00\x03a\xffbhi", V3_1_1),
            Err(DecodeError::InvalidUtf8)
        );
    }

    #[test]
    fn v5_empty_topic_with_topic_alias_is_alias_only_mqtt_3_3_2_3_4() {
        let bytes = b"\x30\x08\x00\x00\x03\x23\x00\x07hi";
        let Some(Packet::Publish(p)) = dec(bytes, V5).unwrap() else {
            panic!()
        };
        assert!(p.topic.is_empty());
        assert_eq!(p.properties.as_ref().unwrap().topic_alias, Some(7));
        assert_eq!(enc(&Packet::Publish(p), V5), bytes);
        // Topic Alias 0 is a Protocol Error (§3.3.2.3.4).
        assert_eq!(
            dec(b"\x30\x08\x00\x00\x03\x23\x00\x00hi", V5),
            Err(DecodeError::InvalidPropertyValue(0x23))
        );
    }

    #[test]
    fn publish_packet_id_0_is_malformed_mqtt_2_3_1_1() {
        assert_eq!(
            dec(b"\x32\x09\x00\x03a/b\x00\x00hi", V3_1_1),
            Err(DecodeError::ZeroPacketId)
        );
    }

    #[test]
    fn v5_publish_repeatable_and_duplicate_properties() {
        // Two Subscription Identifiers and two User Properties are fine.
        let bytes = b"\x30\x17\x00\x01t\x13\x0b\x01\x0b\x80\x01\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x01w";
        let Some(Packet::Publish(p)) = dec(bytes, V5).unwrap() else {
            panic!()
        };
        let props = p.properties.as_deref().unwrap();
        assert_eq!(props.subscription_identifiers, vec![1, 128]);
        assert_eq!(props.user_properties.len(), 2);
        assert_eq!(enc(&Packet::Publish(p), V5), bytes);
        // Message Expiry Interval twice is not.
        assert_eq!(
            dec(
                b"\x30\x0e\x00\x01t\x0a\x02\x00\x00\x00\x01\x02\x00\x00\x00\x01",
                V5
            ),
            Err(DecodeError::DuplicateProperty(0x02))
        );
        // Session Expiry Interval has no place in PUBLISH.
        assert_eq!(
            dec(b"\x30\x09\x00\x01t\x05\x11\x00\x00\x00\x01", V5),
            Err(DecodeError::InvalidProperty(0x11))
        );
        // Payload Format Indicator is 0 or 1.
        assert_eq!(
            dec(b"\x30\x06\x00\x01t\x02\x01\x02", V5),
            Err(DecodeError::InvalidPropertyValue(1))
        );
        // Subscription Identifier 0 is a Protocol Error (§3.3.2.3.8).
        assert_eq!(
            dec(b"\x30\x06\x00\x01t\x02\x0b\x00", V5),
            Err(DecodeError::InvalidPropertyValue(0x0b))
        );
        // A property running past the Property Length is truncated.
        assert_eq!(
            dec(b"\x30\x09\x00\x01t\x02\x02\x00\x00\x00\x01", V5),
            Err(DecodeError::Truncated)
        );
        // A Property Length of five varint bytes.
        assert_eq!(
            dec(b"\x30\x08\x00\x01t\x80\x80\x80\x80\x01", V5),
            Err(DecodeError::MalformedRemainingLength)
        );
    }

    #[test]
    fn fixture_mosquitto_pub_publish_qos1_v311() {
        let raw = include_bytes!("../../../tests/fixtures/mosquitto_pub_will_v311.bin");
        let mut buf = BytesMut::from(&raw[..]);
        assert!(matches!(
            decode(&mut buf, V3_1_1, MAX),
            Ok(Some(Packet::Connect(_)))
        ));
        let Some(Packet::Publish(p)) = decode(&mut buf, V3_1_1, MAX).unwrap() else {
            panic!("expected PUBLISH")
        };
        assert_eq!(p.topic.as_str(), "sensors/temp");
        assert_eq!(&p.payload[..], b"21.5");
        assert_eq!((p.qos, p.retain, p.dup), (QoS::AtLeastOnce, false, false));
        assert_eq!(p.packet_id, Some(pid(1)));
        assert_eq!(enc(&Packet::Publish(p), V3_1_1), &raw[60..82]);
        assert_eq!(
            decode(&mut buf, V3_1_1, MAX),
            Ok(Some(Packet::Disconnect(Default::default())))
        );
    }

    #[test]
    fn fixture_paho_v5_publish_properties() {
        let raw = include_bytes!("../../../tests/fixtures/paho_v5.bin");
        let mut buf = BytesMut::from(&raw[..]);
        assert!(matches!(
            decode(&mut buf, V3_1_1, MAX),
            Ok(Some(Packet::Connect(_)))
        ));
        assert!(matches!(
            decode(&mut buf, V5, MAX),
            Ok(Some(Packet::Subscribe(_)))
        ));
        let start = raw.len() - buf.len();
        let Some(Packet::Publish(p)) = decode(&mut buf, V5, MAX).unwrap() else {
            panic!("expected PUBLISH")
        };
        assert_eq!(p.topic.as_str(), "sensors/1/temp");
        assert_eq!(&p.payload[..], b"21.5");
        assert_eq!(p.qos, QoS::AtLeastOnce);
        let props = p.properties.as_deref().unwrap();
        assert_eq!(props.message_expiry_interval, Some(60));
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.response_topic.as_deref(), Some("replies/paho"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"\x01\x02"[..]));
        assert_eq!(
            props.user_properties,
            vec![(
                ByteString::from_static("unit"),
                ByteString::from_static("C")
            )]
        );
        let end = raw.len() - buf.len();
        assert_eq!(enc(&Packet::Publish(p), V5), &raw[start..end]);
    }

    #[test]
    fn pub_resp_bytes_and_v5_shortening_mqtt_3_4_2_1() {
        let ack = PubResp::new(pid(7));
        for (ty, first) in [(4u8, 0x40u8), (5, 0x50), (6, 0x62), (7, 0x70)] {
            let p = match ty {
                4 => Packet::PubAck(ack.clone()),
                5 => Packet::PubRec(ack.clone()),
                6 => Packet::PubRel(ack.clone()),
                _ => Packet::PubComp(ack.clone()),
            };
            for v in [V3_1, V3_1_1, V5] {
                assert_eq!(enc(&p, v), [first, 2, 0, 7]);
                assert_eq!(dec(&[first, 2, 0, 7], v).unwrap(), Some(p.clone()));
            }
            // Remaining Length 4 with Property Length 0 is the same packet.
            assert_eq!(dec(&[first, 4, 0, 7, 0, 0], V5).unwrap(), Some(p.clone()));
            // 3.x acknowledgements are exactly 2 bytes.
            assert_eq!(
                dec(&[first, 3, 0, 7, 0], V3_1_1),
                Err(DecodeError::TrailingBytes)
            );
            assert_eq!(dec(&[first, 1, 0], V3_1_1), Err(DecodeError::Truncated));
            assert_eq!(dec(&[first, 2, 0, 0], V5), Err(DecodeError::ZeroPacketId));
        }
        let mut nf = PubResp::new(pid(7));
        nf.reason = reason::PACKET_IDENTIFIER_NOT_FOUND;
        let p = Packet::PubRel(nf.clone());
        assert_eq!(enc(&p, V5), b"\x62\x03\x00\x07\x92");
        assert_eq!(dec(b"\x62\x03\x00\x07\x92", V5).unwrap(), Some(p));
        nf.properties = Some(Box::new(Properties {
            reason_string: Some(ByteString::from_static("x")),
            ..Properties::default()
        }));
        let p = Packet::PubComp(nf);
        assert_eq!(enc(&p, V5), b"\x70\x08\x00\x07\x92\x04\x1f\x00\x01x");
        assert_eq!(
            dec(b"\x70\x08\x00\x07\x92\x04\x1f\x00\x01x", V5).unwrap(),
            Some(p)
        );
    }

    #[test]
    fn pub_resp_reason_codes_are_checked_per_type() {
        assert!(dec(b"\x40\x03\x00\x07\x10", V5).unwrap().is_some());
        assert_eq!(
            dec(b"\x62\x03\x00\x07\x10", V5),
            Err(DecodeError::InvalidReasonCode(0x10))
        );
        assert_eq!(
            dec(b"\x40\x03\x00\x07\x92", V5),
            Err(DecodeError::InvalidReasonCode(0x92))
        );
        assert_eq!(
            dec(b"\x50\x03\x00\x07\x04", V5),
            Err(DecodeError::InvalidReasonCode(0x04))
        );
    }

    #[test]
    fn pubrel_flags_must_be_0010_mqtt_3_6_1_1() {
        assert_eq!(
            dec(b"\x60\x02\x00\x07", V3_1_1),
            Err(DecodeError::InvalidFlags {
                packet_type: 6,
                flags: 0
            })
        );
        assert_eq!(
            dec(b"\x42\x02\x00\x07", V5),
            Err(DecodeError::InvalidFlags {
                packet_type: 4,
                flags: 2
            })
        );
    }
}
