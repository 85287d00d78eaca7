//! A shard's sockets, shared by both socket loops: its listeners, the
//! sockets still in the CONNECT handshake, and the connections it owns; the
//! epoll loop itself; and the turn's common end (the mesh, the tick, a
//! shutdown's steps). The io_uring loop is in `ring_loop`.
//!
//! A turn of either loop: wait for what is ready (epoll) or completed
//! (io_uring), at most until the next tick; for a listener, accept; for a
//! handshake socket, read until a whole CONNECT is in and then admit, refuse
//! or hand it to its owner shard; for a connection, feed what it sent to the
//! broker, or write what was waiting for room (epoll) or continue a send
//! (io_uring); then take what other shards sent, and tick when it is time.
//! What the broker asks for (bytes to send, a close, a message to the other
//! shards) is carried out at once by [`Shard::dispatch`]: epoll sends with
//! `send` now; io_uring queues a send for the turn's `io_uring_enter`.
//!
//! Nothing here is per connection while it is idle but its `Sock` record:
//! a descriptor, a generation and three flags (and on io_uring the recv armed
//! in the kernel). A partial packet or unsent bytes get a boxed buffer that
//! is released as soon as it is empty. Handshake and close deadlines live in
//! FIFO queues walked by the shard's tick; the timeouts are fixed, so arrival
//! order is deadline order and no timer is set per socket.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use bytestring::ByteString;

use super::layer::{Fail, Layer, Progress};
use super::listener;
use super::mesh::{ClusterMsg, Handoff, MeshMsg};
use super::poller::{self, Event, READ, READ_WRITE};
use super::uring::Uring;
use super::{Io, Shard, TICK};
use crate::config::Transport;
use crate::metrics::{bump, drop_one, get};
use crate::proto::broker::MAX_PENDING_OUTGOING;
use crate::proto::cluster::{NodeMsg, NodePublish};
use crate::proto::codec::{reason, return_code, Connect, LastWill, ProtocolVersion};
use crate::proto::handshake::{
    self, assign_client_id, check_connect, connack_bytes, connack_code, owner_of,
    CertificateIdentity, FirstPacket, HandshakeError,
};
use crate::proto::{ConnId, Millis};

/// Accepts taken from one listener per readiness before the loop looks at
/// the other sockets again.
const ACCEPT_BATCH: usize = 64;

/// Events taken from epoll at once.
const EVENT_BATCH: usize = 1024;

/// Messages taken from the mesh inbox per turn of the loop, so sockets are
/// not starved by a flood from other shards.
const MESH_BATCH: usize = 256;

/// How long a closing connection may take to drain what it was sent (a
/// refusal's CONNACK, the packets before a takeover's close) before its
/// socket is closed regardless.
const CLOSE_LINGER_MS: u64 = 5_000;

/// Most bytes read away from a plain client the broker closed while it may
/// still be sending (see `Broker::lingers`): its acknowledgements and the
/// packets it had under way fit many times over; a client that floods
/// past it (a 256 MiB PUBLISH refused from its header) is cut off with a
/// close at once, as before the linger existed.
const LINGER_DRAIN_BYTES: usize = 64 * 1024;

/// Bytes a connection held for full queues may leave unread in its buffer
/// before its socket stops being read (`--queue-full backpressure`): below
/// it, its acknowledgements and PINGREQs still arrive (the broker takes them
/// out of the unread bytes); past it, the kernel's window slows it.
const HELD_UNREAD_CAP: usize = 64 * 1024;

/// What an epoll token or an io_uring operation's user data refers to:
/// bits 61–63 the kind, bits 32–60 a generation, bits 0–31 an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// A connection, by its broker [`ConnId`] (epoll: its readiness;
    /// io_uring: its multishot recv).
    Conn(ConnId),
    /// A socket still in the handshake: slot index and generation.
    Pending { index: u32, generation: u32 },
    /// Listener number `n`.
    Listener(u32),
    /// The mesh doorbell rung when messages arrive.
    DataBell,
    /// The mesh doorbell rung when a full peer inbox has room again.
    RoomBell,
    /// io_uring: a connection's send.
    Send(ConnId),
    /// io_uring: an operation whose completion needs nothing (a cancel or
    /// close that failed, which only the log hears of).
    Internal,
    /// io_uring: the write of a `--data-dir` log commit.
    LogWrite,
    /// io_uring: the fdatasync linked after it.
    LogSync,
    /// io_uring: a write of zeros ahead of the log's end.
    LogFill,
}

const KIND_SHIFT: u32 = 61;
const GEN_MASK: u64 = (1 << 29) - 1;

impl Token {
    pub(crate) fn encode(self) -> u64 {
        let (kind, generation, index) = match self {
            Token::Conn(id) => (0u64, id.generation, id.index),
            Token::Pending { index, generation } => (1, generation, index),
            Token::Listener(n) => (2, 0, n),
            Token::DataBell => (3, 0, 0),
            Token::RoomBell => (3, 0, 1),
            Token::Send(id) => (4, id.generation, id.index),
            Token::Internal => (5, 0, 0),
            Token::LogWrite => (6, 0, 0),
            Token::LogSync => (6, 0, 1),
            Token::LogFill => (6, 0, 2),
        };
        (kind << KIND_SHIFT) | ((u64::from(generation) & GEN_MASK) << 32) | u64::from(index)
    }

    /// Decodes a token; a generation comes back truncated to 29 bits, so
    /// compare it with [`same_generation`].
    pub(crate) fn decode(raw: u64) -> Token {
        let index = raw as u32;
        let generation = ((raw >> 32) & GEN_MASK) as u32;
        match raw >> KIND_SHIFT {
            0 => Token::Conn(ConnId { index, generation }),
            1 => Token::Pending { index, generation },
            2 => Token::Listener(index),
            3 if index == 0 => Token::DataBell,
            3 => Token::RoomBell,
            4 => Token::Send(ConnId { index, generation }),
            6 if index == 0 => Token::LogWrite,
            6 if index == 1 => Token::LogSync,
            6 => Token::LogFill,
            _ => Token::Internal,
        }
    }
}

fn same_generation(full: u32, from_token: u32) -> bool {
    u64::from(full) & GEN_MASK == u64::from(from_token)
}

/// Buffers a connection needs only while a packet is partial or the socket
/// is full.
#[derive(Default)]
pub(crate) struct SockBufs {
    /// Bytes of a packet not yet whole.
    partial: BytesMut,
    /// Bytes the socket did not take yet; more wait in the broker.
    unsent: BytesMut,
}

/// io_uring: where a connection's multishot recv is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recv {
    /// Nothing armed (epoll, or io_uring between a recv's end and its
    /// re-arming).
    Off,
    /// Armed: completions bring the connection's bytes.
    Armed,
    /// A cancel is on its way (reading paused); its last completion turns
    /// it [`Recv::Off`].
    Cancelling,
}

/// One connection's socket.
pub(crate) struct Sock {
    fd: OwnedFd,
    generation: u32,
    /// `bufs.unsent` is not empty: epoll watches for room (EPOLLOUT);
    /// io_uring has a send of it in flight.
    writing: bool,
    /// The broker closed it: write what is left, then close the socket.
    closing: bool,
    /// io_uring only.
    recv: Recv,
    bufs: Option<Box<SockBufs>>,
    /// TLS and/or WebSocket; `None` on a plain `--listen` connection.
    layer: Option<Box<Layer>>,
    /// Our side is shut down (after a WebSocket close frame, or a close the
    /// broker decided while the client may still be sending); waiting for
    /// the client's FIN, so that its last bytes do not meet a closed socket
    /// (which answers with a reset).
    half_closed: bool,
}

impl Sock {
    fn bufs(&mut self) -> &mut SockBufs {
        self.bufs.get_or_insert_with(Default::default)
    }

    /// Drops the buffers once both are empty: an idle connection keeps none.
    fn release_empty_bufs(&mut self) {
        if self
            .bufs
            .as_ref()
            .is_some_and(|b| b.partial.is_empty() && b.unsent.is_empty())
        {
            self.bufs = None;
        }
    }
}

/// A socket accepted but not yet past its CONNECT.
pub(crate) struct Pending {
    fd: OwnedFd,
    buf: BytesMut,
    /// epoll: registered in the set (it did not send its CONNECT with the
    /// first read). io_uring: a recv is in flight on it.
    registered: bool,
    /// TLS and/or WebSocket, still in their handshake until the CONNECT.
    layer: Option<Box<Layer>>,
    /// When it was accepted (the CONNACK latency histogram).
    accepted: Instant,
}

impl Pending {
    /// The socket and its accepted CONNECT, for [`admit`] here or on the
    /// owner shard.
    fn into_handoff(self, connect: Box<Connect>, assigned: bool) -> Handoff {
        Handoff {
            fd: self.fd,
            connect,
            assigned,
            rest: self.buf,
            layer: self.layer,
            accepted: self.accepted,
        }
    }
}

enum PendingSlot {
    Free,
    Used { generation: u32, pending: Pending },
}

/// Handshake slots kept however many are free: a table grown past this by
/// a storm of connects is dropped once the storm is over (see
/// [`Net::shrink_handshake_slots`]).
const KEEP_HANDSHAKE_SLOTS: usize = 1024;

/// The shard's socket table.
pub(crate) struct Net {
    listeners: Vec<OwnedFd>,
    /// What each listener speaks.
    transports: Vec<Transport>,
    /// Connections by `ConnId::index`, the broker's slot numbering.
    socks: Vec<Option<Sock>>,
    pending: Vec<PendingSlot>,
    free_pending: Vec<u32>,
    /// The generation the next handshake gets, whatever its slot: unique
    /// across the shard (to the 30 bits a token carries), so that the slot
    /// table may be dropped and rebuilt without a stale token naming a new
    /// handshake.
    pending_generations: u32,
    /// (slot, generation, deadline) of handshake sockets, in arrival order.
    connect_deadlines: VecDeque<(u32, u32, Millis)>,
    /// (connection, deadline) of closing connections still draining.
    close_deadlines: VecDeque<(ConnId, Millis)>,
    /// Plain connections half-closed by `Shard::half_close`: bytes they may
    /// still send before the socket is closed at once
    /// ([`LINGER_DRAIN_BYTES`]). A map, not a field of every `Sock`: few
    /// connections are ever in it.
    linger_budget: hashbrown::HashMap<ConnId, usize>,
    /// Released when accept fails with EMFILE so the pending connection can
    /// be accepted and closed (see [`listener::refuse_one`]).
    spare: Option<OwnedFd>,
    /// Listeners not watched until the next tick (accept kept failing).
    paused_listeners: Vec<u32>,
    /// io_uring: the buffers of sends still in flight on connections that
    /// are gone, kept until their completions say the kernel is done with
    /// them.
    orphaned_sends: hashbrown::HashMap<ConnId, Box<SockBufs>>,
    /// io_uring: whether each listener's multishot accept is armed.
    accepting: Vec<bool>,
    /// io_uring: connections and handshake sockets whose recv the buffer
    /// ring ran dry for (ENOBUFS), re-armed once the turn gave its buffers
    /// back.
    rearm: Vec<Token>,
}

impl Net {
    pub(crate) fn new(listeners: Vec<(OwnedFd, Transport)>) -> Net {
        let (listeners, transports): (Vec<OwnedFd>, Vec<Transport>) = listeners.into_iter().unzip();
        Net {
            accepting: vec![false; listeners.len()],
            listeners,
            transports,
            socks: Vec::new(),
            pending: Vec::new(),
            free_pending: Vec::new(),
            pending_generations: 0,
            connect_deadlines: VecDeque::new(),
            close_deadlines: VecDeque::new(),
            linger_budget: hashbrown::HashMap::new(),
            spare: listener::open_spare(),
            paused_listeners: Vec::new(),
            orphaned_sends: hashbrown::HashMap::new(),
            rearm: Vec::new(),
        }
    }

    /// The full id of the connection a token names, if it is still there
    /// (tokens carry 30 bits of the generation).
    fn resolve(&self, index: u32, token_generation: u32) -> Option<ConnId> {
        let sock = self.socks.get(index as usize)?.as_ref()?;
        same_generation(sock.generation, token_generation).then_some(ConnId {
            index,
            generation: sock.generation,
        })
    }

    /// [`Net::resolve`] for a connection id taken from a token.
    pub(crate) fn resolve_conn(&self, from_token: ConnId) -> Option<ConnId> {
        self.resolve(from_token.index, from_token.generation)
    }

    /// How many listeners the shard opened.
    pub(crate) fn listener_count(&self) -> usize {
        self.accepting.len()
    }

    /// io_uring: records whether listener `n`'s accept is armed.
    pub(crate) fn set_accepting(&mut self, n: u32, armed: bool) {
        if let Some(a) = self.accepting.get_mut(n as usize) {
            *a = armed;
        }
    }

    fn sock_mut(&mut self, id: ConnId) -> Option<&mut Sock> {
        self.socks
            .get_mut(id.index as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.generation == id.generation)
    }

    fn take_sock(&mut self, id: ConnId) -> Option<Sock> {
        let slot = self.socks.get_mut(id.index as usize)?;
        if slot.as_ref()?.generation != id.generation {
            return None;
        }
        self.linger_budget.remove(&id);
        slot.take()
    }

    fn insert_sock(&mut self, id: ConnId, fd: OwnedFd, layer: Option<Box<Layer>>) {
        let i = id.index as usize;
        if self.socks.len() <= i {
            self.socks.resize_with(i + 1, || None);
        }
        self.socks[i] = Some(Sock {
            fd,
            generation: id.generation,
            writing: false,
            closing: false,
            recv: Recv::Off,
            bufs: None,
            layer,
            half_closed: false,
        });
    }

    fn insert_pending(&mut self, pending: Pending) -> (u32, u32) {
        let index = match self.free_pending.pop() {
            Some(i) => i,
            None => {
                self.pending.push(PendingSlot::Free);
                (self.pending.len() - 1) as u32
            }
        };
        debug_assert!(matches!(self.pending[index as usize], PendingSlot::Free));
        let generation = self.pending_generations;
        self.pending_generations = generation.wrapping_add(1);
        self.pending[index as usize] = PendingSlot::Used {
            generation,
            pending,
        };
        (index, generation)
    }

    fn pending_mut(&mut self, index: u32, generation: u32) -> Option<&mut Pending> {
        match self.pending.get_mut(index as usize)? {
            PendingSlot::Used {
                generation: g,
                pending,
            } if same_generation(*g, generation) => Some(pending),
            _ => None,
        }
    }

    /// No connection and no handshake left.
    fn is_empty(&self) -> bool {
        self.socks.iter().all(Option::is_none) && self.free_pending.len() == self.pending.len()
    }

    fn take_pending(&mut self, index: u32, generation: u32) -> Option<Pending> {
        let slot = self.pending.get_mut(index as usize)?;
        if !matches!(slot, PendingSlot::Used { generation: g, .. } if same_generation(*g, generation))
        {
            return None;
        }
        let old = std::mem::replace(slot, PendingSlot::Free);
        self.free_pending.push(index);
        match old {
            PendingSlot::Used { pending, .. } => Some(pending),
            PendingSlot::Free => unreachable!("checked above"),
        }
    }

    /// Drops the handshake slot table and the queue of connect deadlines
    /// once a storm that grew them past [`KEEP_HANDSHAKE_SLOTS`] is over (no
    /// handshake left, no deadline left to look at): kept at their
    /// high-water mark, they would hold the storm's memory for good.
    pub(crate) fn shrink_handshake_slots(&mut self) {
        if self.pending.capacity() > KEEP_HANDSHAKE_SLOTS
            && self.free_pending.len() == self.pending.len()
        {
            self.pending = Vec::new();
            self.free_pending = Vec::new();
        }
        if self.connect_deadlines.capacity() > KEEP_HANDSHAKE_SLOTS
            && self.connect_deadlines.is_empty()
        {
            self.connect_deadlines = VecDeque::new();
        }
    }
}

/// How long a shard that is shutting down waits, after publishing its
/// clients' wills, for the other shards' wills to reach its subscribers
/// before it closes them.
const SHUTDOWN_WILLS_MS: u64 = 200;

/// How long closing connections may take to drain at shutdown.
const SHUTDOWN_DRAIN_MS: u64 = 1_000;

/// Where a shard is in a shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopping {
    /// Wills published; subscribers still open.
    Wills { until: Instant },
    /// Every connection closing; waiting for them to drain.
    Closing { until: Instant },
}

/// Runs the shard's socket loop until shutdown: the io_uring one or the
/// epoll one, as `--io` decided at start.
pub(crate) async fn run(shard: Rc<Shard>) -> io::Result<()> {
    match &shard.io {
        Io::Uring(_) => super::ring_loop::run(shard).await,
        Io::Epoll(_) => run_epoll(shard).await,
    }
}

/// What both loops do at the end of every turn: take what other shards
/// sent, tick when it is time, and step through a shutdown. True once the
/// shard is done.
pub(crate) fn end_of_turn(
    shard: &Shard,
    next_tick: &mut Instant,
    stopping: &mut Option<Stopping>,
) -> bool {
    if let Some(mesh) = &shard.mesh {
        mesh.receive(MESH_BATCH, |msg| shard.handle_mesh_msg(msg));
    }
    let now = Instant::now();
    if now >= *next_tick {
        *next_tick = (*next_tick + TICK).max(now);
        shard.tick();
    }
    *stopping = match *stopping {
        None if shard.is_shutting_down() => {
            shard.begin_shutdown();
            Some(Stopping::Wills {
                until: now + Duration::from_millis(SHUTDOWN_WILLS_MS),
            })
        }
        Some(Stopping::Wills { until }) if now >= until => {
            shard.close_everything();
            Some(Stopping::Closing {
                until: now + Duration::from_millis(SHUTDOWN_DRAIN_MS),
            })
        }
        Some(Stopping::Closing { until }) if now >= until || shard.net.borrow().is_empty() => {
            if shard.id.0 == 0 {
                tracing::info!("shutting down; final stats {}", shard.counters);
            }
            return true;
        }
        other => other,
    };
    false
}

/// Registers the listeners and doorbells in the epoll set and runs the
/// shard until shutdown.
async fn run_epoll(shard: Rc<Shard>) -> io::Result<()> {
    let Io::Epoll(epoll) = &shard.io else {
        unreachable!("run picks the loop by shard.io")
    };
    for (n, fd) in shard.net.borrow().listeners.iter().enumerate() {
        epoll.add(fd.as_raw_fd(), READ, Token::Listener(n as u32).encode())?;
    }
    if let Some((data, room)) = shard.mesh.as_ref().and_then(|m| m.bell_fds()) {
        epoll.add(data, READ, Token::DataBell.encode())?;
        epoll.add(room, READ, Token::RoomBell.encode())?;
    }
    let mut events: Vec<Event> = Vec::with_capacity(EVENT_BATCH);
    let mut next_tick = Instant::now() + TICK;
    let mut stopping: Option<Stopping> = None;
    // When records held back by --commit-interval-usec are due.
    let mut commit_due: Option<Instant> = None;
    loop {
        // Whatever the last turn produced for other shards leaves before this
        // shard may block.
        shard.flush_outbox();
        let wake_by = commit_due.map_or(next_tick, |due| due.min(next_tick));
        let mut timeout_ms = wake_by
            .saturating_duration_since(Instant::now())
            .as_micros()
            .div_ceil(1000) as i32;
        if let Some(mesh) = &shard.mesh {
            if !mesh.arm_before_block() {
                // Messages are waiting: look at the sockets, do not block.
                timeout_ms = 0;
            }
        }
        epoll.wait(&mut events, timeout_ms)?;
        if let Some(mesh) = &shard.mesh {
            mesh.disarm();
        }
        shard.refresh_reload();
        for ev in &events {
            match Token::decode(poller::token(ev)) {
                Token::Listener(n) => accept_ready(&shard, n),
                Token::Pending { index, generation } => pending_ready(&shard, index, generation),
                Token::Conn(t) => {
                    let Some(id) = shard.net.borrow().resolve(t.index, t.generation) else {
                        continue;
                    };
                    if poller::is_writable(ev) {
                        shard.write_ready(id);
                    }
                    if poller::is_readable(ev) {
                        shard.read_ready(id);
                        if shard.sync_each_read {
                            shard.commit_log().await;
                        }
                    }
                }
                // The inbox is looked at below on every turn, rung or not.
                Token::DataBell => {}
                Token::RoomBell => {
                    if let Some(mesh) = &shard.mesh {
                        mesh.drain_overflow();
                    }
                }
                Token::Send(_)
                | Token::Internal
                | Token::LogWrite
                | Token::LogSync
                | Token::LogFill => {}
            }
        }
        let done = end_of_turn(&shard, &mut next_tick, &mut stopping);
        if shard.sync_each_read || done {
            shard.commit_log().await;
        } else {
            commit_due = shard.commit_log_spaced().await;
        }
        if done {
            return Ok(());
        }
        glommio::yield_if_needed().await;
    }
}

/// One non-blocking `recv` into the shard's scratch buffer, appended to
/// `buf`. `Ok(0)` is EOF; `WouldBlock` means nothing was there.
fn recv_into(shard: &Shard, fd: RawFd, buf: &mut BytesMut) -> io::Result<usize> {
    let mut scratch = shard.scratch.borrow_mut();
    // SAFETY: recv into our scratch buffer, at most its length.
    let n = unsafe {
        libc::recv(
            fd,
            scratch.as_mut_ptr().cast(),
            scratch.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    buf.extend_from_slice(&scratch[..n]);
    shard.bytes_in.set(shard.bytes_in.get() + n as u64);
    Ok(n)
}

/// Writes as much of `data` as the socket takes now; returns how much.
fn send_some(shard: &Shard, fd: RawFd, data: &[u8]) -> io::Result<usize> {
    let sent = send_fd(fd, data)?;
    shard.bytes_out.set(shard.bytes_out.get() + sent as u64);
    Ok(sent)
}

fn send_fd(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < data.len() {
        // SAFETY: send from a valid slice; MSG_NOSIGNAL so a peer that has
        // gone gives EPIPE, not SIGPIPE.
        let n = unsafe {
            libc::send(
                fd,
                data[sent..].as_ptr().cast(),
                data.len() - sent,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(sent),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        sent += n as usize;
    }
    Ok(sent)
}

fn accept_ready(shard: &Shard, n: u32) {
    let Some(listener_fd) = shard.listener_fd(n) else {
        return;
    };
    for _ in 0..ACCEPT_BATCH {
        match listener::accept_now(listener_fd) {
            None => return,
            Some(Ok(fd)) => accepted(shard, n, fd),
            Some(Err(e)) => {
                if !accept_failed(shard, n, listener_fd, &e) {
                    return;
                }
            }
        }
    }
}

/// A socket accepted from listener `n` (either loop): counted, or refused
/// at the socket ceiling.
pub(crate) fn accepted(shard: &Shard, n: u32, fd: OwnedFd) {
    if get(&shard.counters.sockets_current) >= shard.socket_ceiling {
        bump(&shard.counters.accept_refused);
        drop(fd);
        return;
    }
    bump(&shard.counters.sockets_current);
    let transport = shard
        .net
        .borrow()
        .transports
        .get(n as usize)
        .copied()
        .unwrap_or(Transport::Tcp);
    let layer = match transport {
        Transport::Tcp => None,
        t => {
            let tls = t.is_tls().then(|| shard.tls.borrow().clone());
            let made = match tls {
                Some(None) => Err("no TLS settings".to_string()),
                Some(Some(config)) => Layer::new(Some(&config), t.is_ws()),
                None => Layer::new(None, t.is_ws()),
            };
            match made {
                Ok(layer) => Some(Box::new(layer)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start TLS on an accepted socket");
                    return close_socket(shard, fd, &[]);
                }
            }
        }
    };
    start_handshake(shard, fd, layer);
}

/// Accepting on listener `n` failed with `e`. Returns whether accepting may
/// go on at once; otherwise the listener is paused until the next tick.
pub(crate) fn accept_failed(shard: &Shard, n: u32, listener_fd: RawFd, e: &io::Error) -> bool {
    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
        // Out of descriptors: the kernel keeps the connection queued and
        // the listener stays readable, so refuse it explicitly with the
        // spare descriptor (counted).
        bump(&shard.counters.accept_refused);
        let mut net = shard.net.borrow_mut();
        drop(net.spare.take());
        listener::refuse_one(listener_fd);
        net.spare = listener::open_spare();
        if net.spare.is_some() {
            return true;
        }
        // Not one descriptor free (another shard took the one we freed):
        // the listener would stay readable and the loop spin, so stop
        // watching it until the next tick.
        drop(net);
    } else {
        tracing::warn!(shard = shard.id.0, error = %e, "accept failed");
    }
    shard.pause_listener(n, listener_fd);
    false
}

/// A fresh socket. epoll: its CONNECT has often arrived with it, so read
/// once before paying for an epoll registration. io_uring: a one-shot recv
/// (not a multishot one: the socket may move to another shard after its
/// CONNECT, with nothing armed on it here).
fn start_handshake(shard: &Shard, fd: OwnedFd, layer: Option<Box<Layer>>) {
    let layered = layer.is_some();
    let mut pending = Pending {
        fd,
        buf: BytesMut::new(),
        registered: false,
        layer,
        accepted: Instant::now(),
    };
    if let Io::Uring(ring) = &shard.io {
        let raw = pending.fd.as_raw_fd();
        pending.registered = true;
        let (index, generation) = shard.add_pending(pending);
        ring.borrow_mut()
            .recv_once(raw, Token::Pending { index, generation }.encode());
        return;
    }
    if layered {
        // Its bytes go through the layer first: the general path (its
        // first read often holds a whole ClientHello or upgrade request).
        let (index, generation) = shard.add_pending(pending);
        return pending_ready(shard, index, generation);
    }
    match recv_into(shard, pending.fd.as_raw_fd(), &mut pending.buf) {
        Ok(0) => return close_socket(shard, pending.fd, &[]),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => return close_socket(shard, pending.fd, &[]),
    }
    match handshake::read_first_packet(&mut pending.buf, shard.config.max_packet_size) {
        FirstPacket::Incomplete => {
            let raw = pending.fd.as_raw_fd();
            let (index, generation) = shard.add_pending(pending);
            let token = Token::Pending { index, generation }.encode();
            let Io::Epoll(epoll) = &shard.io else {
                unreachable!("io_uring returned above")
            };
            let mut net = shard.net.borrow_mut();
            if epoll.add(raw, READ, token).is_ok() {
                if let Some(p) = net.pending_mut(index, generation) {
                    p.registered = true;
                }
            } else if let Some(p) = net.take_pending(index, generation) {
                drop(net);
                close_socket(shard, p.fd, &[]);
            }
        }
        other => first_packet(shard, pending, other),
    }
}

/// What one read of a handshake socket gave.
pub(crate) enum PendingRead<'a> {
    /// Bytes.
    Data(&'a [u8]),
    /// Nothing yet (epoll: the read would block).
    Nothing,
    /// EOF or an error: the socket is done.
    Closed,
}

fn pending_ready(shard: &Shard, index: u32, generation: u32) {
    let Some(raw) = shard
        .net
        .borrow_mut()
        .pending_mut(index, generation)
        .map(|p| p.fd.as_raw_fd())
    else {
        return;
    };
    let mut scratch = BytesMut::new();
    let read = match recv_into(shard, raw, &mut scratch) {
        Ok(0) => PendingRead::Closed,
        Ok(_) => PendingRead::Data(&scratch),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => PendingRead::Nothing,
        Err(_) => PendingRead::Closed,
    };
    pending_input(shard, index, generation, read);
}

/// Feeds what a handshake socket sent (either loop) to the CONNECT reader:
/// waits for more, closes, or goes on to [`first_packet`].
pub(crate) fn pending_input(shard: &Shard, index: u32, generation: u32, read: PendingRead<'_>) {
    let mut net = shard.net.borrow_mut();
    let Some(p) = net.pending_mut(index, generation) else {
        return;
    };
    let first = match read {
        PendingRead::Closed => None,
        PendingRead::Nothing => Some(FirstPacket::Incomplete),
        PendingRead::Data(bytes) => match p.layer.as_mut() {
            None => {
                p.buf.extend_from_slice(bytes);
                Some(handshake::read_first_packet(
                    &mut p.buf,
                    shard.config.max_packet_size,
                ))
            }
            Some(layer) => {
                let result = layer.input(bytes, &mut p.buf, &shard.ws_rules);
                // The handshake's answers go now, straight to the socket:
                // a few KiB into an empty send buffer.
                let answered = send_layer_out(shard, p.fd.as_raw_fd(), layer);
                match result {
                    Ok(progress) => {
                        shard.count_layer_progress(progress);
                        if !answered {
                            None
                        } else if layer.is_handshaking() {
                            Some(FirstPacket::Incomplete)
                        } else {
                            Some(handshake::read_first_packet(
                                &mut p.buf,
                                shard.config.max_packet_size,
                            ))
                        }
                    }
                    Err(fail) => {
                        shard.count_layer_failure(&fail);
                        None
                    }
                }
            }
        },
    };
    match first {
        Some(FirstPacket::Incomplete) => match &shard.io {
            Io::Uring(ring) => {
                // The last recv has completed: the next one.
                p.registered = true;
                let raw = p.fd.as_raw_fd();
                ring.borrow_mut()
                    .recv_once(raw, Token::Pending { index, generation }.encode());
            }
            Io::Epoll(epoll) if !p.registered => {
                // A layered socket's first read (see start_handshake).
                let token = Token::Pending { index, generation }.encode();
                if epoll.add(p.fd.as_raw_fd(), READ, token).is_ok() {
                    p.registered = true;
                } else {
                    let p = net.take_pending(index, generation).expect("found above");
                    drop(net);
                    close_socket(shard, p.fd, &[]);
                }
            }
            Io::Epoll(_) => {}
        },
        None => {
            // Closed or failed before a whole CONNECT.
            let p = net.take_pending(index, generation).expect("found above");
            drop(net);
            close_socket(shard, p.fd, &[]);
        }
        Some(other) => {
            let p = net.take_pending(index, generation).expect("found above");
            drop(net);
            first_packet(shard, p, other);
        }
    }
}

/// Sends what a layer has to say from a socket that has no connection yet
/// (its handshake answers, an HTTP error, a refusal): whole or not at all.
/// False when the socket did not take all of it.
fn send_layer_out(shard: &Shard, fd: RawFd, layer: &mut Layer) -> bool {
    if !layer.has_output() {
        return true;
    }
    let out = std::mem::take(&mut layer.out);
    matches!(send_some(shard, fd, &out), Ok(n) if n == out.len())
}

/// Closes a socket this shard counted. epoll: now. io_uring: as an SQE,
/// after cancelling the operations still armed on it, named by their
/// tokens (a recv or a send in flight holds the socket open). By token, not
/// by descriptor: the kernel finds a token in its hash table, but a
/// descriptor only by walking every armed operation, which made closing
/// 19,000 connections quadratic (5.5 s of CPU, measured).
fn close_socket(shard: &Shard, fd: OwnedFd, armed: &[Token]) {
    match &shard.io {
        Io::Epoll(_) => drop(fd),
        Io::Uring(ring) => {
            let mut ring = ring.borrow_mut();
            for token in armed {
                ring.cancel_linked(token.encode(), Token::Internal.encode());
            }
            ring.close(fd.into_raw_fd(), Token::Internal.encode());
        }
    }
    drop_one(&shard.counters.sockets_current);
}

/// The operation armed on a handshake socket: its recv, if in flight.
fn pending_armed(p: &Pending, index: u32, generation: u32) -> Option<Token> {
    p.registered.then_some(Token::Pending { index, generation })
}

/// The 3.x return code whose counter a CONNACK code is tallied under (5.0
/// reason codes by their 3.1.1 counterpart); `None` for a malformed or
/// protocol-error CONNECT, which `malformed` already counts.
fn connack_counter(version: ProtocolVersion, code: u8) -> Option<usize> {
    if !version.is_v5() {
        return Some(usize::from(code));
    }
    match code {
        reason::UNSUPPORTED_PROTOCOL_VERSION => Some(1),
        reason::CLIENT_IDENTIFIER_NOT_VALID => Some(2),
        reason::SERVER_UNAVAILABLE | reason::SERVER_BUSY | reason::QUOTA_EXCEEDED => Some(3),
        reason::BAD_USER_NAME_OR_PASSWORD => Some(4),
        reason::NOT_AUTHORIZED | reason::BAD_AUTHENTICATION_METHOD => Some(5),
        _ => None,
    }
}

/// Sends a refusal's CONNACK (best effort: a few bytes into an empty send
/// buffer) and closes. `code` is in `version`'s terms.
fn refuse(
    shard: &Shard,
    fd: OwnedFd,
    layer: Option<Box<Layer>>,
    version: ProtocolVersion,
    code: u8,
) {
    if let Some(i) = connack_counter(version, code) {
        if let Some(counter) = shard.counters.connacks.get(i) {
            bump(counter);
        }
    }
    let connack = connack_bytes(version, false, code);
    match layer {
        None => {
            let _ = send_some(shard, fd.as_raw_fd(), &connack);
        }
        Some(mut layer) => {
            let mut out = BytesMut::new();
            layer.wrap(&connack, &mut out);
            layer.queue_close();
            layer.wrap(&[], &mut out);
            let _ = send_some(shard, fd.as_raw_fd(), &out);
        }
    }
    // Closing a socket with unread input sends RST instead of FIN, and a
    // client that pipelined packets after its CONNECT could then lose the
    // CONNACK that says why: read away what it sent first (a few reads at
    // most; anything sent after the close still gets the RST).
    let mut discard = BytesMut::new();
    for _ in 0..4 {
        discard.clear();
        match recv_into(shard, fd.as_raw_fd(), &mut discard) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    close_socket(shard, fd, &[]);
}

/// The first packet of a socket is whole (or proved not to be a CONNECT).
fn first_packet(shard: &Shard, pending: Pending, first: FirstPacket) {
    let connect = match first {
        FirstPacket::Connect(connect) => connect,
        FirstPacket::Reject {
            connack,
            version,
            error,
        } => {
            bump(&shard.counters.malformed_packets);
            if let HandshakeError::Malformed(e) = error {
                tracing::debug!(error = %e, "malformed first packet");
            }
            match connack {
                Some(code) => refuse(shard, pending.fd, pending.layer, version, code),
                None => close_socket(shard, pending.fd, &[]),
            }
            return;
        }
        FirstPacket::Incomplete => unreachable!("callers handle an incomplete packet"),
    };

    let version = connect.protocol;
    let mut connect = connect;
    // --use-identity-as-username: TLS verified the client's certificate,
    // whose CN is the username; the CONNECT's credentials are not used.
    let identity = match pending.layer.as_ref() {
        Some(layer) if shard.config.use_identity_as_username && layer.is_tls() => {
            Some(layer.peer_common_name())
        }
        _ => None,
    };
    let identity = match identity {
        None => false,
        Some(Some(cn)) => {
            connect.username = Some(cn.into());
            connect.password = None;
            true
        }
        Some(None) => {
            let code = connack_code(version, return_code::NOT_AUTHORIZED);
            return refuse(shard, pending.fd, pending.layer, version, code);
        }
    };
    let auth = shard.auth.borrow().clone();
    let checked = if identity {
        check_connect(&connect, &CertificateIdentity)
    } else {
        check_connect(&connect, auth.as_ref())
    };
    let refusal = checked.err().or_else(|| {
        // At the connection ceiling: 3.x has only "server unavailable";
        // 5.0 says it is a quota (0x97).
        (get(&shard.counters.connections_current) >= shard.connection_ceiling).then_some(
            if version.is_v5() {
                reason::QUOTA_EXCEEDED
            } else {
                return_code::SERVER_UNAVAILABLE
            },
        )
    });
    if let Some(code) = refusal {
        return refuse(shard, pending.fd, pending.layer, version, code);
    }

    let assigned = connect.client_id.is_empty();
    if assigned {
        // MQTT-3.1.3-6: assign a unique id; it is hashed after assignment.
        connect.client_id = assign_client_id(shard.nonce, shard.id, shard.next_serial());
    }
    let owner = owner_of(&connect.client_id, shard.shards);
    if owner == shard.id {
        let registered = pending.registered;
        admit(shard, pending.into_handoff(connect, assigned), registered);
        return;
    }
    if shard.mesh_backlogged_to(owner) {
        // The owner is not keeping up with what we already sent it (its inbox
        // is full and our overflow queue is not empty): refuse rather than
        // queue without bound (CONNACK 3, server unavailable; 5.0: 0x89,
        // server busy).
        let code = if version.is_v5() {
            reason::SERVER_BUSY
        } else {
            connack_code(version, return_code::SERVER_UNAVAILABLE)
        };
        return refuse(shard, pending.fd, pending.layer, version, code);
    }
    match &shard.io {
        Io::Epoll(epoll) if pending.registered => {
            // The descriptor stays open on the owner shard, so closing it
            // will not take it out of this shard's set: do it now.
            let _ = epoll.delete(pending.fd.as_raw_fd());
        }
        // io_uring: the handshake's one-shot recv has completed; nothing
        // is armed on the socket here.
        _ => {}
    }
    // The owner counts the socket from its arrival there.
    drop_one(&shard.counters.sockets_current);
    shard.send_to(
        owner,
        MeshMsg::Handoff(pending.into_handoff(connect, assigned)),
    );
}

/// A connection handed over by the shard that accepted it.
pub(crate) fn accept_handoff(shard: &Shard, handoff: Handoff) {
    bump(&shard.counters.sockets_current);
    admit(shard, handoff, false);
}

/// Registers a CONNECT this shard owns with the broker (takeover, session,
/// CONNACK) and starts watching its socket (`registered`: epoll has it in
/// its set already). `conn` is the socket and its CONNECT, accepted here or
/// handed over by the shard that accepted it. In a cluster the node must
/// first hold the client's session ([`ClusterMsg::Claim`]): the CONNECT
/// waits, its socket unwatched, for the link's answer.
fn admit(shard: &Shard, conn: Handoff, registered: bool) {
    let Some(link) = shard.link else {
        return admit_now(shard, conn, registered);
    };
    // A client this shard claimed before and no node took since: no
    // cluster-wide read or write, and no trip to the link (a kick clears
    // the entry, through this shard, before it closes the session).
    let digest = crate::cluster::client_digest(&conn.connect.client_id);
    if let Some(c) = &shard.counters.cluster {
        if get(&c.registry_up) == 1 && shard.claimed.borrow().contains(&digest) {
            bump(&c.claims_remembered);
            return admit_now(shard, conn, registered);
        }
    }
    if registered {
        if let Io::Epoll(epoll) = &shard.io {
            let _ = epoll.delete(conn.fd.as_raw_fd());
        }
    }
    let ticket = shard.next_serial();
    let claim = ClusterMsg::Claim {
        from: shard.id,
        ticket,
        client_id: ByteString::from(String::from(&*conn.connect.client_id)),
        clean_start: conn.connect.clean_start,
    };
    shard.claims.borrow_mut().insert(ticket, conn);
    shard.send_to(link, MeshMsg::Cluster(claim));
}

/// The cluster link's answer to a claim, or a kick from another node.
pub(crate) fn cluster_msg(shard: &Shard, msg: ClusterMsg) {
    match msg {
        ClusterMsg::Claimed { ticket, outcome } => {
            let Some(conn) = shard.claims.borrow_mut().remove(&ticket) else {
                return;
            };
            match outcome {
                Ok(session) => {
                    let digest = crate::cluster::client_digest(&conn.connect.client_id);
                    shard.claimed.borrow_mut().insert(digest);
                    if let Some(records) = session {
                        let now = shard.now();
                        shard.broker.borrow_mut().import_session(&records, now);
                        shard.dispatch();
                    }
                    admit_now(shard, conn, false);
                }
                Err(()) => {
                    // No quorum to say this node may hold the session: refuse
                    // rather than risk two (CONNACK 3; 5.0: 0x88).
                    let version = conn.connect.protocol;
                    let code = connack_code(version, return_code::SERVER_UNAVAILABLE);
                    refuse(shard, conn.fd, conn.layer, version, code);
                }
            }
        }
        ClusterMsg::Kick {
            client_id,
            export,
            ticket,
        } => {
            shard
                .claimed
                .borrow_mut()
                .remove(&crate::cluster::client_digest(&client_id));
            let now = shard.now();
            let session = shard.broker.borrow_mut().kick(&client_id, export, now);
            shard.dispatch();
            if let Some(link) = shard.link {
                let session = session.map(BytesMut::freeze);
                shard.send_to(
                    link,
                    MeshMsg::Cluster(ClusterMsg::Kicked { ticket, session }),
                );
            }
        }
        ClusterMsg::LostWill(encoded) => {
            let Some(NodeMsg::Publish(p)) = NodeMsg::decode(&encoded) else {
                return;
            };
            let will = LastWill {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties: p.props.map(|props| Box::new((*props).clone())),
            };
            let now = shard.now();
            shard.broker.borrow_mut().publish_lost_will(will, now);
            shard.dispatch();
        }
        // For the link.
        ClusterMsg::Claim { .. }
        | ClusterMsg::Kicked { .. }
        | ClusterMsg::WillSet { .. }
        | ClusterMsg::WillClear { .. } => {}
    }
}

fn admit_now(shard: &Shard, conn: Handoff, registered: bool) {
    let Handoff {
        fd,
        connect,
        assigned,
        mut rest,
        layer,
        accepted,
    } = conn;
    let connect = *connect;
    let now = shard.now();
    // In a cluster a will is kept on the NATS side too, so that another
    // node publishes it if this one dies with the connection open.
    let cluster_will = shard.link.and_then(|_| {
        let w = connect.will.as_ref()?;
        let mut props = w.properties.as_deref().cloned();
        if let Some(p) = props.as_mut() {
            // The rest are PUBLISH properties; the delay is not kept.
            p.will_delay_interval = None;
        }
        let publish = NodeMsg::Publish(NodePublish {
            topic: w.topic.clone(),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            props: props.map(std::sync::Arc::new),
            expires_in_ms: None,
            shares: Vec::new(),
        });
        Some((ByteString::from(&*connect.client_id), publish.encode()))
    });
    let id = shard
        .broker
        .borrow_mut()
        .connect_assigned(connect, assigned, now);
    shard
        .counters
        .connack_latency
        .observe_us(accepted.elapsed().as_micros() as u64);
    let raw = fd.as_raw_fd();
    let token = Token::Conn(id).encode();
    let watched = match &shard.io {
        Io::Epoll(epoll) if registered => epoll.modify(raw, READ, token),
        Io::Epoll(epoll) => epoll.add(raw, READ, token),
        Io::Uring(_) => Ok(()),
    };
    shard.net.borrow_mut().insert_sock(id, fd, layer);
    if let Io::Uring(ring) = &shard.io {
        // Armed once for the connection's life (re-armed only when the
        // buffer ring ran dry or reading was paused).
        ring.borrow_mut().recv_multi(raw, token);
        if let Some(sock) = shard.net.borrow_mut().sock_mut(id) {
            sock.recv = Recv::Armed;
        }
    }
    if watched.is_err() {
        shard.lost(id);
    } else if !rest.is_empty() {
        shard.feed(id, &mut rest);
    }
    shard.dispatch();
    // After the dispatch: a connection this CONNECT took over (same
    // clientId, same shard) has cleared its will by now, and this one's
    // must come after that clear, not before.
    if let (Some((client_id, will)), Some(link)) = (cluster_will, shard.link) {
        if !shard.broker.borrow().is_closing(id) {
            shard
                .cluster_wills
                .borrow_mut()
                .insert(id, client_id.clone());
            shard.send_to(
                link,
                MeshMsg::Cluster(ClusterMsg::WillSet { client_id, will }),
            );
        }
    }
    shard.pause_reading_if_backlogged(id);
}

impl Shard {
    /// Feeds bytes read from `id`'s socket to the broker, keeping a partial
    /// packet for the next read.
    fn feed(&self, id: ConnId, buf: &mut BytesMut) {
        let now = self.now();
        self.broker.borrow_mut().handle_read(id, buf, now);
        if !buf.is_empty() {
            if let Some(sock) = self.net.borrow_mut().sock_mut(id) {
                sock.bufs().partial = std::mem::take(buf);
            }
        }
    }

    /// The partial packet `id` left (or an empty buffer) to read into, and
    /// its descriptor; `None` when it is gone or closing (nothing a client
    /// sends after its close counts, MQTT-3.14.4-2).
    pub(crate) fn read_buf(&self, id: ConnId) -> Option<(RawFd, BytesMut)> {
        let mut net = self.net.borrow_mut();
        let sock = net.sock_mut(id)?;
        if sock.closing {
            return None;
        }
        let buf = match sock.bufs.as_mut() {
            Some(b) => std::mem::take(&mut b.partial),
            None => BytesMut::new(),
        };
        sock.release_empty_bufs();
        Some((sock.fd.as_raw_fd(), buf))
    }

    /// Bytes read from `id` (either loop), appended to its partial packet:
    /// to the broker, then carry out what it asked for.
    pub(crate) fn conn_read(&self, id: ConnId, mut buf: BytesMut) {
        self.feed(id, &mut buf);
        self.dispatch();
        self.pause_reading_if_backlogged(id);
    }

    fn read_ready(&self, id: ConnId) {
        if self.held_and_full(id) {
            // Paused for full queues, maybe by another shard's answer
            // (no read of ours narrowed its interest then): narrowed now,
            // and only a reset is looked for, so that neither its data
            // nor a hang-up makes a level-triggered event repeat.
            self.pause_reading_if_backlogged(id);
            return self.check_held_socket(id);
        }
        let half_closed = self
            .net
            .borrow_mut()
            .sock_mut(id)
            .filter(|s| s.half_closed)
            .map(|s| s.fd.as_raw_fd());
        if let Some(raw) = half_closed {
            // What a client we closed still sends is read away; its FIN
            // (or an error) ends the wait.
            let mut away = BytesMut::new();
            let read = recv_into(self, raw, &mut away);
            let ended = match &read {
                Ok(0) => true,
                Ok(n) => !self.drained(id, *n),
                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            };
            if ended {
                self.finish_close(id);
            }
            return;
        }
        if self.is_layered(id) {
            let Some(raw) = self.net.borrow_mut().sock_mut(id).map(|s| s.fd.as_raw_fd()) else {
                return;
            };
            let mut wire = BytesMut::new();
            let read = recv_into(self, raw, &mut wire);
            match read {
                Ok(0) => self.lost(id),
                Ok(_) => return self.layered_read(id, &wire),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.lost(id),
            }
            return self.dispatch();
        }
        let Some((raw, mut buf)) = self.read_buf(id) else {
            return;
        };
        match recv_into(self, raw, &mut buf) {
            Ok(0) => self.lost(id),
            Ok(_) => return self.conn_read(id, buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !buf.is_empty() {
                    if let Some(sock) = self.net.borrow_mut().sock_mut(id) {
                        sock.bufs().partial = buf;
                    }
                }
            }
            Err(_) => self.lost(id),
        }
        self.dispatch();
    }

    /// `n` bytes read away from `id`, half-closed: false when that was more
    /// than its linger allows (the caller closes it now). WebSocket
    /// connections have no limit but their deadline.
    pub(crate) fn drained(&self, id: ConnId, n: usize) -> bool {
        let mut net = self.net.borrow_mut();
        match net.linger_budget.get_mut(&id) {
            Some(left) if *left >= n => {
                *left -= n;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// io_uring: `n` bytes came for `id` while it is closing. Read away
    /// (they count for nothing, MQTT-3.14.4-2); a half-closed connection
    /// past its linger allowance is closed now.
    pub(crate) fn closing_read(&self, id: ConnId, n: usize) {
        let half_closed = self
            .net
            .borrow_mut()
            .sock_mut(id)
            .is_some_and(|s| s.closing && s.half_closed);
        if half_closed && !self.drained(id, n) {
            self.finish_close(id);
        }
    }

    /// Whether `id` has a TLS or WebSocket layer.
    pub(crate) fn is_layered(&self, id: ConnId) -> bool {
        self.net
            .borrow_mut()
            .sock_mut(id)
            .is_some_and(|s| s.layer.is_some())
    }

    /// Bytes read from a layered connection (either loop): through its
    /// layer, then the MQTT bytes in them to the broker; what the layer
    /// answers (a pong, TLS records) goes with the next write.
    pub(crate) fn layered_read(&self, id: ConnId, wire: &[u8]) {
        let Some((_, mut buf)) = self.read_buf(id) else {
            // Closing: read away, within its linger allowance.
            return self.closing_read(id, wire.len());
        };
        let result = {
            let mut net = self.net.borrow_mut();
            let Some(layer) = net.sock_mut(id).and_then(|s| s.layer.as_mut()) else {
                return;
            };
            layer.input(wire, &mut buf, &self.ws_rules)
        };
        match result {
            Ok(progress) => {
                self.count_layer_progress(progress);
                if !buf.is_empty() {
                    self.feed(id, &mut buf);
                }
                self.transmit(id);
                self.dispatch();
                self.pause_reading_if_backlogged(id);
            }
            Err(fail) => {
                self.count_layer_failure(&fail);
                // What came before the end counts (a DISCONNECT, say).
                if !buf.is_empty() {
                    self.feed(id, &mut buf);
                    self.dispatch();
                }
                // The layer's last words (a close frame, an alert), best
                // effort, then the socket goes: without a DISCONNECT, the
                // will is published.
                let mut net = self.net.borrow_mut();
                if let Some(sock) = net.sock_mut(id) {
                    let fd = sock.fd.as_raw_fd();
                    if let (false, Some(layer)) = (sock.writing, sock.layer.as_mut()) {
                        send_layer_out(self, fd, layer);
                    }
                }
                drop(net);
                self.lost(id);
                self.dispatch();
            }
        }
    }

    /// Counts what a layer completed.
    fn count_layer_progress(&self, progress: Progress) {
        if let Some(resumed) = progress.tls_handshake {
            bump(&self.counters.tls_handshakes);
            if resumed {
                bump(&self.counters.tls_resumed);
            }
        }
        if progress.ws_upgraded {
            bump(&self.counters.ws_upgrades);
        }
    }

    /// Counts why a layer ended a connection.
    fn count_layer_failure(&self, fail: &Fail) {
        match fail {
            Fail::TlsHandshake(why) => {
                bump(&self.counters.tls_handshake_failures);
                tracing::debug!(error = %why, "TLS handshake failed");
            }
            Fail::Tls(why) => tracing::debug!(error = %why, "TLS failed"),
            Fail::WsUpgrade(status) => {
                bump(&self.counters.ws_upgrade_failures);
                tracing::debug!(status, "WebSocket upgrade refused");
            }
            Fail::WsProtocol(what) => {
                bump(&self.counters.malformed_packets);
                tracing::debug!(what, "WebSocket protocol error");
            }
            Fail::PeerClosed => {}
        }
    }

    /// Whether `id` is no longer read for full queues: a publish of its
    /// waits ([`Broker::reads_held`](crate::proto::broker::Broker::reads_held))
    /// and it has [`HELD_UNREAD_CAP`] bytes unread. Below that it is still
    /// read, so that its acknowledgements and PINGREQs reach the broker,
    /// which takes them out of the unread bytes.
    fn held_and_full(&self, id: ConnId) -> bool {
        self.broker.borrow().reads_held(id)
            && self.net.borrow_mut().sock_mut(id).is_some_and(|s| {
                s.bufs
                    .as_ref()
                    .is_some_and(|b| b.partial.len() >= HELD_UNREAD_CAP)
            })
    }

    /// epoll: an event on a connection whose reads are held. Its data
    /// waits; a reset or error ends it.
    fn check_held_socket(&self, id: ConnId) {
        let Some(raw) = self.net.borrow_mut().sock_mut(id).map(|s| s.fd.as_raw_fd()) else {
            return;
        };
        let mut byte = [0u8; 1];
        // SAFETY: a one-byte peek into a local buffer, on a descriptor we own.
        let n = unsafe {
            libc::recv(
                raw,
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let would_block = n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
        if n == 0 || (n < 0 && !would_block) {
            self.lost(id);
            self.dispatch();
        }
    }

    /// The broker let `id` be read again (its publishes no longer wait
    /// for full queues): the bytes it left unread go first, then its
    /// socket is read again.
    pub(crate) fn resume_held_reads(&self, id: ConnId) {
        if let Some((_, mut buf)) = self.read_buf(id) {
            if !buf.is_empty() {
                self.feed(id, &mut buf);
            }
        }
        if self.held_and_full(id) {
            return;
        }
        match &self.io {
            Io::Epoll(epoll) => {
                let mut net = self.net.borrow_mut();
                let Some(sock) = net.sock_mut(id) else { return };
                if sock.closing {
                    return;
                }
                let interest = if sock.writing { READ_WRITE } else { READ };
                let _ = epoll.modify(sock.fd.as_raw_fd(), interest, Token::Conn(id).encode());
            }
            Io::Uring(_) => self.resume_reading(id),
        }
        self.pause_reading_if_backlogged(id);
    }

    /// Stops reading a client whose replies pile up because it does not read
    /// them (a PINGREQ or QoS 1 PUBLISH flood from a client that never takes
    /// its PINGRESPs or PUBACKs): what it owes us waits in its own socket
    /// buffers, and our memory for it stays under
    /// [`MAX_PENDING_OUTGOING`] plus one read's replies. Reading resumes
    /// when the socket drains ([`Shard::write_ready`], or
    /// [`Shard::send_done`] on io_uring, which cancels the connection's
    /// recv here and arms it again then).
    ///
    /// Also stops reading a client whose reads the broker holds because a
    /// publish of its waits for full queues (`--queue-full backpressure`),
    /// once it has left [`HELD_UNREAD_CAP`] bytes unread: until
    /// [`Shard::resume_held_reads`], what it sends waits in the socket, and
    /// the kernel's window slows it.
    pub(crate) fn pause_reading_if_backlogged(&self, id: ConnId) {
        let held = self.broker.borrow().reads_held(id);
        let broker_bytes = self.broker.borrow().outgoing_len(id);
        let mut net = self.net.borrow_mut();
        let Some(sock) = net.sock_mut(id) else { return };
        if sock.closing {
            return;
        }
        let held = held
            && sock
                .bufs
                .as_ref()
                .is_some_and(|b| b.partial.len() >= HELD_UNREAD_CAP);
        let unsent = sock.bufs.as_ref().map_or(0, |b| b.unsent.len());
        let backlogged = sock.writing && broker_bytes + unsent > MAX_PENDING_OUTGOING;
        if !backlogged && !held {
            return;
        }
        let raw = sock.fd.as_raw_fd();
        match &self.io {
            Io::Epoll(epoll) => {
                let interest = if sock.writing {
                    libc::EPOLLOUT as u32
                } else {
                    0
                };
                let _ = epoll.modify(raw, interest, Token::Conn(id).encode());
            }
            Io::Uring(ring) => {
                if sock.recv != Recv::Armed {
                    return;
                }
                sock.recv = Recv::Cancelling;
                ring.borrow_mut()
                    .cancel(Token::Conn(id).encode(), Token::Internal.encode());
            }
        }
        drop(net);
        if backlogged {
            bump(&self.counters.reads_paused);
        }
    }

    /// io_uring: arms `id`'s multishot recv again if nothing is armed and
    /// it should read: not closing, not paused for a backlog.
    pub(crate) fn resume_reading(&self, id: ConnId) {
        let Io::Uring(ring) = &self.io else { return };
        if self.held_and_full(id) {
            return;
        }
        let mut net = self.net.borrow_mut();
        let Some(sock) = net.sock_mut(id) else { return };
        if sock.recv != Recv::Off || sock.closing {
            return;
        }
        if sock.writing {
            let unsent = sock.bufs.as_ref().map_or(0, |b| b.unsent.len());
            if self.broker.borrow().outgoing_len(id) + unsent > MAX_PENDING_OUTGOING {
                return;
            }
        }
        sock.recv = Recv::Armed;
        ring.borrow_mut()
            .recv_multi(sock.fd.as_raw_fd(), Token::Conn(id).encode());
    }

    /// io_uring: `id`'s multishot recv ended (EOF, error, cancel, an empty
    /// buffer ring, or the kernel's own limit): what to do about it.
    pub(crate) fn recv_ended(&self, id: ConnId, result: i32) {
        {
            let mut net = self.net.borrow_mut();
            let Some(sock) = net.sock_mut(id) else { return };
            sock.recv = Recv::Off;
            if sock.closing && sock.half_closed && result != -libc::ENOBUFS {
                // The WebSocket client's FIN (or an error): done waiting.
                drop(net);
                self.finish_close(id);
                return;
            }
            if sock.closing {
                // Only draining what it was sent; nothing more is read.
                return;
            }
            if result == -libc::ENOBUFS {
                // The bytes wait in the socket; re-armed once the turn's
                // buffers are back.
                net.rearm.push(Token::Conn(id));
                bump(&self.counters.ring_empty);
                return;
            }
        }
        if result == 0 || (result < 0 && result != -libc::ECANCELED) {
            // EOF or a socket error.
            self.lost(id);
            self.dispatch();
        } else {
            // A paused read's cancel, or a multishot the kernel ended.
            self.resume_reading(id);
        }
    }

    /// Shrinks the buffer ring once the bursts that grew it have stopped
    /// (see [`super::uring::Uring::trim`]); called every
    /// [`super::RING_TRIM_TICKS`] ticks.
    pub(crate) fn trim_ring(&self) {
        let Io::Uring(ring) = &self.io else { return };
        let before = ring.borrow().buffers();
        if let Some(buffers) = ring.borrow_mut().trim() {
            self.ring_resized(before, buffers);
        }
    }

    /// Moves the `coremq_ring_buffers` gauge by the change of this shard's
    /// ring from `before` to `after` buffers.
    fn ring_resized(&self, before: u16, after: u16) {
        let gauge = &self.counters.ring_buffers;
        let ordering = std::sync::atomic::Ordering::Relaxed;
        if after > before {
            gauge.fetch_add(u64::from(after - before), ordering);
        } else {
            gauge.fetch_sub(u64::from(before - after), ordering);
        }
        tracing::debug!(
            shard = self.id.0,
            before,
            after,
            "io_uring buffer ring resized"
        );
    }

    /// Re-arms the recvs the buffer ring ran dry for (after the turn gave
    /// its buffers back), and doubles the buffers in the ring for the next
    /// burst.
    pub(crate) fn rearm_recvs(&self) {
        let Io::Uring(ring) = &self.io else { return };
        let rearm = std::mem::take(&mut self.net.borrow_mut().rearm);
        if rearm.is_empty() {
            return;
        }
        let before = ring.borrow().buffers();
        if let Some(buffers) = ring.borrow_mut().ran_dry() {
            self.ring_resized(before, buffers);
        }
        for token in rearm {
            match token {
                Token::Conn(id) => self.resume_reading(id),
                Token::Pending { index, generation } => {
                    let mut net = self.net.borrow_mut();
                    if let Some(p) = net.pending_mut(index, generation) {
                        if !p.registered {
                            p.registered = true;
                            ring.borrow_mut()
                                .recv_once(p.fd.as_raw_fd(), token.encode());
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn write_ready(&self, id: ConnId) {
        let Io::Epoll(epoll) = &self.io else { return };
        let held = self.held_and_full(id);
        let flushed = {
            let mut net = self.net.borrow_mut();
            let Some(sock) = net.sock_mut(id) else { return };
            if !sock.writing {
                return;
            }
            let raw = sock.fd.as_raw_fd();
            let bufs = sock.bufs();
            match send_some(self, raw, &bufs.unsent) {
                Ok(n) => {
                    bufs.unsent.advance(n);
                    if bufs.unsent.is_empty() {
                        sock.writing = false;
                        sock.release_empty_bufs();
                        if !sock.closing {
                            let interest = if held { 0 } else { READ };
                            let _ = epoll.modify(raw, interest, Token::Conn(id).encode());
                        }
                        Ok(true)
                    } else {
                        Ok(false)
                    }
                }
                Err(e) => Err(e),
            }
        };
        match flushed {
            // Drained: what the broker queued meanwhile goes next.
            Ok(true) => self.transmit(id),
            Ok(false) => {}
            Err(_) => self.lost(id),
        }
        self.dispatch();
    }

    /// Writes what the broker has for `id`. epoll: a socket that takes only
    /// part of it keeps the rest and is watched for room. io_uring: the
    /// bytes go to the kernel as one send, kept until its completion. Until
    /// the socket drains, new bytes stay in the broker, which bounds them
    /// (and drops QoS 0 for a stuck subscriber).
    pub(crate) fn transmit(&self, id: ConnId) {
        let raw = {
            let mut net = self.net.borrow_mut();
            let Some(sock) = net.sock_mut(id) else { return };
            if sock.writing {
                return;
            }
            sock.fd.as_raw_fd()
        };
        let out = self.broker.borrow_mut().take_outgoing(id);
        let closing = self.broker.borrow().is_closing(id);
        let held = self.held_and_full(id);
        let out = self.through_layer(id, out, closing);
        if !out.is_empty() {
            let sent = match &self.io {
                Io::Epoll(_) => send_some(self, raw, &out),
                // Nothing went yet: the whole of it goes to the ring below.
                Io::Uring(_) => Ok(0),
            };
            match sent {
                Ok(n) if n == out.len() => {}
                Ok(n) => {
                    let mut net = self.net.borrow_mut();
                    let sock = net.sock_mut(id).expect("looked up above");
                    let mut out = out;
                    out.advance(n);
                    sock.writing = true;
                    match &self.io {
                        Io::Epoll(epoll) => {
                            let interest = if sock.closing || closing || held {
                                libc::EPOLLOUT as u32
                            } else {
                                READ_WRITE
                            };
                            let _ = epoll.modify(raw, interest, Token::Conn(id).encode());
                            sock.bufs().unsent = out;
                        }
                        Io::Uring(ring) => {
                            sock.bufs().unsent = out;
                            submit_unsent(ring, id, sock);
                        }
                    }
                    if sock.closing {
                        let deadline = Millis(self.now().0 + CLOSE_LINGER_MS);
                        net.close_deadlines.push_back((id, deadline));
                    }
                    return;
                }
                Err(_) => return self.lost(id),
            }
        }
        if self
            .net
            .borrow_mut()
            .sock_mut(id)
            .is_some_and(|s| s.closing)
            && !self.half_close(id)
        {
            self.finish_close(id);
        }
    }

    /// A connection we closed, all written: shuts down our side (FIN after
    /// the last bytes) and waits, reading away what comes, for the client's
    /// FIN, at most [`CLOSE_LINGER_MS`]. For WebSocket always (the client's
    /// close frame, RFC 6455 §7.1.1); for the rest when the broker closed a
    /// client that may still be sending (see `Broker::lingers`). False when
    /// there is nothing to wait for, or it is waiting already: close now.
    fn half_close(&self, id: ConnId) -> bool {
        let lingers = self.broker.borrow().lingers(id);
        let mut net = self.net.borrow_mut();
        let Some(sock) = net.sock_mut(id) else {
            return false;
        };
        let ws = sock.layer.as_ref().is_some_and(|l| l.is_ws());
        if sock.half_closed || !(ws || lingers) {
            return false;
        }
        sock.half_closed = true;
        let raw = sock.fd.as_raw_fd();
        // SAFETY: shutdown of a descriptor we own.
        unsafe { libc::shutdown(raw, libc::SHUT_WR) };
        match &self.io {
            Io::Epoll(epoll) => {
                let _ = epoll.modify(raw, READ, Token::Conn(id).encode());
            }
            Io::Uring(ring) => {
                if sock.recv == Recv::Off {
                    sock.recv = Recv::Armed;
                    ring.borrow_mut().recv_multi(raw, Token::Conn(id).encode());
                }
            }
        }
        if !ws {
            net.linger_budget.insert(id, LINGER_DRAIN_BYTES);
        }
        let deadline = Millis(self.now().0 + CLOSE_LINGER_MS);
        net.close_deadlines.push_back((id, deadline));
        true
    }

    /// The bytes for `id`'s socket: `out` itself, or, on a layered
    /// connection, what the layer had to say and `out` framed and
    /// encrypted, then the layer's close when the connection is closing.
    fn through_layer(&self, id: ConnId, out: BytesMut, closing: bool) -> BytesMut {
        let mut net = self.net.borrow_mut();
        let Some(sock) = net.sock_mut(id) else {
            return out;
        };
        let closing = closing || sock.closing;
        let Some(layer) = sock.layer.as_mut() else {
            return out;
        };
        let mut wire = BytesMut::new();
        layer.wrap(&out, &mut wire);
        if closing {
            layer.queue_close();
            layer.wrap(&[], &mut wire);
        }
        wire
    }

    /// io_uring: the send of `token_id` (a truncated generation) completed
    /// with `result`: continue a partial send, or take the next bytes, or
    /// free the buffer of a connection that has gone meanwhile.
    pub(crate) fn send_done(&self, token_id: ConnId, result: i32) {
        let Io::Uring(ring) = &self.io else { return };
        let mut net = self.net.borrow_mut();
        let live = net
            .resolve(token_id.index, token_id.generation)
            .filter(|id| net.sock_mut(*id).is_some_and(|s| s.writing));
        let Some(id) = live else {
            net.orphaned_sends.remove(&orphan_key(token_id));
            return;
        };
        if result < 0 {
            drop(net);
            self.lost(id);
            self.dispatch();
            return;
        }
        self.bytes_out.set(self.bytes_out.get() + result as u64);
        let sock = net.sock_mut(id).expect("resolved above");
        let unsent = &mut sock.bufs().unsent;
        unsent.advance((result as usize).min(unsent.len()));
        if !unsent.is_empty() {
            // The rest of the same buffer.
            submit_unsent(ring, id, sock);
            return;
        }
        sock.writing = false;
        sock.release_empty_bufs();
        drop(net);
        // Drained: reading resumes if it was paused, and what the broker
        // queued meanwhile goes next (or the close it was waiting for).
        self.resume_reading(id);
        self.transmit(id);
        self.dispatch();
    }

    /// The broker closed `id`: write what is pending, then close the socket
    /// and free the broker's slot.
    pub(crate) fn close_conn(&self, id: ConnId) {
        if let Some(client_id) = self.cluster_wills.borrow_mut().remove(&id) {
            if let Some(link) = self.link {
                self.send_to(link, MeshMsg::Cluster(ClusterMsg::WillClear { client_id }));
            }
        }
        {
            let mut net = self.net.borrow_mut();
            let Some(sock) = net.sock_mut(id) else {
                // No socket (it failed first): just free the slot.
                drop(net);
                self.broker.borrow_mut().release(id);
                return;
            };
            if sock.closing {
                return;
            }
            sock.closing = true;
            if sock.writing {
                // Wait for room, and no longer read: nothing a client sends
                // after its close counts (MQTT-3.14.4-2). io_uring: the send
                // in flight goes on; what the recv still brings is ignored.
                if let Io::Epoll(epoll) = &self.io {
                    let raw = sock.fd.as_raw_fd();
                    let _ = epoll.modify(raw, libc::EPOLLOUT as u32, Token::Conn(id).encode());
                }
                let deadline = Millis(self.now().0 + CLOSE_LINGER_MS);
                net.close_deadlines.push_back((id, deadline));
                return;
            }
        }
        // Writes what is left and closes, or waits for room (watched for
        // EPOLLOUT only, with a linger deadline).
        self.transmit(id);
    }

    /// Closes the socket of a connection taken out of the table. epoll:
    /// dropping the descriptor closes the socket (FIN after what we wrote)
    /// and takes it out of the epoll set; an explicit shutdown first would
    /// cost a syscall per connection for nothing. io_uring: a send still in
    /// flight keeps its buffer (in `orphaned_sends`) until it completes, and
    /// whatever is armed is cancelled before the close.
    fn close_sock(&self, id: ConnId, mut sock: Sock) {
        // What is armed, without an allocation on every close: the recv
        // (first) and the send in flight (second).
        let both = [Token::Conn(id), Token::Send(id)];
        let armed: &[Token] = match (sock.recv != Recv::Off, sock.writing) {
            (true, true) => &both,
            (true, false) => &both[..1],
            (false, true) => &both[1..],
            (false, false) => &[],
        };
        if matches!(self.io, Io::Uring(_)) && sock.writing {
            if let Some(bufs) = sock.bufs.take() {
                self.net
                    .borrow_mut()
                    .orphaned_sends
                    .insert(orphan_key(id), bufs);
            }
        }
        close_socket(self, sock.fd, armed);
    }

    /// Closes `id`'s socket and frees its broker slot.
    fn finish_close(&self, id: ConnId) {
        let sock = self.net.borrow_mut().take_sock(id);
        if let Some(sock) = sock {
            self.close_sock(id, sock);
        }
        self.broker.borrow_mut().release(id);
    }

    /// The socket of `id` failed or reached EOF without DISCONNECT: the
    /// broker publishes the will; the socket is closed.
    pub(crate) fn lost(&self, id: ConnId) {
        let sock = self.net.borrow_mut().take_sock(id);
        if let Some(sock) = sock {
            self.close_sock(id, sock);
        }
        let now = self.now();
        self.broker.borrow_mut().connection_lost(id, now);
    }

    /// Listener `n`'s descriptor, while it is open.
    pub(crate) fn listener_fd(&self, n: u32) -> Option<RawFd> {
        self.net
            .borrow()
            .listeners
            .get(n as usize)
            .map(|fd| fd.as_raw_fd())
    }

    /// io_uring: arms listener `n`'s multishot accept unless it is armed,
    /// paused or closed.
    pub(crate) fn arm_accept(&self, n: u32) {
        let Io::Uring(ring) = &self.io else { return };
        let mut net = self.net.borrow_mut();
        if net.paused_listeners.contains(&n) {
            return;
        }
        let Some(fd) = net.listeners.get(n as usize).map(|fd| fd.as_raw_fd()) else {
            return;
        };
        let Some(armed) = net.accepting.get_mut(n as usize) else {
            return;
        };
        if !*armed {
            *armed = true;
            ring.borrow_mut().accept(fd, Token::Listener(n).encode());
        }
    }

    /// io_uring: listener `n`'s multishot accept ended; armed again unless
    /// the listener is paused (the tick re-arms it) or closed.
    pub(crate) fn accept_ended(&self, n: u32) {
        self.net.borrow_mut().set_accepting(n, false);
        self.arm_accept(n);
    }

    /// Adds a handshake socket to the table with its connect deadline.
    fn add_pending(&self, pending: Pending) -> (u32, u32) {
        let deadline = Millis(self.now().0 + self.config.connect_timeout.as_millis() as u64);
        let mut net = self.net.borrow_mut();
        let (index, generation) = net.insert_pending(pending);
        net.connect_deadlines
            .push_back((index, generation, deadline));
        (index, generation)
    }

    /// io_uring: the handshake socket's one-shot recv completed with
    /// `result` (bytes are in `data`).
    pub(crate) fn pending_recv_done(&self, index: u32, generation: u32, result: i32, data: &[u8]) {
        {
            let mut net = self.net.borrow_mut();
            let Some(p) = net.pending_mut(index, generation) else {
                return;
            };
            p.registered = false;
            if result == -libc::ENOBUFS {
                net.rearm.push(Token::Pending { index, generation });
                bump(&self.counters.ring_empty);
                return;
            }
        }
        let read = if result > 0 {
            PendingRead::Data(data)
        } else {
            PendingRead::Closed
        };
        pending_input(self, index, generation, read);
    }

    /// Stops watching listener `n` until the next tick: accept is failing in
    /// a way a retry right away would not fix.
    fn pause_listener(&self, n: u32, fd: RawFd) {
        match &self.io {
            Io::Epoll(epoll) => {
                let _ = epoll.modify(fd, 0, Token::Listener(n).encode());
            }
            Io::Uring(ring) => {
                // A multishot accept that failed has usually ended; if it
                // has not, it is cancelled (its end re-arms nothing while
                // the listener is paused).
                if self.net.borrow().accepting.get(n as usize) == Some(&true) {
                    ring.borrow_mut()
                        .cancel(Token::Listener(n).encode(), Token::Internal.encode());
                }
            }
        }
        self.net.borrow_mut().paused_listeners.push(n);
    }

    /// Watches paused listeners again (each tick).
    pub(crate) fn resume_listeners(&self) {
        let paused = {
            let mut net = self.net.borrow_mut();
            if net.spare.is_none() {
                net.spare = listener::open_spare();
            }
            std::mem::take(&mut net.paused_listeners)
        };
        for n in paused {
            match &self.io {
                Io::Epoll(epoll) => {
                    if let Some(fd) = self.listener_fd(n) {
                        let _ = epoll.modify(fd, READ, Token::Listener(n).encode());
                    }
                }
                Io::Uring(_) => self.arm_accept(n),
            }
        }
    }

    /// Shutdown, first step: stop accepting (closing the listeners refuses
    /// new connections at once) and publish every client's will.
    pub(crate) fn begin_shutdown(&self) {
        let listeners = std::mem::take(&mut self.net.borrow_mut().listeners);
        match &self.io {
            Io::Epoll(_) => drop(listeners),
            Io::Uring(ring) => {
                // The armed accept holds the listener open: cancel it, then
                // close, so the port is free as soon as the ring has run.
                let mut ring = ring.borrow_mut();
                for (n, fd) in listeners.into_iter().enumerate() {
                    let accept = Token::Listener(n as u32).encode();
                    ring.cancel_linked(accept, Token::Internal.encode());
                    ring.close(fd.into_raw_fd(), Token::Internal.encode());
                }
            }
        }
        self.broker.borrow_mut().publish_all_wills();
        self.dispatch();
    }

    /// Shutdown, second step: close every connection (after writing what it
    /// is owed) and every handshake socket.
    pub(crate) fn close_everything(&self) {
        let now = self.now();
        self.broker.borrow_mut().close_all(now);
        self.dispatch();
        let pending: Vec<(u32, u32, Pending)> = {
            let mut net = self.net.borrow_mut();
            let slots: Vec<(u32, u32)> = net
                .pending
                .iter()
                .enumerate()
                .filter_map(|(i, p)| match p {
                    PendingSlot::Used { generation, .. } => Some((i as u32, *generation)),
                    PendingSlot::Free => None,
                })
                .collect();
            slots
                .into_iter()
                .filter_map(|(i, g)| net.take_pending(i, g).map(|p| (i, g, p)))
                .collect()
        };
        for (index, generation, p) in pending {
            let armed = pending_armed(&p, index, generation);
            close_socket(self, p.fd, armed.as_slice());
        }
    }

    /// Closes handshake sockets past the connect timeout and closing
    /// connections past their linger.
    pub(crate) fn expire_sockets(&self, now: Millis) {
        loop {
            let mut net = self.net.borrow_mut();
            let Some(&(index, generation, deadline)) = net.connect_deadlines.front() else {
                break;
            };
            if deadline > now {
                break;
            }
            net.connect_deadlines.pop_front();
            if let Some(p) = net.take_pending(index, generation) {
                drop(net);
                bump(&self.counters.connect_timeouts);
                let armed = pending_armed(&p, index, generation);
                close_socket(self, p.fd, armed.as_slice());
            }
        }
        loop {
            let mut net = self.net.borrow_mut();
            let Some(&(id, deadline)) = net.close_deadlines.front() else {
                break;
            };
            if deadline > now {
                break;
            }
            net.close_deadlines.pop_front();
            let still_closing = net.sock_mut(id).is_some_and(|s| s.closing);
            drop(net);
            if still_closing {
                self.finish_close(id);
            }
        }
    }
}

/// io_uring: submits the send of what `sock.bufs.unsent` holds, as `id`'s
/// one send in flight (`writing` set).
fn submit_unsent(ring: &RefCell<Uring>, id: ConnId, sock: &mut Sock) {
    sock.writing = true;
    let raw = sock.fd.as_raw_fd();
    let unsent = &sock.bufs().unsent;
    // SAFETY: the bytes are neither changed nor dropped until the send
    // completes: `writing` keeps every other write out of `unsent` (only
    // `send_done` touches it, on the completion), and a connection that goes
    // first hands its buffers to `orphaned_sends` (`close_sock`).
    unsafe {
        ring.borrow_mut()
            .send(raw, unsent.as_ptr(), unsent.len(), Token::Send(id).encode());
    }
}

/// The key of an orphaned send: a connection's index and its generation as
/// a completion's token carries it (truncated).
fn orphan_key(id: ConnId) -> ConnId {
    ConnId {
        index: id.index,
        generation: (u64::from(id.generation) & GEN_MASK) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A storm of handshakes grows the slot table; once every one is done
    /// the table is dropped, and a token from before never names a
    /// handshake after.
    #[test]
    fn the_handshake_slot_table_is_dropped_after_a_storm_and_old_tokens_stay_dead() {
        let mut net = Net::new(Vec::new());
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let pending = || Pending {
            fd: OwnedFd::from(devnull.try_clone().unwrap()),
            buf: BytesMut::new(),
            registered: false,
            layer: None,
            accepted: Instant::now(),
        };
        let storm: Vec<(u32, u32)> = (0..2000).map(|_| net.insert_pending(pending())).collect();
        net.shrink_handshake_slots();
        assert!(
            net.pending.capacity() >= 2000,
            "kept while handshakes are under way"
        );
        for &(index, generation) in &storm[..1999] {
            assert!(net.take_pending(index, generation).is_some());
        }
        net.shrink_handshake_slots();
        assert!(net.pending.capacity() >= 2000, "one is still under way");
        let (last_index, last_generation) = storm[1999];
        assert!(net.take_pending(last_index, last_generation).is_some());
        net.shrink_handshake_slots();
        assert_eq!(net.pending.capacity(), 0);

        let (index, generation) = net.insert_pending(pending());
        assert_eq!(index, 0);
        assert!(storm
            .iter()
            .all(|&(_, old)| !same_generation(old, generation)));
        assert!(
            net.take_pending(storm[0].0, storm[0].1).is_none(),
            "a stale token names nothing"
        );
        assert!(net.take_pending(index, generation).is_some());
    }

    #[test]
    fn tokens_round_trip_and_keep_kinds_apart() {
        let conn = Token::Conn(ConnId {
            index: 7,
            generation: 3,
        });
        assert_eq!(Token::decode(conn.encode()), conn);
        let p = Token::Pending {
            index: u32::MAX,
            generation: 5,
        };
        assert_eq!(Token::decode(p.encode()), p);
        for t in [
            Token::Listener(2),
            Token::DataBell,
            Token::RoomBell,
            Token::Internal,
            Token::LogWrite,
            Token::LogSync,
            Token::LogFill,
            Token::Send(ConnId {
                index: 9,
                generation: 4,
            }),
        ] {
            assert_eq!(Token::decode(t.encode()), t);
        }
        // A generation past 29 bits is compared truncated.
        let big = ConnId {
            index: 1,
            generation: (1 << 29) + 9,
        };
        match Token::decode(Token::Conn(big).encode()) {
            Token::Conn(id) => {
                assert_eq!(id.index, 1);
                assert!(same_generation(big.generation, id.generation));
            }
            other => panic!("{other:?}"),
        }
    }
}
