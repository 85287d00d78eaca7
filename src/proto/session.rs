//! A client session: what the broker keeps for one clientId, connected or not
//! (MQTT 3.1.1 §3.1.2.4): its subscriptions, the QoS 1/2 messages in flight to
//! it, and the QoS 2 packet ids it has sent us that await PUBREL.

use std::collections::VecDeque;

use bytes::Bytes;
use bytestring::ByteString;
use hashbrown::{HashMap, HashSet};

use super::codec::{PacketId, Publish, QoS};
use super::topic::{TopicFilter, TopicName};
use super::ConnId;

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
    /// cleanSession of the connection that made it: a clean session ends with
    /// its connection (MQTT-3.1.2-6); a persistent one outlives it.
    pub clean: bool,
    /// The connection attached now, if any.
    pub conn: Option<ConnId>,
    /// The username its client last connected with, kept only when an ACL
    /// is in use (the rules are per user).
    pub username: Option<Box<str>>,
    /// Subscriptions and their granted QoS, sorted by filter, restored on a
    /// resumed session (MQTT-3.2.2-2 and §3.1.2.4).
    subscriptions: Vec<(TopicFilter, QoS)>,
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
    /// QoS 2 packet ids received and acknowledged with PUBREC, awaiting PUBREL:
    /// a resent PUBLISH with one of these ids is not routed again (MQTT-4.3.3).
    pub awaiting_rel: HashSet<u16>,
    /// QoS 1/2 messages owed to the client that are not yet in flight: it is
    /// offline (a persistent session), or its inflight window is full. Sent in
    /// order, after the messages in flight (MQTT-4.6.0).
    pub queue: VecDeque<QueuedMessage>,
    /// Send order of the next message put in flight: a resumed session
    /// resends in this order (MQTT-4.6.0-1), which packet ids alone do not
    /// give once they wrap.
    next_order: u64,
}

impl Flows {
    /// Records `publish` (or a release) as in flight under `id`, after all
    /// others.
    pub fn start(&mut self, id: u16, flight: Inflight) {
        let order = self.next_order;
        self.next_order += 1;
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
        self.inflight.is_empty() && self.awaiting_rel.is_empty() && self.queue.is_empty()
    }
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
    /// RETAIN as it will be sent (1 only for retained messages sent because
    /// of a new subscription).
    pub retain: bool,
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
    pub fn new(client_id: ByteString, clean: bool) -> Self {
        Session {
            client_id,
            clean,
            conn: None,
            username: None,
            subscriptions: Vec::new(),
            flows: None,
            next_packet_id: 1,
        }
    }

    /// The session's subscriptions, sorted by filter.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&TopicFilter, QoS)> {
        self.subscriptions.iter().map(|(f, q)| (f, *q))
    }

    /// Adds a subscription or, for a filter it has, replaces its QoS
    /// (MQTT-3.8.4-3). True if the filter is new to the session.
    pub fn subscribe(&mut self, filter: &TopicFilter, qos: QoS) -> bool {
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
        let mut s = Session::new(ByteString::from("c"), true);
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(1));
        s.flows_mut().start(2, Inflight::Released);
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(3));
        s.next_packet_id = u16::MAX;
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(u16::MAX));
        // Wraps past 0, which is never an id (MQTT-2.3.1-1).
        assert_eq!(s.allocate_packet_id().map(PacketId::get), Some(1));
    }

    #[test]
    fn no_id_when_all_are_in_flight() {
        let mut s = Session::new(ByteString::from("c"), true);
        for id in 1..=u16::MAX {
            s.flows_mut().start(id, Inflight::Released);
        }
        assert_eq!(s.allocate_packet_id(), None);
    }

    #[test]
    fn inflight_order_is_send_order_even_after_ids_wrap_mqtt_4_6_0_1() {
        let mut s = Session::new(ByteString::from("c"), false);
        s.flows_mut().start(65_535, Inflight::Released);
        s.flows_mut().start(1, Inflight::Released);
        s.flows_mut().start(2, Inflight::Released);
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
        let mut s = Session::new(ByteString::from("c"), false);
        assert!(s.subscribe(&f("b/#"), QoS::AtMostOnce));
        assert!(s.subscribe(&f("a/+"), QoS::AtLeastOnce));
        assert!(
            !s.subscribe(&f("b/#"), QoS::ExactlyOnce),
            "replaced, not added"
        );
        let subs: Vec<(&str, QoS)> = s.subscriptions().map(|(f, q)| (f.as_str(), q)).collect();
        assert_eq!(subs, [("a/+", QoS::AtLeastOnce), ("b/#", QoS::ExactlyOnce)]);
        assert!(s.unsubscribe(&f("a/+")));
        assert!(!s.unsubscribe(&f("a/+")));
        s.flows_mut().awaiting_rel.insert(4);
        s.release_idle_flows();
        assert!(s.flows().is_some(), "a QoS 2 flow is open");
        s.flows_mut().awaiting_rel.remove(&4);
        s.release_idle_flows();
        assert!(s.flows().is_none());
    }
}
