//! Cross-shard messages and how they travel.
//!
//! Each shard has one inbox: a bounded crossbeam channel every peer pushes
//! into, paired with two [`Doorbell`]s (data arrived; a full inbox has room)
//! so that a push wakes a shard that is blocked waiting for its sockets (a
//! crossbeam send alone would not; see architecture.md). How a bell wakes its
//! owner depends on the loop ([`Wake`]): on the io_uring loop the ringer
//! posts a completion into the owner's ring with `IORING_OP_MSG_RING` from
//! its own ring, with its next `io_uring_enter` (no eventfd, no system call
//! of its own); on the epoll loop it writes an eventfd in the owner's epoll
//! set. Either way the bell is rung only when the owner has armed it before
//! blocking, so a busy shard costs its peers nothing per message.
//!
//! A full inbox never drops a message: [`Mesh::send`] moves it, and every
//! message after it, to a local overflow queue that the shard drains when its
//! room bell (rung by receivers after taking messages) says there may be
//! room. A will or a hand-off is delayed, never lost, and messages from one
//! shard to another keep the order they were produced in (MQTT-4.6.0:
//! ordering per topic).
//!
//! The figures below chose crossbeam + eventfd over glommio's mesh when the
//! shard parked in glommio's io_uring and read its bell through the ring.
//! Neither socket loop parks in glommio's ring now (see [`super::poller`]
//! and [`super::uring`]), so `channel_mesh`, which only wakes that ring,
//! cannot be used at all; the choice of crossbeam stands on the figures.
//!
//! Why this and not glommio's `channel_mesh`: measured side by side — a
//! bounded crossbeam-channel per ordered pair with an eventfd doorbell read
//! through glommio (the sender writes it only when the receiver has armed an
//! `AtomicBool` before parking; a full channel parks the sender on a second
//! bell) — by
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
//! Decision: coremq uses crossbeam-channel + eventfd doorbell. It is as fast
//! or faster on every figure, and clearly faster whenever two shards exchange
//! messages while parked: every shard broadcasts publishes to every other
//! one, so that is normal operation. (The broker uses one inbox per shard
//! rather than one channel per ordered pair: the same primitives, n channels
//! instead of n², and FIFO per producer keeps per-pair order.)

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use crate::proto::broker::ShardMsg;
use crate::proto::codec::Connect;
use crate::proto::ShardId;

/// Capacity of each shard's inbox.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;

/// A message between shards.
#[derive(Debug)]
pub enum MeshMsg {
    /// A connection whose CONNECT was read on another shard but whose clientId
    /// this shard owns. The fd travels as `OwnedFd`: if the message is
    /// dropped on the way, the socket is closed, not leaked.
    Handoff(Handoff),
    /// A broker-level message (publishes, wills, retained queries).
    Broker(ShardMsg),
    /// Several, in order: what one turn of the sender's loop produced.
    Batch(Vec<ShardMsg>),
    /// Between a shard and the cluster link: who holds a clientId's session.
    Cluster(ClusterMsg),
}

/// `--cluster`: a clientId's session is live on one node of the cluster at
/// a time (see `crate::cluster`, "Sessions").
#[derive(Debug)]
pub enum ClusterMsg {
    /// To the link: may this node hold `client_id`'s session? The CONNECT
    /// waits, unread, for the answer.
    Claim {
        /// The shard that asks (the clientId's owner here).
        from: ShardId,
        /// Echoed in the answer.
        ticket: u64,
        /// The client.
        client_id: bytestring::ByteString,
        /// The CONNECT's Clean Start: no session need move here.
        clean_start: bool,
    },
    /// To the shard: `Ok` with the records of the session that moved here
    /// from another node (if one did); `Err` when the cluster cannot say
    /// (no NATS quorum): the CONNECT is refused, server unavailable.
    Claimed {
        /// The claim's ticket.
        ticket: u64,
        /// What became of the claim.
        outcome: Result<Option<bytes::Bytes>, ()>,
    },
    /// To the clientId's owner shard: another node took the client over.
    Kick {
        /// The client.
        client_id: bytestring::ByteString,
        /// Send its session along (the new connection resumes it).
        export: bool,
        /// Echoed in the answer.
        ticket: u64,
    },
    /// To the link: the kick is done, with the session's records if one
    /// moves.
    Kicked {
        /// The kick's ticket.
        ticket: u64,
        /// The session, as records.
        session: Option<bytes::Bytes>,
    },
    /// To the link: a client connected here with a will; kept in the
    /// cluster so that another node publishes it if this one dies.
    WillSet {
        /// The client.
        client_id: bytestring::ByteString,
        /// The will as a node-to-node publish
        /// ([`crate::proto::cluster::NodeMsg::Publish`]).
        will: bytes::Bytes,
    },
    /// To the link: that client's connection here ended (its will was
    /// dealt with here).
    WillClear {
        /// The client.
        client_id: bytestring::ByteString,
    },
    /// To a shard: publish the will of a client of a node that died
    /// (encoded as in `WillSet`).
    LostWill(bytes::Bytes),
}

/// A connection moving to its owner shard.
#[derive(Debug)]
pub struct Handoff {
    /// The socket.
    pub fd: OwnedFd,
    /// Its CONNECT, already checked and with its clientId assigned.
    pub connect: Box<Connect>,
    /// The clientId was empty and assigned by the accepting shard (a 5.0
    /// client is told it in the CONNACK).
    pub assigned: bool,
    /// Bytes read after the CONNECT (a client may pipeline).
    pub rest: BytesMut,
    /// Its TLS and/or WebSocket state, past their handshakes.
    pub(crate) layer: Option<Box<super::layer::Layer>>,
    /// When the accepting shard accepted it.
    pub accepted: std::time::Instant,
}

/// How a doorbell wakes its owner, which depends on the loop the shards run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// An eventfd in the owner's epoll set, written by the ringer.
    Eventfd,
    /// A completion the ringer posts into the owner's io_uring with
    /// `IORING_OP_MSG_RING` from its own ring: no eventfd, and no system
    /// call of its own (it goes with the ringer's next `io_uring_enter`).
    Ring,
}

/// Which of a shard's two bells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bell {
    /// Messages arrived in the shard's inbox.
    Data,
    /// A peer took messages from its inbox: room for our overflow.
    Room,
}

/// A wake-up written only when its owner has armed it before blocking.
#[derive(Debug)]
pub struct Doorbell {
    armed: AtomicBool,
    /// [`Wake::Eventfd`]: the eventfd in the owner's epoll set.
    efd: Option<OwnedFd>,
    /// [`Wake::Ring`]: the owner's io_uring descriptor, the target of
    /// MSG_RING; -1 until the owner's ring exists and once it is gone.
    ring_fd: AtomicI32,
}

impl Doorbell {
    fn new(wake: Wake) -> io::Result<Arc<Doorbell>> {
        let efd = match wake {
            Wake::Ring => None,
            Wake::Eventfd => {
                // SAFETY: plain eventfd creation; the result is checked and owned.
                let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: fresh descriptor from eventfd.
                Some(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        };
        Ok(Arc::new(Doorbell {
            armed: AtomicBool::new(false),
            efd,
            ring_fd: AtomicI32::new(-1),
        }))
    }

    /// Takes the owner's arming, if it armed the bell before blocking (or is
    /// about to block): true means the ringer must wake it. Call after the
    /// state it waits for has changed.
    fn take_armed(&self) -> bool {
        // Pairs with the fence in `arm`: either the owner sees our change
        // when it re-checks, or we see its `armed`.
        fence(Ordering::SeqCst);
        self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::Relaxed)
    }

    fn write(&self, efd: &OwnedFd) {
        let one = 1u64;
        // SAFETY: an 8-byte write from a valid u64 to our eventfd. It can only
        // fail if the counter would overflow, which one write per arming
        // cannot.
        unsafe {
            libc::write(
                efd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Arms the bell, then reports whether `ready` already holds (in which
    /// case the owner must not block). Dekker-style with
    /// [`Doorbell::take_armed`].
    fn arm(&self, ready: impl Fn() -> bool) -> bool {
        self.armed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        ready()
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }

    /// Resets the eventfd after it woke the owner (a ring's completion was
    /// consumed when it was read).
    fn clear(&self) {
        let Some(efd) = &self.efd else { return };
        let mut count = 0u64;
        // SAFETY: an 8-byte read into a valid u64 from our non-blocking
        // eventfd; EAGAIN (already clear) is fine.
        unsafe {
            libc::read(
                efd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// One shard's ends of the mesh before its executor starts (`Send`).
pub struct MeshEnds {
    inbox: Receiver<MeshMsg>,
    inboxes: Vec<Sender<MeshMsg>>,
    data_bells: Vec<Arc<Doorbell>>,
    room_bells: Vec<Arc<Doorbell>>,
}

/// Creates the mesh of `shards` shards: one inbox and two bells per shard,
/// rung the `wake` way.
pub fn build(shards: usize, wake: Wake) -> io::Result<Vec<MeshEnds>> {
    build_with_link(shards, false, wake)
}

/// [`build`], and with `link` one more peer after the shards: the cluster
/// link (`crate::cluster`). It runs no ring, so its bells are eventfds
/// whatever `wake` says; it rings the shards' bells the `wake` way.
pub fn build_with_link(shards: usize, link: bool, wake: Wake) -> io::Result<Vec<MeshEnds>> {
    let peers = shards + usize::from(link);
    let mut senders = Vec::with_capacity(peers);
    let mut receivers = Vec::with_capacity(peers);
    for _ in 0..peers {
        let (tx, rx) = crossbeam_channel::bounded(MESH_CHANNEL_CAPACITY);
        senders.push(tx);
        receivers.push(rx);
    }
    let wake_of = |peer: usize| if peer < shards { wake } else { Wake::Eventfd };
    let data_bells = (0..peers)
        .map(|p| Doorbell::new(wake_of(p)))
        .collect::<io::Result<Vec<_>>>()?;
    let room_bells = (0..peers)
        .map(|p| Doorbell::new(wake_of(p)))
        .collect::<io::Result<Vec<_>>>()?;
    Ok(receivers
        .into_iter()
        .map(|inbox| MeshEnds {
            inbox,
            inboxes: senders.clone(),
            data_bells: data_bells.clone(),
            room_bells: room_bells.clone(),
        })
        .collect())
}

/// A shard's view of the mesh, inside its executor (`!Send`).
pub struct Mesh {
    id: ShardId,
    ends: MeshEnds,
    /// Messages waiting for room in a full inbox, in send order, with the
    /// number of them bound for each peer.
    overflow: RefCell<VecDeque<(ShardId, MeshMsg)>>,
    overflow_per_peer: RefCell<Vec<usize>>,
    /// [`Wake::Ring`]: bells to ring with MSG_RING from this shard's ring
    /// at the end of its loop's turn, as (the peer's ring, which bell).
    ring_later: RefCell<Vec<(RawFd, Bell)>>,
}

impl Mesh {
    /// Connects shard `id` to its ends.
    pub fn new(id: ShardId, ends: MeshEnds) -> Mesh {
        let peers = ends.inboxes.len();
        Mesh {
            id,
            ends,
            overflow: RefCell::new(VecDeque::new()),
            overflow_per_peer: RefCell::new(vec![0; peers]),
            ring_later: RefCell::new(Vec::new()),
        }
    }

    /// [`Wake::Eventfd`]: the eventfd rung when messages arrive for this
    /// shard, and the one rung when a peer took messages from its inbox.
    pub fn bell_fds(&self) -> Option<(RawFd, RawFd)> {
        let me = self.id.0 as usize;
        let data = self.ends.data_bells[me].efd.as_ref()?;
        let room = self.ends.room_bells[me].efd.as_ref()?;
        Some((data.as_raw_fd(), room.as_raw_fd()))
    }

    /// [`Wake::Ring`]: where peers post this shard's bells (its ring), or -1
    /// when it is gone and they must post nothing.
    pub fn set_ring_fd(&self, fd: RawFd) {
        let me = self.id.0 as usize;
        self.ends.data_bells[me].ring_fd.store(fd, Ordering::SeqCst);
        self.ends.room_bells[me].ring_fd.store(fd, Ordering::SeqCst);
    }

    /// Wakes `peer` through its `bell` if it armed it.
    fn ring(&self, peer: usize, bell: Bell) {
        let doorbell = match bell {
            Bell::Data => &self.ends.data_bells[peer],
            Bell::Room => &self.ends.room_bells[peer],
        };
        if !doorbell.take_armed() {
            return;
        }
        match &doorbell.efd {
            Some(efd) => doorbell.write(efd),
            None => {
                let fd = doorbell.ring_fd.load(Ordering::SeqCst);
                if fd >= 0 {
                    self.ring_later.borrow_mut().push((fd, bell));
                }
            }
        }
    }

    /// [`Wake::Ring`]: the bells this turn rang, as (peer ring, bell), for
    /// the loop to post with MSG_RING before it enters the kernel.
    pub fn take_rings(&self, mut post: impl FnMut(RawFd, Bell)) {
        for (fd, bell) in self.ring_later.borrow_mut().drain(..) {
            post(fd, bell);
        }
    }

    /// Sends `msg` to shard `to`. Never blocks and never drops: a full inbox
    /// queues it (and everything after it) locally until there is room.
    pub fn send(&self, to: ShardId, msg: MeshMsg) {
        if self.overflow.borrow().is_empty() {
            match self.ends.inboxes[to.0 as usize].try_send(msg) {
                Ok(()) => self.ring(to.0 as usize, Bell::Data),
                Err(TrySendError::Full(msg)) => self.push_overflow(to, msg),
                Err(TrySendError::Disconnected(_)) => {} // shutting down
            }
        } else {
            self.push_overflow(to, msg);
        }
    }

    fn push_overflow(&self, to: ShardId, msg: MeshMsg) {
        self.overflow.borrow_mut().push_back((to, msg));
        self.overflow_per_peer.borrow_mut()[to.0 as usize] += 1;
    }

    /// True while messages for shard `peer` wait for room in its full inbox.
    pub fn backlogged_to(&self, peer: ShardId) -> bool {
        self.overflow_per_peer.borrow()[peer.0 as usize] > 0
    }

    /// The room bell rang: moves overflowed messages into their inboxes
    /// while there is room (`move_overflow`).
    pub fn drain_overflow(&self) {
        self.ends.room_bells[self.id.0 as usize].clear();
        self.move_overflow();
    }

    /// Moves overflowed messages into their inboxes while there is room, in
    /// order; stops at the first one that still does not fit.
    fn move_overflow(&self) {
        loop {
            let mut overflow = self.overflow.borrow_mut();
            let Some((to, msg)) = overflow.pop_front() else {
                return;
            };
            match self.ends.inboxes[to.0 as usize].try_send(msg) {
                Ok(()) => {
                    self.overflow_per_peer.borrow_mut()[to.0 as usize] -= 1;
                    self.ring(to.0 as usize, Bell::Data);
                }
                Err(TrySendError::Full(msg)) => {
                    overflow.push_front((to, msg));
                    return;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.overflow_per_peer.borrow_mut()[to.0 as usize] -= 1;
                }
            }
        }
    }

    /// Takes up to `max` messages from this shard's inbox, calling `handle`
    /// for each; returns how many it took. Peers waiting for room are told.
    pub fn receive(&self, max: usize, mut handle: impl FnMut(MeshMsg)) -> usize {
        self.ends.data_bells[self.id.0 as usize].clear();
        let mut taken = 0;
        while taken < max {
            match self.ends.inbox.try_recv() {
                Ok(msg) => {
                    handle(msg);
                    taken += 1;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        if taken > 0 {
            for peer in 0..self.ends.room_bells.len() {
                if peer != self.id.0 as usize {
                    self.ring(peer, Bell::Room);
                }
            }
        }
        taken
    }

    /// Arms this shard's bells before it blocks: the data bell always, the
    /// room bell while it has overflow. Returns false when there is already
    /// something to do, and the shard must not block.
    ///
    /// Overflow first moves on as far as there is room: a peer that took
    /// messages while our room bell was not armed rang nothing, so waiting
    /// for the bell would leave the overflow where it is while this check
    /// kept answering "room" — a shard spinning with timeout 0 and messages
    /// that never arrive (seen under shared-subscription load).
    pub fn arm_before_block(&self) -> bool {
        if !self.overflow.borrow().is_empty() {
            self.move_overflow();
        }
        let inbox = &self.ends.inbox;
        if self.ends.data_bells[self.id.0 as usize].arm(|| !inbox.is_empty()) {
            self.disarm();
            return false;
        }
        let overflow = self.overflow.borrow();
        if let Some((to, _)) = overflow.front() {
            let target = &self.ends.inboxes[to.0 as usize];
            if self.ends.room_bells[self.id.0 as usize].arm(|| !target.is_full()) {
                drop(overflow);
                self.disarm();
                return false;
            }
        }
        true
    }

    /// Disarms this shard's bells once it is awake.
    pub fn disarm(&self) {
        self.ends.data_bells[self.id.0 as usize].disarm();
        self.ends.room_bells[self.id.0 as usize].disarm();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish() -> MeshMsg {
        MeshMsg::Batch(Vec::new())
    }

    /// A full inbox sends the rest to overflow; once the peer has taken
    /// messages while nobody listened for its room bell, the next
    /// `arm_before_block` moves the overflow on by itself, so the shard
    /// neither loses it nor spins on "room" that it never uses.
    #[test]
    fn overflow_moves_on_when_room_appeared_without_a_bell() {
        let mut ends = build(2, Wake::Eventfd).unwrap().into_iter();
        let a = Mesh::new(ShardId(0), ends.next().unwrap());
        let b = Mesh::new(ShardId(1), ends.next().unwrap());
        for _ in 0..MESH_CHANNEL_CAPACITY + 3 {
            a.send(ShardId(1), publish());
        }
        assert!(a.backlogged_to(ShardId(1)));
        // The peer takes everything; a's room bell was not armed.
        let mut taken = b.receive(usize::MAX, |_| {});
        assert_eq!(taken, MESH_CHANNEL_CAPACITY);
        // a is about to block: its overflow must go now.
        a.arm_before_block();
        a.disarm();
        assert!(!a.backlogged_to(ShardId(1)), "overflow left behind");
        taken += b.receive(usize::MAX, |_| {});
        assert_eq!(taken, MESH_CHANNEL_CAPACITY + 3, "every message arrived");
    }
}
