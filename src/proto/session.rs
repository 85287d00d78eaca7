//! A client session: what the broker keeps for one clientId, connected or not
//! (MQTT 3.1.1 §3.1.2.4): its subscriptions, the QoS 1/2 messages in flight to
//! it, and the QoS 2 packet ids it has sent us that await PUBREL.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;
use hashbrown::HashMap;

use super::codec::{LastWill, PacketId, Properties, Publish, QoS};
use super::topic::{TopicFilter, TopicName};
use super::{ConnId, Millis};

/// Session Expiry Interval meaning "never" (MQTT 5 §3.1.2.11.2); what a
/// 3.1.1 cleanSession=0 session gets.
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// One subscription's options (MQTT 5 §3.8.3.1; 3.x has only the QoS):
/// the trie's value and the session's record. `Copy`, 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOpts {
    /// Granted QoS: the most a delivery through it gets (MQTT-3.8.4-6).
    pub qos: QoS,
    /// No Local: never send it what its own clientId published (MQTT-3.8.3-3).
    pub no_local: bool,
    /// Retain As Published: live deliveries keep the RETAIN flag (MQTT-3.3.1-13).
    pub retain_as_published: bool,
    /// Subscription Identifier, 0 when none (§3.8.2.1.2).
    pub id: u32,
}

impl SubOpts {
    /// A 3.x subscription: only a QoS.
    pub fn qos(qos: QoS) -> SubOpts {
        SubOpts {
            qos,
            no_local: false,
            retain_as_published: false,
            id: 0,
        }
    }
}

/// A will whose publication waits for its Will Delay Interval after an
/// abnormal close (MQTT 5 §3.1.3.2.2), unless the client comes back first
/// (MQTT-3.1.3-9) or the session ends first.
#[derive(Debug)]
pub struct PendingWill {
    /// The will itself.
    pub will: LastWill,
    /// When it is due.
    pub due: Millis,
}

/// Index of a session in its shard's session table; the trie's subscriber key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(pub u32);

/// One client's session.
///
/// Kept small, because a fleet holds one per device: what only QoS 1/2
/// traffic needs lives in a [`Flows`] box that exists only while a flow is
/// open or a message waits, and subscriptions are a sorted vector (a device
/// has a handful; a hash map would cost a ~200-byte table for one entry).
#[derive(Debug)]
pub struct Session {
    /// The clientId it belongs to.
    pub client_id: ByteString,
    /// Seconds it outlives its connection: 0 ends it with the connection
    /// (3.1.1 cleanSession=1, MQTT-3.1.2-6; 5.0 MQTT-3.1.2-23),
    /// [`NEVER_EXPIRES`] keeps it until a clean start (3.1.1 cleanSession=0).
    pub expiry_secs: u32,
    /// While no connection is attached: when the session ends, in
    /// milliseconds of the broker's clock (`u64::MAX`: never).
    pub expires_at: u64,
    /// Bumped each time a connection attaches or detaches, so an entry the
    /// expiry wheel holds for an earlier absence is recognised as stale.
    pub generation: u32,
    /// The connection attached now, if any.
    pub conn: Option<ConnId>,
    /// A will waiting for its delay after the last connection was lost.
    pub pending_will: Option<Box<PendingWill>>,
    /// Whether it has a shared subscription (`$share/...`): only then do
    /// the owners of groups hear of its window filling and emptying.
    pub shares: bool,
    /// The window-full state the group owners were last told.
    pub share_busy: bool,
    /// With `--data-dir`: a `Session` record of it is in the log, so its
    /// end must be logged too.
    pub logged: bool,
    /// Its queue has been full once (the log line that says so is written
    /// once per session).
    pub queue_full_seen: bool,
    /// The username its client last connected with, kept only when an ACL
    /// is in use (the rules are per user).
    pub username: Option<Box<str>>,
    /// Subscriptions and their options, sorted by filter, restored on a
    /// resumed session (MQTT-3.2.2-2 and §3.1.2.4). Shared ones keep their
    /// whole `$share/GROUP/FILTER`.
    subscriptions: Vec<(TopicFilter, SubOpts)>,
    flows: Option<Box<Flows>>,
    next_packet_id: u16,
}

/// A session's QoS 1/2 state.
#[derive(Debug, Default)]
pub struct Flows {
    /// QoS 1/2 PUBLISHes sent to the client and not yet acknowledged, keyed by
    /// packet id, each with its send order. A PUBLISH whose PUBREC arrived
    /// is kept as `Released`.
    pub inflight: HashMap<u16, (u64, Inflight)>,
    /// QoS 2 packet ids received (and acknowledged with PUBREC, or about to
    /// be), awaiting PUBREL: a resent PUBLISH with one of these ids is not
    /// delivered again (MQTT-4.3.3).
    pub awaiting_rel: HashMap<u16, AwaitingRel>,
    /// QoS 1/2 messages owed to the client that are not yet in flight: it is
    /// offline (a persistent session), or its inflight window is full. Sent in
    /// order, after the messages in flight (MQTT-4.6.0).
    pub queue: VecDeque<QueuedMessage>,
    /// `--queue-full backpressure`: messages that met the queue full while
    /// the client was connected. Each waits here, outside the queue, with
    /// its publisher's acknowledgement, until the queue has room (then it
    /// joins the queue's end, so deliveries keep their order) or the
    /// timeout passes. Never holds a message unless the queue is full.
    pub parked: VecDeque<Parked>,
    /// A parked message timed out: the client is not reading, so until
    /// it takes a message from the queue, what meets the full queue is
    /// dropped at once instead of holding more publishers.
    pub stalled: bool,
}

/// A message parked for a full queue (see [`Flows::parked`]).
#[derive(Debug)]
pub struct Parked {
    /// The message.
    pub msg: QueuedMessage,
    /// The ticket of the publish it belongs to, answered when it is queued
    /// or dropped.
    pub ticket: u64,
    /// When it was parked.
    pub since: Millis,
}

impl Flows {
    /// Records `publish` (or a release) as in flight under packet id `id`.
    /// `order` is the message's id ([`QueuedMessage::id`]): ids grow in the
    /// order messages are owed, so a resumed session resends in that order
    /// (MQTT-4.6.0-1), which packet ids alone do not give once they wrap, and
    /// the same id names the message in the `--data-dir` log.
    pub fn start(&mut self, id: u16, order: u64, flight: Inflight) {
        self.inflight.insert(id, (order, flight));
    }

    /// The flows in flight in the order they were started.
    pub fn inflight_in_order(&self) -> Vec<(u16, Inflight)> {
        let mut all: Vec<(u64, u16, Inflight)> = self
            .inflight
            .iter()
            .map(|(id, (order, f))| (*order, *id, f.clone()))
            .collect();
        all.sort_unstable_by_key(|(order, _, _)| *order);
        all.into_iter().map(|(_, id, f)| (id, f)).collect()
    }

    fn is_empty(&self) -> bool {
        self.inflight.is_empty()
            && self.awaiting_rel.is_empty()
            && self.queue.is_empty()
            && self.parked.is_empty()
    }
}

/// An incoming QoS 2 PUBLISH awaiting PUBREL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwaitingRel {
    /// With `--data-dir`, for a persistent session: the id the message was
    /// routed under, by which every shard that stored copies knows it again
    /// (0: none).
    pub uid: u64,
    /// Every copy it needed stored is known durable (its PUBREC was due).
    /// Until then (a crash came between, or the PUBREC still waits), a
    /// resent PUBLISH is routed again under the same id: the shards that
    /// stored it skip it, the others store it.
    pub confirmed: bool,
}

/// A message waiting in a session's queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// Topic published to.
    pub topic: TopicName,
    /// Payload, shared with every other delivery of the message.
    pub payload: Bytes,
    /// Delivery QoS: already the minimum of publish and subscription.
    pub qos: QoS,
    /// RETAIN as it will be sent (1 for retained messages sent because of a
    /// new subscription, and with Retain As Published).
    pub retain: bool,
    /// MQTT 5 properties forwarded with it (shared by every delivery);
    /// Message Expiry is kept as `expires_at`, never in here.
    pub props: Option<Arc<Properties>>,
    /// When it expires (Message Expiry Interval), on the broker's clock.
    pub expires_at: Option<Millis>,
    /// Subscription Identifiers of the subscriptions it matched
    /// (MQTT-3.3.4-3); empty holds no allocation.
    pub sub_ids: Vec<u32>,
    /// Its id on this shard, given when it is owed to the session (QoS 1/2
    /// only; 0 until then): its send order, and its name in the log.
    pub id: u64,
}

/// An outgoing QoS 1/2 message awaiting its acknowledgement.
#[derive(Debug, Clone)]
pub enum Inflight {
    /// Sent; awaiting PUBACK (QoS 1) or PUBREC (QoS 2).
    Published(Publish),
    /// QoS 2: PUBREC received and PUBREL sent; awaiting PUBCOMP.
    Released,
}

impl Session {
    /// A fresh session with no subscriptions.
    pub fn new(client_id: ByteString, expiry_secs: u32) -> Self {
        Session {
            client_id,
            expiry_secs,
            expires_at: u64::MAX,
            generation: 0,
            conn: None,
            pending_will: None,
            shares: false,
            share_busy: false,
            logged: false,
            queue_full_seen: false,
            username: None,
            subscriptions: Vec::new(),
            flows: None,
            next_packet_id: 1,
        }
    }

    /// The session's subscriptions, sorted by filter.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&TopicFilter, SubOpts)> {
        self.subscriptions.iter().map(|(f, q)| (f, *q))
    }

    /// The options of the subscription to exactly `filter`, if there is one.
    pub fn subscription(&self, filter: &str) -> Option<SubOpts> {
        self.subscriptions
            .binary_search_by(|(f, _)| f.as_str().cmp(filter))
            .ok()
            .map(|i| self.subscriptions[i].1)
    }

    /// Adds a subscription or, for a filter it has, replaces its options
    /// (MQTT-3.8.4-3). True if the filter is new to the session.
    pub fn subscribe(&mut self, filter: &TopicFilter, qos: SubOpts) -> bool {
        match self
            .subscriptions
            .binary_search_by(|(f, _)| f.as_str().cmp(filter.as_str()))
        {
            Ok(i) => {
                self.subscriptions[i].1 = qos;
                false
            }
            Err(i) => {
                self.subscriptions.insert(i, (filter.clone(), qos));
                true
            }
        }
    }

    /// Removes a subscription; false if there was none.
    pub fn unsubscribe(&mut self, filter: &TopicFilter) -> bool {
        match self
            .subscriptions
            .binary_search_by(|(f, _)| f.as_str().cmp(filter.as_str()))
        {
            Ok(i) => {
                self.subscriptions.remove(i);
                if self.subscriptions.is_empty() {
                    self.subscriptions = Vec::new();
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Its QoS 1/2 state, if any flow is open or any message waits.
    pub fn flows(&self) -> Option<&Flows> {
        self.flows.as_deref()
    }

    /// Its QoS 1/2 state, created empty if there was none.
    pub fn flows_mut(&mut self) -> &mut Flows {
        self.flows.get_or_insert_with(Default::default)
    }

    /// Its QoS 1/2 state, if any (none is created).
    pub fn existing_flows_mut(&mut self) -> Option<&mut Flows> {
        self.flows.as_deref_mut()
    }

    /// Frees the QoS 1/2 state once nothing is in flight or waiting, so an
    /// idle session costs no tables.
    pub fn release_idle_flows(&mut self) {
        if self.flows.as_ref().is_some_and(|f| f.is_empty()) {
            self.flows = None;
        }
    }

    /// Messages in flight to the client.
    pub fn inflight_len(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.inflight.len())
    }

    /// Messages waiting to be put in flight.
    pub fn queue_len(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.queue.len())
    }

    /// Messages parked for its full queue ([`Flows::parked`]).
    pub fn parked_len(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.parked.len())
    }

    /// The next packet id not in flight (MQTT-2.3.1-2: an id is reusable only
    /// once its flow is complete). `None` when all 65,535 are in use.
    pub fn allocate_packet_id(&mut self) -> Option<PacketId> {
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            let in_use = self
                .flows
                .as_ref()
                .is_some_and(|f| f.inflight.contains_key(&id));
            if !in_use {
                return PacketId::new(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap_mqtt_2_3_1_2() {
        let mut s = Session::new(ByteString::from("c"), 0);
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(1));
        s.flows_mut().start(2, 0, Inflight::Released);
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(3));
        s.next_packet_id = u16::MAX;
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(u16::MAX));
        // Wraps past 0, which is never an id (MQTT-2.3.1-1).
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(1));
    }

    #[test]
    fn no_id_when_all_are_in_flight() {
        let mut s = Session::new(ByteString::from("c"), 0);
        for id in 1..=u16::MAX {
            s.flows_mut().start(id, u64::from(id), Inflight::Released);
        }
        assert_eq!(s.allocate_packet_id(), None);
    }

    #[test]
    fn inflight_order_is_send_order_even_after_ids_wrap_mqtt_4_6_0_1() {
        let mut s = Session::new(ByteString::from("c"), NEVER_EXPIRES);
        s.flows_mut().start(65_535, 1, Inflight::Released);
        s.flows_mut().start(1, 2, Inflight::Released);
        s.flows_mut().start(2, 3, Inflight::Released);
        let ids: Vec<u16> = s
            .flows()
            .unwrap()
            .inflight_in_order()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, [65_535, 1, 2]);
    }

    #[test]
    fn subscriptions_replace_by_filter_and_idle_flows_are_freed() {
        let f = |s: &str| TopicFilter::new(s).unwrap();
        let mut s = Session::new(ByteString::from("c"), NEVER_EXPIRES);
        let q = SubOpts::qos;
        assert!(s.subscribe(&f("b/#"), q(QoS::AtMostOnce)));
        assert!(s.subscribe(&f("a/+"), q(QoS::AtLeastOnce)));
        assert!(
            !s.subscribe(&f("b/#"), q(QoS::ExactlyOnce)),
            "replaced, not added"
        );
        let subs: Vec<(&str, QoS)> = s
            .subscriptions()
            .map(|(f, o)| (f.as_str(), o.qos))
            .collect();
        assert_eq!(subs, [("a/+", QoS::AtLeastOnce), ("b/#", QoS::ExactlyOnce)]);
        assert!(s.unsubscribe(&f("a/+")));
        assert!(!s.unsubscribe(&f("a/+")));
        s.flows_mut().awaiting_rel.insert(
            4,
            AwaitingRel {
                uid: 0,
                confirmed: true,
            },
        );
        s.release_idle_flows();
        assert!(s.flows().is_some(), "a QoS 2 flow is open");
        s.flows_mut().awaiting_rel.remove(&4);
        s.release_idle_flows();
        assert!(s.flows().is_none());
    }
}
