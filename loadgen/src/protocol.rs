//! `--protocol`: the MQTT version loadgen's clients speak, 3.1.1 (level 4,
//! the default) or 5.0 (level 5). Every packet a run encodes or decodes uses
//! it; the few places where 5.0 differs on the client's side are here.
//!
//! What 5.0 changes for loadgen, and nothing else does:
//! - CONNECT carries level 5 and an empty property list; PUBLISH, SUBSCRIBE
//!   and the acknowledgements are written by the codec in their 5.0 form
//!   (a PUBLISH has a Property Length byte 0 after its packet id; a success
//!   acknowledgement with no properties is the 2-byte short form, §3.4.2.1).
//! - acknowledgements carry reason codes: one of 0x80 or above is a refusal
//!   ([`refused`]), counted as a failure by name ([`reason_failure`]);
//! - the broker may send DISCONNECT with a reason before it closes;
//! - CONNACK may carry Receive Maximum, which a publisher's window must not
//!   exceed (MQTT-3.3.4-7);
//! - a broker without 5.0 may answer with a 3.1.1 CONNACK, return code 1
//!   (§3.1.2.2), which the 5.0 decoder refuses: [`v3_connack_refusal`].

use coremq::proto::codec::ProtocolVersion;
use serde::{Deserialize, Serialize};

/// The protocol of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Protocol {
    /// MQTT 3.1.1, protocol level 4.
    #[default]
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl Protocol {
    /// Parses `--protocol`: `4`, `311`, `3.1.1` or `5`, `5.0` (also with a
    /// leading `v`, any case).
    pub fn parse(s: &str) -> Result<Protocol, String> {
        let t = s.trim().to_ascii_lowercase();
        let t = t.strip_prefix('v').unwrap_or(&t);
        match t {
            "4" | "311" | "3.1.1" => Ok(Protocol::V311),
            "5" | "5.0" => Ok(Protocol::V5),
            _ => Err(format!(
                "{s:?}: 4 (MQTT 3.1.1; also 311, 3.1.1) or 5 (MQTT 5.0; also 5.0)"
            )),
        }
    }

    /// The codec's version.
    pub fn version(self) -> ProtocolVersion {
        match self {
            Protocol::V311 => ProtocolVersion::V3_1_1,
            Protocol::V5 => ProtocolVersion::V5,
        }
    }

    /// The protocol level byte of CONNECT: 4 or 5.
    pub fn level(self) -> u8 {
        self.version().level()
    }

    /// "3.1.1" or "5.0".
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5.0",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MQTT {}", self.name())
    }
}

impl From<Protocol> for u8 {
    fn from(p: Protocol) -> u8 {
        p.level()
    }
}

impl TryFrom<u8> for Protocol {
    type Error = String;
    fn try_from(level: u8) -> Result<Protocol, String> {
        match level {
            4 => Ok(Protocol::V311),
            5 => Ok(Protocol::V5),
            _ => Err(format!("protocol level {level}: 4 or 5")),
        }
    }
}

/// A 5.0 reason code that refuses (0x80 and above); 3.1.1 acknowledgements
/// carry none, so their reason is always 0.
#[inline]
pub fn refused(reason: u8) -> bool {
    reason >= 0x80
}

/// The failure cause for a refusing reason code on packet `what`
/// (`puback_reason_151` for PUBACK 0x97 Quota exceeded): decimal, as
/// `connack_N` is.
pub fn reason_failure(what: &str, reason: u8) -> String {
    format!("{what}_reason_{reason}")
}

/// A 3.1.1 CONNACK refusing the connection (`20 02 00 NN`, NN 1 to 5) at the
/// head of `buf`: what a broker without 5.0 answers a level-5 CONNECT with
/// (return code 1, unacceptable protocol version), and which the 5.0
/// decoder rejects as malformed. Returns the return code.
pub fn v3_connack_refusal(buf: &[u8]) -> Option<u8> {
    match buf {
        [0x20, 0x02, 0x00, code, ..] if (1..=5).contains(code) => Some(*code),
        _ => None,
    }
}

/// [`v3_connack_refusal`] when speaking 5.0 (3.1.1 decodes it as a CONNACK):
/// for a connection awaiting its CONNACK, checked before decoding, which
/// would consume the packet.
#[inline]
pub fn v3_refusal(v: ProtocolVersion, buf: &[u8]) -> Option<u8> {
    if v.is_v5() {
        v3_connack_refusal(buf)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use coremq::proto::codec::{self, Packet};

    #[test]
    fn every_spelling_parses_and_nothing_else() {
        for s in ["4", "311", "3.1.1", "v3.1.1", "V4"] {
            assert_eq!(Protocol::parse(s), Ok(Protocol::V311), "{s}");
        }
        for s in ["5", "5.0", "v5", "V5.0"] {
            assert_eq!(Protocol::parse(s), Ok(Protocol::V5), "{s}");
        }
        for s in ["3", "3.1", "6", "", "five", "50"] {
            assert!(Protocol::parse(s).is_err(), "{s}");
        }
        assert_eq!(Protocol::default(), Protocol::V311);
    }

    #[test]
    fn serializes_as_the_level_and_back() {
        assert_eq!(serde_json::to_string(&Protocol::V5).unwrap(), "5");
        assert_eq!(serde_json::to_string(&Protocol::V311).unwrap(), "4");
        let p: Protocol = serde_json::from_str("5").unwrap();
        assert_eq!(p, Protocol::V5);
        assert!(serde_json::from_str::<Protocol>("3").is_err());
        assert_eq!(Protocol::V5.to_string(), "MQTT 5.0");
        assert_eq!(Protocol::V311.level(), 4);
    }

    #[test]
    fn a_v3_refusal_is_recognised_where_the_v5_decoder_fails() {
        let mut b = BytesMut::from(&[0x20, 0x02, 0x00, 0x01][..]);
        assert!(codec::decode(&mut b, ProtocolVersion::V5, 1 << 20).is_err());
        assert_eq!(v3_connack_refusal(&[0x20, 0x02, 0x00, 0x01]), Some(1));
        assert_eq!(v3_connack_refusal(&[0x20, 0x02, 0x00, 0x05, 0xff]), Some(5));
        // Success, a 5.0 CONNACK, or too short: not a refusal.
        assert_eq!(v3_connack_refusal(&[0x20, 0x02, 0x00, 0x00]), None);
        assert_eq!(v3_connack_refusal(&[0x20, 0x03, 0x00, 0x84, 0x00]), None);
        assert_eq!(v3_connack_refusal(&[0x20, 0x02, 0x00]), None);
        // Only a 5.0 client needs it: 3.1.1 decodes it as the CONNACK it is.
        assert_eq!(
            v3_refusal(ProtocolVersion::V5, &[0x20, 0x02, 0x00, 0x01]),
            Some(1)
        );
        assert_eq!(
            v3_refusal(ProtocolVersion::V3_1_1, &[0x20, 0x02, 0x00, 0x01]),
            None
        );
        // A 5.0 refusal decodes as such.
        let mut b = BytesMut::from(&[0x20, 0x03, 0x00, 0x84, 0x00][..]);
        let Ok(Some(Packet::ConnAck(a))) = codec::decode(&mut b, ProtocolVersion::V5, 1 << 20)
        else {
            panic!("not a CONNACK")
        };
        assert_eq!(a.code, 0x84);
        assert!(refused(a.code) && !refused(0x10));
        assert_eq!(reason_failure("puback", 0x97), "puback_reason_151");
    }
}
