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
//! Measured against the alternative, a bounded crossbeam-channel per
//! ordered pair with an eventfd doorbell read through glommio (the sender
//! writes it only when the receiver has armed an `AtomicBool` before
//! parking; a full channel parks the sender on a second bell), by
//! `cargo bench --bench mesh` (benches/mesh.rs, commit 548dc43). Kernel
//! 6.18.44-fc-v657, AMD EPYC, 2 cores shared with other engineers' builds
//! (load average 3 to 4.5), rustc 1.95, bench profile. Two executors,
//! `Placement::Unbound`, set up like our shards. The message is a 72-byte
//! [`MeshMsg`] carrying a QoS 0 publish, and capacity is 1024 both ways.
//! There were three runs of 5, 7 and 5 rounds, with the variants
//! interleaved. Each run's figure is the median over its rounds; the table
//! gives the median of the three runs, with the range of the run medians in
//! brackets. Absolute numbers are noisy, and p99s near 1 ms are other
//! tenants' time slices, not the channel.
//!
//! | per variant                          | glommio mesh     | crossbeam + eventfd |
//! |--------------------------------------|------------------|---------------------|
//! | burst of 1,000,000, M msg/s          | 5.50 (4.15-6.23) | 7.05 (4.93-9.54)    |
//! | CPU of both threads, ns/msg          | 157 (150-317)    | 140 (133-201)       |
//! | ping-pong RTT p50, us                | 89 (76-90)       | 34 (31-35)          |
//! | ping-pong RTT p99, us                | 287 (136-1785)   | 138 (81-145)        |
//! | parked receiver, 1 msg/ms, p50, us   | 55 (46-58)       | 51 (38-51)          |
//! | parked receiver, 1 msg/ms, p99, us   | 1103 (122-1493)  | 1111 (86-1127)      |
//!
//! Throughput: 1.13x, 1.19x and 1.73x in the three runs, within the
//! machine's noise. One-way wake: p50 3 to 8 us lower. Round trip: 2.6x
//! lower in every round. The cause is in glommio: a shared-channel receiver
//! notifies the *producer's* executor after every pop (one sleep flag per
//! executor covers both "data" and "room"). A shard that has sent and
//! parked is woken before its peer has pushed anything. It then parks again
//! (an io_uring_enter plus a membarrier IPI to the other core) and has to
//! be woken a second time. The doorbell wakes a sender only when it has
//! armed the room bell, that is, when its channel was full. Making the
//! crossbeam variant also wake its peer on every pop raised its ping-pong
//! p50 from 34 to 79-85 us, the mesh's figure. In the smoke run under
//! strace, the mesh made 2,340 parks (membarrier calls) and 18,204
//! io_uring_enter calls, against 1,605 and 13,555 for the doorbell, with the
//! same number of eventfd writes.
//!
//! Decision: coremq moves to crossbeam-channel + eventfd doorbell. It is as
//! fast or faster on every figure, and clearly faster whenever two shards
//! exchange messages while parked: every shard broadcasts publishes to
//! every other one, so that is normal operation. The wiring above is still
//! the glommio mesh until the integrator replaces it in `shard/mod.rs`.

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
