//! Fuzzes `proto::codec::decode` for all three protocol versions.
//!
//! Byte 0 picks the version (low two bits) and the packet-size limit (bit 2:
//! 64 bytes or unlimited) and where the rest is cut in two for incremental
//! feeding (the upper bits). Every packet that decodes must re-encode to
//! bytes that decode to the same packet, and feeding the input in two pieces
//! must give the same packets and the same error as feeding it whole.

#![no_main]

use bytes::BytesMut;
use coremq::proto::codec::{decode, DecodeError, Packet, ProtocolVersion};
use libfuzzer_sys::fuzz_target;

/// Decodes everything in `buf`; the error that stopped it, if any.
fn drain(
    buf: &mut BytesMut,
    v: ProtocolVersion,
    max: usize,
    out: &mut Vec<Packet>,
) -> Option<DecodeError> {
    loop {
        match decode(buf, v, max) {
            Ok(Some(p)) => out.push(p),
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let version = match sel & 0b11 {
        0 => ProtocolVersion::V3_1,
        1 => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V5,
    };
    let max = if sel & 0b100 != 0 { 64 } else { usize::MAX };

    let mut whole = Vec::new();
    let err = drain(&mut BytesMut::from(rest), version, max, &mut whole);

    for p in &whole {
        let mut out = BytesMut::new();
        p.encode(version, &mut out);
        assert_eq!(out.len(), p.encoded_len(version), "{p:?}");
        assert_eq!(decode(&mut out, version, usize::MAX), Ok(Some(p.clone())));
        assert!(out.is_empty());
    }

    // The same bytes in two pieces.
    let cut = (usize::from(sel >> 3) * rest.len()) / 31;
    let cut = cut.min(rest.len());
    let mut buf = BytesMut::from(&rest[..cut]);
    let mut pieces = Vec::new();
    let mut err2 = drain(&mut buf, version, max, &mut pieces);
    if err2.is_none() {
        buf.extend_from_slice(&rest[cut..]);
        err2 = drain(&mut buf, version, max, &mut pieces);
    }
    assert_eq!(pieces, whole);
    assert_eq!(err2, err);
});
