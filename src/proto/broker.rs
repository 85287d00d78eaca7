//! The per-shard broker state machine: connections, sessions, subscriptions,
//! retained messages, wills and keep-alive, all without I/O.
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

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use std::hash::BuildHasher;

use super::acl::{Access, Acl};
use super::codec::{
    self, return_code, ConnAck, Connect, LastWill, Packet, PacketId, ProtocolVersion, PubResp,
    Publish, QoS, SubAck, UnsubAck,
};
use super::keepalive::{KeepAliveWheel, Secs, Verdict};
use super::retained::{retained_owner, RetainedMessage, RetainedStore};
use super::session::{Inflight, QueuedMessage, Session, SessionKey};
use super::topic::trie::SubscriptionTrie;
use super::topic::{TopicFilter, TopicName};
use super::{ConnId, Millis, ShardId};
use crate::metrics::{bump, drop_one, Counters};

/// The SUBACK code for a refused filter (MQTT-3.9.3-2 of 3.1.1; 5.0's
/// Unspecified error has the same value).
const SUBACK_FAILURE: u8 = 0x80;

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
    /// past it new messages for that session are dropped and counted.
    pub max_queued: usize,
    /// Topic access rules (`--acl-file`); `None` lets everyone do anything.
    pub acl: Option<Arc<Acl>>,
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
    /// RETAIN as published: the receiving shard updates its retained replica.
    pub retain: bool,
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
}

/// Why a connection ended. Every reason but `Disconnect` publishes the will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT: the will is discarded (MQTT-3.14.4-3).
    Disconnect,
    /// No packet within 1.5 × keep-alive (MQTT-3.1.2-24).
    KeepAliveTimeout,
    /// A malformed packet or a protocol violation (MQTT-4.8.0-1).
    ProtocolError,
    /// The socket failed or the client closed it without DISCONNECT.
    NetworkError,
    /// A new CONNECT with the same clientId (MQTT-3.1.4-2).
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
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
    trie: SubscriptionTrie<SessionKey, QoS>,
    retained: RetainedStore,
    /// Runs in 100 ms ticks, not seconds (see [`keepalive_tick`]).
    keepalive: KeepAliveWheel<u32>,
    events: VecDeque<Event>,
    /// Reused by every routing call: subscriber → highest granted QoS.
    matches: HashMap<SessionKey, QoS>,
    /// Per-packet tallies, kept here and added to the shared counters by
    /// [`Broker::flush_counts`]: an atomic add per packet from every shard
    /// would make the counters' cache lines the busiest memory in the
    /// process.
    counts: LocalCounts,
}

/// Tallies a shard keeps to itself between flushes.
#[derive(Debug, Default, Clone, Copy)]
struct LocalCounts {
    packets_in: u64,
    packets_out: u64,
    publishes_in: u64,
    publishes_out: u64,
}

impl Broker {
    /// An empty broker for one shard; `now` starts its keep-alive clock.
    pub fn new(config: BrokerConfig, counters: Arc<Counters>, now: Millis) -> Self {
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
            events: VecDeque::new(),
            matches: HashMap::new(),
            counts: LocalCounts::default(),
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

    /// Next thing the shell must do, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
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

    /// The protocol `conn` speaks.
    pub fn version(&self, conn: ConnId) -> Option<ProtocolVersion> {
        self.conn(conn).map(|c| c.version)
    }

    /// Accepts a CONNECT that passed [`check_connect`](super::handshake::check_connect)
    /// and whose clientId is set (assigned if it was empty). Takes over any
    /// connection with the same clientId, attaches the session cleanSession
    /// asks for, and queues the CONNACK.
    pub fn connect(&mut self, connect: Connect, now: Millis) -> ConnId {
        let Connect {
            protocol,
            clean_start,
            keep_alive,
            client_id,
            will,
            username,
            ..
        } = connect;
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
        });

        // MQTT-3.1.4-2: a client already connected with this id is disconnected.
        // Its will goes out (see "Takeover" in the README), and a clean session
        // ends with it.
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
            // MQTT-3.1.2-6: cleanSession=1 discards any previous session.
            Some(key) => {
                self.remove_session(key);
                (self.create_session(client_id, true), false)
            }
            None => (self.create_session(client_id, clean_start), false),
        };
        let acl_in_use = self.config.acl.is_some();
        let session = self
            .session_mut(key)
            .expect("session created or found above");
        session.conn = Some(id);
        session.clean = clean_start;
        if acl_in_use {
            // Whoever connects now is who the session's rules are for.
            session.username = username.map(|u| Box::from(&*u));
        }
        let conn = self.conn_mut(id).expect("allocated above");
        conn.session = Some(key);
        if keep_alive > 0 {
            let deadline = keepalive_tick(Millis(now.0 + u64::from(keep_alive) * 1500));
            self.keepalive.register(id.index, id.generation, deadline);
        }

        bump(&self.counters.connacks[0]);
        bump(&self.counters.connections_total);
        bump(&self.counters.connections_current);
        self.queue_packet(
            id,
            &Packet::ConnAck(ConnAck {
                session_present,
                code: return_code::ACCEPTED,
                properties: None,
            }),
        );
        if session_present {
            self.resend_inflight(id, key);
            self.pump_queue(key);
        }
        id
    }

    /// Decodes and handles every whole packet in `buf`, leaving a partial one.
    pub fn handle_read(&mut self, conn: ConnId, buf: &mut BytesMut, now: Millis) {
        loop {
            let Some(c) = self.conn_mut(conn) else { return };
            if c.closing {
                // Nothing a client sends after its close counts (MQTT-3.14.4-2).
                buf.clear();
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
                    self.close(conn, CloseReason::ProtocolError, now);
                    buf.clear();
                    return;
                }
            }
        }
    }

    /// The socket of `conn` failed or reached EOF without DISCONNECT: the will
    /// is published and the connection released.
    pub fn connection_lost(&mut self, conn: ConnId, now: Millis) {
        self.close(conn, CloseReason::NetworkError, now);
        self.release(conn);
    }

    /// Frees `conn`'s slot once its socket is closed. Closes it first (with
    /// its will) if the broker had not.
    pub fn release(&mut self, conn: ConnId) {
        if !self.is_closing(conn) {
            self.close(conn, CloseReason::NetworkError, Millis(0));
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

    /// A message from another shard.
    pub fn handle_remote(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Publish(publish) => {
                if publish.retain {
                    self.store_retained(&publish);
                }
                self.deliver_local(&publish);
            }
            ShardMsg::RetainedQuery(query) => {
                let mut messages = Vec::new();
                self.retained
                    .for_each_match(&query.filter, |m| messages.push(m.clone()));
                // Nothing to say when nothing matches: the asker keeps no
                // state waiting for an answer.
                if !messages.is_empty() {
                    let to = query.from;
                    self.events.push_back(Event::SendTo(
                        to,
                        ShardMsg::RetainedReply(RetainedReply { query, messages }),
                    ));
                }
            }
            ShardMsg::RetainedReply(reply) => self.retained_reply(reply),
        }
    }

    /// Retained messages from another shard for one of our new
    /// subscriptions: delivered if the session is still the one that asked
    /// and still has the subscription, at the QoS it has now.
    fn retained_reply(&mut self, reply: RetainedReply) {
        let RetainedReply { query, messages } = reply;
        let Some(session) = self.session(query.session) else {
            return;
        };
        if session.client_id != query.client_id {
            return;
        }
        let Some(granted) = session
            .subscriptions()
            .find(|(f, _)| f.as_str() == query.filter.as_str())
            .map(|(_, q)| q)
        else {
            return;
        };
        for msg in messages {
            self.deliver_to_session(
                query.session,
                QueuedMessage {
                    qos: msg.qos.min(granted),
                    topic: msg.topic,
                    payload: msg.payload,
                    retain: true,
                },
            );
        }
    }

    /// Advances time: closes every connection silent for 1.5 × its keep-alive
    /// (MQTT-3.1.2-24), publishing its will.
    pub fn tick(&mut self, now: Millis) {
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
                let deadline = c.last_seen.0 + u64::from(c.expiry_ms);
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

    /// A will goes out like any PUBLISH: to every shard, retained if asked.
    fn publish_will(&mut self, will: LastWill) {
        bump(&self.counters.wills_published);
        self.route(RoutedPublish {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
        });
    }

    /// Closes every connection (the last step of a shutdown). A will not
    /// yet published by [`Broker::publish_all_wills`] is published.
    pub fn close_all(&mut self, now: Millis) {
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
        match packet {
            Packet::Publish(publish) => self.handle_publish(conn, publish, now),
            Packet::PubAck(ack) => {
                self.with_session(conn, |s| {
                    let f = s.flows_mut();
                    if matches!(f.inflight.get(&ack.packet_id.get()), Some((_, Inflight::Published(p))) if p.qos == QoS::AtLeastOnce)
                    {
                        f.inflight.remove(&ack.packet_id.get());
                    }
                    s.release_idle_flows();
                });
                self.pump_conn_queue(conn);
            }
            Packet::PubRec(ack) => {
                self.with_session(conn, |s| {
                    // Only a QoS 2 PUBLISH moves on to its release: a PUBREC
                    // for a QoS 1 id is the client's mistake, and must not
                    // turn a flow that awaits PUBACK into one that never ends.
                    if let Some((_, entry)) = s.flows_mut().inflight.get_mut(&ack.packet_id.get()) {
                        if matches!(entry, Inflight::Published(p) if p.qos == QoS::ExactlyOnce) {
                            *entry = Inflight::Released;
                        }
                    }
                    s.release_idle_flows();
                });
                // MQTT-4.3.3-1: answer PUBREC with PUBREL, whatever we knew of it.
                self.queue_packet(conn, &Packet::PubRel(pub_resp(ack.packet_id)));
            }
            Packet::PubRel(rel) => {
                self.with_session(conn, |s| {
                    s.flows_mut().awaiting_rel.remove(&rel.packet_id.get());
                    s.release_idle_flows();
                });
                self.queue_packet(conn, &Packet::PubComp(pub_resp(rel.packet_id)));
            }
            Packet::PubComp(comp) => {
                self.with_session(conn, |s| {
                    let f = s.flows_mut();
                    if matches!(
                        f.inflight.get(&comp.packet_id.get()),
                        Some((_, Inflight::Released))
                    ) {
                        f.inflight.remove(&comp.packet_id.get());
                    }
                    s.release_idle_flows();
                });
                self.pump_conn_queue(conn);
            }
            Packet::Subscribe(sub) => self.handle_subscribe(conn, sub),
            Packet::Unsubscribe(unsub) => {
                let Some(key) = self.conn(conn).and_then(|c| c.session) else {
                    return;
                };
                for filter in &unsub.filters {
                    self.trie.unsubscribe(filter, key);
                    if self.session_mut(key).is_some_and(|s| s.unsubscribe(filter)) {
                        drop_one(&self.counters.subscriptions_current);
                    }
                }
                self.queue_packet(
                    conn,
                    &Packet::UnsubAck(UnsubAck {
                        packet_id: unsub.packet_id,
                        codes: Vec::new(),
                        properties: None,
                    }),
                );
            }
            Packet::PingReq => self.queue_packet(conn, &Packet::PingResp),
            Packet::Disconnect(_) => {
                // MQTT-3.14.4-3: DISCONNECT discards the will; nothing is sent back.
                self.close(conn, CloseReason::Disconnect, now);
            }
            // MQTT-3.1.0-2: a second CONNECT is a protocol violation. So is any
            // packet only a server sends.
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp
            | Packet::Auth(_) => {
                bump(&self.counters.malformed_packets);
                self.close(conn, CloseReason::ProtocolError, now);
            }
        }
    }

    fn handle_publish(&mut self, conn: ConnId, publish: Publish, now: Millis) {
        self.counts.publishes_in += 1;
        // A PUBLISH the client may not write is acknowledged as usual and
        // then dropped (counted): 3.1.1 has no way to tell the client.
        let session = self.conn(conn).and_then(|c| c.session);
        let routed = self
            .may_write(session, &publish.topic)
            .then(|| RoutedPublish {
                topic: publish.topic,
                payload: publish.payload,
                qos: publish.qos,
                retain: publish.retain,
            });
        match (publish.qos, publish.packet_id) {
            (QoS::AtMostOnce, _) => {
                if let Some(routed) = routed {
                    self.route(routed);
                }
            }
            (QoS::AtLeastOnce, Some(id)) => {
                if let Some(routed) = routed {
                    self.route(routed);
                }
                self.queue_packet(conn, &Packet::PubAck(pub_resp(id)));
            }
            (QoS::ExactlyOnce, Some(id)) => {
                // MQTT-4.3.3: a PUBLISH resent before PUBREL is acknowledged
                // again but not delivered again.
                let first = self
                    .with_session(conn, |s| s.flows_mut().awaiting_rel.insert(id.get()))
                    .unwrap_or(false);
                if let (true, Some(routed)) = (first, routed) {
                    self.route(routed);
                }
                self.queue_packet(conn, &Packet::PubRec(pub_resp(id)));
            }
            // The codec guarantees an id for QoS > 0 (MQTT-2.3.1-5).
            _ => {
                bump(&self.counters.malformed_packets);
                self.close(conn, CloseReason::ProtocolError, now);
            }
        }
    }

    fn handle_subscribe(&mut self, conn: ConnId, sub: codec::Subscribe) {
        let Some(key) = self.conn(conn).and_then(|c| c.session) else {
            return;
        };
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut accepted = Vec::with_capacity(sub.filters.len());
        for (filter, options) in &sub.filters {
            if !self.may(key, Access::Subscribe, filter.as_str()) {
                // MQTT-3.9.3: 0x80, failure, for this filter alone.
                bump(&self.counters.acl_denied);
                codes.push(SUBACK_FAILURE);
                continue;
            }
            accepted.push((filter, options));
            let granted = options.qos;
            // MQTT-3.8.4-3: a repeated filter replaces the old subscription.
            self.trie.subscribe(filter, key, granted);
            if let Some(s) = self.session_mut(key) {
                if s.subscribe(filter, granted) {
                    bump(&self.counters.subscriptions_current);
                }
            }
            codes.push(granted as u8);
        }
        self.queue_packet(
            conn,
            &Packet::SubAck(SubAck {
                packet_id: sub.packet_id,
                codes,
                properties: None,
            }),
        );
        // MQTT-3.3.1-6 / -8: retained messages go to the new subscription with
        // RETAIN=1, after the SUBACK: this shard's own at once, the other
        // shards' when they answer (see `retained` for who owns what).
        let mut retained = Vec::new();
        for (filter, options) in accepted {
            self.retained
                .for_each_match(filter, |m| retained.push((m.clone(), options.qos)));
            if self.config.shards > 1 {
                self.ask_for_retained(key, filter);
            }
        }
        for (msg, granted) in retained {
            self.deliver_to_session(
                key,
                QueuedMessage {
                    qos: msg.qos.min(granted),
                    topic: msg.topic,
                    payload: msg.payload,
                    retain: true,
                },
            );
        }
    }

    /// A message the broker publishes itself (`$SYS`): routed like a
    /// client's PUBLISH.
    pub fn publish(&mut self, topic: TopicName, payload: Bytes, qos: QoS, retain: bool) {
        self.route(RoutedPublish {
            topic,
            payload,
            qos,
            retain,
        });
    }

    /// Publishes on this shard and on every other: the path of client
    /// PUBLISHes and wills alike.
    fn route(&mut self, publish: RoutedPublish) {
        if publish.retain {
            self.store_retained(&publish);
        }
        self.deliver_local(&publish);
        if self.config.shards > 1 {
            self.events
                .push_back(Event::Broadcast(ShardMsg::Publish(publish)));
        }
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
            self.events
                .push_back(Event::Broadcast(ShardMsg::RetainedQuery(query)));
        } else {
            // An exact filter is one topic, owned by one shard.
            let owner = retained_owner(filter.as_str(), self.config.shards);
            if owner != self.config.shard {
                self.events
                    .push_back(Event::SendTo(owner, ShardMsg::RetainedQuery(query)));
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
        });
        match self.retained.len().cmp(&before) {
            std::cmp::Ordering::Greater => bump(&self.counters.retained_current),
            std::cmp::Ordering::Less => drop_one(&self.counters.retained_current),
            std::cmp::Ordering::Equal => {}
        }
    }

    fn deliver_local(&mut self, publish: &RoutedPublish) {
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        // MQTT-3.3.5-1: overlapping subscriptions of one client get one copy,
        // at the highest granted QoS.
        self.trie
            .collect_matches(&publish.topic, &mut matches, |have, new| {
                if *new > *have {
                    *have = *new;
                }
            });
        for (&key, &granted) in &matches {
            self.deliver_to_session(
                key,
                QueuedMessage {
                    topic: publish.topic.clone(),
                    payload: publish.payload.clone(),
                    qos: publish.qos.min(granted), // MQTT-3.8.4-6
                    retain: false,                 // MQTT-3.3.1-9
                },
            );
        }
        self.matches = matches;
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
    fn deliver_to_session(&mut self, key: SessionKey, msg: QueuedMessage) {
        if self.config.acl.is_some() && !self.may(key, Access::Read, msg.topic.as_str()) {
            return;
        }
        let max_inflight = self.config.max_inflight;
        let max_queued = self.config.max_queued;
        let Some(session) = self.session_mut(key) else {
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
        let must_wait =
            conn.is_none() || session.queue_len() > 0 || session.inflight_len() >= max_inflight;
        if !must_wait {
            if let Some(conn) = conn {
                self.send_now(conn, key, msg);
            }
            return;
        }
        if session.queue_len() >= max_queued {
            // The queue is full: the newest message is the one dropped, so
            // what the client does get stays in order.
            bump(&self.counters.messages_dropped);
            return;
        }
        session.flows_mut().queue.push_back(msg);
    }

    fn pump_conn_queue(&mut self, conn: ConnId) {
        if let Some(key) = self.conn(conn).and_then(|c| c.session) {
            self.pump_queue(key);
        }
    }

    /// Moves queued messages into flight while the window has room.
    fn pump_queue(&mut self, key: SessionKey) {
        let max_inflight = self.config.max_inflight;
        loop {
            let Some(session) = self.session_mut(key) else {
                return;
            };
            let Some(conn) = session.conn else { return };
            if session.inflight_len() >= max_inflight {
                return;
            }
            let Some(msg) = session.flows_mut().queue.pop_front() else {
                session.release_idle_flows();
                return;
            };
            self.send_now(conn, key, msg);
        }
    }

    fn send_now(&mut self, conn: ConnId, key: SessionKey, msg: QueuedMessage) {
        let QueuedMessage {
            topic,
            payload,
            qos,
            retain,
        } = msg;
        let packet_id = if qos == QoS::AtMostOnce {
            // A client that does not read must not grow our memory: past the
            // cap its QoS 0 messages are dropped and counted (QoS 1/2 are
            // bounded by the inflight window and the queue instead).
            if self
                .conn(conn)
                .is_some_and(|c| c.outgoing.len() >= MAX_PENDING_OUTGOING)
            {
                bump(&self.counters.messages_dropped);
                return;
            }
            None
        } else {
            let Some(session) = self.session_mut(key) else {
                return;
            };
            match session.allocate_packet_id() {
                Some(id) => Some(id),
                None => {
                    bump(&self.counters.messages_dropped);
                    return;
                }
            }
        };
        let publish = Publish {
            dup: false,
            qos,
            retain,
            topic,
            packet_id,
            payload,
            properties: None,
        };
        if let Some(id) = packet_id {
            if let Some(s) = self.session_mut(key) {
                s.flows_mut()
                    .start(id.get(), Inflight::Published(publish.clone()));
            }
        }
        self.counts.publishes_out += 1;
        self.queue_packet(conn, &Packet::Publish(publish));
    }

    /// MQTT-4.4.0-1: on a resumed session, unacknowledged PUBLISHes are sent
    /// again with DUP=1 and PUBRELs again, in their original order.
    fn resend_inflight(&mut self, conn: ConnId, key: SessionKey) {
        let Some(flows) = self.session(key).and_then(Session::flows) else {
            return;
        };
        for (id, flight) in flows.inflight_in_order() {
            let packet = match flight {
                Inflight::Published(mut p) => {
                    p.dup = true;
                    Packet::Publish(p)
                }
                Inflight::Released => match PacketId::new(id) {
                    Some(pid) => Packet::PubRel(pub_resp(pid)),
                    None => continue,
                },
            };
            self.queue_packet(conn, &packet);
        }
    }

    /// Ends a connection: publishes its will unless it sent DISCONNECT,
    /// detaches its session (ending a clean one), and asks the shell to close
    /// the socket. Idempotent.
    fn close(&mut self, conn: ConnId, reason: CloseReason, _now: Millis) {
        let Some(c) = self.conn_mut(conn) else { return };
        if c.closing {
            return;
        }
        c.closing = true;
        let will = c.will.take();
        let session = c.session.take();
        drop_one(&self.counters.connections_current);
        tracing::debug!(?conn, ?reason, "closing connection");
        // Judged while the session (and so who the client is) still exists.
        let will = match reason {
            CloseReason::Disconnect => None,
            _ => will.filter(|w| self.may_write(session, &w.topic)),
        };

        if let Some(key) = session {
            let clean = match self.session_mut(key) {
                Some(s) => {
                    s.conn = None;
                    s.clean
                }
                None => false,
            };
            if clean {
                self.remove_session(key);
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

    fn create_session(&mut self, client_id: ByteString, clean: bool) -> SessionKey {
        // A copy of its own: the id arrived as a slice of the CONNECT's read
        // buffer, which it would otherwise keep alive for the session's life.
        let client_id = ByteString::from(String::from(&*client_id));
        let hash = self.hasher.hash_one(&*client_id);
        let session = Session::new(client_id, clean);
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

    fn remove_session(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(key.0 as usize).and_then(Option::take) else {
            return;
        };
        drop_one(&self.counters.sessions_current);
        for (filter, _) in session.subscriptions() {
            self.trie.unsubscribe(filter, key);
            drop_one(&self.counters.subscriptions_current);
        }
        let hash = self.hasher.hash_one(&*session.client_id);
        if let Ok(entry) = self.by_client_id.find_entry(hash, |k| *k == key) {
            entry.remove();
        }
        self.free_sessions.push(key.0);
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

fn pub_resp(packet_id: PacketId) -> PubResp {
    PubResp {
        packet_id,
        reason: 0,
        properties: None,
    }
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
