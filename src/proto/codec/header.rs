//! Fixed header and variable byte integers (§2.1, §1.5.5).

use bytes::{BufMut, BytesMut};

use super::{DecodeError, ProtocolVersion};

/// The largest Remaining Length four varint bytes can carry.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The fixed header of a control packet: type, flags and Remaining Length.
///
/// [`FixedHeader::parse`] lets a driver learn how large the packet at the
/// front of its read buffer is before all of it has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// Control packet type, the high nibble of byte 1 (1 = CONNECT ... 15 = AUTH).
    pub packet_type: u8,
    /// The low nibble of byte 1.
    pub flags: u8,
    /// Remaining Length: the bytes after the fixed header.
    pub remaining_length: usize,
    /// Size of the fixed header itself: 2 to 5 bytes.
    pub header_len: usize,
}

impl FixedHeader {
    /// Parses the fixed header at the front of `buf`; `Ok(None)` while more
    /// bytes are needed. A Remaining Length over 4 bytes is refused as soon as
    /// its fourth byte arrives with the continuation bit set (§1.5.5), so a
    /// peer cannot make us wait for a header that can never be valid.
    ///
    /// Type and flags are not checked here; [`super::decode`] does that.
    #[inline]
    pub fn parse(buf: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let mut value = 0usize;
        for i in 0..4 {
            let Some(&b) = buf.get(1 + i) else {
                return Ok(None);
            };
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(Some(FixedHeader {
                    packet_type: first >> 4,
                    flags: first & 0x0f,
                    remaining_length: value,
                    header_len: 2 + i,
                }));
            }
        }
        Err(DecodeError::MalformedRemainingLength)
    }

    /// The packet's full size: fixed header plus Remaining Length.
    #[inline]
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_length
    }
}

/// Checks packet type and fixed-header flags from byte 1 alone, so garbage is
/// refused before its body is buffered.
///
/// PUBREL, SUBSCRIBE and UNSUBSCRIBE carry `0b0010`, PUBLISH its own flags,
/// every other packet `0` (MQTT-2.2.2-1, MQTT-3.6.1-1, MQTT-3.8.1-1,
/// MQTT-3.10.1-1); anything else closes the connection (MQTT-2.2.2-2).
#[inline]
pub(crate) fn check_first_byte(first: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0f;
    let ok = match packet_type {
        0 => return Err(DecodeError::InvalidPacketType(0)),
        // QoS 3 is malformed (MQTT-3.3.1-4); DUP with QoS 0 is checked with
        // the rest of PUBLISH because 3.1 tolerates it.
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::InvalidQoS(3));
            }
            true
        }
        // MQTT 3.1 gave these packets QoS 1 and let a retransmission set DUP;
        // mosquitto accepts that from 3.1 clients, so do we.
        6 | 8 | 10 => flags == 0b0010 || (version == ProtocolVersion::V3_1 && flags == 0b1010),
        // AUTH exists only in 5.0.
        15 if !version.is_v5() => return Err(DecodeError::InvalidPacketType(15)),
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::InvalidFlags { packet_type, flags })
    }
}

/// How many bytes `v` takes as a Variable Byte Integer.
#[inline]
pub(crate) fn varint_len(v: usize) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        _ => 4,
    }
}

/// Writes `v` (at most [`MAX_REMAINING_LENGTH`]) as a Variable Byte Integer,
/// in the fewest bytes (MQTT-1.5.5-1).
#[inline]
pub(crate) fn write_varint(out: &mut BytesMut, mut v: usize) {
    debug_assert!(v <= MAX_REMAINING_LENGTH, "varint {v} over 4 bytes");
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v != 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
        FixedHeader::parse(b)
    }

    #[test]
    fn remaining_length_boundaries_encode_minimally_mqtt_1_5_5_1() {
        for (v, bytes) in [
            (0usize, &b"\x00"[..]),
            (127, b"\x7f"),
            (128, b"\x80\x01"),
            (16_383, b"\xff\x7f"),
            (16_384, b"\x80\x80\x01"),
            (2_097_151, b"\xff\xff\x7f"),
            (2_097_152, b"\x80\x80\x80\x01"),
            (MAX_REMAINING_LENGTH, b"\xff\xff\xff\x7f"),
        ] {
            let mut out = BytesMut::new();
            write_varint(&mut out, v);
            assert_eq!(&out[..], bytes, "{v}");
            assert_eq!(varint_len(v), bytes.len());
            let mut hdr = vec![0x30];
            hdr.extend_from_slice(bytes);
            let h = parse(&hdr).unwrap().unwrap();
            assert_eq!(h.remaining_length, v);
            assert_eq!(h.header_len, 1 + bytes.len());
            assert_eq!(h.packet_len(), 1 + bytes.len() + v);
        }
    }

    #[test]
    fn remaining_length_over_four_bytes_is_malformed_as_soon_as_seen() {
        assert_eq!(
            parse(b"\x30\xff\xff\xff\xff"),
            Err(DecodeError::MalformedRemainingLength)
        );
        assert_eq!(
            parse(b"\x30\x80\x80\x80\x80\x01"),
            Err(DecodeError::MalformedRemainingLength)
        );
        // Four bytes with the continuation bit on the fourth: waiting is pointless.
        assert_eq!(parse(b"\x30\xff\xff\xff"), Ok(None));
    }

    #[test]
    fn incomplete_header_needs_more_bytes() {
        assert_eq!(parse(b""), Ok(None));
        assert_eq!(parse(b"\x30"), Ok(None));
        assert_eq!(parse(b"\x30\x80"), Ok(None));
    }

    #[test]
    fn fixed_flags_are_checked_mqtt_2_2_2_1() {
        use ProtocolVersion::*;
        assert_eq!(check_first_byte(0x62, V3_1_1), Ok(()));
        assert_eq!(check_first_byte(0x82, V5), Ok(()));
        assert_eq!(check_first_byte(0xa2, V3_1_1), Ok(()));
        assert_eq!(
            check_first_byte(0x60, V3_1_1),
            Err(DecodeError::InvalidFlags {
                packet_type: 6,
                flags: 0
            })
        );
        assert_eq!(
            check_first_byte(0x6a, V3_1_1),
            Err(DecodeError::InvalidFlags {
                packet_type: 6,
                flags: 0xa
            })
        );
        assert_eq!(check_first_byte(0x8a, V3_1), Ok(()));
        assert_eq!(
            check_first_byte(0xe1, V5),
            Err(DecodeError::InvalidFlags {
                packet_type: 14,
                flags: 1
            })
        );
        assert_eq!(
            check_first_byte(0x00, V5),
            Err(DecodeError::InvalidPacketType(0))
        );
        assert_eq!(
            check_first_byte(0xf0, V3_1_1),
            Err(DecodeError::InvalidPacketType(15))
        );
        assert_eq!(check_first_byte(0xf0, V5), Ok(()));
        assert_eq!(check_first_byte(0x36, V5), Err(DecodeError::InvalidQoS(3)));
    }
}
