//! The first packet of a connection: read the CONNECT, decide its CONNACK
//! return code, and pick the shard that owns its clientId.
//!
//! This runs on whichever shard accepted the socket, before the connection is
//! handed to its owner, so that a refused client (bad credentials, bad
//! clientId, unsupported protocol) costs the owner nothing.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use super::codec::{
    self, reason, return_code, ConnAck, Connect, DecodeError, Packet, ProtocolVersion,
};
use super::ShardId;

/// What the bytes read so far amount to.
#[derive(Debug)]
pub enum FirstPacket {
    /// No whole packet yet: read more (until the connect timeout).
    Incomplete,
    /// A well-formed CONNECT, removed from the buffer.
    Connect(Box<Connect>),
    /// The connection must be closed, after a CONNACK with `connack` as its
    /// return code when the spec owes one.
    Reject {
        /// The code of the CONNACK to send before closing, if any: a 3.x
        /// return code, or a 5.0 reason code when `version` is 5.0.
        connack: Option<u8>,
        /// The version the CONNACK is written in.
        version: ProtocolVersion,
        /// Why, for the log and the counters.
        error: HandshakeError,
    },
}

/// Why a connection was refused before it reached its owner shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// The first packet was not a CONNECT (MQTT-3.1.0-1).
    NotConnect,
    /// The CONNECT was malformed.
    Malformed(DecodeError),
}

/// Decodes the first packet from `buf`.
///
/// A first packet that is anything but CONNECT closes the connection
/// (MQTT-3.1.0-1). An unsupported protocol level is owed CONNACK 0x01 before
/// the close (MQTT-3.1.2-2); every other malformed 3.x CONNECT is closed
/// without a CONNACK, as 3.1.1 §4.8 allows. A malformed 5.0 CONNECT gets a
/// CONNACK with the reason code that says why (0x81, 0x82, 0x95 …;
/// MQTT-4.13.1-1 and §3.2.2.2) before the close.
pub fn read_first_packet(buf: &mut BytesMut, max_packet_size: usize) -> FirstPacket {
    // Judge the packet type from the first byte: waiting for the body of a
    // packet that is not a CONNECT would let a socket that never logs in make
    // us buffer up to the maximum packet size until the connect timeout.
    if buf.first().is_some_and(|b| b >> 4 != 1) {
        return FirstPacket::Reject {
            connack: None,
            version: ProtocolVersion::V3_1_1,
            error: HandshakeError::NotConnect,
        };
    }
    // Read before decoding, which consumes a refused body.
    let v5 = claims_v5(buf);
    match codec::decode(buf, ProtocolVersion::V3_1_1, max_packet_size) {
        Ok(None) => FirstPacket::Incomplete,
        Ok(Some(Packet::Connect(connect))) => FirstPacket::Connect(connect),
        Ok(Some(_)) => FirstPacket::Reject {
            connack: None,
            version: ProtocolVersion::V3_1_1,
            error: HandshakeError::NotConnect,
        },
        Err(error) if v5 => FirstPacket::Reject {
            connack: Some(error.reason_code()),
            version: ProtocolVersion::V5,
            error: HandshakeError::Malformed(error),
        },
        Err(error) => FirstPacket::Reject {
            connack: error.connack_return_code(),
            version: ProtocolVersion::V3_1_1,
            error: HandshakeError::Malformed(error),
        },
    }
}

/// Whether the CONNECT starting `buf` names protocol `MQTT` level 5: then
/// even a malformed one is answered in 5.0's terms. Looks only at the fixed
/// header and the seven bytes after it.
fn claims_v5(buf: &[u8]) -> bool {
    // The Remaining Length is 1 to 4 bytes, each but the last with bit 7 set.
    let Some(len_bytes) = buf.iter().skip(1).take(4).position(|b| b & 0x80 == 0) else {
        return false;
    };
    let start = 2 + len_bytes;
    buf.get(start..start + 7) == Some(b"\x00\x04MQTT\x05")
}

/// The credentials check the handshake delegates to (the password file, in
/// the broker). Returns the CONNACK return code to refuse with, or `Ok`.
pub trait Authenticate {
    /// `Ok(())` to accept, or `Err(4)` bad credentials / `Err(5)` not authorized.
    fn authenticate(&self, username: Option<&str>, password: Option<&[u8]>) -> Result<(), u8>;
}

/// `--use-identity-as-username`: TLS verified the client's certificate
/// against `--client-ca`, and its CN is the username; that is the whole
/// authentication (the CONNECT's password is not used, as in mosquitto).
pub struct CertificateIdentity;

impl Authenticate for CertificateIdentity {
    fn authenticate(&self, _: Option<&str>, _: Option<&[u8]>) -> Result<(), u8> {
        Ok(())
    }
}

/// Decides the CONNACK code for a decoded CONNECT: a 3.x return code, or
/// for 5.0 the reason code ([`connack_code`] translates the shell's own
/// refusals).
///
/// - MQTT 3.1 allows clientIds of 1 to 23 characters (3.1 §3.1); others get 0x02.
/// - A zero-length 3.1.1 clientId needs cleanSession=1 (MQTT-3.1.3-8); the
///   caller then assigns one ([`assign_client_id`], MQTT-3.1.3-6). 5.0 lets
///   any client have one assigned (MQTT-3.1.3-6, -7 of 5.0 leave it to us).
/// - 5.0: an Authentication Method means enhanced authentication, which no
///   method of ours supports yet: 0x8C (MQTT-4.12.0-1). This is the one
///   place a method would be recognised.
/// - Then credentials: 0x04 / 0x05 from `auth` (5.0: 0x86 / 0x87).
pub fn check_connect(connect: &Connect, auth: &impl Authenticate) -> Result<(), u8> {
    match connect.protocol {
        ProtocolVersion::V5 => {
            let props = connect.properties.as_deref();
            if props.is_some_and(|p| p.authentication_method.is_some()) {
                return Err(reason::BAD_AUTHENTICATION_METHOD);
            }
            return auth
                .authenticate(connect.username.as_deref(), connect.password.as_deref())
                .map_err(|code| connack_code(ProtocolVersion::V5, code));
        }
        ProtocolVersion::V3_1 => {
            let chars = connect.client_id.chars().count();
            if !(1..=23).contains(&chars) {
                return Err(return_code::IDENTIFIER_REJECTED);
            }
        }
        ProtocolVersion::V3_1_1 => {
            if connect.client_id.is_empty() && !connect.clean_start {
                return Err(return_code::IDENTIFIER_REJECTED);
            }
        }
    }
    auth.authenticate(connect.username.as_deref(), connect.password.as_deref())
}

/// The CONNACK code `version` uses for 3.x return code `code` (5.0's
/// §3.2.2.2 reason codes have a counterpart for each of 3.1.1's).
pub fn connack_code(version: ProtocolVersion, code: u8) -> u8 {
    if !version.is_v5() {
        return code;
    }
    match code {
        return_code::ACCEPTED => reason::SUCCESS,
        return_code::UNACCEPTABLE_PROTOCOL_VERSION => reason::UNSUPPORTED_PROTOCOL_VERSION,
        return_code::IDENTIFIER_REJECTED => reason::CLIENT_IDENTIFIER_NOT_VALID,
        return_code::SERVER_UNAVAILABLE => reason::SERVER_UNAVAILABLE,
        return_code::BAD_USERNAME_OR_PASSWORD => reason::BAD_USER_NAME_OR_PASSWORD,
        return_code::NOT_AUTHORIZED => reason::NOT_AUTHORIZED,
        other => other,
    }
}

/// A unique clientId for a client that sent a zero-length one with
/// cleanSession=1 (MQTT-3.1.3-6). `nonce` is random per process so ids from
/// an earlier run never collide with a session still remembered by a client.
pub fn assign_client_id(nonce: u64, shard: ShardId, serial: u64) -> ByteString {
    ByteString::from(format!("auto-{nonce:016x}-{}-{serial}", shard.0))
}

/// The shard that owns `client_id`: FNV-1a, stable across shards and runs,
/// so every CONNECT for one clientId meets its session on the same shard.
pub fn owner_of(client_id: &str, shards: u16) -> ShardId {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    ShardId((hash % u64::from(shards.max(1))) as u16)
}

/// A CONNACK's bytes. 3.1 has no Session Present flag; the codec writes 0.
pub fn connack_bytes(version: ProtocolVersion, session_present: bool, code: u8) -> Bytes {
    let mut out = BytesMut::with_capacity(4);
    // MQTT-3.2.2-4: a refused CONNECT always gets Session Present 0.
    Packet::ConnAck(ConnAck {
        session_present: session_present && code == 0,
        code,
        properties: None,
    })
    .encode(version, &mut out);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct AllowAll;
    impl Authenticate for AllowAll {
        fn authenticate(&self, _: Option<&str>, _: Option<&[u8]>) -> Result<(), u8> {
            Ok(())
        }
    }
    struct DenyAnonymous;
    impl Authenticate for DenyAnonymous {
        fn authenticate(&self, user: Option<&str>, _: Option<&[u8]>) -> Result<(), u8> {
            match user {
                None => Err(return_code::NOT_AUTHORIZED),
                Some("alice") => Ok(()),
                Some(_) => Err(return_code::BAD_USERNAME_OR_PASSWORD),
            }
        }
    }

    fn connect(protocol: ProtocolVersion, client_id: &str, clean: bool) -> Connect {
        Connect {
            protocol,
            clean_start: clean,
            keep_alive: 60,
            client_id: ByteString::from(client_id),
            will: None,
            username: None,
            password: None,
            properties: None,
        }
    }

    #[test]
    fn empty_client_id_with_persistent_session_rejected_mqtt_3_1_3_8() {
        let c = connect(ProtocolVersion::V3_1_1, "", false);
        assert_eq!(
            check_connect(&c, &AllowAll),
            Err(return_code::IDENTIFIER_REJECTED)
        );
        let c = connect(ProtocolVersion::V3_1_1, "", true);
        assert_eq!(check_connect(&c, &AllowAll), Ok(()));
    }

    #[test]
    fn mqtt_3_1_client_id_limited_to_23_characters() {
        let ok = connect(ProtocolVersion::V3_1, &"a".repeat(23), true);
        assert_eq!(check_connect(&ok, &AllowAll), Ok(()));
        let long = connect(ProtocolVersion::V3_1, &"a".repeat(24), true);
        assert_eq!(
            check_connect(&long, &AllowAll),
            Err(return_code::IDENTIFIER_REJECTED)
        );
        let empty = connect(ProtocolVersion::V3_1, "", true);
        assert_eq!(
            check_connect(&empty, &AllowAll),
            Err(return_code::IDENTIFIER_REJECTED)
        );
        // 3.1.1 lets the server accept longer ids (MQTT-3.1.3-5 is a minimum).
        let long311 = connect(ProtocolVersion::V3_1_1, &"a".repeat(100), true);
        assert_eq!(check_connect(&long311, &AllowAll), Ok(()));
    }

    #[test]
    fn mqtt_5_accepted_and_refused_with_5_0_reason_codes() {
        let c = connect(ProtocolVersion::V5, "x", true);
        assert_eq!(check_connect(&c, &AllowAll), Ok(()));
        // MQTT-3.1.3-7 (5.0): an empty id may be assigned whatever Clean Start.
        let c = connect(ProtocolVersion::V5, "", false);
        assert_eq!(check_connect(&c, &AllowAll), Ok(()));
        assert_eq!(
            check_connect(&c, &DenyAnonymous),
            Err(reason::NOT_AUTHORIZED)
        );
        let mut bad = connect(ProtocolVersion::V5, "x", true);
        bad.username = Some(ByteString::from("mallory"));
        assert_eq!(
            check_connect(&bad, &DenyAnonymous),
            Err(reason::BAD_USER_NAME_OR_PASSWORD)
        );
    }

    #[test]
    fn unsupported_authentication_method_gets_0x8c_mqtt_4_12_0_1() {
        let mut c = connect(ProtocolVersion::V5, "x", true);
        c.properties = Some(Box::new(codec::Properties {
            authentication_method: Some(ByteString::from("SCRAM-SHA-1")),
            ..Default::default()
        }));
        assert_eq!(
            check_connect(&c, &AllowAll),
            Err(reason::BAD_AUTHENTICATION_METHOD)
        );
    }

    #[test]
    fn malformed_v5_connect_gets_a_5_0_connack_mqtt_4_13_1_1() {
        // CONNECT MQTT level 5 with the reserved flag set (0x03).
        let mut buf = BytesMut::from(&b"\x10\x0e\x00\x04MQTT\x05\x03\x00\x3c\x00\x00\x01a"[..]);
        match read_first_packet(&mut buf, 1024) {
            FirstPacket::Reject {
                connack: Some(code),
                version: ProtocolVersion::V5,
                ..
            } => assert_eq!(code, reason::MALFORMED_PACKET),
            other => panic!("expected a 5.0 CONNACK 0x81, got {other:?}"),
        }
        // Too large for --max-packet-size: 0x95.
        let mut buf = BytesMut::from(&b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01a"[..]);
        match read_first_packet(&mut buf, 8) {
            FirstPacket::Reject {
                connack: Some(code),
                version: ProtocolVersion::V5,
                ..
            } => assert_eq!(code, reason::PACKET_TOO_LARGE),
            other => panic!("expected a 5.0 CONNACK 0x95, got {other:?}"),
        }
    }

    #[test]
    fn credentials_decide_return_codes_4_and_5() {
        let mut c = connect(ProtocolVersion::V3_1_1, "x", true);
        assert_eq!(
            check_connect(&c, &DenyAnonymous),
            Err(return_code::NOT_AUTHORIZED)
        );
        c.username = Some(ByteString::from("mallory"));
        assert_eq!(
            check_connect(&c, &DenyAnonymous),
            Err(return_code::BAD_USERNAME_OR_PASSWORD)
        );
        c.username = Some(ByteString::from("alice"));
        assert_eq!(check_connect(&c, &DenyAnonymous), Ok(()));
    }

    #[test]
    fn first_packet_must_be_connect_mqtt_3_1_0_1() {
        let mut buf = BytesMut::from(&b"\xc0\x00"[..]); // PINGREQ
        assert!(matches!(
            read_first_packet(&mut buf, 1024),
            FirstPacket::Reject {
                connack: None,
                error: HandshakeError::NotConnect,
                ..
            }
        ));
    }

    #[test]
    fn non_connect_refused_from_its_first_byte_mqtt_3_1_0_1() {
        // A PUBLISH announcing 1,000,000 bytes, of which 3 have arrived.
        let mut buf = BytesMut::from(&b"\x30\xc0\x84\x3d\x00\x01a"[..]);
        assert!(matches!(
            read_first_packet(&mut buf, 2 << 20),
            FirstPacket::Reject {
                connack: None,
                error: HandshakeError::NotConnect,
                ..
            }
        ));
    }

    #[test]
    fn unsupported_level_gets_connack_1_mqtt_3_1_2_2() {
        // CONNECT, protocol name MQTT, level 9.
        let mut buf = BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x09\x02\x00\x3c\x00\x01a"[..]);
        match read_first_packet(&mut buf, 1024) {
            FirstPacket::Reject {
                connack: Some(code),
                ..
            } => assert_eq!(code, return_code::UNACCEPTABLE_PROTOCOL_VERSION),
            other => panic!("expected CONNACK 1, got {other:?}"),
        }
    }

    #[test]
    fn half_a_packet_is_incomplete() {
        let mut buf = BytesMut::from(&b"\x10\x0d\x00\x04MQ"[..]);
        assert!(matches!(
            read_first_packet(&mut buf, 1024),
            FirstPacket::Incomplete
        ));
    }

    #[test]
    fn refused_connack_never_claims_a_session_mqtt_3_2_2_4() {
        assert_eq!(
            &connack_bytes(ProtocolVersion::V3_1_1, true, 5)[..],
            b"\x20\x02\x00\x05"
        );
        assert_eq!(
            &connack_bytes(ProtocolVersion::V3_1_1, true, 0)[..],
            b"\x20\x02\x01\x00"
        );
    }

    #[test]
    fn owner_is_stable_and_in_range() {
        for shards in 1..8u16 {
            for id in ["a", "mqtt_sample_id_1", "dev/1", ""] {
                let o = owner_of(id, shards);
                assert!(o.0 < shards);
                assert_eq!(o, owner_of(id, shards));
            }
        }
        // The distribution is not degenerate: 1000 ids spread over 4 shards.
        let mut seen = [0u32; 4];
        for i in 0..1000 {
            seen[owner_of(&format!("device-{i}"), 4).0 as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }
}
