//! Cross-shard messages and how they travel.
//!
//! Each shard has one outbound queue per peer (a glommio local channel, so
//! pushing never blocks the broker) drained by one task per peer into
//! glommio's `channel_mesh`. The mesh channel is a bounded lock-free ring that
//! wakes a peer parked in io_uring — a plain crossbeam send would not (see
//! architecture.md) — and a full ring makes the per-peer task wait instead of
//! dropping: a will or a hand-off is never lost. One task per peer also keeps
//! messages to a peer in the order they were produced (MQTT-4.6.0 ordering
//! per topic).
//!
//! Only glommio's mesh is wired in; the crossbeam-channel + eventfd doorbell
//! alternative has not been measured against it yet (see the issue note).

use std::os::fd::OwnedFd;

use bytes::BytesMut;

use crate::proto::broker::ShardMsg;
use crate::proto::codec::Connect;

/// Capacity of each shard-to-shard ring.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;

/// A message between shards.
#[derive(Debug)]
pub enum MeshMsg {
    /// A connection whose CONNECT was read on another shard but whose clientId
    /// this shard owns. The fd travels as `OwnedFd`: if the message is
    /// dropped on the way, the socket is closed, not leaked.
    Handoff(Handoff),
    /// A broker-level message (publishes, wills).
    Broker(ShardMsg),
}

/// A connection moving to its owner shard.
#[derive(Debug)]
pub struct Handoff {
    /// The socket.
    pub fd: OwnedFd,
    /// Its CONNECT, already checked and with its clientId assigned.
    pub connect: Box<Connect>,
    /// Bytes read after the CONNECT (a client may pipeline).
    pub rest: BytesMut,
}
