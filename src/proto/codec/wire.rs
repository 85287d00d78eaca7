//! Data representations of §1.5: integers, UTF-8 strings, binary data and
//! Variable Byte Integers, read out of one packet's `Bytes` without copying.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::{DecodeError, PacketId};
use crate::proto::topic::{TopicError, TopicFilter, TopicName};

/// A cursor over one whole packet. Every read is bounds-checked against
/// `end` (the packet, or a property section inside it): a field that runs past
/// it is [`DecodeError::Truncated`], never a panic.
pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf` from `pos` to its end.
    #[inline]
    pub(crate) fn new(buf: &'a Bytes, pos: usize) -> Self {
        debug_assert!(pos <= buf.len());
        Reader {
            buf,
            pos,
            end: buf.len(),
        }
    }

    /// Bytes left before `end`.
    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// True when every byte has been read.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    /// Claims the next `n` bytes and returns where they start.
    #[inline]
    fn take(&mut self, n: usize) -> Result<usize, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let start = self.pos;
        self.pos += n;
        Ok(start)
    }

    /// The next `n` bytes as a plain slice (for comparing, not keeping).
    #[inline]
    pub(crate) fn slice(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let start = self.take(n)?;
        Ok(&self.buf[start..start + n])
    }

    /// Splits off a reader over the next `n` bytes (a property section).
    #[inline]
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        let start = self.take(n)?;
        Ok(Reader {
            buf: self.buf,
            pos: start,
            end: start + n,
        })
    }

    /// The next `n` bytes, sliced (shares the buffer).
    #[inline]
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let start = self.take(n)?;
        Ok(self.buf.slice(start..start + n))
    }

    /// A one-byte integer.
    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let at = self.take(1)?;
        Ok(self.buf[at])
    }

    /// A two-byte big-endian integer (§1.5.2).
    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let at = self.take(2)?;
        Ok(u16::from_be_bytes([self.buf[at], self.buf[at + 1]]))
    }

    /// A four-byte big-endian integer (§1.5.3 of 5.0).
    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let at = self.take(4)?;
        let b = &self.buf[at..at + 4];
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A Variable Byte Integer of at most four bytes (§1.5.5); a fifth byte
    /// is [`DecodeError::MalformedRemainingLength`].
    #[inline]
    pub(crate) fn varint(&mut self) -> Result<usize, DecodeError> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::MalformedRemainingLength)
    }

    /// A non-zero Packet Identifier (MQTT-2.3.1-1).
    #[inline]
    pub(crate) fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16()?).ok_or(DecodeError::ZeroPacketId)
    }

    /// Binary Data: a two-byte length, then that many bytes, sliced (§1.5.6).
    #[inline]
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        let start = self.take(n)?;
        Ok(self.buf.slice(start..start + n))
    }

    /// A UTF-8 string checked for well-formedness only (MQTT-1.5.3-1). Rust's
    /// UTF-8 check also refuses the surrogates U+D800..U+DFFF the rule names.
    #[inline]
    fn utf8(&mut self) -> Result<ByteString, DecodeError> {
        ByteString::try_from(self.binary()?).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// A UTF-8 Encoded String: well-formed and free of U+0000 (MQTT-1.5.3-1,
    /// MQTT-1.5.3-2).
    #[inline]
    pub(crate) fn string(&mut self) -> Result<ByteString, DecodeError> {
        let s = self.utf8()?;
        if has_nul(s.as_bytes()) {
            return Err(DecodeError::NullCharacter);
        }
        Ok(s)
    }

    /// A topic name string, possibly empty (5.0 Topic Alias); the caller
    /// turns it into a [`TopicName`] with [`topic_name`], which also does the
    /// U+0000 check, so the bytes are scanned once.
    #[inline]
    pub(crate) fn raw_topic(&mut self) -> Result<ByteString, DecodeError> {
        self.utf8()
    }

    /// A topic filter of SUBSCRIBE / UNSUBSCRIBE.
    #[inline]
    pub(crate) fn topic_filter(&mut self) -> Result<TopicFilter, DecodeError> {
        TopicFilter::new(self.utf8()?).map_err(|e| match e {
            TopicError::NullCharacter => DecodeError::NullCharacter,
            _ => DecodeError::InvalidTopicFilter,
        })
    }

    /// How far into the packet the reader is.
    #[inline]
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Ends a packet or section: left-over bytes are malformed.
    #[inline]
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

/// Whether `b` contains a zero byte, eight bytes at a time: MQTT strings are
/// short, where `memchr`'s alignment set-up costs more than the scan
/// (callgrind: ~100 instructions for a 35-byte client id, ~30 here).
#[inline]
pub(crate) fn has_nul(b: &[u8]) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        // A byte of `x` is zero exactly when its lane of the expression keeps
        // its high bit (the classic "haszero" bit trick).
        if x.wrapping_sub(LO) & !x & HI != 0 {
            return true;
        }
    }
    words.remainder().contains(&0)
}

/// Validates a topic name read by [`Reader::raw_topic`]: non-empty, no
/// wildcards (MQTT-3.3.2-2, MQTT-4.7.3-1), no U+0000 (MQTT-1.5.3-2).
#[inline]
pub(crate) fn topic_name(s: ByteString) -> Result<TopicName, DecodeError> {
    TopicName::new(s).map_err(|e| match e {
        TopicError::NullCharacter => DecodeError::NullCharacter,
        _ => DecodeError::InvalidTopicName,
    })
}

/// Size of a string or binary field: two length bytes plus the data.
#[inline]
pub(crate) fn str_len(s: &[u8]) -> usize {
    2 + s.len()
}

/// Writes a string or binary field (§1.5.4, §1.5.6). Callers hold validated
/// types, so the 65,535-byte limit already holds.
#[inline]
pub(crate) fn put_str(out: &mut BytesMut, s: &[u8]) {
    debug_assert!(s.len() <= usize::from(u16::MAX));
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_nul_finds_zero_in_every_position() {
        for len in 0..40 {
            let clean = vec![0x80u8 | 0x41; len];
            assert!(!has_nul(&clean));
            assert!(!has_nul(&vec![0xffu8; len]));
            assert!(!has_nul(&vec![0x01u8; len]));
            for at in 0..len {
                let mut b = clean.clone();
                b[at] = 0;
                assert!(has_nul(&b), "{len} {at}");
            }
        }
    }
}
