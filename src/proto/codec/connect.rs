//! CONNECT (§3.1) and CONNACK (§3.2).

use bytes::{BufMut, BytesMut};

use super::properties;
use super::wire::{put_str, str_len, topic_name, Reader};
use super::{reason, ConnAck, Connect, DecodeError, LastWill, ProtocolVersion, QoS};

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

/// The protocol a CONNECT announces by its name and level (MQTT-3.1.2-1/2).
fn protocol(name: &[u8], level: u8) -> Result<ProtocolVersion, DecodeError> {
    match (name, level) {
        (b"MQTT", 4) => Ok(ProtocolVersion::V3_1_1),
        (b"MQTT", 5) => Ok(ProtocolVersion::V5),
        (b"MQIsdp", 3) => Ok(ProtocolVersion::V3_1),
        // A known name with a level we do not speak under that name — an
        // unknown level, or the other name's (`MQTT` 3, `MQIsdp` 4): the
        // client is owed CONNACK 0x01 / 0x84 before the close
        // (MQTT-3.1.2-2), as mosquitto answers too. Only an unknown name is
        // closed without one (MQTT-3.1.2-1 lets the server just close).
        (b"MQTT" | b"MQIsdp", level) => Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => Err(DecodeError::InvalidProtocolName),
    }
}

/// Decodes the body of a CONNECT by the protocol it announces itself.
///
/// Boxes it here rather than in the caller: the struct is then built once,
/// not built, returned and copied into the box (callgrind showed the copy).
pub(crate) fn decode_connect(r: &mut Reader<'_>) -> Result<Box<Connect>, DecodeError> {
    let name_len = usize::from(r.u16()?);
    let name = r.slice(name_len)?;
    let level = r.u8()?;
    let protocol = protocol(name, level)?;
    let v5 = protocol.is_v5();

    let flags = r.u8()?;
    if flags & FLAG_RESERVED != 0 {
        return Err(DecodeError::ReservedConnectFlag); // MQTT-3.1.2-3
    }
    let will_flag = flags & FLAG_WILL != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & FLAG_WILL_RETAIN != 0;
    // Without a will, Will QoS and Will Retain are 0 (MQTT-3.1.2-11, -13,
    // -15); with one, Will QoS is not 3 (MQTT-3.1.2-14).
    if (!will_flag && (will_qos != 0 || will_retain)) || will_qos == 3 {
        return Err(DecodeError::InvalidWillFlags);
    }
    let has_password = flags & FLAG_PASSWORD != 0;
    let has_username = flags & FLAG_USERNAME != 0;
    // 5.0 lets a password stand alone (§3.1.2.9); 3.x does not (MQTT-3.1.2-22).
    if has_password && !has_username && !v5 {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16()?;
    let props = if v5 {
        properties::decode(r, properties::CONNECT, false)?
    } else {
        None
    };

    // No length rule on the client id here: 3.1's 23-character limit and
    // whether an empty id is allowed are the broker's decisions.
    let client_id = r.string()?;
    let will = if will_flag {
        let will_props = if v5 {
            properties::decode(r, properties::WILL, false)?
        } else {
            None
        };
        let topic = topic_name(r.raw_topic()?)?;
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: QoS::from_u8(will_qos).ok_or(DecodeError::InvalidWillFlags)?,
            retain: will_retain,
            properties: will_props,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    r.finish()?;
    Ok(Box::new(Connect {
        protocol,
        clean_start: flags & FLAG_CLEAN != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties: props,
    }))
}

impl Connect {
    fn name(&self) -> &'static [u8] {
        match self.protocol {
            ProtocolVersion::V3_1 => b"MQIsdp",
            _ => b"MQTT",
        }
    }

    /// Remaining Length of this CONNECT, written by its own protocol.
    pub(crate) fn remaining_len(&self) -> usize {
        let v5 = self.protocol.is_v5();
        let mut n = str_len(self.name()) + 1 + 1 + 2 + str_len(self.client_id.as_bytes());
        if v5 {
            n += properties::wire_len(&self.properties);
        }
        if let Some(w) = &self.will {
            if v5 {
                n += properties::wire_len(&w.properties);
            }
            n += str_len(w.topic.as_bytes()) + str_len(&w.payload);
        }
        if let Some(u) = &self.username {
            n += str_len(u.as_bytes());
        }
        if let Some(p) = &self.password {
            n += str_len(p);
        }
        n
    }

    /// Writes the variable header and payload.
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        let v5 = self.protocol.is_v5();
        put_str(out, self.name());
        out.put_u8(self.protocol.level());
        let mut flags = 0;
        if self.clean_start {
            flags |= FLAG_CLEAN;
        }
        if let Some(w) = &self.will {
            flags |= FLAG_WILL | (w.qos as u8) << 3;
            if w.retain {
                flags |= FLAG_WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= FLAG_USERNAME;
        }
        if self.password.is_some() {
            flags |= FLAG_PASSWORD;
        }
        out.put_u8(flags);
        out.put_u16(self.keep_alive);
        if v5 {
            properties::encode(&self.properties, out);
        }
        put_str(out, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if v5 {
                properties::encode(&w.properties, out);
            }
            put_str(out, w.topic.as_bytes());
            put_str(out, &w.payload);
        }
        if let Some(u) = &self.username {
            put_str(out, u.as_bytes());
        }
        if let Some(p) = &self.password {
            put_str(out, p);
        }
    }
}

/// Whether `code` is a CONNACK reason code of 5.0 (§3.2.2.2).
fn is_connack_reason(code: u8) -> bool {
    matches!(
        code,
        reason::SUCCESS | 0x80
            ..=0x8A
                | reason::BAD_AUTHENTICATION_METHOD
                | reason::TOPIC_NAME_INVALID
                | reason::PACKET_TOO_LARGE
                | reason::QUOTA_EXCEEDED
                | reason::PAYLOAD_FORMAT_INVALID
                | reason::RETAIN_NOT_SUPPORTED
                | reason::QOS_NOT_SUPPORTED
                | reason::USE_ANOTHER_SERVER
                | reason::SERVER_MOVED
                | reason::CONNECTION_RATE_EXCEEDED
    )
}

/// Decodes the body of a CONNACK.
pub(crate) fn decode_connack(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<ConnAck, DecodeError> {
    let ack_flags = r.u8()?;
    let session_present = match version {
        // 3.1 has no Session Present: the byte is reserved and carries nothing.
        ProtocolVersion::V3_1 => false,
        // Bits 7-1 are reserved and 0 (§3.2.2.1); there is no error variant
        // for a variable-header flag, and these are flags like the fixed ones.
        _ if ack_flags & 0xfe != 0 => {
            return Err(DecodeError::InvalidFlags {
                packet_type: 2,
                flags: ack_flags,
            })
        }
        _ => ack_flags & 1 != 0,
    };
    let code = r.u8()?;
    let props = if version.is_v5() {
        if !is_connack_reason(code) {
            return Err(DecodeError::InvalidReasonCode(code));
        }
        properties::decode(r, properties::CONNACK, false)?
    } else {
        // 6..=255 are "reserved for future use"; no 3.x server sends them.
        if code > super::return_code::NOT_AUTHORIZED {
            return Err(DecodeError::InvalidReasonCode(code));
        }
        None
    };
    r.finish()?;
    Ok(ConnAck {
        session_present,
        code,
        properties: props,
    })
}

impl ConnAck {
    /// A CONNACK with no properties.
    pub fn new(session_present: bool, code: u8) -> Self {
        ConnAck {
            session_present,
            code,
            properties: None,
        }
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        if version.is_v5() {
            2 + properties::wire_len(&self.properties)
        } else {
            2
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        let sp = self.session_present && version != ProtocolVersion::V3_1;
        out.put_u8(u8::from(sp));
        out.put_u8(self.code);
        if version.is_v5() {
            properties::encode(&self.properties, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use bytes::Bytes;
    use bytestring::ByteString;

    use super::super::{decode, Packet, Properties};
    use super::*;
    use crate::proto::topic::TopicName;
    use ProtocolVersion::*;

    fn connect(protocol: ProtocolVersion) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            client_id: ByteString::from_static("c1"),
            will: None,
            username: None,
            password: None,
            properties: None,
        }
    }

    /// Decodes as CONNECT whatever the connection's version says.
    fn dec_connect(bytes: &[u8]) -> Result<Connect, DecodeError> {
        match dec(bytes, V3_1_1)? {
            Some(Packet::Connect(c)) => Ok(*c),
            other => panic!("not a CONNECT: {other:?}"),
        }
    }

    #[test]
    fn minimal_connect_bytes_for_each_version_mqtt_3_1_2_1() {
        let v311 = b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c1";
        let v31 = b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x02c1";
        let v5 = b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x02c1";
        for (bytes, v) in [(&v311[..], V3_1_1), (&v31[..], V3_1), (&v5[..], V5)] {
            let p = Packet::Connect(Box::new(connect(v)));
            // The CONNECT's own protocol wins over the argument.
            assert_eq!(enc(&p, V3_1_1), bytes);
            assert_eq!(dec(bytes, V5).unwrap(), Some(p));
        }
    }

    #[test]
    fn level_not_spoken_under_its_name_is_owed_connack_1_mqtt_3_1_2_2() {
        // `MQTT` with 3.1's level, `MQIsdp` with 3.1.1's.
        assert_eq!(
            dec_connect(b"\x10\x0e\x00\x04MQTT\x03\x02\x00\x3c\x00\x02c1"),
            Err(DecodeError::UnsupportedProtocolVersion(3))
        );
        let e = dec_connect(b"\x10\x10\x00\x06MQIsdp\x04\x02\x00\x3c\x00\x02c1").unwrap_err();
        assert_eq!(e, DecodeError::UnsupportedProtocolVersion(4));
        assert_eq!(e.connack_return_code(), Some(1));
    }

    #[test]
    fn unknown_protocol_name_is_closed_without_connack_mqtt_3_1_2_1() {
        assert_eq!(
            dec_connect(b"\x10\x0e\x00\x04MQTX\x04\x02\x00\x3c\x00\x02c1"),
            Err(DecodeError::InvalidProtocolName)
        );
    }

    #[test]
    fn unknown_level_is_unsupported_version_owed_connack_1_mqtt_3_1_2_2() {
        let e = dec_connect(b"\x10\x0e\x00\x04MQTT\x06\x02\x00\x3c\x00\x02c1").unwrap_err();
        assert_eq!(e, DecodeError::UnsupportedProtocolVersion(6));
        assert_eq!(e.connack_return_code(), Some(1));
        assert_eq!(e.reason_code(), reason::UNSUPPORTED_PROTOCOL_VERSION);
    }

    #[test]
    fn reserved_connect_flag_is_malformed_mqtt_3_1_2_3() {
        assert_eq!(
            dec_connect(b"\x10\x0e\x00\x04MQTT\x04\x03\x00\x3c\x00\x02c1"),
            Err(DecodeError::ReservedConnectFlag)
        );
    }

    #[test]
    fn will_qos_or_retain_without_will_flag_is_malformed_mqtt_3_1_2_11_13_15() {
        for flags in [0x0a, 0x12, 0x22] {
            let bytes = [
                &b"\x10\x0e\x00\x04MQTT\x04"[..],
                &[flags],
                &b"\x00\x3c\x00\x02c1"[..],
            ]
            .concat();
            assert_eq!(
                dec_connect(&bytes),
                Err(DecodeError::InvalidWillFlags),
                "{flags:#x}"
            );
        }
    }

    #[test]
    fn will_qos_3_is_malformed_mqtt_3_1_2_14() {
        assert_eq!(
            dec_connect(b"\x10\x14\x00\x04MQTT\x04\x1e\x00\x3c\x00\x02c1\x00\x01t\x00\x01p"),
            Err(DecodeError::InvalidWillFlags)
        );
    }

    #[test]
    fn password_without_username_mqtt_3_1_2_22() {
        let v311 = b"\x10\x11\x00\x04MQTT\x04\x42\x00\x3c\x00\x02c1\x00\x01p";
        assert_eq!(dec_connect(v311), Err(DecodeError::PasswordWithoutUsername));
        let v31 = b"\x10\x13\x00\x06MQIsdp\x03\x42\x00\x3c\x00\x02c1\x00\x01p";
        assert_eq!(dec_connect(v31), Err(DecodeError::PasswordWithoutUsername));
        // 5.0 allows a password alone (§3.1.2.9).
        let v5 = b"\x10\x12\x00\x04MQTT\x05\x42\x00\x3c\x00\x00\x02c1\x00\x01p";
        let c = dec_connect(v5).unwrap();
        assert_eq!(c.username, None);
        assert_eq!(c.password, Some(Bytes::from_static(b"p")));
        assert_eq!(enc(&Packet::Connect(Box::new(c)), V5), v5);
    }

    #[test]
    fn client_id_utf8_and_null_rules_mqtt_1_5_3_1_and_2() {
        assert_eq!(
            dec_connect(b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02\xc3\x28"),
            Err(DecodeError::InvalidUtf8)
        );
        // An encoded surrogate (U+D800) is ill-formed too.
        assert_eq!(
            dec_connect(b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03\xed\xa0\x80"),
            Err(DecodeError::InvalidUtf8)
        );
        assert_eq!(
            dec_connect(b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c\x00"),
            Err(DecodeError::NullCharacter)
        );
    }

    #[test]
    fn long_client_id_is_a_broker_rule_not_a_codec_rule() {
        let id = "a".repeat(100);
        let mut c = connect(V3_1);
        c.client_id = ByteString::from(id);
        let p = Packet::Connect(Box::new(c));
        assert_eq!(dec(&enc(&p, V3_1), V3_1).unwrap(), Some(p));
    }

    #[test]
    fn will_topic_must_be_a_topic_name_mqtt_3_1_3_11() {
        let bytes = b"\x10\x14\x00\x04MQTT\x04\x06\x00\x3c\x00\x02c1\x00\x01#\x00\x01p";
        assert_eq!(dec_connect(bytes), Err(DecodeError::InvalidTopicName));
        let bytes = b"\x10\x13\x00\x04MQTT\x04\x06\x00\x3c\x00\x02c1\x00\x00\x00\x01p";
        assert_eq!(dec_connect(bytes), Err(DecodeError::InvalidTopicName));
    }

    #[test]
    fn trailing_and_truncated_connect_fields() {
        assert_eq!(
            dec_connect(b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c1X"),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(
            dec_connect(b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c"),
            Err(DecodeError::Truncated)
        );
        // The username flag promises a field that is not there.
        assert_eq!(
            dec_connect(b"\x10\x0e\x00\x04MQTT\x04\x82\x00\x3c\x00\x02c1"),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn v5_connect_properties_and_will_properties_round_trip() {
        let mut c = connect(V5);
        c.properties = Some(Box::new(Properties {
            session_expiry_interval: Some(10),
            receive_maximum: Some(5),
            ..Properties::default()
        }));
        c.will = Some(LastWill {
            topic: TopicName::new("w").unwrap(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Some(Box::new(Properties {
                will_delay_interval: Some(1),
                ..Properties::default()
            })),
        });
        let p = Packet::Connect(Box::new(c));
        let bytes = enc(&p, V5);
        assert_eq!(
            bytes,
            b"\x10\x23\x00\x04MQTT\x05\x2e\x00\x3c\x08\x11\x00\x00\x00\x0a\x21\x00\x05\
              \x00\x02c1\x05\x18\x00\x00\x00\x01\x00\x01w\x00\x01x"
        );
        assert_eq!(dec(&bytes, V3_1_1).unwrap(), Some(p));
    }

    #[test]
    fn v5_connect_property_not_allowed_is_invalid_property() {
        // Topic Alias (0x23) belongs to PUBLISH, not CONNECT.
        let bytes = b"\x10\x12\x00\x04MQTT\x05\x02\x00\x3c\x03\x23\x00\x01\x00\x02c1";
        assert_eq!(dec_connect(bytes), Err(DecodeError::InvalidProperty(0x23)));
        // Receive Maximum 0 is a Protocol Error (§3.1.2.11.3).
        let bytes = b"\x10\x12\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x00\x00\x02c1";
        assert_eq!(
            dec_connect(bytes),
            Err(DecodeError::InvalidPropertyValue(0x21))
        );
        // Session Expiry Interval twice.
        let bytes = b"\x10\x19\x00\x04MQTT\x05\x02\x00\x3c\x0a\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02\x00\x02c1";
        assert_eq!(
            dec_connect(bytes),
            Err(DecodeError::DuplicateProperty(0x11))
        );
    }

    #[test]
    fn fixture_mqttjs_connect_clean_false_v311() {
        // MQTT.js 5.x, `clientId: 'mqtt_sample_id_1', clean: false`, then end().
        let mut buf =
            BytesMut::from(&include_bytes!("../../../tests/fixtures/mqttjs_connect_v311.bin")[..]);
        let Some(Packet::Connect(c)) = decode(&mut buf, V3_1_1, MAX).unwrap() else {
            panic!("expected CONNECT");
        };
        assert_eq!(c.protocol, V3_1_1);
        assert!(!c.clean_start);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(&c.client_id[..], "mqtt_sample_id_1");
        assert_eq!(
            (c.will.is_none(), c.username.is_none(), c.password.is_none()),
            (true, true, true)
        );
        let first = enc(&Packet::Connect(c), V3_1_1);
        assert_eq!(
            first,
            &include_bytes!("../../../tests/fixtures/mqttjs_connect_v311.bin")[..30]
        );
        assert_eq!(
            decode(&mut buf, V3_1_1, MAX).unwrap(),
            Some(Packet::Disconnect(Default::default()))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn fixture_mosquitto_pub_will_v311() {
        let raw = include_bytes!("../../../tests/fixtures/mosquitto_pub_will_v311.bin");
        let mut buf = BytesMut::from(&raw[..]);
        let Some(Packet::Connect(c)) = decode(&mut buf, V3_1_1, MAX).unwrap() else {
            panic!("expected CONNECT");
        };
        assert_eq!(&c.client_id[..], "mosq_pub_1");
        assert!(c.clean_start);
        let w = c.will.as_ref().expect("will");
        assert_eq!(w.topic.as_str(), "clients/mosq_pub_1/status");
        assert_eq!(&w.payload[..], b"offline");
        assert_eq!(w.qos, QoS::AtLeastOnce);
        assert!(w.retain);
        let len = c.encoded_len_for_test();
        assert_eq!(enc(&Packet::Connect(c), V3_1_1), &raw[..len]);
    }

    #[test]
    fn fixture_paho_v5_connect_properties() {
        let raw = include_bytes!("../../../tests/fixtures/paho_v5.bin");
        let mut buf = BytesMut::from(&raw[..]);
        let Some(Packet::Connect(c)) = decode(&mut buf, V3_1_1, MAX).unwrap() else {
            panic!("expected CONNECT");
        };
        assert_eq!(c.protocol, V5);
        assert_eq!(&c.client_id[..], "paho_v5_client");
        assert_eq!(c.keep_alive, 30);
        let p = c.properties.as_deref().expect("properties");
        assert_eq!(p.session_expiry_interval, Some(3600));
        assert_eq!(p.receive_maximum, Some(20));
        assert_eq!(
            p.user_properties,
            vec![(
                ByteString::from_static("region"),
                ByteString::from_static("eu-west")
            )]
        );
        let len = c.encoded_len_for_test();
        assert_eq!(enc(&Packet::Connect(c), V5), &raw[..len]);
    }

    impl Connect {
        fn encoded_len_for_test(&self) -> usize {
            Packet::Connect(Box::new(self.clone())).encoded_len(self.protocol)
        }
    }

    #[test]
    fn connack_bytes_per_version_mqtt_3_2_2() {
        let ack = Packet::ConnAck(ConnAck::new(true, 0));
        assert_eq!(enc(&ack, V3_1_1), b"\x20\x02\x01\x00");
        assert_eq!(enc(&ack, V5), b"\x20\x03\x01\x00\x00");
        // 3.1 has no Session Present: the byte is reserved.
        assert_eq!(enc(&ack, V3_1), b"\x20\x02\x00\x00");
        assert_eq!(
            dec(b"\x20\x02\x01\x05", V3_1).unwrap(),
            Some(Packet::ConnAck(ConnAck::new(false, 5)))
        );
        assert_eq!(dec(b"\x20\x02\x01\x00", V3_1_1).unwrap(), Some(ack.clone()));
        assert_eq!(dec(b"\x20\x03\x01\x00\x00", V5).unwrap(), Some(ack));
    }

    #[test]
    fn connack_reserved_bits_and_codes() {
        assert_eq!(
            dec(b"\x20\x02\x02\x00", V3_1_1),
            Err(DecodeError::InvalidFlags {
                packet_type: 2,
                flags: 2
            })
        );
        assert_eq!(
            dec(b"\x20\x02\x00\x06", V3_1_1),
            Err(DecodeError::InvalidReasonCode(6))
        );
        assert_eq!(
            dec(b"\x20\x03\x00\x01\x00", V5),
            Err(DecodeError::InvalidReasonCode(1))
        );
        assert_eq!(
            dec(b"\x20\x03\x00\x84\x00", V5).unwrap(),
            Some(Packet::ConnAck(ConnAck::new(
                false,
                reason::UNSUPPORTED_PROTOCOL_VERSION
            )))
        );
        // 5.0 CONNACK always carries a Property Length.
        assert_eq!(dec(b"\x20\x02\x00\x00", V5), Err(DecodeError::Truncated));
    }
}
