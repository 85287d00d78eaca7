//! The small packets: PINGREQ / PINGRESP (§3.12, §3.13), DISCONNECT (§3.14)
//! and AUTH (§3.15).

use bytes::{BufMut, BytesMut};

use super::properties::{self, Allowed};
use super::wire::Reader;
use super::{reason, Auth, DecodeError, Disconnect, Properties, ProtocolVersion};

/// Whether `code` is a DISCONNECT reason code (§3.14.2.1).
fn is_disconnect_reason(code: u8) -> bool {
    matches!(
        code,
        reason::SUCCESS
            | reason::DISCONNECT_WITH_WILL
            | reason::UNSPECIFIED_ERROR..=reason::IMPLEMENTATION_SPECIFIC_ERROR
            | reason::NOT_AUTHORIZED
            | reason::SERVER_BUSY
            | reason::SERVER_SHUTTING_DOWN
            | reason::KEEP_ALIVE_TIMEOUT..=reason::TOPIC_NAME_INVALID
            | reason::RECEIVE_MAXIMUM_EXCEEDED..=reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
    )
}

/// Whether `code` is an AUTH reason code (§3.15.2.1).
fn is_auth_reason(code: u8) -> bool {
    matches!(
        code,
        reason::SUCCESS | reason::CONTINUE_AUTHENTICATION | reason::REAUTHENTICATE
    )
}

/// The shared shape of 5.0 DISCONNECT and AUTH: an optional Reason Code
/// (0 when the Remaining Length is 0) and an optional property section (none
/// when the Remaining Length is below 2, §3.14.2.1 / §3.14.2.2.1).
type ReasonAndProps = (u8, Option<Box<Properties>>);

fn decode_reason_props(
    r: &mut Reader<'_>,
    valid: fn(u8) -> bool,
    allowed: Allowed,
) -> Result<ReasonAndProps, DecodeError> {
    if r.is_empty() {
        return Ok((reason::SUCCESS, None));
    }
    let code = r.u8()?;
    if !valid(code) {
        return Err(DecodeError::InvalidReasonCode(code));
    }
    let props = if r.is_empty() {
        None
    } else {
        properties::decode(r, allowed, false)?
    };
    r.finish()?;
    Ok((code, props))
}

/// Decodes a DISCONNECT body: empty in 3.x (§3.14 of 3.1.1).
pub(crate) fn decode_disconnect(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Disconnect, DecodeError> {
    if !version.is_v5() {
        r.finish()?;
        return Ok(Disconnect::default());
    }
    let (reason, properties) =
        decode_reason_props(r, is_disconnect_reason, properties::DISCONNECT)?;
    Ok(Disconnect { reason, properties })
}

/// Decodes an AUTH body; the caller has already refused AUTH outside 5.0.
///
/// Only an empty AUTH (Success, no properties) may leave out the reason code
/// and property length, and only together (§3.15.2.1); any other carries its
/// Authentication Method (§3.15.2.2.2).
pub(crate) fn decode_auth(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    if r.is_empty() {
        return Ok(Auth::default());
    }
    if r.remaining() == 1 {
        return Err(DecodeError::Truncated);
    }
    let (reason, properties) = decode_reason_props(r, is_auth_reason, properties::AUTH)?;
    if properties
        .as_ref()
        .is_none_or(|p| p.authentication_method.is_none())
    {
        return Err(DecodeError::MissingAuthMethod);
    }
    Ok(Auth { reason, properties })
}

impl Disconnect {
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        match (version.is_v5(), self.reason, &self.properties) {
            (false, _, _) | (true, 0, None) => 0,
            // "If the Remaining Length is less than 2, a value of 0 is used"
            // for the Property Length (§3.14.2.2.1): the reason alone will do.
            (true, _, None) => 1,
            (true, _, p) => 1 + properties::wire_len(p),
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        if version.is_v5() && (self.reason != 0 || self.properties.is_some()) {
            out.put_u8(self.reason);
            if self.properties.is_some() {
                properties::encode(&self.properties, out);
            }
        }
    }
}

impl Auth {
    // §3.15.2.1 only lets both fields go together, so a non-zero reason is
    // written with a Property Length even when there are no properties.
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        match (version.is_v5(), self.reason, &self.properties) {
            (false, _, _) | (true, 0, None) => 0,
            (true, _, p) => 1 + properties::wire_len(p),
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, out: &mut BytesMut) {
        if version.is_v5() && (self.reason != 0 || self.properties.is_some()) {
            out.put_u8(self.reason);
            properties::encode(&self.properties, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use bytestring::ByteString;

    use super::super::Packet;
    use super::*;
    use ProtocolVersion::*;

    #[test]
    fn ping_bytes_every_version_mqtt_3_12_and_3_13() {
        for v in [V3_1, V3_1_1, V5] {
            assert_eq!(enc(&Packet::PingReq, v), b"\xc0\x00");
            assert_eq!(enc(&Packet::PingResp, v), b"\xd0\x00");
            assert_eq!(dec(b"\xc0\x00", v).unwrap(), Some(Packet::PingReq));
            assert_eq!(dec(b"\xd0\x00", v).unwrap(), Some(Packet::PingResp));
            assert_eq!(dec(b"\xc0\x01\x00", v), Err(DecodeError::TrailingBytes));
            assert_eq!(
                dec(b"\xc1\x00", v),
                Err(DecodeError::InvalidFlags {
                    packet_type: 12,
                    flags: 1
                })
            );
        }
    }

    #[test]
    fn disconnect_is_e0_00_and_v5_shortening_mqtt_3_14_2_1() {
        let d = Packet::Disconnect(Disconnect::default());
        for v in [V3_1, V3_1_1, V5] {
            assert_eq!(enc(&d, v), b"\xe0\x00");
            assert_eq!(dec(b"\xe0\x00", v).unwrap(), Some(d.clone()));
        }
        assert_eq!(
            dec(b"\xe0\x01\x00", V3_1_1),
            Err(DecodeError::TrailingBytes)
        );
        // Reason alone, reason with Property Length 0: both no properties.
        let w = Packet::Disconnect(Disconnect {
            reason: reason::DISCONNECT_WITH_WILL,
            properties: None,
        });
        assert_eq!(enc(&w, V5), b"\xe0\x01\x04");
        assert_eq!(dec(b"\xe0\x01\x04", V5).unwrap(), Some(w.clone()));
        assert_eq!(dec(b"\xe0\x02\x04\x00", V5).unwrap(), Some(w));
        let p = Packet::Disconnect(Disconnect {
            reason: reason::SERVER_SHUTTING_DOWN,
            properties: Some(Box::new(Properties {
                server_reference: Some(ByteString::from_static("s")),
                ..Properties::default()
            })),
        });
        assert_eq!(enc(&p, V5), b"\xe0\x06\x8b\x04\x1c\x00\x01s");
        assert_eq!(dec(b"\xe0\x06\x8b\x04\x1c\x00\x01s", V5).unwrap(), Some(p));
        assert_eq!(
            dec(b"\xe0\x01\x01", V5),
            Err(DecodeError::InvalidReasonCode(1))
        );
        assert_eq!(
            dec(b"\xe0\x01\x91", V5),
            Err(DecodeError::InvalidReasonCode(0x91))
        );
        assert_eq!(
            dec(b"\xe0\x03\x00\x00\x00", V5),
            Err(DecodeError::TrailingBytes)
        );
        // Receive Maximum belongs to CONNECT / CONNACK.
        assert_eq!(
            dec(b"\xe0\x05\x00\x03\x21\x00\x01", V5),
            Err(DecodeError::InvalidProperty(0x21))
        );
    }

    #[test]
    fn auth_is_5_0_only_and_shortened_mqtt_3_15() {
        assert_eq!(
            dec(b"\xf0\x00", V3_1_1),
            Err(DecodeError::InvalidPacketType(15))
        );
        assert_eq!(
            dec(b"\xf0\x00", V3_1),
            Err(DecodeError::InvalidPacketType(15))
        );
        let a = Packet::Auth(Auth::default());
        assert_eq!(enc(&a, V5), b"\xf0\x00");
        assert_eq!(dec(b"\xf0\x00", V5).unwrap(), Some(a));
        let c = Packet::Auth(Auth {
            reason: reason::CONTINUE_AUTHENTICATION,
            properties: Some(Box::new(Properties {
                authentication_method: Some(ByteString::from_static("m")),
                ..Properties::default()
            })),
        });
        assert_eq!(enc(&c, V5), b"\xf0\x06\x18\x04\x15\x00\x01m");
        assert_eq!(dec(b"\xf0\x06\x18\x04\x15\x00\x01m", V5).unwrap(), Some(c));
        // No method: a Protocol Error (§3.15.2.2.2).
        assert_eq!(
            dec(b"\xf0\x02\x19\x00", V5),
            Err(DecodeError::MissingAuthMethod)
        );
        assert_eq!(
            dec(b"\xf0\x05\x19\x03\x16\x00\x00", V5),
            Err(DecodeError::MissingAuthMethod)
        );
        // The reason code alone, without its property length (§3.15.2.1).
        assert_eq!(dec(b"\xf0\x01\x18", V5), Err(DecodeError::Truncated));
        assert_eq!(
            dec(b"\xf0\x02\x87\x00", V5),
            Err(DecodeError::InvalidReasonCode(0x87))
        );
    }
}
