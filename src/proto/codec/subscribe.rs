//! SUBSCRIBE (§3.8), SUBACK (§3.9), UNSUBSCRIBE (§3.10), UNSUBACK (§3.11).

use bytes::{BufMut, BytesMut};

use super::properties;
use super::wire::{put_str, str_len, Reader};
use super::{
    reason, DecodeError, ProtocolVersion, QoS, SubAck, Subscribe, SubscriptionOptions, UnsubAck,
    Unsubscribe,
};

/// Parses a Subscription Options byte (3.x: Requested QoS only).
fn options(b: u8, version: ProtocolVersion) -> Result<SubscriptionOptions, DecodeError> {
    // 3.x: the upper six bits are reserved and 0 (MQTT-3.8.3-4 of 3.1.1).
    // 5.0: bits 6-7 are reserved and 0, Retain Handling 3 is a Protocol
    // Error (MQTT-3.8.3-5 of 5.0, §3.8.3.1).
    let reserved = if version.is_v5() { 0xc0 } else { 0xfc };
    if b & reserved != 0 {
        return Err(DecodeError::InvalidSubscriptionOptions);
    }
    if (b >> 4) & 0b11 == 3 {
        return Err(DecodeError::InvalidRetainHandling);
    }
    let qos = QoS::from_u8(b & 0b11).ok_or(DecodeError::InvalidQoS(b & 0b11))?;
    Ok(SubscriptionOptions {
        qos,
        no_local: b & 0x04 != 0,
        retain_as_published: b & 0x08 != 0,
        retain_handling: (b >> 4) & 0b11,
    })
}

impl SubscriptionOptions {
    /// The options byte; 5.0-only bits are left out for 3.x.
    fn to_byte(self, version: ProtocolVersion) -> u8 {
        let mut b = self.qos as u8;
        if version.is_v5() {
            b |= u8::from(self.no_local) << 2
                | u8::from(self.retain_as_published) << 3
                | (self.retain_handling & 0b11) << 4;
        }
        b
    }
}

/// Decodes a SUBSCRIBE body.
pub(crate) fn decode_subscribe(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let props = if version.is_v5() {
        // One Subscription Identifier at most (§3.8.2.1.2).
        properties::decode(r, properties::SUBSCRIBE, false)?
    } else {
        None
    };
    // Shortest entry: a one-byte filter, its length and the options.
    let mut filters = Vec::with_capacity((r.remaining() / 4).clamp(1, 8));
    while !r.is_empty() {
        let filter = r.topic_filter()?;
        let opts = options(r.u8()?, version)?;
        filters.push((filter, opts));
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters); // MQTT-3.8.3-3
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties: props,
    })
}

impl Subscribe {
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        let mut n = 2;
        if version.is_v5() {
            n += properties::wire_len(&self.properties);
        }
        for (f, _) in &self.filters {
            n += str_len(f.as_bytes()) + 1;
        }
        n
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if version.is_v5() {
            properties::encode(&self.properties, out);
        }
        for (f, o) in &self.filters {
            put_str(out, f.as_bytes());
            out.put_u8(o.to_byte(version));
        }
    }
}

/// Whether `code` is a SUBACK code: granted QoS or failure 0x80 in 3.x
/// (MQTT-3.9.3-2), the reason codes of §3.9.3 in 5.0.
fn is_suback_code(code: u8, version: ProtocolVersion) -> bool {
    if version.is_v5() {
        matches!(
            code,
            reason::SUCCESS
                | reason::GRANTED_QOS_1
                | reason::GRANTED_QOS_2
                | reason::UNSPECIFIED_ERROR
                | reason::IMPLEMENTATION_SPECIFIC_ERROR
                | reason::NOT_AUTHORIZED
                | reason::TOPIC_FILTER_INVALID
                | reason::PACKET_IDENTIFIER_IN_USE
                | reason::QUOTA_EXCEEDED
                | reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
                | reason::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED
                | reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
        )
    } else {
        matches!(code, 0 | 1 | 2 | 0x80)
    }
}

/// Whether `code` is an UNSUBACK reason code of 5.0 (§3.11.3).
fn is_unsuback_code(code: u8) -> bool {
    matches!(
        code,
        reason::SUCCESS
            | reason::NO_SUBSCRIPTION_EXISTED
            | reason::UNSPECIFIED_ERROR
            | reason::IMPLEMENTATION_SPECIFIC_ERROR
            | reason::NOT_AUTHORIZED
            | reason::TOPIC_FILTER_INVALID
            | reason::PACKET_IDENTIFIER_IN_USE
    )
}

/// Reads the codes that fill the rest of a SUBACK / UNSUBACK.
fn codes(r: &mut Reader<'_>, valid: impl Fn(u8) -> bool) -> Result<Vec<u8>, DecodeError> {
    let n = r.remaining();
    let codes = r.slice(n)?;
    if let Some(&bad) = codes.iter().find(|&&c| !valid(c)) {
        return Err(DecodeError::InvalidReasonCode(bad));
    }
    Ok(codes.to_vec())
}

/// Decodes a SUBACK body.
pub(crate) fn decode_suback(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let props = if version.is_v5() {
        properties::decode(r, properties::ACK, false)?
    } else {
        None
    };
    Ok(SubAck {
        packet_id,
        codes: codes(r, |c| is_suback_code(c, version))?,
        properties: props,
    })
}

impl SubAck {
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        let props = if version.is_v5() {
            properties::wire_len(&self.properties)
        } else {
            0
        };
        2 + props + self.codes.len()
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if version.is_v5() {
            properties::encode(&self.properties, out);
        }
        out.put_slice(&self.codes);
    }
}

/// Decodes an UNSUBSCRIBE body.
pub(crate) fn decode_unsubscribe(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let props = if version.is_v5() {
        properties::decode(r, properties::UNSUBSCRIBE, false)?
    } else {
        None
    };
    let mut filters = Vec::with_capacity((r.remaining() / 3).clamp(1, 8));
    while !r.is_empty() {
        filters.push(r.topic_filter()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters); // MQTT-3.10.3-2
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties: props,
    })
}

impl Unsubscribe {
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        let mut n = 2;
        if version.is_v5() {
            n += properties::wire_len(&self.properties);
        }
        n + self
            .filters
            .iter()
            .map(|f| str_len(f.as_bytes()))
            .sum::<usize>()
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if version.is_v5() {
            properties::encode(&self.properties, out);
        }
        for f in &self.filters {
            put_str(out, f.as_bytes());
        }
    }
}

/// Decodes an UNSUBACK body: just the identifier in 3.x, plus properties
/// and one reason code per filter in 5.0.
pub(crate) fn decode_unsuback(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    if !version.is_v5() {
        r.finish()?;
        return Ok(UnsubAck {
            packet_id,
            codes: Vec::new(),
            properties: None,
        });
    }
    let props = properties::decode(r, properties::ACK, false)?;
    Ok(UnsubAck {
        packet_id,
        codes: codes(r, is_unsuback_code)?,
        properties: props,
    })
}

impl UnsubAck {
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        if version.is_v5() {
            2 + properties::wire_len(&self.properties) + self.codes.len()
        } else {
            2
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if version.is_v5() {
            properties::encode(&self.properties, out);
            out.put_slice(&self.codes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use bytestring::ByteString;

    use super::super::{decode, Packet, Properties};
    use super::*;
    use crate::proto::topic::TopicFilter;
    use ProtocolVersion::*;

    fn filter(s: &'static str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    #[test]
    fn subscribe_bytes_each_version_mqtt_3_8() {
        let s = Packet::Subscribe(Subscribe {
            packet_id: pid(1),
            filters: vec![
                (filter("a/+"), SubscriptionOptions::qos(QoS::AtLeastOnce)),
                (filter("#"), SubscriptionOptions::qos(QoS::ExactlyOnce)),
            ],
            properties: None,
        });
        let v3 = b"\x82\x0c\x00\x01\x00\x03a/+\x01\x00\x01#\x02";
        for v in [V3_1, V3_1_1] {
            assert_eq!(enc(&s, v), v3);
            assert_eq!(dec(v3, v).unwrap(), Some(s.clone()));
        }
        let v5 = b"\x82\x0d\x00\x01\x00\x00\x03a/+\x01\x00\x01#\x02";
        assert_eq!(enc(&s, V5), v5);
        assert_eq!(dec(v5, V5).unwrap(), Some(s));
    }

    #[test]
    fn subscribe_without_filters_is_malformed_mqtt_3_8_3_3() {
        assert_eq!(
            dec(b"\x82\x02\x00\x01", V3_1_1),
            Err(DecodeError::NoTopicFilters)
        );
        assert_eq!(
            dec(b"\x82\x03\x00\x01\x00", V5),
            Err(DecodeError::NoTopicFilters)
        );
    }

    #[test]
    fn subscribe_flags_must_be_0010_mqtt_3_8_1_1() {
        assert_eq!(
            dec(b"\x80\x06\x00\x01\x00\x01a\x00", V3_1_1),
            Err(DecodeError::InvalidFlags {
                packet_type: 8,
                flags: 0
            })
        );
    }

    #[test]
    fn subscribe_reserved_option_bits_are_malformed_mqtt_3_8_3_4() {
        // 3.1.1: any of the upper six bits.
        assert_eq!(
            dec(b"\x82\x06\x00\x01\x00\x01a\x04", V3_1_1),
            Err(DecodeError::InvalidSubscriptionOptions)
        );
        assert_eq!(
            dec(b"\x82\x06\x00\x01\x00\x01a\x03", V3_1_1),
            Err(DecodeError::InvalidQoS(3))
        );
        // 5.0: bits 6-7, and Retain Handling 3.
        assert_eq!(
            dec(b"\x82\x07\x00\x01\x00\x00\x01a\x40", V5),
            Err(DecodeError::InvalidSubscriptionOptions)
        );
        assert_eq!(
            dec(b"\x82\x07\x00\x01\x00\x00\x01a\x30", V5),
            Err(DecodeError::InvalidRetainHandling)
        );
        assert_eq!(
            dec(b"\x82\x07\x00\x01\x00\x00\x01a\x03", V5),
            Err(DecodeError::InvalidQoS(3))
        );
        let Some(Packet::Subscribe(s)) = dec(b"\x82\x07\x00\x01\x00\x00\x01a\x2e", V5).unwrap()
        else {
            panic!()
        };
        let o = s.filters[0].1;
        assert_eq!(
            (o.qos, o.no_local, o.retain_as_published, o.retain_handling),
            (QoS::ExactlyOnce, true, true, 2)
        );
    }

    #[test]
    fn subscribe_packet_id_0_is_malformed_mqtt_2_3_1_1() {
        assert_eq!(
            dec(b"\x82\x06\x00\x00\x00\x01a\x00", V3_1_1),
            Err(DecodeError::ZeroPacketId)
        );
        assert_eq!(
            dec(b"\xa2\x05\x00\x00\x00\x01a", V3_1_1),
            Err(DecodeError::ZeroPacketId)
        );
    }

    #[test]
    fn subscribe_bad_filter_and_truncated_entry() {
        assert_eq!(
            dec(b"\x82\x07\x00\x01\x00\x02a#\x00", V3_1_1),
            Err(DecodeError::InvalidTopicFilter)
        );
        assert_eq!(
            dec(b"\x82\x05\x00\x01\x00\x01a", V3_1_1),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            dec(b"\x82\x05\x00\x01\x00\x00\x00", V3_1_1),
            Err(DecodeError::InvalidTopicFilter)
        );
    }

    #[test]
    fn v5_subscribe_one_subscription_identifier_only_mqtt_3_8_2_1_2() {
        assert_eq!(
            dec(b"\x82\x0b\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00", V5),
            Err(DecodeError::DuplicateProperty(0x0b))
        );
        let s = dec(b"\x82\x09\x00\x01\x02\x0b\x05\x00\x01a\x00", V5).unwrap();
        let Some(Packet::Subscribe(s)) = s else {
            panic!()
        };
        assert_eq!(s.properties.unwrap().subscription_identifiers, vec![5]);
    }

    #[test]
    fn unsubscribe_bytes_and_no_filters_mqtt_3_10_3_2() {
        let u = Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(2),
            filters: vec![filter("a/#")],
            properties: None,
        });
        assert_eq!(enc(&u, V3_1_1), b"\xa2\x07\x00\x02\x00\x03a/#");
        assert_eq!(
            dec(b"\xa2\x07\x00\x02\x00\x03a/#", V3_1).unwrap(),
            Some(u.clone())
        );
        assert_eq!(enc(&u, V5), b"\xa2\x08\x00\x02\x00\x00\x03a/#");
        assert_eq!(
            dec(b"\xa2\x08\x00\x02\x00\x00\x03a/#", V5).unwrap(),
            Some(u)
        );
        assert_eq!(
            dec(b"\xa2\x02\x00\x02", V3_1_1),
            Err(DecodeError::NoTopicFilters)
        );
        assert_eq!(
            dec(b"\xa0\x02\x00\x02", V3_1_1),
            Err(DecodeError::InvalidFlags {
                packet_type: 10,
                flags: 0
            })
        );
        // UNSUBSCRIBE carries only User Properties.
        assert_eq!(
            dec(b"\xa2\x0a\x00\x02\x02\x0b\x01\x00\x03a/#", V5),
            Err(DecodeError::InvalidProperty(0x0b))
        );
    }

    #[test]
    fn suback_bytes_and_codes_mqtt_3_9_3_2() {
        let a = Packet::SubAck(SubAck {
            packet_id: pid(1),
            codes: vec![1, 0x80],
            properties: None,
        });
        assert_eq!(enc(&a, V3_1_1), b"\x90\x04\x00\x01\x01\x80");
        assert_eq!(
            dec(b"\x90\x04\x00\x01\x01\x80", V3_1_1).unwrap(),
            Some(a.clone())
        );
        assert_eq!(enc(&a, V5), b"\x90\x05\x00\x01\x00\x01\x80");
        assert_eq!(dec(b"\x90\x05\x00\x01\x00\x01\x80", V5).unwrap(), Some(a));
        assert_eq!(
            dec(b"\x90\x03\x00\x01\x03", V3_1_1),
            Err(DecodeError::InvalidReasonCode(3))
        );
        assert_eq!(
            dec(b"\x90\x03\x00\x01\x8f", V3_1_1),
            Err(DecodeError::InvalidReasonCode(0x8f))
        );
        assert!(dec(b"\x90\x04\x00\x01\x00\xa2", V5).unwrap().is_some());
        assert_eq!(
            dec(b"\x90\x04\x00\x01\x00\x11", V5),
            Err(DecodeError::InvalidReasonCode(0x11))
        );
    }

    #[test]
    fn unsuback_bytes_each_version_mqtt_3_11() {
        let v3 = Packet::UnsubAck(UnsubAck {
            packet_id: pid(9),
            codes: vec![],
            properties: None,
        });
        assert_eq!(enc(&v3, V3_1_1), b"\xb0\x02\x00\x09");
        assert_eq!(dec(b"\xb0\x02\x00\x09", V3_1_1).unwrap(), Some(v3));
        assert_eq!(
            dec(b"\xb0\x03\x00\x09\x00", V3_1_1),
            Err(DecodeError::TrailingBytes)
        );
        let v5 = Packet::UnsubAck(UnsubAck {
            packet_id: pid(9),
            codes: vec![0x00, 0x11],
            properties: Some(Box::new(Properties {
                reason_string: Some(ByteString::from_static("r")),
                ..Properties::default()
            })),
        });
        let bytes = b"\xb0\x09\x00\x09\x04\x1f\x00\x01r\x00\x11";
        assert_eq!(enc(&v5, V5), bytes);
        assert_eq!(dec(bytes, V5).unwrap(), Some(v5));
        assert_eq!(
            dec(b"\xb0\x04\x00\x09\x00\x01", V5),
            Err(DecodeError::InvalidReasonCode(1))
        );
    }

    #[test]
    fn fixture_paho_v5_subscribe_with_properties() {
        let raw = include_bytes!("../../../tests/fixtures/paho_v5.bin");
        let mut buf = BytesMut::from(&raw[..]);
        assert!(matches!(
            decode(&mut buf, V3_1_1, MAX),
            Ok(Some(Packet::Connect(_)))
        ));
        let start = raw.len() - buf.len();
        let Some(Packet::Subscribe(s)) = decode(&mut buf, V5, MAX).unwrap() else {
            panic!("expected SUBSCRIBE")
        };
        assert_eq!(s.packet_id, pid(1));
        let props = s.properties.as_deref().unwrap();
        assert_eq!(props.subscription_identifiers, vec![7]);
        assert_eq!(
            props.user_properties,
            vec![(
                ByteString::from_static("tag"),
                ByteString::from_static("sub")
            )]
        );
        assert_eq!(s.filters.len(), 1);
        let (f, o) = &s.filters[0];
        assert_eq!(f.as_str(), "sensors/+/temp");
        assert_eq!(
            (o.qos, o.no_local, o.retain_as_published, o.retain_handling),
            (QoS::AtLeastOnce, true, true, 1)
        );
        let end = raw.len() - buf.len();
        assert_eq!(enc(&Packet::Subscribe(s), V5), &raw[start..end]);
    }
}
