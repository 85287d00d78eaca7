//! Helpers shared by the codec's unit tests: decode and encode one packet.

use bytes::BytesMut;

use super::{decode, DecodeError, Packet, PacketId, ProtocolVersion};

/// Packet size limit for the tests: large enough never to interfere.
pub(super) const MAX: usize = 1 << 20;

/// Decodes `bytes` as one buffer.
pub(super) fn dec(bytes: &[u8], v: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    decode(&mut BytesMut::from(bytes), v, MAX)
}

/// Encodes `p`, checking `encoded_len` agrees with what was written.
pub(super) fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    p.encode(v, &mut out);
    assert_eq!(out.len(), p.encoded_len(v));
    out.to_vec()
}

/// A packet id known to be non-zero.
pub(super) fn pid(v: u16) -> PacketId {
    PacketId::new(v).expect("test ids are non-zero")
}
