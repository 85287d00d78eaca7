//! What the benches that drive the sans-IO broker with a simulated fleet
//! share: device `i`'s protocol version and clientId, and encoding a
//! packet as the wire would carry it.

use bytes::BytesMut;
use coremq::proto::codec::{Packet, ProtocolVersion};

/// Half the fleet speaks 3.1.1, half 5.0.
pub fn version(i: u32) -> ProtocolVersion {
    if i % 2 == 0 {
        ProtocolVersion::V3_1_1
    } else {
        ProtocolVersion::V5
    }
}

/// Device `i`'s clientId.
pub fn client_id(i: u32) -> String {
    format!("dev-{i:08}")
}

/// `p` on the wire in version `v`.
pub fn encode(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    p.encode(v, &mut out);
    out
}
