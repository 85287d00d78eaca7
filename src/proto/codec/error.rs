//! Decode errors, each knowing what the peer is owed.

use std::fmt;

use super::{reason, return_code};

/// Why bytes from a peer are not a valid packet. Small and `Copy`: it is
/// returned on the hot path, and carries the numbers that explain it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The fixed header announces a packet larger than the limit.
    PacketTooLarge {
        /// Total packet size announced (fixed header included).
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// Remaining Length, or another Variable Byte Integer such as a 5.0
    /// Property Length, uses more than 4 bytes (§1.5.5).
    MalformedRemainingLength,
    /// Packet type 0 (reserved), or 15 (AUTH) outside 5.0.
    InvalidPacketType(u8),
    /// Fixed-header flag bits that the spec fixes are wrong (MQTT-2.2.2-1/2),
    /// DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2), or reserved CONNACK
    /// acknowledge flags set (§3.2.2.1).
    InvalidFlags {
        /// The packet type.
        packet_type: u8,
        /// The low nibble received.
        flags: u8,
    },
    /// CONNECT protocol name is neither `MQTT` nor `MQIsdp`, or does not match
    /// the level (MQTT-3.1.2-1).
    InvalidProtocolName,
    /// CONNECT protocol level the broker does not speak (MQTT-3.1.2-2); owed
    /// CONNACK 0x01 (3.x) / 0x84 (5.0).
    UnsupportedProtocolVersion(u8),
    /// CONNECT reserved flag set (MQTT-3.1.2-3).
    ReservedConnectFlag,
    /// Will QoS / Will Retain set without the Will Flag, or Will QoS 3
    /// (MQTT-3.1.2-11, -13, -14, -15).
    InvalidWillFlags,
    /// Password flag without user name flag in 3.x (MQTT-3.1.2-22).
    PasswordWithoutUsername,
    /// A string that is not well-formed UTF-8 (MQTT-1.5.3-1).
    InvalidUtf8,
    /// A string containing U+0000 (MQTT-1.5.3-2).
    NullCharacter,
    /// QoS 3 in a PUBLISH (MQTT-3.3.1-4) or a subscription.
    InvalidQoS(u8),
    /// An invalid topic name in a PUBLISH or will: empty, or with `+` / `#`
    /// (MQTT-3.3.2-2).
    InvalidTopicName,
    /// An invalid topic filter in SUBSCRIBE / UNSUBSCRIBE (MQTT-4.7.1).
    InvalidTopicFilter,
    /// SUBSCRIBE or UNSUBSCRIBE with no filters (MQTT-3.8.3-3, MQTT-3.10.3-2).
    NoTopicFilters,
    /// Packet identifier 0 where one is required (MQTT-2.3.1-1).
    ZeroPacketId,
    /// A field runs past the end of the packet.
    Truncated,
    /// Bytes left over after the last field of the packet.
    TrailingBytes,
    /// Reserved bits of a SUBSCRIBE options byte set (MQTT-3.8.3-4 / 5.0 -5).
    InvalidSubscriptionOptions,
    /// 5.0 SUBSCRIBE option Retain Handling 3 (§3.8.3.1: a Protocol Error).
    InvalidRetainHandling,
    /// A 5.0 property that appears twice where only one is allowed.
    DuplicateProperty(u8),
    /// A 5.0 property identifier unknown, or not allowed in this packet.
    InvalidProperty(u8),
    /// A 5.0 property with a value the spec forbids (e.g. Receive Maximum 0).
    InvalidPropertyValue(u8),
    /// A 5.0 reason code not allowed in this packet.
    InvalidReasonCode(u8),
    /// 5.0 Authentication Data without an Authentication Method in CONNECT
    /// or CONNACK (§3.1.2.11.10, §3.2.2.3.18), or an AUTH without a method
    /// (§3.15.2.2.2): a Protocol Error.
    MissingAuthMethod,
}

impl DecodeError {
    /// The CONNACK return code a 3.x client is owed for a bad CONNECT, or
    /// `None` where the spec says to close without one.
    pub fn connack_return_code(&self) -> Option<u8> {
        match self {
            DecodeError::UnsupportedProtocolVersion(_) => {
                Some(return_code::UNACCEPTABLE_PROTOCOL_VERSION)
            }
            _ => None,
        }
    }

    /// The 5.0 reason code for CONNACK or DISCONNECT.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::InvalidTopicName => reason::TOPIC_NAME_INVALID,
            DecodeError::InvalidTopicFilter => reason::TOPIC_FILTER_INVALID,
            // §3.3.2.3.4: a Topic Alias of 0 is "Topic Alias invalid" (0x94),
            // as one above the maximum is (the broker checks that one).
            DecodeError::InvalidPropertyValue(super::properties::id::TOPIC_ALIAS) => {
                reason::TOPIC_ALIAS_INVALID
            }
            // What the 5.0 spec calls a Protocol Error rather than a
            // Malformed Packet: a packet that parses but breaks a rule.
            DecodeError::InvalidPacketType(_)
            | DecodeError::DuplicateProperty(_)
            | DecodeError::InvalidPropertyValue(_)
            | DecodeError::NoTopicFilters
            | DecodeError::InvalidRetainHandling
            | DecodeError::MissingAuthMethod => reason::PROTOCOL_ERROR,
            _ => reason::MALFORMED_PACKET,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::PacketTooLarge { size, max } => {
                write!(f, "packet of {size} bytes exceeds the maximum of {max}")
            }
            DecodeError::MalformedRemainingLength => f.write_str("remaining length over 4 bytes"),
            DecodeError::InvalidPacketType(t) => write!(f, "invalid packet type {t}"),
            DecodeError::InvalidFlags { packet_type, flags } => {
                write!(f, "invalid flags {flags:#x} for packet type {packet_type}")
            }
            DecodeError::InvalidProtocolName => f.write_str("invalid protocol name"),
            DecodeError::UnsupportedProtocolVersion(v) => {
                write!(f, "unsupported protocol level {v}")
            }
            DecodeError::ReservedConnectFlag => f.write_str("CONNECT reserved flag set"),
            DecodeError::InvalidWillFlags => f.write_str("inconsistent will flags"),
            DecodeError::PasswordWithoutUsername => f.write_str("password without user name"),
            DecodeError::InvalidUtf8 => f.write_str("string is not well-formed UTF-8"),
            DecodeError::NullCharacter => f.write_str("string contains U+0000"),
            DecodeError::InvalidQoS(q) => write!(f, "invalid QoS {q}"),
            DecodeError::InvalidTopicName => f.write_str("invalid topic name"),
            DecodeError::InvalidTopicFilter => f.write_str("invalid topic filter"),
            DecodeError::NoTopicFilters => f.write_str("no topic filters"),
            DecodeError::ZeroPacketId => f.write_str("packet identifier 0"),
            DecodeError::Truncated => f.write_str("field runs past the end of the packet"),
            DecodeError::TrailingBytes => f.write_str("trailing bytes after the packet"),
            DecodeError::InvalidSubscriptionOptions => {
                f.write_str("reserved subscription option bits set")
            }
            DecodeError::InvalidRetainHandling => f.write_str("retain handling 3"),
            DecodeError::DuplicateProperty(p) => write!(f, "duplicate property {p:#x}"),
            DecodeError::InvalidProperty(p) => write!(f, "property {p:#x} not allowed here"),
            DecodeError::InvalidPropertyValue(p) => write!(f, "invalid value for property {p:#x}"),
            DecodeError::InvalidReasonCode(c) => write!(f, "invalid reason code {c:#x}"),
            DecodeError::MissingAuthMethod => f.write_str("authentication without a method"),
        }
    }
}

impl std::error::Error for DecodeError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error with the CONNACK return code (3.x) and reason code (5.0)
    /// the peer is owed: 5.0's §2.4 splits Malformed Packet (0x81: cannot be
    /// parsed as the spec says) from Protocol Error (0x82: parses, but breaks
    /// a rule), and names a few more precisely.
    #[test]
    fn every_error_maps_to_what_the_peer_is_owed() {
        use DecodeError::*;
        let table: &[(DecodeError, Option<u8>, u8)] = &[
            (
                PacketTooLarge { size: 9, max: 8 },
                None,
                reason::PACKET_TOO_LARGE,
            ),
            (MalformedRemainingLength, None, reason::MALFORMED_PACKET),
            (InvalidPacketType(0), None, reason::PROTOCOL_ERROR),
            (
                InvalidFlags {
                    packet_type: 3,
                    flags: 6,
                },
                None,
                reason::MALFORMED_PACKET,
            ),
            (InvalidProtocolName, None, reason::MALFORMED_PACKET),
            (
                UnsupportedProtocolVersion(6),
                Some(return_code::UNACCEPTABLE_PROTOCOL_VERSION),
                reason::UNSUPPORTED_PROTOCOL_VERSION,
            ),
            (ReservedConnectFlag, None, reason::MALFORMED_PACKET),
            (InvalidWillFlags, None, reason::MALFORMED_PACKET),
            (PasswordWithoutUsername, None, reason::MALFORMED_PACKET),
            (InvalidUtf8, None, reason::MALFORMED_PACKET),
            (NullCharacter, None, reason::MALFORMED_PACKET),
            (InvalidQoS(3), None, reason::MALFORMED_PACKET),
            (InvalidTopicName, None, reason::TOPIC_NAME_INVALID),
            (InvalidTopicFilter, None, reason::TOPIC_FILTER_INVALID),
            (NoTopicFilters, None, reason::PROTOCOL_ERROR),
            (ZeroPacketId, None, reason::MALFORMED_PACKET),
            (Truncated, None, reason::MALFORMED_PACKET),
            (TrailingBytes, None, reason::MALFORMED_PACKET),
            (InvalidSubscriptionOptions, None, reason::MALFORMED_PACKET),
            (InvalidRetainHandling, None, reason::PROTOCOL_ERROR),
            (DuplicateProperty(0x11), None, reason::PROTOCOL_ERROR),
            (InvalidProperty(0x7f), None, reason::MALFORMED_PACKET),
            (InvalidPropertyValue(0x21), None, reason::PROTOCOL_ERROR),
            (
                InvalidPropertyValue(0x23),
                None,
                reason::TOPIC_ALIAS_INVALID,
            ),
            (InvalidReasonCode(0x7f), None, reason::MALFORMED_PACKET),
            (MissingAuthMethod, None, reason::PROTOCOL_ERROR),
        ];
        for (e, connack, code) in table {
            assert_eq!(e.connack_return_code(), *connack, "{e:?}");
            assert_eq!(e.reason_code(), *code, "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }
}
