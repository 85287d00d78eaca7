//! The per-shard broker state machine: connections, sessions, subscriptions,
//! retained messages, wills and keep-alive, all without I/O, for 3.1, 3.1.1
//! and 5.0 alike. 5.0's additions live beside the 3.x paths they extend:
//! session expiry and delayed wills on a second lazy wheel keyed by session,
//! topic aliases and the client's limits (Receive Maximum, Maximum Packet
//! Size) on the connection, subscription options in the trie's values, and
//! the shared subscription groups this shard owns (see [`super::shared`]).
//!
//! The shell (`shard/`) feeds it: [`Broker::connect`] for a CONNECT that
//! passed the handshake, [`Broker::handle_read`] for bytes from a socket,
//! [`Broker::connection_lost`] when a socket fails, [`Broker::handle_remote`]
//! for a message from another shard, and [`Broker::tick`] for time. It drains
//! what comes out: [`Broker::poll_event`] (a connection has bytes to write,
//! must be closed, or a message must go to the other shards) and
//! [`Broker::take_outgoing`] (the bytes themselves).
//!
//! A connection is owned by the shard that owns its clientId, so a takeover is
//! always local: the old and the new connection meet here.
//!
//! With `--data-dir` ([`BrokerConfig::persist`]) the broker also writes what
//! a restart needs as records ([`super::persist`]) into a buffer the shell
//! drains each turn ([`Broker::take_log`]) and reports durable
//! ([`Broker::committed`]). An acknowledgement that promises a stored copy
//! waits for it: the publish is routed under a ticket, every shard it
//! reaches answers [`ShardMsg::Stored`] once its own copy is durable (at
//! once if it stored none), and the PUBACK / PUBREC goes when the local
//! records and every answer are in, in the client's order.
//!
//! The same hold serves `--queue-full` ([`QueueFull`]), with or without
//! `--data-dir`: an answer also means "every copy here is queued" (or says
//! one was dropped, which a 5.0 publisher hears as 0x97). Under
//! backpressure a copy that meets a full queue of a connected subscriber
//! is parked with the publish's ticket until the queue has room; the shard
//! tells the publisher's shard ([`ShardMsg::Parked`]), which stops
//! reading the publisher ([`Broker::reads_held`], [`Event::Resume`]) until
//! the answer comes. Answers settled at once are gathered into one
//! [`ShardMsg::StoredMany`] per peer.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};
use std::hash::BuildHasher;

use super::acl::{Access, Acl};
use super::codec::{
    self, reason, return_code, ConnAck, Connect, Disconnect, FixedHeader, LastWill, Packet,
    PacketId, Properties, ProtocolVersion, PubResp, Publish, QoS, SubAck, UnsubAck,
};
use super::interest::{Interest, ShardSet, MAX_ROUTED_SHARDS};
use super::keepalive::{KeepAliveWheel, Secs, Verdict};
use super::persist::{self, Flow, Recovered, SessionState, StoredWill};
use super::retained::{retained_owner, RetainedMessage, RetainedStore};
use super::session::{
    AwaitingRel, Inflight, Parked, PendingWill, QueuedMessage, Session, SessionKey, SubOpts,
    NEVER_EXPIRES,
};
use super::shared::{self, share_owner, Member, Shared, SharedGroups};
use super::topic::trie::SubscriptionTrie;
use super::topic::{TopicFilter, TopicName};
use super::{ConnId, Millis, ShardId};
use crate::metrics::{bump, drop_one, Counters};

/// The SUBACK code for a refused filter (MQTT-3.9.3-2 of 3.1.1; 5.0's
/// Unspecified error has the same value).
const SUBACK_FAILURE: u8 = 0x80;

/// The Receive Maximum a 5.0 client that sets none has (§3.1.2.11.3).
const DEFAULT_RECEIVE_MAXIMUM: u16 = u16::MAX;

/// Whether `topic` is one of the broker's own `$SYS` topics, which no client
/// may publish to (or leave a will on): a client's retained
/// `$SYS/broker/uptime` would otherwise stand in for the broker's. Topics
/// starting with `$` are reserved for the server (MQTT-4.7.2, non-normative);
/// other `$` topics stay open to clients, as in mosquitto.
fn is_broker_topic(topic: &TopicName) -> bool {
    let t = topic.as_str();
    t == "$SYS" || t.starts_with("$SYS/")
}

/// Bytes queued for one connection's socket beyond which QoS 0 messages to it
/// are dropped: a stuck subscriber costs at most this much.
pub const MAX_PENDING_OUTGOING: usize = 1 << 20;

/// What happens to a QoS 1/2 message for a subscriber whose session queue
/// holds `--max-queued` messages already (`--queue-full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueFull {
    /// The message waits outside the queue ([`super::session::Flows::parked`])
    /// and its publisher's PUBACK / PUBREC waits with it, its socket not
    /// read, until the queue has room; after `--queue-full-timeout` it is
    /// dropped as with `DropNewest`. Only for a connected subscriber: an
    /// offline session's full queue drops at once, so a device that is
    /// away cannot hold up the fleet's publishers.
    #[default]
    Backpressure,
    /// The new message is dropped (mosquitto's way).
    DropNewest,
    /// The oldest queued message is dropped to make room for the new one.
    DropOldest,
}

impl std::str::FromStr for QueueFull {
    type Err = String;

    fn from_str(s: &str) -> Result<QueueFull, String> {
        match s.trim() {
            "backpressure" => Ok(QueueFull::Backpressure),
            "drop-newest" | "drop_newest" => Ok(QueueFull::DropNewest),
            "drop-oldest" | "drop_oldest" => Ok(QueueFull::DropOldest),
            other => Err(format!(
                "must be backpressure, drop-newest or drop-oldest, got {other:?}"
            )),
        }
    }
}

impl std::fmt::Display for QueueFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueueFull::Backpressure => "backpressure",
            QueueFull::DropNewest => "drop-newest",
            QueueFull::DropOldest => "drop-oldest",
        })
    }
}

/// What a shard's broker needs to know about its place and its limits.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// This shard.
    pub shard: ShardId,
    /// How many shards there are.
    pub shards: u16,
    /// The largest packet accepted from a client, in bytes.
    pub max_packet_size: usize,
    /// QoS 1/2 messages in flight to one client; further ones wait in its
    /// session queue.
    pub max_inflight: usize,
    /// QoS 1/2 messages a session's queue holds (offline, or window full);
    /// past it `queue_full` decides.
    pub max_queued: usize,
    /// What a full session queue does to a new message (`--queue-full`).
    pub queue_full: QueueFull,
    /// How long a message may wait for a full queue under
    /// [`QueueFull::Backpressure`], milliseconds (`--queue-full-timeout`).
    pub queue_full_timeout_ms: u64,
    /// Topic access rules (`--acl-file`); `None` lets everyone do anything.
    pub acl: Option<Arc<Acl>>,
    /// MQTT 5 Server Keep Alive (`--max-keepalive`): a 5.0 client asking for
    /// more, or for 0, is told this and held to it. 0: no cap.
    pub max_keepalive: u16,
    /// The longest Session Expiry Interval granted, seconds
    /// (`--max-session-expiry`); [`NEVER_EXPIRES`] caps nothing.
    pub max_session_expiry: u32,
    /// Topic Alias Maximum offered to 5.0 clients (`--max-topic-alias`).
    pub max_topic_alias: u16,
    /// Receive Maximum offered to 5.0 clients (`--receive-maximum`): QoS 2
    /// PUBLISHes of theirs that may await PUBREL at once.
    pub receive_maximum: u16,
    /// Response Information for 5.0 clients that ask for it
    /// (`--response-information`).
    pub response_information: Option<ByteString>,
    /// `--data-dir` is set: persistent sessions, the QoS 1/2 messages owed
    /// to them and retained messages are written as records (see
    /// [`super::persist`]), and an acknowledgement that promises one of them
    /// waits until its record is durable ([`Broker::take_log`],
    /// [`Broker::committed`]).
    pub persist: bool,
    /// Wall-clock milliseconds (Unix epoch) at `Millis(0)`: stored times are
    /// wall-clock, so that they mean the same after a restart.
    pub wall_epoch_ms: u64,
    /// `--cluster`: the cluster link's place on the mesh (the peer after
    /// the last shard; see `crate::cluster`). To the broker it is one more
    /// peer that announces filters (the other nodes' subscriptions) and
    /// answers ticketed publishes once the other nodes have them.
    pub link: Option<ShardId>,
}

impl BrokerConfig {
    /// Shard `shard` of `shards` with the defaults of the command line.
    pub fn new(shard: ShardId, shards: u16) -> BrokerConfig {
        BrokerConfig {
            shard,
            shards,
            max_packet_size: 1 << 20,
            max_inflight: 20,
            max_queued: 1000,
            queue_full: QueueFull::Backpressure,
            queue_full_timeout_ms: 10_000,
            acl: None,
            max_keepalive: 0,
            max_session_expiry: NEVER_EXPIRES,
            max_topic_alias: u16::MAX,
            receive_maximum: 1024,
            response_information: None,
            persist: false,
            wall_epoch_ms: 0,
            link: None,
        }
    }
}

/// A publish travelling between shards. `Send`: payload and topic are
/// reference-counted `Bytes`, shared by every shard's deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedPublish {
    /// Topic published to.
    pub topic: TopicName,
    /// Payload, shared.
    pub payload: Bytes,
    /// QoS it was published with; each delivery gets the minimum of this and
    /// the subscription's (MQTT-3.8.4-6).
    pub qos: QoS,
    /// RETAIN as published: the topic's retained owner stores it.
    pub retain: bool,
    /// MQTT 5 properties forwarded to subscribers (not the Topic Alias, not
    /// Subscription Identifiers, not Message Expiry: see `expires_at`).
    pub props: Option<Arc<Properties>>,
    /// When it expires (Message Expiry Interval), on the process-wide clock.
    pub expires_at: Option<Millis>,
    /// With `--data-dir`: the shard that waits to acknowledge it and its
    /// ticket. The receiver answers [`ShardMsg::Stored`] once whatever it
    /// stored of the message is durable.
    pub ticket: Option<(ShardId, u64)>,
    /// With `--data-dir`, a QoS 2 PUBLISH of a persistent session: its
    /// inbound id (0: none). A shard that already stored copies under this
    /// id does not store them again (a resend after a crash).
    pub uid: u64,
    /// `--cluster`: a publish from another node names the shared groups
    /// (`$share/GROUP/FILTER`) whose members here get it (that node chose
    /// this one for them); `None`: every group (a publish made here).
    pub shares: Option<Arc<[ByteString]>>,
}

/// A message from one shard's broker to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardMsg {
    /// Deliver to local subscribers; the topic's retained owner also stores
    /// it if RETAIN is set.
    Publish(RoutedPublish),
    /// A new subscription on another shard asks for the retained messages
    /// this shard owns that its filter matches.
    RetainedQuery(RetainedQuery),
    /// The answer to a [`ShardMsg::RetainedQuery`].
    RetainedReply(RetainedReply),
    /// To a group's owner shard: a session joined a shared subscription
    /// (or changed its options).
    ShareJoin {
        /// `$share/GROUP/FILTER`.
        share: TopicFilter,
        /// FILTER.
        filter: TopicFilter,
        /// The new member.
        member: Member,
        /// The member's shard waits for [`ShardMsg::ShareJoined`] with this
        /// before the SUBACK (every shard then routes the group's publishes
        /// to the owner).
        reply: Option<u64>,
    },
    /// To a member's shard: its join is in place everywhere.
    ShareJoined {
        /// What the member's shard waits with.
        waiter: u64,
    },
    /// To every other shard: `from` has subscriptions to these filters now
    /// (see [`super::interest`]); answer with [`ShardMsg::InterestAck`].
    InterestAdd {
        /// The shard that subscribes.
        from: ShardId,
        /// Filters new to it.
        filters: Vec<TopicFilter>,
        /// Echoed in the acknowledgement.
        ticket: u64,
    },
    /// The answer to an [`ShardMsg::InterestAdd`]: applied here.
    InterestAck {
        /// Its ticket.
        ticket: u64,
    },
    /// To every other shard: `from` has no subscription to `filter` any more.
    InterestRemove {
        /// The shard that unsubscribed.
        from: ShardId,
        /// The filter.
        filter: TopicFilter,
    },
    /// To a group's owner shard: a session left a shared subscription.
    ShareLeave {
        /// `$share/GROUP/FILTER`.
        share: TopicFilter,
        /// The member that left.
        member: Member,
    },
    /// To a group's owner shard: a member's client connected or went away.
    ShareOnline {
        /// `$share/GROUP/FILTER`.
        share: TopicFilter,
        /// The member, with its new `online`.
        member: Member,
    },
    /// From a group's owner shard: deliver this to the member it picked.
    ShareDeliver(ShareDelivery),
    /// Several [`ShardMsg::Stored`] answers at once: the publishes this
    /// shard settled as soon as they came, gathered over a turn (ticket,
    /// dropped).
    StoredMany(Vec<(u64, bool)>),
    /// The answer to a publish carrying a ticket: what this shard stored of
    /// it is on disk (or it stored nothing), and every copy it owed a
    /// session is queued or was dropped for a full queue.
    Stored {
        /// The publish's ticket.
        ticket: u64,
        /// A copy was dropped for a full queue: a 5.0 publisher is told
        /// 0x97 (Quota exceeded).
        dropped: bool,
    },
    /// Before the [`ShardMsg::Stored`] of a ticketed publish: a copy met a
    /// full queue and waits for room, so the publisher's socket is not read
    /// until the answer comes (`--queue-full backpressure`).
    Parked {
        /// The publish's ticket.
        ticket: u64,
    },
    /// The QoS 2 flow of inbound id `uid` ended (PUBREL): forget it.
    Forget {
        /// The inbound id.
        uid: u64,
    },
}

/// A message for the member of a shared subscription group the group's
/// owner picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDelivery {
    /// `$share/GROUP/FILTER`: the member's subscription.
    pub share: TopicFilter,
    /// The member's session.
    pub session: SessionKey,
    /// Its clientId (the key alone could name a later session).
    pub client_id: ByteString,
    /// The message.
    pub publish: RoutedPublish,
}

/// Who asked for retained messages, and for which subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedQuery {
    /// The shard that asks, where the session is.
    pub from: ShardId,
    /// The session that subscribed.
    pub session: SessionKey,
    /// Its clientId: the key alone could name a later session by then.
    pub client_id: ByteString,
    /// The new subscription's filter.
    pub filter: TopicFilter,
}

/// Retained messages for a new subscription, from the shard that owns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedReply {
    /// The query this answers (its `from` is where this goes).
    pub query: RetainedQuery,
    /// The matching messages (payloads shared, not copied).
    pub messages: Vec<RetainedMessage>,
}

/// What the shell must do after a call into the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The connection has bytes to write: call [`Broker::take_outgoing`].
    Transmit(ConnId),
    /// Write what is pending, close the socket, then call [`Broker::release`].
    Close(ConnId),
    /// Send this to every other shard.
    Broadcast(ShardMsg),
    /// Send this to one other shard.
    SendTo(ShardId, ShardMsg),
    /// The connection's reads were held (its publishes wait for full
    /// queues, see [`Broker::reads_held`]) and may go on: feed it the bytes
    /// it left unread ([`Broker::handle_read`]), then read its socket again.
    Resume(ConnId),
}

/// Why a connection ended. Every reason but `Disconnect` publishes the will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT: the will is discarded (MQTT-3.14.4-3).
    Disconnect,
    /// A 5.0 DISCONNECT with reason 0x04: the will is published, at once.
    DisconnectWithWill,
    /// No packet within 1.5 × keep-alive (MQTT-3.1.2-24).
    KeepAliveTimeout,
    /// A malformed packet or a protocol violation (MQTT-4.8.0-1), with the
    /// 5.0 reason code the client is told (0x81, 0x82, 0x93, 0x94, 0x95 …).
    ProtocolError(u8),
    /// The socket failed or the client closed it without DISCONNECT.
    NetworkError,
    /// A new CONNECT with the same clientId (MQTT-3.1.4-2).
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
}

impl CloseReason {
    /// The reason code of the DISCONNECT a 5.0 client gets before the
    /// close, for the closes the server decides (§4.13).
    fn disconnect_code(self) -> Option<u8> {
        match self {
            CloseReason::KeepAliveTimeout => Some(reason::KEEP_ALIVE_TIMEOUT),
            CloseReason::ProtocolError(code) => Some(code),
            CloseReason::TakenOver => Some(reason::SESSION_TAKEN_OVER),
            CloseReason::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            CloseReason::Disconnect
            | CloseReason::DisconnectWithWill
            | CloseReason::NetworkError => None,
        }
    }
}

/// Topic aliases of one 5.0 connection (§3.3.2.3.4), made on first use.
#[derive(Debug, Default)]
struct Aliases {
    /// Set by the client: alias → topic (copies, not read-buffer slices).
    incoming: HashMap<u16, TopicName>,
    /// Given by us: topic → alias, first come first served up to the
    /// client's Topic Alias Maximum.
    outgoing: HashMap<ByteString, u16>,
}

/// An `InterestAdd` this shard sent, until every other shard acknowledged it.
#[derive(Debug)]
struct Announce {
    acks_left: u16,
    filters: Vec<TopicFilter>,
    /// Waiters released when it is acknowledged everywhere.
    waiters: Vec<u64>,
}

/// Something held until announcements and shared-subscription joins are in
/// place on every shard.
#[derive(Debug)]
struct Waiter {
    left: usize,
    then: Then,
}

#[derive(Debug)]
enum Then {
    /// Send this SUBACK, then the retained messages of these subscriptions.
    SubAck {
        conn: ConnId,
        key: SessionKey,
        suback: SubAck,
        retained_for: Vec<TopicFilter>,
    },
    /// Tell a member's shard its join is in place.
    ShareJoined { to: ShardId, waiter: u64 },
}

/// Several matching subscriptions of one session folded into one delivery
/// (MQTT-3.3.4-2, -3): the highest QoS, RETAIN if any asks for it as
/// published, and every Subscription Identifier.
#[derive(Debug, Default)]
struct Fold {
    qos: Option<QoS>,
    retain: bool,
    ids: Vec<u32>,
}

/// One connection's protocol state.
#[derive(Debug)]
struct Conn {
    generation: u32,
    version: ProtocolVersion,
    /// `None` once the connection is closing and its session detached.
    session: Option<SessionKey>,
    /// Boxed: most connections have none, and it is 80 bytes inline.
    will: Option<Box<LastWill>>,
    /// 1.5 × keep-alive in milliseconds; 0 when keep-alive is off.
    expiry_ms: u32,
    last_seen: Millis,
    /// Encoded packets waiting for the socket. `BytesMut::new()` holds no
    /// allocation, so an idle connection costs no buffer.
    outgoing: BytesMut,
    transmit_queued: bool,
    closing: bool,
    /// The server ended the connection while the client may still be
    /// sending (a protocol error, a takeover): the shell half-closes and
    /// reads away what comes until the client's FIN, so that its last
    /// packets do not meet a reset that would discard our DISCONNECT (see
    /// [`Broker::lingers`]).
    linger: bool,
    /// QoS 1/2 messages that may be in flight to it: its Receive Maximum
    /// (5.0) or `--max-inflight` (3.x).
    window: u16,
    /// Topic aliases it lets us use (5.0 Topic Alias Maximum; 0 for 3.x).
    alias_out_max: u16,
    /// False when a 5.0 client set Request Problem Information to 0: no
    /// Reason String on acknowledgements then (MQTT-3.1.2-29).
    problem_info: bool,
    /// Largest packet it accepts (5.0 Maximum Packet Size; `u32::MAX`: no
    /// limit but the protocol's).
    max_packet: u32,
    aliases: Option<Box<Aliases>>,
    /// Acknowledgements waiting for their messages to be queued everywhere
    /// (and, with `--data-dir`, for their records to be durable), in the
    /// order they must be sent (MQTT-4.6.0-2); a ticket
    /// of 0 waits for nothing but the ones before it. Boxed: 8 bytes in
    /// every connection instead of a 32-byte empty queue; made on a
    /// connection's first held acknowledgement and kept.
    #[allow(clippy::box_collection)]
    held: Option<Box<VecDeque<(u64, Packet)>>>,
    /// Its publishes waiting for room in full queues: while not 0 its
    /// packets are not read (`--queue-full backpressure`), nor is it
    /// closed for the silence that causes.
    reads_held: u16,
}

/// An acknowledgement (or a [`ShardMsg::Stored`]) waiting for records to
/// be durable here and on other shards.
#[derive(Debug)]
struct Held {
    /// Waits for the local commit of this log generation.
    local_gen: Option<u64>,
    /// [`ShardMsg::Stored`] answers still to come.
    remote_left: u32,
    /// Copies parked here for full queues, not yet queued or dropped.
    parked_left: u32,
    /// A copy was dropped for a full queue (here, or a shard answered so).
    dropped: bool,
    /// A copy waits for room: the publisher's reads are held (this
    /// connection's [`Conn::reads_held`] counts it), or the shard it
    /// answers was told ([`ShardMsg::Parked`]).
    backpressure: Backpressure,
    then: HeldThen,
}

/// Whether a [`Held`] holds back its publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backpressure {
    None,
    /// It counts in this connection's `reads_held`.
    Holds(ConnId),
    /// The shard it answers was told.
    Told,
}

impl Held {
    /// Nothing left to wait for.
    fn is_settled(&self) -> bool {
        self.local_gen.is_none() && self.remote_left == 0 && self.parked_left == 0
    }
}

#[derive(Debug, Clone, Copy)]
enum HeldThen {
    /// Release the connection's held acknowledgements up to this one.
    Ack(ConnId),
    /// Answer a publish from another shard.
    Reply(ShardId, u64),
    /// A PUBREC: every copy of the QoS 2 message with this packet id of
    /// this session is durable; then as `Ack`.
    Rel(ConnId, SessionKey, u16),
}

/// A step of a stored message's flow, as the log records it.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// In flight with this packet id.
    Sent(u16),
    /// QoS 2: its PUBREC came.
    Released,
    /// Its flow ended (acknowledged, expired, or not sendable).
    Done,
}

/// What happens to one publish while it is routed with a ticket.
#[derive(Debug, Clone, Copy)]
struct Hold {
    ticket: u64,
    log_before: usize,
    fanout: u32,
    /// Copies parked here for full queues.
    parked: u32,
    /// A copy was dropped here for a full queue.
    dropped: bool,
    /// A generation to wait for even if nothing new is logged: copies
    /// stored earlier under the same inbound id, maybe not yet durable.
    wait_gen: Option<u64>,
}

enum Slot {
    Free { generation: u32 },
    Used(Conn),
}

/// The sans-IO broker of one shard.
pub struct Broker {
    config: BrokerConfig,
    counters: Arc<Counters>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    sessions: Vec<Option<Session>>,
    free_sessions: Vec<u32>,
    /// Sessions by clientId: keys only, hashed by the id stored in the
    /// session itself, so the id is held once.
    by_client_id: HashTable<SessionKey>,
    hasher: DefaultHashBuilder,
    trie: SubscriptionTrie<SessionKey, SubOpts>,
    retained: RetainedStore,
    /// Runs in 100 ms ticks, not seconds (see [`keepalive_tick`]).
    keepalive: KeepAliveWheel<u32>,
    /// Sessions whose client is away and that end, or have a will due,
    /// at a known time: the same lazy wheel, keyed by session, in the same
    /// 100 ms ticks (no timer per session).
    expiry: KeepAliveWheel<u32>,
    /// The shared subscription groups this shard owns.
    shared: SharedGroups,
    /// Which other shards want which topics, and this shard's own filters.
    interest: Interest,
    /// Interest announcements waiting for the other shards' acknowledgements.
    announces: HashMap<u64, Announce>,
    /// Filters announced and not yet acknowledged everywhere, by ticket.
    pending_filters: HashMap<ByteString, u64>,
    /// SUBACKs (and join confirmations) waiting for announcements and joins.
    waiters: HashMap<u64, Waiter>,
    /// Tickets and waiters are numbered from here.
    next_id: u64,
    /// The latest time the shell told us about.
    now: Millis,
    events: VecDeque<Event>,
    /// Reused by every routing call: subscriber → its folded matches.
    matches: HashMap<SessionKey, Fold>,
    /// Per-packet tallies, kept here and added to the shared counters by
    /// [`Broker::flush_counts`]: an atomic add per packet from every shard
    /// would make the counters' cache lines the busiest memory in the
    /// process.
    counts: LocalCounts,
    /// The next message id ([`QueuedMessage::id`]).
    next_msg_id: u64,
    /// With `--data-dir`: records not yet handed to the shell.
    log: BytesMut,
    /// The generation `log` will be committed as.
    log_gen: u64,
    /// Every generation up to this one is durable.
    committed_gen: u64,
    /// Tickets waiting for a local commit, by generation (ascending).
    gen_waiters: VecDeque<(u64, u64)>,
    /// Acknowledgements and answers waiting for records, by ticket.
    held: HashMap<u64, Held>,
    /// The publish being routed with a ticket, if any.
    hold: Option<Hold>,
    /// Inbound QoS 2 ids seen here, and whether copies were stored (and an
    /// `Applied` record written), until their flow ends.
    applied: HashMap<u64, bool>,
    /// Messages for other shards held until generation `.0` is durable,
    /// in order (see [`Broker::push_mesh`]).
    mesh_hold: VecDeque<(u64, Event)>,
    /// Answers to publishes from each peer settled at once, sent as one
    /// [`ShardMsg::StoredMany`] per peer when the events are drained.
    settled: Vec<Vec<(u64, bool)>>,
    /// How many answers `settled` holds.
    settled_count: usize,
    /// Sessions with parked messages, whose timeouts the tick checks.
    parked_sessions: HashSet<SessionKey>,
    /// Sessions whose queue holds at least a tenth of `max_queued`: where
    /// [`Broker::deepest_queues`] looks (entries may be stale).
    deep_queues: HashSet<SessionKey>,
}

/// Tallies a shard keeps to itself between flushes.
#[derive(Debug, Default, Clone, Copy)]
struct LocalCounts {
    packets_in: u64,
    packets_out: u64,
    publishes_in: u64,
    publishes_out: u64,
    publishes_in_by_qos: [u64; 3],
    publishes_out_by_qos: [u64; 3],
}

impl Broker {
    /// An empty broker for one shard; `now` starts its keep-alive clock.
    pub fn new(config: BrokerConfig, counters: Arc<Counters>, now: Millis) -> Self {
        let peers = usize::from(config.shards) + usize::from(config.link.is_some());
        Broker {
            config,
            counters,
            slots: Vec::new(),
            free_slots: Vec::new(),
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            by_client_id: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            trie: SubscriptionTrie::new(),
            retained: RetainedStore::default(),
            keepalive: KeepAliveWheel::new(keepalive_tick(now)),
            expiry: KeepAliveWheel::new(keepalive_tick(now)),
            shared: SharedGroups::default(),
            interest: Interest::default(),
            announces: HashMap::new(),
            pending_filters: HashMap::new(),
            waiters: HashMap::new(),
            next_id: 0,
            now,
            events: VecDeque::new(),
            mesh_hold: VecDeque::new(),
            matches: HashMap::new(),
            counts: LocalCounts::default(),
            next_msg_id: 1,
            log: BytesMut::new(),
            log_gen: 1,
            committed_gen: 0,
            gen_waiters: VecDeque::new(),
            held: HashMap::new(),
            hold: None,
            applied: HashMap::new(),
            settled: vec![Vec::new(); peers],
            settled_count: 0,
            parked_sessions: HashSet::new(),
            deep_queues: HashSet::new(),
        }
    }

    /// Adds this shard's packet tallies to the process-wide counters (the
    /// shell calls it every tick).
    pub fn flush_counts(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = std::mem::take(&mut self.counts);
        self.counters
            .packets_received
            .fetch_add(c.packets_in, Relaxed);
        self.counters.packets_sent.fetch_add(c.packets_out, Relaxed);
        self.counters
            .publishes_received
            .fetch_add(c.publishes_in, Relaxed);
        self.counters
            .publishes_sent
            .fetch_add(c.publishes_out, Relaxed);
        for q in 0..3 {
            self.counters.publishes_received_by_qos[q].fetch_add(c.publishes_in_by_qos[q], Relaxed);
            self.counters.publishes_sent_by_qos[q].fetch_add(c.publishes_out_by_qos[q], Relaxed);
        }
    }

    /// Replaces the ACL (SIGHUP, see [`crate::reload`]): it applies to
    /// every SUBSCRIBE, PUBLISH and delivery from now on.
    pub fn set_acl(&mut self, acl: Option<Arc<Acl>>) {
        self.config.acl = acl;
    }

    /// This shard's configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Open connections on this shard (closing ones included until released).
    pub fn connection_count(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Sessions on this shard, connected or not.
    pub fn session_count(&self) -> usize {
        self.by_client_id.len()
    }

    /// Retained topics this shard owns.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Next thing the shell must do, if any. Once the others are drained,
    /// the answers gathered for each peer go, one message each.
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        if self.settled_count == 0 {
            return None;
        }
        let (peer, list) = self
            .settled
            .iter_mut()
            .enumerate()
            .find(|(_, l)| !l.is_empty())?;
        let answers = std::mem::take(list);
        self.settled_count -= answers.len();
        Some(Event::SendTo(
            ShardId(peer as u16),
            ShardMsg::StoredMany(answers),
        ))
    }

    /// Takes the bytes waiting for `conn`'s socket (empty if none, or if
    /// `conn` is stale).
    pub fn take_outgoing(&mut self, conn: ConnId) -> BytesMut {
        match self.conn_mut(conn) {
            Some(c) => {
                c.transmit_queued = false;
                std::mem::take(&mut c.outgoing)
            }
            None => BytesMut::new(),
        }
    }

    /// True when `conn` is closing (or gone): the shell stops reading it.
    pub fn is_closing(&self, conn: ConnId) -> bool {
        self.conn(conn).is_none_or(|c| c.closing)
    }

    /// True when the server closed `conn` while its client may still be
    /// sending (a protocol error, a takeover). Closing the socket at once
    /// would answer the client's next bytes with a reset, and a reset makes
    /// the client's TCP stack discard what it had not read yet: our
    /// DISCONNECT with its reason code, or the PUBACKs before it. So the
    /// shell shuts down its side (the client sees EOF after the last
    /// packet) and reads away what still comes until the client's FIN or a
    /// deadline. Not after the client's own DISCONNECT (it sends nothing
    /// more, MQTT-3.14.4-1), nor for a silent client (keep-alive).
    pub fn lingers(&self, conn: ConnId) -> bool {
        self.conn(conn).is_some_and(|c| c.linger)
    }

    /// True when bytes wait for `conn`'s socket.
    pub fn has_outgoing(&self, conn: ConnId) -> bool {
        self.conn(conn).is_some_and(|c| !c.outgoing.is_empty())
    }

    /// Bytes waiting for `conn`'s socket.
    pub fn outgoing_len(&self, conn: ConnId) -> usize {
        self.conn(conn).map_or(0, |c| c.outgoing.len())
    }

    /// True when the shell must act for `conn`: bytes to write, or a close.
    pub fn wants_attention(&self, conn: ConnId) -> bool {
        self.conn(conn)
            .is_none_or(|c| c.transmit_queued || c.closing)
    }

    /// Accepts a CONNECT that passed [`check_connect`](super::handshake::check_connect)
    /// and whose clientId is set. Takes over any connection with the same
    /// clientId, attaches the session Clean Start asks for, and queues the
    /// CONNACK.
    pub fn connect(&mut self, connect: Connect, now: Millis) -> ConnId {
        self.connect_assigned(connect, false, now)
    }

    /// [`Broker::connect`] for a client whose empty clientId the shell
    /// replaced (`assigned`): a 5.0 client is then told the id in the
    /// CONNACK (MQTT-3.2.2-16).
    pub fn connect_assigned(&mut self, connect: Connect, assigned: bool, now: Millis) -> ConnId {
        self.now = now;
        let Connect {
            protocol,
            clean_start,
            keep_alive,
            client_id,
            will,
            username,
            properties,
            ..
        } = connect;
        let v5 = protocol.is_v5();
        let props = properties.as_deref();
        // 3.1.1's cleanSession is Clean Start plus a Session Expiry of 0 or
        // "never"; 5.0 says both apart (§3.1.2.4, §3.1.2.11.2).
        let asked_expiry = match (v5, clean_start) {
            (true, _) => props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
            (false, true) => 0,
            (false, false) => NEVER_EXPIRES,
        };
        let expiry = if v5 {
            asked_expiry.min(self.config.max_session_expiry)
        } else {
            asked_expiry
        };
        // MQTT-3.2.2-21: a Server Keep Alive replaces the client's value.
        let max_ka = self.config.max_keepalive;
        let server_keep_alive =
            (v5 && max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka)).then_some(max_ka);
        let keep_alive = server_keep_alive.unwrap_or(keep_alive);
        let window = if v5 {
            props
                .and_then(|p| p.receive_maximum)
                .unwrap_or(DEFAULT_RECEIVE_MAXIMUM)
        } else {
            u16::try_from(self.config.max_inflight).unwrap_or(u16::MAX)
        };
        let id = self.allocate_conn(Conn {
            generation: 0,
            version: protocol,
            session: None,
            will: will.map(Box::new),
            expiry_ms: u32::from(keep_alive) * 1500,
            last_seen: now,
            outgoing: BytesMut::new(),
            transmit_queued: false,
            closing: false,
            linger: false,
            window: window.max(1),
            alias_out_max: props.and_then(|p| p.topic_alias_maximum).unwrap_or(0),
            problem_info: props.and_then(|p| p.request_problem_information) != Some(0),
            max_packet: props
                .and_then(|p| p.maximum_packet_size)
                .unwrap_or(u32::MAX),
            aliases: None,
            held: None,
            reads_held: 0,
        });

        // MQTT-3.1.4-2: a client already connected with this id is disconnected.
        // Its will goes out (see "Takeover" in the README), and a session that
        // expires with its connection ends with it.
        if let Some(key) = self.find_session(&client_id) {
            if let Some(old) = self.session(key).and_then(|s| s.conn) {
                bump(&self.counters.takeovers);
                self.close(old, CloseReason::TakenOver, now);
            }
        }

        let existing = self.find_session(&client_id);
        let (key, session_present) = match existing {
            // MQTT-3.2.2-2: a stored session is resumed, with sessionPresent=1.
            Some(key) if !clean_start => (key, true),
            // MQTT-3.1.2-6 (5.0: -4): Clean Start discards any previous session.
            Some(key) => {
                self.end_session(key);
                (self.create_session(client_id.clone(), expiry), false)
            }
            None => (self.create_session(client_id.clone(), expiry), false),
        };
        let acl_in_use = self.config.acl.is_some();
        let session = self
            .session_mut(key)
            .expect("session created or found above");
        session.conn = Some(id);
        session.expiry_secs = expiry;
        session.expires_at = u64::MAX;
        session.generation = session.generation.wrapping_add(1);
        // MQTT-3.1.3-9: a will still waiting for its delay is not sent once
        // the client is back.
        session.pending_will = None;
        if acl_in_use {
            // Whoever connects now is who the session's rules are for.
            session.username = username.map(|u| Box::from(&*u));
        }
        let conn = self.conn_mut(id).expect("allocated above");
        conn.session = Some(key);
        if self.persists(key) {
            self.log_session(key);
        } else if let Some(s) = self.session_mut(key).filter(|s| s.logged) {
            // A persistent session resumed with an expiry of 0 now ends
            // with this connection: it no longer belongs on disk.
            s.logged = false;
            let cid = s.client_id.clone();
            persist::put_session_gone(&mut self.log, &cid);
        }
        if keep_alive > 0 {
            let deadline = keepalive_tick(Millis(now.0 + u64::from(keep_alive) * 1500));
            self.keepalive.register(id.index, id.generation, deadline);
        }

        bump(&self.counters.connacks[0]);
        bump(&self.counters.connections_total);
        bump(&self.counters.connections_current);
        let properties = v5.then(|| {
            let c = &self.config;
            let mut p = Properties {
                receive_maximum: Some(c.receive_maximum),
                maximum_packet_size: u32::try_from(c.max_packet_size).ok(),
                topic_alias_maximum: (c.max_topic_alias > 0).then_some(c.max_topic_alias),
                retain_available: Some(1),
                wildcard_subscription_available: Some(1),
                subscription_identifier_available: Some(1),
                shared_subscription_available: Some(1),
                server_keep_alive,
                // §3.2.2.3.2: the client uses the server's value.
                session_expiry_interval: (expiry != asked_expiry).then_some(expiry),
                ..Properties::default()
            };
            if assigned {
                p.assigned_client_identifier = Some(client_id.clone());
            }
            if props.and_then(|p| p.request_response_information) == Some(1) {
                p.response_information = c.response_information.clone();
            }
            Box::new(p)
        });
        self.queue_packet(
            id,
            &Packet::ConnAck(ConnAck {
                session_present,
                code: return_code::ACCEPTED,
                properties,
            }),
        );
        if session_present {
            self.resend_inflight(id, key);
            self.pump_queue(key);
        }
        self.share_status(key, true);
        id
    }

    /// Decodes and handles every whole packet in `buf`, leaving a partial one.
    pub fn handle_read(&mut self, conn: ConnId, buf: &mut BytesMut, now: Millis) {
        self.now = now;
        loop {
            let Some(c) = self.conn_mut(conn) else { return };
            if c.closing {
                // Nothing a client sends after its close counts (MQTT-3.14.4-2).
                buf.clear();
                return;
            }
            if c.reads_held > 0 {
                // A publish of its waits for a full queue: its next PUBLISH
                // stays unread until [`Event::Resume`]. Meanwhile its
                // acknowledgements and PINGREQs are taken from the unread
                // bytes (`skim_held`); if those free it, read on.
                if self.skim_held(conn, buf, now) {
                    continue;
                }
                return;
            }
            let version = c.version;
            match codec::decode(buf, version, self.config.max_packet_size) {
                Ok(None) => return,
                Ok(Some(packet)) => {
                    self.counts.packets_in += 1;
                    if let Some(c) = self.conn_mut(conn) {
                        c.last_seen = now;
                    }
                    self.handle_packet(conn, packet, now);
                }
                Err(error) => {
                    tracing::debug!(?conn, %error, "malformed packet");
                    bump(&self.counters.malformed_packets);
                    // 5.0 clients are told which: 0x81, 0x82, 0x95 ... (§4.13).
                    self.close(conn, CloseReason::ProtocolError(error.reason_code()), now);
                    buf.clear();
                    return;
                }
            }
        }
    }

    /// A connection whose reads are held: takes its PUBACKs, PUBRECs,
    /// PUBRELs, PUBCOMPs and PINGREQs out of the unread bytes and handles
    /// them, leaving everything else in order. They answer other flows than
    /// the publish that waits (ours to it, or its QoS 2 flows already
    /// acknowledged), so taking them early changes no order a client can
    /// see, and a client waiting on them — for its keep-alive, or to drain
    /// its own subscription's full queue — is not stuck behind the publish.
    /// Stops at a CONNECT, SUBSCRIBE, UNSUBSCRIBE, DISCONNECT or AUTH: what
    /// follows one of those keeps its place. True when this freed the
    /// connection's reads.
    fn skim_held(&mut self, conn: ConnId, buf: &mut BytesMut, now: Millis) -> bool {
        let max = self.config.max_packet_size;
        let mut at = 0;
        loop {
            let Some(c) = self.conn(conn) else {
                return false;
            };
            if c.closing {
                return false;
            }
            if c.reads_held == 0 {
                return true;
            }
            let version = c.version;
            let Ok(Some(h)) = FixedHeader::parse(&buf[at..]) else {
                // Incomplete, or malformed: judged when it is read in turn.
                return false;
            };
            let len = h.packet_len();
            if len > max || buf.len() - at < len {
                return false;
            }
            match h.packet_type {
                4..=7 | 12 => {
                    let mut tail = buf.split_off(at);
                    let mut packet = tail.split_to(len);
                    buf.unsplit(tail);
                    match codec::decode(&mut packet, version, max) {
                        Ok(Some(p)) => {
                            self.counts.packets_in += 1;
                            if let Some(c) = self.conn_mut(conn) {
                                c.last_seen = now;
                            }
                            self.handle_packet(conn, p, now);
                        }
                        Ok(None) => return false,
                        Err(error) => {
                            bump(&self.counters.malformed_packets);
                            self.close(conn, CloseReason::ProtocolError(error.reason_code()), now);
                            buf.clear();
                            return false;
                        }
                    }
                }
                1 | 8 | 10 | 14 | 15 => return false,
                _ => at += len,
            }
        }
    }

    /// The socket of `conn` failed or reached EOF without DISCONNECT: the will
    /// is published and the connection released.
    pub fn connection_lost(&mut self, conn: ConnId, now: Millis) {
        self.now = now;
        self.close(conn, CloseReason::NetworkError, now);
        self.release(conn);
    }

    /// Frees `conn`'s slot once its socket is closed. Closes it first (with
    /// its will) if the broker had not.
    pub fn release(&mut self, conn: ConnId) {
        if !self.is_closing(conn) {
            self.close(conn, CloseReason::NetworkError, self.now);
        }
        if let Some(Slot::Used(c)) = self.slots.get(conn.index as usize) {
            if c.generation == conn.generation {
                self.slots[conn.index as usize] = Slot::Free {
                    generation: conn.generation.wrapping_add(1),
                };
                self.free_slots.push(conn.index);
            }
        }
    }

    /// A message from another shard, arriving at `now`.
    pub fn handle_remote(&mut self, msg: ShardMsg, now: Millis) {
        self.now = now;
        self.handle_shard_msg(msg);
    }

    fn handle_shard_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Publish(publish) => {
                let outer = self.hold_begin(publish.ticket.is_some());
                self.apply_routed(&publish, None);
                self.answer(outer, publish.ticket);
            }
            ShardMsg::Stored { ticket, dropped } => self.stored(ticket, dropped),
            ShardMsg::StoredMany(answers) => {
                for (ticket, dropped) in answers {
                    self.stored(ticket, dropped);
                }
            }
            ShardMsg::Parked { ticket } => self.backpressure(ticket),
            ShardMsg::Forget { uid } => self.forget_here(uid),
            ShardMsg::RetainedQuery(query) => {
                let mut messages = Vec::new();
                let now = self.now;
                self.retained.for_each_match(&query.filter, |m| {
                    if !is_expired(m.expires_at, now) {
                        messages.push(m.clone());
                    }
                });
                // Nothing to say when nothing matches: the asker keeps no
                // state waiting for an answer.
                if !messages.is_empty() {
                    let to = query.from;
                    self.push_mesh(Event::SendTo(
                        to,
                        ShardMsg::RetainedReply(RetainedReply { query, messages }),
                    ));
                }
            }
            ShardMsg::RetainedReply(reply) => self.retained_reply(reply),
            ShardMsg::ShareJoin {
                share,
                filter,
                member,
                reply,
            } => self.handle_share_join(share, filter, member, reply),
            ShardMsg::ShareJoined { waiter } => self.release_waiter(waiter),
            ShardMsg::ShareLeave { share, member } => {
                if let Some(filter) = self.shared.leave(&share, &member) {
                    self.forget_filter(&filter);
                    if let Some(link) = self.config.link {
                        self.push_mesh(Event::SendTo(
                            link,
                            ShardMsg::InterestRemove {
                                from: self.config.shard,
                                filter: owned_filter(&share),
                            },
                        ));
                    }
                }
            }
            ShardMsg::InterestAdd {
                from,
                filters,
                ticket,
            } => {
                for f in &filters {
                    self.interest.remote_add(from, f);
                }
                self.send_to_shard(from, ShardMsg::InterestAck { ticket });
            }
            ShardMsg::InterestAck { ticket } => self.interest_acked(ticket),
            ShardMsg::InterestRemove { from, filter } => {
                self.interest.remote_remove(from, &filter);
            }
            ShardMsg::ShareOnline { share, member } => self.shared.set_online(&share, &member),
            ShardMsg::ShareDeliver(d) => {
                let outer = self.hold_begin(d.publish.ticket.is_some());
                if !self.seen_before(d.publish.uid) {
                    let before = self.log.len();
                    self.deliver_shared(&d.share, d.session, &d.client_id, &d.publish);
                    self.mark_applied(d.publish.uid, before);
                }
                self.answer(outer, d.publish.ticket);
            }
        }
    }

    /// Retained messages from another shard for one of our new
    /// subscriptions: delivered if the session is still the one that asked
    /// and still has the subscription, with the options it has now.
    fn retained_reply(&mut self, reply: RetainedReply) {
        let RetainedReply { query, messages } = reply;
        let Some(session) = self.session(query.session) else {
            return;
        };
        if session.client_id != query.client_id {
            return;
        }
        let Some(opts) = session.subscription(query.filter.as_str()) else {
            return;
        };
        for msg in messages {
            self.deliver_retained(query.session, msg, opts);
        }
    }

    /// A retained message for a new subscription: RETAIN=1 (MQTT-3.3.1-8),
    /// at most the subscription's QoS, with its identifier.
    fn deliver_retained(&mut self, key: SessionKey, msg: RetainedMessage, opts: SubOpts) {
        if is_expired(msg.expires_at, self.now) {
            return;
        }
        self.deliver_to_session(
            key,
            QueuedMessage {
                qos: msg.qos.min(opts.qos),
                topic: msg.topic,
                payload: msg.payload,
                retain: true,
                props: msg.props,
                expires_at: msg.expires_at,
                sub_ids: sub_ids(opts),
                id: 0,
            },
        );
    }

    /// Advances time: closes every connection silent for 1.5 × its keep-alive
    /// (MQTT-3.1.2-24), publishing its will; publishes delayed wills that
    /// are due and ends sessions whose expiry interval has run out.
    pub fn tick(&mut self, now: Millis) {
        self.now = now;
        let mut expired = Vec::new();
        let slots = &self.slots;
        self.keepalive
            .advance(keepalive_tick(now), |index, generation| {
                let Some(Slot::Used(c)) = slots.get(index as usize) else {
                    return Verdict::Gone;
                };
                if c.generation != generation || c.closing || c.expiry_ms == 0 {
                    return Verdict::Gone;
                }
                // The wheel only says a tick has come; the exact test is here,
                // in milliseconds, so nobody is closed before 1.5 × keep-alive.
                // Strictly after: both times are whole milliseconds cut
                // down from the clock, so `>=` could close up to 1 ms
                // before 1.5 × keep-alive had truly passed.
                // A client whose reads are held for full queues is not
                // silent: we are not reading it.
                let last_seen = if c.reads_held > 0 { now } else { c.last_seen };
                let deadline = last_seen.0 + u64::from(c.expiry_ms) + 1;
                if now.0 >= deadline {
                    expired.push(ConnId { index, generation });
                    Verdict::Expired
                } else {
                    Verdict::Alive {
                        deadline: keepalive_tick(Millis(deadline)),
                    }
                }
            });
        for id in expired {
            bump(&self.counters.keepalive_expiries);
            self.close(id, CloseReason::KeepAliveTimeout, now);
        }
        if !self.parked_sessions.is_empty() {
            self.expire_parked(now);
        }

        let mut wills_due = Vec::new();
        let mut ended = Vec::new();
        let sessions = &self.sessions;
        self.expiry
            .advance(keepalive_tick(now), |index, generation| {
                let Some(Some(s)) = sessions.get(index as usize) else {
                    return Verdict::Gone;
                };
                if s.generation != generation || s.conn.is_some() {
                    return Verdict::Gone;
                }
                if s.expires_at <= now.0 {
                    ended.push(SessionKey(index));
                    return Verdict::Expired;
                }
                let will_due = s.pending_will.as_ref().map(|w| w.due.0);
                if will_due.is_some_and(|due| due <= now.0) {
                    wills_due.push(SessionKey(index));
                }
                // What comes next: the session's end, or a will not yet due
                // (a deadline past the wheel's ring is visited once a lap).
                let next = will_due
                    .filter(|&due| due > now.0)
                    .map_or(s.expires_at, |due| due.min(s.expires_at));
                match next {
                    u64::MAX => Verdict::Expired,
                    at => Verdict::Alive {
                        deadline: keepalive_tick(Millis(at)),
                    },
                }
            });
        for key in wills_due {
            if let Some(pending) = self.session_mut(key).and_then(|s| s.pending_will.take()) {
                self.publish_will(pending.will);
                self.log_session(key);
            }
        }
        for key in ended {
            bump(&self.counters.sessions_expired);
            self.end_session(key);
        }
    }

    /// First step of a shutdown: publishes the will of every open
    /// connection, here and (broadcast) on the other shards, while every
    /// subscriber is still connected to receive them. A broker going away
    /// closes connections its clients did not DISCONNECT, which is when a
    /// will is owed; mosquitto publishes them at shutdown too.
    pub fn publish_all_wills(&mut self) {
        let mut wills = Vec::new();
        for slot in &mut self.slots {
            if let Slot::Used(c) = slot {
                if !c.closing {
                    if let Some(will) = c.will.take() {
                        wills.push((c.session, will));
                    }
                }
            }
        }
        for (session, will) in wills {
            if self.may_write(session, &will.topic) {
                self.publish_will(*will);
            }
        }
    }

    /// A will goes out like any PUBLISH: to every shard, retained if asked,
    /// with its 5.0 properties (the Will Delay Interval is ours alone).
    fn publish_will(&mut self, will: LastWill) {
        bump(&self.counters.wills_published);
        let (props, expires_at) = forwarded_properties(will.properties, self.now);
        self.route(
            RoutedPublish {
                topic: will.topic,
                payload: will.payload,
                qos: will.qos,
                retain: will.retain,
                props,
                expires_at,
                ticket: None,
                uid: 0,
                shares: None,
            },
            None,
        );
    }

    /// `--cluster`: the will of a client whose node died (its connection
    /// ended without DISCONNECT there), published from this node.
    pub fn publish_lost_will(&mut self, will: LastWill, now: Millis) {
        self.now = now;
        self.publish_will(will);
    }

    /// Closes every connection (the last step of a shutdown). A will not
    /// yet published by [`Broker::publish_all_wills`] is published.
    pub fn close_all(&mut self, now: Millis) {
        self.now = now;
        let ids: Vec<ConnId> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Used(c) if !c.closing => Some(ConnId {
                    index: i as u32,
                    generation: c.generation,
                }),
                _ => None,
            })
            .collect();
        for id in ids {
            self.close(id, CloseReason::Shutdown, now);
        }
    }

    fn handle_packet(&mut self, conn: ConnId, packet: Packet, now: Millis) {
        let v5 = self.conn(conn).is_some_and(|c| c.version.is_v5());
        match packet {
            Packet::Publish(publish) => self.handle_publish(conn, publish, now),
            Packet::PubAck(ack) => {
                let done = self
                    .with_session(conn, |s| {
                        let f = s.flows_mut();
                        let mut done = None;
                        if matches!(f.inflight.get(&ack.packet_id.get()), Some((_, Inflight::Published(p))) if p.qos == QoS::AtLeastOnce)
                        {
                            done = f.inflight.remove(&ack.packet_id.get()).map(|(id, _)| id);
                        }
                        s.release_idle_flows();
                        done
                    })
                    .flatten();
                self.log_conn_flow(conn, done, Step::Done);
                self.pump_conn_queue(conn);
            }
            Packet::PubRec(ack) => {
                // The PUBREL waits for the `Released` record: a client
                // that got it may complete the flow and forget the id, so
                // a restart must not send the PUBLISH again.
                let outer = self.hold_begin(true);
                let (known, changed) = self
                    .with_session(conn, |s| {
                        // Only a QoS 2 PUBLISH moves on to its release: a PUBREC
                        // for a QoS 1 id is the client's mistake, and must not
                        // turn a flow that awaits PUBACK into one that never ends.
                        let mut known = false;
                        let mut changed = None;
                        if let Some((order, entry)) =
                            s.flows_mut().inflight.get_mut(&ack.packet_id.get())
                        {
                            known = true;
                            if matches!(entry, Inflight::Published(p) if p.qos == QoS::ExactlyOnce)
                            {
                                let order = *order;
                                if ack.reason >= 0x80 {
                                    // 5.0: a PUBREC with an error code ends the
                                    // flow (MQTT-4.3.3 / §4.9).
                                    s.flows_mut().inflight.remove(&ack.packet_id.get());
                                    known = false;
                                    changed = Some((order, Step::Done));
                                } else {
                                    *entry = Inflight::Released;
                                    changed = Some((order, Step::Released));
                                }
                            }
                        }
                        s.release_idle_flows();
                        (known, changed)
                    })
                    .unwrap_or((false, None));
                if let Some((order, step)) = changed {
                    self.log_conn_flow(conn, Some(order), step);
                }
                let (ticket, _) = self.hold_end(outer, HeldThen::Ack(conn));
                if ack.reason >= 0x80 && v5 {
                    self.pump_conn_queue(conn);
                    return;
                }
                // MQTT-4.3.3-1: answer PUBREC with PUBREL, whatever we knew of
                // it; 5.0 says when we knew nothing (0x92).
                let code = if known || !v5 {
                    reason::SUCCESS
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.send_ack(conn, Packet::PubRel(pub_resp(ack.packet_id, code)), ticket);
            }
            Packet::PubRel(rel) => {
                let ended = self
                    .with_session(conn, |s| {
                        let ended = s.flows_mut().awaiting_rel.remove(&rel.packet_id.get());
                        s.release_idle_flows();
                        ended
                    })
                    .flatten();
                let known = ended.is_some();
                if let Some(uid) = ended.map(|e| e.uid).filter(|&u| u != 0) {
                    self.forget(uid);
                }
                let code = if known || !v5 {
                    reason::SUCCESS
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                // The PUBCOMP waits until the id is known to be free again
                // on disk: the client may reuse it at once.
                let outer = self.hold_begin(known);
                if let (true, Some(key)) = (known, self.conn(conn).and_then(|c| c.session)) {
                    self.log_rel_done(key, rel.packet_id.get());
                }
                let (ticket, _) = self.hold_end(outer, HeldThen::Ack(conn));
                self.send_ack(conn, Packet::PubComp(pub_resp(rel.packet_id, code)), ticket);
            }
            Packet::PubComp(comp) => {
                let done = self
                    .with_session(conn, |s| {
                        let f = s.flows_mut();
                        let mut done = None;
                        if matches!(
                            f.inflight.get(&comp.packet_id.get()),
                            Some((_, Inflight::Released))
                        ) {
                            done = f.inflight.remove(&comp.packet_id.get()).map(|(id, _)| id);
                        }
                        s.release_idle_flows();
                        done
                    })
                    .flatten();
                self.log_conn_flow(conn, done, Step::Done);
                self.pump_conn_queue(conn);
            }
            Packet::Subscribe(sub) => self.handle_subscribe(conn, sub, now),
            Packet::Unsubscribe(unsub) => {
                let Some(key) = self.conn(conn).and_then(|c| c.session) else {
                    return;
                };
                let mut codes = Vec::new();
                for filter in &unsub.filters {
                    let existed = self.unsubscribe(key, filter);
                    if v5 {
                        codes.push(if existed {
                            reason::SUCCESS
                        } else {
                            reason::NO_SUBSCRIPTION_EXISTED
                        });
                    }
                }
                self.log_session(key);
                let ack = Packet::UnsubAck(UnsubAck {
                    packet_id: unsub.packet_id,
                    codes,
                    properties: None,
                });
                self.send_session_ack(conn, key, ack);
            }
            Packet::PingReq => self.queue_packet(conn, &Packet::PingResp),
            Packet::Disconnect(d) => self.handle_disconnect(conn, d, now),
            // MQTT-3.1.0-2: a second CONNECT is a protocol violation. So is any
            // packet only a server sends, and AUTH when CONNECT started no
            // authentication exchange (§4.12).
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp
            | Packet::Auth(_) => {
                bump(&self.counters.malformed_packets);
                self.close(
                    conn,
                    CloseReason::ProtocolError(reason::PROTOCOL_ERROR),
                    now,
                );
            }
        }
    }

    /// DISCONNECT: 0x00 discards the will (MQTT-3.14.4-3), 0x04 publishes
    /// it at once, any other code is an abnormal end (the will follows its
    /// delay). A 5.0 DISCONNECT may set a new Session Expiry Interval, but
    /// not from 0 to more (MQTT-3.14.2-2).
    fn handle_disconnect(&mut self, conn: ConnId, d: Disconnect, now: Millis) {
        let new_expiry = d
            .properties
            .as_ref()
            .and_then(|p| p.session_expiry_interval);
        if let Some(expiry) = new_expiry {
            let key = self.conn(conn).and_then(|c| c.session);
            let max = self.config.max_session_expiry;
            if let Some(s) = key.and_then(|k| self.session_mut(k)) {
                if s.expiry_secs == 0 && expiry != 0 {
                    bump(&self.counters.malformed_packets);
                    self.close(
                        conn,
                        CloseReason::ProtocolError(reason::PROTOCOL_ERROR),
                        now,
                    );
                    return;
                }
                s.expiry_secs = expiry.min(max);
            }
        }
        let why = match d.reason {
            reason::SUCCESS => CloseReason::Disconnect,
            reason::DISCONNECT_WITH_WILL => CloseReason::DisconnectWithWill,
            // The client reports an error of its own: not a normal end, so
            // the will is owed (MQTT-3.1.2-8); nothing is sent back.
            _ => CloseReason::NetworkError,
        };
        self.close(conn, why, now);
    }

    fn handle_publish(&mut self, conn: ConnId, mut publish: Publish, now: Millis) {
        self.counts.publishes_in += 1;
        self.counts.publishes_in_by_qos[usize::from(publish.qos as u8).min(2)] += 1;
        let max_alias = self.config.max_topic_alias;
        let Some(c) = self.conn_mut(conn) else { return };
        let v5 = c.version.is_v5();
        let session = c.session;
        if v5 {
            if let Err(code) = resolve_topic_alias(c, &mut publish, max_alias) {
                bump(&self.counters.malformed_packets);
                self.close(conn, CloseReason::ProtocolError(code), now);
                return;
            }
        }
        // A PUBLISH the client may not write is dropped (counted); a 5.0
        // client is told so in its acknowledgement (0x87), a 3.1.1 one has
        // no way to be.
        let allowed = self.may_write(session, &publish.topic);
        let (props, expires_at) = forwarded_properties(publish.properties.take(), now);
        let routed = allowed.then(|| RoutedPublish {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            props,
            expires_at,
            ticket: None,
            uid: 0,
            shares: None,
        });
        match (publish.qos, publish.packet_id) {
            (QoS::AtMostOnce, _) => {
                if let Some(routed) = routed {
                    self.route(routed, session);
                }
            }
            (QoS::AtLeastOnce, Some(id)) => {
                // The PUBACK waits until every copy is queued for its
                // subscriber (or dropped, which a 5.0 client is told), and
                // with --data-dir until every copy that had to be stored
                // is: here, and on the shards it went to.
                let outer = self.hold_begin(self.settles(v5));
                let code = self.route_and_judge(routed, session, v5);
                let (ticket, dropped) = self.hold_end(outer, HeldThen::Ack(conn));
                let code = if dropped && v5 {
                    self.quota_exceeded()
                } else {
                    code
                };
                let ack = Packet::PubAck(self.ack(conn, id, code));
                self.send_ack(conn, ack, ticket);
            }
            (QoS::ExactlyOnce, Some(id)) => {
                if routed.is_none() && v5 {
                    // The flow ends with this PUBREC (§4.3.3): no PUBREL follows.
                    let ack = self.ack(conn, id, reason::NOT_AUTHORIZED);
                    self.send_ack(conn, Packet::PubRec(ack), None);
                    return;
                }
                // MQTT-4.3.3: a PUBLISH resent before PUBREL is acknowledged
                // again but not delivered again.
                let receive_maximum = usize::from(self.config.receive_maximum);
                let (entry, over) = self
                    .with_session(conn, |s| {
                        let waiting = &s.flows_mut().awaiting_rel;
                        let entry = waiting.get(&id.get()).copied();
                        // MQTT-3.3.4-9 (5.0): no more QoS 2 PUBLISHes
                        // awaiting PUBREL than our Receive Maximum.
                        let over = v5 && entry.is_none() && waiting.len() >= receive_maximum;
                        s.release_idle_flows();
                        (entry, over)
                    })
                    .unwrap_or((None, false));
                if over {
                    bump(&self.counters.malformed_packets);
                    self.close(
                        conn,
                        CloseReason::ProtocolError(reason::RECEIVE_MAXIMUM_EXCEEDED),
                        now,
                    );
                    return;
                }
                // With --data-dir, a persistent session's message is routed
                // under an inbound id, recorded with the packet id: a resend
                // whose copies are not all known durable (a crash came, or
                // the PUBREC still waits) is routed again under it, and the
                // shards that stored it already skip it.
                let (route_it, uid) = match entry {
                    None => {
                        let uid = match session {
                            Some(key) if self.persists(key) => self.next_uid(),
                            _ => 0,
                        };
                        (true, uid)
                    }
                    Some(e) => (!e.confirmed, e.uid),
                };
                let outer = self.hold_begin(route_it && self.settles(v5));
                if entry.is_none() {
                    self.with_session(conn, |s| {
                        s.flows_mut().awaiting_rel.insert(
                            id.get(),
                            AwaitingRel {
                                uid,
                                confirmed: uid == 0,
                            },
                        );
                    });
                    if let Some(key) = session {
                        self.log_await_rel(key, id.get(), uid);
                    }
                }
                let code = if route_it {
                    let routed = routed.map(|r| RoutedPublish { uid, ..r });
                    self.route_and_judge(routed, session, v5)
                } else {
                    reason::SUCCESS
                };
                let (ticket, dropped) = match session {
                    Some(key) => self.hold_end(outer, HeldThen::Rel(conn, key, id.get())),
                    None => self.hold_end(outer, HeldThen::Ack(conn)),
                };
                let refused = dropped && v5;
                if ticket.is_none() {
                    if let Some(key) = session {
                        if refused {
                            // A PUBREC of 0x80 or more ends the flow: no
                            // PUBREL follows (§4.3.3).
                            self.end_inbound_qos2(key, id.get());
                        } else {
                            self.confirm_rel(key, id.get());
                        }
                    }
                }
                let code = if refused { self.quota_exceeded() } else { code };
                let ack = Packet::PubRec(self.ack(conn, id, code));
                self.send_ack(conn, ack, ticket);
            }
            // The codec guarantees an id for QoS > 0 (MQTT-2.3.1-5).
            _ => {
                bump(&self.counters.malformed_packets);
                self.close(
                    conn,
                    CloseReason::ProtocolError(reason::PROTOCOL_ERROR),
                    now,
                );
            }
        }
    }

    /// Routes an acknowledged PUBLISH and picks the 5.0 reason code of its
    /// PUBACK / PUBREC: 0x87 when the ACL refused it, 0x10 when no
    /// subscription anywhere can match it, else success.
    fn route_and_judge(
        &mut self,
        routed: Option<RoutedPublish>,
        origin: Option<SessionKey>,
        v5: bool,
    ) -> u8 {
        let Some(routed) = routed else {
            return if v5 {
                reason::NOT_AUTHORIZED
            } else {
                reason::SUCCESS
            };
        };
        let matched = self.route(routed, origin);
        // Known when the shard has seen every subscription (one shard) or
        // every other shard's filters (`interest`).
        let knows = self.peers() == 1 || self.routed();
        if v5 && !matched && knows {
            reason::NO_MATCHING_SUBSCRIBERS
        } else {
            reason::SUCCESS
        }
    }

    /// An acknowledgement with `code`, and a Reason String for an error when
    /// the client did not ask us to leave them out (MQTT-3.1.2-29).
    fn ack(&self, conn: ConnId, id: PacketId, code: u8) -> PubResp {
        let mut resp = pub_resp(id, code);
        if code == reason::NOT_AUTHORIZED && self.conn(conn).is_some_and(|c| c.problem_info) {
            resp.properties = Some(Box::new(Properties {
                reason_string: Some(ByteString::from_static("not authorized by the ACL")),
                ..Properties::default()
            }));
        }
        resp
    }

    fn handle_subscribe(&mut self, conn: ConnId, sub: codec::Subscribe, now: Millis) {
        let Some(c) = self.conn(conn) else { return };
        let v5 = c.version.is_v5();
        let Some(key) = c.session else { return };
        let routed = self.routed();
        // One identifier for every filter of this SUBSCRIBE (§3.8.2.1.2).
        let id = sub
            .properties
            .as_ref()
            .and_then(|p| p.subscription_identifiers.first().copied())
            .unwrap_or(0);
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut retained_for = Vec::new();
        // What must be in place on the other shards before the SUBACK: see
        // "Ordering" in `interest`.
        let mut announce = Vec::new();
        let mut wait_tickets = Vec::new();
        let mut joins = Vec::new();
        for (filter, options) in &sub.filters {
            let share = shared::parse(filter);
            let target = match &share {
                Shared::No => filter.as_str(),
                Shared::Yes(inner) => inner.as_str(),
                Shared::Invalid => {
                    codes.push(if v5 {
                        reason::TOPIC_FILTER_INVALID
                    } else {
                        SUBACK_FAILURE
                    });
                    continue;
                }
            };
            if matches!(share, Shared::Yes(_)) && options.no_local {
                // MQTT-3.8.3-4: No Local on a shared subscription.
                bump(&self.counters.malformed_packets);
                self.close(
                    conn,
                    CloseReason::ProtocolError(reason::PROTOCOL_ERROR),
                    now,
                );
                return;
            }
            if !self.may(key, Access::Subscribe, target) {
                // MQTT-3.9.3: a failure for this filter alone (5.0: 0x87).
                bump(&self.counters.acl_denied);
                codes.push(if v5 {
                    reason::NOT_AUTHORIZED
                } else {
                    SUBACK_FAILURE
                });
                continue;
            }
            let opts = SubOpts {
                qos: options.qos,
                no_local: options.no_local,
                retain_as_published: options.retain_as_published,
                id,
            };
            // MQTT-3.8.4-3: a repeated filter replaces the old subscription.
            let is_new = self
                .session_mut(key)
                .is_some_and(|s| s.subscribe(filter, opts));
            if is_new {
                bump(&self.counters.subscriptions_current);
            }
            codes.push(options.qos as u8);
            match share {
                Shared::Yes(inner) => {
                    if let Some(s) = self.session_mut(key) {
                        s.shares = true;
                    }
                    // No retained messages for a shared subscription (§4.8.2).
                    joins.push((filter.clone(), inner));
                }
                _ => {
                    self.trie.subscribe(filter, key, opts);
                    if routed {
                        if is_new && self.interest.local_add(filter) {
                            announce.push(owned_filter(filter));
                        } else if let Some(&t) = self.pending_filters.get(filter.as_bytestring()) {
                            wait_tickets.push(t);
                        }
                    }
                    // MQTT-3.3.1-9 .. -11 (5.0): Retain Handling 0 sends the
                    // retained messages, 1 only for a new subscription, 2 never.
                    let send = match options.retain_handling {
                        0 => true,
                        1 => is_new,
                        _ => false,
                    };
                    if send {
                        retained_for.push(filter.clone());
                    }
                }
            }
        }
        let suback = SubAck {
            packet_id: sub.packet_id,
            codes,
            properties: None,
        };
        self.log_session(key);
        wait_tickets.sort_unstable();
        wait_tickets.dedup();
        let left = wait_tickets.len()
            + usize::from(!announce.is_empty())
            + if routed { joins.len() } else { 0 };
        if left == 0 {
            for (share, inner) in joins {
                self.share_join(key, &share, inner, None);
            }
            self.finish_subscribe(conn, key, suback, retained_for);
            return;
        }
        // Registered before anything is sent: an answer may come back at
        // once (a group this shard owns).
        let waiter = self.next_id();
        self.waiters.insert(
            waiter,
            Waiter {
                left,
                then: Then::SubAck {
                    conn,
                    key,
                    suback,
                    retained_for,
                },
            },
        );
        if !announce.is_empty() {
            wait_tickets.push(self.announce(announce));
        }
        for t in wait_tickets {
            if let Some(a) = self.announces.get_mut(&t) {
                a.waiters.push(waiter);
            }
        }
        for (share, inner) in joins {
            self.share_join(key, &share, inner, Some(waiter));
        }
    }

    /// The SUBACK of a SUBSCRIBE whose filters are in place, then the
    /// retained messages its subscriptions are owed (MQTT-3.3.1-6, -8):
    /// this shard's own at once, the other shards' when they answer (see
    /// `retained` for who owns what). Nothing if the connection has gone
    /// meanwhile.
    fn finish_subscribe(
        &mut self,
        conn: ConnId,
        key: SessionKey,
        suback: SubAck,
        retained_for: Vec<TopicFilter>,
    ) {
        if !self
            .conn(conn)
            .is_some_and(|c| !c.closing && c.session == Some(key))
        {
            return;
        }
        self.send_session_ack(conn, key, Packet::SubAck(suback));
        let mut retained = Vec::new();
        for filter in retained_for {
            // Only what the session still subscribes to (an UNSUBSCRIBE may
            // have come while the SUBACK waited), with its options now.
            let Some(opts) = self
                .session(key)
                .and_then(|s| s.subscription(filter.as_str()))
            else {
                continue;
            };
            self.retained
                .for_each_match(&filter, |m| retained.push((m.clone(), opts)));
            if self.config.shards > 1 {
                self.ask_for_retained(key, &filter);
            }
        }
        for (msg, opts) in retained {
            self.deliver_retained(key, msg, opts);
        }
    }

    /// Whether publishes go only to the shards that want them (see
    /// [`super::interest`]): with more than one shard, and no more than a
    /// shard set holds.
    fn routed(&self) -> bool {
        self.peers() > 1 && self.peers() <= MAX_ROUTED_SHARDS
    }

    /// The shards, and the cluster link when there is one: who a broadcast
    /// reaches, counting this shard.
    fn peers(&self) -> u16 {
        self.config.shards + u16::from(self.config.link.is_some())
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Tells every other shard about filters new to this one; the ticket
    /// their acknowledgements will carry.
    fn announce(&mut self, filters: Vec<TopicFilter>) -> u64 {
        let ticket = self.next_id();
        for f in &filters {
            self.pending_filters
                .insert(f.as_bytestring().clone(), ticket);
        }
        self.announces.insert(
            ticket,
            Announce {
                acks_left: self.peers() - 1,
                filters: filters.clone(),
                waiters: Vec::new(),
            },
        );
        self.push_mesh(Event::Broadcast(ShardMsg::InterestAdd {
            from: self.config.shard,
            filters,
            ticket,
        }));
        ticket
    }

    /// One more shard applied announcement `ticket`; when all have, what
    /// waited for it goes ahead.
    fn interest_acked(&mut self, ticket: u64) {
        let Some(a) = self.announces.get_mut(&ticket) else {
            return;
        };
        a.acks_left -= 1;
        if a.acks_left > 0 {
            return;
        }
        let a = self.announces.remove(&ticket).expect("looked up above");
        for f in &a.filters {
            if self.pending_filters.get(f.as_bytestring()) == Some(&ticket) {
                self.pending_filters.remove(f.as_bytestring());
            }
        }
        for w in a.waiters {
            self.release_waiter(w);
        }
    }

    /// One of the things `waiter` waits for is in place.
    fn release_waiter(&mut self, waiter: u64) {
        let Some(w) = self.waiters.get_mut(&waiter) else {
            return;
        };
        w.left -= 1;
        if w.left > 0 {
            return;
        }
        match self.waiters.remove(&waiter).expect("looked up above").then {
            Then::SubAck {
                conn,
                key,
                suback,
                retained_for,
            } => self.finish_subscribe(conn, key, suback, retained_for),
            Then::ShareJoined { to, waiter } => {
                self.send_to_shard(to, ShardMsg::ShareJoined { waiter })
            }
        }
    }

    /// A local subscription to `filter` is gone: when it was the last, the
    /// other shards may stop sending its publishes here.
    fn forget_filter(&mut self, filter: &TopicFilter) {
        if self.routed() && self.interest.local_remove(filter) {
            self.push_mesh(Event::Broadcast(ShardMsg::InterestRemove {
                from: self.config.shard,
                filter: owned_filter(filter),
            }));
        }
    }

    /// On a group's owner: a member joins; a new group's filter is
    /// announced, and the member's shard hears back once every shard
    /// routes the group's publishes here.
    fn handle_share_join(
        &mut self,
        share: TopicFilter,
        filter: TopicFilter,
        member: Member,
        reply: Option<u64>,
    ) {
        let to = member.shard;
        let created = self.shared.join(&share, &filter, member);
        if !self.routed() {
            if let Some(waiter) = reply {
                self.send_to_shard(to, ShardMsg::ShareJoined { waiter });
            }
            return;
        }
        let ticket = if created && self.interest.local_add(&filter) {
            Some(self.announce(vec![owned_filter(&filter)]))
        } else {
            self.pending_filters.get(filter.as_bytestring()).copied()
        };
        // In a cluster the link also learns of the group itself: other
        // nodes then send a publish for it to one node only.
        let group_ticket = match self.config.link {
            Some(link) if created => Some(self.announce_to(link, owned_filter(&share))),
            Some(_) => self.pending_filters.get(share.as_bytestring()).copied(),
            None => None,
        };
        let Some(waiter) = reply else { return };
        let tickets: Vec<u64> = ticket.into_iter().chain(group_ticket).collect();
        if tickets.is_empty() {
            return self.send_to_shard(to, ShardMsg::ShareJoined { waiter });
        }
        let w = self.next_id();
        self.waiters.insert(
            w,
            Waiter {
                left: tickets.len(),
                then: Then::ShareJoined { to, waiter },
            },
        );
        for t in tickets {
            if let Some(a) = self.announces.get_mut(&t) {
                a.waiters.push(w);
            }
        }
    }

    /// Announces `filter` to `peer` alone (the cluster link: a shared
    /// group); the ticket its acknowledgement carries.
    fn announce_to(&mut self, peer: ShardId, filter: TopicFilter) -> u64 {
        let ticket = self.next_id();
        self.pending_filters
            .insert(filter.as_bytestring().clone(), ticket);
        self.announces.insert(
            ticket,
            Announce {
                acks_left: 1,
                filters: vec![filter.clone()],
                waiters: Vec::new(),
            },
        );
        self.push_mesh(Event::SendTo(
            peer,
            ShardMsg::InterestAdd {
                from: self.config.shard,
                filters: vec![filter],
                ticket,
            },
        ));
        ticket
    }

    /// Sends `msg` to `shard`, or handles it here when that is this shard.
    /// Hands `event` (a message for other shards) to the shell, or holds
    /// it. A copy of a QoS 2 PUBLISH routed under an inbound id waits
    /// until the records logged so far here — its `AwaitRel`, which holds
    /// that id — are durable: a shard that stored the copy (with its
    /// `Applied` record) must never be ahead of the origin, or a crash
    /// could lose the id while keeping the copy, and the client's resend
    /// would get a new id and be stored again (MQTT-4.3.3). Whatever
    /// follows a held message waits behind it (messages between two
    /// shards keep their order: ordered topics, MQTT-4.6.0-6).
    fn push_mesh(&mut self, event: Event) {
        let routed_uid = match &event {
            Event::SendTo(_, ShardMsg::Publish(p)) | Event::Broadcast(ShardMsg::Publish(p)) => {
                p.uid
            }
            Event::SendTo(_, ShardMsg::ShareDeliver(d)) => d.publish.uid,
            _ => 0,
        };
        let needs = if routed_uid != 0 {
            self.pending_gen()
        } else {
            None
        };
        match needs {
            None if self.mesh_hold.is_empty() => self.events.push_back(event),
            needs => {
                let generation = needs.unwrap_or(0);
                self.mesh_hold.push_back((generation, event));
            }
        }
    }

    fn send_to_shard(&mut self, shard: ShardId, msg: ShardMsg) {
        if shard == self.config.shard {
            self.handle_shard_msg(msg);
        } else {
            self.push_mesh(Event::SendTo(shard, msg));
        }
    }

    /// Removes one subscription of session `key`; false if it had none.
    fn unsubscribe(&mut self, key: SessionKey, filter: &TopicFilter) -> bool {
        let existed = self.session_mut(key).is_some_and(|s| s.unsubscribe(filter));
        if !existed {
            return false;
        }
        drop_one(&self.counters.subscriptions_current);
        match shared::parse(filter) {
            Shared::Yes(_) => {
                if let Some(s) = self.session_mut(key) {
                    let any_left = s
                        .subscriptions()
                        .any(|(f, _)| f.as_str().starts_with(shared::SHARE_PREFIX));
                    s.shares = any_left;
                }
                if let Some(member) = self.member(key, false) {
                    self.send_to_share_owner(
                        filter,
                        ShardMsg::ShareLeave {
                            share: filter.clone(),
                            member,
                        },
                    );
                }
            }
            _ => {
                self.trie.unsubscribe(filter, key);
                self.forget_filter(filter);
            }
        }
        true
    }

    /// Session `key` as a member of a shared subscription group.
    fn member(&self, key: SessionKey, online: bool) -> Option<Member> {
        self.session(key).map(|s| Member {
            shard: self.config.shard,
            session: key,
            client_id: s.client_id.clone(),
            online,
            busy: s.share_busy,
        })
    }

    /// Tells the owners of session `key`'s groups that its window filled
    /// (`busy`: a message had to wait in its queue) or has room again, when
    /// that changed (see "Balancing" in [`super::shared`]).
    fn set_share_busy(&mut self, key: SessionKey, busy: bool) {
        let Some(s) = self.session_mut(key) else {
            return;
        };
        if !s.shares || s.share_busy == busy {
            return;
        }
        s.share_busy = busy;
        let online = s.conn.is_some();
        self.share_status(key, online);
    }

    /// Tells the owner of `share` that session `key` joined it; with
    /// `reply`, the owner answers when the join is in place everywhere.
    fn share_join(
        &mut self,
        key: SessionKey,
        share: &TopicFilter,
        filter: TopicFilter,
        reply: Option<u64>,
    ) {
        let online = self.session(key).is_some_and(|s| s.conn.is_some());
        if let Some(member) = self.member(key, online) {
            self.send_to_share_owner(
                share,
                ShardMsg::ShareJoin {
                    share: share.clone(),
                    filter: owned_filter(&filter),
                    member,
                    reply,
                },
            );
        }
    }

    /// Tells the owners of session `key`'s shared subscriptions that its
    /// client connected (`online`) or went away.
    fn share_status(&mut self, key: SessionKey, online: bool) {
        let Some(session) = self.session(key).filter(|s| s.shares) else {
            return;
        };
        let shares: Vec<TopicFilter> = session
            .subscriptions()
            .filter(|(f, _)| f.as_str().starts_with(shared::SHARE_PREFIX))
            .map(|(f, _)| f.clone())
            .collect();
        if shares.is_empty() {
            return;
        }
        let Some(member) = self.member(key, online) else {
            return;
        };
        for share in shares {
            let msg = ShardMsg::ShareOnline {
                share: share.clone(),
                member: member.clone(),
            };
            self.send_to_share_owner(&share, msg);
        }
    }

    /// Sends `msg` to the shard that owns the group of `share` (handled at
    /// once when that is this shard).
    fn send_to_share_owner(&mut self, share: &TopicFilter, msg: ShardMsg) {
        let owner = share_owner(share, self.config.shards);
        self.send_to_shard(owner, msg);
    }

    /// A message the group's owner picked session `key` for, through its
    /// subscription `share`: delivered with that subscription's options, if
    /// the session and the subscription are still there.
    fn deliver_shared(
        &mut self,
        share: &TopicFilter,
        key: SessionKey,
        client_id: &ByteString,
        publish: &RoutedPublish,
    ) {
        let Some(session) = self.session(key) else {
            bump(&self.counters.messages_dropped);
            return;
        };
        let Some(opts) = (session.client_id == *client_id)
            .then(|| session.subscription(share.as_str()))
            .flatten()
        else {
            bump(&self.counters.messages_dropped);
            return;
        };
        self.deliver_to_session(
            key,
            QueuedMessage {
                topic: publish.topic.clone(),
                payload: publish.payload.clone(),
                qos: publish.qos.min(opts.qos),
                retain: opts.retain_as_published && publish.retain,
                props: publish.props.clone(),
                expires_at: publish.expires_at,
                sub_ids: sub_ids(opts),
                id: 0,
            },
        );
    }

    /// A message the broker publishes itself (`$SYS`): routed like a
    /// client's PUBLISH.
    pub fn publish(&mut self, topic: TopicName, payload: Bytes, qos: QoS, retain: bool) {
        self.route(
            RoutedPublish {
                topic,
                payload,
                qos,
                retain,
                props: None,
                expires_at: None,
                ticket: None,
                uid: 0,
                shares: None,
            },
            None,
        );
    }

    /// Publishes on this shard and on every other: the path of client
    /// PUBLISHes and wills alike. `origin` is the publishing session (for
    /// No Local). True if a subscription on this shard matched.
    fn route(&mut self, publish: RoutedPublish, origin: Option<SessionKey>) -> bool {
        let matched = self.apply_routed(&publish, origin);
        if self.peers() == 1 {
            return matched;
        }
        let mut publish = publish;
        if !self.routed() {
            self.tag(&mut publish, u32::from(self.peers()) - 1);
            self.push_mesh(Event::Broadcast(ShardMsg::Publish(publish)));
            return true;
        }
        // Only the shards with a subscription that can match it, and the
        // topic's retained owner when it is retained (see `interest`).
        let interested = self.interest.shards_for(&publish.topic);
        let mut to = interested;
        if publish.retain {
            to.insert(retained_owner(publish.topic.as_str(), self.config.shards));
            // Every node keeps every retained message (`$SYS` is each
            // node's own).
            if let Some(link) = self
                .config
                .link
                .filter(|_| !is_broker_topic(&publish.topic))
            {
                to.insert(link);
            }
        }
        let me = self.config.shard;
        let copies = to.iter().filter(|&s| s != me).count() as u32;
        if copies > 0 {
            self.tag(&mut publish, copies);
        }
        for shard in to.iter().filter(|&s| s != me) {
            self.push_mesh(Event::SendTo(shard, ShardMsg::Publish(publish.clone())));
        }
        matched || interested != ShardSet::default()
    }

    /// Asks the shards that may own retained messages `filter` matches.
    fn ask_for_retained(&mut self, key: SessionKey, filter: &TopicFilter) {
        let Some(client_id) = self.session(key).map(|s| s.client_id.clone()) else {
            return;
        };
        let query = RetainedQuery {
            from: self.config.shard,
            session: key,
            client_id,
            filter: filter.clone(),
        };
        if filter.has_wildcards() {
            self.push_mesh(Event::Broadcast(ShardMsg::RetainedQuery(query)));
        } else {
            // An exact filter is one topic, owned by one shard.
            let owner = retained_owner(filter.as_str(), self.config.shards);
            if owner != self.config.shard {
                self.push_mesh(Event::SendTo(owner, ShardMsg::RetainedQuery(query)));
            }
        }
    }

    /// Stores (or clears) a retained message if this shard owns its topic.
    fn store_retained(&mut self, publish: &RoutedPublish) {
        if retained_owner(publish.topic.as_str(), self.config.shards) != self.config.shard {
            return;
        }
        let before = self.retained.len();
        self.retained.set(RetainedMessage {
            topic: publish.topic.clone(),
            payload: publish.payload.clone(),
            qos: publish.qos,
            props: publish.props.clone(),
            expires_at: publish.expires_at,
        });
        match self.retained.len().cmp(&before) {
            std::cmp::Ordering::Greater => bump(&self.counters.retained_current),
            std::cmp::Ordering::Less => drop_one(&self.counters.retained_current),
            std::cmp::Ordering::Equal => {}
        }
        if self.config.persist && !is_broker_topic(&publish.topic) {
            if publish.payload.is_empty() {
                persist::put_unretain(&mut self.log, publish.topic.as_str());
            } else {
                let expires_at = publish.expires_at.map(|t| self.wall(t));
                persist::put_retain(
                    &mut self.log,
                    &persist::StoredRetainedRef {
                        topic: publish.topic.as_str(),
                        payload: &publish.payload,
                        qos: publish.qos,
                        props: publish.props.as_deref(),
                        expires_at,
                    },
                );
            }
        }
    }

    /// Delivers `publish` to this shard's matching sessions and to one
    /// member of each shared group this shard owns. True if anything matched.
    fn deliver_local(&mut self, publish: &RoutedPublish, origin: Option<SessionKey>) -> bool {
        if is_expired(publish.expires_at, self.now) {
            bump(&self.counters.messages_expired);
            return false;
        }
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        // MQTT-3.3.5-1 / MQTT-3.3.4-2, -3: overlapping subscriptions of one
        // client get one copy, at the highest granted QoS, with every
        // matching Subscription Identifier.
        self.trie.for_each_match(&publish.topic, |_, key, opts| {
            // MQTT-3.8.3-3: No Local.
            if opts.no_local && origin == Some(key) {
                return;
            }
            let fold = matches.entry(key).or_default();
            fold.qos = Some(fold.qos.map_or(opts.qos, |q| q.max(opts.qos)));
            // MQTT-3.3.1-12 / -13: RETAIN kept only as published, and only
            // for a subscription that asked for it.
            fold.retain |= opts.retain_as_published && publish.retain;
            if opts.id != 0 {
                fold.ids.push(opts.id);
            }
        });
        let mut matched = !matches.is_empty();
        for (key, fold) in matches.drain() {
            let granted = fold.qos.unwrap_or(QoS::AtMostOnce);
            self.deliver_to_session(
                key,
                QueuedMessage {
                    topic: publish.topic.clone(),
                    payload: publish.payload.clone(),
                    qos: publish.qos.min(granted), // MQTT-3.8.4-6
                    retain: fold.retain,           // MQTT-3.3.1-9 for 3.1.1
                    props: publish.props.clone(),
                    expires_at: publish.expires_at,
                    sub_ids: fold.ids,
                    id: 0,
                },
            );
        }
        self.matches = matches;

        if !self.shared.is_empty() {
            let mut picks = Vec::new();
            self.shared.pick(&publish.topic, &mut picks);
            if let Some(only) = &publish.shares {
                // Another node delivered it to the other groups.
                picks.retain(|(share, _)| only.iter().any(|s| s == share.as_bytestring()));
            }
            matched |= !picks.is_empty();
            for (share, member) in picks {
                if member.shard == self.config.shard {
                    self.deliver_shared(&share, member.session, &member.client_id, publish);
                } else {
                    let mut publish = publish.clone();
                    self.tag(&mut publish, 1);
                    self.push_mesh(Event::SendTo(
                        member.shard,
                        ShardMsg::ShareDeliver(ShareDelivery {
                            share,
                            session: member.session,
                            client_id: member.client_id,
                            publish,
                        }),
                    ));
                }
            }
        }
        matched
    }

    /// Whether the client of `session` may publish to `topic` — a PUBLISH,
    /// or a will, which is a PUBLISH on its behalf: never to the broker's
    /// `$SYS` topics, and only what the ACL grants when there is one.
    /// A refusal is counted.
    fn may_write(&self, session: Option<SessionKey>, topic: &TopicName) -> bool {
        let allowed = !is_broker_topic(topic)
            && (self.config.acl.is_none()
                || session.is_some_and(|k| self.may(k, Access::Write, topic.as_str())));
        if !allowed {
            bump(&self.counters.acl_denied);
        }
        allowed
    }

    /// Whether session `key`'s client may do `access` with `target` under
    /// the ACL (always, without one).
    fn may(&self, key: SessionKey, access: Access, target: &str) -> bool {
        let Some(acl) = &self.config.acl else {
            return true;
        };
        self.session(key)
            .is_some_and(|s| acl.allows(s.username.as_deref(), &s.client_id, access, target))
    }

    /// Delivers one message to a session: at once when it is connected and
    /// its inflight window has room, else (QoS 1/2) into its queue. The ACL
    /// may hold it back (a `deny` inside a broader grant).
    fn deliver_to_session(&mut self, key: SessionKey, mut msg: QueuedMessage) {
        if self.config.acl.is_some() && !self.may(key, Access::Read, msg.topic.as_str()) {
            return;
        }
        if msg.qos != QoS::AtMostOnce {
            msg.id = self.next_msg_id;
            self.next_msg_id += 1;
        }
        let max_queued = self.config.max_queued;
        let Some(session) = self.session(key) else {
            return;
        };
        let conn = session.conn;
        if msg.qos == QoS::AtMostOnce {
            // QoS 0 is never queued: an offline session misses it, as
            // mosquitto does by default (MQTT-3.1.2-5 lets the server choose).
            match conn {
                Some(conn) => self.send_now(conn, key, msg),
                None => bump(&self.counters.messages_dropped),
            }
            return;
        }
        let window = conn.map_or(0, |c| self.window(c));
        let session = self.session_mut(key).expect("looked up above");
        let must_wait =
            conn.is_none() || session.queue_len() > 0 || session.inflight_len() >= window;
        if !must_wait {
            if let Some(conn) = conn {
                self.log_message(key, &msg);
                self.send_now(conn, key, msg);
            }
            return;
        }
        // Parked messages go first: one waits only while the queue is full.
        let full = session.queue_len() >= max_queued || session.parked_len() > 0;
        if full {
            self.queue_full(key, conn, msg);
        } else {
            self.enqueue(key, msg);
        }
        let session = self.session_mut(key).expect("looked up above");
        let newly_busy = conn.is_some() && session.shares && !session.share_busy;
        if newly_busy {
            // Connected, yet a message had to wait: its window is full.
            self.set_share_busy(key, true);
        }
    }

    /// Puts a message at the end of a session's queue.
    fn enqueue(&mut self, key: SessionKey, msg: QueuedMessage) {
        self.log_message(key, &msg);
        let deep = self.config.max_queued / 10;
        let Some(session) = self.session_mut(key) else {
            return;
        };
        session.flows_mut().queue.push_back(msg);
        let len = session.queue_len();
        bump(&self.counters.messages_queued);
        if len > deep.max(1) {
            self.deep_queues.insert(key);
        }
    }

    /// A QoS 1/2 message for a session whose queue is full: parked with
    /// its publisher's acknowledgement, or dropped, as `--queue-full`
    /// says (see [`QueueFull`]). Every outcome is counted.
    fn queue_full(&mut self, key: SessionKey, conn: Option<ConnId>, msg: QueuedMessage) {
        let policy = self.config.queue_full;
        let max_queued = self.config.max_queued;
        let now = self.now;
        let Some(session) = self.session_mut(key) else {
            return;
        };
        if !session.queue_full_seen {
            session.queue_full_seen = true;
            tracing::warn!(
                client_id = %session.client_id,
                max_queued,
                %policy,
                "session queue full (logged once per session)"
            );
        }
        let stalled = session.flows().is_some_and(|f| f.stalled);
        let queued = session.queue_len();
        match policy {
            QueueFull::Backpressure if conn.is_some() && !stalled && self.hold.is_some() => {
                let hold = self.hold.as_mut().expect("checked above");
                hold.parked += 1;
                let ticket = hold.ticket;
                let session = self.session_mut(key).expect("looked up above");
                session.flows_mut().parked.push_back(Parked {
                    msg,
                    ticket,
                    since: now,
                });
                self.parked_sessions.insert(key);
                bump(&self.counters.queue_full_held);
            }
            QueueFull::DropOldest if queued > 0 => {
                let session = self.session_mut(key).expect("looked up above");
                if let Some(old) = session.flows_mut().queue.pop_front() {
                    drop_one(&self.counters.messages_queued);
                    self.log_flow(key, old.id, Step::Done);
                }
                bump(&self.counters.messages_dropped);
                bump(&self.counters.queue_full_dropped_oldest);
                self.enqueue(key, msg);
            }
            _ => {
                // The newest message is the one dropped, so what the client
                // does get stays in order.
                if let Some(hold) = &mut self.hold {
                    hold.dropped = true;
                }
                bump(&self.counters.messages_dropped);
                bump(&self.counters.queue_full_dropped_newest);
            }
        }
    }

    /// Moves parked messages into the queue while it has room (one even
    /// with `--max-queued 0`, so a parked message can still go when the
    /// window opens), settling their publishes. True if any moved.
    fn unpark(&mut self, key: SessionKey) -> bool {
        let room = self.config.max_queued.max(1);
        let mut moved = false;
        while let Some(session) = self.session_mut(key) {
            if session.queue_len() >= room {
                break;
            }
            let Some(p) = session
                .existing_flows_mut()
                .and_then(|f| f.parked.pop_front())
            else {
                break;
            };
            self.enqueue(key, p.msg);
            self.park_settled(p.ticket, false);
            moved = true;
        }
        if self.session(key).is_none_or(|s| s.parked_len() == 0) {
            self.parked_sessions.remove(&key);
        }
        moved
    }

    /// Drops every message parked for `key` (its client went away, or it
    /// stopped reading past the timeout), settling their publishes as
    /// dropped.
    fn drop_parked(&mut self, key: SessionKey, timed_out: bool) {
        self.parked_sessions.remove(&key);
        let parked = match self.session_mut(key).and_then(|s| s.existing_flows_mut()) {
            Some(f) => {
                if timed_out {
                    f.stalled = true;
                }
                std::mem::take(&mut f.parked)
            }
            None => return,
        };
        for p in parked {
            bump(&self.counters.messages_dropped);
            bump(if timed_out {
                &self.counters.queue_full_timeouts
            } else {
                &self.counters.queue_full_dropped_newest
            });
            self.park_settled(p.ticket, true);
        }
    }

    /// The tick's look at parked messages: a session whose oldest has
    /// waited `--queue-full-timeout` is not reading; what it has parked is
    /// dropped and it is marked stalled.
    fn expire_parked(&mut self, now: Millis) {
        let timeout = self.config.queue_full_timeout_ms;
        let due: Vec<SessionKey> = self
            .parked_sessions
            .iter()
            .copied()
            .filter(|&key| {
                self.session(key)
                    .and_then(|s| s.flows())
                    .and_then(|f| f.parked.front())
                    .is_none_or(|p| p.since.0 + timeout <= now.0)
            })
            .collect();
        for key in due {
            if let Some(s) = self.session(key) {
                tracing::warn!(
                    client_id = %s.client_id,
                    parked = s.parked_len(),
                    "session not reading: messages waiting for its full queue dropped after the timeout"
                );
            }
            self.drop_parked(key, true);
        }
    }

    /// Up to `n` sessions with the deepest queues (parked messages
    /// included), deepest first: their clientIds and depths, for the
    /// metrics endpoint and `$SYS`. Only sessions past a tenth of
    /// `--max-queued` are looked at.
    pub fn deepest_queues(&mut self, n: usize) -> Vec<(ByteString, u64)> {
        let deep = (self.config.max_queued / 10).max(1);
        let sessions = &self.sessions;
        let depth = |key: SessionKey| {
            sessions
                .get(key.0 as usize)
                .and_then(Option::as_ref)
                .map_or(0, |s| s.queue_len() + s.parked_len())
        };
        self.deep_queues.retain(|&key| depth(key) > deep);
        // The n deepest without sorting them all (a fleet may have many
        // deep queues), then only those sorted and named.
        let mut all: Vec<(usize, SessionKey)> =
            self.deep_queues.iter().map(|&k| (depth(k), k)).collect();
        let deepest_first = |a: &(usize, SessionKey), b: &(usize, SessionKey)| b.cmp(a);
        if n > 0 && all.len() > n {
            all.select_nth_unstable_by(n - 1, deepest_first);
        }
        all.truncate(n);
        all.sort_unstable_by(deepest_first);
        all.into_iter()
            .filter_map(|(d, key)| Some((self.session(key)?.client_id.clone(), d as u64)))
            .collect()
    }

    /// QoS 1/2 messages that may be in flight to `conn` at once: its 5.0
    /// Receive Maximum (MQTT-3.3.4-7), or `--max-inflight`.
    fn window(&self, conn: ConnId) -> usize {
        self.conn(conn).map_or(0, |c| usize::from(c.window))
    }

    fn pump_conn_queue(&mut self, conn: ConnId) {
        if let Some(key) = self.conn(conn).and_then(|c| c.session) {
            self.pump_queue(key);
        }
    }

    /// Moves queued messages into flight while the window has room, and
    /// parked messages into the queue while it has room.
    fn pump_queue(&mut self, key: SessionKey) {
        loop {
            self.pump_queue_once(key);
            if !self.unpark(key) {
                return;
            }
        }
    }

    fn pump_queue_once(&mut self, key: SessionKey) {
        loop {
            let Some(conn) = self.session(key).and_then(|s| s.conn) else {
                return;
            };
            let window = self.window(conn);
            let session = self.session_mut(key).expect("looked up above");
            if session.inflight_len() >= window {
                return;
            }
            let Some(msg) = session.flows_mut().queue.pop_front() else {
                session.release_idle_flows();
                // Nothing waits and the window has room again.
                self.set_share_busy(key, false);
                return;
            };
            // It takes messages again: what meets its full queue may wait.
            session.flows_mut().stalled = false;
            drop_one(&self.counters.messages_queued);
            self.send_now(conn, key, msg);
        }
    }

    fn send_now(&mut self, conn: ConnId, key: SessionKey, msg: QueuedMessage) {
        let QueuedMessage {
            topic,
            payload,
            qos,
            retain,
            props,
            expires_at,
            sub_ids,
            id: msg_id,
        } = msg;
        // MQTT-3.3.2-5: a message whose expiry passed while it waited is not
        // sent; MQTT-3.3.2-6: one that is carries what is left of it.
        let remaining = match expires_at {
            Some(at) if at <= self.now => {
                bump(&self.counters.messages_expired);
                if qos != QoS::AtMostOnce {
                    self.log_flow(key, msg_id, Step::Done);
                }
                return;
            }
            Some(at) => Some((at.0 - self.now.0).div_ceil(1000) as u32),
            None => None,
        };
        let Some(c) = self.conn(conn) else { return };
        let (version, max_packet, pending) = (c.version, c.max_packet, c.outgoing.len());
        let properties = delivery_properties(props, sub_ids, remaining, version.is_v5());
        let mut publish = Publish {
            dup: false,
            qos,
            retain,
            topic,
            // A placeholder of the right size until an id is allocated.
            packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(1).expect("1 is not 0")),
            payload,
            properties,
        };
        // MQTT-3.1.2-25 (5.0): a PUBLISH larger than the client's Maximum
        // Packet Size is not sent, as if it had been (nothing goes in flight).
        if max_packet != u32::MAX && publish.encoded_len(version) > max_packet as usize {
            bump(&self.counters.oversize_dropped);
            if qos != QoS::AtMostOnce {
                self.log_flow(key, msg_id, Step::Done);
            }
            return;
        }
        if qos == QoS::AtMostOnce {
            // A client that does not read must not grow our memory: past the
            // cap its QoS 0 messages are dropped and counted (QoS 1/2 are
            // bounded by the inflight window and the queue instead).
            if pending >= MAX_PENDING_OUTGOING {
                bump(&self.counters.messages_dropped);
                return;
            }
        } else {
            let Some(session) = self.session_mut(key) else {
                return;
            };
            let Some(id) = session.allocate_packet_id() else {
                bump(&self.counters.messages_dropped);
                self.log_flow(key, msg_id, Step::Done);
                return;
            };
            publish.packet_id = Some(id);
            session
                .flows_mut()
                .start(id.get(), msg_id, Inflight::Published(publish.clone()));
            self.log_flow(key, msg_id, Step::Sent(id.get()));
        }
        self.counts.publishes_out += 1;
        self.counts.publishes_out_by_qos[usize::from(publish.qos as u8).min(2)] += 1;
        self.queue_publish(conn, publish);
    }

    /// Queues a PUBLISH for `conn`, naming its topic by a server-to-client
    /// Topic Alias where the client allows them (§3.3.2.3.4): the first
    /// topics sent get one, up to its Topic Alias Maximum, and later
    /// deliveries to them carry the two-byte alias instead of the topic.
    fn queue_publish(&mut self, conn: ConnId, mut publish: Publish) {
        let Some(c) = self.conn_mut(conn) else { return };
        // A new alias adds a property (up to 4 bytes with the length): never
        // one that would take the packet over the client's maximum, or the
        // client would miss the packet that tells it the alias.
        let room =
            c.max_packet == u32::MAX || publish.encoded_len(c.version) + 4 <= c.max_packet as usize;
        if c.alias_out_max > 0 {
            let aliases = c.aliases.get_or_insert_with(Default::default);
            let alias = match aliases.outgoing.get(publish.topic.as_bytestring()) {
                Some(&a) => {
                    publish.topic = TopicName::alias_only();
                    Some(a)
                }
                None if room && aliases.outgoing.len() < usize::from(c.alias_out_max) => {
                    let a = aliases.outgoing.len() as u16 + 1;
                    // A copy: the topic may be a slice of a read buffer.
                    let topic = ByteString::from(String::from(publish.topic.as_str()));
                    aliases.outgoing.insert(topic, a);
                    Some(a)
                }
                None => None,
            };
            if let Some(a) = alias {
                publish
                    .properties
                    .get_or_insert_with(Default::default)
                    .topic_alias = Some(a);
            }
        }
        self.queue_packet(conn, &Packet::Publish(publish));
    }

    /// MQTT-4.4.0-1: on a resumed session, unacknowledged PUBLISHes are sent
    /// again with DUP=1 and PUBRELs again, in their original order.
    fn resend_inflight(&mut self, conn: ConnId, key: SessionKey) {
        let Some(flows) = self.session(key).and_then(Session::flows) else {
            return;
        };
        for (id, flight) in flows.inflight_in_order() {
            match flight {
                Inflight::Published(mut p) => {
                    p.dup = true;
                    self.queue_publish(conn, p);
                }
                Inflight::Released => {
                    if let Some(pid) = PacketId::new(id) {
                        self.queue_packet(conn, &Packet::PubRel(pub_resp(pid, reason::SUCCESS)));
                    }
                }
            }
        }
    }

    /// Ends a connection: tells a 5.0 client why when the server decides,
    /// publishes its will unless it sent DISCONNECT (now, or after its Will
    /// Delay Interval while the session lives on), detaches its session
    /// (ending one whose expiry is 0), and asks the shell to close the
    /// socket. Idempotent.
    fn close(&mut self, conn: ConnId, reason: CloseReason, now: Millis) {
        let Some(c) = self.conn(conn) else { return };
        if c.closing {
            return;
        }
        if c.version.is_v5() {
            if let Some(code) = reason.disconnect_code() {
                self.queue_packet(
                    conn,
                    &Packet::Disconnect(Disconnect {
                        reason: code,
                        properties: None,
                    }),
                );
            }
        }
        let c = self.conn_mut(conn).expect("looked up above");
        c.closing = true;
        c.linger = matches!(
            reason,
            CloseReason::ProtocolError(_) | CloseReason::TakenOver
        );
        let will = c.will.take();
        let session = c.session.take();
        drop_one(&self.counters.connections_current);
        tracing::debug!(?conn, ?reason, "closing connection");
        // Judged while the session (and so who the client is) still exists.
        let mut will = match reason {
            CloseReason::Disconnect => None,
            _ => will.filter(|w| self.may_write(session, &w.topic)),
        };

        if let Some(key) = session {
            self.share_status(key, false);
            let delay = will
                .as_ref()
                .and_then(|w| w.properties.as_ref())
                .and_then(|p| p.will_delay_interval)
                .unwrap_or(0);
            // Backpressure is for connected subscribers only.
            self.drop_parked(key, false);
            let expiry = match self.session_mut(key) {
                Some(s) => {
                    s.conn = None;
                    s.generation = s.generation.wrapping_add(1);
                    s.expiry_secs
                }
                None => 0,
            };
            if expiry == 0 {
                // MQTT-3.1.2-23 (5.0) / -6 (3.1.1): the session ends with
                // its connection; a will goes out now (the session ending
                // comes before any delay).
                if let Some(w) = will.take() {
                    self.publish_will(*w);
                }
                self.end_session(key);
            } else {
                let s = self.session_mut(key).expect("detached above");
                s.expires_at = match expiry {
                    NEVER_EXPIRES => u64::MAX,
                    secs => now.0 + u64::from(secs) * 1000,
                };
                // §3.1.3.2.2: the will waits for its delay, unless the
                // client asked for it now (0x04) or the broker is going.
                let waits = delay > 0
                    && !matches!(
                        reason,
                        CloseReason::DisconnectWithWill | CloseReason::Shutdown
                    );
                if waits {
                    if let Some(w) = will.take() {
                        s.pending_will = Some(Box::new(PendingWill {
                            will: *w,
                            due: Millis(now.0 + u64::from(delay) * 1000),
                        }));
                    }
                }
                let due = s
                    .pending_will
                    .as_ref()
                    .map_or(s.expires_at, |w| w.due.0.min(s.expires_at));
                if due != u64::MAX {
                    let generation = s.generation;
                    self.expiry
                        .register(key.0, generation, keepalive_tick(Millis(due)));
                }
                self.log_session(key);
            }
        }
        if let Some(will) = will {
            self.publish_will(*will);
        }
        self.events.push_back(Event::Close(conn));
    }

    fn queue_packet(&mut self, conn: ConnId, packet: &Packet) {
        let Some(c) = self.conn_mut(conn) else { return };
        if c.closing {
            return;
        }
        // MQTT-3.1.2-24 (5.0): nothing larger than the client accepts.
        if c.max_packet != u32::MAX && packet.encoded_len(c.version) > c.max_packet as usize {
            bump(&self.counters.oversize_dropped);
            return;
        }
        packet.encode(c.version, &mut c.outgoing);
        let first = !c.transmit_queued;
        c.transmit_queued = true;
        self.counts.packets_out += 1;
        if first {
            self.events.push_back(Event::Transmit(conn));
        }
    }

    fn with_session<R>(&mut self, conn: ConnId, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        let key = self.conn(conn)?.session?;
        self.session_mut(key).map(f)
    }

    fn allocate_conn(&mut self, mut conn: Conn) -> ConnId {
        if let Some(index) = self.free_slots.pop() {
            let generation = match self.slots[index as usize] {
                Slot::Free { generation } => generation,
                Slot::Used(_) => unreachable!("free list holds only free slots"),
            };
            conn.generation = generation;
            self.slots[index as usize] = Slot::Used(conn);
            ConnId { index, generation }
        } else {
            let index = self.slots.len() as u32;
            self.slots.push(Slot::Used(conn));
            ConnId {
                index,
                generation: 0,
            }
        }
    }

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        match self.slots.get(id.index as usize) {
            Some(Slot::Used(c)) if c.generation == id.generation => Some(c),
            _ => None,
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        match self.slots.get_mut(id.index as usize) {
            Some(Slot::Used(c)) if c.generation == id.generation => Some(c),
            _ => None,
        }
    }

    fn find_session(&self, client_id: &str) -> Option<SessionKey> {
        let hash = self.hasher.hash_one(client_id);
        let sessions = &self.sessions;
        self.by_client_id
            .find(hash, |k| {
                sessions[k.0 as usize]
                    .as_ref()
                    .is_some_and(|s| &*s.client_id == client_id)
            })
            .copied()
    }

    fn create_session(&mut self, client_id: ByteString, expiry_secs: u32) -> SessionKey {
        // A copy of its own: the id arrived as a slice of the CONNECT's read
        // buffer, which it would otherwise keep alive for the session's life.
        let client_id = ByteString::from(String::from(&*client_id));
        let hash = self.hasher.hash_one(&*client_id);
        let session = Session::new(client_id, expiry_secs);
        let key = match self.free_sessions.pop() {
            Some(i) => {
                self.sessions[i as usize] = Some(session);
                SessionKey(i)
            }
            None => {
                self.sessions.push(Some(session));
                SessionKey(self.sessions.len() as u32 - 1)
            }
        };
        bump(&self.counters.sessions_current);
        let (sessions, hasher) = (&self.sessions, &self.hasher);
        self.by_client_id.insert_unique(hash, key, |k| {
            let id = sessions[k.0 as usize]
                .as_ref()
                .map_or("", |s| &*s.client_id);
            hasher.hash_one(id)
        });
        key
    }

    /// A session ends (its expiry ran out, its connection closed with
    /// expiry 0, or a Clean Start replaced it): a will still waiting for its
    /// delay goes out now (§3.1.3.2.2: "or the Session ends, whichever
    /// happens first"), then everything of it is forgotten.
    fn end_session(&mut self, key: SessionKey) {
        if let Some(pending) = self.session_mut(key).and_then(|s| s.pending_will.take()) {
            self.publish_will(pending.will);
        }
        self.remove_session(key);
    }

    fn remove_session(&mut self, key: SessionKey) {
        self.drop_parked(key, false);
        let Some(session) = self.sessions.get_mut(key.0 as usize).and_then(Option::take) else {
            return;
        };
        drop_one(&self.counters.sessions_current);
        let queued = session.queue_len() as u64;
        if queued > 0 {
            self.counters
                .messages_queued
                .fetch_sub(queued, std::sync::atomic::Ordering::Relaxed);
        }
        if session.logged {
            persist::put_session_gone(&mut self.log, &session.client_id);
        }
        // Inbound QoS 2 flows that will never get their PUBREL now.
        if let Some(f) = session.flows() {
            let uids: Vec<u64> = f
                .awaiting_rel
                .values()
                .map(|a| a.uid)
                .filter(|&u| u != 0)
                .collect();
            for uid in uids {
                self.forget(uid);
            }
        }
        for (filter, _) in session.subscriptions() {
            drop_one(&self.counters.subscriptions_current);
            if filter.as_str().starts_with(shared::SHARE_PREFIX) {
                let member = Member {
                    shard: self.config.shard,
                    session: key,
                    client_id: session.client_id.clone(),
                    online: false,
                    busy: false,
                };
                self.send_to_share_owner(
                    filter,
                    ShardMsg::ShareLeave {
                        share: filter.clone(),
                        member,
                    },
                );
            } else {
                self.trie.unsubscribe(filter, key);
                self.forget_filter(filter);
            }
        }
        let hash = self.hasher.hash_one(&*session.client_id);
        if let Ok(entry) = self.by_client_id.find_entry(hash, |k| *k == key) {
            entry.remove();
        }
        self.free_sessions.push(key.0);
    }

    // ------------------------------------------------------------ durability

    /// Wall-clock milliseconds of broker time `t`.
    fn wall(&self, t: Millis) -> u64 {
        self.config.wall_epoch_ms.saturating_add(t.0)
    }

    /// Whether session `key`'s state goes in the log: `--data-dir` is set
    /// and the session outlives its connection.
    fn persists(&self, key: SessionKey) -> bool {
        self.config.persist && self.session(key).is_some_and(|s| s.expiry_secs > 0)
    }

    /// Session `s` as a `Session` record describes it.
    fn session_state(&self, s: &Session) -> SessionState {
        let will = match s.conn.and_then(|c| self.conn(c)) {
            Some(c) => c.will.as_ref().map(|w| StoredWill {
                will: (**w).clone(),
                due: persist::NO_TIME,
            }),
            None => s.pending_will.as_ref().map(|p| StoredWill {
                will: p.will.clone(),
                due: self.wall(p.due),
            }),
        };
        SessionState {
            client_id: s.client_id.clone(),
            expiry_secs: s.expiry_secs,
            connected: s.conn.is_some(),
            expires_at: if s.conn.is_some() || s.expires_at == u64::MAX {
                persist::NO_TIME
            } else {
                self.wall(Millis(s.expires_at))
            },
            username: s.username.clone(),
            subscriptions: s.subscriptions().map(|(f, o)| (f.clone(), o)).collect(),
            will,
        }
    }

    /// Logs session `key`'s settings, subscriptions and will, if it persists.
    fn log_session(&mut self, key: SessionKey) {
        if !self.persists(key) {
            return;
        }
        let Some(s) = self.session(key) else { return };
        let state = self.session_state(s);
        persist::put_session(&mut self.log, &state);
        if let Some(s) = self.session_mut(key) {
            s.logged = true;
        }
    }

    /// Logs a step of stored message `id`'s flow to session `key`.
    fn log_flow(&mut self, key: SessionKey, id: u64, step: Step) {
        if !self.persists(key) {
            return;
        }
        let (sessions, log) = (&self.sessions, &mut self.log);
        let Some(Some(s)) = sessions.get(key.0 as usize) else {
            return;
        };
        match step {
            Step::Sent(pid) => persist::put_sent(log, &s.client_id, id, pid),
            Step::Released => persist::put_released(log, &s.client_id, id),
            Step::Done => persist::put_done(log, &s.client_id, id),
        }
    }

    /// [`Broker::log_flow`] for the session of `conn`, when `id` is some.
    fn log_conn_flow(&mut self, conn: ConnId, id: Option<u64>, step: Step) {
        if let (Some(id), Some(key)) = (id, self.conn(conn).and_then(|c| c.session)) {
            self.log_flow(key, id, step);
        }
    }

    /// Logs a message owed to session `key`.
    fn log_message(&mut self, key: SessionKey, msg: &QueuedMessage) {
        if !self.persists(key) {
            return;
        }
        let epoch = self.config.wall_epoch_ms;
        let (sessions, log) = (&self.sessions, &mut self.log);
        let Some(Some(s)) = sessions.get(key.0 as usize) else {
            return;
        };
        persist::put_message(
            log,
            &s.client_id,
            msg.id,
            &persist::StoredMessageRef {
                topic: msg.topic.as_str(),
                payload: &msg.payload,
                qos: msg.qos,
                retain: msg.retain,
                props: msg.props.as_deref(),
                expires_at: msg.expires_at.map(|t| epoch.saturating_add(t.0)),
                sub_ids: &msg.sub_ids,
            },
        );
    }

    /// Logs that the client of session `key` has a QoS 2 PUBLISH with
    /// `packet_id` awaiting PUBREL, routed under inbound id `uid`.
    fn log_await_rel(&mut self, key: SessionKey, packet_id: u16, uid: u64) {
        if !self.persists(key) {
            return;
        }
        let (sessions, log) = (&self.sessions, &mut self.log);
        if let Some(Some(s)) = sessions.get(key.0 as usize) {
            persist::put_await_rel(log, &s.client_id, packet_id, uid);
        }
    }

    /// Logs that that PUBLISH got its PUBREL.
    fn log_rel_done(&mut self, key: SessionKey, packet_id: u16) {
        if !self.persists(key) {
            return;
        }
        let (sessions, log) = (&self.sessions, &mut self.log);
        if let Some(Some(s)) = sessions.get(key.0 as usize) {
            persist::put_rel_done(log, &s.client_id, packet_id);
        }
    }

    /// A new inbound id: this shard's number above a counter no earlier
    /// run used (the counter of message ids).
    fn next_uid(&mut self) -> u64 {
        let n = self.next_msg_id;
        self.next_msg_id += 1;
        (u64::from(self.config.shard.0) << 48) | (n & persist::ID_COUNTER)
    }

    /// True when copies of inbound id `uid` were handled here before: they
    /// are not delivered again, and whoever waits for this publish waits
    /// for their records to be durable.
    fn seen_before(&mut self, uid: u64) -> bool {
        if uid == 0 || !self.applied.contains_key(&uid) {
            return false;
        }
        let pending = self.pending_gen();
        if let Some(h) = &mut self.hold {
            h.wait_gen = h.wait_gen.max(pending);
        }
        true
    }

    /// Remembers that inbound id `uid` was handled here; when that stored
    /// copies (the log grew past `before`), records it beside them.
    fn mark_applied(&mut self, uid: u64, before: usize) {
        if uid == 0 {
            return;
        }
        let stored = self.log.len() > before;
        if stored {
            persist::put_applied(&mut self.log, uid, true);
        }
        self.applied.insert(uid, stored);
    }

    /// Stores and delivers a routed publish on this shard (the retained
    /// owner keeps it), unless its inbound id was handled here already.
    /// True if a subscription here matched (or it was handled before).
    fn apply_routed(&mut self, publish: &RoutedPublish, origin: Option<SessionKey>) -> bool {
        if self.seen_before(publish.uid) {
            return true;
        }
        let before = self.log.len();
        if publish.retain {
            self.store_retained(publish);
        }
        let matched = self.deliver_local(publish, origin);
        self.mark_applied(publish.uid, before);
        matched
    }

    /// The QoS 2 flow of inbound id `uid` ended: every shard forgets it.
    fn forget(&mut self, uid: u64) {
        self.forget_here(uid);
        if self.config.shards > 1 {
            self.push_mesh(Event::Broadcast(ShardMsg::Forget { uid }));
        }
    }

    fn forget_here(&mut self, uid: u64) {
        if self.applied.remove(&uid) == Some(true) {
            persist::put_applied(&mut self.log, uid, false);
        }
    }

    /// Every copy of session `key`'s QoS 2 PUBLISH `packet_id` is durable.
    fn confirm_rel(&mut self, key: SessionKey, packet_id: u16) {
        if let Some(e) = self
            .session_mut(key)
            .and_then(|s| s.flows_mut().awaiting_rel.get_mut(&packet_id))
        {
            e.confirmed = true;
        }
    }

    /// Bytes of records written since the last [`Broker::take_log`].
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Records written since the last call, and the generation to report
    /// to [`Broker::committed`] once they are durable. `None` when there
    /// are none.
    pub fn take_log(&mut self) -> Option<(BytesMut, u64)> {
        if self.log.is_empty() {
            return None;
        }
        let generation = self.log_gen;
        self.log_gen += 1;
        Some((std::mem::take(&mut self.log), generation))
    }

    /// Every record up to generation `generation` is durable: the
    /// acknowledgements and answers that waited for them go out.
    pub fn committed(&mut self, generation: u64) {
        self.committed_gen = self.committed_gen.max(generation);
        while let Some(&(g, _)) = self.mesh_hold.front() {
            if g > self.committed_gen {
                break;
            }
            if let Some((_, event)) = self.mesh_hold.pop_front() {
                self.events.push_back(event);
            }
        }
        while let Some(&(g, ticket)) = self.gen_waiters.front() {
            if g > self.committed_gen {
                break;
            }
            self.gen_waiters.pop_front();
            let done = match self.held.get_mut(&ticket) {
                Some(h) => {
                    // A parked copy queued later may wait for a later one.
                    if h.local_gen.is_some_and(|lg| lg <= g) {
                        h.local_gen = None;
                    }
                    h.is_settled()
                }
                None => false,
            };
            if done {
                self.complete(ticket);
            }
        }
    }

    /// The generation that makes everything logged so far durable, if it
    /// is not yet.
    fn pending_gen(&self) -> Option<u64> {
        if !self.log.is_empty() {
            Some(self.log_gen)
        } else if self.log_gen - 1 > self.committed_gen {
            Some(self.log_gen - 1)
        } else {
            None
        }
    }

    /// Starts routing a publish whose acknowledgement (or answer) may have
    /// to wait for what it stores, when `active`; returns the hold it
    /// interrupts, for [`Broker::hold_end`].
    fn hold_begin(&mut self, active: bool) -> Option<Hold> {
        let outer = self.hold.take();
        if active {
            let ticket = self.next_id();
            self.hold = Some(Hold {
                ticket,
                log_before: self.log.len(),
                fanout: 0,
                parked: 0,
                dropped: false,
                wait_gen: None,
            });
        }
        outer
    }

    /// Whether a client's QoS 1/2 PUBLISH is routed under a hold, so that
    /// its acknowledgement learns what became of every copy: with
    /// `--data-dir` (it waits for the disk), under backpressure (it waits
    /// for room), for a 5.0 client (it is told of a drop, 0x97), and in a
    /// cluster (it waits until the other nodes have it). A 3.x publisher
    /// under a drop policy on a lone node has nothing to wait for or be
    /// told, and its publishes cost the other shards no answer.
    fn settles(&self, v5: bool) -> bool {
        self.config.persist
            || v5
            || self.config.queue_full == QueueFull::Backpressure
            || self.config.link.is_some()
    }

    /// Ends a hold: when the publish stored something here, parked a copy,
    /// or went to other shards with its ticket, `then` waits for those, and
    /// its ticket is returned; `None` when nothing needs waiting for. With
    /// it, whether a copy was dropped for a full queue already.
    fn hold_end(&mut self, outer: Option<Hold>, then: HeldThen) -> (Option<u64>, bool) {
        let Some(h) = std::mem::replace(&mut self.hold, outer) else {
            return (None, false);
        };
        let local_gen = if self.log.len() > h.log_before {
            Some(self.log_gen)
        } else {
            h.wait_gen
        };
        if local_gen.is_none() && h.fanout == 0 && h.parked == 0 {
            return (None, h.dropped);
        }
        self.held.insert(
            h.ticket,
            Held {
                local_gen,
                remote_left: h.fanout,
                parked_left: h.parked,
                dropped: h.dropped,
                backpressure: Backpressure::None,
                then,
            },
        );
        if let Some(g) = local_gen {
            self.gen_waiters.push_back((g, h.ticket));
        }
        if h.parked > 0 {
            self.backpressure(h.ticket);
        }
        (Some(h.ticket), h.dropped)
    }

    fn wait_for(&mut self, ticket: u64, local_gen: Option<u64>, then: HeldThen) {
        if let Some(g) = local_gen {
            self.gen_waiters.push_back((g, ticket));
        }
        self.held.insert(
            ticket,
            Held {
                local_gen,
                remote_left: 0,
                parked_left: 0,
                dropped: false,
                backpressure: Backpressure::None,
                then,
            },
        );
    }

    /// A copy of held publish `ticket` waits for room in a full queue
    /// (here, or on a shard that said so): the publisher's reads are held
    /// until the publish is settled, or the shard it answers is told.
    fn backpressure(&mut self, ticket: u64) {
        let Some(h) = self.held.get(&ticket) else {
            return;
        };
        if h.backpressure != Backpressure::None {
            return;
        }
        let now = match h.then {
            HeldThen::Ack(conn) | HeldThen::Rel(conn, _, _) => {
                let Some(c) = self.conn_mut(conn) else { return };
                c.reads_held += 1;
                Backpressure::Holds(conn)
            }
            HeldThen::Reply(shard, t) => {
                self.send_to_shard(shard, ShardMsg::Parked { ticket: t });
                Backpressure::Told
            }
        };
        if let Some(h) = self.held.get_mut(&ticket) {
            h.backpressure = now;
        }
    }

    /// `conn` no longer waits for one of its held publishes: once none is
    /// left its reads go on ([`Event::Resume`]).
    fn release_reads(&mut self, conn: ConnId) {
        let now = self.now;
        let Some(c) = self.conn_mut(conn) else { return };
        c.reads_held = c.reads_held.saturating_sub(1);
        if c.reads_held == 0 {
            c.last_seen = now;
            self.events.push_back(Event::Resume(conn));
        }
    }

    /// Whether `conn`'s reads are held: a publish of its waits for room
    /// in a full queue (`--queue-full backpressure`). The shell stops
    /// reading its socket until [`Event::Resume`].
    pub fn reads_held(&self, conn: ConnId) -> bool {
        self.conn(conn).is_some_and(|c| c.reads_held > 0)
    }

    /// The reason code of an acknowledgement whose message could not be
    /// queued for every matching subscription (counted).
    fn quota_exceeded(&self) -> u8 {
        bump(&self.counters.quota_exceeded_acks);
        reason::QUOTA_EXCEEDED
    }

    /// An inbound QoS 2 flow that ends without PUBREL: its PUBREC refuses
    /// the message.
    fn end_inbound_qos2(&mut self, key: SessionKey, packet_id: u16) {
        let ended = self.session_mut(key).and_then(|s| {
            let e = s.flows_mut().awaiting_rel.remove(&packet_id);
            s.release_idle_flows();
            e
        });
        if let Some(e) = ended {
            if e.uid != 0 {
                self.forget(e.uid);
            }
            self.log_rel_done(key, packet_id);
        }
    }

    /// Gives an outgoing publish the current hold's ticket (or none), and
    /// counts the answer it will bring.
    fn tag(&mut self, publish: &mut RoutedPublish, copies: u32) {
        publish.ticket = match &mut self.hold {
            Some(h) => {
                h.fanout += copies;
                Some((self.config.shard, h.ticket))
            }
            None => None,
        };
    }

    /// The end of a publish that came from another shard with a ticket:
    /// answer now, or once what it stored here is durable.
    fn answer(&mut self, outer: Option<Hold>, ticket: Option<(ShardId, u64)>) {
        let Some((from, t)) = ticket else {
            self.hold = outer;
            return;
        };
        if let (None, dropped) = self.hold_end(outer, HeldThen::Reply(from, t)) {
            // Settled at once, as most are: gathered into one message per
            // peer (see `poll_event`), unless messages to peers wait for
            // the log (`mesh_hold`), which an answer must not overtake.
            match self.settled.get_mut(usize::from(from.0)) {
                Some(list) if self.mesh_hold.is_empty() && from != self.config.shard => {
                    list.push((t, dropped));
                    self.settled_count += 1;
                }
                _ => self.send_to_shard(from, ShardMsg::Stored { ticket: t, dropped }),
            }
        }
    }

    /// A remote shard's part of a held publish is settled: durable, and
    /// queued or `dropped`.
    fn stored(&mut self, ticket: u64, dropped: bool) {
        let done = match self.held.get_mut(&ticket) {
            Some(h) => {
                h.remote_left = h.remote_left.saturating_sub(1);
                h.dropped |= dropped;
                h.is_settled()
            }
            None => false,
        };
        if done {
            self.complete(ticket);
        }
    }

    /// A copy of held publish `ticket` parked here left the park: queued
    /// (and logged, when its session persists), or `dropped`.
    fn park_settled(&mut self, ticket: u64, dropped: bool) {
        let logged = (!dropped && !self.log.is_empty()).then_some(self.log_gen);
        let Some(h) = self.held.get_mut(&ticket) else {
            return;
        };
        h.parked_left = h.parked_left.saturating_sub(1);
        h.dropped |= dropped;
        if let Some(g) = logged {
            if h.local_gen.is_none_or(|lg| lg < g) {
                h.local_gen = Some(g);
                self.gen_waiters.push_back((g, ticket));
            }
        }
        if self.held.get(&ticket).is_some_and(Held::is_settled) {
            self.complete(ticket);
        }
    }

    fn complete(&mut self, ticket: u64) {
        let Some(h) = self.held.remove(&ticket) else {
            return;
        };
        if let Backpressure::Holds(conn) = h.backpressure {
            self.release_reads(conn);
        }
        match h.then {
            HeldThen::Reply(shard, t) => self.send_to_shard(
                shard,
                ShardMsg::Stored {
                    ticket: t,
                    dropped: h.dropped,
                },
            ),
            HeldThen::Ack(conn) => {
                if h.dropped {
                    self.refuse_held(conn, ticket);
                }
                self.release_held(conn);
            }
            HeldThen::Rel(conn, key, packet_id) => {
                if h.dropped && self.refuse_held(conn, ticket) {
                    self.end_inbound_qos2(key, packet_id);
                } else {
                    self.confirm_rel(key, packet_id);
                }
                self.release_held(conn);
            }
        }
    }

    /// A held PUBACK / PUBREC of a 5.0 client whose message could not be
    /// queued for every subscriber gets 0x97 (Quota exceeded); true when
    /// it did (a 3.x client cannot be told).
    fn refuse_held(&mut self, conn: ConnId, ticket: u64) -> bool {
        let v5 = self.conn(conn).is_some_and(|c| c.version.is_v5());
        if !v5 {
            return false;
        }
        let code = self.quota_exceeded();
        let Some(held) = self.conn_mut(conn).and_then(|c| c.held.as_mut()) else {
            return false;
        };
        for (t, packet) in held.iter_mut() {
            if *t == ticket {
                if let Packet::PubAck(r) | Packet::PubRec(r) = packet {
                    r.reason = code;
                    r.properties = None;
                    return true;
                }
            }
        }
        false
    }

    /// Queues acknowledgement `packet` for `conn`: at once, unless it waits
    /// for `ticket` or for acknowledgements held before it.
    fn send_ack(&mut self, conn: ConnId, packet: Packet, ticket: Option<u64>) {
        let Some(c) = self.conn_mut(conn) else { return };
        let waiting = c.held.as_ref().is_some_and(|q| !q.is_empty());
        if ticket.is_none() && !waiting {
            self.queue_packet(conn, &packet);
            return;
        }
        c.held
            .get_or_insert_with(Default::default)
            .push_back((ticket.unwrap_or(0), packet));
    }

    /// Sends `conn`'s held acknowledgements whose records are durable, in
    /// order, up to the first that still waits.
    fn release_held(&mut self, conn: ConnId) {
        loop {
            let ready = match self.conn(conn).and_then(|c| c.held.as_ref()) {
                Some(q) => match q.front() {
                    Some((t, _)) => *t == 0 || !self.held.contains_key(t),
                    // Kept, empty: a publisher that waited once waits again
                    // (every cross-shard QoS 1/2 publish does), and freeing
                    // and making it per publish cost more than its bytes.
                    None => return,
                },
                None => return,
            };
            if !ready {
                return;
            }
            let packet = self
                .conn_mut(conn)
                .and_then(|c| c.held.as_mut())
                .and_then(|q| q.pop_front())
                .map(|(_, p)| p);
            if let Some(packet) = packet {
                self.queue_packet(conn, &packet);
            }
        }
    }

    /// A SUBACK or UNSUBACK for session `key`: after its `Session` record
    /// is durable when the session persists.
    fn send_session_ack(&mut self, conn: ConnId, key: SessionKey, packet: Packet) {
        let generation = if self.persists(key) {
            self.pending_gen()
        } else {
            None
        };
        let ticket = generation.map(|g| {
            let t = self.next_id();
            self.wait_for(t, Some(g), HeldThen::Ack(conn));
            t
        });
        self.send_ack(conn, packet, ticket);
    }

    /// Installs what a replay of this shard's files found: persistent
    /// sessions, offline (a will of a client that was connected is due
    /// after its delay from now, unless it comes back first), the messages
    /// owed to them with their flows, and retained messages. Expired
    /// retained messages are left out.
    pub fn restore(&mut self, recovered: Recovered, now: Millis) {
        self.now = now;
        let epoch = self.config.wall_epoch_ms;
        let local = |w: u64| Millis(w.saturating_sub(epoch));
        self.next_msg_id = self.next_msg_id.max(recovered.max_id + 1);
        self.applied
            .extend(recovered.applied.into_iter().map(|uid| (uid, true)));
        for (_, r) in recovered.retained {
            let expires_at = r.expires_at.map(local);
            if is_expired(expires_at, now) {
                continue;
            }
            let before = self.retained.len();
            self.retained.set(RetainedMessage {
                topic: r.topic,
                payload: r.payload,
                qos: r.qos,
                props: r.props,
                expires_at,
            });
            if self.retained.len() > before {
                bump(&self.counters.retained_current);
            }
        }
        let routed = self.routed();
        let mut announce = Vec::new();
        // Room for every session at once: grown one by one, the id table
        // rehashes (hashing every clientId again) at each doubling.
        let n = recovered.sessions.len();
        self.sessions.reserve(n);
        let (sessions, hasher) = (&self.sessions, &self.hasher);
        self.by_client_id.reserve(n, |k| {
            let id = sessions[k.0 as usize]
                .as_ref()
                .map_or("", |s| &*s.client_id);
            hasher.hash_one(id)
        });
        for (_, rs) in recovered.sessions {
            let st = rs.state;
            let key = self.create_session(st.client_id.clone(), st.expiry_secs);
            for (filter, opts) in &st.subscriptions {
                if self
                    .session_mut(key)
                    .is_some_and(|s| s.subscribe(filter, *opts))
                {
                    bump(&self.counters.subscriptions_current);
                }
                match shared::parse(filter) {
                    Shared::Yes(inner) => {
                        if let Some(s) = self.session_mut(key) {
                            s.shares = true;
                        }
                        self.share_join(key, filter, inner, None);
                    }
                    Shared::No => {
                        self.trie.subscribe(filter, key, *opts);
                        if routed && self.interest.local_add(filter) {
                            announce.push(owned_filter(filter));
                        }
                    }
                    Shared::Invalid => {}
                }
            }
            let counters = self.counters.clone();
            let mut queued = 0u64;
            let s = self.session_mut(key).expect("created above");
            s.username = st.username;
            s.logged = true;
            s.generation = s.generation.wrapping_add(1);
            s.expires_at = if !st.connected && st.expires_at != persist::NO_TIME {
                local(st.expires_at).0
            } else if st.expiry_secs == NEVER_EXPIRES {
                u64::MAX
            } else {
                // Connected when the process died: offline from now.
                now.0 + u64::from(st.expiry_secs) * 1000
            };
            s.pending_will = st.will.map(|w| {
                let due = if w.due == persist::NO_TIME {
                    let delay = w
                        .will
                        .properties
                        .as_ref()
                        .and_then(|p| p.will_delay_interval)
                        .unwrap_or(0);
                    Millis(now.0 + u64::from(delay) * 1000)
                } else {
                    local(w.due).max(now)
                };
                Box::new(PendingWill { will: w.will, due })
            });
            if !rs.messages.is_empty() || !rs.awaiting_rel.is_empty() {
                let flows = s.flows_mut();
                for (id, (m, flow)) in rs.messages {
                    let expires_at = m.expires_at.map(local);
                    match flow {
                        Flow::Queued => {
                            flows.queue.push_back(QueuedMessage {
                                topic: m.topic,
                                payload: m.payload,
                                qos: m.qos,
                                retain: m.retain,
                                props: m.props,
                                expires_at,
                                sub_ids: m.sub_ids,
                                id,
                            });
                            queued += 1;
                        }
                        Flow::Sent(pid) => {
                            let remaining = expires_at
                                .map(|at| (at.0.saturating_sub(now.0)).div_ceil(1000) as u32);
                            let properties =
                                delivery_properties(m.props, m.sub_ids, remaining, true);
                            flows.start(
                                pid,
                                id,
                                Inflight::Published(Publish {
                                    dup: false,
                                    qos: m.qos,
                                    retain: m.retain,
                                    topic: m.topic,
                                    packet_id: PacketId::new(pid),
                                    payload: m.payload,
                                    properties,
                                }),
                            );
                        }
                        Flow::Released(pid) => flows.start(pid, id, Inflight::Released),
                    }
                }
                counters
                    .messages_queued
                    .fetch_add(queued, std::sync::atomic::Ordering::Relaxed);
                // After a crash nothing says every copy made it: a resend
                // is routed again (each shard skips what it has).
                flows
                    .awaiting_rel
                    .extend(rs.awaiting_rel.into_iter().map(|(pid, uid)| {
                        (
                            pid,
                            AwaitingRel {
                                uid,
                                confirmed: uid == 0,
                            },
                        )
                    }));
            }
            let due = s
                .pending_will
                .as_ref()
                .map_or(s.expires_at, |w| w.due.0.min(s.expires_at));
            let generation = s.generation;
            if due != u64::MAX {
                self.expiry
                    .register(key.0, generation, keepalive_tick(Millis(due)));
            }
        }
        if !announce.is_empty() {
            self.announce(announce);
        }
    }

    /// Writes this shard's whole durable state as records: what a fresh
    /// log starts with when it replaces the old one (compaction).
    pub fn snapshot(&self, out: &mut BytesMut) {
        let epoch = self.config.wall_epoch_ms;
        persist::put_max_id(out, self.next_msg_id - 1);
        for s in self.sessions.iter().flatten() {
            if s.expiry_secs == 0 || !s.logged {
                continue;
            }
            self.write_session(s, out);
        }
        for (&uid, &stored) in &self.applied {
            if stored {
                persist::put_applied(out, uid, true);
            }
        }
        self.retained.for_each(|m| {
            if is_broker_topic(&m.topic) {
                return;
            }
            persist::put_retain(
                out,
                &persist::StoredRetainedRef {
                    topic: m.topic.as_str(),
                    payload: &m.payload,
                    qos: m.qos,
                    props: m.props.as_deref(),
                    expires_at: m.expires_at.map(|t| epoch.saturating_add(t.0)),
                },
            );
        });
    }

    /// Session `s` as records: its state, the messages it is owed with
    /// their flows, the client's QoS 2 flows awaiting PUBREL.
    fn write_session(&self, s: &Session, out: &mut BytesMut) {
        let epoch = self.config.wall_epoch_ms;
        persist::put_session(out, &self.session_state(s));
        let cid = &s.client_id;
        if let Some(f) = s.flows() {
            for (pid, (id, flight)) in &f.inflight {
                match flight {
                    Inflight::Published(p) => {
                        persist::put_message(
                            out,
                            cid,
                            *id,
                            &persist::StoredMessageRef {
                                topic: p.topic.as_str(),
                                payload: &p.payload,
                                qos: p.qos,
                                retain: p.retain,
                                props: p.properties.as_deref(),
                                expires_at: None,
                                sub_ids: &[],
                            },
                        );
                        persist::put_sent(out, cid, *id, *pid);
                    }
                    Inflight::Released => {
                        // Only the packet id matters to a release: the
                        // message stands in for it.
                        persist::put_message(
                            out,
                            cid,
                            *id,
                            &persist::StoredMessageRef {
                                topic: "$coremq/released",
                                payload: &[],
                                qos: QoS::ExactlyOnce,
                                retain: false,
                                props: None,
                                expires_at: None,
                                sub_ids: &[],
                            },
                        );
                        persist::put_sent(out, cid, *id, *pid);
                        persist::put_released(out, cid, *id);
                    }
                }
            }
            for m in &f.queue {
                persist::put_message(
                    out,
                    cid,
                    m.id,
                    &persist::StoredMessageRef {
                        topic: m.topic.as_str(),
                        payload: &m.payload,
                        qos: m.qos,
                        retain: m.retain,
                        props: m.props.as_deref(),
                        expires_at: m.expires_at.map(|t| epoch.saturating_add(t.0)),
                        sub_ids: &m.sub_ids,
                    },
                );
            }
            for (&pid, a) in &f.awaiting_rel {
                persist::put_await_rel(out, cid, pid, a.uid);
            }
        }
    }

    /// `--cluster`: another node took client `client_id` over
    /// (MQTT-3.1.4-2 across nodes). Its connection here is closed as for
    /// any takeover (5.0: DISCONNECT 0x8E; the will as the README says).
    /// With `export`, a session that outlives its connection leaves this
    /// node as records (for [`Broker::import_session`] there), a will
    /// still waiting for its delay with it; without, the session ends here
    /// (the new connection asked for a clean start), and such a will goes
    /// out now.
    pub fn kick(&mut self, client_id: &str, export: bool, now: Millis) -> Option<BytesMut> {
        self.now = now;
        let key = self.find_session(client_id)?;
        if let Some(old) = self.session(key).and_then(|s| s.conn) {
            bump(&self.counters.takeovers);
            self.close(old, CloseReason::TakenOver, now);
        }
        // A session with expiry 0 ended with its connection.
        let key = self.find_session(client_id)?;
        if !export {
            self.end_session(key);
            return None;
        }
        let mut out = BytesMut::new();
        let s = self.session(key)?;
        let max_id = s
            .flows()
            .map(|f| {
                let inflight = f.inflight.values().map(|(id, _)| *id);
                inflight
                    .chain(f.queue.iter().map(|m| m.id))
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        persist::put_max_id(&mut out, max_id);
        self.write_session(s, &mut out);
        self.remove_session(key);
        Some(out)
    }

    /// `--cluster`: installs a session another node handed over
    /// ([`Broker::kick`] there) before its client's CONNECT is admitted
    /// here; a session this shard still held for the client (from an
    /// earlier visit) is replaced.
    pub fn import_session(&mut self, records: &[u8], now: Millis) {
        self.now = now;
        let mut recovered = Recovered::default();
        persist::scan_each(records, |r| recovered.apply(r));
        let client_ids: Vec<ByteString> = recovered.sessions.keys().cloned().collect();
        for client_id in client_ids {
            if let Some(key) = self.find_session(&client_id) {
                if let Some(old) = self.session(key).and_then(|s| s.conn) {
                    self.close(old, CloseReason::TakenOver, now);
                }
                if let Some(key) = self.find_session(&client_id) {
                    self.remove_session(key);
                }
            }
        }
        // Nothing of it is in this shard's log yet: the CONNECT that
        // resumes it writes the session record.
        for rs in recovered.sessions.values_mut() {
            rs.state.connected = false;
        }
        self.restore(recovered, now);
    }

    fn session(&self, key: SessionKey) -> Option<&Session> {
        self.sessions.get(key.0 as usize).and_then(Option::as_ref)
    }

    fn session_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        self.sessions
            .get_mut(key.0 as usize)
            .and_then(Option::as_mut)
    }
}

/// A filter whose bytes are its own: one decoded from a SUBSCRIBE is a slice
/// of the connection's read buffer, which a message to another shard, or a
/// record that outlives the packet, must not pin.
fn owned_filter(filter: &TopicFilter) -> TopicFilter {
    TopicFilter::new(String::from(filter.as_str())).expect("a copy of a valid filter")
}

/// The properties of a PUBLISH delivered to a 5.0 client: those forwarded
/// with the message, its Subscription Identifiers and what is left of its
/// Message Expiry Interval; `None` when there are none (or `!v5`).
fn delivery_properties(
    props: Option<Arc<Properties>>,
    sub_ids: Vec<u32>,
    remaining: Option<u32>,
    v5: bool,
) -> Option<Box<Properties>> {
    if v5 && (props.is_some() || !sub_ids.is_empty() || remaining.is_some()) {
        let mut p = props.map_or_else(Properties::default, |p| (*p).clone());
        p.message_expiry_interval = remaining;
        p.subscription_identifiers = sub_ids;
        Some(Box::new(p))
    } else {
        None
    }
}

fn pub_resp(packet_id: PacketId, reason: u8) -> PubResp {
    PubResp {
        packet_id,
        reason,
        properties: None,
    }
}

/// Whether a message that expires at `at` has expired by `now`.
fn is_expired(at: Option<Millis>, now: Millis) -> bool {
    at.is_some_and(|at| at <= now)
}

/// The Subscription Identifier a delivery through `opts` carries.
fn sub_ids(opts: SubOpts) -> Vec<u32> {
    if opts.id == 0 {
        Vec::new()
    } else {
        vec![opts.id]
    }
}

/// What of a PUBLISH's (or will's) 5.0 properties travels with the message
/// (MQTT-3.3.2-17, -18: unchanged, user properties in order), and when it
/// expires. The Topic Alias is the sender's connection's alone, the Will
/// Delay Interval the broker's, and the Message Expiry Interval is kept as a
/// time so each delivery can carry what is left of it (MQTT-3.3.2-6).
fn forwarded_properties(
    props: Option<Box<Properties>>,
    now: Millis,
) -> (Option<Arc<Properties>>, Option<Millis>) {
    let Some(mut p) = props else {
        return (None, None);
    };
    let expires_at = p
        .message_expiry_interval
        .take()
        .map(|secs| Millis(now.0 + u64::from(secs) * 1000));
    p.topic_alias = None;
    p.will_delay_interval = None;
    p.subscription_identifiers.clear();
    let empty = *p == Properties::default();
    ((!empty).then(|| Arc::from(p)), expires_at)
}

/// Resolves a 5.0 client's Topic Alias on `publish` (§3.3.2.3.4): a topic
/// with an alias sets it, an empty topic uses it. The error is the reason
/// code of the DISCONNECT the client is owed: 0x94 for an alias of 0 or
/// above our maximum (MQTT-3.3.2-9, -10), 0x82 for an alias never set and
/// for a Subscription Identifier sent by a client (MQTT-3.3.4-6).
fn resolve_topic_alias(c: &mut Conn, publish: &mut Publish, max: u16) -> Result<(), u8> {
    let Some(props) = publish.properties.as_ref() else {
        return Ok(());
    };
    if !props.subscription_identifiers.is_empty() {
        return Err(reason::PROTOCOL_ERROR);
    }
    let Some(alias) = props.topic_alias else {
        return Ok(());
    };
    if alias == 0 || alias > max {
        return Err(reason::TOPIC_ALIAS_INVALID);
    }
    let aliases = c.aliases.get_or_insert_with(Default::default);
    if publish.topic.is_empty() {
        match aliases.incoming.get(&alias) {
            Some(topic) => publish.topic = topic.clone(),
            None => return Err(reason::PROTOCOL_ERROR),
        }
    } else {
        // A copy: the topic is a slice of the read buffer.
        let topic = TopicName::new(String::from(publish.topic.as_str()))
            .map_err(|_| reason::TOPIC_NAME_INVALID)?;
        aliases.incoming.insert(alias, topic);
    }
    Ok(())
}

/// The broker runs the keep-alive wheel in 100 ms ticks rather than the
/// seconds it is named for (the wheel only compares numbers): a keep-alive
/// close then lands at most ~0.2 s after 1.5 × keep-alive (one wheel tick plus
/// one shell tick), where whole seconds would let it land up to 2 s late. The
/// price is that deadlines past the 4,096-tick ring (409.6 s: keep-alives
/// above ~270 s) are looked at once per lap and re-filed.
fn keepalive_tick(t: Millis) -> Secs {
    Secs(t.0.div_ceil(100).min(u64::from(u32::MAX)) as u32)
}
